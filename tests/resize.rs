//! Offline resize of images and disk directories: grown tables (with data
//! clusters moved out of the way), shrinking only over unwritten space,
//! a fault at every step, qemu-img as the oracle. (Opens retry while busy:
//! a process the CLI test forks holds our locks until it execs.)

mod common;

use std::path::Path;

use common::inject::{Cut, Fault, Injector, Kind, Trap};
use common::{assert_ploop_clean as assert_clean, assert_undamaged, have_qemu, pattern, qemu_compare_raw, retry_busy, TempDir};
use ublk_ploop::disk::Disk;
use ublk_ploop::io::{block_on, AlignedBuf, SyncIo};
use ublk_ploop::layers::ploop::resize::resize;
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::{Stack, StackOptions};

const K64: u64 = 64 << 10;
/// Small clusters keep the disks small: a 4 KiB cluster of table covers
/// 4 MiB of disk.
const CL: u64 = 4096;


/// A 16 MiB image of 4 KiB clusters (its table takes 5 clusters) whose
/// first data clusters, those a larger table grows into, hold data.
fn image_with_data(dir: &TempDir) -> (std::path::PathBuf, Vec<u8>) {
    let img = dir.join("a.hdd");
    block_on(PloopLayer::create(&SyncIo, &img, 16 << 20, CL)).unwrap();
    let mut model = vec![0u8; 16 << 20];
    let stack = open(&img);
    for (i, off) in [0u64, CL, 3 * CL + 512, 100 * CL, (16 << 20) - 2 * CL].into_iter().enumerate() {
        let data = pattern(i as u64 + 1, 2 * CL as usize);
        write(&stack, off, &data);
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    close(stack);
    (img, model)
}

fn close(stack: Stack) {
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
}

fn open(img: &Path) -> Stack {
    retry_busy(|| block_on(Stack::open(&SyncIo, &[img.to_path_buf()], &StackOptions::default()))).unwrap_or_else(|e| panic!("{}: {e}", img.display())).0
}

fn write(stack: &Stack, off: u64, data: &[u8]) {
    let mut b = AlignedBuf::zeroed(data.len().next_multiple_of(512));
    let start = off % 512;
    let aligned = off - start;
    block_on(stack.read(&SyncIo, aligned, &mut b)).unwrap();
    let end = (start as usize + data.len()).min(b.len());
    b[start as usize..end].copy_from_slice(&data[..end - start as usize]);
    block_on(stack.write(&SyncIo, aligned, &b)).unwrap();
}

fn read_all(img: &Path) -> Vec<u8> {
    let stack = retry_busy(|| block_on(Stack::open(&SyncIo, &[img.to_path_buf()], &StackOptions { read_only: true, ..Default::default() }))).unwrap().0;
    let mut b = AlignedBuf::zeroed(stack.size() as usize);
    block_on(stack.read(&SyncIo, 0, &mut b)).unwrap();
    b.to_vec()
}


fn raw_shadow(dir: &TempDir, model: &[u8]) -> std::path::PathBuf {
    let raw = dir.join("shadow.raw");
    std::fs::write(&raw, model).unwrap();
    raw
}

#[test]
fn growing_within_the_table_keeps_every_byte() {
    let dir = TempDir::new("resize-small");
    let (img, mut model) = image_with_data(&dir);
    // 17 MiB still fits the table's 5 clusters.
    let done = retry_busy(|| block_on(resize(&SyncIo, &img, 17 << 20, true))).unwrap();
    assert_eq!((done.old_size, done.new_size, done.relocated), (16 << 20, 17 << 20, 0));
    model.resize(17 << 20, 0);
    assert!(read_all(&img) == model, "data after growing");
    assert_clean(&img, "grown");
    if have_qemu() {
        qemu_compare_raw(&img, &raw_shadow(&dir, &model));
    }
    // And the new space takes writes.
    let stack = open(&img);
    let data = pattern(9, 3 * CL as usize);
    write(&stack, (16 << 20) + 4096, &data);
    close(stack);
    model[(16 << 20) + 4096..(16 << 20) + 4096 + data.len()].copy_from_slice(&data);
    assert!(read_all(&img) == model);
    assert_clean(&img, "written after growing");
}

#[test]
fn growing_past_the_table_moves_the_clusters_in_its_way() {
    let dir = TempDir::new("resize-big");
    let (img, mut model) = image_with_data(&dir);
    // 64 MiB: a table of 17 clusters, over the first data clusters.
    let done = retry_busy(|| block_on(resize(&SyncIo, &img, 64 << 20, true))).unwrap();
    assert!(done.relocated >= 5, "nothing was in the way: {done:?}");
    model.resize(64 << 20, 0);
    assert!(read_all(&img) == model, "data after moving clusters");
    assert_clean(&img, "grown past the table");
    if have_qemu() {
        qemu_compare_raw(&img, &raw_shadow(&dir, &model));
    }
}

#[test]
fn shrinking_drops_only_unwritten_space() {
    let dir = TempDir::new("resize-shrink");
    let (img, model) = image_with_data(&dir);
    let e = retry_busy(|| block_on(resize(&SyncIo, &img, 8 << 20, true))).unwrap_err();
    assert!(e.to_string().contains("allocated clusters"), "{e}");
    assert!(read_all(&img) == model, "a refused shrink changed the image");
    // Below the last written cluster's start, down to 8 MiB.
    let img2 = dir.join("b.hdd");
    block_on(PloopLayer::create(&SyncIo, &img2, 16 << 20, CL)).unwrap();
    let stack = open(&img2);
    let data = pattern(3, CL as usize);
    write(&stack, CL, &data);
    close(stack);
    retry_busy(|| block_on(resize(&SyncIo, &img2, 8 << 20, true))).unwrap();
    let got = read_all(&img2);
    assert_eq!(got.len(), 8 << 20);
    assert!(got[CL as usize..2 * CL as usize] == data[..]);
    assert_clean(&img2, "shrunk");
}

#[test]
fn a_fault_at_any_step_leaves_the_old_or_the_new_disk() {
    let dir = TempDir::new("resize-faults");
    let (pristine, model) = image_with_data(&dir);
    let counter = Injector::new(None);
    let probe = dir.join("probe.hdd");
    std::fs::copy(&pristine, &probe).unwrap();
    retry_busy(|| block_on(resize(&counter, &probe, 64 << 20, true))).unwrap();
    let counts = counter.counts();
    let mut runs = 0;
    for (kind, index, _) in counts.points(&[Kind::Write, Kind::Sync, Kind::Read]) {
        let ctx = format!("{kind:?} #{index} fails");
        let img = dir.join("run.hdd");
        std::fs::copy(&pristine, &img).unwrap();
        let faulty = Injector::new(Some(Fault { kind, index, sticky: true }));
        faulty.set_journaling(true);
        assert!(retry_busy(|| block_on(resize(&faulty, &img, 64 << 20, true))).is_err(), "{ctx}: no error");
        // And the power goes: whatever no sync covered is lost (every
        // other run), or half of it, metadata or data.
        faulty.power_cut([Cut::None, Cut::All, Cut::MetaOnly, Cut::DataOnly][(index % 4) as usize]);
        // Old size or new, the data is there and nothing is damaged.
        assert_undamaged(&img, false, &ctx);
        let got = read_all(&img);
        assert!(got[..model.len()] == model[..], "{ctx}: data lost");
        assert!(got[model.len()..].iter().all(|&b| b == 0), "{ctx}: stray bytes past the old end");
        // Running it again finishes the job.
        retry_busy(|| block_on(resize(&SyncIo, &img, 64 << 20, true))).unwrap_or_else(|e| panic!("{ctx}: again: {e}"));
        assert!(read_all(&img)[..model.len()] == model[..], "{ctx}: data after the second run");
        assert_undamaged(&img, true, &ctx);
        assert_clean(&img, &ctx);
        runs += 1;
    }
    assert!(runs >= 8, "only {runs} fault points");
    eprintln!("{runs} fault runs");
}

#[test]
fn a_disk_directory_grows_every_delta_and_its_descriptor() {
    let dir = TempDir::new("resize-disk");
    let path = dir.join("ct");
    let mut disk = block_on(Disk::init(&SyncIo, &path, 16 << 20, K64)).unwrap();
    let layers = disk.layers(None).unwrap();
    let stack = block_on(Stack::open_layers(&SyncIo, &layers, &StackOptions::default())).unwrap().0;
    let a = pattern(1, 2 * K64 as usize);
    write(&stack, 0, &a);
    block_on(ublk_ploop::disk::ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    let b = pattern(2, K64 as usize);
    write(&stack, 5 * K64, &b);
    close(stack);

    let done = block_on(disk.resize(&SyncIo, 4 << 30)).unwrap();
    assert_eq!(done.len(), 2, "both deltas");
    let disk = Disk::load(&path).unwrap();
    assert_eq!(disk.desc.size(), 4 << 30);
    let stack = block_on(Stack::open_layers(&SyncIo, &disk.layers(None).unwrap(), &StackOptions { read_only: true, ..Default::default() }))
        .unwrap()
        .0;
    assert_eq!(stack.size(), 4 << 30);
    let mut got = AlignedBuf::zeroed(8 * K64 as usize);
    block_on(stack.read(&SyncIo, 0, &mut got)).unwrap();
    assert!(got[..a.len()] == a[..] && got[5 * K64 as usize..6 * K64 as usize] == b[..]);
    drop(stack);
    for img in &disk.desc.images {
        assert_clean(&disk.file_path(img), "delta after the disk grew");
    }
    // Shrinking a disk whose deltas hold data past the new end is refused
    // before any delta changes.
    let mut disk = Disk::load(&path).unwrap();
    assert!(block_on(disk.resize(&SyncIo, 128 << 10)).is_err());
    assert_eq!(Disk::load(&path).unwrap().desc.size(), 4 << 30);
}

#[test]
fn the_cli_resizes_images_and_disk_directories() {
    let dir = TempDir::new("resize-cli");
    let img = dir.join("c.hdd");
    common::ploop(["create", img.to_str().unwrap(), "--size", "16M", "--cluster-size", "64K"]).ok();
    let out = common::ploop(["resize", img.to_str().unwrap(), "--size", "64M", "--json"]).ok().json();
    assert_eq!(out[0]["new_size"], 64 << 20, "{out}");
    assert_eq!(out[0]["old_size"], 16 << 20, "{out}");
    common::ploop(["resize", img.to_str().unwrap(), "--size", "1000"]).expect_clean_failure().mentions(&["multiple of 512"]);
    let ct = dir.join("ct");
    common::ploop(["init", ct.to_str().unwrap(), "--size", "1G"]).ok();
    common::ploop(["resize", ct.to_str().unwrap(), "--size", "2G"]).ok().mentions(&["2147483648"]);
    let info = common::ploop(["info", ct.to_str().unwrap(), "--json"]).ok().json();
    assert!(info.to_string().contains("2147483648"), "{info}");
    assert_clean(&ct.join("root.hds"), "cli resize");
}

#[test]
fn a_served_stack_grows_its_top_online() {
    // A stack of a full-ish base and a top; the top grows while open (only
    // it: the base stays as it was), past its table, and the disk shows
    // the old data, zeros in the new space, and takes writes there.
    let dir = TempDir::new("resize-online");
    let (base, mut model) = image_with_data(&dir);
    let top = dir.join("top.hdd");
    block_on(PloopLayer::create(&SyncIo, &top, 16 << 20, CL)).unwrap();
    let stack = block_on(Stack::open(&SyncIo, &[base.clone(), top.clone()], &StackOptions::default())).unwrap().0;
    let d = pattern(7, CL as usize);
    write(&stack, 2 * CL, &d);
    model[2 * CL as usize..3 * CL as usize].copy_from_slice(&d);
    let done = block_on(stack.grow_top(&SyncIo, 64 << 20)).unwrap();
    assert_eq!((done.old_size, done.new_size), (16 << 20, 64 << 20));
    assert!(done.relocated >= 1, "the top's first clusters were in the way: {done:?}");
    assert_eq!(stack.size(), 64 << 20);
    model.resize(64 << 20, 0);
    let e = pattern(8, 2 * CL as usize);
    write(&stack, (40 << 20) + 512, &e);
    model[(40 << 20) + 512..(40 << 20) + 512 + e.len()].copy_from_slice(&e);
    let mut got = AlignedBuf::zeroed(64 << 20);
    block_on(stack.read(&SyncIo, 0, &mut got)).unwrap();
    assert!(got[..] == model[..], "the grown disk's bytes");
    assert!(block_on(stack.grow_top(&SyncIo, 32 << 20)).is_err(), "shrinking a served disk");
    close(stack);
    assert_eq!(block_on(ublk_ploop::layers::ploop::load::image_size(&SyncIo, &base)).unwrap(), 16 << 20, "the base changed");
    assert_clean(&top, "grown top");
    assert_clean(&base, "base under a grown top");
    let stack = block_on(Stack::open(&SyncIo, &[base, top], &StackOptions { read_only: true, ..Default::default() })).unwrap().0;
    let mut again = AlignedBuf::zeroed(64 << 20);
    block_on(stack.read(&SyncIo, 0, &mut again)).unwrap();
    assert!(again[..] == model[..], "after reopening");
}

#[test]
fn merging_a_grown_child_into_its_smaller_parent_grows_the_parent() {
    let dir = TempDir::new("resize-merge");
    let path = dir.join("ct");
    let mut disk = block_on(Disk::init(&SyncIo, &path, 16 << 20, K64)).unwrap();
    let stack = block_on(Stack::open_layers(&SyncIo, &disk.layers(None).unwrap(), &StackOptions::default())).unwrap().0;
    let a = pattern(1, K64 as usize);
    write(&stack, 0, &a);
    block_on(ublk_ploop::disk::ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    block_on(stack.grow_top(&SyncIo, 32 << 20)).unwrap();
    let b = pattern(2, K64 as usize);
    write(&stack, 30 << 20, &b);
    // A second snapshot: the grown delta becomes a lower one, then merges
    // into the smaller base.
    block_on(ublk_ploop::disk::ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap();
    let lower = disk.desc.shot(disk.desc.top).unwrap().parent;
    block_on(ublk_ploop::disk::ops::merge(&SyncIo, &stack, &mut disk, Some(lower), &|_, _| {})).unwrap();
    let mut got = AlignedBuf::zeroed(K64 as usize);
    block_on(stack.read(&SyncIo, 30 << 20, &mut got)).unwrap();
    assert!(got[..] == b[..], "data of the grown child after the merge");
    block_on(stack.read(&SyncIo, 0, &mut got)).unwrap();
    assert!(got[..] == a[..]);
    close(stack);
    let disk = Disk::load(&path).unwrap();
    for img in &disk.desc.images {
        assert_clean(&disk.file_path(img), "after merging a grown child");
    }
}

/// A served stack of a base with data and a top holding other data in
/// cluster 2 (which the base holds too); the top's path and the model.
fn base_and_top(dir: &TempDir) -> (Stack, std::path::PathBuf, Vec<u8>) {
    let (base, mut model) = image_with_data(dir);
    let top = dir.join("top.hdd");
    block_on(PloopLayer::create(&SyncIo, &top, 16 << 20, CL)).unwrap();
    let stack = block_on(Stack::open(&SyncIo, &[base, top.clone()], &StackOptions::default())).unwrap().0;
    let d = pattern(7, CL as usize);
    write(&stack, 2 * CL, &d);
    model[2 * CL as usize..3 * CL as usize].copy_from_slice(&d);
    (stack, top, model)
}

/// The reads of the top's header an online grow issues (the resize's,
/// then the reopen's, which is the last).
fn header_reads_of_a_grow() -> u64 {
    let dir = TempDir::new("resize-reopen-count");
    let (stack, top, _) = base_and_top(&dir);
    let io = Trap::new(Kind::Read).on(&top).at(0).fail(0).io();
    block_on(stack.grow_top(&io, 64 << 20)).unwrap();
    close(stack);
    io.seen()
}

/// As a compaction step (tests/compact.rs): a descriptor of the top's
/// opening that outlives the top's close (the kernel keeps a file a ring
/// request used open a while) never stands in the grow's way: the grow
/// works on that opening and the top opens again on it, lock held.
#[test]
fn an_online_grow_keeps_the_top_s_opening_and_its_lock() {
    let dir = TempDir::new("resize-kept-open");
    let (stack, top, mut model) = base_and_top(&dir);
    let mut held = common::hold_layer(&stack, 1);
    block_on(stack.grow_top(&SyncIo, 64 << 20)).expect("a grow beside a descriptor of the top's opening");
    let mut reopened = common::hold_layer(&stack, 1);
    assert!(common::same_opening(&mut held, &mut reopened), "the top was opened again on another opening of its file");
    drop((held, reopened));
    model.resize(64 << 20, 0);
    let mut got = AlignedBuf::zeroed(64 << 20);
    block_on(stack.read(&SyncIo, 0, &mut got)).unwrap();
    assert!(got[..] == model[..], "the grown disk's bytes");
    close(stack);
    assert_clean(&top, "a top grown on its own opening");
}

#[test]
fn a_top_that_will_not_reopen_after_a_grow_fails_every_request() {
    // The top is closed for the grow; opening it again fails every time.
    // The stack must refuse reads and writes from then on: not panic on
    // an owner map naming the missing top, nor show the base's data.
    let reads = header_reads_of_a_grow();
    let dir = TempDir::new("resize-reopen-fails");
    let (stack, top, _) = base_and_top(&dir);
    let io = Trap::new(Kind::Read).on(&top).at(0).skip(reads - 1).fail(u64::MAX).io();
    let err = block_on(stack.grow_top(&io, 64 << 20)).err().expect("the grow succeeded although the top did not reopen");
    assert!(err.to_string().contains("reopening the top"), "{err}");
    assert_eq!(io.failed(), 3, "the reopen was not tried three times ({err})");
    let mut b = AlignedBuf::zeroed(CL as usize);
    for at in [2 * CL, 0] {
        let e = block_on(stack.read(&SyncIo, at, &mut b)).err().unwrap_or_else(|| panic!("a read at {at} without the top succeeded"));
        assert_eq!(e.errno(), libc::ESHUTDOWN, "read at {at}: {e}");
    }
    let e = block_on(stack.write(&SyncIo, 2 * CL, &b)).err().expect("a write without the top succeeded");
    assert_eq!(e.errno(), libc::ESHUTDOWN, "write: {e}");
}

#[test]
fn a_top_that_reopens_on_the_second_try_keeps_the_grow() {
    let reads = header_reads_of_a_grow();
    let dir = TempDir::new("resize-reopen-retry");
    let (stack, top, mut model) = base_and_top(&dir);
    let io = Trap::new(Kind::Read).on(&top).at(0).skip(reads - 1).io();
    let done = block_on(stack.grow_top(&io, 64 << 20)).unwrap_or_else(|e| panic!("a grow whose reopen failed once: {e}"));
    assert_eq!(io.failed(), 1);
    assert_eq!((done.new_size, stack.size()), (64 << 20, 64 << 20));
    model.resize(64 << 20, 0);
    let e = pattern(9, CL as usize);
    write(&stack, 40 << 20, &e);
    model[40 << 20..(40 << 20) + CL as usize].copy_from_slice(&e);
    let mut got = AlignedBuf::zeroed(64 << 20);
    block_on(stack.read(&SyncIo, 0, &mut got)).unwrap();
    assert!(got[..] == model[..], "the grown disk's bytes after the retried reopen");
    close(stack);
    assert_clean(&top, "a top reopened on the second try");
}

/// The same beside a descriptor of the top's opening that outlives its
/// close: the second try opens on that opening too, not on a new one
/// whose lock would wait for it.
#[test]
fn a_top_that_reopens_on_the_second_try_keeps_its_opening() {
    let reads = header_reads_of_a_grow();
    let dir = TempDir::new("resize-reopen-retry-held");
    let (stack, top, mut model) = base_and_top(&dir);
    let held = common::hold_layer(&stack, 1);
    let io = Trap::new(Kind::Read).on(&top).at(0).skip(reads - 1).io();
    block_on(stack.grow_top(&io, 64 << 20)).unwrap_or_else(|e| panic!("a grow whose reopen failed once, its opening held: {e}"));
    assert_eq!(io.failed(), 1);
    drop(held);
    model.resize(64 << 20, 0);
    let mut got = AlignedBuf::zeroed(64 << 20);
    block_on(stack.read(&SyncIo, 0, &mut got)).unwrap();
    assert!(got[..] == model[..], "the grown disk's bytes after the retried reopen");
    close(stack);
    assert_clean(&top, "a top reopened on the second try on its own opening");
}

#[test]
fn an_online_grow_ends_the_record_of_changes_and_a_running_tracker_refuses_it() {
    // After a backup the device keeps a record of changes; an online grow
    // used to be refused for it. The grow now goes on and ends the record
    // (an incremental stream of the grown disk would not apply to the older
    // backups): nothing is kept on a clean close, so the next backup is a
    // full one. A running tracker (a live copy's) still refuses the grow.
    use std::sync::Arc;
    use ublk_ploop::tracker::Tracker;
    let dir = TempDir::new("resize-record");
    let (img, _) = image_with_data(&dir);
    let stack = open(&img);
    let record = Arc::new(Tracker::new(stack.size(), 64 << 10));
    block_on(stack.add_tracker(record.clone())).unwrap();
    stack.keep_on_close(Some((record.clone(), [7; 16])));
    let copy = Arc::new(Tracker::new(stack.size(), CL));
    block_on(stack.add_tracker(copy.clone())).unwrap();
    let e = block_on(stack.grow_top(&SyncIo, 32 << 20)).err().expect("a grow with a running tracker");
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    assert_eq!(stack.size(), 16 << 20);
    assert!(block_on(stack.remove_tracker(&copy)));
    // A backup still sending its marks refuses it too.
    record.mark_range(0, 4096);
    record.drain_to_pending();
    assert_eq!(block_on(stack.grow_top(&SyncIo, 32 << 20)).err().map(|e| e.errno()), Some(libc::EBUSY));
    record.confirm();
    // With only the record, the disk grows and the record ends.
    block_on(stack.grow_top(&SyncIo, 32 << 20)).unwrap();
    assert_eq!(stack.size(), 32 << 20);
    assert!(stack.kept_record().is_none(), "the record outlived the grow");
    assert!(!block_on(stack.remove_tracker(&record)), "the record is still attached");
    write(&stack, (24 << 20) + 512, &pattern(3, 512));
    close(stack);
    let stack = open(&img);
    assert!(block_on(stack.take_saved_bitmaps()).is_empty(), "a record was kept across the grow");
    close(stack);
    assert_clean(&img, "grown with a record of changes");
}
