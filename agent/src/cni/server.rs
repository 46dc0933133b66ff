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

use std::collections::HashSet;
use std::sync::Arc;

use ferrea_proto::cni::v1::{CniError, CniRequest, CniResponse, ErrorCode, cni_server::Cni};
use serde_json::{Value, json};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cni::error::RequestError;
use crate::metrics::Metrics;
use crate::pods::podnet::fmt_mac;
use crate::pods::store::PodRecord;
use crate::pods::{AddArgs, PodManager};

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

/// Parses CNI_ARGS (`K=V;K=V`) for the Kubernetes pod identity.
fn pod_identity(args: &str) -> (String, String) {
    let mut ns = String::new();
    let mut name = String::new();
    for kv in args.split(';') {
        match kv.split_once('=') {
            Some(("K8S_POD_NAMESPACE", v)) => ns = v.to_owned(),
            Some(("K8S_POD_NAME", v)) => name = v.to_owned(),
            _ => {}
        }
    }
    (ns, name)
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
        self.serve("ADD", req.into_inner(), |this, _, r| async move {
            validate_ids(&r.container_id, &r.ifname)?;
            if r.netns.is_empty() {
                return Err(RequestError::InvalidEnv(
                    "CNI_NETNS is required for ADD".into(),
                ));
            }
            let pm = this.manager()?;
            let (pod_namespace, pod_name) = pod_identity(&r.args);
            let rec = pm
                .add(&AddArgs {
                    container_id: r.container_id,
                    ifname: r.ifname,
                    netns: r.netns,
                    pod_namespace,
                    pod_name,
                })
                .await?;
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
        self.serve("CHECK", req.into_inner(), |this, _, r| async move {
            validate_ids(&r.container_id, &r.ifname)?;
            let rec = this.manager()?.check(&r.container_id, &r.ifname).await?;
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

    #[test]
    fn result_has_the_1_1_0_shape() {
        let rec = PodRecord {
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
        };
        let v = cni_result(&rec);
        assert_eq!(v["ips"][0]["address"], "10.244.1.5/24");
        assert_eq!(v["ips"][0]["interface"], 1);
        assert_eq!(v["interfaces"][1]["sandbox"], "/run/netns/p");
        assert_eq!(v["interfaces"][1]["mac"], "0a:58:0a:f4:01:05");
        assert_eq!(v["routes"][0]["gw"], "10.244.1.1");
    }
}
