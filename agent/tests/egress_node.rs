//! Privileged integration test of the node side of Egress ([`EgressNode`]) in a namespace of
//! its own: sub-interface, addresses, route table, fwmark rule, gratuitous ARP on the wire
//! tagged with the pool's VLAN, `rp_filter` set and restored, idempotence across a restart,
//! and removal of everything it made (and nothing else) when no IP is held any more.
//!
//! Topology: namespace NODE (`eth0` 10.0.0.2/24, the pods' gateway stand-in `ferrea-gw0`, a
//! foreign `ferrea-ext.200` without ferrea's alias) — veth — namespace PEER (`eth0` 10.0.0.1/24,
//! where tcpdump listens). Needs root; without it the test prints `SKIP: <reason>` and passes.

use std::net::Ipv4Addr;
use std::time::Duration;

use ferrea_agent::controllers::egress::node::{EgressNode, load_vlan_tagger};
use ferrea_agent::controllers::egress::plan::HeldIp;
use ferrea_agent::source::crd::SubnetInfo;
use ferrea_tests::capture::Tcpdump;
use ferrea_tests::egress::ferrea_rules;
use ferrea_tests::fabric::VlanGateway;
use ferrea_tests::netns::NetNs;
use ferrea_tests::skip_unless_root;

fn held() -> Vec<HeldIp> {
    vec![
        HeldIp {
            ip: Ipv4Addr::new(10, 172, 170, 5),
            id: 7,
            egress: "with-vlan".into(),
            subnet: Some(SubnetInfo {
                gateway: Ipv4Addr::new(10, 172, 170, 254),
                prefix_len: 24,
                vlan: 100,
            }),
            bandwidth: None,
            releasing: false,
        },
        HeldIp {
            ip: Ipv4Addr::new(192, 0, 2, 9),
            id: 8,
            egress: "no-subnet".into(),
            subnet: None,
            bandwidth: None,
            releasing: false,
        },
    ]
}

/// Runs `f` with a fresh [`EgressNode`] on a thread inside `ns` (a new node = a restarted
/// agent).
fn with_node<T: Send + 'static>(
    ns: &NetNs,
    state: std::path::PathBuf,
    f: impl AsyncFnOnce(&mut EgressNode) -> T + Send + 'static,
) -> T {
    ns.run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let (conn, handle, _) = rtnetlink::new_connection().unwrap();
                tokio::spawn(conn);
                let mut n = EgressNode::new(
                    handle,
                    "eth0".into(),
                    "ferrea-gw0".into(),
                    &state,
                    Box::new(load_vlan_tagger),
                );
                f(&mut n).await
            })
    })
}

/// NODE and PEER joined by a veth (`eth0` on both, up), and the pods' gateway stand-in
/// `ferrea-gw0` in NODE.
fn node_and_peer() -> (NetNs, NetNs) {
    let node = NetNs::new("egn").unwrap();
    let peer = NetNs::new("egp").unwrap();
    node.add_veth("eth0", &peer, "eth0").unwrap();
    node.ip(&["link", "set", "eth0", "up"]).unwrap();
    peer.ip(&["link", "set", "eth0", "up"]).unwrap();
    node.ip(&[
        "link",
        "add",
        "ferrea-gw0",
        "type",
        "veth",
        "peer",
        "name",
        "gwp",
    ])
    .unwrap();
    node.ip(&["link", "set", "ferrea-gw0", "up"]).unwrap();
    (node, peer)
}

fn rp(ns: &NetNs, ifname: &str) -> String {
    ns.sh(&[
        "cat",
        &format!("/proc/sys/net/ipv4/conf/{ifname}/rp_filter"),
    ])
    .unwrap()
    .trim()
    .to_owned()
}

