//! The node controller: after start, the other nodes of the desired state go to the
//! dataplane ([`crate::dataplane::Dataplane::set_remote_nodes`]), and the dataplane gets its
//! upkeep once a second ([`crate::dataplane::Dataplane::maintain`]: a restarted
//! `ovs-vswitchd` has its flows back within that).
//!
//! The pod CIDRs of all nodes also go to ferrea's nftables table as destinations that are
//! never masqueraded ([`NatTable::set_cluster_cidrs`]): with no `clusterCIDRs` configured,
//! pods keep their addresses towards every node's pods as nodes come and go.
//!
//! A change of this node's own `spec.podCIDR` cannot be applied to running pods (they hold
//! addresses from the old one): it is reported once, not applied, until the agent restarts.

use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use super::runner::{Action, Desired, Reconciler, RunnerConfig, Trigger};
use crate::dataplane::{Dataplane, DataplaneError, RemoteNode};
use crate::kernel::nftables::{NatError, NatTable};
use crate::source::DesiredState;

/// How often the dataplane gets its upkeep.
pub const UPKEEP: Duration = Duration::from_secs(1);

/// The runner settings of the node controller: a failure is retried every second, as the
/// upkeep runs.
pub fn runner_config() -> RunnerConfig {
    RunnerConfig {
        retry_min: UPKEEP,
        retry_max: UPKEEP,
        ..RunnerConfig::default()
    }
}

/// The other nodes the packet path must reach: every `Node` but this one with both a pod CIDR
/// and an `InternalIP` (a node without them has no pods to reach yet), sorted by name.
pub fn remote_nodes(st: &DesiredState, me: &str) -> Vec<RemoteNode> {
    st.nodes
        .values()
        .filter(|n| n.name != me)
        .filter_map(|n| {
            Some(RemoteNode {
                name: n.name.clone(),
                node_ip: n.internal_ip?,
                pod_cidr: n.pod_cidr?,
            })
        })
        .collect()
}

/// The pod CIDRs of every node in the desired state (this one's included), outermost first.
pub fn node_pod_cidrs(st: &DesiredState) -> Vec<Ipv4Network> {
    crate::net::outermost(st.nodes.values().filter_map(|n| n.pod_cidr))
}

/// `cidrs` as `a, b, c`.
fn list(cidrs: &[Ipv4Network]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a pass of the node controller failed at.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The dataplane refused the new list of remote nodes.
    #[error("applying remote nodes {nodes:?} to the {dataplane} dataplane")]
    RemoteNodes {
        /// The backend.
        dataplane: &'static str,
        /// The nodes it was given.
        nodes: Vec<String>,
        /// Why.
        #[source]
        source: DataplaneError,
    },
    /// ferrea's nftables table refused the nodes' pod CIDRs.
    #[error("exempting the nodes' pod CIDRs {} from masquerade", list(.cidrs))]
    ClusterCidrs {
        /// The CIDRs.
        cidrs: Vec<Ipv4Network>,
        /// Why.
        #[source]
        source: NatError,
    },
    /// The dataplane's upkeep failed.
    #[error("{dataplane} dataplane upkeep")]
    Upkeep {
        /// The backend.
        dataplane: &'static str,
        /// Why.
        #[source]
        source: DataplaneError,
    },
}

/// The node controller (see the module doc).
pub struct NodeReconciler {
    me: String,
    running_cidr: Option<Ipv4Network>,
    reported_cidr: Option<Ipv4Network>,
    dp: Arc<dyn Dataplane>,
    /// What the dataplane was last given; `None` after a failure, so the next pass retries.
    applied: Option<Vec<RemoteNode>>,
    nat: Arc<NatTable>,
    /// The pod CIDRs the table was last given; `None` after a failure.
    applied_cidrs: Option<Vec<Ipv4Network>>,
    /// Whether this node's own Node object is missing from the source (reported once).
    node_gone: bool,
}

impl NodeReconciler {
    /// A controller for node `me`, which started with `pod_cidr` and gave the dataplane
    /// `applied` at start; the nodes' pod CIDRs go to `nat`.
    pub fn new(
        me: &str,
        pod_cidr: Option<Ipv4Network>,
        dp: Arc<dyn Dataplane>,
        applied: Vec<RemoteNode>,
        nat: Arc<NatTable>,
    ) -> Self {
        NodeReconciler {
            me: me.to_owned(),
            running_cidr: pod_cidr,
            reported_cidr: pod_cidr,
            dp,
            applied: Some(applied),
            nat,
            applied_cidrs: None,
            node_gone: false,
        }
    }
}

impl Reconciler for NodeReconciler {
    type Error = NodeError;

