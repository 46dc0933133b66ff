//! Privileged integration tests of the OVS dataplane on a simulated node.
//!
//! Each test builds its own network namespaces (`fe-ovs-<pid>-<n>`), starts a private
//! ovsdb-server (database in a temporary directory) and an ovs-vswitchd inside the node
//! namespace with `OVS_RUNDIR`/`OVS_DBDIR`/`OVS_LOGDIR` pointing at that directory, and stops
//! both by PID on drop, also when an assertion panics. The root namespace is never changed;
//! the kernel here has no openvswitch module, so bridges use the userspace datapath.
//!
//! Needs root and Open vSwitch; without them the tests print `SKIP: <reason>` and pass.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrea_agent::dataplane::ovs::openflow::OfConn;
use ferrea_agent::dataplane::ovs::pipeline::{self, NodeFacts, PodFacts};
use ferrea_agent::dataplane::ovs::{DatapathType, GATEWAY_IFNAME, OvsConfig, OvsDataplane};
use ferrea_agent::dataplane::{Dataplane, NodeNetwork, PodEndpoint};

/// Runs a command, panicking with its output if it fails.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True if the command succeeds.
fn ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("ovs_dataplane needs root (network namespaces, OVS daemons)");
    }
    for tool in [
        "ovsdb-tool",
        "ovsdb-server",
        "ovs-vswitchd",
        "ovs-vsctl",
        "ovs-ofctl",
    ] {
        if !ok(&["sh", "-c", &format!("command -v {tool}")]) {
            return Some("Open vSwitch is not installed");
        }
    }
    if !Path::new("/usr/share/openvswitch/vswitch.ovsschema").exists() {
        return Some("no vswitch.ovsschema");
    }
    None
}

/// Network namespaces created by a test; deleted on drop (even on panic).
struct Netns {
    names: Vec<String>,
}

impl Netns {
    fn create(tag: &str, n: usize) -> Self {
        let pid = std::process::id();
        let mut g = Netns { names: Vec::new() };
        for i in 0..n {
            let name = format!("fe-ovs-{tag}{pid}-{i}");
            sh(&["ip", "netns", "add", &name]);
            g.names.push(name);
        }
        g
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// A private Open vSwitch: ovsdb-server and ovs-vswitchd (inside the node namespace), all
/// state in a temporary directory; both stopped by PID on drop.
struct Ovs {
    dir: tempfile::TempDir,
    node: String,
    db: Child,
    vswitchd: Option<Child>,
}

impl Ovs {
    fn start(node: &str) -> Ovs {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_owned();
        sh(&[
            "ovsdb-tool",
            "create",
            p.join("conf.db").to_str().unwrap(),
            "/usr/share/openvswitch/vswitch.ovsschema",
        ]);
        let db = Command::new("ovsdb-server")
            .arg(p.join("conf.db"))
            .arg(format!("--remote=punix:{}", p.join("db.sock").display()))
            .arg(format!(
                "--unixctl={}",
                p.join("ovsdb-server.ctl").display()
            ))
            .arg(format!(
                "--log-file={}",
                p.join("ovsdb-server.log").display()
            ))
            .arg("--no-chdir")
            .envs(Self::env(&p))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut ovs = Ovs {
            dir,
            node: node.to_owned(),
            db,
            vswitchd: None,
        };
        wait_for(&p.join("db.sock"));
        ovs.vsctl(&["--no-wait", "init"]);
        // Userspace TSO must be on before vswitchd starts, or TCP through netdev stalls.
        ovs.vsctl(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            "other_config:userspace-tso-enable=true",
        ]);
        ovs.start_vswitchd();
        ovs
    }

    fn env(p: &Path) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("OVS_RUNDIR", p.to_owned()),
            ("OVS_DBDIR", p.to_owned()),
            ("OVS_LOGDIR", p.to_owned()),
        ]
    }

    fn start_vswitchd(&mut self) {
        let p = self.dir.path();
        // `ip netns exec` execs the daemon (same PID), so the Child is vswitchd itself.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.node, "ovs-vswitchd"])
            .arg(format!("unix:{}", p.join("db.sock").display()))
            .arg(format!(
                "--unixctl={}",
                p.join("ovs-vswitchd.ctl").display()
            ))
            .arg(format!(
                "--log-file={}",
                p.join("ovs-vswitchd.log").display()
            ))
            .arg("--no-chdir")
            .envs(Self::env(p))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.vswitchd = Some(child);
        wait_for(&p.join("ovs-vswitchd.ctl"));
    }

    fn stop_vswitchd(&mut self) {
        if let Some(mut c) = self.vswitchd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.dir.path().join("ovs-vswitchd.ctl"));
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("db.sock")
    }

    fn mgmt(&self, br: &str) -> String {
        format!(
            "unix:{}",
            self.dir.path().join(format!("{br}.mgmt")).display()
        )
    }

    fn vsctl(&self, args: &[&str]) -> String {
        let db = format!("--db=unix:{}", self.sock().display());
        let mut v = vec!["ovs-vsctl", db.as_str(), "--timeout=10"];
        v.extend_from_slice(args);
        sh(&v)
    }

    fn ofctl(&self, args: &[&str]) -> String {
        let mut v = vec!["ovs-ofctl", "-O", "OpenFlow15"];
        v.extend_from_slice(args);
        sh(&v)
    }

    fn config(&self, bridge: &str) -> OvsConfig {
        OvsConfig {
            ovsdb_socket: self.sock(),
            run_dir: self.dir.path().to_owned(),
            bridge: bridge.into(),
            datapath_type: DatapathType::Netdev,
        }
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        self.stop_vswitchd();
        let _ = self.db.kill();
        let _ = self.db.wait();
    }
}

