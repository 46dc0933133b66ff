//! A recording fake of [`Conntrack`].

use std::net::Ipv4Addr;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::kernel::conntrack::{Conntrack, ConntrackError};

/// A conntrack table of UDP flows (original destination address and port) that records every
/// delete; fails the next `fail` calls.
#[derive(Default)]
pub struct FakeConntrack {
    /// The UDP flows present, by original destination (several flows may share one).
    pub udp: Mutex<Vec<(Ipv4Addr, u16)>>,
    /// Every call that succeeded, in order: the destination and the ports, as given.
    pub calls: Mutex<Vec<(Ipv4Addr, Vec<u16>)>>,
    /// How many of the next calls fail.
    pub fail: Mutex<u32>,
}

impl FakeConntrack {
    /// Adds a UDP flow to `dst:port`.
    pub fn add_udp(&self, dst: Ipv4Addr, port: u16) {
        self.udp.lock().unwrap().push((dst, port));
    }

    /// The calls made so far.
    pub fn calls(&self) -> Vec<(Ipv4Addr, Vec<u16>)> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Conntrack for FakeConntrack {
    async fn delete_udp_to(&self, dst: Ipv4Addr, ports: &[u16]) -> Result<usize, ConntrackError> {
        {
            let mut f = self.fail.lock().unwrap();
            if *f > 0 {
                *f -= 1;
                return Err(ConntrackError::DeleteUdp {
                    dst,
                    ports: ports.len(),
                    source: std::io::Error::other("fake: failed on purpose"),
                });
            }
        }
        if ports.is_empty() {
            return Ok(0);
        }
        self.calls.lock().unwrap().push((dst, ports.to_vec()));
        let mut udp = self.udp.lock().unwrap();
        let before = udp.len();
        udp.retain(|(d, p)| !(*d == dst && ports.contains(p)));
        Ok(before - udp.len())
    }
}
