//! Pieces shared by the backend tests (`ebpf_dataplane`, `ovs_dataplane`): they drive a
//! dataplane directly, with pods made by the harness without CNI.

use ferrea_agent::dataplane::PodEndpoint;
use ferrea_tests::vethpod::VethPod;

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
