//! Kubernetes `networking.k8s.io/v1` NetworkPolicy, decoded and validated exactly as the API
//! defines it: the semantics of absent and empty fields are resolved here, once, so that what
//! enforces a policy never has to tell "absent" from "empty" again.
//!
//! - `policyTypes` absent: `Ingress`, plus `Egress` when the policy has an `egress` section.
//!   A direction not in `policyTypes` is not restricted by this policy ([`NetworkPolicy::ingress`]
//!   or [`NetworkPolicy::egress`] is `None`); a direction in it with no rules allows nothing
//!   (`Some(vec![])`).
//! - A rule with no (or an empty) `from`/`to` matches every peer ([`Peers::All`]); one with
//!   no (or an empty) `ports` matches every port.
//! - A peer with `podSelector` only selects pods in the policy's namespace; with
//!   `namespaceSelector` only, every pod of the selected namespaces; with both, the selected
//!   pods of the selected namespaces. An `ipBlock` is a CIDR minus its `except` CIDRs, which
//!   must lie inside it.
//! - A port is a number or the name of a container port (resolved per pod), with an optional
//!   `endPort` (numbers only, not below `port`); the protocol defaults to TCP.

use ipnetwork::Ipv4Network;
use serde_json::Value;

use super::Protocol;
use super::crd::{LabelSelector, parse_selector};
use super::error::{FieldProblem, ObjectError, ObjectRef};

/// A NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.podSelector`: the pods of the namespace the policy applies to (empty: all).
    pub pod_selector: LabelSelector,
    /// The ingress rules if the policy restricts ingress (`None`: it does not).
    pub ingress: Option<Vec<Rule>>,
    /// The egress rules if the policy restricts egress (`None`: it does not).
    pub egress: Option<Vec<Rule>>,
}

/// One rule: traffic with one of the peers on one of the ports is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `from` (ingress) or `to` (egress).
    pub peers: Peers,
    /// `ports`; empty: every port and protocol.
    pub ports: Vec<PolicyPort>,
}

/// The peers of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peers {
    /// No `from`/`to` (or an empty list): every source or destination.
    All,
    /// These peers (at least one).
    Some(Vec<Peer>),
}

/// One entry of `from`/`to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods selected by labels.
    Pods {
        /// `namespaceSelector`; `None`: the policy's own namespace only.
        namespaces: Option<LabelSelector>,
        /// `podSelector`; `None` (with a namespace selector): every pod of those namespaces.
        pods: Option<LabelSelector>,
    },
    /// `ipBlock`.
    IpBlock {
        /// `cidr`.
        cidr: Ipv4Network,
        /// `except`, each inside `cidr`.
        except: Vec<Ipv4Network>,
    },
}

/// A port of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyPort {
    /// `protocol` (default TCP).
    pub protocol: Protocol,
    /// `port`; `None`: every port of the protocol.
    pub port: Option<PortRef>,
    /// `endPort`: the last port of a range starting at a numbered `port`.
    pub end_port: Option<u16>,
}

/// A rule's port: a number or a container port's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    /// A port number.
    Number(u16),
    /// A named container port, resolved per pod.
    Name(String),
}

fn wrong(expected: &'static str, found: &Value) -> FieldProblem {
    FieldProblem::WrongType {
        expected,
        found: found.clone(),
    }
}

/// A list at `field` (absent or null: empty).
fn list<'a>(
    obj: &ObjectRef,
    field: &str,
    v: Option<&'a Value>,
) -> Result<&'a [Value], ObjectError> {
    match v {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(obj.field(field, wrong("a list", other))),
    }
}

fn cidr(
    obj: &ObjectRef,
    field: &str,
    v: Option<&Value>,
) -> Result<Option<Ipv4Network>, ObjectError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let s = v
        .as_str()
        .ok_or_else(|| obj.field(field, wrong("a CIDR", v)))?;
    if s.contains(':') {
        // Another family's block: an IPv4 dataplane has nothing of it to enforce.
        return Ok(None);
    }
    let n: Ipv4Network = s.parse().map_err(|_| {
        obj.field(
            field,
            FieldProblem::NotAllowed {
                value: v.clone(),
                allowed: "an IPv4 CIDR such as 10.0.0.0/16",
            },
        )
    })?;
    Ok(Some(n))
}

