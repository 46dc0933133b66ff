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
//! - the egress IPs with the pool's prefix length, and a gratuitous ARP for each IP when it is
//!   assigned, so the gateway and neighbours learn the new holder at once (after a failover,
//!   too);
//! - a route table per subnet ([`table_of`]): the subnet on the interface and a default route
//!   via `subnetInfo.gateway`;
//! - an `ip rule` per egress IP: `fwmark <id>/0xff lookup <table>`;
//! - `rp_filter=2` (loose) on the sub-interface and on the pods' gateway interface: replies to
//!   SNATed traffic arrive on the sub-interface from addresses the main table routes
//!   elsewhere, which strict mode (1) drops. Something else on the node may reset it
//!   (OpenShift's node tuning does, Antrea issue 6546), so [`EgressNode::check_rp_filter`]
//!   compares and restores it every second and reports what it found.
//!
//! An IP without `subnetInfo` is a /32 on the dummy device [`DUMMY_IFNAME`], as in Antrea, and
//! leaves through the main table. Kernels without the dummy module (the machine ferrea is
//! tested on) get it as a /32 on the transport interface instead.
//!
//! Routes and rules carry `rtm_protocol` [`RTPROT_FERREA_EGRESS`], so a restarted agent finds
//! exactly its own and removes what no held IP needs. Addresses ferrea put on the transport
//! interface (not its own device) are listed in `<stateDir>/egress-addresses.json`, so they
//! are removed too and nothing else is.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkMessage, MacVlanMode};
use netlink_packet_route::route::{RouteMessage, RouteProtocol, RouteScope};
use netlink_packet_route::rule::{RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkMacVlan, LinkUnspec, LinkVlan, RouteMessageBuilder};

use super::plan::HeldIp;
use crate::net::EGRESS_MARK_MASK;
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
pub trait VlanTagging: Send + Sync {
    /// Frames leaving `child` are tagged `vid`; frames arriving on `parent` tagged `vid` go
    /// to `child` untagged. Idempotent.
    fn attach(&mut self, parent: &str, child: &str, vid: u16) -> Result<(), String>;
    /// Undoes [`Self::attach`] on `parent` for every VLAN not in `keep`.
    fn retain(&mut self, parent: &str, keep: &[u16]) -> Result<(), String>;
}

impl VlanTagging for crate::kernel::vlan::VlanTagger {
    fn attach(&mut self, parent: &str, child: &str, vid: u16) -> Result<(), String> {
        crate::kernel::vlan::VlanTagger::attach(self, parent, child, vid).map_err(|e| e.to_string())
    }

    fn retain(&mut self, parent: &str, keep: &[u16]) -> Result<(), String> {
        let want: Vec<crate::kernel::vlan::VlanSub> = keep
            .iter()
            .map(|v| crate::kernel::vlan::VlanSub {
                parent: parent.to_owned(),
                child: subif_name(*v),
                vid: *v,
            })
            .collect();
        self.sync(&want).map_err(|e| e.to_string())
    }
}

/// Loads the BPF VLAN tagger ([`crate::kernel::vlan`]), for kernels without 802.1Q devices.
pub fn load_vlan_tagger() -> Result<Box<dyn VlanTagging>, String> {
    crate::kernel::vlan::VlanTagger::load()
        .map(|t| Box::new(t) as Box<dyn VlanTagging>)
        .map_err(|e| e.to_string())
}

/// How one held IP fared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpOutcome {
    /// The IP.
    pub ip: Ipv4Addr,
    /// The interface it is on, or the failure.
    pub result: Result<String, String>,
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

/// The node-side state of Egress.
pub struct EgressNode {
    handle: Handle,
    /// The transport interface: the parent of the sub-interfaces.
    parent: String,
    /// The pods' gateway interface (its `rp_filter` is managed too).
    gateway_if: String,
    tagger: Option<Box<dyn VlanTagging>>,
    load_tagger: Box<dyn Fn() -> Result<Box<dyn VlanTagging>, String> + Send + Sync>,
    /// Whether the kernel makes VLAN devices (`None`: not tried yet).
    has_8021q: Option<bool>,
    /// Whether the kernel makes dummy devices (`None`: not tried yet).
    has_dummy: Option<bool>,
    record: PathBuf,
    /// What `record` holds, once read (it is written only when this changes).
    on_transport: Option<BTreeSet<(Ipv4Addr, u8)>>,
    /// IPs already announced by gratuitous ARP while held.
    announced: BTreeSet<Ipv4Addr>,
    rp: BTreeMap<String, RpFilterStatus>,
}

