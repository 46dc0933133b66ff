//! Egress: per-workload egress IPs from `ExternalIPPool`s (Antrea's `crd.antrea.io/v1beta1`
//! `Egress` and `ExternalIPPool`, accepted verbatim).
//!
//! - [`crate::source::crd`] decodes and validates the objects; a rejected object is reported
//!   naming the field and changes nothing.
//! - [`assign`] gives every Egress an IP, an id and a node. Every agent computes the same
//!   answer from the same desired state, so no central allocator is needed.
//! - [`plan`] turns that into what this node does: the IPs it holds, the local pods it marks,
//!   the local pods it steers through the tunnel to another node.
//! - [`node`] holds IPs: sub-interface per VLAN, addresses, route table per subnet, fwmark
//!   rule per IP, gratuitous ARP, `rp_filter` (set and watched), each through its trait in
//!   [`crate::kernel`] ([`node::EgressKernel`]).
//! - ferrea's nftables table ([`crate::kernel::nftables::EgressRules`]) marks local pods' packets in
//!   prerouting and SNATs by mark before masquerade.
//! - The dataplane ([`crate::dataplane::Dataplane::set_egress`]) steers pods whose IP is on
//!   another node through the tunnel with the id as VNI, and marks what arrives that way.
//!
//! The path of a packet from a selected pod on node B whose Egress IP node A holds: B's
//! dataplane sends it through the tunnel to A with VNI = id; A's dataplane gives it fwmark id;
//! the rule for id routes it through the subnet's table (default via the pool's gateway, out
//! of `ferrea-ext.<vlan>`, tagged); nftables SNATs it to the egress IP. Replies come back on
//! the sub-interface, are un-SNATed by conntrack and routed to the pod (through the tunnel for
//! B's pods). Loose `rp_filter` on the sub-interface lets them in.
//!
//! [`run`] is the controller: [`EgressReconciler`] on the reconcile runner
//! ([`crate::controllers::runner`]). It recomputes the plan whenever the desired state or the
//! node's attachments change and applies it when it differs (node, then nftables, then
//! dataplane), retries a failed apply every second, converges again every 10 s even without a
//! change (so a rule or sub-interface an outsider removed comes back), checks `rp_filter` every
//! second, publishes the Egresses' status (an `EgressList` with Antrea's status fields) to the
//! source's [`EgressStatusSink`] ([`status`]: the `files` source's view
//! `<stateDir>/status/egresses.json`, or [`kube_sink`]: the `status` of the Egress objects
//! this node holds) and writes `<stateDir>/status/egress-node.json` (what this node holds, its
//! local pods' Egresses, the `rp_filter` values ferrea wants and finds, the problems). After a
//! restart the first apply reconciles whatever the previous process left: it converges on the
//! plan and removes the rest.

pub mod assign;
pub mod kube_sink;
pub mod node;
pub mod plan;
pub mod status;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde_json::{Value, json};
use tokio::sync::watch;

use tokio::time::Instant;

use crate::controllers::runner::{
    self, Action, Desired, Reconciler, RunnerConfig, Trigger, Wakers, error_chain,
};
use crate::dataplane::DataplaneError;
use crate::kernel::nftables::{EgressRules, NatError, NatTable};
use crate::membership::MemberView;
use crate::metrics::Metrics;
use crate::pods::PodManager;
use crate::source::DesiredState;
pub use kube_sink::KubeEgressStatusSink;
use node::{EgressNode, IpOutcome, NodeError};
use plan::NodePlan;
pub use status::{EgressStatusError, EgressStatusSink, EgressStatuses, LocalStatusView, PoolUsage};

/// What the controller needs to know about the node.
pub struct EgressContext {
    /// This node's name.
    pub node_name: String,
    /// The cluster's pod CIDRs and the service CIDR (never egress traffic).
    pub cluster: Vec<Ipv4Network>,
    /// Whether there is a tunnel to other nodes.
    pub encap: bool,
    /// The transport interface (parent of the sub-interfaces).
    pub transport: String,
    /// The pods' gateway interface.
    pub gateway_if: String,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// Where the reconcile passes and `rp_filter` restorations are counted.
    pub metrics: Metrics,
    /// Where the latest status views go for the debug API (`ferreactl get egress`).
    pub views: EgressViews,
}

