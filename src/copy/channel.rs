//! A copy's channel with a bound on every wait: a receiver that stops
//! reading (or a sender that stops writing) ends the copy with a timeout
//! instead of holding it forever — a copy may hold a frozen filesystem.
//!
//! The descriptor is shared with whoever opened it (the CLI passes its own),
//! so its flags are left alone: a socket is written and read with
//! `MSG_DONTWAIT` per call, a pipe through a second, non-blocking open of
//! the same pipe (`/proc/self/fd/N`); either waits in `poll` for at most
//! the timeout. A regular file never waits for a peer and is used as is.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Socket,
    Pipe,
    Plain,
}

struct Inner {
    fd: File,
    /// A pipe's second open, non-blocking (writes when sending, reads when
    /// receiving: the end the descriptor is).
    nonblocking: Option<File>,
    kind: Kind,
    timeout: Duration,
}

/// One end of a copy's channel; `Read` and `Write` give up after the
/// timeout without progress (`ErrorKind::TimedOut`, errno ETIMEDOUT).
#[derive(Clone)]
pub struct Timed(Arc<Inner>);

impl Timed {
    pub fn new(fd: OwnedFd, timeout: Duration) -> io::Result<Timed> {
        let fd = File::from(fd);
        let ft = fd.metadata()?.file_type();
        let kind = if ft.is_socket() {
            Kind::Socket
        } else if ft.is_fifo() {
            Kind::Pipe
        } else {
            Kind::Plain
        };
        let nonblocking = match kind {
            Kind::Pipe => reopen_nonblocking(&fd),
            _ => None,
        };
        // Without a second open (no /proc), the pipe is used blocking.
        let kind = if kind == Kind::Pipe && nonblocking.is_none() { Kind::Plain } else { kind };
        Ok(Timed(Arc::new(Inner { fd, nonblocking, kind, timeout })))
    }

    pub fn timeout(&self) -> Duration {
        self.0.timeout
    }

    fn raw(&self) -> RawFd {
        match &self.0.nonblocking {
            Some(f) => f.as_raw_fd(),
            None => self.0.fd.as_raw_fd(),
        }
    }

    /// Wait until the descriptor is ready for `events`, at most the timeout.
    fn wait(&self, events: libc::c_short, what: &str) -> io::Result<()> {
        let mut p = libc::pollfd { fd: self.raw(), events, revents: 0 };
        let ms = self.0.timeout.as_millis().min(i32::MAX as u128) as i32;
        loop {
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            match n {
                0 => {
                    let secs = self.0.timeout.as_secs_f64();
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("{what} for {secs} s (timed out)")));
                }
                n if n > 0 => return Ok(()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

fn reopen_nonblocking(fd: &File) -> Option<File> {
    // SAFETY: F_GETFL on a descriptor we own.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return None;
    }
    let write = fl & libc::O_ACCMODE != libc::O_RDONLY;
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .ok()
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let r = match self.0.kind {
                Kind::Plain => return (&self.0.fd).write(buf),
                Kind::Socket => {
                    // SAFETY: a valid buffer and descriptor.
                    let n = unsafe {
                        libc::send(self.raw(), buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                    };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                }
                Kind::Pipe => self.0.nonblocking.as_ref().expect("a pipe's second open").write(buf),
            };
            match r {
                Err(e) if would_block(&e) => self.wait(libc::POLLOUT, "the receiver took nothing")?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = match self.0.kind {
                Kind::Plain => return (&self.0.fd).read(buf),
                Kind::Socket => {
                    // SAFETY: a valid buffer and descriptor.
                    let n = unsafe { libc::recv(self.raw(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                }
                Kind::Pipe => self.0.nonblocking.as_ref().expect("a pipe's second open").read(buf),
            };
            match r {
                Err(e) if would_block(&e) => self.wait(libc::POLLIN, "the peer sent nothing")?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

/// Whether an I/O error is a channel timeout (from [`Timed`]).
pub fn timed_out(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut || e.raw_os_error() == Some(libc::ETIMEDOUT)
}
