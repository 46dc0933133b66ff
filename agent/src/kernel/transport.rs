//! The transport interface: which interface and address carry this node's traffic to other
//! nodes, and the pod MTU that follows from it.
//!
//! Chosen as Antrea chooses it: `transportInterface` by name, else the first interface with an
//! address in `transportInterfaceCIDRs`, else the interface holding the node's `InternalIP`.
//! The pod MTU is the transport MTU minus the tunnel's overhead in `encap` mode, unless the
//! config sets `mtu`.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::Handle;

use crate::config::{Config, EncapMode};
use crate::net::{Transport, Tunnel};

/// Why no transport interface could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Netlink failed.
    #[error("listing {what}: {source}")]
    Netlink {
        /// Interfaces or addresses.
        what: &'static str,
        /// Why.
        #[source]
        source: rtnetlink::Error,
    },
    /// Nothing matched the configuration or the node's address.
    #[error("no transport interface: {0}")]
    NotFound(String),
}

/// One IPv4 address of an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    /// Interface index.
    pub ifindex: u32,
    /// The address and its prefix.
    pub net: Ipv4Network,
}

/// Picks the transport interface from `addrs` (every IPv4 address of the node): by name
/// (`by_name` resolves a name to an index), by CIDR, or by the node's `InternalIP`.
pub fn choose(
    cfg: &Config,
    internal_ip: Option<Ipv4Addr>,
    addrs: &[IfAddr],
    by_name: impl Fn(&str) -> Option<u32>,
) -> Result<IfAddr, TransportError> {
    if let Some(name) = &cfg.transport_interface {
        let idx = by_name(name).ok_or_else(|| {
            TransportError::NotFound(format!("transportInterface {name:?} does not exist"))
        })?;
        let mine: Vec<&IfAddr> = addrs.iter().filter(|a| a.ifindex == idx).collect();
        return mine
            .iter()
            .find(|a| Some(a.net.ip()) == internal_ip)
            .or(mine.first())
            .map(|a| (*a).clone())
            .ok_or_else(|| {
                TransportError::NotFound(format!("transportInterface {name:?} has no IPv4 address"))
            });
    }
    if !cfg.transport_interface_cidrs.is_empty() {
        return addrs
            .iter()
            .find(|a| {
                cfg.transport_interface_cidrs
                    .iter()
                    .any(|c| c.contains(a.net.ip()))
            })
            .cloned()
            .ok_or_else(|| {
                TransportError::NotFound(format!(
                    "no interface has an address in transportInterfaceCIDRs {:?}",
                    cfg.transport_interface_cidrs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                ))
            });
    }
    let ip = internal_ip.ok_or_else(|| {
        TransportError::NotFound(
            "the Node object has no InternalIP; set transportInterface or transportInterfaceCIDRs"
                .into(),
        )
    })?;
    addrs
        .iter()
        .find(|a| a.net.ip() == ip)
        .cloned()
        .ok_or_else(|| {
            TransportError::NotFound(format!(
                "no interface holds the node's InternalIP {ip}; set transportInterface or \
                 transportInterfaceCIDRs"
            ))
        })
}

/// The pod MTU: the configured one, else the transport MTU minus the tunnel overhead.
pub fn pod_mtu(cfg: &Config, transport_mtu: u32, tunnel: Option<Tunnel>) -> u32 {
    cfg.mtu
        .unwrap_or_else(|| transport_mtu - tunnel.map_or(0, |t| t.kind.overhead()))
}

/// The tunnel the config asks for (`None` in `noEncap` mode).
pub fn tunnel(cfg: &Config) -> Option<Tunnel> {
    match cfg.traffic_encap_mode {
        EncapMode::NoEncap => None,
        EncapMode::Encap => Some(Tunnel {
            kind: cfg.tunnel_type,
            port: cfg
                .tunnel_port
                .unwrap_or_else(|| cfg.tunnel_type.default_port()),
        }),
    }
}

