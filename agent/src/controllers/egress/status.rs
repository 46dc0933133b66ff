//! Where the Egress controller's status goes: an [`EgressStatusSink`] per source. The `files`
//! source's is [`LocalStatusView`] (`<stateDir>/status/egresses.json`, every Egress as this
//! node sees it); the `kubernetes` source's is [`super::kube_sink::KubeEgressStatusSink`]
//! (the `status` subresource of the Egress objects this node is responsible for, and of the
//! ExternalIPPools whose usage it reports).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::assign::Assignment;
use crate::source::DesiredState;

/// The Egress status as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct EgressStatuses {
    /// This node's name.
    pub node: String,
    /// An `EgressList` whose items carry Antrea's status fields (every Egress; `IPAssigned`
    /// is `Unknown` for the ones another node holds).
    pub list: Value,
    /// The `status.usage` of the ExternalIPPools this node reports (see [`pool_usage`]).
    pub pools: BTreeMap<String, PoolUsage>,
    /// Whether this node also writes the status of the Egresses no node holds (see
    /// [`reports_unheld`]).
    pub reports_unheld: bool,
    /// What the source last saw in each Egress's status, by name (empty with the `files`
    /// source, which has no status).
    pub observed: BTreeMap<String, Observed>,
}

/// An Egress's `status.egressIP` and `status.egressNode` as the source last saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// `status.egressIP`.
    pub ip: Option<Ipv4Addr>,
    /// `status.egressNode`.
    pub node: Option<String>,
}

impl Observed {
    /// Every Egress's, from the desired state.
    pub fn of(st: &DesiredState) -> BTreeMap<String, Observed> {
        st.egresses
            .values()
            .map(|e| {
                let o = Observed {
                    ip: e.recorded_ip,
                    node: e.recorded_node.clone(),
                };
                (e.name.clone(), o)
            })
            .collect()
    }

    /// Whether `status` (an Egress's status as a node wrote or read it) says what this does.
    pub fn agrees_with(&self, status: &Value) -> bool {
        let ip = status["egressIP"].as_str().and_then(|s| s.parse().ok());
        let node = status["egressNode"].as_str();
        ip == self.ip && node == self.node.as_deref()
    }
}

/// Whether `me` writes the status of the Egresses no node holds (no eligible node, no IP):
/// the first node of the cluster by name, so that exactly one node clears a status whose
/// holder is gone and says why none took it.
pub fn reports_unheld(st: &DesiredState, me: &str) -> bool {
    st.nodes.values().map(|n| n.name.as_str()).min() == Some(me)
}

/// An ExternalIPPool's `status.usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    /// Addresses in the pool's ranges.
    pub total: u64,
    /// Addresses given to Egresses.
    pub used: u64,
}

/// The usage of the pools this node reports: those whose first eligible node (by name) it is,
/// so that exactly one node writes each pool's usage. `used` counts the Egresses whose IP is
/// in the pool.
pub fn pool_usage(
    st: &DesiredState,
    assignments: &BTreeMap<String, Assignment>,
    me: &str,
) -> BTreeMap<String, PoolUsage> {
    st.pools
        .values()
        .filter(|p| {
            st.nodes
                .values()
                .filter(|n| p.node_selector.matches(&n.labels))
                .map(|n| n.name.as_str())
                .min()
                == Some(me)
        })
        .map(|p| {
            let used = assignments
                .values()
                .filter(|a| a.pool.as_deref() == Some(p.name.as_str()) && a.problem.is_none())
                .filter(|a| a.ip.is_some_and(|ip| p.contains(ip)))
                .count() as u64;
            let total = p.ranges.iter().map(|r| r.len()).sum();
            (p.name.clone(), PoolUsage { total, used })
        })
        .collect()
}

impl EgressStatuses {
    /// The Egresses this node is responsible for, with their status: the only ones whose
    /// status it writes to the API. Those whose `status.egressNode` is this node, and, when
    /// [`EgressStatuses::reports_unheld`], those with no `egressNode`.
    pub fn responsible(&self) -> BTreeMap<String, Value> {
        self.list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| match i["status"]["egressNode"].as_str() {
                Some(n) => n == self.node,
                None => self.reports_unheld,
            })
            .filter_map(|i| {
                let name = i["metadata"]["name"].as_str()?;
                Some((name.to_owned(), i["status"].clone()))
            })
            .collect()
    }
}

/// A status write that failed; the Egress runner retries it.
#[derive(Debug, thiserror::Error)]
pub enum EgressStatusError {
    /// The local status view could not be written.
    #[error("writing the Egress status view {}", path.display())]
    Local {
        /// The view's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or patching the status of one Egress in the API failed.
    #[error("{op} the status of Egress {egress}")]
    Api {
        /// `reading` or `patching`.
        op: &'static str,
        /// The Egress's name.
        egress: String,
        /// What the API said.
        #[source]
        source: kube::Error,
    },
    /// Reading or patching the status of one ExternalIPPool in the API failed.
    #[error("{op} the status of ExternalIPPool {pool}")]
    PoolApi {
        /// `reading` or `patching`.
        op: &'static str,
        /// The pool's name.
        pool: String,
        /// What the API said.
        #[source]
        source: kube::Error,
    },
}

/// Where the Egress status goes (see the module doc). Called when the status changed, and
/// again after a failure (the runner retries the pass that returned it).
#[async_trait::async_trait]
pub trait EgressStatusSink: Send + Sync {
    /// Publishes what this node reports of `statuses`.
    async fn publish_egresses(&self, statuses: &EgressStatuses) -> Result<(), EgressStatusError>;

    /// Whether the last publish held a write back on purpose (not a failure): the runner's
    /// next resync publishes again.
    fn held_back(&self) -> bool {
        false
    }
}

/// The `files` source's sink: the whole `EgressList` in `<stateDir>/status/egresses.json`
/// (pool usage is not part of it).
pub struct LocalStatusView {
    path: PathBuf,
}

impl LocalStatusView {
    /// The view under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("status").join("egresses.json"),
        }
    }
}

#[async_trait::async_trait]
impl EgressStatusSink for LocalStatusView {
    async fn publish_egresses(&self, statuses: &EgressStatuses) -> Result<(), EgressStatusError> {
        super::write_atomic(&self.path, &statuses.list).map_err(|source| EgressStatusError::Local {
            path: self.path.clone(),
            source,
        })
    }
}
