//! The eBPF backend's half of ferrea's service proxy ([`crate::proxy`]): what
//! [`crate::dataplane::Dataplane::set_services`] writes into the pinned maps the programs
//! load-balance with (`ebpf/src/lb.rs` says what the programs do with them), and how the
//! connection table and the session-affinity map are cleaned when frontends or backends
//! leave the plan. Behind [`BpfMaps`], so it runs in unit tests without root.
//!
//! What is installed: every frontend of [`ServicePlan::vips`] with its `backends` (the
//! endpoints for traffic from this node's pods), as slot 0 (`count`, affinity timeout) and
//! slots `1..=count` of `FERREA_LB_SVC`. Not installed, so left to the node's stack (and
//! ferrea's nftables rules): SCTP frontends whose backends' ports differ from the Service
//! port (the programs cannot rewrite an SCTP port: its CRC32c would have to be recomputed).
//! `node_ports` and `external_backends` are the nftables rules' business.
//!
//! Order of the writes (the programs read concurrently): a frontend's backend slots before
//! the count that makes them reachable, surplus slots removed after it; a frontend that goes
//! loses slot 0 first. Then, when something left the plan (or on the first call of a process,
//! which converges with whatever an earlier agent left), one pass over the connection table:
//! entries of frontends that are gone are removed; entries of backends that are gone are
//! removed for UDP and SCTP (kube-proxy's conntrack flush), and for TCP the forward entry is
//! marked stale (the connection drains to its backend, a new SYN on the same tuple is balanced
//! afresh). Affinity entries of gone frontends or backends are removed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ferrea_common::{
    LB_FLOW_HAIRPIN, LB_FLOW_PORT, LB_FLOW_REVERSE, LB_FLOW_STALE, LbFlow, LbKey, LbSlot,
    MAP_LB_AFFINITY, MAP_LB_FLOWS, MAP_LB_SERVICES, MAX_LB_BACKENDS, StackFlow,
};

use super::ERR;
use super::maps::BpfMaps;
use crate::dataplane::{DataplaneError, DumpSection};
use crate::proxy::ServicePlan;
use crate::source::Protocol;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

/// A frontend as the maps key it: (VIP, port, IP protocol), network byte order.
pub type FrontendKey = (u32, u16, u8);
/// A backend as the maps hold it: (address, port), network byte order.
pub type BackendKey = (u32, u16);

/// One frontend as the maps should hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name:port`, for logs.
    pub name: String,
    /// `sessionAffinity: ClientIP` timeout, 0 for none.
    pub affinity_secs: u32,
    /// The backends, in the plan's order (the slots `1..=n`).
    pub backends: Vec<BackendKey>,
}

/// What one [`sync`] did, for the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Frontends installed.
    pub frontends: usize,
    /// Frontend or backend slots written.
    pub slots_written: usize,
    /// Slots removed.
    pub slots_removed: usize,
    /// Whether the connection table was scanned.
    pub scanned: bool,
    /// Connection-table entries removed.
    pub flows_removed: usize,
    /// TCP forward entries marked stale.
    pub flows_staled: usize,
    /// Affinity entries removed.
    pub affinities_removed: usize,
    /// SCTP frontends left to the node's stack (port translation).
    pub sctp_to_stack: usize,
}

/// The IP protocol number of a Service protocol.
pub fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

