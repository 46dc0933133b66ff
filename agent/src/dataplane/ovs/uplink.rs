//! The node's IP configuration moved from the transport interface (the "uplink") to the
//! internal port of the physical bridge [`PHY_BRIDGE`], as the userspace datapath's native
//! tunnelling needs it.
//!
//! Why: with `datapath_type=netdev`, ovs-vswitchd encapsulates tunnel packets itself. It
//! looks the outer destination up in its own copy of the kernel's routing table, and the
//! route's device must be the local port of an OVS bridge that holds the physical interface
//! as a port; through any other device vswitchd drops the packet. So the uplink becomes a
//! port of that bridge, and the node's address, with the routes that used the uplink, moves
//! to the bridge's internal port, which gets the uplink's MAC so that neighbours' ARP caches
//! stay valid.
//!
//! This module does the netlink half: reading what the uplink carries, putting it on the
//! bridge port, and stripping it from the uplink. The backend does the OVSDB half and keeps
//! what was moved ([`UplinkConfig`]) in the bridge's `external_ids`, so a restarted agent, or
//! a restarted ovs-vswitchd (whose new tap device has no address), can put it back.
//!
//! Only the main routing table is moved; kernel-made routes (connected subnets, local
//! addresses) follow the addresses by themselves. The uplink then has no IPv4 address, and
//! its own IP stack is kept out of the traffic OVS carries over it: it answers no ARP,
//! forwards nothing and drops by reverse-path filtering what the node would otherwise
//! receive twice (OVS reads the uplink through a packet socket; the kernel still sees every
//! frame).

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use crate::kernel::routes::RTPROT_FERREA;

/// A netlink request of this module failed; names the operation and the object.
#[derive(Debug, thiserror::Error)]
#[error("{op} {object}: {source}")]
pub struct UplinkError {
    /// What was being done (`reading link`, `adding address`, ...).
    pub op: &'static str,
    /// What it was done to (an interface, an address, a route's destination).
    pub object: String,
    /// What netlink said.
    #[source]
    pub source: rtnetlink::Error,
}

fn err(op: &'static str, object: impl ToString) -> impl FnOnce(rtnetlink::Error) -> UplinkError {
    let object = object.to_string();
    move |source| UplinkError { op, object, source }
}

/// Name of the physical bridge and of its internal port, which carries the node's address
/// (at most 15 characters: it is also a kernel interface name).
pub const PHY_BRIDGE: &str = "ferrea-phy";

/// The main routing table.
const RT_TABLE_MAIN: u8 = 254;

/// One route of the main table that used the uplink, as it is re-created on the bridge port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRoute {
    /// Destination.
    pub dst: Ipv4Network,
    /// Next hop, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Metric (`priority`), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
    /// Preferred source, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<Ipv4Addr>,
    /// `rtm_protocol` (boot, static, dhcp, ...), kept as it was.
    pub protocol: u8,
    /// `rtm_scope`.
    pub scope: u8,
    /// The next hop was declared on-link.
    #[serde(default)]
    pub onlink: bool,
}

/// What was moved from the uplink to the bridge port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkConfig {
    /// The uplink interface (a port of the physical bridge).
    pub uplink: String,
    /// Its MAC, now also the bridge port's.
    pub mac: String,
    /// Its MTU, now also the bridge port's.
    pub mtu: u32,
    /// IPv4 addresses.
    pub addrs: Vec<Ipv4Network>,
    /// Routes of the main table.
    pub routes: Vec<SavedRoute>,
}

impl UplinkConfig {
    /// Adds what `other` has and `self` lacks (a move interrupted half-way leaves part of the
    /// configuration on each side).
    pub fn merge(&mut self, other: &UplinkConfig) {
        for a in &other.addrs {
            if !self.addrs.contains(a) {
                self.addrs.push(*a);
            }
        }
        for r in &other.routes {
            if !self
                .routes
                .iter()
                .any(|x| x.dst == r.dst && x.metric == r.metric)
            {
                self.routes.push(r.clone());
            }
        }
    }
}

/// Index, MAC and MTU of the link `name`, if it exists.
pub async fn link(h: &Handle, name: &str) -> Result<Option<(u32, Vec<u8>, u32)>, UplinkError> {
    let mut s = h.link().get().match_name(name.to_owned()).execute();
    match s.try_next().await {
        Ok(Some(m)) => {
            let mac = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(a) => Some(a.clone()),
                _ => None,
            });
            let mtu = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            });
            Ok(Some((
                m.header.index,
                mac.unwrap_or_default(),
                mtu.unwrap_or(1500),
            )))
        }
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(err("reading link", name)(e)),
    }
}

/// The IPv4 addresses on link `idx`.
pub async fn addrs(h: &Handle, idx: u32) -> Result<Vec<Ipv4Network>, UplinkError> {
    let mut out = Vec::new();
    let mut s = h.address().get().set_link_index_filter(idx).execute();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(err("listing the addresses of", format!("ifindex {idx}")))?
    {
        if m.header.index != idx {
            continue;
        }
        let ip = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = ip
            && let Ok(n) = Ipv4Network::new(ip, m.header.prefix_len)
        {
            out.push(n);
        }
    }
    Ok(out)
}

