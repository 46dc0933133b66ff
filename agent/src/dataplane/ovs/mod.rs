//! The Open vSwitch backend: an integration bridge programmed over OVSDB and OpenFlow 1.5.
//!
//! ovsdb-server and ovs-vswitchd are separate processes (in a DaemonSet, their own
//! container); the agent talks to them over `db.sock` ([`ovsdb`]) and the bridge's
//! management socket `<run_dir>/<bridge>.mgmt` ([`openflow`]). Nothing on the CNI path spawns
//! a process. The packet path is the pipeline in [`pipeline`]: same observable behaviour as
//! the eBPF backend (the node routes for every pod, spoof guard, per-pod counters).
//!
//! What this module owns, in the node's network namespace:
//! - the bridge (default `br-int`: `protocols=OpenFlow15`, `fail_mode=secure`, the datapath
//!   type from config), created or adopted; `external_ids:ferrea-round` records the flow round;
//! - the gateway internal port [`GATEWAY_IFNAME`] with a fixed MAC
//!   ([`pipeline::gateway_mac`]) and, in the kernel, the address `gateway/prefix` on it (which
//!   gives the node its route to the pod CIDR);
//! - one port per pod, named after the pod's host veth, `external_ids` `ferrea-type=pod`,
//!   `container-id`, `ip`, `mac`;
//! - every flow whose cookie has a ferrea kind ([`pipeline::cookie`]);
//! - `Open_vSwitch.other_config:flow-restore-wait`, removed once pods are reconciled.
//!
//! It never touches other bridges, ports without `ferrea-type`, flows without a ferrea
//! cookie, or pod veths (the agent core creates and deletes them).
//!
//! Other nodes (encap mode, see [`pipeline`] for the flows):
//! - the tunnel port [`TUNNEL_IFNAME`] on the integration bridge: `type=vxlan` or `geneve`,
//!   `options:remote_ip=flow`, `options:key=flow` (flows set [`TUNNEL_VNI`]), `dst_port` when
//!   not the IANA one, `ofport_request` [`TUNNEL_OFPORT`], `external_ids:ferrea-type=tunnel`;
//!   removed in `noEncap` mode;
//! - per remote node: flows under its own cookie (kind remote, id = its pod CIDR), a route
//!   `<pod CIDR> via <its gateway> dev ferrea-gw0 onlink src <our gateway>` (so the node itself
//!   reaches remote pods through the tunnel), and an ARP answer for its gateway;
//! - with the userspace datapath only: the physical bridge [`uplink::PHY_BRIDGE`]
//!   (`datapath_type=netdev`, `fail_mode=standalone`, so OVS's own NORMAL flow switches it),
//!   holding the transport interface as a port (`ferrea-type=uplink`) while the node's
//!   address, MAC and routes move to the bridge's internal port. OVS's userspace tunnelling
//!   sends encapsulated packets only through such a bridge (see [`uplink`]). A restarted agent
//!   finds the transport address on that port and adopts the bridge. OVS keeps its tap
//!   devices across a vswitchd restart, but a reboot loses them: the configuration moved is
//!   recorded in the bridge's `external_ids` and put back by
//!   [`OvsDataplane::restore_transport`] (before the core's transport discovery) and on every
//!   OpenFlow reconnect.
//!
//! Egress ([`Dataplane::set_egress`], encap mode; flows in [`pipeline::egress_flows`]): a
//! local pod whose Egress IP another node holds has its packets to non-exempt destinations
//! tunnelled to that node with the Egress id as the tunnel key; packets arriving with a key
//! this node holds go to the gateway port with the marker source MAC
//! ([`super::egress_marker_mac`]) for the node's stack to mark, route and SNAT; any other
//! non-zero key drops. All Egress flows share the cookie kind [`cookie::KIND_EGRESS`] and are
//! replaced as one set in one atomic bundle. A restarted agent leaves the previous process's
//! Egress flows in place (steered pods keep their egress IP) until its first `set_egress`
//! replaces them; [`Dataplane::retain_pods`] does not delete them. After an ovs-vswitchd
//! restart they are re-installed with the other flows. In `noEncap` mode there is no tunnel:
//! steered pods are refused, held ids need no flows.
//!
//! With the kernel datapath (`datapath_type=system`, the openvswitch module) the kernel
//! encapsulates and routes tunnel packets itself: only the tunnel port and the flows are
//! needed. That path is not exercised here: this machine has no openvswitch module.
//!
//! Restart: a new agent bumps the round, re-installs the node flows, the core re-adds every
//! kept pod (identical flows are replaced in place by OpenFlow `add`, counters kept, so no
//! packet sees a missing flow), and [`Dataplane::retain_pods`] then deletes whatever is left
//! of older rounds. If ovs-vswitchd restarts, the OpenFlow connection breaks; the next
//! operation reconnects and re-installs every flow the agent knows.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;

use super::{
    Cause, Dataplane, DataplaneError, DumpSection, EgressPlan, ErrorsOf, NodeNetwork, PacketTrace,
    PodEndpoint, PodStats, RemoteNode, TUNNEL_IFNAME, TUNNEL_VNI, TracePacket, Tunnel, unmet,
};
use crate::kernel::routes::NodeRoute;

pub mod host;
pub mod openflow;
pub mod ovsdb;
pub mod pipeline;
pub mod trace;
pub mod unixctl;
pub mod uplink;

use host::{LinuxHost, NodeKernel};
use openflow::codec::GROUP_ALL;
use openflow::codec::TABLE_ALL;
use openflow::{BundleMsg, GroupMod};
use openflow::{ConnError, FlowMod, MgmtSocket, OpenFlow, OpenFlowConnector};
use ovsdb::{Ovsdb, OvsdbClient, map, named_uuid, parse_map, parse_uuid};
use pipeline::{Counter, NodeFacts, PodFacts, RemoteFacts, ServiceFacts, TunnelFacts, cookie};
use uplink::{PHY_BRIDGE, UplinkConfig};

pub use super::GATEWAY_IFNAME;
const BACKEND: &str = "ovs";
/// This backend\'s error builders.
const ERR: ErrorsOf = ErrorsOf(BACKEND);
/// `external_ids` key marking what ferrea created, and its values.
const TYPE_KEY: &str = "ferrea-type";
const ROUND_KEY: &str = "ferrea-round";
/// `external_ids` key of the physical bridge holding what moved from the uplink (JSON).
const UPLINK_KEY: &str = "ferrea-uplink";
/// The OpenFlow port number the tunnel port requests: clear of the gateway port (numbered
/// first by vswitchd, normally 1) and of the pods' numbers (100 and up).
pub const TUNNEL_OFPORT: u32 = 10;
/// How long to wait for vswitchd to assign an ofport or create the management socket.
const VSWITCHD_TIMEOUT: Duration = Duration::from_secs(10);

pub use crate::config::{DatapathType, OvsConfig};

/// The management socket of `cfg`'s bridge.
fn mgmt_socket(cfg: &OvsConfig) -> PathBuf {
    cfg.run_dir.join(format!("{}.mgmt", cfg.bridge))
}

/// What exists after `init_node`.
#[derive(Clone)]
struct NodeState {
    node: NodeNetwork,
    round: u16,
    facts: NodeFacts,
    pods: HashMap<Ipv4Addr, PodFacts>,
    /// Pods whose port number was requested at ADD and not yet compared with the number
    /// vswitchd assigned; `maintain` reads OVSDB only while this is not empty.
    unverified: HashSet<Ipv4Addr>,
    /// Pods whose flows `prepare_pod` installed under their requested port number, for
    /// `add_pod` to use instead of installing them again.
    prepared: HashSet<Ipv4Addr>,
    /// `flow-restore-wait` was set when we started: clear it after reconciliation.
    flow_restore_wait: bool,
    /// The tunnel to other nodes (encap mode).
    tunnel: Option<TunnelFacts>,
    /// The remote nodes whose flows are installed (encap mode), sorted.
    remotes: Vec<RemoteFacts>,
    /// The Egress plan whose flows are installed (normalised: sorted, deduplicated).
    egress: EgressPlan,
    /// What moved from the transport interface to the physical bridge (userspace datapath).
    uplink: Option<UplinkConfig>,
    /// The userspace datapath tunnels: the gateway device computes its own TX checksums
    /// (see [`offload`]).
    gw_tx_checksum_off: bool,
    /// The last Service plan given to `set_services` (ferrea's proxy).
    service_plan: crate::proxy::ServicePlan,
    /// The frontends of that plan the bridge load-balances, whose groups and flows are
    /// installed.
    services: Vec<ServiceFacts>,
    /// The bridge's datapath is the userspace one (`netdev`): its connection tracker is
    /// vswitchd's own, not the kernel's.
    userspace: bool,
}

/// The OVS dataplane of one node. Create it anywhere; call it from a thread in the node's
/// network namespace (the gateway address is set through netlink).
///
/// Its side effects go through three seams: [`Ovsdb`] (ovsdb-server), [`OpenFlow`] connections
/// from an [`OpenFlowConnector`] (ovs-vswitchd) and [`NodeKernel`] (the node's kernel), so
/// [`OvsDataplane::with_parts`] can run it on fakes.
pub struct OvsDataplane {
    cfg: OvsConfig,
    db: Arc<dyn Ovsdb>,
    connector: Arc<dyn OpenFlowConnector>,
    host: Arc<dyn NodeKernel>,
    of: tokio::sync::Mutex<Option<Arc<dyn OpenFlow>>>,
    state: Mutex<Option<NodeState>>,
    /// Serialises installing the Service groups and flows: `set_services` and
    /// `set_remote_nodes` (which frontends the bridge balances depends on the remote pod
    /// CIDRs) run from different controllers.
    services_lock: tokio::sync::Mutex<()>,
}

fn pod_err<E: Into<Cause>>(op: &'static str, ep: &PodEndpoint) -> impl FnOnce(E) -> DataplaneError {
    ERR.pod(op, &ep.host_ifname)
}

/// Gives a node-level error (from the OpenFlow helpers) the pod's interface as context.
fn for_pod(op: &'static str, ep: &PodEndpoint, e: DataplaneError) -> DataplaneError {
    match e {
        DataplaneError::Other { source, .. } => pod_err(op, ep)(*source),
        e => e,
    }
}

impl OvsDataplane {
    /// A backend for `cfg` (no I/O until [`Dataplane::init_node`]).
    pub fn new(cfg: OvsConfig) -> Self {
        let db = Arc::new(OvsdbClient::new(cfg.ovsdb_socket.clone()));
        let connector = Arc::new(MgmtSocket(mgmt_socket(&cfg)));
        Self::with_parts(cfg, db, connector, Arc::new(LinuxHost))
    }

