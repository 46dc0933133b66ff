//! ferrea-demo: simulated nodes (two by default) on a fabric with an external host, and pods
//! created through the real `ferrea-cni` binary on each; shows traffic flowing on a node,
//! across nodes through the overlay and out through masquerade, and tears everything down,
//! also on Ctrl-C or a failed step.
//!
//! Run as root after `cargo build --bins`:
//! `ferrea-demo [--dataplane ebpf|ovs] [--nodes N] [--pods N]`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use ferrea_tests::capture::{TcpPeers, tcp_seen_source};
use ferrea_tests::fabric::INTERNET_IP;
use ferrea_tests::{Cluster, Dataplane, NodeOptions};

/// Builds a simulated node with ferrea and shows pod traffic.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Dataplane backend of the agent.
    #[arg(long, default_value = "ebpf")]
    dataplane: Dataplane,
    /// Number of nodes (1 to 5).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Number of pods per node (at least 2).
    #[arg(long, default_value_t = 2)]
    pods: usize,
}

/// Set by the signal thread; checked between steps so the guards unwind normally.
static CANCELLED: AtomicBool = AtomicBool::new(false);

fn step(n: u32, what: &str) -> anyhow::Result<()> {
    if CANCELLED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    println!("\n==> step {n}: {what}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.pods >= 2, "--pods must be at least 2");
    ensure!((1..=5).contains(&args.nodes), "--nodes must be 1 to 5");
    ensure!(
        nix::unistd::Uid::effective().is_root(),
        "ferrea-demo needs root (network namespaces)"
    );
    // SIGINT/SIGTERM only set CANCELLED; the demo runs on a worker and stops after the
    // current step, so its guards drop (namespaces, agent, mounts) however it ends. Handlers
    // (unlike a blocked signal mask) are reset by exec, so the agent and tools get default
    // signal handling.
    install_cancel_handler()?;
    let worker = std::thread::spawn(move || run(&args));
    let r = match worker.join() {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!(
            "the demo panicked (everything was cleaned up)"
        )),
    };
    println!("\n==> torn down: namespaces deleted, agent stopped, bpffs unmounted");
    r
}

fn run(args: &Args) -> anyhow::Result<()> {
    step(
        1,
        &format!(
            "{} simulated node(s) (dataplane {}) on a fabric + external host",
            args.nodes, args.dataplane
        ),
    )?;
    let mut cluster = Cluster::new().context("creating the fabric")?;
    for _ in 0..args.nodes {
        cluster
            .add_node(&NodeOptions::new(args.dataplane))
            .context("starting a node")?;
        if CANCELLED.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
    }
    for node in cluster.nodes() {
        println!(
            "    {} at {} in netns {}, pod CIDR {}, agent pid {:?}, log {}",
            node.name(),
            node.ip(),
            node.ns().name(),
            node.pod_cidr(),
            node.agent_pid(),
            node.dir().join("agent.log").display()
        );
    }
    println!(
        "    external host 172.18.0.100 (\"internet\" {INTERNET_IP}) in netns {}",
        cluster.external().name()
    );

    step(
        2,
        &format!(
            "{} pods per node through the real ferrea-cni binary (CNI ADD)",
            args.pods
        ),
    )?;
    let mut pods: Vec<Vec<ferrea_tests::Pod>> = Vec::new();
    for node in cluster.nodes() {
        let mut mine = Vec::new();
        for _ in 0..args.pods {
            let p = node.add_pod().context("CNI ADD")?;
            if pods.is_empty() && mine.is_empty() {
                println!(
                    "    CNI result of the first ADD:\n{}",
                    serde_json::to_string_pretty(&p.result().raw).unwrap_or_default()
                );
            }
            println!(
                "    {}: pod {} ip {} host veth {}",
                node.name(),
                p.name(),
                p.ip(),
                p.host_ifname()
            );
            mine.push(p);
            if CANCELLED.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
        }
        pods.push(mine);
    }
    let node = &cluster.nodes()[0];
    let (a, b) = (&pods[0][0], &pods[0][1]);

    step(3, "pod -> pod on the same node, and across nodes")?;
    show_ping(a, b.ip(), "node1 pod0 -> node1 pod1")?;
    for (i, other) in pods.iter().enumerate().skip(1) {
        // A new node's peers learn it from their source within a second.
        let _ = ferrea_tests::wait_for(std::time::Duration::from_secs(3), || {
            a.ping(other[0].ip()).then_some(())
        });
        show_ping(
            a,
            other[0].ip(),
            &format!("node1 pod0 -> node{} pod0", i + 1),
        )?;
    }
    step(4, "pod -> node ping (node address and pod gateway)")?;
    show_ping(a, node.ip(), "pod0 -> node")?;
    show_ping(a, node.gateway(), "pod0 -> gateway")?;
    step(
        5,
        "pod -> external host, and the source it sees (masquerade to each pod's node)",
    )?;
    show_ping(a, INTERNET_IP, "pod0 -> external")?;
    let rec = TcpPeers::start(cluster.external(), SocketAddr::from((INTERNET_IP, 8080)))?;
    for p in pods.iter().flatten() {
        let seen = tcp_seen_source(p.ns(), rec.addr())?;
        println!(
            "    pod {} -> {}: external host sees source {}",
            p.ip(),
            rec.addr(),
            seen
        );
    }
    drop(rec);

    // Across nodes when there are several, else on the node.
    let b = pods.last().map_or(b, |ps| &ps[ps.len() - 1]);
    step(6, &format!("iperf3 {} -> {}, 3 seconds", b.ip(), a.ip()))?;
    let server = a.ns().name().to_owned();
    let mut srv = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &server,
            "iperf3",
            "-s",
            "-1",
            "-B",
            &a.ip().to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 server")?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = b.exec(&["iperf3", "-c", &a.ip().to_string(), "-t", "3", "-f", "g"]);
    // The server exits after one test (-1); kill it by PID if the client failed.
    let _ = srv.kill();
    let _ = srv.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text
        .lines()
        .filter(|l| l.contains("sender") || l.contains("receiver"))
    {
        println!("    {}", l.trim());
    }
    ensure!(
        out.status.success(),
        "iperf3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    step(
        7,
        "Egress: seed 000's ExternalIPPool (VLAN 100) and Egress for pods labelled app=hello-world1",
    )?;
    show_egress(&cluster, &pods)?;

    step(8, "teardown (CNI DEL of every pod, then the nodes)")?;
    Ok(())
}

