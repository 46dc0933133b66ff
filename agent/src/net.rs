//! The node's packet-path contracts that every part of the agent agrees on: the names of
//! the gateway and tunnel devices, the overlay's tunnel key, how Egress marks packets, and the
//! facts of the transport interface and tunnel. A leaf: it depends on nothing but
//! [`crate::config`], so the kernel adapters, the dataplanes and the controllers can all share
//! it without depending on each other.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// The pods' gateway in `cidr`: its first host address.
pub fn gateway_of(cidr: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

/// `cidrs` without those another one contains (and without duplicates), sorted: what nft's
/// anonymous interval sets accept (they refuse overlapping elements) and the shortest list
/// that matches the same addresses.
pub fn outermost(cidrs: impl IntoIterator<Item = Ipv4Network>) -> Vec<Ipv4Network> {
    let mut all: Vec<Ipv4Network> = cidrs
        .into_iter()
        .map(|c| Ipv4Network::new(c.network(), c.prefix()).expect("the same prefix is valid"))
        .collect();
    // Shorter prefixes first, so a CIDR is only compared with those that could contain it.
    all.sort_by_key(|c| (c.prefix(), c.network()));
    let mut out: Vec<Ipv4Network> = Vec::with_capacity(all.len());
    for c in all {
        if !out.iter().any(|o| o.contains(c.network())) {
            out.push(c);
        }
    }
    out.sort();
    out
}

/// The transport interface: where this node's traffic to other nodes leaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transport {
    /// Interface name.
    pub ifname: String,
    /// Interface index.
    pub ifindex: u32,
    /// This node's address on it: the tunnel's outer source.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// Its MTU.
    pub mtu: u32,
}

/// The encapsulation between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// VXLAN or Geneve.
    pub kind: crate::config::TunnelType,
    /// UDP destination port.
    pub port: u16,
}

/// The node's gateway device, which carries the pod CIDR's gateway address (both backends:
/// a veth end for eBPF, OVS's internal port for OVS).
pub const GATEWAY_IFNAME: &str = "ferrea-gw0";

/// Name of the tunnel device (eBPF) or tunnel port (OVS) on every node.
pub const TUNNEL_IFNAME: &str = "ferrea-tun0";

/// The virtual network identifier on the wire. One overlay per cluster, so one VNI; flows and
/// programs set the remote per packet.
pub const TUNNEL_VNI: u32 = 0;

/// An Egress id: one per egress IP in the cluster, 1..=[`ferrea_common::EGRESS_ID_MAX`]. It
/// is the VNI that carries a steered pod's packets to the egress node and, there, the fwmark
/// bits ([`egress_mark`]) that pick the IP's SNAT and route table.
pub type EgressId = u16;

/// The mask of the fwmark bits ferrea's Egress uses: the upper 16 bits carry an Egress id, so
/// marks other software sets in the lower bits (kube-proxy's 0x4000/0x8000, ferrea's own
/// service masquerade mark) neither disturb nor are disturbed.
pub const EGRESS_MARK_MASK: u32 = ferrea_common::EGRESS_MARK_MASK;

/// The fwmark value of Egress `id` (within [`EGRESS_MARK_MASK`]).
pub fn egress_mark(id: EgressId) -> u32 {
    u32::from(id) << ferrea_common::EGRESS_MARK_SHIFT
}

/// The source MAC by which the OVS backend tells the node's stack that a packet it hands to
/// the gateway port belongs to Egress `id` (the userspace datapath cannot pass a packet mark
/// through a tap device). ferrea's nftables table turns it into the fwmark of `id`.
pub fn egress_marker_mac(id: EgressId) -> [u8; 6] {
    let [hi, lo] = id.to_be_bytes();
    [0x0a, 0xfe, 0x00, 0x00, hi, lo]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<Ipv4Network> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn outermost_drops_contained_and_duplicate_cidrs() {
        let got = outermost(nets(&[
            "10.244.2.0/24",
            "10.96.0.0/12",
            "10.244.0.0/16",
            "10.244.2.0/24",
            "192.168.5.0/24",
            "10.244.1.7/24",
        ]));
        assert_eq!(
            got,
            nets(&["10.96.0.0/12", "10.244.0.0/16", "192.168.5.0/24"])
        );
        assert_eq!(outermost(Vec::new()), Vec::<Ipv4Network>::new());
        // Disjoint siblings both stay.
        assert_eq!(
            outermost(nets(&["10.244.1.0/24", "10.244.0.0/24"])),
            nets(&["10.244.0.0/24", "10.244.1.0/24"])
        );
    }
}
