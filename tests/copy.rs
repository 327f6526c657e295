//! The write tracker and the live copy, against real files: the tracker
//! never misses a write that completed before a drain; a copy taken while
//! writers run equals the source once the writers stop at the freeze (as a
//! filesystem freeze stops them); two-way streams over a socket; cut and
//! damaged streams are refused without leaving an image behind; an
//! incremental stream brings a backup up to date. `qemu-img check` and
//! `qemu-img compare` are the oracles where qemu-img is present.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bitvec::vec::BitVec;
use common::{have_qemu, qemu_check_clean, qemu_compare_raw, send_to_vec, Rng, TempDir, VecSink};
use ublk_ploop::copy::{self, End, FsFreeze, NoFs, ReceiveOptions, SendOptions};
use ublk_ploop::io::{block_on, Direct, OwnRing, SyncIo};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::tracker::Tracker;
use ublk_ploop::{Error, Stack, StackOptions};

const CLUSTER: u64 = 64 << 10;

/// Open a stack; a lock still held for an instant by a child another test
/// thread is spawning (qemu-img) is waited out.
fn open(paths: &[PathBuf], read_only: bool) -> Stack {
    common::open_stack(paths, read_only)
}

fn new_image(path: &Path, size: u64) -> Stack {
    block_on(PloopLayer::create(&SyncIo, path, size, CLUSTER)).unwrap();
    open(&[path.to_path_buf()], false)
}

fn read_all(stack: &Stack) -> Vec<u8> {
    let mut buf = vec![0u8; stack.size() as usize];
    block_on(stack.read(&SyncIo, 0, &mut buf)).unwrap();
    buf
}

fn image_bytes(path: &Path) -> Vec<u8> {
    let s = open(&[path.to_path_buf()], true);
    read_all(&s)
}

/// A two-way receiver into `dest` on a thread of its own, answering over
/// its end of the socket.
fn two_way_receiver(theirs: UnixStream, dest: PathBuf) -> std::thread::JoinHandle<Result<copy::Received, Error>> {
    std::thread::spawn(move || {
        let opts = ReceiveOptions { two_way: true, incremental: false, direct: Direct::Auto };
        copy::receive(Box::new(theirs.try_clone().unwrap()), Some(Box::new(theirs)), &dest, &opts)
    })
}

fn receive_bytes(stream: &[u8], dest: &Path, incremental: bool) -> Result<copy::Received, Error> {
    let opts = ReceiveOptions { two_way: false, incremental, direct: Direct::Auto };
    copy::receive(Box::new(std::io::Cursor::new(stream.to_vec())), None, dest, &opts)
}

fn oracle(image: &Path, expect: &[u8], dir: &TempDir) {
    if !have_qemu() {
        return;
    }
    qemu_check_clean(image);
    let raw = dir.join("expect.raw");
    std::fs::write(&raw, expect).unwrap();
    qemu_compare_raw(image, &raw);
}

/// Writers on threads, a drainer calling `drain` at random moments: every
/// write that completed before a drain started is in that drain or an
/// earlier one.
#[test]
fn tracker_never_misses_a_completed_write() {
    for seed in 0..6u64 {
        let dir = TempDir::new(&format!("track-{seed}"));
        let size = 64 * CLUSTER;
        let stack = new_image(&dir.join("a.img"), size);
        let tracker = Arc::new(Tracker::new(size, CLUSTER));
        block_on(stack.add_tracker(tracker.clone())).unwrap();
        let completed = Mutex::new(BTreeSet::new());
        let stop = AtomicBool::new(false);
        let drained = Mutex::new(BTreeSet::new());
        let checks = AtomicU64::new(0);
        std::thread::scope(|s| {
            for w in 0..3u64 {
                let (stack, completed, stop) = (&stack, &completed, &stop);
                s.spawn(move || {
                    let mut rng = Rng::new(seed * 10 + w);
                    let buf = vec![w as u8 + 1; 4096];
                    for _ in 0..300 {
                        let c = rng.below(64);
                        let off = c * CLUSTER + rng.below(CLUSTER / 4096) * 4096;
                        match rng.below(3) {
                            0 => block_on(stack.write_zeroes(&SyncIo, off, 4096)).unwrap(),
                            // A discard where the top holds nothing changes
                            // nothing and is not marked: not in the model.
                            1 => {
                                block_on(stack.discard(&SyncIo, off, 4096)).unwrap();
                                continue;
                            }
                            _ => block_on(stack.write(&SyncIo, off, &buf)).unwrap(),
                        }
                        completed.lock().unwrap().insert(c);
                    }
                    stop.store(true, Ordering::Relaxed);
                });
            }
            s.spawn(|| {
                let mut rng = Rng::new(seed + 100);
                loop {
                    let before: BTreeSet<u64> = completed.lock().unwrap().clone();
                    let set = tracker.drain();
                    let mut all = drained.lock().unwrap();
                    all.extend(set.iter_ones().map(|c| c as u64));
                    for c in &before {
                        assert!(all.contains(c), "seed {seed}: cluster {c} completed before a drain but was never drained");
                    }
                    checks.fetch_add(1, Ordering::Relaxed);
                    drop(all);
                    if stop.load(Ordering::Relaxed) && checks.load(Ordering::Relaxed) > 3 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(rng.below(2000)));
                }
            });
        });
        let mut all = drained.into_inner().unwrap();
        all.extend(tracker.drain().iter_ones().map(|c| c as u64));
        for c in completed.into_inner().unwrap() {
            assert!(all.contains(&c), "seed {seed}: cluster {c} never drained");
        }
        assert!(block_on(stack.remove_tracker(&tracker)));
        block_on(stack.close(&SyncIo)).unwrap();
    }
}

