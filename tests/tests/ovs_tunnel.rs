//! The real agent with the OVS backend on three simulated nodes in `encap` mode (VXLAN, the
//! default): the agents learn about each other from `Node` manifests (written here into each
//! node's manifests directory), pods made through the CNI binary reach each other across
//! nodes (all pairs), a node removed from a node's source loses exactly its route and flows there, a node
//! added back is reachable at once, pods reach the outside through masquerade, and an agent
//! restart adopts the physical bridge it made.
//!
//! Pods made by the CNI binary keep their TX checksum offload, which OVS 3.1's userspace
//! tunnels cannot complete: this test uses ICMP only.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferrea_tests::fabric::{self, INTERNET_IP};
use ferrea_tests::node::Cluster;
use ferrea_tests::traffic::{tcp_transfer, time_to_reach};
use ferrea_tests::{Dataplane, NodeOptions, skip_unless_root, wait_for};

/// Kind of the remote-node flows' cookies (agent `pipeline::cookie::KIND_REMOTE`).
const KIND_REMOTE: u16 = 3;

fn node_manifest(index: u8) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node{index}\nspec:\n  podCIDR: 10.244.{index}.0/24\n\
         status:\n  addresses:\n  - type: InternalIP\n    address: {}\n",
        fabric::node_ip(index)
    )
}

fn peer_file(dir: PathBuf, index: u8) -> PathBuf {
    dir.join(format!("peer-node{index}.yaml"))
}

/// The manifest files in `dir` that hold node `index`'s `Node` object, with their contents
/// (whoever wrote them: this test, or a harness that publishes every node to every node).
fn files_of_node(dir: PathBuf, index: u8) -> Vec<(PathBuf, String)> {
    let name = format!("name: node{index}\n");
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            let text = std::fs::read_to_string(&p).ok()?;
            text.contains(&name).then_some((p, text))
        })
        .collect()
}

#[test]
fn ovs_agents_tunnel_between_nodes() {
    if !skip_unless_root("ovs_agents_tunnel_between_nodes") {
        return;
    }
    let mut c = Cluster::new().unwrap();
    for _ in 0..3 {
        c.add_node(&NodeOptions::new(Dataplane::Ovs)).unwrap();
    }
    // Each node learns about the others (unless the harness published them already).
    for i in 1..=3u8 {
        let dir = c.nodes()[usize::from(i - 1)].manifests();
        for j in (1..=3u8).filter(|j| *j != i) {
            if files_of_node(dir.clone(), j).is_empty() {
                std::fs::write(peer_file(dir.clone(), j), node_manifest(j)).unwrap();
            }
        }
    }
    let mut pods = Vec::new();
    for n in c.nodes() {
        pods.push(n.add_pod().unwrap());
        pods.push(n.add_pod().unwrap());
    }
    let report = |c: &mut Cluster| {
        for n in c.nodes_mut() {
            let head = format!("--- {}: {}", n.name(), n.routes().unwrap_or_default());
            println!("{head}\n{}", n.agent().log_tail(30));
        }
    };
    let t = Instant::now();
    if time_to_reach(pods[0].name(), pods[2].ip(), t, Duration::from_secs(10)).is_none() {
        report(&mut c);
        panic!("a pod of node1 cannot reach a pod of node2");
    }
    println!("pods reachable across nodes after {:?}", t.elapsed());
    // All pairs, both directions.
    for a in &pods {
        for b in pods.iter().filter(|b| b.ip() != a.ip()) {
            if !a.ping(b.ip()) {
                report(&mut c);
                panic!("{} -> {} failed", a.ip(), b.ip());
            }
        }
    }
    // Every node reaches every remote pod.
    for (i, n) in c.nodes().iter().enumerate() {
        for p in pods.iter().skip(((i + 1) % 3) * 2).take(2) {
            assert!(
                fabric::ping(n.ns().name(), p.ip()),
                "{} -> {}",
                n.name(),
                p.ip()
            );
        }
    }
    let (p1, p2) = (&pods[0], &pods[2]);
    assert!(
        fabric::ping(c.nodes()[0].ns().name(), p2.ip()),
        "node1 -> pod2"
    );
    // TCP across nodes (the backend turned the pods' TX checksum offload off).
    let k = p1.ns().sh(&["ethtool", "-k", "eth0"]).unwrap();
    assert!(k.contains("tx-checksumming: off"), "{k}");
    let len = 8 << 20;
    assert_eq!(
        tcp_transfer(p1.ns(), p2.ns(), p2.ip(), len),
        len,
        "TCP pod1 -> pod2 incomplete"
    );
    // The pod MTU leaves room for the encapsulation.
    let mtu = p1.ns().ip(&["link", "show", "dev", "eth0"]).unwrap();
    assert!(mtu.contains("mtu 1450"), "{mtu}");
    // Pods reach the outside through their own node's masquerade (the external host has no
    // route to pod CIDRs).
    for p in &pods {
        assert!(p.ping(INTERNET_IP), "{} -> internet", p.ip());
    }

    // Node2 leaves node1's source: its route and flows go there, node2 keeps its own.
    let remote_flows = |c: &mut Cluster, i: usize| {
        let ovs = c.nodes_mut()[i].ovs().unwrap();
        ovs.flows("br-int")
            .unwrap()
            .into_iter()
            .filter(|f| (f.cookie >> 32) as u16 == KIND_REMOTE)
            .count()
    };
    let n2_flows = remote_flows(&mut c, 1);
    assert!(n2_flows > 0);
    let node2_files = files_of_node(c.nodes()[0].manifests(), 2);
    for (f, _) in &node2_files {
        std::fs::remove_file(f).unwrap();
    }
    let gone = wait_for(Duration::from_secs(5), || {
        let r = c.nodes()[0]
            .ns()
            .ip(&["route", "show", "proto", "70"])
            .unwrap();
        (!r.contains("10.244.2.0/24")).then_some(r)
    });
    let left = gone.expect("node2's route stayed on node1");
    assert!(left.contains("10.244.3.0/24 via 10.244.3.1"), "{left}");
    // node1 keeps node3's flows (and reaches node3's pods), loses node2's.
    assert_eq!(
        remote_flows(&mut c, 0),
        n2_flows / 2,
        "node1 should keep only node3's flows"
    );
    assert!(p1.ping(pods[4].ip()), "node3's pod lost from node1");
    assert_eq!(remote_flows(&mut c, 1), n2_flows, "node2's flows changed");
    assert!(!p1.ping(p2.ip()), "pod2 still reachable from node1's pod");

    // Node2 is back: reachable within a second of the manifest appearing.
    let t = Instant::now();
    for (f, text) in &node2_files {
        std::fs::write(f, text).unwrap();
    }
    let took = time_to_reach(p1.name(), p2.ip(), t, Duration::from_secs(5));
    println!("node added: reachable after {took:?}");
    assert!(
        took.is_some_and(|d| d < Duration::from_secs(1)),
        "took {took:?}"
    );

    // Agent restart on node1: it finds the node's address on the physical bridge's port and
    // adopts the bridge.
    c.nodes_mut()[0].agent().restart().unwrap();
    let log = c.nodes_mut()[0].agent().log();
    assert!(log.contains("adopting the physical bridge"), "{log}");
    assert!(
        time_to_reach(p1.name(), p2.ip(), Instant::now(), Duration::from_secs(5)).is_some(),
        "pod1 -> pod2 after node1's agent restarted"
    );
    assert!(p1.ping(INTERNET_IP), "pod1 -> internet after restart");
    drop(pods);
    drop(c);
}

