//! The per-device control socket: newline-delimited JSON requests and
//! replies (the messages are in `protocol.rs`), one connection at a time
//! per client, peers checked by their kernel-reported credentials. A
//! request may carry open file descriptors (SCM_RIGHTS): the channel a
//! copy writes to is opened by the client, with the client's rights.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use ublk_ploop::{Error, Result};

use crate::protocol::{Envelope, Reply, Request, PROTOCOL_VERSION};
/// Longest request line accepted; anything longer is refused unread.
pub const MAX_REQUEST: usize = 64 * 1024;
pub const SOCKET_DIR: &str = "/run/ublk-ploop";
/// Clients served at once; more are refused with an error reply.
pub const MAX_CLIENTS: usize = 16;
/// A connection lives at most this long, however slowly it talks.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(120);

pub fn socket_path(dev_id: u32) -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{dev_id}.sock"))
}

impl Reply {
    fn ok(result: Value) -> Reply {
        Reply { version: PROTOCOL_VERSION, ok: true, result: Some(result), error: None, errno: None }
    }
    fn err(e: &Error) -> Reply {
        Reply { version: PROTOCOL_VERSION, ok: false, result: None, error: Some(e.message().to_string()), errno: Some(e.errno()) }
    }
}

/// The commands, as named on the wire (for error messages).
const COMMANDS: &str = "status, info, flush, snapshot, snapshot-list, snapshot-merge, snapshot-delete, snapshot-switch, job, track-start, track-get, track-stop, copy, backup";

/// Parse one request line: the version is checked before the command, and
/// an unknown command is named as such.
fn parse_request(line: &[u8]) -> Result<Request> {
    let value: Value = serde_json::from_slice(line).map_err(|e| Error::invalid(format!("malformed request: {e}")))?;
    if let Some(v) = value.get("version").filter(|v| !v.is_null()) {
        if v.as_u64() != Some(PROTOCOL_VERSION as u64) {
            return Err(Error::new(
                libc::EPROTONOSUPPORT,
                format!("protocol version {v} not supported (this daemon speaks {PROTOCOL_VERSION})"),
            ));
        }
    }
    match Envelope::from_value(value.clone()) {
        Ok(env) => Ok(env.request),
        Err(e) => match value.get("cmd").and_then(Value::as_str) {
            Some(cmd) if !COMMANDS.split(", ").any(|c| c == cmd) => {
                Err(Error::invalid(format!("unknown command '{cmd}' (known: {COMMANDS})")))
            }
            _ => Err(Error::invalid(format!("malformed request: {e}"))),
        },
    }
}

/// What the daemon answers requests with; `fds` are the descriptors that
/// came with the request (most take none).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request, fds: Vec<OwnedFd>) -> Result<Value>;
}

/// Descriptors passed with one request, at most.
pub const MAX_FDS: usize = 2;