    /// A backend for `cfg` on the given seams (tests pass fakes; [`Self::new`] the real ones).
    pub fn with_parts(
        cfg: OvsConfig,
        db: Arc<dyn Ovsdb>,
        connector: Arc<dyn OpenFlowConnector>,
        host: Arc<dyn NodeKernel>,
    ) -> Self {
        Self {
            cfg,
            db,
            connector,
            host,
            of: tokio::sync::Mutex::new(None),
            state: Mutex::new(None),
            services_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The bridge's management socket.
    pub fn mgmt_socket(&self) -> PathBuf {
        mgmt_socket(&self.cfg)
    }

    /// The flow round this process installs (0 before `init_node`).
    pub fn round(&self) -> u16 {
        self.state
            .lock()
            .expect("state lock")
            .as_ref()
            .map_or(0, |s| s.round)
    }

    fn node_state(&self) -> Option<NodeState> {
        self.state.lock().expect("state lock").clone()
    }

    /// Every flow the agent wants now: node and tunnel flows, all known pods' and remote
    /// nodes' flows, the Egress flows.
    fn desired_flows(s: &NodeState) -> Vec<FlowMod> {
        let mut f = pipeline::node_flows(s.round, &s.facts);
        if let Some(t) = &s.tunnel {
            f.extend(pipeline::tunnel_flows(s.round, &s.facts, t));
            f.extend(pipeline::egress_flows(s.round, &s.facts, t, &s.egress));
        }
        for p in s.pods.values() {
            f.extend(pipeline::pod_flows(s.round, &s.facts, p));
        }
        for r in &s.remotes {
            f.extend(pipeline::remote_flows(s.round, &s.facts, r));
        }
        f.extend(pipeline::service_flows(s.round, &s.services).1);
        f
    }

    /// Every group the agent wants now (the load-balanced Service frontends').
    fn desired_groups(s: &NodeState) -> Vec<GroupMod> {
        pipeline::service_flows(s.round, &s.services).0
    }

    /// One bundle replacing every group and installing every desired flow: all groups are
    /// deleted first (a connection that broke without a vswitchd restart left them there;
    /// the flows referring to them go with them and come back in the same bundle).
    fn resync_msgs(s: &NodeState) -> Vec<BundleMsg> {
        let mut m = vec![BundleMsg::Group(GroupMod::delete(GROUP_ALL))];
        m.extend(Self::desired_groups(s).into_iter().map(BundleMsg::Group));
        m.extend(Self::desired_flows(s).into_iter().map(BundleMsg::Flow));
        m
    }

    /// The OpenFlow connection, reconnecting if it broke (vswitchd restarted). After a
    /// reconnect every desired flow is re-installed before anyone else uses the connection.
    /// Installs (or replaces) the flows of one pod in one bundle and records them.
    async fn install_pod_flows(&self, s: &NodeState, p: PodFacts) -> Result<(), DataplaneError> {
        // A re-add with a different port or MAC: the old flows go in the same bundle.
        let mut mods = vec![FlowMod::delete_by_cookie(
            cookie::pod(0, p.ip),
            cookie::POD_MASK,
        )];
        mods.extend(pipeline::pod_flows(s.round, &s.facts, &p));
        if s.pods.get(&p.ip) == Some(&p) {
            // Same facts: plain adds replace the flows in place and keep their counters.
            mods.remove(0);
        }
        let t = std::time::Instant::now();
        self.of_bundle("install pod flows", &mods).await?;
        tracing::debug!(
            elapsed_us = t.elapsed().as_micros() as u64,
            "pod flows installed"
        );
        if let Some(st) = self.state.lock().expect("state lock").as_mut() {
            st.pods.insert(p.ip, p);
        }
        Ok(())
    }

    /// Rows of `table` that ferrea created for pods (`external_ids:ferrea-type=pod`).
    async fn select_pod_rows(
        &self,
        op: &'static str,
        table: &str,
        columns: &[&str],
    ) -> Result<Vec<serde_json::Value>, DataplaneError> {
        let r = self
            .db
            .transact(
                op,
                vec![json!({"op": "select", "table": table,
                    "where": [["external_ids", "includes", map(&[(TYPE_KEY, "pod")])]],
                    "columns": columns})],
            )
            .await
            .map_err(ERR.other(op, format!("{table} rows")))?;
        Ok(r[0]["rows"].as_array().cloned().unwrap_or_default())
    }

    /// Compares the port numbers vswitchd assigned to newly added pods' interfaces with those
    /// their flows use (requested at ADD) and re-installs the flows of any pod whose number
    /// differs. Reads OVSDB only while some pod is unverified.
    async fn verify_ofports(&self) -> Result<(), DataplaneError> {
        let Some(s) = self.node_state() else {
            return Ok(());
        };
        if s.unverified.is_empty() {
            return Ok(());
        }
        let rows = self
            .select_pod_rows("read pod ofports", "Interface", &["external_ids", "ofport"])
            .await?;
        for row in rows {
            let Some(port) = row["ofport"].as_i64().filter(|p| *p > 0) else {
                continue; // not attached yet
            };
            let ip = parse_map(&row["external_ids"])
                .get("ip")
                .and_then(|v| v.parse::<Ipv4Addr>().ok());
            let Some(ip) = ip.filter(|ip| s.unverified.contains(ip)) else {
                continue;
            };
            if let Some(st) = self.state.lock().expect("state lock").as_mut() {
                st.unverified.remove(&ip);
            }
            if let Some(p) = s.pods.get(&ip)
                && i64::from(p.port) != port
            {
                tracing::warn!(ip = %p.ip, ofport = port, "pod port number differs from the requested one; re-installing its flows");
                let fixed = PodFacts {
                    port: port as u32,
                    ..p.clone()
                };
                self.install_pod_flows(&s, fixed).await?;
            }
        }
        Ok(())
    }

    async fn of(&self) -> Result<Arc<dyn OpenFlow>, DataplaneError> {
        let mut g = self.of.lock().await;
        if let Some(c) = g.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let reconnect = g.is_some();
        let path = self.mgmt_socket();
        let start = Instant::now();
        let mut delay = Duration::from_millis(10);
        let c = loop {
            match self.connector.connect().await {
                Ok(c) => break c,
                // vswitchd creates the socket shortly after the bridge row appears.
                Err(e) if start.elapsed() > VSWITCHD_TIMEOUT => {
                    return Err(ERR.other("openflow connect", path.display())(e));
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
            }
        };
        if reconnect && let Some(s) = self.node_state() {
            // A restarted vswitchd recreated the physical bridge's port and the gateway device
            // without their addresses.
            if let Some(u) = &s.uplink {
                self.restore_uplink(u).await?;
            }
            self.host
                .configure_gateway(&s.node, s.gw_tx_checksum_off)
                .await?;
            tracing::info!(bridge = %self.cfg.bridge, "openflow reconnected, re-installing flows");
            c.bundle_msgs("resync flows", &Self::resync_msgs(&s))
                .await
                .map_err(ERR.other("resync flows", format!("bridge {}", self.cfg.bridge)))?;
        }
        *g = Some(c.clone());
        Ok(c)
    }

    /// Runs a bundle, retrying once on a fresh connection if the old one had broken (the
    /// reconnect re-installs every desired flow first; adds and deletes are idempotent).
    async fn of_bundle(&self, op: &'static str, mods: &[FlowMod]) -> Result<(), DataplaneError> {
        let c = self.of().await?;
        match c.bundle(op, mods).await {
            Err(ConnError::Closed { .. } | ConnError::Io { .. }) => {
                let c = self.of().await?;
                c.bundle(op, mods)
                    .await
                    .map_err(ERR.other(op, format!("bridge {}", self.cfg.bridge)))
            }
            r => r.map_err(ERR.other(op, format!("bridge {}", self.cfg.bridge))),
        }
    }

    /// [`Self::of_bundle`] of flow-mods and group-mods.
    async fn of_bundle_msgs(
        &self,
        op: &'static str,
        msgs: &[BundleMsg],
    ) -> Result<(), DataplaneError> {
        let c = self.of().await?;
        match c.bundle_msgs(op, msgs).await {
            Err(ConnError::Closed { .. } | ConnError::Io { .. }) => {
                let c = self.of().await?;
                c.bundle_msgs(op, msgs)
                    .await
                    .map_err(ERR.other(op, format!("bridge {}", self.cfg.bridge)))
            }
            r => r.map_err(ERR.other(op, format!("bridge {}", self.cfg.bridge))),
        }
    }

    /// Installs the groups and flows of the frontends of `plan` the bridge load-balances
    /// (see [`Dataplane::set_services`]), replacing whatever Service groups and flows are
    /// there (this process's or an earlier one's), in one atomic bundle. Nothing is sent when
    /// the switch already holds exactly these flows of this round.
    /// `plan`: `None` re-applies the last plan (remote nodes changed).
    async fn apply_services(
        &self,
        plan: Option<&crate::proxy::ServicePlan>,
    ) -> Result<(), DataplaneError> {
        let _serial = self.services_lock.lock().await;
        let s = self
            .node_state()
            .ok_or_else(|| ERR.not_init("set_services"))?;
        let plan = match plan {
            Some(p) => p,
            None if s.service_plan.vips.is_empty() => return Ok(()),
            None => &s.service_plan,
        };
        let (services, left) = pipeline::service_frontends(plan, &s.facts, &s.remotes);
        let (groups, flows) = pipeline::service_flows(s.round, &services);
        let present = self
            .of_dump(
                TABLE_ALL,
                cookie::make(0, cookie::KIND_SERVICE, 0),
                cookie::KIND_MASK,
            )
            .await?;
        let unchanged = s.services == services
            && present.len() == flows.len()
            && present.iter().all(|f| cookie::round(f.cookie) == s.round);
        if !unchanged {
            let mut msgs = vec![
                BundleMsg::Flow(FlowMod::delete_by_cookie(
                    cookie::make(0, cookie::KIND_SERVICE, 0),
                    cookie::KIND_MASK,
                )),
                // ferrea's groups are all Service groups: an earlier process's go too.
                BundleMsg::Group(GroupMod::delete(GROUP_ALL)),
            ];
            msgs.extend(groups.into_iter().map(BundleMsg::Group));
            msgs.extend(flows.iter().cloned().map(BundleMsg::Flow));
            self.of_bundle_msgs("service groups and flows", &msgs)
                .await?;
            tracing::info!(
                load_balanced = services.len(),
                left_to_stack = left.len(),
                flows = flows.len(),
                replaced = present.len(),
                "service groups and flows installed"
            );
            for (name, why) in &left {
                tracing::debug!(frontend = %name, reason = ?why, "Service frontend left to the node's stack");
            }
        }
        let stale = stale_udp(&s.services, &services);
        if let Some(st) = self.state.lock().expect("state lock").as_mut() {
            st.service_plan = plan.clone();
            st.services = services;
        }
        if !stale.is_empty() {
            self.flush_udp(&stale, s.userspace).await?;
        }
        Ok(())
    }

    /// Deletes the userspace datapath's conntrack entries (zone [`pipeline::CT_ZONE`]) of UDP
    /// frontends whose backends changed or that the bridge no longer load-balances: UDP has
    /// no end, so a client that keeps sending would stay with a removed backend. (With the
    /// kernel datapath the zone is the kernel's, and the service controller's netlink flush
    /// of every zone covers it.)
    ///
    /// First the revalidators must have finished a full cycle (twice `revalidator/wait`): the
    /// datapath's cached flows go on executing the old group's buckets until they are
    /// revalidated, and a packet in that window would commit a new entry to a removed
    /// backend right after the flush.
    async fn flush_udp(
        &self,
        frontends: &[(Ipv4Addr, u16)],
        userspace: bool,
    ) -> Result<(), DataplaneError> {
        let sock = match unixctl::control_socket(&self.cfg.run_dir) {
            Ok(s) => s,
            Err(e) if !userspace => {
                tracing::debug!(error = %e, "not waiting for the revalidators before the kernel's UDP conntrack flush");
                return Ok(());
            }
            Err(e) => {
                return Err(ERR
                    .other("flush UDP conntrack", "ovs-vswitchd control socket")(
                    e
                ));
            }
        };
        for _ in 0..2 {
            unixctl::call(&sock, "revalidator/wait", &[])
                .await
                .map_err(ERR.other("wait for the revalidators", sock.display()))?;
        }
        if !userspace {
            return Ok(());
        }
        for &(ip, port) in frontends {
            unixctl::flush_conntrack_to(&sock, pipeline::CT_ZONE, ip, 17, port)
                .await
                .map_err(ERR.other("flush UDP conntrack", format!("{ip}:{port}/udp")))?;
        }
        tracing::debug!(frontends = ?frontends, "UDP conntrack entries of changed Service frontends flushed");
        Ok(())
    }

    /// Dumps flows, retrying once on a fresh connection if the old one had broken.
    async fn of_dump(
        &self,
        table: u8,
        cookie: u64,
        mask: u64,
    ) -> Result<Vec<openflow::FlowStats>, DataplaneError> {
        let c = self.of().await?;
        match c.dump_flows(table, cookie, mask).await {
            Err(ConnError::Closed { .. } | ConnError::Io { .. }) => {
                let c = self.of().await?;
                c.dump_flows(table, cookie, mask)
                    .await
                    .map_err(ERR.other("dump flows", format!("bridge {}", self.cfg.bridge)))
            }
            r => r.map_err(ERR.other("dump flows", format!("bridge {}", self.cfg.bridge))),
        }
    }

    /// Creates or adopts the bridge and the gateway port in one transaction each; returns
    /// (round, flow-restore-wait was set, the bridge's datapath type).
    async fn ensure_bridge(
        &self,
        node: &NodeNetwork,
        gw_mac: [u8; 6],
    ) -> Result<(u16, bool, String), DataplaneError> {
        let br = self.cfg.bridge.as_str();
        let r = self
            .db
            .transact(
                "read node state",
                vec![
                    json!({"op": "select", "table": "Open_vSwitch", "where": [], "columns": ["_uuid", "other_config"]}),
                    json!({"op": "select", "table": "Bridge", "where": [["name", "==", br]], "columns": ["_uuid", "external_ids", "datapath_type"]}),
                    json!({"op": "select", "table": "Interface", "where": [["name", "==", GATEWAY_IFNAME]], "columns": ["_uuid"]}),
                ],
            )
            .await
            .map_err(ERR.init("read node state", format!("bridge {br}")))?;
        let root = r[0]["rows"].get(0).cloned();
        let bridge = r[1]["rows"].get(0).cloned();
        let have_gw = r[2]["rows"].get(0).is_some();
        let frw = root
            .as_ref()
            .map(|row| {
                parse_map(&row["other_config"])
                    .get("flow-restore-wait")
                    .map(String::as_str)
                    == Some("true")
            })
            .unwrap_or(false);
        let old_round: u16 = bridge
            .as_ref()
            .and_then(|b| parse_map(&b["external_ids"]).get(ROUND_KEY)?.parse().ok())
            .unwrap_or(0);
        // Round 0 never exists, so a cookie with round 0 is never ours by accident.
        let round = old_round.checked_add(1).unwrap_or(1);
        let round_s = round.to_string();
        let mac = openflow::codec::mac_str(&gw_mac);
        let mut ops = Vec::new();
        // OVSDB's empty datapath_type means the kernel datapath.
        let datapath = match &bridge {
            Some(b) => match b["datapath_type"].as_str() {
                Some("") | None => "system".to_owned(),
                Some(t) => t.to_owned(),
            },
            None => self.cfg.datapath_type.resolve().to_owned(),
        };
        if !have_gw {
            ops.push(
                json!({"op": "insert", "table": "Interface", "uuid-name": "gwif", "row": {
                "name": GATEWAY_IFNAME, "type": "internal", "mac": mac, "mtu_request": node.mtu,
                "external_ids": map(&[(TYPE_KEY, "gateway")])}}),
            );
            ops.push(
                json!({"op": "insert", "table": "Port", "uuid-name": "gwport", "row": {
                "name": GATEWAY_IFNAME, "interfaces": named_uuid("gwif"),
                "external_ids": map(&[(TYPE_KEY, "gateway")])}}),
            );
        } else {
            ops.push(json!({"op": "update", "table": "Interface", "where": [["name", "==", GATEWAY_IFNAME]],
                "row": {"mac": mac, "mtu_request": node.mtu}}));
        }
        match &bridge {
            None => {
                let dp = self.cfg.datapath_type.resolve();
                let mut row = json!({"name": br, "protocols": ovsdb::set(vec![json!("OpenFlow15")]),
                    "fail_mode": "secure", "datapath_type": dp,
                    "external_ids": map(&[(TYPE_KEY, "bridge"), (ROUND_KEY, &round_s)])});
                if !have_gw {
                    row["ports"] = named_uuid("gwport");
                }
                ops.push(json!({"op": "insert", "table": "Bridge", "uuid-name": "br", "row": row}));
                match &root {
                    Some(root) => ops.push(json!({"op": "mutate", "table": "Open_vSwitch",
                        "where": [["_uuid", "==", root["_uuid"]]],
                        "mutations": [["bridges", "insert", named_uuid("br")]]})),
                    // A database nobody initialised (no `ovs-vsctl init`): create the root row.
                    None => ops.push(json!({"op": "insert", "table": "Open_vSwitch",
                        "row": {"bridges": named_uuid("br")}})),
                }
                tracing::info!(
                    bridge = br,
                    datapath_type = dp,
                    "creating the integration bridge"
                );
            }
            Some(b) => {
                // Adopt: keep its datapath (changing it would drop every port's traffic).
                if !have_gw {
                    ops.push(
                        json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", br]],
                        "mutations": [["ports", "insert", named_uuid("gwport")]]}),
                    );
                }
                ops.push(json!({"op": "update", "table": "Bridge", "where": [["name", "==", br]],
                    "row": {"protocols": ovsdb::set(vec![json!("OpenFlow15")]), "fail_mode": "secure"}}));
                ops.push(json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", br]],
                    "mutations": [["external_ids", "delete", ovsdb::set(vec![json!(ROUND_KEY), json!(TYPE_KEY)])],
                                  ["external_ids", "insert", map(&[(TYPE_KEY, "bridge"), (ROUND_KEY, &round_s)])]]}));
                tracing::info!(bridge = br, datapath_type = %b["datapath_type"], round, "adopting the integration bridge");
            }
        }
        self.db
            .transact("create or adopt bridge", ops)
            .await
            .map_err(ERR.init("create or adopt", format!("bridge {br}")))?;
        Ok((round, frw, datapath))
    }

    /// Creates or adopts the flow-based tunnel port in one transaction and returns its
    /// OpenFlow port number.
    async fn ensure_tunnel_port(&self, t: Tunnel) -> Result<u32, DataplaneError> {
        let kind = match t.kind {
            crate::config::TunnelType::Vxlan => "vxlan",
            crate::config::TunnelType::Geneve => "geneve",
        };
        let port_s = t.port.to_string();
        let mut opts = vec![("remote_ip", "flow"), ("key", "flow")];
        if t.port != t.kind.default_port() {
            opts.push(("dst_port", &port_s));
        }
        let ids = map(&[(TYPE_KEY, "tunnel")]);
        let iface = json!({"name": TUNNEL_IFNAME, "type": kind, "options": map(&opts),
            "ofport_request": TUNNEL_OFPORT, "external_ids": ids});
        // "No such port yet" (a wait with timeout 0), then the inserts; if it exists, the
        // wait fails and the existing row is brought to the wanted configuration.
        let ops = vec![
            json!({"op": "wait", "table": "Port", "timeout": 0, "where": [["name", "==", TUNNEL_IFNAME]],
                "columns": ["name"], "until": "==", "rows": []}),
            json!({"op": "insert", "table": "Interface", "uuid-name": "i", "row": iface}),
            json!({"op": "insert", "table": "Port", "uuid-name": "p",
                "row": {"name": TUNNEL_IFNAME, "interfaces": named_uuid("i"), "external_ids": ids}}),
            json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", self.cfg.bridge]],
                "mutations": [["ports", "insert", named_uuid("p")]]}),
        ];
        match self.db.transact("add tunnel port", ops).await {
            Ok(_) => {
                tracing::info!(
                    port = TUNNEL_IFNAME,
                    kind,
                    udp_port = t.port,
                    "tunnel port created"
                )
            }
            Err(e) if e.is_wait_timeout() => {
                let r = self
                    .db
                    .transact(
                        "read tunnel port",
                        vec![json!({"op": "select", "table": "Interface",
                        "where": [["name", "==", TUNNEL_IFNAME]], "columns": ["external_ids"]})],
                    )
                    .await
                    .map_err(ERR.init("read", format!("tunnel port {TUNNEL_IFNAME}")))?;
                let ours = r[0]["rows"].get(0).is_some_and(|row| {
                    parse_map(&row["external_ids"])
                        .get(TYPE_KEY)
                        .map(String::as_str)
                        == Some("tunnel")
                });
                if !ours {
                    return Err(ERR.init("adopt", format!("tunnel port {TUNNEL_IFNAME}"))(
                        unmet(format!(
                            "a port named {TUNNEL_IFNAME} exists that ferrea did not create; \
                             remove it or rename it"
                        )),
                    ));
                }
                self.db
                    .transact(
                        "update tunnel port",
                        vec![json!({"op": "update", "table": "Interface",
                        "where": [["name", "==", TUNNEL_IFNAME]],
                        "row": {"type": kind, "options": map(&opts), "ofport_request": TUNNEL_OFPORT}})],
                    )
                    .await
                    .map_err(ERR.init("update", format!("tunnel port {TUNNEL_IFNAME}")))?;
            }
            Err(e) => return Err(ERR.init("add", format!("tunnel port {TUNNEL_IFNAME}"))(e)),
        }
        let port = self
            .db
            .wait_ofport(TUNNEL_IFNAME, VSWITCHD_TIMEOUT)
            .await
            .map_err(ERR.init(
                "wait for the port number of",
                format!("tunnel port {TUNNEL_IFNAME}"),
            ))?
            .ok_or_else(|| {
                ERR.init("open", format!("tunnel port {TUNNEL_IFNAME}"))(unmet(format!(
                    "vswitchd could not open the {kind} tunnel port {TUNNEL_IFNAME} (UDP port {}); \
                     its log says why (with the kernel datapath: is the {kind} module loaded?)",
                    t.port
                )))
            })?;
        Ok(port as u32)
    }

    /// Removes ferrea's tunnel port, if any (`noEncap` mode).
    async fn remove_tunnel_port(&self) -> Result<(), DataplaneError> {
        let r = self
            .db
            .transact(
                "find tunnel port",
                vec![json!({"op": "select", "table": "Port",
                "where": [["name", "==", TUNNEL_IFNAME], ["external_ids", "includes", map(&[(TYPE_KEY, "tunnel")])]],
                "columns": ["_uuid"]})],
            )
            .await
            .map_err(ERR.init("find", format!("tunnel port {TUNNEL_IFNAME}")))?;
        let uuids: Vec<String> = r[0]["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|row| parse_uuid(&row["_uuid"]))
            .collect();
        if !uuids.is_empty() {
            self.delete_ports("delete tunnel port", &uuids)
                .await
                .map_err(ERR.init("delete", format!("tunnel port {TUNNEL_IFNAME}")))?;
            tracing::info!("noEncap: tunnel port removed");
        }
        Ok(())
    }

    /// Creates or adopts the physical bridge for the userspace datapath's tunnels: the
    /// transport interface becomes its port, the node's address, MAC and routes move to its
    /// internal port (see [`uplink`]). Returns what was moved.
    async fn ensure_uplink(&self, node: &NodeNetwork) -> Result<UplinkConfig, DataplaneError> {
        let r = self
            .db
            .transact(
                "read physical bridge",
                vec![
                    json!({"op": "select", "table": "Bridge", "where": [["name", "==", PHY_BRIDGE]],
                        "columns": ["_uuid", "external_ids", "ports"]}),
                    json!({"op": "select", "table": "Port",
                        "where": [["external_ids", "includes", map(&[(TYPE_KEY, "uplink")])]],
                        "columns": ["_uuid", "name"]}),
                    json!({"op": "select", "table": "Open_vSwitch", "where": [], "columns": ["_uuid"]}),
                ],
            )
            .await
            .map_err(ERR.init("read", format!("bridge {PHY_BRIDGE}")))?;
        let bridge = r[0]["rows"].get(0).cloned();
        let saved: Option<UplinkConfig> = bridge.as_ref().and_then(|b| {
            serde_json::from_str(parse_map(&b["external_ids"]).get(UPLINK_KEY)?).ok()
        });
        let port = r[1]["rows"]
            .get(0)
            .and_then(|p| p["name"].as_str())
            .map(str::to_owned);
        let adopting = node.transport.ifname == PHY_BRIDGE;
        let name = if adopting {
            port.clone()
                .or_else(|| saved.as_ref().map(|s| s.uplink.clone()))
                .ok_or_else(|| {
                    ERR.init("adopt", format!("bridge {PHY_BRIDGE}"))(unmet(format!(
                        "the transport interface is {PHY_BRIDGE}, but that bridge has no uplink \
                         port ferrea recorded; attach the physical interface to it or set \
                         transportInterface"
                    )))
                })?
        } else {
            node.transport.ifname.clone()
        };
        if let Some(p) = port.as_ref().filter(|p| **p != name) {
            return Err(ERR.init("adopt", format!("bridge {PHY_BRIDGE}"))(unmet(
                format!(
                    "{PHY_BRIDGE} already holds uplink {p}, but the transport interface is now \
                     {name}; move the node's address back to {p} or delete the bridge"
                ),
            )));
        }
        let (conn, h, _) = rtnetlink::new_connection()
            .map_err(ERR.init("open a netlink socket for", format!("uplink {name}")))?;
        let task = tokio::spawn(conn);
        let res = async {
            let (uidx, umac, umtu) = uplink::link(&h, &name)
                .await
                .map_err(ERR.init("read", format!("uplink {name}")))?
                .ok_or_else(|| {
                    ERR.init("read", format!("uplink {name}"))(unmet("no such interface"))
                })?;
            let mut cfg = UplinkConfig {
                uplink: name.clone(),
                mac: openflow::codec::mac_str(&umac),
                mtu: umtu,
                addrs: uplink::addrs(&h, uidx)
                    .await
                    .map_err(ERR.init("read the addresses of", format!("uplink {name}")))?,
                routes: uplink::routes(&h, uidx)
                    .await
                    .map_err(ERR.init("read the routes of", format!("uplink {name}")))?,
            };
            if let Some(s) = &saved {
                cfg.merge(s);
            }
            if !cfg.addrs.iter().any(|a| a.ip() == node.transport.ip) {
                return Err(ERR.init("find the node address on", format!("uplink {name}"))(
                    unmet(format!(
                        "the node address {} is neither on the uplink {name} nor recorded on \
                         {PHY_BRIDGE}",
                        node.transport.ip
                    )),
                ));
            }
            let cfg_json = serde_json::to_string(&cfg).expect("json");
            let ids = [(TYPE_KEY, "phy-bridge"), (UPLINK_KEY, cfg_json.as_str())];
            let uplink_ids = map(&[(TYPE_KEY, "uplink")]);
            let mut ops = Vec::new();
            if port.is_none() {
                ops.push(json!({"op": "insert", "table": "Interface", "uuid-name": "ui",
                    "row": {"name": name, "external_ids": uplink_ids}}));
                ops.push(json!({"op": "insert", "table": "Port", "uuid-name": "up",
                    "row": {"name": name, "interfaces": named_uuid("ui"), "external_ids": uplink_ids}}));
            }
            match &bridge {
                None => {
                    ops.push(json!({"op": "insert", "table": "Interface", "uuid-name": "li",
                        "row": {"name": PHY_BRIDGE, "type": "internal", "mtu_request": cfg.mtu}}));
                    ops.push(json!({"op": "insert", "table": "Port", "uuid-name": "lp",
                        "row": {"name": PHY_BRIDGE, "interfaces": named_uuid("li")}}));
                    ops.push(json!({"op": "insert", "table": "Bridge", "uuid-name": "pb", "row": {
                        "name": PHY_BRIDGE, "datapath_type": "netdev", "fail_mode": "standalone",
                        "other_config": map(&[("hwaddr", &cfg.mac)]),
                        "external_ids": map(&ids),
                        "ports": ovsdb::set(vec![named_uuid("lp"), named_uuid("up")])}}));
                    match r[2]["rows"].get(0) {
                        Some(root) => ops.push(json!({"op": "mutate", "table": "Open_vSwitch",
                            "where": [["_uuid", "==", root["_uuid"]]],
                            "mutations": [["bridges", "insert", named_uuid("pb")]]})),
                        None => ops.push(json!({"op": "insert", "table": "Open_vSwitch",
                            "row": {"bridges": named_uuid("pb")}})),
                    }
                    tracing::info!(bridge = PHY_BRIDGE, uplink = %name, "creating the physical bridge for userspace tunnels");
                }
                Some(_) => {
                    if port.is_none() {
                        ops.push(json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", PHY_BRIDGE]],
                            "mutations": [["ports", "insert", named_uuid("up")]]}));
                    }
                    ops.push(json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", PHY_BRIDGE]],
                        "mutations": [
                            ["other_config", "delete", ovsdb::set(vec![json!("hwaddr")])],
                            ["other_config", "insert", map(&[("hwaddr", &cfg.mac)])],
                            ["external_ids", "delete", ovsdb::set(vec![json!(TYPE_KEY), json!(UPLINK_KEY)])],
                            ["external_ids", "insert", map(&ids)]]}));
                    ops.push(json!({"op": "update", "table": "Interface", "where": [["name", "==", PHY_BRIDGE]],
                        "row": {"mtu_request": cfg.mtu}}));
                    tracing::info!(bridge = PHY_BRIDGE, uplink = %name, "adopting the physical bridge");
                }
            }
            self.db
                .transact("create or adopt the physical bridge", ops)
                .await
                .map_err(ERR.init("create or adopt", format!("bridge {PHY_BRIDGE}")))?;
            // The uplink's own IP stack stays out of what OVS carries over it.
            for (key, value) in [("arp_ignore", "8"), ("forwarding", "0"), ("rp_filter", "1")] {
                crate::kernel::sysctl::ensure(&format!("net.ipv4.conf.{name}.{key}"), value)
                    .map_err(ERR.init("isolate from the node's IP stack", format!("uplink {name}")))?;
            }
            let idx = wait_link(PHY_BRIDGE).await?;
            uplink::apply(&h, idx, &cfg)
                .await
                .map_err(ERR.init("move the node's configuration to", format!("interface {PHY_BRIDGE}")))?;
            uplink::strip(&h, uidx)
                .await
                .map_err(ERR.init("strip the node's configuration from", format!("uplink {name}")))?;
            Ok(cfg)
        }
        .await;
        task.abort();
        res
    }

    /// Before transport discovery at agent start: if the physical bridge exists and its
    /// internal port lost the node's address (ovs-vswitchd restarted while the agent was
    /// down and recreated the device bare), puts back what OVSDB records as moved there.
    /// Without this the node's `InternalIP` is on no interface and discovery fails. Returns
    /// whether anything was restored. Does nothing without the bridge.
    pub async fn restore_transport(&self) -> Result<bool, DataplaneError> {
        let r = self
            .db
            .transact(
                "read physical bridge",
                vec![
                    json!({"op": "select", "table": "Bridge", "where": [["name", "==", PHY_BRIDGE]],
                    "columns": ["external_ids"]}),
                ],
            )
            .await
            .map_err(ERR.init("read", format!("bridge {PHY_BRIDGE}")))?;
        let Some(cfg) = r[0]["rows"].get(0).and_then(|b| {
            serde_json::from_str::<UplinkConfig>(parse_map(&b["external_ids"]).get(UPLINK_KEY)?)
                .ok()
        }) else {
            return Ok(false);
        };
        let idx = wait_link(PHY_BRIDGE).await?;
        let (conn, h, _) = rtnetlink::new_connection().map_err(ERR.init(
            "open a netlink socket for",
            format!("interface {PHY_BRIDGE}"),
        ))?;
        let task = tokio::spawn(conn);
        let res = async {
            let have = uplink::addrs(&h, idx)
                .await
                .map_err(ERR.init("read the addresses of", format!("interface {PHY_BRIDGE}")))?;
            if cfg.addrs.iter().all(|a| have.contains(a)) {
                return Ok(false);
            }
            uplink::apply(&h, idx, &cfg)
                .await
                .map_err(ERR.init("restore the node's configuration on", format!("interface {PHY_BRIDGE}")))?;
            tracing::warn!(bridge = PHY_BRIDGE, addrs = ?cfg.addrs, "the physical bridge's port had lost the node's address; restored");
            Ok(true)
        }
        .await;
        task.abort();
        res
    }

    /// Puts the moved configuration back on the physical bridge's internal port (after
    /// ovs-vswitchd recreated it).
    async fn restore_uplink(&self, cfg: &UplinkConfig) -> Result<(), DataplaneError> {
        let idx = wait_link(PHY_BRIDGE).await?;
        let (conn, h, _) = rtnetlink::new_connection().map_err(ERR.other(
            "open a netlink socket for",
            format!("interface {PHY_BRIDGE}"),
        ))?;
        let task = tokio::spawn(conn);
        let r = uplink::apply(&h, idx, cfg).await;
        task.abort();
        r.map_err(ERR.other(
            "restore the node's address on",
            format!("interface {PHY_BRIDGE}"),
        ))
    }

    /// Deletes ports (by UUID) from the bridge; OVSDB garbage-collects Port and Interface.
    async fn delete_ports(
        &self,
        op: &'static str,
        uuids: &[String],
    ) -> Result<(), ovsdb::OvsdbError> {
        if uuids.is_empty() {
            return Ok(());
        }
        let set = ovsdb::set(uuids.iter().map(|u| ovsdb::uuid(u)).collect());
        self.db
            .transact(
                op,
                vec![json!({"op": "mutate", "table": "Bridge",
                "where": [["name", "==", self.cfg.bridge]],
                "mutations": [["ports", "delete", set]]})],
            )
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl Dataplane for OvsDataplane {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn init_node(&self, node: &NodeNetwork) -> Result<(), DataplaneError> {
        let gw_mac = pipeline::gateway_mac(node.gateway);
        let (round, flow_restore_wait, datapath) = self.ensure_bridge(node, gw_mac).await?;
        // The userspace datapath tunnels through a bridge holding the node's address; a
        // bridge made earlier is adopted in any mode (its port carries the node's address).
        let uplink = if (node.tunnel.is_some() && datapath == "netdev")
            || node.transport.ifname == PHY_BRIDGE
        {
            Some(self.ensure_uplink(node).await?)
        } else {
            None
        };
        let tun_port = match node.tunnel {
            Some(t) => Some(self.ensure_tunnel_port(t).await?),
            None => {
                self.remove_tunnel_port().await?;
                None
            }
        };
        let gw_port = self
            .db
            .wait_ofport(GATEWAY_IFNAME, VSWITCHD_TIMEOUT)
            .await
            .map_err(ERR.init(
                "wait for the port number of",
                format!("port {GATEWAY_IFNAME}"),
            ))?
            .ok_or_else(|| {
                ERR.init(
                    "wait for the port number of",
                    format!("port {GATEWAY_IFNAME}"),
                )(unmet("vswitchd assigned none (is ovs-vswitchd running?)"))
            })?;
        let gw_tx_checksum_off = node.tunnel.is_some() && datapath == "netdev";
        self.host
            .configure_gateway(node, gw_tx_checksum_off)
            .await?;
        let facts = NodeFacts {
            gw_port: gw_port as u32,
            gw_mac,
            pod_cidr: node.pod_cidr,
        };
        let tunnel = tun_port.map(|port| TunnelFacts {
            port,
            vni: TUNNEL_VNI,
        });
        // Keep pods, remote nodes and the Egress plan known to this process (init_node twice
        // must not forget them). A plan with steered pods is dropped in noEncap mode (no
        // tunnel; the next set_egress says why).
        let (pods, remotes, mut egress, service_plan, services) = self
            .node_state()
            .map(|s| (s.pods, s.remotes, s.egress, s.service_plan, s.services))
            .unwrap_or_default();
        if node.tunnel.is_none() {
            egress = EgressPlan::default();
        }
        // The node's address now lives on the physical bridge's port (for the noEncap routes
        // through the transport, should the mode change without a restart).
        let mut node = node.clone();
        if uplink.is_some()
            && node.transport.ifname != PHY_BRIDGE
            && let Ok(idx) = self.host.ifindex(PHY_BRIDGE)
        {
            node.transport.ifname = PHY_BRIDGE.into();
            node.transport.ifindex = idx;
        }
        let st = NodeState {
            node,
            round,
            facts,
            pods,
            unverified: HashSet::new(),
            prepared: HashSet::new(),
            flow_restore_wait,
            tunnel,
            remotes,
            egress,
            uplink,
            gw_tx_checksum_off,
            service_plan,
            services,
            userspace: datapath == "netdev",
        };
        *self.state.lock().expect("state lock") = Some(st.clone());
        self.of_bundle("install node flows", &Self::desired_flows(&st))
            .await?;
        tracing::info!(bridge = %self.cfg.bridge, round, gw_port, ?tun_port, "ovs node pipeline installed");
        Ok(())
    }

    async fn restore_transport(&self) -> Result<(), DataplaneError> {
        OvsDataplane::restore_transport(self).await.map(|_| ())
    }

    fn pod_tx_checksum_offload(&self) -> bool {
        // OVS 3.1 does not complete the checksums of packets it tunnels in userspace.
        !self.node_state().is_some_and(|s| s.gw_tx_checksum_off)
    }

    async fn maintain(&self) -> Result<(), DataplaneError> {
        if self.node_state().is_none() {
            return Ok(());
        }
        // `of()` reconnects and re-installs every flow when the connection broke (vswitchd
        // restarted); the echo finds a peer that stopped answering without closing.
        let c = self.of().await?;
        if let Err(e) = c.echo().await {
            tracing::warn!(bridge = %self.cfg.bridge, error = %e, "openflow echo failed; reconnecting");
            self.of().await?;
        }
        self.verify_ofports().await
    }

    async fn set_remote_nodes(&self, nodes: &[RemoteNode]) -> Result<(), DataplaneError> {
        let s = self
            .node_state()
            .ok_or_else(|| ERR.not_init("set_remote_nodes"))?;
        let encap = s.tunnel.is_some();
        let mut remotes: Vec<RemoteFacts> = nodes
            .iter()
            .map(|n| RemoteFacts {
                pod_cidr: n.pod_cidr,
                gateway: n.gateway(),
                node_ip: n.node_ip,
            })
            .collect();
        remotes.sort();
        remotes.dedup();
        let want = if encap { remotes.clone() } else { Vec::new() };
        // Flows: the switch is the truth about which remote nodes have flows (in any round,
        // also those a previous agent process installed): delete those not wanted, add the
        // wanted ones (replacing identical flows in place), in one bundle.
        let present = self
            .of_dump(
                TABLE_ALL,
                cookie::make(0, cookie::KIND_REMOTE, 0),
                cookie::KIND_MASK,
            )
            .await?;
        let want_ids: HashSet<u32> = want
            .iter()
            .map(|r| u32::from(r.pod_cidr.network()))
            .collect();
        let mut mods = Vec::new();
        let mut departed = HashSet::new();
        for f in &present {
            let id = cookie::id(f.cookie);
            if !want_ids.contains(&id) && departed.insert(id) {
                mods.push(FlowMod::delete_by_cookie(
                    cookie::make(0, cookie::KIND_REMOTE, id),
                    cookie::REMOTE_MASK,
                ));
            }
        }
        for r in &want {
            let changed = s
                .remotes
                .iter()
                .any(|o| o.pod_cidr.network() == r.pod_cidr.network() && o != r);
            if changed {
                // Same id, other facts (a new prefix or address): the old flows go first.
                mods.push(FlowMod::delete_by_cookie(
                    cookie::remote(0, r.pod_cidr),
                    cookie::REMOTE_MASK,
                ));
            }
            mods.extend(pipeline::remote_flows(s.round, &s.facts, r));
        }
        if !mods.is_empty() {
            self.of_bundle("remote node flows", &mods).await?;
        }
        if let Some(st) = self.state.lock().expect("state lock").as_mut() {
            st.remotes = want.clone();
        }
        // Which Service frontends the bridge may load-balance depends on the remote pod
        // CIDRs it tunnels to.
        self.apply_services(None).await?;
        // Routes. Encap: into the gateway port towards the remote gateway (declared on-link;
        // the ARP responder answers for it), where the flows tunnel them. noEncap: pods'
        // traffic leaves through the gateway port into the node's stack, which routes it to
        // the remote node over the transport interface.
        let want_routes: Vec<NodeRoute> = if encap {
            let gw_idx = self
                .host
                .ifindex(GATEWAY_IFNAME)
                .map_err(ERR.other("look up", format!("interface {GATEWAY_IFNAME}")))?;
            remotes
                .iter()
                .map(|r| NodeRoute {
                    dst: r.pod_cidr,
                    via: Some(r.gateway),
                    onlink: true,
                    dev: gw_idx,
                    src: Some(s.node.gateway),
                })
                .collect()
        } else {
            remotes
                .iter()
                .map(|r| NodeRoute {
                    dst: r.pod_cidr,
                    via: Some(r.node_ip),
                    onlink: false,
                    dev: s.node.transport.ifindex,
                    src: Some(s.node.gateway),
                })
                .collect()
        };
        let removed = self.host.sync_routes(&want_routes).await?;
        if s.gw_tx_checksum_off {
            // Userspace tunnelling needs the remote node's MAC in vswitchd's own neighbour
            // cache, which it fills by snooping ARP on the physical bridge; without it the
            // first tunnelled packet to a new node is dropped while vswitchd asks. One
            // datagram to the discard port makes the node's stack ARP for each new node now.
            let known: HashSet<Ipv4Addr> = s.remotes.iter().map(|r| r.node_ip).collect();
            let new: Vec<Ipv4Addr> = want
                .iter()
                .map(|r| r.node_ip)
                .filter(|ip| !known.contains(ip))
                .collect();
            self.host.resolve_neighbours(&new);
        }
        if !departed.is_empty() || removed > 0 {
            tracing::info!(
                flows_removed_for = departed.len(),
                routes_removed = removed,
                "state of departed nodes removed"
            );
        }
        Ok(())
    }

    /// Installs a new pod's flows under its requested port number before its veth exists:
    /// every link change in the namespace makes vswitchd reconfigure the bridge (several ms
    /// with a hundred ports), and a bundle sent after the veth appeared waits behind that.
    async fn prepare_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        // Without node state add_pod reports the error; a re-add is left to add_pod.
        let Some(s) = self.node_state().filter(|s| !s.pods.contains_key(&ep.ip)) else {
            return Ok(());
        };
        let Some(port) = requested_ofport(&s.node, ep.ip) else {
            return Ok(());
        };
        let facts = PodFacts {
            port,
            mac: ep.pod_mac,
            ip: ep.ip,
        };
        self.install_pod_flows(&s, facts)
            .await
            .map_err(|e| for_pod("prepare", ep, e))?;
        if let Some(st) = self.state.lock().expect("state lock").as_mut() {
            st.prepared.insert(ep.ip);
        }
        Ok(())
    }

    async fn add_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        let s = self.node_state().ok_or_else(|| ERR.not_init("add_pod"))?;
        let name = ep.host_ifname.as_str();
        // With the userspace (`netdev`) datapath, OVS reads a veth through a packet socket and
        // the kernel still processes every frame on it: it would answer the pod's ARP for the
        // gateway with the veth's MAC and then forward the pod's packets itself, past the
        // spoof guard and twice. So the host side answers no ARP, forwards nothing and drops
        // what would be delivered locally by strict reverse-path filtering (the node routes
        // pod addresses through the gateway port, not through this veth). With the kernel
        // datapath these settings change nothing: OVS takes the frames before the IP stack.
        self.host
            .isolate_port(&ep.host_ifname)
            .map_err(pod_err("isolate from the node's IP stack", ep))?;
        let facts = |port| PodFacts {
            port,
            mac: ep.pod_mac,
            ip: ep.ip,
        };
        let ip = ep.ip.to_string();
        let mac = openflow::codec::mac_str(&ep.pod_mac);
        let ids = map(&[
            (TYPE_KEY, "pod"),
            ("container-id", &ep.container_id),
            ("ip", &ip),
            ("mac", &mac),
        ]);
        // The port number is requested, not awaited: waiting for vswitchd to assign it costs a
        // full bridge reconfiguration per pod (tens of ms, growing with the port count), while
        // a number derived from the pod's address is unique on the node and known at once.
        // Flows may name a port before it exists; `maintain` checks the numbers vswitchd really
        // assigned and re-installs a pod's flows if one differs.
        let requested = requested_ofport(&s.node, ep.ip);
        // OVSDB spells an absent optional value as an empty set.
        let request = requested.map_or_else(|| json!(["set", []]), |p| json!(p));
        // One transaction: "no such port yet" (a wait with timeout 0), then the inserts. If the
        // port exists (re-add, or a restart), the wait fails and we only refresh external_ids.
        let ops = vec![
            json!({"op": "wait", "table": "Port", "timeout": 0, "where": [["name", "==", name]],
                "columns": ["name"], "until": "==", "rows": []}),
            json!({"op": "insert", "table": "Interface", "uuid-name": "i",
                "row": {"name": name, "external_ids": ids, "ofport_request": request}}),
            json!({"op": "insert", "table": "Port", "uuid-name": "p",
                "row": {"name": name, "interfaces": named_uuid("i"), "external_ids": ids}}),
            json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", self.cfg.bridge]],
                "mutations": [["ports", "insert", named_uuid("p")]]}),
        ];
        // A new pod with a requested number: its flows are in already (prepare_pod) or go in
        // now; the port row follows, and the bridge reconfiguration it triggers in vswitchd
        // happens after the CNI request has been answered.
        let prepared = self
            .state
            .lock()
            .expect("state lock")
            .as_mut()
            .is_some_and(|st| st.prepared.remove(&ep.ip));
        let preinstalled = match requested {
            Some(req) if prepared => Some(req),
            Some(req) if !s.pods.contains_key(&ep.ip) => {
                self.install_pod_flows(&s, facts(req))
                    .await
                    .map_err(|e| for_pod("add", ep, e))?;
                Some(req)
            }
            _ => None,
        };
        let t_row = std::time::Instant::now();
        let fresh = match self.db.transact("add pod port", ops).await {
            Ok(_) => true,
            Err(e) if e.is_wait_timeout() => {
                self.db
                    .transact("update pod port", vec![
                        json!({"op": "update", "table": "Port", "where": [["name", "==", name]], "row": {"external_ids": ids}}),
                        json!({"op": "update", "table": "Interface", "where": [["name", "==", name]], "row": {"external_ids": ids}}),
                    ])
                    .await
                    .map_err(pod_err("update port", ep))?;
                false
            }
            Err(e) => return Err(pod_err("add port", ep)(e)),
        };
        tracing::debug!(
            elapsed_us = t_row.elapsed().as_micros() as u64,
            "ovsdb port row written"
        );
        let port = match (fresh, requested) {
            (true, Some(p)) => {
                if let Some(st) = self.state.lock().expect("state lock").as_mut() {
                    st.unverified.insert(ep.ip);
                }
                i64::from(p)
            }
            // A port that already existed (or a CIDR too large to number): ask vswitchd.
            _ => self
                .db
                .wait_ofport(name, VSWITCHD_TIMEOUT)
                .await
                .map_err(pod_err("wait for the port number", ep))?
                .ok_or_else(|| {
                    pod_err("wait for the port number", ep)(unmet(
                        "vswitchd assigned none (interface missing?)",
                    ))
                })?,
        };
        if preinstalled != Some(port as u32) {
            self.install_pod_flows(&s, facts(port as u32))
                .await
                .map_err(|e| for_pod("add", ep, e))?;
        }
        Ok(())
    }

    async fn del_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        self.of_bundle(
            "delete pod flows",
            &[FlowMod::delete_by_cookie(
                cookie::pod(0, ep.ip),
                cookie::POD_MASK,
            )],
        )
        .await
        .map_err(|e| for_pod("del", ep, e))?;
        if let Some(st) = self.state.lock().expect("state lock").as_mut() {
            st.pods.remove(&ep.ip);
            st.unverified.remove(&ep.ip);
            st.prepared.remove(&ep.ip);
        }
        let r = self
            .db
            .transact(
                "find pod port",
                vec![json!({"op": "select", "table": "Port",
                "where": [["name", "==", ep.host_ifname]], "columns": ["_uuid", "external_ids"]})],
            )
            .await
            .map_err(pod_err("find port", ep))?;
        let uuids: Vec<String> = r[0]["rows"]
            .as_array()
            .into_iter()
            .flatten()
            // Only ports ferrea created.
            .filter(|row| {
                parse_map(&row["external_ids"])
                    .get(TYPE_KEY)
                    .map(String::as_str)
                    == Some("pod")
            })
            .filter_map(|row| parse_uuid(&row["_uuid"]))
            .collect();
        self.delete_ports("delete pod port", &uuids)
            .await
            .map_err(pod_err("delete port", ep))
    }

    async fn retain_pods(&self, keep: &HashSet<Ipv4Addr>) -> Result<Vec<Ipv4Addr>, DataplaneError> {
        let s = self
            .node_state()
            .ok_or_else(|| ERR.not_init("retain_pods"))?;
        let mut removed: HashSet<Ipv4Addr> = HashSet::new();
        // Ports ferrea created for pods that are not kept.
        let rows = self
            .select_pod_rows("list pod ports", "Port", &["_uuid", "external_ids"])
            .await?;
        let mut stale_ports = Vec::new();
        for row in &rows {
            let ip: Option<Ipv4Addr> = parse_map(&row["external_ids"])
                .get("ip")
                .and_then(|s| s.parse().ok());
            if ip.is_none_or(|ip| !keep.contains(&ip)) {
                stale_ports.extend(parse_uuid(&row["_uuid"]));
                removed.extend(ip);
            }
        }
        // Flows: pods not kept (any round), and node, pod and remote-node flows from an older
        // round. Egress flows are set_egress's: a previous process's keep steering until the
        // first set_egress of this one replaces them.
        let flows = self.of_dump(TABLE_ALL, 0, 0).await?;
        let mut deletes: Vec<(u64, u64)> = Vec::new();
        for f in &flows {
            let kind = cookie::kind(f.cookie);
            if ![cookie::KIND_NODE, cookie::KIND_POD, cookie::KIND_REMOTE].contains(&kind) {
                continue;
            }
            let del = match cookie::pod_ip(f.cookie) {
                Some(ip) if !keep.contains(&ip) => {
                    removed.insert(ip);
                    Some((f.cookie, cookie::POD_MASK))
                }
                _ if cookie::round(f.cookie) != s.round => Some((f.cookie, u64::MAX)),
                _ => None,
            };
            if let Some(d) = del
                && !deletes.contains(&d)
            {
                deletes.push(d);
            }
        }
        let mods: Vec<FlowMod> = deletes
            .iter()
            .map(|&(c, m)| FlowMod::delete_by_cookie(c, m))
            .collect();
        self.of_bundle("delete stale flows", &mods).await?;
        self.delete_ports("delete stale pod ports", &stale_ports)
            .await
            .map_err(ERR.other("delete stale", "pod ports"))?;
        if let Some(st) = self.state.lock().expect("state lock").as_mut() {
            st.pods.retain(|ip, _| keep.contains(ip));
            st.unverified.retain(|ip| keep.contains(ip));
            st.prepared.retain(|ip| keep.contains(ip));
            // Reconciled: vswitchd may now flush what it kept while waiting for us.
            if st.flow_restore_wait {
                st.flow_restore_wait = false;
            }
        }
        if s.flow_restore_wait {
            self.db
                .transact("clear flow-restore-wait", vec![json!({"op": "mutate", "table": "Open_vSwitch", "where": [],
                    "mutations": [["other_config", "delete", ovsdb::set(vec![json!("flow-restore-wait")])]]})])
                .await
                .map_err(ERR.other("clear flow-restore-wait", "table Open_vSwitch"))?;
        }
        let mut out: Vec<Ipv4Addr> = removed.into_iter().collect();
        out.sort();
        Ok(out)
    }

    /// Load-balances local pods' connections to the plan's frontends in the bridge (see
    /// [`pipeline::service_flows`]): frontends with backends, no session affinity and only
    /// pod backends the bridge reaches (this node's, or remote nodes' through the tunnel).
    /// Every other frontend, hairpin connections and everything not from a local pod are
    /// left to the node's stack (ferrea's nftables table). Replaces what was installed, by
    /// this process or an earlier one; an empty plan removes it all.
    async fn set_services(&self, plan: &crate::proxy::ServicePlan) -> Result<(), DataplaneError> {
        self.apply_services(Some(plan)).await
    }

    async fn set_egress(&self, plan: &EgressPlan) -> Result<(), DataplaneError> {
        let s = self
            .node_state()
            .ok_or_else(|| ERR.not_init("set_egress"))?;
        let plan = plan
            .normalised(s.tunnel.is_some(), s.node.transport.ip)
            .map_err(ERR.other("set_egress", "egress plan"))?;
        let want = match &s.tunnel {
            Some(t) => pipeline::egress_flows(s.round, &s.facts, t, &plan),
            None => Vec::new(),
        };
        // The switch is the truth about what is installed (this process's flows, or a previous
        // one's in an older round): nothing to do only if it holds exactly this plan's flows
        // of this round (so the counters of an unchanged plan are kept).
        let present = self
            .of_dump(
                TABLE_ALL,
                cookie::make(0, cookie::KIND_EGRESS, 0),
                cookie::KIND_MASK,
            )
            .await?;
        let unchanged = s.egress == plan
            && present.len() == want.len()
            && present.iter().all(|f| cookie::round(f.cookie) == s.round);
        if !unchanged {
            // One atomic bundle: packets see the old set or the new one, never neither.
            let mut mods = vec![FlowMod::delete_by_cookie(
                cookie::make(0, cookie::KIND_EGRESS, 0),
                cookie::KIND_MASK,
            )];
            mods.extend(want.iter().cloned());
            self.of_bundle("egress flows", &mods).await?;
            tracing::info!(
                steered = plan.steer.len(),
                exempt = plan.exempt.len(),
                held = ?plan.held,
                flows = want.len(),
                replaced = present.len(),
                "egress flows installed"
            );
        }
        if let Some(st) = self.state.lock().expect("state lock").as_mut() {
            st.egress = plan;
        }
        Ok(())
    }

    fn describe_pod(&self, ep: &PodEndpoint) -> Option<String> {
        let g = self.state.lock().expect("state lock");
        let p = g.as_ref()?.pods.get(&ep.ip)?;
        Some(format!(
            "ovs port {} (ofport {}) on {}",
            ep.host_ifname, p.port, self.cfg.bridge
        ))
    }

    async fn dump(&self, pod: Option<&PodEndpoint>) -> Result<Vec<DumpSection>, DataplaneError> {
        let (c, mask) = match pod {
            Some(ep) => (cookie::pod(0, ep.ip), cookie::POD_MASK),
            None => (0, 0),
        };
        let mut flows = self.of_dump(TABLE_ALL, c, mask).await?;
        // Tables in pipeline order, the highest priority (the first to match) first.
        flows.sort_by(|a, b| {
            (a.table, std::cmp::Reverse(a.priority), a.cookie).cmp(&(
                b.table,
                std::cmp::Reverse(b.priority),
                b.cookie,
            ))
        });
        let mut out: Vec<DumpSection> = Vec::new();
        for f in flows {
            let name = format!("table {} {}", f.table, pipeline::Table::name_of(f.table));
            if out.last().is_none_or(|s| s.name != name) {
                out.push(DumpSection::new(
                    name,
                    &[
                        "priority", "match", "actions", "kind", "object", "packets", "bytes",
                        "cookie",
                    ],
                ));
            }
            let (kind, object) = cookie::describe(f.cookie);
            out.last_mut().expect("pushed above").rows.push(vec![
                f.priority.to_string(),
                f.matches,
                f.actions,
                kind.to_owned(),
                object,
                f.packets.to_string(),
                f.bytes.to_string(),
                format!("{:#x}", f.cookie),
            ]);
        }
        Ok(out)
    }

    async fn pod_stats(&self, ep: &PodEndpoint) -> Result<Option<PodStats>, DataplaneError> {
        let flows = self
            .of_dump(TABLE_ALL, cookie::pod(0, ep.ip), cookie::POD_MASK)
            .await
            .map_err(|e| for_pod("stats", ep, e))?;
        if flows.is_empty() {
            return Ok(None);
        }
        let mut st = PodStats::default();
        for f in flows {
            match pipeline::counter_of(f.table, f.priority) {
                Counter::Tx => {
                    st.tx_packets += f.packets;
                    st.tx_bytes += f.bytes;
                }
                Counter::Rx => {
                    st.rx_packets += f.packets;
                    st.rx_bytes += f.bytes;
                }
                Counter::DropSpoofed => st.drop_spoofed += f.packets,
                Counter::DropOther => st.drop_other += f.packets,
                Counter::None => {}
            }
        }
        Ok(Some(st))
    }

    async fn trace(&self, packet: &TracePacket) -> Result<PacketTrace, DataplaneError> {
        let s = self.node_state().ok_or_else(|| ERR.not_init("trace"))?;
        let in_port = s
            .pods
            .get(&packet.src.ip)
            .ok_or_else(|| {
                ERR.other("trace", format!("pod {}", packet.src.ip))(unmet(format!(
                    "no port on {}",
                    self.cfg.bridge
                )))
            })?
            .port;
        let flow = trace::flow(packet, in_port, s.facts.gw_mac);
        let sock = unixctl::control_socket(&self.cfg.run_dir).map_err(ERR.other(
            "find",
            format!(
                "ovs-vswitchd's control socket in {}",
                self.cfg.run_dir.display()
            ),
        ))?;
        let text = unixctl::call(&sock, "ofproto/trace", &[&self.cfg.bridge, &flow])
            .await
            .map_err(ERR.other("ofproto/trace", &flow))?;
        let ports = trace::Ports {
            gateway: s.facts.gw_port,
            tunnel: s.tunnel.map(|t| t.port),
            pods: s.pods.values().map(|p| (p.port, p.ip)).collect(),
        };
        trace::summarise(&text, &self.cfg.bridge, &ports)
            .map_err(ERR.other("summarise the ofproto/trace of", &flow))
    }
}

