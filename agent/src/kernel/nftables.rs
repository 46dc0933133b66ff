//! ferrea's nftables table: masquerade of pod traffic that leaves the cluster, the DNAT of
//! NodePortLocal, ferrea's service proxy for what reaches the stack ([`ServiceRules`]), and
//! (chain `tunnel_snat`) an SNAT to the gateway address for connections of
//! the node or the outside world that someone (kube-proxy) DNATed into the overlay, so their
//! replies come back through the overlay to this node's stack instead of being masqueraded
//! on the backend's node.
//!
//! ferrea owns one table (family `ip`, name from config, default `ferrea`) and nothing else in
//! the ruleset. The whole table is rendered from the desired state and replaced in one nft
//! transaction (`table; delete table; table {...}` in a single `nft -f` run is atomic in the
//! kernel), so there is never a moment without masquerade and re-applying is idempotent.
//!
//! [`NatTable`] is the table's single owner: it holds the base [`NatSpec`] and the current
//! [`NplRules`], re-renders the whole table when either changes and runs `nft` only when the
//! text differs from what was last applied, so masquerade and NodePortLocal never overwrite
//! each other and no rule of a previous state survives a change.
//!
//! NodePortLocal rules are two verdict maps (`npl_tcp`, `npl_udp`: node port to pod address
//! and port) consulted by one DNAT rule each, for packets to the node IP arriving from outside
//! (`prerouting`) and sent by the node itself (`output`): a lookup stays O(1) with thousands of
//! mappings and a change of 100 pods is one small nft transaction. Replies are un-NATed by
//! conntrack: pods' traffic to addresses that are not pods passes the node's stack on both
//! dataplanes. A pod reaching another pod (or itself) through `nodeIP:nodePort` is masqueraded
//! so that the reply comes back through the node too (hairpin).
//!
//! Why the `nft` binary and not a netlink library: nftables' netlink ABI is expressed in
//! bytecode that only libnftables assembles; the Rust crates either shell out to `nft` too
//! (the `nftables` crate) or need hand-written expressions (rustables). Rule changes are off
//! the CNI path (start-up and desired-state changes), so one process per change costs nothing.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use ipnetwork::Ipv4Network;
use tokio::io::AsyncWriteExt;

use crate::source::Protocol;

mod services;
pub use services::{SERVICE_MASQ_MARK, ServiceRules};

/// Errors applying the table.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// `nft` could not be run.
    #[error("running nft: {0}")]
    Spawn(#[source] std::io::Error),
    /// `nft` rejected the ruleset.
    #[error("nft rejected table {table}: {stderr}")]
    Rejected {
        /// The table.
        table: String,
        /// nft's message.
        stderr: String,
    },
}

/// Loads nftables scripts: the one side effect of this module.
///
/// Contract: [`Nftables::load`] runs `script` as one nft transaction, so it is
/// all-or-nothing (the kernel applies all of it or none); a script that starts with
/// `table; delete table` replaces the table whether or not it existed. Safe to call
/// concurrently (the kernel serialises transactions), though [`NatTable`] never does.
#[async_trait]
pub trait Nftables: Send + Sync {
    /// Runs `script` (which concerns `table`, named in errors) as one transaction.
    async fn load(&self, table: &str, script: &str) -> Result<(), NatError>;
}

/// [`Nftables`] through the `nft` binary (`nft -f -`), in the caller's network namespace.
#[derive(Clone, Copy, Debug, Default)]
pub struct NftCommand;

#[async_trait]
impl Nftables for NftCommand {
    async fn load(&self, table: &str, script: &str) -> Result<(), NatError> {
        run_nft(script, table).await
    }
}

/// The desired content of ferrea's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatSpec {
    /// Table name.
    pub table: String,
    /// This node's pod CIDR (sources to masquerade).
    pub pod_cidr: Ipv4Network,
    /// Destinations that are never masqueraded: cluster pod CIDRs, the service CIDR.
    pub no_masquerade: Vec<Ipv4Network>,
    /// Whether to masquerade at all.
    pub masquerade: bool,
    /// The pods' gateway address.
    pub gateway: Ipv4Addr,
}

impl NatSpec {
    /// The nft script that replaces the table atomically.
    pub fn render(&self) -> String {
        self.render_with(&[])
    }

