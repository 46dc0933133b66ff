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

pub use crate::net::{
    EGRESS_MARK_MASK, GATEWAY_IFNAME, TUNNEL_IFNAME, TUNNEL_VNI, Transport, Tunnel,
    egress_marker_mac,
};

/// Node-wide facts a backend needs to build its packet path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNetwork {
    /// This node's pod CIDR.
    pub pod_cidr: Ipv4Network,
    /// The pods' default gateway: the first address of `pod_cidr`.
    pub gateway: Ipv4Addr,
    /// MTU of pod interfaces.
    pub mtu: u32,
    /// The interface and address that carry traffic between nodes.
    pub transport: Transport,
    /// The tunnel to other nodes; `None` in `noEncap` mode (routed).
    pub tunnel: Option<Tunnel>,
}

impl NodeNetwork {
    /// A node with no other nodes to reach (no tunnel; the loopback stands in for the
    /// transport): for backend tests that exercise one node.
    pub fn standalone(pod_cidr: Ipv4Network, mtu: u32) -> Self {
        NodeNetwork {
            pod_cidr,
            gateway: crate::net::gateway_of(pod_cidr),
            mtu,
            transport: Transport {
                ifname: "lo".into(),
                ifindex: 1,
                ip: Ipv4Addr::LOCALHOST,
                prefix_len: 8,
                mtu: 65536,
            },
            tunnel: None,
        }
    }
}

/// Another node of the cluster, as the packet path needs it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteNode {
    /// `metadata.name`.
    pub name: String,
    /// Its transport address (`InternalIP`): the tunnel's outer destination, or the next hop
    /// in `noEncap` mode.
    pub node_ip: Ipv4Addr,
    /// Its pod CIDR.
    pub pod_cidr: Ipv4Network,
}

impl RemoteNode {
    /// The remote node's pod gateway (first address of its pod CIDR).
    pub fn gateway(&self) -> Ipv4Addr {
        crate::net::gateway_of(self.pod_cidr)
    }
}

/// A local pod whose Egress IP another node holds: its packets to destinations outside the
/// cluster go through the tunnel to that node with the Egress id as the tunnel key (VNI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EgressSteer {
    /// The pod's address.
    pub pod_ip: Ipv4Addr,
    /// The transport address of the node holding the egress IP (the tunnel destination).
    pub node_ip: Ipv4Addr,
    /// The Egress id (1..=255): the VNI on the wire and the fwmark on the egress node.
    pub id: u8,
}

/// What the packet path does for Egress on this node. The node-side half (egress IPs,
/// sub-interfaces, policy routing, SNAT and the marking of local pods' packets in the node's
/// prerouting hook) belongs to the agent core ([`crate::controllers::egress`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPlan {
    /// Local pods steered to other nodes (sorted by pod IP).
    pub steer: Vec<EgressSteer>,
    /// Destinations that are never egress traffic, so never steered: the cluster pod CIDRs,
    /// the service CIDR and every node's address.
    pub exempt: Vec<Ipv4Network>,
    /// Egress ids whose IP this node holds (sorted). A tunnelled packet whose VNI is one of
    /// them goes to the node's stack with the fwmark `id` (eBPF: `skb->mark`; OVS: the marker
    /// source MAC [`egress_marker_mac`]); a tunnelled packet with any other non-zero VNI is
    /// dropped, so a stale assignment never lets a pod address leave un-NATed.
    pub held: Vec<u8>,
}

impl EgressPlan {
    /// Checks an Egress plan and puts it in a canonical form (sorted, deduplicated), so equal
    /// plans compare equal. Refuses id 0 (the cluster's own VNI), a pod steered to two places,
    /// a pod steered to this node itself, and steered pods without a tunnel (`noEncap`). Held
    /// ids without a tunnel are accepted: nothing arrives tunnelled, so they need no flows.
    pub fn normalised(&self, encap: bool, own_ip: Ipv4Addr) -> Result<EgressPlan, String> {
        if !encap && !self.steer.is_empty() {
            return Err(format!(
                "{} pod(s) to steer to other nodes, but this node runs in noEncap mode and has no \
                 tunnel to carry them",
                self.steer.len()
            ));
        }
        let mut steer = self.steer.clone();
        steer.sort();
        steer.dedup();
        for w in steer.windows(2) {
            if w[0].pod_ip == w[1].pod_ip {
                return Err(format!(
                    "pod {} steered twice (Egress {} to {} and Egress {} to {})",
                    w[0].pod_ip, w[0].id, w[0].node_ip, w[1].id, w[1].node_ip
                ));
            }
        }
        if let Some(s) = steer.iter().find(|s| s.id == 0) {
            return Err(format!(
                "pod {}: Egress id 0 is the cluster's VNI, not an Egress",
                s.pod_ip
            ));
        }
        if let Some(s) = steer.iter().find(|s| s.node_ip == own_ip) {
            return Err(format!(
                "pod {} steered to this node's own address {own_ip}; a pod whose Egress IP this \
                 node holds is marked by the node, not steered",
                s.pod_ip
            ));
        }
        let mut held = self.held.clone();
        held.sort_unstable();
        held.dedup();
        if held.first() == Some(&0) {
            return Err("held Egress id 0 is the cluster's VNI".into());
        }
        let mut exempt: Vec<Ipv4Network> = self
            .exempt
            .iter()
            .map(|n| Ipv4Network::new(n.network(), n.prefix()).expect("valid prefix"))
            .collect();
        exempt.sort();
        exempt.dedup();
        Ok(EgressPlan {
            steer,
            exempt,
            held,
        })
    }
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

