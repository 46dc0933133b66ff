//! Pod interface plumbing: the veth pair between the node and a pod, and the pod side's
//! address and routes, all over rtnetlink.
//!
//! This module owns exactly the host-side veths whose names start with the configured prefix
//! and the interface it creates inside each pod's network namespace. It never touches other
//! links of the node. The dataplane backend (not this module) attaches programs or bridge
//! ports to the host side and adds the node-side routes its packet path needs.
//!
//! Netlink sockets are bound to the network namespace of the thread that opens them, so to
//! configure a pod we open a socket from a short-lived thread that has entered the pod's
//! namespace (`setns`), then drive it from the async runtime like any other socket: no thread
//! of the agent's runtime ever changes namespace.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use async_trait::async_trait;
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::pods::netns::open_netns;

/// Errors of pod plumbing.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    /// The pod's network namespace could not be opened or examined (permissions, I/O).
    #[error("pod network namespace {netns} cannot be opened: {source}")]
    Netns {
        /// CNI_NETNS.
        netns: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// CNI_NETNS does not exist or is something other than a network namespace
    /// ([`crate::pods::netns::open_netns`] says what).
    #[error("CNI_NETNS {netns} {what}")]
    NotNetns {
        /// CNI_NETNS.
        netns: String,
        /// What the path is ("is an empty regular file on tmpfs, not a network namespace ...").
        what: String,
    },
    /// The implementation cannot do this (a fake without it).
    #[error("{op} is not supported by this pod network implementation")]
    Unsupported {
        /// The operation.
        op: &'static str,
    },
    /// An interface with the pod-side name already exists in the pod's namespace.
    #[error("interface {ifname} already exists in pod network namespace {netns}")]
    IfaceExists {
        /// The pod-side name.
        ifname: String,
        /// CNI_NETNS.
        netns: String,
    },
    /// A netlink operation failed.
    #[error("{op} on {ifname}: {source}")]
    Netlink {
        /// What was being done.
        op: &'static str,
        /// The interface concerned (`*`: all of them).
        ifname: String,
        /// The kernel's or library's error.
        #[source]
        source: rtnetlink::Error,
    },
    /// An interface just created is not there.
    #[error("{op} on {ifname}: not found after creation")]
    NotFoundAfterCreation {
        /// What was being done.
        op: &'static str,
        /// The interface.
        ifname: String,
    },
    /// A host veth to change is gone (its pod went meanwhile).
    #[error("{op} {ifname}: the interface is gone")]
    Gone {
        /// What was being done.
        op: &'static str,
        /// The interface.
        ifname: String,
    },
    /// CHECK found the pod's interface not as the agent configured it.
    #[error("pod interface {ifname} in {netns}: {what}")]
    Mismatch {
        /// The pod-side name.
        ifname: String,
        /// CNI_NETNS.
        netns: String,
        /// What differs.
        what: Mismatch,
    },
}

/// What CHECK found different from what the agent configured.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// The host side of the veth pair is gone.
    #[error("host-side veth {host_ifname} is missing")]
    HostVethMissing {
        /// The host-side name.
        host_ifname: String,
    },
    /// The pod-side interface is gone.
    #[error("interface is missing")]
    InterfaceMissing,
    /// The pod-side interface lacks its address.
    #[error("address {ip}/{prefix_len} is missing")]
    AddressMissing {
        /// The pod address.
        ip: Ipv4Addr,
        /// Its prefix length.
        prefix_len: u8,
    },
}

/// What to create for one pod.
#[derive(Clone, Debug)]
pub struct PodNetSpec {
    /// CNI_NETNS: path of the pod's network namespace.
    pub netns: String,
    /// Interface name inside the pod (CNI_IFNAME).
    pub ifname: String,
    /// Host-side veth name.
    pub host_ifname: String,
    /// Host-side MAC.
    pub host_mac: [u8; 6],
    /// Pod-side MAC.
    pub pod_mac: [u8; 6],
    /// Pod address.
    pub ip: Ipv4Addr,
    /// Prefix length of the pod CIDR.
    pub prefix_len: u8,
    /// Default gateway of the pod.
    pub gateway: Ipv4Addr,
    /// MTU of both ends.
    pub mtu: u32,
    /// Leave TX checksum offload on in the pod (the default); off where the dataplane cannot
    /// complete checksums ([`crate::dataplane::Dataplane::pod_tx_checksum_offload`]).
    pub tx_checksum_offload: bool,
    /// The copy of the pod's record the host veth carries as its alias ([`super::note`]),
    /// if the record fits one.
    pub note: Option<String>,
}

