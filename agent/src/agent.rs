//! Wiring of the agent: the order in which it starts, and how it stops.
//!
//! 1. The CNI server listens at once (root-only unix socket) and answers `TRY_AGAIN_LATER`
//!    until step 5, so the runtime retries instead of failing pods during start-up.
//! 2. The source delivers the desired state; the agent waits for its own `Node` with a pod CIDR.
//! 3. Node sysctls, the dataplane (adopting what a previous process left), ferrea's nftables
//!    table. A failure here (ovsdb-server not up yet, say) is retried with backoff while the
//!    CNI server answers `TRY_AGAIN_LATER` naming the failure.
//! 4. Reconciliation of the state store against the kernel and the dataplane.
//! 5. Ready: CNI requests are served; desired-state changes are applied as they come. The
//!    NodePortLocal controller ([`crate::npl`]) starts here and follows the desired state and
//!    the node's attachments on its own.
//!
//! Stopping (SIGTERM/SIGINT) closes the socket and leaves the dataplane in place, so running
//! pods keep their traffic while the agent is down or being upgraded.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ferrea_proto::cni::v1::cni_server::CniServer;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;

use crate::cni_server::{CniService, Readiness};
use crate::config::{Config, DataplaneKind, SourceConfig};
use crate::dataplane::{Dataplane, NodeNetwork};
use crate::nat::{NatSpec, NatTable};
use crate::podnet::NetlinkPodNet;
use crate::pods::PodManager;
use crate::source::{DesiredState, NodeInfo, files};
use crate::store::Store;
use crate::sysctl;

/// Sysctls the node needs for the routed pod network, set in the agent's own namespace.
const NODE_SYSCTLS: &[(&str, &str)] = &[("net.ipv4.ip_forward", "1")];

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let (ready_tx, ready_rx) = watch::channel(Readiness::Starting(
        "waiting for this node's Node object".into(),
    ));
    let listener = bind_socket(&cfg.cni_socket)?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CniServer::new(CniService::new(ready_rx)))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    tracing::info!(socket = %cfg.cni_socket.display(), node = cfg.node_name(), dataplane = ?cfg.dataplane, "CNI server listening");

    let SourceConfig::Files { path } = &cfg.source;
    let mut state = files::spawn(path.clone());
    tracing::info!(path = %path.display(), "desired state from files");

    let main = async {
        let node = wait_for_node(&cfg, &mut state).await?;
        ready_tx.send_replace(Readiness::Starting(
            "the dataplane is being initialised".into(),
        ));
        // A dependency that is not there yet (ovsdb-server, a bpffs that cannot be mounted)
        // is retried while the CNI server keeps answering, with the failure as the reason.
        let mut delay = Duration::from_millis(500);
        let (pm, nat) = loop {
            match start_node(&cfg, &node).await {
                Ok(started) => break started,
                Err(e) => {
                    let why = format!("starting the node failed, retrying in {delay:?}: {e:#}");
                    tracing::error!("{why}");
                    ready_tx.send_replace(Readiness::Starting(why));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        ready_tx.send_replace(Readiness::Ready(pm.clone()));
        tracing::info!(node = %node.name, pod_cidr = ?node.pod_cidr, "agent ready");
        crate::npl::start(
            &cfg.node_port_local,
            &cfg.state_dir,
            cfg.node_name(),
            &pm,
            &nat,
            state.clone(),
        );
        follow_changes(&cfg, &node, &pm, &mut state).await
    };
    tokio::select! {
        r = main => { cleanup_socket(&cfg); r?; }
        r = server => { cleanup_socket(&cfg); r.context("CNI server task")?.context("CNI server")?; }
        _ = shutdown => {
            tracing::info!("shutting down; pods keep their network");
            cleanup_socket(&cfg);
        }
    }
    Ok(())
}

fn bind_socket(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by a killed agent would make bind fail with EADDRINUSE.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()));
        }
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("binding CNI socket {}", path.display()))?;
    // Only root may talk to the agent: the API creates interfaces in arbitrary namespaces.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(l)
}

fn cleanup_socket(cfg: &Config) {
    let _ = std::fs::remove_file(&cfg.cni_socket);
}

