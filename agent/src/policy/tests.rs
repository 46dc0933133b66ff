//! The compiler against the API's semantics: the upstream e2e model (namespaces x, y, z with
//! pods a, b, c) with hand-written truth tables for the classic cases, and thousands of
//! generated policies whose every verdict must equal a direct evaluation of the API.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::*;
use crate::source::crd::{LabelSelector, SelectorOp};
use crate::source::manifest::{Object, decode};
use crate::source::netpol::{PolicyPort, PortRef};

const NS: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const TCP80: Option<(Protocol, u16)> = Some((Protocol::Tcp, 80));
const TCP81: Option<(Protocol, u16)> = Some((Protocol::Tcp, 81));
const UDP80: Option<(Protocol, u16)> = Some((Protocol::Udp, 80));
const SCTP81: Option<(Protocol, u16)> = Some((Protocol::Sctp, 81));
/// Addresses outside the model's pods: an external host and an unused pod-CIDR address.
const OUTSIDE: [Ipv4Addr; 2] = [
    Ipv4Addr::new(192, 168, 5, 5),
    Ipv4Addr::new(10, 244, 1, 200),
];

fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
    l.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The model: owned data the [`PolicyPod`] views borrow.
struct Model {
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pods: Vec<ModelPod>,
}

/// Namespace, name, labels, address and container ports of a model pod.
type ModelPod = (
    String,
    String,
    BTreeMap<String, String>,
    Ipv4Addr,
    Vec<ContainerPort>,
);

fn port(name: &str, port: u16, protocol: Protocol) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        port,
        protocol,
    }
}

impl Model {
    /// x, y, z (labelled `ns=<name>`, without the API server's name label) with a, b, c
    /// (labelled `pod=<name>`), each serving the e2e suite's named ports on 80 and 81 over TCP,
    /// UDP and SCTP; b also names 8080 `web`, c names 8081 `web`.
    fn new() -> Model {
        let namespaces = NS
            .iter()
            .map(|n| ((*n).to_owned(), labels(&[("ns", n)])))
            .collect();
        let mut pods = Vec::new();
        for (i, ns) in NS.iter().enumerate() {
            for (j, pod) in PODS.iter().enumerate() {
                let mut ports = Vec::new();
                for p in [80, 81] {
                    for (proto, tag) in [
                        (Protocol::Tcp, "tcp"),
                        (Protocol::Udp, "udp"),
                        (Protocol::Sctp, "sctp"),
                    ] {
                        ports.push(port(&format!("serve-{p}-{tag}"), p, proto));
                    }
                }
                match *pod {
                    "b" => ports.push(port("web", 8080, Protocol::Tcp)),
                    "c" => ports.push(port("web", 8081, Protocol::Tcp)),
                    _ => {}
                }
                pods.push((
                    (*ns).to_owned(),
                    (*pod).to_owned(),
                    labels(&[("pod", pod)]),
                    // Spread over three nodes' pod CIDRs.
                    Ipv4Addr::new(
                        10,
                        244,
                        u8::try_from(j).unwrap(),
                        10 + u8::try_from(i).unwrap(),
                    ),
                    ports,
                ));
            }
        }
        Model { namespaces, pods }
    }

    fn views(&self) -> Vec<PolicyPod<'_>> {
        self.pods
            .iter()
            .map(|(ns, name, labels, ip, ports)| PolicyPod {
                namespace: ns,
                name,
                labels,
                ip: *ip,
                ports,
            })
            .collect()
    }

    fn ip(&self, ns: &str, pod: &str) -> Ipv4Addr {
        self.pods
            .iter()
            .find(|p| p.0 == ns && p.1 == pod)
            .map(|p| p.3)
            .unwrap()
    }

    fn compile(&self, policies: &[NetworkPolicy]) -> Compiled {
        let views = self.views();
        compile(policies, &self.namespaces, &views, &views)
    }
}

/// What the API says of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// No policy selects the pod for this direction.
    Open,
    /// Allowed; the lowest rule (policy key, rule index) that allows it.
    Allowed(String, usize),
    Denied,
}

