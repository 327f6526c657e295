//! Concurrent requests against the model: writers on several threads (some
//! blocking on syscalls, some running several requests at once on a ring
//! of their own, as ublk queues do) share every cluster of a stack whose
//! lower layer is full, so first writes copy clusters up while others wait
//! for them; meanwhile another thread takes snapshots (a new top swapped in
//! under the I/O).
//!
//! Each writer owns a stripe of every cluster, so its model is exact
//! whatever the interleaving: it verifies its own bytes as it goes, and
//! the whole disk is verified at the end, after a clean reopen and after an
//! unclean one, with `check` and `qemu-img check` on every layer.
//! UBLK_PLOOP_CONCURRENT_SEEDS sets how many seeds run (default 48);
//! UBLK_PLOOP_CONCURRENT_SEED=N reruns one.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use common::stripes::{expected, pattern, verify, Geometry, Owner, Rng, BLOCK};
use common::{assert_ploop_clean, for_each_seed, TempDir};
use ublk_ploop::io::{block_on, Direct, OwnRing, SyncIo};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::{Stack, StackOptions};

/// Writers on syscall threads, and ring threads with several writers each.
const SYNC_THREADS: usize = 2;
const RING_THREADS: usize = 2;
const TASKS_PER_RING: usize = 3;
const OWNERS: usize = SYNC_THREADS + RING_THREADS * TASKS_PER_RING;

fn open(paths: &[PathBuf], read_only: bool) -> Stack {
    block_on(Stack::open(&SyncIo, paths, &StackOptions { read_only, direct: Direct::Auto, offline: false, link_log: None })).unwrap().0
}

fn run_seed(seed: u64) {
    let mut rng = Rng::new(seed);
    let cluster = [32u64 << 10, 64 << 10, 128 << 10][rng.below(3) as usize];
    let g = Geometry { cluster, clusters: 8 + rng.below(24), stripe: cluster / OWNERS as u64 };
    let ops_per_owner = 40 + rng.below(40) as usize;
    let snapshots = 1 + rng.below(3) as usize;
    let sparse = seed % 3 == 0;
    let ctx = format!("seed {seed} (cluster {cluster}, {} clusters, {snapshots} snapshots, lower sparse: {sparse})", g.clusters);
    let dir = TempDir::new(&format!("concurrent-{seed}"));

    // The lower layer holds every cluster (every first write to a cluster
    // in the top copies it up) or, for a third of the seeds, a random half
    // of them (a first write to one it lacks links a fresh cluster that
    // other writers may already be writing into).
    let base = dir.join("base.img");
    block_on(PloopLayer::create(&SyncIo, &base, g.size(), cluster)).unwrap();
    let mut lower = pattern(0xBA5E, 0, g.size() as usize);
    {
        let s = open(std::slice::from_ref(&base), false);
        for (c, chunk) in lower.chunks_mut(cluster as usize).enumerate() {
            if sparse && rng.below(2) == 0 {
                chunk.fill(0);
            } else {
                block_on(s.write(&SyncIo, c as u64 * cluster, chunk)).unwrap();
            }
        }
        block_on(s.close(&SyncIo)).unwrap();
    }
    let base_bytes = std::fs::read(&base).unwrap();
    let top = dir.join("top0.img");
    block_on(PloopLayer::create(&SyncIo, &top, g.size(), cluster)).unwrap();
    let stack = open(&[base.clone(), top], false);
    assert!(stack.block_size() as u64 <= BLOCK, "{ctx}: O_DIRECT block {} too large for this test", stack.block_size());

    let mut owners: Vec<Owner> = (0..OWNERS)
        .map(|id| Owner::new(id, seed.wrapping_mul(1000) + id as u64, &g, &lower))
        .collect();

    let done_ops = AtomicUsize::new(0);
    let total_ops = OWNERS * ops_per_owner;
    let finished = AtomicBool::new(false);
    let errors = Mutex::new(Vec::<String>::new());
    let mut owner_iter = owners.iter_mut();
    std::thread::scope(|s| {
        // Snapshots in the middle of the I/O.
        s.spawn(|| {
            for i in 0..snapshots {
                let at = total_ops * (i + 1) / (snapshots + 1);
                while done_ops.load(Ordering::Relaxed) < at && !finished.load(Ordering::Relaxed) {
                    std::thread::yield_now();
                }
                let path = dir.join(&format!("top{}.img", i + 1));
                if let Err(e) = block_on(stack.push_layer(&SyncIo, &path)) {
                    errors.lock().unwrap().push(format!("snapshot {i}: {e}"));
                }
            }
        });
        let (stack, g, done_ops, errors) = (&stack, &g, &done_ops, &errors);
        let mut workers = vec![];
        for _ in 0..SYNC_THREADS {
            let owner = owner_iter.next().unwrap();
            workers.push(s.spawn(move || {
                for i in 0..ops_per_owner {
                    let tag = ((owner.id as u64) << 16) | (i as u64 + 1);
                    if let Err(e) = block_on(owner.step(stack, &SyncIo, g, tag)) {
                        errors.lock().unwrap().push(e);
                        return;
                    }
                    done_ops.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for _ in 0..RING_THREADS {
            let mine: Vec<&mut Owner> = (0..TASKS_PER_RING).map(|_| owner_iter.next().unwrap()).collect();
            workers.push(s.spawn(move || {
                let ring = OwnRing::new(64).expect("io_uring");
                let io = ring.io();
                let exe = async_executor::LocalExecutor::new();
                let tasks: Vec<_> = mine
                    .into_iter()
                    .map(|owner| {
                        let io = &io;
                        exe.spawn(async move {
                            for i in 0..ops_per_owner {
                                let tag = ((owner.id as u64) << 16) | (i as u64 + 1);
                                if let Err(e) = owner.step(stack, io, g, tag).await {
                                    errors.lock().unwrap().push(e);
                                    return;
                                }
                                done_ops.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                ring.run_tasks(&exe, || tasks.iter().all(|t| t.is_finished()));
            }));
        }
        for w in workers {
            w.join().unwrap();
        }
        finished.store(true, Ordering::Relaxed);
    });
    let errors = errors.into_inner().unwrap();
    assert!(errors.is_empty(), "{ctx}: {}", errors.join("\n"));
    assert_eq!(stack.depth(), 2 + snapshots, "{ctx}: not every snapshot was taken");
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "{ctx}: the base layer changed");

    let want = expected(&g, &owners);
    verify(&stack, &want, &format!("{ctx}, at the end"));
    let paths = stack.paths();
    if seed % 2 == 0 {
        block_on(stack.close(&SyncIo)).unwrap();
        drop(stack);
    } else {
        // The process dies: nothing acknowledged may be missing.
        drop(stack);
        let s = open(&paths, false);
        verify(&s, &want, &format!("{ctx}, after an unclean reopen"));
        block_on(s.close(&SyncIo)).unwrap();
    }
    let s = open(&paths, true);
    verify(&s, &want, &format!("{ctx}, after close"));
    drop(s);
    for p in &paths {
        assert_ploop_clean(p, &ctx);
    }
}

#[test]
fn concurrent_writers_and_snapshots_match_the_model() {
    for_each_seed("CONCURRENT", 48, run_seed);
}
