//! The CNI gRPC service (`ferrea.cni.v1.Cni`) on the agent's unix socket.
//!
//! It decodes what the runtime handed `ferrea-cni` (the CNI_* values and the network
//! configuration bytes), hands the work to the [`PodManager`], and encodes the result as a CNI
//! 1.1.0 result, or the error with its CNI code ([`RequestError::cni_code`]).
//!
//! Every operation runs in its own task, so a runtime that gives up on a request (the binary's
//! timeout, a killed kubelet) cannot cancel it half-way: ADD either completes or rolls back.
//! Until the agent is ready (node known, dataplane initialised, reconciled) every request gets
//! `TRY_AGAIN_LATER`.
//!
//! Hostile or broken clients ([`serve`]): the socket is root-only by its mode, and every request
//! of a peer whose `SO_PEERCRED` uid is not 0 is answered `PERMISSION_DENIED` naming the uid
//! before its body is read; a message larger than [`MAX_REQUEST_BYTES`] is refused
//! (`OUT_OF_RANGE`) before it is decoded, a network configuration larger than
//! [`MAX_NETWORK_CONFIG_BYTES`] gets code 7, and a body that is no `CniRequest` gets
//! `INTERNAL` from the decoder. Each of these fails only that request: every connection and
//! request is served on its own.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use ferrea_proto::cni::v1::cni_server::CniServer;
use ferrea_proto::cni::v1::{CniError, CniRequest, CniResponse, ErrorCode, cni_server::Cni};
pub use ferrea_proto::cni::{MAX_NETWORK_CONFIG_BYTES, MAX_REQUEST_BYTES};
use ipnetwork::IpNetwork;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::codegen::InterceptedService;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cni::error::RequestError;
use crate::metrics::Metrics;
use crate::pods::check::{PrevInterface, PrevIp, PrevResult, PrevRoute};
use crate::pods::podnet::fmt_mac;
use crate::pods::store::PodRecord;
use crate::pods::{AddArgs, PodManager, Requested, Requests, StaticIp};

/// Serves `service` on `listener` until the task is dropped: requests of non-root peers are
/// refused, messages are limited to [`MAX_REQUEST_BYTES`] (see the module doc).
pub async fn serve(
    listener: UnixListener,
    service: CniService,
) -> Result<(), tonic::transport::Error> {
    let cni = CniServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        .add_service(InterceptedService::new(cni, require_root))
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await
}

/// Lets a request through only if its connection's peer is root (`SO_PEERCRED`, which tonic
/// reads at accept into [`UdsConnectInfo`]). A peer whose credentials are unknown is refused.
fn require_root(req: Request<()>) -> Result<Request<()>, Status> {
    let cred = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred);
    match cred {
        Some(c) if c.uid() == 0 => Ok(req),
        Some(c) => {
            let pid = c.pid().map(|p| format!(", pid {p}")).unwrap_or_default();
            tracing::warn!(
                uid = c.uid(),
                pid = ?c.pid(),
                "CNI socket: refused a request from a non-root process"
            );
            Err(Status::permission_denied(format!(
                "ferrea-agent's CNI socket serves only root; the calling process runs as uid {}{pid}",
                c.uid()
            )))
        }
        None => {
            tracing::warn!("CNI socket: refused a request whose peer is unknown");
            Err(Status::permission_denied(
                "ferrea-agent's CNI socket serves only root; the calling process's credentials (SO_PEERCRED) are unknown",
            ))
        }
    }
}

/// The versions of the CNI spec whose configurations the agent accepts.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Whether the agent can serve pods yet.
#[derive(Clone)]
pub enum Readiness {
    /// Still starting; the text says what it waits for (or what failed and is being retried),
    /// and is what runtimes see in the `TRY_AGAIN_LATER` error.
    Starting(String),
    /// Serving.
    Ready(Arc<PodManager>),
}

/// The CNI service. Cheap to clone.
#[derive(Clone)]
pub struct CniService {
    ready: watch::Receiver<Readiness>,
    metrics: Metrics,
}

impl CniService {
    /// A service that answers `TRY_AGAIN_LATER` until `ready` holds a manager.
    pub fn new(ready: watch::Receiver<Readiness>) -> Self {
        Self {
            ready,
            metrics: Metrics::new(),
        }
    }

    /// Counts requests in `metrics` (by verb and result, with their latency).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    fn manager(&self) -> Result<Arc<PodManager>, RequestError> {
        match &*self.ready.borrow() {
            Readiness::Ready(pm) => Ok(pm.clone()),
            Readiness::Starting(why) => Err(RequestError::NotReady(why.clone())),
        }
    }
}

/// The parts of the network configuration the agent uses.
#[derive(Debug)]
struct NetConf {
    raw: Value,
}

fn parse_netconf(bytes: &[u8]) -> Result<NetConf, RequestError> {
    let raw: Value =
        serde_json::from_slice(bytes).map_err(|e| RequestError::Decoding(e.to_string()))?;
    if !raw.is_object() {
        return Err(RequestError::Decoding(
            "the network configuration must be a JSON object".into(),
        ));
    }
    let version = raw.get("cniVersion").and_then(Value::as_str).unwrap_or("");
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(RequestError::IncompatibleVersion(format!(
            "field `cniVersion`: {version:?} is not one of {SUPPORTED_VERSIONS:?}"
        )));
    }
    for f in ["name", "type"] {
        match raw.get(f) {
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => {
                return Err(RequestError::InvalidConfig(format!(
                    "field `{f}` must be a non-empty string"
                )));
            }
        }
    }
    if let Some(s) = raw.get("agentSocket")
        && !s.is_string()
    {
        return Err(RequestError::InvalidConfig(
            "field `agentSocket` must be a string".into(),
        ));
    }
    Ok(NetConf { raw })
}