/// The API's semantics, evaluated directly from the policy objects (no tables).
fn reference(
    m: &Model,
    policies: &[NetworkPolicy],
    target: &PolicyPod<'_>,
    direction: Direction,
    peer: Ipv4Addr,
    l4: Option<(Protocol, u16)>,
) -> Verdict {
    let views = m.views();
    let mut sorted: Vec<&NetworkPolicy> = policies.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let ns_labels = |ns: &str| {
        let mut l = m.namespaces.get(ns).cloned().unwrap_or_default();
        l.entry(NAMESPACE_NAME_LABEL.to_owned())
            .or_insert_with(|| ns.to_owned());
        l
    };
    let peer_pod = views.iter().find(|p| p.ip == peer);
    let mut restricted = false;
    for p in sorted {
        if p.namespace != target.namespace || !p.pod_selector.matches(target.labels) {
            continue;
        }
        let rules = match direction {
            Direction::Ingress => &p.ingress,
            Direction::Egress => &p.egress,
        };
        let Some(rules) = rules else { continue };
        restricted = true;
        for (index, rule) in rules.iter().enumerate() {
            let peer_ok = match &rule.peers {
                Peers::All => true,
                Peers::Some(list) => list.iter().any(|x| {
                    x.contains_ip(peer)
                        || views.iter().any(|v| {
                            v.ip == peer
                                && x.selects_pod(
                                    &p.namespace,
                                    v.namespace,
                                    &ns_labels(v.namespace),
                                    v.labels,
                                )
                        })
                }),
            };
            // Named ports resolve at the destination: the target for ingress, the peer's pod
            // for egress.
            let named: &[ContainerPort] = match direction {
                Direction::Ingress => target.ports,
                Direction::Egress => peer_pod.map_or(&[], |v| v.ports),
            };
            let port_ok = rule.ports.is_empty()
                || l4.is_some_and(|(proto, port)| {
                    rule.ports.iter().any(|pp| pp.matches(proto, port, named))
                });
            if peer_ok && port_ok {
                return Verdict::Allowed(format!("{}/{}", p.namespace, p.name), index);
            }
        }
    }
    if restricted {
        Verdict::Denied
    } else {
        Verdict::Open
    }
}

fn compiled_verdict(
    c: &Compiled,
    target: Ipv4Addr,
    direction: Direction,
    peer: Ipv4Addr,
    l4: Option<(Protocol, u16)>,
) -> Verdict {
    let Some(table) = c.pods.get(&target).and_then(|p| p.table(direction)) else {
        return Verdict::Open;
    };
    match table.allows(peer, l4) {
        None => Verdict::Denied,
        Some(id) => {
            let r = &c.rules[id as usize];
            assert_eq!(r.direction, direction, "{r:?}");
            Verdict::Allowed(r.policy.clone(), r.index)
        }
    }
}

/// The probes: every pod and the outside addresses, over these protocols and ports.
fn probes() -> Vec<Option<(Protocol, u16)>> {
    let mut out = vec![
        None,
        Some((Protocol::Tcp, 8080)),
        Some((Protocol::Tcp, 8081)),
    ];
    for p in [80, 81, 82, 1000, 65535] {
        for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            out.push(Some((proto, p)));
        }
    }
    out
}

/// Every verdict of the compiled tables equals the reference's, for every target, direction,
/// peer and probe; returns how many probes were allowed (so a caller can tell a vacuous case).
fn check_all(m: &Model, policies: &[NetworkPolicy]) -> usize {
    let c = m.compile(policies);
    let views = m.views();
    let peers: Vec<Ipv4Addr> = views.iter().map(|v| v.ip).chain(OUTSIDE).collect();
    let mut allowed = 0;
    for t in &views {
        for d in [Direction::Ingress, Direction::Egress] {
            for &peer in &peers {
                for l4 in probes() {
                    let want = reference(m, policies, t, d, peer, l4);
                    let got = compiled_verdict(&c, t.ip, d, peer, l4);
                    assert_eq!(
                        got,
                        want,
                        "{}/{} {d:?} peer {peer} {l4:?}\npolicies: {policies:#?}\ntables: {:#?}",
                        t.namespace,
                        t.name,
                        c.pods.get(&t.ip)
                    );
                    allowed += usize::from(matches!(want, Verdict::Allowed(..)));
                }
            }
        }
    }
    allowed
}

