//! The controller against the recording fakes of its side effects: no root, no kernel, time
//! paused. One [`EventLog`] is shared by every fake, so the order of calls across links,
//! addresses, routes, rules, nftables and the dataplane is asserted as it happened.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use super::node::{
    ALIAS, EgressKernel, EgressNode, GARP_SPACING, RTPROT_FERREA_EGRESS as P, VlanTagging,
};
use super::{EgressContext, EgressStatusError, EgressStatusSink, EgressStatuses, run};
use crate::dataplane::{Dataplane, NodeNetwork};
use crate::kernel::links::LinkKind;
use crate::kernel::nftables::{NatSpec, NatTable};
use crate::kernel::rules::Rule;
use crate::kernel::shaping::ShapedClass;
use crate::kernel::sysctl::conf_key;
use crate::kernel::tables::TableRoute;
use crate::kernel::vlan::VlanError;
use crate::net::egress_mark;
use crate::pods::PodManager;
use crate::pods::store::Store;
use crate::source::DesiredState;
use crate::testing::{
    EventLog, FakeAddresses, FakeDataplane, FakeGarp, FakeLinks, FakeNftables, FakePodNet,
    FakeRules, FakeShaping, FakeSysctl, FakeTableRoutes, LoggedDataplane, LoggedNftables, state,
};

/// The VLAN tagger, logging `vlan attach <child> <vid>` and `vlan retain <vids>`.
struct FakeTagger(EventLog);

impl VlanTagging for FakeTagger {
    fn attach(&mut self, _parent: &str, child: &str, vid: u16) -> Result<(), VlanError> {
        self.0.push(format!("vlan attach {child} {vid}"));
        Ok(())
    }
    fn retain(&mut self, _parent: &str, keep: &[u16]) -> Result<(), VlanError> {
        self.0.push(format!("vlan retain {keep:?}"));
        Ok(())
    }
}

struct Fx {
    log: EventLog,
    links: Arc<FakeLinks>,
    addrs: Arc<FakeAddresses>,
    routes: Arc<FakeTableRoutes>,
    rules: Arc<FakeRules>,
    sysctl: Arc<FakeSysctl>,
    shaping: Arc<FakeShaping>,
    nft: Arc<FakeNftables>,
    dp: Arc<FakeDataplane>,
    dir: tempfile::TempDir,
    eth0: u32,
}

impl Fx {
    /// A node with `eth0` (the transport) and `ferrea-gw0`, whose fresh interfaces' rp_filter
    /// reads as 1 (strict).
    fn new() -> Self {
        let log = EventLog::default();
        let links = Arc::new(FakeLinks::new(log.clone()));
        let eth0 = links.seed("eth0", LinkKind::Other, None);
        links.seed("ferrea-gw0", LinkKind::Other, None);
        Self {
            links,
            addrs: Arc::new(FakeAddresses::new(log.clone())),
            routes: Arc::new(FakeTableRoutes::new(log.clone())),
            rules: Arc::new(FakeRules::new(log.clone())),
            sysctl: Arc::new(FakeSysctl::new(log.clone(), Some("1"))),
            shaping: Arc::new(FakeShaping::new(log.clone())),
            nft: Arc::new(FakeNftables::default()),
            dp: Arc::new(FakeDataplane::default()),
            dir: tempfile::tempdir().unwrap(),
            eth0,
            log,
        }
    }

    /// Starts the controller (as `egress::start` does, over the fakes) on `st`.
    fn start(
        &self,
        st: DesiredState,
    ) -> (watch::Sender<DesiredState>, tokio::task::JoinHandle<()>) {
        self.start_with(st, Arc::new(super::LocalStatusView::new(self.dir.path())))
    }

    /// [`Fx::start`] publishing the Egress status to `sink`.
    fn start_with(
        &self,
        st: DesiredState,
        sink: Arc<dyn EgressStatusSink>,
    ) -> (watch::Sender<DesiredState>, tokio::task::JoinHandle<()>) {
        let node = self.node(Arc::new(FakeGarp::new(self.log.clone())));
        self.start_node(st, sink, node)
    }

