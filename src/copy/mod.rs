//! Live copy and backup of a disk as a stream, and receiving one: ploop
//! copy's algorithm and wire format, so that either end can be ploop's own
//! tool.
//!
//! - [`wire`]: packets, checksums, the handshake's flags.
//! - [`send`]: the rounds over a serving stack, driven by a write tracker,
//!   and the frozen last pass; `outbox` holds the threads that write the
//!   stream and count the receiver's answers meanwhile.
//! - [`backup`]: which record of changes a backup uses, and when a new
//!   one is published.
//! - [`channel`]: the channel with a bound on every wait.
//! - [`receive`]: a stream into a new image, or into an existing one.

pub mod backup;
pub mod channel;
mod outbox;
pub mod receive;
pub mod send;
pub mod wire;

pub use backup::BackupRecord;
pub use receive::{receive, ReceiveOptions, Received};
pub use channel::Timed;
pub use send::{send, End, FsFreeze, NoFs, Round, SendOptions, Sent, CHANNEL_TIMEOUT, FREEZE_LIMIT};
