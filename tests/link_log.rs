//! The link log (`layers::ploop::links`): copy-ups acknowledged before
//! their sync, their entries kept out of the image until a flush, found
//! again after a kill, gone after a power cut, refused where the image
//! changed meanwhile.
//!
//! On the host a kill is a stack dropped without its close (the page cache
//! keeps every write, as it does for a killed daemon), and a power cut
//! after it is the log's file removed (a tmpfs is empty after a reboot).
//! What a power cut takes from the image file itself is the simulation's
//! part (tests/sim.rs runs worlds with the log).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_ploop_clean, bat_entry, have_qemu, pattern, qemu_check_clean, retry_busy, TempDir};
use ublk_ploop::io::{block_on, Direct, SyncIo};
use ublk_ploop::layers::ploop::header::IN_USE;
use ublk_ploop::layers::{OpenReport, PloopLayer};
use ublk_ploop::{Stack, StackOptions};

const K: u64 = 1024;
const C: u64 = 64 * K;
const CLUSTERS: u64 = 32;
const SIZE: u64 = CLUSTERS * C;

/// A directory on tmpfs for the log; the tests need one.
fn volatile_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("ublk-ploop-links-").tempdir_in("/dev/shm").expect("a directory in /dev/shm");
    assert!(
        ublk_ploop::io::Io::is_volatile_dir(&SyncIo, dir.path()).unwrap(),
        "/dev/shm is not a tmpfs here: the link log tests need one"
    );
    dir
}

fn opts(links: Option<&Path>) -> StackOptions {
    StackOptions { read_only: false, direct: Direct::Auto, offline: false, link_log: links.map(Path::to_path_buf) }
}

fn open(paths: &[PathBuf], links: Option<&Path>) -> (Stack, Vec<OpenReport>) {
    retry_busy(|| block_on(Stack::open(&SyncIo, paths, &opts(links)))).unwrap_or_else(|e| panic!("opening {paths:?}: {e}"))
}

/// A base written in its first `CLUSTERS - 8` clusters (the last eight are
/// holes, so writes there allocate fresh clusters with ordinary entries),
/// and an empty top over it. Returns the paths and the disk's bytes.
fn base_and_top(dir: &TempDir) -> (Vec<PathBuf>, Vec<u8>) {
    let (base, top) = (dir.join("base.hds"), dir.join("top.hds"));
    block_on(PloopLayer::create(&SyncIo, &base, SIZE, C)).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let written = ((CLUSTERS - 8) * C) as usize;
    model[..written].copy_from_slice(&pattern(1, written));
    let (stack, _) = open(std::slice::from_ref(&base), None);
    block_on(stack.write(&SyncIo, 0, &model[..written])).unwrap();
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    block_on(PloopLayer::create(&SyncIo, &top, SIZE, C)).unwrap();
    (vec![base, top], model)
}

/// The usual start: a base and an empty top (see `base_and_top`), served
/// by a stack with a link log. Returns the scratch and log directories
/// (alive as long as the test needs them), the paths, the disk's bytes and
/// the stack.
fn served(tag: &str) -> (TempDir, tempfile::TempDir, Vec<PathBuf>, Vec<u8>, Stack) {
    let dir = TempDir::new(tag);
    let links = volatile_dir();
    let (paths, model) = base_and_top(&dir);
    let (stack, _) = open(&paths, Some(links.path()));
    (dir, links, paths, model, stack)
}

/// 4 KiB writes into clusters `cs` (copy-ups over the base), applied to
/// `model` too.
fn write_into(stack: &Stack, model: &mut [u8], cs: &[u64], seed: u64) {
    for &c in cs {
        let at = c * C + 8 * K;
        let data = pattern(seed * 1000 + c, 4096);
        block_on(stack.write(&SyncIo, at, &data)).unwrap();
        model[at as usize..at as usize + 4096].copy_from_slice(&data);
    }
}

fn disk(stack: &Stack) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    block_on(stack.read(&SyncIo, 0, &mut buf)).unwrap();
    buf
}

fn assert_disk(stack: &Stack, model: &[u8], ctx: &str) {
    let got = disk(stack);
    if let Some(at) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{ctx}: the disk differs at byte {at} (cluster {})", at as u64 / C);
    }
}

