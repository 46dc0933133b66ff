//! Hand-made Ethernet frames sent from inside a namespace, for the hostile-pod tests: what a
//! compromised pod can put on its interface without the kernel's stack shaping it (IPv6
//! with IPv6 disabled, ARP claiming another pod's address, a flood of ARP requests).
//!
//! Sent through the agent's raw `AF_PACKET` socket (`FrameSocket`) on a thread that entered the namespace
//! ([`NetNs::run`]); no tool such as `arping` or `scapy` is needed on the machine.

use std::net::Ipv4Addr;

use anyhow::Context;
use ferrea_agent::kernel::garp::FrameSocket;

use crate::netns::NetNs;

/// `ETH_P_ALL`, as the protocol the frames are handed to the driver with (each frame's own
/// header says what it carries).
const ETH_P_ALL: u16 = 0x0003;

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<u8> = s
        .trim()
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {s:?}"))?;
    parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {s:?}: not six octets"))
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    // Pad to the Ethernet minimum (60 bytes without the FCS).
    f.resize(f.len().max(60), 0);
    f
}

/// An ICMPv6 echo request from the link-local address of `src` to all nodes (`ff02::1`), as
/// `ping -6 ff02::1%eth0` sends it (the checksum is not computed: nothing should ever see it).
pub fn ipv6_echo(src: [u8; 6]) -> Vec<u8> {
    let icmp = [128u8, 0, 0, 0, 0, 1, 0, 1];
    let mut ip = Vec::with_capacity(40 + icmp.len());
    ip.extend_from_slice(&[0x60, 0, 0, 0]);
    ip.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    ip.push(58); // ICMPv6
    ip.push(255);
    // fe80::<EUI-64 of src>
    let mut ll = [0u8; 16];
    ll[0] = 0xfe;
    ll[1] = 0x80;
    ll[8..11].copy_from_slice(&[src[0] ^ 0x02, src[1], src[2]]);
    ll[11] = 0xff;
    ll[12] = 0xfe;
    ll[13..16].copy_from_slice(&src[3..6]);
    ip.extend_from_slice(&ll);
    let mut all_nodes = [0u8; 16];
    all_nodes[0] = 0xff;
    all_nodes[1] = 0x02;
    all_nodes[15] = 1;
    ip.extend_from_slice(&all_nodes);
    ip.extend_from_slice(&icmp);
    ethernet([0x33, 0x33, 0, 0, 0, 1], src, 0x86dd, &ip)
}

/// A broadcast ARP request from `src_mac` claiming `sender_ip`, asking for `target_ip`.
pub fn arp_request(src_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut arp = Vec::with_capacity(28);
    arp.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    arp.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    arp.extend_from_slice(&[6, 4]);
    arp.extend_from_slice(&1u16.to_be_bytes()); // request
    arp.extend_from_slice(&src_mac);
    arp.extend_from_slice(&sender_ip.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target_ip.octets());
    ethernet([0xff; 6], src_mac, 0x0806, &arp)
}

/// Sends every frame of `frames`, `repeat` times over, out of `ifname` inside `ns`, `pace`
/// apart (`None`: as fast as the socket takes them, a flood). Returns how many were sent (a
/// full socket buffer is waited out). Pace frames that must all be counted: a flood overflows
/// the receive queue of a userspace switch (`ovs-vswitchd`) before its flows see the frames.
pub fn send(
    ns: &NetNs,
    ifname: &str,
    frames: Vec<Vec<u8>>,
    repeat: usize,
    pace: Option<std::time::Duration>,
) -> anyhow::Result<usize> {
    let ifname = ifname.to_owned();
    ns.run(move || send_here(&ifname, &frames, repeat, pace))
}

fn send_here(
    ifname: &str,
    frames: &[Vec<u8>],
    repeat: usize,
    pace: Option<std::time::Duration>,
) -> anyhow::Result<usize> {
    let ifindex =
        nix::net::if_::if_nametoindex(ifname).with_context(|| format!("ifindex of {ifname}"))?;
    let socket = FrameSocket::open(ifindex, ETH_P_ALL).context("opening an AF_PACKET socket")?;
    let mut sent = 0;
    for _ in 0..repeat {
        for f in frames {
            loop {
                match socket.send(f) {
                    Ok(()) => {
                        sent += 1;
                        if let Some(p) = pace {
                            std::thread::sleep(p);
                        }
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("sending a frame out of {ifname}"));
                    }
                }
            }
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_their_ethertype_and_addresses() {
        let mac = parse_mac("0a:58:0a:f4:01:05").unwrap();
        let v6 = ipv6_echo(mac);
        assert_eq!(&v6[12..14], &[0x86, 0xdd]);
        assert_eq!(&v6[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(v6[14 + 6], 58);
        let arp = arp_request(
            mac,
            "10.244.1.9".parse().unwrap(),
            "10.244.1.1".parse().unwrap(),
        );
        assert_eq!(&arp[12..14], &[0x08, 0x06]);
        assert_eq!(&arp[14 + 14..14 + 18], &[10, 244, 1, 9]);
        assert_eq!(&arp[14 + 24..14 + 28], &[10, 244, 1, 1]);
        assert_eq!(arp.len(), 60);
        assert!(parse_mac("0a:58").is_err());
    }
}
