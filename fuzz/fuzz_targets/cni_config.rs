//! The plugin's stdin: the network configuration (with `prevResult`) as the runtime sends it,
//! and a result from the agent converted to each version a runtime may ask for.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferrea_cni::config::peek_version(data);
    let _ = ferrea_cni::config::parse(data);
    for v in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let _ = ferrea_cni::result::convert(data, v);
    }
});
