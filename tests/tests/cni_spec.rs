//! The CNI contract as a runtime sees it, through the real `ferrea-cni` binary: idempotent ADD,
//! DEL without the pod or its netns, CHECK, error codes, STATUS and GC.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ferrea_tests::cni::{AddResult, Attachment, CniOutput};
use ferrea_tests::netns::NetNs;
use ferrea_tests::{Dataplane, NodeOptions, Pod, SimNode, dataplane_tests};
use serde_json::json;

/// A pod CIDR small enough to fill: 16 addresses, of which network, gateway and broadcast are
/// never handed out.
const SMALL_CIDR: &str = "10.244.1.0/28";

/// Adds pods until ADD fails (the pool is exhausted), at most 64; returns the pods and the
/// failing output. Proves which addresses are free, whatever order the IPAM hands them out in.
fn fill_pool(node: &SimNode) -> (Vec<Pod>, CniOutput) {
    let mut pods = Vec::new();
    for _ in 0..64 {
        match Pod::try_add(node.cni(), "f").unwrap() {
            Ok(p) => pods.push(p),
            Err(out) => return (pods, out),
        }
    }
    panic!("pool of {SMALL_CIDR} never ran out after 64 ADDs");
}

dataplane_tests!(
    add_twice_returns_the_same_ip,
    del_of_unknown_container_succeeds,
    del_after_netns_is_gone_frees_the_ip,
    check_detects_a_broken_pod,
    config_and_version_errors_use_spec_codes,
    agent_down_is_try_again_later,
    gc_releases_attachments_not_listed,
);

fn add_twice_returns_the_same_ip(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let pod = node.add_pod().unwrap();
    let again = pod.add_again().unwrap();
    assert_eq!(again.ip, pod.ip());
    assert_eq!(again.host_ifname, pod.host_ifname());
    assert_eq!(
        node.pod_veths().unwrap().len(),
        1,
        "second ADD made another veth"
    );
    let other = node.add_pod().unwrap();
    assert_ne!(other.ip(), pod.ip());
    assert!(
        pod.ping(other.ip()),
        "pod still works after the repeated ADD"
    );
}

fn del_of_unknown_container_succeeds(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    // Neither the container nor its netns ever existed.
    let ghost = Attachment::for_netns("fe-never-existed");
    node.cni()
        .del(&ghost, None)
        .unwrap()
        .expect_ok("DEL of unknown container")
        .unwrap();
    // The netns exists, but nothing was ever attached.
    let ns = NetNs::new("u").unwrap();
    let att = Attachment::for_netns(ns.name());
    node.cni()
        .del(&att, None)
        .unwrap()
        .expect_ok("DEL without ADD")
        .unwrap();
    // And twice in a row for a real pod.
    let mut pod = node.add_pod().unwrap();
    pod.del().unwrap().expect_ok("first DEL").unwrap();
    node.cni()
        .del(pod.attachment(), None)
        .unwrap()
        .expect_ok("second DEL")
        .unwrap();
    assert!(node.pod_veths().unwrap().is_empty());
}

fn del_after_netns_is_gone_frees_the_ip(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp).pod_cidr(SMALL_CIDR)).unwrap();
    let (mut pods, exhausted) = fill_pool(&node);
    assert!(
        !exhausted.ok() && exhausted.code().is_some(),
        "exhausted pool: {exhausted}"
    );
    assert!(
        pods.len() >= 3,
        "only {} pods fit in {SMALL_CIDR}",
        pods.len()
    );
    // The pod dies: its netns (and with it the veth) goes before the runtime's DEL.
    let victim = pods.remove(1);
    let (ip, veth) = (victim.ip(), victim.host_ifname().to_owned());
    let mut victim = victim;
    victim.kill_netns();
    victim
        .del()
        .unwrap()
        .expect_ok("DEL after the netns was deleted")
        .unwrap();
    drop(victim);
    assert!(!node.pod_veths().unwrap().contains(&veth));
    // The pool was full, so the next ADD can only succeed with the freed address.
    let next = node.add_pod().expect("ADD after DEL freed an address");
    assert_eq!(next.ip(), ip);
    assert!(next.ping(pods[0].ip()));
}

fn check_detects_a_broken_pod(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let pod = node.add_pod().unwrap();
    pod.check()
        .unwrap()
        .expect_ok("CHECK of a healthy pod")
        .unwrap();
    let cidr = format!("{}/{}", pod.ip(), pod.result().prefix);
    pod.ns().ip(&["addr", "del", &cidr, "dev", "eth0"]).unwrap();
    let out = pod.check().unwrap();
    assert!(!out.ok(), "CHECK passed without the pod's address: {out}");
    let code = out
        .code()
        .unwrap_or_else(|| panic!("CHECK failure without error JSON: {out}"));
    assert!(code > 0, "{out}");
}

