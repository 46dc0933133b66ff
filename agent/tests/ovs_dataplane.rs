//! Privileged integration tests of the OVS dataplane on a simulated node, driving
//! [`OvsDataplane`] directly (no agent process, no CNI binary): the test plays the agent
//! core's part, wiring pods with veth pairs and handing the backend their endpoints.
//!
//! The namespaces, the private ovsdb-server/ovs-vswitchd pair (ovs-vswitchd inside the node
//! namespace, all OVS state in a temporary directory) and the pods come from the simulated-node
//! harness (`ferrea-tests`), whose guards delete and stop everything on drop, also when an
//! assertion panics. The root namespace is never changed; the kernel here has no openvswitch
//! module, so bridges use the userspace datapath.
//!
//! Needs root (skipped with a printed reason otherwise) and Open vSwitch (a failure without).

mod common;

use common::endpoint;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use ferrea_agent::dataplane::ovs::openflow::OfConn;
use ferrea_agent::dataplane::ovs::pipeline::{self, NodeFacts, PodFacts};
use ferrea_agent::dataplane::ovs::{DatapathType, GATEWAY_IFNAME, OvsConfig, OvsDataplane};
use ferrea_agent::dataplane::{Dataplane, NodeNetwork, PodEndpoint, PodStats};
use ferrea_tests::fabric::{ping, ping_from};
use ferrea_tests::netns::NetNs;
use ferrea_tests::ovs::{self, OvsDaemons};
use ferrea_tests::skip_unless_root;
use ferrea_tests::vethpod::{self, VethPod, VethPodSpec};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);

/// A node namespace with its own OVS. Field order is drop order: the daemons stop before the
/// namespace goes, and the directory holding their state is removed last.
struct OvsNode {
    ovs: OvsDaemons,
    ns: NetNs,
    _dir: tempfile::TempDir,
}

impl OvsNode {
    fn start(role: &str) -> OvsNode {
        let dir = tempfile::tempdir().unwrap();
        let ns = NetNs::new(role).unwrap();
        let ovs = OvsDaemons::start(&dir.path().join("ovs"), ns.name()).unwrap();
        OvsNode { ovs, ns, _dir: dir }
    }

    fn config(&self, bridge: &str) -> OvsConfig {
        OvsConfig {
            ovsdb_socket: self.ovs.db_socket(),
            run_dir: self.ovs.run_dir().to_owned(),
            bridge: bridge.into(),
            datapath_type: DatapathType::Netdev,
        }
    }
}

/// A pod wired the way the agent core does it for the OVS backend: MAC 0a:58:<ip>, host MAC
/// 02:fe:<ip>, address /24, default route via the gateway.
fn make_pod(node: &NetNs, host_ifname: &str, ip: Ipv4Addr) -> VethPod {
    let o = ip.octets();
    VethPod::create(
        node,
        "p",
        VethPodSpec {
            host_ifname: host_ifname.into(),
            ip,
            prefix: 24,
            gateway: GATEWAY,
            host_mac: [0x02, 0xfe, o[0], o[1], o[2], o[3]],
            pod_mac: vethpod::pod_mac_for(ip),
        },
    )
    .unwrap()
}

/// Runs `f` on a thread that entered `node`'s network namespace, with its own runtime.
fn in_node<F, Fut>(node: &NetNs, f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    node.run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    });
}

/// Flow lines of a dump without counters and durations, sorted: comparable between bridges.
fn normalized_flows(dump: &str) -> Vec<String> {
    let mut v: Vec<String> = ovs::parse_flows(dump)
        .iter()
        .map(ovs::Flow::normalized)
        .collect();
    v.sort();
    v
}

fn ofctl(args: &[&str]) -> String {
    ovs::ofctl(args).unwrap()
}