fn peer(obj: &ObjectRef, f: &str, p: &Value) -> Result<Option<Peer>, ObjectError> {
    if !p.is_object() {
        return Err(obj.field(f, wrong("a peer object", p)));
    }
    let ns = p.get("namespaceSelector").filter(|v| !v.is_null());
    let pods = p.get("podSelector").filter(|v| !v.is_null());
    let block = p.get("ipBlock").filter(|v| !v.is_null());
    match (ns.is_some() || pods.is_some(), block) {
        (true, Some(_)) => Err(obj.field(
            f,
            FieldProblem::Rule("ipBlock may not be combined with podSelector or namespaceSelector"),
        )),
        (false, None) => Err(obj.field(
            f,
            FieldProblem::Rule("a peer needs podSelector, namespaceSelector or ipBlock"),
        )),
        (true, None) => Ok(Some(Peer::Pods {
            namespaces: ns
                .map(|v| parse_selector(obj, &format!("{f}.namespaceSelector"), v))
                .transpose()?,
            pods: pods
                .map(|v| parse_selector(obj, &format!("{f}.podSelector"), v))
                .transpose()?,
        })),
        (false, Some(b)) => {
            let Some(c) = cidr(obj, &format!("{f}.ipBlock.cidr"), b.get("cidr"))? else {
                if b.get("cidr").is_none_or(Value::is_null) {
                    return Err(obj.field(format!("{f}.ipBlock.cidr"), FieldProblem::Missing));
                }
                return Ok(None);
            };
            let mut except = Vec::new();
            for (j, e) in list(obj, &format!("{f}.ipBlock.except"), b.get("except"))?
                .iter()
                .enumerate()
            {
                let ef = format!("{f}.ipBlock.except[{j}]");
                if let Some(e) = cidr(obj, &ef, Some(e))? {
                    if !(c.contains(e.network()) && e.prefix() >= c.prefix()) {
                        return Err(
                            obj.field(ef, FieldProblem::Rule("must be inside ipBlock.cidr"))
                        );
                    }
                    except.push(e);
                }
            }
            Ok(Some(Peer::IpBlock { cidr: c, except }))
        }
    }
}

fn port(obj: &ObjectRef, f: &str, p: &Value) -> Result<PolicyPort, ObjectError> {
    let protocol = match p.get("protocol").filter(|v| !v.is_null()) {
        None => Protocol::Tcp,
        Some(v) => match v.as_str() {
            Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            _ => {
                return Err(obj.field(
                    format!("{f}.protocol"),
                    FieldProblem::NotAllowed {
                        value: v.clone(),
                        allowed: "TCP, UDP or SCTP",
                    },
                ));
            }
        },
    };
    let number = |field: String, v: &Value| -> Result<u16, ObjectError> {
        v.as_u64()
            .filter(|n| (1..=65535).contains(n))
            .map(|n| n as u16)
            .ok_or_else(|| {
                obj.field(
                    field,
                    FieldProblem::NotAllowed {
                        value: v.clone(),
                        allowed: "a port (1-65535)",
                    },
                )
            })
    };
    let port_ref = match p.get("port").filter(|v| !v.is_null()) {
        None => None,
        Some(Value::String(s)) => match s.parse::<u16>() {
            Ok(n) if n > 0 => Some(PortRef::Number(n)),
            _ if s.is_empty() => None,
            _ => Some(PortRef::Name(s.clone())),
        },
        Some(v) => Some(PortRef::Number(number(format!("{f}.port"), v)?)),
    };
    let end_port = match p.get("endPort").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => {
            let end = number(format!("{f}.endPort"), v)?;
            match &port_ref {
                Some(PortRef::Number(start)) if end >= *start => Some(end),
                Some(PortRef::Number(_)) => {
                    return Err(obj.field(
                        format!("{f}.endPort"),
                        FieldProblem::Rule("must not be below port"),
                    ));
                }
                _ => {
                    return Err(obj.field(
                        format!("{f}.endPort"),
                        FieldProblem::Rule("needs a numbered port"),
                    ));
                }
            }
        }
    };
    Ok(PolicyPort {
        protocol,
        port: port_ref,
        end_port,
    })
}

