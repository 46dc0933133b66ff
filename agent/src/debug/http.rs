//! The metrics and health endpoint (`metrics.bindAddress`):
//!
//! - `GET /metrics`: every metric of [`crate::metrics::Metrics`] in the OpenMetrics text
//!   format Prometheus scrapes (`# EOF`-terminated), the node gauges refreshed first.
//! - `GET /livez`: 200 while the process answers (the kubelet restarts an agent that stops
//!   answering).
//! - `GET /readyz`: 200 once the CNI server serves requests, 503 with the reason before
//!   (what `TRY_AGAIN_LATER` tells the runtime).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
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

async fn metrics(State(ctx): State<DebugContext>) -> impl IntoResponse {
    ctx.refresh_metrics();
    ([(header::CONTENT_TYPE, OPENMETRICS)], ctx.metrics.encode())
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
