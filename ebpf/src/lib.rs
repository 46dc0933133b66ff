//! ferrea's kernel-side packet path: two TC classifiers attached to every pod's host-side veth.
//!
//! There is no bridge. Each pod reaches the node through its own veth pair, and the node is
//! every pod's router (Calico/Cilium style):
//!
//! - [`ferrea_from_pod`] runs on TC ingress of the host-side veth, i.e. on every frame the pod
//!   sends. It answers the pod's ARP requests itself (the host veth's MAC for every target but
//!   the pod's own address), drops frames whose source IP or MAC is not the pod's (spoof guard),
//!   hands frames for another local pod straight into that pod's namespace with
//!   `bpf_redirect_peer` (skipping the node's stack), frames for another node's pod straight to
//!   the tunnel device, and lets everything else IPv4 continue into the node's stack, which
//!   routes it to the node or out of it.
//! - [`ferrea_to_pod`] runs on TC egress of the host-side veth and only counts what the node's
//!   stack delivers to the pod.
//!
//! - [`ferrea_to_tunnel`] runs on TC egress of the tunnel device (`ferrea-tun0`, a VXLAN or
//!   Geneve device in external mode) and sets each packet's outer destination: the node that
//!   holds the destination's pod CIDR, looked up in an LPM map.
//! - [`ferrea_from_tunnel`] runs on TC ingress of the tunnel device and delivers decapsulated
//!   packets for local pods straight into their namespace; the rest (for the node itself) is
//!   marked for the host and goes up the stack.
//!
//! Egress (see `EgressPlan` in the agent): a local pod whose Egress IP another node holds is
//! *steered*: [`ferrea_from_pod`] sends its packets for destinations that are neither pods nor
//! exempt (cluster CIDRs, services, nodes) to the tunnel device, and [`ferrea_to_tunnel`] sets
//! the egress node as outer destination and the Egress id as VNI. On the egress node,
//! [`ferrea_from_tunnel`] reads the VNI: 0 is ordinary overlay traffic; an id the node holds
//! becomes the packet's fwmark (upper 16 bits) and the packet goes to the node's stack, whose
//! policy routing and SNAT by mark (the agent core's) send it out with the Egress IP; any other
//! id is dropped, so a stale assignment never lets a pod address leave un-NATed. The steered
//! packet itself carries no mark: the VXLAN device's route lookup for the outer header uses
//! `skb->mark`, and the egress rule must not apply on the sending node.
//!
//! Services beside kube-proxy: kube-proxy (iptables, ipvs or nftables) DNATs a Service's
//! packets in the node's stack, and only the stack's conntrack can undo that on the replies.
//! A reply that took a fast path (redirect_peer, or straight into the tunnel) would reach the
//! client from the backend's address, which the client never called. So the programs keep an
//! LRU map of connections the stack carried (`FERREA_STACK_CT`, [`ferrea_common::StackFlow`]
//! keys, [`ferrea_common::MAX_STACK_FLOWS`] entries), filled from the two places only
//! stack-routed packets pass:
//!
//! - [`ferrea_to_pod`] (TC egress of the host veth; `bpf_redirect_peer` skips it): a packet
//!   the stack delivers to a pod from a pod address records its reversed 5-tuple;
//! - [`ferrea_to_tunnel`], for packets from a local pod's address that the stack (not
//!   [`ferrea_from_pod`]'s own redirect, which tags the skb's `tc_index`) routed into the
//!   tunnel: the request of a Service connection whose backend is on another node.
//!
//! [`ferrea_from_pod`] and [`ferrea_from_tunnel`] look a packet's own tuple up only when it is
//! about to take a fast path (its destination is a pod), and a hit sends it to the stack
//! (`TC_ACT_OK`), whose conntrack un-NATs it and routes it on. Un-NATed pod-to-pod traffic pays
//! one LRU lookup per packet and a delete per TCP SYN: a SYN that takes the fast path starts a
//! connection whose replies must take it too, so it removes any record of its reply tuple (and
//! of its own) that a closed stack-carried connection with the same ports left behind.
//! Nothing else ever removes entries but LRU eviction; the map is pinned and adopted across
//! agent restarts. A stale entry can only send a packet the slow way, through the stack, which
//! routes pod-to-pod traffic too. IP fragments (no ports to match) and ICMP errors always go
//! the slow way. Node-wide counters of this path are in `FERREA_SVC_CNT` (the `SVC_*` slots).
//! The alternative, asking the kernel's conntrack (`bpf_skb_ct_lookup`) whether a reply was
//! NATed, needs kfunc declarations that aya-ebpf 0.2.1 does not offer (and that bpf-linker's
//! BTF output would have to carry); it was not pursued. The map costs less per packet than a
//! conntrack lookup and needs nothing of the kernel beyond LRU hash maps.
//!
//! ferrea's own service proxy (`serviceProxy: ferrea`) lives in `lb.rs`: [`ferrea_from_pod`]
//! load-balances a pod's connections to Service VIPs (connection table `FERREA_LB_CT`,
//! frontends `FERREA_LB_SVC`) before its forwarding decision, and the replies get their VIP back
//! in [`ferrea_from_pod`] (same node), [`ferrea_from_tunnel`] (backend on another node) or
//! [`ferrea_to_pod`] (routed by the stack). Connections it translated skip the stack-flow check.
//!
//! - [`ferrea_vlan_rx`] and [`ferrea_vlan_tx`] are not part of the pod path: they make a
//!   macvlan behave like an 802.1Q sub-interface on kernels without VLAN devices (see
//!   `agent/src/vlan.rs`). They are linked into a second object with their own unpinned maps.
//!
//! The maps are pinned by name so that a restarted agent adopts them; their layouts live in
//! `ferrea-common` and are shared with the agent.
//!
//! Built for the host target as LTO bitcode and linked into one BPF object by bpf-linker (see
//! `agent/build.rs`); hence `no_std`, `no_main` and a panic handler that cannot be reached.
#![no_std]
#![no_main]
#![expect(
    unsafe_code,
    reason = "BPF programs read and write packet memory through raw pointers, call kernel \
              helpers and access maps, all of which aya-ebpf exposes as unsafe; every block \
              says why it is sound in its SAFETY comment"
)]

