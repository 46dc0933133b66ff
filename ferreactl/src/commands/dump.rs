//! `ferreactl dump dataplane [-p POD]`: what the packet path holds. OVS: the flows of each
//! table with their packet and byte counts, read through the agent's own OpenFlow connection;
//! eBPF: every map decoded into named fields, and where the programs are attached.

use std::io::Write;

use ferrea_proto::debug::v1::{DataplaneDump, DumpRequest};
use serde_json::{Map, Value, json};

use crate::client::Client;
use crate::output::{self, Format};

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this pod's entries (a name, `namespace/name`, or a container ID).
    #[arg(short, long)]
    pod: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// The dump as JSON: `{dataplane, sections: [{name, rows: [{column: cell}]}]}`.
pub fn to_json(d: &DataplaneDump) -> Value {
    let sections: Vec<Value> = d
        .sections
        .iter()
        .map(|s| {
            let rows: Vec<Value> = s
                .rows
                .iter()
                .map(|r| {
                    let m: Map<String, Value> = s
                        .columns
                        .iter()
                        .cloned()
                        .zip(r.cells.iter().map(|c| Value::String(c.clone())))
                        .collect();
                    Value::Object(m)
                })
                .collect();
            json!({"name": s.name, "columns": s.columns, "rows": rows})
        })
        .collect();
    json!({"dataplane": d.dataplane, "sections": sections})
}

/// Fetches the dump.
pub async fn fetch(c: &mut Client, pod: &str) -> anyhow::Result<DataplaneDump> {
    let req = DumpRequest {
        pod: pod.to_owned(),
    };
    match c.api.dump_dataplane(req).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => Err(c.failed("dump dataplane", s)),
    }
}

/// Prints the dump as tables, one per section.
pub fn print_tables(out: &mut dyn Write, d: &DataplaneDump) -> std::io::Result<()> {
    writeln!(out, "dataplane: {}", d.dataplane)?;
    for s in &d.sections {
        writeln!(out, "\n{} ({} entries)", s.name, s.rows.len())?;
        let headers: Vec<String> = s.columns.iter().map(|c| c.to_uppercase()).collect();
        let rows: Vec<Vec<String>> = s.rows.iter().map(|r| r.cells.clone()).collect();
        output::table(out, &headers, &rows)?;
    }
    Ok(())
}

/// Runs the command.
pub async fn run(mut c: Client, a: Args, out: &mut dyn Write) -> anyhow::Result<()> {
    let d = fetch(&mut c, a.pod.as_deref().unwrap_or_default()).await?;
    match a.output {
        Format::Table => Ok(print_tables(out, &d)?),
        f => output::document(out, &to_json(&d), f),
    }
}
