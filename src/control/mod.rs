//! The per-device control socket: newline-delimited JSON requests and
//! replies (the messages and their parser are the library's `protocol`),
//! one connection at a time per client, peers checked by their
//! kernel-reported credentials. A request may carry open file descriptors
//! (SCM_RIGHTS): the channel a copy writes to is opened by the client,
//! with the client's rights. `server` is the daemon's side, `client` the
//! command line's.

mod client;
mod server;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use ublk_ploop::protocol::Request;
use ublk_ploop::Result;

pub use client::{request, request_with_fds};
pub use server::Server;

/// Longest request line accepted (the largest real one is a few hundred
/// bytes); a longer one closes the connection unread.
pub const MAX_REQUEST: usize = 4096;
pub const SOCKET_DIR: &str = "/run/ublk-ploop";
/// Clients served at once; more are refused with an error reply.
pub const MAX_CLIENTS: usize = 16;
/// Connections one user other than root may hold at once, so that one
/// user cannot take every slot.
pub const MAX_PER_USER: usize = 4;
/// Slots only root may fill: whatever others hold, the administrator gets in.
pub(crate) const ROOT_RESERVE: usize = 2;
/// Time a client has to send each request line, counted from when the
/// server starts waiting for it: a slow or silent client is cut off.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(3);
/// A connection lives at most this long, however it talks.
pub(crate) const CONNECTION_DEADLINE: Duration = Duration::from_secs(120);

pub fn socket_path(dev_id: u32) -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{dev_id}.sock"))
}

/// What the daemon answers requests with; `fds` are the descriptors that
/// came with the request (most take none).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request, fds: Vec<OwnedFd>) -> Result<Value>;
}

/// Descriptors passed with one request, at most (a request line with
/// more closes the connection).
pub const MAX_FDS: usize = 2;

/// Who may talk to the socket besides root and the daemon's own user.
#[derive(Clone, Copy, Debug, Default)]
pub struct Access {
    pub group: Option<u32>,
}
