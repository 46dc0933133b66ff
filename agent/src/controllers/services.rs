//! The service controller of ferrea's own proxy (`serviceProxy: ferrea`): computes this
//! node's [`ServicePlan`] from the Services and EndpointSlices of the desired state
//! ([`crate::proxy::plan::plan`]) and applies it to both places that translate Service
//! traffic: the dataplane, for the pods' traffic it load-balances itself
//! ([`Dataplane::set_services`]), and ferrea's nftables table, for everything that reaches the
//! node's stack ([`ServiceRules`]).
//!
//! UDP has no connection end: a client that keeps sending keeps its conntrack entry, and its
//! DNAT, forever. When a UDP frontend loses an endpoint, gains its first, or goes away, the
//! entries to that frontend are deleted, as kube-proxy does ([`Conntrack::delete_udp_to`]);
//! the next packet is translated anew. TCP connections are left to end on their own.
//!
//! Load balancers' health checks of `externalTrafficPolicy: Local` Services are answered on
//! their `healthCheckNodePort` ([`HealthServer`]), with this node's count of ready endpoints.
//!
//! With `serviceProxy: kube-proxy` the controller runs once: it empties what an earlier run
//! with ferrea's proxy left in the dataplane (the table is re-rendered without Service rules
//! by every start anyway).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use tokio::sync::watch;

use super::runner::{self, Action, Desired, Reconciler, RunnerConfig, Trigger, Wakers};
use crate::dataplane::{Dataplane, DataplaneError};
use crate::kernel::conntrack::{Conntrack, ConntrackError};
use crate::kernel::nftables::{NatError, NatTable, ServiceRules};
use crate::proxy::health::HealthServer;
use crate::proxy::{Backend, ServicePlan};
use crate::source::{DesiredState, Protocol};

/// What a pass of the service controller failed at.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The dataplane refused the plan.
    #[error("applying {frontends} Service frontends to the {dataplane} dataplane")]
    Dataplane {
        /// The backend.
        dataplane: &'static str,
        /// How many frontends the plan has.
        frontends: usize,
        /// Why.
        #[source]
        source: DataplaneError,
    },
    /// ferrea's nftables table refused the Service rules.
    #[error("loading the Service rules ({frontends} frontends) into ferrea's nftables table")]
    Table {
        /// How many frontends the plan has.
        frontends: usize,
        /// Why.
        #[source]
        source: NatError,
    },
    /// Stale UDP conntrack entries could not be deleted.
    #[error("deleting the UDP conntrack entries of changed Service frontends")]
    Conntrack(#[source] ConntrackError),
}

/// The controller (see the module doc).
pub struct ServiceReconciler {
    node_name: String,
    node_ip: Ipv4Addr,
    service_cidr: Ipv4Network,
    dp: Arc<dyn Dataplane>,
    nat: Arc<NatTable>,
    conntrack: Arc<dyn Conntrack>,
    /// What the dataplane and the table last accepted; `None` before the first pass and after
    /// a failure (the next pass applies again).
    applied: Option<ServicePlan>,
    /// The UDP frontends of the last plan both accepted, with their endpoints.
    udp: BTreeMap<(Ipv4Addr, u16), BTreeSet<Backend>>,
    /// Conflicts and health-check ports that could not be listened on, reported already
    /// (each is logged once).
    reported: BTreeSet<String>,
    /// The listeners of the load balancers' health checks.
    health: HealthServer,
}

impl ServiceReconciler {
    /// A controller for node `node_name`, whose NodePorts are on `node_ip`.
    pub fn new(
        node_name: &str,
        node_ip: Ipv4Addr,
        service_cidr: Ipv4Network,
        dp: Arc<dyn Dataplane>,
        nat: Arc<NatTable>,
        conntrack: Arc<dyn Conntrack>,
    ) -> Self {
        ServiceReconciler {
            node_name: node_name.to_owned(),
            node_ip,
            service_cidr,
            dp,
            nat,
            conntrack,
            applied: None,
            udp: BTreeMap::new(),
            reported: BTreeSet::new(),
            health: HealthServer::new(Ipv4Addr::UNSPECIFIED),
        }
    }

    /// Where the health checks listen (every address of the node by default).
    pub fn with_health_bind_ip(mut self, ip: Ipv4Addr) -> Self {
        self.health = HealthServer::new(ip);
        self
    }

    /// The ports the load balancers' health checks are answered on.
    pub fn health_ports(&self) -> Vec<u16> {
        self.health.ports()
    }

    /// The plan last applied to both the dataplane and the table.
    pub fn applied(&self) -> Option<&ServicePlan> {
        self.applied.as_ref()
    }
}

/// The UDP frontends of `plan` (address and port, node ports at `node_ip`) with every
/// endpoint they may send to.
fn udp_frontends(
    plan: &ServicePlan,
    node_ip: Ipv4Addr,
) -> BTreeMap<(Ipv4Addr, u16), BTreeSet<Backend>> {
    let mut m: BTreeMap<(Ipv4Addr, u16), BTreeSet<Backend>> = BTreeMap::new();
    for v in plan
        .vips
        .iter()
        .filter(|v| v.addr.protocol == Protocol::Udp)
    {
        m.entry((v.addr.ip, v.addr.port))
            .or_default()
            .extend(v.backends.iter().chain(&v.external_backends).cloned());
    }
    for n in plan
        .node_ports
        .iter()
        .filter(|n| n.protocol == Protocol::Udp)
    {
        m.entry((node_ip, n.port))
            .or_default()
            .extend(n.backends.iter().cloned());
    }
    m
}