/// Close the stack cleanly, let go of it, and `check` the top.
fn close_clean(stack: Stack, top: &Path, ctx: &str) {
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    assert_ploop_clean(top, ctx);
}

/// The log files in `dir`, with their lengths.
fn logs(dir: &Path) -> Vec<(PathBuf, u64)> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.clone(), std::fs::metadata(&p).unwrap().len())).collect()
}

/// The disk reads `model`, and still does after a kill and an opening
/// with the log (the report and the top's on-disk mark in the message).
fn kill_and_reopen(stack: Stack, paths: &[PathBuf], links: &Path, model: &[u8]) {
    assert_disk(&stack, model, "before the kill");
    let mark = common::in_use_mark(&paths[1]);
    drop(stack);
    let (stack, reports) = open(paths, Some(links));
    assert_disk(&stack, model, &format!("after a kill (on-disk mark {mark:#x}, report {:?})", reports[1]));
}

const COPIED: [u64; 4] = [1, 2, 9, 17];

#[test]
fn copy_ups_stay_out_of_the_image_until_a_flush() {
    let (_dir, links, paths, mut model, stack) = served("links-mask");
    write_into(&stack, &mut model, &COPIED, 1);
    // A fresh cluster in the same BAT block: its entry is written at once,
    // with the block around it.
    write_into(&stack, &mut model, &[CLUSTERS - 2], 1);
    let top = &paths[1];
    assert_ne!(bat_entry(top, CLUSTERS - 2), 0, "an ordinary entry is written before its write completes");
    for c in COPIED {
        assert_eq!(bat_entry(top, c), 0, "cluster {c}: a logged link reached the image before a flush");
    }
    let records = logs(links.path());
    assert_eq!(records.len(), 1, "one log for the top: {records:?}");
    assert_eq!(records[0].1, COPIED.len() as u64 * 32, "a record per copy-up");
    assert_disk(&stack, &model, "before the flush");
    block_on(stack.flush(&SyncIo)).unwrap();
    for c in COPIED {
        assert_ne!(bat_entry(top, c), 0, "cluster {c}: a flush writes the logged entries");
    }
    assert_disk(&stack, &model, "after the flush");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    assert!(logs(links.path()).is_empty(), "a closed stack leaves no log");
    assert_ploop_clean(top, "closed");
}

#[test]
fn a_kill_keeps_every_acknowledged_copy_up() {
    let (_dir, links, paths, mut model, stack) = served("links-kill");
    write_into(&stack, &mut model, &COPIED[..2], 1);
    block_on(stack.flush(&SyncIo)).unwrap();
    write_into(&stack, &mut model, &COPIED[2..], 1);
    // Over a logged cluster again, and a fresh one.
    write_into(&stack, &mut model, &[COPIED[3], CLUSTERS - 1], 2);
    drop(stack);
    let top = &paths[1];
    assert_eq!(common::in_use_mark(top), IN_USE);
    assert_eq!(bat_entry(top, COPIED[3]), 0, "not in the image before the restart");

    let (stack, reports) = open(&paths, Some(links.path()));
    assert_eq!(reports[1].relinked, 2, "{:?}", reports[1]);
    assert_eq!(reports[1].links_dropped, 0);
    assert_disk(&stack, &model, "after the kill");
    for c in COPIED {
        assert_ne!(bat_entry(top, c), 0, "cluster {c}: linked in the image by the open");
    }
    assert_eq!(logs(links.path())[0].1, 0, "the open emptied the log");
    close_clean(stack, top, "after the restart");
    if have_qemu() {
        qemu_check_clean(top);
    }
    // Twice killed: the second open finds nothing left to link.
    let (stack, reports) = open(&paths, Some(links.path()));
    assert_eq!(reports[1].relinked, 0);
    assert_disk(&stack, &model, "reopened");
}

