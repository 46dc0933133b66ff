//! The [`ServicePlan`] of a node, computed from the desired state: a pure function, so the
//! rules kube-proxy applies in choosing endpoints are tested here without a kernel.
//!
//! For each port of each Service with a cluster IP (headless and `ExternalName` Services have
//! nothing to proxy), the endpoints are the EndpointSlice endpoints of the Service whose port
//! has the Service port's name and protocol, deduplicated by address and port. Of those:
//! - usable are the ready ones or, when none is ready, the serving-and-terminating ones
//!   (kube-proxy's fallback, so a rolling update never leaves a Service without endpoints);
//! - `internalTrafficPolicy: Local` keeps this node's for traffic from the node;
//!   `externalTrafficPolicy: Local` keeps this node's for traffic from outside (NodePorts,
//!   externalIPs, LoadBalancer IPs), and that traffic keeps its source address;
//! - topology hints are followed when every usable endpoint has them and one names this
//!   node's zone (label `topology.kubernetes.io/zone`); otherwise they are ignored, as
//!   kube-proxy does;
//! - a `LoadBalancer` Service with `externalTrafficPolicy: Local` and a
//!   `healthCheckNodePort` gets a [`HealthCheck`] counting this node's ready endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::{Backend, HealthCheck, NodePortService, ServiceAddr, ServicePlan, VipKind, VipService};
use crate::source::{DesiredState, Endpoint, ServicePort};

/// The label of a Node naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A plan and what was left out of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Planned {
    /// What the node does.
    pub plan: ServicePlan,
    /// Frontends left out, each with the reason (two Services claiming one address and port:
    /// the first by name keeps it).
    pub conflicts: Vec<String>,
    /// The health checks the node answers, sorted by port (not part of [`ServicePlan`]: the
    /// packet paths do not carry them, the agent's own listeners do).
    pub health_checks: Vec<HealthCheck>,
}

/// The plan of node `node` (its `metadata.name`).
pub fn plan(desired: &DesiredState, node: &str) -> Planned {
    let zone = desired
        .nodes
        .get(node)
        .and_then(|n| n.labels.get(ZONE_LABEL))
        .cloned();
    // EndpointSlices by their Service's key.
    let mut slices: BTreeMap<String, Vec<&crate::source::EndpointSliceInfo>> = BTreeMap::new();
    for s in desired.endpoint_slices.values() {
        slices
            .entry(crate::source::object_key(&s.namespace, &s.service))
            .or_default()
            .push(s);
    }
    let mut vips: BTreeMap<ServiceAddr, VipService> = BTreeMap::new();
    let mut node_ports: BTreeMap<(u16, crate::source::Protocol), NodePortService> = BTreeMap::new();
    let mut conflicts = Vec::new();
    let mut health_checks: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    for (key, svc) in &desired.services {
        if svc.service_type == "ExternalName" || svc.cluster_ips.is_empty() {
            continue;
        }
        let svc_slices = slices.get(key).map(Vec::as_slice).unwrap_or(&[]);
        if let (Some(port), true) = (
            svc.health_check_node_port,
            svc.service_type == "LoadBalancer" && svc.external_local,
        ) {
            let local_endpoints = svc
                .ports
                .iter()
                .flat_map(|p| endpoints_of(svc_slices, p, node))
                .filter(|c| c.local && c.ep.ready)
                .map(|c| c.backend.ip)
                .collect::<BTreeSet<_>>()
                .len();
            if let Some(first) = health_checks.get(&port) {
                conflicts.push(format!(
                    "{key}: healthCheckNodePort {port} is already {}/{}'s; left out",
                    first.namespace, first.name
                ));
            } else {
                health_checks.insert(
                    port,
                    HealthCheck {
                        port,
                        namespace: svc.namespace.clone(),
                        name: svc.name.clone(),
                        local_endpoints,
                    },
                );
            }
        }
        for port in &svc.ports {
            let name = match &port.name {
                Some(p) => format!("{key}:{p}"),
                None => key.clone(),
            };
            let eps = endpoints_of(svc_slices, port, node);
            let cluster = topology(usable(&eps, |_| true), zone.as_deref());
            let local: Vec<Backend> = usable(&eps, |e| e.local)
                .into_iter()
                .map(|(_, b)| b)
                .collect();
            let internal = if svc.internal_local {
                local.clone()
            } else {
                cluster.clone()
            };
            let external = if svc.external_local {
                local.clone()
            } else {
                cluster.clone()
            };
            let mut add = |addr: ServiceAddr, kind: VipKind| {
                let (backends, external_backends, external_local) = match kind {
                    VipKind::ClusterIp => (internal.clone(), internal.clone(), false),
                    _ => (cluster.clone(), external.clone(), svc.external_local),
                };
                let v = VipService {
                    name: name.clone(),
                    addr,
                    kind,
                    backends,
                    external_backends,
                    external_local,
                    affinity_secs: svc.affinity_secs,
                };
                if let Some(first) = vips.get(&addr) {
                    conflicts.push(format!(
                        "{name}: {} {addr} is already {}'s; left out",
                        kind.as_str(),
                        first.name
                    ));
                } else {
                    vips.insert(addr, v);
                }
            };
            let at = |ip: Ipv4Addr| ServiceAddr {
                ip,
                port: port.port,
                protocol: port.protocol,
            };
            for ip in &svc.cluster_ips {
                add(at(*ip), VipKind::ClusterIp);
            }
            for ip in &svc.external_ips {
                add(at(*ip), VipKind::ExternalIp);
            }
            if svc.service_type == "LoadBalancer" {
                for ip in &svc.load_balancer_ips {
                    add(at(*ip), VipKind::LoadBalancer);
                }
            }
            if let (Some(np), true) = (
                port.node_port,
                matches!(svc.service_type.as_str(), "NodePort" | "LoadBalancer"),
            ) {
                let k = (np, port.protocol);
                if let Some(first) = node_ports.get(&k) {
                    conflicts.push(format!(
                        "{name}: nodePort {np}/{} is already {}'s; left out",
                        port.protocol.as_str(),
                        first.name
                    ));
                } else {
                    node_ports.insert(
                        k,
                        NodePortService {
                            name: name.clone(),
                            port: np,
                            protocol: port.protocol,
                            backends: external.clone(),
                            external_local: svc.external_local,
                            affinity_secs: svc.affinity_secs,
                        },
                    );
                }
            }
        }
    }
    Planned {
        plan: ServicePlan {
            vips: vips.into_values().collect(),
            node_ports: node_ports.into_values().collect(),
        },
        conflicts,
        health_checks: health_checks.into_values().collect(),
    }
}

