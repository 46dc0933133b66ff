//! Chaining: ferrea-cni first in a conflist, the reference `portmap` and `bandwidth` plugins
//! after it, each called as a runtime (libcni) calls a chain: ADD in order with the previous
//! plugin's result as `prevResult`, DEL in reverse order. A host port mapped by portmap reaches
//! the pod from the external host; bandwidth shapes the pod's host-side veth.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use ferrea_tests::capture::{TcpPeers, tcp_seen_source};
use ferrea_tests::{Dataplane, NodeOptions, SimNode, dataplane_tests};
use serde_json::{Value, json};

/// Where Debian's containernetworking-plugins installs the reference plugins.
const PLUGINS: &str = "/usr/lib/cni";
/// The newest version the Debian reference plugins speak.
const CHAIN_VERSION: &str = "1.0.0";

dataplane_tests!(portmap_and_bandwidth_chain_after_ferrea);

fn portmap_and_bandwidth_chain_after_ferrea(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let pod = node.add_pod().unwrap();
    let cni = node.cni();
    let att = pod.attachment().clone();
    // ferrea's result converted to the chain's version, as the runtime would pass it on.
    let mut conf = cni.config();
    conf["cniVersion"] = json!(CHAIN_VERSION);
    let first = cni
        .invoke("ADD", Some(&att), conf.to_string().as_bytes())
        .unwrap();
    let prev: Value = first
        .expect_ok("ferrea ADD at 1.0.0")
        .unwrap()
        .json
        .unwrap();

    let portmap = json!({
        "cniVersion": CHAIN_VERSION, "name": "ferrea", "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]},
    });
    let bandwidth = json!({
        "cniVersion": CHAIN_VERSION, "name": "ferrea", "type": "bandwidth",
        "capabilities": {"bandwidth": true},
        // Ingress shaping only: egress shaping needs the ifb module, which this kernel lacks.
        "runtimeConfig": {"bandwidth": {"ingressRate": 100_000_000, "ingressBurst": 1_000_000}},
    });
    let mut prev_result = prev.clone();
    for plugin in [&portmap, &bandwidth] {
        let mut c = plugin.clone();
        c["prevResult"] = prev_result.clone();
        let bin = Path::new(PLUGINS).join(c["type"].as_str().unwrap());
        let out = cni
            .invoke_plugin(&bin, "ADD", Some(&att), c.to_string().as_bytes())
            .unwrap();
        prev_result = out
            .expect_ok(&format!("{} ADD", c["type"]))
            .unwrap()
            .json
            .unwrap();
    }

    // portmap: node:8080 from the external host reaches the pod's port 80.
    let _server = TcpPeers::start(pod.ns(), SocketAddr::from((Ipv4Addr::UNSPECIFIED, 80))).unwrap();
    let seen = tcp_seen_source(node.external(), SocketAddr::from((node.ip(), 8080)))
        .expect("external host -> node:8080 mapped by portmap to the pod");
    println!("pod saw the external connection from {seen}");
    // bandwidth: a token bucket on the pod's host-side veth.
    let qdisc = node
        .ns()
        .sh(&["tc", "qdisc", "show", "dev", pod.host_ifname()])
        .unwrap();
    assert!(
        qdisc.contains("tbf"),
        "no tbf qdisc on {}: {qdisc}",
        pod.host_ifname()
    );

    // DEL in reverse order, each with the final result as prevResult.
    for plugin in [&bandwidth, &portmap] {
        let mut c = plugin.clone();
        c["prevResult"] = prev_result.clone();
        let bin = Path::new(PLUGINS).join(c["type"].as_str().unwrap());
        cni.invoke_plugin(&bin, "DEL", Some(&att), c.to_string().as_bytes())
            .unwrap()
            .expect_ok(&format!("{} DEL", c["type"]))
            .unwrap();
    }
    assert!(
        tcp_seen_source(node.external(), SocketAddr::from((node.ip(), 8080))).is_err(),
        "the host port still reaches the pod after portmap DEL"
    );
    assert!(
        pod.ping(node.gateway()),
        "pod lost its network through the chain"
    );
}
