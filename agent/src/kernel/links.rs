//! Network interfaces (links): find them, list them, create VLAN, macvlan and dummy devices,
//! name them with an alias, delete them. [`Links`] is the side effect; [`NetlinkLinks`] its
//! Linux implementation over rtnetlink.

use async_trait::async_trait;
use futures::TryStreamExt;
use netlink_packet_route::link::MacVlanMode;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkDummy, LinkMacVlan, LinkUnspec, LinkVlan};

use super::netlink::{NetlinkError, is_errno};

/// The kind of a link, as far as callers here care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// An 802.1Q VLAN device.
    Vlan,
    /// A macvlan.
    MacVlan,
    /// A dummy device.
    Dummy,
    /// Anything else (physical, veth, bridge, ...).
    Other,
}

/// One link as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// The ifindex.
    pub index: u32,
    /// The name.
    pub name: String,
    /// `IFLA_IFALIAS`, if set.
    pub alias: Option<String>,
    /// Its kind.
    pub kind: LinkKind,
    /// The MTU.
    pub mtu: Option<u32>,
    /// The MAC address, for Ethernet-like links.
    pub mac: Option<[u8; 6]>,
}

/// What [`Links::add`] creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NewLinkKind {
    /// An 802.1Q device on `parent` (an ifindex) with VLAN id `vid`.
    Vlan {
        /// The parent's ifindex.
        parent: u32,
        /// The VLAN id.
        vid: u16,
    },
    /// A macvlan in bridge mode on `parent` (an ifindex).
    MacVlanBridge {
        /// The parent's ifindex.
        parent: u32,
    },
    /// A dummy device.
    Dummy,
}

/// A link to create: always set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewLink {
    /// The name.
    pub name: String,
    /// What it is.
    pub kind: NewLinkKind,
    /// Its MTU, if not the kernel's default.
    pub mtu: Option<u32>,
}

/// The links of the caller's network namespace.
///
/// Contract: every call is one netlink request, so each is all-or-nothing in the kernel;
/// calls are safe concurrently (the kernel serialises them under RTNL), though nothing here
/// makes a sequence of calls atomic.
#[async_trait]
pub trait Links: Send + Sync {
    /// The link named `name`; `Ok(None)` when there is none.
    async fn get(&self, name: &str) -> Result<Option<Link>, NetlinkError>;

    /// Every link.
    async fn list(&self) -> Result<Vec<Link>, NetlinkError>;

    /// Creates `link`, up. Not idempotent: a link of that name already there fails with
    /// `EEXIST`; a kind the kernel lacks fails with `EOPNOTSUPP`
    /// ([`NetlinkError::is_not_supported`]).
    async fn add(&self, link: &NewLink) -> Result<(), NetlinkError>;

    /// Sets the alias (`IFLA_IFALIAS`) of link `index` (named `name` in errors). Idempotent; a
    /// missing link fails with `ENODEV`.
    async fn set_alias(&self, index: u32, name: &str, alias: &str) -> Result<(), NetlinkError>;

    /// Deletes link `index` (named `name` in errors). Idempotent: returns whether a link was
    /// deleted (`false` when it was already gone).
    async fn delete(&self, index: u32, name: &str) -> Result<bool, NetlinkError>;
}

/// [`Links`] over an rtnetlink connection, in the namespace the connection was opened in.
#[derive(Clone)]
pub struct NetlinkLinks {
    handle: Handle,
}

impl NetlinkLinks {
    /// Links through `handle`.
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        alias: None,
        kind: LinkKind::Other,
        mtu: None,
        mac: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::IfAlias(s) => l.alias = Some(s.clone()),
            LinkAttribute::Mtu(x) => l.mtu = Some(*x),
            LinkAttribute::Address(a) if a.len() == 6 => {
                l.mac = Some(<[u8; 6]>::try_from(a.as_slice()).expect("6 bytes"));
            }
            LinkAttribute::LinkInfo(i) => {
                for x in i {
                    if let NlLinkInfo::Kind(k) = x {
                        l.kind = match k {
                            InfoKind::Vlan => LinkKind::Vlan,
                            InfoKind::MacVlan => LinkKind::MacVlan,
                            InfoKind::Dummy => LinkKind::Dummy,
                            _ => LinkKind::Other,
                        };
                    }
                }
            }
            _ => {}
        }
    }
    l
}

#[async_trait]
impl Links for NetlinkLinks {
    async fn get(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m.as_ref().map(link_of)),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(NetlinkError::from_rtnetlink("looking up", name, e)),
        }
    }

    async fn list(&self) -> Result<Vec<Link>, NetlinkError> {
        let mut out = Vec::new();
        let mut s = self.handle.link().get().execute();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("listing", "links", e))?
        {
            out.push(link_of(&m));
        }
        Ok(out)
    }

    async fn add(&self, link: &NewLink) -> Result<(), NetlinkError> {
        let (msg, op) = match link.kind {
            NewLinkKind::Vlan { parent, vid } => {
                let mut b = LinkVlan::new(&link.name, parent, vid).up();
                if let Some(m) = link.mtu {
                    b = b.mtu(m);
                }
                (b.build(), "creating VLAN device")
            }
            NewLinkKind::MacVlanBridge { parent } => {
                let mut b = LinkMacVlan::new(&link.name, parent, MacVlanMode::Bridge).up();
                if let Some(m) = link.mtu {
                    b = b.mtu(m);
                }
                (b.build(), "creating macvlan")
            }
            NewLinkKind::Dummy => (LinkDummy::new(&link.name).up().build(), "creating dummy"),
        };
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(op, link.name.clone(), e))
    }

    async fn set_alias(&self, index: u32, name: &str, alias: &str) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .append_extra_attribute(LinkAttribute::IfAlias(alias.to_owned()))
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("setting the alias of", name, e))
    }

    async fn delete(&self, index: u32, name: &str) -> Result<bool, NetlinkError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
            Err(e) => Err(NetlinkError::from_rtnetlink("removing", name, e)),
        }
    }
}