/// The latest Egress views as the controller last computed them, for the debug API: the
/// `EgressList` with Antrea's status fields (also in kubernetes mode, where no file is
/// written), the node view (`egress-node.json`), and how many IPs this node holds and has
/// assigned. Cheap to clone; `Value::Null` before the first pass.
#[derive(Clone, Debug, Default)]
pub struct EgressViews(Arc<std::sync::Mutex<(Value, Value, usize)>>);

impl EgressViews {
    /// (the `EgressList`, the node view, the IPs held and assigned).
    pub fn get(&self) -> (Value, Value, usize) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, list: &Value, node: &Value, held: usize) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = (list.clone(), node.clone(), held);
    }
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The netlink connection the node side uses could not be opened.
    #[error("opening a netlink connection for Egress")]
    Netlink(#[source] std::io::Error),
}

/// Why applying a plan failed (what the status view reports as the failure of all IPs).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Holding the IPs on the node (interfaces, addresses, routes, rules).
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Loading the marking and SNAT rules into ferrea's nftables table.
    #[error(transparent)]
    Nat(#[from] NatError),
    /// Giving the dataplane its part of the plan.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// Publishing the Egress status (not a failure of the plan: the node is as planned).
    #[error(transparent)]
    Status(#[from] EgressStatusError),
}

/// Starts the controller (see the module doc).
pub fn start(
    ctx: EgressContext,
    pods: Arc<PodManager>,
    nat: Arc<NatTable>,
    state: watch::Receiver<DesiredState>,
    sink: Arc<dyn EgressStatusSink>,
    members: Option<watch::Receiver<MemberView>>,
) -> Result<(), EgressError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(EgressError::Netlink)?;
    tokio::spawn(conn);
    let node = EgressNode::new(
        handle,
        ctx.transport.clone(),
        ctx.gateway_if.clone(),
        &ctx.state_dir,
        Box::new(node::load_vlan_tagger),
    );
    tokio::spawn(run(ctx, node, pods, nat, state, sink, members));
    Ok(())
}

/// How often the node is converged on the plan even when nothing changed, so that what an
/// outsider removed (a rule, the sub-interface, an address) comes back.
const RESYNC: Duration = Duration::from_secs(10);
/// How often `rp_filter` is checked, and a failed apply retried.
const TICK: Duration = Duration::from_secs(1);

/// The runner's timing for Egress: no debounce, a resync every 10 s, a failed apply retried
/// every second.
pub const RUNNER: RunnerConfig = RunnerConfig {
    debounce: Duration::ZERO,
    resync: Some(RESYNC),
    retry_min: TICK,
    retry_max: TICK,
};

/// The controller loop: [`EgressReconciler`] on the reconcile runner, woken by the desired
/// state and the node's attachments. Runs until the desired-state source stops.
pub async fn run(
    ctx: EgressContext,
    node: EgressNode,
    pods: Arc<PodManager>,
    nat: Arc<NatTable>,
    state: watch::Receiver<DesiredState>,
    sink: Arc<dyn EgressStatusSink>,
    members: Option<watch::Receiver<MemberView>>,
) {
    let mut wakers = Wakers::none().watch(pods.subscribe());
    if let Some(m) = &members {
        wakers = wakers.watch(m.clone());
    }
    let metrics = ctx.metrics.clone();
    runner::run_observed(
        EgressReconciler::new(ctx, node, pods, nat, sink).with_membership(members),
        state,
        wakers,
        RUNNER,
        metrics,
    )
    .await;
}

