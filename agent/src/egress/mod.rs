//! Egress: per-workload egress IPs from `ExternalIPPool`s (Antrea's `crd.antrea.io/v1beta1`
//! CRDs).
//!
//! This is the start of the feature: the objects are decoded and validated ([`model`]) and
//! every agent computes the same IP and node for each Egress ([`assign`]). Putting the IPs on
//! the wire (VLAN sub-interfaces, policy routing, SNAT by mark, the dataplane's marking and
//! tunnelling to the egress node, status write-back) is not built yet.

pub mod assign;
pub mod model;