fn policy(yaml: &str) -> NetworkPolicy {
    let (o, e) = decode(yaml).unwrap();
    assert!(e.is_empty(), "{e:?}");
    match o.into_iter().next() {
        Some(Object::NetworkPolicy(p)) => p,
        other => panic!("{other:?}"),
    }
}

fn np(ns: &str, name: &str, spec: &str) -> NetworkPolicy {
    policy(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    ))
}

/// The 9x9 ingress truth table for `l4`: row = source pod, column = destination, `.` open or
/// allowed, `X` denied, in x/a, x/b, ..., z/c order.
fn ingress_table(m: &Model, c: &Compiled, l4: Option<(Protocol, u16)>) -> Vec<String> {
    let views = m.views();
    views
        .iter()
        .map(|from| {
            views
                .iter()
                .map(|to| {
                    // Both ends: the source's egress and the destination's ingress.
                    let e = compiled_verdict(c, from.ip, Direction::Egress, to.ip, l4);
                    let i = compiled_verdict(c, to.ip, Direction::Ingress, from.ip, l4);
                    if e == Verdict::Denied || i == Verdict::Denied {
                        'X'
                    } else {
                        '.'
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn no_policy_leaves_every_pod_open() {
    let m = Model::new();
    let c = m.compile(&[]);
    assert!(c.pods.is_empty() && c.rules.is_empty());
    assert_eq!(check_all(&m, &[]), 0);
}

#[test]
fn default_deny_ingress_in_one_namespace() {
    let m = Model::new();
    let p = [np("x", "deny", "{podSelector: {}}")];
    let c = m.compile(&p);
    let t = ingress_table(&m, &c, TCP80);
    // Nobody reaches x's pods (not even each other); y and z stay open.
    for row in &t {
        assert_eq!(row, "XXX......", "{t:#?}");
    }
    let px = &c.pods[&m.ip("x", "a")];
    assert_eq!(px.policies, vec!["x/deny"]);
    assert!(px.egress.is_none(), "egress is not restricted");
    assert_eq!(
        px.ingress.as_ref().unwrap().ports,
        vec![],
        "nothing allowed"
    );
    check_all(&m, &p);
}

#[test]
fn default_deny_egress_blocks_even_outside_addresses() {
    let m = Model::new();
    let p = [np("y", "deny", "{podSelector: {}, policyTypes: [Egress]}")];
    let c = m.compile(&p);
    let t = ingress_table(&m, &c, UDP80);
    for (i, row) in t.iter().enumerate() {
        let want = if (3..6).contains(&i) {
            "XXXXXXXXX"
        } else {
            "........."
        };
        assert_eq!(row, want, "{t:#?}");
    }
    let yb = m.ip("y", "b");
    assert_eq!(
        compiled_verdict(&c, yb, Direction::Egress, OUTSIDE[0], None),
        Verdict::Denied
    );
    check_all(&m, &p);
}

#[test]
fn allow_from_a_namespace_by_its_name_label() {
    // The namespaces carry only `ns=`; the API server's name label is implied.
    let m = Model::new();
    let p = [np(
        "x",
        "from-y",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}",
    )];
    let c = m.compile(&p);
    let t = ingress_table(&m, &c, TCP81);
    // Column 0 (x/a) admits only rows 3..6 (y's pods).
    for (i, row) in t.iter().enumerate() {
        let want = if (3..6).contains(&i) {
            "........."
        } else {
            "X........"
        };
        assert_eq!(row, want, "row {i}: {t:#?}");
    }
    check_all(&m, &p);
}

#[test]
fn pod_and_namespace_selectors_together_are_an_and() {
    let m = Model::new();
    let both = [np(
        "x",
        "and",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]}",
    )];
    let c = m.compile(&both);
    let t = ingress_table(&m, &c, TCP80);
    for (i, row) in t.iter().enumerate() {
        let want = if i == 4 { "........." } else { "X........" };
        assert_eq!(row, want, "row {i}: {t:#?}");
    }
    check_all(&m, &both);
    // Two peers (an OR): y's pods, and b of x itself.
    let either = [np(
        "x",
        "or",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]}]}",
    )];
    let c = m.compile(&either);
    let t = ingress_table(&m, &c, TCP80);
    for (i, row) in t.iter().enumerate() {
        let want = if i == 1 || (3..6).contains(&i) {
            "........."
        } else {
            "X........"
        };
        assert_eq!(row, want, "row {i}: {t:#?}");
    }
    check_all(&m, &either);
}