/// Finds the transport interface of the namespace `handle` talks to.
pub async fn discover(
    handle: &Handle,
    cfg: &Config,
    internal_ip: Option<Ipv4Addr>,
) -> Result<Transport, TransportError> {
    let nl = |what| move |source| TransportError::Netlink { what, source };
    let mut links = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(nl("interfaces"))? {
        let name = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        let mtu = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        links.push((
            msg.header.index,
            name.unwrap_or_default(),
            mtu.unwrap_or(1500),
        ));
    }
    let mut addrs = Vec::new();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(nl("addresses"))? {
        let ip = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = ip
            && let Ok(net) = Ipv4Network::new(ip, msg.header.prefix_len)
        {
            addrs.push(IfAddr {
                ifindex: msg.header.index,
                net,
            });
        }
    }
    let chosen = choose(cfg, internal_ip, &addrs, |name| {
        links.iter().find(|l| l.1 == name).map(|l| l.0)
    })?;
    let (_, ifname, mtu) = links
        .iter()
        .find(|l| l.0 == chosen.ifindex)
        .cloned()
        .ok_or_else(|| TransportError::NotFound("the chosen interface vanished".into()))?;
    Ok(Transport {
        ifname,
        ifindex: chosen.ifindex,
        ip: chosen.net.ip(),
        prefix_len: chosen.net.prefix(),
        mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(extra: &str) -> Config {
        Config::parse(&format!("nodeName: n1\n{extra}"), Path::new("t.yaml")).unwrap()
    }

    fn addrs() -> Vec<IfAddr> {
        vec![
            IfAddr {
                ifindex: 1,
                net: "127.0.0.1/8".parse().unwrap(),
            },
            IfAddr {
                ifindex: 2,
                net: "172.18.0.11/24".parse().unwrap(),
            },
            IfAddr {
                ifindex: 3,
                net: "192.168.5.4/24".parse().unwrap(),
            },
        ]
    }

    fn names(n: &str) -> Option<u32> {
        match n {
            "lo" => Some(1),
            "eth0" => Some(2),
            "eth1" => Some(3),
            _ => None,
        }
    }

    #[test]
    fn chooses_by_name_then_cidr_then_internal_ip() {
        let ip = Some(Ipv4Addr::new(172, 18, 0, 11));
        let a = addrs();
        assert_eq!(choose(&cfg(""), ip, &a, names).unwrap().ifindex, 2);
        let c = cfg("transportInterface: eth1\n");
        assert_eq!(choose(&c, ip, &a, names).unwrap().ifindex, 3);
        let c = cfg("transportInterfaceCIDRs: [192.168.0.0/16]\n");
        assert_eq!(choose(&c, ip, &a, names).unwrap().ifindex, 3);
    }

    #[test]
    fn errors_say_what_to_configure() {
        let a = addrs();
        let e = choose(&cfg(""), Some(Ipv4Addr::new(10, 0, 0, 1)), &a, names)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("10.0.0.1") && e.contains("transportInterface"),
            "{e}"
        );
        let e = choose(&cfg("transportInterface: eth9\n"), None, &a, names)
            .unwrap_err()
            .to_string();
        assert!(e.contains("eth9"), "{e}");
        let e = choose(&cfg(""), None, &a, names).unwrap_err().to_string();
        assert!(e.contains("InternalIP"), "{e}");
    }

    #[test]
    fn mtu_follows_the_transport_and_the_tunnel() {
        let c = cfg("");
        assert_eq!(pod_mtu(&c, 1500, tunnel(&c)), 1450);
        let c = cfg("trafficEncapMode: noEncap\n");
        assert_eq!(tunnel(&c), None);
        assert_eq!(pod_mtu(&c, 9000, tunnel(&c)), 9000);
        let c = cfg("mtu: 1400\n");
        assert_eq!(pod_mtu(&c, 1500, tunnel(&c)), 1400);
        let c = cfg("tunnelType: geneve\n");
        assert_eq!(tunnel(&c).unwrap().port, 6081);
    }
}
