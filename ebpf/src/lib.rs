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
//! becomes the packet's fwmark (low 8 bits) and the packet goes to the node's stack, whose
//! policy routing and SNAT by mark (the agent core's) send it out with the Egress IP; any other
//! id is dropped, so a stale assignment never lets a pod address leave un-NATed. The steered
//! packet itself carries no mark: the VXLAN device's route lookup for the outer header uses
//! `skb->mark`, and the egress rule must not apply on the sending node.
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

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_F_ZERO_CSUM_TX, TC_ACT_OK, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::{
        bpf_redirect, bpf_redirect_peer, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
        bpf_skb_vlan_pop, bpf_skb_vlan_push,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuHashMap, lpm_trie::Key},
    programs::TcContext,
};
use ferrea_common::{
    Counters, EGRESS_IDS, EgressSteer, Endpoint, MAX_EGRESS_EXEMPT, MAX_NODES, MAX_PODS, MAX_VLANS,
    RemoteNode, VlanChild, VlanKey,
};

/// Local endpoints keyed by host-side veth ifindex: who is sending on this interface.
#[map(name = "FERREA_EP_IF")]
static FERREA_EP_IF: HashMap<u32, Endpoint> = HashMap::pinned(MAX_PODS, 0);

/// Local endpoints keyed by IPv4 address (network byte order): is the destination a local pod.
#[map(name = "FERREA_EP_IP")]
static FERREA_EP_IP: HashMap<u32, Endpoint> = HashMap::pinned(MAX_PODS, 0);

/// Per-pod counters keyed by host-side veth ifindex, one slot per CPU (no atomics needed).
#[map(name = "FERREA_COUNTERS")]
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

/// Egress ids this node holds the IP of: index = id, value non-zero = held.
#[map(name = "FERREA_EG_HELD")]
static FERREA_EG_HELD: Array<u32> = Array::pinned(EGRESS_IDS, 0);

/// VLAN tagger: (parent ifindex, VLAN id) to the child (macvlan) ifindex. Not pinned: the
/// tagger's object is loaded fresh by every agent process.
#[map(name = "FERREA_VLAN_PAR")]
static FERREA_VLAN_PAR: HashMap<VlanKey, VlanChild> = HashMap::with_max_entries(MAX_VLANS, 0);

/// VLAN tagger: child ifindex to its VLAN id.
#[map(name = "FERREA_VLAN_CHD")]
static FERREA_VLAN_CHD: HashMap<u32, u32> = HashMap::with_max_entries(MAX_VLANS, 0);

const ETH_HLEN: usize = 14;
/// The low bits of `skb->mark` that carry an Egress id (`EGRESS_MARK_MASK` in the agent).
const EGRESS_MARK_MASK: u32 = 0xff;
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

/// Which direction a packet is counted in.
#[derive(Clone, Copy)]
enum Dir {
    Tx,
    Rx,
    Spoofed,
    Arp,
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
        return Some(TC_ACT_SHOT);
    }
    let src_mac = load_mac(ctx, OFF_ETH_SRC)?;
    let src_ip = load_u32(ctx, OFF_IP_SRC)?;
    if src_ip != ep.ipv4 || src_mac != mac_parts(&ep.pod_mac) {
        count(ifindex, Dir::Spoofed, 0);
        return Some(TC_ACT_SHOT);
    }
    let dst_ip = load_u32(ctx, OFF_IP_DST)?;
    let len = ctx.len();
    // SAFETY: copied out at once, as above.
    if let Some(dst) = unsafe { FERREA_EP_IP.get(dst_ip) }.copied() {
        // Local pod: we are its router, so the frame leaves us from its gateway MAC to its MAC.
        store_mac(ctx, OFF_ETH_SRC, &dst.host_mac)?;
        store_mac(ctx, OFF_ETH_DST, &dst.pod_mac)?;
        count(ifindex, Dir::Tx, len);
        count(dst.ifindex, Dir::Rx, len);
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
        store_mac(ctx, OFF_ETH_SRC, &ep.host_mac)?;
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
            // SAFETY: plain helper call; flags 0 = out of the tunnel device's egress.
            return Some(unsafe { bpf_redirect(tun, 0) } as i32);
        }
    }
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

/// TC egress of a pod's host-side veth: what the node's stack delivers to the pod.
#[classifier]
pub fn ferrea_to_pod(ctx: TcContext) -> i32 {
    count(skb_ifindex(&ctx), Dir::Rx, ctx.len());
    TC_ACT_OK
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
        Some(node) => (node.node_ip, node.vni),
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
    // Array lookup: ids above 255 are out of range and miss, so they are dropped too.
    match FERREA_EG_HELD.get(id) {
        Some(&held) if held != 0 => {}
        _ => return Some(TC_ACT_SHOT),
    }
    let skb = ctx.skb.skb;
    // SAFETY: context accesses the verifier rewrites to skb->mark. Volatile and 32 bits wide:
    // the verifier accepts only whole-field writes, and LLVM would otherwise store the one
    // changed byte.
    unsafe {
        let p = core::ptr::addr_of_mut!((*skb).mark);
        let mark = p.read_volatile();
        p.write_volatile((mark & !EGRESS_MARK_MASK) | (id & EGRESS_MARK_MASK));
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
