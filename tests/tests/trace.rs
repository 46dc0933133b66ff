//! `ferreactl trace` on simulated nodes, both dataplanes, checked against what tcpdump sees
//! when the pod really sends the same kind of packet:
//!
//! - a genuine source is delivered (same-node pod: into that pod, whose `eth0` capture sees
//!   it), a spoofed one is dropped by the spoof guard (the capture sees nothing);
//! - a same-node pod is a local delivery, another node's pod goes into the tunnel to that
//!   node with the overlay's VNI 0 (the capture on the sending node's fabric port sees VXLAN to
//!   that node with VNI 0 and the pods' addresses inside);
//! - with seed 000's Egress: a selected pod on the node without the IP is steered into the
//!   tunnel to the holder with the Egress id as VNI (seen on the wire, and the external host
//!   sees the egress IP), an unselected one goes to its node's stack (no VXLAN; the external
//!   host sees the node's address); on the holder, the selected pod is marked by ferrea's
//!   nftables for the Egress (the external host sees the egress IP, tagged VLAN 100 on the
//!   wire), the unselected one is not.
//!
//! Argument errors (unknown pod, bad address or port, ICMP with a port) are refused with what
//! to give instead.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ferrea_tests::capture::{Tcpdump, tcp_seen_source};
use ferrea_tests::egress::{EGRESS, EgressCluster, source_seen};
use ferrea_tests::fabric::INTERNET_IP;
use ferrea_tests::{Cluster, Dataplane, NodeOptions, Pod, ctl, dataplane_tests, node, wait_for};
use serde_json::Value;

dataplane_tests!(
    trace_tells_spoofed_from_genuine_and_local_from_remote,
    trace_tells_egress_selected_from_unselected,
);

/// `default/<name>` of a pod.
fn sel(p: &Pod) -> String {
    format!("default/{}", p.attachment().pod_name)
}

/// `ferreactl trace --src <pod> --dst <dst> <extra>` in JSON, printed with its table.
fn trace(n: &node::Node, p: &Pod, dst: &str, extra: &[&str]) -> Value {
    let src = sel(p);
    let mut args = vec!["trace", "--src", &src, "--dst", dst];
    args.extend_from_slice(extra);
    let t = std::time::Instant::now();
    let table = ctl::ok(n, &args).unwrap();
    eprintln!(
        "$ ferreactl {} ({:?})\n{table}",
        args.join(" "),
        t.elapsed()
    );
    ctl::json(n, &args).unwrap()
}

/// The fabric port of node `i` (0-based): what the node puts on the wire comes in there.
fn wire(c: &Cluster, i: usize, filter: &str) -> Tcpdump {
    Tcpdump::start(c.fabric().fabric(), &format!("n{}", i + 1), filter).unwrap()
}

/// A VXLAN packet from `from` to `to` with `vni` carrying `inner` (`"a > b"` as tcpdump
/// prints the inner packet, on the line after the outer one).
fn vxlan_seen(lines: &[String], from: Ipv4Addr, to: Ipv4Addr, vni: u64, inner: &str) -> bool {
    lines.windows(2).any(|w| {
        w[0].contains(&format!("IP {from}."))
            && w[0].contains(&format!(" > {to}.4789: VXLAN"))
            && w[0].ends_with(&format!("vni {vni}"))
            && w[1].contains(inner)
    })
}

/// Three pings from `p` to `dst`, any answered.
fn pings(p: &Pod, dst: Ipv4Addr) -> bool {
    let dst = dst.to_string();
    p.exec(&["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", &dst])
        .status
        .success()
}

fn assert_first_stage(t: &Value, dp: Dataplane) {
    let first = t["steps"][0]["stage"].as_str().unwrap_or_default();
    match dp {
        Dataplane::Ebpf => assert!(first.starts_with("ferrea_from_pod"), "{t:#}"),
        Dataplane::Ovs => assert!(first.starts_with("table 0 Classifier"), "{t:#}"),
    }
    assert_eq!(t["dataplane"], dp.as_str());
}

