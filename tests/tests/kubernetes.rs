//! ferrea's CRDs (`deploy/crds/`) against a real kube-apiserver: they install and become
//! Established, the seed manifests apply verbatim with server-side validation, `kubectl get`
//! works by Antrea's short names and prints Antrea's columns, the status subresource behaves as
//! Antrea's does, and invalid objects are refused by the API server naming the field.
//!
//! Each test starts its own etcd and kube-apiserver ([`ApiServer`], about 10 s) in a network
//! namespace of its own, so the file keeps to a few tests that check several things each.

use std::path::Path;
use std::time::Instant;

use ferrea_tests::apiserver::{ApiServer, k8s_bin};
use ferrea_tests::egress::{EGRESS, SEED_EGRESS, SEED_POOL};
use ferrea_tests::skip_unless_root;

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
    api.kubectl_ok(&[
        "patch",
        "egress",
        EGRESS,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"egressIP":"10.172.170.1","egressNode":"node-1"}}"#,
    ]);
    api.kubectl_ok(&[
        "patch",
        "externalippool",
        POOL,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"usage":{"total":199,"used":1}}}"#,
    ]);
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
    let ns = api.netns().name().to_owned();
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