#[test]
fn ovs_dataplane_end_to_end() {
    if !skip_unless_root("ovs_dataplane_end_to_end") {
        return;
    }
    let mut env = OvsNode::start("ovsn");
    let node = env.ns.name().to_owned();
    let pid = std::process::id() % 100_000;
    let a = make_pod(&env.ns, &format!("foa{pid}"), Ipv4Addr::new(10, 244, 1, 5));
    let b = make_pod(&env.ns, &format!("fob{pid}"), Ipv4Addr::new(10, 244, 1, 6));
    // A third endpoint whose pod is gone after the restart: both veth ends in the node.
    let c_if = format!("foc{pid}");
    let c_ip = Ipv4Addr::new(10, 244, 1, 7);
    let c_o = c_ip.octets();
    let c = PodEndpoint {
        container_id: "c-gone".into(),
        host_ifname: c_if.clone(),
        host_ifindex: vethpod::dangling_veth(&env.ns, &c_if, &format!("focp{pid}")).unwrap(),
        host_mac: [2, 0xfe, c_o[0], c_o[1], c_o[2], c_o[3]],
        pod_mac: vethpod::pod_mac_for(c_ip),
        ip: c_ip,
    };

    let cfg = env.config("br-fe");
    let net = NodeNetwork::standalone("10.244.1.0/24".parse().unwrap(), 1500);
    let (a_ns, b_ns) = (a.name().to_owned(), b.name().to_owned());
    let (aep, bep) = (endpoint(&a), endpoint(&b));
    let node2 = node.clone();
    let cfg2 = cfg.clone();
    let mgmt = env.ovs.mgmt("br-fe");
    let net2 = net.clone();
    let (ip_a, ip_b) = (a.ip(), b.ip());
    in_node(&env.ns, move || async move {
        let dp = OvsDataplane::new(cfg2.clone());
        let t = Instant::now();
        dp.init_node(&net2).await.unwrap();
        println!("init_node (new bridge): {:?}", t.elapsed());
        assert_eq!(dp.round(), 1);
        let addr = ferrea_tests::netns::run_ok(std::process::Command::new("ip").args([
            "-n",
            &node2,
            "addr",
            "show",
            "dev",
            GATEWAY_IFNAME,
        ]))
        .unwrap();
        assert!(
            addr.contains("10.244.1.1/24") && addr.contains("0a:58:0a:f4:01:01"),
            "{addr}"
        );

        for ep in [&aep, &bep, &c] {
            let t = Instant::now();
            dp.add_pod(ep).await.unwrap();
            println!("add_pod {}: {:?}", ep.host_ifname, t.elapsed());
        }
        let t = Instant::now();
        dp.add_pod(&aep).await.unwrap();
        println!(
            "add_pod {} again (idempotent): {:?}",
            aep.host_ifname,
            t.elapsed()
        );
        // A batch to measure the steady-state cost: re-adds of existing ports.
        let t = Instant::now();
        for _ in 0..20 {
            dp.add_pod(&bep).await.unwrap();
        }
        println!("add_pod re-add mean over 20: {:?}", t.elapsed() / 20);

        assert!(ping(&a_ns, ip_b), "pod A cannot ping pod B");
        assert!(ping(&b_ns, ip_a), "pod B cannot ping pod A");
        assert!(ping(&a_ns, GATEWAY), "pod A cannot ping the gateway");
        assert!(ping(&node2, ip_b), "node cannot ping pod B");
        // One echo each way between A and B, A to the gateway, the node to B (fabric::ping
        // sends one request, and retries once only on failure). vswitchd's revalidators push
        // datapath counters to the OpenFlow rules about every 500 ms, so poll.
        let want = |sa: &PodStats, sb: &PodStats| {
            sa.tx_packets >= 3
                && sa.tx_bytes > 0
                && sa.rx_packets >= 2
                && sb.rx_packets >= 3
                && sb.tx_packets >= 3
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        let (sa, sb) = loop {
            let sa = dp.pod_stats(&aep).await.unwrap().expect("stats of A");
            let sb = dp.pod_stats(&bep).await.unwrap().expect("stats of B");
            if want(&sa, &sb) || Instant::now() > deadline {
                break (sa, sb);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!("stats A {sa:?}\nstats B {sb:?}");
        assert!(want(&sa, &sb), "counters too low: A {sa:?}, B {sb:?}");
        assert_eq!(sa.drop_spoofed, 0);

        // Spoof guard: another source IP from pod A goes nowhere and is counted.
        let ip_in_a = |args: &[&str]| {
            ferrea_tests::netns::run_ok(
                std::process::Command::new("ip")
                    .args(["-n", &a_ns])
                    .args(args),
            )
            .unwrap()
        };
        let spoofed = Ipv4Addr::new(10, 244, 1, 99);
        ip_in_a(&["addr", "add", "10.244.1.99/24", "dev", "eth0"]);
        assert!(
            !ping_from(&a_ns, ip_b, Some(spoofed)),
            "spoofed ping got a reply"
        );
        ip_in_a(&["addr", "del", "10.244.1.99/24", "dev", "eth0"]);
        let sa2 = dp.pod_stats(&aep).await.unwrap().unwrap();
        assert!(sa2.drop_spoofed > 0, "drop_spoofed did not grow: {sa2:?}");
        // A spoofed MAC too (same IP, other source MAC).
        ip_in_a(&["link", "set", "eth0", "address", "0a:58:0a:f4:01:63"]);
        assert!(!ping(&a_ns, ip_b), "ping with a spoofed MAC got a reply");
        ip_in_a(&[
            "link",
            "set",
            "eth0",
            "address",
            &vethpod::mac_str(aep.pod_mac),
        ]);
        assert!(
            ping(&a_ns, ip_b),
            "pod A -> B broke after restoring its MAC"
        );

        // Agent restart with traffic running: the old process vanishes without cleanup, a
        // new one installs round 2, re-adds the kept pods and reconciles.
        let pinger = ferrea_tests::traffic::BackgroundPing::start(
            &a_ns,
            ip_b,
            Duration::from_millis(50),
            Duration::from_secs(3),
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(dp);
        let dp = OvsDataplane::new(cfg2.clone());
        let t = Instant::now();
        dp.init_node(&net2).await.unwrap();
        assert_eq!(dp.round(), 2);
        dp.add_pod(&aep).await.unwrap();
        dp.add_pod(&bep).await.unwrap();
        let keep: HashSet<Ipv4Addr> = [aep.ip, bep.ip].into_iter().collect();
        let removed = dp.retain_pods(&keep).await.unwrap();
        println!(
            "restart (init + 2 add_pod + retain_pods): {:?}",
            t.elapsed()
        );
        assert_eq!(removed, vec![c.ip]);
        let counts = pinger.finish().unwrap();
        println!("ping during restart: {counts:?}");
        assert!(counts.sent >= 40, "ping ran too short: {counts:?}");
        assert_eq!(counts.lost(), 0, "packets lost across restart: {counts:?}");

        // No flow of round 1 is left, no flow of C, and C's port is gone.
        let dump = ofctl(&[
            "dump-flows",
            &mgmt,
            "cookie=0x0001000000000000/0xffff000000000000",
        ]);
        assert!(
            normalized_flows(&dump).is_empty(),
            "round 1 flows left:\n{dump}"
        );
        let dump = ofctl(&["dump-flows", &mgmt]);
        assert!(!dump.contains("10.244.1.7"), "C's flows left:\n{dump}");
        assert!(dump.contains("cookie=0x2"), "no round-2 flows:\n{dump}");
        assert!(dp.pod_stats(&c).await.unwrap().is_none());
        assert!(dp.retain_pods(&keep).await.unwrap().is_empty());
        assert!(ping(&a_ns, ip_b), "pod A -> B broke after restart");

        // Delete B: gone from OVS, unreachable; deleting twice is fine.
        dp.del_pod(&bep).await.unwrap();
        dp.del_pod(&bep).await.unwrap();
        assert!(dp.pod_stats(&bep).await.unwrap().is_none());
        assert!(!ping(&a_ns, ip_b), "deleted pod B still reachable");
        // Re-add B.
        dp.add_pod(&bep).await.unwrap();
        assert!(ping(&a_ns, ip_b), "re-added pod B unreachable");
    });
    let ports = env.ovs.ports("br-fe").unwrap();
    assert!(
        ports.contains(&format!("foa{pid}")) && !ports.contains(&c_if),
        "{ports:?}"
    );

    // ovs-vswitchd restarts (flows lost, userspace datapath): the agent reconnects on its
    // next operation and re-installs every flow it knows.
    let (aep, bep) = (endpoint(&a), endpoint(&b));
    let cfg2 = cfg.clone();
    let net2 = net.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<()>();
    let agent = env.ns.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let dp = OvsDataplane::new(cfg2);
            dp.init_node(&net2).await.unwrap();
            dp.add_pod(&aep).await.unwrap();
            dp.add_pod(&bep).await.unwrap();
            back_tx.send(()).unwrap();
            rx.recv().unwrap();
            // The first call after the restart finds the connection closed and resyncs.
            dp.pod_stats(&bep).await.unwrap();
            back_tx.send(()).unwrap();
        });
    });
    // If the thread panicked, recv fails: join it to see its panic.
    let wait_agent = |r: Result<(), std::sync::mpsc::RecvError>,
                      agent: &mut Option<std::thread::JoinHandle<()>>| {
        if r.is_err()
            && let Err(p) = agent.take().unwrap().join()
        {
            std::panic::resume_unwind(p);
        }
    };
    let mut agent = Some(agent);
    wait_agent(back_rx.recv(), &mut agent);
    env.ovs.stop_vswitchd();
    env.ovs.start_vswitchd().unwrap();
    env.ovs.wait_mgmt("br-fe").unwrap();
    tx.send(()).unwrap();
    wait_agent(back_rx.recv(), &mut agent);
    if let Some(h) = agent.take()
        && let Err(p) = h.join()
    {
        std::panic::resume_unwind(p);
    }
    let ok_after = a.ping(b.ip());
    if !ok_after {
        println!("{}", ofctl(&["show", &env.ovs.mgmt("br-fe")]));
        println!("{}", ofctl(&["dump-flows", &env.ovs.mgmt("br-fe")]));
        println!(
            "{}",
            std::fs::read_to_string(env.ovs.run_dir().join("ovs-vswitchd.log")).unwrap_or_default()
        );
    }
    assert!(ok_after, "pod A -> B broke after a vswitchd restart");
    // The gateway tap was recreated by vswitchd; the agent put its address back.
    assert!(
        a.ping(GATEWAY),
        "pod A cannot reach the gateway after a vswitchd restart"
    );
    drop(a);
    drop(b);
    drop(env);
}

