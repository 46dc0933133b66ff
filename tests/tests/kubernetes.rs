//! ferrea's CRDs (`deploy/crds/`) against a real kube-apiserver: they install and become
//! Established, the seed manifests apply verbatim with server-side validation, `kubectl get`
//! works by Antrea's short names and prints Antrea's columns, the status subresource behaves as
//! Antrea's does, and invalid objects are refused by the API server naming the field.
//!
//! Each test starts its own etcd and kube-apiserver ([`ApiServer`], about 10 s) in a network
//! namespace of its own, so the file keeps to a few tests that check several things each.
//!
//! The agent's `kubernetes` source: one simulated node whose agent watches a real API server
//! (started inside the node's namespace, so `https://127.0.0.1:6443` is reachable from the
//! agent and from nothing else), serves CNI ADDs, patches NodePortLocal annotations onto the
//! Pod objects, writes the status of the Egress it holds, and keeps serving while the API
//! server is down. It authenticates as the DaemonSet's service account with `deploy/`'s
//! ClusterRole, so a permission the role lacks fails the test, naming it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ferrea_tests::apiserver::{ApiServer, create_node_object, install_agent_identity, k8s_bin};
use ferrea_tests::egress::{EGRESS, SEED_EGRESS, SEED_POOL};
use ferrea_tests::manifests::{self as m, NplEntry};
use ferrea_tests::node::Node;
use ferrea_tests::{Cluster, Dataplane, NodeOptions, SimNode, dataplane_tests, skip_unless_root};

/// The seed ExternalIPPool's name.
const POOL: &str = "child-egress-ippool";

const CRDS: [&str; 2] = ["egresses.crd.antrea.io", "externalippools.crd.antrea.io"];

fn crds_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/crds")
        .display()
        .to_string()
}

/// Applies `deploy/crds/` server-side and waits until both CRDs are Established.
fn install_crds(api: &ApiServer) {
    let out = api.kubectl_ok(&["apply", "--server-side", "-f", &crds_dir()]);
    for crd in CRDS {
        assert!(
            out.contains(&format!(
                "customresourcedefinition.apiextensions.k8s.io/{crd} serverside-applied"
            )),
            "apply did not create {crd}: {out}"
        );
    }
    let mut args = vec!["wait", "--for=condition=Established", "--timeout=60s"];
    let names: Vec<String> = CRDS.iter().map(|c| format!("crd/{c}")).collect();
    args.extend(names.iter().map(String::as_str));
    api.kubectl_ok(&args);
}

/// `kubectl apply --server-side --validate=strict -f -` with `yaml`.
fn apply(api: &ApiServer, yaml: &str) -> std::process::Output {
    api.kubectl_stdin(
        &["apply", "--server-side", "--validate=strict", "-f", "-"],
        yaml,
    )
}

/// The header row of `kubectl get <what>`, split into its columns.
fn header(api: &ApiServer, what: &str) -> (Vec<String>, String) {
    let out = api.kubectl_ok(&["get", what]);
    let cols = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    (cols, out)
}

fn jsonpath(api: &ApiServer, kind: &str, name: &str, path: &str) -> String {
    api.kubectl_ok(&["get", kind, name, "-o", &format!("jsonpath={{{path}}}")])
}

#[test]
fn crds_serve_the_seed_manifests_with_antreas_columns_and_status() {
    if !skip_unless_root("crds_serve_the_seed_manifests_with_antreas_columns_and_status") {
        return;
    }
    let t = Instant::now();
    let api = ApiServer::start();
    install_crds(&api);

    // The seed manifests, verbatim (they name no placeholder), with the server's strict
    // field validation: an unknown or mistyped field would fail here.
    for (what, yaml) in [("pool", SEED_POOL), ("egress", SEED_EGRESS)] {
        let out = apply(&api, yaml);
        assert!(
            out.status.success(),
            "seed {what} refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(jsonpath(&api, "eip", POOL, ".spec.subnetInfo.vlan"), "100");
    assert_eq!(
        jsonpath(
            &api,
            "eg",
            EGRESS,
            ".spec.appliedTo.podSelector.matchLabels.app"
        ),
        "hello-world1"
    );

    // Short names and Antrea's printer columns.
    let (cols, out) = header(&api, "eg");
    assert_eq!(
        cols,
        ["NAME", "EGRESSIP", "AGE", "NODE"],
        "kubectl get eg:\n{out}"
    );
    assert!(out.contains(EGRESS), "kubectl get eg:\n{out}");
    let (cols, out) = header(&api, "eip");
    assert_eq!(
        cols,
        ["NAME", "TOTAL", "USED", "AGE"],
        "kubectl get eip:\n{out}"
    );
    assert!(out.contains(POOL), "kubectl get eip:\n{out}");

    // The status subresource: status is written through it (without bumping the generation)...
    assert_eq!(jsonpath(&api, "eg", EGRESS, ".metadata.generation"), "1");
    patch_status(
        &api,
        "egress",
        EGRESS,
        r#"{"status":{"egressIP":"10.172.170.1","egressNode":"node-1"}}"#,
    );
    patch_status(
        &api,
        "externalippool",
        POOL,
        r#"{"status":{"usage":{"total":199,"used":1}}}"#,
    );
    assert_eq!(
        jsonpath(&api, "eg", EGRESS, ".status.egressIP"),
        "10.172.170.1"
    );
    assert_eq!(jsonpath(&api, "eg", EGRESS, ".metadata.generation"), "1");
    let out = api.kubectl_ok(&["get", "eg", EGRESS, "--no-headers"]);
    let row: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        (row[0], row[1], row.get(3).copied()),
        (EGRESS, "10.172.170.1", Some("node-1")),
        "kubectl get eg: {out}"
    );
    let out = api.kubectl_ok(&["get", "eip", POOL, "--no-headers"]);
    let row: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(&row[..3], [POOL, "199", "1"], "kubectl get eip: {out}");

    // ...and a plain update of the object changes its spec but never its status.
    api.kubectl_ok(&[
        "patch",
        "egress",
        EGRESS,
        "--type=merge",
        "-p",
        r#"{"spec":{"bandwidth":{"rate":"100M","burst":"200M"}},"status":{"egressIP":"10.172.170.99","egressNode":"other"}}"#,
    ]);
    assert_eq!(jsonpath(&api, "eg", EGRESS, ".spec.bandwidth.rate"), "100M");
    assert_eq!(jsonpath(&api, "eg", EGRESS, ".metadata.generation"), "2");
    assert_eq!(
        jsonpath(&api, "eg", EGRESS, ".status.egressIP"),
        "10.172.170.1"
    );
    assert_eq!(jsonpath(&api, "eg", EGRESS, ".status.egressNode"), "node-1");
    // Re-applying the seed (a spec update by apply) keeps the status too.
    let out = apply(&api, SEED_EGRESS);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        jsonpath(&api, "eg", EGRESS, ".status.egressIP"),
        "10.172.170.1"
    );
    eprintln!("test took {:.1}s", t.elapsed().as_secs_f64());
}

