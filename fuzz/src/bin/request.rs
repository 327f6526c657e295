//! Fuzz target: a control-socket request line, parsed by the daemon's own
//! `protocol.rs` (included from the daemon's sources).

#[path = "../../../src/protocol.rs"]
#[allow(dead_code)]
mod protocol;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
            if let Ok(env) = protocol::Envelope::from_value(v) {
                let line = serde_json::to_value(&env).unwrap();
                assert_eq!(protocol::Envelope::from_value(line).unwrap().request, env.request);
            }
        }
    });
}
