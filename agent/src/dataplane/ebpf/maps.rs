//! The eBPF backend's map bookkeeping: what it writes into the pinned maps for pods, remote
//! nodes and Egress, behind [`BpfMaps`] so it runs in unit tests without root.

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuHashMap, PerCpuValues};
use ferrea_common::{
    Counters, EgressSteer as SteerEntry, Endpoint, LbAffinity, LbAffinityKey, LbFlow, LbKey,
    LbSlot, MAP_COUNTERS, MAP_EGRESS_EXEMPT, MAP_EGRESS_HELD, MAP_EGRESS_STEER,
    MAP_ENDPOINTS_BY_IFINDEX, MAP_ENDPOINTS_BY_IP, MAP_REMOTE_NODES, RemoteNode as RemoteEntry,
    StackFlow,
};

use super::{ERR, endpoint_of, ip_of_key, sum_counters};
use crate::dataplane::{
    Cause, DataplaneError, DumpSection, EgressPlan, PodEndpoint, PodStats, RemoteNode, TUNNEL_VNI,
};

/// A key of an LPM map: (prefix length, network address in network byte order).
pub type Prefix = (u32, u32);

/// The pinned maps the programs read, as the backend changes them. Keys and addresses are
/// in network byte order, as the programs read them from packets.
///
/// Contract: each method is one map operation (the kernel applies it atomically; there is no
/// transaction across maps, so the callers order their writes); removing an absent key is no
/// error; listings are snapshots. Not safe concurrently by itself: the backend holds it
/// behind its lock.
///
/// Implementations: [`AyaMaps`] (the kernel's maps through aya) and, for tests,
/// `testing::bpf::FakeBpfMaps` (in memory).
pub trait BpfMaps: Send {
    /// The endpoint with this IP key, if any.
    fn endpoint_by_ip(&self, ip: u32) -> Option<Endpoint>;
    /// The endpoint on this interface, if any.
    fn endpoint_by_ifindex(&self, ifindex: u32) -> Option<Endpoint>;
    /// Every (IP key, endpoint) of the by-IP map.
    fn endpoints_by_ip(&self) -> Vec<(u32, Endpoint)>;
    /// Every key of the by-ifindex map.
    fn endpoint_ifindexes(&self) -> Vec<u32>;
    /// Inserts or replaces the endpoint of an IP key.
    fn insert_endpoint_by_ip(&mut self, ip: u32, e: Endpoint) -> Result<(), MapError>;
    /// Inserts or replaces the endpoint of an interface.
    fn insert_endpoint_by_ifindex(&mut self, ifindex: u32, e: Endpoint) -> Result<(), MapError>;
    /// Removes the endpoint of an IP key.
    fn remove_endpoint_by_ip(&mut self, ip: u32);
    /// Removes the endpoint of an interface.
    fn remove_endpoint_by_ifindex(&mut self, ifindex: u32);

    /// The per-CPU counters of an interface; `None` if it has none.
    fn counters(&self, ifindex: u32) -> Result<Option<Vec<Counters>>, MapError>;
    /// Every interface with counters.
    fn counter_ifindexes(&self) -> Vec<u32>;
    /// Gives an interface zeroed counters on every CPU.
    fn zero_counters(&mut self, ifindex: u32) -> Result<(), Cause>;
    /// Removes an interface's counters.
    fn remove_counters(&mut self, ifindex: u32);

    /// Every prefix of the remote-node map.
    fn remote_prefixes(&self) -> Vec<Prefix>;
    /// The entry of a remote node's pod CIDR, if any.
    fn remote(&self, p: Prefix) -> Option<RemoteEntry>;
    /// Inserts or replaces a remote node's pod CIDR.
    fn insert_remote(&mut self, p: Prefix, v: RemoteEntry) -> Result<(), MapError>;
    /// Removes a remote node's pod CIDR.
    fn remove_remote(&mut self, p: Prefix);

