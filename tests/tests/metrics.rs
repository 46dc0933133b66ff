//! The agent's metrics and health endpoints on a simulated node, both dataplanes: a scrape
//! from inside the node's namespace counts exactly the CNI ADDs and DELs done, in the
//! request counter and the latency histogram; the node gauges match the node; `/livez` and
//! `/readyz` answer; `promtool check metrics` accepts the output; and a real Prometheus
//! server (Debian's `prometheus`, which scripts/setup.sh installs) scraping the agent in the
//! node's namespace returns the histogram through its HTTP API.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrea_tests::ctl::{self, sample};
use ferrea_tests::{Dataplane, NodeOptions, SimNode, dataplane_tests, wait_for};
use serde_json::Value;

dataplane_tests!(
    the_scrape_counts_the_cni_requests_done,
    a_real_prometheus_scrapes_the_cni_histogram,
);

/// The labels of a successful ADD.
const ADD_OK: &[&str] = &["verb=\"add\"", "result=\"success\""];

fn the_scrape_counts_the_cni_requests_done(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let pods: Vec<_> = (0..3).map(|_| node.add_pod().unwrap()).collect();
    let mut pods = pods.into_iter();
    let mut gone = pods.next().unwrap();
    gone.del().unwrap();
    let _kept: Vec<_> = pods.collect();

    let (status, body) = ctl::http_get(&node, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    let v = |name: &str, labels: &[&str]| {
        sample(&body, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{body}"))
    };
    // Exactly the requests made: 3 ADDs, 1 DEL (the harness's readiness probe is STATUS).
    assert_eq!(v("ferrea_agent_cni_requests_total", ADD_OK), 3.0);
    assert_eq!(
        v(
            "ferrea_agent_cni_requests_total",
            &["verb=\"del\"", "result=\"success\""]
        ),
        1.0
    );
    assert_eq!(
        v(
            "ferrea_agent_cni_request_duration_seconds_count",
            &["verb=\"add\""]
        ),
        3.0
    );
    assert_eq!(
        v(
            "ferrea_agent_cni_request_duration_seconds_bucket",
            &["verb=\"add\"", "le=\"+Inf\""]
        ),
        3.0
    );
    let sum = v(
        "ferrea_agent_cni_request_duration_seconds_sum",
        &["verb=\"add\""],
    );
    assert!(sum > 0.0 && sum < 30.0, "{sum}");
    assert!(v("ferrea_agent_cni_requests_total", &["verb=\"status\""]) >= 1.0);
    // The node.
    assert_eq!(v("ferrea_agent_local_pods", &[]), 2.0);
    assert_eq!(v("ferrea_agent_remote_nodes", &[]), 0.0);
    assert_eq!(v("ferrea_agent_ready", &[]), 1.0);
    assert_eq!(v("ferrea_agent_source_synced", &[]), 1.0);
    assert_eq!(v("ferrea_agent_npl_mappings", &[]), 0.0);
    assert_eq!(v("ferrea_agent_egress_ips_held", &[]), 0.0);
    assert!(
        v(
            "ferrea_agent_reconcile_duration_seconds_count",
            &["controller=\"node\""]
        ) >= 1.0
    );
    assert!(v("ferrea_agent_process_cpu_seconds_total", &[]) > 0.0);
    let rss = v("ferrea_agent_process_resident_memory_bytes", &[]);
    assert!(rss > 1e6 && rss < 2e9, "{rss}");
    // Bounded labels: no pod name, IP or container ID in any series.
    for p in &_kept {
        assert!(
            !body.contains(&p.attachment().pod_name),
            "pod name in the metrics"
        );
        assert!(!body.contains(&p.ip().to_string()), "pod IP in the metrics");
    }
    eprintln!(
        "metrics: {} series, {} bytes; ADD mean {:.1} ms",
        body.lines().filter(|l| !l.starts_with('#')).count(),
        body.len(),
        sum / 3.0 * 1e3
    );

    assert_eq!(
        ctl::http_get(&node, "/livez").unwrap(),
        (200, "ok\n".into())
    );
    assert_eq!(
        ctl::http_get(&node, "/readyz").unwrap(),
        (200, "ok\n".into())
    );
    let (st, _) = ctl::http_get(&node, "/nothing").unwrap();
    assert_eq!(st, 404);

    // promtool's linter accepts the document.
    let out = ferrea_tests::netns::output_with_stdin(
        Command::new("promtool").args(["check", "metrics"]),
        body.as_bytes(),
    )
    .expect("promtool (Debian's prometheus package; scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server in a node's namespace, stopped by its PID on drop.
struct Prometheus {
    child: Child,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

const PROM_PORT: u16 = 19090;

fn start_prometheus(node: &SimNode, dir: &Path) -> Prometheus {
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: ferrea\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            ctl::METRICS_PORT
        ),
    )
    .unwrap();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{PROM_PORT}"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("prometheus.err")).unwrap());
    ferrea_tests::netns::enter_on_spawn(&mut cmd, node.ns().name()).unwrap();
    let child = cmd
        .spawn()
        .expect("prometheus (Debian's prometheus package; scripts/setup.sh installs it)");
    Prometheus { child }
}

/// A query through Prometheus' HTTP API from inside the node's namespace.
fn query(node: &SimNode, q: &str) -> Option<Value> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let path = format!("/api/v1/query?query={enc}");
    let (st, body) = node
        .ns()
        .run(move || {
            ctl::http_get_here(
                std::net::SocketAddr::from(([127, 0, 0, 1], PROM_PORT)),
                &path,
            )
        })
        .ok()?;
    (st == 200).then(|| serde_json::from_str(&body).ok())?
}

/// The single value of an instant-vector answer.
fn scalar(v: &Value) -> Option<f64> {
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn a_real_prometheus_scrapes_the_cni_histogram(dp: Dataplane) {
    let node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prom = start_prometheus(&node, dir.path());
    let _pods: Vec<_> = (0..4).map(|_| node.add_pod().unwrap()).collect();
    let started = Instant::now();
    let count = wait_for(Duration::from_secs(30), || {
        let v = query(
            &node,
            "ferrea_agent_cni_request_duration_seconds_count{verb=\"add\"}",
        )?;
        scalar(&v).filter(|c| *c == 4.0)
    });
    assert_eq!(
        count,
        Some(4.0),
        "Prometheus never saw 4 ADDs; its log: {}",
        std::fs::read_to_string(dir.path().join("prometheus.err")).unwrap_or_default()
    );
    eprintln!(
        "prometheus: the histogram was queryable {:?} after the ADDs",
        started.elapsed()
    );
    // The buckets are there for quantiles: the median ADD latency is a number of seconds.
    let p50 = query(
        &node,
        "histogram_quantile(0.5, sum by (le) (ferrea_agent_cni_request_duration_seconds_bucket{verb=\"add\"}))",
    )
    .and_then(|v| scalar(&v))
    .expect("a median");
    assert!(p50 > 0.0 && p50 < 10.0, "{p50}");
    eprintln!(
        "prometheus: ADD p50 from the histogram: {:.1} ms",
        p50 * 1e3
    );
    // The target is healthy in Prometheus' own view.
    let up = query(&node, "up{job=\"ferrea\"}").and_then(|v| scalar(&v));
    assert_eq!(up, Some(1.0));
    drop(prom);
}
