//! ferrea-agent: the per-node daemon of ferrea.
//!
//! It serves the CNI gRPC API that `ferrea-cni` calls, allocates pod IPs from the node's pod
//! CIDR, plumbs pod interfaces, and programs the packet path through the [`dataplane::Dataplane`]
//! trait. Desired state (this node's pod CIDR, later Egress, NodePortLocal and policy objects)
//! comes from a [`source`]; the reconcilers never know which source fed them.

pub mod config;
pub mod dataplane;
