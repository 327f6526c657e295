//! Rules ploop's own tools follow that ours must follow too, checked
//! through the command line on disks no device serves: an empty
//! changed-block record is valid; offline snapshot and merge keep the
//! record; a V1 disk gets V1 deltas; image files are created 0600; a
//! command that waited for ploop's lock works on the descriptor it finds
//! then; compacting a bare delta file never lets a parent's old data show.

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use md5::{Digest, Md5};
use ublk_ploop::disk::{Disk, Guid, Image, Shot, Temporary, TOP_GUID};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::tracker::Tracker;

const K: u64 = 1024;
const M: u64 = 1024 * K;
const CLUSTER: u64 = 64 * K;
/// "Closed, with a valid format extension".
const CLOSED_V21: u32 = 0x312e_3276;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn read_all(paths: &[PathBuf]) -> Vec<u8> {
    let stack = open_stack(paths, true);
    let mut buf = vec![0u8; stack.size() as usize];
    block_on(stack.read(&SyncIo, 0, &mut buf)).unwrap();
    buf
}

fn write(paths: &[PathBuf], pieces: &[(u64, &[u8])]) {
    let stack = open_stack(paths, false);
    for (off, data) in pieces {
        block_on(stack.write(&SyncIo, *off, data)).unwrap();
    }
    block_on(stack.close(&SyncIo)).unwrap();
}

fn chain(dir: &Path) -> Vec<PathBuf> {
    Disk::load(dir).unwrap().layers(None).unwrap().into_iter().map(|s| s.path).collect()
}

/// qemu-img 7.2 does not know format extensions: it may call one leaked
/// space (exit 3), never damage.
fn qemu_accepts(img: &Path) {
    if have_qemu() {
        let r = qemu_img(["check", "-f", "parallels", p(img)]);
        assert!(r.code() == 0 || r.code() == 3, "qemu-img check {}: exit {}\n{}", img.display(), r.code(), r.stdout);
    }
}

/// Append a format extension holding a dirty-bitmap record with an L1 of
/// `l1` entries (all 0: nothing changed), laid out by hand as ploop lays
/// it out, and point the header at it ("v2.1": closed with a valid
/// extension). `ploop snapshot -b UUID` on a stopped disk writes one with
/// an L1 of none.
fn append_cbt_record(img: &Path, id: [u8; 16], granularity_sectors: u32, l1: u32) {
    let cluster = read_u32(img, 28) as u64 * SECTOR;
    let size_sectors = read_u64(img, 36);
    let at = file_len(img).next_multiple_of(cluster);
    let mut block = vec![0u8; cluster as usize];
    block[..8].copy_from_slice(&0xAB23_4CEF_23DC_EA87u64.to_le_bytes());
    let mut data = Vec::new();
    data.extend_from_slice(&size_sectors.to_le_bytes());
    data.extend_from_slice(&id);
    data.extend_from_slice(&granularity_sectors.to_le_bytes());
    data.extend_from_slice(&l1.to_le_bytes());
    data.extend(std::iter::repeat(0u8).take(8 * l1 as usize));
    let rec = 24;
    block[rec..rec + 8].copy_from_slice(&0x2038_5FAE_252C_B34Au64.to_le_bytes());
    block[rec + 16..rec + 20].copy_from_slice(&(data.len() as u32).to_le_bytes());
    block[rec + 24..rec + 24 + data.len()].copy_from_slice(&data);
    // The zero record after it ends the list; the MD5 covers [24, cluster).
    let sum: [u8; 16] = Md5::digest(&block[24..]).into();
    block[8..24].copy_from_slice(&sum);
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&block, at).unwrap();
    drop(f);
    write_u32(img, 44, CLOSED_V21);
    write_u64(img, 56, at / SECTOR);
}

