//! A two-node cluster with seed 000's Egress applied, for the Egress tests and benchmark.
//!
//! The external host terminates VLAN 100 with the pool's gateway address ([`VlanGateway`])
//! and runs a TCP listener that reports each connection's source ([`TcpPeers`]). One pod
//! labelled `app: hello-world1` and one unselected pod run on each node.
//! [`EgressCluster::start`] returns once every node agrees on the egress IP and its holder
//! reports it assigned.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::capture::{TcpPeers, tcp_seen_source};
use crate::fabric::{INTERNET_IP, VlanGateway};
use crate::manifests as m;
use crate::node::Node;
use crate::pod::Pod;
use crate::{Cluster, Dataplane, NodeOptions, wait_for};

/// Seed 000's `ExternalIPPool`, verbatim.
pub const SEED_POOL: &str = include_str!("../../agent/testdata/seed000-pool.yaml");

/// Seed 000's `Egress`, verbatim.
pub const SEED_EGRESS: &str = include_str!("../../agent/testdata/seed000-egress.yaml");

/// The seed Egress's name.
pub const EGRESS: &str = "child-egress-hello-world1";
/// Labels the seed Egress selects.
pub const SELECTED: &[(&str, &str)] = &[("app", "hello-world1")];
/// Labels it does not select.
pub const OTHER: &[(&str, &str)] = &[("app", "other")];
/// How long a change may take to show (the issue: within a second; the files source polls
/// every 200 ms, so allow for a loaded CI machine).
pub const SETTLE: Duration = Duration::from_secs(10);

/// The cluster (see the module doc).
pub struct EgressCluster {
    /// A selected pod on each node, by node index.
    pub selected: Vec<Pod>,
    /// An unselected pod on each node, by node index.
    pub unselected: Vec<Pod>,
    /// The external host's TCP listener on [`INTERNET_IP`]:8090.
    pub listener: TcpPeers,
    /// The external host's end of VLAN 100.
    pub gw: VlanGateway,
    /// Index of the node holding the egress IP.
    pub egress_node: usize,
    /// Index of the other node.
    pub other_node: usize,
    /// The egress IP.
    pub ip: Ipv4Addr,
    /// The nodes, fabric and external host (declared last: dropped after the pods).
    pub c: Cluster,
}

/// Writes `file` into every node's source.
pub fn publish_all(c: &Cluster, file: &str, text: &str) {
    for n in c.nodes() {
        m::write_file(n, file, text).unwrap();
    }
}

/// Removes `file` from every node's source.
pub fn remove_all(c: &Cluster, file: &str) {
    for n in c.nodes() {
        let _ = m::remove(n, file);
    }
}

/// The seed Egress's `status` in `n`'s status view.
pub fn egress_status(n: &Node) -> Option<Value> {
    let p = n.dir().join("state").join("status").join("egresses.json");
    let v: Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    v["items"]
        .as_array()?
        .iter()
        .find(|i| i["metadata"]["name"] == EGRESS)
        .map(|i| i["status"].clone())
}

