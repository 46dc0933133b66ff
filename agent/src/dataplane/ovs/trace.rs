//! [`crate::dataplane::Dataplane::trace`] for the OVS backend: `ofproto/trace` of the packet's
//! flow on the integration bridge, asked of `ovs-vswitchd` over its control socket
//! ([`super::unixctl`]), and its text summarised.
//!
//! `ofproto/trace` runs the bridge's real OpenFlow tables on the flow (and follows
//! conntrack recirculations, resuming with `ct_state=trk|new`, a new connection's first
//! packet), without sending anything. Its text lists, per pass, each table the packet matched
//! (`30. ip,nw_dst=10.244.1.3, priority 200, cookie 0x…`) with the actions executed below it,
//! and notes (`-> NXM_NX_TUN_IPV4_DST[] is now 172.18.0.12`, `>> native tunnel routing
//! failed`). The summary is read from the OpenFlow actions of the last pass on ferrea's
//! bridge: the last `output:N` names the port (a pod's, the gateway's, the tunnel's, with
//! `tun_dst` and `tun_id` as set before it); no output means a drop, in the table of the last
//! flow matched (table 10, the spoof guard, for a forged source). The datapath actions are
//! not used for the verdict: their port numbers are the datapath's, not OpenFlow's.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use super::pipeline::{Table, prio};
use crate::dataplane::{
    PacketTrace, TUNNEL_VNI, TracePacket, TraceProto, TraceStep, TraceVerdict,
    trace::TRACE_SOURCE_PORT,
};

/// The ports of ferrea's bridge a trace can end on.
#[derive(Clone, Debug, Default)]
pub struct Ports {
    /// The gateway internal port.
    pub gateway: u32,
    /// The tunnel port (encap mode).
    pub tunnel: Option<u32>,
    /// Pod ports, to the pod's address.
    pub pods: HashMap<u32, Ipv4Addr>,
}

/// Why a trace's text could not be summarised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SummaryError {
    /// No table of the bridge matched at all (not ferrea's bridge, or not a trace).
    #[error("the trace shows no table of bridge {0}")]
    NoTables(String),
    /// Output to a port that is neither a pod's, nor the gateway's, nor the tunnel's.
    #[error("output to port {0}, which is not one of ferrea's ports")]
    UnknownPort(String),
    /// Output to the tunnel with no destination set before.
    #[error("output to the tunnel port without a tun_dst")]
    NoTunnelDestination,
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The `ofproto/trace` flow of `p` entering the bridge on OpenFlow port `in_port`, addressed to
/// the gateway's MAC (every pod's ARP answer). The protocol comes first: OVS parses the
/// transport fields only after it.
pub fn flow(p: &TracePacket, in_port: u32, gw_mac: [u8; 6]) -> String {
    let port = p.dst_port.unwrap_or(0);
    let l4 = match p.proto {
        TraceProto::Tcp => format!("tcp_src={TRACE_SOURCE_PORT},tcp_dst={port},tcp_flags=ack"),
        TraceProto::Udp => format!("udp_src={TRACE_SOURCE_PORT},udp_dst={port}"),
        TraceProto::Icmp => "icmp_type=8,icmp_code=0".to_owned(),
    };
    format!(
        "{},in_port={in_port},dl_src={},dl_dst={},nw_src={},nw_dst={},nw_ttl=64,{l4}",
        p.proto.as_str(),
        mac(&p.src_mac),
        mac(&gw_mac),
        p.src_ip,
        p.dst
    )
}

/// One table a pass matched.
#[derive(Debug, Default)]
struct Matched {
    table: u8,
    /// The flow's match, as printed.
    matches: String,
    priority: u16,
    actions: Vec<String>,
    notes: Vec<String>,
}

impl Matched {
    /// The flow as people read it: `ip,nw_dst=10.244.1.3, priority 200`.
    fn flow(&self) -> String {
        if self.matches.is_empty() {
            format!("priority {}", self.priority)
        } else {
            format!("{}, priority {}", self.matches, self.priority)
        }
    }
}

/// One pass of the packet (the first, and one per recirculation).
#[derive(Debug, Default)]
struct Pass {
    title: Option<String>,
    tables: Vec<Matched>,
    datapath_actions: Option<String>,
}

