//! A recording fake of [`Shaping`].

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::kernel::shaping::{ShapeError, ShapedClass, Shaping};

use super::events::EventLog;

/// Keeps each device's classes. Logs `shape <dev> [<id>@<rate>, ...]` per sync. A device in
/// `foreign` fails as one with another's root qdisc.
#[derive(Default)]
pub struct FakeShaping {
    /// Each device's classes (a device with none is absent).
    pub devices: Mutex<BTreeMap<String, Vec<ShapedClass>>>,
    /// Devices whose root qdisc is someone else's.
    pub foreign: Mutex<Vec<String>>,
    /// The shared log.
    pub log: EventLog,
}

impl FakeShaping {
    /// No device shaped, logging into `log`.
    pub fn new(log: EventLog) -> Self {
        Self {
            log,
            ..Self::default()
        }
    }
}

#[async_trait]
impl Shaping for FakeShaping {
    async fn sync(&self, dev: &str, classes: &[ShapedClass]) -> Result<(), ShapeError> {
        let list: Vec<String> = classes
            .iter()
            .map(|c| format!("{}@{}", c.id, c.rate_bps))
            .collect();
        self.log.push(format!("shape {dev} [{}]", list.join(", ")));
        if !classes.is_empty() && self.foreign.lock().unwrap().iter().any(|d| d == dev) {
            return Err(ShapeError::Foreign {
                dev: dev.to_owned(),
                kind: "tbf".into(),
                handle: "1:".into(),
            });
        }
        let mut d = self.devices.lock().unwrap();
        if classes.is_empty() {
            d.remove(dev);
        } else {
            d.insert(dev.to_owned(), classes.to_vec());
        }
        Ok(())
    }
}
