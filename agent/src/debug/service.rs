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
use crate::dataplane::PodEndpoint;
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
