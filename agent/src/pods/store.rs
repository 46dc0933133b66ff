//! The agent's crash-safe state store: one record per pod attachment, in an embedded redb
//! database under `stateDir`.
//!
//! The store is the source of truth for IPAM (which IP belongs to which container) and for
//! what the agent created for each pod (host interface, MACs, netns), so a restarted agent can
//! reconcile the kernel and the dataplane against it. redb commits are ACID with fsync
//! (`Durability::Immediate`), so a record is either fully present or absent after a crash.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

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
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        // A full disk leaves part of the temporary file: nothing half-written stays.
        let _ = std::fs::remove_file(&tmp);
    }
    written
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
    /// The database file is damaged (as [`Store::open`] reports it; the agent rebuilds).
    #[error("state store {}: damaged: {found}", path.display())]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// What was found.
        found: String,
    },
    /// A read or write of the database failed.
    #[error("state store {op} ({}): {source}", path.display())]
    Db {
        /// What was being done (`put`, `delete`, `list`, `npl list`, `npl update`).
        op: &'static str,
        /// The database file.
        path: PathBuf,
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

/// The database file's name in `stateDir`.
pub const FILE: &str = "ferrea.redb";

/// The embedded state store. Safe to share between tasks; writes are serialised by redb.
///
/// After an I/O error (a full disk) redb fails every later operation until the database is
/// closed and opened again; the store does that itself on the next operation, so the agent
/// keeps serving once there is room again.
pub struct Store {
    path: PathBuf,
    db: RwLock<Option<Database>>,
}

/// What [`Store::open_or_rebuild`] found wrong with the database file, and what became of it.
#[derive(Debug)]
pub struct Damage {
    /// The database file.
    pub file: PathBuf,
    /// What was found, as the agent reports it.
    pub found: String,
    /// Where the damaged file was moved, kept for inspection.
    pub kept_at: PathBuf,
    /// Pod records read from the damaged file and written to the new one.
    pub salvaged_pods: usize,
    /// NodePortLocal mappings read from the damaged file and written to the new one.
    pub salvaged_npl: usize,
}

/// Why a database file could not be used: damaged (rebuild), or another failure (fatal).
enum OpenFailure {
    Damaged(String),
    Fatal(StoreError),
}

/// Whether a database error means the file's contents are damaged (rather than, say, that
/// the directory is not writable or another agent holds the file).
fn is_damage(e: &redb::Error) -> bool {
    match e {
        redb::Error::Corrupted(_) => true,
        redb::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
        ),
        _ => false,
    }
}

/// The message of a caught panic.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// Raw entries of both tables, as read from the file.
type RawEntries = (Vec<(String, Vec<u8>)>, Vec<(String, Vec<u8>)>);

fn raw_table(
    tx: &redb::ReadTransaction,
    t: TableDefinition<&str, &[u8]>,
) -> Result<Vec<(String, Vec<u8>)>, redb::Error> {
    let t = tx.open_table(t)?;
    let mut out = Vec::new();
    for item in t.iter()? {
        let (k, v) = item?;
        out.push((k.value().to_owned(), v.value().to_vec()));
    }
    Ok(out)
}

/// Decodes the entries of one table; the keys of those that do not decode go to `bad`.
fn decode_all<T: serde::de::DeserializeOwned>(
    raw: Vec<(String, Vec<u8>)>,
    what: &'static str,
    bad: &mut Vec<String>,
) -> Vec<T> {
    raw.into_iter()
        .filter_map(|(k, v)| match serde_json::from_slice(&v) {
            Ok(x) => Some(x),
            Err(e) => {
                bad.push(format!("{what} {k} does not decode ({e})"));
                None
            }
        })
        .collect()
}

