//! ferrea's service proxy inside the programs (`serviceProxy: ferrea`): load balancing of the
//! pods' connections to Service virtual addresses, with a connection table so that every
//! packet of a connection goes to the backend its first packet was given, and the reverse
//! translation of the replies, none of it through the node's stack or its conntrack.
//!
//! Maps (layouts in `ferrea-common`, all pinned and adopted by a restarted agent):
//! - `FERREA_LB_SVC` ([`LbKey`] to [`LbSlot`]): slot 0 of (VIP, port, protocol) is the
//!   frontend (backend count, affinity timeout), slots `1..=count` its backends. Written by the
//!   agent (`Dataplane::set_services`): backends before the count that makes them reachable.
//! - `FERREA_LB_CT` (LRU, [`StackFlow`] to [`LbFlow`]): two entries per connection, written by
//!   the client's pod program when it picks the backend, reverse before forward so that no reply
//!   can miss its entry. The forward entry (client, VIP, client port, Service port) names the
//!   backend; the reverse entry (backend, client, backend port, client port) names the VIP and
//!   port the replies get back as their source.
//! - `FERREA_LB_AFF` (LRU, [`LbAffinityKey`] to [`LbAffinity`]): `sessionAffinity: ClientIP`,
//!   each client's last backend per frontend with the time it was chosen.
//! - `FERREA_LB_CNT` (per-CPU array): the `LB_CNT_*` counters.
//!
//! The path of a connection:
//! - [`from_pod`] (the client pod's program): a TCP, UDP or SCTP packet whose destination is
//!   not a local pod is looked up as a frontend (one hash lookup: with a delete per TCP SYN,
//!   see below, the whole cost for traffic that is not a Service's). A frontend's packet with a forward entry is DNATed to its
//!   backend; a new connection gets a backend (the affinity entry while within the timeout,
//!   else a random slot), its two entries, and the DNAT. Then the caller's normal forwarding
//!   decision runs on the new destination: `bpf_redirect_peer` to a local backend, the tunnel to
//!   another node's, the node's stack for a backend that is no pod. A frontend with no backends,
//!   or a packet the program cannot translate (a table write failing, a slot missing in the
//!   middle of an update), goes to the node's stack untranslated, where ferrea's nftables rules
//!   reject it or translate it (so it is never black-holed silently; `LB_CNT_NO_BACKEND`,
//!   `LB_CNT_TO_STACK` count them). IP fragments are left to the stack too (no ports to look up;
//!   the stack reassembles before its NAT).
//! - [`reply`]: a packet for a local pod (from a local pod: [`from_pod`]; decapsulated from
//!   another node: `ferrea_from_tunnel`; routed by the node's stack: `ferrea_to_pod`) whose
//!   tuple has a reverse entry gets the VIP and port back as its source. The cost for traffic
//!   that is not a Service's is that one LRU lookup (and, from a pod, a delete per TCP SYN).
//! - Hairpin: when the backend chosen is the client itself, the forward packet's source becomes
//!   [`LB_HAIRPIN_IP`] (169.254.0.253, as Antrea), so the pod's kernel accepts a packet that
//!   would otherwise come from its own address; the reply, addressed to that address, is
//!   recognised by its destination (a compare, no lookup) and gets both the VIP as source and
//!   the pod as destination back.
//!
//! Checksums: the IPv4 header checksum and the TCP or UDP checksum (with the pseudo-header) are
//! updated incrementally by the kernel's helpers, which also handle checksums the pod left to
//! offload (`CHECKSUM_PARTIAL`) and UDP datagrams without one. SCTP's CRC32c covers no
//! pseudo-header, so a changed address needs no update; a changed port would, and the agent
//! installs an SCTP frontend here only when every backend's port is the Service port (other SCTP
//! frontends are left to the node's stack).
//!
//! The two entries of a connection are separate LRU entries: a forward packet whose reverse
//! entry is gone (evicted on its own) puts it back. A TCP SYN the proxy does not translate
//! (a pod calling a backend's own address from a source port an earlier, closed connection
//! through the VIP used) removes the reverse entry of its reply tuple, so its replies are not
//! given the VIP; a UDP flow in that position is not detected (that would cost a lookup per
//! packet) and has its replies translated until the entry is evicted or flushed.
//!
//! `ferreactl trace` (a packet with `skb->mark` = `TRACE_MARK`, run by the agent with
//! `BPF_PROG_TEST_RUN`): translated like any, so the trace shows the backend it would reach,
//! but it writes no connection or affinity entry.
//!
//! What the table does not do: it keeps no TCP state. An entry lives until the LRU evicts it (a
//! live connection refreshes its entries with every packet) or the agent removes it: every entry
//! of a frontend that left the plan, and the UDP and SCTP entries of a backend that left it (what
//! kube-proxy's conntrack flush does). The forward TCP entries of a backend that left the plan
//! are marked stale instead: the connection drains to the old backend, and a new SYN on the same
//! tuple is balanced afresh. ICMP errors about a translated connection are not translated back.
//!
//! Source ports: a client's kernel reuses a source port for another destination, so two
//! connections through two VIPs can reach one backend from one client port. The backend would
//! see one tuple for both: it may still hold the first in TIME_WAIT and answer the second's SYN
//! as a stray segment of it (the client's kernel derives sequence numbers and timestamps from
//! the tuple it sees, with the VIP), which costs the client a second before its SYN is
//! retransmitted; and two such connections open at once would share one reverse entry. So a new
//! connection whose reverse entry is already another connection's also gets a new source port
//! (`LB_FLOW_PORT`, from `LB_REMAP_PORT_FIRST` up, one the table does not hold for that
//! backend), as the stack's conntrack remaps ports on the same clash. Not for SCTP (a changed
//! port would need its CRC32c recomputed) nor hairpin connections (their source changes
//! anyway).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_boot_ns},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use ferrea_common::{
    Endpoint, LB_CNT_AFFINITY, LB_CNT_FORWARD, LB_CNT_HAIRPIN, LB_CNT_NEW, LB_CNT_NO_BACKEND,
    LB_CNT_PORT_CLASH, LB_CNT_PORT_REMAP, LB_CNT_REVERSE_POD, LB_CNT_STALE_RESELECT,
    LB_CNT_TO_STACK, LB_COUNTER_SLOTS, LB_FLOW_HAIRPIN, LB_FLOW_PORT, LB_FLOW_REVERSE,
    LB_FLOW_STALE, LB_HAIRPIN_IP, LB_REMAP_PORT_FIRST, LB_REMAP_PORTS, LbAffinity, LbAffinityKey,
    LbFlow, LbKey, LbSlot, MAX_LB_AFFINITY, MAX_LB_ENTRIES, MAX_LB_FLOWS, StackFlow,
};

