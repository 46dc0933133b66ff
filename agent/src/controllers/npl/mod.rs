//! NodePortLocal (NPL): every port of a local pod that an NPL-enabled Service targets is
//! reachable at `nodeIP:nodePort`, and the pod says so in Antrea's `nodeportlocal.antrea.io`
//! annotation, which external load balancers (Avi through AKO) read to send traffic straight to
//! the pods.
//!
//! The contract kept from Antrea:
//! - Services annotated `nodeportlocal.antrea.io/enabled: "true"` of type ClusterIP or
//!   LoadBalancer with a selector select pods of their namespace; the ports are the Service's
//!   `targetPort`s (a number, or the name of a container port of the pod with the same
//!   protocol); TCP and UDP (SCTP is not supported by NPL and is reported).
//! - One node port per (pod, pod port, protocol), from `nodePortLocal.portRange` (default
//!   61000-62000), never one that is in use on the node: like Antrea, the agent reserves each
//!   port by binding a socket of that protocol on `0.0.0.0:<port>` in its own (the node's)
//!   network namespace and keeps it open while the mapping exists, so no other process can
//!   take the port and a port somebody else holds is skipped. The sockets are bound, never
//!   listening: traffic to the port is DNATed before it could reach them.
//! - The annotation value is a compact JSON list of
//!   `{"podPort":N,"nodeIP":"…","nodePort":N,"protocol":"tcp","ipFamily":"IPv4"}`, one entry
//!   per mapping, sorted by pod port then protocol. A pod without mappings has no annotation.
//!
//! How it is built:
//! - [`desired_targets`] is a pure function from the desired state (Pods, Services) and this
//!   node's CNI attachments to the ports each local pod must expose. A local pod is an
//!   attachment ([`PodRecord`](crate::pods::store::PodRecord), which knows the pod's namespace, name and IP) joined with a Pod
//!   object of the same namespace/name whose `spec.nodeName` is unset or this node. The IP
//!   comes from the attachment: in `files` mode nothing else knows it.
//! - [`Allocator`] turns targets into [`NplMapping`]s, keeping every existing mapping's node
//!   port (stable across Service edits and pod IP changes), allocating new ones round-robin
//!   through the range (a freed port is not handed out again at once), and reserving them
//!   through a [`PortReserver`].
//! - Mappings are persisted in the state store, so a restarted agent re-reserves the same node
//!   ports for the same pod ports. At start ([`Allocator::restore`]) mappings outside the
//!   (possibly changed) range, or whose port another process took meanwhile, are dropped and
//!   re-allocated; mappings of pods that no longer exist are removed by the first pass. The
//!   port range is read from the configuration file at start, so "the range changed" means a
//!   restart with a new range: mappings outside it get new ports within a second of start,
//!   mappings inside it keep theirs.
//! - The DNAT rules live in ferrea's one nftables table ([`NatTable`]), re-rendered whole on
//!   every change, so no rule of a removed mapping survives. Once the rules are in,
//!   UDP conntrack entries of removed or moved mappings are deleted through a
//!   [`Conntrack`](crate::kernel::conntrack::Conntrack), so a client that keeps sending does
//!   not keep reaching the old pod.
//! - The annotations are written back through a [`StatusSink`]: in `files` mode the
//!   [`LocalStatusView`] (`<stateDir>/status/pods.json`, a `PodList`); with the Kubernetes
//!   source the [`KubeStatusSink`] (merge patches of the Pod objects' annotation). The wiring
//!   chooses the sink and passes it to [`start`].
//! - [`NplReconciler`] is the controller, a [`Reconciler`](crate::controllers::runner::Reconciler)
//!   driven by the reconcile runner ([`run`]): it reconciles whenever the desired state or the
//!   node's attachments change (the [`PodManager`] notifies ADD, DEL and reconciliation),
//!   retries a failed pass every second, writes the store first and applies the rules before
//!   publishing annotations, so a load balancer never learns a node port before it works.
//!
//! Files: [`targets`] (what to expose), [`allocator`] (node ports), [`status`] (annotations
//! and their sinks), [`reconciler`] (the controller).

pub mod allocator;
pub mod kube_sink;
pub mod reconciler;
pub mod status;
pub mod targets;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::controllers::runner::error_chain;
use crate::kernel::conntrack::NetlinkConntrack;
use crate::kernel::nftables::{NatTable, NplDnat, NplRules};
use crate::pods::PodManager;
use crate::pods::store::{NplMapping, Store};
use crate::source::{DesiredState, NodeInfo};

pub use allocator::{AllocError, Allocator, Dropped, PortReserver, SocketReserver, Unallocated};
pub use kube_sink::KubeStatusSink;
pub use reconciler::{Controller, NplError, NplReconciler, run, runner_config};
pub use status::{LocalStatusView, StatusError, StatusSink, annotations};
pub use targets::{Desired, PodTarget, desired_targets};

/// The Service annotation that enables NPL for the pods it selects.
pub const ENABLED_ANNOTATION: &str = "nodeportlocal.antrea.io/enabled";
/// The pod annotation that publishes the mappings.
pub const POD_ANNOTATION: &str = "nodeportlocal.antrea.io";

