//! The ports each local pod must expose: a pure function of the desired state and this
//! node's attachments (see the module doc of [`super`] for the rules).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::ENABLED_ANNOTATION;
use crate::pods::store::PodRecord;
use crate::source::{DesiredState, Protocol, TargetPort, object_key};

/// What one local pod must expose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodTarget {
    /// The pod's IP (from its attachment).
    pub ip: Option<Ipv4Addr>,
    /// (pod port, protocol) pairs.
    pub ports: BTreeSet<(u16, Protocol)>,
}

/// The result of [`desired_targets`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Per local pod (`namespace/name`) with at least one port to expose.
    pub targets: BTreeMap<String, PodTarget>,
    /// Things that could not be honoured (a named target port no container declares, an
    /// unsupported protocol or Service type), each naming the Service and pod.
    pub warnings: Vec<String>,
}

/// The ports each local pod must expose, given the desired state and this node's attachments.
/// Pure; see the module doc for the rules.
pub fn desired_targets(state: &DesiredState, records: &[PodRecord], node_name: &str) -> Desired {
    let mut out = Desired::default();
    let local = crate::pods::local_pods(state, records, node_name);
    for svc in state.services.values() {
        if svc.annotations.get(ENABLED_ANNOTATION).map(String::as_str) != Some("true") {
            continue;
        }
        let sname = object_key(&svc.namespace, &svc.name);
        if !matches!(svc.service_type.as_str(), "ClusterIP" | "LoadBalancer") {
            out.warnings.push(format!(
                "Service {sname}: NodePortLocal supports ClusterIP and LoadBalancer Services, not {}",
                svc.service_type
            ));
            continue;
        }
        if svc.selector.is_empty() {
            continue;
        }
        for (key, (ip, pod)) in &local {
            if pod.namespace != svc.namespace
                || !svc
                    .selector
                    .iter()
                    .all(|(k, v)| pod.labels.get(k) == Some(v))
            {
                continue;
            }
            for sp in &svc.ports {
                if sp.protocol == Protocol::Sctp {
                    out.warnings.push(format!(
                        "Service {sname} port {}: NodePortLocal supports TCP and UDP, not SCTP",
                        sp.port
                    ));
                    continue;
                }
                let port = match &sp.target_port {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Name(name) => pod
                        .container_ports
                        .iter()
                        .find(|c| c.name.as_deref() == Some(name) && c.protocol == sp.protocol)
                        .map(|c| c.port),
                };
                match port {
                    Some(p) => {
                        let t = out.targets.entry(key.clone()).or_default();
                        t.ip = Some(*ip);
                        t.ports.insert((p, sp.protocol));
                    }
                    None => out.warnings.push(format!(
                        "Service {sname} targetPort {:?}: pod {key} has no {} container port of that name",
                        sp.target_port,
                        sp.protocol.as_str()
                    )),
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::{pod_record as rec, state};

    const PODS: &str = "\
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec: {nodeName: n1, containers: [{ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]}
---
kind: Pod
metadata: {name: web-2, labels: {app: web, tier: x}}
spec: {containers: [{ports: [{name: http, containerPort: 9090}]}]}
---
kind: Pod
metadata: {name: web-elsewhere, labels: {app: web}}
spec: {nodeName: n2}
---
kind: Pod
metadata: {name: web-norecord, labels: {app: web}}
---
kind: Pod
metadata: {name: web-1, namespace: other, labels: {app: web}}
---
kind: Pod
metadata: {name: db, labels: {app: db}}
";

    fn svc(extra: &str) -> String {
        format!(
            "---\nkind: Service\nmetadata: {{name: web, annotations: {{nodeportlocal.antrea.io/enabled: \"true\"}}}}\n\
             spec: {{selector: {{app: web}}, ports: [{{port: 80, targetPort: http}}, {{port: 53, targetPort: dns, protocol: UDP}}, {{port: 8443}}]{extra}}}\n"
        )
    }

    fn records() -> Vec<PodRecord> {
        vec![
            rec("default", "web-1", [10, 244, 1, 2]),
            rec("", "web-2", [10, 244, 1, 3]),
            rec("default", "web-elsewhere", [10, 244, 1, 4]),
            rec("other", "web-1", [10, 244, 1, 5]),
            rec("default", "db", [10, 244, 1, 6]),
            rec("", "", [10, 244, 1, 7]),
        ]
    }

    #[test]
    fn targets_follow_selector_namespace_node_and_named_ports() {
        let st = state(&format!("{PODS}{}", svc("")));
        let d = desired_targets(&st, &records(), "n1");
        type Row<'a> = (&'a str, Option<Ipv4Addr>, Vec<(u16, Protocol)>);
        let got: Vec<Row> = d
            .targets
            .iter()
            .map(|(k, t)| (k.as_str(), t.ip, t.ports.iter().copied().collect()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "default/web-1",
                    Some(Ipv4Addr::new(10, 244, 1, 2)),
                    vec![
                        (5353, Protocol::Udp),
                        (8080, Protocol::Tcp),
                        (8443, Protocol::Tcp)
                    ]
                ),
                (
                    "default/web-2",
                    Some(Ipv4Addr::new(10, 244, 1, 3)),
                    vec![(8443, Protocol::Tcp), (9090, Protocol::Tcp)]
                ),
            ]
        );
        // web-2 has no UDP port named dns: reported, not mapped.
        assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
        assert!(
            d.warnings[0].contains("default/web-2") && d.warnings[0].contains("dns"),
            "{:?}",
            d.warnings
        );
    }

    #[test]
    fn only_enabled_clusterip_and_loadbalancer_services_with_selectors_count() {
        let none = |st: &DesiredState| desired_targets(st, &records(), "n1").targets.is_empty();
        // Annotation absent or not exactly "true".
        let st = state(&format!("{PODS}{}", svc("").replace("\"true\"", "\"yes\"")));
        assert!(none(&st));
        let st = state(&format!(
            "{PODS}{}",
            svc("").replace("annotations", "labels")
        ));
        assert!(none(&st));
        // NodePort Services are reported and skipped.
        let st = state(&format!("{PODS}{}", svc(", type: NodePort")));
        let d = desired_targets(&st, &records(), "n1");
        assert!(d.targets.is_empty());
        assert!(d.warnings[0].contains("NodePort"), "{:?}", d.warnings);
        // LoadBalancer works.
        let st = state(&format!("{PODS}{}", svc(", type: LoadBalancer")));
        assert!(!none(&st));
        // No selector: nothing selected.
        let st = state(&format!(
            "{PODS}---\nkind: Service\nmetadata: {{name: s, annotations: {{nodeportlocal.antrea.io/enabled: \"true\"}}}}\nspec: {{ports: [{{port: 80}}]}}\n"
        ));
        assert!(none(&st));
        // SCTP is reported.
        let st = state(&format!(
            "{PODS}---\nkind: Service\nmetadata: {{name: s, annotations: {{nodeportlocal.antrea.io/enabled: \"true\"}}}}\nspec: {{selector: {{app: db}}, ports: [{{port: 80, protocol: SCTP}}]}}\n"
        ));
        let d = desired_targets(&st, &records(), "n1");
        assert!(d.targets.is_empty());
        assert!(d.warnings[0].contains("SCTP"), "{:?}", d.warnings);
    }

    #[test]
    fn duplicate_sandboxes_prefer_the_status_ip() {
        let st = state(&format!(
            "{PODS}---\nkind: Pod\nmetadata: {{name: x, labels: {{app: db}}}}\nstatus: {{podIP: 10.244.1.9}}\n\
             ---\nkind: Service\nmetadata: {{name: s, annotations: {{nodeportlocal.antrea.io/enabled: \"true\"}}}}\nspec: {{selector: {{app: db}}, ports: [{{port: 80}}]}}\n"
        ));
        let mut recs = vec![rec("default", "x", [10, 244, 1, 8])];
        let mut newer = rec("default", "x", [10, 244, 1, 9]);
        newer.container_id = "z".into();
        recs.push(newer);
        let d = desired_targets(&st, &recs, "n1");
        assert_eq!(
            d.targets["default/x"].ip,
            Some(Ipv4Addr::new(10, 244, 1, 9))
        );
    }
}
