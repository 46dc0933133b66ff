//! OVS-specific behaviour of the real agent on a simulated node: what happens when the OVS
//! daemons restart under it, when a pod dies while the agent is down, and which flows are
//! left after the agent restarts (the cookie's round, `pipeline::cookie` in the agent:
//! `round:16 | kind:16 | pod IPv4:32`).
//!
//! Every test starts its own node with a private ovsdb-server and ovs-vswitchd
//! ([`ferrea_tests::ovs::OvsDaemons`]); everything is deleted on drop, also on panic.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ferrea_tests::fabric::INTERNET_IP;
use ferrea_tests::ovs::{Flow, OvsDaemons};
use ferrea_tests::traffic::BackgroundPing;
use ferrea_tests::{Dataplane, NodeOptions, Pod, SimNode, skip_unless_root, wait_for};

/// The agent's integration bridge (its default).
const BRIDGE: &str = "br-int";
/// Cookie kinds (agent `pipeline::cookie`).
const KIND_NODE: u16 = 1;
const KIND_POD: u16 = 2;

fn round(c: u64) -> u16 {
    (c >> 48) as u16
}

fn kind(c: u64) -> u16 {
    (c >> 32) as u16
}

/// The pod IP a pod flow's cookie carries.
fn pod_ip(c: u64) -> Option<Ipv4Addr> {
    (kind(c) == KIND_POD).then(|| Ipv4Addr::from(c as u32))
}

/// The flows of `ip`'s pod, in any round.
fn pod_flows(flows: &[Flow], ip: Ipv4Addr) -> Vec<&Flow> {
    flows
        .iter()
        .filter(|f| pod_ip(f.cookie) == Some(ip))
        .collect()
}

fn ovs(node: &mut SimNode) -> &mut OvsDaemons {
    node.ovs().expect("an OVS node has OVS daemons")
}

/// Flows of the bridge, or an empty list while vswitchd is not answering.
fn flows_now(node: &mut SimNode) -> Vec<Flow> {
    ovs(node).flows(BRIDGE).unwrap_or_default()
}

/// Pings until one is answered or `timeout` passes; returns how long it took.
fn ping_within(ns: &str, dst: Ipv4Addr, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    wait_for(timeout, || {
        ferrea_tests::fabric::ping(ns, dst).then(|| start.elapsed())
    })
}

/// The round the agent recorded on the bridge (`external_ids:ferrea-round`).
fn bridge_round(node: &mut SimNode) -> u16 {
    let out = ovs(node)
        .vsctl(&["get", "Bridge", BRIDGE, "external_ids:ferrea-round"])
        .unwrap();
    out.trim().trim_matches('"').parse().unwrap()
}

/// ovs-vswitchd restarts (userspace datapath: every flow is gone, the taps are recreated):
/// without any CNI activity the agent notices, reconnects and re-installs its flows, and the
/// pods talk to each other and to the outside again within seconds (the agent's once-a-second
/// dataplane upkeep reconnects).
#[test]
fn vswitchd_restart_reinstalls_flows() {
    if skip_unless_root("vswitchd_restart_reinstalls_flows") {
        vswitchd_restart(false);
    }
}

/// ovs-vswitchd restarts and a pod is added at once: whichever comes first, the request or
/// the agent's upkeep, finds the connection broken, reconnects and re-installs every flow the
/// agent knows (the gateway address put back on the recreated tap); the new pod is added too.
#[test]
fn vswitchd_restart_resyncs_on_next_request() {
    if skip_unless_root("vswitchd_restart_resyncs_on_next_request") {
        vswitchd_restart(true);
    }
}

