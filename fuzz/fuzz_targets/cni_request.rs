//! The agent's CNI socket: an encoded request (protobuf) and everything the server decodes of
//! it before touching a pod. The first byte picks the verb.
#![no_main]

use libfuzzer_sys::fuzz_target;

const VERBS: [&str; 5] = ["ADD", "DEL", "CHECK", "GC", "STATUS"];

fuzz_target!(|data: &[u8]| {
    let Some((&v, rest)) = data.split_first() else {
        return;
    };
    let _ = ferrea_agent::cni::server::decode_request(VERBS[usize::from(v) % VERBS.len()], rest);
});
