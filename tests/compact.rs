//! Compaction: discarded clusters given back to the host filesystem by
//! moving clusters from the end of the file into the free slots and
//! cutting the file, on a served stack (writers running), under a fault at
//! every step, with qemu-img as the oracle.

mod common;

use std::path::{Path, PathBuf};

use common::inject::{Cut, Fault, Injector, Kind};
use common::{assert_ploop_clean as assert_clean, assert_undamaged, have_qemu, pattern, qemu_compare_raw, retry_busy, TempDir};
use ublk_ploop::io::{block_on, AlignedBuf, SyncIo};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::{Stack, StackOptions};

const CL: u64 = 4096;
const SIZE: u64 = 8 << 20;
const CLUSTERS: u64 = SIZE / CL;


fn open(paths: &[PathBuf], read_only: bool) -> Stack {
    retry_busy(|| block_on(Stack::open(&SyncIo, paths, &StackOptions { read_only, ..Default::default() }))).unwrap().0
}

fn write(stack: &Stack, off: u64, data: &[u8]) {
    let mut b = AlignedBuf::zeroed(data.len());
    b.copy_from_slice(data);
    block_on(stack.write(&SyncIo, off, &b)).unwrap();
}

fn read_all(paths: &[PathBuf]) -> Vec<u8> {
    let stack = open(paths, true);
    let mut b = AlignedBuf::zeroed(stack.size() as usize);
    block_on(stack.read(&SyncIo, 0, &mut b)).unwrap();
    b.to_vec()
}

fn close(stack: Stack) {
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
}

/// A copy that keeps the holes discards punched (compaction looks for them).
fn copy_sparse(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp").arg("--sparse=always").arg(from).arg(to).status().unwrap().success();
    assert!(ok, "cp --sparse=always {} {}", from.display(), to.display());
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}


/// An image with every cluster written, then two thirds of them discarded
/// (scattered, so the live ones must move down): the model of its bytes.
fn fragmented(dir: &TempDir, name: &str) -> (PathBuf, Vec<u8>) {
    let img = dir.join(name);
    block_on(PloopLayer::create(&SyncIo, &img, SIZE, CL)).unwrap();
    let stack = open(std::slice::from_ref(&img), false);
    let mut model = pattern(1, SIZE as usize);
    write(&stack, 0, &model);
    for c in (0..CLUSTERS).filter(|c| c % 3 != 0) {
        block_on(stack.discard(&SyncIo, c * CL, CL as usize)).unwrap();
        model[(c * CL) as usize..((c + 1) * CL) as usize].fill(0);
    }
    close(stack);
    (img, model)
}

#[test]
fn compacting_gives_discarded_space_back_and_keeps_every_byte() {
    let dir = TempDir::new("compact-one");
    let (img, model) = fragmented(&dir, "a.hdd");
    let before = file_len(&img);
    let stack = open(std::slice::from_ref(&img), false);
    let steps = std::cell::Cell::new(0);
    let done = block_on(stack.compact(&SyncIo, 64, &|_, _| steps.set(steps.get() + 1))).unwrap();
    close(stack);
    let live = CLUSTERS.div_ceil(3);
    assert_eq!(done.unlinked, CLUSTERS - live, "{done:?}");
    assert!(done.moved > 0 && steps.get() > 1, "{done:?}, {} steps", steps.get());
    let after = file_len(&img);
    // The header and table, then the live clusters, a few clusters of slack at most.
    let data_off = CL * (64 + 4 * CLUSTERS).div_ceil(CL);
    assert!(after <= data_off + (live + 4) * CL, "file {before} -> {after} bytes for {live} live clusters");
    assert!(read_all(std::slice::from_ref(&img)) == model, "data after compaction");
    assert_clean(&img, "compacted");
    if have_qemu() {
        let raw = dir.join("shadow.raw");
        std::fs::write(&raw, &model).unwrap();
        qemu_compare_raw(&img, &raw);
    }
    // Compacting a compact image changes nothing.
    let stack = open(std::slice::from_ref(&img), false);
    let again = block_on(stack.compact(&SyncIo, 64, &|_, _| {})).unwrap();
    close(stack);
    assert_eq!((again.unlinked, again.moved), (0, 0));
    assert_eq!(file_len(&img), after);
}