/// The Egress controller as a [`Reconciler`]: each pass computes the plan, applies it when it
/// changed or the runner asks to converge (start, retry, resync; and at the latest every
/// 10 s, since the every-second upkeep keeps the runner's own resync from falling due),
/// checks `rp_filter` on the upkeep passes, logs new warnings once, publishes the Egress
/// status to the sink and writes the node view when they changed. A failed apply or status
/// write is the pass's error: the runner retries it.
pub struct EgressReconciler {
    ctx: EgressContext,
    node: EgressNode,
    pods: Arc<PodManager>,
    nat: Arc<NatTable>,
    sink: Arc<dyn EgressStatusSink>,
    node_status_path: PathBuf,
    /// The plan last applied successfully.
    applied: Option<NodePlan>,
    outcomes: Vec<IpOutcome>,
    /// The last apply's failure, as the status view reports it.
    failure: Option<String>,
    /// The warnings already logged.
    reported: Vec<String>,
    /// The Egress status last published.
    published: Option<EgressStatuses>,
    /// The node view last written.
    written: Option<Value>,
    last_rp_check: Instant,
    /// The membership's view (none: every `Node` object counts as alive).
    members: Option<watch::Receiver<MemberView>>,
    /// IPs this node still holds after they moved to another live node, until the deadline:
    /// the new holder has them (and has announced them) before this one lets go.
    releasing: BTreeMap<std::net::Ipv4Addr, (plan::HeldIp, Instant)>,
    /// The IPs allocated so far, by Egress (`<stateDir>/egress-allocations.json`): kept while
    /// the Egress and its pool exist ([`assign`]).
    allocations: BTreeMap<String, assign::Recorded>,
    allocations_path: PathBuf,
}

/// The recorded allocations at `path` (none if absent or unreadable: logged).
fn load_allocations(path: &Path) -> BTreeMap<String, assign::Recorded> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "Egress allocations unreadable; starting afresh");
            BTreeMap::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "reading the Egress allocations");
            BTreeMap::new()
        }
    }
}

/// How long a node keeps an IP that moved to another live node (make before break): the
/// other agents switch their steering within this time, so no in-flight packet finds the
/// IP nowhere.
pub const HANDOVER: Duration = Duration::from_secs(1);

impl EgressReconciler {
    /// The controller for `node`, marking and SNATing in `nat`, steering through `pods`'
    /// dataplane, publishing the Egress status to `sink`.
    pub fn new(
        ctx: EgressContext,
        node: EgressNode,
        pods: Arc<PodManager>,
        nat: Arc<NatTable>,
        sink: Arc<dyn EgressStatusSink>,
    ) -> Self {
        let allocations_path = ctx.state_dir.join("egress-allocations.json");
        Self {
            node_status_path: ctx.state_dir.join("status").join("egress-node.json"),
            ctx,
            node,
            pods,
            nat,
            sink,
            published: None,
            applied: None,
            outcomes: Vec::new(),
            failure: None,
            reported: Vec::new(),
            written: None,
            last_rp_check: Instant::now(),
            members: None,
            releasing: BTreeMap::new(),
            allocations: load_allocations(&allocations_path),
            allocations_path,
        }
    }

    /// Records the IPs of `plan` (by Egress, with their pool) when they changed.
    fn record_allocations(&mut self, plan: &NodePlan) {
        let now: BTreeMap<String, assign::Recorded> = plan
            .assignments
            .iter()
            .filter_map(|(k, a)| {
                Some((
                    k.clone(),
                    assign::Recorded {
                        ip: a.ip?,
                        pool: a.pool.clone(),
                    },
                ))
            })
            .collect();
        if now == self.allocations {
            return;
        }
        let v = serde_json::to_value(&now).unwrap_or(Value::Null);
        match write_atomic(&self.allocations_path, &v) {
            Ok(()) => self.allocations = now,
            Err(e) => tracing::warn!(error = %e, "recording the Egress allocations"),
        }
    }

    /// Takes the holders from the membership's view (see [`crate::membership`]).
    pub fn with_membership(mut self, members: Option<watch::Receiver<MemberView>>) -> Self {
        self.members = members;
        self
    }

