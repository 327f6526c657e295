//! Fuzz target: a control-socket request line, parsed by the daemon's own
//! parser (`ublk_ploop::protocol::parse_request`).

fn main() {
    afl::fuzz!(|data: &[u8]| ublk_ploop::fuzzing::request(data));
}
