//! The agent's configuration: one YAML document, loaded, defaulted and validated here.
//!
//! Keys are camelCase like Kubernetes objects. Unknown keys are rejected so a typo never
//! silently falls back to a default. Every error names the field at fault.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed or has unknown or mistyped fields (the parser's message names
    /// the field, with line and column).
    #[error("parsing config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A field has a value that is not allowed.
    #[error("config field `{field}`: {reason}")]
    Invalid {
        /// The field, as a dotted path.
        field: &'static str,
        /// Why the value is not allowed.
        reason: &'static str,
    },
    /// `nodePortLocal.portRange` is not a port range.
    #[error("config field `{field}`: {source}")]
    PortRange {
        /// The field, as a dotted path.
        field: &'static str,
        /// Why it is not a port range.
        #[source]
        source: PortRangeError,
    },
}

impl ConfigError {
    /// The field at fault, as a dotted path, when the error is about one field's value.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ConfigError::Invalid { field, .. } | ConfigError::PortRange { field, .. } => {
                Some(field)
            }
            ConfigError::Read { .. } | ConfigError::Parse { .. } => None,
        }
    }
}

/// Which packet path the agent programs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneKind {
    /// TC programs and BPF maps (default).
    #[default]
    Ebpf,
    /// Open vSwitch bridge and OpenFlow pipeline.
    Ovs,
}

/// Who translates Service traffic on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceProxy {
    /// kube-proxy (any mode) runs on the node and NATs Services in the node's stack; ferrea
    /// only makes sure the connections it NATed keep passing the stack (default).
    #[default]
    #[serde(rename = "kube-proxy")]
    KubeProxy,
    /// ferrea's own proxy, for nodes without kube-proxy: the dataplane load-balances the pods'
    /// Service traffic, ferrea's nftables table the rest (NodePorts, the node's own calls).
    #[serde(rename = "ferrea")]
    Ferrea,
}

/// How pod traffic crosses nodes (Antrea's `trafficEncapMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EncapMode {
    /// Through a tunnel between nodes (default).
    #[default]
    Encap,
    /// Routed: the node sends pod traffic to the remote node's address as it is; the underlay
    /// (or a direct link between the nodes) must carry pod addresses.
    NoEncap,
}

/// The encapsulation of the tunnel between nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelType {
    /// VXLAN, UDP port 4789 (default).
    #[default]
    Vxlan,
    /// Geneve, UDP port 6081.
    Geneve,
}

impl TunnelType {
    /// The IANA UDP port of the encapsulation.
    pub fn default_port(self) -> u16 {
        match self {
            TunnelType::Vxlan => 4789,
            TunnelType::Geneve => 6081,
        }
    }

    /// Bytes the encapsulation adds to an IPv4 packet: outer IPv4 (20) + UDP (8) + the
    /// tunnel header (8) + the inner Ethernet header (14). Geneve options are not used.
    pub fn overhead(self) -> u32 {
        50
    }
}

/// Where the desired state comes from: `source: {files: {path: <dir>}}` or
/// `source: {kubernetes: {kubeconfig: <file>}}` (`kubernetes: {}` for the in-cluster
/// configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum SourceConfig {
    /// A directory of Kubernetes-style YAML manifests, watched for changes.
    Files {
        /// The directory (absolute).
        path: PathBuf,
    },
    /// The Kubernetes API: watches of Nodes, this node's Pods, Services, Namespaces and
    /// Antrea's Egress and ExternalIPPool; NodePortLocal annotations are patched onto the Pods.
    Kubernetes {
        /// A kubeconfig file (absolute) to reach the API server with. Default: the in-cluster
        /// configuration (the pod's service account token and `KUBERNETES_SERVICE_HOST`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kubeconfig: Option<PathBuf>,
    },
}

/// The source when the configuration names none: `kubernetes` (in-cluster) when the process
/// runs in a pod (`in_pod`: `KUBERNETES_SERVICE_HOST` is set), else `files` at
/// `/etc/ferrea/manifests`.
pub fn default_source_for(in_pod: bool) -> SourceConfig {
    if in_pod {
        SourceConfig::Kubernetes { kubeconfig: None }
    } else {
        SourceConfig::Files {
            path: PathBuf::from("/etc/ferrea/manifests"),
        }
    }
}

