//! Simulated nodes: a network namespace on the fabric, a state directory, a private bpffs and
//! an agent process, plus the single-node shortcut most tests use ([`SimNode::start`]) and a
//! multi-node [`Cluster`].

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::agent::{Agent, AgentSpec, BpfFs};
use crate::cni::Cni;
use crate::fabric::{self, Fabric};
use crate::netns::NetNs;
use crate::ovs::OvsDaemons;
use crate::pod::Pod;

/// The agent's packet path, a parameter so the suite runs per backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dataplane {
    /// TC programs and BPF maps.
    Ebpf,
    /// Open vSwitch (userspace datapath here).
    Ovs,
}

impl Dataplane {
    /// The config value (`ebpf`, `ovs`).
    pub fn as_str(self) -> &'static str {
        match self {
            Dataplane::Ebpf => "ebpf",
            Dataplane::Ovs => "ovs",
        }
    }
}

impl std::str::FromStr for Dataplane {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ebpf" => Ok(Dataplane::Ebpf),
            "ovs" => Ok(Dataplane::Ovs),
            o => Err(format!("unknown dataplane {o:?} (ebpf, ovs)")),
        }
    }
}

impl std::fmt::Display for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to build a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The backend. Default `ebpf`.
    pub dataplane: Dataplane,
    /// The node's pod CIDR. Default `10.244.<index>.0/24`.
    pub pod_cidr: Option<String>,
    /// `clusterCIDRs`. Default `[10.244.0.0/16]`.
    pub cluster_cidrs: Vec<String>,
    /// Extra lines appended verbatim to the agent config (YAML, top level).
    pub extra_config: String,
    /// Start the agent (default `true`); with `false` the node has everything but the process.
    pub start_agent: bool,
    /// Manifests of other nodes to put beside this node's own (file name, YAML), so the agent
    /// knows them from its first moment. [`Cluster::add_node`] fills it.
    pub other_nodes: Vec<(String, String)>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            dataplane: Dataplane::Ebpf,
            pod_cidr: None,
            cluster_cidrs: vec!["10.244.0.0/16".into()],
            extra_config: String::new(),
            start_agent: true,
            other_nodes: Vec::new(),
        }
    }
}

impl NodeOptions {
    /// Defaults with this backend.
    pub fn new(dataplane: Dataplane) -> Self {
        NodeOptions {
            dataplane,
            ..Default::default()
        }
    }

    /// With this pod CIDR.
    pub fn pod_cidr(mut self, cidr: &str) -> Self {
        self.pod_cidr = Some(cidr.into());
        self
    }
}

/// The `Node` object of a simulated node: name, pod CIDR, `InternalIP`.
pub fn node_manifest(name: &str, pod_cidr: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: {pod_cidr}\n\
         status:\n  addresses:\n  - type: InternalIP\n    address: {ip}\n"
    )
}

impl Cluster {
    /// Gives node `i` these labels in every node's source (its own `node.yaml` included), as
    /// `kubectl label node` would.
    pub fn label_node(&self, i: usize, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        let n = &self.nodes[i];
        let items: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}: \"{v}\""))
            .collect();
        let text = node_manifest(&n.name, &n.pod_cidr, n.ip).replacen(
            "metadata:\n",
            &format!("metadata:\n  labels: {{{}}}\n", items.join(", ")),
            1,
        );
        for (j, other) in self.nodes.iter().enumerate() {
            let file = if j == i {
                "node.yaml".to_owned()
            } else {
                n.manifest_entry().0
            };
            let dir = other.manifests();
            let tmp = dir.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, &text)?;
            std::fs::rename(&tmp, dir.join(&file))?;
        }
        Ok(())
    }
}

/// One simulated node. Dropping it stops the agent, unmounts the bpffs, deletes the namespace
/// and the state directory, in that order (field order).
#[derive(Debug)]
pub struct Node {
    agent: Agent,
    // After the agent: the agent may still talk to OVS while it stops.
    ovs: Option<OvsDaemons>,
    bpffs: BpfFs,
    ns: NetNs,
    cni: Cni,
    name: String,
    ip: Ipv4Addr,
    pod_cidr: String,
    dataplane: Dataplane,
    // Last: removed after everything that lives in it.
    dir: tempfile::TempDir,
}

