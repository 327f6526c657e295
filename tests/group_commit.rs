//! Group-committed BAT writes under failure: a request must never be
//! acknowledged when an entry it relied on was rolled back, and one failed
//! metadata write must not poison later, unrelated writes.
//!
//! The interleavings are built by hand: the requests are futures polled one
//! at a time, and a scripted I/O holds a request inside its data write (so
//! it has linked its cluster but not finished) or fails metadata writes.

mod common;

use std::cell::Cell;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::Poll;

use common::{block_on, TempDir};
use common::hooked::{Hook, Hooked, Kind, Op};
use futures_lite::future::poll_once;
use ublk_ploop::io::{Direct, SyncIo};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::{Stack, StackOptions};

const C: u64 = 64 * 1024;
/// With 64 clusters the BAT fits in the first cluster: data starts here.
const DATA_OFF: u64 = C;

/// A fresh image in `dir`.
fn fresh(dir: &TempDir, tag: &str) -> PathBuf {
    let p = dir.join(&format!("{tag}.hdd"));
    block_on(PloopLayer::create(&SyncIo, &p, 64 * C, C)).unwrap();
    p
}

fn opts() -> StackOptions {
    StackOptions { read_only: false, direct: Direct::Auto, offline: false, link_log: None }
}

fn open(paths: &[PathBuf]) -> Stack {
    block_on(Stack::open(&SyncIo, paths, &opts())).unwrap().0
}

/// Syscall I/O with knobs: hold the next data write of a given length
/// until released (4 KiB: a request's own data, after it linked its
/// cluster; a whole cluster: a copy-up, before the link), or the next
/// header/BAT write; and fail header/BAT writes, or data syncs.
#[derive(Default)]
struct Script {
    hold_len: Cell<Option<usize>>,
    hold_meta: Cell<bool>,
    holding: Cell<bool>,
    released: Cell<bool>,
    fail_meta: Cell<bool>,
    fail_sync: Cell<bool>,
}

/// The scripted I/O: syscalls under a [`Script`].
type Scripted = Hooked<SyncIo, Script>;

impl Hook for Script {
    async fn around(&self, op: Op, run: impl Future<Output = std::io::Result<()>>) -> std::io::Result<()> {
        match op.kind {
            Kind::Write => {
                let hold_meta = op.offset < DATA_OFF && self.hold_meta.replace(false);
                let hold_data = op.offset >= DATA_OFF && self.hold_len.get() == Some(op.len as usize);
                if hold_meta || hold_data {
                    self.hold_len.set(None);
                    self.holding.set(true);
                    std::future::poll_fn(|cx| {
                        if self.released.get() {
                            Poll::Ready(())
                        } else {
                            cx.waker().wake_by_ref();
                            Poll::Pending
                        }
                    })
                    .await;
                    self.holding.set(false);
                    self.released.set(false);
                }
                if op.offset < DATA_OFF && self.fail_meta.get() {
                    return Err(std::io::Error::from_raw_os_error(libc::EIO));
                }
            }
            Kind::Sync if self.fail_sync.get() => return Err(std::io::Error::from_raw_os_error(libc::EIO)),
            _ => {}
        }
        run.await
    }
}

fn scripted() -> Scripted {
    Hooked { inner: SyncIo, hook: Script::default() }
}

fn start_held_at<F: Future>(io: &Scripted, mut f: Pin<&mut F>, len: usize) {
    io.hold_len.set(Some(len));
    assert!(block_on(poll_once(f.as_mut())).is_none(), "the request finished instead of waiting");
    assert!(io.holding.get(), "the request is not waiting in its data write");
}

/// Poll a request once; it must now be held in its header/BAT write.
fn start_held_in_bat_write<F: Future>(io: &Scripted, f: Pin<&mut F>) {
    io.hold_meta.set(true);
    assert!(block_on(poll_once(f)).is_none(), "the request finished instead of waiting");
    assert!(io.holding.get(), "the request is not waiting in its BAT write");
}

/// A fresh image whose first `clusters` clusters hold 7s: the lower layer
/// the copy-up tests write over.
fn sevens(dir: &TempDir, tag: &str, clusters: u64) -> PathBuf {
    let base = fresh(dir, tag);
    let s = open(std::slice::from_ref(&base));
    block_on(s.write(&SyncIo, 0, &vec![7u8; (clusters * C) as usize])).unwrap();
    block_on(s.close(&SyncIo)).unwrap();
    base
}

