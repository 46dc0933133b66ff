//! Real Kubernetes nodes: per simulated node a `containerd` (with `runc`) and a `kubelet`, and
//! in the control plane a `kube-controller-manager` and a `kube-scheduler`, so tests deploy
//! ferrea with its DaemonSet and run ordinary pods, as users do.
//!
//! What a [`KubeletNode`] is:
//! - a network namespace on the fabric (node `i` at 172.18.0.(10+i), as every simulated node);
//! - a *holder* process, `unshare --mount --propagation private sh -c ...`, started inside that
//!   network namespace. Its private mount namespace is the node's "host filesystem": a per-node
//!   directory bound over `/run` and `/var/lib` and `/var/log`, overlays (upper dirs per node)
//!   over `/etc` and `/opt` (and over `/usr/lib` when the machine has no `/lib/modules`, which
//!   the DaemonSet mounts), a fresh bpffs on `/sys/fs/bpf`, `/run/netns` and `/var/lib/kubelet`
//!   made shared mounts (the DaemonSet's `Bidirectional` and `HostToContainer` mounts need
//!   that), and the kernel tunables kubelet checks (`vm.overcommit_memory`, `kernel.panic`,
//!   `kernel.panic_on_oops`) shown with the values kubelet wants by files bound over them, so
//!   that kubelet (with `protectKernelDefaults: true`) neither writes them nor refuses to
//!   start. So every path the DaemonSet's hostPath volumes name (`/etc/cni/net.d`,
//!   `/opt/cni/bin`, `/var/run/ferrea`, `/var/lib/ferrea`, `/sys/fs/bpf`, `/run/netns`, ...) is
//!   the node's own, and none of the machine's mounts changes;
//! - `containerd` and `kubelet` entered into the holder's mount and network namespaces with
//!   `nsenter --target <holder> --mount --net` (which execs, so each PID is the daemon's own),
//!   with their default paths (`/run/containerd/containerd.sock`, `/var/lib/containerd`,
//!   `/var/lib/kubelet`) inside that namespace;
//! - a cgroup root `/ferrea-<pid>-node<i>` that the harness creates in every cgroup v1
//!   hierarchy (kubelet's `cgroupRoot`, `cgroupDriver: cgroupfs`; `failCgroupV1: false`) and
//!   removes at the end;
//! - a kube-proxy ([`crate::kubeproxy`]) in the node's network namespace, so that the
//!   `kubernetes` Service (the agent's in-cluster API address) and the tests' Services work;
//! - the images (`ctr -n k8s.io images import`): ferrea's agent image built by
//!   `deploy/image/build.sh` from the workspace binaries, and the pause and busybox images of
//!   `scripts/images/build.sh` ([`Images`]).
//!
//! Teardown ([`Drop`], also while a failed assertion unwinds): kubelet (SIGTERM by PID), then
//! every process in the node's cgroups (the containers), containerd, then every other process
//! still in the holder's mount namespace (the shims), then the holder; when its mount namespace
//! has no process left the kernel drops all of its mounts. Then the cgroups are removed
//! (deepest first), the node's directory and its network namespace. Nothing is killed by name.

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::apiserver::{ApiServer, k8s_bin};
use crate::fabric::{self, Fabric};
use crate::kubeproxy::{KubeProxy, KubeProxySpec, ProxyMode};
use crate::netns::NetNs;

/// The cluster's pod CIDR (kube-controller-manager `--cluster-cidr`, one /24 per node).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The service CIDR, as the test API server's `--service-cluster-ip-range`.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The cluster DNS Service's address (kubelet's `clusterDNS`).
pub const CLUSTER_DNS: &str = "10.96.0.10";
/// The pod sandbox image (containerd's `sandbox_image`), from `scripts/images/build.sh`.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.2";
/// The workload image, from `scripts/images/build.sh`.
pub const BUSYBOX_IMAGE: &str = "ferrea.test/busybox:1";

