//! A persistent OpenFlow 1.5 connection to a bridge's management socket
//! (`<OVS_RUNDIR>/<bridge>.mgmt`, a unix socket on which `ovs-vswitchd` accepts controllers
//! such as `ovs-ofctl`).
//!
//! Owns: the socket, transaction IDs, matching replies (and errors) to requests, answering
//! the switch's echo requests. One reader task per connection; writers share the write half
//! behind an async mutex so that a bundle of thousands of flow-mods goes out in one write.
//! When the socket breaks, every pending request fails with [`ConnError::Closed`] and
//! [`OfConn::is_closed`] turns true; reconnecting (and re-installing flows) is the owner's job.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;

use super::codec::{self, FlowMod, FlowStats, OfError, msg_type};

/// Errors of an OpenFlow connection, each naming the operation.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Connecting to the management socket failed.
    #[error("openflow connect {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The switch does not speak OpenFlow 1.5 on this socket (the bridge's `protocols`).
    #[error("openflow handshake with {path}: {msg}")]
    Handshake {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// The HELLO exchange failed on the socket.
    #[error("openflow handshake with {path}: {step}: {source}")]
    HandshakeIo {
        /// The socket.
        path: PathBuf,
        /// `send hello` or `read hello`.
        step: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing a request failed.
    #[error("openflow {op}: write: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection closed before the reply arrived.
    #[error("openflow {op}: connection closed")]
    Closed {
        /// Operation.
        op: &'static str,
    },
    /// No reply in time.
    #[error("openflow {op}: no reply within {timeout:?}")]
    Timeout {
        /// Operation.
        op: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// The switch answered with an OFPT_ERROR.
    #[error("openflow {op}: switch rejected it: {err}{}", detail.as_deref().map(|d| format!("; failing flow: {d}")).unwrap_or_default())]
    Rejected {
        /// Operation.
        op: &'static str,
        /// The error.
        err: OfError,
        /// For bundles: the error of the first failing message and the flow it carried.
        detail: Option<String>,
    },
    /// A reply could not be decoded.
    #[error("openflow {op}: {source}")]
    Decode {
        /// Operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: codec::DecodeError,
    },
}

/// What a request waits for.
type Reply = Result<Vec<Vec<u8>>, OfError>;

struct Waiter {
    tx: oneshot::Sender<Reply>,
    /// Multipart bodies collected so far.
    parts: Vec<Vec<u8>>,
}

struct Shared {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Mutex<HashMap<u32, Waiter>>,
    /// Errors for xids nobody waits on (messages inside a bundle): xid -> error.
    stray_errors: Mutex<HashMap<u32, OfError>>,
    next_xid: AtomicU32,
    next_bundle: AtomicU32,
    closed: AtomicBool,
}

/// An OpenFlow 1.5 connection. Cheap to clone; all clones share the socket.
#[derive(Clone)]
pub struct OfConn {
    shared: Arc<Shared>,
    path: PathBuf,
}

/// How long a request waits for its reply. Generous: a commit of 10k flows takes ~0.1 s.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

impl OfConn {
    /// Connects and negotiates OpenFlow 1.5 (HELLO with a version bitmap).
    pub async fn connect(path: &Path) -> Result<Self, ConnError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ConnError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (mut rd, mut wr) = stream.into_split();
        let hs = |msg: String| ConnError::Handshake {
            path: path.to_owned(),
            msg,
        };
        let mut b = Vec::new();
        codec::hello(0, &mut b);
        let hs_io = |step: &'static str| {
            move |source| ConnError::HandshakeIo {
                path: path.to_owned(),
                step,
                source,
            }
        };
        wr.write_all(&b).await.map_err(hs_io("send hello"))?;
        let (hdr, body) = tokio::time::timeout(Duration::from_secs(5), read_msg(&mut rd))
            .await
            .map_err(|_| hs("no hello from the switch".into()))?
            .map_err(hs_io("read hello"))?;
        if hdr[1] != msg_type::HELLO {
            return Err(hs(format!("expected HELLO, got type {}", hdr[1])));
        }
        // Either the switch's version is 1.5, or its bitmap (type 1) includes 1.5.
        let bitmap_ok = body.len() >= 8
            && u16::from_be_bytes([body[0], body[1]]) == 1
            && u32::from_be_bytes([body[4], body[5], body[6], body[7]])
                & (1 << codec::OFP15_VERSION)
                != 0;
        if hdr[0] != codec::OFP15_VERSION && !bitmap_ok {
            return Err(hs(format!(
                "switch offers version {:#x}, not OpenFlow 1.5 (set the bridge's protocols)",
                hdr[0]
            )));
        }
        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(wr),
            pending: Mutex::new(HashMap::new()),
            stray_errors: Mutex::new(HashMap::new()),
            next_xid: AtomicU32::new(1),
            next_bundle: AtomicU32::new(1),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(reader(rd, shared.clone()));
        Ok(Self {
            shared,
            path: path.to_owned(),
        })
    }

    /// The socket this connection uses.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once the socket has broken; a closed connection never recovers.
    pub fn is_closed(&self) -> bool {
        // (Also set by a failed write.)
        self.shared.closed.load(Ordering::Acquire)
    }

    fn xids(&self, n: u32) -> u32 {
        self.shared.next_xid.fetch_add(n, Ordering::Relaxed)
    }

    /// Registers a waiter for `xid` before the request is written (the reply may come first).
    fn wait_for(&self, xid: u32) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        let mut p = self.shared.pending.lock().expect("pending lock");
        // The reader sets `closed` before it clears the waiters: a waiter registered after
        // that would never be answered, so it is dropped at once (the caller sees Closed).
        if !self.shared.closed.load(Ordering::Acquire) {
            p.insert(
                xid,
                Waiter {
                    tx,
                    parts: Vec::new(),
                },
            );
        }
        rx
    }

    async fn write(&self, op: &'static str, bytes: &[u8]) -> Result<(), ConnError> {
        if self.is_closed() {
            return Err(ConnError::Closed { op });
        }
        let mut w = self.shared.writer.lock().await;
        w.write_all(bytes).await.map_err(|source| {
            // The switch went away (EPIPE) before the reader saw EOF: same thing.
            self.shared.closed.store(true, Ordering::Release);
            ConnError::Io { op, source }
        })
    }

    async fn await_reply(
        &self,
        op: &'static str,
        xid: u32,
        rx: oneshot::Receiver<Reply>,
    ) -> Result<Vec<Vec<u8>>, ConnError> {
        let r = tokio::time::timeout(REPLY_TIMEOUT, rx).await;
        match r {
            Err(_) => {
                self.shared
                    .pending
                    .lock()
                    .expect("pending lock")
                    .remove(&xid);
                Err(ConnError::Timeout {
                    op,
                    timeout: REPLY_TIMEOUT,
                })
            }
            Ok(Err(_)) => Err(ConnError::Closed { op }),
            Ok(Ok(Err(err))) => Err(ConnError::Rejected {
                op,
                err,
                detail: None,
            }),
            Ok(Ok(Ok(parts))) => Ok(parts),
        }
    }

    /// Sends a request that has a reply and returns the reply bodies (one, or every part of
    /// a multipart reply, each without its OpenFlow and multipart headers).
    async fn request(
        &self,
        op: &'static str,
        encode: impl FnOnce(u32, &mut Vec<u8>),
    ) -> Result<Vec<Vec<u8>>, ConnError> {
        let xid = self.xids(1);
        let mut b = Vec::new();
        encode(xid, &mut b);
        let rx = self.wait_for(xid);
        self.write(op, &b).await?;
        self.await_reply(op, xid, rx).await
    }

    /// Round trip: ECHO_REQUEST / ECHO_REPLY.
    pub async fn echo(&self) -> Result<(), ConnError> {
        self.request("echo", |x, b| {
            codec::simple(msg_type::ECHO_REQUEST, x, &[], b)
        })
        .await
        .map(|_| ())
    }

    /// The datapath ID from FEATURES_REPLY.
    pub async fn datapath_id(&self) -> Result<u64, ConnError> {
        let r = self
            .request("features", |x, b| {
                codec::simple(msg_type::FEATURES_REQUEST, x, &[], b)
            })
            .await?;
        let body = r.first().map(Vec::as_slice).unwrap_or_default();
        if body.len() < 8 {
            return Err(ConnError::Decode {
                op: "features",
                source: codec::DecodeError::Truncated {
                    what: "features reply",
                    len: body.len(),
                },
            });
        }
        let mut a = [0u8; 8];
        a.copy_from_slice(&body[..8]);
        Ok(u64::from_be_bytes(a))
    }

    /// BARRIER: returns once the switch has processed everything sent before.
    pub async fn barrier(&self) -> Result<(), ConnError> {
        self.request("barrier", |x, b| {
            codec::simple(msg_type::BARRIER_REQUEST, x, &[], b)
        })
        .await
        .map(|_| ())
    }

    /// Applies `mods` atomically and in order in one OpenFlow 1.5 bundle: all of them take
    /// effect, or none does.
    ///
    /// Open vSwitch validates each add-message when it arrives and answers a bad one with an
    /// error under that message's xid, leaving it out of the bundle; committing then would
    /// apply the rest. So open, every add-message and a barrier go out in one write; once the
    /// barrier is answered every add error has arrived, and the bundle is committed only if
    /// there were none (else discarded). Two round trips in all.
    pub async fn bundle(&self, op: &'static str, mods: &[FlowMod]) -> Result<(), ConnError> {
        self.bundle_with(
            op,
            mods.len(),
            |i, x, b| mods[i].encode(x, b),
            |i| mods[i].to_ofctl(),
        )
        .await
    }

    /// [`OfConn::bundle`] of flow-mods and group-mods, in order.
    pub async fn bundle_msgs(
        &self,
        op: &'static str,
        msgs: &[codec::BundleMsg],
    ) -> Result<(), ConnError> {
        self.bundle_with(
            op,
            msgs.len(),
            |i, x, b| msgs[i].encode(x, b),
            |i| msgs[i].to_ofctl(),
        )
        .await
    }

    /// One bundle of `n` messages; `encode(i, xid, out)` appends message `i`, `detail(i)`
    /// names it in an error.
    async fn bundle_with(
        &self,
        op: &'static str,
        n_msgs: usize,
        encode: impl Fn(usize, u32, &mut Vec<u8>),
        detail: impl Fn(usize) -> String,
    ) -> Result<(), ConnError> {
        if n_msgs == 0 {
            return Ok(());
        }
        let id = self.shared.next_bundle.fetch_add(1, Ordering::Relaxed);
        let n = u32::try_from(n_msgs).unwrap_or(u32::MAX);
        let base = self.xids(n + 3);
        let (barrier, close) = (base + 1 + n, base + 2 + n);
        let flags = codec::BUNDLE_ATOMIC_ORDERED;
        // ~100 bytes per flow-mod; one allocation for the whole bundle.
        let mut b = Vec::with_capacity(64 + n_msgs * 128);
        codec::bundle_control(base, id, codec::bundle_ctrl::OPEN_REQUEST, flags, &mut b);
        for i in 0..n_msgs {
            codec::bundle_add(
                base + 1 + i as u32,
                id,
                flags,
                |x, o| encode(i, x, o),
                &mut b,
            );
        }
        codec::simple(msg_type::BARRIER_REQUEST, barrier, &[], &mut b);
        let open_rx = self.wait_for(base);
        let barrier_rx = self.wait_for(barrier);
        self.write(op, &b).await?;
        let opened = self.await_reply(op, base, open_rx).await;
        let fenced = self.await_reply(op, barrier, barrier_rx).await;
        // Errors of individual add-messages arrive with their own xids: name the first one.
        let first = {
            let mut stray = self.shared.stray_errors.lock().expect("stray lock");
            let mut first: Option<(u32, OfError)> = None;
            stray.retain(|&x, e| {
                if x > base && x < barrier {
                    if first.as_ref().is_none_or(|(fx, _)| x < *fx) {
                        first = Some((x, e.clone()));
                    }
                    false
                } else {
                    true
                }
            });
            first
        };
        opened?;
        fenced?;
        let ctrl = if first.is_some() {
            codec::bundle_ctrl::DISCARD_REQUEST
        } else {
            codec::bundle_ctrl::COMMIT_REQUEST
        };
        let mut b = Vec::new();
        codec::bundle_control(close, id, ctrl, flags, &mut b);
        let close_rx = self.wait_for(close);
        self.write(op, &b).await?;
        let closed = self.await_reply(op, close, close_rx).await;
        if let Some((x, err)) = first {
            let detail = Some(detail((x - base - 1) as usize));
            return Err(ConnError::Rejected { op, err, detail });
        }
        closed.map(|_| ())
    }

    /// Flows of `table` (or [`codec::TABLE_ALL`]) whose cookie matches under `mask`, with
    /// their counters.
    pub async fn dump_flows(
        &self,
        table: u8,
        cookie: u64,
        mask: u64,
    ) -> Result<Vec<FlowStats>, ConnError> {
        let parts = self
            .request("dump flows", |x, b| {
                codec::flow_desc_request(x, table, cookie, mask, b)
            })
            .await?;
        let mut out = Vec::new();
        for p in parts {
            out.extend(
                codec::decode_flow_desc(&p).map_err(|source| ConnError::Decode {
                    op: "dump flows",
                    source,
                })?,
            );
        }
        Ok(out)
    }
}

