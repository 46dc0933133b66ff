//! Objects as the API server returns them (defaults filled, server fields, list items without
//! `apiVersion` and `kind` for CRDs) give the same state as the `files` source gives for the
//! YAML a user writes.

use serde_json::json;

use super::*;
use crate::testing::state;

fn typed<K: serde::de::DeserializeOwned + Serialize>(
    v: serde_json::Value,
) -> Result<Object, ObjectError> {
    let k: K = serde_json::from_value(v).expect("the API's JSON decodes into the typed object");
    decode_typed(&k)
}

fn dynamic(v: serde_json::Value, ar: &ApiResource) -> Result<Object, ObjectError> {
    let o: DynamicObject = serde_json::from_value(v).expect("dynamic object");
    decode_dynamic(&o, ar)
}

const FILES_YAML: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {zone: a}}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}, annotations: {note: x}}
spec:
  nodeName: node1
  containers:
  - name: c
    image: img
    ports: [{name: http, containerPort: 8080}, {containerPort: 5353, protocol: UDP}]
status: {podIP: 10.244.1.5}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, annotations: {nodeportlocal.antrea.io/enabled: "true"}}
spec:
  clusterIP: 10.96.3.4
  selector: {app: web}
  ports: [{port: 80, targetPort: http}, {name: dns, port: 53, targetPort: 5353, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abcde, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.244.1.5]
  nodeName: node1
  conditions: {ready: true, serving: true, terminating: false}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: t, kubernetes.io/metadata.name: shop}}
---
apiVersion: crd.antrea.io/v1beta1
kind: ExternalIPPool
metadata: {name: pool}
spec:
  ipRanges: [{start: 10.10.0.2, end: 10.10.0.9}]
  nodeSelector: {matchLabels: {zone: a}}
---
apiVersion: crd.antrea.io/v1beta1
kind: Egress
# The API sets the creation time (Egresses are ordered by it); a manifest may carry it too.
metadata: {name: eg, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  appliedTo: {podSelector: {matchLabels: {app: web}}}
  externalIPPool: pool
"#;

fn api_objects() -> Vec<Result<Object, ObjectError>> {
    let server_meta = |name: &str| {
        json!({
            "name": name,
            "uid": "6d1c9f3e-1111-2222-3333-444455556666",
            "resourceVersion": "4242",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
                "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {}}],
        })
    };
    let mut node_meta = server_meta("node1");
    node_meta["labels"] = json!({"zone": "a"});
    let node = json!({
        "apiVersion": "v1", "kind": "Node", "metadata": node_meta,
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {
            "addresses": [{"type": "Hostname", "address": "node1"},
                          {"type": "InternalIP", "address": "172.18.0.11"}],
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                            "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "KubeletReady", "message": "ok"}],
            "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b", "kernelVersion": "6",
                "osImage": "o", "containerRuntimeVersion": "c", "kubeletVersion": "v1.37.2",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        },
    });
    let mut pod_meta = server_meta("web-1");
    pod_meta["namespace"] = json!("shop");
    pod_meta["labels"] = json!({"app": "web"});
    pod_meta["annotations"] = json!({"note": "x"});
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": pod_meta,
        "spec": {
            "nodeName": "node1", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "terminationGracePeriodSeconds": 30, "schedulerName": "default-scheduler",
            "serviceAccountName": "default", "enableServiceLinks": true,
            "containers": [{
                "name": "c", "image": "img", "imagePullPolicy": "Always", "resources": {},
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"containerPort": 5353, "protocol": "UDP"}],
            }],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
        },
        "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": "10.244.1.5",
                   "podIPs": [{"ip": "10.244.1.5"}], "hostIP": "172.18.0.11"},
    });
    let mut svc_meta = server_meta("web");
    svc_meta["namespace"] = json!("shop");
    svc_meta["annotations"] = json!({"nodeportlocal.antrea.io/enabled": "true"});
    let svc = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": svc_meta,
        "spec": {
            "type": "ClusterIP", "clusterIP": "10.96.3.4", "clusterIPs": ["10.96.3.4"],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster", "selector": {"app": "web"},
            "ports": [{"port": 80, "targetPort": "http", "protocol": "TCP"},
                      {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}],
        },
        "status": {"loadBalancer": {}},
    });
    let mut slice_meta = server_meta("web-abcde");
    slice_meta["namespace"] = json!("shop");
    slice_meta["labels"] = json!({"kubernetes.io/service-name": "web"});
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": slice_meta,
        "addressType": "IPv4",
        "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "node1",
                       "conditions": {"ready": true, "serving": true, "terminating": false},
                       "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1"}}],
    });
    let mut ns_meta = server_meta("shop");
    ns_meta["labels"] = json!({"team": "t", "kubernetes.io/metadata.name": "shop"});
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": ns_meta,
                    "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
    // CRD list items as a DynamicObject holds them: no apiVersion, no kind.
    let pool = json!({"metadata": server_meta("pool"), "spec": {
        "ipRanges": [{"start": "10.10.0.2", "end": "10.10.0.9"}],
        "nodeSelector": {"matchLabels": {"zone": "a"}}}, "status": {"usage": {"total": 8, "used": 0}}});
    let egress = json!({"metadata": server_meta("eg"), "spec": {
        "appliedTo": {"podSelector": {"matchLabels": {"app": "web"}}}, "externalIPPool": "pool"},
        "status": {"egressNode": ""}});
    vec![
        typed::<Node>(node),
        typed::<Pod>(pod),
        typed::<Service>(svc),
        typed::<EndpointSlice>(slice),
        typed::<Namespace>(ns),
        dynamic(pool, &crd_resource("ExternalIPPool", "externalippools")),
        dynamic(egress, &crd_resource("Egress", "egresses")),
    ]
}

