//! The tracker, copy, backup and receive commands. A copy runs in the
//! device's daemon (it reads the stack directly); the command opens the
//! channel — a file, its stdout, a TCP or unix socket — with the user's
//! rights and passes it to the daemon with the request, then follows the
//! job.

use std::io::{IsTerminal, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use serde::Serialize;

use ublk_ploop::copy::{self, ReceiveOptions, Received, Sent};
use ublk_ploop::io::Direct;
use ublk_ploop::size::format_size;
use ublk_ploop::error::ErrorKind;
use ublk_ploop::{Error, Result};

use crate::cli::args::{CopyCommand, DestArgs, LimitArgs, TrackArg};
use crate::cli::output::{follow, print_json};
use crate::cli::signals::clean_up_on_signals;
use crate::control::{request, request_with_fds};
use ublk_ploop::protocol::{Job, Request, TrackReply};

pub fn run(command: CopyCommand) -> Result<i32> {
    match command {
        CopyCommand::Track { action, id, json } => track(id, action, json),
        CopyCommand::Copy { id, dest, stop, force, limits, json } => copy(id, &dest, stop, force, &limits, json),
        CopyCommand::Backup { id, dest, incremental, limits, json } => backup(id, &dest, incremental, &limits, json),
        CopyCommand::Receive { image, from, listen, incremental, max_size, timeout, io, json } => receive(&ReceiveArgs {
            image: &image,
            from: from.as_deref(),
            listen: listen.as_deref(),
            incremental,
            direct: io.direct,
            json,
            max_size,
            timeout,
        }),
    }
}

fn track(id: u32, action: TrackArg, json: bool) -> Result<i32> {
    let reply: TrackReply = request(
        id,
        match action {
            TrackArg::Start => Request::TrackStart,
            TrackArg::Get => Request::TrackGet,
            TrackArg::Stop => Request::TrackStop,
        },
    )?;
    if json {
        print_json(&reply);
        return Ok(0);
    }
    match action {
        TrackArg::Start => println!("tracking writes to /dev/ublkb{id} in units of {}", format_size(reply.granularity)),
        TrackArg::Get | TrackArg::Stop => {
            for [start, end] in &reply.ranges {
                println!("{start} {end}");
            }
            let what = if action == TrackArg::Stop { "; tracking stopped" } else { "" };
            eprintln!("{} clusters changed ({}) in {} ranges{what}", reply.clusters, format_size(reply.bytes), reply.ranges.len());
        }
    }
    Ok(0)
}

/// An open channel and whether answers come back on it.
struct Channel {
    fd: OwnedFd,
    two_way: bool,
    /// The stream goes to our stdout: reports go to stderr.
    on_stdout: bool,
    /// The file made for the stream (--to FILE).
    made: Option<std::path::PathBuf>,
}

impl Channel {
    /// The request for the job failed. If the daemon refused it (no such
    /// device, a job running already), nothing was written, and the file
    /// made for it goes; any other failure (a lost or unreadable reply)
    /// may have left the job running into it, so it stays.
    fn refused(&self, e: &Error) {
        if let (Some(p), ErrorKind::Refused) = (&self.made, e.kind()) {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn open_destination(dest: &DestArgs) -> Result<Channel> {
    match (&dest.to, &dest.connect) {
        (Some(p), None) if p.as_os_str() == "-" => {
            if std::io::stdout().is_terminal() {
                return Err(Error::invalid("refusing to write a binary stream to a terminal; redirect stdout or give --to FILE"));
            }
            let fd = std::io::stdout().as_fd_owned()?;
            Ok(Channel { fd, two_way: false, on_stdout: true, made: None })
        }
        (Some(p), None) => {
            let f = std::fs::OpenOptions::new().write(true).create_new(true).open(p).map_err(|e| Error::io(e, p.display()))?;
            Ok(Channel { fd: f.into(), two_way: false, on_stdout: false, made: Some(p.clone()) })
        }
        (None, Some(addr)) => {
            let fd: OwnedFd = if is_unix_addr(addr) {
                UnixStream::connect(addr).map_err(|e| Error::io(e, format_args!("connecting to {addr}")))?.into()
            } else {
                let s = TcpStream::connect(addr).map_err(|e| Error::io(e, format_args!("connecting to {addr}")))?;
                let _ = s.set_nodelay(true);
                s.into()
            };
            Ok(Channel { fd, two_way: true, on_stdout: false, made: None })
        }
        _ => Err(Error::invalid("give one of --to FILE|- and --connect ADDR")),
    }
}

trait DupStdout {
    fn as_fd_owned(&self) -> Result<OwnedFd>;
}

impl DupStdout for std::io::Stdout {
    fn as_fd_owned(&self) -> Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned().map_err(|e| Error::io(e, "stdout"))
    }
}

/// A path (with a slash) names a unix socket; anything else is HOST:PORT.
fn is_unix_addr(addr: &str) -> bool {
    addr.contains('/')
}

/// Once the daemon has its copy of our stdout, ours must go: a reader at
/// the other end of a pipe sees the end only when every writer closed.
fn release_stdout() {
    let _ = std::io::stdout().flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: replaces fd 1 with /dev/null; nothing else holds it.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

fn copy(id: u32, dest: &DestArgs, stop: bool, force: bool, limits: &LimitArgs, json: bool) -> Result<i32> {
    let ch = open_destination(dest)?;
    let LimitArgs { freeze_limit, timeout, allow_unfrozen } = limits.clone();
    let req = Request::Copy { two_way: ch.two_way, stop, force, freeze_limit, timeout, allow_unfrozen };
    let _started: Job = request_with_fds(id, req, &[ch.fd.as_raw_fd()]).inspect_err(|e| ch.refused(e))?;
    finish_copy(id, ch, json, if stop { "copied; device stopped" } else { "copied" })
}

fn backup(id: u32, dest: &DestArgs, incremental: bool, limits: &LimitArgs, json: bool) -> Result<i32> {
    let ch = open_destination(dest)?;
    let LimitArgs { freeze_limit, timeout, allow_unfrozen } = limits.clone();
    let req = Request::Backup { two_way: ch.two_way, incremental, freeze_limit, timeout, allow_unfrozen };
    let _started: Job = request_with_fds(id, req, &[ch.fd.as_raw_fd()]).inspect_err(|e| ch.refused(e))?;
    finish_copy(id, ch, json, if incremental { "incremental backup" } else { "full backup" })
}

#[derive(Serialize)]
struct CopyReport<'a> {
    device: String,
    #[serde(flatten)]
    sent: &'a Sent,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
}

fn finish_copy(id: u32, ch: Channel, json: bool, what: &str) -> Result<i32> {
    let on_stdout = ch.on_stdout;
    drop(ch);
    if on_stdout {
        release_stdout();
    }
    let job = follow(id, json)?;
    let sent = job.copy().ok_or_else(|| Error::new(libc::EPROTO, "the daemon reported no copy result"))?;
    let mut out: Box<dyn Write> = if on_stdout { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
    if json {
        let report = CopyReport { device: format!("/dev/ublkb{id}"), sent, note: job.note.as_deref() };
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&report).expect("serialises"));
        return Ok(0);
    }
    for r in &sent.rounds {
        let _ = writeln!(
            out,
            "round {}{}: {} of {} clusters sent, {} in {:.2} s",
            r.round,
            if r.frozen { " (frozen)" } else { "" },
            r.sent,
            r.clusters,
            format_size(r.bytes),
            r.secs
        );
    }
    let _ = writeln!(
        out,
        "{what}: {} of disk data, {} of stream{}; frozen for {:.1} ms",
        format_size(sent.bytes),
        format_size(sent.stream_bytes),
        if sent.md5 { " with checksums" } else { "" },
        sent.frozen_ms
    );
    if let Some(n) = &job.note {
        let _ = writeln!(out, "note: {n}");
    }
    Ok(0)
}

/// What `receive` was asked.
struct ReceiveArgs<'a> {
    pub image: &'a Path,
    pub from: Option<&'a Path>,
    pub listen: Option<&'a str>,
    pub incremental: bool,
    pub direct: Direct,
    pub json: bool,
    /// Largest disk a stream may describe (None: the free space of the
    /// destination's filesystem).
    pub max_size: Option<u64>,
    /// Seconds a socket may stay silent (0: forever).
    pub timeout: u64,
}

fn receive(a: &ReceiveArgs) -> Result<i32> {
    clean_up_on_signals("receive");
    let (input, answers, two_way): (Box<dyn Read>, Option<Box<dyn Write>>, bool) = match (a.from, a.listen) {
        (_, Some(addr)) => {
            let (r, w) = accept_one(addr, a.timeout)?;
            (r, Some(w), true)
        }
        (Some(p), None) if p.as_os_str() != "-" => (Box::new(std::fs::File::open(p).map_err(|e| Error::io(e, p.display()))?), None, false),
        _ => {
            if std::io::stdin().is_terminal() {
                return Err(Error::invalid("no stream: give --from FILE, pipe one into stdin, or --listen ADDR"));
            }
            (Box::new(std::io::stdin().lock()), None, false)
        }
    };
    let opts = ReceiveOptions { two_way, incremental: a.incremental, direct: a.direct };
    let got: Received = copy::receive::receive_with(input, answers, a.image, &opts, a.max_size, &mut |n| eprintln!("{n}"))?;
    if a.json {
        print_json(&got);
    } else {
        println!(
            "received {} of {} disk data into {} ({} packets{}){}",
            format_size(got.data_bytes),
            if got.kind == "device" { "the" } else { "image-file" },
            got.image.display(),
            got.packets,
            if got.md5 { ", checksums verified" } else { "" },
            if got.incremental { format!("; {} clusters updated", got.applied_clusters) } else { String::new() }
        );
    }
    Ok(0)
}

/// A socket whose every read and write gives up after the timeout, saying
/// so (the reader turns it into a "sender went silent" error).
struct Timed<S> {
    inner: S,
    secs: u64,
}

impl<S> Timed<S> {
    fn map(&self, e: std::io::Error) -> std::io::Error {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("nothing moved for {} s, the --timeout", self.secs))
        } else {
            e
        }
    }
}

