//! ploop 9's reverse merge of the top into the base, left half done by
//! ploop's tool (`TemporaryZero`: some of the base's entries for the top's
//! clusters zeroed; `TemporaryZeroSwap`: all of them, and the two files
//! swapped in the descriptor). Our next open finishes it as ploop does:
//! the cost is the small delta, the base's file `root.hds` stays. With a
//! fault at every step of that finish, and a power cut after the fault,
//! nothing is lost and the next open finishes it again.

mod common;

use std::path::{Path, PathBuf};

use common::inject::{Cut, Fault, Injector, Kind};
use common::stripes::pattern;
use common::{assert_ploop_clean, quiesced, retry_busy, TempDir};
use ublk_ploop::disk::ops;
use ublk_ploop::disk::{Disk, Temporary, TOP_GUID};
use ublk_ploop::io::{block_on, AlignedBuf, Io, SyncIo};
use ublk_ploop::{Stack, StackOptions};

const CLUSTER: u64 = 64 << 10;
const CLUSTERS: u64 = 16;
/// The clusters the small delta (the top) holds.
const TOP_CLUSTERS: [u64; 3] = [2, 7, 11];

fn open_as(disk: &Disk, offline: bool) -> Stack {
    let layers = disk.layers(None).unwrap();
    retry_busy(|| block_on(Stack::open_layers(&SyncIo, &layers, &StackOptions { offline, ..Default::default() })))
        .unwrap_or_else(|e| panic!("opening {layers:?}: {e}"))
        .0
}

fn read_all(stack: &Stack) -> Vec<u8> {
    let mut b = AlignedBuf::zeroed(stack.size() as usize);
    block_on(stack.read(&SyncIo, 0, &mut b)).unwrap();
    b.to_vec()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// How ploop's tool left the disk.
#[derive(Clone, Copy, Debug)]
enum Left {
    /// `TemporaryZero` stored, then stopped after zeroing the first `n`
    /// of the base's entries for the top's clusters.
    Zero(usize),
    /// `TemporaryZeroSwap` stored: every such entry zeroed, the files
    /// swapped; `in_use`: the base, now the top, still marked in use.
    ZeroSwap { in_use: bool },
}

/// A disk whose full base is `root.hds` and whose top holds
/// [`TOP_CLUSTERS`], closed cleanly; and the data it shows.
fn two_deltas(ct: &Path) -> (Disk, Vec<u8>) {
    let mut disk = block_on(Disk::init(&SyncIo, ct, CLUSTER * CLUSTERS, CLUSTER)).unwrap();
    let mut model = pattern(0xBA5E, 0, (CLUSTER * CLUSTERS) as usize).to_vec();
    let stack = open_as(&disk, true);
    block_on(stack.write(&SyncIo, 0, &AlignedBuf::from_slice(&model))).unwrap();
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let stack = open_as(&disk, true);
    quiesced(|| block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None))).unwrap();
    write_top_clusters(&stack, &mut model);
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    (disk, model)
}