/// `n`'s `egress-node.json` view (Null if absent).
pub fn node_status(n: &Node) -> Value {
    let p = n
        .dir()
        .join("state")
        .join("status")
        .join("egress-node.json");
    std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// The `status` of condition `kind`.
pub fn condition(status: &Value, kind: &str) -> String {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|x| x["type"] == kind))
        .map(|x| x["status"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default()
}

/// The source the external listener saw for one connection from `p`.
pub fn source_seen(p: &Pod, l: &TcpPeers) -> Ipv4Addr {
    match tcp_seen_source(p.ns(), l.addr()).unwrap().ip() {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("IPv6 source {other}"),
    }
}

/// Waits until `p`'s connections arrive from `want`; panics naming `what` otherwise. Prints
/// how long it took (from the call: tests call it right after making a change).
pub fn wait_source(p: &Pod, l: &TcpPeers, want: Ipv4Addr, what: &str) {
    let t = std::time::Instant::now();
    let mut last = None;
    let ok = wait_for(SETTLE, || {
        let got = tcp_seen_source(p.ns(), l.addr()).ok().map(|a| a.ip());
        last = got;
        (got == Some(std::net::IpAddr::V4(want))).then_some(())
    });
    assert!(
        ok.is_some(),
        "{what}: pod {} should leave as {want}; the external host last saw {last:?}",
        p.ip()
    );
    eprintln!(
        "{what}: pod {} leaves as {want} after {:?}",
        p.ip(),
        t.elapsed()
    );
}

/// The policy rules ferrea's Egress made in `ns` (`proto 71`; this iproute2 does not filter
/// rules by protocol itself), one per line.
pub fn ferrea_rules(ns: &crate::netns::NetNs) -> anyhow::Result<String> {
    Ok(ns
        .ip(&["rule", "show"])?
        .lines()
        .filter(|l| l.contains("proto 71"))
        .map(|l| format!("{l}\n"))
        .collect())
}

impl EgressCluster {
    /// Builds the cluster for `dp` (see the module doc).
    pub fn start(dp: Dataplane) -> anyhow::Result<Self> {
        setup(dp, 2)
    }

    /// The same with `n` nodes (`other_node` is then the first node that does not hold).
    pub fn start_n(dp: Dataplane, n: usize) -> anyhow::Result<Self> {
        setup(dp, n)
    }
}

/// The nodes `n`'s membership view counts as eligible to hold egress IPs (from
/// `egress-node.json`), sorted.
pub fn eligible_members(n: &Node) -> Vec<String> {
    let v = node_status(n);
    let mut out: Vec<String> = v["membership"]["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|m| m["eligible"] == true)
                .filter_map(|m| m["node"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Waits until every node's membership counts exactly the nodes `want` (by index) eligible.
pub fn wait_members(c: &Cluster, want: &[usize], timeout: Duration) -> anyhow::Result<()> {
    let mut names: Vec<String> = want
        .iter()
        .map(|&i| c.nodes()[i].name().to_owned())
        .collect();
    names.sort();
    for &i in want {
        let n = &c.nodes()[i];
        let ok = wait_for(timeout, || (eligible_members(n) == names).then_some(()));
        anyhow::ensure!(
            ok.is_some(),
            "{} sees {:?} eligible, not {names:?}: {}",
            n.name(),
            eligible_members(n),
            node_status(n)["membership"]
        );
    }
    Ok(())
}

fn setup(dp: Dataplane, count: usize) -> anyhow::Result<EgressCluster> {
    let mut c = Cluster::new()?;
    for _ in 0..count {
        c.add_node(&NodeOptions::new(dp))?;
    }
    let gw = VlanGateway::start(c.external(), 100, "10.172.170.254/24".parse()?)
        .context("terminating VLAN 100 on the external host")?;
    let listener = TcpPeers::start(c.external(), SocketAddr::from((INTERNET_IP, 8090)))?;
    let (mut selected, mut unselected) = (Vec::new(), Vec::new());
    for n in c.nodes() {
        let p = n.add_pod()?;
        m::write_pod(n, &p.attachment().pod_name, SELECTED, &[])?;
        selected.push(p);
        let p = n.add_pod()?;
        m::write_pod(n, &p.attachment().pod_name, OTHER, &[])?;
        unselected.push(p);
    }
    publish_all(&c, "pool.yaml", SEED_POOL);
    publish_all(&c, "egress.yaml", SEED_EGRESS);
    // Every agent counts every node (after the damping of the last one to start).
    let all: Vec<usize> = (0..count).collect();
    wait_members(&c, &all, SETTLE)?;
    // Every node computes the same assignment; wait for the holder to report it assigned.
    let (egress_node, ip) = wait_for(SETTLE, || {
        let s = egress_status(&c.nodes()[0])?;
        let holder = s["egressNode"].as_str()?.to_owned();
        let ip: Ipv4Addr = s["egressIP"].as_str()?.parse().ok()?;
        let i = c.nodes().iter().position(|n| n.name() == holder)?;
        let hs = egress_status(&c.nodes()[i])?;
        (condition(&hs, "IPAssigned") == "True").then_some((i, ip))
    })
    .with_context(|| {
        format!(
            "no node reported the egress IP assigned: {:?} / {} / {}",
            egress_status(&c.nodes()[0]),
            node_status(&c.nodes()[0]),
            node_status(&c.nodes()[1])
        )
    })?;
    anyhow::ensure!(
        (1..=199).contains(&(u32::from(ip) - u32::from(Ipv4Addr::new(10, 172, 170, 0)))),
        "{ip} is not from the pool's range"
    );
    // Every node agrees.
    let holder = c.nodes()[egress_node].name().to_owned();
    for n in c.nodes() {
        let agree = wait_for(SETTLE, || {
            let s = egress_status(n)?;
            (s["egressIP"] == ip.to_string()
                && s["egressNode"] == holder.as_str()
                && condition(&s, "IPAllocated") == "True")
                .then_some(())
        });
        anyhow::ensure!(
            agree.is_some(),
            "{} disagrees: {:?}",
            n.name(),
            egress_status(n)
        );
    }
    Ok(EgressCluster {
        egress_node,
        other_node: if egress_node == 0 { 1 } else { 0 },
        c,
        gw,
        listener,
        ip,
        selected,
        unselected,
    })
}

/// How [`failover_trial`] fails the holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// kill -9 of the holder's agent.
    Kill,
    /// The holder's port on the fabric bridge set down (its link to the fabric cut).
    LinkDown,
}

/// One failover of the holder of the seed Egress's IP, measured: the time from the failure
/// to the first packet tagged VLAN 100 with the egress IP as source leaving the new holder's
/// fabric port (a selected pod on every survivor connecting every 20 ms meanwhile). Returns
/// (milliseconds, old holder, new holder). The cluster is left failed: see
/// [`restore_after`].
pub fn failover_trial(s: &mut EgressCluster, how: Failure) -> anyhow::Result<(u64, usize, usize)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let n = s.c.nodes().len();
    let old = s.egress_node;
    let survivors: Vec<usize> = (0..n).filter(|&i| i != old).collect();
    // Only the holder holds (a handover of the start or a previous trial is over).
    let settled = wait_for(SETTLE, || {
        survivors
            .iter()
            .all(|&i| {
                node_status(&s.c.nodes()[i])["held"]
                    .as_array()
                    .is_some_and(|h| h.is_empty())
            })
            .then_some(())
    });
    anyhow::ensure!(settled.is_some(), "another node still holds the egress IP");
    let fabric = s.c.fabric().fabric();
    let mut caps = Vec::new();
    for &i in &survivors {
        let cap = crate::capture::Tcpdump::start_with(
            fabric,
            &format!("n{}", i + 1),
            &["-tt"],
            &format!("vlan 100 and src host {} and tcp", s.ip),
        )?;
        caps.push((i, cap));
    }
    let stop = AtomicBool::new(false);
    let t0 = std::thread::scope(|sc| -> anyhow::Result<f64> {
        for &i in &survivors {
            let (p, addr, stop) = (&s.selected[i], s.listener.addr(), &stop);
            sc.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = crate::capture::tcp_answer(p.ns(), addr, Duration::from_millis(300));
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        std::thread::sleep(Duration::from_millis(300));
        let t0 = unix_secs();
        let r = match how {
            Failure::Kill => {
                let pid = s.c.nodes()[old].agent_pid().context("no agent")?;
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .map_err(anyhow::Error::from)
            }
            Failure::LinkDown => fabric
                .ip(&["link", "set", &format!("n{}", old + 1), "down"])
                .map(|_| ()),
        };
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        r.map(|()| t0)
    })?;
    let holder_of = |i: usize| egress_status(&s.c.nodes()[i]).map(|st| st["egressNode"].clone());
    let new = wait_for(SETTLE, || {
        let h = holder_of(survivors[0])?;
        let i = s.c.nodes().iter().position(|n| h == n.name())?;
        (i != old && survivors.iter().all(|&j| holder_of(j) == Some(h.clone()))).then_some(i)
    })
    .context("no new holder")?;
    let (_, cap) = caps.iter_mut().find(|(i, _)| *i == new).expect("captured");
    let lines = cap.stop();
    let first = lines
        .iter()
        .find_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .with_context(|| format!("no packet from {} left node{}", s.ip, new + 1))?;
    Ok((((first - t0) * 1000.0).max(0.0).round() as u64, old, new))
}

/// Undoes [`failover_trial`]'s failure of `old` and waits until it holds the IP again (after
/// the damping period and the handover) and every node agrees.
pub fn restore_after(s: &mut EgressCluster, old: usize, how: Failure) -> anyhow::Result<()> {
    match how {
        Failure::Kill => {
            s.c.nodes_mut()[old].agent().kill9()?;
            s.c.nodes_mut()[old].agent().spawn()?;
        }
        Failure::LinkDown => {
            s.c.fabric()
                .fabric()
                .ip(&["link", "set", &format!("n{}", old + 1), "up"])?;
        }
    }
    let name = s.c.nodes()[old].name().to_owned();
    let back = wait_for(Duration::from_secs(30), || {
        s.c.nodes()
            .iter()
            .all(|n| {
                egress_status(n).is_some_and(|st| st["egressNode"] == name.as_str())
                    && node_status(n)["held"]
                        .as_array()
                        .is_some_and(|h| (n.name() == name) != h.is_empty())
            })
            .then_some(())
    });
    anyhow::ensure!(back.is_some(), "{name} did not take its IP back");
    Ok(())
}

fn unix_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}
