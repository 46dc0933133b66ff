//! Source-address spoofing: a pod that sends from an address it does not own gets nothing
//! through, neither to another pod nor to the external host, proven by captures at the
//! receivers; its genuine traffic keeps working (and the same captures see it, so an empty
//! capture means "blocked", not "capture broken").
//!
//! Hostile frames: a pod that sends IPv6, ARP claiming another pod's address, frames from a
//! MAC it changed, or a flood of ARP requests. Each is dropped (or answered by the dataplane
//! itself, for the flood), the pod's counters in `ferreactl get podinterface` show it, and
//! another pod's traffic is not disturbed.

use std::net::Ipv4Addr;

use std::time::Duration;

use ferrea_tests::capture::Tcpdump;
use ferrea_tests::fabric::INTERNET_IP;
use ferrea_tests::traffic::BackgroundPing;
use ferrea_tests::{Dataplane, NodeOptions, SimNode, ctl, dataplane_tests, frames};

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

dataplane_tests!(
    spoofed_sources_are_dropped,
    hostile_frames_are_dropped_and_counted
);

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

/// The pod's counters as `ferreactl get podinterface -o json` shows them.
fn counters(node: &SimNode, pod: &ferrea_tests::Pod) -> serde_json::Value {
    let all = ctl::json(node, &["get", "podinterface"]).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|r| r["ip"] == pod.ip().to_string())
        .unwrap_or_else(|| panic!("{} not in {all:#}", pod.ip()))
        .clone()
}

fn counter(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {v:#}"))
}

/// Polls the pod's counters until `key` reached `at_least` (counters are read from the
/// dataplane; OVS flow statistics lag by up to a second).
fn wait_counter(node: &SimNode, pod: &ferrea_tests::Pod, key: &str, at_least: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = counter(&counters(node, pod), key);
        if n >= at_least || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn hostile_frames_are_dropped_and_counted(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let attacker = node.add_pod().unwrap();
    let victim = node.add_pod().unwrap();
    let witness = node.add_pod().unwrap();
    let mac = frames::parse_mac(&attacker.result().mac).unwrap();
    // The victim keeps talking to the witness through everything below.
    let ping = BackgroundPing::start(
        victim.ns().name(),
        witness.ip(),
        Duration::from_millis(50),
        Duration::from_secs(12),
    )
    .unwrap();

    // IPv6: 300 echo requests to all nodes. None reaches the victim; each is counted.
    let before = counters(&node, &attacker);
    let mut cap = Tcpdump::start(victim.ns(), "eth0", "icmp6 and ip6[40] == 128").unwrap();
    let pace = Some(Duration::from_millis(1));
    let sent = frames::send(
        attacker.ns(),
        "eth0",
        vec![frames::ipv6_echo(mac)],
        300,
        pace,
    )
    .unwrap();
    assert_eq!(sent, 300);
    let want = counter(&before, "dropOther") + 300;
    let got = wait_counter(&node, &attacker, "dropOther", want);
    let seen = cap.stop();
    assert!(
        seen.is_empty(),
        "IPv6 from a pod reached another pod:\n{}",
        seen.join("\n")
    );
    assert!(got >= want, "dropOther {got}, want at least {want}");

    // ARP claiming the victim's address (a poisoning attempt), from the attacker's own MAC:
    // dropped as spoofed, never seen by the victim, and the node still reaches the victim.
    let before = counters(&node, &attacker);
    let mut cap = Tcpdump::start(victim.ns(), "eth0", "arp").unwrap();
    let claims = vec![
        frames::arp_request(mac, victim.ip(), node.gateway()),
        frames::arp_request(mac, victim.ip(), victim.ip()),
    ];
    assert_eq!(
        frames::send(attacker.ns(), "eth0", claims, 50, pace).unwrap(),
        100
    );
    let want = counter(&before, "dropSpoofed") + 100;
    let got = wait_counter(&node, &attacker, "dropSpoofed", want);
    let seen = cap.stop();
    assert!(got >= want, "dropSpoofed {got}, want at least {want}");
    assert!(
        !seen
            .iter()
            .any(|l| l.contains(&format!("tell {}", victim.ip()))),
        "the victim saw ARP claiming its address:\n{}",
        seen.join("\n")
    );
    assert!(
        witness.ping(victim.ip()),
        "witness -> victim after ARP spoofing"
    );

    // A changed MAC: everything the pod sends is dropped as spoofed until it takes its own
    // MAC back.
    let before = counter(&counters(&node, &attacker), "dropSpoofed");
    attacker
        .ns()
        .ip(&["link", "set", "eth0", "address", "02:00:00:00:be:ef"])
        .unwrap();
    assert!(
        !attacker.ping(witness.ip()),
        "a pod with a changed MAC got through"
    );
    let got = wait_counter(&node, &attacker, "dropSpoofed", before + 1);
    assert!(
        got > before,
        "frames from a changed MAC were not counted: {got}"
    );
    attacker
        .ns()
        .ip(&["link", "set", "eth0", "address", &attacker.result().mac])
        .unwrap();
    assert!(
        genuine_ping(&attacker, witness.ip()),
        "attacker with its MAC back"
    );

    // An ARP flood: 20,000 genuine requests for the gateway as fast as the socket takes them.
    // The dataplane answers each itself (no broadcast: no other pod sees one), and the
    // victim's pings go on.
    let mut cap = Tcpdump::start(victim.ns(), "eth0", "arp").unwrap();
    let mut replies = Tcpdump::start(attacker.ns(), "eth0", "arp").unwrap();
    let flood = vec![frames::arp_request(mac, attacker.ip(), node.gateway())];
    assert_eq!(
        frames::send(attacker.ns(), "eth0", flood, 20_000, None).unwrap(),
        20_000
    );
    std::thread::sleep(Duration::from_millis(500));
    let seen = cap.stop();
    let answered = replies.stop();
    assert!(
        !seen
            .iter()
            .any(|l| l.contains(&format!("tell {}", attacker.ip()))),
        "the flood reached another pod: {} lines, first {:?}",
        seen.len(),
        seen.first()
    );
    // Answered, not dropped: every request in a burst this fast need not be (the sender's
    // and tcpdump's queues overflow first), but thousands are.
    let answered = answered.iter().filter(|l| l.contains("Reply")).count();
    eprintln!("{dp}: {answered} of 20000 flooded ARP requests answered");
    assert!(
        answered >= 1_000,
        "only {answered} of 20000 ARP requests were answered"
    );

    let counts = ping.finish().unwrap();
    assert!(
        counts.lost() <= 2,
        "the victim's pings to the witness suffered: {counts:?}"
    );
    assert!(
        witness.ping(attacker.ip()),
        "witness -> attacker at the end"
    );
}
