//! `ferreactl trace`: one constructed packet from a local pod through the backend's real packet
//! path, and what each stage decided. The backends fill [`PacketTrace`] from the packet path
//! itself, never from a model of it: the eBPF backend runs its attached programs on the packet
//! with `BPF_PROG_TEST_RUN` and reads the trace record the programs write for it
//! (`ebpf/src/lib.rs`, `ferrea_common::MAP_TRACE`); the OVS backend asks `ovs-vswitchd` for
//! `ofproto/trace` of the packet's flow on the integration bridge ([`super::ovs::trace`]).
//!
//! The packet is what the pod would send to its gateway: from the pod's MAC (or another, to
//! test the spoof guard) to the MAC the node answers the pod's ARP with, IPv4 with TTL 64; TCP
//! is a segment of an established connection (`ACK`, so that the eBPF programs' stack-flow
//! bookkeeping, which a `SYN` clears, is left as it is), from source port
//! [`TRACE_SOURCE_PORT`]; UDP from the same port; ICMP an echo request.

use std::net::Ipv4Addr;

use super::PodEndpoint;

/// The source port of traced TCP and UDP packets.
pub const TRACE_SOURCE_PORT: u16 = 40000;

/// The transport protocol of a traced packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceProto {
    /// TCP (an `ACK` segment to the destination port).
    Tcp,
    /// UDP (an empty datagram to the destination port).
    Udp,
    /// ICMP (an echo request; no port).
    Icmp,
}

impl TraceProto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            TraceProto::Tcp => 6,
            TraceProto::Udp => 17,
            TraceProto::Icmp => 1,
        }
    }

    /// The name `ferreactl` and OpenFlow use (`tcp`, `udp`, `icmp`).
    pub fn as_str(self) -> &'static str {
        match self {
            TraceProto::Tcp => "tcp",
            TraceProto::Udp => "udp",
            TraceProto::Icmp => "icmp",
        }
    }
}

/// A packet a local pod sends, to trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracePacket {
    /// The sending pod's endpoint.
    pub src: PodEndpoint,
    /// The source address in the packet: the pod's own, or another one (a spoofed source).
    pub src_ip: Ipv4Addr,
    /// The source MAC in the frame: the pod's own, or another one.
    pub src_mac: [u8; 6],
    /// The destination address.
    pub dst: Ipv4Addr,
    /// The protocol.
    pub proto: TraceProto,
    /// The destination port (TCP and UDP; `None` for ICMP).
    pub dst_port: Option<u16>,
}

/// One decision on the way: which stage (a program on an interface, an OpenFlow table) and
/// what it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceStep {
    /// `ferrea_from_pod on fe1234…`, `table 10 SpoofGuard`.
    pub stage: String,
    /// What it did, in a few words (the verdict, the flow matched and its actions).
    pub action: String,
}

/// Where the packet ends up on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceVerdict {
    /// Delivered to a local pod.
    ToPod {
        /// The destination pod's address (its endpoint's).
        ip: Ipv4Addr,
        /// Where it was sent: the pod's host veth or its OVS port.
        interface: String,
    },
    /// Handed to the node's IP stack (which routes it on, masquerading what leaves the
    /// cluster and marking Egress traffic this node holds the IP of).
    ToStack {
        /// Why the dataplane did not carry it itself.
        reason: String,
    },
    /// Encapsulated to another node.
    Tunnel {
        /// The outer destination: the other node's transport address.
        node_ip: Ipv4Addr,
        /// The tunnel key: [`super::TUNNEL_VNI`] for the overlay, an Egress id for a pod
        /// steered to the node holding its Egress IP.
        vni: u32,
    },
    /// Dropped.
    Dropped {
        /// By the spoof guard: the source address or MAC is not the pod's.
        spoof_guard: bool,
        /// Where and why.
        reason: String,
    },
}

/// What [`super::Dataplane::trace`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketTrace {
    /// The stages the packet went through, in order.
    pub steps: Vec<TraceStep>,
    /// Where it ends up.
    pub verdict: TraceVerdict,
}

