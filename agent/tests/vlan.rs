//! Privileged integration test of the VLAN tagger ([`VlanTagger`]): two hosts whose macvlan
//! children act as 802.1Q sub-interfaces for VLAN 100 across a bridge, with the tags proven on
//! the wire by `tcpdump -e` on a bridge port.
//!
//! Topology (all namespaces made here, deleted on drop, also on failure):
//! `A.eth0` — `pa` [bridge `br0` in namespace BR] `pb` — `B.eth0`. A and B each have a macvlan
//! `ext100` on `eth0` (10.99.0.2/24 and 10.99.0.1/24) tagged for VLAN 100, and plain untagged
//! addresses on `eth0` (10.98.0.2/24, 10.98.0.1/24). The tagger of each host lives on a thread
//! in that host's namespace ([`Host`]), as it would in an agent.
//!
//! Needs root; without it the test prints `SKIP: <reason>` and passes.

use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::thread::JoinHandle;

use ferrea_agent::kernel::vlan::{VLAN_TC_PRIORITY, VlanSub, VlanTagger};
use ferrea_tests::capture::Tcpdump;
use ferrea_tests::fabric::ping;
use ferrea_tests::netns::{NetNs, tc_filters};
use ferrea_tests::skip_unless_root;

type Job = Box<dyn FnOnce(&mut Option<VlanTagger>) + Send>;

