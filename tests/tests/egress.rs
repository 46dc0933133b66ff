//! Egress end to end on a two-node cluster, both dataplanes: seed 000's `ExternalIPPool`
//! (VLAN 100, gateway 10.172.170.254) and `Egress` (pods labelled `app: hello-world1`) applied
//! verbatim. The external host terminates VLAN 100 with the pool's gateway address, the way a
//! node does (a macvlan whose frames BPF tags and untags: this kernel has no 802.1Q devices),
//! and its TCP listener reports the source address each connection arrived with.
//!
//! Checked: a selected pod on the egress node and one on the other node reach the outside
//! with the egress IP as source, in frames tagged 100 on the wire; an unselected pod keeps its
//! node's masquerade; label change, Egress and pool deletion fall back and clean the node;
//! `rp_filter` reset by an outsider is restored while traffic keeps flowing; an invalid pool
//! is reported and changes nothing; a restarted agent converges without duplicates and
//! removes what an Egress deleted meanwhile owned; `spec.bandwidth` limits the Egress's
//! traffic (TCP from a selected pod on either node within 10% of the rate) and nothing else.

use std::time::Duration;

use ferrea_tests::capture::Tcpdump;
use ferrea_tests::egress::{
    EgressCluster, OTHER, SEED_EGRESS, SELECTED, SETTLE, condition, egress_status, ferrea_rules,
    node_status, publish_all, remove_all, source_seen, wait_source,
};
use ferrea_tests::manifests as m;
use ferrea_tests::node::Node;
use ferrea_tests::{Dataplane, dataplane_tests, wait_for};
use serde_json::Value;

fn setup(dp: Dataplane) -> EgressCluster {
    EgressCluster::start(dp).unwrap()
}

dataplane_tests!(
    seed_manifests_give_selected_pods_the_egress_ip_on_vlan_100,
    changes_fall_back_to_masquerade_and_clean_the_node,
    rp_filter_drift_is_restored,
    invalid_pool_is_reported_and_changes_nothing,
    restart_reconciles_without_duplicates,
    the_ip_moves_with_the_node_selector,
    allocations_stay_while_other_egresses_come_and_go_and_across_restarts,
    bandwidth_limits_the_egress_traffic_of_every_selected_pod
);

fn seed_manifests_give_selected_pods_the_egress_ip_on_vlan_100(dp: Dataplane) {
    let s = setup(dp);
    let holder = &s.c.nodes()[s.egress_node];
    // Tagged frames on the holder's fabric port.
    let port = format!("n{}", s.egress_node + 1);
    let mut cap = Tcpdump::start_link_level(
        s.c.fabric().fabric(),
        &port,
        &format!("vlan 100 and src host {}", s.ip),
    )
    .unwrap();
    for (i, p) in s.selected.iter().enumerate() {
        wait_source(
            p,
            &s.listener,
            s.ip,
            &format!("selected pod on node {}", i + 1),
        );
    }
    let lines = cap.stop();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("vlan 100") && l.contains(&format!("{}.", s.ip))),
        "no frame tagged 100 from {} on {port}: {lines:?}",
        s.ip
    );
    // The unselected pod keeps its node's masquerade.
    for (i, p) in s.unselected.iter().enumerate() {
        assert_eq!(source_seen(p, &s.listener), s.c.nodes()[i].ip());
    }
    // The holder shows the sub-interface, the rule and the table.
    let links = holder
        .ns()
        .ip(&["-d", "link", "show", "ferrea-ext.100"])
        .unwrap();
    assert!(links.contains("ferrea: egress sub-interface"), "{links}");
    let rules = ferrea_rules(holder.ns()).unwrap();
    assert!(rules.contains("lookup 20100"), "{rules}");
    let table = holder
        .ns()
        .ip(&["route", "show", "table", "20100"])
        .unwrap();
    assert!(
        table.contains("default via 10.172.170.254 dev ferrea-ext.100"),
        "{table}"
    );
    // The other node holds nothing; its sub-interface is ready (the pool admits it), with no
    // address, so a failover to it needs no new device.
    let other = &s.c.nodes()[s.other_node];
    assert_eq!(
        other.links_with_prefix("ferrea-ext").unwrap(),
        vec!["ferrea-ext.100".to_owned()]
    );
    let addrs = other
        .ns()
        .ip(&["-4", "-o", "addr", "show", "dev", "ferrea-ext.100"])
        .unwrap();
    assert_eq!(addrs.trim(), "", "the standby sub-interface has an address");
    assert_eq!(ferrea_rules(other.ns()).unwrap().trim(), "");
}