/// Write into each of [`TOP_CLUSTERS`] (a partial write, a whole cluster,
/// a piece in the middle), and into `model`.
fn write_top_clusters(stack: &Stack, model: &mut [u8]) {
    for (i, &c) in TOP_CLUSTERS.iter().enumerate() {
        let (off, len) = [(c * CLUSTER + 512, 4096), (c * CLUSTER, CLUSTER as usize), (c * CLUSTER + 8192, 8192)][i];
        let data = pattern(0x70 + i as u64, off, len);
        block_on(stack.write(&SyncIo, off, &data)).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
}

/// A disk whose full base is `root.hds` and whose top holds
/// [`TOP_CLUSTERS`], left as `left`; returns its directory, the data it
/// shows, and the small delta's file name.
fn half_merged(dir: &Path, left: Left) -> (PathBuf, Vec<u8>, String) {
    let ct = dir.join("ct");
    let (mut disk, model) = two_deltas(&ct);
    let parent = disk.desc.shot(TOP_GUID).unwrap().parent;
    let base_file = disk.desc.image(parent).unwrap().file.clone();
    let small = disk.desc.image(TOP_GUID).unwrap().file.clone();
    assert_eq!(base_file, "root.hds");
    let (zeroed, state) = match left {
        Left::Zero(n) => (n, Temporary::Zero),
        Left::ZeroSwap { .. } => (TOP_CLUSTERS.len(), Temporary::ZeroSwap),
    };
    {
        use std::os::unix::fs::FileExt;
        let base = std::fs::OpenOptions::new().write(true).open(ct.join(&base_file)).unwrap();
        for c in &TOP_CLUSTERS[..zeroed] {
            base.write_all_at(&[0; 4], 64 + 4 * c).unwrap();
        }
        if let Left::ZeroSwap { in_use: true } = left {
            base.write_all_at(&ublk_ploop::layers::ploop::header::IN_USE.to_le_bytes(), 44).unwrap();
        }
        base.sync_all().unwrap();
    }
    disk.desc.shots.iter_mut().filter(|s| s.guid == parent).for_each(|s| s.temporary = state);
    if let Left::ZeroSwap { .. } = left {
        for i in disk.desc.images.iter_mut() {
            i.file = if i.guid == parent { small.clone() } else { base_file.clone() };
        }
    }
    block_on(disk.store(&SyncIo)).unwrap();
    (ct, model, small)
}

/// Finish the merge in a copy of `pristine` with `io`; returns the copy
/// and the error, if any.
fn finish_in<I: Io>(pristine: &Path, run: &Path, offline: bool, io: &I) -> (PathBuf, Result<Vec<ops::Merged>, String>) {
    copy_dir(pristine, run);
    let mut disk = Disk::load(run).unwrap();
    let stack = open_as(&disk, offline);
    let r = quiesced(|| block_on(ops::finish_merges(io, &stack, &mut disk)));
    drop(stack);
    (run.to_path_buf(), r.map_err(|e| e.to_string()))
}

/// Merge the top of a copy of `pristine` in `run` with `io`, then drop
/// the stack unclosed (a crash, or the end).
fn merge_in<I: Io>(pristine: &Path, run: &Path, offline: bool, io: &I) -> Result<ops::Merged, String> {
    copy_dir(pristine, run);
    let mut disk = Disk::load(run).unwrap();
    let stack = open_as(&disk, offline);
    let r = quiesced(|| block_on(ops::merge(io, &stack, &mut disk, None, &|_, _| {})));
    drop(stack);
    r.map_err(|e| e.to_string())
}

/// The disk shows `model` before and after the next open finishes the
/// merge; then it is `root.hds` alone, clean, and the small delta's file
/// is gone.
fn verify(dir: &Path, offline: bool, model: &[u8], small: &str, ctx: &str) {
    let mut disk = Disk::load(dir).unwrap_or_else(|e| panic!("{ctx}: the descriptor does not load: {e}"));
    let stack = open_as(&disk, offline);
    assert!(read_all(&stack) == model, "{ctx}: the disk does not show its data before finishing");
    quiesced(|| block_on(ops::finish_merges(&SyncIo, &stack, &mut disk))).unwrap_or_else(|e| panic!("{ctx}: finishing: {e}"));
    assert!(disk.desc.shots.iter().all(|s| s.temporary == Temporary::No), "{ctx}: a temporary snapshot is left");
    assert_eq!(disk.desc.images.len(), 1, "{ctx}: not merged");
    assert_eq!(disk.desc.images[0].file, "root.hds", "{ctx}: the base's file is not the disk's");
    assert!(read_all(&stack) == model, "{ctx}: the disk does not show its data after finishing");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    assert_ploop_clean(&dir.join("root.hds"), ctx);
    assert!(!dir.join(small).exists(), "{ctx}: the small delta's file was left");
}

/// The sweep these tests share. `op(dir, io)` runs the operation on a
/// fresh copy in `dir`: once for each operation a run without a fault
/// (`reference`) counted, the disk dying there for good, and once more
/// without a fault; after each, every power cut of `cuts`, then
/// `check(dir, context)` judges what is left. Returns how many runs there
/// were and the failures, one line each.
fn sweep(dir: &Path, tag: &str, reference: &Injector, cuts: &[Cut], op: impl Fn(&Path, &Injector), mut check: impl FnMut(&Path, &str)) -> (usize, Vec<String>) {
    let points = reference.counts().points(&[Kind::Write, Kind::Sync, Kind::Rename, Kind::Read, Kind::Grow, Kind::Truncate, Kind::Punch]);
    let (mut runs, mut failed) = (0, vec![]);
    // The last point never trips: the operation ends, then the power fails.
    for (kind, index, n) in points.into_iter().chain([(Kind::Rename, u64::MAX, 0)]) {
        for &cut in cuts {
            runs += 1;
            let at = if n == 0 { "no fault".to_string() } else { format!("disk dies at {kind:?} #{index} of {n}") };
            let ctx = format!("{tag}: {at}, then {cut:?}");
            let run = dir.join(format!("{kind:?}-{index}-{cut:?}"));
            let io = Injector::new(Some(Fault { kind, index, sticky: true }));
            io.set_journaling(cut != Cut::None);
            op(&run, &io);
            io.power_cut(cut);
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&run, &ctx))) {
                failed.push(p.downcast_ref::<String>().cloned().unwrap_or_else(|| format!("{ctx}: panicked")));
            }
            let _ = std::fs::remove_dir_all(&run);
        }
    }
    (runs, failed)
}

