//! Kubernetes NetworkPolicy compiled into the lookup tables a dataplane enforces.
//!
//! What a pod may receive (ingress) and send (egress) is the union of the rules of the
//! policies that select it for that direction; a direction that no policy selects the pod for
//! is open. [`compile`] turns the policies, the pods and the namespaces into two lookups per
//! selected pod and direction, both shaped for a longest-prefix match (a BPF LPM trie, or
//! OpenFlow priorities):
//!
//! 1. the peer's address to a *port class* ([`Table::peers`]): all addresses whose longest
//!    matching prefix is the same one are allowed the same ports, so a class stands for one
//!    set of allowed ports and protocols;
//! 2. (class, protocol, port) to the rule that allows it ([`Table::ports`]), port ranges cut
//!    into aligned prefix blocks. A class entry with no protocol ([`PortBlock::All`]) allows
//!    every protocol and port, ICMP included.
//!
//! Traffic is allowed when both lookups hit; [`Table::allows`] is that lookup, written as a
//! dataplane does it. Each port entry names the lowest-numbered rule that allows what it
//! matches ([`Compiled::rules`]), so a dataplane can count allowed traffic per rule and the
//! rest per pod and direction. The tests compare these tables with the API's semantics
//! evaluated directly, pair by pair.
//!
//! Named ports are resolved at the destination, as the API defines them: for ingress against
//! the selected pod's own container ports; for egress against the container ports of the pod
//! that holds the destination address, so an egress named port matches only pods that declare
//! it (also when the peer is an `ipBlock`).
//!
//! A namespace selector sees the label `kubernetes.io/metadata.name` even when the source's
//! Namespace object lacks it (the API server sets it on every namespace; a manifest for the
//! files source may not).
//!
//! Written here because no crate compiles Kubernetes policy into match tables.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::source::netpol::{NetworkPolicy, Peer, Peers, PortRef, Rule};
use crate::source::{ContainerPort, Protocol};

#[cfg(test)]
mod tests;

/// The label the API server puts on every namespace, its name as value.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The direction of traffic a rule restricts, seen from the selected pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic to the pod; the peer is the source.
    Ingress,
    /// Traffic from the pod; the peer is the destination.
    Egress,
}

