//! Crashes during a burst of pod churn, both dataplanes.
//!
//! A runtime-like driver keeps 100 pod slots busy with ADD and DEL from ten threads, as
//! kubelet and containerd would: an ADD that fails (the agent is down: try again later; or it
//! died mid-call) is followed by DEL until DEL succeeds, and a new ADD gets a new container ID.
//! Meanwhile the agent is killed with SIGKILL ten times at random moments and restarted (on
//! OVS every third kill takes `ovs-vswitchd` and every fifth `ovsdb-server` down with it).
//! At the end every slot whose last call was a successful ADD has its network with the
//! address that ADD returned, and nothing is left of any other: each kind of state is counted
//! (veths, routes, neighbours, nftables entries, dataplane entries, OVS ports, store records,
//! addresses) and must match the live pods exactly.

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferrea_tests::cni::{AddResult, Attachment, Cni};
use ferrea_tests::netns::NetNs;
use ferrea_tests::{Dataplane, NodeOptions, Pod, SimNode, ctl, dataplane_tests};

/// 125 addresses to hand out (a /25 less network, gateway and broadcast): 100 pods fit, and
/// the pool can be filled at the end to prove that no address leaked.
const POD_CIDR: &str = "10.244.1.0/25";
const POOL: usize = 125;
const SLOTS: usize = 100;
const THREADS: usize = 10;
const KILLS: usize = 10;

/// Where a slot stands, as the driver (the "runtime") knows it.
enum State {
    /// No attachment.
    Empty,
    /// The last call was a successful ADD.
    Added(AddResult),
    /// An ADD or DEL failed: DEL until it succeeds.
    NeedsDel,
}

struct Slot {
    ns: NetNs,
    att: Attachment,
    /// Bumped for every new ADD (a new sandbox, a new container ID).
    generation: u32,
    state: State,
}

impl Slot {
    fn new(i: usize) -> Slot {
        let ns = NetNs::new(&format!("c{i}")).unwrap();
        let att = Attachment::for_netns(ns.name());
        Slot {
            ns,
            att,
            generation: 0,
            state: State::Empty,
        }
    }

    /// One step of the runtime's life cycle for this slot.
    fn step(&mut self, cni: &Cni, calls: &Counters) {
        match &self.state {
            State::Empty => {
                self.generation += 1;
                self.att.container_id = format!("{}-g{}", self.ns.name(), self.generation);
                calls.adds.fetch_add(1, Ordering::Relaxed);
                let out = cni.add(&self.att).unwrap();
                self.state = match out.json.as_ref().filter(|_| out.ok()) {
                    Some(j) => State::Added(AddResult::parse(j).unwrap()),
                    None => {
                        calls.failure("ADD", &out);
                        State::NeedsDel
                    }
                };
            }
            State::Added(r) => {
                // Half of the pods stay for a while.
                if fastrand::bool() {
                    return;
                }
                let raw = r.raw.clone();
                self.del(cni, Some(&raw), calls);
            }
            State::NeedsDel => self.del(cni, None, calls),
        }
    }

    fn del(&mut self, cni: &Cni, prev: Option<&serde_json::Value>, calls: &Counters) {
        calls.dels.fetch_add(1, Ordering::Relaxed);
        let out = cni.del(&self.att, prev).unwrap();
        self.state = if out.ok() {
            State::Empty
        } else {
            calls.failure("DEL", &out);
            State::NeedsDel
        };
    }
}

#[derive(Default)]
struct Counters {
    adds: AtomicUsize,
    dels: AtomicUsize,
    failed: AtomicUsize,
    /// Failed calls by command, code and message (digits dropped), to print.
    reasons: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
}

impl Counters {
    fn failure(&self, cmd: &str, out: &ferrea_tests::cni::CniOutput) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let msg = out
            .json
            .as_ref()
            .and_then(|j| j["msg"].as_str().map(str::to_owned))
            .unwrap_or_else(|| out.stderr.clone());
        let msg: String = msg
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(90)
            .collect();
        let key = format!("{cmd} code {:?}: {msg}", out.code());
        *self.reasons.lock().unwrap().entry(key).or_default() += 1;
    }
}

