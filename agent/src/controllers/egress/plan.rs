//! What one node does for Egress, computed from the desired state and the node's attachments.
//!
//! Pure: every input is a value, so the rules are unit-tested without a kernel.
//!
//! - Every node runs [`assign`] over the same Egresses, pools and nodes, so all agree on each
//!   Egress's IP, id and node without talking to each other. The nodes are the `Node` objects
//!   whose agents the membership ([`crate::membership`]) sees alive and eligible, so a failed
//!   node's IPs move to the next node by rendezvous hashing and no other IP moves.
//! - A node *holds* the IPs assigned to it ([`HeldIp`]): it puts them on an interface and
//!   SNATs the traffic marked with their id.
//! - A *local pod* (an attachment of this node joined with its Pod object) is selected by an
//!   Egress when the Egress's `podSelector` (if any) matches the pod's labels and its
//!   `namespaceSelector` (if any) matches its namespace's labels. When several Egresses select
//!   a pod, the oldest one with an assigned IP wins (Antrea picks one too; the choice must only
//!   be the same on every node, and this one does not flap when a newer Egress appears).
//! - A selected pod whose Egress IP this node holds is marked here ([`NodePlan::local_marks`]);
//!   one whose IP another node holds is steered there through the tunnel
//!   ([`EgressSteer`]). In `noEncap` mode there is no tunnel to steer through: such pods keep
//!   the node's masquerade and the plan says why.
//! - Traffic to the cluster (pod CIDRs, the service CIDR, node addresses) is never egress
//!   traffic ([`EgressPlan::exempt`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::assign::{Assignment, NodeLabels, Recorded, assign_with};
use crate::dataplane::{EgressPlan, EgressSteer};
use crate::net::EgressId;
use crate::pods::store::PodRecord;
use crate::source::DesiredState;
use crate::source::crd::{Bandwidth, SubnetInfo};

/// An egress IP this node holds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeldIp {
    /// The IP.
    pub ip: Ipv4Addr,
    /// Its id: the fwmark of its traffic.
    pub id: EgressId,
    /// The Egress it serves.
    pub egress: String,
    /// The pool's `subnetInfo`, if it has one (the IP then lives on the subnet's interface,
    /// with its own route table).
    pub subnet: Option<SubnetInfo>,
    /// The Egress's `spec.bandwidth`, if it has one.
    pub bandwidth: Option<Bandwidth>,
    /// Kept only for the make-before-break handover to another node: the IP stays local (so
    /// in-flight traffic is still SNATed and its replies delivered) but leaves the
    /// sub-interface, so this node neither answers ARP for it nor asks with it, and is never
    /// announced again (see `EgressNode::apply`).
    pub releasing: bool,
}

/// Everything this node does for Egress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePlan {
    /// Each Egress's IP, id and node (what the status reports).
    pub assignments: BTreeMap<String, Assignment>,
    /// The IPs this node holds, sorted by IP.
    pub held: Vec<HeldIp>,
    /// Local pods whose Egress IP this node holds: (pod IP, id), sorted.
    pub local_marks: Vec<(Ipv4Addr, EgressId)>,
    /// The dataplane's part.
    pub dataplane: EgressPlan,
    /// The Egress each local pod uses, by `namespace/name` (for operators).
    pub pods: BTreeMap<String, String>,
    /// What could not be done, each naming the Egress or pod.
    pub warnings: Vec<String>,
    /// The VLANs whose sub-interface this node keeps ready although it may hold none of their
    /// IPs: those of pools with an allocated IP whose `nodeSelector` admits this node, so a
    /// failover or handover to it needs no new device (a device the kernel has just made drops
    /// what is sent through it until its queue is activated, up to a second later).
    pub standby_vlans: BTreeSet<u16>,
}

