//! The agent's local APIs for people and monitoring, all read-only except the log filter:
//!
//! - [`service`]: the gRPC debug service `ferrea.debug.v1` that `ferreactl` talks to, on a
//!   root-only unix socket of its own (`debugSocket`; never the CNI socket). A connection
//!   whose peer is not root (`SO_PEERCRED`) is closed before any request is read, so a
//!   socket file made world-writable by mistake still exposes nothing.
//! - [`http`]: `/metrics` (Prometheus text format, from [`crate::metrics::Metrics`]),
//!   `/livez` and `/readyz` for the DaemonSet's probes.
//!
//! Both read what the running agent holds ([`DebugContext`]): the readiness the CNI server
//! answers with, the pod records and the dataplane through the pod manager, the desired
//! state, the Egress controller's views, and the NAT table's installed rules. Nothing here
//! is called by the controllers, the pod manager or the dataplane; the wiring starts it.

pub mod http;
pub mod service;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::watch;

use crate::cni::server::Readiness;
use crate::config::Config;
use crate::controllers::egress::EgressViews;
use crate::controllers::node::remote_nodes;
use crate::kernel::nftables::NatTable;
use crate::metrics::{Metrics, NodeGauges};
use crate::pods::PodManager;
use crate::source::DesiredState;

/// Why the log filter could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    /// The directives do not parse (`tracing_subscriber::EnvFilter` syntax:
    /// `info,ferrea_agent::cni=debug`).
    #[error("invalid log filter {filter:?}: {reason}")]
    Invalid {
        /// What was asked for.
        filter: String,
        /// The parser's message.
        reason: String,
    },
    /// This process has no reloadable filter (an embedded agent, a test).
    #[error("this agent's log filter cannot be changed at run time")]
    Unsupported,
    /// The subscriber refused the new filter.
    #[error("replacing the log filter: {0}")]
    Reload(String),
}

/// The agent's log filter at run time (the binary implements it on a
/// `tracing_subscriber::reload` handle). Safe to call from any task.
pub trait LogControl: Send + Sync {
    /// The filter in force, in `EnvFilter` syntax.
    fn filter(&self) -> String;
    /// Replaces the filter; on error the old one stays.
    fn set_filter(&self, directives: &str) -> Result<(), LogFilterError>;
}

/// The agent's most recent log output, kept in memory (at most `cap` bytes, cut at a line
/// start) for `ferreactl supportbundle`: a DaemonSet's agent logs to its container's
/// stderr, which nothing on the node may keep. A second `fmt` layer writes into it
/// ([`tracing_subscriber::fmt::MakeWriter`]). Cheap to clone.
#[derive(Clone, Debug)]
pub struct LogRing {
    buf: Arc<std::sync::Mutex<std::collections::VecDeque<u8>>>,
    cap: usize,
}

impl LogRing {
    /// A ring of `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            buf: Arc::default(),
            cap,
        }
    }

    /// What it holds, oldest first.
    pub fn snapshot(&self) -> Vec<u8> {
        let b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        b.iter().copied().collect()
    }
}

/// The writer of one log event into a [`LogRing`].
pub struct RingWriter(LogRing);

impl std::io::Write for RingWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut b = self.0.buf.lock().unwrap_or_else(|p| p.into_inner());
        b.extend(data);
        if b.len() > self.0.cap {
            // Drop whole lines from the front.
            let over = b.len() - self.0.cap;
            let cut = b
                .iter()
                .skip(over)
                .position(|c| *c == b'\n')
                .map_or(b.len(), |i| over + i + 1);
            b.drain(..cut);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogRing {
    type Writer = RingWriter;
    fn make_writer(&'a self) -> RingWriter {
        RingWriter(self.clone())
    }
}

/// The parts that exist once the node is up (set once by the wiring).
#[derive(Clone)]
pub struct Started {
    /// The pod manager (records, dataplane, store).
    pub pods: Arc<PodManager>,
    /// ferrea's nftables table (the NodePortLocal rules it loaded).
    pub nat: Arc<NatTable>,
}

/// What the debug API and the HTTP endpoints read. Cheap to clone.
#[derive(Clone)]
pub struct DebugContext {
    /// The configuration the agent runs with.
    pub cfg: Arc<Config>,
    /// When the process started.
    pub started_at: Instant,
    /// The CNI server's readiness.
    pub ready: watch::Receiver<Readiness>,
    /// The desired state.
    pub state: watch::Receiver<DesiredState>,
    /// Whether the source has delivered a complete state.
    pub synced: watch::Receiver<bool>,
    /// The node's parts once it is up.
    pub node: Arc<OnceLock<Started>>,
    /// The Egress controller's latest views.
    pub egress: EgressViews,
    /// The log filter, when the process has a reloadable one.
    pub log: Option<Arc<dyn LogControl>>,
    /// The recent log lines, when the process keeps them.
    pub recent_logs: Option<LogRing>,
    /// The metrics.
    pub metrics: Metrics,
    /// Where the metrics endpoint listens (`None`: off).
    pub metrics_address: Option<SocketAddr>,
}

impl DebugContext {
    /// `Ok` when the CNI server serves; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        match &*self.ready.borrow() {
            Readiness::Ready(_) => Ok(()),
            Readiness::Starting(why) => Err(why.clone()),
        }
    }

    /// Sets the node gauges of the metrics from what the agent holds now.
    pub fn refresh_metrics(&self) {
        let mut g = NodeGauges {
            ready: self.readiness().is_ok(),
            remote_nodes: remote_nodes(&self.state.borrow(), self.cfg.node_name()).len(),
            egress_ips_held: self.egress.get().2,
            ..NodeGauges::default()
        };
        if let Some(n) = self.node.get() {
            g.local_pods = n.pods.records().len();
            g.npl_mappings = n.pods.store().npl_list().map(|l| l.len()).unwrap_or(0);
        }
        self.metrics.set_node(g);
        self.metrics.set_source_synced(*self.synced.borrow());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_log_ring_keeps_the_last_whole_lines() {
        let r = LogRing::new(16);
        let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(&r);
        w.write_all(b"first line\n").unwrap();
        w.write_all(b"second\n").unwrap();
        w.write_all(b"third\n").unwrap();
        assert_eq!(r.snapshot(), b"second\nthird\n");
        w.write_all(b"a line longer than the ring\n").unwrap();
        assert!(r.snapshot().len() <= 16);
    }
}
