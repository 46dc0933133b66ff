//! The node side of Egress on the node that holds egress IPs: interfaces, addresses, policy
//! routing, gratuitous ARP and `rp_filter`.
//!
//! For each pool subnet (`subnetInfo`) with IPs held here:
//! - the sub-interface `ferrea-ext.<vlan>` on the transport interface (Antrea's
//!   `antrea-ext.<vlan>`). Where the kernel has 802.1Q it is a real VLAN device. Where it does
//!   not (no `8021q`, as on the machine ferrea is tested on) it is a macvlan of the transport
//!   interface whose frames a BPF program tags on the way out and whose tagged frames a BPF
//!   program on the transport interface untags and hands to it on the way in
//!   ([`crate::kernel::vlan`]): the same frames on the wire, with a device the stack routes through like
//!   a VLAN device. `vlan: 0` puts the IPs on the transport interface itself. Every
//!   sub-interface ferrea creates carries the alias [`ALIAS`]; interfaces without it are never
//!   touched, whatever their name;
//! - the egress IPs with the pool's prefix length, and gratuitous ARPs for each IP when it is
//!   assigned (three, 1.1 s apart: see [`GARP_SPACING`]), so the gateway and neighbours learn
//!   the new holder at once (after a failover and a handover, too);
//! - a route table per subnet ([`table_of`]): the subnet on the interface and a default route
//!   via `subnetInfo.gateway`;
//! - an `ip rule` per egress IP: `fwmark <id << 16>/0xffff0000 lookup <table>`;
//! - `rp_filter=2` (loose) on the sub-interface and on the pods' gateway interface: replies to
//!   SNATed traffic arrive on the sub-interface from addresses the main table routes
//!   elsewhere, which strict mode (1) drops. Something else on the node may reset it
//!   (OpenShift's node tuning does, Antrea issue 6546), so [`EgressNode::check_rp_filter`]
//!   compares and restores it every second and reports what it found.
//! - `arp_ignore=1` and `arp_announce=2` on the sub-interface: it answers ARP only for the
//!   egress IPs on it and asks with one of them. Linux answers ARP for any of the node's
//!   addresses on any interface by default, and a macvlan sub-interface receives the
//!   transport network's untagged broadcasts: it would answer the other nodes' ARP for the
//!   node's own transport address with its MAC (tagged, on the egress VLAN). OVS's tunnel
//!   neighbour cache learns from every ARP it sees, so another node's tunnel packets went to
//!   the sub-interface's MAC, and after the sub-interface was re-created (a new MAC) into the
//!   void: the node's overlay was black-holed until the cache entry expired (15 minutes).
//!
//! An IP without `subnetInfo` is a /32 on the dummy device [`DUMMY_IFNAME`], as in Antrea, and
//! leaves through the main table. Kernels without the dummy module (the machine ferrea is
//! tested on) get it as a /32 on the transport interface instead.
//!
//! Every side effect goes through its trait in [`crate::kernel`] (links, addresses, table
//! routes, rules, sysctls, gratuitous ARP; [`EgressKernel`]) and the VLAN tagger through
//! [`VlanTagging`], so the whole of [`EgressNode::apply`] runs against fakes in unit tests.
//!
//! Routes and rules carry `rtm_protocol` [`RTPROT_FERREA_EGRESS`], so a restarted agent finds
//! exactly its own and removes what no held IP needs. Addresses ferrea put on the transport
//! interface (not its own device) are listed in `<stateDir>/egress-addresses.json`, so they
//! are removed too and nothing else is.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use rtnetlink::Handle;

use super::plan::HeldIp;
use crate::controllers::runner::error_chain;
use crate::kernel::addresses::{Addresses, NetlinkAddresses};
use crate::kernel::garp::{Garp, RawSocketGarp};
use crate::kernel::links::{Link, LinkKind, Links, NetlinkLinks, NewLink, NewLinkKind};
use crate::kernel::netlink::NetlinkError;
use crate::kernel::rules::{NetlinkRules, Rule, Rules};
use crate::kernel::shaping::{ShapedClass, Shaping, TcShaping};
use crate::kernel::sysctl::{ProcSysctl, Sysctl};
use crate::kernel::tables::{NetlinkTableRoutes, TableRoute, TableRoutes};
use crate::kernel::vlan::VlanError;
use crate::net::{EGRESS_MARK_MASK, egress_mark};
use crate::source::crd::SubnetInfo;

/// `rtm_protocol` of ferrea's Egress routes and rules (`ip rule show proto 71`).
pub const RTPROT_FERREA_EGRESS: u8 = 71;
/// Priority of the per-IP fwmark rules: before the main table (32766).
pub const RULE_PRIORITY: u32 = 20100;
/// Alias of every sub-interface ferrea creates.
pub const ALIAS: &str = "ferrea: egress sub-interface";
/// Name prefix of the sub-interfaces.
pub const SUBIF_PREFIX: &str = "ferrea-ext.";
/// The dummy device holding egress IPs without `subnetInfo` (where the kernel has dummies).
pub const DUMMY_IFNAME: &str = "ferrea-egress0";

