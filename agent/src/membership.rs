//! Membership among agents: which nodes' agents are alive, by a SWIM failure detector over UDP
//! between the nodes' transport addresses (port `egress.memberlistPort`, default 10351, as
//! Antrea's memberlist), with no central controller. Egress computes each IP's holder from the
//! live, eligible nodes ([`MemberView::eligible`]), so every agent agrees and only a failed
//! node's IPs move.
//!
//! **Why `foca`.** SWIM (ping, indirect ping through `k` members, suspicion, gossip of
//! membership changes piggybacked on probes) is subtle to get right; `foca` implements it as a
//! pure state machine with a bring-your-own transport and timers, no runtime or sockets of its
//! own, `no_std`-clean, well tested and maintained, with memberlist's LAN settings as its
//! starting point. That fits an agent that already runs a tokio runtime and wants one UDP
//! socket and no background threads.
//!
//! **How it is driven.** One task, on a thread and runtime of its own (so that no controller's
//! work can delay an ack), owns the `Foca` instance, one tokio UDP socket (bound to the transport
//! address at start, so a port in use fails the agent's start with the address) and a timer queue. It
//! feeds foca the datagrams it receives, the timers foca asked for when they fall due, and
//! every second an announce to a few known nodes (the `Node` objects' `InternalIP`s) that are
//! not members yet (joining at start, and healing a partition after a link comes back); after
//! each call it sends what foca queued ([`foca::AccumulatingRuntime`]), schedules its timers
//! and republishes the [`MemberView`] on a `watch` channel when it changed.
//!
//! **Identity.** `(node name, address, since)`, `since` the agent's start in Unix
//! milliseconds. A restarted agent is a new member (the higher `since` wins the address); an
//! agent declared down by the others (its link was cut) renews `since` to now and rejoins by
//! itself when it hears from them again.
//!
//! **Timing (the trade-off).** A probe every 150 ms, an ack expected within 80 ms (then 3
//! indirect probes), a suspect declared down after 300 ms unless it refutes. With three nodes
//! a dead agent is probed within about two periods, so it is declared down within about
//! 0.6 to 0.8 s of dying, leaving the rest of the 2 s budget for the new holder's apply (the
//! OVS backend's is the slower, a few hundred ms on a loaded machine) and gratuitous ARP
//! (`tests/tests/egress_failover.rs` measures the whole). The first setting tried, 200 ms /
//! 100 ms / 400 ms, gave 0.9 to 1.5 s and 2.2 s once with OVS under load. The cost: a few
//! 100-byte datagrams per node every 150 ms, and an agent stalled for more than about 0.4 s
//! (CPU starvation, a blocked runtime) is taken for dead and its IPs move (back after the
//! damping period); memberlist's LAN defaults (1 s, 500 ms, about 4 s) are several times
//! slower for that reason.
//!
//! **Damping.** A member is *eligible* to hold egress IPs only once it has been a member for
//! the damping period (`egress.failoverDampingSeconds`, default 3 s) by its `since`, a wall
//! clock time every agent reads the same (nodes' clocks are NTP-synchronised; a skew shifts
//! when a returning node takes its IPs back by the skew). A node that keeps failing and
//! recovering therefore gets a new `since` each time and moves IPs back at most once per
//! damping period, and a starting node never takes IPs before the others count it. A node
//! whose agent is not alive (or not yet a member) holds nothing, whatever its `Node` object
//! says.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use foca::{AccumulatingRuntime, Config, Foca, OwnedNotification, PostcardCodec, Timer};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::source::DesiredState;

/// Antrea's memberlist port, the default of `egress.memberlistPort`.
pub const DEFAULT_PORT: u16 = 10351;
/// The default damping period.
pub const DEFAULT_DAMPING: Duration = Duration::from_secs(3);
/// How often the failure detector probes a member.
pub const PROBE_PERIOD: Duration = Duration::from_millis(150);
/// How long a direct probe waits for its ack before asking others to probe.
pub const PROBE_RTT: Duration = Duration::from_millis(80);
/// How long a suspect has to refute before it is declared down.
pub const SUSPECT_TO_DOWN: Duration = Duration::from_millis(300);
/// How often known nodes that are not members are announced to.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// How many of them each time.
const ANNOUNCE_TO: usize = 3;

