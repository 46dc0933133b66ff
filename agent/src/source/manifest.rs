//! Decoding Kubernetes-style manifests (YAML or JSON, multi-document, `List` kinds) into the
//! typed objects of [`super::DesiredState`]. Used by the [`super::files`] source and by the
//! test helpers of `crate::testing`; an object that does not validate is returned as an
//! [`ObjectError`] naming its kind, name and field, and the other objects are still used.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Deserialize;
use serde_json::Value;

use super::error::{DecodeError, FieldProblem, ObjectError, ObjectRef};
use super::{
    ContainerPort, Endpoint, EndpointPort, EndpointSliceInfo, NodeInfo, PodInfo, Protocol,
    ServiceInfo, ServicePort, TargetPort,
};

/// One decoded object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    /// A `v1/Node`.
    Node(NodeInfo),
    /// A `v1/Pod`.
    Pod(PodInfo),
    /// A `v1/Service`.
    Service(ServiceInfo),
    /// A `discovery.k8s.io/v1` `EndpointSlice` of address type IPv4.
    EndpointSlice(EndpointSliceInfo),
    /// A `networking.k8s.io/v1` `NetworkPolicy`.
    NetworkPolicy(crate::source::netpol::NetworkPolicy),
    /// A `v1/Namespace`: its name and labels.
    Namespace(String, BTreeMap<String, String>),
    /// A `crd.antrea.io/v1beta1` `Egress`.
    Egress(crate::source::crd::Egress),
    /// A `crd.antrea.io/v1beta1` `ExternalIPPool`.
    ExternalIpPool(crate::source::crd::ExternalIpPool),
    /// A kind the agent does not use (kept out of the state, not an error).
    Ignored {
        /// `kind`.
        kind: String,
    },
}

/// Splits a document stream into objects. Returns the objects that decoded and, separately,
/// an error per object that did not (naming kind, name and field). A stream that is not
/// valid YAML or JSON is an error as a whole.
pub fn decode(text: &str) -> Result<(Vec<Object>, Vec<ObjectError>), DecodeError> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).map_err(|source| DecodeError::Yaml { source })?;
        if v.is_null() {
            continue;
        }
        let items = match v.get("kind").and_then(Value::as_str) {
            Some(k) if k.ends_with("List") => v
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            _ => vec![v],
        };
        for item in items {
            match decode_object(&item) {
                Ok(o) => objects.push(o),
                Err(e) => errors.push(e),
            }
        }
    }
    Ok((objects, errors))
}

fn no_name(kind: &str) -> ObjectError {
    ObjectError::NoName {
        kind: kind.to_owned(),
    }
}

fn wrong_type(expected: &'static str, found: &Value) -> FieldProblem {
    FieldProblem::WrongType {
        expected,
        found: found.clone(),
    }
}

/// An IPv4 address in string `s`, at `field` of `obj`.
pub(super) fn ipv4(obj: &ObjectRef, field: &str, s: &str) -> Result<Ipv4Addr, ObjectError> {
    s.parse().map_err(|source| {
        obj.field(
            field,
            FieldProblem::Ipv4 {
                value: s.to_owned(),
                source,
            },
        )
    })
}