/// A pod as the compiler sees it: where it is, its labels, address and ports.
#[derive(Clone, Copy, Debug)]
pub struct PolicyPod<'a> {
    /// `metadata.namespace`.
    pub namespace: &'a str,
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.labels`.
    pub labels: &'a BTreeMap<String, String>,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// Its container ports (what named ports resolve against).
    pub ports: &'a [ContainerPort],
}

/// One rule of one policy, as [`PortEntry::rule`] refers to it (an index into
/// [`Compiled::rules`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RuleId {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// Whether it is one of the policy's ingress or egress rules.
    pub direction: Direction,
    /// Its index in the policy's `ingress` or `egress` list.
    pub index: usize,
}

/// Every selected pod's tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Every rule of every policy, in policy (`namespace/name`) then rule order.
    pub rules: Vec<RuleId>,
    /// The tables of each target pod some policy selects, by the pod's address. A target pod
    /// that is not here is open in both directions.
    pub pods: BTreeMap<Ipv4Addr, PodPolicy>,
}

/// What restricts one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    /// `namespace/name` of the policies that select it.
    pub policies: Vec<String>,
    /// The ingress table, if some policy restricts its ingress.
    pub ingress: Option<Table>,
    /// The egress table, if some policy restricts its egress.
    pub egress: Option<Table>,
}

impl PodPolicy {
    /// The table of `direction`, if that direction is restricted.
    pub fn table(&self, direction: Direction) -> Option<&Table> {
        match direction {
            Direction::Ingress => self.ingress.as_ref(),
            Direction::Egress => self.egress.as_ref(),
        }
    }
}

/// The two lookups of one pod and direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Peer prefixes and their class; an address matching none, or whose longest match has
    /// class 0, is allowed nothing.
    pub peers: Vec<PeerEntry>,
    /// What each class allows; class 0 has no entries.
    pub ports: Vec<PortEntry>,
}

/// A peer prefix and the port class of the addresses whose longest match it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerEntry {
    /// The prefix.
    pub prefix: Ipv4Network,
    /// The class; 0: nothing allowed.
    pub class: u32,
}

/// Ports a class allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortEntry {
    /// The class (at least 1).
    pub class: u32,
    /// What it matches.
    pub ports: PortBlock,
    /// The lowest-numbered rule that allows it (an index into [`Compiled::rules`]).
    pub rule: u32,
}

/// A block of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortBlock {
    /// Every protocol and port (a rule with no `ports`).
    All,
    /// The ports of `protocol` that share their first `len` bits (0 to 16) with `first`.
    Prefix {
        /// The protocol.
        protocol: Protocol,
        /// The first port of the block (its low `16 - len` bits are zero).
        first: u16,
        /// The number of leading bits that must match.
        len: u8,
    },
}

impl PortBlock {
    /// Whether traffic of `l4` (protocol and destination port; `None` for protocols without
    /// ports) is in the block.
    pub fn contains(&self, l4: Option<(Protocol, u16)>) -> bool {
        match (self, l4) {
            (PortBlock::All, _) => true,
            (PortBlock::Prefix { .. }, None) => false,
            (
                PortBlock::Prefix {
                    protocol,
                    first,
                    len,
                },
                Some((p, port)),
            ) => *protocol == p && (u32::from(port ^ first) >> (16 - u32::from(*len))) == 0,
        }
    }

    /// The block's length as a longest-prefix match ranks it: `All` ranks below any port.
    fn rank(&self) -> i16 {
        match self {
            PortBlock::All => -1,
            PortBlock::Prefix { len, .. } => i16::from(*len),
        }
    }
}

impl Table {
    /// The rule that allows traffic with `peer` (the source for ingress, the destination for
    /// egress) of `l4` (protocol and destination port, `None` for other protocols), or
    /// `None` if it is denied: the same two longest-prefix lookups a dataplane makes.
    pub fn allows(&self, peer: Ipv4Addr, l4: Option<(Protocol, u16)>) -> Option<u32> {
        let class = self
            .peers
            .iter()
            .filter(|e| e.prefix.contains(peer))
            .max_by_key(|e| e.prefix.prefix())?
            .class;
        if class == 0 {
            return None;
        }
        self.ports
            .iter()
            .filter(|e| e.class == class && e.ports.contains(l4))
            .max_by_key(|e| e.ports.rank())
            .map(|e| e.rule)
    }
}

/// A rule's peers, resolved to addresses: `None` for every address, else blocks (a CIDR
/// minus its exceptions; a pod is a /32 with none).
type PeerSet = Option<Vec<(Ipv4Network, Vec<Ipv4Network>)>>;

/// Ports of an atom: `None` for every protocol and port, else (protocol, first, last).
type PortSet = Option<Vec<(Protocol, u16, u16)>>;

/// The smallest unit the tables are built from: these peers on these ports, allowed by `rule`.
#[derive(Clone, Debug)]
struct Atom {
    peers: PeerSet,
    ports: PortSet,
    rule: u32,
}

/// A rule with its peers resolved once (they do not depend on the selected pod).
struct Resolved<'p> {
    rule: &'p Rule,
    id: u32,
    peers: PeerSet,
}

/// A policy's key (`namespace/name`) and its resolved ingress and egress rules.
type ResolvedPolicy<'p> = (String, Option<Vec<Resolved<'p>>>, Option<Vec<Resolved<'p>>>);

/// Compiles `policies` for the `targets` (the pods this node enforces for), with `pods`
/// every pod of the cluster with an address (the peers pod selectors can name; targets
/// included) and `namespaces` every namespace's labels. Targets are keyed by address, so they
/// must be pods with addresses of their own (not `hostNetwork` pods).
pub fn compile<'p>(
    policies: impl IntoIterator<Item = &'p NetworkPolicy>,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    pods: &[PolicyPod<'_>],
    targets: &[PolicyPod<'_>],
) -> Compiled {
    let mut policies: Vec<&NetworkPolicy> = policies.into_iter().collect();
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let ns_labels = namespace_labels(namespaces, pods);
    let empty = BTreeMap::new();
    let labels_of = |ns: &str| ns_labels.get(ns).unwrap_or(&empty);

    let mut out = Compiled::default();
    // Per policy: its key and its resolved ingress and egress rules.
    let mut resolved: Vec<ResolvedPolicy<'_>> = Vec::new();
    for &p in &policies {
        let key = format!("{}/{}", p.namespace, p.name);
        let mut direction = |rules: &'p Option<Vec<Rule>>, d: Direction| {
            rules.as_ref().map(|rules| {
                rules
                    .iter()
                    .enumerate()
                    .map(|(index, rule)| {
                        let id = u32::try_from(out.rules.len()).unwrap_or(u32::MAX);
                        out.rules.push(RuleId {
                            policy: key.clone(),
                            direction: d,
                            index,
                        });
                        Resolved {
                            rule,
                            id,
                            peers: resolve_peers(&rule.peers, &p.namespace, pods, &labels_of),
                        }
                    })
                    .collect::<Vec<_>>()
            })
        };
        let ingress = direction(&p.ingress, Direction::Ingress);
        let egress = direction(&p.egress, Direction::Egress);
        resolved.push((key, ingress, egress));
    }

    for target in targets {
        let mut selected_by = Vec::new();
        let mut atoms: [Option<Vec<Atom>>; 2] = [None, None];
        for (policy, (key, ingress, egress)) in policies.iter().zip(&resolved) {
            if policy.namespace != target.namespace || !policy.pod_selector.matches(target.labels) {
                continue;
            }
            selected_by.push(key.clone());
            for (slot, rules, d) in [
                (0, ingress, Direction::Ingress),
                (1, egress, Direction::Egress),
            ] {
                let Some(rules) = rules else { continue };
                let list = atoms[slot].get_or_insert_with(Vec::new);
                for r in rules {
                    rule_atoms(r, d, target, pods, list);
                }
            }
        }
        if selected_by.is_empty() {
            continue;
        }
        let [ingress, egress] = atoms.map(|a| a.map(|a| build_table(&a)));
        out.pods.insert(
            target.ip,
            PodPolicy {
                policies: selected_by,
                ingress,
                egress,
            },
        );
    }
    out
}

/// Every namespace's labels, with the name label the API server sets; namespaces known only
/// from their pods get that label alone.
fn namespace_labels(
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    pods: &[PolicyPod<'_>],
) -> HashMap<String, BTreeMap<String, String>> {
    let mut out: HashMap<String, BTreeMap<String, String>> = namespaces
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for p in pods {
        out.entry(p.namespace.to_owned()).or_default();
    }
    for (name, labels) in &mut out {
        labels
            .entry(NAMESPACE_NAME_LABEL.to_owned())
            .or_insert_with(|| name.clone());
    }
    out
}

fn resolve_peers<'n>(
    peers: &Peers,
    policy_ns: &str,
    pods: &[PolicyPod<'_>],
    labels_of: &impl Fn(&str) -> &'n BTreeMap<String, String>,
) -> PeerSet {
    let Peers::Some(list) = peers else {
        return None;
    };
    let mut blocks = Vec::new();
    let mut seen = BTreeSet::new();
    for peer in list {
        match peer {
            Peer::IpBlock { cidr, except } => blocks.push((*cidr, except.clone())),
            Peer::Pods { .. } => {
                for p in pods {
                    if peer.selects_pod(policy_ns, p.namespace, labels_of(p.namespace), p.labels)
                        && seen.insert(p.ip)
                    {
                        blocks.push((host(p.ip), Vec::new()));
                    }
                }
            }
        }
    }
    Some(blocks)
}

fn host(ip: Ipv4Addr) -> Ipv4Network {
    Ipv4Network::from(ip)
}

/// Whether an address of `peers` lies in the block set `blocks` (exceptions subtracted).
fn block_contains(blocks: &[(Ipv4Network, Vec<Ipv4Network>)], ip: Ipv4Addr) -> bool {
    blocks
        .iter()
        .any(|(c, ex)| c.contains(ip) && !ex.iter().any(|e| e.contains(ip)))
}

/// The atoms of one rule for `target`: the numbered ports (and, for ingress, the named ones
/// resolved against the target) with the rule's peers; for egress, each named port resolved
/// per destination pod.
fn rule_atoms(
    r: &Resolved<'_>,
    direction: Direction,
    target: &PolicyPod<'_>,
    pods: &[PolicyPod<'_>],
    out: &mut Vec<Atom>,
) {
    if r.rule.ports.is_empty() {
        out.push(Atom {
            peers: r.peers.clone(),
            ports: None,
            rule: r.id,
        });
        return;
    }
    let mut fixed = Vec::new();
    for p in &r.rule.ports {
        match &p.port {
            None => fixed.push((p.protocol, 0, u16::MAX)),
            Some(PortRef::Number(n)) => fixed.push((p.protocol, *n, p.end_port.unwrap_or(*n))),
            Some(PortRef::Name(name)) => {
                let named = |c: &&ContainerPort| {
                    c.name.as_deref() == Some(name.as_str()) && c.protocol == p.protocol
                };
                match direction {
                    Direction::Ingress => fixed.extend(
                        target
                            .ports
                            .iter()
                            .filter(named)
                            .map(|c| (p.protocol, c.port, c.port)),
                    ),
                    Direction::Egress => {
                        for pod in pods {
                            let inside = match &r.peers {
                                None => true,
                                Some(blocks) => block_contains(blocks, pod.ip),
                            };
                            if !inside {
                                continue;
                            }
                            for c in pod.ports.iter().filter(named) {
                                out.push(Atom {
                                    peers: Some(vec![(host(pod.ip), Vec::new())]),
                                    ports: Some(vec![(p.protocol, c.port, c.port)]),
                                    rule: r.id,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    if !fixed.is_empty() {
        out.push(Atom {
            peers: r.peers.clone(),
            ports: Some(fixed),
            rule: r.id,
        });
    }
}

/// Whether every address of `prefix` is in the atom's peers. Every CIDR and exception of
/// every atom is itself a prefix of the table, so for the addresses whose longest match is
/// `prefix` this is exact.
fn covers(peers: &PeerSet, prefix: Ipv4Network) -> bool {
    match peers {
        None => true,
        Some(blocks) => blocks
            .iter()
            .any(|(c, ex)| includes(*c, prefix) && !ex.iter().any(|e| includes(*e, prefix))),
    }
}

/// Whether `outer` contains all of `inner`.
fn includes(outer: Ipv4Network, inner: Ipv4Network) -> bool {
    outer.prefix() <= inner.prefix() && outer.contains(inner.network())
}

/// The port entries (without class) that the atoms allow together: one `All` entry for the
/// lowest rule among atoms without ports, and per protocol the elementary port ranges with
/// the lowest rule covering each (dropped where `All` already names a lower rule), merged
/// and cut into prefix blocks.
fn merge_ports(atoms: &[&Atom]) -> Vec<(PortBlock, u32)> {
    let all = atoms
        .iter()
        .filter(|a| a.ports.is_none())
        .map(|a| a.rule)
        .min();
    let mut out: Vec<(PortBlock, u32)> = all.map(|r| (PortBlock::All, r)).into_iter().collect();
    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        let ranges: Vec<(u32, u32, u32)> = atoms
            .iter()
            .filter_map(|a| Some((a.ports.as_ref()?, a.rule)))
            .flat_map(|(ports, rule)| {
                ports
                    .iter()
                    .filter(move |(p, _, _)| *p == protocol)
                    .map(move |(_, lo, hi)| (u32::from(*lo), u32::from(*hi), rule))
            })
            .filter(|(lo, hi, _)| lo <= hi)
            .collect();
        if ranges.is_empty() {
            continue;
        }
        let mut cuts: Vec<u32> = ranges
            .iter()
            .flat_map(|(lo, hi, _)| [*lo, hi + 1])
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        // (first, last, rule) of the merged elementary ranges.
        let mut segments: Vec<(u32, u32, u32)> = Vec::new();
        for w in cuts.windows(2) {
            let (lo, hi) = (w[0], w[1] - 1);
            let Some(rule) = ranges
                .iter()
                .filter(|(a, b, _)| *a <= lo && hi <= *b)
                .map(|(_, _, r)| *r)
                .min()
            else {
                continue;
            };
            if all.is_some_and(|a| a <= rule) {
                continue;
            }
            match segments.last_mut() {
                Some(last) if last.1 + 1 == lo && last.2 == rule => last.1 = hi,
                _ => segments.push((lo, hi, rule)),
            }
        }
        for (lo, hi, rule) in segments {
            for (first, len) in prefix_blocks(lo, hi) {
                out.push((
                    PortBlock::Prefix {
                        protocol,
                        first,
                        len,
                    },
                    rule,
                ));
            }
        }
    }
    out
}

/// The aligned prefix blocks (first port, prefix length) that exactly cover `lo..=hi`.
fn prefix_blocks(mut lo: u32, hi: u32) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    while lo <= hi {
        // The largest aligned block starting at `lo` that ends at or before `hi`.
        let mut bits = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while lo + (1 << bits) - 1 > hi {
            bits -= 1;
        }
        // `lo` and the block length are at most 16 bits here.
        out.push((lo as u16, (16 - bits) as u8));
        lo += 1 << bits;
    }
    out
}

/// One pod and direction's table from its atoms.
fn build_table(atoms: &[Atom]) -> Table {
    let mut prefixes: BTreeSet<Ipv4Network> = BTreeSet::new();
    prefixes.insert(Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0 is valid"));
    for a in atoms {
        for (c, ex) in a.peers.iter().flatten() {
            prefixes.insert(normal(*c));
            prefixes.extend(ex.iter().map(|e| normal(*e)));
        }
    }
    // Shortest first, so that a prefix's parent is decided before it.
    let mut by_len: Vec<Ipv4Network> = prefixes.into_iter().collect();
    by_len.sort_by_key(|p| (p.prefix(), p.network()));

    let mut classes: HashMap<Vec<(PortBlock, u32)>, u32> = HashMap::new();
    let mut table = Table::default();
    // (prefix, its class), for parent lookups.
    let mut decided: Vec<(Ipv4Network, u32)> = Vec::new();
    for prefix in by_len {
        let covering: Vec<&Atom> = atoms.iter().filter(|a| covers(&a.peers, prefix)).collect();
        let ports = merge_ports(&covering);
        let class = if ports.is_empty() {
            0
        } else {
            let next = u32::try_from(classes.len() + 1).unwrap_or(u32::MAX);
            let class = *classes.entry(ports.clone()).or_insert(next);
            if class == next {
                table
                    .ports
                    .extend(ports.into_iter().map(|(ports, rule)| PortEntry {
                        class,
                        ports,
                        rule,
                    }));
            }
            class
        };
        let parent = decided
            .iter()
            .filter(|(p, _)| p.prefix() < prefix.prefix() && includes(*p, prefix))
            .max_by_key(|(p, _)| p.prefix())
            .map_or(0, |(_, c)| *c);
        decided.push((prefix, class));
        if class != parent {
            table.peers.push(PeerEntry { prefix, class });
        }
    }
    table.peers.sort();
    table.ports.sort();
    table
}

/// The prefix with its host bits cleared (`10.1.2.3/16` is `10.1.0.0/16`).
fn normal(p: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(p.network(), p.prefix()).expect("the same prefix length is valid")
}
