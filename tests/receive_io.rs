//! The receiver over an `Io` that is not the host's: the names it
//! touches go through the trait (a name the trait never saw would miss
//! the simulated world), and an apply stopped by its hook, as a simulated
//! kill stops it, is finished by the next receive.
//!
//! `Rooted` logs every name it is asked about. With `virt`, it serves
//! names under `/virt` from a temporary directory and panics on any other
//! name, so a call that bypasses the trait finds nothing at `/virt`.

mod common;

use std::cell::{Cell, RefCell};
use std::ffi::OsString;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::future::Future;
use std::task::{Context, Waker};

use common::{send_to_vec, Rng, TempDir};
use ublk_ploop::copy::receive::{finish_interrupted_apply_in, receive_in, Hooks};
use ublk_ploop::copy::{NoFs, ReceiveOptions, SendOptions};
use ublk_ploop::io::{block_on, Direct, FileStat, Handle, Io, LockHow, OpenHow, SyncIo};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::tracker::Tracker;
use ublk_ploop::Stack;

const CLUSTER: u64 = 64 << 10;
const VIRT: &str = "/virt";

/// SyncIo, logging the names it is asked about; with `virt`, on a
/// temporary directory that the receiver knows as `/virt`.
struct Rooted {
    root: PathBuf,
    virt: bool,
    log: RefCell<Vec<String>>,
}

impl Rooted {
    fn new(root: &Path, virt: bool) -> Rooted {
        Rooted { root: root.canonicalize().unwrap(), virt, log: RefCell::new(Vec::new()) }
    }
    /// The name the receiver gives `name` (a file in the root).
    fn name(&self, name: &str) -> PathBuf {
        if self.virt { Path::new(VIRT).join(name) } else { self.root.join(name) }
    }
    fn logged(&self, what: &str, p: &Path) -> PathBuf {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.log.borrow_mut().push(format!("{what} {name}"));
        self.host(p)
    }
    fn saw(&self, entry: &str) -> bool {
        self.log.borrow().iter().any(|e| e.starts_with(entry))
    }
    fn host(&self, p: &Path) -> PathBuf {
        if !self.virt {
            return p.to_path_buf();
        }
        let rest = p.strip_prefix(VIRT).unwrap_or_else(|_| panic!("{}: a host path reached the Io", p.display()));
        self.root.join(rest)
    }
    fn virt(&self, p: &Path) -> PathBuf {
        if !self.virt {
            return p.to_path_buf();
        }
        Path::new(VIRT).join(p.strip_prefix(&self.root).unwrap_or_else(|_| panic!("{}: outside the root", p.display())))
    }
}

impl Io for Rooted {
    async fn read_at(&self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        SyncIo.read_at(fd, buf, offset).await
    }
    async fn write_at(&self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
        SyncIo.write_at(fd, buf, offset).await
    }
    async fn sync_data(&self, fd: RawFd) -> io::Result<()> {
        SyncIo.sync_data(fd).await
    }
    async fn allocate(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        SyncIo.allocate(fd, offset, len).await
    }
    async fn punch_hole(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        SyncIo.punch_hole(fd, offset, len).await
    }
    async fn set_len(&self, fd: RawFd, len: u64) -> io::Result<()> {
        SyncIo.set_len(fd, len).await
    }
    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        SyncIo.rename(&self.logged("rename", from), &self.host(to)).await
    }
    async fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        SyncIo.sync_dir(&self.logged("sync_dir", dir)).await
    }
    fn open(&self, path: &Path, how: &OpenHow) -> io::Result<Handle> {
        SyncIo.open(&self.logged(if how.create_new { "create" } else { "open" }, path), how)
    }
    fn fstat(&self, fd: RawFd) -> io::Result<FileStat> {
        SyncIo.fstat(fd)
    }
    fn stat(&self, path: &Path) -> io::Result<Option<FileStat>> {
        SyncIo.stat(&self.logged("stat", path))
    }
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        SyncIo.canonicalize(&self.logged("canonicalize", path)).map(|p| self.virt(&p))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        SyncIo.create_dir_all(&self.logged("create_dir_all", path))
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        SyncIo.create_dir(&self.logged("create_dir", path))
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        SyncIo.remove_dir(&self.logged("remove_dir", path))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        SyncIo.remove_file(&self.logged("remove_file", path))
    }
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        SyncIo.rename_noreplace(&self.logged("rename_noreplace", from), &self.host(to))
    }
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        SyncIo.read_dir(&self.logged("read_dir", dir))
    }
    fn flock(&self, fd: RawFd, how: LockHow) -> io::Result<()> {
        SyncIo.flock(fd, how)
    }
}

fn opts(incremental: bool) -> ReceiveOptions {
    ReceiveOptions { two_way: false, incremental, direct: Direct::Off }
}

