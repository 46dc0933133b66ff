//! A real etcd and kube-apiserver in a network namespace of their own, for tests of what the
//! API server itself does with ferrea's manifests (CRD schemas, printer columns, the status
//! subresource).
//!
//! [`ApiServer::start`] creates a [`NetNs`] (only `lo`, up), makes with `openssl` a CA, a
//! serving certificate (127.0.0.1, localhost, `kubernetes.default.svc`), a service-account key
//! pair and an admin client certificate (`O=system:masters`) in a temp dir, starts etcd and
//! kube-apiserver inside the namespace (entered with `setns` between fork and exec, as the
//! agent is, so each child's PID is the daemon's own), waits for `/readyz` and writes an admin
//! kubeconfig. [`ApiServer::kubectl`] runs the cached kubectl with it inside the namespace.
//!
//! The binaries come from the cache `scripts/k8s/build.sh` fills ([`k8s_bin`]); a missing one
//! is a failure that says to run the script, never a skip. Dropping the guard stops the
//! apiserver, then etcd, by their PIDs (SIGTERM, then SIGKILL after [`STOP_GRACE`]), removes
//! the temp dir and deletes the namespace, also while a failed assertion unwinds. Nothing is
//! created in, or changed in, the root network namespace; nothing is killed by name.
//!
//! [`ApiServer::start_in`] runs them in a namespace the test made already (a simulated node's),
//! so an agent there reaches the API at `https://127.0.0.1:6443` with [`ApiServer::kubeconfig_path`];
//! that namespace stays the caller's. [`ApiServer::stop_apiserver`] and
//! [`ApiServer::start_apiserver`] take the API server away and bring it back (etcd keeps the
//! data), for tests of what clients do meanwhile.
//!
//! [`ApiServer::start_on_fabric`] gives a cluster of simulated nodes a control plane: a
//! namespace of its own plugged into the fabric at [`CONTROL_PLANE_IP`], where the API server
//! listens (the address is in its certificate and in every kubeconfig), so each node's agent
//! reaches it over the node's transport interface, as on a real cluster.

use std::fs::File;
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::netns::NetNs;

/// How long [`ApiServer::start`] waits for `/readyz` to say `ok`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the guard waits after SIGTERM before SIGKILL, per process.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// The same for kube-apiserver: v1.37.2 here stops listening and shuts its controllers down
/// within milliseconds of SIGTERM, then lingers (seen: more than 10 s) with nothing left to
/// write (etcd holds all state), so it gets SIGKILL sooner.
pub const APISERVER_STOP_GRACE: Duration = Duration::from_secs(2);

/// The apiserver's port (on 127.0.0.1 inside its namespace, or on [`CONTROL_PLANE_IP`]).
pub const PORT: u16 = 6443;

/// The control plane's address on the fabric ([`ApiServer::start_on_fabric`]).
pub const CONTROL_PLANE_IP: Ipv4Addr = crate::fabric::CONTROL_PLANE_IP;

/// The service CIDR; its first address is the `kubernetes` Service's, in the serving cert.
const SERVICE_CIDR: &str = "10.96.0.0/16";
const SERVICE_IP: &str = "10.96.0.1";

/// The Kubernetes release `scripts/k8s/build.sh` builds (its `K8S_VERSION=` line), which names
/// the cache directory.
pub fn k8s_version() -> &'static str {
    const BUILD_SH: &str = include_str!("../../scripts/k8s/build.sh");
    BUILD_SH
        .lines()
        .find_map(|l| l.strip_prefix("K8S_VERSION="))
        .map(str::trim)
        .expect("scripts/k8s/build.sh has a K8S_VERSION= line")
}

/// The directory `scripts/k8s/build.sh` builds into:
/// `${FERREA_CACHE:-$HOME/.cache/ferrea}/k8s/<version>/bin`.
pub fn k8s_bin_dir() -> PathBuf {
    let root = match std::env::var_os("FERREA_CACHE").filter(|v| !v.is_empty()) {
        Some(c) => PathBuf::from(c),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is set (or set FERREA_CACHE)");
            PathBuf::from(home).join(".cache/ferrea")
        }
    };
    root.join("k8s").join(k8s_version()).join("bin")
}

