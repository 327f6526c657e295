//! Live copy of a serving stack, ploop's way: everything once while the
//! disk is in use, then round after round only what changed meanwhile (the
//! write tracker says what), until the amount stops falling; then a short
//! freeze for the last changes, and either resume or stop.
//!
//! The disk is read on the caller's I/O (a ring of the job's own), a
//! cluster per read with several in flight; a writer thread puts packets on
//! the channel meanwhile, and on a two-way channel a reader thread counts
//! the receiver's answers, so neither waits for the other packet by packet
//! (those threads are in `outbox.rs`).

use std::cell::RefCell;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitvec::vec::BitVec;
use serde::{Deserialize, Serialize};

use super::outbox::{channel_err, read_status, Outbox};
use super::wire::{cmd, Writer, FLAG_COPY_DEVICE, FLAG_MD5};
use crate::convert::is_zero;
use crate::error::{Error, Result};
use crate::io::{for_each_in_flight, AlignedBuf, Io};
use crate::stack::{Frozen, Stack};
use crate::tracker::Tracker;

/// Freezing what sits on the device (its filesystem), by the frontend that
/// knows where it is mounted.
pub trait FsFreeze {
    fn freeze(&mut self) -> Result<()>;
    fn thaw(&mut self) -> Result<()>;
}

/// Nothing to freeze.
pub struct NoFs;

impl FsFreeze for NoFs {
    fn freeze(&mut self) -> Result<()> {
        Ok(())
    }
    fn thaw(&mut self) -> Result<()> {
        Ok(())
    }
}

/// What happens to the device after the last pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum End {
    /// It serves on (a backup).
    Resume,
    /// The stack is closed while frozen (a migration): the caller stops the
    /// device.
    Stop,
}

pub struct SendOptions {
    /// Answers come back on the channel (a socket to a receiver).
    pub two_way: bool,
    /// An incremental backup: the first round sends the clusters `cbt`
    /// marked (the changes since the last backup, zero or not) instead of
    /// every allocated one. The marks are read only once the copy's own
    /// tracker is attached, so a change completing at any moment is in one
    /// or the other; a set read earlier would miss what completed between.
    pub incremental: bool,
    /// Live rounds after the first at most, before freezing.
    pub max_rounds: u32,
    pub end: End,
    /// Cluster reads in flight.
    pub in_flight: usize,
    /// Changed-block tracking to reset at the frozen point (a backup: what
    /// changes after it is the next incremental's). Its marks are set aside
    /// there (still counted, so a stop saves them), dropped once the stream
    /// is all out, given back if the copy fails after all.
    pub cbt: Option<Arc<Tracker>>,
    /// The most the last pass may hold the filesystem frozen and the
    /// requests held: past it the copy gives up (thaws, serves on, fails).
    pub freeze_limit: Duration,
    /// The most the copy waits for the receiver's answers (the channel's
    /// own reads and writes are bounded by [`super::channel::Timed`]).
    pub timeout: Duration,
    /// The last pass is read into memory (and the device resumed) before
    /// it is sent when it is no larger than this, else it is sent while
    /// frozen.
    pub capture_max: u64,
    /// Write and checksum the stream on the caller's thread, with no
    /// helper threads: waits for the channel return at once, so one
    /// thread (a deterministic simulation's executor) runs a whole copy.
    /// The default overlaps reading the disk with hashing and sending.
    pub inline: bool,
}