    /// [`NatSpec::render`] with `cluster` (the pod CIDRs of the cluster's nodes, as they come
    /// and go) also never masqueraded.
    pub fn render_with(&self, cluster: &[Ipv4Network]) -> String {
        let t = &self.table;
        let mut s = format!("table ip {t}\ndelete table ip {t}\ntable ip {t} {{\n");
        // kube-proxy (or anyone) DNATing a connection of the node itself or of the outside
        // world (a NodePort) to another node's pod, and masquerading it: the masquerade
        // address would be the first of the node's devices (the tunnel device has none), the
        // transport address, so the backend's reply would leave its node un-tunnelled and be
        // masqueraded there. SNAT to the gateway address instead, which is in this node's pod
        // CIDR: the reply comes back through the overlay to this node's stack. Before the
        // masquerade chains (srcnat); only one NAT of a kind applies to a connection. The OVS
        // backend's tunnel is inside its bridge: there, packets for other nodes' pods leave
        // the stack through the gateway port, and the same holds for them. Un-masqueraded
        // connections of the node itself (its address as the source) need it most: the
        // backend's node would otherwise masquerade the reply mid-connection.
        s.push_str(&format!(
            "  chain tunnel_snat {{\n    type nat hook postrouting priority srcnat - 5; policy accept;\n\
             \x20   oifname \"{tun}\" ct status dnat ip saddr != {cidr} counter snat ip to {gw} \
             comment \"ferrea: NATed connections into the overlay come back here\"\n\
             \x20   oifname \"{gw_if}\" ct status dnat ip saddr != {cidr} ip daddr != {cidr} counter snat ip to {gw} \
             comment \"ferrea: the same through the OVS bridge, which tunnels to other nodes' pods\"\n",
            tun = crate::net::TUNNEL_IFNAME,
            gw_if = crate::net::GATEWAY_IFNAME,
            cidr = self.pod_cidr,
            gw = self.gateway,
        ));
        s.push_str(
            "  }\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
        );
        if self.masquerade {
            // The node's own pod CIDR is always among them; nested CIDRs are dropped, as nft's
            // anonymous sets refuse overlapping intervals.
            let dst: Vec<String> = crate::net::outermost(
                self.no_masquerade
                    .iter()
                    .chain(cluster)
                    .copied()
                    .chain([self.pod_cidr]),
            )
            .iter()
            .map(|c| c.to_string())
            .collect();
            s.push_str(&format!(
                "    ip saddr {} ip daddr != {{ {} }} counter masquerade comment \"ferrea: pods to outside the cluster\"\n",
                self.pod_cidr,
                dst.join(", ")
            ));
        }
        s.push_str("  }\n}\n");
        s
    }
}

/// One NodePortLocal DNAT: `node_ip:node_port` over `protocol` goes to `pod_ip:pod_port`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NplDnat {
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// The node port.
    pub node_port: u16,
    /// The pod's address.
    pub pod_ip: Ipv4Addr,
    /// The pod's port.
    pub pod_port: u16,
}

/// The NodePortLocal part of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NplRules {
    /// The node address the node ports are exposed on.
    pub node_ip: Ipv4Addr,
    /// The mappings (any order; rendered sorted).
    pub dnat: Vec<NplDnat>,
}

impl NplRules {
    /// The nft block adding NodePortLocal maps and chains to `table` (merged into the table
    /// by the same transaction that recreates it). `pod_cidr` is masqueraded on hairpin.
    pub fn render(&self, table: &str, pod_cidr: Ipv4Network) -> String {
        use std::fmt::Write;
        let mut dnat = self.dnat.clone();
        dnat.sort();
        let node_ip = self.node_ip;
        let mut s = format!("table ip {table} {{\n");
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let p = proto.as_str();
            let _ = write!(
                s,
                "  map npl_{p} {{\n    type inet_service : ipv4_addr . inet_service\n"
            );
            let elems: Vec<String> = dnat
                .iter()
                .filter(|d| d.protocol == proto)
                .map(|d| format!("{} : {} . {}", d.node_port, d.pod_ip, d.pod_port))
                .collect();
            if !elems.is_empty() {
                let _ = writeln!(s, "    elements = {{ {} }}", elems.join(",\n      "));
            }
            s.push_str("  }\n");
        }
        // `dstnat` is not accepted for the output hook by nft 1.0; -100 is its value.
        let _ = write!(
            s,
            "  chain npl_prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n\
             \x20   ip daddr {node_ip} jump npl\n  }}\n\
             \x20 chain npl_output {{\n    type nat hook output priority -100; policy accept;\n\
             \x20   ip daddr {node_ip} jump npl\n  }}\n\
             \x20 chain npl {{\n\
             \x20   dnat ip to tcp dport map @npl_tcp comment \"ferrea: NodePortLocal\"\n\
             \x20   dnat ip to udp dport map @npl_udp comment \"ferrea: NodePortLocal\"\n  }}\n\
             \x20 chain npl_postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   ip saddr {pod_cidr} ct status dnat ct original ip daddr {node_ip} counter masquerade \
             comment \"ferrea: NodePortLocal hairpin\"\n  }}\n}}\n"
        );
        s
    }
}

