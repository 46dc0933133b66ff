//! ferrea-agent: the per-node daemon of ferrea.
//!
//! The crate is layered; a module only uses the ones above it in this list (a test,
//! `tests/architecture.rs`, fails on a cycle):
//!
//! - [`config`]: the typed configuration document.
//! - [`metrics`]: the Prometheus metrics handle the parts count into (no I/O; served by
//!   [`debug::http`]).
//! - [`net`]: the node's packet-path contracts every part agrees on (gateway device, tunnel
//!   key, Egress marks, the transport and tunnel facts).
//! - [`source`]: the desired state (Nodes, Pods, Services, Egress, ExternalIPPool) and the
//!   sources that fill it; the object decoders, Antrea's CRD types included.
//! - [`policy`]: NetworkPolicy compiled into the per-pod lookup tables the dataplanes
//!   enforce (peer prefix to port class, class and port to rule).
//! - [`proxy`]: ferrea's service proxy: the model of what the node does for Services (the
//!   [`proxy::ServicePlan`] the nftables table and the dataplanes consume) and how it is
//!   computed from Services and EndpointSlices.
//! - [`kernel`]: one trait per kind of kernel side effect (links, addresses, routes, rules,
//!   nftables, sysctls, conntrack, TC, VLAN tagging) with its Linux implementation.
//! - [`membership`]: which nodes' agents are alive (a SWIM failure detector over UDP between
//!   agents, `foca`), for Egress failover.
//! - [`dataplane`]: the [`dataplane::Dataplane`] trait and its two backends, eBPF and Open
//!   vSwitch. Nothing outside this module and the wiring names a backend.
//! - [`pods`]: the pod manager (ADD, DEL, CHECK, GC, reconciliation), IPAM, the state store
//!   and the pod interface plumbing.
//! - [`cni`]: the CNI gRPC server and the mapping of errors to CNI codes.
//! - [`controllers`]: the reconcile runner and the controllers it drives (node changes,
//!   NodePortLocal, Egress).
//! - [`debug`]: the local APIs: the `ferrea.debug.v1` service for `ferreactl` on its own
//!   root-only socket, and the metrics and health endpoints. Reads what the parts hold.
//! - [`agent`]: the wiring: the order in which the parts start, and how they stop.
//!
//! `docs/architecture.md` in the repository walks through a CNI ADD and a desired-state
//! change, and says where a new controller or backend goes.

pub mod agent;
pub mod cni;
pub mod config;
pub mod controllers;
pub mod dataplane;
pub mod debug;
pub mod kernel;
pub mod membership;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod pods;
pub mod policy;
pub mod proxy;
pub mod source;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
