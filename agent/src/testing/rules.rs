//! A recording fake of [`Rules`]: rules with their protocol, duplicates kept as the kernel
//! keeps them.

use std::sync::Mutex;

use async_trait::async_trait;

use crate::kernel::netlink::NetlinkError;
use crate::kernel::rules::{Rule, Rules};

use super::events::EventLog;

/// Rules as (protocol, rule). Logs `rule add <rule>` and `rule del <rule>`.
#[derive(Default)]
pub struct FakeRules {
    /// The rules.
    pub rules: Mutex<Vec<(u8, Rule)>>,
    /// The shared log.
    pub log: EventLog,
    /// How many of the next mutating calls fail with `EIO`.
    pub fail: Mutex<u32>,
}

impl FakeRules {
    /// No rules yet, logging into `log`.
    pub fn new(log: EventLog) -> Self {
        Self {
            log,
            ..Self::default()
        }
    }

    /// Adds a rule without logging (what an earlier process or something else left).
    pub fn seed(&self, protocol: u8, rule: Rule) {
        self.rules.lock().unwrap().push((protocol, rule));
    }

    /// The rules of `protocol`.
    pub fn of(&self, protocol: u8) -> Vec<Rule> {
        self.rules
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| *p == protocol)
            .map(|(_, r)| *r)
            .collect()
    }

    fn failing(&self, op: &'static str, r: &Rule) -> Result<(), NetlinkError> {
        let mut f = self.fail.lock().unwrap();
        if *f > 0 {
            *f -= 1;
            return Err(NetlinkError::errno(op, r.to_string(), libc::EIO));
        }
        Ok(())
    }
}

#[async_trait]
impl Rules for FakeRules {
    async fn list(&self, protocol: u8) -> Result<Vec<Rule>, NetlinkError> {
        Ok(self.of(protocol))
    }

    async fn add(&self, protocol: u8, rule: &Rule) -> Result<(), NetlinkError> {
        self.failing("adding rule", rule)?;
        self.rules.lock().unwrap().push((protocol, *rule));
        self.log.push(format!("rule add {rule}"));
        Ok(())
    }

    async fn delete(&self, protocol: u8, rule: &Rule) -> Result<(), NetlinkError> {
        self.failing("removing rule", rule)?;
        let mut rs = self.rules.lock().unwrap();
        if let Some(i) = rs.iter().position(|(p, r)| *p == protocol && r == rule) {
            rs.remove(i);
            self.log.push(format!("rule del {rule}"));
        }
        Ok(())
    }
}