/// The codec against the real switch: the same pipeline installed through ferrea's client on
/// one bridge and through `ovs-ofctl --bundle add-flows` on another dumps identically. Then
/// the flow-install benchmark: 10,000 flows in one bundle, both ways.
#[test]
fn ovs_codec_matches_ofctl_dump_and_flow_install_bench() {
    if !skip_unless_root("ovs_codec_matches_ofctl_dump_and_flow_install_bench") {
        return;
    }
    let env = OvsNode::start("ovsc");
    let ovs = &env.ovs;
    for br in ["br-x", "br-y"] {
        ovs.add_secure_bridge(br).unwrap();
    }
    // Ports need not exist for flows to reference them.
    let n = NodeFacts {
        gw_port: 1,
        gw_mac: pipeline::gateway_mac("10.244.1.1".parse().unwrap()),
        pod_cidr: "10.244.1.0/24".parse().unwrap(),
    };
    let mut flows = pipeline::node_flows(3, &n);
    for i in 0..5u8 {
        flows.extend(pipeline::pod_flows(
            3,
            &n,
            &PodFacts {
                port: 10 + u32::from(i),
                mac: [0x0a, 0x58, 10, 244, 1, 10 + i],
                ip: Ipv4Addr::new(10, 244, 1, 10 + i),
            },
        ));
    }
    let file = ovs.run_dir().join("flows.txt");
    let write_flows = |fl: &[ferrea_agent::dataplane::ovs::openflow::FlowMod]| {
        let txt: Vec<String> = fl.iter().map(|f| f.to_ofctl()).collect();
        std::fs::write(&file, txt.join("\n") + "\n").unwrap();
    };
    write_flows(&flows);
    let (mx, my) = (ovs.mgmt("br-x"), ovs.mgmt("br-y"));
    let px = ovs.run_dir().join("br-x.mgmt");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let conn = rt.block_on(OfConn::connect(&px)).unwrap();
    rt.block_on(conn.bundle("test", &flows)).unwrap();
    ofctl(&["--bundle", "add-flows", &my, file.to_str().unwrap()]);
    let dx = normalized_flows(&ofctl(&["--no-stats", "dump-flows", &mx]));
    let dy = normalized_flows(&ofctl(&["--no-stats", "dump-flows", &my]));
    assert_eq!(dx.len(), flows.len());
    assert_eq!(
        dx, dy,
        "ferrea's client and ovs-ofctl installed different flows"
    );
    // Our dump by cookie sees exactly one pod's flows.
    let ip = Ipv4Addr::new(10, 244, 1, 12);
    let mine = rt
        .block_on(conn.dump_flows(
            0xff,
            pipeline::cookie::pod(0, ip),
            pipeline::cookie::POD_MASK,
        ))
        .unwrap();
    assert_eq!(
        mine.len(),
        pipeline::pod_flows(
            3,
            &n,
            &PodFacts {
                port: 12,
                mac: [0; 6],
                ip
            }
        )
        .len()
    );
    assert!(
        mine.iter()
            .all(|f| pipeline::cookie::pod_ip(f.cookie) == Some(ip))
    );
    // A rejected flow fails the whole bundle and names the flow.
    let bad = vec![
        flows[0].clone(),
        ferrea_agent::dataplane::ovs::openflow::FlowMod::add(
            // goto_table backwards: OVS rejects it (OFPBIC_BAD_TABLE_ID).
            10,
            1,
            1,
            ferrea_agent::dataplane::ovs::openflow::Match::new(),
            vec![ferrea_agent::dataplane::ovs::openflow::Instruction::GotoTable(5)],
        ),
    ];
    let e = rt
        .block_on(conn.bundle("bad", &bad))
        .unwrap_err()
        .to_string();
    println!("rejected bundle: {e}");
    assert!(e.contains("rejected"), "{e}");

    // Benchmark: 10,000 distinct flows in one bundle, into empty tables of both bridges.
    ofctl(&["del-flows", &mx]);
    ofctl(&["del-flows", &my]);
    let bench: Vec<_> = (0..10_000u32)
        .map(|i| {
            pipeline::pod_flows(
                4,
                &n,
                &PodFacts {
                    port: 100 + (i % 1000),
                    mac: [0x0a, 0x58, 10, 245, (i >> 8) as u8, i as u8],
                    ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + i),
                },
            )
            .pop()
            .unwrap()
        })
        .collect();
    write_flows(&bench);
    let t = Instant::now();
    rt.block_on(conn.bundle("bench", &bench)).unwrap();
    let ours = t.elapsed();
    let t = Instant::now();
    ofctl(&["--bundle", "add-flows", &my, file.to_str().unwrap()]);
    let theirs = t.elapsed();
    println!("ferrea_10k_flows_s={:.3}", ours.as_secs_f64());
    println!("ofctl_10k_flows_s={:.3}", theirs.as_secs_f64());
    let count = |m: &str| normalized_flows(&ofctl(&["--no-stats", "dump-flows", m])).len();
    assert_eq!(count(&mx), 10_000);
    assert_eq!(count(&my), 10_000);
    drop(conn);
    drop(rt);
    drop(env);
}