/// A member's identity (see the module doc).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's name.
    pub name: String,
    /// Where its agent listens.
    pub addr: SocketAddr,
    /// Since when (Unix milliseconds) this incarnation is a member.
    pub since: u64,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}#{}", self.name, self.addr, self.since)
    }
}

impl foca::Identity for Member {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Member {
            since: now_ms().max(self.since + 1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.since > adversary.since
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// One member as the view shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberInfo {
    /// The node's name.
    pub node: String,
    /// Its agent's address.
    pub address: SocketAddr,
    /// Since when it is a member (Unix milliseconds).
    pub since_ms: u64,
    /// Whether it may hold egress IPs (a member for the damping period).
    pub eligible: bool,
}

/// What this agent knows of the membership.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberView {
    /// Whether membership runs; without it every `Node` object counts as alive.
    pub enabled: bool,
    /// The damping period in milliseconds.
    pub damping_ms: u64,
    /// Every member this agent sees alive (itself included), by name.
    pub members: Vec<MemberInfo>,
}

impl MemberView {
    /// The nodes that may hold egress IPs; `None` when membership does not run (then every
    /// `Node` object does).
    pub fn eligible(&self) -> Option<BTreeSet<String>> {
        self.enabled.then(|| {
            self.members
                .iter()
                .filter(|m| m.eligible)
                .map(|m| m.node.clone())
                .collect()
        })
    }
}

/// Why membership could not start.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The UDP port could not be bound.
    #[error("binding the memberlist socket {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The system's answer.
        #[source]
        source: std::io::Error,
    },
    /// Its thread or runtime could not be started.
    #[error("starting the memberlist thread")]
    Thread {
        /// The system's answer.
        #[source]
        source: std::io::Error,
    },
}

/// What membership needs to start.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// This node's name.
    pub node_name: String,
    /// This node's transport address (what the others reach it on).
    pub node_ip: Ipv4Addr,
    /// The UDP port (every agent uses the same).
    pub port: u16,
    /// The damping period.
    pub damping: Duration,
}

/// The foca configuration: memberlist's LAN settings with the faster timing of the module
/// doc, and quick healing of partitions.
pub fn foca_config() -> Config {
    let mut c = Config::new_lan(NonZeroU32::new(8).expect("non-zero"));
    c.probe_period = PROBE_PERIOD;
    c.probe_rtt = PROBE_RTT;
    c.suspect_to_down_after = SUSPECT_TO_DOWN;
    c.num_indirect_probes = NonZeroUsize::new(3).expect("non-zero");
    c.notify_down_members = true;
    c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(2),
        num_members: NonZeroUsize::new(2).expect("non-zero"),
    });
    c
}

/// Binds the socket and starts the membership task; the view is published on the returned
/// channel (with this node alone until it hears from others).
pub async fn start(
    cfg: MembershipConfig,
    desired: watch::Receiver<DesiredState>,
) -> Result<watch::Receiver<MemberView>, MembershipError> {
    let addr = SocketAddr::from((cfg.node_ip, cfg.port));
    let socket = std::net::UdpSocket::bind(addr)
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .map_err(|source| MembershipError::Bind { addr, source })?;
    let me = Member {
        name: cfg.node_name.clone(),
        addr: SocketAddr::from((cfg.node_ip, cfg.port)),
        since: now_ms(),
    };
    tracing::info!(identity = ?me, "memberlist started");
    let (tx, rx) = watch::channel(MemberView {
        enabled: true,
        damping_ms: cfg.damping.as_millis() as u64,
        members: Vec::new(),
    });
    // A thread and runtime of its own: the controllers' work (an Egress apply loading the VLAN
    // tagger, say) never delays an ack past the suspicion timeout, which would have the others
    // declare this node down and move its IPs (seen in CI with debug builds on two cores).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| MembershipError::Thread { source })?;
    std::thread::Builder::new()
        .name("memberlist".into())
        .spawn(move || {
            rt.block_on(async move {
                match UdpSocket::from_std(socket) {
                    Ok(socket) => run(cfg, me, socket, desired, tx).await,
                    Err(e) => tracing::error!(error = %e, "memberlist: the socket"),
                }
            })
        })
        .map_err(|source| MembershipError::Thread { source })?;
    Ok(rx)
}

