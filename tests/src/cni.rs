//! Running `ferrea-cni` exactly as a container runtime does: the CNI_* environment, the network
//! configuration on stdin, the result or error JSON on stdout, the exit status.
//!
//! The plugin is started inside the node's network namespace (like kubelet's runtime, which
//! runs in the host namespace of its node) with `setns` rather than `ip netns exec`, so it sees
//! the same mount namespace, and the same agent socket path, as the test.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};

/// The CNI spec version the harness speaks.
pub const CNI_VERSION: &str = "1.1.0";

/// The network name in the harness's configurations.
pub const NETWORK_NAME: &str = "ferrea";

/// How long one plugin invocation may take before the harness kills it (by PID) and fails.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// What identifies one attachment to the plugin: CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME and the
/// pod name in CNI_ARGS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS (a path); may name a namespace that no longer exists (DEL after the pod died).
    pub netns: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// `K8S_POD_NAME` in CNI_ARGS (namespace `default`).
    pub pod_name: String,
}

impl Attachment {
    /// An attachment of `eth0` in the namespace named `netns_name`, with a container ID and pod
    /// name derived from it.
    pub fn for_netns(netns_name: &str) -> Self {
        Attachment {
            container_id: format!("{netns_name}-0123456789abcdef"),
            netns: crate::netns::path_of(netns_name).display().to_string(),
            ifname: "eth0".into(),
            pod_name: netns_name.to_owned(),
        }
    }
}

/// One plugin run: exit status, stdout (parsed when JSON) and stderr.
#[derive(Clone, Debug)]
pub struct CniOutput {
    /// The exit status.
    pub status: ExitStatus,
    /// stdout, verbatim.
    pub stdout: String,
    /// stderr, verbatim.
    pub stderr: String,
    /// stdout parsed as JSON, if it is.
    pub json: Option<Value>,
}

impl CniOutput {
    /// Exit status 0.
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// The spec's error `code`, when stdout is an error object.
    pub fn code(&self) -> Option<u64> {
        self.json.as_ref()?.get("code")?.as_u64()
    }

    /// Fails with the whole output unless the plugin exited 0.
    pub fn expect_ok(self, what: &str) -> anyhow::Result<Self> {
        if self.ok() {
            Ok(self)
        } else {
            Err(anyhow!("{what}: {self}"))
        }
    }

    /// Asserts a failure with error code `code` (non-zero exit, error JSON on stdout).
    #[track_caller]
    pub fn assert_error(&self, code: u64, what: &str) {
        assert!(
            !self.ok(),
            "{what}: expected error code {code}, got success: {self}"
        );
        assert_eq!(self.code(), Some(code), "{what}: wrong error code: {self}");
        let msg = self.json.as_ref().and_then(|j| j.get("msg"));
        assert!(
            msg.and_then(Value::as_str).is_some_and(|m| !m.is_empty()),
            "{what}: error without msg: {self}"
        );
    }
}

impl std::fmt::Display for CniOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}; stdout: {}; stderr: {}",
            self.status,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// How [`Cni::invoke_with`] runs the plugin beyond the attachment.
#[derive(Clone, Debug, Default)]
pub struct Invocation {
    /// CNI_ARGS instead of the attachment's (`IgnoreUnknown=1;K8S_POD_NAMESPACE=...`).
    pub cni_args: Option<String>,
    /// Run as this uid (and the gid of the same number) instead of root. The child stays in
    /// the caller's network namespace (entering the node's needs root); the agent's socket is
    /// reached by its path from any.
    pub uid: Option<u32>,
}

/// The parts of an ADD result the tests use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddResult {
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The gateway from the result.
    pub gateway: Option<Ipv4Addr>,
    /// Host-side interface name (the interface without `sandbox`).
    pub host_ifname: String,
    /// Pod-side MAC.
    pub mac: String,
    /// The whole result, for `prevResult` and printing.
    pub raw: Value,
}

impl AddResult {
    /// Parses a CNI 1.x result: the first IPv4 of `ips`, its interface (by index) and the host
    /// interface (the one without a sandbox).
    pub fn parse(v: &Value) -> anyhow::Result<Self> {
        let ifaces = v
            .get("interfaces")
            .and_then(Value::as_array)
            .context("result has no interfaces")?;
        let ip0 = v
            .get("ips")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .context("result has no ips")?;
        let (ip, prefix) = ip0
            .get("address")
            .and_then(Value::as_str)
            .and_then(|a| a.split_once('/'))
            .context("ips[0].address is not a CIDR")?;
        let gateway = ip0
            .get("gateway")
            .and_then(Value::as_str)
            .map(str::parse)
            .transpose()?;
        let pod_if = ip0
            .get("interface")
            .and_then(Value::as_u64)
            .and_then(|i| ifaces.get(i as usize))
            .context("ips[0].interface names no interface")?;
        let host = ifaces
            .iter()
            .find(|i| i.get("sandbox").is_none_or(|s| s.as_str() == Some("")))
            .context("result has no host interface")?;
        Ok(AddResult {
            ip: ip.parse()?,
            prefix: prefix.parse()?,
            gateway,
            host_ifname: host
                .get("name")
                .and_then(Value::as_str)
                .context("host interface without name")?
                .to_owned(),
            mac: pod_if
                .get("mac")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            raw: v.clone(),
        })
    }
}

/// How to call the plugin for one node: the binary, the agent socket, the node namespace.
#[derive(Clone, Debug)]
pub struct Cni {
    bin_dir: PathBuf,
    socket: PathBuf,
    node_ns: Option<String>,
}