/// The Egress part of the table: marking in prerouting, SNAT by mark in postrouting.
///
/// - `egress_mark` (filter, prerouting, priority mangle): packets to cluster destinations
///   return at once; packets from local pods whose Egress IP this node holds get the fwmark
///   of its id (one map lookup by source); packets the OVS backend hands over with a marker
///   source MAC ([`crate::net::egress_marker_mac`]) get the id it carries. The eBPF
///   backend marks tunnelled packets itself. Routing then sees the mark, and the policy rule
///   of the id sends the packet to the egress subnet's table.
/// - `egress_snat` (nat, postrouting, priority srcnat - 10, so before masquerade): a packet
///   whose mark carries an id is SNATed to that id's egress IP (one map lookup, however many
///   IPs the node holds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressRules {
    /// Destinations never marked (cluster pod CIDRs, service CIDR, node addresses).
    pub exempt: Vec<Ipv4Network>,
    /// Local pods to mark: (pod IP, id).
    pub marks: Vec<(Ipv4Addr, crate::net::EgressId)>,
    /// The ids this node holds, with their egress IP.
    pub snat: Vec<(crate::net::EgressId, Ipv4Addr)>,
    /// The held ids whose Egress has a `bandwidth`: their packets get the `skb->priority` of
    /// their HTB class ([`crate::kernel::shaping::priority_of`]).
    pub shaped: Vec<crate::net::EgressId>,
}

impl EgressRules {
    /// The nft block adding the Egress chains to `table`.
    pub fn render(&self, table: &str) -> String {
        use std::fmt::Write;
        let mask = crate::net::EGRESS_MARK_MASK;
        let mut s = format!(
            "table ip {table} {{\n  chain egress_mark {{\n    type filter hook prerouting priority mangle; policy accept;\n"
        );
        // nft rejects overlapping intervals in one set: keep only the outermost networks.
        let outer: Vec<&Ipv4Network> = self
            .exempt
            .iter()
            .enumerate()
            .filter(|(i, c)| {
                !self.exempt.iter().enumerate().any(|(j, o)| {
                    j != *i
                        && o.contains(c.network())
                        && (o.prefix() < c.prefix() || (o.prefix() == c.prefix() && j < *i))
                })
            })
            .map(|(_, c)| c)
            .collect();
        if !outer.is_empty() {
            let ex: Vec<String> = outer.iter().map(|c| c.to_string()).collect();
            let _ = writeln!(s, "    ip daddr {{ {} }} return", ex.join(", "));
        }
        use crate::net::egress_mark;
        map_rule(
            &mut s,
            self.marks
                .iter()
                .map(|(ip, id)| format!("{ip} : {:#x}", egress_mark(*id))),
            |m| format!("meta mark set ip saddr map {m} comment \"ferrea: Egress of local pods\""),
        );
        // One map lookup per packet, however many ids this node holds.
        map_rule(
            &mut s,
            self.snat.iter().map(|(id, _)| {
                let mac = crate::net::egress_marker_mac(*id)
                    .map(|b| format!("{b:02x}"))
                    .join(":");
                format!("{mac} : {:#x}", egress_mark(*id))
            }),
            |m| {
                format!(
                    "meta mark set ether saddr map {m} comment \"ferrea: Egress from other nodes (OVS)\""
                )
            },
        );
        s.push_str("  }\n  chain egress_snat {\n    type nat hook postrouting priority srcnat - 10; policy accept;\n");
        map_rule(
            &mut s,
            self.snat
                .iter()
                .map(|(id, ip)| format!("{:#x} : {ip}", egress_mark(*id))),
            |m| {
                format!(
                    "meta mark & {mask:#x} != 0 counter snat ip to meta mark & {mask:#x} map {m} comment \"ferrea: Egress\""
                )
            },
        );
        s.push_str("  }\n");
        if !self.shaped.is_empty() {
            // After routing and forwarding (which resets the priority from the TOS), before
            // the qdisc of the device the packet leaves by.
            s.push_str("  chain egress_shape {\n    type filter hook postrouting priority mangle; policy accept;\n");
            map_rule(
                &mut s,
                self.shaped.iter().map(|id| {
                    let p = crate::kernel::shaping::priority_of(*id);
                    format!("{:#x} : {:x}:{:x}", egress_mark(*id), p >> 16, p & 0xffff)
                }),
                |m| {
                    format!(
                        "meta mark & {mask:#x} != 0 meta priority set meta mark & {mask:#x} map {m} comment \"ferrea: Egress bandwidth\""
                    )
                },
            );
            s.push_str("  }\n");
        }
        s.push_str("}\n");
        s
    }
}

