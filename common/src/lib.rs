//! Map keys and values shared by the kernel-side programs (`ebpf/`) and the agent.
//!
//! Everything here is `#[repr(C)]`, fixed-size and free of padding surprises, because the
//! same bytes are read by the BPF verifier-checked programs and by userspace through the
//! map file descriptors. IPv4 addresses are stored in network byte order (as they appear
//! in the packet), so the programs never byte-swap on the fast path.
#![no_std]
#![cfg_attr(feature = "user", allow(unsafe_code))]

/// Maximum number of local pods the maps hold on one node.
pub const MAX_PODS: u32 = 4096;

/// Name of the map of local endpoints keyed by the host-side veth ifindex.
pub const MAP_ENDPOINTS_BY_IFINDEX: &str = "FERREA_EP_IF";
/// Name of the map of local endpoints keyed by the pod's IPv4 address.
pub const MAP_ENDPOINTS_BY_IP: &str = "FERREA_EP_IP";
/// Name of the per-CPU map of per-pod counters keyed by the host-side veth ifindex. (Builds
/// before [`Counters::drop_other`] named it `FERREA_COUNTERS`, with a shorter value: the map
/// was renamed with the layout, so an upgraded node makes a new one and removes the old pin,
/// see [`OBSOLETE_MAP_PINS`]; the pods' counters start again from zero then.)
pub const MAP_COUNTERS: &str = "FERREA_POD_CNT";

/// Name of the LPM map of other nodes' pod CIDRs (key: prefix length + IPv4 network, network
/// byte order) to the node that holds them.
pub const MAP_REMOTE_NODES: &str = "FERREA_REMOTE";
/// Maximum number of other nodes.
pub const MAX_NODES: u32 = 1024;

/// Name of the program attached to TC ingress of each pod's host-side veth (traffic from the pod).
pub const PROG_FROM_POD: &str = "ferrea_from_pod";
/// Name of the program attached to TC egress of each pod's host-side veth (traffic to the pod
/// that went through the node's stack).
pub const PROG_TO_POD: &str = "ferrea_to_pod";

/// A pod's network endpoint on this node, as the programs need it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Index of the pod's host-side veth in the node's network namespace.
    pub ifindex: u32,
    /// The pod's IPv4 address, network byte order.
    pub ipv4: u32,
    /// MAC address of the pod's interface (inside the pod).
    pub pod_mac: [u8; 6],
    /// MAC address of the host-side veth: the pod's gateway MAC.
    pub host_mac: [u8; 6],
}

/// Name of the program attached to TC egress of the tunnel device: sets the tunnel's outer
/// destination per packet from [`MAP_REMOTE_NODES`].
pub const PROG_TO_TUNNEL: &str = "ferrea_to_tunnel";
/// Name of the program attached to TC ingress of the tunnel device: delivers decapsulated
/// packets straight into local pods.
pub const PROG_FROM_TUNNEL: &str = "ferrea_from_tunnel";

/// The node that holds a remote pod CIDR.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteNode {
    /// The node's transport address (the tunnel's outer destination), network byte order.
    pub node_ip: u32,
    /// The tunnel's VNI.
    pub vni: u32,
    /// Index of the tunnel device, for pods' packets to go straight to it; 0 in `noEncap`
    /// mode (the node's stack routes them).
    pub tun_ifindex: u32,
}

