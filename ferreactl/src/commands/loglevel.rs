//! `ferreactl log-level [LEVEL]`: prints the agent's log filter, or replaces it at run time
//! (`tracing_subscriber` `EnvFilter` syntax: `debug`, `info,ferrea_agent::cni=trace`). The
//! change lasts until the agent restarts.

use std::io::Write;

use ferrea_proto::debug::v1::LogLevelRequest;

use crate::client::Client;

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The new filter; without it, the current one is printed.
    level: Option<String>,
}

/// Runs the command.
pub async fn run(mut c: Client, a: Args, out: &mut dyn Write) -> anyhow::Result<()> {
    let req = LogLevelRequest {
        filter: a.level.unwrap_or_default(),
    };
    match c.api.log_level(req).await {
        Ok(r) => {
            writeln!(out, "{}", r.into_inner().filter)?;
            Ok(())
        }
        Err(s) => Err(c.failed("log-level", s)),
    }
}
