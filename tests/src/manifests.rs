//! Desired state for a node's `files` source, and what the agent writes back.
//!
//! - Pod and Service manifests written into [`Node::manifests`] (atomically: a temporary file
//!   renamed into place, so the agent's poller never reads half a manifest).
//! - The local status view `<stateDir>/status/pods.json` (a `PodList`) and the
//!   `nodeportlocal.antrea.io` annotations in it.
//! - The agent config lines that enable NodePortLocal.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use crate::node::Node;

/// The pod annotation NodePortLocal writes.
pub const NPL_ANNOTATION: &str = "nodeportlocal.antrea.io";

/// Agent config lines (for [`crate::NodeOptions::extra_config`]) enabling NodePortLocal with
/// this port range.
pub fn npl_config(range: &str) -> String {
    format!("nodePortLocal:\n  enable: true\n  portRange: \"{range}\"\n")
}

/// A container port of a Pod manifest: `name`, `containerPort`, `protocol` (`TCP`, `UDP`).
#[derive(Clone, Debug)]
pub struct ContainerPort<'a> {
    /// `name` (empty: none).
    pub name: &'a str,
    /// `containerPort`.
    pub port: u16,
    /// `protocol`.
    pub protocol: &'a str,
}

/// A port of a Service manifest: `port`, `targetPort` (a number or a name, as YAML text),
/// `protocol`.
#[derive(Clone, Debug)]
pub struct ServicePort<'a> {
    /// `port`.
    pub port: u16,
    /// `targetPort`, verbatim (`8080` or `http`).
    pub target_port: &'a str,
    /// `protocol`.
    pub protocol: &'a str,
}

fn write_atomically(node: &Node, file: &str, text: &str) -> anyhow::Result<PathBuf> {
    let dir = node.manifests();
    let path = dir.join(file);
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(path)
}

fn yaml_map(pairs: &[(&str, &str)]) -> String {
    let items: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect();
    format!("{{{}}}", items.join(", "))
}

/// Writes `file` into the node's manifests directory with `text` verbatim (atomically).
pub fn write_file(node: &Node, file: &str, text: &str) -> anyhow::Result<PathBuf> {
    write_atomically(node, file, text)
}

/// Writes `pod-<name>.yaml`: a Pod in namespace `default` on this node, with `labels` and
/// one container declaring `ports`.
pub fn write_pod(
    node: &Node,
    name: &str,
    labels: &[(&str, &str)],
    ports: &[ContainerPort],
) -> anyhow::Result<PathBuf> {
    let ports: Vec<String> = ports
        .iter()
        .map(|p| {
            let name = if p.name.is_empty() {
                String::new()
            } else {
                format!("name: {}, ", p.name)
            };
            format!(
                "{{{name}containerPort: {}, protocol: {}}}",
                p.port, p.protocol
            )
        })
        .collect();
    write_atomically(
        node,
        &format!("pod-{name}.yaml"),
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {}\n\
             spec:\n  nodeName: {}\n  containers:\n  - name: c\n    image: busybox\n    ports: [{}]\n",
            yaml_map(labels),
            node.name(),
            ports.join(", ")
        ),
    )
}

/// Writes `svc-<name>.yaml`: a ClusterIP Service in `default`, annotated
/// `nodeportlocal.antrea.io/enabled: "true"` when `npl`, selecting `selector`.
pub fn write_service(
    node: &Node,
    name: &str,
    npl: bool,
    selector: &[(&str, &str)],
    ports: &[ServicePort],
) -> anyhow::Result<PathBuf> {
    let ann = if npl {
        "  annotations:\n    nodeportlocal.antrea.io/enabled: \"true\"\n"
    } else {
        ""
    };
    let ports: Vec<String> = ports
        .iter()
        .map(|p| {
            format!(
                "{{port: {}, targetPort: {}, protocol: {}}}",
                p.port, p.target_port, p.protocol
            )
        })
        .collect();
    write_atomically(
        node,
        &format!("svc-{name}.yaml"),
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{ann}\
             spec:\n  type: ClusterIP\n  selector: {}\n  ports: [{}]\n",
            yaml_map(selector),
            ports.join(", ")
        ),
    )
}

/// Removes a manifest file written by this module (`pod-<name>.yaml`, `svc-<name>.yaml`).
pub fn remove(node: &Node, file: &str) -> anyhow::Result<()> {
    let p = node.manifests().join(file);
    std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
}

/// Path of the node's local status view.
pub fn status_path(node: &Node) -> PathBuf {
    node.dir().join("state").join("status").join("pods.json")
}

