//! Services beside a real kube-proxy: two simulated nodes, a real etcd and kube-apiserver, and
//! a real kube-proxy (built from the pinned Kubernetes release by `scripts/k8s/build.sh
//! kube-proxy`) inside each node's network namespace, in nftables and in iptables mode, on
//! both dataplanes. Services and their EndpointSlices are created with kubectl (selector-less
//! Services, slices naming the pods' IPs: no controller-manager runs).
//!
//! kube-proxy DNATs in the node's stack; the dataplane's fast paths (eBPF `bpf_redirect_peer`
//! and straight-to-tunnel, OVS L3 output) would carry the backend's reply past the stack's
//! conntrack, un-un-NATed. Shown here, each by a connection that only completes if the replies
//! come from the address the client called (TCP; UDP on a connected socket):
//! - ClusterIP TCP from a pod to a backend on the same node and on the other node;
//! - NodePort from the external host to a backend on the node called and on the other node;
//! - DNS-style UDP request/response through a ClusterIP, same node and cross-node;
//! - kube-proxy changes nothing in the root namespace (ruleset, links, routes, sysctls);
//! - un-NATed pod-to-pod traffic keeps the fast path, by the dataplane's counters (eBPF:
//!   `FERREA_SVC_CNT`; OVS: flow packet counts), while NATed traffic went through the stack.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ferrea_tests::apiserver::ApiServer;
use ferrea_tests::capture::TcpPeers;
use ferrea_tests::fabric::node_ip;
use ferrea_tests::kubeproxy::{Backend, KubeProxy, KubeProxySpec, ProxyMode, ServiceSpec, tcp_ask};
use ferrea_tests::node::node_manifest;
use ferrea_tests::udp::{UdpEcho, udp_ask_connected};
use ferrea_tests::{Cluster, Dataplane, NodeOptions, Pod, dataplane_tests};

dataplane_tests!(
    services_beside_kube_proxy_nftables,
    services_beside_kube_proxy_iptables,
    pod_to_pod_keeps_the_fast_path_beside_kube_proxy
);

const CLUSTER_CIDR: &str = "10.244.0.0/16";
const FABRIC_CIDR: &str = "172.18.0.0/24";
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
/// Integration bridge of the OVS backend.
const BRIDGE: &str = "br-int";

/// What the root network namespace looks like to someone who could be disturbed by a
/// kube-proxy running in the wrong place.
fn root_snapshot() -> String {
    let mut out = String::new();
    for argv in [
        &["nft", "list", "ruleset"][..],
        &["iptables-save"][..],
        &["ip", "-o", "link", "show"][..],
        &["ip", "-o", "addr", "show"][..],
        &["ip", "route", "show", "table", "all"][..],
        &["ip", "rule", "show"][..],
    ] {
        let o = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .expect("running a root-namespace query");
        // Counters and link statistics move on their own; the rules themselves must not.
        let text = String::from_utf8_lossy(&o.stdout);
        out.push_str(&format!("### {argv:?}\n"));
        for l in text.lines() {
            if argv[0] == "iptables-save" && (l.starts_with('#') || l.starts_with(':')) {
                continue;
            }
            // Drop the values that move by themselves: rule counters, address lifetimes.
            let mut skip = false;
            for tok in l.split_whitespace() {
                if std::mem::take(&mut skip) {
                    continue;
                }
                skip = matches!(tok, "packets" | "bytes" | "valid_lft" | "preferred_lft");
                out.push_str(tok);
                out.push(' ');
            }
            out.push('\n');
        }
    }
    for key in [
        "net/netfilter/nf_conntrack_max",
        "net/netfilter/nf_conntrack_buckets",
        "net/netfilter/nf_conntrack_tcp_timeout_established",
        "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
        "net/netfilter/nf_conntrack_tcp_be_liberal",
        "net/ipv4/conf/all/route_localnet",
        "net/ipv4/ip_forward",
        "net/bridge/bridge-nf-call-iptables",
    ] {
        let v = std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap_or_default();
        out.push_str(&format!("{key} = {}\n", v.trim()));
    }
    out
}

/// Two nodes with pods, the API server, a kube-proxy per node. Fields drop in order: servers,
/// kube-proxies, pods (CNI DEL needs the agents), the cluster, the API server.
struct Env {
    tcp: Vec<TcpPeers>,
    udp: Vec<UdpEcho>,
    proxies: Vec<KubeProxy>,
    /// pods[node][i]: node 0 has the client and backend `b1`, node 1 has backend `b2`.
    pods: Vec<Vec<Pod>>,
    cluster: Cluster,
    api: ApiServer,
    root_before: String,
}

