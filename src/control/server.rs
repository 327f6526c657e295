//! The daemon's side of the control socket: the accept loop, connection
//! slots per user, peer checks, and one thread per client reading request
//! lines (and the descriptors with them) by their deadlines.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{sockopt, UnixCredentials};

use ublk_ploop::protocol::{parse_request, Reply};
use ublk_ploop::{Error, Result};

use super::{Access, Handler, CONNECTION_DEADLINE, MAX_CLIENTS, MAX_FDS, MAX_PER_USER, MAX_REQUEST, REQUEST_DEADLINE, ROOT_RESERVE};

/// How reading a request line ended, short of a line.
#[derive(Debug, PartialEq, Eq)]
enum Cut {
    /// The peer closed (a partial line and its descriptors are dropped).
    Closed,
    TimedOut,
    TooLarge,
    TooManyFds,
    Failed,
}

/// One connection's input: bytes and the descriptors that came with them,
/// cut into request lines.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Descriptors that came with the line being read.
    fds: Vec<OwnedFd>,
}

impl Conn {
    /// The next request line (with its newline) and the descriptors that
    /// came with it, by `deadline`.
    fn next_line(&mut self, deadline: Instant) -> std::result::Result<(Vec<u8>, Vec<OwnedFd>), Cut> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                if pos >= MAX_REQUEST {
                    return Err(Cut::TooLarge);
                }
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Ok((line, std::mem::take(&mut self.fds)));
            }
            if self.buf.len() >= MAX_REQUEST {
                return Err(Cut::TooLarge);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Cut::TimedOut);
            }
            self.stream.set_read_timeout(Some(left)).map_err(|_| Cut::Failed)?;
            let mut chunk = [0u8; 4096];
            let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
            let mut iov = [std::io::IoSliceMut::new(&mut chunk)];
            let msg = match recvmsg::<()>(self.stream.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Err(Cut::TimedOut),
                Err(_) => return Err(Cut::Failed),
            };
            let (n, truncated) = (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC));
            // Taken (and so closed when dropped) whatever happens next.
            for c in msg.cmsgs().map_err(|_| Cut::Failed)? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    // SAFETY: the kernel just installed these descriptors for us.
                    self.fds.extend(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            // (Descriptors beyond the control buffer were closed by the
            // kernel, which then sets MSG_CTRUNC.)
            if truncated || self.fds.len() > MAX_FDS {
                self.fds.clear();
                return Err(Cut::TooManyFds);
            }
            if n == 0 {
                self.fds.clear();
                return Err(Cut::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}


pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Bind the socket (replacing a stale one) and serve it in a thread.
    pub fn start(path: &Path, access: Access, handler: Arc<dyn Handler>) -> Result<Server> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(e, dir.display()))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(e, path.display())),
        }
        let listener = UnixListener::bind(path).map_err(|e| Error::io(e, path.display()))?;
        let mode = if access.group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| Error::io(e, path.display()))?;
        if let Some(gid) = access.group {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| Error::io(e, path.display()))?;
        }
        listener.set_nonblocking(true).map_err(|e| Error::io(e, path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, access, handler, stop2))
            .map_err(|e| Error::io(e, "spawning the control thread"))?;
        Ok(Server { path: path.to_path_buf(), stop, thread: Some(thread) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Connections held, by user.
#[derive(Default)]
struct Slots {
    total: usize,
    by_uid: std::collections::HashMap<u32, usize>,
}

impl Slots {
    /// Take a slot for `uid`, or say why not.
    fn take(&mut self, uid: u32) -> std::result::Result<(), &'static str> {
        if self.total >= MAX_CLIENTS {
            return Err("too many control connections");
        }
        if uid != 0 {
            if self.total >= MAX_CLIENTS - ROOT_RESERVE {
                return Err("too many control connections (the last are kept for root)");
            }
            if self.by_uid.get(&uid).copied().unwrap_or(0) >= MAX_PER_USER {
                return Err("too many control connections from this user");
            }
        }
        self.total += 1;
        *self.by_uid.entry(uid).or_default() += 1;
        Ok(())
    }
    fn give(&mut self, uid: u32) {
        self.total -= 1;
        if let Some(n) = self.by_uid.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.by_uid.remove(&uid);
            }
        }
    }
}