/// Appends the rule `rule("{ <entries> }")` to `s`, or nothing when there is no entry (nft
/// refuses an empty anonymous map).
fn map_rule(s: &mut String, entries: impl Iterator<Item = String>, rule: impl Fn(&str) -> String) {
    let m: Vec<String> = entries.collect();
    if !m.is_empty() {
        s.push_str("    ");
        s.push_str(&rule(&format!("{{ {} }}", m.join(", "))));
        s.push('\n');
    }
}

/// The single owner of ferrea's table: the base [`NatSpec`] plus the NodePortLocal and
/// Egress rules, rendered together and applied only when the text changed.
pub struct NatTable {
    base: NatSpec,
    nft: Arc<dyn Nftables>,
    state: tokio::sync::Mutex<TableState>,
}

struct TableState {
    /// The nodes' pod CIDRs (see [`NatTable::set_cluster_cidrs`]).
    cluster: Vec<Ipv4Network>,
    npl: Option<NplRules>,
    egress: Option<EgressRules>,
    services: Option<ServiceRules>,
    applied: Option<String>,
}

impl NatTable {
    /// An owner for `base` with these NodePortLocal rules (`None`: NPL is off), applied
    /// with `nft`. Nothing is applied until [`NatTable::apply`].
    pub fn new(base: NatSpec, npl: Option<NplRules>) -> Self {
        Self::with_nftables(base, npl, Arc::new(NftCommand))
    }

    /// [`NatTable::new`] applying through `nft` (a fake in unit tests).
    pub fn with_nftables(base: NatSpec, npl: Option<NplRules>, nft: Arc<dyn Nftables>) -> Self {
        Self {
            base,
            nft,
            state: tokio::sync::Mutex::new(TableState {
                cluster: Vec::new(),
                npl,
                egress: None,
                services: None,
                applied: None,
            }),
        }
    }

    /// The base spec.
    pub fn base(&self) -> &NatSpec {
        &self.base
    }

    fn render(&self, st: &TableState) -> String {
        let mut s = self.render_parts(&st.cluster, st.npl.as_ref(), st.egress.as_ref());
        if let Some(r) = &st.services {
            s.push_str(&r.render(&self.base.table, self.base.pod_cidr));
        }
        s
    }

    fn render_parts(
        &self,
        cluster: &[Ipv4Network],
        npl: Option<&NplRules>,
        egress: Option<&EgressRules>,
    ) -> String {
        let mut s = self.base.render_with(cluster);
        if let Some(n) = npl {
            s.push_str(&n.render(&self.base.table, self.base.pod_cidr));
        }
        if let Some(e) = egress {
            s.push_str(&e.render(&self.base.table));
        }
        s
    }

    /// The NodePortLocal rules in the kernel: those of the last successful load, `None`
    /// when NPL is off or when the last change has not been loaded (a failed nft run).
    pub async fn installed_npl(&self) -> Option<NplRules> {
        let st = self.state.lock().await;
        let current = self.render(&st);
        (st.applied.as_deref() == Some(current.as_str()))
            .then(|| st.npl.clone())
            .flatten()
    }

    /// The Egress rules in the kernel: those of the last successful load, `None` when there
    /// are none or when the last change has not been loaded (a failed nft run).
    pub async fn installed_egress(&self) -> Option<EgressRules> {
        let st = self.state.lock().await;
        let current = self.render(&st);
        (st.applied.as_deref() == Some(current.as_str()))
            .then(|| st.egress.clone())
            .flatten()
    }