use crate::{
    ETH_HLEN, FERREA_EP_IP, IP_FRAG_MASK, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, OFF_IP_DST,
    OFF_IP_FRAG, OFF_IP_PROTO, OFF_IP_SRC, OFF_IP_VHL, TCP_ACK, TCP_SYN, l4_load, load_u8,
    load_u16,
};

/// Frontends and their backend slots (written by the agent).
#[map(name = "FERREA_LB_SVC")]
static FERREA_LB_SVC: HashMap<LbKey, LbSlot> = HashMap::pinned(MAX_LB_ENTRIES, 0);

/// The connection table: forward and reverse entries of every load-balanced connection.
#[map(name = "FERREA_LB_CT")]
static FERREA_LB_CT: LruHashMap<StackFlow, LbFlow> = LruHashMap::pinned(MAX_LB_FLOWS, 0);

/// `sessionAffinity: ClientIP`: each client's last backend per frontend.
#[map(name = "FERREA_LB_AFF")]
static FERREA_LB_AFF: LruHashMap<LbAffinityKey, LbAffinity> =
    LruHashMap::pinned(MAX_LB_AFFINITY, 0);

/// Node-wide counters of the service proxy, one slot per `LB_CNT_*` index and CPU.
#[map(name = "FERREA_LB_CNT")]
static FERREA_LB_CNT: PerCpuArray<u64> = PerCpuArray::pinned(LB_COUNTER_SLOTS, 0);

/// Offset of the IPv4 header checksum.
const OFF_IP_CSUM: usize = ETH_HLEN + 10;
/// `BPF_F_HDR_FIELD_MASK` sizes for the checksum helpers.
const CSUM_4: u64 = 4;
const CSUM_2: u64 = 2;

/// Adds one to a service-proxy counter on this CPU.
#[inline(always)]
pub(crate) fn lb_count(slot: u32) {
    if let Some(c) = FERREA_LB_CNT.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot; TC programs run with migration disabled, so no other program
        // instance writes this CPU's slot at the same time.
        unsafe { *c += 1 };
    }
}