/// The route table of a subnet: `20000 + vlan` for VLAN subnets; subnets on the transport
/// interface itself (`vlan: 0`) get one of 25000..30000 by their network address.
pub fn table_of(s: &SubnetInfo) -> u32 {
    if s.vlan > 0 {
        20000 + u32::from(s.vlan)
    } else {
        25000 + u32::from(s.network().network()) % 5000
    }
}

/// The sub-interface name for a VLAN.
pub fn subif_name(vlan: u16) -> String {
    format!("{SUBIF_PREFIX}{vlan}")
}

/// Makes a macvlan behave as an 802.1Q sub-interface of its parent (see [`crate::kernel::vlan`]).
///
/// Contract: both calls are idempotent; neither is all-or-nothing across interfaces (a
/// failure may leave some filters changed, and the next call converges). Called from one task
/// (`&mut self`).
pub trait VlanTagging: Send + Sync {
    /// Frames leaving `child` are tagged `vid`; frames arriving on `parent` tagged `vid` go
    /// to `child` untagged. Already attached: nothing changes.
    fn attach(&mut self, parent: &str, child: &str, vid: u16) -> Result<(), VlanError>;
    /// Undoes [`Self::attach`] on `parent` for every VLAN not in `keep`.
    fn retain(&mut self, parent: &str, keep: &[u16]) -> Result<(), VlanError>;
}

impl VlanTagging for crate::kernel::vlan::VlanTagger {
    fn attach(&mut self, parent: &str, child: &str, vid: u16) -> Result<(), VlanError> {
        crate::kernel::vlan::VlanTagger::attach(self, parent, child, vid)
    }

    fn retain(&mut self, parent: &str, keep: &[u16]) -> Result<(), VlanError> {
        let want: Vec<crate::kernel::vlan::VlanSub> = keep
            .iter()
            .map(|v| crate::kernel::vlan::VlanSub {
                parent: parent.to_owned(),
                child: subif_name(*v),
                vid: *v,
            })
            .collect();
        self.sync(&want)
    }
}

/// Loads the BPF VLAN tagger ([`crate::kernel::vlan`]), for kernels without 802.1Q devices.
pub fn load_vlan_tagger() -> Result<Box<dyn VlanTagging>, VlanError> {
    crate::kernel::vlan::VlanTagger::load().map(|t| Box::new(t) as Box<dyn VlanTagging>)
}

/// What loads the VLAN tagger when the first VLAN needs it ([`load_vlan_tagger`], or a fake).
pub type TaggerLoader = Box<dyn Fn() -> Result<Box<dyn VlanTagging>, VlanError> + Send + Sync>;

/// Why the node could not (fully) hold its egress IPs.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The transport interface does not exist.
    #[error("transport interface {0} not found")]
    NoTransport(String),
    /// An interface with one of ferrea's names exists without ferrea's alias.
    #[error("{0} exists and was not created by ferrea (no alias {ALIAS:?}); not touching it")]
    Foreign(String),
    /// An interface just created cannot be found.
    #[error("{0} vanished right after creation")]
    Vanished(String),
    /// The VLAN tagger could not be loaded.
    #[error("loading the VLAN tagger")]
    LoadTagger(#[source] VlanError),
    /// Attaching the VLAN tagger to a sub-interface failed.
    #[error("tagging {interface} with VLAN {vid}")]
    TagAttach {
        /// The sub-interface.
        interface: String,
        /// The VLAN.
        vid: u16,
        /// The tagger's error.
        #[source]
        source: VlanError,
    },
    /// Removing the VLAN tagger of unused VLANs failed.
    #[error("removing the VLAN tagging of unused VLANs on {parent}")]
    TagRetain {
        /// The transport interface.
        parent: String,
        /// The tagger's error.
        #[source]
        source: VlanError,
    },
    /// Writing the record of the addresses on the transport interface failed.
    #[error("writing {}", path.display())]
    Record {
        /// The record's path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed (it names the operation and the interface, address, route or
    /// rule).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// Setting a sysctl of a sub-interface failed.
    #[error("setting {key} on {interface}")]
    Sysctl {
        /// The sub-interface.
        interface: String,
        /// The sysctl.
        key: String,
        /// The error.
        #[source]
        source: crate::kernel::sysctl::SysctlError,
    },
}

/// The ARP and address settings of a sub-interface (see the module doc): answer only for its
/// own addresses, ask with one of them; and when the first address of the subnet goes, keep
/// the others (with `promote_secondaries` off, the kernel deletes every secondary address of
/// a subnet with its primary, so releasing one egress IP would drop the node's other IPs of
/// the same pool for a moment).
pub const SUBIF_ARP: [(&str, &str); 3] = [
    ("arp_ignore", "1"),
    ("arp_announce", "2"),
    ("promote_secondaries", "1"),
];

/// Why one held IP is not assigned: a [`NodeError`] shared by the IPs it concerns (all IPs of
/// a sub-interface that could not be made, say). Compared by message.
#[derive(Clone, Debug, thiserror::Error)]
#[error(transparent)]
pub struct IpFailure(pub Arc<NodeError>);

impl PartialEq for IpFailure {
    fn eq(&self, other: &Self) -> bool {
        error_chain(self) == error_chain(other)
    }
}

impl Eq for IpFailure {}

/// How one held IP fared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpOutcome {
    /// The IP.
    pub ip: Ipv4Addr,
    /// The interface it is on, or the failure.
    pub result: Result<String, IpFailure>,
}

