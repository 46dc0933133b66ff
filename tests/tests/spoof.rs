//! Source-address spoofing: a pod that sends from an address it does not own gets nothing
//! through, neither to another pod nor to the external host, proven by captures at the
//! receivers; its genuine traffic keeps working (and the same captures see it, so an empty
//! capture means "blocked", not "capture broken").

use std::net::Ipv4Addr;

use ferrea_tests::capture::Tcpdump;
use ferrea_tests::fabric::INTERNET_IP;
use ferrea_tests::{Dataplane, NodeOptions, SimNode, dataplane_tests};

/// Sends a few pings from `pod` with source `src` (which may be spoofed) and returns whether
/// any reply came back.
fn ping_burst(pod: &ferrea_tests::Pod, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    let (src, dst) = (src.to_string(), dst.to_string());
    pod.exec(&[
        "ping", "-n", "-q", "-c", "5", "-i", "0.1", "-W", "1", "-I", &src, &dst,
    ])
    .status
    .success()
}

/// A genuine ping that tolerates a few seconds of recovery: the spoofed bursts also sent ARP
/// requests with the spoofed sender address, which the spoof guard rightly drops, so the pod's
/// neighbour entry for the gateway may be FAILED and needs a moment to resolve again.
fn genuine_ping(pod: &ferrea_tests::Pod, dst: Ipv4Addr) -> bool {
    // While the entry is FAILED, ping's first packet fails at once (EHOSTUNREACH) and kicks
    // off a new resolution; the next one goes through.
    let dst = dst.to_string();
    (0..5).any(|_| {
        pod.exec(&["ping", "-n", "-q", "-c", "1", "-W", "1", &dst])
            .status
            .success()
    })
}

dataplane_tests!(spoofed_sources_are_dropped);

fn spoofed_sources_are_dropped(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let attacker = node.add_pod().unwrap();
    let victim = node.add_pod().unwrap();
    // Unallocated addresses: one inside the pod CIDR (another pod's future address), one
    // from another node's pod CIDR, and one from outside the cluster.
    let spoofed: [Ipv4Addr; 3] = [
        "10.244.1.250".parse().unwrap(),
        "10.244.7.9".parse().unwrap(),
        "192.0.2.77".parse().unwrap(),
    ];
    for s in spoofed {
        attacker
            .ns()
            .ip(&["addr", "add", &format!("{s}/32"), "dev", "eth0"])
            .unwrap();
    }

    for s in spoofed {
        // To another pod: the victim must not see a single echo request from `s`.
        let filter = format!("icmp and icmp[icmptype] == icmp-echo and src host {s}");
        let mut cap = Tcpdump::start(victim.ns(), "eth0", &filter).unwrap();
        let replied = ping_burst(&attacker, s, victim.ip());
        let seen = cap.stop();
        assert!(!replied, "spoofed {s} -> pod got replies");
        assert!(
            seen.is_empty(),
            "victim pod received packets spoofed from {s}:\n{}",
            seen.join("\n")
        );

        // To the external host: masquerade could rewrite the source, so count every echo
        // request arriving there while only the spoofing pod is pinging.
        let mut cap = Tcpdump::start(
            node.external(),
            "eth0",
            "icmp and icmp[icmptype] == icmp-echo",
        )
        .unwrap();
        let replied = ping_burst(&attacker, s, INTERNET_IP);
        let seen = cap.stop();
        assert!(!replied, "spoofed {s} -> external got replies");
        assert!(
            seen.is_empty(),
            "external host received packets spoofed from {s}:\n{}",
            seen.join("\n")
        );
    }

    // The attacker's genuine address still works, and the same captures see it.
    let filter = format!(
        "icmp and icmp[icmptype] == icmp-echo and src host {}",
        attacker.ip()
    );
    let mut cap = Tcpdump::start(victim.ns(), "eth0", &filter).unwrap();
    assert!(genuine_ping(&attacker, victim.ip()), "genuine pod -> pod");
    assert!(
        !cap.stop().is_empty(),
        "victim capture saw no genuine echo requests"
    );
    let mut cap = Tcpdump::start(
        node.external(),
        "eth0",
        "icmp and icmp[icmptype] == icmp-echo",
    )
    .unwrap();
    assert!(
        genuine_ping(&attacker, INTERNET_IP),
        "genuine pod -> external"
    );
    let seen = cap.stop();
    assert!(
        !seen.is_empty(),
        "external capture saw no genuine echo requests"
    );
    let node_ip = node.ip().to_string();
    assert!(
        seen.iter().all(|l| l.contains(&format!("IP {node_ip} >"))),
        "external saw other sources than the node: {seen:?}"
    );
    assert!(victim.ping(attacker.ip()), "victim -> attacker");
}
