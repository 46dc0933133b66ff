//! The dataplane abstraction: what the pod manager (CNI ADD, DEL, CHECK and reconciliation)
//! and the controllers (remote nodes, Egress) ask of the packet path, independent of whether
//! eBPF programs or an Open vSwitch pipeline carry the packets. NodePortLocal needs nothing of
//! it: its rules live in ferrea's nftables table, which the agent core owns.
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
pub mod trace;

pub use trace::{PacketTrace, TracePacket, TraceProto, TraceStep, TraceVerdict};

pub use crate::net::{
    EGRESS_MARK_MASK, EgressId, GATEWAY_IFNAME, TUNNEL_IFNAME, TUNNEL_VNI, Transport, Tunnel,
    egress_mark, egress_marker_mac,
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
    /// The Egress id (1..=65535): the VNI on the wire and the fwmark bits on the egress node.
    pub id: EgressId,
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
    pub held: Vec<EgressId>,
}

impl EgressPlan {
    /// Checks an Egress plan and puts it in a canonical form (sorted, deduplicated), so equal
    /// plans compare equal. Refuses id 0 (the cluster's own VNI), a pod steered to two places,
    /// a pod steered to this node itself, and steered pods without a tunnel (`noEncap`). Held
    /// ids without a tunnel are accepted: nothing arrives tunnelled, so they need no flows.
    pub fn normalised(&self, encap: bool, own_ip: Ipv4Addr) -> Result<EgressPlan, EgressPlanError> {
        if !encap && !self.steer.is_empty() {
            return Err(EgressPlanError::NoTunnel {
                steered: self.steer.len(),
            });
        }
        let mut steer = self.steer.clone();
        steer.sort();
        steer.dedup();
        for w in steer.windows(2) {
            if w[0].pod_ip == w[1].pod_ip {
                return Err(EgressPlanError::SteeredTwice {
                    first: w[0],
                    second: w[1],
                });
            }
        }
        if let Some(s) = steer.iter().find(|s| s.id == 0) {
            return Err(EgressPlanError::SteerIdZero { pod_ip: s.pod_ip });
        }
        if let Some(s) = steer.iter().find(|s| s.node_ip == own_ip) {
            return Err(EgressPlanError::SteeredToSelf {
                pod_ip: s.pod_ip,
                own_ip,
            });
        }
        let mut held = self.held.clone();
        held.sort_unstable();
        held.dedup();
        if held.first() == Some(&0) {
            return Err(EgressPlanError::HeldIdZero);
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
    /// Frames from the pod of a protocol the pod network does not carry (IPv6 and every
    /// ethertype other than IPv4 and ARP), dropped.
    pub drop_other: u64,
}

/// One table of what a backend holds, decoded for people (`ferreactl dump dataplane`): an
/// OpenFlow table with its flows' counters, a BPF map with named fields, the attachments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DumpSection {
    /// What the table is (`table 30 L3Forwarding`, `map FERREA_EP_IP`).
    pub name: String,
    /// The column names.
    pub columns: Vec<String>,
    /// The rows, one cell per column.
    pub rows: Vec<Vec<String>>,
}

impl DumpSection {
    /// An empty section with these columns.
    pub fn new(name: impl Into<String>, columns: &[&str]) -> Self {
        Self {
            name: name.into(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            rows: Vec::new(),
        }
    }
}

/// Why [`EgressPlan::normalised`] refused a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressPlanError {
    /// Steered pods, but no tunnel to carry them (`noEncap`).
    #[error(
        "{steered} pod(s) to steer to other nodes, but this node runs in noEncap mode and has no \
         tunnel to carry them"
    )]
    NoTunnel {
        /// How many pods the plan steers.
        steered: usize,
    },
    /// One pod steered to two places.
    #[error(
        "pod {} steered twice (Egress {} to {} and Egress {} to {})",
        first.pod_ip, first.id, first.node_ip, second.id, second.node_ip
    )]
    SteeredTwice {
        /// The first steering of the pod.
        first: EgressSteer,
        /// The second.
        second: EgressSteer,
    },
    /// A pod steered with id 0.
    #[error("pod {pod_ip}: Egress id 0 is the cluster's VNI, not an Egress")]
    SteerIdZero {
        /// The pod.
        pod_ip: Ipv4Addr,
    },
    /// A pod steered to this node itself.
    #[error(
        "pod {pod_ip} steered to this node's own address {own_ip}; a pod whose Egress IP this \
         node holds is marked by the node, not steered"
    )]
    SteeredToSelf {
        /// The pod.
        pod_ip: Ipv4Addr,
        /// This node's transport address.
        own_ip: Ipv4Addr,
    },
    /// Id 0 among the held ids.
    #[error("held Egress id 0 is the cluster's VNI")]
    HeldIdZero,
}

