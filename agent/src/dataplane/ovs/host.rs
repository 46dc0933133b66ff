//! The node's kernel as the OVS backend changes it: the gateway device's address, the pod
//! ports' sysctls, the routes to other nodes' pods, ARP probes. Behind [`NodeKernel`] so the
//! backend's logic runs in unit tests without root.
//!
//! Not behind it: the userspace datapath's move of the node's configuration to the physical
//! bridge ([`super::uplink`]), which only the root integration tests exercise.

use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;

use super::{ERR, GATEWAY_IFNAME, wait_link};
use crate::dataplane::{DataplaneError, NodeNetwork};
use crate::kernel::routes::{self, NodeRoute};
use crate::kernel::sysctl::SysctlError;

/// The kernel side effects of the OVS backend, in the node's network namespace.
///
/// Contract: every method is idempotent and touches only what it names (the gateway device,
/// one pod port's sysctls, ferrea's own routes); safe to call concurrently.
///
/// Implementations: [`LinuxHost`] and, for tests, `testing::ovs::FakeHost` (records).
#[async_trait]
pub trait NodeKernel: Send + Sync {
    /// Waits for the gateway device (vswitchd creates it with its port), sets it up with
    /// `gateway/prefix` of the pod CIDR; with `tx_checksum_off` also turns its TX checksum
    /// offload off (OVS's userspace tunnels cannot complete the checksums of the node's own
    /// packets to remote pods).
    async fn configure_gateway(
        &self,
        node: &NodeNetwork,
        tx_checksum_off: bool,
    ) -> Result<(), DataplaneError>;

    /// The index of the kernel device `name`.
    fn ifindex(&self, name: &str) -> Result<u32, nix::errno::Errno>;

    /// Keeps the node's own IP stack out of a pod port's traffic: on the host-side veth
    /// `ifname`, `arp_ignore=8`, `forwarding=0`, `rp_filter=1`.
    fn isolate_port(&self, ifname: &str) -> Result<(), SysctlError>;

    /// Makes ferrea's node routes in the main table exactly `want`; returns how many routes
    /// were removed.
    async fn sync_routes(&self, want: &[NodeRoute]) -> Result<usize, DataplaneError>;

    /// Makes the node's stack resolve these addresses' MACs now (best effort).
    fn resolve_neighbours(&self, ips: &[Ipv4Addr]);
}

/// [`NodeKernel`] through netlink, sysctl files, the ethtool ioctl and a UDP socket, in the
/// calling thread's network namespace.
pub struct LinuxHost;

#[async_trait]
impl NodeKernel for LinuxHost {
    async fn configure_gateway(
        &self,
        node: &NodeNetwork,
        tx_checksum_off: bool,
    ) -> Result<(), DataplaneError> {
        let idx = wait_link(GATEWAY_IFNAME).await?;
        if tx_checksum_off {
            match crate::kernel::offload::disable_tx_checksum(GATEWAY_IFNAME) {
                Ok(true) => tracing::info!(
                    device = GATEWAY_IFNAME,
                    "TX checksum offload off (userspace tunnels)"
                ),
                Ok(false) => {}
                Err(e) => {
                    return Err(ERR.init(
                        "turn TX checksum offload off on",
                        format!("interface {GATEWAY_IFNAME}"),
                    )(e));
                }
            }
        }
        let (conn, nl, _) = rtnetlink::new_connection().map_err(ERR.init(
            "open a netlink socket for",
            format!("interface {GATEWAY_IFNAME}"),
        ))?;
        let task = tokio::spawn(conn);
        let res = async {
            nl.link()
                .set(rtnetlink::LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(ERR.init("set up", format!("interface {GATEWAY_IFNAME}")))?;
            nl.address()
                .add(idx, IpAddr::V4(node.gateway), node.pod_cidr.prefix())
                .replace()
                .execute()
                .await
                .map_err(ERR.init(
                    "add the gateway address to",
                    format!(
                        "interface {GATEWAY_IFNAME} ({}/{})",
                        node.gateway,
                        node.pod_cidr.prefix()
                    ),
                ))
        }
        .await;
        task.abort();
        res
    }

    fn ifindex(&self, name: &str) -> Result<u32, nix::errno::Errno> {
        nix::net::if_::if_nametoindex(name)
    }

    fn isolate_port(&self, ifname: &str) -> Result<(), SysctlError> {
        for (key, value) in [("arp_ignore", "8"), ("forwarding", "0"), ("rp_filter", "1")] {
            crate::kernel::sysctl::ensure(&format!("net.ipv4.conf.{ifname}.{key}"), value)?;
        }
        Ok(())
    }

    async fn sync_routes(&self, want: &[NodeRoute]) -> Result<usize, DataplaneError> {
        let (conn, h, _) = rtnetlink::new_connection()
            .map_err(ERR.other("open a netlink socket for", "remote node routes"))?;
        let task = tokio::spawn(conn);
        let r = routes::sync(&h, want).await;
        task.abort();
        r.map_err(ERR.other("sync", "remote node routes"))
    }

    /// One UDP datagram to the discard port of each address (a failure only means the first
    /// packet waits for ARP).
    fn resolve_neighbours(&self, ips: &[Ipv4Addr]) {
        let Ok(sock) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
            return;
        };
        for ip in ips {
            if let Err(e) = sock.send_to(&[0], (*ip, 9)) {
                tracing::debug!(%ip, error = %e, "probing a remote node");
            }
        }
    }
}
