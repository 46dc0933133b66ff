//! The agent's Prometheus metrics: one [`Metrics`] handle, made by the wiring and passed to
//! the parts that count (the CNI server, the reconcile runner, the sources, the Egress
//! controller). It owns the registry and nothing else: it does no I/O and knows nothing of
//! HTTP; `crate::debug::http` serves [`Metrics::encode`] on the metrics port.
//!
//! Every name is under `ferrea_agent_` and follows Prometheus' naming rules (base units,
//! `_total` on counters, `_seconds` on durations). Labels are bounded: a CNI verb and a result
//! class, a controller name; never a pod, an IP or a container ID, so the number of series
//! does not grow with the pods of a node.
//!
//! Cost: a counter increment or a histogram observation is a few atomic operations; the
//! gauges that describe the node (local pods, remote nodes, Egress IPs, NPL mappings) are
//! set by the scrape itself through the refresher the HTTP server is given, so nothing runs
//! between scrapes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The labels of a CNI request: the verb and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabels {
    /// `add`, `del`, `check`, `status`, `gc`.
    verb: &'static str,
    /// `success`, or the CNI error class (`try_again_later`, `invalid_config`, ...).
    result: &'static str,
}

/// The label of a CNI latency series: the verb alone (a failed request's latency is still a
/// latency, and keeping results out halves the histogram's series).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerbLabels {
    verb: &'static str,
}

/// The label of a controller's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: &'static str,
}

/// Histogram buckets of a CNI request: 1 ms to ~8 s, doubling (an ADD is ~10 ms, a DEL
/// ~25 ms here; a TRY_AGAIN_LATER answer is well under 1 ms).
fn cni_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

/// Histogram buckets of a reconcile pass: 0.5 ms to ~4 s, doubling.
fn reconcile_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

struct Inner {
    registry: Registry,
    cni_requests: Family<CniLabels, Counter>,
    cni_duration: HistogramFamily<VerbLabels>,
    reconcile_duration: HistogramFamily<ControllerLabels>,
    reconcile_errors: Family<ControllerLabels, Counter>,
    local_pods: Gauge,
    remote_nodes: Gauge,
    egress_ips_held: Gauge,
    npl_mappings: Gauge,
    source_synced: Gauge,
    watch_restarts: Counter,
    rp_filter_restorations: Counter,
    ready: Gauge,
}

