//! ferrea's OpenFlow pipeline on the integration bridge: which tables exist, and the flows
//! the node and each pod need in them. Pure functions from facts to [`FlowMod`]s; installing
//! them is the backend's job.
//!
//! Owns: table numbers, priorities and the cookie layout. Never emits a flow without a
//! ferrea cookie, so deletes by cookie touch only ferrea's flows.
//!
//! ```text
//! Classifier(0) --pod port--> SpoofGuard(10) --ip--> ConntrackLookup(25) --> L3Forwarding(30)
//!      |                           |          Service frontend: ct(nat) --> ServiceLb(27) --^
//!      |                           |                              (new: group -> ct(commit,nat(dst)))
//!      |                           `--arp--> ArpResponder(20) --> IN_PORT          |
//!      |--gateway port--> ct(commit, mark) --> L3Forwarding(30)                    |
//!      |             `--arp--> ArpResponder(20)           pod port | gateway | remote pod CIDR:
//!      `--tunnel port (ip)--> ConntrackLookup(25)                           reg1 = node IP
//!                                                                                  v
//!                                        TunnelOutput(40): tun_dst = reg1 --> tunnel port
//! ```
//!
//! The node is every pod's router, as with the eBPF backend: the ARP responder answers any
//! request from a pod with the gateway's MAC, so every frame a pod sends reaches the bridge
//! addressed to the gateway; L3 forwarding rewrites MACs and outputs to the destination pod's
//! port, or sends everything else to the gateway internal port (the node's stack, where the
//! core's masquerade and routes apply). There is no L2 learning and no flooding.
//!
//! Other nodes (encap mode): one flow-based tunnel port ([`TunnelFacts::port`]) carries
//! everything between nodes. L3 forwarding matches a remote node's pod CIDR and only
//! *selects* the remote: it loads the node's transport address into [`REG_TUN_DST`] and
//! continues in `TunnelOutput`, which is the same for every remote (MACs: gateway to
//! [`GLOBAL_VIRTUAL_MAC`]; `dec_ttl`; `tun_dst` from the register; the cluster's VNI). So any
//! later stage that wants a packet tunnelled somewhere else (Egress: to the node holding the
//! pod's egress IP) loads another address into the register and jumps to the same table.
//! Packets from the tunnel enter L3 forwarding directly: to a local pod, or to the gateway.
//! The node itself reaches remote pods through routes `via <remote gateway> dev <gateway>
//! onlink`; the ARP responder answers the node's requests for remote gateways with the
//! global virtual MAC, and L3 forwarding tunnels those packets like pods' packets.
//!
//! Services beside kube-proxy: kube-proxy DNATs a Service's packets in the node's stack, so
//! they enter the bridge from the gateway port already translated (a pod's packet for a
//! ClusterIP is not for a pod, so it goes to the gateway first). Their replies come from the
//! backend pod (a local port, or the tunnel for a backend on another node) addressed to a pod
//! and would be output straight to it, never un-NATed. As Antrea does, the bridge commits every
//! IPv4 packet from the gateway to its own conntrack (zone [`CT_ZONE`]) with the mark
//! [`CT_MARK_FROM_GATEWAY`], and looks up packets for pod addresses from pods and from the
//! tunnel (table `ConntrackLookup`, no commit); a tracked reply-direction packet of a marked
//! connection is output to the gateway (priority `STACK_REPLY` in L3 forwarding, above the pod
//! flows), so the stack's conntrack reverses the NAT and routes it on. Conntrack rather than
//! learned flows: the bridge's conntrack follows TCP's state (a new SYN on a closed tuple
//! drops the old entry), expires idle entries by protocol, lives in `ovs-vswitchd` and so
//! survives an agent restart untouched, and the flows are fixed, so the restart's flow rounds
//! re-install them identically. The cost: pod-to-pod packets pay one conntrack lookup and a
//! recirculation (no commit, so un-NATed pod-to-pod connections create no entries); packets to
//! anything but a pod address pay nothing. After an `ovs-vswitchd` restart the marks are gone
//! until the next packet from the gateway re-commits the connection (mid-stream pickup).
//!
//! ferrea's service proxy ([`service_flows`], cookie kind [`cookie::KIND_SERVICE`]): a local
//! pod's packet to a load-balanced frontend is looked up with `ct(nat)` in [`CT_ZONE`] and
//! continues in `ServiceLb`: a new connection goes to the frontend's select group, whose
//! bucket commits it with the endpoint's DNAT and [`CT_MARK_SERVICE`] and recirculates into L3
//! forwarding; later packets (translated by the lookup) go straight to L3. Replies come back
//! through `ConntrackLookup`'s pod-address flows, whose lookup carries `nat` and so un-NATs
//! them. Connections committed from the gateway carry no NAT, so `nat` leaves them alone.
//!
//! Egress (encap mode, [`egress_flows`], all under the cookie kind [`cookie::KIND_EGRESS`] so
//! the set is replaced as a whole):
//!
//! ```text
//! source node (a local pod steered to the node holding its Egress IP):
//!   L3Forwarding(30) prio 200/190  local pod / remote pod CIDR (unchanged, win first)
//!                    prio 185      ip_dst in an exempt network -> gateway (the normal path)
//!                    prio 180      ip_src=<pod> -> reg1=<egress node>, reg2=<id>, TunnelOutput
//!   TunnelOutput(40) prio 210      reg2=<id> -> as the cluster's tunnel flow, tun_id=<id>
//! egress node (holding the IP of Egress <id>):
//!   Classifier(0)    prio 200      from the tunnel, tun_id=<id> -> eth_src=marker(<id>),
//!                                  eth_dst=gateway MAC, gateway port (the node's stack)
//!                    prio 0        any other tun_id (not the cluster's 0) drops
//! ```
//!
//! The egress node's stack reads the Egress id from the marker source MAC
//! ([`crate::dataplane::egress_marker_mac`], nftables sets the fwmark from it), routes by
//! policy and SNATs; replies come back to the pod through the ordinary overlay (VNI 0).
//! Packets the source node's stack sends into the bridge, and packets from the tunnel, never
//! carry a local pod's source address in practice, so the steer flows need no port match.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::net::EgressId;

use super::openflow::{Action, Field, FlowMod, Instruction, Match, port};