    /// Makes the packet path reach exactly these other nodes' pods (tunnel, routes, map
    /// entries or flows), removing what it had for nodes no longer listed. Called after
    /// [`Self::init_node`] with the full list, then with every change of it. Idempotent;
    /// adopts what a previous agent process left.
    async fn set_remote_nodes(&self, nodes: &[RemoteNode]) -> Result<(), DataplaneError>;

    /// Whether pods may leave TX checksums to their interface (checksum offload on, the
    /// kernel default). A backend whose packet path cannot complete them says no, and the
    /// agent core turns the offload off while it configures the pod's side (OVS userspace
    /// datapath with tunnels). Default: yes.
    fn pod_tx_checksum_offload(&self) -> bool {
        true
    }

    /// Runs at agent start before the core discovers the transport interface: puts back node
    /// configuration the backend moved earlier and a reboot lost (OVS userspace datapath: the
    /// node's address on the physical bridge's port, recreated bare). Default: nothing.
    async fn restore_transport(&self) -> Result<(), DataplaneError> {
        Ok(())
    }

    /// Periodic upkeep, called by the agent about once a second: checks the backend's
    /// connections and repairs what drifted outside the agent (for OVS: a restarted
    /// ovs-vswitchd gets its gateway address and flows back). Must be cheap when nothing
    /// drifted. Default: nothing to do.
    async fn maintain(&self) -> Result<(), DataplaneError> {
        Ok(())
    }

    /// Makes the packet path carry Egress as `plan` says, replacing what an earlier call (or
    /// an earlier agent process) installed. Idempotent. In `noEncap` mode there is no tunnel:
    /// the agent core never passes steered pods there, and a backend rejects them.
    async fn set_egress(&self, plan: &EgressPlan) -> Result<(), DataplaneError>;

    /// Counters of one pod, if the backend keeps them.
    async fn pod_stats(&self, ep: &PodEndpoint) -> Result<Option<PodStats>, DataplaneError>;
}

#[cfg(test)]
mod egress_tests {
    use super::*;

    fn steer(pod: &str, node: &str, id: u8) -> EgressSteer {
        EgressSteer {
            pod_ip: pod.parse().unwrap(),
            node_ip: node.parse().unwrap(),
            id,
        }
    }

    const OWN: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);

    #[test]
    fn plans_are_canonical() {
        let a = EgressPlan {
            steer: vec![
                steer("10.244.1.6", "172.18.0.12", 3),
                steer("10.244.1.5", "172.18.0.12", 3),
                steer("10.244.1.6", "172.18.0.12", 3),
            ],
            exempt: vec![
                "10.96.0.0/12".parse().unwrap(),
                "10.244.7.9/16".parse().unwrap(),
            ],
            held: vec![4, 2, 4],
        };
        let n = a.normalised(true, OWN).unwrap();
        assert_eq!(
            n.steer,
            vec![
                steer("10.244.1.5", "172.18.0.12", 3),
                steer("10.244.1.6", "172.18.0.12", 3)
            ]
        );
        assert_eq!(
            n.exempt,
            vec![
                "10.96.0.0/12".parse().unwrap(),
                "10.244.0.0/16".parse().unwrap()
            ]
        );
        assert_eq!(n.held, vec![2, 4]);
        assert_eq!(n.normalised(true, OWN).unwrap(), n);
    }

    #[test]
    fn bad_plans_are_refused() {
        let err = |p: EgressPlan, encap: bool| p.normalised(encap, OWN).unwrap_err();
        let one = EgressPlan {
            steer: vec![steer("10.244.1.5", "172.18.0.12", 3)],
            ..Default::default()
        };
        assert!(err(one.clone(), false).contains("noEncap"));
        // Without a tunnel, held ids and exemptions alone are fine.
        let held = EgressPlan {
            held: vec![3],
            exempt: vec!["10.96.0.0/12".parse().unwrap()],
            ..Default::default()
        };
        assert!(held.normalised(false, OWN).is_ok());
        let mut twice = one.clone();
        twice.steer.push(steer("10.244.1.5", "172.18.0.13", 4));
        assert!(err(twice, true).contains("steered twice"));
        assert!(
            err(
                EgressPlan {
                    steer: vec![steer("10.244.1.5", "172.18.0.12", 0)],
                    ..Default::default()
                },
                true
            )
            .contains("id 0")
        );
        assert!(
            err(
                EgressPlan {
                    steer: vec![steer("10.244.1.5", "172.18.0.11", 3)],
                    ..Default::default()
                },
                true
            )
            .contains("own address")
        );
        assert!(
            err(
                EgressPlan {
                    held: vec![0, 5],
                    ..Default::default()
                },
                true
            )
            .contains("id 0")
        );
    }
}
