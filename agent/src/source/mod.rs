//! Desired state and where it comes from.
//!
//! A source fills a [`DesiredState`] and publishes every new version on a `watch` channel; the
//! reconcilers only ever see `DesiredState`, never the source. Today's source is [`files`]: a
//! directory of Kubernetes-style manifests (the embedded default, also used by tests and the
//! demo). The [`kubernetes`] source (kube-rs watchers and reflectors) publishes the same type,
//! decoding each object with the same decoder.
//!
//! A published state is complete: reconcilers may remove whatever it does not name (a
//! Kubernetes source publishes only once its caches have synced).
//!
//! [`manifest`] decodes Kubernetes-style objects (Nodes, Pods, Services, EndpointSlices,
//! NetworkPolicies ([`netpol`]), Namespaces; [`crd`]: Antrea's `Egress` and `ExternalIPPool`);
//! what they reject is typed in [`error`] and reaches users as
//! [`DesiredState::errors`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

pub use error::{DecodeError, FieldProblem, FileError, ObjectError, ObjectRef};

pub mod crd;
pub mod error;
pub mod files;
pub mod kubernetes;
pub mod manifest;
pub mod netpol;

/// A node as the agent needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// `metadata.name`.
    pub name: String,
    /// `spec.podCIDR`, if allocated.
    pub pod_cidr: Option<Ipv4Network>,
    /// The `InternalIP` address from `status.addresses`, if any.
    pub internal_ip: Option<Ipv4Addr>,
    /// `metadata.labels` (what an `ExternalIPPool`'s `nodeSelector` matches).
    pub labels: BTreeMap<String, String>,
}

/// An L4 protocol of a Service or container port (Kubernetes' `protocol`, default `TCP`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `TCP`.
    Tcp,
    /// `UDP`.
    Udp,
    /// `SCTP`.
    Sctp,
}

impl Protocol {
    /// Lower-case name, as nftables and Antrea's NPL annotation spell it (`tcp`, `udp`, `sctp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// A container port of a pod (`spec.containers[].ports[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    /// `name`, if any (what a Service's named `targetPort` refers to).
    pub name: Option<String>,
    /// `containerPort`.
    pub port: u16,
    /// `protocol`.
    pub protocol: Protocol,
}

/// A pod as the agent needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.namespace` (default `default`).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// `spec.nodeName`, once scheduled.
    pub node_name: Option<String>,
    /// The ports of all its containers, in order.
    pub container_ports: Vec<ContainerPort>,
    /// `status.podIP`, when the source knows it (the files source usually does not).
    pub pod_ip: Option<Ipv4Addr>,
}

/// A Service's `targetPort`: a number, or the name of a container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A container port name.
    Name(String),
}

/// One entry of a Service's `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `name`, if any.
    pub name: Option<String>,
    /// `port`.
    pub port: u16,
    /// `targetPort` (defaults to `port`).
    pub target_port: TargetPort,
    /// `protocol`.
    pub protocol: Protocol,
    /// `nodePort` (NodePort and LoadBalancer Services), if allocated.
    pub node_port: Option<u16>,
}

/// A Service as the agent needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `metadata.namespace` (default `default`).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// `spec.type` (default `ClusterIP`).
    pub service_type: String,
    /// `spec.selector`; empty when the Service has none (its endpoints are managed by hand).
    pub selector: BTreeMap<String, String>,
    /// `spec.ports`.
    pub ports: Vec<ServicePort>,
    /// `spec.clusterIPs` (or `spec.clusterIP`), IPv4 only; empty for a headless Service
    /// (`None`) or one not allocated yet.
    pub cluster_ips: Vec<Ipv4Addr>,
    /// `spec.externalIPs` (IPv4).
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip` (IPv4).
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds
    /// (`sessionAffinityConfig.clientIP.timeoutSeconds`, default 10800); `None` for `None`.
    pub affinity_secs: Option<u32>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `spec.healthCheckNodePort`: where the node's service proxy answers load balancers'
    /// health checks of this Service (the API server allocates it for a `LoadBalancer`
    /// Service with `externalTrafficPolicy: Local`).
    pub health_check_node_port: Option<u16>,
}

/// One port of an EndpointSlice (`ports[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPort {
    /// `name` (matches the Service port's name; `None` for an unnamed port).
    pub name: Option<String>,
    /// `port`.
    pub port: u16,
    /// `protocol`.
    pub protocol: Protocol,
}

/// One endpoint of an EndpointSlice (`endpoints[]`), IPv4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `addresses[0]` (kube-proxy uses the first; so does ferrea).
    pub address: Ipv4Addr,
    /// `conditions.ready` (absent means ready).
    pub ready: bool,
    /// `conditions.serving` (absent means the value of `ready`).
    pub serving: bool,
    /// `conditions.terminating` (absent means not terminating).
    pub terminating: bool,
    /// `nodeName`, if known.
    pub node_name: Option<String>,
    /// `hints.forZones[].name`: the zones this endpoint should serve (topology-aware
    /// routing); `None` when the endpoint has no hints.
    pub zone_hints: Option<Vec<String>>,
}