fn key_of(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn ip_of(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

/// The frontends `plan` asks of the maps, and how many SCTP frontends it leaves to the stack.
pub fn frontends(plan: &ServicePlan) -> (BTreeMap<FrontendKey, Frontend>, usize) {
    let mut out = BTreeMap::new();
    let mut sctp = 0;
    for v in &plan.vips {
        let proto = proto_number(v.addr.protocol);
        if proto == IPPROTO_SCTP && v.backends.iter().any(|b| b.port != v.addr.port) {
            tracing::debug!(
                frontend = %v.addr,
                "SCTP frontend with port translation left to the node's stack"
            );
            sctp += 1;
            continue;
        }
        let mut seen = BTreeSet::new();
        let mut backends: Vec<BackendKey> = v
            .backends
            .iter()
            .map(|b| (key_of(b.ip), b.port.to_be()))
            .filter(|b| seen.insert(*b))
            .collect();
        if backends.len() > MAX_LB_BACKENDS as usize {
            tracing::warn!(
                frontend = %v.addr,
                backends = backends.len(),
                kept = MAX_LB_BACKENDS,
                "too many backends for one frontend; the rest get no connections from pods"
            );
            backends.truncate(MAX_LB_BACKENDS as usize);
        }
        out.insert(
            (key_of(v.addr.ip), v.addr.port.to_be(), proto),
            Frontend {
                name: v.name.clone(),
                affinity_secs: v.affinity_secs.unwrap_or(0),
                backends,
            },
        );
    }
    (out, sctp)
}

fn slot_key(fe: FrontendKey, slot: u16) -> LbKey {
    LbKey {
        vip: fe.0,
        port: fe.1,
        slot,
        proto: fe.2,
        pad: [0; 3],
    }
}

/// The frontend and backend of a connection-table entry.
pub fn flow_parts(k: &StackFlow, f: &LbFlow) -> (FrontendKey, BackendKey) {
    if f.flags & LB_FLOW_REVERSE != 0 {
        ((f.nat_ip, f.nat_port, k.proto), (k.saddr, k.sport))
    } else {
        ((k.daddr, k.dport, k.proto), (f.nat_ip, f.nat_port))
    }
}

/// What the frontend map holds, per frontend: slot number to value.
pub type Installed = BTreeMap<FrontendKey, BTreeMap<u16, LbSlot>>;

/// The frontend map's content as [`Installed`].
pub fn read_installed(m: &dyn BpfMaps) -> Installed {
    let mut have = Installed::new();
    for (k, v) in m.lb_slots() {
        have.entry((k.vip, k.port, k.proto))
            .or_default()
            .insert(k.slot, v);
    }
    have
}

/// What the frontend map holds once `want` is installed.
fn installed_of(want: &BTreeMap<FrontendKey, Frontend>) -> Installed {
    want.iter()
        .map(|(fe, f)| {
            let mut slots = BTreeMap::new();
            slots.insert(
                0,
                LbSlot {
                    count: u32::try_from(f.backends.len()).expect("at most MAX_LB_BACKENDS"),
                    affinity_secs: f.affinity_secs,
                    ..LbSlot::default()
                },
            );
            for (i, &(ip, port)) in (1u16..).zip(&f.backends) {
                slots.insert(
                    i,
                    LbSlot {
                        ip,
                        port,
                        ..LbSlot::default()
                    },
                );
            }
            (*fe, slots)
        })
        .collect()
}

/// Makes the service proxy's maps hold exactly `plan`'s frontends (entries that are right
/// already are not rewritten) and cleans the connection and affinity tables of what left it.
/// `installed`: what the last successful call left in the frontend map (nobody else writes
/// it), or `None` to read the map and scan the tables even if nothing left the plan (the
/// first call of a process, which adopts and converges with what an earlier one left).
/// Returns what it did and what the frontend map now holds.
pub fn sync(
    m: &mut dyn BpfMaps,
    plan: &ServicePlan,
    installed: Option<&Installed>,
) -> Result<(SyncReport, Installed), DataplaneError> {
    let (want, sctp_to_stack) = frontends(plan);
    let mut report = SyncReport {
        frontends: want.len(),
        sctp_to_stack,
        ..SyncReport::default()
    };
    let converge = installed.is_none();
    let read;
    let have = match installed {
        Some(h) => h,
        None => {
            read = read_installed(m);
            &read
        }
    };
    let mut left = false;
    let insert = |m: &mut dyn BpfMaps, k: LbKey, v: LbSlot| {
        m.insert_lb_slot(k, v)
            .map_err(ERR.other("insert into", format!("map {MAP_LB_SERVICES}")))
    };
    for (&fe, f) in &want {
        let cur = have.get(&fe);
        let cur_slot = |s: u16| cur.and_then(|c| c.get(&s)).copied();
        for (i, &(ip, port)) in f.backends.iter().enumerate() {
            let slot = u16::try_from(i + 1).expect("at most MAX_LB_BACKENDS slots");
            let v = LbSlot {
                ip,
                port,
                ..LbSlot::default()
            };
            if cur_slot(slot) != Some(v) {
                insert(m, slot_key(fe, slot), v)?;
                report.slots_written += 1;
            }
        }
        let head = LbSlot {
            count: u32::try_from(f.backends.len()).expect("at most MAX_LB_BACKENDS"),
            affinity_secs: f.affinity_secs,
            ..LbSlot::default()
        };
        if cur_slot(0) != Some(head) {
            insert(m, slot_key(fe, 0), head)?;
            report.slots_written += 1;
        }
        if let Some(c) = cur {
            for (&slot, v) in c.range(1..) {
                let kept = usize::from(slot) <= f.backends.len();
                if !kept {
                    m.remove_lb_slot(slot_key(fe, slot));
                    report.slots_removed += 1;
                }
                if slot != 0 && !f.backends.contains(&(v.ip, v.port)) {
                    left = true;
                }
            }
        }
    }
    for (&fe, slots) in have.iter().filter(|(fe, _)| !want.contains_key(*fe)) {
        left = true;
        // Slot 0 first: from then on no new connection picks a slot of this frontend.
        let mut order: Vec<u16> = slots.keys().copied().collect();
        order.sort_unstable();
        for slot in order {
            m.remove_lb_slot(slot_key(fe, slot));
            report.slots_removed += 1;
        }
    }
    if left || converge {
        report.scanned = true;
        clean_tables(m, &want, &mut report)?;
    }
    Ok((report, installed_of(&want)))
}

/// Removes (or, TCP forward entries, marks stale) the connection-table entries of frontends
/// and backends that are not in `want`, and their affinity entries.
fn clean_tables(
    m: &mut dyn BpfMaps,
    want: &BTreeMap<FrontendKey, Frontend>,
    report: &mut SyncReport,
) -> Result<(), DataplaneError> {
    for (k, f) in m.lb_flows() {
        let (fe, be) = flow_parts(&k, &f);
        let Some(front) = want.get(&fe) else {
            m.remove_lb_flow(k);
            report.flows_removed += 1;
            continue;
        };
        if front.backends.contains(&be) {
            continue;
        }
        if k.proto != IPPROTO_TCP {
            m.remove_lb_flow(k);
            report.flows_removed += 1;
        } else if f.flags & (LB_FLOW_REVERSE | LB_FLOW_STALE) == 0 {
            let stale = LbFlow {
                flags: f.flags | LB_FLOW_STALE,
                ..f
            };
            m.update_lb_flow(k, stale)
                .map_err(ERR.other("update", format!("map {MAP_LB_FLOWS}")))?;
            report.flows_staled += 1;
        }
    }
    for (k, a) in m.lb_affinities() {
        let keep = want
            .get(&(k.vip, k.port, k.proto))
            .is_some_and(|f| f.backends.contains(&(a.ip, a.port)));
        if !keep {
            m.remove_lb_affinity(k);
            report.affinities_removed += 1;
        }
    }
    Ok(())
}

fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_SCTP => "sctp".into(),
        n => n.to_string(),
    }
}

