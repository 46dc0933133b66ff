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
//!   attachment ([`PodRecord`], which knows the pod's namespace, name and IP) joined with a Pod
//!   object of the same namespace/name whose `spec.nodeName` is unset or this node. The IP
//!   comes from the attachment: in `files` mode nothing else knows it.
//! - [`Allocator`] turns targets into [`NplMapping`]s, keeping every existing mapping's node
//!   port (stable across Service edits and pod IP changes), allocating new ones round-robin
//!   through the range (a freed port is not handed out again at once), and reserving them
//!   through a [`PortReserver`].
//! - Mappings are persisted in the state store, so a restarted agent re-reserves the same node
//!   ports for the same pod ports. At start ([`Allocator::restore`]) mappings outside the
//!   (possibly changed) range, or whose port another process took meanwhile, are dropped and
//!   re-allocated; mappings of pods that no longer exist are removed by the first sync. The
//!   port range is read from the configuration file at start, so "the range changed" means a
//!   restart with a new range: mappings outside it get new ports within a second of start,
//!   mappings inside it keep theirs.
//! - The DNAT rules live in ferrea's one nftables table ([`crate::kernel::nftables::NatTable`]), re-rendered
//!   whole on every change, so no rule of a removed mapping survives. Once the rules are in,
//!   UDP conntrack entries of removed or moved mappings are deleted ([`crate::kernel::conntrack`]), so
//!   a client that keeps sending does not keep reaching the old pod.
//! - The annotations are written back through a [`StatusSink`]: in `files` mode the
//!   [`LocalStatusView`] (`<stateDir>/status/pods.json`, a `PodList`); the Kubernetes source
//!   will implement it as pod annotation patches.
//! - [`run`] is the controller: it re-syncs whenever the desired state or the node's
//!   attachments change (the [`PodManager`] notifies ADD, DEL and reconciliation), retries a
//!   failed step every second, and applies rules before publishing annotations, so a load
//!   balancer never learns a node port before it works.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::kernel::nftables::{NatTable, NplDnat, NplRules};
use crate::pods::PodManager;
use crate::pods::store::{NplMapping, PodRecord, Store};
use crate::source::{DesiredState, NodeInfo, Protocol, TargetPort, object_key};

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

/// What one local pod must expose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodTarget {
    /// The pod's IP (from its attachment).
    pub ip: Option<Ipv4Addr>,
    /// (pod port, protocol) pairs.
    pub ports: BTreeSet<(u16, Protocol)>,
}

/// The result of [`desired_targets`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Per local pod (`namespace/name`) with at least one port to expose.
    pub targets: BTreeMap<String, PodTarget>,
    /// Things that could not be honoured (a named target port no container declares, an
    /// unsupported protocol or Service type), each naming the Service and pod.
    pub warnings: Vec<String>,
}

/// The ports each local pod must expose, given the desired state and this node's attachments.
/// Pure; see the module doc for the rules.
pub fn desired_targets(state: &DesiredState, records: &[PodRecord], node_name: &str) -> Desired {
    let mut out = Desired::default();
    let local = crate::pods::local_pods(state, records, node_name);
    for svc in state.services.values() {
        if svc.annotations.get(ENABLED_ANNOTATION).map(String::as_str) != Some("true") {
            continue;
        }
        let sname = object_key(&svc.namespace, &svc.name);
        if !matches!(svc.service_type.as_str(), "ClusterIP" | "LoadBalancer") {
            out.warnings.push(format!(
                "Service {sname}: NodePortLocal supports ClusterIP and LoadBalancer Services, not {}",
                svc.service_type
            ));
            continue;
        }
        if svc.selector.is_empty() {
            continue;
        }
        for (key, (ip, pod)) in &local {
            if pod.namespace != svc.namespace
                || !svc
                    .selector
                    .iter()
                    .all(|(k, v)| pod.labels.get(k) == Some(v))
            {
                continue;
            }
            for sp in &svc.ports {
                if sp.protocol == Protocol::Sctp {
                    out.warnings.push(format!(
                        "Service {sname} port {}: NodePortLocal supports TCP and UDP, not SCTP",
                        sp.port
                    ));
                    continue;
                }
                let port = match &sp.target_port {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Name(name) => pod
                        .container_ports
                        .iter()
                        .find(|c| c.name.as_deref() == Some(name) && c.protocol == sp.protocol)
                        .map(|c| c.port),
                };
                match port {
                    Some(p) => {
                        let t = out.targets.entry(key.clone()).or_default();
                        t.ip = Some(*ip);
                        t.ports.insert((p, sp.protocol));
                    }
                    None => out.warnings.push(format!(
                        "Service {sname} targetPort {:?}: pod {key} has no {} container port of that name",
                        sp.target_port,
                        sp.protocol.as_str()
                    )),
                }
            }
        }
    }
    out
}

