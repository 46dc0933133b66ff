//! `ferreactl get remotenodes`: the other nodes the dataplane reaches.

use std::io::Write;

use ferrea_proto::debug::v1::RemoteNodeRequest;
use serde_json::{Value, json};

use crate::client::Client;
use crate::output::{self, Column, Format};

const COLUMNS: &[Column] = &[
    ("NAME", "name"),
    ("NODE IP", "nodeIP"),
    ("POD CIDR", "podCIDR"),
    ("GATEWAY", "gateway"),
];

/// Fetches the remote nodes.
pub async fn fetch(c: &mut Client) -> anyhow::Result<Vec<Value>> {
    match c.api.list_remote_nodes(RemoteNodeRequest {}).await {
        Ok(r) => Ok(r
            .into_inner()
            .items
            .iter()
            .map(|n| {
                json!({"name": n.name, "nodeIP": n.node_ip, "podCIDR": n.pod_cidr,
                    "gateway": n.gateway})
            })
            .collect()),
        Err(s) => Err(c.failed("get remotenodes", s)),
    }
}

/// Runs the command.
pub async fn run(mut c: Client, f: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    let items = fetch(&mut c).await?;
    output::list(out, &items, COLUMNS, f)
}
