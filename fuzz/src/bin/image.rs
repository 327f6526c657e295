//! Fuzz target: see `ublk_ploop::fuzzing::image`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        ublk_ploop::fuzzing::run("image", data, ublk_ploop_fuzz::scratch());
    });
}