#[test]
fn ploops_half_done_reverse_merge_is_finished_through_any_fault_and_power_cut() {
    let tmp = TempDir::new("resume-reverse");
    let states = [Left::Zero(0), Left::Zero(2), Left::Zero(3), Left::ZeroSwap { in_use: false }, Left::ZeroSwap { in_use: true }];
    let (mut runs, mut failed) = (0, vec![]);
    for (si, left) in states.into_iter().enumerate() {
        let (pristine, model, small) = half_merged(&tmp.join(&format!("state-{si}")), left);
        for offline in [true, false] {
            let how = if offline { "offline" } else { "online" };
            // The reference run: the cost is the small delta's clusters.
            let io = Injector::new(None);
            let (dir, r) = finish_in(&pristine, &tmp.join(&format!("{si}-{how}-ref")), offline, &io);
            let merged = r.unwrap_or_else(|e| panic!("{left:?} {how}, no fault: {e}"));
            assert_eq!(merged.len(), 1, "{left:?} {how}: {merged:?}");
            assert!(merged[0].clusters <= TOP_CLUSTERS.len() as u64, "{left:?} {how}: {} clusters copied", merged[0].clusters);
            verify(&dir, offline, &model, &small, &format!("{left:?} {how}, no fault"));
            let (n, f) = sweep(
                &tmp.join(&format!("{si}-{how}")),
                &format!("{left:?} {how}"),
                &io,
                &[Cut::None, Cut::All, Cut::MetaOnly, Cut::DataOnly],
                |run, io| drop(finish_in(&pristine, run, offline, io)),
                |run, ctx| verify(run, offline, &model, &small, ctx),
            );
            runs += n;
            failed.extend(f);
        }
    }
    eprintln!("{runs} fault runs");
    assert!(runs > 100, "only {runs} fault runs");
    assert!(failed.is_empty(), "{} of {runs} fault runs failed:\n{}", failed.len(), failed.join("\n"));
}