/// A node reboot under the userspace datapath, as far as OVS is concerned: OVSDB keeps the
/// physical bridge, but its internal port comes back bare, so the node's InternalIP is on no
/// interface. The starting agent restores the address from OVSDB before discovering the
/// transport, and the pods of both nodes reach each other again.
#[test]
fn ovs_agent_restores_the_transport_after_a_reboot() {
    if !skip_unless_root("ovs_agent_restores_the_transport_after_a_reboot") {
        return;
    }
    let mut c = Cluster::new().unwrap();
    for _ in 0..2 {
        c.add_node(&NodeOptions::new(Dataplane::Ovs)).unwrap();
    }
    std::fs::write(peer_file(c.nodes()[0].manifests(), 2), node_manifest(2)).unwrap();
    std::fs::write(peer_file(c.nodes()[1].manifests(), 1), node_manifest(1)).unwrap();
    let p1 = c.nodes()[0].add_pod().unwrap();
    let p2 = c.nodes()[1].add_pod().unwrap();
    assert!(time_to_reach(p1.name(), p2.ip(), Instant::now(), Duration::from_secs(10)).is_some());
    let n1 = &mut c.nodes_mut()[0];
    n1.agent().stop().unwrap();
    n1.ovs().unwrap().stop_vswitchd();
    n1.ns().ip(&["link", "del", "ferrea-phy"]).unwrap();
    n1.ns().ip(&["link", "del", "ferrea-gw0"]).unwrap();
    n1.ovs().unwrap().start_vswitchd().unwrap();
    n1.agent().spawn().unwrap();
    n1.agent()
        .wait_ready(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", n1.agent().log_tail(40)));
    let addr = n1
        .ns()
        .ip(&["-4", "addr", "show", "dev", "ferrea-phy"])
        .unwrap();
    assert!(addr.contains("172.18.0.11/24"), "{addr}");
    assert!(
        time_to_reach(p1.name(), p2.ip(), Instant::now(), Duration::from_secs(5)).is_some(),
        "pod1 -> pod2 after the reboot"
    );
    assert!(p2.ping(p1.ip()), "pod2 -> pod1 after the reboot");
    drop(p1);
    drop(p2);
    drop(c);
}
