//! OpenFlow 1.5 for the OVS backend: a codec for the subset of the protocol ferrea's
//! pipeline uses ([`codec`]) and a persistent connection to a bridge's management socket
//! ([`conn`]).
//!
//! No maintained Rust OpenFlow library exists (the crates on crates.io stop at OpenFlow 1.0/1.3
//! and have no bundles), so this is written here, small and tested against `ovs-ofctl`.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

pub mod codec;
pub mod conn;

pub use codec::{
    Action, Bucket, BundleMsg, Field, FlowMod, FlowStats, GroupMod, Instruction, Match, port,
};
pub use conn::{ConnError, OfConn};

/// What the OVS backend does on one OpenFlow connection to its bridge.
///
/// Contract:
/// - [`OpenFlow::bundle`] is all-or-nothing and ordered: the switch commits every flow mod or
///   none (an atomic OpenFlow bundle), so packets see the flows before or after, never a
///   mix. Adds replace an identical (table, priority, match) flow in place, keeping its
///   counters, and deletes of absent flows are no error, so a repeated bundle converges;
/// - [`OpenFlow::dump_flows`] reads the flows (with counters) whose cookie matches under the
///   mask, in one table or all of them;
/// - a broken connection stays broken: every request fails with [`ConnError::Closed`] or
///   [`ConnError::Io`] and [`OpenFlow::is_closed`] turns true. Reconnecting is the backend's
///   (through an [`OpenFlowConnector`]), which then re-installs every flow it wants;
/// - safe to use concurrently from several tasks; requests are matched to replies by xid.
///
/// Implementations: [`OfConn`] and, for tests, `testing::ovs::FakeSwitch` (an in-memory flow
/// table that records every bundle).
#[async_trait]
pub trait OpenFlow: Send + Sync {
    /// Whether the connection broke (the switch closed it, or a write failed).
    fn is_closed(&self) -> bool;

    /// A round trip (OFPT_ECHO): finds a peer that stopped answering without closing.
    async fn echo(&self) -> Result<(), ConnError>;

    /// Sends `mods` in one atomic, ordered bundle and commits it. Empty: nothing is sent.
    async fn bundle(&self, op: &'static str, mods: &[FlowMod]) -> Result<(), ConnError>;

    /// [`OpenFlow::bundle`] of flow-mods and group-mods in order (a group must exist before
    /// a flow referring to it is added; deleting a group deletes the flows referring to it).
    async fn bundle_msgs(&self, op: &'static str, msgs: &[BundleMsg]) -> Result<(), ConnError>;

    /// The flows of `table` ([`codec::TABLE_ALL`]: every table) whose cookie equals
    /// `cookie` under `mask`, with their counters.
    async fn dump_flows(
        &self,
        table: u8,
        cookie: u64,
        mask: u64,
    ) -> Result<Vec<FlowStats>, ConnError>;
}

/// Opens OpenFlow connections to the backend's bridge: the first one, and a new one after
/// the old one broke (ovs-vswitchd restarted). A connect that fails is retried by the caller.
#[async_trait]
pub trait OpenFlowConnector: Send + Sync {
    /// Connects and negotiates OpenFlow 1.5.
    async fn connect(&self) -> Result<Arc<dyn OpenFlow>, ConnError>;
}

#[async_trait]
impl OpenFlow for OfConn {
    fn is_closed(&self) -> bool {
        OfConn::is_closed(self)
    }
    async fn echo(&self) -> Result<(), ConnError> {
        OfConn::echo(self).await
    }
    async fn bundle(&self, op: &'static str, mods: &[FlowMod]) -> Result<(), ConnError> {
        OfConn::bundle(self, op, mods).await
    }
    async fn bundle_msgs(&self, op: &'static str, msgs: &[BundleMsg]) -> Result<(), ConnError> {
        OfConn::bundle_msgs(self, op, msgs).await
    }
    async fn dump_flows(
        &self,
        table: u8,
        cookie: u64,
        mask: u64,
    ) -> Result<Vec<FlowStats>, ConnError> {
        OfConn::dump_flows(self, table, cookie, mask).await
    }
}

/// Connects to a bridge's management socket (`<run_dir>/<bridge>.mgmt`).
pub struct MgmtSocket(pub PathBuf);

#[async_trait]
impl OpenFlowConnector for MgmtSocket {
    async fn connect(&self) -> Result<Arc<dyn OpenFlow>, ConnError> {
        Ok(Arc::new(OfConn::connect(&self.0).await?))
    }
}