/// A host-side pod veth as [`PodNet::list_host_links`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLink {
    /// Its name.
    pub name: String,
    /// Its alias (a [`super::note`], if ferrea made it).
    pub alias: Option<String>,
}

/// What is inside a pod's network namespace, as CHECK compares it with `prevResult`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSide {
    /// The interface named CNI_IFNAME, if it exists.
    pub iface: Option<PodIface>,
    /// The routes of the namespace's main table, both families.
    pub routes: Vec<PodRoute>,
}

/// An interface inside a pod's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIface {
    /// Its ifindex inside the namespace.
    pub index: u32,
    /// Its MAC, when it has an Ethernet address.
    pub mac: Option<[u8; 6]>,
    /// Its addresses with their prefix lengths.
    pub addrs: Vec<IpNetwork>,
}

/// A route of a pod's main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRoute {
    /// The destination (`0.0.0.0/0` for the default route).
    pub dst: IpNetwork,
    /// The gateway, if any.
    pub gateway: Option<IpAddr>,
    /// The output interface's index, if any.
    pub oif: Option<u32>,
}

/// Creates and removes pod interfaces. Linux implementation: [`NetlinkPodNet`].
#[async_trait]
pub trait PodNet: Send + Sync {
    /// Creates the veth pair with the pod side already inside the pod's namespace, configures
    /// the pod side (MAC, MTU, address, default route, loopback up) and brings both ends up.
    /// All-or-nothing: on error the pair is deleted again. Returns the host-side ifindex.
    async fn create(&self, spec: &PodNetSpec) -> Result<u32, PodNetError>;

    /// Deletes a host-side veth (its pod-side peer goes with it). Absent is not an error.
    async fn delete(&self, host_ifname: &str) -> Result<(), PodNetError>;

    /// The ifindex of a host-side veth, if it exists.
    async fn host_ifindex(&self, host_ifname: &str) -> Result<Option<u32>, PodNetError>;

    /// Host-side links that are ferrea pod veths for `prefix` (see [`is_pod_ifname`]), with
    /// their aliases.
    async fn list_host_links(&self, prefix: &str) -> Result<Vec<HostLink>, PodNetError>;

    /// Sets the alias of host veth `host_ifname` to `note` (a [`super::note`]).
    async fn set_note(&self, host_ifname: &str, note: &str) -> Result<(), PodNetError>;

    /// Verifies that the pod side exists in its namespace with the expected address.
    async fn check(&self, spec: &PodNetSpec) -> Result<(), PodNetError>;

    /// Whether the network namespace at `netns` still exists.
    fn netns_exists(&self, netns: &str) -> bool;

    /// What the namespace at `netns` holds: the interface `ifname` (MAC, addresses) and the
    /// main table's routes. Changes nothing. Fails like [`PodNet::check`] when `netns` is not a
    /// network namespace; a missing interface is `iface: None`, not an error.
    async fn inspect(&self, netns: &str, ifname: &str) -> Result<PodSide, PodNetError> {
        let _ = (netns, ifname);
        Err(PodNetError::Unsupported { op: "inspect" })
    }
}

const ENODEV: i32 = libc::ENODEV;
const EEXIST: i32 = libc::EEXIST;

