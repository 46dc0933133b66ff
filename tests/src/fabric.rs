//! The underlay of a simulated cluster: a "fabric" namespace holding a Linux bridge, an
//! "external" namespace on it standing for the world outside the cluster, and node namespaces
//! plugged into the bridge.
//!
//! Addressing (all inside these namespaces):
//! - fabric subnet 172.18.0.0/24; node `i` (1-based) is 172.18.0.(10+i), the external host
//!   172.18.0.100;
//! - the external host also holds 198.51.100.1/32 (TEST-NET-2) on `lo`, the "internet"
//!   address pods reach through masquerade; nodes route everything off-link (default route)
//!   via 172.18.0.100;
//! - the external host has no route to any pod CIDR: a reply reaches a pod only if the node
//!   masqueraded the request, which is what the masquerade tests rely on.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::Context;

use crate::netns::NetNs;

/// Prefix length of the fabric subnet.
pub const FABRIC_PREFIX: u8 = 24;
/// The external host's address on the fabric.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// The external host's "internet" address (on its `lo`).
pub const INTERNET_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// The control plane's address on the fabric (the API server of a cluster's tests).
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 200);

/// The fabric address of node `index` (1-based): 172.18.0.(10+index).
pub fn node_ip(index: u8) -> Ipv4Addr {
    assert!((1..=89).contains(&index), "node index {index} out of range");
    Ipv4Addr::new(172, 18, 0, 10 + index)
}

/// The fabric bridge and the external host. Dropping it deletes both namespaces (node
/// namespaces are owned by their nodes).
#[derive(Debug)]
pub struct Fabric {
    external: NetNs,
    fabric: NetNs,
    next_index: AtomicU8,
}

impl Fabric {
    /// Creates the fabric namespace with bridge `br0` and the external host wired to it.
    pub fn new() -> anyhow::Result<Self> {
        let fabric = NetNs::new("fab")?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let external = NetNs::new("ext")?;
        let f = Fabric {
            external,
            fabric,
            next_index: AtomicU8::new(1),
        };
        f.plug(&f.external, "ext")?;
        let ext = &f.external;
        ext.ip(&[
            "addr",
            "add",
            &format!("{EXTERNAL_IP}/{FABRIC_PREFIX}"),
            "dev",
            "eth0",
        ])?;
        ext.ip(&["addr", "add", &format!("{INTERNET_IP}/32"), "dev", "lo"])?;
        Ok(f)
    }

    /// The fabric namespace (the bridge `br0` and one port per node, `n<index>`).
    pub fn fabric(&self) -> &NetNs {
        &self.fabric
    }

    /// The external host.
    pub fn external(&self) -> &NetNs {
        &self.external
    }

    /// Reserves the next node index (1, 2, ...).
    pub fn next_index(&self) -> u8 {
        self.next_index.fetch_add(1, Ordering::Relaxed)
    }

    /// Creates a node namespace plugged into the bridge: `eth0` with [`node_ip`]`(index)`/24
    /// and a default route via the external host.
    pub fn add_node_ns(&self, index: u8, role: &str) -> anyhow::Result<NetNs> {
        let ns = NetNs::new(role)?;
        self.plug(&ns, &format!("n{index}"))
            .with_context(|| format!("plugging node {index} into the fabric"))?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/{FABRIC_PREFIX}", node_ip(index)),
            "dev",
            "eth0",
        ])?;
        ns.ip(&["route", "add", "default", "via", &EXTERNAL_IP.to_string()])?;
        Ok(ns)
    }

    /// Creates a namespace plugged into the bridge as a host that is not a node (the control
    /// plane): `eth0` with `ip`/24 and `lo` up, no default route. Its bridge port is named
    /// after the address's last octet (`h<octet>`).
    pub fn add_host_ns(&self, role: &str, ip: Ipv4Addr) -> anyhow::Result<NetNs> {
        let ns = NetNs::new(role)?;
        self.plug(&ns, &format!("h{}", ip.octets()[3]))
            .with_context(|| format!("plugging host {ip} into the fabric"))?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{ip}/{FABRIC_PREFIX}"),
            "dev",
            "eth0",
        ])?;
        Ok(ns)
    }

    /// Connects `ns` to the bridge: `eth0` in `ns`, its peer `port` in the fabric as a bridge
    /// port. Both ends are created inside those namespaces, never in the root one.
    fn plug(&self, ns: &NetNs, port: &str) -> anyhow::Result<()> {
        ns.add_veth("eth0", &self.fabric, port)?;
        self.fabric
            .ip(&["link", "set", port, "master", "br0", "up"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }
}

/// The external host's end of a VLAN: a macvlan `v<vid>` on its fabric interface, tagged and
/// untagged by the same BPF tagger a node uses on kernels without 802.1Q devices
/// (`ferrea_agent::kernel::vlan`), with an address on the VLAN's subnet (the pool's gateway, say).
/// A real switch port would do the same; this kernel has neither VLAN devices nor a
/// VLAN-filtering bridge. The filters go with the namespace.
pub struct VlanGateway {
    _tagger: ferrea_agent::kernel::vlan::VlanTagger,
}

impl std::fmt::Debug for VlanGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VlanGateway")
    }
}

impl VlanGateway {
    /// Terminates VLAN `vid` in `ns` (on its `eth0`) with address `addr`.
    pub fn start(ns: &NetNs, vid: u16, addr: ipnetwork::Ipv4Network) -> anyhow::Result<Self> {
        let child = format!("v{vid}");
        ns.ip(&[
            "link", "add", &child, "link", "eth0", "type", "macvlan", "mode", "bridge",
        ])?;
        ns.ip(&["addr", "add", &addr.to_string(), "dev", &child])?;
        ns.ip(&["link", "set", &child, "up"])?;
        let tagger = ns.run(move || -> anyhow::Result<_> {
            let mut t = ferrea_agent::kernel::vlan::VlanTagger::load()?;
            t.attach("eth0", &child, vid)?;
            Ok(t)
        })?;
        Ok(VlanGateway { _tagger: tagger })
    }
}

/// `true` when one ICMP echo from `ns` to `dst` is answered within 2 s (one retry).
pub fn ping(ns: &str, dst: Ipv4Addr) -> bool {
    ping_from(ns, dst, None)
}

/// Like [`ping`], with the source address forced to `src` (`ping -I`).
pub fn ping_from(ns: &str, dst: Ipv4Addr, src: Option<Ipv4Addr>) -> bool {
    let dst = dst.to_string();
    let src = src.map(|s| s.to_string());
    let mut argv = vec!["ping", "-n", "-q", "-c", "1", "-W", "2"];
    if let Some(s) = &src {
        argv.extend(["-I", s.as_str()]);
    }
    argv.push(&dst);
    (0..2).any(|_| crate::netns::exec(ns, &argv).status.success())
}
