//! Egress failover on three nodes, both dataplanes: seed 000's pool (VLAN 100) and Egress,
//! the agents' membership (SWIM over UDP 10351, `ferrea_agent::membership`) deciding who holds
//! the egress IP.
//!
//! - `holder_killed_*`: kill -9 the holder's agent. Within 2 s a packet from a selected pod
//!   leaves the new holder's fabric port tagged VLAN 100 with the egress IP as source, the new
//!   holder announced the IP with a gratuitous ARP tagged 100, selected pods on both
//!   survivors reach the external host as the egress IP and unselected ones keep their node's
//!   masquerade. Then the agent returns: it takes nothing during the damping period, takes
//!   its IP back once (make before break: new connections keep working; at most the one in
//!   flight at the switch fails), and afterwards only one
//!   MAC answers the gateway's ARP for the IP.
//! - `holder_link_cut_*`: the holder's link to the fabric is deleted (its veth in the
//!   fabric namespace); the same 2 s bound, measured end to end (a connection from a selected
//!   pod on a survivor that the external host sees from the egress IP).
//! - `flapping_node_moves_the_ip_at_most_twice`: the holder's agent is killed and restarted
//!   four times, faster than the damping period: the IP moves away once and back once.
//!
//! - `a_thousand_egresses_*`: 1,000 Egresses with 1,000 IPs of a pool on VLAN 200 (past the
//!   255 ids 8-bit marks allowed): every node agrees on each IP and holder, each IP is held by
//!   exactly one node (its address on that node's `ferrea-ext.200` only), the ids are unique,
//!   and killing one holder's agent moves only the IPs it held.
//!
//! Each prints the measured figures (`failover_ms`, `e2e_ms`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferrea_tests::capture::{Tcpdump, tcp_answer};
use ferrea_tests::egress::{
    EgressCluster, SETTLE, condition, egress_status, node_status, source_seen, wait_members,
    wait_source,
};
use ferrea_tests::{Dataplane, dataplane_tests, wait_for};

/// The bound.
const BOUND: Duration = Duration::from_secs(2);

dataplane_tests!(
    holder_killed_fails_over_within_2s_and_returns_without_flapping,
    holder_link_cut_fails_over_within_2s,
    flapping_node_moves_the_ip_at_most_twice,
    a_thousand_egresses_have_one_holder_each_and_a_failure_moves_only_its_own
);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The first packet's time (tcpdump `-tt`: Unix seconds) in `lines`.
fn first_ts(lines: &[String]) -> Option<f64> {
    lines
        .iter()
        .find_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
}

/// The node every survivor's status names as the holder, once it reports the IP assigned.
fn new_holder(s: &EgressCluster, old: usize) -> Option<usize> {
    let names: Vec<String> = (0..s.c.nodes().len())
        .filter(|&i| i != old)
        .map(|i| egress_status(&s.c.nodes()[i]).map(|st| st["egressNode"].to_string()))
        .collect::<Option<_>>()?;
    let first = names.first()?;
    if names.iter().any(|n| n != first) {
        return None;
    }
    let i =
        s.c.nodes()
            .iter()
            .position(|n| format!("\"{}\"", n.name()) == *first)?;
    (i != old && condition(&egress_status(&s.c.nodes()[i])?, "IPAssigned") == "True").then_some(i)
}

/// Connections from the selected pods of `nodes`, each with a 300 ms timeout, one after the
/// other per pod, until `stop`: (pod index, when it started, the source the listener saw).
fn probe(
    s: &EgressCluster,
    nodes: &[usize],
    stop: &AtomicBool,
    out: &Mutex<Vec<(usize, f64, Option<Ipv4Addr>)>>,
) {
    std::thread::scope(|sc| {
        for &i in nodes {
            let p = &s.selected[i];
            let addr: SocketAddr = s.listener.addr();
            sc.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let t = unix_now();
                    let seen = tcp_answer(p.ns(), addr, Duration::from_millis(300))
                        .ok()
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                        .and_then(|a| match a.ip() {
                            std::net::IpAddr::V4(ip) => Some(ip),
                            _ => None,
                        });
                    out.lock().unwrap().push((i, t, seen));
                    if seen.is_some() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            });
        }
    });
}

enum Failure {
    Kill,
    LinkCut,
}