/// The agent configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Name of this node; the `Node` object of that name gives the pod CIDR. Default: the
    /// `NODE_NAME` environment variable, else the host name.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Packet path: `ebpf` or `ovs`. Default `ebpf`.
    #[serde(default)]
    pub dataplane: DataplaneKind,
    /// The OVS backend's settings (used with `dataplane: ovs`): `ovsdbSocket` (default
    /// `/var/run/openvswitch/db.sock`), `runDir` (default `/var/run/openvswitch`), `bridge`
    /// (default `br-int`), `datapathType` (`auto`, `system` or `netdev`; default `auto`).
    #[serde(default)]
    pub ovs: OvsConfig,
    /// Desired-state source: `files: {path}` or `kubernetes: {kubeconfig}` (see
    /// [`SourceConfig`]). Default: `kubernetes` with the in-cluster configuration when the
    /// agent runs in a pod (`KUBERNETES_SERVICE_HOST` set), else `files` at
    /// `/etc/ferrea/manifests`.
    #[serde(
        default = "default_source",
        with = "serde_yaml_ng::with::singleton_map"
    )]
    pub source: SourceConfig,
    /// Unix socket of the CNI gRPC server. Default `/var/run/ferrea/cni.sock`.
    #[serde(default = "default_cni_socket")]
    pub cni_socket: PathBuf,
    /// Unix socket of the debug API (`ferrea.debug.v1`, for `ferreactl`); root only, like the
    /// CNI socket, and never the same file. Default: `debug.sock` in the CNI socket's
    /// directory (`/var/run/ferrea/debug.sock`).
    #[serde(default)]
    pub debug_socket: Option<PathBuf>,
    /// The Prometheus metrics and health endpoints: `enable` (default `true`), `bindAddress`
    /// (default `0.0.0.0:10350`). See [`MetricsConfig`].
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Directory of the agent's persistent state (IPAM store). Default `/var/lib/ferrea`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where BPF programs and maps are pinned; a bpffs is mounted there if none is.
    /// Default `/sys/fs/bpf/ferrea`.
    #[serde(default = "default_bpf_pin_path")]
    pub bpf_pin_path: PathBuf,
    /// CIDRs of all pods in the cluster: traffic to them is never masqueraded.
    /// Default: the node's pod CIDR only.
    #[serde(default, rename = "clusterCIDRs")]
    pub cluster_cidrs: Vec<Ipv4Network>,
    /// The service CIDR: traffic to it is never masqueraded. Default `10.96.0.0/12`.
    #[serde(default = "default_service_cidr", rename = "serviceCIDR")]
    pub service_cidr: Ipv4Network,
    /// MTU of pod interfaces. Default: the transport interface's MTU, minus the tunnel's
    /// overhead in `encap` mode (1450 on a 1500-byte network with VXLAN or Geneve).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// `encap` (default) or `noEncap`.
    #[serde(default)]
    pub traffic_encap_mode: EncapMode,
    /// `vxlan` (default) or `geneve`.
    #[serde(default)]
    pub tunnel_type: TunnelType,
    /// UDP port of the tunnel. Default: 4789 for VXLAN, 6081 for Geneve.
    #[serde(default)]
    pub tunnel_port: Option<u16>,
    /// The interface that carries traffic between nodes, by name. Default: the interface
    /// holding an address in `transportInterfaceCIDRs`, else the one holding the node's
    /// `InternalIP`.
    #[serde(default)]
    pub transport_interface: Option<String>,
    /// CIDRs to choose the transport interface by (the first interface with an address in one
    /// of them), as Antrea's `transportInterfaceCIDRs`.
    #[serde(default, rename = "transportInterfaceCIDRs")]
    pub transport_interface_cidrs: Vec<Ipv4Network>,
    /// Masquerade pod traffic to destinations outside the cluster. Default `true`.
    #[serde(default = "default_true")]
    pub masquerade: bool,
    /// Name of the nftables table (family `ip`) ferrea owns. Default `ferrea`.
    #[serde(default = "default_nft_table")]
    pub nftables_table: String,
    /// Prefix of host-side veth names; the rest is derived from the container ID (15
    /// characters at most in all). Default `fe`.
    #[serde(default = "default_veth_prefix")]
    pub veth_prefix: String,
    /// NodePortLocal: `enable` (default `false`), `portRange` (default `61000-62000`).
    #[serde(default)]
    pub node_port_local: NplConfig,
    /// Who translates Service traffic: `kube-proxy` (default: kube-proxy runs on the node) or
    /// `ferrea` (ferrea's own proxy; kube-proxy must not run). See [`ServiceProxy`].
    #[serde(default)]
    pub service_proxy: ServiceProxy,
    /// Egress failover: `memberlistPort` (default 10351, Antrea's), `failoverDampingSeconds`
    /// (default 3). See [`EgressConfig`].
    #[serde(default)]
    pub egress: EgressConfig,
}