fn wait_for(p: &Path) {
    let start = Instant::now();
    while !p.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} did not appear",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

struct Pod {
    ns: String,
    ep: PodEndpoint,
}

/// A veth pair between the node and a pod namespace, the pod side configured like the agent
/// core does: MAC 0a:58:<ip>, address /24, default route via the gateway.
fn make_pod(node: &str, ns: &str, host_ifname: &str, ip: Ipv4Addr) -> Pod {
    let o = ip.octets();
    let pod_mac = [0x0a, 0x58, o[0], o[1], o[2], o[3]];
    let host_mac = [0x02, 0xfe, o[0], o[1], o[2], o[3]];
    sh(&[
        "ip",
        "-n",
        node,
        "link",
        "add",
        host_ifname,
        "address",
        &mac(host_mac),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "address",
        &mac(pod_mac),
        "netns",
        ns,
    ]);
    sh(&["ip", "-n", node, "link", "set", host_ifname, "up"]);
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{ip}/24"),
        "dev",
        "eth0",
    ]);
    sh(&[
        "ip",
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        "10.244.1.1",
        "dev",
        "eth0",
    ]);
    let out = sh(&["ip", "-n", node, "-o", "link", "show", host_ifname]);
    let host_ifindex = out.split(':').next().unwrap().trim().parse().unwrap();
    Pod {
        ns: ns.to_owned(),
        ep: PodEndpoint {
            container_id: format!("c-{host_ifname}"),
            host_ifname: host_ifname.to_owned(),
            host_ifindex,
            host_mac,
            pod_mac,
            ip,
        },
    }
}

fn ping(ns: &str, extra: &[&str], dst: &str) -> bool {
    let mut args = vec![
        "ip", "netns", "exec", ns, "ping", "-c", "2", "-W", "1", "-i", "0.2",
    ];
    args.extend_from_slice(extra);
    args.push(dst);
    ok(&args)
}

/// Runs `f` on a thread that entered `node`'s network namespace, with its own runtime.
fn in_node<F, Fut>(node: &str, f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let node = node.to_owned();
    let res = std::thread::spawn(move || {
        let fd = std::fs::File::open(format!("/var/run/netns/{node}")).unwrap();
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f());
    })
    .join();
    if let Err(p) = res {
        std::panic::resume_unwind(p);
    }
}

