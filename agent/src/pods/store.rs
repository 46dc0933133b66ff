//! The agent's crash-safe state store: one record per pod attachment, in an embedded redb
//! database under `stateDir`.
//!
//! The store is the source of truth for IPAM (which IP belongs to which container) and for
//! what the agent created for each pod (host interface, MACs, netns), so a restarted agent can
//! reconcile the kernel and the dataplane against it. redb commits are ACID with fsync
//! (`Durability::Immediate`), so a record is either fully present or absent after a crash.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Writes `bytes` to `path` so that a reader (or a crash) sees the old file or the new one,
/// never a part: a temporary file beside it, then a rename. Creates the directory. For the
/// small JSON files kept next to the database (status views, records of addresses).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Attachments keyed by `<container_id>/<ifname>`; values are JSON [`PodRecord`]s.
const PODS: TableDefinition<&str, &[u8]> = TableDefinition::new("pods/v1");

/// NodePortLocal mappings keyed by [`NplMapping::key`]; values are JSON [`NplMapping`]s. Kept
/// so that a restarted agent gives every pod port the node port it had.
const NPL: TableDefinition<&str, &[u8]> = TableDefinition::new("npl/v1");

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("opening state store {}: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// The database's (or the file system's) error.
        #[source]
        source: Box<redb::Error>,
    },
    /// A read or write of the database failed.
    #[error("state store {op}: {source}")]
    Db {
        /// What was being done (`put`, `delete`, `list`, `npl list`, `npl update`).
        op: &'static str,
        /// The database's error.
        #[source]
        source: Box<redb::Error>,
    },
    /// An entry could not be encoded as JSON.
    #[error("state store encode: {what} {key}: {source}")]
    Encode {
        /// The kind of entry (`record`, `NPL mapping`).
        what: &'static str,
        /// Its key.
        key: String,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored entry does not decode (it is reported, not skipped).
    #[error("state store decode: {what} {key}: {source}")]
    Decode {
        /// The kind of entry (`record`, `NPL mapping`).
        what: &'static str,
        /// Its key.
        key: String,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The blocking task that ran the operation panicked or was cancelled.
    #[error("state store {op}: {source}")]
    Task {
        /// What was being done.
        op: &'static str,
        /// The task's error.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Maps a database error of operation `op`.
fn db_err<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Db {
        op,
        source: Box::new(e.into()),
    }
}

/// What the agent holds for one pod attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_IFNAME: the interface name inside the pod.
    pub ifname: String,
    /// The allocated address.
    pub ip: Ipv4Addr,
    /// Prefix length of the pod CIDR the address came from.
    pub prefix_len: u8,
    /// The pod's gateway.
    pub gateway: Ipv4Addr,
    /// CNI_NETNS at ADD time.
    pub netns: String,
    /// Host-side veth name.
    pub host_ifname: String,
    /// Host-side veth MAC.
    pub host_mac: [u8; 6],
    /// Pod interface MAC.
    pub pod_mac: [u8; 6],
    /// Kubernetes namespace of the pod, from CNI_ARGS (may be empty outside Kubernetes).
    #[serde(default)]
    pub pod_namespace: String,
    /// Kubernetes name of the pod, from CNI_ARGS (may be empty outside Kubernetes).
    #[serde(default)]
    pub pod_name: String,
}

impl PodRecord {
    /// The store key of this record.
    pub fn key(&self) -> String {
        key(&self.container_id, &self.ifname)
    }
}

/// The store key of an attachment.
pub fn key(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

/// One NodePortLocal mapping: `nodeIP:node_port/protocol` is DNATed to `pod_ip:pod_port`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NplMapping {
    /// The pod, `namespace/name`.
    pub pod: String,
    /// The pod's port.
    pub pod_port: u16,
    /// `tcp` or `udp`.
    pub protocol: crate::source::Protocol,
    /// The pod's IP when the mapping was last written.
    pub pod_ip: Ipv4Addr,
    /// The node port.
    pub node_port: u16,
}

impl NplMapping {
    /// The store key: `<pod>/<podPort>/<protocol>` (one node port per pod port and protocol).
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.pod, self.pod_port, self.protocol.as_str())
    }
}

/// The embedded state store. Safe to share between tasks; writes are serialised by redb.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("ferrea.redb");
        let open_err = |e: redb::Error| StoreError::Open {
            path: path.clone(),
            source: Box::new(e),
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.into()))?;
        let db = Database::create(&path).map_err(|e| open_err(e.into()))?;
        // Make sure the table exists so readers never see "table does not exist".
        let tx = db.begin_write().map_err(|e| open_err(e.into()))?;
        tx.open_table(PODS).map_err(|e| open_err(e.into()))?;
        tx.open_table(NPL).map_err(|e| open_err(e.into()))?;
        tx.commit().map_err(|e| open_err(e.into()))?;
        Ok(Self { db })
    }

    /// Inserts or replaces a record; durable when this returns.
    pub fn put(&self, rec: &PodRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(rec).map_err(|source| StoreError::Encode {
            what: "record",
            key: rec.key(),
            source,
        })?;
        let tx = self.db.begin_write().map_err(db_err("put"))?;
        {
            let mut t = tx.open_table(PODS).map_err(db_err("put"))?;
            t.insert(rec.key().as_str(), value.as_slice())
                .map_err(db_err("put"))?;
        }
        tx.commit().map_err(db_err("put"))
    }

    /// Removes the records with these keys in one transaction; absent keys are ignored.
    pub fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err("delete"))?;
        {
            let mut t = tx.open_table(PODS).map_err(db_err("delete"))?;
            for k in keys {
                t.remove(k.as_str()).map_err(db_err("delete"))?;
            }
        }
        tx.commit().map_err(db_err("delete"))
    }

    /// All records. A record that does not decode is reported, not silently skipped.
    pub fn list(&self) -> Result<Vec<PodRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err("list"))?;
        let t = tx.open_table(PODS).map_err(db_err("list"))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err("list"))? {
            let (k, v) = item.map_err(db_err("list"))?;
            let rec: PodRecord =
                serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                    what: "record",
                    key: k.value().to_owned(),
                    source,
                })?;
            out.push(rec);
        }
        Ok(out)
    }
}

