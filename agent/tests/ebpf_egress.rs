//! Privileged integration test of Egress in the eBPF dataplane, driving [`EbpfDataplane`]
//! directly with an [`EgressPlan`], as the agent core would.
//!
//! Topology (namespaces made here and deleted on drop, also on failure):
//! - N, the node under test: `eth0` 172.18.0.11/24 (transport) to U; `ferrea-tun0` (VXLAN,
//!   external mode) made by the dataplane; pods A (10.244.1.5, steered) and B (10.244.1.6);
//!   two veths to X: `eg0`, where policy routing sends packets marked with Egress id 777
//!   (`ip rule fwmark 0x3090000/0xffff0000 lookup 109`: ids are 16 bits, in the mark's upper half), and `eg1`, the main table's route to 198.51.100.0/24.
//! - U, the "other node" (172.18.0.12): plain VXLAN devices with fixed VNIs 0, 777 and 77 that
//!   send tunnelled packets to N as another node's pod 10.244.2.5 would; its `eth0` is where
//!   the steered packets are captured.
//! - X, the capture point behind N's egress routes.
//!
//! Needs root; without it the test prints `SKIP: <reason>` and passes.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use common::{BpffsGuard, GATEWAY, endpoint, veth_pod};
use ferrea_agent::config::TunnelType;
use ferrea_agent::dataplane::ebpf::{EbpfDataplane, PinLayout};
use ferrea_agent::dataplane::{
    Dataplane, EgressPlan, EgressSteer, NodeNetwork, RemoteNode, Transport, Tunnel,
};
use ferrea_common::EgressSteer as SteerEntry;
use ferrea_tests::capture::Tcpdump;
use ferrea_tests::netns::NetNs;
use ferrea_tests::skip_unless_root;
use ferrea_tests::vethpod::VethPod;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 12);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 6);
/// The other node's pod that sends through U's VXLAN devices.
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
/// Destinations outside the cluster, one per VNI U sends with: 777 (held), 77 (unknown), 0.
const EXT_HELD: &str = "198.51.100.1";
const EXT_UNKNOWN: &str = "198.51.100.2";
const EXT_VNI0: &str = "198.51.100.3";
const STEER_ID: u16 = 7;
/// Past 255, the old limit of 8-bit ids.
const HELD_ID: u16 = 777;

struct Lab {
    n: NetNs,
    u: NetNs,
    x: NetNs,
    a: VethPod,
    b: VethPod,
}