/// Decodes one object (a JSON value with `kind`): what [`decode`] does for each item of a
/// stream, and what the Kubernetes source does for each object its watchers hold, so both
/// sources give the same state for the same objects.
pub fn decode_object(v: &Value) -> Result<Object, ObjectError> {
    let kind = v
        .get("kind")
        .and_then(Value::as_str)
        .ok_or(ObjectError::NoKind)?;
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    match kind {
        "Node" => {
            if name.is_empty() {
                return Err(no_name(kind));
            }
            let obj = ObjectRef::cluster(kind, name);
            let pod_cidr = match v.pointer("/spec/podCIDR") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.parse().map_err(|source| {
                    obj.field(
                        "spec.podCIDR",
                        FieldProblem::Cidr {
                            value: s.clone(),
                            source,
                        },
                    )
                })?),
                Some(other) => {
                    return Err(obj.field("spec.podCIDR", wrong_type("a string", other)));
                }
            };
            let internal_ip = v
                .pointer("/status/addresses")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .find(|x| x.get("type").and_then(Value::as_str) == Some("InternalIP"))
                })
                .and_then(|x| x.get("address").and_then(Value::as_str))
                .map(|s| ipv4(&obj, "status.addresses[InternalIP]", s))
                .transpose()?;
            Ok(Object::Node(NodeInfo {
                name: name.to_owned(),
                pod_cidr,
                internal_ip,
                labels: string_map(v, "/metadata/labels", &obj)?,
            }))
        }
        "Namespace" => {
            if name.is_empty() {
                return Err(no_name(kind));
            }
            let labels = string_map(v, "/metadata/labels", &ObjectRef::cluster(kind, name))?;
            Ok(Object::Namespace(name.to_owned(), labels))
        }
        "Egress" | "ExternalIPPool" => {
            let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
            if !api.starts_with("crd.antrea.io/") {
                return Ok(Object::Ignored {
                    kind: kind.to_owned(),
                });
            }
            if api != "crd.antrea.io/v1beta1" {
                return Err(ObjectRef::cluster(kind, name)
                    .field("apiVersion", FieldProblem::NotServed(api.to_owned())));
            }
            if kind == "Egress" {
                crate::source::crd::parse_egress(v).map(Object::Egress)
            } else {
                crate::source::crd::parse_pool(v).map(Object::ExternalIpPool)
            }
        }
        "Pod" => decode_pod(v, name).map(Object::Pod),
        "Service" => decode_service(v, name).map(Object::Service),
        "NetworkPolicy" => {
            if name.is_empty() {
                return Err(no_name(kind));
            }
            let ns = namespace_of(v, kind, name)?;
            let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
            if api != "networking.k8s.io/v1" {
                return Err(ObjectRef::namespaced(kind, &ns, name).field(
                    "apiVersion",
                    FieldProblem::ApiVersion {
                        found: api.to_owned(),
                        want: "networking.k8s.io/v1",
                    },
                ));
            }
            crate::source::netpol::parse_network_policy(v, &ns, name).map(Object::NetworkPolicy)
        }
        "EndpointSlice" => {
            let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
            if api != "discovery.k8s.io/v1" {
                return Err(
                    ObjectRef::namespaced(kind, &namespace_of(v, kind, name)?, name).field(
                        "apiVersion",
                        FieldProblem::ApiVersion {
                            found: api.to_owned(),
                            want: "discovery.k8s.io/v1",
                        },
                    ),
                );
            }
            match v.get("addressType").and_then(Value::as_str) {
                // IPv6 and FQDN slices are not for an IPv4 proxy; not an error.
                Some("IPv6") | Some("FQDN") => Ok(Object::Ignored {
                    kind: kind.to_owned(),
                }),
                _ => decode_endpoint_slice(v, name).map(Object::EndpointSlice),
            }
        }
        other => Ok(Object::Ignored {
            kind: other.to_owned(),
        }),
    }
}

/// `metadata.namespace`, default `default`.
fn namespace_of(v: &Value, kind: &str, name: &str) -> Result<String, ObjectError> {
    match v.pointer("/metadata/namespace") {
        None | Some(Value::Null) => Ok("default".into()),
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(other) => Err(ObjectRef::cluster(kind, name).field(
            "metadata.namespace",
            wrong_type("a non-empty string", other),
        )),
    }
}

/// A map of strings (labels, annotations, selector) at `ptr`; absent is empty.
fn string_map(
    v: &Value,
    ptr: &str,
    obj: &ObjectRef,
) -> Result<BTreeMap<String, String>, ObjectError> {
    let field = ptr.trim_start_matches('/').replace('/', ".");
    match v.pointer(ptr) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, x)| match x {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(obj.field(format!("{field}.{k}"), wrong_type("a string", other))),
            })
            .collect(),
        Some(other) => Err(obj.field(field, wrong_type("a map", other))),
    }
}

/// A port number field (1-65535).
fn port_number(x: Option<&Value>, field: &str, obj: &ObjectRef) -> Result<u16, ObjectError> {
    match x {
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|p| (1..=65535).contains(p))
            .map(|p| p as u16)
            .ok_or_else(|| {
                obj.field(
                    field,
                    FieldProblem::NotAllowed {
                        value: Value::Number(n.clone()),
                        allowed: "a port (1-65535)",
                    },
                )
            }),
        None | Some(Value::Null) => Err(obj.field(field, FieldProblem::Missing)),
        Some(other) => Err(obj.field(field, wrong_type("a number", other))),
    }
}

/// A `protocol` field: `TCP` (the default), `UDP` or `SCTP`.
fn protocol(x: Option<&Value>, field: &str, obj: &ObjectRef) -> Result<Protocol, ObjectError> {
    match x {
        None | Some(Value::Null) => Ok(Protocol::Tcp),
        Some(v @ Value::String(s)) => match s.as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(obj.field(
                field,
                FieldProblem::NotAllowed {
                    value: v.clone(),
                    allowed: "TCP, UDP or SCTP",
                },
            )),
        },
        Some(other) => Err(obj.field(field, wrong_type("a string", other))),
    }
}

