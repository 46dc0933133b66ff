//! `ferreactl supportbundle -d DIR`: one `.tar.gz` with what a bug report needs: the agent's
//! own views (agent info, pod interfaces, remote nodes, Egress, NodePortLocal, the dataplane
//! dump, the log filter, its recent log lines), the agent's configuration file, the node's
//! nftables ruleset, links, addresses, routes (every table) and rules.
//!
//! Each part is collected on its own: one that fails (a command missing on the node, a file
//! not readable) is named in `errors.txt` and the rest still goes in. The node commands run
//! where ferreactl runs, which is the node's network namespace (the agent's, with
//! `hostNetwork`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::Value;

use crate::client::Client;

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write the archive to (created if missing).
    #[arg(short, long)]
    dir: PathBuf,
    /// The agent's configuration file, included as it is.
    #[arg(long, default_value = "/etc/ferrea/agent.yaml")]
    agent_config: PathBuf,
    /// The agent's log file; its last MiB is included. Without it, the last MiB the agent
    /// keeps in memory (a DaemonSet's agent logs to its container's stderr), else the last
    /// 5000 lines of `journalctl -u ferrea-agent`.
    #[arg(long)]
    agent_log: Option<PathBuf>,
}

/// How much of a log file goes in.
const LOG_TAIL: u64 = 1 << 20;

/// Node commands whose output goes in: (file, program, arguments).
const NODE_COMMANDS: &[(&str, &str, &[&str])] = &[
    ("node/nft-ruleset.txt", "nft", &["list", "ruleset"]),
    ("node/links.txt", "ip", &["-d", "link", "show"]),
    ("node/addresses.txt", "ip", &["addr", "show"]),
    ("node/routes.txt", "ip", &["route", "show", "table", "all"]),
    ("node/rules.txt", "ip", &["rule", "show"]),
    ("node/neighbours.txt", "ip", &["neigh", "show"]),
    (
        "node/tc-filters.txt",
        "tc",
        &["-s", "filter", "show", "dev", "ferrea-tun0", "ingress"],
    ),
];

struct Bundle {
    files: Vec<(String, Vec<u8>)>,
    errors: Vec<String>,
}

impl Bundle {
    fn add(&mut self, name: &str, data: impl Into<Vec<u8>>) {
        self.files.push((name.to_owned(), data.into()));
    }

    fn json(&mut self, name: &str, r: anyhow::Result<Value>) {
        match r {
            Ok(v) => self.add(name, serde_json::to_vec_pretty(&v).expect("a JSON value")),
            Err(e) => self.errors.push(format!("{name}: {e:#}")),
        }
    }
}

async fn node_command(b: &mut Bundle, file: &str, prog: &str, args: &[&str]) {
    match tokio::process::Command::new(prog).args(args).output().await {
        Ok(o) => {
            let mut data = o.stdout;
            if !o.status.success() {
                b.errors.push(format!(
                    "{file}: `{prog} {}` exited with {}: {}",
                    args.join(" "),
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            data.extend_from_slice(&o.stderr);
            b.add(file, data);
        }
        Err(e) => b.errors.push(format!("{file}: running {prog}: {e}")),
    }
}

fn tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// Runs the command: collects, writes `<dir>/ferrea-supportbundle-<node>-<unix time>.tar.gz`
/// and prints its path.
pub async fn run(mut c: Client, a: Args, out: &mut dyn Write) -> anyhow::Result<()> {
    use crate::commands::*;
    let mut b = Bundle {
        files: Vec::new(),
        errors: Vec::new(),
    };
    let info = agentinfo::fetch(&mut c).await;
    let node = info
        .as_ref()
        .map(|i| i.node_name.clone())
        .unwrap_or_else(|_| "unknown".into());
    b.json("agent/agentinfo.json", info.map(|i| agentinfo::to_json(&i)));
    let pods = podinterface::fetch(&mut c, "", "").await;
    b.json("agent/podinterfaces.json", pods.map(Value::Array));
    let remotes = remotenodes::fetch(&mut c).await;
    b.json("agent/remotenodes.json", remotes.map(Value::Array));
    match egress::fetch(&mut c).await {
        Ok((list, node_view)) => {
            b.json("agent/egresses.json", Ok(list));
            b.json("agent/egress-node.json", Ok(node_view));
        }
        Err(e) => b.errors.push(format!("agent/egress: {e:#}")),
    }
    let npl = nodeportlocal::fetch(&mut c, "", "").await;
    b.json(
        "agent/nodeportlocal.json",
        npl.map(|(enabled, items)| serde_json::json!({"enabled": enabled, "items": items})),
    );
    match dump::fetch(&mut c, "").await {
        Ok(d) => {
            b.json("agent/dataplane.json", Ok(dump::to_json(&d)));
            let mut text = Vec::new();
            dump::print_tables(&mut text, &d)?;
            b.add("agent/dataplane.txt", text);
        }
        Err(e) => b.errors.push(format!("agent/dataplane: {e:#}")),
    }
    match c
        .api
        .log_level(ferrea_proto::debug::v1::LogLevelRequest::default())
        .await
    {
        Ok(r) => b.add("agent/log-filter.txt", r.into_inner().filter + "\n"),
        Err(s) => b
            .errors
            .push(format!("agent/log-filter.txt: {}", s.message())),
    }
    match std::fs::read(&a.agent_config) {
        Ok(d) => b.add("agent/config.yaml", d),
        Err(e) => b.errors.push(format!(
            "agent/config.yaml: reading {}: {e}",
            a.agent_config.display()
        )),
    }
    for (file, prog, args) in NODE_COMMANDS {
        node_command(&mut b, file, prog, args).await;
    }
    let in_memory = c
        .api
        .recent_logs(ferrea_proto::debug::v1::RecentLogsRequest {})
        .await
        .map(|r| r.into_inner().text);
    match (&a.agent_log, in_memory) {
        (Some(p), _) => match tail(p, LOG_TAIL) {
            Ok(d) => b.add("agent/agent.log", d),
            Err(e) => b
                .errors
                .push(format!("agent/agent.log: reading {}: {e}", p.display())),
        },
        (None, Ok(text)) if !text.is_empty() => b.add("agent/agent.log", text),
        (None, _) => {
            node_command(
                &mut b,
                "agent/agent.log",
                "journalctl",
                &["-u", "ferrea-agent", "-n", "5000", "--no-pager"],
            )
            .await
        }
    }
    if !b.errors.is_empty() {
        let text = b.errors.join("\n") + "\n";
        b.add("errors.txt", text);
    }

    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = format!("ferrea-supportbundle-{node}-{now}");
    let path = a.dir.join(format!("{base}.tar.gz"));
    let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (name, data) in &b.files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(now);
        h.set_cksum();
        tar.append_data(&mut h, format!("{base}/{name}"), data.as_slice())
            .with_context(|| format!("adding {name} to {}", path.display()))?;
    }
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(out, "{}", path.display())?;
    if !b.errors.is_empty() {
        eprintln!(
            "ferreactl: {} part(s) could not be collected; see errors.txt in the bundle",
            b.errors.len()
        );
    }
    Ok(())
}
