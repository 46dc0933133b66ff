//! Pods: network namespaces attached through the real `ferrea-cni` binary.
//!
//! [`Pod::add`] creates the namespace and runs ADD like a runtime would; dropping the pod runs
//! DEL (errors are printed, not raised: the agent may already be gone) and deletes the
//! namespace.

use std::net::Ipv4Addr;
use std::process::Output;

use anyhow::{Context, anyhow};

use crate::cni::{AddResult, Attachment, Cni, CniOutput};
use crate::netns::NetNs;

/// A pod attached through the CNI plugin.
#[derive(Debug)]
pub struct Pod {
    att: Attachment,
    result: AddResult,
    cni: Cni,
    ns: Option<NetNs>,
    deleted: bool,
}

impl Pod {
    /// Creates a pod namespace and runs ADD; fails with the plugin's output if ADD fails (the
    /// namespace is deleted again).
    pub fn add(cni: &Cni, role: &str) -> anyhow::Result<Pod> {
        Self::try_add(cni, role)?.map_err(|out| anyhow!("CNI ADD failed: {out}"))
    }

    /// Like [`Pod::add`], but a failing ADD is returned as `Ok(Err(output))` so tests can
    /// inspect the error (the namespace is deleted). Harness failures are `Err`.
    pub fn try_add(cni: &Cni, role: &str) -> anyhow::Result<Result<Pod, CniOutput>> {
        let ns = NetNs::new(role)?;
        let att = Attachment::for_netns(ns.name());
        let out = cni.add(&att)?;
        if !out.ok() {
            return Ok(Err(out));
        }
        let json = out
            .json
            .as_ref()
            .with_context(|| format!("ADD result is not JSON: {out}"))?;
        let result =
            AddResult::parse(json).with_context(|| format!("parsing ADD result {json}"))?;
        Ok(Ok(Pod {
            att,
            result,
            cni: cni.clone(),
            ns: Some(ns),
            deleted: false,
        }))
    }

    /// The pod's IPv4 address.
    pub fn ip(&self) -> Ipv4Addr {
        self.result.ip
    }

    /// Its gateway, from the CNI result.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.result.gateway
    }

    /// The host-side veth name, from the CNI result.
    pub fn host_ifname(&self) -> &str {
        &self.result.host_ifname
    }

    /// The parsed ADD result.
    pub fn result(&self) -> &AddResult {
        &self.result
    }

    /// The CNI identity of the attachment.
    pub fn attachment(&self) -> &Attachment {
        &self.att
    }

    /// The container ID.
    pub fn container_id(&self) -> &str {
        &self.att.container_id
    }

    /// The pod's namespace; panics after [`Pod::kill_netns`].
    pub fn ns(&self) -> &NetNs {
        self.ns.as_ref().expect("pod netns was deleted")
    }

    /// The namespace's name; panics after [`Pod::kill_netns`].
    pub fn name(&self) -> &str {
        self.ns().name()
    }

    /// Runs a tool inside the pod (`ip netns exec`).
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.ns().exec(argv)
    }

    /// `true` when the pod gets an answer to ICMP echo from `dst` (one retry).
    pub fn ping(&self, dst: Ipv4Addr) -> bool {
        crate::fabric::ping(self.name(), dst)
    }

    /// ADD again for this attachment, as a runtime retrying does; fails unless the plugin
    /// succeeds, and returns the parsed result (the agent must answer with what it has).
    pub fn add_again(&self) -> anyhow::Result<AddResult> {
        let out = self.cni.add(&self.att)?.expect_ok("repeated ADD")?;
        let json = out
            .json
            .as_ref()
            .with_context(|| format!("ADD result is not JSON: {out}"))?;
        AddResult::parse(json)
    }

    /// CNI CHECK with the ADD result as `prevResult`.
    pub fn check(&self) -> anyhow::Result<CniOutput> {
        self.cni.check(&self.att, Some(&self.result.raw))
    }

    /// Deletes the pod's namespace without DEL, as when a pod dies and the runtime has not
    /// cleaned up yet. The veth pair disappears with it.
    pub fn kill_netns(&mut self) {
        self.ns = None;
    }

    /// Runs DEL now; dropping the pod afterwards does not repeat it.
    pub fn del(&mut self) -> anyhow::Result<CniOutput> {
        self.deleted = true;
        self.cni.del(&self.att, Some(&self.result.raw))
    }

    /// Marks the attachment as already removed (for example by GC), so drop only deletes
    /// the namespace.
    pub fn forget(&mut self) {
        self.deleted = true;
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if !self.deleted {
            match self.cni.del(&self.att, Some(&self.result.raw)) {
                Ok(o) if o.ok() => {}
                Ok(o) if !std::thread::panicking() => {
                    eprintln!("harness: DEL of {} failed: {o}", self.att.container_id)
                }
                Ok(_) => {}
                Err(e) => eprintln!("harness: DEL of {}: {e:#}", self.att.container_id),
            }
        }
        // `ns` drops after this, deleting the namespace.
    }
}

/// Adds `n` pods through `cni`, up to 16 ADDs in flight at once, as a busy node's runtime
/// would. Fails on the first error (pods already added are deleted on drop).
pub fn add_pods_concurrently(cni: &Cni, n: usize) -> anyhow::Result<Vec<Pod>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::with_capacity(n));
    std::thread::scope(|s| {
        for _ in 0..n.min(16) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let r = Pod::add(cni, "p");
                    results.lock().expect("results lock").push((i, r));
                }
            });
        }
    });
    let mut results = results.into_inner().expect("results lock");
    results.sort_by_key(|(i, _)| *i);
    let mut pods = Vec::with_capacity(n);
    let mut first_err = None;
    for (_, r) in results {
        match r {
            Ok(p) => pods.push(p),
            Err(e) if first_err.is_none() => first_err = Some(e),
            Err(_) => {}
        }
    }
    match first_err {
        Some(e) => Err(e.context(format!("{} of {n} concurrent ADDs succeeded", pods.len()))),
        None => Ok(pods),
    }
}