fn read4k(stack: &Stack, off: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    block_on(stack.read(&SyncIo, off, &mut b)).unwrap();
    b
}

#[test]
fn a_write_relying_on_a_rolled_back_entry_is_not_acknowledged() {
    let dir = TempDir::new("gc");
    let p = fresh(&dir, "rollback");
    let data = vec![0xAAu8; 4096];
    let other = vec![0xBBu8; 4096];
    {
        let stack = open(std::slice::from_ref(&p));
        let io = scripted();
        // X's BAT write is held: the next ones queue behind it.
        let mut x = std::pin::pin!(stack.write(&io, 3 * C, &data));
        start_held_in_bat_write(&io, x.as_mut());
        // A links cluster 0 and moves its data; its entry waits to be written.
        let mut a = std::pin::pin!(stack.write(&io, 0, &data));
        assert!(block_on(poll_once(a.as_mut())).is_none());
        // D writes into cluster 0 too: it allocates nothing but relies on
        // A's entry, which is not on disk yet.
        let mut d = std::pin::pin!(stack.write(&io, 8192, &other));
        assert!(block_on(poll_once(d.as_mut())).is_none(), "D completed before A's entry was written");
        // X's write goes through; the next one, carrying A's entry, fails.
        io.released.set(true);
        block_on(x).unwrap();
        io.fail_meta.set(true);
        assert!(block_on(a).is_err(), "a write whose BAT write failed was acknowledged");
        io.fail_meta.set(false);
        assert!(block_on(d).is_err(), "a write relying on a rolled-back entry was acknowledged");
        // C links cluster 2 and succeeds.
        block_on(stack.write(&io, 2 * C, &data)).unwrap();
        assert_eq!(read4k(&stack, 0), vec![0; 4096], "the rolled-back cluster still shows data");
        assert_eq!(read4k(&stack, 2 * C), data);
        assert_eq!(read4k(&stack, 3 * C), data);
        block_on(stack.close(&SyncIo)).unwrap();
    }
    let stack = open(std::slice::from_ref(&p));
    assert_eq!(read4k(&stack, 0), vec![0; 4096], "a failed write reappeared after reopen");
    assert_eq!(read4k(&stack, 8192), vec![0; 4096], "a failed write reappeared after reopen");
    assert_eq!(read4k(&stack, 2 * C), data, "an acknowledged write was lost");
    drop(stack);
    let report = block_on(ublk_ploop::layers::ploop::check::check(&SyncIo, &p, ublk_ploop::layers::Format::Ploop, false)).unwrap();
    assert!(report.bad_entries.is_empty(), "{report:?}");
}

#[test]
fn an_overwrite_waits_for_its_clusters_entry_while_that_entry_is_being_written() {
    // A links cluster 0 and its BAT write is in flight. D overwrites part
    // of cluster 0: it allocates nothing and writes no metadata, but its
    // bytes are reachable after a crash only through A's entry, so D must
    // not be acknowledged before that entry is on disk.
    let dir = TempDir::new("gc");
    let p = fresh(&dir, "in-flight");
    let (data, other) = (vec![0xAAu8; 4096], vec![0xBBu8; 4096]);
    {
        let stack = open(std::slice::from_ref(&p));
        let io = scripted();
        let mut a = std::pin::pin!(stack.write(&io, 0, &data));
        start_held_in_bat_write(&io, a.as_mut());
        let mut d = std::pin::pin!(stack.write(&io, 8192, &other));
        assert!(block_on(poll_once(d.as_mut())).is_none(), "D was acknowledged while the entry it relies on was still being written");
        assert_eq!(read4k(&stack, 8192), other, "D's bytes did not go to A's cluster");
        io.released.set(true);
        block_on(a).unwrap();
        block_on(d).unwrap();
        block_on(stack.close(&SyncIo)).unwrap();
    }
    let stack = open(std::slice::from_ref(&p));
    assert_eq!(read4k(&stack, 0), data);
    assert_eq!(read4k(&stack, 8192), other);
}

