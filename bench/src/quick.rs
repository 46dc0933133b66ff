//! `--quick`: every benchmark scaled down to seconds (one-second iperf3 and connection runs,
//! 3 rounds where a ratio is gated and one elsewhere, a tenth of the pods, objects and
//! trials), and a gate on the figures that have a goal.
//!
//! The quick figures are noisy and come from whatever build runs them (the test command
//! runs the debug build), so they say nothing about the goals themselves. What the gate
//! catches is a regression by a large factor: a figure with a goal fails when it is worse
//! than half its goal (a ratio below `goal / 2`, a time or size above `goal * 2`). A goal
//! that is already missed by more than that is listed, with its floor and the reason, in
//! `bench/known-misses.txt`; the gate then holds the figure at that floor instead, so it
//! cannot get worse either. A figure that was not measured fails the gate too.
//!
//! Not gated: `metrics_overhead_pct` (its goal, 2%, is far below the noise of one quick
//! round) and the memory goals on a debug build (its binary and heap are not the release
//! agent's).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::Figures;

static QUICK: AtomicBool = AtomicBool::new(false);

/// Turns quick mode on for the rest of the process.
pub fn enable() {
    QUICK.store(true, Ordering::Relaxed);
}

/// Whether quick mode is on.
pub fn on() -> bool {
    QUICK.load(Ordering::Relaxed)
}

/// `full` normally, `quick` in quick mode.
pub fn pick<T>(full: T, quick: T) -> T {
    if on() { quick } else { full }
}

/// Which way a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// A ratio to a peer (`_vs_`): at least the goal.
    Higher,
    /// A time, a size, an overhead: at most the goal.
    Lower,
}

/// A figure with a goal.
#[derive(Clone, Copy, Debug)]
pub struct Goal {
    /// The benchmark that measures it.
    pub bench: &'static str,
    /// The figure's key in the benchmark's JSON.
    pub key: &'static str,
    /// The goal (the number).
    pub goal: f64,
    /// Which way is better.
    pub better: Better,
    /// Gated in quick mode only in a release build (memory depends on the build).
    pub release_only: bool,
    /// How much more a debug build may take (the agent's own work, unoptimised, is about
    /// twice as slow): multiplies the threshold of a [`Better::Lower`] figure.
    pub debug_slack: f64,
}

const fn higher(bench: &'static str, key: &'static str, goal: f64) -> Goal {
    Goal {
        bench,
        key,
        goal,
        better: Better::Higher,
        release_only: false,
        debug_slack: 1.0,
    }
}

const fn lower(bench: &'static str, key: &'static str, goal: f64) -> Goal {
    Goal {
        bench,
        key,
        goal,
        better: Better::Lower,
        release_only: false,
        debug_slack: 1.0,
    }
}

const fn memory(key: &'static str, goal: f64) -> Goal {
    Goal {
        bench: "footprint",
        key,
        goal,
        better: Better::Lower,
        release_only: true,
        debug_slack: 1.0,
    }
}

/// Every figure with a goal, as the README's benchmark list states them.
pub const GOALS: &[Goal] = &[
    higher("throughput", "ferrea_ebpf_tcp_gbps_vs_veth", 0.95),
    higher("throughput", "ferrea_ebpf_udp_kpps_vs_veth", 0.95),
    higher("throughput", "ferrea_ovs_tcp_gbps_vs_ovs_normal", 0.95),
    higher("throughput", "ferrea_ovs_udp_kpps_vs_ovs_normal", 0.95),
    higher(
        "throughput",
        "ferrea_ovs_tcp_gbps_vs_ovs_normal_csum_off",
        0.95,
    ),
    higher(
        "throughput-cross-node",
        "ferrea_ebpf_tcp_gbps_vs_kernel_vxlan",
        0.90,
    ),
    higher(
        "throughput-cross-node",
        "ferrea_ebpf_udp_kpps_vs_kernel_vxlan",
        0.90,
    ),
    higher("egress", "egress_tcp_gbps_vs_masquerade", 0.95),
    higher("egress", "ovs_egress_tcp_gbps_vs_ovs_masquerade", 0.95),
    lower("egress-failover", "failover_ms_max", 2000.0),
    lower("egress-failover", "failover_linkcut_ms_max", 2000.0),
    // The agent's own work (100 Pod patches) dominates: 826 ms release, 1.8 s debug.
    Goal {
        debug_slack: 2.0,
        ..lower("npl-kubernetes", "npl_100_pods_api_ms", 1000.0)
    },
    higher("services", "ebpf_proxy_vs_kube_proxy_tcp", 1.1),
    higher("services", "ebpf_proxy_vs_kube_proxy_cps", 1.1),
    memory("ebpf_rss_idle_mib", 16.0),
    memory("ebpf_rss_100_pods_mib", 20.0),
    memory("ebpf_rss_peak_mib", 32.0),
];

/// One line of `bench/known-misses.txt`: `<key> <floor> <reason>`.
#[derive(Clone, Debug, PartialEq)]
pub struct KnownMiss {
    /// The figure.
    pub key: String,
    /// What the gate holds it at instead of half its goal.
    pub floor: f64,
    /// Why the goal is missed (an issue and a cause).
    pub reason: String,
}