fn lab() -> Lab {
    let n = NetNs::new("egn").unwrap();
    let u = NetNs::new("egu").unwrap();
    let x = NetNs::new("egx").unwrap();
    // Forwarding and loose reverse-path checks inside the node namespace only.
    for s in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ] {
        n.sh(&["sysctl", "-qw", s]).unwrap();
    }
    n.add_veth("eth0", &u, "eth0").unwrap();
    n.add_veth("eg0", &x, "eth0").unwrap();
    n.add_veth("eg1", &x, "eth1").unwrap();
    for (ns, dev, addr) in [
        (&n, "eth0", "172.18.0.11/24"),
        (&u, "eth0", "172.18.0.12/24"),
        (&n, "eg0", "10.200.0.1/30"),
        (&x, "eth0", "10.200.0.2/30"),
        (&n, "eg1", "10.201.0.1/30"),
        (&x, "eth1", "10.201.0.2/30"),
    ] {
        ns.ip(&["addr", "add", addr, "dev", dev]).unwrap();
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    // Marked with Egress id 777: table 109 via eg0. Everything else to 198.51.100.0/24: eg1.
    n.ip(&[
        "rule",
        "add",
        "pref",
        "100",
        "fwmark",
        "0x3090000/0xffff0000",
        "lookup",
        "109",
    ])
    .unwrap();
    n.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.200.0.2",
        "dev",
        "eg0",
        "table",
        "109",
    ])
    .unwrap();
    n.ip(&["route", "add", "198.51.100.0/24", "via", "10.201.0.2"])
        .unwrap();

    // U: one VXLAN device per VNI towards N; inner destination MACs are arbitrary (N's program
    // rewrites them for pods and marks the rest as the host's). U's stack never accepts what
    // N sends back (the inner MACs are N's), so replies are observed on U's `eth0`.
    u.ip(&["addr", "add", &format!("{REMOTE_POD}/32"), "dev", "lo"])
        .unwrap();
    for (dev, vni, mac) in [
        ("vx0", "0", "02:aa:00:00:00:00"),
        ("vx777", "777", "02:aa:00:00:07:77"),
        ("vx77", "77", "02:aa:00:00:00:77"),
    ] {
        u.ip(&[
            "link",
            "add",
            dev,
            "address",
            mac,
            "type",
            "vxlan",
            "id",
            vni,
            "remote",
            "172.18.0.11",
            "local",
            "172.18.0.12",
            "dstport",
            "4789",
            "dev",
            "eth0",
        ])
        .unwrap();
        u.ip(&["link", "set", dev, "up"]).unwrap();
    }
    for (dst, dev) in [
        ("10.244.1.0/24", "vx0"),
        (EXT_VNI0, "vx0"),
        (EXT_HELD, "vx777"),
        (EXT_UNKNOWN, "vx77"),
    ] {
        u.ip(&[
            "route",
            "add",
            dst,
            "dev",
            dev,
            "src",
            &REMOTE_POD.to_string(),
        ])
        .unwrap();
    }
    for (ip, dev) in [
        ("10.244.1.5", "vx0"),
        (EXT_VNI0, "vx0"),
        (EXT_HELD, "vx777"),
        (EXT_UNKNOWN, "vx77"),
    ] {
        u.ip(&[
            "neigh",
            "add",
            ip,
            "lladdr",
            "02:fe:00:00:00:05",
            "dev",
            dev,
            "nud",
            "permanent",
        ])
        .unwrap();
    }

    let pid = std::process::id() % 100_000;
    let a = veth_pod(&n, "egp", &format!("fga{pid}"), 5, POD_A);
    let b = veth_pod(&n, "egp", &format!("fgb{pid}"), 6, POD_B);
    Lab { n, u, x, a, b }
}

fn network(transport_ifindex: u32, tunnel: bool) -> NodeNetwork {
    NodeNetwork {
        pod_cidr: "10.244.1.0/24".parse().unwrap(),
        gateway: GATEWAY,
        mtu: 1450,
        transport: Transport {
            ifname: "eth0".into(),
            ifindex: transport_ifindex,
            ip: NODE_IP,
            prefix_len: 24,
            mtu: 1500,
        },
        tunnel: tunnel.then_some(Tunnel {
            kind: TunnelType::Vxlan,
            port: 4789,
        }),
    }
}