    /// Keeps, for [`HANDOVER`], the IPs the last applied plan held that moved to another
    /// node (the Egress and its IP unchanged): make before break.
    fn hand_over(&mut self, plan: &mut NodePlan) {
        let now = Instant::now();
        if let Some(prev) = &self.applied {
            for h in &prev.held {
                if plan.held.iter().any(|x| x.ip == h.ip) {
                    continue;
                }
                let moved = plan.assignments.get(&h.egress).is_some_and(|a| {
                    a.ip == Some(h.ip)
                        && a.id == Some(h.id)
                        && a.node.as_deref().is_some_and(|n| n != self.ctx.node_name)
                });
                if moved {
                    self.releasing
                        .entry(h.ip)
                        .or_insert_with(|| (h.clone(), now + HANDOVER));
                }
            }
        }
        let me = self.ctx.node_name.clone();
        self.releasing.retain(|ip, (h, deadline)| {
            let still = plan.assignments.get(&h.egress).is_some_and(|a| {
                a.ip == Some(*ip)
                    && a.id == Some(h.id)
                    && a.node.as_deref().is_some_and(|n| n != me)
            });
            still && *deadline > now && !plan.held.iter().any(|x| x.ip == *ip || x.id == h.id)
        });
        for (h, _) in self.releasing.values() {
            plan.held.push(plan::HeldIp {
                releasing: true,
                ..h.clone()
            });
            plan.dataplane.held.push(h.id);
        }
        plan.held.sort();
        plan.dataplane.held.sort();
    }
}

impl Reconciler for EgressReconciler {
    type Error = ApplyError;

    fn name(&self) -> &'static str {
        "egress"
    }

    async fn reconcile(
        &mut self,
        desired: &Desired<'_>,
        trigger: Trigger,
    ) -> Result<Action, ApplyError> {
        // The every-second upkeep (and the passes that stand in for it).
        if !matches!(trigger, Trigger::Start | Trigger::Changed)
            || self.last_rp_check.elapsed() >= TICK
        {
            let restored = self.node.check_rp_filter();
            self.ctx.metrics.rp_filter_restored(restored.len());
            self.last_rp_check = Instant::now();
        }
        let announce_in = self.node.repeat_announcements();
        // Computed under the borrow: the desired state is not copied on every wake-up.
        let members = self.members.as_ref().map(|m| m.borrow().clone());
        let live = members.as_ref().and_then(MemberView::eligible);
        let (mut plan, source_problems, pools, reports_unheld, observed) = {
            let st = desired.get();
            let plan = plan::plan(
                &st,
                &self.pods.records(),
                &self.ctx.node_name,
                &self.ctx.cluster,
                self.ctx.encap,
                live.as_ref(),
                &self.allocations,
            );
            let problems: Vec<String> = st
                .errors
                .iter()
                // The source prefixes each with the file it came from.
                .filter(|e| e.contains(": Egress ") || e.contains(": ExternalIPPool "))
                .cloned()
                .collect();
            let pools = status::pool_usage(&st, &plan.assignments, &self.ctx.node_name);
            let reports_unheld = status::reports_unheld(&st, &self.ctx.node_name);
            let observed = status::Observed::of(&st);
            (plan, problems, pools, reports_unheld, observed)
        };
        self.record_allocations(&plan);
        self.hand_over(&mut plan);
        let changed = self.applied.as_ref() != Some(&plan);
        let mut error = None;
        // The runner's resync (every 10 s) and retries arrive as converging triggers.
        if changed || trigger.converge() || self.failure.is_some() {
            let t = Instant::now();
            let previous = self
                .applied
                .as_ref()
                .map(|p| p.held.clone())
                .unwrap_or_default();
            match apply(&mut self.node, &self.nat, &self.pods, &plan, &previous).await {
                Ok(o) => {
                    if self.failure.take().is_some() {
                        tracing::info!("Egress applied again after a failure");
                    }
                    // The periodic resync of an unchanged plan is not news.
                    if changed {
                        tracing::info!(
                            held = plan.held.len(),
                            marked = plan.local_marks.len(),
                            steered = plan.dataplane.steer.len(),
                            took_ms = t.elapsed().as_millis() as u64,
                            "Egress applied"
                        );
                    }
                    for o in &o {
                        if let Err(e) = &o.result {
                            tracing::error!(ip = %o.ip, error = %error_chain(e), "egress IP not assigned");
                        }
                    }
                    self.outcomes = o;
                    self.applied = Some(plan.clone());
                }
                Err(e) => {
                    // The runner logs the failure (once per cause) and retries.
                    self.failure = Some(error_chain(&e));
                    error = Some(e);
                }
            }
        }
        let warnings: Vec<String> = source_problems
            .into_iter()
            .chain(plan.warnings.iter().cloned())
            .chain(self.node.shaping_problems())
            .collect();
        if warnings != self.reported {
            for w in warnings.iter().filter(|w| !self.reported.contains(w)) {
                tracing::warn!("{w}");
            }
            self.reported = warnings.clone();
        }
        let statuses = EgressStatuses {
            node: self.ctx.node_name.clone(),
            list: status_view(
                &self.ctx.node_name,
                &plan,
                &self.outcomes,
                self.failure.as_deref(),
            ),
            pools,
            reports_unheld,
            observed,
        };
        let list_view = statuses.list.clone();
        // The resync publishes again what the sink held back (see `kube_sink`'s module doc).
        if self.published.as_ref() != Some(&statuses)
            || (trigger.converge() && self.sink.held_back())
        {
            match self.sink.publish_egresses(&statuses).await {
                Ok(()) => self.published = Some(statuses),
                // Retried by the runner (with the apply's failure first when both failed).
                Err(e) => {
                    error.get_or_insert(ApplyError::Status(e));
                }
            }
        }
        let mut view = node_view(&self.ctx.node_name, &plan, &self.node, &warnings);
        view["membership"] = match &members {
            Some(m) => serde_json::to_value(m).unwrap_or(Value::Null),
            None => json!({"enabled": false}),
        };
        let assigned = self.outcomes.iter().filter(|o| o.result.is_ok()).count();
        self.ctx.views.set(&list_view, &view, assigned);
        if self.written.as_ref() != Some(&view) {
            match write_atomic(&self.node_status_path, &view) {
                Ok(()) => self.written = Some(view),
                Err(e) => tracing::warn!(error = %e, "writing the Egress node view"),
            }
        }
        match error {
            Some(e) => Err(e),
            None => {
                // A handover ends on time, not at the next upkeep.
                let next = self
                    .releasing
                    .values()
                    .map(|(_, d)| d.saturating_duration_since(Instant::now()))
                    .chain(announce_in)
                    .min()
                    .map_or(TICK, |d| d.clamp(Duration::from_millis(10), TICK));
                Ok(Action::Requeue(next))
            }
        }
    }
}