#[test]
fn egress_node_holds_ips_and_cleans_up_only_its_own() {
    if !skip_unless_root("egress_node_holds_ips_and_cleans_up_only_its_own") {
        return;
    }
    let (node, peer) = node_and_peer();
    node.ip(&["addr", "add", "10.0.0.2/24", "dev", "eth0"])
        .unwrap();
    peer.ip(&["addr", "add", "10.0.0.1/24", "dev", "eth0"])
        .unwrap();
    node.ip(&[
        "link",
        "add",
        "ferrea-ext.200",
        "link",
        "eth0",
        "type",
        "macvlan",
        "mode",
        "bridge",
    ])
    .unwrap();
    node.ip(&["addr", "add", "10.200.0.2/24", "dev", "ferrea-ext.200"])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_owned();

    let mut cap = Tcpdump::start_link_level(&peer, "eth0", "vlan 100 and arp").unwrap();
    let outcomes = with_node(&node, state.clone(), async |n| n.apply(&held()).await).unwrap();
    assert!(outcomes.iter().all(|o| o.result.is_ok()), "{outcomes:?}");
    // The gratuitous ARP left tagged 100, announcing the egress IP.
    let seen = ferrea_tests::wait_for(Duration::from_secs(3), || {
        cap.lines()
            .iter()
            .any(|l| l.contains("vlan 100") && l.contains("10.172.170.5 tell 10.172.170.5"))
            .then_some(())
    });
    let lines = cap.stop();
    assert!(seen.is_some(), "no tagged gratuitous ARP: {lines:?}");

    let link = node.ip(&["-d", "addr", "show", "ferrea-ext.100"]).unwrap();
    assert!(link.contains("ferrea: egress sub-interface"), "{link}");
    assert!(link.contains("10.172.170.5/24"), "{link}");
    assert!(
        node.ip(&["addr", "show", "eth0"])
            .unwrap()
            .contains("192.0.2.9/32")
    );
    let rules = ferrea_rules(&node).unwrap();
    assert_eq!(rules.lines().count(), 1, "{rules}");
    assert!(
        rules.contains("fwmark 0x70000/0xffff0000 lookup 20100"),
        "{rules}"
    );
    let table = node.ip(&["route", "show", "table", "20100"]).unwrap();
    assert!(
        table.contains("default via 10.172.170.254 dev ferrea-ext.100"),
        "{table}"
    );
    assert!(
        table.contains("10.172.170.0/24 dev ferrea-ext.100"),
        "{table}"
    );
    assert_eq!(rp(&node, "ferrea-ext.100"), "2");
    assert_eq!(rp(&node, "ferrea-gw0"), "2");
    // The sub-interface works: the peer, terminating VLAN 100 the same way, reaches it.
    let _gw = VlanGateway::start(&peer, 100, "10.172.170.254/24".parse().unwrap()).unwrap();
    assert!(ferrea_tests::fabric::ping(
        peer.name(),
        Ipv4Addr::new(10, 172, 170, 5)
    ));
    // No VLAN hopping: a frame tagged 100 addressed to the parent's own MAC (and its untagged
    // address) goes to the sub-interface, which drops it as not its own; the parent never
    // sees it untagged, so it never answers.
    let brief = node.ip(&["-br", "link", "show", "eth0"]).unwrap();
    let mac = brief.split_whitespace().nth(2).unwrap().to_owned();
    peer.ip(&["route", "add", "10.0.0.2/32", "dev", "v100"])
        .unwrap();
    peer.ip(&[
        "neigh",
        "replace",
        "10.0.0.2",
        "lladdr",
        &mac,
        "dev",
        "v100",
        "nud",
        "permanent",
    ])
    .unwrap();
    assert!(
        !ferrea_tests::fabric::ping(peer.name(), Ipv4Addr::new(10, 0, 0, 2)),
        "a frame tagged 100 reached the parent's untagged address"
    );
    peer.ip(&["route", "del", "10.0.0.2/32", "dev", "v100"])
        .unwrap();

    // Drift: an outsider sets strict mode; the check restores it and counts it.
    node.sh(&[
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv4/conf/ferrea-ext.100/rp_filter",
    ])
    .unwrap();
    let (restored, status) = with_node(&node, state.clone(), async |n| {
        n.apply(&held()).await.unwrap();
        let r = n.check_rp_filter();
        (r, n.rp_filter_status())
    });
    // A restarted agent's first check sets it (not counted as drift); a second outsider
    // change is.
    assert!(restored.is_empty(), "{restored:?}");
    assert!(status.iter().all(|s| s.want == "2"), "{status:?}");
    assert_eq!(rp(&node, "ferrea-ext.100"), "2");
    let (restored, status) = with_node(&node, state.clone(), async |n| {
        n.apply(&held()).await.unwrap();
        std::fs::write("/proc/sys/net/ipv4/conf/ferrea-ext.100/rp_filter", "1").unwrap();
        let r = n.check_rp_filter();
        (r, n.rp_filter_status())
    });
    assert_eq!(restored, vec!["ferrea-ext.100".to_owned()]);
    let s = status
        .iter()
        .find(|s| s.interface == "ferrea-ext.100")
        .unwrap();
    assert_eq!((s.found.as_str(), s.restored), ("1", 1), "{s:?}");
    assert_eq!(rp(&node, "ferrea-ext.100"), "2");
    // Re-applied by restarted agents: nothing duplicated.
    assert_eq!(ferrea_rules(&node).unwrap().lines().count(), 1);
    assert_eq!(
        node.ip(&["route", "show", "table", "20100"])
            .unwrap()
            .lines()
            .count(),
        2
    );

    // Nothing held: everything ferrea made goes; the foreign interface stays as it was.
    with_node(&node, state.clone(), async |n| n.apply(&[]).await).unwrap();
    assert!(node.ip(&["link", "show", "ferrea-ext.100"]).is_err());
    assert!(
        !node
            .ip(&["addr", "show", "eth0"])
            .unwrap()
            .contains("192.0.2.9")
    );
    assert_eq!(ferrea_rules(&node).unwrap().trim(), "");
    assert_eq!(
        node.ip(&["route", "show", "table", "all", "proto", "71"])
            .unwrap()
            .trim(),
        ""
    );
    let foreign = node.ip(&["addr", "show", "ferrea-ext.200"]).unwrap();
    assert!(foreign.contains("10.200.0.2/24"), "{foreign}");
    assert!(
        node.ip(&["addr", "show", "eth0"])
            .unwrap()
            .contains("10.0.0.2/24")
    );
}

