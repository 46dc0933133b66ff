//! A real kube-proxy inside a simulated node's network namespace, against the real API server
//! of [`crate::apiserver::ApiServer`], for tests of ferrea beside kube-proxy.
//!
//! The API server is the cluster's control plane on the fabric
//! ([`ApiServer::start_on_fabric`]): kube-proxy reaches it from the node's namespace over the
//! node's transport interface, with the admin kubeconfig, as on a real node.
//!
//! [`KubeProxy::start`] runs the cached `kube-proxy` (`scripts/k8s/build.sh kube-proxy`) with a
//! `KubeProxyConfiguration` file, entered into the node's namespace with `setns` between fork
//! and exec (never `ip netns exec`, never the root namespace). The configuration turns off
//! everything that would write outside that namespace or the process: conntrack sysctl tuning
//! (`conntrack.maxPerCore: 0`, `min: 0`, both TCP timeouts `0s`: leave as is), localhost
//! NodePorts (`nodePortAddresses` is the fabric subnet, so `route_localnet` stays), and the
//! OOM score (0). Dropping the guard stops it by PID (SIGTERM, then SIGKILL), also while a
//! failed assertion unwinds.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::apiserver::{ApiServer, k8s_bin};

/// kube-proxy's proxy mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// `nftables`: one nftables table `ip kube-proxy` (knftables, through the `nft` binary).
    Nftables,
    /// `iptables`: chains in the `nat` and `filter` tables (through `iptables-restore`).
    Iptables,
}

impl ProxyMode {
    /// The mode's name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
        }
    }
}

/// How long SIGTERM gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What a kube-proxy is started with.
#[derive(Clone, Debug)]
pub struct KubeProxySpec {
    /// The node's network namespace.
    pub netns: String,
    /// The Node object's name (`hostnameOverride`).
    pub node_name: String,
    /// The node's address (`bindAddress`, the node IP kube-proxy uses).
    pub node_ip: Ipv4Addr,
    /// The cluster's pod CIDR (`clusterCIDR`, local-traffic detection).
    pub cluster_cidr: String,
    /// Where NodePorts are served (`nodePortAddresses`).
    pub node_port_cidr: String,
    /// The proxy mode.
    pub mode: ProxyMode,
}

