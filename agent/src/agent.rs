//! Wiring of the agent: the order in which it starts, and how it stops.
//!
//! 1. The CNI server listens at once (root-only unix socket) and answers `TRY_AGAIN_LATER`
//!    until step 5, so the runtime retries instead of failing pods during start-up.
//! 2. The source (`files`, or `kubernetes`: watchers that publish only once every initial
//!    list completed) delivers the desired state; the agent waits for its own `Node` with a
//!    pod CIDR. Status goes back through the source's sinks (NodePortLocal annotations: the
//!    local status view, or patches of the Pod objects; Egress status: the local status view,
//!    or the `status` of the Egress objects this node holds).
//! 3. The transport interface and pod MTU, node sysctls, the dataplane (adopting what a
//!    previous process left) with the other nodes of the source, ferrea's nftables table.
//!    A failure here (ovsdb-server not up yet, say) is retried with backoff while the
//!    CNI server answers `TRY_AGAIN_LATER` naming the failure.
//! 4. Reconciliation of the state store against the kernel and the dataplane.
//! 5. Ready: CNI requests are served. The controllers start here, each on the reconcile
//!    runner ([`crate::controllers::runner`]): the node controller
//!    ([`crate::controllers::node`]: other nodes, dataplane upkeep), NodePortLocal
//!    ([`crate::controllers::npl`]), Egress ([`crate::controllers::egress`]) and, with
//!    `serviceProxy: ferrea`, the service proxy ([`crate::controllers::services`]).
//!
//! Beside the CNI socket, from the first moment: the debug API (`ferrea.debug.v1` on its own
//! root-only socket, [`crate::debug::service`]) and, unless `metrics.enable` is false, the
//! metrics and health endpoint ([`crate::debug::http`]); both answer during start-up with
//! what is known so far. The [`Metrics`] handle made here goes to the CNI server, the
//! source, the reconcile runner and the controllers.
//!
//! Stopping (SIGTERM/SIGINT) closes the socket and leaves the dataplane in place, so running
//! pods keep their traffic while the agent is down or being upgraded.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::cni::server::{CniService, Readiness};
use crate::cni::socket::{SocketError, bind_root_only};
use crate::config::{Config, DataplaneKind, SourceConfig};
use crate::controllers::egress::{self, EgressStatusSink, KubeEgressStatusSink};
use crate::controllers::node::{NodeReconciler, remote_nodes};
use crate::controllers::npl::{KubeStatusSink, LocalStatusView, StatusSink};
use crate::controllers::runner::{self, Wakers, error_chain};
use crate::dataplane::{Dataplane, DataplaneError, NodeNetwork, RemoteNode};
use crate::debug::http::HttpError;
use crate::debug::{DebugContext, LogControl, Started};
use crate::kernel::nftables::{NatError, NatSpec, NatTable};
use crate::kernel::sysctl::{self, SysctlError};
use crate::kernel::transport::TransportError;
use crate::metrics::Metrics;
use crate::pods::podnet::NetlinkPodNet;
use crate::pods::store::{Store, StoreError};
use crate::pods::{PodError, PodManager};
use crate::source::{DesiredState, NodeInfo, files, kubernetes};