impl<S: Read> Read for Timed<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).map_err(|e| self.map(e))
    }
}

impl<S: Write> Write for Timed<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf).map_err(|e| self.map(e))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush().map_err(|e| self.map(e))
    }
}

/// Bounds on a connected socket's reads and writes, and the halves
/// wrapped to say what a timeout means.
fn timed<S: Read + Write + Send + 'static>(r: S, w: S, secs: u64, set: impl Fn(&S, Option<std::time::Duration>) -> std::io::Result<()>) -> Result<(Box<dyn Read>, Box<dyn Write>)> {
    let t = (secs > 0).then(|| std::time::Duration::from_secs(secs));
    set(&r, t).map_err(|e| Error::io(e, "setting the socket's timeout"))?;
    Ok((Box::new(Timed { inner: r, secs }), Box::new(Timed { inner: w, secs })))
}

/// A unix socket at `addr` for us to listen on: an existing socket file is
/// replaced only if nobody listens on it (left by a receive that died);
/// anything else there is refused.
fn bind_unix(addr: &str) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(e, addr)),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(Error::new(libc::EEXIST, format!("{addr}: exists and is not a socket; refusing to replace it (give a new path to --listen)")))
        }
        Ok(_) => match UnixStream::connect(addr) {
            Ok(_) => return Err(Error::new(libc::EADDRINUSE, format!("{addr}: another process listens on this socket"))),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                eprintln!("removing {addr}: a stale socket nobody listens on");
                std::fs::remove_file(addr).map_err(|e| Error::io(e, addr))?;
            }
            Err(e) => return Err(Error::io(e, format_args!("{addr}: checking whether the socket there is in use"))),
        },
    }
    UnixListener::bind(addr).map_err(|e| Error::io(e, format_args!("listening on {addr}")))
}