/// Path of the cached Kubernetes binary `name` (`kube-apiserver`, `kubectl`, `etcd`, ...).
/// Panics, saying how to build it, when it is not there.
pub fn k8s_bin(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = k8s_bin_dir().join(name);
    let executable =
        std::fs::metadata(&p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    assert!(
        executable,
        "{} not found: run `scripts/k8s/build.sh kube-apiserver kubectl etcd kube-proxy` first (it builds the \
         Kubernetes {} binaries into the cache once; FERREA_CACHE moves the cache)",
        p.display(),
        k8s_version()
    );
    p
}

/// A running etcd + kube-apiserver in a namespace of their own (see the module doc).
pub struct ApiServer {
    apiserver: Option<Child>,
    etcd: Option<Child>,
    /// PIDs of everything started, for checks that nothing outlives the guard.
    pids: Vec<u32>,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    /// Certificates, etcd's data, logs, kubeconfig, kubectl's discovery cache. Dropped after
    /// the processes are stopped (Drop::drop runs before the fields are dropped).
    dir: tempfile::TempDir,
    /// The namespace, when the guard made it (and deletes it); `None` with
    /// [`ApiServer::start_in`]. Held for its Drop only.
    _own_ns: Option<NetNs>,
    ns_name: String,
    /// Where the API server listens (and what the kubeconfigs name).
    ip: Ipv4Addr,
    /// Flags added to kube-apiserver's own.
    extra_args: Vec<String>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("netns", &self.ns_name)
            .field("pids", &self.pids)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl ApiServer {
    /// Starts etcd and kube-apiserver and returns once `/readyz` says `ok`. Panics (with the
    /// logs' last lines) when something fails; whatever was started is stopped then.
    pub fn start() -> Self {
        let ns = NetNs::new("k8s").expect("creating the apiserver's network namespace");
        let name = ns.name().to_owned();
        Self::launch(Some(ns), name, Ipv4Addr::LOCALHOST, Vec::new())
    }

    /// [`ApiServer::start`] in a control-plane namespace plugged into `fabric` at
    /// [`CONTROL_PLANE_IP`], listening there: every node on the fabric reaches it.
    pub fn start_on_fabric(fabric: &crate::fabric::Fabric) -> Self {
        Self::start_on_fabric_with(fabric, &[])
    }

    /// [`ApiServer::start_on_fabric`] with kube-apiserver flags of the test's
    /// (`--watch-cache=false`, say).
    pub fn start_on_fabric_with(fabric: &crate::fabric::Fabric, extra_args: &[&str]) -> Self {
        let ns = fabric
            .add_host_ns("cp", CONTROL_PLANE_IP)
            .expect("plugging the control plane into the fabric");
        let name = ns.name().to_owned();
        Self::launch(
            Some(ns),
            name,
            CONTROL_PLANE_IP,
            extra_args.iter().map(|a| (*a).to_owned()).collect(),
        )
    }

    /// The revision etcd is at now, through its JSON gateway on 127.0.0.1:2379 in the
    /// namespace.
    pub fn etcd_revision(&self) -> u64 {
        let out = self.etcd_call("range", r#"{"key":"Zg=="}"#);
        out["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no revision in etcd's answer: {out}"))
    }

    /// Compacts etcd's history up to `revision` (physically): watches from an older resource
    /// version then fail with 410 Gone when kube-apiserver serves them from etcd
    /// (`--watch-cache=false`).
    pub fn compact_etcd(&self, revision: u64) {
        self.etcd_call(
            "compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        );
    }

    fn etcd_call(&self, op: &str, body: &str) -> serde_json::Value {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "-X",
            "POST",
            "-d",
            body,
        ])
        .arg(format!("http://127.0.0.1:2379/v3/kv/{op}"));
        crate::netns::enter_on_spawn(&mut cmd, &self.ns_name)
            .expect("entering the apiserver's namespace");
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("running curl for etcd's {op}: {e}"));
        assert!(
            out.status.success(),
            "etcd {op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("etcd {op} answered no JSON ({e}): {:?}", out.stdout))
    }

    /// The address the API server listens on (what the kubeconfigs name).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// [`ApiServer::start`] inside `ns`, a namespace the caller made and keeps (it must have
    /// `lo` up and nothing on 127.0.0.1 ports 2379, 2380 and 6443). The guard stops the
    /// processes but leaves the namespace; drop the guard before the namespace.
    pub fn start_in(ns: &NetNs) -> Self {
        Self::launch(None, ns.name().to_owned(), Ipv4Addr::LOCALHOST, Vec::new())
    }

    fn launch(
        own_ns: Option<NetNs>,
        ns_name: String,
        ip: Ipv4Addr,
        extra_args: Vec<String>,
    ) -> Self {
        let etcd_bin = k8s_bin("etcd");
        let kubectl = k8s_bin("kubectl");
        let dir = tempfile::Builder::new()
            .prefix("ferrea-apiserver-")
            .tempdir()
            .expect("creating the apiserver's temp dir");
        let kubeconfig = dir.path().join("admin.kubeconfig");
        let mut s = ApiServer {
            apiserver: None,
            etcd: None,
            pids: Vec::new(),
            kubectl,
            kubeconfig,
            dir,
            _own_ns: own_ns,
            ns_name,
            ip,
            extra_args,
        };
        let pki = s.dir.path().join("pki");
        make_pki(&pki, ip);
        s.write_kubeconfig(&pki);

        let etcd = s.spawn(
            &etcd_bin,
            "etcd",
            &[
                "--name=ferrea-test",
                &format!("--data-dir={}", s.dir.path().join("etcd-data").display()),
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=ferrea-test=http://127.0.0.1:2380",
            ],
        );
        s.etcd = Some(etcd);
        s.wait_etcd();
        s.start_apiserver();
        s
    }

    /// Stops kube-apiserver (SIGTERM by its PID, then SIGKILL); etcd keeps running.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            stop("kube-apiserver", &mut c, APISERVER_STOP_GRACE);
        }
    }

    /// Starts kube-apiserver (again, after [`ApiServer::stop_apiserver`]) and waits until
    /// `/readyz` says `ok`.
    pub fn start_apiserver(&mut self) {
        assert!(self.apiserver.is_none(), "kube-apiserver already runs");
        let apiserver_bin = k8s_bin("kube-apiserver");
        let pki = self.dir.path().join("pki");
        let s = self;
        let p = |f: &str| pki.join(f).display().to_string();
        let extra = s.extra_args.clone();
        let mut args: Vec<String> = vec![
            "--etcd-servers=http://127.0.0.1:2379".to_owned(),
            format!("--bind-address={}", s.ip),
            format!("--advertise-address={}", s.ip),
            format!("--secure-port={PORT}"),
            // Loopback is the only address in the namespace, and the endpoint reconciler
            // refuses it for the `kubernetes` Service's endpoints.
            "--endpoint-reconciler-type=none".to_owned(),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=Node,RBAC".to_owned(),
            "--allow-privileged=true".to_owned(),
            format!(
                "--cert-dir={}",
                s.dir.path().join("apiserver-certs").display()
            ),
            "--profiling=false".to_owned(),
        ];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let apiserver = s.spawn(&apiserver_bin, "apiserver", &args);
        s.apiserver = Some(apiserver);
        s.wait_ready();
    }

    /// Runs the cached kubectl with the admin kubeconfig inside the namespace; returns its
    /// output whatever the exit status.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running kubectl {args:?}: {e}"))
    }

    /// [`ApiServer::kubectl`] with `input` on its stdin (for `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        crate::netns::output_with_stdin(&mut self.kubectl_cmd(args), input.as_bytes())
            .unwrap_or_else(|e| panic!("running kubectl {args:?}: {e}"))
    }

    /// Runs kubectl and panics (with its stderr) unless it exits 0; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        checked(args, self.kubectl(args))
    }

    /// [`ApiServer::kubectl_stdin`] that panics (with its stderr) unless it exits 0.
    pub fn kubectl_stdin_ok(&self, args: &[&str], input: &str) -> String {
        checked(args, self.kubectl_stdin(args, input))
    }

    /// Creates the `default` namespace's `default` service account, as kube-controller-manager
    /// would (the ServiceAccount admission plugin wants it before it admits a Pod); panics
    /// unless it is there afterwards.
    pub fn create_default_service_account(&self) {
        let sa = self.kubectl(&["create", "serviceaccount", "default", "-n", "default"]);
        let stderr = String::from_utf8_lossy(&sa.stderr);
        assert!(
            sa.status.success() || stderr.contains("AlreadyExists"),
            "creating the default service account: {stderr}"
        );
    }

    /// The admin kubeconfig (`system:masters`), valid inside the namespace.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig that authenticates as service account `ns/sa` (a bearer token from
    /// `kubectl create token`, valid for an hour) with this server's CA, valid inside the
    /// namespace; written next to the admin kubeconfig.
    pub fn service_account_kubeconfig(&self, ns: &str, sa: &str) -> PathBuf {
        let token = self.kubectl_ok(&["create", "token", sa, "-n", ns, "--duration=1h"]);
        let token = token.trim();
        assert!(
            !token.is_empty(),
            "kubectl create token {sa} -n {ns}: no token"
        );
        let ca = self.dir.path().join("pki").join("ca.crt");
        let path = self.dir.path().join(format!("{ns}-{sa}.kubeconfig"));
        let text = kubeconfig(self.ip, &ca, sa, &format!("token: {token}"));
        std::fs::write(&path, text).expect("writing the service account's kubeconfig");
        path
    }

    /// The directory of the harness's certificates and keys: `ca.crt`, `ca.key`, `sa.key`
    /// (the service-account signing key), `sa.pub`, ... (kube-controller-manager's
    /// `--root-ca-file` and `--service-account-private-key-file`).
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// The name of the namespace etcd and the apiserver run in.
    pub fn netns_name(&self) -> &str {
        &self.ns_name
    }

    /// The PIDs of etcd and kube-apiserver (the daemons' own).
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// The last `n` lines of etcd's and the apiserver's logs.
    pub fn log_tails(&self, n: usize) -> String {
        ["apiserver", "etcd"]
            .iter()
            .map(|name| {
                let text =
                    std::fs::read_to_string(self.log_path(name)).unwrap_or_else(|e| e.to_string());
                let lines: Vec<&str> = text.lines().collect();
                format!(
                    "--- last lines of {name}.log ---\n{}",
                    lines[lines.len().saturating_sub(n)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The kubectl [`Command`] [`ApiServer::kubectl`] runs, for callers that stream its
    /// output (`kubectl get -w`); it enters the namespace when spawned.
    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            // Discovery is cached here, not under $HOME/.kube.
            .arg(format!(
                "--cache-dir={}",
                self.dir.path().join("kube-cache").display()
            ))
            .arg("--request-timeout=30s")
            .args(args)
            .env_remove("KUBECONFIG");
        crate::netns::enter_on_spawn(&mut cmd, &self.ns_name)
            .expect("entering the apiserver's namespace");
        cmd
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Starts `bin` inside the namespace with its output in `<name>.log`, and checks that the
    /// child's PID is that binary.
    fn spawn(&mut self, bin: &Path, name: &str, args: &[&str]) -> Child {
        let log = File::create(self.log_path(name))
            .unwrap_or_else(|e| panic!("creating {name}.log: {e}"));
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log);
        crate::netns::enter_on_spawn(&mut cmd, &self.ns_name)
            .expect("entering the apiserver's namespace");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        self.pids.push(child.id());
        // spawn() returns after the exec, so the PID is the binary's by now.
        let exe = std::fs::read_link(format!("/proc/{}/exe", child.id()));
        if !exe.as_deref().is_ok_and(|e| e == bin) {
            stop(name, &mut child, STOP_GRACE);
            panic!("pid {} is not {} but {exe:?}", child.id(), bin.display());
        }
        child
    }

    /// Fails (with the logs) if `child` has exited.
    fn check_running(&mut self, which: &str) {
        let child = match which {
            "etcd" => self.etcd.as_mut(),
            _ => self.apiserver.as_mut(),
        };
        if let Some(c) = child
            && let Ok(Some(st)) = c.try_wait()
        {
            panic!(
                "{which} exited during start-up ({st})\n{}",
                self.log_tails(30)
            );
        }
    }

    /// Waits (at most 30 s) until etcd accepts connections on 127.0.0.1:2379.
    fn wait_etcd(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let path = crate::netns::path_of(&self.ns_name);
            let up = std::thread::spawn(move || {
                use std::os::fd::AsFd;
                // Only this short-lived thread enters the namespace.
                let fd = File::open(&path).expect("opening the apiserver's namespace");
                nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("entering the apiserver's namespace");
                TcpStream::connect_timeout(&([127, 0, 0, 1], 2379).into(), Duration::from_secs(1))
                    .is_ok()
            })
            .join()
            .expect("the etcd probe thread");
            if up {
                return;
            }
            self.check_running("etcd");
            assert!(
                Instant::now() < deadline,
                "etcd not listening on 127.0.0.1:2379 within 30 s\n{}",
                self.log_tails(30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits (at most [`READY_TIMEOUT`]) until `/readyz` says `ok`.
    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            let out = self.kubectl(&["get", "--raw", "/readyz", "--request-timeout=5s"]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && stdout.trim() == "ok" {
                eprintln!(
                    "harness: kube-apiserver ready after {:.1}s (netns {}, pids {:?})",
                    start.elapsed().as_secs_f64(),
                    self.ns_name,
                    self.pids
                );
                return;
            }
            let last = format!(
                "{}{}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            self.check_running("etcd");
            self.check_running("apiserver");
            if start.elapsed() >= READY_TIMEOUT {
                let verbose = self.kubectl(&["get", "--raw", "/readyz?verbose"]);
                panic!(
                    "kube-apiserver /readyz not ok within {READY_TIMEOUT:?} (last: {last})\n{}\n{}",
                    String::from_utf8_lossy(&verbose.stdout),
                    self.log_tails(30)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn write_kubeconfig(&self, pki: &Path) {
        let p = |f: &str| pki.join(f).display().to_string();
        let creds = format!(
            "client-certificate: {}\n    client-key: {}",
            p("admin.crt"),
            p("admin.key")
        );
        let text = kubeconfig(self.ip, &pki.join("ca.crt"), "admin", &creds);
        std::fs::write(&self.kubeconfig, text).expect("writing the kubeconfig");
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // The apiserver first: it is etcd's client.
        self.stop_apiserver();
        if let Some(mut c) = self.etcd.take() {
            stop("etcd", &mut c, STOP_GRACE);
        }
        // Then the fields: the temp dir is removed and the namespace (if it is the guard's)
        // deleted.
    }
}

/// SIGTERM to the child's PID, then SIGKILL after [`STOP_GRACE`]; reaps it.
fn stop(name: &str, child: &mut Child, grace: Duration) {
    let pid = Pid::from_raw(child.id() as i32);
    if matches!(child.try_wait(), Ok(None)) {
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!("harness: {name} pid {pid} still runs {grace:?} after SIGTERM; SIGKILL");
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
    if let Err(e) = child.wait() {
        eprintln!("harness: reaping {name} pid {pid}: {e}");
    }
}

fn checked(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "kubectl {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `openssl <args>` in `dir` (`args` split at whitespace: file names are relative to
/// `dir`); panics with its stderr unless it exits 0.
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running openssl (scripts/setup.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "openssl {args} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The simulated node's `Node` object in the API: name, `spec.podCIDR`, and the `InternalIP`
/// in `status.addresses` (through the status subresource, as a kubelet writes it).
pub fn create_node_object(api: &ApiServer, node: &crate::node::Node) {
    api.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nspec: {{podCIDR: {}}}\n",
            node.name(),
            node.pod_cidr()
        ),
    );
    api.kubectl_ok(&[
        "patch",
        "node",
        node.name(),
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(
            r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"{}"}}]}}}}"#,
            node.ip()
        ),
    ]);
}

/// The agent's service account.
pub const AGENT_SA: (&str, &str) = ("ferrea-system", "ferrea-agent");

/// Applies `deploy/`'s namespace, service account and RBAC (the DaemonSet's identity and its
/// ClusterRole) and returns a kubeconfig with a token of that service account.
pub fn install_agent_identity(api: &ApiServer) -> PathBuf {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for f in [
        "00-namespace.yaml",
        "10-serviceaccount.yaml",
        "20-rbac.yaml",
    ] {
        api.kubectl_ok(&["apply", "-f", &deploy.join(f).display().to_string()]);
    }
    let who = format!("system:serviceaccount:{}:{}", AGENT_SA.0, AGENT_SA.1);
    let can = api.kubectl(&["auth", "can-i", "list", "pods", "--as", &who]);
    assert!(
        String::from_utf8_lossy(&can.stdout).trim() == "yes",
        "the ClusterRoleBinding does not grant {who} anything yet"
    );
    api.service_account_kubeconfig(AGENT_SA.0, AGENT_SA.1)
}

/// Makes in `dir`: a CA (`ca.crt`, `ca.key`), the apiserver's serving certificate, the admin
/// client certificate (`O=system:masters`) and the service-account key pair (`sa.key`,
/// `sa.pub`). Valid for a day.
fn make_pki(dir: &Path, ip: Ipv4Addr) {
    std::fs::create_dir_all(dir).expect("creating the pki dir");
    openssl(
        dir,
        "req -x509 -newkey rsa:2048 -nodes -days 1 -keyout ca.key -out ca.crt \
         -subj /CN=ferrea-test-ca -addext basicConstraints=critical,CA:TRUE \
         -addext keyUsage=critical,keyCertSign,cRLSign",
    );
    let sign = |name: &str, subject: &str, ext: String| {
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("writing an openssl extfile");
        openssl(
            dir,
            &format!(
                "req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj {subject}"
            ),
        );
        openssl(
            dir,
            &format!(
                "x509 -req -days 1 -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
                 -out {name}.crt -extfile {name}.ext"
            ),
        );
    };
    sign(
        "apiserver",
        "/CN=kube-apiserver",
        format!(
            "basicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\n\
             subjectAltName=IP:127.0.0.1,IP:{ip},IP:{SERVICE_IP},DNS:localhost,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc,\
             DNS:kubernetes.default.svc.cluster.local\n"
        ),
    );
    sign(
        "admin",
        "/O=system:masters/CN=ferrea-test-admin",
        "basicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=clientAuth\n"
            .to_owned(),
    );
    openssl(
        dir,
        "genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key",
    );
    openssl(dir, "pkey -in sa.key -pubout -out sa.pub");
}

/// A kubeconfig for this server (its CA at `ca`) as `user`, whose credentials are the YAML
/// lines `creds` (indented under `user:`).
fn kubeconfig(ip: Ipv4Addr, ca: &Path, user: &str, creds: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: ferrea-test\n  cluster:\n    server: https://{ip}:{PORT}\n    certificate-authority: {ca}\n\
         users:\n\
         - name: {user}\n  user:\n    {creds}\n\
         contexts:\n\
         - name: ferrea-test\n  context: {{cluster: ferrea-test, user: {user}}}\n\
         current-context: ferrea-test\n",
        ca = ca.display(),
    )
}
