//! The benchmarks against a real kube-apiserver (built by `scripts/k8s/build.sh`, started by
//! [`ApiServer`] inside the simulated node's namespace).
//!
//! - `npl-kubernetes`: one eBPF node whose agent uses the `kubernetes` source, 100 pods made
//!   through the CNI with their Pod objects; the time from creating a Service annotated
//!   `nodeportlocal.antrea.io/enabled: "true"` that selects them until all 100 Pod objects in
//!   the API carry the `nodeportlocal.antrea.io` annotation (`npl_100_pods_api_ms`, median of
//!   3 rounds; goal: under 1 s), and until all 100 lost it after the Service is deleted
//!   (`npl_100_pods_api_remove_ms`). A `kubectl get pods -w` started before the clock sees
//!   each annotation as the API server sends it, so the figure is the API's, not a poll's.
//! - `kube-source`: the agent watching an API that holds 1,000 Pods (10 of them on this node),
//!   200 Services and 100 Nodes: the time from the agent's start to its first complete
//!   desired state (`kube_source_first_sync_ms`, from its log), its RSS and CPU over 30 s
//!   once synced (`kube_source_rss_mib`, `kube_source_cpu_pct`), and the same agent on the
//!   `files` source with only its own node and pods (the peer of the same run:
//!   `kube_source_rss_vs_files` is the ratio of the two RSS figures).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferrea_tests::apiserver::{ApiServer, create_node_object, install_agent_identity};
use ferrea_tests::{Dataplane, NodeOptions, SimNode};
use serde_json::json;

use crate::{Figures, ms};

/// Pods behind the Service in `npl-kubernetes`.
const NPL_PODS: usize = 100;
/// Rounds of create/delete.
fn rounds() -> usize {
    crate::quick::pick(3, 1)
}

/// A Pod object for `name` on `node`, labelled `app: bench`, container port 8080/TCP.
fn pod_yaml(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  \
         labels: {{app: bench}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    \
         image: registry.invalid/bench\n    ports: [{{name: http, containerPort: 8080, protocol: TCP}}]\n"
    )
}

const NPL_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: bench\n  namespace: default\n  \
    annotations: {nodeportlocal.antrea.io/enabled: \"true\"}\nspec:\n  selector: {app: bench}\n  \
    ports: [{port: 80, targetPort: http, protocol: TCP}]\n";

/// A single-node cluster: the node (agent not started yet), its API server, the default
/// service account, its Node object and the agent's identity from `deploy/`.
fn kube_node(opts: NodeOptions) -> anyhow::Result<(SimNode, ApiServer)> {
    let mut opts = opts;
    opts.start_agent = false;
    let node = SimNode::start(opts)?;
    let api = ApiServer::start_in(node.ns());
    api.create_default_service_account();
    create_node_object(&api, &node);
    let kubeconfig = install_agent_identity(&api);
    node.use_kubernetes_source(&kubeconfig)?;
    Ok((node, api))
}

/// When a pod was seen, its name, and whether it had the NPL annotation then.
type PodSeen = (Instant, String, bool);

/// Streams `kubectl get pods -w`: each line is a pod's name and whether it has the NPL
/// annotation, sent with the time it arrived.
fn watch_pods(api: &ApiServer) -> anyhow::Result<(std::process::Child, mpsc::Receiver<PodSeen>)> {
    let mut cmd = api.kubectl_cmd(&[
        "get",
        "pods",
        "-n",
        "default",
        "-w",
        "--request-timeout=0",
        "-o",
        r#"jsonpath={.metadata.name} {.metadata.annotations.nodeportlocal\.antrea\.io}{"\n"}"#,
    ]);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("kubectl get pods -w")?;
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let now = Instant::now();
            let mut it = line.splitn(2, ' ');
            let name = it.next().unwrap_or_default().to_owned();
            let annotated = it.next().is_some_and(|a| a.trim().starts_with('['));
            if tx.send((now, name, annotated)).is_err() {
                return;
            }
        }
    });
    Ok((child, rx))
}

