//! Which egress IP each `Egress` gets, its id, and which node holds it: computed by every
//! agent from the same desired state with the same answer, without a central allocator. Pure:
//! no I/O, so [`plan`](super::plan) and the tests call it with values.
//!
//! - Order: Egresses are served oldest first (`creationTimestamp`, then name; those without a
//!   timestamp, as from the files source, after those with one, by name), so a new Egress
//!   never takes an older one's address or id.
//! - IPs: an `egressIP` set by the user is served first and taken as it is; it must be in the
//!   pool, if one is named, and not already taken by an older Egress, or the Egress is
//!   reported without an IP. Then every Egress keeps the IP it was allocated before (its
//!   [`Recorded`] allocation: `status.egressIP` in Kubernetes mode, the state store with
//!   `files`) while it is still in the Egress's pool, not the gateway and not taken by a fixed
//!   IP: adding or deleting other Egresses never moves it. Otherwise an address of the pool is
//!   chosen by a hash of the Egress name, probing forward past taken addresses and the
//!   subnet's gateway; a full pool is reported as exhausted.
//! - Id: each allocated IP gets an id 1..=65535 by a hash of the IP, probing forward past ids
//!   taken by older Egresses. It is the fwmark of the IP's traffic on the egress node and the
//!   VNI that carries a pod's traffic there from other nodes, so all nodes must agree on it.
//!   At most 65,535 Egress IPs per cluster (later ones are reported, not served); a node
//!   holds at most [`ferrea_common::MAX_EGRESS_HELD`] of them.
//! - Node: rendezvous (highest-random-weight) hashing of the egress IP over the nodes the
//!   pool's `nodeSelector` admits. Every agent ranks the same nodes the same way, and a node
//!   joining or leaving moves only the IPs it wins or held.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

use crate::net::EgressId;
use crate::source::crd::{Egress, ExternalIpPool};

/// A node as the assignment sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLabels {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

/// The outcome for one Egress (what its status reports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The egress IP, if one could be allocated.
    pub ip: Option<Ipv4Addr>,
    /// The pool it came from, if any.
    pub pool: Option<String>,
    /// The node that holds the IP, if one is eligible.
    pub node: Option<String>,
    /// The IP's id (1..=65535): fwmark and VNI. `None` without an IP or when all are taken.
    pub id: Option<EgressId>,
    /// Why there is no IP or no node (the `IPAllocated` / `IPAssigned` condition message).
    pub problem: Option<String>,
}

fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u32).to_be_bytes());
        h.update(p);
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The `i`-th address of the pool's ranges, in order.
fn nth(pool: &ExternalIpPool, mut i: u64) -> Option<Ipv4Addr> {
    for r in &pool.ranges {
        if i < r.len() {
            return Some(Ipv4Addr::from(u32::from(r.start) + i as u32));
        }
        i -= r.len();
    }
    None
}

/// An allocation made before, kept while its Egress and pool allow (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recorded {
    /// The IP.
    pub ip: Ipv4Addr,
    /// The pool it came from.
    pub pool: Option<String>,
}

/// Picks the node for `ip` among `nodes` by rendezvous hashing.
pub fn choose_node<'a>(
    ip: Ipv4Addr,
    nodes: impl Iterator<Item = &'a NodeLabels>,
) -> Option<String> {
    nodes
        .max_by_key(|n| (hash64(&[&ip.octets(), n.name.as_bytes()]), n.name.clone()))
        .map(|n| n.name.clone())
}

/// Computes every Egress's IP and node, without allocations made before.
pub fn assign(
    egresses: &[Egress],
    pools: &BTreeMap<String, ExternalIpPool>,
    nodes: &[NodeLabels],
) -> BTreeMap<String, Assignment> {
    assign_with(egresses, pools, nodes, &BTreeMap::new())
}

