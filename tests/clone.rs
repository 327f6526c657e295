//! Thin clones of a template (#21): a clone reads the template's deltas
//! and writes only its own top; many are open at once over one template;
//! the template's files never change; `detach` copies the template up and
//! leaves a disk that stands alone.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use ublk_ploop::disk::clones::LIST;
use ublk_ploop::disk::{Disk, DESCRIPTOR};
use ublk_ploop::io::{block_on, SyncIo};
use ublk_ploop::{Stack, StackOptions};

const K64: usize = 64 * 1024;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A template disk of 8 MiB, 64 KiB clusters: cluster 0 holds 0x11,
/// cluster 5 holds 0x22, the rest was never written.
fn template(dir: &Path) {
    ploop(["init", p(dir), "--size", "8M", "--cluster-size", "64K"]).ok();
    let stack = open_disk(dir);
    block_on(stack.write(&SyncIo, 0, &[0x11; K64])).unwrap();
    block_on(stack.write(&SyncIo, 5 * K64 as u64, &[0x22; K64])).unwrap();
    close(stack);
}

/// A disk directory's chain, opened read-write as a daemon opens it.
fn open_disk(dir: &Path) -> Stack {
    let disk = Disk::load(dir).unwrap();
    let layers = block_on(disk.writable_layers(&SyncIo)).unwrap();
    let opts = StackOptions { offline: true, ..Default::default() };
    block_on(Stack::open_layers(&SyncIo, &layers, &opts)).unwrap_or_else(|e| panic!("opening {}: {e}", dir.display())).0
}

/// Close a stack cleanly and let its files go (their locks with them).
fn close(stack: Stack) {
    block_on(stack.close(&SyncIo)).unwrap();
}

/// A scratch root with a template and one clone of it, `ct`.
fn template_and_clone(tag: &str) -> (TempDir, PathBuf, PathBuf) {
    let root = TempDir::new(tag);
    let tmpl = root.join("template");
    template(&tmpl);
    let ct = root.join("ct");
    ploop(["clone", p(&tmpl), p(&ct)]).ok();
    (root, tmpl, ct)
}

/// A template with a snapshot (its GUID returned), then 0x33 written
/// over cluster 5 in its new top: it has moved on past the snapshot.
fn template_past_a_snapshot(tag: &str) -> (TempDir, PathBuf, String) {
    let root = TempDir::new(tag);
    let tmpl = root.join("template");
    template(&tmpl);
    let snap = ploop(["snapshot", p(&tmpl), "--json"]).ok().json();
    let guid = snap["guid"].as_str().unwrap().to_string();
    let s = open_disk(&tmpl);
    block_on(s.write(&SyncIo, 5 * K64 as u64, &[0x33; K64])).unwrap();
    close(s);
    (root, tmpl, guid)
}

fn read(stack: &Stack, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    block_on(stack.read(&SyncIo, off, &mut buf)).unwrap();
    buf
}

/// Every file of a directory with its fingerprint (bytes and hash), the
/// lock files aside (taking ploop's lock creates one, as ploop does) and
/// the template's list of its clones (which `clone` writes).
fn files_of(dir: &Path) -> Vec<(PathBuf, (u64, u64))> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| !f.to_string_lossy().ends_with(".lck") && !f.ends_with(LIST))
        .map(|f| {
            let fp = fingerprint(&f);
            (f, fp)
        })
        .collect();
    out.sort();
    out
}

/// The bytes a clone must show: the template's, with its own writes over
/// them (`own` at cluster 1, and 4 KiB of it at the start of cluster 0).
fn check_clone(stack: &Stack, own: u8) {
    let c0 = read(stack, 0, K64);
    assert!(c0[..4096].iter().all(|&b| b == own), "the clone's own write in cluster 0");
    assert!(c0[4096..].iter().all(|&b| b == 0x11), "the template's bytes under the clone's partial write");
    assert!(read(stack, K64 as u64, K64).iter().all(|&b| b == own), "the clone's own cluster");
    assert!(read(stack, 5 * K64 as u64, K64).iter().all(|&b| b == 0x22), "the template's cluster");
    assert!(read(stack, 7 * K64 as u64, K64).iter().all(|&b| b == 0), "never written");
}

fn write_own(stack: &Stack, own: u8) {
    block_on(stack.write(&SyncIo, 0, &[own; 4096])).unwrap();
    block_on(stack.write(&SyncIo, K64 as u64, &[own; K64])).unwrap();
}

