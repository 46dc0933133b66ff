//! ferrea's nftables table: masquerade of pod traffic that leaves the cluster.
//!
//! ferrea owns one table (family `ip`, name from config, default `ferrea`) and nothing else in
//! the ruleset. The whole table is rendered from the desired state and replaced in one nft
//! transaction (`table; delete table; table {...}` in a single `nft -f` run is atomic in the
//! kernel), so there is never a moment without masquerade and re-applying is idempotent.
//!
//! Why the `nft` binary and not a netlink library: nftables' netlink ABI is expressed in
//! bytecode that only libnftables assembles; the Rust crates either shell out to `nft` too
//! (the `nftables` crate) or need hand-written expressions (rustables). Rule changes are off
//! the CNI path (start-up and desired-state changes), so one process per change costs nothing.

use std::net::Ipv4Addr;
use std::process::Stdio;

use ipnetwork::Ipv4Network;
use tokio::io::AsyncWriteExt;

/// Errors applying the table.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// `nft` could not be run.
    #[error("running nft: {0}")]
    Spawn(#[source] std::io::Error),
    /// `nft` rejected the ruleset.
    #[error("nft rejected table {table}: {stderr}")]
    Rejected {
        /// The table.
        table: String,
        /// nft's message.
        stderr: String,
    },
}

/// The desired content of ferrea's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatSpec {
    /// Table name.
    pub table: String,
    /// This node's pod CIDR (sources to masquerade).
    pub pod_cidr: Ipv4Network,
    /// Destinations that are never masqueraded: cluster pod CIDRs, the service CIDR.
    pub no_masquerade: Vec<Ipv4Network>,
    /// Whether to masquerade at all.
    pub masquerade: bool,
    /// The pods' gateway address.
    pub gateway: Ipv4Addr,
}

impl NatSpec {
    /// The nft script that replaces the table atomically.
    pub fn render(&self) -> String {
        let t = &self.table;
        let mut s = format!("table ip {t}\ndelete table ip {t}\ntable ip {t} {{\n");
        s.push_str(
            "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
        );
        if self.masquerade {
            let mut dst: Vec<String> = self.no_masquerade.iter().map(|c| c.to_string()).collect();
            if !self
                .no_masquerade
                .iter()
                .any(|c| c.contains(self.pod_cidr.network()))
            {
                dst.push(self.pod_cidr.to_string());
            }
            s.push_str(&format!(
                "    ip saddr {} ip daddr != {{ {} }} counter masquerade comment \"ferrea: pods to outside the cluster\"\n",
                self.pod_cidr,
                dst.join(", ")
            ));
        }
        s.push_str("  }\n}\n");
        s
    }
}

/// Applies `spec`, replacing ferrea's table and nothing else.
pub async fn apply(spec: &NatSpec) -> Result<(), NatError> {
    run_nft(&spec.render(), &spec.table).await
}

async fn run_nft(script: &str, table: &str) -> Result<(), NatError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NatError::Spawn)?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(script.as_bytes())
        .await
        .map_err(NatError::Spawn)?;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(NatError::Spawn)?;
    if !out.status.success() {
        return Err(NatError::Rejected {
            table: table.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_masquerades_pod_cidr_except_cluster_destinations() {
        let spec = NatSpec {
            table: "ferrea".into(),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
            no_masquerade: vec![
                "10.244.0.0/16".parse().unwrap(),
                "10.96.0.0/12".parse().unwrap(),
            ],
            masquerade: true,
            gateway: Ipv4Addr::new(10, 244, 1, 1),
        };
        let r = spec.render();
        assert!(r.starts_with("table ip ferrea\ndelete table ip ferrea\n"));
        assert!(r.contains(
            "ip saddr 10.244.1.0/24 ip daddr != { 10.244.0.0/16, 10.96.0.0/12 } counter masquerade"
        ));
        let off = NatSpec {
            masquerade: false,
            ..spec
        };
        assert!(!off.render().contains("masquerade"));
    }

    #[test]
    fn render_adds_own_pod_cidr_when_cluster_cidrs_do_not_cover_it() {
        let spec = NatSpec {
            table: "t".into(),
            pod_cidr: "10.1.0.0/24".parse().unwrap(),
            no_masquerade: vec![],
            masquerade: true,
            gateway: Ipv4Addr::new(10, 1, 0, 1),
        };
        assert!(spec.render().contains("ip daddr != { 10.1.0.0/24 }"));
    }
}
