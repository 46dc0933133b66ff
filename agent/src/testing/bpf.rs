//! An in-memory fake of the eBPF backend's maps ([`BpfMaps`]).

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapError;
use ferrea_common::{
    Counters, EgressSteer as SteerEntry, Endpoint, LbAffinity, LbAffinityKey, LbFlow, LbKey,
    LbSlot, RemoteNode as RemoteEntry, StackFlow,
};

use crate::dataplane::Cause;
use crate::dataplane::ebpf::maps::{BpfMaps, Prefix};

/// The maps as plain collections; counters have [`FakeBpfMaps::CPUS`] slots. `held` holds at
/// most [`ferrea_common::MAX_EGRESS_HELD`] ids, as the real map.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FakeBpfMaps {
    /// Endpoints by IP key.
    pub ep_ip: BTreeMap<u32, Endpoint>,
    /// Endpoints by ifindex.
    pub ep_if: BTreeMap<u32, Endpoint>,
    /// Per-CPU counters by ifindex.
    pub counters: BTreeMap<u32, Vec<Counters>>,
    /// Remote nodes by prefix.
    pub remote: BTreeMap<Prefix, RemoteEntry>,
    /// Exempt prefixes.
    pub exempt: BTreeSet<Prefix>,
    /// Held Egress ids.
    pub held: BTreeSet<u32>,
    /// Steered pods by IP key.
    pub steer: BTreeMap<u32, SteerEntry>,
    /// The service proxy's frontend and backend slots.
    pub lb_svc: BTreeMap<LbKey, LbSlot>,
    /// The service proxy's connection table.
    pub lb_ct: BTreeMap<StackFlow, LbFlow>,
    /// Session affinity.
    pub lb_aff: BTreeMap<LbAffinityKey, LbAffinity>,
    /// Every write (insert, set, remove of a present key), as `map key`, in order.
    pub writes: Vec<String>,
}

impl FakeBpfMaps {
    /// CPUs the fake counts on.
    pub const CPUS: usize = 2;
}

/// A full hash map refuses a new key as the kernel does (`E2BIG`).
fn held_room(m: &FakeBpfMaps, id: u32) -> Result<(), MapError> {
    if m.held.len() as u32 >= ferrea_common::MAX_EGRESS_HELD && !m.held.contains(&id) {
        return Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(nix::libc::E2BIG),
        }));
    }
    Ok(())
}

