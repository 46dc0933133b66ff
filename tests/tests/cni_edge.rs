//! The CNI path under hostile or broken input, through the real `ferrea-cni` binary against a
//! real agent: a CNI_NETNS that is no network namespace (ADD and CHECK name what it is, DEL
//! still cleans up), CHECK against `prevResult`, static addresses and MACs from CNI_ARGS and
//! the configuration (honoured, or refused with the reason, also after a restart), and the
//! socket refusing non-root callers while serving root.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use ferrea_tests::cni::{AddResult, Attachment, Cni, CniOutput, Invocation};
use ferrea_tests::netns::NetNs;
use ferrea_tests::{Dataplane, NodeOptions, SimNode, dataplane_tests, fabric, wait_for};
use serde_json::{Value, json};

/// `nobody` on Debian.
const NOBODY: u32 = 65534;

/// The documented limit of a network configuration (docs/cni.md; `ferrea_proto::cni::
/// MAX_NETWORK_CONFIG_BYTES`).
const MAX_NETWORK_CONFIG_BYTES: usize = 1 << 20;

dataplane_tests!(
    a_netns_that_is_no_network_namespace_is_named,
    check_verifies_prev_result,
    static_ip_and_mac_are_honoured_or_refused,
    non_root_callers_are_refused_and_root_served,
);

/// The error message of a failed run.
fn msg(out: &CniOutput) -> String {
    out.json
        .as_ref()
        .and_then(|j| j.get("msg"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Asserts a failure with `code` whose message contains every one of `parts`.
#[track_caller]
fn assert_refused(out: &CniOutput, code: u64, parts: &[&str]) {
    out.assert_error(code, parts[0]);
    let m = msg(out);
    for p in parts {
        assert!(m.contains(p), "message lacks {p:?}: {out}");
    }
}

/// The attachment `att` with CNI_NETNS `netns`.
fn at(att: &Attachment, netns: &Path) -> Attachment {
    Attachment {
        netns: netns.display().to_string(),
        ..att.clone()
    }
}

/// Runs `command` with the node's configuration plus `extra` keys and CNI_ARGS `args` (the
/// attachment's pod identity, then `args`).
fn run(cni: &Cni, command: &str, att: &Attachment, extra: Value, args: &str) -> CniOutput {
    let mut conf = cni.config();
    if let (Value::Object(c), Value::Object(e)) = (&mut conf, extra) {
        c.extend(e);
    }
    let how = Invocation {
        cni_args: Some(format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={}{}{args}",
            att.pod_name,
            if args.is_empty() { "" } else { ";" }
        )),
        uid: None,
    };
    cni.invoke_with(command, Some(att), conf.to_string().as_bytes(), &how)
        .unwrap()
}

fn parse(out: &CniOutput) -> AddResult {
    AddResult::parse(out.json.as_ref().unwrap_or_else(|| panic!("{out}"))).unwrap()
}

fn a_netns_that_is_no_network_namespace_is_named(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let cni = node.cni();
    let dir = node.dir().join("not-netns");
    std::fs::create_dir_all(&dir).unwrap();

    // The real thing: a namespace bind-mounted in another mount namespace (private
    // propagation) leaves an empty regular file here, where the agent opens it.
    let real = NetNs::new("real").unwrap();
    let elsewhere = dir.join("bound-elsewhere");
    std::fs::write(&elsewhere, b"").unwrap();
    let st = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "mount", "--bind"])
        .arg(real.path())
        .arg(&elsewhere)
        .status()
        .unwrap();
    assert!(st.success(), "bind mount in a private mount namespace");
    assert_eq!(std::fs::metadata(&elsewhere).unwrap().len(), 0);
    let full = dir.join("full");
    std::fs::write(&full, b"not a namespace\n").unwrap();
    let subdir = dir.join("a-directory");
    std::fs::create_dir_all(&subdir).unwrap();
    let missing = dir.join("missing");

    let ns = NetNs::new("n").unwrap();
    let att = Attachment::for_netns(ns.name());
    let cases: [(&Path, &[&str]); 6] = [
        (
            &elsewhere,
            &[
                "is an empty regular file on ",
                "not a network namespace",
                "another mount namespace",
            ],
        ),
        (&full, &["is a regular file of 16 bytes on "]),
        (&subdir, &["is a directory on "]),
        (&missing, &["does not exist"]),
        (
            Path::new("/proc/self/ns/mnt"),
            &["is a mount namespace, not a network namespace"],
        ),
        (
            Path::new("/proc/version"),
            &[" on proc, not a network namespace"],
        ),
    ];
    for (path, parts) in cases {
        let out = cni.add(&at(&att, path)).unwrap();
        let mut want = vec![format!("CNI_NETNS {} ", path.display())];
        want.extend(parts.iter().map(|p| p.to_string()));
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_refused(&out, 4, &want);
        assert!(!msg(&out).contains("Invalid argument"), "{out}");
    }
    assert!(
        node.pod_veths().unwrap().is_empty(),
        "a failed ADD left a veth"
    );

    // A pod whose path turns into something else: CHECK names it, DEL cleans up anyway.
    let mut pod = node.add_pod().unwrap();
    let (ip, veth) = (pod.ip(), pod.host_ifname().to_owned());
    let prev = pod.result().raw.clone();
    let out = cni
        .check(&at(pod.attachment(), &elsewhere), Some(&prev))
        .unwrap();
    assert_refused(
        &out,
        4,
        &[&format!(
            "CNI_NETNS {} is an empty regular file",
            elsewhere.display()
        )],
    );
    pod.check()
        .unwrap()
        .expect_ok("CHECK with the real netns")
        .unwrap();
    for path in [&elsewhere, &missing, &subdir] {
        cni.del(&at(pod.attachment(), path), Some(&prev))
            .unwrap()
            .expect_ok("DEL with a netns that is no network namespace")
            .unwrap();
    }
    pod.forget();
    assert!(
        !node.pod_veths().unwrap().contains(&veth),
        "DEL left {veth}"
    );
    // The address was released: asking for exactly it succeeds.
    let again = run(cni, "ADD", &att, json!({}), &format!("IP={ip}"));
    assert_eq!(
        parse(&again.clone().expect_ok("ADD of the released IP").unwrap()).ip,
        ip
    );
    cni.del(&att, None).unwrap().expect_ok("DEL").unwrap();
}

