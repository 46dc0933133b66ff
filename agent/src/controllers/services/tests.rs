use std::sync::Arc;

use tokio::sync::watch;

use super::*;
use crate::kernel::nftables::NatSpec;
use crate::testing::conntrack::FakeConntrack;
use crate::testing::nftables::FakeNftables;
use crate::testing::{FakeDataplane, state};

const NODE_IP: &str = "172.18.0.11";
/// A desired state with the node and no Service.
const NODE_ONLY: &str = "kind: Node\nmetadata: {name: n1}\n";

fn base() -> NatSpec {
    NatSpec {
        table: "ferrea".into(),
        pod_cidr: "10.244.1.0/24".parse().unwrap(),
        no_masquerade: vec![],
        masquerade: true,
        gateway: "10.244.1.1".parse().unwrap(),
    }
}

struct Fixture {
    dp: Arc<FakeDataplane>,
    nft: Arc<FakeNftables>,
    ct: Arc<FakeConntrack>,
    r: ServiceReconciler,
}

fn fixture() -> Fixture {
    let dp = Arc::new(FakeDataplane::default());
    let nft = Arc::new(FakeNftables::default());
    let ct = Arc::new(FakeConntrack::default());
    let nat = Arc::new(NatTable::with_nftables(base(), None, nft.clone()));
    let r = ServiceReconciler::new(
        "n1",
        NODE_IP.parse().unwrap(),
        "10.96.0.0/12".parse().unwrap(),
        dp.clone(),
        nat,
        ct.clone(),
    );
    Fixture { dp, nft, ct, r }
}

/// A UDP DNS Service with these endpoint addresses (port 5353, on node n1).
fn dns(eps: &[&str]) -> String {
    let mut s = "kind: Node\nmetadata: {name: n1}\n---\nkind: Service\n\
                 metadata: {name: dns, namespace: kube-system}\n\
                 spec: {type: NodePort, clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP, nodePort: 30053}]}\n\
                 ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
                 metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}\n\
                 ports: [{name: dns, port: 5353, protocol: UDP}]\nendpoints:\n"
        .to_owned();
    for ip in eps {
        s.push_str(&format!("- addresses: [{ip}]\n  nodeName: n1\n"));
    }
    s
}

async fn pass(f: &mut Fixture, yaml: &str, t: Trigger) -> Result<Action, ServiceError> {
    let (_tx, rx) = watch::channel(state(yaml));
    f.r.reconcile(&Desired::new(&rx), t).await
}

#[tokio::test]
async fn the_plan_goes_to_the_dataplane_and_the_table() {
    let mut f = fixture();
    pass(&mut f, &dns(&["10.244.1.5"]), Trigger::Start)
        .await
        .unwrap();
    let plan =
        f.dp.services
            .lock()
            .unwrap()
            .clone()
            .expect("set_services called");
    assert_eq!(plan.vips.len(), 1);
    assert_eq!(plan.vips[0].backends[0].ip.to_string(), "10.244.1.5");
    let table = f.nft.last().unwrap();
    assert!(
        table.contains("10.96.0.10 . udp . 53 : goto svc_local_0"),
        "{table}"
    );
    assert!(
        table.contains("udp . 30053 : goto svc_nodeports_0"),
        "{table}"
    );
    assert_eq!(f.r.applied(), Some(&plan));
    // Nothing changed: nothing applied again.
    let loads = f.nft.loaded.lock().unwrap().len();
    pass(&mut f, &dns(&["10.244.1.5"]), Trigger::Changed)
        .await
        .unwrap();
    assert_eq!(f.nft.loaded.lock().unwrap().len(), loads);
}

