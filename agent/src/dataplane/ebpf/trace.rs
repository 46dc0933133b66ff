//! [`crate::dataplane::Dataplane::trace`] for the eBPF backend: the pinned programs the pods'
//! filters run, run on one constructed frame with `BPF_PROG_TEST_RUN`.
//!
//! - `ferrea_from_pod` runs as on the sending pod's host veth (the test run's `__sk_buff`
//!   names that interface, so the program finds the pod's endpoint by `skb->ifindex` as for a
//!   real frame); when it redirects into the tunnel device, `ferrea_to_tunnel` runs on the
//!   frame it left, as on the tunnel device.
//! - `TC_ACT_REDIRECT` alone does not say where to, so each program writes what it decided
//!   into the one-slot map `FERREA_TRACE` ([`TraceRecord`]), but only for a packet whose
//!   `skb->mark` is [`TRACE_MARK`]: the test run sets that mark, real traffic never has it
//!   (it pays one compare per verdict). The slot is cleared before each run; the backend's
//!   lock makes traces run one at a time.
//!
//! The test run goes through aya's [`TestRun`] for [`SchedClassifier`] (aya 0.14). aya has no
//! binding of `struct __sk_buff`, so the context is built as bytes from its UAPI offsets
//! (`mark`, `ifindex`); the kernel accepts a context shorter than the struct and zero-fills
//! the rest. The kernel resolves `ifindex` in the calling thread's network namespace: the
//! agent's, the node's.
//!
//! What the run changes: the programs count the packet as one sent by the pod (its
//! `FERREA_POD_CNT` entry), or as spoofed. The stack-flow map is only looked up (the traced
//! TCP segment is no `SYN`), and the tunnel program records no stack flow for a traced packet.
//! Nothing is transmitted: a test run's redirect only returns `TC_ACT_REDIRECT`.

use std::net::Ipv4Addr;