fn trace_tells_spoofed_from_genuine_and_local_from_remote(dp: Dataplane) {
    let mut c = Cluster::new().unwrap();
    for _ in 0..2 {
        c.add_node(&NodeOptions::new(dp)).unwrap();
    }
    let (n1, n2) = (&c.nodes()[0], &c.nodes()[1]);
    let a = n1.add_pod().unwrap();
    let b = n1.add_pod().unwrap();
    let r = n2.add_pod().unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || a.ping(r.ip()).then_some(())).is_some(),
        "node1's pod never reached node2's pod"
    );

    // Same node: delivered into b; b's eth0 sees a's echo requests.
    let t = trace(n1, &a, &b.ip().to_string(), &[]);
    assert_first_stage(&t, dp);
    assert_eq!(t["verdict"], "pod", "{t:#}");
    assert_eq!(t["dstPod"], sel(&b), "{t:#}");
    assert_eq!(t["dstInterface"], b.host_ifname(), "{t:#}");
    assert_eq!(t["packet"]["srcIP"], a.ip().to_string());
    assert_eq!(t["packet"]["protocol"], "icmp");
    let echo_from =
        |src: Ipv4Addr| format!("icmp and icmp[icmptype] == icmp-echo and src host {src}");
    let mut cap = Tcpdump::start(b.ns(), "eth0", &echo_from(a.ip())).unwrap();
    assert!(pings(&a, b.ip()), "a -> b");
    assert!(!cap.stop().is_empty(), "b saw none of a's echo requests");
    // TCP and UDP to a port go the same way.
    let t = trace(n1, &a, &format!("{}:8080", b.ip()), &[]);
    assert_eq!(
        (&t["verdict"], &t["packet"]["protocol"]),
        (&"pod".into(), &"tcp".into())
    );
    let t = trace(n1, &a, &format!("{}:53", b.ip()), &["--proto", "udp"]);
    assert_eq!(
        (&t["verdict"], &t["dstPod"]),
        (&"pod".into(), &sel(&b).into())
    );

    // Another node's pod: into the tunnel to node2 with the overlay's VNI; the wire agrees.
    let t = trace(n1, &a, &r.ip().to_string(), &[]);
    assert_first_stage(&t, dp);
    assert_eq!(t["verdict"], "tunnel", "{t:#}");
    assert_eq!(t["tunnel"]["node"], n2.name(), "{t:#}");
    assert_eq!(t["tunnel"]["nodeIP"], n2.ip().to_string(), "{t:#}");
    assert_eq!(t["tunnel"]["vni"], 0, "{t:#}");
    assert_eq!(t["egress"], Value::Null, "{t:#}");
    let mut cap = wire(&c, 0, "udp dst port 4789");
    assert!(pings(&a, r.ip()), "a -> r");
    let lines = cap.stop();
    assert!(
        vxlan_seen(
            &lines,
            n1.ip(),
            n2.ip(),
            0,
            &format!("{} > {}", a.ip(), r.ip())
        ),
        "no VXLAN with VNI 0 from {} to {} carrying {} > {}: {lines:#?}",
        n1.ip(),
        n2.ip(),
        a.ip(),
        r.ip()
    );
    let t = trace(n1, &a, &format!("{}:5201", r.ip()), &[]);
    assert_eq!(t["verdict"], "tunnel", "{t:#}");
    assert_eq!(t["tunnel"]["node"], n2.name());

    // Outside the cluster: the node's stack (which masquerades it; the external host sees
    // node1's address).
    let t = trace(n1, &a, &INTERNET_IP.to_string(), &[]);
    assert_eq!(t["verdict"], "stack", "{t:#}");
    assert_eq!(t["egress"], Value::Null, "{t:#}");
    let mut cap =
        Tcpdump::start(c.external(), "eth0", "icmp and icmp[icmptype] == icmp-echo").unwrap();
    assert!(pings(&a, INTERNET_IP), "a -> external");
    let seen = cap.stop();
    assert!(
        !seen.is_empty()
            && seen
                .iter()
                .all(|l| l.contains(&format!("IP {} >", n1.ip()))),
        "{seen:?}"
    );

    // A spoofed source: dropped by the spoof guard, to a local pod and to a remote one; b's
    // capture sees nothing of a real burst from it.
    let spoofed: Ipv4Addr = {
        let o = a.ip().octets();
        Ipv4Addr::new(o[0], o[1], o[2], 250)
    };
    for dst in [b.ip(), r.ip(), INTERNET_IP] {
        let t = trace(
            n1,
            &a,
            &dst.to_string(),
            &["--src-ip", &spoofed.to_string()],
        );
        assert_first_stage(&t, dp);
        assert_eq!(t["verdict"], "dropped", "{t:#}");
        assert_eq!(t["spoofGuard"], true, "{t:#}");
        assert_eq!(t["packet"]["srcIP"], spoofed.to_string());
    }
    // A forged MAC with the pod's own address: dropped too.
    let t = trace(
        n1,
        &a,
        &b.ip().to_string(),
        &["--src-mac", "02:00:de:ad:be:ef"],
    );
    assert_eq!(
        (&t["verdict"], &t["spoofGuard"]),
        (&"dropped".into(), &true.into()),
        "{t:#}"
    );
    a.ns()
        .ip(&["addr", "add", &format!("{spoofed}/32"), "dev", "eth0"])
        .unwrap();
    let mut cap = Tcpdump::start(b.ns(), "eth0", &echo_from(spoofed)).unwrap();
    let (s, d) = (spoofed.to_string(), b.ip().to_string());
    let replied = a
        .exec(&[
            "ping", "-n", "-q", "-c", "5", "-i", "0.1", "-W", "1", "-I", &s, &d,
        ])
        .status
        .success();
    let seen = cap.stop();
    assert!(
        !replied && seen.is_empty(),
        "b received spoofed packets: {seen:?}"
    );
    // The table says the same.
    let src = sel(&a);
    let text = ctl::ok(n1, &["trace", "--src", &src, "--dst", &d, "--src-ip", &s]).unwrap();
    let rows = ctl::table(text.split("\n\n").last().unwrap());
    let field = |f: &str| {
        rows.iter()
            .find(|r| r["FIELD"] == f)
            .unwrap_or_else(|| panic!("no {f}: {text}"))["VALUE"]
            .clone()
    };
    assert_eq!(field("VERDICT"), "dropped");
    assert_eq!(field("SPOOF GUARD"), "true");

    // Clear errors.
    let fails = |args: &[&str], want: &str| {
        let o = ctl::run(n1, args).unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    };
    fails(
        &["trace", "--src", "default/nope", "--dst", &d],
        "no pod \"default/nope\"",
    );
    fails(
        &["trace", "--src", &src, "--dst", "10.244.1.300"],
        "not an IPv4 address",
    );
    fails(
        &["trace", "--src", &src, "--dst", &format!("{d}:99999")],
        "1 to 65535",
    );
    fails(
        &[
            "trace",
            "--src",
            &src,
            "--dst",
            &format!("{d}:80"),
            "--proto",
            "icmp",
        ],
        "icmp takes no port",
    );
    fails(
        &["trace", "--src", &src, "--dst", &d, "--proto", "udp"],
        "needs a port",
    );
}

