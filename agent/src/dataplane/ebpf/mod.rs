//! The eBPF backend: TC programs on every pod's host-side veth and BPF maps, no bridge.
//!
//! Packet path (Calico/Cilium style routed veths): the node is every pod's router. The program
//! on TC ingress of a host veth answers the pod's ARP with the host veth's MAC, drops frames
//! whose source IP or MAC is not the pod's, redirects pod-to-pod frames straight into the
//! destination pod's namespace (`bpf_redirect_peer`) and passes the rest to the node's stack.
//! The program on TC egress counts what the stack delivers. See `ebpf/src/lib.rs`.
//!
//! What this module owns, all in the node's network namespace:
//! - the bpffs pin directory (mounted if the path is not on a bpffs) and everything under it:
//!   `maps/` (maps pinned by name, adopted by a restarted agent) and `progs/<digest>/` (the
//!   loaded programs of one build of the embedded object);
//! - the gateway veth pair `ferrea-gw0` (carries the gateway IP as a /32) / `ferrea-gw0p`;
//! - per pod: its map entries, a `clsact` qdisc with one `bpf` filter per direction at
//!   priority [`TC_PRIORITY`] handle [`TC_HANDLE`] on its host veth, the route `<ip>/32 dev
//!   <host veth> scope link src <gateway>` and a permanent neighbour entry for the pod's MAC.
//!
//! The map bookkeeping (which entries a pod, a remote node or an Egress plan needs, in which
//! order they are written) is in [`maps`], behind the [`maps::BpfMaps`] trait.
//!
//! It never touches other links, routes, neighbours or filters, and it never creates or deletes
//! pod veths (the agent core does that).
//!
//! Attachment: legacy netlink TC filters (cls_bpf, direct action), not TCX links. Both survive
//! the agent being killed (filters belong to the qdisc, TCX links would need pins), but a TCX
//! attach costs a `synchronize_rcu` per hook (measured 12-25 ms each here), while a cls_bpf
//! filter is added in well under a millisecond, and this is on the CNI ADD path.
//!
//! Egress ([`Dataplane::set_egress`]): three more pinned maps, replaced whole by each plan:
//! `FERREA_EG_STEER` (steered pod IP to egress node, Egress id and tunnel ifindex),
//! `FERREA_EG_EXEMPT` (LPM of destinations never steered) and `FERREA_EG_IDS` (a hash set of
//! the Egress ids whose IP this node holds). The programs' side is described in
//! `ebpf/src/lib.rs`. Like every pinned map they are adopted by a restarted agent; a build
//! that adds maps loads next to the pins of an older build because aya creates (and pins) each
//! declared map that has no pin yet and opens the others. A map a build no longer declares
//! (`ferrea_common::OBSOLETE_MAP_PINS`) is unpinned once the new programs are in place: the
//! programs still attached hold it by reference until they are replaced.
//!
//! Services beside kube-proxy: two more pinned maps the agent never writes, filled by the
//! programs themselves. `FERREA_STACK_CT` (an LRU hash of `ferrea_common::MAX_STACK_FLOWS`
//! connections) holds the reply tuples of connections the node's stack carried to a pod or
//! into the tunnel; a packet about to take a fast path whose tuple is there goes to the stack
//! instead, whose conntrack undoes kube-proxy's NAT. The design (TC hooks that only
//! stack-routed packets pass, rather than the kernel's conntrack kfuncs) and its costs are in
//! `ebpf/src/lib.rs`. `FERREA_SVC_CNT` counts that path ([`service_counters`]). Both survive a
//! restart like every pinned map, and a stale entry only ever sends packets the slow way.
//!
//! ferrea's service proxy ([`Dataplane::set_services`], `serviceProxy: ferrea`): four more
//! pinned maps. `FERREA_LB_SVC` (frontends and backend slots) is written by the agent
//! ([`services`]); `FERREA_LB_CT` (the connection table, LRU) and `FERREA_LB_AFF` (session
//! affinity, LRU) are filled by the programs and cleaned by the agent when frontends or
//! backends leave the plan; `FERREA_LB_CNT` counts the proxy's paths ([`lb_counters`]). The
//! programs' side is `ebpf/src/lb.rs`. A restarted agent adopts all four; its first
//! `set_services` converges the frontends on the plan and cleans the tables of what left it
//! while no agent ran.
//!
//! `ferreactl trace` ([`Dataplane::trace`], the `trace` module): the pinned programs run on a
//! constructed frame with `BPF_PROG_TEST_RUN`; each writes what it decided into the pinned
//! one-slot map `FERREA_TRACE`, only for the traced packet's `skb->mark`.
//!
//! Restart behaviour: a new process adopts the pinned maps (same kernel objects, entries
//! intact). If the pinned programs are of the same build as the embedded object
//! (`progs/<digest>/` exists) it uses them as they are and touches no filter. Otherwise it loads
//! the new build and replaces the program of every known pod's filters in place (same
//! priority and handle: cls_bpf swaps the program atomically, no packet sees no filter).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap as BpfHashMap, PerCpuArray, PerCpuHashMap};
use aya::programs::tc::{SchedClassifierLink, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ferrea_common::{
    Counters, Endpoint, MAP_COUNTERS, MAP_EGRESS_EXEMPT, MAP_EGRESS_HELD, MAP_EGRESS_STEER,
    MAP_ENDPOINTS_BY_IFINDEX, MAP_ENDPOINTS_BY_IP, MAP_LB_AFFINITY, MAP_LB_FLOWS, MAP_LB_SERVICES,
    MAP_REMOTE_NODES,
};
use futures::TryStreamExt;
use netlink_packet_route::link::{InfoData, InfoGeneve, InfoKind, InfoVeth};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};
use sha2::{Digest, Sha256};

