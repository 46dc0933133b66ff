//! `ferreactl get podinterface [-n NS] [NAME]`: the local pods' interfaces, where each is on
//! the dataplane, and its counters.

use std::io::Write;

use ferrea_proto::debug::v1::{PodInterface, PodInterfaceRequest};
use serde_json::{Value, json};

use crate::client::Client;
use crate::output::{self, Column, Format};

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only pods of this namespace.
    #[arg(short, long)]
    namespace: Option<String>,
    /// A pod name, `namespace/name`, or a container ID (a prefix of 6 or more characters).
    name: Option<String>,
    #[command(flatten)]
    output: crate::OutputArgs,
}

const COLUMNS: &[Column] = &[
    ("NAMESPACE", "namespace"),
    ("POD", "pod"),
    ("CONTAINER", "containerID"),
    ("IP", "ip"),
    ("MAC", "mac"),
    ("HOST INTERFACE", "hostInterface"),
    ("DATAPLANE", "dataplanePort"),
    ("TX PKTS", "txPackets"),
    ("RX PKTS", "rxPackets"),
    ("SPOOFED", "dropSpoofed"),
    ("OTHER", "dropOther"),
];

/// A pod interface as JSON.
pub fn to_json(p: &PodInterface) -> Value {
    json!({
        "pod": p.pod,
        "namespace": p.namespace,
        "containerID": p.container_id,
        "ifname": p.ifname,
        "ip": p.ip,
        "mac": p.mac,
        "hostInterface": p.host_interface,
        "hostIfindex": p.host_ifindex,
        "hostMAC": p.host_mac,
        "netns": p.netns,
        "dataplanePort": p.dataplane_port,
        "hasCounters": p.has_counters,
        "txPackets": p.tx_packets,
        "txBytes": p.tx_bytes,
        "rxPackets": p.rx_packets,
        "rxBytes": p.rx_bytes,
        "dropSpoofed": p.drop_spoofed,
        "dropOther": p.drop_other,
    })
}

/// Fetches the pod interfaces (all of them without a filter).
pub async fn fetch(c: &mut Client, namespace: &str, name: &str) -> anyhow::Result<Vec<Value>> {
    let req = PodInterfaceRequest {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    match c.api.list_pod_interfaces(req).await {
        Ok(r) => Ok(r.into_inner().items.iter().map(to_json).collect()),
        Err(s) => Err(c.failed("get podinterface", s)),
    }
}

/// Runs the command.
pub async fn run(mut c: Client, a: Args, out: &mut dyn Write) -> anyhow::Result<()> {
    let ns = a.namespace.unwrap_or_default();
    let name = a.name.unwrap_or_default();
    let mut items = fetch(&mut c, &ns, &name).await?;
    // Short container IDs in the table; the full one in JSON and YAML.
    if a.output.output == Format::Table {
        for i in &mut items {
            if let Some(Value::String(id)) = i.get_mut("containerID") {
                id.truncate(12);
            }
        }
    }
    if items.is_empty() && !name.is_empty() {
        anyhow::bail!("no pod interface {name:?} on this node");
    }
    output::list(out, &items, COLUMNS, a.output.output)
}
