//! A recording fake of [`Garp`].

use std::net::Ipv4Addr;
use std::sync::Mutex;

use crate::kernel::garp::{Garp, GarpError};

use super::events::EventLog;

/// Records every announcement as (ifindex, MAC, IP). Logs `garp <ip> #<index>`.
#[derive(Default)]
pub struct FakeGarp {
    /// The announcements, in order.
    pub sent: Mutex<Vec<(u32, [u8; 6], Ipv4Addr)>>,
    /// The shared log.
    pub log: EventLog,
}

impl FakeGarp {
    /// Nothing sent yet, logging into `log`.
    pub fn new(log: EventLog) -> Self {
        Self {
            log,
            ..Self::default()
        }
    }
}

impl Garp for FakeGarp {
    fn announce(&self, ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> Result<(), GarpError> {
        self.sent.lock().unwrap().push((ifindex, mac, ip));
        self.log.push(format!("garp {ip} #{ifindex}"));
        Ok(())
    }
}