use super::{
    Dataplane, DataplaneError, DumpSection, EgressPlan, ErrorsOf, NodeNetwork, PacketTrace,
    PodEndpoint, PodStats, RemoteNode, TUNNEL_IFNAME, TUNNEL_VNI, TracePacket, Tunnel, unmet,
};
use crate::config::TunnelType;
use crate::kernel::routes::{self, NodeRoute};

pub mod maps;
mod pins;
pub mod services;
mod trace;

use maps::{AyaMaps, BpfMaps};
pub use pins::{Direction, PinLayout};

/// The BPF object built from `ebpf/` by `agent/build.rs`.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferrea.bpf.o"));

pub use super::GATEWAY_IFNAME;
/// Name of the gateway device's peer (up, no address; it only keeps `ferrea-gw0` up).
pub const GATEWAY_PEER_IFNAME: &str = "ferrea-gw0p";

const BACKEND: &str = "ebpf";
/// This backend\'s error builders.
const ERR: ErrorsOf = ErrorsOf(BACKEND);

/// Priority of ferrea's TC filters: first, so the spoof guard runs before any other filter.
pub const TC_PRIORITY: u16 = 1;
/// Handle of ferrea's TC filters (with [`TC_PRIORITY`], identifies them for replace and delete).
pub const TC_HANDLE: TcHandle = TcHandle::new(0, 1);

fn attach_type(d: Direction) -> TcAttachType {
    match d {
        Direction::Ingress => TcAttachType::Ingress,
        Direction::Egress => TcAttachType::Egress,
    }
}

/// Removes ferrea's filters from an interface, if it still exists. Other filters stay.
fn detach_filters(ifname: &str) {
    for d in [Direction::Ingress, Direction::Egress] {
        if let Ok(link) =
            SchedClassifierLink::attached(ifname, attach_type(d), TC_PRIORITY, TC_HANDLE, None)
        {
            // Err = the interface or the filter is gone already: nothing to do.
            let _ = aya::programs::Link::detach(link);
        }
    }
}

/// The name of the interface with this index, if it exists.
fn ifname_of(ifindex: u32) -> Option<String> {
    nix::net::if_::if_indextoname(ifindex)
        .ok()?
        .into_string()
        .ok()
}

