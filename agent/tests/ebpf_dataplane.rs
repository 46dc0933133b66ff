//! Privileged integration test of the eBPF dataplane on a simulated node.
//!
//! Builds its own network namespaces (a "node" and two "pods" with veth pairs, all named
//! `fe-ebpf-<pid>-<n>`), a private bpffs under a temporary directory, and runs
//! [`EbpfDataplane`] from a thread that has entered the node's namespace with `setns`. Guards
//! delete the namespaces and unmount the bpffs on drop, also when an assertion panics. The root
//! namespace is never changed (`ip_forward` is set inside the node namespace only).
//!
//! Needs root; without it the test prints `SKIP: <reason>` and passes.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferrea_agent::dataplane::ebpf::{
    Direction, EbpfDataplane, GATEWAY_IFNAME, PinLayout, TC_PRIORITY,
};
use ferrea_agent::dataplane::{Dataplane, NodeNetwork, PodEndpoint};

/// Runs a command, panicking with its output if it fails.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True if the command succeeds.
fn ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Network namespaces created by this test; deleted on drop (even on panic).
struct Netns {
    names: Vec<String>,
}

impl Netns {
    fn create(n: usize) -> Self {
        let pid = std::process::id();
        let mut g = Netns { names: Vec::new() };
        for i in 0..n {
            let name = format!("fe-ebpf-{pid}-{i}");
            sh(&["ip", "netns", "add", &name]);
            g.names.push(name);
        }
        g
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// A private bpffs mount point (mounted by the dataplane itself); unmounted on drop.
struct BpffsDir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        // Lazy unmount, repeated in case the dataplane was initialised twice on the same path
        // (it must not be, but a failing test must not leave a mount behind either).
        for _ in 0..3 {
            if nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
}

struct Pod {
    ns: String,
    ep: PodEndpoint,
}

/// Creates a veth pair between the node and a pod namespace and configures the pod side like
/// the agent core does: MAC, address /24, default route via the gateway.
fn make_pod(node: &str, ns: &str, host_ifname: &str, n: u8, ip: Ipv4Addr) -> Pod {
    let host_mac = [0x02, 0xfe, 0, 0, 0, n];
    let pod_mac = [0x02, 0x00, 0, 0, 0, n];
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    sh(&[
        "ip",
        "-n",
        node,
        "link",
        "add",
        host_ifname,
        "address",
        &mac(host_mac),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "address",
        &mac(pod_mac),
        "netns",
        ns,
    ]);
    sh(&["ip", "-n", node, "link", "set", host_ifname, "up"]);
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{ip}/24"),
        "dev",
        "eth0",
    ]);
    sh(&[
        "ip",
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        "10.244.1.1",
        "dev",
        "eth0",
    ]);
    Pod {
        ns: ns.to_owned(),
        ep: endpoint(node, host_ifname, host_mac, pod_mac, ip),
    }
}

fn endpoint(
    node: &str,
    host_ifname: &str,
    host_mac: [u8; 6],
    pod_mac: [u8; 6],
    ip: Ipv4Addr,
) -> PodEndpoint {
    let out = sh(&["ip", "-n", node, "-o", "link", "show", host_ifname]);
    let host_ifindex = out.split(':').next().unwrap().trim().parse().unwrap();
    PodEndpoint {
        container_id: format!("c-{host_ifname}"),
        host_ifname: host_ifname.to_owned(),
        host_ifindex,
        host_mac,
        pod_mac,
        ip,
    }
}

fn ping(ns: &str, extra: &[&str], dst: &str) -> bool {
    let mut args = vec![
        "ip", "netns", "exec", ns, "ping", "-c", "2", "-W", "1", "-i", "0.2",
    ];
    args.extend_from_slice(extra);
    args.push(dst);
    ok(&args)
}

/// Number of BPF filters at one hook of an interface in namespace `ns`.
fn filter_count(ns: &str, ifname: &str, d: Direction) -> usize {
    let hook = match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let out = Command::new("tc")
        .args(["-n", ns, "filter", "show", "dev", ifname, hook])
        .output()
        .expect("spawn tc");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" bpf ") && l.contains("direct-action"))
        .count()
}

