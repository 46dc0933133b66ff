//! The `kubernetes` source: kube-rs watchers and reflector stores of the objects the agent
//! needs, published as the same [`DesiredState`] the `files` source builds.
//!
//! Watched: all Nodes, this node's Pods (field selector `spec.nodeName=<node>`), all Services,
//! EndpointSlices and Namespaces, and Antrea's `crd.antrea.io/v1beta1` `Egress` and `ExternalIPPool` (as
//! [`DynamicObject`]s). Each object is serialised to JSON and decoded by
//! [`manifest::decode_object`], the decoder of the `files` source, so the same objects give the
//! same state whichever source read them; an object that does not decode is left out and named
//! in [`DesiredState::errors`].
//!
//! Publishing is gated by [`gate::SyncGate`]: nothing before every kind's initial list has
//! completed, then one state per burst of changes ([`COALESCE`]). The watchers relist on their
//! own after 410 Gone or an API server restart, with [`retry_backoff`] (exponential from 0.5 s
//! to 8 s, jittered; kube-runtime's default goes to 30 s, which kept a node's annotations and
//! Egress status stale for half a minute after an API server came back); the
//! reflector stores keep the last complete view meanwhile, so a relist never publishes a partial
//! state. A CRD that is not installed (404) does not hold back the rest: its kind is empty and
//! named in `errors` until it is served. A watch error is logged once per outage, and its end
//! once.
//!
//! Status write-back (NodePortLocal's pod annotations) is the
//! `controllers::npl::KubeStatusSink`'s; this module only reads.

pub mod gate;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::ResetTimerBackoff;
use kube::runtime::watcher::{self, Event, ExponentialBackoff};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use tokio::sync::watch;

use super::DesiredState;
use super::error::ObjectError;
use super::manifest::{self, Object};
pub use gate::{Kind, Signal, SyncGate, SyncState};

/// How long a burst of changes is collected before one state is published.
pub const COALESCE: Duration = Duration::from_millis(30);

/// Why a Kubernetes client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig file could not be read or used.
    #[error("loading the kubeconfig {}", path.display())]
    Kubeconfig {
        /// The file (`source.kubernetes.kubeconfig`).
        path: PathBuf,
        /// What kube said.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The in-cluster configuration (service account token, `KUBERNETES_SERVICE_HOST`) could
    /// not be loaded.
    #[error("loading the in-cluster Kubernetes configuration (service account)")]
    InCluster(#[source] kube::config::InClusterError),
    /// The client could not be built from the configuration.
    #[error("building the Kubernetes client from {origin}")]
    Client {
        /// The kubeconfig path, or `in-cluster`.
        origin: String,
        /// What kube said.
        #[source]
        source: kube::Error,
    },
}

/// A client from `kubeconfig`, or from the in-cluster configuration when `None`. Nothing is
/// contacted yet: an unreachable server shows in the watchers' errors.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let (config, origin) = match kubeconfig {
        Some(path) => {
            let kc_err = |source| ClientError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(kc_err)?;
            let c = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(kc_err)?;
            (c, path.display().to_string())
        }
        None => (
            kube::Config::incluster().map_err(ClientError::InCluster)?,
            "in-cluster".to_owned(),
        ),
    };
    Client::try_from(config).map_err(|source| ClientError::Client { origin, source })
}

/// The source's outputs.
#[derive(Debug)]
pub struct KubeSource {
    /// The desired state. Its initial value is an empty placeholder, not a published state: the
    /// first change is the first complete state.
    pub state: watch::Receiver<DesiredState>,
    /// Whether every kind has completed its initial list.
    pub sync: watch::Receiver<SyncState>,
}

/// Antrea's CRD kinds as dynamic resources.
fn crd_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("crd.antrea.io", "v1beta1", kind),
        plural,
    )
}

/// The reflector stores, one per kind.
#[derive(Clone)]
struct Stores {
    nodes: Store<Node>,
    pods: Store<Pod>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    egresses: (Store<DynamicObject>, ApiResource),
    pools: (Store<DynamicObject>, ApiResource),
}

/// What one watcher event tells the publishing loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// `Init`: a (re)list starts. Not a sign that the API works: the watcher says it before
    /// every attempt, also before one that fails.
    Relisting,
    /// `InitApply`: an object of a list in progress (the store changes at `InitDone`).
    Listing,
    /// A list completed, or an object changed.
    Signal(Signal),
}

/// One watcher event, as the publishing loop sees it.
type Observed = (Kind, Result<Step, watcher::Error>);
type Observations = Pin<Box<dyn Stream<Item = Observed> + Send>>;

