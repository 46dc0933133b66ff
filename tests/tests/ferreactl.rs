//! `ferreactl` against running simulated nodes, both dataplanes: every command's answer is
//! compared with what the node really holds (the IP and MAC a pod got from CNI ADD, the host
//! veth, the other node's address and pod CIDR, the node an Egress IP is on, the node port
//! an NPL annotation names), in `-o json` and in the table. The debug socket refuses
//! non-root clients, by file mode and by `SO_PEERCRED`; a killed agent gives a message that
//! says so.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use ferrea_tests::ctl;
use ferrea_tests::egress::{EgressCluster, condition, egress_status};
use ferrea_tests::manifests::{self as m, ContainerPort, ServicePort};
use ferrea_tests::{Dataplane, NodeOptions, Pod, SimNode, dataplane_tests, wait_for};
use serde_json::Value;

/// `nobody` on Debian.
const NOBODY: u32 = 65534;

dataplane_tests!(
    agentinfo_podinterface_and_dump_show_the_node,
    log_level_and_supportbundle,
    remotenodes_and_egress_views,
    nodeportlocal_mappings_point_at_the_pod,
    non_root_clients_are_refused,
    a_killed_agent_is_named,
    readiness_and_why_not_while_starting,
);

/// The completion scripts need no agent.
#[test]
fn completion_scripts_name_the_commands() {
    for (shell, needle) in [
        ("bash", "_ferreactl"),
        ("zsh", "#compdef ferreactl"),
        ("fish", "complete -c ferreactl"),
    ] {
        let out = std::process::Command::new(ferrea_tests::bin("ferreactl"))
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(needle), "{shell}: no {needle:?}");
        assert!(
            text.contains("podinterface") && text.contains("supportbundle"),
            "{shell}"
        );
    }
}

/// The item of a JSON list whose `key` is `value`.
fn find<'a>(items: &'a Value, key: &str, value: &str) -> &'a Value {
    items
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {items}"))
        .iter()
        .find(|i| i[key] == value)
        .unwrap_or_else(|| panic!("no item with {key} = {value} in {items:#}"))
}