/// The timers foca asked for, by due time (a sequence number keeps equal times in order).
#[derive(Default)]
struct Timers {
    queue: BTreeMap<(Instant, u64), Timer<Member>>,
    seq: u64,
}

impl Timers {
    fn push(&mut self, at: Instant, t: Timer<Member>) {
        self.seq += 1;
        self.queue.insert((at, self.seq), t);
    }
    fn next(&self) -> Option<Instant> {
        self.queue.keys().next().map(|k| k.0)
    }
    fn pop_due(&mut self, now: Instant) -> Option<Timer<Member>> {
        let k = *self.queue.keys().next().filter(|k| k.0 <= now)?;
        self.queue.remove(&k)
    }
}

async fn run(
    cfg: MembershipConfig,
    me: Member,
    socket: UdpSocket,
    mut desired: watch::Receiver<DesiredState>,
    tx: watch::Sender<MemberView>,
) {
    let config = foca_config();
    let mut buf = vec![0u8; config.max_packet_size.get() + 512];
    let rng = StdRng::seed_from_u64(now_ms() ^ u64::from(std::process::id()).rotate_left(32));
    let mut foca = Foca::new(me.clone(), config, rng, PostcardCodec);
    let mut rt = AccumulatingRuntime::new();
    let mut timers = Timers::default();
    let mut announce = tokio::time::interval(ANNOUNCE_EVERY);
    announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rotate = 0usize;
    let mut desired_open = true;
    let far = || Instant::now() + Duration::from_secs(3600);
    loop {
        let next_timer = timers.next().unwrap_or_else(far);
        let next_eligible = next_eligibility(&foca, cfg.damping).unwrap_or_else(far);
        tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, _from)) => {
                    if let Err(e) = foca.handle_data(&buf[..n], &mut rt) {
                        tracing::debug!(error = %e, "memberlist: datagram ignored");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "memberlist: receiving"),
            },
            _ = tokio::time::sleep_until(next_timer) => {
                let now = Instant::now();
                while let Some(t) = timers.pop_due(now) {
                    if let Err(e) = foca.handle_timer(t, &mut rt) {
                        tracing::debug!(error = %e, "memberlist: timer");
                    }
                }
            }
            _ = tokio::time::sleep_until(next_eligible) => {}
            _ = announce.tick() => {
                let st = desired.borrow().clone();
                let members: BTreeSet<SocketAddr> =
                    foca.iter_members().map(|m| m.id().addr).collect();
                let peers: Vec<Member> = st
                    .nodes
                    .values()
                    .filter(|n| n.name != cfg.node_name)
                    .filter_map(|n| n.internal_ip)
                    .map(|ip| SocketAddr::from((ip, cfg.port)))
                    .filter(|a| !members.contains(a))
                    .map(|addr| Member { name: String::new(), addr, since: 0 })
                    .collect();
                for i in 0..peers.len().min(ANNOUNCE_TO) {
                    let p = peers[(rotate + i) % peers.len()].clone();
                    if let Err(e) = foca.announce(p, &mut rt) {
                        tracing::debug!(error = %e, "memberlist: announce");
                    }
                }
                rotate = rotate.wrapping_add(ANNOUNCE_TO);
            }
            r = desired.changed(), if desired_open => {
                if r.is_err() {
                    desired_open = false;
                }
            }
        }
        while let Some((dst, data)) = rt.to_send() {
            if let Err(e) = socket.send_to(&data, dst.addr).await {
                tracing::debug!(to = %dst.addr, error = %e, "memberlist: sending");
            }
        }
        let now = Instant::now();
        while let Some((delay, t)) = rt.to_schedule() {
            timers.push(now + delay, t);
        }
        while let Some(n) = rt.to_notify() {
            match n {
                OwnedNotification::MemberUp(m) => tracing::info!(member = ?m, "member up"),
                OwnedNotification::MemberDown(m) => tracing::warn!(member = ?m, "member down"),
                OwnedNotification::Rename(a, b) => {
                    tracing::info!(old = ?a, new = ?b, "member renamed")
                }
                OwnedNotification::Rejoin(m) => {
                    tracing::warn!(identity = ?m, "declared down by the others; rejoined")
                }
                OwnedNotification::Defunct => {
                    tracing::warn!("declared down by the others");
                    let _ = foca.reuse_down_identity();
                }
                OwnedNotification::Idle => tracing::warn!("memberlist: no other member alive"),
                _ => {}
            }
        }
        let view = view(&foca, cfg.damping);
        tx.send_if_modified(|v| {
            let changed = v.members != view;
            if changed {
                v.members = view;
            }
            changed
        });
    }
}

