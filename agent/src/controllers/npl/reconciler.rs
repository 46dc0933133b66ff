//! The NodePortLocal controller: [`NplReconciler`] on the reconcile runner.
//!
//! One pass: the desired targets, the allocation, then the side effects in this order: the
//! store (a restart must never hand out other ports than the ones announced), the DNAT rules,
//! the UDP conntrack entries of removed or moved mappings, the annotations (a load balancer
//! never learns a node port before it works). Each step writes only what changed since the
//! last one that succeeded, so a failed pass is retried in full by the next.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::allocator::{Allocator, PortReserver};
use super::status::{StatusError, StatusSink, annotations};
use super::targets::desired_targets;
use super::{PortRange, rules};
use crate::controllers::runner::{self, Action, Reconciler, RunnerConfig, Trigger, Wakers};
use crate::kernel::conntrack::Conntrack;
use crate::kernel::nftables::{NatError, NatTable};
use crate::pods::PodManager;
use crate::pods::store::{NplMapping, StoreError};
use crate::source::{DesiredState, Protocol};

/// Why a NodePortLocal pass failed (it is retried every second).
#[derive(Debug, thiserror::Error)]
pub enum NplError {
    /// The node has no address to expose node ports on.
    #[error(
        "Node {node} has no InternalIP in status.addresses: NodePortLocal needs the node's address"
    )]
    NoNodeIp {
        /// This node's name.
        node: String,
    },
    /// Writing the mappings to the state store failed.
    #[error("writing NodePortLocal mappings to the state store ({put} put, {deleted} deleted)")]
    Store {
        /// Mappings written.
        put: usize,
        /// Mappings deleted.
        deleted: usize,
        /// What the store said.
        #[source]
        source: StoreError,
    },
    /// The store's blocking task did not finish (it panicked or the runtime shut down).
    #[error("writing NodePortLocal mappings to the state store: the task failed")]
    StoreTask {
        /// Why the task failed.
        #[source]
        source: tokio::task::JoinError,
    },
    /// Applying the DNAT rules to ferrea's table failed.
    #[error("applying the DNAT rules of {mappings} NodePortLocal mappings to table {table}")]
    Rules {
        /// The table.
        table: String,
        /// How many mappings the rules carry.
        mappings: usize,
        /// What nft said.
        #[source]
        source: NatError,
    },
    /// Publishing the annotations failed.
    #[error("publishing the NodePortLocal annotations of {pods} pods")]
    Publish {
        /// How many pods have an annotation.
        pods: usize,
        /// What the sink said.
        #[source]
        source: StatusError,
    },
}

/// What the controller needs (its side effects behind traits).
pub struct Controller {
    /// Parsed `nodePortLocal.portRange`.
    pub range: PortRange,
    /// This node's name.
    pub node_name: String,
    /// Local attachments, their notifications, and the store.
    pub pods: Arc<PodManager>,
    /// ferrea's table.
    pub nat: Arc<NatTable>,
    /// Removes the UDP flows of removed or moved mappings.
    pub conntrack: Arc<dyn Conntrack>,
    /// Holds the node ports.
    pub reserver: Box<dyn PortReserver>,
    /// Where annotations go.
    pub sink: Arc<dyn StatusSink>,
}

/// The runner's timing for NodePortLocal: a failed pass is retried every second, there is
/// no periodic resync (every input is watched), changes are coalesced by the runner's
/// default debounce.
pub fn runner_config() -> RunnerConfig {
    RunnerConfig {
        resync: None,
        retry_min: Duration::from_secs(1),
        retry_max: Duration::from_secs(1),
        ..RunnerConfig::default()
    }
}

/// Runs the controller until the desired-state source stops: restores the persisted
/// mappings, then reconciles whenever the desired state or the node's attachments change
/// (the [`PodManager`] notifies ADD, DEL and reconciliation).
pub async fn run(
    c: Controller,
    state: watch::Receiver<DesiredState>,
    metrics: crate::metrics::Metrics,
) {
    let wakers = Wakers::none().watch(c.pods.subscribe());
    let r = NplReconciler::restore(c).await;
    runner::run_observed(r, state, wakers, runner_config(), metrics).await;
}

