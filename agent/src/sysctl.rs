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

fn path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
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

/// Sets a sysctl if it differs; returns the previous value when it changed something.
pub fn ensure(key: &str, value: &str) -> Result<Option<String>, SysctlError> {
    let cur = get(key)?;
    if cur == value {
        return Ok(None);
    }
    std::fs::write(path(key), value).map_err(|source| SysctlError {
        key: key.to_owned(),
        source,
    })?;
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
    }
}