#[test]
fn one_failed_bat_write_does_not_fail_later_writes() {
    let dir = TempDir::new("gc");
    let p = fresh(&dir, "sticky");
    let stack = open(&[p]);
    let io = scripted();
    let data = vec![0x11u8; 4096];
    block_on(stack.write(&io, 0, &data)).unwrap();
    io.fail_meta.set(true);
    assert!(block_on(stack.write(&io, C, &data)).is_err());
    io.fail_meta.set(false);
    for i in 0..3 {
        block_on(stack.write(&io, 0, &data)).unwrap_or_else(|e| panic!("overwrite {i} after an unrelated failure: {e}"));
    }
    // And the failed cluster can be allocated again.
    block_on(stack.write(&io, C, &data)).unwrap();
    assert_eq!(read4k(&stack, C), data);
    block_on(stack.close(&SyncIo)).unwrap();
}

#[test]
fn whole_cluster_write_zeroes_zeroes_a_copied_up_cluster() {
    // Lower layer with data; a write copies cluster 0 up, its bytes laid
    // over the copy, and is held in that write (it holds the cluster's
    // claim); a whole-cluster write-zeroes waits for the claim, then zeroes
    // the copy: no lower data is left, and the write's bytes go with it
    // (the later of two unordered requests wins). Zero-copy requests, whose
    // bytes cannot be laid over the copy, write them after the link; the
    // zeroes then punch the copy too (`write_zeroes_entered`).
    let dir = TempDir::new("gc");
    let base = sevens(&dir, "wz-base", 1);
    let top = fresh(&dir, "wz-top");
    let stack = open(&[base, top]);
    let io = scripted();
    let nines = [9u8; 4096];
    let mut a = std::pin::pin!(stack.write(&io, 0, &nines));
    start_held_at(&io, a.as_mut(), C as usize);
    let mut z = std::pin::pin!(stack.write_zeroes(&io, 0, C as usize));
    assert!(block_on(poll_once(z.as_mut())).is_none(), "the zeroes ran beside the copy-up of their cluster");
    io.released.set(true);
    block_on(a).unwrap();
    block_on(z).unwrap();
    let mut all = vec![0u8; C as usize];
    block_on(stack.read(&SyncIo, 0, &mut all)).unwrap();
    assert!(all.iter().all(|&b| b == 0), "lower data or the held write survived a whole-cluster write-zeroes issued after it");
    block_on(stack.close(&SyncIo)).unwrap();
}

#[test]
fn a_request_waits_for_the_cluster_another_is_copying_up_and_others_do_not() {
    // A copies cluster 0 up and is held in the copy (it holds the claim on
    // the cluster); B writes another part of cluster 0 and must wait; C
    // writes cluster 1 and completes while A is still held.
    let dir = TempDir::new("gc");
    let base = sevens(&dir, "wait-base", 2);
    let top = fresh(&dir, "wait-top");
    let stack = open(&[base, top]);
    let io = scripted();
    let (a_data, b_data, c_data) = ([1u8; 4096], [2u8; 8192], [3u8; 8192]);
    let mut a = std::pin::pin!(stack.write(&io, 0, &a_data));
    start_held_at(&io, a.as_mut(), C as usize);
    let mut b = std::pin::pin!(stack.write(&io, 8192, &b_data));
    assert!(block_on(poll_once(b.as_mut())).is_none(), "B wrote into a cluster still being copied up");
    block_on(stack.write(&io, C + 8192, &c_data)).expect("a write to another cluster waited for the copy-up");
    assert!(io.holding.get(), "A finished early");
    io.released.set(true);
    block_on(a).unwrap();
    block_on(b).unwrap();
    let mut all = vec![0u8; 2 * C as usize];
    block_on(stack.read(&SyncIo, 0, &mut all)).unwrap();
    let mut want = vec![7u8; 2 * C as usize];
    want[..4096].copy_from_slice(&a_data);
    want[8192..16384].copy_from_slice(&b_data);
    want[C as usize + 8192..C as usize + 16384].copy_from_slice(&c_data);
    assert!(all == want, "data after the interleaved copy-ups differs");
    block_on(stack.close(&SyncIo)).unwrap();
}

