//! One log of side effects shared by several fakes, so a test can assert on the order of
//! calls across traits (an address before the SNAT rule that uses it, say), and wrappers that
//! record into it for fakes that keep their own records ([`LoggedNftables`],
//! [`LoggedDataplane`]).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::dataplane::{
    Dataplane, DataplaneError, EgressPlan, NodeNetwork, PodEndpoint, PodStats, RemoteNode,
};
use crate::kernel::nftables::{NatError, Nftables};

use super::{FakeDataplane, FakeNftables};

/// The shared log: one entry per side effect, in call order. Clones share the log. The
/// entries are lines of text by default; a test that wants typed events names its own type
/// (NodePortLocal's tests log [`super::npl::Event`]s).
#[derive(Debug)]
pub struct EventLog<E = String>(Arc<Mutex<Vec<E>>>);

impl<E> Default for EventLog<E> {
    fn default() -> Self {
        EventLog(Arc::new(Mutex::new(Vec::new())))
    }
}

impl<E> Clone for EventLog<E> {
    fn clone(&self) -> Self {
        EventLog(self.0.clone())
    }
}

impl<E: Clone> EventLog<E> {
    /// Appends one event.
    pub fn push(&self, event: impl Into<E>) {
        self.0.lock().unwrap().push(event.into());
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<E> {
        self.0.lock().unwrap().clone()
    }

    /// Every event so far, leaving the log empty.
    pub fn take(&self) -> Vec<E> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl EventLog<String> {
    /// The index of the first event that starts with `prefix`.
    pub fn position(&self, prefix: &str) -> Option<usize> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .position(|e| e.starts_with(prefix))
    }
}

/// A [`FakeNftables`] that also logs each load: `nft load` followed by the table's SNAT
/// targets (`snat=10.0.0.5,10.0.0.6`, empty when none).
pub struct LoggedNftables {
    /// The fake that keeps the scripts.
    pub inner: Arc<FakeNftables>,
    /// The shared log.
    pub log: EventLog,
}

#[async_trait]
impl Nftables for LoggedNftables {
    async fn load(&self, table: &str, script: &str) -> Result<(), NatError> {
        self.inner.load(table, script).await?;
        let snat = egress_snat_targets(script);
        self.log.push(format!("nft load snat={}", snat.join(",")));
        Ok(())
    }
}

/// The egress IPs of the Egress SNAT map in an nft script, in the script's order.
pub fn egress_snat_targets(script: &str) -> Vec<&str> {
    script
        .lines()
        .filter_map(|l| l.split("snat ip to meta mark").nth(1))
        .filter_map(|r| r.split_once("map {")?.1.split_once('}').map(|(m, _)| m))
        .flat_map(|m| m.split(','))
        .filter_map(|e| e.split_once(':').map(|(_, ip)| ip.trim()))
        .collect()
}

/// A [`FakeDataplane`] that also logs each `set_egress` (`dataplane egress held=[..]`).
pub struct LoggedDataplane {
    /// The fake that keeps the state.
    pub inner: Arc<FakeDataplane>,
    /// The shared log.
    pub log: EventLog,
}

#[async_trait]
impl Dataplane for LoggedDataplane {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn init_node(&self, node: &NodeNetwork) -> Result<(), DataplaneError> {
        self.inner.init_node(node).await
    }
    async fn prepare_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        self.inner.prepare_pod(ep).await
    }
    async fn add_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        self.inner.add_pod(ep).await
    }
    async fn del_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        self.inner.del_pod(ep).await
    }
    async fn retain_pods(&self, keep: &HashSet<Ipv4Addr>) -> Result<Vec<Ipv4Addr>, DataplaneError> {
        self.inner.retain_pods(keep).await
    }
    async fn set_remote_nodes(&self, nodes: &[RemoteNode]) -> Result<(), DataplaneError> {
        self.inner.set_remote_nodes(nodes).await
    }
    async fn set_egress(&self, plan: &EgressPlan) -> Result<(), DataplaneError> {
        self.inner.set_egress(plan).await?;
        self.log
            .push(format!("dataplane egress held={:?}", plan.held));
        Ok(())
    }
    async fn pod_stats(&self, ep: &PodEndpoint) -> Result<Option<PodStats>, DataplaneError> {
        self.inner.pod_stats(ep).await
    }
    fn describe_pod(&self, ep: &PodEndpoint) -> Option<String> {
        self.inner.describe_pod(ep)
    }
    async fn trace(
        &self,
        packet: &crate::dataplane::TracePacket,
    ) -> Result<crate::dataplane::PacketTrace, DataplaneError> {
        self.inner.trace(packet).await
    }
    async fn dump(
        &self,
        pod: Option<&PodEndpoint>,
    ) -> Result<Vec<crate::dataplane::DumpSection>, DataplaneError> {
        self.inner.dump(pod).await
    }
}
