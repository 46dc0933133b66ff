//! The `files` source: a directory of Kubernetes-style manifests (`*.yaml`, `*.yml`, `*.json`),
//! watched for changes.
//!
//! The directory is polled every 200 ms by comparing each file's size and modification time.
//! Polling rather than inotify because ConfigMap volumes update through an atomic swap of a
//! `..data` symlink, which inotify reports on the link and not on the files behind it; a poll
//! of a handful of small files costs microseconds and reacts well within a second.
//!
//! A file that does not parse keeps its previous good objects (the agent loses nothing because
//! of a bad edit); an object that does not validate is left out and reported in
//! [`DesiredState::errors`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::DesiredState;
use super::error::FileError;
use super::manifest::{self, Object};

const POLL: Duration = Duration::from_millis(200);

type Fingerprint = BTreeMap<PathBuf, (u64, Option<SystemTime>)>;

/// Scans the directory into a fingerprint of its manifest files.
fn fingerprint(dir: &Path) -> Fingerprint {
    let mut fp = Fingerprint::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return fp;
    };
    for e in rd.flatten() {
        let p = e.path();
        let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
        if !matches!(ext, "yaml" | "yml" | "json") {
            continue;
        }
        // Follow symlinks (ConfigMap volumes), skip what vanished meanwhile.
        if let Ok(m) = std::fs::metadata(&p)
            && m.is_file()
        {
            fp.insert(p, (m.len(), m.modified().ok()));
        }
    }
    fp
}

/// The state built from the files, with per-file memory of the last good parse.
#[derive(Default)]
pub struct FilesState {
    per_file: BTreeMap<PathBuf, Vec<Object>>,
    file_errors: BTreeMap<PathBuf, FileError>,
    object_errors: BTreeMap<PathBuf, Vec<FileError>>,
}

impl FilesState {
    /// Re-reads the files in `fp`, keeping the last good objects of files that fail to parse.
    pub fn reload(&mut self, fp: &Fingerprint) {
        self.per_file.retain(|p, _| fp.contains_key(p));
        self.file_errors.clear();
        self.object_errors.clear();
        for p in fp.keys() {
            let text = match std::fs::read_to_string(p) {
                Ok(t) => t,
                Err(source) => {
                    self.file_errors.insert(
                        p.clone(),
                        FileError::Read {
                            path: p.clone(),
                            source,
                        },
                    );
                    continue;
                }
            };
            match manifest::decode(&text) {
                Ok((objs, errs)) => {
                    self.per_file.insert(p.clone(), objs);
                    if !errs.is_empty() {
                        let errs = errs
                            .into_iter()
                            .map(|source| FileError::Object {
                                path: p.clone(),
                                source,
                            })
                            .collect();
                        self.object_errors.insert(p.clone(), errs);
                    }
                }
                Err(source) => {
                    self.file_errors.insert(
                        p.clone(),
                        FileError::Decode {
                            path: p.clone(),
                            source,
                        },
                    );
                }
            }
        }
    }

    /// The errors of the last [`FilesState::reload`]: files that could not be read or parsed
    /// first, then rejected objects, each group in file order.
    pub fn errors(&self) -> impl Iterator<Item = &FileError> {
        self.file_errors
            .values()
            .chain(self.object_errors.values().flatten())
    }

    /// The desired state these files describe.
    pub fn desired(&self) -> DesiredState {
        let mut st = DesiredState::default();
        for objs in self.per_file.values() {
            for o in objs {
                st.insert(o.clone());
            }
        }
        st.errors.extend(self.errors().map(ToString::to_string));
        st
    }
}

/// Watches `dir` and publishes a new [`DesiredState`] whenever it changes. Returns the
/// receiver, already holding the state of the first scan.
pub fn spawn(dir: PathBuf) -> watch::Receiver<DesiredState> {
    let mut state = FilesState::default();
    let mut fp = fingerprint(&dir);
    state.reload(&fp);
    let first = state.desired();
    log_errors(&first, &DesiredState::default());
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        if !dir.is_dir() {
            tracing::warn!(path = %dir.display(), "manifest directory does not exist yet; waiting for it");
        }
        loop {
            tokio::time::sleep(POLL).await;
            let now = fingerprint(&dir);
            if now == fp {
                continue;
            }
            fp = now;
            state.reload(&fp);
            let next = state.desired();
            log_errors(&next, &tx.borrow());
            tx.send_if_modified(|cur| {
                if *cur != next {
                    *cur = next;
                    true
                } else {
                    false
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    rx
}

fn log_errors(next: &DesiredState, prev: &DesiredState) {
    for e in &next.errors {
        if !prev.errors.contains(e) {
            tracing::error!(error = %e, "manifest rejected");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_edit_keeps_previous_objects() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node.yaml");
        std::fs::write(
            &f,
            "kind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.1.0.0/24}\n",
        )
        .unwrap();
        let mut st = FilesState::default();
        st.reload(&fingerprint(dir.path()));
        assert_eq!(
            st.desired().nodes["n1"].pod_cidr.unwrap().to_string(),
            "10.1.0.0/24"
        );
        std::fs::write(&f, "kind: Node\n  metadata: [\n").unwrap();
        st.reload(&fingerprint(dir.path()));
        let d = st.desired();
        assert!(d.nodes.contains_key("n1"));
        assert_eq!(d.errors.len(), 1);
        assert!(d.errors[0].contains("node.yaml"), "{:?}", d.errors);
        std::fs::remove_file(&f).unwrap();
        st.reload(&fingerprint(dir.path()));
        assert!(st.desired().nodes.is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pool.yaml");
        std::fs::write(
            &f,
            "apiVersion: crd.antrea.io/v1beta1\nkind: ExternalIPPool\nmetadata: {name: p}\n\
             spec: {ipRanges: [{cidr: 10.9.0.0/33}]}\n---\n\
             kind: Node\nmetadata: {name: n1}\n",
        )
        .unwrap();
        let mut st = FilesState::default();
        st.reload(&fingerprint(dir.path()));
        let errs: Vec<&FileError> = st.errors().collect();
        assert_eq!(errs.len(), 1, "{errs:?}");
        let FileError::Object { path, source } = errs[0] else {
            panic!("{errs:?}")
        };
        assert_eq!(path, &f);
        assert_eq!(source.field(), Some("spec.ipRanges[0].cidr"));
        let d = st.desired();
        assert!(d.nodes.contains_key("n1"));
        assert_eq!(d.errors, vec![errs[0].to_string()]);
        // What the Egress controller picks out of the list.
        assert!(
            d.errors[0].starts_with(&format!("{}: ExternalIPPool p: field ", f.display())),
            "{:?}",
            d.errors
        );
        std::fs::write(&f, "kind: Node\n  metadata: [\n").unwrap();
        st.reload(&fingerprint(dir.path()));
        let errs: Vec<&FileError> = st.errors().collect();
        assert!(
            matches!(errs[..], [FileError::Decode { path, .. }] if path == &f),
            "{errs:?}"
        );
        assert!(
            errs[0]
                .to_string()
                .contains("pool.yaml: not valid YAML, keeping its previous content: "),
            "{}",
            errs[0]
        );
    }
}
