//! Decoding Kubernetes-style manifests (YAML or JSON, multi-document, `List` kinds) into the
//! typed objects of [`super::DesiredState`]. Shared by the files source and, later, tests of
//! the Kubernetes source.

use std::net::Ipv4Addr;

use serde::Deserialize;
use serde_json::Value;

use super::NodeInfo;

/// One decoded object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    /// A `v1/Node`.
    Node(NodeInfo),
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
            }))
        }
        other => Ok(Object::Ignored {
            kind: other.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            })
        );
        assert_eq!(
            o[1],
            Object::Node(NodeInfo {
                name: "n2".into(),
                pod_cidr: None,
                internal_ip: None
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
    fn malformed_yaml_is_an_error() {
        assert!(decode("kind: Node\n  metadata: [\n").is_err());
    }
}