fn vswitchd_restart(add_pod_after: bool) {
    let mut node = SimNode::start(NodeOptions::new(Dataplane::Ovs)).unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    assert!(a.ping(b.ip()), "pod A -> B before the restart");
    assert!(a.ping(INTERNET_IP), "pod A -> external before the restart");
    let before = flows_now(&mut node);
    assert!(!pod_flows(&before, a.ip()).is_empty(), "no flows of pod A");

    let o = ovs(&mut node);
    let old_pid = o.vswitchd_pid();
    o.stop_vswitchd();
    o.start_vswitchd().unwrap();
    assert_ne!(o.vswitchd_pid(), old_pid, "vswitchd not restarted");
    o.wait_mgmt(BRIDGE).unwrap();
    // The fresh vswitchd starts with empty tables: what shows up is the agent's doing.
    let c = add_pod_after.then(|| node.add_pod().expect("ADD after a vswitchd restart"));
    let (ia, ib) = (a.ip(), b.ip());
    let back = wait_for(Duration::from_secs(10), || {
        let f = flows_now(&mut node);
        let ok = !pod_flows(&f, ia).is_empty()
            && !pod_flows(&f, ib).is_empty()
            && f.iter().any(|f| kind(f.cookie) == KIND_NODE);
        ok.then_some(f)
    });
    let after = back.unwrap_or_else(|| {
        panic!(
            "the agent did not re-install its flows within 10 s of the vswitchd restart; flows now:\n{:#?}",
            flows_now(&mut node)
        )
    });
    // Everything that was there before is there again, same round, same ports.
    let norm = |f: &[&Flow]| {
        let mut v: Vec<String> = f.iter().map(|f| f.normalized()).collect();
        v.sort();
        v
    };
    let not_c = |f: &&Flow| c.as_ref().is_none_or(|c| pod_ip(f.cookie) != Some(c.ip()));
    assert_eq!(
        norm(&after.iter().filter(not_c).collect::<Vec<_>>()),
        norm(&before.iter().collect::<Vec<_>>()),
        "flows differ after the resync"
    );

    let t = ping_within(a.name(), b.ip(), Duration::from_secs(5))
        .expect("pod A -> B did not recover within 5 s of the flows coming back");
    println!("pod A -> B answered {t:?} after the flows came back");
    assert!(b.ping(a.ip()), "pod B -> A after the vswitchd restart");
    // Needs the gateway tap's address back (vswitchd recreated the device without it).
    assert!(a.ping(node.gateway()), "pod A -> gateway");
    assert!(
        a.ping(INTERNET_IP),
        "pod A -> external after the vswitchd restart"
    );
    if let Some(c) = &c {
        assert!(c.ping(a.ip()), "new pod -> pod A");
    }
}

/// ovsdb-server restarts (same database file): the agent reconnects on its next OVSDB call,
/// so a pod added afterwards gets its port and flows and talks to the others.
#[test]
fn ovsdb_restart_agent_keeps_working() {
    if !skip_unless_root("ovsdb_restart_agent_keeps_working") {
        return;
    }
    let mut node = SimNode::start(NodeOptions::new(Dataplane::Ovs)).unwrap();
    let a = node.add_pod().unwrap();
    let old_pid = ovs(&mut node).ovsdb_pid();
    ovs(&mut node).restart_ovsdb().unwrap();
    assert_ne!(
        ovs(&mut node).ovsdb_pid(),
        old_pid,
        "ovsdb-server not restarted"
    );
    // vswitchd keeps its flows while the database is away.
    assert!(
        a.ping(node.gateway()),
        "pod A -> gateway across the restart"
    );

    let c = node.add_pod().expect("ADD after an ovsdb-server restart");
    let ports = ovs(&mut node).ports(BRIDGE).unwrap();
    assert!(
        ports.iter().any(|p| p == c.host_ifname()),
        "port {} of the new pod not in {BRIDGE}: {ports:?}",
        c.host_ifname()
    );
    assert!(
        !pod_flows(&flows_now(&mut node), c.ip()).is_empty(),
        "no flows for the new pod {}",
        c.ip()
    );
    assert!(c.ping(a.ip()), "new pod -> pod A");
    assert!(a.ping(c.ip()), "pod A -> new pod");
    assert!(c.ping(INTERNET_IP), "new pod -> external");
}

