//! `ferreactl trace --src POD --dst IP[:PORT] [--proto tcp|udp|icmp]`: where a packet from a
//! local pod would go and why, decided by the agent's dataplane itself (eBPF: the attached
//! programs run on the packet with `BPF_PROG_TEST_RUN`; OVS: `ovs-vswitchd`'s
//! `ofproto/trace`). Nothing is sent. `--src-ip` and `--src-mac` forge the packet's source,
//! to see the spoof guard at work.

use std::io::Write;
use std::net::Ipv4Addr;

use anyhow::{anyhow, bail};
use ferrea_proto::debug::v1::{TraceReply, TraceRequest};
use serde_json::{Value, json};

use crate::client::Client;
use crate::output::{self, Format};

/// The protocol of the traced packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    /// A TCP segment (of an established connection) to PORT.
    Tcp,
    /// A UDP datagram to PORT.
    Udp,
    /// An ICMP echo request (no port).
    Icmp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sending pod, on this node: `[NAMESPACE/]NAME` (or a container ID).
    #[arg(long, value_name = "POD")]
    src: String,
    /// The destination: `IP` or `IP:PORT`.
    #[arg(long, value_name = "IP[:PORT]")]
    dst: String,
    /// The protocol; default: tcp with a port, icmp without.
    #[arg(long, value_enum)]
    proto: Option<Proto>,
    /// Send from this address instead of the pod's (a spoofed source).
    #[arg(long, value_name = "IP")]
    src_ip: Option<Ipv4Addr>,
    /// Send from this MAC instead of the pod's.
    #[arg(long, value_name = "MAC")]
    src_mac: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// `IP[:PORT]`, checked.
fn parse_dst(s: &str) -> anyhow::Result<(Ipv4Addr, Option<u16>)> {
    let (ip, port) = match s.rsplit_once(':') {
        Some((ip, port)) => (ip, Some(port)),
        None => (s, None),
    };
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| anyhow!("--dst {s:?}: {ip:?} is not an IPv4 address (give IP or IP:PORT)"))?;
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => bail!("--dst {s:?}: port {p:?} is not a number from 1 to 65535"),
        },
    };
    Ok((ip, port))
}

/// The request for `a`, checked: a bad address or port, ICMP with a port, TCP or UDP without.
pub fn request(a: &Args) -> anyhow::Result<TraceRequest> {
    let (dst, port) = parse_dst(&a.dst)?;
    let proto = a.proto.unwrap_or(if port.is_some() {
        Proto::Tcp
    } else {
        Proto::Icmp
    });
    match (proto, port) {
        (Proto::Icmp, Some(p)) => {
            bail!("--proto icmp takes no port: give --dst {dst}, not {dst}:{p}")
        }
        (Proto::Tcp | Proto::Udp, None) => bail!(
            "--proto {} needs a port: give --dst {dst}:PORT",
            proto.as_str()
        ),
        _ => {}
    }
    if a.src.is_empty() {
        bail!("--src needs a pod: [NAMESPACE/]NAME");
    }
    Ok(TraceRequest {
        src_pod: a.src.clone(),
        dst: dst.to_string(),
        protocol: proto.as_str().to_owned(),
        dst_port: port.map_or(0, u32::from),
        src_ip: a.src_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        src_mac: a.src_mac.clone().unwrap_or_default(),
    })
}

/// The trace as JSON.
pub fn to_json(t: &TraceReply) -> Value {
    let steps: Vec<Value> = t
        .steps
        .iter()
        .map(|s| json!({"stage": s.stage, "action": s.action}))
        .collect();
    let mut v = json!({
        "dataplane": t.dataplane,
        "packet": {
            "srcPod": t.src_pod,
            "srcIP": t.src_ip,
            "srcMAC": t.src_mac,
            "dst": t.dst,
            "protocol": t.protocol,
            "dstPort": (t.dst_port != 0).then_some(t.dst_port),
        },
        "steps": steps,
        "verdict": t.verdict,
        "reason": t.reason,
    });
    match t.verdict.as_str() {
        "pod" => {
            v["dstPod"] = json!(t.dst_pod);
            v["dstInterface"] = json!(t.dst_interface);
        }
        "tunnel" => {
            v["tunnel"] = json!({
                "node": t.tunnel_node,
                "nodeIP": t.tunnel_node_ip,
                "vni": t.vni,
            });
        }
        "dropped" => v["spoofGuard"] = json!(t.spoof_guard),
        _ => {}
    }
    v["egress"] = if t.egress.is_empty() && t.egress_how.is_empty() {
        Value::Null
    } else {
        json!({"name": t.egress, "id": t.egress_id, "ip": t.egress_ip, "how": t.egress_how})
    };
    v
}

