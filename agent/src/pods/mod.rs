//! The life cycle of local pod attachments: ADD, DEL, CHECK, GC, and reconciliation at start.
//!
//! Contract (what the CNI server relies on):
//! - Operations on one attachment (`container/ifname`) are serialised by a per-container lock;
//!   different containers proceed in parallel.
//! - ADD is all-or-nothing: when it fails, everything it did (store record, IP, veth,
//!   dataplane entries) is undone before the error is returned. A repeated ADD of an existing
//!   attachment returns the same IP.
//! - DEL is idempotent and needs neither the store record nor the netns.
//! - The store record is written while the kernel is configured; after a crash at any point
//!   [`PodManager::reconcile`] finds a record whose veth exists (kept), a record without a veth
//!   (removed, IP released) or a veth without a record (deleted).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

pub mod check;
pub mod error;
pub mod ipam;
pub mod netns;
pub mod note;
pub mod podnet;
pub mod store;

pub use error::PodError;

use crate::dataplane::{Dataplane, NodeNetwork, PodEndpoint};
use check::PrevResult;
use ipam::{Ipam, IpamError};
use podnet::{PodNet, PodNetError, PodNetSpec};
use store::{PodRecord, Store};

/// What an ADD needs besides the attachment's identity.
#[derive(Clone, Debug, Default)]
pub struct AddArgs {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_NETNS.
    pub netns: String,
    /// Pod namespace from CNI_ARGS.
    pub pod_namespace: String,
    /// Pod name from CNI_ARGS.
    pub pod_name: String,
}

/// What an ADD asks for beyond an address from the pool ([`PodManager::add_with`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// The address the runtime asked for (CNI_ARGS `IP`, `args.cni.ips`, `runtimeConfig.ips`).
    pub ip: Option<Requested<StaticIp>>,
    /// The pod interface's MAC the runtime asked for (CNI_ARGS `MAC`, `args.cni.mac`,
    /// `runtimeConfig.mac`).
    pub mac: Option<Requested<[u8; 6]>>,
}

/// A value the runtime asked for, with how it said so (for errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requested<T> {
    /// The value.
    pub value: T,
    /// How the runtime gave it, as errors quote it: `CNI_ARGS IP=10.244.1.9`,
    /// `runtimeConfig.mac "02:00:00:00:00:01"`.
    pub origin: String,
    /// From the environment (CNI_ARGS: a refusal is code 4) or the configuration (code 7).
    pub from_env: bool,
}

/// A static address: the IP, and the prefix length when the runtime gave one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticIp {
    /// The address.
    pub ip: Ipv4Addr,
    /// Its prefix length, if the runtime wrote `ip/prefix`.
    pub prefix_len: Option<u8>,
}

/// What reconciliation at start found and fixed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Attachments kept (interface present, netns present).
    pub kept: usize,
    /// Records removed because their interface or netns was gone.
    pub stale_records: Vec<String>,
    /// Host interfaces deleted because no record owned them.
    pub orphan_links: Vec<String>,
    /// Dataplane entries removed because no record owned them.
    pub orphan_dataplane: Vec<Ipv4Addr>,
    /// Records rebuilt from the notes of host veths ([`note`]) because the state store had
    /// lost them (only when reconciling after a damaged store: [`PodManager::reconcile_rebuilding`]).
    pub rebuilt: Vec<String>,
    /// Host veths whose note could not be used, with the reason (only when rebuilding; they
    /// are deleted with the orphans).
    pub unusable_notes: Vec<String>,
    /// Kept veths whose note was missing or stale and was rewritten (made by an older agent).
    pub notes_rewritten: usize,
}

/// Owns the local attachments of the node.
pub struct PodManager {
    store: Arc<Store>,
    ipam: Mutex<Ipam>,
    records: Mutex<HashMap<String, PodRecord>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    podnet: Arc<dyn PodNet>,
    dataplane: Arc<dyn Dataplane>,
    node: NodeNetwork,
    veth_prefix: String,
    /// Bumped whenever the set of attachments changes (ADD, DEL, reconcile), so controllers
    /// that follow local pods (NodePortLocal) react at once.
    changes: tokio::sync::watch::Sender<u64>,
}

impl PodManager {
    /// Builds the manager over a store and the node's pod CIDR. Call [`Self::reconcile`]
    /// before serving requests.
    pub fn new(
        store: Store,
        podnet: Arc<dyn PodNet>,
        dataplane: Arc<dyn Dataplane>,
        node: NodeNetwork,
        veth_prefix: String,
    ) -> Result<Self, PodError> {
        let ipam = Ipam::new(node.pod_cidr)?;
        Ok(Self {
            store: Arc::new(store),
            ipam: Mutex::new(ipam),
            records: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            podnet,
            dataplane,
            node,
            veth_prefix,
            changes: tokio::sync::watch::channel(0).0,
        })
    }

    /// A receiver that sees a new value whenever attachments were added or removed.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The state store (shared with other controllers that persist state, such as NPL).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The node network the manager serves.
    pub fn node(&self) -> &NodeNetwork {
        &self.node
    }

    /// The dataplane in use.
    pub fn dataplane(&self) -> &Arc<dyn Dataplane> {
        &self.dataplane
    }

    /// A snapshot of all attachments.
    pub fn records(&self) -> Vec<PodRecord> {
        self.records
            .lock()
            .expect("records lock")
            .values()
            .cloned()
            .collect()
    }