/// Defaults of [`SendOptions::freeze_limit`] and [`SendOptions::timeout`].
pub const FREEZE_LIMIT: Duration = Duration::from_secs(30);
pub const CHANNEL_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions { two_way: false, incremental: false, max_rounds: 8, end: End::Resume, in_flight: 8, cbt: None, freeze_limit: FREEZE_LIMIT, timeout: CHANNEL_TIMEOUT, capture_max: CAPTURE_MAX, inline: false }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Round {
    pub round: u32,
    /// Clusters to send, and of them sent (the first round of a full copy
    /// skips clusters of zeros).
    pub clusters: u64,
    pub sent: u64,
    pub bytes: u64,
    pub secs: f64,
    pub frozen: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    pub rounds: Vec<Round>,
    /// Disk bytes sent in all.
    pub bytes: u64,
    /// Stream bytes (headers, checksums and commands included).
    pub stream_bytes: u64,
    /// From the filesystem freeze to the resume (or the close).
    pub frozen_ms: f64,
    pub md5: bool,
    pub secs: f64,
    pub stopped: bool,
}

/// Progress: (round, clusters done, clusters in this round).
pub type Progress<'a> = &'a dyn Fn(u32, u64, u64);

/// Copy `stack` to the channel (`out`, and `replies` when two-way).
pub async fn send<I: Io>(
    io: &I,
    stack: &Stack,
    out: Box<dyn Write + Send>,
    replies: Option<Box<dyn Read + Send>>,
    fs: &mut dyn FsFreeze,
    opts: SendOptions,
    progress: Progress<'_>,
) -> Result<Sent> {
    let started = io.now();
    let cluster = stack.cluster_size();
    if opts.incremental && opts.cbt.is_none() {
        return Err(Error::invalid("an incremental copy needs the record of changes since the last backup"));
    }
    let mut writer = Writer::new(out);
    let mut replies = replies;
    // Handshake: our flags; a receiver answers with the negation of its own.
    writer.command(cmd::SYNC, FLAG_MD5 | FLAG_COPY_DEVICE, &[]).map_err(channel_err)?;
    writer.flush().map_err(channel_err)?;
    let md5 = match replies.as_mut() {
        Some(r) => match read_status(r.as_mut())? {
            0 => false,
            s if s < 0 => (-(s as i64)) as u64 & FLAG_MD5 != 0,
            s => return Err(Error::new(libc::EPROTO, format!("the receiver answered the handshake with {s}"))),
        },
        None => true,
    };
    writer.set_md5(md5);
    // INIT: the cluster size in sectors is also the payload's length.
    let init_len = (cluster / 512) as usize;
    writer.command(cmd::INIT_PLOOP, stack.size() / 512, &vec![0u8; init_len.saturating_sub(4)]).map_err(channel_err)?;
    if let Some(r) = replies.as_mut() {
        writer.flush().map_err(channel_err)?;
        match read_status(r.as_mut())? {
            0 => {}
            s => return Err(Error::new(-s, format!("the receiver refused the disk ({}): {}", s, std::io::Error::from_raw_os_error(-s)))),
        }
    }

    // The copy's tracker first, then the record's marks (see `incremental`):
    // a change completing before the attach is in the record (attached
    // earlier), one completing after it in the tracker.
    let tracker = Arc::new(Tracker::new(stack.size(), cluster));
    let read_marks = || opts.cbt.as_ref().filter(|_| opts.incremental).map(|t| t.peek_at(cluster));
    // The mutant reads the marks first: a change completing before the
    // attach is then in neither.
    let early = if crate::mutant::off("attach-before-round") { read_marks() } else { None };
    stack.add_tracker(tracker.clone()).await?;
    let first = if crate::mutant::off("attach-before-round") { early } else { read_marks() };
    let pipe = Outbox::start(writer, replies, opts.two_way, cluster as usize, opts.in_flight, opts.timeout, opts.inline);
    let mut fs_frozen = false;
    let mut cleared = false;
    let result = rounds(io, stack, &tracker, first, &pipe, fs, &mut fs_frozen, &mut cleared, &opts, progress).await;
    if result.is_err() {
        if let (Some(cbt), true) = (&opts.cbt, cleared) {
            cbt.restore();
        }
    }
    if fs_frozen {
        // Only after a failure inside the freeze.
        let _ = fs.thaw();
    }
    stack.remove_tracker(&tracker).await;
    let (mut sent, result) = match result {
        Ok(sent) => (sent, pipe.finish()),
        Err(e) => {
            pipe.abandon();
            return Err(e);
        }
    };
    sent.stream_bytes = match result {
        Ok(n) => n,
        Err(e) => {
            if let (Some(cbt), true) = (&opts.cbt, cleared) {
                cbt.restore();
            }
            return Err(e);
        }
    };
    // Everything reached the receiver: the record starts again from the
    // frozen point (until now a stop saved the taken marks too).
    if let (Some(cbt), true) = (&opts.cbt, cleared) {
        cbt.confirm();
    }
    sent.md5 = md5;
    sent.secs = io.now().duration_since(started).as_secs_f64();
    sent.bytes = sent.rounds.iter().map(|r| r.bytes).sum();
    Ok(sent)
}

