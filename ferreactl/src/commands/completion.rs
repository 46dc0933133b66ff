//! `ferreactl completion SHELL`: the shell completion script (clap_complete), for example
//! `ferreactl completion bash > /etc/bash_completion.d/ferreactl`.

use clap::CommandFactory;
use clap_complete::Shell;

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The shell.
    shell: Shell,
}

/// Prints the script to stdout.
pub fn run(a: &Args) {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "ferreactl", &mut std::io::stdout());
}