/// The MAC of `eth0` inside the pod, as the kernel reports it.
fn pod_mac(p: &Pod) -> String {
    let out = p.exec(&["cat", "/sys/class/net/eth0/address"]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn agentinfo_podinterface_and_dump_show_the_node(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    // Traffic through the dataplane, for the counters.
    assert!(a.ping(b.ip()), "pod to pod");
    assert!(
        a.ping(node.gateway()),
        "pod to its gateway (answered by the node's stack)"
    );

    // agentinfo, JSON and table.
    let info = ctl::json(&node, &["get", "agentinfo"]).unwrap();
    assert_eq!(info["nodeName"], node.name());
    assert_eq!(info["dataplane"], dp.as_str());
    assert_eq!(info["podCIDR"], node.pod_cidr());
    assert_eq!(info["gateway"], node.gateway().to_string());
    assert_eq!(info["nodeIP"], node.ip().to_string());
    assert_eq!(info["source"], "files");
    assert_eq!(info["sourceSynced"], true);
    assert_eq!(info["ready"], true);
    assert_eq!(info["localPods"], 2);
    assert!(info["transportMTU"].as_u64().unwrap() >= 1280, "{info}");
    assert!(info["tunnel"].as_str().unwrap().contains("vxlan"), "{info}");
    let table_text = ctl::ok(&node, &["get", "agentinfo"]).unwrap();
    eprintln!("$ ferreactl get agentinfo\n{table_text}");
    let table = ctl::table(&table_text);
    let field = |f: &str| {
        table
            .iter()
            .find(|r| r["FIELD"] == f)
            .unwrap_or_else(|| panic!("no {f} in {table:?}"))["VALUE"]
            .clone()
    };
    assert_eq!(field("NODE"), node.name());
    assert_eq!(field("POD CIDR"), node.pod_cidr());
    assert_eq!(field("READY"), "true");

    // podinterface: both pods with what CNI ADD gave them.
    let items = ctl::json(&node, &["get", "podinterface"]).unwrap();
    assert_eq!(items.as_array().unwrap().len(), 2, "{items:#}");
    for p in [&a, &b] {
        let it = find(&items, "ip", &p.ip().to_string());
        assert_eq!(it["containerID"], p.container_id());
        assert_eq!(it["pod"], p.attachment().pod_name);
        assert_eq!(it["namespace"], "default");
        assert_eq!(it["hostInterface"], p.host_ifname());
        assert_eq!(it["mac"], pod_mac(p));
        assert_eq!(it["mac"], p.result().mac);
        let port = it["dataplanePort"].as_str().unwrap();
        match dp {
            Dataplane::Ovs => assert!(port.starts_with("ovs port"), "{port}"),
            Dataplane::Ebpf => assert!(port.contains("ferrea_from_pod"), "{port}"),
        }
        assert_eq!(it["hasCounters"], true, "{it}");
        assert!(it["txPackets"].as_u64().unwrap() > 0, "{it}");
        assert!(it["rxPackets"].as_u64().unwrap() > 0, "{it}");
    }
    // One pod by name, and -n.
    let one = ctl::json(
        &node,
        &[
            "get",
            "podinterface",
            "-n",
            "default",
            &a.attachment().pod_name,
        ],
    )
    .unwrap();
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["ip"], a.ip().to_string());
    let none = ctl::json(&node, &["get", "podinterface", "-n", "kube-system"]).unwrap();
    assert_eq!(none, serde_json::json!([]));
    let rows_text = ctl::ok(&node, &["get", "podinterface"]).unwrap();
    eprintln!("$ ferreactl get podinterface\n{rows_text}");
    let rows = ctl::table(&rows_text);
    let row = rows
        .iter()
        .find(|r| r["IP"] == a.ip().to_string())
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(row["HOST INTERFACE"], a.host_ifname());
    assert_eq!(row["POD"], a.attachment().pod_name);
    let yaml = ctl::ok(&node, &["get", "podinterface", "-o", "yaml"]).unwrap();
    assert!(yaml.contains(&format!("ip: {}", a.ip())), "{yaml}");

    // dump dataplane: the pod's entries, by the pod.
    let d = ctl::json(&node, &["dump", "dataplane"]).unwrap();
    assert_eq!(d["dataplane"], dp.as_str());
    let sections = d["sections"].as_array().unwrap();
    let a_ip = a.ip().to_string();
    match dp {
        Dataplane::Ovs => {
            // Flows by table, a's flows among them, with traffic counted.
            assert!(
                sections
                    .iter()
                    .all(|s| s["name"].as_str().unwrap().starts_with("table ")),
                "{d:#}"
            );
            let pod_flows: Vec<&Value> = sections
                .iter()
                .flat_map(|s| s["rows"].as_array().unwrap())
                .filter(|r| r["kind"] == "pod" && r["object"] == a_ip)
                .collect();
            assert!(pod_flows.len() >= 2, "{d:#}");
            // The matches are decoded: the pod's address is matched on.
            assert!(
                pod_flows.iter().any(|r| r["match"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("ip_dst={a_ip}"))),
                "{pod_flows:?}"
            );
            assert!(
                pod_flows
                    .iter()
                    .any(|r| r["packets"].as_str().unwrap().parse::<u64>().unwrap() > 0),
                "{pod_flows:?}"
            );
            // The actions are decoded, every one of them: delivery to the pod's port.
            assert!(
                pod_flows
                    .iter()
                    .any(|r| r["actions"].as_str().unwrap().contains("output:")),
                "{pod_flows:?}"
            );
            let undecoded: Vec<&Value> = sections
                .iter()
                .flat_map(|s| s["rows"].as_array().unwrap())
                .filter(|r| r["actions"].as_str().unwrap().contains("unknown_"))
                .collect();
            assert!(undecoded.is_empty(), "actions not decoded: {undecoded:#?}");
        }
        Dataplane::Ebpf => {
            let sec = |n: &str| {
                sections
                    .iter()
                    .find(|s| s["name"] == n)
                    .unwrap_or_else(|| panic!("no section {n} in {d:#}"))
            };
            let ep = find(&sec("map FERREA_EP_IP")["rows"], "ip", &a_ip);
            assert_eq!(ep["pod_mac"], pod_mac(&a));
            let at = &sec("attachments")["rows"];
            let on_a: Vec<&Value> = at
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["interface"] == a.host_ifname())
                .collect();
            assert_eq!(on_a.len(), 2, "{at:#}");
            assert!(on_a.iter().any(|r| r["program"] == "ferrea_from_pod"));
            // The stack-flow counters: the node's stack answered the pod's pings to its
            // gateway, so it delivered packets to a pod.
            let svc = find(
                &sec("map FERREA_SVC_CNT")["rows"],
                "counter",
                "stack_to_pod",
            );
            assert!(
                svc["packets"].as_str().unwrap().parse::<u64>().unwrap() > 0,
                "{svc:#}"
            );
        }
    }
    // -p: only that pod.
    let only = ctl::json(
        &node,
        &["dump", "dataplane", "-p", &a.attachment().pod_name],
    )
    .unwrap();
    let text = only.to_string();
    assert!(text.contains(&a_ip), "{only:#}");
    assert!(!text.contains(&format!("\"{}\"", b.ip())), "{only:#}");
    // The table shows the same.
    let t = ctl::ok(&node, &["dump", "dataplane"]).unwrap();
    eprintln!("$ ferreactl dump dataplane\n{t}");
    assert!(t.contains(&a_ip), "{t}");
    let missing = ctl::run(&node, &["dump", "dataplane", "-p", "no-such-pod"]).unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no pod \"no-such-pod\""),
        "{missing:?}"
    );
}

