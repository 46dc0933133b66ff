//! ferrea's benchmarks. Each one builds its own simulated nodes (network namespaces deleted on
//! exit, also on failure), measures ferrea and, in the same run, the peers it is compared with,
//! and prints one JSON object of figures as its last line of output.
//!
//! - `cni-latency`: CNI ADD and DEL latency of ferrea (both dataplanes) and of the reference
//!   `bridge` + `host-local` plugins, 100 pods: sequentially at 20 calls a second (`add`,
//!   `del`), sequentially back to back (`burst_add`, `burst_del`), two at a time
//!   (`parallel_*`) and all 100 at once (`concurrent_*`, each call in a thread of its own). Each call is timed around the plugin process, exactly as a runtime
//!   experiences it. The eBPF node is measured again with the metrics endpoint off
//!   (`ferrea_ebpf_no_metrics_*`); `metrics_overhead_pct` is how much slower the median ADD is
//!   with metrics on (the goal: under 2%): the median over 9 interleaved rounds (each 20 paced
//!   ADDs and DELs on both nodes, in alternating order) of the same-round ratio of the p50s,
//!   so that the machine's drift between two long series does not count as overhead. The
//!   single-series figure is `metrics_overhead_series_pct`.
//! - `throughput`: single-stream TCP (iperf3) and 64-byte UDP packet rate between two pods on
//!   one node through ferrea (both dataplanes), and through a direct veth pair (the limit), a
//!   Linux bridge and a plain OVS bridge with the NORMAL action (the OVS backend's peer).
//! - `throughput-cross-node`: single-stream TCP and 64-byte UDP between pods on two different
//!   nodes through ferrea's eBPF overlay, and in the same run between the two nodes'
//!   namespaces directly over the fabric (the limit), over a plain kernel VXLAN device between
//!   them (`kernel_vxlan`, the eBPF backend's peer) and over that device with both ends behind
//!   a veth, as pods are (`kernel_vxlan_veth`: the share of the pod's veth hop). Each is
//!   reported as a fraction of direct. The OVS backend follows on a cluster of its own, once
//!   the eBPF cluster is gone.
//! - `flow-install`: 10,000 flows installed in one OpenFlow bundle through ferrea's OpenFlow
//!   client, and through `ovs-ofctl --bundle add-flows`, on the same ovs-vswitchd.
//! - `npl`: NodePortLocal reaction time on one node with 100 pods (both dataplanes): from
//!   writing the `nodeportlocal.antrea.io/enabled: "true"` annotation on a Service that selects
//!   them until the status view carries all 100 pod annotations and `nft list table` shows the
//!   100 DNAT entries (`npl_100_pods_ms`, the median of 3 rounds; the eBPF node's figure, the
//!   OVS node's is `npl_100_pods_ms_ovs`), and back when the annotation is removed
//!   (`npl_100_pods_remove_ms`). The time includes the `files` source noticing the change
//!   (it polls every 200 ms); the agent's own share, from the change in hand to rules and
//!   annotations written, is `npl_100_pods_agent_sync_ms` (from its log).
//! - `egress`: single-stream TCP and 64-byte UDP from pods to the external host on a two-node
//!   cluster with seed 000's Egress (VLAN 100 sub-interface, policy routing, SNAT by mark),
//!   for both dataplanes: a selected pod on the node holding the egress IP (`egress`), a
//!   selected pod on the other node, whose traffic is tunnelled to the holder first
//!   (`egress_remote`), and an unselected pod leaving through the node's plain masquerade
//!   (`masquerade`), one dataplane at a time, interleaved over 7 rounds; `egress_tcp_gbps_vs_masquerade` is the median
//!   of same-round ratios (goal: at least 0.95). OVS figures carry the `ovs_` prefix.
//! - `npl-kubernetes` and `kube-source`: against a real kube-apiserver, see [`kube`].
//! - `services`: pod-to-ClusterIP TCP and connections per second through ferrea's proxy and
//!   through kube-proxy (nftables mode) beside ferrea, see [`services`].
//! - `footprint`: the agent's memory and idle CPU with no pod and with 100, both dataplanes,
//!   beside the reference plugins' cost per ADD, see [`footprint`].
//!
//! `--quick` before the names runs each benchmark scaled down to seconds and gates the
//! figures that have a goal (see [`quick`]); several names may follow, or `all`.

mod footprint;
mod kube;
mod quick;
mod services;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferrea_tests::cni::Attachment;
use ferrea_tests::netns::{NetNs, enter_on_spawn, run_ok};
use ferrea_tests::ovs::OvsDaemons;
use ferrea_tests::{Dataplane, NodeOptions, Pod, SimNode};
use serde_json::{Value, json};

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
const REF_PLUGIN_DIR: &str = "/usr/lib/cni";
/// Pods per latency series.
fn pods() -> usize {
    quick::pick(100, 10)
}
/// Seconds per iperf3 run: long enough to settle, short enough to keep the run bounded.
fn iperf_seconds() -> &'static str {
    quick::pick("5", "1")
}

type Figures = BTreeMap<String, Value>;

/// Every benchmark, in the order `all` runs them.
const BENCHES: &[&str] = &[
    "cni-latency",
    "throughput",
    "throughput-cross-node",
    "flow-install",
    "npl",
    "egress",
    "npl-kubernetes",
    "kube-source",
    "services",
    "egress-failover",
    "footprint",
    "churn",
];