fn plan(steer: bool, held: bool) -> EgressPlan {
    EgressPlan {
        steer: if steer {
            vec![EgressSteer {
                pod_ip: POD_A,
                node_ip: PEER_IP,
                id: STEER_ID,
            }]
        } else {
            vec![]
        },
        exempt: [
            "10.244.0.0/16",
            "10.96.0.0/12",
            "172.18.0.11/32",
            "172.18.0.12/32",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect(),
        held: if held { vec![HELD_ID] } else { vec![] },
    }
}

/// One ping (no retry: failures are expected here), `-W 1`.
fn ping1(ns: &str, dst: &str) -> bool {
    ferrea_tests::netns::exec(ns, &["ping", "-n", "-q", "-c", "1", "-W", "1", dst])
        .status
        .success()
}

/// What the pinned Egress maps hold, read through the pins as a debugging tool would.
#[derive(Debug, PartialEq, Eq)]
struct MapView {
    steer: Vec<(Ipv4Addr, SteerEntry)>,
    exempt: Vec<(Ipv4Addr, u32)>,
    held: Vec<u32>,
}

fn map_view(pin: &Path) -> MapView {
    let maps = PinLayout::new(pin.to_owned()).maps_dir();
    let open = |name: &str| MapData::from_pin(maps.join(name)).unwrap();
    let steer: BpfHashMap<MapData, u32, SteerEntry> =
        BpfHashMap::try_from(Map::HashMap(open(ferrea_common::MAP_EGRESS_STEER))).unwrap();
    let exempt: LpmTrie<MapData, u32, u32> =
        LpmTrie::try_from(Map::LpmTrie(open(ferrea_common::MAP_EGRESS_EXEMPT))).unwrap();
    let held: BpfHashMap<MapData, u32, u32> =
        BpfHashMap::try_from(Map::HashMap(open(ferrea_common::MAP_EGRESS_HELD))).unwrap();
    let mut s: Vec<_> = steer
        .iter()
        .map(|r| r.unwrap())
        .map(|(k, v)| (Ipv4Addr::from(k.to_ne_bytes()), v))
        .collect();
    s.sort_by_key(|e| e.0);
    let mut e: Vec<_> = exempt
        .iter()
        .map(|r| r.unwrap())
        .map(|(k, _): (LpmKey<u32>, u32)| (Ipv4Addr::from(k.data().to_ne_bytes()), k.prefix_len()))
        .collect();
    e.sort();
    let mut h: Vec<u32> = held.keys().map(|k| k.unwrap()).collect();
    h.sort_unstable();
    MapView {
        steer: s,
        exempt: e,
        held: h,
    }
}

fn expected_view(steer: bool, held: bool, tun_ifindex: u32) -> MapView {
    MapView {
        steer: if steer {
            vec![(
                POD_A,
                SteerEntry {
                    node_ip: u32::from_ne_bytes(PEER_IP.octets()),
                    id: u32::from(STEER_ID),
                    tun_ifindex,
                },
            )]
        } else {
            vec![]
        },
        exempt: vec![
            (Ipv4Addr::new(10, 96, 0, 0), 12),
            (Ipv4Addr::new(10, 244, 0, 0), 16),
            (NODE_IP, 32),
            (PEER_IP, 32),
        ],
        held: if held {
            vec![u32::from(HELD_ID)]
        } else {
            vec![]
        },
    }
}

/// Sends one ping from `from` to `dst` while capturing VXLAN on U's `eth0`; returns the lines.
fn vxlan_on_underlay(l: &Lab, from: &str, dst: &str) -> Vec<String> {
    let mut cap = Tcpdump::start(&l.u, "eth0", "udp port 4789").unwrap();
    ping1(from, dst);
    packets(cap.stop())
}

/// tcpdump prints a VXLAN packet on two lines (outer, then inner headers): one string per
/// packet.
fn packets(lines: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in lines {
        // A packet starts with its timestamp, "hh:mm:ss.frac".
        let starts = l.as_bytes().get(2) == Some(&b':') && l.as_bytes()[0].is_ascii_digit();
        match out.last_mut() {
            Some(last) if !starts => {
                last.push_str(" | ");
                last.push_str(l.trim());
            }
            _ => out.push(l),
        }
    }
    out
}

/// The overlay (VNI 0) both ways: U's pod pings pod A; A's reply must come back to U in
/// VXLAN with VNI 0 (a steered pod's traffic to another node's pod is not Egress traffic),
/// its outer UDP checksum zero (RFC 7348's recommendation for IPv4, as Antrea's tunnel ports).
fn overlay_reply_seen(l: &Lab) -> Result<(), Vec<String>> {
    let mut cap = Tcpdump::start_with(&l.u, "eth0", &["-vv"], "udp port 4789").unwrap();
    ping1(l.u.name(), &POD_A.to_string());
    let lines = packets(cap.stop());
    if lines.iter().any(|x| {
        x.contains("vni 0")
            && x.contains("[no cksum]")
            && x.contains(&format!("{POD_A} > {REMOTE_POD}: ICMP echo reply"))
    }) {
        Ok(())
    } else {
        Err(lines)
    }
}

/// Sends one ping from U to `dst` (through the VXLAN device of its VNI) while capturing on
/// X's `eth0` (the marked route) and `eth1` (the main table's); returns both captures' lines
/// mentioning `dst`.
fn arrivals_at_x(l: &Lab, dst: &str) -> (Vec<String>, Vec<String>) {
    let mut c0 = Tcpdump::start(&l.x, "eth0", "icmp").unwrap();
    let mut c1 = Tcpdump::start(&l.x, "eth1", "icmp").unwrap();
    ping1(l.u.name(), dst);
    let pick = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .filter(|x| x.contains(&format!("> {dst}:")))
            .collect()
    };
    (pick(c0.stop()), pick(c1.stop()))
}

