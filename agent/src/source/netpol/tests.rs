use std::collections::BTreeMap;

use super::*;
use crate::source::manifest::{Object, decode};
use crate::source::{ContainerPort, Protocol};

fn one(yaml: &str) -> NetworkPolicy {
    let (o, e) = decode(yaml).unwrap();
    let msgs: Vec<String> = e.iter().map(ToString::to_string).collect();
    assert!(msgs.is_empty(), "{msgs:?}");
    match o.into_iter().next() {
        Some(Object::NetworkPolicy(p)) => p,
        other => panic!("{other:?}"),
    }
}

fn error(yaml: &str) -> String {
    let (_, e) = decode(yaml).unwrap();
    assert_eq!(e.len(), 1, "{e:?}");
    e[0].to_string()
}

const HEAD: &str =
    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n";

fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
    l.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn policy_types_default_from_the_sections() {
    // Only ingress rules: restricts ingress only; an empty spec is default-deny ingress.
    let p = one(&format!("{HEAD}spec: {{podSelector: {{}}}}\n"));
    assert_eq!(p.ingress, Some(vec![]));
    assert_eq!(p.egress, None);
    let p = one(&format!(
        "{HEAD}spec: {{podSelector: {{}}, egress: [{{}}]}}\n"
    ));
    assert_eq!(p.egress.as_ref().map(Vec::len), Some(1));
    assert_eq!(p.ingress, Some(vec![]));
    // Explicit: egress only, default deny.
    let p = one(&format!(
        "{HEAD}spec: {{podSelector: {{}}, policyTypes: [Egress]}}\n"
    ));
    assert_eq!((p.ingress, p.egress), (None, Some(vec![])));
    // An empty rule allows everything: all peers, all ports.
    let p = one(&format!(
        "{HEAD}spec: {{podSelector: {{}}, ingress: [{{}}]}}\n"
    ));
    assert_eq!(
        p.ingress,
        Some(vec![Rule {
            peers: Peers::All,
            ports: vec![]
        }])
    );
    assert!(p.pod_selector.matches(&labels(&[("any", "thing")])));
}

#[test]
fn peers_select_pods_namespaces_both_and_ip_blocks() {
    let p = one(&format!(
        "{HEAD}spec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress:\n  - from:\n    \
         - podSelector: {{matchLabels: {{app: web}}}}\n    \
         - namespaceSelector: {{matchLabels: {{team: a}}}}\n    \
         - namespaceSelector: {{matchLabels: {{team: b}}}}\n      podSelector: {{matchExpressions: [{{key: app, operator: In, values: [api]}}]}}\n    \
         - ipBlock: {{cidr: 10.0.0.0/16, except: [10.0.5.0/24]}}\n    \
         - ipBlock: {{cidr: 'fd00::/64'}}\n"
    ));
    let rules = p.ingress.unwrap();
    let Peers::Some(peers) = &rules[0].peers else {
        panic!("{rules:?}")
    };
    // The IPv6 block is another family's: left out.
    assert_eq!(peers.len(), 4);
    let (team_a, team_b, none) = (
        labels(&[("team", "a")]),
        labels(&[("team", "b")]),
        BTreeMap::new(),
    );
    let web = labels(&[("app", "web")]);
    let api = labels(&[("app", "api")]);
    // podSelector alone: the policy's namespace only.
    assert!(peers[0].selects_pod("x", "x", &none, &web));
    assert!(!peers[0].selects_pod("x", "y", &team_a, &web));
    // namespaceSelector alone: every pod there.
    assert!(peers[1].selects_pod("x", "y", &team_a, &api));
    assert!(!peers[1].selects_pod("x", "x", &none, &api));
    // Both: the selected pods of the selected namespaces.
    assert!(peers[2].selects_pod("x", "z", &team_b, &api));
    assert!(!peers[2].selects_pod("x", "z", &team_b, &web));
    assert!(!peers[2].selects_pod("x", "z", &team_a, &api));
    // ipBlock with except.
    assert!(peers[3].contains_ip("10.0.1.9".parse().unwrap()));
    assert!(!peers[3].contains_ip("10.0.5.9".parse().unwrap()));
    assert!(!peers[3].contains_ip("10.1.0.1".parse().unwrap()));
    assert!(!peers[3].selects_pod("x", "x", &none, &web));
}

#[test]
fn ports_numbered_named_ranges_and_protocols() {
    let p = one(&format!(
        "{HEAD}spec:\n  podSelector: {{}}\n  ingress:\n  - ports:\n    - {{port: 80}}\n    \
         - {{port: http-alt, protocol: TCP}}\n    - {{port: 32000, endPort: 32768}}\n    \
         - {{protocol: UDP}}\n    - {{port: '53', protocol: UDP}}\n"
    ));
    let ports = &p.ingress.unwrap()[0].ports;
    let named = [ContainerPort {
        name: Some("http-alt".into()),
        port: 8080,
        protocol: Protocol::Tcp,
    }];
    assert!(ports[0].matches(Protocol::Tcp, 80, &[]));
    assert!(!ports[0].matches(Protocol::Udp, 80, &[]));
    assert!(ports[1].matches(Protocol::Tcp, 8080, &named));
    assert!(!ports[1].matches(Protocol::Tcp, 8080, &[]));
    assert!(ports[2].matches(Protocol::Tcp, 32768, &[]));
    assert!(!ports[2].matches(Protocol::Tcp, 32769, &[]));
    assert!(ports[3].matches(Protocol::Udp, 9, &[]));
    assert!(!ports[3].matches(Protocol::Tcp, 9, &[]));
    assert_eq!(ports[4].port, Some(PortRef::Number(53)));
}

#[test]
fn invalid_policies_name_the_field() {
    let cases = [
        (
            "spec: {podSelector: {}, policyTypes: [Both]}\n",
            "spec.policyTypes[0]",
        ),
        (
            "spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}\n",
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            "spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]}\n",
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            "spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}\n",
            "spec.egress[0].to[0]",
        ),
        (
            "spec: {podSelector: {}, egress: [{to: [{}]}]}\n",
            "spec.egress[0].to[0]",
        ),
        (
            "spec: {podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}\n",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "spec: {podSelector: {}, ingress: [{ports: [{port: web, endPort: 80}]}]}\n",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "spec: {podSelector: {}, ingress: [{ports: [{port: 80, protocol: ICMP}]}]}\n",
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            "spec: {podSelector: {matchExpressions: [{key: a, operator: In}]}}\n",
            "spec.podSelector.matchExpressions[0].values",
        ),
    ];
    for (spec, field) in cases {
        let e = error(&format!("{HEAD}{spec}"));
        assert!(
            e.contains("NetworkPolicy x/p") && e.contains(field),
            "{field}: {e}"
        );
    }
    let e = error(
        "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {}\n",
    );
    assert!(e.contains("networking.k8s.io/v1"), "{e}");
}