/// True if an interface of this name exists.
fn ifname_of_name(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Short digest of the embedded object: names the directory its loaded programs are pinned in,
/// so a restarted agent can tell whether the attached programs are of its own build.
pub fn object_digest(object: &[u8]) -> String {
    let d = Sha256::digest(object);
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The node-wide counters of the stack-flow path ("Services beside kube-proxy" in
/// `ebpf/src/lib.rs`) under the pin path `pin_path`, summed over the CPUs: one value per slot,
/// indexed by the `ferrea_common::SVC_*` constants. Reads the pinned map, so it works from any
/// process that sees the bpffs (a debug tool, a test), with or without a running agent.
pub fn service_counters(pin_path: &Path) -> Result<Vec<u64>, DataplaneError> {
    per_cpu_counters(
        pin_path,
        ferrea_common::MAP_SVC_COUNTERS,
        ferrea_common::SVC_COUNTER_SLOTS,
    )
}

/// The node-wide counters of ferrea's service proxy in the programs (`ebpf/src/lb.rs`) under
/// the pin path `pin_path`, summed over the CPUs: one value per slot, indexed by the
/// `ferrea_common::LB_CNT_*` constants. Like [`service_counters`], readable from any process.
pub fn lb_counters(pin_path: &Path) -> Result<Vec<u64>, DataplaneError> {
    per_cpu_counters(
        pin_path,
        ferrea_common::MAP_LB_COUNTERS,
        ferrea_common::LB_COUNTER_SLOTS,
    )
}

/// The pinned per-CPU array `name` of `slots` u64 counters, summed over the CPUs.
fn per_cpu_counters(pin_path: &Path, name: &str, slots: u32) -> Result<Vec<u64>, DataplaneError> {
    let path = PinLayout::new(pin_path.to_path_buf()).maps_dir().join(name);
    let data =
        aya::maps::MapData::from_pin(&path).map_err(ERR.init("open pinned", path.display()))?;
    let map: PerCpuArray<aya::maps::MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(map_type(name))?;
    (0..slots)
        .map(|i| {
            map.get(&i, 0)
                .map(|v| v.iter().sum())
                .map_err(ERR.init("read", path.display()))
        })
        .collect()
}

/// Everything that exists only after [`Dataplane::init_node`].
struct Loaded {
    /// The pinned maps ([`maps::AyaMaps`]).
    maps: Box<dyn BpfMaps>,
    from_pod: SchedClassifier,
    to_pod: SchedClassifier,
    from_tunnel: SchedClassifier,
    to_tunnel: SchedClassifier,
    /// Where the programs write what they decided for a traced packet ([`trace`]).
    trace: Array<aya::maps::MapData, ferrea_common::TraceRecord>,
    gateway: Ipv4Addr,
    node: NodeNetwork,
    /// What this process's last successful `set_services` left in the frontend map; `None`
    /// before the first (which reads the map and cleans the connection and affinity tables of
    /// what an earlier process left) and after a failed one.
    lb_installed: Option<services::Installed>,
}

/// Every program of the object, pinned per build.
const PROGRAMS: [&str; 4] = [
    ferrea_common::PROG_FROM_POD,
    ferrea_common::PROG_TO_POD,
    ferrea_common::PROG_FROM_TUNNEL,
    ferrea_common::PROG_TO_TUNNEL,
];

/// The eBPF dataplane of one node. Create it inside the node's network namespace (it opens its
/// netlink socket there), then call [`Dataplane::init_node`] once before any pod operation.
pub struct EbpfDataplane {
    layout: PinLayout,
    nl: Handle,
    loaded: Mutex<Option<Loaded>>,
}

fn nl_code(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Errors of deletions that mean "already gone".
fn is_gone(e: &rtnetlink::Error) -> bool {
    matches!(nl_code(e), Some(libc::ENODEV | libc::ESRCH | libc::ENOENT))
}

fn endpoint_of(ep: &PodEndpoint) -> Endpoint {
    Endpoint {
        ifindex: ep.host_ifindex,
        // Network byte order, as the programs read it from the packet.
        ipv4: u32::from_ne_bytes(ep.ip.octets()),
        pod_mac: ep.pod_mac,
        host_mac: ep.host_mac,
    }
}

fn ip_of_key(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

impl EbpfDataplane {
    /// A dataplane that pins its maps and programs under `pin_path` (a bpffs is mounted
    /// there by `init_node` if the path is not on one). Must be called within a tokio runtime,
    /// from a thread in the node's network namespace.
    pub fn new(pin_path: impl Into<PathBuf>) -> Result<Self, DataplaneError> {
        let (conn, nl, _) =
            rtnetlink::new_connection().map_err(ERR.init("open", "a netlink socket"))?;
        tokio::spawn(conn);
        Ok(Self {
            layout: PinLayout::new(pin_path.into()),
            nl,
            loaded: Mutex::new(None),
        })
    }

    /// The pin layout this dataplane uses.
    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Loaded>> {
        // A panic while holding the lock leaves maps in a state the kernel still considers
        // valid; continuing is better than poisoning every later CNI request.
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the object, adopting pinned maps and (same build) pinned programs.
    fn load(&self, node: &NodeNetwork) -> Result<Loaded, DataplaneError> {
        let l = &self.layout;
        pins::ensure_bpffs(l.root())
            .map_err(ERR.init("mount or find a bpffs at", l.root().display()))?;
        for d in [l.maps_dir(), l.progs_root()] {
            std::fs::create_dir_all(&d).map_err(ERR.init("create directory", d.display()))?;
        }
        // Maps are declared pinned by name: aya opens the pinned map if it exists (adoption)
        // and creates and pins it otherwise.
        // No kernel BTF: the programs use no CO-RE relocations (the __sk_buff fields they read
        // are context accesses the verifier rewrites), and parsing vmlinux BTF costs ~100 ms.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .default_map_pin_directory(l.maps_dir())
            .load(BPF_OBJECT)
            .map_err(ERR.init("load", "the BPF object"))?;
        let digest = object_digest(BPF_OBJECT);
        let prog_dir = l.progs_dir(&digest);
        let same_build = PROGRAMS.iter().all(|p| prog_dir.join(p).exists());
        if !same_build {
            load_and_pin_programs(&mut ebpf, &prog_dir)?;
        }
        let pinned = |name: &str| {
            SchedClassifier::from_pin(prog_dir.join(name))
                .map_err(ERR.init("open pinned", format!("program {name}")))
        };
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name).ok_or_else(|| {
                ERR.init("take", format!("map {name}"))(unmet("missing from the object"))
            })
        };
        let ep_if = take(&mut ebpf, ferrea_common::MAP_ENDPOINTS_BY_IFINDEX)?;
        let ep_ip = take(&mut ebpf, ferrea_common::MAP_ENDPOINTS_BY_IP)?;
        let counters = take(&mut ebpf, ferrea_common::MAP_COUNTERS)?;
        let remote = take(&mut ebpf, ferrea_common::MAP_REMOTE_NODES)?;
        let eg_steer = take(&mut ebpf, ferrea_common::MAP_EGRESS_STEER)?;
        let eg_exempt = take(&mut ebpf, ferrea_common::MAP_EGRESS_EXEMPT)?;
        let eg_held = take(&mut ebpf, ferrea_common::MAP_EGRESS_HELD)?;
        let lb_svc = take(&mut ebpf, MAP_LB_SERVICES)?;
        let lb_ct = take(&mut ebpf, MAP_LB_FLOWS)?;
        let lb_aff = take(&mut ebpf, MAP_LB_AFFINITY)?;
        let trace = take(&mut ebpf, ferrea_common::MAP_TRACE)?;
        let maps = AyaMaps {
            ep_if: BpfHashMap::try_from(ep_if).map_err(map_type(MAP_ENDPOINTS_BY_IFINDEX))?,
            ep_ip: BpfHashMap::try_from(ep_ip).map_err(map_type(MAP_ENDPOINTS_BY_IP))?,
            counters: PerCpuHashMap::try_from(counters).map_err(map_type(MAP_COUNTERS))?,
            remote: LpmTrie::try_from(remote).map_err(map_type(MAP_REMOTE_NODES))?,
            eg_steer: BpfHashMap::try_from(eg_steer).map_err(map_type(MAP_EGRESS_STEER))?,
            eg_exempt: LpmTrie::try_from(eg_exempt).map_err(map_type(MAP_EGRESS_EXEMPT))?,
            eg_held: BpfHashMap::try_from(eg_held).map_err(map_type(MAP_EGRESS_HELD))?,
            lb_svc: BpfHashMap::try_from(lb_svc).map_err(map_type(MAP_LB_SERVICES))?,
            lb_ct: BpfHashMap::try_from(lb_ct).map_err(map_type(MAP_LB_FLOWS))?,
            lb_aff: BpfHashMap::try_from(lb_aff).map_err(map_type(MAP_LB_AFFINITY))?,
        };
        let mut loaded = Loaded {
            maps: Box::new(maps),
            from_pod: pinned(ferrea_common::PROG_FROM_POD)?,
            to_pod: pinned(ferrea_common::PROG_TO_POD)?,
            from_tunnel: pinned(ferrea_common::PROG_FROM_TUNNEL)?,
            to_tunnel: pinned(ferrea_common::PROG_TO_TUNNEL)?,
            trace: Array::try_from(trace).map_err(map_type(ferrea_common::MAP_TRACE))?,
            gateway: node.gateway,
            node: node.clone(),
            lb_installed: None,
        };
        if !same_build {
            // A different build was attached before (or none): move every known pod's filters
            // to this build atomically, then forget the old programs (attached ones stay
            // loaded only as long as a filter still holds them).
            let moved = loaded.replace_all_filters();
            tracing::info!(
                interfaces = moved,
                digest,
                "pod filters moved to this build's programs"
            );
            pins::remove_other_prog_dirs(l, &digest);
            for name in ferrea_common::OBSOLETE_MAP_PINS {
                let path = l.maps_dir().join(name);
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::info!(map = name, "unpinned a map of an older build"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "could not unpin an older build's map")
                    }
                }
            }
        }
        Ok(loaded)
    }

    async fn link_index(&self, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
        let mut s = self.nl.link().get().match_name(name.to_owned()).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(m.header.index)),
            Ok(None) => Ok(None),
            Err(e) if nl_code(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates or adopts the tunnel device: VXLAN or Geneve in external (flow-based) mode, no
    /// ARP, MTU of the pods; attaches the tunnel programs.
    async fn ensure_tunnel(&self, node: &NodeNetwork, t: Tunnel) -> Result<(), DataplaneError> {
        if self
            .link_index(TUNNEL_IFNAME)
            .await
            .map_err(ERR.init("look up", format!("interface {TUNNEL_IFNAME}")))?
            .is_none()
        {
            let msg = match t.kind {
                TunnelType::Vxlan => LinkVxlan::new(TUNNEL_IFNAME, TUNNEL_VNI)
                    .collect_metadata(true)
                    .learning(false)
                    .port(t.port)
                    .mtu(node.mtu)
                    .arp(false)
                    .build(),
                TunnelType::Geneve => {
                    LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Geneve)
                        .name(TUNNEL_IFNAME.to_owned())
                        .mtu(node.mtu)
                        .arp(false)
                        .set_info_data(InfoData::Geneve(vec![
                            InfoGeneve::CollectMetadata,
                            InfoGeneve::Port(t.port),
                        ]))
                        .build()
                }
            };
            match self.nl.link().add(msg).execute().await {
                Ok(()) => {}
                Err(e) if nl_code(&e) == Some(libc::EEXIST) => {}
                Err(e) => {
                    let object = format!(
                        "interface {TUNNEL_IFNAME} ({:?}, external mode{})",
                        t.kind,
                        if matches!(t.kind, TunnelType::Geneve) {
                            "; does this kernel have the geneve module?"
                        } else {
                            ""
                        }
                    );
                    return Err(ERR.init("create", object)(e));
                }
            }
        }
        let idx = self
            .link_index(TUNNEL_IFNAME)
            .await
            .map_err(ERR.init("look up", format!("interface {TUNNEL_IFNAME}")))?
            .ok_or_else(|| {
                ERR.init("look up", format!("interface {TUNNEL_IFNAME}"))(unmet(
                    "vanished after creation",
                ))
            })?;
        self.nl
            .link()
            .set(LinkUnspec::new_with_index(idx).mtu(node.mtu).up().build())
            .execute()
            .await
            .map_err(ERR.init("set up", format!("interface {TUNNEL_IFNAME}")))?;
        let mut g = self.lock();
        let st = g.as_mut().expect("loaded by init_node");
        st.attach_tunnel().map_err(ERR.init(
            "attach the tunnel programs to",
            format!("interface {TUNNEL_IFNAME}"),
        ))
    }

    /// Deletes the tunnel device if it exists (routes through it go with it).
    async fn remove_tunnel(&self) -> Result<(), DataplaneError> {
        if let Some(idx) = self
            .link_index(TUNNEL_IFNAME)
            .await
            .map_err(ERR.init("look up", format!("interface {TUNNEL_IFNAME}")))?
        {
            match self.nl.link().del(idx).execute().await {
                Ok(()) => tracing::info!("noEncap: tunnel device removed"),
                Err(e) if is_gone(&e) => {}
                Err(e) => {
                    return Err(ERR.init("delete", format!("interface {TUNNEL_IFNAME}"))(e));
                }
            }
        }
        Ok(())
    }

    /// Creates or adopts `ferrea-gw0` / `ferrea-gw0p`, up, with the gateway /32.
    async fn ensure_gateway(&self, node: &NodeNetwork) -> Result<(), DataplaneError> {
        let gw = format!("interface {GATEWAY_IFNAME}");
        if self
            .link_index(GATEWAY_IFNAME)
            .await
            .map_err(ERR.init("look up", &gw))?
            .is_none()
        {
            let peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name(GATEWAY_PEER_IFNAME.to_owned())
                .mtu(node.mtu)
                .build();
            let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(GATEWAY_IFNAME.to_owned())
                .mtu(node.mtu)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            match self.nl.link().add(msg).execute().await {
                Ok(()) => {}
                // Another init_node won the race: adopt its device.
                Err(e) if nl_code(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(ERR.init("create", &gw)(e)),
            }
        }
        for name in [GATEWAY_PEER_IFNAME, GATEWAY_IFNAME] {
            let idx = self
                .link_index(name)
                .await
                .map_err(ERR.init("look up", format!("interface {name}")))?
                .ok_or_else(|| {
                    ERR.init("look up", format!("interface {name}"))(unmet(
                        "vanished after creation",
                    ))
                })?;
            self.nl
                .link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(ERR.init("set up", format!("interface {name}")))?;
            if name == GATEWAY_IFNAME {
                self.nl
                    .address()
                    .add(idx, IpAddr::V4(node.gateway), 32)
                    .replace()
                    .execute()
                    .await
                    .map_err(ERR.init("add the gateway address to", &gw))?;
            }
        }
        // Addresses of the pod CIDR that no pod holds are unreachable, rather than following
        // the node's default route out to the underlay. Each pod's /32 route is more specific.
        let unreachable = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(node.pod_cidr.network(), node.pod_cidr.prefix())
            .kind(netlink_packet_route::route::RouteType::Unreachable)
            .build();
        self.nl
            .route()
            .add(unreachable)
            .replace()
            .execute()
            .await
            .map_err(ERR.init(
                "add the unreachable route",
                format!("route {}", node.pod_cidr),
            ))?;
        Ok(())
    }

    fn pod_route(
        &self,
        ep: &PodEndpoint,
        gateway: Ipv4Addr,
    ) -> netlink_packet_route::route::RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ep.ip, 32)
            .output_interface(ep.host_ifindex)
            .scope(RouteScope::Link)
            .pref_source(gateway)
            .build()
    }

    /// Removes the route and neighbour of a pod if its interface still exists.
    async fn del_pod_routes(
        &self,
        ep: &PodEndpoint,
        gateway: Ipv4Addr,
    ) -> Result<(), DataplaneError> {
        let route = self.pod_route(ep, gateway);
        match self.nl.route().del(route).execute().await {
            Ok(()) => {}
            Err(e) if is_gone(&e) => {}
            Err(e) => return Err(ERR.pod("delete route", &ep.host_ifname)(e)),
        }
        let mut add = self.nl.neighbours().add(ep.host_ifindex, IpAddr::V4(ep.ip));
        let msg = add.message_mut().clone();
        match self.nl.neighbours().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) => Ok(()),
            Err(e) => Err(ERR.pod("delete neighbour", &ep.host_ifname)(e)),
        }
    }
}

