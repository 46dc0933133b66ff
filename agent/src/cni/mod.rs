//! The CNI side of the agent: the gRPC server `ferrea-cni` talks to ([`server`]), the
//! errors it reports with their CNI codes ([`error`]), and its root-only socket
//! ([`socket`], which the debug socket shares).

pub mod error;
pub mod server;
pub mod socket;
