//! Recording fakes of the side-effect traits, for unit tests that need no root and no kernel,
//! one module per trait, and small builders of test inputs.

pub mod addresses;
pub mod bpf;
pub mod conntrack;
pub mod events;
pub mod garp;
pub mod links;
pub mod nftables;
pub mod npl;
pub mod ovs;
pub mod rules;
pub mod shaping;
pub mod sysctl;
pub mod tables;

pub use addresses::FakeAddresses;
pub use conntrack::FakeConntrack;
pub use events::{EventLog, LoggedDataplane, LoggedNftables};
pub use garp::FakeGarp;
pub use links::FakeLinks;
pub use nftables::FakeNftables;
pub use rules::FakeRules;
pub use shaping::FakeShaping;
pub use sysctl::FakeSysctl;
pub use tables::FakeTableRoutes;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::dataplane::{
    Dataplane, DataplaneError, EgressPlan, NodeNetwork, PodEndpoint, PodStats, RemoteNode,
};
use crate::pods::podnet::{HostLink, PodNet, PodNetError, PodNetSpec};

/// A fake [`PodNet`]: a map of host interface name to (ifindex, spec).
#[derive(Default)]
pub struct FakePodNet {
    /// Host links by name.
    pub links: Mutex<HashMap<String, (u32, Option<PodNetSpec>)>>,
    /// Namespaces that "exist"; `create` and `check` fail for others.
    pub netns: Mutex<HashSet<String>>,
    next: Mutex<u32>,
}

impl FakePodNet {
    /// Adds a link that no record owns (as a crashed agent could leave).
    pub fn add_stray(&self, name: &str) {
        self.links.lock().unwrap().insert(name.into(), (999, None));
    }
}