    fn name(&self) -> &'static str {
        "node"
    }

    async fn reconcile(&mut self, desired: &Desired<'_>, _t: Trigger) -> Result<Action, NodeError> {
        let (me, want, cidrs) = {
            let st = desired.get();
            (
                st.nodes.get(&self.me).map(|n| n.pod_cidr),
                remote_nodes(&st, &self.me),
                node_pod_cidrs(&st),
            )
        };
        // This node's own Node object going away (deleted from the API, say) changes nothing
        // here: its pods keep their network and their CIDR.
        let now = me.unwrap_or(self.reported_cidr);
        if me.is_none() != self.node_gone {
            self.node_gone = me.is_none();
            if self.node_gone {
                tracing::warn!(node = %self.me, "this node's Node object is gone from the source; its pods keep their network, other nodes no longer reach them");
            } else {
                tracing::info!(node = %self.me, "this node's Node object is back");
            }
        }
        if now != self.reported_cidr {
            tracing::error!(node = %self.me, running = ?self.running_cidr, desired = ?now,
                "spec.podCIDR of this node changed; drain the node and restart the agent to apply it");
            self.reported_cidr = now;
        }
        let mut failed = None;
        if self.applied.as_ref() != Some(&want) {
            match self.dp.set_remote_nodes(&want).await {
                Ok(()) => {
                    tracing::info!(nodes = ?want.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), "remote nodes applied");
                    self.applied = Some(want);
                }
                Err(source) => {
                    self.applied = None;
                    failed = Some(NodeError::RemoteNodes {
                        dataplane: self.dp.name(),
                        nodes: want.into_iter().map(|n| n.name).collect(),
                        source,
                    });
                }
            }
        }
        if self.applied_cidrs.as_ref() != Some(&cidrs) {
            match self.nat.set_cluster_cidrs(cidrs.clone()).await {
                Ok(ran) => {
                    if ran {
                        tracing::info!(cidrs = ?cidrs, "nodes' pod CIDRs exempted from masquerade");
                    }
                    self.applied_cidrs = Some(cidrs);
                }
                Err(source) => {
                    self.applied_cidrs = None;
                    failed.get_or_insert(NodeError::ClusterCidrs { cidrs, source });
                }
            }
        }
        // The upkeep runs even while the remote nodes cannot be applied.
        if let Err(source) = self.dp.maintain().await {
            return Err(NodeError::Upkeep {
                dataplane: self.dp.name(),
                source,
            });
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(Action::Requeue(UPKEEP)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::nftables::NatSpec;
    use crate::testing::{FakeDataplane, FakeNftables, state};

    fn nat(nft: Arc<FakeNftables>) -> Arc<NatTable> {
        let spec = NatSpec {
            table: "ferrea".into(),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
            no_masquerade: vec!["10.96.0.0/12".parse().unwrap()],
            masquerade: true,
            gateway: "10.244.1.1".parse().unwrap(),
        };
        Arc::new(NatTable::with_nftables(spec, None, nft))
    }

    const NODES: &str = "\
kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.1.1}]}
---
kind: Node
metadata: {name: n2}
spec: {podCIDR: 10.244.2.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.1.2}]}
---
kind: Node
metadata: {name: n3}
spec: {podCIDR: 10.244.3.0/24}
";

    #[test]
    fn remote_nodes_are_the_others_with_an_address_and_a_cidr() {
        let st = state(NODES);
        let r = remote_nodes(&st, "n1");
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].name, "n2");
        assert_eq!(r[0].node_ip, std::net::Ipv4Addr::new(192, 168, 1, 2));
    }

    #[tokio::test]
    async fn a_failed_apply_is_retried_and_upkeep_goes_on() {
        let dp = Arc::new(FakeDataplane::default());
        let (tx, rx) = tokio::sync::watch::channel(state(NODES));
        let nft = Arc::new(FakeNftables::default());
        let mut r = NodeReconciler::new(
            "n1",
            "10.244.1.0/24".parse().ok(),
            dp.clone(),
            vec![],
            nat(nft),
        );
        *dp.fail_remote_nodes.lock().unwrap() = true;
        let err = r
            .reconcile(&Desired::new(&rx), Trigger::Start)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("n2"), "{err}");
        assert_eq!(*dp.maintained.lock().unwrap(), 1);
        *dp.fail_remote_nodes.lock().unwrap() = false;
        let a = r
            .reconcile(&Desired::new(&rx), Trigger::Retry)
            .await
            .unwrap();
        assert_eq!(a, Action::Requeue(UPKEEP));
        assert_eq!(dp.remotes.lock().unwrap().len(), 1);
        // Unchanged: not applied again.
        *dp.fail_remote_nodes.lock().unwrap() = true;
        r.reconcile(&Desired::new(&rx), Trigger::Requeue)
            .await
            .unwrap();
        assert_eq!(*dp.maintained.lock().unwrap(), 3);
        drop(tx);
    }

    #[tokio::test]
    async fn every_nodes_pod_cidr_is_exempted_from_masquerade_as_nodes_come_and_go() {
        let dp = Arc::new(FakeDataplane::default());
        let nft = Arc::new(FakeNftables::default());
        let (tx, rx) = tokio::sync::watch::channel(state(NODES));
        let mut r = NodeReconciler::new(
            "n1",
            "10.244.1.0/24".parse().ok(),
            dp.clone(),
            vec![],
            nat(nft.clone()),
        );
        r.reconcile(&Desired::new(&rx), Trigger::Start)
            .await
            .unwrap();
        // n3 has no InternalIP (so no tunnel yet) but its pods' CIDR is the cluster's.
        let script = nft.last().expect("the table was applied");
        assert!(
            script.contains(
                "ip daddr != { 10.96.0.0/12, 10.244.1.0/24, 10.244.2.0/24, 10.244.3.0/24 }"
            ),
            "{script}"
        );
        // Unchanged: nft does not run again.
        r.reconcile(&Desired::new(&rx), Trigger::Requeue)
            .await
            .unwrap();
        assert_eq!(nft.loaded.lock().unwrap().len(), 1);
        // n2 leaves; a failed load is retried on the next pass.
        tx.send_replace(state(&NODES.replace(
            "metadata: {name: n2}\nspec: {podCIDR: 10.244.2.0/24}",
            "metadata: {name: n2}\nspec: {}",
        )));
        *nft.fail.lock().unwrap() = 1;
        let err = r
            .reconcile(&Desired::new(&rx), Trigger::Changed)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("10.244.3.0/24"), "{err}");
        r.reconcile(&Desired::new(&rx), Trigger::Retry)
            .await
            .unwrap();
        let script = nft.last().unwrap();
        assert!(
            script.contains("ip daddr != { 10.96.0.0/12, 10.244.1.0/24, 10.244.3.0/24 }"),
            "{script}"
        );
    }
}