#[allow(clippy::too_many_arguments)]
async fn rounds<I: Io>(
    io: &I,
    stack: &Stack,
    tracker: &Tracker,
    first: Option<BitVec>,
    pipe: &Outbox,
    fs: &mut dyn FsFreeze,
    fs_frozen: &mut bool,
    cleared: &mut bool,
    opts: &SendOptions,
    progress: Progress<'_>,
) -> Result<Sent> {
    let mut sent = Sent::default();
    let (first, skip_zeros) = match first {
        Some(set) => (set, false),
        None => (stack.allocated().await, true),
    };
    sent.rounds.push(send_round(io, Source::Live(stack), Dest::Pipe(pipe), 0, &first, skip_zeros, opts.in_flight, None, progress).await?);
    pipe.sync()?;
    let mut last = u64::MAX;
    for round in 1..=opts.max_rounds {
        let set = tracker.drain();
        let n = set.count_ones() as u64;
        if n == 0 {
            break;
        }
        sent.rounds.push(send_round(io, Source::Live(stack), Dest::Pipe(pipe), round, &set, false, opts.in_flight, None, progress).await?);
        pipe.sync()?;
        // Writes outpace the copy (or nearly nothing is left): more live
        // rounds would not shorten the freeze.
        if n >= last || n <= 4 {
            break;
        }
        last = n;
    }

    // The last pass, frozen: the filesystem first (it writes its dirty
    // state through the device), then the requests.
    let t0 = io.now();
    let deadline = t0 + opts.freeze_limit;
    fs.freeze()?;
    *fs_frozen = true;
    let frozen = stack.freeze().await;
    // The frozen point must be what the device holds: after a failed
    // writeback (remembered, so this flush fails) earlier rounds may have
    // read data the disk has lost since, and the copy fails instead of
    // handing it out. Else this makes the frozen point durable.
    frozen.flush(io).await.map_err(|e| e.context("the frozen point could not be made durable"))?;
    let set = tracker.drain();
    // The record's marks are pending from here: they still count (a stop
    // saves them) until the stream is all out, and come back on failure.
    if let Some(t) = &opts.cbt {
        t.drain_to_pending();
        *cleared = true;
    }
    let round = sent.rounds.len() as u32;
    // The last changes are read into memory (when they fit), so that the
    // device moves on before they are checksummed and sent; else they go
    // on the channel while frozen.
    let held = RefCell::new(Vec::new());
    let capture = set.count_ones() as u64 * stack.cluster_size() <= opts.capture_max;
    let into = if capture { Dest::Memory(&held) } else { Dest::Pipe(pipe) };
    // Past the limit the frozen pass gives up: the caller thaws, the
    // requests go on (the guard dropped), the copy fails.
    let over = |e: Error| match e.errno() {
        libc::ETIMEDOUT if io.now() >= deadline => Error::new(
            libc::ETIMEDOUT,
            format!(
                "the last pass did not reach the receiver within the freeze limit ({} s): the copy gave up, the filesystem was thawed and the device serves on ({e})",
                opts.freeze_limit.as_secs_f64()
            ),
        ),
        _ => e,
    };
    let mut last_round =
        send_round(io, Source::Frozen(&frozen), into, round, &set, false, opts.in_flight, Some(deadline), progress).await.map_err(over)?;
    last_round.frozen = true;
    if !capture {
        pipe.written_by(Some(deadline)).map_err(over)?;
    }
    match opts.end {
        End::Resume => drop(frozen),
        End::Stop => {
            frozen.close(io).await?;
            sent.stopped = true;
        }
    }
    fs.thaw()?;
    *fs_frozen = false;
    sent.frozen_ms = io.now().duration_since(t0).as_secs_f64() * 1e3;
    for (pos, buf, len) in held.into_inner() {
        pipe.data(pos, buf, len)?;
    }
    last_round.secs = io.now().duration_since(t0).as_secs_f64();
    sent.rounds.push(last_round);
    Ok(sent)
}