/// The UDP frontends of `old` that `new` load-balances to other backends or not at all.
fn stale_udp(old: &[ServiceFacts], new: &[ServiceFacts]) -> Vec<(Ipv4Addr, u16)> {
    old.iter()
        .filter(|o| o.proto == 17)
        .filter(|o| {
            !new.iter().any(|n| {
                (n.ip, n.proto, n.port) == (o.ip, o.proto, o.port) && n.backends == o.backends
            })
        })
        .map(|o| (o.ip, o.port))
        .collect()
}

/// Waits for the kernel device of an internal port: vswitchd creates the tap (netdev) or
/// internal device (system) when it adds the port.
async fn wait_link(name: &str) -> Result<u32, DataplaneError> {
    let start = Instant::now();
    loop {
        match nix::net::if_::if_nametoindex(name) {
            Ok(i) => return Ok(i),
            Err(_) if start.elapsed() < VSWITCHD_TIMEOUT => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => {
                return Err(ERR.init("wait for", format!("interface {name}"))(e));
            }
        }
    }
}

/// The OpenFlow port number a pod's interface requests: 100 plus its offset in the pod CIDR,
/// unique on the node and clear of the gateway port and OVS's reserved range. `None` when the
/// CIDR is too large for that (the port number is then awaited from vswitchd).
fn requested_ofport(node: &NodeNetwork, ip: Ipv4Addr) -> Option<u32> {
    let off = u32::from(ip).checked_sub(u32::from(node.pod_cidr.network()))?;
    let port = 100 + off;
    // OFPP_MAX (0xff00) and above are reserved port numbers.
    (port < 0xff00).then_some(port)
}

