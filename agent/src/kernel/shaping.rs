//! Traffic shaping of egress IPs (Antrea's Egress `spec.bandwidth`): an HTB qdisc at the root
//! of the interface an egress IP leaves by, one class per shaped IP, each packet put in its
//! class by `skb->priority`, which ferrea's nftables table sets from the packet's Egress mark
//! ([`priority_of`]).
//!
//! - The root qdisc is `htb` with handle [`HTB_MAJOR`]`:` and `default 0`: a packet whose
//!   priority names no class (everything but the shaped Egresses' traffic) goes out through
//!   HTB's direct queue, unshaped and unclassified.
//! - Class `fe0a:<id>` (the Egress id, hex as tc writes it) has `rate` = `ceil` = the Egress's
//!   rate and `burst` = `cburst` = its burst, with a `pfifo` of [`QUEUE_PACKETS`] packets as
//!   its leaf, as tc's default leaf would have on a device with a transmit queue.
//! - Ownership: a root qdisc with handle `fe0a:` is ferrea's. One with handle `0:` is the
//!   kernel's default (`noqueue`, `pfifo_fast`, `mq`, `fq_codel`) and is replaced when a shaped
//!   IP needs the device; any other root qdisc belongs to someone else and is never replaced:
//!   the sync fails naming it. With no shaped IP left, ferrea's qdisc is deleted and the
//!   kernel puts its default back.
//!
//! Through the `tc` binary of iproute2 (as nftables goes through `nft`): the netlink crates
//! ferrea uses (netlink-packet-route) have no HTB options, and the HTB attributes (rate
//! specs, 64-bit rates, direct queue length) are what tc already encodes correctly.

use std::process::Stdio;

use async_trait::async_trait;

use crate::net::EgressId;

/// The major number of ferrea's root qdisc (`fe0a:`).
pub const HTB_MAJOR: u32 = 0xfe0a;

/// Packets queued per shaped class, and in HTB's direct queue.
pub const QUEUE_PACKETS: u32 = 1000;

/// The `skb->priority` that puts a packet in Egress `id`'s class (`fe0a:<id>`).
pub fn priority_of(id: EgressId) -> u32 {
    (HTB_MAJOR << 16) | u32::from(id)
}

/// One shaped egress IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ShapedClass {
    /// The Egress id (the class's minor number).
    pub id: EgressId,
    /// Rate, bits per second.
    pub rate_bps: u64,
    /// Burst, bits.
    pub burst_bits: u64,
}

/// Errors of the shaper.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    /// `tc` could not be run.
    #[error("running tc: {0}")]
    Spawn(#[source] std::io::Error),
    /// `tc` refused a command.
    #[error("tc {args}: {stderr}")]
    Refused {
        /// The command's arguments.
        args: String,
        /// tc's message.
        stderr: String,
    },
    /// tc's output could not be read.
    #[error("reading `tc {args}`: {problem}")]
    Output {
        /// The command's arguments.
        args: String,
        /// What was wrong.
        problem: String,
    },
    /// The device's root qdisc is someone else's.
    #[error(
        "{dev} has a root qdisc of its own ({kind} {handle}); ferrea shapes Egress traffic with an \
         HTB qdisc at the root and does not replace another's: remove it, or give the pool a \
         subnetInfo so the IPs live on a sub-interface of their own"
    )]
    Foreign {
        /// The device.
        dev: String,
        /// The qdisc's kind.
        kind: String,
        /// Its handle.
        handle: String,
    },
}

/// Shapes devices: the one side effect of this module.
#[async_trait]
pub trait Shaping: Send + Sync {
    /// Makes `dev`'s shaping exactly `classes`: ferrea's root qdisc with these classes, or,
    /// for none, no ferrea qdisc (a device without one is left as it is).
    async fn sync(&self, dev: &str, classes: &[ShapedClass]) -> Result<(), ShapeError>;
}

/// [`Shaping`] through the `tc` binary, in the caller's network namespace.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcShaping;

