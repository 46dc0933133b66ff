//! The one reconcile runner every controller uses, in the shape of kube-rs's
//! `Controller`: a controller is a [`Reconciler`] (`reconcile(desired, trigger) ->
//! Result<Action, Error>` plus an [`Reconciler::error_policy`]), and [`run`] owns everything
//! around it:
//!
//! - **Wake-ups.** A change of the desired state, or of any extra input the controller names
//!   ([`Wakers`]: the node's pod attachments, say), wakes it. Changes that come in a burst are
//!   coalesced: the runner waits [`RunnerConfig::debounce`] after the first before it
//!   reconciles, so ten files saved at once cost one pass.
//! - **Requeue.** `Ok(Action::Requeue(d))` reconciles again after `d` even without a change
//!   (upkeep such as watching a sysctl); `Ok(Action::Await)` waits for the next change.
//! - **Retry with backoff.** After an error the controller is retried after what its error
//!   policy says (by default doubling from [`RunnerConfig::retry_min`] up to
//!   [`RunnerConfig::retry_max`]); a change in between is reconciled at once.
//! - **Periodic resync.** Every [`RunnerConfig::resync`] after the last successful pass that
//!   converged (start, retry or resync; requeues and changes do not count) the controller is
//!   called with [`Trigger::Resync`], so what an outsider removed comes back.
//! - **Logging.** One span per reconcile with fixed keys (`controller`, `trigger`,
//!   `attempt`); an outage is logged once when it starts (and again only when its cause
//!   changes), and once when it ends, with how long it lasted.
//!
//! The runner stops when the desired-state source goes away (its sender is dropped).
//! A reconciler is called from one task only, never concurrently with itself, so it may keep
//! what it applied last in `&mut self`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::stream::{BoxStream, SelectAll, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::source::DesiredState;

/// What the runner does after a successful reconcile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing until the next change (or the periodic resync).
    Await,
    /// Reconcile again after this long even without a change.
    Requeue(Duration),
}

/// Why the reconciler is being called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The first pass after the runner started.
    Start,
    /// The desired state or an extra input changed.
    Changed,
    /// The reconciler asked to be called again ([`Action::Requeue`]).
    Requeue,
    /// The previous pass failed; this is the retry.
    Retry,
    /// The periodic resync.
    Resync,
}

impl Trigger {
    /// Whether the reconciler must converge the node even if its inputs look unchanged: the
    /// first pass, a retry, and a resync (something outside may have changed the node).
    pub fn converge(self) -> bool {
        matches!(self, Trigger::Start | Trigger::Retry | Trigger::Resync)
    }
}

/// The desired state as a reconciler sees it: borrow it, compute, drop the borrow before
/// awaiting (the source cannot publish while a borrow is held).
pub struct Desired<'a>(&'a watch::Receiver<DesiredState>);

impl<'a> Desired<'a> {
    /// A view of what `rx` holds (the runner makes one per pass; tests make their own).
    pub fn new(rx: &'a watch::Receiver<DesiredState>) -> Self {
        Desired(rx)
    }

    /// The latest desired state.
    pub fn get(&self) -> watch::Ref<'_, DesiredState> {
        self.0.borrow()
    }
}

/// A controller (see the module doc).
pub trait Reconciler: Send + 'static {
    /// What a failed pass reports.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The controller's name: the `controller` key of its spans and logs.
    fn name(&self) -> &'static str;

    /// Converges what this controller owns on `desired`. Called from one task, never
    /// concurrently with itself.
    fn reconcile(
        &mut self,
        desired: &Desired<'_>,
        trigger: Trigger,
    ) -> impl Future<Output = Result<Action, Self::Error>> + Send;

    /// When to retry after `failures` failed passes in a row (from 1). The default doubles
    /// from [`RunnerConfig::retry_min`] to [`RunnerConfig::retry_max`].
    fn error_policy(&mut self, _error: &Self::Error, failures: u32, cfg: &RunnerConfig) -> Action {
        Action::Requeue(cfg.backoff(failures))
    }
}

/// The runner's timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunnerConfig {
    /// How long after the first change of a burst the runner waits before reconciling.
    pub debounce: Duration,
    /// The periodic resync after the last successful pass; `None` for none.
    pub resync: Option<Duration>,
    /// The first retry delay after a failure.
    pub retry_min: Duration,
    /// The longest retry delay.
    pub retry_max: Duration,
}

impl Default for RunnerConfig {
    /// 10 ms debounce, no resync, retries from 500 ms doubling to 5 s.
    fn default() -> Self {
        RunnerConfig {
            debounce: Duration::from_millis(10),
            resync: None,
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(5),
        }
    }
}

impl RunnerConfig {
    /// The retry delay after `failures` failures in a row (from 1).
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.retry_min
            .saturating_mul(1u32 << doublings)
            .min(self.retry_max)
            .max(self.retry_min.min(self.retry_max))
    }
}