#[cfg(test)]
mod ofport_tests {
    use super::*;

    fn node(cidr: &str) -> NodeNetwork {
        NodeNetwork::standalone(cidr.parse().unwrap(), 1500)
    }

    #[test]
    fn requested_ports_are_unique_and_clear_of_reserved_numbers() {
        let n = node("10.244.1.0/24");
        assert_eq!(
            requested_ofport(&n, "10.244.1.2".parse().unwrap()),
            Some(102)
        );
        assert_eq!(
            requested_ofport(&n, "10.244.1.254".parse().unwrap()),
            Some(354)
        );
        assert_eq!(requested_ofport(&n, "10.244.0.9".parse().unwrap()), None);
        let big = node("10.0.0.0/16");
        assert_eq!(
            requested_ofport(&big, "10.0.255.254".parse().unwrap()),
            None
        );
        assert_eq!(
            requested_ofport(&big, "10.0.1.0".parse().unwrap()),
            Some(356)
        );
    }
}

/// The backend's logic on fakes of OVSDB, the switch and the node's kernel (no root).
#[cfg(test)]
mod fake_tests {
    use super::*;
    use crate::config::{DatapathType, TunnelType};
    use crate::dataplane::{EgressSteer, Transport};
    use crate::testing::ovs::{FakeHost, FakeOvsdb, FakeSwitch};
    use std::collections::BTreeMap;

