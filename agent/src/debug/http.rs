//! The metrics and health endpoint (`metrics.bindAddress`):
//!
//! - `GET /metrics`: every metric of [`crate::metrics::Metrics`], the node gauges refreshed
//!   first: in the OpenMetrics text format when the client asks for it (Prometheus does, in
//!   its `Accept` header), else in Prometheus' text format 0.0.4 (curl, `promtool check
//!   metrics`), as the Go client does.
//! - `GET /livez`: 200 while the process answers (the kubelet restarts an agent that stops
//!   answering).
//! - `GET /readyz`: 200 once the CNI server serves requests, 503 with the reason before
//!   (what `TRY_AGAIN_LATER` tells the runtime).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::DebugContext;

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound (in use, not on this node).
    #[error("binding the metrics endpoint on {addr}")]
    Bind {
        /// `metrics.bindAddress`.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server stopped.
    #[error("serving the metrics endpoint")]
    Serve(#[source] std::io::Error),
}

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of Prometheus' text format.
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(State(ctx): State<DebugContext>, headers: HeaderMap) -> impl IntoResponse {
    ctx.refresh_metrics();
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        ([(header::CONTENT_TYPE, OPENMETRICS)], ctx.metrics.encode())
    } else {
        ([(header::CONTENT_TYPE, TEXT)], ctx.metrics.encode_text())
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(ctx): State<DebugContext>) -> (StatusCode, String) {
    match ctx.readiness() {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The routes, for [`serve`] and tests.
pub fn router(ctx: DebugContext) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(ctx)
}

/// Binds `addr` (so a bad address fails start-up, not a later scrape) and returns the
/// server's future.
pub async fn bind(
    addr: SocketAddr,
    ctx: DebugContext,
) -> Result<impl std::future::Future<Output = Result<(), HttpError>>, HttpError> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    Ok(async move { axum::serve(l, router(ctx)).await.map_err(HttpError::Serve) })
}