#[tokio::test]
async fn udp_entries_are_flushed_when_a_frontend_loses_an_endpoint_or_gains_its_first() {
    let mut f = fixture();
    // First pass: the frontends appear with endpoints; entries of earlier, untranslated
    // packets are flushed.
    pass(&mut f, &dns(&["10.244.1.5", "10.244.1.6"]), Trigger::Start)
        .await
        .unwrap();
    let first: Vec<_> = f.ct.calls();
    assert_eq!(
        first,
        [
            ("10.96.0.10".parse().unwrap(), vec![53]),
            (NODE_IP.parse().unwrap(), vec![30053])
        ]
    );
    // An endpoint added: nothing is stale.
    pass(
        &mut f,
        &dns(&["10.244.1.5", "10.244.1.6", "10.244.1.7"]),
        Trigger::Changed,
    )
    .await
    .unwrap();
    assert_eq!(f.ct.calls().len(), 2);
    // One removed: both frontends' entries go.
    pass(
        &mut f,
        &dns(&["10.244.1.5", "10.244.1.7"]),
        Trigger::Changed,
    )
    .await
    .unwrap();
    assert_eq!(f.ct.calls().len(), 4);
    assert_eq!(f.ct.calls()[2], ("10.96.0.10".parse().unwrap(), vec![53]));
    // The Service deleted: its frontends' entries go too.
    pass(&mut f, NODE_ONLY, Trigger::Changed).await.unwrap();
    assert_eq!(f.ct.calls().len(), 6);
    assert_eq!(
        f.dp.services.lock().unwrap().clone(),
        Some(ServicePlan::default())
    );
    assert!(!f.nft.last().unwrap().contains("svc_local_0"));
}

#[tokio::test]
async fn a_failure_is_retried_in_full() {
    let mut f = fixture();
    *f.dp.fail_services.lock().unwrap() = true;
    let e = pass(&mut f, &dns(&["10.244.1.5"]), Trigger::Start)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("fake dataplane"), "{e}");
    assert!(f.nft.loaded.lock().unwrap().is_empty());
    assert_eq!(f.r.applied(), None);
    *f.dp.fail_services.lock().unwrap() = false;
    *f.nft.fail.lock().unwrap() = 1;
    let e = pass(&mut f, &dns(&["10.244.1.5"]), Trigger::Retry)
        .await
        .unwrap_err();
    assert!(matches!(e, ServiceError::Table { .. }), "{e}");
    assert_eq!(f.r.applied(), None);
    pass(&mut f, &dns(&["10.244.1.5"]), Trigger::Retry)
        .await
        .unwrap();
    assert!(f.r.applied().is_some());
    assert!(f.nft.last().unwrap().contains("svc_local_0"));
}

/// A LoadBalancer Service with `externalTrafficPolicy: Local` and health checks on `hc`, one
/// endpoint on n1 and one on n2.
fn lb_local(hc: u16) -> String {
    format!(
        "kind: Node\nmetadata: {{name: n1}}\n---\nkind: Service\n\
         metadata: {{name: web, namespace: shop}}\n\
         spec: {{type: LoadBalancer, clusterIP: 10.96.0.80, externalTrafficPolicy: Local, \
         healthCheckNodePort: {hc}, ports: [{{name: http, port: 80, nodePort: 30080}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
         metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         ports: [{{name: http, port: 8080}}]\nendpoints:\n\
         - addresses: [10.244.1.5]\n  nodeName: n1\n- addresses: [10.244.2.5]\n  nodeName: n2\n"
    )
}

#[tokio::test]
async fn health_checks_listen_while_their_service_has_the_port_and_a_busy_port_is_retried() {
    let mut f = fixture();
    f.r = f.r.with_health_bind_ip(std::net::Ipv4Addr::LOCALHOST);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    // The port is another process's: the plan is applied all the same, and the pass asks to
    // be called again for the listener.
    let a = pass(&mut f, &lb_local(port), Trigger::Start).await.unwrap();
    assert!(matches!(a, Action::Requeue(_)), "{a:?}");
    assert!(f.r.applied().is_some());
    assert!(f.r.health_ports().is_empty());
    drop(taken);
    let a = pass(&mut f, &lb_local(port), Trigger::Requeue)
        .await
        .unwrap();
    assert!(matches!(a, Action::Await), "{a:?}");
    assert_eq!(f.r.health_ports(), vec![port]);
    let resp = crate::proxy::health::get_local(port, "/").await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"localEndpoints\": 1"), "{resp}");
    // The Service deleted: no listener.
    pass(&mut f, NODE_ONLY, Trigger::Changed).await.unwrap();
    assert!(f.r.health_ports().is_empty());
}
