//! The `kubernetes` source's [`EgressStatusSink`]: the node responsible for an Egress (the
//! one that holds its IP) writes `status.egressIP`, `status.egressNode` and the conditions
//! `IPAllocated` and `IPAssigned` onto the `status` subresource of the `Egress` object
//! (`crd.antrea.io/v1beta1`, cluster-scoped), with a JSON merge patch. A node never writes the
//! status of an Egress another node holds.
//!
//! **Conflict-safe.** Every agent computes the holders itself, so two agents can mean to
//! write the same Egress at once (a handover, or split views of the membership). Each write
//! carries the `metadata.resourceVersion` the agent last read (optimistic concurrency: the API
//! server refuses a write over a newer object with 409 Conflict). On a conflict the agent reads
//! the object again and then yields if another node now records a *different* IP for the
//! Egress (the first recorded allocation wins: every agent takes `status.egressIP` as the
//! Egress's allocation, so the next plan agrees with it), and writes again otherwise (bounded
//! tries; a last conflict is returned and retried by the runner).
//!
//! What was written is remembered per Egress; before the first write of an Egress it is what
//! the API holds (read from the object), so an unchanged status is not
//! patched again, not even after a restart. What is remembered counts only while the source's
//! watch sees the same `egressIP` and `egressNode` in the object ([`Observed`]): a late write
//! by another agent (one that held the IP before and had not yet seen the change, say) makes
//! the holder read the object again and write its status back, rather than leave the API
//! naming a node that no longer holds the IP. Over another node's record it writes at most
//! once a second per Egress (two agents that both take themselves for the holder, in a split
//! view, would otherwise take turns as fast as the watch goes); the runner's resync writes
//! what was held back. A condition's `lastTransitionTime` is the time
//! its `status` last changed: kept while the status stays, now when it changes. An Egress
//! that no longer exists (404) needs nothing. Any other failure is returned after the other
//! Egresses were tried, so the Egress runner retries what failed.
//!
//! The same for the ExternalIPPools whose usage this node reports (the first eligible node by
//! name, so one node per pool): `status.usage` (`total`, `used`) when it changed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::status::{EgressStatusError, EgressStatusSink, EgressStatuses, Observed};

/// The status fields this node writes (the conditions apart).
const FIELDS: [&str; 2] = ["egressIP", "egressNode"];
/// How often a node writes its status over another node's record of one Egress at most (two
/// agents that both take themselves for the holder would otherwise take turns at the speed
/// of the watch); the runner's resync (every 10 s) writes what was held back.
const OVERWRITE_EVERY: Duration = Duration::from_secs(1);
/// Writes of one Egress's status per publish before a conflict is left to the runner.
const CONFLICT_TRIES: usize = 3;

/// An Egress's status in the API and the `resourceVersion` it was read or written at.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    status: Value,
    version: Option<String>,
}

/// What a node does after its write of `want` met a conflict and the object has `fresh` now.
#[derive(Debug, PartialEq, Eq)]
pub enum OnConflict {
    /// Another node records another IP for the Egress: its allocation stands.
    Yield,
    /// Write again over the fresh object.
    Retry,
}

/// See the module doc: the first recorded allocation wins.
pub fn on_conflict(fresh: &Value, want: &Value, me: &str) -> OnConflict {
    let theirs = fresh.get("egressIP").and_then(Value::as_str);
    let by = fresh.get("egressNode").and_then(Value::as_str);
    let ours = want.get("egressIP").and_then(Value::as_str);
    match (theirs, by) {
        (Some(t), Some(n)) if n != me && Some(t) != ours => OnConflict::Yield,
        _ => OnConflict::Retry,
    }
}

/// Antrea's `Egress` resource.
pub fn egress_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("crd.antrea.io", "v1beta1", "Egress"),
        "egresses",
    )
}

/// Antrea's `ExternalIPPool` resource.
pub fn pool_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("crd.antrea.io", "v1beta1", "ExternalIPPool"),
        "externalippools",
    )
}

