//! `ferreactl get agentinfo`: the agent as it sees itself.

use std::io::Write;

use ferrea_proto::debug::v1::{AgentInfo, AgentInfoRequest};
use serde_json::{Value, json};

use crate::client::Client;
use crate::output::{self, Column, Format};

/// The fields of the table, in order.
const FIELDS: &[Column] = &[
    ("NODE", "nodeName"),
    ("VERSION", "version"),
    ("DATAPLANE", "dataplane"),
    ("SOURCE", "source"),
    ("SOURCE DETAIL", "sourceDetail"),
    ("SYNCED", "sourceSynced"),
    ("POD CIDR", "podCIDR"),
    ("GATEWAY", "gateway"),
    ("TRANSPORT", "transportInterface"),
    ("NODE IP", "nodeIP"),
    ("TRANSPORT MTU", "transportMTU"),
    ("POD MTU", "podMTU"),
    ("TUNNEL", "tunnel"),
    ("READY", "ready"),
    ("NOT READY BECAUSE", "notReadyReason"),
    ("LOCAL PODS", "localPods"),
    ("UPTIME", "uptime"),
    ("CNI SOCKET", "cniSocket"),
    ("METRICS", "metricsAddress"),
];

/// The agent info as JSON.
pub fn to_json(i: &AgentInfo) -> Value {
    json!({
        "nodeName": i.node_name,
        "version": i.version,
        "dataplane": i.dataplane,
        "source": i.source,
        "sourceDetail": i.source_detail,
        "sourceSynced": i.source_synced,
        "podCIDR": i.pod_cidr,
        "gateway": i.gateway,
        "transportInterface": i.transport_interface,
        "nodeIP": i.node_ip,
        "transportMTU": i.transport_mtu,
        "podMTU": i.pod_mtu,
        "tunnel": i.tunnel,
        "ready": i.ready,
        "notReadyReason": i.not_ready_reason,
        "localPods": i.local_pods,
        "uptimeSeconds": i.uptime_seconds,
        "uptime": uptime(i.uptime_seconds),
        "cniSocket": i.cni_socket,
        "metricsAddress": i.metrics_address,
    })
}

/// `1d2h3m4s`, the way kubectl prints ages.
fn uptime(s: u64) -> String {
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// Fetches the agent info.
pub async fn fetch(c: &mut Client) -> anyhow::Result<AgentInfo> {
    match c.api.get_agent_info(AgentInfoRequest {}).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => Err(c.failed("get agentinfo", s)),
    }
}

/// Runs the command.
pub async fn run(mut c: Client, f: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    let info = fetch(&mut c).await?;
    output::object(out, &to_json(&info), FIELDS, f)
}
