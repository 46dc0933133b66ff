//! The `ferrea-agent` process of a simulated node, and the node's private bpffs.
//!
//! The agent runs inside the node's network namespace, entered with `setns` between fork and
//! exec (see [`crate::netns::enter_on_spawn`]), not with `ip netns exec`: the latter would give
//! it a private mount namespace with a fresh `/sys`, and pins in a bpffs mounted there would
//! vanish with the process, so a restarted agent could not adopt its own programs and maps.
//! The bpffs is mounted by the test process instead ([`BpfFs`]) and outlives agent restarts.
//!
//! The process is stopped by its PID only: SIGTERM, then SIGKILL after a grace period.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cni::Cni;

/// How long [`Agent::start`] waits for the agent to answer CNI STATUS.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long [`Agent::stop`] waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// A bpffs instance mounted at a directory; unmounted (lazily) on drop.
#[derive(Debug)]
pub struct BpfFs {
    path: PathBuf,
}

impl BpfFs {
    /// Creates `path` and mounts a new bpffs instance there, in the caller's mount namespace.
    pub fn mount(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        nix::mount::mount(
            Some("bpf"),
            path,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting bpffs at {}", path.display()))?;
        Ok(BpfFs {
            path: path.to_owned(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        // MNT_DETACH: the pins go away once nothing (an agent still exiting) holds them.
        if let Err(e) = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("harness: unmounting bpffs {}: {e}", self.path.display());
        }
    }
}

/// Everything needed to (re)start one node's agent.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// Network namespace the agent runs in.
    pub netns: String,
    /// Its configuration file.
    pub config: PathBuf,
    /// Where its stderr (and stdout) go; appended to across restarts.
    pub log: PathBuf,
    /// CNI runner for the readiness probe (STATUS through the real plugin).
    pub cni: Cni,
}

/// A running (or stopped) agent process.
#[derive(Debug)]
pub struct Agent {
    spec: AgentSpec,
    child: Option<Child>,
}

impl Agent {
    /// Starts the agent and waits until it is ready ([`Agent::wait_ready`]).
    pub fn start(spec: AgentSpec) -> anyhow::Result<Self> {
        let mut a = Agent { spec, child: None };
        a.spawn()?;
        a.wait_ready(READY_TIMEOUT)?;
        Ok(a)
    }

    /// A guard for an agent that is not running yet (start it with [`Agent::spawn`]).
    pub fn start_stopped(spec: AgentSpec) -> Self {
        Agent { spec, child: None }
    }

    /// Starts the process without waiting for readiness. Fails if it is already running.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("agent already running (pid {:?})", self.pid());
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .with_context(|| format!("opening {}", self.spec.log.display()))?;
        let bin = crate::bin("ferrea-agent");
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&self.spec.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?);
        if std::env::var_os("FERREA_LOG").is_none() {
            cmd.env("FERREA_LOG", "info,ferrea_agent=debug");
        }
        crate::netns::enter_on_spawn(&mut cmd, &self.spec.netns)?;
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        writeln!(
            log,
            "=== harness: started ferrea-agent pid {} in netns {} ===",
            child.id(),
            self.spec.netns
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the socket exists and CNI STATUS through `ferrea-cni` exits 0. Fails early
    /// (with the log's tail) if the process exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("socket not created");
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                self.child = None;
                bail!(
                    "ferrea-agent exited during start-up ({st}); log tail:\n{}",
                    self.log_tail(40)
                );
            }
            if self.spec.cni.socket().exists() {
                let out = self.spec.cni.status()?;
                if out.ok() {
                    return Ok(());
                }
                last = format!("STATUS: {out}");
            }
            if Instant::now() >= deadline {
                bail!(
                    "ferrea-agent not ready after {timeout:?} (last: {last}); log tail:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The PID, while a process is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]; returns the exit status (None if it was not
    /// running).
    pub fn stop(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let pid = Pid::from_raw(child.id() as i32);
        if child.try_wait()?.is_none() {
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while child.try_wait()?.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if child.try_wait()?.is_none() {
                eprintln!("harness: agent pid {pid} ignored SIGTERM for {STOP_GRACE:?}; SIGKILL");
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        Ok(Some(child.wait()?))
    }

    /// Kills the process with SIGKILL (a crash: no cleanup, socket file left behind).
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            child.wait()?;
        }
        Ok(())
    }

    /// Stops the process (SIGTERM) if running, starts it again and waits until ready.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn()?;
        self.wait_ready(READY_TIMEOUT)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.spec.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The spec it was started with.
    pub fn spec(&self) -> &AgentSpec {
        &self.spec
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("harness: stopping agent: {e:#}");
        }
    }
}
