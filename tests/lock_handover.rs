//! Online merges hand an image's lock from the stack's old opening of it to
//! a new one. The kernel keeps a dropped opening, and its lock, alive until
//! the last io_uring request that used it is put away, which may wait for
//! the ring's thread to enter the ring again (seen in the VM: a compaction
//! after a daemon restart could not open its top again). So the old
//! opening lets go of what the new one asks for before it is dropped. Each
//! test holds a duplicate of the old opening's descriptor across the
//! merge, as the kernel does.

mod common;

use std::path::Path;

use common::stripes::{pattern, Geometry};
use common::{assert_ploop_clean, hold_layer, ploop_sees_free_soon, ploop_sees_locked, retry_busy, TempDir};
use ublk_ploop::disk::ops;
use ublk_ploop::disk::{Disk, Guid, Temporary};
use ublk_ploop::io::{block_on, AlignedBuf, Direct, SyncIo};
use ublk_ploop::layers::{Format, Layer};
use ublk_ploop::{Stack, StackOptions};

fn open(disk: &Disk) -> Stack {
    let layers = disk.layers(None).unwrap();
    retry_busy(|| block_on(Stack::open_layers(&SyncIo, &layers, &StackOptions::default()))).unwrap().0
}

/// A full base, a snapshot with some clusters changed, and a top with
/// more: the disk, the served stack, the model and the two snapshots.
fn three_layers(dir: &TempDir) -> (Disk, Stack, Vec<u8>, [Guid; 2]) {
    let g = Geometry { cluster: 64 << 10, clusters: 12, stripe: 16 << 10 };
    let mut disk = block_on(Disk::init(&SyncIo, &dir.join("ct"), g.size(), g.cluster)).unwrap();
    let stack = open(&disk);
    let mut model = pattern(0xBA5E, 0, g.size() as usize).to_vec();
    block_on(stack.write(&SyncIo, 0, &pattern(0xBA5E, 0, g.size() as usize))).unwrap();
    let mut guids = vec![];
    for round in 0..2usize {
        guids.push(block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap().guid);
        for c in [1 + round as u64, 5 + round as u64] {
            let data = pattern(round as u64 + 7, c * g.cluster, 8192);
            block_on(stack.write(&SyncIo, c * g.cluster, &data)).unwrap();
            model[(c * g.cluster) as usize..(c * g.cluster) as usize + 8192].copy_from_slice(&data);
        }
    }
    (disk, stack, model, [guids[0], guids[1]])
}

fn assert_reads(stack: &Stack, model: &[u8], ctx: &str) {
    let mut got = AlignedBuf::zeroed(model.len());
    block_on(stack.read(&SyncIo, 0, &mut got)).unwrap();
    assert!(got[..] == model[..], "{ctx}: the disk's bytes");
}

/// Whether an opening of our own may take `path`'s exclusive lock now.
fn lockable(path: &Path) -> bool {
    block_on(Layer::open(&SyncIo, path, Format::Ploop, true, Direct::Off)).is_ok()
}

#[test]
fn a_lower_merge_hands_the_parent_s_lock_to_the_merged_opening() {
    // The snapshot over the base merges into the base's file; the merge
    // locks the stack's opening of the base exclusively meanwhile, and
    // the merged opening then takes a shared lock.
    let dir = TempDir::new("lock-lower-merge");
    let (mut disk, stack, model, [_, snap]) = three_layers(&dir);
    let base = disk.file_path(disk.desc.image(disk.desc.shot(snap).unwrap().parent).unwrap());
    let held = hold_layer(&stack, 0);
    block_on(ops::merge(&SyncIo, &stack, &mut disk, Some(snap), &|_, _| {})).expect("a lower merge beside a held descriptor of the parent");
    assert_eq!(stack.depth(), 2);
    assert_reads(&stack, &model, "after the merge");
    drop(held);
    assert!(!lockable(&base), "no lock is held on the merged parent while the stack reads it");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    assert_ploop_clean(&base, "the merged base");
}

#[test]
fn a_merge_of_the_top_hands_the_lock_to_the_parent_s_file() {
    // The top folds into its parent's file, which then serves as the top
    // and must hold the top's exclusive lock.
    let dir = TempDir::new("lock-fold");
    let (mut disk, stack, model, [_, snap]) = three_layers(&dir);
    let parent = disk.file_path(disk.desc.image(snap).unwrap());
    let held = hold_layer(&stack, 1);
    block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &|_, _| {})).expect("a merge of the top beside a held descriptor of its parent");
    assert_eq!(stack.layers().last().unwrap().file().path, parent, "the parent's file is the top");
    drop(held);
    assert!(!lockable(&parent), "the merged top is served without its lock");
    assert_reads(&stack, &model, "after the merge");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    assert_ploop_clean(&parent, "the merged top");
}

#[test]
fn a_held_disk_lock_follows_the_base_a_merge_makes() {
    // A device holds ploop's lock for its whole life (`Disk::load_locked`)
    // and runs every change under it. Merging the top into a base that
    // ploop 9's reverse merge left swapped copies the base up into the top
    // and removes the base's file: the top's file is the base then, and
    // the lock must move there, or ploop's tool finds the disk free.
    let g = Geometry { cluster: 64 << 10, clusters: 12, stripe: 16 << 10 };
    let dir = TempDir::new("lock-follow");
    let mut disk = block_on(Disk::init(&SyncIo, &dir.join("ct"), g.size(), g.cluster)).unwrap();
    let stack = open(&disk);
    let mut model = pattern(0xBA5E, 0, g.size() as usize).to_vec();
    block_on(stack.write(&SyncIo, 0, &model)).unwrap();
    let base_snap = block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).unwrap().guid;
    let data = pattern(7, 3 * g.cluster, 8192);
    block_on(stack.write(&SyncIo, 3 * g.cluster, &data)).unwrap();
    model[(3 * g.cluster) as usize..(3 * g.cluster) as usize + 8192].copy_from_slice(&data);
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    disk.desc.shots.iter_mut().filter(|s| s.guid == base_snap).for_each(|s| s.temporary = Temporary::ZeroSwap);
    block_on(disk.store(&SyncIo)).unwrap();

    let mut disk = Disk::load_locked(&disk.dir).unwrap();
    let stack = open(&disk);
    let before = disk.lock_path().unwrap();
    assert!(ploop_sees_locked(&before), "the held lock is not where ploop looks");
    block_on(ops::merge(&SyncIo, &stack, &mut disk, None, &|_, _| {})).expect("merge the top into the swapped base");
    let after = disk.lock_path().unwrap();
    assert_ne!(before, after, "the base's file stayed the base: the test no longer covers a move");
    assert!(!before.exists(), "the old base's file is still there");
    assert!(ploop_sees_locked(&after), "the lock did not follow the new base {}", after.display());
    assert_reads(&stack, &model, "after the merge");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    drop(disk);
    assert!(ploop_sees_free_soon(&after), "the lock outlived the disk that held it");
}