/// Fails the holder, checks the failover and returns the cluster, the old and the new
/// holder.
fn fail_over(dp: Dataplane, how: Failure) -> (EgressCluster, usize, usize) {
    let mut s = EgressCluster::start_n(dp, 3).unwrap();
    let old = s.egress_node;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    for &i in &survivors {
        wait_source(&s.selected[i], &s.listener, s.ip, "before the failure");
    }
    let fabric = s.c.fabric().fabric();
    let mut caps: Vec<(usize, Tcpdump, Tcpdump)> = survivors
        .iter()
        .map(|&i| {
            let port = format!("n{}", i + 1);
            let data = Tcpdump::start_with(
                fabric,
                &port,
                &["-e", "-tt"],
                &format!("vlan 100 and src host {} and tcp", s.ip),
            )
            .unwrap();
            let arp =
                Tcpdump::start_with(fabric, &port, &["-e", "-tt"], "vlan 100 and arp").unwrap();
            (i, data, arp)
        })
        .collect();
    let stop = AtomicBool::new(false);
    let results = Mutex::new(Vec::new());
    let (t0, what) = std::thread::scope(|sc| {
        let s_ref = &s;
        let (stop, results) = (&stop, &results);
        let surv = survivors.clone();
        let h = sc.spawn(move || probe(s_ref, &surv, stop, results));
        std::thread::sleep(Duration::from_millis(500));
        let t0 = unix_now();
        let what = match how {
            Failure::Kill => {
                // The borrow of `s` by the prober is shared; the agent needs `&mut`: kill by PID.
                let pid = s_ref.c.nodes()[old].agent_pid().unwrap();
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .unwrap();
                "kill -9 of the holder's agent"
            }
            Failure::LinkCut => {
                fabric
                    .ip(&["link", "del", &format!("n{}", old + 1)])
                    .unwrap();
                "the holder's link cut"
            }
        };
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
        (t0, what)
    });
    if matches!(how, Failure::Kill) {
        // Reap the killed process (already dead).
        s.c.nodes_mut()[old].agent().kill9().unwrap();
    }
    let new = wait_for(SETTLE, || new_holder(&s, old)).unwrap_or_else(|| {
        panic!(
            "no new holder after {what}: {:?}",
            survivors
                .iter()
                .map(|&i| node_status(&s.c.nodes()[i]))
                .collect::<Vec<_>>()
        )
    });
    let (_, data, arp) = caps.iter_mut().find(|(i, _, _)| *i == new).unwrap();
    let data = data.stop();
    let arp = arp.stop();
    let first = first_ts(&data).unwrap_or_else(|| {
        panic!(
            "no packet from {} left node{} tagged 100: {data:?}",
            s.ip,
            new + 1
        )
    });
    let failover_ms = ((first - t0) * 1000.0).round() as i64;
    let remote = survivors.iter().copied().find(|&i| i != new).unwrap();
    // End to end: the first connection from the remote survivor's pod that started after the
    // failure and was seen from the egress IP, with none but egress-IP successes before.
    let e2e_ms = results
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, t, seen)| *i == remote && *t >= t0 && *seen == Some(s.ip))
        .map(|(_, t, _)| ((t - t0) * 1000.0).round() as i64)
        .find(|_| true);
    eprintln!(
        "failover ({what}, {dp}): failover_ms={failover_ms} (first packet tagged 100 from the new \
         holder node{}) e2e_ms={e2e_ms:?} (a connection from node{}'s selected pod)",
        new + 1,
        remote + 1
    );
    assert!(
        failover_ms <= BOUND.as_millis() as i64,
        "failover took {failover_ms} ms"
    );
    if matches!(how, Failure::LinkCut) {
        let e2e = e2e_ms.expect("no connection after the cut");
        assert!(e2e <= BOUND.as_millis() as i64, "end to end {e2e} ms");
    }
    assert!(
        arp.iter()
            .any(|l| l.contains("vlan 100") && l.contains(&format!("tell {}", s.ip))),
        "no gratuitous ARP tagged 100 for {} from node{}: {arp:?}",
        s.ip,
        new + 1
    );
    // Selected pods on both survivors leave as the egress IP; unselected keep masquerade.
    for &i in &survivors {
        wait_source(&s.selected[i], &s.listener, s.ip, "after the failover");
        assert_eq!(
            source_seen(&s.unselected[i], &s.listener),
            s.c.nodes()[i].ip(),
            "unselected pod on node{}",
            i + 1
        );
    }
    (s, old, new)
}

