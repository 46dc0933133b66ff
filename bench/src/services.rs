//! `services`: pod-to-ClusterIP traffic through ferrea's own proxy (`serviceProxy: ferrea`)
//! and, in the same run, through a real kube-proxy in nftables mode beside ferrea (the peer),
//! on both dataplanes. Two nodes; the client pod and five backends on the first, five
//! backends on the second.
//!
//! For 10 and for 1,000 Services in place (the extra ones are ClusterIPs with one endpoint
//! each, never called): single-stream TCP (iperf3, 3 s) to a ClusterIP whose one backend is on
//! the client's node (`*_tcp_gbps`), and new connections per second (one client connecting,
//! reading one byte and closing, back to back for 2 s) to a ClusterIP with 1 backend on the
//! client's node and with 10 backends on both nodes (`*_cps_1`, `*_cps_10`). Keys are
//! `<dataplane>_<ferrea|kube_proxy>_<figure>_<services>` (medians of 3 rounds); the ratios the
//! issue asks for are `<dataplane>_proxy_vs_kube_proxy_tcp` and `..._cps` (10 backends), with
//! 10 Services, and the same with `_1000` appended, each the median of the same-round ratios
//! (both clusters run at once and are measured alternately); `<dataplane>_ferrea_1000_vs_10_cps` says whether 1,000
//! Services cost anything.
//!
//! `<dataplane>_<proxy>_failed_connections_<services>`: connections of the rate runs that
//! failed (2 s timeout), over all rounds.
//!
//! `<dataplane>_<proxy>_endpoint_change_ms`: from writing an EndpointSlice that replaces a
//! Service's only endpoint until the client's connections reach the new one (the median of 3;
//! the files source polls every 200 ms, the API path includes kube-proxy's own sync delay).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferrea_tests::apiserver::ApiServer;
use ferrea_tests::kubeproxy::{Backend, KubeProxy, KubeProxySpec, ProxyMode, ServiceSpec};
use ferrea_tests::manifests::write_file;
use ferrea_tests::netns::{NetNs, run_ok};
use ferrea_tests::node::node_manifest;
use ferrea_tests::{Cluster, Dataplane, NodeOptions, Pod};
use serde_json::{Value, json};

use crate::{Figures, Iperf, median};

/// The backends' port for connections per second.
const CPS_PORT: u16 = 8080;
/// iperf3's port.
const IPERF_PORT: u16 = 5201;
/// The Service with one backend (on the client's node).
const ONE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The Service for iperf3 (one backend, the same as [`ONE`]'s).
const ONE_IPERF: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
/// The Service with ten backends.
const TEN: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// The Service whose endpoint is replaced.
const MOVING: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
/// Seconds of each connections-per-second run.
fn cps_seconds() -> u64 {
    crate::quick::pick(2, 1)
}

/// Who translates Services.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Ferrea,
    KubeProxy,
}

impl Proxy {
    fn key(self) -> &'static str {
        match self {
            Proxy::Ferrea => "ferrea",
            Proxy::KubeProxy => "kube_proxy",
        }
    }
}

/// A listener answering each connection with its tag and closing, on a thread inside a pod;
/// stopped on drop.
struct TagServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TagServer {
    fn start(ns: &NetNs, tag: String) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let l = match TcpListener::bind(("0.0.0.0", CPS_PORT)) {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            // A blocking accept that gives up every 50 ms to look at the stop flag
            // (SO_RCVTIMEO bounds accept(2) too): a connection is answered as soon as it is
            // established, as an event-driven server would, so the rate measures the path
            // and not a polling interval.
            let timeout = nix::sys::time::TimeVal::new(0, 50_000);
            if let Err(e) = nix::sys::socket::setsockopt(
                &l,
                nix::sys::socket::sockopt::ReceiveTimeout,
                &timeout,
            ) {
                eprintln!("server {tag}: SO_RCVTIMEO: {e}");
                return;
            }
            while !s.load(Ordering::Relaxed) {
                if let Ok((mut c, _)) = l.accept() {
                    let _ = c.write_all(tag.as_bytes());
                }
            }
        });
        rx.recv().context("server thread died")??;
        Ok(TagServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TagServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection: connect, read to the end, close; the tag read.
fn ask(addr: SocketAddr) -> std::io::Result<String> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut s = String::new();
    c.read_to_string(&mut s)?;
    Ok(s)
}

