//! Wiring of the agent: the order in which it starts, and how it stops.
//!
//! 1. The CNI server listens at once (root-only unix socket) and answers `TRY_AGAIN_LATER`
//!    until step 5, so the runtime retries instead of failing pods during start-up.
//! 2. The source delivers the desired state; the agent waits for its own `Node` with a pod CIDR.
//! 3. The transport interface and pod MTU, node sysctls, the dataplane (adopting what a
//!    previous process left) with the other nodes of the source, ferrea's nftables table.
//!    A failure here (ovsdb-server not up yet, say) is retried with backoff while the
//!    CNI server answers `TRY_AGAIN_LATER` naming the failure.
//! 4. Reconciliation of the state store against the kernel and the dataplane.
//! 5. Ready: CNI requests are served; desired-state changes are applied as they come. The
//!    NodePortLocal controller ([`crate::controllers::npl`]) starts here and follows the desired state and
//!    the node's attachments on its own, and so does the Egress controller ([`crate::controllers::egress`]).
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

use crate::cni::server::{CniService, Readiness};
use crate::config::{Config, DataplaneKind, SourceConfig};
use crate::dataplane::{Dataplane, NodeNetwork, RemoteNode};
use crate::kernel::nftables::{NatSpec, NatTable};
use crate::kernel::sysctl;
use crate::pods::PodManager;
use crate::pods::podnet::NetlinkPodNet;
use crate::pods::store::Store;
use crate::source::{DesiredState, NodeInfo, files};

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
            let remotes = remote_nodes(&state.borrow(), cfg.node_name());
            match start_node(&cfg, &node, &remotes).await {
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
        crate::controllers::npl::start(
            &cfg.node_port_local,
            &cfg.state_dir,
            cfg.node_name(),
            &pm,
            &nat,
            state.clone(),
        );
        let mut cluster = cfg.cluster_cidrs.clone();
        cluster.push(cfg.service_cidr);
        crate::controllers::egress::start(
            crate::controllers::egress::EgressContext {
                node_name: cfg.node_name().to_owned(),
                cluster,
                encap: pm.node().tunnel.is_some(),
                transport: pm.node().transport.ifname.clone(),
                gateway_if: crate::net::GATEWAY_IFNAME.to_owned(),
                state_dir: cfg.state_dir.clone(),
            },
            pm.clone(),
            nat.clone(),
            state.clone(),
        )
        .context("starting the Egress controller")?;
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

/// The other nodes the packet path must reach: every `Node` but this one with both a pod CIDR
/// and an `InternalIP` (a node without them has no pods to reach yet), sorted by name.
pub fn remote_nodes(st: &DesiredState, me: &str) -> Vec<RemoteNode> {
    st.nodes
        .values()
        .filter(|n| n.name != me)
        .filter_map(|n| {
            Some(RemoteNode {
                name: n.name.clone(),
                node_ip: n.internal_ip?,
                pod_cidr: n.pod_cidr?,
            })
        })
        .collect()
}

async fn start_node(
    cfg: &Config,
    node: &NodeInfo,
    remotes: &[RemoteNode],
) -> anyhow::Result<(Arc<PodManager>, Arc<NatTable>)> {
    let pod_cidr = node.pod_cidr.expect("checked by wait_for_node");
    let dp = new_dataplane(cfg)?;
    // What the backend moved off the transport interface earlier and a reboot lost (OVS
    // userspace datapath: the node's address on its physical bridge) comes back first, so
    // discovery finds the node's address.
    dp.restore_transport()
        .await
        .context("restoring the transport interface")?;
    let discover = || async {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
        let task = tokio::spawn(conn);
        let t = crate::kernel::transport::discover(&handle, cfg, node.internal_ip).await;
        task.abort();
        anyhow::Ok(t?)
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
        if let Some(old) = sysctl::ensure(k, v).context("setting node sysctls")? {
            tracing::info!(key = k, from = %old, to = v, "sysctl set");
        }
    }
    dp.init_node(&net)
        .await
        .context("initialising the dataplane")?;
    // The backend may have moved the node's address (OVS userspace datapath in encap mode:
    // onto its physical bridge's port): later users of the transport see where it is now.
    let moved = discover().await?;
    if moved.ifname != net.transport.ifname {
        tracing::info!(from = %net.transport.ifname, to = %moved.ifname, "the node's address moved");
        net.transport = moved;
    }
    dp.set_remote_nodes(remotes)
        .await
        .context("connecting the other nodes")?;
    let store = Store::open(&cfg.state_dir).context("opening the state store")?;
    // NodePortLocal rules of the previous run go in with the table, so running pods keep
    // their node ports across the restart; the NPL controller reconciles them right after.
    let npl = crate::controllers::npl::restored_rules(&cfg.node_port_local, &store, node);
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

/// Applies desired-state changes after start: the list of other nodes goes to the dataplane
/// (retried every second after a failure). A pod CIDR change cannot be applied to running
/// pods (they hold addresses from the old one); it is reported, not applied, until restart.
async fn follow_changes(
    cfg: &Config,
    node: &NodeInfo,
    pm: &PodManager,
    state: &mut watch::Receiver<DesiredState>,
) -> anyhow::Result<()> {
    let mut reported_cidr = node.pod_cidr;
    // What the dataplane was last given; `None` after a failure, so the next tick retries.
    let mut applied: Option<Vec<RemoteNode>> = Some(remote_nodes(&state.borrow(), cfg.node_name()));
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
                let want = remote_nodes(&st, cfg.node_name());
                if applied.as_ref() != Some(&want) {
                    applied = apply_remote_nodes(pm, want).await;
                }
            }
            _ = tick.tick() => {
                if applied.is_none() {
                    applied = apply_remote_nodes(pm, remote_nodes(&state.borrow(), cfg.node_name())).await;
                }
                match pm.dataplane().maintain().await {
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
                }
            }
        }
    }
}

/// Gives the dataplane the new list of remote nodes; returns what was applied, or `None` (to
/// retry) after logging the failure.
async fn apply_remote_nodes(pm: &PodManager, want: Vec<RemoteNode>) -> Option<Vec<RemoteNode>> {
    match pm.dataplane().set_remote_nodes(&want).await {
        Ok(()) => {
            tracing::info!(nodes = ?want.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), "remote nodes applied");
            Some(want)
        }
        Err(e) => {
            tracing::error!(error = %e, "applying remote nodes failed; retrying");
            None
        }
    }
}
