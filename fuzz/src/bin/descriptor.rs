//! Fuzz target: see `ublk_ploop::fuzzing::descriptor`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        ublk_ploop::fuzzing::run("descriptor", data, ublk_ploop_fuzz::scratch());
    });
}
