//! Snapshot, merge, delete and switch on a disk directory, against the
//! model: under concurrent writers (each owning a stripe of every cluster,
//! so the model stays exact), and with a fault at every step of each
//! operation, descriptor rename included.
//!
//! UBLK_PLOOP_DISK_SEEDS sets how many seeds the concurrent test runs
//! (default 12); UBLK_PLOOP_DISK_SEED=N reruns one.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use common::inject::{Fault, Injector, Kind, Trap};
use common::stripes::{expected, pattern, verify, Geometry, Owner, Rng};
use common::{assert_ploop_clean, for_each_seed, ploop_check, quiesced, retry_busy, TempDir};
use ublk_ploop::disk::ops::{self, Deleted};
use ublk_ploop::disk::{Disk, Guid, Temporary, TOP_GUID};
use ublk_ploop::error::ErrorKind;
use ublk_ploop::io::{block_on, AlignedBuf, Io, SyncIo};
use ublk_ploop::{Stack, StackOptions};

const WRITERS: usize = 4;

fn open(disk: &Disk, guid: Option<Guid>, read_only: bool) -> Stack {
    open_as(disk, guid, read_only, false)
}

/// `offline`: as the offline tools open it (no request served; a merge of
/// the top folds it into its parent).
fn open_as(disk: &Disk, guid: Option<Guid>, read_only: bool, offline: bool) -> Stack {
    let layers = disk.layers(guid).unwrap();
    retry_busy(|| block_on(Stack::open_layers(&SyncIo, &layers, &StackOptions { read_only, offline, ..Default::default() })))
        .unwrap_or_else(|e| panic!("opening {layers:?}: {e}"))
        .0
}

fn read_all(stack: &Stack) -> Vec<u8> {
    read_range(stack, 0, stack.size() as usize)
}

fn read_range(stack: &Stack, off: u64, len: usize) -> Vec<u8> {
    let mut b = AlignedBuf::zeroed(len);
    block_on(stack.read(&SyncIo, off, &mut b)).unwrap();
    b.to_vec()
}

/// Every delta the descriptor names is clean, for us and for qemu-img.
fn check_files(disk: &Disk, ctx: &str) {
    for img in &disk.desc.images {
        let p = disk.file_path(img);
        assert_ploop_clean(&p, ctx);
    }
}

/// A new disk whose base is full of data, and the model of it.
fn full_disk(dir: &Path, g: &Geometry) -> (Disk, Vec<u8>) {
    let disk = block_on(Disk::init(&SyncIo, dir, g.size(), g.cluster)).unwrap();
    let data = pattern(0xBA5E, 0, g.size() as usize);
    let s = open(&disk, None, false);
    block_on(s.write(&SyncIo, 0, &data)).unwrap();
    block_on(s.close(&SyncIo)).unwrap();
    (disk, data.to_vec())
}

fn run_seed(seed: u64) {
    let mut rng = Rng::new(seed);
    let g = Geometry { cluster: 64 << 10, clusters: 8 + rng.below(16), stripe: (64 << 10) / WRITERS as u64 };
    let ctx = format!("seed {seed} ({} clusters)", g.clusters);
    let dir = TempDir::new(&format!("diskops-{seed}"));
    let (mut disk, base) = full_disk(&dir.join("ct"), &g);
    let stack = open(&disk, None, false);
    let mut owners: Vec<Owner> = (0..WRITERS).map(|id| Owner::new(id, seed * 100 + id as u64, &g, &base)).collect();
    // Snapshots taken while the writers paused, with the disk as it was.
    let mut taken: HashMap<Guid, Vec<u8>> = HashMap::new();
    let mut tag = 1u64;
    let rounds = 6;
    let mut did = vec![];
    for round in 0..rounds {
        let ctx = format!("{ctx}, round {round}");
        let errors = Mutex::new(Vec::<String>::new());
        let busy = AtomicBool::new(true);
        let op = rng.below(3);
        // The writers run while one operation that keeps the content runs.
        let result = std::thread::scope(|s| {
            let workers: Vec<_> = owners
                .iter_mut()
                .map(|o| {
                    let (stack, g, errors) = (&stack, &g, &errors);
                    let t0 = tag + (o.id as u64) * 1000;
                    s.spawn(move || {
                        for i in 0..25 {
                            if let Err(e) = block_on(o.step(stack, &SyncIo, g, t0 + i)) {
                                errors.lock().unwrap().push(e);
                                return;
                            }
                        }
                    })
                })
                .collect();
            // (quiesced: no test process is being spawned meanwhile, whose
            // copies of our descriptors would hold our locks for an instant)
            let outcome: Result<String, String> = quiesced(|| {
                let rows = disk.snapshot_rows();
                match op {
                    0 => block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).map(|s| format!("snapshot {} under I/O", s.guid)),
                    1 if disk.desc.shot(disk.desc.top).is_some_and(|t| disk.desc.children(t.parent).len() == 1 && t.parent != ublk_ploop::disk::NONE_GUID) => block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &|_, _| {}))
                        .map(|m| format!("merge of the top into {}", m.parent)),
                    _ => {
                        let victims: Vec<Guid> = rows.iter().filter(|r| !r.current).map(|r| r.guid).collect();
                        match victims.get(rng.below(victims.len().max(1) as u64) as usize) {
                            Some(&v) => block_on(ops::delete(&SyncIo, &stack, &mut disk, v, &|_, _| {})).map(|d| format!("delete {v}: {d:?}")),
                            None => Ok("nothing to delete".into()),
                        }
                    }
                }
                .map_err(|e| e.to_string())
            });
            for w in workers {
                w.join().unwrap();
            }
            busy.store(false, Ordering::Relaxed);
            outcome
        });
        tag += 100_000;
        let errors = errors.into_inner().unwrap();
        assert!(errors.is_empty(), "{ctx}: {}", errors.join("\n"));
        let what = result.unwrap_or_else(|e| panic!("{ctx}: operation {op} failed: {e}"));
        did.push(what.clone());
        let ctx = format!("{ctx}, after {what}");
        // Quiet: the device shows the model, every snapshot its own.
        let want = expected(&g, &owners);
        verify(&stack, &want, &ctx);
        for (guid, content) in &taken {
            let Some(shot) = disk.desc.shot(*guid) else { continue };
            if shot.temporary != Temporary::No && disk.desc.children(*guid).len() == 1 {
                // Deleted, kept for its one child: ploop merges such a
                // snapshot away rather than serve it, and so do we.
                let e = disk.layers(Some(*guid)).expect_err("a temporary snapshot with one child opened");
                assert_eq!(e.errno(), libc::EBUSY, "{ctx}: {e}");
                continue;
            }
            {
                let snap = open(&disk, Some(*guid), true);
                assert!(read_all(&snap) == *content, "{ctx}: snapshot {guid} does not show the disk as it was when taken");
            }
        }
        // A snapshot with the writers paused; now and then, a switch back.
        let snap = quiesced(|| block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None))).unwrap_or_else(|e| panic!("{ctx}: snapshot: {e}"));
        taken.insert(snap.guid, want.clone());
        if round % 3 == 2 {
            let choices: Vec<Guid> = taken
                .keys()
                .copied()
                .filter(|g| disk.desc.shot(*g).is_some_and(|s| s.temporary == ublk_ploop::disk::Temporary::No) && *g != disk.desc.top)
                .collect();
            let target = choices[rng.below(choices.len() as u64) as usize];
            quiesced(|| block_on(ops::switch(&SyncIo, &stack, &mut disk, target))).unwrap_or_else(|e| panic!("{ctx}: switch: {e}"));
            let content = taken[&target].clone();
            verify(&stack, &content, &format!("{ctx}, after switching to {target}"));
            owners.iter_mut().for_each(|o| o.reset(&g, &content));
            did.push(format!("switch to {target}"));
        }
    }
    let want = expected(&g, &owners);
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let disk = Disk::load(&disk.dir).unwrap();
    let s = open(&disk, None, true);
    verify(&s, &want, &format!("{ctx}, after close ({})", did.join("; ")));
    drop(s);
    check_files(&disk, &ctx);
}

#[test]
fn snapshot_merge_delete_switch_under_concurrent_io_match_the_model() {
    for_each_seed("DISK", 12, run_seed);
}

// ---------------------------------------------------------------------------
// Faults at every step.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Snapshot,
    MergeTop,
    MergeLower,
    Delete,
    Switch,
    /// The top merged into its parent by an offline tool (folded into the
    /// parent's file).
    MergeTopOffline,
    /// The top's parent deleted offline (the top folded into it).
    DeleteOffline,
}

impl Op {
    fn offline(self) -> bool {
        matches!(self, Op::MergeTopOffline | Op::DeleteOffline)
    }
}

/// A disk with three deltas, each holding some clusters, and the disk's
/// content; the snapshots' GUIDs bottom first.
struct Fixture {
    dir: TempDir,
    /// The top delta's file name before any operation.
    top_file: String,
    /// The file of the top's parent (the snapshot `guids[1]`).
    parent_file: String,
    model: Vec<u8>,
    guids: Vec<Guid>,
    snapshot_models: HashMap<Guid, Vec<u8>>,
}

fn fixture(tag: &str) -> Fixture {
    let g = Geometry { cluster: 64 << 10, clusters: 12, stripe: 16 << 10 };
    let dir = TempDir::new(tag);
    let (mut disk, mut model) = full_disk(&dir.join("ct"), &g);
    let stack = open(&disk, None, false);
    let mut guids = vec![];
    let mut snapshot_models = HashMap::new();
    for round in 0..2u64 {
        let s = block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
        guids.push(s.guid);
        snapshot_models.insert(s.guid, model.clone());
        // Some clusters change in the new top: whole, part, and zeroed.
        for c in [1 + round, 4 + round, 9] {
            let off = c * g.cluster + 4096 * round;
            let data = pattern(round + 7, off, 8192);
            block_on(stack.write(&SyncIo, off, &data)).unwrap();
            model[off as usize..off as usize + 8192].copy_from_slice(&data);
        }
        block_on(stack.write_zeroes(&SyncIo, 6 * g.cluster, 4096)).unwrap();
        model[6 * g.cluster as usize..6 * g.cluster as usize + 4096].fill(0);
    }
    block_on(stack.close(&SyncIo)).unwrap();
    let top_file = disk.desc.image(TOP_GUID).unwrap().file.clone();
    let parent_file = disk.desc.image(guids[1]).unwrap().file.clone();
    Fixture { dir, top_file, parent_file, model, guids, snapshot_models }
}

