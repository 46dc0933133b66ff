//! Runs the built `ferrea-cni` binary the way a container runtime does: CNI_* environment, the
//! network configuration on stdin, the result or error on stdout, the exit status. A fake agent
//! (the generated `Cni` server on a unix socket in a temporary directory) stands in for
//! ferrea-agent.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrea_proto::cni::v1::cni_server::{Cni, CniServer};
use ferrea_proto::cni::v1::{CniError, CniRequest, CniResponse};
use serde_json::{Value, json};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// What the binary did.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?}; stderr {:?}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs the plugin with only the given variables set (nothing inherited from the test's environment).
fn plugin(command: &str, vars: &[(&str, &str)], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrea-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferrea-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// The same, off the async runtime that serves the fake agent.
async fn plugin_async(command: &str, vars: &[(&str, &str)], stdin: String) -> Run {
    let command = command.to_owned();
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        plugin(&command, &vars, &stdin)
    })
    .await
    .unwrap()
}

const POD_VARS: &[(&str, &str)] = &[
    ("CNI_CONTAINERID", "c0ffee"),
    ("CNI_NETNS", "/run/netns/pod-a"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=a"),
    ("CNI_PATH", "/opt/cni/bin"),
];

fn conf(version: &str, socket: &Path) -> String {
    json!({"cniVersion": version, "name": "pods", "type": "ferrea-cni", "agentSocket": socket})
        .to_string()
}

fn assert_failed(run: &Run, code: u64) -> Value {
    assert_eq!(
        run.code,
        Some(1),
        "exit status; stdout {:?} stderr {:?}",
        run.stdout,
        run.stderr
    );
    let doc = run.json();
    assert_eq!(doc["code"], code, "{doc}");
    assert!(doc["msg"].as_str().is_some_and(|m| !m.is_empty()), "{doc}");
    doc
}

#[test]
fn version_is_answered_locally() {
    let run = plugin(
        "VERSION",
        &[],
        r#"{"cniVersion":"1.1.0","name":"x","type":"ferrea-cni"}"#,
    );
    assert_eq!(run.code, Some(0));
    assert_eq!(
        run.json(),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    let run = plugin("VERSION", &[], r#"{"cniVersion":"0.3.1"}"#);
    assert_eq!(run.json()["cniVersion"], "0.3.1");
}

#[test]
fn add_without_agent_is_try_again_later() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("missing.sock");
    let run = plugin("ADD", POD_VARS, &conf("1.0.0", &socket));
    let doc = assert_failed(&run, 11);
    assert_eq!(doc["cniVersion"], "1.0.0");
    assert!(
        doc["msg"]
            .as_str()
            .unwrap()
            .contains(socket.to_str().unwrap()),
        "{doc}"
    );
    assert!(
        doc["details"].as_str().unwrap().contains("No such file"),
        "{doc}"
    );
}

#[test]
fn add_with_refused_connection_is_try_again_later() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("dead.sock");
    // The socket file stays after the listener is gone: connect() gets ECONNREFUSED.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let doc = assert_failed(&plugin("ADD", POD_VARS, &conf("1.1.0", &socket)), 11);
    assert!(
        doc["details"].as_str().unwrap().contains("refused"),
        "{doc}"
    );
}

#[test]
fn status_without_agent_is_plugin_not_available() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("missing.sock");
    assert_failed(&plugin("STATUS", &[], &conf("1.1.0", &socket)), 50);
}

#[test]
fn malformed_stdin_is_decoding_failure() {
    let doc = assert_failed(&plugin("ADD", POD_VARS, "{\"cniVersion\": "), 6);
    assert_eq!(doc["cniVersion"], "1.1.0");
}