fn changes_fall_back_to_masquerade_and_clean_the_node(dp: Dataplane) {
    let s = setup(dp);
    let holder = &s.c.nodes()[s.egress_node];
    let on_holder = &s.selected[s.egress_node];
    let on_other = &s.selected[s.other_node];
    wait_source(on_holder, &s.listener, s.ip, "before any change");
    wait_source(on_other, &s.listener, s.ip, "before any change");
    // The label no longer matches: masquerade again.
    m::write_pod(holder, &on_holder.attachment().pod_name, OTHER, &[]).unwrap();
    wait_source(
        on_holder,
        &s.listener,
        holder.ip(),
        "after the label changed",
    );
    m::write_pod(holder, &on_holder.attachment().pod_name, SELECTED, &[]).unwrap();
    wait_source(on_holder, &s.listener, s.ip, "after the label came back");
    // The Egress goes: both pods masquerade with their own node's address, the node is clean.
    remove_all(&s.c, "egress.yaml");
    wait_source(
        on_holder,
        &s.listener,
        holder.ip(),
        "after the Egress was deleted",
    );
    wait_source(
        on_other,
        &s.listener,
        s.c.nodes()[s.other_node].ip(),
        "after the Egress was deleted",
    );
    assert_clean(holder);
    // Back, then the pool goes: the Egress has no IP any more.
    publish_all(&s.c, "egress.yaml", SEED_EGRESS);
    wait_source(on_other, &s.listener, s.ip, "after the Egress came back");
    remove_all(&s.c, "pool.yaml");
    wait_source(
        on_other,
        &s.listener,
        s.c.nodes()[s.other_node].ip(),
        "after the pool was deleted",
    );
    assert_clean(holder);
    let st = egress_status(holder).unwrap();
    assert_eq!(condition(&st, "IPAllocated"), "False", "{st}");
}

/// The SNAT rules of Egress in a ruleset: every `snat to` but the core's rule for NATed
/// connections into the overlay (chain `tunnel_snat`, always there).
fn egress_snats(nft: &str) -> usize {
    nft.lines()
        .filter(|l| {
            l.contains("snat to")
                && !l.contains("into the overlay")
                && !l.contains("through the OVS bridge")
        })
        .count()
}

/// No sub-interface, rule, table route or SNAT rule of Egress is left on `n`.
fn assert_clean(n: &Node) {
    let clean = wait_for(SETTLE, || {
        let links = n.links_with_prefix("ferrea-ext").ok()?;
        let rules = ferrea_rules(n.ns()).ok()?;
        let routes = n
            .ns()
            .ip(&["route", "show", "table", "all", "proto", "71"])
            .ok()?;
        let nft = n.nft_ruleset().ok()?;
        (links.is_empty()
            && rules.trim().is_empty()
            && routes.trim().is_empty()
            && egress_snats(&nft) == 0)
            .then_some(())
    });
    assert!(
        clean.is_some(),
        "{} still has Egress state: links {:?}, rules {:?}, routes {:?}, nft {}",
        n.name(),
        n.links_with_prefix("ferrea-ext"),
        ferrea_rules(n.ns()),
        n.ns().ip(&["route", "show", "table", "all", "proto", "71"]),
        n.nft_ruleset().unwrap_or_default()
    );
}

fn rp_filter(n: &Node, ifname: &str) -> String {
    n.ns()
        .sh(&[
            "cat",
            &format!("/proc/sys/net/ipv4/conf/{ifname}/rp_filter"),
        ])
        .unwrap()
        .trim()
        .to_owned()
}