/// The step of an event of `kind` (a relist in progress changes nothing until its
/// `InitDone`).
fn step<K>(kind: Kind, e: &Event<K>) -> Step {
    match e {
        Event::Init => Step::Relisting,
        Event::InitApply(_) => Step::Listing,
        Event::InitDone => Step::Signal(Signal::Listed(kind)),
        Event::Apply(_) | Event::Delete(_) => Step::Signal(Signal::Changed(kind)),
    }
}

/// The reflected watch of `api` as observations of `kind`, managed fields dropped.
fn observe<K>(
    kind: Kind,
    api: Api<K>,
    cfg: watcher::Config,
    dyntype: K::DynamicType,
) -> (Store<K>, Observations)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = watcher::watcher(api, cfg)
        .backoff(ResetTimerBackoff::new(retry_backoff(), BACKOFF_RESET))
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .reflect(writer)
        .map(move |r| (kind, r.map(|e| step(kind, &e))));
    (reader, Box::pin(stream))
}

/// Starts the watchers for node `node_name` and the task that publishes their view.
pub fn spawn(client: Client, node_name: &str, metrics: crate::metrics::Metrics) -> KubeSource {
    let egress_ar = crd_resource("Egress", "egresses");
    let pool_ar = crd_resource("ExternalIPPool", "externalippools");
    let cfg = watcher::Config::default;
    let (nodes, o1) = observe(Kind::Node, Api::all(client.clone()), cfg(), ());
    let (pods, o2) = observe(
        Kind::Pod,
        Api::all(client.clone()),
        cfg().fields(&format!("spec.nodeName={node_name}")),
        (),
    );
    let (services, o3) = observe(Kind::Service, Api::all(client.clone()), cfg(), ());
    let (endpoint_slices, o7) = observe(Kind::EndpointSlice, Api::all(client.clone()), cfg(), ());
    let (namespaces, o4) = observe(Kind::Namespace, Api::all(client.clone()), cfg(), ());
    let (egresses, o5) = observe(
        Kind::Egress,
        Api::all_with(client.clone(), &egress_ar),
        cfg(),
        egress_ar.clone(),
    );
    let (pools, o6) = observe(
        Kind::ExternalIpPool,
        Api::all_with(client, &pool_ar),
        cfg(),
        pool_ar.clone(),
    );
    let stores = Stores {
        nodes,
        pods,
        services,
        endpoint_slices,
        namespaces,
        egresses: (egresses, egress_ar),
        pools: (pools, pool_ar),
    };
    let events = futures::stream::select_all([o1, o2, o3, o7, o4, o5, o6]);
    let (state_tx, state) = watch::channel(DesiredState::default());
    let (sync_tx, sync) = watch::channel(SyncGate::new().state());
    tokio::spawn(publish_loop(events, stores, state_tx, sync_tx, metrics));
    KubeSource { state, sync }
}

/// The first retry delay of a failed watch.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// The longest one.
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// The delay starts from [`BACKOFF_MIN`] again after this long without a failure.
const BACKOFF_RESET: Duration = Duration::from_secs(120);

/// Exponential backoff from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], each delay jittered down by up
/// to a half, so that the agents of many nodes do not retry in step: kube-runtime's
/// [`ExponentialBackoff`] over a `backon` builder, whose jitter adds up to 100 % to a delay
/// that runs from half the minimum to half the maximum.
pub fn retry_backoff() -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN / 2)
        .with_max_delay(BACKOFF_MAX / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// Whether a watcher error is "this API is not served" (the list answered 404).
fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// Whether a watcher error is "the resource version is too old" (410 Gone: the API server's
/// history was compacted past it); the watcher relists.
fn is_gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 410,
        watcher::Error::WatchError(s) => s.code == 410,
        _ => false,
    }
}

/// `e` and its sources, joined with `: `.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Logs watch errors once per outage of each kind, and each outage's end.
#[derive(Default)]
struct Outages(BTreeSet<Kind>);

impl Outages {
    fn error(&mut self, kind: Kind, e: &watcher::Error) {
        if self.0.insert(kind) {
            if kind.is_crd() && is_not_found(e) {
                tracing::warn!(kind = %kind, "the API server does not serve {kind} (is its CRD installed?); treating it as empty and retrying");
            } else {
                tracing::warn!(kind = %kind, error = %chain(e), "watching the Kubernetes API failed; retrying with backoff (logged once until it recovers)");
            }
        } else {
            tracing::debug!(kind = %kind, error = %chain(e), "watch retry failed");
        }
    }

    fn ok(&mut self, kind: Kind) {
        if self.0.remove(&kind) {
            tracing::info!(kind = %kind, "watching the Kubernetes API works again");
        }
    }
}

