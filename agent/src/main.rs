//! ferrea-agent: parses flags, loads the config, sets up logging and runs [`ferrea_agent::agent::run`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use ferrea_agent::debug::{LogControl, LogFilterError, LogRing};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

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

/// The log filter behind a reload handle, for `ferreactl log-level`.
struct ReloadableFilter {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The directives in force (an `EnvFilter` does not print back what it parsed).
    current: Mutex<String>,
}

impl LogControl for ReloadableFilter {
    fn filter(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_filter(&self, directives: &str) -> Result<(), LogFilterError> {
        let f = EnvFilter::try_new(directives).map_err(|e| LogFilterError::Invalid {
            filter: directives.to_owned(),
            reason: e.to_string(),
        })?;
        self.handle
            .reload(f)
            .map_err(|e| LogFilterError::Reload(e.to_string()))?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = directives.to_owned();
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    ferrea_agent::memory::limit_arenas();
    let args = Args::parse();
    let directives = std::env::var("FERREA_LOG")
        .ok()
        .filter(|d| EnvFilter::try_new(d).is_ok())
        // kube-client logs every failed request at ERROR (each watch retry while the API
        // server is away); the source logs an outage once, and its end.
        .unwrap_or_else(|| "info,kube_client::client::builder=off".to_owned());
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&directives));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // The last MiB of log lines stays in memory for `ferreactl supportbundle`.
    let ring = LogRing::new(1 << 20);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_ansi(false).with_writer(ring.clone()));
    if args.log_json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init();
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
            .init();
    }
    let log: Arc<dyn LogControl> = Arc::new(ReloadableFilter {
        handle,
        current: Mutex::new(directives),
    });
    let cfg = ferrea_agent::config::Config::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let hooks = ferrea_agent::agent::Hooks {
        log: Some(log),
        recent_logs: Some(ring),
    };
    Ok(rt.block_on(ferrea_agent::agent::run_with(cfg, hooks, shutdown_signal()))?)
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
