//! The network configuration the runtime writes on stdin, as far as the plugin needs it.
//!
//! The plugin validates only what it must before it can talk to the agent (JSON, `cniVersion`,
//! `name`, `type`, and where the agent listens) and forwards the bytes verbatim: the agent owns
//! the rest of the configuration (IPAM, MTU, `runtimeConfig`, `prevResult`, ...). Unknown keys
//! are never an error; runtimes add their own.

use serde_json::Value;

use crate::error::CniError;

/// Every configuration `cniVersion` the plugin accepts, oldest first. 0.3.0 is the first with
/// the result format (`interfaces`, `ips`) the agent produces.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The version the plugin speaks natively, and the one it answers in when the configuration
/// names none it supports.
pub const CURRENT_VERSION: &str = "1.1.0";

/// Where the agent listens unless the configuration's `agentSocket` says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ferrea/cni.sock";

/// The parts of the network configuration the plugin reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    /// `cniVersion`: one of [`SUPPORTED_VERSIONS`].
    pub cni_version: String,
    /// `name`: the network's name.
    pub name: String,
    /// `type`: the plugin's name (normally `ferrea-cni`).
    pub plugin_type: String,
    /// `agentSocket` (ferrea-specific, optional): the agent's unix socket. Default
    /// [`DEFAULT_AGENT_SOCKET`].
    pub agent_socket: String,
}

/// Whether `version` is one the plugin accepts.
pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// The `cniVersion` of `stdin` if it is JSON naming a supported version; used to pick the version
/// an error or a VERSION answer is written in before (or without) full validation.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    let version = v.get("cniVersion")?.as_str()?;
    is_supported(version).then(|| version.to_owned())
}

/// Parses and validates the network configuration.
///
/// Errors: not a JSON object, or a `cniVersion` that is not a string -> 6 (`DECODING_FAILURE`);
/// `cniVersion` missing or not supported -> 1 (`INCOMPATIBLE_CNI_VERSION`); `name` or `type`
/// missing or empty, or `agentSocket` not a non-empty string -> 7 (`INVALID_NETWORK_CONFIG`).
pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::decoding("network configuration on stdin is not valid JSON")
            .with_details(e.to_string())
    })?;
    let Value::Object(obj) = v else {
        return Err(CniError::decoding(
            "network configuration on stdin is not a JSON object",
        ));
    };
    let cni_version = match obj.get("cniVersion") {
        // libcni treats a missing cniVersion as 0.1.0, which no current plugin supports.
        None => {
            return Err(CniError::incompatible_version(format!(
                "network configuration has no cniVersion; supported versions are {}",
                SUPPORTED_VERSIONS.join(", ")
            )));
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(CniError::decoding("cniVersion must be a string")),
    };
    if !is_supported(&cni_version) {
        return Err(CniError::incompatible_version(format!(
            "incompatible CNI version {cni_version:?}; ferrea-cni supports {}",
            SUPPORTED_VERSIONS.join(", ")
        )));
    }
    let required = |key: &str| match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) | None => Err(CniError::invalid_config(format!(
            "network configuration has no {key:?}"
        ))),
        Some(_) => Err(CniError::invalid_config(format!(
            "network configuration: {key:?} must be a string"
        ))),
    };
    let name = required("name")?;
    let plugin_type = required("type")?;
    let agent_socket = match obj.get("agentSocket") {
        None | Some(Value::Null) => DEFAULT_AGENT_SOCKET.to_owned(),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return Err(CniError::invalid_config(
                "network configuration: \"agentSocket\" must be a non-empty string (a unix socket path)",
            ));
        }
    };
    Ok(NetConf {
        cni_version,
        name,
        plugin_type,
        agent_socket,
    })
}

/// Whether configuration version `have` is at least `want` (both dotted triples).
pub fn version_at_least(have: &str, want: &str) -> bool {
    fn triple(v: &str) -> Vec<u64> {
        v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
    }
    triple(have) >= triple(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_the_default_socket() {
        let c = parse(br#"{"cniVersion":"1.1.0","name":"pods","type":"ferrea-cni","ipam":{}}"#)
            .unwrap();
        assert_eq!(
            c,
            NetConf {
                cni_version: "1.1.0".into(),
                name: "pods".into(),
                plugin_type: "ferrea-cni".into(),
                agent_socket: DEFAULT_AGENT_SOCKET.into(),
            }
        );
    }

    #[test]
    fn agent_socket_is_read() {
        let c =
            parse(br#"{"cniVersion":"0.4.0","name":"n","type":"t","agentSocket":"/tmp/a.sock"}"#)
                .unwrap();
        assert_eq!(c.agent_socket, "/tmp/a.sock");
        let e =
            parse(br#"{"cniVersion":"0.4.0","name":"n","type":"t","agentSocket":3}"#).unwrap_err();
        assert_eq!(e.code, 7);
    }

    #[test]
    fn every_supported_version_parses() {
        for v in SUPPORTED_VERSIONS {
            let conf = format!(r#"{{"cniVersion":"{v}","name":"n","type":"t"}}"#);
            assert_eq!(parse(conf.as_bytes()).unwrap().cni_version, *v);
        }
    }

    #[test]
    fn malformed_json_is_code_6() {
        for bad in [
            &b"{not json"[..],
            b"",
            b"[1,2]",
            br#"{"cniVersion":1.0,"name":"n","type":"t"}"#,
        ] {
            assert_eq!(
                parse(bad).unwrap_err().code,
                6,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn unsupported_version_is_code_1_and_named() {
        for v in ["0.2.0", "9.9.9", "0.1.0", "1.1"] {
            let conf = format!(r#"{{"cniVersion":"{v}","name":"n","type":"t"}}"#);
            let e = parse(conf.as_bytes()).unwrap_err();
            assert_eq!(e.code, 1, "{v}");
            assert!(e.msg.contains(v), "{}", e.msg);
        }
        assert_eq!(parse(br#"{"name":"n","type":"t"}"#).unwrap_err().code, 1);
    }

    #[test]
    fn missing_name_or_type_is_code_7() {
        let e = parse(br#"{"cniVersion":"1.0.0","type":"t"}"#).unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("name"));
        let e = parse(br#"{"cniVersion":"1.0.0","name":"n"}"#).unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("type"));
        assert_eq!(
            parse(br#"{"cniVersion":"1.0.0","name":"","type":"t"}"#)
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            parse(br#"{"cniVersion":"1.0.0","name":5,"type":"t"}"#)
                .unwrap_err()
                .code,
            7
        );
    }

    #[test]
    fn peek_only_returns_supported_versions() {
        assert_eq!(
            peek_version(br#"{"cniVersion":"0.4.0"}"#).as_deref(),
            Some("0.4.0")
        );
        assert_eq!(peek_version(br#"{"cniVersion":"0.2.0"}"#), None);
        assert_eq!(peek_version(b"junk"), None);
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("1.1.0", "1.1.0"));
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(!version_at_least("1.0.0", "1.1.0"));
        assert!(version_at_least("0.10.0", "0.4.0"));
    }
}