mod lb;

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_F_ZERO_CSUM_TX, TC_ACT_OK, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::{
        bpf_redirect, bpf_redirect_peer, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
        bpf_skb_vlan_pop, bpf_skb_vlan_push,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::TcContext,
};
use ferrea_common::{
    Counters, EGRESS_ID_MAX, EGRESS_MARK_MASK, EGRESS_MARK_SHIFT, EgressSteer, Endpoint,
    LB_CNT_REVERSE_STACK, LB_CNT_REVERSE_TUNNEL, MAX_EGRESS_EXEMPT, MAX_EGRESS_HELD, MAX_NODES,
    MAX_PODS, MAX_STACK_FLOWS, MAX_VLANS, RemoteNode, SVC_COUNTER_SLOTS, SVC_RECORDED_POD,
    SVC_RECORDED_TUNNEL, SVC_REPLY_FROM_POD, SVC_REPLY_FROM_TUNNEL, SVC_STACK_TO_POD,
    SVC_STALE_CLEARED, SVC_UNMATCHABLE, StackFlow, VlanChild, VlanKey,
};

/// Local endpoints keyed by host-side veth ifindex: who is sending on this interface.
#[map(name = "FERREA_EP_IF")]
static FERREA_EP_IF: HashMap<u32, Endpoint> = HashMap::pinned(MAX_PODS, 0);

/// Local endpoints keyed by IPv4 address (network byte order): is the destination a local pod.
#[map(name = "FERREA_EP_IP")]
static FERREA_EP_IP: HashMap<u32, Endpoint> = HashMap::pinned(MAX_PODS, 0);

/// Per-pod counters keyed by host-side veth ifindex, one slot per CPU (no atomics needed).
#[map(name = "FERREA_POD_CNT")]
static FERREA_COUNTERS: PerCpuHashMap<u32, Counters> = PerCpuHashMap::pinned(MAX_PODS, 0);

/// Other nodes' pod CIDRs (IPv4 network, network byte order) to the node holding them.
#[map(name = "FERREA_REMOTE")]
static FERREA_REMOTE: LpmTrie<u32, RemoteNode> = LpmTrie::pinned(MAX_NODES, 1); // BPF_F_NO_PREALLOC

/// Local pods steered to another node for Egress, keyed by the pod's IPv4 address.
#[map(name = "FERREA_EG_STEER")]
static FERREA_EG_STEER: HashMap<u32, EgressSteer> = HashMap::pinned(MAX_PODS, 0);

/// Destinations never steered (cluster pod CIDRs, service CIDR, node addresses).
#[map(name = "FERREA_EG_EXEMPT")]
static FERREA_EG_EXEMPT: LpmTrie<u32, u32> = LpmTrie::pinned(MAX_EGRESS_EXEMPT, 1); // BPF_F_NO_PREALLOC

/// Egress ids this node holds the IP of: key = id, present (value non-zero) = held.
#[map(name = "FERREA_EG_IDS")]
static FERREA_EG_HELD: HashMap<u32, u32> = HashMap::pinned(MAX_EGRESS_HELD, 0);

/// Connections the node's stack carried, by the tuple their replies carry (see "Services
/// beside kube-proxy" below). LRU: a full map evicts the least recently used entry.
#[map(name = "FERREA_STACK_CT")]
static FERREA_STACK_CT: LruHashMap<StackFlow, u32> = LruHashMap::pinned(MAX_STACK_FLOWS, 0);

/// Node-wide counters of the stack-flow path, one slot per `SVC_*` index and CPU.
#[map(name = "FERREA_SVC_CNT")]
static FERREA_SVC_CNT: PerCpuArray<u64> = PerCpuArray::pinned(SVC_COUNTER_SLOTS, 0);

/// VLAN tagger: (parent ifindex, VLAN id) to the child (macvlan) ifindex. Not pinned: the
/// tagger's object is loaded fresh by every agent process.
#[map(name = "FERREA_VLAN_PAR")]
static FERREA_VLAN_PAR: HashMap<VlanKey, VlanChild> = HashMap::with_max_entries(MAX_VLANS, 0);

/// VLAN tagger: child ifindex to its VLAN id.
#[map(name = "FERREA_VLAN_CHD")]
static FERREA_VLAN_CHD: HashMap<u32, u32> = HashMap::with_max_entries(MAX_VLANS, 0);

const ETH_HLEN: usize = 14;
/// `ETH_P_8021Q`: the TPID of pushed VLAN tags.
const ETH_P_8021Q: u16 = 0x8100;
/// The VLAN id bits of a TCI.
const VLAN_VID_MASK: u32 = 0x0fff;
/// `skb->pkt_type` for packets addressed to this host.
const PACKET_HOST: u32 = 0;
/// TTL of the outer header.
const TUNNEL_TTL: u8 = 64;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ARP_HLEN: usize = 28;
const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;

