//! What the sources fail with: a manifest stream that does not parse ([`DecodeError`]), an
//! object that does not validate ([`ObjectError`], naming the object and the field), and a
//! manifest file of the `files` source that cannot be used ([`FileError`], naming the file).
//!
//! Their `Display` is what [`super::DesiredState::errors`] lists for users.

use std::net::{AddrParseError, Ipv4Addr};
use std::path::PathBuf;

use ipnetwork::{IpNetworkError, Ipv4Network};
use serde_json::Value;

/// A Kubernetes object, as errors name it: `Kind name` or `Kind namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace` of a namespaced object (defaulted), `None` for cluster-scoped ones.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectRef {
    /// A cluster-scoped object.
    pub fn cluster(kind: &str, name: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            namespace: None,
            name: name.to_owned(),
        }
    }

    /// A namespaced object.
    pub fn namespaced(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            namespace: Some(namespace.to_owned()),
            name: name.to_owned(),
        }
    }

    /// An error in `field` of this object.
    pub fn field(&self, field: impl Into<String>, problem: FieldProblem) -> ObjectError {
        ObjectError::Field {
            object: Box::new(self.clone()),
            field: field.into(),
            problem,
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// What is wrong with the value of one field.
#[derive(Debug, thiserror::Error)]
pub enum FieldProblem {
    /// The field is absent but required.
    #[error("is required")]
    Missing,
    /// The value has the wrong JSON type.
    #[error("must be {expected}, not {found}")]
    WrongType {
        /// What it must be ("a string", "a map", ...).
        expected: &'static str,
        /// The value found.
        found: Value,
    },
    /// The value is not an IPv4 address.
    #[error("{value:?} is not an IPv4 address: {source}")]
    Ipv4 {
        /// The value found.
        value: String,
        /// The parser's error.
        #[source]
        source: AddrParseError,
    },
    /// The value is not an IPv4 CIDR.
    #[error("{value:?} is not an IPv4 CIDR: {source}")]
    Cidr {
        /// The value found.
        value: String,
        /// The parser's error.
        #[source]
        source: IpNetworkError,
    },
    /// The value is of the right type but not one the field allows.
    #[error("{value} is not {allowed}")]
    NotAllowed {
        /// The value found.
        value: Value,
        /// What the field allows ("a port (1-65535)", "TCP, UDP or SCTP", ...).
        allowed: &'static str,
    },
    /// The value is of the right type but breaks a rule of the object (a fixed sentence,
    /// e.g. "needs a podSelector or a namespaceSelector").
    #[error("{0}")]
    Rule(&'static str),
    /// `apiVersion` of a built-in kind that the agent does not decode: which one it takes.
    #[error("{found:?} is not served; use {want}")]
    ApiVersion {
        /// The `apiVersion` given.
        found: String,
        /// The one the agent decodes.
        want: &'static str,
    },
    /// `apiVersion` of a CRD version that the agent does not decode.
    #[error("{0:?} is not served; use crd.antrea.io/v1beta1")]
    NotServed(String),
    /// An `ipRanges` entry whose start is after its end.
    #[error("start {start} is after end {end}")]
    StartAfterEnd {
        /// `start`.
        start: Ipv4Addr,
        /// `end`.
        end: Ipv4Addr,
    },
    /// An `ipRanges` entry outside the pool's `subnetInfo`.
    #[error(
        "{start}-{end} is outside the subnet {subnet} of subnetInfo (gateway {gateway}/{prefix_len})"
    )]
    OutsideSubnet {
        /// First address of the range.
        start: Ipv4Addr,
        /// Last address of the range.
        end: Ipv4Addr,
        /// The subnet of `subnetInfo`.
        subnet: Ipv4Network,
        /// `subnetInfo.gateway`.
        gateway: Ipv4Addr,
        /// `subnetInfo.prefixLength`.
        prefix_len: u8,
    },
}

/// Why one object of a manifest was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The object has no `kind`.
    #[error("object without `kind`")]
    NoKind,
    /// The object has no `metadata.name`.
    #[error("{kind} without `metadata.name`")]
    NoName {
        /// `kind`.
        kind: String,
    },
    /// A field of the object is invalid.
    #[error("{object}: field `{field}`: {problem}")]
    Field {
        /// The object (boxed: keeps the error, and the `Result`s carrying it, small).
        object: Box<ObjectRef>,
        /// The field, as a dotted path (`spec.ipRanges[0].cidr`).
        field: String,
        /// What is wrong with it.
        #[source]
        problem: FieldProblem,
    },
}

impl ObjectError {
    /// The object, when it has a name.
    pub fn object(&self) -> Option<&ObjectRef> {
        match self {
            ObjectError::Field { object, .. } => Some(object),
            _ => None,
        }
    }

    /// The field at fault, if the error is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ObjectError::Field { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// A manifest stream that is not valid YAML or JSON (nothing of it is used).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The YAML parser's error, with line and column.
    #[error("{source}")]
    Yaml {
        /// The parser's error.
        #[source]
        source: serde_yaml_ng::Error,
    },
}

/// A manifest file of the `files` source that could not be used, in whole or in part.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML; its previous good objects are kept.
    #[error("{}: not valid YAML, keeping its previous content: {source}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: DecodeError,
    },
    /// An object of the file was rejected (the others are used).
    #[error("{}: {source}", path.display())]
    Object {
        /// The file.
        path: PathBuf,
        /// Why the object was rejected.
        #[source]
        source: ObjectError,
    },
}
