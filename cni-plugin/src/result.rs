//! Converts the agent's CNI result to the `cniVersion` the runtime's configuration asked for.
//!
//! The agent answers ADD in the 1.1.0 format. The result shapes differ little across the versions
//! the plugin supports (spec 1.1, "Success"; libcni `pkg/types/040` and `pkg/types/100`):
//! - 1.0.0 and 1.1.0 share `interfaces`, `ips` (without `version`), `routes` and `dns`; 1.1.0 adds
//!   optional interface keys (`mtu`, `socketPath`, `pciID`) and route keys, which a 1.0.0 reader
//!   ignores, so they are kept.
//! - 0.3.0, 0.3.1 and 0.4.0 require `"version": "4"|"6"` on each `ips` entry and have no interface
//!   `mtu`, `socketPath` or `pciID` (libcni drops them when converting down, and so does this).
//!
//! The conversion works on JSON values, so keys it does not know (a newer agent's additions) pass
//! through unchanged.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::config::version_at_least;
use crate::error::CniError;

/// Interface keys that exist only since 1.1.0 (spec 1.1, "interfaces").
const IFACE_KEYS_SINCE_1_1: &[&str] = &["mtu", "socketPath", "pciID"];

/// Rewrites the agent's result `raw` (a CNI result JSON object of any supported version) as a
/// result of `target` version. Fails with 999 (`INTERNAL`) if `raw` is not a JSON object: the
/// agent broke the contract.
pub fn convert(raw: &[u8], target: &str) -> Result<Value, CniError> {
    let mut v: Value = serde_json::from_slice(raw).map_err(|e| {
        CniError::internal("ferrea-agent returned a result that is not valid JSON")
            .with_details(e.to_string())
    })?;
    let Value::Object(obj) = &mut v else {
        return Err(CniError::internal(
            "ferrea-agent returned a result that is not a JSON object",
        ));
    };
    obj.insert("cniVersion".into(), json!(target));
    let pre_1_0 = !version_at_least(target, "1.0.0");
    if let Some(Value::Array(ips)) = obj.get_mut("ips") {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            if pre_1_0 {
                let family = ip
                    .get("address")
                    .and_then(Value::as_str)
                    .map(address_family);
                if let Some(family) = family {
                    ip.insert("version".into(), json!(family));
                }
            } else {
                // 1.0.0 removed the key; a result from an older agent may still carry it.
                ip.remove("version");
            }
        }
    }
    if pre_1_0 && let Some(Value::Array(ifaces)) = obj.get_mut("interfaces") {
        for iface in ifaces.iter_mut().filter_map(Value::as_object_mut) {
            for key in IFACE_KEYS_SINCE_1_1 {
                iface.remove(*key);
            }
        }
    }
    Ok(v)
}

/// `"4"` or `"6"` for an `ips[].address` in CIDR notation (`10.0.0.5/24`, `fd00::5/64`).
fn address_family(cidr: &str) -> &'static str {
    let addr = cidr.split('/').next().unwrap_or(cidr);
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => "6",
        Ok(IpAddr::V4(_)) => "4",
        // Unparseable: only IPv6 text contains a colon.
        Err(_) if addr.contains(':') => "6",
        Err(_) => "4",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the agent sends: a dual-stack 1.1.0 result with a 1.1-only interface key.
    fn agent_result() -> Vec<u8> {
        serde_json::to_vec(&json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "fer1234", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/run/netns/p1", "mtu": 1450},
            ],
            "ips": [
                {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
                {"address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1", "interface": 1},
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0", "gw": "fd00:10:244:1::1"}],
            "dns": {},
        }))
        .unwrap()
    }

    #[test]
    fn to_1_1_0_is_unchanged() {
        let want: Value = serde_json::from_slice(&agent_result()).unwrap();
        assert_eq!(convert(&agent_result(), "1.1.0").unwrap(), want);
    }

    #[test]
    fn to_1_0_0_only_changes_the_version() {
        let mut want: Value = serde_json::from_slice(&agent_result()).unwrap();
        want["cniVersion"] = json!("1.0.0");
        assert_eq!(convert(&agent_result(), "1.0.0").unwrap(), want);
    }

    #[test]
    fn to_0_x_adds_ip_versions_and_drops_1_1_keys() {
        for target in ["0.4.0", "0.3.1", "0.3.0"] {
            let got = convert(&agent_result(), target).unwrap();
            assert_eq!(
                got,
                json!({
                    "cniVersion": target,
                    "interfaces": [
                        {"name": "fer1234", "mac": "aa:bb:cc:dd:ee:01"},
                        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/run/netns/p1"},
                    ],
                    "ips": [
                        {"version": "4", "address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
                        {"version": "6", "address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1", "interface": 1},
                    ],
                    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0", "gw": "fd00:10:244:1::1"}],
                    "dns": {},
                }),
                "{target}"
            );
        }
    }

    #[test]
    fn a_0_x_result_loses_ip_versions_going_up() {
        let old = br#"{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.0.0.2/24"}]}"#;
        assert_eq!(
            convert(old, "1.1.0").unwrap(),
            json!({"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.2/24"}]})
        );
    }

    #[test]
    fn unknown_keys_pass_through() {
        let r = br#"{"cniVersion":"1.1.0","ips":[],"future":{"x":1}}"#;
        assert_eq!(convert(r, "0.3.1").unwrap()["future"], json!({"x": 1}));
    }

    #[test]
    fn garbage_from_the_agent_is_internal() {
        assert_eq!(convert(b"nope", "1.1.0").unwrap_err().code, 999);
        assert_eq!(convert(b"[]", "1.1.0").unwrap_err().code, 999);
        assert_eq!(convert(b"", "1.1.0").unwrap_err().code, 999);
    }

    #[test]
    fn families() {
        assert_eq!(address_family("10.1.2.3/32"), "4");
        assert_eq!(address_family("::1/128"), "6");
        assert_eq!(address_family("fe80::zz/64"), "6");
    }
}