    /// Every prefix of the Egress exemption map.
    fn exempt_prefixes(&self) -> Vec<Prefix>;
    /// Adds an exempt prefix.
    fn insert_exempt(&mut self, p: Prefix) -> Result<(), MapError>;
    /// Removes an exempt prefix.
    fn remove_exempt(&mut self, p: Prefix);
    /// Every Egress id whose IP this node holds.
    fn held_ids(&self) -> Vec<u32>;
    /// Marks an Egress id as held.
    fn insert_held(&mut self, id: u32) -> Result<(), MapError>;
    /// Marks an Egress id as no longer held.
    fn remove_held(&mut self, id: u32);
    /// The steering of a pod IP key, if any.
    fn steer(&self, pod: u32) -> Option<SteerEntry>;
    /// Every steered pod IP key.
    fn steered(&self) -> Vec<u32>;
    /// Inserts or replaces a pod's steering.
    fn insert_steer(&mut self, pod: u32, v: SteerEntry) -> Result<(), MapError>;
    /// Removes a pod's steering.
    fn remove_steer(&mut self, pod: u32);

    /// Every entry of the service proxy's frontend map (`FERREA_LB_SVC`).
    fn lb_slots(&self) -> Vec<(LbKey, LbSlot)>;
    /// Inserts or replaces a frontend or backend slot.
    fn insert_lb_slot(&mut self, k: LbKey, v: LbSlot) -> Result<(), MapError>;
    /// Removes a frontend or backend slot.
    fn remove_lb_slot(&mut self, k: LbKey);
    /// Every entry of the service proxy's connection table (`FERREA_LB_CT`): a snapshot of a
    /// map the programs change concurrently.
    fn lb_flows(&self) -> Vec<(StackFlow, LbFlow)>;
    /// Replaces an existing connection-table entry; an entry that is gone (evicted, or
    /// removed by the programs) stays gone and is no error.
    fn update_lb_flow(&mut self, k: StackFlow, v: LbFlow) -> Result<(), MapError>;
    /// Removes a connection-table entry.
    fn remove_lb_flow(&mut self, k: StackFlow);
    /// Every session-affinity entry (`FERREA_LB_AFF`).
    fn lb_affinities(&self) -> Vec<(LbAffinityKey, LbAffinity)>;
    /// Removes a session-affinity entry.
    fn remove_lb_affinity(&mut self, k: LbAffinityKey);
}

/// The pinned maps through aya.
pub struct AyaMaps {
    /// `FERREA_EP_IF`.
    pub ep_if: BpfHashMap<MapData, u32, Endpoint>,
    /// `FERREA_EP_IP`.
    pub ep_ip: BpfHashMap<MapData, u32, Endpoint>,
    /// The per-pod counters.
    pub counters: PerCpuHashMap<MapData, u32, Counters>,
    /// The remote nodes' pod CIDRs.
    pub remote: LpmTrie<MapData, u32, RemoteEntry>,
    /// Steered pods.
    pub eg_steer: BpfHashMap<MapData, u32, SteerEntry>,
    /// Destinations never steered.
    pub eg_exempt: LpmTrie<MapData, u32, u32>,
    /// Held Egress ids.
    pub eg_held: BpfHashMap<MapData, u32, u32>,
    /// The service proxy's frontends and backend slots.
    pub lb_svc: BpfHashMap<MapData, LbKey, LbSlot>,
    /// The service proxy's connection table (an LRU hash).
    pub lb_ct: BpfHashMap<MapData, StackFlow, LbFlow>,
    /// Session affinity (an LRU hash).
    pub lb_aff: BpfHashMap<MapData, LbAffinityKey, LbAffinity>,
}

/// `BPF_EXIST`: update only a key that is present.
const BPF_EXIST: u64 = 2;

fn lpm(p: Prefix) -> LpmKey<u32> {
    LpmKey::new(p.0, p.1)
}