/// The record a read-write open finds in `img` (put back on close).
fn record_of(img: &Path) -> Option<([u8; 16], u64, Vec<usize>)> {
    let stack = open_stack(&[img], false);
    let saved = block_on(stack.take_saved_bitmaps());
    let found = saved.first().map(|bm| (bm.id, bm.granularity, bm.bits.iter_ones().collect::<Vec<_>>()));
    if let Some(bm) = saved.into_iter().next() {
        let t = Arc::new(Tracker::from_bits(stack.size(), bm.granularity, &bm.bits));
        stack.keep_on_close(Some((t, bm.id)));
    }
    block_on(stack.close(&SyncIo)).unwrap();
    found
}

fn new_disk(dir: &Path, size: &str) -> Vec<u8> {
    ploop(["init", p(dir), "--size", size, "--cluster-size", "64K"]).ok();
    let paths = chain(dir);
    let size = read_u64(&paths[0], 36) * SECTOR;
    let data = pattern(7, size as usize);
    write(&paths, &[(0, &data)]);
    data
}

// 6 ---------------------------------------------------------------------

#[test]
fn an_empty_changed_block_record_is_valid() {
    let dir = TempDir::new("rules-empty-cbt");
    let img = dir.join("a.hds");
    ploop(["create", p(&img), "--size", "8M", "--cluster-size", "64K"]).ok();
    let data = pattern(3, (2 * CLUSTER) as usize);
    write(&[img.clone()], &[(CLUSTER, &data)]);
    append_cbt_record(&img, [0x5A; 16], 128, 0);
    ploop(["info", p(&img)]).ok();
    let r = ploop(["check", p(&img), "--json"]).ok().json();
    assert_eq!(r["deltas"][0]["report"]["dirty_bitmaps"], 1, "{r}");
    // (qemu-img 7.2 will not open this one: its reader wants the full L1.)
    // A read-write open takes it as "nothing changed", and a clean close
    // puts it back, with an L1 entry per chunk (which qemu-img reads).
    assert_eq!(record_of(&img), Some(([0x5A; 16], 128 * SECTOR, vec![])));
    assert_eq!(in_use_mark(&img), CLOSED_V21);
    qemu_accepts(&img);
    assert_eq!(record_of(&img), Some(([0x5A; 16], 128 * SECTOR, vec![])));
    assert_bytes_equal(&read_all(&[img.clone()])[CLUSTER as usize..(3 * CLUSTER) as usize], &data[..], "disk content");
    // Fewer entries than chunks: the missing chunks are all clear too.
    let img2 = dir.join("b.hds");
    ploop(["create", p(&img2), "--size", "256M", "--cluster-size", "32K"]).ok();
    append_cbt_record(&img2, [1; 16], 1, 1);
    ploop(["check", p(&img2)]).ok();
    assert_eq!(record_of(&img2), Some(([1; 16], SECTOR, vec![])));
}

// 7 ---------------------------------------------------------------------

#[test]
fn offline_snapshot_and_merge_keep_the_changed_block_record() {
    let dir = TempDir::new("rules-cbt-offline");
    let disk = dir.join("disk");
    let data = new_disk(&disk, "4M");
    let base = chain(&disk)[0].clone();
    // A record as a clean stop leaves it: clusters 2 and 5 changed.
    {
        let stack = open_stack(&[&base], false);
        let t = Arc::new(Tracker::new(stack.size(), CLUSTER));
        t.mark_range(2 * CLUSTER, 10);
        t.mark_range(5 * CLUSTER, CLUSTER);
        stack.keep_on_close(Some((t, [0xC7; 16])));
        block_on(stack.close(&SyncIo)).unwrap();
    }
    let want = Some(([0xC7; 16], CLUSTER, vec![2, 5]));
    ploop(["snapshot", p(&disk)]).ok();
    let layers = chain(&disk);
    assert_eq!(layers.len(), 2);
    assert_eq!(read_u64(&layers[0], 56), 0, "the record left the old top");
    assert_eq!(in_use_mark(&layers[1]), CLOSED_V21, "the new top is closed with a record");
    for l in &layers {
        qemu_accepts(l);
        ploop(["check", p(l)]).ok();
    }
    assert_eq!(record_of(&layers[1]), want, "the record moved onto the new top");
    assert_bytes_equal(&read_all(&layers), &data, "disk content");

    ploop(["snapshot-merge", p(&disk)]).ok();
    let layers = chain(&disk);
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0], base, "an offline merge keeps the parent's file, as ploop's does");
    ploop(["check", p(&layers[0])]).ok();
    qemu_accepts(&layers[0]);
    assert_eq!(record_of(&layers[0]), want, "the record is in the merged file");
    assert_bytes_equal(&read_all(&layers), &data, "disk content");

    // A snapshot then a delete of the base (merged into its child) too.
    let out = ploop(["snapshot", p(&disk), "--json"]).ok().json();
    let snap = out["guid"].as_str().unwrap().to_string();
    ploop(["snapshot-delete", p(&disk), "-u", &snap]).ok();
    let layers = chain(&disk);
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0], base, "deleting the base offline folds the top into it");
    assert_eq!(record_of(&layers[0]), want, "kept across snapshot-delete");
    assert_bytes_equal(&read_all(&layers), &data, "disk content");
}