/// `egress` in the agent configuration: the membership among agents that Egress failover
/// runs on ([`crate::membership`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressConfig {
    /// Whether agents run the failure detector (default `true`). Without it every `Node`
    /// object counts as alive and an egress IP moves only when its node leaves the source.
    #[serde(default = "default_true")]
    pub memberlist: bool,
    /// The UDP port of the failure detector on the transport address; the same on every node.
    /// Default 10351 (Antrea's memberlist port).
    #[serde(default = "default_memberlist_port")]
    pub memberlist_port: u16,
    /// How long a (re)joining node's agent must have been alive before it holds egress IPs
    /// (seconds; default 3): a node that keeps failing and recovering moves IPs back at most
    /// once per period.
    #[serde(default = "default_damping")]
    pub failover_damping_seconds: u64,
}

fn default_memberlist_port() -> u16 {
    10351
}
fn default_damping() -> u64 {
    3
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            memberlist: true,
            memberlist_port: default_memberlist_port(),
            failover_damping_seconds: default_damping(),
        }
    }
}

fn default_source() -> SourceConfig {
    default_source_for(std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty()))
}
fn default_cni_socket() -> PathBuf {
    PathBuf::from("/var/run/ferrea/cni.sock")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/ferrea")
}
fn default_bpf_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/ferrea")
}
fn default_service_cidr() -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::new(10, 96, 0, 0), 12).expect("valid")
}
fn default_true() -> bool {
    true
}
fn default_nft_table() -> String {
    "ferrea".into()
}
fn default_veth_prefix() -> String {
    "fe".into()
}

impl Default for Config {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").expect("defaults parse")
    }
}