impl BpfMaps for AyaMaps {
    fn endpoint_by_ip(&self, ip: u32) -> Option<Endpoint> {
        self.ep_ip.get(&ip, 0).ok()
    }
    fn endpoint_by_ifindex(&self, ifindex: u32) -> Option<Endpoint> {
        self.ep_if.get(&ifindex, 0).ok()
    }
    fn endpoints_by_ip(&self) -> Vec<(u32, Endpoint)> {
        self.ep_ip.iter().filter_map(Result::ok).collect()
    }
    fn endpoint_ifindexes(&self) -> Vec<u32> {
        self.ep_if.keys().filter_map(Result::ok).collect()
    }
    fn insert_endpoint_by_ip(&mut self, ip: u32, e: Endpoint) -> Result<(), MapError> {
        self.ep_ip.insert(ip, e, 0)
    }
    fn insert_endpoint_by_ifindex(&mut self, ifindex: u32, e: Endpoint) -> Result<(), MapError> {
        self.ep_if.insert(ifindex, e, 0)
    }
    fn remove_endpoint_by_ip(&mut self, ip: u32) {
        let _ = self.ep_ip.remove(&ip);
    }
    fn remove_endpoint_by_ifindex(&mut self, ifindex: u32) {
        let _ = self.ep_if.remove(&ifindex);
    }
    fn counters(&self, ifindex: u32) -> Result<Option<Vec<Counters>>, MapError> {
        match self.counters.get(&ifindex, 0) {
            Ok(v) => Ok(Some(v.iter().copied().collect())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn counter_ifindexes(&self) -> Vec<u32> {
        self.counters.keys().filter_map(Result::ok).collect()
    }
    fn zero_counters(&mut self, ifindex: u32) -> Result<(), Cause> {
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| Cause::Io(e))?;
        let zero = PerCpuValues::try_from(vec![Counters::default(); ncpu])?;
        Ok(self.counters.insert(ifindex, zero, 0)?)
    }
    fn remove_counters(&mut self, ifindex: u32) {
        let _ = self.counters.remove(&ifindex);
    }
    fn remote_prefixes(&self) -> Vec<Prefix> {
        self.remote
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.prefix_len(), k.data()))
            .collect()
    }
    fn remote(&self, p: Prefix) -> Option<RemoteEntry> {
        self.remote.get(&lpm(p), 0).ok()
    }
    fn insert_remote(&mut self, p: Prefix, v: RemoteEntry) -> Result<(), MapError> {
        self.remote.insert(&lpm(p), v, 0)
    }
    fn remove_remote(&mut self, p: Prefix) {
        let _ = self.remote.remove(&lpm(p));
    }
    fn exempt_prefixes(&self) -> Vec<Prefix> {
        self.eg_exempt
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.prefix_len(), k.data()))
            .collect()
    }
    fn insert_exempt(&mut self, p: Prefix) -> Result<(), MapError> {
        self.eg_exempt.insert(&lpm(p), 1, 0)
    }
    fn remove_exempt(&mut self, p: Prefix) {
        let _ = self.eg_exempt.remove(&lpm(p));
    }
    fn held_ids(&self) -> Vec<u32> {
        self.eg_held.keys().filter_map(Result::ok).collect()
    }
    fn insert_held(&mut self, id: u32) -> Result<(), MapError> {
        self.eg_held.insert(id, 1, 0)
    }
    fn remove_held(&mut self, id: u32) {
        let _ = self.eg_held.remove(&id);
    }
    fn steer(&self, pod: u32) -> Option<SteerEntry> {
        self.eg_steer.get(&pod, 0).ok()
    }
    fn steered(&self) -> Vec<u32> {
        self.eg_steer.keys().filter_map(Result::ok).collect()
    }
    fn insert_steer(&mut self, pod: u32, v: SteerEntry) -> Result<(), MapError> {
        self.eg_steer.insert(pod, v, 0)
    }
    fn remove_steer(&mut self, pod: u32) {
        let _ = self.eg_steer.remove(&pod);
    }
    fn lb_slots(&self) -> Vec<(LbKey, LbSlot)> {
        self.lb_svc.iter().filter_map(Result::ok).collect()
    }
    fn insert_lb_slot(&mut self, k: LbKey, v: LbSlot) -> Result<(), MapError> {
        self.lb_svc.insert(k, v, 0)
    }
    fn remove_lb_slot(&mut self, k: LbKey) {
        let _ = self.lb_svc.remove(&k);
    }
    fn lb_flows(&self) -> Vec<(StackFlow, LbFlow)> {
        self.lb_ct.iter().filter_map(Result::ok).collect()
    }
    fn update_lb_flow(&mut self, k: StackFlow, v: LbFlow) -> Result<(), MapError> {
        match self.lb_ct.insert(k, v, BPF_EXIST) {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            r => r,
        }
    }
    fn remove_lb_flow(&mut self, k: StackFlow) {
        let _ = self.lb_ct.remove(&k);
    }
    fn lb_affinities(&self) -> Vec<(LbAffinityKey, LbAffinity)> {
        self.lb_aff.iter().filter_map(Result::ok).collect()
    }
    fn remove_lb_affinity(&mut self, k: LbAffinityKey) {
        let _ = self.lb_aff.remove(&k);
    }
}