/// Tables of the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Table {
    /// Sorts packets by ingress port: pod ports to the spoof guard, the gateway onwards.
    Classifier = 0,
    /// Admits a pod's packets only with its own MAC and IP (IPv4 and ARP); counts drops.
    SpoofGuard = 10,
    /// Answers ARP requests; nothing is flooded.
    ArpResponder = 20,
    /// Looks packets for pod addresses (this node's or another node's) up in the connection
    /// tracker (zone [`CT_ZONE`], no commit) before L3 forwarding, so that replies of
    /// connections that came in from the gateway are found; everything else goes on untracked.
    ConntrackLookup = 25,
    /// Load-balances new connections of local pods to a Service frontend (ferrea's proxy):
    /// the frontend's select group picks a backend and commits the connection with its DNAT;
    /// later packets of a service connection (already translated by the lookup) go on.
    ServiceLb = 27,
    /// Routes by destination IP: local pods get rewritten MACs and their port (this table is
    /// also the output stage), remote pod CIDRs select a tunnel destination, everything else
    /// goes to the gateway port.
    L3Forwarding = 30,
    /// Sends a packet to the node whose transport address is in [`REG_TUN_DST`].
    TunnelOutput = 40,
}

/// The conntrack zone of the bridge's own connection tracking (Antrea's `CtZone`). With the
/// userspace datapath this is OVS's conntrack, not the node stack's.
pub const CT_ZONE: u16 = 65520;

/// `ct_mark` of connections whose first packet the bridge saw coming in from the gateway port,
/// i.e. from the node's stack (Antrea's `FromGatewayCTMark`).
pub const CT_MARK_FROM_GATEWAY: u32 = 0x1;

/// `ct_mark` of connections the bridge load-balanced to a Service backend itself (Antrea's
/// `ServiceCTMark`): committed with their DNAT in zone [`CT_ZONE`] by a group bucket.
pub const CT_MARK_SERVICE: u32 = 0x2;

/// `ct_state` bits (`CS_*` in OVS).
pub mod ct_state {
    /// The packet went through the connection tracker.
    pub const TRACKED: u32 = 0x20;
    /// The packet is in the reply direction of its connection.
    pub const REPLY: u32 = 0x08;
    /// The packet starts a new connection.
    pub const NEW: u32 = 0x01;
}

impl Table {
    /// The name of table number `t` (`"?"` for a table the pipeline does not use).
    pub fn name_of(t: u8) -> &'static str {
        match t {
            0 => "Classifier",
            10 => "SpoofGuard",
            20 => "ArpResponder",
            25 => "ConntrackLookup",
            27 => "ServiceLb",
            30 => "L3Forwarding",
            40 => "TunnelOutput",
            _ => "?",
        }
    }
}

/// The register holding the tunnel destination (a node's transport IPv4 address) on the way
/// to [`Table::TunnelOutput`].
pub const REG_TUN_DST: u8 = 1;

/// The register holding the Egress id of a steered packet on the way to
/// [`Table::TunnelOutput`] (0: not steered, the cluster's VNI).
pub const REG_EGRESS: u8 = 2;

/// Destination MAC of every packet sent into the tunnel (Antrea's "global virtual MAC"), and
/// the MAC the ARP responder gives the node for remote gateways. The receiving node rewrites
/// both MACs before delivery, so it never reaches a pod.
pub const GLOBAL_VIRTUAL_MAC: [u8; 6] = [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];

/// Priorities used in every table.
#[expect(
    missing_docs,
    reason = "the constants are named after what they rank; the module doc says what they are"
)]
pub mod prio {
    pub const POD: u16 = 200;
    pub const REMOTE: u16 = 190;
    pub const TUNNEL: u16 = 200;
    pub const GATEWAY_ARP: u16 = 210;
    pub const GATEWAY: u16 = 200;
    pub const GATEWAY_ARP_DROP: u16 = 150;
    pub const ANY_ARP: u16 = 100;
    pub const EGRESS_EXEMPT: u16 = 185;
    pub const EGRESS_STEER: u16 = 180;
    pub const EGRESS_TUNNEL: u16 = 210;
    pub const EGRESS_HELD: u16 = 200;
    pub const STACK_REPLY: u16 = 210;
    pub const CT_LOCAL: u16 = 200;
    pub const CT_REMOTE: u16 = 190;
    pub const SERVICE_HAIRPIN: u16 = 220;
    pub const SERVICE: u16 = 210;
    pub const SERVICE_EST: u16 = 200;
    pub const SERVICE_NEW: u16 = 190;
    pub const SPOOF_DROP: u16 = 150;
    pub const OTHER_DROP: u16 = 100;
    pub const DEFAULT: u16 = 0;
}

/// Cookie layout: `round:16 | kind:16 | id:32`. `round` changes with every agent start (old
/// rounds are deleted once pods are reconciled); `kind` tells node flows from pod flows and
/// remote-node flows and Egress flows; `id` is the pod's IPv4 address, or the network address
/// of a remote node's pod CIDR, so a pod's or a remote node's flows are found and deleted by
/// cookie mask in every round at once. Egress flows are replaced as one set (by kind); their
/// `id` only tells them apart in a dump: the steered pod's address, the Egress id, or 0 for
/// the exemptions.
pub mod cookie {
    use std::net::Ipv4Addr;

    use ipnetwork::Ipv4Network;

    /// Node-wide flows.
    pub const KIND_NODE: u16 = 1;
    /// A pod's flows.
    pub const KIND_POD: u16 = 2;
    /// A remote node's flows.
    pub const KIND_REMOTE: u16 = 3;
    /// Egress flows (steered pods, exemptions, held ids).
    pub const KIND_EGRESS: u16 = 4;
    /// Service frontends' flows (ferrea's proxy); id: the frontend's group.
    pub const KIND_SERVICE: u16 = 5;
    /// Selects the kind bits (every flow of a kind, any id, any round).
    pub const KIND_MASK: u64 = 0x0000_ffff_0000_0000;
    /// Selects kind and id (one remote node in any round).
    pub const REMOTE_MASK: u64 = POD_MASK;
    /// Selects the round bits.
    pub const ROUND_MASK: u64 = 0xffff << 48;
    /// Selects kind and id (a pod in any round).
    pub const POD_MASK: u64 = 0x0000_ffff_ffff_ffff;

    /// The cookie of flows of `kind`/`id` installed in `round`.
    pub fn make(round: u16, kind: u16, id: u32) -> u64 {
        (u64::from(round) << 48) | (u64::from(kind) << 32) | u64::from(id)
    }
    /// The cookie of a pod's flows in `round`.
    pub fn pod(round: u16, ip: Ipv4Addr) -> u64 {
        make(round, KIND_POD, u32::from(ip))
    }
    /// The cookie of a remote node's flows in `round`, by the node's pod CIDR.
    pub fn remote(round: u16, pod_cidr: Ipv4Network) -> u64 {
        make(round, KIND_REMOTE, u32::from(pod_cidr.network()))
    }
    /// The cookie of Egress flows in `round`.
    pub fn egress(round: u16, id: u32) -> u64 {
        make(round, KIND_EGRESS, id)
    }
    /// Round of a cookie.
    pub fn round(c: u64) -> u16 {
        (c >> 48) as u16
    }
    /// Kind of a cookie (0 = not ferrea's).
    pub fn kind(c: u64) -> u16 {
        (c >> 32) as u16
    }
    /// The id of a cookie (pod IP, or remote pod CIDR's network address).
    pub fn id(c: u64) -> u32 {
        c as u32
    }
    /// The pod IP of a pod cookie.
    pub fn pod_ip(c: u64) -> Option<Ipv4Addr> {
        (kind(c) == KIND_POD).then(|| Ipv4Addr::from(c as u32))
    }
    /// What a cookie's flows are for, in words: (kind, object).
    pub fn describe(c: u64) -> (&'static str, String) {
        match kind(c) {
            KIND_NODE => ("node", String::new()),
            KIND_POD => ("pod", Ipv4Addr::from(id(c)).to_string()),
            KIND_REMOTE => ("remote", Ipv4Addr::from(id(c)).to_string()),
            KIND_EGRESS => ("egress", id(c).to_string()),
            KIND_SERVICE => ("service", id(c).to_string()),
            _ => ("foreign", String::new()),
        }
    }
}