/// Applies `yaml` and asserts the API server refused it with a message containing every one
/// of `needles`; returns the message.
fn refused(api: &ApiServer, what: &str, yaml: &str, needles: &[&str]) -> String {
    let out = apply(api, yaml);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what} was accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "{what}: the refusal does not mention {n:?}:\n{stderr}"
        );
    }
    eprintln!("{what}: refused: {}", stderr.trim());
    stderr
}

#[test]
fn crds_refuse_what_antrea_refuses_naming_the_field() {
    if !skip_unless_root("crds_refuse_what_antrea_refuses_naming_the_field") {
        return;
    }
    let t = Instant::now();
    let api = ApiServer::start();
    install_crds(&api);

    // Each invalid object is the seed with one thing wrong.
    let vlan = SEED_POOL.replace("vlan: 100", "vlan: 5000");
    assert_ne!(vlan, SEED_POOL);
    refused(
        &api,
        "ExternalIPPool with subnetInfo.vlan 5000",
        &vlan,
        &["spec.subnetInfo.vlan", "4094"],
    );
    let no_end = SEED_POOL.replace("      end: 10.172.170.199\n", "");
    assert_ne!(no_end, SEED_POOL);
    refused(
        &api,
        "ExternalIPPool with an ipRange without end",
        &no_end,
        // The server names the range and the oneOf it fails (and the first branch's missing
        // field, cidr).
        &["\"spec.ipRanges[0]\" must validate one and only one schema (oneOf)"],
    );
    let prefix = SEED_POOL.replace("prefixLength: 24", "prefixLength: 0");
    assert_ne!(prefix, SEED_POOL);
    refused(
        &api,
        "ExternalIPPool with subnetInfo.prefixLength 0",
        &prefix,
        &["spec.subnetInfo.prefixLength"],
    );
    let no_applied_to = SEED_EGRESS
        .replace(
            "  appliedTo:\n    podSelector:\n      matchLabels:\n        app: hello-world1\n",
            "",
        )
        .replace("name: child-egress-hello-world1", "name: no-applied-to");
    assert!(!no_applied_to.contains("appliedTo"), "{no_applied_to}");
    refused(
        &api,
        "Egress without appliedTo",
        &no_applied_to,
        &["spec.appliedTo", "Required value"],
    );
    // The single-IP and the multi-IP forms exclude each other (Antrea's oneOf).
    let both = SEED_EGRESS
        .replace("name: child-egress-hello-world1", "name: both-forms")
        .replace(
            "  externalIPPool: child-egress-ippool",
            "  externalIPPool: child-egress-ippool\n  externalIPPools: [child-egress-ippool]",
        );
    refused(
        &api,
        "Egress with externalIPPool and externalIPPools",
        &both,
        &["\"spec\" must validate one and only one schema (oneOf)"],
    );
    let operator = SEED_EGRESS
        .replace("name: child-egress-hello-world1", "name: bad-operator")
        .replace(
            "      matchLabels:\n        app: hello-world1\n",
            "      matchExpressions:\n        - {key: app, operator: Equals, values: [x]}\n",
        );
    refused(
        &api,
        "Egress with a matchExpressions operator Equals",
        &operator,
        &[
            "spec.appliedTo.podSelector.matchExpressions[0].operator",
            "Unsupported value",
        ],
    );
    let listed = api.kubectl_ok(&["get", "eg,eip", "-o", "name"]);
    assert!(listed.trim().is_empty(), "refused objects exist: {listed}");

    // Nothing outlives the guard: its processes (by PID) and its namespace.
    let pids = api.pids().to_vec();
    let ns = api.netns_name().to_owned();
    assert_eq!(pids.len(), 2);
    drop(api);
    let bins = [k8s_bin("etcd"), k8s_bin("kube-apiserver")];
    for pid in pids {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
        assert!(
            !exe.as_ref().is_ok_and(|e| bins.contains(e)),
            "pid {pid} ({exe:?}) still runs after the guard was dropped"
        );
    }
    assert!(
        !ferrea_tests::netns::list_with_prefix(&ns).contains(&ns),
        "netns {ns} still exists"
    );
    eprintln!("test took {:.1}s", t.elapsed().as_secs_f64());
}

