//! Live copy of a serving stack, ploop's way: everything once while the
//! disk is in use, then round after round only what changed meanwhile (the
//! write tracker says what), until the amount stops falling; then a short
//! freeze for the last changes, and either resume or stop.
//!
//! The disk is read on the caller's I/O (a ring of the job's own), a
//! cluster per read with several in flight; a writer thread puts packets on
//! the channel meanwhile, and on a two-way channel a reader thread counts
//! the receiver's answers, so neither waits for the other packet by packet.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bitvec::vec::BitVec;
use serde::{Deserialize, Serialize};

use super::wire::{cmd, Kind, Writer, FLAG_COPY_DEVICE, FLAG_MD5};
use crate::convert::is_zero;
use md5::{Digest, Md5};
use crate::error::{Error, Result};
use crate::io::{for_each_in_flight, AlignedBuf, BufPool, Io};
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
}

/// Defaults of [`SendOptions::freeze_limit`] and [`SendOptions::timeout`].
pub const FREEZE_LIMIT: Duration = Duration::from_secs(30);
pub const CHANNEL_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions { two_way: false, incremental: false, max_rounds: 8, end: End::Resume, in_flight: 8, cbt: None, freeze_limit: FREEZE_LIMIT, timeout: CHANNEL_TIMEOUT, capture_max: CAPTURE_MAX }
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
    let started = Instant::now();
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
    stack.add_tracker(tracker.clone()).await?;
    let first = opts.cbt.as_ref().filter(|_| opts.incremental).map(|t| t.peek_at(cluster));
    let pipe = Outbox::start(writer, replies, opts.two_way, cluster as usize, opts.in_flight, opts.timeout);
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
    sent.secs = started.elapsed().as_secs_f64();
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
    let t0 = Instant::now();
    let deadline = t0 + opts.freeze_limit;
    fs.freeze()?;
    *fs_frozen = true;
    let frozen = stack.freeze().await;
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
        libc::ETIMEDOUT if Instant::now() >= deadline => Error::new(
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
    sent.frozen_ms = t0.elapsed().as_secs_f64() * 1e3;
    for (pos, buf, len) in held.into_inner() {
        pipe.data(pos, buf, len)?;
    }
    last_round.secs = t0.elapsed().as_secs_f64();
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
    let start = Instant::now();
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
            if deadline.is_some_and(|d| Instant::now() >= d) {
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
    Ok(Round { round, clusters: total, sent: n, bytes, secs: start.elapsed().as_secs_f64(), frozen: false })
}

fn channel_err(e: std::io::Error) -> Error {
    if super::channel::timed_out(&e) {
        return Error::new(libc::ETIMEDOUT, format!("writing the copy stream: {e}"));
    }
    Error::io(e, "writing the copy stream")
}

fn read_status(r: &mut dyn Read) -> Result<i32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(answer_err)?;
    Ok(i32::from_le_bytes(b))
}

fn answer_err(e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::new(libc::ECONNRESET, "the receiver closed the channel"),
        _ if super::channel::timed_out(&e) => Error::new(libc::ETIMEDOUT, format!("reading the receiver's answer: {e}")),
        _ => Error::io(e, "reading the receiver's answer"),
    }
}

enum Msg {
    /// A cluster to send; `digest` once hashed.
    Data { pos: u64, buf: AlignedBuf, len: usize, digest: Option<[u8; 16]> },
    /// The barriers below act once the first `after` data packets are on
    /// the channel (hashing threads may deliver them out of order).
    Sync { after: u64 },
    /// Answer once everything before is on the channel.
    Written { after: u64, done: SyncSender<()> },
    /// Answer once everything before is answered by the receiver.
    Answered { after: u64, done: SyncSender<()> },
}

/// Answers counted by the reader thread.
#[derive(Default)]
struct Answers {
    state: Mutex<AnswerState>,
    cv: Condvar,
}

#[derive(Default)]
struct AnswerState {
    count: u64,
    error: Option<Error>,
    closed: bool,
    /// The copy is over: the reader stops at its next idle timeout.
    done: bool,
}