/// A `discovery.k8s.io/v1` EndpointSlice of address type IPv4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: String,
    /// `ports`.
    pub ports: Vec<EndpointPort>,
    /// `endpoints`.
    pub endpoints: Vec<Endpoint>,
}

impl DesiredState {
    /// Adds a decoded object (a later object of the same kind and key replaces an earlier one).
    pub fn insert(&mut self, o: manifest::Object) {
        use manifest::Object;
        match o {
            Object::Node(n) => {
                self.nodes.insert(n.name.clone(), n);
            }
            Object::Pod(p) => {
                self.pods.insert(object_key(&p.namespace, &p.name), p);
            }
            Object::Service(s) => {
                self.services.insert(object_key(&s.namespace, &s.name), s);
            }
            Object::NetworkPolicy(p) => {
                self.network_policies
                    .insert(object_key(&p.namespace, &p.name), p);
            }
            Object::EndpointSlice(e) => {
                self.endpoint_slices
                    .insert(object_key(&e.namespace, &e.name), e);
            }
            Object::Namespace(n, labels) => {
                self.namespaces.insert(n, labels);
            }
            Object::Egress(e) => {
                self.egresses.insert(e.name.clone(), e);
            }
            Object::ExternalIpPool(p) => {
                self.pools.insert(p.name.clone(), p);
            }
            Object::Ignored { .. } => {}
        }
    }

    /// The labels of namespace `ns`: those of its `Namespace` object, plus the
    /// `kubernetes.io/metadata.name` label the API server puts on every namespace (so a
    /// selector on it works in `files` mode without a `Namespace` object).
    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut l = self.namespaces.get(ns).cloned().unwrap_or_default();
        l.insert("kubernetes.io/metadata.name".into(), ns.to_owned());
        l
    }
}

/// The key of a namespaced object in [`DesiredState`]: `namespace/name`.
pub fn object_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Everything the agent reconciles, as of one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// All nodes of the cluster, by name.
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Pods, by `namespace/name` ([`object_key`]).
    pub pods: BTreeMap<String, PodInfo>,
    /// Services, by `namespace/name` ([`object_key`]).
    pub services: BTreeMap<String, ServiceInfo>,
    /// NetworkPolicies, by `namespace/name` ([`object_key`]). Decoded and followed; not
    /// enforced yet.
    pub network_policies: BTreeMap<String, crate::source::netpol::NetworkPolicy>,
    /// EndpointSlices of address type IPv4, by `namespace/name` ([`object_key`]).
    pub endpoint_slices: BTreeMap<String, EndpointSliceInfo>,
    /// Namespaces' labels, by name (what an Egress's `namespaceSelector` matches). A namespace
    /// without a `Namespace` object still has Kubernetes' automatic
    /// `kubernetes.io/metadata.name` label: see [`DesiredState::namespace_labels`].
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// `Egress` objects (`crd.antrea.io/v1beta1`), by name (cluster-scoped).
    pub egresses: BTreeMap<String, crate::source::crd::Egress>,
    /// `ExternalIPPool` objects (`crd.antrea.io/v1beta1`), by name (cluster-scoped).
    pub pools: BTreeMap<String, crate::source::crd::ExternalIpPool>,
    /// Objects (and files) the source could not accept: the `Display` of each
    /// [`ObjectError`] or [`FileError`], naming the file, the object (`Kind name` or
    /// `Kind namespace/name`) and the field. They are left out of the state; the previous
    /// good version of a broken file is kept.
    pub errors: Vec<String>,
}
