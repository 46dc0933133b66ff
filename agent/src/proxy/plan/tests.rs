use super::*;
use crate::source::Protocol;
use crate::testing::state;

const NODES: &str = "\
kind: Node
metadata: {name: n1, labels: {topology.kubernetes.io/zone: a}}
---
kind: Node
metadata: {name: n2, labels: {topology.kubernetes.io/zone: b}}
";

fn web(spec_extra: &str) -> String {
    format!(
        "---\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  clusterIP: 10.96.0.50\n  selector: {{app: web}}\n  ports:\n  \
         - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}\n{spec_extra}"
    )
}

/// An EndpointSlice of shop/web with port `http` 8080 and these endpoints
/// (`ip`, node, ready, serving, terminating).
fn slice(name: &str, eps: &[(&str, &str, bool, bool, bool)]) -> String {
    let mut s = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
         metadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         ports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for (ip, node, ready, serving, term) in eps {
        s.push_str(&format!(
            "- addresses: [{ip}]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {term}}}\n"
        ));
    }
    s
}

fn ips(b: &[Backend]) -> Vec<String> {
    b.iter().map(|b| format!("{}:{}", b.ip, b.port)).collect()
}

fn planned(yaml: &str) -> Planned {
    plan(&state(&format!("{NODES}{yaml}")), "n1")
}

#[test]
fn a_cluster_ip_gets_the_ready_endpoints_of_its_slices_by_port_name() {
    let p = planned(&format!(
        "{}{}{}",
        web(""),
        slice("web-1", &[("10.244.1.5", "n1", true, true, false)]),
        slice(
            "web-2",
            &[
                ("10.244.2.5", "n2", true, true, false),
                ("10.244.2.6", "n2", false, false, false),
                // The same endpoint in two slices while it moves: once.
                ("10.244.1.5", "n1", true, true, false),
            ]
        ),
    ));
    assert_eq!(p.conflicts, Vec::<String>::new());
    assert_eq!(p.plan.vips.len(), 1);
    let v = &p.plan.vips[0];
    assert_eq!(v.name, "shop/web:http");
    assert_eq!(
        v.addr,
        ServiceAddr {
            ip: "10.96.0.50".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp
        }
    );
    assert_eq!(ips(&v.backends), ["10.244.1.5:8080", "10.244.2.5:8080"]);
    assert!(v.backends[0].local && !v.backends[1].local);
    assert_eq!(v.external_backends, v.backends);
    // A ClusterIP Service has no node port, whatever its ports say.
    assert!(p.plan.node_ports.is_empty());
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let eps = [
        ("10.244.1.5", "n1", false, true, true),
        ("10.244.2.5", "n2", false, false, true),
    ];
    let p = planned(&format!("{}{}", web(""), slice("s", &eps)));
    assert_eq!(ips(&p.plan.vips[0].backends), ["10.244.1.5:8080"]);
    let mut with_ready = eps.to_vec();
    with_ready.push(("10.244.2.9", "n2", true, true, false));
    let p = planned(&format!("{}{}", web(""), slice("s", &with_ready)));
    assert_eq!(ips(&p.plan.vips[0].backends), ["10.244.2.9:8080"]);
}