/// The agent's metrics. Cheap to clone (one `Arc`); safe to use from every task.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric of the agent registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ferrea_agent");
        let cni_requests = Family::<CniLabels, Counter>::default();
        registry.register(
            "cni_requests",
            "CNI requests served, by verb and result",
            cni_requests.clone(),
        );
        let cni_duration: HistogramFamily<VerbLabels> = Family::new_with_constructor(cni_buckets);
        registry.register_with_unit(
            "cni_request_duration",
            "Time the agent took to answer a CNI request, by verb",
            Unit::Seconds,
            cni_duration.clone(),
        );
        let reconcile_duration: HistogramFamily<ControllerLabels> =
            Family::new_with_constructor(reconcile_buckets);
        registry.register_with_unit(
            "reconcile_duration",
            "Time of one reconcile pass, by controller (failed passes included)",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ControllerLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconcile passes that failed (dataplane and node sync errors), by controller",
            reconcile_errors.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let local_pods = gauge(&mut registry, "local_pods", "Pod attachments on this node");
        let remote_nodes = gauge(
            &mut registry,
            "remote_nodes",
            "Other nodes the dataplane reaches",
        );
        let egress_ips_held = gauge(
            &mut registry,
            "egress_ips_held",
            "Egress IPs this node holds and has assigned",
        );
        let npl_mappings = gauge(
            &mut registry,
            "npl_mappings",
            "NodePortLocal mappings of this node's pods",
        );
        let source_synced = gauge(
            &mut registry,
            "source_synced",
            "1 when the desired-state source has delivered a complete state, else 0",
        );
        let ready = gauge(
            &mut registry,
            "ready",
            "1 when the CNI server serves requests (not TRY_AGAIN_LATER), else 0",
        );
        let watch_restarts = Counter::default();
        registry.register(
            "source_watch_restarts",
            "Kubernetes watches that failed and were restarted with backoff",
            watch_restarts.clone(),
        );
        let rp_filter_restorations = Counter::default();
        registry.register(
            "rp_filter_restorations",
            "rp_filter values something else changed that ferrea restored",
            rp_filter_restorations.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));
        Metrics(Arc::new(Inner {
            registry,
            cni_requests,
            cni_duration,
            reconcile_duration,
            reconcile_errors,
            local_pods,
            remote_nodes,
            egress_ips_held,
            npl_mappings,
            source_synced,
            watch_restarts,
            rp_filter_restorations,
            ready,
        }))
    }

    /// Counts one CNI request (`verb` lower case: `add`, `del`, ...) that ended with `result`
    /// (`success` or an error class) after `took`.
    pub fn cni_request(&self, verb: &'static str, result: &'static str, took: Duration) {
        self.0
            .cni_requests
            .get_or_create(&CniLabels { verb, result })
            .inc();
        self.0
            .cni_duration
            .get_or_create(&VerbLabels { verb })
            .observe(took.as_secs_f64());
    }

    /// Records one reconcile pass of `controller`.
    pub fn reconciled(&self, controller: &'static str, took: Duration, ok: bool) {
        let l = ControllerLabels { controller };
        self.0
            .reconcile_duration
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        if !ok {
            self.0.reconcile_errors.get_or_create(&l).inc();
        }
    }

    /// A Kubernetes watch failed and is being restarted.
    pub fn watch_restarted(&self) {
        self.0.watch_restarts.inc();
    }

    /// `n` `rp_filter` values were found changed and restored.
    pub fn rp_filter_restored(&self, n: usize) {
        self.0.rp_filter_restorations.inc_by(n as u64);
    }

    /// Whether the source has delivered a complete state.
    pub fn set_source_synced(&self, synced: bool) {
        self.0.source_synced.set(i64::from(synced));
    }

    /// Sets the gauges that describe the node (the HTTP server's refresher calls this before
    /// each scrape).
    pub fn set_node(&self, g: NodeGauges) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.0.local_pods.set(n(g.local_pods));
        self.0.remote_nodes.set(n(g.remote_nodes));
        self.0.egress_ips_held.set(n(g.egress_ips_held));
        self.0.npl_mappings.set(n(g.npl_mappings));
        self.0.ready.set(i64::from(g.ready));
    }

    /// The registry in the OpenMetrics text format (what Prometheus asks for, and whose
    /// `# EOF` line ends the document).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.0.registry);
        out
    }

    /// The registry in Prometheus' older text format (`text/plain; version=0.0.4`), for
    /// clients that do not ask for OpenMetrics (curl, `promtool check metrics`, older
    /// scrapers). The samples are the same; only the metadata differs: a counter family is
    /// named with its `_total` suffix, and there are no `# UNIT` and `# EOF` lines.
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }
}

/// Converts an OpenMetrics document into the Prometheus text format 0.0.4 (see
/// [`Metrics::encode_text`]).
fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let tail = if tail == "unknown" { "untyped" } else { tail };
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total {tail}\n"));
                } else {
                    out.push_str(&format!("{p}{name} {tail}\n"));
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// What the node holds right now, for the gauges of [`Metrics::set_node`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeGauges {
    /// Pod attachments.
    pub local_pods: usize,
    /// Other nodes.
    pub remote_nodes: usize,
    /// Egress IPs held and assigned.
    pub egress_ips_held: usize,
    /// NodePortLocal mappings.
    pub npl_mappings: usize,
    /// Whether the CNI server serves.
    pub ready: bool,
}

/// The process's own CPU time, resident memory and open descriptors, read from `/proc/self`
/// at each scrape (the names of Prometheus' process collector, under the agent's prefix).
#[derive(Debug)]
struct ProcessCollector;