/// Reserves node ports so that no other process on the node can use them.
pub trait PortReserver: Send {
    /// Reserves `port` for `protocol`; fails if it is in use.
    fn reserve(&mut self, port: u16, protocol: Protocol) -> std::io::Result<()>;
    /// Gives the port back.
    fn release(&mut self, port: u16, protocol: Protocol);
}

/// Reserves ports by binding (not listening on) a socket of the protocol on `0.0.0.0:<port>`
/// in the agent's network namespace, without `SO_REUSEADDR`: a port any socket holds, on any
/// address, fails to bind and is skipped.
#[derive(Debug, Default)]
pub struct SocketReserver {
    sockets: HashMap<(u16, Protocol), OwnedFd>,
}

impl PortReserver for SocketReserver {
    fn reserve(&mut self, port: u16, protocol: Protocol) -> std::io::Result<()> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, socket};
        if self.sockets.contains_key(&(port, protocol)) {
            return Ok(());
        }
        let ty = match protocol {
            Protocol::Tcp => SockType::Stream,
            Protocol::Udp => SockType::Datagram,
            Protocol::Sctp => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "SCTP node ports are not supported",
                ));
            }
        };
        let fd = socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None)?;
        bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, port))?;
        self.sockets.insert((port, protocol), fd);
        Ok(())
    }

    fn release(&mut self, port: u16, protocol: Protocol) {
        self.sockets.remove(&(port, protocol));
    }
}

type MappingKey = (String, u16, Protocol);

/// Node port allocation, stable across changes; see the module doc.
pub struct Allocator<R: PortReserver> {
    range: PortRange,
    reserver: R,
    mappings: BTreeMap<MappingKey, NplMapping>,
    /// Where the next search starts (round-robin through the range).
    cursor: u16,
}

/// What [`Allocator::restore`] could not keep.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Mappings outside the range, duplicates, or whose port could not be reserved again.
    pub mappings: Vec<NplMapping>,
    /// Why, one line each.
    pub reasons: Vec<String>,
}

impl<R: PortReserver> Allocator<R> {
    /// An empty allocator.
    pub fn new(range: PortRange, reserver: R) -> Self {
        Self {
            range,
            reserver,
            mappings: BTreeMap::new(),
            cursor: range.first,
        }
    }

    /// Takes back persisted mappings after a restart, re-reserving their ports.
    pub fn restore(range: PortRange, reserver: R, persisted: Vec<NplMapping>) -> (Self, Dropped) {
        let mut a = Self::new(range, reserver);
        let mut dropped = Dropped::default();
        let mut persisted = persisted;
        persisted.sort();
        for m in persisted {
            let why = if !range.contains(m.node_port) {
                Some(format!(
                    "node port {} is outside the range {range}",
                    m.node_port
                ))
            } else if a
                .mappings
                .values()
                .any(|o| o.node_port == m.node_port && o.protocol == m.protocol)
            {
                Some(format!("node port {} is mapped twice", m.node_port))
            } else {
                a.reserver
                    .reserve(m.node_port, m.protocol)
                    .err()
                    .map(|e| format!("node port {} cannot be reserved again: {e}", m.node_port))
            };
            match why {
                Some(w) => {
                    dropped.reasons.push(format!(
                        "NPL mapping {}: {w}; allocating a new one",
                        m.key()
                    ));
                    dropped.mappings.push(m);
                }
                None => {
                    a.cursor = a.next_after(m.node_port);
                    a.mappings
                        .insert((m.pod.clone(), m.pod_port, m.protocol), m);
                }
            }
        }
        (a, dropped)
    }

    fn next_after(&self, p: u16) -> u16 {
        if p >= self.range.last {
            self.range.first
        } else {
            p + 1
        }
    }

    /// The current mappings, ordered by pod, pod port and protocol.
    pub fn mappings(&self) -> impl Iterator<Item = &NplMapping> {
        self.mappings.values()
    }