fn rules(
    obj: &ObjectRef,
    section: &str,
    peers_key: &str,
    v: &Value,
) -> Result<Vec<Rule>, ObjectError> {
    let mut out = Vec::new();
    for (i, r) in list(obj, section, v.pointer(&format!("/spec/{section}")))?
        .iter()
        .enumerate()
    {
        let f = format!("spec.{section}[{i}]");
        if !r.is_object() {
            return Err(obj.field(f, wrong("a rule object", r)));
        }
        let listed = list(obj, &format!("{f}.{peers_key}"), r.get(peers_key))?;
        let peers = if listed.is_empty() {
            Peers::All
        } else {
            let mut ps = Vec::new();
            for (j, p) in listed.iter().enumerate() {
                if let Some(p) = peer(obj, &format!("{f}.{peers_key}[{j}]"), p)? {
                    ps.push(p);
                }
            }
            // Only IPv6 blocks: nothing of this family, so nothing matches.
            Peers::Some(ps)
        };
        let mut ports = Vec::new();
        for (j, p) in list(obj, &format!("{f}.ports"), r.get("ports"))?
            .iter()
            .enumerate()
        {
            ports.push(port(obj, &format!("{f}.ports[{j}]"), p)?);
        }
        out.push(Rule { peers, ports });
    }
    Ok(out)
}

/// Decodes a `networking.k8s.io/v1` NetworkPolicy named `name` in `namespace`.
pub fn parse_network_policy(
    v: &Value,
    namespace: &str,
    name: &str,
) -> Result<NetworkPolicy, ObjectError> {
    let obj = ObjectRef::namespaced("NetworkPolicy", namespace, name);
    let pod_selector = parse_selector(
        &obj,
        "spec.podSelector",
        v.pointer("/spec/podSelector").unwrap_or(&Value::Null),
    )?;
    let has_egress = v.pointer("/spec/egress").is_some_and(|e| !e.is_null());
    let (mut ingress_on, mut egress_on) = (true, has_egress);
    if let Some(types) = v.pointer("/spec/policyTypes").filter(|t| !t.is_null()) {
        let types = types
            .as_array()
            .ok_or_else(|| obj.field("spec.policyTypes", wrong("a list", types)))?;
        if !types.is_empty() {
            (ingress_on, egress_on) = (false, false);
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    Some("Ingress") => ingress_on = true,
                    Some("Egress") => egress_on = true,
                    _ => {
                        return Err(obj.field(
                            format!("spec.policyTypes[{i}]"),
                            FieldProblem::NotAllowed {
                                value: t.clone(),
                                allowed: "Ingress or Egress",
                            },
                        ));
                    }
                }
            }
        }
    }
    let ingress = rules(&obj, "ingress", "from", v)?;
    let egress = rules(&obj, "egress", "to", v)?;
    Ok(NetworkPolicy {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        pod_selector,
        ingress: ingress_on.then_some(ingress),
        egress: egress_on.then_some(egress),
    })
}

impl Peer {
    /// Whether a pod with `labels` in namespace `ns` (whose labels are `ns_labels`) is this
    /// peer, for a policy in namespace `policy_ns`. An `ipBlock` never matches by labels.
    pub fn selects_pod(
        &self,
        policy_ns: &str,
        ns: &str,
        ns_labels: &std::collections::BTreeMap<String, String>,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        match self {
            Peer::Pods { namespaces, pods } => {
                let ns_ok = match namespaces {
                    None => ns == policy_ns,
                    Some(sel) => sel.matches(ns_labels),
                };
                ns_ok && pods.as_ref().is_none_or(|p| p.matches(labels))
            }
            Peer::IpBlock { .. } => false,
        }
    }

    /// Whether address `ip` is inside this `ipBlock` (never for a pod selector).
    pub fn contains_ip(&self, ip: std::net::Ipv4Addr) -> bool {
        match self {
            Peer::IpBlock { cidr, except } => {
                cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))
            }
            Peer::Pods { .. } => false,
        }
    }
}

impl PolicyPort {
    /// Whether `port` over `protocol` of a pod whose container ports are `named` (name,
    /// number, protocol) is this rule port.
    pub fn matches(&self, protocol: Protocol, port: u16, named: &[super::ContainerPort]) -> bool {
        if protocol != self.protocol {
            return false;
        }
        match &self.port {
            None => true,
            Some(PortRef::Number(p)) => match self.end_port {
                Some(end) => (*p..=end).contains(&port),
                None => *p == port,
            },
            Some(PortRef::Name(n)) => named.iter().any(|c| {
                c.name.as_deref() == Some(n.as_str()) && c.port == port && c.protocol == protocol
            }),
        }
    }
}

#[cfg(test)]
mod tests;