/// The transport facts of a TCP, UDP or SCTP packet that is not a fragment.
struct L4 {
    /// Where the transport header starts.
    off: usize,
    proto: u8,
    sport: u16,
    dport: u16,
    /// A TCP SYN without ACK.
    syn: bool,
}

/// The transport header of the packet, if it is one the proxy translates.
#[inline(always)]
fn l4_of(ctx: &TcContext) -> Option<Option<L4>> {
    let proto = load_u8(ctx, OFF_IP_PROTO)?;
    if !matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return Some(None);
    }
    if u16::from_be(load_u16(ctx, OFF_IP_FRAG)?) & IP_FRAG_MASK != 0 {
        return Some(None);
    }
    let vhl = load_u8(ctx, OFF_IP_VHL)?;
    let ports: [u16; 2] = l4_load(ctx, vhl, 0)?;
    let syn = proto == IPPROTO_TCP && {
        let flags: u8 = l4_load(ctx, vhl, 13)?;
        flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    };
    Some(Some(L4 {
        off: ETH_HLEN + usize::from(vhl & 0x0f) * 4,
        proto,
        sport: ports[0],
        dport: ports[1],
        syn,
    }))
}

/// Where the transport checksum is and how the helper must treat it; `None` for SCTP (its
/// CRC32c covers no pseudo-header, and the agent never has its ports translated).
#[inline(always)]
fn l4_csum(l4: &L4) -> Option<(usize, u64)> {
    match l4.proto {
        IPPROTO_TCP => Some((l4.off + 16, 0)),
        // A UDP checksum of 0 means "none" and stays 0.
        IPPROTO_UDP => Some((l4.off + 6, u64::from(BPF_F_MARK_MANGLED_0))),
        _ => None,
    }
}

/// Replaces the IPv4 address at `ip_off` (source or destination) and fixes both checksums.
#[inline(always)]
fn set_ip(ctx: &TcContext, l4: &L4, ip_off: usize, old: u32, new: u32) -> Option<()> {
    if old == new {
        return Some(());
    }
    if let Some((off, flags)) = l4_csum(l4) {
        ctx.l4_csum_replace(
            off,
            u64::from(old),
            u64::from(new),
            flags | u64::from(BPF_F_PSEUDO_HDR) | CSUM_4,
        )
        .ok()?;
    }
    ctx.l3_csum_replace(OFF_IP_CSUM, u64::from(old), u64::from(new), CSUM_4)
        .ok()?;
    ctx.store(ip_off, &new, 0).ok()
}

/// Replaces the port at `port_off` (in the transport header) and fixes its checksum.
#[inline(always)]
fn set_port(ctx: &TcContext, l4: &L4, port_off: usize, old: u16, new: u16) -> Option<()> {
    if old == new {
        return Some(());
    }
    if let Some((off, flags)) = l4_csum(l4) {
        ctx.l4_csum_replace(off, u64::from(old), u64::from(new), flags | CSUM_2)
            .ok()?;
    }
    ctx.store(port_off, &new, 0).ok()
}

/// What [`from_pod`] decided for a pod's packet.
pub(crate) enum Routed {
    /// Forward it to `dst_ip` (changed if the proxy translated the packet); `local`: the local
    /// pod it is for, if any (a pointer into `FERREA_EP_IP`, valid for this program run: an
    /// `Option<Endpoint>` by value would carry an undefined payload when `None`, which LLVM may
    /// spill, and the verifier refuses to read uninitialised registers); `nat`: the proxy translated it (a load-balanced connection, so
    /// not one the node's stack carried).
    Route {
        dst_ip: u32,
        local: Option<*const Endpoint>,
        nat: bool,
    },
    /// To the node's stack untranslated (no backend, or nothing this program can translate).
    Stack,
}