fn holder_killed_fails_over_within_2s_and_returns_without_flapping(dp: Dataplane) {
    let (mut s, old, new) = fail_over(dp, Failure::Kill);
    // The agent returns: damped for 3 s, then its IP comes back (rendezvous hashing ranks it
    // first), make before break.
    let remote = (0..3).find(|&i| i != old && i != new).unwrap();
    let stop = AtomicBool::new(false);
    let results = Mutex::new(Vec::new());
    s.c.nodes_mut()[old].agent().spawn().unwrap();
    let t0 = unix_now();
    let back = std::thread::scope(|sc| {
        let s_ref = &s;
        let (stop, results) = (&stop, &results);
        let h = sc.spawn(move || probe(s_ref, &[remote], stop, results));
        let back = wait_for(Duration::from_secs(20), || {
            let st = egress_status(&s_ref.c.nodes()[remote])?;
            (st["egressNode"] == s_ref.c.nodes()[old].name()).then(unix_now)
        });
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
        back
    })
    .expect("the IP did not come back to its node");
    let back_ms = ((back - t0) * 1000.0).round() as i64;
    eprintln!("returned node took its IP back {back_ms} ms after its agent started");
    assert!(
        back_ms >= 2500,
        "taken back before the damping period: {back_ms} ms"
    );
    // Make before break: around the handover no connection of the remote pod failed or left
    // with another source.
    let r = results.lock().unwrap();
    let around: Vec<_> = r
        .iter()
        .filter(|(_, t, _)| (back - 1.0..back + 2.0).contains(t))
        .collect();
    let failed: Vec<_> = around
        .iter()
        .filter(|(_, _, seen)| *seen != Some(s.ip))
        .collect();
    eprintln!(
        "handover: {} connections around it, {} not from the egress IP",
        around.len(),
        failed.len()
    );
    assert!(!around.is_empty());
    // A connection in flight at the switch can fail (its conntrack entry is on the interim
    // holder, and the gateway now sends its replies to the returned node); nothing later.
    // (Before the interim holder moved a releasing IP off its sub-interface, about one run in
    // four saw connections fail for up to 0.93 s after the switch: the interim holder's own
    // ARP requests to the gateway, sent with the IP it still had, took the gateway's entry
    // back from the returned node until that node's next gratuitous ARP, 1.1 s later.)
    let rel: Vec<i64> = failed
        .iter()
        .map(|(_, t, _)| ((t - back) * 1000.0).round() as i64)
        .collect();
    eprintln!("failed connections at {rel:?} ms from the status change");
    let bound = 400;
    assert!(
        rel.iter().all(|ms| *ms <= bound),
        "failed at {rel:?} ms from the switch (none may fail after {bound} ms): {failed:?}"
    );
    // Afterwards only the old node answers the gateway's ARP for the IP.
    let holder = &s.c.nodes()[old];
    let released = wait_for(SETTLE, || {
        let st = egress_status(holder)?;
        let interim = node_status(&s.c.nodes()[new]);
        (condition(&st, "IPAssigned") == "True"
            && interim["held"].as_array().is_some_and(|h| h.is_empty()))
        .then_some(())
    });
    assert!(released.is_some(), "{}", node_status(&s.c.nodes()[new]));
    let mut cap = Tcpdump::start_with(
        s.c.fabric().fabric(),
        "br0",
        &["-e"],
        &format!("vlan 100 and arp and src host {}", s.ip),
    )
    .unwrap();
    s.c.external().ip(&["neigh", "flush", "all"]).unwrap();
    wait_source(&s.selected[remote], &s.listener, s.ip, "after the handover");
    let lines = cap.stop();
    let macs: std::collections::BTreeSet<String> = lines
        .iter()
        .filter(|l| l.contains("is-at"))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect();
    assert_eq!(
        macs.len(),
        1,
        "ARP answers for {} from {macs:?}: {lines:?}",
        s.ip
    );
    wait_members(&s.c, &[0, 1, 2], SETTLE).unwrap();
}

fn holder_link_cut_fails_over_within_2s(dp: Dataplane) {
    let _ = fail_over(dp, Failure::LinkCut);
}