/// A pod dies while the agent is down: its veth vanishes with its namespace, but its OVS
/// port stays in the database (vswitchd only reports the device missing). The restarted
/// agent removes that port and every flow of the pod, and the other pods keep working.
#[test]
fn restart_removes_stale_ports_and_flows() {
    if !skip_unless_root("restart_removes_stale_ports_and_flows") {
        return;
    }
    let mut node = SimNode::start(NodeOptions::new(Dataplane::Ovs)).unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let mut dead = node.add_pod().unwrap();
    let (dead_ip, dead_port) = (dead.ip(), dead.host_ifname().to_owned());
    assert!(a.ping(dead_ip));

    node.agent().kill9().unwrap();
    dead.kill_netns();
    // The precondition: the pod's port outlives its veth while nobody cleans up.
    let veth_gone = wait_for(Duration::from_secs(5), || {
        (!node.ns().links().unwrap().contains(&dead_port)).then_some(())
    });
    assert!(veth_gone.is_some(), "veth {dead_port} still there");
    let ports = ovs(&mut node).ports(BRIDGE).unwrap();
    assert!(
        ports.contains(&dead_port),
        "port {dead_port} vanished without the agent; the test proves nothing: {ports:?}"
    );
    assert!(!pod_flows(&flows_now(&mut node), dead_ip).is_empty());

    node.agent().restart().unwrap();
    // Readiness comes after reconciliation, so no waiting here.
    let ports = ovs(&mut node).ports(BRIDGE).unwrap();
    assert!(
        !ports.contains(&dead_port),
        "stale port {dead_port} left after the restart: {ports:?}"
    );
    assert!(
        ports.iter().any(|p| p == a.host_ifname()) && ports.iter().any(|p| p == b.host_ifname()),
        "live pods' ports missing: {ports:?}"
    );
    let flows = flows_now(&mut node);
    let left = pod_flows(&flows, dead_ip);
    assert!(
        left.is_empty(),
        "flows of the dead pod {dead_ip} left: {left:#?}"
    );
    assert!(
        !pod_flows(&flows, a.ip()).is_empty(),
        "pod A lost its flows"
    );
    // Not even a flow that matches the address under another cookie.
    let mentions = ferrea_tests::lines_mentioning(
        &flows
            .iter()
            .map(|f| f.line.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        dead_ip,
    );
    assert!(
        mentions.is_empty(),
        "flows mention {dead_ip}: {mentions:#?}"
    );

    dead.forget();
    drop(dead);
    assert!(
        a.ping(b.ip()) && b.ping(a.ip()),
        "pods A and B after the restart"
    );
    assert!(a.ping(INTERNET_IP), "pod A -> external after the restart");
}

/// An agent restart with a ping running between two pods: afterwards only flows of the new
/// round are left (the round recorded on the bridge went up by one), and at most a few
/// packets were lost.
#[test]
fn restart_leaves_one_round_and_keeps_traffic() {
    if !skip_unless_root("restart_leaves_one_round_and_keeps_traffic") {
        return;
    }
    let mut node = SimNode::start(NodeOptions::new(Dataplane::Ovs)).unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    assert!(a.ping(b.ip()));
    let old = bridge_round(&mut node);
    let before = flows_now(&mut node);
    assert!(
        before.iter().all(|f| round(f.cookie) == old),
        "flows of more than one round before the restart: {before:#?}"
    );

    let ping = BackgroundPing::start(
        a.name(),
        b.ip(),
        Duration::from_millis(50),
        Duration::from_secs(6),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    node.agent().restart().unwrap();
    let counts = ping.finish().unwrap();
    println!("pings across the restart: {counts:?}");
    assert!(counts.sent >= 80, "ping ran too short: {counts:?}");
    assert!(
        counts.lost() <= 3,
        "{} of {} pings lost across the agent restart",
        counts.lost(),
        counts.sent
    );

    let new = bridge_round(&mut node);
    assert_eq!(
        new,
        old.wrapping_add(1),
        "the restarted agent did not bump the round"
    );
    let flows = flows_now(&mut node);
    let stale: Vec<&Flow> = flows.iter().filter(|f| round(f.cookie) != new).collect();
    assert!(
        stale.is_empty(),
        "flows not of round {new} after the restart: {stale:#?}"
    );
    // The new round is complete: node flows and both pods' flows, as many as before.
    assert!(flows.iter().any(|f| kind(f.cookie) == KIND_NODE));
    for ip in [a.ip(), b.ip()] {
        assert_eq!(
            pod_flows(&flows, ip).len(),
            pod_flows(&before, ip).len(),
            "pod {ip} has a different number of flows after the restart"
        );
    }
    assert_eq!(flows.len(), before.len(), "flow count changed");
    assert!(a.ping(b.ip()) && a.ping(INTERNET_IP));
}

/// Pod ports get the OpenFlow number the agent requests (100 + the address's offset in the pod
/// CIDR), so an ADD never waits for vswitchd to assign one; the flows use that number.
#[test]
fn pod_ports_get_the_requested_numbers() {
    if !skip_unless_root("pod_ports_get_the_requested_numbers") {
        return;
    }
    let mut node = SimNode::start(NodeOptions::new(Dataplane::Ovs)).unwrap();
    let pods = [node.add_pod().unwrap(), node.add_pod().unwrap()];
    assert!(pods[0].ping(pods[1].ip()), "pod A -> B");
    for p in &pods {
        let want = 100 + p.ip().octets()[3] as i64;
        let got: i64 = ovs(&mut node)
            .vsctl(&["get", "Interface", p.host_ifname(), "ofport"])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(got, want, "ofport of {}", p.host_ifname());
        let flows = flows_now(&mut node);
        assert!(
            pod_flows(&flows, p.ip())
                .iter()
                .any(|f| f.line.contains(&format!("in_port={want}"))),
            "no flow of {} matches in_port={want}",
            p.ip()
        );
    }
}

/// ovsdb-server unreachable while the agent starts: the agent keeps serving, answers STATUS
/// with "not available" and ADD with TRY_AGAIN_LATER naming the problem, and becomes ready by
/// itself once OVSDB answers again.
#[test]
fn agent_waits_for_an_unreachable_ovsdb() {
    if !skip_unless_root("agent_waits_for_an_unreachable_ovsdb") {
        return;
    }
    let mut node = SimNode::start(NodeOptions::new(Dataplane::Ovs)).unwrap();
    node.node_mut().agent().stop().unwrap();
    // Moving the socket away makes ovsdb-server unreachable (ENOENT) while it keeps running.
    let sock = ovs(&mut node).db_socket();
    let away = sock.with_extension("away");
    std::fs::rename(&sock, &away).unwrap();
    node.node_mut().agent().spawn().unwrap();
    let status = wait_for(Duration::from_secs(15), || {
        let o = node.cni().status().unwrap();
        (o.code() == Some(50) && o.stdout.contains("db.sock")).then_some(o)
    })
    .expect("STATUS never reported the unreachable OVSDB");
    println!("STATUS while OVSDB is away: {}", status.stdout.trim());
    match Pod::try_add(node.cni(), "w").unwrap() {
        Err(out) => out.assert_error(11, "ADD while OVSDB is unreachable"),
        Ok(_) => panic!("ADD succeeded without OVSDB"),
    }
    std::fs::rename(&away, &sock).unwrap();
    node.node_mut()
        .agent()
        .wait_ready(Duration::from_secs(20))
        .expect("the agent did not become ready once OVSDB was back");
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    assert!(a.ping(b.ip()), "pod A -> B after OVSDB came back");
}