fn accept_loop(listener: UnixListener, access: Access, handler: Arc<dyn Handler>, stop: Arc<AtomicBool>) {
    let slots = Arc::new(std::sync::Mutex::new(Slots::default()));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let refuse = |stream: &mut UnixStream, errno, msg: &str| {
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = send(stream, &Reply::err(&Error::new(errno, msg)));
                };
                // Credentials first: a refused peer costs no thread.
                let cred = match peer_credentials(&stream) {
                    Ok(cred) if permitted(&stream, &cred, access) => cred,
                    Ok(cred) => {
                        tracing::warn!(uid = cred.uid(), pid = cred.pid(), "control request refused: not permitted");
                        refuse(&mut stream, libc::EACCES, "permission denied");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("control socket: cannot read peer credentials: {e}");
                        continue;
                    }
                };
                if let Err(msg) = slots.lock().unwrap_or_else(|e| e.into_inner()).take(cred.uid()) {
                    refuse(&mut stream, libc::EBUSY, msg);
                    continue;
                }
                let uid = cred.uid();
                let (handler, slots2) = (handler.clone(), slots.clone());
                // One thread per client (at most MAX_CLIENTS): a slow client
                // cannot stall the others, and it is cut off at the deadline.
                let spawned = std::thread::Builder::new().name("control-client".into()).spawn(move || {
                    serve_client(stream, handler.as_ref());
                    slots2.lock().unwrap_or_else(|e| e.into_inner()).give(uid);
                });
                if spawned.is_err() {
                    slots.lock().unwrap_or_else(|e| e.into_inner()).give(uid);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Credentials of the peer, as the kernel saw them at connect time.
fn peer_credentials(stream: &UnixStream) -> std::io::Result<UnixCredentials> {
    nix::sys::socket::getsockopt(stream, sockopt::PeerCredentials).map_err(std::io::Error::from)
}

/// SO_PEERGROUPS (Linux 4.13), the same number on every architecture this
/// daemon builds for; the libc crate does not name it.
const SO_PEERGROUPS: libc::c_int = 59;

/// The peer's supplementary groups as the kernel saw them at connect time,
/// or (on a kernel without SO_PEERGROUPS) as its /proc entry shows them now.
fn peer_groups(stream: &UnixStream, pid: libc::pid_t) -> std::io::Result<Vec<u32>> {
    let mut groups = vec![0u32; 32];
    loop {
        let mut len = (groups.len() * 4) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`.
        let rc = unsafe { libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len) };
        if rc == 0 {
            groups.truncate(len as usize / 4);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // The kernel said how much room it needs.
            Some(libc::ERANGE) if (len as usize / 4) > groups.len() && len as usize / 4 <= 65536 => {
                groups.resize(len as usize / 4, 0)
            }
            Some(libc::ENOPROTOOPT) => return proc_groups(pid),
            _ => return Err(e),
        }
    }
}

fn proc_groups(pid: libc::pid_t) -> std::io::Result<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:")).unwrap_or("");
    Ok(line.split_whitespace().filter_map(|g| g.parse().ok()).collect())
}

fn permitted(stream: &UnixStream, cred: &UnixCredentials, access: Access) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() == 0 || cred.uid() == me {
        return true;
    }
    let Some(group) = access.group else { return false };
    // The socket file lets in the group's members through primary and
    // supplementary membership alike; so does this check.
    cred.gid() == group
        || match peer_groups(stream, cred.pid()) {
            Ok(groups) => groups.contains(&group),
            Err(e) => {
                tracing::warn!(pid = cred.pid(), "control socket: cannot read the peer's groups: {e}");
                false
            }
        }
}

fn send(stream: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).expect("replies serialise");
    line.push(b'\n');
    stream.write_all(&line)
}

fn serve_client(stream: UnixStream, handler: &dyn Handler) {
    let end = Instant::now() + CONNECTION_DEADLINE;
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut conn = Conn { stream, buf: Vec::new(), fds: Vec::new() };
    loop {
        let deadline = (Instant::now() + REQUEST_DEADLINE).min(end);
        let (line, mut fds) = match conn.next_line(deadline) {
            Ok(got) => got,
            Err(cut) => {
                // The connection closes (and any descriptors with it):
                // what follows cannot be told apart from a next request.
                let msg = match cut {
                    Cut::Closed | Cut::Failed => return,
                    Cut::TimedOut if Instant::now() >= end => "connection open too long; reconnect",
                    Cut::TimedOut => "no complete request line in time",
                    Cut::TooLarge => "request too large",
                    Cut::TooManyFds => "too many descriptors with one request",
                };
                let errno = if cut == Cut::TimedOut { libc::ETIMEDOUT } else { libc::EINVAL };
                let _ = send(&mut out, &Reply::err(&Error::new(errno, msg)));
                let _ = out.shutdown(std::net::Shutdown::Both);
                return;
            }
        };
        let reply = match parse_request(&line) {
            Ok(req) => {
                // Only as many descriptors as the request takes; the rest
                // are closed now.
                fds.truncate(req.descriptors());
                handler.handle(req, fds)
            }
            Err(e) if !fds.is_empty() => {
                // Descriptors without a request to take them: that peer is
                // not a client of ours.
                drop(fds);
                let _ = send(&mut out, &Reply::err(&e));
                let _ = out.shutdown(std::net::Shutdown::Both);
                return;
            }
            Err(e) => Err(e),
        };
        let reply = match reply {
            Ok(v) => Reply::ok(v),
            Err(e) => Reply::err(&e),
        };
        if send(&mut out, &reply).is_err() {
            return;
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{BufRead, BufReader, Read};

    use serde_json::{json, Value};

    use crate::control::client::exchange;
    use ublk_ploop::protocol::Request;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, request: Request, fds: Vec<OwnedFd>) -> Result<Value> {
            match request {
                Request::Status | Request::Copy { .. } => Ok(json!({"alive": true, "fds": fds.len()})),
                other => Err(Error::invalid(format!("not in this test: {other:?}"))),
            }
        }
    }

    fn roundtrip(path: &Path, payload: &[u8]) -> Vec<Value> {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(payload).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        read_replies(s)
    }

    /// Every reply line until the server closes. A connection the server
    /// closed with input unread ends in a reset, after the replies.
    fn read_replies(mut s: UnixStream) -> Vec<Value> {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("reading replies: {e}"),
            }
        }
        String::from_utf8(bytes).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// A server on a fresh socket in a directory of its own.
    fn server(tag: &str, access: Access) -> (Server, PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("ublk-ploop-ctl-{tag}-{}", std::process::id()));
        let path = dir.join("t.sock");
        let server = Server::start(&path, access, Arc::new(Echo)).unwrap();
        (server, path, dir)
    }

    /// Send `bytes` with `fds` riding on them.
    fn send_fds(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let iov = [std::io::IoSlice::new(bytes)];
        let n = sendmsg::<()>(s.as_raw_fd(), &iov, &[ControlMessage::ScmRights(fds)], MsgFlags::empty(), None).unwrap();
        assert_eq!(n, bytes.len());
    }

    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (std::fs::File::from(r), std::fs::File::from(w))
    }

    /// True once every write end of the pipe is closed (the daemon's copy
    /// included), waiting at most `wait`.
    fn closed_everywhere(read_end: &std::fs::File, wait: Duration) -> bool {
        let mut pfd = libc::pollfd { fd: read_end.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as i32) };
        n == 1 && pfd.revents & libc::POLLHUP != 0
    }

    #[test]
    fn serves_good_requests_and_refuses_bad_ones() {
        let (server, path, dir) = server("basic", Access::default());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let r = roundtrip(&path, b"{\"version\":1,\"cmd\":\"status\"}\n{\"cmd\":\"nope\"}\nnot json\n{\"version\":9,\"cmd\":\"status\"}\n");
        assert_eq!(r.len(), 4);
        assert_eq!(r[0]["ok"], true);
        assert_eq!(r[0]["result"]["alive"], true);
        assert_eq!(r[1]["ok"], false);
        assert!(r[1]["error"].as_str().unwrap().contains("unknown variant `nope`"), "{}", r[1]);
        assert_eq!(r[2]["ok"], false);
        assert!(r[2]["error"].as_str().unwrap().contains("malformed"));
        assert_eq!(r[3]["errno"], libc::EPROTONOSUPPORT);

        // Oversized: one error, connection closed, server still serving.
        let big = vec![b'x'; MAX_REQUEST + 100];
        let r = roundtrip(&path, &big);
        assert_eq!(r.len(), 1);
        assert!(r[0]["error"].as_str().unwrap().contains("too large"));
        let r = roundtrip(&path, b"{\"cmd\":\"status\"}\n");
        assert_eq!(r[0]["ok"], true);
        assert_eq!(r[0]["result"]["fds"], 0);

        // Descriptors ride along with the request that takes them, and
        // only as many as it takes.
        let (a, _b) = UnixStream::pair().unwrap();
        let s = UnixStream::connect(&path).unwrap();
        let v = exchange(s, &path, "test", Request::Copy { two_way: false, stop: false, force: false, freeze_limit: None, timeout: None, allow_unfrozen: false }, &[a.as_raw_fd(), 0]).unwrap();
        assert_eq!(v["fds"], 1);
        let s = UnixStream::connect(&path).unwrap();
        let v = exchange(s, &path, "test", Request::Status, &[a.as_raw_fd()]).unwrap();
        assert_eq!(v["fds"], 0);
        drop(server);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A client that never finishes its line is cut off at the deadline,
    /// and meanwhile another is served at once.
    #[test]
    fn slow_peer_is_cut_off_and_does_not_block_others() {
        let (server, path, dir) = server("slow", Access::default());
        let mut slow = UnixStream::connect(&path).unwrap();
        slow.write_all(b"{\"cmd\":").unwrap();
        let started = Instant::now();
        let r = roundtrip(&path, b"{\"cmd\":\"status\"}\n");
        assert_eq!(r[0]["ok"], true);
        assert!(started.elapsed() < Duration::from_secs(1));
        slow.set_read_timeout(Some(REQUEST_DEADLINE + Duration::from_secs(3))).unwrap();
        let mut text = String::new();
        slow.read_to_string(&mut text).expect("the server answers and closes before the client's timeout");
        let took = started.elapsed();
        assert!(took >= REQUEST_DEADLINE && took < REQUEST_DEADLINE + Duration::from_secs(2), "{took:?}");
        let reply: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(reply["errno"], libc::ETIMEDOUT, "{reply}");
        drop(server);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Descriptors that come without a request line are closed with the
    /// connection: at the deadline, at once with a line that is no
    /// request, and when more come than a request may take.
    #[test]
    fn descriptors_without_a_request_are_closed() {
        let (server, path, dir) = server("fds", Access::default());
        // No newline: cut off at the deadline.
        let (r1, w1) = pipe();
        let s1 = UnixStream::connect(&path).unwrap();
        send_fds(&s1, b"{", &[w1.as_raw_fd()]);
        drop(w1);
        // A line that is no request.
        let (r2, w2) = pipe();
        let mut s2 = UnixStream::connect(&path).unwrap();
        send_fds(&s2, b"garbage\n", &[w2.as_raw_fd()]);
        drop(w2);
        assert!(closed_everywhere(&r2, Duration::from_secs(1)), "descriptor with a bad line kept");
        let mut text = String::new();
        s2.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s2.read_to_string(&mut text).expect("connection closed");
        assert!(text.contains("malformed"), "{text}");
        // More than any request takes, before a newline.
        let (r3, w3) = pipe();
        let s3 = UnixStream::connect(&path).unwrap();
        let many = [w3.as_raw_fd(); MAX_FDS];
        send_fds(&s3, b"{", &many);
        send_fds(&s3, b"\"", &many);
        drop(w3);
        assert!(closed_everywhere(&r3, Duration::from_secs(1)), "descriptors beyond the limit kept");
        assert!(!closed_everywhere(&r1, Duration::from_millis(100)), "cut off before the deadline");
        assert!(closed_everywhere(&r1, REQUEST_DEADLINE + Duration::from_secs(2)), "descriptors of a silent peer kept");
        drop((s1, s3));
        drop(server);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// One user cannot take every slot, and root always finds one.
    #[test]
    fn one_user_cannot_take_every_slot() {
        let mut slots = Slots::default();
        for _ in 0..MAX_PER_USER {
            slots.take(1000).unwrap();
        }
        assert!(slots.take(1000).is_err());
        let mut uid = 2000;
        while slots.take(uid).is_ok() {
            uid += 1;
        }
        assert_eq!(slots.total, MAX_CLIENTS - ROOT_RESERVE);
        for _ in 0..ROOT_RESERVE {
            slots.take(0).unwrap();
        }
        assert!(slots.take(0).is_err());
        // A slot given back while root holds the reserve is root's.
        slots.give(1000);
        assert!(slots.take(1000).is_err());
        slots.give(0);
        slots.give(0);
        slots.take(1000).unwrap();
        assert_eq!(slots.by_uid[&1000], MAX_PER_USER);
        assert!(!slots.by_uid.contains_key(&0));
    }

    /// A member of the socket's group through a supplementary group only
    /// (another uid, another primary gid) is let in; a non-member is not.
    /// Needs root to take another identity.
    #[test]
    fn supplementary_group_member_is_let_in() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to connect as another user");
            return;
        }
        const GROUP: u32 = 48_611;
        const NOBODY: u32 = 65_534;
        let (server, path, dir) = server("groups", Access { group: Some(GROUP) });
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ask = |groups: &[u32]| -> Value {
            // The socket is made here and connected by a child that has
            // taken the other identity (the kernel records the connecting
            // process's credentials); the child does nothing else.
            let sock = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            let addr = nix::sys::socket::UnixAddr::new(&path).unwrap();
            // SAFETY: the child only makes system calls and exits.
            let child = unsafe { libc::fork() };
            assert!(child >= 0, "fork");
            if child == 0 {
                // SAFETY: plain system calls on values made before the fork.
                unsafe {
                    // Raw system calls: the child has one thread, and
                    // libc's wrappers would try to reach the parent's others.
                    let step = if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                        1
                    } else if libc::syscall(libc::SYS_setgid, NOBODY) != 0 {
                        2
                    } else if libc::syscall(libc::SYS_setuid, NOBODY) != 0 {
                        3
                    } else if libc::connect(sock.as_raw_fd(), nix::sys::socket::SockaddrLike::as_ptr(&addr), nix::sys::socket::SockaddrLike::len(&addr)) != 0 {
                        4
                    } else {
                        0
                    };
                    libc::_exit(step);
                }
            }
            let mut status = 0;
            // SAFETY: waiting for our own child.
            assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
            assert!(libc::WIFEXITED(status), "the child died");
            assert_eq!(libc::WEXITSTATUS(status), 0, "the child failed at step (1 setgroups, 2 setgid, 3 setuid, 4 connect)");
            let mut s = UnixStream::from(sock);
            s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap()
        };
        let r = ask(&[100, GROUP]);
        assert_eq!(r["ok"], true, "{r}");
        // The file's mode keeps a non-member out; opened to all, the
        // daemon's own check still does.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let r = ask(&[100]);
        assert_eq!(r["errno"], libc::EACCES, "{r}");
        drop(server);
        let _ = std::fs::remove_dir_all(dir);
    }
}

