//! Pieces shared by the backend tests (`ebpf_dataplane`, `ebpf_egress`, `ovs_dataplane`,
//! `ovs_tunnel`): they drive a dataplane directly, with pods made by the harness without CNI.
//!
//! Every test binary compiles this module, but only the eBPF ones use the bpffs, veth-pod and
//! pinned-program helpers. An `#[expect(dead_code)]` would go unfulfilled in those binaries,
//! so the eBPF-only items carry a scoped `allow` with that reason instead ([`GATEWAY`] is live
//! through [`veth_pod`]); [`endpoint`], used by all four, carries none, so a helper nobody
//! uses any more still warns.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ferrea_agent::dataplane::PodEndpoint;
use ferrea_agent::dataplane::ebpf::PinLayout;
use ferrea_tests::netns::NetNs;
use ferrea_tests::vethpod::{VethPod, VethPodSpec};

/// The pods' gateway in the backend tests (pod CIDR 10.244.1.0/24).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);

/// A bpffs path under a temporary directory for the dataplane to mount (the harness's
/// `BpfFs` mounts one itself; here mounting is the code under test); unmounted on drop.
#[allow(
    dead_code,
    reason = "used by the eBPF test binaries only; the OVS ones compile this module too"
)]
pub struct BpffsGuard {
    /// Where the dataplane mounts bpffs.
    pub path: PathBuf,
    _tmp: tempfile::TempDir,
}

#[allow(
    dead_code,
    reason = "used by the eBPF test binaries only; the OVS ones compile this module too"
)]
impl BpffsGuard {
    /// A fresh, not yet mounted path.
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        BpffsGuard {
            path: tmp.path().join("bpf"),
            _tmp: tmp,
        }
    }
}

impl Drop for BpffsGuard {
    fn drop(&mut self) {
        // Lazy unmount, repeated in case the dataplane was initialised twice on the same path
        // (it must not be, but a failing test must not leave a mount behind either).
        for _ in 0..3 {
            if nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
}

/// A pod in its own namespace (role `role`) with host veth `host_ifname` in `node`, address
/// `ip`/24 behind [`GATEWAY`], MACs 02:fe:..:n (host) and 02:00:..:n (pod).
#[allow(
    dead_code,
    reason = "used by the eBPF test binaries only; the OVS ones compile this module too"
)]
pub fn veth_pod(node: &NetNs, role: &str, host_ifname: &str, n: u8, ip: Ipv4Addr) -> VethPod {
    VethPod::create(
        node,
        role,
        VethPodSpec {
            host_ifname: host_ifname.into(),
            ip,
            prefix: 24,
            gateway: GATEWAY,
            host_mac: [0x02, 0xfe, 0, 0, 0, n],
            pod_mac: [0x02, 0x00, 0, 0, 0, n],
        },
    )
    .unwrap()
}

/// The endpoint the agent core would hand the backend for `pod`.
pub fn endpoint(pod: &VethPod) -> PodEndpoint {
    let s = pod.spec();
    PodEndpoint {
        container_id: format!("c-{}", s.host_ifname),
        host_ifname: s.host_ifname.clone(),
        host_ifindex: pod.host_ifindex(),
        host_mac: s.host_mac,
        pod_mac: s.pod_mac,
        ip: s.ip,
    }
}

/// Makes the pinned programs under `layout` look like another build's: renames the one
/// `progs/<digest>/` directory to an all-zero digest. Returns (the build's directory as it
/// was, the directory it is now).
#[allow(
    dead_code,
    reason = "used by the eBPF test binaries only; the OVS ones compile this module too"
)]
pub fn pretend_programs_of_another_build(layout: &PinLayout) -> (PathBuf, PathBuf) {
    let cur = std::fs::read_dir(layout.progs_root())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let old = layout.progs_root().join("0000000000000000");
    std::fs::rename(&cur, &old).unwrap();
    (cur, old)
}
