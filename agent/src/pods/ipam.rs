//! Node-local IPAM: addresses for pods from this node's pod CIDR.
//!
//! The gateway is the first host address; the network and broadcast addresses are never handed
//! out. Allocation is round-robin from the last address handed out, so an address that was just
//! released is not reused at once (late packets for a deleted pod do not reach a new one). The
//! allocations themselves live in the [`crate::pods::store::Store`] (the record of each attachment
//! carries its IP); this type is the in-memory index, rebuilt from the store at start.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// IPAM errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    /// Every address of the pod CIDR is in use.
    #[error("no free address left in pod CIDR {cidr}")]
    Exhausted {
        /// The pod CIDR.
        cidr: Ipv4Network,
    },
    /// A requested address is outside the pod CIDR.
    #[error("{ip} is outside this node's pod CIDR {cidr}")]
    OutsideCidr {
        /// The requested address.
        ip: Ipv4Addr,
        /// The pod CIDR.
        cidr: Ipv4Network,
    },
    /// A requested address is one no pod may have.
    #[error("{ip} is the {what} of pod CIDR {cidr}")]
    Reserved {
        /// The requested address.
        ip: Ipv4Addr,
        /// "network address", "gateway" or "broadcast address".
        what: &'static str,
        /// The pod CIDR.
        cidr: Ipv4Network,
    },
    /// A requested address belongs to another attachment.
    #[error("{ip} is already used by {owner}")]
    InUse {
        /// The requested address.
        ip: Ipv4Addr,
        /// The owner's key (`container/ifname`).
        owner: String,
    },
    /// The pod CIDR is too small to hold a gateway and a pod.
    #[error("pod CIDR {cidr} is too small (needs at least a /30)")]
    TooSmall {
        /// The pod CIDR.
        cidr: Ipv4Network,
    },
}

pub use crate::net::gateway_of;

/// The in-memory allocation index of one pod CIDR.
#[derive(Debug)]
pub struct Ipam {
    cidr: Ipv4Network,
    /// Allocated address -> owner key (`container/ifname`).
    used: HashMap<Ipv4Addr, String>,
    /// Index (0 = gateway + 1) of the last address handed out.
    last: u32,
}

impl Ipam {
    /// An empty index for `cidr`.
    pub fn new(cidr: Ipv4Network) -> Result<Self, IpamError> {
        if cidr.prefix() > 30 {
            return Err(IpamError::TooSmall { cidr });
        }
        // Start "just before" index 0 so the first address handed out is gateway + 1.
        let last = cidr.size() - 4;
        Ok(Self {
            cidr,
            used: HashMap::new(),
            last,
        })
    }

    /// The gateway: the first host address of the CIDR (see [`gateway_of`]).
    pub fn gateway(&self) -> Ipv4Addr {
        gateway_of(self.cidr)
    }

