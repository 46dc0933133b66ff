//! Driving `ferreactl` and the metrics endpoint of a simulated node: the CLI runs inside the
//! node's network namespace against the node's debug socket, as an operator would run it on
//! the node; HTTP requests to the agent are made from a thread that entered the namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::node::Node;

/// The metrics port every simulated node's agent listens on (the config's default).
pub const METRICS_PORT: u16 = 10350;

/// The node's debug socket (the agent's default: next to its CNI socket).
pub fn debug_socket(node: &Node) -> PathBuf {
    node.dir().join("debug.sock")
}

fn command(node: &Node, args: &[&str]) -> Command {
    let mut cmd = Command::new(crate::bin("ferreactl"));
    cmd.arg("--socket")
        .arg(debug_socket(node))
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// Runs `ferreactl <args>` in the node's namespace as root.
pub fn run(node: &Node, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = command(node, args);
    crate::netns::enter_on_spawn(&mut cmd, node.ns().name())?;
    cmd.output()
        .with_context(|| format!("running ferreactl {args:?}"))
}

/// Runs `ferreactl <args>` as the user `uid` (and group `uid`): the child drops root
/// before it executes the CLI. It stays in the test's network namespace (entering the node's
/// needs root, and a unix socket is reached by its path from any network namespace).
pub fn run_as(node: &Node, uid: u32, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = command(node, args);
    cmd.uid(uid).gid(uid);
    cmd.output()
        .with_context(|| format!("running ferreactl {args:?} as uid {uid}"))
}

/// `ferreactl <args>` that must succeed; its stdout.
pub fn ok(node: &Node, args: &[&str]) -> anyhow::Result<String> {
    let out = run(node, args)?;
    if !out.status.success() {
        bail!(
            "ferreactl {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `ferreactl <args> -o json`, parsed.
pub fn json(node: &Node, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let text = ok(node, &a)?;
    serde_json::from_str(&text).with_context(|| format!("parsing the JSON of {args:?}: {text}"))
}

/// A table's rows as maps from header to cell (headers are separated by two or more spaces,
/// so multi-word headers such as `POD CIDR` stay one column).
pub fn table(text: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    // Column starts: where a header begins after two spaces (or at 0).
    let mut starts = vec![0];
    let b = header.as_bytes();
    for i in 2..b.len() {
        if b[i] != b' ' && b[i - 1] == b' ' && b[i - 2] == b' ' {
            starts.push(i);
        }
    }
    let cut = |l: &str, i: usize| -> String {
        let from = starts[i].min(l.len());
        let to = starts.get(i + 1).copied().unwrap_or(l.len()).min(l.len());
        l.get(from..to).unwrap_or("").trim().to_owned()
    };
    let names: Vec<String> = (0..starts.len()).map(|i| cut(header, i)).collect();
    lines
        .map(|l| {
            names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), cut(l, i)))
                .collect()
        })
        .collect()
}

/// `GET path` on the agent's metrics port inside the node's namespace: (status, body).
pub fn http_get(node: &Node, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_accept(node, path, "*/*")
}

/// [`http_get`] with an `Accept` header.
pub fn http_get_accept(node: &Node, path: &str, accept: &str) -> anyhow::Result<(u16, String)> {
    let (path, accept) = (path.to_owned(), accept.to_owned());
    node.ns().run(move || {
        http_get_here_accept(
            SocketAddr::from(([127, 0, 0, 1], METRICS_PORT)),
            &path,
            &accept,
        )
    })
}

/// `GET path` from the current thread's namespace.
pub fn http_get_here(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_here_accept(addr, path, "*/*")
}

/// [`http_get_here`] with an `Accept` header.
pub fn http_get_here_accept(
    addr: SocketAddr,
    path: &str,
    accept: &str,
) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header in {resp:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the sample `name{labels}` (labels as they appear, `verb="add"`; empty for
/// none) in a Prometheus text document.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name || !labels.iter().all(|want| rest.contains(want)) {
            return None;
        }
        value.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_split_on_two_spaces() {
        let t = table("NAME   POD CIDR       NODE IP\nnode2  10.244.2.0/24  172.18.0.12\n");
        assert_eq!(t[0]["POD CIDR"], "10.244.2.0/24");
        assert_eq!(t[0]["NODE IP"], "172.18.0.12");
        assert_eq!(t[0]["NAME"], "node2");
    }

    #[test]
    fn samples_are_found_by_name_and_labels() {
        let text = "# TYPE x counter\nx_total{verb=\"add\",result=\"success\"} 3\nx_total{verb=\"del\",result=\"success\"} 1\ny 2\n";
        assert_eq!(sample(text, "x_total", &["verb=\"del\""]), Some(1.0));
        assert_eq!(sample(text, "y", &[]), Some(2.0));
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
