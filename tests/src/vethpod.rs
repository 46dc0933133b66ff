//! Pods without CNI: a namespace wired to a node by a veth pair the harness makes itself,
//! configured the way the agent core configures a pod. For tests that drive a dataplane
//! backend directly (no agent process, no CNI binary), where the test plays the agent core's
//! part and hands the backend the endpoint.
//!
//! The host end lives in the node namespace, the pod end (`eth0`) in the pod namespace; both
//! are created with `ip -n <node>`, never in the root namespace. Dropping a [`VethPod`]
//! deletes its namespace, which destroys the pair.

use std::net::Ipv4Addr;

use anyhow::Context;

use crate::netns::NetNs;

/// How to wire one pod.
#[derive(Clone, Debug)]
pub struct VethPodSpec {
    /// Name of the host end in the node namespace (at most 15 characters).
    pub host_ifname: String,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// Prefix length of the address on the pod's `eth0`.
    pub prefix: u8,
    /// The pod's default gateway.
    pub gateway: Ipv4Addr,
    /// MAC of the host end.
    pub host_mac: [u8; 6],
    /// MAC of the pod's `eth0`.
    pub pod_mac: [u8; 6],
}

/// A pod namespace attached to a node by a veth pair; the namespace is deleted on drop.
#[derive(Debug)]
pub struct VethPod {
    spec: VethPodSpec,
    host_ifindex: u32,
    ns: NetNs,
}

impl VethPod {
    /// Creates a pod namespace (`unique_name(role)`) and the pair: host end `spec.host_ifname`
    /// up in `node`; `eth0` in the pod, up, with `spec.ip/prefix` and a default route via
    /// `spec.gateway`.
    pub fn create(node: &NetNs, role: &str, spec: VethPodSpec) -> anyhow::Result<VethPod> {
        let ns = NetNs::new(role)?;
        let host = spec.host_ifname.as_str();
        node.ip(&[
            "link",
            "add",
            host,
            "address",
            &mac_str(spec.host_mac),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            &mac_str(spec.pod_mac),
            "netns",
            ns.name(),
        ])
        .with_context(|| format!("creating veth {host} for pod {}", spec.ip))?;
        node.ip(&["link", "set", host, "up"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/{}", spec.ip, spec.prefix),
            "dev",
            "eth0",
        ])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &spec.gateway.to_string(),
            "dev",
            "eth0",
        ])?;
        let host_ifindex = ifindex(node, host)?;
        Ok(VethPod {
            spec,
            host_ifindex,
            ns,
        })
    }

    /// The pod's namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// How it was wired.
    pub fn spec(&self) -> &VethPodSpec {
        &self.spec
    }

    /// The pod's address.
    pub fn ip(&self) -> Ipv4Addr {
        self.spec.ip
    }

    /// The host end's name.
    pub fn host_ifname(&self) -> &str {
        &self.spec.host_ifname
    }

    /// The host end's ifindex in the node namespace.
    pub fn host_ifindex(&self) -> u32 {
        self.host_ifindex
    }

    /// `true` when the pod gets an answer to ICMP echo from `dst` (see [`crate::fabric::ping`]).
    pub fn ping(&self, dst: Ipv4Addr) -> bool {
        crate::fabric::ping(self.name(), dst)
    }
}

/// Creates a veth pair with both ends in `node` (`host_ifname` up, `peer` down): an
/// interface a backend can attach as a pod whose pod side is gone, without a namespace to
/// clean up. Returns the host end's ifindex. The pair goes away with the node namespace.
pub fn dangling_veth(node: &NetNs, host_ifname: &str, peer: &str) -> anyhow::Result<u32> {
    node.ip(&[
        "link",
        "add",
        host_ifname,
        "type",
        "veth",
        "peer",
        "name",
        peer,
    ])
    .with_context(|| format!("creating veth {host_ifname}"))?;
    node.ip(&["link", "set", host_ifname, "up"])?;
    ifindex(node, host_ifname)
}

/// The ifindex of `ifname` in `ns`.
pub fn ifindex(ns: &NetNs, ifname: &str) -> anyhow::Result<u32> {
    let out = ns.ip(&["-o", "link", "show", "dev", ifname])?;
    out.split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .with_context(|| format!("parsing the ifindex of {ifname} from {out:?}"))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MAC the agent core gives a pod: `0a:58` followed by its IPv4 address (as Antrea and
/// the reference bridge plugin do).
pub fn pod_mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}