/// What ploop's tool does with a disk it finds half merged, written for
/// this test from its merge.c (plain file I/O, not our engine): the
/// temporary snapshot's one child has every cluster its table holds
/// copied into the snapshot's file, in place where that file has the
/// cluster and appended at its end where not (ploop 9's online reverse
/// merge first zeroes those entries, which only sends them all to the
/// end); then the child takes the file, and the child's own file goes.
/// First, as its mount does, every delta's in-use mark is dropped (its
/// table read and found sound: our check asserts that after).
fn ploop_finishes(dir: &Path) {
    use std::os::unix::fs::FileExt;
    let mut disk = Disk::load(dir).unwrap();
    for img in &disk.desc.images {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(dir.join(&img.file)).unwrap();
        let mut mark = [0u8; 4];
        f.read_exact_at(&mut mark, 44).unwrap();
        if u32::from_le_bytes(mark) == ublk_ploop::layers::ploop::header::IN_USE {
            f.write_all_at(&ublk_ploop::layers::ploop::header::CLOSED.to_le_bytes(), 44).unwrap();
            f.sync_all().unwrap();
        }
    }
    let Some(p) = disk.desc.shots.iter().find(|s| s.temporary != Temporary::No).map(|s| s.guid) else { return };
    let child = disk.desc.children(p)[0];
    let (pfile, cfile) = (disk.desc.image(p).unwrap().file.clone(), disk.desc.image(child).unwrap().file.clone());
    let open = |f: &str| std::fs::OpenOptions::new().read(true).write(true).open(dir.join(f)).unwrap();
    let (pf, cf) = (open(&pfile), open(&cfile));
    let u32_at = |f: &std::fs::File, at: u64| {
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, at).unwrap();
        u32::from_le_bytes(b)
    };
    let cluster = u32_at(&cf, 28) as u64 * 512;
    assert_eq!(cluster, CLUSTER);
    for c in 0..u32_at(&cf, 32) as u64 {
        let v = u32_at(&cf, 64 + 4 * c) as u64;
        if v == 0 {
            continue;
        }
        let mut data = vec![0u8; cluster as usize];
        cf.read_exact_at(&mut data, v * cluster).unwrap();
        let at = match u32_at(&pf, 64 + 4 * c) as u64 {
            0 => {
                let end = pf.metadata().unwrap().len().div_ceil(cluster) * cluster;
                pf.write_all_at(&((end / cluster) as u32).to_le_bytes(), 64 + 4 * c).unwrap();
                end
            }
            pv => pv * cluster,
        };
        pf.write_all_at(&data, at).unwrap();
    }
    pf.sync_all().unwrap();
    let grandparent = disk.desc.shot(p).unwrap().parent;
    disk.desc.images.retain(|i| i.guid != p);
    disk.desc.shots.retain(|s| s.guid != p);
    for s in disk.desc.shots.iter_mut().filter(|s| s.guid == child) {
        s.parent = grandparent;
    }
    for i in disk.desc.images.iter_mut().filter(|i| i.guid == child) {
        i.file = pfile.clone();
    }
    block_on(disk.store(&SyncIo)).unwrap();
    std::fs::remove_file(dir.join(cfile)).unwrap();
}