    /// Renders and applies the whole table, whatever was applied before.
    pub async fn apply(&self) -> Result<(), NatError> {
        let mut st = self.state.lock().await;
        let text = self.render(&st);
        self.nft.load(&self.base.table, &text).await?;
        st.applied = Some(text);
        Ok(())
    }

    /// Replaces the NodePortLocal rules and applies the table if its text changed. Returns
    /// whether nft ran. After a failure the next call tries again.
    pub async fn set_npl(&self, npl: Option<NplRules>) -> Result<bool, NatError> {
        let mut st = self.state.lock().await;
        st.npl = npl;
        self.apply_changed(&mut st).await
    }

    /// Replaces the Egress rules (`None`: no Egress chains) and applies the table if its text
    /// changed. Returns whether nft ran. After a failure the next call tries again.
    pub async fn set_egress(&self, egress: Option<EgressRules>) -> Result<bool, NatError> {
        let mut st = self.state.lock().await;
        st.egress = egress;
        self.apply_changed(&mut st).await
    }

    /// Replaces the Service rules (`None`: ferrea's proxy is off, no Service chains) and
    /// applies the table if its text changed. Returns whether nft ran. After a failure the next
    /// call tries again.
    pub async fn set_services(&self, services: Option<ServiceRules>) -> Result<bool, NatError> {
        let mut st = self.state.lock().await;
        st.services = services;
        self.apply_changed(&mut st).await
    }

    /// The Service rules of the last successful load (`None` when the proxy is off or the last
    /// change has not been loaded).
    pub async fn installed_services(&self) -> Option<ServiceRules> {
        let st = self.state.lock().await;
        let current = self.render(&st);
        (st.applied.as_deref() == Some(current.as_str()))
            .then(|| st.services.clone())
            .flatten()
    }

    /// Replaces the pod CIDRs of the cluster's nodes, which are never masqueraded besides the
    /// configured ones, and applies the table if its text changed. Returns whether nft ran.
    /// A table never applied is applied by the first call. After a failure the next call
    /// tries again.
    pub async fn set_cluster_cidrs(&self, cidrs: Vec<Ipv4Network>) -> Result<bool, NatError> {
        let mut st = self.state.lock().await;
        st.cluster = crate::net::outermost(cidrs);
        self.apply_changed(&mut st).await
    }

    async fn apply_changed(&self, st: &mut TableState) -> Result<bool, NatError> {
        let text = self.render(st);
        if st.applied.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        // A failed run leaves `applied` as it was: the next call differs and tries again.
        st.applied = None;
        self.nft.load(&self.base.table, &text).await?;
        st.applied = Some(text);
        Ok(true)
    }
}

/// Applies `spec`, replacing ferrea's table and nothing else.
pub async fn apply(spec: &NatSpec) -> Result<(), NatError> {
    run_nft(&spec.render(), &spec.table).await
}

/// The NodePortLocal DNATs that `table` holds in the kernel now (`nft -j list map`), to
/// rebuild the mappings a lost state store held: the table outlives the agent. A table or map
/// that does not exist holds none.
pub async fn installed_npl(table: &str) -> Result<Vec<NplDnat>, NatError> {
    let mut out = Vec::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let map = format!("npl_{}", protocol.as_str());
        let o = tokio::process::Command::new("nft")
            .args(["-j", "list", "map", "ip", table, &map])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(NatError::Spawn)?;
        if o.status.success() {
            out.extend(parse_npl_map(&String::from_utf8_lossy(&o.stdout), protocol));
        }
    }
    Ok(out)
}

/// The elements of one NodePortLocal map in `nft -j` output:
/// `"elem": [[61000, {"concat": ["10.244.1.5", 8080]}], ...]`. Elements of another shape are
/// skipped.
fn parse_npl_map(json: &str, protocol: Protocol) -> Vec<NplDnat> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let items = v["nftables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    items
        .iter()
        .filter_map(|i| i["map"]["elem"].as_array())
        .flatten()
        .filter_map(|e| {
            let node_port = u16::try_from(e[0].as_u64()?).ok()?;
            let c = e[1]["concat"].as_array()?;
            Some(NplDnat {
                protocol,
                node_port,
                pod_ip: c.first()?.as_str()?.parse().ok()?,
                pod_port: u16::try_from(c.get(1)?.as_u64()?).ok()?,
            })
        })
        .collect()
}