/// The writer thread (and, two-way, the answer reader), the threads that
/// checksum payloads on the way (MD5 runs at about half the speed of a
/// disk; several of them keep up), and their queues.
struct Outbox {
    /// To the hashers (when checksums are on), else to the writer.
    data_tx: Option<SyncSender<Msg>>,
    /// To the writer, for barriers.
    tx: Option<SyncSender<Msg>>,
    writer: Option<JoinHandle<Result<u64>>>,
    hashers: Vec<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    bufs: Arc<BufPool>,
    /// Data packets queued so far.
    queued: std::cell::Cell<u64>,
    /// The writer's error once it stopped early.
    failed: Arc<Mutex<Option<Error>>>,
    /// Set when the copy failed: the stream must end without FINISH.
    abandoned: Arc<AtomicBool>,
    answers: Option<Arc<Answers>>,
}

impl Outbox {
    fn start(writer: Writer<Box<dyn Write + Send>>, replies: Option<Box<dyn Read + Send>>, two_way: bool, cluster: usize, depth: usize, timeout: Duration) -> Outbox {
        let (tx, rx) = sync_channel::<Msg>(depth * 2);
        let bufs = Arc::new(BufPool::new(cluster, depth * 4));
        let answers = (two_way && replies.is_some()).then(|| Arc::new(Answers::default()));
        let reader = match (replies, &answers) {
            (Some(r), Some(a)) => {
                let a = a.clone();
                Some(std::thread::spawn(move || read_answers(r, &a)))
            }
            _ => None,
        };
        let failed = Arc::new(Mutex::new(None));
        let abandoned = Arc::new(AtomicBool::new(false));
        let mut hashers = Vec::new();
        let data_tx = if writer.md5() {
            let (htx, hrx) = sync_channel::<Msg>(depth * 2);
            let hrx = Arc::new(Mutex::new(hrx));
            let n = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
            for i in 0..n {
                let (hrx, tx) = (hrx.clone(), tx.clone());
                let spawned = std::thread::Builder::new().name(format!("copy-md5-{i}")).spawn(move || loop {
                    let msg = hrx.lock().unwrap().recv();
                    let Ok(Msg::Data { pos, buf, len, .. }) = msg else { return };
                    let digest = Some(Md5::digest(&buf[..len]).into());
                    if tx.send(Msg::Data { pos, buf, len, digest }).is_err() {
                        return;
                    }
                });
                hashers.extend(spawned);
            }
            htx
        } else {
            tx.clone()
        };
        let (bufs2, answers2, failed2, abandoned2) = (bufs.clone(), answers.clone(), failed.clone(), abandoned.clone());
        let writer = std::thread::Builder::new()
            .name("copy-writer".into())
            .spawn(move || {
                let r = write_loop(writer, rx, &bufs2, answers2.as_deref(), &abandoned2, timeout);
                if let Err(e) = &r {
                    *failed2.lock().unwrap() = Some(e.clone());
                }
                r
            })
            .expect("spawning the copy writer");
        Outbox {
            data_tx: Some(data_tx),
            tx: Some(tx),
            writer: Some(writer),
            hashers,
            reader,
            bufs,
            queued: std::cell::Cell::new(0),
            failed,
            abandoned,
            answers,
        }
    }

    fn buf(&self) -> AlignedBuf {
        self.bufs.get()
    }

    fn recycle(&self, buf: AlignedBuf) {
        self.bufs.put(buf)
    }

    fn send(&self, msg: Msg) -> Result<()> {
        self.put(self.tx.as_ref().expect("open until finish"), msg, None)
    }

