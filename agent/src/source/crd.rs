//! Antrea's `crd.antrea.io/v1beta1` `ExternalIPPool` and `Egress`, decoded and validated.
//!
//! The manifests users already have (seed 000's pool with `subnetInfo.vlan: 100` and an
//! Egress selecting pods by label) must be accepted verbatim, so the field names and
//! semantics follow Antrea's CRDs; every rejection is an [`ObjectError`] naming the object and
//! the field.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde_json::Value;

use super::error::{FieldProblem, ObjectError, ObjectRef};

/// A Kubernetes label selector (`matchLabels` and `matchExpressions`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    /// `matchLabels`.
    pub match_labels: BTreeMap<String, String>,
    /// `matchExpressions`: (key, operator, values).
    pub match_expressions: Vec<(String, SelectorOp, Vec<String>)>,
}

/// Operators of `matchExpressions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectorOp {
    /// The label's value is one of the values.
    In,
    /// The label is absent or its value is none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelSelector {
    /// Whether `labels` satisfy the selector. The empty selector matches everything.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|(k, op, vals)| {
                let v = labels.get(k);
                match op {
                    SelectorOp::In => v.is_some_and(|v| vals.contains(v)),
                    SelectorOp::NotIn => v.is_none_or(|v| !vals.contains(v)),
                    SelectorOp::Exists => v.is_some(),
                    SelectorOp::DoesNotExist => v.is_none(),
                }
            })
    }
}

/// One range of an `ExternalIPPool`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    /// First address.
    pub start: Ipv4Addr,
    /// Last address.
    pub end: Ipv4Addr,
}

impl IpRange {
    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (self.start..=self.end).contains(&ip)
    }

    /// Addresses in the range.
    pub fn len(&self) -> u64 {
        u64::from(u32::from(self.end)) - u64::from(u32::from(self.start)) + 1
    }

    /// Never empty: `start <= end` is validated.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// `ExternalIPPool.spec.subnetInfo`: the egress IPs live on their own subnet, reached through
/// a VLAN sub-interface and a gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubnetInfo {
    /// The subnet's gateway (the default route of the pool's route table).
    pub gateway: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// The VLAN ID (0: untagged).
    pub vlan: u16,
}

impl SubnetInfo {
    /// The subnet.
    pub fn network(&self) -> Ipv4Network {
        let n = Ipv4Network::new(self.gateway, self.prefix_len).expect("validated prefix");
        Ipv4Network::new(n.network(), self.prefix_len).expect("validated prefix")
    }
}

/// An `ExternalIPPool`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalIpPool {
    /// `metadata.name` (cluster-scoped).
    pub name: String,
    /// `spec.ipRanges`.
    pub ranges: Vec<IpRange>,
    /// `spec.subnetInfo`.
    pub subnet: Option<SubnetInfo>,
    /// `spec.nodeSelector`: nodes eligible to hold the pool's IPs.
    pub node_selector: LabelSelector,
}

impl ExternalIpPool {
    /// Whether `ip` belongs to the pool.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    /// The pool's addresses in order, without the subnet's gateway (never handed out).
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let gw = self.subnet.map(|s| s.gateway);
        self.ranges
            .iter()
            .flat_map(|r| (u32::from(r.start)..=u32::from(r.end)).map(Ipv4Addr::from))
            .filter(move |ip| Some(*ip) != gw)
    }
}

/// An `Egress`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Egress {
    /// `metadata.name` (cluster-scoped).
    pub name: String,
    /// `metadata.creationTimestamp` (RFC 3339), if the source has it: older Egresses keep
    /// their IPs when newer ones compete for the same addresses.
    pub created: Option<String>,
    /// `spec.appliedTo.podSelector` (`None`: every pod of the selected namespaces).
    pub pod_selector: Option<LabelSelector>,
    /// `spec.appliedTo.namespaceSelector` (`None`: every namespace).
    pub namespace_selector: Option<LabelSelector>,
    /// `spec.egressIP` (or the IPv4 entry of `spec.egressIPs`), if fixed by the user.
    pub egress_ip: Option<Ipv4Addr>,
    /// `spec.externalIPPool` (or the entry of `spec.externalIPPools` that goes with the IPv4
    /// address).
    pub pool: Option<String>,
    /// `spec.bandwidth`: the rate limit of the Egress's traffic, if any.
    pub bandwidth: Option<Bandwidth>,
    /// Fields of Antrea's v1beta1 Egress that were given but that ferrea does not serve, each
    /// a sentence naming the field: reported (status views, the log), never dropped silently.
    pub unsupported: Vec<String>,
    /// `status.egressIP` as the Kubernetes API has it (what an agent allocated before and
    /// recorded there): kept as long as the Egress and its pool allow. `None` when absent or
    /// not an IPv4 address.
    pub recorded_ip: Option<Ipv4Addr>,
    /// `status.egressNode` as the Kubernetes API has it (`None` when absent or empty): the node
    /// that last recorded itself as the holder. The holder compares it with its own view and
    /// writes again when another agent's late write replaced it.
    pub recorded_node: Option<String>,
}