/// The NodePortLocal annotations in the status view: `namespace/name` to the annotation's
/// exact string. Empty when the file does not exist yet.
pub fn npl_annotations(node: &Node) -> anyhow::Result<BTreeMap<String, String>> {
    let p = status_path(node);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))?;
    anyhow::ensure!(
        doc["kind"] == "PodList",
        "{} is not a PodList: {doc}",
        p.display()
    );
    let mut out = BTreeMap::new();
    for item in doc["items"].as_array().context("PodList without items")? {
        let md = &item["metadata"];
        let key = format!(
            "{}/{}",
            md["namespace"].as_str().context("item without namespace")?,
            md["name"].as_str().context("item without name")?
        );
        if let Some(a) = md["annotations"][NPL_ANNOTATION].as_str() {
            out.insert(key, a.to_owned());
        }
    }
    Ok(out)
}

/// One entry of a `nodeportlocal.antrea.io` annotation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NplEntry {
    /// `podPort`.
    pub pod_port: u16,
    /// `nodeIP`.
    pub node_ip: String,
    /// `nodePort`.
    pub node_port: u16,
    /// `protocol`.
    pub protocol: String,
    /// `ipFamily`.
    pub ip_family: String,
}

/// Parses an annotation value (a JSON list of entries).
pub fn parse_annotation(s: &str) -> anyhow::Result<Vec<NplEntry>> {
    let v: Value = serde_json::from_str(s).with_context(|| format!("annotation {s:?}"))?;
    let arr = v
        .as_array()
        .with_context(|| format!("{s:?} is not a list"))?;
    arr.iter()
        .map(|e| {
            let n = |k: &str| {
                e[k].as_u64()
                    .and_then(|x| u16::try_from(x).ok())
                    .with_context(|| format!("{k} in {e}"))
            };
            let t = |k: &str| {
                e[k].as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("{k} in {e}"))
            };
            Ok(NplEntry {
                pod_port: n("podPort")?,
                node_ip: t("nodeIP")?,
                node_port: n("nodePort")?,
                protocol: t("protocol")?,
                ip_family: t("ipFamily")?,
            })
        })
        .collect()
}

/// The exact string Antrea writes for `entries` (in the given order).
pub fn antrea_annotation(entries: &[NplEntry]) -> String {
    let items: Vec<String> = entries
        .iter()
        .map(|e| {
            format!(
                r#"{{"podPort":{},"nodeIP":"{}","nodePort":{},"protocol":"{}","ipFamily":"{}"}}"#,
                e.pod_port, e.node_ip, e.node_port, e.protocol, e.ip_family
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// Polls the status view every 20 ms until `f` accepts the annotations or `timeout` passes;
/// returns the accepted value and how long it took, or the last annotations seen.
pub fn wait_annotations<T>(
    node: &Node,
    timeout: Duration,
    mut f: impl FnMut(&BTreeMap<String, String>) -> Option<T>,
) -> Result<(T, Duration), BTreeMap<String, String>> {
    let t = Instant::now();
    let mut last = BTreeMap::new();
    loop {
        if let Ok(a) = npl_annotations(node) {
            if let Some(v) = f(&a) {
                return Ok((v, t.elapsed()));
            }
            last = a;
        }
        if t.elapsed() >= timeout {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nft list table ip ferrea` in the node.
pub fn nft_table(node: &Node) -> anyhow::Result<String> {
    node.ns().sh(&["nft", "list", "table", "ip", "ferrea"])
}

/// The NodePortLocal map elements in the node's table: (protocol, node port, pod IP, pod port).
pub fn npl_map_elements(node: &Node) -> anyhow::Result<Vec<(String, u16, String, u16)>> {
    let text = nft_table(node)?;
    let mut out = Vec::new();
    let mut proto = None;
    let mut in_elements = false;
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("map npl_") {
            proto = rest.split_whitespace().next().map(str::to_owned);
            in_elements = false;
            continue;
        }
        if l == "}" {
            proto = None;
            in_elements = false;
            continue;
        }
        let Some(p) = &proto else { continue };
        let body = if let Some(rest) = l.strip_prefix("elements = {") {
            in_elements = true;
            rest
        } else if in_elements {
            l
        } else {
            continue;
        };
        for elem in body.split(',') {
            let elem = elem.trim().trim_end_matches('}').trim();
            if elem.is_empty() {
                continue;
            }
            // "61000 : 10.244.1.2 . 8080"
            let parts: Vec<&str> = elem.split_whitespace().collect();
            if let [np, ":", ip, ".", pp] = parts.as_slice() {
                out.push((p.clone(), np.parse()?, (*ip).to_owned(), pp.parse()?));
            } else {
                anyhow::bail!("unexpected map element {elem:?} in:\n{text}");
            }
        }
        if body.trim_end().ends_with('}') {
            in_elements = false;
        }
    }
    out.sort();
    Ok(out)
}
