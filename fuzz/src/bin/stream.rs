//! Fuzz target: see `ublk_ploop::fuzzing::stream`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        ublk_ploop::fuzzing::run("stream", data, ublk_ploop_fuzz::scratch());
    });
}