fn parse_ip(obj: &ObjectRef, field: &str, v: &Value) -> Result<Ipv4Addr, ObjectError> {
    let s = v.as_str().ok_or_else(|| {
        obj.field(
            field,
            FieldProblem::WrongType {
                expected: "a string",
                found: v.clone(),
            },
        )
    })?;
    super::manifest::ipv4(obj, field, s)
}

/// The object's `metadata.name` (required) and its `spec` (null if absent).
fn name_and_spec<'a>(kind: &str, v: &'a Value) -> Result<(ObjectRef, &'a Value), ObjectError> {
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ObjectError::NoName {
            kind: kind.to_owned(),
        })?;
    Ok((
        ObjectRef::cluster(kind, name),
        v.get("spec").unwrap_or(&Value::Null),
    ))
}

fn wrong_type(expected: &'static str, found: &Value) -> FieldProblem {
    FieldProblem::WrongType {
        expected,
        found: found.clone(),
    }
}

/// Decodes a label selector at `field` of `obj`.
pub fn parse_selector(
    obj: &ObjectRef,
    field: &str,
    v: &Value,
) -> Result<LabelSelector, ObjectError> {
    let mut sel = LabelSelector::default();
    if v.is_null() {
        return Ok(sel);
    }
    let map = v
        .as_object()
        .ok_or_else(|| obj.field(field, wrong_type("a label selector object", v)))?;
    if let Some(m) = map.get("matchLabels").filter(|m| !m.is_null()) {
        let m = m
            .as_object()
            .ok_or_else(|| obj.field(format!("{field}.matchLabels"), wrong_type("a map", m)))?;
        for (k, val) in m {
            let s = val.as_str().ok_or_else(|| {
                obj.field(
                    format!("{field}.matchLabels.{k}"),
                    wrong_type("a string", val),
                )
            })?;
            sel.match_labels.insert(k.clone(), s.to_owned());
        }
    }
    if let Some(exprs) = map.get("matchExpressions").filter(|m| !m.is_null()) {
        let exprs = exprs.as_array().ok_or_else(|| {
            obj.field(
                format!("{field}.matchExpressions"),
                wrong_type("a list", exprs),
            )
        })?;
        for (i, e) in exprs.iter().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            let key = e
                .get("key")
                .and_then(Value::as_str)
                .ok_or_else(|| obj.field(format!("{f}.key"), FieldProblem::Missing))?;
            let op = match e.get("operator").and_then(Value::as_str) {
                Some("In") => SelectorOp::In,
                Some("NotIn") => SelectorOp::NotIn,
                Some("Exists") => SelectorOp::Exists,
                Some("DoesNotExist") => SelectorOp::DoesNotExist,
                _ => {
                    return Err(obj.field(
                        format!("{f}.operator"),
                        FieldProblem::NotAllowed {
                            value: e.get("operator").cloned().unwrap_or(Value::Null),
                            allowed: "In, NotIn, Exists or DoesNotExist",
                        },
                    ));
                }
            };
            let values: Vec<String> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            if matches!(op, SelectorOp::In | SelectorOp::NotIn) && values.is_empty() {
                return Err(obj.field(
                    format!("{f}.values"),
                    FieldProblem::Rule("must not be empty for In and NotIn"),
                ));
            }
            sel.match_expressions.push((key.to_owned(), op, values));
        }
    }
    Ok(sel)
}

