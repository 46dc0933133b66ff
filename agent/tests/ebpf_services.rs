//! Privileged integration test of ferrea's service proxy in the eBPF dataplane
//! (`Dataplane::set_services`), driving [`EbpfDataplane`] directly with a [`ServicePlan`], as
//! the service-proxy controller would. No nftables rules exist in these namespaces, so
//! whatever the programs pass to the node's stack gets nowhere: a connection to a VIP that
//! works was carried by the programs (the counters say so too).
//!
//! Topology (namespaces made here and deleted on drop, also on failure):
//! - N, the node under test (transport `eth0` 172.18.0.11/24, pod CIDR 10.244.1.0/24): pods A
//!   (10.244.1.5, the client, and a backend of its own hairpin Service), B (.6) and C (.7),
//!   backends with a TCP listener on 8080 and a UDP echo on 5353 that name themselves.
//! - M, another node (172.18.0.12, 10.244.2.0/24) with its own eBPF dataplane and bpffs, reached
//!   through the VXLAN overlay: pod D (10.244.2.5), a backend like B and C.
//!
//! Needs root; without it the test prints `SKIP: <reason>` and passes.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use common::{BpffsGuard, GATEWAY, endpoint, veth_pod};
use ferrea_agent::config::TunnelType;
use ferrea_agent::dataplane::ebpf::{EbpfDataplane, lb_counters, service_counters};
use ferrea_agent::dataplane::{Dataplane, DumpSection, NodeNetwork, RemoteNode, Transport, Tunnel};
use ferrea_agent::proxy::{Backend, ServiceAddr, ServicePlan, VipKind, VipService};
use ferrea_agent::source::Protocol;
use ferrea_common as c;
use ferrea_tests::capture::{TcpPeers, tcp_answer};
use ferrea_tests::netns::NetNs;
use ferrea_tests::skip_unless_root;
use ferrea_tests::udp::{UdpEcho, udp_ask_connected, udp_ask_from};
use ferrea_tests::vethpod::{self, VethPod, VethPodSpec};

const N_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
const M_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 12);
const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 6);
const C: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
const D: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
/// TCP 80 and UDP 53 to B and C.
const VIP_WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// TCP 80 to B and C with `sessionAffinity: ClientIP`.
const VIP_AFF: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// TCP 80 to A itself (port 8081): hairpin.
const VIP_HAIRPIN: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
/// TCP 80 without backends.
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
/// TCP 80 and UDP 53 to D on the other node.
const VIP_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// TCP 80 to B and C port 8082, where connections stay open: draining.
const VIP_DRAIN: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15);
/// TCP 80 and UDP 53 to B only, as is [`VIP_B2`]: two Services sharing a backend.
const VIP_B1: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 16);
const VIP_B2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 17);
/// TCP 80 to a listener of node N itself (a host-network endpoint, as the API server's).
const VIP_HOST: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
const HAIRPIN_SNAT: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 253);

fn backend(ip: Ipv4Addr, port: u16) -> Backend {
    Backend {
        ip,
        port,
        local: ip.octets()[2] == 1,
    }
}

fn vip(
    ip: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    backends: Vec<Backend>,
    affinity_secs: Option<u32>,
) -> VipService {
    VipService {
        name: format!("default/svc-{ip}:{port}"),
        addr: ServiceAddr { ip, port, protocol },
        kind: VipKind::ClusterIp,
        external_backends: backends.clone(),
        backends,
        external_local: false,
        affinity_secs,
    }
}