/// Computes every Egress's IP and node, keeping the allocations in `recorded` (by Egress
/// name; an Egress's own `status.egressIP` wins over it) where they are still valid.
pub fn assign_with(
    egresses: &[Egress],
    pools: &BTreeMap<String, ExternalIpPool>,
    nodes: &[NodeLabels],
    recorded: &BTreeMap<String, Recorded>,
) -> BTreeMap<String, Assignment> {
    let mut order: Vec<&Egress> = egresses.iter().collect();
    // Oldest first; without timestamps (the files source), by name.
    order.sort_by(|a, b| {
        (a.created.is_none(), &a.created, &a.name).cmp(&(b.created.is_none(), &b.created, &b.name))
    });
    let mut used: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut out = BTreeMap::new();
    // Fixed IPs first: they are the user's explicit choice.
    for e in order.iter().filter(|e| e.egress_ip.is_some()) {
        let ip = e.egress_ip.expect("filtered");
        let pool = e.pool.as_ref().and_then(|p| pools.get(p));
        let problem = match (&e.pool, pool) {
            (Some(p), None) => Some(format!("ExternalIPPool {p} does not exist")),
            (Some(p), Some(pl)) if !pl.contains(ip) => {
                Some(format!("egressIP {ip} is not in ExternalIPPool {p}"))
            }
            _ if !used.insert(ip) => {
                Some(format!("egressIP {ip} is already used by another Egress"))
            }
            _ => None,
        };
        out.insert(
            e.name.clone(),
            Assignment {
                ip: problem.is_none().then_some(ip),
                pool: e.pool.clone(),
                node: None,
                id: None,
                problem,
            },
        );
    }
    // Then what was allocated before, oldest first.
    for e in order.iter().filter(|e| e.egress_ip.is_none()) {
        let Some(name) = &e.pool else { continue };
        let Some(pool) = pools.get(name) else {
            continue;
        };
        let rec = e.recorded_ip.or_else(|| {
            recorded
                .get(&e.name)
                .filter(|r| r.pool.as_ref() == Some(name))
                .map(|r| r.ip)
        });
        let Some(ip) = rec else { continue };
        if !pool.contains(ip) || pool.subnet.is_some_and(|s| s.gateway == ip) || !used.insert(ip) {
            continue;
        }
        out.insert(
            e.name.clone(),
            Assignment {
                ip: Some(ip),
                pool: Some(name.clone()),
                node: None,
                id: None,
                problem: None,
            },
        );
    }
    let kept: BTreeSet<String> = out.keys().cloned().collect();
    for e in order
        .iter()
        .filter(|e| e.egress_ip.is_none() && !kept.contains(&e.name))
    {
        let name = e.pool.clone().unwrap_or_default();
        let a = match pools.get(&name) {
            None => Assignment {
                ip: None,
                pool: Some(name.clone()),
                node: None,
                id: None,
                problem: Some(format!("ExternalIPPool {name} does not exist")),
            },
            Some(pool) => {
                let total: u64 = pool.ranges.iter().map(|r| r.len()).sum();
                let gw = pool.subnet.map(|s| s.gateway);
                let start = hash64(&[e.name.as_bytes()]) % total.max(1);
                let ip = (0..total)
                    .filter_map(|k| nth(pool, (start + k) % total))
                    .find(|ip| Some(*ip) != gw && !used.contains(ip));
                if let Some(ip) = ip {
                    used.insert(ip);
                }
                Assignment {
                    ip,
                    pool: Some(name.clone()),
                    node: None,
                    id: None,
                    problem: ip
                        .is_none()
                        .then(|| format!("ExternalIPPool {name} is exhausted")),
                }
            }
        };
        out.insert(e.name.clone(), a);
    }
    // Ids in the same oldest-first order as the IPs.
    let mut ids = BTreeSet::new();
    for e in &order {
        let a = out.get_mut(&e.name).expect("every Egress has an entry");
        let Some(ip) = a.ip else { continue };
        let span = u32::from(EgressId::MAX);
        let start = (hash64(&[b"id", &ip.octets()]) % u64::from(span)) as u32;
        a.id = (0..span)
            .map(|k| ((start + k) % span + 1) as EgressId)
            .find(|id| !ids.contains(id));
        match a.id {
            Some(id) => {
                ids.insert(id);
            }
            None => {
                a.ip = None;
                a.problem = Some(format!(
                    "more than {} Egress IPs in the cluster",
                    EgressId::MAX
                ));
            }
        }
    }
    for a in out.values_mut() {
        let Some(ip) = a.ip else { continue };
        let pool = a.pool.as_ref().and_then(|p| pools.get(p));
        let eligible = nodes
            .iter()
            .filter(|n| pool.is_none_or(|p| p.node_selector.matches(&n.labels)));
        a.node = choose_node(ip, eligible);
        if a.node.is_none() {
            a.problem = Some("no node matches the pool's nodeSelector".into());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::crd::{IpRange, LabelSelector, SubnetInfo};

    fn pool(name: &str, start: &str, end: &str, gw: Option<&str>) -> ExternalIpPool {
        ExternalIpPool {
            name: name.into(),
            ranges: vec![IpRange {
                start: start.parse().unwrap(),
                end: end.parse().unwrap(),
            }],
            subnet: gw.map(|g| SubnetInfo {
                gateway: g.parse().unwrap(),
                prefix_len: 24,
                vlan: 100,
            }),
            node_selector: LabelSelector::default(),
        }
    }

    fn egress(name: &str, pool: Option<&str>, ip: Option<&str>) -> Egress {
        Egress {
            name: name.into(),
            created: None,
            pod_selector: Some(LabelSelector::default()),
            namespace_selector: None,
            egress_ip: ip.map(|i| i.parse().unwrap()),
            pool: pool.map(Into::into),
            bandwidth: None,
            unsupported: Vec::new(),
            recorded_ip: None,
            recorded_node: None,
        }
    }

    fn nodes(names: &[&str]) -> Vec<NodeLabels> {
        names
            .iter()
            .map(|n| NodeLabels {
                name: (*n).into(),
                labels: BTreeMap::new(),
            })
            .collect()
    }

    fn pools(ps: Vec<ExternalIpPool>) -> BTreeMap<String, ExternalIpPool> {
        ps.into_iter().map(|p| (p.name.clone(), p)).collect()
    }

    #[test]
    fn same_input_same_answer_and_no_duplicates() {
        let ps = pools(vec![pool("p", "10.0.0.1", "10.0.0.20", Some("10.0.0.5"))]);
        let es: Vec<Egress> = (0..19)
            .map(|i| egress(&format!("e{i}"), Some("p"), None))
            .collect();
        let ns = nodes(&["n1", "n2", "n3"]);
        let a = assign(&es, &ps, &ns);
        let mut rev = es.clone();
        rev.reverse();
        assert_eq!(
            a,
            assign(&rev, &ps, &ns),
            "order of the input changed the answer"
        );
        let ips: BTreeSet<Ipv4Addr> = a.values().filter_map(|x| x.ip).collect();
        assert_eq!(ips.len(), 19, "every Egress got its own IP");
        assert!(
            !ips.contains(&"10.0.0.5".parse().unwrap()),
            "the gateway was handed out"
        );
        // A 20th Egress finds the pool exhausted (20 addresses minus the gateway).
        let mut more = es.clone();
        more.push(egress("zz", Some("p"), None));
        more.push(egress("zzz", Some("p"), None));
        let b = assign(&more, &ps, &ns);
        assert_eq!(b.values().filter(|x| x.ip.is_none()).count(), 2);
        assert!(
            b.values()
                .any(|x| x.problem.as_deref() == Some("ExternalIPPool p is exhausted"))
        );
    }

    #[test]
    fn ids_are_unique_and_stable_past_255_egresses() {
        // 1,000 Egresses (the old limit was 255 per cluster), each with one IP.
        let ps = pools(vec![pool("p", "10.0.0.1", "10.0.7.254", None)]);
        let es: Vec<Egress> = (0..1000)
            .map(|i| {
                let mut e = egress(&format!("e{i:04}"), Some("p"), None);
                e.created = Some(format!(
                    "2026-01-01T{:02}:{:02}:{:02}Z",
                    i / 3600,
                    i / 60 % 60,
                    i % 60
                ));
                e
            })
            .collect();
        let n = nodes(&["n1", "n2", "n3"]);
        let a = assign(&es, &ps, &n);
        let ids: BTreeSet<EgressId> = a.values().filter_map(|x| x.id).collect();
        assert_eq!(ids.len(), 1000, "every Egress an id, each once");
        assert!(!ids.contains(&0));
        assert!(a.values().all(|x| x.ip.is_some() && x.problem.is_none()));
        assert!(ids.iter().any(|&id| id > 255), "ids use the 16-bit space");
        // The first 100 keep their ids when the rest go away.
        let b = assign(&es[..100], &ps, &n);
        for (k, x) in &b {
            assert_eq!(x.id, a[k].id, "{k}");
        }
    }

    #[test]
    fn older_egresses_keep_their_ips() {
        let ps = pools(vec![pool("p", "10.0.0.1", "10.0.0.3", None)]);
        let mut old = egress("old", Some("p"), None);
        old.created = Some("2026-01-01T00:00:00Z".into());
        let before = assign(std::slice::from_ref(&old), &ps, &nodes(&["n1"]));
        let mut young = egress("a-new-one", Some("p"), None);
        young.created = Some("2026-06-01T00:00:00Z".into());
        let after = assign(&[young, old.clone()], &ps, &nodes(&["n1"]));
        assert_eq!(before["old"].ip, after["old"].ip);
    }

    /// What an agent records after each pass (see `EgressReconciler`).
    fn record(a: &BTreeMap<String, Assignment>) -> BTreeMap<String, Recorded> {
        a.iter()
            .filter_map(|(k, x)| {
                Some((
                    k.clone(),
                    Recorded {
                        ip: x.ip?,
                        pool: x.pool.clone(),
                    },
                ))
            })
            .collect()
    }

    #[test]
    fn recorded_ips_never_move_when_others_come_and_go() {
        // A small pool so that hashes collide and probing would reorder.
        let ps = pools(vec![pool("p", "10.0.0.1", "10.0.0.12", Some("10.0.0.12"))]);
        let ns = nodes(&["n1", "n2"]);
        let mut es: Vec<Egress> = ["m1", "m2", "m3"]
            .iter()
            .map(|n| egress(n, Some("p"), None))
            .collect();
        let mut rec = record(&assign_with(&es, &ps, &ns, &BTreeMap::new()));
        let first = rec.clone();
        // Names before and after, added and deleted, older and younger (timestamps).
        let steps: Vec<(&str, bool, Option<&str>)> = vec![
            ("a0", true, None),
            ("z9", true, Some("2020-01-01T00:00:00Z")),
            ("a1", true, Some("2030-01-01T00:00:00Z")),
            ("a0", false, None),
            ("b5", true, None),
            ("z9", false, None),
            ("c3", true, Some("2000-01-01T00:00:00Z")),
        ];
        for (name, add, ts) in steps {
            if add {
                let mut e = egress(name, Some("p"), None);
                e.created = ts.map(Into::into);
                es.push(e);
            } else {
                es.retain(|e| e.name != name);
            }
            let a = assign_with(&es, &ps, &ns, &rec);
            for (k, r) in &first {
                assert_eq!(a[k].ip, Some(r.ip), "{k} moved after {name} add={add}");
            }
            let ips: BTreeSet<_> = a.values().filter_map(|x| x.ip).collect();
            assert_eq!(ips.len(), a.values().filter(|x| x.ip.is_some()).count());
            rec = record(&a);
        }
        // A record from another pool, outside the pool or on the gateway is not kept.
        let mut bad = BTreeMap::new();
        bad.insert(
            "m1".to_owned(),
            Recorded {
                ip: "10.0.0.12".parse().unwrap(),
                pool: Some("p".into()),
            },
        );
        let a = assign_with(&es[..1], &ps, &ns, &bad);
        assert_ne!(a["m1"].ip, Some("10.0.0.12".parse().unwrap()));
        // status.egressIP (Kubernetes mode) is a record too.
        let mut e = egress("k", Some("p"), None);
        e.recorded_ip = Some("10.0.0.7".parse().unwrap());
        let a = assign_with(&[e], &ps, &ns, &BTreeMap::new());
        assert_eq!(a["k"].ip, Some("10.0.0.7".parse().unwrap()));
    }

    #[test]
    fn fixed_ips_are_checked_against_the_pool() {
        let ps = pools(vec![pool("p", "10.0.0.1", "10.0.0.9", None)]);
        let a = assign(
            &[
                egress("in", Some("p"), Some("10.0.0.4")),
                egress("out", Some("p"), Some("10.9.9.9")),
                // Same IP, later in order (by name here): refused.
                egress("later", Some("p"), Some("10.0.0.4")),
                egress("nopool", Some("missing"), None),
            ],
            &ps,
            &nodes(&["n1"]),
        );
        assert_eq!(a["in"].ip, Some("10.0.0.4".parse().unwrap()));
        assert!(
            a["out"]
                .problem
                .as_deref()
                .unwrap()
                .contains("not in ExternalIPPool p")
        );
        assert!(
            a["later"]
                .problem
                .as_deref()
                .unwrap()
                .contains("already used")
        );
        assert!(
            a["nopool"]
                .problem
                .as_deref()
                .unwrap()
                .contains("does not exist")
        );
    }

    #[test]
    fn nodes_follow_the_selector_and_move_minimally() {
        let mut p = pool("p", "10.0.0.1", "10.0.0.200", None);
        p.node_selector
            .match_labels
            .insert("network-role".into(), "egress-gateway".into());
        let ps = pools(vec![p]);
        let mut ns = nodes(&["n1", "n2", "n3", "n4"]);
        for n in &mut ns[1..] {
            n.labels
                .insert("network-role".into(), "egress-gateway".into());
        }
        let es: Vec<Egress> = (0..60)
            .map(|i| egress(&format!("e{i}"), Some("p"), None))
            .collect();
        let a = assign(&es, &ps, &ns);
        assert!(
            a.values().all(|x| x.node.as_deref() != Some("n1")),
            "n1 is not eligible"
        );
        let used: BTreeSet<&str> = a.values().filter_map(|x| x.node.as_deref()).collect();
        assert_eq!(
            used.len(),
            3,
            "60 IPs spread over the 3 eligible nodes: {used:?}"
        );
        // n4 leaves: only its IPs move.
        let b = assign(&es, &ps, &ns[..3]);
        for (k, x) in &a {
            if x.node.as_deref() != Some("n4") {
                assert_eq!(x.node, b[k].node, "{k} moved although its node stayed");
            }
        }
        let none = assign(&es, &ps, &ns[..1]);
        assert!(
            none.values()
                .all(|x| x.node.is_none() && x.problem.is_some())
        );
    }
}
