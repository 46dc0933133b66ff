//! The copy of a pod's record that its host veth carries, in the link's alias (`IFLA_IFALIAS`,
//! what `ip link show` prints as `alias`).
//!
//! The state store is the source of truth, but a store file that was truncated or corrupted
//! (a full disk, a bad block, a hand edit) would otherwise leave the agent knowing nothing of
//! the pods it runs, and reconciliation would delete every veth that no record owns. The
//! kernel keeps each host veth for as long as the pod lives and independently of the agent's
//! files, so the veth is where a second copy of what cannot be derived is kept: the container
//! ID, CNI_IFNAME, the address, the netns path, the pod's MAC and the pod's name. The host
//! veth's own name and MAC, and the prefix and gateway, follow from those and the node's pod
//! CIDR. Antrea keeps the same facts in OVSDB's `external_ids`; ferrea's eBPF dataplane has no
//! OVSDB, and the veth exists on both dataplanes.
//!
//! The note is compact JSON (`{"v":1,"c":…}`) and must fit the kernel's 255 bytes: the pod's
//! namespace and name (informational: the sources name pods by their IPs) are left out when
//! they would not fit, and a record whose netns path alone is too long gets no note.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use super::podnet;
use super::store::PodRecord;

/// The longest alias the kernel keeps (`IFALIASZ` minus the terminating NUL).
pub const MAX_NOTE_LEN: usize = 255;

/// The note's format version.
const VERSION: u8 = 1;

/// The alias's JSON. Short keys, as every byte counts.
#[derive(Debug, Serialize, Deserialize)]
struct Note {
    v: u8,
    /// Container ID.
    c: String,
    /// CNI_IFNAME.
    i: String,
    /// The pod's address.
    a: Ipv4Addr,
    /// The netns path at ADD time.
    n: String,
    /// The pod interface's MAC, 12 hex digits.
    m: String,
    /// The pod's Kubernetes namespace, when it fits.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    k: String,
    /// The pod's Kubernetes name, when it fits.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    p: String,
}

/// The note for `rec`, or `None` when even the note without the pod's name exceeds
/// [`MAX_NOTE_LEN`] (a netns path of 150 bytes or more).
pub fn encode(rec: &PodRecord) -> Option<String> {
    let mut n = Note {
        v: VERSION,
        c: rec.container_id.clone(),
        i: rec.ifname.clone(),
        a: rec.ip,
        n: rec.netns.clone(),
        m: rec.pod_mac.iter().map(|b| format!("{b:02x}")).collect(),
        k: rec.pod_namespace.clone(),
        p: rec.pod_name.clone(),
    };
    let fits = |n: &Note| {
        let s = serde_json::to_string(n).expect("a note encodes");
        (s.len() <= MAX_NOTE_LEN).then_some(s)
    };
    fits(&n).or_else(|| {
        n.k.clear();
        n.p.clear();
        fits(&n)
    })
}

/// Why a host veth's alias gives no record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoteError {
    /// The link has no alias (made by a ferrea before notes, or its alias was changed).
    #[error("it has no alias")]
    Missing,
    /// The alias is not a ferrea note.
    #[error("its alias is not a ferrea note: {0}")]
    Malformed(String),
    /// The note does not describe this link on this node.
    #[error("its note does not match: {0}")]
    Mismatch(String),
}

