//! A private Open vSwitch for one simulated node, started the way a DaemonSet runs it: an
//! `ovsdb-server` and an `ovs-vswitchd` as separate processes, the agent talking to them over
//! `db.sock` and `<bridge>.mgmt`.
//!
//! All OVS state (database, sockets, logs) lives in the node's directory; `ovs-vswitchd` runs
//! inside the node's network namespace (entered with `setns`), so the userspace (`netdev`)
//! datapath's tap devices appear there and nowhere else. Both daemons are stopped by PID on
//! drop. Userspace TSO is enabled before `ovs-vswitchd` starts: without it TCP through the
//! netdev datapath stalls.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::netns::{enter_on_spawn, run_ok};

/// The OVS schema Debian's openvswitch-common installs.
const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";

/// ovsdb-server and ovs-vswitchd for one node; stopped by PID on drop.
#[derive(Debug)]
pub struct OvsDaemons {
    dir: PathBuf,
    netns: String,
    db: Child,
    vswitchd: Option<Child>,
}

impl OvsDaemons {
    /// Creates a database in `dir` and starts both daemons, `ovs-vswitchd` inside `netns`.
    pub fn start(dir: &Path, netns: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        run_ok(
            Command::new("ovsdb-tool")
                .arg("create")
                .arg(dir.join("conf.db"))
                .arg(SCHEMA),
        )
        .context("creating the OVS database")?;
        let db = spawn_ovsdb_server(dir)?;
        let mut me = OvsDaemons {
            dir: dir.to_owned(),
            netns: netns.to_owned(),
            db,
            vswitchd: None,
        };
        wait_path(&me.db_socket(), "ovsdb-server's db.sock")?;
        me.vsctl(&["--no-wait", "init"])?;
        me.vsctl(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            "other_config:userspace-tso-enable=true",
        ])?;
        me.start_vswitchd()?;
        Ok(me)
    }

    /// Restarts ovsdb-server (SIGKILL by PID, then a new process on the same database file),
    /// as when its container is restarted. The database survives; every client (the agent,
    /// ovs-vswitchd) sees its connection break and must reconnect. Waits until the new server
    /// accepts `ovs-vsctl` again.
    pub fn restart_ovsdb(&mut self) -> anyhow::Result<()> {
        let _ = self.db.kill();
        let _ = self.db.wait();
        // A killed server leaves its sockets behind; wait_path must see the new ones.
        let _ = std::fs::remove_file(self.db_socket());
        let _ = std::fs::remove_file(self.dir.join("ovsdb-server.ctl"));
        self.db = spawn_ovsdb_server(&self.dir)?;
        wait_path(&self.db_socket(), "ovsdb-server's db.sock")?;
        self.vsctl(&["--no-wait", "show"]).map(drop)
    }

    /// The PID of ovsdb-server.
    pub fn ovsdb_pid(&self) -> u32 {
        self.db.id()
    }

    /// The PID of ovs-vswitchd, while it runs.
    pub fn vswitchd_pid(&self) -> Option<u32> {
        self.vswitchd.as_ref().map(Child::id)
    }

    /// Starts (or restarts) ovs-vswitchd inside the node's namespace.
    pub fn start_vswitchd(&mut self) -> anyhow::Result<()> {
        self.stop_vswitchd();
        let mut cmd = Command::new("ovs-vswitchd");
        cmd.arg(format!("unix:{}", self.db_socket().display()))
            .arg(format!(
                "--unixctl={}",
                self.dir.join("ovs-vswitchd.ctl").display()
            ))
            .arg(format!(
                "--log-file={}",
                self.dir.join("ovs-vswitchd.log").display()
            ))
            .arg("--no-chdir")
            .envs(env(&self.dir))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        enter_on_spawn(&mut cmd, &self.netns)?;
        self.vswitchd = Some(cmd.spawn().context("starting ovs-vswitchd")?);
        wait_path(
            &self.dir.join("ovs-vswitchd.ctl"),
            "ovs-vswitchd's control socket",
        )
    }

    /// Stops ovs-vswitchd (by PID), leaving ovsdb-server running.
    pub fn stop_vswitchd(&mut self) {
        if let Some(mut c) = self.vswitchd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.dir.join("ovs-vswitchd.ctl"));
    }

    /// The OVSDB socket.
    pub fn db_socket(&self) -> PathBuf {
        self.dir.join("db.sock")
    }

    /// The run directory (where `<bridge>.mgmt` appears).
    pub fn run_dir(&self) -> &Path {
        &self.dir
    }

    /// The agent config lines that point the OVS backend at these daemons.
    pub fn agent_config(&self) -> String {
        format!(
            "ovs:\n  ovsdbSocket: {}\n  runDir: {}\n  datapathType: netdev\n",
            self.db_socket().display(),
            self.dir.display()
        )
    }

    /// Runs `ovs-vsctl` against this database.
    pub fn vsctl(&self, args: &[&str]) -> anyhow::Result<String> {
        run_ok(
            Command::new("ovs-vsctl")
                .arg(format!("--db=unix:{}", self.db_socket().display()))
                .arg("--timeout=10")
                .args(args),
        )
    }

    /// Runs `ovs-ofctl -O OpenFlow15 <args>` (use [`Self::mgmt`] to name the bridge).
    pub fn ofctl(&self, args: &[&str]) -> anyhow::Result<String> {
        ofctl(args)
    }

    /// Waits (up to 10 s) until ovs-vswitchd has created `bridge`'s management socket.
    pub fn wait_mgmt(&self, bridge: &str) -> anyhow::Result<()> {
        wait_path(
            &self.dir.join(format!("{bridge}.mgmt")),
            &format!("{bridge}'s management socket"),
        )
    }

    /// Adds a bridge as ferrea's backend creates its own (userspace datapath, OpenFlow 1.5,
    /// `fail_mode=secure`: no flows, no forwarding) and waits for its management socket.
    pub fn add_secure_bridge(&self, bridge: &str) -> anyhow::Result<()> {
        self.vsctl(&[
            "add-br",
            bridge,
            "--",
            "set",
            "Bridge",
            bridge,
            "datapath_type=netdev",
            "protocols=OpenFlow15",
            "fail_mode=secure",
        ])?;
        self.wait_mgmt(bridge)
    }

    /// The ports of `bridge` (`ovs-vsctl list-ports`).
    pub fn ports(&self, bridge: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .vsctl(&["list-ports", bridge])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Waits until ovs-vswitchd's revalidators finished a full cycle (`ovs-appctl
    /// revalidator/wait`), which pushes the datapath's packet counts to the OpenFlow flows: a
    /// dump after it counts every packet that went through the bridge before the call.
    pub fn flush_flow_stats(&self) -> anyhow::Result<()> {
        let ctl = self.dir.join("ovs-vswitchd.ctl");
        // Twice: a cycle already under way when the first call came may have dumped the
        // datapath before the last packets.
        for _ in 0..2 {
            crate::netns::run_ok(
                std::process::Command::new("ovs-appctl")
                    .arg("-t")
                    .arg(&ctl)
                    .arg("revalidator/wait"),
            )?;
        }
        Ok(())
    }

    /// The flows of `bridge` (`ovs-ofctl dump-flows`), parsed just enough to select them by
    /// cookie.
    pub fn flows(&self, bridge: &str) -> anyhow::Result<Vec<Flow>> {
        Ok(parse_flows(&ofctl(&["dump-flows", &self.mgmt(bridge)])?))
    }

    /// The management socket of `bridge`, as ovs-ofctl takes it.
    pub fn mgmt(&self, bridge: &str) -> String {
        format!("unix:{}", self.dir.join(format!("{bridge}.mgmt")).display())
    }
}