/// Name of the hash map of local pods steered to another node for Egress (key: the pod's IPv4
/// address, network byte order; value: [`EgressSteer`]).
pub const MAP_EGRESS_STEER: &str = "FERREA_EG_STEER";
/// Name of the LPM map of destinations that are never egress traffic (key: prefix length +
/// IPv4 network, network byte order; value: unused `u32`).
pub const MAP_EGRESS_EXEMPT: &str = "FERREA_EG_EXEMPT";
/// Name of the hash map of the Egress ids whose IP this node holds (key: the id, 1..=65535;
/// value: non-zero). Tunnelled packets with that VNI get the id in their fwmark.
pub const MAP_EGRESS_HELD: &str = "FERREA_EG_IDS";
/// Pins older builds made that this one no longer declares (`FERREA_EG_HELD` was an array of
/// 256 ids; `FERREA_COUNTERS` held [`Counters`] without `drop_other`): removed when the
/// programs load, so nothing of an upgraded node is left behind.
pub const OBSOLETE_MAP_PINS: &[&str] = &["FERREA_EG_HELD", "FERREA_COUNTERS"];
/// Maximum number of exempt destination prefixes.
pub const MAX_EGRESS_EXEMPT: u32 = MAX_NODES + 256;
/// Largest Egress id: ids are 16 bits (id 0 means "no Egress"), one per egress IP in the
/// cluster.
pub const EGRESS_ID_MAX: u32 = 0xffff;
/// Egress IPs one node can hold at once (Antrea allows 255 per node).
pub const MAX_EGRESS_HELD: u32 = 4096;
/// Where an Egress id sits in `skb->mark`: the upper 16 bits, clear of the bits kube-proxy
/// (0x4000, 0x8000) and ferrea's service masquerade mark use.
pub const EGRESS_MARK_SHIFT: u32 = 16;
/// The fwmark bits that carry an Egress id.
pub const EGRESS_MARK_MASK: u32 = EGRESS_ID_MAX << EGRESS_MARK_SHIFT;

/// Where a steered pod's packets go: the node holding its Egress IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressSteer {
    /// Transport address of the egress node (the tunnel's outer destination), network byte
    /// order.
    pub node_ip: u32,
    /// The Egress id (1..=[`EGRESS_ID_MAX`]): the VNI on the wire.
    pub id: u32,
    /// Index of the tunnel device the pod's packets are redirected to.
    pub tun_ifindex: u32,
}

/// Name of the VLAN tagger's program on TC ingress of a parent (transport) interface.
pub const PROG_VLAN_RX: &str = "ferrea_vlan_rx";
/// Name of the VLAN tagger's program on TC egress of a child (macvlan) interface.
pub const PROG_VLAN_TX: &str = "ferrea_vlan_tx";
/// Name of the VLAN tagger's hash map (parent ifindex, VLAN id) to the child ([`VlanChild`]).
pub const MAP_VLAN_BY_PARENT: &str = "FERREA_VLAN_PAR";
/// Name of the VLAN tagger's hash map child ifindex to its VLAN id (`u32`).
pub const MAP_VLAN_BY_CHILD: &str = "FERREA_VLAN_CHD";
/// Maximum number of VLAN children (sub-interfaces) on one node.
pub const MAX_VLANS: u32 = 1024;

/// Value of [`MAP_VLAN_BY_PARENT`]: the child's index and MAC. A unicast frame for the child's
/// MAC is untagged and left to the parent's macvlan demultiplexing (no second receive pass);
/// other frames of the VLAN are redirected into the child.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VlanChild {
    /// Index of the child interface.
    pub ifindex: u32,
    /// First four bytes of the child's MAC, in wire order (read as a native `u32`).
    pub mac_hi: u32,
    /// Last two bytes of the child's MAC, in wire order (read as a native `u16`), then zero.
    pub mac_lo: u32,
}

/// Key of [`MAP_VLAN_BY_PARENT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VlanKey {
    /// Index of the parent interface.
    pub parent_ifindex: u32,
    /// The VLAN id (0..4095) in the low 12 bits.
    pub vid: u32,
}

/// Per-pod packet counters, per CPU; userspace sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets sent by the pod that the dataplane accepted.
    pub tx_packets: u64,
    /// Bytes sent by the pod that the dataplane accepted.
    pub tx_bytes: u64,
    /// Packets delivered to the pod.
    pub rx_packets: u64,
    /// Bytes delivered to the pod.
    pub rx_bytes: u64,
    /// Packets from the pod dropped because their source IP or MAC was not the pod's.
    pub drop_spoofed: u64,
    /// ARP requests from the pod answered by the dataplane.
    pub arp_replies: u64,
    /// Frames from the pod of a protocol the pod network does not carry (IPv6 and every
    /// ethertype other than IPv4 and ARP), dropped.
    pub drop_other: u64,
}