/// Prints the trace: the packet, the stages, the verdict.
pub fn print_table(out: &mut dyn Write, t: &TraceReply) -> std::io::Result<()> {
    let port = if t.dst_port == 0 {
        String::new()
    } else {
        format!(":{}", t.dst_port)
    };
    writeln!(
        out,
        "{} {} -> {}{port} from {} ({}) on the {} dataplane\n",
        t.protocol, t.src_ip, t.dst, t.src_pod, t.src_mac, t.dataplane
    )?;
    let rows: Vec<Vec<String>> = t
        .steps
        .iter()
        .map(|s| vec![s.stage.clone(), s.action.clone()])
        .collect();
    output::table(out, &["STAGE".into(), "ACTION".into()], &rows)?;
    writeln!(out)?;
    let mut fields = vec![("VERDICT", t.verdict.clone()), ("REASON", t.reason.clone())];
    match t.verdict.as_str() {
        "pod" => {
            fields.push(("DST POD", t.dst_pod.clone()));
            fields.push(("DST INTERFACE", t.dst_interface.clone()));
        }
        "tunnel" => {
            fields.push(("NODE", t.tunnel_node.clone()));
            fields.push(("NODE IP", t.tunnel_node_ip.clone()));
            fields.push(("VNI", t.vni.to_string()));
        }
        "dropped" => fields.push(("SPOOF GUARD", t.spoof_guard.to_string())),
        _ => {}
    }
    if !t.egress_how.is_empty() {
        fields.push(("EGRESS", t.egress.clone()));
        fields.push(("EGRESS ID", t.egress_id.to_string()));
        fields.push(("EGRESS IP", t.egress_ip.clone()));
        fields.push(("EGRESS BY", t.egress_how.clone()));
    }
    let rows: Vec<Vec<String>> = fields
        .into_iter()
        .map(|(f, v)| vec![f.to_owned(), output::cell(Some(&Value::String(v)))])
        .collect();
    output::table(out, &["FIELD".into(), "VALUE".into()], &rows)
}

/// Runs the command.
pub async fn run(mut c: Client, a: Args, out: &mut dyn Write) -> anyhow::Result<()> {
    let req = request(&a)?;
    let t = match c.api.trace(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(c.failed("trace", s)),
    };
    match a.output {
        Format::Table => Ok(print_table(out, &t)?),
        f => output::document(out, &to_json(&t), f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrea_proto::debug::v1::TraceStep;

    fn args(dst: &str, proto: Option<Proto>) -> Args {
        Args {
            src: "default/a".into(),
            dst: dst.into(),
            proto,
            src_ip: None,
            src_mac: None,
            output: Format::Table,
        }
    }

    #[test]
    fn the_protocol_follows_the_port_unless_given() {
        let r = request(&args("10.244.1.3:80", None)).unwrap();
        assert_eq!((r.protocol.as_str(), r.dst_port), ("tcp", 80));
        let r = request(&args("10.244.1.3", None)).unwrap();
        assert_eq!((r.protocol.as_str(), r.dst_port), ("icmp", 0));
        let r = request(&args("10.244.1.3:53", Some(Proto::Udp))).unwrap();
        assert_eq!((r.protocol.as_str(), r.dst_port), ("udp", 53));
        assert_eq!(r.src_pod, "default/a");
        assert_eq!(r.src_ip, "");
    }

    #[test]
    fn bad_destinations_and_ports_are_refused_with_what_to_give() {
        let e = |dst: &str, p| request(&args(dst, p)).unwrap_err().to_string();
        assert!(e("10.244.1.300", None).contains("not an IPv4 address"));
        assert!(e("pod-b", None).contains("not an IPv4 address"));
        assert!(e("10.244.1.3:0", None).contains("1 to 65535"));
        assert!(e("10.244.1.3:70000", None).contains("1 to 65535"));
        assert!(e("10.244.1.3:http", None).contains("1 to 65535"));
        assert!(e("10.244.1.3:80", Some(Proto::Icmp)).contains("icmp takes no port"));
        assert!(e("10.244.1.3", Some(Proto::Tcp)).contains("needs a port"));
        assert!(e("10.244.1.3", Some(Proto::Udp)).contains("needs a port"));
    }

    fn reply() -> TraceReply {
        TraceReply {
            dataplane: "ebpf".into(),
            src_pod: "default/a".into(),
            src_ip: "10.244.1.2".into(),
            src_mac: "02:00:00:00:00:01".into(),
            dst: "198.51.100.1".into(),
            protocol: "tcp".into(),
            dst_port: 80,
            steps: vec![TraceStep {
                stage: "ferrea_from_pod (tc ingress of fe1)".into(),
                action: "TC_ACT_REDIRECT: bpf_redirect to ferrea-tun0".into(),
            }],
            verdict: "tunnel".into(),
            reason: "tunnelled to node n2".into(),
            tunnel_node: "n2".into(),
            tunnel_node_ip: "172.18.0.12".into(),
            vni: 7,
            egress: "eg".into(),
            egress_id: 7,
            egress_ip: "10.172.170.9".into(),
            egress_how: "tunnel key".into(),
            ..Default::default()
        }
    }

    #[test]
    fn json_names_the_tunnel_and_the_egress() {
        let v = to_json(&reply());
        assert_eq!(v["verdict"], "tunnel");
        assert_eq!(v["tunnel"]["node"], "n2");
        assert_eq!(v["tunnel"]["vni"], 7);
        assert_eq!(v["egress"]["name"], "eg");
        assert_eq!(v["egress"]["how"], "tunnel key");
        assert_eq!(v["packet"]["dstPort"], 80);
        assert_eq!(
            v["steps"][0]["stage"],
            "ferrea_from_pod (tc ingress of fe1)"
        );
        let mut none = reply();
        none.egress_how.clear();
        none.egress.clear();
        assert_eq!(to_json(&none)["egress"], Value::Null);
    }

    #[test]
    fn the_table_shows_stages_and_the_verdict() {
        let mut out = Vec::new();
        print_table(&mut out, &reply()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("tcp 10.244.1.2 -> 198.51.100.1:80 from default/a"));
        assert!(text.contains("STAGE"));
        assert!(text.contains("TC_ACT_REDIRECT"));
        assert!(
            text.lines()
                .any(|l| l.starts_with("VERDICT") && l.ends_with("tunnel"))
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("NODE ") && l.ends_with("n2"))
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("EGRESS BY") && l.ends_with("tunnel key"))
        );
    }
}