/// An optional string field.
fn opt_string(
    x: Option<&Value>,
    field: &str,
    obj: &ObjectRef,
) -> Result<Option<String>, ObjectError> {
    match x {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(obj.field(field, wrong_type("a string", other))),
    }
}

/// An optional array field; absent is empty.
fn array<'a>(
    x: Option<&'a Value>,
    field: &str,
    obj: &ObjectRef,
) -> Result<&'a [Value], ObjectError> {
    match x {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(obj.field(field, wrong_type("a list", other))),
    }
}

fn decode_pod(v: &Value, name: &str) -> Result<PodInfo, ObjectError> {
    if name.is_empty() {
        return Err(no_name("Pod"));
    }
    let namespace = namespace_of(v, "Pod", name)?;
    let obj = ObjectRef::namespaced("Pod", &namespace, name);
    let mut container_ports = Vec::new();
    let containers = array(v.pointer("/spec/containers"), "spec.containers", &obj)?;
    for (i, c) in containers.iter().enumerate() {
        let ports = array(c.get("ports"), &format!("spec.containers[{i}].ports"), &obj)?;
        for (j, p) in ports.iter().enumerate() {
            let f = |k: &str| format!("spec.containers[{i}].ports[{j}].{k}");
            container_ports.push(ContainerPort {
                name: opt_string(p.get("name"), &f("name"), &obj)?,
                port: port_number(p.get("containerPort"), &f("containerPort"), &obj)?,
                protocol: protocol(p.get("protocol"), &f("protocol"), &obj)?,
            });
        }
    }
    let pod_ip = opt_string(v.pointer("/status/podIP"), "status.podIP", &obj)?
        .map(|s| ipv4(&obj, "status.podIP", &s))
        .transpose()?;
    Ok(PodInfo {
        labels: string_map(v, "/metadata/labels", &obj)?,
        annotations: string_map(v, "/metadata/annotations", &obj)?,
        node_name: opt_string(v.pointer("/spec/nodeName"), "spec.nodeName", &obj)?,
        container_ports,
        pod_ip,
        namespace,
        name: name.to_owned(),
    })
}