fn nl(what: impl std::fmt::Display, e: rtnetlink::Error) -> String {
    format!("{what}: {e}")
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

impl EgressNode {
    /// Egress for a node whose transport interface is `parent` and whose pods' gateway is
    /// `gateway_if`. `load_tagger` loads the VLAN tagging programs when the first VLAN needs
    /// them on a kernel without 802.1Q.
    pub fn new(
        handle: Handle,
        parent: String,
        gateway_if: String,
        state_dir: &std::path::Path,
        load_tagger: Box<dyn Fn() -> Result<Box<dyn VlanTagging>, String> + Send + Sync>,
    ) -> Self {
        Self {
            handle,
            parent,
            gateway_if,
            tagger: None,
            load_tagger,
            has_8021q: None,
            has_dummy: None,
            record: state_dir.join("egress-addresses.json"),
            on_transport: None,
            announced: BTreeSet::new(),
            rp: BTreeMap::new(),
        }
    }

    async fn link(&self, name: &str) -> Result<Option<LinkMessage>, String> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(nl(format!("looking up {name}"), e)),
        }
    }

    fn alias(m: &LinkMessage) -> Option<&str> {
        m.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfAlias(s) => Some(s.as_str()),
            _ => None,
        })
    }

    fn name(m: &LinkMessage) -> Option<&str> {
        m.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// Ferrea's sub-interfaces on this node, by name.
    async fn own_links(&self) -> Result<BTreeMap<String, LinkMessage>, String> {
        let mut out = BTreeMap::new();
        let mut s = self.handle.link().get().execute();
        while let Some(m) = s.try_next().await.map_err(|e| nl("listing links", e))? {
            if Self::alias(&m) == Some(ALIAS)
                && let Some(n) =
                    Self::name(&m).filter(|n| n.starts_with(SUBIF_PREFIX) || *n == DUMMY_IFNAME)
            {
                out.insert(n.to_owned(), m);
            }
        }
        Ok(out)
    }

    /// Creates (or finds) the sub-interface for `vlan`; returns its index.
    async fn ensure_subif(&mut self, parent: &LinkMessage, vlan: u16) -> Result<u32, String> {
        let name = subif_name(vlan);
        if let Some(m) = self.link(&name).await? {
            if Self::alias(&m) != Some(ALIAS) {
                return Err(format!(
                    "{name} exists and was not created by ferrea (no alias {ALIAS:?}); not touching it"
                ));
            }
            if self.has_8021q != Some(true) && Self::is_macvlan(&m) {
                let parent = self.parent.clone();
                self.tagger()?.attach(&parent, &name, vlan)?;
            }
            return Ok(m.header.index);
        }
        let mtu = parent.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        let mut made_vlan = false;
        if self.has_8021q != Some(false) {
            let mut b = LinkVlan::new(&name, parent.header.index, vlan).up();
            if let Some(m) = mtu {
                b = b.mtu(m);
            }
            match self.handle.link().add(b.build()).execute().await {
                Ok(()) => {
                    self.has_8021q = Some(true);
                    made_vlan = true;
                }
                Err(e) if is_errno(&e, libc::EOPNOTSUPP) => {
                    tracing::info!(
                        "this kernel has no 802.1Q devices (8021q); VLAN sub-interfaces are macvlans tagged by BPF"
                    );
                    self.has_8021q = Some(false);
                }
                Err(e) => return Err(nl(format!("creating VLAN device {name}"), e)),
            }
        }
        if !made_vlan {
            let mut b = LinkMacVlan::new(&name, parent.header.index, MacVlanMode::Bridge).up();
            if let Some(m) = mtu {
                b = b.mtu(m);
            }
            self.handle
                .link()
                .add(b.build())
                .execute()
                .await
                .map_err(|e| nl(format!("creating macvlan {name} on {}", self.parent), e))?;
            let parent = self.parent.clone();
            self.tagger()?.attach(&parent, &name, vlan)?;
        }
        let m = self
            .link(&name)
            .await?
            .ok_or_else(|| format!("{name} vanished right after creation"))?;
        self.set_alias(m.header.index, &name).await?;
        tracing::info!(interface = %name, vlan, parent = %self.parent, "egress sub-interface created");
        Ok(m.header.index)
    }

    /// The dummy device for IPs without `subnetInfo`, created if needed; `None` when the kernel
    /// has no dummy devices.
    async fn ensure_dummy(&mut self) -> Result<Option<u32>, String> {
        if self.has_dummy == Some(false) {
            return Ok(None);
        }
        if let Some(m) = self.link(DUMMY_IFNAME).await? {
            if Self::alias(&m) != Some(ALIAS) {
                return Err(format!(
                    "{DUMMY_IFNAME} exists and was not created by ferrea; not touching it"
                ));
            }
            self.has_dummy = Some(true);
            return Ok(Some(m.header.index));
        }
        let b = rtnetlink::LinkDummy::new(DUMMY_IFNAME).up();
        match self.handle.link().add(b.build()).execute().await {
            Ok(()) => self.has_dummy = Some(true),
            Err(e) if is_errno(&e, libc::EOPNOTSUPP) => {
                tracing::info!(
                    "this kernel has no dummy devices; egress IPs without subnetInfo go on the transport interface"
                );
                self.has_dummy = Some(false);
                return Ok(None);
            }
            Err(e) => return Err(nl(format!("creating {DUMMY_IFNAME}"), e)),
        }
        let m = self
            .link(DUMMY_IFNAME)
            .await?
            .ok_or_else(|| format!("{DUMMY_IFNAME} vanished right after creation"))?;
        self.set_alias(m.header.index, DUMMY_IFNAME).await?;
        Ok(Some(m.header.index))
    }

    async fn set_alias(&self, index: u32, name: &str) -> Result<(), String> {
        // The kernel ignores IFLA_IFALIAS when it creates a link: set it on the new link.
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .append_extra_attribute(LinkAttribute::IfAlias(ALIAS.to_owned()))
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| nl(format!("naming {name} as ferrea's"), e))
    }

    fn is_macvlan(m: &LinkMessage) -> bool {
        use netlink_packet_route::link::{InfoKind, LinkInfo};
        m.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(i) => i
                .iter()
                .any(|x| matches!(x, LinkInfo::Kind(InfoKind::MacVlan))),
            _ => false,
        })
    }

    fn tagger(&mut self) -> Result<&mut Box<dyn VlanTagging>, String> {
        if self.tagger.is_none() {
            self.tagger = Some((self.load_tagger)()?);
        }
        Ok(self.tagger.as_mut().expect("just set"))
    }

    async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, String> {
        let mut out = Vec::new();
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(m) = s.try_next().await.map_err(|e| nl("listing addresses", e))? {
            if m.header.index != index {
                continue;
            }
            for a in &m.attributes {
                if let AddressAttribute::Local(IpAddr::V4(ip)) = a {
                    out.push((*ip, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    async fn add_address(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), String> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(nl(format!("adding {ip}/{prefix}"), e)),
        }
    }

    async fn del_address(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), String> {
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(ip))
            .set_prefix_length_filter(prefix)
            .execute();
        while let Some(m) = s.try_next().await.map_err(|e| nl("listing addresses", e))? {
            match self.handle.address().del(m).execute().await {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(nl(format!("removing {ip}/{prefix}"), e)),
            }
        }
        Ok(())
    }

    fn recorded(&self) -> BTreeSet<(Ipv4Addr, u8)> {
        std::fs::read(&self.record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_record(&self, set: &BTreeSet<(Ipv4Addr, u8)>) -> Result<(), String> {
        crate::pods::store::write_file_atomic(
            &self.record,
            &serde_json::to_vec(set).expect("serialisable"),
        )
        .map_err(|e| format!("writing {}: {e}", self.record.display()))
    }

    /// Makes the node hold exactly `held`: interfaces, addresses, tables, rules, `rp_filter`.
    /// Returns per IP where it is (or why not). An error is a failure that concerns all IPs.
    pub async fn apply(&mut self, held: &[HeldIp]) -> Result<Vec<IpOutcome>, String> {
        let mut outcomes = Vec::new();
        let parent = self
            .link(&self.parent)
            .await?
            .ok_or_else(|| format!("transport interface {} not found", self.parent))?;
        let parent_index = parent.header.index;
        // Sub-interfaces: one per VLAN in use.
        let vlans: BTreeSet<u16> = held
            .iter()
            .filter_map(|h| h.subnet.map(|s| s.vlan))
            .filter(|v| *v > 0)
            .collect();
        let mut subif: BTreeMap<u16, Result<u32, String>> = BTreeMap::new();
        for v in &vlans {
            subif.insert(*v, self.ensure_subif(&parent, *v).await);
        }
        let wants_dummy = held.iter().any(|h| h.subnet.is_none());
        let dummy = if wants_dummy {
            Some(self.ensure_dummy().await)
        } else {
            None
        };
        // Where each IP goes: (ifindex, ifname, prefix).
        let mut want_on: BTreeMap<u32, BTreeSet<(Ipv4Addr, u8)>> = BTreeMap::new();
        let mut on_transport: BTreeSet<(Ipv4Addr, u8)> = BTreeSet::new();
        let mut placed: Vec<(HeldIp, u32, String)> = Vec::new();
        for h in held {
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
            want_on.entry(idx).or_default().insert((h.ip, prefix));
            if idx == parent_index {
                on_transport.insert((h.ip, prefix));
            }
            placed.push((h.clone(), idx, ifname));
        }
        // Addresses on ferrea's own sub-interfaces: exactly the wanted ones.
        let own = self.own_links().await?;
        for (name, m) in &own {
            let idx = m.header.index;
            let want = want_on.get(&idx).cloned().unwrap_or_default();
            for (ip, p) in self.addresses(idx).await? {
                if !want.contains(&(ip, p)) {
                    self.del_address(idx, ip, p).await?;
                    tracing::info!(%ip, interface = %name, "egress IP removed");
                }
            }
        }
        // Addresses on the transport interface: only those ferrea recorded.
        let recorded = match &self.on_transport {
            Some(r) => r.clone(),
            None => self.recorded(),
        };
        for (ip, p) in recorded.difference(&on_transport) {
            self.del_address(parent_index, *ip, *p).await?;
            tracing::info!(%ip, interface = %self.parent, "egress IP removed");
        }
        if recorded != on_transport {
            self.save_record(&on_transport)?;
        }
        self.on_transport = Some(on_transport);
        for (h, idx, ifname) in &placed {
            let prefix = h.subnet.map_or(32, |s| s.prefix_len);
            let r = self.add_address(*idx, h.ip, prefix).await;
            if r.is_ok() && !self.announced.contains(&h.ip) {
                let mac = self.link(ifname).await?.and_then(|m| {
                    m.attributes.iter().find_map(|a| match a {
                        LinkAttribute::Address(a) if a.len() == 6 => {
                            Some(<[u8; 6]>::try_from(a.as_slice()).expect("6 bytes"))
                        }
                        _ => None,
                    })
                });
                let sent = match mac {
                    Some(mac) => send_garp(*idx, mac, h.ip),
                    None => Err(format!("{ifname} has no MAC")),
                };
                match sent {
                    Ok(()) => {
                        tracing::info!(ip = %h.ip, interface = %ifname, egress = %h.egress, "egress IP assigned; gratuitous ARP sent");
                        self.announced.insert(h.ip);
                    }
                    Err(e) => {
                        tracing::warn!(ip = %h.ip, interface = %ifname, error = %e, "gratuitous ARP failed")
                    }
                }
            }
            outcomes.push(IpOutcome {
                ip: h.ip,
                result: r.map(|()| ifname.clone()),
            });
        }
        self.announced
            .retain(|ip| placed.iter().any(|(h, _, _)| h.ip == *ip));
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
                match self.handle.link().del(m.header.index).execute().await {
                    Ok(()) => tracing::info!(interface = %name, "egress sub-interface removed"),
                    Err(e) if is_errno(&e, libc::ENODEV) => {}
                    Err(e) => return Err(nl(format!("removing {name}"), e)),
                }
                self.rp.remove(name);
            }
        }
        if self.has_8021q != Some(true)
            && (self.tagger.is_some() || own.keys().any(|n| n.starts_with(SUBIF_PREFIX)))
        {
            let parent = self.parent.clone();
            let keep: Vec<u16> = vlans.iter().copied().collect();
            self.tagger()?.retain(&parent, &keep)?;
        }
        // Routes and rules.
        let ok: Vec<&(HeldIp, u32, String)> = placed
            .iter()
            .filter(|(h, _, _)| outcomes.iter().any(|o| o.ip == h.ip && o.result.is_ok()))
            .collect();
        self.sync_routes(&ok).await?;
        self.sync_rules(&ok).await?;
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

    async fn sync_routes(&self, ok: &[&(HeldIp, u32, String)]) -> Result<(), String> {
        let mut want: Vec<RouteMessage> = Vec::new();
        let mut seen = BTreeSet::new();
        for (h, idx, _) in ok {
            let Some(s) = h.subnet else { continue };
            let table = table_of(&s);
            if !seen.insert(table) {
                continue;
            }
            let net = s.network();
            want.push(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(net.network(), net.prefix())
                    .output_interface(*idx)
                    .pref_source(h.ip)
                    .scope(RouteScope::Link)
                    .table_id(table)
                    .protocol(RouteProtocol::Other(RTPROT_FERREA_EGRESS))
                    .build(),
            );
            want.push(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .output_interface(*idx)
                    .gateway(s.gateway)
                    .table_id(table)
                    .protocol(RouteProtocol::Other(RTPROT_FERREA_EGRESS))
                    .build(),
            );
        }
        let key = |m: &RouteMessage| {
            use netlink_packet_route::route::{RouteAddress, RouteAttribute};
            let mut table = u32::from(m.header.table);
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    RouteAttribute::Oif(o) => oif = Some(*o),
                    _ => {}
                }
            }
            (table, dst, m.header.destination_prefix_length, gw, oif)
        };
        let want_keys: BTreeSet<_> = want.iter().map(key).collect();
        let mut stale = Vec::new();
        let mut s = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(m) = s.try_next().await.map_err(|e| nl("listing routes", e))? {
            if m.header.protocol == RouteProtocol::Other(RTPROT_FERREA_EGRESS)
                && !want_keys.contains(&key(&m))
            {
                stale.push(m);
            }
        }
        for m in stale {
            match self.handle.route().del(m).execute().await {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::ESRCH) => {}
                Err(e) => return Err(nl("removing an egress route", e)),
            }
        }
        for m in want {
            self.handle
                .route()
                .add(m)
                .replace()
                .execute()
                .await
                .map_err(|e| nl("adding an egress route", e))?;
        }
        Ok(())
    }

    async fn sync_rules(&self, ok: &[&(HeldIp, u32, String)]) -> Result<(), String> {
        // (mark, table) per IP with a subnet.
        let want: BTreeSet<(u32, u32)> = ok
            .iter()
            .filter_map(|(h, _, _)| h.subnet.map(|s| (u32::from(h.id), table_of(&s))))
            .collect();
        let rule_key = |m: &RuleMessage| {
            let mut mark = None;
            let mut table = u32::from(m.header.table);
            for a in &m.attributes {
                match a {
                    RuleAttribute::FwMark(x) => mark = Some(*x),
                    RuleAttribute::Table(t) => table = *t,
                    _ => {}
                }
            }
            (mark, table)
        };
        let mut have = BTreeSet::new();
        let mut stale = Vec::new();
        let mut s = self.handle.rule().get(IpVersion::V4).execute();
        while let Some(m) = s.try_next().await.map_err(|e| nl("listing rules", e))? {
            let ours = m.attributes.iter().any(|a| {
                matches!(a, RuleAttribute::Protocol(p) if *p == RouteProtocol::Other(RTPROT_FERREA_EGRESS))
            });
            if !ours {
                continue;
            }
            match rule_key(&m) {
                (Some(mark), table)
                    if want.contains(&(mark, table)) && have.insert((mark, table)) => {}
                _ => stale.push(m),
            }
        }
        for m in stale {
            match self.handle.rule().del(m).execute().await {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::ENOENT) => {}
                Err(e) => return Err(nl("removing an egress rule", e)),
            }
        }
        for (mark, table) in want.difference(&have) {
            let mut req = self
                .handle
                .rule()
                .add()
                .v4()
                .fw_mark(*mark)
                .table_id(*table)
                .action(netlink_packet_route::rule::RuleAction::ToTable)
                .priority(RULE_PRIORITY);
            let msg = req.message_mut();
            msg.attributes.push(RuleAttribute::FwMask(EGRESS_MARK_MASK));
            msg.attributes
                .push(RuleAttribute::Protocol(RouteProtocol::Other(
                    RTPROT_FERREA_EGRESS,
                )));
            req.execute()
                .await
                .map_err(|e| nl(format!("adding rule fwmark {mark:#x} lookup {table}"), e))?;
        }
        Ok(())
    }

    /// Compares every managed `rp_filter` with what ferrea wants and restores drift. Returns
    /// the interfaces whose value was restored just now.
    pub fn check_rp_filter(&mut self) -> Vec<String> {
        let mut restored = Vec::new();
        for st in self.rp.values_mut() {
            let key = crate::kernel::sysctl::conf_key(&st.interface, "rp_filter");
            let found = match crate::kernel::sysctl::get(&key) {
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
            match crate::kernel::sysctl::set(&key, &st.want) {
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

/// Sends one gratuitous ARP (a request for `ip` from `ip`, to broadcast) out of `ifindex`,
/// with the interface's own MAC. A raw `AF_PACKET` socket: no crate does this small thing,
/// and `arping` is not something a node agent should depend on.
#[allow(unsafe_code)]
fn send_garp(ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> Result<(), String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ARP as u16).to_be() as i32,
        )
    };
    if fd < 0 {
        return Err(format!(
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
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
    // SAFETY: sockaddr_ll is plain old data; zero is valid for every field.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
    sa.sll_ifindex = ifindex as i32;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: frame and sa outlive the call; lengths are theirs.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if n < 0 {
        return Err(format!("sending: {}", std::io::Error::last_os_error()));
    }
    Ok(())
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
