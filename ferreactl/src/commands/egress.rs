//! `ferreactl get egress`: every Egress as this node's Egress controller last computed it
//! (Antrea's status fields: `egressIP`, `egressNode`, conditions).

use std::io::Write;

use ferrea_proto::debug::v1::{EgressRequest, EgressViews};
use serde_json::{Value, json};

use crate::client::Client;
use crate::output::{self, Column, Format};

const COLUMNS: &[Column] = &[
    ("NAME", "name"),
    ("EGRESS IP", "egressIP"),
    ("EGRESS NODE", "egressNode"),
    ("ALLOCATED", "allocated"),
    ("ASSIGNED", "assigned"),
    ("MESSAGE", "message"),
];

/// Fetches both views.
pub async fn fetch(c: &mut Client) -> anyhow::Result<(Value, Value)> {
    let v: EgressViews = match c.api.get_egress(EgressRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(c.failed("get egress", s)),
    };
    let parse = |b: &[u8]| -> anyhow::Result<Value> {
        if b.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_slice(b)?)
    };
    Ok((parse(&v.egresses_json)?, parse(&v.node_json)?))
}

/// The condition `kind` of an Egress status: (status, reason, message).
fn condition<'a>(status: &'a Value, kind: &str) -> Option<&'a Value> {
    status
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

/// One row per Egress of the `EgressList`.
pub fn rows(list: &Value) -> Vec<Value> {
    let items = list.get("items").and_then(Value::as_array);
    items
        .into_iter()
        .flatten()
        .map(|e| {
            let st = &e["status"];
            let s = |c: Option<&Value>, k: &str| {
                c.and_then(|c| c.get(k)).cloned().unwrap_or(Value::Null)
            };
            let alloc = condition(st, "IPAllocated");
            let assign = condition(st, "IPAssigned");
            let message = [s(alloc, "message"), s(assign, "message")]
                .into_iter()
                .filter_map(|m| m.as_str().filter(|m| !m.is_empty()).map(str::to_owned))
                .collect::<Vec<_>>()
                .join("; ");
            json!({
                "name": e["metadata"]["name"],
                "egressIP": st.get("egressIP"),
                "egressNode": st.get("egressNode"),
                "allocated": s(alloc, "status"),
                "assigned": s(assign, "reason"),
                "message": message,
                "status": st,
            })
        })
        .collect()
}

/// Runs the command.
pub async fn run(mut c: Client, f: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    let (list, _) = fetch(&mut c).await?;
    if list.is_null() {
        anyhow::bail!(
            "the Egress controller has not reported yet (the agent is starting; try again)"
        );
    }
    output::list(out, &rows(&list), COLUMNS, f)
}