/// One `rp_filter` ferrea manages: what it wants, what it last found, how often it restored it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RpFilterStatus {
    /// The interface.
    pub interface: String,
    /// The value ferrea sets.
    pub want: String,
    /// The value found at the last check (before restoring it).
    pub found: String,
    /// How many times the value had drifted and was restored.
    pub restored: u64,
    /// Whether ferrea has set it once (the first setting is not drift).
    #[serde(skip)]
    set: bool,
}

/// The kernel side effects of [`EgressNode`], one trait object per kind.
#[derive(Clone)]
pub struct EgressKernel {
    /// Sub-interfaces and the dummy device.
    pub links: Arc<dyn Links>,
    /// The egress IPs on them.
    pub addresses: Arc<dyn Addresses>,
    /// The per-subnet route tables.
    pub routes: Arc<dyn TableRoutes>,
    /// The per-IP fwmark rules.
    pub rules: Arc<dyn Rules>,
    /// `rp_filter`.
    pub sysctl: Arc<dyn Sysctl>,
    /// Gratuitous ARP.
    pub garp: Arc<dyn Garp>,
    /// Traffic shaping (`spec.bandwidth`).
    pub shaping: Arc<dyn Shaping>,
}

impl EgressKernel {
    /// The Linux implementations, netlink through `handle`, in the caller's namespace.
    pub fn linux(handle: Handle) -> Self {
        Self {
            links: Arc::new(NetlinkLinks::new(handle.clone())),
            addresses: Arc::new(NetlinkAddresses::new(handle.clone())),
            routes: Arc::new(NetlinkTableRoutes::new(handle.clone())),
            rules: Arc::new(NetlinkRules::new(handle)),
            sysctl: Arc::new(ProcSysctl),
            garp: Arc::new(RawSocketGarp),
            shaping: Arc::new(TcShaping),
        }
    }
}

/// The node-side state of Egress.
pub struct EgressNode {
    kernel: EgressKernel,
    /// The transport interface: the parent of the sub-interfaces.
    parent: String,
    /// The pods' gateway interface (its `rp_filter` is managed too).
    gateway_if: String,
    tagger: Option<Box<dyn VlanTagging>>,
    load_tagger: TaggerLoader,
    /// Whether the kernel makes VLAN devices (`None`: not tried yet).
    has_8021q: Option<bool>,
    /// Whether the kernel makes dummy devices (`None`: not tried yet).
    has_dummy: Option<bool>,
    record: PathBuf,
    /// What `record` holds, once read (it is written only when this changes).
    on_transport: Option<BTreeSet<(Ipv4Addr, u8)>>,
    /// IPs announced by gratuitous ARP while held, and how far their announcements are.
    announced: BTreeMap<Ipv4Addr, Announced>,
    rp: BTreeMap<String, RpFilterStatus>,
    /// The shaping last applied per device (`None`: nothing known yet, as after a restart).
    shaped: Option<BTreeMap<String, Vec<ShapedClass>>>,
    /// Devices whose shaping failed, with why.
    shape_problems: BTreeMap<String, String>,
    /// VLANs whose sub-interface is kept ready without a held IP ([`EgressNode::set_standby`]).
    standby: BTreeSet<u16>,
}

/// Gratuitous ARPs sent for each IP assigned: the first at once, the others
/// [`GARP_SPACING`] apart.
pub const GARP_REPEATS: u8 = 3;
/// Longer than Linux's default neighbour `locktime` (1 s): a neighbour ignores a new MAC for an
/// address within that time of its last update, and during a make-before-break handover the
/// previous holder still answers for the IP, so a single announcement can be ignored by the
/// gateway and its replies keep going to the previous holder after it let go (keepalived
/// repeats its gratuitous ARPs for the same reason).
pub const GARP_SPACING: Duration = Duration::from_millis(1100);

/// Where the announcements of one held IP are.
#[derive(Debug, Clone)]
struct Announced {
    ifindex: u32,
    ifname: String,
    mac: [u8; 6],
    sent: u8,
    last: Instant,
}

/// A held IP placed on an interface: (IP, ifindex, ifname).
type Placed = (HeldIp, u32, String);

impl EgressNode {
    /// Egress for a node whose transport interface is `parent` and whose pods' gateway is
    /// `gateway_if`, on the Linux kernel through `handle`. `load_tagger` loads the VLAN
    /// tagging programs when the first VLAN needs them on a kernel without 802.1Q.
    pub fn new(
        handle: Handle,
        parent: String,
        gateway_if: String,
        state_dir: &std::path::Path,
        load_tagger: TaggerLoader,
    ) -> Self {
        Self::with_kernel(
            EgressKernel::linux(handle),
            parent,
            gateway_if,
            state_dir,
            load_tagger,
        )
    }