    /// Queue `msg`; with a deadline, give up when the queue stays full
    /// until then (the writer is stuck on a receiver that takes nothing).
    fn put(&self, tx: &SyncSender<Msg>, msg: Msg, deadline: Option<Instant>) -> Result<()> {
        let Some(deadline) = deadline else { return tx.send(msg).map_err(|_| self.error()) };
        let mut msg = msg;
        let mut nap = Duration::from_micros(100);
        loop {
            match tx.try_send(msg) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(_)) => return Err(self.error()),
                Err(TrySendError::Full(m)) => msg = m,
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(libc::ETIMEDOUT, "the receiver took nothing"));
            }
            std::thread::sleep(nap.min(deadline - now));
            nap = (nap * 2).min(Duration::from_millis(5));
        }
    }

    fn error(&self) -> Error {
        self.failed.lock().unwrap().clone().unwrap_or_else(|| Error::new(libc::EPIPE, "the copy stream stopped"))
    }

    fn data(&self, pos: u64, buf: AlignedBuf, len: usize) -> Result<()> {
        self.data_by(pos, buf, len, None)
    }

    fn data_by(&self, pos: u64, buf: AlignedBuf, len: usize, deadline: Option<Instant>) -> Result<()> {
        let tx = self.data_tx.as_ref().expect("open until finish");
        self.put(tx, Msg::Data { pos, buf, len, digest: None }, deadline)?;
        self.queued.set(self.queued.get() + 1);
        Ok(())
    }

    /// A SYNC command, and wait until the receiver answered everything.
    fn sync(&self) -> Result<()> {
        let after = self.queued.get();
        self.send(Msg::Sync { after })?;
        let (done, rx) = sync_channel(1);
        self.send(Msg::Answered { after, done })?;
        rx.recv().map_err(|_| self.error())
    }

    /// Wait until everything queued is on the channel.
    fn written(&self) -> Result<()> {
        self.written_by(None)
    }

    fn written_by(&self, deadline: Option<Instant>) -> Result<()> {
        let (done, rx) = sync_channel(1);
        self.put(self.tx.as_ref().expect("open until finish"), Msg::Written { after: self.queued.get(), done }, deadline)?;
        match deadline {
            None => rx.recv().map_err(|_| self.error()),
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(()) => Ok(()),
                Err(RecvTimeoutError::Timeout) => Err(Error::new(libc::ETIMEDOUT, "the receiver did not take the last pass")),
                Err(RecvTimeoutError::Disconnected) => Err(self.error()),
            },
        }
    }

    /// End the stream (FINISH) once everything queued is written, and
    /// wait for the receiver; returns the stream's length.
    fn finish(mut self) -> Result<u64> {
        self.written()?;
        self.close_queues();
        self.writer.take().expect("once").join().unwrap_or_else(|_| Err(Error::new(libc::EIO, "the copy writer panicked")))
    }

    fn close_queues(&mut self) {
        drop(self.data_tx.take());
        for h in self.hashers.drain(..) {
            let _ = h.join();
        }
        drop(self.tx.take());
    }

    /// Stop after a failure: the writer ends without FINISH, so the
    /// receiver sees an incomplete stream.
    fn abandon(mut self) {
        self.abandoned.store(true, Ordering::Release);
        self.close_queues();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.close_queues();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        // The reader ends when the receiver closes the channel, or at its
        // next idle timeout; it is not waited for (it holds nothing of
        // ours but the answer count).
        if let Some(a) = &self.answers {
            a.state.lock().unwrap().done = true;
        }
        drop(self.reader.take());
    }
}