impl Config {
    /// Loads, defaults and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates a configuration document; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?
        };
        if cfg.node_name.is_none() {
            cfg.node_name = std::env::var("NODE_NAME")
                .ok()
                .filter(|s| !s.is_empty())
                .or_else(|| {
                    nix::unistd::gethostname()
                        .ok()
                        .and_then(|h| h.into_string().ok())
                });
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that the types alone do not constrain.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |field, reason| Err(ConfigError::Invalid { field, reason });
        match &self.node_name {
            None => {
                return inv(
                    "nodeName",
                    "not set and no NODE_NAME or host name available",
                );
            }
            Some(n) if n.is_empty() || n.len() > 253 => {
                return inv("nodeName", "must be 1 to 253 characters");
            }
            _ => {}
        }
        if self.mtu.is_some_and(|m| !(576..=65535).contains(&m)) {
            return inv("mtu", "must be between 576 and 65535");
        }
        if self.tunnel_port == Some(0) {
            return inv("tunnelPort", "must be a UDP port number (1-65535)");
        }
        if self
            .transport_interface
            .as_ref()
            .is_some_and(|n| n.is_empty() || n.len() > 15)
        {
            return inv(
                "transportInterface",
                "must be an interface name of 1 to 15 characters",
            );
        }
        if self.veth_prefix.is_empty() || self.veth_prefix.len() > 4 {
            return inv("vethPrefix", "must be 1 to 4 characters");
        }
        if !self
            .veth_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return inv(
                "vethPrefix",
                "may contain only ASCII letters, digits and '-'",
            );
        }
        if self.nftables_table.is_empty()
            || !self
                .nftables_table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return inv(
                "nftablesTable",
                "must be a non-empty name of letters, digits, '_' or '-'",
            );
        }
        if !self.cni_socket.is_absolute() {
            return inv("cniSocket", "must be an absolute path");
        }
        if let Some(d) = &self.debug_socket
            && !d.is_absolute()
        {
            return inv("debugSocket", "must be an absolute path");
        }
        if self.debug_socket() == self.cni_socket {
            return inv(
                "debugSocket",
                "must not be the CNI socket (the debug API has a socket of its own)",
            );
        }
        if !self.state_dir.is_absolute() {
            return inv("stateDir", "must be an absolute path");
        }
        if !self.bpf_pin_path.is_absolute() {
            return inv("bpfPinPath", "must be an absolute path");
        }
        if !self.ovs.ovsdb_socket.is_absolute() {
            return inv("ovs.ovsdbSocket", "must be an absolute path");
        }
        if !self.ovs.run_dir.is_absolute() {
            return inv("ovs.runDir", "must be an absolute path");
        }
        if self.ovs.bridge.is_empty() || self.ovs.bridge.len() > 15 {
            return inv("ovs.bridge", "must be 1 to 15 characters");
        }
        match &self.source {
            SourceConfig::Files { path } if !path.is_absolute() => {
                return inv("source.files.path", "must be an absolute path");
            }
            SourceConfig::Kubernetes {
                kubeconfig: Some(p),
            } if !p.is_absolute() => {
                return inv("source.kubernetes.kubeconfig", "must be an absolute path");
            }
            _ => {}
        }
        if let Err(source) = self.node_port_local.range() {
            return Err(ConfigError::PortRange {
                field: "nodePortLocal.portRange",
                source,
            });
        }
        Ok(())
    }

    /// The debug API's socket: `debugSocket`, else `debug.sock` next to the CNI socket.
    pub fn debug_socket(&self) -> PathBuf {
        self.debug_socket.clone().unwrap_or_else(|| {
            self.cni_socket
                .parent()
                .unwrap_or(Path::new("/"))
                .join("debug.sock")
        })
    }

    /// The node name (set after [`Config::parse`]).
    pub fn node_name(&self) -> &str {
        self.node_name.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.yaml"))
    }

    #[test]
    fn defaults_fill_an_empty_document() {
        let c = parse("nodeName: n1\n").unwrap();
        assert_eq!(c.dataplane, DataplaneKind::Ebpf);
        assert_eq!(c.cni_socket, PathBuf::from("/var/run/ferrea/cni.sock"));
        assert_eq!(c.mtu, None);
        assert_eq!(c.traffic_encap_mode, EncapMode::Encap);
        assert_eq!(c.tunnel_type, TunnelType::Vxlan);
        assert!(c.masquerade);
        assert_eq!(c.service_cidr.to_string(), "10.96.0.0/12");
        assert!(!c.node_port_local.enable);
        assert_eq!(c.node_port_local.port_range, "61000-62000");
        let c =
            parse("nodeName: n1\nnodePortLocal: {enable: true, portRange: 40000-40100}\n").unwrap();
        assert!(c.node_port_local.enable);
        assert_eq!(c.node_port_local.range().unwrap().len(), 101);
    }

    #[test]
    fn full_document_parses() {
        let c = parse(
            "nodeName: n1\ndataplane: ovs\nsource:\n  files:\n    path: /tmp/m\n\
             cniSocket: /tmp/s.sock\nclusterCIDRs: [10.244.0.0/16]\nmtu: 1450\n",
        )
        .unwrap();
        assert_eq!(c.dataplane, DataplaneKind::Ovs);
        assert_eq!(
            c.source,
            SourceConfig::Files {
                path: "/tmp/m".into()
            }
        );
        assert_eq!(c.cluster_cidrs.len(), 1);
        let c = parse(
            "nodeName: n1\ntrafficEncapMode: noEncap\ntunnelType: geneve\ntunnelPort: 7000\n\
             transportInterface: eth1\ntransportInterfaceCIDRs: [172.18.0.0/24]\n",
        )
        .unwrap();
        assert_eq!(c.traffic_encap_mode, EncapMode::NoEncap);
        assert_eq!(c.tunnel_type, TunnelType::Geneve);
        assert_eq!(c.tunnel_port, Some(7000));
        assert_eq!(c.transport_interface.as_deref(), Some("eth1"));
        assert_eq!(c.transport_interface_cidrs.len(), 1);
    }

    #[test]
    fn kubernetes_source_parses_and_is_validated() {
        let c =
            parse("nodeName: n1\nsource:\n  kubernetes:\n    kubeconfig: /etc/k.conf\n").unwrap();
        assert_eq!(
            c.source,
            SourceConfig::Kubernetes {
                kubeconfig: Some("/etc/k.conf".into())
            }
        );
        let c = parse("nodeName: n1\nsource: {kubernetes: {}}\n").unwrap();
        assert_eq!(c.source, SourceConfig::Kubernetes { kubeconfig: None });
        let e = parse("nodeName: n1\nsource: {kubernetes: {kubeconfig: k.conf}}\n").unwrap_err();
        assert_eq!(e.field(), Some("source.kubernetes.kubeconfig"));
        assert_eq!(
            e.to_string(),
            "config field `source.kubernetes.kubeconfig`: must be an absolute path"
        );
        let e = parse("nodeName: n1\nsource: {kubernetes: {kubeConfig: /k}}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kubeConfig"), "{e}");
        let e = parse("nodeName: n1\nsource: {files: {path: m}}\n").unwrap_err();
        assert_eq!(e.field(), Some("source.files.path"));
        assert_eq!(
            default_source_for(true),
            SourceConfig::Kubernetes { kubeconfig: None }
        );
        assert_eq!(
            default_source_for(false),
            SourceConfig::Files {
                path: "/etc/ferrea/manifests".into()
            }
        );
    }

    #[test]
    fn debug_socket_sits_next_to_the_cni_socket_and_is_never_it() {
        let c = parse("cniSocket: /run/x/cni.sock\n").unwrap();
        assert_eq!(c.debug_socket(), PathBuf::from("/run/x/debug.sock"));
        assert!(c.metrics.enable);
        assert_eq!(c.metrics.bind_address.port(), 10350);
        let e = parse("cniSocket: /run/x/cni.sock\ndebugSocket: /run/x/cni.sock\n").unwrap_err();
        assert_eq!(e.field(), Some("debugSocket"));
        let c = parse("metrics: {enable: false, bindAddress: \"127.0.0.1:9000\"}\n").unwrap();
        assert!(!c.metrics.enable);
        assert_eq!(c.metrics.bind_address.to_string(), "127.0.0.1:9000");
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let e = parse("nodeName: n1\nmtuu: 1400\n").unwrap_err().to_string();
        assert!(e.contains("mtuu"), "{e}");
    }

    #[test]
    fn typed_errors_name_the_field() {
        let e = parse("nodeName: n1\nnodePortLocal: {enable: true, portRange: 62000-61000}\n")
            .unwrap_err();
        assert_eq!(e.field(), Some("nodePortLocal.portRange"));
        assert!(
            matches!(
                &e,
                ConfigError::PortRange { source: PortRangeError::Reversed { value }, .. }
                    if value == "62000-61000"
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "config field `nodePortLocal.portRange`: \"62000-61000\": the first port is above the last"
        );
        let e = parse("nodeName: n1\nnodePortLocal: {portRange: 61000-70000}\n").unwrap_err();
        assert!(
            matches!(&e, ConfigError::PortRange { source: PortRangeError::Port { port, .. }, .. } if port == "70000"),
            "{e:?}"
        );
        assert!(matches!(
            "61000".parse::<PortRange>(),
            Err(PortRangeError::Form { .. })
        ));
        // An unknown field: the parser's error (kept as the source) names it and its line.
        let e = parse("nodeName: n1\nnodePortLocal: {enable: true}\nmtuu: 1400\n").unwrap_err();
        assert_eq!(e.field(), None);
        let ConfigError::Parse { path, source } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(path, Path::new("test.yaml"));
        assert_eq!(source.location().map(|l| l.line()), Some(3), "{source}");
        let m = e.to_string();
        assert!(
            m.starts_with("parsing config file test.yaml: ") && m.contains("unknown field `mtuu`"),
            "{m}"
        );
        let e = parse("nodeName: n1\nvethPrefix: toolong\n").unwrap_err();
        assert_eq!(e.field(), Some("vethPrefix"));
        assert_eq!(
            e.to_string(),
            "config field `vethPrefix`: must be 1 to 4 characters"
        );
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = parse("nodeName: n1\nmtu: 100\n").unwrap_err().to_string();
        assert!(e.contains("`mtu`"), "{e}");
        let e = parse("nodeName: n1\nclusterCIDRs: [10.0.0.0/33]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("clusterCIDRs") || e.contains("prefix"), "{e}");
        let e = parse("nodeName: n1\ncniSocket: rel.sock\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cniSocket"), "{e}");
        let e = parse("nodeName: n1\ntunnelType: gre\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gre"), "{e}");
        let e = parse("nodeName: n1\ntransportInterface: a-very-long-interface\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("transportInterface"), "{e}");
        let e = parse("nodeName: n1\nnodePortLocal: {enable: true, portRange: 62000-61000}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`nodePortLocal.portRange`"), "{e}");
        let e = parse("nodeName: n1\nnodePortLocal: {enabled: true}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("enabled"), "{e}");
        let e = parse("nodeName: n1\ndataplane: vpp\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vpp"), "{e}");
    }
}