impl Env {
    fn start(dp: Dataplane, mode: ProxyMode) -> Env {
        let root_before = root_snapshot();
        let mut cluster = Cluster::new().expect("fabric");
        for _ in 0..2 {
            cluster
                .add_node(&NodeOptions::new(dp))
                .expect("adding a node");
        }
        let api = ApiServer::start_on_fabric(cluster.fabric());
        let pods = vec![
            cluster.nodes()[0]
                .add_pods_concurrently(2)
                .expect("pods on node1"),
            cluster.nodes()[1]
                .add_pods_concurrently(1)
                .expect("pods on node2"),
        ];
        for n in cluster.nodes() {
            api.kubectl_stdin_ok(
                &["apply", "-f", "-"],
                &node_manifest(n.name(), n.pod_cidr(), n.ip()),
            );
        }
        let mut env = Env {
            tcp: Vec::new(),
            udp: Vec::new(),
            proxies: Vec::new(),
            pods,
            cluster,
            api,
            root_before,
        };
        for (tag, (n, i)) in [("b1", (0, 1)), ("b2", (1, 0))] {
            let ns = env.pods[n][i].ns();
            let t = TcpPeers::start_tagged(
                ns,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, TCP_PORT)),
                Some(tag),
            )
            .expect("TCP server");
            let u = UdpEcho::start(ns, SocketAddr::from(([0, 0, 0, 0], UDP_PORT)), tag)
                .expect("UDP server");
            env.tcp.push(t);
            env.udp.push(u);
        }
        for n in env.cluster.nodes() {
            let spec = KubeProxySpec {
                netns: n.ns().name().to_owned(),
                node_name: n.name().to_owned(),
                node_ip: n.ip(),
                cluster_cidr: CLUSTER_CIDR.into(),
                node_port_cidr: FABRIC_CIDR.into(),
                mode,
            };
            let p = KubeProxy::start(&env.api, spec).expect("starting kube-proxy");
            env.proxies.push(p);
        }
        env
    }

    fn client(&self) -> &Pod {
        &self.pods[0][0]
    }
    fn b1(&self) -> &Pod {
        &self.pods[0][1]
    }
    fn b2(&self) -> &Pod {
        &self.pods[1][0]
    }

    fn backend(&self, i: usize) -> Backend {
        let (pod, node) = match i {
            1 => (self.b1(), &self.cluster.nodes()[0]),
            _ => (self.b2(), &self.cluster.nodes()[1]),
        };
        Backend {
            ip: pod.ip(),
            node: node.name().to_owned(),
        }
    }

    /// Creates the Services and waits until every kube-proxy has programmed all of them.
    fn services(&mut self, svcs: &[ServiceSpec<'_>]) {
        let yaml: Vec<String> = svcs.iter().map(ServiceSpec::yaml).collect();
        self.api
            .kubectl_stdin_ok(&["apply", "-f", "-"], &yaml.join("---\n"));
        let ips: Vec<String> = svcs.iter().map(|s| s.cluster_ip.to_string()).collect();
        let needles: Vec<&str> = ips.iter().map(String::as_str).collect();
        let t = Instant::now();
        for p in &mut self.proxies {
            p.wait_rules(&needles, Duration::from_secs(60))
                .expect("kube-proxy programs the Services");
        }
        println!(
            "kube-proxy programmed {} Services in {:?}",
            svcs.len(),
            t.elapsed()
        );
    }

    /// kube-proxy's and the agents' logs, for a failure message.
    fn logs(&mut self) -> String {
        let mut s: Vec<String> = self.proxies.iter().map(|p| p.log_tail(15)).collect();
        for n in self.cluster.nodes_mut() {
            let name = n.name().to_owned();
            s.push(format!("--- agent {name} ---\n{}", n.agent().log_tail(15)));
        }
        s.join("\n")
    }
}

/// Asks up to three times (a first packet may race kube-proxy's last rule), then fails with
/// the last error (`what` names the case in a panic of the caller's).
fn retry<T>(what: &str, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let mut last = None;
    for _ in 0..3 {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("{what}: not tried")))
}

/// A ClusterIP Service on port 80 (TCP) or 53 (UDP) with one backend.
fn svc(
    name: &'static str,
    ip: [u8; 4],
    protocol: &'static str,
    backend: Backend,
) -> ServiceSpec<'static> {
    let target = if protocol == "UDP" {
        UDP_PORT
    } else {
        TCP_PORT
    };
    ServiceSpec::cluster_ip(name, ip, protocol, target, vec![backend])
}