/// Copy the fixture's directory for one run.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Run `op` on a fresh copy of the fixture with `io`; returns the error.
fn run_op<I: Io>(f: &Fixture, op: Op, io: &I, name: &str) -> (PathBuf, Option<String>) {
    let dir = f.dir.join(name);
    copy_dir(&f.dir.join("ct"), &dir);
    let mut disk = Disk::load(&dir).unwrap();
    let stack = open_as(&disk, None, false, op.offline());
    let r = quiesced(|| match op {
        Op::Snapshot => block_on(ops::snapshot(io, &stack, &mut disk, None)).map(drop),
        Op::MergeTop | Op::MergeTopOffline => block_on(ops::merge(io, &stack, &mut disk, None, &|_, _| {})).map(drop),
        // The middle delta into the base: both below the top.
        Op::MergeLower => block_on(ops::merge(io, &stack, &mut disk, Some(f.guids[1]), &|_, _| {})).map(drop),
        Op::Delete | Op::DeleteOffline => block_on(ops::delete(io, &stack, &mut disk, f.guids[1], &|_, _| {})).map(|d| assert!(matches!(d, Deleted::Merged(_)))),
        Op::Switch => block_on(ops::switch(io, &stack, &mut disk, f.guids[1])).map(drop),
    });
    drop(stack); // the crash (or the end)
    (dir, r.err().map(|e| e.to_string()))
}

/// After a crash at any point: the disk opens from its descriptor and
/// shows the data (for a switch: the old content or the snapshot's, by
/// which descriptor is there); every named delta is clean once reopened
/// and closed; every surviving snapshot shows its content.
fn verify_disk(f: &Fixture, op: Op, dir: &Path, ctx: &str) {
    let mut disk = Disk::load(dir).unwrap_or_else(|e| panic!("{ctx}: the descriptor does not load: {e}"));
    let stack = open_as(&disk, None, false, op.offline());
    let before = read_all(&stack);
    // The next open finishes a merge the crash interrupted.
    quiesced(|| block_on(ops::finish_merges(&SyncIo, &stack, &mut disk))).unwrap_or_else(|e| panic!("{ctx}: finishing a half-done merge: {e}"));
    assert!(disk.desc.shots.iter().all(|s| s.temporary == ublk_ploop::disk::Temporary::No), "{ctx}: a temporary snapshot is left");
    let got = read_all(&stack);
    assert!(got == before, "{ctx}: finishing the merge changed the data");
    // Switched once the descriptor names a new top file.
    let switched = op == Op::Switch && disk.desc.image(TOP_GUID).map(|i| &i.file) != Some(&f.top_file);
    let want = if switched { &f.snapshot_models[&f.guids[1]] } else { &f.model };
    assert!(got == *want, "{ctx}: the disk does not show {} after the crash", if switched { "the snapshot" } else { "its data" });
    if op.offline() && disk.desc.images.len() == 2 {
        // Merged (now or on finishing): the top's GUID names the file of
        // the snapshot it was folded into.
        assert_eq!(disk.desc.image(TOP_GUID).unwrap().file, f.parent_file, "{ctx}: the offline merge did not keep the parent's file");
    }
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    for g in &f.guids {
        if disk.desc.shot(*g).is_some() {
            let snap = open(&disk, Some(*g), true);
            assert!(read_all(&snap) == f.snapshot_models[g], "{ctx}: snapshot {g} changed");
        }
    }
    check_files(&disk, ctx);
}

#[test]
fn a_fault_at_any_step_of_snapshot_merge_delete_or_switch_loses_nothing() {
    let f = fixture("diskops-faults");
    let mut failed = vec![];
    let mut runs = 0;
    for op in [Op::Snapshot, Op::MergeTop, Op::MergeLower, Op::Delete, Op::Switch, Op::MergeTopOffline, Op::DeleteOffline] {
        // The reference run: no fault; count what the operation issues.
        let io = Injector::new(None);
        let (dir, err) = run_op(&f, op, &io, &format!("{op:?}-ref"));
        assert!(err.is_none(), "{op:?} without a fault: {err:?}");
        verify_disk(&f, op, &dir, &format!("{op:?} without a fault"));
        let c = io.counts();
        assert!(c.renames >= 1, "{op:?} stored no descriptor? {c:?}");
        for (kind, index, n) in c.points(&[Kind::Write, Kind::Sync, Kind::Rename, Kind::Read, Kind::Grow, Kind::Truncate, Kind::Punch]) {
            runs += 1;
            let ctx = format!("{op:?}, disk dies at {kind:?} #{index} of {n}");
            let io = Injector::new(Some(Fault { kind, index, sticky: true }));
            let (dir, err) = run_op(&f, op, &io, &format!("{op:?}-{kind:?}-{index}"));
            if err.is_none() {
                // Faults after the operation's last durable step may go
                // unreported: closing the old top after a snapshot, or
                // the old top a switch throws away.
                if op != Op::Snapshot && op != Op::Switch {
                    failed.push(format!("{ctx}: the operation succeeded despite the fault"));
                    continue;
                }
            }
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| verify_disk(&f, op, &dir, &ctx))) {
                failed.push(p.downcast_ref::<String>().cloned().unwrap_or_else(|| format!("{ctx}: panicked")));
            }
        }
    }
    eprintln!("{runs} fault runs");
    assert!(failed.is_empty(), "{} of {runs} fault runs failed:\n{}", failed.len(), failed.join("\n"));
}