/// kube-apiserver flags a kubelet cluster needs on top of the harness's own: the `kubernetes`
/// Service gets the control plane's endpoint (pods reach the API through it), and the API
/// server reaches kubelets (exec, logs) at their InternalIP (their host names resolve nowhere).
pub const APISERVER_ARGS: &[&str] = &[
    "--endpoint-reconciler-type=lease",
    "--kubelet-preferred-address-types=InternalIP",
];

/// How long SIGTERM gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository root")
}

/// The image archives a node imports.
#[derive(Clone, Debug)]
pub struct Images {
    /// `ferrea/agent:<tag>` (deploy/image/build.sh).
    pub agent: PathBuf,
    /// The pause image.
    pub pause: PathBuf,
    /// The busybox workload image.
    pub busybox: PathBuf,
}

/// The agent image's tag the DaemonSet names (the workspace version).
pub fn agent_tag() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

impl Images {
    /// Builds the archives once per test process into `target/image/kubelet/`: the agent
    /// image from the workspace's debug binaries (debug info stripped first, so the archive
    /// stays small), tagged `extra_tag` too when given (a second archive, for rolling
    /// updates); pause and busybox from `scripts/images/build.sh`. No network is used.
    pub fn get() -> &'static Images {
        static IMAGES: OnceLock<Images> = OnceLock::new();
        IMAGES.get_or_init(|| Self::build().expect("building the images"))
    }

    fn build() -> anyhow::Result<Images> {
        let start = Instant::now();
        let repo = repo_root();
        let out = repo.join("target/image/kubelet");
        std::fs::create_dir_all(&out)?;
        let bins = out.join("bin");
        std::fs::create_dir_all(&bins)?;
        for b in ["ferrea-agent", "ferrea-cni"] {
            let src = crate::bin(b);
            let dst = bins.join(b);
            crate::netns::run_ok(
                Command::new("objcopy")
                    .arg("--strip-debug")
                    .arg(&src)
                    .arg(&dst),
            )
            .with_context(|| format!("stripping {}", src.display()))?;
        }
        let agent = Self::agent_archive(agent_tag())?;
        crate::netns::run_ok(
            Command::new("bash")
                .arg(repo.join("scripts/images/build.sh"))
                .arg("--out")
                .arg(&out)
                .args(["pause", "busybox"]),
        )?;
        eprintln!(
            "harness: images built in {:.1}s ({})",
            start.elapsed().as_secs_f64(),
            out.display()
        );
        Ok(Images {
            agent,
            pause: out.join("pause.tar"),
            busybox: out.join("busybox.tar"),
        })
    }

    /// Builds (once per tag and process) the agent image from the stripped binaries with tag
    /// `tag`; returns the archive.
    pub fn agent_archive(tag: &str) -> anyhow::Result<PathBuf> {
        let repo = repo_root();
        let out = repo.join("target/image/kubelet");
        let archive = out.join(format!("ferrea-agent-{tag}.tar"));
        crate::netns::run_ok(
            Command::new("bash")
                .arg(repo.join("deploy/image/build.sh"))
                .arg("--bin-dir")
                .arg(out.join("bin"))
                .arg("--out")
                .arg(&archive)
                .args(["--tag", tag]),
        )?;
        Ok(archive)
    }
}