#[async_trait]
impl PodNet for FakePodNet {
    async fn create(&self, spec: &PodNetSpec) -> Result<u32, PodNetError> {
        if !self.netns.lock().unwrap().contains(&spec.netns) {
            return Err(PodNetError::Netns {
                netns: spec.netns.clone(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        let mut n = self.next.lock().unwrap();
        *n += 1;
        self.links
            .lock()
            .unwrap()
            .insert(spec.host_ifname.clone(), (*n, Some(spec.clone())));
        Ok(*n)
    }
    async fn delete(&self, host_ifname: &str) -> Result<(), PodNetError> {
        self.links.lock().unwrap().remove(host_ifname);
        Ok(())
    }
    async fn host_ifindex(&self, host_ifname: &str) -> Result<Option<u32>, PodNetError> {
        Ok(self.links.lock().unwrap().get(host_ifname).map(|l| l.0))
    }
    async fn list_host_links(&self, prefix: &str) -> Result<Vec<HostLink>, PodNetError> {
        Ok(self
            .links
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, (_, spec))| HostLink {
                name: k.clone(),
                alias: spec.as_ref().and_then(|s| s.note.clone()),
            })
            .collect())
    }
    async fn set_note(&self, host_ifname: &str, note: &str) -> Result<(), PodNetError> {
        match self.links.lock().unwrap().get_mut(host_ifname) {
            Some((_, Some(spec))) => {
                spec.note = Some(note.to_owned());
                Ok(())
            }
            _ => Err(PodNetError::Gone {
                op: "setting the note of",
                ifname: host_ifname.to_owned(),
            }),
        }
    }
    fn netns_exists(&self, netns: &str) -> bool {
        self.netns.lock().unwrap().contains(netns)
    }
    async fn check(&self, spec: &PodNetSpec) -> Result<(), PodNetError> {
        let ok = self.netns.lock().unwrap().contains(&spec.netns)
            && self.links.lock().unwrap().contains_key(&spec.host_ifname);
        if ok {
            Ok(())
        } else {
            Err(PodNetError::Mismatch {
                ifname: spec.ifname.clone(),
                netns: spec.netns.clone(),
                what: crate::pods::podnet::Mismatch::InterfaceMissing,
            })
        }
    }
}

/// A fake [`Dataplane`]: a map of pod IP to endpoint, with failure injection.
#[derive(Default)]
pub struct FakeDataplane {
    /// Entries by IP.
    pub pods: Mutex<HashMap<Ipv4Addr, PodEndpoint>>,
    /// When set, `add_pod` fails.
    pub fail_add: Mutex<bool>,
    /// IPs `prepare_pod` was called for and no `del_pod` undid.
    pub prepared: Mutex<HashSet<Ipv4Addr>>,
    /// When set, `prepare_pod` fails.
    pub fail_prepare: Mutex<bool>,
    /// The last list given to `set_remote_nodes`.
    pub remotes: Mutex<Vec<RemoteNode>>,
    /// The last plan given to `set_egress`.
    pub egress: Mutex<EgressPlan>,
    /// When set, `set_remote_nodes` fails (and records nothing).
    pub fail_remote_nodes: Mutex<bool>,
    /// How many times `maintain` ran.
    pub maintained: Mutex<u32>,
    /// The last plan given to `set_services` (`None`: never called).
    pub services: Mutex<Option<crate::proxy::ServicePlan>>,
    /// When set, `set_services` fails (and records nothing).
    pub fail_services: Mutex<bool>,
    /// What `trace` answers for a known pod (`None`: it fails, naming what is missing).
    pub trace_answer: Mutex<Option<crate::dataplane::PacketTrace>>,
    /// The packets `trace` was asked about.
    pub traced: Mutex<Vec<crate::dataplane::TracePacket>>,
}

#[async_trait]
impl Dataplane for FakeDataplane {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn set_services(&self, plan: &crate::proxy::ServicePlan) -> Result<(), DataplaneError> {
        if *self.fail_services.lock().unwrap() {
            return Err(DataplaneError::Other {
                backend: "fake",
                op: "set_services",
                object: "plan".into(),
                source: Box::new(crate::dataplane::Cause::Unmet("told to fail".into())),
            });
        }
        *self.services.lock().unwrap() = Some(plan.clone());
        Ok(())
    }
    async fn init_node(&self, _node: &NodeNetwork) -> Result<(), DataplaneError> {
        Ok(())
    }
    async fn prepare_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        if *self.fail_prepare.lock().unwrap() {
            return Err(DataplaneError::Pod {
                backend: "fake",
                op: "prepare",
                ifname: ep.host_ifname.clone(),
                source: Box::new(crate::dataplane::Cause::Unmet("injected".into())),
            });
        }
        self.prepared.lock().unwrap().insert(ep.ip);
        Ok(())
    }
    async fn add_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        self.pods.lock().unwrap().insert(ep.ip, ep.clone());
        if *self.fail_add.lock().unwrap() {
            return Err(DataplaneError::Pod {
                backend: "fake",
                op: "add",
                ifname: ep.host_ifname.clone(),
                source: Box::new(crate::dataplane::Cause::Unmet("injected".into())),
            });
        }
        Ok(())
    }
    async fn set_remote_nodes(&self, nodes: &[RemoteNode]) -> Result<(), DataplaneError> {
        if *self.fail_remote_nodes.lock().unwrap() {
            return Err(DataplaneError::Other {
                backend: "fake",
                op: "set remote nodes",
                object: "the node list".into(),
                source: Box::new(crate::dataplane::Cause::Unmet("injected".into())),
            });
        }
        *self.remotes.lock().unwrap() = nodes.to_vec();
        Ok(())
    }
    async fn maintain(&self) -> Result<(), DataplaneError> {
        *self.maintained.lock().unwrap() += 1;
        Ok(())
    }
    async fn del_pod(&self, ep: &PodEndpoint) -> Result<(), DataplaneError> {
        self.pods.lock().unwrap().remove(&ep.ip);
        self.prepared.lock().unwrap().remove(&ep.ip);
        Ok(())
    }
    async fn retain_pods(&self, keep: &HashSet<Ipv4Addr>) -> Result<Vec<Ipv4Addr>, DataplaneError> {
        let mut p = self.pods.lock().unwrap();
        let gone: Vec<_> = p.keys().filter(|ip| !keep.contains(ip)).copied().collect();
        for ip in &gone {
            p.remove(ip);
        }
        Ok(gone)
    }
    async fn set_egress(&self, plan: &EgressPlan) -> Result<(), DataplaneError> {
        *self.egress.lock().unwrap() = plan.clone();
        Ok(())
    }
    async fn pod_stats(&self, _ep: &PodEndpoint) -> Result<Option<PodStats>, DataplaneError> {
        Ok(None)
    }
    fn describe_pod(&self, ep: &PodEndpoint) -> Option<String> {
        self.pods
            .lock()
            .unwrap()
            .get(&ep.ip)
            .map(|e| format!("fake {}", e.host_ifname))
    }
    async fn dump(
        &self,
        pod: Option<&PodEndpoint>,
    ) -> Result<Vec<crate::dataplane::DumpSection>, DataplaneError> {
        let mut s = crate::dataplane::DumpSection::new("pods", &["ip", "interface"]);
        let mut pods: Vec<_> = self.pods.lock().unwrap().values().cloned().collect();
        pods.sort_by_key(|e| e.ip);
        for e in pods.iter().filter(|e| pod.is_none_or(|p| p.ip == e.ip)) {
            s.rows.push(vec![e.ip.to_string(), e.host_ifname.clone()]);
        }
        Ok(vec![s])
    }
    async fn trace(
        &self,
        packet: &crate::dataplane::TracePacket,
    ) -> Result<crate::dataplane::PacketTrace, DataplaneError> {
        self.traced.lock().unwrap().push(packet.clone());
        let unmet = |what: &str| DataplaneError::Other {
            backend: "fake",
            op: "trace",
            object: format!("pod {}", packet.src.ip),
            source: Box::new(crate::dataplane::Cause::Unmet(what.into())),
        };
        if !self.pods.lock().unwrap().contains_key(&packet.src.ip) {
            return Err(unmet("not in the dataplane"));
        }
        self.trace_answer
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| unmet("no trace answer set"))
    }
}

/// The desired state of a manifest stream that must decode without errors (panics with the
/// parser's or the rejected objects' messages otherwise).
pub fn state(yaml: &str) -> crate::source::DesiredState {
    let (objs, errs) = crate::source::manifest::decode(yaml).unwrap_or_else(|e| panic!("{e}"));
    let msgs: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert!(msgs.is_empty(), "{msgs:?}");
    let mut st = crate::source::DesiredState::default();
    for o in objs {
        st.insert(o);
    }
    st
}

/// An attachment of pod `ns/name` (empty `ns`: as CNI_ARGS without a namespace) with `ip`.
pub fn pod_record(ns: &str, name: &str, ip: [u8; 4]) -> crate::pods::store::PodRecord {
    crate::pods::store::PodRecord {
        container_id: format!("c-{name}"),
        ifname: "eth0".into(),
        ip: ip.into(),
        prefix_len: 24,
        gateway: [10, 244, 1, 1].into(),
        netns: format!("/run/netns/{name}"),
        host_ifname: "fe0".into(),
        host_mac: [0; 6],
        pod_mac: [0; 6],
        pod_namespace: ns.into(),
        pod_name: name.into(),
    }
}