// 8 ---------------------------------------------------------------------

#[test]
fn a_snapshot_of_a_v1_disk_makes_a_v1_delta() {
    let dir = TempDir::new("rules-v1");
    let disk = dir.join("disk");
    ploop(["init", p(&disk), "--size", "2M", "--cluster-size", "64K"]).ok();
    // The base becomes a V1 image with data in clusters 0 and 3.
    let base = chain(&disk)[0].clone();
    std::fs::remove_file(&base).unwrap();
    let (c0, c3) = (pattern(10, CLUSTER as usize), pattern(13, CLUSTER as usize));
    ImageSpec::v1(2 * M, CLUSTER).with_cluster(0, 0, &c0).with_cluster(3, 1, &c3).write(&base);
    ploop(["check", p(&base)]).ok();
    let mut model = read_all(&[base.clone()]);
    assert_eq!(model[..CLUSTER as usize], c0[..]);

    ploop(["snapshot", p(&disk)]).ok();
    let layers = chain(&disk);
    let top = layers.last().unwrap().clone();
    assert_eq!(&std::fs::read(&top).unwrap()[..16], MAGIC_V1, "the new delta is V1, like its chain");
    let more = pattern(20, 3 * CLUSTER as usize);
    write(&layers, &[(CLUSTER + 512, &more)]);
    model[(CLUSTER + 512) as usize..(4 * CLUSTER + 512) as usize].copy_from_slice(&more);
    assert_bytes_equal(&read_all(&layers), &model, "disk content");
    for l in &layers {
        ploop(["check", p(l)]).ok();
        if have_qemu() {
            qemu_check_clean(l);
        }
    }
    // A switch's new top takes the chain's version too.
    let out = ploop(["snapshot", p(&disk), "--json"]).ok().json();
    let snap = out["guid"].as_str().unwrap().to_string();
    ploop(["snapshot-switch", p(&disk), "-u", &snap]).ok();
    let layers = chain(&disk);
    assert_eq!(&std::fs::read(layers.last().unwrap()).unwrap()[..16], MAGIC_V1, "switch: new top is V1");
    assert_bytes_equal(&read_all(&layers), &model, "disk content");
    ploop(["snapshot-merge", p(&disk)]).ok();
    ploop(["snapshot-merge", p(&disk)]).ok();
    let layers = chain(&disk);
    assert_eq!(layers.len(), 1);
    assert_bytes_equal(&read_all(&layers), &model, "disk content");
    if have_qemu() {
        qemu_check_clean(&layers[0]);
    }
}