fn all_services(env: &Env) -> Vec<ServiceSpec<'static>> {
    let (b1, b2) = (env.backend(1), env.backend(2));
    vec![
        svc("local", [10, 96, 0, 10], "TCP", b1.clone()),
        svc("remote", [10, 96, 0, 11], "TCP", b2.clone()),
        svc("dns-local", [10, 96, 0, 53], "UDP", b1.clone()),
        svc("dns-remote", [10, 96, 0, 54], "UDP", b2.clone()),
        svc("np-local", [10, 96, 0, 20], "TCP", b1).with_node_port(30080),
        svc("np-remote", [10, 96, 0, 21], "TCP", b2).with_node_port(30081),
    ]
}

fn services_beside_kube_proxy_nftables(dp: Dataplane) {
    services_beside_kube_proxy(dp, ProxyMode::Nftables);
}

fn services_beside_kube_proxy_iptables(dp: Dataplane) {
    services_beside_kube_proxy(dp, ProxyMode::Iptables);
}

fn services_beside_kube_proxy(dp: Dataplane, mode: ProxyMode) {
    let t = Instant::now();
    let mut env = Env::start(dp, mode);
    let svcs = all_services(&env);
    env.services(&svcs);
    // By field, not through Env's getters: node1's agent is restarted below.
    let client = &env.pods[0][0];
    let (b1, b2) = (env.b1().ip(), env.b2().ip());
    let node1 = node_ip(1);
    let mut failures = Vec::new();
    let mut check = |what: &str, r: anyhow::Result<String>, want: &str| match r {
        Ok(s) if s.starts_with(want) => println!("ok: {what}: {s}"),
        Ok(s) => failures.push(format!("{what}: answered {s:?}, want {want:?}")),
        Err(e) => failures.push(format!("{what}: {e:#}")),
    };
    let a = client.ip();
    for (what, ip, want) in [
        (
            "ClusterIP TCP, same-node backend",
            [10, 96, 0, 10],
            format!("b1 {a}:"),
        ),
        (
            "ClusterIP TCP, cross-node backend",
            [10, 96, 0, 11],
            format!("b2 {a}:"),
        ),
    ] {
        let addr = SocketAddr::from((ip, 80));
        check(what, retry(what, || tcp_ask(client.ns(), addr)), &want);
    }
    for (what, ip, want) in [
        (
            "ClusterIP UDP (DNS-style), same-node backend",
            [10, 96, 0, 53],
            format!("b1 {a}:"),
        ),
        (
            "ClusterIP UDP (DNS-style), cross-node backend",
            [10, 96, 0, 54],
            format!("b2 {a}:"),
        ),
    ] {
        let addr = SocketAddr::from((ip, 53));
        check(
            what,
            retry(what, || udp_ask_connected(client.ns(), addr)),
            &want,
        );
    }
    let ext = env.cluster.external();
    for (what, port, want) in [
        (
            "NodePort from the external host, backend on the node called",
            30080,
            "b1 ",
        ),
        (
            "NodePort from the external host, backend on the other node",
            30081,
            "b2 ",
        ),
    ] {
        let addr = SocketAddr::from((node1, port));
        check(what, retry(what, || tcp_ask(ext, addr)), want);
    }
    // Still answering directly: the same backends by their pod IPs.
    for (what, ip, want) in [
        ("pod to pod, same node", b1, "b1 "),
        ("pod to pod, cross-node", b2, "b2 "),
    ] {
        let addr = SocketAddr::from((ip, TCP_PORT));
        check(what, retry(what, || tcp_ask(client.ns(), addr)), want);
    }
    // Hitless restart: flows that exist already (one connected UDP socket per backend, so
    // one conntrack entry each) keep working while node1's agent is killed and after a new
    // one adopted the pinned maps or the bridge's flows; a new TCP connection works too.
    let socks: Vec<(&str, std::net::UdpSocket, &str)> = [
        ("same-node", [10, 96, 0, 53], "b1 "),
        ("cross-node", [10, 96, 0, 54], "b2 "),
    ]
    .into_iter()
    .map(|(what, ip, want)| {
        let addr = SocketAddr::from((ip, 53));
        let sock = client.ns().run(move || {
            let s = std::net::UdpSocket::bind(("0.0.0.0", 0)).expect("bind");
            s.connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            s
        });
        (what, sock, want)
    })
    .collect();
    let ask = |s: &std::net::UdpSocket| -> anyhow::Result<String> {
        let mut buf = [0u8; 1500];
        for _ in 0..3 {
            s.send(b"query")?;
            if let Ok(n) = s.recv(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        anyhow::bail!("no answer")
    };
    for phase in [
        "before the restart",
        "while the agent is down",
        "after the restart",
    ] {
        match phase {
            "while the agent is down" => env.cluster.nodes_mut()[0]
                .agent()
                .kill9()
                .expect("killing node1's agent"),
            "after the restart" => env.cluster.nodes_mut()[0]
                .agent()
                .restart()
                .expect("restarting node1's agent"),
            _ => {}
        }
        for (what, sock, want) in &socks {
            let what = format!("ClusterIP UDP {what}, one flow, {phase}");
            check(&what, ask(sock), want);
        }
    }
    let what = "ClusterIP TCP, cross-node backend, after the restart";
    let addr = SocketAddr::from(([10, 96, 0, 11], 80));
    check(what, retry(what, || tcp_ask(client.ns(), addr)), "b2 ");

    let root_after = root_snapshot();
    println!(
        "root namespace: {} lines of ruleset, links, addresses, routes, rules and sysctls compared",
        root_after.lines().count()
    );
    if root_after != env.root_before {
        failures.push(format!(
            "the root network namespace changed:\n--- before\n{}\n--- after\n{root_after}",
            env.root_before
        ));
    }
    if !failures.is_empty() {
        let logs = env.logs();
        panic!("{} failed:\n{}\n{logs}", mode.as_str(), failures.join("\n"));
    }
    println!(
        "{} beside kube-proxy ({}): {:?}",
        dp.as_str(),
        mode.as_str(),
        t.elapsed()
    );
}

/// The fast-path counters of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PathCounters {
    /// eBPF: packets the node's stack delivered to a local pod from a pod's address (what
    /// pod-to-pod traffic on the slow path would be). OVS: packets from the gateway port
    /// (committed to the bridge's conntrack).
    stack_to_pods: u64,
    /// Replies sent to the stack instead of the fast path (eBPF: from pods and the tunnel;
    /// OVS: the gateway-reply flow).
    replies_to_stack: u64,
    /// Stack-carried packets recorded for the tunnel (eBPF only).
    recorded_tunnel: u64,
}

fn n_packets(line: &str) -> u64 {
    line.split([',', ' '])
        .find_map(|t| t.strip_prefix("n_packets="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn path_counters(c: &mut Cluster, i: usize) -> PathCounters {
    let node = &mut c.nodes_mut()[i];
    match node.dataplane() {
        Dataplane::Ebpf => {
            let v = ferrea_agent::dataplane::ebpf::service_counters(node.bpf_path())
                .expect("reading FERREA_SVC_CNT");
            let at = |slot: u32| v[slot as usize];
            PathCounters {
                stack_to_pods: at(ferrea_common::SVC_RECORDED_POD),
                replies_to_stack: at(ferrea_common::SVC_REPLY_FROM_POD)
                    + at(ferrea_common::SVC_REPLY_FROM_TUNNEL),
                recorded_tunnel: at(ferrea_common::SVC_RECORDED_TUNNEL),
            }
        }
        Dataplane::Ovs => {
            let ovs = node.ovs().expect("OVS node");
            ovs.flush_flow_stats().expect("ovs-appctl revalidator/wait");
            let flows = ovs.flows(BRIDGE).expect("dumping flows");
            let sum = |pred: &dyn Fn(&str) -> bool| -> u64 {
                flows
                    .iter()
                    .filter(|f| pred(&f.line))
                    .map(|f| n_packets(&f.line))
                    .sum()
            };
            PathCounters {
                stack_to_pods: sum(&|l| l.contains("table=0,") && l.contains("ct(commit")),
                replies_to_stack: sum(&|l| l.contains("table=30,") && l.contains("priority=210")),
                recorded_tunnel: 0,
            }
        }
    }
}

/// OVS: packets the L3 output flow of the pod with address `ip` delivered (table 30).
fn ovs_delivered_to(c: &mut Cluster, i: usize, ip: Ipv4Addr) -> u64 {
    let node = &mut c.nodes_mut()[i];
    let Some(ovs) = node.ovs() else {
        return 0;
    };
    ovs.flush_flow_stats().expect("ovs-appctl revalidator/wait");
    let dst = format!("nw_dst={ip}");
    ovs.flows(BRIDGE)
        .expect("dumping flows")
        .iter()
        .filter(|f| {
            f.line.contains("table=30,")
                && f.line.contains("priority=200")
                && f.line.split([',', ' ']).any(|t| t == dst)
        })
        .map(|f| n_packets(&f.line))
        .sum()
}

/// The counters of both nodes once they stop moving (the last packets of closed connections,
/// FIN and ACK, trail the client's read by a few milliseconds).
fn settled_counters(c: &mut Cluster) -> Vec<PathCounters> {
    let mut last: Vec<PathCounters> = (0..2).map(|i| path_counters(c, i)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let now: Vec<PathCounters> = (0..2).map(|i| path_counters(c, i)).collect();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// `n` request/response datagrams on one connected socket; returns how many were answered.
fn udp_exchange(from: &Pod, to: SocketAddr, n: usize) -> usize {
    from.ns().run(move || {
        let s = std::net::UdpSocket::bind(("0.0.0.0", 0)).expect("bind");
        s.connect(to).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let mut buf = [0u8; 1500];
        (0..n)
            .filter(|_| s.send(b"q").is_ok() && s.recv(&mut buf).is_ok())
            .count()
    })
}

fn pod_to_pod_keeps_the_fast_path_beside_kube_proxy(dp: Dataplane) {
    const N: usize = 500;
    let t = Instant::now();
    let mut env = Env::start(dp, ProxyMode::Nftables);
    let svcs = all_services(&env);
    env.services(&svcs[..2]);
    let (a_ip, b1, b2) = (env.client().ip(), env.b1().ip(), env.b2().ip());

    // NATed first: ClusterIP connections go through the stack both ways (positive control:
    // the counters this test reads do move when the slow path is taken).
    let before: Vec<PathCounters> = (0..2).map(|i| path_counters(&mut env.cluster, i)).collect();
    for ip in [[10, 96, 0, 10], [10, 96, 0, 11]] {
        let addr = SocketAddr::from((ip, 80));
        retry("ClusterIP TCP", || tcp_ask(env.client().ns(), addr)).expect("ClusterIP TCP");
    }
    let nat = settled_counters(&mut env.cluster);
    println!("NATed: node1 {:?} -> {:?}", before[0], nat[0]);
    assert!(
        nat[0].replies_to_stack > before[0].replies_to_stack,
        "{}: the replies of NATed connections did not go to the stack: {:?} -> {:?}",
        dp.as_str(),
        before[0],
        nat[0]
    );
    if dp == Dataplane::Ebpf {
        assert!(
            nat[0].recorded_tunnel > before[0].recorded_tunnel,
            "the cross-node ClusterIP request was not recorded at the tunnel: {:?} -> {:?}",
            before[0],
            nat[0]
        );
    }

    // Un-NATed: pod to pod by address, same node and cross-node, N exchanges each.
    let d1 = ovs_delivered_to(&mut env.cluster, 0, b1);
    let d2 = ovs_delivered_to(&mut env.cluster, 1, b2);
    let t_udp = Instant::now();
    let same = udp_exchange(env.client(), SocketAddr::from((b1, UDP_PORT)), N);
    let cross = udp_exchange(env.client(), SocketAddr::from((b2, UDP_PORT)), N);
    let took = t_udp.elapsed();
    let after = settled_counters(&mut env.cluster);
    println!(
        "un-NATed: {same}/{N} same-node and {cross}/{N} cross-node exchanges in {took:?}; \
         node1 {:?} -> {:?}; node2 {:?} -> {:?}",
        nat[0], after[0], nat[1], after[1]
    );
    assert_eq!((same, cross), (N, N), "pod-to-pod UDP exchanges answered");
    for i in 0..2 {
        assert_eq!(
            after[i],
            nat[i],
            "{}: node{} counted slow-path packets during un-NATed pod-to-pod traffic \
             (client {a_ip}, backends {b1}, {b2})",
            dp.as_str(),
            i + 1
        );
    }
    if dp == Dataplane::Ovs {
        // The packets were delivered by the pods' own L3 flows: N requests to each backend.
        let (e1, e2) = (
            ovs_delivered_to(&mut env.cluster, 0, b1),
            ovs_delivered_to(&mut env.cluster, 1, b2),
        );
        assert!(
            e1 - d1 >= N as u64 && e2 - d2 >= N as u64,
            "delivery flows counted {} and {} of {N} packets",
            e1 - d1,
            e2 - d2
        );
    }
    println!(
        "{} fast path beside kube-proxy: {:?}",
        dp.as_str(),
        t.elapsed()
    );
}