/// Decodes and validates an `ExternalIPPool` object.
pub fn parse_pool(v: &Value) -> Result<ExternalIpPool, ObjectError> {
    let (obj, spec) = name_and_spec("ExternalIPPool", v)?;
    let ranges_v = spec
        .get("ipRanges")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            obj.field(
                "spec.ipRanges",
                FieldProblem::Rule("must list at least one range"),
            )
        })?;
    let mut ranges = Vec::new();
    for (i, r) in ranges_v.iter().enumerate() {
        let f = format!("spec.ipRanges[{i}]");
        let range = match (r.get("cidr"), r.get("start"), r.get("end")) {
            (Some(c), None, None) => {
                let s = c.as_str().unwrap_or_default();
                let net: Ipv4Network = s.parse().map_err(|source| {
                    obj.field(
                        format!("{f}.cidr"),
                        FieldProblem::Cidr {
                            value: s.to_owned(),
                            source,
                        },
                    )
                })?;
                IpRange {
                    start: net.network(),
                    end: net.broadcast(),
                }
            }
            (None, Some(a), Some(b)) => {
                let start = parse_ip(&obj, &format!("{f}.start"), a)?;
                let end = parse_ip(&obj, &format!("{f}.end"), b)?;
                if start > end {
                    return Err(obj.field(f, FieldProblem::StartAfterEnd { start, end }));
                }
                IpRange { start, end }
            }
            _ => {
                return Err(obj.field(
                    f,
                    FieldProblem::Rule("needs either `cidr` or both `start` and `end`"),
                ));
            }
        };
        ranges.push(range);
    }
    let subnet = match spec.get("subnetInfo").filter(|s| !s.is_null()) {
        None => None,
        Some(si) => {
            let gateway = parse_ip(
                &obj,
                "spec.subnetInfo.gateway",
                si.get("gateway").unwrap_or(&Value::Null),
            )?;
            let prefix = si
                .get("prefixLength")
                .and_then(Value::as_u64)
                .filter(|p| (1..=32).contains(p))
                .ok_or_else(|| {
                    obj.field(
                        "spec.subnetInfo.prefixLength",
                        FieldProblem::Rule("must be an integer from 1 to 32"),
                    )
                })?;
            let vlan = match si.get("vlan") {
                None | Some(Value::Null) => 0,
                Some(x) => x.as_u64().filter(|v| *v <= 4094).ok_or_else(|| {
                    obj.field(
                        "spec.subnetInfo.vlan",
                        FieldProblem::NotAllowed {
                            value: x.clone(),
                            allowed: "a VLAN ID (0-4094)",
                        },
                    )
                })?,
            };
            let s = SubnetInfo {
                gateway,
                prefix_len: prefix as u8,
                vlan: vlan as u16,
            };
            let net = s.network();
            for (i, r) in ranges.iter().enumerate() {
                if !net.contains(r.start) || !net.contains(r.end) {
                    return Err(obj.field(
                        format!("spec.ipRanges[{i}]"),
                        FieldProblem::OutsideSubnet {
                            start: r.start,
                            end: r.end,
                            subnet: net,
                            gateway,
                            prefix_len: s.prefix_len,
                        },
                    ));
                }
            }
            Some(s)
        }
    };
    let node_selector = parse_selector(
        &obj,
        "spec.nodeSelector",
        spec.get("nodeSelector").unwrap_or(&Value::Null),
    )?;
    Ok(ExternalIpPool {
        name: obj.name,
        ranges,
        subnet,
        node_selector,
    })
}

/// An Egress's `spec.bandwidth` (Antrea's traffic shaping): all traffic that leaves with the
/// Egress's IP, from every pod it selects on every node, is limited together on the node that
/// holds the IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bandwidth {
    /// `rate`, bits per second.
    pub rate_bps: u64,
    /// `burst`, bits: how far traffic may run ahead of the rate.
    pub burst_bits: u64,
}

/// Bits per second of an Antrea bandwidth quantity (`300k`, `10M`, `1G`, `1.5M`, `100`,
/// binary suffixes `Ki`, `Mi`, `Gi` too), `None` when it is not one.
pub fn bandwidth_bits(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)?;
    let mult = match unit {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bits = n * mult;
    (bits >= 1.0 && bits < u64::MAX as f64).then_some(bits as u64)
}