#[test]
fn ebpf_dataplane_end_to_end() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: ebpf_dataplane needs root (network namespaces, bpffs, BPF programs)");
        return;
    }
    if !ok(&["ip", "-V"]) || !ok(&["ping", "-V"]) {
        println!("SKIP: needs iproute2 and ping");
        return;
    }
    let netns = Netns::create(3);
    let (node, pod_a, pod_b) = (
        netns.names[0].clone(),
        netns.names[1].clone(),
        netns.names[2].clone(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let bpffs = BpffsDir {
        path: tmp.path().join("bpf"),
        _tmp: tmp,
    };

    sh(&["ip", "-n", &node, "link", "set", "lo", "up"]);
    // Forwarding inside the simulated node only, never in the root namespace.
    sh(&[
        "ip",
        "netns",
        "exec",
        &node,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    let pid = std::process::id() % 100_000;
    let a = make_pod(
        &node,
        &pod_a,
        &format!("fea{pid}"),
        5,
        "10.244.1.5".parse().unwrap(),
    );
    let b = make_pod(
        &node,
        &pod_b,
        &format!("feb{pid}"),
        6,
        "10.244.1.6".parse().unwrap(),
    );
    // A third endpoint whose "pod" is gone after a restart: both veth ends stay in the node.
    let c_if = format!("fec{pid}");
    sh(&[
        "ip",
        "-n",
        &node,
        "link",
        "add",
        &c_if,
        "type",
        "veth",
        "peer",
        "name",
        &format!("fecp{pid}"),
    ]);
    sh(&["ip", "-n", &node, "link", "set", &c_if, "up"]);
    let c = endpoint(
        &node,
        &c_if,
        [2, 0xfe, 0, 0, 0, 7],
        [2, 0, 0, 0, 0, 7],
        "10.244.1.7".parse().unwrap(),
    );

    let pin = bpffs.path.clone();
    let node2 = node.clone();
    let body = std::thread::spawn(move || {
        // Only this thread enters the node namespace; the test process stays where it was.
        let f = std::fs::File::open(format!("/var/run/netns/{node2}")).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(&node2, &pin, a, b, c));
    });
    let res = body.join();
    drop(bpffs);
    drop(netns);
    if let Err(p) = res {
        std::panic::resume_unwind(p);
    }
}

async fn run(node: &str, pin: &Path, a: Pod, b: Pod, c: PodEndpoint) {
    let net = NodeNetwork {
        pod_cidr: "10.244.1.0/24".parse().unwrap(),
        gateway: "10.244.1.1".parse().unwrap(),
        mtu: 1500,
    };
    let dp = EbpfDataplane::new(pin).unwrap();
    let t = Instant::now();
    dp.init_node(&net).await.unwrap();
    println!("init_node (first start): {:?}", t.elapsed());
    assert!(ok(&[
        "ip",
        "-n",
        node,
        "addr",
        "show",
        "dev",
        GATEWAY_IFNAME
    ]));
    assert!(
        sh(&["ip", "-n", node, "addr", "show", "dev", GATEWAY_IFNAME]).contains("10.244.1.1/32")
    );

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
    let filters = sh(&[
        "tc",
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
    let routes = sh(&["ip", "-n", node, "route", "show", "10.244.1.5"]);
    assert!(routes.contains("src 10.244.1.1"), "route: {routes}");
    let neigh = sh(&["ip", "-n", node, "neigh", "show", "10.244.1.5"]);
    assert!(
        neigh.contains("PERMANENT") && neigh.contains("02:00:00:00:00:05"),
        "neigh: {neigh}"
    );

    // Pod to pod (redirect_peer), both ways; pod to gateway; node to pod (route + neighbour).
    assert!(ping(&a.ns, &[], "10.244.1.6"), "pod A cannot ping pod B");
    assert!(ping(&b.ns, &[], "10.244.1.5"), "pod B cannot ping pod A");
    assert!(
        ping(&a.ns, &[], "10.244.1.1"),
        "pod A cannot ping the gateway"
    );
    assert!(ping(node, &[], "10.244.1.6"), "node cannot ping pod B");
    let sa = dp.pod_stats(&a.ep).await.unwrap().expect("stats of A");
    let sb = dp.pod_stats(&b.ep).await.unwrap().expect("stats of B");
    println!("stats A {sa:?}\nstats B {sb:?}");
    assert!(sa.tx_packets >= 6 && sa.tx_bytes > 0, "{sa:?}");
    assert!(sa.rx_packets >= 4, "{sa:?}");
    assert!(sb.rx_packets >= 4 && sb.tx_packets >= 4, "{sb:?}");
    assert_eq!(sa.drop_spoofed, 0);

    // Spoof guard: a second address on pod A's eth0 as source gets nowhere.
    sh(&[
        "ip",
        "-n",
        &a.ns,
        "addr",
        "add",
        "10.244.1.99/24",
        "dev",
        "eth0",
    ]);
    assert!(
        !ping(&a.ns, &["-I", "10.244.1.99"], "10.244.1.6"),
        "spoofed ping got a reply"
    );
    let sa2 = dp.pod_stats(&a.ep).await.unwrap().unwrap();
    assert!(
        sa2.drop_spoofed > sa.drop_spoofed,
        "drop_spoofed did not grow: {sa2:?}"
    );
    sh(&[
        "ip",
        "-n",
        &a.ns,
        "addr",
        "del",
        "10.244.1.99/24",
        "dev",
        "eth0",
    ]);

    // Crash: drop the dataplane value without any cleanup. Filters belong to the interfaces'
    // qdiscs, so traffic keeps flowing with no agent at all.
    drop(dp);
    assert!(
        ping(&a.ns, &[], "10.244.1.6"),
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
    let old = layout.progs_root().join("0000000000000000");
    let cur = std::fs::read_dir(layout.progs_root())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::rename(&cur, &old).unwrap();
    let dp = EbpfDataplane::new(pin).unwrap();
    let t = Instant::now();
    dp.init_node(&net).await.unwrap();
    println!("init_node (restart, new build): {:?}", t.elapsed());
    assert!(!old.exists(), "old build's programs still pinned");
    assert!(cur.exists(), "new build's programs not pinned");
    assert_eq!(filter_count(node, &a.ep.host_ifname, Direction::Ingress), 1);
    assert_eq!(filter_count(node, &a.ep.host_ifname, Direction::Egress), 1);
    assert!(
        ping(&a.ns, &[], "10.244.1.6"),
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
    assert!(!sh(&["ip", "-n", node, "route", "show"]).contains("10.244.1.7"));
    assert!(dp.retain_pods(&keep).await.unwrap().is_empty());

    // Re-adding after restart keeps one attachment per hook; traffic still flows.
    dp.add_pod(&a.ep).await.unwrap();
    dp.add_pod(&b.ep).await.unwrap();
    assert_eq!(filter_count(node, &a.ep.host_ifname, Direction::Ingress), 1);
    assert!(
        ping(&a.ns, &[], "10.244.1.6"),
        "pod A -> B broke after restart"
    );

    // Delete B: unknown to the dataplane, A's packets to it go to the stack and find no route.
    dp.del_pod(&b.ep).await.unwrap();
    dp.del_pod(&b.ep).await.unwrap(); // idempotent
    assert!(dp.pod_stats(&b.ep).await.unwrap().is_none());
    assert_eq!(filter_count(node, &b.ep.host_ifname, Direction::Ingress), 0);
    assert!(
        !ping(&a.ns, &[], "10.244.1.6"),
        "deleted pod B still reachable"
    );
    // Deleting a pod whose interface is gone is not an error.
    sh(&["ip", "-n", node, "link", "del", &b.ep.host_ifname]);
    dp.del_pod(&b.ep).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
}
