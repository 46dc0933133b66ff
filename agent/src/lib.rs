//! ferrea-agent: the per-node daemon of ferrea.
//!
//! It serves the CNI gRPC API that `ferrea-cni` calls ([`cni_server`]), allocates pod IPs from
//! the node's pod CIDR ([`ipam`], persisted in [`store`]), plumbs pod interfaces ([`podnet`]),
//! masquerades traffic leaving the cluster and DNATs NodePortLocal node ports to pods
//! ([`nat`], [`npl`], [`conntrack`]) and programs the packet path through the
//! [`dataplane::Dataplane`] trait. Desired state (this node's pod CIDR, Pods and Services,
//! later Egress and policy objects) comes from a [`source`]; the reconcilers never know which
//! source fed them. [`agent`] wires it all together.

pub mod agent;
pub mod cni_server;
pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod egress;
pub mod error;
pub mod ipam;
pub mod nat;
pub mod npl;
pub mod offload;
pub mod podnet;
pub mod pods;
pub mod source;
pub mod store;
pub mod sysctl;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod transport;
pub mod vlan;