/// Name of the LRU hash map of connections the node's stack carried (key: [`StackFlow`],
/// value: unused `u32`). The programs record, for every packet the node's *stack* delivers to
/// a local pod (TC egress of its host veth, which `bpf_redirect_peer` skips) or sends into the
/// tunnel towards another node's pod, the reversed 5-tuple of the packet: the tuple its replies
/// will carry. A packet about to take a fast path (redirect to a local pod or into the tunnel)
/// whose own tuple is in the map is a reply of such a connection and goes to the stack instead,
/// so that the stack's conntrack can undo the NAT it applied (kube-proxy's DNAT of a Service).
pub const MAP_STACK_FLOWS: &str = "FERREA_STACK_CT";
/// Capacity of [`MAP_STACK_FLOWS`]: 65,536 connections (about 5 MiB of kernel memory,
/// preallocated). An LRU map evicts the least recently used entry when full; an evicted entry
/// of a live connection is recreated by the next packet the stack carries for it.
pub const MAX_STACK_FLOWS: u32 = 65536;

/// Key of [`MAP_STACK_FLOWS`]: a 5-tuple as it appears in a packet (addresses and ports in
/// network byte order). Ports are 0 for protocols without them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackFlow {
    /// IPv4 source.
    pub saddr: u32,
    /// IPv4 destination.
    pub daddr: u32,
    /// Source port (TCP, UDP, SCTP), else 0.
    pub sport: u16,
    /// Destination port (TCP, UDP, SCTP), else 0.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Always zero (the kernel hashes every key byte).
    pub pad: [u8; 3],
}

/// Name of the per-CPU array of node-wide counters of the stack-flow path (index: one of the
/// `SVC_*` constants, value: `u64`).
pub const MAP_SVC_COUNTERS: &str = "FERREA_SVC_CNT";
/// Slots of [`MAP_SVC_COUNTERS`].
pub const SVC_COUNTER_SLOTS: u32 = 8;
/// Packets the stack delivered to a local pod (any source).
pub const SVC_STACK_TO_POD: u32 = 0;
/// Of those, packets from a pod address: their reversed tuple is recorded.
pub const SVC_RECORDED_POD: u32 = 1;
/// Packets the stack sent into the tunnel from a local pod's address: recorded.
pub const SVC_RECORDED_TUNNEL: u32 = 2;
/// Packets from a local pod that would have taken a fast path but were replies of a
/// stack-carried connection, so went to the stack.
pub const SVC_REPLY_FROM_POD: u32 = 3;
/// The same for packets from the tunnel for a local pod.
pub const SVC_REPLY_FROM_TUNNEL: u32 = 4;
/// Fast-path TCP SYNs that removed a stale entry of their own reversed tuple.
pub const SVC_STALE_CLEARED: u32 = 5;
/// Packets sent to the stack because they are IP fragments or ICMP errors (no ports to match).
pub const SVC_UNMATCHABLE: u32 = 6;

/// Name of the hash map of ferrea's service proxy (`serviceProxy: ferrea`): a Service's
/// frontends and their backends, Cilium style (key: [`LbKey`], value: [`LbSlot`]). Slot 0 of
/// a frontend (VIP, port, protocol) holds the frontend itself (its backend count and session
/// affinity); slots `1..=count` hold its backends in the plan's order. The agent writes it
/// whole-entry; the pod program reads slot 0 of every TCP, UDP or SCTP packet for an address
/// that is not a local pod, and one backend slot per new connection.
pub const MAP_LB_SERVICES: &str = "FERREA_LB_SVC";
/// Capacity of [`MAP_LB_SERVICES`]: frontends plus all their backend slots.
pub const MAX_LB_ENTRIES: u32 = 65536;
/// The most backends one frontend holds in the maps (slots are `u16`; more than this many
/// endpoints of one Service port are truncated, in the plan's order, with a warning).
pub const MAX_LB_BACKENDS: u32 = 4096;

