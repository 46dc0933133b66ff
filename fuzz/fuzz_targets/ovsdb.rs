//! What ovsdb-server sends: JSON values one after another (split as the client's reader does),
//! transaction results interpreted, and the maps and UUIDs the agent reads out of rows.
#![no_main]

use ferrea_agent::dataplane::ovs::ovsdb;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn walk(v: &Value) {
    let _ = ovsdb::parse_map(v);
    let _ = ovsdb::parse_uuid(v);
    match v {
        Value::Array(a) => a.iter().for_each(walk),
        Value::Object(o) => o.values().for_each(walk),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let Ok(values) = ovsdb::split_values(&mut buf) else {
        return;
    };
    let what = vec!["insert Port".to_owned(), "mutate Bridge".to_owned()];
    for v in values {
        if let Some(r) = v.get("result") {
            let _ = ovsdb::transact_results("fuzz", &what, r.clone());
        }
        walk(&v);
    }
});