/// (CPU seconds, resident bytes, virtual bytes) of process `pid` (`None`: this one) from its
/// `/proc/<pid>/stat`; `None` if it cannot be read.
pub fn process_stat(pid: Option<u32>) -> Option<(f64, u64, u64)> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces; the fields after it start past its `)`.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are f[11], f[12]; 23 (vsize) f[20]; 24 (rss) f[21].
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .unwrap_or(100) as f64;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let vsize: u64 = f.get(20)?.parse().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .filter(|p| *p > 0)
        .unwrap_or(4096) as u64;
    Some(((utime + stime) / ticks, rss_pages * page, vsize))
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some((cpu, rss, vsize)) = process_stat(None) else {
            return Ok(());
        };
        let c = ConstCounter::new(cpu);
        c.encode(encoder.encode_descriptor(
            "process_cpu",
            "User and system CPU time the agent used",
            Some(&Unit::Seconds),
            c.metric_type(),
        )?)?;
        for (name, help, v) in [
            (
                "process_resident_memory",
                "Resident memory of the agent",
                rss,
            ),
            (
                "process_virtual_memory",
                "Virtual memory of the agent",
                vsize,
            ),
        ] {
            let g = ConstGauge::<i64>::new(i64::try_from(v).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(
                name,
                help,
                Some(&Unit::Bytes),
                g.metric_type(),
            )?)?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            let g = ConstGauge::<i64>::new(fds.count() as i64);
            g.encode(encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors of the agent",
                None,
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_requests_are_counted_by_verb_and_result_with_a_histogram() {
        let m = Metrics::new();
        m.cni_request("add", "success", Duration::from_millis(12));
        m.cni_request("add", "success", Duration::from_millis(3));
        m.cni_request("del", "try_again_later", Duration::from_micros(200));
        let text = m.encode();
        assert!(
            text.contains("ferrea_agent_cni_requests_total{verb=\"add\",result=\"success\"} 2"),
            "{text}"
        );
        assert!(text.contains("ferrea_agent_cni_request_duration_seconds_count{verb=\"add\"} 2"));
        assert!(text.contains(
            "ferrea_agent_cni_request_duration_seconds_bucket{le=\"0.004\",verb=\"add\"} 1"
        ));
        assert!(text.contains("ferrea_agent_process_cpu_seconds_total"));
        assert!(text.contains("ferrea_agent_process_resident_memory_bytes"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_text_format_names_counters_with_total_and_has_no_eof() {
        let m = Metrics::new();
        m.cni_request("add", "success", Duration::from_millis(1));
        let text = m.encode_text();
        assert!(text.contains("# TYPE ferrea_agent_cni_requests_total counter\n"));
        assert!(text.contains("# HELP ferrea_agent_cni_requests_total CNI requests"));
        assert!(text.contains("# TYPE ferrea_agent_cni_request_duration_seconds histogram\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        assert!(
            text.contains("ferrea_agent_cni_requests_total{verb=\"add\",result=\"success\"} 1")
        );
    }

    #[test]
    fn counting_a_request_is_negligible_next_to_an_add() {
        let m = Metrics::new();
        let n = 100_000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            m.cni_request("add", "success", Duration::from_millis(10));
        }
        let per = t.elapsed() / n;
        eprintln!("Metrics::cni_request: {per:?} per call");
        // Debug build, shared cores: generous. An ADD takes ~10 ms.
        assert!(per < Duration::from_micros(20), "{per:?}");
    }

    #[test]
    fn reconcile_errors_and_node_gauges() {
        let m = Metrics::new();
        m.reconciled("egress", Duration::from_millis(2), true);
        m.reconciled("egress", Duration::from_millis(2), false);
        m.set_node(NodeGauges {
            local_pods: 3,
            remote_nodes: 2,
            egress_ips_held: 1,
            npl_mappings: 4,
            ready: true,
        });
        m.rp_filter_restored(2);
        let text = m.encode();
        for want in [
            "ferrea_agent_reconcile_errors_total{controller=\"egress\"} 1",
            "ferrea_agent_reconcile_duration_seconds_count{controller=\"egress\"} 2",
            "ferrea_agent_local_pods 3",
            "ferrea_agent_remote_nodes 2",
            "ferrea_agent_egress_ips_held 1",
            "ferrea_agent_npl_mappings 4",
            "ferrea_agent_ready 1",
            "ferrea_agent_rp_filter_restorations_total 2",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
