//! Node port allocation: [`Allocator`] turns targets into [`NplMapping`]s, stable across
//! changes, and holds each node port through a [`PortReserver`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};

use super::PortRange;
use super::targets::PodTarget;
use crate::pods::store::NplMapping;
use crate::source::Protocol;

/// Why a node port could not be allocated.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Reserving the port failed for another reason than the port being in use (running
    /// out of file descriptors, say); the search stops there.
    #[error("reserving node port {port}/{protocol}", protocol = .protocol.as_str())]
    Reserve {
        /// The port.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
        /// What binding the socket said.
        #[source]
        source: std::io::Error,
    },
    /// Every port of the range is mapped or in use.
    #[error("no free node port in {range}")]
    Exhausted {
        /// The range.
        range: PortRange,
    },
}

/// A pod port that got no node port (see [`Allocator::sync`]).
#[derive(Debug, thiserror::Error)]
#[error("pod {pod} port {pod_port}/{protocol} got no node port", protocol = .protocol.as_str())]
pub struct Unallocated {
    /// The pod, `namespace/name`.
    pub pod: String,
    /// The pod port.
    pub pod_port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// Why.
    #[source]
    pub source: AllocError,
}

/// Reserves node ports so that no other process on the node can use them.
pub trait PortReserver: Send {
    /// Reserves `port` for `protocol`; fails if it is in use.
    fn reserve(&mut self, port: u16, protocol: Protocol) -> std::io::Result<()>;
    /// Gives the port back.
    fn release(&mut self, port: u16, protocol: Protocol);
}

impl<R: PortReserver + ?Sized> PortReserver for Box<R> {
    fn reserve(&mut self, port: u16, protocol: Protocol) -> std::io::Result<()> {
        (**self).reserve(port, protocol)
    }
    fn release(&mut self, port: u16, protocol: Protocol) {
        (**self).release(port, protocol)
    }
}

/// Reserves ports by binding (not listening on) a socket of the protocol on `0.0.0.0:<port>`
/// in the agent's network namespace, without `SO_REUSEADDR`: a port any socket holds, on any
/// address, fails to bind and is skipped.
#[derive(Debug, Default)]
pub struct SocketReserver {
    sockets: HashMap<(u16, Protocol), OwnedFd>,
}

impl PortReserver for SocketReserver {
    fn reserve(&mut self, port: u16, protocol: Protocol) -> std::io::Result<()> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, socket};
        if self.sockets.contains_key(&(port, protocol)) {
            return Ok(());
        }
        let ty = match protocol {
            Protocol::Tcp => SockType::Stream,
            Protocol::Udp => SockType::Datagram,
            Protocol::Sctp => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "SCTP node ports are not supported",
                ));
            }
        };
        let fd = socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None)?;
        bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, port))?;
        self.sockets.insert((port, protocol), fd);
        Ok(())
    }

    fn release(&mut self, port: u16, protocol: Protocol) {
        self.sockets.remove(&(port, protocol));
    }
}

type MappingKey = (String, u16, Protocol);

/// Node port allocation, stable across changes; see the module doc.
pub struct Allocator<R: PortReserver> {
    range: PortRange,
    reserver: R,
    mappings: BTreeMap<MappingKey, NplMapping>,
    /// Where the next search starts (round-robin through the range).
    cursor: u16,
}

/// What [`Allocator::restore`] could not keep.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Mappings outside the range, duplicates, or whose port could not be reserved again.
    pub mappings: Vec<NplMapping>,
    /// Why, one line each.
    pub reasons: Vec<String>,
}

impl<R: PortReserver> Allocator<R> {
    /// An empty allocator.
    pub fn new(range: PortRange, reserver: R) -> Self {
        Self {
            range,
            reserver,
            mappings: BTreeMap::new(),
            cursor: range.first,
        }
    }