/// Node-wide facts the flows depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    /// OpenFlow port of the gateway internal port.
    pub gw_port: u32,
    /// MAC of the gateway internal port; pods learn it for every IP they ARP for.
    pub gw_mac: [u8; 6],
    /// The pod CIDR (the gateway port carries its first address).
    pub pod_cidr: Ipv4Network,
}

/// The tunnel to other nodes (encap mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelFacts {
    /// OpenFlow port of the flow-based tunnel port.
    pub port: u32,
    /// The tunnel key of the cluster overlay ([`crate::dataplane::TUNNEL_VNI`]); Egress
    /// packets carry their Egress id instead.
    pub vni: u32,
}

/// A remote node's facts the flows depend on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteFacts {
    /// Its pod CIDR.
    pub pod_cidr: Ipv4Network,
    /// Its pods' gateway (first address of the CIDR): the node's next hop to its pods.
    pub gateway: Ipv4Addr,
    /// Its transport address: the tunnel destination.
    pub node_ip: Ipv4Addr,
}

/// A pod's facts the flows depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    /// OpenFlow port of the pod's host veth.
    pub port: u32,
    /// The pod's MAC.
    pub mac: [u8; 6],
    /// The pod's IPv4 address.
    pub ip: Ipv4Addr,
}

fn goto(t: Table) -> Instruction {
    Instruction::GotoTable(t as u8)
}

/// ARP reply actions turning a request into a reply from `mac` for whatever address was
/// asked (`arp_tpa` and `arp_spa` swapped through reg0), sent back where it came from.
/// One instruction: apply `a`.
fn apply(a: Vec<Action>) -> Vec<Instruction> {
    vec![Instruction::ApplyActions(a)]
}

/// The node (through the gateway port) asking who has `ip`: answered with `mac`.
fn answer_gateway_arp(n: &NodeFacts, c: u64, ip: Ipv4Addr, mac: [u8; 6]) -> FlowMod {
    FlowMod::add(
        Table::ArpResponder as u8,
        prio::POD,
        c,
        Match::new().in_port(n.gw_port).arp().arp_op(1).arp_tpa(ip),
        apply(arp_reply(mac, Some(ip))),
    )
}

fn arp_reply(mac: [u8; 6], spa: Option<Ipv4Addr>) -> Vec<Action> {
    let mut a = vec![
        Action::move_field(Field::EthSrc, Field::EthDst),
        Action::set_mac(Field::EthSrc, mac),
        Action::SetField(Field::ArpOp, 2u16.to_be_bytes().to_vec()),
        Action::move_field(Field::ArpSha, Field::ArpTha),
        Action::set_mac(Field::ArpSha, mac),
    ];
    match spa {
        Some(ip) => {
            a.push(Action::move_field(Field::ArpSpa, Field::ArpTpa));
            a.push(Action::SetField(Field::ArpSpa, ip.octets().to_vec()));
        }
        None => {
            a.push(Action::move_field(Field::ArpTpa, Field::Reg(0)));
            a.push(Action::move_field(Field::ArpSpa, Field::ArpTpa));
            a.push(Action::move_field(Field::Reg(0), Field::ArpSpa));
        }
    }
    a.push(Action::Output(port::IN_PORT));
    a
}

/// The node-wide flows of `round`.
pub fn node_flows(round: u16, n: &NodeFacts) -> Vec<FlowMod> {
    let c = cookie::make(round, cookie::KIND_NODE, 0);
    vec![
        // Classifier: the gateway's ARP to the responder, its IP to L3; anything else drops.
        FlowMod::add(
            Table::Classifier as u8,
            prio::GATEWAY_ARP,
            c,
            Match::new().in_port(n.gw_port).arp(),
            vec![goto(Table::ArpResponder)],
        ),
        // IPv4 from the node's stack: committed with the from-gateway mark, then routed. The
        // stack may have NATed it (kube-proxy); its replies must go back the same way.
        FlowMod::add(
            Table::Classifier as u8,
            prio::GATEWAY,
            c,
            Match::new().in_port(n.gw_port).ip(),
            vec![
                Instruction::ApplyActions(vec![commit_from_gateway()]),
                goto(Table::L3Forwarding),
            ],
        ),
        FlowMod::add(
            Table::Classifier as u8,
            prio::DEFAULT,
            c,
            Match::new(),
            vec![],
        ),
        // Spoof guard: what no pod flow admits drops (per-pod drop flows count first).
        FlowMod::add(
            Table::SpoofGuard as u8,
            prio::DEFAULT,
            c,
            Match::new(),
            vec![],
        ),
        // ARP: the node asking for a non-pod address gets no answer (pod flows answer for
        // pods); any request from a pod gets the gateway's MAC; replies and the rest drop.
        FlowMod::add(
            Table::ArpResponder as u8,
            prio::GATEWAY_ARP_DROP,
            c,
            Match::new().in_port(n.gw_port),
            vec![],
        ),
        FlowMod::add(
            Table::ArpResponder as u8,
            prio::ANY_ARP,
            c,
            Match::new().arp().arp_op(1),
            apply(arp_reply(n.gw_mac, None)),
        ),
        FlowMod::add(
            Table::ArpResponder as u8,
            prio::DEFAULT,
            c,
            Match::new(),
            vec![],
        ),
        // Conntrack lookup: packets for this node's pod CIDR are looked up (remote CIDRs get
        // theirs with the remote's flows); anything else goes on untracked.
        FlowMod::add(
            Table::ConntrackLookup as u8,
            prio::CT_LOCAL,
            c,
            Match::new()
                .ip()
                .ipv4_dst(n.pod_cidr.network(), n.pod_cidr.prefix()),
            apply(vec![ct_lookup()]),
        ),
        FlowMod::add(
            Table::ConntrackLookup as u8,
            prio::DEFAULT,
            c,
            Match::new(),
            vec![goto(Table::L3Forwarding)],
        ),
        // L3: a reply of a connection that came in from the gateway goes back to the gateway,
        // whatever its destination, so the node's conntrack sees it and undoes its NAT.
        FlowMod::add(
            Table::L3Forwarding as u8,
            prio::STACK_REPLY,
            c,
            Match::new()
                .ct_state(
                    ct_state::TRACKED | ct_state::REPLY,
                    ct_state::TRACKED | ct_state::REPLY,
                )
                .ct_mark(CT_MARK_FROM_GATEWAY, CT_MARK_FROM_GATEWAY)
                .ip(),
            apply(vec![
                Action::set_mac(Field::EthDst, n.gw_mac),
                Action::Output(n.gw_port),
            ]),
        ),
        // L3: not a local pod -> the node's stack through the gateway port. Output to the
        // ingress port is dropped by OVS, so the gateway's own leftovers go nowhere.
        FlowMod::add(
            Table::L3Forwarding as u8,
            prio::DEFAULT,
            c,
            Match::new(),
            apply(vec![
                Action::set_mac(Field::EthDst, n.gw_mac),
                Action::Output(n.gw_port),
            ]),
        ),
        // Tunnel output: nothing selected a destination -> drop.
        FlowMod::add(
            Table::TunnelOutput as u8,
            prio::DEFAULT,
            c,
            Match::new(),
            vec![],
        ),
        // Service LB: later packets of a connection the bridge load-balanced were translated
        // by the lookup; they are routed like any other.
        FlowMod::add(
            Table::ServiceLb as u8,
            prio::SERVICE_EST,
            c,
            Match::new()
                .ct_state(ct_state::TRACKED, ct_state::TRACKED | ct_state::NEW)
                .ct_mark(CT_MARK_SERVICE, CT_MARK_SERVICE)
                .ip(),
            vec![goto(Table::L3Forwarding)],
        ),
        // Anything else (a frontend gone since the lookup, an invalid packet): routed
        // untranslated, so to the gateway, where the node's table translates or rejects it.
        FlowMod::add(
            Table::ServiceLb as u8,
            prio::DEFAULT,
            c,
            Match::new(),
            vec![goto(Table::L3Forwarding)],
        ),
    ]
}