#[async_trait]
impl Shaping for TcShaping {
    async fn sync(&self, dev: &str, classes: &[ShapedClass]) -> Result<(), ShapeError> {
        let root = match root_qdisc(dev).await {
            // Without tc nothing of ferrea's can be there to remove (a node whose image
            // predates Egress bandwidth); shaping itself still needs it.
            Err(ShapeError::Spawn(e))
                if classes.is_empty() && e.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(());
            }
            r => r?,
        };
        let ours = root.as_ref().is_some_and(|(_, h)| h == &major_handle());
        if classes.is_empty() {
            if ours {
                tc(&["qdisc", "del", "dev", dev, "root"]).await?;
            }
            return Ok(());
        }
        if !ours {
            if let Some((kind, handle)) = root.filter(|(_, h)| h != "0:") {
                return Err(ShapeError::Foreign {
                    dev: dev.to_owned(),
                    kind,
                    handle,
                });
            }
            let direct = QUEUE_PACKETS.to_string();
            tc(&[
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "handle",
                &major_handle(),
                "htb",
                "default",
                "0",
                "direct_qlen",
                &direct,
            ])
            .await?;
        }
        let want: Vec<String> = classes.iter().map(|c| class_id(c.id)).collect();
        for (c, id) in classes.iter().zip(&want) {
            let rate = format!("{}bit", c.rate_bps.max(8));
            // Bytes, at least one full frame or HTB cannot send at all.
            let burst = format!("{}b", (c.burst_bits / 8).max(1600));
            // A quantum tc would not warn about: the bytes a class sends per round.
            let quantum = (c.rate_bps / 8 / 10).clamp(1600, 200_000).to_string();
            tc(&[
                "class",
                "replace",
                "dev",
                dev,
                "parent",
                &major_handle(),
                "classid",
                id,
                "htb",
                "rate",
                &rate,
                "ceil",
                &rate,
                "burst",
                &burst,
                "cburst",
                &burst,
                "quantum",
                &quantum,
            ])
            .await?;
            let limit = QUEUE_PACKETS.to_string();
            tc(&[
                "qdisc", "replace", "dev", dev, "parent", id, "pfifo", "limit", &limit,
            ])
            .await?;
        }
        for have in classes_of(dev).await? {
            if !want.contains(&have) {
                tc(&["class", "del", "dev", dev, "classid", &have]).await?;
            }
        }
        Ok(())
    }
}

fn major_handle() -> String {
    format!("{HTB_MAJOR:x}:")
}

/// Class `fe0a:<id>` as tc writes it (minor in hex).
pub fn class_id(id: EgressId) -> String {
    format!("{HTB_MAJOR:x}:{id:x}")
}

async fn tc(args: &[&str]) -> Result<String, ShapeError> {
    let out = tokio::process::Command::new("tc")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(ShapeError::Spawn)?;
    if !out.status.success() {
        return Err(ShapeError::Refused {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The device's root qdisc, (kind, handle), from `tc -j qdisc show`.
async fn root_qdisc(dev: &str) -> Result<Option<(String, String)>, ShapeError> {
    let args = ["-j", "qdisc", "show", "dev", dev];
    let text = tc(&args).await?;
    parse_root_qdisc(&text).map_err(|problem| ShapeError::Output {
        args: args.join(" "),
        problem,
    })
}

/// The root qdisc in `tc -j qdisc show dev X` output.
pub fn parse_root_qdisc(text: &str) -> Result<Option<(String, String)>, String> {
    let v: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| e.to_string())?;
    let list = v.as_array().ok_or("not a JSON list")?;
    Ok(list
        .iter()
        .find(|q| q.get("root").and_then(serde_json::Value::as_bool) == Some(true))
        .map(|q| {
            let s = |k: &str| {
                q.get(k)
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            (s("kind"), s("handle"))
        }))
}

/// ferrea's classes on the device (`fe0a:<minor>`), from `tc class show` (whose output this
/// iproute2 prints as text even with `-j`).
async fn classes_of(dev: &str) -> Result<Vec<String>, ShapeError> {
    let text = tc(&["class", "show", "dev", dev]).await?;
    Ok(parse_classes(&text))
}

/// The ids of ferrea's HTB classes in `tc class show` output
/// (`class htb fe0a:309 root leaf 8001: prio 0 rate 20Mbit ...`).
pub fn parse_classes(text: &str) -> Vec<String> {
    let prefix = major_handle();
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("class") && w.next() == Some("htb"))
                .then(|| w.next())
                .flatten()
        })
        .filter(|id| id.starts_with(&prefix) && id.len() > prefix.len())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_and_class_ids_name_the_same_class() {
        assert_eq!(priority_of(777), 0xfe0a_0309);
        assert_eq!(class_id(777), "fe0a:309");
        assert_eq!(class_id(1), "fe0a:1");
    }

    #[test]
    fn root_qdisc_is_read_from_tc_json() {
        let ours = r#"[{"kind":"htb","handle":"fe0a:","root":true,"refcnt":3,"options":{}},{"kind":"pfifo","handle":"8001:","parent":"fe0a:309","options":{"limit":1000}}]"#;
        assert_eq!(
            parse_root_qdisc(ours).unwrap(),
            Some(("htb".into(), "fe0a:".into()))
        );
        let default = r#"[{"kind":"noqueue","handle":"0:","root":true,"refcnt":2,"options":{}}]"#;
        assert_eq!(
            parse_root_qdisc(default).unwrap(),
            Some(("noqueue".into(), "0:".into()))
        );
        assert_eq!(parse_root_qdisc("[]").unwrap(), None);
        assert!(parse_root_qdisc("qdisc noqueue 0: root").is_err());
    }

    #[test]
    fn only_ferreas_classes_are_listed() {
        let text = "class htb fe0a:309 root leaf 8001: prio 0 rate 20Mbit ceil 20Mbit burst 250000b cburst 250000b \n\
                    class htb 1:10 root prio 0 rate 1Mbit ceil 1Mbit burst 1600b cburst 1600b \n\
                    class htb fe0a:7 root leaf 8002: prio 0 rate 1Mbit ceil 1Mbit burst 1600b cburst 1600b \n";
        assert_eq!(parse_classes(text), vec!["fe0a:309", "fe0a:7"]);
    }
}