    /// The attachment recorded under `key`, if any.
    fn record(&self, key: &str) -> Option<PodRecord> {
        self.records.lock().expect("records lock").get(key).cloned()
    }

    fn lock_for(&self, container_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.locks.lock().expect("locks lock");
        // Drop locks nobody holds any more so the map does not grow with every pod ever seen.
        if l.len() > 1024 {
            l.retain(|_, m| Arc::strong_count(m) > 1);
        }
        l.entry(container_id.to_owned()).or_default().clone()
    }

    fn spec(&self, rec: &PodRecord) -> PodNetSpec {
        PodNetSpec {
            netns: rec.netns.clone(),
            ifname: rec.ifname.clone(),
            host_ifname: rec.host_ifname.clone(),
            host_mac: rec.host_mac,
            pod_mac: rec.pod_mac,
            ip: rec.ip,
            prefix_len: rec.prefix_len,
            gateway: rec.gateway,
            mtu: self.node.mtu,
            tx_checksum_offload: self.dataplane.pod_tx_checksum_offload(),
            note: note::encode(rec),
        }
    }

    fn endpoint(rec: &PodRecord, host_ifindex: u32) -> PodEndpoint {
        PodEndpoint {
            container_id: rec.container_id.clone(),
            host_ifname: rec.host_ifname.clone(),
            host_ifindex,
            host_mac: rec.host_mac,
            pod_mac: rec.pod_mac,
            ip: rec.ip,
        }
    }

    /// CNI ADD with an address from the pool and the MAC derived from it. See the module doc
    /// for the contract.
    pub async fn add(&self, args: &AddArgs) -> Result<PodRecord, PodError> {
        self.add_with(args, &Requests::default()).await
    }

    /// CNI ADD with the static address and MAC in `req`, if any: honoured, or refused with
    /// [`PodError::Refused`] naming the value and the reason (outside the pod CIDR, reserved,
    /// used by another attachment; a repeated ADD asking for another value than it has).
    pub async fn add_with(&self, args: &AddArgs, want: &Requests) -> Result<PodRecord, PodError> {
        let lock = self.lock_for(&args.container_id);
        let _held = lock.lock().await;
        let key = store::key(&args.container_id, &args.ifname);
        if let Some(rec) = self.record(&key) {
            // A repeated ADD keeps the attachment's identity; one that asks for another
            // address or MAC is refused rather than answered with what it did not ask for.
            if let Some(req) = &want.ip
                && req.value.ip != rec.ip
            {
                return Err(refused(
                    req,
                    format!(
                        "container {} already has {} on {} (DEL it first)",
                        rec.container_id, rec.ip, rec.ifname
                    ),
                ));
            }
            if let Some(req) = &want.mac
                && req.value != rec.pod_mac
            {
                return Err(refused(
                    req,
                    format!(
                        "container {} already has MAC {} on {} (DEL it first)",
                        rec.container_id,
                        podnet::fmt_mac(&rec.pod_mac),
                        rec.ifname
                    ),
                ));
            }
            // If the plumbing is intact, just answer; otherwise rebuild it with the recorded
            // identity. A netns path that is no network namespace fails as such, without
            // tearing anything down.
            if rec.netns == args.netns {
                match self.podnet.check(&self.spec(&rec)).await {
                    Ok(()) => {
                        if let Some(idx) = self.podnet.host_ifindex(&rec.host_ifname).await? {
                            self.dataplane.add_pod(&Self::endpoint(&rec, idx)).await?;
                            return Ok(rec);
                        }
                    }
                    Err(e @ (PodNetError::NotNetns { .. } | PodNetError::Netns { .. })) => {
                        return Err(e.into());
                    }
                    Err(_) => {}
                }
            }
            self.teardown(&rec).await?;
            let rec = PodRecord {
                netns: args.netns.clone(),
                ..rec
            };
            return self.store_and_plumb(rec).await;
        }

        let ip = self.allocate(want.ip.as_ref(), &key)?;
        let (host_mac, derived_mac) = podnet::macs_for(ip);
        let mut rec = PodRecord {
            container_id: args.container_id.clone(),
            ifname: args.ifname.clone(),
            ip,
            prefix_len: self.node.pod_cidr.prefix(),
            gateway: self.node.gateway,
            netns: args.netns.clone(),
            host_ifname: podnet::host_ifname(&self.veth_prefix, &args.container_id, &args.ifname),
            host_mac,
            pod_mac: derived_mac,
            pod_namespace: args.pod_namespace.clone(),
            pod_name: args.pod_name.clone(),
        };
        {
            // The MAC is checked against the other attachments and the record entered in one
            // critical section, so two ADDs asking for one MAC cannot both pass.
            let mut recs = self.records.lock().expect("records lock");
            if let Some(req) = &want.mac {
                if let Err(reason) = mac_refusal(req.value, derived_mac, &key, &recs) {
                    drop(recs);
                    self.ipam.lock().expect("ipam lock").release(ip);
                    return Err(refused(req, reason));
                }
                rec.pod_mac = req.value;
            }
            recs.insert(key, rec.clone());
        }
        self.store_and_plumb(rec).await
    }

