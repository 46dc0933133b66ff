//! Desired state and where it comes from.
//!
//! A source fills a [`DesiredState`] and publishes every new version on a `watch` channel; the
//! reconcilers only ever see `DesiredState`, never the source. Today's source is [`files`]: a
//! directory of Kubernetes-style manifests (the embedded default, also used by tests and the
//! demo). The Kubernetes source (kube-rs watchers) will publish the same type.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

pub mod files;
pub mod manifest;

/// A node as the agent needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// `metadata.name`.
    pub name: String,
    /// `spec.podCIDR`, if allocated.
    pub pod_cidr: Option<Ipv4Network>,
    /// The `InternalIP` address from `status.addresses`, if any.
    pub internal_ip: Option<Ipv4Addr>,
}

/// Everything the agent reconciles, as of one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// All nodes of the cluster, by name.
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Objects the source could not accept, each with a message naming the object and field.
    /// They are left out of the state; the previous good version of a broken file is kept.
    pub errors: Vec<String>,
}
