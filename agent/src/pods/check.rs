//! CHECK against the runtime's `prevResult` (CNI spec 1.1, "CHECK": the plugin "must consult
//! the prevResult to determine the expected interfaces and addresses" and fails when a
//! resource it created and that `prevResult` lists is missing or in an invalid state).
//!
//! [`verify`] is a pure function of what the runtime remembers (`prevResult`, decoded by the
//! CNI server into a [`PrevResult`]), what the agent recorded at ADD ([`PodRecord`]) and what is
//! inside the pod's namespace now ([`PodSide`], from [`crate::pods::podnet::PodNet::inspect`]).
//! What it checks:
//! - `prevResult` lists the interface CNI_IFNAME with `sandbox` CNI_NETNS; that interface
//!   exists in the namespace, and the MAC `prevResult` names is the one ferrea gave it and the
//!   one it has;
//! - every address `prevResult` lists for that interface is the one ferrea allocated to the
//!   container, with its gateway, and is configured on the interface; at least one is listed;
//! - every route `prevResult` lists (whoever added it: a later chained plugin may have) is in
//!   the namespace's main table, with its gateway when one is named.
//!
//! Addresses of other interfaces (a chained plugin's) are not ferrea's and are left alone.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::pods::podnet::{PodSide, fmt_mac};
use crate::pods::store::PodRecord;

/// The parts of a CNI result (`prevResult`) CHECK compares, as the runtime sent them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrevResult {
    /// `interfaces`.
    pub interfaces: Vec<PrevInterface>,
    /// `ips`.
    pub ips: Vec<PrevIp>,
    /// `routes`.
    pub routes: Vec<PrevRoute>,
}

/// One entry of `prevResult.interfaces`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrevInterface {
    /// `name`.
    pub name: String,
    /// `mac`, if given.
    pub mac: Option<[u8; 6]>,
    /// `sandbox`: the netns path for an interface inside a container; `None` on the host.
    pub sandbox: Option<String>,
}

/// One entry of `prevResult.ips`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrevIp {
    /// `address`, in CIDR notation.
    pub address: IpNetwork,
    /// `gateway`, if given.
    pub gateway: Option<IpAddr>,
    /// `interface`: an index into [`PrevResult::interfaces`], if given.
    pub interface: Option<usize>,
}

/// One entry of `prevResult.routes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrevRoute {
    /// `dst`.
    pub dst: IpNetwork,
    /// `gw`, if given.
    pub gw: Option<IpAddr>,
}

impl std::fmt::Display for PrevRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(gw) = self.gw {
            write!(f, " via {gw}")?;
        }
        Ok(())
    }
}