/// The plan with `web` as the backends of VIP_WEB (TCP 8080 and UDP 5353) and VIP_DRAIN.
fn plan(web: &[Ipv4Addr]) -> ServicePlan {
    let tcp = |ips: &[Ipv4Addr]| ips.iter().map(|ip| backend(*ip, 8080)).collect::<Vec<_>>();
    let udp = |ips: &[Ipv4Addr]| ips.iter().map(|ip| backend(*ip, 5353)).collect::<Vec<_>>();
    let mut vips = vec![
        vip(VIP_WEB, 80, Protocol::Tcp, tcp(web), None),
        vip(VIP_WEB, 53, Protocol::Udp, udp(web), None),
        vip(VIP_AFF, 80, Protocol::Tcp, tcp(&[B, C]), Some(60)),
        vip(
            VIP_DRAIN,
            80,
            Protocol::Tcp,
            web.iter().map(|ip| backend(*ip, 8082)).collect(),
            None,
        ),
        vip(VIP_HAIRPIN, 80, Protocol::Tcp, vec![backend(A, 8081)], None),
        vip(VIP_EMPTY, 80, Protocol::Tcp, vec![], None),
        vip(VIP_REMOTE, 80, Protocol::Tcp, tcp(&[D]), None),
        vip(VIP_REMOTE, 53, Protocol::Udp, udp(&[D]), None),
        vip(VIP_HOST, 80, Protocol::Tcp, vec![backend(N_IP, 8090)], None),
    ];
    for v in [VIP_B1, VIP_B2] {
        vips.push(vip(v, 80, Protocol::Tcp, tcp(&[B]), None));
        vips.push(vip(v, 53, Protocol::Udp, udp(&[B]), None));
    }
    vips.sort_by_key(|v| v.addr);
    ServicePlan {
        vips,
        node_ports: vec![],
    }
}

fn network(pod_cidr: &str, gateway: Ipv4Addr, ip: Ipv4Addr, transport_ifindex: u32) -> NodeNetwork {
    NodeNetwork {
        pod_cidr: pod_cidr.parse().unwrap(),
        gateway,
        mtu: 1450,
        transport: Transport {
            ifname: "eth0".into(),
            ifindex: transport_ifindex,
            ip,
            prefix_len: 24,
            mtu: 1500,
        },
        tunnel: Some(Tunnel {
            kind: TunnelType::Vxlan,
            port: 4789,
        }),
    }
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// The name of the backend that answered a TCP connection from `ns` to `ip:port`, and the
/// peer it saw.
fn tcp_who(ns: &NetNs, ip: Ipv4Addr, port: u16) -> anyhow::Result<(String, String)> {
    let s = tcp_answer(ns, sock(ip, port), Duration::from_secs(2))?;
    let (who, peer) = s
        .split_once(' ')
        .ok_or_else(|| anyhow::anyhow!("answer {s:?}"))?;
    Ok((who.to_owned(), peer.to_owned()))
}

/// Connects from `ns`, source port `src_port`, to `ip:port` and returns the answer of a
/// [`TcpPeers`] listener ("<tag> <peer>"), or why not.
fn tcp_from_port(ns: &NetNs, src_port: u16, ip: Ipv4Addr, port: u16) -> anyhow::Result<String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket,
        sockopt::ReuseAddr,
    };
    use std::io::Read;
    ns.run(move || {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )?;
        setsockopt(&fd, ReuseAddr, &true)?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, src_port)),
        )?;
        let mut s = std::net::TcpStream::from(fd);
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        // A send timeout makes a blocking connect give up (with EINPROGRESS) after it.
        connect(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            &SockaddrIn::from(SocketAddrV4::new(ip, port)),
        )
        .map_err(|e| anyhow::anyhow!("connecting from port {src_port} to {ip}:{port}: {e}"))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.trim().to_owned())
    })
}