/// Reads one message: (8-byte header, body).
async fn read_msg(rd: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<([u8; 8], Vec<u8>)> {
    let mut hdr = [0u8; 8];
    rd.read_exact(&mut hdr).await?;
    let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    if len < 8 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("OpenFlow message length {len} < 8"),
        ));
    }
    let mut body = vec![0u8; len - 8];
    rd.read_exact(&mut body).await?;
    Ok((hdr, body))
}

/// The reader task: dispatches replies to waiters, answers echo requests, and on EOF or
/// error fails every waiter (dropping their senders) and marks the connection closed.
async fn reader(mut rd: tokio::net::unix::OwnedReadHalf, shared: Arc<Shared>) {
    loop {
        let Ok((hdr, body)) = read_msg(&mut rd).await else {
            break;
        };
        let xid = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        match hdr[1] {
            msg_type::ECHO_REQUEST => {
                // Keepalive from the switch: reply from here so it never waits on a caller.
                let mut b = Vec::new();
                codec::simple(msg_type::ECHO_REPLY, xid, &body, &mut b);
                if shared.writer.lock().await.write_all(&b).await.is_err() {
                    break;
                }
            }
            msg_type::ERROR => {
                let err = codec::decode_error(&body).unwrap_or(OfError { ty: 0, code: 0 });
                let w = shared.pending.lock().expect("pending lock").remove(&xid);
                match w {
                    Some(w) => {
                        let _ = w.tx.send(Err(err));
                    }
                    None => {
                        tracing::debug!(xid, %err, "openflow error for a message nobody waits on");
                        let mut s = shared.stray_errors.lock().expect("stray lock");
                        // Bounded: a bundle failure reports at most a few per bundle.
                        if s.len() < 1024 {
                            s.insert(xid, err);
                        }
                    }
                }
            }
            msg_type::MULTIPART_REPLY => {
                if body.len() < 8 {
                    continue;
                }
                let more = u16::from_be_bytes([body[2], body[3]]) & codec::MULTIPART_MORE != 0;
                let mut p = shared.pending.lock().expect("pending lock");
                if let Some(w) = p.get_mut(&xid) {
                    w.parts.push(body[8..].to_vec());
                    if !more {
                        let w = p.remove(&xid).expect("present");
                        let _ = w.tx.send(Ok(w.parts));
                    }
                }
            }
            _ => {
                let w = shared.pending.lock().expect("pending lock").remove(&xid);
                if let Some(w) = w {
                    let _ = w.tx.send(Ok(vec![body]));
                }
            }
        }
    }
    shared.closed.store(true, Ordering::Release);
    shared.pending.lock().expect("pending lock").clear();
}
