//! `footprint`: what the agent costs a node, both dataplanes, with every controller on (the
//! `files` source with seed 000's pool and Egress held by the node, NodePortLocal with a
//! Service selecting the pods, ferrea's own service proxy, the membership among agents, the
//! metrics endpoint):
//!
//! - `{dp}_rss_idle_mib`: the agent's resident memory once started and settled with no pod;
//!   `{dp}_rss_peak_start_mib` its high-water mark (`VmHWM`) by then;
//! - `{dp}_rss_100_pods_mib` with 100 pods added through the CNI binary, and
//!   `{dp}_rss_per_pod_kib` the growth per pod; `{dp}_rss_peak_mib` the high-water mark after
//!   the burst of ADDs;
//! - `{dp}_cpu_idle_pct` and `{dp}_cpu_idle_100_pods_pct`: CPU time over 10 s of idling, as a
//!   percentage of one core;
//! - `{dp}_metric_rss_mib`: what the agent's own `ferrea_agent_process_resident_memory_bytes`
//!   says at the same moment as `{dp}_rss_100_pods_mib` (read from `/proc`);
//! - `ovs_daemons_rss_mib`: ovsdb-server and ovs-vswitchd together (the OVS dataplane's
//!   switch, which the agent's figure leaves out);
//! - `cni_add_*` and `bridge_add_*`: the cost of one ADD as a process, for ferrea-cni (which
//!   hands the work to the agent) and for the reference `bridge` + `host-local` plugins (which
//!   keep no daemon and do all of it in the process): the largest resident set of a plugin
//!   process (`maxrss_kib`, host-local's included for the reference) and the CPU time per ADD
//!   (`cpu_ms`), both from `getrusage(RUSAGE_CHILDREN)` in a fresh process that runs only those
//!   plugins (see [`plugin_cost`]);
//! - `bin_*_mib`: the release binaries' sizes.
//!
//! The log names the agent's largest mappings by resident memory when idle (from
//! `/proc/<pid>/smaps`), to show where the figure comes from.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use ferrea_tests::cni::Attachment;
use ferrea_tests::ctl::{self, sample};
use ferrea_tests::manifests as m;
use ferrea_tests::netns::{NetNs, enter_on_spawn};
use ferrea_tests::{Dataplane, NodeOptions, SimNode};
use nix::sys::resource::{UsageWho, getrusage};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Figures, REF_PLUGIN_DIR, Reference};

/// Pods per node.
fn pod_count() -> usize {
    crate::quick::pick(100, 10)
}
/// How long the agent idles before each reading.
fn settle() -> Duration {
    crate::quick::pick(Duration::from_secs(5), Duration::from_secs(1))
}
/// The window the idle CPU is measured over.
fn cpu_window() -> Duration {
    crate::quick::pick(Duration::from_secs(10), Duration::from_secs(1))
}
const MIB: f64 = 1024.0 * 1024.0;

/// One plugin process to run in [`plugin_cost`]'s fresh process.
#[derive(Serialize, Deserialize)]
pub struct Job {
    program: String,
    env: Vec<(String, String)>,
    stdin: String,
    /// The namespace the plugin runs in (the node's).
    netns: String,
}

/// What [`plugin_cost`] measured.
#[derive(Serialize, Deserialize)]
pub struct Cost {
    maxrss_kib: i64,
    cpu_ms: f64,
    calls: usize,
}

