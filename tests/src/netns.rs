//! Network namespaces the harness owns, and ways to run things inside them.
//!
//! A [`NetNs`] is a named namespace (`ip netns add`, so it shows in `ip netns list` and has a
//! path under `/run/netns/` that CNI_NETNS can name). Dropping it deletes it, which also
//! destroys every veth end inside it.
//!
//! Three ways in:
//! - [`NetNs::exec`] and friends: a tool run through `ip netns exec` (ping, nc, iperf3,
//!   tcpdump). `ip netns exec` also gives the tool a private mount namespace with a fresh
//!   `/sys`; harmless for those tools.
//! - [`enter_on_spawn`]: a [`Command`] whose child calls `setns(CLONE_NEWNET)` between fork
//!   and exec and stays in the caller's mount namespace. The agent must start this way: its
//!   bpffs pins live in the test's mount namespace and must survive agent restarts.
//! - [`NetNs::run`] / [`NetNs::spawn`]: a Rust closure on a dedicated thread that entered the
//!   namespace (only that thread moves), for TCP listeners and connectors.
//!
//! Never touched here: the root network namespace. Links are created with `ip -n <ns>` inside
//! the namespace they belong to.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context, bail};

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace named [`crate::unique_name`]`(role)` with `lo` up.
    pub fn new(role: &str) -> anyhow::Result<Self> {
        Self::named(crate::unique_name(role))
    }

    /// Creates a namespace with exactly this name (which must not exist) and brings `lo` up.
    pub fn named(name: String) -> anyhow::Result<Self> {
        run_ok(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating netns {name}"))?;
        // From here on Drop deletes it, also if bringing lo up fails.
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path, as a runtime passes it in CNI_NETNS.
    pub fn path(&self) -> PathBuf {
        path_of(&self.name)
    }

    /// Creates a veth pair: `ifname` here and `peer_ifname` in `peer` (both created inside
    /// their namespaces, never in the root one). Neither end is brought up.
    pub fn add_veth(&self, ifname: &str, peer: &NetNs, peer_ifname: &str) -> anyhow::Result<()> {
        self.ip(&[
            "link",
            "add",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            peer_ifname,
            "netns",
            peer.name(),
        ])?;
        Ok(())
    }

    /// Runs `argv` inside the namespace (`ip netns exec`) and returns its output, whatever the
    /// exit status.
    pub fn exec(&self, argv: &[&str]) -> Output {
        exec(&self.name, argv)
    }

    /// Runs `argv` inside the namespace; fails (with its stderr) unless it exits 0. Returns
    /// stdout.
    pub fn sh(&self, argv: &[&str]) -> anyhow::Result<String> {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv),
        )
    }

    /// Runs `ip -n <ns> <args>`; fails unless it exits 0. Returns stdout.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `f` on a new thread that entered this namespace and returns its result. Panics in
    /// `f` propagate to the caller.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// Starts `f` on a new thread that entered this namespace (only that thread moves).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            // setns(CLONE_NEWNET) moves only the calling thread; the thread ends with `f`, so
            // nothing else in the process ever runs in this namespace by accident.
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
            drop(fd);
            f()
        })
    }

    /// Names of the links in the namespace (`ip -o link`), without `@peer` suffixes.
    pub fn links(&self) -> anyhow::Result<Vec<String>> {
        let out = self.ip(&["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .collect())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run_ok(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("harness: deleting netns {}: {e:#}", self.name);
        }
    }
}

/// `/run/netns/<name>`.
pub fn path_of(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `argv` in namespace `ns` through `ip netns exec`; returns the output whatever the status.
pub fn exec(ns: &str, argv: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
        .expect("running ip netns exec")
}

/// Makes `cmd`'s child join network namespace `ns` (by `setns` between fork and exec) while
/// staying in the caller's mount namespace. The namespace file is opened now, before the
/// fork, so the child only makes the one system call.
#[expect(
    unsafe_code,
    reason = "Command::pre_exec is unsafe: the closure runs between fork and exec (it only calls setns(2))"
)]
pub fn enter_on_spawn(cmd: &mut Command, ns: &str) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let path = path_of(ns);
    let fd = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the closure runs in the forked child before exec; it only calls setns(2), which
    // is async-signal-safe, on an fd opened before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    Ok(())
}

/// Runs `cmd` with `input` on its stdin and collects its stdout and stderr, whatever its exit
/// status. A command that exits before reading all of `input` says why on stderr.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> std::io::Result<std::process::Output> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let _ = stdin.write_all(input);
    drop(stdin);
    child.wait_with_output()
}

/// Runs `cmd`; fails with its command line and stderr unless it exits 0. Returns stdout.
pub fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The lines of `tc filter show dev <ifname> <hook>` in namespace `ns` (`hook`: `ingress` or
/// `egress`); none when the device or its clsact qdisc is not there.
pub fn tc_filters(ns: &str, ifname: &str, hook: &str) -> Vec<String> {
    Command::new("tc")
        .args(["-n", ns, "filter", "show", "dev", ifname, hook])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Names in `ip netns list` that start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}