/// Extra inputs that wake a controller besides the desired state.
#[derive(Default)]
pub struct Wakers(SelectAll<BoxStream<'static, ()>>);

impl Wakers {
    /// No extra inputs.
    pub fn none() -> Self {
        Self::default()
    }

    /// Wakes the controller whenever `rx` sees a new value. A closed channel stops waking.
    pub fn watch<T: Send + Sync + 'static>(mut self, mut rx: watch::Receiver<T>) -> Self {
        rx.mark_unchanged();
        let s = futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        });
        self.0.push(s.boxed());
        self
    }
}

/// How a controller's outage is being reported: logged when it starts, when its cause
/// changes, and when it ends.
struct Outage {
    since: Instant,
    failures: u32,
    last: String,
}

/// Runs `r` until the desired-state source stops (see the module doc), counting into a
/// private [`Metrics`] nobody scrapes (tests, tools).
pub async fn run<R: Reconciler>(
    r: R,
    desired: watch::Receiver<DesiredState>,
    wakers: Wakers,
    cfg: RunnerConfig,
) {
    run_observed(r, desired, wakers, cfg, Metrics::new()).await
}

/// [`run`], recording each pass's duration and failures under the controller's name in
/// `metrics` (`ferrea_agent_reconcile_duration_seconds`, `ferrea_agent_reconcile_errors_total`).
pub async fn run_observed<R: Reconciler>(
    mut r: R,
    mut desired: watch::Receiver<DesiredState>,
    mut wakers: Wakers,
    cfg: RunnerConfig,
    metrics: Metrics,
) {
    let name = r.name();
    let mut trigger = Trigger::Start;
    let mut outage: Option<Outage> = None;
    let mut attempt: u64 = 0;
    let mut last_converged = Instant::now();
    loop {
        desired.mark_unchanged();
        attempt += 1;
        let span = tracing::info_span!("reconcile", controller = name, trigger = ?trigger, attempt);
        let started = Instant::now();
        let result = r
            .reconcile(&Desired(&desired), trigger)
            .instrument(span.clone())
            .await;
        metrics.reconciled(name, started.elapsed(), result.is_ok());
        let _enter = span.enter();
        let (mut requeue, resync_at) = match result {
            Ok(action) => {
                if let Some(o) = outage.take() {
                    tracing::info!(
                        failures = o.failures,
                        down_ms = o.since.elapsed().as_millis() as u64,
                        "recovered"
                    );
                }
                tracing::debug!(
                    took_ms = started.elapsed().as_millis() as u64,
                    ?action,
                    "reconciled"
                );
                let requeue = match action {
                    Action::Await => None,
                    Action::Requeue(d) => Some((Instant::now() + d, Trigger::Requeue)),
                };
                // The resync period counts from the last pass that converged the node, so a
                // reconciler that requeues often is still resynced on time.
                if trigger.converge() {
                    last_converged = Instant::now();
                }
                (requeue, cfg.resync.map(|d| last_converged + d))
            }
            Err(e) => {
                let msg = error_chain(&e);
                let o = outage.get_or_insert_with(|| Outage {
                    since: Instant::now(),
                    failures: 0,
                    last: String::new(),
                });
                o.failures += 1;
                if o.last != msg {
                    tracing::error!(error = %msg, failures = o.failures, "reconcile failed; retrying");
                    o.last = msg;
                } else {
                    tracing::debug!(error = %msg, failures = o.failures, "reconcile failed again");
                }
                let retry = match r.error_policy(&e, o.failures, &cfg) {
                    Action::Await => None,
                    Action::Requeue(d) => Some((Instant::now() + d, Trigger::Retry)),
                };
                (retry, None)
            }
        };
        drop(_enter);

        // Wait for the next reason to reconcile.
        let timer = requeue.map(|(at, _)| at);
        let next = tokio::select! {
            r = desired.changed() => {
                if r.is_err() {
                    tracing::debug!(controller = name, "desired-state source stopped; controller stops");
                    return;
                }
                Trigger::Changed
            }
            Some(()) = wakers.0.next(), if !wakers.0.is_empty() => Trigger::Changed,
            _ = sleep_until(timer), if timer.is_some() => {
                requeue.take().map_or(Trigger::Requeue, |(_, t)| t)
            }
            _ = sleep_until(resync_at), if resync_at.is_some() => Trigger::Resync,
        };
        if next == Trigger::Changed && !cfg.debounce.is_zero() {
            // Coalesce the rest of a burst. A retry that was due stays due: the change pass
            // converges anyway.
            tokio::time::sleep(cfg.debounce).await;
        }
        trigger = match (next, outage.is_some()) {
            // A change during an outage is a retry too: the reconciler must converge.
            (Trigger::Changed, true) => Trigger::Retry,
            (t, _) => t,
        };
    }
}

fn sleep_until(at: Option<Instant>) -> Pin<Box<tokio::time::Sleep>> {
    Box::pin(tokio::time::sleep_until(
        at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
    ))
}