#[test]
fn a_discarded_cluster_over_a_lower_layer_stays_zeros() {
    let dir = TempDir::new("compact-stack");
    let base = dir.join("base.hdd");
    block_on(PloopLayer::create(&SyncIo, &base, SIZE, CL)).unwrap();
    let stack = open(std::slice::from_ref(&base), false);
    let lower = pattern(5, SIZE as usize);
    write(&stack, 0, &lower);
    close(stack);
    let (top, _) = {
        let top = dir.join("top.hdd");
        block_on(PloopLayer::create(&SyncIo, &top, SIZE, CL)).unwrap();
        (top, ())
    };
    let paths = vec![base.clone(), top.clone()];
    let stack = open(&paths, false);
    let mut model = lower.clone();
    let upper = pattern(6, (SIZE / 2) as usize);
    write(&stack, 0, &upper);
    model[..upper.len()].copy_from_slice(&upper);
    for c in (0..CLUSTERS / 2).filter(|c| c % 2 == 0) {
        block_on(stack.discard(&SyncIo, c * CL, CL as usize)).unwrap();
        model[(c * CL) as usize..((c + 1) * CL) as usize].fill(0);
    }
    let done = block_on(stack.compact(&SyncIo, 1000, &|_, _| {})).unwrap();
    assert_eq!(done.unlinked, 0, "a discard over lower data must keep reading zeros: {done:?}");
    let mut got = AlignedBuf::zeroed(SIZE as usize);
    block_on(stack.read(&SyncIo, 0, &mut got)).unwrap();
    assert!(got[..] == model[..], "the stack while served, after compaction");
    close(stack);
    assert!(read_all(&paths) == model);
    assert_clean(&top, "top over a lower layer");
}