    /// Takes back persisted mappings after a restart, re-reserving their ports.
    pub fn restore(range: PortRange, reserver: R, persisted: Vec<NplMapping>) -> (Self, Dropped) {
        let mut a = Self::new(range, reserver);
        let mut dropped = Dropped::default();
        let mut persisted = persisted;
        persisted.sort();
        for m in persisted {
            let why = if !range.contains(m.node_port) {
                Some(format!(
                    "node port {} is outside the range {range}",
                    m.node_port
                ))
            } else if a
                .mappings
                .values()
                .any(|o| o.node_port == m.node_port && o.protocol == m.protocol)
            {
                Some(format!("node port {} is mapped twice", m.node_port))
            } else {
                a.reserver
                    .reserve(m.node_port, m.protocol)
                    .err()
                    .map(|e| format!("node port {} cannot be reserved again: {e}", m.node_port))
            };
            match why {
                Some(w) => {
                    dropped.reasons.push(format!(
                        "NPL mapping {}: {w}; allocating a new one",
                        m.key()
                    ));
                    dropped.mappings.push(m);
                }
                None => {
                    a.cursor = a.next_after(m.node_port);
                    a.mappings
                        .insert((m.pod.clone(), m.pod_port, m.protocol), m);
                }
            }
        }
        (a, dropped)
    }

    fn next_after(&self, p: u16) -> u16 {
        if p >= self.range.last {
            self.range.first
        } else {
            p + 1
        }
    }

    /// The current mappings, ordered by pod, pod port and protocol.
    pub fn mappings(&self) -> impl Iterator<Item = &NplMapping> {
        self.mappings.values()
    }

    /// Makes the mappings match `targets`: removes (and releases) those no longer wanted,
    /// follows pod IP changes keeping the node port, allocates ports for new pod ports.
    /// Returns the pod ports that got no node port (the range is exhausted, or reserving
    /// failed for another reason than the port being in use, such as running out of file
    /// descriptors), each with the reason.
    pub fn sync(&mut self, targets: &BTreeMap<String, PodTarget>) -> Vec<Unallocated> {
        let wanted = |k: &MappingKey| {
            targets
                .get(&k.0)
                .is_some_and(|t| t.ip.is_some() && t.ports.contains(&(k.1, k.2)))
        };
        let stale: Vec<MappingKey> = self
            .mappings
            .keys()
            .filter(|k| !wanted(k))
            .cloned()
            .collect();
        for k in stale {
            if let Some(m) = self.mappings.remove(&k) {
                self.reserver.release(m.node_port, m.protocol);
            }
        }
        let mut used: BTreeSet<(u16, Protocol)> = self
            .mappings
            .values()
            .map(|m| (m.node_port, m.protocol))
            .collect();
        let mut failed = Vec::new();
        for (pod, t) in targets {
            let Some(ip) = t.ip else { continue };
            for &(pod_port, protocol) in &t.ports {
                let key = (pod.clone(), pod_port, protocol);
                if let Some(m) = self.mappings.get_mut(&key) {
                    m.pod_ip = ip;
                    continue;
                }
                match self.allocate(protocol, &used) {
                    Ok(node_port) => {
                        used.insert((node_port, protocol));
                        self.mappings.insert(
                            key,
                            NplMapping {
                                pod: pod.clone(),
                                pod_port,
                                protocol,
                                pod_ip: ip,
                                node_port,
                            },
                        );
                    }
                    Err(source) => failed.push(Unallocated {
                        pod: pod.clone(),
                        pod_port,
                        protocol,
                        source,
                    }),
                }
            }
        }
        failed
    }