fn trace_tells_egress_selected_from_unselected(dp: Dataplane) {
    let s = EgressCluster::start(dp).unwrap();
    let nodes = s.c.nodes();
    let (h, o) = (s.egress_node, s.other_node);
    let (holder, other) = (&nodes[h], &nodes[o]);
    let id = ctl::json(holder, &["get", "egressnode"]).unwrap()["held"][0]["id"]
        .as_u64()
        .expect("the holder's Egress id");
    assert_ne!(id, 0);
    let dst = s.listener.addr().to_string();

    // The other node's selected pod: steered into the tunnel to the holder, key = the id.
    let p = &s.selected[o];
    let t = trace(other, p, &dst, &[]);
    assert_first_stage(&t, dp);
    assert_eq!(t["verdict"], "tunnel", "{t:#}");
    assert_eq!(t["tunnel"]["node"], holder.name(), "{t:#}");
    assert_eq!(t["tunnel"]["nodeIP"], holder.ip().to_string(), "{t:#}");
    assert_eq!(t["tunnel"]["vni"], id, "{t:#}");
    assert_eq!(t["egress"]["name"], EGRESS, "{t:#}");
    assert_eq!(t["egress"]["id"], id, "{t:#}");
    assert_eq!(t["egress"]["ip"], s.ip.to_string(), "{t:#}");
    assert_eq!(t["egress"]["how"], "tunnel key", "{t:#}");
    let mut cap = wire(&s.c, o, "udp dst port 4789");
    assert_eq!(
        source_seen(p, &s.listener),
        s.ip,
        "the external host saw the egress IP"
    );
    let lines = cap.stop();
    assert!(
        vxlan_seen(&lines, other.ip(), holder.ip(), id, &format!("{}.", p.ip()))
            && lines
                .iter()
                .any(|l| l.contains(&format!("> {INTERNET_IP}.8090"))),
        "no VXLAN with VNI {id} to {} carrying {}'s packets: {lines:#?}",
        holder.ip(),
        p.ip()
    );

    // The other node's unselected pod: its node's stack, no Egress; nothing tunnelled.
    let u = &s.unselected[o];
    let t = trace(other, u, &dst, &[]);
    assert_eq!(t["verdict"], "stack", "{t:#}");
    assert_eq!(t["egress"], Value::Null, "{t:#}");
    let mut cap = wire(&s.c, o, "udp dst port 4789");
    assert_eq!(
        source_seen(u, &s.listener),
        other.ip(),
        "masqueraded to its node"
    );
    let lines = cap.stop();
    assert!(
        !lines.iter().any(|l| l.contains(&format!("{}.", u.ip()))),
        "the unselected pod's packets were tunnelled: {lines:#?}"
    );

    // The holder's selected pod: its stack, marked by ferrea's nftables for the Egress; on
    // the wire tagged VLAN 100 from the egress IP.
    let p = &s.selected[h];
    let t = trace(holder, p, &dst, &[]);
    assert_eq!(t["verdict"], "stack", "{t:#}");
    assert_eq!(t["egress"]["name"], EGRESS, "{t:#}");
    assert_eq!(t["egress"]["id"], id, "{t:#}");
    assert_eq!(t["egress"]["ip"], s.ip.to_string(), "{t:#}");
    assert_eq!(t["egress"]["how"], "nftables mark", "{t:#}");
    let mut cap = Tcpdump::start_link_level(
        s.c.fabric().fabric(),
        &format!("n{}", h + 1),
        &format!("vlan 100 and src host {}", s.ip),
    )
    .unwrap();
    assert_eq!(source_seen(p, &s.listener), s.ip);
    let lines = cap.stop();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("vlan 100") && l.contains(&format!("{}.", s.ip))),
        "no frame tagged 100 from {}: {lines:?}",
        s.ip
    );
    // Within the cluster the same pod is not Egress traffic (exempt).
    let t = trace(holder, p, &other.ip().to_string(), &[]);
    assert_eq!(t["egress"], Value::Null, "{t:#}");

    // The holder's unselected pod: its stack, no Egress; the external host sees the node.
    let u = &s.unselected[h];
    let t = trace(holder, u, &dst, &[]);
    assert_eq!(t["verdict"], "stack", "{t:#}");
    assert_eq!(t["egress"], Value::Null, "{t:#}");
    let seen = tcp_seen_source(u.ns(), s.listener.addr()).unwrap();
    assert_eq!(seen.ip(), std::net::IpAddr::V4(holder.ip()));
    let _: SocketAddr = seen;
}