fn prefix_of(n: ipnetwork::Ipv4Network) -> Prefix {
    (
        u32::from(n.prefix()),
        u32::from_ne_bytes(n.network().octets()),
    )
}

/// Makes the remote-node map exactly `nodes`; `tun_ifindex` is the tunnel device (0 in
/// noEncap mode).
pub fn sync_remote(
    m: &mut dyn BpfMaps,
    nodes: &[RemoteNode],
    tun_ifindex: u32,
) -> Result<(), DataplaneError> {
    let want: Vec<(Prefix, RemoteEntry)> = nodes
        .iter()
        .map(|n| {
            (
                prefix_of(n.pod_cidr),
                RemoteEntry {
                    node_ip: u32::from_ne_bytes(n.node_ip.octets()),
                    vni: TUNNEL_VNI,
                    tun_ifindex,
                },
            )
        })
        .collect();
    for k in m.remote_prefixes() {
        if !want.iter().any(|(w, _)| *w == k) {
            m.remove_remote(k);
        }
    }
    for (k, v) in &want {
        m.insert_remote(*k, *v)
            .map_err(ERR.other("insert into", format!("map {MAP_REMOTE_NODES}")))?;
    }
    Ok(())
}

/// Makes the three Egress maps exactly `plan` (entries that are already right are not
/// rewritten). Order: new exempt prefixes first and stale ones last, so a steered pod never
/// has a moment in which a destination that stays exempt is steered.
pub fn sync_egress(
    m: &mut dyn BpfMaps,
    plan: &EgressPlan,
    tun_ifindex: u32,
) -> Result<(), DataplaneError> {
    let exempt: Vec<Prefix> = plan.exempt.iter().map(|n| prefix_of(*n)).collect();
    let have_exempt = m.exempt_prefixes();
    for k in &exempt {
        if !have_exempt.contains(k) {
            m.insert_exempt(*k)
                .map_err(ERR.other("insert into", format!("map {MAP_EGRESS_EXEMPT}")))?;
        }
    }

    let held: BTreeSet<u32> = plan.held.iter().map(|&id| u32::from(id)).collect();
    let have_held: BTreeSet<u32> = m.held_ids().into_iter().collect();
    for &id in held.difference(&have_held) {
        m.insert_held(id)
            .map_err(ERR.other("insert into", format!("map {MAP_EGRESS_HELD}")))?;
    }

    let want: Vec<(u32, SteerEntry)> = plan
        .steer
        .iter()
        .map(|s| {
            (
                u32::from_ne_bytes(s.pod_ip.octets()),
                SteerEntry {
                    node_ip: u32::from_ne_bytes(s.node_ip.octets()),
                    id: u32::from(s.id),
                    tun_ifindex,
                },
            )
        })
        .collect();
    for k in m.steered() {
        if !want.iter().any(|(w, _)| *w == k) {
            m.remove_steer(k);
        }
    }
    for (k, v) in &want {
        if m.steer(*k).as_ref() != Some(v) {
            m.insert_steer(*k, *v)
                .map_err(ERR.other("insert into", format!("map {MAP_EGRESS_STEER}")))?;
        }
    }

    for &id in have_held.difference(&held) {
        m.remove_held(id);
    }
    for k in have_exempt {
        if !exempt.contains(&k) {
            m.remove_exempt(k);
        }
    }
    Ok(())
}

/// Removes a pod's map entries and counters. Missing entries are fine.
pub fn forget(m: &mut dyn BpfMaps, ifindex: u32, ip: Ipv4Addr) {
    let key = u32::from_ne_bytes(ip.octets());
    // Only remove the IP entry if it still belongs to this interface (a re-add of the same
    // IP on a new veth must not be undone by a late delete of the old one).
    if m.endpoint_by_ip(key)
        .is_some_and(|cur| cur.ifindex == ifindex)
    {
        m.remove_endpoint_by_ip(key);
    }
    if m.endpoint_by_ifindex(ifindex)
        .is_some_and(|cur| cur.ipv4 == key)
    {
        m.remove_endpoint_by_ifindex(ifindex);
    }
    m.remove_counters(ifindex);
}