/// Ten clones of one template, all open read-write at once, each writing
/// its own data: each reads the template's bytes under its own, holds
/// only what it wrote, and the template's files do not change.
#[test]
fn clones_share_a_template_and_write_only_their_own_tops() {
    let root = TempDir::new("clone-many");
    let tmpl = root.join("template");
    template(&tmpl);
    let before = files_of(&tmpl);
    let clones: Vec<PathBuf> = (0..10).map(|i| root.join(&format!("ct{i}"))).collect();
    for c in &clones {
        let out = ploop(["clone", p(&tmpl), p(c), "--json"]).ok().json();
        assert!(out["ms"].as_f64().unwrap() >= 0.0);
        assert_eq!(out["clone"]["shared"].as_array().unwrap().len(), 1);
    }
    // All open at once: clones lock each its own top, and share the
    // template's base for reading.
    let stacks: Vec<Stack> = clones.iter().map(|c| open_disk(c)).collect();
    for (i, s) in stacks.iter().enumerate() {
        write_own(s, 0xA0 + i as u8);
    }
    for (i, s) in stacks.iter().enumerate() {
        check_clone(s, 0xA0 + i as u8);
    }
    for s in stacks {
        close(s);
    }
    assert_eq!(files_of(&tmpl), before, "a clone changed the template");
    for (i, c) in clones.iter().enumerate() {
        let s = open_disk(c);
        check_clone(&s, 0xA0 + i as u8);
        close(s);
        // Its own top holds its two clusters (one copied up), not the
        // template's data: header and table, then two clusters.
        let disk = Disk::load(c).unwrap();
        let top = disk.file_path(disk.desc.image(disk.desc.top).unwrap());
        assert!(top.starts_with(c), "the clone's top is in its own directory");
        let info = ploop(["info", p(&top), "--json"]).ok().json();
        assert_eq!(info["allocated_clusters"], 2, "{info}");
    }
    // Operations on two clones under ploop's lock at once: each clone's
    // lock is its own (the template's base is not where it goes).
    let a = Disk::load_locked(&clones[0]).unwrap();
    let b = Disk::load_locked(&clones[1]).unwrap();
    assert!(a.holds_lock() && b.holds_lock());
}

/// snapshot-list, info and check show the template as a shared delta; the
/// JSON says so per row.
#[test]
fn list_info_and_check_show_the_shared_template() {
    let root = TempDir::new("clone-list");
    let tmpl = root.join("template");
    template(&tmpl);
    let ct = root.join("ct");
    ploop(["clone", p(&tmpl), p(&ct)]).ok().mentions(&["shared, read-only", "root.hds"]);
    ploop(["snapshot-list", p(&ct)]).ok().mentions(&["(shared, read-only)"]);
    let rows = ploop(["snapshot-list", p(&ct), "--json"]).ok().json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let base = rows.iter().find(|r| !r["current"].as_bool().unwrap()).unwrap();
    assert_eq!(base["shared"], true);
    assert!(base["file"].as_str().unwrap().starts_with(p(&tmpl)));
    let top = rows.iter().find(|r| r["current"].as_bool().unwrap()).unwrap();
    assert!(top.get("shared").is_none(), "written only for a shared delta: {top}");
    ploop(["info", p(&ct)]).ok().mentions(&["(shared, read-only)"]);
    ploop(["check", p(&ct)]).ok();
}

/// A template served read-write (its top marked in use) goes on changing:
/// cloning it is refused, and nothing is made.
#[test]
fn a_template_in_use_is_not_cloned() {
    let root = TempDir::new("clone-busy");
    let tmpl = root.join("template");
    template(&tmpl);
    let serving = open_disk(&tmpl);
    let ct = root.join("ct");
    ploop(["clone", p(&tmpl), p(&ct)]).expect_clean_failure().mentions(&["in use"]);
    assert!(!ct.join(DESCRIPTOR).exists());
    close(serving);
    ploop(["clone", p(&tmpl), p(&ct)]).ok();
    // Once made, the clone is not made again over itself.
    ploop(["clone", p(&tmpl), p(&ct)]).expect_clean_failure().mentions(&["exists already"]);
}