/// Key of [`MAP_LB_SERVICES`]. Addresses and ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbKey {
    /// The virtual address (ClusterIP, externalIP, LoadBalancer ingress IP).
    pub vip: u32,
    /// The Service port.
    pub port: u16,
    /// 0: the frontend; `1..=count`: its backends.
    pub slot: u16,
    /// IP protocol (6 TCP, 17 UDP, 132 SCTP).
    pub proto: u8,
    /// Always zero (the kernel hashes every key byte).
    pub pad: [u8; 3],
}

/// Value of [`MAP_LB_SERVICES`]: a frontend (slot 0) or one of its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbSlot {
    /// Backend slot: the backend's address, network byte order. Slot 0: 0.
    pub ip: u32,
    /// Backend slot: the backend's port, network byte order. Slot 0: 0.
    pub port: u16,
    /// Slot 0: `LB_F_*` flags. Backend slots: 0.
    pub flags: u16,
    /// Slot 0: the number of backends (0: connections go to the node's stack, which rejects
    /// them). Backend slots: 0.
    pub count: u32,
    /// Slot 0: `sessionAffinity: ClientIP` timeout in seconds; 0 = no affinity.
    pub affinity_secs: u32,
}

/// Name of the LRU hash map of the service proxy's connections (key: the 5-tuple of a packet
/// as the pod program sees it, a [`StackFlow`]; value: [`LbFlow`]). Every load-balanced
/// connection has two entries, written by the pod program of the client when it picks the
/// backend: the *forward* entry under the client's tuple to the VIP (client, VIP, client port,
/// Service port) says which backend it has, and the *reverse* entry under the tuple its replies
/// carry (backend, client, backend port, client port) says which VIP and port to give them back
/// as source. Hairpin connections (a pod reaching itself through its Service) carry the
/// hairpin address [`LB_HAIRPIN_IP`] in place of the client in the reverse tuple.
pub const MAP_LB_FLOWS: &str = "FERREA_LB_CT";
/// Capacity of [`MAP_LB_FLOWS`]: 131,072 entries, 65,536 connections (about 10 MiB of kernel
/// memory, preallocated). The least recently used entries are evicted when it is full.
pub const MAX_LB_FLOWS: u32 = 131_072;

/// Value of [`MAP_LB_FLOWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbFlow {
    /// Forward: the backend's address (the new destination). Reverse: the VIP (the new
    /// source). Network byte order.
    pub nat_ip: u32,
    /// Forward: the backend's port. Reverse: the Service port. Network byte order.
    pub nat_port: u16,
    /// `LB_FLOW_*` flags.
    pub flags: u16,
    /// Hairpin ([`LB_FLOW_HAIRPIN`]). Forward: the new source ([`LB_HAIRPIN_IP`]). Reverse:
    /// the new destination (the client pod).
    /// With [`LB_FLOW_PORT`] (never together with hairpin), a port in the low 16 bits, network
    /// byte order: forward, the client's new source port; reverse, the client's own port (the
    /// replies' new destination port). Otherwise 0.
    pub peer_ip: u32,
}

/// [`LbFlow::flags`]: a reverse entry (rewrite the source); else a forward entry.
pub const LB_FLOW_REVERSE: u16 = 1;
/// [`LbFlow::flags`]: a hairpin connection (the source is rewritten too, or back).
pub const LB_FLOW_HAIRPIN: u16 = 2;
/// [`LbFlow::flags`], forward TCP entries only: the backend has left the plan. Packets of the
/// connection still go to it (it drains, as kube-proxy leaves established TCP conntrack
/// entries), but a new SYN on the same tuple picks a backend afresh.
pub const LB_FLOW_STALE: u16 = 4;
/// [`LbFlow::flags`]: the client's source port is translated too (to the port in
/// [`LbFlow::peer_ip`]). A new connection gets it when the tuple its backend would see is
/// already another connection's: the same client port used for another VIP with the same
/// backend. That backend may still hold the earlier connection in TIME_WAIT, whose sequence
/// numbers and timestamps bear no relation to the new one's (the client's kernel derives them
/// from the tuple it sees, with the VIP), so its SYN would be answered as a stray segment of
/// the old connection and the client would connect only when it retransmits, a second later;
/// and two such connections open at once would share one reverse entry. The stack's conntrack
/// avoids the same clash by remapping the source port; this is that remapping.
pub const LB_FLOW_PORT: u16 = 8;
/// The source ports [`LB_FLOW_PORT`] translates to: 61000-65535, above Linux's default
/// ephemeral range (32768-60999), so that they rarely meet a port the client's kernel picks
/// for a connection of its own. Host byte order.
pub const LB_REMAP_PORT_FIRST: u16 = 61000;
/// How many ports [`LB_REMAP_PORT_FIRST`] starts.
pub const LB_REMAP_PORTS: u32 = 4536;