pub use crate::config::{DEFAULT_PORT_RANGE, NplConfig, PortRange};

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// The DNAT rules for `mappings`.
pub fn rules<'a>(
    node_ip: Ipv4Addr,
    mappings: impl IntoIterator<Item = &'a NplMapping>,
) -> NplRules {
    NplRules {
        node_ip,
        dnat: mappings
            .into_iter()
            .map(|m| NplDnat {
                protocol: m.protocol,
                node_port: m.node_port,
                pod_ip: m.pod_ip,
                pod_port: m.pod_port,
            })
            .collect(),
    }
}

/// The rules to install with the table at start, before the controller runs: the persisted
/// mappings, so a restart leaves no gap for running pods (the controller's first sync removes
/// those of pods that are gone, within milliseconds). `None` when NPL is off or the node has
/// no InternalIP.
pub fn restored_rules(cfg: &NplConfig, store: &Store, node: &NodeInfo) -> Option<NplRules> {
    if !cfg.enable {
        return None;
    }
    let node_ip = node.internal_ip?;
    match store.npl_list() {
        Ok(ms) => Some(rules(node_ip, &ms)),
        Err(e) => {
            tracing::error!(error = %e, "reading NodePortLocal mappings; starting without them");
            Some(rules(node_ip, &[]))
        }
    }
}

/// After the state store was lost or found damaged: the mappings of running pods back from
/// the kernel, where ferrea's nftables table outlives the agent. Each DNAT of the table's
/// NodePortLocal maps whose pod address is one of `pods` (records rebuilt from the pod
/// interfaces' notes, which name the pod) becomes a mapping in `store` again, so the pod keeps
/// its node port and its annotation. Returns how many were rebuilt.
pub async fn rebuild_mappings(
    store: &Store,
    table: &str,
    pods: &[crate::pods::store::PodRecord],
) -> Result<usize, crate::kernel::nftables::NatError> {
    let mut rebuilt = Vec::new();
    for d in crate::kernel::nftables::installed_npl(table).await? {
        let Some(r) = pods
            .iter()
            .find(|r| r.ip == d.pod_ip && !r.pod_name.is_empty())
        else {
            continue;
        };
        let ns = if r.pod_namespace.is_empty() {
            "default"
        } else {
            &r.pod_namespace
        };
        rebuilt.push(NplMapping {
            pod: crate::source::object_key(ns, &r.pod_name),
            pod_port: d.pod_port,
            protocol: d.protocol,
            pod_ip: d.pod_ip,
            node_port: d.node_port,
        });
    }
    let known: std::collections::HashSet<String> = store
        .npl_list()
        .unwrap_or_default()
        .iter()
        .map(NplMapping::key)
        .collect();
    rebuilt.retain(|m| !known.contains(&m.key()));
    if let Err(e) = store.npl_update(&rebuilt, &[]) {
        tracing::error!(error = %e, "writing the rebuilt NodePortLocal mappings");
        return Ok(0);
    }
    Ok(rebuilt.len())
}

/// Starts NPL after the node is up: the controller when `cfg.enable`, otherwise a one-shot
/// cleanup of what an earlier run with NPL on left (mappings in the store, annotations).
/// Annotations are published through `sink` (the source's: [`LocalStatusView`] for `files`,
/// [`KubeStatusSink`] for `kubernetes`).
#[expect(
    clippy::too_many_arguments,
    reason = "the wiring's one call; each argument is a distinct part the controller is given"
)]
pub fn start(
    cfg: &NplConfig,
    state_dir: &std::path::Path,
    node_name: &str,
    pods: &Arc<PodManager>,
    nat: &Arc<NatTable>,
    state: watch::Receiver<DesiredState>,
    sink: Arc<dyn StatusSink>,
    metrics: crate::metrics::Metrics,
) {
    if !cfg.enable {
        let store = pods.store().clone();
        let sink_path = state_dir.join("status").join("pods.json");
        tokio::spawn(async move {
            let stale = store.npl_list().unwrap_or_default();
            if !stale.is_empty() {
                let keys: Vec<String> = stale.iter().map(NplMapping::key).collect();
                if let Err(e) = store.npl_update(&[], &keys) {
                    tracing::warn!(error = %e, "removing NodePortLocal mappings of an earlier run");
                }
            }
            if (!stale.is_empty() || sink_path.exists())
                && let Err(e) = sink.publish_npl(&BTreeMap::new()).await
            {
                tracing::warn!(error = %error_chain(&e), "clearing NodePortLocal annotations");
            }
        });
        return;
    }
    let range = cfg.range().expect("validated with the config");
    raise_fd_limit(range);
    let c = Controller {
        range,
        node_name: node_name.to_owned(),
        pods: pods.clone(),
        nat: nat.clone(),
        conntrack: Arc::new(NetlinkConntrack),
        reserver: Box::new(SocketReserver::default()),
        sink,
    };
    tokio::spawn(run(c, state, metrics));
}

/// Each mapping holds a socket; a full range of both protocols needs up to twice its size in
/// descriptors, above the usual soft limit of 1024. Raise the soft limit to the hard one (what
/// Go does for every program, Antrea included); a failure only limits the number of mappings.
fn raise_fd_limit(range: PortRange) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "could not raise the descriptor limit; NodePortLocal mappings are limited by it");
            }
        }
        Ok((soft, _)) if soft < u64::from(range.len()) * 2 + 256 => {
            tracing::warn!(soft, range = %range, "the descriptor limit is below what a full NodePortLocal range needs");
        }
        _ => {}
    }
}