fn run_bench(which: &str, fig: &mut Figures) -> anyhow::Result<()> {
    match which {
        "cni-latency" => cni_latency(fig),
        "throughput" => throughput(fig),
        "flow-install" => flow_install(fig),
        "throughput-cross-node" => throughput_cross_node(fig),
        "npl" => npl(fig),
        "egress" => egress(fig),
        "npl-kubernetes" => kube::npl_kubernetes(fig),
        "kube-source" => kube::kube_source(fig),
        "services" => services::services_bench(fig),
        "egress-failover" => egress_failover(fig),
        "footprint" => footprint::footprint(fig),
        "churn" => footprint::churn(fig),
        _ => unreachable!("checked against BENCHES"),
    }
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("plugin-cost") {
        // Not a benchmark: the fresh process `footprint` measures plugins in.
        return footprint::plugin_cost();
    }
    if let Some(i) = args.iter().position(|a| a == "--quick") {
        args.remove(i);
        quick::enable();
    }
    if args.len() == 1 && args[0] == "all" {
        args = BENCHES.iter().map(|b| (*b).to_owned()).collect();
    }
    let usage = || {
        format!(
            "usage: bench/run [--quick] NAME... | all\n  NAME: {}",
            BENCHES.join(" | ")
        )
    };
    if args.is_empty() {
        bail!("{}", usage());
    }
    if let Some(bad) = args.iter().find(|a| !BENCHES.contains(&a.as_str())) {
        bail!("unknown benchmark {bad:?}\n{}", usage());
    }
    if args.len() > 1 && !quick::on() {
        bail!(
            "one benchmark at a time, or several with --quick\n{}",
            usage()
        );
    }
    let known = quick::parse_known_misses(include_str!("../known-misses.txt"))
        .context("bench/known-misses.txt")?;
    let mut failed = Vec::new();
    for which in &args {
        let mut fig = Figures::new();
        let t = Instant::now();
        let res = run_bench(which, &mut fig);
        if !quick::on() {
            res?;
            println!("{}", serde_json::to_string(&fig)?);
            return Ok(());
        }
        if let Err(e) = res {
            eprintln!("quick {which}: FAILED to run: {e:#}");
            failed.push(format!("{which}: did not run: {e:#}"));
            continue;
        }
        fig.insert("quick".into(), json!(true));
        println!(
            "{}",
            serde_json::to_string(&json!({ which.as_str(): &fig }))?
        );
        let verdicts = quick::gate(which, &fig, &known, !cfg!(debug_assertions));
        eprintln!("quick {which}: {:.0} s", t.elapsed().as_secs_f64());
        for v in &verdicts {
            let value = v.value.map_or("-".to_owned(), |x| x.to_string());
            let mark = if v.ok { "ok  " } else { "FAIL" };
            eprintln!(
                "  {mark} {} = {value} (threshold {}; {})",
                v.key, v.threshold, v.why
            );
            if !v.ok {
                failed.push(format!(
                    "{which}: {} = {value}, threshold {} ({})",
                    v.key, v.threshold, v.why
                ));
            }
        }
    }
    if !failed.is_empty() {
        bail!("quick benchmarks failed:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// p50 and p99 of `v` in milliseconds.
fn percentiles(v: &mut [Duration]) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (ms(at(0.50)), ms(at(0.99)))
}

fn record(fig: &mut Figures, key: &str, v: &mut [Duration]) {
    let (p50, p99) = percentiles(v);
    fig.insert(format!("{key}_p50_ms"), json!(p50));
    fig.insert(format!("{key}_p99_ms"), json!(p99));
    eprintln!("{key}: p50 {p50} ms, p99 {p99} ms over {} calls", v.len());
}

/// Something that can ADD and DEL a pod namespace, timed as one plugin process each.
trait Plugin: Sync {
    fn add(&self, ns: &NetNs) -> anyhow::Result<Duration>;
    fn del(&self, ns: &NetNs) -> anyhow::Result<Duration>;
}

struct Ferrea<'a>(&'a ferrea_tests::cni::Cni);

impl Plugin for Ferrea<'_> {
    fn add(&self, ns: &NetNs) -> anyhow::Result<Duration> {
        let att = Attachment::for_netns(ns.name());
        let t = Instant::now();
        self.0.add(&att)?.expect_ok("ferrea ADD")?;
        Ok(t.elapsed())
    }
    fn del(&self, ns: &NetNs) -> anyhow::Result<Duration> {
        let att = Attachment::for_netns(ns.name());
        let t = Instant::now();
        self.0.del(&att, None)?.expect_ok("ferrea DEL")?;
        Ok(t.elapsed())
    }
}

/// The reference `bridge` plugin with `host-local` IPAM, run in a node namespace as kubelet's
/// runtime would run it on a node. `ipMasq` is off (it would add iptables rules per pod, a cost
/// ferrea does not have per pod), so the comparison favours the reference.
struct Reference {
    node: NetNs,
    conf: String,
}

