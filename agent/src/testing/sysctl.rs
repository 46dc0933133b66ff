//! A recording fake of [`Sysctl`]: values by key.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::kernel::sysctl::{Sysctl, SysctlError};

use super::events::EventLog;

/// Sysctl values by dotted key. A key never written reads as [`FakeSysctl::fallback`] (the
/// kernel's default for a new interface's `rp_filter`), or fails with `ENOENT` without one;
/// `arp_ignore`, `arp_announce` and `promote_secondaries` read as the kernel's `0`. Logs
/// `sysctl <key>=<value>` on each write.
#[derive(Default)]
pub struct FakeSysctl {
    /// The values.
    pub values: Mutex<BTreeMap<String, String>>,
    /// What a key never written reads as.
    pub fallback: Mutex<Option<String>>,
    /// The shared log.
    pub log: EventLog,
}

impl FakeSysctl {
    /// No values, unknown keys reading as `fallback`, logging into `log`.
    pub fn new(log: EventLog, fallback: Option<&str>) -> Self {
        Self {
            log,
            fallback: Mutex::new(fallback.map(str::to_owned)),
            ..Self::default()
        }
    }

    /// Changes a value as an outsider would (not logged).
    pub fn outsider_sets(&self, key: &str, value: &str) {
        self.values
            .lock()
            .unwrap()
            .insert(key.to_owned(), value.to_owned());
    }

    /// The value of `key`, if written.
    pub fn value(&self, key: &str) -> Option<String> {
        self.values.lock().unwrap().get(key).cloned()
    }
}

impl Sysctl for FakeSysctl {
    fn get(&self, key: &str) -> Result<String, SysctlError> {
        self.values
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .or_else(|| {
                [".arp_ignore", ".arp_announce", ".promote_secondaries"]
                    .iter()
                    .any(|k| key.ends_with(k))
                    .then(|| "0".to_owned())
            })
            .or_else(|| self.fallback.lock().unwrap().clone())
            .ok_or_else(|| SysctlError {
                key: key.to_owned(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            })
    }

    fn set(&self, key: &str, value: &str) -> Result<(), SysctlError> {
        self.values
            .lock()
            .unwrap()
            .insert(key.to_owned(), value.to_owned());
        self.log.push(format!("sysctl {key}={value}"));
        Ok(())
    }
}
