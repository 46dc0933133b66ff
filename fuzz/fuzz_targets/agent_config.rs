//! The agent's configuration file (YAML), parsed and validated.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) =
        ferrea_agent::config::Config::parse(text, std::path::Path::new("/etc/ferrea/agent.yaml"))
    {
        let _ = c.validate();
    }
});
