//! Egress: per-workload egress IPs from `ExternalIPPool`s (Antrea's `crd.antrea.io/v1beta1`
//! `Egress` and `ExternalIPPool`, accepted verbatim).
//!
//! - [`model`] decodes and validates the objects; a rejected object is reported naming the
//!   field and changes nothing.
//! - [`assign`] gives every Egress an IP, an id and a node. Every agent computes the same
//!   answer from the same desired state, so no controller is needed.
//! - [`plan`] turns that into what this node does: the IPs it holds, the local pods it marks,
//!   the local pods it steers through the tunnel to another node.
//! - [`node`] holds IPs: sub-interface per VLAN, addresses, route table per subnet, fwmark
//!   rule per IP, gratuitous ARP, `rp_filter` (set and watched).
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
//! [`run`] is the controller: it recomputes the plan whenever the desired state or the node's
//! attachments change and applies it when it differs (node, then nftables, then dataplane),
//! retries a failed apply every second, converges again every 10 s even without a change (so a
//! rule or sub-interface an outsider removed comes back), checks `rp_filter` every second and
//! writes the status
//! view `<stateDir>/status/egresses.json` (an `EgressList` with Antrea's status fields, plus
//! the `rp_filter` values ferrea wants and finds). After a restart the first apply reconciles
//! whatever the previous process left: it converges on the plan and removes the rest.

pub mod assign;
pub mod node;
pub mod plan;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::kernel::nftables::{EgressRules, NatTable};
use crate::pods::PodManager;
use crate::source::DesiredState;
use node::{EgressNode, IpOutcome};
use plan::NodePlan;

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
}

/// Starts the controller (see the module doc).
pub fn start(
    ctx: EgressContext,
    pods: Arc<PodManager>,
    nat: Arc<NatTable>,
    state: watch::Receiver<DesiredState>,
) -> anyhow::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    let node = EgressNode::new(
        handle,
        ctx.transport.clone(),
        ctx.gateway_if.clone(),
        &ctx.state_dir,
        Box::new(node::load_vlan_tagger),
    );
    tokio::spawn(run(ctx, node, pods, nat, state));
    Ok(())
}

/// How often the node is converged on the plan even when nothing changed, so that what an
/// outsider removed (a rule, the sub-interface, an address) comes back.
const RESYNC: Duration = Duration::from_secs(10);

/// The controller loop.
pub async fn run(
    ctx: EgressContext,
    mut node: EgressNode,
    pods: Arc<PodManager>,
    nat: Arc<NatTable>,
    mut state: watch::Receiver<DesiredState>,
) {
    let mut attachments = pods.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let status_path = ctx.state_dir.join("status").join("egresses.json");
    let node_status_path = ctx.state_dir.join("status").join("egress-node.json");
    let mut applied: Option<NodePlan> = None;
    let mut outcomes: Vec<IpOutcome> = Vec::new();
    let mut failure: Option<String> = None;
    let mut reported: Vec<String> = Vec::new();
    let mut written: Option<(Value, Value)> = None;
    let mut last_apply = std::time::Instant::now();
    loop {
        // Computed under the borrow: the desired state is not copied on every wake-up.
        let (plan, source_problems) = {
            let st = state.borrow_and_update();
            let plan = plan::plan(
                &st,
                &pods.records(),
                &ctx.node_name,
                &ctx.cluster,
                ctx.encap,
            );
            let problems: Vec<String> = st
                .errors
                .iter()
                // The source prefixes each with the file it came from.
                .filter(|e| e.contains(": Egress ") || e.contains(": ExternalIPPool "))
                .cloned()
                .collect();
            (plan, problems)
        };
        let changed = applied.as_ref() != Some(&plan);
        if changed || failure.is_some() || last_apply.elapsed() >= RESYNC {
            let t = std::time::Instant::now();
            last_apply = t;
            let previous = applied.as_ref().map(|p| p.held.clone()).unwrap_or_default();
            match apply(&mut node, &nat, &pods, &plan, &previous).await {
                Ok(o) => {
                    if failure.take().is_some() {
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
                            tracing::error!(ip = %o.ip, error = %e, "egress IP not assigned");
                        }
                    }
                    outcomes = o;
                    applied = Some(plan.clone());
                }
                Err(e) => {
                    if failure.as_deref() != Some(e.as_str()) {
                        tracing::error!(error = %e, "applying Egress failed; retrying every second");
                    }
                    failure = Some(e);
                }
            }
        }
        let warnings: Vec<String> = source_problems
            .into_iter()
            .chain(plan.warnings.iter().cloned())
            .collect();
        if warnings != reported {
            for w in warnings.iter().filter(|w| !reported.contains(w)) {
                tracing::warn!("{w}");
            }
            reported = warnings.clone();
        }
        let view = (
            status_view(&ctx.node_name, &plan, &outcomes, failure.as_deref()),
            node_view(&ctx.node_name, &plan, &node, &warnings),
        );
        if written.as_ref() != Some(&view) {
            match write_atomic(&status_path, &view.0)
                .and_then(|()| write_atomic(&node_status_path, &view.1))
            {
                Ok(()) => written = Some(view),
                Err(e) => tracing::warn!(error = %e, "writing the Egress status view"),
            }
        }
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            _ = attachments.changed() => {}
            _ = tick.tick() => {
                node.check_rp_filter();
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
) -> Result<Vec<IpOutcome>, String> {
    let mut both: Vec<plan::HeldIp> = plan.held.clone();
    both.extend(
        previous
            .iter()
            .filter(|p| !plan.held.iter().any(|h| h.ip == p.ip || h.id == p.id))
            .cloned(),
    );
    let removing = both.len() > plan.held.len();
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
    };
    let empty = rules.marks.is_empty() && rules.snat.is_empty();
    nat.set_egress((!empty).then_some(rules))
        .await
        .map_err(|e| e.to_string())?;
    let mut dp = plan.dataplane.clone();
    dp.held
        .retain(|id| plan.held.iter().any(|h| h.id == *id && assigned(h.ip)));
    pods.dataplane()
        .set_egress(&dp)
        .await
        .map_err(|e| e.to_string())?;
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
                        (_, Some(IpOutcome { result: Err(e), .. })) => {
                            condition("IPAssigned", Some(false), "AssignmentError", e)
                        }
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
            "vlan": h.subnet.map(|s| s.vlan), "table": h.subnet.map(|s| node::table_of(&s))})
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