fn nl_code(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl_err(op: &'static str, ifname: &str) -> impl FnOnce(rtnetlink::Error) -> PodNetError {
    let ifname = ifname.to_owned();
    move |source| PodNetError::Netlink { op, ifname, source }
}

/// Pod plumbing over rtnetlink, in the namespace the agent runs in (the node's).
pub struct NetlinkPodNet {
    node: Handle,
}

impl NetlinkPodNet {
    /// Opens a netlink connection in the current network namespace. Needs a tokio runtime.
    pub fn new() -> std::io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self { node: handle })
    }

    /// Opens a netlink connection inside the namespace of `netns` (see the module doc). With
    /// `csum_off`, the thread that is in the namespace anyway also turns TX checksum offload
    /// off on that interface.
    async fn handle_in(
        &self,
        ns: &File,
        netns: &str,
        csum_off: Option<&str>,
    ) -> Result<Handle, PodNetError> {
        let csum_off = csum_off.map(str::to_owned);
        let fd = ns.try_clone().map_err(|source| PodNetError::Netns {
            netns: netns.to_owned(),
            source,
        })?;
        let rt = tokio::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let res = (|| {
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                if let Some(ifname) = &csum_off {
                    crate::kernel::offload::disable_tx_checksum(ifname)?;
                }
                // Registering the socket with the reactor needs the runtime's context.
                let _guard = rt.enter();
                let (conn, handle, _) = rtnetlink::new_connection()?;
                rt.spawn(conn);
                Ok::<_, std::io::Error>(handle)
            })();
            let _ = tx.send(res);
            // The thread ends here; its namespace change dies with it.
        });
        match rx.await {
            Ok(Ok(h)) => Ok(h),
            Ok(Err(source)) => Err(PodNetError::Netns {
                netns: netns.to_owned(),
                source,
            }),
            Err(_) => Err(PodNetError::Netns {
                netns: netns.to_owned(),
                source: std::io::Error::other("namespace thread died"),
            }),
        }
    }

    async fn configure_pod_side(&self, h: &Handle, spec: &PodNetSpec) -> Result<(), PodNetError> {
        let ifn = &spec.ifname;
        let idx = link_index(h, ifn)
            .await?
            .ok_or_else(|| PodNetError::NotFoundAfterCreation {
                op: "find pod interface",
                ifname: ifn.clone(),
            })?;
        if let Some(lo) = link_index(h, "lo").await? {
            h.link()
                .set(LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await
                .map_err(nl_err("set lo up", "lo"))?;
        }
        h.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(nl_err("set link up", ifn))?;
        h.address()
            .add(idx, IpAddr::V4(spec.ip), spec.prefix_len)
            .replace()
            .execute()
            .await
            .map_err(nl_err("add address", ifn))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(spec.gateway)
            .output_interface(idx)
            .build();
        h.route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(nl_err("add default route", ifn))?;
        Ok(())
    }
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, PodNetError> {
    let mut s = h.link().get().match_name(name.to_owned()).execute();
    match s.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(e) if nl_code(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(nl_err("get link", name)(e)),
    }
}

/// Sets the alias of link `idx` (named `name` in errors).
async fn set_alias(h: &Handle, idx: u32, name: &str, alias: &str) -> Result<(), PodNetError> {
    h.link()
        .set(
            LinkUnspec::new_with_index(idx)
                .append_extra_attribute(LinkAttribute::IfAlias(alias.to_owned()))
                .build(),
        )
        .execute()
        .await
        .map_err(nl_err("set the alias of", name))
}

#[async_trait]
impl PodNet for NetlinkPodNet {
    async fn create(&self, spec: &PodNetSpec) -> Result<u32, PodNetError> {
        let ns = open_netns(&spec.netns)?;
        // The peer is created directly inside the pod's namespace with its final name, MAC
        // and MTU (IFLA_NET_NS_FD in the peer's attributes), like `ip link add ... peer name
        // eth0 netns <ns>`: one netlink request, no rename and no window with a stray name.
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(spec.ifname.clone())
            .address(spec.pod_mac.to_vec())
            .mtu(spec.mtu)
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(spec.host_ifname.clone())
            .address(spec.host_mac.to_vec())
            .mtu(spec.mtu)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        if let Err(e) = self.node.link().add(msg).execute().await {
            if nl_code(&e) == Some(EEXIST) {
                // Either our host name or the pod-side name is taken. Tell which.
                if link_index(&self.node, &spec.host_ifname).await?.is_none() {
                    return Err(PodNetError::IfaceExists {
                        ifname: spec.ifname.clone(),
                        netns: spec.netns.clone(),
                    });
                }
            }
            return Err(nl_err("create veth pair", &spec.host_ifname)(e));
        }
        let result = async {
            let host_idx = link_index(&self.node, &spec.host_ifname)
                .await?
                .ok_or_else(|| PodNetError::NotFoundAfterCreation {
                    op: "find host veth",
                    ifname: spec.host_ifname.clone(),
                })?;
            let h = self
                .handle_in(
                    &ns,
                    &spec.netns,
                    (!spec.tx_checksum_offload).then_some(spec.ifname.as_str()),
                )
                .await?;
            self.configure_pod_side(&h, spec).await?;
            if let Some(note) = &spec.note {
                set_alias(&self.node, host_idx, &spec.host_ifname, note).await?;
            }
            Ok(host_idx)
        }
        .await;
        if result.is_err() {
            let _ = self.delete(&spec.host_ifname).await;
        }
        result
    }

    async fn delete(&self, host_ifname: &str) -> Result<(), PodNetError> {
        let Some(idx) = link_index(&self.node, host_ifname).await? else {
            return Ok(());
        };
        match self.node.link().del(idx).execute().await {
            Ok(()) => Ok(()),
            Err(e) if nl_code(&e) == Some(ENODEV) => Ok(()),
            Err(e) => Err(nl_err("delete veth", host_ifname)(e)),
        }
    }

    async fn host_ifindex(&self, host_ifname: &str) -> Result<Option<u32>, PodNetError> {
        link_index(&self.node, host_ifname).await
    }

    async fn list_host_links(&self, prefix: &str) -> Result<Vec<HostLink>, PodNetError> {
        let mut s = self.node.link().get().execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.map_err(nl_err("list links", "*"))? {
            let mut name = None;
            let mut alias = None;
            for a in &m.attributes {
                match a {
                    LinkAttribute::IfName(n) if is_pod_ifname(prefix, n) => name = Some(n.clone()),
                    LinkAttribute::IfAlias(x) => alias = Some(x.clone()),
                    _ => {}
                }
            }
            if let Some(name) = name {
                out.push(HostLink { name, alias });
            }
        }
        Ok(out)
    }

    async fn set_note(&self, host_ifname: &str, note: &str) -> Result<(), PodNetError> {
        let idx = link_index(&self.node, host_ifname)
            .await?
            .ok_or_else(|| PodNetError::Gone {
                op: "setting the note of",
                ifname: host_ifname.to_owned(),
            })?;
        set_alias(&self.node, idx, host_ifname, note).await
    }

    fn netns_exists(&self, netns: &str) -> bool {
        crate::pods::netns::is_netns(netns)
    }

    async fn inspect(&self, netns: &str, ifname: &str) -> Result<PodSide, PodNetError> {
        let ns = open_netns(netns)?;
        let h = self.handle_in(&ns, netns, None).await?;
        let mut side = PodSide::default();
        let mut links = h.link().get().match_name(ifname.to_owned()).execute();
        let link = match links.try_next().await {
            Ok(l) => l,
            Err(e) if nl_code(&e) == Some(ENODEV) => None,
            Err(e) => return Err(nl_err("get link", ifname)(e)),
        };
        if let Some(m) = link {
            let mac = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(v) => <[u8; 6]>::try_from(v.as_slice()).ok(),
                _ => None,
            });
            let mut addrs = Vec::new();
            let mut s = h
                .address()
                .get()
                .set_link_index_filter(m.header.index)
                .execute();
            while let Some(a) = s
                .try_next()
                .await
                .map_err(nl_err("list addresses", ifname))?
            {
                for attr in &a.attributes {
                    if let netlink_packet_route::address::AddressAttribute::Address(ip) = attr
                        && let Ok(n) = IpNetwork::new(*ip, a.header.prefix_len)
                    {
                        addrs.push(n);
                    }
                }
            }
            side.iface = Some(PodIface {
                index: m.header.index,
                mac,
                addrs,
            });
        }
        let v4 = h
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let v6 = h
            .route()
            .get(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build())
            .execute();
        for mut s in [v4, v6] {
            while let Some(m) = s.try_next().await.map_err(nl_err("list routes", "*"))? {
                if let Some(r) = pod_route(&m) {
                    side.routes.push(r);
                }
            }
        }
        Ok(side)
    }

    async fn check(&self, spec: &PodNetSpec) -> Result<(), PodNetError> {
        let ns = open_netns(&spec.netns)?;
        let mismatch = |what| PodNetError::Mismatch {
            ifname: spec.ifname.clone(),
            netns: spec.netns.clone(),
            what,
        };
        if link_index(&self.node, &spec.host_ifname).await?.is_none() {
            return Err(mismatch(Mismatch::HostVethMissing {
                host_ifname: spec.host_ifname.clone(),
            }));
        }
        let h = self.handle_in(&ns, &spec.netns, None).await?;
        let idx = link_index(&h, &spec.ifname)
            .await?
            .ok_or_else(|| mismatch(Mismatch::InterfaceMissing))?;
        let mut addrs = h.address().get().set_link_index_filter(idx).execute();
        while let Some(a) = addrs
            .try_next()
            .await
            .map_err(nl_err("list addresses", &spec.ifname))?
        {
            for attr in &a.attributes {
                if let netlink_packet_route::address::AddressAttribute::Address(IpAddr::V4(ip)) =
                    attr
                    && *ip == spec.ip
                    && a.header.prefix_len == spec.prefix_len
                {
                    return Ok(());
                }
            }
        }
        Err(mismatch(Mismatch::AddressMissing {
            ip: spec.ip,
            prefix_len: spec.prefix_len,
        }))
    }
}