#[test]
fn ip_block_with_except_and_egress_to_a_cidr() {
    let m = Model::new();
    // x/a's ingress: 10.244.0.0/16 except node 1's /24 (the b pods), on TCP only.
    let p = [
        np(
            "x",
            "cidr",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.1.0/24]}}], ports: [{protocol: TCP}]}]}",
        ),
        np(
            "z",
            "out",
            "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 192.168.0.0/16}}]}]}",
        ),
    ];
    let c = m.compile(&p);
    let t = ingress_table(&m, &c, TCP80);
    for (i, row) in t.iter().enumerate() {
        let want = match i {
            // The b pods (10.244.1.x) are the exception.
            1 | 4 => "X........",
            // z's pods may only send to 192.168/16.
            6..=8 => "XXXXXXXXX",
            _ => ".........",
        };
        assert_eq!(row, want, "row {i}: {t:#?}");
    }
    let za = m.ip("z", "a");
    assert!(matches!(
        compiled_verdict(&c, za, Direction::Egress, OUTSIDE[0], None),
        Verdict::Allowed(..)
    ));
    // UDP to x/a is not in the rule's ports.
    let xa = m.ip("x", "a");
    assert_eq!(
        compiled_verdict(&c, xa, Direction::Ingress, m.ip("y", "a"), UDP80),
        Verdict::Denied
    );
    check_all(&m, &p);
}

#[test]
fn named_ports_resolve_at_the_destination() {
    let m = Model::new();
    // Egress from x/a to the port named `web`: 8080 at b, 8081 at c, nothing at a.
    let p = [np(
        "x",
        "web",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{ports: [{port: web}]}]}",
    )];
    let c = m.compile(&p);
    let xa = m.ip("x", "a");
    let v = |pod: (&str, &str), port| {
        compiled_verdict(
            &c,
            xa,
            Direction::Egress,
            m.ip(pod.0, pod.1),
            Some((Protocol::Tcp, port)),
        )
    };
    assert!(matches!(v(("y", "b"), 8080), Verdict::Allowed(..)));
    assert_eq!(v(("y", "b"), 8081), Verdict::Denied);
    assert!(matches!(v(("z", "c"), 8081), Verdict::Allowed(..)));
    assert_eq!(v(("z", "c"), 8080), Verdict::Denied);
    assert_eq!(v(("y", "a"), 8080), Verdict::Denied);
    // An address that is no pod declares no port name.
    assert_eq!(
        compiled_verdict(
            &c,
            xa,
            Direction::Egress,
            OUTSIDE[0],
            Some((Protocol::Tcp, 8080))
        ),
        Verdict::Denied
    );
    check_all(&m, &p);

    // Ingress to every pod of y on `serve-81-udp`: UDP 81 only.
    let p = [np(
        "y",
        "udp81",
        "{podSelector: {}, ingress: [{ports: [{port: serve-81-udp, protocol: UDP}]}]}",
    )];
    let c = m.compile(&p);
    assert_eq!(
        ingress_table(&m, &c, Some((Protocol::Udp, 81)))[0],
        "........."
    );
    assert_eq!(ingress_table(&m, &c, UDP80)[0], "...XXX...");
    assert_eq!(ingress_table(&m, &c, TCP81)[0], "...XXX...");
    check_all(&m, &p);
}

