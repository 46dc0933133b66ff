//! TX checksum offload, switched off on devices whose packets the dataplane cannot finish
//! (today: OVS's userspace datapath when it tunnels).
//!
//! A Linux sender with TX checksum offload hands its device TCP and UDP packets whose
//! checksum is left for the "hardware" to fill in. For a tap or veth read by ovs-vswitchd
//! (netdev datapath) that hardware is OVS; Open vSwitch 3.1 completes such checksums for
//! plain output, but not for a packet it encapsulates in VXLAN or Geneve: the inner checksum
//! stays wrong and the receiving pod drops every TCP segment (seen with OVS 3.1: the
//! segments arrive with a bad inner TCP checksum and the pod's stack discards them). So the senders must
//! compute checksums themselves: for the node's own traffic to remote pods that is the
//! gateway device, which the OVS backend owns; pods need the same on their `eth0`, which the
//! agent core sets while it configures the pod side (see `podnet`).
//!
//! The switch goes through the classic `SIOCETHTOOL` ioctl (`ETHTOOL_STXCSUM`), which every
//! kernel supports and which needs no extra crate.

use std::os::fd::AsRawFd;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

/// `ETHTOOL_STXCSUM` (linux/ethtool.h): set TX checksum offload on or off.
const ETHTOOL_STXCSUM: u32 = 0x0000_0017;
/// `ETHTOOL_GTXCSUM`: read it.
const ETHTOOL_GTXCSUM: u32 = 0x0000_0016;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[expect(
    unsafe_code,
    reason = "SIOCETHTOOL has no safe wrapper in nix or libc; each unsafe block says why it is sound"
)]
fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> std::io::Result<u32> {
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid interface name {ifname:?}"),
        ));
    }
    // Any socket of the current network namespace can carry the ioctl.
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of plain fields) for which
    // all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: SIOCETHTOOL reads `ifr` (a NUL-terminated name shorter than IFNAMSIZ, zeroed
    // above) and the `ethtool_value` its data pointer names, which lives until the call
    // returns; the kernel writes back at most that `ethtool_value`.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value.data)
}

/// Turns TX checksum offload off on `ifname` (in the calling thread's network namespace), if
/// it is on. Returns whether it changed anything.
pub fn disable_tx_checksum(ifname: &str) -> std::io::Result<bool> {
    if ethtool_value(ifname, ETHTOOL_GTXCSUM, 0)? == 0 {
        return Ok(false);
    }
    ethtool_value(ifname, ETHTOOL_STXCSUM, 0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names_and_missing_devices() {
        assert!(disable_tx_checksum("").is_err());
        assert!(disable_tx_checksum("a-name-far-too-long").is_err());
        let e = disable_tx_checksum("ferrea-nosuch9").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
    }
}