/// Loads both programs of a freshly loaded object and pins them under `dir`.
/// Attaches `prog` to `ifname` at `t`, or replaces the program of ferrea's filter there.
fn attach_prog(
    prog: &mut SchedClassifier,
    ifname: &str,
    t: TcAttachType,
) -> Result<(), crate::kernel::tc::TcError> {
    crate::kernel::tc::attach_filter(prog, ifname, t, TC_PRIORITY, TC_HANDLE)
}

/// A map of the object that is not of the type this module expects (another build's layout).
fn map_type(name: &str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    ERR.init("open", format!("map {name}"))
}

fn load_and_pin_programs(ebpf: &mut Ebpf, dir: &Path) -> Result<(), DataplaneError> {
    // A half-populated directory (crash between the two pins) is simply redone.
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(ERR.init("create directory", dir.display()))?;
    for name in PROGRAMS {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| {
                ERR.init("find", format!("program {name}"))(unmet("missing from the object"))
            })?
            .try_into()
            .map_err(ERR.init("open as a classifier", format!("program {name}")))?;
        prog.load()
            .map_err(ERR.init("load", format!("program {name}")))?;
        prog.pin(dir.join(name))
            .map_err(ERR.init("pin", format!("program {name}")))?;
    }
    Ok(())
}

impl Loaded {
    fn prog(&mut self, d: Direction) -> &mut SchedClassifier {
        match d {
            Direction::Ingress => &mut self.from_pod,
            Direction::Egress => &mut self.to_pod,
        }
    }