/// A host namespace with a thread inside it that owns the host's tagger (if loaded).
struct Host {
    ns: NetNs,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Host {
    fn new(role: &str) -> Host {
        let ns = NetNs::new(role).unwrap();
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = ns.spawn(move || {
            let mut tagger = None;
            for job in rx {
                job(&mut tagger);
            }
        });
        Host {
            ns,
            jobs: Some(tx),
            thread: Some(thread),
        }
    }

    /// Runs `f` with the host's tagger slot on its thread, in its namespace.
    fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Option<VlanTagger>) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .unwrap()
            .send(Box::new(move |t| {
                let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                    || f(t),
                )));
            }))
            .unwrap();
        match rx.recv().expect("host thread died") {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// Loads a tagger (replacing the host's current one, as a restarted agent would).
    fn load(&self) {
        self.with(|t| *t = Some(VlanTagger::load().unwrap()));
    }

    fn attach(&self, parent: &'static str, child: &'static str, vid: u16) {
        self.with(move |t| t.as_mut().unwrap().attach(parent, child, vid).unwrap());
    }

    fn name(&self) -> &str {
        self.ns.name()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The tagger's filters at one hook of an interface (`tc filter show` lines at its priority).
fn tagger_filters(ns: &str, ifname: &str, hook: &str) -> Vec<String> {
    tc_filters(ns, ifname, hook)
        .into_iter()
        .filter(|l| l.contains(&format!("pref {VLAN_TC_PRIORITY} ")) && l.contains("direct-action"))
        .collect()
}

/// A-side and B-side hosts on a bridge, each with `ext100` (not yet tagged).
struct Lab {
    a: Host,
    b: Host,
    br: NetNs,
}

fn lab() -> Lab {
    let br = NetNs::new("vlbr").unwrap();
    br.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    br.ip(&["link", "set", "br0", "up"]).unwrap();
    let a = Host::new("vla");
    let b = Host::new("vlb");
    for (h, port, n) in [(&a, "pa", 2), (&b, "pb", 1)] {
        h.ns.add_veth("eth0", &br, port).unwrap();
        br.ip(&["link", "set", port, "master", "br0", "up"])
            .unwrap();
        h.ns.ip(&["link", "set", "eth0", "up"]).unwrap();
        h.ns.ip(&["addr", "add", &format!("10.98.0.{n}/24"), "dev", "eth0"])
            .unwrap();
        h.ns.ip(&[
            "link", "add", "ext100", "link", "eth0", "type", "macvlan", "mode", "bridge",
        ])
        .unwrap();
        h.ns.ip(&["addr", "add", &format!("10.99.0.{n}/24"), "dev", "ext100"])
            .unwrap();
        h.ns.ip(&["link", "set", "ext100", "up"]).unwrap();
    }
    Lab { a, b, br }
}

#[test]
fn vlan_tagger_sub_interface() {
    if !skip_unless_root("vlan_tagger_sub_interface") {
        return;
    }
    let l = lab();
    let (a, b) = (&l.a, &l.b);
    // Without the tagger the macvlans talk untagged: the capture below must see the tags.
    for h in [a, b] {
        h.load();
        h.attach("eth0", "ext100", 100);
        // Idempotent: a second attach leaves one filter per hook.
        h.attach("eth0", "ext100", 100);
        assert_eq!(tagger_filters(h.name(), "eth0", "ingress").len(), 1);
        assert_eq!(tagger_filters(h.name(), "ext100", "egress").len(), 1);
    }

    let mut cap = Tcpdump::start_link_level(&l.br, "pa", "").unwrap();
    assert!(
        ping(a.name(), Ipv4Addr::new(10, 99, 0, 1)),
        "A.ext100 cannot ping B.ext100"
    );
    assert!(
        ping(b.name(), Ipv4Addr::new(10, 99, 0, 2)),
        "B.ext100 cannot ping A.ext100"
    );
    let lines = cap.stop();
    println!("on the wire from A:\n{}", lines.join("\n"));
    let from_a = |what: &str| -> Vec<&String> {
        lines
            .iter()
            .filter(|x| x.contains(what) && x.contains("10.99.0.2"))
            .collect()
    };
    let icmp = from_a("ICMP");
    let arp = from_a("ARP");
    assert!(!icmp.is_empty(), "no ICMP from A on the wire: {lines:#?}");
    assert!(!arp.is_empty(), "no ARP from A on the wire: {lines:#?}");
    for x in icmp.iter().chain(arp.iter()) {
        assert!(x.contains("vlan 100"), "untagged frame of ext100: {x}");
    }

    // Untagged traffic of the parents is untouched.
    assert!(
        ping(a.name(), Ipv4Addr::new(10, 98, 0, 1)),
        "untagged A.eth0 -> B.eth0 broke"
    );

    // A frame tagged with VLAN 200 is not delivered to A's child: B gets a VLAN 200 child in
    // 10.99.2.0/24 and A's ext100 an address there too. Had A's tagger handed VLAN 200 to
    // ext100, A would answer B's ARP (tagged 100, on the wire from A).
    b.ns.ip(&[
        "link", "add", "ext200", "link", "eth0", "type", "macvlan", "mode", "bridge",
    ])
    .unwrap();
    b.ns.ip(&["addr", "add", "10.99.2.1/24", "dev", "ext200"])
        .unwrap();
    b.ns.ip(&["link", "set", "ext200", "up"]).unwrap();
    b.attach("eth0", "ext200", 200);
    a.ns.ip(&["addr", "add", "10.99.2.2/24", "dev", "ext100"])
        .unwrap();
    let mut cap = Tcpdump::start_link_level(&l.br, "pa", "arp or icmp").unwrap();
    let mut cap_b = Tcpdump::start_link_level(&l.br, "pb", "arp or icmp").unwrap();
    assert!(
        !ping(b.name(), Ipv4Addr::new(10, 99, 2, 2)),
        "VLAN 200 reached A's VLAN 100 child"
    );
    let lines = cap.stop();
    let lines_b = cap_b.stop();
    assert!(
        lines_b
            .iter()
            .any(|x| x.contains("vlan 200") && x.contains("10.99.2.2")),
        "B sent no VLAN 200 ARP: {lines_b:#?}"
    );
    assert!(
        !lines.iter().any(|x| x.contains("10.99.2.2")),
        "A answered for its VLAN 100 child on VLAN 200: {lines:#?}"
    );
    // Still fine on VLAN 100 with two VLANs on B's parent.
    assert!(ping(a.name(), Ipv4Addr::new(10, 99, 0, 1)));

    // Detach on A: its parent's filter goes (B's two VLANs still need B's), and VLAN 100
    // between A and B stops.
    a.with(|t| t.as_mut().unwrap().detach("eth0", 100).unwrap());
    assert!(tagger_filters(a.name(), "eth0", "ingress").is_empty());
    assert!(
        !ping(a.name(), Ipv4Addr::new(10, 99, 0, 1)),
        "VLAN 100 still works after detach"
    );
    // Detaching again is fine; untagged traffic still works.
    a.with(|t| t.as_mut().unwrap().detach("eth0", 100).unwrap());
    assert!(ping(a.name(), Ipv4Addr::new(10, 98, 0, 1)));
    b.with(|t| t.as_mut().unwrap().detach("eth0", 200).unwrap());
    assert_eq!(
        tagger_filters(b.name(), "eth0", "ingress").len(),
        1,
        "B's parent lost its filter while VLAN 100 is still attached"
    );
    drop(l);
}

#[test]
fn vlan_tagger_restart() {
    if !skip_unless_root("vlan_tagger_restart") {
        return;
    }
    let l = lab();
    let (a, b) = (&l.a, &l.b);
    for h in [a, b] {
        h.load();
        h.attach("eth0", "ext100", 100);
    }
    // Another program's filter on A's parent, at another priority: never touched. (Classic
    // BPF returning 0, "no match": this kernel has cls_bpf but no matchall or u32 actions.)
    a.ns.sh(&[
        "tc",
        "filter",
        "add",
        "dev",
        "eth0",
        "ingress",
        "pref",
        "100",
        "protocol",
        "all",
        "bpf",
        "bytecode",
        "1,6 0 0 0,",
    ])
    .expect("adding a foreign filter");
    let foreign = |h: &Host| {
        tc_filters(h.name(), "eth0", "ingress")
            .iter()
            .filter(|x| x.contains("pref 100 "))
            .count()
    };
    let foreign_before = foreign(a);
    assert!(foreign_before > 0);

    // The agent dies: tagging goes on without it.
    a.with(|t| *t = None);
    assert!(
        ping(a.name(), Ipv4Addr::new(10, 99, 0, 1)),
        "tagging stopped with the process"
    );

    // A new process: fresh programs and empty maps, attach again. One filter per hook.
    a.load();
    a.attach("eth0", "ext100", 100);
    assert_eq!(tagger_filters(a.name(), "eth0", "ingress").len(), 1);
    assert_eq!(tagger_filters(a.name(), "ext100", "egress").len(), 1);
    assert!(
        ping(a.name(), Ipv4Addr::new(10, 99, 0, 1)),
        "VLAN 100 broke after restart"
    );

    // Again through sync (the restart path that fills every map entry first).
    a.load();
    a.with(|t| {
        t.as_mut()
            .unwrap()
            .sync(&[VlanSub {
                parent: "eth0".into(),
                child: "ext100".into(),
                vid: 100,
            }])
            .unwrap()
    });
    assert_eq!(tagger_filters(a.name(), "eth0", "ingress").len(), 1);
    assert_eq!(tagger_filters(a.name(), "ext100", "egress").len(), 1);
    assert!(
        ping(a.name(), Ipv4Addr::new(10, 99, 0, 1)),
        "VLAN 100 broke after sync"
    );

    // The VLAN went while no agent ran: a new process that keeps nothing removes the
    // tagger's filters it never attached itself, and no other filter.
    a.load();
    a.with(|t| t.as_mut().unwrap().detach_all_except(&[]).unwrap());
    assert!(tagger_filters(a.name(), "eth0", "ingress").is_empty());
    assert!(tagger_filters(a.name(), "ext100", "egress").is_empty());
    assert_eq!(foreign(a), foreign_before, "a foreign filter was removed");
    assert!(
        !ping(a.name(), Ipv4Addr::new(10, 99, 0, 1)),
        "VLAN 100 still tagged after cleanup"
    );
    assert!(ping(a.name(), Ipv4Addr::new(10, 98, 0, 1)));
    drop(l);
}