/// Applies `plan` after `previous` (what the node held before): make before break. IPs, routes
/// and rules of both are in place while the marking and SNAT switch over, and what only the
/// previous plan held goes last, so no packet is ever marked or SNATed towards an IP the node
/// no longer has (it would vanish: its reply has nowhere to go).
async fn apply(
    node: &mut EgressNode,
    nat: &NatTable,
    pods: &PodManager,
    plan: &NodePlan,
    previous: &[plan::HeldIp],
) -> Result<Vec<IpOutcome>, ApplyError> {
    let mut both: Vec<plan::HeldIp> = plan.held.clone();
    both.extend(
        previous
            .iter()
            .filter(|p| !plan.held.iter().any(|h| h.ip == p.ip || h.id == p.id))
            .cloned(),
    );
    let removing = both.len() > plan.held.len();
    node.set_standby(plan.standby_vlans.clone());
    let outcomes = node.apply(&both).await?;
    let outcomes: Vec<IpOutcome> = outcomes
        .into_iter()
        .filter(|o| plan.held.iter().any(|h| h.ip == o.ip))
        .collect();
    let assigned = |ip| outcomes.iter().any(|o| o.ip == ip && o.result.is_ok());
    let rules = EgressRules {
        exempt: plan.dataplane.exempt.clone(),
        marks: plan
            .local_marks
            .iter()
            .filter(|(_, id)| plan.held.iter().any(|h| h.id == *id && assigned(h.ip)))
            .copied()
            .collect(),
        snat: plan
            .held
            .iter()
            .filter(|h| assigned(h.ip))
            .map(|h| (h.id, h.ip))
            .collect(),
        shaped: plan
            .held
            .iter()
            .filter(|h| h.bandwidth.is_some() && assigned(h.ip))
            .map(|h| h.id)
            .collect(),
    };
    let empty = rules.marks.is_empty() && rules.snat.is_empty();
    nat.set_egress((!empty).then_some(rules)).await?;
    let mut dp = plan.dataplane.clone();
    dp.held
        .retain(|id| plan.held.iter().any(|h| h.id == *id && assigned(h.ip)));
    pods.dataplane().set_egress(&dp).await?;
    if removing {
        node.apply(&plan.held).await?;
    }
    Ok(outcomes)
}

