//! ovs-vswitchd's control socket (`ovs-appctl`'s JSON-RPC over a Unix socket): the one
//! command ferrea needs there, flushing conntrack entries of the userspace datapath, whose
//! connection tracker lives in vswitchd (the kernel datapath's is the kernel's, flushed over
//! netlink by the service controller).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// What a control-socket command failed at.
#[derive(Debug, thiserror::Error)]
pub enum UnixctlError {
    /// No control socket found in the run directory.
    #[error(
        "no ovs-vswitchd control socket in {dir} (ovs-vswitchd.ctl, or ovs-vswitchd.<pid>.ctl from ovs-vswitchd.pid)"
    )]
    NoSocket {
        /// The run directory searched.
        dir: PathBuf,
    },
    /// Connecting, writing or reading.
    #[error("{method} on {socket}")]
    Io {
        /// The command.
        method: String,
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not JSON-RPC, or came too late.
    #[error("{method} on {socket}: bad or no answer: {detail}")]
    Protocol {
        /// The command.
        method: String,
        /// The socket.
        socket: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// vswitchd answered with an error.
    #[error("{method} {params:?}: ovs-vswitchd: {error}")]
    Failed {
        /// The command.
        method: String,
        /// Its arguments.
        params: Vec<String>,
        /// vswitchd's error text.
        error: String,
    },
}

/// The control socket of the ovs-vswitchd using `run_dir`: `ovs-vswitchd.ctl` if it was
/// started with that name (`--unixctl`), else `ovs-vswitchd.<pid>.ctl` after its pid file.
pub fn vswitchd_socket(run_dir: &Path) -> Result<PathBuf, UnixctlError> {
    let fixed = run_dir.join("ovs-vswitchd.ctl");
    if fixed.exists() {
        return Ok(fixed);
    }
    std::fs::read_to_string(run_dir.join("ovs-vswitchd.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .map(|pid| run_dir.join(format!("ovs-vswitchd.{pid}.ctl")))
        .filter(|p| p.exists())
        .ok_or_else(|| UnixctlError::NoSocket {
            dir: run_dir.to_owned(),
        })
}

/// Runs `method` with `params` on the control socket and returns vswitchd's answer text.
pub async fn call(socket: &Path, method: &str, params: &[String]) -> Result<String, UnixctlError> {
    let io = |source| UnixctlError::Io {
        method: method.to_owned(),
        socket: socket.to_owned(),
        source,
    };
    let proto = |detail: String| UnixctlError::Protocol {
        method: method.to_owned(),
        socket: socket.to_owned(),
        detail,
    };
    let req = json!({"id": 0, "method": method, "params": params}).to_string();
    let run = async {
        let mut s = UnixStream::connect(socket).await.map_err(io)?;
        s.write_all(req.as_bytes()).await.map_err(io)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                return Err(proto("connection closed".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => return Ok(v),
                Some(Err(e)) if e.is_eof() => continue,
                Some(Err(e)) => return Err(proto(e.to_string())),
                None => continue,
            }
        }
    };
    let v = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .map_err(|_| proto("timed out".into()))??;
    match &v["error"] {
        Value::Null => Ok(v["result"].as_str().unwrap_or_default().to_owned()),
        e => Err(UnixctlError::Failed {
            method: method.to_owned(),
            params: params.to_vec(),
            error: e.as_str().map_or_else(|| e.to_string(), str::to_owned),
        }),
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
    let params = vec![
        format!("zone={zone}"),
        format!("ct_nw_dst={ip},ct_nw_proto={proto},ct_tp_dst={port}"),
    ];
    call(socket, "dpctl/flush-conntrack", &params)
        .await
        .map(|_| ())
}
