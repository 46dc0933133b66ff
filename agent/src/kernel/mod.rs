//! The node's kernel, one module per kind of side effect: what the controllers and the
//! dataplane backends change outside their own objects. Nothing here knows about pods,
//! Egresses or sources; it only speaks in interfaces, addresses, rules and tables.

pub mod conntrack;
pub mod nftables;
pub mod offload;
pub mod routes;
pub mod sysctl;
pub mod tc;
pub mod transport;
pub mod vlan;