/// Listen on `addr`, take one connection, and stop listening. Reads and
/// writes on it time out after `timeout` seconds (0: never).
fn accept_one(addr: &str, timeout: u64) -> Result<(Box<dyn Read>, Box<dyn Write>)> {
    if is_unix_addr(addr) {
        use std::os::unix::fs::MetadataExt;
        let l = bind_unix(addr)?;
        let ours = std::fs::symlink_metadata(addr).map(|m| (m.dev(), m.ino())).ok();
        copy::receive::register_temporary(Path::new(addr), false);
        eprintln!("listening on {addr}");
        let accepted = l.accept();
        drop(l);
        // Our socket file only: another may have replaced it meanwhile.
        copy::receive::forget_temporary(Path::new(addr));
        if ours.is_some() && std::fs::symlink_metadata(addr).map(|m| (m.dev(), m.ino())).ok() == ours {
            let _ = std::fs::remove_file(addr);
        }
        let (s, _) = accepted.map_err(|e| Error::io(e, addr))?;
        let r = s.try_clone().map_err(|e| Error::io(e, addr))?;
        s.set_write_timeout((timeout > 0).then(|| std::time::Duration::from_secs(timeout))).map_err(|e| Error::io(e, addr))?;
        timed(r, s, timeout, |s, t| s.set_read_timeout(t))
    } else {
        let l = TcpListener::bind(addr).map_err(|e| Error::io(e, format_args!("listening on {addr}")))?;
        let local = l.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| addr.to_string());
        eprintln!("listening on {local}");
        let (s, peer) = l.accept().map_err(|e| Error::io(e, addr))?;
        drop(l);
        eprintln!("receiving from {peer}");
        let _ = s.set_nodelay(true);
        let r = s.try_clone().map_err(|e| Error::io(e, addr))?;
        s.set_write_timeout((timeout > 0).then(|| std::time::Duration::from_secs(timeout))).map_err(|e| Error::io(e, addr))?;
        timed(r, s, timeout, |s, t| s.set_read_timeout(t))
    }
}
