//! The harness itself, without the agent: namespaces, the fabric and external host, bpffs
//! mounts, captures, and cleanup when a test panics half-way.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use ferrea_tests::agent::BpfFs;
use ferrea_tests::capture::{TcpPeers, Tcpdump, tcp_seen_source};
use ferrea_tests::fabric::{self, EXTERNAL_IP, Fabric, INTERNET_IP};
use ferrea_tests::netns::{self, NetNs};
use ferrea_tests::skip_unless_root;

fn is_mounted(path: &std::path::Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let p = path.display().to_string();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p.as_str()))
}

#[test]
fn fabric_connects_nodes_and_external_host() {
    if !skip_unless_root("fabric_connects_nodes_and_external_host") {
        return;
    }
    let f = Fabric::new().unwrap();
    let n1 = f.add_node_ns(f.next_index(), "h").unwrap();
    let n2 = f.add_node_ns(f.next_index(), "h").unwrap();
    assert!(fabric::ping(n1.name(), EXTERNAL_IP), "node1 -> external");
    assert!(
        fabric::ping(n1.name(), INTERNET_IP),
        "node1 -> internet address via default route"
    );
    assert!(
        fabric::ping(n2.name(), fabric::node_ip(1)),
        "node2 -> node1"
    );
    // The external host has no route to pod CIDRs: only masqueraded traffic comes back.
    let routes = f.external().ip(&["route", "show"]).unwrap();
    assert!(
        !routes.contains("10.244."),
        "external host must not route pod CIDRs: {routes}"
    );

    // A TCP listener on the internet address sees the node's fabric address as the source.
    let rec = TcpPeers::start(f.external(), SocketAddr::from((INTERNET_IP, 8080))).unwrap();
    let seen = tcp_seen_source(&n2, rec.addr()).unwrap();
    assert_eq!(seen.ip(), fabric::node_ip(2));
    assert_eq!(rec.peers().len(), 1);
    assert_eq!(rec.peers()[0].ip(), fabric::node_ip(2));
}

#[test]
fn closures_run_inside_the_namespace_only() {
    if !skip_unless_root("closures_run_inside_the_namespace_only") {
        return;
    }
    let ns = NetNs::new("c").unwrap();
    ns.ip(&["addr", "add", "192.0.2.9/32", "dev", "lo"])
        .unwrap();
    // Binding the address works inside, and fails outside (the root namespace lacks it).
    let inside = ns.run(|| std::net::TcpListener::bind((Ipv4Addr::new(192, 0, 2, 9), 0)).is_ok());
    assert!(inside);
    assert!(std::net::TcpListener::bind((Ipv4Addr::new(192, 0, 2, 9), 0)).is_err());
    assert_eq!(ns.links().unwrap(), vec!["lo".to_string()]);
}

#[test]
fn bpffs_is_mounted_privately_and_unmounted_on_drop() {
    if !skip_unless_root("bpffs_is_mounted_privately_and_unmounted_on_drop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bpf");
    {
        let fs = BpfFs::mount(&path).unwrap();
        assert!(is_mounted(fs.path()));
        let st = nix::sys::statfs::statfs(fs.path()).unwrap();
        assert_eq!(st.filesystem_type(), nix::sys::statfs::BPF_FS_MAGIC);
    }
    assert!(!is_mounted(&path));
}

#[test]
fn tcpdump_sees_what_arrives() {
    if !skip_unless_root("tcpdump_sees_what_arrives") {
        return;
    }
    let f = Fabric::new().unwrap();
    let n = f.add_node_ns(f.next_index(), "t").unwrap();
    let mut cap = Tcpdump::start(f.external(), "eth0", "icmp and src host 172.18.0.11").unwrap();
    assert!(fabric::ping(n.name(), EXTERNAL_IP));
    let lines = cap.stop();
    assert!(!lines.is_empty(), "tcpdump saw nothing");
    let mut cap = Tcpdump::start(f.external(), "eth0", "icmp and src host 192.0.2.1").unwrap();
    assert!(fabric::ping(n.name(), EXTERNAL_IP));
    let other = cap.stop();
    assert!(
        other.is_empty(),
        "filter must not match other sources: {other:?}"
    );
}

#[test]
fn everything_is_removed_when_a_test_panics() {
    if !skip_unless_root("everything_is_removed_when_a_test_panics") {
        return;
    }
    let made: Arc<Mutex<Vec<String>>> = Arc::default();
    let mount: Arc<Mutex<Option<std::path::PathBuf>>> = Arc::default();
    let (m, mp) = (made.clone(), mount.clone());
    let r = std::panic::catch_unwind(move || {
        let f = Fabric::new().unwrap();
        let node = f.add_node_ns(f.next_index(), "x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bpf = BpfFs::mount(&dir.path().join("bpf")).unwrap();
        *mp.lock().unwrap() = Some(bpf.path().to_owned());
        let _cap = Tcpdump::start(&node, "eth0", "icmp").unwrap();
        m.lock().unwrap().extend([
            f.fabric().name().to_owned(),
            f.external().name().to_owned(),
            node.name().to_owned(),
        ]);
        assert!(netns::path_of(node.name()).exists());
        panic!("deliberate failure half-way through a test");
    });
    assert!(r.is_err());
    let left = netns::list_with_prefix(&ferrea_tests::name_prefix());
    for name in made.lock().unwrap().iter() {
        assert!(!left.contains(name), "netns {name} left behind: {left:?}");
        assert!(!netns::path_of(name).exists());
    }
    let p = mount.lock().unwrap().clone().unwrap();
    assert!(!is_mounted(&p), "bpffs {} left mounted", p.display());
}