impl Store {
    /// All NodePortLocal mappings. One that does not decode is reported, not skipped.
    pub fn npl_list(&self) -> Result<Vec<NplMapping>, StoreError> {
        const OP: &str = "npl list";
        let tx = self.db.begin_read().map_err(db_err(OP))?;
        let t = tx.open_table(NPL).map_err(db_err(OP))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err(OP))? {
            let (k, v) = item.map_err(db_err(OP))?;
            let m: NplMapping =
                serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                    what: "NPL mapping",
                    key: k.value().to_owned(),
                    source,
                })?;
            out.push(m);
        }
        Ok(out)
    }

    /// Writes `put` and removes the mappings with keys `delete`, in one durable transaction.
    pub fn npl_update(&self, put: &[NplMapping], delete: &[String]) -> Result<(), StoreError> {
        const OP: &str = "npl update";
        let tx = self.db.begin_write().map_err(db_err(OP))?;
        {
            let mut t = tx.open_table(NPL).map_err(db_err(OP))?;
            for k in delete {
                t.remove(k.as_str()).map_err(db_err(OP))?;
            }
            for m in put {
                let v = serde_json::to_vec(m).map_err(|source| StoreError::Encode {
                    what: "NPL mapping",
                    key: m.key(),
                    source,
                })?;
                t.insert(m.key().as_str(), v.as_slice())
                    .map_err(db_err(OP))?;
            }
        }
        tx.commit().map_err(db_err(OP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(cid: &str, ip: [u8; 4]) -> PodRecord {
        PodRecord {
            container_id: cid.into(),
            ifname: "eth0".into(),
            ip: ip.into(),
            prefix_len: 24,
            gateway: [10, 0, 0, 1].into(),
            netns: "/run/netns/x".into(),
            host_ifname: "fe0".into(),
            host_mac: [2, 0, 0, 0, 0, 1],
            pod_mac: [2, 0, 0, 0, 0, 2],
            pod_namespace: "default".into(),
            pod_name: "p".into(),
        }
    }

    #[test]
    fn records_survive_reopen_and_delete_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put(&rec("a", [10, 0, 0, 2])).unwrap();
            s.put(&rec("b", [10, 0, 0, 3])).unwrap();
            s.put(&rec("b", [10, 0, 0, 4])).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let mut l = s.list().unwrap();
        l.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].ip, Ipv4Addr::new(10, 0, 0, 4));
        s.delete(&[key("a", "eth0"), key("zz", "eth0")]).unwrap();
        s.delete(&[key("a", "eth0")]).unwrap();
        assert_eq!(s.list().unwrap().len(), 1);
    }

    #[test]
    fn npl_mappings_survive_reopen_and_update_replaces_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let m = |pod: &str, port, node_port| NplMapping {
            pod: pod.into(),
            pod_port: port,
            protocol: crate::source::Protocol::Tcp,
            pod_ip: Ipv4Addr::new(10, 0, 0, 2),
            node_port,
        };
        {
            let s = Store::open(dir.path()).unwrap();
            s.npl_update(&[m("default/a", 80, 61000), m("default/b", 80, 61001)], &[])
                .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.npl_list().unwrap().len(), 2);
        s.npl_update(&[m("default/a", 80, 61005)], &[m("default/b", 80, 0).key()])
            .unwrap();
        assert_eq!(s.npl_list().unwrap(), vec![m("default/a", 80, 61005)]);
        // Pod records are untouched by NPL updates.
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn undecodable_record_error_names_the_key_and_keeps_the_json_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let tx = s.db.begin_write().unwrap();
        tx.open_table(PODS)
            .unwrap()
            .insert("c1/eth0", b"{not json".as_slice())
            .unwrap();
        tx.commit().unwrap();
        let e = s.list().unwrap_err();
        assert!(
            matches!(&e, StoreError::Decode { what: "record", key, .. } if key == "c1/eth0"),
            "{e:?}"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert!(
            e.to_string()
                .starts_with("state store decode: record c1/eth0: "),
            "{e}"
        );
        // A directory where the database file should be: the open error names the file.
        let bad = tempfile::tempdir().unwrap();
        std::fs::create_dir(bad.path().join("ferrea.redb")).unwrap();
        let e = Store::open(bad.path()).err().unwrap();
        assert!(
            matches!(&e, StoreError::Open { path, .. } if path.ends_with("ferrea.redb")),
            "{e:?}"
        );
    }
}