    /// The node side alone, over the fixture's fakes (`garp` records the announcements).
    fn node(&self, garp: Arc<FakeGarp>) -> EgressNode {
        let kernel = EgressKernel {
            links: self.links.clone(),
            addresses: self.addrs.clone(),
            routes: self.routes.clone(),
            rules: self.rules.clone(),
            sysctl: self.sysctl.clone(),
            garp,
            shaping: self.shaping.clone(),
        };
        let log = self.log.clone();
        EgressNode::with_kernel(
            kernel,
            "eth0".into(),
            "ferrea-gw0".into(),
            self.dir.path(),
            Box::new(move || Ok(Box::new(FakeTagger(log.clone())) as Box<dyn VlanTagging>)),
        )
    }

    fn start_node(
        &self,
        st: DesiredState,
        sink: Arc<dyn EgressStatusSink>,
        node: EgressNode,
    ) -> (watch::Sender<DesiredState>, tokio::task::JoinHandle<()>) {
        let dp: Arc<dyn Dataplane> = Arc::new(LoggedDataplane {
            inner: self.dp.clone(),
            log: self.log.clone(),
        });
        let store = Store::open(&self.dir.path().join("store")).unwrap();
        let node_net = NodeNetwork::standalone("10.244.1.0/24".parse().unwrap(), 1500);
        let pods = Arc::new(
            PodManager::new(
                store,
                Arc::new(FakePodNet::default()),
                dp,
                node_net,
                "fe".into(),
            )
            .unwrap(),
        );
        let spec = NatSpec {
            table: "ferrea".into(),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
            no_masquerade: vec!["10.244.0.0/16".parse().unwrap()],
            masquerade: true,
            gateway: Ipv4Addr::new(10, 244, 1, 1),
        };
        let nft = Arc::new(LoggedNftables {
            inner: self.nft.clone(),
            log: self.log.clone(),
        });
        let nat = Arc::new(NatTable::with_nftables(spec, None, nft));
        let ctx = EgressContext {
            node_name: "n1".into(),
            cluster: vec!["10.244.0.0/16".parse().unwrap()],
            encap: true,
            transport: "eth0".into(),
            gateway_if: "ferrea-gw0".into(),
            state_dir: self.dir.path().to_owned(),
            metrics: crate::metrics::Metrics::new(),
            views: Default::default(),
        };
        let (tx, rx) = watch::channel(st);
        (tx, tokio::spawn(run(ctx, node, pods, nat, rx, sink, None)))
    }