fn config_and_version_errors_use_spec_codes(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let ns = NetNs::new("e").unwrap();
    let att = Attachment::for_netns(ns.name());
    let cni = node.cni();
    cni.invoke("ADD", Some(&att), b"{ this is not json")
        .unwrap()
        .assert_error(6, "malformed JSON");
    // Valid JSON without `name`: invalid network configuration (7), or decoding (6).
    let out = cni
        .invoke(
            "ADD",
            Some(&att),
            json!({"cniVersion": "1.1.0", "type": "ferrea-cni"})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    assert!(!out.ok());
    assert!(
        matches!(out.code(), Some(6 | 7)),
        "config without name: {out}"
    );
    for v in ["0.1.0", "9.9.9"] {
        cni.call("ADD", Some(&att), json!({"cniVersion": v}))
            .unwrap()
            .assert_error(1, &format!("cniVersion {v}"));
    }
    // VERSION is answered locally and lists the versions the plugin speaks.
    let out = cni.version().unwrap().expect_ok("VERSION").unwrap();
    let versions = out
        .json
        .as_ref()
        .and_then(|j| j.get("supportedVersions"))
        .unwrap();
    assert!(
        versions.as_array().unwrap().contains(&json!("1.1.0")),
        "{out}"
    );
    // No pod was attached by any of the failed ADDs.
    assert!(node.pod_veths().unwrap().is_empty());
    assert_eq!(ns.links().unwrap(), vec!["lo".to_string()]);
}

fn agent_down_is_try_again_later(dp: Dataplane) {
    let mut node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let ns = NetNs::new("d").unwrap();
    let att = Attachment::for_netns(ns.name());
    node.cni()
        .status()
        .unwrap()
        .expect_ok("STATUS with the agent up")
        .unwrap();

    // Stopped cleanly: the socket is gone.
    node.agent().stop().unwrap();
    node.cni()
        .add(&att)
        .unwrap()
        .assert_error(11, "ADD with the agent stopped");
    // STATUS reports 50 (plugin not available) per CNI 1.1, not 11.
    node.cni()
        .status()
        .unwrap()
        .assert_error(50, "STATUS with the agent stopped");

    // Crashed: a stale socket file is left; connecting is refused.
    node.agent().restart().unwrap();
    node.agent().kill9().unwrap();
    node.cni()
        .add(&att)
        .unwrap()
        .assert_error(11, "ADD with the agent crashed");

    // Back up: the same ADD now works.
    node.agent().restart().unwrap();
    let out = node
        .cni()
        .add(&att)
        .unwrap()
        .expect_ok("ADD after restart")
        .unwrap();
    let r = AddResult::parse(out.json.as_ref().unwrap()).unwrap();
    assert_eq!(r.gateway, Some(node.gateway()));
    node.cni()
        .del(&att, Some(&r.raw))
        .unwrap()
        .expect_ok("DEL")
        .unwrap();
}

fn gc_releases_attachments_not_listed(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp).pod_cidr(SMALL_CIDR)).unwrap();
    let mut pods: Vec<Pod> = (0..4).map(|_| node.add_pod().unwrap()).collect();
    let keep: Vec<(&str, &str)> = pods[..2]
        .iter()
        .map(|p| (p.container_id(), "eth0"))
        .collect();
    node.cni().gc(&keep).unwrap().expect_ok("GC").unwrap();

    let links: HashSet<String> = node.pod_veths().unwrap().into_iter().collect();
    for p in &pods[..2] {
        assert!(
            links.contains(p.host_ifname()),
            "GC removed the valid attachment {}",
            p.ip()
        );
    }
    for p in &pods[2..] {
        assert!(
            !links.contains(p.host_ifname()),
            "GC left the veth of {}",
            p.ip()
        );
    }
    assert!(
        pods[0].ping(pods[1].ip()),
        "valid attachments still work after GC"
    );
    let released: Vec<Ipv4Addr> = pods[2..].iter().map(|p| p.ip()).collect();
    // The runtime never DELs what GC removed.
    for p in &mut pods[2..] {
        p.forget();
    }
    // Fill the pool: the released addresses must be handed out again.
    let (more, _) = fill_pool(&node);
    let reused: HashSet<Ipv4Addr> = more.iter().map(|p| p.ip()).collect();
    for ip in released {
        assert!(
            reused.contains(&ip),
            "GC did not release {ip}; reallocated: {reused:?}"
        );
    }
}