/// The service proxy's part of a pod's packet from `src_ip` to `dst_ip`: the reverse
/// translation of a reply for a local pod (or a hairpin reply), the load balancing of a
/// packet for a VIP; everything else untouched. `None`: a truncated packet or a failed
/// rewrite (the caller drops it).
#[inline(always)]
pub(crate) fn from_pod(ctx: &TcContext, src_ip: u32, dst_ip: u32) -> Option<Routed> {
    let local = FERREA_EP_IP.get_ptr(dst_ip);
    let untouched = Routed::Route {
        dst_ip,
        local,
        nat: false,
    };
    let Some(l4) = l4_of(ctx)? else {
        return Some(untouched);
    };
    if local.is_some() || dst_ip == LB_HAIRPIN_IP {
        if reverse(ctx, &l4, src_ip, dst_ip, LB_CNT_REVERSE_POD)? {
            if local.is_some() {
                return Some(Routed::Route {
                    dst_ip,
                    local,
                    nat: true,
                });
            }
            // A pod's reply in a hairpin connection: back to itself, from the VIP.
            return Some(Routed::Route {
                dst_ip: src_ip,
                local: FERREA_EP_IP.get_ptr(src_ip),
                nat: true,
            });
        }
        forget_reverse(&l4, src_ip, dst_ip);
        return Some(untouched);
    }
    match to_vip(ctx, &l4, src_ip, dst_ip)? {
        None => {
            forget_reverse(&l4, src_ip, dst_ip);
            Some(untouched)
        }
        Some(0) => Some(Routed::Stack),
        Some(backend) => Some(Routed::Route {
            dst_ip: backend,
            local: FERREA_EP_IP.get_ptr(backend),
            nat: true,
        }),
    }
}

/// The connection-table key of a packet of `l4` from `src_ip` to `dst_ip`.
#[inline(always)]
fn tuple_of(l4: &L4, src_ip: u32, dst_ip: u32) -> StackFlow {
    StackFlow {
        saddr: src_ip,
        daddr: dst_ip,
        sport: l4.sport,
        dport: l4.dport,
        proto: l4.proto,
        pad: [0; 3],
    }
}

/// A TCP SYN that the proxy does not translate (a pod calling another pod's address, say)
/// starts a connection whose replies must not be given a VIP: it removes any reverse entry
/// of its reply tuple that a closed load-balanced connection with the same addresses and
/// ports left behind (the client's kernel reuses a source port for another destination).
#[inline(always)]
fn forget_reverse(l4: &L4, src_ip: u32, dst_ip: u32) {
    if l4.syn {
        let _ = FERREA_LB_CT.remove(crate::reversed(&tuple_of(l4, src_ip, dst_ip)));
    }
}

/// A reply for a load-balanced connection: if the packet's tuple has a reverse entry, gives it
/// the VIP and Service port as source (and, hairpin, the client as destination; remapped, the
/// client's own port as destination port) and counts it
/// in `slot`. `Some(true)`: translated.
#[inline(always)]
pub(crate) fn reply(ctx: &TcContext, src_ip: u32, dst_ip: u32, slot: u32) -> Option<bool> {
    let Some(l4) = l4_of(ctx)? else {
        return Some(false);
    };
    reverse(ctx, &l4, src_ip, dst_ip, slot)
}

/// [`reply`] for a packet already parsed.
#[inline(always)]
fn reverse(ctx: &TcContext, l4: &L4, src_ip: u32, dst_ip: u32, slot: u32) -> Option<bool> {
    let key = tuple_of(l4, src_ip, dst_ip);
    let Some(f) = FERREA_LB_CT.get_ptr(key) else {
        return Some(false);
    };
    // SAFETY: the pointer is valid for this program run; copied out at once.
    let f = unsafe { *f };
    if f.flags & LB_FLOW_REVERSE == 0 {
        return Some(false);
    }
    set_port(ctx, l4, l4.off, l4.sport, f.nat_port)?;
    set_ip(ctx, l4, OFF_IP_SRC, src_ip, f.nat_ip)?;
    if f.flags & LB_FLOW_HAIRPIN != 0 {
        set_ip(ctx, l4, OFF_IP_DST, dst_ip, f.peer_ip)?;
    } else if f.flags & LB_FLOW_PORT != 0 {
        set_port(ctx, l4, l4.off + 2, l4.dport, f.peer_ip as u16)?;
    }
    lb_count(slot);
    Some(true)
}

/// The reverse entry (key and value) of a connection from `src_ip` to the frontend at
/// `dst_ip` whose forward entry is `fwd`.
#[inline(always)]
fn reverse_of(l4: &L4, src_ip: u32, dst_ip: u32, fwd: &LbFlow) -> (StackFlow, LbFlow) {
    let hairpin = fwd.flags & LB_FLOW_HAIRPIN != 0;
    let remapped = fwd.flags & LB_FLOW_PORT != 0;
    (
        StackFlow {
            saddr: fwd.nat_ip,
            daddr: if hairpin { LB_HAIRPIN_IP } else { src_ip },
            sport: fwd.nat_port,
            dport: if remapped {
                fwd.peer_ip as u16
            } else {
                l4.sport
            },
            proto: l4.proto,
            pad: [0; 3],
        },
        LbFlow {
            nat_ip: dst_ip,
            nat_port: l4.dport,
            flags: LB_FLOW_REVERSE | (fwd.flags & (LB_FLOW_HAIRPIN | LB_FLOW_PORT)),
            peer_ip: if hairpin {
                src_ip
            } else if remapped {
                u32::from(l4.sport)
            } else {
                0
            },
        },
    )
}

