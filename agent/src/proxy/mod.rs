//! ferrea's own service proxy (`serviceProxy: ferrea`): what kube-proxy does for a node,
//! computed from the same objects (Services and EndpointSlices) and carried by ferrea's
//! packet paths instead of kube-proxy's rules.
//!
//! The work is split the way the traffic is:
//! - Traffic of the pods to a Service's virtual addresses (ClusterIPs, externalIPs,
//!   LoadBalancer ingress IPs) is load-balanced by the dataplane itself
//!   ([`crate::dataplane::Dataplane::set_services`]): the eBPF programs pick a backend in the
//!   pod's own program and remember it in a connection table; the OVS pipeline uses groups
//!   and `ct(nat)`. Those packets never need the node's stack.
//! - Everything that reaches the node's stack (the node's own processes calling a ClusterIP,
//!   NodePorts and the external addresses from outside the node, and pods' packets that a
//!   backend chose to pass up) is translated by ferrea's nftables table
//!   ([`crate::kernel::nftables::ServiceRules`]), so no Service address ever leaves the node
//!   un-translated, whichever path a packet takes.
//!
//! This module holds the one model both consume ([`ServicePlan`]) and the pure function that
//! computes it from the desired state, with kube-proxy's rules for choosing
//! endpoints: ready ones, else serving-and-terminating ones; `internalTrafficPolicy` and
//! `externalTrafficPolicy: Local` restricting to this node's endpoints; topology hints when
//! every endpoint carries them.

use std::net::Ipv4Addr;

use crate::source::Protocol;

pub mod health;
pub mod plan;

/// An address, port and protocol a Service is reached at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAddr {
    /// The virtual address.
    pub ip: Ipv4Addr,
    /// The Service's `port` (or `nodePort`).
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

impl std::fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol.as_str())
    }
}

/// Which of a Service's addresses a frontend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VipKind {
    /// `spec.clusterIPs`.
    ClusterIp,
    /// `spec.externalIPs`.
    ExternalIp,
    /// `status.loadBalancer.ingress[].ip`.
    LoadBalancer,
}

impl VipKind {
    /// The name used in logs and dumps.
    pub fn as_str(self) -> &'static str {
        match self {
            VipKind::ClusterIp => "ClusterIP",
            VipKind::ExternalIp => "externalIP",
            VipKind::LoadBalancer => "LoadBalancer",
        }
    }
}

/// One endpoint a frontend sends to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// The endpoint's address (a pod's, or any address an EndpointSlice names).
    pub ip: Ipv4Addr,
    /// The port on it (the EndpointSlice port matching the Service port's name).
    pub port: u16,
    /// Whether the endpoint is on this node (`nodeName` is this node).
    pub local: bool,
}

/// A Service port at one virtual address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipService {
    /// `namespace/name:port-name` (`namespace/name` when the port has no name): for logs,
    /// dumps and counters.
    pub name: String,
    /// Where it is reached.
    pub addr: ServiceAddr,
    /// Which of the Service's addresses this is.
    pub kind: VipKind,
    /// The endpoints for traffic from this node (its pods and its own processes):
    /// `internalTrafficPolicy` applied for ClusterIPs; every usable endpoint for the external
    /// addresses (a pod calling a LoadBalancer IP is short-circuited, as kube-proxy does).
    /// Sorted; empty when the Service has none (connections are rejected).
    pub backends: Vec<Backend>,
    /// The endpoints for traffic from outside the node: `externalTrafficPolicy` applied for
    /// the external addresses, the same as `backends` for ClusterIPs. Sorted.
    pub external_backends: Vec<Backend>,
    /// `externalTrafficPolicy: Local` on an external address: traffic from outside keeps its
    /// source address (no masquerade), and goes only to local endpoints.
    pub external_local: bool,
    /// `sessionAffinity: ClientIP`: the timeout in seconds
    /// (`sessionAffinityConfig.clientIP.timeoutSeconds`, default 10800).
    pub affinity_secs: Option<u32>,
}

/// A Service port at a node port, on every address of the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePortService {
    /// `namespace/name:port-name`, as [`VipService::name`].
    pub name: String,
    /// The `nodePort`.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
    /// The endpoints (`externalTrafficPolicy` applied). Sorted.
    pub backends: Vec<Backend>,
    /// `externalTrafficPolicy: Local`: the client's source address is kept.
    pub external_local: bool,
    /// As [`VipService::affinity_secs`].
    pub affinity_secs: Option<u32>,
}

/// A Service whose load-balancer health checks this node answers (`spec.healthCheckNodePort`
/// of a `LoadBalancer` Service with `externalTrafficPolicy: Local`): the load balancer sends
/// to the nodes that have an endpoint, so it asks each node how many it has.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HealthCheck {
    /// The port, on every address of the node.
    pub port: u16,
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The ready endpoints of the Service on this node, counted by address (one pod serving
    /// two ports counts once), as kube-proxy counts them: terminating endpoints do not count,
    /// so a node whose last endpoint is going away fails the check and is drained.
    pub local_endpoints: usize,
}

/// Everything ferrea's proxy does on this node, in a canonical order (equal plans compare
/// equal, so a consumer re-applies only on a change).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePlan {
    /// The virtual-address frontends, sorted by address.
    pub vips: Vec<VipService>,
    /// The node ports, sorted by port and protocol.
    pub node_ports: Vec<NodePortService>,
}

impl ServicePlan {
    /// The frontend at `addr`, if any.
    pub fn vip(&self, addr: &ServiceAddr) -> Option<&VipService> {
        self.vips
            .binary_search_by(|v| v.addr.cmp(addr))
            .ok()
            .map(|i| &self.vips[i])
    }

    /// Every `(ip, port, protocol)` backend of any frontend of this plan.
    pub fn all_backends(&self) -> std::collections::BTreeSet<ServiceAddr> {
        let vip = self.vips.iter().flat_map(|v| {
            v.backends
                .iter()
                .chain(&v.external_backends)
                .map(|b| (b, v.addr.protocol))
        });
        let np = self
            .node_ports
            .iter()
            .flat_map(|n| n.backends.iter().map(|b| (b, n.protocol)));
        vip.chain(np)
            .map(|(b, protocol)| ServiceAddr {
                ip: b.ip,
                port: b.port,
                protocol,
            })
            .collect()
    }
}