#[test]
fn end_port_ranges_become_prefix_blocks() {
    let m = Model::new();
    let p = [np(
        "x",
        "range",
        "{podSelector: {}, ingress: [{ports: [{port: 81, endPort: 1000, protocol: TCP}, {port: 80, protocol: SCTP}]}]}",
    )];
    let c = m.compile(&p);
    assert_eq!(ingress_table(&m, &c, TCP80)[0], "XXX......");
    assert_eq!(ingress_table(&m, &c, TCP81)[0], ".........");
    assert_eq!(ingress_table(&m, &c, SCTP81)[0], "XXX......");
    // 81..=1000 in aligned blocks: 81/16, 82/15, 84/14, 88/13, 96/11, 128/9, 256/8, 512/8,
    // 768/9, 896/10, 960/11, 992/13, 1000/16.
    let t = c.pods[&m.ip("x", "b")].ingress.as_ref().unwrap();
    let tcp: Vec<(u16, u8)> = t
        .ports
        .iter()
        .filter_map(|e| match e.ports {
            PortBlock::Prefix {
                protocol: Protocol::Tcp,
                first,
                len,
            } => Some((first, len)),
            _ => None,
        })
        .collect();
    assert_eq!(
        tcp,
        vec![
            (81, 16),
            (82, 15),
            (84, 14),
            (88, 13),
            (96, 11),
            (128, 9),
            (256, 8),
            (512, 8),
            (768, 9),
            (896, 10),
            (960, 11),
            (992, 13),
            (1000, 16)
        ]
    );
    check_all(&m, &p);
}

#[test]
fn policies_combine_and_the_lowest_rule_is_named() {
    let m = Model::new();
    let p = [
        np(
            "x",
            "a-tcp80",
            "{podSelector: {}, ingress: [{ports: [{port: 80}]}]}",
        ),
        np(
            "x",
            "b-all-from-y",
            "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}, {}]}",
        ),
    ];
    let c = m.compile(&p);
    let xb = m.ip("x", "b");
    let v = |peer, l4| compiled_verdict(&c, xb, Direction::Ingress, peer, l4);
    assert_eq!(
        v(m.ip("z", "a"), TCP80),
        Verdict::Allowed("x/a-tcp80".into(), 0)
    );
    assert_eq!(
        v(m.ip("y", "a"), TCP81),
        Verdict::Allowed("x/b-all-from-y".into(), 0)
    );
    // The second rule of b-all-from-y ({}) admits everyone on everything.
    assert_eq!(
        v(m.ip("z", "a"), UDP80),
        Verdict::Allowed("x/b-all-from-y".into(), 1)
    );
    assert_eq!(
        v(OUTSIDE[0], None),
        Verdict::Allowed("x/b-all-from-y".into(), 1)
    );
    assert_eq!(c.pods[&xb].policies, vec!["x/a-tcp80", "x/b-all-from-y"]);
    check_all(&m, &p);
}

#[test]
fn prefix_blocks_cover_ranges_exactly() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut cases = vec![
        (0, 65535),
        (0, 0),
        (65535, 65535),
        (1, 65535),
        (80, 81),
        (0, 1023),
    ];
    for _ in 0..300 {
        let a = rng.below(65536);
        let b = rng.below(65536);
        cases.push((a.min(b), a.max(b)));
    }
    for (lo, hi) in cases {
        let blocks = prefix_blocks(lo, hi);
        let mut next = lo;
        for (first, len) in &blocks {
            assert_eq!(u32::from(*first), next, "{lo}..={hi}: {blocks:?}");
            let size = 1u32 << (16 - u32::from(*len));
            assert_eq!(u32::from(*first) % size, 0, "unaligned {first}/{len}");
            next += size;
        }
        assert_eq!(next, hi + 1, "{lo}..={hi}: {blocks:?}");
        assert!(blocks.len() <= 30, "{lo}..={hi}: {} blocks", blocks.len());
    }
}

/// xorshift64*: a fixed sequence, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u32) -> u32 {
        u32::try_from(self.next() % u64::from(n)).unwrap()
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(u32::try_from(xs.len()).unwrap()) as usize]
    }
    fn chance(&mut self, percent: u32) -> bool {
        self.below(100) < percent
    }
}

