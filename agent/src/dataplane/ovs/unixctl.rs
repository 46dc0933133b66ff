//! `ovs-vswitchd`'s control socket (unixctl, what `ovs-appctl` talks to): JSON-RPC 1.0 over a
//! unix stream socket, one request `{"id", "method", "params": [strings]}` and one reply
//! `{"id", "result": text}` or `{"id", "error": text}`, objects back to back with no framing.
//! Used for `ofproto/trace` and, for the userspace datapath (whose connection tracker lives in
//! vswitchd), to flush the conntrack entries of changed Service frontends; nothing on the CNI
//! path calls it.
//!
//! Where the socket is: OVS names it `<rundir>/ovs-vswitchd.<pid>.ctl`, the pid read from
//! `<rundir>/ovs-vswitchd.pid`; a daemon started with `--unixctl=<rundir>/ovs-vswitchd.ctl`
//! (as the test harness does) uses that name. The run directory is the backend's `ovs.runDir`,
//! where `<bridge>.mgmt` is too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long a command may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a control-socket command failed.
#[derive(Debug, thiserror::Error)]
pub enum UnixctlError {
    /// No control socket in the run directory.
    #[error(
        "no ovs-vswitchd control socket in {dir} (looked for ovs-vswitchd.<pid>.ctl from \
         ovs-vswitchd.pid, ovs-vswitchd.ctl, ovs-vswitchd.*.ctl): is ovs-vswitchd running with \
         this run directory (ovs.runDir)?"
    )]
    NotFound {
        /// The run directory.
        dir: PathBuf,
    },
    /// Connecting, writing or reading failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// No complete reply in time.
    #[error("{path}: no reply to {method} within {secs} s")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The command.
        method: String,
        /// The limit.
        secs: u64,
    },
    /// The reply is not what JSON-RPC says.
    #[error("{path}: malformed reply to {method}: {detail}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// The command.
        method: String,
        /// What is wrong.
        detail: String,
    },
    /// ovs-vswitchd answered with an error (a flow it cannot parse, an unknown bridge).
    #[error("ovs-vswitchd refused {method}: {message}")]
    Refused {
        /// The command.
        method: String,
        /// Its message.
        message: String,
    },
}

/// The control socket of the `ovs-vswitchd` whose run directory is `dir` (see the module doc).
pub fn control_socket(dir: &Path) -> Result<PathBuf, UnixctlError> {
    if let Ok(pid) = std::fs::read_to_string(dir.join("ovs-vswitchd.pid")) {
        let p = dir.join(format!("ovs-vswitchd.{}.ctl", pid.trim()));
        if p.exists() {
            return Ok(p);
        }
    }
    let fixed = dir.join("ovs-vswitchd.ctl");
    if fixed.exists() {
        return Ok(fixed);
    }
    // A pid file elsewhere: the newest per-pid socket.
    let newest = std::fs::read_dir(dir)
        .map_err(|e| UnixctlError::Io {
            op: "listing",
            path: dir.to_owned(),
            source: e,
        })?
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("ovs-vswitchd.") && n.ends_with(".ctl")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max();
    newest
        .map(|(_, p)| p)
        .ok_or_else(|| UnixctlError::NotFound {
            dir: dir.to_owned(),
        })
}

/// Runs `method` with `params` on the control socket `path`; its text result.
pub async fn call(path: &Path, method: &str, params: &[&str]) -> Result<String, UnixctlError> {
    match tokio::time::timeout(TIMEOUT, exchange(path, method, params)).await {
        Ok(r) => r,
        Err(_) => Err(UnixctlError::Timeout {
            path: path.to_owned(),
            method: method.to_owned(),
            secs: TIMEOUT.as_secs(),
        }),
    }
}

async fn exchange(path: &Path, method: &str, params: &[&str]) -> Result<String, UnixctlError> {
    let io = |op: &'static str| {
        let path = path.to_owned();
        move |source| UnixctlError::Io { op, path, source }
    };
    let mut s = UnixStream::connect(path)
        .await
        .map_err(io("connecting to"))?;
    let req = json!({"id": 0, "method": method, "params": params});
    s.write_all(req.to_string().as_bytes())
        .await
        .map_err(io("writing to"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut chunk).await.map_err(io("reading from"))?;
        if n == 0 {
            return Err(protocol(path, method, "connection closed before a reply"));
        }
        buf.extend_from_slice(&chunk[..n]);
        match serde_json::from_slice::<Value>(&buf) {
            Ok(v) => return reply(path, method, &v),
            Err(e) if e.is_eof() => continue,
            Err(e) => return Err(protocol(path, method, &e.to_string())),
        }
    }
}

