//! NodePortLocal end to end: Services annotated `nodeportlocal.antrea.io/enabled: "true"`
//! select pods (Pod manifests in the node's `files` source joined with attachments made
//! through the real CNI binary); the agent allocates node ports, installs DNAT in its nftables
//! table and writes Antrea's `nodeportlocal.antrea.io` annotation into the local status view.
//! From the external host `nodeIP:nodePort` reaches the pods' TCP and UDP servers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ferrea_tests::capture::{TcpPeers, tcp_seen_source};
use ferrea_tests::cni::{AddResult, Attachment};
use ferrea_tests::fabric::EXTERNAL_IP;
use ferrea_tests::manifests::{self as m, ContainerPort, NplEntry, ServicePort};
use ferrea_tests::netns::NetNs;
use ferrea_tests::udp::{UdpEcho, udp_ask, udp_ask_from};
use ferrea_tests::{Dataplane, NodeOptions, Pod, SimNode, dataplane_tests, lines_mentioning};

/// The issue's bound for following a change.
const WITHIN: Duration = Duration::from_secs(1);
/// Generous bound for first appearance after start-up.
const SETTLE: Duration = Duration::from_secs(10);

const WEB: &[(&str, &str)] = &[("app", "web")];

fn npl_node(dp: Dataplane, range: &str) -> SimNode {
    let mut o = NodeOptions::new(dp);
    o.extra_config = m::npl_config(range);
    SimNode::start(o).unwrap()
}

fn web_ports() -> Vec<ContainerPort<'static>> {
    vec![
        ContainerPort {
            name: "http",
            port: 8080,
            protocol: "TCP",
        },
        ContainerPort {
            name: "dns",
            port: 5353,
            protocol: "UDP",
        },
    ]
}

fn tcp(target: &str) -> ServicePort<'_> {
    ServicePort {
        port: 80,
        target_port: target,
        protocol: "TCP",
    }
}

fn key(pod_name: &str) -> String {
    format!("default/{pod_name}")
}

fn pod_key(p: &Pod) -> String {
    key(&p.attachment().pod_name)
}

type Parsed = BTreeMap<String, Vec<NplEntry>>;

fn parsed(a: &BTreeMap<String, String>) -> Parsed {
    a.iter()
        .map(|(k, v)| (k.clone(), m::parse_annotation(v).unwrap()))
        .collect()
}

/// Waits until `accept` holds for the parsed annotations; panics with `what` and the last
/// annotations after `timeout`. Returns them and the time it took.
fn wait(
    node: &SimNode,
    timeout: Duration,
    what: &str,
    accept: impl Fn(&Parsed) -> bool,
) -> (Parsed, Duration) {
    match m::wait_annotations(node, timeout, |a| {
        let p = parsed(a);
        accept(&p).then_some(p)
    }) {
        Ok(v) => v,
        Err(last) => panic!("{what}: not within {timeout:?}; annotations: {last:?}"),
    }
}

fn entry<'a>(e: &'a [NplEntry], pod_port: u16, proto: &str) -> &'a NplEntry {
    e.iter()
        .find(|x| x.pod_port == pod_port && x.protocol == proto)
        .unwrap_or_else(|| panic!("no {pod_port}/{proto} in {e:?}"))
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

dataplane_tests!(
    external_host_reaches_pods_tcp_and_udp_through_node_ports,
    lifecycle_changes_follow_within_a_second,
    restart_keeps_ports_and_removes_pods_that_died,
    port_bound_on_the_node_is_skipped,
    udp_flow_stops_when_its_mapping_goes,
);