/// From one UDP socket on `src_port` in `ns`, one question to each of `to` in turn: each
/// answer ("<tag> <peer>") with the address it came from.
fn udp_from_one_port(
    ns: &NetNs,
    src_port: u16,
    to: Vec<SocketAddr>,
) -> anyhow::Result<Vec<(String, SocketAddr)>> {
    ns.run(move || {
        let sock = std::net::UdpSocket::bind(("0.0.0.0", src_port))?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut out = Vec::new();
        let mut buf = [0u8; 1500];
        for addr in to {
            sock.send_to(b"ping", addr)?;
            let (n, from) = sock.recv_from(&mut buf).map_err(|e| {
                anyhow::anyhow!("no UDP answer to {addr} from port {src_port}: {e}")
            })?;
            out.push((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
        }
        Ok(out)
    })
}

/// The port of a "<tag> <ip>:<port>" answer's peer.
fn peer_port(answer: &str) -> u16 {
    answer
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peer port in {answer:?}"))
}

/// How many of `n` new connections each backend got.
fn spread(ns: &NetNs, ip: Ipv4Addr, port: u16, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for i in 0..n {
        let (who, peer) = tcp_who(ns, ip, port)
            .unwrap_or_else(|e| panic!("connection {i} to {ip}:{port}: {e:#}"));
        assert!(peer.starts_with(&format!("{A}:")), "backend saw {peer}");
        *out.entry(who).or_default() += 1;
    }
    out
}

/// How many of `n` UDP questions (each from a new socket, connected to the VIP, so only an
/// answer from the VIP itself is received) each backend answered.
fn udp_spread(ns: &NetNs, ip: Ipv4Addr, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for i in 0..n {
        let a = udp_ask_connected(ns, sock(ip, 53))
            .unwrap_or_else(|e| panic!("UDP question {i} to {ip}:53: {e:#}"));
        let who = a.split(' ').next().unwrap_or_default().to_owned();
        *out.entry(who).or_default() += 1;
    }
    out
}

/// The service proxy's counter `slot` on the node pinned at `pin`.
fn lb(pin: &Path, slot: u32) -> u64 {
    lb_counters(pin).unwrap()[slot as usize]
}

fn section<'a>(d: &'a [DumpSection], name: &str) -> &'a DumpSection {
    d.iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no section {name}"))
}