/// Decodes and validates an `Egress` object.
pub fn parse_egress(v: &Value) -> Result<Egress, ObjectError> {
    let (obj, spec) = name_and_spec("Egress", v)?;
    let applied = spec
        .get("appliedTo")
        .filter(|a| a.is_object())
        .ok_or_else(|| obj.field("spec.appliedTo", FieldProblem::Missing))?;
    let sel = |f: &str| -> Result<Option<LabelSelector>, ObjectError> {
        applied
            .get(f)
            .filter(|s| !s.is_null())
            .map(|s| parse_selector(&obj, &format!("spec.appliedTo.{f}"), s))
            .transpose()
    };
    let pod_selector = sel("podSelector")?;
    let namespace_selector = sel("namespaceSelector")?;
    if pod_selector.is_none() && namespace_selector.is_none() {
        return Err(obj.field(
            "spec.appliedTo",
            FieldProblem::Rule("needs a podSelector or a namespaceSelector"),
        ));
    }
    let egress_ip = match spec
        .get("egressIP")
        .filter(|x| !x.is_null() && x != &&Value::from(""))
    {
        None => None,
        Some(x) => Some(parse_ip(&obj, "spec.egressIP", x)?),
    };
    let pool = spec
        .get("externalIPPool")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let mut unsupported = Vec::new();
    // Antrea's lists (one address and one pool per IP family, index-correlated): ferrea
    // serves IPv4, so the IPv4 entry and the pool at its index.
    let list = |f: &str| -> Result<Vec<String>, ObjectError> {
        match spec.get(f).filter(|x| !x.is_null()) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_str().map(str::to_owned).ok_or_else(|| {
                        obj.field(
                            format!("spec.{f}[{i}]"),
                            FieldProblem::WrongType {
                                expected: "a string",
                                found: x.clone(),
                            },
                        )
                    })
                })
                .collect(),
            Some(x) => Err(obj.field(
                format!("spec.{f}"),
                FieldProblem::WrongType {
                    expected: "a list",
                    found: x.clone(),
                },
            )),
        }
    };
    let ips = list("egressIPs")?;
    let pools = list("externalIPPools")?;
    if !ips.is_empty() && egress_ip.is_some() {
        return Err(obj.field(
            "spec.egressIPs",
            FieldProblem::Rule("cannot be set with spec.egressIP"),
        ));
    }
    if !pools.is_empty() && pool.is_some() {
        return Err(obj.field(
            "spec.externalIPPools",
            FieldProblem::Rule("cannot be set with spec.externalIPPool"),
        ));
    }
    let mut v4_at = None;
    for (i, x) in ips.iter().enumerate() {
        let field = format!("spec.egressIPs[{i}]");
        match x.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) if v4_at.is_none() => v4_at = Some((i, a)),
            Ok(std::net::IpAddr::V4(_)) => {
                return Err(obj.field(
                    &field,
                    FieldProblem::Rule("a second IPv4 address (one per IP family)"),
                ));
            }
            Ok(std::net::IpAddr::V6(_)) => unsupported.push(format!(
                "{field} {x}: IPv6 egress is not served by ferrea (IPv4 only); the Egress is \
                 served with its IPv4 address"
            )),
            Err(_) => {
                parse_ip(&obj, &field, &Value::from(x.as_str()))?;
            }
        }
    }
    let (egress_ip, pool) = if ips.is_empty() && pools.is_empty() {
        (egress_ip, pool)
    } else {
        let ip = v4_at.map(|(_, a)| a).or(egress_ip);
        let chosen = match (v4_at, ips.is_empty()) {
            // The pool at the IPv4 address's index (Antrea correlates them by index).
            (Some((i, _)), _) => pools.get(i).cloned(),
            // Pools without addresses: ferrea's pools are IPv4, the first one serves.
            (None, true) => pools.first().cloned(),
            (None, false) => None,
        };
        for (i, p) in pools.iter().enumerate() {
            if Some(p) != chosen.as_ref() {
                unsupported.push(format!(
                    "spec.externalIPPools[{i}] {p}: only the pool of the IPv4 address is used \
                     (IPv4 only)"
                ));
            }
        }
        (ip, chosen.or(pool))
    };
    if egress_ip.is_none() && pool.is_none() {
        return Err(obj.field(
            "spec",
            FieldProblem::Rule(
                "needs egressIP or externalIPPool (or both), or an IPv4 entry in egressIPs or externalIPPools",
            ),
        ));
    }
    let mut bandwidth = None;
    if let Some(b) = spec.get("bandwidth").filter(|x| !x.is_null()) {
        let q = |f: &str| -> Result<u64, ObjectError> {
            let field = format!("spec.bandwidth.{f}");
            let s = b
                .get(f)
                .and_then(Value::as_str)
                .ok_or_else(|| obj.field(&field, FieldProblem::Missing))?;
            bandwidth_bits(s).ok_or_else(|| {
                obj.field(
                    &field,
                    FieldProblem::NotAllowed {
                        value: Value::from(s),
                        allowed: "a rate such as 300k, 10M or 1G (bits per second)",
                    },
                )
            })
        };
        bandwidth = Some(Bandwidth {
            rate_bps: q("rate")?,
            burst_bits: q("burst")?,
        });
    }
    Ok(Egress {
        name: obj.name,
        created: v
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
            .map(str::to_owned),
        pod_selector,
        namespace_selector,
        egress_ip,
        pool,
        bandwidth,
        unsupported,
        recorded_ip: v
            .pointer("/status/egressIP")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok()),
        recorded_node: v
            .pointer("/status/egressNode")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_yaml_ng::from_str(s).unwrap()
    }

    fn egress_with(spec: &str) -> Result<Egress, ObjectError> {
        parse_egress(&yaml(&format!(
            "kind: Egress\nmetadata: {{name: e}}\nspec: {{appliedTo: {{podSelector: {{}}}}, {spec}}}\n"
        )))
    }

    #[test]
    fn v1beta1_lists_serve_the_ipv4_entry_and_report_the_rest() {
        let e = egress_with("egressIPs: [10.0.0.5, 'fd00::5'], externalIPPools: [v4, v6]").unwrap();
        assert_eq!(e.egress_ip, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(e.pool.as_deref(), Some("v4"));
        assert_eq!(e.unsupported.len(), 2, "{:?}", e.unsupported);
        assert!(
            e.unsupported[0].starts_with("spec.egressIPs[1] fd00::5"),
            "{:?}",
            e.unsupported
        );
        assert!(
            e.unsupported[1].starts_with("spec.externalIPPools[1] v6"),
            "{:?}",
            e.unsupported
        );
        // IPv6 first: the index still correlates.
        let e = egress_with("egressIPs: ['fd00::5', 10.0.0.5], externalIPPools: [v6, v4]").unwrap();
        assert_eq!(e.pool.as_deref(), Some("v4"));
        // Pools only: the first one allocates.
        let e = egress_with("externalIPPools: [p]").unwrap();
        assert_eq!((e.egress_ip, e.pool.as_deref()), (None, Some("p")));
        assert!(e.unsupported.is_empty());
        let e = egress_with("egressIPs: [10.0.0.5]").unwrap();
        assert_eq!(
            (e.egress_ip, e.pool),
            (Some("10.0.0.5".parse().unwrap()), None)
        );
        // What Antrea refuses, by field.
        for (spec, field, what) in [
            (
                "egressIP: 10.0.0.5, egressIPs: [10.0.0.6]",
                "spec.egressIPs",
                "cannot be set",
            ),
            (
                "externalIPPool: a, externalIPPools: [b]",
                "spec.externalIPPools",
                "cannot be set",
            ),
            (
                "egressIPs: [10.0.0.5, 10.0.0.6]",
                "spec.egressIPs[1]",
                "second IPv4",
            ),
            ("egressIPs: [nope]", "spec.egressIPs[0]", "not an IPv4"),
            ("egressIPs: 10.0.0.5", "spec.egressIPs", "a list"),
            ("egressIPs: ['fd00::5']", "spec", "IPv4 entry"),
        ] {
            let err = egress_with(spec).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains(what), "{spec}: {err}");
        }
    }

    #[test]
    fn bandwidth_is_validated_and_decoded() {
        let e = egress_with("egressIP: 10.0.0.5, bandwidth: {rate: 10M, burst: 20M}").unwrap();
        assert!(e.unsupported.is_empty(), "{:?}", e.unsupported);
        assert_eq!(
            e.bandwidth,
            Some(Bandwidth {
                rate_bps: 10_000_000,
                burst_bits: 20_000_000
            })
        );
        assert_eq!(egress_with("egressIP: 10.0.0.5").unwrap().bandwidth, None);
        let err = egress_with("egressIP: 10.0.0.5, bandwidth: {rate: fast, burst: 1M}")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.bandwidth.rate") && err.contains("fast"),
            "{err}"
        );
        let err = egress_with("egressIP: 10.0.0.5, bandwidth: {rate: 1M}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.bandwidth.burst"), "{err}");
        assert_eq!(bandwidth_bits("300k"), Some(300_000));
        assert_eq!(bandwidth_bits("1.5M"), Some(1_500_000));
        assert_eq!(bandwidth_bits("1Mi"), Some(1_048_576));
        assert_eq!(bandwidth_bits("0"), None);
        assert_eq!(bandwidth_bits("10X"), None);
    }

    /// Seed 000's manifests, verbatim (one copy, shared with the plan tests and the harness).
    const SEED_POOL: &str = include_str!("../../testdata/seed000-pool.yaml");
    const SEED_EGRESS: &str = include_str!("../../testdata/seed000-egress.yaml");
    #[test]
    fn seed_manifests_are_accepted_verbatim() {
        let p = parse_pool(&yaml(SEED_POOL)).unwrap();
        assert_eq!(p.name, "child-egress-ippool");
        assert_eq!(p.ranges[0].len(), 199);
        let s = p.subnet.unwrap();
        assert_eq!(
            (s.gateway, s.prefix_len, s.vlan),
            ("10.172.170.254".parse().unwrap(), 24, 100)
        );
        assert_eq!(s.network().to_string(), "10.172.170.0/24");
        assert_eq!(p.node_selector, LabelSelector::default());
        let e = parse_egress(&yaml(SEED_EGRESS)).unwrap();
        assert_eq!(e.pool.as_deref(), Some("child-egress-ippool"));
        let sel = e.pod_selector.unwrap();
        let mut labels = BTreeMap::new();
        labels.insert("app".to_owned(), "hello-world1".to_owned());
        assert!(sel.matches(&labels));
        labels.insert("app".to_owned(), "other".to_owned());
        assert!(!sel.matches(&labels));
    }

    #[test]
    fn invalid_pools_name_the_field() {
        let bad = |from: &str, to: &str| {
            parse_pool(&yaml(&SEED_POOL.replace(from, to)))
                .unwrap_err()
                .to_string()
        };
        let e = bad("vlan: 100", "vlan: 5000");
        assert!(
            e.contains("spec.subnetInfo.vlan") && e.contains("5000"),
            "{e}"
        );
        let e = bad("gateway: 10.172.170.254", "gateway: 10.9.9.1");
        assert!(
            e.contains("spec.ipRanges[0]") && e.contains("outside the subnet"),
            "{e}"
        );
        let e = bad("prefixLength: 24", "prefixLength: 40");
        assert!(e.contains("prefixLength"), "{e}");
        let e = bad("end: 10.172.170.199", "end: 10.172.170.0");
        assert!(e.contains("after end"), "{e}");
        let e = bad("start: 10.172.170.1", "start: 10.172.170");
        assert!(e.contains("spec.ipRanges[0].start"), "{e}");
        let e = parse_pool(&yaml(
            "kind: ExternalIPPool\nmetadata: {name: p}\nspec: {ipRanges: []}\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("spec.ipRanges"), "{e}");
    }

    #[test]
    fn cidr_ranges_and_gateway_exclusion() {
        let p = parse_pool(&yaml(
            "kind: ExternalIPPool\nmetadata: {name: p}\nspec:\n  ipRanges: [{cidr: 10.0.0.0/30}]\n  subnetInfo: {gateway: 10.0.0.1, prefixLength: 24}\n",
        ))
        .unwrap();
        let ips: Vec<String> = p.addresses().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.0.0.0", "10.0.0.2", "10.0.0.3"]);
        assert_eq!(p.subnet.unwrap().vlan, 0);
    }

    #[test]
    fn invalid_egresses_name_the_field() {
        let e = parse_egress(&yaml(
            "kind: Egress\nmetadata: {name: e}\nspec: {externalIPPool: p}\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("spec.appliedTo"), "{e}");
        let e = parse_egress(&yaml(
            "kind: Egress\nmetadata: {name: e}\nspec: {appliedTo: {podSelector: {}}}\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("egressIP or externalIPPool"), "{e}");
        let e = parse_egress(&yaml(
            "kind: Egress\nmetadata: {name: e}\nspec: {appliedTo: {podSelector: {matchExpressions: [{key: a, operator: Has}]}}, externalIPPool: p}\n",
        ))
        .unwrap_err().to_string();
        assert!(e.contains("matchExpressions[0].operator"), "{e}");
    }

    #[test]
    fn selector_expressions() {
        let s = parse_selector(
            &ObjectRef::cluster("X", "x"),
            "s",
            &yaml("{matchExpressions: [{key: tier, operator: In, values: [web, api]}, {key: legacy, operator: DoesNotExist}]}"),
        )
        .unwrap();
        let l = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert!(s.matches(&l(&[("tier", "web")])));
        assert!(!s.matches(&l(&[("tier", "db")])));
        assert!(!s.matches(&l(&[("tier", "api"), ("legacy", "yes")])));
    }
}
