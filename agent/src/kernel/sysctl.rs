//! Node sysctls the agent needs, written under /proc/sys.
//!
//! /proc/sys/net reflects the network namespace of the process that opens the file, so the
//! agent changes exactly the namespace it runs in (the node's), never another.

use std::path::PathBuf;

/// Errors reading or writing a sysctl.
#[derive(Debug, thiserror::Error)]
#[error("sysctl {key}: {source}")]
pub struct SysctlError {
    /// The key, dotted (`net.ipv4.ip_forward`).
    pub key: String,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// The file of a dotted key. As with sysctl(8), a `/` in the key stands for a dot inside one
/// component (an interface name such as `ferrea-ext.100`, see [`conf_key`]).
fn path(key: &str) -> PathBuf {
    let rel: String = key
        .chars()
        .map(|c| match c {
            '.' => '/',
            '/' => '.',
            c => c,
        })
        .collect();
    PathBuf::from("/proc/sys").join(rel)
}

/// The key of `net.ipv4.conf.<ifname>.<name>`, for any interface name (dots included).
pub fn conf_key(ifname: &str, name: &str) -> String {
    format!("net.ipv4.conf.{}.{name}", ifname.replace('.', "/"))
}

/// Reads a sysctl's value, trimmed.
pub fn get(key: &str) -> Result<String, SysctlError> {
    std::fs::read_to_string(path(key))
        .map(|s| s.trim().to_owned())
        .map_err(|source| SysctlError {
            key: key.to_owned(),
            source,
        })
}

/// Writes a sysctl.
pub fn set(key: &str, value: &str) -> Result<(), SysctlError> {
    std::fs::write(path(key), value).map_err(|source| SysctlError {
        key: key.to_owned(),
        source,
    })
}

/// Sets a sysctl if it differs; returns the previous value when it changed something.
pub fn ensure(key: &str, value: &str) -> Result<Option<String>, SysctlError> {
    let cur = get(key)?;
    if cur == value {
        return Ok(None);
    }
    set(key, value)?;
    Ok(Some(cur))
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_map_to_proc_paths() {
        assert_eq!(
            super::path("net.ipv4.ip_forward").to_str(),
            Some("/proc/sys/net/ipv4/ip_forward")
        );
        assert!(super::get("net.ipv4.ip_forward").is_ok());
        assert_eq!(
            super::path(&super::conf_key("ferrea-ext.100", "rp_filter")).to_str(),
            Some("/proc/sys/net/ipv4/conf/ferrea-ext.100/rp_filter")
        );
    }
}