/// Validates CNI_CONTAINERID and CNI_IFNAME as the spec defines them.
fn validate_ids(container_id: &str, ifname: &str) -> Result<(), RequestError> {
    if container_id.is_empty()
        || !container_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        || !container_id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return Err(RequestError::InvalidEnv(format!(
            "CNI_CONTAINERID {container_id:?} must start with a letter or digit and contain only letters, digits, '_', '.' and '-'"
        )));
    }
    if ifname.is_empty()
        || ifname.len() > 15
        || ifname == "."
        || ifname == ".."
        || ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(RequestError::InvalidEnv(format!(
            "CNI_IFNAME {ifname:?} is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
        )));
    }
    Ok(())
}

/// The `K=V` pairs of CNI_ARGS (`K=V;K=V`), in order. Entries without `=` are skipped and
/// unknown keys ignored, whether `IgnoreUnknown` is set or not (as ferrea always did).
fn cni_args(args: &str) -> impl Iterator<Item = (&str, &str)> {
    args.split(';').filter_map(|kv| kv.split_once('='))
}

/// Parses CNI_ARGS (`K=V;K=V`) for the Kubernetes pod identity.
fn pod_identity(args: &str) -> (String, String) {
    let mut ns = String::new();
    let mut name = String::new();
    for kv in cni_args(args) {
        match kv {
            ("K8S_POD_NAMESPACE", v) => ns = v.to_owned(),
            ("K8S_POD_NAME", v) => name = v.to_owned(),
            _ => {}
        }
    }
    (ns, name)
}

/// The error for a malformed requested value: code 4 from CNI_ARGS, 7 from the configuration.
fn malformed(from_env: bool, msg: String) -> RequestError {
    if from_env {
        RequestError::InvalidEnv(msg)
    } else {
        RequestError::InvalidConfig(msg)
    }
}

/// Parses a list of requested addresses (`10.244.1.9`, `10.244.1.9/24`; CNI_ARGS `IP` may be a
/// comma-separated list, as host-local reads it): exactly one IPv4 address.
fn parse_static_ip(
    items: &[&str],
    origin: String,
    from_env: bool,
) -> Result<Requested<StaticIp>, RequestError> {
    let mut found: Option<StaticIp> = None;
    for item in items {
        let item = item.trim();
        let (ip, prefix_len) = match item.split_once('/') {
            Some((ip, p)) => match p.parse::<u8>() {
                Ok(p) => (ip, Some(p)),
                Err(_) => {
                    return Err(malformed(
                        from_env,
                        format!("{origin}: {item:?} has no valid prefix length"),
                    ));
                }
            },
            None => (item, None),
        };
        let ip = match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ip,
            Ok(IpAddr::V6(_)) => {
                return Err(malformed(
                    from_env,
                    format!(
                        "{origin}: {item} refused: ferrea allocates IPv4 addresses only (this node's pod CIDR is IPv4)"
                    ),
                ));
            }
            Err(_) => {
                return Err(malformed(
                    from_env,
                    format!(
                        "{origin}: {item:?} is not an IPv4 address (write a.b.c.d or a.b.c.d/prefix)"
                    ),
                ));
            }
        };
        if prefix_len.is_some_and(|p| p > 32) {
            return Err(malformed(
                from_env,
                format!("{origin}: {item:?} has no valid prefix length"),
            ));
        }
        if found.is_some() {
            return Err(malformed(
                from_env,
                format!("{origin} refused: ferrea gives an interface exactly one IPv4 address"),
            ));
        }
        found = Some(StaticIp { ip, prefix_len });
    }
    match found {
        Some(value) => Ok(Requested {
            value,
            origin,
            from_env,
        }),
        None => Err(malformed(from_env, format!("{origin}: no address given"))),
    }
}

/// Parses a requested MAC (`aa:bb:cc:dd:ee:ff`, `-` also accepted as the separator).
fn parse_static_mac(
    text: &str,
    origin: String,
    from_env: bool,
) -> Result<Requested<[u8; 6]>, RequestError> {
    let parts: Vec<&str> = text.trim().split([':', '-']).collect();
    let mut mac = [0u8; 6];
    let ok = parts.len() == 6
        && parts
            .iter()
            .zip(mac.iter_mut())
            .all(|(p, b)| p.len() == 2 && u8::from_str_radix(p, 16).map(|v| *b = v).is_ok());
    if !ok {
        return Err(malformed(
            from_env,
            format!("{origin}: {text:?} is not a MAC address (write aa:bb:cc:dd:ee:ff)"),
        ));
    }
    Ok(Requested {
        value: mac,
        origin,
        from_env,
    })
}