impl Cni {
    /// A runner for the agent listening at `socket`, run inside network namespace `node_ns`
    /// (`None`: wherever the caller is). Panics if `ferrea-cni` has not been built.
    pub fn new(socket: PathBuf, node_ns: Option<String>) -> Self {
        let bin = crate::bin("ferrea-cni");
        Cni {
            bin_dir: bin.parent().expect("bin dir").to_owned(),
            socket,
            node_ns,
        }
    }

    /// The agent socket this runner names in its configuration.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The network configuration a runtime would pass (`cniVersion` 1.1.0, type `ferrea-cni`,
    /// `agentSocket`).
    pub fn config(&self) -> Value {
        json!({
            "cniVersion": CNI_VERSION,
            "name": NETWORK_NAME,
            "type": "ferrea-cni",
            "agentSocket": self.socket.display().to_string(),
        })
    }

    /// Runs the plugin with `command`, the attachment's environment (if any) and `stdin`.
    pub fn invoke(
        &self,
        command: &str,
        att: Option<&Attachment>,
        stdin: &[u8],
    ) -> anyhow::Result<CniOutput> {
        self.invoke_plugin(&self.bin_dir.join("ferrea-cni"), command, att, stdin)
    }

    /// Runs any CNI plugin binary (ferrea-cni, or a chained one such as the reference
    /// `portmap`) exactly as [`Cni::invoke`] runs ferrea-cni: same environment, same namespace.
    pub fn invoke_plugin(
        &self,
        plugin: &std::path::Path,
        command: &str,
        att: Option<&Attachment>,
        stdin: &[u8],
    ) -> anyhow::Result<CniOutput> {
        self.run_plugin(plugin, command, att, stdin, &Invocation::default())
    }

    /// Runs ferrea-cni like [`Cni::invoke`], changed as `how` says (other CNI_ARGS, another
    /// user).
    pub fn invoke_with(
        &self,
        command: &str,
        att: Option<&Attachment>,
        stdin: &[u8],
        how: &Invocation,
    ) -> anyhow::Result<CniOutput> {
        self.run_plugin(&self.bin_dir.join("ferrea-cni"), command, att, stdin, how)
    }

    fn run_plugin(
        &self,
        plugin: &std::path::Path,
        command: &str,
        att: Option<&Attachment>,
        stdin: &[u8],
        how: &Invocation,
    ) -> anyhow::Result<CniOutput> {
        let mut cmd = Command::new(plugin);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(a) = att {
            let args = how.cni_args.clone().unwrap_or_else(|| {
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                    a.pod_name, a.container_id
                )
            });
            cmd.env("CNI_CONTAINERID", &a.container_id)
                .env("CNI_NETNS", &a.netns)
                .env("CNI_IFNAME", &a.ifname)
                .env("CNI_ARGS", args);
        }
        match how.uid {
            Some(uid) => {
                use std::os::unix::process::CommandExt;
                cmd.uid(uid).gid(uid);
            }
            None => {
                if let Some(ns) = &self.node_ns {
                    crate::netns::enter_on_spawn(&mut cmd, ns)?;
                }
            }
        }
        run_with_timeout(cmd, stdin, PLUGIN_TIMEOUT)
    }

    /// Runs `command` with this runner's configuration, plus `extra` keys merged in.
    pub fn call(
        &self,
        command: &str,
        att: Option<&Attachment>,
        extra: Value,
    ) -> anyhow::Result<CniOutput> {
        let mut conf = self.config();
        if let (Value::Object(c), Value::Object(e)) = (&mut conf, extra) {
            c.extend(e);
        }
        self.invoke(command, att, conf.to_string().as_bytes())
    }

    /// ADD.
    pub fn add(&self, att: &Attachment) -> anyhow::Result<CniOutput> {
        self.call("ADD", Some(att), json!({}))
    }

    /// DEL (with `prevResult` when known, as runtimes do).
    pub fn del(&self, att: &Attachment, prev: Option<&Value>) -> anyhow::Result<CniOutput> {
        self.call("DEL", Some(att), prev_result(prev))
    }

    /// CHECK with `prevResult`.
    pub fn check(&self, att: &Attachment, prev: Option<&Value>) -> anyhow::Result<CniOutput> {
        self.call("CHECK", Some(att), prev_result(prev))
    }

    /// STATUS (no attachment).
    pub fn status(&self) -> anyhow::Result<CniOutput> {
        self.call("STATUS", None, json!({}))
    }

    /// VERSION.
    pub fn version(&self) -> anyhow::Result<CniOutput> {
        self.call("VERSION", None, json!({}))
    }

    /// GC keeping only `valid` (container ID, ifname) attachments.
    pub fn gc(&self, valid: &[(&str, &str)]) -> anyhow::Result<CniOutput> {
        let list: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        self.call("GC", None, json!({ "cni.dev/valid-attachments": list }))
    }
}

fn prev_result(prev: Option<&Value>) -> Value {
    match prev {
        Some(p) => json!({ "prevResult": p }),
        None => json!({}),
    }
}

/// Runs `cmd` with `stdin`, collecting its output; kills it by PID after `timeout`.
fn run_with_timeout(
    mut cmd: Command,
    stdin: &[u8],
    timeout: Duration,
) -> anyhow::Result<CniOutput> {
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let pid = child.id();
    if let Some(mut s) = child.stdin.take() {
        // The plugin may exit before reading stdin (VERSION); a broken pipe is not an error.
        let _ = s.write_all(stdin);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(r) => r.context("waiting for ferrea-cni")?,
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            bail!("ferrea-cni (pid {pid}) did not finish within {timeout:?}; killed");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(CniOutput {
        status: out.status,
        json: serde_json::from_str(&stdout).ok(),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