fn selector(rng: &mut Rng, key: &str, values: &[&str]) -> LabelSelector {
    let mut s = LabelSelector::default();
    match rng.below(5) {
        0 => {}
        1 => {
            s.match_labels
                .insert(key.to_owned(), (*rng.pick(values)).to_owned());
        }
        2 => s.match_expressions.push((
            key.to_owned(),
            SelectorOp::In,
            vec![
                (*rng.pick(values)).to_owned(),
                (*rng.pick(values)).to_owned(),
            ],
        )),
        3 => s.match_expressions.push((
            key.to_owned(),
            SelectorOp::NotIn,
            vec![(*rng.pick(values)).to_owned()],
        )),
        _ => s.match_expressions.push((
            if rng.chance(50) { key } else { "absent" }.to_owned(),
            if rng.chance(50) {
                SelectorOp::Exists
            } else {
                SelectorOp::DoesNotExist
            },
            vec![],
        )),
    }
    s
}

fn random_rule(rng: &mut Rng) -> Rule {
    let peers = if rng.chance(20) {
        Peers::All
    } else {
        let n = 1 + rng.below(3);
        Peers::Some(
            (0..n)
                .map(|_| {
                    if rng.chance(30) {
                        let cidr: Ipv4Network = rng
                            .pick(&[
                                "10.244.0.0/16",
                                "10.244.1.0/24",
                                "0.0.0.0/0",
                                "192.168.0.0/16",
                                "10.244.2.11/32",
                            ])
                            .parse()
                            .unwrap();
                        let except = if rng.chance(50) && cidr.prefix() < 24 {
                            vec![
                                rng.pick(&["10.244.1.0/24", "10.244.0.10/31", "10.244.2.0/25"])
                                    .parse::<Ipv4Network>()
                                    .unwrap(),
                            ]
                            .into_iter()
                            .filter(|e| cidr.contains(e.network()))
                            .collect()
                        } else {
                            vec![]
                        };
                        Peer::IpBlock { cidr, except }
                    } else {
                        let namespaces = rng.chance(50).then(|| selector(rng, "ns", &NS));
                        let pods = (namespaces.is_none() || rng.chance(50))
                            .then(|| selector(rng, "pod", &PODS));
                        Peer::Pods { namespaces, pods }
                    }
                })
                .collect(),
        )
    };
    let ports = if rng.chance(30) {
        vec![]
    } else {
        (0..1 + rng.below(2))
            .map(|_| {
                let protocol = *rng.pick(&[Protocol::Tcp, Protocol::Udp, Protocol::Sctp]);
                match rng.below(4) {
                    0 => PolicyPort {
                        protocol,
                        port: None,
                        end_port: None,
                    },
                    1 => PolicyPort {
                        protocol,
                        port: Some(PortRef::Number(*rng.pick(&[80, 81, 1000]))),
                        end_port: None,
                    },
                    2 => {
                        let first = *rng.pick(&[1, 80, 81, 82]);
                        PolicyPort {
                            protocol,
                            port: Some(PortRef::Number(first)),
                            end_port: Some(*rng.pick(&[81u16, 1000, 8080, 65535]).max(&first)),
                        }
                    }
                    _ => PolicyPort {
                        protocol,
                        port: Some(PortRef::Name(
                            (*rng.pick(&["serve-80-tcp", "serve-81-udp", "serve-80-sctp", "web"]))
                                .to_owned(),
                        )),
                        end_port: None,
                    },
                }
            })
            .collect()
    };
    Rule { peers, ports }
}

#[test]
fn generated_policies_match_the_api_semantics() {
    let m = Model::new();
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut allowed = 0;
    for case in 0..150 {
        let n = 1 + rng.below(4);
        let policies: Vec<NetworkPolicy> = (0..n)
            .map(|i| {
                let rules = |rng: &mut Rng| {
                    rng.chance(75).then(|| {
                        let k = rng.below(4);
                        (0..k).map(|_| random_rule(rng)).collect::<Vec<_>>()
                    })
                };
                let ingress = rules(&mut rng);
                let mut egress = rules(&mut rng);
                if ingress.is_none() && egress.is_none() {
                    egress = Some(vec![random_rule(&mut rng)]);
                }
                NetworkPolicy {
                    namespace: (*rng.pick(&NS)).to_owned(),
                    name: format!("p{case}-{i}"),
                    pod_selector: selector(&mut rng, "pod", &PODS),
                    ingress,
                    egress,
                }
            })
            .collect();
        allowed += check_all(&m, &policies);
    }
    // The generator reaches both verdicts in earnest.
    assert!(allowed > 10_000, "only {allowed} allowed probes");
}