#[test]
fn ebpf_egress_steer_and_hold() {
    if !skip_unless_root("ebpf_egress_steer_and_hold") {
        return;
    }
    let l = lab();
    let bpffs = BpffsGuard::new();
    let transport = l.n.ip(&["-o", "link", "show", "eth0"]).unwrap();
    let transport_ifindex: u32 = transport.split(':').next().unwrap().trim().parse().unwrap();
    let pin = bpffs.path.clone();
    let (ea, eb) = (endpoint(&l.a), endpoint(&l.b));
    let l = std::sync::Arc::new(l);
    let lab = l.clone();
    l.n.run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let l = &*lab;
                let net = network(transport_ifindex, true);
                let dp = EbpfDataplane::new(&pin).unwrap();
                dp.init_node(&net).await.unwrap();
                dp.add_pod(&ea).await.unwrap();
                dp.add_pod(&eb).await.unwrap();
                dp.set_remote_nodes(&[RemoteNode {
                    name: "u".into(),
                    node_ip: PEER_IP,
                    pod_cidr: "10.244.2.0/24".parse().unwrap(),
                }])
                .await
                .unwrap();
                let tun = nix::net::if_::if_nametoindex("ferrea-tun0").unwrap();
                run(l, &pin, dp, net, tun).await;
            })
    });
    drop(l);
    drop(bpffs);
}