/// Computes this node's plan. `cluster` is what is never egress traffic besides the nodes'
/// addresses and pod CIDRs (the configured cluster pod CIDRs and the service CIDR); `encap` says whether a tunnel to
/// other nodes exists. `live` is the set of nodes whose agents are alive and eligible
/// ([`crate::membership::MemberView::eligible`]); `None` (no membership) counts every `Node`
/// object. `recorded` holds the IPs allocated before (the state store's, with `files`), kept
/// while valid.
pub fn plan(
    st: &DesiredState,
    records: &[PodRecord],
    me: &str,
    cluster: &[Ipv4Network],
    encap: bool,
    live: Option<&BTreeSet<String>>,
    recorded: &BTreeMap<String, Recorded>,
) -> NodePlan {
    let nodes: Vec<NodeLabels> = st
        .nodes
        .values()
        .filter(|n| live.is_none_or(|l| l.contains(&n.name)))
        .map(|n| NodeLabels {
            name: n.name.clone(),
            labels: n.labels.clone(),
        })
        .collect();
    let egresses: Vec<_> = st.egresses.values().cloned().collect();
    let assignments = assign_with(&egresses, &st.pools, &nodes, recorded);
    let mut out = NodePlan {
        assignments,
        ..NodePlan::default()
    };

    for (name, a) in &out.assignments {
        if let (Some(ip), Some(id), Some(node)) = (a.ip, a.id, a.node.as_deref())
            && node == me
        {
            let subnet = a
                .pool
                .as_ref()
                .and_then(|p| st.pools.get(p))
                .and_then(|p| p.subnet);
            out.held.push(HeldIp {
                ip,
                id,
                egress: name.clone(),
                subnet,
                bandwidth: st.egresses.get(name).and_then(|e| e.bandwidth),
                releasing: false,
            });
        }
    }
    out.held.sort();
    let my_labels = st.nodes.get(me).map(|n| &n.labels);
    for a in out.assignments.values() {
        let Some(pool) = a.pool.as_ref().and_then(|p| st.pools.get(p)) else {
            continue;
        };
        if let (Some(_), Some(sub), Some(labels)) = (a.ip, pool.subnet, my_labels)
            && sub.vlan > 0
            && pool.node_selector.matches(labels)
        {
            out.standby_vlans.insert(sub.vlan);
        }
    }
    out.dataplane.held = out.held.iter().map(|h| h.id).collect();
    out.dataplane.held.sort();

    // Every node's pod CIDR is the cluster's too, whether or not `clusterCIDRs` says so.
    let exempt = cluster
        .iter()
        .copied()
        .chain(st.nodes.values().filter_map(|n| n.pod_cidr))
        .chain(st.nodes.values().filter_map(|n| {
            n.internal_ip
                .map(|ip| Ipv4Network::new(ip, 32).expect("/32 is valid"))
        }));
    out.dataplane.exempt = crate::net::outermost(exempt);

    // Fields given that ferrea does not serve, by Egress and field.
    for e in st.egresses.values() {
        for u in &e.unsupported {
            out.warnings.push(format!("Egress {}: {u}", e.name));
        }
    }

    // Egresses in the order that decides between several selecting one pod: oldest first.
    let mut order: Vec<_> = st.egresses.values().collect();
    order.sort_by(|a, b| {
        (a.created.is_none(), &a.created, &a.name).cmp(&(b.created.is_none(), &b.created, &b.name))
    });
    for (key, (pod_ip, pod)) in crate::pods::local_pods(st, records, me) {
        let ns_labels = st.namespace_labels(&pod.namespace);
        let chosen = order.iter().find(|e| {
            e.pod_selector
                .as_ref()
                .is_none_or(|s| s.matches(&pod.labels))
                && e.namespace_selector
                    .as_ref()
                    .is_none_or(|s| s.matches(&ns_labels))
                && out
                    .assignments
                    .get(&e.name)
                    .is_some_and(|a| a.ip.is_some() && a.id.is_some() && a.node.is_some())
        });
        let Some(e) = chosen else { continue };
        let a = &out.assignments[&e.name];
        let (id, node) = (a.id.expect("checked"), a.node.as_deref().expect("checked"));
        if node == me {
            out.local_marks.push((pod_ip, id));
        } else {
            let Some(node_ip) = st.nodes.get(node).and_then(|n| n.internal_ip) else {
                out.warnings.push(format!(
                    "pod {key}: Egress {} is on node {node}, which has no InternalIP",
                    e.name
                ));
                continue;
            };
            if !encap {
                out.warnings.push(format!(
                    "pod {key}: Egress {} is on node {node}; reaching another node's egress IP \
                     needs trafficEncapMode encap, so the pod keeps this node's masquerade",
                    e.name
                ));
                continue;
            }
            out.dataplane.steer.push(EgressSteer {
                pod_ip,
                node_ip,
                id,
            });
        }
        out.pods.insert(key, e.name.clone());
    }
    out.local_marks.sort();
    out.dataplane.steer.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::{pod_record as rec, state};

    /// Seed 000's manifests, the pool limited to nodes labelled `network-role:
    /// egress-gateway` (the seed's commented-out variant), with two nodes and three pods.
    fn seed() -> String {
        let pool = include_str!("../../../testdata/seed000-pool.yaml").replace(
            "  nodeSelector: {}\n",
            "  nodeSelector:\n    matchLabels:\n      network-role: egress-gateway\n",
        );
        let egress = include_str!("../../../testdata/seed000-egress.yaml");
        [pool.as_str(), egress, NODES_AND_PODS].join("---\n")
    }

    const NODES_AND_PODS: &str = "\
kind: Node
metadata: {name: n1, labels: {network-role: egress-gateway}}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.11}]}
---
kind: Node
metadata: {name: n2}
spec: {podCIDR: 10.244.2.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.12}]}
---
kind: Pod
metadata: {name: sel1, labels: {app: hello-world1}}
spec: {nodeName: n1}
---
kind: Pod
metadata: {name: other1, labels: {app: other}}
spec: {nodeName: n1}
---
kind: Pod
metadata: {name: sel2, labels: {app: hello-world1}}
spec: {nodeName: n2}
";

    fn cluster() -> Vec<Ipv4Network> {
        vec![
            "10.244.0.0/16".parse().unwrap(),
            "10.96.0.0/12".parse().unwrap(),
        ]
    }

    #[test]
    fn egress_node_holds_the_ip_and_marks_its_selected_pods() {
        let st = state(&seed());
        let p = plan(
            &st,
            &[
                rec("", "sel1", [10, 244, 1, 5]),
                rec("", "other1", [10, 244, 1, 6]),
            ],
            "n1",
            &cluster(),
            true,
            None,
            &BTreeMap::new(),
        );
        assert_eq!(p.held.len(), 1, "{p:?}");
        let h = &p.held[0];
        assert_eq!(h.egress, "child-egress-hello-world1");
        assert_eq!(h.subnet.unwrap().vlan, 100);
        assert!((1..=199).contains(&(u32::from(h.ip) - u32::from(Ipv4Addr::new(10, 172, 170, 0)))));
        assert_eq!(p.local_marks, vec![(Ipv4Addr::new(10, 244, 1, 5), h.id)]);
        assert_eq!(p.dataplane.held, vec![h.id]);
        assert!(p.dataplane.steer.is_empty());
        assert!(
            p.dataplane
                .exempt
                .contains(&"172.18.0.12/32".parse().unwrap())
        );
        assert_eq!(p.pods["default/sel1"], "child-egress-hello-world1");
        assert!(!p.pods.contains_key("default/other1"));
    }

    #[test]
    fn nodes_the_pool_admits_keep_its_sub_interface_ready() {
        // The seed's pool admits only n1 (network-role: egress-gateway).
        let st = state(&seed());
        let run = |st: &DesiredState, me: &str| {
            plan(st, &[], me, &cluster(), true, None, &BTreeMap::new())
        };
        assert_eq!(run(&st, "n1").standby_vlans, BTreeSet::from([100]));
        assert!(run(&st, "n2").standby_vlans.is_empty());
        // A pool open to every node: both keep it, holder or not.
        let mut open = st.clone();
        for p in open.pools.values_mut() {
            p.node_selector = crate::source::crd::LabelSelector::default();
        }
        for me in ["n1", "n2"] {
            assert_eq!(run(&open, me).standby_vlans, BTreeSet::from([100]), "{me}");
        }
        // No Egress: no IP allocated from the pool, no device kept.
        open.egresses.clear();
        assert!(run(&open, "n1").standby_vlans.is_empty());
    }

    #[test]
    fn other_nodes_steer_their_selected_pods_to_the_egress_node() {
        let st = state(&seed());
        let p = plan(
            &st,
            &[rec("", "sel2", [10, 244, 2, 7])],
            "n2",
            &cluster(),
            true,
            None,
            &BTreeMap::new(),
        );
        assert!(p.held.is_empty(), "n2 is not eligible");
        let id = p.assignments["child-egress-hello-world1"].id.unwrap();
        assert_eq!(
            p.dataplane.steer,
            vec![EgressSteer {
                pod_ip: Ipv4Addr::new(10, 244, 2, 7),
                node_ip: Ipv4Addr::new(172, 18, 0, 11),
                id
            }]
        );
        // Without a tunnel: no steering, and the reason is given.
        let p = plan(
            &st,
            &[rec("", "sel2", [10, 244, 2, 7])],
            "n2",
            &cluster(),
            false,
            None,
            &BTreeMap::new(),
        );
        assert!(p.dataplane.steer.is_empty());
        assert!(
            p.warnings[0].contains("trafficEncapMode encap"),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn namespace_selector_and_oldest_egress_decide() {
        let yaml = format!(
            "{}---
apiVersion: crd.antrea.io/v1beta1
kind: Egress
metadata: {{name: aaa-newer, creationTimestamp: '2026-06-01T00:00:00Z'}}
spec:
  appliedTo:
    namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: default}}}}
  externalIPPool: child-egress-ippool
