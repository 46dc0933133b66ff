//! The node's kernel, one module per kind of side effect: what the controllers and the
//! dataplane backends change outside their own objects. Nothing here knows about pods,
//! Egresses or sources; it only speaks in interfaces, addresses, rules and tables.

pub mod addresses;
pub mod conntrack;
pub mod garp;
pub mod links;
pub mod netlink;
pub mod nftables;
pub mod offload;
pub mod routes;
pub mod rules;
pub mod shaping;
pub mod sysctl;
pub mod tables;
pub mod tc;
pub mod transport;
pub mod vlan;
