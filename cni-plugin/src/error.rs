//! The CNI error the plugin prints on stdout when an operation fails.
//!
//! The CNI spec (1.1, "Error") asks for a JSON object `{"cniVersion", "code", "msg", "details"}` on
//! stdout and a non-zero exit status. Codes 1-99 are the spec's well-known codes, which the
//! `ferrea.cni.v1.ErrorCode` enum mirrors; codes from 100 up belong to the plugin (ferrea uses
//! 999, `INTERNAL`, for everything the spec has no code for).

use ferrea_proto::cni::v1::ErrorCode;
use serde_json::{Map, Value, json};

/// A failed CNI operation: the spec's error code, a short message and optional details.
///
/// Displayed as its message; [`CniError::to_json`] gives the wire form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    /// The CNI error code (see the spec's "Well-known Error Codes").
    pub code: u32,
    /// A short message saying what failed.
    pub msg: String,
    /// Longer details (an underlying error, for instance); left out of the JSON when empty.
    pub details: String,
}

impl CniError {
    /// An error with `code` and `msg`, and no details.
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code: code_number(code),
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds details (usually the `Display` of the underlying error).
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// `INCOMPATIBLE_CNI_VERSION` (1).
    pub fn incompatible_version(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::IncompatibleCniVersion, msg)
    }

    /// `INVALID_ENVIRONMENT_VARIABLES` (4).
    pub fn invalid_env(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidEnvironmentVariables, msg)
    }

    /// `IO_FAILURE` (5).
    pub fn io(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::IoFailure, msg)
    }

    /// `DECODING_FAILURE` (6).
    pub fn decoding(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::DecodingFailure, msg)
    }

    /// `INVALID_NETWORK_CONFIG` (7).
    pub fn invalid_config(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidNetworkConfig, msg)
    }

    /// `INTERNAL` (999): anything the spec has no code for.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, msg)
    }

    /// The error as the spec's JSON object, for a configuration of `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut obj = Map::new();
        obj.insert("cniVersion".into(), json!(cni_version));
        obj.insert("code".into(), json!(self.code));
        obj.insert("msg".into(), json!(self.msg));
        // `details` is optional in the spec; libcni's types.Error omits it when empty too.
        if !self.details.is_empty() {
            obj.insert("details".into(), json!(self.details));
        }
        Value::Object(obj)
    }
}

/// The numeric CNI code of a proto [`ErrorCode`] (the enum's values are the spec's codes).
pub fn code_number(code: ErrorCode) -> u32 {
    // The enum has no negative values; UNSPECIFIED (0) never reaches the wire as an error.
    u32::try_from(code as i32).unwrap_or(999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_spec_numbers() {
        assert_eq!(CniError::incompatible_version("x").code, 1);
        assert_eq!(CniError::invalid_env("x").code, 4);
        assert_eq!(CniError::io("x").code, 5);
        assert_eq!(CniError::decoding("x").code, 6);
        assert_eq!(CniError::invalid_config("x").code, 7);
        assert_eq!(CniError::new(ErrorCode::TryAgainLater, "x").code, 11);
        assert_eq!(CniError::new(ErrorCode::PluginNotAvailable, "x").code, 50);
        assert_eq!(CniError::internal("x").code, 999);
    }

    #[test]
    fn json_has_the_spec_shape() {
        let e = CniError::new(ErrorCode::TryAgainLater, "agent down").with_details("ENOENT");
        assert_eq!(
            e.to_json("0.4.0"),
            json!({"cniVersion": "0.4.0", "code": 11, "msg": "agent down", "details": "ENOENT"})
        );
    }

    #[test]
    fn empty_details_are_left_out() {
        let v = CniError::decoding("bad").to_json("1.1.0");
        assert_eq!(v, json!({"cniVersion": "1.1.0", "code": 6, "msg": "bad"}));
        assert_eq!(CniError::decoding("bad").to_string(), "bad");
    }
}
