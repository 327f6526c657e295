//! Fuzz target: see `ublk_ploop::fuzzing::paths`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        ublk_ploop::fuzzing::run("paths", data, ublk_ploop_fuzz::scratch());
    });
}