async fn publish_loop(
    mut events: futures::stream::SelectAll<Observations>,
    stores: Stores,
    state_tx: watch::Sender<DesiredState>,
    sync_tx: watch::Sender<SyncState>,
    metrics: crate::metrics::Metrics,
) {
    let mut gate = SyncGate::new();
    let mut outages = Outages::default();
    let started = tokio::time::Instant::now();
    let mut handle = |gate: &mut SyncGate, (kind, r): Observed| match r {
        Ok(Step::Relisting) => {}
        Ok(Step::Listing) => outages.ok(kind),
        Ok(Step::Signal(s)) => {
            outages.ok(kind);
            gate.observe(s);
        }
        Err(e) => {
            // kube-runtime's watcher restarts the watch (with backoff) after every error.
            metrics.watch_restarted();
            if is_not_found(&e) {
                gate.observe(Signal::Missing(kind));
            }
            if is_gone(&e) {
                // Not an outage: the watch resumed too late and lists again. Said each time,
                // as it means the agent missed events for a while.
                tracing::info!(kind = %kind, error = %chain(&e), "the watch's resource version expired (410 Gone); relisting {kind}");
            } else {
                outages.error(kind, &e);
            }
        }
    };
    while let Some(o) = events.next().await {
        handle(&mut gate, o);
        if !gate.due() {
            continue;
        }
        // Collect the rest of the burst.
        let deadline = tokio::time::Instant::now() + COALESCE;
        loop {
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline) => break,
                o = events.next() => match o {
                    Some(o) => handle(&mut gate, o),
                    None => break,
                },
            }
        }
        if !gate.due() {
            continue;
        }
        let next = build(&stores, gate.missing());
        gate.published();
        for e in &next.errors {
            if !state_tx.borrow().errors.contains(e) {
                tracing::error!(error = %e, "Kubernetes object rejected");
            }
        }
        sync_tx.send_if_modified(|s| {
            if s.is_synced() {
                false
            } else {
                tracing::info!(after = ?started.elapsed(), "Kubernetes source synced: every initial list completed");
                *s = SyncState::Synced;
                true
            }
        });
        state_tx.send_if_modified(|cur| {
            if *cur != next {
                *cur = next;
                true
            } else {
                false
            }
        });
        if state_tx.is_closed() {
            break;
        }
    }
}

/// What [`DesiredState::errors`] says of a kind whose API is not served.
pub fn missing_message(kind: Kind) -> String {
    format!(
        "{kind} (crd.antrea.io/v1beta1): the API server does not serve it (404; is its CRD installed?); treated as empty"
    )
}

/// Decodes one typed object as the `files` source decodes its manifest.
pub fn decode_typed<K: Serialize>(obj: &K) -> Result<Object, ObjectError> {
    let v = serde_json::to_value(obj).expect("Kubernetes objects serialise to JSON");
    manifest::decode_object(&v)
}

/// Decodes one dynamic object of resource `ar` (list items may lack `apiVersion` and `kind`;
/// they are set from `ar`).
pub fn decode_dynamic(obj: &DynamicObject, ar: &ApiResource) -> Result<Object, ObjectError> {
    let mut v = serde_json::to_value(obj).expect("Kubernetes objects serialise to JSON");
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), ar.api_version.clone().into());
        m.insert("kind".into(), ar.kind.clone().into());
    }
    manifest::decode_object(&v)
}

/// The state of decoded objects (and the errors of those that did not decode, sorted).
pub fn state_of(
    objects: impl IntoIterator<Item = Result<Object, ObjectError>>,
    missing: impl IntoIterator<Item = Kind>,
) -> DesiredState {
    let mut st = DesiredState::default();
    for o in objects {
        match o {
            Ok(o) => st.insert(o),
            Err(e) => st.errors.push(e.to_string()),
        }
    }
    st.errors.extend(missing.into_iter().map(missing_message));
    st.errors.sort();
    st
}

fn build(s: &Stores, missing: &BTreeSet<Kind>) -> DesiredState {
    let typed = s
        .nodes
        .state()
        .iter()
        .map(|o| decode_typed(&**o))
        .chain(s.pods.state().iter().map(|o| decode_typed(&**o)))
        .chain(s.services.state().iter().map(|o| decode_typed(&**o)))
        .chain(s.endpoint_slices.state().iter().map(|o| decode_typed(&**o)))
        .chain(s.namespaces.state().iter().map(|o| decode_typed(&**o)))
        .collect::<Vec<_>>();
    let mut dynamic = Vec::new();
    for (kind, (store, ar)) in [
        (Kind::Egress, &s.egresses),
        (Kind::ExternalIpPool, &s.pools),
    ] {
        if !missing.contains(&kind) {
            dynamic.extend(store.state().iter().map(|o| decode_dynamic(o, ar)));
        }
    }
    state_of(typed.into_iter().chain(dynamic), missing.iter().copied())
}

#[cfg(test)]
mod tests;