/// Parses `bench/known-misses.txt` (`#` comments and blank lines skipped).
pub fn parse_known_misses(text: &str) -> anyhow::Result<Vec<KnownMiss>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(3, char::is_whitespace);
        let (Some(key), Some(floor), Some(reason)) = (parts.next(), parts.next(), parts.next())
        else {
            anyhow::bail!(
                "known-misses line {}: want `<key> <floor> <reason>`: {line:?}",
                n + 1
            );
        };
        let floor: f64 = floor.parse().map_err(|_| {
            anyhow::anyhow!(
                "known-misses line {}: floor {floor:?} is not a number",
                n + 1
            )
        })?;
        if !GOALS.iter().any(|g| g.key == key) {
            anyhow::bail!(
                "known-misses line {}: {key} is not a figure with a goal",
                n + 1
            );
        }
        out.push(KnownMiss {
            key: key.to_owned(),
            floor,
            reason: reason.trim().to_owned(),
        });
    }
    Ok(out)
}

/// The verdict on one figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The figure's key.
    pub key: &'static str,
    /// What was measured (`None`: not measured).
    pub value: Option<f64>,
    /// The threshold it was held to.
    pub threshold: f64,
    /// Passed.
    pub ok: bool,
    /// `half its goal of X`, `known miss: ...`, `not gated: ...`.
    pub why: String,
}

/// Gates the figures of `bench`. `release`: the figures come from a release build.
pub fn gate(bench: &str, fig: &Figures, known: &[KnownMiss], release: bool) -> Vec<Verdict> {
    let mut out = Vec::new();
    for g in GOALS.iter().filter(|g| g.bench == bench) {
        let value = fig.get(g.key).and_then(serde_json::Value::as_f64);
        let slack = if release { 1.0 } else { g.debug_slack };
        let half = match g.better {
            Better::Higher => g.goal / 2.0,
            Better::Lower => g.goal * 2.0 * slack,
        };
        let (threshold, why) = match known.iter().find(|k| k.key == g.key) {
            Some(k) => (
                k.floor,
                format!("known miss, held at {}: {}", k.floor, k.reason),
            ),
            None if slack != 1.0 => (
                half,
                format!("half its goal of {}, x{slack} for a debug build", g.goal),
            ),
            None => (half, format!("half its goal of {}", g.goal)),
        };
        if g.release_only && !release {
            out.push(Verdict {
                key: g.key,
                value,
                threshold,
                ok: true,
                why: "not gated: memory of a debug build".into(),
            });
            continue;
        }
        let ok = value.is_some_and(|v| match g.better {
            Better::Higher => v >= threshold,
            Better::Lower => v <= threshold,
        });
        out.push(Verdict {
            key: g.key,
            value,
            threshold,
            ok,
            why: if value.is_none() {
                "not measured".into()
            } else {
                why
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fig(pairs: &[(&str, f64)]) -> Figures {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect()
    }

    #[test]
    fn a_ratio_fails_below_half_its_goal_and_a_time_above_twice() {
        let f = fig(&[
            ("failover_ms_max", 3900.0),
            ("failover_linkcut_ms_max", 4100.0),
        ]);
        let v = gate("egress-failover", &f, &[], false);
        assert_eq!(
            v.iter().map(|v| v.ok).collect::<Vec<_>>(),
            vec![true, false]
        );
        let f = fig(&[
            ("egress_tcp_gbps_vs_masquerade", 0.48),
            ("ovs_egress_tcp_gbps_vs_ovs_masquerade", 0.47),
        ]);
        let v = gate("egress", &f, &[], false);
        assert_eq!(
            v.iter().map(|v| v.ok).collect::<Vec<_>>(),
            vec![true, false]
        );
    }

    #[test]
    fn a_known_miss_is_held_at_its_floor_and_a_missing_figure_fails() {
        let known = parse_known_misses(
            "# comment\n\nebpf_proxy_vs_kube_proxy_cps 0.3 issue 14: the connection table\n",
        )
        .unwrap();
        assert_eq!(known[0].floor, 0.3);
        let f = fig(&[("ebpf_proxy_vs_kube_proxy_cps", 0.35)]);
        let v = gate("services", &f, &known, false);
        let tcp = v
            .iter()
            .find(|v| v.key == "ebpf_proxy_vs_kube_proxy_tcp")
            .unwrap();
        assert!(!tcp.ok && tcp.why == "not measured", "{tcp:?}");
        let cps = v
            .iter()
            .find(|v| v.key == "ebpf_proxy_vs_kube_proxy_cps")
            .unwrap();
        assert!(cps.ok && cps.why.starts_with("known miss"), "{cps:?}");
        let f = fig(&[("ebpf_proxy_vs_kube_proxy_cps", 0.25)]);
        assert!(!gate("services", &f, &known, false)[1].ok);
    }

    #[test]
    fn a_debug_build_gets_its_slack_on_the_agents_own_times() {
        let f = fig(&[("npl_100_pods_api_ms", 3000.0)]);
        assert!(gate("npl-kubernetes", &f, &[], false)[0].ok);
        assert!(!gate("npl-kubernetes", &f, &[], true)[0].ok);
    }

    #[test]
    fn memory_goals_are_gated_only_for_release_builds() {
        let f = fig(&[("ebpf_rss_idle_mib", 50.0)]);
        let v = gate("footprint", &f, &[], false);
        assert!(v.iter().all(|v| v.ok), "{v:?}");
        let v = gate("footprint", &f, &[], true);
        assert!(!v[0].ok);
    }

    #[test]
    fn known_misses_must_name_a_goal_and_a_number() {
        assert!(parse_known_misses("nope 0.3 why\n").is_err());
        assert!(parse_known_misses("failover_ms_max x why\n").is_err());
        assert!(parse_known_misses("failover_ms_max 3000\n").is_err());
    }
}
