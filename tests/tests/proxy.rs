//! ferrea's own service proxy (`serviceProxy: ferrea`), with no kube-proxy anywhere: two
//! simulated nodes, both dataplanes, Services and their EndpointSlices given to the agents
//! through the `files` source (the same objects the Kubernetes source watches). Every answer
//! comes from a tagged listener that also reports the source address it saw, so each case
//! shows which backend answered and whether the client's address was kept; a TCP connection
//! or a connected UDP socket only completes if replies come back from the address called.
//!
//! - ClusterIP TCP to a backend on the same node and on the other node, DNS-style UDP, from a
//!   pod (on eBPF, load-balanced by the pod's own program: its counters say so) and from the
//!   node itself; a NodePort and an externalIP from the external host;
//! - a Service without endpoints refuses at once, an unknown address in the service CIDR is
//!   dropped (no Service address leaves the node untranslated);
//! - `sessionAffinity: ClientIP`, `externalTrafficPolicy: Local` (the external client's
//!   address reaches the pod, only the node's own endpoints serve) against `Cluster`
//!   (masqueraded), hairpin (a pod reaching itself through its Service), and the load
//!   balancers' health checks of `Local` Services (`healthCheckNodePort`: 200 with the
//!   node's endpoint count, 503 on a node without one);
//! - backends scaling from 1 to 10 and back while a client keeps connecting, with no failed
//!   connection, and a deleted Service no longer answering;
//! - a client reusing one source port for two Services with the same endpoint, back and
//!   forth (each connection's replies come from the Service it called);
//! - the same objects from a real kube-apiserver (the `kubernetes` source watching Services
//!   and EndpointSlices): a ClusterIP answering, its endpoint replaced, the Service deleted,
//!   and the health checks of a `Local` LoadBalancer on the port the API server allocated.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferrea_tests::capture::{TcpPeers, tcp_answer};
use ferrea_tests::fabric::EXTERNAL_IP;
use ferrea_tests::kubeproxy::{Backend, ServiceSpec};
use ferrea_tests::manifests::{remove, write_file};
use ferrea_tests::udp::{UdpEcho, udp_ask_connected};
use ferrea_tests::{Cluster, Dataplane, NodeOptions, Pod, dataplane_tests};

dataplane_tests!(
    cluster_ips_node_ports_and_udp_through_ferreas_proxy,
    affinity_traffic_policy_and_hairpin,
    backends_scale_under_load_and_a_deleted_service_stops,
    services_from_the_kubernetes_source,
    a_client_port_reused_across_services
);

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

/// Nodes with pods, a tagged TCP listener and a UDP echo in every pod. Fields drop in order:
/// servers, pods (CNI DEL needs the agents), the cluster.
struct Env {
    _tcp: Vec<TcpPeers>,
    _udp: Vec<UdpEcho>,
    /// pods[node][i], tagged `n<node>p<i>`; pods[0][0] is the client.
    pods: Vec<Vec<Pod>>,
    cluster: Cluster,
}

impl Env {
    fn start(dp: Dataplane, pods_per_node: [usize; 2]) -> Env {
        let mut cluster = Cluster::new().expect("fabric");
        for _ in 0..2 {
            let mut opts = NodeOptions::new(dp);
            opts.extra_config = "serviceProxy: ferrea\n".into();
            cluster.add_node(&opts).expect("adding a node");
        }
        let pods: Vec<Vec<Pod>> = (0..2)
            .map(|n| {
                cluster.nodes()[n]
                    .add_pods_concurrently(pods_per_node[n])
                    .expect("pods")
            })
            .collect();
        let (mut tcp, mut udp) = (Vec::new(), Vec::new());
        for (n, node_pods) in pods.iter().enumerate() {
            for (i, p) in node_pods.iter().enumerate() {
                let tag = format!("n{n}p{i}");
                tcp.push(
                    TcpPeers::start_tagged(
                        p.ns(),
                        SocketAddr::from((Ipv4Addr::UNSPECIFIED, TCP_PORT)),
                        Some(&tag),
                    )
                    .expect("TCP listener"),
                );
                udp.push(
                    UdpEcho::start(p.ns(), SocketAddr::from(([0, 0, 0, 0], UDP_PORT)), &tag)
                        .expect("UDP echo"),
                );
            }
        }
        Env {
            _tcp: tcp,
            _udp: udp,
            pods,
            cluster,
        }
    }

