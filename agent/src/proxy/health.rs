//! The load balancers' health checks of `externalTrafficPolicy: Local` Services, answered as
//! kube-proxy answers them, so an external load balancer configured for kube-proxy (a cloud
//! provider's, MetalLB, Avi) sends only to the nodes that have an endpoint.
//!
//! One HTTP listener per [`HealthCheck`], on its `healthCheckNodePort` on every address of
//! the node. Every request (any path) gets a JSON body
//! `{"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": bool}`,
//! the header `X-Load-Balancing-Endpoint-Weight: N`, and status 200 when the node has a
//! ready endpoint and its proxy applied the last plan, else 503. The counts change in place
//! (a listener lives as long as its Service keeps the port), so a load balancer probing
//! during a change sees the old or the new count, never a closed port.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;

use super::HealthCheck;

/// A health check's port could not be listened on.
#[derive(Debug, thiserror::Error)]
#[error("listening on {addr} for the health checks of Service {namespace}/{name}")]
pub struct HealthBindError {
    /// The address.
    pub addr: SocketAddr,
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// Why (the port in use by another process, most often).
    #[source]
    pub source: std::io::Error,
}

/// What the listeners answer from.
#[derive(Debug, Default)]
struct Shared {
    checks: BTreeMap<u16, HealthCheck>,
    /// Whether the proxy applied the last plan (`serviceProxyHealthy`).
    healthy: bool,
}

/// The health-check listeners of a node (see the module doc). Dropping it closes them.
#[derive(Debug)]
pub struct HealthServer {
    bind_ip: Ipv4Addr,
    shared: Arc<RwLock<Shared>>,
    /// The listening tasks, by port.
    listeners: BTreeMap<u16, Listener>,
}

/// A listening task, aborted when dropped (its socket closes with it).
#[derive(Debug)]
struct Listener(tokio::task::JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl HealthServer {
    /// No listeners yet; they will listen on `bind_ip` (`0.0.0.0`: every address of the node,
    /// as kube-proxy does without `--nodeport-addresses`).
    pub fn new(bind_ip: Ipv4Addr) -> Self {
        HealthServer {
            bind_ip,
            shared: Arc::default(),
            listeners: BTreeMap::new(),
        }
    }

    /// Answers exactly `checks` from now on: their counts at once, a listener opened for each
    /// new port and closed for each port no longer in `checks`. The ports that could not be
    /// listened on are returned (the rest is served); a later call tries them again. Must be
    /// called within a Tokio runtime.
    pub fn sync(&mut self, checks: &[HealthCheck]) -> Vec<HealthBindError> {
        {
            let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
            shared.checks = checks.iter().map(|c| (c.port, c.clone())).collect();
        }
        self.listeners
            .retain(|port, _| checks.iter().any(|c| c.port == *port));
        let mut failed = Vec::new();
        for c in checks {
            if self.listeners.contains_key(&c.port) {
                continue;
            }
            let addr = SocketAddr::from((self.bind_ip, c.port));
            match listen(addr, self.shared.clone()) {
                Ok(l) => {
                    tracing::info!(%addr, service = %format_args!("{}/{}", c.namespace, c.name), "answering load-balancer health checks");
                    self.listeners.insert(c.port, l);
                }
                Err(source) => failed.push(HealthBindError {
                    addr,
                    namespace: c.namespace.clone(),
                    name: c.name.clone(),
                    source,
                }),
            }
        }
        failed
    }

    /// Sets `serviceProxyHealthy`: whether the last plan was applied.
    pub fn set_healthy(&self, healthy: bool) {
        self.shared
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .healthy = healthy;
    }

    /// The ports listened on, sorted.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }
}

/// Binds `addr` and serves it on a task.
fn listen(addr: SocketAddr, shared: Arc<RwLock<Shared>>) -> std::io::Result<Listener> {
    // std's listener sets SO_REUSEADDR, so a restarted agent binds again at once.
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let app = Router::new()
        .fallback(answer)
        .with_state((shared, addr.port()));
    Ok(Listener(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(%addr, error = %e, "health-check listener stopped");
        }
    })))
}

/// The weight header kube-proxy sends with the count.
const WEIGHT: HeaderName = HeaderName::from_static("x-load-balancing-endpoint-weight");

async fn answer(State((shared, port)): State<(Arc<RwLock<Shared>>, u16)>) -> impl IntoResponse {
    let (body, count, healthy) = {
        let shared = shared.read().unwrap_or_else(|e| e.into_inner());
        match shared.checks.get(&port) {
            Some(c) => (
                serde_json::json!({
                    "service": {"namespace": c.namespace, "name": c.name},
                    "localEndpoints": c.local_endpoints,
                    "serviceProxyHealthy": shared.healthy,
                }),
                c.local_endpoints,
                shared.healthy,
            ),
            // The Service left this port between the request and its listener closing.
            None => (serde_json::json!({"localEndpoints": 0}), 0, shared.healthy),
        }
    };
    let status = if count > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (WEIGHT, HeaderValue::from(count)),
        ],
        format!("{body:#}\n"),
    )
}

/// `GET path` on loopback `port`: the whole response, or the connection's error (for the
/// tests here and the service controller's).
#[cfg(test)]
pub(crate) async fn get_local(port: u16, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(port: u16, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            port,
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints,
        }
    }

    /// A port free on loopback right now.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn json_body(resp: &str) -> serde_json::Value {
        serde_json::from_str(resp.split_once("\r\n\r\n").unwrap().1).unwrap()
    }

    #[tokio::test]
    async fn answers_with_the_local_endpoints_and_follows_changes_in_place() {
        let port = free_port();
        let mut hs = HealthServer::new(Ipv4Addr::LOCALHOST);
        assert!(hs.sync(&[check(port, 2)]).is_empty());
        // Not healthy until the first plan is applied.
        let r = get_local(port, "/").await.unwrap();
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        hs.set_healthy(true);
        let r = get_local(port, "/healthz").await.unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let lower = r.to_ascii_lowercase();
        assert!(lower.contains("content-type: application/json"), "{r}");
        assert!(lower.contains("x-content-type-options: nosniff"), "{r}");
        assert!(lower.contains("x-load-balancing-endpoint-weight: 2"), "{r}");
        assert_eq!(
            json_body(&r),
            serde_json::json!({
                "service": {"namespace": "shop", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true,
            })
        );
        // The node's last endpoint goes: 503, same listener.
        assert!(hs.sync(&[check(port, 0)]).is_empty());
        let r = get_local(port, "/").await.unwrap();
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert_eq!(json_body(&r)["localEndpoints"], 0);
        // The Service goes: the port closes.
        assert!(hs.sync(&[]).is_empty());
        assert!(hs.ports().is_empty());
        let mut closed = false;
        for _ in 0..50 {
            if get_local(port, "/").await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(closed, "port {port} still answers");
    }

    #[tokio::test]
    async fn a_port_in_use_is_reported_and_tried_again() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut hs = HealthServer::new(Ipv4Addr::LOCALHOST);
        let failed = hs.sync(&[check(port, 1)]);
        assert_eq!(failed.len(), 1);
        let msg = format!("{}: {}", failed[0], failed[0].source);
        assert!(
            msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("shop/web"),
            "{msg}"
        );
        assert!(hs.ports().is_empty());
        drop(taken);
        assert!(hs.sync(&[check(port, 1)]).is_empty());
        assert_eq!(hs.ports(), vec![port]);
    }
}