    struct Rig {
        db: Arc<FakeOvsdb>,
        sw: Arc<FakeSwitch>,
        host: Arc<FakeHost>,
    }

    impl Rig {
        fn new() -> Self {
            Rig {
                db: Arc::default(),
                sw: Arc::default(),
                host: Arc::default(),
            }
        }

        /// A backend process on the rig's fakes (a second call plays an agent restart).
        fn backend(&self) -> OvsDataplane {
            let cfg = OvsConfig {
                datapath_type: DatapathType::System,
                ..OvsConfig::default()
            };
            OvsDataplane::with_parts(cfg, self.db.clone(), self.sw.clone(), self.host.clone())
        }

        fn cookies_of(&self, kind: u16) -> Vec<u64> {
            self.sw
                .flows()
                .iter()
                .map(|f| f.flow.cookie)
                .filter(|c| cookie::kind(*c) == kind)
                .collect()
        }
    }

    fn node() -> NodeNetwork {
        NodeNetwork::standalone("10.244.1.0/24".parse().unwrap(), 1450)
    }

    fn encap_node() -> NodeNetwork {
        NodeNetwork {
            transport: Transport {
                ifname: "eth0".into(),
                ifindex: 2,
                ip: Ipv4Addr::new(172, 18, 0, 11),
                prefix_len: 16,
                mtu: 1500,
            },
            tunnel: Some(Tunnel {
                kind: TunnelType::Vxlan,
                port: 4789,
            }),
            ..node()
        }
    }