/// The source address a hairpin connection is given (a pod whose connection to its own
/// Service was sent back to itself sees the connection come from here, so its kernel accepts
/// it): 169.254.0.253, the link-local address Antrea uses for the same purpose. Network byte
/// order, as in the packet.
pub const LB_HAIRPIN_IP: u32 = u32::from_ne_bytes([169, 254, 0, 253]);

/// Name of the LRU hash map of `sessionAffinity: ClientIP` (key: [`LbAffinityKey`], value:
/// [`LbAffinity`]): each client's last backend per frontend and when it was chosen.
pub const MAP_LB_AFFINITY: &str = "FERREA_LB_AFF";
/// Capacity of [`MAP_LB_AFFINITY`].
pub const MAX_LB_AFFINITY: u32 = 65536;

/// Key of [`MAP_LB_AFFINITY`]. Addresses and ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbAffinityKey {
    /// The client's address.
    pub client: u32,
    /// The frontend's VIP.
    pub vip: u32,
    /// The frontend's port.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Always zero.
    pub pad: u8,
}

/// Value of [`MAP_LB_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbAffinity {
    /// `bpf_ktime_get_boot_ns()` (`CLOCK_BOOTTIME`, so the timeout runs on while the node is
    /// suspended) when the client last started a connection to this frontend.
    pub last_ns: u64,
    /// The backend's address, network byte order.
    pub ip: u32,
    /// The backend's port, network byte order.
    pub port: u16,
    /// Always zero.
    pub pad: u16,
}

/// Name of the per-CPU array of node-wide counters of the service proxy (index: one of the
/// `LB_CNT_*` constants, value: `u64`), in the style of [`MAP_SVC_COUNTERS`].
pub const MAP_LB_COUNTERS: &str = "FERREA_LB_CNT";
/// Slots of [`MAP_LB_COUNTERS`].
pub const LB_COUNTER_SLOTS: u32 = 16;
/// New connections to a VIP given a backend (forward and reverse entries written).
pub const LB_CNT_NEW: u32 = 0;
/// Of those, backends given by session affinity.
pub const LB_CNT_AFFINITY: u32 = 1;
/// Of those, hairpin connections (the client is the backend).
pub const LB_CNT_HAIRPIN: u32 = 2;
/// Packets to a VIP DNATed by an existing forward entry.
pub const LB_CNT_FORWARD: u32 = 3;
/// Replies given their VIP back in a pod's program (same-node backend, or hairpin).
pub const LB_CNT_REVERSE_POD: u32 = 4;
/// Replies given their VIP back in the tunnel's ingress program (backend on another node).
pub const LB_CNT_REVERSE_TUNNEL: u32 = 5;
/// Replies given their VIP back on TC egress of the client's veth (routed by the node's
/// stack: `noEncap`, or a backend that is no pod).
pub const LB_CNT_REVERSE_STACK: u32 = 6;
/// Packets to a frontend with no backends, passed to the node's stack (which rejects them).
pub const LB_CNT_NO_BACKEND: u32 = 7;
/// Packets to a VIP passed to the node's stack because the program could not translate them
/// (IP fragments, a backend slot missing during an update, a connection-table write failing).
pub const LB_CNT_TO_STACK: u32 = 8;
/// TCP SYNs on the tuple of a connection whose backend left the plan: re-balanced.
pub const LB_CNT_STALE_RESELECT: u32 = 9;
/// New connections given another source port ([`LB_FLOW_PORT`]): the tuple their backend would
/// see was another connection's.
pub const LB_CNT_PORT_REMAP: u32 = 10;
/// New connections whose backend tuple was another connection's and for which no free source
/// port was found in a few tries: translated without one (the earlier connection's reverse
/// entry is replaced).
pub const LB_CNT_PORT_CLASH: u32 = 11;

