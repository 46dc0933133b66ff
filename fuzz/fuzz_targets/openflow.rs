//! What the switch sends on the OpenFlow connection: a stream of messages framed by their
//! headers, as the connection's reader splits it, with the bodies it decodes (errors, flow
//! statistics replies) decoded and printed as `ferreactl dump dataplane` and `trace` do.
#![no_main]

use ferrea_agent::dataplane::ovs::openflow::codec;
use libfuzzer_sys::fuzz_target;

/// OFPT_ERROR and OFPT_MULTIPART_REPLY (OpenFlow 1.5).
const ERROR: u8 = 1;
const MULTIPART_REPLY: u8 = 19;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= 8 {
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        if len < 8 || len > rest.len() {
            return;
        }
        let (msg, tail) = rest.split_at(len);
        rest = tail;
        let body = &msg[8..];
        match msg[1] {
            ERROR => {
                if let Ok(e) = codec::decode_error(body) {
                    let _ = e.to_string();
                }
            }
            MULTIPART_REPLY if body.len() >= 8 => {
                if let Ok(flows) = codec::decode_flow_desc(&body[8..]) {
                    let _ = format!("{flows:?}");
                }
            }
            _ => {}
        }
    }
});