fn decode_service(v: &Value, name: &str) -> Result<ServiceInfo, ObjectError> {
    if name.is_empty() {
        return Err(no_name("Service"));
    }
    let namespace = namespace_of(v, "Service", name)?;
    let obj = ObjectRef::namespaced("Service", &namespace, name);
    let service_type = opt_string(v.pointer("/spec/type"), "spec.type", &obj)?
        .unwrap_or_else(|| "ClusterIP".into());
    if !matches!(
        service_type.as_str(),
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return Err(obj.field(
            "spec.type",
            FieldProblem::NotAllowed {
                value: Value::String(service_type),
                allowed: "ClusterIP, NodePort, LoadBalancer or ExternalName",
            },
        ));
    }
    let mut ports = Vec::new();
    for (i, p) in array(v.pointer("/spec/ports"), "spec.ports", &obj)?
        .iter()
        .enumerate()
    {
        let f = |k: &str| format!("spec.ports[{i}].{k}");
        let port = port_number(p.get("port"), &f("port"), &obj)?;
        let target_port = match p.get("targetPort") {
            None | Some(Value::Null) => TargetPort::Number(port),
            Some(Value::String(s)) if s.is_empty() => TargetPort::Number(port),
            // Kubernetes accepts a numeric string as a number (IntOrString).
            Some(Value::String(s)) => match s.parse::<u16>() {
                Ok(n) if n > 0 => TargetPort::Number(n),
                _ => TargetPort::Name(s.clone()),
            },
            x @ Some(_) => TargetPort::Number(port_number(x, &f("targetPort"), &obj)?),
        };
        let node_port = match p.get("nodePort") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_u64() == Some(0) => None,
            x => Some(port_number(x, &f("nodePort"), &obj)?),
        };
        ports.push(ServicePort {
            name: opt_string(p.get("name"), &f("name"), &obj)?,
            port,
            target_port,
            protocol: protocol(p.get("protocol"), &f("protocol"), &obj)?,
            node_port,
        });
    }
    // spec.clusterIPs, else spec.clusterIP; "None" is headless. IPv6 entries are another
    // family's, not an error.
    let mut cluster_ip_fields = Vec::new();
    let list = array(v.pointer("/spec/clusterIPs"), "spec.clusterIPs", &obj)?;
    if list.is_empty() {
        if let Some(ip) = opt_string(v.pointer("/spec/clusterIP"), "spec.clusterIP", &obj)? {
            cluster_ip_fields.push(("spec.clusterIP".to_owned(), Value::String(ip)));
        }
    } else {
        for (i, x) in list.iter().enumerate() {
            cluster_ip_fields.push((format!("spec.clusterIPs[{i}]"), x.clone()));
        }
    }
    let mut cluster_ips = Vec::new();
    for (field, x) in cluster_ip_fields {
        if x.as_str() == Some("None") {
            continue;
        }
        if let Some(ip) = ipv4_or_other_family(&x, &field, &obj)? {
            cluster_ips.push(ip);
        }
    }
    let mut external_ips = Vec::new();
    for (i, x) in array(v.pointer("/spec/externalIPs"), "spec.externalIPs", &obj)?
        .iter()
        .enumerate()
    {
        if let Some(ip) = ipv4_or_other_family(x, &format!("spec.externalIPs[{i}]"), &obj)? {
            external_ips.push(ip);
        }
    }
    let mut load_balancer_ips = Vec::new();
    for (i, x) in array(
        v.pointer("/status/loadBalancer/ingress"),
        "status.loadBalancer.ingress",
        &obj,
    )?
    .iter()
    .enumerate()
    {
        // An ingress point may be a host name only (cloud load balancers); nothing to do.
        if let Some(ip) = x.get("ip").filter(|ip| !ip.is_null()) {
            let field = format!("status.loadBalancer.ingress[{i}].ip");
            if let Some(ip) = ipv4_or_other_family(ip, &field, &obj)? {
                load_balancer_ips.push(ip);
            }
        }
    }
    let affinity = opt_string(
        v.pointer("/spec/sessionAffinity"),
        "spec.sessionAffinity",
        &obj,
    )?;
    let affinity_secs = match affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let ptr = "/spec/sessionAffinityConfig/clientIP/timeoutSeconds";
            let field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds";
            match v.pointer(ptr) {
                None | Some(Value::Null) => Some(10800),
                Some(Value::Number(n)) => Some(
                    n.as_u64()
                        .filter(|t| (1..=86400).contains(t))
                        .map(|t| t as u32)
                        .ok_or_else(|| {
                            obj.field(
                                field,
                                FieldProblem::NotAllowed {
                                    value: Value::Number(n.clone()),
                                    allowed: "1 to 86400 seconds",
                                },
                            )
                        })?,
                ),
                Some(other) => return Err(obj.field(field, wrong_type("a number", other))),
            }
        }
        Some(other) => {
            return Err(obj.field(
                "spec.sessionAffinity",
                FieldProblem::NotAllowed {
                    value: Value::String(other.to_owned()),
                    allowed: "None or ClientIP",
                },
            ));
        }
    };
    let policy = |ptr: &str, field: &'static str| -> Result<bool, ObjectError> {
        match opt_string(v.pointer(ptr), field, &obj)?.as_deref() {
            None | Some("Cluster") => Ok(false),
            Some("Local") => Ok(true),
            Some(other) => Err(obj.field(
                field,
                FieldProblem::NotAllowed {
                    value: Value::String(other.to_owned()),
                    allowed: "Cluster or Local",
                },
            )),
        }
    };
    let internal_local = policy("/spec/internalTrafficPolicy", "spec.internalTrafficPolicy")?;
    let external_local = policy("/spec/externalTrafficPolicy", "spec.externalTrafficPolicy")?;
    let health_check_node_port = match v.pointer("/spec/healthCheckNodePort") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64() == Some(0) => None,
        x => Some(port_number(x, "spec.healthCheckNodePort", &obj)?),
    };
    Ok(ServiceInfo {
        annotations: string_map(v, "/metadata/annotations", &obj)?,
        selector: string_map(v, "/spec/selector", &obj)?,
        service_type,
        ports,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        affinity_secs,
        internal_local,
        external_local,
        health_check_node_port,
        namespace,
        name: name.to_owned(),
    })
}

