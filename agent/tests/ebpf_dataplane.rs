//! Privileged integration test of the eBPF dataplane on a simulated node, driving
//! [`EbpfDataplane`] directly (no agent process, no CNI binary): the test plays the agent
//! core's part, wiring pods with veth pairs and handing the backend their endpoints.
//!
//! The node and pod namespaces and the veth pairs come from the simulated-node harness
//! (`ferrea-tests`), whose guards delete them on drop, also when an assertion panics. The
//! dataplane runs on a thread that entered the node's namespace with `setns` and mounts its
//! bpffs itself under a temporary directory (what the agent does where none is mounted);
//! [`BpffsGuard`] unmounts it. The root namespace is never changed (`ip_forward` is set inside
//! the node namespace only).
//!
//! Needs root; without it the test prints `SKIP: <reason>` and passes.

mod common;

use common::{BpffsGuard, endpoint, veth_pod};
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferrea_agent::dataplane::ebpf::{
    Direction, EbpfDataplane, GATEWAY_IFNAME, PinLayout, TC_PRIORITY,
};
use ferrea_agent::dataplane::{Dataplane, NodeNetwork, PodEndpoint};
use ferrea_tests::fabric::{ping, ping_from};
use ferrea_tests::netns::{NetNs, tc_filters};
use ferrea_tests::skip_unless_root;
use ferrea_tests::vethpod::{self, VethPod};

/// A pod with MACs 02:fe:0:0:0:n (host) and 02:00:0:0:0:n (pod), address /24, default route
/// via the gateway.
/// `ip -n <ns> <args>`, panicking with its output if it fails.
fn ip(ns: &str, args: &[&str]) -> String {
    ferrea_tests::netns::run_ok(Command::new("ip").args(["-n", ns]).args(args)).unwrap()
}

/// `tc <args>`, panicking with its output if it fails.
fn tc(args: &[&str]) -> String {
    ferrea_tests::netns::run_ok(Command::new("tc").args(args)).unwrap()
}

/// Number of BPF filters at one hook of an interface in namespace `ns`.
fn filter_count(ns: &str, ifname: &str, d: Direction) -> usize {
    let hook = match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    tc_filters(ns, ifname, hook)
        .iter()
        .filter(|l| l.contains(" bpf ") && l.contains("direct-action"))
        .count()
}

/// What the test body needs from the pods (names and endpoints, no guards).
struct PodInfo {
    ns: String,
    ep: PodEndpoint,
}

impl PodInfo {
    fn of(p: &VethPod) -> Self {
        PodInfo {
            ns: p.name().to_owned(),
            ep: endpoint(p),
        }
    }
}

#[test]
fn ebpf_dataplane_end_to_end() {
    if !skip_unless_root("ebpf_dataplane_end_to_end") {
        return;
    }
    let node = NetNs::new("ebpfn").unwrap();
    let bpffs = BpffsGuard::new();
    // Forwarding inside the simulated node only, never in the root namespace.
    node.sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    let pid = std::process::id() % 100_000;
    let a = veth_pod(
        &node,
        "p",
        &format!("fea{pid}"),
        5,
        Ipv4Addr::new(10, 244, 1, 5),
    );
    let b = veth_pod(
        &node,
        "p",
        &format!("feb{pid}"),
        6,
        Ipv4Addr::new(10, 244, 1, 6),
    );
    // A third endpoint whose "pod" is gone after a restart: both veth ends stay in the node.
    let c_if = format!("fec{pid}");
    let c = PodEndpoint {
        container_id: format!("c-{c_if}"),
        host_ifindex: vethpod::dangling_veth(&node, &c_if, &format!("fecp{pid}")).unwrap(),
        host_ifname: c_if,
        host_mac: [2, 0xfe, 0, 0, 0, 7],
        pod_mac: [2, 0, 0, 0, 0, 7],
        ip: Ipv4Addr::new(10, 244, 1, 7),
    };

    let pin = bpffs.path.clone();
    let node_name = node.name().to_owned();
    let (ai, bi) = (PodInfo::of(&a), PodInfo::of(&b));
    // Only that thread enters the node namespace; the test process stays where it was.
    node.run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(&node_name, &pin, ai, bi, c))
    });
    drop((a, b));
    drop(bpffs);
    drop(node);
}