// 9 ---------------------------------------------------------------------

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn image_files_are_created_0600() {
    // SAFETY: sets this process's umask (inherited by the commands run);
    // 022 is what a shell usually has.
    unsafe { libc::umask(0o022) };
    let dir = TempDir::new("rules-mode");
    let img = dir.join("a.hds");
    ploop(["create", p(&img), "--size", "4M", "--cluster-size", "64K"]).ok();
    write(&[img.clone()], &[(0, &pattern(1, CLUSTER as usize))]);
    let disk = dir.join("disk");
    ploop(["init", p(&disk), "--size", "4M", "--cluster-size", "64K"]).ok();
    let out = ploop(["snapshot", p(&disk), "--json"]).ok().json();
    let snap = out["guid"].as_str().unwrap().to_string();
    ploop(["snapshot", p(&disk)]).ok();
    ploop(["snapshot-switch", p(&disk), "-u", &snap]).ok();
    let raw = dir.join("out.raw");
    let conv = dir.join("out.hds");
    ploop(["convert", p(&img), p(&raw), "--to", "raw"]).ok();
    ploop(["convert", p(&img), p(&conv), "--to", "ploop"]).ok();
    // Received images: a file, a disk directory, an incremental delta.
    let stack = open_stack(&[&img], false);
    let ring = OwnRing::new(16).unwrap();
    let file = dir.join("stream");
    ring.block_on(ublk_ploop::copy::send(
        &ring.io(),
        &stack,
        Box::new(std::fs::File::create(&file).unwrap()),
        None,
        &mut ublk_ploop::copy::NoFs,
        ublk_ploop::copy::SendOptions::default(),
        &|_, _, _| {},
    ))
    .unwrap();
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let got = dir.join("got.hds");
    let got_dir = dir.join("got");
    ploop(["receive", "--image", p(&got), "--from", p(&file)]).ok();
    ploop(["receive", "--image", &format!("{}/", p(&got_dir)), "--from", p(&file)]).ok();
    ploop(["receive", "--image", p(&got), "--from", p(&file), "--incremental"]).ok();

    let mut files = vec![img, raw, conv, got];
    files.extend(chain(&disk));
    files.extend(chain(&got_dir));
    assert_eq!(files.len(), 7, "{files:?}");
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
}

/// ploop's tool rounds every size it is given up to whole clusters, and its
/// merge copies whole clusters only: a disk of ours with a partial last
/// cluster would lose that part to ploop's merge. New sizes are rounded
/// as ploop rounds them: init, create, resize of a disk and of a file.
#[test]
fn sizes_are_rounded_up_to_whole_clusters_as_ploop_rounds_them() {
    let dir = TempDir::new("rules-round");
    let disk = dir.join("disk");
    let out = ploop(["init", p(&disk), "--size", "1500K", "--json"]).ok().json();
    assert_eq!(out["size"].as_u64(), Some(2 * M));
    let base = chain(&disk)[0].clone();
    assert_eq!(read_u64(&base, 36) * SECTOR, 2 * M);
    assert_eq!(Disk::load(&disk).unwrap().desc.size(), 2 * M);
    ploop(["resize", p(&disk), "--size", "2500K"]).ok();
    assert_eq!(Disk::load(&disk).unwrap().desc.size(), 3 * M);
    assert_eq!(read_u64(&base, 36) * SECTOR, 3 * M);
    let img = dir.join("a.hds");
    ploop(["create", p(&img), "--size", "1500K", "--cluster-size", "64K"]).ok();
    assert_eq!(read_u64(&img, 36) * SECTOR, 24 * CLUSTER);
    ploop(["resize", p(&img), "--size", "1601K"]).ok();
    assert_eq!(read_u64(&img, 36) * SECTOR, 26 * CLUSTER);
    // Already whole: unchanged.
    ploop(["resize", p(&img), "--size", "2M"]).ok();
    assert_eq!(read_u64(&img, 36) * SECTOR, 2 * M);
}

