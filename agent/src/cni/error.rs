//! The errors of a CNI request as the server reports them, and the one function that maps them to
//! CNI error codes.

use crate::pods::PodError;
use crate::pods::podnet::PodNetError;
use ferrea_proto::cni::v1::ErrorCode;

/// Errors of a CNI operation.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
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
    /// The pod manager failed (IPAM, the store, the interfaces, the dataplane).
    #[error(transparent)]
    Pod(#[from] PodError),
    /// The request's task died (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl RequestError {
    /// The CNI error code for this error (CNI spec 1.1, "Error codes").
    pub fn cni_code(&self) -> ErrorCode {
        match self {
            RequestError::NotReady(_) => ErrorCode::TryAgainLater,
            RequestError::NotAvailable(_) => ErrorCode::PluginNotAvailable,
            RequestError::Decoding(_) => ErrorCode::DecodingFailure,
            RequestError::IncompatibleVersion(_) => ErrorCode::IncompatibleCniVersion,
            RequestError::InvalidConfig(_) => ErrorCode::InvalidNetworkConfig,
            RequestError::InvalidEnv(_) => ErrorCode::InvalidEnvironmentVariables,
            RequestError::Pod(PodError::UnknownContainer { .. }) => ErrorCode::UnknownContainer,
            RequestError::Pod(PodError::PodNet(
                PodNetError::Netns { .. } | PodNetError::NotNetns { .. },
            )) => ErrorCode::InvalidEnvironmentVariables,
            RequestError::Pod(PodError::Refused { from_env: true, .. }) => {
                ErrorCode::InvalidEnvironmentVariables
            }
            RequestError::Pod(PodError::Refused {
                from_env: false, ..
            }) => ErrorCode::InvalidNetworkConfig,
            RequestError::Pod(PodError::Store(_)) => ErrorCode::IoFailure,
            RequestError::Pod(_) | RequestError::Internal(_) => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_cni_spec() {
        assert_eq!(RequestError::NotReady("x".into()).cni_code() as i32, 11);
        assert_eq!(RequestError::Decoding("x".into()).cni_code() as i32, 6);
        assert_eq!(RequestError::InvalidConfig("x".into()).cni_code() as i32, 7);
        assert_eq!(RequestError::InvalidEnv("x".into()).cni_code() as i32, 4);
        let e = RequestError::Pod(PodError::UnknownContainer {
            container_id: "c".into(),
            ifname: "eth0".into(),
        });
        assert_eq!(e.cni_code() as i32, 3);
        let e = RequestError::Pod(PodError::PodNet(PodNetError::Netns {
            netns: "/run/netns/gone".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        }));
        assert_eq!(e.cni_code() as i32, 4);
        assert!(e.to_string().contains("/run/netns/gone"));
        let e = RequestError::Pod(PodError::PodNet(PodNetError::NotNetns {
            netns: "/run/netns/x".into(),
            what: "is a directory on tmpfs, not a network namespace".into(),
        }));
        assert_eq!(e.cni_code() as i32, 4);
        assert_eq!(
            e.to_string(),
            "CNI_NETNS /run/netns/x is a directory on tmpfs, not a network namespace"
        );
        let refused = |from_env| {
            RequestError::Pod(PodError::Refused {
                origin: "IP".into(),
                reason: "no".into(),
                from_env,
            })
            .cni_code() as i32
        };
        assert_eq!((refused(true), refused(false)), (4, 7));
    }
}