/// Waits until every pod in `pods` was last seen with `annotated`; returns when the event
/// that completed the set arrived (now, if it was complete already).
fn wait_all(
    rx: &mpsc::Receiver<PodSeen>,
    pods: &BTreeSet<String>,
    annotated: bool,
    seen: &mut BTreeMap<String, bool>,
) -> anyhow::Result<Instant> {
    let complete =
        |seen: &BTreeMap<String, bool>| pods.iter().all(|p| seen.get(p) == Some(&annotated));
    if complete(seen) {
        return Ok(Instant::now());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let n = pods
                .iter()
                .filter(|p| seen.get(*p) == Some(&annotated))
                .count();
            bail!(
                "after 60 s {n} of {} pods have annotated={annotated}",
                pods.len()
            );
        }
        match rx.recv_timeout(left) {
            Ok((at, name, a)) => {
                seen.insert(name, a);
                if complete(seen) {
                    return Ok(at);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("kubectl get pods -w ended"),
        }
    }
}

/// `npl-kubernetes` (see the module doc).
pub fn npl_kubernetes(fig: &mut Figures) -> anyhow::Result<()> {
    let mut opts = NodeOptions::new(Dataplane::Ebpf).pod_cidr("10.244.0.0/24");
    opts.extra_config = ferrea_tests::manifests::npl_config("61000-62000");
    let (mut node, mut api) = kube_node(opts)?;
    node.agent().spawn()?;
    node.agent()
        .wait_ready(ferrea_tests::agent::READY_TIMEOUT)?;
    let pods = node.add_pods_concurrently(NPL_PODS)?;
    let names: BTreeSet<String> = pods
        .iter()
        .map(|p| p.attachment().pod_name.clone())
        .collect();
    let objects: Vec<String> = names.iter().map(|n| pod_yaml(n, node.name())).collect();
    api.kubectl_stdin_ok(&["apply", "-f", "-"], &objects.join("---\n"));
    let (mut watcher, rx) = watch_pods(&api)?;
    let mut seen = BTreeMap::new();
    wait_all(&rx, &names, false, &mut seen)?;
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..rounds() {
        let t = Instant::now();
        api.kubectl_stdin_ok(&["apply", "-f", "-"], NPL_SERVICE);
        on.push(wait_all(&rx, &names, true, &mut seen)? - t);
        let t = Instant::now();
        api.kubectl_ok(&["delete", "service", "bench", "-n", "default"]);
        off.push(wait_all(&rx, &names, false, &mut seen)? - t);
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    on.sort();
    off.sort();
    let (on_ms, off_ms) = (ms(on[on.len() / 2]), ms(off[off.len() / 2]));
    eprintln!(
        "npl-kubernetes: {NPL_PODS} Pod objects annotated in {on_ms} ms, unannotated in {off_ms} ms (median of {}; {:?} / {:?})",
        on.len(),
        on.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        off.iter().map(|d| ms(*d)).collect::<Vec<_>>()
    );
    fig.insert("npl_100_pods_api_ms".into(), json!(on_ms));
    fig.insert("npl_100_pods_api_remove_ms".into(), json!(off_ms));
    fig.insert("npl_100_pods_api_goal_ms".into(), json!(1000));
    drop(pods);
    api.stop_apiserver();
    Ok(())
}

/// Objects in the `kube-source` cluster (a tenth in quick mode).
fn scaled(n: usize) -> usize {
    crate::quick::pick(n, n / 10)
}
const NODES: usize = 100;
const PODS: usize = 1000;
const LOCAL_PODS: usize = 10;
const SERVICES: usize = 200;
/// How long RSS and CPU are sampled once the agent is synced.
fn sample_time() -> Duration {
    crate::quick::pick(Duration::from_secs(30), Duration::from_secs(3))
}

/// The agent's resident set (bytes) and CPU time (seconds), from `/proc/<pid>/stat`.
fn usage(pid: u32) -> anyhow::Result<(u64, f64)> {
    let (cpu, rss, _) = ferrea_agent::metrics::process_stat(Some(pid))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok((rss, cpu))
}

/// RSS (MiB, the median of samples every second) and CPU (% of one core) of `pid` over
/// [`sample_time`].
fn sample(pid: u32) -> anyhow::Result<(f64, f64)> {
    let (_, cpu0) = usage(pid)?;
    let t = Instant::now();
    let mut rss = Vec::new();
    while t.elapsed() < sample_time() {
        std::thread::sleep(Duration::from_secs(1));
        rss.push(usage(pid)?.0);
    }
    let (_, cpu1) = usage(pid)?;
    rss.sort();
    let rss_mib = rss[rss.len() / 2] as f64 / (1024.0 * 1024.0);
    let cpu = (cpu1 - cpu0) / t.elapsed().as_secs_f64() * 100.0;
    Ok((
        (rss_mib * 10.0).round() / 10.0,
        (cpu * 100.0).round() / 100.0,
    ))
}

/// Creates `docs` (YAML documents) in batches of 100 with `kubectl create`.
fn create_all(api: &ApiServer, docs: &[String]) {
    for chunk in docs.chunks(100) {
        api.kubectl_stdin_ok(&["create", "-f", "-"], &chunk.join("---\n"));
    }
}

/// `kube-source` (see the module doc).
pub fn kube_source(fig: &mut Figures) -> anyhow::Result<()> {
    // The peer: the same agent on the files source, with its own node and pods only.
    let files_rss = {
        let mut node = SimNode::start(NodeOptions::new(Dataplane::Ebpf))?;
        let pods = node.add_pods_concurrently(LOCAL_PODS)?;
        let pid = node.agent_pid().context("no agent pid")?;
        let (rss, cpu) = sample(pid)?;
        eprintln!("kube-source peer (files source, {LOCAL_PODS} pods): RSS {rss} MiB, CPU {cpu}%");
        fig.insert("files_source_rss_mib".into(), json!(rss));
        fig.insert("files_source_cpu_pct".into(), json!(cpu));
        drop(pods);
        node.agent().stop()?;
        rss
    };

    let (mut node, api) = kube_node(NodeOptions::new(Dataplane::Ebpf))?;
    let t = Instant::now();
    let (nodes_n, pods_n, services_n) = (scaled(NODES), scaled(PODS), scaled(SERVICES));
    let nodes: Vec<String> = (1..nodes_n)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: bench-node-{i:03}}}\nspec: {{podCIDR: 10.{}.{}.0/24}}\n",
                100 + i / 250,
                i % 250
            )
        })
        .collect();
    create_all(&api, &nodes);
    let pods: Vec<String> = (0..pods_n - LOCAL_PODS)
        .map(|i| {
            let on = format!("bench-node-{:03}", 1 + i % (nodes_n - 1));
            pod_yaml(&format!("remote-{i:04}"), &on)
        })
        .collect();
    create_all(&api, &pods);
    let services: Vec<String> = (0..services_n)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i:03}, namespace: default}}\n\
                 spec: {{selector: {{app: bench}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
            )
        })
        .collect();
    create_all(&api, &services);
    eprintln!(
        "kube-source: {} Nodes, {} Pods, {services_n} Services created in {:?}",
        nodes_n,
        pods_n - LOCAL_PODS,
        t.elapsed()
    );

    let started = Instant::now();
    node.agent().spawn()?;
    let synced = loop {
        if node.agent().log().contains("Kubernetes source synced") {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("not synced after 60 s:\n{}", node.agent().log_tail(30));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    node.agent()
        .wait_ready(ferrea_tests::agent::READY_TIMEOUT)?;
    let local = node.add_pods_concurrently(LOCAL_PODS)?;
    let objects: Vec<String> = local
        .iter()
        .map(|p| pod_yaml(&p.attachment().pod_name, node.name()))
        .collect();
    create_all(&api, &objects);
    let pid = node.agent_pid().context("no agent pid")?;
    let (rss, cpu) = sample(pid)?;
    eprintln!(
        "kube-source: first complete state after {} ms; RSS {rss} MiB, CPU {cpu}% over {:?} (files-source peer {files_rss} MiB)",
        ms(synced),
        sample_time()
    );
    fig.insert("kube_source_first_sync_ms".into(), json!(ms(synced)));
    fig.insert("kube_source_rss_mib".into(), json!(rss));
    fig.insert("kube_source_cpu_pct".into(), json!(cpu));
    fig.insert(
        "kube_source_rss_vs_files".into(),
        json!(((rss / files_rss) * 100.0).round() / 100.0),
    );
    drop(local);
    Ok(())
}
