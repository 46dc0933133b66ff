//! A cluster of three simulated nodes on one fabric: pods on different nodes reach each other
//! through the overlay (VXLAN by default), keep their own addresses across nodes (with no
//! `clusterCIDRs` configured too: the nodes' pod CIDRs are never masqueraded), and reach the
//! outside through their own node's masquerade. Nodes leaving and joining the source are
//! followed within a second, without disturbing the others.

use std::net::{Ipv4Addr, SocketAddr};

use std::time::{Duration, Instant};

use ferrea_tests::capture::{TcpPeers, tcp_seen_source};
use ferrea_tests::fabric::INTERNET_IP;
use ferrea_tests::netns::NetNs;
use ferrea_tests::pod::Pod;
use ferrea_tests::traffic::{BackgroundPing, assert_all_reach};
use ferrea_tests::{Cluster, Dataplane, NodeOptions, dataplane_tests, wait_for};

const NODES: usize = 3;
const PODS_PER_NODE: usize = 3;

dataplane_tests!(
    pods_on_three_nodes_reach_each_other,
    nodes_leaving_and_joining_are_followed,
    crash_restart_reconciles_remote_nodes,
    routed_mode_without_encapsulation
);

/// A cluster of `n` nodes with `pods` pods each; returns the pods per node.
fn cluster(dp: Dataplane, n: usize, pods: usize) -> (Cluster, Vec<Vec<Pod>>) {
    cluster_with(NodeOptions::new(dp), n, pods)
}

fn cluster_with(opts: NodeOptions, n: usize, pods: usize) -> (Cluster, Vec<Vec<Pod>>) {
    let mut c = Cluster::new().expect("fabric");
    for _ in 0..n {
        c.add_node(&opts).expect("adding a node");
    }
    // Nothing is done to the pods beyond CNI ADD: whatever the packet path needs inside
    // them (OVS userspace tunnels: TX checksum offload off) is the agent's job.
    let pods = c
        .nodes()
        .iter()
        .map(|node| {
            node.add_pods_concurrently(pods)
                .expect("creating pods through the CNI")
        })
        .collect();
    (c, pods)
}

/// Waits until `p` can ping `dst` (the other nodes learn a new node through their source).
fn wait_reachable(p: &Pod, dst: Ipv4Addr, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    wait_for(within, || p.ping(dst).then_some(())).map(|()| t.elapsed())
}

/// Node options with the default `clusterCIDRs` (none): the agents derive the cluster's pod
/// CIDRs from the nodes' `spec.podCIDR`, so pods keep their addresses across nodes.
fn default_cluster_cidrs(dp: Dataplane) -> NodeOptions {
    let mut o = NodeOptions::new(dp);
    o.cluster_cidrs = Vec::new();
    o
}

