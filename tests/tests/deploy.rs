//! ferrea's deployment manifests (`deploy/`) against a real kube-apiserver with RBAC: they
//! apply with server-side apply and strict field validation (the CRDs first, then everything
//! in `deploy/`, then the Open vSwitch variant `deploy/ovs/`), the agent's service account can
//! do exactly what the agent needs (`kubectl auth can-i` for every grant and for a few that
//! must stay refused), the agent configuration in the ConfigMap is one the agent accepts, the
//! DaemonSet's pod template has the host paths, the downward-API `NODE_NAME`, the tolerations
//! and the probes (the agent's `/livez` and `/readyz`), and its init container installs files
//! atomically. `deploy/openshift/scc.yaml` is only parsed: its kind exists on OpenShift alone.
//!
//! One test, one [`ApiServer`] (about 10 s).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferrea_agent::config::{Config, DataplaneKind, SourceConfig};
use ferrea_tests::apiserver::ApiServer;
use ferrea_tests::skip_unless_root;
use serde_json::{Value, json};

const NS: &str = "ferrea-system";
const SA: &str = "ferrea-agent";
const DS: &str = "ferrea-agent";
const CM: &str = "ferrea-agent-config";
const AGENT: &str = "ferrea-agent";

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `kubectl apply --server-side --validate=strict -f <path>`: stdout, after checking that it
/// succeeded without warnings (Pod Security, deprecated fields) and applied each of `objects`.
fn apply(api: &ApiServer, path: &Path, objects: &[&str]) -> String {
    let args = [
        "apply",
        "--server-side",
        "--validate=strict",
        "-f",
        &s(path),
    ];
    let out = api.kubectl(&args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "kubectl {args:?} failed:\n{stdout}\n{stderr}"
    );
    assert!(
        !stderr.to_lowercase().contains("warning"),
        "kubectl {args:?} warned:\n{stderr}"
    );
    for o in objects {
        assert!(
            stdout.contains(&format!("{o} serverside-applied")),
            "{} did not apply {o}:\n{stdout}",
            path.display()
        );
    }
    stdout
}

fn get_json(api: &ApiServer, args: &[&str]) -> Value {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&api.kubectl_ok(&a)).expect("kubectl -o json prints JSON")
}

/// The element of a JSON array of objects whose `name` is `name`.
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no {name:?} in {list:#}"))
}

