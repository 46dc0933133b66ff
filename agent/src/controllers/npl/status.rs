//! The `nodeportlocal.antrea.io` annotations and where they are published: [`annotations`]
//! renders them exactly as Antrea does, a [`StatusSink`] publishes them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::Serialize;

use super::POD_ANNOTATION;
use crate::pods::store::NplMapping;

/// Errors publishing pod status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The status document could not be encoded.
    #[error("encoding the status view {}", .path.display())]
    Encode {
        /// The view's file.
        path: PathBuf,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// The status view could not be written.
    #[error("writing the status view {}", .path.display())]
    Write {
        /// The view's file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The blocking writer task did not finish (it panicked or the runtime shut down).
    #[error("writing the status view {}: the writer task failed", .path.display())]
    Task {
        /// The view's file.
        path: PathBuf,
        /// Why the task failed.
        #[source]
        source: tokio::task::JoinError,
    },
    /// Another sink (the Kubernetes source's patches, a test's fake) failed.
    #[error("publishing pod status through {sink}")]
    Sink {
        /// Which sink.
        sink: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// One entry of the `nodeportlocal.antrea.io` annotation; field order is the wire order.
#[derive(Serialize)]
struct AnnotationEntry {
    #[serde(rename = "podPort")]
    pod_port: u16,
    #[serde(rename = "nodeIP")]
    node_ip: String,
    #[serde(rename = "nodePort")]
    node_port: u16,
    protocol: &'static str,
    #[serde(rename = "ipFamily")]
    ip_family: &'static str,
}

/// The annotation value of every pod with mappings (`namespace/name` to the JSON string),
/// exactly as Antrea writes it.
pub fn annotations<'a>(
    mappings: impl IntoIterator<Item = &'a NplMapping>,
    node_ip: Ipv4Addr,
) -> BTreeMap<String, String> {
    let mut per_pod: BTreeMap<&str, Vec<&NplMapping>> = BTreeMap::new();
    for m in mappings {
        per_pod.entry(&m.pod).or_default().push(m);
    }
    per_pod
        .into_iter()
        .map(|(pod, mut ms)| {
            ms.sort_by_key(|m| (m.pod_port, m.protocol));
            let entries: Vec<AnnotationEntry> = ms
                .iter()
                .map(|m| AnnotationEntry {
                    pod_port: m.pod_port,
                    node_ip: node_ip.to_string(),
                    node_port: m.node_port,
                    protocol: m.protocol.as_str(),
                    ip_family: "IPv4",
                })
                .collect();
            (
                pod.to_owned(),
                serde_json::to_string(&entries).expect("plain data serialises"),
            )
        })
        .collect()
}

/// Where the agent writes pod status back (today: NPL annotations).
#[async_trait::async_trait]
pub trait StatusSink: Send + Sync {
    /// Publishes the complete set of NPL annotations of this node's pods (`namespace/name` to
    /// the annotation value). A pod not named has no annotation: an implementation removes the
    /// annotations it published before for pods that are not named any more.
    async fn publish_npl(&self, annotations: &BTreeMap<String, String>) -> Result<(), StatusError>;
}

/// The `files` mode's status view: `<stateDir>/status/pods.json`, a Kubernetes-style
/// `PodList` whose items carry `metadata.namespace`, `metadata.name` and
/// `metadata.annotations["nodeportlocal.antrea.io"]`; replaced atomically (temporary file and
/// rename), so a reader never sees half a file.
#[derive(Clone, Debug)]
pub struct LocalStatusView {
    path: PathBuf,
}

impl LocalStatusView {
    /// The view under `state_dir`.
    pub fn new(state_dir: &std::path::Path) -> Self {
        Self {
            path: state_dir.join("status").join("pods.json"),
        }
    }

    /// The file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The document for `annotations`.
    pub fn render(annotations: &BTreeMap<String, String>) -> serde_json::Value {
        let items: Vec<serde_json::Value> = annotations
            .iter()
            .map(|(key, value)| {
                let (ns, name) = key.split_once('/').unwrap_or(("default", key));
                serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "namespace": ns,
                        "name": name,
                        "annotations": { POD_ANNOTATION: value },
                    },
                })
            })
            .collect();
        serde_json::json!({ "apiVersion": "v1", "kind": "PodList", "items": items })
    }
}

#[async_trait::async_trait]
impl StatusSink for LocalStatusView {
    async fn publish_npl(&self, annotations: &BTreeMap<String, String>) -> Result<(), StatusError> {
        let mut text = serde_json::to_vec_pretty(&Self::render(annotations)).map_err(|source| {
            StatusError::Encode {
                path: self.path.clone(),
                source,
            }
        })?;
        text.push(b'\n');
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            crate::pods::store::write_file_atomic(&path, &text)
                .map_err(|source| StatusError::Write { path, source })
        })
        .await
        .map_err(|source| StatusError::Task {
            path: self.path.clone(),
            source,
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Protocol;

    #[test]
    fn annotation_is_antreas_exact_json() {
        let m = |pod_port, protocol, node_port| NplMapping {
            pod: "default/web-1".into(),
            pod_port,
            protocol,
            pod_ip: Ipv4Addr::new(10, 244, 1, 2),
            node_port,
        };
        let a = annotations(
            &[
                m(8080, Protocol::Udp, 61003),
                m(8080, Protocol::Tcp, 61002),
                m(80, Protocol::Tcp, 61000),
            ],
            Ipv4Addr::new(172, 18, 0, 11),
        );
        assert_eq!(
            a["default/web-1"],
            r#"[{"podPort":80,"nodeIP":"172.18.0.11","nodePort":61000,"protocol":"tcp","ipFamily":"IPv4"},{"podPort":8080,"nodeIP":"172.18.0.11","nodePort":61002,"protocol":"tcp","ipFamily":"IPv4"},{"podPort":8080,"nodeIP":"172.18.0.11","nodePort":61003,"protocol":"udp","ipFamily":"IPv4"}]"#
        );
    }

    #[tokio::test]
    async fn status_view_is_a_pod_list_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let v = LocalStatusView::new(dir.path());
        let ann = BTreeMap::from([("shop/web-1".to_string(), "[]".to_string())]);
        v.publish_npl(&ann).await.unwrap();
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(v.path()).unwrap()).unwrap();
        assert_eq!(doc["kind"], "PodList");
        assert_eq!(doc["items"][0]["metadata"]["namespace"], "shop");
        assert_eq!(doc["items"][0]["metadata"]["name"], "web-1");
        assert_eq!(
            doc["items"][0]["metadata"]["annotations"]["nodeportlocal.antrea.io"],
            "[]"
        );
        v.publish_npl(&BTreeMap::new()).await.unwrap();
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(v.path()).unwrap()).unwrap();
        assert_eq!(doc["items"], serde_json::json!([]));
        assert!(!v.path().with_extension("json.tmp").exists());
    }
}
