//! Removing conntrack entries, so that a UDP flow stops following a DNAT that no longer exists.
//!
//! A NAT binding lives in the conntrack entry of a flow, not in the rule that created it, and
//! every packet refreshes a UDP entry's timeout: a client that keeps sending to
//! `nodeIP:nodePort` after a NodePortLocal mapping was removed, or moved to a new pod IP,
//! would keep reaching the old pod forever. Like kube-proxy for Services, the agent deletes
//! the UDP entries whose original destination is a node port it no longer maps (TCP
//! connections are left to finish: deleting their entries would cut live connections).
//!
//! ctnetlink (`NETLINK_NETFILTER`) is spoken directly: a dump of the IPv4 table, the matching
//! entries picked by their original tuple, one delete per entry naming that tuple verbatim.
//! A dump-time kernel filter (`CTA_FILTER`) or a filtered flush would be shorter, but kernels
//! that do not know them ignore them, and a flush that ignores its filter empties the table.
//!
//! Written by hand because the netlink crates this workspace uses (rtnetlink and
//! netlink-packet-route) have no netfilter family. rust-netlink's `netlink-packet-netfilter`
//! has since gained a conntrack module (0.4); it has not been evaluated against this
//! workspace's netlink-packet-core yet, and moving to it is a follow-up.
//!
//! [`Conntrack`] is the side effect as a trait (the controllers hold an `Arc<dyn Conntrack>`;
//! unit tests use the recording fake in `crate::testing::conntrack`); [`NetlinkConntrack`] is
//! the Linux implementation, and [`delete_udp_to`] the same operation as a blocking function.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use async_trait::async_trait;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

/// Errors removing conntrack entries.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// ctnetlink failed (socket, dump or delete).
    #[error("deleting the UDP conntrack entries to {dst} on {ports} node ports")]
    DeleteUdp {
        /// The original destination address.
        dst: Ipv4Addr,
        /// How many destination ports were named.
        ports: usize,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The blocking netlink task did not finish (it panicked or the runtime shut down).
    #[error("deleting the UDP conntrack entries to {dst}: the netlink task failed")]
    Task {
        /// The original destination address.
        dst: Ipv4Addr,
        /// Why the task failed.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Removes conntrack entries: the one side effect of this module.
///
/// Contract of [`Conntrack::delete_udp_to`]:
/// - **Idempotent.** It deletes the IPv4 UDP entries whose *original* destination is `dst` on
///   one of `ports`, whatever is there; calling it again deletes what arrived since, and an
///   entry that vanished on its own between finding and deleting it is not an error.
/// - **No entries is success.** No matching entry, or an empty `ports`, returns `Ok(0)` (an
///   empty `ports` without asking the kernel at all). Entries of other protocols, addresses or
///   ports are never touched; TCP in particular is left to finish.
/// - **Safe concurrently.** Calls may overlap (each has its own netlink socket); two calls
///   deleting the same entry both succeed.
///
/// Returns how many entries were deleted (an entry that vanished meanwhile included).
#[async_trait]
pub trait Conntrack: Send + Sync {
    /// Deletes the IPv4 UDP entries to `dst` on one of `ports`, in the caller's network
    /// namespace (see the trait doc).
    async fn delete_udp_to(&self, dst: Ipv4Addr, ports: &[u16]) -> Result<usize, ConntrackError>;
}

/// [`Conntrack`] through ctnetlink, in the network namespace of the agent, on a blocking
/// thread.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetlinkConntrack;

#[async_trait]
impl Conntrack for NetlinkConntrack {
    async fn delete_udp_to(&self, dst: Ipv4Addr, ports: &[u16]) -> Result<usize, ConntrackError> {
        if ports.is_empty() {
            return Ok(0);
        }
        let owned = ports.to_vec();
        let n = owned.len();
        tokio::task::spawn_blocking(move || delete_udp_to(dst, &owned))
            .await
            .map_err(|source| ConntrackError::Task { dst, source })?
            .map_err(|source| ConntrackError::DeleteUdp {
                dst,
                ports: n,
                source,
            })
    }
}

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_UDP: u8 = 17;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes in `b`: (type without flags, payload, the whole attribute).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8], &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        if len < 4 || len > b.len() {
            break;
        }
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        out.push((ty, &b[4..len], &b[..len]));
        b = &b[align4(len).min(b.len())..];
    }
    out
}

fn nested(b: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(b).into_iter().find(|a| a.0 == ty).map(|a| a.1)
}

/// Whether an original tuple (the payload of `CTA_TUPLE_ORIG`) is UDP to `dst` on one of
/// `ports`.
fn tuple_matches(tuple: &[u8], dst: Ipv4Addr, ports: &[u16]) -> bool {
    let ip_ok = nested(tuple, CTA_TUPLE_IP)
        .and_then(|ip| nested(ip, CTA_IP_V4_DST))
        .is_some_and(|d| d == dst.octets());
    let Some(proto) = nested(tuple, CTA_TUPLE_PROTO) else {
        return false;
    };
    let udp = nested(proto, CTA_PROTO_NUM).is_some_and(|n| n == [IPPROTO_UDP]);
    let port = nested(proto, CTA_PROTO_DST_PORT)
        .filter(|p| p.len() == 2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]));
    ip_ok && udp && port.is_some_and(|p| ports.contains(&p))
}