/// The hidden `plugin-cost` entry: runs the jobs read from stdin one after the other and prints
/// the resource usage of its children (this process runs nothing else, so the largest
/// resident set is a plugin's).
pub fn plugin_cost() -> anyhow::Result<()> {
    let jobs: Vec<Job> = serde_json::from_reader(std::io::stdin()).context("reading the jobs")?;
    for j in &jobs {
        let mut cmd = Command::new(&j.program);
        cmd.env_clear()
            .envs(j.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        enter_on_spawn(&mut cmd, &j.netns)?;
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {}", j.program))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(j.stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                j.program,
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    let u = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    let cpu = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
    let cost = Cost {
        maxrss_kib: u.max_rss(),
        cpu_ms: (cpu(u.user_time()) + cpu(u.system_time())) / jobs.len().max(1) as f64,
        calls: jobs.len(),
    };
    println!("{}", serde_json::to_string(&cost)?);
    Ok(())
}

/// Runs `jobs` through a fresh `ferrea-bench plugin-cost`.
fn measure_jobs(jobs: &[Job]) -> anyhow::Result<Cost> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("plugin-cost")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    serde_json::to_writer(child.stdin.take().expect("piped"), jobs)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("plugin-cost failed");
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// (resident, high-water mark) of `pid` in bytes, from `/proc/<pid>/status`.
fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> anyhow::Result<u64> {
        let line = s
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("a value")?
            .parse::<u64>()?
            * 1024)
    };
    Ok((kib("VmRSS:")?, kib("VmHWM:")?))
}