fn check_verifies_prev_result(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let cni = node.cni();
    let pod = node.add_pod().unwrap();
    let att = pod.attachment().clone();
    let prev = pod.result().raw.clone();
    let check = |p: &Value| cni.check(&att, Some(p)).unwrap();
    check(&prev).expect_ok("CHECK of a healthy pod").unwrap();
    // The 0.4.0 shape of the same result ("version" on each IP) passes in a 0.4.0 list.
    let mut old = prev.clone();
    old["cniVersion"] = json!("0.4.0");
    old["ips"][0]["version"] = json!("4");
    cni.call(
        "CHECK",
        Some(&att),
        json!({"cniVersion": "0.4.0", "prevResult": old}),
    )
    .unwrap()
    .expect_ok("CHECK in 0.4.0")
    .unwrap();

    // No prevResult: the spec's CHECK needs it.
    assert_refused(
        &cni.check(&att, None).unwrap(),
        7,
        &["CHECK needs `prevResult`"],
    );

    // Another address than the allocated one.
    let cidr: ipnetwork::Ipv4Network = node.pod_cidr().parse().unwrap();
    let other = cidr.iter().skip(2).find(|a| *a != pod.ip()).unwrap();
    let mut p = prev.clone();
    p["ips"][0]["address"] = json!(format!("{other}/{}", cidr.prefix()));
    assert_refused(
        &check(&p),
        999,
        &[&format!(
            "prevResult names address {other}/{} for eth0, but ferrea allocated {}/{} to container {}",
            cidr.prefix(),
            pod.ip(),
            cidr.prefix(),
            pod.container_id()
        )],
    );
    // An interface the result does not have in this sandbox.
    let mut p = prev.clone();
    p["interfaces"][1]["name"] = json!("eth7");
    assert_refused(
        &check(&p),
        999,
        &[&format!(
            "prevResult lists no interface eth0 in sandbox {}",
            att.netns
        )],
    );
    // A MAC that is not the interface's.
    let mut p = prev.clone();
    p["interfaces"][1]["mac"] = json!("02:00:00:00:00:01");
    assert_refused(&check(&p), 999, &["prevResult names MAC 02:00:00:00:00:01"]);

    // A route it lists, removed in the pod: named; back, and CHECK passes again.
    let gw = node.gateway().to_string();
    pod.ns().ip(&["route", "del", "default"]).unwrap();
    assert_refused(
        &check(&prev),
        999,
        &[&format!(
            "route 0.0.0.0/0 via {gw} named by prevResult is missing in {}",
            att.netns
        )],
    );
    pod.ns()
        .ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])
        .unwrap();
    check(&prev).expect_ok("CHECK with the route back").unwrap();
    // A route a chained plugin would have added, absent from the pod.
    let mut p = prev.clone();
    p["routes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"dst": "192.0.2.0/24", "gw": gw}));
    assert_refused(&check(&p), 999, &["route 192.0.2.0/24 via"]);

    // The interface it names, gone from the pod.
    pod.ns().ip(&["link", "set", "eth0", "down"]).unwrap();
    pod.ns()
        .ip(&["link", "set", "eth0", "name", "eth7"])
        .unwrap();
    assert_refused(&check(&prev), 999, &["eth0", "interface is missing"]);
}

