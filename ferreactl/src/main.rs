//! ferreactl: the local debug CLI of ferrea, in the manner of antctl. It talks to the agent
//! on this node over the debug API (`ferrea.debug.v1`) on the agent's root-only unix socket.
//!
//! One file per command under `commands/`; [`client`] connects and turns failures into what
//! to do about them; [`output`] renders `-o table|json|yaml`.

mod client;
mod commands;
mod output;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::output::Format;

/// The default socket of the debug API (next to the CNI socket, as the agent defaults it).
pub const DEFAULT_SOCKET: &str = "/var/run/ferrea/debug.sock";

/// ferrea's local debug CLI.
#[derive(Parser, Debug)]
#[command(version, about, propagate_version = true)]
pub struct Cli {
    /// The agent's debug socket (the agent config's `debugSocket`).
    #[arg(long, global = true, env = "FERREA_DEBUG_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Give up on the agent after this many seconds.
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what the agent holds.
    #[command(subcommand)]
    Get(Get),
    /// Dump state of the agent's parts.
    #[command(subcommand)]
    Dump(Dump),
    /// Where a packet from a local pod would go and why, as the dataplane itself decides it
    /// (eBPF: BPF_PROG_TEST_RUN of the attached programs; OVS: ofproto/trace). Sends nothing.
    Trace(commands::trace::Args),
    /// Show the agent's log filter, or set it (e.g. `debug`, `info,ferrea_agent::cni=trace`).
    LogLevel(commands::loglevel::Args),
    /// Collect agent info, config, status, dataplane dumps, nftables, routes, rules and logs
    /// into one .tar.gz.
    Supportbundle(commands::supportbundle::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion(commands::completion::Args),
}

#[derive(Subcommand, Debug)]
enum Get {
    /// The agent: node, version, dataplane, source, pod CIDR, transport, readiness, uptime.
    Agentinfo(OutputArgs),
    /// Local pods' interfaces with their dataplane port and counters.
    #[command(visible_aliases = ["podinterfaces", "pi"])]
    Podinterface(commands::podinterface::Args),
    /// The other nodes: pod CIDRs and tunnel endpoints.
    #[command(visible_aliases = ["remotenode"])]
    Remotenodes(OutputArgs),
    /// Every Egress as this node sees it (IP, node, conditions).
    #[command(visible_aliases = ["egresses"])]
    Egress(OutputArgs),
    /// What this node holds for Egress: IPs, VLANs, tables, rp_filter.
    Egressnode(OutputArgs),
    /// NodePortLocal mappings of local pods, and whether each is installed.
    #[command(visible_aliases = ["npl"])]
    Nodeportlocal(commands::nodeportlocal::Args),
}

#[derive(Subcommand, Debug)]
enum Dump {
    /// OVS: flows by table with counters; eBPF: maps and program attachments.
    Dataplane(commands::dump::Args),
}

/// `-o`, shared by every `get`.
#[derive(clap::Args, Debug)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

fn main() {
    let cli = Cli::parse();
    if let Command::Completion(a) = &cli.command {
        commands::completion::run(a);
        return;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferreactl: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("ferreactl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Arguments that cannot be right are refused before the agent is asked.
    if let Command::Trace(a) = &cli.command {
        commands::trace::request(a)?;
    }
    let c =
        client::Client::connect(&cli.socket, std::time::Duration::from_secs(cli.timeout)).await?;
    let out = &mut std::io::stdout().lock();
    match cli.command {
        Command::Get(Get::Agentinfo(o)) => commands::agentinfo::run(c, o.output, out).await,
        Command::Get(Get::Podinterface(a)) => commands::podinterface::run(c, a, out).await,
        Command::Get(Get::Remotenodes(o)) => commands::remotenodes::run(c, o.output, out).await,
        Command::Get(Get::Egress(o)) => commands::egress::run(c, o.output, out).await,
        Command::Get(Get::Egressnode(o)) => commands::egressnode::run(c, o.output, out).await,
        Command::Get(Get::Nodeportlocal(a)) => commands::nodeportlocal::run(c, a, out).await,
        Command::Dump(Dump::Dataplane(a)) => commands::dump::run(c, a, out).await,
        Command::Trace(a) => commands::trace::run(c, a, out).await,
        Command::LogLevel(a) => commands::loglevel::run(c, a, out).await,
        Command::Supportbundle(a) => commands::supportbundle::run(c, a, out).await,
        Command::Completion(_) => unreachable!("handled before connecting"),
    }
}