// Offsets inside the frame. Ethernet: dst(0..6) src(6..12) proto(12..14).
const OFF_ETH_DST: usize = 0;
const OFF_ETH_SRC: usize = 6;
const OFF_ETH_PROTO: usize = 12;
// IPv4 header fields (the header starts at ETH_HLEN; options do not move these).
const OFF_IP_SRC: usize = ETH_HLEN + 12;
const OFF_IP_DST: usize = ETH_HLEN + 16;
// ARP for Ethernet/IPv4: htype ptype hlen plen oper sha spa tha tpa.
const OFF_ARP_OP: usize = ETH_HLEN + 6;
const OFF_ARP_SHA: usize = ETH_HLEN + 8;
const OFF_ARP_SPA: usize = ETH_HLEN + 14;
const OFF_ARP_THA: usize = ETH_HLEN + 18;
const OFF_ARP_TPA: usize = ETH_HLEN + 24;

// IPv4 header fields used to find the transport ports.
const OFF_IP_VHL: usize = ETH_HLEN;
const OFF_IP_FRAG: usize = ETH_HLEN + 6;
const OFF_IP_PROTO: usize = ETH_HLEN + 9;
/// Version 4, header length 5 words: no options, the transport header at a fixed offset.
const IP_VHL_PLAIN: u8 = 0x45;
/// More-fragments flag and fragment offset bits of the IPv4 `frag_off` field.
const IP_FRAG_MASK: u16 = 0x3fff;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
/// TCP flags byte: SYN and ACK.
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// `tc_index` that [`ferrea_from_pod`] gives the packets it redirects into the tunnel itself,
/// so that [`ferrea_to_tunnel`] tells them from packets the node's stack routed there. Nothing
/// else in the node sets `tc_index` (no classful qdisc uses it); the tunnel program resets it.
const TC_INDEX_FAST_PATH: u32 = 0xfe11;

/// What the stack-flow map can say about a packet.
enum Flow {
    /// Its 5-tuple; `syn`: a TCP SYN without ACK (a new connection).
    Tuple(StackFlow, bool),
    /// No ports to match (a fragment, an ICMP error): always the slow way.
    Unmatchable,
}

/// Loads a `T` at `off` in the transport header, wherever the IP header ends. Direct packet
/// access for the common header without options; the load helper otherwise.
#[inline(always)]
fn l4_load<T: Copy>(ctx: &TcContext, vhl: u8, off: usize) -> Option<T> {
    if vhl == IP_VHL_PLAIN {
        let p: *mut T = ptr_at(ctx, ETH_HLEN + 20 + off)?;
        // SAFETY: bound-checked by ptr_at.
        return Some(unsafe { p.read_unaligned() });
    }
    ctx.load::<T>(ETH_HLEN + usize::from(vhl & 0x0f) * 4 + off)
        .ok()
}

#[inline(always)]
fn load_u8(ctx: &TcContext, off: usize) -> Option<u8> {
    let p: *mut u8 = ptr_at(ctx, off)?;
    // SAFETY: bound-checked by ptr_at.
    unsafe { Some(p.read()) }
}

/// The 5-tuple of an IPv4 packet from `saddr` to `daddr`.
#[inline(always)]
fn flow_of(ctx: &TcContext, saddr: u32, daddr: u32) -> Option<Flow> {
    let vhl = load_u8(ctx, OFF_IP_VHL)?;
    if u16::from_be(load_u16(ctx, OFF_IP_FRAG)?) & IP_FRAG_MASK != 0 {
        return Some(Flow::Unmatchable);
    }
    let proto = load_u8(ctx, OFF_IP_PROTO)?;
    let mut key = StackFlow {
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        proto,
        pad: [0; 3],
    };
    let mut syn = false;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let ports: [u16; 2] = l4_load(ctx, vhl, 0)?;
            key.sport = ports[0];
            key.dport = ports[1];
            if proto == IPPROTO_TCP {
                let flags: u8 = l4_load(ctx, vhl, 13)?;
                syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            }
        }
        IPPROTO_ICMP => {
            // Echo and the like match by addresses; errors quote another packet's tuple.
            let ty: u8 = l4_load(ctx, vhl, 0)?;
            if matches!(ty, 3 | 4 | 5 | 11 | 12) {
                return Some(Flow::Unmatchable);
            }
        }
        _ => {}
    }
    Some(Flow::Tuple(key, syn))
}

#[inline(always)]
pub(crate) fn reversed(k: &StackFlow) -> StackFlow {
    StackFlow {
        saddr: k.daddr,
        daddr: k.saddr,
        sport: k.dport,
        dport: k.sport,
        proto: k.proto,
        pad: [0; 3],
    }
}

/// Adds one to a node-wide stack-flow counter on this CPU.
#[inline(always)]
fn svc_count(slot: u32) {
    if let Some(c) = FERREA_SVC_CNT.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot; TC programs run with migration disabled, so no other program
        // instance writes this CPU's slot at the same time.
        unsafe { *c += 1 };
    }
}

/// A packet about to take a fast path: must it go to the node's stack instead, because it
/// belongs to a connection the stack carried (and may have NATed)? `slot` counts the hits.
#[inline(always)]
fn stack_reply(ctx: &TcContext, saddr: u32, daddr: u32, slot: u32) -> Option<bool> {
    match flow_of(ctx, saddr, daddr)? {
        Flow::Unmatchable => {
            svc_count(SVC_UNMATCHABLE);
            Some(true)
        }
        Flow::Tuple(k, true) => {
            // A new connection on the fast path: its replies take it too. Forget what a closed
            // stack-carried connection with the same tuple left behind.
            let stale = FERREA_STACK_CT.remove(reversed(&k)).is_ok();
            if FERREA_STACK_CT.remove(k).is_ok() || stale {
                svc_count(SVC_STALE_CLEARED);
            }
            Some(false)
        }
        Flow::Tuple(k, false) => {
            if FERREA_STACK_CT.get_ptr(k).is_some() {
                svc_count(slot);
                return Some(true);
            }
            Some(false)
        }
    }
}

