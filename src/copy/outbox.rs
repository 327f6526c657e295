//! The sending side's threads: a writer that puts packets on the channel,
//! hashers that checksum payloads on the way, and (two-way) a reader that
//! counts the receiver's answers, so the rounds reading the disk never wait
//! for the channel packet by packet. The rounds talk to them through an
//! [`Outbox`].

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::cell::{Cell, RefCell};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

use super::wire::{cmd, Kind, Writer};
use crate::error::{Error, Result};
use crate::io::{AlignedBuf, BufPool};

pub(super) fn channel_err(e: std::io::Error) -> Error {
    if super::channel::timed_out(&e) {
        return Error::new(libc::ETIMEDOUT, format!("writing the copy stream: {e}"));
    }
    Error::io(e, "writing the copy stream")
}

pub(super) fn read_status(r: &mut dyn Read) -> Result<i32> {
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
pub(super) struct Outbox {
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
    /// How the writer ended, once it has.
    failed: Arc<WriterEnd>,
    /// Set when the copy failed: the stream must end without FINISH.
    abandoned: Arc<AtomicBool>,
    answers: Option<Arc<Answers>>,
    /// Set when the stream is written on the caller's thread instead.
    inline: Option<Inline>,
}

impl Outbox {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        writer: Writer<Box<dyn Write + Send>>,
        replies: Option<Box<dyn Read + Send>>,
        two_way: bool,
        cluster: usize,
        depth: usize,
        timeout: Duration,
        inline: bool,
    ) -> Outbox {
        let bufs = Arc::new(BufPool::new(cluster, depth * 4));
        if inline {
            return Outbox {
                data_tx: None,
                tx: None,
                writer: None,
                hashers: Vec::new(),
                reader: None,
                bufs,
                queued: std::cell::Cell::new(0),
                failed: Arc::new(WriterEnd::default()),
                abandoned: Arc::new(AtomicBool::new(false)),
                answers: None,
                inline: Some(Inline {
                    w: RefCell::new(writer),
                    replies: RefCell::new(replies.filter(|_| two_way)),
                    asked: Cell::new(0),
                    answered: Cell::new(0),
                    failed: RefCell::new(None),
                }),
            };
        }
        let (tx, rx) = sync_channel::<Msg>(depth * 2);
        let answers = (two_way && replies.is_some()).then(|| Arc::new(Answers::default()));
        let reader = match (replies, &answers) {
            (Some(r), Some(a)) => {
                let a = a.clone();
                Some(std::thread::spawn(move || read_answers(r, &a)))
            }
            _ => None,
        };
        let failed = Arc::new(WriterEnd::default());
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
                failed2.ended(r.as_ref().err());
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
            inline: None,
        }
    }

    pub(super) fn buf(&self) -> AlignedBuf {
        self.bufs.get()
    }

    pub(super) fn recycle(&self, buf: AlignedBuf) {
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

    /// Why a queue to the writer closed. The writer drops its queues as it
    /// returns, just before it records how it ended: wait for that record,
    /// so that the cause (a receiver that timed out) is what is reported,
    /// not its echo.
    fn error(&self) -> Error {
        self.failed.wait(Duration::from_secs(5)).unwrap_or_else(|| Error::new(libc::EPIPE, "the copy stream stopped"))
    }

    pub(super) fn data(&self, pos: u64, buf: AlignedBuf, len: usize) -> Result<()> {
        self.data_by(pos, buf, len, None)
    }

    pub(super) fn data_by(&self, pos: u64, buf: AlignedBuf, len: usize, deadline: Option<Instant>) -> Result<()> {
        if let Some(inline) = &self.inline {
            let r = inline.data(pos, &buf[..len]);
            self.bufs.put(buf);
            return r;
        }
        let tx = self.data_tx.as_ref().expect("open until finish");
        self.put(tx, Msg::Data { pos, buf, len, digest: None }, deadline)?;
        self.queued.set(self.queued.get() + 1);
        Ok(())
    }

    /// A SYNC command, and wait until the receiver answered everything.
    pub(super) fn sync(&self) -> Result<()> {
        if let Some(inline) = &self.inline {
            return inline.sync();
        }
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

    pub(super) fn written_by(&self, deadline: Option<Instant>) -> Result<()> {
        if let Some(inline) = &self.inline {
            return inline.run(|w| w.flush().map_err(channel_err));
        }
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
    pub(super) fn finish(mut self) -> Result<u64> {
        if let Some(inline) = self.inline.take() {
            return inline.finish();
        }
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
    pub(super) fn abandon(mut self) {
        self.abandoned.store(true, Ordering::Release);
        self.close_queues();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// The stream written on the caller's thread (`SendOptions::inline`):
/// each packet is checksummed and written as it is queued, and the
/// receiver's answers are read where they are waited for.
struct Inline {
    w: RefCell<Writer<Box<dyn Write + Send>>>,
    /// The answers' channel, two-way only.
    replies: RefCell<Option<Box<dyn Read + Send>>>,
    /// Packets the receiver answers, sent and answered so far.
    asked: Cell<u64>,
    answered: Cell<u64>,
    /// The first failure: the stream is broken from there on.
    failed: RefCell<Option<Error>>,
}

impl Inline {
    fn run(&self, f: impl FnOnce(&mut Writer<Box<dyn Write + Send>>) -> Result<()>) -> Result<()> {
        if let Some(e) = &*self.failed.borrow() {
            return Err(e.clone());
        }
        let r = f(&mut self.w.borrow_mut());
        if let Err(e) = &r {
            *self.failed.borrow_mut() = Some(e.clone());
        }
        r
    }

    fn data(&self, pos: u64, payload: &[u8]) -> Result<()> {
        self.run(|w| {
            w.packet_with_digest(Kind::DataDevice, pos, payload, None).map_err(channel_err)?;
            self.asked.set(self.asked.get() + 1);
            Ok(())
        })
    }

    fn sync(&self) -> Result<()> {
        self.run(|w| {
            w.command(cmd::SYNC, 0, &[]).map_err(channel_err)?;
            self.asked.set(self.asked.get() + 1);
            w.flush().map_err(channel_err)?;
            self.wait_answers()
        })
    }

    /// Read answers until every packet sent is answered.
    fn wait_answers(&self) -> Result<()> {
        let mut replies = self.replies.borrow_mut();
        let Some(r) = replies.as_mut() else { return Ok(()) };
        while self.answered.get() < self.asked.get() {
            match read_status(r.as_mut())? {
                0 => self.answered.set(self.answered.get() + 1),
                s => {
                    let errno = if s < 0 { -s } else { libc::EPROTO };
                    return Err(Error::new(errno, format!("the receiver failed: {}", std::io::Error::from_raw_os_error(errno))));
                }
            }
        }
        Ok(())
    }

    /// End the stream as the writer thread does.
    fn finish(self) -> Result<u64> {
        let two_way = self.replies.borrow().is_some();
        self.run(|w| {
            if two_way {
                w.command(cmd::UMOUNT, 0, &[]).map_err(channel_err)?;
                w.finish(false).map_err(channel_err)?;
                self.asked.set(self.asked.get() + 2);
                self.wait_answers()
            } else {
                w.finish(true).map_err(channel_err)
            }
        })?;
        Ok(self.w.borrow().written())
    }
}

/// The writer's end: whether it has ended, and its error if it failed.
#[derive(Default)]
struct WriterEnd {
    state: Mutex<(bool, Option<Error>)>,
    cv: std::sync::Condvar,
}

impl WriterEnd {
    fn ended(&self, error: Option<&Error>) {
        *self.state.lock().unwrap() = (true, error.cloned());
        self.cv.notify_all();
    }

    /// The writer's error, waiting at most `limit` for it to end.
    fn wait(&self, limit: Duration) -> Option<Error> {
        let state = self.state.lock().unwrap();
        let (state, _) = self.cv.wait_timeout_while(state, limit, |(ended, _)| !*ended).unwrap();
        state.1.clone()
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