/// The typed cause of a [`DataplaneError`]: the error of the layer below (kernel, OVSDB,
/// OpenFlow, aya), kept as the error's source.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// A netlink request (links, addresses, routes, neighbours).
    #[error(transparent)]
    Netlink(#[from] rtnetlink::Error),
    /// A file system or socket operation.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A system call through `nix` (interface lookups).
    #[error(transparent)]
    Errno(#[from] nix::errno::Errno),
    /// A sysctl write.
    #[error(transparent)]
    Sysctl(#[from] crate::kernel::sysctl::SysctlError),
    /// Keeping the node routes to other nodes in sync.
    #[error(transparent)]
    Routes(#[from] crate::kernel::routes::RouteError),
    /// A TC attachment.
    #[error(transparent)]
    Tc(#[from] crate::kernel::tc::TcError),
    /// A transaction with ovsdb-server.
    #[error(transparent)]
    Ovsdb(#[from] ovs::ovsdb::OvsdbError),
    /// A request on the OpenFlow connection.
    #[error(transparent)]
    OpenFlow(#[from] ovs::openflow::ConnError),
    /// Moving the node's configuration to the physical bridge (OVS userspace datapath).
    #[error(transparent)]
    Uplink(#[from] ovs::uplink::UplinkError),
    /// A BPF map operation.
    #[error(transparent)]
    Map(#[from] aya::maps::MapError),
    /// A BPF program operation (load, open from a pin).
    #[error(transparent)]
    Program(#[from] aya::programs::ProgramError),
    /// Loading the BPF object.
    #[error(transparent)]
    Load(#[from] aya::EbpfError),
    /// Pinning a BPF object.
    #[error(transparent)]
    Pin(#[from] aya::pin::PinError),
    /// A command on `ovs-vswitchd`'s control socket (`ofproto/trace`, the userspace
    /// datapath's conntrack flush).
    #[error(transparent)]
    Unixctl(#[from] ovs::unixctl::UnixctlError),
    /// An `ofproto/trace` answer that could not be summarised.
    #[error(transparent)]
    TraceSummary(#[from] ovs::trace::SummaryError),
    /// The Egress plan was refused.
    #[error(transparent)]
    Egress(#[from] EgressPlanError),
    /// A condition the backend found unmet, with no error of a lower layer behind it (a port
    /// ferrea did not create in the way, a device that vanished, no port number assigned).
    #[error("{0}")]
    Unmet(String),
}

/// Errors of a dataplane backend. Each names the backend, the operation and the object it
/// was done to, and keeps the lower layer's error as its source (its text is also part of the
/// message, for callers that print only the outermost error).
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// A method that needs the node's packet path ran before [`Dataplane::init_node`].
    #[error("dataplane {backend}: {op}: init_node has not run")]
    NotInitialised {
        /// Which backend.
        backend: &'static str,
        /// The method called.
        op: &'static str,
    },
    /// The backend could not be initialised on this node.
    #[error("dataplane {backend}: initialisation failed: {op} {object}: {source}")]
    Init {
        /// Which backend.
        backend: &'static str,
        /// What was being done.
        op: &'static str,
        /// What it was done to (`bridge br-int`, `interface ferrea-gw0`, `map ...`).
        object: String,
        /// What went wrong (boxed: the lower layers' errors are large).
        #[source]
        source: Box<Cause>,
    },
    /// A per-pod operation failed.
    #[error("dataplane {backend}: {op} for pod interface {ifname} failed: {source}")]
    Pod {
        /// Which backend.
        backend: &'static str,
        /// What was being done.
        op: &'static str,
        /// The host-side interface.
        ifname: String,
        /// What went wrong (boxed: the lower layers' errors are large).
        #[source]
        source: Box<Cause>,
    },
    /// Any other backend failure.
    #[error("dataplane {backend}: {op} {object}: {source}")]
    Other {
        /// Which backend.
        backend: &'static str,
        /// What was being done.
        op: &'static str,
        /// What it was done to.
        object: String,
        /// What went wrong (boxed: the lower layers' errors are large).
        #[source]
        source: Box<Cause>,
    },
}

/// Builds a backend's errors, so that both backends describe a failure the same way: the
/// backend, the operation, the object, and the lower-layer cause as the source.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ErrorsOf(pub(crate) &'static str);

impl ErrorsOf {
    /// An initialisation step `op` on `object` failed.
    pub(crate) fn init<E: Into<Cause>>(
        self,
        op: &'static str,
        object: impl std::fmt::Display,
    ) -> impl FnOnce(E) -> DataplaneError {
        let object = object.to_string();
        move |e| DataplaneError::Init {
            backend: self.0,
            op,
            object,
            source: Box::new(e.into()),
        }
    }

    /// A per-pod step `op` on the pod interface `ifname` failed.
    pub(crate) fn pod<E: Into<Cause>>(
        self,
        op: &'static str,
        ifname: &str,
    ) -> impl FnOnce(E) -> DataplaneError {
        let ifname = ifname.to_owned();
        move |e| DataplaneError::Pod {
            backend: self.0,
            op,
            ifname,
            source: Box::new(e.into()),
        }
    }

    /// Any other step `op` on `object` failed.
    pub(crate) fn other<E: Into<Cause>>(
        self,
        op: &'static str,
        object: impl std::fmt::Display,
    ) -> impl FnOnce(E) -> DataplaneError {
        let object = object.to_string();
        move |e| DataplaneError::Other {
            backend: self.0,
            op,
            object,
            source: Box::new(e.into()),
        }
    }

    /// `op` was called before `init_node`.
    pub(crate) fn not_init(self, op: &'static str) -> DataplaneError {
        DataplaneError::NotInitialised {
            backend: self.0,
            op,
        }
    }
}

/// A condition found unmet, with no lower-layer error behind it.
pub(crate) fn unmet(msg: impl Into<String>) -> Cause {
    Cause::Unmet(msg.into())
}

/// The packet path of a node. Implementations: [`ebpf::EbpfDataplane`] and [`ovs::OvsDataplane`].
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

    /// Makes the packet path load-balance the pods' traffic to Service virtual addresses as
    /// `plan` says (`serviceProxy: ferrea`), replacing what an earlier call (or an earlier
    /// agent process) installed; an empty plan removes it all. Idempotent. A connection keeps
    /// the backend it was given while that backend stays in the plan.
    ///
    /// What a backend does not load-balance itself reaches the node's stack, where ferrea's
    /// nftables table translates it (the pods' packets to addresses that are not pods always
    /// go there). Default: nothing here, so every Service packet takes that path.
    async fn set_services(&self, plan: &crate::proxy::ServicePlan) -> Result<(), DataplaneError> {
        let _ = plan;
        Ok(())
    }

    /// Counters of one pod, if the backend keeps them.
    async fn pod_stats(&self, ep: &PodEndpoint) -> Result<Option<PodStats>, DataplaneError>;

    /// Where a pod is on the packet path, in a few words (OVS: its port and OpenFlow port
    /// number; eBPF: the programs on its host veth). Read-only; `None` if the backend does
    /// not know the pod.
    fn describe_pod(&self, ep: &PodEndpoint) -> Option<String>;

    /// What the packet path holds, for the debug API: OVS, the flows of each table with
    /// their counters (through the backend's own OpenFlow connection); eBPF, every map
    /// decoded into named fields and where the programs are attached. `pod`: only that
    /// pod's entries. Read-only, a snapshot; safe to call concurrently with everything else.
    async fn dump(&self, pod: Option<&PodEndpoint>) -> Result<Vec<DumpSection>, DataplaneError>;

    /// Where `packet`, sent by the local pod `packet.src`, would go on this node and why,
    /// decided by the packet path itself (see [`trace`]): eBPF, the attached programs run on
    /// the packet with `BPF_PROG_TEST_RUN`; OVS, `ofproto/trace` of its flow in
    /// `ovs-vswitchd`. Nothing is sent and no state changes, except that the eBPF programs
    /// count the packet in the pod's counters as they count every packet they see. Safe to
    /// call concurrently with everything else (traces run one at a time). The pod must be
    /// known to the backend.
    async fn trace(&self, packet: &TracePacket) -> Result<PacketTrace, DataplaneError>;
}

#[cfg(test)]
mod egress_tests {
    use super::*;

    fn steer(pod: &str, node: &str, id: EgressId) -> EgressSteer {
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
        assert_eq!(
            err(one.clone(), false),
            EgressPlanError::NoTunnel { steered: 1 }
        );
        assert!(err(one.clone(), false).to_string().contains("noEncap"));
        // Without a tunnel, held ids and exemptions alone are fine.
        let held = EgressPlan {
            held: vec![3],
            exempt: vec!["10.96.0.0/12".parse().unwrap()],
            ..Default::default()
        };
        assert!(held.normalised(false, OWN).is_ok());
        let mut twice = one.clone();
        twice.steer.push(steer("10.244.1.5", "172.18.0.13", 4));
        assert!(matches!(
            err(twice, true),
            EgressPlanError::SteeredTwice { .. }
        ));
        assert!(
            err(
                EgressPlan {
                    steer: vec![steer("10.244.1.5", "172.18.0.12", 0)],
                    ..Default::default()
                },
                true
            )
            .to_string()
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
            .to_string()
            .contains("own address")
        );
        assert_eq!(
            err(
                EgressPlan {
                    held: vec![0, 5],
                    ..Default::default()
                },
                true
            ),
            EgressPlanError::HeldIdZero
        );
    }
}