/// A Service frontend the bridge load-balances (ferrea's proxy), from
/// [`service_frontends`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFacts {
    /// Its select group (also the id of its flows' cookie).
    pub group: u32,
    /// The virtual address.
    pub ip: Ipv4Addr,
    /// IP protocol number (6, 17, 132).
    pub proto: u8,
    /// The Service port.
    pub port: u16,
    /// The backends (address, port), sorted.
    pub backends: Vec<(Ipv4Addr, u16)>,
    /// Backends that are this node's pods: their own connections to the frontend (hairpin)
    /// are left to the node's stack, which masquerades them.
    pub local: Vec<Ipv4Addr>,
    /// `namespace/name:port`, for logs.
    pub name: String,
}

/// Why a frontend of the plan is left to the node's stack (see [`service_frontends`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeftToStack {
    /// No backends: the stack rejects its connections.
    NoBackends,
    /// `sessionAffinity: ClientIP`: the stack's affinity sets pin clients.
    Affinity,
    /// A backend is not a pod the bridge reaches itself (the node's gateway address, a
    /// host-network endpoint, an address
    /// outside the cluster, a pod behind the node's routes in `noEncap` mode): its replies
    /// would come back through the gateway, where the bridge cannot un-NAT them.
    BackendOffBridge,
}

/// IP protocol number of a Service protocol.
pub fn proto_number(p: crate::source::Protocol) -> u8 {
    match p {
        crate::source::Protocol::Tcp => 6,
        crate::source::Protocol::Udp => 17,
        crate::source::Protocol::Sctp => 132,
    }
}

/// The frontends of `plan` the bridge load-balances, numbered from group 1 in plan order,
/// and how many were left to the stack for each reason. A frontend is the bridge's when it
/// has backends, no session affinity, and every backend is in this node's pod CIDR or a
/// remote node's pod CIDR reached through the tunnel (`remotes`).
pub fn service_frontends(
    plan: &crate::proxy::ServicePlan,
    n: &NodeFacts,
    remotes: &[RemoteFacts],
) -> (Vec<ServiceFacts>, Vec<(String, LeftToStack)>) {
    let mut out = Vec::new();
    let mut left = Vec::new();
    for v in &plan.vips {
        // The gateway address is the node itself: its replies would come in from the gateway.
        let gateway = Ipv4Addr::from(u32::from(n.pod_cidr.network()) + 1);
        let on_bridge = |ip: Ipv4Addr| {
            (n.pod_cidr.contains(ip) && ip != gateway)
                || remotes.iter().any(|r| r.pod_cidr.contains(ip))
        };
        let why = if v.backends.is_empty() {
            Some(LeftToStack::NoBackends)
        } else if v.affinity_secs.is_some() {
            Some(LeftToStack::Affinity)
        } else if !v.backends.iter().all(|b| on_bridge(b.ip)) {
            Some(LeftToStack::BackendOffBridge)
        } else {
            None
        };
        if let Some(w) = why {
            left.push((v.name.clone(), w));
            continue;
        }
        let mut backends: Vec<(Ipv4Addr, u16)> =
            v.backends.iter().map(|b| (b.ip, b.port)).collect();
        backends.sort();
        backends.dedup();
        let mut local: Vec<Ipv4Addr> = v
            .backends
            .iter()
            .map(|b| b.ip)
            .filter(|ip| n.pod_cidr.contains(*ip))
            .collect();
        local.sort();
        local.dedup();
        out.push(ServiceFacts {
            group: out.len() as u32 + 1,
            ip: v.addr.ip,
            proto: proto_number(v.addr.protocol),
            port: v.addr.port,
            backends,
            local,
            name: v.name.clone(),
        });
    }
    (out, left)
}

/// The weight of every bucket (all backends equal, as kube-proxy's random pick).
pub const BUCKET_WEIGHT: u16 = 100;