fn log_level_and_supportbundle(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let _p = node.add_pod().unwrap();
    // The harness starts agents with FERREA_LOG=info,ferrea_agent=debug.
    assert_eq!(
        ctl::ok(&node, &["log-level"]).unwrap().trim(),
        "info,ferrea_agent=debug"
    );
    assert_eq!(
        ctl::ok(&node, &["log-level", "warn"]).unwrap().trim(),
        "warn"
    );
    assert_eq!(ctl::ok(&node, &["log-level"]).unwrap().trim(), "warn");
    let bad = ctl::run(&node, &["log-level", "ferrea_agent=notalevel"]).unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid log filter"),
        "{bad:?}"
    );
    assert_eq!(ctl::ok(&node, &["log-level"]).unwrap().trim(), "warn");
    // The change is real: a debug line of a new CNI request no longer appears.
    let before = node.agent_log_len();
    let _q = node.add_pod().unwrap();
    let after = node.agent_log_since(before);
    assert!(!after.contains("DEBUG"), "{after}");
    ctl::ok(&node, &["log-level", "info,ferrea_agent=debug"]).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = node.config_path();
    let out = ctl::ok(
        &node,
        &[
            "supportbundle",
            "-d",
            dir.path().to_str().unwrap(),
            "--agent-config",
            config.to_str().unwrap(),
        ],
    )
    .unwrap();
    let archive = out.trim();
    assert!(archive.ends_with(".tar.gz"), "{out}");
    let list = std::process::Command::new("tar")
        .args(["tzf", archive])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&list.stdout);
    for want in [
        "agent/agentinfo.json",
        "agent/podinterfaces.json",
        "agent/dataplane.json",
        "agent/dataplane.txt",
        "agent/config.yaml",
        "agent/agent.log",
        "node/nft-ruleset.txt",
        "node/routes.txt",
        "node/rules.txt",
    ] {
        assert!(
            names.lines().any(|l| l.ends_with(want)),
            "{want} missing: {names}"
        );
    }
    let info = std::process::Command::new("tar")
        .args(["xzOf", archive, "--wildcards", "*/agent/agentinfo.json"])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["nodeName"], node.name());
    // The log comes from the agent's memory: its start-up lines are there.
    let log = std::process::Command::new("tar")
        .args(["xzOf", archive, "--wildcards", "*/agent/agent.log"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(log.contains("CNI server listening"), "{log}");
    let nft = std::process::Command::new("tar")
        .args(["xzOf", archive, "--wildcards", "*/node/nft-ruleset.txt"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&nft.stdout).contains("table ip ferrea"),
        "the bundle's ruleset is the node's"
    );
}

fn remotenodes_and_egress_views(dp: Dataplane) {
    let s = EgressCluster::start(dp).unwrap();
    let nodes = s.c.nodes();
    let (n1, n2) = (&nodes[0], &nodes[1]);
    // Each node lists the other with its address and pod CIDR.
    for (me, other) in [(n1, n2), (n2, n1)] {
        let r = ctl::json(me, &["get", "remotenodes"]).unwrap();
        assert_eq!(r.as_array().unwrap().len(), 1, "{r:#}");
        assert_eq!(r[0]["name"], other.name());
        assert_eq!(r[0]["nodeIP"], other.ip().to_string());
        assert_eq!(r[0]["podCIDR"], other.pod_cidr());
        let t = ctl::table(&ctl::ok(me, &["get", "remotenodes"]).unwrap());
        assert_eq!(t[0]["NODE IP"], other.ip().to_string());
        assert_eq!(t[0]["POD CIDR"], other.pod_cidr());
    }
    // Egress: every node names the holder and the IP the status view has.
    let holder = &nodes[s.egress_node];
    let st = egress_status(holder).unwrap();
    assert_eq!(condition(&st, "IPAssigned"), "True");
    for n in nodes {
        let e = ctl::json(n, &["get", "egress"]).unwrap();
        let it = find(&e, "name", ferrea_tests::egress::EGRESS);
        assert_eq!(it["egressIP"], s.ip.to_string());
        assert_eq!(it["egressNode"], holder.name());
        let t = ctl::table(&ctl::ok(n, &["get", "egress"]).unwrap());
        assert_eq!(t[0]["EGRESS IP"], s.ip.to_string());
        assert_eq!(t[0]["EGRESS NODE"], holder.name());
    }
    let e = ctl::json(holder, &["get", "egress"]).unwrap();
    assert_eq!(
        find(&e, "name", ferrea_tests::egress::EGRESS)["assigned"],
        "Assigned"
    );
    // egressnode: the holder holds the IP on VLAN 100 with rp_filter 2; the other holds none.
    let v = ctl::json(holder, &["get", "egressnode"]).unwrap();
    assert_eq!(v["node"], holder.name());
    let held = v["held"].as_array().unwrap();
    assert_eq!(held.len(), 1, "{v:#}");
    assert_eq!(held[0]["ip"], s.ip.to_string());
    assert_eq!(held[0]["vlan"], 100);
    // rp_filter 2 on the sub-interface: wanted, and found at the next check (every second)
    // after the first setting.
    let rp_ok = |v: &Value| {
        v["rpFilter"].as_array().is_some_and(|rp| {
            rp.iter().any(|r| {
                r["interface"] == "ferrea-ext.100" && r["want"] == "2" && r["found"] == "2"
            })
        })
    };
    let v = wait_for(Duration::from_secs(5), || {
        let v = ctl::json(holder, &["get", "egressnode"]).ok()?;
        rp_ok(&v).then_some(v)
    })
    .unwrap_or_else(|| panic!("rp_filter never found 2: {v:#}"));
    let sysctl = holder
        .ns()
        .sh(&["sysctl", "-n", "net.ipv4.conf.ferrea-ext/100.rp_filter"])
        .unwrap();
    assert_eq!(sysctl.trim(), "2", "what the kernel holds");
    assert_eq!(v["held"][0]["ip"], s.ip.to_string());
    let text = ctl::ok(holder, &["get", "egressnode"]).unwrap();
    assert!(
        text.contains(&s.ip.to_string()) && text.contains("ferrea-ext.100"),
        "{text}"
    );
    let other = ctl::json(&nodes[s.other_node], &["get", "egressnode"]).unwrap();
    assert_eq!(other["held"], serde_json::json!([]), "{other:#}");
}

fn nodeportlocal_mappings_point_at_the_pod(dp: Dataplane) {
    let mut o = NodeOptions::new(dp);
    o.extra_config = m::npl_config("61000-61010");
    let node = SimNode::start(o).unwrap();
    let p = node.add_pod().unwrap();
    let name = p.attachment().pod_name.clone();
    let web = &[("app", "web")];
    m::write_pod(
        &node,
        &name,
        web,
        &[ContainerPort {
            name: "http",
            port: 8080,
            protocol: "TCP",
        }],
    )
    .unwrap();
    m::write_service(
        &node,
        "web",
        true,
        web,
        &[ServicePort {
            port: 80,
            target_port: "http",
            protocol: "TCP",
        }],
    )
    .unwrap();
    let key = format!("default/{name}");
    let (ann, _) = m::wait_annotations(&node, Duration::from_secs(10), |a| {
        a.get(&key).map(|v| m::parse_annotation(v).unwrap())
    })
    .expect("an NPL annotation");
    let entry = &ann[0];
    // The CLI reports the same node port, this node's IP and the pod's, installed.
    let got = wait_for(Duration::from_secs(5), || {
        let l = ctl::json(&node, &["get", "nodeportlocal"]).ok()?;
        (l.as_array()?.len() == 1 && l[0]["installed"] == true).then_some(l)
    })
    .expect("the mapping installed");
    let it = &got[0];
    assert_eq!(it["pod"], name.as_str());
    assert_eq!(it["namespace"], "default");
    assert_eq!(it["podIP"], p.ip().to_string());
    assert_eq!(it["podPort"], 8080);
    assert_eq!(it["protocol"], "tcp");
    assert_eq!(it["nodePort"], entry.node_port);
    assert_eq!(it["nodeIP"], node.ip().to_string());
    assert_eq!(it["nodeIP"], entry.node_ip);
    // The nftables map the kernel holds agrees.
    let elems = m::npl_map_elements(&node).unwrap();
    assert!(
        elems.iter().any(|(proto, port, ip, pport)| proto == "tcp"
            && *port == entry.node_port
            && ip == &p.ip().to_string()
            && *pport == 8080),
        "{elems:?}"
    );
    let t = ctl::table(&ctl::ok(&node, &["get", "nodeportlocal", "-n", "default", &name]).unwrap());
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0]["NODE PORT"], entry.node_port.to_string());
    assert_eq!(t[0]["POD IP"], p.ip().to_string());
    assert_eq!(t[0]["INSTALLED"], "true");
    let other = ctl::json(&node, &["get", "nodeportlocal", "-n", "other"]).unwrap();
    assert_eq!(other, serde_json::json!([]));
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn non_root_clients_are_refused(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let sock = ctl::debug_socket(&node);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the debug socket is root-only");
    // The node's directory must be searchable for the file mode to be what refuses.
    std::fs::set_permissions(node.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = ctl::run_as(&node, NOBODY, &["get", "agentinfo"]).unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("root-only"), "{}", stderr(&o));
    // A socket opened to everyone by mistake still serves only root (SO_PEERCRED).
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = ctl::run_as(&node, NOBODY, &["get", "agentinfo"]).unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("serves only root"), "{}", stderr(&o));
    assert!(
        wait_for(Duration::from_secs(2), || node
            .agent_log()
            .contains("refused a connection from a non-root process")
            .then_some(()))
        .is_some(),
        "the agent logs the refusal"
    );
    // Root still gets answers.
    let info = ctl::json(&node, &["get", "agentinfo"]).unwrap();
    assert_eq!(info["nodeName"], node.name());
}