async fn wait_for_node(
    cfg: &Config,
    state: &mut watch::Receiver<DesiredState>,
) -> anyhow::Result<NodeInfo> {
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
            bail!("desired-state source stopped");
        }
    }
}

fn new_dataplane(cfg: &Config) -> anyhow::Result<Arc<dyn Dataplane>> {
    match cfg.dataplane {
        DataplaneKind::Ebpf => Ok(Arc::new(
            crate::dataplane::ebpf::EbpfDataplane::new(&cfg.bpf_pin_path)
                .context("starting the eBPF dataplane")?,
        )),
        DataplaneKind::Ovs => Ok(Arc::new(crate::dataplane::ovs::OvsDataplane::new(
            cfg.ovs.clone(),
        ))),
    }
}

async fn start_node(
    cfg: &Config,
    node: &NodeInfo,
) -> anyhow::Result<(Arc<PodManager>, Arc<NatTable>)> {
    let pod_cidr = node.pod_cidr.expect("checked by wait_for_node");
    let net = NodeNetwork {
        pod_cidr,
        gateway: crate::ipam::gateway_of(pod_cidr),
        mtu: cfg.mtu,
    };

    for (k, v) in NODE_SYSCTLS {
        if let Some(old) = sysctl::ensure(k, v).context("setting node sysctls")? {
            tracing::info!(key = k, from = %old, to = v, "sysctl set");
        }
    }
    let dp = new_dataplane(cfg)?;
    dp.init_node(&net)
        .await
        .context("initialising the dataplane")?;
    let store = Store::open(&cfg.state_dir).context("opening the state store")?;
    // NodePortLocal rules of the previous run go in with the table, so running pods keep
    // their node ports across the restart; the NPL controller reconciles them right after.
    let npl = crate::npl::restored_rules(&cfg.node_port_local, &store, node);
    let nat = Arc::new(NatTable::new(nat_spec(cfg, &net), npl));
    nat.apply()
        .await
        .context("installing ferrea's nftables table")?;
    let podnet = Arc::new(NetlinkPodNet::new().context("opening netlink")?);
    let pm = Arc::new(PodManager::new(
        store,
        podnet,
        dp,
        net,
        cfg.veth_prefix.clone(),
    )?);
    let report = pm
        .reconcile()
        .await
        .context("reconciling pods with the kernel and dataplane")?;
    tracing::info!(
        kept = report.kept,
        stale_records = ?report.stale_records,
        orphan_links = ?report.orphan_links,
        orphan_dataplane = ?report.orphan_dataplane,
        "reconciled"
    );
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

/// Applies desired-state changes after start. A pod CIDR change cannot be applied to running
/// pods (they hold addresses from the old one); it is reported, not applied, until restart.
async fn follow_changes(
    cfg: &Config,
    node: &NodeInfo,
    pm: &PodManager,
    state: &mut watch::Receiver<DesiredState>,
) -> anyhow::Result<()> {
    let mut reported_cidr = node.pod_cidr;
    // Dataplane upkeep once a second: a restarted ovs-vswitchd has its flows back within that.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    loop {
        tokio::select! {
            r = state.changed() => {
                if r.is_err() {
                    bail!("desired-state source stopped");
                }
                let st = state.borrow_and_update().clone();
                let now = st.nodes.get(cfg.node_name()).and_then(|n| n.pod_cidr);
                if now != reported_cidr {
                    tracing::error!(node = cfg.node_name(), running = ?node.pod_cidr, desired = ?now,
                        "spec.podCIDR of this node changed; drain the node and restart the agent to apply it");
                    reported_cidr = now;
                }
            }
            _ = tick.tick() => match pm.dataplane().maintain().await {
                Ok(()) if !healthy => {
                    tracing::info!(dataplane = pm.dataplane().name(), "dataplane healthy again");
                    healthy = true;
                }
                Ok(()) => {}
                // Logged once per outage, not every second.
                Err(e) if healthy => {
                    tracing::error!(dataplane = pm.dataplane().name(), error = %e, "dataplane upkeep failed; retrying every second");
                    healthy = false;
                }
                Err(_) => {}
            },
        }
    }
}