/// Writes the status of the Egresses this node holds and the usage of the pools it reports
/// (see the module doc).
pub struct KubeEgressStatusSink {
    api: Api<DynamicObject>,
    pools: Api<DynamicObject>,
    /// The status each Egress this node is responsible for has in the API, as far as this
    /// sink knows.
    published: Mutex<BTreeMap<String, Seen>>,
    /// When this node last wrote its status over another node's record, by Egress.
    overwrote: Mutex<BTreeMap<String, Instant>>,
    /// Whether the last publish held such a write back.
    held_back: AtomicBool,
    /// The `status.usage` of each pool this node reports, as far as this sink knows.
    usage: Mutex<BTreeMap<String, Value>>,
}

impl KubeEgressStatusSink {
    /// A sink writing through `client`.
    pub fn new(client: Client) -> Self {
        Self {
            api: Api::all_with(client.clone(), &egress_resource()),
            pools: Api::all_with(client, &pool_resource()),
            published: Mutex::new(BTreeMap::new()),
            overwrote: Mutex::new(BTreeMap::new()),
            held_back: AtomicBool::new(false),
            usage: Mutex::new(BTreeMap::new()),
        }
    }

    /// Brings `pool`'s `status.usage` to `want` (read from the object first when `known` is
    /// `None`); returns what it is then, or `None` when the pool does not exist.
    async fn sync_pool(
        &self,
        pool: &str,
        want: &Value,
        known: Option<Value>,
    ) -> Result<Option<Value>, EgressStatusError> {
        let err = |op| {
            move |source| EgressStatusError::PoolApi {
                op,
                pool: pool.to_owned(),
                source,
            }
        };
        let have = match known {
            Some(v) => v,
            None => match self.pools.get(pool).await {
                Ok(o) => o.data["status"]["usage"].clone(),
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
                Err(e) => return Err(err("reading")(e)),
            },
        };
        if have == *want {
            return Ok(Some(have));
        }
        let body = json!({ "status": { "usage": want } });
        match self
            .pools
            .patch_status(pool, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => {
                tracing::debug!(pool, usage = %want, "ExternalIPPool usage written");
                Ok(Some(want.clone()))
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(e) => Err(err("patching")(e)),
        }
    }

    /// The status `egress` has in the API; `None` when the Egress does not exist.
    async fn current(&self, egress: &str) -> Result<Option<Seen>, EgressStatusError> {
        // The object itself (the ClusterRole grants `get` on egresses, not on their status).
        match self.api.get(egress).await {
            Ok(o) => Ok(Some(Seen {
                status: o.data.get("status").cloned().unwrap_or(Value::Null),
                version: o.metadata.resource_version,
            })),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(source) => Err(EgressStatusError::Api {
                op: "reading",
                egress: egress.to_owned(),
                source,
            }),
        }
    }

    /// Brings `egress`'s status in the API to `want` (see the module doc on conflicts);
    /// returns what it is then, or `None` when the Egress does not exist.
    async fn sync_one(
        &self,
        egress: &str,
        want: &Value,
        known: Option<Seen>,
        now: &str,
        me: &str,
    ) -> Result<Option<Seen>, EgressStatusError> {
        let mut have = match known {
            Some(v) => v,
            None => match self.current(egress).await? {
                Some(v) => v,
                None => return Ok(None),
            },
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let status = with_transition_times(want, &have.status, now);
            if !differs(&have.status, &status) {
                return Ok(Some(have));
            }
            let mut body = json!({ "status": patch_of(&have.status, &status) });
            if let Some(v) = &have.version {
                body["metadata"] = json!({ "resourceVersion": v });
            }
            match self
                .api
                .patch_status(egress, &PatchParams::default(), &Patch::Merge(&body))
                .await
            {
                Ok(o) => {
                    tracing::debug!(egress, status = %status, "Egress status written");
                    return Ok(Some(Seen {
                        status,
                        version: o.metadata.resource_version,
                    }));
                }
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
                Err(kube::Error::Api(s)) if s.code == 409 && attempt < CONFLICT_TRIES => {
                    have = match self.current(egress).await? {
                        Some(v) => v,
                        None => return Ok(None),
                    };
                    if on_conflict(&have.status, want, me) == OnConflict::Yield {
                        tracing::warn!(
                            egress,
                            recorded = %have.status["egressIP"],
                            by = %have.status["egressNode"],
                            "another node recorded another IP for this Egress first; its allocation stands"
                        );
                        return Ok(Some(have));
                    }
                }
                Err(source) => {
                    return Err(EgressStatusError::Api {
                        op: "patching",
                        egress: egress.to_owned(),
                        source,
                    });
                }
            }
        }
    }
}

/// Whether what this node wrote or read of an Egress's status still stands, given what the
/// source's watch last saw in the object (`None`: the source has no status to go by).
fn still_current(seen: &Seen, observed: Option<&Observed>) -> bool {
    observed.is_none_or(|o| o.agrees_with(&seen.status))
}

/// `want` with each condition's `lastTransitionTime`: the one in `have` when that condition's
/// `status` is unchanged, `now` otherwise.
pub fn with_transition_times(want: &Value, have: &Value, now: &str) -> Value {
    let mut out = want.clone();
    if let Some(conds) = out.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conds {
            let before = have["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|h| h["type"] == c["type"]);
            let time = match before {
                Some(h) if h["status"] == c["status"] && h["lastTransitionTime"].is_string() => {
                    h["lastTransitionTime"].clone()
                }
                _ => json!(now),
            };
            c["lastTransitionTime"] = time;
        }
    }
    out
}

/// Whether the fields this node writes differ between `have` and `status`.
pub fn differs(have: &Value, status: &Value) -> bool {
    FIELDS
        .iter()
        .chain(["conditions"].iter())
        .any(|f| have.get(*f) != status.get(*f))
}

/// The merge patch of `status` over `have`: every field this node writes, and `null` for one
/// `have` has and `status` has not.
fn patch_of(have: &Value, status: &Value) -> Value {
    let mut p = status.clone();
    for f in FIELDS {
        if status.get(f).is_none() && have.get(f).is_some() {
            p[f] = Value::Null;
        }
    }
    p
}

#[async_trait::async_trait]
impl EgressStatusSink for KubeEgressStatusSink {
    async fn publish_egresses(&self, statuses: &EgressStatuses) -> Result<(), EgressStatusError> {
        let held = statuses.responsible();
        let mut published = self.published.lock().await;
        // An Egress another node holds now is written by that node; if it comes back here,
        // what the API holds then is read again.
        published.retain(|name, _| held.contains_key(name));
        let now = serde_json::to_value(Time(Timestamp::now()))
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut first_err = None;
        let mut overwrote = self.overwrote.lock().await;
        overwrote.retain(|name, _| held.contains_key(name));
        let mut held_back = false;
        for (name, want) in &held {
            let mut known = published.get(name).cloned();
            if let Some(seen) = &known
                && !still_current(seen, statuses.observed.get(name))
            {
                // Written over since: what the API holds now decides.
                known = match self.current(name).await {
                    Ok(v) => v,
                    Err(e) => {
                        first_err.get_or_insert(e);
                        continue;
                    }
                };
                let Some(have) = &known else {
                    published.remove(name);
                    continue;
                };
                let by = have.status["egressNode"].as_str();
                if by.is_some_and(|n| n != statuses.node) {
                    if overwrote
                        .get(name)
                        .is_some_and(|t| t.elapsed() < OVERWRITE_EVERY)
                    {
                        tracing::debug!(egress = %name, by, "another node's record held until the next resync");
                        published.insert(name.clone(), have.clone());
                        held_back = true;
                        continue;
                    }
                    tracing::info!(egress = %name, by, "the status names another node; this node holds the IP and writes it back");
                    overwrote.insert(name.clone(), Instant::now());
                }
            }
            match self.sync_one(name, want, known, &now, &statuses.node).await {
                Ok(Some(v)) => {
                    published.insert(name.clone(), v);
                }
                Ok(None) => {
                    tracing::debug!(egress = %name, "Egress gone; its status needs nothing");
                    published.remove(name);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        drop(published);
        drop(overwrote);
        self.held_back.store(held_back, Ordering::Relaxed);
        let mut usage = self.usage.lock().await;
        usage.retain(|name, _| statuses.pools.contains_key(name));
        for (name, u) in &statuses.pools {
            let want = json!({ "total": u.total, "used": u.used });
            let known = usage.get(name).cloned();
            match self.sync_pool(name, &want, known).await {
                Ok(Some(v)) => {
                    usage.insert(name.clone(), v);
                }
                Ok(None) => {
                    usage.remove(name);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn held_back(&self) -> bool {
        self.held_back.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(kind: &str, status: &str, time: Option<&str>) -> Value {
        let mut c = json!({"type": kind, "status": status, "reason": "r", "message": ""});
        if let Some(t) = time {
            c["lastTransitionTime"] = json!(t);
        }
        c
    }

    #[test]
    fn transition_time_changes_only_with_the_conditions_status() {
        let have = json!({"egressIP": "10.0.0.1", "egressNode": "n1", "conditions": [
            cond("IPAllocated", "True", Some("T0")), cond("IPAssigned", "False", Some("T0"))]});
        let want = json!({"egressIP": "10.0.0.1", "egressNode": "n1", "conditions": [
            cond("IPAllocated", "True", None), cond("IPAssigned", "True", None)]});
        let s = with_transition_times(&want, &have, "T1");
        assert_eq!(s["conditions"][0]["lastTransitionTime"], "T0");
        assert_eq!(s["conditions"][1]["lastTransitionTime"], "T1");
        assert!(differs(&have, &s));
        // Written once: the same status again is no change.
        let again = with_transition_times(&want, &s, "T2");
        assert_eq!(again, s);
        assert!(!differs(&s, &again));
        // Nothing in the API yet: every condition starts now.
        let fresh = with_transition_times(&want, &Value::Null, "T3");
        assert_eq!(fresh["conditions"][0]["lastTransitionTime"], "T3");
        assert!(differs(&Value::Null, &fresh));
    }

    #[test]
    fn a_write_of_another_node_seen_by_the_watch_voids_what_was_remembered() {
        let seen = Seen {
            status: json!({"egressIP": "10.0.0.1", "egressNode": "n1", "conditions": []}),
            version: Some("7".into()),
        };
        let ours = Observed {
            ip: Some("10.0.0.1".parse().unwrap()),
            node: Some("n1".into()),
        };
        assert!(still_current(&seen, Some(&ours)));
        // No status to go by (the files source): what was written stands.
        assert!(still_current(&seen, None));
        // n2 wrote the same IP late, or the status was cleared: read again.
        let late = Observed {
            node: Some("n2".into()),
            ..ours.clone()
        };
        assert!(!still_current(&seen, Some(&late)));
        assert!(!still_current(&seen, Some(&Observed::default())));
    }

    #[test]
    fn a_conflict_yields_only_to_another_nodes_other_ip() {
        let want = json!({"egressIP": "10.0.0.1", "egressNode": "n1"});
        // Another node recorded another IP first: it stands.
        let other = json!({"egressIP": "10.0.0.2", "egressNode": "n2"});
        assert_eq!(on_conflict(&other, &want, "n1"), OnConflict::Yield);
        // The same IP by another node (a handover), nothing recorded, or our own record
        // (a write of ours raced a condition change): write again.
        let same = json!({"egressIP": "10.0.0.1", "egressNode": "n2"});
        assert_eq!(on_conflict(&same, &want, "n1"), OnConflict::Retry);
        assert_eq!(on_conflict(&Value::Null, &want, "n1"), OnConflict::Retry);
        let mine = json!({"egressIP": "10.0.0.9", "egressNode": "n1"});
        assert_eq!(on_conflict(&mine, &want, "n1"), OnConflict::Retry);
    }

    #[test]
    fn a_field_no_longer_reported_is_removed_by_the_patch() {
        let have = json!({"egressIP": "10.0.0.1", "egressNode": "n1"});
        let status = json!({"egressNode": "n1", "conditions": []});
        let p = patch_of(&have, &status);
        assert_eq!(p["egressIP"], Value::Null);
        assert_eq!(p["egressNode"], "n1");
        assert_eq!(
            egress_resource().plural,
            "egresses",
            "the resource the ClusterRole grants egresses/status on"
        );
    }
}
