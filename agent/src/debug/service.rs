//! The gRPC debug service `ferrea.debug.v1.Debug` (see `proto/ferrea/debug/v1/debug.proto`)
//! and its socket: root-only by file mode (0600) and by `SO_PEERCRED` on every connection.
//!
//! Every call reads a snapshot of what the agent holds; none changes the node except
//! `LogLevel` with a filter. A call made while the node is still starting answers with what
//! is known (agent info) or `UNAVAILABLE` naming what start-up waits for (pods, dataplane).

use std::net::Ipv4Addr;
use std::path::Path;

use ferrea_proto::debug::v1 as pb;
use ferrea_proto::debug::v1::debug_server::{Debug, DebugServer};
use futures::StreamExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use super::{DebugContext, LogFilterError, Started};
use crate::cni::socket::{SocketError, bind_root_only};
use crate::config::SourceConfig;
use crate::controllers::node::remote_nodes;
use crate::dataplane::{PodEndpoint, TracePacket, TraceProto, TraceVerdict};
use crate::pods::podnet::fmt_mac;
use crate::pods::store::PodRecord;

/// Binds the debug socket at `path` (removing a stale one), mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    bind_root_only(path, "binding debug socket")
}

/// Whether a connection's peer is root. A peer whose credentials cannot be read is not.
fn peer_is_root(s: &UnixStream) -> bool {
    match s.peer_cred() {
        Ok(c) if c.uid() == 0 => true,
        Ok(c) => {
            tracing::warn!(
                uid = c.uid(),
                pid = ?c.pid(),
                "debug socket: refused a connection from a non-root process"
            );
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "debug socket: refused a connection whose peer is unknown");
            false
        }
    }
}

/// Serves the debug service on `listener` until the task is dropped. Connections from
/// non-root peers are closed unanswered.
pub async fn serve(
    listener: UnixListener,
    ctx: DebugContext,
) -> Result<(), tonic::transport::Error> {
    let incoming = UnixListenerStream::new(listener).filter(|c| {
        let keep = match c {
            Ok(s) => peer_is_root(s),
            Err(_) => true, // tonic logs accept errors and goes on
        };
        std::future::ready(keep)
    });
    tonic::transport::Server::builder()
        .add_service(DebugServer::new(DebugService { ctx }))
        .serve_with_incoming(incoming)
        .await
}

/// The service.
pub struct DebugService {
    ctx: DebugContext,
}

impl DebugService {
    fn started(&self) -> Result<Started, Status> {
        if let Some(s) = self.ctx.node.get() {
            return Ok(s.clone());
        }
        let why = self
            .ctx
            .readiness()
            .err()
            .unwrap_or_else(|| "starting".into());
        Err(Status::unavailable(format!(
            "the agent is not ready yet: {why}"
        )))
    }
}

/// A pod's endpoint as the dataplane knows it (the host veth's index read now).
fn endpoint(rec: &PodRecord) -> PodEndpoint {
    PodEndpoint {
        container_id: rec.container_id.clone(),
        host_ifname: rec.host_ifname.clone(),
        host_ifindex: nix::net::if_::if_nametoindex(rec.host_ifname.as_str()).unwrap_or(0),
        host_mac: rec.host_mac,
        pod_mac: rec.pod_mac,
        ip: rec.ip,
    }
}

/// Whether `rec` is the pod `sel` names: `namespace/name`, a name, or a container ID (or a
/// prefix of one of at least 6 characters).
fn selects(rec: &PodRecord, sel: &str) -> bool {
    let full = format!("{}/{}", rec.pod_namespace, rec.pod_name);
    sel == full
        || sel == rec.pod_name
        || sel == rec.container_id
        || (sel.len() >= 6 && rec.container_id.starts_with(sel))
}

/// The one record `sel` names, or the status to answer with.
fn one_pod(recs: Vec<PodRecord>, sel: &str) -> Result<PodRecord, Status> {
    let mut found: Vec<PodRecord> = recs.into_iter().filter(|r| selects(r, sel)).collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Status::not_found(format!(
            "no pod {sel:?} on this node (give namespace/name, a name or a container ID)"
        ))),
        n => Err(Status::invalid_argument(format!(
            "{sel:?} names {n} attachments: give namespace/name or the container ID"
        ))),
    }
}