/// The strings of a JSON list of strings at `field` (`None` when absent, null or empty).
fn string_list<'a>(
    v: Option<&'a Value>,
    field: &str,
) -> Result<Option<Vec<&'a str>>, RequestError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().ok_or_else(|| {
                    RequestError::InvalidConfig(format!(
                        "field `{field}` must be a list of strings"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(RequestError::InvalidConfig(format!(
            "field `{field}` must be a list of strings"
        ))),
    }
}

/// A JSON string at `field` (`None` when absent, null or empty).
fn string_field<'a>(v: Option<&'a Value>, field: &str) -> Result<Option<&'a str>, RequestError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RequestError::InvalidConfig(format!(
            "field `{field}` must be a string"
        ))),
    }
}

/// The static IP and MAC the runtime asked for: CNI_ARGS `IP` and `MAC` (podman's `--ip` and
/// `--mac-address`), the configuration's `args.cni.ips` / `args.cni.mac` and the `ips` / `mac`
/// capabilities in `runtimeConfig`. Sources that give different values are refused.
#[expect(
    clippy::type_complexity,
    reason = "a pair of optional requests, named at the call site"
)]
fn requested(
    args: &str,
    conf: &NetConf,
) -> Result<(Option<Requested<StaticIp>>, Option<Requested<[u8; 6]>>), RequestError> {
    let mut ips = Vec::new();
    let mut macs = Vec::new();
    for (k, v) in cni_args(args) {
        match k {
            "IP" => {
                let items: Vec<&str> = v.split(',').collect();
                ips.push(parse_static_ip(&items, format!("CNI_ARGS IP={v}"), true)?);
            }
            "MAC" => macs.push(parse_static_mac(v, format!("CNI_ARGS MAC={v}"), true)?),
            _ => {}
        }
    }
    for (path, at) in [
        ("args.cni", conf.raw.get("args").and_then(|a| a.get("cni"))),
        ("runtimeConfig", conf.raw.get("runtimeConfig")),
    ] {
        let Some(at) = at else { continue };
        let field = format!("{path}.ips");
        if let Some(list) = string_list(at.get("ips"), &field)? {
            let origin = format!("{field} {}", json!(list));
            ips.push(parse_static_ip(&list, origin, false)?);
        }
        let field = format!("{path}.mac");
        if let Some(mac) = string_field(at.get("mac"), &field)? {
            macs.push(parse_static_mac(mac, format!("{field} {mac:?}"), false)?);
        }
    }
    fn one<T: PartialEq>(
        mut all: Vec<Requested<T>>,
        what: &str,
    ) -> Result<Option<Requested<T>>, RequestError> {
        if let Some(other) = all.iter().skip(1).find(|r| r.value != all[0].value) {
            return Err(RequestError::InvalidConfig(format!(
                "{} and {} ask for different {what}",
                all[0].origin, other.origin
            )));
        }
        Ok((!all.is_empty()).then(|| all.swap_remove(0)))
    }
    Ok((one(ips, "addresses")?, one(macs, "MACs")?))
}

/// Decodes `prevResult` (CHECK). Missing is an error: the spec's CHECK needs the cached result
/// of ADD, which every runtime executing a configuration list passes.
fn prev_result(conf: &NetConf) -> Result<PrevResult, RequestError> {
    let bad = |field: String, what: &str| {
        RequestError::InvalidConfig(format!("field `prevResult{field}`: {what}"))
    };
    let prev = match conf.raw.get("prevResult") {
        None | Some(Value::Null) => {
            return Err(RequestError::InvalidConfig(
                "CHECK needs `prevResult`, the result of ADD (CNI spec 1.1, CHECK); the network configuration has none".into(),
            ));
        }
        Some(Value::Object(o)) => o,
        Some(_) => return Err(bad(String::new(), "must be a JSON object")),
    };
    let list = |key: &str| -> Result<Vec<Value>, RequestError> {
        match prev.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => Ok(a.clone()),
            Some(_) => Err(bad(format!(".{key}"), "must be a list")),
        }
    };
    let cidr = |v: Option<&Value>, field: String| -> Result<IpNetwork, RequestError> {
        v.and_then(Value::as_str)
            .and_then(|s| s.parse::<IpNetwork>().ok().filter(|_| s.contains('/')))
            .ok_or_else(|| bad(field, "must be an address in CIDR notation"))
    };
    let ip = |v: Option<&Value>, field: String| -> Result<Option<IpAddr>, RequestError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| bad(field, "must be an IP address")),
            Some(_) => Err(bad(field, "must be an IP address")),
        }
    };
    let mut out = PrevResult::default();
    for (i, itf) in list("interfaces")?.iter().enumerate() {
        let f = |k: &str| format!(".interfaces[{i}].{k}");
        let name = itf
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad(f("name"), "must be a non-empty string"))?;
        let mac = match itf
            .get("mac")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
        {
            None => None,
            Some(m) => Some(
                parse_static_mac(m, String::new(), false)
                    .map_err(|_| bad(f("mac"), "must be a MAC address"))?
                    .value,
            ),
        };
        let sandbox = itf
            .get("sandbox")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        out.interfaces.push(PrevInterface {
            name: name.to_owned(),
            mac,
            sandbox,
        });
    }
    for (i, e) in list("ips")?.iter().enumerate() {
        let f = |k: &str| format!(".ips[{i}].{k}");
        let interface = match e.get("interface") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let idx = v
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| bad(f("interface"), "must be an index into `interfaces`"))?;
                if idx >= out.interfaces.len() {
                    return Err(bad(
                        f("interface"),
                        &format!(
                            "{idx} names no interface (`interfaces` has {})",
                            out.interfaces.len()
                        ),
                    ));
                }
                Some(idx)
            }
        };
        out.ips.push(PrevIp {
            address: cidr(e.get("address"), f("address"))?,
            gateway: ip(e.get("gateway"), f("gateway"))?,
            interface,
        });
    }
    for (i, r) in list("routes")?.iter().enumerate() {
        let f = |k: &str| format!(".routes[{i}].{k}");
        out.routes.push(PrevRoute {
            dst: cidr(r.get("dst"), f("dst"))?,
            gw: ip(r.get("gw"), f("gw"))?,
        });
    }
    Ok(out)
}