/// The `n` mappings of `pid` with the most resident memory (`/proc/<pid>/smaps`), for the log:
/// where the figure comes from.
fn largest_mappings(pid: u32, n: usize) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, String)> = Vec::new();
    let mut name = String::new();
    for l in text.lines() {
        let mut f = l.split_whitespace();
        match f.next() {
            Some("Rss:") => {
                let kib = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                maps.push((kib, name.clone()));
            }
            Some(first) if first.contains('-') && !first.ends_with(':') => {
                name = l.split_whitespace().nth(5).unwrap_or("[anon]").to_owned();
            }
            _ => {}
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.0));
    maps.iter()
        .take(n)
        .map(|(kib, name)| format!("{name} {kib} KiB"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The CPU time of `pid` over [`cpu_window`], in percent of one core.
fn cpu_pct(pid: u32) -> anyhow::Result<f64> {
    let cpu = || {
        ferrea_agent::metrics::process_stat(Some(pid))
            .map(|s| s.0)
            .context("reading the agent's /proc stat")
    };
    let before = cpu()?;
    std::thread::sleep(cpu_window());
    Ok(((cpu()? - before) / cpu_window().as_secs_f64() * 1000.0).round() / 10.0)
}

fn mib(b: u64) -> f64 {
    (b as f64 / MIB * 10.0).round() / 10.0
}

/// Every controller on: see the module doc.
fn options(dp: Dataplane) -> NodeOptions {
    let mut o = NodeOptions::new(dp).pod_cidr("10.244.0.0/24");
    o.extra_config = format!("serviceProxy: ferrea\n{}", m::npl_config("61000-62000"));
    o
}

pub fn footprint(fig: &mut Figures) -> anyhow::Result<()> {
    for bin in ["ferrea-agent", "ferrea-cni", "ferreactl"] {
        let p = ferrea_tests::bin(bin);
        let size = std::fs::metadata(&p)
            .with_context(|| format!("{}", p.display()))?
            .len();
        fig.insert(
            format!("bin_{}_mib", bin.replace('-', "_")),
            json!(mib(size)),
        );
    }
    let labels = [("app", "hello-world1")];
    for dp in [Dataplane::Ebpf, Dataplane::Ovs] {
        let mut sim = SimNode::start(options(dp))?;
        m::write_file(
            sim.node_mut(),
            "egress.yaml",
            &format!(
                "{}\n---\n{}",
                ferrea_tests::egress::SEED_POOL,
                ferrea_tests::egress::SEED_EGRESS
            ),
        )?;
        let pid = sim.node_mut().agent_pid().context("the agent runs")?;
        std::thread::sleep(settle());
        let (idle, peak_start) = rss(pid)?;
        eprintln!(
            "footprint {dp}: largest mappings idle: {}",
            largest_mappings(pid, 6)
        );
        let cpu_idle = cpu_pct(pid)?;
        let pods = sim.add_pods_concurrently(pod_count())?;
        for p in &pods {
            m::write_pod(&sim, &p.attachment().pod_name, &labels, &[])?;
        }
        m::write_service(
            &sim,
            "web",
            true,
            &labels,
            &[m::ServicePort {
                port: 80,
                target_port: "8080",
                protocol: "TCP",
            }],
        )?;
        std::thread::sleep(settle());
        let (with_pods, peak) = rss(pid)?;
        let (status, body) = ctl::http_get(sim.node_mut(), "/metrics")?;
        if status != 200 {
            bail!("{dp}: /metrics answered {status}");
        }
        let metric = sample(&body, "ferrea_agent_process_resident_memory_bytes", &[])
            .context("no ferrea_agent_process_resident_memory_bytes in the scrape")?;
        let cpu_pods = cpu_pct(pid)?;
        let per_pod_kib =
            (with_pods.saturating_sub(idle) as f64 / 1024.0 / pod_count() as f64).round();
        eprintln!(
            "footprint {dp}: idle {} MiB (peak at start {} MiB), {} pods {} MiB ({per_pod_kib} KiB a pod, peak {} MiB, the metric says {} MiB); CPU idle {cpu_idle}% / {cpu_pods}% with pods",
            mib(idle),
            mib(peak_start),
            pod_count(),
            mib(with_pods),
            mib(peak),
            mib(metric as u64)
        );
        fig.insert(format!("{dp}_rss_idle_mib"), json!(mib(idle)));
        fig.insert(format!("{dp}_rss_peak_start_mib"), json!(mib(peak_start)));
        fig.insert(format!("{dp}_rss_100_pods_mib"), json!(mib(with_pods)));
        fig.insert(format!("{dp}_rss_per_pod_kib"), json!(per_pod_kib));
        fig.insert(format!("{dp}_rss_peak_mib"), json!(mib(peak)));
        fig.insert(format!("{dp}_metric_rss_mib"), json!(mib(metric as u64)));
        fig.insert(format!("{dp}_cpu_idle_pct"), json!(cpu_idle));
        fig.insert(format!("{dp}_cpu_idle_100_pods_pct"), json!(cpu_pods));
        if dp == Dataplane::Ovs {
            let ovs = sim.node_mut().ovs().context("the OVS daemons")?;
            let mut total = rss(ovs.ovsdb_pid())?.0;
            if let Some(p) = ovs.vswitchd_pid() {
                total += rss(p)?.0;
            }
            fig.insert("ovs_daemons_rss_mib".into(), json!(mib(total)));
        }
        if dp == Dataplane::Ebpf {
            // ferrea-cni's own cost per ADD (the agent does the work), on this node.
            let node_ns = sim.node_mut().ns().name().to_owned();
            let cni = sim.node_mut().cni().clone();
            let netns: Vec<NetNs> = (0..pod_count())
                .map(|_| NetNs::new("fpc"))
                .collect::<Result<_, _>>()?;
            let jobs: Vec<Job> = netns
                .iter()
                .map(|ns| {
                    let att = Attachment::for_netns(ns.name());
                    Job {
                        program: ferrea_tests::bin("ferrea-cni").display().to_string(),
                        env: cni_env("ADD", &att.container_id, &att.netns, &cni_path()),
                        stdin: cni.config().to_string(),
                        netns: node_ns.clone(),
                    }
                })
                .collect();
            let c = measure_jobs(&jobs)?;
            record_cost(fig, "cni_add", &c);
            for ns in &netns {
                let att = Attachment::for_netns(ns.name());
                cni.del(&att, None)?.expect_ok("ferrea DEL")?;
            }
        }
        drop(pods);
    }
    // The reference plugins for the same number of pods, on a node namespace of their own.
    let dir = tempfile::tempdir()?;
    let reference = Reference::new(dir.path())?;
    let pods: Vec<NetNs> = (0..pod_count())
        .map(|_| NetNs::new("fpr"))
        .collect::<Result<_, _>>()?;
    let jobs: Vec<Job> = pods
        .iter()
        .map(|ns| Job {
            program: format!("{REF_PLUGIN_DIR}/bridge"),
            env: cni_env(
                "ADD",
                &format!("{}-ref", ns.name()),
                &ns.path().display().to_string(),
                Path::new(REF_PLUGIN_DIR),
            ),
            stdin: reference.conf.clone(),
            netns: reference.node.name().to_owned(),
        })
        .collect();
    let c = measure_jobs(&jobs)?;
    record_cost(fig, "bridge_add", &c);
    Ok(())
}

fn cni_path() -> std::path::PathBuf {
    ferrea_tests::bin("ferrea-cni")
        .parent()
        .expect("bin dir")
        .to_owned()
}

/// The CNI environment of one call, as a runtime sets it.
fn cni_env(command: &str, id: &str, netns: &str, path: &Path) -> Vec<(String, String)> {
    [
        ("CNI_COMMAND", command.to_owned()),
        ("CNI_CONTAINERID", id.to_owned()),
        ("CNI_NETNS", netns.to_owned()),
        ("CNI_IFNAME", "eth0".to_owned()),
        ("CNI_PATH", path.display().to_string()),
        (
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={id}"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn record_cost(fig: &mut Figures, key: &str, c: &Cost) {
    eprintln!(
        "{key}: largest plugin process {} KiB, {:.2} ms CPU an ADD over {} ADDs",
        c.maxrss_kib, c.cpu_ms, c.calls
    );
    fig.insert(format!("{key}_maxrss_kib"), json!(c.maxrss_kib));
    fig.insert(
        format!("{key}_cpu_ms"),
        json!((c.cpu_ms * 100.0).round() / 100.0),
    );
}

/// Pod slots the churn cycles through (about half of them hold a pod at any moment).
const CHURN_SLOTS: usize = 20;
/// One CNI call every 50 ms: 10 ADDs and 10 DELs a second.
const CHURN_TICK: Duration = Duration::from_millis(50);
/// Long enough after churn for the agent's minute-by-minute heap trim to have run (quick
/// mode: two seconds, so its figures only show that the churn ran).
fn churn_settle() -> Duration {
    crate::quick::pick(Duration::from_secs(70), Duration::from_secs(2))
}

/// Resident memory, open file descriptors and threads of `pid`.
fn probe(pid: u32) -> anyhow::Result<(u64, usize, usize)> {
    let count = |d: &str| -> anyhow::Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{pid}/{d}"))
            .with_context(|| format!("/proc/{pid}/{d}"))?
            .count())
    };
    Ok((rss(pid)?.0, count("fd")?, count("task")?))
}

/// Churns pods through `slots` for `dur`: one ADD or DEL every [`CHURN_TICK`], each ADD with a
/// new container ID. Returns (calls, failed calls).
fn churn_for(
    cni: &ferrea_tests::cni::Cni,
    slots: &mut [(NetNs, Attachment, bool)],
    generation: &mut u64,
    dur: Duration,
) -> anyhow::Result<(u64, u64)> {
    let (mut calls, mut failed) = (0u64, 0u64);
    let start = std::time::Instant::now();
    let mut next = start;
    let mut i = 0;
    while start.elapsed() < dur {
        let (ns, att, added) = &mut slots[i % slots.len()];
        i += 1;
        let out = if *added {
            cni.del(att, None)?
        } else {
            *generation += 1;
            *att = Attachment::for_netns(ns.name());
            att.container_id = format!("{}-{generation}", ns.name());
            cni.add(att)?
        };
        calls += 1;
        if out.ok() {
            *added = !*added;
        } else {
            failed += 1;
            eprintln!("churn: {out}");
        }
        next += CHURN_TICK;
        if let Some(wait) = next.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok((calls, failed))
}

/// `churn`: the agent (every controller on, as for `footprint`) under ADD and DEL of 10 pods a
/// second for `FERREA_CHURN_SECONDS` (default 600), on the dataplanes in
/// `FERREA_CHURN_DATAPLANES` (default `ebpf,ovs`). Resident memory, file descriptors and
/// threads are read after a 30 s warm-up of the same churn and a settle of
/// [`churn_settle`], and again after the churn and the same settle:
/// `{dp}_churn_{rss_mib,fds,threads}_{before,after}`, `{dp}_churn_rss_growth_kib`,
/// `{dp}_churn_calls` and `{dp}_churn_failed_calls`. Equal figures mean nothing grew with the
/// pods that came and went.
pub fn churn(fig: &mut Figures) -> anyhow::Result<()> {
    let secs: u64 = std::env::var("FERREA_CHURN_SECONDS")
        .ok()
        .map(|s| s.parse())
        .transpose()
        .context("FERREA_CHURN_SECONDS must be a number of seconds")?
        .unwrap_or(crate::quick::pick(600, 5));
    let dps = std::env::var("FERREA_CHURN_DATAPLANES").unwrap_or_else(|_| "ebpf,ovs".into());
    for name in dps.split(',') {
        let dp = match name {
            "ebpf" => Dataplane::Ebpf,
            "ovs" => Dataplane::Ovs,
            other => bail!("FERREA_CHURN_DATAPLANES: unknown dataplane {other:?}"),
        };
        let mut sim = SimNode::start(options(dp))?;
        let pid = sim.node_mut().agent_pid().context("the agent runs")?;
        let cni = sim.cni().clone();
        let mut slots = (0..CHURN_SLOTS)
            .map(|i| {
                let ns = NetNs::new(&format!("ch{i}"))?;
                let att = Attachment::for_netns(ns.name());
                Ok((ns, att, false))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut generation = 0;
        let warm_up = crate::quick::pick(30, 2);
        churn_for(
            &cni,
            &mut slots,
            &mut generation,
            Duration::from_secs(warm_up),
        )?;
        std::thread::sleep(churn_settle());
        let before = probe(pid)?;
        eprintln!("churn {dp}: before: {before:?} (RSS bytes, fds, threads); churning {secs} s");
        let (calls, failed) =
            churn_for(&cni, &mut slots, &mut generation, Duration::from_secs(secs))?;
        std::thread::sleep(churn_settle());
        let after = probe(pid)?;
        let growth_kib = (after.0 as f64 - before.0 as f64) / 1024.0;
        eprintln!(
            "churn {dp}: {calls} calls ({failed} failed) in {secs} s; RSS {} -> {} MiB ({growth_kib:+.0} KiB), fds {} -> {}, threads {} -> {}",
            mib(before.0),
            mib(after.0),
            before.1,
            after.1,
            before.2,
            after.2
        );
        fig.insert(format!("{dp}_churn_rss_mib_before"), json!(mib(before.0)));
        fig.insert(format!("{dp}_churn_rss_mib_after"), json!(mib(after.0)));
        fig.insert(
            format!("{dp}_churn_rss_growth_kib"),
            json!(growth_kib.round()),
        );
        fig.insert(format!("{dp}_churn_fds_before"), json!(before.1));
        fig.insert(format!("{dp}_churn_fds_after"), json!(after.1));
        fig.insert(format!("{dp}_churn_threads_before"), json!(before.2));
        fig.insert(format!("{dp}_churn_threads_after"), json!(after.2));
        fig.insert(format!("{dp}_churn_calls"), json!(calls));
        fig.insert(format!("{dp}_churn_failed_calls"), json!(failed));
        for (_, att, _) in slots.iter().filter(|s| s.2) {
            let _ = cni.del(att, None);
        }
    }
    Ok(())
}