/// The groups and flows of the load-balanced frontends in `round` (cookie kind
/// [`cookie::KIND_SERVICE`], id the group):
///
/// ```text
/// ConntrackLookup(25) prio 220  ip_src=<local backend>, frontend -> goto L3 (hairpin: stack)
///                     prio 210  frontend (ip, proto, port) -> ct(table=27, zone, nat)
/// ServiceLb(27)       prio 200  +trk-new, ct_mark service -> goto L3   (node flows)
///                     prio 190  +new+trk, frontend -> group:<id>
/// group <id> (select): one bucket per backend:
///     ct(commit, table=30, zone, nat(dst=backend:port), exec(ct_mark=service))
/// ```
pub fn service_flows(
    round: u16,
    services: &[ServiceFacts],
) -> (Vec<super::openflow::GroupMod>, Vec<FlowMod>) {
    use super::openflow::{Bucket, GroupMod};
    let mut groups = Vec::new();
    let mut flows = Vec::new();
    for f in services {
        let c = cookie::make(round, cookie::KIND_SERVICE, f.group);
        let frontend = || {
            Match::new()
                .ip()
                .ip_proto(f.proto)
                .ipv4_dst(f.ip, 32)
                .l4_dst(f.proto, f.port)
        };
        groups.push(GroupMod::add_select(
            f.group,
            f.backends
                .iter()
                .enumerate()
                .map(|(i, (ip, port))| Bucket {
                    id: i as u32,
                    weight: BUCKET_WEIGHT,
                    actions: vec![Action::Ct {
                        commit: true,
                        zone: CT_ZONE,
                        table: Some(Table::L3Forwarding as u8),
                        exec: vec![
                            Action::Nat(Some((*ip, Some(*port)))),
                            Action::SetField(Field::CtMark, CT_MARK_SERVICE.to_be_bytes().to_vec()),
                        ],
                    }],
                })
                .collect(),
        ));
        for ip in &f.local {
            flows.push(FlowMod::add(
                Table::ConntrackLookup as u8,
                prio::SERVICE_HAIRPIN,
                c,
                frontend().ipv4_src(*ip, 32),
                vec![goto(Table::L3Forwarding)],
            ));
        }
        flows.push(FlowMod::add(
            Table::ConntrackLookup as u8,
            prio::SERVICE,
            c,
            frontend(),
            apply(vec![ct_nat_lookup(Table::ServiceLb)]),
        ));
        flows.push(FlowMod::add(
            Table::ServiceLb as u8,
            prio::SERVICE_NEW,
            c,
            frontend().ct_state(
                ct_state::TRACKED | ct_state::NEW,
                ct_state::TRACKED | ct_state::NEW,
            ),
            apply(vec![Action::Group(f.group)]),
        ));
    }
    (groups, flows)
}

/// `ct(commit,zone=CT_ZONE,exec(set_field:CT_MARK_FROM_GATEWAY->ct_mark))`: the packet goes
/// on untracked.
fn commit_from_gateway() -> Action {
    Action::Ct {
        commit: true,
        zone: CT_ZONE,
        table: None,
        exec: vec![Action::SetField(
            Field::CtMark,
            CT_MARK_FROM_GATEWAY.to_be_bytes().to_vec(),
        )],
    }
}

/// `ct(table=L3Forwarding,zone=CT_ZONE,nat)`: look up, no commit, continue tracked in L3.
/// `nat` applies a connection's existing translation: replies of connections the bridge
/// load-balanced come back from the backend's address to the Service's; connections
/// committed without NAT (from the gateway) are left as they are.
fn ct_lookup() -> Action {
    ct_nat_lookup(Table::L3Forwarding)
}

/// `ct(table=t,zone=CT_ZONE,nat)`.
fn ct_nat_lookup(t: Table) -> Action {
    Action::Ct {
        commit: false,
        zone: CT_ZONE,
        table: Some(t as u8),
        exec: vec![Action::Nat(None)],
    }
}

/// The node-wide flows of the tunnel to other nodes (encap mode) in `round`.
pub fn tunnel_flows(round: u16, n: &NodeFacts, t: &TunnelFacts) -> Vec<FlowMod> {
    let c = cookie::make(round, cookie::KIND_NODE, 0);
    let tun = t.port;
    vec![
        // From other nodes: IPv4 with our key straight to L3 (a local pod, or the gateway);
        // anything else from the tunnel drops in the classifier's default.
        FlowMod::add(
            Table::Classifier as u8,
            prio::TUNNEL,
            c,
            Match::new().in_port(tun).tun_id(u64::from(t.vni)).ip(),
            vec![goto(Table::ConntrackLookup)],
        ),
        // To other nodes: the destination node is in the register.
        FlowMod::add(
            Table::TunnelOutput as u8,
            prio::TUNNEL,
            c,
            Match::new().ip(),
            apply(tunnel_output(n, tun, u64::from(t.vni))),
        ),
    ]
}

/// What sends a packet to the node in [`REG_TUN_DST`] with tunnel key `key`.
fn tunnel_output(n: &NodeFacts, tun: u32, key: u64) -> Vec<Action> {
    vec![
        Action::set_mac(Field::EthSrc, n.gw_mac),
        Action::set_mac(Field::EthDst, GLOBAL_VIRTUAL_MAC),
        Action::DecTtl,
        Action::move_field(Field::Reg(REG_TUN_DST), Field::TunIpv4Dst),
        Action::SetField(Field::TunId, key.to_be_bytes().to_vec()),
        Action::Output(tun),
    ]
}

/// The Egress flows of `plan` in `round` (encap mode; see the module doc). Expects a plan
/// whose ids are not 0 (the cluster's VNI); the backend checks that.
///
/// - Steered pods: one L3 flow per pod selecting the egress node and the id; one
///   `TunnelOutput` flow per id setting the key. Exempt destinations (and this node's own
///   pod CIDR, so the pod's gateway address is never steered) get L3 flows above the steer
///   flows with the default's action (the gateway port). No steered pod: no exemptions.
/// - Held ids: one classifier flow per id handing the node's stack the packet with the
///   marker source MAC.
pub fn egress_flows(
    round: u16,
    n: &NodeFacts,
    t: &TunnelFacts,
    plan: &crate::dataplane::EgressPlan,
) -> Vec<FlowMod> {
    let mut out = Vec::new();
    if !plan.steer.is_empty() {
        let nets: BTreeSet<(Ipv4Addr, u8)> = plan
            .exempt
            .iter()
            .chain([&n.pod_cidr])
            .map(|e| (e.network(), e.prefix()))
            .collect();
        for (net, prefix) in nets {
            out.push(FlowMod::add(
                Table::L3Forwarding as u8,
                prio::EGRESS_EXEMPT,
                cookie::egress(round, 0),
                Match::new().ip().ipv4_dst(net, prefix),
                apply(vec![
                    Action::set_mac(Field::EthDst, n.gw_mac),
                    Action::Output(n.gw_port),
                ]),
            ));
        }
        let mut ids = BTreeSet::new();
        for s in &plan.steer {
            out.push(FlowMod::add(
                Table::L3Forwarding as u8,
                prio::EGRESS_STEER,
                cookie::egress(round, u32::from(s.pod_ip)),
                Match::new().ip().ipv4_src(s.pod_ip, 32),
                vec![
                    Instruction::ApplyActions(vec![
                        Action::set_reg(REG_TUN_DST, u32::from(s.node_ip)),
                        Action::set_reg(REG_EGRESS, u32::from(s.id)),
                    ]),
                    goto(Table::TunnelOutput),
                ],
            ));
            ids.insert(s.id);
        }
        for id in ids {
            out.push(FlowMod::add(
                Table::TunnelOutput as u8,
                prio::EGRESS_TUNNEL,
                cookie::egress(round, u32::from(id)),
                Match::new().ip().reg(REG_EGRESS, u32::from(id), u32::MAX),
                apply(tunnel_output(n, t.port, u64::from(id))),
            ));
        }
    }
    let held: BTreeSet<EgressId> = plan.held.iter().copied().collect();
    for id in held {
        out.push(FlowMod::add(
            Table::Classifier as u8,
            prio::EGRESS_HELD,
            cookie::egress(round, u32::from(id)),
            Match::new().in_port(t.port).tun_id(u64::from(id)).ip(),
            apply(vec![
                Action::set_mac(Field::EthSrc, crate::dataplane::egress_marker_mac(id)),
                Action::set_mac(Field::EthDst, n.gw_mac),
                Action::Output(n.gw_port),
            ]),
        ));
    }
    out
}