---
apiVersion: crd.antrea.io/v1beta1
kind: Egress
metadata: {{name: prod-only, creationTimestamp: '2026-01-01T00:00:00Z'}}
spec:
  appliedTo:
    namespaceSelector: {{matchLabels: {{env: prod}}}}
  externalIPPool: child-egress-ippool
",
            seed()
        );
        let mut st = state(&yaml);
        // Timestamps sort before none: give the seed's Egress the oldest one.
        st.egresses
            .get_mut("child-egress-hello-world1")
            .unwrap()
            .created = Some("2025-01-01T00:00:00Z".into());
        let p = plan(
            &st,
            &[
                rec("", "sel1", [10, 244, 1, 5]),
                rec("", "other1", [10, 244, 1, 6]),
            ],
            "n1",
            &cluster(),
            true,
            None,
            &BTreeMap::new(),
        );
        assert_eq!(p.pods["default/sel1"], "child-egress-hello-world1");
        assert_eq!(p.pods["default/other1"], "aaa-newer");
        assert_eq!(p.held.len(), 3);
        assert!(!p.pods.values().any(|e| e == "prod-only"));
    }

    #[test]
    fn no_egress_no_plan() {
        let st = state(
            "kind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24}\n---\n\
             kind: Pod\nmetadata: {name: sel1, labels: {app: hello-world1}}\n",
        );
        let p = plan(
            &st,
            &[rec("", "sel1", [10, 244, 1, 5])],
            "n1",
            &cluster(),
            true,
            None,
            &BTreeMap::new(),
        );
        assert!(p.held.is_empty() && p.local_marks.is_empty() && p.pods.is_empty());
        assert!(p.dataplane.steer.is_empty() && p.dataplane.held.is_empty());
    }
}