    fn nth(&self, off: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + off)
    }

    /// Number of addresses pods can get.
    pub fn capacity(&self) -> u32 {
        // Minus network, gateway and broadcast.
        self.cidr.size() - 3
    }

    /// Records an existing allocation (from the store). Returns false if `ip` is outside the
    /// CIDR, is the gateway, or is already owned by someone else.
    pub fn restore(&mut self, ip: Ipv4Addr, owner: &str) -> bool {
        if !self.is_allocatable(ip) {
            return false;
        }
        match self.used.get(&ip) {
            Some(o) if o != owner => false,
            _ => {
                self.used.insert(ip, owner.to_owned());
                true
            }
        }
    }

    fn is_allocatable(&self, ip: Ipv4Addr) -> bool {
        let off = u32::from(ip).wrapping_sub(u32::from(self.cidr.network()));
        self.cidr.contains(ip) && off >= 2 && off < self.cidr.size() - 1
    }

    /// The address owned by `owner`, if any.
    pub fn owned_by(&self, owner: &str) -> Option<Ipv4Addr> {
        self.used
            .iter()
            .find(|(_, o)| o.as_str() == owner)
            .map(|(ip, _)| *ip)
    }

    /// Allocates the next free address for `owner`.
    pub fn allocate(&mut self, owner: &str) -> Result<Ipv4Addr, IpamError> {
        // Host offsets 2 ..= size-2 (1 is the gateway, size-1 the broadcast address).
        let span = self.capacity();
        for i in 1..=span {
            let idx = (self.last + i) % span;
            let ip = self.nth(idx + 2);
            if let std::collections::hash_map::Entry::Vacant(e) = self.used.entry(ip) {
                e.insert(owner.to_owned());
                self.last = idx;
                return Ok(ip);
            }
        }
        Err(IpamError::Exhausted { cidr: self.cidr })
    }

    /// Allocates exactly `ip` for `owner` (a static address the runtime asked for). Fails when
    /// it is outside the CIDR, its network, gateway or broadcast address, or owned by someone
    /// else; an address `owner` already has is fine. The round-robin position is not moved.
    pub fn allocate_exact(&mut self, ip: Ipv4Addr, owner: &str) -> Result<(), IpamError> {
        let cidr = self.cidr;
        if !cidr.contains(ip) {
            return Err(IpamError::OutsideCidr { ip, cidr });
        }
        let what = if ip == cidr.network() {
            Some("network address")
        } else if ip == self.gateway() {
            Some("gateway")
        } else if ip == cidr.broadcast() {
            Some("broadcast address")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(IpamError::Reserved { ip, what, cidr });
        }
        match self.used.get(&ip) {
            Some(o) if o != owner => Err(IpamError::InUse {
                ip,
                owner: o.clone(),
            }),
            _ => {
                self.used.insert(ip, owner.to_owned());
                Ok(())
            }
        }
    }

    /// Releases `ip`; releasing a free address is a no-op.
    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }

    /// Number of allocated addresses.
    pub fn allocated(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(c: &str) -> Ipam {
        Ipam::new(c.parse().unwrap()).unwrap()
    }

    #[test]
    fn gateway_is_first_address_and_never_allocated() {
        let mut i = ipam("10.244.1.0/24");
        assert_eq!(i.gateway(), Ipv4Addr::new(10, 244, 1, 1));
        let mut seen = std::collections::HashSet::new();
        for n in 0..i.capacity() {
            let ip = i.allocate(&format!("c{n}")).unwrap();
            assert_ne!(ip, i.gateway());
            assert_ne!(ip, Ipv4Addr::new(10, 244, 1, 0));
            assert_ne!(ip, Ipv4Addr::new(10, 244, 1, 255));
            assert!(seen.insert(ip), "{ip} handed out twice");
        }
        assert_eq!(seen.len(), 253);
        assert!(matches!(i.allocate("x"), Err(IpamError::Exhausted { .. })));
    }

    #[test]
    fn released_address_is_not_reused_immediately() {
        let mut i = ipam("10.0.0.0/29");
        let a = i.allocate("a").unwrap();
        i.release(a);
        let b = i.allocate("b").unwrap();
        assert_ne!(a, b);
        // Wraps around once the range is used up.
        for n in 0..3 {
            i.allocate(&format!("x{n}")).unwrap();
        }
        assert_eq!(i.allocated(), 4);
        assert_eq!(i.allocate("again").unwrap(), a);
    }

    #[test]
    fn exact_addresses_are_checked_and_kept_out_of_the_pool() {
        let mut i = ipam("10.0.0.0/29");
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            i.allocate_exact(ip("10.0.1.3"), "a")
                .unwrap_err()
                .to_string(),
            "10.0.1.3 is outside this node's pod CIDR 10.0.0.0/29"
        );
        for (a, what) in [
            ("10.0.0.0", "network address"),
            ("10.0.0.1", "gateway"),
            ("10.0.0.7", "broadcast address"),
        ] {
            assert_eq!(
                i.allocate_exact(ip(a), "a").unwrap_err(),
                IpamError::Reserved {
                    ip: ip(a),
                    what,
                    cidr: "10.0.0.0/29".parse().unwrap()
                }
            );
        }
        i.allocate_exact(ip("10.0.0.4"), "a").unwrap();
        i.allocate_exact(ip("10.0.0.4"), "a").unwrap();
        assert_eq!(
            i.allocate_exact(ip("10.0.0.4"), "b")
                .unwrap_err()
                .to_string(),
            "10.0.0.4 is already used by a"
        );
        // The pool hands out everything else, never the static address.
        let got: Vec<Ipv4Addr> = (0..4)
            .map(|n| i.allocate(&format!("p{n}")).unwrap())
            .collect();
        assert!(!got.contains(&ip("10.0.0.4")), "{got:?}");
        assert!(i.allocate("x").is_err());
    }

    #[test]
    fn restore_rejects_foreign_and_conflicting_addresses() {
        let mut i = ipam("10.0.0.0/24");
        assert!(i.restore(Ipv4Addr::new(10, 0, 0, 9), "a"));
        assert!(i.restore(Ipv4Addr::new(10, 0, 0, 9), "a"));
        assert!(!i.restore(Ipv4Addr::new(10, 0, 0, 9), "b"));
        assert!(!i.restore(Ipv4Addr::new(10, 0, 1, 9), "c"));
        assert!(!i.restore(Ipv4Addr::new(10, 0, 0, 1), "gw"));
        assert_eq!(i.owned_by("a"), Some(Ipv4Addr::new(10, 0, 0, 9)));
        assert!(matches!(
            Ipam::new("10.0.0.0/31".parse().unwrap()),
            Err(IpamError::TooSmall { .. })
        ));
    }
}
