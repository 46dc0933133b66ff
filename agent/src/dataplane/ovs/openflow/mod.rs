//! OpenFlow 1.5 for the OVS backend: a codec for the subset of the protocol ferrea's
//! pipeline uses ([`codec`]) and a persistent connection to a bridge's management socket
//! ([`conn`]).
//!
//! No maintained Rust OpenFlow library exists (the crates on crates.io stop at OpenFlow 1.0/1.3
//! and have no bundles), so this is written here, small and tested against `ovs-ofctl`.

pub mod codec;
pub mod conn;

pub use codec::{Action, Field, FlowMod, FlowStats, Instruction, Match, port};
pub use conn::{ConnError, OfConn};