/// What tells two connections' entries apart: the translation and the flags (not the LRU's
/// bookkeeping).
#[inline(always)]
fn translation(f: &LbFlow) -> (u32, u16, u16) {
    (f.nat_ip, f.nat_port, f.flags)
}

/// [`translation`] of the connection-table entry under `key`, if there is one.
#[inline(always)]
fn entry_at(key: &StackFlow) -> Option<(u32, u16, u16)> {
    // SAFETY: the pointer is valid for this program run; copied out at once.
    FERREA_LB_CT
        .get_ptr(key)
        .map(|p| translation(unsafe { &*p }))
}

/// How many random ports [`free_port`] tries.
const REMAP_TRIES: usize = 4;

/// A source port (network byte order) under which `rev`, the reverse key of a new connection,
/// is nobody's: tried at random among the `LB_REMAP_PORTS` ports from `LB_REMAP_PORT_FIRST`.
#[inline(always)]
fn free_port(rev: &StackFlow) -> Option<u16> {
    let mut key = *rev;
    for _ in 0..REMAP_TRIES {
        // SAFETY: plain helper call.
        let r = unsafe { bpf_get_prandom_u32() };
        // r % LB_REMAP_PORTS < 4536, so the sum stays below 65536.
        let port = (LB_REMAP_PORT_FIRST as u32 + r % LB_REMAP_PORTS) as u16;
        key.dport = port.to_be();
        if FERREA_LB_CT.get_ptr(key).is_none() {
            return Some(key.dport);
        }
    }
    None
}

/// A pod's packet for an address that is not a local pod: if it is a frontend's, translates
/// it to its backend. `Some(None)`: no frontend; `Some(Some(0))`: a frontend's packet for the
/// node's stack, untranslated; `Some(Some(ip))`: DNATed to the backend `ip`.
#[inline(always)]
fn to_vip(ctx: &TcContext, l4: &L4, src_ip: u32, dst_ip: u32) -> Option<Option<u32>> {
    let fe_key = LbKey {
        vip: dst_ip,
        port: l4.dport,
        slot: 0,
        proto: l4.proto,
        pad: [0; 3],
    };
    // SAFETY: copied out at once; the agent replaces entries whole.
    let Some(fe) = (unsafe { FERREA_LB_SVC.get(fe_key) }).copied() else {
        return Some(None);
    };
    let tuple = tuple_of(l4, src_ip, dst_ip);
    // `ferreactl trace`'s packet is translated as any, but leaves no connection or affinity
    // behind.
    let record = !crate::traced(ctx);
    if let Some(f) = FERREA_LB_CT.get_ptr(tuple) {
        // SAFETY: the pointer is valid for this program run; copied out at once.
        let f = unsafe { *f };
        if f.flags & LB_FLOW_REVERSE == 0 {
            if f.flags & LB_FLOW_STALE == 0 || !l4.syn {
                // The reverse entry is a separate LRU entry: evicted on its own, removed by a
                // SYN that reused its tuple without the proxy, or taken over by a connection
                // through another VIP to the same backend from the same client port (a
                // client reuses a port for another destination). Put it back if it is gone or
                // names another frontend, or the replies would come from the wrong address.
                let (rk, rv) = reverse_of(l4, src_ip, dst_ip, &f);
                if record && entry_at(&rk) != Some(translation(&rv)) {
                    let _ = FERREA_LB_CT.insert(rk, rv, 0);
                }
                dnat(ctx, l4, src_ip, dst_ip, &f)?;
                lb_count(LB_CNT_FORWARD);
                return Some(Some(f.nat_ip));
            }
            // A new connection on the tuple of one whose backend left the plan.
            lb_count(LB_CNT_STALE_RESELECT);
        }
    }
    if fe.count == 0 {
        lb_count(LB_CNT_NO_BACKEND);
        return Some(Some(0));
    }
    let Some((ip, port)) = pick(&fe_key, &fe, src_ip, record) else {
        lb_count(LB_CNT_TO_STACK);
        return Some(Some(0));
    };
    let hairpin = ip == src_ip;
    let mut fwd = LbFlow {
        nat_ip: ip,
        nat_port: port,
        flags: if hairpin { LB_FLOW_HAIRPIN } else { 0 },
        peer_ip: if hairpin { LB_HAIRPIN_IP } else { 0 },
    };
    let (mut rev_key, mut rev) = reverse_of(l4, src_ip, dst_ip, &fwd);
    // The tuple the backend will see already another connection's (the same client port
    // through another VIP, see the module doc): a new source port.
    if record
        && !hairpin
        && l4.proto != IPPROTO_SCTP
        && entry_at(&rev_key).is_some_and(|t| t != translation(&rev))
    {
        match free_port(&rev_key) {
            Some(p) => {
                fwd.flags |= LB_FLOW_PORT;
                fwd.peer_ip = u32::from(p);
                (rev_key, rev) = reverse_of(l4, src_ip, dst_ip, &fwd);
                lb_count(LB_CNT_PORT_REMAP);
            }
            None => lb_count(LB_CNT_PORT_CLASH),
        }
    }
    // Reverse first: a reply can never find its forward entry without its reverse one.
    if record
        && (FERREA_LB_CT.insert(rev_key, rev, 0).is_err()
            || FERREA_LB_CT.insert(tuple, fwd, 0).is_err())
    {
        lb_count(LB_CNT_TO_STACK);
        return Some(Some(0));
    }
    lb_count(LB_CNT_NEW);
    if hairpin {
        lb_count(LB_CNT_HAIRPIN);
    }
    dnat(ctx, l4, src_ip, dst_ip, &fwd)?;
    Some(Some(ip))
}