#[test]
fn traffic_policies_restrict_to_local_endpoints() {
    let eps = slice(
        "s",
        &[
            ("10.244.1.5", "n1", true, true, false),
            ("10.244.2.5", "n2", true, true, false),
        ],
    );
    let p = planned(&format!("{}{eps}", web("  internalTrafficPolicy: Local\n")));
    assert_eq!(ips(&p.plan.vips[0].backends), ["10.244.1.5:8080"]);
    let p = planned(&format!(
        "{}{eps}",
        web(
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  externalIPs: [192.0.2.7]\nstatus: {loadBalancer: {ingress: [{ip: 192.0.2.8}, {hostname: lb.example}]}}\n"
        )
    ));
    let kinds: Vec<(String, VipKind)> = p
        .plan
        .vips
        .iter()
        .map(|v| (v.addr.ip.to_string(), v.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("10.96.0.50".to_owned(), VipKind::ClusterIp),
            ("192.0.2.7".to_owned(), VipKind::ExternalIp),
            ("192.0.2.8".to_owned(), VipKind::LoadBalancer)
        ]
    );
    // ClusterIP: every endpoint, from anywhere.
    assert_eq!(
        ips(&p.plan.vips[0].external_backends),
        ["10.244.1.5:8080", "10.244.2.5:8080"]
    );
    // The external addresses: the pods of the cluster are short-circuited to every endpoint,
    // the outside world gets the local ones and keeps its address.
    for v in &p.plan.vips[1..] {
        assert_eq!(ips(&v.backends), ["10.244.1.5:8080", "10.244.2.5:8080"]);
        assert_eq!(ips(&v.external_backends), ["10.244.1.5:8080"]);
        assert!(v.external_local);
    }
    assert_eq!(p.plan.node_ports.len(), 1);
    let np = &p.plan.node_ports[0];
    assert_eq!(
        (np.port, np.protocol, np.external_local),
        (30080, Protocol::Tcp, true)
    );
    assert_eq!(ips(&np.backends), ["10.244.1.5:8080"]);
    // On the other node the local endpoint is the other one.
    let other = plan(
        &state(&format!(
            "{NODES}{}{eps}",
            web("  type: NodePort\n  externalTrafficPolicy: Local\n")
        )),
        "n2",
    );
    assert_eq!(ips(&other.plan.node_ports[0].backends), ["10.244.2.5:8080"]);
}

#[test]
fn affinity_and_headless_and_external_name() {
    let eps = slice("s", &[("10.244.1.5", "n1", true, true, false)]);
    let p = planned(&format!(
        "{}{eps}",
        web(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}\n"
        )
    ));
    assert_eq!(p.plan.vips[0].affinity_secs, Some(30));
    let p = planned(&format!("{}{eps}", web("  sessionAffinity: ClientIP\n")));
    assert_eq!(p.plan.vips[0].affinity_secs, Some(10800));
    let headless = web("").replace("clusterIP: 10.96.0.50", "clusterIP: None");
    assert_eq!(
        planned(&format!("{headless}{eps}")).plan,
        ServicePlan::default()
    );
    let ext = "---\nkind: Service\nmetadata: {name: x, namespace: shop}\nspec: {type: ExternalName, externalName: example.com}\n";
    assert_eq!(planned(ext).plan, ServicePlan::default());
}

#[test]
fn topology_hints_apply_only_when_every_endpoint_has_them() {
    let hinted = |hints: &[(&str, Option<&str>)]| {
        let mut s = slice("s", &[]);
        for (ip, zone) in hints {
            s.push_str(&format!(
                "- addresses: [{ip}]\n  nodeName: n2\n  conditions: {{ready: true}}\n"
            ));
            if let Some(z) = zone {
                s.push_str(&format!("  hints: {{forZones: [{{name: {z}}}]}}\n"));
            }
        }
        s
    };
    let all = planned(&format!(
        "{}{}",
        web(""),
        hinted(&[("10.244.2.5", Some("a")), ("10.244.2.6", Some("b"))])
    ));
    assert_eq!(ips(&all.plan.vips[0].backends), ["10.244.2.5:8080"]);
    let partial = planned(&format!(
        "{}{}",
        web(""),
        hinted(&[("10.244.2.5", Some("a")), ("10.244.2.6", None)])
    ));
    assert_eq!(
        ips(&partial.plan.vips[0].backends),
        ["10.244.2.5:8080", "10.244.2.6:8080"]
    );
    // No endpoint for this zone: hints are ignored rather than leaving none.
    let none = planned(&format!(
        "{}{}",
        web(""),
        hinted(&[("10.244.2.5", Some("b")), ("10.244.2.6", Some("c"))])
    ));
    assert_eq!(none.plan.vips[0].backends.len(), 2);
}

