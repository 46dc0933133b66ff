//! Routes in policy-routing tables, told apart by their `rtm_protocol`: a caller owns the
//! routes of its protocol number in every table and nothing else. [`TableRoutes`] is the side
//! effect; [`NetlinkTableRoutes`] its Linux implementation over rtnetlink. (The node's routes
//! to other nodes' pod CIDRs are [`super::routes`].)

use std::net::Ipv4Addr;

use async_trait::async_trait;
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::netlink::{NetlinkError, is_errno};

/// One IPv4 route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRoute {
    /// The table.
    pub table: u32,
    /// The destination; `None` for the default route.
    pub dst: Option<Ipv4Network>,
    /// The next hop, if any.
    pub gateway: Option<Ipv4Addr>,
    /// The output interface (ifindex), if any.
    pub oif: Option<u32>,
    /// The preferred source address, if any.
    pub pref_src: Option<Ipv4Addr>,
    /// Scope link (a directly connected subnet) rather than universe.
    pub scope_link: bool,
}

impl TableRoute {
    /// What identifies the route in its table: (table, destination, gateway, interface).
    /// Two routes with the same key are the same route for [`TableRoutes::replace`].
    pub fn key(&self) -> (u32, Option<Ipv4Network>, Option<Ipv4Addr>, Option<u32>) {
        (self.table, self.dst, self.gateway, self.oif)
    }
}

impl std::fmt::Display for TableRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.dst {
            Some(d) => write!(f, "{d}")?,
            None => f.write_str("default")?,
        }
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        if let Some(o) = self.oif {
            write!(f, " dev #{o}")?;
        }
        write!(f, " table {}", self.table)
    }
}

/// The IPv4 routes of one `rtm_protocol` in every table of the caller's network namespace.
///
/// Contract: each call on one route is one netlink request, all-or-nothing in the kernel;
/// calls are safe concurrently (RTNL serialises them). [`TableRoutes::replace`] and
/// [`TableRoutes::delete`] are idempotent.
#[async_trait]
pub trait TableRoutes: Send + Sync {
    /// Every IPv4 route with `protocol`, in any table.
    async fn list(&self, protocol: u8) -> Result<Vec<TableRoute>, NetlinkError>;

    /// Adds `route` with `protocol`, replacing a route with the same [`TableRoute::key`]
    /// (`NLM_F_REPLACE`). A missing interface fails (`ENODEV`).
    async fn replace(&self, protocol: u8, route: &TableRoute) -> Result<(), NetlinkError>;

    /// Deletes `route` (with `protocol`). Already gone: `Ok`.
    async fn delete(&self, protocol: u8, route: &TableRoute) -> Result<(), NetlinkError>;
}

/// [`TableRoutes`] over an rtnetlink connection.
#[derive(Clone)]
pub struct NetlinkTableRoutes {
    handle: Handle,
}

impl NetlinkTableRoutes {
    /// Routes through `handle`.
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }
}

fn message(protocol: u8, r: &TableRoute) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new();
    if let Some(d) = r.dst {
        b = b.destination_prefix(d.network(), d.prefix());
    }
    if let Some(o) = r.oif {
        b = b.output_interface(o);
    }
    if let Some(g) = r.gateway {
        b = b.gateway(g);
    }
    if let Some(s) = r.pref_src {
        b = b.pref_source(s);
    }
    if r.scope_link {
        b = b.scope(RouteScope::Link);
    }
    b.table_id(r.table)
        .protocol(RouteProtocol::Other(protocol))
        .build()
}

fn route_of(m: &RouteMessage) -> TableRoute {
    let mut r = TableRoute {
        table: u32::from(m.header.table),
        dst: None,
        gateway: None,
        oif: None,
        pref_src: None,
        scope_link: m.header.scope == RouteScope::Link,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => r.table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                r.dst = Ipv4Network::new(*d, m.header.destination_prefix_length).ok();
            }
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(*g),
            RouteAttribute::Oif(o) => r.oif = Some(*o),
            RouteAttribute::PrefSource(RouteAddress::Inet(s)) => r.pref_src = Some(*s),
            _ => {}
        }
    }
    r
}

#[async_trait]
impl TableRoutes for NetlinkTableRoutes {
    async fn list(&self, protocol: u8) -> Result<Vec<TableRoute>, NetlinkError> {
        let mut out = Vec::new();
        let mut s = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("listing", "routes", e))?
        {
            if m.header.protocol == RouteProtocol::Other(protocol) {
                out.push(route_of(&m));
            }
        }
        Ok(out)
    }

    async fn replace(&self, protocol: u8, route: &TableRoute) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(message(protocol, route))
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("adding route", route.to_string(), e))
    }

    async fn delete(&self, protocol: u8, route: &TableRoute) -> Result<(), NetlinkError> {
        match self
            .handle
            .route()
            .del(message(protocol, route))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ESRCH) => Ok(()),
            Err(e) => Err(NetlinkError::from_rtnetlink(
                "removing route",
                route.to_string(),
                e,
            )),
        }
    }
}