#[test]
fn a_whole_cluster_write_replaces_lower_data_without_a_copy_up_and_links_only_once_its_bytes_are_there() {
    // A writes all of cluster 0 over the base's data and is held in that
    // data write: the cluster is not linked yet, so readers still see the
    // base's bytes (never the top's fresh zeros). No copy-up happens for
    // it; a partial write to cluster 1 still copies up.
    let dir = TempDir::new("gc");
    let base = sevens(&dir, "whole-base", 2);
    let top = fresh(&dir, "whole-top");
    {
        let stack = open(&[base.clone(), top.clone()]);
        let io = scripted();
        let new = vec![5u8; C as usize];
        let mut a = std::pin::pin!(stack.write(&io, 0, &new));
        start_held_at(&io, a.as_mut(), C as usize);
        assert_eq!(read4k(&stack, 8192), vec![7u8; 4096], "a reader saw the cluster before its bytes were written");
        io.released.set(true);
        block_on(a).unwrap();
        assert_eq!(stack.copy_ups(), 0, "a whole-cluster write copied the cluster up");
        assert_eq!(read4k(&stack, 8192), vec![5u8; 4096]);
        block_on(stack.write(&SyncIo, C + 4096, &[3u8; 4096])).unwrap();
        assert_eq!(stack.copy_ups(), 1, "a partial write did not copy up");
        block_on(stack.close(&SyncIo)).unwrap();
    }
    let stack = open(&[base, top]);
    let mut all = vec![0u8; 2 * C as usize];
    block_on(stack.read(&SyncIo, 0, &mut all)).unwrap();
    let mut want = vec![7u8; 2 * C as usize];
    want[..C as usize].fill(5);
    want[C as usize + 4096..C as usize + 8192].fill(3);
    assert!(all == want, "data after reopening differs");
    block_on(stack.close(&SyncIo)).unwrap();
}

#[test]
fn a_request_overlapping_a_failed_bat_write_succeeds_when_its_own_entry_is_written() {
    // A links cluster 0 and its BAT write is held; B links cluster 2
    // meanwhile and waits to share the next write. A's write fails: A
    // fails, B relied on nothing A linked, so B succeeds once its own
    // entry is written, and A's never reappears.
    let dir = TempDir::new("gc");
    let p = fresh(&dir, "overlap");
    let (a_data, b_data) = ([0xA1u8; 4096], [0xB2u8; 4096]);
    {
        let stack = open(std::slice::from_ref(&p));
        let io = scripted();
        let mut a = std::pin::pin!(stack.write(&io, 0, &a_data));
        start_held_in_bat_write(&io, a.as_mut());
        let mut b = std::pin::pin!(stack.write(&io, 2 * C, &b_data));
        assert!(block_on(poll_once(b.as_mut())).is_none(), "B completed before its entry was written");
        io.fail_meta.set(true);
        io.released.set(true);
        assert!(block_on(a).is_err(), "a write whose BAT write failed was acknowledged");
        io.fail_meta.set(false);
        block_on(b).expect("a write whose own entry was written failed for another's failed BAT write");
        assert_eq!(read4k(&stack, 0), vec![0; 4096]);
        assert_eq!(read4k(&stack, 2 * C), b_data);
        // A process death now (no close, no flush): B's entry is on disk.
    }
    let stack = open(std::slice::from_ref(&p));
    assert_eq!(read4k(&stack, 2 * C), b_data, "an acknowledged write was lost");
    assert_eq!(read4k(&stack, 0), vec![0; 4096], "a failed write reappeared after reopen");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let report = block_on(ublk_ploop::layers::ploop::check::check(&SyncIo, &p, ublk_ploop::layers::Format::Ploop, false)).unwrap();
    assert!(report.bad_entries.is_empty(), "{report:?}");
}

