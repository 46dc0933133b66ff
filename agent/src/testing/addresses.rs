//! A recording fake of [`Addresses`]: the addresses of each link (by ifindex).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::kernel::addresses::Addresses;
use crate::kernel::netlink::NetlinkError;

use super::events::EventLog;

/// Addresses per ifindex. Logs `addr add <ip>/<prefix> #<index>` and `addr del ...` when the
/// state changes (adding one already there is `Ok` and logs nothing, as the kernel's `EEXIST`
/// changes nothing).
#[derive(Default)]
pub struct FakeAddresses {
    /// The addresses, by ifindex.
    pub addrs: Mutex<BTreeMap<u32, BTreeSet<(Ipv4Addr, u8)>>>,
    /// The shared log.
    pub log: EventLog,
    /// How many of the next mutating calls fail with `EIO`.
    pub fail: Mutex<u32>,
}

impl FakeAddresses {
    /// No addresses yet, logging into `log`.
    pub fn new(log: EventLog) -> Self {
        Self {
            log,
            ..Self::default()
        }
    }

    /// Puts `ip/prefix` on link `index` without logging (what an earlier process left).
    pub fn seed(&self, index: u32, ip: Ipv4Addr, prefix: u8) {
        self.addrs
            .lock()
            .unwrap()
            .entry(index)
            .or_default()
            .insert((ip, prefix));
    }

    /// The addresses on link `index`.
    pub fn on(&self, index: u32) -> BTreeSet<(Ipv4Addr, u8)> {
        self.addrs
            .lock()
            .unwrap()
            .get(&index)
            .cloned()
            .unwrap_or_default()
    }

    fn failing(&self, op: &'static str, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        let mut f = self.fail.lock().unwrap();
        if *f > 0 {
            *f -= 1;
            return Err(NetlinkError::errno(op, format!("{ip}/{prefix}"), libc::EIO));
        }
        Ok(())
    }
}

#[async_trait]
impl Addresses for FakeAddresses {
    async fn list(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        Ok(self.on(index).into_iter().collect())
    }

    async fn add(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        self.failing("adding", ip, prefix)?;
        if self
            .addrs
            .lock()
            .unwrap()
            .entry(index)
            .or_default()
            .insert((ip, prefix))
        {
            self.log.push(format!("addr add {ip}/{prefix} #{index}"));
        }
        Ok(())
    }

    async fn delete(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        self.failing("removing", ip, prefix)?;
        let removed = self
            .addrs
            .lock()
            .unwrap()
            .get_mut(&index)
            .is_some_and(|s| s.remove(&(ip, prefix)));
        if removed {
            self.log.push(format!("addr del {ip}/{prefix} #{index}"));
        }
        Ok(())
    }
}