fn external_host_reaches_pods_tcp_and_udp_through_node_ports(dp: Dataplane) {
    let node = npl_node(dp, "61000-62000");
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    for p in [&a, &b] {
        m::write_pod(&node, &p.attachment().pod_name, WEB, &web_ports()).unwrap();
    }
    m::write_service(
        &node,
        "web",
        true,
        WEB,
        &[
            tcp("http"),
            ServicePort {
                port: 53,
                target_port: "5353",
                protocol: "UDP",
            },
        ],
    )
    .unwrap();
    let (ann, took) = wait(&node, SETTLE, "both pods annotated", |p| {
        [&a, &b]
            .iter()
            .all(|x| p.get(&pod_key(x)).is_some_and(|e| e.len() == 2))
    });
    println!("annotations after {took:?}: {ann:?}");

    // The annotation is exactly Antrea's JSON: entries sorted by pod port, keys in order.
    let raw = m::npl_annotations(&node).unwrap();
    assert_eq!(
        raw.len(),
        2,
        "only the selected pods are annotated: {raw:?}"
    );
    let mut all = BTreeSet::new();
    for p in [&a, &b] {
        let e = &ann[&pod_key(p)];
        assert_eq!(raw[&pod_key(p)], m::antrea_annotation(e));
        assert_eq!(
            (e[0].pod_port, e[0].protocol.as_str()),
            (5353, "udp"),
            "{e:?}"
        );
        assert_eq!(
            (e[1].pod_port, e[1].protocol.as_str()),
            (8080, "tcp"),
            "{e:?}"
        );
        for x in e {
            assert_eq!(x.node_ip, node.ip().to_string());
            assert_eq!(x.ip_family, "IPv4");
            assert!((61000..=62000).contains(&x.node_port), "{x:?}");
            all.insert((x.node_port, x.protocol.clone()));
        }
        let json = format!(
            r#"[{{"podPort":5353,"nodeIP":"{ip}","nodePort":{u},"protocol":"udp","ipFamily":"IPv4"}},{{"podPort":8080,"nodeIP":"{ip}","nodePort":{t},"protocol":"tcp","ipFamily":"IPv4"}}]"#,
            ip = node.ip(),
            u = e[0].node_port,
            t = e[1].node_port
        );
        assert_eq!(raw[&pod_key(p)], json);
    }
    assert_eq!(all.len(), 4, "node ports are not distinct: {ann:?}");

    // The rules: one map element per mapping, to the pod's address and port.
    let elems = m::npl_map_elements(&node).unwrap();
    let mut want = Vec::new();
    for p in [&a, &b] {
        for x in &ann[&pod_key(p)] {
            want.push((
                x.protocol.clone(),
                x.node_port,
                p.ip().to_string(),
                x.pod_port,
            ));
        }
    }
    want.sort();
    assert_eq!(elems, want);

    // Servers in the pods; the external host reaches each through its own node ports.
    let servers: Vec<(TcpPeers, UdpEcho)> = [(&a, "pod-a"), (&b, "pod-b")]
        .iter()
        .map(|(p, tag)| {
            (
                TcpPeers::start(p.ns(), addr(Ipv4Addr::UNSPECIFIED, 8080)).unwrap(),
                UdpEcho::start(p.ns(), addr(Ipv4Addr::UNSPECIFIED, 5353), tag).unwrap(),
            )
        })
        .collect();
    for (i, (p, tag)) in [(&a, "pod-a"), (&b, "pod-b")].iter().enumerate() {
        let e = &ann[&pod_key(p)];
        let (t, u) = (
            entry(e, 8080, "tcp").node_port,
            entry(e, 5353, "udp").node_port,
        );
        let seen = tcp_seen_source(node.external(), addr(node.ip(), t))
            .unwrap_or_else(|e| panic!("external -> {}:{t} (tcp, {tag}): {e:#}", node.ip()));
        assert_eq!(seen.ip(), EXTERNAL_IP, "the pod sees the client's address");
        assert_eq!(
            servers[i].0.peers().len(),
            1,
            "{tag} did not get the connection"
        );
        let answer = udp_ask(node.external(), addr(node.ip(), u))
            .unwrap_or_else(|e| panic!("external -> {}:{u} (udp, {tag}): {e:#}", node.ip()));
        assert!(
            answer.starts_with(&format!("{tag} {EXTERNAL_IP}:")),
            "UDP answer {answer:?} is not from {tag}"
        );
    }

    // From the node itself (output chain) and from another pod (hairpin).
    let ea = &ann[&pod_key(&a)];
    let (ta, ua) = (
        entry(ea, 8080, "tcp").node_port,
        entry(ea, 5353, "udp").node_port,
    );
    tcp_seen_source(node.ns(), addr(node.ip(), ta))
        .unwrap_or_else(|e| panic!("node -> {}:{ta}: {e:#}", node.ip()));
    let answer = udp_ask(node.ns(), addr(node.ip(), ua)).expect("node -> nodeIP:udp port");
    assert!(answer.starts_with("pod-a "), "{answer}");
    tcp_seen_source(b.ns(), addr(node.ip(), ta))
        .unwrap_or_else(|e| panic!("pod b -> {}:{ta} (hairpin to pod a): {e:#}", node.ip()));
    assert_eq!(servers[0].0.peers().len(), 3);
}