/// kube-controller-manager and kube-scheduler in the API server's namespace, with the admin
/// kubeconfig. The controller manager allocates node CIDRs (`--allocate-node-cidrs
/// --cluster-cidr`), runs the DaemonSet, Deployment, ReplicaSet, service-account, root CA
/// publisher and garbage collectors; the scheduler places pods.
#[derive(Debug)]
pub struct ControlPlane {
    procs: Vec<(&'static str, Child)>,
    dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts both against `api` (from [`ApiServer::start_on_fabric_with`] with
    /// [`APISERVER_ARGS`]).
    pub fn start(api: &ApiServer) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ferrea-control-plane-")
            .tempdir()?;
        let mut cp = ControlPlane {
            procs: Vec::new(),
            dir,
        };
        let kubeconfig = api.kubeconfig_path().display().to_string();
        let pki = api.pki_dir();
        let p = |f: &str| pki.join(f).display().to_string();
        cp.spawn(
            api,
            "kube-controller-manager",
            &[
                format!("--kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                "--bind-address=127.0.0.1".into(),
                "--leader-elect=false".into(),
                "--allocate-node-cidrs=true".into(),
                format!("--cluster-cidr={CLUSTER_CIDR}"),
                "--node-cidr-mask-size=24".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                format!("--root-ca-file={}", p("ca.crt")),
                format!("--service-account-private-key-file={}", p("sa.key")),
                "--use-service-account-credentials=false".into(),
                "--controllers=*".into(),
                // Pods of a node that stops answering are not evicted during a test.
                "--node-monitor-grace-period=60s".into(),
                "--v=2".into(),
            ],
        )?;
        cp.spawn(
            api,
            "kube-scheduler",
            &[
                format!("--kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                "--bind-address=127.0.0.1".into(),
                "--leader-elect=false".into(),
                "--v=2".into(),
            ],
        )?;
        Ok(cp)
    }

    fn spawn(
        &mut self,
        api: &ApiServer,
        name: &'static str,
        args: &[String],
    ) -> anyhow::Result<()> {
        let bin = k8s_bin(name);
        let log = File::create(self.dir.path().join(format!("{name}.log")))?;
        let mut cmd = Command::new(&bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        crate::netns::enter_on_spawn(&mut cmd, api.netns_name())?;
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        eprintln!("harness: {name} pid {}", child.id());
        self.procs.push((name, child));
        Ok(())
    }

    /// Fails (with its log) if a process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for (name, c) in &mut self.procs {
            if let Ok(Some(st)) = c.try_wait() {
                bail!(
                    "{name} exited ({st})\n{}",
                    tail(&self.dir.path().join(format!("{name}.log")), 30)
                );
            }
        }
        Ok(())
    }

    /// The last `n` lines of both logs.
    pub fn log_tails(&self, n: usize) -> String {
        self.procs
            .iter()
            .map(|(name, _)| {
                format!(
                    "--- last lines of {name}.log ---\n{}",
                    tail(&self.dir.path().join(format!("{name}.log")), n)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for (name, c) in self.procs.iter_mut().rev() {
            stop_child(name, c);
        }
    }
}

/// One real node (see the module doc).
pub struct KubeletNode {
    name: String,
    index: u8,
    ip: Ipv4Addr,
    kubelet: Option<Child>,
    kube_proxy: Option<KubeProxy>,
    containerd: Option<Child>,
    holder: Option<Child>,
    /// The holder's mount namespace (`st_ino` of `/proc/<holder>/ns/mnt`), to find the
    /// processes left in it at teardown.
    mnt_ns: u64,
    cgroup_root: String,
    ns: Option<NetNs>,
    dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for KubeletNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletNode")
            .field("name", &self.name)
            .field("ip", &self.ip)
            .field("dir", &self.dir.as_ref().map(|d| d.path().to_owned()))
            .finish()
    }
}

/// The cgroup v1 hierarchies of this machine: `/sys/fs/cgroup/<name>` for every mounted
/// `cgroup` (v1) filesystem.
fn cgroup_v1_mounts() -> Vec<PathBuf> {
    cgroup_mounts(&["cgroup"])
}

/// Every cgroup mount, v1 and v2: on a hybrid machine runc also makes each container's path
/// in the v2 hierarchy (`/sys/fs/cgroup/unified`), which teardown removes as well.
fn cgroup_all_mounts() -> Vec<PathBuf> {
    cgroup_mounts(&["cgroup", "cgroup2"])
}

fn cgroup_mounts(types: &[&str]) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mount_point = pre.split_whitespace().nth(4)?;
            types.contains(&fstype).then(|| PathBuf::from(mount_point))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

impl KubeletNode {
    /// Starts node `index` (1-based) on `fabric`: its namespace, holder, containerd (and the
    /// images imported), kube-proxy and kubelet, registering as `node<index>` with the API
    /// server `api`.
    pub fn start(fabric: &Fabric, api: &ApiServer, index: u8) -> anyhow::Result<Self> {
        let mut node = Self::start_runtime(fabric, index)?;
        node.join(api)?;
        Ok(node)
    }

    /// The first half of [`KubeletNode::start`]: namespace, holder, cgroups, containerd with
    /// the images imported; no kube-proxy, no kubelet yet.
    pub fn start_runtime(fabric: &Fabric, index: u8) -> anyhow::Result<Self> {
        let name = format!("node{index}");
        let ip = fabric::node_ip(index);
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferrea-kubelet-{name}-"))
            .tempdir()?;
        let ns = fabric.add_node_ns(index, &format!("k{index}_"))?;
        let mut node = KubeletNode {
            name,
            index,
            ip,
            kubelet: None,
            kube_proxy: None,
            containerd: None,
            holder: None,
            mnt_ns: 0,
            cgroup_root: format!("/ferrea-{}-node{index}", std::process::id()),
            ns: Some(ns),
            dir: Some(dir),
        };
        node.start_holder()?;
        node.make_cgroups()?;
        node.start_containerd()?;
        let images = Images::get();
        for archive in [&images.pause, &images.busybox, &images.agent] {
            node.import(archive)?;
        }
        Ok(node)
    }

    /// The second half of [`KubeletNode::start`]: kube-proxy and kubelet against `api`.
    pub fn join(&mut self, api: &ApiServer) -> anyhow::Result<()> {
        let node = self;
        let ip = node.ip;
        node.kube_proxy = Some(KubeProxy::start(
            api,
            KubeProxySpec {
                netns: node.netns_name().to_owned(),
                node_name: node.name.clone(),
                node_ip: ip,
                cluster_cidr: CLUSTER_CIDR.into(),
                node_port_cidr: format!("{}/{}", fabric::EXTERNAL_IP, fabric::FABRIC_PREFIX),
                mode: ProxyMode::Nftables,
            },
        )?);
        node.start_kubelet(api)?;
        Ok(())
    }

    /// The Node object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's fabric address (its InternalIP).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The node's index on the fabric.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The node's network namespace.
    pub fn netns(&self) -> &NetNs {
        self.ns.as_ref().expect("the node's namespace")
    }

    /// Its name.
    pub fn netns_name(&self) -> &str {
        self.netns().name()
    }

    /// The node's own directory (the holder's `/run`, `/var/lib`, ... and the logs).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("the node's directory").path()
    }

    /// kubelet's cgroup root.
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }

    /// The PID of the holder, whose mount namespace is the node's filesystem.
    pub fn holder_pid(&self) -> u32 {
        self.holder
            .as_ref()
            .map(Child::id)
            .expect("the holder runs")
    }

    /// A path as the node sees it (through `/proc/<holder>/root`).
    pub fn host_path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root{}",
            self.holder_pid(),
            if path.starts_with('/') {
                path.to_owned()
            } else {
                format!("/{path}")
            }
        ))
    }

    /// A [`Command`] that runs `argv` in the node (its mount and network namespaces).
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.holder_pid()))
            .args(["--mount", "--net", "--"])
            .args(argv);
        cmd
    }

    /// Runs `argv` in the node; fails unless it exits 0; returns stdout.
    pub fn sh(&self, argv: &[&str]) -> anyhow::Result<String> {
        crate::netns::run_ok(&mut self.command(argv))
    }

    /// The last `n` lines of a log of this node's (`kubelet`, `containerd`, `holder`).
    pub fn log_tail(&self, which: &str, n: usize) -> String {
        format!(
            "--- last lines of {}'s {which}.log ---\n{}",
            self.name,
            tail(&self.dir().join(format!("{which}.log")), n)
        )
    }

    /// kubelet's and containerd's last lines, and kube-proxy's.
    pub fn log_tails(&self, n: usize) -> String {
        let mut s = format!(
            "{}\n{}",
            self.log_tail("kubelet", n),
            self.log_tail("containerd", n)
        );
        if let Some(kp) = &self.kube_proxy {
            s.push('\n');
            s.push_str(&kp.log_tail(n / 2));
        }
        s
    }

    /// Fails (with the logs) if kubelet, containerd or the holder has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        let mut dead = Vec::new();
        for (name, c) in [
            ("holder", &mut self.holder),
            ("containerd", &mut self.containerd),
            ("kubelet", &mut self.kubelet),
        ] {
            if let Some(c) = c
                && let Ok(Some(st)) = c.try_wait()
            {
                dead.push(format!("{name} exited ({st})"));
            }
        }
        if !dead.is_empty() {
            bail!("{}: {}\n{}", self.name, dead.join(", "), self.log_tails(40));
        }
        Ok(())
    }

    /// Imports an image archive into containerd's `k8s.io` namespace.
    pub fn import(&self, archive: &Path) -> anyhow::Result<()> {
        let a = archive.display().to_string();
        self.sh(&[
            "ctr",
            "--address=/run/containerd/containerd.sock",
            "-n",
            "k8s.io",
            "images",
            "import",
            "--no-unpack=false",
            &a,
        ])
        .map(|_| ())
        .with_context(|| format!("{}: importing {a}", self.name))
    }

    fn start_holder(&mut self) -> anyhow::Result<()> {
        let d = self.dir().to_owned();
        let lib = std::fs::canonicalize("/lib").unwrap_or_else(|_| PathBuf::from("/lib"));
        let need_lib_overlay = !Path::new("/lib/modules").is_dir();
        // Kernel tunables kubelet checks, shown with the values it wants (see the module doc).
        let tunables = [
            ("vm/overcommit_memory", "1"),
            ("vm/panic_on_oom", "0"),
            ("kernel/panic", "10"),
            ("kernel/panic_on_oops", "1"),
            ("kernel/keys/root_maxkeys", "1000000"),
            ("kernel/keys/root_maxbytes", "25000000"),
        ];
        let mut script = String::from("set -eu\nD=\"$1\"\n");
        script.push_str(
            "mkdir -p \"$D/run\" \"$D/var-lib\" \"$D/var-log\" \"$D/sysctl\"\n\
             # The test's own /run/netns (ip netns' mounts) would stay listed under the new\n\
             # /run, and containerd would judge /run/netns's propagation by it.\n\
             if mountpoint -q /run/netns; then umount -l /run/netns; fi\n\
             mount --bind \"$D/run\" /run\n\
             mount --bind \"$D/var-lib\" /var/lib\n\
             mount --bind \"$D/var-log\" /var/log\n\
             overlay() { mkdir -p \"$D/ov/$2/up\" \"$D/ov/$2/work\"; \
               mount -t overlay overlay -o \"lowerdir=$1,upperdir=$D/ov/$2/up,workdir=$D/ov/$2/work\" \"$1\"; }\n\
             overlay /etc etc\n\
             overlay /opt opt\n",
        );
        if need_lib_overlay {
            script.push_str(&format!(
                "overlay {lib} lib\nmkdir -p {lib}/modules\n",
                lib = lib.display()
            ));
        }
        script.push_str(
            "mkdir -p /run/netns /var/lib/kubelet /etc/cni/net.d /opt/cni/bin /run/ferrea \
             /var/lib/ferrea /var/log/pods /var/log/containers\n\
             for m in /run/netns /var/lib/kubelet; do mount --bind \"$m\" \"$m\"; mount --make-shared \"$m\"; done\n\
             mount -t bpf bpf /sys/fs/bpf\n\
             mount --make-shared /sys/fs/bpf\n\
             for p in /usr/lib/cni/loopback /opt/cni/bin/loopback; do \
               if [ -x \"$p\" ]; then cp \"$p\" /opt/cni/bin/loopback; break; fi; done\n\
             [ -x /opt/cni/bin/loopback ] || { echo 'no loopback CNI plugin (containernetworking-plugins)' >&2; exit 1; }\n",
        );
        for (t, v) in tunables {
            let f = t.replace('/', "_");
            script.push_str(&format!(
                "if [ \"$(cat /proc/sys/{t})\" != {v} ]; then echo {v} > \"$D/sysctl/{f}\"; \
                 mount --bind -o ro \"$D/sysctl/{f}\" /proc/sys/{t}; fi\n"
            ));
        }
        script.push_str("touch \"$D/holder.ready\"\nexec sleep 2147483647\n");
        std::fs::write(d.join("holder.sh"), &script)?;
        let log = File::create(d.join("holder.log"))?;
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh"])
            .arg(d.join("holder.sh"))
            .arg(&d)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        crate::netns::enter_on_spawn(&mut cmd, self.netns_name())?;
        let child = cmd.spawn().context("spawning the holder (unshare)")?;
        let pid = child.id();
        self.holder = Some(child);
        let ready = d.join("holder.ready");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "{}: holder not ready in 10 s\n{}",
                    self.name,
                    self.log_tail("holder", 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.mnt_ns = std::fs::metadata(format!("/proc/{pid}/ns/mnt"))?.ino();
        let own = std::fs::metadata("/proc/self/ns/mnt")?.ino();
        if self.mnt_ns == own {
            bail!(
                "{}: the holder is in the test's own mount namespace",
                self.name
            );
        }
        Ok(())
    }

    fn make_cgroups(&mut self) -> anyhow::Result<()> {
        for h in cgroup_v1_mounts() {
            let dir = h.join(self.cgroup_root.trim_start_matches('/'));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating the cgroup {}", dir.display()))?;
            if h.ends_with("cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(h.join(f))?;
                    std::fs::write(dir.join(f), v.trim())
                        .with_context(|| format!("writing {}", dir.join(f).display()))?;
                }
            }
        }
        Ok(())
    }

    fn spawn_in_node(&mut self, name: &str, argv: &[String]) -> anyhow::Result<Child> {
        let log = File::create(self.dir().join(format!("{name}.log")))?;
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut cmd = self.command(&argv);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        eprintln!("harness: {} {name} pid {}", self.name, child.id());
        Ok(child)
    }

    fn start_containerd(&mut self) -> anyhow::Result<()> {
        let config = self.dir().join("containerd.toml");
        std::fs::write(&config, containerd_config())?;
        let child = self.spawn_in_node(
            "containerd",
            &[
                "containerd".into(),
                format!("--config={}", config.display()),
            ],
        )?;
        self.containerd = Some(child);
        let sock = self.host_path("/run/containerd/containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if sock.exists()
                && self
                    .sh(&[
                        "ctr",
                        "--address=/run/containerd/containerd.sock",
                        "version",
                    ])
                    .is_ok()
            {
                return Ok(());
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "{}: containerd not answering in 30 s\n{}",
                    self.name,
                    self.log_tail("containerd", 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_kubelet(&mut self, api: &ApiServer) -> anyhow::Result<()> {
        let config = self.dir().join("kubelet.yaml");
        std::fs::write(&config, kubelet_config(self.ip, &self.cgroup_root))?;
        let child = self.spawn_in_node(
            "kubelet",
            &[
                k8s_bin("kubelet").display().to_string(),
                format!("--config={}", config.display()),
                format!("--kubeconfig={}", api.kubeconfig_path().display()),
                format!("--hostname-override={}", self.name),
                format!("--node-ip={}", self.ip),
                "--v=2".into(),
            ],
        )?;
        self.kubelet = Some(child);
        Ok(())
    }

    /// Stops kubelet (SIGTERM by PID, SIGKILL after the grace).
    pub fn stop_kubelet(&mut self) {
        if let Some(mut c) = self.kubelet.take() {
            stop_child("kubelet", &mut c);
        }
    }

    /// The PIDs in this node's cgroups (its pods' processes).
    pub fn cgroup_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for h in cgroup_all_mounts() {
            let root = h.join(self.cgroup_root.trim_start_matches('/'));
            collect_procs(&root, &mut pids);
        }
        pids.sort();
        pids.dedup();
        pids
    }

    /// PIDs of processes in the holder's mount namespace other than `except`.
    fn pids_in_mnt_ns(&self, except: &[i32]) -> Vec<i32> {
        let mut v = Vec::new();
        if self.mnt_ns == 0 {
            return v;
        }
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return v;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if except.contains(&pid) {
                continue;
            }
            if std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
                .is_ok_and(|m| m.ino() == self.mnt_ns)
            {
                v.push(pid);
            }
        }
        v
    }

    fn teardown(&mut self) {
        self.stop_kubelet();
        self.kube_proxy = None;
        // The containers: every process in the node's cgroups.
        kill_until_gone("containers", || self.cgroup_pids());
        if let Some(mut c) = self.containerd.take() {
            stop_child("containerd", &mut c);
        }
        let holder = self.holder.as_ref().map(|c| c.id() as i32);
        let except: Vec<i32> = holder.into_iter().collect();
        // The shims and anything else still in the node's mount namespace.
        kill_until_gone("processes in the node's mount namespace", || {
            self.pids_in_mnt_ns(&except)
        });
        if let Some(mut c) = self.holder.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
        // Then the cgroups, deepest first (a cgroup's last task may take a moment to leave).
        for h in cgroup_all_mounts() {
            let root = h.join(self.cgroup_root.trim_start_matches('/'));
            if root.exists() {
                let deadline = Instant::now() + Duration::from_secs(10);
                while let Err(e) = remove_cgroup_tree(&root) {
                    if Instant::now() > deadline {
                        eprintln!("harness: removing cgroup {}: {e}", root.display());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        // The namespace after everything in it has gone; the directory last.
        self.ns = None;
        if std::env::var_os("FERREA_KEEP_NODE_DIRS").is_some()
            && let Some(d) = self.dir.take()
        {
            eprintln!("harness: keeping {}", d.keep().display());
        }
        self.dir = None;
    }
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn collect_procs(dir: &Path, pids: &mut Vec<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_procs(&e.path(), pids);
            }
        }
    }
}

fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// SIGKILLs the PIDs `list` returns until it returns none (at most 10 s).
fn kill_until_gone(what: &str, mut list: impl FnMut() -> Vec<i32>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = list();
        if pids.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("harness: {what} still there after 10 s: {pids:?}");
            return;
        }
        for p in pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM to the child's PID, SIGKILL after [`STOP_GRACE`]; reaps it.
fn stop_child(name: &str, child: &mut Child) {
    let pid = Pid::from_raw(child.id() as i32);
    if matches!(child.try_wait(), Ok(None)) {
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!("harness: {name} pid {pid} still runs {STOP_GRACE:?} after SIGTERM; SIGKILL");
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
    let _ = child.wait();
}

fn tail(path: &Path, n: usize) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// containerd's configuration: CRI with runc (cgroupfs), overlayfs, the pause image above, CNI
/// from `/opt/cni/bin` and `/etc/cni/net.d`; every path is containerd's default, inside the
/// node's mount namespace.
fn containerd_config() -> String {
    format!(
        r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "/run/containerd/containerd.sock"
[ttrpc]
  address = "/run/containerd/containerd.sock.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  # No CAP_SYS_RESOURCE in this sandbox: an oom_score_adj below the current one (kubelet asks
  # -998 for sandboxes) fails runc's nsexec ("can't get final child's PID from pipe: EOF").
  # Clamped to containerd's own instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
"#
    )
}

/// kubelet's configuration (see the module doc): cgroupfs under `cgroup_root`, cgroup v1
/// allowed, containerd's socket, the API server reaching it anonymously on `ip:10250`.
fn kubelet_config(ip: Ipv4Addr, cgroup_root: &str) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: {ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization:
  mode: AlwaysAllow
clusterDomain: cluster.local
clusterDNS: [{CLUSTER_DNS}]
resolvConf: /etc/resolv.conf
failSwapOn: false
protectKernelDefaults: true
registerNode: true
nodeStatusUpdateFrequency: 2s
nodeStatusReportFrequency: 10s
syncFrequency: 10s
fileCheckFrequency: 10s
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
imageMinimumGCAge: 24h
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
serializeImagePulls: false
maxPods: 50
podPidsLimit: -1
shutdownGracePeriod: 0s
localStorageCapacityIsolation: true
"#
    )
}

/// Writes `text` to `path` atomically enough for a test (no partial reads by kubectl).
pub fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
