//! An 802.1Q "sub-interface" for kernels without VLAN devices: a macvlan child on the parent
//! (transport) interface, made to send and receive VLAN `vid` by two small TC programs.
//!
//! Egress IPs of a subnet with a VLAN live on a VLAN sub-interface of the transport interface.
//! Where the kernel has the 8021q module the agent core creates a real one; on kernels like the
//! one ferrea is built on (no 8021q, no `act_vlan`, no bridge `vlan_filtering`) it creates a
//! macvlan instead and asks this module to make it behave like one:
//!
//! - TC egress of the child ([`ferrea_common::PROG_VLAN_TX`]): every frame gets the child's tag
//!   pushed (`bpf_skb_vlan_push`, TPID 0x8100) and leaves through the parent tagged. A child
//!   whose entry is gone (detached but not deleted) sends nothing: a detached sub-interface
//!   is mute rather than leaking untagged frames onto the parent's native VLAN.
//! - TC ingress of the parent ([`ferrea_common::PROG_VLAN_RX`]): a frame tagged with a VLAN
//!   that has a child on this parent loses the tag (`bpf_skb_vlan_pop`). If it is unicast for
//!   the child's MAC it then continues on the parent, where macvlan's demultiplexing (which
//!   runs after TC ingress, in the same receive pass) hands it to the child: the common case,
//!   replies to egress traffic, costs no extra pass. Every other frame of the VLAN (broadcast,
//!   multicast, other destinations) is redirected into the child's receive path
//!   (`bpf_redirect(child, BPF_F_INGRESS)`), so the parent never sees the VLAN's frames
//!   untagged (it would otherwise answer ARP for the child's address, untagged, or accept a
//!   frame from the VLAN addressed to itself). Tagged frames of other VLANs and untagged frames
//!   pass untouched (`TC_ACT_OK`): what other software on the parent sees does not change.
//!   Untagged frames cost one read of the skb's VLAN metadata (the kernel moves the outer tag
//!   out of the frame before TC ingress), no map lookup. The child's MAC is read when it is
//!   attached (and on every later attach or sync).
//!
//! What differs from a real VLAN device: the macvlan still receives the parent's untagged
//! broadcasts and untagged frames addressed to its MAC (macvlan's own demultiplexing runs after
//! TC ingress). Its replies leave tagged, so they never reach an untagged peer; the agent core
//! keeps the usual `arp_ignore`/`rp_filter` settings on the child.
//!
//! API ([`VlanTagger`]): [`VlanTagger::load`], then [`VlanTagger::attach`] /
//! [`VlanTagger::detach`] per sub-interface, or [`VlanTagger::sync`] with the whole desired
//! set; [`VlanTagger::detach_all_except`] cleans up after sub-interfaces that went while no
//! agent ran. Everything happens in the network namespace of the calling thread (netlink TC
//! through aya). The tagger holds no agent state, so the test harness's "external" host
//! terminates VLANs with it too.
//!
//! Programs and maps are not pinned. The filters hold the programs (and the programs their
//! maps), so tagging goes on while no agent runs; a new process loads fresh programs with empty
//! maps, fills them, and replaces the program of each filter in place (cls_bpf swaps it
//! atomically). Filters use a fixed priority and handle ([`VLAN_TC_PRIORITY`],
//! [`VLAN_TC_HANDLE`]) distinct from the pod filters', so a restart replaces them instead of
//! stacking a second one, and filters of other software on the same interface are never
//! touched; cleanup finds ferrea's filters by that slot or by program name. Use
//! [`VlanTagger::sync`] after a restart: it fills the maps for every sub-interface before
//! replacing any filter, so no VLAN of a parent with several is without its entry meanwhile.
//!
//! The programs come in their own BPF object (`ferrea-vlan.bpf.o`, see `agent/build.rs`),
//! linked from the same crate as the dataplane's but keeping only the tagger's programs and
//! maps: aya pins every map declared pinned when it loads an object (under `/sys/fs/bpf` if
//! given no directory), so loading the dataplane's object here would create and pin its maps.