/// This agent's identity and the members it sees.
fn incarnations(
    foca: &Foca<Member, PostcardCodec, StdRng, foca::NoCustomBroadcast>,
) -> impl Iterator<Item = &Member> {
    std::iter::once(foca.identity()).chain(foca.iter_members().map(|m| m.id()))
}

/// This agent and the members it sees, by name, with their eligibility now.
fn view(
    foca: &Foca<Member, PostcardCodec, StdRng, foca::NoCustomBroadcast>,
    damping: Duration,
) -> Vec<MemberInfo> {
    let now = now_ms();
    let damping = damping.as_millis() as u64;
    let mut by_name: BTreeMap<String, MemberInfo> = BTreeMap::new();
    for m in incarnations(foca) {
        let info = MemberInfo {
            node: m.name.clone(),
            address: m.addr,
            since_ms: m.since,
            eligible: now.saturating_sub(m.since) >= damping,
        };
        // Two incarnations of one node: the younger one is the agent running now.
        match by_name.get(&m.name) {
            Some(old) if old.since_ms >= m.since => {}
            _ => {
                by_name.insert(m.name.clone(), info);
            }
        }
    }
    by_name.into_values().collect()
}

/// When the next member (or this agent) becomes eligible.
fn next_eligibility(
    foca: &Foca<Member, PostcardCodec, StdRng, foca::NoCustomBroadcast>,
    damping: Duration,
) -> Option<Instant> {
    let now = now_ms();
    let damping_ms = damping.as_millis() as u64;
    incarnations(foca)
        .map(|m| m.since + damping_ms)
        .filter(|due| *due > now)
        .min()
        .map(|due| Instant::now() + Duration::from_millis(due - now + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eligibility_follows_damping_and_youngest_incarnation_wins() {
        let v = MemberView {
            enabled: true,
            damping_ms: 3000,
            members: vec![
                MemberInfo {
                    node: "a".into(),
                    address: "10.0.0.1:10351".parse().unwrap(),
                    since_ms: 1,
                    eligible: true,
                },
                MemberInfo {
                    node: "b".into(),
                    address: "10.0.0.2:10351".parse().unwrap(),
                    since_ms: 2,
                    eligible: false,
                },
            ],
        };
        assert_eq!(v.eligible(), Some(BTreeSet::from(["a".to_owned()])));
        assert_eq!(MemberView::default().eligible(), None);
    }

    #[tokio::test]
    async fn two_agents_find_each_other() {
        use crate::source::NodeInfo;
        let port = 40000 + (std::process::id() % 20000) as u16;
        let mut st = DesiredState::default();
        for (n, ip) in [
            ("a", Ipv4Addr::new(127, 0, 0, 1)),
            ("b", Ipv4Addr::new(127, 0, 0, 2)),
        ] {
            st.nodes.insert(
                n.into(),
                NodeInfo {
                    name: n.into(),
                    pod_cidr: None,
                    internal_ip: Some(ip),
                    labels: BTreeMap::new(),
                },
            );
        }
        let (_dtx, drx) = watch::channel(st.clone());
        let mut views = Vec::new();
        for n in ["a", "b"] {
            let cfg = MembershipConfig {
                node_name: n.into(),
                node_ip: st.nodes[n].internal_ip.unwrap(),
                port,
                damping: Duration::ZERO,
            };
            views.push(start(cfg, drx.clone()).await.unwrap());
        }
        let both = BTreeSet::from(["a".to_owned(), "b".to_owned()]);
        for v in &mut views {
            let got = tokio::time::timeout(
                Duration::from_secs(10),
                v.wait_for(|v| v.eligible().as_ref() == Some(&both)),
            )
            .await
            .is_ok();
            assert!(got, "{:?}", v.borrow());
        }
    }
}
