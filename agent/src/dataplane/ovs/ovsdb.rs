//! A small typed OVSDB client (RFC 7047 JSON-RPC over the unix socket `db.sock`).
//!
//! Why not a crate: the two on crates.io are 0.0.x work in progress (`ovsdb` 0.0.6 needs
//! generated models and has no reconnect; `ovsdb-client` 0.0.1 pulls in jsonrpsee and has
//! neither reconnect nor typed per-operation errors). The agent needs four things only:
//! `transact` (the whole change in one transaction), waiting for `Interface.ofport` (the
//! `wait` operation), answering the server's `echo` keepalives, and reconnecting with backoff.
//! That is this module, about 300 lines.
//!
//! Owns: the socket and the JSON-RPC framing. It knows nothing of bridges or ports (the
//! backend builds the operations), and it never spawns `ovs-vsctl`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;

/// The database every operation of this client addresses.
pub const DB: &str = "Open_vSwitch";

/// Errors of the OVSDB client; each names the operation it was doing.
#[derive(Debug, thiserror::Error)]
pub enum OvsdbError {
    /// Could not connect to the server, even after retries.
    #[error("ovsdb {op}: connect {path}: {source}")]
    Connect {
        /// Operation.
        op: &'static str,
        /// The socket.
        path: PathBuf,
        /// Cause of the last attempt.
        #[source]
        source: std::io::Error,
    },
    /// Writing the request failed.
    #[error("ovsdb {op}: write: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection closed before the reply arrived (the next call reconnects).
    #[error("ovsdb {op}: connection closed")]
    Closed {
        /// Operation.
        op: &'static str,
    },
    /// No reply in time.
    #[error("ovsdb {op}: no reply within {0:?}", REPLY_TIMEOUT)]
    Timeout {
        /// Operation.
        op: &'static str,
    },
    /// The server answered the JSON-RPC call with an error.
    #[error("ovsdb {op}: {error}")]
    Rpc {
        /// Operation.
        op: &'static str,
        /// The error object, as JSON.
        error: String,
    },
    /// One operation of a transaction failed, so none took effect.
    #[error("ovsdb {op}: operation {index} ({what}) failed: {error}: {details}")]
    OpFailed {
        /// Operation.
        op: &'static str,
        /// Index of the failed operation in the transaction.
        index: usize,
        /// The failed operation's `op` and `table`.
        what: String,
        /// RFC 7047 error string (`timed out`, `constraint violation`, ...).
        error: String,
        /// The server's details.
        details: String,
    },
    /// The reply did not have the shape RFC 7047 gives it.
    #[error("ovsdb {op}: unexpected reply: {msg}")]
    Protocol {
        /// Operation.
        op: &'static str,
        /// What was wrong.
        msg: String,
    },
}

impl OvsdbError {
    /// True if a `wait` operation of the transaction timed out (its condition never held).
    pub fn is_wait_timeout(&self) -> bool {
        matches!(self, OvsdbError::OpFailed { error, .. } if error == "timed out")
    }
}

/// How long a call waits for its reply (a `wait` operation inside may take its own timeout).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `conn` keeps retrying to connect before giving up.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

struct Conn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
}