    fn pod(n: u8) -> PodEndpoint {
        PodEndpoint {
            container_id: format!("c{n}"),
            host_ifname: format!("fe-pod{n}"),
            host_ifindex: 0,
            host_mac: [2, 0, 0, 0, 1, n],
            pod_mac: [2, 0, 0, 0, 2, n],
            ip: Ipv4Addr::new(10, 244, 1, n),
        }
    }

    fn facts(gw_port: u32) -> NodeFacts {
        NodeFacts {
            gw_port,
            gw_mac: pipeline::gateway_mac(Ipv4Addr::new(10, 244, 1, 1)),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
        }
    }

    fn text(f: &[FlowMod]) -> Vec<String> {
        let mut v: Vec<String> = f.iter().map(FlowMod::to_ofctl).collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn init_node_creates_bridge_gateway_and_node_flows() {
        let rig = Rig::new();
        let dp = rig.backend();
        dp.init_node(&node()).await.unwrap();
        assert_eq!(dp.round(), 1);
        let br = rig.db.external_ids("Bridge", "br-int").expect("bridge row");
        assert_eq!(br["ferrea-type"], "bridge");
        assert_eq!(br["ferrea-round"], "1");
        let bridge = rig.db.row("Bridge", "br-int").unwrap();
        assert_eq!(bridge["fail_mode"], "secure");
        assert_eq!(bridge["datapath_type"], "system");
        let gw = rig
            .db
            .row("Interface", GATEWAY_IFNAME)
            .expect("gateway interface");
        assert_eq!(gw["type"], "internal");
        assert_eq!(gw["mtu_request"], 1450);
        assert!(rig.db.row("Port", GATEWAY_IFNAME).is_some());
        // noEncap: no tunnel port.
        assert!(rig.db.row("Port", TUNNEL_IFNAME).is_none());
        assert_eq!(
            *rig.host.gateway.lock().unwrap(),
            vec![(Ipv4Addr::new(10, 244, 1, 1), 24, false)]
        );
        // The fake numbers the gateway port 1: the node flows use it.
        let want = text(&pipeline::node_flows(1, &facts(1)));
        assert!(!want.is_empty());
        assert_eq!(
            rig.sw
                .flows_text(cookie::make(1, cookie::KIND_NODE, 0), u64::MAX << 32),
            want
        );
        assert_eq!(rig.sw.bundles().len(), 1, "node flows in one bundle");
    }

    #[tokio::test]
    async fn add_pod_installs_flows_in_one_bundle_and_a_port_with_external_ids() {
        let rig = Rig::new();
        let dp = rig.backend();
        dp.init_node(&node()).await.unwrap();
        let before = rig.sw.bundles().len();
        let ep = pod(5);
        dp.prepare_pod(&ep).await.unwrap();
        dp.add_pod(&ep).await.unwrap();

        let bundles = rig.sw.bundles();
        assert_eq!(
            bundles.len(),
            before + 1,
            "one bundle for the pod: {bundles:#?}"
        );
        let (name, mods) = bundles.last().unwrap();
        assert_eq!(*name, "install pod flows");
        let p = PodFacts {
            port: 105,
            mac: ep.pod_mac,
            ip: ep.ip,
        };
        let want = pipeline::pod_flows(1, &facts(1), &p);
        // A new pod: the bundle is a delete of anything under its cookie, then its flows.
        assert_eq!(
            mods[0],
            FlowMod::delete_by_cookie(cookie::pod(0, ep.ip), cookie::POD_MASK)
        );
        assert_eq!(text(&mods[1..]), text(&want));
        assert_eq!(
            rig.sw.flows_text(cookie::pod(0, ep.ip), cookie::POD_MASK),
            text(&want)
        );

        let ids = rig.db.external_ids("Port", "fe-pod5").expect("pod port");
        let expect: BTreeMap<String, String> = [
            ("ferrea-type", "pod"),
            ("container-id", "c5"),
            ("ip", "10.244.1.5"),
            ("mac", "02:00:00:00:02:05"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(ids, expect);
        assert_eq!(rig.db.external_ids("Interface", "fe-pod5").unwrap(), expect);
        let iface = rig.db.row("Interface", "fe-pod5").unwrap();
        assert_eq!(iface["ofport_request"], 105);
        assert_eq!(
            *rig.host.isolated.lock().unwrap(),
            vec!["fe-pod5".to_owned()]
        );
        // The port is in the bridge.
        let port_uuid = rig.db.row("Port", "fe-pod5").unwrap()["_uuid"].clone();
        let bridge = rig.db.row("Bridge", "br-int").unwrap();
        assert!(bridge["ports"][1].as_array().unwrap().contains(&port_uuid));

        // A re-add with the same facts replaces the flows in place: no delete this time.
        dp.add_pod(&ep).await.unwrap();
        let (_, readd) = rig.sw.bundles().last().cloned().unwrap();
        assert!(
            readd
                .iter()
                .all(|m| m.command == openflow::codec::FlowModCommand::Add)
        );
        assert_eq!(
            rig.sw.flows_text(cookie::pod(0, ep.ip), cookie::POD_MASK),
            text(&want)
        );
    }

    #[tokio::test]
    async fn del_pod_removes_flows_and_port() {
        let rig = Rig::new();
        let dp = rig.backend();
        dp.init_node(&node()).await.unwrap();
        let (a, b) = (pod(5), pod(6));
        dp.add_pod(&a).await.unwrap();
        dp.add_pod(&b).await.unwrap();
        dp.del_pod(&a).await.unwrap();
        assert!(
            rig.sw
                .flows_text(cookie::pod(0, a.ip), cookie::POD_MASK)
                .is_empty()
        );
        assert!(rig.db.row("Port", "fe-pod5").is_none());
        assert!(
            rig.db.row("Interface", "fe-pod5").is_none(),
            "garbage-collected"
        );
        // The other pod and the node are untouched.
        assert!(rig.db.row("Port", "fe-pod6").is_some());
        assert!(
            !rig.sw
                .flows_text(cookie::pod(0, b.ip), cookie::POD_MASK)
                .is_empty()
        );
        assert!(!rig.cookies_of(cookie::KIND_NODE).is_empty());
        // Deleting an unknown pod is not an error.
        dp.del_pod(&pod(9)).await.unwrap();
        assert_eq!(dp.pod_stats(&a).await.unwrap(), None);
    }

    #[tokio::test]
    async fn del_pod_leaves_ports_ferrea_did_not_create() {
        let rig = Rig::new();
        let dp = rig.backend();
        dp.init_node(&node()).await.unwrap();
        rig.db
            .transact(
                "foreign port",
                vec![
                    json!({"op": "insert", "table": "Interface", "uuid-name": "i", "row": {"name": "fe-pod7"}}),
                    json!({"op": "insert", "table": "Port", "uuid-name": "p",
                        "row": {"name": "fe-pod7", "interfaces": named_uuid("i")}}),
                    json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", "br-int"]],
                        "mutations": [["ports", "insert", named_uuid("p")]]}),
                ],
            )
            .await
            .unwrap();
        dp.del_pod(&pod(7)).await.unwrap();
        assert!(rig.db.row("Port", "fe-pod7").is_some());
    }

    #[tokio::test]
    async fn a_restart_installs_a_new_round_and_deletes_the_old_one() {
        let rig = Rig::new();
        let old = rig.backend();
        old.init_node(&node()).await.unwrap();
        let (kept, gone) = (pod(5), pod(6));
        old.add_pod(&kept).await.unwrap();
        old.add_pod(&gone).await.unwrap();
        drop(old);

        // The new process: round 2; the core re-adds the kept pod, then reconciles.
        let new = rig.backend();
        new.init_node(&node()).await.unwrap();
        assert_eq!(new.round(), 2);
        assert_eq!(
            rig.db.external_ids("Bridge", "br-int").unwrap()["ferrea-round"],
            "2"
        );
        // The node flows were replaced in place (same match and priority: OpenFlow's add
        // keeps the flow and its counters, and takes the new cookie); the pods' flows of
        // round 1 stay until reconciliation, so no pod's packet sees a missing flow.
        let rounds = |kind| -> HashSet<u16> {
            rig.cookies_of(kind)
                .into_iter()
                .map(cookie::round)
                .collect()
        };
        assert_eq!(rounds(cookie::KIND_NODE), HashSet::from([2]));
        assert_eq!(rounds(cookie::KIND_POD), HashSet::from([1]));
        new.add_pod(&kept).await.unwrap();
        let removed = new.retain_pods(&HashSet::from([kept.ip])).await.unwrap();
        assert_eq!(removed, vec![gone.ip]);

        let all: Vec<u64> = rig.sw.flows().iter().map(|f| f.flow.cookie).collect();
        assert!(all.iter().all(|c| cookie::round(*c) == 2), "{all:x?}");
        assert_eq!(
            text(
                &rig.sw
                    .flows()
                    .iter()
                    .map(|f| f.flow.clone())
                    .collect::<Vec<_>>()
            ),
            {
                let mut want = pipeline::node_flows(2, &facts(1));
                want.extend(pipeline::pod_flows(
                    2,
                    &facts(1),
                    &PodFacts {
                        port: 105,
                        mac: kept.pod_mac,
                        ip: kept.ip,
                    },
                ));
                text(&want)
            }
        );
        assert!(rig.db.row("Port", "fe-pod5").is_some());
        assert!(rig.db.row("Port", "fe-pod6").is_none());
    }

    #[tokio::test]
    async fn set_egress_replaces_the_egress_flows_in_one_bundle() {
        let rig = Rig::new();
        let dp = rig.backend();
        dp.init_node(&encap_node()).await.unwrap();
        let tun = rig
            .db
            .row("Interface", TUNNEL_IFNAME)
            .expect("tunnel interface");
        assert_eq!(tun["type"], "vxlan");
        assert_eq!(tun["ofport"], i64::from(TUNNEL_OFPORT));
        let plan = EgressPlan {
            steer: vec![EgressSteer {
                pod_ip: Ipv4Addr::new(10, 244, 1, 5),
                node_ip: Ipv4Addr::new(172, 18, 0, 12),
                id: 3,
            }],
            exempt: vec!["10.244.0.0/16".parse().unwrap()],
            held: vec![4],
        };
        dp.set_egress(&plan).await.unwrap();
        let t = TunnelFacts {
            port: TUNNEL_OFPORT,
            vni: TUNNEL_VNI,
        };
        let want = pipeline::egress_flows(1, &facts(1), &t, &plan);
        assert!(!want.is_empty());
        let egress = cookie::make(0, cookie::KIND_EGRESS, 0);
        assert_eq!(rig.sw.flows_text(egress, cookie::KIND_MASK), text(&want));
        let (name, mods) = rig.sw.bundles().last().cloned().unwrap();
        assert_eq!(name, "egress flows");
        assert_eq!(
            mods[0],
            FlowMod::delete_by_cookie(egress, cookie::KIND_MASK)
        );

        // The same plan again: nothing to send.
        let n = rig.sw.bundles().len();
        dp.set_egress(&plan).await.unwrap();
        assert_eq!(rig.sw.bundles().len(), n);

        // An empty plan removes them all.
        dp.set_egress(&EgressPlan::default()).await.unwrap();
        assert!(rig.sw.flows_text(egress, cookie::KIND_MASK).is_empty());
    }

    #[tokio::test]
    async fn set_egress_refuses_steering_without_a_tunnel() {
        let rig = Rig::new();
        let dp = rig.backend();
        dp.init_node(&node()).await.unwrap();
        let plan = EgressPlan {
            steer: vec![EgressSteer {
                pod_ip: Ipv4Addr::new(10, 244, 1, 5),
                node_ip: Ipv4Addr::new(172, 18, 0, 12),
                id: 3,
            }],
            ..EgressPlan::default()
        };
        let e = dp.set_egress(&plan).await.unwrap_err();
        assert!(
            matches!(
                &e,
                DataplaneError::Other { source, .. }
                    if matches!(**source, Cause::Egress(crate::dataplane::EgressPlanError::NoTunnel { steered: 1 }))
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("noEncap"), "{e}");
    }

    #[tokio::test]
    async fn methods_before_init_node_say_so() {
        let rig = Rig::new();
        let dp = rig.backend();
        let e = dp.add_pod(&pod(5)).await.unwrap_err();
        assert!(
            matches!(e, DataplaneError::NotInitialised { op: "add_pod", .. }),
            "{e:?}"
        );
        assert!(rig.db.log.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_vswitchd_restart_gets_every_flow_back() {
        let rig = Rig::new();
        let dp = rig.backend();
        dp.init_node(&node()).await.unwrap();
        dp.add_pod(&pod(5)).await.unwrap();
        let before = rig.sw.flows_text(0, 0);
        rig.sw.restart();
        assert!(rig.sw.flows().is_empty());
        dp.maintain().await.unwrap();
        assert_eq!(rig.sw.connects(), 2);
        assert_eq!(rig.sw.flows_text(0, 0), before);
        assert_eq!(
            rig.host.gateway.lock().unwrap().len(),
            2,
            "gateway address put back"
        );
    }

    #[tokio::test]
    async fn pod_stats_sum_the_pods_counting_flows() {
        let rig = Rig::new();
        let dp = rig.backend();
        dp.init_node(&node()).await.unwrap();
        let ep = pod(5);
        dp.add_pod(&ep).await.unwrap();
        let c = cookie::pod(1, ep.ip);
        rig.sw.count(c, 7, 700);
        let st = dp.pod_stats(&ep).await.unwrap().expect("known pod");
        // Every flow of the pod carries its cookie; each counts in the direction its table
        // and priority say.
        let mut want = PodStats::default();
        for f in rig.sw.flows().iter().filter(|f| f.flow.cookie == c) {
            match pipeline::counter_of(f.flow.table, f.flow.priority) {
                Counter::Tx => {
                    want.tx_packets += 7;
                    want.tx_bytes += 700;
                }
                Counter::Rx => {
                    want.rx_packets += 7;
                    want.rx_bytes += 700;
                }
                Counter::DropSpoofed => want.drop_spoofed += 7,
                Counter::DropOther => want.drop_other += 7,
                Counter::None => {}
            }
        }
        assert_eq!(st, want);
        assert!(
            st.tx_packets > 0 && st.rx_packets > 0 && st.drop_spoofed > 0 && st.drop_other > 0,
            "{st:?}"
        );
    }

    fn vip(
        ip: [u8; 4],
        port: u16,
        protocol: crate::source::Protocol,
        backends: &[(u8, u8)],
    ) -> crate::proxy::VipService {
        let backends: Vec<crate::proxy::Backend> = backends
            .iter()
            .map(|&(net, host)| crate::proxy::Backend {
                ip: Ipv4Addr::new(10, 244, net, host),
                port: 8080,
                local: net == 1,
            })
            .collect();
        crate::proxy::VipService {
            name: format!("default/svc-{}", ip[3]),
            addr: crate::proxy::ServiceAddr {
                ip: Ipv4Addr::from(ip),
                port,
                protocol,
            },
            kind: crate::proxy::VipKind::ClusterIp,
            external_backends: backends.clone(),
            backends,
            external_local: false,
            affinity_secs: None,
        }
    }

    fn plan(vips: Vec<crate::proxy::VipService>) -> crate::proxy::ServicePlan {
        crate::proxy::ServicePlan {
            vips,
            node_ports: Vec::new(),
        }
    }

    fn group_text(rig: &Rig) -> Vec<String> {
        rig.sw.groups().values().map(GroupMod::to_ofctl).collect()
    }

    #[tokio::test]
    async fn set_services_installs_replaces_and_removes_groups_and_flows() {
        use crate::source::Protocol::{Tcp, Udp};
        let rig = Rig::new();
        let dp = rig.backend();
        dp.init_node(&encap_node()).await.unwrap();
        dp.set_remote_nodes(&[RemoteNode {
            name: "n2".into(),
            node_ip: Ipv4Addr::new(172, 18, 0, 12),
            pod_cidr: "10.244.2.0/24".parse().unwrap(),
        }])
        .await
        .unwrap();
        let mut affinity = vip([10, 96, 0, 12], 80, Tcp, &[(1, 5)]);
        affinity.affinity_secs = Some(10800);
        let p = plan(vec![
            vip([10, 96, 0, 10], 53, Udp, &[(1, 5), (2, 7)]),
            vip([10, 96, 0, 11], 80, Tcp, &[(1, 6)]),
            affinity,
            // No backends, a host-network backend, a pod of an unknown node: the stack's.
            vip([10, 96, 0, 13], 80, Tcp, &[]),
            vip([10, 96, 0, 14], 80, Tcp, &[(1, 5), (0, 1)]),
            vip([10, 96, 0, 15], 80, Tcp, &[(3, 9)]),
            vip([10, 96, 0, 16], 80, Tcp, &[(1, 1)]),
        ]);
        dp.set_services(&p).await.unwrap();
        let groups = group_text(&rig);
        assert_eq!(groups.len(), 2, "{groups:#?}");
        assert_eq!(
            groups[0],
            "group_id=1,type=select,selection_method=dp_hash,\
             bucket=bucket_id:0,weight:100,actions=ct(commit,table=30,zone=65520,nat(dst=10.244.1.5:8080),exec(set_field:0x00000002->ct_mark)),\
             bucket=bucket_id:1,weight:100,actions=ct(commit,table=30,zone=65520,nat(dst=10.244.2.7:8080),exec(set_field:0x00000002->ct_mark))"
        );
        let flows = rig
            .sw
            .flows_text(cookie::make(0, cookie::KIND_SERVICE, 0), cookie::KIND_MASK);
        // Per frontend: the lookup and the group; per local backend: the hairpin exclusion.
        assert_eq!(flows.len(), 2 * 2 + 2, "{flows:#?}");
        assert!(
            flows.iter().any(|f| f.starts_with("table=25,priority=210")
                && f.contains("ip_proto=0x11,ip_dst=10.96.0.10,udp_dst=53")
                && f.ends_with("actions=ct(table=27,zone=65520,nat)")),
            "{flows:#?}"
        );
        assert!(
            flows.iter().any(|f| f.starts_with("table=27,priority=190")
                && f.contains("ip_dst=10.96.0.11,tcp_dst=80,ct_state=0x00000021/0x00000021")
                && f.ends_with("actions=group:2")),
            "{flows:#?}"
        );
        assert!(
            flows.iter().any(|f| f.starts_with("table=25,priority=220")
                && f.contains("ip_dst=10.96.0.10,udp_dst=53,ip_src=10.244.1.5")
                && f.ends_with("actions=goto_table:30")),
            "{flows:#?}"
        );
        // The same plan again: nothing sent.
        let n = rig.sw.bundles().len();
        dp.set_services(&p).await.unwrap();
        assert_eq!(rig.sw.bundles().len(), n);
        // A backend leaves: the group's buckets change, in one bundle.
        let p2 = plan(vec![
            vip([10, 96, 0, 10], 53, Udp, &[(2, 7)]),
            vip([10, 96, 0, 11], 80, Tcp, &[(1, 6)]),
        ]);
        dp.set_services(&p2).await.unwrap();
        assert_eq!(rig.sw.bundles().len(), n + 1);
        let groups = group_text(&rig);
        assert_eq!(groups.len(), 2);
        assert!(
            !groups[0].contains("10.244.1.5") && groups[0].contains("10.244.2.7"),
            "{groups:#?}"
        );
        let flows = rig
            .sw
            .flows_text(cookie::make(0, cookie::KIND_SERVICE, 0), cookie::KIND_MASK);
        assert_eq!(flows.len(), 2 * 2 + 1, "{flows:#?}");
        // The remote node leaves: its backend is no longer the bridge's to reach.
        dp.set_remote_nodes(&[]).await.unwrap();
        assert_eq!(group_text(&rig).len(), 1);
        // Nothing: all gone, the node flows stay.
        dp.set_services(&plan(vec![])).await.unwrap();
        assert!(rig.sw.groups().is_empty());
        assert!(rig.cookies_of(cookie::KIND_SERVICE).is_empty());
        assert!(!rig.cookies_of(cookie::KIND_NODE).is_empty());
    }

    #[test]
    fn udp_frontends_with_other_backends_or_gone_are_stale() {
        let f = |proto: u8, port: u16, backends: &[u8]| ServiceFacts {
            group: 1,
            ip: Ipv4Addr::new(10, 96, 0, 10),
            proto,
            port,
            backends: backends
                .iter()
                .map(|h| (Ipv4Addr::new(10, 244, 1, *h), 53))
                .collect(),
            local: Vec::new(),
            name: String::new(),
        };
        let old = vec![
            f(17, 53, &[5, 6]),
            f(17, 54, &[5]),
            f(6, 80, &[5]),
            f(17, 55, &[7]),
        ];
        // 53 lost a backend, 54 is gone, TCP never counts, 55 is unchanged.
        let new = vec![f(17, 53, &[5]), f(17, 55, &[7])];
        let ip = Ipv4Addr::new(10, 96, 0, 10);
        assert_eq!(stale_udp(&old, &new), vec![(ip, 53), (ip, 54)]);
        assert!(stale_udp(&new, &new).is_empty());
        assert!(stale_udp(&[], &old).is_empty());
    }

    #[tokio::test]
    async fn services_survive_vswitchd_and_agent_restarts() {
        use crate::source::Protocol::Tcp;
        let rig = Rig::new();
        let dp = rig.backend();
        dp.init_node(&node()).await.unwrap();
        let p = plan(vec![vip([10, 96, 0, 11], 80, Tcp, &[(1, 5), (1, 6)])]);
        dp.set_services(&p).await.unwrap();
        let flows = rig.sw.flows_text(0, 0);
        let groups = group_text(&rig);
        assert_eq!(groups.len(), 1);
        // vswitchd restarts: flows and groups come back.
        rig.sw.restart();
        dp.maintain().await.unwrap();
        assert_eq!(rig.sw.flows_text(0, 0), flows);
        assert_eq!(group_text(&rig), groups);
        // The agent restarts: the old round's Service flows and groups keep working until
        // the new process's first set_services, which replaces them with its round's.
        let new = rig.backend();
        new.init_node(&node()).await.unwrap();
        new.retain_pods(&HashSet::new()).await.unwrap();
        assert_eq!(group_text(&rig), groups);
        let old = rig.cookies_of(cookie::KIND_SERVICE);
        assert!(!old.is_empty() && old.iter().all(|c| cookie::round(*c) == 1));
        new.set_services(&p).await.unwrap();
        let now = rig.cookies_of(cookie::KIND_SERVICE);
        assert_eq!(now.len(), old.len());
        assert!(now.iter().all(|c| cookie::round(*c) == 2), "{now:x?}");
        assert_eq!(group_text(&rig), groups);
        // And a plan without frontends from a restarted agent (serviceProxy: kube-proxy)
        // removes an earlier process's groups too.
        let third = rig.backend();
        third.init_node(&node()).await.unwrap();
        third.set_services(&plan(vec![])).await.unwrap();
        assert!(rig.sw.groups().is_empty());
        assert!(rig.cookies_of(cookie::KIND_SERVICE).is_empty());
    }
}