    fn client(&self) -> &Pod {
        &self.pods[0][0]
    }

    fn backend(&self, node: usize, i: usize) -> Backend {
        Backend {
            ip: self.pods[node][i].ip(),
            node: self.cluster.nodes()[node].name().to_owned(),
        }
    }

    /// Gives every node's agent the Services (one file per Service: replaced as a whole).
    fn publish(&self, svcs: &[Svc]) {
        for s in svcs {
            for n in self.cluster.nodes() {
                write_file(n, &format!("svc-{}.yaml", s.spec.name), &s.yaml())
                    .expect("writing a Service");
            }
        }
    }

    /// Removes a Service from every node's source.
    fn unpublish(&self, name: &str) {
        for n in self.cluster.nodes() {
            remove(n, &format!("svc-{name}.yaml")).expect("removing a Service");
        }
    }

    fn logs(&mut self) -> String {
        let mut s = Vec::new();
        for n in self.cluster.nodes_mut() {
            let name = n.name().to_owned();
            s.push(format!("--- agent {name} ---\n{}", n.agent().log_tail(20)));
        }
        s.join("\n")
    }
}

/// A Service (a [`ServiceSpec`], plus spec fields of the cases here).
struct Svc {
    spec: ServiceSpec<'static>,
    /// YAML lines added to the Service's `spec` (two spaces of indent).
    extra: String,
}

impl Svc {
    fn yaml(&self) -> String {
        self.spec
            .yaml()
            .replacen("spec:\n", &format!("spec:\n{}", self.extra), 1)
    }

    fn with(mut self, extra: &str) -> Self {
        self.extra.push_str(extra);
        self
    }
}

fn svc(name: &'static str, ip: [u8; 4], protocol: &'static str, backends: Vec<Backend>) -> Svc {
    let target = if protocol == "UDP" {
        UDP_PORT
    } else {
        TCP_PORT
    };
    Svc {
        spec: ServiceSpec::cluster_ip(name, ip, protocol, target, backends),
        extra: String::new(),
    }
}

fn node_port(mut s: Svc, port: u16) -> Svc {
    s.spec = s.spec.with_node_port(port);
    s
}

/// A LoadBalancer Service with `externalTrafficPolicy: Local` and its load balancers' health
/// checks on `health_port` (given here as the API server would allocate it).
fn lb_local(
    name: &'static str,
    ip: [u8; 4],
    backends: Vec<Backend>,
    node_port_: u16,
    health_port: u16,
) -> Svc {
    let mut s = node_port(svc(name, ip, "TCP", backends), node_port_);
    s.spec.kind = "LoadBalancer";
    s.with(&format!(
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: {health_port}\n"
    ))
}

