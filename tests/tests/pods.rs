//! Pods on one node: 50 concurrent ADDs, unique addresses, pod-to-pod, pod-to-node and
//! pod-to-external connectivity, and masquerade (the external host sees the node's address).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};

use ferrea_tests::capture::{TcpPeers, tcp_seen_source};
use ferrea_tests::fabric::INTERNET_IP;
use ferrea_tests::pod::Pod;
use ferrea_tests::traffic::ping_all;
use ferrea_tests::{Dataplane, NodeOptions, SimNode, dataplane_tests};

const PODS: usize = 50;
const PEERS_PER_POD: usize = 5;

dataplane_tests!(fifty_pods_get_unique_ips_and_full_connectivity);

fn fifty_pods_get_unique_ips_and_full_connectivity(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).expect("starting the node");
    let pods = node
        .add_pods_concurrently(PODS)
        .expect("50 concurrent ADDs");
    assert_eq!(pods.len(), PODS);

    // Addresses: unique, inside the pod CIDR, never the network, gateway or broadcast address.
    let ips: HashSet<Ipv4Addr> = pods.iter().map(|p| p.ip()).collect();
    assert_eq!(
        ips.len(),
        PODS,
        "duplicate pod IPs: {:?}",
        pods.iter().map(|p| p.ip()).collect::<Vec<_>>()
    );
    for p in &pods {
        let o = p.ip().octets();
        assert_eq!(&o[..3], &[10, 244, 1], "{} outside 10.244.1.0/24", p.ip());
        assert!(o[3] > 1 && o[3] < 255, "{} is a reserved address", p.ip());
        assert_eq!(p.result().prefix, 24, "prefix of {}", p.ip());
        assert_eq!(
            p.gateway(),
            Some(node.gateway()),
            "gateway in the result of {}",
            p.ip()
        );
    }

    // Host veths: prefix `fe`, at most 15 characters, unique, present in the node namespace.
    let links: HashSet<String> = node.pod_veths().unwrap().into_iter().collect();
    let names: HashSet<&str> = pods.iter().map(|p| p.host_ifname()).collect();
    assert_eq!(names.len(), PODS, "host veth names are not unique");
    for n in &names {
        assert!(
            n.starts_with("fe") && n.len() <= 15,
            "bad host veth name {n:?}"
        );
        assert!(
            links.contains(*n),
            "host veth {n} missing in the node namespace"
        );
    }

    // Connectivity, checked in parallel; every failure is collected before asserting.
    let seed = fastrand::u64(..);
    println!("peer sample seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let plan: Vec<Vec<usize>> = (0..PODS)
        .map(|i| {
            let mut others: Vec<usize> = (0..PODS).filter(|&j| j != i).collect();
            rng.shuffle(&mut others);
            others.truncate(PEERS_PER_POD);
            others
        })
        .collect();
    let mut pairs: Vec<(&Pod, Ipv4Addr, String)> = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        for &j in &plan[i] {
            pairs.push((p, pods[j].ip(), format!("pod {}", pods[j].ip())));
        }
        pairs.push((p, node.ip(), "node".into()));
        pairs.push((p, node.gateway(), "gateway".into()));
        pairs.push((p, INTERNET_IP, "external".into()));
    }
    let failures = ping_all(&pairs);
    assert!(
        failures.is_empty(),
        "{} ping failures:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Masquerade: every pod's connection reaches the external host from the node's address.
    let rec = TcpPeers::start(node.external(), SocketAddr::from((INTERNET_IP, 8080))).unwrap();
    for p in &pods {
        let seen = tcp_seen_source(p.ns(), rec.addr())
            .unwrap_or_else(|e| panic!("pod {} -> external TCP: {e:#}", p.ip()));
        assert_eq!(
            seen.ip(),
            node.ip(),
            "external host saw pod {} as {seen}",
            p.ip()
        );
    }
    let peers = rec.peers();
    assert_eq!(peers.len(), PODS);
    assert!(
        peers.iter().all(|a| a.ip() == node.ip()),
        "sources seen: {peers:?}"
    );
}