/// A table line: `30. ip,nw_dst=10.244.1.3, priority 200, cookie 0x1002000af4010103`.
fn table_line(l: &str) -> Option<Matched> {
    let (num, rest) = l.trim_start().split_once(". ")?;
    let table: u8 = num.parse().ok()?;
    let (matches, tail) = rest.rsplit_once(", priority ").or_else(|| {
        // A flow without match fields: `0. priority 0`.
        rest.strip_prefix("priority ").map(|t| ("", t))
    })?;
    let priority: u16 = tail.split(',').next()?.trim().parse().ok()?;
    Some(Matched {
        table,
        matches: matches.to_owned(),
        priority,
        ..Matched::default()
    })
}

/// The passes of `text` on `bridge` (tables of other bridges, such as the userspace
/// datapath's physical bridge after a tunnel, are left out).
fn passes(text: &str, bridge: &str) -> Vec<Pass> {
    let mut out = vec![Pass::default()];
    let mut on_bridge = false;
    let mut in_banner = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("=====") {
            if !in_banner {
                out.push(Pass::default());
            }
            in_banner = !in_banner;
            continue;
        }
        let pass = out.last_mut().expect("never empty");
        if in_banner {
            pass.title = Some(t.to_owned());
            continue;
        }
        if let Some(b) = t
            .strip_prefix("bridge(\"")
            .and_then(|r| r.strip_suffix("\")"))
        {
            on_bridge = b == bridge;
            continue;
        }
        if let Some(a) = t.strip_prefix("Datapath actions: ") {
            pass.datapath_actions = Some(a.to_owned());
            continue;
        }
        if !on_bridge
            || t.is_empty()
            || t.starts_with("Flow: ")
            || t.starts_with("Final flow: ")
            || t.starts_with("Megaflow: ")
            || t.starts_with("----")
        {
            continue;
        }
        if let Some(m) = table_line(line) {
            pass.tables.push(m);
            continue;
        }
        let Some(cur) = pass.tables.last_mut() else {
            continue; // `thaw`, `Resuming from table 30` before the first table
        };
        if let Some(n) = t.strip_prefix("-> ").or_else(|| t.strip_prefix(">> ")) {
            cur.notes.push(n.to_owned());
        } else {
            cur.actions.push(t.to_owned());
        }
    }
    out.retain(|p| !p.tables.is_empty() || p.datapath_actions.is_some());
    out
}