/// ploop's tool sets header flag 2 while it converts an image between v1
/// and v2, keeping a copy of the table to put back after a crash. Such an
/// image is neither served nor "repaired": clearing the entries of a half
/// converted table would lose the data ploop's tool restores.
#[test]
fn an_interrupted_version_conversion_is_left_to_ploops_tool() {
    let dir = TempDir::new("rules-convert");
    let img = dir.join("a.hds");
    ploop(["create", p(&img), "--size", "4M", "--cluster-size", "64K"]).ok();
    write(&[img.clone()], &[(0, &pattern(3, 2 * CLUSTER as usize))]);
    write_u32(&img, 52, read_u32(&img, 52) | 2);
    write_u32(&img, 44, 0x746F_6E59);
    let before = std::fs::read(&img).unwrap();
    let check = ploop(["check", p(&img)]);
    assert_ne!(check.code(), 0, "{}", check.stdout);
    assert!(format!("{}{}", check.stdout, check.stderr).contains("converting"), "{}\n{}", check.stdout, check.stderr);
    for args in [vec!["check", "--repair", p(&img)], vec!["compact", p(&img)], vec!["resize", p(&img), "--size", "8M"]] {
        let r = ploop(&args);
        assert_ne!(r.code(), 0, "{args:?}: {}", r.stdout);
        assert!(r.stderr.contains("converting"), "{args:?}: {}", r.stderr);
        assert!(std::fs::read(&img).unwrap() == before, "{args:?} changed the image");
    }
}

// 10 --------------------------------------------------------------------

