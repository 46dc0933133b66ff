//! Traffic that runs while a test does something disruptive (restarting the agent or OVS),
//! and the numbers that say how much of it got through.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
