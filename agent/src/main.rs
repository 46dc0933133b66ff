//! ferrea-agent binary: parses flags, loads the config, runs the agent.
fn main() {}
