//! Fakes for the NodePortLocal controller: a port reserver, a status sink, and a shared
//! [`EventLog`] that records, across fakes, the order in which side effects happened.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::controllers::npl::{PortReserver, StatusError, StatusSink};
use crate::kernel::conntrack::{Conntrack, ConntrackError};
use crate::kernel::nftables::{NatError, Nftables};
use crate::source::Protocol;

/// One side effect, as the [`EventLog`] records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An nft script was loaded (only loads that succeeded).
    NftLoaded(String),
    /// UDP conntrack entries to `dst` on `ports` were deleted.
    ConntrackDeleted {
        /// The destination.
        dst: Ipv4Addr,
        /// The ports, as given.
        ports: Vec<u16>,
    },
    /// The complete set of NPL annotations was published.
    Published(BTreeMap<String, String>),
}

/// The log of [`Event`]s shared by the fakes of one test (clones share the log).
pub type EventLog = super::events::EventLog<Event>;

/// Wraps a fake so that what it did successfully also goes to an [`EventLog`]
/// ([`Nftables`]: [`Event::NftLoaded`]; [`Conntrack`]: [`Event::ConntrackDeleted`]).
pub struct Logged<T: ?Sized> {
    /// The wrapped fake (shared, so the test can still inject failures and read it).
    pub inner: Arc<T>,
    /// Where the events go.
    pub log: EventLog,
}

impl<T: ?Sized> Logged<T> {
    /// `inner`, logging to `log`.
    pub fn new(inner: Arc<T>, log: EventLog) -> Self {
        Self { inner, log }
    }
}

#[async_trait]
impl<T: Nftables + ?Sized> Nftables for Logged<T> {
    async fn load(&self, table: &str, script: &str) -> Result<(), NatError> {
        self.inner.load(table, script).await?;
        self.log.push(Event::NftLoaded(script.to_owned()));
        Ok(())
    }
}

#[async_trait]
impl<T: Conntrack + ?Sized> Conntrack for Logged<T> {
    async fn delete_udp_to(&self, dst: Ipv4Addr, ports: &[u16]) -> Result<usize, ConntrackError> {
        let n = self.inner.delete_udp_to(dst, ports).await?;
        self.log.push(Event::ConntrackDeleted {
            dst,
            ports: ports.to_vec(),
        });
        Ok(n)
    }
}

/// A [`StatusSink`] that records every publication (in its own list and, when given, in an
/// [`EventLog`]); fails the next `fail` publications.
#[derive(Default)]
pub struct FakeStatusSink {
    /// Every publication that succeeded, in order.
    pub published: Mutex<Vec<BTreeMap<String, String>>>,
    /// How many of the next publications fail.
    pub fail: Mutex<u32>,
    log: Option<EventLog>,
}

impl FakeStatusSink {
    /// A sink that also logs to `log`.
    pub fn with_log(log: EventLog) -> Self {
        Self {
            log: Some(log),
            ..Default::default()
        }
    }

    /// The publications so far.
    pub fn published(&self) -> Vec<BTreeMap<String, String>> {
        self.published.lock().unwrap().clone()
    }
}

#[async_trait]
impl StatusSink for FakeStatusSink {
    async fn publish_npl(&self, annotations: &BTreeMap<String, String>) -> Result<(), StatusError> {
        {
            let mut f = self.fail.lock().unwrap();
            if *f > 0 {
                *f -= 1;
                return Err(StatusError::Sink {
                    sink: "fake",
                    source: "failed on purpose".into(),
                });
            }
        }
        self.published.lock().unwrap().push(annotations.clone());
        if let Some(l) = &self.log {
            l.push(Event::Published(annotations.clone()));
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Ports {
    /// Held by another process.
    other: BTreeSet<(u16, Protocol)>,
    /// Held by this reserver.
    held: BTreeSet<(u16, Protocol)>,
}

/// A [`PortReserver`] over an in-memory set of ports; a port can be taken by "another
/// process" ([`FakeReserver::taken_by_other`]), and then fails to reserve with
/// `EADDRINUSE`, as a bound socket would; reserving a port it already holds fails too (the
/// allocator must never ask twice). Clones share the ports, so a test keeps one to
/// look at what the controller holds.
#[derive(Clone, Debug, Default)]
pub struct FakeReserver(Arc<Mutex<Ports>>);

impl FakeReserver {
    /// Pretends another process holds `port`.
    pub fn taken_by_other(&self, port: u16, protocol: Protocol) {
        self.0.lock().unwrap().other.insert((port, protocol));
    }

    /// The ports this reserver holds.
    pub fn held(&self) -> BTreeSet<(u16, Protocol)> {
        self.0.lock().unwrap().held.clone()
    }
}

impl PortReserver for FakeReserver {
    fn reserve(&mut self, port: u16, protocol: Protocol) -> std::io::Result<()> {
        let mut p = self.0.lock().unwrap();
        if p.other.contains(&(port, protocol)) || !p.held.insert((port, protocol)) {
            return Err(std::io::Error::from_raw_os_error(libc::EADDRINUSE));
        }
        Ok(())
    }

    fn release(&mut self, port: u16, protocol: Protocol) {
        self.0.lock().unwrap().held.remove(&(port, protocol));
    }
}
