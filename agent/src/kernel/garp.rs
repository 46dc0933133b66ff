//! Gratuitous ARP: announcing that an address now lives behind an interface, so the gateway
//! and neighbours learn its new holder at once. [`Garp`] is the side effect; [`RawSocketGarp`]
//! its Linux implementation, through [`FrameSocket`] (a raw `AF_PACKET` socket: no crate does
//! this small thing, and `arping` is not something a node agent should depend on).

use std::net::Ipv4Addr;

/// Sending a gratuitous ARP failed.
#[derive(Debug, thiserror::Error)]
#[error("gratuitous ARP for {ip} out of ifindex {ifindex}: {op}")]
pub struct GarpError {
    /// What failed (`opening an AF_PACKET socket`, `sending`).
    pub op: &'static str,
    /// The interface.
    pub ifindex: u32,
    /// The address announced.
    pub ip: Ipv4Addr,
    /// The system's answer.
    #[source]
    pub source: std::io::Error,
}

/// Sends gratuitous ARPs.
///
/// Contract: [`Garp::announce`] sends one frame; it changes no state, so repeating it is
/// harmless (idempotent in effect) and calls are safe concurrently. A missing interface fails.
pub trait Garp: Send + Sync {
    /// Sends one gratuitous ARP (a request for `ip` from `ip`, to broadcast) out of
    /// `ifindex`, from `mac` (the interface's own).
    fn announce(&self, ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> Result<(), GarpError>;
}

/// [`Garp`] through a raw `AF_PACKET` socket opened per announcement, in the caller's
/// network namespace.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawSocketGarp;

impl Garp for RawSocketGarp {
    fn announce(&self, ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> Result<(), GarpError> {
        send_garp(ifindex, mac, ip).map_err(|(op, source)| GarpError {
            op,
            ifindex,
            ip,
            source,
        })
    }
}

/// The 42-byte Ethernet frame of a gratuitous ARP for `ip` from `mac`.
fn frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut frame = [0u8; 42];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&ip.octets());
    frame[32..38].copy_from_slice(&[0; 6]);
    frame[38..42].copy_from_slice(&ip.octets());
    frame
}

fn send_garp(
    ifindex: u32,
    mac: [u8; 6],
    ip: Ipv4Addr,
) -> Result<(), (&'static str, std::io::Error)> {
    let socket =
        FrameSocket::open(ifindex, ETH_P_ARP).map_err(|e| ("opening an AF_PACKET socket", e))?;
    socket.send(&frame(mac, ip)).map_err(|e| ("sending", e))
}

/// The ARP ethertype.
const ETH_P_ARP: u16 = 0x0806;

/// A raw `AF_PACKET` socket that sends whole Ethernet frames (header included, as given) out
/// of one interface of the network namespace it was opened in. It is bound to no protocol, so
/// it never queues a received frame.
pub struct FrameSocket {
    fd: std::os::fd::OwnedFd,
    ifindex: u32,
    protocol: u16,
}

impl std::fmt::Debug for FrameSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSocket")
            .field("ifindex", &self.ifindex)
            .field("protocol", &format_args!("{:#06x}", self.protocol))
            .finish()
    }
}

#[expect(
    unsafe_code,
    reason = "socket(2) and sendto(2) of a raw AF_PACKET frame have no safe wrapper in the crates used"
)]
impl FrameSocket {
    /// Opens the socket for frames out of `ifindex`, handed to the driver as ethertype
    /// `protocol` (host order; the frames' own header says what they carry).
    pub fn open(ifindex: u32, protocol: u16) -> std::io::Result<Self> {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: plain socket(2) with constant arguments; the fd is owned at once below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            ifindex,
            protocol,
        })
    }

    /// Sends one frame. A full transmit queue comes back as `ENOBUFS`, for the caller to wait
    /// out or give up on.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: sockaddr_ll is plain old data; zero is valid for every field.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = self.protocol.to_be();
        sa.sll_ifindex = self.ifindex as i32;
        sa.sll_halen = 6;
        if let Some(dst) = frame.get(0..6) {
            sa.sll_addr[..6].copy_from_slice(dst);
        }
        // SAFETY: frame and sa outlive the call; the lengths passed are theirs.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn frame_is_a_broadcast_arp_request_for_the_ip_from_itself() {
        let f = super::frame([2, 0, 0, 0, 0, 7], [10, 0, 0, 5].into());
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &[10, 0, 0, 5]);
        assert_eq!(&f[38..42], &[10, 0, 0, 5]);
    }
}