    /// The next port of the range that is free for `protocol`, reserved. Only a port in use
    /// (`EADDRINUSE`, `EACCES`) is skipped; any other failure stops the search, so that e.g.
    /// a descriptor shortage is reported as such and not as a full range.
    fn allocate(
        &mut self,
        protocol: Protocol,
        used: &BTreeSet<(u16, Protocol)>,
    ) -> Result<u16, AllocError> {
        let mut port = self.cursor;
        for _ in 0..self.range.len() {
            let candidate = port;
            port = self.next_after(port);
            if used.contains(&(candidate, protocol)) {
                continue;
            }
            match self.reserver.reserve(candidate, protocol) {
                Ok(()) => {
                    self.cursor = port;
                    return Ok(candidate);
                }
                Err(e)
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied
                    ) =>
                {
                    return Err(AllocError::Reserve {
                        port: candidate,
                        protocol,
                        source: e,
                    });
                }
                Err(e) => {
                    tracing::debug!(port = candidate, protocol = protocol.as_str(), error = %e,
                        "node port in use on the node; skipping it");
                }
            }
        }
        Err(AllocError::Exhausted { range: self.range })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::controllers::runner::error_chain;
    use crate::testing::npl::FakeReserver;

    fn target(ip: [u8; 4], ports: &[(u16, Protocol)]) -> PodTarget {
        PodTarget {
            ip: Some(ip.into()),
            ports: ports.iter().copied().collect(),
        }
    }

    fn range(s: &str) -> PortRange {
        s.parse().unwrap()
    }

    fn ports_of<R: PortReserver>(a: &Allocator<R>) -> Vec<(String, u16, u16)> {
        a.mappings()
            .map(|m| (m.pod.clone(), m.pod_port, m.node_port))
            .collect()
    }

    #[test]
    fn allocation_skips_busy_ports_and_is_stable() {
        let fake = FakeReserver::default();
        fake.taken_by_other(61001, Protocol::Tcp);
        let mut a = Allocator::new(range("61000-61009"), fake.clone());
        let mut t = BTreeMap::from([
            (
                "d/a".to_string(),
                target([10, 0, 0, 2], &[(80, Protocol::Tcp), (53, Protocol::Udp)]),
            ),
            (
                "d/b".to_string(),
                target([10, 0, 0, 3], &[(80, Protocol::Tcp)]),
            ),
        ]);
        assert!(a.sync(&t).is_empty());
        // 53/udp gets 61000; 61001/tcp is busy and skipped.
        assert_eq!(
            ports_of(&a),
            vec![
                ("d/a".into(), 53, 61000),
                ("d/a".into(), 80, 61002),
                ("d/b".into(), 80, 61003)
            ]
        );
        // An IP change keeps the node port; a removed pod frees its port; a new pod gets the
        // next port round-robin, not the freed one.
        t.get_mut("d/a").unwrap().ip = Some(Ipv4Addr::new(10, 0, 0, 9));
        t.remove("d/b");
        t.insert("d/c".into(), target([10, 0, 0, 4], &[(80, Protocol::Tcp)]));
        assert!(a.sync(&t).is_empty());
        assert_eq!(
            ports_of(&a),
            vec![
                ("d/a".into(), 53, 61000),
                ("d/a".into(), 80, 61002),
                ("d/c".into(), 80, 61004)
            ]
        );
        assert!(
            a.mappings()
                .all(|m| m.pod != "d/a" || m.pod_ip == Ipv4Addr::new(10, 0, 0, 9))
        );
        assert!(
            !fake.held().contains(&(61003, Protocol::Tcp)),
            "port of d/b not released"
        );
        // Nothing wanted: everything released.
        a.sync(&BTreeMap::new());
        assert!(fake.held().is_empty());
    }