    /// [`EgressNode::new`] over any implementations of the side effects (fakes in tests).
    pub fn with_kernel(
        kernel: EgressKernel,
        parent: String,
        gateway_if: String,
        state_dir: &std::path::Path,
        load_tagger: TaggerLoader,
    ) -> Self {
        Self {
            kernel,
            parent,
            gateway_if,
            tagger: None,
            load_tagger,
            has_8021q: None,
            has_dummy: None,
            record: state_dir.join("egress-addresses.json"),
            on_transport: None,
            announced: BTreeMap::new(),
            rp: BTreeMap::new(),
            shaped: None,
            shape_problems: BTreeMap::new(),
            standby: BTreeSet::new(),
        }
    }

    async fn link(&self, name: &str) -> Result<Option<Link>, NodeError> {
        Ok(self.kernel.links.get(name).await?)
    }

    /// Ferrea's sub-interfaces on this node, by name.
    async fn own_links(&self) -> Result<BTreeMap<String, Link>, NodeError> {
        Ok(self
            .kernel
            .links
            .list()
            .await?
            .into_iter()
            .filter(|l| {
                l.alias.as_deref() == Some(ALIAS)
                    && (l.name.starts_with(SUBIF_PREFIX) || l.name == DUMMY_IFNAME)
            })
            .map(|l| (l.name.clone(), l))
            .collect())
    }

    fn attach_tagger(&mut self, child: &str, vid: u16) -> Result<(), NodeError> {
        let parent = self.parent.clone();
        self.tagger()?
            .attach(&parent, child, vid)
            .map_err(|source| NodeError::TagAttach {
                interface: child.to_owned(),
                vid,
                source,
            })
    }