fn lifecycle_changes_follow_within_a_second(dp: Dataplane) {
    let mut node = npl_node(dp, "61000-62000");
    let a = node.add_pod().unwrap();
    let a_name = a.attachment().pod_name.clone();
    let ka = key(&a_name);
    m::write_pod(&node, &a_name, WEB, &web_ports()).unwrap();
    m::write_service(&node, "web", true, WEB, &[tcp("8080")]).unwrap();
    wait(&node, SETTLE, "pod annotated", |p| {
        p.get(&ka).is_some_and(|e| e.len() == 1)
    });
    // An invalid Service is rejected with its name and field; the agent keeps serving.
    std::fs::write(
        node.manifests().join("svc-bad.yaml"),
        "kind: Service\nmetadata: {name: bad}\nspec: {selector: {app: web}, ports: [{port: 80, protocol: ICMP}]}\n",
    )
    .unwrap();
    let logged = ferrea_tests::wait_for(SETTLE, || {
        let log = node.agent().log();
        log.lines()
            .find(|l| l.contains("Service default/bad") && l.contains("spec.ports[0].protocol"))
            .map(str::to_owned)
    });
    assert!(logged.is_some(), "invalid Service not reported");
    assert!(
        node.agent().is_running(),
        "the agent stopped over a bad manifest"
    );
    m::remove(&node, "svc-bad.yaml").unwrap();
    assert_eq!(
        parsed(&m::npl_annotations(&node).unwrap())[&ka].len(),
        1,
        "the valid Service's mapping was lost"
    );
    let mut times = Vec::new();
    let mut step = |what: &str, accept: &dyn Fn(&Parsed) -> bool| {
        let (p, took) = wait(&node, WITHIN, what, accept);
        println!("{what}: {took:?}");
        times.push((what.to_owned(), took));
        p
    };
    let rules_for = |ip: Ipv4Addr| lines_mentioning(&m::nft_table(&node).unwrap(), ip);

    // Service ports changed: 8080 -> 9090.
    m::write_service(&node, "web", true, WEB, &[tcp("9090")]).unwrap();
    let p = step("targetPort changed", &|p| {
        p.get(&ka)
            .is_some_and(|e| e.len() == 1 && e[0].pod_port == 9090)
    });
    let elems = m::npl_map_elements(&node).unwrap();
    assert_eq!(
        elems,
        vec![("tcp".into(), p[&ka][0].node_port, a.ip().to_string(), 9090)],
        "stale rule after a port change"
    );

    // Selector no longer matches, then again.
    m::write_service(&node, "web", true, &[("app", "other")], &[tcp("9090")]).unwrap();
    step("selector changed away", &|p| p.is_empty());
    assert!(
        rules_for(a.ip()).is_empty(),
        "rules left: {:?}",
        rules_for(a.ip())
    );
    m::write_service(&node, "web", true, WEB, &[tcp("9090")]).unwrap();
    step("selector changed back", &|p| p.contains_key(&ka));

    // Pod deleted (CNI DEL, its manifest stays): the attachment is gone.
    let old_ip = a.ip();
    let mut a = a;
    a.del().unwrap().expect_ok("DEL").unwrap();
    step("pod deleted", &|p| p.is_empty());
    assert!(
        rules_for(old_ip).is_empty(),
        "rules left: {:?}",
        rules_for(old_ip)
    );

    // The pod comes back in a new sandbox with a new address (same namespace/name).
    let ns2 = NetNs::new("p").unwrap();
    let att = Attachment {
        container_id: format!("{}-again", ns2.name()),
        netns: ns2.path().display().to_string(),
        ifname: "eth0".into(),
        pod_name: a_name.clone(),
    };
    // Hold another address first so the new sandbox cannot get the old one back.
    let _blocker = node.add_pod().unwrap();
    let out = node
        .cni()
        .add(&att)
        .unwrap()
        .expect_ok("ADD of the new sandbox")
        .unwrap();
    let new_ip = AddResult::parse(out.json.as_ref().unwrap()).unwrap().ip;
    assert_ne!(new_ip, old_ip);
    step("pod added again", &|p| p.contains_key(&ka));
    let elems = m::npl_map_elements(&node).unwrap();
    assert!(
        elems.len() == 1 && elems[0].2 == new_ip.to_string(),
        "rules do not follow the new pod IP {new_ip}: {elems:?}"
    );
    assert!(rules_for(old_ip).is_empty());
    let _server = TcpPeers::start(&ns2, addr(Ipv4Addr::UNSPECIFIED, 9090)).unwrap();
    let np = m::npl_map_elements(&node).unwrap()[0].1;
    tcp_seen_source(node.external(), addr(node.ip(), np)).expect("new sandbox reachable");

    // Annotation removed from the Service; then the Service deleted.
    m::write_service(&node, "web", false, WEB, &[tcp("9090")]).unwrap();
    step("Service annotation removed", &|p| p.is_empty());
    assert!(rules_for(new_ip).is_empty());
    m::write_service(&node, "web", true, WEB, &[tcp("9090")]).unwrap();
    step("Service annotated again", &|p| p.contains_key(&ka));
    m::remove(&node, "svc-web.yaml").unwrap();
    step("Service deleted", &|p| p.is_empty());
    assert!(m::npl_map_elements(&node).unwrap().is_empty());

    node.cni()
        .del(&att, None)
        .unwrap()
        .expect_ok("DEL of the new sandbox")
        .unwrap();
    println!("times: {times:?}");
}

