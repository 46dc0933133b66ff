//! Agent crash and restart: running pods keep their traffic while the agent is down, and the
//! restarted agent removes what belonged to a pod that died meanwhile (address, veth, routes,
//! nftables entries), and serves new pods.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferrea_tests::{Dataplane, NodeOptions, Pod, SimNode, dataplane_tests, lines_mentioning};

/// Small enough to fill, so "the address was released" is proven by getting it again.
const SMALL_CIDR: &str = "10.244.1.0/28";

/// Parses ping's "N packets transmitted, M received" line.
fn ping_counts(out: &str) -> Option<(u32, u32)> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().ok());
    Some((nums.next()??, nums.next()??))
}

dataplane_tests!(crash_restart_keeps_traffic_and_cleans_dead_pods);

fn crash_restart_keeps_traffic_and_cleans_dead_pods(dp: Dataplane) {
    let mut node = SimNode::start(NodeOptions::new(dp).pod_cidr(SMALL_CIDR)).unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let mut dead = node.add_pod().unwrap();
    let (dead_ip, dead_veth) = (dead.ip(), dead.host_ifname().to_owned());
    assert!(a.ping(b.ip()) && a.ping(dead_ip));

    // 8 s of pings every 50 ms between A and B, across the crash and the restart.
    let mut ping = Command::new("ip");
    ping.args([
        "netns",
        "exec",
        a.name(),
        "ping",
        "-n",
        "-q",
        "-i",
        "0.05",
        "-w",
        "8",
    ])
    .arg(b.ip().to_string())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let ping = ping.spawn().unwrap();
    // Guard: if anything below panics, the ping is killed by PID (it also ends by itself).
    struct Reap(Option<std::process::Child>);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Some(c) = self.0.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut ping = Reap(Some(ping));
    std::thread::sleep(Duration::from_secs(1));

    node.agent().kill9().unwrap();
    // The pod dies while the agent is down: its netns and veth disappear, no DEL comes.
    dead.kill_netns();
    let _ = node.ns().ip(&["link", "del", &dead_veth]);
    dead.forget();
    drop(dead);
    std::thread::sleep(Duration::from_secs(1));
    node.agent().restart().unwrap();

    let out = ping.0.take().unwrap().wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (sent, received) = ping_counts(&text).unwrap_or_else(|| panic!("ping output: {text}"));
    let lost = sent - received;
    println!("pings across the restart: {sent} sent, {received} received");
    assert!(sent >= 100, "ping ran too short: {text}");
    assert!(
        lost <= 5.max(sent / 20),
        "{lost} of {sent} pings lost across the agent crash and restart"
    );

    // Nothing is left for the dead pod.
    assert!(
        !node.pod_veths().unwrap().contains(&dead_veth),
        "veth {dead_veth} of the dead pod is still there"
    );
    let routes = lines_mentioning(&node.routes().unwrap(), dead_ip);
    assert!(routes.is_empty(), "routes left for {dead_ip}: {routes:?}");
    let rules = lines_mentioning(&node.nft_ruleset().unwrap(), dead_ip);
    assert!(
        rules.is_empty(),
        "nftables entries left for {dead_ip}: {rules:?}"
    );
    let neigh = lines_mentioning(&node.ns().ip(&["neigh", "show"]).unwrap(), dead_ip);
    assert!(
        neigh.iter().all(|l| !l.contains("PERMANENT")),
        "static neighbour left: {neigh:?}"
    );

    // Surviving pods still work; new pods work; the dead pod's address is handed out again
    // (the pool is filled, so it must be if it was released).
    assert!(a.ping(b.ip()) && b.ping(a.ip()));
    let mut fresh: Vec<Pod> = Vec::new();
    loop {
        match Pod::try_add(node.cni(), "r").unwrap() {
            Ok(p) => fresh.push(p),
            Err(_) => break,
        }
        assert!(fresh.len() < 64, "pool never ran out");
    }
    let ips: HashSet<Ipv4Addr> = fresh.iter().map(|p| p.ip()).collect();
    assert!(
        ips.contains(&dead_ip),
        "{dead_ip} was not released; new pods got {ips:?}"
    );
    for p in &fresh {
        assert!(p.ping(a.ip()), "new pod {} -> old pod {}", p.ip(), a.ip());
    }
}

dataplane_tests!(graceful_restart_keeps_pods);

fn graceful_restart_keeps_pods(dp: Dataplane) {
    let mut node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let veths = node.pod_veths().unwrap();
    node.agent().restart().unwrap();
    assert_eq!(
        node.pod_veths().unwrap(),
        veths,
        "restart changed the pod interfaces"
    );
    assert!(a.ping(b.ip()));
    assert!(a.ping(ferrea_tests::fabric::INTERNET_IP));
    // The restarted agent still knows the pods: a repeated ADD returns the same address.
    let again = a.add_again().unwrap();
    assert_eq!(again.ip, a.ip());
    a.check().unwrap().expect_ok("CHECK after restart").unwrap();
}