/// Datapath of the bridge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathType {
    /// `system` if the openvswitch kernel module is loaded, else `netdev`.
    #[default]
    Auto,
    /// The kernel datapath.
    System,
    /// The userspace datapath.
    Netdev,
}

impl DatapathType {
    /// The OVSDB `datapath_type` value this resolves to on this machine.
    pub fn resolve(self) -> &'static str {
        match self {
            DatapathType::System => "system",
            DatapathType::Netdev => "netdev",
            DatapathType::Auto if Path::new("/sys/module/openvswitch").exists() => "system",
            DatapathType::Auto => "netdev",
        }
    }
}

/// Configuration of the OVS backend.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct OvsConfig {
    /// ovsdb-server's unix socket. Default `/var/run/openvswitch/db.sock`.
    pub ovsdb_socket: PathBuf,
    /// ovs-vswitchd's run directory, where `<bridge>.mgmt` lives. Default
    /// `/var/run/openvswitch`.
    pub run_dir: PathBuf,
    /// The integration bridge. Default `br-int`.
    pub bridge: String,
    /// Datapath type. Default `auto`.
    pub datapath_type: DatapathType,
}

impl Default for OvsConfig {
    fn default() -> Self {
        Self {
            ovsdb_socket: PathBuf::from("/var/run/openvswitch/db.sock"),
            run_dir: PathBuf::from("/var/run/openvswitch"),
            bridge: "br-int".into(),
            datapath_type: DatapathType::Auto,
        }
    }
}