/// Our merge of the top into the base (the fold: the base marked
/// `Temporary`, the top's clusters copied into its file), interrupted at
/// any step, offline or online, with a power cut after: ploop's tool then
/// finishes it by its own rule (see `ploop_finishes`), and the disk is
/// `root.hds` alone with its data, undamaged for our check and qemu-img's.
#[test]
fn our_half_done_merges_are_finished_by_ploops_rule() {
    let tmp = TempDir::new("resume-ours");
    let pristine = tmp.join("ct");
    let (_, model) = two_deltas(&pristine);
    let base = pattern(0xBA5E, 0, (CLUSTER * CLUSTERS) as usize).to_vec();
    let (mut runs, mut failed, mut left_temporary) = (0, vec![], 0);
    for offline in [true, false] {
        let how = if offline { "offline" } else { "online" };
        let merge = |run: &Path, io: &Injector| merge_in(&pristine, run, offline, io);
        let io = Injector::new(None);
        merge(&tmp.join(&format!("{how}-ref")), &io).unwrap_or_else(|e| panic!("{how}, no fault: {e}"));
        let check = |run: &Path, ctx: &str| {
            if Disk::load(run).unwrap().desc.shots.iter().any(|s| s.temporary != Temporary::No) {
                left_temporary += 1;
            }
            ploop_finishes(run);
            let disk = Disk::load(run).unwrap();
            let stack = retry_busy(|| {
                block_on(Stack::open_layers(&SyncIo, &disk.layers(None).unwrap(), &StackOptions { read_only: true, ..Default::default() }))
            })
            .unwrap()
            .0;
            assert!(read_all(&stack) == model, "{ctx}: the disk does not show its data");
            drop(stack);
            if disk.desc.images.len() == 1 {
                assert_eq!(disk.desc.images[0].file, "root.hds", "{ctx}");
            }
            // A snapshot that survives shows what it showed: the
            // base is changed only once it is marked temporary.
            for shot in disk.desc.shots.iter().filter(|s| s.guid != TOP_GUID) {
                let layers = disk.layers(Some(shot.guid)).unwrap();
                let snap = block_on(Stack::open_layers(&SyncIo, &layers, &StackOptions { read_only: true, ..Default::default() })).unwrap().0;
                assert!(read_all(&snap) == base, "{ctx}: snapshot {} changed", shot.guid);
            }
            for img in &disk.desc.images {
                let path = run.join(&img.file);
                common::assert_undamaged(&path, false, ctx);
                if common::have_qemu() {
                    let r = common::qemu_img(["check", "-f", "parallels", path.to_str().unwrap()]);
                    assert!(r.code() == 0 || r.code() == 3, "{ctx}: qemu-img check: exit {}\n{}", r.code(), r.stdout);
                }
            }
        };
        let tag = format!("our {how} merge, then ploop's rule");
        let (n, f) = sweep(&tmp.join(how), &tag, &io, &[Cut::None, Cut::All], |run, io| drop(merge(run, io)), check);
        runs += n;
        failed.extend(f);
    }
    eprintln!("{runs} fault runs, {left_temporary} left a temporary snapshot for ploop's rule");
    assert!(left_temporary > runs / 4, "only {left_temporary} of {runs} runs left the merge half done");
    assert!(failed.is_empty(), "{} of {runs} fault runs failed:\n{}", failed.len(), failed.join("\n"));
}

/// ploop's raw mode as its tool leaves it: a raw `root.hds`, a ploop top
/// over it holding [`TOP_CLUSTERS`], every image typed `Plain`; returns
/// the data the disk shows.
fn raw_mode_disk(pristine: &Path) -> Vec<u8> {
    use ublk_ploop::disk::{Image, ImageType, Shot};
    let size = CLUSTER * CLUSTERS;
    let mut model = pattern(0xBA5E, 0, size as usize).to_vec();
    std::fs::create_dir_all(pristine).unwrap();
    std::fs::write(pristine.join("root.hds"), &model).unwrap();
    let base_guid: ublk_ploop::disk::Guid = "{3d6e9c1a-7f4b-4a83-8c5d-1e2f3a4b5c6d}".parse().unwrap();
    let top_file = "root.hds.{2c5d8b0f-6e3a-4f72-9b4c-0d1e2f3a4b5c}";
    let mut desc = ublk_ploop::disk::Descriptor::new(size, CLUSTER, "root.hds", ImageType::Plain).unwrap();
    desc.images[0].guid = base_guid;
    desc.shots[0].guid = base_guid;
    desc.images.push(Image { guid: TOP_GUID, kind: ImageType::Plain, file: top_file.into() });
    desc.shots.push(Shot { guid: TOP_GUID, parent: base_guid, temporary: Temporary::No });
    std::fs::write(pristine.join("DiskDescriptor.xml"), desc.to_xml()).unwrap();
    block_on(ublk_ploop::layers::PloopLayer::create(&SyncIo, &pristine.join(top_file), size, CLUSTER)).unwrap();
    {
        let disk = Disk::load(pristine).unwrap();
        let stack = open_as(&disk, true);
        write_top_clusters(&stack, &mut model);
        block_on(stack.close(&SyncIo)).unwrap();
    }
    model
}

