//! When the Kubernetes source may publish: the pure part of [`super::spawn`], tested without a
//! server.
//!
//! Every watched kind first lists what exists (the watcher's `Init` .. `InitDone`); the source
//! publishes nothing until every kind has completed that list, so the first state it publishes
//! is complete. A kind whose API is not served (a CRD that is not installed: the list answers
//! 404) counts as listed and empty, and is named in [`super::missing_message`] until it is
//! served. Afterwards a change of any kind (an object applied or deleted, a relist completed)
//! makes the state dirty, and it is published once the burst is over. A relist after an outage
//! (410 Gone, an API server restart) changes nothing until its `InitDone`: the reflector store
//! keeps the last complete view until then, so no partial state is ever published.

use std::collections::BTreeSet;

/// The kinds the Kubernetes source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1/Node`, all of them.
    Node,
    /// `v1/Pod`, this node's only (`spec.nodeName=<node>`).
    Pod,
    /// `v1/Service`, all namespaces.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice, all namespaces.
    EndpointSlice,
    /// `v1/Namespace`.
    Namespace,
    /// `crd.antrea.io/v1beta1` `Egress`.
    Egress,
    /// `crd.antrea.io/v1beta1` `ExternalIPPool`.
    ExternalIpPool,
}

impl Kind {
    /// Every kind, in the order the source starts them.
    pub const ALL: [Kind; 7] = [
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Namespace,
        Kind::Egress,
        Kind::ExternalIpPool,
    ];

    /// The `kind` as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Namespace => "Namespace",
            Kind::Egress => "Egress",
            Kind::ExternalIpPool => "ExternalIPPool",
        }
    }

    /// Whether the kind is a CustomResourceDefinition's (it may be missing; the rest may not).
    pub fn is_crd(self) -> bool {
        matches!(self, Kind::Egress | Kind::ExternalIpPool)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one watcher event means for publishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// A list of the kind completed (`InitDone`): its store now holds the complete view.
    Listed(Kind),
    /// An object of the kind was applied or deleted after its list.
    Changed(Kind),
    /// The kind's API is not served (404 on the list; only CRDs may be missing).
    Missing(Kind),
}

/// Whether the source has a complete view yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// Some kinds have not completed their first list; nothing has been published.
    Syncing {
        /// The kinds still listing.
        waiting: Vec<Kind>,
    },
    /// Every kind has completed its first list (or is missing); states are being published.
    Synced,
}

impl SyncState {
    /// Whether the first complete state has been (or is being) published.
    pub fn is_synced(&self) -> bool {
        matches!(self, SyncState::Synced)
    }
}

/// The gate: which kinds have listed, which are missing, whether a publish is due.
#[derive(Clone, Debug, Default)]
pub struct SyncGate {
    listed: BTreeSet<Kind>,
    missing: BTreeSet<Kind>,
    dirty: bool,
}

impl SyncGate {
    /// A gate before any list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one signal into account. A `Missing` of a kind that is not a CRD is ignored (the
    /// watcher keeps retrying it; the source stays unsynced until it lists).
    pub fn observe(&mut self, s: Signal) {
        match s {
            Signal::Listed(k) => {
                self.listed.insert(k);
                self.missing.remove(&k);
                self.dirty = true;
            }
            Signal::Changed(_) => self.dirty = true,
            Signal::Missing(k) if k.is_crd() => {
                // Newly missing (never listed, or the CRD was deleted): its view is empty.
                if self.missing.insert(k) {
                    self.listed.insert(k);
                    self.dirty = true;
                }
            }
            Signal::Missing(_) => {}
        }
    }

    /// Whether every kind has listed (or is missing).
    pub fn synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.listed.contains(k))
    }

    /// The sync state to show.
    pub fn state(&self) -> SyncState {
        if self.synced() {
            SyncState::Synced
        } else {
            SyncState::Syncing {
                waiting: Kind::ALL
                    .into_iter()
                    .filter(|k| !self.listed.contains(k))
                    .collect(),
            }
        }
    }

    /// Whether a state should be published now: synced and changed since the last publish.
    pub fn due(&self) -> bool {
        self.dirty && self.synced()
    }

    /// Records that the current view was published.
    pub fn published(&mut self) {
        self.dirty = false;
    }

    /// The kinds whose API is not served (their view is empty).
    pub fn missing(&self) -> &BTreeSet<Kind> {
        &self.missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_due_before_every_kind_listed() {
        let mut g = SyncGate::new();
        assert!(!g.due());
        for (i, k) in Kind::ALL.into_iter().enumerate() {
            assert!(!g.due(), "due after {i} kinds");
            assert_eq!(
                g.state(),
                SyncState::Syncing {
                    waiting: Kind::ALL[i..].to_vec()
                }
            );
            g.observe(Signal::Changed(k));
            assert!(!g.due(), "a change before the list is not a publish");
            g.observe(Signal::Listed(k));
        }
        assert!(g.due());
        assert!(g.state().is_synced());
        g.published();
        assert!(!g.due());
        g.observe(Signal::Changed(Kind::Pod));
        assert!(g.due());
    }

    #[test]
    fn a_missing_crd_counts_as_listed_and_empty_but_a_core_kind_does_not() {
        let mut g = SyncGate::new();
        for k in [
            Kind::Node,
            Kind::Pod,
            Kind::Service,
            Kind::EndpointSlice,
            Kind::Namespace,
        ] {
            g.observe(Signal::Listed(k));
        }
        g.observe(Signal::Listed(Kind::ExternalIpPool));
        assert!(!g.due());
        g.observe(Signal::Missing(Kind::Egress));
        assert!(g.due());
        assert_eq!(
            g.missing().iter().copied().collect::<Vec<_>>(),
            [Kind::Egress]
        );
        g.published();
        // Repeated 404s while it stays missing (the watcher's retries) publish nothing.
        g.observe(Signal::Missing(Kind::Egress));
        assert!(!g.due());
        // Installed later: listed, no longer missing, published.
        g.observe(Signal::Listed(Kind::Egress));
        assert!(g.due() && g.missing().is_empty());

        let mut g = SyncGate::new();
        g.observe(Signal::Missing(Kind::Node));
        assert!(g.missing().is_empty());
        assert!(!g.state().is_synced());
    }

    #[test]
    fn a_relist_is_one_change_at_its_end() {
        let mut g = SyncGate::new();
        for k in Kind::ALL {
            g.observe(Signal::Listed(k));
        }
        g.published();
        // The relist's Init and InitApply events are no signals; only its InitDone is.
        assert!(!g.due());
        g.observe(Signal::Listed(Kind::Service));
        assert!(g.due());
        assert!(g.state().is_synced());
    }
}
