//! A receiver that stops reading or answering must not hold a copy (and
//! with it a frozen filesystem and held requests) forever: the frozen last
//! pass gives up at its limit, thaws, and the stack serves on; every
//! channel read and write is bounded by the channel's timeout.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Rng, TempDir};
use ublk_ploop::copy::{self, FsFreeze, SendOptions, Timed};
use ublk_ploop::io::{block_on, OwnRing, SyncIo};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::Stack;

const CLUSTER: u64 = 64 << 10;

fn new_image(path: &Path, size: u64) -> Arc<Stack> {
    block_on(PloopLayer::create(&SyncIo, path, size, CLUSTER)).unwrap();
    Arc::new(common::open_stack(&[path.to_path_buf()], false))
}

/// A filesystem freeze stand-in: records when it froze and thawed; at the
/// freeze it writes `dirty` clusters (the filesystem's dirty state, which a
/// real freeze writes out) and tells the receiver to stop reading.
struct Recorder {
    stack: Arc<Stack>,
    dirty: u64,
    stall: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(&'static str, Instant)>>>,
}

impl FsFreeze for Recorder {
    fn freeze(&mut self) -> ublk_ploop::Result<()> {
        self.log.lock().unwrap().push(("freeze", Instant::now()));
        let (stack, n) = (self.stack.clone(), self.dirty);
        std::thread::spawn(move || block_on(stack.write(&SyncIo, 0, &vec![0x5a; (n * CLUSTER) as usize]))).join().unwrap()?;
        self.stall.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn thaw(&mut self) -> ublk_ploop::Result<()> {
        self.log.lock().unwrap().push(("thaw", Instant::now()));
        Ok(())
    }
}

/// Reads the stream until `stall`, then holds the channel open unread.
fn stalling_reader(mut theirs: UnixStream, stall: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        theirs.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        while !stall.load(Ordering::SeqCst) {
            match theirs.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return,
            }
        }
        // Hold the channel, read nothing, until the sender gives up.
        std::thread::sleep(Duration::from_secs(8));
    })
}

/// Run `send` on a thread of its own; the test fails rather than hang.
fn send_bounded(stack: Arc<Stack>, ours: UnixStream, two_way: bool, fs: Recorder, opts: SendOptions, limit: Duration) -> (ublk_ploop::Result<copy::Sent>, Duration) {
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let mut fs = fs;
        let ch = Timed::new(ours.into(), opts.timeout).unwrap();
        let replies: Option<Box<dyn Read + Send>> = two_way.then(|| Box::new(ch.clone()) as Box<dyn Read + Send>);
        let ring = OwnRing::new(64).unwrap();
        let r = ring.block_on(copy::send(&ring.io(), &stack, Box::new(ch), replies, &mut fs, opts, &|_, _, _| {}));
        let _ = tx.send(r);
    });
    let r = rx.recv_timeout(limit).unwrap_or_else(|_| panic!("the copy did not end within {limit:?} of a receiver that stopped"));
    (r, t0.elapsed())
}

/// The stack takes a write and a read again (a held request would hang).
fn serves(stack: &Arc<Stack>) {
    let (tx, rx) = mpsc::channel();
    let s = stack.clone();
    std::thread::spawn(move || {
        let r = block_on(s.write(&SyncIo, 3 * CLUSTER, &[7u8; 4096])).and_then(|_| {
            let mut b = vec![0u8; 4096];
            block_on(s.read(&SyncIo, 3 * CLUSTER, &mut b)).map(|_| b)
        });
        let _ = tx.send(r);
    });
    let back = rx.recv_timeout(Duration::from_secs(5)).expect("the stack still holds requests").unwrap();
    assert_eq!(back, vec![7u8; 4096]);
}

