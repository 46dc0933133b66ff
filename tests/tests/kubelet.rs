//! ferrea deployed by its DaemonSet on real nodes: kubelet + containerd + runc per simulated
//! node (tests/src/kubelet.rs), kube-controller-manager and kube-scheduler beside the API
//! server, `kubectl apply -f deploy/` with the locally built image, then ordinary pods of a
//! Deployment get their network from ferrea.
//!
//! The slow tier: a cluster takes a minute or two to come up here.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferrea_tests::apiserver::ApiServer;
use ferrea_tests::capture::TcpPeers;
use ferrea_tests::fabric::{EXTERNAL_IP, Fabric};
use ferrea_tests::kubelet::{
    APISERVER_ARGS, BUSYBOX_IMAGE, CLUSTER_DNS, ControlPlane, KubeletNode,
};
use ferrea_tests::{Dataplane, dataplane_tests};
use serde_json::Value;

// OVS under kubelet fails today, for two causes found and not yet fixed (issue 15's note):
// with the userspace datapath, ovs-vswitchd is a container of the agent pod and carries the
// node's own address, so deleting or updating the pod takes the node off the network; and
// after the agent moves the node address to `ferrea-phy`, its API connections stop receiving
// (NodePortLocal never sees its pods).
dataplane_tests!(
    ovs_ignored = "fails: the OVS DaemonSet under kubelet (ovs-vswitchd in the agent pod carries the node's address; API watches stall after the address moves to ferrea-phy); see issue 15";
    kubelet_cluster_of_three_nodes,
    kubelet_agent_pod_deleted_comes_back,
    kubelet_rolling_update_keeps_pod_traffic
);

/// A whole cluster. Field order is drop order: nodes first (their kubelets talk to the API
/// server), then the controllers, the API server, the fabric.
struct KubeCluster {
    nodes: Vec<KubeletNode>,
    cp: ControlPlane,
    api: ApiServer,
    fabric: Fabric,
}

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

impl KubeCluster {
    fn start(n: u8) -> Self {
        let t = Instant::now();
        let fabric = Fabric::new().expect("fabric");
        let api = ApiServer::start_on_fabric_with(&fabric, APISERVER_ARGS);
        let cp = ControlPlane::start(&api).expect("kube-controller-manager and kube-scheduler");
        let mut c = KubeCluster {
            nodes: Vec::new(),
            cp,
            api,
            fabric,
        };
        for i in 1..=n {
            let node = KubeletNode::start(&c.fabric, &c.api, i)
                .unwrap_or_else(|e| panic!("starting node{i}: {e:#}"));
            c.nodes.push(node);
        }
        // Every Node registered and given a pod CIDR by the node IPAM controller.
        c.wait(
            "the Nodes registered with a podCIDR",
            Duration::from_secs(90),
            |c| {
                let nodes = c.json(&["get", "nodes", "-o", "json"]);
                let items = nodes["items"].as_array().cloned().unwrap_or_default();
                (items.len() == c.nodes.len()
                    && items.iter().all(|n| n["spec"]["podCIDR"].is_string()))
                .then_some(())
            },
        );
        eprintln!(
            "test: {n} nodes registered after {:.1}s",
            t.elapsed().as_secs_f64()
        );
        c
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.api.kubectl_ok(args)
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.kubectl(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?}: not JSON ({e})"))
    }