/// A MAC written `aa:bb:cc:dd:ee:ff`.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// The packet a trace request describes, checked: what is wrong is an invalid argument.
fn trace_packet(req: &pb::TraceRequest, rec: &PodRecord) -> Result<TracePacket, Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    let Ok(dst) = req.dst.parse::<Ipv4Addr>() else {
        return bad(format!("destination {:?} is not an IPv4 address", req.dst));
    };
    let proto = match req.protocol.as_str() {
        "tcp" => TraceProto::Tcp,
        "udp" => TraceProto::Udp,
        "icmp" => TraceProto::Icmp,
        p => return bad(format!("protocol {p:?}: give tcp, udp or icmp")),
    };
    let dst_port = match (proto, req.dst_port) {
        (TraceProto::Icmp, 0) => None,
        (TraceProto::Icmp, p) => {
            return bad(format!("ICMP has no ports: drop :{p} from the destination"));
        }
        (_, 0) => {
            return bad(format!(
                "{} needs a destination port (IP:PORT)",
                proto.as_str()
            ));
        }
        (_, p) => match u16::try_from(p) {
            Ok(p) => Some(p),
            Err(_) => return bad(format!("port {p} is out of range (1-65535)")),
        },
    };
    let src_ip = match req.src_ip.as_str() {
        "" => rec.ip,
        s => match s.parse() {
            Ok(ip) => ip,
            Err(_) => return bad(format!("source {s:?} is not an IPv4 address")),
        },
    };
    let src_mac = match req.src_mac.as_str() {
        "" => rec.pod_mac,
        s => match parse_mac(s) {
            Some(m) => m,
            None => return bad(format!("source MAC {s:?} is not aa:bb:cc:dd:ee:ff")),
        },
    };
    Ok(TracePacket {
        src: endpoint(rec),
        src_ip,
        src_mac,
        dst,
        proto,
        dst_port,
    })
}

fn tunnel_text(t: Option<crate::net::Tunnel>) -> String {
    match t {
        Some(t) => format!("{:?} port {}", t.kind, t.port).to_lowercase(),
        None => "none (noEncap)".into(),
    }
}

#[tonic::async_trait]
impl Debug for DebugService {
    async fn get_agent_info(
        &self,
        _: Request<pb::AgentInfoRequest>,
    ) -> Result<Response<pb::AgentInfo>, Status> {
        let cfg = &self.ctx.cfg;
        let (source, detail) = match &cfg.source {
            SourceConfig::Files { path } => ("files", path.display().to_string()),
            SourceConfig::Kubernetes { kubeconfig } => (
                "kubernetes",
                kubeconfig
                    .as_ref()
                    .map_or_else(|| "in-cluster".into(), |p| p.display().to_string()),
            ),
        };
        let mut info = pb::AgentInfo {
            node_name: cfg.node_name().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            dataplane: format!("{:?}", cfg.dataplane).to_lowercase(),
            source: source.into(),
            source_detail: detail,
            source_synced: *self.ctx.synced.borrow(),
            uptime_seconds: self.ctx.started_at.elapsed().as_secs(),
            cni_socket: cfg.cni_socket.display().to_string(),
            metrics_address: self
                .ctx
                .metrics_address
                .map(|a| a.to_string())
                .unwrap_or_default(),
            ..Default::default()
        };
        match self.ctx.readiness() {
            Ok(()) => info.ready = true,
            Err(why) => info.not_ready_reason = why,
        }
        if let Some(n) = self.ctx.node.get() {
            let net = n.pods.node();
            info.pod_cidr = net.pod_cidr.to_string();
            info.gateway = net.gateway.to_string();
            info.transport_interface = net.transport.ifname.clone();
            info.node_ip = net.transport.ip.to_string();
            info.transport_mtu = net.transport.mtu;
            info.pod_mtu = net.mtu;
            info.tunnel = tunnel_text(net.tunnel);
            info.local_pods = n.pods.records().len() as u32;
        } else if let Some(cidr) = self
            .ctx
            .state
            .borrow()
            .nodes
            .get(cfg.node_name())
            .and_then(|n| n.pod_cidr)
        {
            info.pod_cidr = cidr.to_string();
        }
        Ok(Response::new(info))
    }