    /// Creates (or finds) the sub-interface for `vlan`; returns its index.
    async fn ensure_subif(&mut self, parent: &Link, vlan: u16) -> Result<u32, NodeError> {
        let name = subif_name(vlan);
        if let Some(m) = self.link(&name).await? {
            if m.alias.as_deref() != Some(ALIAS) {
                return Err(NodeError::Foreign(name));
            }
            if self.has_8021q != Some(true) && m.kind == LinkKind::MacVlan {
                self.attach_tagger(&name, vlan)?;
            }
            self.arp_settings(&name)?;
            return Ok(m.index);
        }
        let mut made_vlan = false;
        if self.has_8021q != Some(false) {
            let vlan_dev = NewLink {
                name: name.clone(),
                kind: NewLinkKind::Vlan {
                    parent: parent.index,
                    vid: vlan,
                },
                mtu: parent.mtu,
            };
            match self.kernel.links.add(&vlan_dev).await {
                Ok(()) => {
                    self.has_8021q = Some(true);
                    made_vlan = true;
                }
                Err(e) if e.is_not_supported() => {
                    tracing::info!(
                        "this kernel has no 802.1Q devices (8021q); VLAN sub-interfaces are macvlans tagged by BPF"
                    );
                    self.has_8021q = Some(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !made_vlan {
            let macvlan = NewLink {
                name: name.clone(),
                kind: NewLinkKind::MacVlanBridge {
                    parent: parent.index,
                },
                mtu: parent.mtu,
            };
            self.kernel.links.add(&macvlan).await?;
            self.attach_tagger(&name, vlan)?;
        }
        let m = self
            .link(&name)
            .await?
            .ok_or_else(|| NodeError::Vanished(name.clone()))?;
        self.set_alias(m.index, &name).await?;
        self.arp_settings(&name)?;
        tracing::info!(interface = %name, vlan, parent = %self.parent, "egress sub-interface created");
        Ok(m.index)
    }

    /// Brings the sub-interface `name`'s ARP sysctls to [`SUBIF_ARP`].
    /// Sends the gratuitous ARPs that are due again (see [`GARP_REPEATS`]); returns how long
    /// until the next one is, if any is left. Called on every pass of the Egress controller.
    pub fn repeat_announcements(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let mut next: Option<Duration> = None;
        for (ip, a) in &mut self.announced {
            if a.sent >= GARP_REPEATS {
                continue;
            }
            let due = a.last + GARP_SPACING;
            if due > now {
                next = Some(next.map_or(due - now, |n| n.min(due - now)));
                continue;
            }
            match self.kernel.garp.announce(a.ifindex, a.mac, *ip) {
                Ok(()) => {
                    tracing::debug!(%ip, interface = %a.ifname, n = a.sent + 1, "gratuitous ARP repeated")
                }
                Err(e) => {
                    tracing::warn!(%ip, interface = %a.ifname, error = %error_chain(&e), "gratuitous ARP failed")
                }
            }
            a.sent += 1;
            a.last = now;
            if a.sent < GARP_REPEATS {
                next = Some(next.map_or(GARP_SPACING, |n| n.min(GARP_SPACING)));
            }
        }
        next
    }

    fn arp_settings(&self, name: &str) -> Result<(), NodeError> {
        for (k, want) in SUBIF_ARP {
            let key = crate::kernel::sysctl::conf_key(name, k);
            if self.kernel.sysctl.get(&key).ok().as_deref() == Some(want) {
                continue;
            }
            self.kernel
                .sysctl
                .set(&key, want)
                .map_err(|source| NodeError::Sysctl {
                    interface: name.to_owned(),
                    key: key.clone(),
                    source,
                })?;
            tracing::debug!(interface = %name, key = %key, value = want, "sub-interface sysctl set");
        }
        Ok(())
    }

    /// The dummy device for IPs without `subnetInfo`, created if needed; `None` when the kernel
    /// has no dummy devices.
    async fn ensure_dummy(&mut self) -> Result<Option<u32>, NodeError> {
        if self.has_dummy == Some(false) {
            return Ok(None);
        }
        if let Some(m) = self.link(DUMMY_IFNAME).await? {
            if m.alias.as_deref() != Some(ALIAS) {
                return Err(NodeError::Foreign(DUMMY_IFNAME.to_owned()));
            }
            self.has_dummy = Some(true);
            return Ok(Some(m.index));
        }
        let dummy = NewLink {
            name: DUMMY_IFNAME.to_owned(),
            kind: NewLinkKind::Dummy,
            mtu: None,
        };
        match self.kernel.links.add(&dummy).await {
            Ok(()) => self.has_dummy = Some(true),
            Err(e) if e.is_not_supported() => {
                tracing::info!(
                    "this kernel has no dummy devices; egress IPs without subnetInfo go on the transport interface"
                );
                self.has_dummy = Some(false);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        let m = self
            .link(DUMMY_IFNAME)
            .await?
            .ok_or_else(|| NodeError::Vanished(DUMMY_IFNAME.to_owned()))?;
        self.set_alias(m.index, DUMMY_IFNAME).await?;
        Ok(Some(m.index))
    }

    async fn set_alias(&self, index: u32, name: &str) -> Result<(), NodeError> {
        // The kernel ignores IFLA_IFALIAS when it creates a link: set it on the new link.
        Ok(self.kernel.links.set_alias(index, name, ALIAS).await?)
    }

    fn tagger(&mut self) -> Result<&mut Box<dyn VlanTagging>, NodeError> {
        if self.tagger.is_none() {
            self.tagger = Some((self.load_tagger)().map_err(NodeError::LoadTagger)?);
        }
        Ok(self.tagger.as_mut().expect("just set"))
    }

    fn recorded(&self) -> BTreeSet<(Ipv4Addr, u8)> {
        std::fs::read(&self.record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_record(&self, set: &BTreeSet<(Ipv4Addr, u8)>) -> Result<(), NodeError> {
        crate::pods::store::write_file_atomic(
            &self.record,
            &serde_json::to_vec(set).expect("serialisable"),
        )
        .map_err(|source| NodeError::Record {
            path: self.record.clone(),
            source,
        })
    }

    /// Keeps the sub-interfaces of `vlans` from the next [`EgressNode::apply`] on, whether or
    /// not an IP of theirs is held (a standby node's device is ready before it takes an IP
    /// over). A failure to make one is logged; it is retried on each apply.
    pub fn set_standby(&mut self, vlans: BTreeSet<u16>) {
        self.standby = vlans;
    }

    /// Makes the node hold exactly `held`: interfaces, addresses, tables, rules, `rp_filter`.
    /// Returns per IP where it is (or why not). An error is a failure that concerns all IPs.
    pub async fn apply(&mut self, held: &[HeldIp]) -> Result<Vec<IpOutcome>, NodeError> {
        let mut outcomes = Vec::new();
        let parent = self
            .link(&self.parent)
            .await?
            .ok_or_else(|| NodeError::NoTransport(self.parent.clone()))?;
        let parent_index = parent.index;
        // Sub-interfaces: one per VLAN in use or kept ready.
        let vlans: BTreeSet<u16> = held
            .iter()
            .filter_map(|h| h.subnet.map(|s| s.vlan))
            .filter(|v| *v > 0)
            .chain(self.standby.iter().copied())
            .collect();
        let mut subif: BTreeMap<u16, Result<u32, IpFailure>> = BTreeMap::new();
        for v in &vlans {
            let r = self.ensure_subif(&parent, *v).await;
            subif.insert(*v, r.map_err(|e| IpFailure(Arc::new(e))));
        }
        // A releasing IP of a VLAN subnet leaves its sub-interface for where IPs without a
        // subnet live (the dummy device, or the transport interface), as a /32.
        let quiet = |h: &HeldIp| h.releasing && h.subnet.is_some_and(|s| s.vlan > 0);
        let wants_dummy = held.iter().any(|h| h.subnet.is_none() || quiet(h));
        let dummy = if wants_dummy {
            Some(
                self.ensure_dummy()
                    .await
                    .map_err(|e| IpFailure(Arc::new(e))),
            )
        } else {
            None
        };
        // Where each IP goes: (ifindex, ifname, prefix).
        let mut want_on: BTreeMap<u32, BTreeSet<(Ipv4Addr, u8)>> = BTreeMap::new();
        let mut on_transport: BTreeSet<(Ipv4Addr, u8)> = BTreeSet::new();
        let mut placed: Vec<Placed> = Vec::new();
        // Where each IP's address goes, when not where its routes go (a releasing IP).
        let mut addr_of: BTreeMap<Ipv4Addr, (u32, u8)> = BTreeMap::new();
        for h in held {
            if quiet(h) {
                let on = match &dummy {
                    Some(Ok(Some(i))) => *i,
                    _ => parent_index,
                };
                addr_of.insert(h.ip, (on, 32));
            }
            let (idx, ifname, prefix) = match h.subnet {
                Some(s) if s.vlan > 0 => match &subif[&s.vlan] {
                    Ok(i) => (*i, subif_name(s.vlan), s.prefix_len),
                    Err(e) => {
                        outcomes.push(IpOutcome {
                            ip: h.ip,
                            result: Err(e.clone()),
                        });
                        continue;
                    }
                },
                Some(s) => (parent_index, self.parent.clone(), s.prefix_len),
                None => match &dummy {
                    Some(Ok(Some(i))) => (*i, DUMMY_IFNAME.to_owned(), 32),
                    Some(Err(e)) => {
                        outcomes.push(IpOutcome {
                            ip: h.ip,
                            result: Err(e.clone()),
                        });
                        continue;
                    }
                    _ => (parent_index, self.parent.clone(), 32),
                },
            };
            let (on, p) = addr_of.get(&h.ip).copied().unwrap_or((idx, prefix));
            want_on.entry(on).or_default().insert((h.ip, p));
            if on == parent_index {
                on_transport.insert((h.ip, p));
            }
            placed.push((h.clone(), idx, ifname));
        }
        // Addresses on the transport interface are recorded before they are made, so a crash
        // in between leaves nothing unrecorded.
        let recorded = match &self.on_transport {
            Some(r) => r.clone(),
            None => self.recorded(),
        };
        let both: BTreeSet<(Ipv4Addr, u8)> = recorded.union(&on_transport).copied().collect();
        if both != recorded {
            self.save_record(&both)?;
        }
        // New addresses first, so an IP moving between interfaces (a releasing one) stays
        // local throughout: its routes and in-flight traffic never see it gone.
        for (h, idx, ifname) in &placed {
            let (on, prefix) = addr_of
                .get(&h.ip)
                .copied()
                .unwrap_or((*idx, h.subnet.map_or(32, |s| s.prefix_len)));
            let r = self.kernel.addresses.add(on, h.ip, prefix).await;
            if h.releasing {
                // Never announced again: the gateway is to learn the new holder only.
                self.announced.remove(&h.ip);
            } else if r.is_ok() && !self.announced.contains_key(&h.ip) {
                let mac = self.link(ifname).await?.and_then(|m| m.mac);
                match mac.map(|mac| (mac, self.kernel.garp.announce(*idx, mac, h.ip))) {
                    Some((mac, Ok(()))) => {
                        tracing::info!(ip = %h.ip, interface = %ifname, egress = %h.egress, "egress IP assigned; gratuitous ARP sent");
                        let a = Announced {
                            ifindex: *idx,
                            ifname: ifname.clone(),
                            mac,
                            sent: 1,
                            last: Instant::now(),
                        };
                        self.announced.insert(h.ip, a);
                    }
                    Some((_, Err(e))) => {
                        tracing::warn!(ip = %h.ip, interface = %ifname, error = %error_chain(&e), "gratuitous ARP failed")
                    }
                    None => {
                        tracing::warn!(ip = %h.ip, interface = %ifname, error = %format!("{ifname} has no MAC"), "gratuitous ARP failed")
                    }
                }
            }
            outcomes.push(IpOutcome {
                ip: h.ip,
                result: r
                    .map(|()| ifname.clone())
                    .map_err(|e| IpFailure(Arc::new(e.into()))),
            });
        }
        // Addresses on ferrea's own sub-interfaces: exactly the wanted ones.
        let own = self.own_links().await?;
        for (name, m) in &own {
            let idx = m.index;
            let want = want_on.get(&idx).cloned().unwrap_or_default();
            for (ip, p) in self.kernel.addresses.list(idx).await? {
                if !want.contains(&(ip, p)) {
                    self.kernel.addresses.delete(idx, ip, p).await?;
                    tracing::info!(%ip, interface = %name, "egress IP removed");
                }
            }
        }
        // Addresses on the transport interface: only those ferrea recorded.
        for (ip, p) in both.difference(&on_transport) {
            self.kernel.addresses.delete(parent_index, *ip, *p).await?;
            tracing::info!(%ip, interface = %self.parent, "egress IP removed");
        }
        if both != on_transport {
            self.save_record(&on_transport)?;
        }
        self.on_transport = Some(on_transport);
        self.announced
            .retain(|ip, _| placed.iter().any(|(h, _, _)| h.ip == *ip));
        // Sub-interfaces (and the dummy) no held IP needs.
        for (name, m) in &own {
            let keep = if name == DUMMY_IFNAME {
                wants_dummy
            } else {
                name.strip_prefix(SUBIF_PREFIX)
                    .and_then(|v| v.parse::<u16>().ok())
                    .is_some_and(|v| vlans.contains(&v))
            };
            if !keep {
                if self.kernel.links.delete(m.index, name).await? {
                    tracing::info!(interface = %name, "egress sub-interface removed");
                }
                self.rp.remove(name);
            }
        }
        if self.has_8021q != Some(true)
            && (self.tagger.is_some() || own.keys().any(|n| n.starts_with(SUBIF_PREFIX)))
        {
            let parent = self.parent.clone();
            let keep: Vec<u16> = vlans.iter().copied().collect();
            self.tagger()?
                .retain(&parent, &keep)
                .map_err(|source| NodeError::TagRetain { parent, source })?;
        }
        // Routes and rules.
        let ok: Vec<&Placed> = placed
            .iter()
            .filter(|(h, _, _)| outcomes.iter().any(|o| o.ip == h.ip && o.result.is_ok()))
            .collect();
        self.sync_routes(&ok).await?;
        self.sync_rules(&ok).await?;
        let present: BTreeSet<String> = subif
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(v, _)| subif_name(*v))
            .collect();
        self.sync_shaping(&ok, &present, &own).await;
        // rp_filter where replies come in.
        let mut rp_ifs: BTreeSet<String> = ok
            .iter()
            .filter(|(h, _, _)| h.subnet.is_some_and(|s| s.vlan > 0))
            .map(|(_, _, n)| n.clone())
            .collect();
        if !rp_ifs.is_empty() {
            rp_ifs.insert(self.gateway_if.clone());
        }
        self.rp.retain(|k, _| rp_ifs.contains(k));
        for i in rp_ifs {
            self.rp.entry(i.clone()).or_insert(RpFilterStatus {
                interface: i,
                want: "2".into(),
                found: String::new(),
                restored: 0,
                set: false,
            });
        }
        self.check_rp_filter();
        Ok(outcomes)
    }

    async fn sync_routes(&self, ok: &[&Placed]) -> Result<(), NodeError> {
        let mut want: Vec<TableRoute> = Vec::new();
        let mut seen = BTreeSet::new();
        // The routes' source is an IP that stays, when the subnet has one.
        let mut ok = ok.to_vec();
        ok.sort_by_key(|(h, _, _)| h.releasing);
        for (h, idx, _) in ok {
            let Some(s) = h.subnet else { continue };
            let table = table_of(&s);
            if !seen.insert(table) {
                continue;
            }
            want.push(TableRoute {
                table,
                dst: Some(s.network()),
                gateway: None,
                oif: Some(*idx),
                pref_src: Some(h.ip),
                scope_link: true,
            });
            want.push(TableRoute {
                table,
                dst: None,
                gateway: Some(s.gateway),
                oif: Some(*idx),
                pref_src: None,
                scope_link: false,
            });
        }
        let want_keys: BTreeSet<_> = want.iter().map(TableRoute::key).collect();
        let routes = &self.kernel.routes;
        for r in routes.list(RTPROT_FERREA_EGRESS).await? {
            if !want_keys.contains(&r.key()) {
                routes.delete(RTPROT_FERREA_EGRESS, &r).await?;
            }
        }
        for r in &want {
            routes.replace(RTPROT_FERREA_EGRESS, r).await?;
        }
        Ok(())
    }

    async fn sync_rules(&self, ok: &[&Placed]) -> Result<(), NodeError> {
        // (mark, table) per IP with a subnet.
        let want: BTreeSet<(u32, u32)> = ok
            .iter()
            .filter_map(|(h, _, _)| h.subnet.map(|s| (egress_mark(h.id), table_of(&s))))
            .collect();
        let rules = &self.kernel.rules;
        let mut have = BTreeSet::new();
        let mut stale = Vec::new();
        for r in rules.list(RTPROT_FERREA_EGRESS).await? {
            match r.fwmark {
                Some(mark) if want.contains(&(mark, r.table)) && have.insert((mark, r.table)) => {}
                _ => stale.push(r),
            }
        }
        for r in &stale {
            rules.delete(RTPROT_FERREA_EGRESS, r).await?;
        }
        for (mark, table) in want.difference(&have) {
            let rule = Rule {
                priority: Some(RULE_PRIORITY),
                fwmark: Some(*mark),
                fwmask: Some(EGRESS_MARK_MASK),
                table: *table,
            };
            rules.add(RTPROT_FERREA_EGRESS, &rule).await?;
        }
        Ok(())
    }

    /// Shapes the devices the held IPs with a `bandwidth` leave by: a sub-interface for an IP
    /// of a VLAN subnet, the transport interface for the others (IPs without `subnetInfo` leave
    /// by the main table, which on a node routes off-node traffic there). Devices no such IP
    /// needs any more lose ferrea's qdisc. After a restart every candidate device is checked
    /// once, so a qdisc left by the previous run is found either way. A failure leaves the IPs
    /// assigned (unshaped) and is reported by [`EgressNode::shaping_problems`].
    /// `present` names the sub-interfaces that exist after this pass; `own` those found at its
    /// start.
    async fn sync_shaping(
        &mut self,
        ok: &[&Placed],
        present: &BTreeSet<String>,
        own: &BTreeMap<String, Link>,
    ) {
        let mut want: BTreeMap<String, Vec<ShapedClass>> = BTreeMap::new();
        for (h, _, ifname) in ok {
            let Some(b) = h.bandwidth else { continue };
            let dev = if h.subnet.is_some_and(|s| s.vlan > 0) {
                ifname.clone()
            } else {
                self.parent.clone()
            };
            want.entry(dev).or_default().push(ShapedClass {
                id: h.id,
                rate_bps: b.rate_bps,
                burst_bits: b.burst_bits,
            });
        }
        for v in want.values_mut() {
            v.sort();
        }
        let mut devices: BTreeSet<String> = want.keys().cloned().collect();
        match &self.shaped {
            Some(before) => devices.extend(before.keys().cloned()),
            None => {
                devices.insert(self.parent.clone());
                devices.extend(own.keys().filter(|n| n.starts_with(SUBIF_PREFIX)).cloned());
            }
        }
        let first = self.shaped.is_none();
        let mut shaped = self.shaped.take().unwrap_or_default();
        for dev in devices {
            let classes = want.get(&dev).cloned().unwrap_or_default();
            if dev != self.parent && !present.contains(&dev) {
                // A sub-interface that was removed took its qdisc with it.
                shaped.remove(&dev);
                self.shape_problems.remove(&dev);
                continue;
            }
            let known = shaped.get(&dev).cloned().unwrap_or_default();
            if !first && known == classes && !self.shape_problems.contains_key(&dev) {
                continue;
            }
            match self.kernel.shaping.sync(&dev, &classes).await {
                Ok(()) => {
                    if classes != known {
                        tracing::info!(interface = %dev, classes = classes.len(), "Egress shaping applied");
                    }
                    self.shape_problems.remove(&dev);
                    if classes.is_empty() {
                        shaped.remove(&dev);
                    } else {
                        shaped.insert(dev, classes);
                    }
                }
                Err(e) => {
                    let msg = format!("Egress bandwidth on {dev} not applied: {}", error_chain(&e));
                    tracing::debug!("{msg}");
                    self.shape_problems.insert(dev.clone(), msg);
                    shaped.remove(&dev);
                }
            }
        }
        self.shaped = Some(shaped);
    }

    /// Why the shaping of some device failed, one sentence each.
    pub fn shaping_problems(&self) -> Vec<String> {
        self.shape_problems.values().cloned().collect()
    }

    /// Compares every managed `rp_filter` with what ferrea wants and restores drift. Returns
    /// the interfaces whose value was restored just now.
    pub fn check_rp_filter(&mut self) -> Vec<String> {
        let mut restored = Vec::new();
        let sysctl = &self.kernel.sysctl;
        for st in self.rp.values_mut() {
            let key = crate::kernel::sysctl::conf_key(&st.interface, "rp_filter");
            let found = match sysctl.get(&key) {
                Ok(v) => v,
                Err(e) => {
                    st.found = format!("unreadable: {}", e.source);
                    continue;
                }
            };
            st.found = found.clone();
            if found == st.want {
                st.set = true;
                continue;
            }
            match sysctl.set(&key, &st.want) {
                Ok(()) => {
                    // The first setting is not drift; a later difference is.
                    if st.set {
                        tracing::warn!(interface = %st.interface, found = %found, want = %st.want,
                            "rp_filter was changed by something else; restored");
                        st.restored += 1;
                        restored.push(st.interface.clone());
                    } else {
                        tracing::info!(interface = %st.interface, from = %found, to = %st.want, "rp_filter set");
                    }
                    st.set = true;
                }
                Err(e) => {
                    tracing::error!(interface = %st.interface, error = %e, "setting rp_filter failed");
                }
            }
        }
        restored
    }

    /// The managed `rp_filter`s, for the status view.
    pub fn rp_filter_status(&self) -> Vec<RpFilterStatus> {
        self.rp.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_names() {
        let s = SubnetInfo {
            gateway: Ipv4Addr::new(10, 172, 170, 254),
            prefix_len: 24,
            vlan: 100,
        };
        assert_eq!(table_of(&s), 20100);
        assert_eq!(subif_name(4094), "ferrea-ext.4094");
        assert!(subif_name(4094).len() <= 15, "fits IFNAMSIZ");
        let flat = SubnetInfo { vlan: 0, ..s };
        assert!((25000..30000).contains(&table_of(&flat)));
    }
}