fn static_ip_and_mac_are_honoured_or_refused(dp: Dataplane) {
    let mut node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let cidr: ipnetwork::Ipv4Network = node.pod_cidr().parse().unwrap();
    let host = |n: u32| std::net::Ipv4Addr::from(u32::from(cidr.network()) + n);
    let (ip_a, mac_a) = (host(77), "02:42:ac:11:00:4d");

    // podman --ip / --mac-address: CNI_ARGS IP= and MAC=.
    let ns_a = NetNs::new("a").unwrap();
    let att_a = Attachment::for_netns(ns_a.name());
    let out = run(
        node.cni(),
        "ADD",
        &att_a,
        json!({}),
        &format!("IP={ip_a};MAC={mac_a}"),
    );
    let a = parse(&out.clone().expect_ok("ADD with IP= and MAC=").unwrap());
    assert_eq!(a.ip, ip_a);
    assert_eq!(a.prefix, cidr.prefix());
    assert_eq!(a.mac, mac_a);
    let link = ns_a.ip(&["-o", "link", "show", "eth0"]).unwrap();
    assert!(link.contains(&format!("link/ether {mac_a}")), "{link}");
    let addr = ns_a.ip(&["-o", "-4", "addr", "show", "eth0"]).unwrap();
    assert!(
        addr.contains(&format!("{ip_a}/{}", cidr.prefix())),
        "{addr}"
    );
    node.cni()
        .check(&att_a, Some(&a.raw))
        .unwrap()
        .expect_ok("CHECK of the static pod")
        .unwrap();
    // The dataplane carries it like any pod (the spoof guard knows its MAC).
    let b = node.add_pod().unwrap();
    assert!(fabric::ping(ns_a.name(), b.ip()), "static pod -> pool pod");
    assert!(b.ping(ip_a), "pool pod -> static pod");
    assert!(
        fabric::ping(ns_a.name(), node.gateway()),
        "static pod -> gateway"
    );

    // The configuration's conventions: args.cni.ips/mac and the ips/mac capabilities.
    let ns_c = NetNs::new("c").unwrap();
    let att_c = Attachment::for_netns(ns_c.name());
    let c = run(
        node.cni(),
        "ADD",
        &att_c,
        json!({"runtimeConfig": {"ips": [format!("{}/{}", host(88), cidr.prefix())], "mac": "02:42:ac:11:00:58"}}),
        "",
    );
    let c = parse(
        &c.clone()
            .expect_ok("ADD with runtimeConfig ips and mac")
            .unwrap(),
    );
    assert_eq!((c.ip, c.mac.as_str()), (host(88), "02:42:ac:11:00:58"));
    let ns_d = NetNs::new("d").unwrap();
    let att_d = Attachment::for_netns(ns_d.name());
    let d = run(
        node.cni(),
        "ADD",
        &att_d,
        json!({"args": {"cni": {"ips": [host(99).to_string()]}}}),
        "",
    );
    assert_eq!(
        parse(&d.clone().expect_ok("ADD with args.cni.ips").unwrap()).ip,
        host(99)
    );

    // Refusals name the value and the reason; nothing is attached for them.
    let ns_x = NetNs::new("x").unwrap();
    let att_x = Attachment::for_netns(ns_x.name());
    let veths = node.pod_veths().unwrap().len();
    let refusals: Vec<(String, Value, u64, Vec<String>)> = vec![
        (
            format!("IP={ip_a}"),
            json!({}),
            4,
            vec![format!(
                "CNI_ARGS IP={ip_a} refused: already used by container {} (interface eth0, pod default/{})",
                att_a.container_id, att_a.pod_name
            )],
        ),
        (
            "IP=10.9.9.9".into(),
            json!({}),
            4,
            vec![format!(
                "CNI_ARGS IP=10.9.9.9 refused: outside this node's pod CIDR {cidr}"
            )],
        ),
        (
            format!("IP={}", host(1)),
            json!({}),
            4,
            vec![format!("refused: it is the gateway of pod CIDR {cidr}")],
        ),
        (
            format!("IP={}", cidr.network()),
            json!({}),
            4,
            vec!["refused: it is the network address".into()],
        ),
        (
            format!("IP={}", cidr.broadcast()),
            json!({}),
            4,
            vec!["refused: it is the broadcast address".into()],
        ),
        (
            "IP=10.244.1.300".into(),
            json!({}),
            4,
            vec!["CNI_ARGS IP=10.244.1.300: \"10.244.1.300\" is not an IPv4 address".into()],
        ),
        (
            format!("MAC={mac_a}"),
            json!({}),
            4,
            vec![format!(
                "CNI_ARGS MAC={mac_a} refused: already used by container {}",
                att_a.container_id
            )],
        ),
        (
            "MAC=01:00:5e:00:00:01".into(),
            json!({}),
            4,
            vec!["refused: it is a multicast address".into()],
        ),
        (
            "MAC=02:42:ac".into(),
            json!({}),
            4,
            vec!["is not a MAC address".into()],
        ),
        (
            String::new(),
            json!({"runtimeConfig": {"ips": ["10.9.9.9/24"]}}),
            7,
            vec![r#"runtimeConfig.ips ["10.9.9.9/24"] refused: outside"#.into()],
        ),
        (
            format!("IP={}", host(50)),
            json!({"runtimeConfig": {"ips": [host(51).to_string()]}}),
            7,
            vec!["ask for different addresses".into()],
        ),
    ];
    for (args, extra, code, parts) in &refusals {
        let out = run(node.cni(), "ADD", &att_x, extra.clone(), args);
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        assert_refused(&out, *code, &parts);
    }
    assert_eq!(
        node.pod_veths().unwrap().len(),
        veths,
        "a refused ADD left a veth"
    );
    assert_eq!(ns_x.links().unwrap(), vec!["lo".to_string()]);

    // The allocation survives a restart like any other.
    node.agent().restart().unwrap();
    assert_refused(
        &run(node.cni(), "ADD", &att_x, json!({}), &format!("IP={ip_a}")),
        4,
        &["already used by container"],
    );
    node.cni()
        .check(&att_a, Some(&a.raw))
        .unwrap()
        .expect_ok("CHECK of the static pod after the restart")
        .unwrap();
    let again = run(
        node.cni(),
        "ADD",
        &att_a,
        json!({}),
        &format!("IP={ip_a};MAC={mac_a}"),
    );
    let again = parse(&again.clone().expect_ok("repeated ADD").unwrap());
    assert_eq!((again.ip, again.mac.as_str()), (ip_a, mac_a));
    // A repeated ADD asking for something else is refused, not answered with the old value.
    assert_refused(
        &run(
            node.cni(),
            "ADD",
            &att_a,
            json!({}),
            &format!("IP={}", host(78)),
        ),
        4,
        &[&format!("already has {ip_a}")],
    );
    assert!(b.ping(ip_a), "static pod reachable after the restart");
    for att in [&att_a, &att_c, &att_d] {
        node.cni().del(att, None).unwrap().expect_ok("DEL").unwrap();
    }
}

fn non_root_callers_are_refused_and_root_served(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let cni = node.cni();
    let sock = cni.socket().to_owned();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the CNI socket is root-only");
    // Open the socket to everyone, as a mistake would: SO_PEERCRED still refuses.
    std::fs::set_permissions(node.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let ns = NetNs::new("u").unwrap();
    let att = Attachment::for_netns(ns.name());
    let as_nobody = Invocation {
        cni_args: None,
        uid: Some(NOBODY),
    };
    let conf = cni.config().to_string();
    for verb in ["ADD", "STATUS"] {
        let out = cni
            .invoke_with(verb, Some(&att), conf.as_bytes(), &as_nobody)
            .unwrap();
        assert_refused(
            &out,
            999,
            &[
                &format!("ferrea-agent refused {verb}"),
                "serves only root",
                &format!("uid {NOBODY}"),
            ],
        );
    }
    assert!(
        wait_for(Duration::from_secs(2), || node
            .agent_log()
            .contains("refused a request from a non-root process")
            .then_some(()))
        .is_some(),
        "the agent logs the refusal"
    );
    assert_eq!(ns.links().unwrap(), vec!["lo".to_string()]);
    // Root is served meanwhile, and after.
    let pod = node.add_pod().unwrap();
    pod.check().unwrap().expect_ok("CHECK as root").unwrap();
    cni.status().unwrap().expect_ok("STATUS as root").unwrap();

    // A configuration beyond the documented 1 MiB: refused with code 7, the agent unharmed.
    let mut big = cni.config();
    big["padding"] = json!("x".repeat(MAX_NETWORK_CONFIG_BYTES + 1));
    let out = cni
        .invoke("ADD", Some(&att), big.to_string().as_bytes())
        .unwrap();
    assert_refused(&out, 7, &["larger than 1048576 bytes (1 MiB)"]);
    assert!(pod.ping(node.gateway()), "the pod still works");
    let other = node.add_pod().unwrap();
    assert!(pod.ping(other.ip()));
}
