//! The daemon as a process: forking away from the command that started it
//! and telling that command (through a pipe) or systemd (sd_notify) when
//! the device is live, and the signals that stop it.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::unistd::ForkResult;
use sd_notify::NotifyState;

use ublk_ploop::{Error, Result};

use crate::ublk_control::stop_device;

/// How the daemon reports "live" (or a failure) to whoever started it.
pub enum Ready {
    /// Print the device path on stdout; tell systemd when NOTIFY_SOCKET is set.
    Foreground,
    /// Write "ok ID" or "err MESSAGE" down this pipe to the waiting parent.
    Pipe(OwnedFd),
}

/// Fork: the child detaches and runs `serve` (handed the pipe to report
/// readiness on) and exits with its code; the parent drops its copy of
/// what `serve` holds and returns once the child said the device is live
/// (printing its path) or failed.
pub fn fork_daemon(serve: impl FnOnce(Ready) -> i32) -> Result<i32> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::io(e.into(), "pipe"))?;
    // SAFETY: the caller is single-threaded so far (no ring, no thread).
    match unsafe { nix::unistd::fork() }.map_err(|e| Error::io(e.into(), "fork"))? {
        ForkResult::Child => {
            drop(read_end);
            detach();
            std::process::exit(serve(Ready::Pipe(write_end)));
        }
        ForkResult::Parent { .. } => {
            drop(write_end);
            drop(serve);
            let mut answer = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut answer);
            match answer.trim().split_once(' ') {
                Some(("ok", id)) => {
                    println!("/dev/ublkb{id}");
                    Ok(0)
                }
                Some(("err", msg)) => Err(Error::new(libc::EIO, msg.to_string())),
                _ => Err(Error::new(libc::EIO, "the daemon exited before the device came up (see its log)")),
            }
        }
    }
}

/// Leave the caller's session and terminal; logs go to stderr, which is
/// kept only when it is not a terminal (a file or journal), else dropped.
fn detach() {
    use std::io::IsTerminal;
    let _ = nix::unistd::setsid();
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
        if std::io::stderr().is_terminal() {
            let _ = nix::unistd::dup2(null.as_raw_fd(), 2);
        }
    }
}

/// Tell whoever started us how it went (once; later calls do nothing).
pub fn report(ready: &mut Option<Ready>, outcome: std::result::Result<u32, String>) {
    match ready.take() {
        Some(Ready::Pipe(fd)) => {
            let msg = match outcome {
                Ok(id) => format!("ok {id}\n"),
                Err(e) => format!("err {e}\n"),
            };
            let _ = std::fs::File::from(fd).write_all(msg.as_bytes());
        }
        Some(Ready::Foreground) => {
            if let Ok(id) = outcome {
                println!("/dev/ublkb{id}");
                let _ = std::io::stdout().flush();
                let status = format!("serving /dev/ublkb{id}");
                notify(&[NotifyState::Ready, NotifyState::Status(&status), NotifyState::MainPid(std::process::id())]);
            }
        }
        None => {}
    }
}

/// Tell systemd (Type=notify) about our state; a no-op outside systemd.
fn notify(state: &[NotifyState]) {
    if let Err(e) = notify_to(std::env::var_os("NOTIFY_SOCKET"), state) {
        tracing::warn!("sd_notify: {e}");
    }
}

/// sd-notify connects to a path only; sd_notify(3) also allows an abstract
/// socket ("@name", as a service manager in a container may hand out),
/// which we reach ourselves with the same message.
fn notify_to(socket: Option<std::ffi::OsString>, state: &[NotifyState]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    match socket {
        None => Ok(()),
        Some(name) if name.as_bytes().first() == Some(&b'@') => {
            use std::os::linux::net::SocketAddrExt;
            let msg: String = state.iter().map(|s| format!("{s}\n")).collect();
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name.as_bytes()[1..])?;
            std::os::unix::net::UnixDatagram::unbound()?.send_to_addr(msg.as_bytes(), &addr).map(|_| ())
        }
        // The crate reads the variable itself.
        Some(_) => sd_notify::notify(state),
    }
}

/// Block the stop signals in every thread; one thread waits for them and
/// stops the device, which ends `run_target` in the main thread.
pub fn install_stop_signals(dev_id: u32) {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(sig);
    }
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let Ok(sig) = set.wait() else { continue };
        tracing::info!(signal = sig as i32, "stopping device {dev_id}");
        notify(&[NotifyState::Stopping]);
        // A control handle of this thread's own (libublk's rings are per
        // thread). Keep listening: a stop sent before the device was live
        // does nothing, and a later signal must still be heard.
        stop_device(dev_id);
    });
}

/// A copy's reader may go away: the daemon gets EPIPE, never the signal.
/// Call before any thread exists.
pub fn ignore_sigpipe() {
    // SAFETY: setting a signal disposition to "ignore" (no handler).
    let _ = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    #[test]
    fn readiness_reaches_an_abstract_notify_socket() {
        let name = format!("ublk-ploop-test-notify-{}", std::process::id());
        let listener = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        listener.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        notify_to(Some(format!("@{name}").into()), &[NotifyState::Ready, NotifyState::Status("serving /dev/ublkb7")]).unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).expect("no notification arrived");
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "READY=1\nSTATUS=serving /dev/ublkb7\n");
    }

    #[test]
    fn no_notify_socket_is_no_op() {
        notify_to(None, &[NotifyState::Ready]).unwrap();
    }
}