/// The `n_packets` of the flows of a dump whose line contains `needle`, summed.
fn packets_of(dump: &str, needle: &str) -> u64 {
    ovs::parse_flows(dump)
        .iter()
        .filter(|f| f.line.contains(needle))
        .filter_map(|f| {
            f.line
                .split([',', ' '])
                .find_map(|t| t.strip_prefix("n_packets="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

fn vip(
    port: u16,
    protocol: ferrea_agent::source::Protocol,
    backends: &[(Ipv4Addr, u16)],
) -> ferrea_agent::proxy::VipService {
    let backends: Vec<ferrea_agent::proxy::Backend> = backends
        .iter()
        .map(|&(ip, port)| ferrea_agent::proxy::Backend {
            ip,
            port,
            local: true,
        })
        .collect();
    ferrea_agent::proxy::VipService {
        name: format!("default/svc:{port}"),
        addr: ferrea_agent::proxy::ServiceAddr {
            ip: VIP,
            port,
            protocol,
        },
        kind: ferrea_agent::proxy::VipKind::ClusterIp,
        external_backends: backends.clone(),
        backends,
        external_local: false,
        affinity_secs: None,
    }
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// ferrea's proxy in the bridge: a local pod's TCP and UDP to a ClusterIP reach the backend
/// pods through the frontend's select group and `ct(nat)`, spread over the backends, answer
/// from the ClusterIP (a connected UDP socket only accepts that source), keep the client's
/// address, and never pass the gateway port (tcpdump on it sees none of their packets; the
/// node's stack here has no Service rules, so a packet that went there would get no answer).
/// A backend removed from the plan is no longer chosen; an empty plan removes the groups and
/// flows, after which the ClusterIP is unreachable (the packets go to the bare stack).
#[test]
fn ovs_service_proxy_load_balances_in_the_bridge() {
    use ferrea_agent::proxy::ServicePlan;
    use ferrea_agent::source::Protocol::{Tcp, Udp};
    use ferrea_tests::capture::{TcpPeers, Tcpdump, tcp_answer};
    use ferrea_tests::udp::{UdpEcho, udp_ask_connected, udp_ask_from};
    if !skip_unless_root("ovs_service_proxy_load_balances_in_the_bridge") {
        return;
    }
    let env = OvsNode::start("ovsl");
    let pid = std::process::id() % 100_000;
    let a = make_pod(&env.ns, &format!("fla{pid}"), Ipv4Addr::new(10, 244, 1, 5));
    let b = make_pod(&env.ns, &format!("flb{pid}"), Ipv4Addr::new(10, 244, 1, 6));
    let c = make_pod(&env.ns, &format!("flc{pid}"), Ipv4Addr::new(10, 244, 1, 7));
    let (ip_b, ip_c) = (b.ip(), c.ip());
    let _tb = TcpPeers::start_tagged(b.ns(), "0.0.0.0:8080".parse().unwrap(), Some("b")).unwrap();
    let _tc = TcpPeers::start_tagged(c.ns(), "0.0.0.0:8080".parse().unwrap(), Some("c")).unwrap();
    let _ub = UdpEcho::start(b.ns(), "0.0.0.0:5353".parse().unwrap(), "b").unwrap();
    let _uc = UdpEcho::start(c.ns(), "0.0.0.0:5353".parse().unwrap(), "c").unwrap();
    let cfg = env.config("br-fl");
    let mgmt = env.ovs.mgmt("br-fl");
    let net = NodeNetwork::standalone("10.244.1.0/24".parse().unwrap(), 1500);
    let eps = [endpoint(&a), endpoint(&b), endpoint(&c)];
    let dp = std::sync::Arc::new(OvsDataplane::new(cfg));
    let d = dp.clone();
    in_node(&env.ns, move || async move {
        d.init_node(&net).await.unwrap();
        for ep in &eps {
            d.add_pod(ep).await.unwrap();
        }
    });
    let both = ServicePlan {
        vips: vec![
            vip(53, Udp, &[(ip_b, 5353), (ip_c, 5353)]),
            vip(80, Tcp, &[(ip_b, 8080), (ip_c, 8080)]),
        ],
        node_ports: vec![],
    };
    let set = |plan: ServicePlan| {
        let d = dp.clone();
        in_node(&env.ns, move || async move {
            d.set_services(&plan).await.unwrap()
        });
    };
    set(both.clone());
    let groups = ofctl(&["dump-groups", &mgmt]);
    println!("{groups}");
    assert_eq!(groups.matches("group_id=").count(), 2, "{groups}");

    let mut gw = Tcpdump::start(
        &env.ns,
        GATEWAY_IFNAME,
        "host 10.96.0.10 or port 8080 or port 5353",
    )
    .unwrap();
    let tcp = SocketAddrV4::new(VIP, 80);
    let udp = SocketAddrV4::new(VIP, 53);
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    let t = Instant::now();
    for _ in 0..20 {
        let ans =
            tcp_answer(a.ns(), tcp.into(), Duration::from_secs(3)).expect("TCP to the ClusterIP");
        let (tag, peer) = ans.split_once(' ').unwrap();
        assert!(
            peer.starts_with("10.244.1.5:"),
            "client address not kept: {ans}"
        );
        *seen.entry(format!("tcp {tag}")).or_default() += 1;
    }
    println!("20 TCP connections to the ClusterIP: {:?}", t.elapsed());
    for _ in 0..20 {
        let ans =
            udp_ask_connected(a.ns(), udp.into()).expect("UDP to the ClusterIP, answered from it");
        let (tag, peer) = ans.split_once(' ').unwrap();
        assert!(
            peer.starts_with("10.244.1.5:"),
            "client address not kept: {ans}"
        );
        *seen.entry(format!("udp {tag}")).or_default() += 1;
    }
    println!("backends chosen: {seen:?}");
    for k in ["tcp b", "tcp c", "udp b", "udp c"] {
        assert!(
            seen.get(k).copied().unwrap_or(0) > 0,
            "{k} never chosen: {seen:?}"
        );
    }
    let through_gw = gw.stop();
    assert!(
        through_gw.is_empty(),
        "Service packets passed the gateway: {through_gw:#?}"
    );
    // The bridge's own counters: the frontends' group flows took the new connections, their
    // lookups every packet from the client.
    std::thread::sleep(Duration::from_millis(700));
    let dump = ofctl(&["dump-flows", &mgmt]);
    let new_conns = packets_of(&dump, "actions=group:");
    let lookups = packets_of(&dump, "actions=ct(table=27,zone=65520,nat)");
    println!("group flows: {new_conns} packets, frontend lookups: {lookups} packets");
    assert!(new_conns >= 40, "{dump}");
    assert!(lookups >= new_conns, "{dump}");
    let stats = ofctl(&["dump-group-stats", &mgmt]);
    println!("{stats}");

    // A UDP client whose flow (fixed source port) C serves: its conntrack entry would keep
    // it there after C leaves, unless the backend flushes it.
    let pinned = (41000..41100u16)
        .find(|p| {
            udp_ask_from(a.ns(), *p, udp.into())
                .unwrap()
                .starts_with("c ")
        })
        .expect("a source port that C serves");
    assert!(
        udp_ask_from(a.ns(), pinned, udp.into())
            .unwrap()
            .starts_with("c ")
    );
    // C leaves: only B is chosen.
    set(ServicePlan {
        vips: vec![vip(53, Udp, &[(ip_b, 5353)]), vip(80, Tcp, &[(ip_b, 8080)])],
        node_ports: vec![],
    });
    let ans = udp_ask_from(a.ns(), pinned, udp.into()).unwrap();
    assert!(
        ans.starts_with("b "),
        "UDP flow stayed with the removed backend: {ans}"
    );
    for _ in 0..10 {
        let ans = tcp_answer(a.ns(), tcp.into(), Duration::from_secs(3)).unwrap();
        assert!(ans.starts_with("b "), "removed backend chosen: {ans}");
        let ans = udp_ask_connected(a.ns(), udp.into()).unwrap();
        assert!(ans.starts_with("b "), "removed backend chosen: {ans}");
    }
    // The same plan twice changes nothing; an empty plan removes groups and flows.
    set(both.clone());
    set(both);
    set(ServicePlan::default());
    let groups = ofctl(&["dump-groups", &mgmt]);
    assert!(!groups.contains("group_id="), "{groups}");
    let dump = ofctl(&["dump-flows", &mgmt]);
    assert!(!dump.contains("10.96.0.10"), "{dump}");
    assert!(
        tcp_answer(a.ns(), tcp.into(), Duration::from_millis(500)).is_err(),
        "ClusterIP answered without the bridge's or the stack's translation"
    );
    // Pod-to-pod is untouched.
    assert!(ping(a.name(), ip_b));
}