/// Records that the stack carried this packet from `saddr` to `daddr`: its replies must go
/// back through the stack. Inserts only what is missing (a lookup refreshes the LRU position).
#[inline(always)]
fn record_stack_flow(ctx: &TcContext, saddr: u32, daddr: u32, slot: u32) -> Option<()> {
    if let Flow::Tuple(k, _) = flow_of(ctx, saddr, daddr)? {
        let r = reversed(&k);
        if FERREA_STACK_CT.get_ptr(r).is_none() {
            // A full map evicts its least recently used entry; an error loses one record,
            // which the connection's next stack-carried packet makes again.
            let _ = FERREA_STACK_CT.insert(r, 0, 0);
        }
        svc_count(slot);
    }
    Some(())
}

/// The skb's `tc_index` (a context access the verifier rewrites to `skb->tc_index`).
#[inline(always)]
fn tc_index(ctx: &TcContext) -> u32 {
    // SAFETY: context read; volatile so that it is one whole-field load.
    unsafe { core::ptr::addr_of!((*ctx.skb.skb).tc_index).read_volatile() }
}

#[inline(always)]
fn set_tc_index(ctx: &TcContext, v: u32) {
    // SAFETY: context write the verifier allows for TC programs; volatile and 32 bits wide
    // because the verifier accepts only whole-field writes.
    unsafe { core::ptr::addr_of_mut!((*ctx.skb.skb).tc_index).write_volatile(v) }
}

/// Which direction a packet is counted in.
#[derive(Clone, Copy)]
enum Dir {
    Tx,
    Rx,
    Spoofed,
    Arp,
    /// A frame of a protocol the pod network does not carry (IPv6, ...).
    Other,
}

/// Returns a pointer to a `T` at `off` in the linear packet data, or `None` if the packet is
/// shorter. The explicit bound check against `data_end` is what lets the verifier accept the
/// later direct access.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Reads a MAC at `off`. Two loads instead of a 6-byte array compare, so LLVM does not emit a
/// `bcmp` call.
#[inline(always)]
fn load_mac(ctx: &TcContext, off: usize) -> Option<(u32, u16)> {
    let a: *mut u32 = ptr_at(ctx, off)?;
    let b: *mut u16 = ptr_at(ctx, off + 4)?;
    // SAFETY: both pointers were bound-checked against data_end by ptr_at; unaligned reads
    // because the frame is only 2-byte aligned.
    unsafe { Some((a.read_unaligned(), b.read_unaligned())) }
}

#[inline(always)]
fn mac_parts(mac: &[u8; 6]) -> (u32, u16) {
    (
        u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]),
        u16::from_ne_bytes([mac[4], mac[5]]),
    )
}

/// Writes a MAC at `off` (the caller has bound-checked the range).
#[inline(always)]
fn store_mac(ctx: &TcContext, off: usize, mac: &[u8; 6]) -> Option<()> {
    let (a, b) = mac_parts(mac);
    let pa: *mut u32 = ptr_at(ctx, off)?;
    let pb: *mut u16 = ptr_at(ctx, off + 4)?;
    // SAFETY: bound-checked by ptr_at; TC programs may write packet data directly (the kernel
    // unclones the skb in the program prologue when the program writes).
    unsafe {
        pa.write_unaligned(a);
        pb.write_unaligned(b);
    }
    Some(())
}

#[inline(always)]
fn load_u32(ctx: &TcContext, off: usize) -> Option<u32> {
    let p: *mut u32 = ptr_at(ctx, off)?;
    // SAFETY: bound-checked by ptr_at.
    unsafe { Some(p.read_unaligned()) }
}

#[inline(always)]
fn store_u32(ctx: &TcContext, off: usize, v: u32) -> Option<()> {
    let p: *mut u32 = ptr_at(ctx, off)?;
    // SAFETY: bound-checked by ptr_at; direct packet writes are allowed in TC programs.
    unsafe { p.write_unaligned(v) };
    Some(())
}

/// Adds one packet of `len` bytes to the counters of `ifindex` on this CPU.
#[inline(always)]
fn count(ifindex: u32, dir: Dir, len: u32) {
    let len = u64::from(len);
    match FERREA_COUNTERS.get_ptr_mut(ifindex) {
        Some(c) => {
            // SAFETY: per-CPU value; no other program instance runs on this CPU's slot at the
            // same time (TC programs run with preemption/migration disabled).
            let c = unsafe { &mut *c };
            match dir {
                Dir::Tx => {
                    c.tx_packets += 1;
                    c.tx_bytes += len;
                }
                Dir::Rx => {
                    c.rx_packets += 1;
                    c.rx_bytes += len;
                }
                Dir::Spoofed => c.drop_spoofed += 1,
                Dir::Arp => c.arp_replies += 1,
                Dir::Other => c.drop_other += 1,
            }
        }
        None => {
            // The agent creates the entry with the endpoint; recreate it if it was removed
            // concurrently. Losing this one increment in a race is acceptable.
            let mut c = Counters::default();
            match dir {
                Dir::Tx => {
                    c.tx_packets = 1;
                    c.tx_bytes = len;
                }
                Dir::Rx => {
                    c.rx_packets = 1;
                    c.rx_bytes = len;
                }
                Dir::Spoofed => c.drop_spoofed = 1,
                Dir::Arp => c.arp_replies = 1,
                Dir::Other => c.drop_other = 1,
            }
            let _ = FERREA_COUNTERS.insert(ifindex, c, 0);
        }
    }
}