/// `kubectl auth can-i <verb> <resource> [--subresource=<sub>] -A` as the agent: true for
/// "yes".
fn can_i(api: &ApiServer, verb: &str, resource: &str) -> bool {
    let (resource, sub) = match resource.split_once('/') {
        Some((r, sub)) => (r, Some(format!("--subresource={sub}"))),
        None => (resource, None),
    };
    let who = format!("--as=system:serviceaccount:{NS}:{SA}");
    let mut args = vec!["auth", "can-i", verb, resource, "-A", &who];
    if let Some(sub) = &sub {
        args.push(sub);
    }
    let out = api.kubectl(&args);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl {args:?}: {answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

/// Parses the ConfigMap's `agent.yaml` as the agent does: it must be accepted whole, with the
/// Kubernetes source and the in-cluster service account (no kubeconfig).
fn agent_config(text: &str) -> Config {
    let c = Config::parse(text, Path::new("agent.yaml"))
        .unwrap_or_else(|e| panic!("agent.yaml refused: {e}\n{text}"));
    assert_eq!(
        c.source,
        SourceConfig::Kubernetes { kubeconfig: None },
        "{text}"
    );
    c
}

/// The ConfigMap's agent configuration and conflist.
fn config_map(api: &ApiServer) -> (Config, String, Value) {
    let cm = get_json(api, &["configmap", CM, "-n", NS]);
    let text = cm["data"]["agent.yaml"]
        .as_str()
        .expect("agent.yaml in the ConfigMap")
        .to_owned();
    let conflist: Value = serde_json::from_str(
        cm["data"]["10-ferrea.conflist"]
            .as_str()
            .expect("10-ferrea.conflist in the ConfigMap"),
    )
    .expect("the conflist is JSON");
    (agent_config(&text), text, conflist)
}

/// mountPath -> (hostPath, mountPropagation, readOnly) of `container`'s hostPath mounts.
fn host_mounts(pod: &Value, container: &Value) -> BTreeMap<String, (String, Option<String>, bool)> {
    let mut m = BTreeMap::new();
    for vm in container["volumeMounts"].as_array().expect("volumeMounts") {
        let vol = named(&pod["volumes"], vm["name"].as_str().unwrap());
        if let Some(host) = vol["hostPath"]["path"].as_str() {
            m.insert(
                vm["mountPath"].as_str().unwrap().to_owned(),
                (
                    host.to_owned(),
                    vm["mountPropagation"].as_str().map(str::to_owned),
                    vm["readOnly"] == true,
                ),
            );
        }
    }
    m
}

/// Runs the init container's script with its paths moved into a temp dir, twice (the second
/// run replaces files in place), and checks the result: the final files with their modes,
/// no temporary file left, portmap and bandwidth installed only where missing.
fn check_install_script(script: &str, conflist: &str) {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let d = |p: &str| t.path().join(p);
    for dir in [
        "image/bin",
        "image/cni",
        "image/etc",
        "host/bin",
        "host/net.d",
    ] {
        std::fs::create_dir_all(d(dir)).unwrap();
    }
    std::fs::write(d("image/bin/ferrea-cni"), "#!/bin/sh\n").unwrap();
    std::fs::write(d("image/cni/portmap"), "portmap from the image").unwrap();
    std::fs::write(d("image/cni/bandwidth"), "bandwidth from the image").unwrap();
    std::fs::write(d("image/etc/10-ferrea.conflist"), conflist).unwrap();
    // The node has its own portmap, which must stay.
    std::fs::write(d("host/bin/portmap"), "the node's portmap").unwrap();
    let moved = script
        .replace("/usr/local/bin/", &format!("{}/", s(&d("image/bin"))))
        .replace("/opt/ferrea/cni/", &format!("{}/", s(&d("image/cni"))))
        .replace("/etc/ferrea/", &format!("{}/", s(&d("image/etc"))))
        .replace("/host/opt/cni/bin", &s(&d("host/bin")))
        .replace("/host/etc/cni/net.d", &s(&d("host/net.d")));
    for round in 0..2 {
        let out = std::process::Command::new("sh")
            .args(["-ec", &moved])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install script, round {round}: {}\n{moved}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mode = |p: &str| std::fs::metadata(d(p)).unwrap().permissions().mode() & 0o777;
    let read = |p: &str| std::fs::read_to_string(d(p)).unwrap();
    assert_eq!(read("host/bin/ferrea-cni"), "#!/bin/sh\n");
    assert_eq!(mode("host/bin/ferrea-cni"), 0o755);
    assert_eq!(read("host/net.d/10-ferrea.conflist"), conflist);
    assert_eq!(mode("host/net.d/10-ferrea.conflist"), 0o644);
    assert_eq!(read("host/bin/portmap"), "the node's portmap");
    assert_eq!(read("host/bin/bandwidth"), "bandwidth from the image");
    let mut left: Vec<String> = ["host/bin", "host/net.d"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(d(dir)).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["10-ferrea.conflist", "bandwidth", "ferrea-cni", "portmap"]
    );
}

/// `deploy/openshift/scc.yaml`, parsed (offline, `kubectl label --local`): a
/// SecurityContextConstraints for the agent's service account alone.
fn check_scc(api: &ApiServer) {
    let path = deploy("openshift/scc.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let (objects, errors) =
        ferrea_agent::source::manifest::decode(&text).expect("scc.yaml is YAML");
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(objects.len(), 1, "{objects:?}");
    let out = api.kubectl_ok(&[
        "label",
        "--local",
        "-f",
        &s(&path),
        "ferrea.test/parsed=yes",
        "-o",
        "json",
    ]);
    let scc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(scc["apiVersion"], "security.openshift.io/v1");
    assert_eq!(scc["kind"], "SecurityContextConstraints");
    assert_eq!(
        scc["users"],
        json!([format!("system:serviceaccount:{NS}:{SA}")])
    );
    for allow in [
        "allowPrivilegedContainer",
        "allowHostNetwork",
        "allowHostDirVolumePlugin",
    ] {
        assert_eq!(scc[allow], true, "{allow}: {scc:#}");
    }
    for deny in ["allowHostPID", "allowHostIPC"] {
        assert_eq!(scc[deny], false, "{deny}: {scc:#}");
    }
    let volumes = scc["volumes"].as_array().unwrap();
    for v in ["hostPath", "configMap", "projected"] {
        assert!(volumes.contains(&json!(v)), "volumes {volumes:?} lack {v}");
    }
}

#[test]
fn deploy_manifests_apply_with_least_privilege_rbac_and_a_complete_daemonset() {
    if !skip_unless_root(
        "deploy_manifests_apply_with_least_privilege_rbac_and_a_complete_daemonset",
    ) {
        return;
    }
    let t = Instant::now();
    let api = ApiServer::start();
    let started = t.elapsed();

    check_scc(&api);

    // The CRDs, then everything in deploy/ (not its subdirectories), in file order.
    apply(
        &api,
        &deploy("crds"),
        &[
            "customresourcedefinition.apiextensions.k8s.io/egresses.crd.antrea.io",
            "customresourcedefinition.apiextensions.k8s.io/externalippools.crd.antrea.io",
        ],
    );
    api.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/egresses.crd.antrea.io",
        "crd/externalippools.crd.antrea.io",
    ]);
    apply(
        &api,
        &deploy(""),
        &[
            &format!("namespace/{NS}"),
            &format!("serviceaccount/{SA}"),
            "clusterrole.rbac.authorization.k8s.io/ferrea-agent",
            "clusterrolebinding.rbac.authorization.k8s.io/ferrea-agent",
            &format!("configmap/{CM}"),
            &format!("daemonset.apps/{DS}"),
        ],
    );

    // RBAC: every grant the agent needs...
    let grants: &[(&[&str], &str)] = &[
        (&["get", "list", "watch"], "nodes"),
        (&["get", "list", "watch", "patch"], "pods"),
        (&["get", "list", "watch"], "services"),
        (&["get", "list", "watch"], "endpointslices.discovery.k8s.io"),
        (&["get", "list", "watch"], "namespaces"),
        (
            &["get", "list", "watch"],
            "networkpolicies.networking.k8s.io",
        ),
        (&["get", "list", "watch"], "egresses.crd.antrea.io"),
        (&["get", "list", "watch"], "externalippools.crd.antrea.io"),
        (&["update", "patch"], "egresses.crd.antrea.io/status"),
        (&["update", "patch"], "externalippools.crd.antrea.io/status"),
        (&["create", "patch"], "events"),
        (&["create", "patch"], "events.events.k8s.io"),
    ];
    for (verbs, resource) in grants {
        for verb in *verbs {
            assert!(
                can_i(&api, verb, resource),
                "agent cannot {verb} {resource}"
            );
        }
    }
    // ...and nothing beyond.
    let refused: &[(&str, &str)] = &[
        ("get", "secrets"),
        ("list", "secrets"),
        ("get", "configmaps"),
        ("delete", "pods"),
        ("create", "pods"),
        ("update", "pods"),
        ("patch", "pods/status"),
        ("patch", "nodes"),
        ("update", "nodes"),
        ("patch", "nodes/status"),
        ("delete", "nodes"),
        ("patch", "services"),
        ("create", "egresses.crd.antrea.io"),
        ("update", "egresses.crd.antrea.io"),
        ("delete", "externalippools.crd.antrea.io"),
        ("create", "serviceaccounts/token"),
        ("create", "namespaces"),
        ("delete", "events"),
        ("*", "*"),
    ];
    for (verb, resource) in refused {
        assert!(!can_i(&api, verb, resource), "agent may {verb} {resource}");
    }
    let role = get_json(&api, &["clusterrole", "ferrea-agent"]);
    for rule in role["rules"].as_array().unwrap() {
        for field in ["apiGroups", "resources", "verbs"] {
            assert!(
                !rule[field].as_array().unwrap().contains(&json!("*")),
                "wildcard in {rule}"
            );
        }
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
    }

    // The agent configuration: accepted, eBPF, its paths are the DaemonSet's mounts (below).
    let (cfg, _, conflist) = config_map(&api);
    assert_eq!(cfg.dataplane, DataplaneKind::Ebpf);
    assert!(cfg.cluster_cidrs.is_empty(), "{cfg:?}");
    let types: Vec<&str> = conflist["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["ferrea-cni", "portmap", "bandwidth"],
        "{conflist:#}"
    );
    // 1.0.0 for runtimes whose libcni predates 1.1 (containerd 1.6: "unsupported CNI result
    // version 1.1.0") and Debian's portmap/bandwidth; runtimes that read `cniVersions` (CNI
    // 1.1) pick 1.1.0 and so STATUS and GC.
    assert_eq!(conflist["cniVersion"], "1.0.0");
    assert_eq!(
        conflist["cniVersions"],
        serde_json::json!(["1.0.0", "1.1.0"])
    );
    assert_eq!(conflist["name"], "ferrea");
    assert_eq!(
        conflist["plugins"][0]["agentSocket"],
        s(&cfg.cni_socket),
        "the conflist's socket is the agent's"
    );
    assert_eq!(conflist["plugins"][1]["capabilities"]["portMappings"], true);
    assert_eq!(conflist["plugins"][2]["capabilities"]["bandwidth"], true);

    // The DaemonSet as the API server stored it.
    let ds = get_json(&api, &["daemonset", DS, "-n", NS]);
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], SA);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    let image = format!("ferrea/agent:{}", env!("CARGO_PKG_VERSION"));
    for c in pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["containers"].as_array().unwrap())
    {
        assert_eq!(c["image"], image.as_str(), "{}", c["name"]);
        assert_eq!(c["imagePullPolicy"], "IfNotPresent", "{}", c["name"]);
    }
    let agent = named(&pod["containers"], AGENT);
    assert_eq!(agent["securityContext"]["privileged"], true);
    assert_eq!(
        named(&agent["env"], "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(
        agent["command"],
        json!([AGENT, "--config", "/etc/ferrea/agent.yaml", "--log-json"])
    );
    assert_eq!(
        agent["resources"]["requests"],
        json!({"cpu": "50m", "memory": "32Mi"})
    );
    // The probes use the agent's health endpoint, on the port its config serves it.
    assert!(cfg.metrics.enable, "{cfg:?}");
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], cfg.metrics.bind_address.port(), "{probe}");
    }
    assert_eq!(
        cfg.debug_socket(),
        std::path::Path::new("/var/run/ferrea/debug.sock")
    );
    let mounts = host_mounts(pod, agent);
    let want = |path: &str, host: &str, prop: Option<&str>, ro: bool| {
        assert_eq!(
            mounts.get(path),
            Some(&(host.to_owned(), prop.map(str::to_owned), ro)),
            "agent mount {path}: {mounts:#?}"
        );
    };
    want("/sys/fs/bpf", "/sys/fs/bpf", Some("Bidirectional"), false);
    want("/var/run/ferrea", "/var/run/ferrea", None, false);
    want("/var/lib/ferrea", "/var/lib/ferrea", None, false);
    want("/run/netns", "/run/netns", Some("HostToContainer"), false);
    want("/lib/modules", "/lib/modules", None, true);
    // The agent's paths lie on those mounts.
    assert!(cfg.cni_socket.starts_with("/var/run/ferrea"), "{cfg:?}");
    assert!(cfg.state_dir.starts_with("/var/lib/ferrea"), "{cfg:?}");
    assert!(cfg.bpf_pin_path.starts_with("/sys/fs/bpf"), "{cfg:?}");
    let config_vol = named(&agent["volumeMounts"], "config");
    assert_eq!(config_vol["mountPath"], "/etc/ferrea");
    assert_eq!(named(&pod["volumes"], "config")["configMap"]["name"], CM);

    // The init container writes the node's CNI directories, atomically.
    let init = named(&pod["initContainers"], "install-cni");
    let init_mounts = host_mounts(pod, init);
    assert_eq!(
        init_mounts.get("/host/opt/cni/bin").map(|m| m.0.as_str()),
        Some("/opt/cni/bin")
    );
    assert_eq!(
        init_mounts.get("/host/etc/cni/net.d").map(|m| m.0.as_str()),
        Some("/etc/cni/net.d")
    );
    let cmd = init["command"].as_array().unwrap();
    assert_eq!(cmd[..2], [json!("/bin/sh"), json!("-ec")]);
    let conflist_text = serde_json::to_string_pretty(&conflist).unwrap();
    check_install_script(cmd[2].as_str().unwrap(), &conflist_text);

    // The Open vSwitch variant replaces the ConfigMap and the DaemonSet.
    let base_agent = agent.clone();
    let base_conflist = conflist.clone();
    apply(
        &api,
        &deploy("ovs"),
        &[&format!("configmap/{CM}"), &format!("daemonset.apps/{DS}")],
    );
    let (ovs_cfg, _, ovs_conflist) = config_map(&api);
    assert_eq!(ovs_cfg.dataplane, DataplaneKind::Ovs);
    assert_eq!(ovs_conflist, base_conflist);
    assert_eq!(
        Config {
            dataplane: DataplaneKind::Ebpf,
            ..ovs_cfg.clone()
        },
        cfg,
        "the OVS configuration differs from the eBPF one in its dataplane only"
    );
    let ds = get_json(&api, &["daemonset", DS, "-n", NS]);
    let pod = &ds["spec"]["template"]["spec"];
    let names: Vec<&str> = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ovsdb-server", "ovs-vswitchd", AGENT]);
    let run_dir = ovs_cfg.ovs.run_dir.clone();
    assert_eq!(ovs_cfg.ovs.ovsdb_socket.parent(), Some(run_dir.as_path()));
    let mounted = |c: &str, path: &Path| {
        host_mounts(pod, named(&pod["containers"], c))
            .get(&s(path))
            .unwrap_or_else(|| panic!("{c} does not mount {}", path.display()))
            .0
            .clone()
    };
    let run_host = mounted(AGENT, &run_dir);
    for c in ["ovsdb-server", "ovs-vswitchd"] {
        assert_eq!(mounted(c, &run_dir), run_host, "{c}'s run dir");
        assert_eq!(
            named(&pod["containers"], c)["securityContext"]["privileged"],
            true
        );
    }
    let etc = Path::new("/etc/openvswitch");
    assert_eq!(mounted("ovsdb-server", etc), mounted("ovs-vswitchd", etc));
    // The agent container is the eBPF one plus the OVS run dir.
    let mut ovs_agent = named(&pod["containers"], AGENT).clone();
    let vm = ovs_agent["volumeMounts"].as_array_mut().unwrap();
    let before = vm.len();
    vm.retain(|m| m["mountPath"] != s(&run_dir));
    assert_eq!(vm.len(), before - 1);
    assert_eq!(ovs_agent, base_agent);

    drop(api);
    eprintln!(
        "deploy: apiserver up in {:.1}s, whole test {:.1}s",
        started.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
}