/// Grow the served disk to `size` online (only its top grows, as the
/// daemon's resize does), and its descriptor with it.
fn grow_online(stack: &Stack, disk: &mut Disk, model: &mut Vec<u8>, size: u64) {
    block_on(stack.grow_top(&SyncIo, size)).unwrap();
    model.resize(size as usize, 0);
    disk.desc.set_size(size).unwrap();
    block_on(disk.store(&SyncIo)).unwrap();
}

/// ploop's raw mode (a raw base, every image typed `Plain`, the deltas
/// ploop images): the merge of the top writes it into the raw base in
/// place, as ploop's offline merge does; online too, with requests going
/// on (a fold), at the cost of the top alone. A fault at any step, then a
/// power cut: the disk shows its data, and the next open (in the same
/// mode) finishes the merge to the raw `root.hds` alone.
#[test]
fn a_merge_into_a_raw_base_loses_nothing_at_any_fault() {
    for offline in [true, false] {
        merge_into_raw_base_under_faults(offline, false);
    }
}

/// The same after the disk grew online past the raw base and was written
/// there: the merge extends the raw file first, as ploop's merge does, and
/// still copies the top alone.
#[test]
fn a_merge_into_a_raw_base_the_disk_outgrew_loses_nothing_at_any_fault() {
    for offline in [true, false] {
        merge_into_raw_base_under_faults(offline, true);
    }
}

/// Grow the raw-mode disk in `ct` online by 4 clusters and write the first
/// of them (in the top: the raw base ends before it); the model follows.
fn outgrow_raw_base(ct: &Path, model: &mut Vec<u8>) {
    let mut disk = Disk::load(ct).unwrap();
    let stack = open_as(&disk, false);
    grow_online(&stack, &mut disk, model, CLUSTER * (CLUSTERS + 4));
    let past = pattern(0x99, CLUSTERS * CLUSTER, CLUSTER as usize);
    block_on(stack.write(&SyncIo, CLUSTERS * CLUSTER, &past)).unwrap();
    model[(CLUSTERS * CLUSTER) as usize..((CLUSTERS + 1) * CLUSTER) as usize].copy_from_slice(&past);
    block_on(stack.close(&SyncIo)).unwrap();
}

fn merge_into_raw_base_under_faults(offline: bool, outgrown: bool) {
    let mode = match (offline, outgrown) {
        (true, false) => "offline",
        (false, false) => "online",
        (true, true) => "offline, outgrown",
        (false, true) => "online, outgrown",
    };
    let tmp = TempDir::new(&format!("resume-raw-{}", mode.replace(", ", "-")));
    let pristine = tmp.join("ct");
    let mut model = raw_mode_disk(&pristine);
    if outgrown {
        outgrow_raw_base(&pristine, &mut model);
    }
    let model = model;
    let top_clusters = TOP_CLUSTERS.len() as u64 + outgrown as u64;
    let merge = |run: &Path, io: &Injector| merge_in(&pristine, run, offline, io);
    let io = Injector::new(None);
    let merged = merge(&tmp.join("ref"), &io).unwrap();
    assert_eq!(merged.clusters, top_clusters, "{mode}: the merge into the raw base copies the top alone");
    let check = |run: &Path, ctx: &str| {
        let ctx = &format!("{mode}: {ctx}");
        let mut disk = Disk::load(run).unwrap();
        let stack = open_as(&disk, offline);
        assert!(read_all(&stack) == model, "{ctx}: the disk does not show its data");
        quiesced(|| block_on(ops::finish_merges(&SyncIo, &stack, &mut disk))).unwrap_or_else(|e| panic!("{ctx}: finishing: {e}"));
        if disk.desc.images.len() == 2 {
            quiesced(|| block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &|_, _| {}))).unwrap_or_else(|e| panic!("{ctx}: merging again: {e}"));
        }
        block_on(stack.close(&SyncIo)).unwrap();
        drop(stack);
        assert_eq!(disk.desc.images.len(), 1, "{ctx}");
        assert_eq!(disk.desc.images[0].file, "root.hds", "{ctx}");
        assert!(std::fs::read(run.join("root.hds")).unwrap() == model, "{ctx}: the raw base does not hold the data");
    };
    let cuts = [Cut::None, Cut::All, Cut::MetaOnly, Cut::DataOnly];
    let (runs, failed) = sweep(&tmp.join("runs"), "raw base", &io, &cuts, |run, io| drop(merge(run, io)), check);
    eprintln!("{mode}: {runs} fault runs");
    assert!(failed.is_empty(), "{} of {runs} fault runs failed:\n{}", failed.len(), failed.join("\n"));
}