/// The ifindex of the device the skb is on (at TC ingress of the host veth: that veth).
#[inline(always)]
fn skb_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: ctx.skb.skb is the __sk_buff the kernel passed to this program; reading its
    // ifindex field is a context access the verifier rewrites to skb->dev->ifindex.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// `ferreactl trace`: the decision of each program for the one packet the agent runs through
/// it with `BPF_PROG_TEST_RUN` and `skb->mark` = [`ferrea_common::TRACE_MARK`] (see
/// [`ferrea_common::MAP_TRACE`]). Real traffic pays one context load and compare per verdict
/// and writes nothing. Pinned like every map, so pinned programs adopted by a restarted agent
/// and the agent's handle are the same map.
#[map(name = "FERREA_TRACE")]
static FERREA_TRACE: Array<ferrea_common::TraceRecord> = Array::pinned(1, 0);

/// Whether this is the agent's traced packet.
#[inline(always)]
fn traced(ctx: &TcContext) -> bool {
    // SAFETY: a context read the verifier rewrites to skb->mark.
    unsafe { (*ctx.skb.skb).mark == ferrea_common::TRACE_MARK }
}

/// Records `verdict` (a `ferrea_common::TRACE_*`) for a traced packet; nothing otherwise.
#[inline(always)]
fn trace(ctx: &TcContext, verdict: u32, ifindex: u32, node_ip: u32, id: u32) {
    if !traced(ctx) {
        return;
    }
    if let Some(r) = FERREA_TRACE.get_ptr_mut(0) {
        // SAFETY: the map's only slot, valid for this run; only traced runs write it, and the
        // agent runs one trace at a time.
        unsafe {
            *r = ferrea_common::TraceRecord {
                verdict,
                ifindex,
                node_ip,
                id,
            }
        };
    }
}