/// The flows that reach one remote node's pods through the tunnel in `round` (encap mode; in
/// `noEncap` mode the node's routes carry that traffic and there are none).
pub fn remote_flows(round: u16, n: &NodeFacts, r: &RemoteFacts) -> Vec<FlowMod> {
    let c = cookie::remote(round, r.pod_cidr);
    vec![
        // Packets for its pods are looked up in conntrack first (replies of connections the
        // node's stack sent there go back to the gateway).
        FlowMod::add(
            Table::ConntrackLookup as u8,
            prio::CT_REMOTE,
            c,
            Match::new()
                .ip()
                .ipv4_dst(r.pod_cidr.network(), r.pod_cidr.prefix()),
            apply(vec![ct_lookup()]),
        ),
        // Select the tunnel destination, then the shared output stage.
        FlowMod::add(
            Table::L3Forwarding as u8,
            prio::REMOTE,
            c,
            Match::new()
                .ip()
                .ipv4_dst(r.pod_cidr.network(), r.pod_cidr.prefix()),
            vec![
                Instruction::ApplyActions(vec![Action::set_reg(REG_TUN_DST, u32::from(r.node_ip))]),
                goto(Table::TunnelOutput),
            ],
        ),
        // The node's route to the remote pods is `via <remote gateway> onlink` on the gateway
        // device: answer its ARP for that next hop with the virtual MAC.
        answer_gateway_arp(n, c, r.gateway, GLOBAL_VIRTUAL_MAC),
    ]
}

/// The flows of one pod in `round`.
pub fn pod_flows(round: u16, n: &NodeFacts, p: &PodFacts) -> Vec<FlowMod> {
    let c = cookie::pod(round, p.ip);
    vec![
        FlowMod::add(
            Table::Classifier as u8,
            prio::POD,
            c,
            Match::new().in_port(p.port),
            vec![goto(Table::SpoofGuard)],
        ),
        // Spoof guard: its MAC and IP, for IPv4 and for ARP (sender fields too).
        FlowMod::add(
            Table::SpoofGuard as u8,
            prio::POD,
            c,
            Match::new()
                .in_port(p.port)
                .eth_src(p.mac)
                .ip()
                .ipv4_src(p.ip, 32),
            vec![goto(Table::ConntrackLookup)],
        ),
        FlowMod::add(
            Table::SpoofGuard as u8,
            prio::POD,
            c,
            Match::new()
                .in_port(p.port)
                .eth_src(p.mac)
                .arp()
                .arp_spa(p.ip)
                .arp_sha(p.mac),
            vec![goto(Table::ArpResponder)],
        ),
        // IPv4 and ARP with another source drop here; these counters are drop_spoofed.
        FlowMod::add(
            Table::SpoofGuard as u8,
            prio::SPOOF_DROP,
            c,
            Match::new().in_port(p.port).ip(),
            vec![],
        ),
        FlowMod::add(
            Table::SpoofGuard as u8,
            prio::SPOOF_DROP,
            c,
            Match::new().in_port(p.port).arp(),
            vec![],
        ),
        // Any other protocol (IPv6, ...) drops here: the pod network is IPv4 only, and such
        // packets are not spoofing; these counters are drop_other.
        FlowMod::add(
            Table::SpoofGuard as u8,
            prio::OTHER_DROP,
            c,
            Match::new().in_port(p.port),
            vec![],
        ),
        // The node asking for the pod: answer with the pod's own MAC.
        answer_gateway_arp(n, c, p.ip, p.mac),
        // Delivery: the pod sees frames from the gateway MAC to its own MAC.
        FlowMod::add(
            Table::L3Forwarding as u8,
            prio::POD,
            c,
            Match::new().ip().ipv4_dst(p.ip, 32),
            apply(vec![
                Action::set_mac(Field::EthSrc, n.gw_mac),
                Action::set_mac(Field::EthDst, p.mac),
                Action::Output(p.port),
            ]),
        ),
    ]
}

/// Which counter of [`crate::dataplane::PodStats`] a pod flow feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets admitted from the pod.
    Tx,
    /// Packets delivered to the pod.
    Rx,
    /// Packets from the pod dropped by the spoof guard.
    DropSpoofed,
    /// Frames from the pod of a protocol the pod network does not carry (IPv6, ...).
    DropOther,
    /// Not a counter.
    None,
}

/// Maps a pod flow (table, priority) to its counter.
pub fn counter_of(table: u8, priority: u16) -> Counter {
    match (table, priority) {
        (t, prio::POD) if t == Table::SpoofGuard as u8 => Counter::Tx,
        (t, prio::SPOOF_DROP) if t == Table::SpoofGuard as u8 => Counter::DropSpoofed,
        (t, prio::OTHER_DROP) if t == Table::SpoofGuard as u8 => Counter::DropOther,
        (t, prio::POD) if t == Table::L3Forwarding as u8 => Counter::Rx,
        _ => Counter::None,
    }
}