fn pods_on_three_nodes_reach_each_other(dp: Dataplane) {
    let (c, pods) = cluster_with(default_cluster_cidrs(dp), NODES, PODS_PER_NODE);
    let nodes = c.nodes();
    // The first node learnt the last one through its manifests directory.
    assert!(
        wait_reachable(&pods[0][0], pods[NODES - 1][0].ip(), Duration::from_secs(5)).is_some(),
        "node1's pod never reached node3's pod"
    );

    // Pods get the transport MTU (1500 on the fabric) minus VXLAN's 50 bytes.
    let mtu = pods[0][0].exec(&["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(String::from_utf8_lossy(&mtu.stdout).trim(), "1450");

    // Every pod reaches every other pod, every node's gateway, and the outside.
    let all: Vec<&Pod> = pods.iter().flatten().collect();
    assert_all_reach(&all, nodes);

    // Nodes reach other nodes' pods (node-originated traffic takes the overlay too).
    for n in nodes {
        for ps in &pods {
            assert!(
                ferrea_tests::fabric::ping(n.ns().name(), ps[0].ip()),
                "{} cannot reach pod {}",
                n.name(),
                ps[0].ip()
            );
        }
    }

    // TCP across nodes keeps the pod's own address (no masquerade inside the cluster).
    let (a, b) = (&pods[0][0], &pods[1][0]);
    let rec = TcpPeers::start(b.ns(), SocketAddr::from((b.ip(), 8080))).unwrap();
    let seen = tcp_seen_source(a.ns(), rec.addr()).expect("TCP pod to pod across nodes");
    assert_eq!(seen.ip(), a.ip(), "pod {} seen as {seen} on node2", a.ip());

    // A bulk transfer across nodes: 50 MB from a pod on node1 to a pod on node3.
    let v = ferrea_tests::traffic::iperf3(
        pods[2][1].ns(),
        pods[2][1].ip(),
        pods[0][1].ns(),
        &["-n", "50M"],
    )
    .expect("iperf3 across nodes");
    // iperf3 reports what the server counted until the client's last write, so a tail may
    // still be in flight: the sender's count is exact, the receiver's a lower bound.
    let sent = v["end"]["sum_sent"]["bytes"].as_f64().unwrap_or(0.0);
    let received = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    assert!(sent >= 50.0 * 1024.0 * 1024.0, "sent only {sent} bytes");
    assert!(
        received >= sent / 2.0,
        "only {received} of {sent} bytes arrived across nodes"
    );

    // Traffic to the outside is masqueraded to each pod's own node.
    let rec = TcpPeers::start(c.external(), SocketAddr::from((INTERNET_IP, 8080))).unwrap();
    for (n, ps) in nodes.iter().zip(&pods) {
        let seen = tcp_seen_source(ps[0].ns(), rec.addr()).expect("pod to external TCP");
        assert_eq!(
            seen.ip(),
            n.ip(),
            "pod {} on {} seen outside as {seen}",
            ps[0].ip(),
            n.name()
        );
    }
}

/// Routes of ferrea's protocol in a node's main table (the remote pod CIDRs it reaches).
fn ferrea_routes(ns: &NetNs) -> String {
    ns.ip(&["route", "show", "proto", "70"]).unwrap_or_default()
}

fn nodes_leaving_and_joining_are_followed(dp: Dataplane) {
    let (mut c, pods) = cluster(dp, 2, 2);
    let (a, b) = (&pods[0][0], &pods[1][0]);
    assert!(
        wait_reachable(a, b.ip(), Duration::from_secs(5)).is_some(),
        "node1 -> node2 pods never connected"
    );

    // A third node joins: the others route to its pod CIDR within a second of its Node
    // object appearing (add_node publishes it as soon as its agent is ready), and its pods
    // are reachable.
    let i = c.add_node(&NodeOptions::new(dp)).expect("third node");
    let joined = Instant::now();
    let third = &c.nodes()[i];
    let routed = wait_for(Duration::from_secs(5), || {
        c.nodes()[..i]
            .iter()
            .all(|n| ferrea_routes(n.ns()).contains(third.pod_cidr()))
            .then(|| joined.elapsed())
    })
    .expect("the other nodes never routed to the joined node");
    println!("joined node routed by the others after {routed:?}");
    assert!(
        routed < Duration::from_secs(1),
        "the others took {routed:?} to follow the joined node"
    );
    let p3 = third.add_pod().expect("pod on node3");
    assert!(p3.ping(a.ip()), "node3 pod cannot reach node1 pod");
    assert!(p3.ping(b.ip()), "node3 pod cannot reach node2 pod");

    // Traffic between node1 and node2 runs while node3 leaves.
    let bg = BackgroundPing::start(
        a.ns().name(),
        b.ip(),
        Duration::from_millis(20),
        Duration::from_secs(2),
    )
    .unwrap();
    let before = ferrea_routes(c.nodes()[0].ns());
    assert!(before.contains(third.pod_cidr()), "node1 routes: {before}");
    c.unpublish(i).unwrap();
    let gone = wait_for(Duration::from_secs(2), || {
        (!ferrea_routes(c.nodes()[0].ns()).contains(third.pod_cidr())
            && !ferrea_routes(c.nodes()[1].ns()).contains(third.pod_cidr()))
        .then_some(())
    });
    assert!(
        gone.is_some(),
        "routes to the departed node remain:\n{}\n{}",
        ferrea_routes(c.nodes()[0].ns()),
        ferrea_routes(c.nodes()[1].ns())
    );
    assert!(
        !a.ping(p3.ip()),
        "node1's pod still reaches the departed node's pod"
    );
    // The other node's route is untouched.
    assert!(
        ferrea_routes(c.nodes()[0].ns()).contains(c.nodes()[1].pod_cidr()),
        "node1 lost its route to node2"
    );
    let counts = bg.finish().unwrap();
    assert!(
        counts.lost() == 0,
        "node1 -> node2 traffic disturbed while node3 left: {counts:?}"
    );
}

/// An agent killed with SIGKILL keeps its node's cross-node traffic flowing while it is down,
/// and the restarted agent removes what belonged to a node that left meanwhile.
fn crash_restart_reconciles_remote_nodes(dp: Dataplane) {
    let (mut c, pods) = cluster(dp, 3, 1);
    let (a, b, gone) = (&pods[0][0], &pods[1][0], &pods[2][0]);
    for dst in [b.ip(), gone.ip()] {
        assert!(
            wait_reachable(a, dst, Duration::from_secs(5)).is_some(),
            "node1 pod cannot reach {dst}"
        );
    }
    let gone_cidr = c.nodes()[2].pod_cidr().to_owned();
    let bg = BackgroundPing::start(
        a.ns().name(),
        b.ip(),
        Duration::from_millis(50),
        Duration::from_secs(6),
    )
    .unwrap();
    c.nodes_mut()[0].agent().kill9().unwrap();
    // node3 leaves the cluster while node1's agent is down.
    c.unpublish(2).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    c.nodes_mut()[0].agent().restart().unwrap();
    let counts = bg.finish().unwrap();
    assert!(
        counts.lost() * 20 <= counts.sent,
        "more than 5% of node1 -> node2 pings lost across the restart: {counts:?}"
    );
    let routes = ferrea_routes(c.nodes()[0].ns());
    assert!(
        !routes.contains(&gone_cidr),
        "the restarted agent kept the departed node's route: {routes}"
    );
    assert!(
        routes.contains(c.nodes()[1].pod_cidr()),
        "the restarted agent lost node2's route: {routes}"
    );
    assert!(
        !a.ping(gone.ip()),
        "node1 still reaches the departed node's pod"
    );
    assert!(a.ping(b.ip()), "node1 -> node2 broken after the restart");
}

/// `trafficEncapMode: noEncap`: the nodes share the fabric's L2 segment, so each routes the
/// others' pod CIDRs via their addresses; pods keep their addresses and the full MTU. The
/// transport interface is chosen by CIDR here.
fn routed_mode_without_encapsulation(dp: Dataplane) {
    let mut opts = default_cluster_cidrs(dp);
    opts.extra_config =
        "trafficEncapMode: noEncap\ntransportInterfaceCIDRs: [172.18.0.0/24]\n".into();
    let (c, pods) = cluster_with(opts, 2, 2);
    let (a, b) = (&pods[0][0], &pods[1][0]);
    assert!(
        wait_reachable(a, b.ip(), Duration::from_secs(5)).is_some(),
        "routed pods never connected"
    );
    let route = ferrea_routes(c.nodes()[0].ns());
    assert!(
        route.contains(&format!("via {}", c.nodes()[1].ip())),
        "node1 does not route node2's pods via node2: {route}"
    );
    let tunnels = c.nodes()[0].links_with_prefix("ferrea-tun").unwrap();
    assert!(
        tunnels.is_empty(),
        "tunnel devices in noEncap mode: {tunnels:?}"
    );
    let mtu = a.exec(&["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(String::from_utf8_lossy(&mtu.stdout).trim(), "1500");
    let rec = TcpPeers::start(b.ns(), SocketAddr::from((b.ip(), 8080))).unwrap();
    let seen = tcp_seen_source(a.ns(), rec.addr()).expect("routed TCP pod to pod");
    assert_eq!(seen.ip(), a.ip(), "routed pod {} seen as {seen}", a.ip());
}