    async fn list_pod_interfaces(
        &self,
        req: Request<pb::PodInterfaceRequest>,
    ) -> Result<Response<pb::PodInterfaceList>, Status> {
        let req = req.into_inner();
        let n = self.started()?;
        let mut recs: Vec<PodRecord> = n
            .pods
            .records()
            .into_iter()
            .filter(|r| req.namespace.is_empty() || r.pod_namespace == req.namespace)
            .filter(|r| req.name.is_empty() || selects(r, &req.name))
            .collect();
        recs.sort_by(|a, b| {
            (&a.pod_namespace, &a.pod_name, &a.container_id).cmp(&(
                &b.pod_namespace,
                &b.pod_name,
                &b.container_id,
            ))
        });
        let dp = n.pods.dataplane();
        let mut items = Vec::with_capacity(recs.len());
        for r in recs {
            let ep = endpoint(&r);
            let stats = dp.pod_stats(&ep).await.unwrap_or_else(|e| {
                tracing::debug!(error = %e, ip = %r.ip, "reading pod counters");
                None
            });
            let st = stats.unwrap_or_default();
            items.push(pb::PodInterface {
                pod: r.pod_name.clone(),
                namespace: r.pod_namespace.clone(),
                container_id: r.container_id.clone(),
                ifname: r.ifname.clone(),
                ip: r.ip.to_string(),
                mac: fmt_mac(&r.pod_mac),
                host_interface: r.host_ifname.clone(),
                host_ifindex: ep.host_ifindex,
                host_mac: fmt_mac(&r.host_mac),
                netns: r.netns.clone(),
                dataplane_port: dp
                    .describe_pod(&ep)
                    .unwrap_or_else(|| "(not in the dataplane)".into()),
                has_counters: stats.is_some(),
                tx_packets: st.tx_packets,
                tx_bytes: st.tx_bytes,
                rx_packets: st.rx_packets,
                rx_bytes: st.rx_bytes,
                drop_spoofed: st.drop_spoofed,
                drop_other: st.drop_other,
            });
        }
        Ok(Response::new(pb::PodInterfaceList { items }))
    }

    async fn list_remote_nodes(
        &self,
        _: Request<pb::RemoteNodeRequest>,
    ) -> Result<Response<pb::RemoteNodeList>, Status> {
        let mut nodes = remote_nodes(&self.ctx.state.borrow(), self.ctx.cfg.node_name());
        nodes.sort();
        let items = nodes
            .into_iter()
            .map(|n| pb::RemoteNode {
                gateway: n.gateway().to_string(),
                name: n.name,
                node_ip: n.node_ip.to_string(),
                pod_cidr: n.pod_cidr.to_string(),
            })
            .collect();
        Ok(Response::new(pb::RemoteNodeList { items }))
    }

    async fn get_egress(
        &self,
        _: Request<pb::EgressRequest>,
    ) -> Result<Response<pb::EgressViews>, Status> {
        let (list, node, _) = self.ctx.egress.get();
        let j = |v: &serde_json::Value| serde_json::to_vec(v).expect("a JSON value serialises");
        Ok(Response::new(pb::EgressViews {
            egresses_json: j(&list),
            node_json: j(&node),
        }))
    }