/// Connections per second to `addr` from inside `ns`, back to back for [`cps_seconds`],
/// and how many failed (refused, reset or timed out after 2 s): reported, not hidden.
fn cps(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<(f64, u64)> {
    ns.run(move || {
        let t = Instant::now();
        let (mut ok, mut failed) = (0u64, 0u64);
        while t.elapsed() < Duration::from_secs(cps_seconds()) {
            match ask(addr) {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        if ok == 0 {
            bail!("no connection to {addr} succeeded ({failed} failed)");
        }
        Ok(((ok as f64 / t.elapsed().as_secs_f64()).round(), failed))
    })
}

/// Single-stream TCP Gbit/s from `client` to `addr` (an iperf3 server behind it).
fn iperf_to(client: &str, addr: Ipv4Addr) -> anyhow::Result<f64> {
    let out = run_ok(
        Command::new("ip")
            .args(["netns", "exec", client, "iperf3", "-c", &addr.to_string()])
            .args(["-p", &IPERF_PORT.to_string(), "-t", "3", "-J"]),
    )?;
    let v: Value = serde_json::from_str(&out)?;
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("iperf3 report without sum_received")?;
    Ok((bps / 1e9 * 100.0).round() / 100.0)
}

/// The Services of a round: the measured ones plus fillers up to `total`.
fn services(backends: &[Backend], total: usize, moving: &Backend) -> Vec<ServiceSpec<'static>> {
    let svc = |name: String, ip: Ipv4Addr, port: u16, target: u16, b: Vec<Backend>| ServiceSpec {
        name: Box::leak(name.into_boxed_str()),
        kind: "ClusterIP",
        cluster_ip: ip,
        protocol: "TCP",
        port,
        target_port: target,
        node_port: None,
        backends: b,
    };
    let mut v = vec![
        svc("one".into(), ONE, 80, CPS_PORT, vec![backends[0].clone()]),
        svc(
            "one-iperf".into(),
            ONE_IPERF,
            IPERF_PORT,
            IPERF_PORT,
            vec![backends[0].clone()],
        ),
        svc("ten".into(), TEN, 80, CPS_PORT, backends.to_vec()),
        svc("moving".into(), MOVING, 80, CPS_PORT, vec![moving.clone()]),
    ];
    for i in v.len()..total {
        let ip = Ipv4Addr::new(10, 96, 4 + (i / 250) as u8, (i % 250) as u8 + 1);
        v.push(svc(
            format!("filler-{i}"),
            ip,
            80,
            CPS_PORT,
            vec![backends[1].clone()],
        ));
    }
    v
}

/// Two nodes, pods and servers, and either ferrea's proxy or kube-proxy. Drops in order:
/// servers, kube-proxies, pods, the cluster, the API server.
struct Env {
    _servers: Vec<TagServer>,
    _iperf: Iperf,
    proxies: Vec<KubeProxy>,
    pods: Vec<Vec<Pod>>,
    cluster: Cluster,
    api: Option<ApiServer>,
    proxy: Proxy,
}

impl Env {
    fn start(dp: Dataplane, proxy: Proxy) -> anyhow::Result<Env> {
        let mut cluster = Cluster::new()?;
        for _ in 0..2 {
            let mut opts = NodeOptions::new(dp);
            if proxy == Proxy::Ferrea {
                opts.extra_config = "serviceProxy: ferrea\n".into();
            }
            cluster.add_node(&opts)?;
        }
        let pods = vec![
            cluster.nodes()[0].add_pods_concurrently(6)?,
            cluster.nodes()[1].add_pods_concurrently(5)?,
        ];
        let mut servers = Vec::new();
        for (n, node_pods) in pods.iter().enumerate() {
            for (i, p) in node_pods.iter().enumerate().skip(usize::from(n == 0)) {
                servers.push(TagServer::start(p.ns(), format!("n{n}p{i}"))?);
            }
        }
        let iperf = Iperf::start(pods[0][1].ns().name(), pods[0][1].ip())?;
        let api = (proxy == Proxy::KubeProxy).then(|| ApiServer::start_on_fabric(cluster.fabric()));
        let mut proxies = Vec::new();
        if let Some(api) = &api {
            for n in cluster.nodes() {
                api.kubectl_stdin_ok(
                    &["apply", "-f", "-"],
                    &node_manifest(n.name(), n.pod_cidr(), n.ip()),
                );
                proxies.push(KubeProxy::start(
                    api,
                    KubeProxySpec {
                        netns: n.ns().name().to_owned(),
                        node_name: n.name().to_owned(),
                        node_ip: n.ip(),
                        cluster_cidr: "10.244.0.0/16".into(),
                        node_port_cidr: "172.18.0.0/24".into(),
                        mode: ProxyMode::Nftables,
                    },
                )?);
            }
        }
        Ok(Env {
            _servers: servers,
            _iperf: iperf,
            proxies,
            pods,
            cluster,
            api,
            proxy,
        })
    }

    fn backend(&self, n: usize, i: usize) -> Backend {
        Backend {
            ip: self.pods[n][i].ip(),
            node: self.cluster.nodes()[n].name().to_owned(),
        }
    }

    /// The ten backends: node 0's five, then node 1's.
    fn backends(&self) -> Vec<Backend> {
        (1..6)
            .map(|i| self.backend(0, i))
            .chain((0..5).map(|i| self.backend(1, i)))
            .collect()
    }

    /// Puts `svcs` in place and waits until the client reaches the measured Services.
    fn apply(&mut self, svcs: &[ServiceSpec<'_>]) -> anyhow::Result<()> {
        let yaml: Vec<String> = svcs.iter().map(ServiceSpec::yaml).collect();
        match &self.api {
            Some(api) => {
                // kubectl apply of 1,000 objects in one stream.
                api.kubectl_stdin_ok(&["apply", "-f", "-"], &yaml.join("---\n"));
                let last = svcs
                    .last()
                    .map(|s| s.cluster_ip.to_string())
                    .unwrap_or_default();
                for p in &mut self.proxies {
                    p.wait_rules(&[&last], Duration::from_secs(120))?;
                }
            }
            None => {
                for n in self.cluster.nodes() {
                    write_file(n, "services.yaml", &yaml.join("---\n"))?;
                }
            }
        }
        let client = self.pods[0][0].ns();
        for vip in [ONE, TEN, MOVING] {
            let addr = SocketAddr::from((vip, 80));
            let ok = ferrea_tests::wait_for(Duration::from_secs(60), || {
                client.run(move || ask(addr).ok())
            });
            if ok.is_none() {
                bail!("{} never reached {addr}", self.proxy.key());
            }
        }
        Ok(())
    }

    /// Replaces the `moving` Service's endpoint with `to` and times until the client's
    /// connections reach it.
    fn endpoint_change(
        &mut self,
        all: &[ServiceSpec<'static>],
        to: &Backend,
        tag: &str,
    ) -> anyhow::Result<f64> {
        let mut svcs = all.to_vec();
        let m = svcs
            .iter_mut()
            .find(|s| s.name == "moving")
            .context("moving Service")?;
        m.backends = vec![to.clone()];
        let client = self.pods[0][0].ns();
        let addr = SocketAddr::from((MOVING, 80));
        let t = Instant::now();
        match &self.api {
            Some(api) => {
                api.kubectl_stdin_ok(&["apply", "-f", "-"], &m.yaml());
            }
            None => {
                let yaml: Vec<String> = svcs.iter().map(ServiceSpec::yaml).collect();
                for n in self.cluster.nodes() {
                    write_file(n, "services.yaml", &yaml.join("---\n"))?;
                }
            }
        }
        let tag = tag.to_owned();
        let reached = ferrea_tests::wait_for(Duration::from_secs(30), || {
            let tag = tag.clone();
            client
                .run(move || ask(addr).ok())
                .filter(|a| *a == tag)
                .map(|_| t.elapsed())
        });
        let d = reached.context("the new endpoint was never reached")?;
        Ok(crate::ms(d))
    }
}

/// Rounds of measurements; each figure is the median over them, each ratio the median of
/// the same-round ratios (the two proxies are measured alternately within a round, so the
/// machine's drift cancels out).
/// Quick mode too: one round's ratio is too noisy to gate on.
const ROUNDS: usize = 3;

/// One round's figures of one proxy: TCP Gbit/s, conn/s with 1 and with 10 backends, and
/// the failed connections of both connection runs.
fn measure(env: &Env) -> anyhow::Result<([f64; 3], u64)> {
    let client = env.pods[0][0].ns();
    let tcp = iperf_to(client.name(), ONE_IPERF)?;
    let (c1, f1) = cps(client, SocketAddr::from((ONE, 80)))?;
    let (c10, f10) = cps(client, SocketAddr::from((TEN, 80)))?;
    Ok(([tcp, c1, c10], f1 + f10))
}

/// Runs the benchmark (see the module doc).
pub fn services_bench(fig: &mut Figures) -> anyhow::Result<()> {
    const NAMES: [&str; 3] = ["tcp_gbps", "cps_1", "cps_10"];
    for dp in [Dataplane::Ebpf, Dataplane::Ovs] {
        let d = dp.as_str();
        // Both clusters at once, so that every round measures both.
        let mut envs = [
            Env::start(dp, Proxy::Ferrea)?,
            Env::start(dp, Proxy::KubeProxy)?,
        ];
        // Quick mode: 10 Services only (1,000 take minutes to program through kube-proxy).
        let totals: &[usize] = crate::quick::pick(&[10, 1000], &[10]);
        for &total in totals {
            for env in &mut envs {
                let backends = env.backends();
                let svcs = services(&backends, total, &backends[0]);
                env.apply(&svcs)?;
            }
            let mut per: [[Vec<f64>; 3]; 2] = Default::default();
            let mut ratios: [Vec<f64>; 3] = Default::default();
            let mut failed = [0u64; 2];
            for round in 0..ROUNDS {
                let mut got = [[0.0; 3]; 2];
                // Alternate which proxy goes first.
                for k in 0..2 {
                    let e = (k + round) % 2;
                    let (g, f) = measure(&envs[e])?;
                    got[e] = g;
                    failed[e] += f;
                }
                for e in 0..2 {
                    for (m, v) in got[e].iter().enumerate() {
                        per[e][m].push(*v);
                    }
                }
                for m in 0..3 {
                    ratios[m].push(got[0][m] / got[1][m]);
                }
                println!(
                    "{d} {total} Services, round {round}: ferrea {:?}, kube-proxy {:?} (Gbit/s, conn/s 1 backend, conn/s 10 backends)",
                    got[0], got[1]
                );
            }
            for (e, env) in envs.iter().enumerate() {
                fig.insert(
                    format!("{d}_{}_failed_connections_{total}", env.proxy.key()),
                    json!(failed[e]),
                );
                for (m, name) in NAMES.iter().enumerate() {
                    fig.insert(
                        format!("{d}_{}_{name}_{total}", env.proxy.key()),
                        json!(median(per[e][m].clone())),
                    );
                }
            }
            let sfx = if total == 10 {
                String::new()
            } else {
                format!("_{total}")
            };
            let r3 = |v: &Vec<f64>| json!((median(v.clone()) * 1000.0).round() / 1000.0);
            fig.insert(format!("{d}_proxy_vs_kube_proxy_tcp{sfx}"), r3(&ratios[0]));
            fig.insert(format!("{d}_proxy_vs_kube_proxy_cps{sfx}"), r3(&ratios[2]));
            fig.insert(
                format!("{d}_proxy_vs_kube_proxy_cps_1_backend{sfx}"),
                r3(&ratios[1]),
            );
            if total == 10 {
                for env in &mut envs {
                    let backends = env.backends();
                    let svcs = services(&backends, total, &backends[0]);
                    let mut v = Vec::new();
                    for round in 0..crate::quick::pick(3, 1) {
                        // Alternate between two endpoints: n1p1 and n0p2.
                        let (to, tag) = if round % 2 == 0 {
                            (env.backend(1, 1), "n1p1")
                        } else {
                            (env.backend(0, 2), "n0p2")
                        };
                        v.push(env.endpoint_change(&svcs, &to, tag)?);
                    }
                    fig.insert(
                        format!("{d}_{}_endpoint_change_ms", env.proxy.key()),
                        json!(median(v)),
                    );
                }
            }
        }
        let get = |k: &str| fig.get(k).and_then(Value::as_f64);
        if let (Some(a), Some(b)) = (
            get(&format!("{d}_ferrea_cps_10_1000")),
            get(&format!("{d}_ferrea_cps_10_10")),
        ) {
            fig.insert(
                format!("{d}_ferrea_1000_vs_10_cps"),
                json!((a / b * 1000.0).round() / 1000.0),
            );
        }
    }
    Ok(())
}
