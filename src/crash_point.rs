//! Named points where a test can kill the daemon as `kill -9` would: the
//! VM tests start a daemon with `UBLK_PLOOP_CRASH_AT=NAME` to stop it at a
//! chosen step of a merge, which no outside timing can hit reliably. The
//! variable is read once; without it a point costs one comparison.
//!
//! The points, by name:
//! - `merge-marked`: the parent is marked temporary in the descriptor,
//!   nothing copied yet;
//! - `merge-stored`: the descriptor naming the parent's file as the top is
//!   durable, requests are held, the stack still serves the two layers;
//! - `merge-swapped`: the stack serves the parent's file alone; the old
//!   top's file is not removed yet.

use std::sync::OnceLock;

const VAR: &str = "UBLK_PLOOP_CRASH_AT";

/// Die by SIGKILL here if this process was started to crash at `name`.
pub fn crash_point(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if AT.get_or_init(|| std::env::var(VAR).ok()).as_deref() == Some(name) {
        tracing::warn!("{VAR}={name}: killing this process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