/// The NodePortLocal reconciler (see the module doc).
pub struct NplReconciler {
    range: PortRange,
    node_name: String,
    pods: Arc<PodManager>,
    nat: Arc<NatTable>,
    conntrack: Arc<dyn Conntrack>,
    sink: Arc<dyn StatusSink>,
    alloc: Allocator<Box<dyn PortReserver>>,
    /// What the store holds, so every pass writes exactly the difference (and a failed write
    /// is retried in full by the next one).
    stored: BTreeMap<String, NplMapping>,
    /// The annotations last published successfully.
    published: Option<BTreeMap<String, String>>,
    /// The warnings of the last pass (each logged once).
    warnings: Vec<String>,
    /// UDP node ports whose flows are to be cut once the rules are in.
    flush: BTreeSet<u16>,
}

impl NplReconciler {
    /// Takes back the mappings a previous run persisted in the store, re-reserving their
    /// ports; those outside the range, mapped twice or whose port another process took are
    /// re-allocated by the first pass, and those of pods that are gone are removed by it.
    pub async fn restore(c: Controller) -> Self {
        let store = c.pods.store().clone();
        let persisted = match tokio::task::spawn_blocking(move || store.npl_list()).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading NodePortLocal mappings; allocating afresh");
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "reading NodePortLocal mappings");
                Vec::new()
            }
        };
        let stored = persisted.iter().map(|m| (m.key(), m.clone())).collect();
        let (alloc, dropped) = Allocator::restore(c.range, c.reserver, persisted);
        for r in &dropped.reasons {
            tracing::warn!("{r}");
        }
        tracing::info!(range = %c.range, restored = alloc.mappings().count(), "NodePortLocal controller started");
        Self {
            range: c.range,
            node_name: c.node_name,
            pods: c.pods,
            nat: c.nat,
            conntrack: c.conntrack,
            sink: c.sink,
            alloc,
            stored,
            published: None,
            warnings: Vec::new(),
            flush: BTreeSet::new(),
        }
    }

    /// The current mappings.
    pub fn mappings(&self) -> impl Iterator<Item = &NplMapping> {
        self.alloc.mappings()
    }

    /// The port range.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// The first half of a pass, on the desired state as it is now: the node's address, the
    /// targets and the allocation (which only touches the reserver). Logs each new warning
    /// once and every pod port that got no node port.
    fn allocate(&mut self, st: &DesiredState) -> Result<Ipv4Addr, NplError> {
        let records = self.pods.records();
        let node_ip = st.nodes.get(&self.node_name).and_then(|n| n.internal_ip);
        let Some(node_ip) = node_ip else {
            return Err(NplError::NoNodeIp {
                node: self.node_name.clone(),
            });
        };
        let want = desired_targets(st, &records, &self.node_name);
        if want.warnings != self.warnings {
            for w in want.warnings.iter().filter(|w| !self.warnings.contains(w)) {
                tracing::warn!("NodePortLocal: {w}");
            }
            self.warnings = want.warnings;
        }
        for f in self.alloc.sync(&want.targets) {
            tracing::error!("NodePortLocal: {}", runner::error_chain(&f));
        }
        Ok(node_ip)
    }

    /// The second half: the side effects, in order (see the module doc). Returns the number
    /// of mappings when anything changed.
    async fn converge(&mut self, node_ip: Ipv4Addr) -> Result<Option<usize>, NplError> {
        let changed = self.write_store().await?;
        let applied = self.apply(node_ip).await?;
        let ann = annotations(self.alloc.mappings(), node_ip);
        let announce = self.published.as_ref() != Some(&ann);
        if announce {
            self.sink
                .publish_npl(&ann)
                .await
                .map_err(|source| NplError::Publish {
                    pods: ann.len(),
                    source,
                })?;
            self.published = Some(ann);
        }
        Ok((changed || applied || announce).then(|| self.alloc.mappings().count()))
    }

    /// The store first: writes what changed since the last write and notes the UDP node
    /// ports whose DNAT goes away or moves. Returns whether anything was written.
    async fn write_store(&mut self) -> Result<bool, NplError> {
        let current: BTreeMap<String, NplMapping> = self
            .alloc
            .mappings()
            .map(|m| (m.key(), m.clone()))
            .collect();
        let put: Vec<NplMapping> = current
            .iter()
            .filter(|(k, m)| self.stored.get(*k) != Some(*m))
            .map(|(_, m)| m.clone())
            .collect();
        let delete: Vec<String> = self
            .stored
            .keys()
            .filter(|k| !current.contains_key(*k))
            .cloned()
            .collect();
        let changed = !put.is_empty() || !delete.is_empty();
        if changed {
            let store = self.pods.store().clone();
            let (n_put, n_del) = (put.len(), delete.len());
            tokio::task::spawn_blocking(move || store.npl_update(&put, &delete))
                .await
                .map_err(|source| NplError::StoreTask { source })?
                .map_err(|source| NplError::Store {
                    put: n_put,
                    deleted: n_del,
                    source,
                })?;
            // UDP node ports whose DNAT goes away or moves: their flows are cut once the
            // rules are in (kept across a failed step until done).
            self.flush.extend(
                self.stored
                    .iter()
                    .filter(|(k, old)| {
                        old.protocol == Protocol::Udp
                            && current.get(*k).is_none_or(|m| {
                                m.pod_ip != old.pod_ip || m.node_port != old.node_port
                            })
                    })
                    .map(|(_, old)| old.node_port),
            );
            self.stored = current;
        }
        Ok(changed)
    }

    /// Then the rules, then the stale UDP flows. Returns whether nft ran.
    async fn apply(&mut self, node_ip: Ipv4Addr) -> Result<bool, NplError> {
        let applied = self
            .nat
            .set_npl(Some(rules(node_ip, self.alloc.mappings())))
            .await
            .map_err(|source| NplError::Rules {
                table: self.nat.base().table.clone(),
                mappings: self.alloc.mappings().count(),
                source,
            })?;
        if !self.flush.is_empty() {
            let ports: Vec<u16> = std::mem::take(&mut self.flush).into_iter().collect();
            match self.conntrack.delete_udp_to(node_ip, &ports).await {
                Ok(n) => tracing::debug!(
                    entries = n,
                    "deleted UDP conntrack entries of removed NodePortLocal mappings"
                ),
                Err(e) => tracing::warn!(
                    error = %runner::error_chain(&e),
                    "deleting UDP conntrack entries of removed NodePortLocal mappings"
                ),
            }
        }
        Ok(applied)
    }
}