fn condition(kind: &str, ok: Option<bool>, reason: &str, message: &str) -> Value {
    json!({
        "type": kind,
        "status": match ok { Some(true) => "True", Some(false) => "False", None => "Unknown" },
        "reason": reason,
        "message": message,
    })
}

/// The status view: an `EgressList` whose items carry Antrea's status fields (`egressIP`,
/// `egressNode`, conditions `IPAllocated` and `IPAssigned`) as this node sees them.
/// `IPAssigned` is this node's to report only for the IPs it holds; for the others it is
/// `Unknown`, naming the node whose view has it.
fn status_view(me: &str, plan: &NodePlan, outcomes: &[IpOutcome], failure: Option<&str>) -> Value {
    let items: Vec<Value> = plan
        .assignments
        .iter()
        .map(|(name, a)| {
            let allocated = match (a.ip, &a.problem) {
                (Some(_), _) => condition("IPAllocated", Some(true), "Allocated", ""),
                (None, p) => condition(
                    "IPAllocated",
                    Some(false),
                    "AllocationError",
                    p.as_deref().unwrap_or(""),
                ),
            };
            let assigned = match (a.ip, a.node.as_deref()) {
                (Some(ip), Some(n)) if n == me => {
                    match (failure, outcomes.iter().find(|o| o.ip == ip)) {
                        (
                            _,
                            Some(IpOutcome {
                                result: Ok(ifname), ..
                            }),
                        ) => condition(
                            "IPAssigned",
                            Some(true),
                            "Assigned",
                            &format!("on {ifname}"),
                        ),
                        (_, Some(IpOutcome { result: Err(e), .. })) => condition(
                            "IPAssigned",
                            Some(false),
                            "AssignmentError",
                            &error_chain(e),
                        ),
                        (Some(f), None) => {
                            condition("IPAssigned", Some(false), "AssignmentError", f)
                        }
                        (None, None) => condition("IPAssigned", Some(false), "Pending", ""),
                    }
                }
                (Some(_), Some(n)) => condition(
                    "IPAssigned",
                    None,
                    "OtherNode",
                    &format!("node {n} holds the IP; its status view reports the assignment"),
                ),
                _ => condition(
                    "IPAssigned",
                    Some(false),
                    "NoEgressNode",
                    a.problem.as_deref().unwrap_or(""),
                ),
            };
            let mut status = json!({ "conditions": [allocated, assigned] });
            if let Some(ip) = a.ip {
                status["egressIP"] = json!(ip.to_string());
            }
            if let Some(n) = &a.node {
                status["egressNode"] = json!(n);
            }
            json!({
                "apiVersion": "crd.antrea.io/v1beta1",
                "kind": "Egress",
                "metadata": { "name": name },
                "status": status,
            })
        })
        .collect();
    json!({
        "apiVersion": "crd.antrea.io/v1beta1",
        "kind": "EgressList",
        "items": items,
    })
}

/// What this node does for Egress: the IPs it holds, which Egress each local pod uses, the
/// `rp_filter` values ferrea wants and finds, and the problems (invalid objects, pods that
/// cannot be served).
fn node_view(me: &str, plan: &NodePlan, node: &EgressNode, warnings: &[String]) -> Value {
    let pods: BTreeMap<&String, &String> = plan.pods.iter().collect();
    let held: Vec<Value> = plan
        .held
        .iter()
        .map(|h| {
            json!({"egress": h.egress, "ip": h.ip.to_string(), "id": h.id,
            "vlan": h.subnet.map(|s| s.vlan), "table": h.subnet.map(|s| node::table_of(&s)),
            "bandwidth": h.bandwidth.map(|b| json!({"rateBps": b.rate_bps, "burstBits": b.burst_bits}))})
        })
        .collect();
    json!({
        "node": me,
        "held": held,
        "localPods": pods,
        "rpFilter": node.rp_filter_status(),
        "problems": warnings,
    })
}

fn write_atomic(path: &Path, v: &Value) -> std::io::Result<()> {
    crate::pods::store::write_file_atomic(
        path,
        &serde_json::to_vec_pretty(v).expect("serialisable"),
    )
}

#[cfg(test)]
mod tests;