/// `f` until it succeeds, for up to 10 s (the agents pick up a new file within a second or
/// two); the last error otherwise.
fn eventually<T>(mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let t = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if t.elapsed() > Duration::from_secs(10) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn ask(ns: &ferrea_tests::netns::NetNs, addr: SocketAddr) -> anyhow::Result<String> {
    tcp_answer(ns, addr, Duration::from_secs(2))
}

/// The tag and the source address a tagged listener answered.
fn tag_and_peer(answer: &str) -> (String, Ipv4Addr) {
    let (tag, peer) = answer.split_once(' ').expect("tag and peer");
    let peer: SocketAddr = peer.parse().expect("peer address");
    let SocketAddr::V4(v4) = peer else {
        panic!("{peer}")
    };
    (tag.to_owned(), *v4.ip())
}

/// Collects what went wrong, so one run reports every failing case.
#[derive(Default)]
struct Failures(Vec<String>);

/// OVS: packets the ServiceLb group flows of frontend address `vip` on node `i` sent to its
/// group (new connections the bridge load-balanced).
fn ovs_group_packets(c: &mut Cluster, i: usize, vip: &str) -> u64 {
    let Some(ovs) = c.nodes_mut()[i].ovs() else {
        return 0;
    };
    ovs.flush_flow_stats().expect("ovs-appctl revalidator/wait");
    let dst = format!("nw_dst={vip}");
    ovs.flows("br-int")
        .expect("dumping flows")
        .iter()
        .filter(|f| {
            f.line.contains("table=27,")
                && f.line.contains("actions=group:")
                && f.line.split([',', ' ']).any(|t| t == dst)
        })
        .filter_map(|f| {
            f.line
                .split([',', ' '])
                .find_map(|t| t.strip_prefix("n_packets="))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

impl Failures {
    fn check(&mut self, what: &str, r: anyhow::Result<String>, want: &str) {
        match r {
            Ok(s) if s.starts_with(want) => println!("ok: {what}: {s}"),
            Ok(s) => self
                .0
                .push(format!("{what}: answered {s:?}, want {want:?}")),
            Err(e) => self.0.push(format!("{what}: {e:#}")),
        }
    }

    fn finish(self, env: &mut Env) {
        assert!(self.0.is_empty(), "{}\n{}", self.0.join("\n"), env.logs());
    }
}

fn cluster_ips_node_ports_and_udp_through_ferreas_proxy(dp: Dataplane) {
    let mut env = Env::start(dp, [2, 1]);
    let (b_local, b_remote) = (env.backend(0, 1), env.backend(1, 0));
    env.publish(&[
        svc("local", [10, 96, 0, 10], "TCP", vec![b_local.clone()]),
        svc("remote", [10, 96, 0, 11], "TCP", vec![b_remote.clone()]),
        svc("dns-local", [10, 96, 0, 53], "UDP", vec![b_local.clone()]),
        svc("dns-remote", [10, 96, 0, 54], "UDP", vec![b_remote.clone()]),
        node_port(
            svc("np-local", [10, 96, 0, 20], "TCP", vec![b_local.clone()]),
            30080,
        ),
        node_port(
            svc("np-remote", [10, 96, 0, 21], "TCP", vec![b_remote.clone()]),
            30081,
        ),
        svc("ext", [10, 96, 0, 22], "TCP", vec![b_remote.clone()])
            .with("  externalIPs: [192.0.2.50]\n"),
        svc("empty", [10, 96, 0, 30], "TCP", vec![]),
    ]);
    let mut f = Failures::default();
    let client = env.client();
    let a = client.ip();
    for (what, ip, want) in [
        ("ClusterIP TCP, same-node backend", [10, 96, 0, 10], "n0p1"),
        ("ClusterIP TCP, cross-node backend", [10, 96, 0, 11], "n1p0"),
    ] {
        let addr = SocketAddr::from((ip, 80));
        // The pod's own address reaches the backend: pods are not masqueraded.
        f.check(
            what,
            eventually(|| ask(client.ns(), addr)),
            &format!("{want} {a}:"),
        );
    }
    for (what, ip, want) in [
        (
            "ClusterIP UDP (DNS-style), same-node backend",
            [10, 96, 0, 53],
            "n0p1",
        ),
        (
            "ClusterIP UDP (DNS-style), cross-node backend",
            [10, 96, 0, 54],
            "n1p0",
        ),
    ] {
        let addr = SocketAddr::from((ip, 53));
        f.check(
            what,
            eventually(|| udp_ask_connected(client.ns(), addr)),
            &format!("{want} {a}:"),
        );
    }
    let node0 = &env.cluster.nodes()[0];
    // eBPF: the pods' Service connections were load-balanced in the pod's own program, not in
    // the stack: new connections, and replies rewritten on the same node and from the tunnel.
    if dp == Dataplane::Ebpf {
        use ferrea_common::{LB_CNT_NEW, LB_CNT_REVERSE_POD, LB_CNT_REVERSE_TUNNEL};
        match ferrea_agent::dataplane::ebpf::lb_counters(node0.bpf_path()) {
            Ok(c) => {
                let (new, same, tunnel) = (
                    c[LB_CNT_NEW as usize],
                    c[LB_CNT_REVERSE_POD as usize],
                    c[LB_CNT_REVERSE_TUNNEL as usize],
                );
                println!(
                    "eBPF load balancer on node 0: {new} new connections, {same} replies rewritten on the node, {tunnel} from the tunnel"
                );
                if new < 4 || same == 0 || tunnel == 0 {
                    f.0.push(format!(
                        "the eBPF load balancer did not carry the pods' Service traffic: {c:?}"
                    ));
                }
            }
            Err(e) => {
                f.0.push(format!("reading the eBPF load balancer's counters: {e}"))
            }
        }
    }
    f.check(
        "ClusterIP TCP from the node itself, cross-node backend",
        eventually(|| ask(node0.ns(), SocketAddr::from(([10, 96, 0, 11], 80)))),
        "n1p0 ",
    );
    f.check(
        "ClusterIP UDP from the node itself, same-node backend",
        eventually(|| udp_ask_connected(node0.ns(), SocketAddr::from(([10, 96, 0, 53], 53)))),
        "n0p1 ",
    );
    let ext = env.cluster.external();
    let node0_ip = node0.ip();
    for (what, port, want) in [
        (
            "NodePort from the external host, backend on the node called",
            30080,
            "n0p1 ",
        ),
        (
            "NodePort from the external host, backend on the other node",
            30081,
            "n1p0 ",
        ),
    ] {
        let addr = SocketAddr::from((node0_ip, port));
        f.check(what, eventually(|| ask(ext, addr)), want);
    }
    // The external host routes the external IP to node 0 (its own namespace, made here).
    ext.ip(&[
        "route",
        "replace",
        "192.0.2.50/32",
        "via",
        &node0_ip.to_string(),
    ])
    .expect("route to the external IP");
    f.check(
        "externalIP from the external host, backend on the other node",
        eventually(|| ask(ext, SocketAddr::from(([192, 0, 2, 50], 80)))),
        "n1p0 ",
    );
    f.check(
        "externalIP from a pod",
        eventually(|| ask(client.ns(), SocketAddr::from(([192, 0, 2, 50], 80)))),
        &format!("n1p0 {a}:"),
    );
    // No endpoints: refused (an ICMP error), not left to time out. (On OVS the first SYN's
    // error is lost and the retransmission's arrives, a second later; see the proxy's docs.)
    let t = Instant::now();
    match ask(client.ns(), SocketAddr::from(([10, 96, 0, 30], 80))) {
        Ok(s) => {
            f.0.push(format!("Service without endpoints answered {s:?}"))
        }
        Err(e) => {
            let msg = format!("{e:#}");
            if !msg.contains("refused") && !msg.contains("unreachable") {
                f.0.push(format!("Service without endpoints: {msg}, want refused"));
            } else if t.elapsed() > Duration::from_millis(1800) {
                f.0.push(format!(
                    "Service without endpoints: refused only after {:?}",
                    t.elapsed()
                ));
            } else {
                println!(
                    "ok: Service without endpoints: {msg} after {:?}",
                    t.elapsed()
                );
            }
        }
    }
    // An address of the service CIDR that is no Service's: dropped on the node.
    match ask(client.ns(), SocketAddr::from(([10, 96, 0, 99], 80))) {
        Ok(s) => f.0.push(format!("unknown service address answered {s:?}")),
        Err(e) => println!("ok: unknown service address: {e:#}"),
    }
    let table = ferrea_tests::manifests::nft_table(&env.cluster.nodes()[0]).unwrap_or_default();
    if !table.contains("no Service at this address") {
        f.0.push(format!("the drop rule is not in ferrea's table:\n{table}"));
    }
    // OVS: the bridge itself load-balanced the pod's connections (its frontends' group flows
    // counted them; the node's stack never saw them).
    if dp == Dataplane::Ovs {
        for vip in [
            "10.96.0.10",
            "10.96.0.11",
            "10.96.0.53",
            "10.96.0.54",
            "192.0.2.50",
        ] {
            let n = ovs_group_packets(&mut env.cluster, 0, vip);
            if n == 0 {
                f.0.push(format!("OVS: no packet to {vip} took its frontend's group"));
            } else {
                println!("ok: OVS group of {vip}: {n} new connections");
            }
        }
    }
    f.finish(&mut env);
}

fn affinity_traffic_policy_and_hairpin(dp: Dataplane) {
    let mut env = Env::start(dp, [2, 1]);
    let (b0, b1) = (env.backend(0, 1), env.backend(1, 0));
    let both = vec![b0.clone(), b1.clone()];
    env.publish(&[
        svc("spread", [10, 96, 0, 40], "TCP", both.clone()),
        svc("sticky", [10, 96, 0, 41], "TCP", both.clone()).with("  sessionAffinity: ClientIP\n"),
        node_port(svc("np-local", [10, 96, 0, 42], "TCP", both.clone()), 30090)
            .with("  externalTrafficPolicy: Local\n"),
        node_port(
            svc("np-cluster", [10, 96, 0, 43], "TCP", both.clone()),
            30091,
        ),
        svc("self", [10, 96, 0, 44], "TCP", vec![b0.clone()]),
        lb_local("lb-both", [10, 96, 0, 45], both.clone(), 30092, 30190),
        lb_local("lb-one", [10, 96, 0, 46], vec![b0.clone()], 30093, 30191),
    ]);
    let mut f = Failures::default();
    let client = env.client();
    let tags = |ip: [u8; 4], n: usize| -> anyhow::Result<Vec<String>> {
        let addr = SocketAddr::from((ip, 80));
        let first = eventually(|| ask(client.ns(), addr))?;
        let mut v = vec![tag_and_peer(&first).0];
        for _ in 1..n {
            v.push(tag_and_peer(&ask(client.ns(), addr)?).0);
        }
        v.sort();
        v.dedup();
        Ok(v)
    };
    match tags([10, 96, 0, 40], 24) {
        Ok(t) if t.len() == 2 => println!("ok: no affinity: 24 connections reached {t:?}"),
        Ok(t) => {
            f.0.push(format!("no affinity: 24 connections all reached {t:?}"))
        }
        Err(e) => f.0.push(format!("no affinity: {e:#}")),
    }
    match tags([10, 96, 0, 41], 24) {
        Ok(t) if t.len() == 1 => println!("ok: ClientIP affinity: 24 connections reached {t:?}"),
        Ok(t) => {
            f.0.push(format!("ClientIP affinity: connections reached {t:?}"))
        }
        Err(e) => f.0.push(format!("ClientIP affinity: {e:#}")),
    }
    // externalTrafficPolicy: Local: each node serves with its own endpoint only, and the
    // pod sees the external host's address. Cluster: masqueraded.
    let ext = env.cluster.external();
    for node in 0..2 {
        let ip = env.cluster.nodes()[node].ip();
        let want_tag = format!("n{node}p{}", if node == 0 { 1 } else { 0 });
        for _ in 0..6 {
            match eventually(|| ask(ext, SocketAddr::from((ip, 30090)))) {
                Ok(s) => {
                    let (tag, peer) = tag_and_peer(&s);
                    if tag != want_tag || peer != EXTERNAL_IP {
                        f.0.push(format!(
                            "externalTrafficPolicy Local via node {node}: {s:?}, want {want_tag} from {EXTERNAL_IP}"
                        ));
                        break;
                    }
                }
                Err(e) => {
                    f.0.push(format!(
                        "externalTrafficPolicy Local via node {node}: {e:#}"
                    ));
                    break;
                }
            }
        }
    }
    match eventually(|| ask(ext, SocketAddr::from((env.cluster.nodes()[0].ip(), 30091)))) {
        Ok(s) if tag_and_peer(&s).1 != EXTERNAL_IP => {
            println!("ok: externalTrafficPolicy Cluster masquerades: {s}")
        }
        Ok(s) => f.0.push(format!(
            "externalTrafficPolicy Cluster kept the source: {s}"
        )),
        Err(e) => f.0.push(format!("externalTrafficPolicy Cluster: {e:#}")),
    }
    // The load balancers' health checks of the Local Services: each node says how many
    // endpoints it has; a node without one fails the check; an endpoint moving moves the
    // answers; a deleted Service's port closes.
    let health = |node: usize, port: u16| {
        let addr = SocketAddr::from((env.cluster.nodes()[node].ip(), port));
        ext.run(move || ferrea_tests::ctl::http_get_here(addr, "/healthz"))
    };
    // Checks one node's answer, recording a failure.
    let want = |f: &mut Failures, what: &str, node: usize, port: u16, status: u16, count: u64| {
        let r = eventually(|| {
            let (got, body) = health(node, port)?;
            let v: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| anyhow::anyhow!("{e}: {body:?}"))?;
            anyhow::ensure!(
                got == status && v["localEndpoints"] == count && v["serviceProxyHealthy"] == true,
                "{got} {body}"
            );
            Ok(format!("{got} {}", v["service"]))
        });
        match r {
            Ok(s) => println!("ok: health check of {what}: {s}"),
            Err(e) => f.0.push(format!("health check of {what}: {e:#}")),
        }
    };
    want(&mut f, "lb-both via node 0", 0, 30190, 200, 1);
    want(&mut f, "lb-both via node 1", 1, 30190, 200, 1);
    want(
        &mut f,
        "lb-one via the node with its endpoint",
        0,
        30191,
        200,
        1,
    );
    want(&mut f, "lb-one via the node without", 1, 30191, 503, 0);
    env.publish(&[lb_local(
        "lb-one",
        [10, 96, 0, 46],
        vec![b1.clone()],
        30093,
        30191,
    )]);
    want(&mut f, "lb-one moved, via node 0", 0, 30191, 503, 0);
    want(&mut f, "lb-one moved, via node 1", 1, 30191, 200, 1);
    env.unpublish("lb-one");
    match eventually(|| match health(1, 30191) {
        Ok(r) => anyhow::bail!("still answers {r:?}"),
        Err(e) => Ok(format!("{e:#}")),
    }) {
        Ok(e) => println!("ok: lb-one deleted, its health-check port closed: {e}"),
        Err(e) => f.0.push(format!("lb-one deleted: {e:#}")),
    }
    // Hairpin: the backend reaching itself through its Service.
    let me = &env.pods[0][1];
    f.check(
        "hairpin",
        eventually(|| ask(me.ns(), SocketAddr::from(([10, 96, 0, 44], 80)))),
        "n0p1 ",
    );
    f.finish(&mut env);
}

fn backends_scale_under_load_and_a_deleted_service_stops(dp: Dataplane) {
    // The client and 5 backends on node 0, 5 backends on node 1.
    let mut env = Env::start(dp, [6, 5]);
    let mut all = Vec::new();
    for i in 1..6 {
        all.push(env.backend(0, i));
    }
    for i in 0..5 {
        all.push(env.backend(1, i));
    }
    let vip = SocketAddr::from(([10, 96, 0, 60], 80));
    let scaled = |n: usize| svc("web", [10, 96, 0, 60], "TCP", all[..n].to_vec());
    env.publish(&[scaled(1)]);
    let client = env.client();
    if let Err(e) = eventually(|| ask(client.ns(), vip)) {
        panic!("the Service never answered: {e:#}\n{}", env.logs());
    }
    // A client connecting in a loop while the backends go 1 -> 10 -> 1.
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    // The load runs on a thread inside the client's namespace.
    let load = client.ns().spawn(move || {
        use std::io::Read;
        let (mut ok, mut failed, mut tags) = (0u32, Vec::new(), std::collections::BTreeSet::new());
        while !s.load(Ordering::Relaxed) {
            let r = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(2)).and_then(
                |mut c| {
                    c.set_read_timeout(Some(Duration::from_secs(2)))?;
                    let mut a = String::new();
                    c.read_to_string(&mut a)?;
                    Ok(a)
                },
            );
            match r {
                Ok(a) if a.contains(' ') => {
                    ok += 1;
                    tags.insert(tag_and_peer(a.trim()).0);
                }
                Ok(a) => failed.push(format!("answered {a:?}")),
                Err(e) => failed.push(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (ok, failed, tags)
    });
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    env.publish(&[scaled(10)]);
    std::thread::sleep(Duration::from_secs(4));
    env.publish(&[scaled(1)]);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, tags) = load.join().expect("load thread");
    println!(
        "{ok} connections in {:?} while scaling, {} failed, backends seen: {tags:?}",
        t.elapsed(),
        failed.len()
    );
    let mut f = Failures::default();
    if !failed.is_empty() {
        f.0.push(format!(
            "{} connections failed while scaling: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        ));
    }
    if tags.len() < 6 {
        f.0.push(format!(
            "scaled to 10 backends, but connections reached only {tags:?}"
        ));
    }
    // Back at one backend: only it answers.
    for _ in 0..5 {
        match ask(client.ns(), vip) {
            Ok(a) if a.starts_with("n0p1 ") => {}
            other => {
                f.0.push(format!("scaled back to n0p1: {other:?}"));
                break;
            }
        }
    }
    env.unpublish("web");
    let gone = eventually(|| match ask(client.ns(), vip) {
        Ok(a) => anyhow::bail!("still answered {a:?}"),
        Err(e) => Ok(format!("{e:#}")),
    });
    match gone {
        Ok(e) => println!("ok: the deleted Service no longer answers: {e}"),
        Err(e) => f.0.push(format!("the deleted Service: {e:#}")),
    }
    f.finish(&mut env);
}

fn services_from_the_kubernetes_source(dp: Dataplane) {
    use ferrea_tests::apiserver::{ApiServer, create_node_object, install_agent_identity};
    let mut cluster = Cluster::new().expect("fabric");
    let mut opts = NodeOptions::new(dp);
    opts.start_agent = false;
    opts.extra_config = "serviceProxy: ferrea\n".into();
    for _ in 0..2 {
        cluster.add_node(&opts).expect("adding a node");
    }
    // Declared after the cluster: stopped before the nodes' namespaces go.
    let api = ApiServer::start_on_fabric(cluster.fabric());
    api.create_default_service_account();
    for n in cluster.nodes() {
        create_node_object(&api, n);
    }
    let kubeconfig = install_agent_identity(&api);
    for n in cluster.nodes_mut() {
        n.use_kubernetes_source(&kubeconfig)
            .expect("kubernetes source");
        n.agent().spawn().expect("agent");
    }
    for n in cluster.nodes_mut() {
        n.agent()
            .wait_ready(ferrea_tests::agent::READY_TIMEOUT)
            .expect("agent ready on the API");
    }
    let client = cluster.nodes()[0].add_pod().expect("client");
    let b0 = cluster.nodes()[0].add_pod().expect("backend on node 0");
    let b1 = cluster.nodes()[1].add_pod().expect("backend on node 1");
    let _servers: Vec<TcpPeers> = [(&b0, "b0"), (&b1, "b1")]
        .iter()
        .map(|(p, tag)| {
            TcpPeers::start_tagged(
                p.ns(),
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, TCP_PORT)),
                Some(tag),
            )
            .expect("listener")
        })
        .collect();
    let backend = |p: &Pod, n: usize| Backend {
        ip: p.ip(),
        node: cluster.nodes()[n].name().to_owned(),
    };
    let web = |b: Backend| svc("web", [10, 96, 0, 70], "TCP", vec![b]);
    let vip = SocketAddr::from(([10, 96, 0, 70], 80));
    let mut f = Failures::default();
    api.kubectl_stdin_ok(&["apply", "-f", "-"], &web(backend(&b1, 1)).yaml());
    f.check(
        "ClusterIP from the API, cross-node endpoint",
        eventually(|| ask(client.ns(), vip)),
        &format!("b1 {}:", client.ip()),
    );
    // The EndpointSlice now names the other pod.
    api.kubectl_stdin_ok(&["apply", "-f", "-"], &web(backend(&b0, 0)).yaml());
    f.check(
        "the endpoint replaced in the API",
        eventually(|| match ask(client.ns(), vip) {
            Ok(a) if a.starts_with("b0 ") => Ok(a),
            Ok(a) => anyhow::bail!("still {a:?}"),
            Err(e) => Err(e),
        }),
        "b0 ",
    );
    // A LoadBalancer Service with externalTrafficPolicy: Local: the API server allocates its
    // healthCheckNodePort, and the node with the endpoint answers there.
    let mut lb = svc("lb", [10, 96, 0, 71], "TCP", vec![backend(&b1, 1)]);
    lb.spec = lb.spec.with_node_port(30094);
    lb.spec.kind = "LoadBalancer";
    let lb = lb.with("  externalTrafficPolicy: Local\n");
    api.kubectl_stdin_ok(&["apply", "-f", "-"], &lb.yaml());
    let hc = api.kubectl_ok(&[
        "get",
        "service",
        "lb",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.healthCheckNodePort}",
    ]);
    match hc.trim().parse::<u16>() {
        Ok(port) if port > 0 => {
            let ext = cluster.external();
            for (node, want) in [(1, 200), (0, 503)] {
                let addr = SocketAddr::from((cluster.nodes()[node].ip(), port));
                match eventually(|| {
                    let (status, body) =
                        ext.run(move || ferrea_tests::ctl::http_get_here(addr, "/"))?;
                    anyhow::ensure!(status == want, "{status} {body}");
                    Ok(body)
                }) {
                    Ok(b) => println!(
                        "ok: allocated healthCheckNodePort {port} via node {node}: {want} {b}"
                    ),
                    Err(e) => f.0.push(format!(
                        "allocated healthCheckNodePort {port} via node {node}, want {want}: {e:#}"
                    )),
                }
            }
        }
        _ => {
            f.0.push(format!("no healthCheckNodePort allocated: {hc:?}"))
        }
    }
    api.kubectl_ok(&["delete", "service", "web", "-n", "default"]);
    api.kubectl_ok(&["delete", "endpointslice", "web-1", "-n", "default"]);
    match eventually(|| match ask(client.ns(), vip) {
        Ok(a) => anyhow::bail!("still answered {a:?}"),
        Err(e) => Ok(format!("{e:#}")),
    }) {
        Ok(e) => println!("ok: the deleted Service no longer answers: {e}"),
        Err(e) => f.0.push(format!("the deleted Service: {e:#}")),
    }
    let mut logs = Vec::new();
    for n in cluster.nodes_mut() {
        logs.push(n.agent().log_tail(20));
    }
    assert!(f.0.is_empty(), "{}\n{}", f.0.join("\n"), logs.join("\n"));
    drop(client);
    drop(b0);
    drop(b1);
}

fn a_client_port_reused_across_services(dp: Dataplane) {
    let mut env = Env::start(dp, [2, 1]);
    let b = env.backend(0, 1);
    env.publish(&[
        svc("a", [10, 96, 0, 80], "TCP", vec![b.clone()]),
        svc("b", [10, 96, 0, 81], "TCP", vec![b]),
    ]);
    let (a, b) = (
        SocketAddr::from(([10, 96, 0, 80], 80)),
        SocketAddr::from(([10, 96, 0, 81], 80)),
    );
    let client = env.client();
    for vip in [a, b] {
        eventually(|| ask(client.ns(), vip)).expect("both Services answer");
    }
    // One source port, alternately to each Service: a connection table keyed by the client's
    // tuple must give every connection the replies of the Service it called.
    let results = client.ns().run(move || {
        use std::io::Read;
        let mut out = Vec::new();
        for (i, vip) in [a, b, a, b, a].into_iter().enumerate() {
            let r = (|| -> std::io::Result<String> {
                let so = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                so.set_reuse_address(true)?;
                so.bind(&SocketAddr::from(([0, 0, 0, 0], 41234)).into())?;
                so.connect_timeout(&vip.into(), Duration::from_secs(2))?;
                let mut c: std::net::TcpStream = so.into();
                c.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut s = String::new();
                c.read_to_string(&mut s)?;
                Ok(s)
            })();
            out.push(format!("{i}: {vip}: {r:?}"));
            std::thread::sleep(Duration::from_millis(50));
        }
        out
    });
    let failed: Vec<&String> = results
        .iter()
        .filter(|r| !r.contains("Ok(\"n0p1 "))
        .collect();
    println!("{results:#?}");
    let mut f = Failures::default();
    if !failed.is_empty() {
        f.0.push(format!("a reused source port: {failed:?}"));
    }
    f.finish(&mut env);
}