    /// Attaches (or replaces in place) ferrea's filter for one direction on `ifname`.
    fn attach_one(&mut self, ifname: &str, d: Direction) -> Result<(), crate::kernel::tc::TcError> {
        attach_prog(self.prog(d), ifname, attach_type(d))
    }

    /// Attaches both tunnel programs to the tunnel device (adding `clsact` if needed).
    fn attach_tunnel(&mut self) -> Result<(), crate::kernel::tc::TcError> {
        let _ = aya::programs::tc::qdisc_add_clsact(TUNNEL_IFNAME);
        attach_prog(&mut self.from_tunnel, TUNNEL_IFNAME, TcAttachType::Ingress)?;
        attach_prog(&mut self.to_tunnel, TUNNEL_IFNAME, TcAttachType::Egress)
    }

    /// Attaches both programs to a pod's host veth (adding `clsact` if needed).
    fn attach(&mut self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        // EEXIST is the common case after the first add; a real failure shows up below.
        let _ = aya::programs::tc::qdisc_add_clsact(&ep.host_ifname);
        for d in [Direction::Ingress, Direction::Egress] {
            self.attach_one(&ep.host_ifname, d)
                .map_err(ERR.pod("attach program", &ep.host_ifname))?;
        }
        Ok(())
    }

    /// After loading a new build: points the filters of every known pod to it.
    fn replace_all_filters(&mut self) -> usize {
        let ifindexes = self.maps.endpoint_ifindexes();
        let mut n = 0;
        for ifname in ifindexes.into_iter().filter_map(ifname_of) {
            let ok = [Direction::Ingress, Direction::Egress]
                .into_iter()
                .all(|d| self.attach_one(&ifname, d).is_ok());
            if !ok {
                tracing::warn!(ifname, "could not move a pod's filters to the new programs");
            }
            n += usize::from(ok);
        }
        if ifname_of_name(TUNNEL_IFNAME) && self.attach_tunnel().is_err() {
            tracing::warn!("could not move the tunnel device's filters to the new programs");
        }
        n
    }
}

