//! Decoding Kubernetes-style manifests (YAML or JSON, multi-document, `List` kinds) into the
//! typed objects of [`super::DesiredState`]. Shared by the files source and, later, tests of
//! the Kubernetes source.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Deserialize;
use serde_json::Value;

use super::{ContainerPort, NodeInfo, PodInfo, Protocol, ServiceInfo, ServicePort, TargetPort};

/// One decoded object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    /// A `v1/Node`.
    Node(NodeInfo),
    /// A `v1/Pod`.
    Pod(PodInfo),
    /// A `v1/Service`.
    Service(ServiceInfo),
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
/// an error per object that did not (naming kind, name and field).
pub fn decode(text: &str) -> Result<(Vec<Object>, Vec<String>), String> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).map_err(|e| e.to_string())?;
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

fn decode_object(v: &Value) -> Result<Object, String> {
    let kind = v
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("object without `kind`")?;
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    match kind {
        "Node" => {
            if name.is_empty() {
                return Err("Node without `metadata.name`".into());
            }
            let pod_cidr = match v.pointer("/spec/podCIDR") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.parse().map_err(|e| {
                    format!("Node {name}: field `spec.podCIDR`: {s:?} is not an IPv4 CIDR: {e}")
                })?),
                Some(other) => {
                    return Err(format!(
                        "Node {name}: field `spec.podCIDR` must be a string, not {other}"
                    ));
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
                .map(|s| {
                    s.parse::<Ipv4Addr>().map_err(|e| {
                        format!("Node {name}: field `status.addresses[InternalIP]`: {s:?}: {e}")
                    })
                })
                .transpose()?;
            Ok(Object::Node(NodeInfo {
                name: name.to_owned(),
                pod_cidr,
                internal_ip,
                labels: string_map(v, "/metadata/labels", &format!("Node {name}"))?,
            }))
        }
        "Namespace" => {
            if name.is_empty() {
                return Err("Namespace without `metadata.name`".into());
            }
            let labels = string_map(v, "/metadata/labels", &format!("Namespace {name}"))?;
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
                return Err(format!(
                    "{kind} {name}: field `apiVersion`: {api:?} is not served; use crd.antrea.io/v1beta1"
                ));
            }
            if kind == "Egress" {
                crate::source::crd::parse_egress(v).map(Object::Egress)
            } else {
                crate::source::crd::parse_pool(v).map(Object::ExternalIpPool)
            }
        }
        "Pod" => decode_pod(v, name).map(Object::Pod),
        "Service" => decode_service(v, name).map(Object::Service),
        other => Ok(Object::Ignored {
            kind: other.to_owned(),
        }),
    }
}

/// `metadata.namespace`, default `default`.
fn namespace_of(v: &Value, kind: &str, name: &str) -> Result<String, String> {
    match v.pointer("/metadata/namespace") {
        None | Some(Value::Null) => Ok("default".into()),
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(other) => Err(format!(
            "{kind} {name}: field `metadata.namespace` must be a non-empty string, not {other}"
        )),
    }
}

/// A map of strings (labels, annotations, selector) at `ptr`; absent is empty.
fn string_map(v: &Value, ptr: &str, who: &str) -> Result<BTreeMap<String, String>, String> {
    let field = ptr.trim_start_matches('/').replace('/', ".");
    match v.pointer(ptr) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, x)| match x {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(format!(
                    "{who}: field `{field}.{k}` must be a string, not {other}"
                )),
            })
            .collect(),
        Some(other) => Err(format!("{who}: field `{field}` must be a map, not {other}")),
    }
}

/// A port number field (1-65535).
fn port_number(x: Option<&Value>, field: &str, who: &str) -> Result<u16, String> {
    match x {
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|p| (1..=65535).contains(p))
            .map(|p| p as u16)
            .ok_or_else(|| format!("{who}: field `{field}`: {n} is not a port (1-65535)")),
        None | Some(Value::Null) => Err(format!("{who}: field `{field}` is required")),
        Some(other) => Err(format!(
            "{who}: field `{field}` must be a number, not {other}"
        )),
    }
}

/// A `protocol` field: `TCP` (the default), `UDP` or `SCTP`.
fn protocol(x: Option<&Value>, field: &str, who: &str) -> Result<Protocol, String> {
    match x {
        None | Some(Value::Null) => Ok(Protocol::Tcp),
        Some(Value::String(s)) => match s.as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(format!(
                "{who}: field `{field}`: {s:?} is not TCP, UDP or SCTP"
            )),
        },
        Some(other) => Err(format!(
            "{who}: field `{field}` must be a string, not {other}"
        )),
    }
}