/// The backend of a new connection from `client` to the frontend `fe` (count > 0): the
/// client's affinity entry while within the timeout, else a random slot. Records the affinity
/// if `record`.
#[inline(always)]
fn pick(fe_key: &LbKey, fe: &LbSlot, client: u32, record: bool) -> Option<(u32, u16)> {
    let akey = LbAffinityKey {
        client,
        vip: fe_key.vip,
        port: fe_key.port,
        proto: fe_key.proto,
        pad: 0,
    };
    let mut now = 0;
    if fe.affinity_secs != 0 {
        // SAFETY: plain helper call.
        now = unsafe { bpf_ktime_get_boot_ns() };
        if let Some(a) = FERREA_LB_AFF.get_ptr(akey) {
            // SAFETY: the pointer is valid for this program run; copied out at once.
            let a = unsafe { *a };
            if now.wrapping_sub(a.last_ns) < u64::from(fe.affinity_secs) * 1_000_000_000 {
                lb_count(LB_CNT_AFFINITY);
                if record {
                    let _ = FERREA_LB_AFF.insert(akey, LbAffinity { last_ns: now, ..a }, 0);
                }
                return Some((a.ip, a.port));
            }
        }
    }
    // SAFETY: plain helper call.
    let r = unsafe { bpf_get_prandom_u32() };
    // count <= MAX_LB_BACKENDS (the agent's limit), so the slot fits its u16.
    let slot = (r % fe.count) + 1;
    let key = LbKey {
        slot: slot as u16,
        ..*fe_key
    };
    // SAFETY: copied out at once.
    let b = (unsafe { FERREA_LB_SVC.get(key) }).copied()?;
    if record && fe.affinity_secs != 0 {
        let _ = FERREA_LB_AFF.insert(
            akey,
            LbAffinity {
                last_ns: now,
                ip: b.ip,
                port: b.port,
                pad: 0,
            },
            0,
        );
    }
    Some((b.ip, b.port))
}

/// The forward translation: destination to the backend (and, hairpin, source to the hairpin
/// address; remapped, the source port to its new one).
#[inline(always)]
fn dnat(ctx: &TcContext, l4: &L4, src_ip: u32, dst_ip: u32, f: &LbFlow) -> Option<()> {
    set_port(ctx, l4, l4.off + 2, l4.dport, f.nat_port)?;
    set_ip(ctx, l4, OFF_IP_DST, dst_ip, f.nat_ip)?;
    if f.flags & LB_FLOW_HAIRPIN != 0 {
        set_ip(ctx, l4, OFF_IP_SRC, src_ip, f.peer_ip)?;
    } else if f.flags & LB_FLOW_PORT != 0 {
        set_port(ctx, l4, l4.off, l4.sport, f.peer_ip as u16)?;
    }
    Some(())
}