#[test]
fn a_kill_after_a_flush_finds_nothing_to_link_and_nothing_dropped() {
    let (_dir, links, paths, mut model, stack) = served("links-flushed");
    write_into(&stack, &mut model, &COPIED, 1);
    block_on(stack.flush(&SyncIo)).unwrap();
    drop(stack);
    // The records are still in their freed slots; their entries are in
    // the image: neither linked again nor reported as dropped.
    assert_eq!(logs(links.path())[0].1, COPIED.len() as u64 * 32);
    let (stack, reports) = open(&paths, Some(links.path()));
    assert_eq!((reports[1].relinked, reports[1].links_dropped), (0, 0), "{:?}", reports[1]);
    assert_disk(&stack, &model, "after the kill");
}

#[test]
fn a_power_cut_after_a_kill_shows_the_last_flush() {
    let (_dir, links, paths, mut model, stack) = served("links-cut");
    write_into(&stack, &mut model, &COPIED[..2], 1);
    block_on(stack.flush(&SyncIo)).unwrap();
    let flushed = model.clone();
    write_into(&stack, &mut model, &COPIED[2..], 1);
    drop(stack);
    for (log, _) in logs(links.path()) {
        std::fs::remove_file(log).unwrap();
    }
    let (stack, reports) = open(&paths, Some(links.path()));
    assert_eq!(reports[1].relinked, 0);
    assert_disk(&stack, &flushed, "the unflushed copy-ups are gone, the flushed ones stay");
    close_clean(stack, &paths[1], "after the cut");
}

#[test]
fn a_log_is_dropped_where_another_opening_closed_the_image_since() {
    let dir = TempDir::new("links-foreign");
    let links = volatile_dir();
    let (paths, model) = base_and_top(&dir);
    let (mut model, mut shown) = (model.clone(), model);
    let (stack, _) = open(&paths, Some(links.path()));
    write_into(&stack, &mut shown, &COPIED, 1);
    // A fresh cluster after the copies, its entry in the image: the copies
    // lie inside the file, and the opening below punches them.
    write_into(&stack, &mut model, &[CLUSTERS - 1], 1);
    drop(stack);
    // An opening without the log (an offline tool): it releases the
    // clusters nothing points at and closes the image clean.
    let (stack, _) = open(&paths, None);
    assert_disk(&stack, &model, "without the log the copy-ups are not there");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let (stack, reports) = open(&paths, Some(links.path()));
    assert_eq!((reports[1].relinked, reports[1].links_dropped), (0, COPIED.len() as u64), "{:?}", reports[1]);
    assert_disk(&stack, &model, "the stale records are not applied");
    close_clean(stack, &paths[1], "after the stale log");
}

#[test]
fn a_record_whose_cluster_is_used_otherwise_is_dropped() {
    let (_dir, links, paths, mut model, stack) = served("links-used");
    write_into(&stack, &mut model, &COPIED[..1], 1);
    drop(stack);
    // Another tool (killed too) linked the same cluster of the file to
    // another disk cluster meanwhile.
    let top = &paths[1];
    let record = std::fs::read(&logs(links.path())[0].0).unwrap();
    let value = u32::from_le_bytes(record[16..20].try_into().unwrap());
    common::set_bat_entry(top, 30, value);
    let (stack, reports) = open(&paths, Some(links.path()));
    assert_eq!((reports[1].relinked, reports[1].links_dropped), (0, 1), "{:?}", reports[1]);
    drop(stack);
}

#[test]
fn a_copy_up_zeroed_or_discarded_before_a_kill_reads_as_zeros() {
    let (_dir, links, paths, mut model, stack) = served("links-zeroed");
    write_into(&stack, &mut model, &COPIED, 1);
    // Whole clusters: a punch would leave the copy a hole, and a record
    // over a hole counts as released at the next open.
    block_on(stack.write_zeroes(&SyncIo, COPIED[0] * C, C as usize)).unwrap();
    block_on(stack.discard(&SyncIo, COPIED[1] * C, C as usize)).unwrap();
    for c in &COPIED[..2] {
        model[(c * C) as usize..((c + 1) * C) as usize].fill(0);
    }
    drop(stack);
    let (stack, reports) = open(&paths, Some(links.path()));
    assert_eq!((reports[1].relinked, reports[1].links_dropped), (COPIED.len() as u64, 0), "{:?}", reports[1]);
    assert_disk(&stack, &model, "after the kill");
    close_clean(stack, &paths[1], "after the zeroed copy-ups");
}