/// Lines of `text` naming one of `ips` as a whole address.
fn naming(text: &str, ips: &BTreeSet<Ipv4Addr>) -> Vec<String> {
    text.lines()
        .filter(|l| {
            l.split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter_map(|w| w.parse::<Ipv4Addr>().ok())
                .any(|ip| ips.contains(&ip))
        })
        .map(str::to_owned)
        .collect()
}

dataplane_tests!(a_hundred_pods_churn_through_ten_agent_kills);

fn a_hundred_pods_churn_through_ten_agent_kills(dp: Dataplane) {
    let mut node = SimNode::start(NodeOptions::new(dp).pod_cidr(POD_CIDR)).unwrap();
    let cni = node.cni().clone();
    let slots: Vec<Slot> = (0..SLOTS).map(Slot::new).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(Counters::default());

    // The runtime: ten threads, ten slots each, steps in a random order and pace.
    let mut chunks: Vec<Vec<Slot>> = (0..THREADS).map(|_| Vec::new()).collect();
    for (i, s) in slots.into_iter().enumerate() {
        chunks[i % THREADS].push(s);
    }
    let workers: Vec<_> = chunks
        .into_iter()
        .map(|mut mine| {
            let (cni, stop, calls) = (cni.clone(), stop.clone(), calls.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = fastrand::usize(..mine.len());
                    mine[i].step(&cni, &calls);
                    std::thread::sleep(Duration::from_millis(fastrand::u64(5..60)));
                }
                mine
            })
        })
        .collect();

    // The crashes.
    let started = Instant::now();
    for k in 1..=KILLS {
        std::thread::sleep(Duration::from_millis(fastrand::u64(800..2500)));
        node.agent().kill9().unwrap();
        if dp == Dataplane::Ovs {
            let ovs = node.ovs().unwrap();
            if k % 5 == 0 {
                ovs.restart_ovsdb().unwrap();
            }
            if k % 3 == 0 {
                ovs.stop_vswitchd();
                ovs.start_vswitchd().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..400)));
        node.agent().restart().unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let mut slots: Vec<Slot> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("a driver thread panicked"))
        .collect();
    // What the runtime still owes: a DEL for every failed call (the agent is up now).
    for s in &mut slots {
        let mut tries = 0;
        while matches!(s.state, State::NeedsDel) {
            tries += 1;
            assert!(tries < 20, "DEL of {} keeps failing", s.att.container_id);
            s.del(&cni, None, &calls);
        }
    }
    println!(
        "{KILLS} kills in {:.1?}: {} ADDs, {} DELs, {} failed calls",
        started.elapsed(),
        calls.adds.load(Ordering::Relaxed),
        calls.dels.load(Ordering::Relaxed),
        calls.failed.load(Ordering::Relaxed)
    );

    for (reason, n) in calls.reasons.lock().unwrap().iter() {
        println!("  {n:5} x {reason}");
    }
    let live: Vec<(&Slot, &AddResult)> = slots
        .iter()
        .filter_map(|s| match &s.state {
            State::Added(r) => Some((s, r)),
            _ => None,
        })
        .collect();
    let live_ips: BTreeSet<Ipv4Addr> = live.iter().map(|(_, r)| r.ip).collect();
    assert_eq!(live_ips.len(), live.len(), "one address given to two pods");
    let pool: ipnetwork::Ipv4Network = POD_CIDR.parse().unwrap();
    // Every pod address that no live pod has (not the network, gateway or broadcast address,
    // which routes and rules name for other reasons).
    let gw = node.gateway();
    let gone: BTreeSet<Ipv4Addr> = pool
        .iter()
        .filter(|ip| ![pool.network(), gw, pool.broadcast()].contains(ip))
        .filter(|ip| !live_ips.contains(ip))
        .collect();
    println!("{} pods live at the end", live.len());

    // Every live pod has its network, with the address its ADD returned.
    for (s, r) in &live {
        let addr =
            s.ns.ip(&["-4", "-o", "addr", "show", "dev", "eth0"])
                .unwrap();
        assert!(
            addr.contains(&format!("{}/", r.ip)),
            "{}: eth0 has {addr}, ADD gave {}",
            s.att.container_id,
            r.ip
        );
        assert!(
            ferrea_tests::fabric::ping(s.ns.name(), gw),
            "{} ({}) cannot reach its gateway",
            s.att.container_id,
            r.ip
        );
        cni.check(&s.att, Some(&r.raw))
            .unwrap()
            .expect_ok("CHECK of a live pod")
            .unwrap();
    }
    let (a, b) = (live[0], live[live.len() - 1]);
    assert!(ferrea_tests::fabric::ping(a.0.ns.name(), b.1.ip));
    // The others have nothing in their namespace.
    for s in slots.iter().filter(|s| matches!(s.state, State::Empty)) {
        let links = s.ns.ip(&["-o", "link", "show"]).unwrap();
        assert!(
            !links.contains("eth0"),
            "{} was deleted but has {links}",
            s.att.container_id
        );
    }

    // Count every kind of state against the live pods.
    let want_veths: BTreeSet<String> = live.iter().map(|(_, r)| r.host_ifname.clone()).collect();
    let veths: BTreeSet<String> = node.pod_veths().unwrap().into_iter().collect();
    assert_eq!(
        veths.symmetric_difference(&want_veths).count(),
        0,
        "veths: leaked {:?}, missing {:?}",
        veths.difference(&want_veths).collect::<Vec<_>>(),
        want_veths.difference(&veths).collect::<Vec<_>>()
    );
    let leaked_routes = naming(&node.routes().unwrap(), &gone);
    assert_eq!(
        leaked_routes,
        Vec::<String>::new(),
        "routes of deleted pods"
    );
    let neigh = node
        .ns()
        .ip(&["neigh", "show", "nud", "permanent"])
        .unwrap();
    assert_eq!(
        naming(&neigh, &gone),
        Vec::<String>::new(),
        "neighbours of deleted pods"
    );
    let nft = node.nft_ruleset().unwrap();
    assert_eq!(
        naming(&nft, &gone),
        Vec::<String>::new(),
        "nftables entries of deleted pods"
    );
    let dump = ctl::ok(&node, &["dump", "dataplane"]).unwrap();
    let leaked_dp = naming(&dump, &gone);
    assert_eq!(
        leaked_dp,
        Vec::<String>::new(),
        "dataplane entries of deleted pods"
    );
    if dp == Dataplane::Ovs {
        let ovs = node.ovs().unwrap();
        let ports = ovs
            .vsctl(&[
                "--format=csv",
                "--no-headings",
                "--columns=name",
                "find",
                "Interface",
                "external_ids:ferrea-type=pod",
            ])
            .unwrap();
        let ports: BTreeSet<String> = ports
            .lines()
            .map(|l| l.trim_matches('"').to_owned())
            .collect();
        assert_eq!(ports, want_veths, "OVS pod ports");
    }

    // The store: a clean restart finds nothing to remove and knows exactly the live pods.
    let since = node.agent_log_len();
    node.agent().restart().unwrap();
    let log = node.agent_log_since(since);
    let reconciled = log
        .lines()
        .find(|l| l.contains(" reconciled kept="))
        .unwrap_or_else(|| panic!("no reconcile line:\n{log}"));
    assert!(
        reconciled.contains(&format!("kept={}", live.len()))
            && reconciled.contains("stale_records=[]")
            && reconciled.contains("orphan_links=[]")
            && reconciled.contains("orphan_dataplane=[]"),
        "{reconciled}"
    );
    let recorded = ctl::json(&node, &["get", "podinterface"]).unwrap();
    let recorded: BTreeSet<Ipv4Addr> = recorded
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ip"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(recorded, live_ips, "store records");

    // Addresses: the rest of the pool can be handed out, exactly.
    let mut fill: Vec<Pod> = Vec::new();
    loop {
        match Pod::try_add(node.cni(), "fill").unwrap() {
            Ok(p) => fill.push(p),
            Err(out) if out.stdout.contains("no free address left") => break,
            Err(out) => panic!("ADD {} while filling the pool: {out}", fill.len() + 1),
        }
        assert!(fill.len() <= POOL, "more addresses than the pool holds");
    }
    let got: HashSet<Ipv4Addr> = fill.iter().map(Pod::ip).collect();
    assert_eq!(
        fill.len(),
        POOL - live.len(),
        "addresses leaked: {} live pods, {} more could be added",
        live.len(),
        fill.len()
    );
    assert!(got.is_disjoint(&live_ips.iter().copied().collect()));
}
