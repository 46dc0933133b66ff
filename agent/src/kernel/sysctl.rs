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

/// Reads and writes sysctls: the side effect of this module, as a trait so that its callers
/// can be tested against a fake.
///
/// Contract: [`Sysctl::set`] is one write, all-or-nothing, and idempotent (setting the value
/// already there changes nothing). Calls are safe concurrently, though two writers of one key
/// race (the last write wins). A key that does not exist (a missing interface's `conf` entry)
/// fails with `ENOENT`.
pub trait Sysctl: Send + Sync {
    /// The value of `key` (dotted, see [`conf_key`]), trimmed.
    fn get(&self, key: &str) -> Result<String, SysctlError>;
    /// Writes `value` to `key`.
    fn set(&self, key: &str, value: &str) -> Result<(), SysctlError>;
}

/// [`Sysctl`] under /proc/sys, in the caller's network namespace ([`get`] and [`set`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSysctl;

impl Sysctl for ProcSysctl {
    fn get(&self, key: &str) -> Result<String, SysctlError> {
        get(key)
    }
    fn set(&self, key: &str, value: &str) -> Result<(), SysctlError> {
        set(key, value)
    }
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