#[test]
fn a_later_file_on_the_same_inode_does_not_meet_the_log() {
    use std::os::unix::fs::MetadataExt;
    let (_dir, links, paths, model, stack) = served("links-reused-inode");
    let mut shown = model.clone();
    write_into(&stack, &mut shown, &COPIED, 1);
    drop(stack);
    // The killed image goes, and a file with its bytes takes its name: the
    // filesystem may hand it the same inode number (ext4 does at once).
    let top = &paths[1];
    let (bytes, ino) = (std::fs::read(top).unwrap(), std::fs::metadata(top).unwrap().ino());
    std::fs::remove_file(top).unwrap();
    std::fs::write(top, &bytes).unwrap();
    if std::fs::metadata(top).unwrap().ino() != ino {
        eprintln!("note: the filesystem gave the new file another inode; the name alone keeps the log apart");
    }
    let (stack, reports) = open(&paths, Some(links.path()));
    assert_eq!((reports[1].relinked, reports[1].links_dropped), (0, 0), "{:?}", reports[1]);
    assert_disk(&stack, &model, "the new file shows its own entries only");
    close_clean(stack, top, "the new file");
}

#[test]
fn no_log_where_the_directory_outlives_the_power() {
    let dir = TempDir::new("links-disk");
    let not_volatile = TempDir::new("links-not-volatile");
    let (paths, mut model) = base_and_top(&dir);
    let (stack, _) = open(&paths, Some(not_volatile.path()));
    write_into(&stack, &mut model, &COPIED, 1);
    for c in COPIED {
        assert_ne!(bat_entry(&paths[1], c), 0, "cluster {c}: synced and linked as without a log");
    }
    assert!(logs(not_volatile.path()).is_empty());
    drop(stack);
    let (stack, _) = open(&paths, Some(not_volatile.path()));
    assert_disk(&stack, &model, "after a kill");
}

#[test]
fn a_snapshot_and_a_merge_settle_the_log_first() {
    let (dir, links, paths, mut model, stack) = served("links-snap");
    write_into(&stack, &mut model, &COPIED, 1);
    let top2 = dir.join("top2.hds");
    block_on(stack.push_layer(&SyncIo, &top2)).unwrap();
    for c in COPIED {
        assert_ne!(bat_entry(&paths[1], c), 0, "cluster {c}: the frozen layer holds its entries");
    }
    // Copy-ups into the new top, logged in its own log; then the merge of
    // its parent into it copies the rest up and flushes.
    write_into(&stack, &mut model, &[3, 4], 2);
    block_on(stack.merge_parent_into_top(&SyncIo, 4, &|_, _| {})).unwrap();
    assert_ne!(bat_entry(&top2, 3), 0);
    drop(stack);
    let all = vec![paths[0].clone(), paths[1].clone(), top2.clone()];
    let (stack, _) = open(&all, Some(links.path()));
    assert_disk(&stack, &model, "after the merge and a kill");
}

// ---- review: the replay is gated on the on-disk in-use mark, which a
// failed close or a failed reopen_in_use can leave CLOSED while the
// session goes on logging copy-ups.

use common::inject::{Kind, Trap};

#[test]
fn a_failed_close_keeps_the_in_use_mark_under_later_logged_copy_ups() {
    let (_dir, links, paths, mut model, stack) = served("links-review-close");
    let top = paths[1].clone();
    // The close of the compaction: its header write (CLOSED) fails once.
    let trapped = Trap::new(Kind::Write).on(&top).at(0).io();
    let r = block_on(stack.compact(&trapped, 8, &|_, _| {}));
    assert!(r.is_err(), "the trapped close fails the compaction");
    assert_eq!(trapped.hook.failed(), 1);
    // The top serves on: a copy-up (logged), then a fresh cluster, whose
    // table write carries the header block still dirty from the failure.
    write_into(&stack, &mut model, &[5], 1);
    write_into(&stack, &mut model, &[CLUSTERS - 1], 1);
    kill_and_reopen(stack, &paths, links.path(), &model);
}