/// Flow lines of a dump without counters and durations, sorted: comparable between bridges.
fn normalized_flows(dump: &str) -> Vec<String> {
    let mut v: Vec<String> = dump
        .lines()
        .filter(|l| l.contains("actions="))
        .map(|l| l.trim().to_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn ovs_dataplane_end_to_end() {
    if let Some(r) = skip_reason() {
        println!("SKIP: {r}");
        return;
    }
    let netns = Netns::create("e", 3);
    let (node, pod_a, pod_b) = (
        netns.names[0].clone(),
        netns.names[1].clone(),
        netns.names[2].clone(),
    );
    sh(&["ip", "-n", &node, "link", "set", "lo", "up"]);
    let mut ovs = Ovs::start(&node);
    let pid = std::process::id() % 100_000;
    let a = make_pod(
        &node,
        &pod_a,
        &format!("foa{pid}"),
        "10.244.1.5".parse().unwrap(),
    );
    let b = make_pod(
        &node,
        &pod_b,
        &format!("fob{pid}"),
        "10.244.1.6".parse().unwrap(),
    );
    // A third endpoint whose pod is gone after the restart: both veth ends in the node.
    let c_if = format!("foc{pid}");
    sh(&[
        "ip",
        "-n",
        &node,
        "link",
        "add",
        &c_if,
        "type",
        "veth",
        "peer",
        "name",
        &format!("focp{pid}"),
    ]);
    sh(&["ip", "-n", &node, "link", "set", &c_if, "up"]);
    let mut c = make_pod_endpoint_only(&node, &c_if, "10.244.1.7".parse().unwrap());
    c.container_id = "c-gone".into();

    let cfg = ovs.config("br-fe");
    let net = NodeNetwork {
        pod_cidr: "10.244.1.0/24".parse().unwrap(),
        gateway: "10.244.1.1".parse().unwrap(),
        mtu: 1500,
    };
    let (a_ns, b_ns) = (a.ns.clone(), b.ns.clone());
    let (aep, bep) = (a.ep.clone(), b.ep.clone());
    let node2 = node.clone();
    let cfg2 = cfg.clone();
    let mgmt = ovs.mgmt("br-fe");
    let net2 = net.clone();
    in_node(&node, move || async move {
        let dp = OvsDataplane::new(cfg2.clone());
        let t = Instant::now();
        dp.init_node(&net2).await.unwrap();
        println!("init_node (new bridge): {:?}", t.elapsed());
        assert_eq!(dp.round(), 1);
        let addr = sh(&["ip", "-n", &node2, "addr", "show", "dev", GATEWAY_IFNAME]);
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

        assert!(ping(&a_ns, &[], "10.244.1.6"), "pod A cannot ping pod B");
        assert!(ping(&b_ns, &[], "10.244.1.5"), "pod B cannot ping pod A");
        assert!(
            ping(&a_ns, &[], "10.244.1.1"),
            "pod A cannot ping the gateway"
        );
        assert!(ping(&node2, &[], "10.244.1.6"), "node cannot ping pod B");
        let sa = dp.pod_stats(&aep).await.unwrap().expect("stats of A");
        let sb = dp.pod_stats(&bep).await.unwrap().expect("stats of B");
        println!("stats A {sa:?}\nstats B {sb:?}");
        assert!(sa.tx_packets >= 6 && sa.tx_bytes > 0, "{sa:?}");
        assert!(sa.rx_packets >= 4, "{sa:?}");
        assert!(sb.rx_packets >= 4 && sb.tx_packets >= 4, "{sb:?}");
        assert_eq!(sa.drop_spoofed, 0);

        // Spoof guard: another source IP from pod A goes nowhere and is counted.
        sh(&[
            "ip",
            "-n",
            &a_ns,
            "addr",
            "add",
            "10.244.1.99/24",
            "dev",
            "eth0",
        ]);
        assert!(
            !ping(&a_ns, &["-I", "10.244.1.99"], "10.244.1.6"),
            "spoofed ping got a reply"
        );
        sh(&[
            "ip",
            "-n",
            &a_ns,
            "addr",
            "del",
            "10.244.1.99/24",
            "dev",
            "eth0",
        ]);
        let sa2 = dp.pod_stats(&aep).await.unwrap().unwrap();
        assert!(sa2.drop_spoofed > 0, "drop_spoofed did not grow: {sa2:?}");
        // A spoofed MAC too (same IP, other source MAC).
        sh(&[
            "ip",
            "-n",
            &a_ns,
            "link",
            "set",
            "eth0",
            "address",
            "0a:58:0a:f4:01:63",
        ]);
        assert!(
            !ping(&a_ns, &[], "10.244.1.6"),
            "ping with a spoofed MAC got a reply"
        );
        sh(&[
            "ip",
            "-n",
            &a_ns,
            "link",
            "set",
            "eth0",
            "address",
            &mac(aep.pod_mac),
        ]);
        assert!(
            ping(&a_ns, &[], "10.244.1.6"),
            "pod A -> B broke after restoring its MAC"
        );

        // Agent restart with traffic running: the old process vanishes without cleanup, a
        // new one installs round 2, re-adds the kept pods and reconciles.
        let pinger = Command::new("ip")
            .args([
                "netns",
                "exec",
                &a_ns,
                "ping",
                "-c",
                "60",
                "-i",
                "0.05",
                "-W",
                "1",
                "10.244.1.6",
            ])
            .stdout(Stdio::piped())
            .spawn()
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
        let out = pinger.wait_with_output().unwrap();
        let summary = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_default()
            .to_owned();
        println!("ping during restart: {summary}");
        assert!(
            summary.contains(" 0% packet loss"),
            "packets lost across restart: {summary}"
        );

        // No flow of round 1 is left, no flow of C, and C's port is gone.
        let dump = sh(&[
            "ovs-ofctl",
            "-O",
            "OpenFlow15",
            "dump-flows",
            &mgmt,
            "cookie=0x0001000000000000/0xffff000000000000",
        ]);
        assert!(
            normalized_flows(&dump).is_empty(),
            "round 1 flows left:\n{dump}"
        );
        let dump = sh(&["ovs-ofctl", "-O", "OpenFlow15", "dump-flows", &mgmt]);
        assert!(!dump.contains("10.244.1.7"), "C's flows left:\n{dump}");
        assert!(dump.contains("cookie=0x2"), "no round-2 flows:\n{dump}");
        assert!(dp.pod_stats(&c).await.unwrap().is_none());
        assert!(dp.retain_pods(&keep).await.unwrap().is_empty());
        assert!(
            ping(&a_ns, &[], "10.244.1.6"),
            "pod A -> B broke after restart"
        );

        // Delete B: gone from OVS, unreachable; deleting twice is fine.
        dp.del_pod(&bep).await.unwrap();
        dp.del_pod(&bep).await.unwrap();
        assert!(dp.pod_stats(&bep).await.unwrap().is_none());
        assert!(
            !ping(&a_ns, &[], "10.244.1.6"),
            "deleted pod B still reachable"
        );
        // Re-add B, then its interface vanishes and it is deleted: not an error.
        dp.add_pod(&bep).await.unwrap();
        assert!(ping(&a_ns, &[], "10.244.1.6"), "re-added pod B unreachable");
    });
    let ports = ovs.vsctl(&["list-ports", "br-fe"]);
    assert!(
        ports.contains(&format!("foa{pid}")) && !ports.contains(&c_if),
        "{ports}"
    );

    // ovs-vswitchd restarts (flows lost, userspace datapath): the agent reconnects on its
    // next operation and re-installs every flow it knows.
    let (aep, bep) = (a.ep.clone(), b.ep.clone());
    let a_ns = a.ns.clone();
    let cfg2 = cfg.clone();
    let net2 = net.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<()>();
    let node2 = node.clone();
    let agent = std::thread::spawn(move || {
        let fd = std::fs::File::open(format!("/var/run/netns/{node2}")).unwrap();
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
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
    back_rx.recv().unwrap();
    ovs.stop_vswitchd();
    ovs.start_vswitchd();
    wait_for(&ovs.dir.path().join("br-fe.mgmt"));
    tx.send(()).unwrap();
    back_rx.recv().unwrap();
    agent.join().unwrap();
    let ok_after = ping(&a_ns, &[], "10.244.1.6");
    if !ok_after {
        println!("{}", ovs.ofctl(&["show", &ovs.mgmt("br-fe")]));
        println!("{}", ovs.ofctl(&["dump-flows", &ovs.mgmt("br-fe")]));
        println!(
            "{}",
            std::fs::read_to_string(ovs.dir.path().join("ovs-vswitchd.log")).unwrap_or_default()
        );
    }
    assert!(ok_after, "pod A -> B broke after a vswitchd restart");
    // The gateway tap was recreated by vswitchd; the agent put its address back.
    assert!(
        ping(&a_ns, &[], "10.244.1.1"),
        "pod A cannot reach the gateway after a vswitchd restart"
    );
    drop(ovs);
    drop(netns);
}

fn make_pod_endpoint_only(node: &str, ifname: &str, ip: Ipv4Addr) -> PodEndpoint {
    let out = sh(&["ip", "-n", node, "-o", "link", "show", ifname]);
    let host_ifindex = out.split(':').next().unwrap().trim().parse().unwrap();
    let o = ip.octets();
    PodEndpoint {
        container_id: String::new(),
        host_ifname: ifname.to_owned(),
        host_ifindex,
        host_mac: [2, 0xfe, o[0], o[1], o[2], o[3]],
        pod_mac: [0x0a, 0x58, o[0], o[1], o[2], o[3]],
        ip,
    }
}

/// The codec against the real switch: the same pipeline installed through ferrea's client on
/// one bridge and through `ovs-ofctl --bundle add-flows` on another dumps identically. Then
/// the flow-install benchmark: 10,000 flows in one bundle, both ways.
#[test]
fn ovs_codec_matches_ofctl_dump_and_flow_install_bench() {
    if let Some(r) = skip_reason() {
        println!("SKIP: {r}");
        return;
    }
    let netns = Netns::create("c", 1);
    let ovs = Ovs::start(&netns.names[0]);
    for br in ["br-x", "br-y"] {
        ovs.vsctl(&[
            "add-br",
            br,
            "--",
            "set",
            "Bridge",
            br,
            "datapath_type=netdev",
            "protocols=OpenFlow15",
            "fail_mode=secure",
        ]);
        wait_for(&ovs.dir.path().join(format!("{br}.mgmt")));
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
    let file = ovs.dir.path().join("flows.txt");
    let write_flows = |fl: &[ferrea_agent::dataplane::ovs::openflow::FlowMod]| {
        let txt: Vec<String> = fl.iter().map(|f| f.to_ofctl()).collect();
        std::fs::write(&file, txt.join("\n") + "\n").unwrap();
    };
    write_flows(&flows);
    let (mx, my) = (ovs.mgmt("br-x"), ovs.mgmt("br-y"));
    let px = ovs.dir.path().join("br-x.mgmt");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let conn = rt.block_on(OfConn::connect(&px)).unwrap();
    rt.block_on(conn.bundle("test", &flows)).unwrap();
    ovs.ofctl(&["--bundle", "add-flows", &my, file.to_str().unwrap()]);
    let dx = normalized_flows(&ovs.ofctl(&["--no-stats", "dump-flows", &mx]));
    let dy = normalized_flows(&ovs.ofctl(&["--no-stats", "dump-flows", &my]));
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
    ovs.ofctl(&["del-flows", &mx]);
    ovs.ofctl(&["del-flows", &my]);
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
    ovs.ofctl(&["--bundle", "add-flows", &my, file.to_str().unwrap()]);
    let theirs = t.elapsed();
    println!("ferrea_10k_flows_s={:.3}", ours.as_secs_f64());
    println!("ofctl_10k_flows_s={:.3}", theirs.as_secs_f64());
    let count = |m: &str| normalized_flows(&ovs.ofctl(&["--no-stats", "dump-flows", m])).len();
    assert_eq!(count(&mx), 10_000);
    assert_eq!(count(&my), 10_000);
    drop(conn);
    drop(rt);
    drop(ovs);
    drop(netns);
}