/// A raw base outside the disk directory (a template several disks
/// share) is only ever read: the online merge copies it up into the top.
/// A sparse base's holes read as zeros without it, so only the clusters
/// that hold data are copied: the cost follows the data, not the disk's
/// size (it once copied every cluster, holes too, filling the top with
/// zeros). The template is left as it was.
#[test]
fn an_online_merge_copies_only_what_a_shared_sparse_raw_base_holds() {
    use std::os::fd::AsRawFd;
    let tmp = TempDir::new("resume-raw-sparse");
    let ct = tmp.join("ct");
    let mut model = raw_mode_disk(&ct);
    // The base keeps data in two clusters; the rest is punched, as in a
    // file mostly never written. The top's clusters hold whole copies.
    let held = [4u64, 9];
    let template = tmp.join("template.raw");
    std::fs::rename(ct.join("root.hds"), &template).unwrap();
    let base = std::fs::OpenOptions::new().write(true).open(&template).unwrap();
    for c in (0..CLUSTERS).filter(|c| !held.contains(c)) {
        block_on(SyncIo.punch_hole(base.as_raw_fd(), c * CLUSTER, CLUSTER)).unwrap_or_else(|e| panic!("punching the base: {e}"));
        if !TOP_CLUSTERS.contains(&c) {
            model[(c * CLUSTER) as usize..((c + 1) * CLUSTER) as usize].fill(0);
        }
    }
    drop(base);
    let mut disk = Disk::load(&ct).unwrap();
    disk.desc.images[0].file = template.to_str().unwrap().into();
    block_on(disk.store(&SyncIo)).unwrap();
    let template_before = std::fs::read(&template).unwrap();
    let stack = open_as(&disk, false);
    assert!(read_all(&stack) == model, "the disk does not show its data before the merge");
    let merged = quiesced(|| block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &|_, _| {}))).unwrap();
    assert_eq!(merged.clusters, held.len() as u64, "clusters copied up from a base holding {held:?}");
    assert!(read_all(&stack) == model, "the merged disk does not show its data");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    assert!(std::fs::read(&template).unwrap() == template_before, "the shared template was changed");
    let disk = Disk::load(&ct).unwrap();
    assert_eq!(disk.desc.images.len(), 1);
    let top = disk.file_path(&disk.desc.images[0]);
    let stack = open_as(&disk, true);
    assert!(read_all(&stack) == model, "the merged disk, opened again, does not show its data");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    assert_ploop_clean(&top, "the merged top");
    // Header and table in the first cluster, then one cluster per one held.
    let most = CLUSTER * (1 + (TOP_CLUSTERS.len() + held.len()) as u64);
    let len = std::fs::metadata(&top).unwrap().len();
    assert!(len <= most, "the merged top is {len} bytes, more than the {most} its data needs");
}