/// Inserts (or replaces) a pod's endpoint under its interface and its IP, with zeroed
/// counters if it has none.
pub fn insert(m: &mut dyn BpfMaps, ep: &PodEndpoint) -> Result<(), DataplaneError> {
    let e = endpoint_of(ep);
    let ifname = ep.host_ifname.as_str();
    // Re-adding an IP on another interface: drop the old interface's entry first.
    if let Some(old) = m.endpoint_by_ip(e.ipv4)
        && old.ifindex != e.ifindex
    {
        m.remove_endpoint_by_ifindex(old.ifindex);
    }
    let has_counters = m
        .counters(e.ifindex)
        .map_err(ERR.pod("read counters", ifname))?
        .is_some();
    if !has_counters {
        m.zero_counters(e.ifindex)
            .map_err(ERR.pod("init counters", ifname))?;
    }
    m.insert_endpoint_by_ifindex(e.ifindex, e)
        .map_err(ERR.pod("insert endpoint by ifindex", ifname))?;
    m.insert_endpoint_by_ip(e.ipv4, e)
        .map_err(ERR.pod("insert endpoint by IP", ifname))?;
    Ok(())
}

/// Forgets every endpoint whose IP is not in `keep`, and the interface entries and counters
/// no kept endpoint refers to; returns the endpoints forgotten.
pub fn retain(m: &mut dyn BpfMaps, keep: &HashSet<Ipv4Addr>) -> Vec<Endpoint> {
    let mut stale = Vec::new();
    for (key, e) in m.endpoints_by_ip() {
        let ip = ip_of_key(key);
        if !keep.contains(&ip) {
            forget(m, e.ifindex, ip);
            stale.push(e);
        }
    }
    // Orphans: interface entries and counters no kept endpoint refers to.
    let live: HashSet<u32> = m.endpoints_by_ip().iter().map(|(_, e)| e.ifindex).collect();
    for k in m.endpoint_ifindexes() {
        if !live.contains(&k) {
            m.remove_endpoint_by_ifindex(k);
        }
    }
    for k in m.counter_ifindexes() {
        if !live.contains(&k) {
            m.remove_counters(k);
        }
    }
    stale
}

/// A pod's counters summed over the CPUs; `None` if its interface has none.
pub fn stats(m: &dyn BpfMaps, ep: &PodEndpoint) -> Result<Option<PodStats>, DataplaneError> {
    let per_cpu = m
        .counters(ep.host_ifindex)
        .map_err(ERR.pod("read counters", &ep.host_ifname))?;
    Ok(per_cpu.map(|c| sum_counters(c.iter())))
}