/// A running kube-proxy (see the module doc).
#[derive(Debug)]
pub struct KubeProxy {
    child: Option<Child>,
    spec: KubeProxySpec,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl KubeProxy {
    /// Starts kube-proxy in `spec.netns` against `api`, which must be reachable from there
    /// ([`ApiServer::start_on_fabric`]).
    pub fn start(api: &ApiServer, spec: KubeProxySpec) -> anyhow::Result<Self> {
        let bin = k8s_bin("kube-proxy");
        let dir = tempfile::Builder::new()
            .prefix("ferrea-kube-proxy-")
            .tempdir()?;
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, config_yaml(api.kubeconfig_path(), &spec))?;
        let log = dir.path().join("kube-proxy.log");
        let mut out = OpenOptions::new().create(true).append(true).open(&log)?;
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--config={}", config.display()))
            .arg("--v=2")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out.try_clone()?);
        crate::netns::enter_on_spawn(&mut cmd, &spec.netns)?;
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        writeln!(
            out,
            "=== harness: started kube-proxy pid {} in netns {} ===",
            child.id(),
            spec.netns
        )?;
        Ok(KubeProxy {
            child: Some(child),
            spec,
            log,
            _dir: dir,
        })
    }

    /// The process's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_else(|e| e.to_string());
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- last lines of kube-proxy ({}) ---\n{}",
            self.spec.node_name,
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    /// The rules kube-proxy wrote in the node's namespace: `nft list table ip kube-proxy`, or
    /// `iptables-save` (empty when there are none yet).
    pub fn rules(&self) -> String {
        let argv: &[&str] = match self.spec.mode {
            ProxyMode::Nftables => &["nft", "list", "table", "ip", "kube-proxy"],
            ProxyMode::Iptables => &["iptables-save"],
        };
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]);
        if crate::netns::enter_on_spawn(&mut cmd, &self.spec.netns).is_err() {
            return String::new();
        }
        cmd.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Waits until kube-proxy's rules mention every one of `needles` (a Service's ClusterIP,
    /// a NodePort); fails with the log's tail (and early if the process exited).
    pub fn wait_rules(&mut self, needles: &[&str], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let rules = self.rules();
            if needles.iter().all(|n| rules.contains(n)) {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                bail!("kube-proxy exited ({st})\n{}", self.log_tail(40));
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-proxy ({}) did not program {needles:?} within {timeout:?}\n{}",
                    self.spec.mode.as_str(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(c.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The `KubeProxyConfiguration` of `spec`.
fn config_yaml(kubeconfig: &Path, spec: &KubeProxySpec) -> String {
    format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {node}
bindAddress: {ip}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
mode: {mode}
clusterCIDR: {cluster}
detectLocalMode: ClusterCIDR
nodePortAddresses: [\"{nodeports}\"]
oomScoreAdj: 0
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
",
        kubeconfig = kubeconfig.display(),
        node = spec.node_name,
        ip = spec.node_ip,
        mode = spec.mode.as_str(),
        cluster = spec.cluster_cidr,
        nodeports = spec.node_port_cidr,
    )
}

/// One backend of a Service: the pod's address and its node.
#[derive(Clone, Debug)]
pub struct Backend {
    /// The pod's IP.
    pub ip: Ipv4Addr,
    /// The node the pod runs on.
    pub node: String,
}

/// A selector-less Service with one port and the EndpointSlice naming its backends, as the
/// EndpointSlice controller would write it (no controller-manager runs).
#[derive(Clone, Debug)]
pub struct ServiceSpec<'a> {
    /// Name (namespace `default`).
    pub name: &'a str,
    /// `ClusterIP` or `NodePort`.
    pub kind: &'a str,
    /// The ClusterIP (inside the API server's service CIDR, 10.96.0.0/16).
    pub cluster_ip: Ipv4Addr,
    /// `TCP` or `UDP`.
    pub protocol: &'a str,
    /// The Service's port.
    pub port: u16,
    /// The backends' port.
    pub target_port: u16,
    /// The NodePort (NodePort Services only).
    pub node_port: Option<u16>,
    /// The backends.
    pub backends: Vec<Backend>,
}

impl<'a> ServiceSpec<'a> {
    /// A ClusterIP Service at `ip` on port 53 (UDP) or 80 (TCP and SCTP) to `target_port` of
    /// `backends`.
    pub fn cluster_ip(
        name: &'a str,
        ip: [u8; 4],
        protocol: &'a str,
        target_port: u16,
        backends: Vec<Backend>,
    ) -> Self {
        ServiceSpec {
            name,
            kind: "ClusterIP",
            cluster_ip: Ipv4Addr::from(ip),
            protocol,
            port: if protocol == "UDP" { 53 } else { 80 },
            target_port,
            node_port: None,
            backends,
        }
    }

    /// This Service as type NodePort with node port `port`.
    pub fn with_node_port(mut self, port: u16) -> Self {
        self.kind = "NodePort";
        self.node_port = Some(port);
        self
    }

    /// The Service and its EndpointSlice as one YAML stream.
    pub fn yaml(&self) -> String {
        let node_port = self
            .node_port
            .map(|p| format!("\n    nodePort: {p}"))
            .unwrap_or_default();
        let mut eps = String::new();
        for b in &self.backends {
            eps.push_str(&format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: {}\n",
                b.ip, b.node
            ));
        }
        format!(
            "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  type: {kind}
  clusterIP: {ip}
  ports:
  - name: p
    protocol: {proto}
    port: {port}
    targetPort: {target}{node_port}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels:
    kubernetes.io/service-name: {name}
    endpointslice.kubernetes.io/managed-by: ferrea-tests
addressType: IPv4
ports:
- name: p
  protocol: {proto}
  port: {target}
endpoints:
{eps}",
            name = self.name,
            kind = self.kind,
            ip = self.cluster_ip,
            proto = self.protocol,
            port = self.port,
            target = self.target_port,
        )
    }
}

/// Connects from inside `ns` to `addr` (2 s timeout) and returns what a tagged
/// [`crate::capture::TcpPeers`] said. A connection only completes if the answers come from
/// the address called, so success proves that the replies were un-NATed.
pub fn tcp_ask(ns: &crate::netns::NetNs, addr: std::net::SocketAddr) -> anyhow::Result<String> {
    crate::capture::tcp_answer(ns, addr, Duration::from_secs(2))
}
