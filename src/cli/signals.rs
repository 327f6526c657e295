//! Ending a command on a terminating signal without leaving its
//! temporaries behind (a receive's files, a convert's destination).

use ublk_ploop::copy;

/// SIGINT, SIGTERM and SIGHUP end a command (`verb`: a receive, a
/// convert) without leaving its temporaries behind: they are blocked here
/// (before any other thread exists, so every thread inherits the mask)
/// and taken by a thread that removes what the command made and exits.
pub fn clean_up_on_signals(verb: &'static str) {
    // SAFETY: building a signal set we own and blocking it in this thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waits for one of the blocked signals.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        let gone = copy::receive::remove_temporaries();
        let name = match sig {
            libc::SIGINT => "SIGINT",
            libc::SIGTERM => "SIGTERM",
            _ => "SIGHUP",
        };
        let list: Vec<String> = gone.iter().map(|p| p.display().to_string()).collect();
        eprintln!(
            "ublk-ploop: {verb} interrupted by {name}; {}",
            if list.is_empty() { "nothing to remove".to_string() } else { format!("removed {}", list.join(", ")) }
        );
        std::process::exit(128 + sig);
    });
}