fn rp_filter_drift_is_restored(dp: Dataplane) {
    let s = setup(dp);
    let holder = &s.c.nodes()[s.egress_node];
    assert_eq!(rp_filter(holder, "ferrea-ext.100"), "2");
    assert_eq!(rp_filter(holder, "ferrea-gw0"), "2");
    let on_other = &s.selected[s.other_node];
    wait_source(on_other, &s.listener, s.ip, "before the reset");
    // An outsider (OpenShift's node tuning) sets strict mode.
    holder
        .ns()
        .sh(&[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/conf/ferrea-ext.100/rp_filter",
        ])
        .unwrap();
    let restored = wait_for(Duration::from_secs(5), || {
        (rp_filter(holder, "ferrea-ext.100") == "2").then_some(())
    });
    assert!(restored.is_some(), "rp_filter was not restored");
    // Operators see what ferrea wants and found, and how often it restored it.
    let ns = node_status(holder);
    let entry = ns["rpFilter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["interface"] == "ferrea-ext.100")
        .cloned()
        .unwrap_or_else(|| panic!("{ns}"));
    assert_eq!(entry["want"], "2", "{ns}");
    let counted = wait_for(SETTLE, || {
        let ns = node_status(holder);
        ns["rpFilter"]
            .as_array()?
            .iter()
            .any(|e| e["interface"] == "ferrea-ext.100" && e["restored"].as_u64() >= Some(1))
            .then_some(())
    });
    assert!(counted.is_some(), "{}", node_status(holder));
    wait_source(on_other, &s.listener, s.ip, "after the reset");
    wait_source(
        &s.selected[s.egress_node],
        &s.listener,
        s.ip,
        "after the reset",
    );
    // An outsider deletes the policy rule: the periodic resync (10 s) puts it back.
    holder
        .ns()
        .ip(&["rule", "del", "priority", "20100"])
        .unwrap();
    assert!(ferrea_rules(holder.ns()).unwrap().is_empty());
    let t = std::time::Instant::now();
    let back = wait_for(Duration::from_secs(15), || {
        ferrea_rules(holder.ns())
            .ok()
            .filter(|r| r.contains("lookup 20100"))
    });
    assert!(back.is_some(), "the deleted rule did not come back");
    eprintln!("deleted rule restored after {:?}", t.elapsed());
    wait_source(on_other, &s.listener, s.ip, "after the rule came back");
}

fn invalid_pool_is_reported_and_changes_nothing(dp: Dataplane) {
    let s = setup(dp);
    let holder = &s.c.nodes()[s.egress_node];
    let before_rules = ferrea_rules(holder.ns()).unwrap();
    let bad = "apiVersion: crd.antrea.io/v1beta1
kind: ExternalIPPool
metadata:
  name: broken
spec:
  ipRanges:
    - cidr: 10.9.9.0/24
  subnetInfo:
    gateway: 10.8.8.1
    prefixLength: 24
    vlan: 5000
";
    publish_all(&s.c, "broken.yaml", bad);
    let reported = wait_for(SETTLE, || {
        let ns = node_status(holder);
        let p = ns["problems"].as_array()?;
        p.iter()
            .filter_map(Value::as_str)
            .find(|p| p.contains("ExternalIPPool broken"))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no problem reported: {}", node_status(holder)));
    assert!(
        reported.contains("vlan") || reported.contains("gateway"),
        "the message names the field: {reported}"
    );
    // Nothing changed: same rules, traffic as before, no new sub-interface.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(ferrea_rules(holder.ns()).unwrap(), before_rules);
    assert_eq!(
        holder.links_with_prefix("ferrea-ext").unwrap(),
        vec!["ferrea-ext.100".to_owned()]
    );
    wait_source(
        &s.selected[s.other_node],
        &s.listener,
        s.ip,
        "with a broken pool around",
    );
}

fn restart_reconciles_without_duplicates(dp: Dataplane) {
    let mut s = setup(dp);
    let e = s.egress_node;
    wait_source(
        &s.selected[s.other_node],
        &s.listener,
        s.ip,
        "before the restart",
    );
    // kill -9 and start again: the same state, once.
    s.c.nodes_mut()[e].agent().kill9().unwrap();
    s.c.nodes_mut()[e].agent().restart().unwrap();
    // The other node held the IP meanwhile (membership); the restarted agent takes it back
    // after the damping period and the other lets go after the handover.
    let holder = &s.c.nodes()[e];
    let took = wait_for(SETTLE, || {
        let other = node_status(&s.c.nodes()[s.other_node]);
        other["held"]
            .as_array()
            .is_some_and(|h| !h.is_empty())
            .then_some(())
    });
    assert!(took.is_some(), "the other node never held the IP");
    let back = wait_for(SETTLE, || {
        let other = node_status(&s.c.nodes()[s.other_node]);
        (ferrea_rules(holder.ns()).ok()?.lines().count() == 1
            && other["held"].as_array().is_some_and(|h| h.is_empty()))
        .then_some(())
    });
    assert!(back.is_some(), "{:?}", egress_status(holder));
    wait_source(
        &s.selected[s.other_node],
        &s.listener,
        s.ip,
        "after the restart",
    );
    let rules = ferrea_rules(holder.ns()).unwrap();
    assert_eq!(rules.lines().count(), 1, "{rules}");
    let routes = holder
        .ns()
        .ip(&["route", "show", "table", "20100"])
        .unwrap();
    assert_eq!(routes.lines().count(), 2, "{routes}");
    let nft = holder.nft_ruleset().unwrap();
    assert_eq!(egress_snats(&nft), 1, "{nft}");
    // The Egress is deleted while the agent is down: its state goes at start.
    s.c.nodes_mut()[e].agent().kill9().unwrap();
    remove_all(&s.c, "egress.yaml");
    s.c.nodes_mut()[e].agent().restart().unwrap();
    assert_clean(&s.c.nodes()[e]);
}

/// The pool's `nodeSelector` (the seed's commented-out variant) admits only the node labelled
/// `network-role: egress-gateway`; moving the label moves the IP, its sub-interface and the
/// SNAT, and pods on both nodes follow.
fn the_ip_moves_with_the_node_selector(dp: Dataplane) {
    let s = setup(dp);
    let (a, b) = (s.egress_node, s.other_node);
    let pool = ferrea_tests::egress::SEED_POOL.replace(
        "  nodeSelector: {}\n",
        "  nodeSelector:\n    matchLabels:\n      network-role: egress-gateway\n",
    );
    let role = [("network-role", "egress-gateway")];
    // Label the current holder first, then narrow the pool: nothing moves.
    s.c.label_node(a, &role).unwrap();
    publish_all(&s.c, "pool.yaml", &pool);
    wait_source(
        &s.selected[b],
        &s.listener,
        s.ip,
        "with the holder labelled",
    );
    // Move the label: the other node takes the IP.
    let t = std::time::Instant::now();
    s.c.label_node(a, &[]).unwrap();
    s.c.label_node(b, &role).unwrap();
    let moved = wait_for(SETTLE, || {
        let st = egress_status(&s.c.nodes()[b])?;
        (st["egressNode"] == s.c.nodes()[b].name() && condition(&st, "IPAssigned") == "True")
            .then_some(())
    });
    assert!(
        moved.is_some(),
        "the IP did not move: {:?}",
        egress_status(&s.c.nodes()[b])
    );
    wait_source(
        &s.selected[a],
        &s.listener,
        s.ip,
        "after the move, from the old holder",
    );
    wait_source(
        &s.selected[b],
        &s.listener,
        s.ip,
        "after the move, on the new holder",
    );
    eprintln!("egress IP moved and both pods served in {:?}", t.elapsed());
    let old = &s.c.nodes()[a];
    let gone = wait_for(SETTLE, || {
        old.links_with_prefix("ferrea-ext")
            .ok()?
            .is_empty()
            .then_some(())
    });
    assert!(gone.is_some(), "the old holder kept its sub-interface");
    assert_eq!(egress_snats(&old.nft_ruleset().unwrap()), 0);
    assert!(
        s.c.nodes()[b]
            .links_with_prefix("ferrea-ext")
            .unwrap()
            .contains(&"ferrea-ext.100".to_owned())
    );
}

/// An Egress like the seed's, named `name`, selecting `app: <name>`.
fn other_egress(name: &str) -> String {
    SEED_EGRESS
        .replace("name: child-egress-hello-world1", &format!("name: {name}"))
        .replace("app: hello-world1", &format!("app: {name}"))
}

/// Every Egress's `status.egressIP` in `n`'s view, by name.
fn all_ips(n: &Node) -> std::collections::BTreeMap<String, String> {
    let p = n.dir().join("state").join("status").join("egresses.json");
    let v: Value = std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            Some((
                i["metadata"]["name"].as_str()?.to_owned(),
                i["status"]["egressIP"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// A name sorting before the seed Egress's whose hash lands on the seed's IP: without
/// recorded allocations, adding it would take the seed's IP (the files source has no
/// timestamps, so Egresses are served by name).
fn thief_name() -> String {
    use ferrea_agent::controllers::egress::assign::assign;
    use ferrea_agent::source::crd::{parse_egress, parse_pool};
    let y = |t: &str| serde_yaml_ng::from_str::<Value>(t).unwrap();
    let pool = parse_pool(&y(ferrea_tests::egress::SEED_POOL)).unwrap();
    let pools = [(pool.name.clone(), pool)].into_iter().collect();
    let seed = parse_egress(&y(SEED_EGRESS)).unwrap();
    let alone = assign(std::slice::from_ref(&seed), &pools, &[])[&seed.name].ip;
    (0..100_000)
        .map(|i| format!("a-thief-{i}"))
        .find(|n| {
            let t = parse_egress(&y(&other_egress(n))).unwrap();
            assign(&[seed.clone(), t], &pools, &[])[&seed.name].ip != alone
        })
        .expect("a colliding name")
}

fn allocations_stay_while_other_egresses_come_and_go_and_across_restarts(dp: Dataplane) {
    let mut s = setup(dp);
    let ip = s.ip.to_string();
    let thief = thief_name();
    eprintln!("{thief} would take {ip} without recorded allocations");
    let settle_on = |s: &EgressCluster, names: &[&str]| {
        for n in s.c.nodes() {
            let ok = wait_for(SETTLE, || {
                let ips = all_ips(n);
                names.iter().all(|x| ips.contains_key(*x)).then_some(ips)
            });
            let ips = ok.unwrap_or_else(|| panic!("{}: {:?}", n.name(), all_ips(n)));
            assert_eq!(
                ips.get(ferrea_tests::egress::EGRESS),
                Some(&ip),
                "the seed Egress moved on {}: {ips:?}",
                n.name()
            );
        }
    };
    // Names before and after the seed's, added and deleted.
    publish_all(&s.c, "thief.yaml", &other_egress(&thief));
    publish_all(&s.c, "zzz.yaml", &other_egress("zzz-last"));
    settle_on(&s, &[&thief, "zzz-last"]);
    let before = all_ips(&s.c.nodes()[0]);
    remove_all(&s.c, "zzz.yaml");
    publish_all(&s.c, "aaa.yaml", &other_egress("aaa-first"));
    settle_on(&s, &[&thief, "aaa-first"]);
    let now = all_ips(&s.c.nodes()[0]);
    assert_eq!(now[&thief], before[&thief], "{thief} moved");
    wait_source(
        &s.selected[s.other_node],
        &s.listener,
        s.ip,
        "with other Egresses around",
    );
    // Every agent restarts (kill -9), one after the other, then all at once: every IP stays
    // and the selected pod on the other node is served. (All at once with OVS black-holed the
    // overlay once: the egress sub-interface answered ARP for its node's transport address,
    // OVS's tunnel neighbour cache kept that MAC and the sub-interface was re-created with
    // another; the sub-interface now answers ARP only for its own IPs.)
    let all = all_ips(&s.c.nodes()[0]);
    let kept = |s: &EgressCluster, what: &str| {
        for n in s.c.nodes() {
            let same = wait_for(SETTLE, || (all_ips(n) == all).then_some(()));
            assert!(same.is_some(), "{}: {:?} != {all:?}", n.name(), all_ips(n));
        }
        wait_source(&s.selected[s.other_node], &s.listener, s.ip, what);
    };
    for i in 0..s.c.nodes().len() {
        s.c.nodes_mut()[i].agent().kill9().unwrap();
        s.c.nodes_mut()[i].agent().restart().unwrap();
        kept(&s, "after a restart");
    }
    for i in 0..s.c.nodes().len() {
        s.c.nodes_mut()[i].agent().kill9().unwrap();
    }
    for i in 0..s.c.nodes().len() {
        s.c.nodes_mut()[i].agent().restart().unwrap();
    }
    // Past the damping period, so the IPs went through their holders' restarts.
    std::thread::sleep(Duration::from_secs(4));
    kept(&s, "after all agents restarted at once");
}

/// TCP throughput from `p` to the external host's iperf3 server, bits per second as the
/// receiver counted them over a 4 s run.
fn throughput_out(s: &EgressCluster, p: &ferrea_tests::pod::Pod) -> f64 {
    let v = ferrea_tests::traffic::iperf3(
        s.c.external(),
        ferrea_tests::fabric::INTERNET_IP,
        p.ns(),
        &["-t", "4"],
    )
    .unwrap_or_else(|e| panic!("iperf3 from {}: {e:#}", p.ip()));
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
}

fn bandwidth_limits_the_egress_traffic_of_every_selected_pod(dp: Dataplane) {
    let s = setup(dp);
    const RATE: f64 = 20e6;
    let limited = format!("{SEED_EGRESS}  bandwidth:\n    rate: 20M\n    burst: 200k\n");
    publish_all(&s.c, "egress.yaml", &limited);
    let holder = &s.c.nodes()[s.egress_node];
    let class = wait_for(SETTLE, || {
        let out = holder
            .ns()
            .sh(&["tc", "class", "show", "dev", "ferrea-ext.100"])
            .ok()?;
        out.contains("rate 20Mbit").then_some(out)
    });
    assert!(
        class.is_some(),
        "no 20 Mbit class on the holder's ferrea-ext.100"
    );
    // A selected pod on each node (the other node's traffic is tunnelled to the holder and
    // shaped there), still leaving with the egress IP.
    for (i, p) in s.selected.iter().enumerate() {
        wait_source(p, &s.listener, s.ip, "with a bandwidth");
        let bps = throughput_out(&s, p);
        eprintln!(
            "selected pod on node {}: {:.2} Mbit/s (rate 20 Mbit/s)",
            i + 1,
            bps / 1e6
        );
        assert!(
            (bps - RATE).abs() <= RATE * 0.1,
            "selected pod on node {}: {:.2} Mbit/s, not within 10% of 20 Mbit/s",
            i + 1,
            bps / 1e6
        );
    }
    // An unselected pod on the holder leaves by the same transport unshaped.
    let free = throughput_out(&s, &s.unselected[s.egress_node]);
    eprintln!("unselected pod on the holder: {:.2} Mbit/s", free / 1e6);
    assert!(
        free > RATE * 3.0,
        "the unselected pod was limited too: {free}"
    );
    // The bandwidth removed: the class goes and the selected pod is no longer limited.
    publish_all(&s.c, "egress.yaml", SEED_EGRESS);
    let gone = wait_for(SETTLE, || {
        let out = holder
            .ns()
            .sh(&["tc", "qdisc", "show", "dev", "ferrea-ext.100"])
            .ok()?;
        (!out.contains("htb")).then_some(())
    });
    assert!(gone.is_some(), "ferrea's qdisc stayed on ferrea-ext.100");
    let after = throughput_out(&s, &s.selected[s.egress_node]);
    assert!(
        after > RATE * 3.0,
        "still limited after the bandwidth was removed: {after}"
    );
}