/// Reads a stream socket, keeping the descriptors that arrive with the
/// bytes.
struct FdReader {
    stream: UnixStream,
    fds: Vec<OwnedFd>,
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [std::io::IoSliceMut::new(buf)];
        let msg = recvmsg::<()>(self.stream.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
        let n = msg.bytes;
        for c in msg.cmsgs().map_err(|e| std::io::Error::from_raw_os_error(e as i32))? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel just installed these descriptors for us.
                self.fds.extend(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        Ok(n)
    }
}

/// Who may talk to the socket besides root and the daemon's own user.
#[derive(Clone, Copy, Debug, Default)]
pub struct Access {
    pub group: Option<u32>,
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

fn accept_loop(listener: UnixListener, access: Access, handler: Arc<dyn Handler>, stop: Arc<AtomicBool>) {
    let clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                // Credentials first: a refused peer costs no thread.
                match peer_credentials(&stream) {
                    Ok(cred) if permitted(&cred, access) => {}
                    Ok(cred) => {
                        tracing::warn!(uid = cred.uid, pid = cred.pid, "control request refused: not permitted");
                        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                        let _ = send(&mut stream, &Reply::err(&Error::new(libc::EACCES, "permission denied")));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("control socket: cannot read peer credentials: {e}");
                        continue;
                    }
                }
                if clients.load(Ordering::Relaxed) >= MAX_CLIENTS {
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = send(&mut stream, &Reply::err(&Error::new(libc::EBUSY, "too many control connections")));
                    continue;
                }
                clients.fetch_add(1, Ordering::Relaxed);
                let (handler, count) = (handler.clone(), clients.clone());
                // One thread per client (at most MAX_CLIENTS): a slow client
                // cannot stall the others; each connection has a deadline.
                let spawned = std::thread::Builder::new().name("control-client".into()).spawn(move || {
                    serve_client(stream, handler.as_ref());
                    count.fetch_sub(1, Ordering::Relaxed);
                });
                if spawned.is_err() {
                    clients.fetch_sub(1, Ordering::Relaxed);
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
fn peer_credentials(stream: &UnixStream) -> std::io::Result<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: u32::MAX };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt fills `cred` of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cred)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn permitted(cred: &libc::ucred, access: Access) -> bool {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    cred.uid == 0 || cred.uid == me || access.group.is_some_and(|g| g == cred.gid)
}

fn send(stream: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).expect("replies serialise");
    line.push(b'\n');
    stream.write_all(&line)
}

fn serve_client(stream: UnixStream, handler: &dyn Handler) {
    let deadline = std::time::Instant::now() + CONNECTION_DEADLINE;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut reader = BufReader::new(FdReader { stream, fds: Vec::new() });
    loop {
        if std::time::Instant::now() > deadline {
            let _ = send(&mut out, &Reply::err(&Error::new(libc::ETIMEDOUT, "connection open too long; reconnect")));
            return;
        }
        let mut line = Vec::new();
        let n = match (&mut reader).take(MAX_REQUEST as u64 + 1).read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        if line.last() != Some(&b'\n') {
            // Oversized (or cut off): refuse and drop the connection, since
            // the rest of the line cannot be told apart from a next request.
            let msg = if line.len() > MAX_REQUEST { "request too large" } else { "request not terminated by a newline" };
            let _ = send(&mut out, &Reply::err(&Error::invalid(msg)));
            // Closing with unread input would reset the connection and could
            // destroy the reply; drain a bounded amount first.
            let _ = out.shutdown(std::net::Shutdown::Write);
            let _ = std::io::copy(&mut reader.take(16 << 20), &mut std::io::sink());
            return;
        }
        let fds = std::mem::take(&mut reader.get_mut().fds);
        if fds.len() > MAX_FDS {
            let _ = send(&mut out, &Reply::err(&Error::invalid("too many descriptors with one request")));
            return;
        }
        let reply = match parse_request(&line).and_then(|req| handler.handle(req, fds)) {
            Ok(v) => Reply::ok(v),
            Err(e) => Reply::err(&e),
        };
        if send(&mut out, &reply).is_err() {
            return;
        }
    }
}

/// Send one request to a device's daemon and return its typed result.
pub fn request<T: DeserializeOwned>(dev_id: u32, request: Request) -> Result<T> {
    request_with_fds(dev_id, request, &[])
}

/// The same, passing open descriptors along (the daemon gets its own
/// copies; the caller may close its own afterwards).
pub fn request_with_fds<T: DeserializeOwned>(dev_id: u32, request: Request, fds: &[RawFd]) -> Result<T> {
    let value = request_value(dev_id, request, fds)?;
    serde_json::from_value(value).map_err(|e| Error::new(libc::EPROTO, format!("device {dev_id}: unexpected reply from daemon: {e}")))
}

fn request_value(dev_id: u32, request: Request, fds: &[RawFd]) -> Result<Value> {
    let path = socket_path(dev_id);
    let stream = UnixStream::connect(&path).map_err(|e| {
        // Without ublk there is no device and no daemon: say what is missing.
        if let Err(no_ublk) = crate::daemon::require_ublk() {
            return no_ublk;
        }
        Error::io(e, format_args!("device {dev_id}: cannot reach its daemon at {}", path.display()))
    })?;
    exchange(stream, &path, &format!("device {dev_id}"), request, fds)
}

fn exchange(mut stream: UnixStream, path: &Path, who: &str, request: Request, fds: &[RawFd]) -> Result<Value> {
    stream.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let mut line = serde_json::to_vec(&Envelope { version: Some(PROTOCOL_VERSION), request }).expect("requests serialise");
    line.push(b'\n');
    if fds.is_empty() {
        stream.write_all(&line).map_err(|e| Error::io(e, path.display()))?;
    } else {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        // The descriptors ride with the first bytes; the rest follows.
        let iov = [std::io::IoSlice::new(&line)];
        let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, &[ControlMessage::ScmRights(fds)], MsgFlags::empty(), None)
            .map_err(|e| Error::io(std::io::Error::from_raw_os_error(e as i32), path.display()))?;
        stream.write_all(&line[sent..]).map_err(|e| Error::io(e, path.display()))?;
    }
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(|e| Error::io(e, path.display()))?;
    let reply: Reply = serde_json::from_str(&answer)
        .map_err(|e| Error::new(libc::EPROTO, format!("{who}: unreadable reply from daemon: {e}")))?;
    if reply.ok {
        Ok(reply.result.unwrap_or(Value::Null))
    } else {
        Err(Error::new(reply.errno.unwrap_or(libc::EIO), reply.error.unwrap_or_else(|| "request failed".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, request: Request, fds: Vec<OwnedFd>) -> Result<Value> {
            match request {
                Request::Status => Ok(json!({"alive": true, "fds": fds.len()})),
                other => Err(Error::invalid(format!("not in this test: {other:?}"))),
            }
        }
    }

    fn roundtrip(path: &Path, payload: &[u8]) -> Vec<Value> {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(payload).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn serves_good_requests_and_refuses_bad_ones() {
        let dir = std::env::temp_dir().join(format!("ublk-ploop-ctl-{}", std::process::id()));
        let path = dir.join("t.sock");
        let server = Server::start(&path, Access::default(), Arc::new(Echo)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let r = roundtrip(&path, b"{\"version\":1,\"cmd\":\"status\"}\n{\"cmd\":\"nope\"}\nnot json\n{\"version\":9,\"cmd\":\"status\"}\n");
        assert_eq!(r.len(), 4);
        assert_eq!(r[0]["ok"], true);
        assert_eq!(r[0]["result"]["alive"], true);
        assert_eq!(r[1]["ok"], false);
        assert!(r[1]["error"].as_str().unwrap().contains("unknown command"));
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

        // Descriptors ride along with a request.
        let (a, _b) = UnixStream::pair().unwrap();
        let s = UnixStream::connect(&path).unwrap();
        let v = exchange(s, &path, "test", Request::Status, &[a.as_raw_fd(), 0]).unwrap();
        assert_eq!(v["fds"], 2);
        drop(server);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