    /// The address for a new attachment: the requested one if it may be had, else the next
    /// free one.
    fn allocate(
        &self,
        want: Option<&Requested<StaticIp>>,
        key: &str,
    ) -> Result<Ipv4Addr, PodError> {
        let Some(req) = want else {
            return Ok(self.ipam.lock().expect("ipam lock").allocate(key)?);
        };
        let cidr = self.node.pod_cidr;
        if let Some(p) = req.value.prefix_len
            && p != cidr.prefix()
        {
            return Err(refused(
                req,
                format!("prefix length /{p} is not that of this node's pod CIDR {cidr}"),
            ));
        }
        let res = self
            .ipam
            .lock()
            .expect("ipam lock")
            .allocate_exact(req.value.ip, key);
        match res {
            Ok(()) => Ok(req.value.ip),
            Err(IpamError::InUse { owner, .. }) => Err(refused(
                req,
                format!("already used by {}", self.owner_name(&owner)),
            )),
            Err(IpamError::OutsideCidr { .. }) => {
                Err(refused(req, format!("outside this node's pod CIDR {cidr}")))
            }
            Err(IpamError::Reserved { what, .. }) => {
                Err(refused(req, format!("it is the {what} of pod CIDR {cidr}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// An attachment as errors name it: `container X (interface eth0, pod ns/name)`.
    fn owner_name(&self, key: &str) -> String {
        match self.record(key) {
            Some(r) if !r.pod_name.is_empty() => format!(
                "container {} (interface {}, pod {}/{})",
                r.container_id,
                r.ifname,
                if r.pod_namespace.is_empty() {
                    "default"
                } else {
                    &r.pod_namespace
                },
                r.pod_name
            ),
            Some(r) => format!("container {} (interface {})", r.container_id, r.ifname),
            None => format!("attachment {key}"),
        }
    }

    /// Writes the record and creates the interfaces and dataplane entries at the same time
    /// (the store's fsync overlaps the netlink work, the two slowest steps of an ADD). Either
    /// order is crash-safe: reconciliation removes a veth without a record and a record without
    /// a veth. On any failure everything is undone and the IP released.
    async fn store_and_plumb(&self, rec: PodRecord) -> Result<PodRecord, PodError> {
        self.records
            .lock()
            .expect("records lock")
            .insert(rec.key(), rec.clone());
        let store = self.store.clone();
        let to_store = rec.clone();
        let put = tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            let r = store.put(&to_store);
            tracing::debug!(
                elapsed_us = t.elapsed().as_micros() as u64,
                "store record written"
            );
            r
        });
        let plumbed = self.plumb(&rec).await;
        let stored = put.await.unwrap_or_else(|e| {
            Err(crate::pods::store::StoreError::Task {
                op: "put",
                source: e,
            })
        });
        let recorded = stored.is_ok();
        let err = match (plumbed, stored) {
            (Ok(()), Ok(())) => {
                self.notify();
                return Ok(rec);
            }
            (Ok(()), Err(e)) => {
                self.undo_plumb(&rec).await;
                PodError::from(e)
            }
            (Err(e), _) => e,
        };
        tracing::warn!(container_id = %rec.container_id, error = %err, "ADD failed; rolled back");
        // A write that failed (a full disk) left no record to remove; the error returned is
        // the one that failed the ADD, not a second one from the rollback.
        if recorded && let Err(e) = self.store.delete(&[rec.key()]) {
            // The record outlives the veth, so the next start removes it; until then its
            // address stays reserved, so that no other pod is given it meanwhile.
            tracing::warn!(container_id = %rec.container_id, error = %e,
                "removing the record of a failed ADD; its address stays reserved until restart");
            self.records
                .lock()
                .expect("records lock")
                .remove(&rec.key());
            self.notify();
            return Err(err);
        }
        self.release(&rec);
        Err(err)
    }

    /// Creates the interfaces and dataplane entries of an attachment; undoes them on failure.
    async fn plumb(&self, rec: &PodRecord) -> Result<(), PodError> {
        let t = std::time::Instant::now();
        // The backend's preparation (OVS: the pod's flows) goes first: creating the veth makes
        // ovs-vswitchd reconfigure its bridges (it follows every link change in the node's
        // namespace), and flows sent after that wait behind the whole reconfiguration.
        let created = async {
            self.dataplane.prepare_pod(&Self::endpoint(rec, 0)).await?;
            Ok::<_, PodError>(self.podnet.create(&self.spec(rec)).await?)
        }
        .await;
        tracing::debug!(
            elapsed_us = t.elapsed().as_micros() as u64,
            "pod interfaces created"
        );
        let idx = match created {
            Ok(idx) => idx,
            Err(e) => {
                // Undo the preparation too (teardown tolerates a missing veth).
                self.undo_plumb(rec).await;
                return Err(e);
            }
        };
        let t = std::time::Instant::now();
        let added = self.dataplane.add_pod(&Self::endpoint(rec, idx)).await;
        tracing::debug!(
            elapsed_us = t.elapsed().as_micros() as u64,
            "dataplane entries added"
        );
        if let Err(e) = added {
            self.undo_plumb(rec).await;
            return Err(e.into());
        }
        Ok(())
    }

    /// Best-effort removal of what [`Self::plumb`] created (errors are logged: the caller is
    /// already failing, and reconciliation catches leftovers).
    async fn undo_plumb(&self, rec: &PodRecord) {
        if let Err(e) = self.teardown(rec).await {
            tracing::warn!(container_id = %rec.container_id, error = %e, "undoing a failed ADD");
        }
    }

    /// Drops the in-memory record and releases the IP (the store record is already gone).
    fn release(&self, rec: &PodRecord) {
        self.records
            .lock()
            .expect("records lock")
            .remove(&rec.key());
        self.ipam.lock().expect("ipam lock").release(rec.ip);
        self.notify();
    }

    /// Removes dataplane entries and the veth of an attachment (not its record).
    async fn teardown(&self, rec: &PodRecord) -> Result<(), PodError> {
        let idx = self
            .podnet
            .host_ifindex(&rec.host_ifname)
            .await?
            .unwrap_or(0);
        self.dataplane.del_pod(&Self::endpoint(rec, idx)).await?;
        self.podnet.delete(&rec.host_ifname).await?;
        Ok(())
    }

    /// CNI DEL: idempotent; works without the record and without the netns.
    pub async fn del(&self, container_id: &str, ifname: &str) -> Result<(), PodError> {
        let lock = self.lock_for(container_id);
        let _held = lock.lock().await;
        let key = store::key(container_id, ifname);
        match self.record(&key) {
            Some(rec) => {
                // Deleting a veth costs the kernel ~20 ms (an RCU grace period); the store's
                // fsync runs meanwhile. A record deleted before a failed teardown is harmless:
                // a retried DEL or reconciliation removes the veth by its name. The IP is
                // released only once the veth and its routes are gone.
                let store = self.store.clone();
                let key = rec.key();
                let unstore = tokio::task::spawn_blocking(move || store.delete(&[key]));
                let torn = self.teardown(&rec).await;
                let unstored = unstore.await.unwrap_or_else(|e| {
                    Err(crate::pods::store::StoreError::Task {
                        op: "delete",
                        source: e,
                    })
                });
                torn?;
                unstored?;
                self.release(&rec);
            }
            None => {
                // Nothing recorded (a DEL after a failed ADD, or repeated): still remove an
                // interface with the deterministic name in case one is left.
                self.podnet
                    .delete(&podnet::host_ifname(
                        &self.veth_prefix,
                        container_id,
                        ifname,
                    ))
                    .await?;
            }
        }
        Ok(())
    }

    /// CNI CHECK: the attachment must be recorded and its interfaces, in `netns` (CNI_NETNS;
    /// empty: the recorded one), as configured; with `prev` (the runtime's `prevResult`) the
    /// interfaces, addresses and routes it lists must be there too ([`check::verify`]).
    pub async fn check(
        &self,
        container_id: &str,
        ifname: &str,
        netns: &str,
        prev: Option<&PrevResult>,
    ) -> Result<PodRecord, PodError> {
        let lock = self.lock_for(container_id);
        let _held = lock.lock().await;
        let key = store::key(container_id, ifname);
        let rec = self
            .record(&key)
            .ok_or_else(|| PodError::UnknownContainer {
                container_id: container_id.into(),
                ifname: ifname.into(),
            })?;
        let netns = if netns.is_empty() {
            rec.netns.clone()
        } else {
            netns.to_owned()
        };
        let spec = PodNetSpec {
            netns: netns.clone(),
            ..self.spec(&rec)
        };
        self.podnet.check(&spec).await?;
        if let Some(prev) = prev {
            let side = self.podnet.inspect(&netns, ifname).await?;
            check::verify(prev, &rec, &netns, &side)?;
        }
        Ok(rec)
    }

    /// CNI GC: removes every attachment not listed in `valid` (pairs of container ID and
    /// ifname). Returns the keys removed.
    pub async fn gc(&self, valid: &HashSet<(String, String)>) -> Result<Vec<String>, PodError> {
        let stale: Vec<PodRecord> = self
            .records()
            .into_iter()
            .filter(|r| !valid.contains(&(r.container_id.clone(), r.ifname.clone())))
            .collect();
        let mut removed = Vec::new();
        for r in stale {
            self.del(&r.container_id, &r.ifname).await?;
            removed.push(r.key());
        }
        Ok(removed)
    }

    /// Reconciles the store, the kernel and the dataplane after a (re)start: keeps attachments
    /// whose veth and netns still exist (re-asserting their dataplane entries), removes records
    /// whose pod is gone, veths no record owns, and dataplane entries no record owns.
    pub async fn reconcile(&self) -> Result<ReconcileReport, PodError> {
        self.reconcile_with(false).await
    }

    /// [`Self::reconcile`] after the state store was found damaged and rebuilt empty (or with
    /// what could be salvaged): first every host veth whose [`note`] describes an attachment
    /// the store does not hold gets its record back, so running pods keep their network and
    /// their addresses; veths without a usable note are then deleted as orphans, as always.
    pub async fn reconcile_rebuilding(&self) -> Result<ReconcileReport, PodError> {
        self.reconcile_with(true).await
    }

    async fn reconcile_with(&self, rebuild: bool) -> Result<ReconcileReport, PodError> {
        let mut report = ReconcileReport::default();
        let mut keep_ips = HashSet::new();
        let mut keep_links = HashSet::new();
        let mut torn_down = HashSet::new();
        let links = self.podnet.list_host_links(&self.veth_prefix).await?;
        let mut records = self.store.list()?;
        if rebuild {
            let held: HashSet<String> = records.iter().map(|r| r.host_ifname.clone()).collect();
            for l in links.iter().filter(|l| !held.contains(&l.name)) {
                match note::decode(
                    l.alias.as_deref(),
                    &l.name,
                    &self.veth_prefix,
                    self.node.pod_cidr,
                ) {
                    Ok(rec) if records.iter().any(|r| r.ip == rec.ip) => {
                        report.unusable_notes.push(format!(
                            "{}: its address {} is another attachment's",
                            l.name, rec.ip
                        ));
                    }
                    Ok(rec) => {
                        tracing::info!(container_id = %rec.container_id, ip = %rec.ip,
                            ifname = %l.name, "attachment rebuilt from its interface's note");
                        self.store.put(&rec)?;
                        report.rebuilt.push(rec.key());
                        records.push(rec);
                    }
                    Err(e) => report.unusable_notes.push(format!("{}: {e}", l.name)),
                }
            }
        }
        let aliases: HashMap<&str, Option<&str>> = links
            .iter()
            .map(|l| (l.name.as_str(), l.alias.as_deref()))
            .collect();
        for rec in records {
            let key = rec.key();
            let in_cidr = self.ipam.lock().expect("ipam lock").restore(rec.ip, &key);
            let idx = self.podnet.host_ifindex(&rec.host_ifname).await?;
            let netns_alive = self.podnet.netns_exists(&rec.netns);
            match (in_cidr, idx, netns_alive) {
                (true, Some(idx), true) => {
                    self.dataplane.add_pod(&Self::endpoint(&rec, idx)).await?;
                    let want = note::encode(&rec);
                    let have = aliases.get(rec.host_ifname.as_str()).copied().flatten();
                    if let Some(want) = want.filter(|w| have != Some(w.as_str())) {
                        self.podnet.set_note(&rec.host_ifname, &want).await?;
                        report.notes_rewritten += 1;
                    }
                    keep_ips.insert(rec.ip);
                    keep_links.insert(rec.host_ifname.clone());
                    self.records.lock().expect("records lock").insert(key, rec);
                    report.kept += 1;
                }
                _ => {
                    tracing::info!(container_id = %rec.container_id, ip = %rec.ip,
                        "removing attachment whose pod is gone (or outside the pod CIDR)");
                    self.teardown(&rec).await?;
                    torn_down.insert(rec.host_ifname.clone());
                    self.store.delete(std::slice::from_ref(&key))?;
                    if in_cidr {
                        self.ipam.lock().expect("ipam lock").release(rec.ip);
                    }
                    report.stale_records.push(key);
                }
            }
        }
        for link in links.into_iter().map(|l| l.name) {
            if !keep_links.contains(&link) && !torn_down.contains(&link) {
                tracing::info!(ifname = %link, "deleting pod interface no attachment owns");
                self.podnet.delete(&link).await?;
                report.orphan_links.push(link);
            }
        }
        report.orphan_dataplane = self.dataplane.retain_pods(&keep_ips).await?;
        self.notify();
        Ok(report)
    }
}

/// The refusal of a requested value.
fn refused<T>(req: &Requested<T>, reason: String) -> PodError {
    PodError::Refused {
        origin: req.origin.clone(),
        reason,
        from_env: req.from_env,
    }
}

/// Why `mac` may not be a new attachment's (`key`) MAC, given the MAC ferrea would derive for
/// its address and the other attachments; `Ok` if it may.
fn mac_refusal(
    mac: [u8; 6],
    derived: [u8; 6],
    key: &str,
    records: &HashMap<String, PodRecord>,
) -> Result<(), String> {
    if mac == derived {
        return Ok(());
    }
    if mac == [0; 6] {
        return Err("it is the all-zero address".into());
    }
    if mac[0] & 1 == 1 {
        return Err("it is a multicast address".into());
    }
    if matches!(mac[..2], [0x0a, 0x58] | [0x0e, 0x58]) {
        return Err(
            "it is in the range ferrea derives pod and host MACs from (0a:58:<IP> and 0e:58:<IP>)"
                .into(),
        );
    }
    if let Some(r) = records
        .values()
        .find(|r| r.key() != key && (r.pod_mac == mac || r.host_mac == mac))
    {
        return Err(format!(
            "already used by container {} (interface {})",
            r.container_id, r.ifname
        ));
    }
    Ok(())
}

/// The records that the notes on the host veths with `veth_prefix` describe (see [`note`]);
/// veths without a usable note, or a failure to list them, give none. Used before the pod
/// manager exists, to rebuild what else a lost store held.
pub async fn noted_records(
    podnet: &dyn PodNet,
    veth_prefix: &str,
    pod_cidr: ipnetwork::Ipv4Network,
) -> Vec<PodRecord> {
    match podnet.list_host_links(veth_prefix).await {
        Ok(links) => links
            .iter()
            .filter_map(|l| note::decode(l.alias.as_deref(), &l.name, veth_prefix, pod_cidr).ok())
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "listing pod interfaces for their notes");
            Vec::new()
        }
    }
}

/// This node's pods as Kubernetes knows them: each attachment that carries a pod identity
/// (CNI_ARGS `K8S_POD_NAMESPACE`/`K8S_POD_NAME`) joined with the Pod object of that
/// namespace/name, unless the object says it runs on another node. Keyed by `namespace/name`,
/// with the address from the attachment (in `files` mode nothing else knows it). Two
/// sandboxes of one pod (a restart whose DEL has not come yet): the one whose IP the Pod's
/// status names, else the first by container ID.
pub fn local_pods<'a>(
    state: &'a crate::source::DesiredState,
    records: &[PodRecord],
    node_name: &str,
) -> std::collections::BTreeMap<String, (Ipv4Addr, &'a crate::source::PodInfo)> {
    use std::collections::BTreeMap;
    let mut local = BTreeMap::new();
    let mut by_pod: BTreeMap<String, Vec<&PodRecord>> = BTreeMap::new();
    for r in records.iter().filter(|r| !r.pod_name.is_empty()) {
        let ns = if r.pod_namespace.is_empty() {
            "default"
        } else {
            &r.pod_namespace
        };
        by_pod
            .entry(crate::source::object_key(ns, &r.pod_name))
            .or_default()
            .push(r);
    }
    for (key, mut recs) in by_pod {
        let Some(pod) = state.pods.get(&key) else {
            continue;
        };
        if pod.node_name.as_deref().is_some_and(|n| n != node_name) {
            continue;
        }
        recs.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        let rec = recs
            .iter()
            .find(|r| Some(r.ip) == pod.pod_ip)
            .unwrap_or(&recs[0]);
        local.insert(key, (rec.ip, pod));
    }
    local
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeDataplane, FakePodNet};