/// A filesystem freeze stand-in: stops the writers and waits until their
/// writes in flight completed.
struct StopWriters<'a> {
    stop: &'a AtomicBool,
    busy: &'a AtomicU64,
    froze: bool,
}

impl FsFreeze for StopWriters<'_> {
    fn freeze(&mut self) -> ublk_ploop::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        while self.busy.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
        self.froze = true;
        Ok(())
    }
    fn thaw(&mut self) -> ublk_ploop::Result<()> {
        Ok(())
    }
}

#[test]
fn live_copy_under_writes_equals_the_source_at_the_freeze() {
    for seed in 0..4u64 {
        let dir = TempDir::new(&format!("live-{seed}"));
        let size = 96 * CLUSTER;
        let base = dir.join("base.img");
        let top = dir.join("top.img");
        {
            let s = new_image(&base, size);
            let mut rng = Rng::new(seed);
            // Half the clusters hold data below; a few are zeros on purpose.
            for c in (0..96).step_by(2) {
                let data = if c % 10 == 0 { vec![0u8; CLUSTER as usize] } else { rng.bytes(CLUSTER as usize) };
                block_on(s.write(&SyncIo, c * CLUSTER, &data)).unwrap();
            }
            block_on(s.close(&SyncIo)).unwrap();
        }
        block_on(PloopLayer::create(&SyncIo, &top, size, CLUSTER)).unwrap();
        let stack = open(&[base, top], false);
        let stop = AtomicBool::new(false);
        let busy = AtomicU64::new(0);
        let (stream, sent) = std::thread::scope(|s| {
            for w in 0..2u64 {
                let (stack, stop, busy) = (&stack, &stop, &busy);
                s.spawn(move || {
                    let mut rng = Rng::new(seed * 7 + w);
                    loop {
                        busy.fetch_add(1, Ordering::SeqCst);
                        if stop.load(Ordering::SeqCst) {
                            busy.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                        let off = rng.below(size / 4096) * 4096;
                        let n = 4096 * (1 + rng.below(3) as usize);
                        let data = rng.bytes(n);
                        let len = data.len().min((size - off) as usize);
                        block_on(stack.write(&SyncIo, off, &data[..len])).unwrap();
                        busy.fetch_sub(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut fs = StopWriters { stop: &stop, busy: &busy, froze: false };
            let out = send_to_vec(&stack, &mut fs, SendOptions { max_rounds: 4, in_flight: 4, ..Default::default() });
            assert!(fs.froze);
            out
        });
        assert!(sent.rounds.len() >= 2, "seed {seed}: a first round and a frozen one at least: {sent:?}");
        assert!(sent.rounds.last().unwrap().frozen);
        assert!(sent.frozen_ms >= 0.0);
        let expect = read_all(&stack);
        let dest = dir.join("copy.img");
        let got = receive_bytes(&stream, &dest, false).unwrap();
        assert_eq!(got.kind, "device");
        assert_eq!(got.disk_size, size);
        assert!(got.md5);
        common::assert_bytes_equal(&image_bytes(&dest), &expect, &format!("seed {seed}: copy vs source"));
        oracle(&dest, &expect, &dir);
        // Zero clusters of the first round were skipped, so the copy holds
        // fewer clusters than the source shows allocated.
        assert!(sent.rounds[0].sent < sent.rounds[0].clusters || seed > 0, "zeros skipped: {:?}", sent.rounds[0]);
        block_on(stack.close(&SyncIo)).unwrap();
    }
}

#[test]
fn copy_with_stop_closes_the_stack() {
    let dir = TempDir::new("copy-stop");
    let size = 16 * CLUSTER;
    let stack = new_image(&dir.join("a.img"), size);
    block_on(stack.write(&SyncIo, CLUSTER, &vec![7u8; 8192])).unwrap();
    let (stream, sent) = send_to_vec(&stack, &mut NoFs, SendOptions { end: End::Stop, ..Default::default() });
    assert!(sent.stopped);
    let e = block_on(stack.write(&SyncIo, 0, &[1u8; 4096])).unwrap_err();
    assert_eq!(e.errno(), libc::ESHUTDOWN);
    drop(stack);
    // Closed cleanly: opens without complaint.
    let paths = [dir.join("a.img")];
    let (reopened, reports) = common::retry_busy(|| block_on(Stack::open(&SyncIo, &paths, &StackOptions { read_only: false, direct: Direct::Auto, offline: false, link_log: None }))).unwrap();
    assert!(!reports[0].was_in_use);
    block_on(reopened.close(&SyncIo)).unwrap();
    drop(reopened);
    let dest = dir.join("b.img");
    receive_bytes(&stream, &dest, false).unwrap();
    assert_eq!(image_bytes(&dest), image_bytes(&dir.join("a.img")));
}

#[test]
fn cut_or_damaged_streams_leave_nothing() {
    let dir = TempDir::new("copy-damage");
    let size = 8 * CLUSTER;
    let stack = new_image(&dir.join("a.img"), size);
    let mut rng = Rng::new(5);
    block_on(stack.write(&SyncIo, 0, &rng.bytes(3 * CLUSTER as usize))).unwrap();
    let (stream, _) = send_to_vec(&stack, &mut NoFs, SendOptions::default());
    let dest = dir.join("b.img");
    let mut cuts: Vec<usize> = vec![0, 10, 24, 40, stream.len() / 3, stream.len() / 2, stream.len() - 30, stream.len() - 1];
    for _ in 0..20 {
        cuts.push(rng.below(stream.len() as u64) as usize);
    }
    for cut in cuts {
        let e = receive_bytes(&stream[..cut], &dest, false).unwrap_err();
        assert_eq!(e.errno(), libc::EBADMSG, "cut at {cut}: {e}");
        assert!(!dest.exists() && !dir.join("b.img.partial").exists(), "cut at {cut} left a file");
    }
    for _ in 0..60 {
        let mut bad = stream.clone();
        let i = rng.below(bad.len() as u64) as usize;
        bad[i] ^= 1 << rng.below(8);
        let e = receive_bytes(&bad, &dest, false).unwrap_err();
        assert!([libc::EBADMSG, libc::EINVAL, libc::EOPNOTSUPP].contains(&e.errno()), "flip at {i}: {e}");
        assert!(!dest.exists() && !dir.join("b.img.partial").exists(), "flip at {i} left a file");
    }
    // Not overwriting an existing image.
    std::fs::write(&dest, b"precious").unwrap();
    let e = receive_bytes(&stream, &dest, false).unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);
    assert_eq!(std::fs::read(&dest).unwrap(), b"precious");
    block_on(stack.close(&SyncIo)).unwrap();
}

/// Two-way: the receiver answers every packet over a socket, as ploop's.
#[test]
fn two_way_over_a_socket_and_a_refusing_receiver() {
    let dir = TempDir::new("copy-2way");
    let size = 12 * CLUSTER + 4096;
    let stack = new_image(&dir.join("a.img"), size);
    let mut rng = Rng::new(9);
    block_on(stack.write(&SyncIo, 0, &rng.bytes(size as usize))).unwrap();
    let dest = dir.join("b.img");
    let (ours, theirs) = UnixStream::pair().unwrap();
    let dest2 = dest.clone();
    let receiver = two_way_receiver(theirs, dest2);
    let ring = OwnRing::new(64).unwrap();
    let sent = ring
        .block_on(copy::send(&ring.io(), &stack, Box::new(ours.try_clone().unwrap()), Some(Box::new(ours)), &mut NoFs, SendOptions { two_way: true, ..Default::default() }, &|_, _, _| {}))
        .unwrap();
    let got = receiver.join().unwrap().unwrap();
    assert!(sent.md5 && got.md5);
    assert_eq!(got.disk_size, size);
    let expect = read_all(&stack);
    assert_eq!(image_bytes(&dest), expect);
    oracle(&dest, &expect, &dir);

    // A receiver that refuses (the destination exists) fails the sender.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let receiver = two_way_receiver(theirs, dest);
    assert_eq!(receiver.join().unwrap().unwrap_err().errno(), libc::EEXIST);
    let e = ring
        .block_on(copy::send(&ring.io(), &stack, Box::new(ours.try_clone().unwrap()), Some(Box::new(ours)), &mut NoFs, SendOptions { two_way: true, ..Default::default() }, &|_, _, _| {}))
        .unwrap_err();
    assert!([libc::ECONNRESET, libc::EPIPE, libc::EEXIST].contains(&e.errno()), "{e}");
    // No tracker left behind, the stack serves on.
    block_on(stack.write(&SyncIo, 0, &[3u8; 4096])).unwrap();
    block_on(stack.close(&SyncIo)).unwrap();
}

/// The inline outbox (no helper threads: what a single-threaded
/// simulation runs) sends what the threaded one does: a full and an
/// incremental one-way stream on SyncIo and this thread alone, and a
/// two-way copy whose answers are read where they are waited for.
#[test]
fn inline_copy_on_the_callers_thread_sends_the_same_disk() {
    let dir = TempDir::new("copy-inline");
    let size = 16 * CLUSTER + 4096;
    let stack = new_image(&dir.join("a.img"), size);
    let mut rng = Rng::new(21);
    block_on(stack.write(&SyncIo, 0, &rng.bytes(6 * CLUSTER as usize))).unwrap();
    let cbt = Arc::new(Tracker::new(size, CLUSTER));
    block_on(stack.add_tracker(cbt.clone())).unwrap();
    let send_inline = |opts: SendOptions| {
        let (sink, bytes) = VecSink::new();
        block_on(copy::send(&SyncIo, &stack, Box::new(sink), None, &mut NoFs, SendOptions { inline: true, ..opts }, &|_, _, _| {})).unwrap();
        let bytes = bytes.lock().unwrap().clone();
        bytes
    };
    let full = send_inline(SendOptions { cbt: Some(cbt.clone()), ..Default::default() });
    let backup = dir.join("backup.img");
    receive_bytes(&full, &backup, false).unwrap();
    assert_eq!(image_bytes(&backup), read_all(&stack));
    block_on(stack.write(&SyncIo, 9 * CLUSTER, &rng.bytes(8192))).unwrap();
    block_on(stack.write_zeroes(&SyncIo, 2 * CLUSTER, CLUSTER as usize)).unwrap();
    let incr = send_inline(SendOptions { incremental: true, cbt: Some(cbt.clone()), ..Default::default() });
    assert_eq!(receive_bytes(&incr, &backup, true).unwrap().applied_clusters, 2);
    assert_eq!(image_bytes(&backup), read_all(&stack));
    assert_eq!(cbt.dirty_count(), 0, "sent: the record starts again");
    block_on(stack.remove_tracker(&cbt));

    let dest = dir.join("b.img");
    let (ours, theirs) = UnixStream::pair().unwrap();
    let dest2 = dest.clone();
    let receiver = two_way_receiver(theirs, dest2);
    let opts = SendOptions { two_way: true, inline: true, ..Default::default() };
    let sent = block_on(copy::send(&SyncIo, &stack, Box::new(ours.try_clone().unwrap()), Some(Box::new(ours)), &mut NoFs, opts, &|_, _, _| {})).unwrap();
    let got = receiver.join().unwrap().unwrap();
    assert!(sent.md5 && got.md5);
    assert_eq!(image_bytes(&dest), read_all(&stack));
    block_on(stack.close(&SyncIo)).unwrap();
}

#[test]
fn incremental_stream_brings_a_backup_up_to_date() {
    let dir = TempDir::new("copy-incr");
    let size = 32 * CLUSTER;
    let stack = new_image(&dir.join("a.img"), size);
    let mut rng = Rng::new(11);
    block_on(stack.write(&SyncIo, 0, &rng.bytes(20 * CLUSTER as usize))).unwrap();
    // Changes since the full backup are tracked from before it starts; the
    // backup clears the record at its frozen point.
    let cbt = Arc::new(Tracker::new(size, CLUSTER));
    block_on(stack.add_tracker(cbt.clone())).unwrap();
    block_on(stack.write(&SyncIo, 25 * CLUSTER, &[4u8; 4096])).unwrap();
    let (full, _) = send_to_vec(&stack, &mut NoFs, SendOptions { cbt: Some(cbt.clone()), ..Default::default() });
    assert_eq!(cbt.dirty_count(), 0);
    let backup = dir.join("backup.img");
    receive_bytes(&full, &backup, false).unwrap();

    block_on(stack.write(&SyncIo, 3 * CLUSTER + 4096, &rng.bytes(8192))).unwrap();
    block_on(stack.write_zeroes(&SyncIo, 10 * CLUSTER, CLUSTER as usize)).unwrap();
    block_on(stack.write(&SyncIo, 30 * CLUSTER, &rng.bytes(CLUSTER as usize))).unwrap();
    let changed: BitVec = cbt.peek();
    assert_eq!(changed.iter_ones().collect::<Vec<_>>(), vec![3, 10, 30]);
    let (incr, sent) = send_to_vec(&stack, &mut NoFs, SendOptions { incremental: true, cbt: Some(cbt.clone()), ..Default::default() });
    assert_eq!(sent.rounds[0].sent, 3, "only the changed clusters, zeroed one included");
    assert_eq!(cbt.dirty_count(), 0, "sent: the record starts again");
    assert!(incr.len() < full.len() / 4);
    // A cut incremental stream leaves the backup as it was.
    let before = std::fs::read(&backup).unwrap();
    assert!(receive_bytes(&incr[..incr.len() - 10], &backup, true).is_err());
    assert_eq!(std::fs::read(&backup).unwrap(), before);
    let got = receive_bytes(&incr, &backup, true).unwrap();
    assert_eq!(got.applied_clusters, 3);
    let expect = read_all(&stack);
    assert_eq!(image_bytes(&backup), expect);
    oracle(&backup, &expect, &dir);
    // A stream for another disk does not apply.
    let other = new_image(&dir.join("other.img"), size * 2);
    let (wrong, _) = send_to_vec(&other, &mut NoFs, SendOptions::default());
    assert_eq!(receive_bytes(&wrong, &backup, true).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(image_bytes(&backup), expect);
    block_on(stack.close(&SyncIo)).unwrap();
    block_on(other.close(&SyncIo)).unwrap();
}

/// A channel into memory that, at the copy's first write to it (the
/// handshake, before the copy has attached its own tracker), has a write
/// land on the disk and complete before the copy goes on; with
/// `fail_at_finish`, the write of the stream's last packet fails.
struct Channel {
    sink: Arc<Mutex<Vec<u8>>>,
    inject: Option<(std::sync::mpsc::SyncSender<()>, std::sync::mpsc::Receiver<()>)>,
    fail_at_finish: bool,
}

impl Write for Channel {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Some((go, done)) = self.inject.take() {
            go.send(()).unwrap();
            done.recv().unwrap();
        }
        let finish = [&copy::wire::cmd::FINISH.to_le_bytes()[..], copy::wire::TRAILER_MAGIC].concat();
        if self.fail_at_finish && b.starts_with(&finish) {
            return Err(std::io::Error::from_raw_os_error(libc::EPIPE));
        }
        self.sink.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An incremental backup as the daemon runs it: the record of changes
/// (changed-block tracking) is attached to the stack, the copy is asked to
/// send what it marked. A write that completes after the copy started but
/// before it attached its own tracker (here: during the handshake) must be
/// in this backup, and the frozen point, which clears the record, must not
/// lose it for every later one. A copy that peeked the record before the
/// handshake (as the daemon used to) sends neither.
#[test]
fn incremental_backup_misses_no_write_that_lands_as_it_starts() {
    let dir = TempDir::new("copy-incr-race");
    let size = 32 * CLUSTER;
    let stack = new_image(&dir.join("a.img"), size);
    let mut rng = Rng::new(21);
    block_on(stack.write(&SyncIo, 0, &rng.bytes(16 * CLUSTER as usize))).unwrap();
    let cbt = Arc::new(Tracker::new(size, CLUSTER));
    block_on(stack.add_tracker(cbt.clone())).unwrap();

    // Without the record an incremental copy is refused, not sent whole.
    let ring = OwnRing::new(64).unwrap();
    let sink = Arc::new(Mutex::new(Vec::new()));
    let channel = Channel { sink: sink.clone(), inject: None, fail_at_finish: false };
    let e = ring
        .block_on(copy::send(&ring.io(), &stack, Box::new(channel), None, &mut NoFs, SendOptions { incremental: true, ..Default::default() }, &|_, _, _| {}))
        .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(sink.lock().unwrap().is_empty());

    let backup_opts = |incremental| SendOptions { incremental, cbt: Some(cbt.clone()), ..Default::default() };
    // Copy with a write injected at the handshake; returns the stream.
    let send_racing = |opts: SendOptions, at: u64, data: &[u8], fail_at_finish: bool| -> Result<Vec<u8>, Error> {
        let sink = Arc::new(Mutex::new(Vec::new()));
        let (go_tx, go_rx) = std::sync::mpsc::sync_channel(1);
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let channel = Channel { sink: sink.clone(), inject: Some((go_tx, done_rx)), fail_at_finish };
        let stack = &stack;
        std::thread::scope(|s| {
            s.spawn(move || {
                if go_rx.recv().is_ok() {
                    block_on(stack.write(&SyncIo, at, data)).unwrap();
                    done_tx.send(()).unwrap();
                }
            });
            let ring = OwnRing::new(64).unwrap();
            ring.block_on(copy::send(&ring.io(), stack, Box::new(channel), None, &mut NoFs, opts, &|_, _, _| {}))
        })?;
        let bytes = sink.lock().unwrap().clone();
        Ok(bytes)
    };

    // The full backup; a write lands as it starts (in the first round's
    // read of the live disk, or in its tracker).
    let full = send_racing(backup_opts(false), 20 * CLUSTER, &rng.bytes(4096), false).unwrap();
    let backup = dir.join("backup.img");
    receive_bytes(&full, &backup, false).unwrap();
    let expect = read_all(&stack);
    common::assert_bytes_equal(&image_bytes(&backup), &expect, "full backup vs source");

    // An incremental one: a change before it, and one that lands as it
    // starts.
    block_on(stack.write(&SyncIo, 3 * CLUSTER, &rng.bytes(8192))).unwrap();
    let incr = send_racing(backup_opts(true), 7 * CLUSTER + 4096, &rng.bytes(4096), false).unwrap();
    receive_bytes(&incr, &backup, true).unwrap();
    let expect = read_all(&stack);
    common::assert_bytes_equal(&image_bytes(&backup), &expect, "backup after the first incremental vs source");

    // A later incremental with a change of its own: everything still there.
    block_on(stack.write(&SyncIo, 12 * CLUSTER, &rng.bytes(4096))).unwrap();
    let incr = send_racing(backup_opts(true), 30 * CLUSTER, &rng.bytes(4096), false).unwrap();
    receive_bytes(&incr, &backup, true).unwrap();
    let expect = read_all(&stack);
    common::assert_bytes_equal(&image_bytes(&backup), &expect, "backup after the second incremental vs source");
    assert_eq!(cbt.dirty_count(), 0);

    // An incremental that fails after its frozen point (the channel breaks
    // at the stream's last packet) gives the record back: the next one
    // sends what it could not.
    block_on(stack.write(&SyncIo, 9 * CLUSTER, &rng.bytes(CLUSTER as usize))).unwrap();
    let e = send_racing(backup_opts(true), 15 * CLUSTER, &rng.bytes(4096), true).unwrap_err();
    assert_eq!(e.errno(), libc::EPIPE, "{e}");
    assert!(cbt.peek().iter_ones().collect::<BTreeSet<_>>().is_superset(&[9, 15].into()), "the record kept the unsent changes");
    let incr = send_racing(backup_opts(true), 28 * CLUSTER, &rng.bytes(4096), false).unwrap();
    receive_bytes(&incr, &backup, true).unwrap();
    let expect = read_all(&stack);
    common::assert_bytes_equal(&image_bytes(&backup), &expect, "backup after a failed incremental and the next vs source");
    oracle(&backup, &expect, &dir);
    block_on(stack.close(&SyncIo)).unwrap();
}

/// ploop 7 sends the bytes of its image file; receiving that makes the same
/// file.
#[test]
fn image_file_stream_makes_the_same_file() {
    use copy::wire::{cmd, Kind, Writer, FLAG_MD5};
    let dir = TempDir::new("copy-vstyle");
    let src = dir.join("a.img");
    {
        let s = new_image(&src, 8 * CLUSTER);
        block_on(s.write(&SyncIo, CLUSTER, &vec![9u8; CLUSTER as usize])).unwrap();
        block_on(s.close(&SyncIo)).unwrap();
    }
    let bytes = std::fs::read(&src).unwrap();
    let mut w = Writer::new(Vec::new());
    w.command(cmd::SYNC, FLAG_MD5, &[]).unwrap();
    w.set_md5(true);
    for (i, chunk) in bytes.chunks(CLUSTER as usize).enumerate() {
        w.packet(Kind::Data, i as u64 * CLUSTER, chunk).unwrap();
    }
    w.finish(true).unwrap();
    let stream = w.get_mut().clone();
    let dest = dir.join("b.img");
    let got = receive_bytes(&stream, &dest, false).unwrap();
    assert_eq!(got.kind, "image-file");
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    let mut r = vec![0u8; 4];
    std::fs::File::open(&dest).unwrap().read_exact(&mut r).unwrap();
}

fn header_u64(path: &Path, at: u64) -> u64 {
    common::read_u64(path, at)
}

fn our_check(path: &Path, repair: bool) -> ublk_ploop::layers::ploop::check::CheckReport {
    common::ploop_check(path, repair, "our check")
}

/// qemu-img 7.2 predates format-extension-aware checks: it may call the
/// extension leaked space (exit 3), never damage.
fn qemu_accepts(path: &Path) {
    if have_qemu() {
        let r = common::qemu_img(["check", "-f", "parallels", path.to_str().unwrap()]);
        assert!(r.code() == 0 || r.code() == 3, "qemu-img check: {}", r.code());
    }
}

#[test]
fn changed_blocks_survive_a_clean_close_only() {
    let dir = TempDir::new("cbt-keep");
    let img = dir.join("a.img");
    let size = 40 * CLUSTER;
    let stack = new_image(&img, size);
    block_on(stack.write(&SyncIo, 0, &vec![1u8; CLUSTER as usize])).unwrap();
    let cbt = Arc::new(Tracker::new(size, CLUSTER));
    block_on(stack.add_tracker(cbt.clone())).unwrap();
    stack.keep_on_close(Some((cbt.clone(), [0xAB; 16])));
    block_on(stack.write(&SyncIo, 2 * CLUSTER + 512, &[2u8; 4096])).unwrap();
    block_on(stack.write(&SyncIo, 33 * CLUSTER, &vec![3u8; 2 * CLUSTER as usize])).unwrap();
    let expect = read_all(&stack);
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    assert_ne!(header_u64(&img, 56), 0, "the extension is in the file");
    let r = our_check(&img, false);
    assert_eq!(r.verdict(), ublk_ploop::layers::ploop::check::Verdict::Clean, "{r:?}");
    assert_eq!((r.extension_clusters, r.dirty_bitmaps), (Some(2), Some(1)), "{r:?}");
    qemu_accepts(&img);
    // Read-only opens leave it alone.
    assert_eq!(image_bytes(&img), expect);
    assert_ne!(header_u64(&img, 56), 0);

    // A read-write open takes it: the bitmap is in memory, not in the file.
    let stack = open(std::slice::from_ref(&img), false);
    let saved = block_on(stack.take_saved_bitmaps());
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].id, [0xAB; 16]);
    assert_eq!(saved[0].granularity, CLUSTER);
    assert_eq!(saved[0].bits.iter_ones().collect::<Vec<_>>(), vec![2, 33, 34]);
    assert_eq!(header_u64(&img, 56), 0, "dropped from the header");
    assert_eq!(read_all(&stack), expect);
    // Killed now (never closed): the record is lost.
    drop(stack);
    let stack = open(std::slice::from_ref(&img), false);
    assert!(block_on(stack.take_saved_bitmaps()).is_empty());
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let r = our_check(&img, false);
    assert_eq!(r.verdict(), ublk_ploop::layers::ploop::check::Verdict::Clean, "{r:?}");
    if have_qemu() {
        qemu_check_clean(&img);
    }
}

#[test]
fn check_keeps_a_sound_extension_and_drops_a_damaged_one() {
    let dir = TempDir::new("cbt-check");
    let img = dir.join("a.img");
    let size = 16 * CLUSTER;
    let stack = new_image(&img, size);
    let cbt = Arc::new(Tracker::new(size, CLUSTER));
    block_on(stack.add_tracker(cbt.clone())).unwrap();
    stack.keep_on_close(Some((cbt, [1; 16])));
    block_on(stack.write(&SyncIo, 3 * CLUSTER, &[9u8; 4096])).unwrap();
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    // A leaked cluster after the extension: repair cuts it, keeps the rest.
    let len = std::fs::metadata(&img).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![0x55u8; CLUSTER as usize], len).unwrap();
    drop(f);
    let r = our_check(&img, false);
    assert_eq!(r.leaked_clusters, 1, "{r:?}");
    let r = our_check(&img, true);
    assert_eq!(r.verdict(), ublk_ploop::layers::ploop::check::Verdict::Clean, "{r:?}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), len);
    assert_ne!(header_u64(&img, 56), 0, "repair kept the extension");
    let stack = open(std::slice::from_ref(&img), false);
    assert_eq!(block_on(stack.take_saved_bitmaps())[0].bits.iter_ones().collect::<Vec<_>>(), vec![3]);
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);

    // A damaged extension: reported; repair drops the pointer; a
    // read-write open drops it too (with a warning), never refuses.
    let stack = open(std::slice::from_ref(&img), false);
    let cbt = Arc::new(Tracker::new(size, CLUSTER));
    cbt.mark_all();
    stack.keep_on_close(Some((cbt, [2; 16])));
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let ext_at = header_u64(&img, 56) * 512;
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0xff], ext_at + 100).unwrap();
    drop(f);
    let r = our_check(&img, false);
    assert_eq!(r.verdict(), ublk_ploop::layers::ploop::check::Verdict::Corrupt, "{r:?}");
    assert!(r.header_errors[0].contains("format extension"), "{r:?}");
    let backup = dir.join("copy.img");
    std::fs::copy(&img, &backup).unwrap();
    let r = our_check(&img, true);
    assert!(r.repairs.iter().any(|x| x.contains("format extension dropped")), "{r:?}");
    assert_eq!(r.verdict(), ublk_ploop::layers::ploop::check::Verdict::Clean, "{r:?}");
    assert_eq!(header_u64(&img, 56), 0);
    if have_qemu() {
        qemu_check_clean(&img);
    }
    let stack = open(std::slice::from_ref(&backup), false);
    assert!(block_on(stack.take_saved_bitmaps()).is_empty());
    assert_eq!(read_all(&stack)[3 * CLUSTER as usize], 9);
    block_on(stack.close(&SyncIo)).unwrap();
}

/// An image as ploop (Virtuozzo) leaves it after a clean stop with CBT:
/// 64 KiB granularity, one L1 entry "all set", laid out by hand here from
/// the format description rather than by our encoder.
#[test]
fn reads_a_bitmap_laid_out_by_ploop() {
    use md5::{Digest, Md5};
    let dir = TempDir::new("cbt-vz");
    let img = dir.join("vz.hds");
    let size = 8 << 20;
    block_on(PloopLayer::create(&SyncIo, &img, size, 1 << 20)).unwrap();
    let mut bytes = std::fs::read(&img).unwrap();
    let cluster = 1usize << 20;
    let ext_at = bytes.len();
    let mut ext = vec![0u8; cluster];
    ext[..8].copy_from_slice(&0xAB23_4CEF_23DC_EA87u64.to_le_bytes());
    let mut rec = Vec::new();
    rec.extend_from_slice(&0x2038_5FAE_252C_B34Au64.to_le_bytes());
    rec.extend_from_slice(&0u64.to_le_bytes());
    rec.extend_from_slice(&(32u32 + 8).to_le_bytes());
    rec.extend_from_slice(&0u32.to_le_bytes());
    rec.extend_from_slice(&(size / 512).to_le_bytes());
    rec.extend_from_slice(&[0x42; 16]);
    rec.extend_from_slice(&128u32.to_le_bytes());
    rec.extend_from_slice(&1u32.to_le_bytes());
    rec.extend_from_slice(&1u64.to_le_bytes());
    ext[24..24 + rec.len()].copy_from_slice(&rec);
    let sum: [u8; 16] = Md5::digest(&ext[24..]).into();
    ext[8..24].copy_from_slice(&sum);
    bytes.extend_from_slice(&ext);
    bytes[56..64].copy_from_slice(&((ext_at / 512) as u64).to_le_bytes());
    bytes[44..48].copy_from_slice(&0x312E_3276u32.to_le_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let r = our_check(&img, false);
    assert_eq!(r.verdict(), ublk_ploop::layers::ploop::check::Verdict::Clean, "{r:?}");
    assert_eq!(r.extension_clusters, Some(1));
    qemu_accepts(&img);
    let r = our_check(&img, true);
    assert!(r.repairs.is_empty(), "{r:?}");
    assert_eq!(std::fs::read(&img).unwrap(), bytes, "a clean image is not touched by --repair");
    let stack = open(std::slice::from_ref(&img), false);
    let saved = block_on(stack.take_saved_bitmaps());
    assert_eq!(saved[0].granularity, 64 << 10);
    assert_eq!(saved[0].bits.count_ones(), 128, "all set");
    let t = Tracker::from_bits(size, saved[0].granularity, &saved[0].bits);
    assert_eq!(t.peek_at(1 << 20).count_ones(), 8);
    block_on(stack.close(&SyncIo)).unwrap();
}

/// A channel that breaks at once (the receiver is gone).
struct Broken;

impl Write for Broken {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::from_raw_os_error(libc::EPIPE))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A backup as the daemon runs it, its record chosen and published by
/// `BackupRecord`.
fn backup_with_record(stack: &Stack, record: &Mutex<Option<Arc<Tracker>>>, incremental: bool, out: Box<dyn Write + Send>) -> Result<copy::Sent, Error> {
    let current = record.lock().unwrap().clone();
    let r = block_on(copy::BackupRecord::start(stack, current.as_ref(), incremental))?;
    let opts = SendOptions { incremental, cbt: Some(r.tracker()), ..Default::default() };
    let ring = OwnRing::new(64).unwrap();
    let sent = ring.block_on(copy::send(&ring.io(), stack, out, None, &mut NoFs, opts, &|_, _, _| {}));
    ring.block_on(r.finish(stack, sent.is_ok(), record, [0x5A; 16]));
    sent
}

/// Without a record of changes an incremental backup is refused, not sent
/// as the allocated clusters: a cluster zeroed since the older backup would
/// keep its old bytes there. A full backup that fails leaves no record (one
/// covering only the changes since the failed attempt would let a later
/// incremental miss the earlier ones); one that succeeds leaves one, kept
/// across a clean close.
#[test]
fn a_backup_record_counts_only_from_a_successful_full_backup() {
    let dir = TempDir::new("cbt-publish");
    let img = dir.join("a.img");
    let size = 16 * CLUSTER;
    let stack = new_image(&img, size);
    block_on(stack.write(&SyncIo, 0, &vec![7u8; 4 * CLUSTER as usize])).unwrap();
    let record = Mutex::new(None);

    let e = backup_with_record(&stack, &record, true, Box::new(Broken)).unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT, "{e}");
    assert!(e.to_string().contains("full backup into a new destination"), "{e}");

    // A full backup whose receiver is gone: no record.
    let e = backup_with_record(&stack, &record, false, Box::new(Broken)).unwrap_err();
    assert_eq!(e.errno(), libc::EPIPE, "{e}");
    assert!(record.lock().unwrap().is_none(), "a failed full backup published its record");
    // A change the older (successful) backup does not have: a cluster
    // zeroed. An incremental now must not be sent.
    block_on(stack.write_zeroes(&SyncIo, CLUSTER, CLUSTER as usize)).unwrap();
    let e = backup_with_record(&stack, &record, true, Box::new(Broken)).unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT, "{e}");

    // A full backup that succeeds: the record is there, and kept.
    let sink = Arc::new(Mutex::new(Vec::new()));
    backup_with_record(&stack, &record, false, Box::new(Channel { sink: sink.clone(), inject: None, fail_at_finish: false })).unwrap();
    let backup = dir.join("backup.img");
    receive_bytes(&sink.lock().unwrap(), &backup, false).unwrap();
    let cbt = record.lock().unwrap().clone().expect("a successful full backup publishes its record");
    assert_eq!(cbt.dirty_count(), 0);
    block_on(stack.write(&SyncIo, 5 * CLUSTER, &[9u8; 4096])).unwrap();
    // A failed incremental keeps the record (and its marks).
    backup_with_record(&stack, &record, true, Box::new(Broken)).unwrap_err();
    assert!(Arc::ptr_eq(record.lock().unwrap().as_ref().unwrap(), &cbt));
    assert_eq!(cbt.peek().iter_ones().collect::<Vec<_>>(), vec![5]);
    let sink = Arc::new(Mutex::new(Vec::new()));
    backup_with_record(&stack, &record, true, Box::new(Channel { sink: sink.clone(), inject: None, fail_at_finish: false })).unwrap();
    receive_bytes(&sink.lock().unwrap(), &backup, true).unwrap();
    let expect = read_all(&stack);
    common::assert_bytes_equal(&image_bytes(&backup), &expect, "full + incremental backup vs source");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let stack = open(std::slice::from_ref(&img), false);
    let saved = block_on(stack.take_saved_bitmaps());
    assert_eq!(saved.iter().map(|b| b.id).collect::<Vec<_>>(), vec![[0x5A; 16]]);
    block_on(stack.close(&SyncIo)).unwrap();
}

/// After the frozen point the copy still sends; a stop then saves the
/// record as it stands. The marks the backup took must still be in it
/// until the stream is all out, and a write after the frozen point to a
/// cluster the backup took stays marked once it succeeded.
#[test]
fn the_record_keeps_what_a_backup_is_still_sending() {
    let dir = TempDir::new("cbt-pending");
    let size = 16 * CLUSTER;
    let stack = new_image(&dir.join("a.img"), size);
    block_on(stack.write(&SyncIo, 0, &vec![1u8; 8 * CLUSTER as usize])).unwrap();
    let cbt = Arc::new(Tracker::new(size, CLUSTER));
    block_on(stack.add_tracker(cbt.clone())).unwrap();
    block_on(stack.write(&SyncIo, 3 * CLUSTER, &[2u8; 4096])).unwrap();
    block_on(stack.write(&SyncIo, 10 * CLUSTER, &[3u8; 4096])).unwrap();

    /// At the thaw (after the frozen point, before the held clusters go
    /// out): what a stop would save, and a write landing then.
    struct AtThaw<'a> {
        cbt: Arc<Tracker>,
        stack: &'a Stack,
        seen: Option<Vec<usize>>,
    }
    impl FsFreeze for AtThaw<'_> {
        fn freeze(&mut self) -> ublk_ploop::Result<()> {
            Ok(())
        }
        fn thaw(&mut self) -> ublk_ploop::Result<()> {
            self.seen = Some(self.cbt.peek().iter_ones().collect());
            block_on(self.stack.write(&SyncIo, 3 * CLUSTER + 8192, &[4u8; 512]))
        }
    }
    let mut fs = AtThaw { cbt: cbt.clone(), stack: &stack, seen: None };
    send_to_vec(&stack, &mut fs, SendOptions { incremental: true, cbt: Some(cbt.clone()), ..Default::default() });
    assert_eq!(fs.seen, Some(vec![3, 10]), "the record a stop would save after the frozen point");
    assert_eq!(cbt.peek().iter_ones().collect::<Vec<_>>(), vec![3], "the write after the frozen point is the next backup's");
    block_on(stack.close(&SyncIo)).unwrap();
}