/// An address field that must be an IP: `Some` for IPv4, `None` for IPv6 (another family's,
/// which an IPv4 proxy leaves alone), an error for anything else.
fn ipv4_or_other_family(
    x: &Value,
    field: &str,
    obj: &ObjectRef,
) -> Result<Option<Ipv4Addr>, ObjectError> {
    let Value::String(s) = x else {
        return Err(obj.field(field, wrong_type("an IP address", x)));
    };
    match s.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => Ok(Some(ip)),
        Ok(std::net::IpAddr::V6(_)) => Ok(None),
        Err(_) => Err(obj.field(
            field,
            FieldProblem::NotAllowed {
                value: x.clone(),
                allowed: "an IP address",
            },
        )),
    }
}

/// A boolean condition of an endpoint; absent (or null) is `default`.
fn condition(
    x: Option<&Value>,
    default: bool,
    field: &str,
    obj: &ObjectRef,
) -> Result<bool, ObjectError> {
    match x {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(obj.field(field, wrong_type("true or false", other))),
    }
}

fn decode_endpoint_slice(v: &Value, name: &str) -> Result<EndpointSliceInfo, ObjectError> {
    if name.is_empty() {
        return Err(no_name("EndpointSlice"));
    }
    let namespace = namespace_of(v, "EndpointSlice", name)?;
    let obj = ObjectRef::namespaced("EndpointSlice", &namespace, name);
    let labels = string_map(v, "/metadata/labels", &obj)?;
    let Some(service) = labels.get("kubernetes.io/service-name").cloned() else {
        return Err(obj.field(
            "metadata.labels.kubernetes.io/service-name",
            FieldProblem::Missing,
        ));
    };
    let mut ports = Vec::new();
    for (i, p) in array(v.get("ports"), "ports", &obj)?.iter().enumerate() {
        let f = |k: &str| format!("ports[{i}].{k}");
        ports.push(EndpointPort {
            name: opt_string(p.get("name"), &f("name"), &obj)?,
            port: port_number(p.get("port"), &f("port"), &obj)?,
            protocol: protocol(p.get("protocol"), &f("protocol"), &obj)?,
        });
    }
    let mut endpoints = Vec::new();
    for (i, e) in array(v.get("endpoints"), "endpoints", &obj)?
        .iter()
        .enumerate()
    {
        let f = |k: &str| format!("endpoints[{i}].{k}");
        let addresses = array(e.get("addresses"), &f("addresses"), &obj)?;
        let Some(first) = addresses.first() else {
            return Err(obj.field(f("addresses"), FieldProblem::Missing));
        };
        let address = ipv4(
            &obj,
            &f("addresses[0]"),
            first
                .as_str()
                .ok_or_else(|| obj.field(f("addresses[0]"), wrong_type("a string", first)))?,
        )?;
        let c = e.get("conditions");
        let ready = condition(
            c.and_then(|c| c.get("ready")),
            true,
            &f("conditions.ready"),
            &obj,
        )?;
        let serving = condition(
            c.and_then(|c| c.get("serving")),
            ready,
            &f("conditions.serving"),
            &obj,
        )?;
        let terminating = condition(
            c.and_then(|c| c.get("terminating")),
            false,
            &f("conditions.terminating"),
            &obj,
        )?;
        let zone_hints = match e.pointer("/hints/forZones") {
            None | Some(Value::Null) => None,
            Some(_) => {
                let mut zones = Vec::new();
                let list = array(e.pointer("/hints/forZones"), &f("hints.forZones"), &obj)?;
                for (j, z) in list.iter().enumerate() {
                    let field = format!("endpoints[{i}].hints.forZones[{j}].name");
                    if let Some(zone) = opt_string(z.get("name"), &field, &obj)? {
                        zones.push(zone);
                    }
                }
                Some(zones)
            }
        };
        endpoints.push(Endpoint {
            address,
            ready,
            serving,
            terminating,
            node_name: opt_string(e.get("nodeName"), &f("nodeName"), &obj)?,
            zone_hints,
        });
    }
    Ok(EndpointSliceInfo {
        namespace,
        name: name.to_owned(),
        service,
        ports,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages of `decode`'s object errors.
    fn messages(e: Vec<ObjectError>) -> Vec<String> {
        e.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn decodes_egress_pools_namespaces_and_node_labels() {
        let (o, e) = decode(
            "apiVersion: crd.antrea.io/v1beta1\nkind: ExternalIPPool\nmetadata: {name: p}\n\
             spec: {ipRanges: [{cidr: 10.9.0.0/30}]}\n---\n\
             apiVersion: crd.antrea.io/v1beta1\nkind: Egress\nmetadata: {name: e}\n\
             spec: {appliedTo: {podSelector: {}}, externalIPPool: p}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {env: prod}}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {network-role: egress-gateway}}\n---\n\
             apiVersion: example.com/v1\nkind: Egress\nmetadata: {name: not-antrea}\n---\n\
             apiVersion: crd.antrea.io/v1alpha2\nkind: Egress\nmetadata: {name: old}\n",
        )
        .unwrap();
        let e = messages(e);
        assert!(
            matches!(&o[0], Object::ExternalIpPool(p) if p.name == "p"),
            "{o:?}"
        );
        assert!(
            matches!(&o[1], Object::Egress(x) if x.pool.as_deref() == Some("p")),
            "{o:?}"
        );
        assert!(matches!(&o[2], Object::Namespace(n, l) if n == "prod" && l["env"] == "prod"));
        assert!(matches!(&o[3], Object::Node(n) if n.labels["network-role"] == "egress-gateway"));
        assert!(matches!(&o[4], Object::Ignored { .. }), "{o:?}");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("Egress old") && e[0].contains("apiVersion"),
            "{e:?}"
        );
    }

    #[test]
    fn decodes_nodes_from_multi_document_yaml_and_lists() {
        let (o, e) = decode(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24}\n\
             status: {addresses: [{type: Hostname, address: n1}, {type: InternalIP, address: 172.18.0.11}]}\n\
             ---\n---\nkind: List\nitems:\n- {kind: Node, metadata: {name: n2}}\n- {kind: ConfigMap, metadata: {name: c}}\n",
        )
        .unwrap();
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(o.len(), 3);
        assert_eq!(
            o[0],
            Object::Node(NodeInfo {
                name: "n1".into(),
                pod_cidr: Some("10.244.1.0/24".parse().unwrap()),
                internal_ip: Some(Ipv4Addr::new(172, 18, 0, 11)),
                labels: BTreeMap::new(),
            })
        );
        assert_eq!(
            o[1],
            Object::Node(NodeInfo {
                name: "n2".into(),
                pod_cidr: None,
                internal_ip: None,
                labels: BTreeMap::new(),
            })
        );
    }

    #[test]
    fn invalid_cidr_names_object_and_field_and_spares_the_rest() {
        let (o, e) = decode(
            "kind: Node\nmetadata: {name: bad}\nspec: {podCIDR: 10.244.1.0/33}\n---\n\
             kind: Node\nmetadata: {name: good}\n",
        )
        .unwrap();
        let e = messages(e);
        assert_eq!(o.len(), 1);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].contains("Node bad") && e[0].contains("spec.podCIDR"),
            "{}",
            e[0]
        );
    }

    #[test]
    fn decodes_pods_with_defaults_and_container_ports() {
        let (o, e) = decode(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-0\n  labels: {app: web}\n\
             spec:\n  nodeName: n1\n  containers:\n  - name: c\n    ports:\n    \
             - {name: http, containerPort: 8080}\n    - {containerPort: 53, protocol: UDP}\n\
             status: {podIP: 10.244.1.5}\n",
        )
        .unwrap();
        assert!(e.is_empty(), "{e:?}");
        let Object::Pod(p) = &o[0] else {
            panic!("{o:?}")
        };
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str()),
            ("default", "web-0")
        );
        assert_eq!(p.labels["app"], "web");
        assert_eq!(p.node_name.as_deref(), Some("n1"));
        assert_eq!(p.pod_ip, Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert_eq!(
            p.container_ports,
            vec![
                ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp
                },
                ContainerPort {
                    name: None,
                    port: 53,
                    protocol: Protocol::Udp
                },
            ]
        );
    }

    #[test]
    fn decodes_services_with_int_and_named_target_ports() {
        let (o, e) = decode(
            "kind: Service\nmetadata:\n  name: s\n  namespace: shop\n  annotations:\n    \
             nodeportlocal.antrea.io/enabled: \"true\"\nspec:\n  type: LoadBalancer\n  \
             selector: {app: web}\n  ports:\n  - {port: 80, targetPort: http}\n  \
             - {port: 53, protocol: UDP}\n  - {port: 443, targetPort: 8443}\n",
        )
        .unwrap();
        assert!(e.is_empty(), "{e:?}");
        let Object::Service(s) = &o[0] else {
            panic!("{o:?}")
        };
        assert_eq!(s.namespace, "shop");
        assert_eq!(s.service_type, "LoadBalancer");
        assert_eq!(s.annotations["nodeportlocal.antrea.io/enabled"], "true");
        let targets: Vec<_> = s
            .ports
            .iter()
            .map(|p| (p.target_port.clone(), p.protocol))
            .collect();
        assert_eq!(
            targets,
            vec![
                (TargetPort::Name("http".into()), Protocol::Tcp),
                (TargetPort::Number(53), Protocol::Udp),
                (TargetPort::Number(8443), Protocol::Tcp),
            ]
        );
    }

    #[test]
    fn decodes_what_the_service_proxy_needs_of_services_and_endpoint_slices() {
        let (o, e) = decode(
            "kind: Service\nmetadata: {name: s, namespace: x}\n\
             spec:\n  type: LoadBalancer\n  clusterIPs: [10.96.0.5, 'fd00::5']\n  \
             externalIPs: [192.0.2.1]\n  sessionAffinity: ClientIP\n  \
             externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  \
             healthCheckNodePort: 32000\n  ports: [{port: 80, nodePort: 30080}]\n\
             status: {loadBalancer: {ingress: [{ip: 192.0.2.2}, {hostname: h}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata: {name: s-1, namespace: x, labels: {kubernetes.io/service-name: s}}\n\
             ports: [{port: 8080}]\n\
             endpoints: [{addresses: [10.244.1.5], nodeName: n1, conditions: {ready: false, terminating: true}, \
             hints: {forZones: [{name: a}]}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv6\n\
             metadata: {name: s-2, namespace: x, labels: {kubernetes.io/service-name: s}}\n",
        )
        .unwrap();
        assert!(e.is_empty(), "{:?}", messages(e));
        let Object::Service(s) = &o[0] else {
            panic!("{o:?}")
        };
        assert_eq!(s.cluster_ips, vec![Ipv4Addr::new(10, 96, 0, 5)]);
        assert_eq!(s.external_ips, vec![Ipv4Addr::new(192, 0, 2, 1)]);
        assert_eq!(s.load_balancer_ips, vec![Ipv4Addr::new(192, 0, 2, 2)]);
        assert_eq!(s.affinity_secs, Some(10800));
        assert!(s.external_local && s.internal_local);
        assert_eq!(s.ports[0].node_port, Some(30080));
        assert_eq!(s.health_check_node_port, Some(32000));
        let Object::EndpointSlice(sl) = &o[1] else {
            panic!("{o:?}")
        };
        assert_eq!(sl.service, "s");
        assert_eq!(sl.ports[0].protocol, Protocol::Tcp);
        let ep = &sl.endpoints[0];
        // serving defaults to ready; terminating as given.
        assert!(!ep.ready && !ep.serving && ep.terminating);
        assert_eq!(ep.zone_hints, Some(vec!["a".to_owned()]));
        assert!(matches!(&o[2], Object::Ignored { .. }));

        let (_, e) = decode(
            "kind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.300, sessionAffinity: Sticky, ports: [{port: 80}]}\n\
             ---\nkind: Service\nmetadata: {name: t}\nspec: {externalTrafficPolicy: Remote, ports: [{port: 80}]}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata: {name: e}\n\
             ---\napiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: f}\n",
        )
        .unwrap();
        let m = messages(e);
        assert_eq!(m.len(), 4, "{m:?}");
        assert!(
            m[0].contains("Service default/s") && m[0].contains("spec.clusterIP"),
            "{m:?}"
        );
        assert!(m[1].contains("spec.externalTrafficPolicy"), "{m:?}");
        assert!(
            m[2].contains("EndpointSlice default/e") && m[2].contains("kubernetes.io/service-name"),
            "{m:?}"
        );
        assert!(m[3].contains("apiVersion"), "{m:?}");
    }

    #[test]
    fn invalid_pods_and_services_name_object_and_field() {
        let (o, e) = decode(
            "kind: Pod\nmetadata: {name: p1}\nspec: {containers: [{ports: [{containerPort: 70000}]}]}\n---\n\
             kind: Service\nmetadata: {name: s1, namespace: x}\nspec: {ports: [{port: 80, protocol: ICMP}]}\n---\n\
             kind: Service\nmetadata: {name: s2}\nspec: {selector: {app: 3}}\n---\n\
             kind: Pod\nmetadata: {name: ok}\n",
        )
        .unwrap();
        let e = messages(e);
        assert_eq!(o.len(), 1, "{o:?}");
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].contains("Pod default/p1")
                && e[0].contains("spec.containers[0].ports[0].containerPort"),
            "{}",
            e[0]
        );
        assert!(
            e[1].contains("Service x/s1") && e[1].contains("spec.ports[0].protocol"),
            "{}",
            e[1]
        );
        assert!(
            e[2].contains("Service default/s2") && e[2].contains("spec.selector.app"),
            "{}",
            e[2]
        );
    }

    #[test]
    fn malformed_yaml_is_an_error() {
        assert!(decode("kind: Node\n  metadata: [\n").is_err());
    }

    /// The single error of decoding `yaml`.
    fn only_error(yaml: &str) -> ObjectError {
        let (_, mut e) = decode(yaml).unwrap();
        assert_eq!(e.len(), 1, "{e:?}");
        e.remove(0)
    }

    #[test]
    fn typed_error_of_an_invalid_pool_cidr_names_pool_field_and_value() {
        let e = only_error(
            "apiVersion: crd.antrea.io/v1beta1\nkind: ExternalIPPool\nmetadata: {name: pool-a}\n\
             spec: {ipRanges: [{cidr: 10.9.0.0/33}]}\n",
        );
        assert_eq!(
            e.object(),
            Some(&ObjectRef::cluster("ExternalIPPool", "pool-a"))
        );
        assert_eq!(e.field(), Some("spec.ipRanges[0].cidr"));
        let ObjectError::Field {
            problem: FieldProblem::Cidr { value, .. },
            ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(value, "10.9.0.0/33");
        // The parser's error is the source of the problem, the problem that of the error.
        let problem = std::error::Error::source(&e).unwrap();
        assert!(std::error::Error::source(problem).is_some(), "{problem:?}");
        let m = e.to_string();
        assert!(
            m.starts_with("ExternalIPPool pool-a: field `spec.ipRanges[0].cidr`: \"10.9.0.0/33\""),
            "{m}"
        );
    }

    #[test]
    fn typed_error_of_an_unknown_selector_operator_names_egress_and_field() {
        let e = only_error(
            "apiVersion: crd.antrea.io/v1beta1\nkind: Egress\nmetadata: {name: eg}\n\
             spec:\n  externalIPPool: p\n  appliedTo:\n    podSelector:\n      \
             matchExpressions: [{key: app, operator: Has, values: [web]}]\n",
        );
        assert_eq!(e.object(), Some(&ObjectRef::cluster("Egress", "eg")));
        assert_eq!(
            e.field(),
            Some("spec.appliedTo.podSelector.matchExpressions[0].operator")
        );
        assert!(
            matches!(
                &e,
                ObjectError::Field { problem: FieldProblem::NotAllowed { value, .. }, .. }
                    if value == "Has"
            ),
            "{e:?}"
        );
        let m = e.to_string();
        assert!(
            m.contains("Egress eg")
                && m.contains("matchExpressions[0].operator")
                && m.contains("\"Has\" is not In, NotIn, Exists or DoesNotExist"),
            "{m}"
        );
    }

    #[test]
    fn typed_errors_of_bad_pod_ports_name_the_pod_and_the_port_field() {
        let e = only_error(
            "kind: Pod\nmetadata: {name: web, namespace: shop}\n\
             spec: {containers: [{ports: [{containerPort: 80}, {containerPort: 0}]}]}\n",
        );
        assert_eq!(
            e.object(),
            Some(&ObjectRef::namespaced("Pod", "shop", "web"))
        );
        assert_eq!(e.field(), Some("spec.containers[0].ports[1].containerPort"));
        assert!(
            e.to_string().ends_with(
                "Pod shop/web: field `spec.containers[0].ports[1].containerPort`: \
                 0 is not a port (1-65535)"
            ),
            "{e}"
        );
        let e = only_error(
            "kind: Pod\nmetadata: {name: web}\nspec: {containers: [{ports: [{containerPort: http}]}]}\n",
        );
        assert_eq!(
            e.object(),
            Some(&ObjectRef::namespaced("Pod", "default", "web"))
        );
        assert!(
            matches!(
                &e,
                ObjectError::Field {
                    problem: FieldProblem::WrongType {
                        expected: "a number",
                        ..
                    },
                    ..
                }
            ),
            "{e:?}"
        );
        let e = only_error("kind: Pod\nmetadata: {namespace: shop}\n");
        assert!(
            matches!(&e, ObjectError::NoName { kind } if kind == "Pod"),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "Pod without `metadata.name`");
    }

    #[test]
    fn typed_error_of_malformed_yaml_keeps_the_parser_error() {
        let e = decode("kind: Node\n  metadata: [\n").unwrap_err();
        let DecodeError::Yaml { source } = &e;
        assert_eq!(e.to_string(), source.to_string());
        assert!(source.location().is_some(), "{source}");
    }
}
