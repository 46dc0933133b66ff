//! The `kubernetes` source's [`StatusSink`]: the `nodeportlocal.antrea.io` annotation is
//! patched onto each Pod object.
//!
//! One JSON merge patch of `metadata.annotations` per pod whose value changed since the last
//! successful publish: the new value, or `null` to remove it when the pod has no mapping any
//! more. Other annotations are untouched (a merge patch names only this key). What was
//! published is remembered per pod; before the first publish it is what the API shows on this
//! node's pods (the Kubernetes source's view), so an annotation an earlier run left on a pod
//! that has no mapping now is removed, and an unchanged one is not patched again. A pod that no
//! longer exists (404) needs nothing. Any other failure is returned after the other pods were
//! tried, so the NPL controller's runner retries what failed.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::{Mutex, watch};

use super::POD_ANNOTATION;
use super::status::{StatusError, StatusSink};
use crate::source::DesiredState;

/// A failed patch of one pod's annotation.
#[derive(Debug, thiserror::Error)]
#[error("patching the {POD_ANNOTATION} annotation of pod {pod}")]
pub struct PatchError {
    /// `namespace/name`.
    pub pod: String,
    /// What the API said.
    #[source]
    pub source: kube::Error,
}

/// Patches NPL annotations onto Pod objects (see the module doc).
pub struct KubeStatusSink {
    client: Client,
    node_name: String,
    state: watch::Receiver<DesiredState>,
    /// What the API holds as far as this sink knows; `None` until the first publish.
    published: Mutex<Option<BTreeMap<String, String>>>,
}

impl KubeStatusSink {
    /// A sink for node `node_name`'s pods; `state` is the Kubernetes source's view (what the
    /// pods' annotations are before the first publish).
    pub fn new(client: Client, node_name: &str, state: watch::Receiver<DesiredState>) -> Self {
        Self {
            client,
            node_name: node_name.to_owned(),
            state,
            published: Mutex::new(None),
        }
    }

    /// The annotations this node's pods carry in the source's view.
    fn seen(&self) -> BTreeMap<String, String> {
        let st = self.state.borrow();
        st.pods
            .iter()
            .filter(|(_, p)| p.node_name.as_deref() == Some(self.node_name.as_str()))
            .filter_map(|(k, p)| {
                p.annotations
                    .get(POD_ANNOTATION)
                    .map(|v| (k.clone(), v.clone()))
            })
            .collect()
    }

    async fn patch(&self, key: &str, value: Option<&str>) -> Result<(), PatchError> {
        let (ns, name) = key.split_once('/').unwrap_or(("default", key));
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let body = serde_json::json!({ "metadata": { "annotations": { POD_ANNOTATION: value } } });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                tracing::debug!(
                    pod = key,
                    "pod gone; its NodePortLocal annotation needs nothing"
                );
                Ok(())
            }
            Err(source) => Err(PatchError {
                pod: key.to_owned(),
                source,
            }),
        }
    }
}

/// The patches that take the API from `published` to `want`: `(pod, Some(value))` to set,
/// `(pod, None)` to remove; pods whose value is unchanged are left out.
pub fn changes(
    published: &BTreeMap<String, String>,
    want: &BTreeMap<String, String>,
) -> Vec<(String, Option<String>)> {
    let set = want
        .iter()
        .filter(|(k, v)| published.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), Some(v.clone())));
    let remove = published
        .keys()
        .filter(|k| !want.contains_key(*k))
        .map(|k| (k.clone(), None));
    set.chain(remove).collect()
}

#[async_trait::async_trait]
impl StatusSink for KubeStatusSink {
    async fn publish_npl(&self, annotations: &BTreeMap<String, String>) -> Result<(), StatusError> {
        let mut guard = self.published.lock().await;
        let published = guard.get_or_insert_with(|| self.seen());
        let mut first_err = None;
        for (pod, value) in changes(published, annotations) {
            match self.patch(&pod, value.as_deref()).await {
                Ok(()) => {
                    tracing::debug!(pod = %pod, value = ?value, "NodePortLocal annotation patched");
                    match value {
                        Some(v) => published.insert(pod, v),
                        None => published.remove(&pod),
                    };
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(StatusError::Sink {
                sink: "Kubernetes pod annotations",
                source: Box::new(e),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_changed_pods_are_patched_and_gone_ones_removed() {
        let published = m(&[("d/a", "[1]"), ("d/b", "[2]"), ("d/c", "[3]")]);
        let want = m(&[("d/a", "[1]"), ("d/b", "[9]"), ("d/new", "[4]")]);
        assert_eq!(
            changes(&published, &want),
            vec![
                ("d/b".to_string(), Some("[9]".to_string())),
                ("d/new".to_string(), Some("[4]".to_string())),
                ("d/c".to_string(), None),
            ]
        );
        assert!(changes(&want, &want).is_empty());
        assert_eq!(
            changes(&want, &BTreeMap::new()).len(),
            3,
            "everything removed when NPL has nothing"
        );
    }
}