impl Drop for OvsDaemons {
    fn drop(&mut self) {
        self.stop_vswitchd();
        let _ = self.db.kill();
        let _ = self.db.wait();
    }
}

/// One line of `ovs-ofctl dump-flows`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The flow's cookie (0 when the dump does not show one).
    pub cookie: u64,
    /// The whole line, trimmed.
    pub line: String,
}

impl Flow {
    /// Parses a dump line; `None` for lines that are not flows (the reply header).
    pub fn parse(line: &str) -> Option<Flow> {
        let line = line.trim();
        if !line.contains("actions=") {
            return None;
        }
        let cookie = line
            .split([',', ' '])
            .find_map(|t| t.strip_prefix("cookie=0x"))
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0);
        Some(Flow {
            cookie,
            line: line.to_owned(),
        })
    }

    /// The line without counters and durations (`duration=`, `n_packets=`, `n_bytes=`,
    /// `idle_age=`, `hard_age=`), so dumps of two bridges or two moments compare equal.
    pub fn normalized(&self) -> String {
        self.line
            .split([',', ' '])
            .filter(|t| {
                !t.is_empty()
                    && ![
                        "duration=",
                        "n_packets=",
                        "n_bytes=",
                        "idle_age=",
                        "hard_age=",
                    ]
                    .iter()
                    .any(|p| t.starts_with(p))
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Runs `ovs-ofctl -O OpenFlow15 <args>`; for code that holds a management socket path
/// ([`OvsDaemons::mgmt`]) but not the daemons (a thread inside the node, for instance).
pub fn ofctl(args: &[&str]) -> anyhow::Result<String> {
    run_ok(
        Command::new("ovs-ofctl")
            .args(["-O", "OpenFlow15"])
            .args(args),
    )
}

/// The flows in the output of `ovs-ofctl dump-flows`.
pub fn parse_flows(dump: &str) -> Vec<Flow> {
    dump.lines().filter_map(Flow::parse).collect()
}

fn spawn_ovsdb_server(dir: &Path) -> anyhow::Result<Child> {
    Command::new("ovsdb-server")
        .arg(dir.join("conf.db"))
        .arg(format!("--remote=punix:{}", dir.join("db.sock").display()))
        .arg(format!(
            "--unixctl={}",
            dir.join("ovsdb-server.ctl").display()
        ))
        .arg(format!(
            "--log-file={}",
            dir.join("ovsdb-server.log").display()
        ))
        .arg("--no-chdir")
        .envs(env(dir))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ovsdb-server")
}

fn env(dir: &Path) -> [(&'static str, PathBuf); 3] {
    [
        ("OVS_RUNDIR", dir.to_owned()),
        ("OVS_DBDIR", dir.to_owned()),
        ("OVS_LOGDIR", dir.to_owned()),
    ]
}

fn wait_path(p: &Path, what: &str) -> anyhow::Result<()> {
    if crate::wait_for(Duration::from_secs(10), || p.exists().then_some(())).is_none() {
        bail!("{what} did not appear at {} within 10 s", p.display());
    }
    Ok(())
}
