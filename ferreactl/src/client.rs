//! The connection to the agent's debug socket, and errors that say what to do.
//!
//! The socket is checked before gRPC gets it, so the common failures have their own words:
//! no socket (the agent is not running here, or another `debugSocket`), a socket nobody
//! listens on (the agent was killed), permission denied (not root), and a connection the
//! agent closed (its `SO_PEERCRED` check refused a non-root peer).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use ferrea_proto::debug::v1::debug_client::DebugClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

/// A connected client of the debug API.
pub struct Client {
    /// The generated client.
    pub api: DebugClient<Channel>,
    socket: PathBuf,
    timeout: Duration,
}

/// Why connecting to `socket` failed, in words an operator can act on.
fn explain(socket: &Path, e: &std::io::Error) -> anyhow::Error {
    let s = socket.display();
    match e.kind() {
        ErrorKind::NotFound => anyhow!(
            "no debug socket at {s}: ferrea-agent is not running on this node (or listens \
             elsewhere: pass --socket with the `debugSocket` of its config)"
        ),
        ErrorKind::ConnectionRefused => anyhow!(
            "ferrea-agent is not running: {s} exists but nothing listens on it (the agent was \
             killed or crashed); check its logs and restart it"
        ),
        ErrorKind::PermissionDenied => anyhow!(
            "permission denied on {s}: the debug API is root-only; run ferreactl as root \
             (for example with sudo)"
        ),
        _ => anyhow!("connecting to {s}: {e}"),
    }
}

impl Client {
    /// Connects to the agent's debug socket; every call then gives up after `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> anyhow::Result<Client> {
        let first = UnixStream::connect(socket)
            .await
            .map_err(|e| explain(socket, &e))?;
        // The connector hands tonic the stream opened above, and dials again only if tonic
        // reconnects.
        let first = Arc::new(Mutex::new(Some(first)));
        let path = socket.to_owned();
        let channel = Endpoint::try_from("http://[::]:50051")
            .context("building the gRPC endpoint")?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_with_connector(service_fn(move |_: Uri| {
                let path = path.clone();
                let first = first.lock().map(|mut f| f.take()).unwrap_or(None);
                async move {
                    let s = match first {
                        Some(s) => s,
                        None => UnixStream::connect(path).await?,
                    };
                    Ok::<_, std::io::Error>(TokioIo::new(s))
                }
            }))
            .await
            .map_err(|e| {
                anyhow!(
                    "ferrea-agent closed the connection on {} before answering ({e}): the debug \
                     API serves only root (uid 0); run ferreactl as root",
                    socket.display()
                )
            })?;
        Ok(Client {
            api: DebugClient::new(channel),
            socket: socket.to_owned(),
            timeout,
        })
    }

    /// Turns a failed call into an error naming the call and what to do.
    pub fn failed(&self, call: &str, s: tonic::Status) -> anyhow::Error {
        use tonic::Code;
        let transport = matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ) && !s.message().contains("not ready");
        // A non-root process that could open the socket (its mode was widened) is dropped by
        // the agent's SO_PEERCRED check before any answer: the connection just ends.
        if transport && !nix::unistd::Uid::effective().is_root() {
            return anyhow!(
                "{call}: ferrea-agent closed the connection on {}: the debug API serves only \
                 root (uid 0); run ferreactl as root",
                self.socket.display()
            );
        }
        match s.code() {
            Code::Unavailable if s.message().contains("not ready") => {
                anyhow!("{call}: {} (try again in a few seconds)", s.message())
            }
            Code::Unavailable | Code::Unknown | Code::Cancelled => anyhow!(
                "{call}: the agent stopped answering on {} ({}); is it still running?",
                self.socket.display(),
                s.message()
            ),
            Code::DeadlineExceeded => anyhow!(
                "{call}: no answer within {:?} (the agent is busy or stuck; --timeout allows longer)",
                self.timeout
            ),
            Code::Unimplemented => anyhow!(
                "{call}: this agent does not support it ({}); is it an older version than ferreactl?",
                s.message()
            ),
            _ => anyhow!("{call}: {}", s.message()),
        }
    }
}