/// TC ingress of a pod's host-side veth: every frame the pod sends.
#[classifier]
pub fn ferrea_from_pod(ctx: TcContext) -> i32 {
    match from_pod(&ctx) {
        Some(action) => action,
        // Truncated frames and frames from interfaces without an endpoint.
        None => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn from_pod(ctx: &TcContext) -> Option<i32> {
    let ifindex = skb_ifindex(ctx);
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    let ep = *unsafe { FERREA_EP_IF.get(ifindex) }?;
    let proto = u16::from_be(load_u16(ctx, OFF_ETH_PROTO)?);
    if proto == ETH_P_ARP {
        return arp(ctx, &ep);
    }
    if proto != ETH_P_IP {
        // IPv6 and everything else: not part of ferrea's IPv4-only pod network yet.
        count(ifindex, Dir::Other, 0);
        return Some(TC_ACT_SHOT);
    }
    let src_mac = load_mac(ctx, OFF_ETH_SRC)?;
    let src_ip = load_u32(ctx, OFF_IP_SRC)?;
    if src_ip != ep.ipv4 || src_mac != mac_parts(&ep.pod_mac) {
        count(ifindex, Dir::Spoofed, 0);
        trace(ctx, ferrea_common::TRACE_SPOOFED, 0, 0, 0);
        return Some(TC_ACT_SHOT);
    }
    let dst_ip = load_u32(ctx, OFF_IP_DST)?;
    let len = ctx.len();
    // The service proxy (lb.rs): replies of load-balanced connections get their VIP back,
    // packets for a VIP their backend; `nat`: translated, so no connection the stack carried.
    let (dst_ip, local, nat) = match lb::from_pod(ctx, src_ip, dst_ip)? {
        lb::Routed::Route { dst_ip, local, nat } => (dst_ip, local, nat),
        lb::Routed::Stack => {
            count(ifindex, Dir::Tx, len);
            trace(ctx, ferrea_common::TRACE_TO_STACK, 0, 0, 0);
            return Some(TC_ACT_OK);
        }
    };
    // SAFETY: a pointer into FERREA_EP_IP, valid for this program run; copied out at once (the
    // agent replaces entries whole).
    if let Some(dst) = local.map(|p| unsafe { *p }) {
        if !nat && stack_reply(ctx, src_ip, dst_ip, SVC_REPLY_FROM_POD)? {
            count(ifindex, Dir::Tx, len);
            trace(ctx, ferrea_common::TRACE_STACK_FLOW, dst.ifindex, 0, 0);
            return Some(TC_ACT_OK);
        }
        // Local pod: we are its router, so the frame leaves us from its gateway MAC to its MAC.
        store_mac(ctx, OFF_ETH_SRC, &dst.host_mac)?;
        store_mac(ctx, OFF_ETH_DST, &dst.pod_mac)?;
        count(ifindex, Dir::Tx, len);
        count(dst.ifindex, Dir::Rx, len);
        trace(ctx, ferrea_common::TRACE_TO_POD, dst.ifindex, 0, 0);
        // SAFETY: plain helper call; ingress of a veth is where redirect_peer is valid, and it
        // delivers into the destination pod's namespace without another pass through ours.
        return Some(unsafe { bpf_redirect_peer(dst.ifindex, 0) } as i32);
    }
    count(ifindex, Dir::Tx, len);
    // Another node's pod: straight to the tunnel device, whose egress program sets the outer
    // destination (skipping the node's forwarding path, as for local pods).
    if let Some(node) = FERREA_REMOTE.get(Key::new(32, dst_ip))
        && node.tun_ifindex != 0
    {
        let tun = node.tun_ifindex;
        if !nat && stack_reply(ctx, src_ip, dst_ip, SVC_REPLY_FROM_POD)? {
            trace(ctx, ferrea_common::TRACE_STACK_FLOW, 0, node.node_ip, 0);
            return Some(TC_ACT_OK);
        }
        store_mac(ctx, OFF_ETH_SRC, &ep.host_mac)?;
        set_tc_index(ctx, TC_INDEX_FAST_PATH);
        trace(
            ctx,
            ferrea_common::TRACE_TO_NODE,
            tun,
            node.node_ip,
            node.vni,
        );
        // SAFETY: plain helper call; flags 0 = out of the tunnel device's egress.
        return Some(unsafe { bpf_redirect(tun, 0) } as i32);
    }
    // Egress: only here, on the way to the node's stack, does a packet pay for the steering
    // lookup; the exempt lookup only for steered pods.
    if let Some(steer) = FERREA_EG_STEER.get_ptr(src_ip)
        && FERREA_EG_EXEMPT.get(Key::new(32, dst_ip)).is_none()
    {
        // SAFETY: the pointer is valid for this program run; the agent replaces entries whole.
        let tun = unsafe { (*steer).tun_ifindex };
        if tun != 0 {
            store_mac(ctx, OFF_ETH_SRC, &ep.host_mac)?;
            // SAFETY: as above.
            let (node_ip, id) = unsafe { ((*steer).node_ip, (*steer).id) };
            trace(ctx, ferrea_common::TRACE_EGRESS_STEER, tun, node_ip, id);
            // SAFETY: plain helper call; flags 0 = out of the tunnel device's egress.
            return Some(unsafe { bpf_redirect(tun, 0) } as i32);
        }
    }
    trace(ctx, ferrea_common::TRACE_TO_STACK, 0, 0, 0);
    Some(TC_ACT_OK)
}

#[inline(always)]
fn load_u16(ctx: &TcContext, off: usize) -> Option<u16> {
    let p: *mut u16 = ptr_at(ctx, off)?;
    // SAFETY: bound-checked by ptr_at.
    unsafe { Some(p.read_unaligned()) }
}

/// Answers an ARP request from the pod in place and sends it back out the same veth.
#[inline(always)]
fn arp(ctx: &TcContext, ep: &Endpoint) -> Option<i32> {
    // Bound-check the whole ARP header once.
    let _: *mut [u8; ARP_HLEN] = ptr_at(ctx, ETH_HLEN)?;
    let op = u16::from_be(load_u16(ctx, OFF_ARP_OP)?);
    let sha = load_mac(ctx, OFF_ARP_SHA)?;
    let spa = load_u32(ctx, OFF_ARP_SPA)?;
    let tpa = load_u32(ctx, OFF_ARP_TPA)?;
    let eth_src = load_mac(ctx, OFF_ETH_SRC)?;
    let pod_mac = mac_parts(&ep.pod_mac);
    if spa != ep.ipv4 || sha != pod_mac || eth_src != pod_mac {
        // An ARP claiming another address (or a DAD probe from 0.0.0.0): spoofing.
        count(ep.ifindex, Dir::Spoofed, 0);
        return Some(TC_ACT_SHOT);
    }
    if op != ARPOP_REQUEST || tpa == ep.ipv4 {
        // Replies and gratuitous ARP: nobody on the node needs them (neighbours are static).
        return Some(TC_ACT_SHOT);
    }
    // Turn the request into the reply: "tpa is at host_mac", addressed to the pod.
    let opp: *mut u16 = ptr_at(ctx, OFF_ARP_OP)?;
    // SAFETY: bound-checked by ptr_at.
    unsafe { opp.write_unaligned(ARPOP_REPLY.to_be()) };
    store_mac(ctx, OFF_ARP_THA, &ep.pod_mac)?;
    store_u32(ctx, OFF_ARP_TPA, spa)?;
    store_mac(ctx, OFF_ARP_SHA, &ep.host_mac)?;
    store_u32(ctx, OFF_ARP_SPA, tpa)?;
    store_mac(ctx, OFF_ETH_DST, &ep.pod_mac)?;
    store_mac(ctx, OFF_ETH_SRC, &ep.host_mac)?;
    count(ep.ifindex, Dir::Arp, 0);
    // SAFETY: plain helper call; flags 0 = out of the device's egress, i.e. back to the pod.
    Some(unsafe { bpf_redirect(ep.ifindex, 0) } as i32)
}

/// TC egress of a pod's host-side veth: what the node's stack delivers to the pod (frames
/// redirected by [`ferrea_from_pod`] and [`ferrea_from_tunnel`] skip this hook). Counts, and
/// records connections from pod addresses so that their replies go back through the stack.
#[classifier]
pub fn ferrea_to_pod(ctx: TcContext) -> i32 {
    count(skb_ifindex(&ctx), Dir::Rx, ctx.len());
    svc_count(SVC_STACK_TO_POD);
    // A reply of a load-balanced connection the stack routed (noEncap, or a backend that is
    // no pod) gets its VIP back first; it is then from no pod address, so not recorded.
    let _ = stack_delivered_reply(&ctx);
    let _ = record_to_pod(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn stack_delivered_reply(ctx: &TcContext) -> Option<bool> {
    if u16::from_be(load_u16(ctx, OFF_ETH_PROTO)?) != ETH_P_IP {
        return None;
    }
    let src_ip = load_u32(ctx, OFF_IP_SRC)?;
    let dst_ip = load_u32(ctx, OFF_IP_DST)?;
    lb::reply(ctx, src_ip, dst_ip, LB_CNT_REVERSE_STACK)
}

#[inline(always)]
fn record_to_pod(ctx: &TcContext) -> Option<()> {
    if u16::from_be(load_u16(ctx, OFF_ETH_PROTO)?) != ETH_P_IP {
        return None;
    }
    let src_ip = load_u32(ctx, OFF_IP_SRC)?;
    // Only a reply to a pod address could take a fast path; replies to the node or the world
    // go to the stack anyway.
    // SAFETY: only tested for presence.
    let from_pod = unsafe { FERREA_EP_IP.get(src_ip) }.is_some()
        || FERREA_REMOTE.get(Key::new(32, src_ip)).is_some();
    if !from_pod {
        return None;
    }
    let dst_ip = load_u32(ctx, OFF_IP_DST)?;
    record_stack_flow(ctx, src_ip, dst_ip, SVC_RECORDED_POD)
}

/// TC egress of the tunnel device: every packet the node routes to another node's pods (from
/// a local pod or from the node itself). Sets the outer destination; drops what no node holds.
#[classifier]
pub fn ferrea_to_tunnel(ctx: TcContext) -> i32 {
    to_tunnel(&ctx).unwrap_or(TC_ACT_SHOT)
}

#[inline(always)]
fn to_tunnel(ctx: &TcContext) -> Option<i32> {
    if u16::from_be(load_u16(ctx, OFF_ETH_PROTO)?) != ETH_P_IP {
        return Some(TC_ACT_SHOT);
    }
    let dst_ip = load_u32(ctx, OFF_IP_DST)?;
    let (node_ip, vni) = match FERREA_REMOTE.get(Key::new(32, dst_ip)) {
        Some(node) => {
            // A traced packet stands for one `ferrea_from_pod` redirected (the test run
            // cannot set tc_index): it must not record a stack flow.
            if tc_index(ctx) == TC_INDEX_FAST_PATH || traced(ctx) {
                set_tc_index(ctx, 0);
            } else {
                // Routed here by the node's stack: from a local pod, a Service connection
                // (say) whose backend is another node's pod. Its replies come back through
                // the tunnel and must go through the stack too.
                let src_ip = load_u32(ctx, OFF_IP_SRC)?;
                // SAFETY: only tested for presence.
                if unsafe { FERREA_EP_IP.get(src_ip) }.is_some() {
                    record_stack_flow(ctx, src_ip, dst_ip, SVC_RECORDED_TUNNEL)?;
                }
            }
            (node.node_ip, node.vni)
        }
        None => {
            // Not another node's pod: a steered pod's egress traffic, or nothing we carry.
            let src_ip = load_u32(ctx, OFF_IP_SRC)?;
            // SAFETY: copied out at once; the agent replaces entries whole.
            let steer = *unsafe { FERREA_EG_STEER.get(src_ip) }?;
            if FERREA_EG_EXEMPT.get(Key::new(32, dst_ip)).is_some() {
                return None;
            }
            (steer.node_ip, steer.id)
        }
    };
    // SAFETY: bpf_tunnel_key is plain old data; all-zero is its "unset" value.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be(node_ip);
    key.tunnel_ttl = TUNNEL_TTL;
    // Outer UDP checksum zero, as RFC 7348 recommends for VXLAN over IPv4 (the inner packet
    // carries its own); the receiver's VXLAN socket accepts it.
    // SAFETY: plain helper call on the program's own skb with a key of the size passed.
    let r = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            BPF_F_ZERO_CSUM_TX as u64,
        )
    };
    if r != 0 {
        return Some(TC_ACT_SHOT);
    }
    trace(ctx, ferrea_common::TRACE_TUNNEL_KEY, 0, node_ip, vni);
    Some(TC_ACT_OK)
}

/// TC ingress of the tunnel device: every decapsulated packet from another node.
#[classifier]
pub fn ferrea_from_tunnel(ctx: TcContext) -> i32 {
    from_tunnel(&ctx).unwrap_or(TC_ACT_SHOT)
}

#[inline(always)]
fn from_tunnel(ctx: &TcContext) -> Option<i32> {
    if u16::from_be(load_u16(ctx, OFF_ETH_PROTO)?) != ETH_P_IP {
        return Some(TC_ACT_SHOT);
    }
    let dst_ip = load_u32(ctx, OFF_IP_DST)?;
    // Local pods first, whatever the VNI: the overlay's hot path costs one map lookup, as
    // before Egress. (A steered packet is for an address outside the cluster, never a pod.)
    // SAFETY: copied out at once; the agent replaces entries whole.
    if let Some(dst) = unsafe { FERREA_EP_IP.get(dst_ip) }.copied() {
        let src_ip = load_u32(ctx, OFF_IP_SRC)?;
        // A reply from another node's backend of a connection this node balanced.
        let nat = lb::reply(ctx, src_ip, dst_ip, LB_CNT_REVERSE_TUNNEL)?;
        if !nat && stack_reply(ctx, src_ip, dst_ip, SVC_REPLY_FROM_TUNNEL)? {
            // A reply of a connection this node's stack sent out: the stack routes it on to
            // the pod (its inner destination MAC is the sender's, so tell the stack it is ours).
            ctx.change_type(PACKET_HOST).ok()?;
            return Some(TC_ACT_OK);
        }
        store_mac(ctx, OFF_ETH_SRC, &dst.host_mac)?;
        store_mac(ctx, OFF_ETH_DST, &dst.pod_mac)?;
        count(dst.ifindex, Dir::Rx, ctx.len());
        // SAFETY: plain helper call; valid from TC ingress.
        return Some(unsafe { bpf_redirect_peer(dst.ifindex, 0) } as i32);
    }
    // The VNI: 0 for the overlay, an Egress id for a steered pod's traffic. One helper call
    // that copies the tunnel metadata the device attached; no packet access. The key is left
    // uninitialised (the helper's argument is "uninit memory" to the verifier): zeroing 44
    // bytes would cost a store loop on every packet.
    let mut key = core::mem::MaybeUninit::<bpf_tunnel_key>::uninit();
    // SAFETY: plain helper call on the program's own skb with a key of the size passed; it
    // fills the whole key (or zeroes it on failure).
    let r = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            key.as_mut_ptr(),
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if r != 0 {
        // No tunnel metadata: not from a collect_md device. Carry nothing we cannot classify.
        return Some(TC_ACT_SHOT);
    }
    // SAFETY: the helper succeeded, so it wrote the key.
    let tunnel_id = unsafe { key.assume_init_ref() }.tunnel_id;
    if tunnel_id != 0 {
        return egress_in(ctx, tunnel_id);
    }
    // For the node (its gateway address, say): the inner destination MAC is the sending
    // node's tunnel MAC, so tell the stack the packet is ours.
    ctx.change_type(PACKET_HOST).ok()?;
    Some(TC_ACT_OK)
}

/// A packet another node steered here for Egress `id` (its destination is no local pod): to
/// the node's stack with the id as fwmark if this node holds that Egress IP, else dropped.
#[inline(always)]
fn egress_in(ctx: &TcContext, id: u32) -> Option<i32> {
    // Ids past 16 bits are never held: they miss and are dropped too.
    // SAFETY: the value is copied out at once.
    match unsafe { FERREA_EG_HELD.get(id) } {
        Some(&held) if held != 0 && id <= EGRESS_ID_MAX => {}
        _ => return Some(TC_ACT_SHOT),
    }
    let skb = ctx.skb.skb;
    // SAFETY: context accesses the verifier rewrites to skb->mark. Volatile and 32 bits wide:
    // the verifier accepts only whole-field writes, and LLVM would otherwise store the one
    // changed byte.
    unsafe {
        let p = core::ptr::addr_of_mut!((*skb).mark);
        let mark = p.read_volatile();
        p.write_volatile(
            (mark & !EGRESS_MARK_MASK) | ((id << EGRESS_MARK_SHIFT) & EGRESS_MARK_MASK),
        );
    }
    ctx.change_type(PACKET_HOST).ok()?;
    Some(TC_ACT_OK)
}

/// VLAN tagger, TC ingress of a parent interface: a frame tagged with a VLAN that has a child
/// on this parent loses its tag and goes to that child only (as if received there). Untagged
/// frames and other VLANs pass untouched. At TC ingress the kernel has already moved the outer
/// tag into the skb's metadata (`skb_vlan_untag`), so no packet data is read.
#[classifier]
pub fn ferrea_vlan_rx(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: context accesses the verifier rewrites to the skb's fields.
    let (present, tci, ifindex) = unsafe { ((*skb).vlan_present, (*skb).vlan_tci, (*skb).ifindex) };
    if present == 0 {
        return TC_ACT_OK;
    }
    let key = VlanKey {
        parent_ifindex: ifindex,
        vid: tci & VLAN_VID_MASK,
    };
    // SAFETY: copied out at once.
    let Some(child) = (unsafe { FERREA_VLAN_PAR.get(key) }).copied() else {
        return TC_ACT_OK;
    };
    // Unicast for the child's own MAC: untag and let the parent's macvlan demultiplexing
    // (which runs after TC ingress, in the same pass) deliver it to the child. Everything
    // else of the VLAN (broadcast, multicast, other MACs) is redirected into the child only,
    // a second receive pass, so the parent never sees the VLAN's frames untagged.
    let to_child = load_mac(&ctx, OFF_ETH_DST)
        .is_some_and(|(hi, lo)| hi == child.mac_hi && u32::from(lo) == child.mac_lo);
    // SAFETY: plain helper call on the program's own skb.
    if unsafe { bpf_skb_vlan_pop(skb) } != 0 {
        return TC_ACT_SHOT;
    }
    if to_child {
        return TC_ACT_OK;
    }
    // SAFETY: plain helper call; BPF_F_INGRESS = into the child's receive path.
    unsafe { bpf_redirect(child.ifindex, BPF_F_INGRESS as u64) as i32 }
}

/// VLAN tagger, TC egress of a child interface: pushes the child's VLAN tag (802.1Q).
#[classifier]
pub fn ferrea_vlan_tx(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: context access.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: copied out at once.
    let Some(vid) = (unsafe { FERREA_VLAN_CHD.get(ifindex) }).copied() else {
        // A child without an entry (detached while its filter is still there): send nothing
        // untagged from a sub-interface.
        return TC_ACT_SHOT;
    };
    // SAFETY: plain helper call on the program's own skb.
    if unsafe { bpf_skb_vlan_push(skb, ETH_P_8021Q.to_be(), (vid & VLAN_VID_MASK) as u16) } != 0 {
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Never reached: the programs contain no panicking operation (all packet accesses are
    // bound-checked `Option`s), and the verifier would reject an unbounded loop anyway.
    loop {}
}