/// The CNI 1.1.0 result for an attachment.
pub fn cni_result(rec: &PodRecord) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "interfaces": [
            { "name": rec.host_ifname, "mac": fmt_mac(&rec.host_mac) },
            { "name": rec.ifname, "mac": fmt_mac(&rec.pod_mac), "sandbox": rec.netns },
        ],
        "ips": [
            { "address": format!("{}/{}", rec.ip, rec.prefix_len), "gateway": rec.gateway.to_string(), "interface": 1 },
        ],
        "routes": [ { "dst": "0.0.0.0/0", "gw": rec.gateway.to_string() } ],
        "dns": {},
    })
}

fn respond(res: Result<Option<Value>, RequestError>) -> Response<CniResponse> {
    match res {
        Ok(v) => Response::new(CniResponse {
            result: v
                .map(|v| serde_json::to_vec(&v).expect("json"))
                .unwrap_or_default(),
            error: None,
        }),
        Err(e) => {
            let code: ErrorCode = e.cni_code();
            let details = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            Response::new(CniResponse {
                result: Vec::new(),
                error: Some(CniError {
                    code: code as i32,
                    msg: e.to_string(),
                    details,
                }),
            })
        }
    }
}

/// Runs `f` in its own task so that a cancelled RPC cannot interrupt it half-way.
async fn detached<F>(span: tracing::Span, f: F) -> Result<Option<Value>, RequestError>
where
    F: std::future::Future<Output = Result<Option<Value>, RequestError>> + Send + 'static,
{
    let start = std::time::Instant::now();
    let res = tokio::spawn(f.instrument(span.clone()))
        .await
        .unwrap_or_else(|e| Err(RequestError::Internal(format!("request task failed: {e}"))));
    let _e = span.enter();
    match &res {
        Ok(_) => tracing::info!(elapsed_ms = start.elapsed().as_secs_f64() * 1e3, "done"),
        Err(e) => {
            tracing::warn!(elapsed_ms = start.elapsed().as_secs_f64() * 1e3, code = e.cni_code() as i32, error = %e, "failed")
        }
    }
    res
}

/// Parses `cni.dev/valid-attachments` (GC): the (container ID, ifname) pairs to keep.
fn valid_attachments(conf: &NetConf) -> Result<HashSet<(String, String)>, RequestError> {
    let list = match conf.raw.get("cni.dev/valid-attachments") {
        None | Some(Value::Null) => return Ok(HashSet::new()),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(RequestError::InvalidConfig(
                "field `cni.dev/valid-attachments` must be a list".into(),
            ));
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, att)| {
            let cid = att.get("containerID").and_then(Value::as_str);
            let ifn = att.get("ifname").and_then(Value::as_str);
            match (cid, ifn) {
                (Some(c), Some(f)) => Ok((c.to_owned(), f.to_owned())),
                _ => Err(RequestError::InvalidConfig(format!(
                    "field `cni.dev/valid-attachments[{i}]` needs string `containerID` and `ifname`"
                ))),
            }
        })
        .collect()
}

impl CniService {
    /// Serves one CNI operation: a span naming the request, the network configuration parsed
    /// first, then `f` in its own task (see [`detached`]), its outcome encoded as a response.
    async fn serve<F, Fut>(
        &self,
        op: &'static str,
        r: CniRequest,
        f: F,
    ) -> Result<Response<CniResponse>, Status>
    where
        F: FnOnce(Self, NetConf, CniRequest) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Option<Value>, RequestError>> + Send + 'static,
    {
        let span = tracing::info_span!("cni", op, container_id = %r.container_id, netns = %r.netns, ifname = %r.ifname);
        let this = self.clone();
        let work = async move {
            if r.network_config.len() > MAX_NETWORK_CONFIG_BYTES {
                return Err(RequestError::InvalidConfig(format!(
                    "the network configuration is {} bytes; ferrea-agent accepts at most {MAX_NETWORK_CONFIG_BYTES} (1 MiB)",
                    r.network_config.len()
                )));
            }
            let conf = parse_netconf(&r.network_config)?;
            f(this, conf, r).await
        };
        let start = std::time::Instant::now();
        let res = detached(span, work).await;
        let result = match &res {
            Ok(_) => "success",
            Err(e) => result_label(e.cni_code()),
        };
        self.metrics
            .cni_request(verb_label(op), result, start.elapsed());
        Ok(respond(res))
    }
}