#[test]
fn unsupported_version_is_incompatible() {
    for v in ["0.2.0", "9.9.9"] {
        let stdin = format!(r#"{{"cniVersion":"{v}","name":"n","type":"ferrea-cni"}}"#);
        let doc = assert_failed(&plugin("ADD", POD_VARS, &stdin), 1);
        assert!(doc["msg"].as_str().unwrap().contains(v), "{doc}");
    }
}

#[test]
fn missing_environment_is_named() {
    let stdin = r#"{"cniVersion":"1.1.0","name":"n","type":"ferrea-cni"}"#;
    let doc = assert_failed(
        &plugin(
            "ADD",
            &[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")],
            stdin,
        ),
        4,
    );
    assert!(doc["msg"].as_str().unwrap().contains("CNI_NETNS"), "{doc}");
    assert_failed(&plugin("FROB", &[], stdin), 4);
}

// ---- with a fake agent ----

/// How the fake agent answers every RPC.
#[derive(Clone)]
enum Reply {
    Result(Vec<u8>),
    Error(CniError),
    Status(Status),
    Sleep(Duration),
}

#[derive(Clone)]
struct FakeAgent {
    reply: Reply,
    seen: Arc<Mutex<Vec<(&'static str, CniRequest)>>>,
}

impl FakeAgent {
    async fn answer(
        &self,
        verb: &'static str,
        req: Request<CniRequest>,
    ) -> Result<Response<CniResponse>, Status> {
        self.seen.lock().unwrap().push((verb, req.into_inner()));
        match &self.reply {
            Reply::Result(r) => {
                // Like the agent: only ADD and CHECK carry a result.
                let result = if matches!(verb, "ADD" | "CHECK") {
                    r.clone()
                } else {
                    Vec::new()
                };
                Ok(Response::new(CniResponse {
                    result,
                    error: None,
                }))
            }
            Reply::Error(e) => Ok(Response::new(CniResponse {
                result: Vec::new(),
                error: Some(e.clone()),
            })),
            Reply::Status(s) => Err(s.clone()),
            Reply::Sleep(d) => {
                tokio::time::sleep(*d).await;
                Ok(Response::new(CniResponse::default()))
            }
        }
    }
}

#[tonic::async_trait]
impl Cni for FakeAgent {
    async fn add(&self, r: Request<CniRequest>) -> Result<Response<CniResponse>, Status> {
        self.answer("ADD", r).await
    }
    async fn del(&self, r: Request<CniRequest>) -> Result<Response<CniResponse>, Status> {
        self.answer("DEL", r).await
    }
    async fn check(&self, r: Request<CniRequest>) -> Result<Response<CniResponse>, Status> {
        self.answer("CHECK", r).await
    }
    async fn status(&self, r: Request<CniRequest>) -> Result<Response<CniResponse>, Status> {
        self.answer("STATUS", r).await
    }
    async fn gc(&self, r: Request<CniRequest>) -> Result<Response<CniResponse>, Status> {
        self.answer("GC", r).await
    }
}

/// A fake agent serving on `<tempdir>/cni.sock` until the test's runtime ends.
struct Agent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    seen: Arc<Mutex<Vec<(&'static str, CniRequest)>>>,
}

fn start_agent(reply: Reply) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let fake = FakeAgent {
        reply,
        seen: seen.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CniServer::new(fake))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    Agent {
        _dir: dir,
        socket,
        seen,
    }
}

/// The 1.1.0 result the real agent produces.
fn canned_result() -> Value {
    json!({
        "cniVersion": "1.1.0",
        "interfaces": [
            {"name": "fer-c0ffee", "mac": "02:00:00:00:00:01"},
            {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/pod-a"},
        ],
        "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
        "dns": {},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_result_is_converted_to_the_config_version() {
    let agent = start_agent(Reply::Result(serde_json::to_vec(&canned_result()).unwrap()));
    let stdin = conf("0.4.0", &agent.socket);
    let run = plugin_async("ADD", POD_VARS, stdin.clone()).await;
    assert_eq!(
        run.code,
        Some(0),
        "stdout {:?} stderr {:?}",
        run.stdout,
        run.stderr
    );
    assert_eq!(
        run.json(),
        json!({
            "cniVersion": "0.4.0",
            "interfaces": [
                {"name": "fer-c0ffee", "mac": "02:00:00:00:00:01"},
                {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/pod-a"},
            ],
            "ips": [{"version": "4", "address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
            "dns": {},
        })
    );
    // The request carried the environment and stdin verbatim.
    let seen = agent.seen.lock().unwrap();
    let (verb, req) = &seen[0];
    assert_eq!(*verb, "ADD");
    assert_eq!(req.container_id, "c0ffee");
    assert_eq!(req.netns, "/run/netns/pod-a");
    assert_eq!(req.ifname, "eth0");
    assert_eq!(req.args, "K8S_POD_NAMESPACE=default;K8S_POD_NAME=a");
    assert_eq!(req.path, "/opt/cni/bin");
    assert_eq!(req.network_config, stdin.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_result_in_1_1_0_passes_through() {
    let agent = start_agent(Reply::Result(serde_json::to_vec(&canned_result()).unwrap()));
    let run = plugin_async("ADD", POD_VARS, conf("1.1.0", &agent.socket)).await;
    assert_eq!(run.code, Some(0));
    assert_eq!(run.json(), canned_result());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_error_is_printed_with_its_code() {
    let agent = start_agent(Reply::Error(CniError {
        code: 7,
        msg: "no IPAM range for this node".into(),
        details: "podCIDR is empty".into(),
    }));
    let run = plugin_async("ADD", POD_VARS, conf("0.3.1", &agent.socket)).await;
    let doc = assert_failed(&run, 7);
    assert_eq!(
        doc,
        json!({"cniVersion": "0.3.1", "code": 7, "msg": "no IPAM range for this node", "details": "podCIDR is empty"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_is_internal() {
    let agent = start_agent(Reply::Status(Status::unimplemented("no such method")));
    let doc = assert_failed(
        &plugin_async("ADD", POD_VARS, conf("1.1.0", &agent.socket)).await,
        999,
    );
    assert!(
        doc["msg"].as_str().unwrap().contains("no such method"),
        "{doc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_the_agent_says_so() {
    let agent = start_agent(Reply::Status(Status::permission_denied(
        "ferrea-agent's CNI socket serves only root; the calling process runs as uid 65534",
    )));
    let doc = assert_failed(
        &plugin_async("ADD", POD_VARS, conf("1.1.0", &agent.socket)).await,
        999,
    );
    assert_eq!(
        doc["msg"],
        "ferrea-agent refused ADD: ferrea-agent's CNI socket serves only root; the calling process runs as uid 65534"
    );
    assert_eq!(doc["details"], "gRPC status PermissionDenied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbs_without_result_print_nothing() {
    let agent = start_agent(Reply::Result(serde_json::to_vec(&canned_result()).unwrap()));
    let del_vars = &[("CNI_CONTAINERID", "c0ffee"), ("CNI_IFNAME", "eth0")];
    for (verb, vars) in [
        ("DEL", &del_vars[..]),
        ("CHECK", POD_VARS),
        ("STATUS", &[]),
        ("GC", &[]),
    ] {
        let run = plugin_async(verb, vars, conf("1.1.0", &agent.socket)).await;
        assert_eq!(
            run.code,
            Some(0),
            "{verb}: stdout {:?} stderr {:?}",
            run.stdout,
            run.stderr
        );
        assert!(run.stdout.is_empty(), "{verb}: {:?}", run.stdout);
    }
    let verbs: Vec<_> = agent.seen.lock().unwrap().iter().map(|(v, _)| *v).collect();
    assert_eq!(verbs, ["DEL", "CHECK", "STATUS", "GC"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_agent_times_out_as_try_again_later() {
    let agent = start_agent(Reply::Sleep(Duration::from_secs(5)));
    let timeouts = ferrea_cni::client::Timeouts {
        connect: Duration::from_secs(2),
        request: Duration::from_millis(200),
    };
    let socket = agent.socket.to_str().unwrap().to_owned();
    let err = ferrea_cni::client::forward(
        &socket,
        ferrea_cni::env::Command::Del,
        CniRequest::default(),
        timeouts,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, 11, "{err:?}");
}

#[test]
fn debug_goes_to_stderr_only() {
    let stdin = r#"{"cniVersion":"1.1.0","name":"x","type":"ferrea-cni"}"#;
    let run = plugin("VERSION", &[("FERREA_CNI_DEBUG", "1")], stdin);
    assert_eq!(run.json()["cniVersion"], "1.1.0");
    assert!(run.stderr.contains("command=VERSION"), "{:?}", run.stderr);
}