impl Store {
    /// Opens (creating if needed) the store in `dir`. A damaged file is an error
    /// ([`StoreError::Damaged`]); the agent uses [`Self::open_or_rebuild`].
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(FILE);
        match Self::open_checked(&path) {
            Ok((store, _)) => Ok(store),
            Err(OpenFailure::Fatal(e)) => Err(e),
            Err(OpenFailure::Damaged(found)) => Err(StoreError::Damaged { path, found }),
        }
    }

    /// Opens the store in `dir`; if its file is damaged (truncated, emptied, overwritten, a
    /// record that does not decode), moves the file aside as `ferrea.redb.damaged-<unix
    /// time>`, starts a new one with every entry that could still be read, and says what it
    /// found. The caller then rebuilds the rest from the kernel
    /// ([`super::PodManager::reconcile_rebuilding`]).
    pub fn open_or_rebuild(dir: &Path) -> Result<(Self, Option<Damage>), StoreError> {
        let path = dir.join(FILE);
        let (found, salvage) = match Self::open_checked(&path) {
            Ok((store, None)) => return Ok((store, None)),
            // Opened, but some entries do not decode: keep the others.
            Ok((store, Some((found, pods, npl)))) => {
                drop(store);
                (found, Some((pods, npl)))
            }
            Err(OpenFailure::Damaged(found)) => (found, None),
            Err(OpenFailure::Fatal(e)) => return Err(e),
        };
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let kept_at = dir.join(format!("{FILE}.damaged-{secs}"));
        std::fs::rename(&path, &kept_at).map_err(|e| StoreError::Open {
            path: path.clone(),
            source: Box::new(redb::Error::Io(std::io::Error::new(
                e.kind(),
                format!("moving the damaged file to {}: {e}", kept_at.display()),
            ))),
        })?;
        let store = match Self::open_checked(&path) {
            Ok((store, _)) => store,
            Err(OpenFailure::Fatal(e)) => return Err(e),
            Err(OpenFailure::Damaged(found)) => return Err(StoreError::Damaged { path, found }),
        };
        let (pods, npl) = salvage.unwrap_or_default();
        for r in &pods {
            store.put(r)?;
        }
        store.npl_update(&npl, &[])?;
        let damage = Damage {
            file: path,
            found,
            kept_at,
            salvaged_pods: pods.len(),
            salvaged_npl: npl.len(),
        };
        Ok((store, Some(damage)))
    }

    /// Opens `path` with redb's integrity check and reads every entry once. `Ok` with
    /// `Some` when the file is sound but some entries do not decode: what was found and the
    /// entries that do.
    #[allow(clippy::type_complexity)]
    fn open_checked(
        path: &Path,
    ) -> Result<(Self, Option<(String, Vec<PodRecord>, Vec<NplMapping>)>), OpenFailure> {
        let fatal = |e: redb::Error| {
            OpenFailure::Fatal(StoreError::Open {
                path: path.to_owned(),
                source: Box::new(e),
            })
        };
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| fatal(e.into()))?;
        }
        // redb makes a new database in an empty file: one that was there and holds nothing
        // was truncated, and opening it as new would forget every pod.
        match std::fs::metadata(path) {
            Ok(m) if m.len() == 0 => {
                return Err(OpenFailure::Damaged("an empty file (0 bytes)".into()));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fatal(e.into())),
        }
        // The integrity check reports a file damaged outside redb as an error where a plain
        // open may panic; the panic is caught all the same.
        let opened = std::panic::catch_unwind(|| -> Result<(Database, RawEntries), redb::Error> {
            let db = Database::builder()
                .set_check_integrity_on_open(true)
                .create(path)?;
            let tx = db.begin_write()?;
            tx.open_table(PODS)?;
            tx.open_table(NPL)?;
            tx.commit()?;
            let raw = {
                let tx = db.begin_read()?;
                (raw_table(&tx, PODS)?, raw_table(&tx, NPL)?)
            };
            Ok((db, raw))
        });
        let (db, (pods, npl)) = match opened {
            Ok(Ok(x)) => x,
            Ok(Err(e)) if is_damage(&e) => return Err(OpenFailure::Damaged(e.to_string())),
            Ok(Err(e)) => return Err(fatal(e)),
            Err(p) => {
                return Err(OpenFailure::Damaged(format!(
                    "the database failed while reading it: {}",
                    panic_message(p.as_ref())
                )));
            }
        };
        let store = Self {
            path: path.to_owned(),
            db: RwLock::new(Some(db)),
        };
        let mut bad = Vec::new();
        let pods = decode_all(pods, "record", &mut bad);
        let npl = decode_all(npl, "NPL mapping", &mut bad);
        if bad.is_empty() {
            Ok((store, None))
        } else {
            Ok((store, Some((bad.join("; "), pods, npl))))
        }
    }

    /// Runs `f` on the database. After an I/O error redb fails every later operation with
    /// `PreviousIo` until the database is opened again: that is done here, and `f` retried
    /// once on the reopened database.
    fn run<T>(
        &self,
        op: &'static str,
        f: impl Fn(&Database) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let mut reopened = false;
        loop {
            let res = {
                let g = self.db.read().unwrap_or_else(PoisonError::into_inner);
                match g.as_ref() {
                    Some(db) => f(db),
                    None => Err(redb::Error::PreviousIo),
                }
            };
            match res {
                Err(redb::Error::PreviousIo | redb::Error::DatabaseClosed) if !reopened => {
                    reopened = true;
                    self.reopen().map_err(|e| self.db_err(op, e))?;
                }
                r => return r.map_err(|e| self.db_err(op, e)),
            }
        }
    }

    fn db_err(&self, op: &'static str, e: redb::Error) -> StoreError {
        StoreError::Db {
            op,
            path: self.path.clone(),
            source: Box::new(e),
        }
    }

    /// Closes the database and opens it again (redb repairs what a failed commit left).
    fn reopen(&self) -> Result<(), redb::Error> {
        let mut g = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // The old handle must be closed first: it holds the file's lock.
        if let Some(old) = g.take() {
            let _ = old.close();
        }
        let db = Database::create(&self.path)?;
        tracing::info!(path = %self.path.display(), "state store reopened after an I/O error");
        *g = Some(db);
        Ok(())
    }

    /// Inserts or replaces a record; durable when this returns.
    pub fn put(&self, rec: &PodRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(rec).map_err(|source| StoreError::Encode {
            what: "record",
            key: rec.key(),
            source,
        })?;
        let key = rec.key();
        self.run("put", |db| {
            let tx = db.begin_write()?;
            tx.open_table(PODS)?
                .insert(key.as_str(), value.as_slice())?;
            Ok(tx.commit()?)
        })
    }

    /// Removes the records with these keys in one transaction; absent keys are ignored.
    pub fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        self.run("delete", |db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(PODS)?;
                for k in keys {
                    t.remove(k.as_str())?;
                }
            }
            Ok(tx.commit()?)
        })
    }

    /// All records. A record that does not decode is reported, not silently skipped.
    pub fn list(&self) -> Result<Vec<PodRecord>, StoreError> {
        let raw = self.run("list", |db| raw_table(&db.begin_read()?, PODS))?;
        decode_strict(raw, "record")
    }

    /// All NodePortLocal mappings. One that does not decode is reported, not skipped.
    pub fn npl_list(&self) -> Result<Vec<NplMapping>, StoreError> {
        let raw = self.run("npl list", |db| raw_table(&db.begin_read()?, NPL))?;
        decode_strict(raw, "NPL mapping")
    }

    /// Writes `put` and removes the mappings with keys `delete`, in one durable transaction.
    pub fn npl_update(&self, put: &[NplMapping], delete: &[String]) -> Result<(), StoreError> {
        let mut values = Vec::with_capacity(put.len());
        for m in put {
            let v = serde_json::to_vec(m).map_err(|source| StoreError::Encode {
                what: "NPL mapping",
                key: m.key(),
                source,
            })?;
            values.push((m.key(), v));
        }
        self.run("npl update", |db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(NPL)?;
                for k in delete {
                    t.remove(k.as_str())?;
                }
                for (k, v) in &values {
                    t.insert(k.as_str(), v.as_slice())?;
                }
            }
            Ok(tx.commit()?)
        })
    }
}

