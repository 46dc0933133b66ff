//! The CNI side of the agent: the gRPC server `ferrea-cni` talks to ([`server`]) and the
//! errors it reports with their CNI codes ([`error`]).

pub mod error;
pub mod server;