#[test]
fn a_failed_reopen_in_use_keeps_later_copy_ups_off_the_log() {
    let (_dir, links, paths, mut model, stack) = served("links-review-reopen");
    let top = paths[1].clone();
    // Someone else in the daemon holds the top: the compaction closes it,
    // finds it shared and marks it in use again; that write fails.
    let held = stack.layers();
    let trapped = Trap::new(Kind::Write).on(&top).at(0).skip(1).io();
    let r = block_on(stack.compact(&trapped, 8, &|_, _| {}));
    assert!(r.is_err());
    assert_eq!(trapped.hook.failed(), 1, "the in-use mark's write was the one failed");
    drop(held);
    write_into(&stack, &mut model, &[5], 1);
    kill_and_reopen(stack, &paths, links.path(), &model);
}

// An opening without the log between two kills releases the copy-up as a
// leak (punches it); the later opening with the log must not link the hole.
#[test]
fn a_record_whose_copy_was_punched_since_is_dropped() {
    let (_dir, links, paths, model, stack) = served("links-punched");
    let mut shown = model.clone();
    write_into(&stack, &mut shown, &[1], 1);
    // A fresh cluster after it in the file, linked at once: the copy-up's
    // cluster is a leak inside the file, not its tail.
    write_into(&stack, &mut shown, &[CLUSTERS - 1], 1);
    drop(stack);
    // Opened without the log (a tool or a daemon without it), killed too.
    let (stack, reports) = open(&paths, None);
    assert!(reports[1].released_leak > 0, "{:?}", reports[1]);
    drop(stack);
    let (stack, reports) = open(&paths, Some(links.path()));
    assert_eq!((reports[1].relinked, reports[1].links_dropped), (0, 1), "{:?}", reports[1]);
    let mut want = model.clone();
    let last = ((CLUSTERS - 1) * C) as usize..(CLUSTERS * C) as usize;
    want[last.clone()].copy_from_slice(&shown[last]);
    assert_disk(&stack, &want, "cluster 1 as the opening without the log left it");
    close_clean(stack, &paths[1], "after the punched record");
}

// ---- review (an attack on the crash ordering) ----

/// The open gap, confirmed: an opening without the log (killed too) trims
/// the copy-up as a leak, allocates the same place for another cluster's
/// write, and dies before that entry lands. The record then links the
/// copy-up's cluster to the other cluster's bytes. A check of the copy's
/// bytes cannot close it (later writes change them); an identity of the
/// writing session kept in the image could. The log stays opt-in.
#[test]
#[ignore = "known gap: fails (cluster 1 shows cluster 31's bytes); see docs/reliability.md"]
fn review_a_released_copy_reused_by_a_killed_foreign_opening_is_not_linked() {
    let (_dir, links, paths, model, stack) = served("links-review-reuse");
    let mut shown = model.clone();
    write_into(&stack, &mut shown, &[1], 1);
    drop(stack);
    // Without the log: the copy (the file's tail) is trimmed, and a fresh
    // cluster's write lands in the same place; its BAT write fails (the
    // first write at 0 is the opening's in-use mark), then the kill.
    let trapped = Trap::new(Kind::Write).on(&paths[1]).at(0).skip(1).io();
    let (stack, _) = retry_busy(|| block_on(Stack::open(&trapped, &paths, &opts(None)))).unwrap();
    let foreign = pattern(4242, C as usize);
    assert!(block_on(stack.write(&trapped, (CLUSTERS - 1) * C, &foreign)).is_err(), "the trapped BAT write fails the write");
    assert_eq!(trapped.hook.failed(), 1);
    drop(stack);
    let (stack, reports) = open(&paths, Some(links.path()));
    let got = disk(&stack);
    let c1 = C as usize..2 * C as usize;
    assert_ne!(&got[c1.clone()], &foreign[..], "cluster 1 shows the bytes of cluster {} (report {:?})", CLUSTERS - 1, reports[1]);
    assert!(got[c1.clone()] == model[c1.clone()] || got[c1.clone()] == shown[c1], "cluster 1 is neither old nor new");
}