/// The frame of `p` as the pod would put it on its `eth0`: to `dst_mac` (the MAC the node
/// answers the pod's ARP with), with correct IPv4, TCP, UDP and ICMP checksums.
pub fn frame(p: &TracePacket, dst_mac: [u8; 6]) -> Vec<u8> {
    let l4 = l4_header(p);
    let total = 20 + l4.len();
    let mut f = Vec::with_capacity(14 + total);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&p.src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x7ace_u16.to_be_bytes()); // identification
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = p.proto.number();
    ip[12..16].copy_from_slice(&p.src_ip.octets());
    ip[16..20].copy_from_slice(&p.dst.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// The transport header of `p`, with its checksum.
fn l4_header(p: &TracePacket) -> Vec<u8> {
    let port = p.dst_port.unwrap_or(0);
    let mut h = match p.proto {
        TraceProto::Tcp => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&TRACE_SOURCE_PORT.to_be_bytes());
            h[2..4].copy_from_slice(&port.to_be_bytes());
            h[4..8].copy_from_slice(&1u32.to_be_bytes()); // seq
            h[8..12].copy_from_slice(&1u32.to_be_bytes()); // ack
            h[12] = 5 << 4; // data offset
            h[13] = 0x10; // ACK
            h[14..16].copy_from_slice(&64240u16.to_be_bytes()); // window
            h
        }
        TraceProto::Udp => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&TRACE_SOURCE_PORT.to_be_bytes());
            h[2..4].copy_from_slice(&port.to_be_bytes());
            h[4..6].copy_from_slice(&8u16.to_be_bytes());
            h
        }
        TraceProto::Icmp => {
            let mut h = vec![0u8; 8];
            h[0] = 8; // echo request
            h[4..6].copy_from_slice(&0x7ace_u16.to_be_bytes()); // identifier
            h[6..8].copy_from_slice(&1u16.to_be_bytes()); // sequence
            h
        }
    };
    let (at, c) = match p.proto {
        TraceProto::Icmp => (2, checksum(&[&h])),
        proto => {
            let mut pseudo = [0u8; 12];
            pseudo[0..4].copy_from_slice(&p.src_ip.octets());
            pseudo[4..8].copy_from_slice(&p.dst.octets());
            pseudo[9] = proto.number();
            pseudo[10..12].copy_from_slice(&(h.len() as u16).to_be_bytes());
            let at = if proto == TraceProto::Tcp { 16 } else { 6 };
            (at, checksum(&[&pseudo, &h]))
        }
    };
    h[at..at + 2].copy_from_slice(&c.to_be_bytes());
    h
}

/// The Internet checksum (RFC 1071) of the concatenated parts (each of even length, as every
/// header here is).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for p in parts {
        for w in p.chunks(2) {
            let hi = u32::from(w[0]) << 8;
            let lo = w.get(1).copied().map_or(0, u32::from);
            sum += hi | lo;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(proto: TraceProto, port: Option<u16>) -> TracePacket {
        TracePacket {
            src: PodEndpoint {
                container_id: "c".into(),
                host_ifname: "fe0".into(),
                host_ifindex: 7,
                host_mac: [2, 0, 0, 0, 0, 1],
                pod_mac: [2, 0, 0, 0, 0, 2],
                ip: Ipv4Addr::new(10, 244, 1, 5),
            },
            src_ip: Ipv4Addr::new(10, 244, 1, 5),
            src_mac: [2, 0, 0, 0, 0, 2],
            dst: Ipv4Addr::new(10, 244, 2, 9),
            proto,
            dst_port: port,
        }
    }

    /// A header whose checksum field is right sums to 0xffff (its checksum is 0).
    fn verifies(parts: &[&[u8]]) -> bool {
        checksum(parts) == 0
    }

    #[test]
    fn frames_carry_the_addresses_and_valid_checksums() {
        for (proto, port, l4_len) in [
            (TraceProto::Tcp, Some(80), 20),
            (TraceProto::Udp, Some(53), 8),
            (TraceProto::Icmp, None, 8),
        ] {
            let p = packet(proto, port);
            let f = frame(&p, [2, 0, 0, 0, 0, 1]);
            assert_eq!(f.len(), 14 + 20 + l4_len, "{proto:?}");
            assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 1]);
            assert_eq!(&f[6..12], &p.src_mac);
            assert_eq!(&f[12..14], &[0x08, 0x00]);
            assert_eq!(&f[26..30], &[10, 244, 1, 5]);
            assert_eq!(&f[30..34], &[10, 244, 2, 9]);
            assert_eq!(f[23], proto.number());
            assert!(verifies(&[&f[14..34]]), "{proto:?} IPv4 checksum");
            let l4 = &f[34..];
            match proto {
                TraceProto::Icmp => {
                    assert_eq!(l4[0], 8, "echo request");
                    assert!(verifies(&[l4]), "ICMP checksum");
                }
                _ => {
                    assert_eq!(u16::from_be_bytes([l4[0], l4[1]]), TRACE_SOURCE_PORT);
                    assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), port.unwrap());
                    let mut pseudo = [0u8; 12];
                    pseudo[0..4].copy_from_slice(&f[26..30]);
                    pseudo[4..8].copy_from_slice(&f[30..34]);
                    pseudo[9] = proto.number();
                    pseudo[10..12].copy_from_slice(&(l4.len() as u16).to_be_bytes());
                    assert!(verifies(&[&pseudo, l4]), "{proto:?} checksum");
                }
            }
        }
        // TCP: an ACK, never a SYN (which would clear stack-flow records).
        let f = frame(&packet(TraceProto::Tcp, Some(80)), [0; 6]);
        assert_eq!(f[34 + 13], 0x10);
    }

    #[test]
    fn a_spoofed_source_is_what_the_frame_carries() {
        let mut p = packet(TraceProto::Icmp, None);
        p.src_ip = Ipv4Addr::new(192, 0, 2, 77);
        p.src_mac = [2, 0, 0, 0, 0, 0x99];
        let f = frame(&p, [0; 6]);
        assert_eq!(&f[26..30], &[192, 0, 2, 77]);
        assert_eq!(&f[6..12], &[2, 0, 0, 0, 0, 0x99]);
    }
}