/// A device serving the template holds ploop's byte-range lock for its
/// life and the `.lck` flock for each change: a clone of a snapshot reads
/// the chain between changes (the device keeps its lock), and waits while
/// a change runs. (The CLI finds the device among the live ublk devices;
/// none here, so the library is told.)
#[test]
fn a_snapshot_of_a_served_template_is_cloned_between_its_changes() {
    use ublk_ploop::disk::clone::clone_disk;
    let (root, tmpl, guid) = template_past_a_snapshot("clone-served");
    let at = Some(guid.parse().unwrap());
    // As the daemon holds it: the lock, then the chain open read-write.
    let device = Disk::load_locked(&tmpl).unwrap();
    device.keep_range_lock_only();
    let served = open_disk(&tmpl);
    let base = device.lock_path().unwrap();
    assert!(ploop_sees_locked(&base));
    let ct = root.join("ct");
    block_on(clone_disk(&SyncIo, &tmpl, &ct, at, true)).expect("a clone of a snapshot beside the device");
    assert!(ploop_sees_locked(&base), "the clone took the device's lock away");
    let c = open_disk(&ct);
    assert!(read(&c, 5 * K64 as u64, K64).iter().all(|&b| b == 0x22), "the clone does not read the snapshot");
    close(c);

    // While the device changes the disk, a clone waits for it.
    let change = device.lock().unwrap().expect("the device takes the .lck flock for a change");
    let ct2 = root.join("ct2");
    let (t, c2) = (tmpl.clone(), ct2.clone());
    let cloning = std::thread::spawn(move || block_on(clone_disk(&SyncIo, &t, &c2, at, true)).map(|_| ()).map_err(|e| e.to_string()));
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(!cloning.is_finished(), "the clone did not wait for the device's change");
    assert!(!ct2.join(DESCRIPTOR).exists(), "the clone went on during the device's change");
    drop(change);
    cloning.join().unwrap().expect("the clone after the change");
    assert!(ct2.join(DESCRIPTOR).exists());
    assert!(ploop_sees_locked(&base));
    close(served);
    drop(device);
    assert!(ploop_sees_free_soon(&base), "the device's lock outlived it");
}