/// The record that the note on host veth `host_ifname` describes, checked against the link
/// (its name must be the one ferrea derives from the container ID and CNI_IFNAME with
/// `veth_prefix`) and against the node's `pod_cidr` (the address must lie in it).
pub fn decode(
    alias: Option<&str>,
    host_ifname: &str,
    veth_prefix: &str,
    pod_cidr: Ipv4Network,
) -> Result<PodRecord, NoteError> {
    let alias = alias.filter(|a| !a.is_empty()).ok_or(NoteError::Missing)?;
    let n: Note = serde_json::from_str(alias).map_err(|e| NoteError::Malformed(format!("{e}")))?;
    if n.v != VERSION {
        return Err(NoteError::Malformed(format!(
            "version {} (this agent reads {VERSION})",
            n.v
        )));
    }
    let pod_mac = parse_mac(&n.m).ok_or_else(|| NoteError::Malformed(format!("MAC {:?}", n.m)))?;
    let derived = podnet::host_ifname(veth_prefix, &n.c, &n.i);
    if derived != host_ifname {
        return Err(NoteError::Mismatch(format!(
            "container {} interface {} would be on {derived}",
            n.c, n.i
        )));
    }
    if !pod_cidr.contains(n.a) {
        return Err(NoteError::Mismatch(format!(
            "{} is outside this node's pod CIDR {pod_cidr}",
            n.a
        )));
    }
    Ok(PodRecord {
        container_id: n.c,
        ifname: n.i,
        ip: n.a,
        prefix_len: pod_cidr.prefix(),
        gateway: super::ipam::gateway_of(pod_cidr),
        netns: n.n,
        host_ifname: host_ifname.to_owned(),
        host_mac: podnet::macs_for(n.a).0,
        pod_mac,
        pod_namespace: n.k,
        pod_name: n.p,
    })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    if s.len() != 12 || !s.is_ascii() {
        return None;
    }
    let mut m = [0u8; 6];
    for (i, b) in m.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "fe";

    fn cidr() -> Ipv4Network {
        "10.244.1.0/24".parse().unwrap()
    }

    fn rec(cid: &str, netns: &str, name: &str) -> PodRecord {
        let ip = Ipv4Addr::new(10, 244, 1, 7);
        let (host_mac, pod_mac) = podnet::macs_for(ip);
        PodRecord {
            container_id: cid.into(),
            ifname: "eth0".into(),
            ip,
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 244, 1, 1),
            netns: netns.into(),
            host_ifname: podnet::host_ifname(PREFIX, cid, "eth0"),
            host_mac,
            pod_mac,
            pod_namespace: "tenant-a".into(),
            pod_name: name.into(),
        }
    }

    #[test]
    fn a_kubelet_pods_record_round_trips_through_its_note() {
        // A containerd sandbox: 64-hex container ID, its netns under /var/run/netns.
        let cid = "9f".repeat(32);
        let r = rec(
            &cid,
            "/var/run/netns/cni-5a1f2c3d-0e4b-7a6c-9d8e-1f2a3b4c5d6e",
            "web-7d9f8c6b5-x2x4z",
        );
        let note = encode(&r).unwrap();
        assert!(note.len() <= MAX_NOTE_LEN, "{} bytes", note.len());
        let back = decode(Some(&note), &r.host_ifname, PREFIX, cidr()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_long_pod_name_is_left_out_and_a_huge_netns_path_gives_no_note() {
        let cid = "ab".repeat(32);
        let r = rec(&cid, "/var/run/netns/cni-x", &"n".repeat(200));
        let note = encode(&r).unwrap();
        let back = decode(Some(&note), &r.host_ifname, PREFIX, cidr()).unwrap();
        assert_eq!(back.pod_name, "");
        assert_eq!(back.pod_namespace, "");
        assert_eq!(back.ip, r.ip);
        let r = rec(&cid, &format!("/proc/{}/ns/net", "9".repeat(200)), "p");
        assert_eq!(encode(&r), None);
    }

    #[test]
    fn a_note_that_does_not_describe_its_link_is_refused_with_the_reason() {
        let r = rec(&"cd".repeat(32), "/run/netns/p", "p");
        let note = encode(&r).unwrap();
        assert_eq!(
            decode(None, &r.host_ifname, PREFIX, cidr()),
            Err(NoteError::Missing)
        );
        assert!(matches!(
            decode(Some("uplink to rack 4"), &r.host_ifname, PREFIX, cidr()),
            Err(NoteError::Malformed(_))
        ));
        // Copied onto another pod's veth.
        let e = decode(Some(&note), "fe0123456789ab", PREFIX, cidr()).unwrap_err();
        assert!(
            matches!(&e, NoteError::Mismatch(m) if m.contains(&r.host_ifname)),
            "{e}"
        );
        // The node's pod CIDR changed.
        let e = decode(
            Some(&note),
            &r.host_ifname,
            PREFIX,
            "10.244.9.0/24".parse().unwrap(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("outside this node's pod CIDR"),
            "{e}"
        );
        let bad_mac = note.replace(
            &r.pod_mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            "zz",
        );
        assert!(matches!(
            decode(Some(&bad_mac), &r.host_ifname, PREFIX, cidr()),
            Err(NoteError::Malformed(_))
        ));
    }
}