/// Labels the first pod of each node `app: hello-world1`, applies seed 000's manifests to
/// every node's source, and shows the source the external host sees for every pod and a frame
/// tagged 100 on the fabric.
fn show_egress(cluster: &Cluster, pods: &[Vec<ferrea_tests::Pod>]) -> anyhow::Result<()> {
    use ferrea_tests::egress::{self as eg, SEED_EGRESS, SEED_POOL, SELECTED};
    let _gw = ferrea_tests::fabric::VlanGateway::start(
        cluster.external(),
        100,
        "10.172.170.254/24".parse()?,
    )?;
    println!("    external host terminates VLAN 100 as 10.172.170.254 (the pool's gateway)");
    for (node, mine) in cluster.nodes().iter().zip(pods) {
        ferrea_tests::manifests::write_pod(node, &mine[0].attachment().pod_name, SELECTED, &[])?;
    }
    eg::publish_all(cluster, "pool.yaml", SEED_POOL);
    eg::publish_all(cluster, "egress.yaml", SEED_EGRESS);
    let (holder, ip) = ferrea_tests::wait_for(std::time::Duration::from_secs(10), || {
        let s = eg::egress_status(&cluster.nodes()[0])?;
        let holder = s["egressNode"].as_str()?.to_owned();
        let n = cluster.nodes().iter().find(|n| n.name() == holder)?;
        let hs = eg::egress_status(n)?;
        (eg::condition(&hs, "IPAssigned") == "True")
            .then(|| (holder, s["egressIP"].as_str().unwrap_or("").to_owned()))
    })
    .context("the egress IP was not assigned within 10 s")?;
    println!("    egress IP {ip} assigned to {holder} (see <stateDir>/status/egresses.json)");
    let idx = cluster
        .nodes()
        .iter()
        .position(|n| n.name() == holder)
        .unwrap_or(0);
    let mut cap = ferrea_tests::capture::Tcpdump::start_link_level(
        cluster.fabric().fabric(),
        &format!("n{}", idx + 1),
        &format!("vlan 100 and tcp and src host {ip}"),
    )?;
    let rec = TcpPeers::start(cluster.external(), SocketAddr::from((INTERNET_IP, 8081)))?;
    for (node, mine) in cluster.nodes().iter().zip(pods) {
        for (i, p) in mine.iter().enumerate() {
            // The first connection of a newly selected pod may race the agent's apply.
            let want = if i == 0 { ip.as_str() } else { "" };
            let mut seen = tcp_seen_source(p.ns(), rec.addr())?;
            let _ = ferrea_tests::wait_for(std::time::Duration::from_secs(3), || {
                if want.is_empty() || seen.ip().to_string() == want {
                    return Some(());
                }
                seen = tcp_seen_source(p.ns(), rec.addr()).ok()?;
                None
            });
            println!(
                "    {} pod {} ({}) -> external: source {}",
                node.name(),
                p.ip(),
                if i == 0 { "selected" } else { "not selected" },
                seen.ip()
            );
        }
    }
    let lines = cap.stop();
    if let Some(l) = lines.first() {
        println!("    on the fabric (tcpdump -e on {holder}'s port): {l}");
    }
    Ok(())
}

fn show_ping(pod: &ferrea_tests::Pod, dst: std::net::Ipv4Addr, what: &str) -> anyhow::Result<()> {
    let out = pod.exec(&[
        "ping",
        "-n",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1",
        &dst.to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .filter(|l| l.contains("transmitted") || l.starts_with("rtt"))
        .collect::<Vec<_>>()
        .join("; ");
    println!("    {what} ({dst}): {summary}");
    ensure!(out.status.success(), "{what} failed");
    Ok(())
}

extern "C" fn on_signal(_: nix::libc::c_int) {
    CANCELLED.store(true, Ordering::Relaxed);
}

#[expect(
    unsafe_code,
    reason = "sigaction(2) is unsafe: the handler must be async-signal-safe (it only stores to an atomic)"
)]
fn install_cancel_handler() -> anyhow::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &act) }.with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}