impl Node {
    /// Creates node `index` on `fabric` with `opts`: namespace, manifests (the `Node` object),
    /// agent config, bpffs, and (unless `opts.start_agent` is false) a ready agent.
    pub fn create(fabric: &Fabric, index: u8, opts: &NodeOptions) -> anyhow::Result<Node> {
        let name = format!("node{index}");
        let ip = fabric::node_ip(index);
        let pod_cidr = opts
            .pod_cidr
            .clone()
            .unwrap_or_else(|| format!("10.244.{index}.0/24"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferrea-{name}-"))
            .tempdir()
            .context("creating the node's state directory")?;
        let ns = fabric.add_node_ns(index, &format!("n{index}_"))?;
        let root = dir.path();
        let manifests = root.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        std::fs::write(
            manifests.join("node.yaml"),
            node_manifest(&name, &pod_cidr, ip),
        )?;
        for (file, text) in &opts.other_nodes {
            std::fs::write(manifests.join(file), text)?;
        }
        let socket = root.join("cni.sock");
        let bpf = root.join("bpf");
        let config = root.join("agent.yaml");
        let cidrs = opts.cluster_cidrs.join(", ");
        let ovs = match opts.dataplane {
            Dataplane::Ovs => Some(OvsDaemons::start(&root.join("ovs"), ns.name())?),
            Dataplane::Ebpf => None,
        };
        let ovs_config = ovs
            .as_ref()
            .map(OvsDaemons::agent_config)
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "nodeName: {name}\ndataplane: {dp}\nsource:\n  files:\n    path: {m}\n\
                 cniSocket: {s}\nstateDir: {st}\nbpfPinPath: {b}\nclusterCIDRs: [{cidrs}]\n{ovs_config}{extra}",
                dp = opts.dataplane,
                m = manifests.display(),
                s = socket.display(),
                st = root.join("state").display(),
                b = bpf.display(),
                extra = opts.extra_config,
            ),
        )?;
        let bpffs = BpfFs::mount(&bpf)?;
        let cni = Cni::new(socket, Some(ns.name().to_owned()));
        let spec = AgentSpec {
            netns: ns.name().to_owned(),
            config,
            log: root.join("agent.log"),
            cni: cni.clone(),
        };
        let mut agent = Agent::start_stopped(spec);
        if opts.start_agent {
            // On failure the guards above undo everything; the error carries the log tail.
            agent.spawn()?;
            agent.wait_ready(crate::agent::READY_TIMEOUT)?;
        }
        Ok(Node {
            agent,
            ovs,
            bpffs,
            ns,
            cni,
            name,
            ip,
            pod_cidr,
            dataplane: opts.dataplane,
            dir,
        })
    }

    /// This node's `Node` object as another node's manifests directory holds it.
    pub fn manifest_entry(&self) -> (String, String) {
        (
            format!("node-{}.yaml", self.name),
            node_manifest(&self.name, &self.pod_cidr, self.ip),
        )
    }

    /// The node's OVS daemons (OVS backend only).
    pub fn ovs(&mut self) -> Option<&mut OvsDaemons> {
        self.ovs.as_mut()
    }

    /// The node's name (`node<index>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its address on the fabric.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its pod CIDR.
    pub fn pod_cidr(&self) -> &str {
        &self.pod_cidr
    }

    /// The pod gateway the agent is expected to use: the first host address of the pod CIDR.
    pub fn gateway(&self) -> Ipv4Addr {
        let (net, _) = self.pod_cidr.split_once('/').expect("CIDR");
        let n: Ipv4Addr = net.parse().expect("pod CIDR address");
        Ipv4Addr::from(u32::from(n) + 1)
    }

    /// The backend.
    pub fn dataplane(&self) -> Dataplane {
        self.dataplane
    }

    /// The node's network namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The CNI runner for this node.
    pub fn cni(&self) -> &Cni {
        &self.cni
    }

    /// The agent's log (every run of it).
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir().join("agent.log")).unwrap_or_default()
    }

    /// The length of the agent's log now, for [`Node::agent_log_since`].
    pub fn agent_log_len(&self) -> usize {
        self.agent_log().len()
    }

    /// What the agent logged after the log was `len` bytes long.
    pub fn agent_log_since(&self, len: usize) -> String {
        self.agent_log().get(len..).unwrap_or_default().to_owned()
    }

    /// The agent process.
    pub fn agent(&mut self) -> &mut Agent {
        &mut self.agent
    }

    /// The agent's PID, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.pid()
    }

    /// The state directory (config, manifests, socket, state, bpf, agent.log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The bpffs mount point.
    pub fn bpf_path(&self) -> &Path {
        self.bpffs.path()
    }

    /// The manifests directory the agent watches.
    pub fn manifests(&self) -> PathBuf {
        self.dir().join("manifests")
    }

    /// The agent's configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("agent.yaml")
    }

    /// Switches the agent's configuration from the `files` source to
    /// `source: {kubernetes: {kubeconfig}}`; takes effect at the agent's next start (create the
    /// node with `start_agent: false`, then [`Agent::spawn`] it).
    pub fn use_kubernetes_source(&self, kubeconfig: &Path) -> anyhow::Result<()> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path)?;
        let files = format!(
            "source:\n  files:\n    path: {}\n",
            self.manifests().display()
        );
        anyhow::ensure!(
            text.contains(&files),
            "{} has no files source",
            path.display()
        );
        let kube = format!(
            "source:\n  kubernetes:\n    kubeconfig: {}\n",
            kubeconfig.display()
        );
        std::fs::write(&path, text.replacen(&files, &kube, 1))?;
        Ok(())
    }

    /// Adds one pod through the CNI binary.
    pub fn add_pod(&self) -> anyhow::Result<Pod> {
        Pod::add(&self.cni, "p")
    }

    /// Adds `n` pods with concurrent ADDs.
    pub fn add_pods_concurrently(&self, n: usize) -> anyhow::Result<Vec<Pod>> {
        crate::pod::add_pods_concurrently(&self.cni, n)
    }

    /// Links in the node whose name starts with `prefix`.
    pub fn links_with_prefix(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .ns
            .links()?
            .into_iter()
            .filter(|l| l.starts_with(prefix))
            .collect())
    }

    /// Host-side pod veths in the node: `fe` followed by hex digits, 15 characters (so the
    /// agent's own devices such as `ferrea-gw0` are not counted).
    pub fn pod_veths(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .links_with_prefix("fe")?
            .into_iter()
            .filter(|l| l.len() == 15 && l[2..].bytes().all(|b| b.is_ascii_hexdigit()))
            .collect())
    }

    /// `ip route show table all` in the node.
    pub fn routes(&self) -> anyhow::Result<String> {
        self.ns.ip(&["route", "show", "table", "all"])
    }

    /// `nft list ruleset` in the node.
    pub fn nft_ruleset(&self) -> anyhow::Result<String> {
        self.ns.sh(&["nft", "list", "ruleset"])
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} agent log (last 80 lines of {}) ----\n{}\n---- end of agent log ----",
                self.name,
                self.dir().join("agent.log").display(),
                self.agent.log_tail(80)
            );
        }
    }
}

