//! Forwards one CNI request to the agent over gRPC on its unix socket.
//!
//! One connection per process: the binary runs once per CNI call. Failing to connect means the
//! agent is not running (yet), which the runtime should retry, so it maps to `TRY_AGAIN_LATER`
//! (11), or for STATUS to `PLUGIN_NOT_AVAILABLE` (50) as the spec's STATUS section asks. Errors the
//! agent reports in `CniResponse.error` pass through with their code; a bare gRPC status (the
//! agent failed before producing a CNI answer) becomes `INTERNAL` (999).

use std::path::PathBuf;
use std::time::Duration;

use ferrea_proto::cni::v1::cni_client::CniClient;
use ferrea_proto::cni::v1::{CniRequest, ErrorCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};
use tower::service_fn;

use crate::env::Command;
use crate::error::CniError;

/// How long the plugin waits for the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting to the socket and the HTTP/2 handshake. Default 2 s: a live agent accepts at once.
    pub connect: Duration,
    /// The whole RPC once connected. Default 60 s: an ADD may wait for the per-container lock
    /// behind a slow DEL of the same sandbox. Runtimes usually allow minutes per call.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(60),
        }
    }
}

/// Sends `req` as `command` to the agent listening on `socket` and returns `CniResponse.result`
/// (empty for verbs without a result). Must run inside a tokio runtime with IO and time enabled.
///
/// VERSION is never forwarded; passing it is a caller bug and yields 999.
pub async fn forward(
    socket: &str,
    command: Command,
    req: CniRequest,
    timeouts: Timeouts,
) -> Result<Vec<u8>, CniError> {
    let path = PathBuf::from(socket);
    // The URI is a placeholder that tonic requires; the connector ignores it and dials the socket.
    let endpoint = Endpoint::try_from("http://[::]:50051")
        .map_err(|e| CniError::internal("building the gRPC endpoint").with_details(e.to_string()))?
        .connect_timeout(timeouts.connect);
    let channel = endpoint
        .connect_with_connector(service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| unreachable(command, socket, &e))?;

    let mut client = CniClient::new(channel);
    let call = async {
        match command {
            Command::Add => client.add(req).await,
            Command::Del => client.del(req).await,
            Command::Check => client.check(req).await,
            Command::Status => client.status(req).await,
            Command::Gc => client.gc(req).await,
            Command::Version => Err(tonic::Status::internal("VERSION is answered locally")),
        }
    };
    let resp = match tokio::time::timeout(timeouts.request, call).await {
        Ok(Ok(resp)) => resp.into_inner(),
        Ok(Err(status)) => {
            // PERMISSION_DENIED (the caller is not root), OUT_OF_RANGE (a message beyond the
            // agent's limit) and INVALID_ARGUMENT are the agent refusing this request, not
            // failing at it; the message says why either way.
            let verb = match status.code() {
                tonic::Code::PermissionDenied
                | tonic::Code::OutOfRange
                | tonic::Code::InvalidArgument => "refused",
                _ => "failed",
            };
            return Err(CniError::internal(format!(
                "ferrea-agent {verb} {}: {}",
                command.as_str(),
                status.message()
            ))
            .with_details(format!("gRPC status {:?}", status.code())));
        }
        Err(_) => {
            // The agent is alive but did not finish in time (stuck, or overloaded): transient.
            let code = unavailable_code(command);
            return Err(CniError::new(
                code,
                format!(
                    "ferrea-agent did not answer {} within {} s",
                    command.as_str(),
                    timeouts.request.as_secs_f64()
                ),
            ));
        }
    };
    if let Some(err) = resp.error {
        // Codes pass through verbatim (plugin-specific codes >= 100 included); an unset code
        // is an agent bug, reported as internal rather than as success.
        let code = u32::try_from(err.code)
            .ok()
            .filter(|c| *c != 0)
            .unwrap_or(999);
        return Err(CniError {
            code,
            msg: err.msg,
            details: err.details,
        });
    }
    Ok(resp.result)
}

/// The code for "the agent cannot serve this now".
fn unavailable_code(command: Command) -> ErrorCode {
    if command == Command::Status {
        ErrorCode::PluginNotAvailable
    } else {
        ErrorCode::TryAgainLater
    }
}

/// The error for a failed connection; the details carry the innermost IO error (`No such file or
/// directory`, `Connection refused`, a timeout) when there is one.
fn unreachable(command: Command, socket: &str, err: &tonic::transport::Error) -> CniError {
    let mut details = err.to_string();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            details = io.to_string();
        }
        source = e.source();
    }
    CniError::new(
        unavailable_code(command),
        format!("ferrea-agent is not running or not reachable at {socket}"),
    )
    .with_details(details)
}