/// Name of the one-slot array the programs write a [`TraceRecord`] into, for `ferreactl
/// trace`: only for a packet whose `skb->mark` is [`TRACE_MARK`], which only the agent's
/// `BPF_PROG_TEST_RUN` sets, so real traffic pays one compare and writes nothing.
pub const MAP_TRACE: &str = "FERREA_TRACE";
/// The `skb->mark` of a traced packet (set in the test run's `__sk_buff`).
pub const TRACE_MARK: u32 = 0xfe11_7ace;
/// [`TraceRecord::verdict`]: dropped by the spoof guard (source IP or MAC not the pod's).
pub const TRACE_SPOOFED: u32 = 1;
/// Redirected into a local pod (`ifindex`: its host veth).
pub const TRACE_TO_POD: u32 = 2;
/// A reply of a connection the node's stack carried: to the stack instead of a fast path.
pub const TRACE_STACK_FLOW: u32 = 3;
/// Another node's pod: redirected to the tunnel device (`ifindex`), for `node_ip` / `id`.
pub const TRACE_TO_NODE: u32 = 4;
/// Steered for Egress: redirected to the tunnel device (`ifindex`), for the egress node
/// `node_ip` with the Egress id `id`.
pub const TRACE_EGRESS_STEER: u32 = 5;
/// Passed to the node's stack (not for a pod, not steered).
pub const TRACE_TO_STACK: u32 = 6;
/// The tunnel program set the outer destination `node_ip` and the VNI `id`.
pub const TRACE_TUNNEL_KEY: u32 = 7;

/// What a program decided for a traced packet (see [`MAP_TRACE`]). Addresses in network byte
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceRecord {
    /// One of the `TRACE_*` verdicts; 0: no record (the program took no traced decision).
    pub verdict: u32,
    /// The interface redirected to, if any.
    pub ifindex: u32,
    /// The tunnel's outer destination, if any.
    pub node_ip: u32,
    /// The VNI or Egress id, if any.
    pub id: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: Endpoint is repr(C), Copy, has no padding that would leak uninitialised bytes
    // into the kernel (4 + 4 + 6 + 6 = 20 bytes, alignment 4), and any bit pattern is valid.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: Counters is repr(C) of u64 fields only; any bit pattern is valid.
    unsafe impl aya::Pod for super::Counters {}
    // SAFETY: RemoteNode is repr(C) of three u32 fields, no padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::RemoteNode {}
    // SAFETY: EgressSteer is repr(C) of three u32 fields, no padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::EgressSteer {}
    // SAFETY: VlanKey is repr(C) of two u32 fields, no padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::VlanKey {}
    // SAFETY: VlanChild is repr(C) of three u32 fields, no padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::VlanChild {}
    // SAFETY: StackFlow is repr(C): 4 + 4 + 2 + 2 + 1 + 3 explicit padding bytes = 16, no
    // implicit padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::StackFlow {}
    // SAFETY: LbKey is repr(C): 4 + 2 + 2 + 1 + 3 explicit padding bytes = 12, no implicit
    // padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::LbKey {}
    // SAFETY: LbSlot is repr(C): 4 + 2 + 2 + 4 + 4 = 16, no padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::LbSlot {}
    // SAFETY: LbFlow is repr(C): 4 + 2 + 2 + 4 = 12, no padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::LbFlow {}
    // SAFETY: LbAffinityKey is repr(C): 4 + 4 + 2 + 1 + 1 explicit padding byte = 12, no
    // implicit padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::LbAffinityKey {}
    // SAFETY: LbAffinity is repr(C): 8 + 4 + 2 + 2 explicit padding bytes = 16, alignment 8,
    // no implicit padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::LbAffinity {}
    // SAFETY: TraceRecord is repr(C) of four u32 fields, no padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::TraceRecord {}
}