#[test]
fn a_service_without_endpoints_is_planned_empty_and_conflicts_are_named() {
    let p = planned(&web(""));
    assert!(p.plan.vips[0].backends.is_empty());
    let twin = web("").replace("name: web,", "name: web2,");
    let p = planned(&format!("{}{twin}", web("")));
    assert_eq!(p.plan.vips.len(), 1);
    assert_eq!(p.plan.vips[0].name, "shop/web:http");
    assert_eq!(p.conflicts.len(), 1, "{:?}", p.conflicts);
    assert!(
        p.conflicts[0].contains("shop/web2:http") && p.conflicts[0].contains("10.96.0.50:80/tcp")
    );
}

#[test]
fn udp_and_unnamed_ports_match_by_protocol() {
    let y = "---\nkind: Service\nmetadata: {name: dns, namespace: kube-system}\n\
             spec: {clusterIP: 10.96.0.10, ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP, name: tcp}]}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}\n\
             ports: [{port: 5353, protocol: UDP}, {name: tcp, port: 5354, protocol: TCP}]\n\
             endpoints: [{addresses: [10.244.1.9], nodeName: n1}]\n";
    let p = planned(y);
    let got: Vec<(String, Vec<String>)> = p
        .plan
        .vips
        .iter()
        .map(|v| (v.addr.to_string(), ips(&v.backends)))
        .collect();
    assert_eq!(
        got,
        [
            (
                "10.96.0.10:53/tcp".to_owned(),
                vec!["10.244.1.9:5354".to_owned()]
            ),
            (
                "10.96.0.10:53/udp".to_owned(),
                vec!["10.244.1.9:5353".to_owned()]
            ),
        ]
    );
}

#[test]
fn health_checks_count_this_nodes_ready_endpoints_by_address() {
    // Two ports served by the same pods: each local ready pod counts once; terminating and
    // other nodes' endpoints do not count.
    let svc = "---\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
               spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.50\n  \
               externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n  ports:\n  \
               - {name: http, port: 80, nodePort: 30080}\n  - {name: https, port: 443, nodePort: 30443}\n";
    let slice2 = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
                  metadata: {name: web-2, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
                  ports: [{name: https, port: 8443, protocol: TCP}]\nendpoints:\n\
                  - addresses: [10.244.1.5]\n  nodeName: n1\n";
    let p = planned(&format!(
        "{svc}{}{slice2}",
        slice(
            "web-1",
            &[
                ("10.244.1.5", "n1", true, true, false),
                ("10.244.1.6", "n1", true, true, false),
                ("10.244.1.7", "n1", false, true, true),
                ("10.244.2.5", "n2", true, true, false),
            ]
        )
    ));
    assert_eq!(
        p.health_checks,
        vec![HealthCheck {
            port: 32001,
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 2,
        }]
    );
    // Without externalTrafficPolicy: Local (or not a LoadBalancer) no node answers them.
    let cluster = svc.replace("  externalTrafficPolicy: Local\n", "");
    assert!(planned(&cluster).health_checks.is_empty());
    let node_port = svc.replace("type: LoadBalancer", "type: NodePort");
    assert!(planned(&node_port).health_checks.is_empty());
}

#[test]
fn a_health_check_port_claimed_twice_is_the_first_services() {
    let svc = |name: &str| {
        format!(
            "---\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{type: LoadBalancer, clusterIP: 10.96.0.{}, externalTrafficPolicy: Local, \
             healthCheckNodePort: 32002, ports: [{{port: 80}}]}}\n",
            if name == "a" { 60 } else { 61 }
        )
    };
    let p = planned(&format!("{}{}", svc("a"), svc("b")));
    assert_eq!(p.health_checks.len(), 1);
    assert_eq!(p.health_checks[0].name, "a");
    assert!(
        p.conflicts
            .iter()
            .any(|c| c.contains("shop/b: healthCheckNodePort 32002 is already shop/a's")),
        "{:?}",
        p.conflicts
    );
}