/// An online fold of the top into its parent drops the old top without
/// its close: its link log must go with its file.
#[test]
fn an_online_fold_leaves_no_link_log_behind() {
    let (_dir, links, paths, mut model, stack) = served("links-review-fold");
    write_into(&stack, &mut model, &COPIED, 1);
    assert_eq!(logs(links.path()).len(), 1);
    let into = std::sync::Arc::new(
        block_on(ublk_ploop::layers::Layer::open_unlocked(&SyncIo, &paths[0], ublk_ploop::layers::Format::Ploop, true, Direct::Auto)).unwrap().0,
    );
    block_on(stack.fold_top_online(&SyncIo, into, &|_, _| {}, || async { Ok(()) })).unwrap();
    assert_disk(&stack, &model, "after the fold");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    std::fs::remove_file(&paths[1]).unwrap();
    assert!(logs(links.path()).is_empty(), "logs left behind: {:?}", logs(links.path()));
}

/// `ublk-ploop ARGS` with its link log directory at `links`, run as
/// `uid` (0: as this test).
fn cli_as(uid: u32, links: &Path, args: &[&std::ffi::OsStr]) -> common::Run {
    let mut cmd = match uid {
        0 => std::process::Command::new(common::bin()),
        _ => {
            let mut c = std::process::Command::new("setpriv");
            c.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()]).arg(common::bin());
            c
        }
    };
    cmd.args(args).env("UBLK_PLOOP_LINK_DIR", links).env_remove("RUST_LOG");
    common::run(&mut cmd)
}

/// Offline tools after a kill apply the log a killed daemon left: the
/// copy-ups it acknowledged stay. (A compaction used to open the top
/// without it, releasing them as leaks.)
#[test]
fn offline_tools_after_a_kill_keep_the_logged_copy_ups() {
    for verb in ["compact", "check"] {
        let (_dir, links, paths, mut model, stack) = served(&format!("links-offline-{verb}"));
        write_into(&stack, &mut model, &COPIED, 1);
        drop(stack);
        let top = paths[1].as_os_str();
        let args: Vec<&std::ffi::OsStr> = match verb {
            "compact" => vec!["compact".as_ref(), top],
            _ => vec!["check".as_ref(), "--repair".as_ref(), top],
        };
        cli_as(0, links.path(), &args).ok();
        assert!(logs(links.path()).is_empty(), "{verb}: logs left behind: {:?}", logs(links.path()));
        assert_ne!(common::in_use_mark(&paths[1]), IN_USE, "{verb}: the top is closed clean");
        let (stack, _) = open(&paths, None);
        assert_disk(&stack, &model, &format!("after `{verb}` on the killed top"));
        close_clean(stack, &paths[1], verb);
    }
}