/// Everything the server decodes and validates of one encoded request for `verb` (`ADD`,
/// `DEL`, `CHECK`, `GC`, `STATUS`) before any pod is touched: the protobuf message, its network
/// configuration, the IDs, CNI_ARGS and the requested address and MAC, `prevResult` (CHECK)
/// and `cni.dev/valid-attachments` (GC). The server runs the same steps; the fuzz target
/// `cni_request` drives them with arbitrary bytes, which must give an error, never a panic.
pub fn decode_request(verb: &str, bytes: &[u8]) -> Result<(), RequestError> {
    use prost::Message as _;
    let r = CniRequest::decode(bytes).map_err(|e| RequestError::Decoding(e.to_string()))?;
    if r.network_config.len() > MAX_NETWORK_CONFIG_BYTES {
        return Err(RequestError::InvalidConfig("too large".into()));
    }
    let conf = parse_netconf(&r.network_config)?;
    match verb {
        "ADD" | "CHECK" | "DEL" => {
            validate_ids(&r.container_id, &r.ifname)?;
            let _ = pod_identity(&r.args);
            if verb == "ADD" {
                requested(&r.args, &conf)?;
            }
            if verb == "CHECK" {
                prev_result(&conf)?;
            }
        }
        "GC" => {
            valid_attachments(&conf)?;
        }
        _ => {}
    }
    Ok(())
}

/// The metrics label of a verb (lower case, bounded).
fn verb_label(op: &'static str) -> &'static str {
    match op {
        "ADD" => "add",
        "DEL" => "del",
        "CHECK" => "check",
        "STATUS" => "status",
        "GC" => "gc",
        _ => "other",
    }
}

/// The metrics label of a failed request: its CNI error class.
fn result_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::TryAgainLater => "try_again_later",
        ErrorCode::PluginNotAvailable => "plugin_not_available",
        ErrorCode::IncompatibleCniVersion => "incompatible_cni_version",
        ErrorCode::UnsupportedField => "unsupported_field",
        ErrorCode::UnknownContainer => "unknown_container",
        ErrorCode::InvalidEnvironmentVariables => "invalid_environment_variables",
        ErrorCode::IoFailure => "io_failure",
        ErrorCode::DecodingFailure => "decoding_failure",
        ErrorCode::InvalidNetworkConfig => "invalid_network_config",
        ErrorCode::LimitedConnectivity => "limited_connectivity",
        ErrorCode::Internal | ErrorCode::Unspecified => "internal",
    }
}

#[tonic::async_trait]
impl Cni for CniService {
    async fn add(&self, req: Request<CniRequest>) -> Result<Response<CniResponse>, Status> {
        self.serve("ADD", req.into_inner(), |this, conf, r| async move {
            validate_ids(&r.container_id, &r.ifname)?;
            if r.netns.is_empty() {
                return Err(RequestError::InvalidEnv(
                    "CNI_NETNS is required for ADD".into(),
                ));
            }
            let (ip, mac) = requested(&r.args, &conf)?;
            let pm = this.manager()?;
            let (pod_namespace, pod_name) = pod_identity(&r.args);
            let args = AddArgs {
                container_id: r.container_id,
                ifname: r.ifname,
                netns: r.netns,
                pod_namespace,
                pod_name,
            };
            let rec = pm.add_with(&args, &Requests { ip, mac }).await?;
            Ok(Some(cni_result(&rec)))
        })
        .await
    }

    async fn del(&self, req: Request<CniRequest>) -> Result<Response<CniResponse>, Status> {
        self.serve("DEL", req.into_inner(), |this, _, r| async move {
            validate_ids(&r.container_id, &r.ifname)?;
            this.manager()?.del(&r.container_id, &r.ifname).await?;
            Ok(None)
        })
        .await
    }

    async fn check(&self, req: Request<CniRequest>) -> Result<Response<CniResponse>, Status> {
        self.serve("CHECK", req.into_inner(), |this, conf, r| async move {
            validate_ids(&r.container_id, &r.ifname)?;
            if r.netns.is_empty() {
                return Err(RequestError::InvalidEnv(
                    "CNI_NETNS is required for CHECK".into(),
                ));
            }
            let prev = prev_result(&conf)?;
            let rec = this
                .manager()?
                .check(&r.container_id, &r.ifname, &r.netns, Some(&prev))
                .await?;
            Ok(Some(cni_result(&rec)))
        })
        .await
    }

    async fn status(&self, req: Request<CniRequest>) -> Result<Response<CniResponse>, Status> {
        self.serve("STATUS", req.into_inner(), |this, _, _| async move {
            this.manager().map_err(|e| match e {
                RequestError::NotReady(why) => RequestError::NotAvailable(why),
                other => other,
            })?;
            Ok(None)
        })
        .await
    }

