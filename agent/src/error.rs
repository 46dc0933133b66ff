//! The agent's errors as the CNI server reports them, and the one function that maps them to
//! CNI error codes.

use crate::dataplane::DataplaneError;
use crate::ipam::IpamError;
use crate::podnet::PodNetError;
use crate::store::StoreError;
use ferrea_proto::cni::v1::ErrorCode;

/// Errors of a CNI operation.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent is starting up or its dataplane is not ready.
    #[error("ferrea-agent is not ready yet: {0}")]
    NotReady(String),
    /// STATUS while the agent cannot take ADDs yet (CNI spec: code 50).
    #[error("ferrea-agent cannot add pods yet: {0}")]
    NotAvailable(String),
    /// The network configuration (stdin) is not valid JSON.
    #[error("network configuration is not valid JSON: {0}")]
    Decoding(String),
    /// The configuration's `cniVersion` is not one the agent speaks.
    #[error("incompatible CNI version: {0}")]
    IncompatibleVersion(String),
    /// The network configuration has a wrong or missing field.
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    /// A CNI_* variable is missing or malformed.
    #[error("invalid CNI environment: {0}")]
    InvalidEnv(String),
    /// The attachment is not known to the agent.
    #[error("unknown container {container_id} interface {ifname}")]
    UnknownContainer {
        /// CNI_CONTAINERID.
        container_id: String,
        /// CNI_IFNAME.
        ifname: String,
    },
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
    /// The request's task died (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl AgentError {
    /// The CNI error code for this error (CNI spec 1.1, "Error codes").
    pub fn cni_code(&self) -> ErrorCode {
        match self {
            AgentError::NotReady(_) => ErrorCode::TryAgainLater,
            AgentError::NotAvailable(_) => ErrorCode::PluginNotAvailable,
            AgentError::Decoding(_) => ErrorCode::DecodingFailure,
            AgentError::IncompatibleVersion(_) => ErrorCode::IncompatibleCniVersion,
            AgentError::InvalidConfig(_) => ErrorCode::InvalidNetworkConfig,
            AgentError::InvalidEnv(_) => ErrorCode::InvalidEnvironmentVariables,
            AgentError::UnknownContainer { .. } => ErrorCode::UnknownContainer,
            AgentError::PodNet(PodNetError::Netns { .. }) => ErrorCode::InvalidEnvironmentVariables,
            AgentError::Store(_) => ErrorCode::IoFailure,
            AgentError::Ipam(_)
            | AgentError::PodNet(_)
            | AgentError::Dataplane(_)
            | AgentError::Internal(_) => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_cni_spec() {
        assert_eq!(AgentError::NotReady("x".into()).cni_code() as i32, 11);
        assert_eq!(AgentError::Decoding("x".into()).cni_code() as i32, 6);
        assert_eq!(AgentError::InvalidConfig("x".into()).cni_code() as i32, 7);
        assert_eq!(AgentError::InvalidEnv("x".into()).cni_code() as i32, 4);
        let e = AgentError::UnknownContainer {
            container_id: "c".into(),
            ifname: "eth0".into(),
        };
        assert_eq!(e.cni_code() as i32, 3);
        let e = AgentError::PodNet(PodNetError::Netns {
            netns: "/run/netns/gone".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        });
        assert_eq!(e.cni_code() as i32, 4);
        assert!(e.to_string().contains("/run/netns/gone"));
    }
}