/// An optional string field.
fn opt_string(x: Option<&Value>, field: &str, who: &str) -> Result<Option<String>, String> {
    match x {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!(
            "{who}: field `{field}` must be a string, not {other}"
        )),
    }
}

/// An optional array field; absent is empty.
fn array<'a>(x: Option<&'a Value>, field: &str, who: &str) -> Result<&'a [Value], String> {
    match x {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(format!(
            "{who}: field `{field}` must be a list, not {other}"
        )),
    }
}

fn decode_pod(v: &Value, name: &str) -> Result<PodInfo, String> {
    if name.is_empty() {
        return Err("Pod without `metadata.name`".into());
    }
    let namespace = namespace_of(v, "Pod", name)?;
    let who = format!("Pod {namespace}/{name}");
    let mut container_ports = Vec::new();
    let containers = array(v.pointer("/spec/containers"), "spec.containers", &who)?;
    for (i, c) in containers.iter().enumerate() {
        let ports = array(c.get("ports"), &format!("spec.containers[{i}].ports"), &who)?;
        for (j, p) in ports.iter().enumerate() {
            let f = |k: &str| format!("spec.containers[{i}].ports[{j}].{k}");
            container_ports.push(ContainerPort {
                name: opt_string(p.get("name"), &f("name"), &who)?,
                port: port_number(p.get("containerPort"), &f("containerPort"), &who)?,
                protocol: protocol(p.get("protocol"), &f("protocol"), &who)?,
            });
        }
    }
    let pod_ip = opt_string(v.pointer("/status/podIP"), "status.podIP", &who)?
        .map(|s| {
            s.parse::<Ipv4Addr>()
                .map_err(|e| format!("{who}: field `status.podIP`: {s:?}: {e}"))
        })
        .transpose()?;
    Ok(PodInfo {
        labels: string_map(v, "/metadata/labels", &who)?,
        annotations: string_map(v, "/metadata/annotations", &who)?,
        node_name: opt_string(v.pointer("/spec/nodeName"), "spec.nodeName", &who)?,
        container_ports,
        pod_ip,
        namespace,
        name: name.to_owned(),
    })
}

fn decode_service(v: &Value, name: &str) -> Result<ServiceInfo, String> {
    if name.is_empty() {
        return Err("Service without `metadata.name`".into());
    }
    let namespace = namespace_of(v, "Service", name)?;
    let who = format!("Service {namespace}/{name}");
    let service_type = opt_string(v.pointer("/spec/type"), "spec.type", &who)?
        .unwrap_or_else(|| "ClusterIP".into());
    if !matches!(
        service_type.as_str(),
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return Err(format!(
            "{who}: field `spec.type`: {service_type:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"
        ));
    }
    let mut ports = Vec::new();
    for (i, p) in array(v.pointer("/spec/ports"), "spec.ports", &who)?
        .iter()
        .enumerate()
    {
        let f = |k: &str| format!("spec.ports[{i}].{k}");
        let port = port_number(p.get("port"), &f("port"), &who)?;
        let target_port = match p.get("targetPort") {
            None | Some(Value::Null) => TargetPort::Number(port),
            Some(Value::String(s)) if s.is_empty() => TargetPort::Number(port),
            // Kubernetes accepts a numeric string as a number (IntOrString).
            Some(Value::String(s)) => match s.parse::<u16>() {
                Ok(n) if n > 0 => TargetPort::Number(n),
                _ => TargetPort::Name(s.clone()),
            },
            x @ Some(_) => TargetPort::Number(port_number(x, &f("targetPort"), &who)?),
        };
        ports.push(ServicePort {
            name: opt_string(p.get("name"), &f("name"), &who)?,
            port,
            target_port,
            protocol: protocol(p.get("protocol"), &f("protocol"), &who)?,
        });
    }
    Ok(ServiceInfo {
        annotations: string_map(v, "/metadata/annotations", &who)?,
        selector: string_map(v, "/spec/selector", &who)?,
        service_type,
        ports,
        namespace,
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn invalid_pods_and_services_name_object_and_field() {
        let (o, e) = decode(
            "kind: Pod\nmetadata: {name: p1}\nspec: {containers: [{ports: [{containerPort: 70000}]}]}\n---\n\
             kind: Service\nmetadata: {name: s1, namespace: x}\nspec: {ports: [{port: 80, protocol: ICMP}]}\n---\n\
             kind: Service\nmetadata: {name: s2}\nspec: {selector: {app: 3}}\n---\n\
             kind: Pod\nmetadata: {name: ok}\n",
        )
        .unwrap();
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
}