fn write_loop(
    mut w: Writer<Box<dyn Write + Send>>,
    rx: Receiver<Msg>,
    bufs: &BufPool,
    answers: Option<&Answers>,
    abandoned: &AtomicBool,
    timeout: Duration,
) -> Result<u64> {
    let cancelled = || Error::new(libc::ECANCELED, "copy abandoned");
    let mut asked = 0u64;
    let mut data = 0u64;
    // Barriers waiting for data still being hashed, in order.
    let mut waiting: std::collections::VecDeque<Msg> = Default::default();
    while let Ok(msg) = rx.recv() {
        if abandoned.load(Ordering::Acquire) {
            return Err(cancelled());
        }
        match msg {
            Msg::Data { pos, buf, len, digest } => {
                w.packet_with_digest(Kind::DataDevice, pos, &buf[..len], digest).map_err(channel_err)?;
                bufs.put(buf);
                asked += 1;
                data += 1;
            }
            barrier => waiting.push_back(barrier),
        }
        while let Some(b) = waiting.front() {
            let after = match b {
                Msg::Sync { after } | Msg::Written { after, .. } | Msg::Answered { after, .. } => *after,
                Msg::Data { .. } => unreachable!("data is never queued as a barrier"),
            };
            if after > data {
                break;
            }
            match waiting.pop_front().expect("peeked") {
                Msg::Sync { .. } => {
                    w.command(cmd::SYNC, 0, &[]).map_err(channel_err)?;
                    asked += 1;
                }
                Msg::Written { done, .. } => {
                    w.flush().map_err(channel_err)?;
                    let _ = done.send(());
                }
                Msg::Answered { done, .. } => {
                    w.flush().map_err(channel_err)?;
                    if let Some(a) = answers {
                        wait_answers(a, asked, timeout)?;
                    }
                    let _ = done.send(());
                }
                Msg::Data { .. } => unreachable!(),
            }
        }
    }
    // The queue closed: the end of the stream, unless the copy failed.
    if abandoned.load(Ordering::Acquire) || !waiting.is_empty() {
        return Err(cancelled());
    }
    if let Some(a) = answers {
        w.command(cmd::UMOUNT, 0, &[]).map_err(channel_err)?;
        asked += 1;
        w.finish(false).map_err(channel_err)?;
        asked += 1;
        wait_answers(a, asked, timeout)?;
    } else {
        w.finish(true).map_err(channel_err)?;
    }
    Ok(w.written())
}

/// Wait for the first `want` answers; no new one for `timeout` fails.
fn wait_answers(a: &Answers, want: u64, timeout: Duration) -> Result<()> {
    let mut st = a.state.lock().unwrap();
    let (mut seen, mut since) = (st.count, Instant::now());
    loop {
        // Answers counted before the receiver hung up still count.
        if st.count >= want {
            return Ok(());
        }
        if let Some(e) = &st.error {
            return Err(e.clone());
        }
        if st.closed {
            return Err(Error::new(libc::ECONNRESET, "the receiver closed the channel"));
        }
        if st.count != seen {
            (seen, since) = (st.count, Instant::now());
        } else if since.elapsed() >= timeout {
            return Err(Error::new(
                libc::ETIMEDOUT,
                format!("the receiver did not answer for {} s (timed out)", timeout.as_secs_f64()),
            ));
        }
        let left = timeout.saturating_sub(since.elapsed()).min(Duration::from_secs(1));
        st = a.cv.wait_timeout(st, left.max(Duration::from_millis(1))).unwrap().0;
    }
}

/// One answer; a channel timeout while idle is waited out (the writer
/// bounds how long an owed answer may take), until the copy is over.
fn next_answer(r: &mut dyn Read, a: &Answers) -> Option<Result<i32>> {
    let mut b = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut b[got..]) {
            Ok(0) => return Some(Err(answer_err(std::io::ErrorKind::UnexpectedEof.into()))),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if super::channel::timed_out(&e) => {
                if a.state.lock().unwrap().done {
                    return None;
                }
            }
            Err(e) => return Some(Err(answer_err(e))),
        }
    }
    Some(Ok(i32::from_le_bytes(b)))
}

fn read_answers(mut r: Box<dyn Read + Send>, a: &Answers) {
    loop {
        let Some(outcome) = next_answer(r.as_mut(), a) else { return };
        let mut st = a.state.lock().unwrap();
        match outcome {
            Ok(0) => st.count += 1,
            Ok(s) => {
                let errno = if s < 0 { -s } else { libc::EPROTO };
                st.error = Some(Error::new(errno, format!("the receiver failed: {}", std::io::Error::from_raw_os_error(errno))));
            }
            Err(e) => {
                st.closed = true;
                if st.error.is_none() {
                    st.error = Some(e);
                }
            }
        }
        let stop = st.error.is_some() || st.closed;
        drop(st);
        a.cv.notify_all();
        if stop {
            return;
        }
    }
}
