//! Desired state: the `files` source's manifests (multi-document YAML or JSON) and, when the
//! input is one JSON object, the object decoder the Kubernetes source runs on what the API
//! server sends (Node, Pod, Namespace, Service, EndpointSlice, Egress, ExternalIPPool,
//! NetworkPolicy).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ferrea_agent::source::manifest::decode(text);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let _ = ferrea_agent::source::manifest::decode_object(&v);
    }
});