async fn run(l: &Lab, pin: &Path, dp: EbpfDataplane, net: NodeNetwork, tun: u32) {
    let (a, b) = (l.a.name(), l.b.name());
    dp.set_egress(&plan(true, true)).await.unwrap();
    dp.set_egress(&plan(true, true)).await.unwrap(); // idempotent
    assert_eq!(map_view(pin), expected_view(true, true, tun));

    // The overlay (VNI 0) still works both ways for the steered pod: REMOTE comes first.
    if let Err(lines) = overlay_reply_seen(l) {
        panic!("no VNI 0 reply from pod A to the other node's pod: {lines:#?}");
    }

    // Steered: A's packet to the outside leaves N in VXLAN to U with VNI = the Egress id.
    let lines = vxlan_on_underlay(l, a, EXT_HELD);
    println!("A -> {EXT_HELD} on the underlay:\n{}", lines.join("\n"));
    assert!(
        lines.iter().any(|x| x.contains(&format!("{NODE_IP}."))
            && x.contains(&format!("{PEER_IP}.4789"))
            && x.contains(&format!("vni {STEER_ID}"))
            && x.contains(&format!("{POD_A} > {EXT_HELD}"))),
        "A's egress packet was not tunnelled to the egress node with VNI {STEER_ID}: {lines:#?}"
    );
    // Not steered: B's packet, and A's packet to an exempt destination (the service CIDR).
    let lines = vxlan_on_underlay(l, b, EXT_HELD);
    assert!(
        !lines.iter().any(|x| x.contains(&POD_B.to_string())),
        "B (not steered) was tunnelled: {lines:#?}"
    );
    let lines = vxlan_on_underlay(l, a, "10.96.0.10");
    assert!(
        !lines.iter().any(|x| x.contains("10.96.0.10")),
        "an exempt destination was steered: {lines:#?}"
    );
    // B's packet went through N's stack and out of the main table's route instead.
    let mut c1 = Tcpdump::start(&l.x, "eth1", "icmp").unwrap();
    ping1(b, EXT_HELD);
    let got = c1.stop();
    assert!(
        got.iter()
            .any(|x| x.contains(&format!("{POD_B} > {EXT_HELD}"))),
        "B's packet did not take the normal path: {got:#?}"
    );

    // Held: VNI 777 from U gets Egress 777's fwmark (policy routing sends it to eg0, never eg1).
    let (marked, unmarked) = arrivals_at_x(l, EXT_HELD);
    assert!(
        !marked.is_empty() && unmarked.is_empty(),
        "VNI {HELD_ID} not routed by its mark: eg0 {marked:#?} eg1 {unmarked:#?}"
    );
    // Unknown non-zero VNI: dropped (it would otherwise leave through eg1).
    let (marked, unmarked) = arrivals_at_x(l, EXT_UNKNOWN);
    assert!(
        marked.is_empty() && unmarked.is_empty(),
        "VNI 77 was not dropped: eg0 {marked:#?} eg1 {unmarked:#?}"
    );
    // VNI 0: today's path, unmarked, to the main table's route.
    let (marked, unmarked) = arrivals_at_x(l, EXT_VNI0);
    assert!(
        marked.is_empty() && !unmarked.is_empty(),
        "VNI 0 to the outside: eg0 {marked:#?} eg1 {unmarked:#?}"
    );

    // Restart: the maps are adopted with their contents, and the same plan changes nothing.
    drop(dp);
    let dp = EbpfDataplane::new(pin).unwrap();
    dp.init_node(&net).await.unwrap();
    assert_eq!(map_view(pin), expected_view(true, true, tun));
    dp.set_egress(&plan(true, true)).await.unwrap();
    assert_eq!(map_view(pin), expected_view(true, true, tun));

    // Upgrade from a build without the Egress maps: their pins do not exist and another
    // build's programs are attached. The new build creates the maps next to the old pins.
    drop(dp);
    let layout = PinLayout::new(pin.to_owned());
    for m in [
        ferrea_common::MAP_EGRESS_STEER,
        ferrea_common::MAP_EGRESS_EXEMPT,
        ferrea_common::MAP_EGRESS_HELD,
    ] {
        std::fs::remove_file(layout.maps_dir().join(m)).unwrap();
    }
    // The older builds' maps (the 256-id array, the counters before `drop_other`), pinned
    // under their old names: unpinned by the upgrade.
    let obsolete: Vec<_> = ferrea_common::OBSOLETE_MAP_PINS
        .iter()
        .map(|name| layout.maps_dir().join(name))
        .collect();
    for path in &obsolete {
        MapData::from_pin(layout.maps_dir().join(ferrea_common::MAP_COUNTERS))
            .unwrap()
            .pin(path)
            .unwrap();
    }
    common::pretend_programs_of_another_build(&layout);
    let dp = EbpfDataplane::new(pin).unwrap();
    dp.init_node(&net).await.unwrap();
    for path in &obsolete {
        assert!(!path.exists(), "the obsolete pin {path:?} was left");
    }
    let empty = MapView {
        steer: vec![],
        exempt: vec![],
        held: vec![],
    };
    assert_eq!(map_view(pin), empty, "new maps are created empty");
    dp.set_egress(&plan(true, true)).await.unwrap();
    assert_eq!(map_view(pin), expected_view(true, true, tun));
    let lines = vxlan_on_underlay(l, a, EXT_HELD);
    assert!(
        lines.iter().any(|x| x.contains(&format!("vni {STEER_ID}"))),
        "steering broken after the upgrade: {lines:#?}"
    );
    if let Err(lines) = overlay_reply_seen(l) {
        panic!("overlay broken after the upgrade: {lines:#?}");
    }

    // Nothing held or steered any more: VNI 777 is dropped, A's packets take the normal path.
    dp.set_egress(&plan(false, false)).await.unwrap();
    assert_eq!(map_view(pin), expected_view(false, false, tun));
    let (marked, unmarked) = arrivals_at_x(l, EXT_HELD);
    assert!(
        marked.is_empty() && unmarked.is_empty(),
        "VNI {HELD_ID} not dropped after release: eg0 {marked:#?} eg1 {unmarked:#?}"
    );
    let lines = vxlan_on_underlay(l, a, EXT_HELD);
    assert!(
        !lines.iter().any(|x| x.contains(&POD_A.to_string())),
        "A still steered after release: {lines:#?}"
    );

    // Invalid ids are rejected.
    let mut bad = plan(false, false);
    bad.held = vec![0];
    assert!(dp.set_egress(&bad).await.is_err());

    // noEncap: no tunnel to steer through; holding is fine.
    drop(dp);
    let dp = EbpfDataplane::new(pin).unwrap();
    dp.init_node(&network(net.transport.ifindex, false))
        .await
        .unwrap();
    let e = dp.set_egress(&plan(true, true)).await.unwrap_err();
    assert!(e.to_string().contains("noEncap"), "{e}");
    dp.set_egress(&plan(false, true)).await.unwrap();
}