#[async_trait]
impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn init_node(&self, node: &NodeNetwork) -> Result<(), DataplaneError> {
        let loaded = self.load(node)?;
        *self.lock() = Some(loaded);
        self.ensure_gateway(node).await?;
        match node.tunnel {
            Some(t) => self.ensure_tunnel(node, t).await,
            // noEncap: a tunnel device left from an encap configuration goes.
            None => self.remove_tunnel().await,
        }
    }

    async fn set_remote_nodes(&self, nodes: &[RemoteNode]) -> Result<(), DataplaneError> {
        let node = {
            let g = self.lock();
            let st = g.as_ref().ok_or_else(|| ERR.not_init("set_remote_nodes"))?;
            st.node.clone()
        };
        let dev = match node.tunnel {
            Some(_) => self
                .link_index(TUNNEL_IFNAME)
                .await
                .map_err(ERR.other("look up", format!("interface {TUNNEL_IFNAME}")))?
                .ok_or_else(|| {
                    ERR.other("look up", format!("interface {TUNNEL_IFNAME}"))(unmet("missing"))
                })?,
            None => node.transport.ifindex,
        };
        let tun_ifindex = if node.tunnel.is_some() { dev } else { 0 };
        maps::sync_remote(
            self.lock().as_mut().expect("checked above").maps.as_mut(),
            nodes,
            tun_ifindex,
        )?;
        let want: Vec<NodeRoute> = nodes
            .iter()
            .map(|n| NodeRoute {
                dst: n.pod_cidr,
                // Encap: straight into the tunnel device (no ARP on it; the egress program
                // sets the outer destination). noEncap: to the remote node itself.
                via: node.tunnel.is_none().then_some(n.node_ip),
                onlink: false,
                dev,
                src: Some(node.gateway),
            })
            .collect();
        let removed = routes::sync(&self.nl, &want)
            .await
            .map_err(ERR.other("sync", "remote node routes"))?;
        if removed > 0 {
            tracing::info!(removed, "routes of departed nodes removed");
        }
        Ok(())
    }

    async fn add_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        let gateway = {
            let mut g = self.lock();
            let st = g.as_mut().ok_or_else(|| ERR.not_init("add_pod"))?;
            // Map entries first: the program drops everything from an interface it has no
            // endpoint for, so attaching first would black-hole the pod's first packets.
            maps::insert(st.maps.as_mut(), ep)?;
            st.attach(ep)?;
            st.gateway
        };
        self.nl
            .route()
            .add(self.pod_route(ep, gateway))
            .replace()
            .execute()
            .await
            .map_err(ERR.pod("add route", &ep.host_ifname))?;
        self.nl
            .neighbours()
            .add(ep.host_ifindex, IpAddr::V4(ep.ip))
            .link_layer_address(&ep.pod_mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(ERR.pod("add neighbour", &ep.host_ifname))?;
        Ok(())
    }

    async fn del_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        let gateway = {
            let mut g = self.lock();
            let st = g.as_mut().ok_or_else(|| ERR.not_init("del_pod"))?;
            maps::forget(st.maps.as_mut(), ep.host_ifindex, ep.ip);
            st.gateway
        };
        // Only if the name still means the pod's interface. When the interface is gone (the
        // pod's netns was deleted first), the kernel removed its filters, route and neighbour
        // with it, and its ifindex may already belong to another interface.
        if ifname_of(ep.host_ifindex).as_deref() != Some(ep.host_ifname.as_str()) {
            return Ok(());
        }
        detach_filters(&ep.host_ifname);
        self.del_pod_routes(ep, gateway).await
    }

    async fn retain_pods(&self, keep: &HashSet<Ipv4Addr>) -> Result<Vec<Ipv4Addr>, DataplaneError> {
        let (stale, gateway) = {
            let mut g = self.lock();
            let st = g.as_mut().ok_or_else(|| ERR.not_init("retain_pods"))?;
            let stale = maps::retain(st.maps.as_mut(), keep);
            (stale, st.gateway)
        };
        let mut removed = Vec::with_capacity(stale.len());
        for e in stale {
            let ep = PodEndpoint {
                container_id: String::new(),
                host_ifname: format!("ifindex {}", e.ifindex),
                host_ifindex: e.ifindex,
                host_mac: e.host_mac,
                pod_mac: e.pod_mac,
                ip: ip_of_key(e.ipv4),
            };
            if let Some(ifname) = ifname_of(e.ifindex) {
                detach_filters(&ifname);
            }
            // Best effort: the interface is usually gone already, taking its routes with it.
            if let Err(err) = self.del_pod_routes(&ep, gateway).await {
                tracing::warn!(error = %err, ip = %ep.ip, "removing a stale pod's route");
            }
            removed.push(ep.ip);
        }
        Ok(removed)
    }

    async fn set_egress(&self, plan: &EgressPlan) -> Result<(), DataplaneError> {
        let (tunnel, own_ip) = {
            let g = self.lock();
            let st = g.as_ref().ok_or_else(|| ERR.not_init("set_egress"))?;
            (st.node.tunnel, st.node.transport.ip)
        };
        let plan = &plan
            .normalised(tunnel.is_some(), own_ip)
            .map_err(ERR.other("set_egress", "egress plan"))?;
        let tun_ifindex = if plan.steer.is_empty() {
            0
        } else {
            self.link_index(TUNNEL_IFNAME)
                .await
                .map_err(ERR.other("look up", format!("interface {TUNNEL_IFNAME}")))?
                .ok_or_else(|| {
                    ERR.other("look up", format!("interface {TUNNEL_IFNAME}"))(unmet("missing"))
                })?
        };
        maps::sync_egress(
            self.lock().as_mut().expect("checked above").maps.as_mut(),
            plan,
            tun_ifindex,
        )
    }

    async fn set_services(&self, plan: &crate::proxy::ServicePlan) -> Result<(), DataplaneError> {
        let mut g = self.lock();
        let st = g.as_mut().ok_or_else(|| ERR.not_init("set_services"))?;
        // Only a successful sync leaves a known state behind.
        let last = st.lb_installed.take();
        let converge = last.is_none();
        let (r, installed) = services::sync(st.maps.as_mut(), plan, last.as_ref())?;
        st.lb_installed = Some(installed);
        if r.slots_written + r.slots_removed + r.flows_removed + r.flows_staled > 0 || converge {
            tracing::info!(
                frontends = r.frontends,
                slots_written = r.slots_written,
                slots_removed = r.slots_removed,
                flows_removed = r.flows_removed,
                tcp_flows_draining = r.flows_staled,
                affinities_removed = r.affinities_removed,
                sctp_left_to_stack = r.sctp_to_stack,
                "service frontends applied to the BPF maps"
            );
        }
        Ok(())
    }

    fn describe_pod(&self, ep: &PodEndpoint) -> Option<String> {
        let g = self.lock();
        g.as_ref()?.maps.endpoint_by_ifindex(ep.host_ifindex)?;
        Some(format!(
            "tc ingress {} / egress {} on {}",
            Direction::Ingress.program(),
            Direction::Egress.program(),
            ep.host_ifname
        ))
    }

    async fn dump(&self, pod: Option<&PodEndpoint>) -> Result<Vec<DumpSection>, DataplaneError> {
        let g = self.lock();
        let st = g.as_ref().ok_or_else(|| ERR.not_init("dump"))?;
        let mut out = maps::dump(st.maps.as_ref(), pod);
        // Where the programs are: the cls_bpf slot ferrea attaches them in, on each pod's
        // host veth (the interfaces of the endpoint map) and on the tunnel device.
        // `tc filter show` prints the handle as one hexadecimal number.
        let slot = format!(
            "cls_bpf prio {TC_PRIORITY} handle {:#x}",
            u32::from(TC_HANDLE)
        );
        let mut at = DumpSection::new(
            "attachments",
            &["interface", "ifindex", "hook", "program", "slot"],
        );
        let mut ifs = st.maps.endpoint_ifindexes();
        ifs.sort_unstable();
        for i in ifs
            .into_iter()
            .filter(|i| pod.is_none_or(|p| p.host_ifindex == *i))
        {
            let name = ifname_of(i).unwrap_or_else(|| "(gone)".into());
            for d in [Direction::Ingress, Direction::Egress] {
                at.rows.push(vec![
                    name.clone(),
                    i.to_string(),
                    format!("{d:?}").to_lowercase(),
                    d.program().to_owned(),
                    slot.clone(),
                ]);
            }
        }
        if pod.is_none()
            && let Ok(i) = nix::net::if_::if_nametoindex(TUNNEL_IFNAME)
        {
            for (hook, prog) in [
                ("ingress", ferrea_common::PROG_FROM_TUNNEL),
                ("egress", ferrea_common::PROG_TO_TUNNEL),
            ] {
                at.rows.push(vec![
                    TUNNEL_IFNAME.to_owned(),
                    i.to_string(),
                    hook.to_owned(),
                    prog.to_owned(),
                    slot.clone(),
                ]);
            }
        }
        out.push(at);
        // The node-wide counters of the path that sends replies of stack-carried (NATed)
        // connections back through the stack.
        if pod.is_none() {
            let mut svc = DumpSection::new(
                format!("map {}", ferrea_common::MAP_SVC_COUNTERS),
                &["counter", "packets"],
            );
            let names = [
                (ferrea_common::SVC_STACK_TO_POD, "stack_to_pod"),
                (ferrea_common::SVC_RECORDED_POD, "recorded_from_stack"),
                (ferrea_common::SVC_RECORDED_TUNNEL, "recorded_into_tunnel"),
                (ferrea_common::SVC_REPLY_FROM_POD, "reply_from_pod_to_stack"),
                (
                    ferrea_common::SVC_REPLY_FROM_TUNNEL,
                    "reply_from_tunnel_to_stack",
                ),
                (ferrea_common::SVC_STALE_CLEARED, "stale_entry_cleared"),
                (ferrea_common::SVC_UNMATCHABLE, "unmatchable_to_stack"),
            ];
            match service_counters(self.layout.root()) {
                Ok(values) => {
                    for (slot, name) in names {
                        if let Some(v) = values.get(slot as usize) {
                            svc.rows.push(vec![name.to_owned(), v.to_string()]);
                        }
                    }
                }
                Err(e) => {
                    let mut why = e.to_string();
                    let mut cur = std::error::Error::source(&e);
                    while let Some(c) = cur {
                        why.push_str(&format!(": {c}"));
                        cur = c.source();
                    }
                    svc.rows.push(vec!["(unreadable)".to_owned(), why]);
                }
            }
            out.push(svc);
            // ferrea's service proxy: frontends, connections, affinity, and its counters.
            out.extend(services::dump(st.maps.as_ref(), services::boot_time_ns()));
            out.push(lb_counter_section(self.layout.root()));
        }
        Ok(out)
    }

    async fn pod_stats(&self, ep: &PodEndpoint) -> Result<Option<PodStats>, DataplaneError> {
        let g = self.lock();
        let st = g.as_ref().ok_or_else(|| ERR.not_init("pod_stats"))?;
        maps::stats(st.maps.as_ref(), ep)
    }

    async fn trace(&self, packet: &TracePacket) -> Result<PacketTrace, DataplaneError> {
        // The lock makes traces run one at a time (one trace slot); a test run takes
        // microseconds.
        let mut g = self.lock();
        let st = g.as_mut().ok_or_else(|| ERR.not_init("trace"))?;
        trace::trace(st, packet)
    }
}