/// One endpoint of a Service port, with what choosing it needs.
struct Candidate<'a> {
    backend: Backend,
    local: bool,
    ep: &'a Endpoint,
}

/// The endpoints of `port` in `slices`, deduplicated by address and port (the same endpoint
/// can be in two slices while the controller moves it).
fn endpoints_of<'a>(
    slices: &[&'a crate::source::EndpointSliceInfo],
    port: &ServicePort,
    node: &str,
) -> Vec<Candidate<'a>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for s in slices {
        let Some(p) = s
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in &s.endpoints {
            if !seen.insert((ep.address, p.port)) {
                continue;
            }
            let local = ep.node_name.as_deref() == Some(node);
            out.push(Candidate {
                backend: Backend {
                    ip: ep.address,
                    port: p.port,
                    local,
                },
                local,
                ep,
            });
        }
    }
    out
}

/// The usable endpoints among those `keep` accepts: the ready ones, else the serving and
/// terminating ones. Sorted.
fn usable<'a, 'b>(
    eps: &'b [Candidate<'a>],
    keep: impl Fn(&Candidate<'a>) -> bool,
) -> Vec<(&'b Candidate<'a>, Backend)> {
    let kept: Vec<&Candidate<'a>> = eps.iter().filter(|c| keep(c)).collect();
    let ready: Vec<&Candidate<'a>> = kept.iter().copied().filter(|c| c.ep.ready).collect();
    let chosen = if ready.is_empty() {
        kept.into_iter()
            .filter(|c| c.ep.serving && c.ep.terminating)
            .collect()
    } else {
        ready
    };
    let mut v: Vec<(&Candidate<'a>, Backend)> =
        chosen.into_iter().map(|c| (c, c.backend.clone())).collect();
    v.sort_by(|a, b| a.1.cmp(&b.1));
    v
}

/// Follows topology hints where they apply (every endpoint has hints and one is for `zone`).
fn topology(eps: Vec<(&Candidate<'_>, Backend)>, zone: Option<&str>) -> Vec<Backend> {
    let all: Vec<Backend> = eps.iter().map(|(_, b)| b.clone()).collect();
    let Some(zone) = zone else {
        return all;
    };
    if eps.is_empty() || eps.iter().any(|(c, _)| c.ep.zone_hints.is_none()) {
        return all;
    }
    let mine: Vec<Backend> = eps
        .iter()
        .filter(|(c, _)| {
            c.ep.zone_hints
                .as_ref()
                .is_some_and(|z| z.iter().any(|z| z == zone))
        })
        .map(|(_, b)| b.clone())
        .collect();
    if mine.is_empty() { all } else { mine }
}

#[cfg(test)]
mod tests;