#[test]
fn a_merge_does_not_drop_the_parent_under_a_cluster_whose_bat_write_failed() {
    // The parent holds cluster 0 only. A write copies it up into the top
    // and links it; its BAT write is held. The merge finds the cluster in
    // the top already, so it has nothing to copy; then that BAT write
    // fails, the entry is rolled back and the cluster is the parent's
    // again. The merge must not end Ok with the parent still needed.
    let dir = TempDir::new("gc");
    let parent = sevens(&dir, "merge-parent", 1);
    let top = fresh(&dir, "merge-top");
    let mut all = vec![0u8; C as usize];
    let stack = open(&[parent.clone(), top.clone()]);
    let merged = {
    let io = scripted();
    let nines = [9u8; 4096];
    let mut w = std::pin::pin!(stack.write(&io, 4096, &nines));
    start_held_in_bat_write(&io, w.as_mut());
    let mut m = std::pin::pin!(stack.merge_parent_into_top(&io, 4, &|_, _| {}));
    let early = block_on(poll_once(m.as_mut()));
    io.fail_meta.set(true);
    io.released.set(true);
    assert!(block_on(w).is_err(), "a write whose BAT write failed was acknowledged");
    io.fail_meta.set(false);
    match early {
        Some(result) => result,
        None => block_on(m),
    }
    };
    match &merged {
        // The caller drops the parent after an Ok.
        Ok(_) => drop(block_on(stack.remove_layer(0)).unwrap()),
        Err(e) => eprintln!("the merge failed (the parent is kept): {e}"),
    }
    block_on(stack.read(&SyncIo, 0, &mut all)).unwrap();
    assert!(all.iter().all(|&b| b == 7), "the parent's data of cluster 0 is lost after the merge ({merged:?})");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    if merged.is_ok() {
        // The top alone holds it, durably.
        let alone = open(std::slice::from_ref(&top));
        block_on(alone.read(&SyncIo, 0, &mut all)).unwrap();
        assert!(all.iter().all(|&b| b == 7), "the merged top lacks the parent's data after reopening");
        block_on(alone.close(&SyncIo)).unwrap();
        drop(alone);
        let report = block_on(ublk_ploop::layers::ploop::check::check(&SyncIo, &top, ublk_ploop::layers::Format::Ploop, false)).unwrap();
        assert!(report.bad_entries.is_empty(), "{report:?}");
    }
}

#[test]
fn a_flush_waits_for_a_bat_write_in_flight() {
    // A merge (or anyone) that flushes to make an entry durable must not
    // have its sync run before that entry's write has even landed.
    let dir = TempDir::new("gc");
    let p = fresh(&dir, "flush-waits");
    let stack = open(&[p]);
    let io = scripted();
    let data = [4u8; 4096];
    let mut w = std::pin::pin!(stack.write(&io, 0, &data));
    start_held_in_bat_write(&io, w.as_mut());
    let mut f = std::pin::pin!(stack.flush(&io));
    assert!(block_on(poll_once(f.as_mut())).is_none(), "the flush finished while a BAT write was still in flight");
    io.released.set(true);
    block_on(w).unwrap();
    block_on(f).unwrap();
    assert_eq!(read4k(&stack, 0), data);
    block_on(stack.close(&SyncIo)).unwrap();
}

#[test]
fn after_a_failed_fdatasync_in_buffered_mode_every_later_flush_fails() {
    // Buffered I/O: a failed fdatasync may have dropped dirty pages of
    // acknowledged writes from the page cache, and the next fdatasync has
    // nothing left to report. So the file stays failed: no later flush may
    // claim those writes durable.
    let dir = TempDir::new("gc");
    let p = fresh(&dir, "fsyncgate");
    let buffered = StackOptions { read_only: false, direct: Direct::Off, offline: false, link_log: None };
    let stack = block_on(Stack::open(&SyncIo, std::slice::from_ref(&p), &buffered)).unwrap().0;
    assert!(!stack.layers()[0].file().direct);
    let io = scripted();
    block_on(stack.write(&io, 0, &[1u8; 4096])).unwrap();
    block_on(stack.flush(&io)).unwrap();
    // An overwrite in place: acknowledged, in the page cache only.
    block_on(stack.write(&io, 0, &[2u8; 4096])).unwrap();
    io.fail_sync.set(true);
    let e = block_on(stack.flush(&io)).expect_err("a flush whose fdatasync failed returned Ok");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    io.fail_sync.set(false);
    for i in 0..3 {
        let e = block_on(stack.flush(&io)).expect_err(&format!("flush {i} after a failed fdatasync returned Ok"));
        assert_eq!(e.errno(), libc::EIO, "{e}");
    }
    assert!(block_on(stack.close(&io)).is_err(), "a clean close after a failed fdatasync");
}