impl Reference {
    fn new(dir: &std::path::Path) -> anyhow::Result<Self> {
        let node = NetNs::new("refnode")?;
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": "ref",
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": "10.245.0.0/16" }]],
                "dataDir": dir.join("host-local").display().to_string(),
            },
        })
        .to_string();
        Ok(Self { node, conf })
    }

    fn run(&self, command: &str, ns: &NetNs) -> anyhow::Result<Duration> {
        let mut cmd = Command::new(format!("{REF_PLUGIN_DIR}/bridge"));
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("{}-ref", ns.name()))
            .env("CNI_NETNS", ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", REF_PLUGIN_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The bridge lives in the reference node's namespace, never in the root namespace.
        enter_on_spawn(&mut cmd, self.node.name())?;
        let t = Instant::now();
        let mut child = cmd.spawn().context("running the reference bridge plugin")?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(self.conf.as_bytes())?;
        let out = child.wait_with_output()?;
        let el = t.elapsed();
        if !out.status.success() {
            bail!(
                "reference bridge {command} failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(el)
    }
}

impl Plugin for Reference {
    fn add(&self, ns: &NetNs) -> anyhow::Result<Duration> {
        self.run("ADD", ns)
    }
    fn del(&self, ns: &NetNs) -> anyhow::Result<Duration> {
        self.run("DEL", ns)
    }
}

/// Spacing of the paced series: one call every 50 ms (20 pods a second, more than a kubelet
/// starts on one node), so each call sees the switch idle, as a pod start does in practice.
const PACE: Duration = Duration::from_millis(50);

/// Runs `call` on every pod in turn, starting one call every `pace` (or back to back).
fn series(
    pods: &[NetNs],
    pace: Option<Duration>,
    call: impl Fn(&NetNs) -> anyhow::Result<Duration>,
) -> anyhow::Result<Vec<Duration>> {
    pods.iter()
        .map(|ns| {
            let start = Instant::now();
            let took = call(ns)?;
            if let Some(rest) = pace.and_then(|p| p.checked_sub(start.elapsed())) {
                std::thread::sleep(rest);
            }
            Ok(took)
        })
        .collect()
}

/// ADD then DEL of [`pods`] pods: paced (`{key}_add`, the latency of one call), back to back
/// (`{key}_burst_add`: what a backlog of pod starts sees, including whatever work the previous
/// call left to its switch) and two at a time; records p50/p99 of each.
fn latency_series(fig: &mut Figures, key: &str, p: &dyn Plugin) -> anyhow::Result<()> {
    let pods: Vec<NetNs> = (0..pods())
        .map(|_| NetNs::new("lat"))
        .collect::<Result<_, _>>()?;
    for (kind, pace) in [("", Some(PACE)), ("burst_", None)] {
        let mut adds = series(&pods, pace, |ns| p.add(ns))?;
        let mut dels = series(&pods, pace, |ns| p.del(ns))?;
        record(fig, &format!("{key}_{kind}add"), &mut adds);
        record(fig, &format!("{key}_{kind}del"), &mut dels);
    }

    let (mut padds, mut pdels) = (Vec::new(), Vec::new());
    std::thread::scope(|s| -> anyhow::Result<()> {
        let halves: Vec<_> = pods
            .chunks(pods.len() / 2)
            .map(|chunk| {
                s.spawn(move || -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
                    let a = chunk
                        .iter()
                        .map(|ns| p.add(ns))
                        .collect::<Result<Vec<_>, _>>()?;
                    let d = chunk
                        .iter()
                        .map(|ns| p.del(ns))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok((a, d))
                })
            })
            .collect();
        for h in halves {
            let (a, d) = h.join().expect("latency thread")?;
            padds.extend(a);
            pdels.extend(d);
        }
        Ok(())
    })?;
    record(fig, &format!("{key}_parallel_add"), &mut padds);
    record(fig, &format!("{key}_parallel_del"), &mut pdels);

    // All at once, as a node that starts (or reschedules) many pods sees it: every ADD in a
    // thread of its own, started together, then every DEL.
    for op in ["add", "del"] {
        let start = std::sync::Barrier::new(pods.len());
        let start = &start;
        let mut took = std::thread::scope(|s| -> anyhow::Result<Vec<Duration>> {
            let handles: Vec<_> = pods
                .iter()
                .map(|ns| {
                    s.spawn(move || {
                        start.wait();
                        if op == "add" { p.add(ns) } else { p.del(ns) }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("latency thread"))
                .collect()
        })?;
        record(fig, &format!("{key}_concurrent_{op}"), &mut took);
    }
    Ok(())
}

/// Interleaved rounds of the metrics-overhead figure.
fn overhead_rounds() -> usize {
    quick::pick(9, 1)
}
/// Pods per node and round.
fn overhead_pods() -> usize {
    quick::pick(20, 5)
}

fn cni_latency(fig: &mut Figures) -> anyhow::Result<()> {
    let mut with = SimNode::start(NodeOptions::new(Dataplane::Ebpf).pod_cidr("10.244.0.0/22"))?;
    latency_series(fig, "ferrea_ebpf", &Ferrea(with.node_mut().cni()))?;
    // The same node with the metrics endpoint off: what counting every request costs.
    let mut o = NodeOptions::new(Dataplane::Ebpf).pod_cidr("10.244.0.0/22");
    o.extra_config = "metrics:\n  enable: false\n".into();
    let mut without = SimNode::start(o)?;
    latency_series(
        fig,
        "ferrea_ebpf_no_metrics",
        &Ferrea(without.node_mut().cni()),
    )?;
    for op in ["add", "del"] {
        let r = ratio(
            fig,
            &format!("ferrea_ebpf_{op}_p50_ms"),
            &format!("ferrea_ebpf_no_metrics_{op}_p50_ms"),
        );
        let pct = r.as_f64().map(|r| ((r - 1.0) * 1000.0).round() / 10.0);
        fig.insert(format!("metrics_overhead_{op}_pct"), json!(pct));
    }
    let series_pct = fig.get("metrics_overhead_add_pct").cloned();
    fig.insert(
        "metrics_overhead_series_pct".into(),
        series_pct.unwrap_or(Value::Null),
    );
    // Interleaved rounds on both nodes (see the module doc).
    let pods: Vec<NetNs> = (0..overhead_pods())
        .map(|_| NetNs::new("ovh"))
        .collect::<Result<_, _>>()?;
    let nodes = [
        with.node_mut().cni().clone(),
        without.node_mut().cni().clone(),
    ];
    let mut ratios = Vec::new();
    for round in 0..overhead_rounds() {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut p50 = [0.0; 2];
        for i in order {
            let plugin = Ferrea(&nodes[i]);
            let mut adds = series(&pods, Some(PACE), |ns| plugin.add(ns))?;
            series(&pods, Some(PACE), |ns| plugin.del(ns))?;
            p50[i] = percentiles(&mut adds).0;
        }
        ratios.push(p50[0] / p50[1]);
    }
    let overhead = ((median(ratios.clone()) - 1.0) * 1000.0).round() / 10.0;
    eprintln!(
        "metrics overhead: {overhead}% (median of {} same-round ADD p50 ratios {:?})",
        overhead_rounds(),
        ratios
            .iter()
            .map(|r| (r * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    fig.insert("metrics_overhead_pct".into(), json!(overhead));
    drop(pods);
    drop(without);
    drop(with);
    {
        let mut sim = SimNode::start(NodeOptions::new(Dataplane::Ovs).pod_cidr("10.244.0.0/22"))?;
        latency_series(fig, "ferrea_ovs", &Ferrea(sim.node_mut().cni()))?;
    }
    let dir = tempfile::tempdir()?;
    latency_series(fig, "bridge", &Reference::new(dir.path())?)?;
    for op in [
        "add",
        "del",
        "burst_add",
        "burst_del",
        "parallel_add",
        "parallel_del",
        "concurrent_add",
        "concurrent_del",
    ] {
        for dp in ["ebpf", "ovs"] {
            let r = ratio(
                fig,
                &format!("ferrea_{dp}_{op}_p50_ms"),
                &format!("bridge_{op}_p50_ms"),
            );
            fig.insert(format!("ferrea_{dp}_{op}_p50_vs_bridge"), r);
        }
        let r = ratio(
            fig,
            &format!("ferrea_ovs_{op}_p50_ms"),
            &format!("ferrea_ebpf_{op}_p50_ms"),
        );
        fig.insert(format!("ferrea_ovs_{op}_p50_vs_ebpf"), r);
    }
    Ok(())
}

/// `a / b` from the figures, rounded to three places.
fn ratio(fig: &Figures, a: &str, b: &str) -> Value {
    let get = |k: &str| fig.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    json!((get(a) / get(b) * 1000.0).round() / 1000.0)
}

/// An iperf3 server in `ns`, stopped by PID on drop.
struct Iperf(Child);

impl Iperf {
    fn start(ns: &str, bind: Ipv4Addr) -> anyhow::Result<Self> {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "iperf3",
                "-s",
                "-B",
                &bind.to_string(),
                "-p",
                "5201",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        let me = Iperf(child);
        // Wait until it accepts connections (bounded).
        let ok = ferrea_tests::wait_for(Duration::from_secs(5), || {
            let out = ferrea_tests::netns::exec(ns, &["ss", "-Hltn", "sport", "= :5201"]);
            (!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(())
        });
        if ok.is_none() {
            bail!("iperf3 server in {ns} did not start");
        }
        Ok(me)
    }
}

impl Drop for Iperf {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// Runs an iperf3 client in `client_ns` against `server`; returns (TCP Gbit/s, UDP kpps).
fn iperf_pair(client_ns: &str, server_ns: &str, server: Ipv4Addr) -> anyhow::Result<(f64, f64)> {
    let _srv = Iperf::start(server_ns, server)?;
    let s = server.to_string();
    // The client's JSON report of one run against the server, with `extra` options.
    let client = |extra: &[&str]| -> anyhow::Result<Value> {
        let out = run_ok(
            Command::new("ip")
                .args(["netns", "exec", client_ns, "iperf3", "-c", &s, "-p", "5201"])
                .args(["-t", iperf_seconds(), "-J"])
                .args(extra),
        )?;
        Ok(serde_json::from_str(&out)?)
    };
    let tcp = client(&[])?;
    let gbps = tcp
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
        / 1e9;
    let udp = client(&["-u", "-b", "0", "-l", "64"])?;
    let sum = udp.pointer("/end/sum").cloned().unwrap_or_default();
    let pkts = sum.get("packets").and_then(Value::as_f64).unwrap_or(0.0);
    let lost = sum
        .get("lost_packets")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let secs = sum.get("seconds").and_then(Value::as_f64).unwrap_or(1.0);
    let kpps = (pkts - lost) / secs / 1e3;
    Ok(((gbps * 100.0).round() / 100.0, kpps.round()))
}

/// Gives `ns`'s end of a veth an address and brings it up.
fn addr_up(ns: &NetNs, ifname: &str, cidr: &str) -> anyhow::Result<()> {
    ns.ip(&["addr", "add", cidr, "dev", ifname])?;
    ns.ip(&["link", "set", ifname, "up"])?;
    Ok(())
}

/// Rounds of the throughput comparison. Every path is measured once per round, the paths
/// interleaved, and the median kept: on two shared cores a single run of one path after
/// another mostly measures what else the machine did at that moment.
/// Quick mode keeps 3 rounds of 1 s: a single 1 s sample of a path on this kind of machine
/// swings by a factor of two, the median of three same-round ratios much less.
const ROUNDS: usize = 3;
/// Rounds of the cross-node comparison: its goal (eBPF overlay against kernel VXLAN) is a
/// ratio of two close figures, so it gets more samples.
fn cross_node_rounds() -> usize {
    quick::pick(7, 3)
}

fn throughput(fig: &mut Figures) -> anyhow::Result<()> {
    // Every topology is built first and kept up for the whole run (guards below).
    // The limit: a veth pair straight between two namespaces.
    let (va, vb) = (NetNs::new("va")?, NetNs::new("vb")?);
    va.add_veth("eth0", &vb, "eth0")?;
    addr_up(&va, "eth0", "10.99.0.1/24")?;
    addr_up(&vb, "eth0", "10.99.0.2/24")?;
    // A Linux bridge in its own namespace between two.
    let (br, ba, bb) = (NetNs::new("br")?, NetNs::new("ba")?, NetNs::new("bb")?);
    br.ip(&["link", "add", "br0", "type", "bridge"])?;
    br.ip(&["link", "set", "br0", "up"])?;
    for (ns, port) in [(&ba, "pa"), (&bb, "pb")] {
        br.add_veth(port, ns, "eth0")?;
        br.ip(&["link", "set", port, "master", "br0", "up"])?;
    }
    addr_up(&ba, "eth0", "10.99.1.1/24")?;
    addr_up(&bb, "eth0", "10.99.1.2/24")?;
    // A plain OVS bridge (userspace datapath, default NORMAL action) between two.
    let (sw, oa, ob) = (NetNs::new("ovsn")?, NetNs::new("oa")?, NetNs::new("ob")?);
    let ovs_dir = tempfile::tempdir()?;
    let ovs = OvsDaemons::start(ovs_dir.path(), sw.name())?;
    ovs.vsctl(&[
        "add-br",
        "br0",
        "--",
        "set",
        "Bridge",
        "br0",
        "datapath_type=netdev",
    ])?;
    // Two more on the same bridge whose `eth0` computes its own TX checksums, as ferrea's OVS
    // pods must when the userspace datapath tunnels (`ovs_normal_csum_off`: the same switch
    // under the same constraint as ferrea's OVS pods).
    let (oc, od) = (NetNs::new("oc")?, NetNs::new("od")?);
    for (ns, port) in [(&oa, "pa"), (&ob, "pb"), (&oc, "pc"), (&od, "pd")] {
        sw.add_veth(port, ns, "eth0")?;
        sw.ip(&["link", "set", port, "up"])?;
        ovs.vsctl(&["add-port", "br0", port])?;
    }
    addr_up(&oa, "eth0", "10.99.2.1/24")?;
    addr_up(&ob, "eth0", "10.99.2.2/24")?;
    addr_up(&oc, "eth0", "10.99.2.3/24")?;
    addr_up(&od, "eth0", "10.99.2.4/24")?;
    for ns in [&oc, &od] {
        ns.sh(&["ethtool", "-K", "eth0", "tx", "off"])
            .context("turning TX checksum offload off")?;
    }
    // ferrea: two pods on one node through the real CNI binary, per dataplane.
    let mut sims = Vec::new();
    for dp in [Dataplane::Ebpf, Dataplane::Ovs] {
        let mut sim = SimNode::start(NodeOptions::new(dp))?;
        let node = sim.node_mut();
        let pods = (node.add_pod()?, node.add_pod()?);
        sims.push((sim, pods));
    }

    let mut paths: Vec<(&str, String, String, Ipv4Addr)> = vec![
        (
            "veth",
            va.name().into(),
            vb.name().into(),
            Ipv4Addr::new(10, 99, 0, 2),
        ),
        (
            "bridge",
            ba.name().into(),
            bb.name().into(),
            Ipv4Addr::new(10, 99, 1, 2),
        ),
        (
            "ovs_normal",
            oa.name().into(),
            ob.name().into(),
            Ipv4Addr::new(10, 99, 2, 2),
        ),
        (
            "ovs_normal_csum_off",
            oc.name().into(),
            od.name().into(),
            Ipv4Addr::new(10, 99, 2, 4),
        ),
    ];
    for (key, (_, (p1, p2))) in ["ferrea_ebpf", "ferrea_ovs"].into_iter().zip(&sims) {
        paths.push((key, p1.ns().name().into(), p2.ns().name().into(), p2.ip()));
    }
    let runs = measure_paths(fig, &paths, ROUNDS)?;
    paired_ratios(
        fig,
        &runs,
        &[
            ("ferrea_ebpf", "veth"),
            ("bridge", "veth"),
            ("ferrea_ovs", "ovs_normal"),
            ("ferrea_ovs", "ovs_normal_csum_off"),
            ("ovs_normal_csum_off", "ovs_normal"),
        ],
    );
    Ok(())
}

/// Each path's runs, interleaved over `rounds` rounds: (TCP Gbit/s, UDP kpps) per round.
type Runs<'a> = BTreeMap<&'a str, (Vec<f64>, Vec<f64>)>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures every path once per round, interleaved (in reverse order every other round, so no
/// path always runs first or after the same neighbour), and puts each path's median into
/// `fig` as `{key}_tcp_gbps` and `{key}_udp_kpps`.
fn measure_paths<'a>(
    fig: &mut Figures,
    paths: &[(&'a str, String, String, Ipv4Addr)],
    rounds: usize,
) -> anyhow::Result<Runs<'a>> {
    let mut runs: Runs<'a> = BTreeMap::new();
    for round in 1..=rounds {
        let order: Vec<&(&'a str, String, String, Ipv4Addr)> = if round % 2 == 0 {
            paths.iter().rev().collect()
        } else {
            paths.iter().collect()
        };
        for (key, client, server, ip) in order {
            let (g, k) = iperf_pair(client, server, *ip)?;
            eprintln!("round {round} {key}: {g} Gbit/s TCP, {k} kpps UDP 64 B");
            let e = runs.entry(*key).or_default();
            e.0.push(g);
            e.1.push(k);
        }
    }
    for (key, (g, k)) in &runs {
        fig.insert(format!("{key}_tcp_gbps"), json!(median(g.clone())));
        fig.insert(format!("{key}_udp_kpps"), json!(median(k.clone())));
    }
    Ok(runs)
}

/// `{a}_{k}_vs_{b}` for TCP and UDP: the median over rounds of a/b measured in the same round,
/// which cancels the machine's drift between rounds (a shared VM's throughput wanders by tens
/// of percent over a minute).
fn paired_ratios(fig: &mut Figures, runs: &Runs, pairs: &[(&str, &str)]) {
    for (a, b) in pairs {
        let (Some(ra), Some(rb)) = (runs.get(a), runs.get(b)) else {
            continue;
        };
        for (k, va, vb) in [("tcp_gbps", &ra.0, &rb.0), ("udp_kpps", &ra.1, &rb.1)] {
            let r: Vec<f64> = va.iter().zip(vb).map(|(x, y)| x / y).collect();
            let m = (median(r) * 1000.0).round() / 1000.0;
            fig.insert(format!("{a}_{k}_vs_{b}"), json!(m));
        }
    }
}

/// Two nodes of `dp` with one pod each. The pods are fields before the cluster so that they
/// are deleted (CNI DEL through their node's agent) before the nodes are.
struct TwoNodePods {
    pods: [Pod; 2],
    cluster: ferrea_tests::Cluster,
}

fn two_node_pods(dp: Dataplane) -> anyhow::Result<TwoNodePods> {
    let mut cluster = ferrea_tests::Cluster::new()?;
    for _ in 0..2 {
        cluster.add_node(&NodeOptions::new(dp))?;
    }
    let pods = [cluster.nodes()[0].add_pod()?, cluster.nodes()[1].add_pod()?];
    let [a, b] = &pods;
    // The overlay is up once the first node learnt the second (through its source).
    if ferrea_tests::wait_for(Duration::from_secs(10), || a.ping(b.ip()).then_some(())).is_none() {
        bail!("{dp} pods on two nodes cannot reach each other");
    }
    Ok(TwoNodePods { pods, cluster })
}

fn throughput_cross_node(fig: &mut Figures) -> anyhow::Result<()> {
    let ebpf = two_node_pods(Dataplane::Ebpf)?;
    let [e1, e2] = &ebpf.pods;
    let (n1, n2) = (&ebpf.cluster.nodes()[0], &ebpf.cluster.nodes()[1]);
    // The peer: a plain kernel VXLAN device between the same two node namespaces (its own
    // VNI and port, beside ferrea's external-mode device), MTU as the pods'.
    for (me, other, addr) in [(n1, n2, "10.98.0.1/24"), (n2, n1, "10.98.0.2/24")] {
        let peer = other.ip().to_string();
        me.ns().ip(&[
            "link", "add", "kvx0", "type", "vxlan", "id", "42", "remote", &peer, "dstport", "4790",
            "dev", "eth0",
        ])?;
        me.ns().ip(&["link", "set", "kvx0", "mtu", "1450", "up"])?;
        me.ns().ip(&["addr", "add", addr, "dev", "kvx0"])?;
    }
    // The same kernel VXLAN device with each end behind a veth in a namespace of its own, as
    // a routed CNI (flannel's vxlan backend) puts a pod: what the pod's veth hop costs on this
    // kernel, which has no netkit to avoid it. A reference for reading ferrea_ebpf's figure,
    // not the issue's peer.
    let mut vpods = Vec::new();
    for (i, me) in [n1, n2].into_iter().enumerate() {
        let (mine, theirs) = (i + 1, 2 - i);
        let ns = NetNs::new(&format!("kvp{mine}"))?;
        me.ns().add_veth(&format!("kvp{mine}"), &ns, "eth0")?;
        me.ns()
            .ip(&["link", "set", &format!("kvp{mine}"), "mtu", "1450"])?;
        ns.ip(&["link", "set", "eth0", "mtu", "1450"])?;
        addr_up(
            me.ns(),
            &format!("kvp{mine}"),
            &format!("10.98.{mine}0.1/24"),
        )?;
        addr_up(&ns, "eth0", &format!("10.98.{mine}0.2/24"))?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("10.98.{mine}0.1"),
        ])?;
        me.ns().ip(&[
            "route",
            "add",
            &format!("10.98.{theirs}0.0/24"),
            "via",
            &format!("10.98.0.{theirs}"),
            "dev",
            "kvx0",
        ])?;
        vpods.push(ns);
    }
    let paths: Vec<(&str, String, String, Ipv4Addr)> = vec![
        (
            "direct",
            n1.ns().name().into(),
            n2.ns().name().into(),
            n2.ip(),
        ),
        (
            "kernel_vxlan",
            n1.ns().name().into(),
            n2.ns().name().into(),
            Ipv4Addr::new(10, 98, 0, 2),
        ),
        (
            "kernel_vxlan_veth",
            vpods[0].name().into(),
            vpods[1].name().into(),
            Ipv4Addr::new(10, 98, 20, 2),
        ),
        (
            "ferrea_ebpf",
            e1.ns().name().into(),
            e2.ns().name().into(),
            e2.ip(),
        ),
    ];
    let runs = measure_paths(fig, &paths, cross_node_rounds())?;
    paired_ratios(
        fig,
        &runs,
        &[
            ("kernel_vxlan", "direct"),
            ("ferrea_ebpf", "direct"),
            ("ferrea_ebpf", "kernel_vxlan"),
            ("ferrea_ebpf", "kernel_vxlan_veth"),
            ("kernel_vxlan_veth", "kernel_vxlan"),
        ],
    );
    let direct_tcp = median(runs["direct"].0.clone());
    let direct_udp = median(runs["direct"].1.clone());
    drop(vpods);
    drop(ebpf);
    // The OVS backend on a cluster of its own, once the eBPF one is gone (its daemons stay
    // out of the figures above, and the eBPF agents out of these). Its fraction of direct is
    // against the direct figure above: an OVS node's own address sits behind vswitchd's
    // ferrea-phy bridge, so there is no kernel-only path between two OVS nodes.
    match two_node_pods(Dataplane::Ovs) {
        Ok(ovs) => {
            let [o1, o2] = &ovs.pods;
            let paths = [(
                "ferrea_ovs",
                o1.ns().name().into(),
                o2.ns().name().into(),
                o2.ip(),
            )];
            let runs = measure_paths(fig, &paths, ROUNDS)?;
            let (g, k) = &runs["ferrea_ovs"];
            for (key, v, direct) in [("tcp_gbps", g, &direct_tcp), ("udp_kpps", k, &direct_udp)] {
                let r = median(v.clone()) / direct;
                fig.insert(
                    format!("ferrea_ovs_{key}_vs_direct"),
                    json!((r * 1000.0).round() / 1000.0),
                );
            }
        }
        Err(e) => {
            eprintln!("ferrea_ovs not measured: {e:#}");
            let first = format!("{e:#}")
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            fig.insert("ferrea_ovs_error".into(), json!(first));
        }
    }
    Ok(())
}

/// Trials of `egress-failover`, per kind of failure.
fn failover_trials() -> usize {
    quick::pick(10, 2)
}

/// `egress-failover`: three nodes (eBPF), seed 000's Egress; the holder's agent killed
/// (`failover_ms_*`) and, separately, its fabric port set down (`failover_linkcut_ms_*`),
/// 10 trials each: the time from the failure to the first packet tagged VLAN 100 with the
/// egress IP leaving the new holder (see `ferrea_tests::egress::failover_trial`). Between
/// trials the node comes back and takes its IP back (damping, then handover).
fn egress_failover(fig: &mut Figures) -> anyhow::Result<()> {
    use ferrea_tests::egress::{EgressCluster, Failure, failover_trial, restore_after};
    let mut c = EgressCluster::start_n(Dataplane::Ebpf, 3).context("three-node egress cluster")?;
    for (how, key) in [
        (Failure::Kill, "failover_ms"),
        (Failure::LinkDown, "failover_linkcut_ms"),
    ] {
        let mut v = Vec::new();
        for trial in 0..failover_trials() {
            let (ms, old, new) =
                failover_trial(&mut c, how).with_context(|| format!("{key} trial {trial}"))?;
            eprintln!(
                "{key} trial {trial}: node{} -> node{} in {ms} ms",
                old + 1,
                new + 1
            );
            v.push(Duration::from_millis(ms));
            restore_after(&mut c, old, how).with_context(|| format!("{key} trial {trial}"))?;
        }
        let (p50, _) = percentiles(&mut v);
        let max = v.iter().max().copied().unwrap_or_default();
        fig.insert(format!("{key}_p50"), json!(p50));
        fig.insert(format!("{key}_max"), json!(max.as_secs_f64() * 1000.0));
        fig.insert(format!("{key}_trials"), json!(v.len()));
    }
    Ok(())
}

/// Rounds of the `egress` comparison.
fn egress_rounds() -> usize {
    quick::pick(7, 3)
}

fn egress(fig: &mut Figures) -> anyhow::Result<()> {
    use ferrea_tests::egress::EgressCluster;
    use ferrea_tests::fabric::INTERNET_IP;
    // One dataplane at a time: the other cluster's daemons stay out of the measurement.
    for (dp, [egress, masquerade, remote]) in [
        (Dataplane::Ebpf, ["egress", "masquerade", "egress_remote"]),
        (
            Dataplane::Ovs,
            ["ovs_egress", "ovs_masquerade", "ovs_egress_remote"],
        ),
    ] {
        let c = EgressCluster::start(dp).with_context(|| format!("{dp} egress cluster"))?;
        let ext = c.c.external().name().to_owned();
        // The local paths from pods on the node that holds the egress IP; the remote one from
        // the other node, tunnelled to the holder first.
        let paths: Vec<(&str, String, String, Ipv4Addr)> = vec![
            (
                egress,
                c.selected[c.egress_node].ns().name().into(),
                ext.clone(),
                INTERNET_IP,
            ),
            (
                masquerade,
                c.unselected[c.egress_node].ns().name().into(),
                ext.clone(),
                INTERNET_IP,
            ),
            (
                remote,
                c.selected[c.other_node].ns().name().into(),
                ext.clone(),
                INTERNET_IP,
            ),
        ];
        let runs = measure_paths(fig, &paths, egress_rounds())?;
        paired_ratios(fig, &runs, &[(egress, masquerade), (remote, masquerade)]);
        if dp == Dataplane::Ebpf {
            fig.insert("egress_ip".into(), json!(c.ip.to_string()));
        }
    }
    Ok(())
}

/// Flows in the `flow-install` bundle.
fn flows() -> u32 {
    quick::pick(10_000, 1_000)
}

fn flow_install(fig: &mut Figures) -> anyhow::Result<()> {
    use ferrea_agent::dataplane::ovs::openflow::{FlowMod, Match, OfConn};

    let node = NetNs::new("of")?;
    let dir = tempfile::tempdir()?;
    let ovs = OvsDaemons::start(dir.path(), node.name())?;
    for br in ["br-x", "br-y"] {
        ovs.add_secure_bridge(br)?;
    }
    // 10,000 distinct /32 matches, as a node with many pods and policies would have.
    let flows: Vec<FlowMod> = (0..flows())
        .map(|i| {
            let ip = Ipv4Addr::from(0x0a00_0000 + i);
            FlowMod::add(
                0,
                100,
                u64::from(i) + 1,
                Match::new().ip().ipv4_dst(ip, 32),
                vec![],
            )
        })
        .collect();
    let file = dir.path().join("flows.txt");
    std::fs::write(
        &file,
        flows
            .iter()
            .map(FlowMod::to_ofctl)
            .collect::<Vec<_>>()
            .join("\n")
            + "\n",
    )?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let conn = rt.block_on(OfConn::connect(&dir.path().join("br-x.mgmt")))?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..quick::pick(3, 1) {
        ovs.ofctl(&["del-flows", &ovs.mgmt("br-x")])?;
        ovs.ofctl(&["del-flows", &ovs.mgmt("br-y")])?;
        let t = Instant::now();
        rt.block_on(conn.bundle("bench", &flows))?;
        ours.push(t.elapsed());
        let t = Instant::now();
        ovs.ofctl(&[
            "--bundle",
            "add-flows",
            &ovs.mgmt("br-y"),
            &file.display().to_string(),
        ])?;
        theirs.push(t.elapsed());
    }
    // Both really installed every flow (a benchmark of a failed install would be meaningless).
    for br in ["br-x", "br-y"] {
        let n = ovs
            .ofctl(&["--no-stats", "dump-flows", &ovs.mgmt(br)])?
            .lines()
            .filter(|l| l.contains("nw_dst"))
            .count();
        if n != flows.len() {
            bail!("{br} holds {n} flows, expected {}", flows.len());
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        (v[v.len() / 2].as_secs_f64() * 1000.0).round() / 1000.0
    };
    let (a, b) = (median(&mut ours), median(&mut theirs));
    eprintln!(
        "{} flows in one bundle: ferrea {a} s, ovs-ofctl {b} s (median of {})",
        flows.len(),
        ours.len()
    );
    fig.insert("ferrea_10k_flows_s".into(), json!(a));
    fig.insert("ofctl_10k_flows_s".into(), json!(b));
    fig.insert(
        "ferrea_10k_flows_vs_ofctl".into(),
        ratio(fig, "ferrea_10k_flows_s", "ofctl_10k_flows_s"),
    );
    Ok(())
}

/// Pods behind the Service in the `npl` benchmark.
fn npl_pods() -> usize {
    quick::pick(100, 10)
}
/// Rounds of enable/disable per dataplane.
fn npl_rounds() -> usize {
    quick::pick(3, 1)
}

fn npl(fig: &mut Figures) -> anyhow::Result<()> {
    use ferrea_tests::manifests::{self as m, ContainerPort, ServicePort};
    let labels = [("app", "bench")];
    let ports = [ServicePort {
        port: 80,
        target_port: "8080",
        protocol: "TCP",
    }];
    for dp in [Dataplane::Ebpf, Dataplane::Ovs] {
        let mut opts = NodeOptions::new(dp).pod_cidr("10.244.0.0/24");
        opts.extra_config = m::npl_config("61000-62000");
        let mut sim = SimNode::start(opts)?;
        let pods = sim.add_pods_concurrently(npl_pods())?;
        for p in &pods {
            m::write_pod(
                &sim,
                &p.attachment().pod_name,
                &labels,
                &[ContainerPort {
                    name: "http",
                    port: 8080,
                    protocol: "TCP",
                }],
            )?;
        }
        m::write_service(&sim, "bench", false, &labels, &ports)?;
        // Let the source pick up the pods before the clock starts.
        std::thread::sleep(Duration::from_secs(1));
        let count = |sim: &SimNode| -> anyhow::Result<(usize, usize)> {
            Ok((
                m::npl_annotations(sim)?.len(),
                m::npl_map_elements(sim)?.len(),
            ))
        };
        let wait_for = |want: usize| -> anyhow::Result<Duration> {
            let t = Instant::now();
            loop {
                let (ann, rules) = count(&sim)?;
                if ann == want && rules == want {
                    return Ok(t.elapsed());
                }
                if t.elapsed() > Duration::from_secs(30) {
                    bail!("{dp}: {ann} annotations and {rules} rules after 30 s, want {want}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..npl_rounds() {
            m::write_service(&sim, "bench", true, &labels, &ports)?;
            on.push(wait_for(npl_pods())?);
            m::write_service(&sim, "bench", false, &labels, &ports)?;
            off.push(wait_for(0)?);
        }
        on.sort();
        off.sort();
        let (on_ms, off_ms) = (ms(on[on.len() / 2]), ms(off[off.len() / 2]));
        eprintln!(
            "npl {dp}: {} pods mapped in {on_ms} ms, unmapped in {off_ms} ms (median of {}; rounds {:?} / {:?})",
            npl_pods(),
            on.len(),
            on.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            off.iter().map(|d| ms(*d)).collect::<Vec<_>>()
        );
        let suffix = if dp == Dataplane::Ebpf {
            String::new()
        } else {
            format!("_{dp}")
        };
        // The agent's own share (desired state in hand to rules and annotations written),
        // from its log: the rest is the source noticing the file change.
        let mut syncs: Vec<f64> = sim
            .agent()
            .log()
            .lines()
            .filter(|l| {
                l.contains("NodePortLocal mappings applied")
                    && l.contains(&format!("mappings={} ", npl_pods()))
            })
            .filter_map(|l| {
                l.split("elapsed_ms=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        syncs.sort_by(f64::total_cmp);
        if let Some(mid) = syncs.get(syncs.len() / 2) {
            eprintln!(
                "npl {dp}: agent sync with {} mappings: {syncs:?} ms",
                npl_pods()
            );
            fig.insert(format!("npl_100_pods_agent_sync_ms{suffix}"), json!(mid));
        }
        fig.insert(format!("npl_100_pods_ms{suffix}"), json!(on_ms));
        fig.insert(format!("npl_100_pods_remove_ms{suffix}"), json!(off_ms));
        drop(pods);
    }
    Ok(())
}