fn restart_keeps_ports_and_removes_pods_that_died(dp: Dataplane) {
    let mut node = npl_node(dp, "61000-61099");
    let a = node.add_pod().unwrap();
    let mut dead = node.add_pod().unwrap();
    let (ka, kd) = (pod_key(&a), pod_key(&dead));
    for p in [&a, &dead] {
        m::write_pod(&node, &p.attachment().pod_name, WEB, &web_ports()).unwrap();
    }
    // A first version of the Service moves the allocator past the start of the range, so
    // that a restart that allocated afresh would give other ports than the ones kept.
    m::write_service(&node, "web", true, WEB, &[tcp("9999")]).unwrap();
    wait(&node, SETTLE, "first version mapped", |p| {
        p.get(&ka).is_some_and(|e| e.len() == 1) && p.get(&kd).is_some_and(|e| e.len() == 1)
    });
    m::write_service(
        &node,
        "web",
        true,
        WEB,
        &[
            tcp("http"),
            ServicePort {
                port: 53,
                target_port: "dns",
                protocol: "UDP",
            },
        ],
    )
    .unwrap();
    let (before, _) = wait(&node, SETTLE, "both annotated", |p| {
        p.get(&ka).is_some_and(|e| e.len() == 2) && p.get(&kd).is_some_and(|e| e.len() == 2)
    });
    let raw_before = m::npl_annotations(&node).unwrap();
    assert!(
        before.values().flatten().all(|e| e.node_port >= 61002),
        "the first version's ports were reused: {before:?}"
    );

    // Crash; the dead pod goes away while the agent is down (no DEL).
    let (dead_ip, dead_veth) = (dead.ip(), dead.host_ifname().to_owned());
    node.agent().kill9().unwrap();
    dead.kill_netns();
    let _ = node.ns().ip(&["link", "del", &dead_veth]);
    dead.forget();
    drop(dead);
    node.agent().restart().unwrap();
    let (after, took) = wait(&node, SETTLE, "dead pod's mapping removed", |p| {
        !p.contains_key(&kd)
    });
    println!("reconciled {took:?} after ready");
    assert_eq!(
        after[&ka], before[&ka],
        "node ports changed across the restart"
    );
    assert_eq!(
        m::npl_annotations(&node).unwrap()[&ka],
        raw_before[&ka],
        "annotation changed across the restart"
    );
    let left = lines_mentioning(&node.nft_ruleset().unwrap(), dead_ip);
    assert!(left.is_empty(), "rules left for the dead pod: {left:?}");
    let _server = TcpPeers::start(a.ns(), addr(Ipv4Addr::UNSPECIFIED, 8080)).unwrap();
    let t = entry(&after[&ka], 8080, "tcp").node_port;
    tcp_seen_source(node.external(), addr(node.ip(), t)).expect("reachable after restart");
    assert_eq!(
        m::npl_map_elements(&node).unwrap().len(),
        2,
        "only pod a's two mappings remain"
    );

    // The state store lost while the agent is down (its file removed): the mappings come
    // back from the nftables table and the notes on the pods' veths, so pod a keeps its node
    // ports (allocating afresh would start at 61000, below them) and its annotation.
    let elems_before = m::npl_map_elements(&node).unwrap();
    node.agent().kill9().unwrap();
    std::fs::remove_file(node.dir().join("state").join("ferrea.redb")).unwrap();
    let since = node.agent_log_len();
    node.agent().restart().unwrap();
    let log = node.agent_log_since(since);
    assert!(
        log.lines()
            .any(|l| l.contains("NodePortLocal mappings rebuilt") && l.contains("rebuilt=2")),
        "no rebuild of the two mappings reported:\n{log}"
    );
    // Long enough for the controller's first pass (it follows changes within a second).
    std::thread::sleep(3 * WITHIN);
    assert_eq!(
        m::npl_map_elements(&node).unwrap(),
        elems_before,
        "node ports changed after the store was lost"
    );
    assert_eq!(
        m::npl_annotations(&node).unwrap()[&ka],
        raw_before[&ka],
        "annotation changed after the store was lost"
    );
    tcp_seen_source(node.external(), addr(node.ip(), t)).expect("reachable after the rebuild");

    // A new port range takes effect at restart: mappings outside it move into it.
    let cfg = node.dir().join("agent.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("61000-61099", "61500-61599")).unwrap();
    node.agent().restart().unwrap();
    let (moved, took) = wait(&node, SETTLE, "mappings moved into the new range", |p| {
        p.get(&ka).is_some_and(|e| {
            e.len() == 2 && e.iter().all(|x| (61500..=61599).contains(&x.node_port))
        })
    });
    println!("re-allocated {took:?} after ready: {moved:?}");
    let t = entry(&moved[&ka], 8080, "tcp").node_port;
    tcp_seen_source(node.external(), addr(node.ip(), t)).expect("reachable in the new range");
    let elems = m::npl_map_elements(&node).unwrap();
    assert!(
        elems.len() == 2 && elems.iter().all(|e| (61500..=61599).contains(&e.1)),
        "{elems:?}"
    );
}

fn port_bound_on_the_node_is_skipped(dp: Dataplane) {
    let node = npl_node(dp, "61000-61004");
    // Another program on the node holds the first port of the range.
    let holder = TcpPeers::start(node.ns(), addr(Ipv4Addr::UNSPECIFIED, 61000)).unwrap();
    let a = node.add_pod().unwrap();
    let ka = pod_key(&a);
    m::write_pod(&node, &a.attachment().pod_name, WEB, &web_ports()).unwrap();
    m::write_service(&node, "web", true, WEB, &[tcp("8080")]).unwrap();
    let (p, _) = wait(&node, SETTLE, "pod annotated", |p| p.contains_key(&ka));
    let np = p[&ka][0].node_port;
    assert_ne!(np, 61000, "a port in use on the node was allocated");
    assert!((61001..=61004).contains(&np));
    let _server = TcpPeers::start(a.ns(), addr(Ipv4Addr::UNSPECIFIED, 8080)).unwrap();
    tcp_seen_source(node.external(), addr(node.ip(), np)).expect("pod via its node port");
    // The holder's port still reaches the holder, not a pod.
    let t = Instant::now();
    tcp_seen_source(node.external(), addr(node.ip(), 61000)).expect("the holder's own port");
    assert_eq!(holder.peers().len(), 1, "after {:?}", t.elapsed());
}

fn udp_flow_stops_when_its_mapping_goes(dp: Dataplane) {
    let node = npl_node(dp, "61000-61009");
    let a = node.add_pod().unwrap();
    let ka = pod_key(&a);
    m::write_pod(&node, &a.attachment().pod_name, WEB, &web_ports()).unwrap();
    let dns = [ServicePort {
        port: 53,
        target_port: "dns",
        protocol: "UDP",
    }];
    m::write_service(&node, "web", true, WEB, &dns).unwrap();
    let (p, _) = wait(&node, SETTLE, "pod annotated", |p| p.contains_key(&ka));
    let np = entry(&p[&ka], 5353, "udp").node_port;
    let _echo = UdpEcho::start(a.ns(), addr(Ipv4Addr::UNSPECIFIED, 5353), "pod-a").unwrap();
    // One client flow (fixed source port), answered by the pod through the node port.
    let answer = udp_ask_from(node.external(), 40053, addr(node.ip(), np)).unwrap();
    assert!(answer.starts_with("pod-a "), "{answer}");
    // The mapping goes; the same flow must not keep reaching the pod through its conntrack
    // entry (every datagram would otherwise refresh it).
    m::write_service(&node, "web", false, WEB, &dns).unwrap();
    wait(&node, WITHIN, "annotation removed", |p| p.is_empty());
    let after = udp_ask_from(node.external(), 40053, addr(node.ip(), np));
    assert!(
        after.is_err(),
        "the UDP flow still reaches the pod after its mapping was removed: {after:?}"
    );
}