impl Reconciler for NplReconciler {
    type Error = NplError;

    fn name(&self) -> &'static str {
        "npl"
    }

    async fn reconcile(
        &mut self,
        desired: &runner::Desired<'_>,
        _trigger: Trigger,
    ) -> Result<Action, NplError> {
        // Every pass converges: each step compares with what it last did successfully, so
        // an unchanged input costs nothing and a failed step is redone.
        let t = std::time::Instant::now();
        let node_ip = {
            let st = desired.get();
            self.allocate(&st)?
        };
        if let Some(n) = self.converge(node_ip).await? {
            tracing::info!(
                mappings = n,
                elapsed_ms = t.elapsed().as_millis() as u64,
                "NodePortLocal mappings applied"
            );
        }
        Ok(Action::Await)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::controllers::npl::NplConfig;
    use crate::controllers::runner::error_chain;
    use crate::dataplane::NodeNetwork;
    use crate::kernel::nftables::{NatSpec, Nftables};
    use crate::pods::AddArgs;
    use crate::pods::store::Store;
    use crate::testing::npl::{Event, EventLog, FakeReserver, FakeStatusSink, Logged};
    use crate::testing::{FakeConntrack, FakeDataplane, FakeNftables, FakePodNet, state};

    const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);

    const NODE_AND_PODS: &str = "\
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 172.18.0.11}]}
---
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec: {nodeName: n1, containers: [{ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]}
---
kind: Pod
metadata: {name: web-2, labels: {app: web}}
spec: {nodeName: n1, containers: [{ports: [{name: http, containerPort: 8080}]}]}
---
kind: Pod
metadata: {name: filler}
spec: {nodeName: n1}
";

    /// The desired state: the node, its pods, and Service `web` with these ports.
    fn with_service(ports: &str) -> DesiredState {
        state(&format!(
            "{NODE_AND_PODS}---\nkind: Service\nmetadata: {{name: web, annotations: {{nodeportlocal.antrea.io/enabled: \"true\"}}}}\n\
             spec: {{selector: {{app: web}}, ports: [{ports}]}}\n"
        ))
    }

    const HTTP_AND_DNS: &str =
        "{port: 80, targetPort: http}, {port: 53, targetPort: dns, protocol: UDP}";

    /// One annotation entry, as Antrea writes it.
    fn entry(pod_port: u16, node_port: u16, protocol: &str) -> String {
        format!(
            r#"{{"podPort":{pod_port},"nodeIP":"172.18.0.11","nodePort":{node_port},"protocol":"{protocol}","ipFamily":"IPv4"}}"#
        )
    }

    fn mapping(
        pod: &str,
        pod_port: u16,
        protocol: Protocol,
        ip: [u8; 4],
        node_port: u16,
    ) -> NplMapping {
        NplMapping {
            pod: pod.into(),
            pod_port,
            protocol,
            pod_ip: ip.into(),
            node_port,
        }
    }

    fn range() -> PortRange {
        "61000-61009".parse().unwrap()
    }

    fn nat_spec() -> NatSpec {
        NatSpec {
            table: "ferrea".into(),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
            no_masquerade: vec![],
            masquerade: true,
            gateway: Ipv4Addr::new(10, 244, 1, 1),
        }
    }

    /// A node of fakes sharing one event log.
    struct Fx {
        _dir: tempfile::TempDir,
        podnet: Arc<FakePodNet>,
        pods: Arc<PodManager>,
        nft: Arc<FakeNftables>,
        nat: Arc<NatTable>,
        ct: Arc<FakeConntrack>,
        sink: Arc<FakeStatusSink>,
        reserver: FakeReserver,
        log: EventLog,
        /// What the store held at each nft load.
        stored_at_load: Snapshots,
    }

    /// What the store held at each nft load: (key, node port), sorted.
    type Snapshots = Arc<Mutex<Vec<Vec<(String, u16)>>>>;

    /// Loads through `inner`, noting first what the store holds.
    struct StoreProbe {
        store: Arc<Store>,
        seen: Snapshots,
        inner: Logged<FakeNftables>,
    }

    #[async_trait::async_trait]
    impl Nftables for StoreProbe {
        async fn load(&self, table: &str, script: &str) -> Result<(), NatError> {
            self.seen.lock().unwrap().push(stored(&self.store));
            self.inner.load(table, script).await
        }
    }

    /// The store's mappings: (key, node port), sorted.
    fn stored(store: &Store) -> Vec<(String, u16)> {
        let mut v: Vec<(String, u16)> = store
            .npl_list()
            .unwrap()
            .into_iter()
            .map(|m| (m.key(), m.node_port))
            .collect();
        v.sort();
        v
    }

    impl Fx {
        /// A node whose store holds `persisted` from a previous run; the table is installed
        /// with the restored rules, as the agent does before the controller starts.
        async fn new(persisted: &[NplMapping]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            store.npl_update(persisted, &[]).unwrap();
            let podnet = Arc::new(FakePodNet::default());
            let node = NodeNetwork::standalone("10.244.1.0/24".parse().unwrap(), 1500);
            let pods = Arc::new(
                PodManager::new(
                    store,
                    podnet.clone(),
                    Arc::new(FakeDataplane::default()),
                    node,
                    "fe".into(),
                )
                .unwrap(),
            );
            let log = EventLog::default();
            let nft = Arc::new(FakeNftables::default());
            let cfg = NplConfig {
                enable: true,
                port_range: "61000-61009".into(),
            };
            let st = with_service(HTTP_AND_DNS);
            let restored = super::super::restored_rules(&cfg, pods.store(), &st.nodes["n1"]);
            let stored_at_load = Arc::new(Mutex::new(Vec::new()));
            let probe = StoreProbe {
                store: pods.store().clone(),
                seen: stored_at_load.clone(),
                inner: Logged::new(nft.clone(), log.clone()),
            };
            let nat = Arc::new(NatTable::with_nftables(
                nat_spec(),
                restored,
                Arc::new(probe),
            ));
            nat.apply().await.unwrap();
            log.take();
            stored_at_load.lock().unwrap().clear();
            let ct = Arc::new(FakeConntrack::default());
            Self {
                _dir: dir,
                podnet,
                pods,
                nft,
                nat,
                ct,
                sink: Arc::new(FakeStatusSink::with_log(log.clone())),
                reserver: FakeReserver::default(),
                log,
                stored_at_load,
            }
        }

        /// Attaches pod `default/name` in sandbox `cid`; returns its IP.
        async fn add(&self, cid: &str, name: &str) -> Ipv4Addr {
            let netns = format!("/ns/{cid}");
            self.podnet.netns.lock().unwrap().insert(netns.clone());
            let args = AddArgs {
                container_id: cid.into(),
                ifname: "eth0".into(),
                netns,
                pod_namespace: "default".into(),
                pod_name: name.into(),
            };
            self.pods.add(&args).await.unwrap().ip
        }

        fn controller(&self) -> Controller {
            Controller {
                range: range(),
                node_name: "n1".into(),
                pods: self.pods.clone(),
                nat: self.nat.clone(),
                conntrack: Arc::new(Logged::new(self.ct.clone(), self.log.clone())),
                reserver: Box::new(self.reserver.clone()),
                sink: self.sink.clone(),
            }
        }

        async fn reconciler(&self) -> NplReconciler {
            NplReconciler::restore(self.controller()).await
        }

        fn stored(&self) -> Vec<(String, u16)> {
            stored(self.pods.store())
        }
    }

    /// One pass on `st`, as the runner's reconcile makes it.
    async fn pass(r: &mut NplReconciler, st: &DesiredState) -> Result<(), NplError> {
        let node_ip = r.allocate(st)?;
        r.converge(node_ip).await.map(|_| ())
    }

    fn kinds(events: &[Event]) -> Vec<&'static str> {
        events
            .iter()
            .map(|e| match e {
                Event::NftLoaded(_) => "nft",
                Event::ConntrackDeleted { .. } => "conntrack",
                Event::Published(_) => "publish",
            })
            .collect()
    }

    fn script(e: &Event) -> &str {
        match e {
            Event::NftLoaded(s) => s,
            other => panic!("not an nft load: {other:?}"),
        }
    }

    fn web1(entries: &[String]) -> BTreeMap<String, String> {
        BTreeMap::from([(
            "default/web-1".to_string(),
            format!("[{}]", entries.join(",")),
        )])
    }

    #[tokio::test]
    async fn restart_keeps_persisted_node_ports_and_reallocates_those_it_cannot_keep() {
        let persisted = [
            mapping("default/web-1", 8080, Protocol::Tcp, [10, 244, 1, 2], 61005), // kept
            mapping("default/web-1", 5353, Protocol::Udp, [10, 244, 1, 2], 62500), // out of range
            mapping("default/web-2", 8080, Protocol::Tcp, [10, 244, 1, 3], 61003), // port taken
            mapping("default/gone", 8080, Protocol::Tcp, [10, 244, 1, 9], 61001),  // pod gone
        ];
        let fx = Fx::new(&persisted).await;
        // The table went in with every persisted mapping, so running pods see no gap.
        let at_start = fx.nft.last().unwrap();
        assert!(at_start.contains("61001 : 10.244.1.9 . 8080"), "{at_start}");
        assert!(at_start.contains("61005 : 10.244.1.2 . 8080"), "{at_start}");
        fx.reserver.taken_by_other(61003, Protocol::Tcp);
        assert_eq!(fx.add("a", "web-1").await, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(fx.add("b", "web-2").await, Ipv4Addr::new(10, 244, 1, 3));
        let st = with_service(HTTP_AND_DNS);
        let mut r = fx.reconciler().await;
        // Restored before any pass: the one in range and free, and the gone pod's (the pass
        // decides about pods).
        let restored: Vec<u16> = r.mappings().map(|m| m.node_port).collect();
        assert_eq!(restored, [61001, 61005]);
        pass(&mut r, &st).await.unwrap();

        assert_eq!(
            fx.stored(),
            [
                ("default/web-1/5353/udp".to_string(), 61006),
                ("default/web-1/8080/tcp".to_string(), 61005),
                ("default/web-2/8080/tcp".to_string(), 61007),
            ]
        );
        assert_eq!(
            fx.reserver.held(),
            [
                (61005, Protocol::Tcp),
                (61006, Protocol::Udp),
                (61007, Protocol::Tcp)
            ]
            .into()
        );
        let ev = fx.log.take();
        // The UDP mapping moved from 62500 to 61006: its old flows are cut.
        assert_eq!(kinds(&ev), ["nft", "conntrack", "publish"]);
        let s = script(&ev[0]);
        assert!(
            s.contains(
                "elements = { 61005 : 10.244.1.2 . 8080,\n      61007 : 10.244.1.3 . 8080 }"
            ),
            "{s}"
        );
        assert!(
            s.contains("elements = { 61006 : 10.244.1.2 . 5353 }"),
            "{s}"
        );
        assert!(!s.contains("10.244.1.9") && !s.contains("62500"), "{s}");
        assert_eq!(
            ev[1],
            Event::ConntrackDeleted {
                dst: NODE_IP,
                ports: vec![62500]
            }
        );
        let mut want = web1(&[entry(5353, 61006, "udp"), entry(8080, 61005, "tcp")]);
        want.insert(
            "default/web-2".into(),
            r#"[{"podPort":8080,"nodeIP":"172.18.0.11","nodePort":61007,"protocol":"tcp","ipFamily":"IPv4"}]"#.into(),
        );
        assert_eq!(ev[2], Event::Published(want));
    }

    #[tokio::test]
    async fn the_store_is_written_first_and_rules_are_loaded_before_annotations_are_published() {
        let fx = Fx::new(&[]).await;
        fx.add("a", "web-1").await;
        let st = with_service(HTTP_AND_DNS);
        let mut r = fx.reconciler().await;
        pass(&mut r, &st).await.unwrap();
        let ev = fx.log.take();
        assert_eq!(kinds(&ev), ["nft", "publish"]);
        let s = script(&ev[0]);
        assert!(
            s.contains("elements = { 61001 : 10.244.1.2 . 8080 }"),
            "{s}"
        );
        assert!(
            s.contains("elements = { 61000 : 10.244.1.2 . 5353 }"),
            "{s}"
        );
        assert_eq!(
            ev[1],
            Event::Published(web1(&[
                entry(5353, 61000, "udp"),
                entry(8080, 61001, "tcp")
            ]))
        );
        // When nft ran, the store already held what it loads.
        assert_eq!(
            fx.stored_at_load.lock().unwrap().last().unwrap(),
            &[
                ("default/web-1/5353/udp".to_string(), 61000),
                ("default/web-1/8080/tcp".to_string(), 61001)
            ]
        );

        // A second pod: the same order again.
        fx.add("b", "web-2").await;
        pass(&mut r, &st).await.unwrap();
        let ev = fx.log.take();
        assert_eq!(kinds(&ev), ["nft", "publish"]);
        assert!(script(&ev[0]).contains("61002 : 10.244.1.3 . 8080"));
        let Event::Published(ann) = &ev[1] else {
            unreachable!()
        };
        assert_eq!(
            ann["default/web-2"],
            format!("[{}]", entry(8080, 61002, "tcp"))
        );
        assert!(
            fx.stored_at_load
                .lock()
                .unwrap()
                .last()
                .unwrap()
                .contains(&("default/web-2/8080/tcp".to_string(), 61002))
        );
    }

    #[tokio::test]
    async fn udp_flows_of_moved_or_removed_mappings_are_cut_after_the_rules_change_tcp_ones_not() {
        let fx = Fx::new(&[]).await;
        fx.add("a", "web-1").await;
        let mut st = with_service(HTTP_AND_DNS);
        let mut r = fx.reconciler().await;
        pass(&mut r, &st).await.unwrap();
        assert!(fx.ct.calls().is_empty(), "nothing was removed");
        fx.ct.add_udp(NODE_IP, 61000);
        fx.ct.add_udp(NODE_IP, 61000);
        fx.ct.add_udp(NODE_IP, 61009);
        fx.log.take();

        // web-1 comes back in a new sandbox with a new IP: 5353/udp keeps node port 61000
        // but points elsewhere. The annotation does not change, so it is not republished.
        fx.pods.del("a", "eth0").await.unwrap();
        fx.add("f", "filler").await;
        let ip = fx.add("b", "web-1").await;
        assert_ne!(ip, Ipv4Addr::new(10, 244, 1, 2));
        pass(&mut r, &st).await.unwrap();
        let ev = fx.log.take();
        assert_eq!(kinds(&ev), ["nft", "conntrack"]);
        assert!(script(&ev[0]).contains(&format!("61000 : {ip} . 5353")));
        assert_eq!(
            ev[1],
            Event::ConntrackDeleted {
                dst: NODE_IP,
                ports: vec![61000]
            }
        );
        assert_eq!(*fx.ct.udp.lock().unwrap(), [(NODE_IP, 61009)]);
        assert_eq!(fx.sink.published().len(), 1);

        // The Service drops its UDP port: its flows are cut once the rules lack it.
        fx.ct.add_udp(NODE_IP, 61000);
        st = with_service("{port: 80, targetPort: http}");
        pass(&mut r, &st).await.unwrap();
        let ev = fx.log.take();
        assert_eq!(kinds(&ev), ["nft", "conntrack", "publish"]);
        assert!(!script(&ev[0]).contains(". 5353"), "{}", script(&ev[0]));
        assert_eq!(
            ev[1],
            Event::ConntrackDeleted {
                dst: NODE_IP,
                ports: vec![61000]
            }
        );
        assert_eq!(ev[2], Event::Published(web1(&[entry(8080, 61001, "tcp")])));

        // The TCP mapping goes away (the Service targets another port): TCP flows are left
        // to finish.
        st = with_service("{port: 80, targetPort: 9090}");
        pass(&mut r, &st).await.unwrap();
        let ev = fx.log.take();
        assert_eq!(kinds(&ev), ["nft", "publish"]);
        assert!(!script(&ev[0]).contains(". 8080"), "{}", script(&ev[0]));
        assert_eq!(ev[1], Event::Published(web1(&[entry(9090, 61002, "tcp")])));
        assert_eq!(fx.ct.calls().len(), 2);
    }

    #[tokio::test]
    async fn a_failed_rule_load_fails_the_pass_and_the_retry_converges_without_republishing() {
        let fx = Fx::new(&[]).await;
        fx.add("a", "web-1").await;
        let st = with_service(HTTP_AND_DNS);
        let mut r = fx.reconciler().await;
        *fx.nft.fail.lock().unwrap() = 1;
        let e = pass(&mut r, &st).await.unwrap_err();
        assert!(matches!(e, NplError::Rules { mappings: 2, .. }), "{e:?}");
        assert_eq!(
            error_chain(&e),
            "applying the DNAT rules of 2 NodePortLocal mappings to table ferrea: \
             nft rejected table ferrea: fake: rejected on purpose"
        );
        assert!(
            fx.log.events().is_empty(),
            "published before the rules were in"
        );
        assert_eq!(fx.stored().len(), 2, "the store comes first");

        pass(&mut r, &st).await.unwrap();
        let ev = fx.log.take();
        assert_eq!(kinds(&ev), ["nft", "publish"]);
        let want = web1(&[entry(5353, 61000, "udp"), entry(8080, 61001, "tcp")]);
        assert_eq!(ev[1], Event::Published(want.clone()));

        // Nothing changed: nothing is loaded or published.
        pass(&mut r, &st).await.unwrap();
        assert!(fx.log.events().is_empty());

        // The pod moves while nft fails once: the retry loads the rules and cuts the UDP flows;
        // the annotations did not change and are not published again.
        fx.pods.del("a", "eth0").await.unwrap();
        fx.add("b", "web-1").await;
        *fx.nft.fail.lock().unwrap() = 1;
        assert!(pass(&mut r, &st).await.is_err());
        assert!(
            fx.log.events().is_empty(),
            "flows cut before the rules were in"
        );
        pass(&mut r, &st).await.unwrap();
        assert_eq!(kinds(&fx.log.take()), ["nft", "conntrack"]);
        assert_eq!(fx.sink.published(), [want]);
    }

    #[tokio::test(start_paused = true)]
    async fn on_the_runner_a_failure_is_retried_after_a_second_and_attachments_wake_it() {
        let fx = Fx::new(&[]).await;
        fx.add("a", "web-1").await;
        let (tx, rx) = watch::channel(with_service(HTTP_AND_DNS));
        *fx.nft.fail.lock().unwrap() = 1;
        let task = tokio::spawn(run(fx.controller(), rx, crate::metrics::Metrics::new()));
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(fx.log.events().is_empty());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(kinds(&fx.log.take()), ["nft", "publish"]);
        // A new attachment alone (the desired state is unchanged) wakes the controller.
        fx.add("b", "web-2").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(kinds(&fx.log.take()), ["nft", "publish"]);
        assert_eq!(fx.sink.published().last().unwrap().len(), 2);
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_service_edit_that_keeps_a_target_port_keeps_its_node_port() {
        let fx = Fx::new(&[]).await;
        fx.add("a", "web-1").await;
        let mut st = with_service(HTTP_AND_DNS);
        let mut r = fx.reconciler().await;
        pass(&mut r, &st).await.unwrap();
        assert_eq!(
            fx.sink.published(),
            [web1(&[
                entry(5353, 61000, "udp"),
                entry(8080, 61001, "tcp")
            ])]
        );

        // The Service port is renumbered (same targetPort), DNS is dropped, a port is added.
        st = with_service("{port: 8000, targetPort: http}, {port: 9443, targetPort: 9443}");
        pass(&mut r, &st).await.unwrap();
        assert_eq!(
            fx.sink.published().last().unwrap(),
            &web1(&[entry(8080, 61001, "tcp"), entry(9443, 61002, "tcp")])
        );
        assert_eq!(
            fx.stored(),
            [
                ("default/web-1/8080/tcp".to_string(), 61001),
                ("default/web-1/9443/tcp".to_string(), 61002)
            ]
        );
        fx.log.take();

        // The named target port written as its number: the same mappings, nothing to do.
        st = with_service("{port: 80, targetPort: 8080}, {port: 9443, targetPort: 9443}");
        pass(&mut r, &st).await.unwrap();
        assert!(fx.log.events().is_empty(), "{:?}", fx.log.events());
        assert_eq!(fx.sink.published().len(), 2);
    }
}