use std::collections::HashSet;

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::tc::{SchedClassifierLink, TcError, TcHandle};
use aya::programs::{Link, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ferrea_common::{
    MAP_VLAN_BY_CHILD, MAP_VLAN_BY_PARENT, PROG_VLAN_RX, PROG_VLAN_TX, VlanChild, VlanKey,
};

/// The tagger's BPF object built from `ebpf/` by `agent/build.rs`.
static VLAN_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferrea-vlan.bpf.o"));

/// Priority of the tagger's TC filters (on parents' ingress and children's egress).
pub const VLAN_TC_PRIORITY: u16 = 7;
/// Handle of the tagger's TC filters: with [`VLAN_TC_PRIORITY`], the slot a restarted agent
/// replaces and cleanup removes.
pub const VLAN_TC_HANDLE: TcHandle = TcHandle::new(0, 0xfe7a);

/// Errors of the VLAN tagger.
#[derive(Debug, thiserror::Error)]
pub enum VlanError {
    /// Loading the programs or creating their maps failed.
    #[error("vlan tagger: loading {what}: {source}")]
    Load {
        /// The object, program or map.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The embedded object lacks a program or map (a build problem).
    #[error("vlan tagger: {0} missing from the object")]
    Missing(String),
    /// A VLAN id outside 1..=4094.
    #[error("vlan tagger: VLAN id {0} is out of range (1..=4094)")]
    BadVid(u16),
    /// An interface does not exist in this network namespace.
    #[error("vlan tagger: no interface {0} in this network namespace")]
    NoInterface(String),
    /// Parent and child are the same interface.
    #[error("vlan tagger: {0} cannot be its own VLAN child")]
    SameInterface(String),
    /// A map update failed.
    #[error("vlan tagger: map {map}: {source}")]
    Map {
        /// Which map.
        map: &'static str,
        /// What went wrong.
        #[source]
        source: aya::maps::MapError,
    },
    /// Attaching or removing a TC filter failed.
    #[error("vlan tagger: {op} on {ifname}: {source}")]
    Filter {
        /// What was being done.
        op: &'static str,
        /// The interface.
        ifname: String,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// One VLAN sub-interface: `child` sends and receives VLAN `vid` through `parent`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VlanSub {
    /// The parent (transport) interface.
    pub parent: String,
    /// The child (a macvlan on `parent`).
    pub child: String,
    /// The VLAN id, 1..=4094.
    pub vid: u16,
}

/// The loaded tagger programs and their maps, in the calling thread's network namespace.
pub struct VlanTagger {
    ebpf: Ebpf,
    by_parent: BpfHashMap<MapData, VlanKey, VlanChild>,
    by_child: BpfHashMap<MapData, u32, u32>,
}

fn ifindex(name: &str) -> Result<u32, VlanError> {
    nix::net::if_::if_nametoindex(name).map_err(|_| VlanError::NoInterface(name.to_owned()))
}

/// The MAC of `name` in this network namespace (getifaddrs: netlink, so the calling thread's
/// namespace, unlike `/sys/class/net` which shows the mount's).
fn mac_of(name: &str) -> Result<[u8; 6], VlanError> {
    let addrs =
        nix::ifaddrs::getifaddrs().map_err(filter_err("reading interface addresses", name))?;
    addrs
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .ok_or_else(|| VlanError::NoInterface(name.to_owned()))
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> VlanError {
    move |source| VlanError::Map { map, source }
}

fn filter_err<E: std::error::Error + Send + Sync + 'static>(
    op: &'static str,
    ifname: &str,
) -> impl FnOnce(E) -> VlanError {
    let ifname = ifname.to_owned();
    move |e| VlanError::Filter {
        op,
        ifname,
        source: Box::new(e),
    }
}

fn load_err<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> VlanError {
    let what = what.into();
    move |e| VlanError::Load {
        what,
        source: Box::new(e),
    }
}

fn check_vid(vid: u16) -> Result<(), VlanError> {
    if (1..=4094).contains(&vid) {
        Ok(())
    } else {
        Err(VlanError::BadVid(vid))
    }
}

/// Removes the tagger's filter at `t` of `ifname` (its fixed slot). Gone already is fine.
fn remove_filter(ifname: &str, t: TcAttachType) -> Result<(), VlanError> {
    let Ok(link) = SchedClassifierLink::attached(ifname, t, VLAN_TC_PRIORITY, VLAN_TC_HANDLE, None)
    else {
        return Ok(()); // no such interface
    };
    match link.detach() {
        Ok(()) => Ok(()),
        Err(aya::programs::ProgramError::NetlinkError(e)) if is_absent(&e) => Ok(()),
        Err(e) => Err(filter_err("removing the VLAN filter", ifname)(e)),
    }
}

/// Whether a netlink TC request failed only because there was nothing there: no filter in
/// that slot (ENOENT), no clsact qdisc (EINVAL), or no interface any more (ENODEV).
fn is_absent(e: &aya::sys::NetlinkError) -> bool {
    e.raw_os_error()
        .is_some_and(|c| matches!(c, libc::ENOENT | libc::EINVAL | libc::ENODEV))
}

/// Removes every filter running the tagger program `prog` at `t` of `ifname`, found by name
/// (whatever slot an older build used). None there is fine.
fn remove_by_name(ifname: &str, t: TcAttachType, prog: &str) -> Result<(), VlanError> {
    match aya::programs::tc::qdisc_detach_program(ifname, t, prog) {
        Ok(()) => Ok(()),
        Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // The interface has no clsact qdisc (the dump fails with EINVAL) or vanished.
        Err(TcError::NetlinkError(e)) if is_absent(&e) => Ok(()),
        Err(e) => Err(filter_err("removing the VLAN filter", ifname)(e)),
    }
}

/// Attaches `prog` at `t` of `ifname` in the tagger's slot, or swaps the program of the filter
/// already there (a previous process's, or our own on a repeated attach).
fn attach_filter(
    prog: &mut SchedClassifier,
    ifname: &str,
    t: TcAttachType,
) -> Result<(), VlanError> {
    // EEXIST when the qdisc is there already; a real failure shows up in the attach below.
    let _ = aya::programs::tc::qdisc_add_clsact(ifname);
    crate::kernel::tc::attach_filter(prog, ifname, t, VLAN_TC_PRIORITY, VLAN_TC_HANDLE)
        .map_err(filter_err("attaching the VLAN filter", ifname))
}

impl VlanTagger {
    /// Loads the two programs with fresh, empty maps. Attaches nothing.
    pub fn load() -> Result<Self, VlanError> {
        // No kernel BTF needed: the programs read only __sk_buff context fields.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .load(VLAN_OBJECT)
            .map_err(load_err("the object"))?;
        for name in [PROG_VLAN_RX, PROG_VLAN_TX] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| VlanError::Missing(format!("program {name}")))?
                .try_into()
                .map_err(load_err(format!("program {name}")))?;
            prog.load().map_err(load_err(format!("program {name}")))?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| VlanError::Missing(format!("map {name}")))
        };
        let by_parent = take(MAP_VLAN_BY_PARENT)?;
        let by_child = take(MAP_VLAN_BY_CHILD)?;
        Ok(VlanTagger {
            by_parent: BpfHashMap::try_from(by_parent)
                .map_err(load_err(format!("map {MAP_VLAN_BY_PARENT}")))?,
            by_child: BpfHashMap::try_from(by_child)
                .map_err(load_err(format!("map {MAP_VLAN_BY_CHILD}")))?,
            ebpf,
        })
    }

    fn prog(&mut self, name: &str) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(name)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .expect("checked by load")
    }

    /// Map entries for one sub-interface; returns (parent, child) ifindexes.
    fn insert(&mut self, parent: &str, child: &str, vid: u16) -> Result<(u32, u32), VlanError> {
        check_vid(vid)?;
        if parent == child {
            return Err(VlanError::SameInterface(parent.to_owned()));
        }
        let (p, c) = (ifindex(parent)?, ifindex(child)?);
        let mac = mac_of(child)?;
        let key = VlanKey {
            parent_ifindex: p,
            vid: u32::from(vid),
        };
        let value = VlanChild {
            ifindex: c,
            mac_hi: u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]),
            mac_lo: u32::from(u16::from_ne_bytes([mac[4], mac[5]])),
        };
        // A child that moved to another VLAN or parent: its old parent entry goes.
        let stale: Vec<VlanKey> = self
            .by_parent
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| v.ifindex == c && *k != key)
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            let _ = self.by_parent.remove(&k);
        }
        // Child first: its frames are tagged before any reply can come back.
        self.by_child
            .insert(c, u32::from(vid), 0)
            .map_err(map_err(MAP_VLAN_BY_CHILD))?;
        self.by_parent
            .insert(key, value, 0)
            .map_err(map_err(MAP_VLAN_BY_PARENT))?;
        Ok((p, c))
    }

    /// Makes `child` a VLAN `vid` sub-interface of `parent`: frames it sends leave tagged, and
    /// frames tagged `vid` arriving on `parent` go to `child` only. Idempotent; replaces the
    /// filters a previous process left (never adds a second one). Re-attaching a child with
    /// another VLAN or parent moves it.
    pub fn attach(&mut self, parent: &str, child: &str, vid: u16) -> Result<(), VlanError> {
        self.insert(parent, child, vid)?;
        attach_filter(self.prog(PROG_VLAN_TX), child, TcAttachType::Egress)?;
        attach_filter(self.prog(PROG_VLAN_RX), parent, TcAttachType::Ingress)
    }

    /// Stops delivering `vid` frames of `parent` to its child, and removes the parent's filter
    /// when no VLAN is left on it. The child's filter goes away with the child; until then the
    /// child sends nothing. Detaching what is not attached is not an error.
    pub fn detach(&mut self, parent: &str, vid: u16) -> Result<(), VlanError> {
        check_vid(vid)?;
        let Ok(p) = ifindex(parent) else {
            // The parent is gone and its filters with it; drop entries of vanished parents.
            self.forget_vanished();
            return Ok(());
        };
        let key = VlanKey {
            parent_ifindex: p,
            vid: u32::from(vid),
        };
        if let Ok(VlanChild { ifindex: c, .. }) = self.by_parent.get(&key, 0) {
            let _ = self.by_parent.remove(&key);
            if self.by_child.get(&c, 0).ok() == Some(u32::from(vid)) {
                let _ = self.by_child.remove(&c);
            }
        }
        let left = self
            .by_parent
            .keys()
            .filter_map(Result::ok)
            .any(|k| k.parent_ifindex == p);
        if !left {
            remove_filter(parent, TcAttachType::Ingress)?;
        }
        Ok(())
    }

    /// The desired set in one step (what a restarted agent calls): fills the maps for all of
    /// `want` first, then attaches or replaces every filter, then removes everything else
    /// ([`Self::detach_all_except`]).
    pub fn sync(&mut self, want: &[VlanSub]) -> Result<(), VlanError> {
        for s in want {
            self.insert(&s.parent, &s.child, s.vid)?;
        }
        for s in want {
            attach_filter(self.prog(PROG_VLAN_TX), &s.child, TcAttachType::Egress)?;
        }
        let parents: HashSet<&str> = want.iter().map(|s| s.parent.as_str()).collect();
        for p in parents {
            attach_filter(self.prog(PROG_VLAN_RX), p, TcAttachType::Ingress)?;
        }
        self.detach_all_except(want)
    }

    /// Removes every trace of sub-interfaces not in `keep`, also those a previous process set
    /// up: map entries, the tagger's ingress filter on interfaces that are no kept parent and
    /// its egress filter on interfaces that are no kept child, found by program name on every
    /// interface of the namespace. Filters of other programs are never touched.
    pub fn detach_all_except(&mut self, keep: &[VlanSub]) -> Result<(), VlanError> {
        let kept: HashSet<(u32, u32, u32)> = keep
            .iter()
            .filter_map(|s| {
                Some((
                    ifindex(&s.parent).ok()?,
                    ifindex(&s.child).ok()?,
                    u32::from(s.vid),
                ))
            })
            .collect();
        let entries: Vec<(VlanKey, VlanChild)> =
            self.by_parent.iter().filter_map(Result::ok).collect();
        for (k, c) in entries {
            if !kept.contains(&(k.parent_ifindex, c.ifindex, k.vid)) {
                let _ = self.by_parent.remove(&k);
            }
        }
        let children: Vec<(u32, u32)> = self.by_child.iter().filter_map(Result::ok).collect();
        for (c, vid) in children {
            if !kept.iter().any(|&(_, kc, kv)| kc == c && kv == vid) {
                let _ = self.by_child.remove(&c);
            }
        }
        let parents: HashSet<&str> = keep.iter().map(|s| s.parent.as_str()).collect();
        let childs: HashSet<&str> = keep.iter().map(|s| s.child.as_str()).collect();
        let ifaces =
            nix::net::if_::if_nameindex().map_err(filter_err("listing interfaces", "*"))?;
        for i in ifaces.iter() {
            let Ok(name) = i.name().to_str() else {
                continue;
            };
            if !parents.contains(name) {
                remove_by_name(name, TcAttachType::Ingress, PROG_VLAN_RX)?;
            }
            if !childs.contains(name) {
                remove_by_name(name, TcAttachType::Egress, PROG_VLAN_TX)?;
            }
        }
        Ok(())
    }

    /// Drops map entries whose parent or child interface no longer exists.
    fn forget_vanished(&mut self) {
        let exists = |i: u32| nix::net::if_::if_indextoname(i).is_ok();
        let entries: Vec<(VlanKey, VlanChild)> =
            self.by_parent.iter().filter_map(Result::ok).collect();
        for (k, c) in entries {
            if !exists(k.parent_ifindex) || !exists(c.ifindex) {
                let _ = self.by_parent.remove(&k);
            }
        }
        let children: Vec<u32> = self.by_child.keys().filter_map(Result::ok).collect();
        for c in children.into_iter().filter(|&c| !exists(c)) {
            let _ = self.by_child.remove(&c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_object_is_a_bpf_elf() {
        assert_eq!(&VLAN_OBJECT[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([VLAN_OBJECT[18], VLAN_OBJECT[19]]), 247);
    }

    #[test]
    fn vid_range() {
        assert!(matches!(check_vid(0), Err(VlanError::BadVid(0))));
        assert!(check_vid(1).is_ok());
        assert!(check_vid(4094).is_ok());
        assert!(matches!(check_vid(4095), Err(VlanError::BadVid(4095))));
    }
}