/// A number as OVS prints it: decimal or `0x` hexadecimal.
fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Summarises the `ofproto/trace` text of a packet on `bridge` (see the module doc).
pub fn summarise(text: &str, bridge: &str, ports: &Ports) -> Result<PacketTrace, SummaryError> {
    let passes = passes(text, bridge);
    let mut steps = Vec::new();
    for p in &passes {
        if let Some(t) = &p.title {
            steps.push(TraceStep {
                stage: "recirculation".into(),
                action: t.clone(),
            });
        }
        for m in &p.tables {
            let mut action = m.flow();
            if !m.actions.is_empty() {
                action.push_str(": ");
                action.push_str(&m.actions.join(", "));
            } else {
                action.push_str(": drop");
            }
            for n in &m.notes {
                action.push_str(&format!(" ({n})"));
            }
            steps.push(TraceStep {
                stage: format!("table {} {}", m.table, Table::name_of(m.table)),
                action,
            });
        }
        if let Some(d) = &p.datapath_actions {
            steps.push(TraceStep {
                stage: "datapath actions".into(),
                action: d.clone(),
            });
        }
    }
    // The verdict: the last pass that ran ferrea's tables.
    let last = passes
        .iter()
        .rev()
        .find(|p| !p.tables.is_empty())
        .ok_or_else(|| SummaryError::NoTables(bridge.to_owned()))?;
    let (mut tun_dst, mut tun_id, mut output) = (None, None, None);
    for m in &last.tables {
        for a in &m.actions {
            if let Some(port) = a.strip_prefix("output:") {
                output = Some((port.to_owned(), m));
            } else if let Some(v) = a.strip_prefix("set_field:") {
                if let Some(v) = v.strip_suffix("->tun_id") {
                    tun_id = number(v);
                } else if let Some(v) = v.strip_suffix("->tun_dst") {
                    tun_dst = v.parse::<Ipv4Addr>().ok();
                }
            }
        }
        for n in &m.notes {
            if let Some(ip) = n
                .strip_prefix("NXM_NX_TUN_IPV4_DST[] is now ")
                .and_then(|v| v.trim().parse::<Ipv4Addr>().ok())
            {
                tun_dst = Some(ip);
            }
        }
    }
    let verdict = match output {
        None => {
            let m = last.tables.last().expect("found above");
            let spoof_guard = m.table == Table::SpoofGuard as u8;
            TraceVerdict::Dropped {
                spoof_guard,
                reason: format!(
                    "{}dropped in table {} {} by the flow `{}`",
                    if spoof_guard {
                        "spoof guard: the source address or MAC is not the pod's; "
                    } else {
                        ""
                    },
                    m.table,
                    Table::name_of(m.table),
                    m.flow()
                ),
            }
        }
        Some((port, m)) => {
            let n = number(&port).map(|n| n as u32);
            if n == Some(ports.gateway) {
                let reason =
                    if m.table == Table::L3Forwarding as u8 && m.priority == prio::STACK_REPLY {
                        "a reply of a connection from the gateway (ct_mark): output to the gateway \
                     port, the stack un-NATs it"
                            .to_owned()
                    } else {
                        format!(
                            "output to the gateway port {port} in table {} {}: the node's stack \
                         routes it",
                            m.table,
                            Table::name_of(m.table)
                        )
                    };
                TraceVerdict::ToStack { reason }
            } else if n.is_some() && n == ports.tunnel {
                TraceVerdict::Tunnel {
                    node_ip: tun_dst.ok_or(SummaryError::NoTunnelDestination)?,
                    vni: tun_id.map_or(TUNNEL_VNI, |v| v as u32),
                }
            } else if let Some(ip) = n.and_then(|n| ports.pods.get(&n)) {
                TraceVerdict::ToPod {
                    ip: *ip,
                    interface: format!("ofport {port}"),
                }
            } else {
                return Err(SummaryError::UnknownPort(port));
            }
        }
    };
    Ok(PacketTrace { steps, verdict })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::PodEndpoint;

    /// Real `ofproto/trace` output of OVS 3.1 (userspace datapath) on a bridge with ferrea's
    /// tables: pod port 100 (10.244.1.2), pod port 101 (10.244.1.3), gateway 1, tunnel 10.
    const LOCAL: &str = include_str!("../../../testdata/ofproto-trace/local.txt");
    const REMOTE: &str = include_str!("../../../testdata/ofproto-trace/remote.txt");
    const SPOOF: &str = include_str!("../../../testdata/ofproto-trace/spoof.txt");
    const EGRESS: &str = include_str!("../../../testdata/ofproto-trace/egress.txt");

    fn ports() -> Ports {
        Ports {
            gateway: 1,
            tunnel: Some(10),
            pods: [
                (100, Ipv4Addr::new(10, 244, 1, 2)),
                (101, Ipv4Addr::new(10, 244, 1, 3)),
            ]
            .into(),
        }
    }

    #[test]
    fn a_local_pod_after_the_conntrack_recirculation() {
        let t = summarise(LOCAL, "br-int", &ports()).unwrap();
        assert_eq!(
            t.verdict,
            TraceVerdict::ToPod {
                ip: Ipv4Addr::new(10, 244, 1, 3),
                interface: "ofport 101".into()
            }
        );
        let stages: Vec<&str> = t.steps.iter().map(|s| s.stage.as_str()).collect();
        assert_eq!(
            stages,
            [
                "table 0 Classifier",
                "table 10 SpoofGuard",
                "table 25 ConntrackLookup",
                "datapath actions",
                "recirculation",
                "table 30 L3Forwarding",
                "datapath actions"
            ]
        );
        assert!(
            t.steps[5]
                .action
                .contains("nw_dst=10.244.1.3, priority 200")
                && t.steps[5].action.ends_with("output:101"),
            "{:?}",
            t.steps[5]
        );
        assert!(t.steps[4].action.contains("ct_state=trk|new"));
    }

    #[test]
    fn a_remote_pod_goes_to_the_tunnel_with_the_node_and_the_overlay_key() {
        let t = summarise(REMOTE, "br-int", &ports()).unwrap();
        assert_eq!(
            t.verdict,
            TraceVerdict::Tunnel {
                node_ip: Ipv4Addr::new(172, 18, 0, 12),
                vni: 0
            }
        );
        let out = t
            .steps
            .iter()
            .find(|s| s.stage == "table 40 TunnelOutput")
            .unwrap();
        assert!(
            out.action.contains("native tunnel routing failed"),
            "{out:?}"
        );
    }

    #[test]
    fn a_steered_pod_carries_its_egress_id_as_the_key() {
        let t = summarise(EGRESS, "br-int", &ports()).unwrap();
        assert_eq!(
            t.verdict,
            TraceVerdict::Tunnel {
                node_ip: Ipv4Addr::new(172, 18, 0, 12),
                vni: 5
            }
        );
    }

    #[test]
    fn a_forged_source_drops_in_the_spoof_guard() {
        let t = summarise(SPOOF, "br-int", &ports()).unwrap();
        match &t.verdict {
            TraceVerdict::Dropped {
                spoof_guard: true,
                reason,
            } => assert!(reason.contains("table 10 SpoofGuard") && reason.contains("priority 150")),
            v => panic!("{v:?}"),
        }
        assert_eq!(t.steps.last().unwrap().action, "drop");
    }

    #[test]
    fn output_to_the_gateway_is_the_stack_and_other_ports_are_refused() {
        // The local trace with its output moved to the gateway port, then to a stranger.
        let gw = LOCAL.replace("output:101", "output:1");
        match summarise(&gw, "br-int", &ports()).unwrap().verdict {
            TraceVerdict::ToStack { reason } => assert!(reason.contains("gateway port 1")),
            v => panic!("{v:?}"),
        }
        let other = LOCAL.replace("output:101", "output:55");
        assert_eq!(
            summarise(&other, "br-int", &ports()).unwrap_err(),
            SummaryError::UnknownPort("55".into())
        );
        assert_eq!(
            summarise(LOCAL, "br-other", &ports()).unwrap_err(),
            SummaryError::NoTables("br-other".into())
        );
    }

    #[test]
    fn table_lines_parse_with_and_without_match_and_cookie() {
        let m = table_line("30. ip,nw_dst=10.244.1.3, priority 200, cookie 0x1002000af4010103")
            .unwrap();
        assert_eq!((m.table, m.priority), (30, 200));
        assert_eq!(m.matches, "ip,nw_dst=10.244.1.3");
        let m = table_line(" 0. priority 0").unwrap();
        assert_eq!((m.table, m.priority, m.matches.as_str()), (0, 0, ""));
        assert!(table_line("    set_field:0x5->tun_id").is_none());
        assert!(table_line("Datapath actions: drop").is_none());
    }

    #[test]
    fn flows_put_the_protocol_first() {
        let p = TracePacket {
            src: PodEndpoint {
                container_id: "c".into(),
                host_ifname: "fe0".into(),
                host_ifindex: 0,
                host_mac: [0; 6],
                pod_mac: [2, 0, 0, 0, 0, 1],
                ip: Ipv4Addr::new(10, 244, 1, 2),
            },
            src_ip: Ipv4Addr::new(10, 244, 1, 2),
            src_mac: [2, 0, 0, 0, 0, 1],
            dst: Ipv4Addr::new(10, 244, 2, 7),
            proto: TraceProto::Udp,
            dst_port: Some(53),
        };
        assert_eq!(
            flow(&p, 100, [0xaa, 0xbb, 0xcc, 0, 0, 1]),
            "udp,in_port=100,dl_src=02:00:00:00:00:01,dl_dst=aa:bb:cc:00:00:01,\
             nw_src=10.244.1.2,nw_dst=10.244.2.7,nw_ttl=64,udp_src=40000,udp_dst=53"
        );
        let icmp = TracePacket {
            proto: TraceProto::Icmp,
            dst_port: None,
            ..p.clone()
        };
        assert!(flow(&icmp, 100, [0; 6]).starts_with("icmp,in_port=100,"));
        assert!(flow(&icmp, 100, [0; 6]).ends_with("icmp_type=8,icmp_code=0"));
        let tcp = TracePacket {
            proto: TraceProto::Tcp,
            dst_port: Some(80),
            ..p
        };
        assert!(flow(&tcp, 100, [0; 6]).ends_with("tcp_src=40000,tcp_dst=80,tcp_flags=ack"));
    }
}