#[test]
fn a_command_that_waited_for_the_lock_works_on_the_descriptor_it_finds() {
    let dir = TempDir::new("rules-lock");
    let disk = dir.join("disk");
    let data = new_disk(&disk, "2M");
    let held = Disk::load(&disk).unwrap().lock().unwrap().expect("nothing holds it yet");
    let mut child = std::process::Command::new(bin())
        .args(["snapshot", p(&disk), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert!(child.try_wait().unwrap().is_none(), "the command did not wait for the lock");
    // Meanwhile another tool (as ploop's offline snapshot does) adds a
    // delta, with data in it, and stores the descriptor.
    let mut d = Disk::load(&disk).unwrap();
    let theirs = d.new_delta_name();
    let theirs_path = d.dir.join(&theirs);
    block_on(PloopLayer::create(&SyncIo, &theirs_path, 2 * M, CLUSTER)).unwrap();
    let snap = Guid::random();
    d.desc.images.iter_mut().filter(|i| i.guid == TOP_GUID).for_each(|i| i.guid = snap);
    d.desc.shots.iter_mut().filter(|s| s.guid == TOP_GUID).for_each(|s| s.guid = snap);
    let kind = d.desc.images[0].kind;
    d.desc.images.push(Image { guid: TOP_GUID, kind, file: theirs });
    d.desc.shots.push(Shot { guid: TOP_GUID, parent: snap, temporary: Temporary::No });
    let mut model = data.clone();
    let more = pattern(9, CLUSTER as usize);
    write(&[theirs_path.clone()], &[(3 * CLUSTER, &more)]);
    block_on(d.store(&SyncIo)).unwrap();
    model[(3 * CLUSTER) as usize..(4 * CLUSTER) as usize].copy_from_slice(&more);
    assert!(child.try_wait().unwrap().is_none(), "the command did not wait for the lock");
    drop(held);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the waiting snapshot failed: {}", String::from_utf8_lossy(&out.stderr));
    let layers = chain(&disk);
    assert_eq!(layers.len(), 3, "the snapshot went on top of the other tool's");
    assert_eq!(layers[1], theirs_path);
    let d = Disk::load(&disk).unwrap();
    assert_eq!(d.desc.shots.len(), 3);
    assert!(d.desc.shot(snap).is_some());
    assert_bytes_equal(&read_all(&layers), &model, "disk content");
    for l in &layers {
        ploop(["check", p(l)]).ok();
    }
}

// 4 ---------------------------------------------------------------------

/// A disk whose base is full of data, a snapshot, and a top with clusters
/// 0..8 written then 0..4 discarded (they read as zeros over the base's).
fn disk_with_discards(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut model = new_disk(dir, "1M");
    ploop(["snapshot", p(dir)]).ok();
    let layers = chain(dir);
    let top_data = pattern(4, (8 * CLUSTER) as usize);
    let stack = open_stack(&layers, false);
    block_on(stack.write(&SyncIo, 0, &top_data)).unwrap();
    block_on(stack.discard(&SyncIo, 0, (4 * CLUSTER) as usize)).unwrap();
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    model[..(8 * CLUSTER) as usize].copy_from_slice(&top_data);
    model[..(4 * CLUSTER) as usize].fill(0);
    assert_bytes_equal(&read_all(&layers), &model, "disk content");
    (layers[1].clone(), model)
}

#[test]
fn compacting_a_bare_delta_never_shows_its_parent() {
    let dir = TempDir::new("rules-compact");
    // The delta named by a descriptor beside it: its chain is taken into
    // account (the discarded clusters over the base's data stay linked).
    let disk = dir.join("disk");
    let (top, model) = disk_with_discards(&disk);
    ploop(["compact", p(&top)]).ok();
    let layers = chain(&disk);
    assert_bytes_equal(&read_all(&layers), &model, "compact of a named delta");
    for l in &layers {
        assert_ploop_clean(l, "after compact");
    }

    // A delta no descriptor names: nothing is unlinked without --base.
    let other = dir.join("other");
    let (top2, model2) = disk_with_discards(&other);
    let base2 = chain(&other)[0].clone();
    let loose = dir.join("loose");
    std::fs::create_dir(&loose).unwrap();
    let (lbase, ltop) = (loose.join("base.hds"), loose.join("top.hds"));
    for (from, to) in [(&base2, &lbase), (&top2, &ltop)] {
        let ok = std::process::Command::new("cp").arg("--sparse=always").arg(from).arg(to).status().unwrap().success();
        assert!(ok);
    }
    let r = ploop(["compact", p(&ltop), "--json"]).ok().json();
    assert_eq!(r["unlinked"], 0, "{r}");
    assert_bytes_equal(&read_all(&[lbase.clone(), ltop.clone()]), &model2, "compact of an unnamed delta");
    assert_ploop_clean(&ltop, "unnamed delta after compact");

    // --base says nothing lies below: then they go.
    let r = ploop(["compact", p(&ltop), "--base", "--json"]).ok().json();
    assert_eq!(r["unlinked"], 4, "{r}");
    assert_ploop_clean(&ltop, "after compact --base");
    let alone = read_all(&[ltop.clone()]);
    assert!(alone[..(4 * CLUSTER) as usize].iter().all(|&b| b == 0));
    let live = (4 * CLUSTER) as usize..(8 * CLUSTER) as usize;
    assert_bytes_equal(&alone[live.clone()], &model2[live], "the delta's own clusters");
}

// ploop 9's reverse merge, interrupted ----------------------------------

/// ploop 9 merges the top into the base by zeroing the base's entries for
/// the clusters the top holds (`TemporaryZero`), then swapping the two
/// files in the descriptor (`TemporaryZeroSwap`) and merging the small one
/// into the big one. We never write those states, but a disk ploop's tool
/// left in either is read as ploop reads it and finished by the next
/// command as ploop finishes it: the small delta into the base's file.
#[test]
fn ploops_interrupted_reverse_merge_states_are_finished() {
    for swapped in [false, true] {
        let ctx = if swapped { "TemporaryZeroSwap" } else { "TemporaryZero" };
        let dir = TempDir::new("rules-reverse");
        let disk = dir.join("disk");
        let mut data = new_disk(&disk, "4M");
        ploop(["snapshot", p(&disk)]).ok();
        let layers = chain(&disk);
        let piece = pattern(9, 8192);
        let at = [2 * CLUSTER + 512, 7 * CLUSTER];
        write(&layers, &[(at[0], &piece), (at[1], &piece)]);
        for a in at {
            data[a as usize..a as usize + piece.len()].copy_from_slice(&piece);
        }
        let base_len = std::fs::metadata(&layers[0]).unwrap().len();
        // The base's entries for the top's clusters, zeroed (the top hides them).
        let base = std::fs::OpenOptions::new().write(true).open(&layers[0]).unwrap();
        for c in [2u64, 7] {
            base.write_all_at(&[0; 4], 64 + 4 * c).unwrap();
        }
        base.sync_all().unwrap();
        drop(base);
        let mut d = Disk::load(&disk).unwrap();
        let parent = d.desc.shot(TOP_GUID).unwrap().parent;
        let state = if swapped { Temporary::ZeroSwap } else { Temporary::Zero };
        d.desc.shots.iter_mut().filter(|s| s.guid == parent).for_each(|s| s.temporary = state);
        if swapped {
            let (a, b) = (d.desc.image(parent).unwrap().file.clone(), d.desc.image(TOP_GUID).unwrap().file.clone());
            d.desc.images.iter_mut().for_each(|i: &mut Image| i.file = if i.guid == parent { b.clone() } else { a.clone() });
        }
        block_on(d.store(&SyncIo)).unwrap();
        let half = chain(&disk);
        assert_bytes_equal(&read_all(&half), &data, &format!("{ctx}: the half-merged chain"));
        assert!(ploop(["snapshot-list", p(&disk)]).ok().stdout.contains("(temporary)"), "{ctx}: not listed as temporary");

        // Any command finishes it first: a snapshot here.
        ploop(["snapshot", p(&disk)]).ok();
        let d = Disk::load(&disk).unwrap();
        assert!(d.desc.shots.iter().all(|s: &Shot| s.temporary == Temporary::No), "{ctx}: a temporary snapshot is left");
        assert_eq!(d.desc.images.len(), 2, "{ctx}: the merge was not finished before the snapshot");
        // Either way the base's file stays and the small delta goes, as
        // ploop's own resume leaves it; the cost is the small delta's
        // clusters: the base's file grows by at most those two.
        let layers = chain(&disk);
        let (base, small) = if swapped { (&half[1], &half[0]) } else { (&half[0], &half[1]) };
        assert_eq!(&layers[0], base, "{ctx}: the base's file is not the disk's any more");
        assert_eq!(layers[0].file_name().unwrap(), "root.hds", "{ctx}");
        assert!(!small.exists(), "{ctx}: the small delta's file was left");
        let grown = std::fs::metadata(&layers[0]).unwrap().len().saturating_sub(base_len);
        assert!(grown <= 2 * CLUSTER, "{ctx}: the base grew by {grown} bytes for a 2-cluster delta");
        for l in &layers {
            ploop(["check", p(l)]).ok();
            qemu_accepts(l);
        }
        assert_bytes_equal(&read_all(&layers), &data, &format!("{ctx}: the finished disk"));
    }
}

// ploop's raw mode ----------------------------------------------------------

/// ploop's raw mode: the base is a raw file, and ploop writes `Plain` as
/// the type of every image, but only the base is raw ("Only base image
/// could be in RAW format", merge.c): its snapshots' deltas are ploop
/// images. A disk as ploop's tool leaves it, two deltas over the raw
/// base, reads as ploop reads it; a snapshot of ours, a merge of the top
/// and of a lower delta keep reading it so, with qemu-img's and our check
/// of the ploop deltas.
#[test]
fn a_raw_mode_disk_reads_its_deltas_as_ploop_images() {
    let dir = TempDir::new("rules-raw-mode");
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let size = 16 * CLUSTER;
    let mut model = pattern(21, size as usize);
    std::fs::write(disk.join("root.hds"), &model).unwrap();
    // Two deltas as ploop's snapshot makes them, over the raw base.
    let (mid, top) = ("root.hds.{1b4c7a9e-5d2f-4e61-8a3b-9c0d1e2f3a4b}", "root.hds.{2c5d8b0f-6e3a-4f72-9b4c-0d1e2f3a4b5c}");
    let mut desc = ublk_ploop::disk::Descriptor::new(size, CLUSTER, "root.hds", ublk_ploop::disk::ImageType::Plain).unwrap();
    let base_guid: Guid = "{3d6e9c1a-7f4b-4a83-8c5d-1e2f3a4b5c6d}".parse().unwrap();
    let mid_guid: Guid = "{4e7fad2b-8a5c-4b94-9d6e-2f3a4b5c6d7e}".parse().unwrap();
    desc.images[0].guid = base_guid;
    desc.shots[0].guid = base_guid;
    for (guid, parent, file) in [(mid_guid, base_guid, mid), (TOP_GUID, mid_guid, top)] {
        desc.images.push(Image { guid, kind: ublk_ploop::disk::ImageType::Plain, file: file.into() });
        desc.shots.push(Shot { guid, parent, temporary: Temporary::No });
        block_on(PloopLayer::create(&SyncIo, &disk.join(file), size, CLUSTER)).unwrap();
    }
    std::fs::write(disk.join("DiskDescriptor.xml"), desc.to_xml()).unwrap();
    let files: Vec<PathBuf> = [mid, top].iter().map(|f| disk.join(f)).collect();
    for (i, f) in files.iter().enumerate() {
        // Written through a ploop stack of the delta alone: whole
        // clusters, so that nothing of the parent is needed.
        let piece = pattern(30 + i as u64, CLUSTER as usize);
        let at = (3 + 4 * i as u64) * CLUSTER;
        write(std::slice::from_ref(f), &[(at, &piece)]);
        model[at as usize..(at + CLUSTER) as usize].copy_from_slice(&piece);
    }
    let layers = Disk::load(&disk).unwrap().layers(None).unwrap();
    let formats: Vec<_> = layers.iter().map(|l| l.format).collect();
    use ublk_ploop::layers::Format;
    assert_eq!(formats, [Format::Raw, Format::Ploop, Format::Ploop], "the formats of a raw-mode chain");
    ploop(["convert", p(&disk), p(&dir.join("out.raw")), "--to", "raw"]).ok();
    assert_bytes_equal(&std::fs::read(dir.join("out.raw")).unwrap(), &model, "a raw-mode disk as ploop leaves it");

    // Our snapshot: its delta is a ploop image, its type Plain like the rest.
    ploop(["snapshot", p(&disk)]).ok();
    let d = Disk::load(&disk).unwrap();
    assert!(d.desc.images.iter().all(|i| i.kind == ublk_ploop::disk::ImageType::Plain), "a raw-mode disk's types are all Plain");
    let at = 9 * CLUSTER;
    let piece = pattern(40, CLUSTER as usize);
    let newest = d.file_path(d.desc.image(TOP_GUID).unwrap());
    write(&[newest], &[(at, &piece)]);
    model[at as usize..(at + CLUSTER) as usize].copy_from_slice(&piece);
    let read = |ctx: &str| {
        let out = dir.join("out.raw");
        let _ = std::fs::remove_file(&out);
        ploop(["convert", p(&disk), p(&out), "--to", "raw"]).ok();
        assert_bytes_equal(&std::fs::read(&out).unwrap(), &model, ctx);
        let d = Disk::load(&disk).unwrap();
        for img in &d.desc.images {
            if d.desc.shot(img.guid).unwrap().parent != ublk_ploop::disk::NONE_GUID {
                ploop(["check", p(&d.file_path(img))]).ok();
                qemu_accepts(&d.file_path(img));
            }
        }
    };
    read("after our snapshot");
    // Merges: a lower delta into the raw base (written in place: the base
    // stays raw), the top into its parent, then the top into the raw base.
    ploop(["snapshot-merge", p(&disk), "--uuid", &mid_guid.to_string()]).ok();
    read("after merging a lower delta into the raw base");
    let d = Disk::load(&disk).unwrap();
    assert_eq!(d.layers(None).unwrap()[0].path, disk.join("root.hds"), "the raw base keeps its file");
    ploop(["snapshot-merge", p(&disk)]).ok();
    read("after merging the top");
    ploop(["snapshot-merge", p(&disk)]).ok();
    read("after merging the last delta into the raw base");
    // As ploop's offline merge: the top went into the raw base in place.
    let d = Disk::load(&disk).unwrap();
    assert_eq!(d.desc.images.len(), 1, "{:?}", d.desc.images);
    assert_eq!(d.desc.images[0].file, "root.hds");
    assert_bytes_equal(&std::fs::read(disk.join("root.hds")).unwrap(), &model, "the raw base after the merges");
}