fn a_killed_agent_is_named(dp: Dataplane) {
    let mut node = SimNode::start(NodeOptions::new(dp)).unwrap();
    node.agent().kill9().unwrap();
    // The socket file is left behind, with nobody listening.
    let o = ctl::run(&node, &["get", "agentinfo"]).unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("ferrea-agent is not running"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_file(ctl::debug_socket(&node)).unwrap();
    let o = ctl::run(&node, &["get", "podinterface"]).unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no debug socket at"), "{}", stderr(&o));
    // A restarted agent answers again, with the pods it adopted.
    node.agent().restart().unwrap();
    let info = ctl::json(&node, &["get", "agentinfo"]).unwrap();
    assert_eq!(info["ready"], true);
}

fn readiness_and_why_not_while_starting(dp: Dataplane) {
    let mut node = SimNode::start(NodeOptions::new(dp)).unwrap();
    // Without its Node object the agent cannot start the node: it serves the debug API and
    // the health endpoint, and says what it waits for.
    node.agent().stop().unwrap();
    std::fs::remove_file(node.manifests().join("node.yaml")).unwrap();
    node.agent().spawn().unwrap();
    let info = wait_for(Duration::from_secs(10), || {
        ctl::json(&node, &["get", "agentinfo"]).ok()
    })
    .expect("the debug API answers while the agent starts");
    assert_eq!(info["ready"], false, "{info:#}");
    let why = info["notReadyReason"].as_str().unwrap();
    assert!(why.contains("waiting for this node's Node object"), "{why}");
    assert_eq!(info["podCIDR"], "");
    let t = ctl::table(&ctl::ok(&node, &["get", "agentinfo"]).unwrap());
    let ready = t.iter().find(|r| r["FIELD"] == "READY").unwrap();
    assert_eq!(ready["VALUE"], "false");
    let o = ctl::run(&node, &["get", "podinterface"]).unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not ready yet") && stderr(&o).contains("try again"),
        "{}",
        stderr(&o)
    );
    let (st, body) = ctl::http_get(&node, "/readyz").unwrap();
    assert_eq!(st, 503);
    assert!(
        body.contains("waiting for this node's Node object"),
        "{body}"
    );
    assert_eq!(ctl::http_get(&node, "/livez").unwrap().0, 200);
    // The Node object comes back: ready.
    let (file, text) = node.manifest_entry();
    std::fs::write(node.manifests().join(file), text).unwrap();
    let info = wait_for(Duration::from_secs(20), || {
        let i = ctl::json(&node, &["get", "agentinfo"]).ok()?;
        (i["ready"] == true).then_some(i)
    })
    .expect("ready once the Node object is there");
    assert_eq!(info["podCIDR"], node.pod_cidr());
    assert_eq!(info["notReadyReason"], "");
    assert_eq!(ctl::http_get(&node, "/readyz").unwrap().0, 200);
}