/// The UDP frontends whose conntrack entries are stale after going from `old` to `new`: gone,
/// or an endpoint lost, or the first endpoint gained. Sorted by address.
fn stale_udp(
    old: &BTreeMap<(Ipv4Addr, u16), BTreeSet<Backend>>,
    new: &BTreeMap<(Ipv4Addr, u16), BTreeSet<Backend>>,
) -> BTreeMap<Ipv4Addr, Vec<u16>> {
    let mut out: BTreeMap<Ipv4Addr, Vec<u16>> = BTreeMap::new();
    for (k, was) in old {
        let stale = match new.get(k) {
            None => true,
            Some(now) => !was.is_subset(now) || (was.is_empty() && !now.is_empty()),
        };
        if stale {
            out.entry(k.0).or_default().push(k.1);
        }
    }
    for (k, now) in new {
        if !old.contains_key(k) && !now.is_empty() {
            // A frontend that appears may have had rejected or untranslated packets' entries.
            out.entry(k.0).or_default().push(k.1);
        }
    }
    out
}

impl Reconciler for ServiceReconciler {
    type Error = ServiceError;

    fn name(&self) -> &'static str {
        "services"
    }

    async fn reconcile(
        &mut self,
        desired: &Desired<'_>,
        t: Trigger,
    ) -> Result<Action, ServiceError> {
        let planned = {
            let st: &DesiredState = &desired.get();
            crate::proxy::plan::plan(st, &self.node_name)
        };
        for c in &planned.conflicts {
            if self.reported.insert(c.clone()) {
                tracing::warn!(conflict = %c, "two Services claim one frontend");
            }
        }
        // The health checks first: their counts follow the endpoints even while the packet
        // paths are being (re)applied.
        let unbound = self.health.sync(&planned.health_checks);
        let health_action = if unbound.is_empty() {
            Action::Await
        } else {
            Action::Requeue(HEALTH_RETRY)
        };
        for e in unbound {
            let msg = format!("{e}: {}", e.source);
            if self.reported.insert(msg.clone()) {
                tracing::warn!(error = %msg, "a health-check port could not be listened on; trying again");
            }
        }
        let plan = planned.plan;
        if !t.converge() && self.applied.as_ref() == Some(&plan) {
            return Ok(health_action);
        }
        let frontends = plan.vips.len() + plan.node_ports.len();
        // A failure of either leaves `applied` unset: the next pass applies both again. Until
        // then the health checks say the proxy is not healthy, as kube-proxy's do.
        self.applied = None;
        let applied = async {
            self.dp
                .set_services(&plan)
                .await
                .map_err(|source| ServiceError::Dataplane {
                    dataplane: self.dp.name(),
                    frontends,
                    source,
                })?;
            self.nat
                .set_services(Some(ServiceRules {
                    node_ip: self.node_ip,
                    service_cidr: self.service_cidr,
                    plan: plan.clone(),
                }))
                .await
                .map_err(|source| ServiceError::Table { frontends, source })
        }
        .await;
        self.health.set_healthy(applied.is_ok());
        applied?;
        let udp = udp_frontends(&plan, self.node_ip);
        let stale = stale_udp(&self.udp, &udp);
        self.applied = Some(plan);
        for (ip, ports) in stale {
            let n = self
                .conntrack
                .delete_udp_to(ip, &ports)
                .await
                .map_err(ServiceError::Conntrack)?;
            if n > 0 {
                tracing::debug!(%ip, ?ports, entries = n, "stale UDP conntrack entries of Service frontends deleted");
            }
        }
        self.udp = udp;
        tracing::info!(frontends, "Service plan applied");
        Ok(health_action)
    }
}

/// How soon a health-check port that could not be listened on is tried again.
const HEALTH_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the service controller on the runner (`serviceProxy: ferrea`), or empties the
/// dataplane's Service entries once (`kube-proxy`: kube-proxy translates Services).
pub fn start(
    proxy: crate::config::ServiceProxy,
    reconciler: ServiceReconciler,
    state: watch::Receiver<DesiredState>,
    metrics: crate::metrics::Metrics,
) {
    match proxy {
        crate::config::ServiceProxy::Ferrea => {
            tokio::spawn(runner::run_observed(
                reconciler,
                state,
                Wakers::none(),
                RunnerConfig::default(),
                metrics,
            ));
        }
        crate::config::ServiceProxy::KubeProxy => {
            let dp = reconciler.dp.clone();
            tokio::spawn(async move {
                if let Err(e) = dp.set_services(&ServicePlan::default()).await {
                    tracing::warn!(error = %runner::error_chain(&e), "removing Service entries of an earlier run with serviceProxy: ferrea");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests;