/// After an online merge into the raw base the top is the raw file. It
/// grows online as ploop grows a raw image: the file is extended and the
/// disk shows zeros past its old end, then takes writes there; compaction
/// (which needs a ploop table) is refused with the reason.
#[test]
fn a_raw_top_grows_online_and_refuses_compaction_with_the_reason() {
    let tmp = TempDir::new("resume-raw-top");
    let ct = tmp.join("ct");
    let mut model = raw_mode_disk(&ct);
    let mut disk = Disk::load(&ct).unwrap();
    let stack = open_as(&disk, false);
    quiesced(|| block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &|_, _| {}))).unwrap();
    assert_eq!(disk.desc.images.len(), 1);
    let e = block_on(stack.compact(&SyncIo, 64, &|_, _| {})).unwrap_err();
    assert_eq!(e.errno(), libc::EOPNOTSUPP, "{e}");
    assert!(e.to_string().contains("raw file"), "{e}");
    let size = CLUSTER * (CLUSTERS + 4);
    grow_online(&stack, &mut disk, &mut model, size);
    assert_eq!(stack.size(), size);
    assert_eq!(std::fs::metadata(ct.join("root.hds")).unwrap().len(), size, "the raw file was not extended");
    assert!(read_all(&stack) == model, "the grown raw top does not show its data and zeros past the old end");
    let past = pattern(0x77, (CLUSTERS + 2) * CLUSTER, CLUSTER as usize);
    block_on(stack.write(&SyncIo, (CLUSTERS + 2) * CLUSTER, &past)).unwrap();
    model[((CLUSTERS + 2) * CLUSTER) as usize..((CLUSTERS + 3) * CLUSTER) as usize].copy_from_slice(&past);
    assert!(read_all(&stack) == model, "a write past the old end does not read back");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    assert!(std::fs::read(ct.join("root.hds")).unwrap() == model, "the raw file does not hold the disk");
    let disk = Disk::load(&ct).unwrap();
    assert_eq!(disk.desc.size(), size);
    let stack = open_as(&disk, true);
    assert!(read_all(&stack) == model, "the grown disk, opened again, does not show its data");
    block_on(stack.close(&SyncIo)).unwrap();
}

/// The online grow of a raw top, with a fault at every step of it and of
/// the descriptor's store after it (as the daemon stores it), then each
/// power cut: the disk opens at its old size or the new one, shows its
/// data and zeros past the old end, and the raw file is never shorter
/// than the size the disk shows.
#[test]
fn a_raw_top_grow_loses_nothing_at_any_fault() {
    let tmp = TempDir::new("resume-raw-top-grow");
    let pristine = tmp.join("ct");
    let model = raw_mode_disk(&pristine);
    {
        let mut disk = Disk::load(&pristine).unwrap();
        let stack = open_as(&disk, false);
        quiesced(|| block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &|_, _| {}))).unwrap();
        block_on(stack.close(&SyncIo)).unwrap();
    }
    let (old, new) = (CLUSTER * CLUSTERS, CLUSTER * (CLUSTERS + 4));
    let grow = |run: &Path, io: &Injector| {
        copy_dir(&pristine, run);
        let mut disk = Disk::load(run).unwrap();
        let stack = open_as(&disk, false);
        if block_on(stack.grow_top(io, new)).is_ok() {
            disk.desc.set_size(new).unwrap();
            let _ = block_on(disk.store(io));
        }
        drop(stack);
    };
    let io = Injector::new(None);
    grow(&tmp.join("ref"), &io);
    let check = |run: &Path, ctx: &str| {
        let disk = Disk::load(run).unwrap_or_else(|e| panic!("{ctx}: the descriptor does not load: {e}"));
        let stack = open_as(&disk, false);
        let size = stack.size();
        assert!(size == old || size == new, "{ctx}: the disk is {size} bytes");
        let mut want = model.clone();
        want.resize(size as usize, 0);
        assert!(read_all(&stack) == want, "{ctx}: the disk does not show its data");
        block_on(stack.close(&SyncIo)).unwrap();
        let len = std::fs::metadata(run.join("root.hds")).unwrap().len();
        assert!(len >= size, "{ctx}: the raw file ({len} bytes) is shorter than the disk ({size})");
    };
    let (runs, failed) = sweep(&tmp.join("runs"), "raw top grow", &io, &[Cut::None, Cut::All, Cut::MetaOnly, Cut::DataOnly], grow, check);
    eprintln!("{runs} fault runs");
    assert!(runs > 8, "only {runs} fault runs");
    assert!(failed.is_empty(), "{} of {runs} fault runs failed:\n{}", failed.len(), failed.join("\n"));
}