/// A read-only look at a killed top (`convert` of the chain) shows the
/// copy-ups its log recorded, and changes neither the top nor the log;
/// a user who may not read the log is refused rather than shown the bytes
/// from before those writes.
#[test]
fn a_read_only_look_after_a_kill_shows_the_logged_copy_ups() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, links, paths, mut model, stack) = served("links-read-only");
    write_into(&stack, &mut model, &COPIED, 1);
    drop(stack);
    let (top_before, logs_before) = (std::fs::read(&paths[1]).unwrap(), logs(links.path()));
    assert!(logs_before.iter().any(|(_, len)| *len > 0), "the kill left no records: {logs_before:?}");
    let out = dir.join("out.raw");
    let convert = |uid: u32, out: &Path| {
        let args = ["convert".as_ref(), paths[0].as_os_str(), paths[1].as_os_str(), out.as_os_str(), "--to".as_ref(), "raw".as_ref()];
        cli_as(uid, links.path(), &args)
    };
    convert(0, &out).ok();
    let got = std::fs::read(&out).unwrap();
    if let Some(at) = got.iter().zip(&model).position(|(a, b)| a != b) {
        panic!("the converted disk differs at byte {at} (cluster {})", at as u64 / C);
    }
    assert!(std::fs::read(&paths[1]).unwrap() == top_before, "a read-only look changed the top");
    assert_eq!(logs(links.path()), logs_before, "a read-only look changed the log");
    // Another user, the log out of reach: refused, nothing written.
    for p in [dir.path()].into_iter().chain(paths.iter().map(PathBuf::as_path)) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(if p == dir.path() { 0o777 } else { 0o666 })).unwrap();
    }
    std::fs::set_permissions(links.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    convert(65534, &dir.join("out2.raw")).expect_clean_failure().mentions(&["not closed cleanly"]);
    assert!(std::fs::read(&paths[1]).unwrap() == top_before, "a refused look changed the top");
    // The log decides, not the directory (searchable, as the daemon makes
    // it): a look only reads the log, so a log others may read is applied
    // (it was refused, the directory not being writable), and an empty
    // one (a kill right after a flush) is nothing to apply.
    for (log, _) in &logs_before {
        std::fs::set_permissions(log, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out3 = dir.join("out3.raw");
    convert(65534, &out3).ok();
    assert!(std::fs::read(&out3).unwrap() == model, "another user's look misses the logged copy-ups");
    assert!(std::fs::read(&paths[1]).unwrap() == top_before, "another user's look changed the top");
    assert_eq!(logs(links.path()), logs_before, "another user's look changed the log");
    for (log, _) in &logs_before {
        std::fs::set_permissions(log, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let saved: Vec<Vec<u8>> = logs_before.iter().map(|(log, _)| std::fs::read(log).unwrap()).collect();
    for (log, _) in &logs_before {
        std::fs::OpenOptions::new().write(true).open(log).unwrap().set_len(0).unwrap();
    }
    convert(65534, &dir.join("out4.raw")).ok();
    for ((log, _), bytes) in logs_before.iter().zip(&saved) {
        std::fs::write(log, bytes).unwrap();
    }
    let (stack, _) = open(&paths, Some(links.path()));
    assert_disk(&stack, &model, "after the looks, opened with the log");
    close_clean(stack, &paths[1], "after the looks");
}

/// A user who may not read the log directory is refused an image left in
/// use (its log would be missed), and the image is not touched; root then
/// applies the log.
#[test]
fn an_image_left_in_use_is_refused_where_its_log_cannot_be_read() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, links, paths, mut model, stack) = served("links-hidden");
    write_into(&stack, &mut model, &COPIED, 1);
    drop(stack);
    // The images are open to the other user; the log directory (0700) is not.
    for p in [dir.path()].into_iter().chain(paths.iter().map(PathBuf::as_path)) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(if p == dir.path() { 0o777 } else { 0o666 })).unwrap();
    }
    let before = std::fs::read(&paths[1]).unwrap();
    let top = paths[1].as_os_str();
    // As the daemon makes it (others may search it, so they see this
    // image's log), and as an earlier version did (they see nothing).
    for mode in [0o711, 0o700] {
        std::fs::set_permissions(links.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        for args in [vec!["compact".as_ref(), top], vec!["check".as_ref(), "--repair".as_ref(), top]] {
            cli_as(65534, links.path(), &args).expect_clean_failure().mentions(&["not closed cleanly"]);
            assert!(std::fs::read(&paths[1]).unwrap() == before, "{args:?} as another user changed the top ({mode:o})");
        }
    }
    // An image left in use without a log is that user's to repair, where
    // the directory shows it has none.
    std::fs::set_permissions(links.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let lone = dir.join("lone.hds");
    block_on(PloopLayer::create(&SyncIo, &lone, SIZE, C)).unwrap();
    let (stack, _) = open(std::slice::from_ref(&lone), None);
    block_on(stack.write(&SyncIo, 0, &pattern(5, 4096))).unwrap();
    drop(stack);
    std::fs::set_permissions(&lone, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(common::in_use_mark(&lone), IN_USE);
    cli_as(65534, links.path(), &["check".as_ref(), "--repair".as_ref(), lone.as_os_str()]).ok();
    assert_ne!(common::in_use_mark(&lone), IN_USE);
    // Read-only looks are not refused.
    cli_as(65534, links.path(), &["check".as_ref(), top]).mentions(&["in-use mark set"]);
    cli_as(0, links.path(), &["check".as_ref(), "--repair".as_ref(), top]).ok();
    let (stack, _) = open(&paths, None);
    assert_disk(&stack, &model, "after root's repair");
    close_clean(stack, &paths[1], "after root's repair");
}

/// A repair of a killed top too damaged to open with its log releases the
/// copies the log recorded, so the log goes too (a record left behind
/// could later link a reused cluster).
#[test]
fn a_repair_past_damage_drops_the_log() {
    let (_dir, links, paths, mut model, stack) = served("links-damaged");
    write_into(&stack, &mut model, &COPIED, 1);
    drop(stack);
    assert_eq!(logs(links.path()).len(), 1);
    common::set_bat_entry(&paths[1], CLUSTERS - 3, 0x00ff_ffff);
    let r = cli_as(0, links.path(), &["check".as_ref(), "--repair".as_ref(), paths[1].as_os_str()]);
    assert_ne!(r.code(), 101, "{}", r.stderr);
    assert!(logs(links.path()).is_empty(), "the log outlived the repair: {:?}\n{}", logs(links.path()), r.stderr);
    assert_ploop_clean(&paths[1], "after the repair");
}

/// A BAT write that failed in one table block while another block of the
/// same write landed: the entries of both are rolled back in memory, but
/// the landed block still names the failed write's cluster on disk until
/// it is written again. A copy-up into that cluster must not be linked
/// through the log meanwhile: after a kill, the replay finds the stale
/// entry, drops the record, and the acknowledged write would read as the
/// failed one's zeros. (Found by a review.)
#[test]
fn a_copy_up_after_a_half_landed_bat_write_survives_a_kill() {
    use common::inject::{Kind, Trap};
    // Two table blocks: entries 0..1008 in the first (after the header),
    // the rest in the second.
    const WIDE: u64 = 2048 * C;
    let (first, second) = (1007u64, 1008u64);
    let dir = TempDir::new("links-half-bat");
    let links = volatile_dir();
    let (base, top) = (dir.join("base.hds"), dir.join("top.hds"));
    block_on(PloopLayer::create(&SyncIo, &base, WIDE, C)).unwrap();
    let under = pattern(7, (2 * C) as usize);
    {
        let (stack, _) = open(std::slice::from_ref(&base), None);
        block_on(stack.write(&SyncIo, first * C, &under)).unwrap();
        block_on(stack.close(&SyncIo)).unwrap();
    }
    block_on(PloopLayer::create(&SyncIo, &top, WIDE, C)).unwrap();
    let paths = vec![base, top.clone()];
    let (stack, _) = open(&paths, Some(links.path()));
    // Whole clusters zeroed: no copy-up, ordinary entries in both blocks,
    // one BAT write; its first block fails.
    let block = ublk_ploop::io::open_image_file(&top, false, Direct::Auto).unwrap().block_size as u64;
    let first_block = (64 + 4 * first) / block * block;
    assert!(first_block < (64 + 4 * second) / block * block, "the two entries share a table block of {block} bytes");
    let trapped = Trap::new(Kind::Write).on(&top).at(first_block).io();
    block_on(stack.write_zeroes(&trapped, first * C, (2 * C) as usize)).expect_err("the BAT write's first block fails");
    assert_eq!(trapped.hook.failed(), 1, "the trap did not fire");
    // A 4 KiB write into the second cluster copies it up from the base.
    let at = second * C + 8 * K;
    let data = pattern(9, 4096);
    block_on(stack.write(&SyncIo, at, &data)).unwrap();
    let read = |stack: &Stack| {
        let mut buf = vec![0u8; 4096];
        block_on(stack.read(&SyncIo, at, &mut buf)).unwrap();
        buf
    };
    assert!(read(&stack) == data, "the write does not read back before the kill");
    drop(stack);
    let (stack, reports) = open(&paths, Some(links.path()));
    assert!(read(&stack) == data, "the acknowledged write is gone after a kill (report {:?})", reports[1]);
    let mut rest = vec![0u8; C as usize];
    block_on(stack.read(&SyncIo, second * C, &mut rest)).unwrap();
    rest[(8 * K) as usize..(8 * K) as usize + 4096].copy_from_slice(&under[C as usize + (8 * K) as usize..C as usize + (8 * K) as usize + 4096]);
    assert!(rest == under[C as usize..], "the copied-up cluster does not hold the base around the write");
    close_clean(stack, &top, "after the kill");
}