/// A unicast route of the main table, or `None` for other tables and kinds (local, broadcast,
/// multicast).
fn pod_route(m: &netlink_packet_route::route::RouteMessage) -> Option<PodRoute> {
    use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteType};
    let table = crate::kernel::routes::table_of(m);
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || m.header.kind != RouteType::Unicast {
        return None;
    }
    let addr = |a: &RouteAddress| match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    };
    let unspecified = match m.header.address_family {
        netlink_packet_route::AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = addr(d),
            RouteAttribute::Gateway(g) => gateway = addr(g),
            RouteAttribute::Oif(o) => oif = Some(*o),
            _ => {}
        }
    }
    let dst = IpNetwork::new(
        dst.unwrap_or(unspecified),
        m.header.destination_prefix_length,
    )
    .ok()?;
    Some(PodRoute { dst, gateway, oif })
}

/// Host-side veth name for an attachment: `prefix` + hex of a hash of container ID and
/// interface name, 15 characters in all (the kernel's IFNAMSIZ - 1). Deterministic, so DEL can
/// find the interface without the store.
pub fn host_ifname(prefix: &str, container_id: &str, ifname: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    let take = 15 - prefix.len();
    format!("{prefix}{}", &hex[..take])
}

/// Whether `name` has the shape of [`host_ifname`]'s output for `prefix` (so other links
/// that merely share the prefix, such as a gateway device, are never taken for pod veths).
pub fn is_pod_ifname(prefix: &str, name: &str) -> bool {
    name.len() == 15
        && name.starts_with(prefix)
        && name[prefix.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// MACs for an attachment, derived from its IP like the Kubernetes reference plugins do
/// (`0a:58:<ip>`): stable across ADD retries and unique per pod on the node. The host side
/// uses `0e:58:<ip>` (locally administered, unicast).
pub fn macs_for(ip: Ipv4Addr) -> (/* host */ [u8; 6], /* pod */ [u8; 6]) {
    let o = ip.octets();
    (
        [0x0e, 0x58, o[0], o[1], o[2], o[3]],
        [0x0a, 0x58, o[0], o[1], o[2], o[3]],
    )
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_deterministic_and_fit_ifnamsiz() {
        let a = host_ifname("fe", "abcdef0123", "eth0");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("fe"));
        assert_eq!(a, host_ifname("fe", "abcdef0123", "eth0"));
        assert_ne!(a, host_ifname("fe", "abcdef0123", "eth1"));
        assert_eq!(host_ifname("ferr", "x", "eth0").len(), 15);
        assert!(is_pod_ifname("fe", &a));
        assert!(!is_pod_ifname("fe", "ferrea-gw0"));
        assert!(!is_pod_ifname("fe", "ferrea-gw0peer1"));
    }

    #[test]
    fn macs_are_local_unicast_and_derived_from_ip() {
        let (h, p) = macs_for(Ipv4Addr::new(10, 244, 1, 5));
        assert_eq!(fmt_mac(&p), "0a:58:0a:f4:01:05");
        assert_eq!(h[0] & 0x03, 0x02);
        assert_eq!(p[0] & 0x03, 0x02);
        assert_ne!(h, p);
    }
}
