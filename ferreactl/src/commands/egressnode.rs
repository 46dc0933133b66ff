//! `ferreactl get egressnode`: what this node holds for Egress (IPs, VLANs, route tables,
//! local pods' Egresses, `rp_filter` wanted, found and restored, the failure detector's
//! members, problems).

use std::io::Write;

use serde_json::Value;

use crate::client::Client;
use crate::output::{self, Format};

/// Runs the command.
pub async fn run(mut c: Client, f: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    let (_, node) = crate::commands::egress::fetch(&mut c).await?;
    if node.is_null() {
        anyhow::bail!(
            "the Egress controller has not reported yet (the agent is starting; try again)"
        );
    }
    if f != Format::Table {
        return output::document(out, &node, f);
    }
    let arr = |k: &str| {
        node.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    writeln!(out, "NODE  {}", output::cell(node.get("node")))?;
    writeln!(out, "\nHELD IPS")?;
    output::list(
        out,
        &arr("held"),
        &[
            ("EGRESS", "egress"),
            ("IP", "ip"),
            ("ID", "id"),
            ("VLAN", "vlan"),
            ("TABLE", "table"),
        ],
        Format::Table,
    )?;
    writeln!(out, "\nLOCAL PODS")?;
    let pods: Vec<Value> = node
        .get("localPods")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(p, e)| serde_json::json!({"pod": p, "egress": e}))
        .collect();
    output::list(
        out,
        &pods,
        &[("POD", "pod"), ("EGRESS", "egress")],
        Format::Table,
    )?;
    writeln!(out, "\nRP_FILTER")?;
    output::list(
        out,
        &arr("rpFilter"),
        &[
            ("INTERFACE", "interface"),
            ("WANT", "want"),
            ("FOUND", "found"),
            ("RESTORED", "restored"),
        ],
        Format::Table,
    )?;
    if node["membership"]["enabled"] == true {
        writeln!(out, "\nMEMBERS (failure detector)")?;
        let members = node["membership"]["members"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        output::list(
            out,
            &members,
            &[
                ("NODE", "node"),
                ("ADDRESS", "address"),
                ("SINCE (UNIX MS)", "sinceMs"),
                ("ELIGIBLE", "eligible"),
            ],
            Format::Table,
        )?;
    }
    let problems = arr("problems");
    if !problems.is_empty() {
        writeln!(out, "\nPROBLEMS")?;
        for p in problems {
            writeln!(out, "{}", output::cell(Some(&p)))?;
        }
    }
    Ok(())
}