/// The gateway MAC ferrea gives its internal port: `0a:58` and the gateway IP, the
/// convention the core uses for pod MACs, so it is stable across restarts and nodes.
pub fn gateway_mac(gw: Ipv4Addr) -> [u8; 6] {
    let o = gw.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> (NodeFacts, PodFacts) {
        (
            NodeFacts {
                gw_port: 1,
                gw_mac: gateway_mac("10.244.1.1".parse().unwrap()),
                pod_cidr: "10.244.1.0/24".parse().unwrap(),
            },
            PodFacts {
                port: 7,
                mac: [0x0a, 0x58, 10, 244, 1, 5],
                ip: "10.244.1.5".parse().unwrap(),
            },
        )
    }

    #[test]
    fn cookies_carry_round_kind_and_pod() {
        let c = cookie::pod(3, "10.244.1.5".parse().unwrap());
        assert_eq!(c, 0x0003_0002_0af4_0105);
        assert_eq!(cookie::round(c), 3);
        assert_eq!(cookie::pod_ip(c), Some("10.244.1.5".parse().unwrap()));
        assert_eq!(
            c & cookie::POD_MASK,
            cookie::pod(9, "10.244.1.5".parse().unwrap()) & cookie::POD_MASK
        );
        assert_eq!(cookie::pod_ip(cookie::make(1, cookie::KIND_NODE, 0)), None);
    }

    #[test]
    fn every_flow_has_a_ferrea_cookie_of_its_round() {
        let (n, p) = facts();
        for f in node_flows(4, &n).iter().chain(pod_flows(4, &n, &p).iter()) {
            assert_eq!(cookie::round(f.cookie), 4);
            assert!(matches!(
                cookie::kind(f.cookie),
                cookie::KIND_NODE | cookie::KIND_POD
            ));
        }
        let pf = pod_flows(4, &n, &p);
        assert!(pf.iter().all(|f| cookie::pod_ip(f.cookie) == Some(p.ip)));
        let t = TunnelFacts { port: 10, vni: 0 };
        for f in tunnel_flows(4, &n, &t) {
            assert_eq!(f.cookie, cookie::make(4, cookie::KIND_NODE, 0));
        }
        let rf = remote_flows(4, &n, &remote());
        // A remote node's flows are found by its cookie in any round, and no pod's mask
        // selects them.
        assert!(rf.iter().all(|f| f.cookie & cookie::REMOTE_MASK
            == cookie::remote(9, remote().pod_cidr) & cookie::REMOTE_MASK
            && cookie::pod_ip(f.cookie).is_none()
            && cookie::round(f.cookie) == 4));
    }

    fn remote() -> RemoteFacts {
        RemoteFacts {
            pod_cidr: "10.244.2.0/24".parse().unwrap(),
            gateway: "10.244.2.1".parse().unwrap(),
            node_ip: "172.18.0.12".parse().unwrap(),
        }
    }

    #[test]
    fn remote_flows_select_the_node_and_share_the_tunnel_output() {
        let (n, _) = facts();
        let t = TunnelFacts { port: 10, vni: 0 };
        let r = remote();
        let rf = remote_flows(5, &n, &r);
        assert!(rf.iter().all(|f| f.cookie == cookie::remote(5, r.pod_cidr)));
        assert_eq!(cookie::kind(rf[0].cookie), cookie::KIND_REMOTE);
        assert_eq!(cookie::id(rf[0].cookie), u32::from(r.pod_cidr.network()));
        let txt: Vec<String> = rf.iter().map(FlowMod::to_ofctl).collect();
        // L3 only loads the node's address (172.18.0.12 = 0xac12000c) and jumps on.
        assert!(
            txt.iter().any(|t| t.starts_with("table=30,priority=190")
                && t.contains("ip_dst=10.244.2.0/255.255.255.0")
                && t.ends_with("actions=set_field:0xac12000c->reg1,goto_table:40")),
            "{txt:#?}"
        );
        // The node's ARP for the remote gateway gets the virtual MAC.
        assert!(
            txt.iter().any(|t| t.contains("table=20")
                && t.contains("in_port=1")
                && t.contains("arp_tpa=10.244.2.1")
                && t.contains("set_field:aa:bb:cc:dd:ee:ff->arp_sha")),
            "{txt:#?}"
        );
        let tf: Vec<String> = tunnel_flows(5, &n, &t)
            .iter()
            .map(FlowMod::to_ofctl)
            .collect();
        assert!(
            tf.iter().any(|f| f.starts_with("table=40,priority=200")
                && f.ends_with(
                    "actions=set_field:0a:58:0a:f4:01:01->eth_src,set_field:aa:bb:cc:dd:ee:ff->eth_dst,\
                     dec_ttl,move:NXM_NX_REG1[0..31]->NXM_NX_TUN_IPV4_DST[0..31],\
                     set_field:0x0000000000000000->tun_id,output:10"
                )),
            "{tf:#?}"
        );
        assert!(
            tf.iter().any(|f| f.contains("table=0,priority=200")
                && f.contains("in_port=10")
                && f.ends_with("goto_table:25")),
            "{tf:#?}"
        );
        // Without a tunnel nothing leads to table 40 but its drop default.
        assert!(node_flows(5, &n).iter().all(|f| {
            f.instructions
                .iter()
                .all(|i| !matches!(i, Instruction::GotoTable(t) if *t == Table::TunnelOutput as u8))
        }));
    }

    #[test]
    fn pod_flows_read_as_intended() {
        let (n, p) = facts();
        let txt: Vec<String> = pod_flows(1, &n, &p).iter().map(FlowMod::to_ofctl).collect();
        assert!(
            txt.iter().any(|t| t.contains("table=10,priority=200")
                && t.contains(
                    "in_port=7,eth_src=0a:58:0a:f4:01:05,eth_type=0x0800,ip_src=10.244.1.5"
                )
                && t.ends_with("actions=goto_table:25")),
            "{txt:#?}"
        );
        assert!(txt.iter().any(|t| t.contains("table=30") && t.contains("ip_dst=10.244.1.5")
            && t.ends_with("set_field:0a:58:0a:f4:01:01->eth_src,set_field:0a:58:0a:f4:01:05->eth_dst,output:7")), "{txt:#?}");
        assert_eq!(
            counter_of(Table::SpoofGuard as u8, prio::SPOOF_DROP),
            Counter::DropSpoofed
        );
        assert_eq!(
            counter_of(Table::SpoofGuard as u8, prio::OTHER_DROP),
            Counter::DropOther
        );
        assert_eq!(
            counter_of(Table::L3Forwarding as u8, prio::POD),
            Counter::Rx
        );
        assert_eq!(
            counter_of(Table::ArpResponder as u8, prio::POD),
            Counter::None
        );
    }

    #[test]
    fn replies_of_connections_from_the_gateway_go_back_to_it() {
        let (n, p) = facts();
        let txt: Vec<String> = node_flows(1, &n).iter().map(FlowMod::to_ofctl).collect();
        // IPv4 from the gateway is committed with the mark, then routed.
        assert!(
            txt.iter().any(|f| f.starts_with("table=0,priority=200")
                && f.contains("in_port=1,eth_type=0x0800")
                && f.ends_with(
                    "actions=ct(commit,zone=65520,exec(set_field:0x00000001->ct_mark)),goto_table:30"
                )),
            "{txt:#?}"
        );
        // Packets for this node's pod CIDR are looked up (no commit); the rest go on.
        assert!(
            txt.iter().any(|f| f.starts_with("table=25,priority=200")
                && f.contains("ip_dst=10.244.1.0/255.255.255.0")
                && f.ends_with("actions=ct(table=30,zone=65520,nat)")),
            "{txt:#?}"
        );
        assert!(
            txt.iter()
                .any(|f| f.starts_with("table=25,priority=0")
                    && f.ends_with("actions=goto_table:30")),
            "{txt:#?}"
        );
        // A tracked reply of a marked connection goes to the gateway, above the pod flows.
        assert!(
            txt.iter().any(|f| f.starts_with("table=30,priority=210")
                && f.contains("ct_state=0x00000028/0x00000028,ct_mark=0x00000001")
                && f.ends_with("actions=set_field:0a:58:0a:f4:01:01->eth_dst,output:1")),
            "{txt:#?}"
        );
        const { assert!(prio::STACK_REPLY > prio::POD) };
        // Pods' admitted packets and the tunnel's go through the lookup table.
        let pf: Vec<String> = pod_flows(1, &n, &p).iter().map(FlowMod::to_ofctl).collect();
        assert!(
            pf.iter().any(|f| f.starts_with("table=10,priority=200")
                && f.contains("ip_src=10.244.1.5")
                && f.ends_with("actions=goto_table:25")),
            "{pf:#?}"
        );
        let rf: Vec<String> = remote_flows(1, &n, &remote())
            .iter()
            .map(FlowMod::to_ofctl)
            .collect();
        assert!(
            rf.iter().any(|f| f.starts_with("table=25,priority=190")
                && f.contains("ip_dst=10.244.2.0/255.255.255.0")
                && f.ends_with("actions=ct(table=30,zone=65520,nat)")),
            "{rf:#?}"
        );
    }

    fn egress_plan() -> crate::dataplane::EgressPlan {
        crate::dataplane::EgressPlan {
            steer: vec![
                crate::dataplane::EgressSteer {
                    pod_ip: "10.244.1.5".parse().unwrap(),
                    node_ip: "172.18.0.12".parse().unwrap(),
                    id: 7,
                },
                crate::dataplane::EgressSteer {
                    pod_ip: "10.244.1.6".parse().unwrap(),
                    node_ip: "172.18.0.13".parse().unwrap(),
                    id: 7,
                },
            ],
            exempt: vec![
                "10.244.0.0/16".parse().unwrap(),
                "10.96.0.0/12".parse().unwrap(),
                "172.18.0.12/32".parse().unwrap(),
            ],
            held: vec![9],
        }
    }

    #[test]
    fn egress_flows_steer_exempt_and_hold() {
        let (n, _) = facts();
        let t = TunnelFacts { port: 10, vni: 0 };
        let ef = egress_flows(6, &n, &t, &egress_plan());
        assert!(
            ef.iter()
                .all(|f| cookie::kind(f.cookie) == cookie::KIND_EGRESS
                    && cookie::round(f.cookie) == 6
                    && cookie::pod_ip(f.cookie).is_none())
        );
        let txt: Vec<String> = ef.iter().map(FlowMod::to_ofctl).collect();
        // Steer: the pod's packets select the egress node (172.18.0.12 = 0xac12000c) and the
        // id, then the shared output stage.
        assert!(
            txt.iter().any(|f| f.starts_with("table=30,priority=180")
                && f.contains("eth_type=0x0800,ip_src=10.244.1.5,")
                && f.ends_with(
                    "actions=set_field:0xac12000c->reg1,set_field:0x00000007->reg2,goto_table:40"
                )),
            "{txt:#?}"
        );
        assert!(
            txt.iter().any(|f| f.starts_with("table=30,priority=180")
                && f.contains("ip_src=10.244.1.6,")
                && f.ends_with(
                    "set_field:0xac12000d->reg1,set_field:0x00000007->reg2,goto_table:40"
                )),
            "{txt:#?}"
        );
        // One output flow per id (two pods share id 7), above the cluster's tunnel flow.
        let out: Vec<&String> = txt.iter().filter(|f| f.starts_with("table=40")).collect();
        assert_eq!(out.len(), 1, "{out:#?}");
        assert!(
            out[0].starts_with("table=40,priority=210")
                && out[0].contains("eth_type=0x0800,reg2=0x00000007,")
                && out[0].ends_with(
                    "actions=set_field:0a:58:0a:f4:01:01->eth_src,set_field:aa:bb:cc:dd:ee:ff->eth_dst,\
                     dec_ttl,move:NXM_NX_REG1[0..31]->NXM_NX_TUN_IPV4_DST[0..31],\
                     set_field:0x0000000000000007->tun_id,output:10"
                ),
            "{out:#?}"
        );
        // Exemptions (and the node's own pod CIDR) take the default's path, above the steer
        // flows and below local and remote pods.
        for net in [
            "ip_dst=10.244.0.0/255.255.0.0",
            "ip_dst=10.96.0.0/255.240.0.0",
            "ip_dst=172.18.0.12,",
            "ip_dst=10.244.1.0/255.255.255.0",
        ] {
            assert!(
                txt.iter().any(|f| f.starts_with("table=30,priority=185")
                    && f.contains(net)
                    && f.ends_with("actions=set_field:0a:58:0a:f4:01:01->eth_dst,output:1")),
                "{net}: {txt:#?}"
            );
        }
        const { assert!(prio::EGRESS_EXEMPT > prio::EGRESS_STEER) };
        const { assert!(prio::REMOTE > prio::EGRESS_EXEMPT && prio::POD > prio::REMOTE) };
        const { assert!(prio::EGRESS_TUNNEL > prio::TUNNEL) };
        // Held: the id's tunnelled packets go to the node's stack with the marker MAC.
        assert!(
            txt.iter().any(|f| f.starts_with("table=0,priority=200")
                && f.contains("in_port=10,tun_id=0x0000000000000009,eth_type=0x0800")
                && f.ends_with(
                    "actions=set_field:0a:fe:00:00:00:09->eth_src,set_field:0a:58:0a:f4:01:01->eth_dst,output:1"
                )),
            "{txt:#?}"
        );
        assert_eq!(txt.len(), 4 + 2 + 1 + 1, "{txt:#?}");
    }

    #[test]
    fn egress_flows_without_steered_pods_have_no_exemptions() {
        let (n, _) = facts();
        let t = TunnelFacts { port: 10, vni: 0 };
        assert!(egress_flows(1, &n, &t, &Default::default()).is_empty());
        let mut plan = egress_plan();
        plan.steer.clear();
        plan.held = vec![9, 3, 9];
        let txt: Vec<String> = egress_flows(1, &n, &t, &plan)
            .iter()
            .map(FlowMod::to_ofctl)
            .collect();
        assert_eq!(txt.len(), 2, "{txt:#?}");
        assert!(txt.iter().all(|f| f.starts_with("table=0,")), "{txt:#?}");
        assert!(txt[0].contains("tun_id=0x0000000000000003"), "{txt:#?}");
    }
}
