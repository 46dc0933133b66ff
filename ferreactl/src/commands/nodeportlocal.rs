//! `ferreactl get nodeportlocal [-n NS] [POD]`: NodePortLocal mappings of local pods (what the
//! `nodeportlocal.antrea.io` annotation says) and whether each DNAT rule is installed.

use std::io::Write;

use ferrea_proto::debug::v1::NodePortLocalRequest;
use serde_json::{Value, json};

use crate::client::Client;
use crate::output::{self, Column};

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only pods of this namespace.
    #[arg(short, long)]
    namespace: Option<String>,
    /// Only this pod (a name, or `namespace/name`).
    pod: Option<String>,
    #[command(flatten)]
    output: crate::OutputArgs,
}

const COLUMNS: &[Column] = &[
    ("NAMESPACE", "namespace"),
    ("POD", "pod"),
    ("POD IP", "podIP"),
    ("POD PORT", "podPort"),
    ("PROTOCOL", "protocol"),
    ("NODE IP", "nodeIP"),
    ("NODE PORT", "nodePort"),
    ("INSTALLED", "installed"),
];

/// Fetches the mappings: (NPL enabled, mappings).
pub async fn fetch(c: &mut Client, ns: &str, pod: &str) -> anyhow::Result<(bool, Vec<Value>)> {
    let req = NodePortLocalRequest {
        namespace: ns.to_owned(),
        pod: pod.to_owned(),
    };
    let r = match c.api.list_node_port_local(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(c.failed("get nodeportlocal", s)),
    };
    let items = r
        .items
        .iter()
        .map(|m| {
            json!({"namespace": m.namespace, "pod": m.pod, "podIP": m.pod_ip,
                "podPort": m.pod_port, "protocol": m.protocol, "nodeIP": m.node_ip,
                "nodePort": m.node_port, "installed": m.installed})
        })
        .collect();
    Ok((r.enabled, items))
}

/// Runs the command.
pub async fn run(mut c: Client, a: Args, out: &mut dyn Write) -> anyhow::Result<()> {
    let (enabled, items) = fetch(
        &mut c,
        a.namespace.as_deref().unwrap_or_default(),
        a.pod.as_deref().unwrap_or_default(),
    )
    .await?;
    if !enabled && items.is_empty() {
        eprintln!("NodePortLocal is disabled on this agent (nodePortLocal.enable: false)");
    }
    output::list(out, &items, COLUMNS, a.output.output)
}