/// A clone of a template's snapshot reads the template as it was then,
/// whatever the template's top took afterwards; a template of two deltas
/// is detached in two merges.
#[test]
fn a_clone_of_a_snapshot_and_its_detach() {
    let (root, tmpl, guid) = template_past_a_snapshot("clone-snap");
    let at_snapshot = root.join("old");
    let at_top = root.join("new");
    ploop(["clone", p(&tmpl), p(&at_snapshot), "-u", &guid]).ok();
    ploop(["clone", p(&tmpl), p(&at_top)]).ok();
    let before = files_of(&tmpl);
    let old = open_disk(&at_snapshot);
    assert!(read(&old, 5 * K64 as u64, K64).iter().all(|&b| b == 0x22));
    write_own(&old, 0xB1);
    close(old);
    let new = open_disk(&at_top);
    assert!(read(&new, 5 * K64 as u64, K64).iter().all(|&b| b == 0x33));
    close(new);

    let out = ploop(["detach", p(&at_top), "--json"]).ok().json();
    assert_eq!(out["merged"].as_array().unwrap().len(), 2, "{out}");
    let out = ploop(["detach", p(&at_snapshot), "--json"]).ok().json();
    assert_eq!(out["merged"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!(files_of(&tmpl), before, "detach changed the template");
    // Both stand alone: the template can go.
    fs::remove_dir_all(&tmpl).unwrap();
    for (dir, own, c5) in [(&at_snapshot, Some(0xB1), 0x22), (&at_top, None, 0x33)] {
        let disk = Disk::load(dir).unwrap();
        assert_eq!(disk.desc.images.len(), 1, "one delta left");
        let s = open_disk(dir);
        match own {
            Some(own) => check_clone(&s, own),
            None => assert!(read(&s, 0, K64).iter().all(|&b| b == 0x11)),
        }
        assert!(read(&s, 5 * K64 as u64, K64).iter().all(|&b| b == c5));
        close(s);
        ploop(["check", p(dir)]).ok();
        if have_qemu() {
            qemu_check_clean(&disk.file_path(&disk.desc.images[0]));
        }
        // Nothing is left to detach.
        ploop(["detach", p(dir)]).ok().mentions(&["nothing to detach"]);
    }
}

/// A clone with a snapshot of its own between its top and the template
/// is not detached (the template cannot be copied up into a snapshot):
/// refused with the way out, and nothing changes.
#[test]
fn detach_asks_for_the_clones_snapshots_to_be_merged_first() {
    let (_root, tmpl, ct) = template_and_clone("clone-own-snap");
    let s = open_disk(&ct);
    write_own(&s, 0xC1);
    close(s);
    ploop(["snapshot", p(&ct)]).ok();
    let before = (files_of(&tmpl), files_of(&ct));
    ploop(["detach", p(&ct)]).expect_clean_failure().mentions(&["snapshot-merge"]);
    assert_eq!((files_of(&tmpl), files_of(&ct)), before);
    // The way out: merge the clone's snapshot, then detach.
    ploop(["snapshot-merge", p(&ct)]).ok();
    ploop(["detach", p(&ct)]).ok();
    let s = open_disk(&ct);
    check_clone(&s, 0xC1);
    close(s);
    assert_eq!(files_of(&tmpl), before.0);
}

/// `check --repair` on a clone repairs the clone's own deltas and only
/// checks the template's: leaked space at the end of each is given back in
/// the clone's top and left in the template (exit 3: leaks remain).
#[test]
fn repair_on_a_clone_leaves_the_template_alone() {
    let (_root, tmpl, ct) = template_and_clone("clone-repair");
    let disk = Disk::load(&ct).unwrap();
    let top = disk.file_path(disk.desc.image(disk.desc.top).unwrap());
    let base = tmpl.join("root.hds");
    for f in [&base, &top] {
        let len = file_len(f);
        fs::OpenOptions::new().write(true).open(f).unwrap().set_len(len + 4 * K64 as u64).unwrap();
    }
    let (base_len, top_len) = (file_len(&base), file_len(&top));
    ploop(["check", p(&ct)]).expect_code(3);
    let before = files_of(&tmpl);
    ploop(["check", "--repair", p(&ct)]).expect_code(3).mentions(&["not repaired"]);
    assert_eq!(files_of(&tmpl), before, "the repair wrote the template");
    assert_eq!(file_len(&base), base_len);
    assert!(file_len(&top) < top_len, "the clone's own top was not repaired");
}

/// The template's top, as a clone stands on it: a read-write start of the
/// template fails, and so do the commands that would write it.
fn assert_frozen_for(tmpl: &Path, clone: &Path) {
    let err = block_on(Disk::load(tmpl).unwrap().writable_layers(&SyncIo)).expect_err("a read-write start under a clone");
    assert_eq!(err.errno(), libc::EBUSY, "{err}");
    assert!(err.to_string().contains(p(clone)) && err.to_string().contains("detach"), "{err}");
    ploop(["snapshot", p(tmpl)]).expect_clean_failure().mentions(&["stands on it", p(clone)]);
}

/// A stopped clone holds no lock on its template's files; the template's
/// list of its clones keeps them: what a clone stands on is neither
/// written, merged into nor removed. Merging the template's snapshot away
/// copies it up instead and leaves its file to the clone.
#[test]
fn a_template_keeps_the_files_its_stopped_clones_stand_on() {
    let (root, tmpl, guid) = template_past_a_snapshot("clone-kept");
    let (old, new) = (root.join("old"), root.join("new"));
    ploop(["clone", p(&tmpl), p(&old), "-u", &guid]).ok();
    ploop(["clone", p(&tmpl), p(&new)]).ok();
    let base = tmpl.join("root.hds");
    let (base_print, before) = (fingerprint(&base), files_of(&tmpl));

    // `new` stands on the template's top, `old` on its base.
    assert_frozen_for(&tmpl, &new);
    ploop(["snapshot-delete", p(&tmpl), "-u", &guid]).expect_clean_failure().mentions(&["stands on it"]);
    ploop(["snapshot-merge", p(&tmpl)]).expect_clean_failure().mentions(&["stands on it", p(&new)]);
    assert_eq!(files_of(&tmpl), before, "a refused command changed the template");

    // Without `new`, the merge copies the base up into the top and leaves
    // the base's file for `old`.
    fs::remove_dir_all(&new).unwrap();
    ploop(["snapshot-merge", p(&tmpl)]).ok();
    assert_eq!(fingerprint(&base), base_print, "the merge changed what a clone stands on");
    let disk = Disk::load(&tmpl).unwrap();
    assert_eq!(disk.desc.images.len(), 1);
    assert!(!disk.desc.images[0].file.ends_with("root.hds"), "the base is still the template's: {:?}", disk.desc.images);
    let s = open_disk(&tmpl);
    assert!(read(&s, 0, K64).iter().all(|&b| b == 0x11) && read(&s, 5 * K64 as u64, K64).iter().all(|&b| b == 0x33));
    close(s);
    let s = open_disk(&old);
    write_own(&s, 0xD1);
    check_clone(&s, 0xD1);
    close(s);
    ploop(["check", p(&old)]).ok();
    ploop(["check", p(&tmpl)]).ok();
    // The list no longer names `new` once the next clone is made.
    ploop(["clone", p(&tmpl), p(&root.join("third"))]).ok();
    let list = fs::read_to_string(tmpl.join(LIST)).unwrap();
    assert!(!list.contains(p(&new)) && list.contains(p(&old)) && list.contains("third"), "{list}");
}

/// A clone of a clone stands on the template too: the template follows
/// its clones' lists, even when the clone in between stands alone by now.
#[test]
fn a_template_knows_the_clones_of_its_clones() {
    let root = TempDir::new("clone-of-clone");
    let tmpl = root.join("template");
    template(&tmpl);
    let (c1, c2) = (root.join("c1"), root.join("c2"));
    ploop(["clone", p(&tmpl), p(&c1)]).ok();
    let snap = ploop(["snapshot", p(&c1), "--json"]).ok().json();
    let guid = snap["guid"].as_str().unwrap().to_string();
    ploop(["clone", p(&c1), p(&c2), "-u", &guid]).ok();
    // c1 lets go of the template: its snapshot is copied up (c2 stands on
    // it), then it is detached.
    ploop(["snapshot-merge", p(&c1)]).ok();
    ploop(["detach", p(&c1)]).ok();
    assert!(!fs::read_to_string(c1.join(DESCRIPTOR)).unwrap().contains(p(&tmpl)));
    assert_frozen_for(&tmpl, &c2);
    // The next clone's tidying of the list keeps c1: c2 is found through it.
    let c3 = root.join("c3");
    ploop(["clone", p(&tmpl), p(&c3)]).ok();
    fs::remove_dir_all(&c3).unwrap();
    ploop(["clone", p(&tmpl), p(&root.join("c4"))]).ok();
    fs::remove_dir_all(root.join("c4")).unwrap();
    assert!(fs::read_to_string(tmpl.join(LIST)).unwrap().contains(p(&c1)));
    assert_frozen_for(&tmpl, &c2);
    let s = open_disk(&c2);
    write_own(&s, 0xE2);
    check_clone(&s, 0xE2);
    close(s);
}

/// A list or a clone that cannot be read does not lock the template out:
/// it still loads (info, check), and every change to its files is refused
/// as if the unknown clone stood on them, saying why.
#[test]
fn a_clone_that_cannot_be_read_keeps_the_template_safe_and_readable() {
    let (root, tmpl, ct) = template_and_clone("clone-unknown");
    let xml = fs::read_to_string(ct.join(DESCRIPTOR)).unwrap();
    for (what, damage) in [
        ("its descriptor does not read", &(|ct: &Path| fs::write(ct.join(DESCRIPTOR), "<garbage").unwrap()) as &dyn Fn(&Path)),
        ("its own list of clones does not read", &|ct: &Path| fs::create_dir(ct.join(LIST)).unwrap()),
    ] {
        damage(&ct);
        ploop(["info", p(&tmpl)]).ok();
        ploop(["check", p(&tmpl)]).ok();
        let err = block_on(Disk::load(&tmpl).unwrap().writable_layers(&SyncIo)).expect_err(what);
        assert_eq!(err.errno(), libc::EBUSY, "{err}");
        // A clone whose descriptor reads is known to stand on the base;
        // the other is only suspected to, and the error says why.
        let unsure = what.starts_with("its descriptor");
        assert!(!unsure || (err.to_string().contains("may stand on it") && err.to_string().contains(what)), "{err}");
        fs::write(ct.join(DESCRIPTOR), &xml).unwrap();
        let _ = fs::remove_dir(ct.join(LIST));
    }
    // The template's own list unreadable: the same.
    fs::rename(tmpl.join(LIST), root.join("list")).unwrap();
    fs::create_dir(tmpl.join(LIST)).unwrap();
    let err = block_on(Disk::load(&tmpl).unwrap().writable_layers(&SyncIo)).expect_err("an unreadable list");
    assert!(err.to_string().contains("a clone may stand on it") && err.to_string().contains("mend that list"), "{err}");
    fs::remove_dir(tmpl.join(LIST)).unwrap();
    fs::rename(root.join("list"), tmpl.join(LIST)).unwrap();
    // A clone's own list unreadable, over a file it does not read itself.
    let (_r2, tmpl2, guid) = template_past_a_snapshot("clone-unknown-2");
    let old = _r2.join("old");
    ploop(["clone", p(&tmpl2), p(&old), "-u", &guid]).ok();
    block_on(Disk::load(&tmpl2).unwrap().writable_layers(&SyncIo)).expect("old stands on the base only");
    fs::create_dir(old.join(LIST)).unwrap();
    let err = block_on(Disk::load(&tmpl2).unwrap().writable_layers(&SyncIo)).expect_err("an unreadable list of a clone");
    assert!(err.to_string().contains("may stand on it") && err.to_string().contains("its own list of clones does not read"), "{err}");
    fs::remove_dir(old.join(LIST)).unwrap();
    // And the template's own list: changes refused, the template loads.
    fs::rename(tmpl.join(LIST), root.join("list")).unwrap();
    fs::create_dir(tmpl.join(LIST)).unwrap();
    ploop(["info", p(&tmpl)]).ok();
    ploop(["snapshot", p(&tmpl)]).expect_clean_failure().mentions(&["may stand on it"]);
    fs::remove_dir(tmpl.join(LIST)).unwrap();
    fs::rename(root.join("list"), tmpl.join(LIST)).unwrap();
    assert_frozen_for(&tmpl, &ct);
}

/// Files a clone stands on are refused when named on their own too:
/// served read-write, resized, or deleted as a snapshot with several
/// children (marked to be merged later, which could then not be).
#[test]
fn a_template_file_named_on_its_own_keeps_its_clones() {
    let (_root, tmpl, ct) = template_and_clone("clone-alone");
    let base = tmpl.join("root.hds");
    let err = ublk_ploop::disk::resolve::check_served_alone(&base).expect_err("serving a file a clone stands on");
    assert!(err.to_string().contains("stands on it"), "{err}");
    let before = fingerprint(&base);
    ploop(["resize", p(&base), "--size", "16M"]).expect_clean_failure().mentions(&["stands on it"]);
    assert_eq!(fingerprint(&base), before);
    // A snapshot served alone would change what the deltas above show.
    let (_root2, tmpl2, _) = template_and_clone("clone-alone-2");
    fs::remove_dir_all(_root2.join("ct")).unwrap();
    let snap = ploop(["snapshot", p(&tmpl2), "--json"]).ok().json();
    let err = ublk_ploop::disk::resolve::check_served_alone(&tmpl2.join("root.hds")).expect_err("serving a snapshot alone");
    assert!(err.to_string().contains(snap["guid"].as_str().unwrap()), "{err}");
    let disk = Disk::load(&tmpl2).unwrap();
    let top = disk.file_path(disk.desc.image(disk.desc.top).unwrap());
    ublk_ploop::disk::resolve::check_served_alone(&top).expect("the top of a disk no clone stands on");
    drop(ct);
}

/// A snapshot with several children is marked to be merged into its last
/// child later: refused when a clone stands on it, since that merge would
/// be refused then and leave the template stuck half deleted.
#[test]
fn a_snapshot_a_clone_stands_on_is_not_marked_to_merge_later() {
    let (root, tmpl, s1) = template_past_a_snapshot("clone-branches");
    let s2 = ploop(["snapshot", p(&tmpl), "--json"]).ok().json()["guid"].as_str().unwrap().to_string();
    // Back to s1: a new top beside s2, so that s1 has two children.
    ploop(["snapshot-switch", p(&tmpl), "-u", &s1]).ok();
    let disk = Disk::load(&tmpl).unwrap();
    let s1g = s1.parse().unwrap();
    assert_eq!(disk.desc.children(s1g).len(), 2, "{:?}", disk.desc.shots);
    ploop(["clone", p(&tmpl), p(&root.join("ct")), "-u", &s2]).ok();
    let before = fs::read_to_string(tmpl.join(DESCRIPTOR)).unwrap();
    ploop(["snapshot-delete", p(&tmpl), "-u", &s1]).expect_clean_failure().mentions(&["stands on it"]);
    assert_eq!(fs::read_to_string(tmpl.join(DESCRIPTOR)).unwrap(), before, "the snapshot was marked anyway");
    // Without the clone it is marked, as ploop does.
    fs::remove_dir_all(root.join("ct")).unwrap();
    ploop(["snapshot-delete", p(&tmpl), "-u", &s1]).ok();
}

/// `add --image FILE` read-write on a delta of a disk: refused before any
/// device is asked for when a clone stands on it or deltas lie above it.
#[test]
fn a_disk_delta_served_alone_is_refused_before_the_device() {
    let (_root, tmpl, _ct) = template_and_clone("clone-add-alone");
    ploop(["add", "--image", p(&tmpl.join("root.hds"))]).expect_clean_failure().mentions(&["stands on it"]);
}
