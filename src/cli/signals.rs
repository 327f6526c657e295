//! Ending a command on a terminating signal without leaving its
//! temporaries behind (a receive's files, a convert's destination).

use std::sync::atomic::{AtomicI32, Ordering};

use ublk_ploop::copy;

/// The signals that end a command.
const ENDING: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The signal a command that stops between steps was asked to stop by
/// (0: none yet).
static STOP_ASKED: AtomicI32 = AtomicI32::new(0);

/// Block the ending signals in this thread (before any other thread
/// exists, so that every thread inherits the mask) and return their set,
/// for one thread to take them with `sigwait`.
fn block_ending_signals() -> libc::sigset_t {
    // SAFETY: building a signal set we own and blocking it in this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in ENDING {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Wait for one of `set`'s signals: its number, or None if the wait failed.
fn wait_for(set: &libc::sigset_t) -> Option<libc::c_int> {
    let mut sig = 0;
    // SAFETY: waits for one of the signals the caller blocked.
    (unsafe { libc::sigwait(set, &mut sig) } == 0).then_some(sig)
}

pub fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    }
}

/// SIGINT, SIGTERM and SIGHUP end a command (`verb`: a receive, a
/// convert) without leaving its temporaries behind: they are taken by a
/// thread that removes what the command made and exits.
pub fn clean_up_on_signals(verb: &'static str) {
    let set = block_ending_signals();
    std::thread::spawn(move || {
        let Some(sig) = wait_for(&set) else { return };
        let gone = copy::receive::remove_temporaries();
        let list: Vec<String> = gone.iter().map(|p| p.display().to_string()).collect();
        eprintln!(
            "ublk-ploop: {verb} interrupted by {}; {}",
            signal_name(sig),
            if list.is_empty() { "nothing to remove".to_string() } else { format!("removed {}", list.join(", ")) }
        );
        std::process::exit(128 + sig);
    });
}

/// For a command that can stop between steps (`verb`: an offline
/// compaction; `then`: what it does when asked, for the message): the
/// first ending signal asks it to stop at its next safe point, so that its
/// image is closed clean ([`stop_asked`]); a second one ends it at once,
/// as a crash would (the image's next open repairs it).
pub fn stop_between_steps_on_signals(verb: &'static str, then: &'static str) {
    let set = block_ending_signals();
    std::thread::spawn(move || {
        let Some(sig) = wait_for(&set) else { return };
        STOP_ASKED.store(sig, Ordering::SeqCst);
        eprintln!("ublk-ploop: {verb}: {} taken: {then} (again to stop at once)", signal_name(sig));
        let Some(again) = wait_for(&set) else { return };
        eprintln!("ublk-ploop: {verb} ended by {} (the image's next open repairs it)", signal_name(again));
        std::process::exit(128 + again);
    });
}

/// The signal that asked a command to stop between steps, if one did.
pub fn stop_asked() -> Option<libc::c_int> {
    Some(STOP_ASKED.load(Ordering::SeqCst)).filter(|&s| s != 0)
}