/// Whether this kernel creates links of `kind` (tried in a scratch namespace).
fn kernel_has(kind: &str) -> bool {
    let ns = NetNs::new("egk").unwrap();
    ns.ip(&["link", "add", "probe0", "type", kind]).is_ok()
}

/// Where the kernel has 802.1Q devices, the sub-interface is a real VLAN device (no BPF
/// tagger); on kernels without them (this machine) the test says so and skips.
#[test]
fn real_vlan_device_where_the_kernel_has_8021q() {
    const NAME: &str = "real_vlan_device_where_the_kernel_has_8021q";
    if !skip_unless_root(NAME) {
        return;
    }
    let probe = NetNs::new("egv").unwrap();
    probe
        .ip(&["link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        .unwrap();
    if probe
        .ip(&[
            "link", "add", "link", "p0", "name", "p0.7", "type", "vlan", "id", "7",
        ])
        .is_err()
    {
        ferrea_tests::skip(NAME, "this kernel has no 802.1Q VLAN devices (8021q)");
        return;
    }
    let (node, _peer) = node_and_peer();
    let dir = tempfile::tempdir().unwrap();
    let outcomes = with_node(&node, dir.path().to_owned(), async |n| {
        n.apply(&held()).await
    })
    .unwrap();
    assert!(outcomes.iter().all(|o| o.result.is_ok()), "{outcomes:?}");
    let d = node.ip(&["-d", "link", "show", "ferrea-ext.100"]).unwrap();
    assert!(d.contains("vlan protocol 802.1Q id 100"), "{d}");
    with_node(&node, dir.path().to_owned(), async |n| n.apply(&[]).await).unwrap();
    assert!(node.ip(&["link", "show", "ferrea-ext.100"]).is_err());
}

/// Where the kernel has dummy devices, an IP without `subnetInfo` lives on `ferrea-egress0`
/// (as Antrea puts it on a dummy); on kernels without them (this machine) the test says so
/// and skips (the transport fallback is covered above).
#[test]
fn dummy_device_where_the_kernel_has_it() {
    const NAME: &str = "dummy_device_where_the_kernel_has_it";
    if !skip_unless_root(NAME) {
        return;
    }
    if !kernel_has("dummy") {
        ferrea_tests::skip(NAME, "this kernel has no dummy devices");
        return;
    }
    let (node, _peer) = node_and_peer();
    let dir = tempfile::tempdir().unwrap();
    let only = vec![held().remove(1)];
    let outcomes = with_node(&node, dir.path().to_owned(), async move |n| {
        n.apply(&only).await
    })
    .unwrap();
    assert_eq!(
        outcomes[0].result.as_deref(),
        Ok("ferrea-egress0"),
        "{outcomes:?}"
    );
    assert!(
        node.ip(&["addr", "show", "ferrea-egress0"])
            .unwrap()
            .contains("192.0.2.9/32")
    );
    with_node(&node, dir.path().to_owned(), async |n| n.apply(&[]).await).unwrap();
    assert!(node.ip(&["link", "show", "ferrea-egress0"]).is_err());
}