/// What the OVS backend does on ovsdb-server: transactions on the `Open_vSwitch` database
/// (the backend builds the RFC 7047 operations: selects to read the bridge, port and
/// interface rows, inserts, updates and mutations to write them) and waiting for vswitchd to
/// number an interface.
///
/// Contract:
/// - a transaction is all-or-nothing: every operation takes effect or none does, and the
///   first failed one is reported as [`OvsdbError::OpFailed`] (a `wait` whose condition does
///   not hold fails with `timed out`, see [`OvsdbError::is_wait_timeout`]);
/// - idempotence is the caller's: the backend writes its transactions so that a repeat
///   converges (a `wait` for "no such row" guards each insert);
/// - a broken connection fails the calls in flight ([`OvsdbError::Closed`]); the next call
///   reconnects, with backoff, and is not replayed;
/// - safe to call concurrently from several tasks; transactions are serialised by the server.
///
/// Implementations: [`OvsdbClient`] (the server's unix socket) and, for tests,
/// `testing::ovs::FakeOvsdb` (an in-memory database that records every transaction).
#[async_trait::async_trait]
pub trait Ovsdb: Send + Sync {
    /// Runs `ops` as one transaction on [`DB`]: all of them take effect or none does. Returns
    /// one result object per operation. `op` names the transaction in errors.
    async fn transact(&self, op: &'static str, ops: Vec<Value>) -> Result<Vec<Value>, OvsdbError>;

    /// Waits until `Interface.ofport` of interface `name` is assigned by ovs-vswitchd and
    /// returns it; `Ok(None)` if vswitchd gave up on the interface (`ofport` -1) or did not
    /// assign one within `timeout`.
    async fn wait_ofport(&self, name: &str, timeout: Duration) -> Result<Option<i64>, OvsdbError> {
        // `wait` blocks server-side until the row no longer has an empty ofport, then the
        // `select` of the same transaction reads it: one round trip, no polling.
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let r = self
            .transact(
                "wait for ofport",
                vec![
                    json!({"op": "wait", "table": "Interface", "timeout": ms,
                        "where": [["name", "==", name]], "columns": ["ofport"],
                        "until": "!=", "rows": [{"ofport": ["set", []]}]}),
                    json!({"op": "select", "table": "Interface",
                        "where": [["name", "==", name]], "columns": ["ofport"]}),
                ],
            )
            .await;
        let r = match r {
            Err(e) if e.is_wait_timeout() => return Ok(None),
            r => r?,
        };
        let ofport = r[1]["rows"][0]["ofport"].as_i64();
        Ok(ofport.filter(|&p| p > 0))
    }
}

/// An OVSDB client. Connects lazily; reconnects with exponential backoff when the socket
/// broke (for instance ovsdb-server restarted). Safe to share between tasks.
pub struct OvsdbClient {
    path: PathBuf,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

#[async_trait::async_trait]
impl Ovsdb for OvsdbClient {
    async fn transact(&self, op: &'static str, ops: Vec<Value>) -> Result<Vec<Value>, OvsdbError> {
        OvsdbClient::transact(self, op, ops).await
    }
}

impl OvsdbClient {
    /// A client of the server listening on `path` (no I/O yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The live connection, connecting (with backoff) if there is none or it broke.
    async fn conn(&self, op: &'static str) -> Result<Arc<Conn>, OvsdbError> {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_ref().filter(|c| !c.closed.load(Ordering::Acquire)) {
            return Ok(c.clone());
        }
        let start = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(20);
        let stream = loop {
            match UnixStream::connect(&self.path).await {
                Ok(s) => break s,
                Err(source) if start.elapsed() >= CONNECT_DEADLINE => {
                    return Err(OvsdbError::Connect {
                        op,
                        path: self.path.clone(),
                        source,
                    });
                }
                Err(e) => {
                    tracing::debug!(path = %self.path.display(), error = %e, ?delay, "ovsdb connect failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        };
        let (rd, wr) = stream.into_split();
        let c = Arc::new(Conn {
            writer: tokio::sync::Mutex::new(wr),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(reader(rd, c.clone()));
        *g = Some(c.clone());
        Ok(c)
    }

    /// One JSON-RPC call; returns `result` or the error the server gave.
    pub async fn call(
        &self,
        op: &'static str,
        method: &str,
        params: Value,
    ) -> Result<Value, OvsdbError> {
        let c = self.conn(op).await?;
        let id = c.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            // Not after the reader gave up on this connection (it would never answer).
            let mut p = c.pending.lock().expect("pending lock");
            if c.closed.load(Ordering::Acquire) {
                return Err(OvsdbError::Closed { op });
            }
            p.insert(id, tx);
        }
        let mut line = serde_json::to_vec(&json!({"method": method, "params": params, "id": id}))
            .expect("json");
        line.push(b'\n');
        if let Err(source) = c.writer.lock().await.write_all(&line).await {
            c.closed.store(true, Ordering::Release);
            return Err(OvsdbError::Io { op, source });
        }
        let reply = match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
            Err(_) => {
                c.pending.lock().expect("pending lock").remove(&id);
                return Err(OvsdbError::Timeout { op });
            }
            Ok(Err(_)) => return Err(OvsdbError::Closed { op }),
            Ok(Ok(v)) => v,
        };
        match reply.get("error") {
            Some(e) if !e.is_null() => Err(OvsdbError::Rpc {
                op,
                error: e.to_string(),
            }),
            _ => Ok(reply.get("result").cloned().unwrap_or(Value::Null)),
        }
    }

    /// `echo`: a round trip to the server.
    pub async fn echo(&self) -> Result<(), OvsdbError> {
        self.call("echo", "echo", json!(["ferrea"]))
            .await
            .map(|_| ())
    }

    /// Runs `ops` as one transaction on [`DB`]: all of them take effect or none does. Returns
    /// one result object per operation; the first failed operation becomes
    /// [`OvsdbError::OpFailed`].
    pub async fn transact(
        &self,
        op: &'static str,
        ops: Vec<Value>,
    ) -> Result<Vec<Value>, OvsdbError> {
        let what: Vec<String> = ops
            .iter()
            .map(|o| {
                format!(
                    "{} {}",
                    o["op"].as_str().unwrap_or("?"),
                    o["table"].as_str().unwrap_or("")
                )
            })
            .collect();
        let mut params = vec![json!(DB)];
        params.extend(ops);
        let res = self.call(op, "transact", Value::Array(params)).await?;
        transact_results(op, &what, res)
    }
}

/// The results of a `transact` of the operations `what` (`"insert Port"`, ...): one object per
/// operation, or the first failed operation as [`OvsdbError::OpFailed`]; anything else the
/// server sent is [`OvsdbError::Protocol`].
pub fn transact_results(
    op: &'static str,
    what: &[String],
    res: Value,
) -> Result<Vec<Value>, OvsdbError> {
    let n = what.len();
    let Value::Array(results) = res else {
        return Err(OvsdbError::Protocol {
            op,
            msg: format!("transact result is not an array: {res}"),
        });
    };
    // RFC 7047 4.1.3: a failed operation's result has "error"; a failed commit adds one
    // result past the operations.
    for (index, r) in results.iter().enumerate() {
        if let Some(e) = r.get("error").and_then(Value::as_str) {
            return Err(OvsdbError::OpFailed {
                op,
                index,
                what: what.get(index).cloned().unwrap_or_else(|| "commit".into()),
                error: e.to_owned(),
                details: r
                    .get("details")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            });
        }
    }
    if results.len() < n {
        return Err(OvsdbError::Protocol {
            op,
            msg: format!("{} results for {n} operations", results.len()),
        });
    }
    Ok(results)
}

/// `["map", [[k, v], ...]]`.
pub fn map(pairs: &[(&str, &str)]) -> Value {
    Value::Array(vec![
        json!("map"),
        Value::Array(pairs.iter().map(|(k, v)| json!([k, v])).collect()),
    ])
}

/// `["set", [items]]`.
pub fn set(items: Vec<Value>) -> Value {
    json!(["set", items])
}

/// `["uuid", u]`.
pub fn uuid(u: &str) -> Value {
    json!(["uuid", u])
}

/// `["named-uuid", n]`.
pub fn named_uuid(n: &str) -> Value {
    json!(["named-uuid", n])
}

/// Reads an OVSDB map column (`["map", [[k, v], ...]]`) into a HashMap of strings.
pub fn parse_map(v: &Value) -> HashMap<String, String> {
    let mut m = HashMap::new();
    if let Some(pairs) = v.get(1).and_then(Value::as_array) {
        for p in pairs {
            if let (Some(k), Some(v)) = (p[0].as_str(), p[1].as_str()) {
                m.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    m
}

/// The UUID string of a `["uuid", u]` value.
pub fn parse_uuid(v: &Value) -> Option<String> {
    (v.get(0)?.as_str()? == "uuid")
        .then(|| v.get(1)?.as_str().map(str::to_owned))
        .flatten()
}

/// Splits complete JSON values off the front of `buf`; leaves an incomplete tail. ovsdb-server
/// does not delimit messages, so framing is "one JSON value after another".
pub fn split_values(buf: &mut Vec<u8>) -> Result<Vec<Value>, serde_json::Error> {
    let mut out = Vec::new();
    let mut used = 0;
    {
        let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
        loop {
            match it.next() {
                Some(Ok(v)) => {
                    out.push(v);
                    used = it.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => return Err(e),
                None => {
                    used = it.byte_offset();
                    break;
                }
            }
        }
    }
    buf.drain(..used);
    Ok(out)
}

/// Reader task: replies to waiters, answers `echo` requests (the server's keepalive; it drops
/// clients that do not answer), ignores notifications; on EOF marks the connection closed
/// and fails its waiters.
async fn reader(mut rd: tokio::net::unix::OwnedReadHalf, c: Arc<Conn>) {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 64 * 1024];
    'outer: loop {
        let n = match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let values = match split_values(&mut buf) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "ovsdb: undecodable message, dropping the connection");
                break;
            }
        };
        for v in values {
            if v.get("method").and_then(Value::as_str) == Some("echo") {
                let reply = json!({"id": v["id"], "result": v["params"], "error": null});
                let mut b = serde_json::to_vec(&reply).expect("json");
                b.push(b'\n');
                if c.writer.lock().await.write_all(&b).await.is_err() {
                    break 'outer;
                }
            } else if v.get("method").is_some() {
                // Notifications (update, locked, ...): this client registers no monitors.
            } else if let Some(id) = v.get("id").and_then(Value::as_u64)
                && let Some(tx) = c.pending.lock().expect("pending lock").remove(&id)
            {
                let _ = tx.send(v);
            }
        }
    }
    c.closed.store(true, Ordering::Release);
    c.pending.lock().expect("pending lock").clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    #[test]
    fn splits_concatenated_and_partial_values() {
        let mut b =
            br#"{"id":1,"result":[]}{"method":"echo","params":[],"id":"e"}{"id":2,"res"#.to_vec();
        let v = split_values(&mut b).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1]["method"], "echo");
        assert_eq!(b, br#"{"id":2,"res"#.to_vec());
        b.extend_from_slice(br#"ult":null}"#);
        assert_eq!(split_values(&mut b).unwrap()[0]["id"], 2);
        assert!(b.is_empty());
        let mut bad = b"}".to_vec();
        assert!(split_values(&mut bad).is_err());
    }

    #[test]
    fn map_helpers_round_trip() {
        let m = map(&[("a", "1"), ("b", "2")]);
        let p = parse_map(&m);
        assert_eq!(p["a"], "1");
        assert_eq!(p.len(), 2);
        assert_eq!(parse_uuid(&uuid("x")).as_deref(), Some("x"));
        assert_eq!(parse_uuid(&named_uuid("x")), None);
    }

    /// A private ovsdb-server on a fresh database in a temporary directory (no privileges
    /// needed, no network touched); killed by PID on drop.
    struct Server {
        child: Child,
        dir: tempfile::TempDir,
    }

    impl Server {
        fn start(dir: Option<tempfile::TempDir>) -> Option<Self> {
            let dir = match dir {
                Some(d) => d,
                None => {
                    let d = tempfile::tempdir().ok()?;
                    let ok = Command::new("ovsdb-tool")
                        .arg("create")
                        .arg(d.path().join("conf.db"))
                        .arg("/usr/share/openvswitch/vswitch.ovsschema")
                        .status()
                        .ok()?
                        .success();
                    if !ok {
                        return None;
                    }
                    d
                }
            };
            let p = dir.path();
            let child = Command::new("ovsdb-server")
                .arg(p.join("conf.db"))
                .arg(format!("--remote=punix:{}", p.join("db.sock").display()))
                .arg(format!("--unixctl={}", p.join("ovsdb.ctl").display()))
                .arg("--no-chdir")
                .env("OVS_RUNDIR", p)
                .env("OVS_DBDIR", p)
                .env("OVS_LOGDIR", p)
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()?;
            Some(Server { child, dir })
        }

        fn sock(&self) -> PathBuf {
            self.dir.path().join("db.sock")
        }

        fn stop(mut self) -> tempfile::TempDir {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_file(self.sock());
            let dir = tempfile::tempdir().unwrap();
            std::mem::replace(&mut self.dir, dir)
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test]
    async fn transact_wait_and_reconnect_against_ovsdb_server() {
        let Some(srv) = Server::start(None) else {
            println!("SKIP: ovsdb-server / ovsdb-tool not installed");
            return;
        };
        let db = OvsdbClient::new(srv.sock());
        db.echo().await.unwrap();
        // Initialise the root row and a bridge with a port in one transaction.
        let r = db
            .transact(
                "init",
                vec![
                    json!({"op": "insert", "table": "Interface", "row": {"name": "p1"}, "uuid-name": "i"}),
                    json!({"op": "insert", "table": "Port", "row": {"name": "p1", "interfaces": named_uuid("i")}, "uuid-name": "p"}),
                    json!({"op": "insert", "table": "Bridge", "row": {"name": "br0", "ports": named_uuid("p"),
                        "external_ids": map(&[("ferrea-round", "1")])}, "uuid-name": "b"}),
                    // Bridge is not a root table: unreferenced, it would be garbage-collected.
                    json!({"op": "insert", "table": "Open_vSwitch", "row": {"bridges": named_uuid("b")}}),
                ],
            )
            .await
            .unwrap();
        assert!(parse_uuid(&r[2]["uuid"]).is_some());
        // A failing op names itself and aborts everything.
        let e = db
            .transact(
                "dup",
                vec![
                    json!({"op": "insert", "table": "Interface", "row": {"name": "p2"}}),
                    json!({"op": "wait", "table": "Bridge", "timeout": 0, "where": [["name", "==", "br0"]],
                        "columns": ["name"], "until": "==", "rows": []}),
                ],
            )
            .await
            .unwrap_err();
        assert!(e.is_wait_timeout(), "{e}");
        assert!(e.to_string().contains("operation 1 (wait Bridge)"), "{e}");
        // No vswitchd: ofport never appears, the wait times out quietly.
        assert_eq!(
            db.wait_ofport("p1", Duration::from_millis(50))
                .await
                .unwrap(),
            None
        );
        // The server restarts on the same database: the next call reconnects by itself.
        let dir = srv.stop();
        assert!(db.echo().await.is_err());
        let srv = Server::start(Some(dir)).unwrap();
        db.echo().await.unwrap();
        let r = db
            .transact(
                "select",
                vec![json!({"op": "select", "table": "Bridge", "where": [["name", "==", "br0"]], "columns": ["external_ids"]})],
            )
            .await
            .unwrap();
        assert_eq!(
            parse_map(&r[0]["rows"][0]["external_ids"])["ferrea-round"],
            "1"
        );
        drop(srv);
    }
}