/// The default NodePortLocal port range (Antrea's on Linux).
pub const DEFAULT_PORT_RANGE: &str = "61000-62000";

/// `metrics` in the agent configuration: the HTTP endpoint serving `/metrics` (Prometheus'
/// text format), `/livez` and `/readyz` (the DaemonSet's probes).
///
/// On by default: the probes need it, and a scrape costs nothing between scrapes. The port,
/// 10350, is the one Antrea's agent serves its API and metrics on (10350 is its memberlist
/// port, which Egress failover will use), and clear of NodePortLocal's default range. With `hostNetwork` the endpoint listens on the node's addresses; bind it to
/// `127.0.0.1:10350` where only local scrapers and the kubelet's probes should reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsConfig {
    /// Whether the endpoint runs. Default `true`.
    #[serde(default = "default_true")]
    pub enable: bool,
    /// Address and port to listen on. Default `0.0.0.0:10350`.
    #[serde(default = "default_metrics_address")]
    pub bind_address: std::net::SocketAddr,
}

fn default_metrics_address() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 10350))
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enable: true,
            bind_address: default_metrics_address(),
        }
    }
}

/// `nodePortLocal` in the agent configuration (Antrea's spelling).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NplConfig {
    /// Whether NPL runs. Default `false`, as in Antrea.
    #[serde(default)]
    pub enable: bool,
    /// `<first>-<last>`, inclusive. Default `61000-62000`.
    #[serde(default = "default_port_range")]
    pub port_range: String,
}

fn default_port_range() -> String {
    DEFAULT_PORT_RANGE.into()
}

impl Default for NplConfig {
    fn default() -> Self {
        Self {
            enable: false,
            port_range: default_port_range(),
        }
    }
}

impl NplConfig {
    /// The parsed port range (validated at config load).
    pub fn range(&self) -> Result<PortRange, PortRangeError> {
        self.port_range.parse()
    }
}

/// An inclusive range of node ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Whether `p` is in the range.
    pub fn contains(&self, p: u16) -> bool {
        (self.first..=self.last).contains(&p)
    }

    /// Number of ports.
    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// Never true (a range has at least one port); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Why a string is not a [`PortRange`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// No `-` between two ports.
    #[error("{value:?} is not of the form <first>-<last>, e.g. 61000-62000")]
    Form {
        /// The string.
        value: String,
    },
    /// One end is not a port number.
    #[error("{port:?} in {value:?} is not a port (1-65535)")]
    Port {
        /// The string.
        value: String,
        /// The end that is not a port.
        port: String,
    },
    /// The first port is above the last.
    #[error("{value:?}: the first port is above the last")]
    Reversed {
        /// The string.
        value: String,
    },
}

impl std::str::FromStr for PortRange {
    type Err = PortRangeError;
    fn from_str(s: &str) -> Result<Self, PortRangeError> {
        let (a, b) = s.split_once('-').ok_or_else(|| PortRangeError::Form {
            value: s.to_owned(),
        })?;
        let parse = |x: &str| {
            x.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| PortRangeError::Port {
                    value: s.to_owned(),
                    port: x.to_owned(),
                })
        };
        let (first, last) = (parse(a)?, parse(b)?);
        if first > last {
            return Err(PortRangeError::Reversed {
                value: s.to_owned(),
            });
        }
        Ok(PortRange { first, last })
    }
}