fn flapping_node_moves_the_ip_at_most_twice(dp: Dataplane) {
    let mut s = EgressCluster::start_n(dp, 3).unwrap();
    let old = s.egress_node;
    let watcher = (0..3).find(|&i| i != old).unwrap();
    let old_name = s.c.nodes()[old].name().to_owned();
    // The holder as the watcher's status view says, sampled every 50 ms by a thread of its own
    // (the test thread restarts the agent, which needs the cluster mutably).
    let file = s.c.nodes()[watcher]
        .dir()
        .join("state")
        .join("status")
        .join("egresses.json");
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let holders = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    let sampler = {
        let (stop, holders) = (stop.clone(), holders.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let h = std::fs::read(&file)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| {
                        v["items"].as_array()?.iter().find_map(|i| {
                            (i["metadata"]["name"] == ferrea_tests::egress::EGRESS)
                                .then(|| i["status"]["egressNode"].as_str().map(str::to_owned))?
                        })
                    });
                if let Some(h) = h {
                    let mut v = holders.lock().unwrap();
                    if v.last() != Some(&h) {
                        v.push(h);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let t = Instant::now();
    // Down 1.5 s (detected), up 1.5 s (less than the 3 s damping), four times.
    for _ in 0..4 {
        s.c.nodes_mut()[old].agent().kill9().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        s.c.nodes_mut()[old].agent().spawn().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
    }
    let back = wait_for(Duration::from_secs(20), || {
        let st = egress_status(&s.c.nodes()[watcher])?;
        (st["egressNode"] == old_name.as_str()).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let seen = holders.lock().unwrap().clone();
    eprintln!(
        "flapping for {:?}; holders seen in order: {seen:?}",
        t.elapsed()
    );
    assert!(back.is_some(), "the IP never came back: {seen:?}");
    // The original holder, another node, the original holder again: two moves.
    assert_eq!(seen.len(), 3, "the IP moved more than twice: {seen:?}");
    wait_source(
        &s.selected[watcher],
        &s.listener,
        s.ip,
        "after the flapping",
    );
}

const SCALE: usize = 1000;

fn scale_manifests() -> String {
    let mut out = String::from(
        "apiVersion: crd.antrea.io/v1beta1
kind: ExternalIPPool
metadata: {name: scale-pool}
spec:
  ipRanges: [{start: 10.173.0.1, end: 10.173.3.250}]
  subnetInfo: {gateway: 10.173.3.254, prefixLength: 22, vlan: 200}
  nodeSelector: {}
",
    );
    for i in 0..SCALE {
        out.push_str(&format!(
            "---
apiVersion: crd.antrea.io/v1beta1
kind: Egress
metadata: {{name: scale-{i:04}}}
spec:
  appliedTo: {{podSelector: {{matchLabels: {{app: scale-{i:04}}}}}}}
  externalIPPool: scale-pool
"
        ));
    }
    out
}

/// Each scale Egress's (IP, node) in `n`'s status view, once every one has both.
fn scale_view(
    n: &ferrea_tests::node::Node,
) -> Option<std::collections::BTreeMap<String, (String, String)>> {
    let p = n.dir().join("state").join("status").join("egresses.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    let m: std::collections::BTreeMap<String, (String, String)> = v["items"]
        .as_array()?
        .iter()
        .filter(|i| {
            i["metadata"]["name"]
                .as_str()
                .is_some_and(|x| x.starts_with("scale-"))
        })
        .filter_map(|i| {
            Some((
                i["metadata"]["name"].as_str()?.to_owned(),
                (
                    i["status"]["egressIP"].as_str()?.to_owned(),
                    i["status"]["egressNode"].as_str()?.to_owned(),
                ),
            ))
        })
        .collect();
    (m.len() == SCALE).then_some(m)
}

/// What `n` holds of the scale pool: (Egress, IP, id) from its node view, and the addresses on
/// its `ferrea-ext.200`.
fn scale_held(
    n: &ferrea_tests::node::Node,
) -> (
    Vec<(String, String, u64)>,
    std::collections::BTreeSet<String>,
) {
    let held = node_status(n)["held"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| {
            h["egress"]
                .as_str()
                .is_some_and(|x| x.starts_with("scale-"))
        })
        .filter_map(|h| {
            Some((
                h["egress"].as_str()?.to_owned(),
                h["ip"].as_str()?.to_owned(),
                h["id"].as_u64()?,
            ))
        })
        .collect();
    let addrs = n
        .ns()
        .ip(&["-4", "-o", "addr", "show", "dev", "ferrea-ext.200"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .split('/')
                .next()
                .map(str::to_owned)
        })
        .collect();
    (held, addrs)
}

/// Waits until the nodes `live` (by index) agree on every scale Egress and each holds exactly
/// its share, in its view and in the kernel; returns the agreed view.
fn scale_settled(
    s: &EgressCluster,
    live: &[usize],
    timeout: Duration,
) -> std::collections::BTreeMap<String, (String, String)> {
    let nodes = s.c.nodes();
    let r = wait_for(timeout, || {
        let first = scale_view(&nodes[live[0]])?;
        for &i in &live[1..] {
            if scale_view(&nodes[i])? != first {
                return None;
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        for &i in live {
            let name = nodes[i].name();
            let (held, addrs) = scale_held(&nodes[i]);
            let mine: std::collections::BTreeSet<String> = first
                .iter()
                .filter(|(_, (_, node))| node == name)
                .map(|(_, (ip, _))| ip.clone())
                .collect();
            let held_ips: std::collections::BTreeSet<String> =
                held.iter().map(|(_, ip, _)| ip.clone()).collect();
            if held_ips != mine || addrs != mine {
                return None;
            }
            ids.extend(held.iter().map(|(_, _, id)| *id));
        }
        let holders: std::collections::BTreeSet<&str> =
            first.values().map(|(_, n)| n.as_str()).collect();
        let live_names: std::collections::BTreeSet<&str> =
            live.iter().map(|&i| nodes[i].name()).collect();
        (ids.len() == SCALE && holders.is_subset(&live_names)).then_some(first)
    });
    r.unwrap_or_else(|| {
        let views: Vec<_> = live
            .iter()
            .map(|&i| {
                let (held, addrs) = scale_held(&nodes[i]);
                format!(
                    "{}: view {} Egresses, holds {} in its view and {} on ferrea-ext.200; problems {}",
                    nodes[i].name(),
                    scale_view(&nodes[i]).map_or(0, |v| v.len()),
                    held.len(),
                    addrs.len(),
                    node_status(&nodes[i])["problems"]
                )
            })
            .collect();
        panic!("the scale Egresses did not settle: {views:#?}")
    })
}

fn a_thousand_egresses_have_one_holder_each_and_a_failure_moves_only_its_own(dp: Dataplane) {
    let mut s = EgressCluster::start_n(dp, 3).unwrap();
    let t = Instant::now();
    ferrea_tests::egress::publish_all(&s.c, "scale.yaml", &scale_manifests());
    let before = scale_settled(&s, &[0, 1, 2], Duration::from_secs(60));
    eprintln!(
        "{SCALE} Egresses assigned and held in {} ms",
        t.elapsed().as_millis()
    );
    let ips: std::collections::BTreeSet<&String> = before.values().map(|(ip, _)| ip).collect();
    assert_eq!(ips.len(), SCALE, "an IP given twice");
    let share = |v: &std::collections::BTreeMap<String, (String, String)>, name: &str| {
        v.values().filter(|(_, n)| n == name).count()
    };
    for n in s.c.nodes() {
        eprintln!("{} holds {}", n.name(), share(&before, n.name()));
        assert!(share(&before, n.name()) > 0, "{} holds none", n.name());
    }
    // One holder's agent killed: the survivors take its IPs and nothing else moves.
    let dead = 2;
    let dead_name = s.c.nodes()[dead].name().to_owned();
    let t = Instant::now();
    s.c.nodes_mut()[dead].agent().kill9().unwrap();
    wait_members(&s.c, &[0, 1], SETTLE).unwrap();
    let after = scale_settled(&s, &[0, 1], Duration::from_secs(60));
    eprintln!(
        "the survivors hold every IP {} ms after the kill",
        t.elapsed().as_millis()
    );
    let mut moved = 0;
    for (name, (ip, node)) in &before {
        let (ip2, node2) = &after[name];
        assert_eq!(ip, ip2, "{name} changed its IP");
        if node == &dead_name {
            assert_ne!(node2, &dead_name, "{name}");
            moved += 1;
        } else {
            assert_eq!(node, node2, "{name} moved off a live node");
        }
    }
    eprintln!("{moved} IPs moved off {dead_name}, none other");
    s.c.nodes_mut()[dead].agent().spawn().unwrap();
}
