//! What the pod manager's operations fail with. The CNI server wraps it
//! ([`crate::cni::error::RequestError::Pod`]) and maps it to a CNI code there.

use crate::dataplane::DataplaneError;
use crate::pods::check::CheckFailure;
use crate::pods::ipam::IpamError;
use crate::pods::podnet::PodNetError;
use crate::pods::store::StoreError;

/// Errors of an operation on a pod attachment.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The attachment is not known to the agent.
    #[error("unknown container {container_id} interface {ifname}")]
    UnknownContainer {
        /// CNI_CONTAINERID.
        container_id: String,
        /// CNI_IFNAME.
        ifname: String,
    },
    /// A value the runtime asked for (a static IP or MAC) cannot be had.
    #[error("{origin} refused: {reason}")]
    Refused {
        /// How the runtime asked (`CNI_ARGS IP=10.0.0.5`).
        origin: String,
        /// Why not.
        reason: String,
        /// From CNI_ARGS (code 4) rather than the network configuration (code 7).
        from_env: bool,
    },
    /// CHECK found the attachment not as `prevResult` describes it.
    #[error("CHECK failed: {0}")]
    Check(#[from] CheckFailure),
    /// IP allocation failed.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Pod interface plumbing failed.
    #[error(transparent)]
    PodNet(#[from] PodNetError),
    /// The dataplane failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}