/// One node, the fabric and the external host: what most tests need.
#[derive(Debug)]
pub struct SimNode {
    // Field order is drop order: the node before the fabric it is plugged into.
    node: Node,
    fabric: Fabric,
}

impl SimNode {
    /// Builds the fabric, the external host and node 1 (172.18.0.11) with a ready agent.
    pub fn start(opts: NodeOptions) -> anyhow::Result<SimNode> {
        let fabric = Fabric::new()?;
        let node = Node::create(&fabric, fabric.next_index(), &opts)?;
        Ok(SimNode { node, fabric })
    }

    /// The external host's namespace.
    pub fn external(&self) -> &NetNs {
        self.fabric.external()
    }

    /// The fabric.
    pub fn fabric(&self) -> &Fabric {
        &self.fabric
    }

    /// The node, mutably (for agent restarts).
    pub fn node_mut(&mut self) -> &mut Node {
        &mut self.node
    }
}

impl std::ops::Deref for SimNode {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl std::ops::DerefMut for SimNode {
    fn deref_mut(&mut self) -> &mut Node {
        &mut self.node
    }
}

/// Several nodes on one fabric.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<Node>,
    fabric: Fabric,
}

impl Cluster {
    /// An empty cluster: fabric and external host.
    pub fn new() -> anyhow::Result<Cluster> {
        Ok(Cluster {
            nodes: Vec::new(),
            fabric: Fabric::new()?,
        })
    }

    /// Adds the next node (node1, node2, ...) and returns its index in [`Cluster::nodes`].
    /// Every node's source lists every node, as the Kubernetes API would: the new node starts
    /// knowing the others, and the others learn about it through their manifests directory.
    pub fn add_node(&mut self, opts: &NodeOptions) -> anyhow::Result<usize> {
        let index = self.fabric.next_index();
        if index > 89 {
            bail!("too many nodes");
        }
        let mut opts = opts.clone();
        opts.other_nodes = self.nodes.iter().map(Node::manifest_entry).collect();
        let node = Node::create(&self.fabric, index, &opts)?;
        self.publish(&node)?;
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    /// Writes `node`'s `Node` object into every other node's manifests directory.
    pub fn publish(&self, node: &Node) -> anyhow::Result<()> {
        let (file, text) = node.manifest_entry();
        for other in self.nodes.iter().filter(|o| o.name() != node.name()) {
            std::fs::write(other.manifests().join(&file), &text)
                .with_context(|| format!("publishing {} to {}", node.name(), other.name()))?;
        }
        Ok(())
    }

    /// Deletes node `i`'s `Node` object from every other node's source (as if it were
    /// deleted from the API); the node itself keeps running.
    pub fn unpublish(&self, i: usize) -> anyhow::Result<()> {
        let (file, _) = self.nodes[i].manifest_entry();
        for (j, other) in self.nodes.iter().enumerate() {
            if j != i {
                match std::fs::remove_file(other.manifests().join(&file)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The nodes, mutably.
    pub fn nodes_mut(&mut self) -> &mut [Node] {
        &mut self.nodes
    }

    /// The external host.
    pub fn external(&self) -> &NetNs {
        self.fabric.external()
    }

    /// The fabric.
    pub fn fabric(&self) -> &Fabric {
        &self.fabric
    }
}