    /// A reserver failing with another error than "in use".
    struct OutOfFds;
    impl PortReserver for OutOfFds {
        fn reserve(&mut self, _: u16, _: Protocol) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(libc::EMFILE))
        }
        fn release(&mut self, _: u16, _: Protocol) {}
    }

    #[test]
    fn a_reservation_failure_other_than_in_use_is_reported_as_such() {
        let mut a = Allocator::new(range("61000-61009"), OutOfFds);
        let t = BTreeMap::from([(
            "d/a".to_string(),
            target([10, 0, 0, 2], &[(80, Protocol::Tcp)]),
        )]);
        let failed: Vec<String> = a.sync(&t).iter().map(|e| error_chain(e)).collect();
        assert_eq!(failed.len(), 1);
        assert!(
            failed[0].starts_with(
                "pod d/a port 80/tcp got no node port: reserving node port 61000/tcp: "
            ) && failed[0].contains("Too many open files"),
            "{failed:?}"
        );
    }

    #[test]
    fn exhausted_range_is_reported() {
        let mut a = Allocator::new(range("61000-61001"), FakeReserver::default());
        let t = BTreeMap::from([(
            "d/a".to_string(),
            target(
                [10, 0, 0, 2],
                &[(1, Protocol::Tcp), (2, Protocol::Tcp), (3, Protocol::Tcp)],
            ),
        )]);
        let failed: Vec<String> = a.sync(&t).iter().map(|e| error_chain(e)).collect();
        assert_eq!(
            failed,
            ["pod d/a port 3/tcp got no node port: no free node port in 61000-61001"]
        );
        assert_eq!(a.mappings().count(), 2);
    }

    #[test]
    fn restore_keeps_ports_and_drops_out_of_range_duplicate_and_taken_ones() {
        let m = |pod: &str, pod_port, node_port| NplMapping {
            pod: pod.into(),
            pod_port,
            protocol: Protocol::Tcp,
            pod_ip: Ipv4Addr::new(10, 0, 0, 2),
            node_port,
        };
        let fake = FakeReserver::default();
        fake.taken_by_other(61003, Protocol::Tcp);
        let persisted = vec![
            m("d/a", 80, 61005),
            m("d/b", 80, 62500), // outside the new range
            m("d/c", 80, 61005), // duplicate node port
            m("d/d", 80, 61003), // taken by another process meanwhile
        ];
        let (mut a, dropped) = Allocator::restore(range("61000-61009"), fake, persisted);
        assert_eq!(ports_of(&a), vec![("d/a".into(), 80, 61005)]);
        assert_eq!(dropped.mappings.len(), 3, "{:?}", dropped.reasons);
        // The dropped ones get new ports in range on the next sync; d/a keeps its port.
        let t: BTreeMap<String, PodTarget> = ["d/a", "d/b", "d/c", "d/d"]
            .iter()
            .map(|p| (p.to_string(), target([10, 0, 0, 2], &[(80, Protocol::Tcp)])))
            .collect();
        assert!(a.sync(&t).is_empty());
        let got = ports_of(&a);
        assert_eq!(got[0], ("d/a".into(), 80, 61005));
        assert!(
            got.iter()
                .all(|(_, _, p)| (61000..=61009).contains(p) && *p != 61003),
            "{got:?}"
        );
        let distinct: BTreeSet<u16> = got.iter().map(|g| g.2).collect();
        assert_eq!(distinct.len(), 4);
    }

    #[test]
    fn port_range_parses_and_rejects_nonsense() {
        assert_eq!(
            range("61000-62000"),
            PortRange {
                first: 61000,
                last: 62000
            }
        );
        assert_eq!(range("61000-62000").len(), 1001);
        for bad in ["61000", "62000-61000", "0-10", "1-70000", "a-b", ""] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn socket_reserver_skips_a_port_another_socket_holds() {
        // A port bound in this process by someone else: the reserver must refuse it.
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = other.local_addr().unwrap().port();
        let mut r = SocketReserver::default();
        assert!(r.reserve(port, Protocol::Tcp).is_err());
        drop(other);
        // A free one is held until released; a second binder then fails.
        let free = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        r.reserve(port, Protocol::Tcp).unwrap();
        assert!(std::net::TcpListener::bind(("0.0.0.0", port)).is_err());
        r.release(port, Protocol::Tcp);
        assert!(std::net::TcpListener::bind(("0.0.0.0", port)).is_ok());
    }
}