/// The error and its sources, `: `-separated (what `{:#}` prints for anyhow).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, thiserror::Error)]
    #[error("broken: {0}")]
    struct Broken(&'static str);

    /// Records each call's trigger; fails while `fail` is set.
    struct Probe {
        calls: Arc<Mutex<Vec<Trigger>>>,
        fail: Arc<Mutex<u32>>,
        action: Action,
    }

    impl Reconciler for Probe {
        type Error = Broken;
        fn name(&self) -> &'static str {
            "probe"
        }
        async fn reconcile(&mut self, d: &Desired<'_>, t: Trigger) -> Result<Action, Broken> {
            let _nodes = d.get().nodes.len();
            self.calls.lock().unwrap().push(t);
            let mut f = self.fail.lock().unwrap();
            if *f > 0 {
                *f -= 1;
                return Err(Broken("on purpose"));
            }
            Ok(self.action)
        }
    }

    fn probe(fail: u32, action: Action) -> (Probe, Arc<Mutex<Vec<Trigger>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let p = Probe {
            calls: calls.clone(),
            fail: Arc::new(Mutex::new(fail)),
            action,
        };
        (p, calls)
    }

    fn cfg() -> RunnerConfig {
        RunnerConfig {
            debounce: Duration::from_millis(10),
            resync: None,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_millis(400),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let c = cfg();
        let got: Vec<u64> = (1..=5).map(|n| c.backoff(n).as_millis() as u64).collect();
        assert_eq!(got, [100, 200, 400, 400, 400]);
        let fixed = RunnerConfig {
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(1),
            ..c
        };
        assert_eq!(fixed.backoff(7), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_one_pass() {
        let (tx, rx) = watch::channel(DesiredState::default());
        let (p, calls) = probe(0, Action::Await);
        let task = tokio::spawn(run(p, rx, Wakers::none(), cfg()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..5 {
            tx.send_modify(|s| s.errors.push("x".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(*calls.lock().unwrap(), [Trigger::Start, Trigger::Changed]);
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_with_backoff_and_a_change_converges() {
        let (tx, rx) = watch::channel(DesiredState::default());
        let (p, calls) = probe(3, Action::Await);
        let task = tokio::spawn(run(p, rx, Wakers::none(), cfg()));
        // Start fails, retries at +100 ms (fails), +200 ms (fails), +400 ms (succeeds).
        tokio::time::sleep(Duration::from_millis(750)).await;
        assert_eq!(
            *calls.lock().unwrap(),
            [
                Trigger::Start,
                Trigger::Retry,
                Trigger::Retry,
                Trigger::Retry
            ]
        );
        // Healthy now: nothing more without a change.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(calls.lock().unwrap().len(), 4);
        tx.send_modify(|s| s.errors.push("x".into()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(calls.lock().unwrap().last(), Some(&Trigger::Changed));
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn requeue_resync_and_extra_wakers() {
        let (tx, rx) = watch::channel(DesiredState::default());
        let (ptx, prx) = watch::channel(0u64);
        let (p, calls) = probe(0, Action::Requeue(Duration::from_millis(300)));
        let c = RunnerConfig {
            resync: Some(Duration::from_millis(1000)),
            ..cfg()
        };
        let task = tokio::spawn(run(p, rx, Wakers::none().watch(prx), c));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(*calls.lock().unwrap(), [Trigger::Start, Trigger::Requeue]);
        ptx.send_replace(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(calls.lock().unwrap().last(), Some(&Trigger::Changed));
        drop(tx);
        task.await.unwrap();

        // A reconciler that requeues more often than the resync period is still resynced.
        let (tx, rx) = watch::channel(DesiredState::default());
        let (p, calls) = probe(0, Action::Requeue(Duration::from_millis(300)));
        let c = RunnerConfig {
            resync: Some(Duration::from_millis(1000)),
            ..cfg()
        };
        let task = tokio::spawn(run(p, rx, Wakers::none(), c));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            *calls.lock().unwrap(),
            [
                Trigger::Start,
                Trigger::Requeue,
                Trigger::Requeue,
                Trigger::Requeue,
                Trigger::Resync
            ]
        );
        drop(tx);
        task.await.unwrap();

        // Resync only: a reconciler that never requeues is still called periodically.
        let (tx, rx) = watch::channel(DesiredState::default());
        let (p, calls) = probe(0, Action::Await);
        let c = RunnerConfig {
            resync: Some(Duration::from_millis(1000)),
            ..cfg()
        };
        let task = tokio::spawn(run(p, rx, Wakers::none(), c));
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(
            *calls.lock().unwrap(),
            [Trigger::Start, Trigger::Resync, Trigger::Resync]
        );
        drop(tx);
        task.await.unwrap();
    }

    #[test]
    fn error_chain_names_every_source() {
        let io = std::io::Error::other("disk on fire");
        #[derive(Debug, thiserror::Error)]
        #[error("writing the view")]
        struct W(#[source] std::io::Error);
        assert_eq!(error_chain(&W(io)), "writing the view: disk on fire");
    }
}