/// The maps decoded into named fields, for the debug API: endpoints (by IP and by
/// interface), counters summed over the CPUs, remote nodes, and the Egress maps. `pod`: only
/// that pod's entries (and no node-wide map).
pub fn dump(m: &dyn BpfMaps, pod: Option<&PodEndpoint>) -> Vec<DumpSection> {
    let mac = |b: &[u8; 6]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let keep_ip = |key: u32| pod.is_none_or(|p| ip_of_key(key) == p.ip);
    let keep_if = |ifindex: u32| pod.is_none_or(|p| p.host_ifindex == ifindex);
    let mut by_ip = DumpSection::new(
        format!("map {MAP_ENDPOINTS_BY_IP}"),
        &["ip", "ifindex", "pod_mac", "host_mac"],
    );
    let mut eps = m.endpoints_by_ip();
    eps.sort_by_key(|(k, _)| ip_of_key(*k));
    for (k, e) in eps.into_iter().filter(|(k, _)| keep_ip(*k)) {
        by_ip.rows.push(vec![
            ip_of_key(k).to_string(),
            e.ifindex.to_string(),
            mac(&e.pod_mac),
            mac(&e.host_mac),
        ]);
    }
    let mut by_if = DumpSection::new(
        format!("map {MAP_ENDPOINTS_BY_IFINDEX}"),
        &["ifindex", "ip", "pod_mac", "host_mac"],
    );
    let mut ifs = m.endpoint_ifindexes();
    ifs.sort_unstable();
    for i in ifs.into_iter().filter(|i| keep_if(*i)) {
        if let Some(e) = m.endpoint_by_ifindex(i) {
            by_if.rows.push(vec![
                i.to_string(),
                ip_of_key(e.ipv4).to_string(),
                mac(&e.pod_mac),
                mac(&e.host_mac),
            ]);
        }
    }
    let mut counters = DumpSection::new(
        format!("map {MAP_COUNTERS}"),
        &[
            "ifindex",
            "tx_packets",
            "tx_bytes",
            "rx_packets",
            "rx_bytes",
            "drop_spoofed",
            "arp_replies",
            "drop_other",
        ],
    );
    let mut cifs = m.counter_ifindexes();
    cifs.sort_unstable();
    for i in cifs.into_iter().filter(|i| keep_if(*i)) {
        if let Ok(Some(slots)) = m.counters(i) {
            let st = sum_counters(slots.iter());
            let arp: u64 = slots.iter().map(|c| c.arp_replies).sum();
            counters.rows.push(vec![
                i.to_string(),
                st.tx_packets.to_string(),
                st.tx_bytes.to_string(),
                st.rx_packets.to_string(),
                st.rx_bytes.to_string(),
                st.drop_spoofed.to_string(),
                arp.to_string(),
                st.drop_other.to_string(),
            ]);
        }
    }
    let mut out = vec![by_ip, by_if, counters];
    let mut steer = DumpSection::new(
        format!("map {MAP_EGRESS_STEER}"),
        &["pod_ip", "egress_node_ip", "egress_id", "tunnel_ifindex"],
    );
    let mut steered = m.steered();
    steered.sort_by_key(|k| ip_of_key(*k));
    for k in steered.into_iter().filter(|k| keep_ip(*k)) {
        if let Some(v) = m.steer(k) {
            steer.rows.push(vec![
                ip_of_key(k).to_string(),
                ip_of_key(v.node_ip).to_string(),
                v.id.to_string(),
                v.tun_ifindex.to_string(),
            ]);
        }
    }
    out.push(steer);
    if pod.is_some() {
        return out;
    }
    let prefix = |(len, net): Prefix| format!("{}/{len}", ip_of_key(net));
    let mut remote = DumpSection::new(
        format!("map {MAP_REMOTE_NODES}"),
        &["pod_cidr", "node_ip", "vni"],
    );
    let mut rp = m.remote_prefixes();
    rp.sort_by_key(|(l, n)| (ip_of_key(*n), *l));
    for p in rp {
        if let Some(v) = m.remote(p) {
            remote.rows.push(vec![
                prefix(p),
                ip_of_key(v.node_ip).to_string(),
                v.vni.to_string(),
            ]);
        }
    }
    let mut exempt = DumpSection::new(format!("map {MAP_EGRESS_EXEMPT}"), &["prefix"]);
    let mut ex = m.exempt_prefixes();
    ex.sort_by_key(|(l, n)| (ip_of_key(*n), *l));
    exempt.rows = ex.into_iter().map(|p| vec![prefix(p)]).collect();
    let mut held = DumpSection::new(format!("map {MAP_EGRESS_HELD}"), &["egress_id"]);
    let mut ids = m.held_ids();
    ids.sort_unstable();
    held.rows = ids.into_iter().map(|id| vec![id.to_string()]).collect();
    out.extend([remote, exempt, held]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::EgressSteer;
    use crate::testing::bpf::FakeBpfMaps;

    fn ep(ifindex: u32, last: u8) -> PodEndpoint {
        PodEndpoint {
            container_id: format!("c{last}"),
            host_ifname: format!("fe{last}"),
            host_ifindex: ifindex,
            host_mac: [2, 0, 0, 0, 1, last],
            pod_mac: [2, 0, 0, 0, 2, last],
            ip: Ipv4Addr::new(10, 244, 1, last),
        }
    }

    fn key(ip: [u8; 4]) -> u32 {
        u32::from_ne_bytes(ip)
    }

    #[test]
    fn dump_decodes_maps_into_named_fields_and_filters_by_pod() {
        let mut m = FakeBpfMaps::default();
        insert(&mut m, &ep(7, 5)).unwrap();
        insert(&mut m, &ep(8, 6)).unwrap();
        let remote = RemoteNode {
            name: "n2".into(),
            node_ip: Ipv4Addr::new(172, 18, 0, 12),
            pod_cidr: "10.244.2.0/24".parse().unwrap(),
        };
        sync_remote(&mut m, &[remote], 3).unwrap();
        let all = dump(&m, None);
        let sec = |d: &[DumpSection], n: &str| {
            d.iter()
                .find(|s| s.name == n)
                .unwrap_or_else(|| panic!("no {n}"))
                .clone()
        };
        let by_ip = sec(&all, "map FERREA_EP_IP");
        assert_eq!(by_ip.columns, ["ip", "ifindex", "pod_mac", "host_mac"]);
        assert_eq!(
            by_ip.rows[0],
            ["10.244.1.5", "7", "02:00:00:00:02:05", "02:00:00:00:01:05"]
        );
        assert_eq!(by_ip.rows.len(), 2);
        let remote = sec(&all, "map FERREA_REMOTE");
        assert_eq!(
            remote.rows,
            [["10.244.2.0/24", "172.18.0.12", &TUNNEL_VNI.to_string()]]
        );
        assert_eq!(sec(&all, "map FERREA_POD_CNT").rows[0][1], "0");
        // One pod: its entries only, and no node-wide maps.
        let one = dump(&m, Some(&ep(8, 6)));
        assert_eq!(sec(&one, "map FERREA_EP_IP").rows.len(), 1);
        assert_eq!(sec(&one, "map FERREA_EP_IF").rows[0][0], "8");
        assert!(one.iter().all(|s| s.name != "map FERREA_REMOTE"));
    }

    #[test]
    fn insert_writes_both_endpoint_maps_and_zeroed_counters() {
        let mut m = FakeBpfMaps::default();
        let a = ep(7, 5);
        insert(&mut m, &a).unwrap();
        let e = endpoint_of(&a);
        assert_eq!(m.ep_if.get(&7), Some(&e));
        assert_eq!(m.ep_ip.get(&key([10, 244, 1, 5])), Some(&e));
        assert_eq!(
            m.counters.get(&7),
            Some(&vec![Counters::default(); FakeBpfMaps::CPUS])
        );
        // Counters survive a re-add (an agent restart re-adds every pod).
        m.counters.get_mut(&7).unwrap()[1].tx_packets = 9;
        insert(&mut m, &a).unwrap();
        assert_eq!(m.counters[&7][1].tx_packets, 9);
    }

    #[test]
    fn the_same_ip_on_a_new_interface_replaces_the_old_entry() {
        let mut m = FakeBpfMaps::default();
        insert(&mut m, &ep(7, 5)).unwrap();
        insert(&mut m, &ep(8, 5)).unwrap();
        assert_eq!(m.ep_if.keys().copied().collect::<Vec<_>>(), vec![8]);
        assert_eq!(m.ep_ip[&key([10, 244, 1, 5])].ifindex, 8);
        // A late delete of the old interface leaves the new one alone.
        forget(&mut m, 7, Ipv4Addr::new(10, 244, 1, 5));
        assert_eq!(m.ep_ip[&key([10, 244, 1, 5])].ifindex, 8);
        assert!(m.ep_if.contains_key(&8));
        forget(&mut m, 8, Ipv4Addr::new(10, 244, 1, 5));
        assert!(m.ep_ip.is_empty() && m.ep_if.is_empty());
        assert!(!m.counters.contains_key(&8));
    }

    #[test]
    fn retain_forgets_unkept_pods_and_orphans() {
        let mut m = FakeBpfMaps::default();
        insert(&mut m, &ep(7, 5)).unwrap();
        insert(&mut m, &ep(8, 6)).unwrap();
        // An orphan: an interface entry and counters no IP entry points to.
        m.ep_if.insert(9, Endpoint::default());
        m.counters.insert(9, vec![Counters::default()]);
        let stale = retain(&mut m, &HashSet::from([Ipv4Addr::new(10, 244, 1, 5)]));
        assert_eq!(stale, vec![endpoint_of(&ep(8, 6))]);
        assert_eq!(
            m.ep_ip.keys().copied().collect::<Vec<_>>(),
            vec![key([10, 244, 1, 5])]
        );
        assert_eq!(m.ep_if.keys().copied().collect::<Vec<_>>(), vec![7]);
        assert_eq!(m.counters.keys().copied().collect::<Vec<_>>(), vec![7]);
    }

    #[test]
    fn stats_sum_over_cpus_and_unknown_pods_have_none() {
        let mut m = FakeBpfMaps::default();
        let a = ep(7, 5);
        assert_eq!(stats(&m, &a).unwrap(), None);
        insert(&mut m, &a).unwrap();
        let c = m.counters.get_mut(&7).unwrap();
        c[0].rx_packets = 2;
        c[1].rx_packets = 3;
        c[1].drop_spoofed = 1;
        c[0].drop_other = 4;
        c[1].drop_other = 2;
        let st = stats(&m, &a).unwrap().unwrap();
        assert_eq!((st.rx_packets, st.drop_spoofed, st.tx_packets), (5, 1, 0));
        assert_eq!(st.drop_other, 6);
    }

    #[test]
    fn remote_nodes_are_made_exactly_the_list() {
        let mut m = FakeBpfMaps::default();
        let node = |cidr: &str, ip: [u8; 4]| RemoteNode {
            name: cidr.into(),
            node_ip: ip.into(),
            pod_cidr: cidr.parse().unwrap(),
        };
        sync_remote(
            &mut m,
            &[
                node("10.244.2.0/24", [172, 18, 0, 12]),
                node("10.244.3.0/24", [172, 18, 0, 13]),
            ],
            4,
        )
        .unwrap();
        assert_eq!(m.remote.len(), 2);
        let two = (24, key([10, 244, 2, 0]));
        assert_eq!(
            m.remote[&two],
            RemoteEntry {
                node_ip: key([172, 18, 0, 12]),
                vni: TUNNEL_VNI,
                tun_ifindex: 4,
            }
        );
        // Node 3 leaves; noEncap (tunnel index 0).
        sync_remote(&mut m, &[node("10.244.2.0/24", [172, 18, 0, 12])], 0).unwrap();
        assert_eq!(m.remote.keys().copied().collect::<Vec<_>>(), vec![two]);
        assert_eq!(m.remote[&two].tun_ifindex, 0);
    }

    #[test]
    fn egress_maps_follow_the_plan_with_exemptions_first_and_last() {
        let mut m = FakeBpfMaps::default();
        let steer = EgressSteer {
            pod_ip: Ipv4Addr::new(10, 244, 1, 5),
            node_ip: Ipv4Addr::new(172, 18, 0, 12),
            id: 3,
        };
        let plan = EgressPlan {
            steer: vec![steer],
            exempt: vec!["10.244.0.0/16".parse().unwrap()],
            held: vec![4, 9],
        };
        sync_egress(&mut m, &plan, 4).unwrap();
        assert_eq!(
            m.steer[&key([10, 244, 1, 5])],
            SteerEntry {
                node_ip: key([172, 18, 0, 12]),
                id: 3,
                tun_ifindex: 4,
            }
        );
        assert_eq!(
            m.exempt.iter().copied().collect::<Vec<_>>(),
            vec![(16, key([10, 244, 0, 0]))]
        );
        assert_eq!(m.held.iter().copied().collect::<Vec<_>>(), vec![4, 9]);
        // Unchanged plan: no writes.
        let n = m.writes.len();
        sync_egress(&mut m, &plan, 4).unwrap();
        assert_eq!(m.writes.len(), n, "{:?}", &m.writes[n..]);

        // A new exemption replaces the old one: added before the steering changes, the old
        // one removed last.
        let next = EgressPlan {
            steer: vec![],
            exempt: vec!["10.96.0.0/12".parse().unwrap()],
            held: vec![9],
        };
        sync_egress(&mut m, &next, 4).unwrap();
        let w = &m.writes[n..];
        assert_eq!(
            w.first().unwrap(),
            &format!("exempt insert {:?}", (12, key([10, 96, 0, 0])))
        );
        assert_eq!(
            w.last().unwrap(),
            &format!("exempt remove {:?}", (16, key([10, 244, 0, 0])))
        );
        assert!(w.contains(&"held remove 4".to_owned()), "{w:?}");
        assert!(m.steer.is_empty());
        assert_eq!(m.held.iter().copied().collect::<Vec<_>>(), vec![9]);
    }
}