/// Why CHECK failed against `prevResult`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckFailure {
    /// `prevResult` does not list the attachment's interface.
    #[error("prevResult lists no interface {ifname} in sandbox {netns} (it lists {listed})")]
    NoInterface {
        /// CNI_IFNAME.
        ifname: String,
        /// CNI_NETNS.
        netns: String,
        /// The interfaces it lists, for the message.
        listed: String,
    },
    /// `prevResult` puts the interface in another sandbox than CNI_NETNS.
    #[error("prevResult lists interface {ifname} in sandbox {sandbox}, but CNI_NETNS is {netns}")]
    OtherSandbox {
        /// CNI_IFNAME.
        ifname: String,
        /// `sandbox` in prevResult.
        sandbox: String,
        /// CNI_NETNS.
        netns: String,
    },
    /// The interface `prevResult` names is not in the namespace.
    #[error("interface {ifname} named by prevResult does not exist in {netns}")]
    InterfaceMissing {
        /// CNI_IFNAME.
        ifname: String,
        /// CNI_NETNS.
        netns: String,
    },
    /// The MAC in `prevResult` is not the interface's.
    #[error("prevResult names MAC {prev} for {ifname}, but {whose} {actual}")]
    OtherMac {
        /// CNI_IFNAME.
        ifname: String,
        /// The MAC in prevResult.
        prev: String,
        /// "ferrea assigned it" or "the interface has".
        whose: &'static str,
        /// The MAC ferrea assigned or the interface has.
        actual: String,
    },
    /// `prevResult` names an address for the interface that is not the allocated one.
    #[error(
        "prevResult names address {prev} for {ifname}, but ferrea allocated {allocated} to container {container_id}"
    )]
    OtherAddress {
        /// CNI_IFNAME.
        ifname: String,
        /// The address in prevResult.
        prev: IpNetwork,
        /// What the agent allocated.
        allocated: IpNetwork,
        /// CNI_CONTAINERID.
        container_id: String,
    },
    /// `prevResult` lists no address for the interface.
    #[error(
        "prevResult lists no address for {ifname}; ferrea allocated {allocated} to container {container_id}"
    )]
    NoAddress {
        /// CNI_IFNAME.
        ifname: String,
        /// What the agent allocated.
        allocated: IpNetwork,
        /// CNI_CONTAINERID.
        container_id: String,
    },
    /// An address of `prevResult` is not on the interface.
    #[error("address {address} named by prevResult is not configured on {ifname} in {netns}")]
    AddressNotConfigured {
        /// The address.
        address: IpNetwork,
        /// CNI_IFNAME.
        ifname: String,
        /// CNI_NETNS.
        netns: String,
    },
    /// The gateway in `prevResult` is not the pod's.
    #[error("prevResult names gateway {prev} for {address}, but the pod's gateway is {gateway}")]
    OtherGateway {
        /// The address it is listed with.
        address: IpNetwork,
        /// The gateway in prevResult.
        prev: IpAddr,
        /// The pod's gateway.
        gateway: IpAddr,
    },
    /// A route of `prevResult` is not in the namespace.
    #[error("route {route} named by prevResult is missing in {netns}")]
    RouteMissing {
        /// The route.
        route: PrevRoute,
        /// CNI_NETNS.
        netns: String,
    },
}

/// Compares `prev` with the record and what `side` found in `netns` (see the module doc).
pub fn verify(
    prev: &PrevResult,
    rec: &PodRecord,
    netns: &str,
    side: &PodSide,
) -> Result<(), CheckFailure> {
    let ifname = rec.ifname.as_str();
    let named: Vec<(usize, &PrevInterface)> = prev
        .interfaces
        .iter()
        .enumerate()
        .filter(|(_, i)| i.name == ifname)
        .collect();
    let ours = named
        .iter()
        .find(|(_, i)| i.sandbox.as_deref() == Some(netns));
    let Some(&(index, prev_if)) = ours else {
        if let Some((_, i)) = named
            .iter()
            .find(|(_, i)| i.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
        {
            return Err(CheckFailure::OtherSandbox {
                ifname: ifname.into(),
                sandbox: i.sandbox.clone().unwrap_or_default(),
                netns: netns.into(),
            });
        }
        let listed: Vec<String> = prev
            .interfaces
            .iter()
            .map(|i| match &i.sandbox {
                Some(s) if !s.is_empty() => format!("{} in {s}", i.name),
                _ => format!("{} on the host", i.name),
            })
            .collect();
        return Err(CheckFailure::NoInterface {
            ifname: ifname.into(),
            netns: netns.into(),
            listed: if listed.is_empty() {
                "none".into()
            } else {
                listed.join(", ")
            },
        });
    };
    let Some(iface) = &side.iface else {
        return Err(CheckFailure::InterfaceMissing {
            ifname: ifname.into(),
            netns: netns.into(),
        });
    };
    if let Some(mac) = prev_if.mac {
        if mac != rec.pod_mac {
            return Err(CheckFailure::OtherMac {
                ifname: ifname.into(),
                prev: fmt_mac(&mac),
                whose: "ferrea assigned it",
                actual: fmt_mac(&rec.pod_mac),
            });
        }
        if let Some(have) = iface.mac
            && have != mac
        {
            return Err(CheckFailure::OtherMac {
                ifname: ifname.into(),
                prev: fmt_mac(&mac),
                whose: "the interface has",
                actual: fmt_mac(&have),
            });
        }
    }
    let allocated = IpNetwork::new(IpAddr::V4(rec.ip), rec.prefix_len)
        .expect("a recorded prefix length is valid");
    let mut listed = 0;
    for ip in prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none_or(|i| i == index))
    {
        listed += 1;
        if ip.address != allocated {
            return Err(CheckFailure::OtherAddress {
                ifname: ifname.into(),
                prev: ip.address,
                allocated,
                container_id: rec.container_id.clone(),
            });
        }
        if let Some(gw) = ip.gateway
            && gw != IpAddr::V4(rec.gateway)
        {
            return Err(CheckFailure::OtherGateway {
                address: ip.address,
                prev: gw,
                gateway: IpAddr::V4(rec.gateway),
            });
        }
        if !iface.addrs.contains(&ip.address) {
            return Err(CheckFailure::AddressNotConfigured {
                address: ip.address,
                ifname: ifname.into(),
                netns: netns.into(),
            });
        }
    }
    if listed == 0 {
        return Err(CheckFailure::NoAddress {
            ifname: ifname.into(),
            allocated,
            container_id: rec.container_id.clone(),
        });
    }
    for route in &prev.routes {
        let dst = normalized(route.dst);
        let present = side
            .routes
            .iter()
            .any(|r| normalized(r.dst) == dst && route.gw.is_none_or(|gw| r.gateway == Some(gw)));
        if !present {
            return Err(CheckFailure::RouteMissing {
                route: route.clone(),
                netns: netns.into(),
            });
        }
    }
    Ok(())
}

