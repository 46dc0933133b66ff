//! IPv4 addresses on links. [`Addresses`] is the side effect; [`NetlinkAddresses`] its Linux
//! implementation over rtnetlink.

use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use rtnetlink::Handle;

use super::netlink::{NetlinkError, is_errno};

/// The IPv4 addresses of the caller's network namespace, per link (by ifindex).
///
/// Contract: every mutating call is one netlink request per address, all-or-nothing in the
/// kernel; calls are safe concurrently (RTNL serialises them). [`Addresses::add`] and
/// [`Addresses::delete`] are idempotent.
#[async_trait]
pub trait Addresses: Send + Sync {
    /// The IPv4 addresses on link `index`, with their prefix lengths (empty for a link that
    /// has none).
    async fn list(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError>;

    /// Adds `ip/prefix` to link `index`. Already there: `Ok`. A missing link fails (`ENODEV`).
    async fn add(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError>;

    /// Removes `ip/prefix` from link `index`. Not there: `Ok`.
    async fn delete(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError>;
}

/// [`Addresses`] over an rtnetlink connection.
#[derive(Clone)]
pub struct NetlinkAddresses {
    handle: Handle,
}

impl NetlinkAddresses {
    /// Addresses through `handle`.
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }
}

#[async_trait]
impl Addresses for NetlinkAddresses {
    async fn list(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let mut out = Vec::new();
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(m) = s.try_next().await.map_err(|e| {
            NetlinkError::from_rtnetlink("listing addresses of", format!("ifindex {index}"), e)
        })? {
            if m.header.index != index {
                continue;
            }
            for a in &m.attributes {
                if let AddressAttribute::Local(IpAddr::V4(ip)) = a {
                    out.push((*ip, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    async fn add(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(NetlinkError::from_rtnetlink(
                "adding",
                format!("{ip}/{prefix}"),
                e,
            )),
        }
    }

    async fn delete(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(ip))
            .set_prefix_length_filter(prefix)
            .execute();
        while let Some(m) = s.try_next().await.map_err(|e| {
            NetlinkError::from_rtnetlink("listing addresses of", format!("ifindex {index}"), e)
        })? {
            match self.handle.address().del(m).execute().await {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::EADDRNOTAVAIL) => {}
                Err(e) => {
                    return Err(NetlinkError::from_rtnetlink(
                        "removing",
                        format!("{ip}/{prefix}"),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }
}
