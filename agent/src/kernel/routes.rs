//! Routes to other nodes' pod CIDRs, kept in sync with the list of remote nodes.
//!
//! Every route ferrea installs for a remote node carries its own routing protocol number
//! ([`RTPROT_FERREA`]), so a restarted agent finds exactly its own routes in the main table,
//! removes those of nodes that left, and never touches a route somebody else made.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// The `rtm_protocol` of ferrea's node routes (unassigned in iproute2's `rt_protos`).
pub const RTPROT_FERREA: u8 = 70;

/// Errors of [`sync`], each naming the route.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Reading the main table failed.
    #[error("listing the routes: {source}")]
    List {
        /// What netlink said.
        #[source]
        source: rtnetlink::Error,
    },
    /// Removing a stale ferrea route failed.
    #[error("removing route {dst}: {source}")]
    Remove {
        /// Its destination (empty if the kernel gave none).
        dst: String,
        /// What netlink said.
        #[source]
        source: rtnetlink::Error,
    },
    /// Adding (or replacing) a wanted route failed.
    #[error("adding route {dst}: {source}")]
    Add {
        /// Its destination.
        dst: Ipv4Network,
        /// What netlink said.
        #[source]
        source: rtnetlink::Error,
    },
}

/// One route to a remote pod CIDR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRoute {
    /// The remote pod CIDR.
    pub dst: Ipv4Network,
    /// Next hop, if any (`onlink` is set when it is not on a connected subnet of `dev`).
    pub via: Option<Ipv4Addr>,
    /// Whether the next hop is declared on-link.
    pub onlink: bool,
    /// Output interface index.
    pub dev: u32,
    /// Preferred source address.
    pub src: Option<Ipv4Addr>,
}

impl NodeRoute {
    fn message(&self) -> RouteMessage {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(self.dst.network(), self.dst.prefix())
            .output_interface(self.dev)
            .protocol(RouteProtocol::Other(RTPROT_FERREA));
        b = match self.via {
            Some(gw) => b.gateway(gw).scope(RouteScope::Universe),
            None => b.scope(RouteScope::Link),
        };
        if let Some(src) = self.src {
            b = b.pref_source(src);
        }
        let mut m = b.build();
        if self.onlink {
            m.header.flags |= RouteFlags::Onlink;
        }
        m
    }
}

/// The table a route is in: its `RTA_TABLE` attribute (tables above 255 have only that), or
/// the header's byte.
pub fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn dst_of(m: &RouteMessage) -> Option<Ipv4Network> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
            Ipv4Network::new(*ip, m.header.destination_prefix_length).ok()
        }
        _ => None,
    })
}

/// Makes ferrea's node routes in the main table exactly `want`. Returns how many routes were
/// removed.
pub async fn sync(h: &Handle, want: &[NodeRoute]) -> Result<usize, RouteError> {
    let mut removed = 0;
    let mut stream = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut stale = Vec::new();
    while let Some(m) = stream
        .try_next()
        .await
        .map_err(|source| RouteError::List { source })?
    {
        if m.header.protocol != RouteProtocol::Other(RTPROT_FERREA) {
            continue;
        }
        if !dst_of(&m).is_some_and(|d| want.iter().any(|w| w.dst == d)) {
            stale.push(m);
        }
    }
    for m in stale {
        let dst = dst_of(&m).map(|d| d.to_string()).unwrap_or_default();
        match h.route().del(m).execute().await {
            Ok(()) => removed += 1,
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
            Err(source) => return Err(RouteError::Remove { dst, source }),
        }
    }
    for r in want {
        h.route()
            .add(r.message())
            .replace()
            .execute()
            .await
            .map_err(|source| RouteError::Add { dst: r.dst, source })?;
    }
    Ok(removed)
}