/// The `FERREA_LB_CNT` counters as a dump section, by name.
fn lb_counter_section(pin_path: &Path) -> DumpSection {
    use ferrea_common as c;
    let mut sec = DumpSection::new(
        format!("map {}", c::MAP_LB_COUNTERS),
        &["counter", "packets"],
    );
    let names = [
        (c::LB_CNT_NEW, "new_connections"),
        (c::LB_CNT_AFFINITY, "new_by_affinity"),
        (c::LB_CNT_HAIRPIN, "new_hairpin"),
        (c::LB_CNT_FORWARD, "forward_nat"),
        (c::LB_CNT_REVERSE_POD, "reverse_nat_from_pod"),
        (c::LB_CNT_REVERSE_TUNNEL, "reverse_nat_from_tunnel"),
        (c::LB_CNT_REVERSE_STACK, "reverse_nat_from_stack"),
        (c::LB_CNT_NO_BACKEND, "no_backend_to_stack"),
        (c::LB_CNT_TO_STACK, "untranslatable_to_stack"),
        (c::LB_CNT_STALE_RESELECT, "stale_tcp_reselected"),
        (c::LB_CNT_PORT_REMAP, "new_source_port_remapped"),
        (c::LB_CNT_PORT_CLASH, "new_source_port_clash_kept"),
    ];
    match lb_counters(pin_path) {
        Ok(values) => {
            for (slot, name) in names {
                if let Some(v) = values.get(slot as usize) {
                    sec.rows.push(vec![name.to_owned(), v.to_string()]);
                }
            }
        }
        Err(e) => sec
            .rows
            .push(vec!["(unreadable)".to_owned(), error_chain(&e)]),
    }
    sec
}

