//! The command line's side of the control socket: one request, its
//! descriptors riding along, and the daemon's reply.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use ublk_ploop::protocol::{Envelope, Reply, Request, PROTOCOL_VERSION};
use ublk_ploop::error::ErrorKind;
use ublk_ploop::{Error, Result};

use super::socket_path;

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
        let e = match crate::ublk_control::require_ublk() {
            Err(no_ublk) => no_ublk,
            Ok(()) => Error::io(e, format_args!("device {dev_id}: cannot reach its daemon at {}", path.display())),
        };
        e.of_kind(ErrorKind::Refused)
    })?;
    exchange(stream, &path, &format!("device {dev_id}"), request, fds)
}

pub(super) fn exchange(mut stream: UnixStream, path: &Path, who: &str, request: Request, fds: &[RawFd]) -> Result<Value> {
    stream.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let mut line = serde_json::to_vec(&Envelope { version: Some(PROTOCOL_VERSION), request }).expect("requests serialise");
    line.push(b'\n');
    let sent = if fds.is_empty() {
        stream.write_all(&line)
    } else {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        // The descriptors ride with the first bytes; the rest follows.
        let iov = [std::io::IoSlice::new(&line)];
        sendmsg::<()>(stream.as_raw_fd(), &iov, &[ControlMessage::ScmRights(fds)], MsgFlags::empty(), None)
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
            .and_then(|sent| stream.write_all(&line[sent..]))
    };
    // A daemon that refuses a peer (credentials, no free slot) answers and
    // closes without reading: the write may then fail with EPIPE while its
    // answer, which says why, is waiting to be read.
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    let reply: Reply = match (sent, read) {
        (_, Ok(n)) if n > 0 => {
            serde_json::from_str(&answer).map_err(|e| Error::new(libc::EPROTO, format!("{who}: unreadable reply from daemon: {e}")))?
        }
        (Err(e), _) => return Err(Error::io(e, path.display())),
        (Ok(()), Err(e)) => return Err(Error::io(e, path.display())),
        (Ok(()), Ok(_)) => return Err(Error::new(libc::EPROTO, format!("{who}: the daemon closed the connection without a reply"))),
    };
    if reply.ok {
        Ok(reply.result.unwrap_or(Value::Null))
    } else {
        Err(Error::new(reply.errno.unwrap_or(libc::EIO), reply.error.unwrap_or_else(|| "request failed".into())).of_kind(ErrorKind::Refused))
    }
}