async fn run_nft(script: &str, table: &str) -> Result<(), NatError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NatError::Spawn)?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(script.as_bytes())
        .await
        .map_err(NatError::Spawn)?;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(NatError::Spawn)?;
    if !out.status.success() {
        return Err(NatError::Rejected {
            table: table.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npl_maps_are_read_back_from_nft_json() {
        // As nft 1.0.6 prints `nft -j list map ip ferrea npl_tcp`.
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"map": {"family": "ip", "name": "npl_tcp", "table": "ferrea", "type": "inet_service", "handle": 1, "map": "ipv4_addr . inet_service", "elem": [[61000, {"concat": ["10.244.1.5", 8080]}], [61001, {"concat": ["10.244.1.6", 80]}], [70000, {"concat": ["10.244.1.7", 80]}]]}}]}"#;
        assert_eq!(
            parse_npl_map(json, Protocol::Tcp),
            vec![
                NplDnat {
                    protocol: Protocol::Tcp,
                    node_port: 61000,
                    pod_ip: Ipv4Addr::new(10, 244, 1, 5),
                    pod_port: 8080
                },
                NplDnat {
                    protocol: Protocol::Tcp,
                    node_port: 61001,
                    pod_ip: Ipv4Addr::new(10, 244, 1, 6),
                    pod_port: 80
                },
            ]
        );
        // An empty map has no `elem`; garbage holds nothing.
        let empty =
            r#"{"nftables": [{"map": {"name": "npl_udp", "map": "ipv4_addr . inet_service"}}]}"#;
        assert!(parse_npl_map(empty, Protocol::Udp).is_empty());
        assert!(parse_npl_map("Error: No such file", Protocol::Udp).is_empty());
    }

    #[test]
    fn render_masquerades_pod_cidr_except_cluster_destinations() {
        let spec = NatSpec {
            table: "ferrea".into(),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
            no_masquerade: vec![
                "10.244.0.0/16".parse().unwrap(),
                "10.96.0.0/12".parse().unwrap(),
            ],
            masquerade: true,
            gateway: Ipv4Addr::new(10, 244, 1, 1),
        };
        let r = spec.render();
        assert!(r.starts_with("table ip ferrea\ndelete table ip ferrea\n"));
        assert!(r.contains(
            "ip saddr 10.244.1.0/24 ip daddr != { 10.96.0.0/12, 10.244.0.0/16 } counter masquerade"
        ));
        assert!(
            r.contains(
                "oifname \"ferrea-tun0\" ct status dnat ip saddr != 10.244.1.0/24 counter snat ip to 10.244.1.1"
            ),
            "{r}"
        );
        // The nodes' pod CIDRs join them; those inside a configured CIDR add nothing (nft
        // refuses overlapping elements in an anonymous set).
        let with_nodes = spec.render_with(&[
            "10.244.7.0/24".parse().unwrap(),
            "192.168.9.0/24".parse().unwrap(),
        ]);
        assert!(
            with_nodes.contains(
                "ip daddr != { 10.96.0.0/12, 10.244.0.0/16, 192.168.9.0/24 } counter masquerade"
            ),
            "{with_nodes}"
        );
        let off = NatSpec {
            masquerade: false,
            ..spec
        };
        assert!(!off.render().contains("masquerade"));
    }

    #[test]
    fn render_adds_own_pod_cidr_when_cluster_cidrs_do_not_cover_it() {
        let spec = NatSpec {
            table: "t".into(),
            pod_cidr: "10.1.0.0/24".parse().unwrap(),
            no_masquerade: vec![],
            masquerade: true,
            gateway: Ipv4Addr::new(10, 1, 0, 1),
        };
        assert!(spec.render().contains("ip daddr != { 10.1.0.0/24 }"));
    }

    #[test]
    fn npl_rules_render_sorted_maps_per_protocol_and_hooks_on_the_node_ip() {
        let npl = NplRules {
            node_ip: Ipv4Addr::new(172, 18, 0, 11),
            dnat: vec![
                NplDnat {
                    protocol: Protocol::Tcp,
                    node_port: 61001,
                    pod_ip: Ipv4Addr::new(10, 244, 1, 3),
                    pod_port: 80,
                },
                NplDnat {
                    protocol: Protocol::Udp,
                    node_port: 61000,
                    pod_ip: Ipv4Addr::new(10, 244, 1, 2),
                    pod_port: 53,
                },
                NplDnat {
                    protocol: Protocol::Tcp,
                    node_port: 61000,
                    pod_ip: Ipv4Addr::new(10, 244, 1, 2),
                    pod_port: 8080,
                },
            ],
        };
        let r = npl.render("ferrea", "10.244.1.0/24".parse().unwrap());
        assert!(r.starts_with("table ip ferrea {\n"), "{r}");
        assert!(
            r.contains("elements = { 61000 : 10.244.1.2 . 8080,\n      61001 : 10.244.1.3 . 80 }"),
            "{r}"
        );
        assert!(r.contains("elements = { 61000 : 10.244.1.2 . 53 }"), "{r}");
        assert_eq!(r.matches("ip daddr 172.18.0.11 jump npl").count(), 2, "{r}");
        assert!(r.contains("hook output priority -100"), "{r}");
        assert!(r.contains("dnat ip to udp dport map @npl_udp"), "{r}");
        assert!(
            r.contains("ip saddr 10.244.1.0/24 ct status dnat ct original ip daddr 172.18.0.11"),
            "{r}"
        );
        // No mappings: the maps are declared empty, the chains stay.
        let empty = NplRules {
            node_ip: npl.node_ip,
            dnat: vec![],
        }
        .render("t", "10.244.1.0/24".parse().unwrap());
        assert!(!empty.contains("elements"), "{empty}");
        assert!(empty.contains("map npl_tcp"), "{empty}");
    }

    #[test]
    fn nat_table_renders_base_then_npl_in_one_script() {
        let base = NatSpec {
            table: "t".into(),
            pod_cidr: "10.1.0.0/24".parse().unwrap(),
            no_masquerade: vec![],
            masquerade: true,
            gateway: Ipv4Addr::new(10, 1, 0, 1),
        };
        let npl = NplRules {
            node_ip: Ipv4Addr::new(172, 18, 0, 11),
            dnat: vec![],
        };
        let t = NatTable::new(base.clone(), Some(npl.clone()));
        let r = t.render_parts(&[], Some(&npl), None);
        assert!(r.starts_with(&base.render()), "{r}");
        assert!(r.ends_with(&npl.render("t", base.pod_cidr)), "{r}");
        assert_eq!(t.render_parts(&[], None, None), base.render());
        let eg = EgressRules::default();
        assert!(
            t.render_parts(&[], Some(&npl), Some(&eg))
                .ends_with(&eg.render("t"))
        );
    }

    #[test]
    fn egress_rules_mark_local_pods_and_marker_macs_and_snat_before_masquerade() {
        let e = EgressRules {
            exempt: vec![
                "10.244.0.0/16".parse().unwrap(),
                "172.18.0.11/32".parse().unwrap(),
            ],
            marks: vec![(Ipv4Addr::new(10, 244, 1, 5), 7)],
            snat: vec![(7, Ipv4Addr::new(10, 172, 170, 9))],
            shaped: vec![],
        };
        let r = e.render("ferrea");
        assert!(r.contains("hook prerouting priority mangle"), "{r}");
        assert!(
            r.contains("ip daddr { 10.244.0.0/16, 172.18.0.11/32 } return"),
            "{r}"
        );
        assert!(
            r.contains("meta mark set ip saddr map { 10.244.1.5 : 0x70000 }"),
            "{r}"
        );
        assert!(
            r.contains("meta mark set ether saddr map { 0a:fe:00:00:00:07 : 0x70000 }"),
            "{r}"
        );
        assert!(r.contains("hook postrouting priority srcnat - 10"), "{r}");
        assert!(
            r.contains(
                "meta mark & 0xffff0000 != 0 counter snat ip to meta mark & 0xffff0000 map { 0x70000 : 10.172.170.9 }"
            ),
            "{r}"
        );
        assert!(!r.contains("egress_shape"), "{r}");
        let shaped = EgressRules {
            shaped: vec![7],
            ..e.clone()
        }
        .render("ferrea");
        assert!(
            shaped.contains(
                "meta mark & 0xffff0000 != 0 meta priority set meta mark & 0xffff0000 map { 0x70000 : fe0a:7 }"
            ),
            "{shaped}"
        );
        // The exempt return comes before any marking.
        assert!(r.find("return").unwrap() < r.find("meta mark set").unwrap());
    }
}