fn receive(io: &Rooted, stream: &[u8], dest: &Path, incremental: bool) -> ublk_ploop::Result<ublk_ploop::copy::Received> {
    let input = Box::new(io::Cursor::new(stream.to_vec()));
    block_on(receive_in(io, input, None, dest, &opts(incremental), Some(1 << 40), Hooks::default()))
}

fn read_all(stack: &Stack) -> Vec<u8> {
    let mut buf = vec![0u8; stack.size() as usize];
    block_on(stack.read(&SyncIo, 0, &mut buf)).unwrap();
    buf
}

fn image_bytes(path: &Path) -> Vec<u8> {
    let s = common::open_stack(&[path], true);
    read_all(&s)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

/// A source image, a full stream of it, and an incremental stream of three
/// changed clusters after it.
fn streams(dir: &TempDir) -> (Stack, Vec<u8>, Vec<u8>) {
    let size = 32 * CLUSTER;
    let src = dir.join("src.img");
    block_on(PloopLayer::create(&SyncIo, &src, size, CLUSTER)).unwrap();
    let stack = common::open_stack(&[&src], false);
    let mut rng = Rng::new(19);
    block_on(stack.write(&SyncIo, 0, &rng.bytes(20 * CLUSTER as usize))).unwrap();
    let cbt = Arc::new(Tracker::new(size, CLUSTER));
    block_on(stack.add_tracker(cbt.clone())).unwrap();
    let (full, _) = send_to_vec(&stack, &mut NoFs, SendOptions { cbt: Some(cbt.clone()), ..Default::default() });
    block_on(stack.write(&SyncIo, 3 * CLUSTER + 4096, &rng.bytes(8192))).unwrap();
    block_on(stack.write_zeroes(&SyncIo, 10 * CLUSTER, CLUSTER as usize)).unwrap();
    block_on(stack.write(&SyncIo, 30 * CLUSTER, &rng.bytes(CLUSTER as usize))).unwrap();
    let (incr, sent) = send_to_vec(&stack, &mut NoFs, SendOptions { incremental: true, cbt: Some(cbt), ..Default::default() });
    assert_eq!(sent.rounds[0].sent, 3);
    (stack, full, incr)
}

#[test]
fn full_and_incremental_receive_go_through_the_io() {
    full_and_incremental(false);
}

#[test]
fn full_and_incremental_receive_touch_names_only_through_the_io() {
    full_and_incremental(true);
}

#[test]
fn an_apply_stopped_by_its_hook_is_finished_by_the_next_receive() {
    stopped_apply(false);
}

#[test]
fn an_apply_stopped_by_its_hook_is_finished_through_the_io_only() {
    stopped_apply(true);
}

fn full_and_incremental(virt: bool) {
    let dir = TempDir::new("recv-io");
    let (stack, full, incr) = streams(&dir);
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    let io = Rooted::new(&root, virt);
    let backup = io.name("backup.img");

    let before = read_all_before_incr(&full, &dir);
    let got = receive(&io, &full, &backup, false).unwrap();
    assert_eq!(got.image, backup);
    assert_eq!(names(&root), ["backup.img"], "the lock and the temporary are gone");
    assert_eq!(image_bytes(&root.join("backup.img")), before);
    // The directory as the receiver knows it: `root`, or `virt`.
    let parent = backup.parent().and_then(|d| d.file_name()).unwrap().to_string_lossy().into_owned();
    for seen in ["create .backup.img.receiving", "remove_file .backup.img.receiving", "rename_noreplace backup.img.partial.", &format!("sync_dir {parent}")] {
        assert!(io.saw(seen), "{seen}: not asked of the Io: {:?}", io.log.borrow());
    }
    // A second full receive into the same name is refused; nothing moves.
    assert_eq!(receive(&io, &full, &backup, false).unwrap_err().errno(), libc::EEXIST);

    let got = receive(&io, &incr, &backup, true).unwrap();
    assert_eq!(got.applied_clusters, 3);
    assert_eq!(names(&root), ["backup.img"]);
    assert_eq!(image_bytes(&root.join("backup.img")), read_all(&stack));
    for seen in [&format!("read_dir {parent}"), "rename_noreplace backup.img.incoming.", "remove_file backup.img.incoming"] {
        assert!(io.saw(seen), "{seen}: not asked of the Io: {:?}", io.log.borrow());
    }
    block_on(stack.close(&SyncIo)).unwrap();
}

/// The disk as the full stream carries it, received on the host.
fn read_all_before_incr(full: &[u8], dir: &TempDir) -> Vec<u8> {
    let dest = dir.join("host-backup.img");
    let opts = opts(false);
    ublk_ploop::copy::receive(Box::new(io::Cursor::new(full.to_vec())), None, &dest, &opts).unwrap();
    image_bytes(&dest)
}

fn stopped_apply(virt: bool) {
    let dir = TempDir::new("recv-io-halt");
    let (stack, full, incr) = streams(&dir);
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    let io = Rooted::new(&root, virt);
    let backup = io.name("backup.img");
    receive(&io, &full, &backup, false).unwrap();
    let before = image_bytes(&root.join("backup.img"));

    // The hook stops the apply after one cluster; the receive never
    // completes, and dropping it is the kill.
    let halted = Cell::new(None);
    {
        let hooks = Hooks {
            note: Box::new(|_| {}),
            before_cluster: Box::new(|n| {
                if n == 1 {
                    halted.set(Some(n));
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            }),
        };
        let input = Box::new(io::Cursor::new(incr.clone()));
        let incremental = opts(true);
        let mut fut = pin!(receive_in(&io, input, None, &backup, &incremental, Some(1 << 40), hooks));
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..3 {
            assert!(fut.as_mut().poll(&mut cx).is_pending(), "a halted apply never completes");
        }
    }
    assert_eq!(halted.get(), Some(1));
    assert!(root.join("backup.img.incoming").exists(), "the complete delta waits: {:?}", names(&root));
    let part = image_bytes(&root.join("backup.img"));
    assert_ne!(part, before, "one cluster was applied");
    assert_ne!(part, read_all(&stack), "not all of them");

    // The next receive finishes it before anything else.
    let notes = RefCell::new(Vec::new());
    let mut hooks = Hooks { note: Box::new(|n| notes.borrow_mut().push(n.to_string())), ..Hooks::default() };
    let n = block_on(finish_interrupted_apply_in(&io, &backup, Direct::Off, &mut hooks)).unwrap();
    drop(hooks);
    assert_eq!(n, Some(3));
    let expect = format!("finished an interrupted apply: {}.incoming", backup.display());
    assert!(notes.borrow()[0].starts_with(&expect), "{:?}", notes.borrow());
    assert_eq!(image_bytes(&root.join("backup.img")), read_all(&stack));
    assert!(!root.join("backup.img.incoming").exists());
    // What the killed receive left: only its lock file, empty and free,
    // which the next receive takes and removes.
    let left: Vec<String> = names(&root).into_iter().filter(|n| n != "backup.img").collect();
    assert!(left.is_empty() || left == [".backup.img.receiving"], "{left:?}");
    block_on(stack.close(&SyncIo)).unwrap();
}

/// Makes every operation wait one turn before it runs, as a ring's
/// completions do: receives on one thread then interleave.
struct OneTurn;

impl common::hooked::Hook for OneTurn {
    async fn around(&self, _: common::hooked::Op, run: impl Future<Output = io::Result<()>>) -> io::Result<()> {
        let mut waited = false;
        std::future::poll_fn(|cx| {
            if waited {
                return std::task::Poll::Ready(());
            }
            waited = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        })
        .await;
        run.await
    }
}

#[test]
fn two_receives_on_one_thread_never_wait_for_each_other() {
    // Each receive lists its temporaries; the list must not stay locked
    // across an await, or the second receive blocks the thread the first
    // one needs.
    let dir = TempDir::new("recv-two");
    let (stack, full, _) = streams(&dir);
    block_on(stack.close(&SyncIo)).unwrap();
    let expect = read_all_before_incr(&full, &dir);
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    let dests = [root.join("a.img"), root.join("b.img")];
    let (tx, rx) = std::sync::mpsc::channel();
    let thread_dests = dests.clone();
    std::thread::spawn(move || {
        let io = common::Hooked { inner: SyncIo, hook: OneTurn };
        let o = opts(false);
        let start = |dest| receive_in(&io, Box::new(io::Cursor::new(full.clone())), None, dest, &o, Some(1 << 40), Hooks::default());
        let mut rxs = [Box::pin(start(&thread_dests[0])), Box::pin(start(&thread_dests[1]))];
        let mut results: [Option<Result<(), String>>; 2] = [None, None];
        let mut cx = Context::from_waker(Waker::noop());
        let mut turns = 0u64;
        while results.iter().any(Option::is_none) {
            turns += 1;
            for (rx, result) in rxs.iter_mut().zip(results.iter_mut()) {
                if result.is_none() {
                    if let std::task::Poll::Ready(r) = rx.as_mut().poll(&mut cx) {
                        *result = Some(r.map(|_| ()).map_err(|e| e.to_string()));
                    }
                }
            }
        }
        let _ = tx.send((results, turns));
    });
    let (results, turns) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("two receives on one thread did not finish: one waits for a lock the other holds across an await");
    for r in results {
        r.unwrap().unwrap();
    }
    assert!(turns > 10, "the receives hardly overlapped ({turns} turns)");
    assert_eq!(names(&root), ["a.img", "b.img"]);
    for dest in &dests {
        assert_eq!(image_bytes(dest), expect, "{}", dest.display());
    }
}