/// The NodePortLocal range of the Kubernetes-source node.
const NPL_RANGE: (u16, u16) = (61000, 62000);

/// The pod's annotations in the API (`kubectl get pod -o json`).
fn pod_annotations(api: &ApiServer, name: &str) -> BTreeMap<String, String> {
    let out = api.kubectl_ok(&["get", "pod", name, "-n", "default", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("kubectl -o json");
    v["metadata"]["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls the pod's annotations every 100 ms until `accept` holds; panics with `what` after
/// `timeout`. Returns them and the time it took.
fn wait_pod_annotations(
    api: &ApiServer,
    pod: &str,
    timeout: Duration,
    what: &str,
    accept: impl Fn(&BTreeMap<String, String>) -> bool,
) -> (BTreeMap<String, String>, Duration) {
    let t = Instant::now();
    loop {
        let a = pod_annotations(api, pod);
        if accept(&a) {
            return (a, t.elapsed());
        }
        assert!(
            t.elapsed() < timeout,
            "{what}: not within {timeout:?}; annotations of pod {pod}: {a:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Pod object for the attachment `name` made through the CNI: on this node, labelled
/// `app: web`, an annotation of its own, container port `http` 8080/TCP.
fn pod_object(name: &str, node: &str) -> String {
    pod_object_labelled(name, node, "app: web")
}

/// [`pod_object`] with the labels `labels` (a YAML flow mapping's content).
fn pod_object_labelled(name: &str, node: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  \
         labels: {{{labels}}}\n  annotations: {{example.com/keep: me}}\nspec:\n  nodeName: {node}\n  \
         containers:\n  - name: c\n    image: registry.invalid/web\n    \
         ports: [{{name: http, containerPort: 8080, protocol: TCP}}]\n"
    )
}

const NPL_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  \
    annotations: {nodeportlocal.antrea.io/enabled: \"true\"}\nspec:\n  selector: {app: web}\n  \
    ports: [{port: 80, targetPort: http, protocol: TCP}]\n";

/// The node's NPL annotation, checked to be Antrea's exact JSON for port 8080/TCP; returns
/// the node port.
fn check_npl_annotation(node: &SimNode, value: &str) -> u16 {
    let entries = m::parse_annotation(value).expect("the annotation parses");
    assert_eq!(entries.len(), 1, "{value}");
    let e = &entries[0];
    assert!(
        (NPL_RANGE.0..=NPL_RANGE.1).contains(&e.node_port),
        "node port {} outside the range: {value}",
        e.node_port
    );
    let want = NplEntry {
        pod_port: 8080,
        node_ip: node.ip().to_string(),
        node_port: e.node_port,
        protocol: "tcp".into(),
        ip_family: "IPv4".into(),
    };
    assert_eq!(value, m::antrea_annotation(&[want]));
    assert_eq!(
        value,
        format!(
            r#"[{{"podPort":8080,"nodeIP":"{}","nodePort":{},"protocol":"tcp","ipFamily":"IPv4"}}]"#,
            node.ip(),
            e.node_port
        )
    );
    e.node_port
}

/// The agent's log lines about requests the API server refused (RBAC names the verb and the
/// resource in them).
fn forbidden(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("forbidden") || l.contains("Forbidden"))
        .map(str::to_owned)
        .collect()
}

/// Fails naming every request of the agent's that RBAC refused.
fn assert_rbac_sufficed(node: &mut Node) {
    let refused = forbidden(&node.agent().log());
    assert!(
        refused.is_empty(),
        "deploy/20-rbac.yaml lacks permissions the agent needs:\n{}",
        refused.join("\n")
    );
}

/// The seed Egress as the API has it (`kubectl get eg -o json`).
fn egress_json(api: &ApiServer) -> serde_json::Value {
    let out = api.kubectl_ok(&["get", "eg", EGRESS, "-o", "json"]);
    serde_json::from_str(&out).expect("kubectl -o json")
}

/// A JSON merge patch of `body` onto the `status` subresource of `kind`/`name`.
fn patch_status(api: &ApiServer, kind: &str, name: &str, body: &str) {
    api.kubectl_ok(&[
        "patch",
        kind,
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        body,
    ]);
}

/// The condition `kind` of an Egress status.
fn condition<'a>(status: &'a serde_json::Value, kind: &str) -> Option<&'a serde_json::Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// Polls the seed Egress every 200 ms until its status says `node` holds an IP of the seed
/// pool (`status.egressNode`, `status.egressIP`, `IPAllocated` True); panics after `timeout`.
/// Checks the conditions' fields and returns the status and the time it took.
fn wait_egress_status(
    api: &ApiServer,
    node: &mut SimNode,
    timeout: Duration,
) -> (serde_json::Value, Duration) {
    let t = Instant::now();
    let pool = 1..=199u8;
    loop {
        let status = egress_json(api)["status"].clone();
        let ip: Option<std::net::Ipv4Addr> =
            status["egressIP"].as_str().and_then(|s| s.parse().ok());
        let in_pool = ip.is_some_and(|ip| {
            let o = ip.octets();
            o[..3] == [10, 172, 170] && pool.contains(&o[3])
        });
        let allocated = condition(&status, "IPAllocated").is_some_and(|c| c["status"] == "True");
        if status["egressNode"] == node.name() && in_pool && allocated {
            for kind in ["IPAllocated", "IPAssigned"] {
                let c = condition(&status, kind).unwrap_or_else(|| panic!("no {kind}: {status}"));
                assert!(c["reason"].is_string(), "{kind} without a reason: {c}");
                assert!(c["message"].is_string(), "{kind} without a message: {c}");
                assert!(
                    c["lastTransitionTime"]
                        .as_str()
                        .is_some_and(|s| s.ends_with('Z')),
                    "{kind} without lastTransitionTime: {c}"
                );
            }
            return (status, t.elapsed());
        }
        assert!(
            t.elapsed() < timeout,
            "the Egress status is not written within {timeout:?}: {status:#}\nrefused by RBAC: {:#?}\n{}",
            forbidden(&node.agent().log()),
            node.agent().log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

dataplane_tests!(kubernetes_source_serves_pods_and_writes_npl_annotations);

fn kubernetes_source_serves_pods_and_writes_npl_annotations(dp: Dataplane) {
    let t = Instant::now();
    let mut o = NodeOptions::new(dp);
    o.extra_config = m::npl_config(&format!("{}-{}", NPL_RANGE.0, NPL_RANGE.1));
    o.start_agent = false;
    let mut node = SimNode::start(o).unwrap();
    // Declared after the node: dropped (processes stopped) before the node's namespace goes.
    let mut api = ApiServer::start_in(node.ns());
    install_crds(&api);
    // What the controllers would make: the `default` service account (the ServiceAccount
    // admission plugin wants it for pods), and this node's Node object with its status.
    api.create_default_service_account();
    create_node_object(&api, &node);
    // The agent is the DaemonSet's service account, bound by deploy/'s ClusterRole: a
    // permission the agent needs and the role lacks fails the test, naming it.
    let kubeconfig = install_agent_identity(&api);
    node.use_kubernetes_source(&kubeconfig).unwrap();
    let started = Instant::now();
    node.agent().spawn().unwrap();
    if let Err(e) = node.agent().wait_ready(ferrea_tests::agent::READY_TIMEOUT) {
        panic!(
            "agent not ready: {e:#}\nrefused by RBAC: {:#?}\n{}",
            forbidden(&node.agent().log()),
            node.agent().log_tail(40)
        );
    }
    eprintln!(
        "agent ready on the kubernetes source after {:?}",
        started.elapsed()
    );
    let log = node.agent().log();
    assert!(
        log.contains("desired state from the Kubernetes API")
            && log.contains("Kubernetes source synced"),
        "{}",
        node.agent().log_tail(40)
    );

    // The seed's ExternalIPPool (every node eligible: `nodeSelector: {}`) and Egress: this
    // node, the only one, holds the IP and writes the Egress's status in the API.
    for yaml in [SEED_POOL, SEED_EGRESS] {
        api.kubectl_stdin_ok(&["apply", "-f", "-"], yaml);
    }
    let (status, took) = wait_egress_status(&api, &mut node, Duration::from_secs(10));
    eprintln!("Egress status in the API after {took:?}: {status:#}");
    let written_rv = egress_json(&api)["metadata"]["resourceVersion"].clone();
    // The pool's usage, written by its first eligible node (this one): 199 addresses, 1 used.
    let t_usage = Instant::now();
    loop {
        let usage = jsonpath(&api, "eip", POOL, ".status.usage");
        let usage: serde_json::Value = serde_json::from_str(&usage).unwrap_or_default();
        if usage == serde_json::json!({"total": 199, "used": 1}) {
            eprintln!(
                "ExternalIPPool usage in the API after {:?}",
                t_usage.elapsed()
            );
            break;
        }
        assert!(
            t_usage.elapsed() < Duration::from_secs(10),
            "ExternalIPPool {POOL} usage not written: {usage}\n{}",
            node.agent().log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A pod through the real CNI binary before its Pod object exists: it gets its network.
    let a = node.add_pod().unwrap();
    assert!(a.ping(node.gateway()), "pod a cannot reach its gateway");
    let a_name = a.attachment().pod_name.clone();

    // Its Pod object and an NPL-enabled Service selecting it: the annotation appears on the Pod
    // object in the API, exactly as Antrea writes it.
    api.kubectl_stdin_ok(&["apply", "-f", "-"], &pod_object(&a_name, node.name()));
    api.kubectl_stdin_ok(&["apply", "-f", "-"], NPL_SERVICE);
    let (ann, took) = wait_pod_annotations(
        &api,
        &a_name,
        Duration::from_secs(5),
        "annotation of pod a",
        |a| a.contains_key(m::NPL_ANNOTATION),
    );
    eprintln!("NPL annotation on the Pod object after {took:?}: {ann:?}");
    let port = check_npl_annotation(&node, &ann[m::NPL_ANNOTATION]);
    assert_eq!(ann["example.com/keep"], "me");
    let rules = m::nft_table(&node).unwrap();
    assert!(
        rules.contains(&port.to_string()),
        "no DNAT for node port {port} in:\n{rules}"
    );

    // Deleting the Service removes the annotation, and only it.
    api.kubectl_ok(&["delete", "service", "web", "-n", "default"]);
    let (ann, took) = wait_pod_annotations(
        &api,
        &a_name,
        Duration::from_secs(5),
        "annotation removed",
        |a| !a.contains_key(m::NPL_ANNOTATION),
    );
    eprintln!("NPL annotation removed after {took:?}");
    assert_eq!(
        ann.get("example.com/keep").map(String::as_str),
        Some("me"),
        "{ann:?}"
    );

    // Nothing changed for the Egress (several upkeep passes later): its status was not
    // written again.
    let (status_now, rv_now) = {
        let eg = egress_json(&api);
        (
            eg["status"].clone(),
            eg["metadata"]["resourceVersion"].clone(),
        )
    };
    assert_eq!(status_now, status, "the Egress status changed");
    assert_eq!(
        rv_now, written_rv,
        "the unchanged Egress status was written again"
    );

    // Everything the agent did so far (lists and watches, the NPL patches, the Egress status)
    // was allowed. Checked before the restart: a freshly started API server refuses requests
    // for a moment until its RBAC caches are filled.
    assert_rbac_sufficed(&mut node);

    // A permission revoked: the ClusterRole loses `patch` on pods. The agent says which verb
    // on which resource was refused, keeps serving, and writes the annotation once the
    // permission is back (the NPL runner retries).
    api.kubectl_ok(&[
        "patch",
        "clusterrole",
        "ferrea-agent",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/rules/1/verbs","value":["get","list","watch"]}]"#,
    ]);
    api.kubectl_stdin_ok(&["apply", "-f", "-"], NPL_SERVICE);
    let refused = ferrea_tests::wait_for(Duration::from_secs(10), || {
        forbidden(&node.agent().log()).into_iter().find(|l| {
            l.contains(r#"cannot patch resource \"pods\""#)
                || l.contains(r#"cannot patch resource "pods""#)
        })
    });
    let refused = refused.unwrap_or_else(|| {
        panic!(
            "no error naming the refused verb and resource:\n{}",
            node.agent().log_tail(40)
        )
    });
    eprintln!("with patch on pods revoked the agent says: {refused}");
    assert!(node.agent().is_running(), "{}", node.agent().log_tail(40));
    let during = node.add_pod().unwrap();
    assert!(
        during.ping(a.ip()),
        "a pod added while the permission is revoked has no network"
    );
    drop(during);
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/20-rbac.yaml");
    api.kubectl_ok(&["apply", "-f", &deploy.display().to_string()]);
    let (ann, took) = wait_pod_annotations(
        &api,
        &a_name,
        Duration::from_secs(30),
        "annotation once the permission is back",
        |a| a.contains_key(m::NPL_ANNOTATION),
    );
    eprintln!("NPL annotation written {took:?} after the permission came back");
    check_npl_annotation(&node, &ann[m::NPL_ANNOTATION]);

    // The API server goes away for 30 s: running pods keep their network and CNI ADD still
    // works.
    api.stop_apiserver();
    let down = Instant::now();
    assert!(
        a.ping(node.gateway()),
        "pod a lost its network with the API server down"
    );
    let b = node.add_pod().unwrap();
    assert!(
        b.ping(node.gateway()),
        "pod b (added with the API down) has no network"
    );
    assert!(b.ping(a.ip()), "pod b cannot reach pod a");
    while down.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(5));
        assert!(
            b.ping(a.ip()),
            "pods lost traffic {:?} into the outage",
            down.elapsed()
        );
    }
    assert!(node.agent().is_running(), "{}", node.agent().log_tail(40));
    api.start_apiserver();
    eprintln!("API server back after {:?}", down.elapsed());

    // The watchers relist: a Pod object and an NPL Service made now are followed again.
    let b_name = b.attachment().pod_name.clone();
    api.kubectl_stdin_ok(&["apply", "-f", "-"], &pod_object(&b_name, node.name()));
    api.kubectl_stdin_ok(&["apply", "-f", "-"], NPL_SERVICE);
    let (ann, took) = wait_pod_annotations(
        &api,
        &b_name,
        Duration::from_secs(60),
        "annotation of pod b after the API restart",
        |a| a.contains_key(m::NPL_ANNOTATION),
    );
    eprintln!("NPL annotation of pod b {took:?} after the restart");

    check_npl_annotation(&node, &ann[m::NPL_ANNOTATION]);
    let log = node.agent().log();
    let outage_logs = log
        .lines()
        .filter(|l| l.contains("watching the Kubernetes API failed"))
        .count();
    eprintln!(
        "{outage_logs} watch-failure log lines for the outage; recoveries: {}",
        log.lines()
            .filter(|l| l.contains("watching the Kubernetes API works again"))
            .count()
    );
    assert!(
        (1..=ferrea_agent::source::kubernetes::gate::Kind::ALL.len()).contains(&outage_logs),
        "watch errors are logged once per kind and outage, not per retry ({outage_logs} lines):\n{}",
        node.agent().log_tail(60)
    );
    eprintln!("test took {:.1}s", t.elapsed().as_secs_f64());
}

/// Without Antrea's CRDs installed the agent still syncs and serves: Egress and
/// ExternalIPPool are empty and said to be missing, once each. The node's Node object comes
/// without `spec.podCIDR` first: CNI ADD says to try again later until it has one.
#[test]
fn kubernetes_source_without_crds_still_serves() {
    if !skip_unless_root("kubernetes_source_without_crds_still_serves") {
        return;
    }
    let t = Instant::now();
    let mut o = NodeOptions::new(Dataplane::Ebpf);
    o.start_agent = false;
    let mut node = SimNode::start(o).unwrap();
    let api = ApiServer::start_in(node.ns());
    // The Node object exists before its pod CIDR does (kube-controller-manager allocates it a
    // moment after the node registers): CNI ADD is told to try again later, naming why.
    api.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\n",
            node.name()
        ),
    );
    node.use_kubernetes_source(api.kubeconfig_path()).unwrap();
    node.agent().spawn().unwrap();
    let early = ferrea_tests::wait_for(Duration::from_secs(10), || {
        match ferrea_tests::Pod::try_add(node.cni(), "early") {
            // Until the agent's socket is up the plugin says so (also code 11); then the
            // agent names what it waits for.
            Ok(Err(out))
                if out.json.as_ref().is_some_and(|j| j["code"] == 11)
                    && out.stdout.contains("spec.podCIDR") =>
            {
                Some(out)
            }
            _ => None,
        }
    })
    .expect("CNI ADD before the node has a pod CIDR: TRY_AGAIN_LATER (11) naming spec.podCIDR");
    eprintln!("ADD before the pod CIDR: {}", early.stdout.trim());
    create_node_object(&api, &node);
    node.agent()
        .wait_ready(ferrea_tests::agent::READY_TIMEOUT)
        .unwrap();
    let p = node.add_pod().unwrap();
    assert!(p.ping(node.gateway()), "the pod has no network");
    let log = node.agent().log();
    for kind in ["Egress", "ExternalIPPool"] {
        let n = log
            .lines()
            .filter(|l| l.contains(&format!("does not serve {kind} ")))
            .count();
        assert_eq!(
            n,
            1,
            "{kind} missing logged {n} times:\n{}",
            node.agent().log_tail(40)
        );
    }
    eprintln!("test took {:.1}s", t.elapsed().as_secs_f64());
}

/// The holder of the seed Egress as the API has it, once its status says an IP of the seed
/// pool is assigned on a node other than `not`: (holder, IP). Panics after `timeout`.
fn wait_egress_holder(
    api: &ApiServer,
    not: Option<&str>,
    timeout: Duration,
) -> (String, std::net::Ipv4Addr, Duration) {
    let t = Instant::now();
    loop {
        let status = egress_json(api)["status"].clone();
        let holder = status["egressNode"].as_str().map(str::to_owned);
        let ip: Option<std::net::Ipv4Addr> =
            status["egressIP"].as_str().and_then(|s| s.parse().ok());
        let assigned = condition(&status, "IPAssigned").is_some_and(|c| c["status"] == "True");
        if let (Some(h), Some(ip), true) = (holder, ip, assigned)
            && Some(h.as_str()) != not
        {
            return (h, ip, t.elapsed());
        }
        assert!(
            t.elapsed() < timeout,
            "no node other than {not:?} holds the seed Egress within {timeout:?}: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

dataplane_tests!(kubernetes_cluster_of_three_nodes);

/// Three simulated nodes whose agents watch one API server on the fabric (the control plane's
/// namespace), with the default configuration (no `clusterCIDRs`): pods on every node reach
/// each other with their own addresses and the outside masqueraded; the seed Egress is held
/// by one node, which writes its status, and selected pods on every node leave with the
/// egress IP on VLAN 100; deleting the holder's Node object moves the IP (the new holder
/// writes the status) and cuts its pods off; the Node coming back reconnects them.
fn kubernetes_cluster_of_three_nodes(dp: Dataplane) {
    use ferrea_tests::capture::{TcpPeers, tcp_seen_source};
    use ferrea_tests::egress::{OTHER, SELECTED, source_seen, wait_source};
    use ferrea_tests::fabric::{INTERNET_IP, VlanGateway};
    use std::net::SocketAddr;

    let t = Instant::now();
    let mut c = Cluster::new().unwrap();
    let mut o = NodeOptions::new(dp);
    o.start_agent = false;
    o.cluster_cidrs = Vec::new();
    for _ in 0..3 {
        c.add_node(&o).unwrap();
    }
    // Declared after the cluster: stopped before the nodes' namespaces go.
    let api = ApiServer::start_on_fabric(c.fabric());
    install_crds(&api);
    api.create_default_service_account();
    for n in c.nodes() {
        create_node_object(&api, n);
    }
    let kubeconfig = install_agent_identity(&api);
    let started = Instant::now();
    for n in c.nodes_mut() {
        n.use_kubernetes_source(&kubeconfig).unwrap();
        n.agent().spawn().unwrap();
    }
    for n in c.nodes_mut() {
        if let Err(e) = n.agent().wait_ready(ferrea_tests::agent::READY_TIMEOUT) {
            let name = n.name().to_owned();
            panic!(
                "agent of {name} not ready: {e:#}\nrefused by RBAC: {:#?}\n{}",
                forbidden(&n.agent().log()),
                n.agent().log_tail(40)
            );
        }
    }
    eprintln!(
        "3 agents ready on the API at {} after {:?}",
        api.ip(),
        started.elapsed()
    );

    // A pod the seed Egress selects and one it does not, on every node, with their Pod objects.
    let gw = VlanGateway::start(c.external(), 100, "10.172.170.254/24".parse().unwrap())
        .expect("VLAN 100 on the external host");
    let listener = TcpPeers::start(c.external(), SocketAddr::from((INTERNET_IP, 8090))).unwrap();
    let labels = |l: &[(&str, &str)]| {
        l.iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (mut selected, mut unselected) = (Vec::new(), Vec::new());
    for n in c.nodes() {
        for (set, l) in [(&mut selected, SELECTED), (&mut unselected, OTHER)] {
            let p = n.add_pod().unwrap();
            api.kubectl_stdin_ok(
                &["apply", "-f", "-"],
                &pod_object_labelled(&p.attachment().pod_name, n.name(), &labels(l)),
            );
            set.push(p);
        }
    }

    // Every pod reaches every other pod, every gateway and the outside.
    let all: Vec<&ferrea_tests::Pod> = selected.iter().chain(&unselected).collect();
    ferrea_tests::traffic::assert_all_reach(&all, c.nodes());
    // No clusterCIDRs configured: the other nodes' pod CIDRs are still never masqueraded.
    let (a, b) = (&unselected[0], &unselected[2]);
    let rec = TcpPeers::start(b.ns(), SocketAddr::from((b.ip(), 8080))).unwrap();
    let seen = tcp_seen_source(a.ns(), rec.addr()).expect("TCP pod to pod across nodes");
    assert_eq!(seen.ip(), a.ip(), "pod {} seen as {seen} on node3", a.ip());
    drop(rec);

    // The seed's pool and Egress: one node holds the IP and says so in the API.
    for yaml in [SEED_POOL, SEED_EGRESS] {
        api.kubectl_stdin_ok(&["apply", "-f", "-"], yaml);
    }
    let (holder, ip, took) = wait_egress_holder(&api, None, Duration::from_secs(15));
    eprintln!("{holder} holds {ip}; in the API after {took:?}");
    let h = c.nodes().iter().position(|n| n.name() == holder).unwrap();
    for (i, p) in selected.iter().enumerate() {
        wait_source(p, &listener, ip, &format!("selected pod on node {}", i + 1));
    }
    for (i, p) in unselected.iter().enumerate() {
        assert_eq!(
            source_seen(p, &listener),
            c.nodes()[i].ip(),
            "an unselected pod leaves masqueraded to its node"
        );
    }

    // The holder's Node object is deleted: the IP moves to another node, which writes the
    // status; the others stop reaching the deleted node's pods.
    api.kubectl_ok(&["delete", "node", &holder]);
    let gone = Instant::now();
    let (new_holder, new_ip, took) =
        wait_egress_holder(&api, Some(&holder), Duration::from_secs(15));
    eprintln!("Node {holder} deleted: {new_holder} holds {new_ip} in the API after {took:?}");
    assert_eq!(new_ip, ip, "the Egress kept its IP");
    // A late write by an agent that had not seen the change yet (the CI run that found this
    // had the deleted node's agent write last): the holder sees it through its watch and
    // writes its status back.
    let late = format!(r#"{{"status":{{"egressNode":"{holder}"}}}}"#);
    patch_status(&api, "egress", EGRESS, &late);
    let (back, _, took) = wait_egress_holder(&api, Some(&holder), Duration::from_secs(5));
    assert_eq!(back, new_holder, "the holder wrote its status back");
    eprintln!("a late write naming {holder} replaced by {back} after {took:?}");
    for (i, p) in selected.iter().enumerate().filter(|(i, _)| *i != h) {
        wait_source(
            p,
            &listener,
            ip,
            &format!("selected pod on node {} after the move", i + 1),
        );
    }
    let other = (h + 1) % 3;
    let cut = ferrea_tests::wait_for(Duration::from_secs(10), || {
        (!unselected[other].ping(unselected[h].ip())).then_some(())
    });
    assert!(
        cut.is_some(),
        "pods on {} still reach pods of the deleted node {holder}",
        c.nodes()[other].name()
    );
    eprintln!(
        "{holder}'s pods unreachable {:?} after its deletion",
        gone.elapsed()
    );

    // The Node comes back: its pods are reachable again and an IP is held and served.
    create_node_object(&api, &c.nodes()[h]);
    let back = Instant::now();
    let again = ferrea_tests::wait_for(Duration::from_secs(10), || {
        unselected[other].ping(unselected[h].ip()).then_some(())
    });
    assert!(
        again.is_some(),
        "{holder}'s pods unreachable after its Node came back"
    );
    eprintln!(
        "{holder}'s pods reachable {:?} after its Node came back",
        back.elapsed()
    );
    let (final_holder, final_ip, _) = wait_egress_holder(&api, None, Duration::from_secs(15));
    assert_eq!(final_ip, ip);
    for (i, p) in selected.iter().enumerate() {
        wait_source(
            p,
            &listener,
            ip,
            &format!("selected pod on node {} at the end", i + 1),
        );
    }
    eprintln!("{final_holder} holds {ip} at the end");

    for n in c.nodes_mut() {
        assert!(n.agent().is_running(), "{}", n.agent().log_tail(40));
        assert_rbac_sufficed(n);
    }
    drop(gw);
    eprintln!("test took {:.1}s", t.elapsed().as_secs_f64());
}

/// In the control plane's namespace, resets every TCP connection from `node` to the API
/// server (`on`), or stops doing so: the agent's watches break and cannot come back.
fn cut_api(api: &ApiServer, node: std::net::Ipv4Addr, on: bool) {
    let script = if on {
        format!(
            "table inet ferrea-test-cut {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  \
             ip saddr {node} tcp dport {} reject with tcp reset\n }}\n}}\n",
            ferrea_tests::apiserver::PORT
        )
    } else {
        "delete table inet ferrea-test-cut\n".to_owned()
    };
    let mut cmd = std::process::Command::new("nft");
    cmd.args(["-f", "-"]);
    ferrea_tests::netns::enter_on_spawn(&mut cmd, api.netns_name()).unwrap();
    let out =
        ferrea_tests::netns::output_with_stdin(&mut cmd, script.as_bytes()).expect("running nft");
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A watch that expires: the agent is cut off from the API while objects change and etcd
/// compacts its history, so its watches resume from a resource version that no longer exists
/// (410 Gone; the API server serves watches from etcd here, `--watch-cache=false`). It relists
/// and follows what it missed: a Service deleted meanwhile loses its NodePortLocal annotation,
/// a Service created meanwhile gets one. Pods keep their network throughout.
#[test]
fn kubernetes_watch_expiry_relists() {
    if !skip_unless_root("kubernetes_watch_expiry_relists") {
        return;
    }
    let t = Instant::now();
    let mut c = Cluster::new().unwrap();
    let mut o = NodeOptions::new(Dataplane::Ebpf);
    o.start_agent = false;
    o.extra_config = m::npl_config(&format!("{}-{}", NPL_RANGE.0, NPL_RANGE.1));
    c.add_node(&o).unwrap();
    let mut api = ApiServer::start_on_fabric_with(c.fabric(), &["--watch-cache=false"]);
    api.create_default_service_account();
    create_node_object(&api, &c.nodes()[0]);
    let kubeconfig = install_agent_identity(&api);
    let node = &mut c.nodes_mut()[0];
    node.use_kubernetes_source(&kubeconfig).unwrap();
    node.agent().spawn().unwrap();
    node.agent()
        .wait_ready(ferrea_tests::agent::READY_TIMEOUT)
        .unwrap();
    let node = &c.nodes()[0];
    let (a, b) = (node.add_pod().unwrap(), node.add_pod().unwrap());
    let (a_name, b_name) = (
        a.attachment().pod_name.clone(),
        b.attachment().pod_name.clone(),
    );
    api.kubectl_stdin_ok(&["apply", "-f", "-"], &pod_object(&a_name, node.name()));
    api.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &pod_object_labelled(&b_name, node.name(), "app: db"),
    );
    api.kubectl_stdin_ok(&["apply", "-f", "-"], NPL_SERVICE);
    wait_pod_annotations(&api, &a_name, Duration::from_secs(10), "a annotated", |a| {
        a.contains_key(m::NPL_ANNOTATION)
    });

    // Cut off: the API server restarts (every connection ends) behind a filter that resets
    // the node's new ones.
    let node_ip = node.ip();
    cut_api(&api, node_ip, true);
    api.stop_apiserver();
    api.start_apiserver();
    // What the agent misses: `web` goes, `db` (selecting pod b) comes; then more writes and
    // a compaction past all of it.
    api.kubectl_ok(&["delete", "service", "web", "-n", "default"]);
    api.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &NPL_SERVICE
            .replace("name: web", "name: db")
            .replace("{app: web}", "{app: db}"),
    );
    for i in 0..5 {
        api.kubectl_ok(&["create", "namespace", &format!("churn{i}")]);
    }
    let rev = api.etcd_revision();
    api.compact_etcd(rev);
    eprintln!("etcd compacted at revision {rev} while the agent was cut off");
    assert!(
        a.ping(b.ip()),
        "pods lost traffic while the API was cut off"
    );
    std::thread::sleep(Duration::from_secs(2));
    cut_api(&api, node_ip, false);
    let healed = Instant::now();

    let (_, took) = wait_pod_annotations(
        &api,
        &b_name,
        Duration::from_secs(60),
        "pod b annotated for the Service created while cut off",
        |a| a.contains_key(m::NPL_ANNOTATION),
    );
    eprintln!("pod b annotated {took:?} after the cut healed");
    wait_pod_annotations(
        &api,
        &a_name,
        Duration::from_secs(30),
        "pod a's annotation removed for the Service deleted while cut off",
        |a| !a.contains_key(m::NPL_ANNOTATION),
    );
    eprintln!(
        "both changes followed {:?} after the cut healed",
        healed.elapsed()
    );
    let node = &mut c.nodes_mut()[0];
    let log = node.agent().log();
    let expired: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("resource version expired (410 Gone)"))
        .collect();
    let watch_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("watch") || l.contains("Kubernetes"))
        .collect();
    assert!(
        !expired.is_empty(),
        "no watch saw its resource version expire (410), so this test proved nothing:\n{}",
        watch_lines.join("\n")
    );
    eprintln!("the agent saw: {}", expired[0]);
    assert!(node.agent().is_running(), "{}", node.agent().log_tail(40));
    drop(api);
    eprintln!("test took {:.1}s", t.elapsed().as_secs_f64());
}