fn protocol(path: &Path, method: &str, detail: &str) -> UnixctlError {
    UnixctlError::Protocol {
        path: path.to_owned(),
        method: method.to_owned(),
        detail: detail.to_owned(),
    }
}

/// The result of a reply, or its error.
fn reply(path: &Path, method: &str, v: &Value) -> Result<String, UnixctlError> {
    match (&v["error"], &v["result"]) {
        (Value::Null, Value::String(r)) => Ok(r.clone()),
        (Value::String(e), _) => Err(UnixctlError::Refused {
            method: method.to_owned(),
            message: e.trim_end().to_owned(),
        }),
        (e @ (Value::Object(_) | Value::Array(_)), _) => Err(UnixctlError::Refused {
            method: method.to_owned(),
            message: e.to_string(),
        }),
        _ => Err(protocol(
            path,
            method,
            &format!("neither result nor error: {v}"),
        )),
    }
}

/// `dpctl/flush-conntrack zone=<zone> ct_nw_dst=<ip>,ct_nw_proto=<proto>,ct_tp_dst=<port>`:
/// deletes the entries of `zone` whose original direction goes to `ip:port` over `proto`
/// (a partial tuple, as OVS 3.1 accepts).
pub async fn flush_conntrack_to(
    socket: &Path,
    zone: u16,
    ip: std::net::Ipv4Addr,
    proto: u8,
    port: u16,
) -> Result<(), UnixctlError> {
    let zone = format!("zone={zone}");
    let tuple = format!("ct_nw_dst={ip},ct_nw_proto={proto},ct_tp_dst={port}");
    call(socket, "dpctl/flush-conntrack", &[&zone, &tuple])
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_give_the_result_or_the_error() {
        let p = Path::new("/x.ctl");
        assert_eq!(
            reply(p, "m", &json!({"id": 0, "result": "Flow: ..."})).unwrap(),
            "Flow: ..."
        );
        let e = reply(
            p,
            "ofproto/trace",
            &json!({"id": 0, "error": "Bad openflow flow syntax: x\n"}),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "ovs-vswitchd refused ofproto/trace: Bad openflow flow syntax: x"
        );
        assert!(matches!(
            reply(p, "m", &json!({"id": 0})),
            Err(UnixctlError::Protocol { .. })
        ));
    }

    #[test]
    fn the_socket_is_found_by_pid_then_by_name() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            control_socket(d.path()),
            Err(UnixctlError::NotFound { .. })
        ));
        // Any per-pid socket, when the pid file is elsewhere.
        std::fs::write(d.path().join("ovs-vswitchd.77.ctl"), "").unwrap();
        assert_eq!(
            control_socket(d.path()).unwrap(),
            d.path().join("ovs-vswitchd.77.ctl")
        );
        // The fixed name (the harness's --unixctl) before a stray per-pid one.
        std::fs::write(d.path().join("ovs-vswitchd.ctl"), "").unwrap();
        assert_eq!(
            control_socket(d.path()).unwrap(),
            d.path().join("ovs-vswitchd.ctl")
        );
        // The pid file's socket first.
        std::fs::write(d.path().join("ovs-vswitchd.pid"), "1234\n").unwrap();
        std::fs::write(d.path().join("ovs-vswitchd.1234.ctl"), "").unwrap();
        assert_eq!(
            control_socket(d.path()).unwrap(),
            d.path().join("ovs-vswitchd.1234.ctl")
        );
    }

    #[tokio::test]
    async fn a_command_goes_out_as_json_rpc_and_the_reply_comes_back_in_pieces() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("ovs-vswitchd.ctl");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = c.read(&mut buf).await.unwrap();
            let req: Value = serde_json::from_slice(&buf[..n]).unwrap();
            // A reply split across writes, as a long trace arrives.
            let text =
                serde_json::to_string(&json!({"id": 0, "result": "a\nb", "error": null})).unwrap();
            let (a, b) = text.split_at(7);
            c.write_all(a.as_bytes()).await.unwrap();
            c.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.write_all(b.as_bytes()).await.unwrap();
            req
        });
        let got = call(&path, "ofproto/trace", &["br-int", "ip,in_port=1"])
            .await
            .unwrap();
        assert_eq!(got, "a\nb");
        let req = server.await.unwrap();
        assert_eq!(req["method"], "ofproto/trace");
        assert_eq!(req["params"], json!(["br-int", "ip,in_port=1"]));
    }
}