    /// Makes the mappings match `targets`: removes (and releases) those no longer wanted,
    /// follows pod IP changes keeping the node port, allocates ports for new pod ports.
    /// Returns the pod ports that got no node port (the range is exhausted, or reserving
    /// failed for another reason than the port being in use, such as running out of file
    /// descriptors), each with the reason.
    pub fn sync(&mut self, targets: &BTreeMap<String, PodTarget>) -> Vec<String> {
        let wanted = |k: &MappingKey| {
            targets
                .get(&k.0)
                .is_some_and(|t| t.ip.is_some() && t.ports.contains(&(k.1, k.2)))
        };
        let stale: Vec<MappingKey> = self
            .mappings
            .keys()
            .filter(|k| !wanted(k))
            .cloned()
            .collect();
        for k in stale {
            if let Some(m) = self.mappings.remove(&k) {
                self.reserver.release(m.node_port, m.protocol);
            }
        }
        let mut used: BTreeSet<(u16, Protocol)> = self
            .mappings
            .values()
            .map(|m| (m.node_port, m.protocol))
            .collect();
        let mut failed = Vec::new();
        for (pod, t) in targets {
            let Some(ip) = t.ip else { continue };
            for &(pod_port, protocol) in &t.ports {
                let key = (pod.clone(), pod_port, protocol);
                if let Some(m) = self.mappings.get_mut(&key) {
                    m.pod_ip = ip;
                    continue;
                }
                match self.allocate(protocol, &used) {
                    Ok(node_port) => {
                        used.insert((node_port, protocol));
                        self.mappings.insert(
                            key,
                            NplMapping {
                                pod: pod.clone(),
                                pod_port,
                                protocol,
                                pod_ip: ip,
                                node_port,
                            },
                        );
                    }
                    Err(why) => failed.push(format!(
                        "pod {pod} port {pod_port}/{}: {why}",
                        protocol.as_str()
                    )),
                }
            }
        }
        failed
    }

    /// The next port of the range that is free for `protocol`, reserved. Only a port in use
    /// (`EADDRINUSE`, `EACCES`) is skipped; any other failure stops the search, so that e.g.
    /// a descriptor shortage is reported as such and not as a full range.
    fn allocate(
        &mut self,
        protocol: Protocol,
        used: &BTreeSet<(u16, Protocol)>,
    ) -> Result<u16, String> {
        let mut port = self.cursor;
        for _ in 0..self.range.len() {
            let candidate = port;
            port = self.next_after(port);
            if used.contains(&(candidate, protocol)) {
                continue;
            }
            match self.reserver.reserve(candidate, protocol) {
                Ok(()) => {
                    self.cursor = port;
                    return Ok(candidate);
                }
                Err(e)
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied
                    ) =>
                {
                    return Err(format!("reserving node port {candidate}: {e}"));
                }
                Err(e) => {
                    tracing::debug!(port = candidate, protocol = protocol.as_str(), error = %e,
                        "node port in use on the node; skipping it");
                }
            }
        }
        Err(format!("no free node port in {}", self.range))
    }
}

/// One entry of the `nodeportlocal.antrea.io` annotation; field order is the wire order.
#[derive(Serialize)]
struct AnnotationEntry {
    #[serde(rename = "podPort")]
    pod_port: u16,
    #[serde(rename = "nodeIP")]
    node_ip: String,
    #[serde(rename = "nodePort")]
    node_port: u16,
    protocol: &'static str,
    #[serde(rename = "ipFamily")]
    ip_family: &'static str,
}

/// The annotation value of every pod with mappings (`namespace/name` to the JSON string),
/// exactly as Antrea writes it.
pub fn annotations<'a>(
    mappings: impl IntoIterator<Item = &'a NplMapping>,
    node_ip: Ipv4Addr,
) -> BTreeMap<String, String> {
    let mut per_pod: BTreeMap<&str, Vec<&NplMapping>> = BTreeMap::new();
    for m in mappings {
        per_pod.entry(&m.pod).or_default().push(m);
    }
    per_pod
        .into_iter()
        .map(|(pod, mut ms)| {
            ms.sort_by_key(|m| (m.pod_port, m.protocol));
            let entries: Vec<AnnotationEntry> = ms
                .iter()
                .map(|m| AnnotationEntry {
                    pod_port: m.pod_port,
                    node_ip: node_ip.to_string(),
                    node_port: m.node_port,
                    protocol: m.protocol.as_str(),
                    ip_family: "IPv4",
                })
                .collect();
            (
                pod.to_owned(),
                serde_json::to_string(&entries).expect("plain data serialises"),
            )
        })
        .collect()
}

/// Where the agent writes pod status back (today: NPL annotations).
#[async_trait::async_trait]
pub trait StatusSink: Send + Sync {
    /// Publishes the complete set of NPL annotations of this node's pods (`namespace/name` to
    /// the annotation value). A pod not named has no annotation: an implementation removes the
    /// annotations it published before for pods that are not named any more.
    async fn publish_npl(&self, annotations: &BTreeMap<String, String>) -> anyhow::Result<()>;
}