/// Sysctls the node needs for the routed pod network, set in the agent's own namespace.
const NODE_SYSCTLS: &[(&str, &str)] = &[("net.ipv4.ip_forward", "1")];

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Preparing the CNI socket or the debug socket failed.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The metrics endpoint could not start, or stopped.
    #[error(transparent)]
    Metrics(#[from] HttpError),
    /// The CNI gRPC server failed.
    #[error("CNI server")]
    Server(#[source] tonic::transport::Error),
    /// The CNI server's task died.
    #[error("CNI server task")]
    ServerTask(#[source] tokio::task::JoinError),
    /// The Kubernetes client could not be built (the error names the kubeconfig path, or
    /// `in-cluster`).
    #[error("starting the Kubernetes source")]
    Kubernetes(#[source] crate::source::kubernetes::ClientError),
    /// The desired-state source stopped; nothing can be reconciled any more.
    #[error("the desired-state source stopped")]
    SourceStopped,
    /// A controller could not be started.
    #[error("starting the {controller} controller")]
    Controller {
        /// Which controller.
        controller: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What bringing the node up failed at (retried with backoff while the CNI server answers
/// `TRY_AGAIN_LATER` naming it).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A dataplane step failed.
    #[error("{op}")]
    Dataplane {
        /// The step.
        op: &'static str,
        /// Why.
        #[source]
        source: DataplaneError,
    },
    /// A netlink socket could not be opened.
    #[error("opening netlink")]
    Netlink(#[source] std::io::Error),
    /// The transport interface could not be found.
    #[error("finding the transport interface")]
    Transport(#[source] TransportError),
    /// A node sysctl could not be set.
    #[error("setting node sysctls")]
    Sysctl(#[source] SysctlError),
    /// The state store could not be opened.
    #[error("opening the state store")]
    Store(#[source] StoreError),
    /// ferrea's nftables table could not be installed.
    #[error("installing ferrea's nftables table")]
    Nat(#[source] NatError),
    /// The pod manager could not be built, or reconciling pods failed.
    #[error("{op}")]
    Pods {
        /// The step.
        op: &'static str,
        /// Why.
        #[source]
        source: Box<PodError>,
    },
}

fn dp_err(op: &'static str) -> impl FnOnce(DataplaneError) -> StartError {
    move |source| StartError::Dataplane { op, source }
}

/// What the binary hands the agent beside its configuration.
#[derive(Clone, Default)]
pub struct Hooks {
    /// The process's reloadable log filter, for `ferreactl log-level`.
    pub log: Option<Arc<dyn LogControl>>,
    /// The process's recent log lines, for `ferreactl supportbundle`.
    pub recent_logs: Option<crate::debug::LogRing>,
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    run_with(cfg, Hooks::default(), shutdown).await
}

/// [`run`] with the binary's [`Hooks`].
pub async fn run_with(
    cfg: Config,
    hooks: Hooks,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let started_at = std::time::Instant::now();
    let cfg = Arc::new(cfg);
    let metrics = Metrics::new();
    let (ready_tx, ready_rx) = watch::channel(Readiness::Starting(WAITING_FOR_NODE.into()));
    let listener = bind_root_only(&cfg.cni_socket, "binding CNI socket")?;
    let server = tokio::spawn(crate::cni::server::serve(
        listener,
        CniService::new(ready_rx.clone()).with_metrics(metrics.clone()),
    ));
    tracing::info!(socket = %cfg.cni_socket.display(), node = cfg.node_name(), dataplane = ?cfg.dataplane, "CNI server listening");
    let debug_socket = cfg.debug_socket();
    let debug_listener = crate::debug::service::bind(&debug_socket)?;
    let (synced_tx, synced_rx) = watch::channel(false);
    let started_parts = Arc::new(std::sync::OnceLock::new());
    let egress_views = egress::EgressViews::default();

    // The source, and where status goes back: the same for both from here on.
    let (mut state, kube_client) = match &cfg.source {
        SourceConfig::Files { path } => {
            tracing::info!(path = %path.display(), "desired state from files");
            (files::spawn(path.clone()), None)
        }
        SourceConfig::Kubernetes { kubeconfig } => {
            let client = kubernetes::client(kubeconfig.as_deref())
                .await
                .map_err(AgentError::Kubernetes)?;
            let src = kubernetes::spawn(client.clone(), cfg.node_name(), metrics.clone());
            tokio::spawn(show_sync(src.sync.clone(), ready_tx.clone()));
            tokio::spawn(forward_sync(src.sync, synced_tx.clone()));
            let origin = kubeconfig
                .as_ref()
                .map_or_else(|| "in-cluster".to_owned(), |p| p.display().to_string());
            tracing::info!(config = %origin, "desired state from the Kubernetes API");
            (src.state, Some(client))
        }
    };
    let (status_sink, egress_sink): (Arc<dyn StatusSink>, Arc<dyn EgressStatusSink>) =
        match kube_client {
            None => (
                Arc::new(LocalStatusView::new(&cfg.state_dir)),
                Arc::new(egress::LocalStatusView::new(&cfg.state_dir)),
            ),
            Some(client) => (
                Arc::new(KubeStatusSink::new(
                    client.clone(),
                    cfg.node_name(),
                    state.clone(),
                )),
                Arc::new(KubeEgressStatusSink::new(client)),
            ),
        };

    let debug_ctx = DebugContext {
        cfg: cfg.clone(),
        started_at,
        ready: ready_rx.clone(),
        state: state.clone(),
        synced: synced_rx,
        node: started_parts.clone(),
        egress: egress_views.clone(),
        log: hooks.log.clone(),
        recent_logs: hooks.recent_logs.clone(),
        metrics: metrics.clone(),
        metrics_address: cfg.metrics.enable.then_some(cfg.metrics.bind_address),
    };
    // The debug API failing is no reason to stop serving pods: it is logged.
    let debug_server = tokio::spawn({
        let ctx = debug_ctx.clone();
        async move {
            if let Err(e) = crate::debug::service::serve(debug_listener, ctx).await {
                tracing::error!(error = %error_chain(&e), "the debug API stopped");
            }
        }
    });
    tracing::info!(socket = %debug_socket.display(), "debug API listening");
    let http = if cfg.metrics.enable {
        let serve = crate::debug::http::bind(cfg.metrics.bind_address, debug_ctx).await?;
        tracing::info!(address = %cfg.metrics.bind_address, "metrics and health endpoint listening");
        Some(tokio::spawn(serve))
    } else {
        None
    };
    let http_failed = async {
        match http {
            Some(h) => match h.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => HttpError::Serve(std::io::Error::other("the server stopped")),
                Err(e) => HttpError::Serve(std::io::Error::other(e)),
            },
            None => std::future::pending().await,
        }
    };

    let main = async {
        let mut node = wait_for_node(&cfg, &mut state).await?;
        // The files source delivered a state with this node in it: it is synced. (The
        // Kubernetes source says so itself, through `forward_sync`.)
        if matches!(cfg.source, SourceConfig::Files { .. }) {
            synced_tx.send_replace(true);
        }
        ready_tx.send_replace(Readiness::Starting(
            "the dataplane is being initialised".into(),
        ));
        // A dependency that is not there yet (ovsdb-server, a bpffs that cannot be mounted)
        // is retried while the CNI server keeps answering, with the failure as the reason.
        let mut delay = Duration::from_millis(500);
        let (pm, nat) = loop {
            // Each attempt starts from the source as it is now: the other nodes, and this
            // Node object, which may have gained what was missing (its InternalIP is written
            // after its spec, by another writer).
            let remotes = {
                let st = state.borrow();
                if let Some(now) = st.nodes.get(cfg.node_name())
                    && now.pod_cidr.is_some()
                {
                    node = now.clone();
                }
                remote_nodes(&st, cfg.node_name())
            };
            match start_node(&cfg, &node, &remotes).await {
                Ok(started) => break started,
                Err(e) => {
                    let why = format!(
                        "starting the node failed, retrying in {delay:?}: {}",
                        error_chain(&e)
                    );
                    tracing::error!("{why}");
                    ready_tx.send_replace(Readiness::Starting(why));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        let _ = started_parts.set(Started {
            pods: pm.clone(),
            nat: nat.clone(),
        });
        ready_tx.send_replace(Readiness::Ready(pm.clone()));
        tracing::info!(node = %node.name, pod_cidr = ?node.pod_cidr, "agent ready");
        // What the start allocated and freed goes back to the kernel once the controllers'
        // first passes are done (see `crate::memory`).
        tokio::spawn(crate::memory::trim_periodically(Duration::from_secs(2)));
        crate::controllers::npl::start(
            &cfg.node_port_local,
            &cfg.state_dir,
            cfg.node_name(),
            &pm,
            &nat,
            state.clone(),
            status_sink.clone(),
            metrics.clone(),
        );
        crate::controllers::services::start(
            cfg.service_proxy,
            crate::controllers::services::ServiceReconciler::new(
                cfg.node_name(),
                pm.node().transport.ip,
                cfg.service_cidr,
                pm.dataplane().clone(),
                nat.clone(),
                Arc::new(crate::kernel::conntrack::NetlinkConntrack),
            ),
            state.clone(),
            metrics.clone(),
        );
        let mut cluster = cfg.cluster_cidrs.clone();
        cluster.push(cfg.service_cidr);
        let members = if cfg.egress.memberlist {
            let m = crate::membership::start(
                crate::membership::MembershipConfig {
                    node_name: cfg.node_name().to_owned(),
                    node_ip: pm.node().transport.ip,
                    port: cfg.egress.memberlist_port,
                    damping: std::time::Duration::from_secs(cfg.egress.failover_damping_seconds),
                },
                state.clone(),
            )
            .await
            .map_err(|e| AgentError::Controller {
                controller: "Egress membership",
                source: e.into(),
            })?;
            Some(m)
        } else {
            None
        };
        egress::start(
            egress::EgressContext {
                node_name: cfg.node_name().to_owned(),
                cluster,
                encap: pm.node().tunnel.is_some(),
                transport: pm.node().transport.ifname.clone(),
                gateway_if: crate::net::GATEWAY_IFNAME.to_owned(),
                state_dir: cfg.state_dir.clone(),
                metrics: metrics.clone(),
                views: egress_views.clone(),
            },
            pm.clone(),
            nat.clone(),
            state.clone(),
            egress_sink,
            members,
        )
        .map_err(|e| AgentError::Controller {
            controller: "Egress",
            source: e.into(),
        })?;
        let applied = remote_nodes(&state.borrow(), cfg.node_name());
        let node_ctl = NodeReconciler::new(
            cfg.node_name(),
            node.pod_cidr,
            pm.dataplane().clone(),
            applied,
            nat.clone(),
        );
        runner::run_observed(
            node_ctl,
            state.clone(),
            Wakers::none(),
            crate::controllers::node::runner_config(),
            metrics.clone(),
        )
        .await;
        Err::<(), _>(AgentError::SourceStopped)
    };
    let result = tokio::select! {
        r = main => r,
        r = server => r
            .map_err(AgentError::ServerTask)
            .and_then(|r| r.map_err(AgentError::Server)),
        e = http_failed => Err(AgentError::Metrics(e)),
        _ = shutdown => {
            tracing::info!("shutting down; pods keep their network");
            Ok(())
        }
    };
    debug_server.abort();
    cleanup_socket(&cfg);
    result
}

/// Why CNI requests wait before the node's `Node` object is known.
const WAITING_FOR_NODE: &str = "waiting for this node's Node object with spec.podCIDR";

/// While the Kubernetes source has not completed its initial lists, the CNI server's
/// `TRY_AGAIN_LATER` names the kinds still listing. Only the first readiness stage is
/// rewritten (atomically under the channel's lock), never a later one.
async fn show_sync(
    mut sync: watch::Receiver<kubernetes::SyncState>,
    ready: watch::Sender<Readiness>,
) {
    loop {
        let why = match &*sync.borrow_and_update() {
            kubernetes::SyncState::Synced => WAITING_FOR_NODE.to_owned(),
            kubernetes::SyncState::Syncing { waiting } => {
                let kinds: Vec<&str> = waiting.iter().map(|k| k.as_str()).collect();
                format!(
                    "{WAITING_FOR_NODE}: the Kubernetes API's initial lists are not complete ({})",
                    kinds.join(", ")
                )
            }
        };
        ready.send_if_modified(|r| match r {
            Readiness::Starting(cur) if cur.starts_with(WAITING_FOR_NODE) && *cur != why => {
                *cur = why.clone();
                true
            }
            _ => false,
        });
        if sync.borrow().is_synced() || sync.changed().await.is_err() {
            return;
        }
    }
}

fn cleanup_socket(cfg: &Config) {
    let _ = std::fs::remove_file(&cfg.cni_socket);
    let _ = std::fs::remove_file(cfg.debug_socket());
}

/// Mirrors the Kubernetes source's sync state into the debug API's and the metrics' flag.
async fn forward_sync(
    mut sync: watch::Receiver<kubernetes::SyncState>,
    synced: watch::Sender<bool>,
) {
    loop {
        let s = sync.borrow_and_update().is_synced();
        synced.send_replace(s);
        if sync.changed().await.is_err() {
            return;
        }
    }
}

async fn wait_for_node(
    cfg: &Config,
    state: &mut watch::Receiver<DesiredState>,
) -> Result<NodeInfo, AgentError> {
    let name = cfg.node_name();
    let mut warned = false;
    loop {
        {
            let st = state.borrow_and_update();
            if let Some(n) = st.nodes.get(name)
                && n.pod_cidr.is_some()
            {
                return Ok(n.clone());
            }
        }
        if !warned {
            tracing::warn!(
                node = name,
                "waiting for a Node object of this name with spec.podCIDR"
            );
            warned = true;
        }
        if state.changed().await.is_err() {
            return Err(AgentError::SourceStopped);
        }
    }
}

fn new_dataplane(cfg: &Config) -> Result<Arc<dyn Dataplane>, StartError> {
    match cfg.dataplane {
        DataplaneKind::Ebpf => Ok(Arc::new(
            crate::dataplane::ebpf::EbpfDataplane::new(&cfg.bpf_pin_path)
                .map_err(dp_err("starting the eBPF dataplane"))?,
        )),
        DataplaneKind::Ovs => Ok(Arc::new(crate::dataplane::ovs::OvsDataplane::new(
            cfg.ovs.clone(),
        ))),
    }
}

async fn start_node(
    cfg: &Config,
    node: &NodeInfo,
    remotes: &[RemoteNode],
) -> Result<(Arc<PodManager>, Arc<NatTable>), StartError> {
    let pod_cidr = node.pod_cidr.expect("checked by wait_for_node");
    let dp = new_dataplane(cfg)?;
    // What the backend moved off the transport interface earlier and a reboot lost (OVS
    // userspace datapath: the node's address on its physical bridge) comes back first, so
    // discovery finds the node's address.
    dp.restore_transport()
        .await
        .map_err(dp_err("restoring the transport interface"))?;
    let discover = || async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(StartError::Netlink)?;
        let task = tokio::spawn(conn);
        let t = crate::kernel::transport::discover(&handle, cfg, node.internal_ip).await;
        task.abort();
        t.map_err(StartError::Transport)
    };
    let transport = discover().await?;
    let tunnel = crate::kernel::transport::tunnel(cfg);
    let mut net = NodeNetwork {
        pod_cidr,
        gateway: crate::pods::ipam::gateway_of(pod_cidr),
        mtu: crate::kernel::transport::pod_mtu(cfg, transport.mtu, tunnel),
        transport,
        tunnel,
    };
    tracing::info!(transport = %net.transport.ifname, node_ip = %net.transport.ip,
        tunnel = ?net.tunnel, pod_mtu = net.mtu, "node network");

    for (k, v) in NODE_SYSCTLS {
        if let Some(old) = sysctl::ensure(k, v).map_err(StartError::Sysctl)? {
            tracing::info!(key = k, from = %old, to = v, "sysctl set");
        }
    }
    dp.init_node(&net)
        .await
        .map_err(dp_err("initialising the dataplane"))?;
    // The backend may have moved the node's address (OVS userspace datapath in encap mode:
    // onto its physical bridge's port): later users of the transport see where it is now.
    let moved = discover().await?;
    if moved.ifname != net.transport.ifname {
        tracing::info!(from = %net.transport.ifname, to = %moved.ifname, "the node's address moved");
        net.transport = moved;
    }
    dp.set_remote_nodes(remotes)
        .await
        .map_err(dp_err("connecting the other nodes"))?;
    // A store file that is not there is new, or was removed while pods ran (a wiped state
    // directory): either way the pod interfaces' notes say which pods are running.
    let missing = !cfg.state_dir.join(crate::pods::store::FILE).exists();
    let (store, damage) = Store::open_or_rebuild(&cfg.state_dir).map_err(StartError::Store)?;
    if let Some(d) = &damage {
        tracing::warn!(
            file = %d.file.display(),
            found = %d.found,
            kept_at = %d.kept_at.display(),
            salvaged_records = d.salvaged_pods,
            salvaged_npl_mappings = d.salvaged_npl,
            "the state store is damaged; it was set aside and a new one started, \
             rebuilt from what it still held and from the pod interfaces' notes"
        );
    }
    let podnet = Arc::new(NetlinkPodNet::new().map_err(StartError::Netlink)?);
    if (damage.is_some() || missing) && cfg.node_port_local.enable {
        // The mappings the store lost are still in the kernel's table: the pods the notes on
        // their veths name get theirs back before the table is rewritten.
        let noted = crate::pods::noted_records(podnet.as_ref(), &cfg.veth_prefix, pod_cidr).await;
        match crate::controllers::npl::rebuild_mappings(&store, &cfg.nftables_table, &noted).await {
            Ok(n) => tracing::warn!(
                rebuilt = n,
                "NodePortLocal mappings rebuilt from the nftables table"
            ),
            Err(e) => tracing::error!(error = %e,
                "reading NodePortLocal mappings from the nftables table; they are allocated again"),
        }
    }
    // NodePortLocal rules of the previous run go in with the table, so running pods keep
    // their node ports across the restart; the NPL controller reconciles them right after.
    let npl = crate::controllers::npl::restored_rules(&cfg.node_port_local, &store, node);
    let nat = Arc::new(NatTable::new(nat_spec(cfg, &net), npl));
    // The other nodes' pod CIDRs are never masqueraded (the node controller follows them).
    nat.set_cluster_cidrs(remotes.iter().map(|r| r.pod_cidr).collect())
        .await
        .map_err(StartError::Nat)?;
    let pm = Arc::new(
        PodManager::new(store, podnet, dp, net, cfg.veth_prefix.clone()).map_err(|source| {
            StartError::Pods {
                op: "loading the pod records",
                source: Box::new(source),
            }
        })?,
    );
    let reconciled = if damage.is_some() || missing {
        pm.reconcile_rebuilding().await
    } else {
        pm.reconcile().await
    };
    let report = reconciled.map_err(|source| StartError::Pods {
        op: "reconciling pods with the kernel and dataplane",
        source: Box::new(source),
    })?;
    tracing::info!(
        kept = report.kept,
        stale_records = ?report.stale_records,
        orphan_links = ?report.orphan_links,
        orphan_dataplane = ?report.orphan_dataplane,
        notes_rewritten = report.notes_rewritten,
        "reconciled"
    );
    if damage.is_some() || !report.rebuilt.is_empty() {
        tracing::warn!(
            store = if missing { "missing" } else { "damaged" },
            rebuilt = report.rebuilt.len(),
            unusable_notes = ?report.unusable_notes,
            "pod attachments rebuilt from their interfaces' notes"
        );
    }
    Ok((pm, nat))
}

fn nat_spec(cfg: &Config, net: &NodeNetwork) -> NatSpec {
    let mut no_masq = cfg.cluster_cidrs.clone();
    no_masq.push(cfg.service_cidr);
    NatSpec {
        table: cfg.nftables_table.clone(),
        pod_cidr: net.pod_cidr,
        no_masquerade: no_masq,
        masquerade: cfg.masquerade,
        gateway: net.gateway,
    }
}
