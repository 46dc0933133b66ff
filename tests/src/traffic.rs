//! Traffic between namespaces: pings that run while a test does something disruptive
//! (restarting the agent or OVS) and the numbers that say how much got through, how long
//! until a destination answers, a bulk TCP transfer, and an iperf3 run.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::NetNs;

use anyhow::Context;

/// A `ping` running in the background inside a namespace; killed by PID on drop if the test
/// fails before [`BackgroundPing::finish`].
#[derive(Debug)]
pub struct BackgroundPing {
    child: Option<Child>,
}

/// What a [`BackgroundPing`] reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PingCounts {
    /// Echo requests sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
}

impl PingCounts {
    /// Requests without a reply.
    pub fn lost(&self) -> u32 {
        self.sent.saturating_sub(self.received)
    }
}

impl BackgroundPing {
    /// Starts pinging `dst` from namespace `ns` every `interval` for about `duration`: a fixed
    /// count (`-c duration/interval`) with a 1 s reply timeout for the last one, so a reply
    /// still in flight when time is up is not counted as lost (as `-w` would).
    pub fn start(
        ns: &str,
        dst: Ipv4Addr,
        interval: Duration,
        duration: Duration,
    ) -> anyhow::Result<Self> {
        let count = (duration.as_millis() / interval.as_millis().max(1)).max(1);
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-n", "-q", "-W", "1", "-i"])
            .arg(format!("{:.3}", interval.as_secs_f64()))
            .arg("-c")
            .arg(count.to_string())
            .arg(dst.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ping")?;
        Ok(BackgroundPing { child: Some(child) })
    }

    /// Waits until ping ends and returns its counts.
    pub fn finish(mut self) -> anyhow::Result<PingCounts> {
        let out = self
            .child
            .take()
            .expect("ping still owned")
            .wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_counts(&text).with_context(|| format!("no summary in ping output: {text}"))
    }
}

impl Drop for BackgroundPing {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Parses ping's "N packets transmitted, M received" line.
pub fn parse_counts(out: &str) -> Option<PingCounts> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().ok());
    Some(PingCounts {
        sent: nums.next()??,
        received: nums.next()??,
    })
}

/// Polls single short pings from `ns` to `dst` for up to `limit`; returns how long until a
/// reply.
pub fn time_to_reach(ns: &str, dst: Ipv4Addr, start: Instant, limit: Duration) -> Option<Duration> {
    let d = dst.to_string();
    while start.elapsed() < limit {
        let out = crate::netns::exec(ns, &["ping", "-n", "-q", "-c", "1", "-W", "0.2", &d]);
        if out.status.success() {
            return Some(start.elapsed());
        }
    }
    None
}

/// Sends `len` bytes from `from` to a listener in `to` over TCP; returns what arrived.
pub fn tcp_transfer(from: &NetNs, to: &NetNs, dst: Ipv4Addr, len: usize) -> usize {
    let addr = SocketAddr::from((dst, 5201));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = to.spawn(move || {
        let l = TcpListener::bind(addr).unwrap();
        ready_tx.send(()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    ready_rx.recv().unwrap();
    from.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0;
        while sent < len {
            let n = chunk.len().min(len - sent);
            if s.write_all(&chunk[..n]).is_err() {
                break;
            }
            sent += n;
        }
    });
    server.join().unwrap()
}

/// Pings every (pod, destination, what) triple, 8 at a time; returns the failures, each
/// naming the pod, `what` and the destination.
pub fn ping_all(pairs: &[(&crate::pod::Pod, Ipv4Addr, String)]) -> Vec<String> {
    let failures = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((p, dst, what)) = pairs.get(i) else {
                        break;
                    };
                    if !p.ping(*dst) {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("pod {} -> {what} ({dst}): no reply", p.ip()));
                    }
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

/// Asserts that every pod of `pods` reaches every other one, the gateway of every node of
/// `nodes` and the external host's [`crate::fabric::INTERNET_IP`]; the failure names each
/// pair that got no reply.
pub fn assert_all_reach(pods: &[&crate::pod::Pod], nodes: &[crate::node::Node]) {
    let mut pairs = Vec::new();
    for (i, from) in pods.iter().enumerate() {
        for (j, to) in pods.iter().enumerate() {
            if i != j {
                pairs.push((*from, to.ip(), format!("pod {}", to.ip())));
            }
        }
        for n in nodes {
            pairs.push((*from, n.gateway(), format!("gateway of {}", n.name())));
        }
        pairs.push((*from, crate::fabric::INTERNET_IP, "external".to_owned()));
    }
    let failures = ping_all(&pairs);
    assert!(
        failures.is_empty(),
        "{} of {} pings failed:\n{}",
        failures.len(),
        pairs.len(),
        failures.join("\n")
    );
}

/// One iperf3 run: a one-shot server in `server` bound to `bind`, the client in `client` with
/// `-c <bind> -J` and `args`; returns the client's JSON report. The server is stopped by PID,
/// also when the client fails.
pub fn iperf3(
    server: &NetNs,
    bind: Ipv4Addr,
    client: &NetNs,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let bind = bind.to_string();
    let mut srv = Command::new("ip")
        .args([
            "netns",
            "exec",
            server.name(),
            "iperf3",
            "-s",
            "-1",
            "-B",
            &bind,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    std::thread::sleep(Duration::from_millis(300));
    let mut argv = vec!["iperf3", "-c", &bind, "-J"];
    argv.extend_from_slice(args);
    let out = client.exec(&argv);
    let _ = srv.kill();
    let _ = srv.wait();
    anyhow::ensure!(out.status.success(), "iperf3 to {bind}: {out:?}");
    serde_json::from_slice(&out.stdout).context("iperf3's JSON report")
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_ping_summary() {
        let out = "--- 10.0.0.1 ping statistics ---\n160 packets transmitted, 157 received, 1.875% packet loss, time 7990ms\n";
        let c = super::parse_counts(out).unwrap();
        assert_eq!((c.sent, c.received, c.lost()), (160, 157, 3));
        assert!(super::parse_counts("nothing").is_none());
    }
}