#[test]
fn writers_go_on_while_the_disk_is_compacted() {
    let dir = TempDir::new("compact-online");
    let (img, mut model) = fragmented(&dir, "a.hdd");
    let stack = open(std::slice::from_ref(&img), false);
    let writes: Vec<(u64, Vec<u8>)> = (0..200u64).map(|i| ((i * 7919) % CLUSTERS * CL, pattern(100 + i, CL as usize))).collect();
    std::thread::scope(|s| {
        let st = &stack;
        let w = &writes;
        let writer = s.spawn(move || {
            for (off, data) in w {
                write(st, *off, data);
            }
        });
        block_on(st.compact(&SyncIo, 4, &|_, _| {})).unwrap();
        writer.join().unwrap();
    });
    for (off, data) in &writes {
        model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    let mut got = AlignedBuf::zeroed(SIZE as usize);
    block_on(stack.read(&SyncIo, 0, &mut got)).unwrap();
    assert!(got[..] == model[..], "the disk after compaction beside writers");
    close(stack);
    assert!(read_all(std::slice::from_ref(&img)) == model);
    assert_clean(&img, "compacted beside writers");
}

/// A descriptor of the top that outlives the top's close keeps its lock
/// (the kernel keeps a file that a ring request used open until that ring
/// runs again: after a daemon restart, a compaction failed with "image is
/// in use by another process"). A step works on the top's own opening and
/// opens the top again on it, so such a descriptor never stands in its
/// way, and no other process can take the image between two steps.
#[test]
fn a_compaction_step_keeps_the_top_s_opening_and_its_lock() {
    let dir = TempDir::new("compact-kept-open");
    let (img, model) = fragmented(&dir, "a.hdd");
    let stack = open(std::slice::from_ref(&img), false);
    let mut held = common::hold_layer(&stack, 0);
    let done = block_on(stack.compact(&SyncIo, 8, &|_, _| {})).expect("compaction beside a descriptor of the same opening");
    assert!(done.done && done.moved > 0, "{done:?}");
    let mut reopened = common::hold_layer(&stack, 0);
    assert!(common::same_opening(&mut held, &mut reopened), "the top was opened again on another opening of its file");
    drop((held, reopened));
    let mut got = AlignedBuf::zeroed(SIZE as usize);
    block_on(stack.read(&SyncIo, 0, &mut got)).unwrap();
    assert!(got[..] == model[..], "the disk after compaction");
    close(stack);
    assert!(read_all(std::slice::from_ref(&img)) == model);
    assert_clean(&img, "compacted on its own opening");
}

#[test]
fn a_fault_at_any_step_of_compaction_loses_nothing() {
    let dir = TempDir::new("compact-faults");
    let (pristine, model) = fragmented(&dir, "pristine.hdd");
    let probe = dir.join("probe.hdd");
    copy_sparse(&pristine, &probe);
    let counter = Injector::new(None);
    {
        let stack = retry_busy(|| block_on(Stack::open(&counter, std::slice::from_ref(&probe), &StackOptions::default()))).unwrap().0;
        block_on(stack.compact(&counter, 64, &|_, _| {})).unwrap();
        block_on(stack.close(&counter)).unwrap();
    }
    let counts = counter.counts();
    eprintln!("compaction I/O: {counts:?}");
    let mut runs = 0;
    // Every sync and cut; every 16th write (a step's copies are alike).
    let points = counts.points(&[Kind::Write, Kind::Sync, Kind::Truncate]);
    for (kind, index, _) in points.into_iter().filter(|&(kind, index, _)| kind != Kind::Write || index % 16 == 0) {
        let ctx = format!("{kind:?} #{index} fails");
        let img = dir.join("run.hdd");
        copy_sparse(&pristine, &img);
        let faulty = Injector::new(Some(Fault { kind, index, sticky: true }));
        faulty.set_journaling(true);
        faulty.st.borrow_mut().data_off = CL * (64 + 4 * CLUSTERS).div_ceil(CL);
        {
            let opened = retry_busy(|| block_on(Stack::open(&faulty, std::slice::from_ref(&img), &StackOptions::default())));
            if let Ok((stack, _)) = opened {
                let _ = block_on(stack.compact(&faulty, 64, &|_, _| {}));
                let _ = block_on(stack.close(&faulty));
            }
        }
        // And the power goes, losing what no sync covered: everything,
        // or only data or only metadata writes (a disk reorders).
        faulty.power_cut([Cut::None, Cut::All, Cut::MetaOnly, Cut::DataOnly][(runs % 4) as usize]);
        assert_undamaged(&img, false, &ctx);
        assert!(read_all(std::slice::from_ref(&img)) == model, "{ctx}: data lost");
        // Repaired (an in-use mark, leaked space) and compacted again.
        assert_undamaged(&img, true, &ctx);
        let stack = open(std::slice::from_ref(&img), false);
        block_on(stack.compact(&SyncIo, 64, &|_, _| {})).unwrap_or_else(|e| panic!("{ctx}: again: {e}"));
        close(stack);
        assert!(read_all(std::slice::from_ref(&img)) == model, "{ctx}: data after compacting again");
        assert_clean(&img, &ctx);
        runs += 1;
    }
    assert!(runs >= 12, "only {runs} fault runs");
    eprintln!("{runs} fault runs");
}

#[test]
fn a_failed_sync_anywhere_in_an_online_compaction_fails_the_next_flush() {
    // A sync of the top that fails while it is compacted (its close, the
    // compaction's own opening, or the reopen's in-use mark, retried) may
    // have dropped written pages: the reopened top must not let a later
    // flush say they are durable (found by the simulation, seeds 1071 and
    // a 2-hour run's, for the reopen).
    let dir = TempDir::new("compact-sync-eio");
    let (pristine, model) = fragmented(&dir, "pristine.hdd");
    let probe = dir.join("probe.hdd");
    copy_sparse(&pristine, &probe);
    let counter = Injector::new(None);
    let syncs_before = {
        let stack = retry_busy(|| block_on(Stack::open(&counter, std::slice::from_ref(&probe), &StackOptions::default()))).unwrap().0;
        let before = counter.counts().syncs;
        block_on(stack.compact(&counter, 64, &|_, _| {})).unwrap();
        block_on(stack.close(&counter)).unwrap();
        before
    };
    let total = counter.counts().syncs;
    let mut runs = 0;
    for index in syncs_before..total {
        let img = dir.join("run.hdd");
        copy_sparse(&pristine, &img);
        // Once: the retries that follow succeed.
        let faulty = Injector::new(Some(Fault { kind: Kind::Sync, index, sticky: false }));
        let stack = retry_busy(|| block_on(Stack::open(&faulty, std::slice::from_ref(&img), &StackOptions::default()))).unwrap().0;
        let compacted = block_on(stack.compact(&faulty, 64, &|_, _| {}));
        if !faulty.st.borrow().tripped {
            // The sync was the close's, after the compaction.
            let _ = block_on(stack.close(&faulty));
            continue;
        }
        let flushed = block_on(stack.flush(&faulty));
        assert!(flushed.is_err(), "sync #{index} failed (compaction: {compacted:?}), yet a flush after it succeeded");
        let _ = block_on(stack.close(&faulty));
        drop(stack);
        assert_undamaged(&img, true, &format!("sync #{index} failed"));
        assert!(read_all(std::slice::from_ref(&img)) == model, "sync #{index} failed: data lost");
        runs += 1;
    }
    assert!(runs >= 4, "only {runs} runs");
}

#[test]
fn the_cli_compacts_an_image_no_device_serves() {
    let dir = TempDir::new("compact-cli");
    let (img, model) = fragmented(&dir, "a.hdd");
    let before = file_len(&img);
    // A bare file may be a delta: without --base its discarded clusters
    // stay linked (reading as zeros), so nothing frees up.
    let out = common::ploop(["compact", img.to_str().unwrap(), "--json"]).ok().json();
    assert_eq!((out["unlinked"].as_u64(), out["done"].as_bool()), (Some(0), Some(true)), "{out}");
    assert!(read_all(std::slice::from_ref(&img)) == model);
    let out = common::ploop(["compact", img.to_str().unwrap(), "--base", "--json"]).ok().json();
    assert!(out["moved"].as_u64().unwrap() > 0 && out["done"] == true, "{out}");
    assert_eq!(out["file_size_after"].as_u64().unwrap(), file_len(&img));
    assert!(file_len(&img) < before / 2, "{before} -> {}", file_len(&img));
    assert!(read_all(std::slice::from_ref(&img)) == model);
    assert_clean(&img, "compacted by the CLI");
    common::ploop(["compact", dir.join("missing.hdd").to_str().unwrap()]).expect_clean_failure();
}

/// An offline compaction of a disk directory keeps the top's record of
/// changes since the last backup (the read-write open takes it out of the
/// file; without it the next incremental backup is refused).
#[test]
fn the_cli_compaction_keeps_the_record_of_changes() {
    use std::sync::Arc;
    use ublk_ploop::tracker::Tracker;
    let dir = TempDir::new("compact-cbt");
    let d = dir.join("ct");
    let disk = block_on(ublk_ploop::disk::Disk::init(&SyncIo, &d, 64 << 20, 1 << 20)).unwrap();
    let top = disk.dir.join(&disk.desc.image(ublk_ploop::disk::TOP_GUID).unwrap().file);
    let stack = open(std::slice::from_ref(&top), false);
    write(&stack, 0, &pattern(3, 8 << 20));
    block_on(stack.discard(&SyncIo, 2 << 20, 2 << 20)).unwrap();
    let cbt = Arc::new(Tracker::new(stack.size(), 1 << 20));
    block_on(stack.add_tracker(cbt.clone())).unwrap();
    stack.keep_on_close(Some((cbt.clone(), [0x3C; 16])));
    write(&stack, 5 << 20, &pattern(4, 4096));
    close(stack);
    let expect = read_all(std::slice::from_ref(&top));
    common::ploop(["compact", d.to_str().unwrap()]).ok();
    let stack = open(std::slice::from_ref(&top), false);
    let saved = block_on(stack.take_saved_bitmaps());
    assert_eq!(saved.len(), 1, "the record of changes was lost by the compaction");
    assert_eq!(saved[0].id, [0x3C; 16]);
    assert_eq!(saved[0].bits.iter_ones().collect::<Vec<_>>(), vec![5]);
    close(stack);
    assert!(read_all(std::slice::from_ref(&top)) == expect, "the compacted disk differs");
}

/// Ctrl-C (or a service stop) during an offline compaction stops it after
/// the step under way: the image is closed clean (a plain `check` passes),
/// keeps every byte, and the next run finishes the job.
#[test]
fn an_interrupted_cli_compaction_stops_between_steps_closed_clean() {
    let dir = TempDir::new("compact-sigint");
    let (img, model) = fragmented(&dir, "a.hdd");
    // One cluster a step at one byte a second: after its first step the
    // command pauses for over an hour, unless the stop ends the pause.
    let child = std::process::Command::new(common::bin())
        .args(["compact", img.to_str().unwrap(), "--base", "--step", "1", "--speed", "1", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its handler is in place before it first opens the image: wait for that.
    let real = std::fs::canonicalize(&img).unwrap();
    let holds = || {
        std::fs::read_dir(format!("/proc/{}/fd", child.id()))
            .map(|fds| fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == real)))
            .unwrap_or(false)
    };
    let start = std::time::Instant::now();
    while !holds() && start.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut child = child;
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
        panic!("the compaction did not stop within 20 s of SIGINT");
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGINT), "{stderr}");
    assert!(stderr.contains("closed clean"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(report["done"], false, "{report}");
    assert!(report["remaining"].as_u64().unwrap() > 0, "{report}");
    common::ploop(["check", img.to_str().unwrap()]).ok();
    assert_clean(&img, "an interrupted compaction");
    assert!(read_all(std::slice::from_ref(&img)) == model, "an interrupted compaction lost data");
    let out = common::ploop(["compact", img.to_str().unwrap(), "--base", "--json"]).ok().json();
    assert_eq!(out["done"], true, "{out}");
    assert!(read_all(std::slice::from_ref(&img)) == model);
}