/// A TCP listener in a namespace that keeps each connection open and answers every line
/// with its tag; stops on drop.
struct TagEcho {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TagEcho {
    fn start(ns: &NetNs, port: u16, tag: &'static str) -> TagEcho {
        use std::io::{BufRead, Write};
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let l = std::net::TcpListener::bind(sock(Ipv4Addr::UNSPECIFIED, port)).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || {
                            c.set_nonblocking(false).unwrap();
                            c.set_read_timeout(Some(Duration::from_millis(100)))
                                .unwrap();
                            let mut w = c.try_clone().unwrap();
                            let mut r = std::io::BufReader::new(c);
                            let mut line = String::new();
                            while !s.load(Ordering::Relaxed) {
                                match r.read_line(&mut line) {
                                    Ok(0) => break,
                                    Ok(_) => {
                                        line.clear();
                                        if writeln!(w, "{tag}").is_err() {
                                            break;
                                        }
                                    }
                                    Err(_) => {}
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv().unwrap();
        TagEcho {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TagEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection kept open: each question gets the tag of the backend that answers it.
struct Held(std::io::BufReader<std::net::TcpStream>);

impl Held {
    fn open(ns: &NetNs, ip: Ipv4Addr, port: u16) -> Held {
        let s = ns.run(move || {
            std::net::TcpStream::connect_timeout(&sock(ip, port), Duration::from_secs(2)).unwrap()
        });
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Held(std::io::BufReader::new(s))
    }

    fn ask(&mut self) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.0.get_mut(), "who").unwrap();
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }
}

struct Pods {
    a: VethPod,
    b: VethPod,
    c: VethPod,
}

#[test]
fn ebpf_service_proxy_end_to_end() {
    if !skip_unless_root("ebpf_service_proxy_end_to_end") {
        return;
    }
    let n = NetNs::new("lbn").unwrap();
    let m = NetNs::new("lbm").unwrap();
    for ns in [&n, &m] {
        for s in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            ns.sh(&["sysctl", "-qw", s]).unwrap();
        }
    }
    n.add_veth("eth0", &m, "eth0").unwrap();
    for (ns, a) in [(&n, "172.18.0.11/24"), (&m, "172.18.0.12/24")] {
        ns.ip(&["addr", "add", a, "dev", "eth0"]).unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    }
    let (bpf_n, bpf_m) = (BpffsGuard::new(), BpffsGuard::new());
    let pid = std::process::id() % 100_000;
    let pods = Pods {
        a: veth_pod(&n, "lbp", &format!("fla{pid}"), 5, A),
        b: veth_pod(&n, "lbp", &format!("flb{pid}"), 6, B),
        c: veth_pod(&n, "lbp", &format!("flc{pid}"), 7, C),
    };
    let d = VethPod::create(
        &m,
        "lbp",
        VethPodSpec {
            host_ifname: format!("fld{pid}"),
            ip: D,
            prefix: 24,
            gateway: Ipv4Addr::new(10, 244, 2, 1),
            host_mac: [0x02, 0xfe, 0, 0, 2, 5],
            pod_mac: [0x02, 0x00, 0, 0, 2, 5],
        },
    )
    .unwrap();
    // The listeners: each backend names itself.
    let mut servers = Vec::new();
    let mut echoes = Vec::new();
    for (p, tag) in [(&pods.b, "B"), (&pods.c, "C"), (&d, "D")] {
        servers.push(
            TcpPeers::start_tagged(p.ns(), sock(Ipv4Addr::UNSPECIFIED, 8080), Some(tag)).unwrap(),
        );
        echoes.push(UdpEcho::start(p.ns(), sock(Ipv4Addr::UNSPECIFIED, 5353), tag).unwrap());
    }
    servers.push(
        TcpPeers::start_tagged(pods.a.ns(), sock(Ipv4Addr::UNSPECIFIED, 8081), Some("A")).unwrap(),
    );
    servers.push(TcpPeers::start_tagged(&n, sock(N_IP, 8090), Some("N")).unwrap());
    let holders = [
        TagEcho::start(pods.b.ns(), 8082, "B"),
        TagEcho::start(pods.c.ns(), 8082, "C"),
    ];

    // Node M: its dataplane, pod D, the route to N's pods; then the process goes (the programs
    // and maps stay, as after an agent crash).
    let m_eth0 = vethpod::ifindex(&m, "eth0").unwrap();
    let n_eth0 = vethpod::ifindex(&n, "eth0").unwrap();
    let (pin_m, d_ep) = (bpf_m.path.clone(), endpoint(&d));
    m.run(move || {
        rt().block_on(async move {
            let dp = EbpfDataplane::new(&pin_m).unwrap();
            dp.init_node(&network(
                "10.244.2.0/24",
                Ipv4Addr::new(10, 244, 2, 1),
                M_IP,
                m_eth0,
            ))
            .await
            .unwrap();
            dp.add_pod(&d_ep).await.unwrap();
            dp.set_remote_nodes(&[RemoteNode {
                name: "n".into(),
                node_ip: N_IP,
                pod_cidr: "10.244.1.0/24".parse().unwrap(),
            }])
            .await
            .unwrap();
        })
    });

    let pin = bpf_n.path.clone();
    // The pods move to the node's thread and back (dropped there if an assertion fails).
    let pods = n.run(move || {
        rt().block_on(run_node(&pin, n_eth0, &pods));
        pods
    });
    drop((servers, echoes, holders));
    drop((pods, d));
    drop((bpf_n, bpf_m));
    drop((n, m));
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn start(pin: &Path, n_eth0: u32) -> EbpfDataplane {
    let dp = EbpfDataplane::new(pin).unwrap();
    dp.init_node(&network("10.244.1.0/24", GATEWAY, N_IP, n_eth0))
        .await
        .unwrap();
    dp
}

async fn run_node(pin: &Path, n_eth0: u32, pods: &Pods) {
    let a = pods.a.ns();
    let dp = start(pin, n_eth0).await;
    for p in [&pods.a, &pods.b, &pods.c] {
        dp.add_pod(&endpoint(p)).await.unwrap();
    }
    dp.set_remote_nodes(&[RemoteNode {
        name: "m".into(),
        node_ip: M_IP,
        pod_cidr: "10.244.2.0/24".parse().unwrap(),
    }])
    .await
    .unwrap();
    // Before any plan, a VIP is nobody's: the stack has no route for it.
    assert!(
        tcp_who(a, VIP_WEB, 80).is_err(),
        "VIP reachable without a plan"
    );
    dp.set_services(&plan(&[B, C])).await.unwrap();
    dp.set_services(&plan(&[B, C])).await.unwrap(); // idempotent
    let stack0 = service_counters(pin).unwrap();

    // TCP: many connections spread over both backends; every one was accepted from the VIP
    // (the SYN-ACK came back from it), and the backend saw the client's own address.
    let new0 = lb(pin, c::LB_CNT_NEW);
    let web = spread(a, VIP_WEB, 80, 40);
    println!("TCP spread over {VIP_WEB}:80: {web:?}");
    assert_eq!(
        web.keys().cloned().collect::<Vec<_>>(),
        ["B", "C"],
        "{web:?}"
    );
    assert!(lb(pin, c::LB_CNT_NEW) >= new0 + 40);
    assert!(lb(pin, c::LB_CNT_REVERSE_POD) >= 40 * 2);

    // UDP: questions from connected sockets (an answer from anywhere but the VIP is dropped
    // by the client's kernel).
    let dns = udp_spread(a, VIP_WEB, 30);
    println!("UDP spread over {VIP_WEB}:53: {dns:?}");
    assert_eq!(
        dns.keys().cloned().collect::<Vec<_>>(),
        ["B", "C"],
        "{dns:?}"
    );

    // Session affinity: one backend for every connection of the client.
    let aff = spread(a, VIP_AFF, 80, 15);
    println!("affinity {VIP_AFF}:80: {aff:?}");
    assert_eq!(aff.len(), 1, "affinity broken: {aff:?}");
    assert!(lb(pin, c::LB_CNT_AFFINITY) >= 14);

    // Hairpin: A reaches itself through its Service, seeing the hairpin address.
    let (who, peer) = tcp_who(a, VIP_HAIRPIN, 80).unwrap();
    assert_eq!(who, "A");
    assert!(
        peer.starts_with(&format!("{HAIRPIN_SNAT}:")),
        "hairpin peer {peer}"
    );
    assert!(lb(pin, c::LB_CNT_HAIRPIN) >= 1);

    // No backend: passed to the stack (here: no route, so refused at once), and counted.
    let nb = lb(pin, c::LB_CNT_NO_BACKEND);
    assert!(tcp_who(a, VIP_EMPTY, 80).is_err());
    assert!(lb(pin, c::LB_CNT_NO_BACKEND) > nb);

    // Another node's backend: DNAT on this node, the reply un-NATed by the tunnel's program.
    let rt0 = lb(pin, c::LB_CNT_REVERSE_TUNNEL);
    let (who, peer) = tcp_who(a, VIP_REMOTE, 80).unwrap();
    assert_eq!(who, "D");
    assert!(peer.starts_with(&format!("{A}:")), "{peer}");
    assert_eq!(udp_spread(a, VIP_REMOTE, 3).get("D"), Some(&3));
    assert!(lb(pin, c::LB_CNT_REVERSE_TUNNEL) >= rt0 + 4);

    // None of it went through the node's stack: nothing from a pod address was delivered by
    // the stack, nothing recorded as a stack-carried connection.
    let stack1 = service_counters(pin).unwrap();
    // A backend that is no pod (the node's own address): DNATed here, routed by the stack,
    // and the reply, delivered by the stack, un-NATed on the client's veth egress.
    let rs = lb(pin, c::LB_CNT_REVERSE_STACK);
    let (who, peer) = tcp_who(a, VIP_HOST, 80).unwrap();
    assert_eq!(who, "N");
    assert!(peer.starts_with(&format!("{A}:")), "{peer}");
    assert!(lb(pin, c::LB_CNT_REVERSE_STACK) >= rs + 2);
    for slot in [
        c::SVC_RECORDED_POD,
        c::SVC_RECORDED_TUNNEL,
        c::SVC_REPLY_FROM_POD,
        c::SVC_REPLY_FROM_TUNNEL,
    ] {
        assert_eq!(
            stack1[slot as usize], stack0[slot as usize],
            "stack slot {slot}"
        );
    }
    // Pod-to-pod without NAT keeps its fast path.
    assert!(ferrea_tests::fabric::ping(a.name(), B));
    assert_eq!(tcp_who(a, C, 8080).unwrap().0, "C");
    // A source port reused: first through the VIP, then straight to the backend it got. The
    // direct connection's replies must not be given the VIP (its SYN forgets the old
    // connection's reverse entry); and through the VIP again, the same backend answers.
    let through = tcp_from_port(a, 42424, VIP_WEB, 80).unwrap();
    let who = through.split(' ').next().unwrap().to_owned();
    let ip = if who == "B" { B } else { C };
    let direct = tcp_from_port(a, 42424, ip, 8080).unwrap();
    assert_eq!(
        direct,
        format!("{who} {A}:42424"),
        "direct after VIP on port 42424"
    );
    let again = tcp_from_port(a, 42424, VIP_WEB, 80).unwrap();
    assert_eq!(again, through, "through the VIP again on port 42424");

    // One client port through two VIPs that share backend B. TCP: B holds the first
    // connection in TIME_WAIT (it closes first), so the second, whose sequence numbers the
    // client's kernel derived from another tuple, must reach B from another source port.
    let remap0 = lb(pin, c::LB_CNT_PORT_REMAP);
    let remapped = c::LB_REMAP_PORT_FIRST..=u16::MAX;
    assert_eq!(
        tcp_from_port(a, 43210, VIP_B1, 80).unwrap(),
        format!("B {A}:43210")
    );
    let second = tcp_from_port(a, 43210, VIP_B2, 80).unwrap();
    assert!(second.starts_with("B "), "{second}");
    assert!(
        remapped.contains(&peer_port(&second)),
        "B saw port 43210 reused through another VIP: {second}"
    );
    // UDP: two flows from one socket, both alive; each answer comes back from the VIP it was
    // sent to (the flows do not share a reverse entry), and B sees them from two ports.
    let qs: Vec<SocketAddr> = [VIP_B1, VIP_B2, VIP_B1, VIP_B2]
        .iter()
        .map(|v| sock(*v, 53))
        .collect();
    let answers = udp_from_one_port(a, 43211, qs.clone()).unwrap();
    for ((answer, from), to) in answers.iter().zip(&qs) {
        assert_eq!(from, to, "the answer to {to} came from {from}: {answer}");
        assert!(answer.starts_with("B "), "{answer}");
    }
    assert_eq!(peer_port(&answers[0].0), 43211, "{answers:?}");
    assert!(remapped.contains(&peer_port(&answers[1].0)), "{answers:?}");
    assert_eq!(answers[2].0, answers[0].0, "{answers:?}");
    assert_eq!(answers[3].0, answers[1].0, "{answers:?}");
    assert_eq!(lb(pin, c::LB_CNT_PORT_REMAP), remap0 + 2);
    // The dump shows the remapped flow's reverse entry giving the client its own port back.
    let dump = dp.dump(None).await.unwrap();
    let ct = section(&dump, "map FERREA_LB_CT");
    assert!(
        ct.rows.iter().any(|r| r[0] == "reverse"
            && r[1] == "udp"
            && r[2] == "10.244.1.6:5353"
            && r[5] == "port(43211)"),
        "{ct:?}"
    );

    // The dump shows the maps decoded.
    let dump = dp.dump(None).await.unwrap();
    let svc = section(&dump, "map FERREA_LB_SVC");
    assert!(
        svc.rows
            .iter()
            .any(|r| r[0] == "10.96.0.10:80/tcp" && r[2] == "10.244.1.7:8080"),
        "{svc:?}"
    );
    let ct = section(&dump, "map FERREA_LB_CT");
    assert!(
        ct.rows
            .iter()
            .any(|r| r[0] == "reverse" && r[4] == "10.96.0.10:80")
    );
    assert!(
        section(&dump, "map FERREA_LB_CNT")
            .rows
            .iter()
            .any(|r| r[0] == "new_connections" && r[1] != "0")
    );

    // A UDP flow that C answers, then C leaves the plan: the flow's entries are flushed, so
    // the same flow (same source port) is answered by B; new connections go to B only.
    // A TCP connection kept open to C, to see it drain.
    let mut held = loop {
        let mut h = Held::open(a, VIP_DRAIN, 80);
        if h.ask() == "C" {
            break h;
        }
    };
    let port = (41000..41200)
        .find(|p| {
            udp_ask_from(a, *p, sock(VIP_WEB, 53))
                .unwrap()
                .starts_with("C ")
        })
        .expect("no UDP flow went to C");
    dp.set_services(&plan(&[B])).await.unwrap();
    let again = udp_ask_from(a, port, sock(VIP_WEB, 53)).unwrap();
    assert!(
        again.starts_with("B "),
        "flow from port {port} still answered: {again}"
    );
    let web = spread(a, VIP_WEB, 80, 10);
    assert_eq!(web.keys().cloned().collect::<Vec<_>>(), ["B"], "{web:?}");
    // The open connection to C still reaches C (it drains); new ones go to B.
    assert_eq!(
        held.ask(),
        "C",
        "an established TCP connection lost its backend"
    );
    assert_eq!(Held::open(a, VIP_DRAIN, 80).ask(), "B");
    drop(held);
    // C's TCP connections drain: their forward entries are marked stale, not removed.
    let dump = dp.dump(None).await.unwrap();
    let ct = section(&dump, "map FERREA_LB_CT");
    assert!(
        ct.rows
            .iter()
            .any(|r| r[0] == "forward" && r[4] == "10.244.1.7:8080" && r[5] == "stale"),
        "{ct:?}"
    );
    assert!(
        !ct.rows
            .iter()
            .any(|r| r[1] == "udp" && r[4] == "10.244.1.7:5353"),
        "C's UDP entries not flushed"
    );
    // C back: balanced over both again.
    dp.set_services(&plan(&[B, C])).await.unwrap();
    let web = spread(a, VIP_WEB, 80, 30);
    assert_eq!(
        web.keys().cloned().collect::<Vec<_>>(),
        ["B", "C"],
        "{web:?}"
    );

    // Restart: a new process adopts the maps; the same plan writes nothing and traffic flows.
    drop(dp);
    assert_eq!(
        tcp_who(a, VIP_REMOTE, 80).unwrap().0,
        "D",
        "LB broke without an agent"
    );
    let dp = start(pin, n_eth0).await;
    dp.set_services(&plan(&[B, C])).await.unwrap();
    let web = spread(a, VIP_WEB, 80, 20);
    assert_eq!(
        web.keys().cloned().collect::<Vec<_>>(),
        ["B", "C"],
        "{web:?}"
    );

    // An empty plan removes it all: VIPs are nobody's again.
    dp.set_services(&ServicePlan::default()).await.unwrap();
    let dump = dp.dump(None).await.unwrap();
    assert!(section(&dump, "map FERREA_LB_SVC").rows.is_empty());
    assert!(section(&dump, "map FERREA_LB_CT").rows.is_empty());
    assert!(
        tcp_who(a, VIP_WEB, 80).is_err(),
        "VIP reachable after an empty plan"
    );
}

/// TCP 5201 to B: bulk transfer.
const VIP_BULK: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);

/// Sends 1 GiB from `from` to a listener on port `port` of `to` through `dst`; the receiver's
/// rate in Gbit/s (from accept to end of stream).
fn gbits(from: &NetNs, to: &NetNs, dst: Ipv4Addr, port: u16) -> f64 {
    use std::io::{Read, Write};
    const LEN: usize = 1 << 30;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = to.spawn(move || {
        let l = std::net::TcpListener::bind(sock(Ipv4Addr::UNSPECIFIED, port)).unwrap();
        ready_tx.send(()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let t = std::time::Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0usize;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, LEN, "bulk transfer through {dst} cut short");
        (total * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
    });
    ready_rx.recv().unwrap();
    from.run(move || {
        let mut s =
            std::net::TcpStream::connect_timeout(&sock(dst, port), Duration::from_secs(3)).unwrap();
        let chunk = vec![0x5au8; 256 * 1024];
        for _ in 0..LEN / chunk.len() {
            s.write_all(&chunk).unwrap();
        }
    });
    server.join().unwrap()
}

/// 1,000 Services of 10 backends each (11,000 slots): how long `set_services` takes to
/// install, re-apply unchanged, change one Service's endpoints and remove them all, and that a
/// Service among them still carries connections (new connections per second through a VIP
/// and straight to the pod, same run, printed as figures).
#[test]
fn ebpf_service_proxy_at_scale() {
    if !skip_unless_root("ebpf_service_proxy_at_scale") {
        return;
    }
    let n = NetNs::new("lbs").unwrap();
    n.sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]).unwrap();
    let bpffs = BpffsGuard::new();
    let pid = std::process::id() % 100_000;
    let a = veth_pod(&n, "lbq", &format!("fsa{pid}"), 5, A);
    let b = veth_pod(&n, "lbq", &format!("fsb{pid}"), 6, B);
    let server =
        TcpPeers::start_tagged(b.ns(), sock(Ipv4Addr::UNSPECIFIED, 8080), Some("B")).unwrap();
    let pin = bpffs.path.clone();
    let (a, b) = n.run(move || {
        rt().block_on(async {
            let dp = EbpfDataplane::new(&pin).unwrap();
            dp.init_node(&NodeNetwork::standalone(
                "10.244.1.0/24".parse().unwrap(),
                1500,
            ))
            .await
            .unwrap();
            dp.add_pod(&endpoint(&a)).await.unwrap();
            dp.add_pod(&endpoint(&b)).await.unwrap();
            let big = |last: &[Ipv4Addr]| {
                let mut vips: Vec<VipService> = (0..1000u32)
                    .map(|i| {
                        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i);
                        let backends = if i == 999 {
                            last.iter().map(|ip| backend(*ip, 8080)).collect()
                        } else {
                            (0..10u8)
                                .map(|j| backend(Ipv4Addr::new(10, 244, 1, 100 + j), 8080))
                                .collect()
                        };
                        vip(ip, 80, Protocol::Tcp, backends, None)
                    })
                    .collect();
                vips.push(vip(
                    VIP_BULK,
                    5201,
                    Protocol::Tcp,
                    vec![backend(B, 5201)],
                    None,
                ));
                vips.sort_by_key(|v| v.addr);
                ServicePlan {
                    vips,
                    node_ports: vec![],
                }
            };
            let last = Ipv4Addr::new(10, 97, 3, 231);
            let timed = |what: &str, t: std::time::Instant| {
                println!("set_services {what}: {:?}", t.elapsed());
            };
            let t = std::time::Instant::now();
            dp.set_services(&big(&[B])).await.unwrap();
            timed("1000 Services x 10 backends, first", t);
            let t = std::time::Instant::now();
            dp.set_services(&big(&[B])).await.unwrap();
            timed("unchanged", t);
            let dump = dp.dump(None).await.unwrap();
            assert_eq!(
                section(&dump, "map FERREA_LB_SVC").rows.len(),
                999 * 11 + 2 + 2
            );

            // Connections per second through the VIP and straight to the pod.
            let cps = |ip: Ipv4Addr, port: u16| {
                let t = std::time::Instant::now();
                let n = 200;
                for _ in 0..n {
                    assert_eq!(tcp_who(a.ns(), ip, port).unwrap().0, "B");
                }
                f64::from(n) / t.elapsed().as_secs_f64()
            };
            let (via_vip, direct) = (cps(last, 80), cps(B, 8080));
            println!(
                "new TCP connections per second (one client thread, each connection a thread \
                 entering the pod's netns): via VIP {via_vip:.0}, direct {direct:.0}"
            );
            // Single-stream TCP through the VIP and straight to the pod, alternating.
            let mut via_vip = Vec::new();
            let mut direct = Vec::new();
            for _ in 0..3 {
                via_vip.push(gbits(a.ns(), b.ns(), VIP_BULK, 5201));
                direct.push(gbits(a.ns(), b.ns(), B, 5201));
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "single-stream TCP, 1 GiB per run, Gbit/s: via VIP {via_vip:.1?} (median {:.1}), \
                 direct {direct:.1?} (median {:.1})",
                median(&mut via_vip.clone()),
                median(&mut direct.clone())
            );
            // An endpoint change of one Service among 1,000.
            let t = std::time::Instant::now();
            dp.set_services(&big(&[B, Ipv4Addr::new(10, 244, 1, 120)]))
                .await
                .unwrap();
            timed("one Service's endpoints changed", t);
            let t = std::time::Instant::now();
            dp.set_services(&big(&[B])).await.unwrap();
            timed("one backend removed (connection-table scan)", t);
            assert_eq!(tcp_who(a.ns(), last, 80).unwrap().0, "B");
            let t = std::time::Instant::now();
            dp.set_services(&ServicePlan::default()).await.unwrap();
            timed("all removed", t);
            let dump = dp.dump(None).await.unwrap();
            assert!(section(&dump, "map FERREA_LB_SVC").rows.is_empty());
            assert!(section(&dump, "map FERREA_LB_CT").rows.is_empty());
        });
        (a, b)
    });
    drop(server);
    drop((a, b));
    drop(bpffs);
    drop(n);
}
