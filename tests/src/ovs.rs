//! A private Open vSwitch for one simulated node, started the way a DaemonSet runs it: an
//! `ovsdb-server` and an `ovs-vswitchd` as separate processes, the agent talking to them over
//! `db.sock` and `<bridge>.mgmt`.
//!
//! All OVS state (database, sockets, logs) lives in the node's directory; `ovs-vswitchd` runs
//! inside the node's network namespace (entered with `setns`), so the userspace (`netdev`)
//! datapath's tap devices appear there and nowhere else. Both daemons are stopped by PID on
//! drop. Userspace TSO is enabled before `ovs-vswitchd` starts: without it TCP through the
//! netdev datapath stalls (DESIGN.md).

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
        let db = Command::new("ovsdb-server")
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
            .context("starting ovsdb-server")?;
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
        run_ok(
            Command::new("ovs-ofctl")
                .args(["-O", "OpenFlow15"])
                .args(args),
        )
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