    async fn gc(&self, req: Request<CniRequest>) -> Result<Response<CniResponse>, Status> {
        self.serve("GC", req.into_inner(), |this, conf, _| async move {
            let valid = valid_attachments(&conf)?;
            let removed = this.manager()?.gc(&valid).await?;
            if !removed.is_empty() {
                tracing::info!(removed = ?removed, "GC released attachments");
            }
            Ok(None)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record of a pod at 10.244.1.5/24 on `eth0`.
    fn record() -> PodRecord {
        PodRecord {
            container_id: "c".into(),
            ifname: "eth0".into(),
            ip: "10.244.1.5".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.244.1.1".parse().unwrap(),
            netns: "/run/netns/p".into(),
            host_ifname: "fe0123456789abc".into(),
            host_mac: [0x0e, 0x58, 10, 244, 1, 5],
            pod_mac: [0x0a, 0x58, 10, 244, 1, 5],
            pod_namespace: String::new(),
            pod_name: String::new(),
        }
    }

    #[test]
    fn netconf_errors_have_the_right_codes() {
        let code = |b: &[u8]| parse_netconf(b).unwrap_err().cni_code() as i32;
        assert_eq!(code(b"{not json"), 6);
        assert_eq!(code(b"[1]"), 6);
        assert_eq!(code(br#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#), 1);
        assert_eq!(code(br#"{"cniVersion":"1.1.0","type":"t"}"#), 7);
        assert_eq!(
            code(br#"{"cniVersion":"1.1.0","name":"n","type":"t","agentSocket":1}"#),
            7
        );
        assert!(parse_netconf(br#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#).is_ok());
    }

    #[test]
    fn ids_are_validated_per_spec() {
        assert!(validate_ids("abc-1.2_3", "eth0").is_ok());
        assert!(validate_ids("", "eth0").is_err());
        assert!(validate_ids("-abc", "eth0").is_err());
        assert!(validate_ids("a/b", "eth0").is_err());
        assert!(validate_ids("abc", "").is_err());
        assert!(validate_ids("abc", "0123456789abcdef").is_err());
        assert!(validate_ids("abc", "..").is_err());
    }

    #[test]
    fn pod_identity_from_cni_args() {
        let (ns, n) = pod_identity(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=x",
        );
        assert_eq!((ns.as_str(), n.as_str()), ("prod", "web-0"));
    }

    fn conf(v: Value) -> NetConf {
        let mut raw = json!({"cniVersion": "1.1.0", "name": "n", "type": "ferrea-cni"});
        if let (Value::Object(r), Value::Object(e)) = (&mut raw, v) {
            r.extend(e);
        }
        parse_netconf(raw.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn static_ip_and_mac_come_from_cni_args_args_and_runtime_config() {
        let none = conf(json!({}));
        let (ip, mac) =
            requested("IgnoreUnknown=1;IP=10.244.1.9;MAC=02:00:00:00:00:09", &none).unwrap();
        let ip = ip.unwrap();
        assert_eq!(ip.value.ip, std::net::Ipv4Addr::new(10, 244, 1, 9));
        assert_eq!(ip.value.prefix_len, None);
        assert_eq!(ip.origin, "CNI_ARGS IP=10.244.1.9");
        assert!(ip.from_env);
        assert_eq!(mac.unwrap().value, [2, 0, 0, 0, 0, 9]);
        let (ip, _) = requested("IP=10.244.1.9/24", &none).unwrap();
        assert_eq!(ip.unwrap().value.prefix_len, Some(24));
        // Unknown keys and pairs without '=' are ignored as before; no request, no values.
        assert_eq!(
            requested("FOO=bar;junk;K8S_POD_NAME=x", &none).unwrap(),
            (None, None)
        );

        let c =
            conf(json!({"args": {"cni": {"ips": ["10.244.1.10"], "mac": "02-00-00-00-00-0a"}}}));
        let (ip, mac) = requested("", &c).unwrap();
        let ip = ip.unwrap();
        assert_eq!(ip.origin, r#"args.cni.ips ["10.244.1.10"]"#);
        assert!(!ip.from_env);
        assert_eq!(mac.unwrap().value, [2, 0, 0, 0, 0, 10]);
        let c =
            conf(json!({"runtimeConfig": {"ips": ["10.244.1.11/24"], "mac": "02:00:00:00:00:0b"}}));
        let (ip, mac) = requested("", &c).unwrap();
        assert_eq!(
            ip.unwrap().value.ip,
            std::net::Ipv4Addr::new(10, 244, 1, 11)
        );
        assert_eq!(
            mac.unwrap().origin,
            r#"runtimeConfig.mac "02:00:00:00:00:0b""#
        );
        // Empty capability values are no request.
        let c = conf(json!({"runtimeConfig": {"ips": [], "mac": ""}}));
        assert_eq!(requested("", &c).unwrap(), (None, None));
        // The same value twice is fine; two different ones are refused.
        let c = conf(json!({"runtimeConfig": {"ips": ["10.244.1.9"]}}));
        assert!(requested("IP=10.244.1.9", &c).unwrap().0.is_some());
        let e = requested("IP=10.244.1.8", &c).unwrap_err();
        assert_eq!(e.cni_code() as i32, 7);
        assert!(
            e.to_string()
                .contains("CNI_ARGS IP=10.244.1.8 and runtimeConfig.ips"),
            "{e}"
        );
    }

    #[test]
    fn malformed_static_values_are_refused_with_their_source() {
        let none = conf(json!({}));
        for (args, want) in [
            (
                "IP=10.244.1.x",
                "CNI_ARGS IP=10.244.1.x: \"10.244.1.x\" is not an IPv4 address",
            ),
            ("IP=", "CNI_ARGS IP=: \"\" is not an IPv4 address"),
            ("IP=10.244.1.9/40", "has no valid prefix length"),
            ("IP=fd00::5", "ferrea allocates IPv4 addresses only"),
            ("IP=10.244.1.9,10.244.1.10", "exactly one IPv4 address"),
            (
                "MAC=02:00:00:00:00",
                "CNI_ARGS MAC=02:00:00:00:00: \"02:00:00:00:00\" is not a MAC address",
            ),
            ("MAC=zz:00:00:00:00:00", "is not a MAC address"),
        ] {
            let e = requested(args, &none).unwrap_err();
            assert_eq!(e.cni_code() as i32, 4, "{args}");
            assert!(e.to_string().contains(want), "{args}: {e}");
        }
        let c = conf(json!({"runtimeConfig": {"ips": ["nope"]}}));
        assert_eq!(requested("", &c).unwrap_err().cni_code() as i32, 7);
        let c = conf(json!({"args": {"cni": {"ips": "10.244.1.9"}}}));
        assert!(
            requested("", &c)
                .unwrap_err()
                .to_string()
                .contains("list of strings")
        );
    }

    #[test]
    fn prev_result_is_required_and_decoded() {
        let e = prev_result(&conf(json!({}))).unwrap_err();
        assert_eq!(e.cni_code() as i32, 7);
        assert!(e.to_string().contains("CHECK needs `prevResult`"), "{e}");
        let rec = record();
        // Our own result decodes to what it says, also in the 0.4.0 shape ("version" keys).
        let mut result = cni_result(&rec);
        let p = prev_result(&conf(json!({ "prevResult": result.clone() }))).unwrap();
        assert_eq!(p.interfaces.len(), 2);
        assert_eq!(p.interfaces[1].sandbox.as_deref(), Some("/run/netns/p"));
        assert_eq!(p.interfaces[1].mac, Some(rec.pod_mac));
        assert_eq!(p.interfaces[0].sandbox, None);
        assert_eq!(p.ips[0].address, "10.244.1.5/24".parse().unwrap());
        assert_eq!(p.ips[0].interface, Some(1));
        assert_eq!(p.routes[0].dst, "0.0.0.0/0".parse().unwrap());
        result["ips"][0]["version"] = json!("4");
        result["cniVersion"] = json!("0.4.0");
        assert_eq!(
            prev_result(&conf(json!({ "prevResult": result.clone() }))).unwrap(),
            p
        );
        for (field, value, want) in [
            (
                "ips",
                json!([{"address": "10.244.1.5"}]),
                "prevResult.ips[0].address",
            ),
            (
                "ips",
                json!([{"address": "10.244.1.5/24", "interface": 7}]),
                "7 names no interface",
            ),
            ("routes", json!([{"dst": "x"}]), "prevResult.routes[0].dst"),
            (
                "interfaces",
                json!([{"mac": "02:00:00:00:00:01"}]),
                "prevResult.interfaces[0].name",
            ),
            (
                "interfaces",
                json!("eth0"),
                "prevResult.interfaces`: must be a list",
            ),
        ] {
            let mut r = result.clone();
            r[field] = value;
            let e = prev_result(&conf(json!({ "prevResult": r }))).unwrap_err();
            assert_eq!(e.cni_code() as i32, 7, "{field}");
            assert!(e.to_string().contains(want), "{field}: {e}");
        }
    }

    /// A codec that sends raw bytes as the request body, to play a broken client.
    #[derive(Default)]
    struct RawCodec;

    impl tonic::codec::Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = CniResponse;
        type Encoder = RawCodec;
        type Decoder = RawCodec;
        fn encoder(&mut self) -> RawCodec {
            RawCodec
        }
        fn decoder(&mut self) -> RawCodec {
            RawCodec
        }
    }

    impl tonic::codec::Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(
            &mut self,
            item: Vec<u8>,
            dst: &mut tonic::codec::EncodeBuf<'_>,
        ) -> Result<(), Status> {
            prost::bytes::BufMut::put_slice(dst, &item);
            Ok(())
        }
    }

    impl tonic::codec::Decoder for RawCodec {
        type Item = CniResponse;
        type Error = Status;
        fn decode(
            &mut self,
            src: &mut tonic::codec::DecodeBuf<'_>,
        ) -> Result<Option<CniResponse>, Status> {
            <CniResponse as prost::Message>::decode(src)
                .map(Some)
                .map_err(|e| Status::internal(e.to_string()))
        }
    }

    /// A real server on a socket in a temporary directory, answering as a starting agent
    /// (every well-formed request gets the CNI error `TRY_AGAIN_LATER`).
    async fn starting_server() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.sock");
        let listener = crate::cni::socket::bind_root_only(&path, "binding").unwrap();
        let (tx, rx) = watch::channel(Readiness::Starting("testing".into()));
        tokio::spawn(async move {
            let _keep = tx;
            serve(listener, CniService::new(rx)).await
        });
        (dir, path)
    }

    async fn channel(path: &std::path::Path) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("unix://{}", path.display()))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn good_request() -> CniRequest {
        CniRequest {
            container_id: "c1".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            network_config: br#"{"cniVersion":"1.1.0","name":"n","type":"ferrea-cni"}"#.to_vec(),
            ..Default::default()
        }
    }

    /// Whether this test process is root; when it is not, the server must refuse it and say
    /// its uid (the other half of the check), and the caller returns.
    fn refused_unless_root(res: &Result<Response<CniResponse>, Status>) -> bool {
        let uid = nix::unistd::geteuid().as_raw();
        if uid == 0 {
            return false;
        }
        let e = res.as_ref().unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains(&format!("uid {uid}")), "{e:?}");
        true
    }

    /// The answer of a well-formed ADD: the starting agent's CNI error, code 11.
    async fn still_serves(path: &std::path::Path) {
        use ferrea_proto::cni::v1::cni_client::CniClient;
        let resp = CniClient::new(channel(path).await)
            .add(good_request())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.error.unwrap().code, ErrorCode::TryAgainLater as i32);
    }

    #[tokio::test]
    async fn oversized_requests_are_refused_and_others_served() {
        use ferrea_proto::cni::v1::cni_client::CniClient;
        let (_dir, path) = starting_server().await;
        let mut client = CniClient::new(channel(&path).await);
        let first = client.add(good_request()).await;
        if refused_unless_root(&first) {
            return;
        }
        assert_eq!(
            first.unwrap().into_inner().error.unwrap().code,
            ErrorCode::TryAgainLater as i32
        );
        // Beyond the message limit: refused before decoding; the connection still serves.
        let mut huge = good_request();
        huge.network_config = vec![b' '; 2 * MAX_REQUEST_BYTES];
        let e = client.add(huge).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
        assert!(e.message().contains("too large"), "{e:?}");
        // Within the message limit but above the configuration's: a CNI error naming both.
        let mut big = good_request();
        big.network_config = vec![b' '; MAX_NETWORK_CONFIG_BYTES + 1];
        let err = client.add(big).await.unwrap().into_inner().error.unwrap();
        assert_eq!(err.code, ErrorCode::InvalidNetworkConfig as i32);
        assert!(
            err.msg
                .contains(&format!("{} bytes", MAX_NETWORK_CONFIG_BYTES + 1))
                && err.msg.contains("at most 1048576"),
            "{}",
            err.msg
        );
        let resp = client.add(good_request()).await.unwrap().into_inner();
        assert_eq!(resp.error.unwrap().code, ErrorCode::TryAgainLater as i32);
        still_serves(&path).await;
    }

    #[tokio::test]
    async fn malformed_protobuf_and_garbage_fail_alone() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (_dir, path) = starting_server().await;
        let mut grpc = tonic::client::Grpc::new(channel(&path).await);
        let add = tonic::codegen::http::uri::PathAndQuery::from_static("/ferrea.cni.v1.Cni/Add");
        // Field 1 (container_id, a string) holding bytes that are no UTF-8; a truncated
        // field; a wire type that does not exist.
        for body in [
            vec![0x0a, 0x02, 0xff, 0xfe],
            vec![0x32, 0x10, b'{'],
            vec![0x0f, 0x01],
        ] {
            grpc.ready().await.unwrap();
            let res = grpc
                .unary(Request::new(body.clone()), add.clone(), RawCodec)
                .await;
            if refused_unless_root(&res) {
                return;
            }
            let e = res.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Internal, "{body:?}: {e:?}");
            assert!(e.message().contains("decode"), "{body:?}: {e:?}");
        }
        // The same connection still serves a well-formed request.
        grpc.ready().await.unwrap();
        let ok = grpc
            .unary(
                Request::new(prost::Message::encode_to_vec(&good_request())),
                add.clone(),
                RawCodec,
            )
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.error.unwrap().code, ErrorCode::TryAgainLater as i32);
        // A client speaking no HTTP/2 at all gets its connection closed ...
        let mut junk = tokio::net::UnixStream::connect(&path).await.unwrap();
        junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            junk.read_to_end(&mut buf),
        )
        .await
        .expect("the server closes a connection that speaks no HTTP/2");
        // ... and one that stalls mid-preface holds nothing up.
        let mut stalled = tokio::net::UnixStream::connect(&path).await.unwrap();
        stalled.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), still_serves(&path))
            .await
            .expect("another client is served while one stalls");
        drop(stalled);
    }

    #[tokio::test]
    async fn the_peer_check_reads_so_peercred() {
        // A connected pair carries this process's own credentials.
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let mut req = Request::new(());
        req.extensions_mut().insert(UdsConnectInfo {
            peer_addr: None,
            peer_cred: a.peer_cred().ok(),
        });
        let uid = nix::unistd::geteuid().as_raw();
        match require_root(req) {
            Ok(_) => assert_eq!(uid, 0),
            Err(e) => {
                assert_ne!(uid, 0);
                assert_eq!(e.code(), tonic::Code::PermissionDenied);
                assert!(e.message().contains(&format!("uid {uid}")), "{e:?}");
            }
        }
        let e = require_root(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("unknown"), "{e:?}");
    }

    #[test]
    fn result_has_the_1_1_0_shape() {
        let rec = record();
        let v = cni_result(&rec);
        assert_eq!(v["ips"][0]["address"], "10.244.1.5/24");
        assert_eq!(v["ips"][0]["interface"], 1);
        assert_eq!(v["interfaces"][1]["sandbox"], "/run/netns/p");
        assert_eq!(v["interfaces"][1]["mac"], "0a:58:0a:f4:01:05");
        assert_eq!(v["routes"][0]["gw"], "10.244.1.1");
    }
}