/// After a sync of the top failed, what it covered may be gone from the
/// top's file: a merge copying the top into its parent's file would make a
/// later flush succeed on a fresh file, as if those writes were durable.
/// It is refused, like writes, until a restart checks the image (sim seed
/// 26125928319775 found the merge going ahead).
#[test]
fn a_merge_of_the_top_is_refused_after_its_sync_failed() {
    let g = Geometry { cluster: 64 << 10, clusters: 16, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-sync-failed");
    let (mut disk, mut model) = full_disk(&dir.join("ct"), &g);
    let stack = open(&disk, None, false);
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    write_at(&stack, &mut model, 60, 3 * g.cluster, 8192);
    let io = Injector::new(None);
    io.fail_next(Kind::Sync);
    block_on(stack.flush(&io)).expect_err("the flush's sync was made to fail");
    let e = block_on(ops::merge(&io, &stack, &mut disk, None, &|_, _| {})).expect_err("a merge went ahead after a failed sync");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    block_on(stack.flush(&io)).expect_err("a flush succeeded after a failed sync");
    assert_eq!(disk.desc.images.len(), 2, "the merge changed the descriptor");
}

/// Run again after an interruption, `snapshot-merge` of the top is the
/// merge the start finishes: it succeeds and merges nothing more (here the
/// chain is base <- snapshot <- top, the snapshot left temporary by a merge
/// of the top into it; merging again would fold the snapshot into the base).
#[test]
fn rerunning_an_interrupted_merge_of_the_top_finishes_it_and_nothing_more() {
    let g = Geometry { cluster: 64 << 10, clusters: 16, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-rerun");
    let (mut disk, mut model) = full_disk(&dir.join("ct"), &g);
    let stack = open(&disk, None, false);
    let first = block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    write_at(&stack, &mut model, 50, 2 * g.cluster, 8192);
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    write_at(&stack, &mut model, 51, 5 * g.cluster, 8192);
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    // As a merge of the top leaves it once it marked the parent.
    let parent = disk.desc.shot(TOP_GUID).unwrap().parent;
    disk.desc.shots.iter_mut().filter(|s| s.guid == parent).for_each(|s| s.temporary = Temporary::Temporary);
    block_on(disk.store(&SyncIo)).unwrap();
    let r = common::ploop(["snapshot-merge", disk.dir.to_str().unwrap(), "--json"]);
    r.ok();
    assert_eq!(r.json()["parent"], parent.to_string(), "{}", r.stdout);
    let disk = Disk::load(&disk.dir).unwrap();
    assert_eq!(disk.desc.images.len(), 2, "more than the interrupted merge ran");
    assert_eq!(disk.desc.shot(TOP_GUID).unwrap().parent, first.guid, "the top's parent is the first snapshot");
    let stack = open(&disk, None, true);
    assert!(read_all(&stack) == model, "the disk does not show its data");
    drop(stack);
    check_files(&disk, "rerun");
}

/// A snapshot a merge was interrupted in (marked temporary, one child)
/// holds some of its child's clusters: served or converted on its own it
/// would show a mix it never showed. Its file's mark cannot tell (a merge
/// that failed cleanly closed it clean), so, as ploop, a temporary
/// snapshot with one child is not served: it is refused with the way out,
/// which works; a snapshot below it, and the disk, still open.
#[test]
fn a_half_merged_snapshot_is_refused_with_the_way_out() {
    let g = Geometry { cluster: 64 << 10, clusters: 16, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-half-merged-snap");
    let (mut disk, mut model) = full_disk(&dir.join("ct"), &g);
    let stack = open(&disk, None, false);
    let first = block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    write_at(&stack, &mut model, 60, 2 * g.cluster, 8192);
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    write_at(&stack, &mut model, 61, 5 * g.cluster, 8192);
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let parent = disk.desc.shot(TOP_GUID).unwrap().parent;
    disk.desc.shots.iter_mut().filter(|s| s.guid == parent).for_each(|s| s.temporary = Temporary::Temporary);
    block_on(disk.store(&SyncIo)).unwrap();
    let e = disk.layers(Some(parent)).expect_err("a half-merged snapshot opened");
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    let way_out = format!("snapshot-merge {} -u {TOP_GUID}", disk.dir.display());
    assert!(e.to_string().contains(&way_out), "{e}");
    disk.layers(Some(first.guid)).expect("a snapshot below the half-merged one");
    disk.layers(None).expect("the disk");
    let out = dir.join("snap.raw");
    let r = common::ploop(["convert", disk.dir.to_str().unwrap(), out.to_str().unwrap(), "--to", "raw", "--snapshot", &parent.to_string()]);
    assert_ne!(r.code, Some(0), "converting a half-merged snapshot: {}", r.stdout);
    assert!(r.stderr.contains("marked temporary"), "{}", r.stderr);
    assert!(!out.exists(), "the refused conversion left {}", out.display());
    common::ploop(["snapshot-merge", disk.dir.to_str().unwrap(), "-u", &TOP_GUID.to_string()]).ok();
    let disk = Disk::load(&disk.dir).unwrap();
    assert!(disk.desc.shot(parent).is_none(), "the way out did not finish the merge");
    let stack = open(&disk, None, true);
    assert!(read_all(&stack) == model, "the disk does not show its data");
    drop(stack);
    check_files(&disk, "after the way out");
}

#[test]
fn a_merge_killed_at_any_moment_loses_nothing() {
    // The offline merge runs in a child process that is killed (SIGKILL)
    // at increasing moments; the disk then opens with the same data, and
    // the merge can be run again to its end.
    let g = Geometry { cluster: 1 << 20, clusters: 96, stripe: 1 << 18 };
    let dir = TempDir::new("diskops-kill");
    let (mut disk, mut model) = full_disk(&dir.join("ct"), &g);
    {
        let stack = open(&disk, None, false);
        quiesced(|| block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None))).unwrap();
        let data = pattern(9, 40 << 20, 8 << 20);
        block_on(stack.write(&SyncIo, 40 << 20, &data)).unwrap();
        model[40 << 20..48 << 20].copy_from_slice(&data);
        block_on(stack.close(&SyncIo)).unwrap();
    }
    let pristine = dir.join("pristine");
    copy_dir(&disk.dir, &pristine);
    for delay_ms in [5u64, 20, 60, 150, 400] {
        let ctx = format!("merge killed after {delay_ms} ms");
        let run = dir.join(&format!("run-{delay_ms}"));
        copy_dir(&pristine, &run);
        let mut child = std::process::Command::new(common::bin())
            .args(["snapshot-merge", run.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let disk = Disk::load(&run).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let stack = open(&disk, None, false);
        assert!(read_all(&stack) == model, "{ctx} ({status}): the disk does not show its data");
        block_on(stack.close(&SyncIo)).unwrap();
        drop(stack);
        // And the merge runs to its end (unless it got there before the kill).
        if disk.desc.images.len() > 1 {
            common::ploop(["snapshot-merge", run.to_str().unwrap()]).ok();
        }
        let disk = Disk::load(&run).unwrap();
        assert_eq!(disk.desc.images.len(), 1, "{ctx}: the merge left more than one delta");
        let stack = open(&disk, None, true);
        assert!(read_all(&stack) == model, "{ctx}: the merged disk does not show its data");
        drop(stack);
        check_files(&disk, &ctx);
        assert_eq!(disk.desc.images[0].file, "root.hds", "{ctx}: the offline merge did not keep the base's file");
    }
}

#[test]
fn an_offline_merge_copies_only_the_top_into_its_parent_and_keeps_its_name() {
    // ploop's offline merge: the top's clusters are copied into the
    // parent's file, which stays (root.hds here); nothing of the parent is
    // copied. The base is full (12 clusters); the top holds 2 of them.
    let g = Geometry { cluster: 64 << 10, clusters: 12, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-fold");
    let (mut disk, mut model) = full_disk(&dir.join("ct"), &g);
    let stack = open(&disk, None, false);
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    write_at(&stack, &mut model, 3, 2 * g.cluster + 512, 4096);
    write_at(&stack, &mut model, 4, 7 * g.cluster, g.cluster as usize);
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let top = disk.file_path(disk.desc.image(TOP_GUID).unwrap());
    let base_len = std::fs::metadata(disk.dir.join("root.hds")).unwrap().len();

    let stack = open_as(&disk, None, false, true);
    let merged = block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &|_, _| {})).unwrap();
    assert_eq!(merged.clusters, 2, "the merge copied more than the top's clusters");
    assert_folded_into_base(stack, &disk, &model, &top, base_len, "offline");
}

/// After a merge of the top into a full base: one image, `root.hds` as
/// the top, the top's file gone, the base no larger (it held every cluster,
/// so they were overwritten in place), and the data, served and reopened.
fn assert_folded_into_base(stack: Stack, disk: &Disk, model: &[u8], top: &Path, base_len: u64, ctx: &str) {
    assert_eq!(disk.desc.images.len(), 1, "{ctx}");
    assert_eq!(disk.desc.image(TOP_GUID).unwrap().file, "root.hds", "{ctx}: the base's file is the top now");
    assert!(read_all(&stack) == model, "{ctx}: the merged stack does not show the data");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    assert!(!top.exists(), "{ctx}: the top's file was left");
    assert_eq!(std::fs::metadata(disk.dir.join("root.hds")).unwrap().len(), base_len, "{ctx}: the base grew");
    let disk = Disk::load(&disk.dir).unwrap();
    let stack = open(&disk, None, true);
    assert!(read_all(&stack) == model, "{ctx}: the merged disk does not show its data after a reopen");
    drop(stack);
    check_files(&disk, ctx);
}

#[test]
fn an_online_merge_copies_only_the_top_into_its_parent_and_keeps_its_name() {
    // Served: the top's clusters are copied into the parent's file while
    // requests go on. A write to a cluster already copied is carried into
    // the parent's file as well; a cluster new in the top is copied by the
    // next round. The base is full (24 clusters); the top holds 6 of them.
    // During the copy one of those is written again and a seventh is
    // written for the first time.
    let g = Geometry { cluster: 64 << 10, clusters: 24, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-fold-online");
    let (mut disk, model) = full_disk(&dir.join("ct"), &g);
    let model = std::cell::RefCell::new(model);
    let stack = open(&disk, None, false);
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    for c in [1, 3, 5, 7, 9, 11] {
        write_at(&stack, &mut model.borrow_mut(), c, c * g.cluster + 4096, 8192);
    }
    let top = disk.file_path(disk.desc.image(TOP_GUID).unwrap());
    let base_len = std::fs::metadata(disk.dir.join("root.hds")).unwrap().len();
    let written = std::cell::Cell::new(false);
    let during = |done: u64, _: u64| {
        if done > 0 && !written.replace(true) {
            write_at(&stack, &mut model.borrow_mut(), 40, g.cluster + 512, 4096);
            write_at(&stack, &mut model.borrow_mut(), 41, 20 * g.cluster, 4096);
        }
    };
    let merged = block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &during)).unwrap();
    assert!(written.get(), "the merge reported no progress: the writes meanwhile did not happen");
    let model = model.into_inner();
    assert_eq!(merged.clusters, 7, "the merge copied other than the top's 6 clusters and the one new meanwhile (a copied one was copied twice?)");
    assert!(!top.exists(), "the top's file was left while the stack serves");
    assert_folded_into_base(stack, &disk, &model, &top, base_len, "online");
}

/// Wait until `release` is set (polled again on every turn).
async fn until(release: &std::cell::Cell<bool>) {
    std::future::poll_fn(|cx| {
        if release.get() {
            std::task::Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// A disk whose top, over a full base, holds cluster 3: the disk, its
/// model, the served stack, the top's path and the base's length.
fn top_holding_cluster_3(dir: &TempDir, g: &Geometry) -> (Disk, Vec<u8>, Stack, PathBuf, u64) {
    let (mut disk, mut model) = full_disk(&dir.join("ct"), g);
    let stack = open(&disk, None, false);
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    write_at(&stack, &mut model, 1, 3 * g.cluster + 4096, 8192);
    let top = disk.file_path(disk.desc.image(TOP_GUID).unwrap());
    let base_len = std::fs::metadata(disk.dir.join("root.hds")).unwrap().len();
    (disk, model, stack, top, base_len)
}

/// Holds the first whole-cluster write into the base's file (a merge's
/// copy of a cluster into its parent) until released.
#[derive(Default)]
struct HoldCopy {
    cluster: u64,
    holding: std::cell::Cell<bool>,
    released: std::cell::Cell<bool>,
    done: std::cell::Cell<bool>,
}

impl common::hooked::Hook for HoldCopy {
    async fn around(&self, op: common::hooked::Op, run: impl std::future::Future<Output = std::io::Result<()>>) -> std::io::Result<()> {
        let copy = op.kind == common::hooked::Kind::Write && op.len == self.cluster && common::inject::fd_path(op.fd).ends_with("root.hds");
        if copy && !self.done.replace(true) {
            self.holding.set(true);
            until(&self.released).await;
            self.holding.set(false);
        }
        run.await
    }
}

#[test]
fn a_write_to_a_cluster_the_merge_is_copying_waits_for_the_copy_and_is_carried_over() {
    // The merge's copy of cluster 3 into the parent's file is held after
    // reading the top. A write to cluster 3 meanwhile must wait: landing in
    // the top alone it would be missing from the parent's file once the
    // copy's older bytes land. Released, it reaches both files, and the
    // merge copies nothing twice.
    let g = Geometry { cluster: 64 << 10, clusters: 24, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-fold-section");
    let (mut disk, mut model, stack, top, base_len) = top_holding_cluster_3(&dir, &g);
    let io = common::hooked::Hooked { inner: SyncIo, hook: HoldCopy { cluster: g.cluster, ..Default::default() } };
    let off = 3 * g.cluster + 8192;
    let data = pattern(2, off, 4096);
    let merged = {
        let mut merge = std::pin::pin!(ops::merge(&io, &stack, &mut disk, None, &|_, _| {}));
        assert!(block_on(futures_lite::future::poll_once(merge.as_mut())).is_none(), "the merge finished at once");
        assert!(io.hook.holding.get(), "the merge is not held in its copy into the parent's file");
        let mut write = std::pin::pin!(stack.write(&SyncIo, off, &data));
        assert!(block_on(futures_lite::future::poll_once(write.as_mut())).is_none(), "a write to the cluster being copied went on beside the copy");
        io.hook.released.set(true);
        let (merged, written) = block_on(futures_lite::future::zip(merge, write));
        written.unwrap();
        merged.unwrap()
    };
    model[off as usize..off as usize + 4096].copy_from_slice(&data);
    assert_eq!(merged.clusters, 1, "the merge copied the written cluster again instead of carrying the write over");
    assert_folded_into_base(stack, &disk, &model, &top, base_len, "write during the copy");
}

/// Holds, in the base's file, the first sync after a whole-cluster write
/// (the merge's, after its copies) and the first 4 KiB write (a write
/// carried over), each until released.
#[derive(Default)]
struct HoldSyncThenCarry {
    cluster: u64,
    copied: std::cell::Cell<bool>,
    sync_held: std::cell::Cell<bool>,
    carry_held: std::cell::Cell<bool>,
    release_sync: std::cell::Cell<bool>,
    release_carry: std::cell::Cell<bool>,
}

impl common::hooked::Hook for HoldSyncThenCarry {
    async fn around(&self, op: common::hooked::Op, run: impl std::future::Future<Output = std::io::Result<()>>) -> std::io::Result<()> {
        use common::hooked::Kind as K;
        let base = op.fd >= 0 && common::inject::fd_path(op.fd).ends_with("root.hds");
        if base && op.kind == K::Write && op.len == self.cluster {
            self.copied.set(true);
        }
        let (held, release) = match op.kind {
            K::Sync if base && self.copied.get() && !self.sync_held.get() => (&self.sync_held, &self.release_sync),
            K::Write if base && op.len == 4096 && !self.carry_held.get() => (&self.carry_held, &self.release_carry),
            _ => return run.await,
        };
        held.set(true);
        until(release).await;
        run.await
    }
}

#[test]
fn writes_to_one_copied_cluster_go_on_side_by_side_during_the_merge() {
    // Cluster 3 is copied; the merge is held in its sync. A write to it is
    // held in its carried copy into the parent's file; a second write to
    // other bytes of the same cluster must not wait for the first (they
    // share the cluster's section; only the merge's copy holds it alone).
    let g = Geometry { cluster: 64 << 10, clusters: 24, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-fold-shared");
    let (mut disk, mut model, stack, top, base_len) = top_holding_cluster_3(&dir, &g);
    let io = common::hooked::Hooked { inner: SyncIo, hook: HoldSyncThenCarry { cluster: g.cluster, ..Default::default() } };
    let (first, second) = (3 * g.cluster + 16384, 3 * g.cluster + 32768);
    let (a, b) = (pattern(2, first, 4096), pattern(3, second, 4096));
    let merged = {
        let mut merge = std::pin::pin!(ops::merge(&io, &stack, &mut disk, None, &|_, _| {}));
        assert!(block_on(futures_lite::future::poll_once(merge.as_mut())).is_none(), "the merge finished at once");
        assert!(io.hook.sync_held.get(), "the merge is not held in its sync after the copies");
        let mut held = std::pin::pin!(stack.write(&io, first, &a));
        assert!(block_on(futures_lite::future::poll_once(held.as_mut())).is_none(), "the first write was not carried over");
        assert!(io.hook.carry_held.get(), "the first write is not held in its carried copy");
        let second_done = block_on(futures_lite::future::poll_once(std::pin::pin!(stack.write(&io, second, &b))));
        second_done.expect("the second write waited for the first").unwrap();
        io.hook.release_carry.set(true);
        io.hook.release_sync.set(true);
        let (merged, written) = block_on(futures_lite::future::zip(merge, held));
        written.unwrap();
        merged.unwrap()
    };
    model[first as usize..first as usize + 4096].copy_from_slice(&a);
    model[second as usize..second as usize + 4096].copy_from_slice(&b);
    assert_eq!(merged.clusters, 1, "the merge copied a carried cluster again");
    assert_folded_into_base(stack, &disk, &model, &top, base_len, "writes sharing a copied cluster");
}

/// Merge the top online, running `meanwhile` once, when the first round
/// has copied every cluster the top held: a write to one of them is then
/// carried into the parent's file.
fn merge_then<I: Io>(io: &I, stack: &Stack, disk: &mut Disk, meanwhile: impl FnOnce()) -> ublk_ploop::Result<ops::Merged> {
    let meanwhile = std::cell::Cell::new(Some(meanwhile));
    let during = |done: u64, total: u64| {
        if done > 0 && done == total {
            if let Some(f) = meanwhile.take() {
                f();
            }
        }
    };
    let merged = quiesced(|| block_on(ops::merge(io, stack, disk, None, &during)));
    assert!(meanwhile.take().is_none(), "the merge's first round did not end: nothing ran during it");
    merged
}

#[test]
fn a_carried_write_whose_copy_into_the_parent_fails_succeeds_and_its_cluster_is_copied_again() {
    // Cluster 3 is copied; a write to it lands in the top, but its carried
    // copy into the parent's file fails. The top has the bytes, so the
    // write succeeds; the parent's file has the old ones, so the cluster
    // must be copied again, or the merged disk loses an acknowledged write.
    let g = Geometry { cluster: 64 << 10, clusters: 24, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-fold-carry-parent-fails");
    let (mut disk, mut model, stack, top, base_len) = top_holding_cluster_3(&dir, &g);
    let io = Trap::new(Kind::Write).on(&disk.dir.join("root.hds")).io();
    let off = 3 * g.cluster + 16384;
    let data = pattern(2, off, 4096);
    let merged = merge_then(&SyncIo, &stack, &mut disk, || {
        block_on(stack.write(&io, off, &data)).unwrap_or_else(|e| panic!("a write whose top part succeeded failed: {e}"));
        assert_eq!(io.failed(), 1, "the write was not carried into the parent's file");
    })
    .unwrap();
    model[off as usize..off as usize + 4096].copy_from_slice(&data);
    assert_folded_into_base(stack, &disk, &model, &top, base_len, "a carried write that failed in the parent's file");
    assert_eq!(merged.clusters, 2, "the merge copied other than cluster 3 twice");
}

#[test]
fn a_carried_write_that_fails_in_the_top_leaves_the_merged_disk_showing_what_the_top_showed() {
    // Cluster 3 is copied; a write to it fails in the top, but its carried
    // copy reaches the parent's file. The disk went on showing the top's
    // bytes: the merge must not make the failed write's bytes appear (the
    // cluster is copied again from the top).
    let g = Geometry { cluster: 64 << 10, clusters: 24, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-fold-carry-top-fails");
    let (mut disk, _, stack, top, base_len) = top_holding_cluster_3(&dir, &g);
    let io = Trap::new(Kind::Write).on(&top).io();
    let off = 3 * g.cluster + 4096;
    let data = pattern(2, off, 4096);
    let shown = std::cell::RefCell::new(vec![]);
    let merged = merge_then(&SyncIo, &stack, &mut disk, || {
        let e = block_on(stack.write(&io, off, &data)).expect_err("a write whose top part failed succeeded");
        assert_eq!(e.errno(), libc::EIO, "{e}");
        assert_eq!(io.failed(), 1);
        *shown.borrow_mut() = read_all(&stack);
    })
    .unwrap();
    let shown = shown.into_inner();
    assert!(shown[off as usize..off as usize + 4096] != data[..], "the top took the write: the test no longer covers the case");
    assert_folded_into_base(stack, &disk, &shown, &top, base_len, "a carried write that failed in the top");
    assert_eq!(merged.clusters, 2, "the merge copied other than cluster 3 twice");
}

#[test]
fn a_write_across_a_copied_and_an_uncopied_cluster_reaches_the_parent_in_both() {
    // Cluster 3 is copied, cluster 4 is not in the top (the parent holds
    // it). A write across both is carried into cluster 3 of the parent's
    // file; cluster 4 becomes new in the top, so the next round copies it.
    let g = Geometry { cluster: 64 << 10, clusters: 24, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-fold-straddle");
    let (mut disk, mut model, stack, top, base_len) = top_holding_cluster_3(&dir, &g);
    let off = 4 * g.cluster - 4096;
    let data = pattern(2, off, 8192);
    let merged = merge_then(&SyncIo, &stack, &mut disk, || block_on(stack.write(&SyncIo, off, &data)).unwrap()).unwrap();
    model[off as usize..off as usize + 8192].copy_from_slice(&data);
    assert_folded_into_base(stack, &disk, &model, &top, base_len, "a write across a copied and an uncopied cluster");
    assert_eq!(merged.clusters, 2, "the merge copied other than cluster 3 once and the new cluster 4");
}

#[test]
fn zeroes_and_discards_over_copied_clusters_read_as_zeros_after_the_merge() {
    // Zeroes and discards are never carried into the parent's file: once
    // clusters 3 and 5 are copied, part of 3 is zeroed and all of 5
    // discarded in the top alone, so both must be copied again, or the
    // merged disk shows the bytes they replaced.
    let g = Geometry { cluster: 64 << 10, clusters: 24, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-fold-zeroes");
    let (mut disk, mut model, stack, top, base_len) = top_holding_cluster_3(&dir, &g);
    write_at(&stack, &mut model, 5, 5 * g.cluster + 4096, 8192);
    let (zeroed, discarded) = (3 * g.cluster + 8192, 5 * g.cluster);
    let merged = merge_then(&SyncIo, &stack, &mut disk, || {
        block_on(stack.write_zeroes(&SyncIo, zeroed, 4096)).unwrap();
        block_on(stack.discard(&SyncIo, discarded, g.cluster as usize)).unwrap();
    })
    .unwrap();
    model[zeroed as usize..zeroed as usize + 4096].fill(0);
    model[discarded as usize..(discarded + g.cluster) as usize].fill(0);
    assert_folded_into_base(stack, &disk, &model, &top, base_len, "zeroes and a discard over copied clusters");
    assert_eq!(merged.clusters, 4, "the merge copied other than clusters 3 and 5 twice");
}

#[test]
fn a_discard_or_zeroes_failing_midway_during_the_merge_have_what_they_punched_copied_again() {
    // Over clusters 3 to 5 (3 and 5 copied, 4 only in the parent), a
    // discard or a write-zeroes punches 3 in the top, then fails on 5. The
    // disk shows 3 as zeros from then on: the merge must copy it again (a
    // failed change changed the disk too), and what the zeroes gave 4.
    let g = Geometry { cluster: 64 << 10, clusters: 24, stripe: 16 << 10 };
    for (what, recopied) in [("discard", 2), ("write-zeroes", 3)] {
        let dir = TempDir::new(&format!("diskops-fold-{what}-fails"));
        let (mut disk, mut model, stack, top, base_len) = top_holding_cluster_3(&dir, &g);
        write_at(&stack, &mut model, 5, 5 * g.cluster + 4096, 8192);
        let io = Trap::new(Kind::Punch).on(&top).skip(1).io();
        let shown = std::cell::RefCell::new(vec![]);
        let merged = merge_then(&SyncIo, &stack, &mut disk, || {
            let (at, len) = (3 * g.cluster, 3 * g.cluster as usize);
            let r = if what == "discard" { block_on(stack.discard(&io, at, len)) } else { block_on(stack.write_zeroes(&io, at, len)) };
            r.expect_err(&format!("a {what} whose second punch failed succeeded"));
            assert_eq!((io.seen(), io.failed()), (2, 1), "{what}: not the second punch that failed");
            *shown.borrow_mut() = read_all(&stack);
        })
        .unwrap();
        let shown = shown.into_inner();
        let third = 3 * g.cluster as usize..4 * g.cluster as usize;
        assert!(shown[third.clone()].iter().all(|&b| b == 0) && shown[third.clone()] != model[third], "{what}: the first punch did not show: the test no longer covers the case");
        let ctx = format!("a {what} that failed midway");
        assert_folded_into_base(stack, &disk, &shown, &top, base_len, &ctx);
        assert_eq!(merged.clusters, 2 + recopied, "{ctx}: the merge copied other than clusters 3 and 5, then those the {what} changed");
    }
}

#[test]
fn a_flush_failing_during_an_online_merge_stops_it_before_the_parent_becomes_the_top() {
    // A sync of the top fails while the merge copies: what it covered may
    // be gone from the top's file, and a merge that went on would make
    // the parent's file the top, where later flushes succeed as if those
    // writes were durable. The merge is refused at its end (as writes
    // are); the disk keeps its data, and a restart finishes the merge.
    let g = Geometry { cluster: 64 << 10, clusters: 24, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-fold-flush-fails");
    let (mut disk, model, stack, top, _) = top_holding_cluster_3(&dir, &g);
    let parent = disk.desc.shot(TOP_GUID).unwrap().parent;
    let io = Trap::new(Kind::Sync).on(&top).io();
    let e = merge_then(&SyncIo, &stack, &mut disk, || {
        block_on(stack.flush(&io)).expect_err("the flush's sync was made to fail");
    })
    .expect_err("the merge went ahead after a sync of the top failed during it");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_eq!(disk.desc.images.len(), 2, "the merge changed the descriptor");
    let stored = Disk::load(&disk.dir).unwrap();
    assert_eq!(stored.desc.images.len(), 2, "the descriptor on disk changed");
    assert!(stored.desc.shot(parent).is_some_and(|s| s.temporary != Temporary::No), "the parent is not left marked half merged");
    assert_eq!(disk.desc.image(TOP_GUID).map(|i| disk.file_path(i)), Some(top.clone()), "the top is not the top's file any more");
    assert!(read_all(&stack) == model, "the served disk after the refused merge");
    block_on(stack.write(&SyncIo, 0, &pattern(3, 0, 4096))).expect_err("a write after the failed sync");
    drop(stack);
    let mut disk = Disk::load(&disk.dir).unwrap();
    let stack = open(&disk, None, false);
    assert!(read_all(&stack) == model, "the restarted disk does not show its data");
    let finished = quiesced(|| block_on(ops::finish_merges(&SyncIo, &stack, &mut disk))).unwrap();
    assert_eq!(finished.len(), 1, "the start did not finish the interrupted merge");
    assert!(read_all(&stack) == model, "the disk after finishing the merge");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    check_files(&disk, "a merge stopped by a failed flush");
}

#[test]
fn an_online_merge_that_cannot_tell_which_descriptor_is_stored_closes_the_stack() {
    // The descriptor naming the parent's file as the top is renamed into
    // place, but no directory sync succeeds (nor that of putting the old
    // one back, nor that of storing the new one again): either may be on
    // disk. The two files read the same now, but only one may take the
    // next write, so the stack closes; both files stay, and the disk
    // opens with its data from the descriptor found.
    let g = Geometry { cluster: 64 << 10, clusters: 24, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-fold-uncertain");
    let (mut disk, model, stack, top, _) = top_holding_cluster_3(&dir, &g);
    // The directory sync of marking the parent temporary passes.
    let io = Trap::new(Kind::SyncDir).skip(1).fail(3).io();
    let e = merge_then(&io, &stack, &mut disk, || {}).expect_err("the merge succeeded although no directory sync of its descriptor did");
    assert_eq!(io.failed(), 3, "not the three directory syncs of the merge's descriptor that failed ({e})");
    assert_eq!(e.kind(), ErrorKind::DescriptorUncertain, "{e}");
    let write = block_on(stack.write(&SyncIo, 3 * g.cluster, &pattern(3, 3 * g.cluster, 4096)));
    assert!(write.is_err(), "a write was taken after the merge could not tell which descriptor is stored");
    assert!(top.exists() && disk.dir.join("root.hds").exists(), "a file either descriptor names was removed");
    drop(stack);
    let disk = Disk::load(&disk.dir).unwrap();
    assert_named_files_exist(&disk.dir, "after the uncertain merge");
    let stack = open(&disk, None, false);
    assert!(read_all(&stack) == model, "the disk opened from the stored descriptor does not show its data");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    check_files(&disk, "an uncertain merge");
}

#[test]
fn a_lower_merge_grows_its_parent_without_serving_stale_reads() {
    // A delta grown online (only the top grows) and then frozen by a
    // snapshot is larger than its parent: merging it grows the parent
    // first. Past 1 GiB of 64 KiB clusters the parent's table needs a
    // second cluster, and the data cluster in its way moves to the end of
    // the file; the served stack must read that cluster from its new place
    // from then on, not the table's bytes at the old one.
    let g = Geometry { cluster: 64 << 10, clusters: 12, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-lower-grow");
    let (mut disk, model) = full_disk(&dir.join("ct"), &g);
    let stack = open(&disk, None, false);
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    block_on(stack.grow_top(&SyncIo, 2 << 30)).unwrap();
    let mut head = model.clone();
    write_at(&stack, &mut head, 7, 5 * g.cluster + 512, 4096);
    let frozen = block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap().guid;
    // (qemu-img 7.2's check counts the table of an empty image whose table
    // spans clusters as leaked: the top gets data too.)
    write_at(&stack, &mut head, 8, 2 * g.cluster, 4096);
    let read_head = |stack: &Stack| read_range(stack, 0, head.len());
    let checked = std::cell::Cell::new(0);
    let during = |_: u64, _: u64| {
        checked.set(checked.get() + 1);
        assert!(read_head(&stack) == head, "a read during the merge, after the parent grew, does not show the data");
    };
    let merged = block_on(ops::merge(&SyncIo, &stack, &mut disk, Some(frozen), &during)).unwrap();
    assert!(checked.get() > 0, "the merge reported no progress: nothing was read during it");
    assert_eq!(merged.clusters, 1);
    assert!(read_head(&stack) == head, "the merged stack does not show the data");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let disk = Disk::load(&disk.dir).unwrap();
    let stack = open(&disk, None, true);
    assert!(read_head(&stack) == head, "the merged disk does not show its data after a reopen");
    drop(stack);
    check_files(&disk, "lower merge into a grown parent");
}

#[test]
fn an_online_merge_of_a_grown_top_grows_its_parent_while_requests_are_held() {
    // The same for the top, grown online past 1 GiB after the snapshot: the
    // parent grows to its size first (moving a data cluster out of its
    // larger table's way) and keeps its name; reads during the merge and
    // after it show the data, the part past the parent's old end included.
    let g = Geometry { cluster: 64 << 10, clusters: 12, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-fold-grown-online");
    let (mut disk, model) = full_disk(&dir.join("ct"), &g);
    let stack = open(&disk, None, false);
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    let grown = 2u64 << 30;
    block_on(stack.grow_top(&SyncIo, grown)).unwrap();
    let mut head = model.clone();
    write_at(&stack, &mut head, 7, 3 * g.cluster, 4096);
    let far = grown - g.cluster;
    let far_data = pattern(9, far, 8192);
    block_on(stack.write(&SyncIo, far, &far_data)).unwrap();
    let shows = |stack: &Stack| read_range(stack, 0, head.len()) == head && read_range(stack, far, far_data.len())[..] == far_data[..];
    let during = |_: u64, _: u64| assert!(shows(&stack), "a read during the merge does not show the data");
    let merged = block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &during)).unwrap();
    assert_eq!(merged.clusters, 2);
    assert_eq!(disk.desc.image(TOP_GUID).unwrap().file, "root.hds", "the base's file is the top now");
    assert!(shows(&stack), "the merged stack does not show the data");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let disk = Disk::load(&disk.dir).unwrap();
    let stack = open(&disk, None, true);
    assert_eq!(stack.size(), grown);
    assert!(shows(&stack), "the merged disk does not show its data after a reopen");
    drop(stack);
    check_files(&disk, "online merge of a grown top");
}

#[test]
fn a_snapshot_after_merging_the_top_into_the_base_locks_the_new_base() {
    // The daemon runs a merge as a job on a copy of its disk; merging the
    // top into the base removes one of the two files the older copy names
    // (the top's, now that the base's file becomes the top; root.hds, when
    // the merge copied the base up). The next command starts from the
    // daemon's older copy and must still find the base to lock (found by
    // the write-log replay test in the VM: "root.hds: No such file or
    // directory").
    let g = Geometry { cluster: 64 << 10, clusters: 12, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-stale");
    let (mut disk, mut model) = full_disk(&dir.join("ct"), &g);
    let stack = open(&disk, None, false);
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    let old_top = disk.file_path(disk.desc.image(TOP_GUID).unwrap());
    let data = pattern(5, g.cluster, 8192);
    block_on(stack.write(&SyncIo, g.cluster, &data)).unwrap();
    model[g.cluster as usize..g.cluster as usize + 8192].copy_from_slice(&data);
    let stale = disk.clone();
    block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &|_, _| {})).unwrap();
    assert!(!old_top.exists(), "the merged-away top's file was kept: the test no longer covers the case");
    let mut stale = stale;
    let s = block_on(ops::snapshot(&SyncIo, &stack, &mut stale, None)).unwrap_or_else(|e| panic!("snapshot after the merge: {e}"));
    assert_eq!(stale.desc.images.len(), 2, "the snapshot did not start from the descriptor on disk");
    assert!(stale.desc.shot(s.guid).is_some());
    assert!(read_all(&stack) == model);
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let disk = Disk::load(&disk.dir).unwrap();
    let stack = open(&disk, None, true);
    assert!(read_all(&stack) == model, "the disk after merge + snapshot does not show its data");
    drop(stack);
    check_files(&disk, "merge then snapshot");
}

// ---------------------------------------------------------------------------
// Faults the simulation found, each at its one place.

/// A 12-cluster disk whose base is full of data, served: the directory, the
/// disk, its stack and its content.
fn served(tag: &str) -> (TempDir, Disk, Stack, Vec<u8>) {
    let g = Geometry { cluster: 64 << 10, clusters: 12, stripe: 16 << 10 };
    let dir = TempDir::new(tag);
    let (disk, model) = full_disk(&dir.join("ct"), &g);
    let stack = open(&disk, None, false);
    (dir, disk, stack, model)
}

/// Write `len` bytes of pattern `seed` at `off`, in the model too.
fn write_at(stack: &Stack, model: &mut [u8], seed: u64, off: u64, len: usize) {
    let data = pattern(seed, off, len);
    block_on(stack.write(&SyncIo, off, &data)).unwrap();
    model[off as usize..off as usize + len].copy_from_slice(&data);
}

/// The files in a directory, but for ploop's lock file (which the first
/// operation creates and nothing removes).
fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lck"))
        .collect()
}

/// The descriptor on disk names only files that exist.
fn assert_named_files_exist(dir: &Path, ctx: &str) {
    let disk = Disk::load(dir).unwrap_or_else(|e| panic!("{ctx}: the descriptor on disk does not load: {e}"));
    for img in &disk.desc.images {
        assert!(disk.file_path(img).exists(), "{ctx}: the descriptor on disk names {}, which is gone", img.file);
    }
}

#[test]
fn a_snapshot_whose_descriptor_sync_fails_after_the_rename_puts_the_old_descriptor_back() {
    // The new descriptor is renamed into place, then the directory's sync
    // fails: the snapshot fails and removes its new top, so the descriptor
    // on disk must be the old one again, not one naming a removed file.
    let (_dir, mut disk, stack, model) = served("diskops-syncdir");
    let xml = disk.xml_path();
    let old_xml = std::fs::read(&xml).unwrap();
    let files = files_in(&disk.dir);
    let chain = stack.paths();
    let io = Trap::new(Kind::SyncDir).after(Kind::Rename).io();
    let err = quiesced(|| block_on(ops::snapshot(&io, &stack, &mut disk, None))).err().expect("the snapshot succeeded although its descriptor's directory sync failed");
    assert_eq!(io.failed(), 1, "the trap did not fire ({err})");
    assert!(std::fs::read(&xml).unwrap() == old_xml, "after {err}: the descriptor on disk is not the old one");
    assert_named_files_exist(&disk.dir, "after the failed snapshot");
    assert_eq!(files_in(&disk.dir), files, "after {err}: a new top or a temporary descriptor was left");
    assert_eq!(stack.paths(), chain, "the stack changed");
    let reloaded = Disk::load(&disk.dir).unwrap();
    let named: Vec<PathBuf> = reloaded.layers(None).unwrap().into_iter().map(|l| l.path).collect();
    assert_eq!(named, chain, "the descriptor on disk does not name the chain served");
    // The next snapshot goes through, and the disk keeps its data.
    let snap = quiesced(|| block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None))).unwrap_or_else(|e| panic!("the snapshot after the failed one: {e}"));
    assert!(read_all(&stack) == model, "the served disk lost its data");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let disk = Disk::load(&disk.dir).unwrap();
    assert_eq!(disk.desc.images.len(), 2, "one snapshot taken");
    assert!(disk.desc.shot(snap.guid).is_some());
    let again = open(&disk, None, true);
    assert!(read_all(&again) == model, "the disk reopened from its descriptor lost its data");
    drop(again);
    check_files(&disk, "after a failed then a good snapshot");
}

#[test]
fn a_new_disk_keeps_its_file_once_its_descriptor_is_in_place() {
    // `init` and `clone`: when storing the first descriptor fails before
    // its rename, nothing names the new file and it goes; when only the
    // directory's sync after the rename fails, the descriptor naming it is
    // there (and may survive a crash), so the file must stay.
    let g = Geometry { cluster: 64 << 10, clusters: 8, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-new-disk");
    let io = Trap::new(Kind::Rename).io();
    let e = block_on(Disk::init(&io, &dir.join("a"), g.size(), g.cluster)).expect_err("init succeeded although its rename failed");
    assert_eq!(io.failed(), 1, "the trap did not fire ({e})");
    assert!(files_in(&dir.join("a")).is_empty(), "after {e}: files left behind: {:?}", files_in(&dir.join("a")));
    let io = Trap::new(Kind::SyncDir).after(Kind::Rename).io();
    let e = block_on(Disk::init(&io, &dir.join("b"), g.size(), g.cluster)).expect_err("init succeeded although its directory sync failed");
    assert_eq!(io.failed(), 1, "the trap did not fire ({e})");
    let disk = Disk::load(&dir.join("b")).unwrap_or_else(|err| panic!("after {e}: the stored descriptor does not load: {err}"));
    assert_named_files_exist(&disk.dir, "after init's failed directory sync");
    let stack = open(&disk, None, false);
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    // The new directory's entry in its parent is synced as well, after
    // the descriptor's own directory.
    let io = Trap::new(Kind::SyncDir).skip(1).io();
    let e = block_on(Disk::init(&io, &dir.join("p"), g.size(), g.cluster)).expect_err("init succeeded although the sync of its parent failed");
    assert_eq!(io.failed(), 1, "no second directory sync ({e})");
    assert!(e.to_string().contains("which holds its directory"), "{e}");
    Disk::load(&dir.join("p")).unwrap_or_else(|err| panic!("after {e}: the made disk does not load: {err}"));
    // A clone is listed in its template's list of clones first: a failure
    // there makes nothing.
    let io = Trap::new(Kind::SyncDir).after(Kind::Rename).io();
    let e = block_on(ublk_ploop::disk::clone::clone_disk(&io, &disk.dir, &dir.join("c"), None, false)).expect_err("clone succeeded although listing it failed");
    assert_eq!(io.failed(), 1, "the trap did not fire ({e})");
    assert!(e.to_string().contains("listing the clone"), "{e}");
    assert!(files_in(&dir.join("c")).is_empty(), "after {e}: {:?}", files_in(&dir.join("c")));
    // Then its own descriptor: the second directory sync after a rename.
    let io = Trap::new(Kind::SyncDir).after(Kind::Rename).skip(1).io();
    let e = block_on(ublk_ploop::disk::clone::clone_disk(&io, &disk.dir, &dir.join("c"), None, false)).expect_err("clone succeeded although its directory sync failed");
    assert_eq!(io.failed(), 1, "the trap did not fire ({e})");
    assert!(!e.to_string().contains("listing the clone"), "{e}");
    let clone = Disk::load(&dir.join("c")).unwrap_or_else(|err| panic!("after {e}: the clone's descriptor does not load: {err}"));
    assert_named_files_exist(&clone.dir, "after clone's failed directory sync");
    let stack = open(&clone, None, false);
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
}

#[test]
fn a_snapshot_that_cannot_put_the_old_descriptor_back_keeps_its_new_top() {
    // The directory sync fails after the rename and again after putting
    // the old descriptor back: either may be on disk, so the new top,
    // which the new one names, must stay.
    let (_dir, mut disk, stack, model) = served("diskops-syncdir2");
    let files = files_in(&disk.dir);
    let io = Trap::new(Kind::SyncDir).after(Kind::Rename).fail(2).io();
    let err = quiesced(|| block_on(ops::snapshot(&io, &stack, &mut disk, None))).err().expect("the snapshot succeeded although every directory sync failed");
    assert_eq!(io.failed(), 2, "the old descriptor was not put back ({err})");
    assert_eq!(err.kind(), ErrorKind::DescriptorUncertain, "{err}");
    let added: Vec<String> = files_in(&disk.dir).difference(&files).cloned().collect();
    assert_eq!(added.len(), 1, "the new top was not kept (or more was left): {added:?}");
    assert_named_files_exist(&disk.dir, "after the double failure");
    // The stored descriptor may call the old top a snapshot: a write into
    // it would change that snapshot, so the stack takes none.
    let write = block_on(stack.write(&SyncIo, 0, &vec![0x5a; 4096]));
    assert!(write.is_err(), "a write was taken after the snapshot could not tell which descriptor is stored");
    drop(stack);
    // The new top, as a descriptor naming it would serve it: empty.
    let top = disk.dir.join(&added[0]);
    let report = ploop_check(&top, false, "the kept new top");
    assert_eq!(report.allocated_clusters, 0, "the kept new top holds data: {report:?}");
    let disk = Disk::load(&disk.dir).unwrap();
    let stack = open(&disk, None, false);
    assert!(read_all(&stack) == model, "the disk opened from the stored descriptor does not show its data");
    block_on(stack.close(&SyncIo)).unwrap();
}

#[test]
fn a_former_top_whose_close_failed_is_closed_before_the_next_operation() {
    // A snapshot swaps in its new top, then closing the former top fails
    // (a transient EIO while it gives back its grown-ahead space). The
    // snapshot stands; the former top keeps its exclusive lock until it
    // is closed again, which the next operation does first, so that a
    // lower merge into it goes through and it ends clean.
    let (_dir, mut disk, stack, mut model) = served("diskops-retire");
    let former = disk.file_path(disk.desc.image(disk.desc.top).unwrap());
    let io = Trap::new(Kind::Truncate).on(&former).io();
    let err = quiesced(|| block_on(ops::snapshot(&io, &stack, &mut disk, None))).err().expect("the snapshot succeeded although closing the former top failed");
    assert_eq!(io.failed(), 1, "the trap did not fire ({err})");
    assert!(err.to_string().contains("closing the frozen layer"), "not the close that failed: {err}");
    let frozen = disk.desc.shot(disk.desc.top).unwrap().parent;
    assert_eq!(disk.desc.image(frozen).map(|i| disk.file_path(i)), Some(former.clone()), "the snapshot did not stand");
    // A child of the former top below the top: new data, snapshotted.
    write_at(&stack, &mut model, 11, 2 << 16, 3 << 16);
    let child = quiesced(|| block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None))).unwrap_or_else(|e| panic!("the next snapshot: {e}")).guid;
    assert_eq!(disk.desc.shot(child).unwrap().parent, frozen);
    let merged = quiesced(|| block_on(ops::merge(&SyncIo, &stack, &mut disk, Some(child), &|_, _| {})))
        .unwrap_or_else(|e| panic!("merging into the former top: {e}"));
    assert_eq!(merged.parent, frozen);
    assert!(read_all(&stack) == model, "the served disk after the merge");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let report = ploop_check(&former, false, "the former top");
    assert!(!report.unclean, "the former top is still marked in use after a clean stop: {report:?}");
    let disk = Disk::load(&disk.dir).unwrap();
    let again = open(&disk, None, true);
    assert!(read_all(&again) == model, "the disk reopened from its descriptor lost its data");
    drop(again);
    check_files(&disk, "after the retried close and the merge");
}

#[test]
fn a_lower_merge_failing_midway_leaves_its_parent_closed() {
    // A lower delta is copied into its parent's file through a writable
    // opening of it, which marks it in use; a read of the child fails in
    // the second batch. That opening must be closed: after a clean stop
    // the parent carries no in-use mark.
    let (_dir, mut disk, stack, mut model) = served("diskops-copyfail");
    quiesced(|| block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None))).unwrap();
    // The child holds every cluster: more than one batch (8) to copy.
    write_at(&stack, &mut model, 12, 0, 12 << 16);
    quiesced(|| block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None))).unwrap();
    let child = disk.desc.shot(disk.desc.top).unwrap().parent;
    let parent = disk.desc.shot(child).unwrap().parent;
    let cpath = disk.file_path(disk.desc.image(child).unwrap());
    let ppath = disk.file_path(disk.desc.image(parent).unwrap());
    let io = Trap::new(Kind::Read).on(&cpath).skip(9).io();
    let err = quiesced(|| block_on(ops::merge(&io, &stack, &mut disk, Some(child), &|_, _| {}))).err().expect("the merge succeeded although reading its child failed");
    assert_eq!(io.failed(), 1, "the trap did not fire ({err})");
    assert!(err.to_string().contains(&*cpath.to_string_lossy()), "not the child's read that failed: {err}");
    assert!(read_all(&stack) == model, "the served disk after the failed merge");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let report = ploop_check(&ppath, false, "the parent of the failed merge");
    assert!(!report.unclean, "the parent of a failed merge is still marked in use after a clean stop: {report:?}");
}

#[test]
fn an_offline_merge_of_a_grown_top_grows_its_parent_first() {
    // Only the top grows online: folding it into its smaller parent grows
    // the parent to the disk's size first, or clusters past its end would
    // have nowhere to go.
    let g = Geometry { cluster: 64 << 10, clusters: 12, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-fold-grown");
    let (mut disk, mut model) = full_disk(&dir.join("ct"), &g);
    let stack = open(&disk, None, false);
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    let grown = 40 * g.cluster;
    block_on(stack.grow_top(&SyncIo, grown)).unwrap();
    model.resize(grown as usize, 0);
    write_at(&stack, &mut model, 8, 30 * g.cluster + 4096, 8192);
    write_at(&stack, &mut model, 9, g.cluster, 4096);
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let mut disk = Disk::load(&disk.dir).unwrap();
    let stack = open_as(&disk, None, false, true);
    let merged = block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &|_, _| {})).unwrap();
    assert_eq!(merged.clusters, 2);
    assert_eq!(disk.desc.image(TOP_GUID).unwrap().file, "root.hds");
    assert!(read_all(&stack) == model, "the folded stack does not show the data");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let disk = Disk::load(&disk.dir).unwrap();
    let stack = open(&disk, None, true);
    assert_eq!(stack.size(), grown);
    assert!(read_all(&stack) == model, "the merged disk does not show its data after a reopen");
    drop(stack);
    check_files(&disk, "folded after a grow");
}

#[test]
fn a_writable_start_syncs_its_lower_layers_unless_their_filesystem_cannot() {
    // A process killed while a snapshot froze the old top may leave that
    // delta's last writes in the page cache; the device's flushes sync
    // only the top, so a start makes the lower layers durable before it
    // serves them (simulation seed 12432250630278). A failed sync of one
    // stops the start; a filesystem that cannot sync at all (EINVAL:
    // squashfs, iso9660) or is read-only (EROFS) holds nothing unsynced.
    let (_dir, mut disk, stack, model) = served("diskops-sync-lowers");
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let lower = disk.dir.join("root.hds");
    let layers = disk.layers(None).unwrap();
    let opts = StackOptions { read_only: false, offline: false, ..Default::default() };
    let trap = Trap::new(Kind::Sync).on(&lower).fail(u64::MAX);
    let io = trap.io();
    let e = block_on(Stack::open_layers(&io, &layers, &opts)).err().expect("a start whose lower layer does not sync");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(io.hook.seen() >= 1, "the lower layer was not synced");
    for errno in [libc::EINVAL, libc::EROFS] {
        let io = Trap::new(Kind::Sync).on(&lower).fail(u64::MAX).errno(errno).io();
        let (stack, _) = retry_busy(|| block_on(Stack::open_layers(&io, &layers, &opts))).unwrap_or_else(|e| panic!("errno {errno}: {e}"));
        assert_eq!(io.hook.seen(), 1, "errno {errno}");
        assert!(read_all(&stack) == model);
        block_on(stack.close(&SyncIo)).unwrap();
    }
    check_files(&disk, "after the starts");
}

#[test]
fn a_failed_lower_merge_leaves_the_stack_seeing_what_its_parent_now_holds() {
    // A lower merge that fails after linking clusters into its parent's
    // file leaves them there (the parent is marked temporary; the child
    // above still covers them). The stack's opening of the parent must
    // learn of them: once the child is gone, a compaction that believed
    // nothing lay below a discarded cluster of the top unlinked it, and
    // the reopened disk showed the child's old data from the parent
    // (simulation seed 1255208727134).
    let g = Geometry { cluster: 64 << 10, clusters: 12, stripe: 16 << 10 };
    let dir = TempDir::new("diskops-stale-parent");
    let mut disk = block_on(Disk::init(&SyncIo, &dir.join("ct"), g.size(), g.cluster)).unwrap();
    let stack = open(&disk, None, false);
    let base = disk.dir.join("root.hds");
    let s1 = block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    let mut model = vec![0u8; g.size() as usize];
    write_at(&stack, &mut model, 3, 3 * g.cluster, g.cluster as usize);
    let s2 = block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    // s2 (holding cluster 3) into the empty base: the base's syncs pass
    // until its entries are written (the in-use mark's, the copy's data
    // sync), then its close's sync fails.
    let io = Trap::new(Kind::Sync).on(&base).skip(3).fail(u64::MAX).io();
    let e = block_on(ops::merge(&io, &stack, &mut disk, Some(s2.guid), &|_, _| {})).err().expect("the merge's close fails");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(io.hook.failed() >= 1);
    {
        // The copy linked cluster 3 in the base's file before it failed.
        let (l, _) = block_on(ublk_ploop::layers::Layer::open(&SyncIo, &base, ublk_ploop::layers::Format::Ploop, false, ublk_ploop::io::Direct::Off)).unwrap();
        assert!(l.lookup(3, g.cluster).is_some(), "the failure came before the link: the test no longer covers the case");
    }
    assert!(read_all(&stack) == model);
    // The child goes (copied up into the top), the top's cluster 3 is
    // discarded and the top compacted.
    quiesced(|| block_on(ops::delete(&SyncIo, &stack, &mut disk, s2.guid, &|_, _| {}))).unwrap();
    block_on(stack.discard(&SyncIo, 3 * g.cluster, g.cluster as usize)).unwrap();
    model[3 * g.cluster as usize..4 * g.cluster as usize].fill(0);
    block_on(stack.compact(&SyncIo, 64, &|_, _| {})).unwrap();
    assert!(read_all(&stack) == model, "the served disk");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let mut disk = Disk::load(&disk.dir).unwrap();
    let stack = open(&disk, None, false);
    assert!(read_all(&stack) == model, "the reopened disk shows the deleted snapshot's data again");
    quiesced(|| block_on(ops::finish_merges(&SyncIo, &stack, &mut disk))).unwrap();
    assert!(read_all(&stack) == model, "after finishing the merge");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let _ = s1;
    check_files(&disk, "after the failed merge");
}

/// The fold's edges: carried writes failing in one file, a table write
/// failing in either, zeroes and discards over copied clusters, writes
/// across copied and uncopied clusters, and futures dropped half way.
mod fold_edges {
    use super::*;
    use common::hooked::{Hook, Hooked, Kind as K, Op};
    use std::cell::{Cell, RefCell};

    type Rule = Box<dyn Fn(&Op, &Path) -> bool>;

    /// Holds the merge in the base's first sync after a whole-cluster write
    /// into it (the copy's sync, before the copy links), fails the first
    /// operation `fail` matches (EIO, before it touches the file), and holds
    /// the first operation `hold` matches until `release_op`.
    #[derive(Default)]
    pub struct Script {
        pub cluster: u64,
        pub copied: Cell<bool>,
        pub sync_held: Cell<bool>,
        pub release_sync: Cell<bool>,
        pub fail: RefCell<Option<Rule>>,
        pub failed: Cell<u32>,
        pub hold: RefCell<Option<Rule>>,
        pub op_held: Cell<bool>,
        pub release_op: Cell<bool>,
    }

    impl Hook for Script {
        async fn around(&self, op: Op, run: impl std::future::Future<Output = std::io::Result<()>>) -> std::io::Result<()> {
            let path = if op.fd >= 0 { common::inject::fd_path(op.fd) } else { PathBuf::new() };
            let base = path.ends_with("root.hds");
            if base && op.kind == K::Write && op.len == self.cluster {
                self.copied.set(true);
            }
            let fails = self.fail.borrow().as_ref().is_some_and(|f| f(&op, &path));
            if fails {
                *self.fail.borrow_mut() = None;
                self.failed.set(self.failed.get() + 1);
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            let holds = self.hold.borrow().as_ref().is_some_and(|f| f(&op, &path));
            if holds {
                *self.hold.borrow_mut() = None;
                self.op_held.set(true);
                until(&self.release_op).await;
                return run.await;
            }
            if base && op.kind == K::Sync && self.copied.get() && !self.sync_held.get() {
                self.sync_held.set(true);
                until(&self.release_sync).await;
            }
            run.await
        }
    }

    fn script(g: &Geometry) -> Hooked<SyncIo, Script> {
        Hooked { inner: SyncIo, hook: Script { cluster: g.cluster, ..Default::default() } }
    }

    fn g() -> Geometry {
        Geometry { cluster: 64 << 10, clusters: 24, stripe: 16 << 10 }
    }

    /// Run the merge until it is held in its sync after copying; run
    /// `during`; release; finish the merge.
    fn merge_held<T>(io: &Hooked<SyncIo, Script>, stack: &Stack, disk: &mut Disk, during: impl FnOnce() -> T) -> (ublk_ploop::Result<ops::Merged>, T) {
        let mut merge = std::pin::pin!(ops::merge(io, stack, disk, None, &|_, _| {}));
        assert!(block_on(futures_lite::future::poll_once(merge.as_mut())).is_none(), "the merge finished at once");
        assert!(io.hook.sync_held.get(), "the merge is not held in its sync after the copies");
        let t = during();
        io.hook.release_sync.set(true);
        (block_on(merge), t)
    }

    fn is_top_data(top: &Path, cluster: u64) -> impl Fn(&Op, &Path) -> bool + 'static {
        let top = top.to_path_buf();
        move |op: &Op, p: &Path| p == top && op.kind == K::Write && op.offset >= cluster && op.len == 4096
    }

    #[test]
    fn zeroes_and_discards_over_a_copied_cluster_reach_the_merged_disk() {
        let g = g();
        let dir = TempDir::new("fold-edge-zero");
        let (mut disk, mut model, stack, top, base_len) = top_holding_cluster_3(&dir, &g);
        let io = script(&g);
        let (merged, ()) = merge_held(&io, &stack, &mut disk, || {
            let z = 3 * g.cluster + 4096;
            block_on(stack.write_zeroes(&io, z, 8192)).unwrap();
            model[z as usize..z as usize + 8192].fill(0);
            let d = 3 * g.cluster + 32768;
            block_on(stack.discard(&io, d, 16384)).unwrap();
            model[d as usize..d as usize + 16384].fill(0);
            // A carried write after them (the cluster is marked changed now).
            write_at(&stack, &mut model, 9, 3 * g.cluster + 8192, 4096);
            // Whole-cluster zeroes over a cluster the top does not hold (the
            // base does): the top hides it with a fresh cluster.
            block_on(stack.write_zeroes(&io, 6 * g.cluster, g.cluster as usize)).unwrap();
            model[6 * g.cluster as usize..7 * g.cluster as usize].fill(0);
            assert!(read_all(&stack) == model);
        });
        merged.unwrap();
        assert_folded_into_base(stack, &disk, &model, &top, base_len, "zeroes and discard over a copied cluster");
    }

    #[test]
    fn writes_across_copied_and_uncopied_clusters_and_the_partial_last_one() {
        let g = g();
        let dir = TempDir::new("fold-edge-straddle");
        let size = g.size() + 32768; // a partial last cluster (24)
        let disk_dir = dir.join("ct");
        let mut disk = block_on(Disk::init(&SyncIo, &disk_dir, size, g.cluster)).unwrap();
        let mut model = pattern(0xBA5E, 0, size as usize).to_vec();
        {
            let s = open(&disk, None, false);
            block_on(s.write(&SyncIo, 0, &model)).unwrap();
            block_on(s.close(&SyncIo)).unwrap();
        }
        let stack = open(&disk, None, false);
        block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
        // The top holds 3, 23 and the partial 24.
        write_at(&stack, &mut model, 1, 3 * g.cluster + 4096, 8192);
        write_at(&stack, &mut model, 2, 23 * g.cluster + 8192, (g.cluster + 16384) as usize);
        let top = disk.file_path(disk.desc.image(TOP_GUID).unwrap());
        let base_len = std::fs::metadata(disk.dir.join("root.hds")).unwrap().len();
        let io = script(&g);
        let (merged, ()) = merge_held(&io, &stack, &mut disk, || {
            // 3 (copied) into 4 (not in the top: allocated, not carried).
            write_at(&stack, &mut model, 3, 4 * g.cluster - 8192, 16384);
            // 22 (not in the top) into 23 (copied), and 23 to the disk's end.
            write_at(&stack, &mut model, 4, 23 * g.cluster - 4096, 8192);
            write_at(&stack, &mut model, 5, 23 * g.cluster + 4096, (size - 23 * g.cluster - 4096) as usize);
            // More than a cluster, over 2 (not in top), 3 (copied) and 4.
            write_at(&stack, &mut model, 6, 2 * g.cluster + 4096, (2 * g.cluster) as usize);
        });
        merged.unwrap();
        assert_folded_into_base(stack, &disk, &model, &top, base_len, "straddling writes");
    }

    #[test]
    fn a_table_write_failing_in_the_top_during_the_fold() {
        let g = g();
        let dir = TempDir::new("fold-edge-top-bat");
        let (mut disk, mut model, stack, top, base_len) = top_holding_cluster_3(&dir, &g);
        let io = script(&g);
        let (merged, ()) = merge_held(&io, &stack, &mut disk, || {
            let top2 = top.clone();
            let cl = g.cluster;
            *io.hook.fail.borrow_mut() = Some(Box::new(move |op: &Op, p: &Path| p == top2 && op.kind == K::Write && op.offset < cl));
            // Cluster 5: new in the top, its entry rolled back.
            let off = 5 * g.cluster + 4096;
            block_on(stack.write(&io, off, &pattern(8, off, 4096))).expect_err("the BAT write failed");
            assert_eq!(io.hook.failed.get(), 1);
            assert!(read_all(&stack) == model, "a rolled-back cluster shows other than the parent's data");
            // And one that succeeds afterwards, on 3 (carried).
            write_at(&stack, &mut model, 9, 3 * g.cluster + 32768, 4096);
        });
        merged.unwrap();
        assert_folded_into_base(stack, &disk, &model, &top, base_len, "top BAT write failing");
    }

    #[test]
    fn a_table_write_failing_in_the_parent_fails_the_merge_and_a_retry_merges() {
        let g = g();
        let dir = TempDir::new("fold-edge-parent-bat");
        let (mut disk, mut model, stack, top, base_len) = top_holding_cluster_3(&dir, &g);
        let io = script(&g);
        let cl = g.cluster;
        let (merged, ()) = merge_held(&io, &stack, &mut disk, || {
            // Carried while the copy is unlinked, then the link's BAT write fails.
            write_at(&stack, &mut model, 9, 3 * g.cluster + 32768, 4096);
            *io.hook.fail.borrow_mut() = Some(Box::new(move |op: &Op, p: &Path| p.ends_with("root.hds") && op.kind == K::Write && op.offset < cl));
        });
        merged.expect_err("the parent's BAT write failed");
        assert_eq!(io.hook.failed.get(), 1);
        assert_eq!(disk.desc.images.len(), 2);
        assert!(read_all(&stack) == model, "after a failed fold the disk does not show its data");
        write_at(&stack, &mut model, 10, 3 * g.cluster + 40960, 4096);
        write_at(&stack, &mut model, 11, 8 * g.cluster + 40960, 4096);
        assert!(read_all(&stack) == model);
        block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &|_, _| {})).expect("merging again");
        assert_folded_into_base(stack, &disk, &model, &top, base_len, "parent BAT write failing, merged again");
    }

    /// A carried write whose future is dropped after its write into the
    /// parent's file and before its write into the top (the queue's
    /// executor dropped on an error; no I/O of it in flight): the disk
    /// showed the old bytes, and the merged disk must too, so the cluster
    /// is copied again.
    #[test]
    fn a_carried_write_dropped_between_its_two_writes_is_copied_again() {
        let g = g();
        let dir = TempDir::new("fold-edge-dropped-write");
        let (mut disk, model, stack, top, base_len) = top_holding_cluster_3(&dir, &g);
        let io = script(&g);
        let off = 3 * g.cluster + 16384;
        let data = pattern(7, off, 4096);
        let (merged, ()) = merge_held(&io, &stack, &mut disk, || {
            *io.hook.hold.borrow_mut() = Some(Box::new(is_top_data(&top, g.cluster)));
            let mut w = Box::pin(stack.write(&io, off, &data));
            assert!(block_on(futures_lite::future::poll_once(w.as_mut())).is_none());
            assert!(io.hook.op_held.get(), "the write is not held in the top");
            drop(w);
            assert!(read_all(&stack) == model, "the dropped write shows in the top");
        });
        assert_eq!(merged.unwrap().clusters, 2, "the cluster of the dropped write is copied again");
        assert_folded_into_base(stack, &disk, &model, &top, base_len, "a carried write dropped half way");
    }

    /// Not the fold's alone: a write whose future is dropped after its data
    /// landed, while it waits for its table write, is still marked in the
    /// write trackers (a backup's record of changes would miss it).
    #[test]
    fn a_write_dropped_after_its_data_landed_is_marked_in_the_trackers() {
        let g = g();
        let dir = TempDir::new("fold-edge-dropped-tracked");
        let (_disk, _model, stack, top, _) = top_holding_cluster_3(&dir, &g);
        let tracker = std::sync::Arc::new(ublk_ploop::tracker::Tracker::new(stack.size(), g.cluster));
        block_on(stack.add_tracker(tracker.clone())).unwrap();
        let io = script(&g);
        let cl = g.cluster;
        let top2 = top.clone();
        *io.hook.hold.borrow_mut() = Some(Box::new(move |op: &Op, p: &Path| p == top2 && op.kind == K::Write && op.offset < cl));
        let off = 5 * g.cluster + 4096;
        let data = pattern(9, off, 4096);
        let mut w = Box::pin(stack.write(&io, off, &data));
        assert!(block_on(futures_lite::future::poll_once(w.as_mut())).is_none());
        assert!(io.hook.op_held.get(), "the write is not held in its table write");
        assert_eq!(tracker.dirty_count(), 0, "marked before the write ended");
        drop(w);
        assert_eq!(tracker.dirty_count(), 1, "the dropped write's cluster is not marked");
    }

    /// A merge future dropped while its copy of cluster 3 waits for a
    /// write's section (a library caller may drop it; the daemon runs a
    /// merge to its end): later writes to cluster 3 must not wait for a
    /// copy that never comes, nor be carried into the parent's file.
    #[test]
    fn a_merge_dropped_half_way_leaves_every_cluster_writable() {
        let g = g();
        let dir = TempDir::new("fold-edge-dropped");
        let (mut disk, mut model, stack, top, _) = top_holding_cluster_3(&dir, &g);
        let io = script(&g);
        let off = 3 * g.cluster + 16384;
        let data = pattern(7, off, 4096);
        type W<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ublk_ploop::Result<()>> + 'a>>;
        let held: RefCell<Option<W<'_>>> = RefCell::new(None);
        let progress = |done: u64, _total: u64| {
            if done == 0 && held.borrow().is_none() {
                // The fold is installed and has copied nothing: a write into
                // cluster 3, held in its write to the top (inside its section).
                *io.hook.hold.borrow_mut() = Some(Box::new(is_top_data(&top, g.cluster)));
                let mut w: W<'_> = Box::pin(stack.write(&io, off, &data));
                assert!(block_on(futures_lite::future::poll_once(w.as_mut())).is_none());
                assert!(io.hook.op_held.get(), "the write is not held in the top");
                *held.borrow_mut() = Some(w);
            }
        };
        {
            let mut merge = Box::pin(ops::merge(&io, &stack, &mut disk, None, &progress));
            assert!(block_on(futures_lite::future::poll_once(merge.as_mut())).is_none(), "the merge finished at once");
            assert!(held.borrow().is_some(), "the write was not started");
            // The merge's copy of 3 now waits for the write's section.
            drop(merge);
        }
        let base = dir.join("ct").join("root.hds");
        let base_bytes = std::fs::read(&base).unwrap();
        io.hook.release_op.set(true);
        let w = held.borrow_mut().take().unwrap();
        block_on(w).unwrap();
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
        let off2 = 3 * g.cluster + 32768;
        let data2 = pattern(8, off2, 4096);
        let mut w2 = std::pin::pin!(stack.write(&SyncIo, off2, &data2));
        let done = (0..100).find_map(|_| block_on(futures_lite::future::poll_once(w2.as_mut())));
        let done = done.expect("a write to cluster 3 waits for good after the merge was dropped");
        done.unwrap();
        model[off2 as usize..off2 as usize + 4096].copy_from_slice(&data2);
        write_at(&stack, &mut model, 12, 8 * g.cluster, 4096);
        assert!(read_all(&stack) == model);
        assert!(std::fs::read(&base).unwrap() == base_bytes, "writes after the merge was dropped reached the parent's file");
        block_on(stack.close(&SyncIo)).expect("closing after a dropped merge");
    }
}