    struct Fx {
        dir: tempfile::TempDir,
        pn: Arc<FakePodNet>,
        dp: Arc<FakeDataplane>,
    }

    impl Fx {
        fn new() -> Self {
            let pn = Arc::new(FakePodNet::default());
            pn.netns
                .lock()
                .unwrap()
                .extend(["/ns/a".to_string(), "/ns/b".to_string()]);
            Self {
                dir: tempfile::tempdir().unwrap(),
                pn,
                dp: Arc::new(FakeDataplane::default()),
            }
        }
        fn manager(&self) -> PodManager {
            let node = NodeNetwork::standalone("10.244.1.0/24".parse().unwrap(), 1500);
            let store = Store::open(self.dir.path()).unwrap();
            PodManager::new(store, self.pn.clone(), self.dp.clone(), node, "fe".into()).unwrap()
        }
    }

    fn args(cid: &str, ns: &str) -> AddArgs {
        AddArgs {
            container_id: cid.into(),
            ifname: "eth0".into(),
            netns: ns.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn repeated_add_returns_the_same_ip() {
        let fx = Fx::new();
        let pm = fx.manager();
        let a = pm.add(&args("a", "/ns/a")).await.unwrap();
        let a2 = pm.add(&args("a", "/ns/a")).await.unwrap();
        let b = pm.add(&args("b", "/ns/b")).await.unwrap();
        assert_eq!(a.ip, a2.ip);
        assert_ne!(a.ip, b.ip);
        assert_eq!(a.ip, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(fx.pn.links.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn failed_add_rolls_back_everything() {
        let fx = Fx::new();
        let pm = fx.manager();
        *fx.dp.fail_add.lock().unwrap() = true;
        assert!(pm.add(&args("a", "/ns/a")).await.is_err());
        assert!(fx.pn.links.lock().unwrap().is_empty(), "veth left behind");
        assert!(
            fx.dp.pods.lock().unwrap().is_empty(),
            "dataplane entry left behind"
        );
        assert!(pm.records().is_empty());
        assert!(pm.store.list().unwrap().is_empty());
        // A netns that vanished: clear error, nothing kept.
        *fx.dp.fail_add.lock().unwrap() = false;
        let e = pm.add(&args("c", "/ns/gone")).await.unwrap_err();
        assert!(e.to_string().contains("/ns/gone"), "{e}");
        assert!(pm.records().is_empty());
        assert!(
            fx.dp.prepared.lock().unwrap().is_empty(),
            "the backend's preparation was not undone"
        );
        // A failed preparation: no veth is created at all.
        *fx.dp.fail_prepare.lock().unwrap() = true;
        let e = pm.add(&args("p", "/ns/a")).await.unwrap_err();
        assert!(e.to_string().contains("prepare"), "{e}");
        assert!(fx.pn.links.lock().unwrap().is_empty(), "veth created");
        *fx.dp.fail_prepare.lock().unwrap() = false;
        // The IPs were released: the next pod gets a valid one and all are accounted for.
        pm.add(&args("d", "/ns/a")).await.unwrap();
        assert_eq!(pm.ipam.lock().unwrap().allocated(), 1);
    }

    #[tokio::test]
    async fn del_is_idempotent_and_needs_no_record() {
        let fx = Fx::new();
        let pm = fx.manager();
        pm.del("nobody", "eth0").await.unwrap();
        let a = pm.add(&args("a", "/ns/a")).await.unwrap();
        fx.pn.netns.lock().unwrap().clear(); // the netns is gone
        pm.del("a", "eth0").await.unwrap();
        pm.del("a", "eth0").await.unwrap();
        assert!(fx.pn.links.lock().unwrap().is_empty());
        assert!(!fx.dp.pods.lock().unwrap().contains_key(&a.ip));
        assert!(pm.records().is_empty());
    }

    #[tokio::test]
    async fn check_reports_unknown_and_broken_attachments() {
        let fx = Fx::new();
        let pm = fx.manager();
        let e = pm.check("x", "eth0", "", None).await.unwrap_err();
        assert!(matches!(e, PodError::UnknownContainer { .. }), "{e}");
        let a = pm.add(&args("a", "/ns/a")).await.unwrap();
        pm.check("a", "eth0", "", None).await.unwrap();
        fx.pn.links.lock().unwrap().remove(&a.host_ifname);
        assert!(pm.check("a", "eth0", "", None).await.is_err());
    }

    #[tokio::test]
    async fn gc_keeps_only_valid_attachments() {
        let fx = Fx::new();
        let pm = fx.manager();
        pm.add(&args("a", "/ns/a")).await.unwrap();
        pm.add(&args("b", "/ns/b")).await.unwrap();
        let valid = HashSet::from([("a".to_string(), "eth0".to_string())]);
        let removed = pm.gc(&valid).await.unwrap();
        assert_eq!(removed, vec!["b/eth0".to_string()]);
        assert_eq!(pm.records().len(), 1);
        assert_eq!(fx.pn.links.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn reconcile_after_restart_keeps_live_pods_and_removes_the_rest() {
        let fx = Fx::new();
        let (a, b) = {
            let pm = fx.manager();
            (
                pm.add(&args("a", "/ns/a")).await.unwrap(),
                pm.add(&args("b", "/ns/b")).await.unwrap(),
            )
        };
        // While "down": pod b's veth vanished, a stray veth and a stray map entry appeared.
        fx.pn.links.lock().unwrap().remove(&b.host_ifname);
        fx.pn.add_stray("fe00000000000aa");
        let stray_ip = Ipv4Addr::new(10, 244, 1, 200);
        fx.dp.pods.lock().unwrap().insert(
            stray_ip,
            PodEndpoint {
                container_id: "z".into(),
                host_ifname: "x".into(),
                host_ifindex: 1,
                host_mac: [0; 6],
                pod_mac: [0; 6],
                ip: stray_ip,
            },
        );
        let pm = fx.manager();
        let r = pm.reconcile().await.unwrap();
        assert_eq!(r.kept, 1);
        assert_eq!(r.stale_records, vec!["b/eth0".to_string()]);
        assert_eq!(r.orphan_links, vec!["fe00000000000aa".to_string()]);
        assert!(r.orphan_dataplane.contains(&stray_ip));
        assert_eq!(pm.records().len(), 1);
        assert!(fx.dp.pods.lock().unwrap().contains_key(&a.ip));
        // b's IP is free again, a's is not handed out twice.
        let c = pm.add(&args("c", "/ns/b")).await.unwrap();
        assert_ne!(c.ip, a.ip);
        assert_eq!(pm.add(&args("a", "/ns/a")).await.unwrap().ip, a.ip);
    }

    #[tokio::test]
    async fn a_lost_store_is_rebuilt_from_the_notes_on_the_veths() {
        let fx = Fx::new();
        let (a, b) = {
            let pm = fx.manager();
            let a = pm.add(&args("a", "/ns/a")).await.unwrap();
            let b = pm
                .add_with(&args("b", "/ns/b"), &with_mac([2, 0, 0, 0, 0, 0xbb]))
                .await
                .unwrap();
            (a, b)
        };
        // A veth made by an older agent (no note), and one whose note is someone else's.
        fx.pn.add_stray("fe00000000000aa");
        let note_a = fx.pn.links.lock().unwrap()[&a.host_ifname]
            .1
            .as_ref()
            .unwrap()
            .note
            .clone()
            .unwrap();
        {
            let mut links = fx.pn.links.lock().unwrap();
            let mut spec = links[&a.host_ifname].1.clone().unwrap();
            spec.host_ifname = "fe00000000000bb".into();
            links.insert(spec.host_ifname.clone(), (77, Some(spec)));
        }
        // The store is lost while the agent is down.
        std::fs::remove_file(fx.dir.path().join(store::FILE)).unwrap();
        let pm = fx.manager();
        assert!(pm.records().is_empty());
        let r = pm.reconcile_rebuilding().await.unwrap();
        let mut rebuilt = r.rebuilt.clone();
        rebuilt.sort();
        assert_eq!(rebuilt, vec!["a/eth0".to_string(), "b/eth0".to_string()]);
        assert_eq!(r.kept, 2);
        assert_eq!(r.unusable_notes.len(), 2, "{:?}", r.unusable_notes);
        assert!(
            r.unusable_notes
                .iter()
                .any(|u| u.starts_with("fe00000000000aa: it has no alias")),
            "{:?}",
            r.unusable_notes
        );
        let mut orphans = r.orphan_links.clone();
        orphans.sort();
        assert_eq!(orphans, vec!["fe00000000000aa", "fe00000000000bb"]);
        // The records are what ADD wrote, the static MAC included, and durable again.
        let mut got = pm.store.list().unwrap();
        got.sort_by(|x, y| x.container_id.cmp(&y.container_id));
        assert_eq!(got, vec![a.clone(), b.clone()]);
        assert!(fx.dp.pods.lock().unwrap().contains_key(&b.ip));
        // Addresses are not handed out twice, and DEL works on a rebuilt attachment.
        let c = pm.add(&args("c", "/ns/a")).await.unwrap();
        assert!(c.ip != a.ip && c.ip != b.ip);
        pm.del("b", "eth0").await.unwrap();
        assert!(!fx.pn.links.lock().unwrap().contains_key(&b.host_ifname));
        // A plain reconcile (sound store) rewrites a note that is missing.
        fx.pn
            .links
            .lock()
            .unwrap()
            .get_mut(&a.host_ifname)
            .unwrap()
            .1
            .as_mut()
            .unwrap()
            .note = None;
        drop(pm);
        let pm = fx.manager();
        let r = pm.reconcile().await.unwrap();
        assert_eq!((r.kept, r.notes_rewritten), (2, 1));
        assert_eq!(
            fx.pn.links.lock().unwrap()[&a.host_ifname]
                .1
                .as_ref()
                .unwrap()
                .note,
            Some(note_a)
        );
    }

    fn with_ip(ip: &str) -> Requests {
        Requests {
            ip: Some(Requested {
                value: StaticIp {
                    ip: ip.parse().unwrap(),
                    prefix_len: None,
                },
                origin: format!("CNI_ARGS IP={ip}"),
                from_env: true,
            }),
            mac: None,
        }
    }

    fn with_mac(mac: [u8; 6]) -> Requests {
        Requests {
            ip: None,
            mac: Some(Requested {
                value: mac,
                origin: format!("CNI_ARGS MAC={}", podnet::fmt_mac(&mac)),
                from_env: true,
            }),
        }
    }

    #[tokio::test]
    async fn static_ips_are_honoured_or_refused_with_the_reason() {
        let fx = Fx::new();
        let pm = fx.manager();
        let a = pm
            .add_with(&args("a", "/ns/a"), &with_ip("10.244.1.77"))
            .await
            .unwrap();
        assert_eq!(a.ip, Ipv4Addr::new(10, 244, 1, 77));
        assert_eq!(fx.dp.pods.lock().unwrap()[&a.ip].ip, a.ip);
        // A repeated ADD asking for the same address is answered; another address is refused.
        assert_eq!(
            pm.add_with(&args("a", "/ns/a"), &with_ip("10.244.1.77"))
                .await
                .unwrap(),
            a
        );
        let e = pm
            .add_with(&args("a", "/ns/a"), &with_ip("10.244.1.78"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("already has 10.244.1.77"), "{e}");
        for (ip, why) in [
            (
                "10.244.1.77",
                "already used by container a (interface eth0)",
            ),
            ("10.244.2.5", "outside this node's pod CIDR 10.244.1.0/24"),
            ("10.244.1.1", "it is the gateway of pod CIDR 10.244.1.0/24"),
            ("10.244.1.0", "it is the network address of pod CIDR"),
            ("10.244.1.255", "it is the broadcast address of pod CIDR"),
        ] {
            let e = pm
                .add_with(&args("b", "/ns/b"), &with_ip(ip))
                .await
                .unwrap_err();
            assert!(
                e.to_string()
                    .starts_with(&format!("CNI_ARGS IP={ip} refused: {why}")),
                "{e}"
            );
            assert!(matches!(e, PodError::Refused { from_env: true, .. }));
        }
        let mut p = with_ip("10.244.1.9");
        p.ip.as_mut().unwrap().value.prefix_len = Some(16);
        let e = pm.add_with(&args("b", "/ns/b"), &p).await.unwrap_err();
        assert!(e.to_string().contains("prefix length /16"), "{e}");
        // Nothing was kept for b; a pool allocation never hands out the static address.
        assert_eq!(pm.records().len(), 1);
        assert_eq!(pm.ipam.lock().unwrap().allocated(), 1);
        for n in 0..100 {
            let r = pm.add(&args(&format!("p{n}"), "/ns/b")).await.unwrap();
            assert_ne!(r.ip, a.ip);
        }
        // After a restart the static address is still a's.
        drop(pm);
        let pm = fx.manager();
        pm.reconcile().await.unwrap();
        let e = pm
            .add_with(&args("c", "/ns/b"), &with_ip("10.244.1.77"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("already used by container a"), "{e}");
    }

    #[tokio::test]
    async fn static_macs_are_honoured_or_refused_with_the_reason() {
        let fx = Fx::new();
        let pm = fx.manager();
        let mac = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
        let a = pm
            .add_with(&args("a", "/ns/a"), &with_mac(mac))
            .await
            .unwrap();
        assert_eq!(a.pod_mac, mac);
        assert_eq!(fx.dp.pods.lock().unwrap()[&a.ip].pod_mac, mac);
        let spec = fx.pn.links.lock().unwrap()[&a.host_ifname]
            .1
            .clone()
            .unwrap();
        assert_eq!(spec.pod_mac, mac);
        for (m, why) in [
            (mac, "already used by container a"),
            ([0x01, 0, 0x5e, 0, 0, 1], "multicast"),
            ([0; 6], "all-zero"),
            ([0x0a, 0x58, 10, 244, 1, 99], "the range ferrea derives"),
            (a.host_mac, "the range ferrea derives"),
        ] {
            let e = pm
                .add_with(&args("b", "/ns/b"), &with_mac(m))
                .await
                .unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
        let e = pm
            .add_with(&args("a", "/ns/a"), &with_mac([2, 0, 0, 0, 0, 9]))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("already has MAC 02:42:ac:11:00:02"),
            "{e}"
        );
        assert_eq!(pm.records().len(), 1);
        assert_eq!(pm.ipam.lock().unwrap().allocated(), 1);
    }

    #[tokio::test]
    async fn subscribers_see_add_and_del() {
        let fx = Fx::new();
        let pm = fx.manager();
        let mut rx = pm.subscribe();
        rx.borrow_and_update();
        pm.add(&args("a", "/ns/a")).await.unwrap();
        assert!(rx.has_changed().unwrap(), "ADD not notified");
        rx.borrow_and_update();
        pm.del("a", "eth0").await.unwrap();
        assert!(rx.has_changed().unwrap(), "DEL not notified");
    }
}