/// Decodes every entry of one table; the first that does not decode is the error.
fn decode_strict<T: serde::de::DeserializeOwned>(
    raw: Vec<(String, Vec<u8>)>,
    what: &'static str,
) -> Result<Vec<T>, StoreError> {
    raw.into_iter()
        .map(|(key, v)| {
            serde_json::from_slice(&v).map_err(|source| StoreError::Decode { what, key, source })
        })
        .collect()
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

    /// Writes a raw value under `key` in the pods table, bypassing the encoder.
    fn put_raw(s: &Store, key: &str, value: &[u8]) {
        s.run("test", |db| {
            let tx = db.begin_write()?;
            tx.open_table(PODS)?.insert(key, value)?;
            Ok(tx.commit()?)
        })
        .unwrap();
    }

    /// A store in a fresh directory holding 40 records, closed again; returns the directory.
    fn filled() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for i in 0..40u8 {
            s.put(&rec(&format!("c{i:02}"), [10, 0, 1, i + 2])).unwrap();
        }
        dir
    }

    fn damaged_files(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".damaged-"))
            .collect()
    }

    #[test]
    fn an_emptied_file_is_damage_not_a_new_store() {
        let dir = filled();
        let file = dir.path().join(FILE);
        std::fs::File::create(&file).unwrap();
        let e = Store::open(dir.path()).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "state store {}: damaged: an empty file (0 bytes)",
                file.display()
            )
        );
        let (s, damage) = Store::open_or_rebuild(dir.path()).unwrap();
        let damage = damage.unwrap();
        assert_eq!(damage.found, "an empty file (0 bytes)");
        assert_eq!(damaged_files(dir.path()), vec![damage.kept_at.clone()]);
        assert!(s.list().unwrap().is_empty());
        // The new file is sound: the next open finds nothing wrong.
        drop(s);
        assert!(Store::open_or_rebuild(dir.path()).unwrap().1.is_none());
    }

    #[test]
    fn truncated_and_overwritten_files_are_found_and_set_aside() {
        for (what, damage) in [
            ("truncated to half", 0usize),
            ("header overwritten", 1),
            ("zeroed in the middle", 2),
        ] {
            let dir = filled();
            let file = dir.path().join(FILE);
            let mut bytes = std::fs::read(&file).unwrap();
            let len = bytes.len();
            match damage {
                0 => bytes.truncate(len / 2),
                1 => bytes[..64].fill(0x5a),
                _ => bytes[len / 4..len * 3 / 4].fill(0),
            }
            std::fs::write(&file, &bytes).unwrap();
            let (s, d) =
                Store::open_or_rebuild(dir.path()).unwrap_or_else(|e| panic!("{what}: {e}"));
            let d = d.unwrap_or_else(|| panic!("{what}: not found"));
            assert!(!d.found.is_empty(), "{what}");
            assert!(d.kept_at.exists(), "{what}");
            assert_eq!(
                std::fs::read(&d.kept_at).unwrap(),
                bytes,
                "{what}: kept as found"
            );
            // The new store works.
            s.put(&rec("new", [10, 0, 9, 9])).unwrap();
            assert_eq!(s.list().unwrap().len(), 1 + d.salvaged_pods, "{what}");
        }
    }

    #[test]
    fn records_that_still_decode_are_salvaged_from_a_file_with_a_bad_one() {
        let dir = filled();
        {
            let s = Store::open(dir.path()).unwrap();
            put_raw(&s, "bad/eth0", b"{\"containerId\":");
            s.npl_update(
                &[NplMapping {
                    pod: "default/a".into(),
                    pod_port: 80,
                    protocol: crate::source::Protocol::Tcp,
                    pod_ip: Ipv4Addr::new(10, 0, 1, 2),
                    node_port: 61000,
                }],
                &[],
            )
            .unwrap();
        }
        let (s, d) = Store::open_or_rebuild(dir.path()).unwrap();
        let d = d.unwrap();
        assert!(
            d.found.starts_with("record bad/eth0 does not decode ("),
            "{}",
            d.found
        );
        assert_eq!((d.salvaged_pods, d.salvaged_npl), (40, 1));
        assert_eq!(s.list().unwrap().len(), 40);
        assert_eq!(s.npl_list().unwrap().len(), 1);
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
        put_raw(&s, "c1/eth0", b"{not json");
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