#[test]
fn a_receiver_that_stops_reading_in_the_frozen_pass_ends_the_freeze_at_its_limit() {
    let dir = TempDir::new("freeze-bound");
    let size = 64 * CLUSTER;
    let stack = new_image(&dir.join("a.img"), size);
    block_on(stack.write(&SyncIo, 0, &Rng::new(3).bytes(size as usize))).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let stall = Arc::new(AtomicBool::new(false));
    let reader = stalling_reader(theirs, stall.clone());
    let log = Arc::new(Mutex::new(Vec::new()));
    // 48 clusters (3 MiB) changed at the freeze and sent while frozen:
    // more than the socket and the copy's queues take unread.
    let fs = Recorder { stack: stack.clone(), dirty: 48, stall, log: log.clone() };
    let limit = Duration::from_millis(800);
    let opts = SendOptions { freeze_limit: limit, timeout: Duration::from_secs(2), capture_max: 0, ..Default::default() };
    let (r, took) = send_bounded(stack.clone(), ours, false, fs, opts, Duration::from_secs(10));
    let e = r.expect_err("a copy whose last pass never reached the receiver succeeded");
    assert_eq!(e.errno(), libc::ETIMEDOUT, "{e}");
    assert!(e.message().contains("freeze limit"), "{e}");
    let log = log.lock().unwrap().clone();
    assert_eq!(log.iter().map(|(w, _)| *w).collect::<Vec<_>>(), ["freeze", "thaw"], "{log:?}");
    let frozen = log[1].1 - log[0].1;
    assert!(frozen >= limit && frozen < limit + Duration::from_millis(700), "frozen for {frozen:?} with a limit of {limit:?}");
    // The writer's own timeout ends the job shortly after.
    assert!(took < Duration::from_secs(5), "the copy took {took:?}");
    serves(&stack);
    drop(reader);
    block_on(stack.close(&SyncIo)).unwrap();
}

#[test]
fn a_receiver_that_stops_reading_in_a_live_round_ends_the_copy_without_a_freeze() {
    let dir = TempDir::new("freeze-live");
    let size = 256 * CLUSTER;
    let stack = new_image(&dir.join("a.img"), size);
    block_on(stack.write(&SyncIo, 0, &Rng::new(4).bytes(size as usize))).unwrap();
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let fs = Recorder { stack: stack.clone(), dirty: 0, stall: Arc::new(AtomicBool::new(false)), log: log.clone() };
    let timeout = Duration::from_millis(700);
    let opts = SendOptions { timeout, ..Default::default() };
    let (r, took) = send_bounded(stack.clone(), ours, false, fs, opts, Duration::from_secs(10));
    let e = r.expect_err("a copy nobody read succeeded");
    assert_eq!(e.errno(), libc::ETIMEDOUT, "{e}");
    assert!(e.message().contains("timed out"), "{e}");
    assert!(took >= timeout && took < timeout + Duration::from_secs(2), "took {took:?}");
    assert!(log.lock().unwrap().is_empty(), "froze without a receiver");
    serves(&stack);
    block_on(stack.close(&SyncIo)).unwrap();
}

#[test]
fn a_receiver_that_never_answers_ends_a_two_way_copy() {
    let dir = TempDir::new("freeze-mute");
    let stack = new_image(&dir.join("a.img"), 16 * CLUSTER);
    // It reads everything and answers nothing.
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let sink = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(theirs.read(&mut buf), Ok(n) if n > 0) {}
    });
    let fs = Recorder { stack: stack.clone(), dirty: 0, stall: Arc::new(AtomicBool::new(false)), log: Arc::new(Mutex::new(Vec::new())) };
    let timeout = Duration::from_millis(500);
    let opts = SendOptions { two_way: true, timeout, ..Default::default() };
    let (r, took) = send_bounded(stack.clone(), ours, true, fs, opts, Duration::from_secs(10));
    let e = r.expect_err("a copy nobody answered succeeded");
    assert_eq!(e.errno(), libc::ETIMEDOUT, "{e}");
    assert!(took < timeout + Duration::from_secs(2), "took {took:?}");
    drop(sink);
    block_on(stack.close(&SyncIo)).unwrap();
}