async fn run(node: &str, pin: &Path, a: PodInfo, b: PodInfo, c: PodEndpoint) {
    let net = NodeNetwork::standalone("10.244.1.0/24".parse().unwrap(), 1500);
    let dp = EbpfDataplane::new(pin).unwrap();
    let t = Instant::now();
    dp.init_node(&net).await.unwrap();
    println!("init_node (first start): {:?}", t.elapsed());
    assert!(ip(node, &["addr", "show", "dev", GATEWAY_IFNAME]).contains("10.244.1.1/32"));

    for ep in [&a.ep, &b.ep, &c] {
        let t = Instant::now();
        dp.add_pod(ep).await.unwrap();
        println!("add_pod {}: {:?}", ep.host_ifname, t.elapsed());
    }
    // Idempotent re-add: same state, still exactly one program per hook.
    let t = Instant::now();
    dp.add_pod(&a.ep).await.unwrap();
    println!("add_pod {} again: {:?}", a.ep.host_ifname, t.elapsed());
    assert_eq!(filter_count(node, &a.ep.host_ifname, Direction::Ingress), 1);
    assert_eq!(filter_count(node, &a.ep.host_ifname, Direction::Egress), 1);
    let filters = tc(&[
        "-n",
        node,
        "filter",
        "show",
        "dev",
        &a.ep.host_ifname,
        "ingress",
    ]);
    assert!(
        filters.contains(&format!("pref {TC_PRIORITY} ")) && filters.contains("direct-action"),
        "{filters}"
    );
    let routes = ip(node, &["route", "show", "10.244.1.5"]);
    assert!(routes.contains("src 10.244.1.1"), "route: {routes}");
    let neigh = ip(node, &["neigh", "show", "10.244.1.5"]);
    assert!(
        neigh.contains("PERMANENT") && neigh.contains("02:00:00:00:00:05"),
        "neigh: {neigh}"
    );

    // Pod to pod (redirect_peer), both ways; pod to gateway; node to pod (route + neighbour).
    assert!(
        ping(&a.ns, Ipv4Addr::new(10, 244, 1, 6)),
        "pod A cannot ping pod B"
    );
    assert!(
        ping(&b.ns, Ipv4Addr::new(10, 244, 1, 5)),
        "pod B cannot ping pod A"
    );
    assert!(
        ping(&a.ns, Ipv4Addr::new(10, 244, 1, 1)),
        "pod A cannot ping the gateway"
    );
    assert!(
        ping(node, Ipv4Addr::new(10, 244, 1, 6)),
        "node cannot ping pod B"
    );
    let sa = dp.pod_stats(&a.ep).await.unwrap().expect("stats of A");
    let sb = dp.pod_stats(&b.ep).await.unwrap().expect("stats of B");
    println!("stats A {sa:?}\nstats B {sb:?}");
    // One echo each way between A and B, A to the gateway, the node to B (fabric::ping sends
    // one request, and retries once only on failure).
    assert!(sa.tx_packets >= 3 && sa.tx_bytes > 0, "{sa:?}");
    assert!(sa.rx_packets >= 2, "{sa:?}");
    assert!(sb.rx_packets >= 3 && sb.tx_packets >= 3, "{sb:?}");
    assert_eq!(sa.drop_spoofed, 0);

    // Spoof guard: a second address on pod A's eth0 as source gets nowhere.
    ip(&a.ns, &["addr", "add", "10.244.1.99/24", "dev", "eth0"]);
    assert!(
        !ping_from(
            &a.ns,
            Ipv4Addr::new(10, 244, 1, 6),
            Some(Ipv4Addr::new(10, 244, 1, 99))
        ),
        "spoofed ping got a reply"
    );
    let sa2 = dp.pod_stats(&a.ep).await.unwrap().unwrap();
    assert!(
        sa2.drop_spoofed > sa.drop_spoofed,
        "drop_spoofed did not grow: {sa2:?}"
    );
    ip(&a.ns, &["addr", "del", "10.244.1.99/24", "dev", "eth0"]);

    // Crash: drop the dataplane value without any cleanup. Filters belong to the interfaces'
    // qdiscs, so traffic keeps flowing with no agent at all.
    drop(dp);
    assert!(
        ping(&a.ns, Ipv4Addr::new(10, 244, 1, 6)),
        "pod A -> B broke after the agent went away"
    );

    // Restart on the same pin path: maps adopted (counters continue), programs of the same
    // build reused, filters untouched (no duplicates).
    let dp = EbpfDataplane::new(pin).unwrap();
    let t = Instant::now();
    dp.init_node(&net).await.unwrap();
    println!("init_node (restart, adopt): {:?}", t.elapsed());
    let sa3 = dp
        .pod_stats(&a.ep)
        .await
        .unwrap()
        .expect("counters adopted");
    assert!(
        sa3.tx_packets > sa2.tx_packets,
        "counters not adopted: {sa3:?} vs {sa2:?}"
    );
    let layout = PinLayout::new(pin.to_owned());
    assert_eq!(std::fs::read_dir(layout.progs_root()).unwrap().count(), 1);
    assert_eq!(filter_count(node, &a.ep.host_ifname, Direction::Ingress), 1);

    // Upgrade: pretend the attached programs are of another build. A new process loads its
    // own build, swaps the program of every pod's filters in place, and drops the old pins.
    drop(dp);
    let (cur, old) = common::pretend_programs_of_another_build(&layout);
    let dp = EbpfDataplane::new(pin).unwrap();
    let t = Instant::now();
    dp.init_node(&net).await.unwrap();
    println!("init_node (restart, new build): {:?}", t.elapsed());
    assert!(!old.exists(), "old build's programs still pinned");
    assert!(cur.exists(), "new build's programs not pinned");
    assert_eq!(filter_count(node, &a.ep.host_ifname, Direction::Ingress), 1);
    assert_eq!(filter_count(node, &a.ep.host_ifname, Direction::Egress), 1);
    assert!(
        ping(&a.ns, Ipv4Addr::new(10, 244, 1, 6)),
        "pod A -> B broke after an upgrade"
    );

    // Reconcile: C is not wanted any more.
    let keep: HashSet<Ipv4Addr> = [a.ep.ip, b.ep.ip].into_iter().collect();
    let removed = dp.retain_pods(&keep).await.unwrap();
    assert_eq!(removed, vec![c.ip]);
    assert!(dp.pod_stats(&c).await.unwrap().is_none());
    assert_eq!(
        filter_count(node, &c.host_ifname, Direction::Ingress),
        0,
        "C's program still attached"
    );
    assert!(!ip(node, &["route", "show"]).contains("10.244.1.7"));
    assert!(dp.retain_pods(&keep).await.unwrap().is_empty());

    // Re-adding after restart keeps one attachment per hook; traffic still flows.
    dp.add_pod(&a.ep).await.unwrap();
    dp.add_pod(&b.ep).await.unwrap();
    assert_eq!(filter_count(node, &a.ep.host_ifname, Direction::Ingress), 1);
    assert!(
        ping(&a.ns, Ipv4Addr::new(10, 244, 1, 6)),
        "pod A -> B broke after restart"
    );

    // Delete B: unknown to the dataplane, A's packets to it go to the stack and find no route.
    dp.del_pod(&b.ep).await.unwrap();
    dp.del_pod(&b.ep).await.unwrap(); // idempotent
    assert!(dp.pod_stats(&b.ep).await.unwrap().is_none());
    assert_eq!(filter_count(node, &b.ep.host_ifname, Direction::Ingress), 0);
    assert!(
        !ping(&a.ns, Ipv4Addr::new(10, 244, 1, 6)),
        "deleted pod B still reachable"
    );
    // Deleting a pod whose interface is gone is not an error.
    ip(node, &["link", "del", &b.ep.host_ifname]);
    dp.del_pod(&b.ep).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
}