/// From one conntrack message's attributes, the attributes that name the entry in a delete
/// (`CTA_TUPLE_ORIG` and, when present, `CTA_ZONE`), if it matches.
fn delete_key(entry_attrs: &[u8], dst: Ipv4Addr, ports: &[u16]) -> Option<Vec<u8>> {
    let all = attrs(entry_attrs);
    let (_, tuple, whole) = all.iter().find(|a| a.0 == CTA_TUPLE_ORIG)?;
    if !tuple_matches(tuple, dst, ports) {
        return None;
    }
    let mut key = whole.to_vec();
    key.resize(align4(key.len()), 0);
    if let Some((_, _, zone)) = all.iter().find(|a| a.0 == CTA_ZONE) {
        key.extend_from_slice(zone);
        key.resize(align4(key.len()), 0);
    }
    Some(key)
}

fn message(ty: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + body.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | ty).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_INET, version 0, res_id 0.
    m.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
    m.extend_from_slice(body);
    m
}

/// Calls `f` with each netlink message of the replies to the last request until `DONE` (for
/// a dump) or the first `ERROR` (an ack). An error reply other than 0 (and `ENOENT` when
/// `enoent_ok`) is returned as the error.
fn read_replies(
    fd: &impl AsRawFd,
    enoent_ok: bool,
    mut f: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut off = 0;
        while off + NLMSG_HDRLEN <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            if len < NLMSG_HDRLEN || off + len > n {
                return Err(std::io::Error::other("malformed netlink reply"));
            }
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            let msg = &buf[off..off + len];
            match ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code = msg
                        .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                        .unwrap_or(-libc::EINVAL);
                    return match -code {
                        0 => Ok(()),
                        libc::ENOENT if enoent_ok => Ok(()),
                        e => Err(std::io::Error::from_raw_os_error(e)),
                    };
                }
                _ => f(msg),
            }
            off += align4(len);
        }
    }
}

/// Deletes the IPv4 UDP conntrack entries, in the caller's network namespace, whose original
/// destination is `dst` on one of `ports`. Returns how many were deleted. Blocking; the
/// contract is [`Conntrack`]'s.
pub fn delete_udp_to(dst: Ipv4Addr, ports: &[u16]) -> std::io::Result<usize> {
    if ports.is_empty() {
        return Ok(0);
    }
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    let dump = message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, &[]);
    send(fd.as_raw_fd(), &dump, MsgFlags::empty())?;
    let mut keys = Vec::new();
    read_replies(&fd, false, |msg| {
        if let Some(k) = msg
            .get(NLMSG_HDRLEN + NFGENMSG_LEN..)
            .and_then(|a| delete_key(a, dst, ports))
        {
            keys.push(k);
        }
    })?;
    // Deleted after the dump: deleting while the kernel walks the table could skip entries.
    let mut deleted = 0;
    for (i, key) in keys.iter().enumerate() {
        let del = message(
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            2 + i as u32,
            key,
        );
        send(fd.as_raw_fd(), &del, MsgFlags::empty())?;
        read_replies(&fd, true, |_| {})?;
        deleted += 1;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(align4(a.len()), 0);
        a
    }

    fn entry(dst: [u8; 4], proto: u8, dport: u16, zone: bool) -> Vec<u8> {
        let ip = [attr(1, &[10, 0, 0, 1]), attr(CTA_IP_V4_DST, &dst)].concat();
        let pr = [
            attr(CTA_PROTO_NUM, &[proto]),
            attr(2, &40000u16.to_be_bytes()),
            attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
        ]
        .concat();
        let tuple = [
            attr(CTA_TUPLE_IP | 0x8000, &ip),
            attr(CTA_TUPLE_PROTO | 0x8000, &pr),
        ]
        .concat();
        let mut e = [
            attr(CTA_TUPLE_ORIG | 0x8000, &tuple),
            attr(2 | 0x8000, &tuple),
        ]
        .concat();
        if zone {
            e.extend(attr(CTA_ZONE, &7u16.to_be_bytes()));
        }
        e
    }

    #[test]
    fn picks_udp_entries_to_the_node_port_and_names_them_by_their_original_tuple() {
        let node = Ipv4Addr::new(172, 18, 0, 11);
        let e = entry([172, 18, 0, 11], 17, 61000, false);
        let key = delete_key(&e, node, &[61000, 61001]).expect("matches");
        // The key is exactly the original tuple attribute (first attribute of the entry).
        let orig_len = usize::from(u16::from_ne_bytes([e[0], e[1]]));
        assert_eq!(key, e[..align4(orig_len)]);
        assert!(delete_key(&e, node, &[61002]).is_none(), "other port");
        assert!(delete_key(&e, Ipv4Addr::new(172, 18, 0, 12), &[61000]).is_none());
        let tcp = entry([172, 18, 0, 11], 6, 61000, false);
        assert!(
            delete_key(&tcp, node, &[61000]).is_none(),
            "TCP is left alone"
        );
        let zoned = entry([172, 18, 0, 11], 17, 61000, true);
        let key = delete_key(&zoned, node, &[61000]).unwrap();
        assert!(
            key.len() > align4(orig_len),
            "zone not carried into the delete"
        );
    }

    #[test]
    fn truncated_attributes_are_ignored() {
        let e = entry([172, 18, 0, 11], 17, 61000, false);
        assert!(delete_key(&e[..10], Ipv4Addr::new(172, 18, 0, 11), &[61000]).is_none());
        assert!(attrs(&[8, 0, 1]).is_empty());
    }
}