/// The most the last pass holds in memory to end the freeze early.
pub const CAPTURE_MAX: u64 = 256 << 20;

/// Where a round's clusters go: on the channel, or into memory.
enum Dest<'a> {
    Pipe(&'a Outbox),
    Memory(&'a RefCell<Vec<(u64, AlignedBuf, usize)>>),
}

/// Where a round reads: the serving stack, or the frozen one.
enum Source<'a, 'b> {
    Live(&'a Stack),
    Frozen(&'a Frozen<'b>),
}

impl Source<'_, '_> {
    async fn read<I: Io>(&self, io: &I, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::Live(s) => s.read(io, offset, buf).await,
            Source::Frozen(f) => f.read(io, offset, buf).await,
        }
    }
    fn size(&self) -> (u64, u64) {
        match self {
            Source::Live(s) => (s.size(), s.cluster_size()),
            Source::Frozen(f) => (f.size(), f.cluster_size()),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_round<I: Io>(
    io: &I,
    src: Source<'_, '_>,
    into: Dest<'_>,
    round: u32,
    set: &BitVec,
    skip_zeros: bool,
    in_flight: usize,
    deadline: Option<Instant>,
    progress: Progress<'_>,
) -> Result<Round> {
    let start = io.now();
    let (size, cluster) = src.size();
    let todo: Vec<u64> = set.iter_ones().map(|c| c as u64).filter(|&c| c * cluster < size).collect();
    let total = todo.len() as u64;
    progress(round, 0, total);
    let sent = std::cell::Cell::new((0u64, 0u64));
    let one = |&c: &u64| {
        let (into, sent, src) = (&into, &sent, &src);
        async move {
            let len = (size - c * cluster).min(cluster) as usize;
            let mut buf = match into {
                Dest::Pipe(pipe) => pipe.buf(),
                Dest::Memory(_) => AlignedBuf::zeroed(cluster as usize),
            };
            if deadline.is_some_and(|d| io.now() >= d) {
                return Err(Error::new(libc::ETIMEDOUT, "the frozen pass ran out of time"));
            }
            src.read(io, c * cluster, &mut buf[..len]).await?;
            if skip_zeros && is_zero(&buf[..len]) {
                if let Dest::Pipe(pipe) = into {
                    pipe.recycle(buf);
                }
                return Ok(());
            }
            let (n, b) = sent.get();
            sent.set((n + 1, b + len as u64));
            match into {
                Dest::Pipe(pipe) => pipe.data_by(c * cluster, buf, len, deadline),
                Dest::Memory(held) => {
                    held.borrow_mut().push((c * cluster, buf, len));
                    Ok(())
                }
            }
        }
    };
    for_each_in_flight(in_flight, &todo, one, |done| progress(round, done, total)).await?;
    let (n, bytes) = sent.get();
    Ok(Round { round, clusters: total, sent: n, bytes, secs: io.now().duration_since(start).as_secs_f64(), frozen: false })
}