/// `dst` with its host bits cleared (`10.0.0.5/24` is `10.0.0.0/24` as a route).
fn normalized(dst: IpNetwork) -> IpNetwork {
    IpNetwork::new(dst.network(), dst.prefix()).unwrap_or(dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::podnet::{PodIface, PodRoute};

    const NS: &str = "/run/netns/p";

    fn rec() -> PodRecord {
        PodRecord {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            ip: "10.244.1.5".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.244.1.1".parse().unwrap(),
            netns: NS.into(),
            host_ifname: "fe0123456789abc".into(),
            host_mac: [0x0e, 0x58, 10, 244, 1, 5],
            pod_mac: [0x0a, 0x58, 10, 244, 1, 5],
            pod_namespace: String::new(),
            pod_name: String::new(),
        }
    }

    /// What ADD returned for [`rec`].
    fn prev() -> PrevResult {
        PrevResult {
            interfaces: vec![
                PrevInterface {
                    name: "fe0123456789abc".into(),
                    mac: Some([0x0e, 0x58, 10, 244, 1, 5]),
                    sandbox: None,
                },
                PrevInterface {
                    name: "eth0".into(),
                    mac: Some([0x0a, 0x58, 10, 244, 1, 5]),
                    sandbox: Some(NS.into()),
                },
            ],
            ips: vec![PrevIp {
                address: "10.244.1.5/24".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![PrevRoute {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.244.1.1".parse().unwrap()),
            }],
        }
    }

    /// What the namespace holds after that ADD.
    fn side() -> PodSide {
        PodSide {
            iface: Some(PodIface {
                index: 2,
                mac: Some([0x0a, 0x58, 10, 244, 1, 5]),
                addrs: vec!["10.244.1.5/24".parse().unwrap()],
            }),
            routes: vec![
                PodRoute {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gateway: Some("10.244.1.1".parse().unwrap()),
                    oif: Some(2),
                },
                PodRoute {
                    dst: "10.244.1.0/24".parse().unwrap(),
                    gateway: None,
                    oif: Some(2),
                },
            ],
        }
    }

    #[test]
    fn what_add_left_passes() {
        assert_eq!(verify(&prev(), &rec(), NS, &side()), Ok(()));
        // A route a chained plugin added, present in the namespace, passes too; one to the
        // subnet without a gateway matches the connected route.
        let mut p = prev();
        p.routes.push(PrevRoute {
            dst: "10.244.1.7/24".parse().unwrap(),
            gw: None,
        });
        assert_eq!(verify(&p, &rec(), NS, &side()), Ok(()));
        // Addresses of another interface (a chained plugin's) are not ferrea's.
        let mut p = prev();
        p.ips.push(PrevIp {
            address: "192.168.7.2/24".parse().unwrap(),
            gateway: None,
            interface: Some(0),
        });
        assert_eq!(verify(&p, &rec(), NS, &side()), Ok(()));
    }

    #[test]
    fn another_address_is_named() {
        let mut p = prev();
        p.ips[0].address = "10.244.1.9/24".parse().unwrap();
        let e = verify(&p, &rec(), NS, &side()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "prevResult names address 10.244.1.9/24 for eth0, but ferrea allocated 10.244.1.5/24 to container c1"
        );
        p.ips.clear();
        assert!(matches!(
            verify(&p, &rec(), NS, &side()),
            Err(CheckFailure::NoAddress { .. })
        ));
        let mut p = prev();
        p.ips[0].gateway = Some("10.244.1.254".parse().unwrap());
        assert!(matches!(
            verify(&p, &rec(), NS, &side()),
            Err(CheckFailure::OtherGateway { .. })
        ));
    }

    #[test]
    fn an_address_missing_in_the_namespace_fails() {
        let mut s = side();
        s.iface.as_mut().unwrap().addrs.clear();
        assert_eq!(
            verify(&prev(), &rec(), NS, &s).unwrap_err().to_string(),
            "address 10.244.1.5/24 named by prevResult is not configured on eth0 in /run/netns/p"
        );
    }

    #[test]
    fn interfaces_are_checked() {
        let mut p = prev();
        p.interfaces[1].name = "eth9".into();
        assert_eq!(
            verify(&p, &rec(), NS, &side()).unwrap_err().to_string(),
            "prevResult lists no interface eth0 in sandbox /run/netns/p (it lists fe0123456789abc on the host, eth9 in /run/netns/p)"
        );
        let mut p = prev();
        p.interfaces[1].sandbox = Some("/run/netns/other".into());
        assert!(matches!(
            verify(&p, &rec(), NS, &side()),
            Err(CheckFailure::OtherSandbox { .. })
        ));
        let s = PodSide {
            iface: None,
            ..side()
        };
        assert_eq!(
            verify(&prev(), &rec(), NS, &s).unwrap_err().to_string(),
            "interface eth0 named by prevResult does not exist in /run/netns/p"
        );
        let mut p = prev();
        p.interfaces[1].mac = Some([2, 0, 0, 0, 0, 1]);
        assert!(
            verify(&p, &rec(), NS, &side())
                .unwrap_err()
                .to_string()
                .contains("ferrea assigned it 0a:58:0a:f4:01:05")
        );
        let mut s = side();
        s.iface.as_mut().unwrap().mac = Some([2, 0, 0, 0, 0, 1]);
        assert!(
            verify(&prev(), &rec(), NS, &s)
                .unwrap_err()
                .to_string()
                .contains("the interface has 02:00:00:00:00:01")
        );
    }

    #[test]
    fn a_missing_route_is_named() {
        let mut s = side();
        s.routes.remove(0);
        assert_eq!(
            verify(&prev(), &rec(), NS, &s).unwrap_err().to_string(),
            "route 0.0.0.0/0 via 10.244.1.1 named by prevResult is missing in /run/netns/p"
        );
        // A route with another gateway is not the one prevResult names.
        let mut s = side();
        s.routes[0].gateway = Some("10.244.1.254".parse().unwrap());
        assert!(matches!(
            verify(&prev(), &rec(), NS, &s),
            Err(CheckFailure::RouteMissing { .. })
        ));
    }
}
