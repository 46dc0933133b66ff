//! The dataplane abstraction: what the controllers (CNI server, and later egress, NodePortLocal
//! and policy) ask of the packet path, independent of whether eBPF programs or an Open vSwitch
//! pipeline carry the packets.
//!
//! The agent core owns everything both backends share: IPAM, the pod's veth pair and its
//! addresses inside the pod, masquerade in ferrea's nftables table, node sysctls. A backend owns
//! only what is specific to its packet path (programs and maps, or bridge ports and flows,
//! plus the node-side routes and gateway device its path needs).

use std::net::Ipv4Addr;

use async_trait::async_trait;
use ipnetwork::Ipv4Network;

pub mod ebpf;
pub mod ovs;

/// Node-wide facts a backend needs to build its packet path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNetwork {
    /// This node's pod CIDR.
    pub pod_cidr: Ipv4Network,
    /// The pods' default gateway: the first address of `pod_cidr`.
    pub gateway: Ipv4Addr,
    /// MTU of pod interfaces.
    pub mtu: u32,
}

/// One local pod's endpoint as the agent core created it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEndpoint {
    /// The runtime's container ID (CNI_CONTAINERID).
    pub container_id: String,
    /// Name of the host-side veth in the node's namespace.
    pub host_ifname: String,
    /// Index of the host-side veth in the node's namespace.
    pub host_ifindex: u32,
    /// MAC of the host-side veth (the pod's gateway MAC).
    pub host_mac: [u8; 6],
    /// MAC of the pod's interface.
    pub pod_mac: [u8; 6],
    /// The pod's IPv4 address.
    pub ip: Ipv4Addr,
}

/// Per-pod counters as the backend reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    /// Packets from the pod accepted.
    pub tx_packets: u64,
    /// Bytes from the pod accepted.
    pub tx_bytes: u64,
    /// Packets delivered to the pod.
    pub rx_packets: u64,
    /// Bytes delivered to the pod.
    pub rx_bytes: u64,
    /// Packets from the pod dropped by the spoof guard.
    pub drop_spoofed: u64,
}

/// Errors of a dataplane backend.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The backend could not be initialised on this node.
    #[error("dataplane {backend}: initialisation failed: {msg}")]
    Init {
        /// Which backend.
        backend: &'static str,
        /// What went wrong.
        msg: String,
    },
    /// A per-pod operation failed.
    #[error("dataplane {backend}: {op} for pod interface {ifname} failed: {msg}")]
    Pod {
        /// Which backend.
        backend: &'static str,
        /// What was being done.
        op: &'static str,
        /// The host-side interface.
        ifname: String,
        /// What went wrong.
        msg: String,
    },
    /// Any other backend failure.
    #[error("dataplane {backend}: {op}: {msg}")]
    Other {
        /// Which backend.
        backend: &'static str,
        /// What was being done.
        op: &'static str,
        /// What went wrong.
        msg: String,
    },
}

/// The packet path of a node. Implementations: [`ebpf::EbpfDataplane`] (and the OVS backend).
///
/// Contract for every method: idempotent (calling it twice with the same input leaves the same
/// state as calling it once), safe to call concurrently for different pods, and it never touches
/// interfaces, routes, maps or flows that ferrea did not create.
#[async_trait]
pub trait Dataplane: Send + Sync {
    /// Short name of the backend (`ebpf`, `ovs`), for logs and status.
    fn name(&self) -> &'static str;

    /// Builds or adopts the node-wide packet path (programs and maps, gateway device and the
    /// routes it needs). State left by a previous agent process is adopted, not rebuilt, so
    /// running pods keep their traffic across an agent restart.
    async fn init_node(&self, node: &NodeNetwork) -> Result<(), DataplaneError>;

    /// The first step of an ADD, run before the agent core creates the pod's interfaces
    /// (`ep.host_ifindex` is 0: the veth does not exist yet). A backend installs here what
    /// does not need the interface (OVS: the pod's flows, while ovs-vswitchd is not yet busy
    /// with the new link). [`Self::add_pod`] follows on success; [`Self::del_pod`] undoes a
    /// preparation whose ADD failed. Default: nothing.
    async fn prepare_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        let _ = ep;
        Ok(())
    }

    /// Connects a pod whose veth pair the agent core has created and configured. Re-adding
    /// an endpoint that is already connected replaces its entry.
    async fn add_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError>;

    /// Disconnects a pod. A pod the dataplane does not know is not an error. The host-side
    /// interface may already be gone.
    async fn del_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError>;

    /// Reconciliation after a restart: removes every pod entry (map entries, routes, ports,
    /// flows) whose IP is not in `keep`, and returns the IPs removed.
    async fn retain_pods(
        &self,
        keep: &std::collections::HashSet<Ipv4Addr>,
    ) -> Result<Vec<Ipv4Addr>, DataplaneError>;

    /// Periodic upkeep, called by the agent about once a second: checks the backend's
    /// connections and repairs what drifted outside the agent (for OVS: a restarted
    /// ovs-vswitchd gets its gateway address and flows back). Must be cheap when nothing
    /// drifted. Default: nothing to do.
    async fn maintain(&self) -> Result<(), DataplaneError> {
        Ok(())
    }

    /// Counters of one pod, if the backend keeps them.
    async fn pod_stats(&self, ep: &PodEndpoint) -> Result<Option<PodStats>, DataplaneError>;
}