    /// Everything the test may want to see when it fails.
    fn diagnostics(&self) -> String {
        let mut s = String::new();
        for args in [
            &["get", "nodes", "-o", "wide"][..],
            &["get", "pods", "-A", "-o", "wide"],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ] {
            let out = self.api.kubectl(args);
            s.push_str(&format!(
                "--- kubectl {} ---\n{}{}\n",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let agents = self.api.kubectl(&[
            "logs",
            "-n",
            "ferrea-system",
            "-l",
            "app.kubernetes.io/name=ferrea-agent",
            "-c",
            "ferrea-agent",
            "--tail=30",
            "--prefix",
        ]);
        s.push_str(&format!(
            "--- agent logs ---\n{}{}\n",
            String::from_utf8_lossy(&agents.stdout),
            String::from_utf8_lossy(&agents.stderr)
        ));
        for n in &self.nodes {
            for argv in [&["ip", "-br", "addr"][..], &["ip", "route"]] {
                let out = n.netns().exec(argv);
                s.push_str(&format!(
                    "--- {} {} ---\n{}\n",
                    n.name(),
                    argv.join(" "),
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
            s.push_str(&n.log_tails(25));
            s.push('\n');
        }
        s.push_str(&self.cp.log_tails(15));
        s
    }

    /// Polls `f` every 500 ms for at most `timeout`; panics with the diagnostics otherwise.
    fn wait<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        let t = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            for n in &mut self.nodes {
                if let Err(e) = n.check_running() {
                    panic!("{e:#}");
                }
            }
            if let Err(e) = self.cp.check_running() {
                panic!("{e:#}");
            }
            if t.elapsed() > timeout {
                panic!("{what}: not within {timeout:?}\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `kubectl apply -f deploy/` (CRDs first), or for OVS the same with deploy/ovs/'s
    /// ConfigMap and DaemonSet in place of the eBPF ones. With `npl`, the ConfigMap's
    /// `nodePortLocal.enable` is set to `true` first, as the deploy README says to.
    fn apply_deploy(&self, dp: Dataplane, npl: bool) {
        self.kubectl(&["apply", "-f", &deploy("crds").display().to_string()]);
        let files: &[&str] = match (dp, npl) {
            (Dataplane::Ebpf, false) => &[""],
            (Dataplane::Ebpf, true) => &[
                "00-namespace.yaml",
                "10-serviceaccount.yaml",
                "20-rbac.yaml",
                "30-configmap.yaml",
                "40-daemonset.yaml",
            ],
            (Dataplane::Ovs, _) => &[
                "00-namespace.yaml",
                "10-serviceaccount.yaml",
                "20-rbac.yaml",
                "ovs/daemonset-ovs.yaml",
            ],
        };
        for f in files {
            let path = deploy(f);
            if npl && path.is_file() {
                let text = std::fs::read_to_string(&path).expect("a deploy/ file");
                let on = text.replace(
                    "nodePortLocal:\n      enable: false",
                    "nodePortLocal:\n      enable: true",
                );
                self.api.kubectl_stdin_ok(&["apply", "-f", "-"], &on);
            } else {
                self.kubectl(&["apply", "-f", &path.display().to_string()]);
            }
        }
    }

    /// Pods of `selector` in `default`: name → (podIP, nodeName), once all are Running with
    /// an IP.
    fn running_pods(&self, selector: &str) -> Option<BTreeMap<String, (Ipv4Addr, String)>> {
        let pods = self.json(&["get", "pods", "-l", selector, "-o", "json"]);
        let items = pods["items"].as_array()?;
        let mut m = BTreeMap::new();
        for p in items {
            if p["metadata"]["deletionTimestamp"].is_string() {
                return None;
            }
            if p["status"]["phase"] != "Running" {
                return None;
            }
            let ip: Ipv4Addr = p["status"]["podIP"].as_str()?.parse().ok()?;
            m.insert(
                p["metadata"]["name"].as_str()?.to_owned(),
                (ip, p["spec"]["nodeName"].as_str()?.to_owned()),
            );
        }
        Some(m)
    }

    /// `GET /` from pod `pod` to `host:port` (busybox nc: Debian's static busybox wget
    /// crashes); the response body, trimmed.
    fn http(&self, pod: &str, host: &str, port: u16) -> Result<String, String> {
        let out = self.exec(pod, &["sh", "-c", &http_script(host, port)])?;
        Ok(http_body(&out))
    }

    fn exec(&self, pod: &str, argv: &[&str]) -> Result<String, String> {
        let mut args = vec!["exec", pod, "--"];
        args.extend_from_slice(argv);
        let out = self.api.kubectl(&args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "kubectl exec {pod} -- {argv:?}: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ))
        }
    }
}

/// The workload: busybox httpd on 8080 answering its pod's name, spread over the nodes.
fn web_deployment(replicas: usize) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: default}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector: {{matchLabels: {{app: web}}}}
      containers:
        - name: web
          image: {BUSYBOX_IMAGE}
          imagePullPolicy: Never
          command: [/bin/sh, -c, 'mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www']
          ports: [{{containerPort: 8080}}]
"#
    )
}

fn in_cidr(ip: Ipv4Addr, cidr: &str) -> bool {
    let net: ipnetwork::Ipv4Network = cidr.parse().expect("a CIDR");
    net.contains(ip)
}

/// Links of a node's namespace that are pods' host ends (not the node's own devices).
fn pod_links(node: &KubeletNode, baseline: &[String]) -> Vec<String> {
    node.netns()
        .links()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| !baseline.contains(l))
        .collect()
}

impl KubeCluster {
    /// [`KubeCluster::start`] with `n` nodes, then ferrea deployed with its manifests and the
    /// locally built image: returns once the DaemonSet's agent runs (ready) on every node, the
    /// init container installed the CNI binary and conflist on each, and every node is Ready.
    fn deployed(dp: Dataplane, n: u8, npl: bool) -> Self {
        let t0 = Instant::now();
        let mut c = KubeCluster::start(n);
        // kube-controller-manager's service-account controller makes `default`'s.
        c.wait(
            "the default service account",
            Duration::from_secs(60),
            |c| {
                c.api
                    .kubectl(&["get", "serviceaccount", "default", "-n", "default"])
                    .status
                    .success()
                    .then_some(())
            },
        );
        c.apply_deploy(dp, npl);
        c.wait_agents_ready(Duration::from_secs(240));
        eprintln!(
            "test: agents ready after {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        for n in &c.nodes {
            for f in [
                "/opt/cni/bin/ferrea-cni",
                "/etc/cni/net.d/10-ferrea.conflist",
            ] {
                assert!(
                    n.host_path(f).is_file(),
                    "{}: {f} not installed by the init container",
                    n.name()
                );
            }
        }
        // ... on the nodes' filesystems only, never on the machine's.
        assert!(!Path::new("/etc/cni/net.d/10-ferrea.conflist").exists());
        assert!(!Path::new("/opt/cni/bin/ferrea-cni").exists());
        c.wait("every node Ready", Duration::from_secs(120), |c| {
            let nodes = c.json(&["get", "nodes", "-o", "json"]);
            nodes["items"]
                .as_array()?
                .iter()
                .all(|n| {
                    n["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
                })
                .then_some(())
        });
        eprintln!("test: nodes Ready after {:.1}s", t0.elapsed().as_secs_f64());
        c
    }

    /// Waits until the DaemonSet has an up-to-date, ready agent pod on every node.
    fn wait_agents_ready(&mut self, timeout: Duration) {
        self.wait(
            "the ferrea-agent DaemonSet ready on every node",
            timeout,
            |c| {
                let ds = c.json(&[
                    "get",
                    "ds",
                    "-n",
                    "ferrea-system",
                    "ferrea-agent",
                    "-o",
                    "json",
                ]);
                let st = &ds["status"];
                let n = Some(c.nodes.len() as u64);
                (st["observedGeneration"] == ds["metadata"]["generation"]
                    && st["desiredNumberScheduled"].as_u64() == n
                    && st["updatedNumberScheduled"].as_u64() == n
                    && st["numberReady"].as_u64() == n
                    && st["numberUnavailable"].as_u64().unwrap_or(0) == 0)
                    .then_some(())
            },
        );
    }

    /// The pod CIDR of each Node, by name.
    fn pod_cidrs(&self) -> BTreeMap<String, String> {
        self.json(&["get", "nodes", "-o", "json"])["items"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| {
                (
                    n["metadata"]["name"].as_str().unwrap().to_owned(),
                    n["spec"]["podCIDR"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Applies the web Deployment with `replicas` pods and waits until they run.
    fn run_web(&mut self, replicas: usize) -> BTreeMap<String, (Ipv4Addr, String)> {
        self.api
            .kubectl_stdin_ok(&["apply", "-f", "-"], &web_deployment(replicas));
        self.wait("the web pods Running", Duration::from_secs(180), |c| {
            c.running_pods("app=web").filter(|m| m.len() == replicas)
        })
    }

    /// HTTP from `a` to `ip:8080` answers `b` (the pod's name).
    fn assert_http(&self, a: &str, b: &str, ip: Ipv4Addr) {
        let url = format!("http://{ip}:8080/");
        let got = self.http(a, &ip.to_string(), 8080);
        assert_eq!(
            got.as_deref(),
            Ok(b),
            "{a} -> {b} ({url})\n{}",
            self.diagnostics()
        );
    }
}

fn kubelet_cluster_of_three_nodes(dp: Dataplane) {
    let t0 = Instant::now();
    let mut c = KubeCluster::deployed(dp, 3, true);
    let baselines: Vec<Vec<String>> = c
        .nodes
        .iter()
        .map(|n| n.netns().links().unwrap_or_default())
        .collect();
    let cidrs = c.pod_cidrs();

    // A Deployment of busybox pods: two per node, addresses from each node's pod CIDR.
    let replicas = 2 * c.nodes.len();
    let pods = c.run_web(replicas);
    eprintln!(
        "test: {replicas} pods Running after {:.1}s: {pods:?}",
        t0.elapsed().as_secs_f64()
    );
    for (name, (ip, node)) in &pods {
        assert!(
            in_cidr(*ip, &cidrs[node]),
            "{name} on {node} has {ip}, outside the node's podCIDR {}",
            cidrs[node]
        );
    }
    let on_nodes: std::collections::BTreeSet<&String> = pods.values().map(|(_, n)| n).collect();
    assert_eq!(on_nodes.len(), c.nodes.len(), "pods not spread: {pods:?}");

    // All pairs, across nodes: HTTP to the other pod's address answers its name.
    for a in pods.keys() {
        for (b, (ip, _)) in &pods {
            c.assert_http(a, b, *ip);
        }
    }
    eprintln!(
        "test: all pairs answer after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // The external host sees each pod's traffic from its node's address (masquerade).
    let listen: SocketAddr = (EXTERNAL_IP, 9000).into();
    let peers = TcpPeers::start(c.fabric.external(), listen).expect("listener");
    let node_ips: BTreeMap<String, Ipv4Addr> = c
        .nodes
        .iter()
        .map(|n| (n.name().to_owned(), n.ip()))
        .collect();
    for (a, (_, node)) in &pods {
        let got = c.exec(a, &["sh", "-c", "nc -w 3 172.18.0.100 9000 </dev/null"]);
        let seen: SocketAddr = got
            .as_deref()
            .unwrap_or_else(|e| panic!("{a} -> external: {e}"))
            .parse()
            .unwrap_or_else(|e| panic!("{a}: listener answered {got:?}: {e}"));
        assert_eq!(
            seen.ip(),
            std::net::IpAddr::V4(node_ips[node]),
            "{a} on {node} reached the external host as {seen}"
        );
    }
    assert_eq!(peers.peers().len(), pods.len());
    drop(peers);

    // A ClusterIP Service (kube-proxy in each node) reaches the pods.
    c.kubectl(&[
        "expose",
        "deployment",
        "web",
        "--port=80",
        "--target-port=8080",
    ]);
    let cluster_ip = c.kubectl(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    let first = pods.keys().next().unwrap().clone();
    let url = format!("http://{cluster_ip}/");
    c.wait(
        "the web Service answering through its ClusterIP",
        Duration::from_secs(30),
        |c| {
            c.http(&first, &cluster_ip, 80)
                .ok()
                .filter(|a| pods.contains_key(a))
        },
    );
    for a in pods.keys() {
        let got = c.http(a, &cluster_ip, 80);
        assert!(
            got.as_ref().is_ok_and(|g| pods.contains_key(g)),
            "{a} -> {url}: {got:?}"
        );
    }
    eprintln!(
        "test: ClusterIP works after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // NodePortLocal: a Service annotated for it gets its pods annotated (Antrea's JSON), and
    // the external host reaches each pod at the annotated nodeIP:nodePort.
    c.api.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web-npl\n  namespace: default\n  \
         annotations: {nodeportlocal.antrea.io/enabled: \"true\"}\nspec:\n  selector: {app: web}\n  \
         ports: [{port: 80, targetPort: 8080, protocol: TCP}]\n",
    );
    let npl = c.wait(
        "every web pod annotated for NodePortLocal",
        Duration::from_secs(30),
        |c| {
            let items = c.json(&["get", "pods", "-l", "app=web", "-o", "json"]);
            let mut m = BTreeMap::new();
            for p in items["items"].as_array()? {
                let v = p["metadata"]["annotations"]["nodeportlocal.antrea.io"].as_str()?;
                let e: Value = serde_json::from_str(v).ok()?;
                let e = &e.as_array()?[0];
                m.insert(
                    p["metadata"]["name"].as_str()?.to_owned(),
                    (
                        e["nodeIP"].as_str()?.to_owned(),
                        e["nodePort"].as_u64()?,
                        v.to_owned(),
                    ),
                );
            }
            (m.len() == pods.len()).then_some(m)
        },
    );
    for (name, (node_ip, port, value)) in &npl {
        let node = &pods[name].1;
        assert_eq!(node_ip, &node_ips[node].to_string(), "{name}: {value}");
        assert_eq!(
            value,
            &format!(
                r#"[{{"podPort":8080,"nodeIP":"{node_ip}","nodePort":{port},"protocol":"tcp","ipFamily":"IPv4"}}]"#
            )
        );
        let url = format!("http://{node_ip}:{port}/");
        let out = c
            .fabric
            .external()
            .sh(&["sh", "-c", &http_script(node_ip, *port as u16)]);
        assert_eq!(
            out.as_deref().map(http_body).map_err(|e| e.to_string()),
            Ok(name.to_owned()),
            "external host -> {url} ({name})"
        );
    }
    eprintln!(
        "test: NodePortLocal works after {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    c.kubectl(&["delete", "svc", "web-npl"]);

    // A DNS server behind a ClusterIP Service at the cluster DNS address (kubelet's
    // clusterDNS, every pod's nameserver) resolves the web Service's name.
    let name = "web.default.svc.cluster.local";
    c.api
        .kubectl_stdin_ok(&["apply", "-f", "-"], &dns_manifests(name, &cluster_ip));
    c.wait("the DNS pod Running", Duration::from_secs(90), |c| {
        c.running_pods("app=dns").filter(|m| m.len() == 1)
    });
    c.wait(
        "the name resolving through the DNS Service",
        Duration::from_secs(30),
        |c| resolve(c, &first, name).filter(|ip| *ip == cluster_ip),
    );
    for a in pods.keys() {
        let ip = resolve(&c, a, name);
        assert_eq!(
            ip.as_deref(),
            Some(cluster_ip.as_str()),
            "{a}: nslookup {name}"
        );
        // The resolved address answers.
        let got = c.http(a, ip.as_deref().unwrap_or_default(), 80);
        assert!(
            got.as_ref().is_ok_and(|g| pods.contains_key(g)),
            "{a}: {got:?}"
        );
    }
    eprintln!("test: DNS works after {:.1}s", t0.elapsed().as_secs_f64());
    c.kubectl(&["delete", "deployment", "dns", "--wait=true"]);
    c.kubectl(&["delete", "svc", "dns"]);

    // Deletion: kubelet's CNI DEL removes every pod's interface from its node.
    c.kubectl(&["delete", "svc", "web"]);
    c.kubectl(&["delete", "deployment", "web", "--wait=true"]);
    c.wait("the web pods gone", Duration::from_secs(90), |c| {
        c.json(&["get", "pods", "-l", "app=web", "-o", "json"])["items"]
            .as_array()
            .is_some_and(|a| a.is_empty())
            .then_some(())
    });
    c.wait(
        "no pod interface left on any node",
        Duration::from_secs(30),
        |c| {
            c.nodes
                .iter()
                .zip(&baselines)
                .all(|(n, b)| pod_links(n, b).is_empty())
                .then_some(())
        },
    );
    for (n, b) in c.nodes.iter().zip(&baselines) {
        // Routes to the deleted pods' addresses are gone too.
        let routes = n.netns().ip(&["route", "show"]).unwrap_or_default();
        for (name, (ip, node)) in &pods {
            if node == n.name() {
                assert!(
                    ferrea_tests::lines_mentioning(&routes, *ip).is_empty(),
                    "{}: route to deleted {name} ({ip}) left:\n{routes}",
                    n.name()
                );
            }
        }
        let _ = b;
    }
    eprintln!("test: done after {:.1}s", t0.elapsed().as_secs_f64());
    drop(c);
    assert_nothing_left();
}

/// After a cluster guard is dropped: no cgroup of this process's nodes in any hierarchy, no
/// namespace of this process's left.
fn assert_nothing_left() {
    let prefix = format!("ferrea-{}-node", std::process::id());
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .expect("/sys/fs/cgroup")
        .flatten()
    {
        for e in std::fs::read_dir(h.path()).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(&prefix),
                "cgroup {} left",
                e.path().display()
            );
        }
    }
    let left = ferrea_tests::netns::list_with_prefix(&ferrea_tests::name_prefix());
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

/// A DNS responder (the busybox image's /bin/ferrea-test-dns) answering `name` with `ip`,
/// behind the Service `dns` at the cluster DNS address.
fn dns_manifests(name: &str, ip: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: dns, namespace: default}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: dns}}}}
  template:
    metadata: {{labels: {{app: dns}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: dns
          image: {BUSYBOX_IMAGE}
          imagePullPolicy: Never
          command: [/bin/ferrea-test-dns, -listen, ":53", "{name}={ip}"]
---
apiVersion: v1
kind: Service
metadata: {{name: dns, namespace: default}}
spec:
  clusterIP: {CLUSTER_DNS}
  selector: {{app: dns}}
  ports: [{{name: dns, protocol: UDP, port: 53, targetPort: 53}}]
"#
    )
}

/// What `nslookup name` (busybox, through the pod's resolv.conf) answers in pod `pod`.
fn resolve(c: &KubeCluster, pod: &str, name: &str) -> Option<String> {
    let absolute = format!("{name}.");
    let out = c.exec(pod, &["nslookup", &absolute]).ok()?;
    // "Name: <name>" then "Address: <ip>"; the server's own "Address: <ip>:53" comes first.
    let after = out.split_once("Name:")?.1;
    after
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Address:"))
        .map(str::trim)
        .find(|a| a.parse::<Ipv4Addr>().is_ok())
        .map(str::to_owned)
}

/// (uid, restart count) of each pod of `selector`.
fn pod_identities(c: &KubeCluster, selector: &str) -> BTreeMap<String, (String, u64)> {
    c.json(&["get", "pods", "-l", selector, "-o", "json"])["items"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| {
            let restarts = p["status"]["containerStatuses"]
                .as_array()
                .map(|cs| cs.iter().filter_map(|s| s["restartCount"].as_u64()).sum())
                .unwrap_or(0);
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                (p["metadata"]["uid"].as_str().unwrap().to_owned(), restarts),
            )
        })
        .collect()
}

/// The agent pod on `node`.
fn agent_pod(c: &KubeCluster, node: &str) -> Option<String> {
    let out = c.kubectl(&[
        "get",
        "pods",
        "-n",
        "ferrea-system",
        "-l",
        "app.kubernetes.io/name=ferrea-agent",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    let names: Vec<&str> = out.split_whitespace().collect();
    (names.len() == 1).then(|| names[0].to_owned())
}

/// `kubectl delete pod` of node1's agent: kubelet runs the DaemonSet's replacement, the running
/// pods keep their network meanwhile, and pods created while the agent is away start once it is
/// back (kubelet retries the sandbox after CNI's try-again-later).
fn kubelet_agent_pod_deleted_comes_back(dp: Dataplane) {
    let t0 = Instant::now();
    let mut c = KubeCluster::deployed(dp, 2, false);
    let pods = c.run_web(2);
    let before = pod_identities(&c, "app=web");
    let old = agent_pod(&c, "node1").expect("node1's agent pod");
    c.kubectl(&["delete", "pod", "-n", "ferrea-system", &old, "--wait=false"]);
    // New pods while the agent is away (one lands on node1).
    c.kubectl(&["scale", "deployment", "web", "--replicas=4"]);
    let t = Instant::now();
    let mut checks = 0;
    loop {
        // Running pods keep their network, both ways across the nodes.
        for a in pods.keys() {
            for (b, (ip, _)) in &pods {
                c.assert_http(a, b, *ip);
                checks += 1;
            }
        }
        let back = agent_pod(&c, "node1").filter(|p| *p != old);
        let ready = back.as_ref().is_some_and(|p| {
            c.kubectl(&[
                "get",
                "pod",
                "-n",
                "ferrea-system",
                p,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            ]) == "True"
        });
        if ready {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "node1's agent not back within 180 s\n{}",
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "test: node1's agent back after {:.1}s ({checks} HTTP checks meanwhile)",
        t.elapsed().as_secs_f64()
    );
    let all = c.wait("the 4 web pods Running", Duration::from_secs(180), |c| {
        c.running_pods("app=web").filter(|m| m.len() == 4)
    });
    for a in all.keys() {
        for (b, (ip, _)) in &all {
            c.assert_http(a, b, *ip);
        }
    }
    let after = pod_identities(&c, "app=web");
    for (name, id) in &before {
        assert_eq!(
            after.get(name),
            Some(id),
            "{name} was re-created or restarted"
        );
    }
    eprintln!("test: done after {:.1}s", t0.elapsed().as_secs_f64());
}

/// A rolling update of the DaemonSet to a new image tag while a pod pings a pod on the other
/// node every 200 ms: at most 3 packets lost, no pod re-created or restarted.
fn kubelet_rolling_update_keeps_pod_traffic(dp: Dataplane) {
    let t0 = Instant::now();
    let mut c = KubeCluster::deployed(dp, 2, false);
    let pods = c.run_web(2);
    let before = pod_identities(&c, "app=web");
    let tag = format!("{}-rollout", ferrea_tests::kubelet::agent_tag());
    let archive = ferrea_tests::kubelet::Images::agent_archive(&tag).expect("the second image");
    for n in &c.nodes {
        n.import(&archive).expect("importing the second image");
    }
    let mut it = pods.iter();
    let (a, (_, node_a)) = it.next().unwrap();
    let (b, (ip_b, node_b)) = it.next().unwrap();
    assert_ne!(node_a, node_b, "{pods:?}");
    c.exec(
        a,
        &[
            "sh",
            "-c",
            &format!("ping -i 0.2 {ip_b} > /tmp/ping.log 2>&1 & echo $! > /tmp/ping.pid"),
        ],
    )
    .expect("starting ping");
    std::thread::sleep(Duration::from_secs(2));
    let image = format!("ferrea/agent:{tag}");
    c.kubectl(&[
        "set",
        "image",
        "-n",
        "ferrea-system",
        "ds/ferrea-agent",
        &format!("*={image}"),
    ]);
    let t = Instant::now();
    c.wait_agents_ready(Duration::from_secs(300));
    eprintln!(
        "test: rolled out {image} in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    for n in &c.nodes {
        let p = agent_pod(&c, n.name()).expect("an agent pod");
        let img = c.kubectl(&[
            "get",
            "pod",
            "-n",
            "ferrea-system",
            &p,
            "-o",
            "jsonpath={.spec.containers[*].image}",
        ]);
        assert!(img.split_whitespace().all(|i| i == image), "{p}: {img}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let summary = c
        .exec(
            a,
            &[
                "sh",
                "-c",
                "kill -INT $(cat /tmp/ping.pid); sleep 1; tail -n 4 /tmp/ping.log",
            ],
        )
        .expect("stopping ping");
    let (tx, rx) = ping_counts(&summary).unwrap_or_else(|| panic!("no ping summary: {summary}"));
    eprintln!("test: {a} -> {b} during the rollout: {tx} sent, {rx} received");
    assert!(tx >= 20, "ping ran too briefly: {summary}");
    assert!(
        tx - rx <= 3,
        "{} packets lost during the rollout: {summary}",
        tx - rx
    );
    let after = pod_identities(&c, "app=web");
    assert_eq!(before, after, "pods re-created or restarted by the rollout");
    eprintln!("test: done after {:.1}s", t0.elapsed().as_secs_f64());
}

/// (transmitted, received) from ping's summary line.
fn ping_counts(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u64>().ok());
    Some((nums.next()??, nums.next()??))
}

/// The node harness alone (no API server): the holder's mount namespace is the node's
/// filesystem, containerd runs a container from an imported image under the node's cgroup
/// root, and teardown leaves nothing: no process, no cgroup, no mount, nothing on the
/// machine's /etc, /opt, /run or /var/lib.
#[test]
fn kubelet_node_runtime_starts_and_leaves_nothing() {
    if !ferrea_tests::skip_unless_root("kubelet_node_runtime_starts_and_leaves_nothing") {
        return;
    }
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let fabric = Fabric::new().expect("fabric");
    let node = KubeletNode::start_runtime(&fabric, 1).expect("the node's runtime");
    let holder = node.holder_pid();
    let cgroup = node.cgroup_root().to_owned();
    let out = node
        .sh(&[
            "ctr",
            "--address=/run/containerd/containerd.sock",
            "-n",
            "k8s.io",
            "run",
            "--rm",
            "--cgroup",
            &format!("{cgroup}/probe"),
            BUSYBOX_IMAGE,
            "probe",
            "sh",
            "-c",
            "cat /proc/self/cgroup; echo hello > /tmp/x; cat /tmp/x",
        ])
        .unwrap_or_else(|e| panic!("{e:#}\n{}", node.log_tails(30)));
    assert!(out.contains("hello"), "{out}");
    assert!(
        out.lines().any(|l| l.ends_with(&format!("{cgroup}/probe"))),
        "the container is not under the node's cgroup root: {out}"
    );
    // The node's paths are its own.
    std::fs::write(node.host_path("/etc/cni/net.d/probe.conflist"), "{}").unwrap();
    assert!(!Path::new("/etc/cni/net.d/probe.conflist").exists());
    assert!(node.host_path("/opt/cni/bin/loopback").is_file());
    assert!(node.host_path("/run/containerd/containerd.sock").exists());
    assert!(
        !Path::new("/run/containerd").exists()
            || !Path::new("/run/containerd/containerd.sock").exists()
    );
    let node_ns = node.netns_name().to_owned();
    let node_dir = node.dir().to_string_lossy().into_owned();
    drop(node);
    assert!(
        !Path::new(&format!("/proc/{holder}")).exists(),
        "the holder outlived the guard"
    );
    for h in ["memory", "cpu", "pids", "cpuset", "unified"] {
        let d = format!("/sys/fs/cgroup/{h}{cgroup}");
        assert!(!Path::new(&d).exists(), "{d} left behind");
    }
    assert!(!ferrea_tests::netns::list_with_prefix(&node_ns).contains(&node_ns));
    // Nothing of this node is mounted in the machine's mount namespace. (Only mounts that
    // name the node's directory, cgroup root or namespace count: the other tests of the suite
    // run beside this one and mount and unmount their own.)
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let ours = |m: &str| -> Vec<String> {
        m.lines()
            .filter(|l| l.contains(&node_dir) || l.contains(&cgroup) || l.contains(&node_ns))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(ours(&mounts_before), Vec::<String>::new());
    assert_eq!(
        ours(&mounts_after),
        Vec::<String>::new(),
        "the node's mounts outlived it"
    );
}

/// A shell line that sends `GET /` to `host:port` with busybox nc and prints the response.
fn http_script(host: &str, port: u16) -> String {
    format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 5 {host} {port}")
}

/// The body of an HTTP/1.0 response, trimmed.
fn http_body(response: &str) -> String {
    let r = response.replace("\r\n", "\n");
    r.split_once("\n\n")
        .map(|(_, b)| b)
        .unwrap_or(&r)
        .trim()
        .to_owned()
}