#[test]
fn api_objects_give_the_state_the_files_source_gives() {
    let from_api = state_of(api_objects(), []);
    let from_files = state(FILES_YAML);
    assert_eq!(from_api.errors, Vec::<String>::new());
    assert_eq!(from_api.nodes, from_files.nodes);
    assert_eq!(from_api.pods, from_files.pods);
    assert_eq!(from_api.services, from_files.services);
    assert_eq!(from_api.endpoint_slices, from_files.endpoint_slices);
    assert_eq!(from_api.endpoint_slices.len(), 1);
    assert_eq!(from_api.namespaces, from_files.namespaces);
    assert_eq!(from_api.pools, from_files.pools);
    assert_eq!(from_api.egresses, from_files.egresses);
    assert_eq!(from_api, from_files);
    assert_eq!(
        from_api.nodes["node1"].internal_ip,
        Some([172, 18, 0, 11].into())
    );
    assert_eq!(from_api.pods["shop/web-1"].container_ports.len(), 2);
}

#[test]
fn rejected_objects_and_missing_crds_are_named_in_errors() {
    let bad = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"},
                     "spec": {"podCIDR": "10.0.0.0/33"}});
    let st = state_of(
        vec![typed::<Node>(bad)].into_iter().chain(api_objects()),
        [Kind::Egress],
    );
    assert!(!st.nodes.contains_key("n2"));
    assert!(st.nodes.contains_key("node1"));
    assert_eq!(st.errors.len(), 2, "{:?}", st.errors);
    assert!(
        st.errors
            .iter()
            .any(|e| e.contains("Node n2") && e.contains("spec.podCIDR")),
        "{:?}",
        st.errors
    );
    assert!(
        st.errors.contains(&missing_message(Kind::Egress)),
        "{:?}",
        st.errors
    );
    assert!(missing_message(Kind::Egress).starts_with("Egress (crd.antrea.io/v1beta1): "));
}

#[test]
fn not_found_is_told_apart_from_other_watch_errors() {
    let status = |code| {
        Box::new(kube::core::Status {
            code,
            ..Default::default()
        })
    };
    assert!(is_not_found(&watcher::Error::InitialListFailed(
        kube::Error::Api(status(404))
    )));
    assert!(!is_not_found(&watcher::Error::InitialListFailed(
        kube::Error::Api(status(403))
    )));
    assert!(!is_not_found(&watcher::Error::WatchError(status(410))));
    assert!(is_gone(&watcher::Error::WatchError(status(410))));
    assert!(is_gone(&watcher::Error::WatchStartFailed(
        kube::Error::Api(status(410))
    )));
    assert!(!is_gone(&watcher::Error::InitialListFailed(
        kube::Error::Api(status(410))
    )));
    assert!(!is_gone(&watcher::Error::WatchError(status(500))));
}

#[test]
fn only_a_completed_list_or_a_change_is_a_signal() {
    assert_eq!(step::<()>(Kind::Pod, &Event::Init), Step::Relisting);
    assert_eq!(step(Kind::Pod, &Event::InitApply(())), Step::Listing);
    assert_eq!(
        step::<()>(Kind::Pod, &Event::InitDone),
        Step::Signal(Signal::Listed(Kind::Pod))
    );
    assert_eq!(
        step(Kind::Node, &Event::Delete(())),
        Step::Signal(Signal::Changed(Kind::Node))
    );
}

#[test]
fn retry_backoff_doubles_to_its_cap_with_jitter_and_resets() {
    use kube::runtime::utils::Backoff;
    let mut b = retry_backoff();
    let d: Vec<Duration> = b.by_ref().take(8).collect();
    for (i, x) in d.iter().enumerate() {
        let base = (BACKOFF_MIN * 2u32.pow(i as u32)).min(BACKOFF_MAX);
        assert!(
            *x >= base / 2 && *x < base,
            "delay {i}: {x:?} not in [{:?}, {base:?})",
            base / 2
        );
    }
    assert!(d[7] >= BACKOFF_MAX / 2, "{d:?}");
    b.reset();
    assert!(b.next().unwrap() < BACKOFF_MIN);
}