    fn view(&self, name: &str) -> Value {
        let p = self.dir.path().join("status").join(name);
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    fn index(&self, name: &str) -> u32 {
        self.links.index(name).unwrap()
    }
}

const NODE: &str = "kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.11}]}
";

fn pool(vlan: u16) -> String {
    format!(
        "apiVersion: crd.antrea.io/v1beta1
kind: ExternalIPPool
metadata: {{name: pool{vlan}}}
spec:
  ipRanges: [{{start: 10.172.{vlan}.1, end: 10.172.{vlan}.199}}]
  subnetInfo: {{gateway: 10.172.{vlan}.254, prefixLength: 24, vlan: {vlan}}}
  nodeSelector: {{}}
"
    )
}

fn egress(name: &str, vlan: u16, ip: &str) -> String {
    format!(
        "apiVersion: crd.antrea.io/v1beta1
kind: Egress
metadata: {{name: {name}}}
spec:
  appliedTo: {{podSelector: {{matchLabels: {{app: {name}}}}}}}
  egressIP: {ip}
  externalIPPool: pool{vlan}
"
    )
}

fn desired(parts: &[String]) -> DesiredState {
    let mut all = vec![NODE.to_owned()];
    all.extend(parts.iter().cloned());
    state(&all.join("---\n"))
}

/// The id the plan gives `egress`'s IP in `st`.
fn id_of(st: &DesiredState, egress: &str) -> crate::net::EgressId {
    super::plan::plan(st, &[], "n1", &[], true, None, &Default::default()).assignments[egress]
        .id
        .unwrap()
}

/// Whether the last nft script loaded SNATs some Egress to `ip`.
fn snats_to(fx: &Fx, ip: &str) -> bool {
    let script = fx.nft.last().unwrap();
    crate::testing::events::egress_snat_targets(&script).contains(&ip)
}

fn pos(events: &[String], prefix: &str) -> usize {
    events
        .iter()
        .position(|e| e.starts_with(prefix))
        .unwrap_or_else(|| panic!("no event {prefix:?} in {events:#?}"))
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test(start_paused = true)]
async fn an_ip_moving_between_egresses_is_made_before_the_old_one_breaks() {
    let fx = Fx::new();
    let before = desired(&[pool(100), pool(200), egress("old", 100, "10.172.100.5")]);
    let after = desired(&[pool(100), pool(200), egress("new", 200, "10.172.200.6")]);
    let (old_id, new_id) = (id_of(&before, "old"), id_of(&after, "new"));
    assert_ne!(old_id, new_id, "the test needs two ids");
    let (tx, task) = fx.start(before);
    settle().await;
    let old_if = fx.index("ferrea-ext.100");
    assert!(
        fx.addrs
            .on(old_if)
            .contains(&("10.172.100.5".parse().unwrap(), 24))
    );
    assert!(snats_to(&fx, "10.172.100.5"));
    fx.log.take();

    tx.send_replace(after);
    settle().await;
    let ev = fx.log.events();
    let new_addr = pos(&ev, "addr add 10.172.200.6/24");
    let new_route = pos(&ev, "route replace 10.172.200.0/24");
    let new_default = pos(&ev, "route replace default via 10.172.200.254");
    let new_rule = pos(
        &ev,
        &format!(
            "rule add 20100: fwmark {:#x}/0xffff0000 lookup 20200",
            egress_mark(new_id)
        ),
    );
    let switch = pos(&ev, "nft load snat=10.172.200.6");
    let dataplane = pos(&ev, &format!("dataplane egress held=[{new_id}]"));
    let old_addr = pos(&ev, "addr del 10.172.100.5/24");
    let old_route = pos(&ev, "route del 10.172.100.0/24");
    let old_default = pos(&ev, "route del default via 10.172.100.254");
    let old_rule = pos(
        &ev,
        &format!(
            "rule del 20100: fwmark {:#x}/0xffff0000 lookup 20100",
            egress_mark(old_id)
        ),
    );
    let old_link = pos(&ev, "link del ferrea-ext.100");
    for made in [new_addr, new_route, new_default, new_rule] {
        assert!(made < switch, "made after the switch: {ev:#?}");
    }
    assert!(switch < dataplane, "{ev:#?}");
    for broken in [old_addr, old_route, old_default, old_rule, old_link] {
        assert!(dataplane < broken, "broken before the switch: {ev:#?}");
    }
    // One switch, straight from the old IP to the new one.
    assert_eq!(
        ev.iter().filter(|e| e.starts_with("nft load")).count(),
        1,
        "{ev:#?}"
    );
    assert!(fx.links.index("ferrea-ext.100").is_none());
    assert_eq!(fx.rules.of(P).len(), 1);
    assert_eq!(fx.routes.in_table(20100), vec![]);
    assert_eq!(fx.routes.in_table(20200).len(), 2);
    drop(tx);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_restart_keeps_what_is_still_wanted_and_removes_the_rest() {
    let fx = Fx::new();
    let st = desired(&[pool(100), egress("web", 100, "10.172.100.5")]);
    let id = id_of(&st, "web");
    // What the previous process left: its sub-interface for VLAN 100 (wanted) and 300 (not),
    // their addresses, routes and rules, an address on the transport interface it recorded.
    let kept_if = fx.links.seed("ferrea-ext.100", LinkKind::Vlan, Some(ALIAS));
    let stale_if = fx.links.seed("ferrea-ext.300", LinkKind::Vlan, Some(ALIAS));
    let foreign_if = fx.links.seed("ferrea-ext.200", LinkKind::MacVlan, None);
    fx.addrs.seed(kept_if, "10.172.100.5".parse().unwrap(), 24);
    fx.addrs.seed(stale_if, "10.172.30.9".parse().unwrap(), 24);
    fx.addrs.seed(foreign_if, "10.200.0.2".parse().unwrap(), 24);
    fx.addrs.seed(fx.eth0, "10.0.0.2".parse().unwrap(), 24);
    fx.addrs.seed(fx.eth0, "192.0.2.50".parse().unwrap(), 32);
    std::fs::write(
        fx.dir.path().join("egress-addresses.json"),
        r#"[["192.0.2.50",32]]"#,
    )
    .unwrap();
    let route = |table, dst: Option<&str>, gw: Option<&str>, oif, src: Option<&str>| TableRoute {
        table,
        dst: dst.map(|d| d.parse().unwrap()),
        gateway: gw.map(|g| g.parse().unwrap()),
        oif: Some(oif),
        pref_src: src.map(|s| s.parse().unwrap()),
        scope_link: dst.is_some(),
    };
    let kept_routes = vec![
        route(
            20100,
            Some("10.172.100.0/24"),
            None,
            kept_if,
            Some("10.172.100.5"),
        ),
        route(20100, None, Some("10.172.100.254"), kept_if, None),
    ];
    for r in &kept_routes {
        fx.routes.seed(P, r.clone());
    }
    fx.routes.seed(
        P,
        route(
            20300,
            Some("10.172.30.0/24"),
            None,
            stale_if,
            Some("10.172.30.9"),
        ),
    );
    fx.routes
        .seed(P, route(20300, None, Some("10.172.30.254"), stale_if, None));
    let foreign_route = route(100, None, Some("10.0.0.1"), fx.eth0, None);
    fx.routes.seed(4, foreign_route.clone());
    let rule = |mark, table| Rule {
        priority: Some(20100),
        fwmark: Some(mark),
        fwmask: Some(0xffff_0000),
        table,
    };
    fx.rules.seed(P, rule(egress_mark(id), 20100));
    fx.rules.seed(P, rule(0x99_0000, 20300));
    fx.rules.seed(0, rule(0x5_0000, 300));

    let (tx, task) = fx.start(st);
    settle().await;
    let ev = fx.log.events();
    // Kept: nothing about them was removed or made again.
    for e in &ev {
        assert!(!e.starts_with("link add"), "{ev:#?}");
        assert!(!e.starts_with("rule add"), "{ev:#?}");
        assert!(!e.contains("10.172.100.5/24"), "{ev:#?}");
        assert!(
            !(e.starts_with("route del") && e.contains("table 20100")),
            "{ev:#?}"
        );
        assert!(
            !e.contains("ferrea-ext.100")
                || e.starts_with("sysctl")
                || e == "shape ferrea-ext.100 []",
            "{ev:#?}"
        );
        assert!(
            !e.contains("ferrea-ext.200"),
            "the foreign interface was touched: {ev:#?}"
        );
    }
    assert_eq!(fx.index("ferrea-ext.100"), kept_if);
    assert_eq!(fx.routes.in_table(20100), kept_routes);
    assert_eq!(fx.rules.of(P), vec![rule(egress_mark(id), 20100)]);
    // Removed: the other sub-interface, its address, routes and rule, the recorded address.
    pos(&ev, "addr del 10.172.30.9/24");
    pos(&ev, "addr del 192.0.2.50/32");
    pos(&ev, "link del ferrea-ext.300");
    pos(
        &ev,
        "rule del 20100: fwmark 0x990000/0xffff0000 lookup 20300",
    );
    assert_eq!(fx.routes.in_table(20300), vec![]);
    // Not ferrea's: left as they were.
    assert_eq!(
        fx.addrs.on(foreign_if).into_iter().collect::<Vec<_>>(),
        vec![("10.200.0.2".parse().unwrap(), 24)]
    );
    assert_eq!(
        fx.addrs.on(fx.eth0).into_iter().collect::<Vec<_>>(),
        vec![("10.0.0.2".parse().unwrap(), 24)]
    );
    assert_eq!(fx.routes.in_table(100), vec![foreign_route]);
    assert_eq!(fx.rules.of(0), vec![rule(0x5_0000, 300)]);
    assert!(snats_to(&fx, "10.172.100.5"));
    drop(tx);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn rp_filter_changed_by_an_outsider_is_restored_and_reported() {
    let fx = Fx::new();
    let (tx, task) = fx.start(desired(&[pool(100), egress("web", 100, "10.172.100.5")]));
    settle().await;
    let key = conf_key("ferrea-ext.100", "rp_filter");
    let gw_key = conf_key("ferrea-gw0", "rp_filter");
    assert_eq!(fx.sysctl.value(&key).as_deref(), Some("2"));
    assert_eq!(fx.sysctl.value(&gw_key).as_deref(), Some("2"));
    let rp = |v: &Value, i: &str| {
        v["rpFilter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["interface"] == i)
            .cloned()
            .unwrap()
    };
    // The first setting is not drift.
    assert_eq!(
        rp(&fx.view("egress-node.json"), "ferrea-ext.100")["restored"],
        0
    );

    fx.sysctl.outsider_sets(&key, "1");
    // Checked every second: restored at the next check.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(fx.sysctl.value(&key).as_deref(), Some("2"));
    let s = rp(&fx.view("egress-node.json"), "ferrea-ext.100");
    assert_eq!(
        (s["found"].as_str(), s["restored"].as_u64()),
        (Some("1"), Some(1)),
        "{s}"
    );
    assert_eq!(
        rp(&fx.view("egress-node.json"), "ferrea-gw0")["restored"],
        0
    );
    // Left alone, it stays restored once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = rp(&fx.view("egress-node.json"), "ferrea-ext.100");
    assert_eq!(
        (s["found"].as_str(), s["restored"].as_u64()),
        (Some("2"), Some(1)),
        "{s}"
    );
    assert_eq!(
        fx.log
            .events()
            .iter()
            .filter(|e| e.starts_with(&format!("sysctl {key}=")))
            .count(),
        2
    );
    drop(tx);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_netlink_step_is_retried_and_converges() {
    let fx = Fx::new();
    *fx.routes.fail.lock().unwrap() = 1;
    let (tx, task) = fx.start(desired(&[pool(100), egress("web", 100, "10.172.100.5")]));
    settle().await;
    assert_eq!(fx.routes.in_table(20100), vec![]);
    assert!(
        fx.nft.last().is_none(),
        "SNAT before the routes were in place"
    );
    let assigned = |v: &Value| v["items"][0]["status"]["conditions"][1].clone();
    let c = assigned(&fx.view("egresses.json"));
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("AssignmentError")),
        "{c}"
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("adding route 10.172.100.0/24"),
        "{c}"
    );

    // Retried a second later.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(fx.routes.in_table(20100).len(), 2);
    assert_eq!(fx.rules.of(P).len(), 1);
    assert!(snats_to(&fx, "10.172.100.5"));
    let c = assigned(&fx.view("egresses.json"));
    assert_eq!(
        (c["status"].as_str(), c["message"].as_str()),
        (Some("True"), Some("on ferrea-ext.100")),
        "{c}"
    );
    drop(tx);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn deleting_the_egress_releases_everything() {
    let fx = Fx::new();
    let (tx, task) = fx.start(desired(&[pool(100), egress("web", 100, "10.172.100.5")]));
    settle().await;
    let subif = fx.index("ferrea-ext.100");
    assert_eq!(fx.addrs.on(subif).len(), 1);
    assert_eq!(fx.dp.egress.lock().unwrap().held.len(), 1);

    tx.send_replace(desired(&[pool(100)]));
    settle().await;
    assert!(fx.links.index("ferrea-ext.100").is_none());
    assert!(fx.addrs.on(subif).is_empty());
    assert!(fx.routes.routes.lock().unwrap().is_empty());
    assert!(fx.rules.rules.lock().unwrap().is_empty());
    let nft = fx.nft.last().unwrap();
    assert!(
        !nft.contains("egress_snat") && !nft.contains("egress_mark"),
        "{nft}"
    );
    assert!(fx.dp.egress.lock().unwrap().held.is_empty());
    let v = fx.view("egress-node.json");
    assert_eq!(v["held"], serde_json::json!([]));
    assert_eq!(v["rpFilter"], serde_json::json!([]));
    assert_eq!(fx.view("egresses.json")["items"], serde_json::json!([]));
    drop(tx);
    task.await.unwrap();
}

/// Records what the controller publishes: the Egresses this node is responsible for, per
/// call; fails the first `fail` calls (as the API would while it is down).
#[derive(Default)]
struct FakeSink {
    calls: std::sync::Mutex<Vec<std::collections::BTreeMap<String, Value>>>,
    pools: std::sync::Mutex<Vec<std::collections::BTreeMap<String, super::PoolUsage>>>,
    fail: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl EgressStatusSink for FakeSink {
    async fn publish_egresses(&self, statuses: &EgressStatuses) -> Result<(), EgressStatusError> {
        use std::sync::atomic::Ordering;
        let failing = self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(EgressStatusError::Local {
                path: "fake".into(),
                source: std::io::Error::other("the API is down"),
            });
        }
        self.calls.lock().unwrap().push(statuses.responsible());
        self.pools.lock().unwrap().push(statuses.pools.clone());
        Ok(())
    }
}

/// Node `n2`, labelled `role: far`, and a pool only it is eligible for.
const FAR: &str = "kind: Node
metadata: {name: n2, labels: {role: far}}
spec: {podCIDR: 10.244.2.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.12}]}
---
apiVersion: crd.antrea.io/v1beta1
kind: ExternalIPPool
metadata: {name: pool200}
spec:
  ipRanges: [{start: 10.172.200.1, end: 10.172.200.199}]
  subnetInfo: {gateway: 10.172.200.254, prefixLength: 24, vlan: 200}
  nodeSelector: {matchLabels: {role: far}}
";

#[tokio::test(start_paused = true)]
async fn the_sink_gets_only_the_held_egresses_and_reported_pools_once_per_change_and_a_failure_is_retried()
 {
    let fx = Fx::new();
    let sink = Arc::new(FakeSink::default());
    let parts = [
        FAR.to_owned(),
        // Only n1 (unlabelled) is eligible for pool100.
        pool(100).replace(
            "nodeSelector: {}",
            "nodeSelector: {matchExpressions: [{key: role, operator: DoesNotExist}]}",
        ),
        egress("web", 100, "10.172.100.5"),
        egress("far", 200, "10.172.200.5"),
    ];
    let (tx, task) = fx.start_with(desired(&parts), sink.clone());
    settle().await;
    // Several resyncs and upkeep passes: nothing changed, nothing published again.
    tokio::time::sleep(Duration::from_secs(25)).await;
    {
        let calls = sink.calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "{calls:#?}");
        let held = &calls[0];
        assert_eq!(
            held.keys().collect::<Vec<_>>(),
            ["web"],
            "n2 holds far: {held:#?}"
        );
        let st = &held["web"];
        assert_eq!(st["egressNode"], "n1");
        assert_eq!(st["egressIP"], "10.172.100.5");
        assert_eq!(st["conditions"][0]["type"], "IPAllocated");
        assert_eq!(st["conditions"][0]["status"], "True");
        assert_eq!(st["conditions"][1]["type"], "IPAssigned");
        assert_eq!(st["conditions"][1]["status"], "True", "{st:#}");
    }
    // n1 reports pool100's usage (it is the first and only eligible node), n2 pool200's.
    assert_eq!(
        sink.pools.lock().unwrap()[0],
        [(
            "pool100".to_owned(),
            super::PoolUsage {
                total: 199,
                used: 1
            }
        )]
        .into(),
    );
    // The files-mode view is not written through this sink.
    assert!(!fx.dir.path().join("status/egresses.json").exists());

    // A change while the sink fails: the pass fails and is retried until it is published.
    sink.fail.store(2, std::sync::atomic::Ordering::SeqCst);
    tx.send_replace(desired(&parts[..3]));
    tokio::time::sleep(Duration::from_secs(5)).await;
    {
        let calls = sink.calls.lock().unwrap();
        assert_eq!(
            sink.fail.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "not retried"
        );
        assert_eq!(calls.len(), 2, "{calls:#?}");
        assert_eq!(calls[1].keys().collect::<Vec<_>>(), ["web"]);
    }

    // An Egress no node may hold (its pool's selector matches none): n1, the first node by
    // name, reports it, with no egressNode and IPAssigned False saying why.
    let mut with_orphan = parts[..3].to_vec();
    with_orphan.push(pool(30).replace(
        "nodeSelector: {}",
        "nodeSelector: {matchLabels: {role: nowhere}}",
    ));
    with_orphan.push(egress("orphan", 30, "10.172.30.5"));
    tx.send_replace(desired(&with_orphan));
    tokio::time::sleep(Duration::from_secs(5)).await;
    {
        let calls = sink.calls.lock().unwrap();
        let last = calls.last().unwrap();
        assert_eq!(
            last.keys().collect::<Vec<_>>(),
            ["orphan", "web"],
            "{last:#?}"
        );
        let st = &last["orphan"];
        assert!(st.get("egressNode").is_none(), "{st:#}");
        assert_eq!(st["conditions"][1]["type"], "IPAssigned");
        assert_eq!(st["conditions"][1]["status"], "False", "{st:#}");
        assert_eq!(st["conditions"][1]["reason"], "NoEgressNode", "{st:#}");
    }
    drop(tx);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn fields_not_served_are_named_in_the_node_view_and_the_egress_still_works() {
    let fx = Fx::new();
    let e = egress("shaped", 100, "10.172.100.5").replace(
        "  egressIP: 10.172.100.5\n  externalIPPool: pool100\n",
        "  egressIPs: [10.172.100.5, 'fd00::5']\n  externalIPPools: [pool100, pool6]\n  \
         bandwidth: {rate: 10M, burst: 20M}\n",
    );
    let (_tx, _task) = fx.start(desired(&[pool(100), e]));
    settle().await;
    // Served with its IPv4 address and pool.
    assert!(snats_to(&fx, "10.172.100.5"));
    let problems = fx.view("egress-node.json")["problems"].clone();
    let text = problems.to_string();
    for field in ["spec.egressIPs[1] fd00::5", "spec.externalIPPools[1] pool6"] {
        assert!(
            text.contains(&format!("Egress shaped: {field}")),
            "{field}: {text}"
        );
    }
    // The bandwidth is served.
    assert!(!text.contains("bandwidth"), "{text}");
    assert!(
        fx.shaping
            .devices
            .lock()
            .unwrap()
            .contains_key("ferrea-ext.100")
    );
}

fn with_bandwidth(e: String, rate: &str, burst: &str) -> String {
    format!("{e}  bandwidth: {{rate: {rate}, burst: {burst}}}\n")
}

#[tokio::test(start_paused = true)]
async fn bandwidth_shapes_the_device_the_ip_leaves_by_and_follows_changes() {
    let fx = Fx::new();
    let shaped = desired(&[
        pool(100),
        with_bandwidth(egress("web", 100, "10.172.100.5"), "10M", "1M"),
    ]);
    let id = id_of(&shaped, "web");
    let (tx, task) = fx.start(shaped);
    settle().await;
    let class = ShapedClass {
        id,
        rate_bps: 10_000_000,
        burst_bits: 1_000_000,
    };
    assert_eq!(
        fx.shaping.devices.lock().unwrap().get("ferrea-ext.100"),
        Some(&vec![class])
    );
    // The packets of its mark get the priority of its class.
    let script = fx.nft.last().unwrap();
    let entry = format!("{:#x} : fe0a:{id:x}", crate::net::egress_mark(id));
    assert!(
        script.contains("chain egress_shape") && script.contains(&entry),
        "{script}"
    );
    let held = fx.view("egress-node.json")["held"][0].clone();
    assert_eq!(held["bandwidth"]["rateBps"], 10_000_000, "{held}");

    // Nothing changed: no tc call on the resync.
    let n = fx
        .log
        .events()
        .iter()
        .filter(|e| e.starts_with("shape"))
        .count();
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        fx.log
            .events()
            .iter()
            .filter(|e| e.starts_with("shape"))
            .count(),
        n
    );

    // The bandwidth removed: the class goes, and so does the priority.
    tx.send(desired(&[pool(100), egress("web", 100, "10.172.100.5")]))
        .unwrap();
    settle().await;
    assert!(fx.shaping.devices.lock().unwrap().is_empty());
    assert!(!fx.nft.last().unwrap().contains("egress_shape"));
    assert!(snats_to(&fx, "10.172.100.5"));
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_device_with_another_root_qdisc_is_not_shaped_and_the_ip_still_works() {
    let fx = Fx::new();
    fx.shaping
        .foreign
        .lock()
        .unwrap()
        .push("ferrea-ext.100".into());
    let (_tx, _task) = fx.start(desired(&[
        pool(100),
        with_bandwidth(egress("web", 100, "10.172.100.5"), "10M", "1M"),
    ]));
    settle().await;
    assert!(snats_to(&fx, "10.172.100.5"));
    let text = fx.view("egress-node.json")["problems"].to_string();
    assert!(
        text.contains("Egress bandwidth on ferrea-ext.100 not applied")
            && text.contains("root qdisc of its own (tbf 1:)"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_sub_interface_answers_arp_only_for_its_egress_ips() {
    let fx = Fx::new();
    let (_tx, _task) = fx.start(desired(&[pool(100), egress("e", 100, "10.172.100.5")]));
    settle().await;
    for (k, want) in super::node::SUBIF_ARP {
        let key = conf_key("ferrea-ext.100", k);
        assert_eq!(fx.sysctl.value(&key).as_deref(), Some(want), "{key}");
    }
    // Changed by someone else: set again on the next apply of the interface.
    fx.sysctl
        .outsider_sets(&conf_key("ferrea-ext.100", "arp_ignore"), "0");
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        fx.sysctl
            .value(&conf_key("ferrea-ext.100", "arp_ignore"))
            .as_deref(),
        Some("1")
    );
}

#[tokio::test(start_paused = true)]
async fn an_assigned_ip_is_announced_three_times_past_the_neighbour_locktime() {
    let fx = Fx::new();
    let (tx, task) = fx.start(desired(&[pool(100), egress("web", 100, "10.172.100.5")]));
    settle().await;
    let garps = || {
        fx.log
            .events()
            .iter()
            .filter(|e| e.starts_with("garp 10.172.100.5 "))
            .count()
    };
    assert_eq!(garps(), 1, "{:#?}", fx.log.events());
    // The repeats are spaced past Linux's 1 s neighbour locktime, not sent in one burst.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(garps(), 1, "{:#?}", fx.log.events());
    tokio::time::sleep(super::node::GARP_SPACING).await;
    assert_eq!(garps(), 2, "{:#?}", fx.log.events());
    tokio::time::sleep(super::node::GARP_SPACING * 2).await;
    assert_eq!(garps(), 3);
    // Then no more while the IP stays.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(garps(), usize::from(super::node::GARP_REPEATS));
    drop(tx);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_releasing_ip_leaves_its_sub_interface_stays_local_and_is_never_announced_again() {
    use super::plan::HeldIp;
    use crate::source::crd::SubnetInfo;
    let fx = Fx::new();
    let garp = Arc::new(FakeGarp::new(fx.log.clone()));
    let mut node = fx.node(garp.clone());
    let held = |last: u8, id, releasing| HeldIp {
        ip: Ipv4Addr::new(10, 172, 100, last),
        id,
        egress: format!("e{last}"),
        subnet: Some(SubnetInfo {
            gateway: Ipv4Addr::new(10, 172, 100, 254),
            prefix_len: 24,
            vlan: 100,
        }),
        bandwidth: None,
        releasing,
    };
    let (ip5, ip6) = (
        Ipv4Addr::new(10, 172, 100, 5),
        Ipv4Addr::new(10, 172, 100, 6),
    );
    node.apply(&[held(5, 7, false), held(6, 8, false)])
        .await
        .unwrap();
    let subif = fx.index("ferrea-ext.100");
    assert_eq!(fx.addrs.on(subif).len(), 2);
    let announced = |ip| {
        garp.sent
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, x)| *x == ip)
            .count()
    };
    assert_eq!((announced(ip5), announced(ip6)), (1, 1));

    // .5 moves to another node: off the sub-interface (no ARP answered or asked with it), a
    // /32 elsewhere (still local for in-flight traffic), added before it was removed.
    let n = fx.log.events().len();
    let out = node
        .apply(&[held(5, 7, true), held(6, 8, false)])
        .await
        .unwrap();
    assert!(out.iter().all(|o| o.result.is_ok()), "{out:?}");
    assert_eq!(
        fx.addrs.on(subif).into_iter().collect::<Vec<_>>(),
        vec![(ip6, 24)]
    );
    let elsewhere: Vec<u32> = [super::node::DUMMY_IFNAME, "eth0"]
        .iter()
        .filter_map(|n| fx.links.index(n))
        .filter(|i| fx.addrs.on(*i).contains(&(ip5, 32)))
        .collect();
    assert_eq!(elsewhere.len(), 1, "{:#?}", fx.log.events());
    let ev = fx.log.events()[n..].to_vec();
    assert!(
        pos(&ev, "addr add 10.172.100.5/32") < pos(&ev, "addr del 10.172.100.5/24"),
        "{ev:#?}"
    );
    // The subnet's routes still leave by the sub-interface, from the IP that stays.
    let table = fx.routes.in_table(20100);
    assert!(table.iter().all(|r| r.oif == Some(subif)), "{table:#?}");
    assert!(table.iter().any(|r| r.pref_src == Some(ip6)), "{table:#?}");
    // The repeats that were due for it are not sent; the other IP's are.
    tokio::time::sleep(GARP_SPACING * 3).await;
    node.repeat_announcements();
    tokio::time::sleep(GARP_SPACING * 3).await;
    node.repeat_announcements();
    assert_eq!(announced(ip5), 1);
    assert_eq!(announced(ip6), 3);

    // Released: gone from everywhere, the other IP untouched.
    node.apply(&[held(6, 8, false)]).await.unwrap();
    assert_eq!(
        fx.addrs.on(subif).into_iter().collect::<Vec<_>>(),
        vec![(ip6, 24)]
    );
    for n in [super::node::DUMMY_IFNAME, "eth0"] {
        if let Some(i) = fx.links.index(n) {
            assert!(!fx.addrs.on(i).contains(&(ip5, 32)), "{n}");
        }
    }
}