    async fn list_node_port_local(
        &self,
        req: Request<pb::NodePortLocalRequest>,
    ) -> Result<Response<pb::NodePortLocalList>, Status> {
        let req = req.into_inner();
        let n = self.started()?;
        let enabled = self.ctx.cfg.node_port_local.enable;
        let mappings =
            n.pods.store().npl_list().map_err(|e| {
                Status::internal(format!("reading the NodePortLocal mappings: {e}"))
            })?;
        let installed = n.nat.installed_npl().await;
        let node_ip: Ipv4Addr = installed
            .as_ref()
            .map_or(n.pods.node().transport.ip, |r| r.node_ip);
        let mut items: Vec<pb::NodePortLocalMapping> = mappings
            .into_iter()
            .filter_map(|m| {
                let (ns, name) = m.pod.split_once('/').unwrap_or(("", m.pod.as_str()));
                if (!req.namespace.is_empty() && ns != req.namespace)
                    || (!req.pod.is_empty() && name != req.pod && m.pod != req.pod)
                {
                    return None;
                }
                let is_installed = installed.as_ref().is_some_and(|r| {
                    r.dnat.iter().any(|d| {
                        d.protocol == m.protocol
                            && d.node_port == m.node_port
                            && d.pod_ip == m.pod_ip
                            && d.pod_port == m.pod_port
                    })
                });
                Some(pb::NodePortLocalMapping {
                    namespace: ns.to_owned(),
                    pod: name.to_owned(),
                    pod_ip: m.pod_ip.to_string(),
                    pod_port: u32::from(m.pod_port),
                    protocol: m.protocol.as_str().to_owned(),
                    node_ip: node_ip.to_string(),
                    node_port: u32::from(m.node_port),
                    installed: is_installed,
                })
            })
            .collect();
        items.sort_by(|a, b| {
            (&a.namespace, &a.pod, a.pod_port, &a.protocol).cmp(&(
                &b.namespace,
                &b.pod,
                b.pod_port,
                &b.protocol,
            ))
        });
        Ok(Response::new(pb::NodePortLocalList { enabled, items }))
    }