/// The `files` mode's status view: `<stateDir>/status/pods.json`, a Kubernetes-style
/// `PodList` whose items carry `metadata.namespace`, `metadata.name` and
/// `metadata.annotations["nodeportlocal.antrea.io"]`; replaced atomically (temporary file and
/// rename), so a reader never sees half a file.
#[derive(Clone, Debug)]
pub struct LocalStatusView {
    path: PathBuf,
}

impl LocalStatusView {
    /// The view under `state_dir`.
    pub fn new(state_dir: &std::path::Path) -> Self {
        Self {
            path: state_dir.join("status").join("pods.json"),
        }
    }

    /// The file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The document for `annotations`.
    pub fn render(annotations: &BTreeMap<String, String>) -> serde_json::Value {
        let items: Vec<serde_json::Value> = annotations
            .iter()
            .map(|(key, value)| {
                let (ns, name) = key.split_once('/').unwrap_or(("default", key));
                serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "namespace": ns,
                        "name": name,
                        "annotations": { POD_ANNOTATION: value },
                    },
                })
            })
            .collect();
        serde_json::json!({ "apiVersion": "v1", "kind": "PodList", "items": items })
    }
}

#[async_trait::async_trait]
impl StatusSink for LocalStatusView {
    async fn publish_npl(&self, annotations: &BTreeMap<String, String>) -> anyhow::Result<()> {
        use anyhow::Context;
        let mut text = serde_json::to_vec_pretty(&Self::render(annotations))?;
        text.push(b'\n');
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            crate::pods::store::write_file_atomic(&path, &text)
                .with_context(|| format!("writing {}", path.display()))
        })
        .await?
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

/// What the controller needs.
pub struct Controller {
    /// Parsed `nodePortLocal.portRange`.
    pub range: PortRange,
    /// This node's name.
    pub node_name: String,
    /// Local attachments, their notifications, and the store.
    pub pods: Arc<PodManager>,
    /// ferrea's table.
    pub nat: Arc<NatTable>,
    /// The desired state.
    pub state: watch::Receiver<DesiredState>,
    /// Where annotations go.
    pub sink: Arc<dyn StatusSink>,
}

/// Starts NPL after the node is up: the controller when `cfg.enable`, otherwise a one-shot
/// cleanup of what an earlier run with NPL on left (mappings in the store, annotations).
pub fn start(
    cfg: &NplConfig,
    state_dir: &std::path::Path,
    node_name: &str,
    pods: &Arc<PodManager>,
    nat: &Arc<NatTable>,
    state: watch::Receiver<DesiredState>,
) {
    let sink: Arc<dyn StatusSink> = Arc::new(LocalStatusView::new(state_dir));
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
                tracing::warn!(error = %e, "clearing NodePortLocal annotations");
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
        state,
        sink,
    };
    tokio::spawn(run(c));
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

/// The controller loop (see the module doc). Runs until the desired-state source stops.
pub async fn run(mut c: Controller) {
    let store = c.pods.store().clone();
    let persisted = {
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.npl_list()).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading NodePortLocal mappings; allocating afresh");
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "reading NodePortLocal mappings");
                Vec::new()
            }
        }
    };
    // What the store holds, so every sync writes exactly the difference (and a failed write
    // is retried in full by the next one).
    let mut stored: BTreeMap<String, NplMapping> =
        persisted.iter().map(|m| (m.key(), m.clone())).collect();
    let (mut alloc, dropped) = Allocator::restore(c.range, SocketReserver::default(), persisted);
    for r in &dropped.reasons {
        tracing::warn!("{r}");
    }
    tracing::info!(range = %c.range, restored = alloc.mappings.len(), "NodePortLocal controller started");
    let mut pods_rx = c.pods.subscribe();
    let mut published: Option<BTreeMap<String, String>> = None;
    let mut warnings: Vec<String> = Vec::new();
    let mut flush = BTreeSet::new();
    let mut failing = false;
    loop {
        let t = std::time::Instant::now();
        match sync_once(
            &mut c,
            &store,
            &mut alloc,
            &mut stored,
            &mut published,
            &mut warnings,
            &mut flush,
        )
        .await
        {
            Ok(Some(n)) => {
                tracing::info!(
                    mappings = n,
                    elapsed_ms = t.elapsed().as_millis() as u64,
                    "NodePortLocal mappings applied"
                );
                failing = false;
            }
            Ok(None) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::error!(error = %format!("{e:#}"), "NodePortLocal sync failed; retrying every second");
                }
                failing = true;
            }
        }
        tokio::select! {
            r = c.state.changed() => if r.is_err() { return; },
            r = pods_rx.changed() => if r.is_err() { return; },
            _ = tokio::time::sleep(Duration::from_secs(1)), if failing => {}
        }
    }
}

