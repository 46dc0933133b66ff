//! The plugin's environment (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS,
//! CNI_PATH), one `NAME=value` per line of the input.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let _ = ferrea_cni::env::CniEnv::from_lookup(|k| vars.get(k).map(|v| (*v).to_owned()));
});