fn v4(a: &RouteAddress) -> Option<Ipv4Addr> {
    match a {
        RouteAddress::Inet(ip) => Some(*ip),
        _ => None,
    }
}

/// The main table's unicast routes through link `idx` that somebody configured (not the
/// kernel's own, not ferrea's remote-node routes).
pub async fn routes(h: &Handle, idx: u32) -> Result<Vec<SavedRoute>, UplinkError> {
    let mut out = Vec::new();
    let mut s = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(err("listing the routes through", format!("ifindex {idx}")))?
    {
        let table = crate::kernel::routes::table_of(&m);
        let oif = m.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if table != u32::from(RT_TABLE_MAIN)
            || oif != Some(idx)
            || m.header.kind != RouteType::Unicast
            || m.header.protocol == RouteProtocol::Kernel
            || m.header.protocol == RouteProtocol::Other(RTPROT_FERREA)
        {
            continue;
        }
        let dst = m
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Destination(d) => v4(d),
                _ => None,
            })
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let Ok(dst) = Ipv4Network::new(dst, m.header.destination_prefix_length) else {
            continue;
        };
        out.push(SavedRoute {
            dst,
            gateway: m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(g) => v4(g),
                _ => None,
            }),
            metric: m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Priority(p) => Some(*p),
                _ => None,
            }),
            src: m.attributes.iter().find_map(|a| match a {
                RouteAttribute::PrefSource(p) => v4(p),
                _ => None,
            }),
            protocol: u8::from(m.header.protocol),
            scope: u8::from(m.header.scope),
            onlink: m.header.flags.contains(RouteFlags::Onlink),
        });
    }
    Ok(out)
}

fn route_message(r: &SavedRoute, dev: u32) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix())
        .output_interface(dev)
        .protocol(RouteProtocol::from(r.protocol))
        .scope(RouteScope::from(r.scope));
    if let Some(g) = r.gateway {
        b = b.gateway(g);
    }
    if let Some(m) = r.metric {
        b = b.priority(m);
    }
    if let Some(s) = r.src {
        b = b.pref_source(s);
    }
    let mut m = b.build();
    if r.onlink {
        m.header.flags |= RouteFlags::Onlink;
    }
    m
}

/// Puts `cfg` on the bridge port `idx`: MAC, MTU, up, addresses, then routes (replacing a
/// route of the same destination and metric through another link). Idempotent.
pub async fn apply(h: &Handle, idx: u32, cfg: &UplinkConfig) -> Result<(), UplinkError> {
    let mut link = LinkUnspec::new_with_index(idx).mtu(cfg.mtu).up();
    if let Some(mac) = parse_mac(&cfg.mac) {
        link = link.address(mac.to_vec());
    }
    h.link()
        .set(link.build())
        .execute()
        .await
        .map_err(err("setting up with the uplink's MAC and MTU", PHY_BRIDGE))?;
    for a in &cfg.addrs {
        h.address()
            .add(idx, IpAddr::V4(a.ip()), a.prefix())
            .replace()
            .execute()
            .await
            .map_err(err("adding an address to", format!("{PHY_BRIDGE} ({a})")))?;
    }
    // Routes with a next hop need its subnet connected first: plain ones go first.
    let mut rs: Vec<&SavedRoute> = cfg.routes.iter().collect();
    rs.sort_by_key(|r| r.gateway.is_some());
    for r in rs {
        h.route()
            .add(route_message(r, idx))
            .replace()
            .execute()
            .await
            .map_err(err("moving onto the physical bridge the route to", r.dst))?;
    }
    Ok(())
}

/// Removes `cfg`'s addresses and whatever configured routes are left on the uplink `idx`
/// (the kernel drops the connected routes with the addresses). Idempotent.
pub async fn strip(h: &Handle, idx: u32) -> Result<(), UplinkError> {
    for r in routes(h, idx).await? {
        match h.route().del(route_message(&r, idx)).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
            Err(e) => return Err(err("removing from the uplink the route to", r.dst)(e)),
        }
    }
    let mut s = h.address().get().set_link_index_filter(idx).execute();
    let mut msgs = Vec::new();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(err("listing the addresses of", format!("ifindex {idx}")))?
    {
        if m.header.index == idx && m.header.family == AddressFamily::Inet {
            msgs.push(m);
        }
    }
    for m in msgs {
        match h.address().del(m).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EADDRNOTAVAIL => {}
            Err(e) => return Err(err("removing an address from", format!("ifindex {idx}"))(e)),
        }
    }
    Ok(())
}

/// `aa:bb:..` to bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    v.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_merges() {
        let r = SavedRoute {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(172, 18, 0, 100)),
            metric: None,
            src: None,
            protocol: 4,
            scope: 0,
            onlink: false,
        };
        let mut a = UplinkConfig {
            uplink: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1500,
            addrs: vec!["172.18.0.11/24".parse().unwrap()],
            routes: vec![],
        };
        let b = UplinkConfig {
            routes: vec![r.clone()],
            ..a.clone()
        };
        let s = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<UplinkConfig>(&s).unwrap(), b);
        a.merge(&b);
        a.merge(&b);
        assert_eq!(a, b);
        assert_eq!(parse_mac("02:00:00:00:00:01"), Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(parse_mac("02:00"), None);
    }
}