impl BpfMaps for FakeBpfMaps {
    fn endpoint_by_ip(&self, ip: u32) -> Option<Endpoint> {
        self.ep_ip.get(&ip).copied()
    }
    fn endpoint_by_ifindex(&self, ifindex: u32) -> Option<Endpoint> {
        self.ep_if.get(&ifindex).copied()
    }
    fn endpoints_by_ip(&self) -> Vec<(u32, Endpoint)> {
        self.ep_ip.iter().map(|(k, v)| (*k, *v)).collect()
    }
    fn endpoint_ifindexes(&self) -> Vec<u32> {
        self.ep_if.keys().copied().collect()
    }
    fn insert_endpoint_by_ip(&mut self, ip: u32, e: Endpoint) -> Result<(), MapError> {
        self.writes.push(format!("ep_ip insert {ip:#x}"));
        self.ep_ip.insert(ip, e);
        Ok(())
    }
    fn insert_endpoint_by_ifindex(&mut self, ifindex: u32, e: Endpoint) -> Result<(), MapError> {
        self.writes.push(format!("ep_if insert {ifindex}"));
        self.ep_if.insert(ifindex, e);
        Ok(())
    }
    fn remove_endpoint_by_ip(&mut self, ip: u32) {
        if self.ep_ip.remove(&ip).is_some() {
            self.writes.push(format!("ep_ip remove {ip:#x}"));
        }
    }
    fn remove_endpoint_by_ifindex(&mut self, ifindex: u32) {
        if self.ep_if.remove(&ifindex).is_some() {
            self.writes.push(format!("ep_if remove {ifindex}"));
        }
    }
    fn counters(&self, ifindex: u32) -> Result<Option<Vec<Counters>>, MapError> {
        Ok(self.counters.get(&ifindex).cloned())
    }
    fn counter_ifindexes(&self) -> Vec<u32> {
        self.counters.keys().copied().collect()
    }
    fn zero_counters(&mut self, ifindex: u32) -> Result<(), Cause> {
        self.writes.push(format!("counters insert {ifindex}"));
        self.counters
            .insert(ifindex, vec![Counters::default(); Self::CPUS]);
        Ok(())
    }
    fn remove_counters(&mut self, ifindex: u32) {
        if self.counters.remove(&ifindex).is_some() {
            self.writes.push(format!("counters remove {ifindex}"));
        }
    }
    fn remote_prefixes(&self) -> Vec<Prefix> {
        self.remote.keys().copied().collect()
    }
    fn remote(&self, p: Prefix) -> Option<RemoteEntry> {
        self.remote.get(&p).copied()
    }
    fn insert_remote(&mut self, p: Prefix, v: RemoteEntry) -> Result<(), MapError> {
        self.writes.push(format!("remote insert {p:?}"));
        self.remote.insert(p, v);
        Ok(())
    }
    fn remove_remote(&mut self, p: Prefix) {
        if self.remote.remove(&p).is_some() {
            self.writes.push(format!("remote remove {p:?}"));
        }
    }
    fn exempt_prefixes(&self) -> Vec<Prefix> {
        self.exempt.iter().copied().collect()
    }
    fn insert_exempt(&mut self, p: Prefix) -> Result<(), MapError> {
        self.writes.push(format!("exempt insert {p:?}"));
        self.exempt.insert(p);
        Ok(())
    }
    fn remove_exempt(&mut self, p: Prefix) {
        if self.exempt.remove(&p) {
            self.writes.push(format!("exempt remove {p:?}"));
        }
    }
    fn held_ids(&self) -> Vec<u32> {
        self.held.iter().copied().collect()
    }
    fn insert_held(&mut self, id: u32) -> Result<(), MapError> {
        held_room(self, id)?;
        self.writes.push(format!("held insert {id}"));
        self.held.insert(id);
        Ok(())
    }
    fn remove_held(&mut self, id: u32) {
        if self.held.remove(&id) {
            self.writes.push(format!("held remove {id}"));
        }
    }
    fn steer(&self, pod: u32) -> Option<SteerEntry> {
        self.steer.get(&pod).copied()
    }
    fn steered(&self) -> Vec<u32> {
        self.steer.keys().copied().collect()
    }
    fn insert_steer(&mut self, pod: u32, v: SteerEntry) -> Result<(), MapError> {
        self.writes.push(format!("steer insert {pod:#x}"));
        self.steer.insert(pod, v);
        Ok(())
    }
    fn remove_steer(&mut self, pod: u32) {
        if self.steer.remove(&pod).is_some() {
            self.writes.push(format!("steer remove {pod:#x}"));
        }
    }
    fn lb_slots(&self) -> Vec<(LbKey, LbSlot)> {
        self.lb_svc.iter().map(|(k, v)| (*k, *v)).collect()
    }
    fn insert_lb_slot(&mut self, k: LbKey, v: LbSlot) -> Result<(), MapError> {
        self.writes.push(format!("lb_svc insert {}", lb_key(&k)));
        self.lb_svc.insert(k, v);
        Ok(())
    }
    fn remove_lb_slot(&mut self, k: LbKey) {
        if self.lb_svc.remove(&k).is_some() {
            self.writes.push(format!("lb_svc remove {}", lb_key(&k)));
        }
    }
    fn lb_flows(&self) -> Vec<(StackFlow, LbFlow)> {
        self.lb_ct.iter().map(|(k, v)| (*k, *v)).collect()
    }
    fn update_lb_flow(&mut self, k: StackFlow, v: LbFlow) -> Result<(), MapError> {
        if let Some(e) = self.lb_ct.get_mut(&k) {
            self.writes.push(format!("lb_ct update {}", flow_key(&k)));
            *e = v;
        }
        Ok(())
    }
    fn remove_lb_flow(&mut self, k: StackFlow) {
        if self.lb_ct.remove(&k).is_some() {
            self.writes.push(format!("lb_ct remove {}", flow_key(&k)));
        }
    }
    fn lb_affinities(&self) -> Vec<(LbAffinityKey, LbAffinity)> {
        self.lb_aff.iter().map(|(k, v)| (*k, *v)).collect()
    }
    fn remove_lb_affinity(&mut self, k: LbAffinityKey) {
        if self.lb_aff.remove(&k).is_some() {
            let ip = std::net::Ipv4Addr::from(k.client.to_ne_bytes());
            self.writes.push(format!("lb_aff remove {ip}"));
        }
    }
}

/// `10.96.0.10:80/6#0`: a frontend slot key as the fake's write log shows it.
fn lb_key(k: &LbKey) -> String {
    let ip = std::net::Ipv4Addr::from(k.vip.to_ne_bytes());
    format!("{ip}:{}/{}#{}", u16::from_be(k.port), k.proto, k.slot)
}

/// `10.244.1.5:40000>10.96.0.10:80/6`: a connection-table key as the write log shows it.
fn flow_key(k: &StackFlow) -> String {
    let ip = |a: u32| std::net::Ipv4Addr::from(a.to_ne_bytes());
    format!(
        "{}:{}>{}:{}/{}",
        ip(k.saddr),
        u16::from_be(k.sport),
        ip(k.daddr),
        u16::from_be(k.dport),
        k.proto
    )
}