use aya::maps::{Array, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use ferrea_common::{
    PROG_FROM_POD, PROG_TO_TUNNEL, TRACE_EGRESS_STEER, TRACE_MARK, TRACE_SPOOFED, TRACE_STACK_FLOW,
    TRACE_TO_NODE, TRACE_TO_POD, TRACE_TO_STACK, TRACE_TUNNEL_KEY, TraceRecord,
};

use super::{ERR, Loaded, ifname_of, ip_of_key};
use crate::dataplane::trace::frame;
use crate::dataplane::{
    DataplaneError, PacketTrace, TUNNEL_IFNAME, TracePacket, TraceStep, TraceVerdict, unmet,
};

/// `TC_ACT_OK`: on to the node's stack.
const TC_ACT_OK: u32 = 0;
/// `TC_ACT_SHOT`: dropped.
const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`: sent where the program's redirect helper said.
const TC_ACT_REDIRECT: u32 = 7;

/// Offsets in `struct __sk_buff` (include/uapi/linux/bpf.h): `len`, `pkt_type`, then `mark`;
/// `ifindex` after `queue_mapping`, `protocol`, `vlan_*`, `priority`, `ingress_ifindex`.
const SKB_OFF_MARK: usize = 8;
const SKB_OFF_IFINDEX: usize = 40;
/// The context passed: the struct up to and including `ifindex`.
const SKB_CTX_LEN: usize = 44;

/// The test run's context: the trace mark, on interface `ifindex`.
fn skb_ctx(ifindex: u32) -> [u8; SKB_CTX_LEN] {
    let mut c = [0u8; SKB_CTX_LEN];
    c[SKB_OFF_MARK..SKB_OFF_MARK + 4].copy_from_slice(&TRACE_MARK.to_ne_bytes());
    c[SKB_OFF_IFINDEX..SKB_OFF_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

/// One program run: its return code, the record it wrote, the frame it left.
struct Run {
    ret: u32,
    record: TraceRecord,
    data: Vec<u8>,
}

fn run(
    prog: &SchedClassifier,
    name: &str,
    map: &mut Array<MapData, TraceRecord>,
    ifindex: u32,
    frame: &[u8],
) -> Result<Run, DataplaneError> {
    map.set(0, TraceRecord::default(), 0)
        .map_err(ERR.other("clear", format!("map {}", ferrea_common::MAP_TRACE)))?;
    let ctx = skb_ctx(ifindex);
    // Room for what a program may add (it adds nothing today).
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .map_err(ERR.other(
            "BPF_PROG_TEST_RUN",
            format!("program {name} on ifindex {ifindex}"),
        ))?;
    out.truncate(r.data_size_out as usize);
    let record = map
        .get(&0, 0)
        .map_err(ERR.other("read", format!("map {}", ferrea_common::MAP_TRACE)))?;
    Ok(Run {
        ret: r.return_value,
        record,
        data: out,
    })
}

/// A MAC as `aa:bb:cc:dd:ee:ff`.
fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The name of a TC return code.
fn act(ret: u32) -> String {
    match ret {
        TC_ACT_OK => "TC_ACT_OK".into(),
        TC_ACT_SHOT => "TC_ACT_SHOT".into(),
        TC_ACT_REDIRECT => "TC_ACT_REDIRECT".into(),
        r => format!("TC action {r}"),
    }
}

/// An interface index with its name, for people.
fn ifdesc(ifindex: u32) -> String {
    match ifname_of(ifindex) {
        Some(n) => format!("{n} (ifindex {ifindex})"),
        None => format!("ifindex {ifindex}"),
    }
}

fn unexpected(prog: &str, r: &Run) -> DataplaneError {
    ERR.other("trace", format!("program {prog}"))(unmet(format!(
        "returned {} with trace record {:?}",
        act(r.ret),
        r.record
    )))
}

fn push(steps: &mut Vec<TraceStep>, stage: &str, action: String) {
    steps.push(TraceStep {
        stage: stage.to_owned(),
        action,
    });
}

/// Runs the trace (see the module doc). `st` is locked by the caller for the whole trace.
pub(super) fn trace(st: &mut Loaded, p: &TracePacket) -> Result<PacketTrace, DataplaneError> {
    let src_if = p.src.host_ifindex;
    let ep = st.maps.endpoint_by_ifindex(src_if).ok_or_else(|| {
        ERR.other("trace", format!("pod {}", p.src.ip))(unmet(format!(
            "no endpoint for its host veth {} in {}",
            ifdesc(src_if),
            ferrea_common::MAP_ENDPOINTS_BY_IFINDEX
        )))
    })?;
    // The pod sends to the MAC the program answers its ARP with: its host veth's.
    let f = frame(p, ep.host_mac);
    let r = run(&st.from_pod, PROG_FROM_POD, &mut st.trace, src_if, &f)?;
    let stage = format!("{PROG_FROM_POD} (tc ingress of {})", p.src.host_ifname);
    let mut steps = Vec::new();
    let rec = r.record;
    let verdict = match (rec.verdict, r.ret) {
        (TRACE_SPOOFED, TC_ACT_SHOT) => {
            let reason = format!(
                "spoof guard: source {} / {} is not the pod's {} / {}",
                p.src_ip,
                fmt_mac(&p.src_mac),
                ip_of_key(ep.ipv4),
                fmt_mac(&ep.pod_mac)
            );
            push(&mut steps, &stage, format!("{}: {reason}", act(r.ret)));
            TraceVerdict::Dropped {
                spoof_guard: true,
                reason,
            }
        }
        (TRACE_TO_POD, TC_ACT_REDIRECT) => {
            let dst = st.maps.endpoint_by_ifindex(rec.ifindex);
            let ip = dst.map_or(p.dst, |e| ip_of_key(e.ipv4));
            push(
                &mut steps,
                &stage,
                format!(
                    "{}: bpf_redirect_peer into the pod behind {}",
                    act(r.ret),
                    ifdesc(rec.ifindex)
                ),
            );
            TraceVerdict::ToPod {
                ip,
                interface: ifname_of(rec.ifindex).unwrap_or_else(|| ifdesc(rec.ifindex)),
            }
        }
        (TRACE_STACK_FLOW, TC_ACT_OK) => {
            let reason = format!(
                "a reply of a connection the node's stack carried ({}): the stack un-NATs it",
                ferrea_common::MAP_STACK_FLOWS
            );
            push(&mut steps, &stage, format!("{}: {reason}", act(r.ret)));
            TraceVerdict::ToStack { reason }
        }
        (TRACE_TO_STACK, TC_ACT_OK) => {
            let reason = "no fast path (not a pod of this node, not another node's pod through \
                          the tunnel, not steered for Egress): the node's stack routes it"
                .to_owned();
            push(&mut steps, &stage, format!("{}: {reason}", act(r.ret)));
            TraceVerdict::ToStack { reason }
        }
        (TRACE_TO_NODE | TRACE_EGRESS_STEER, TC_ACT_REDIRECT) => {
            let why = if rec.verdict == TRACE_TO_NODE {
                format!(
                    "another node's pod (node {})",
                    Ipv4Addr::from(rec.node_ip.to_ne_bytes())
                )
            } else {
                format!(
                    "steered for Egress {} to node {}",
                    rec.id,
                    Ipv4Addr::from(rec.node_ip.to_ne_bytes())
                )
            };
            push(
                &mut steps,
                &stage,
                format!(
                    "{}: bpf_redirect to {}: {why}",
                    act(r.ret),
                    ifdesc(rec.ifindex)
                ),
            );
            let t = run(
                &st.to_tunnel,
                PROG_TO_TUNNEL,
                &mut st.trace,
                rec.ifindex,
                &r.data,
            )?;
            let stage = format!("{PROG_TO_TUNNEL} (tc egress of {TUNNEL_IFNAME})");
            match (t.record.verdict, t.ret) {
                (TRACE_TUNNEL_KEY, TC_ACT_OK) => {
                    let node_ip = Ipv4Addr::from(t.record.node_ip.to_ne_bytes());
                    push(
                        &mut steps,
                        &stage,
                        format!(
                            "{}: tunnel key set: outer destination {node_ip}, VNI {}",
                            act(t.ret),
                            t.record.id
                        ),
                    );
                    TraceVerdict::Tunnel {
                        node_ip,
                        vni: t.record.id,
                    }
                }
                (0, TC_ACT_SHOT) => {
                    let reason = format!(
                        "{PROG_TO_TUNNEL} dropped it: no node holds {} (or the steered pod's \
                         destination is exempt)",
                        p.dst
                    );
                    push(&mut steps, &stage, format!("{}: {reason}", act(t.ret)));
                    TraceVerdict::Dropped {
                        spoof_guard: false,
                        reason,
                    }
                }
                _ => return Err(unexpected(PROG_TO_TUNNEL, &t)),
            }
        }
        (0, TC_ACT_SHOT) => {
            let reason = format!(
                "{PROG_FROM_POD} dropped it before any verdict (truncated, or no endpoint for \
                 its interface)"
            );
            push(&mut steps, &stage, format!("{}: {reason}", act(r.ret)));
            TraceVerdict::Dropped {
                spoof_guard: false,
                reason,
            }
        }
        _ => return Err(unexpected(PROG_FROM_POD, &r)),
    };
    Ok(PacketTrace { steps, verdict })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_carries_the_mark_and_the_interface() {
        let c = skb_ctx(0x1234);
        assert_eq!(u32::from_ne_bytes(c[8..12].try_into().unwrap()), TRACE_MARK);
        assert_eq!(u32::from_ne_bytes(c[40..44].try_into().unwrap()), 0x1234);
        // Everything else zero: the kernel refuses other non-zero fields.
        assert!(
            c.iter()
                .enumerate()
                .all(|(i, b)| (8..12).contains(&i) || (40..44).contains(&i) || *b == 0)
        );
    }

    #[test]
    fn return_codes_are_named() {
        assert_eq!(act(0), "TC_ACT_OK");
        assert_eq!(act(2), "TC_ACT_SHOT");
        assert_eq!(act(7), "TC_ACT_REDIRECT");
        assert_eq!(act(3), "TC action 3");
    }
}