fn addr(ip: u32, port: u16) -> String {
    format!("{}:{}", ip_of(ip), u16::from_be(port))
}

/// `CLOCK_BOOTTIME` in nanoseconds (the programs' `bpf_ktime_get_boot_ns`), from
/// `/proc/uptime` (centisecond precision, enough for ages in seconds); 0 if unreadable.
pub fn boot_time_ns() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |secs| (secs * 1e9) as u64)
}

/// The most connection-table rows a dump shows (the table holds up to
/// [`ferrea_common::MAX_LB_FLOWS`]); a last row says how many more there are.
pub const DUMP_MAX_FLOWS: usize = 2048;

/// The service proxy's maps decoded for the debug API: frontends and backend slots, the
/// connection table (at most [`DUMP_MAX_FLOWS`] rows), the affinity entries. `now_ns`:
/// [`boot_time_ns`], for the affinity entries' age.
pub fn dump(m: &dyn BpfMaps, now_ns: u64) -> Vec<DumpSection> {
    let mut svc = DumpSection::new(
        format!("map {MAP_LB_SERVICES}"),
        &["frontend", "slot", "backend", "backends", "affinity_secs"],
    );
    let mut slots = m.lb_slots();
    slots.sort_by_key(|(k, _)| (ip_of(k.vip), u16::from_be(k.port), k.proto, k.slot));
    for (k, v) in slots {
        let fe = format!("{}/{}", addr(k.vip, k.port), proto_name(k.proto));
        svc.rows.push(if k.slot == 0 {
            vec![
                fe,
                "0".into(),
                "-".into(),
                v.count.to_string(),
                v.affinity_secs.to_string(),
            ]
        } else {
            vec![
                fe,
                k.slot.to_string(),
                addr(v.ip, v.port),
                "-".into(),
                "-".into(),
            ]
        });
    }
    let mut ct = DumpSection::new(
        format!("map {MAP_LB_FLOWS}"),
        &[
            "direction",
            "proto",
            "source",
            "destination",
            "nat",
            "flags",
        ],
    );
    let mut flows = m.lb_flows();
    let total = flows.len();
    flows.sort_by_key(|(k, f)| (f.flags & LB_FLOW_REVERSE, ip_of(k.saddr), k.sport, *k));
    for (k, f) in flows.into_iter().take(DUMP_MAX_FLOWS) {
        let reverse = f.flags & LB_FLOW_REVERSE != 0;
        let mut flags = Vec::new();
        if f.flags & LB_FLOW_HAIRPIN != 0 {
            flags.push(format!("hairpin({})", ip_of(f.peer_ip)));
        }
        if f.flags & LB_FLOW_PORT != 0 {
            // Forward: the client's new source port; reverse: its own, given back.
            flags.push(format!("port({})", u16::from_be(f.peer_ip as u16)));
        }
        if f.flags & LB_FLOW_STALE != 0 {
            flags.push("stale".to_owned());
        }
        ct.rows.push(vec![
            if reverse { "reverse" } else { "forward" }.into(),
            proto_name(k.proto),
            addr(k.saddr, k.sport),
            addr(k.daddr, k.dport),
            addr(f.nat_ip, f.nat_port),
            if flags.is_empty() {
                "-".into()
            } else {
                flags.join(",")
            },
        ]);
    }
    if total > DUMP_MAX_FLOWS {
        let more = format!("({} more)", total - DUMP_MAX_FLOWS);
        ct.rows.push(vec![
            more,
            "".into(),
            "".into(),
            "".into(),
            "".into(),
            "".into(),
        ]);
    }
    let mut aff = DumpSection::new(
        format!("map {MAP_LB_AFFINITY}"),
        &["client", "frontend", "backend", "age_secs"],
    );
    let mut affs = m.lb_affinities();
    affs.sort_by_key(|(k, _)| (ip_of(k.client), ip_of(k.vip), u16::from_be(k.port), k.proto));
    for (k, a) in affs {
        aff.rows.push(vec![
            ip_of(k.client).to_string(),
            format!("{}/{}", addr(k.vip, k.port), proto_name(k.proto)),
            addr(a.ip, a.port),
            (now_ns.saturating_sub(a.last_ns) / 1_000_000_000).to_string(),
        ]);
    }
    vec![svc, ct, aff]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{Backend, ServiceAddr, VipKind, VipService};
    use crate::testing::bpf::FakeBpfMaps;
    use ferrea_common::{LbAffinity, LbAffinityKey};

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 9);

    fn be(last: u8, port: u16) -> Backend {
        Backend {
            ip: Ipv4Addr::new(10, 244, 1, last),
            port,
            local: true,
        }
    }

    fn vip(port: u16, protocol: Protocol, backends: Vec<Backend>) -> VipService {
        VipService {
            name: format!("default/svc:{port}"),
            addr: ServiceAddr {
                ip: VIP,
                port,
                protocol,
            },
            kind: VipKind::ClusterIp,
            external_backends: backends.clone(),
            backends,
            external_local: false,
            affinity_secs: None,
        }
    }

    fn plan(vips: Vec<VipService>) -> ServicePlan {
        let mut vips = vips;
        vips.sort_by_key(|v| v.addr);
        ServicePlan {
            vips,
            node_ports: vec![],
        }
    }

    fn fe(port: u16, proto: u8) -> FrontendKey {
        (key_of(VIP), port.to_be(), proto)
    }

    fn slot(m: &FakeBpfMaps, port: u16, proto: u8, slot: u16) -> Option<LbSlot> {
        m.lb_svc.get(&slot_key(fe(port, proto), slot)).copied()
    }

    /// A connection from CLIENT:cport to the frontend, given backend b, as the programs
    /// record it: (forward key, forward, reverse key, reverse).
    fn conn(port: u16, proto: u8, cport: u16, b: &Backend) -> [(StackFlow, LbFlow); 2] {
        let fwd_k = StackFlow {
            saddr: key_of(CLIENT),
            daddr: key_of(VIP),
            sport: cport.to_be(),
            dport: port.to_be(),
            proto,
            pad: [0; 3],
        };
        let rev_k = StackFlow {
            saddr: key_of(b.ip),
            daddr: key_of(CLIENT),
            sport: b.port.to_be(),
            dport: cport.to_be(),
            proto,
            pad: [0; 3],
        };
        [
            (
                fwd_k,
                LbFlow {
                    nat_ip: key_of(b.ip),
                    nat_port: b.port.to_be(),
                    flags: 0,
                    peer_ip: 0,
                },
            ),
            (
                rev_k,
                LbFlow {
                    nat_ip: key_of(VIP),
                    nat_port: port.to_be(),
                    flags: LB_FLOW_REVERSE,
                    peer_ip: 0,
                },
            ),
        ]
    }

    fn record(m: &mut FakeBpfMaps, c: [(StackFlow, LbFlow); 2]) {
        for (k, v) in c {
            m.lb_ct.insert(k, v);
        }
    }

    #[test]
    fn frontends_get_their_backends_in_slots_after_a_count_of_them() {
        let mut m = FakeBpfMaps::default();
        let mut web = vip(80, Protocol::Tcp, vec![be(5, 8080), be(6, 8080)]);
        web.affinity_secs = Some(30);
        let dns = vip(53, Protocol::Udp, vec![be(7, 5353)]);
        let (r, installed) = sync(&mut m, &plan(vec![web, dns]), None).unwrap();
        assert_eq!(installed, read_installed(&m));
        assert_eq!(r.frontends, 2);
        assert_eq!(r.slots_written, 5);
        let head = slot(&m, 80, 6, 0).unwrap();
        assert_eq!((head.count, head.affinity_secs), (2, 30));
        let b2 = slot(&m, 80, 6, 2).unwrap();
        assert_eq!(
            (ip_of(b2.ip), u16::from_be(b2.port)),
            (Ipv4Addr::new(10, 244, 1, 6), 8080)
        );
        assert_eq!(slot(&m, 53, 17, 0).unwrap().count, 1);
        assert_eq!(m.lb_svc.len(), 5);
        // Backend slots are written before the count that makes them reachable.
        let w = &m.writes;
        let pos = |s: &str| w.iter().position(|x| x == s).unwrap();
        assert!(pos("lb_svc insert 10.96.0.10:80/6#2") < pos("lb_svc insert 10.96.0.10:80/6#0"));
        // The same plan again writes nothing.
        let n = m.writes.len();
        let again = plan(vec![
            {
                let mut w = vip(80, Protocol::Tcp, vec![be(5, 8080), be(6, 8080)]);
                w.affinity_secs = Some(30);
                w
            },
            vip(53, Protocol::Udp, vec![be(7, 5353)]),
        ]);
        let (r, _) = sync(&mut m, &again, Some(&installed)).unwrap();
        assert_eq!(m.writes.len(), n, "{:?}", &m.writes[n..]);
        assert!(!r.scanned);
        // Read from the map instead (a new process): still nothing to write.
        let (r, _) = sync(&mut m, &again, None).unwrap();
        assert_eq!(m.writes.len(), n, "{:?}", &m.writes[n..]);
        assert!(r.scanned);
    }

    #[test]
    fn a_frontend_without_backends_is_installed_with_count_zero() {
        let mut m = FakeBpfMaps::default();
        sync(&mut m, &plan(vec![vip(80, Protocol::Tcp, vec![])]), None).unwrap();
        assert_eq!(slot(&m, 80, 6, 0).unwrap().count, 0);
        assert_eq!(m.lb_svc.len(), 1);
    }

    #[test]
    fn removed_backends_shrink_the_frontend_and_flush_udp_but_drain_tcp() {
        let mut m = FakeBpfMaps::default();
        let (b5, b6) = (be(5, 8080), be(6, 8080));
        let p = plan(vec![
            vip(80, Protocol::Tcp, vec![b5.clone(), b6.clone()]),
            vip(53, Protocol::Udp, vec![b5.clone(), b6.clone()]),
        ]);
        let (_, installed) = sync(&mut m, &p, None).unwrap();
        let tcp6 = conn(80, 6, 40000, &b6);
        let tcp5 = conn(80, 6, 40001, &b5);
        let udp6 = conn(53, 17, 40002, &b6);
        let udp5 = conn(53, 17, 40003, &b5);
        for c in [tcp6, tcp5, udp6, udp5] {
            record(&mut m, c);
        }
        // Affinity of the client to b6 on the UDP frontend.
        let akey = LbAffinityKey {
            client: key_of(CLIENT),
            vip: key_of(VIP),
            port: 53u16.to_be(),
            proto: 17,
            pad: 0,
        };
        m.lb_aff.insert(
            akey,
            LbAffinity {
                last_ns: 1,
                ip: key_of(b6.ip),
                port: b6.port.to_be(),
                pad: 0,
            },
        );

        let p = plan(vec![
            vip(80, Protocol::Tcp, vec![b5.clone()]),
            vip(53, Protocol::Udp, vec![b5.clone()]),
        ]);
        let (r, _) = sync(&mut m, &p, Some(&installed)).unwrap();
        assert!(r.scanned);
        assert_eq!(slot(&m, 80, 6, 0).unwrap().count, 1);
        assert_eq!(slot(&m, 80, 6, 2), None);
        assert_eq!(slot(&m, 53, 17, 2), None);
        // UDP: both entries of the connection to b6 are gone; b5's stay.
        assert!(!m.lb_ct.contains_key(&udp6[0].0));
        assert!(!m.lb_ct.contains_key(&udp6[1].0));
        assert_eq!(m.lb_ct.get(&udp5[0].0), Some(&udp5[0].1));
        // TCP: the connection to b6 drains (forward entry stale, reverse kept); b5 untouched.
        assert_eq!(m.lb_ct[&tcp6[0].0].flags, LB_FLOW_STALE);
        assert_eq!(m.lb_ct[&tcp6[0].0].nat_ip, key_of(b6.ip));
        assert_eq!(m.lb_ct.get(&tcp6[1].0), Some(&tcp6[1].1));
        assert_eq!(m.lb_ct.get(&tcp5[0].0), Some(&tcp5[0].1));
        assert_eq!((r.flows_removed, r.flows_staled), (2, 1));
        // The affinity to b6 is gone.
        assert!(m.lb_aff.is_empty());
        assert_eq!(r.affinities_removed, 1);
        // A stale entry is not staled twice.
        let (r, _) = sync(&mut m, &p, None).unwrap();
        assert_eq!((r.flows_removed, r.flows_staled), (0, 0));
    }

    #[test]
    fn an_empty_plan_removes_everything_frontend_first() {
        let mut m = FakeBpfMaps::default();
        let b5 = be(5, 8080);
        let (_, installed) = sync(
            &mut m,
            &plan(vec![vip(80, Protocol::Tcp, vec![b5.clone(), be(6, 8080)])]),
            None,
        )
        .unwrap();
        record(&mut m, conn(80, 6, 40000, &b5));
        let n = m.writes.len();
        let (r, installed) = sync(&mut m, &ServicePlan::default(), Some(&installed)).unwrap();
        assert!(installed.is_empty());
        assert!(m.lb_svc.is_empty() && m.lb_ct.is_empty());
        assert_eq!(r.slots_removed, 3);
        assert_eq!(m.writes[n], "lb_svc remove 10.96.0.10:80/6#0");
    }

    #[test]
    fn a_restart_adopts_what_is_right_and_converges_on_the_rest() {
        // What an earlier agent process left: the frontend with a backend the plan no longer
        // has, another frontend, and entries of a connection to a frontend long gone.
        let mut m = FakeBpfMaps::default();
        let b5 = be(5, 8080);
        sync(
            &mut m,
            &plan(vec![
                vip(80, Protocol::Tcp, vec![b5.clone()]),
                vip(81, Protocol::Udp, vec![b5.clone()]),
            ]),
            None,
        )
        .unwrap();
        record(&mut m, conn(80, 6, 40000, &b5));
        record(&mut m, conn(99, 17, 40001, &b5));
        m.writes.clear();
        // The new process: only the TCP frontend, same backend.
        let p = plan(vec![vip(80, Protocol::Tcp, vec![b5.clone()])]);
        let (r, _) = sync(&mut m, &p, None).unwrap();
        // Nothing rewritten for the frontend that is right; the other one removed.
        assert!(
            m.writes.iter().all(|w| !w.contains("insert")),
            "{:?}",
            m.writes
        );
        assert_eq!(slot(&m, 80, 6, 0).unwrap().count, 1);
        assert_eq!(slot(&m, 81, 17, 0), None);
        // The connection to the frontend that is gone goes; the live one stays.
        assert_eq!(r.flows_removed, 2);
        assert_eq!(m.lb_ct.len(), 2);
    }

    #[test]
    fn sctp_with_port_translation_is_left_to_the_stack() {
        let mut m = FakeBpfMaps::default();
        let p = plan(vec![
            vip(80, Protocol::Sctp, vec![be(5, 8080)]),
            vip(81, Protocol::Sctp, vec![be(5, 81)]),
        ]);
        let (r, _) = sync(&mut m, &p, None).unwrap();
        assert_eq!(r.sctp_to_stack, 1);
        assert_eq!(slot(&m, 80, 132, 0), None);
        assert_eq!(slot(&m, 81, 132, 0).unwrap().count, 1);
    }

    #[test]
    fn dump_decodes_frontends_connections_and_affinity() {
        let mut m = FakeBpfMaps::default();
        let b5 = be(5, 8080);
        sync(
            &mut m,
            &plan(vec![vip(80, Protocol::Tcp, vec![b5.clone()])]),
            None,
        )
        .unwrap();
        record(&mut m, conn(80, 6, 40000, &b5));
        m.lb_aff.insert(
            LbAffinityKey {
                client: key_of(CLIENT),
                vip: key_of(VIP),
                port: 80u16.to_be(),
                proto: 6,
                pad: 0,
            },
            LbAffinity {
                last_ns: 1_000_000_000,
                ip: key_of(b5.ip),
                port: b5.port.to_be(),
                pad: 0,
            },
        );
        let d = dump(&m, 11_000_000_000);
        assert_eq!(d[0].name, "map FERREA_LB_SVC");
        assert_eq!(d[0].rows[0], ["10.96.0.10:80/tcp", "0", "-", "1", "0"]);
        assert_eq!(
            d[0].rows[1],
            ["10.96.0.10:80/tcp", "1", "10.244.1.5:8080", "-", "-"]
        );
        assert_eq!(
            d[1].rows[0],
            [
                "forward",
                "tcp",
                "10.244.1.9:40000",
                "10.96.0.10:80",
                "10.244.1.5:8080",
                "-"
            ]
        );
        assert_eq!(
            d[1].rows[1],
            [
                "reverse",
                "tcp",
                "10.244.1.5:8080",
                "10.244.1.9:40000",
                "10.96.0.10:80",
                "-"
            ]
        );
        assert_eq!(
            d[2].rows[0],
            ["10.244.1.9", "10.96.0.10:80/tcp", "10.244.1.5:8080", "10"]
        );
    }
}