    async fn dump_dataplane(
        &self,
        req: Request<pb::DumpRequest>,
    ) -> Result<Response<pb::DataplaneDump>, Status> {
        let req = req.into_inner();
        let n = self.started()?;
        let ep = if req.pod.is_empty() {
            None
        } else {
            let recs: Vec<PodRecord> = n
                .pods
                .records()
                .into_iter()
                .filter(|r| selects(r, &req.pod))
                .collect();
            match recs.as_slice() {
                [r] => Some(endpoint(r)),
                [] => {
                    return Err(Status::not_found(format!(
                        "no pod {:?} on this node (give namespace/name, a name or a container ID)",
                        req.pod
                    )));
                }
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "{:?} names {} attachments: give namespace/name or the container ID",
                        req.pod,
                        recs.len()
                    )));
                }
            }
        };
        let dp = n.pods.dataplane();
        let sections = dp
            .dump(ep.as_ref())
            .await
            .map_err(|e| {
                Status::internal(format!(
                    "dumping the dataplane: {}",
                    crate::controllers::runner::error_chain(&e)
                ))
            })?
            .into_iter()
            .map(|s| pb::DumpSection {
                name: s.name,
                columns: s.columns,
                rows: s
                    .rows
                    .into_iter()
                    .map(|cells| pb::DumpRow { cells })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::DataplaneDump {
            dataplane: dp.name().to_owned(),
            sections,
        }))
    }

    async fn trace(
        &self,
        req: Request<pb::TraceRequest>,
    ) -> Result<Response<pb::TraceReply>, Status> {
        let req = req.into_inner();
        let n = self.started()?;
        let recs = n.pods.records();
        let rec = one_pod(recs.clone(), &req.src_pod)?;
        let packet = trace_packet(&req, &rec)?;
        let dp = n.pods.dataplane();
        let t = dp.trace(&packet).await.map_err(|e| {
            Status::internal(format!(
                "tracing the packet: {}",
                crate::controllers::runner::error_chain(&e)
            ))
        })?;
        let src_name = format!("{}/{}", rec.pod_namespace, rec.pod_name);
        let mut reply = pb::TraceReply {
            dataplane: dp.name().to_owned(),
            src_pod: src_name.clone(),
            src_ip: packet.src_ip.to_string(),
            src_mac: fmt_mac(&packet.src_mac),
            dst: packet.dst.to_string(),
            protocol: packet.proto.as_str().to_owned(),
            dst_port: packet.dst_port.map_or(0, u32::from),
            ..Default::default()
        };
        let mut steps = t.steps;
        // The Egress views: which Egress each local pod uses, what this node holds, and each
        // Egress's IP.
        let (list, node_view, _) = self.ctx.egress.get();
        let egress_ip_of = |name: &str| -> String {
            list["items"]
                .as_array()
                .and_then(|items| items.iter().find(|i| i["metadata"]["name"] == name))
                .and_then(|i| i["status"]["egressIP"].as_str())
                .unwrap_or_default()
                .to_owned()
        };
        match t.verdict {
            TraceVerdict::ToPod { ip, interface } => {
                reply.verdict = "pod".into();
                match recs.iter().find(|r| r.ip == ip) {
                    Some(d) => {
                        reply.dst_pod = format!("{}/{}", d.pod_namespace, d.pod_name);
                        reply.dst_interface = d.host_ifname.clone();
                    }
                    None => reply.dst_interface = interface.clone(),
                }
                reply.reason = format!(
                    "delivered to pod {} ({ip}) through {interface}",
                    if reply.dst_pod.is_empty() {
                        "(unknown)"
                    } else {
                        &reply.dst_pod
                    }
                );
            }
            TraceVerdict::Tunnel { node_ip, vni } => {
                reply.verdict = "tunnel".into();
                let nodes = remote_nodes(&self.ctx.state.borrow(), self.ctx.cfg.node_name());
                reply.tunnel_node = nodes
                    .iter()
                    .find(|r| r.node_ip == node_ip)
                    .map(|r| r.name.clone())
                    .unwrap_or_default();
                reply.tunnel_node_ip = node_ip.to_string();
                reply.vni = vni;
                if vni != crate::dataplane::TUNNEL_VNI {
                    reply.egress = node_view["localPods"][&src_name]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    reply.egress_ip = egress_ip_of(&reply.egress);
                    reply.egress_id = vni;
                    reply.egress_how = "tunnel key".into();
                }
                reply.reason = format!(
                    "tunnelled to node {} ({node_ip}) with VNI {vni}{}",
                    if reply.tunnel_node.is_empty() {
                        "(unknown)"
                    } else {
                        &reply.tunnel_node
                    },
                    if reply.egress_how.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ": steered for Egress {} (id {vni}, IP {}), which that node holds",
                            reply.egress, reply.egress_ip
                        )
                    }
                );
            }
            TraceVerdict::ToStack { reason } => {
                reply.verdict = "stack".into();
                reply.reason = format!("to the node's stack: {reason}");
                // The stack's part that the dataplane does not run: ferrea's own Egress
                // marking, as the rules last loaded into the kernel say.
                if let Some(rules) = n.nat.installed_egress().await {
                    let exempt = rules.exempt.iter().any(|c| c.contains(packet.dst));
                    let mark = rules
                        .marks
                        .iter()
                        .find(|(ip, _)| *ip == packet.src_ip)
                        .map(|(_, id)| *id);
                    if let (false, Some(id)) = (exempt, mark) {
                        let held = node_view["held"]
                            .as_array()
                            .and_then(|h| h.iter().find(|e| e["id"] == u64::from(id)));
                        reply.egress = held
                            .and_then(|e| e["egress"].as_str())
                            .unwrap_or_default()
                            .to_owned();
                        reply.egress_ip = rules
                            .snat
                            .iter()
                            .find(|(i, _)| *i == id)
                            .map(|(_, ip)| ip.to_string())
                            .unwrap_or_default();
                        reply.egress_id = u32::from(id);
                        reply.egress_how = "nftables mark".into();
                        steps.push(crate::dataplane::TraceStep {
                            stage: format!(
                                "nftables table ip {} chain egress_mark (rules as loaded)",
                                n.nat.base().table
                            ),
                            action: format!(
                                "meta mark set {:#x} (Egress {}); egress_snat: snat to {}",
                                crate::net::egress_mark(id),
                                reply.egress,
                                reply.egress_ip
                            ),
                        });
                        reply.reason.push_str(&format!(
                            "; marked {:#x} for Egress {}, leaves as {}",
                            crate::net::egress_mark(id),
                            reply.egress,
                            reply.egress_ip
                        ));
                    }
                }
            }
            TraceVerdict::Dropped {
                spoof_guard,
                reason,
            } => {
                reply.verdict = "dropped".into();
                reply.spoof_guard = spoof_guard;
                reply.reason = reason;
            }
        }
        reply.steps = steps
            .into_iter()
            .map(|s| pb::TraceStep {
                stage: s.stage,
                action: s.action,
            })
            .collect();
        Ok(Response::new(reply))
    }

    async fn recent_logs(
        &self,
        _: Request<pb::RecentLogsRequest>,
    ) -> Result<Response<pb::RecentLogsReply>, Status> {
        match &self.ctx.recent_logs {
            Some(r) => Ok(Response::new(pb::RecentLogsReply { text: r.snapshot() })),
            None => Err(Status::unimplemented(
                "this agent keeps no log lines in memory",
            )),
        }
    }

    async fn log_level(
        &self,
        req: Request<pb::LogLevelRequest>,
    ) -> Result<Response<pb::LogLevelReply>, Status> {
        let req = req.into_inner();
        let Some(log) = &self.ctx.log else {
            return Err(Status::unimplemented(
                LogFilterError::Unsupported.to_string(),
            ));
        };
        if !req.filter.is_empty() {
            let old = log.filter();
            log.set_filter(&req.filter).map_err(|e| match e {
                LogFilterError::Invalid { .. } => Status::invalid_argument(e.to_string()),
                e => Status::internal(e.to_string()),
            })?;
            tracing::info!(from = %old, to = %req.filter, "log filter changed through the debug API");
        }
        Ok(Response::new(pb::LogLevelReply {
            filter: log.filter(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::pod_record;

    fn req(dst: &str, protocol: &str, port: u32) -> pb::TraceRequest {
        pb::TraceRequest {
            src_pod: "default/a".into(),
            dst: dst.into(),
            protocol: protocol.into(),
            dst_port: port,
            ..Default::default()
        }
    }

    fn refused(r: &pb::TraceRequest) -> String {
        let rec = pod_record("default", "a", [10, 244, 1, 5]);
        let s = trace_packet(r, &rec).unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        s.message().to_owned()
    }

    #[test]
    fn trace_requests_become_the_pods_packet() {
        let mut rec = pod_record("default", "a", [10, 244, 1, 5]);
        rec.pod_mac = [2, 0, 0, 0, 0, 5];
        let p = trace_packet(&req("10.244.2.9", "tcp", 80), &rec).unwrap();
        assert_eq!(p.src_ip, rec.ip);
        assert_eq!(p.src_mac, rec.pod_mac);
        assert_eq!(p.dst, Ipv4Addr::new(10, 244, 2, 9));
        assert_eq!((p.proto, p.dst_port), (TraceProto::Tcp, Some(80)));
        let p = trace_packet(&req("10.244.2.9", "icmp", 0), &rec).unwrap();
        assert_eq!((p.proto, p.dst_port), (TraceProto::Icmp, None));
        // A forged source.
        let mut r = req("10.244.2.9", "udp", 53);
        r.src_ip = "192.0.2.77".into();
        r.src_mac = "02:00:DE:ad:be:ef".into();
        let p = trace_packet(&r, &rec).unwrap();
        assert_eq!(p.src_ip, Ipv4Addr::new(192, 0, 2, 77));
        assert_eq!(p.src_mac, [2, 0, 0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(p.src.ip, rec.ip, "still sent by the pod");
    }

    #[test]
    fn bad_trace_requests_are_invalid_arguments() {
        assert!(refused(&req("10.244.2.300", "tcp", 80)).contains("not an IPv4 address"));
        assert!(refused(&req("10.244.2.9", "sctp", 80)).contains("tcp, udp or icmp"));
        assert!(refused(&req("10.244.2.9", "icmp", 80)).contains("ICMP has no ports"));
        assert!(refused(&req("10.244.2.9", "udp", 0)).contains("needs a destination port"));
        assert!(refused(&req("10.244.2.9", "tcp", 70000)).contains("out of range"));
        let mut r = req("10.244.2.9", "tcp", 80);
        r.src_mac = "02:00:de:ad:be".into();
        assert!(refused(&r).contains("not aa:bb:cc:dd:ee:ff"));
        assert_eq!(parse_mac("02:00:de:ad:be:ef:00"), None);
        assert_eq!(parse_mac("2:00:de:ad:be:ef"), None);
    }

    #[test]
    fn a_pod_is_named_once_or_the_request_says_why_not() {
        let a = pod_record("default", "a", [10, 244, 1, 5]);
        let b = pod_record("other", "a", [10, 244, 1, 6]);
        let recs = vec![a.clone(), b];
        assert_eq!(one_pod(recs.clone(), "default/a").unwrap().ip, a.ip);
        let s = one_pod(recs.clone(), "a").unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s = one_pod(recs, "default/nope").unwrap_err();
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert!(s.message().contains("no pod \"default/nope\""));
    }
}
