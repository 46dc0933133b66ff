//! ferrea-agent: parses flags, loads the config, sets up logging and runs [`ferrea_agent::agent::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// ferrea's per-node agent.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Path of the YAML configuration file.
    #[arg(long, default_value = "/etc/ferrea/agent.yaml")]
    config: PathBuf,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERREA_LOG")
        // kube-client logs every failed request at ERROR (each watch retry while the API
        // server is away); the source logs an outage once, and its end.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off")
        });
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if args.log_json {
        sub.json().init();
    } else {
        sub.init();
    }
    let cfg = ferrea_agent::config::Config::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(ferrea_agent::agent::run(cfg, shutdown_signal()))?)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