/// An error and its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        why.push_str(&format!(": {c}"));
        cur = c.source();
    }
    why
}

/// Sums the per-CPU slots of one pod's counters.
fn sum_counters<'a>(slots: impl Iterator<Item = &'a Counters>) -> PodStats {
    slots.fold(PodStats::default(), |mut s, c| {
        s.tx_packets += c.tx_packets;
        s.tx_bytes += c.tx_bytes;
        s.rx_packets += c.rx_packets;
        s.rx_bytes += c.rx_bytes;
        s.drop_spoofed += c.drop_spoofed;
        s.drop_other += c.drop_other;
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_stable_and_short() {
        let a = object_digest(b"ferrea");
        assert_eq!(a.len(), 16);
        assert_eq!(a, object_digest(b"ferrea"));
        assert_ne!(a, object_digest(b"ferrea2"));
    }

    #[test]
    fn embedded_object_is_a_bpf_elf() {
        assert_eq!(&BPF_OBJECT[..4], b"\x7fELF");
        // e_machine EM_BPF = 247, little endian.
        assert_eq!(u16::from_le_bytes([BPF_OBJECT[18], BPF_OBJECT[19]]), 247);
    }

    #[test]
    fn endpoint_ip_is_network_order() {
        let ep = PodEndpoint {
            container_id: "c".into(),
            host_ifname: "fe0".into(),
            host_ifindex: 7,
            host_mac: [2, 0, 0, 0, 0, 1],
            pod_mac: [2, 0, 0, 0, 0, 2],
            ip: Ipv4Addr::new(10, 244, 1, 5),
        };
        let e = endpoint_of(&ep);
        // The packet's bytes 10.244.1.5 read as a native u32 give the same key.
        assert_eq!(e.ipv4, u32::from_ne_bytes([10, 244, 1, 5]));
        assert_eq!(ip_of_key(e.ipv4), ep.ip);
    }

    #[test]
    fn counters_sum_over_cpus() {
        let c = [
            Counters {
                tx_packets: 1,
                tx_bytes: 10,
                rx_packets: 2,
                rx_bytes: 20,
                drop_spoofed: 3,
                arp_replies: 1,
                drop_other: 2,
            },
            Counters {
                tx_packets: 4,
                tx_bytes: 40,
                rx_packets: 5,
                rx_bytes: 50,
                drop_spoofed: 6,
                arp_replies: 0,
                drop_other: 5,
            },
        ];
        let s = sum_counters(c.iter());
        assert_eq!(
            s,
            PodStats {
                tx_packets: 5,
                tx_bytes: 50,
                rx_packets: 7,
                rx_bytes: 70,
                drop_spoofed: 9,
                drop_other: 7,
            }
        );
    }
}