/// One pass: desired targets, allocation, store, rules, annotations. Returns the number of
/// mappings when anything changed.
async fn sync_once(
    c: &mut Controller,
    store: &Arc<Store>,
    alloc: &mut Allocator<SocketReserver>,
    stored: &mut BTreeMap<String, NplMapping>,
    published: &mut Option<BTreeMap<String, String>>,
    warnings: &mut Vec<String>,
    flush: &mut BTreeSet<u16>,
) -> anyhow::Result<Option<usize>> {
    let records = c.pods.records();
    let (node_ip, desired) = {
        let st = c.state.borrow_and_update();
        let node_ip = st.nodes.get(&c.node_name).and_then(|n| n.internal_ip);
        (node_ip, desired_targets(&st, &records, &c.node_name))
    };
    let Some(node_ip) = node_ip else {
        anyhow::bail!(
            "Node {} has no InternalIP in status.addresses: NodePortLocal needs the node's address",
            c.node_name
        );
    };
    if desired.warnings != *warnings {
        for w in desired.warnings.iter().filter(|w| !warnings.contains(w)) {
            tracing::warn!("NodePortLocal: {w}");
        }
        *warnings = desired.warnings.clone();
    }
    for f in alloc.sync(&desired.targets) {
        tracing::error!("NodePortLocal: {f}");
    }

    // The store first: a restart must never hand out other ports than the ones announced.
    let current: BTreeMap<String, NplMapping> =
        alloc.mappings().map(|m| (m.key(), m.clone())).collect();
    let put: Vec<NplMapping> = current
        .iter()
        .filter(|(k, m)| stored.get(*k) != Some(*m))
        .map(|(_, m)| m.clone())
        .collect();
    let delete: Vec<String> = stored
        .keys()
        .filter(|k| !current.contains_key(*k))
        .cloned()
        .collect();
    let changed = !put.is_empty() || !delete.is_empty();
    if changed {
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.npl_update(&put, &delete)).await??;
        // UDP node ports whose DNAT goes away or moves: their flows are cut once the rules
        // are in (kept across a failed step until done).
        flush.extend(
            stored
                .iter()
                .filter(|(k, old)| {
                    old.protocol == Protocol::Udp
                        && current
                            .get(*k)
                            .is_none_or(|m| m.pod_ip != old.pod_ip || m.node_port != old.node_port)
                })
                .map(|(_, old)| old.node_port),
        );
        *stored = current;
    }

    // Then the rules, stale UDP flows, the annotations.
    let applied = c
        .nat
        .set_npl(Some(rules(node_ip, alloc.mappings())))
        .await?;
    if !flush.is_empty() {
        let ports: Vec<u16> = std::mem::take(flush).into_iter().collect();
        match tokio::task::spawn_blocking(move || {
            crate::kernel::conntrack::delete_udp_to(node_ip, &ports)
        })
        .await?
        {
            Ok(n) => tracing::debug!(
                entries = n,
                "deleted UDP conntrack entries of removed NodePortLocal mappings"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "deleting UDP conntrack entries of removed NodePortLocal mappings"
            ),
        }
    }
    let ann = annotations(alloc.mappings(), node_ip);
    let announce = published.as_ref() != Some(&ann);
    if announce {
        c.sink.publish_npl(&ann).await?;
        *published = Some(ann);
    }
    Ok((changed || applied || announce).then_some(alloc.mappings.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::{pod_record as rec, state};

    const PODS: &str = "\
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec: {nodeName: n1, containers: [{ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]}
---
kind: Pod
metadata: {name: web-2, labels: {app: web, tier: x}}
spec: {containers: [{ports: [{name: http, containerPort: 9090}]}]}
---
kind: Pod
metadata: {name: web-elsewhere, labels: {app: web}}
spec: {nodeName: n2}
---
kind: Pod
metadata: {name: web-norecord, labels: {app: web}}
---
kind: Pod
metadata: {name: web-1, namespace: other, labels: {app: web}}
---
kind: Pod
metadata: {name: db, labels: {app: db}}
";

    fn svc(extra: &str) -> String {
        format!(
            "---\nkind: Service\nmetadata: {{name: web, annotations: {{nodeportlocal.antrea.io/enabled: \"true\"}}}}\n\
             spec: {{selector: {{app: web}}, ports: [{{port: 80, targetPort: http}}, {{port: 53, targetPort: dns, protocol: UDP}}, {{port: 8443}}]{extra}}}\n"
        )
    }

    fn records() -> Vec<PodRecord> {
        vec![
            rec("default", "web-1", [10, 244, 1, 2]),
            rec("", "web-2", [10, 244, 1, 3]),
            rec("default", "web-elsewhere", [10, 244, 1, 4]),
            rec("other", "web-1", [10, 244, 1, 5]),
            rec("default", "db", [10, 244, 1, 6]),
            rec("", "", [10, 244, 1, 7]),
        ]
    }

    #[test]
    fn targets_follow_selector_namespace_node_and_named_ports() {
        let st = state(&format!("{PODS}{}", svc("")));
        let d = desired_targets(&st, &records(), "n1");
        type Row<'a> = (&'a str, Option<Ipv4Addr>, Vec<(u16, Protocol)>);
        let got: Vec<Row> = d
            .targets
            .iter()
            .map(|(k, t)| (k.as_str(), t.ip, t.ports.iter().copied().collect()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "default/web-1",
                    Some(Ipv4Addr::new(10, 244, 1, 2)),
                    vec![
                        (5353, Protocol::Udp),
                        (8080, Protocol::Tcp),
                        (8443, Protocol::Tcp)
                    ]
                ),
                (
                    "default/web-2",
                    Some(Ipv4Addr::new(10, 244, 1, 3)),
                    vec![(8443, Protocol::Tcp), (9090, Protocol::Tcp)]
                ),
            ]
        );
        // web-2 has no UDP port named dns: reported, not mapped.
        assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
        assert!(
            d.warnings[0].contains("default/web-2") && d.warnings[0].contains("dns"),
            "{:?}",
            d.warnings
        );
    }

    #[test]
    fn only_enabled_clusterip_and_loadbalancer_services_with_selectors_count() {
        let none = |st: &DesiredState| desired_targets(st, &records(), "n1").targets.is_empty();
        // Annotation absent or not exactly "true".
        let st = state(&format!("{PODS}{}", svc("").replace("\"true\"", "\"yes\"")));
        assert!(none(&st));
        let st = state(&format!(
            "{PODS}{}",
            svc("").replace("annotations", "labels")
        ));
        assert!(none(&st));
        // NodePort Services are reported and skipped.
        let st = state(&format!("{PODS}{}", svc(", type: NodePort")));
        let d = desired_targets(&st, &records(), "n1");
        assert!(d.targets.is_empty());
        assert!(d.warnings[0].contains("NodePort"), "{:?}", d.warnings);
        // LoadBalancer works.
        let st = state(&format!("{PODS}{}", svc(", type: LoadBalancer")));
        assert!(!none(&st));
        // No selector: nothing selected.
        let st = state(&format!(
            "{PODS}---\nkind: Service\nmetadata: {{name: s, annotations: {{nodeportlocal.antrea.io/enabled: \"true\"}}}}\nspec: {{ports: [{{port: 80}}]}}\n"
        ));
        assert!(none(&st));
        // SCTP is reported.
        let st = state(&format!(
            "{PODS}---\nkind: Service\nmetadata: {{name: s, annotations: {{nodeportlocal.antrea.io/enabled: \"true\"}}}}\nspec: {{selector: {{app: db}}, ports: [{{port: 80, protocol: SCTP}}]}}\n"
        ));
        let d = desired_targets(&st, &records(), "n1");
        assert!(d.targets.is_empty());
        assert!(d.warnings[0].contains("SCTP"), "{:?}", d.warnings);
    }

    #[test]
    fn duplicate_sandboxes_prefer_the_status_ip() {
        let st = state(&format!(
            "{PODS}---\nkind: Pod\nmetadata: {{name: x, labels: {{app: db}}}}\nstatus: {{podIP: 10.244.1.9}}\n\
             ---\nkind: Service\nmetadata: {{name: s, annotations: {{nodeportlocal.antrea.io/enabled: \"true\"}}}}\nspec: {{selector: {{app: db}}, ports: [{{port: 80}}]}}\n"
        ));
        let mut recs = vec![rec("default", "x", [10, 244, 1, 8])];
        let mut newer = rec("default", "x", [10, 244, 1, 9]);
        newer.container_id = "z".into();
        recs.push(newer);
        let d = desired_targets(&st, &recs, "n1");
        assert_eq!(
            d.targets["default/x"].ip,
            Some(Ipv4Addr::new(10, 244, 1, 9))
        );
    }

    /// A reserver that refuses the ports in `busy` and records what it holds.
    #[derive(Default)]
    struct Fake {
        busy: BTreeSet<(u16, Protocol)>,
        held: BTreeSet<(u16, Protocol)>,
    }

    impl PortReserver for Fake {
        fn reserve(&mut self, port: u16, protocol: Protocol) -> std::io::Result<()> {
            if self.busy.contains(&(port, protocol)) || !self.held.insert((port, protocol)) {
                return Err(std::io::ErrorKind::AddrInUse.into());
            }
            Ok(())
        }
        fn release(&mut self, port: u16, protocol: Protocol) {
            self.held.remove(&(port, protocol));
        }
    }

    fn target(ip: [u8; 4], ports: &[(u16, Protocol)]) -> PodTarget {
        PodTarget {
            ip: Some(ip.into()),
            ports: ports.iter().copied().collect(),
        }
    }

    fn range(s: &str) -> PortRange {
        s.parse().unwrap()
    }

    fn ports_of<R: PortReserver>(a: &Allocator<R>) -> Vec<(String, u16, u16)> {
        a.mappings()
            .map(|m| (m.pod.clone(), m.pod_port, m.node_port))
            .collect()
    }

    #[test]
    fn allocation_skips_busy_ports_and_is_stable() {
        let fake = Fake {
            busy: [(61001, Protocol::Tcp)].into(),
            ..Default::default()
        };
        let mut a = Allocator::new(range("61000-61009"), fake);
        let mut t = BTreeMap::from([
            (
                "d/a".to_string(),
                target([10, 0, 0, 2], &[(80, Protocol::Tcp), (53, Protocol::Udp)]),
            ),
            (
                "d/b".to_string(),
                target([10, 0, 0, 3], &[(80, Protocol::Tcp)]),
            ),
        ]);
        assert!(a.sync(&t).is_empty());
        // 53/udp gets 61000; 61001/tcp is busy and skipped.
        assert_eq!(
            ports_of(&a),
            vec![
                ("d/a".into(), 53, 61000),
                ("d/a".into(), 80, 61002),
                ("d/b".into(), 80, 61003)
            ]
        );
        // An IP change keeps the node port; a removed pod frees its port; a new pod gets the
        // next port round-robin, not the freed one.
        t.get_mut("d/a").unwrap().ip = Some(Ipv4Addr::new(10, 0, 0, 9));
        t.remove("d/b");
        t.insert("d/c".into(), target([10, 0, 0, 4], &[(80, Protocol::Tcp)]));
        assert!(a.sync(&t).is_empty());
        assert_eq!(
            ports_of(&a),
            vec![
                ("d/a".into(), 53, 61000),
                ("d/a".into(), 80, 61002),
                ("d/c".into(), 80, 61004)
            ]
        );
        assert!(
            a.mappings()
                .all(|m| m.pod != "d/a" || m.pod_ip == Ipv4Addr::new(10, 0, 0, 9))
        );
        assert!(
            !a.reserver.held.contains(&(61003, Protocol::Tcp)),
            "port of d/b not released"
        );
        // Nothing wanted: everything released.
        a.sync(&BTreeMap::new());
        assert!(a.reserver.held.is_empty());
    }

    /// A reserver failing with another error than "in use".
    struct OutOfFds;
    impl PortReserver for OutOfFds {
        fn reserve(&mut self, _: u16, _: Protocol) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(libc::EMFILE))
        }
        fn release(&mut self, _: u16, _: Protocol) {}
    }

    #[test]
    fn a_reservation_failure_other_than_in_use_is_reported_as_such() {
        let mut a = Allocator::new(range("61000-61009"), OutOfFds);
        let t = BTreeMap::from([(
            "d/a".to_string(),
            target([10, 0, 0, 2], &[(80, Protocol::Tcp)]),
        )]);
        let failed = a.sync(&t);
        assert_eq!(failed.len(), 1);
        assert!(
            failed[0].contains("61000") && failed[0].contains("Too many open files"),
            "{failed:?}"
        );
    }

    #[test]
    fn exhausted_range_is_reported() {
        let mut a = Allocator::new(range("61000-61001"), Fake::default());
        let t = BTreeMap::from([(
            "d/a".to_string(),
            target(
                [10, 0, 0, 2],
                &[(1, Protocol::Tcp), (2, Protocol::Tcp), (3, Protocol::Tcp)],
            ),
        )]);
        let failed = a.sync(&t);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].contains("61000-61001"), "{failed:?}");
        assert_eq!(a.mappings().count(), 2);
    }

    #[test]
    fn restore_keeps_ports_and_drops_out_of_range_duplicate_and_taken_ones() {
        let m = |pod: &str, pod_port, node_port| NplMapping {
            pod: pod.into(),
            pod_port,
            protocol: Protocol::Tcp,
            pod_ip: Ipv4Addr::new(10, 0, 0, 2),
            node_port,
        };
        let fake = Fake {
            busy: [(61003, Protocol::Tcp)].into(),
            ..Default::default()
        };
        let persisted = vec![
            m("d/a", 80, 61005),
            m("d/b", 80, 62500), // outside the new range
            m("d/c", 80, 61005), // duplicate node port
            m("d/d", 80, 61003), // taken by another process meanwhile
        ];
        let (mut a, dropped) = Allocator::restore(range("61000-61009"), fake, persisted);
        assert_eq!(ports_of(&a), vec![("d/a".into(), 80, 61005)]);
        assert_eq!(dropped.mappings.len(), 3, "{:?}", dropped.reasons);
        // The dropped ones get new ports in range on the next sync; d/a keeps its port.
        let t: BTreeMap<String, PodTarget> = ["d/a", "d/b", "d/c", "d/d"]
            .iter()
            .map(|p| (p.to_string(), target([10, 0, 0, 2], &[(80, Protocol::Tcp)])))
            .collect();
        assert!(a.sync(&t).is_empty());
        let got = ports_of(&a);
        assert_eq!(got[0], ("d/a".into(), 80, 61005));
        assert!(
            got.iter()
                .all(|(_, _, p)| (61000..=61009).contains(p) && *p != 61003),
            "{got:?}"
        );
        let distinct: BTreeSet<u16> = got.iter().map(|g| g.2).collect();
        assert_eq!(distinct.len(), 4);
    }

    #[test]
    fn annotation_is_antreas_exact_json() {
        let m = |pod_port, protocol, node_port| NplMapping {
            pod: "default/web-1".into(),
            pod_port,
            protocol,
            pod_ip: Ipv4Addr::new(10, 244, 1, 2),
            node_port,
        };
        let a = annotations(
            &[
                m(8080, Protocol::Udp, 61003),
                m(8080, Protocol::Tcp, 61002),
                m(80, Protocol::Tcp, 61000),
            ],
            Ipv4Addr::new(172, 18, 0, 11),
        );
        assert_eq!(
            a["default/web-1"],
            r#"[{"podPort":80,"nodeIP":"172.18.0.11","nodePort":61000,"protocol":"tcp","ipFamily":"IPv4"},{"podPort":8080,"nodeIP":"172.18.0.11","nodePort":61002,"protocol":"tcp","ipFamily":"IPv4"},{"podPort":8080,"nodeIP":"172.18.0.11","nodePort":61003,"protocol":"udp","ipFamily":"IPv4"}]"#
        );
    }

    #[tokio::test]
    async fn status_view_is_a_pod_list_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let v = LocalStatusView::new(dir.path());
        let ann = BTreeMap::from([("shop/web-1".to_string(), "[]".to_string())]);
        v.publish_npl(&ann).await.unwrap();
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(v.path()).unwrap()).unwrap();
        assert_eq!(doc["kind"], "PodList");
        assert_eq!(doc["items"][0]["metadata"]["namespace"], "shop");
        assert_eq!(doc["items"][0]["metadata"]["name"], "web-1");
        assert_eq!(
            doc["items"][0]["metadata"]["annotations"]["nodeportlocal.antrea.io"],
            "[]"
        );
        v.publish_npl(&BTreeMap::new()).await.unwrap();
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(v.path()).unwrap()).unwrap();
        assert_eq!(doc["items"], serde_json::json!([]));
        assert!(!v.path().with_extension("json.tmp").exists());
    }

    #[test]
    fn port_range_parses_and_rejects_nonsense() {
        assert_eq!(
            range("61000-62000"),
            PortRange {
                first: 61000,
                last: 62000
            }
        );
        assert_eq!(range("61000-62000").len(), 1001);
        for bad in ["61000", "62000-61000", "0-10", "1-70000", "a-b", ""] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn socket_reserver_skips_a_port_another_socket_holds() {
        // A port bound in this process by someone else: the reserver must refuse it.
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = other.local_addr().unwrap().port();
        let mut r = SocketReserver::default();
        assert!(r.reserve(port, Protocol::Tcp).is_err());
        drop(other);
        // A free one is held until released; a second binder then fails.
        let free = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        r.reserve(port, Protocol::Tcp).unwrap();
        assert!(std::net::TcpListener::bind(("0.0.0.0", port)).is_err());
        r.release(port, Protocol::Tcp);
        assert!(std::net::TcpListener::bind(("0.0.0.0", port)).is_ok());
    }
}
