//! A recording fake of [`Links`]: links by name with their ifindex, alias and kind.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::kernel::links::{Link, LinkKind, Links, NewLink, NewLinkKind};
use crate::kernel::netlink::NetlinkError;

use super::events::EventLog;

/// Links by name. Logs `link add <name> <kind>`, `link alias <name>`, `link del <name>`.
/// Without [`FakeLinks::no_8021q`] / [`FakeLinks::no_dummy`] the "kernel" makes every kind.
#[derive(Default)]
pub struct FakeLinks {
    /// The links, by name.
    pub links: Mutex<BTreeMap<String, Link>>,
    /// The shared log.
    pub log: EventLog,
    /// VLAN devices fail with `EOPNOTSUPP`.
    pub no_8021q: Mutex<bool>,
    /// Dummy devices fail with `EOPNOTSUPP`.
    pub no_dummy: Mutex<bool>,
    /// How many of the next mutating calls fail with `EIO`.
    pub fail: Mutex<u32>,
    next: Mutex<u32>,
}

impl FakeLinks {
    /// No links yet, logging into `log`.
    pub fn new(log: EventLog) -> Self {
        Self {
            log,
            ..Self::default()
        }
    }

    /// Adds a link as something else (or an earlier process) made it; returns its index.
    pub fn seed(&self, name: &str, kind: LinkKind, alias: Option<&str>) -> u32 {
        let index = self.next_index();
        self.links.lock().unwrap().insert(
            name.to_owned(),
            Link {
                index,
                name: name.to_owned(),
                alias: alias.map(str::to_owned),
                kind,
                mtu: Some(1500),
                mac: Some([2, 0, 0, 0, (index >> 8) as u8, index as u8]),
            },
        );
        index
    }

    /// The index of link `name`.
    pub fn index(&self, name: &str) -> Option<u32> {
        self.links.lock().unwrap().get(name).map(|l| l.index)
    }

    fn next_index(&self) -> u32 {
        let mut n = self.next.lock().unwrap();
        *n += 1;
        *n + 1 // 1 is `lo`
    }

    fn failing(&self, op: &'static str, object: &str) -> Result<(), NetlinkError> {
        let mut f = self.fail.lock().unwrap();
        if *f > 0 {
            *f -= 1;
            return Err(NetlinkError::errno(op, object, libc::EIO));
        }
        Ok(())
    }
}

#[async_trait]
impl Links for FakeLinks {
    async fn get(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        Ok(self.links.lock().unwrap().get(name).cloned())
    }

    async fn list(&self) -> Result<Vec<Link>, NetlinkError> {
        Ok(self.links.lock().unwrap().values().cloned().collect())
    }

    async fn add(&self, link: &NewLink) -> Result<(), NetlinkError> {
        self.failing("creating", &link.name)?;
        let (kind, what) = match link.kind {
            NewLinkKind::Vlan { vid, .. } => {
                if *self.no_8021q.lock().unwrap() {
                    return Err(NetlinkError::errno(
                        "creating VLAN device",
                        &link.name,
                        libc::EOPNOTSUPP,
                    ));
                }
                (LinkKind::Vlan, format!("vlan {vid}"))
            }
            NewLinkKind::MacVlanBridge { .. } => (LinkKind::MacVlan, "macvlan".to_owned()),
            NewLinkKind::Dummy => {
                if *self.no_dummy.lock().unwrap() {
                    return Err(NetlinkError::errno(
                        "creating dummy",
                        &link.name,
                        libc::EOPNOTSUPP,
                    ));
                }
                (LinkKind::Dummy, "dummy".to_owned())
            }
        };
        if self.links.lock().unwrap().contains_key(&link.name) {
            return Err(NetlinkError::errno("creating", &link.name, libc::EEXIST));
        }
        self.seed(&link.name, kind, None);
        if let Some(m) = link.mtu {
            self.links.lock().unwrap().get_mut(&link.name).unwrap().mtu = Some(m);
        }
        self.log.push(format!("link add {} {what}", link.name));
        Ok(())
    }

    async fn set_alias(&self, index: u32, name: &str, alias: &str) -> Result<(), NetlinkError> {
        self.failing("setting the alias of", name)?;
        let mut links = self.links.lock().unwrap();
        let l = links
            .values_mut()
            .find(|l| l.index == index)
            .ok_or_else(|| NetlinkError::errno("setting the alias of", name, libc::ENODEV))?;
        l.alias = Some(alias.to_owned());
        self.log.push(format!("link alias {name}"));
        Ok(())
    }

    async fn delete(&self, index: u32, name: &str) -> Result<bool, NetlinkError> {
        self.failing("removing", name)?;
        let mut links = self.links.lock().unwrap();
        let Some(n) = links
            .values()
            .find(|l| l.index == index)
            .map(|l| l.name.clone())
        else {
            return Ok(false);
        };
        links.remove(&n);
        self.log.push(format!("link del {n}"));
        Ok(true)
    }
}
