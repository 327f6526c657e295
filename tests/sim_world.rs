//! Unit tests of the simulated world itself (#19): the files, the page
//! cache a power cut tears, the directories, the locks, the executor and
//! the determinism the simulation rests on.

#[path = "common/sim/mod.rs"]
mod sim;

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use sim::{DirMode, FaultPlan, Sim, SimError, SimIo};
use ublk_ploop::io::{Handle, Io, LockHow, OpenHow};

const DIR: &str = "/d";
const FILE: &str = "/d/f";

fn world(seed: u64, mode: DirMode) -> Sim {
    let s = Sim::new(seed, mode, FaultPlan::none());
    s.io().create_dir_all(Path::new(DIR)).unwrap();
    s
}

fn create(io: &SimIo, path: &str) -> Handle {
    io.open(Path::new(path), &OpenHow::create_new(0o600)).unwrap()
}

fn open(io: &SimIo, path: &str) -> Handle {
    io.open(Path::new(path), &OpenHow::write()).unwrap()
}

/// Run `f(io)` as a task to its end.
fn run<T: 'static, F: std::future::Future<Output = T> + 'static>(s: &Sim, f: impl FnOnce(SimIo) -> F) -> T {
    s.block_on("test", f(s.io())).unwrap()
}

/// A durable file of `len` bytes of `byte` (its name synced too).
fn durable_file(s: &Sim, path: &str, byte: u8, len: usize) {
    let p = path.to_string();
    run(s, move |io| async move {
        let h = create(&io, &p);
        io.write_at(h.fd(), &vec![byte; len], 0).await.unwrap();
        io.sync_data(h.fd()).await.unwrap();
        io.sync_dir(Path::new(DIR)).await.unwrap();
    });
}

fn content(s: &Sim, path: &str) -> Option<Vec<u8>> {
    s.read_file(Path::new(path))
}

// ---------------------------------------------------------------------------
// Determinism.

/// Several tasks writing, reading, syncing and renaming in one directory,
/// then a power cut: everything the run decided, as a hash and a content.
fn busy_run(seed: u64) -> (u64, Vec<Option<Vec<u8>>>, u64) {
    let s = Sim::new(seed, DirMode::Posix, FaultPlan { transient: 3, per_op: 20, ..FaultPlan::none() });
    s.io().create_dir_all(Path::new(DIR)).unwrap();
    for t in 0..3u64 {
        let io = s.io();
        s.spawn("writer", async move {
            let name = format!("/d/f{t}");
            let h = create(&io, &name);
            for i in 0..20u64 {
                let data = vec![(t * 40 + i) as u8; 1024 + 512 * (i as usize % 5)];
                let _ = io.write_at(h.fd(), &data, i * 700).await;
                if i % 4 == 0 {
                    let _ = io.sync_data(h.fd()).await;
                }
                let mut back = vec![0u8; 512];
                let _ = io.read_at(h.fd(), &mut back, i * 300).await;
            }
            let _ = io.rename(Path::new(&name), Path::new(&format!("/d/g{t}"))).await;
            if t == 0 {
                let _ = io.sync_dir(Path::new(DIR)).await;
            }
        });
    }
    s.run_for(150).unwrap();
    s.power_cut();
    let files = ["/d/f0", "/d/f1", "/d/f2", "/d/g0", "/d/g1", "/d/g2"].iter().map(|p| content(&s, p)).collect();
    (s.trace_hash(), files, s.stats().events)
}

#[test]
fn one_seed_one_run() {
    let mut hashes = std::collections::BTreeSet::new();
    for seed in 0..20 {
        let a = busy_run(seed);
        let b = busy_run(seed);
        assert_eq!(a.0, b.0, "seed {seed}: trace hashes differ");
        assert_eq!(a.1, b.1, "seed {seed}: contents differ");
        assert_eq!(a.2, b.2);
        hashes.insert(a.0);
    }
    assert!(hashes.len() >= 18, "the seed barely changes the run: {} distinct traces of 20", hashes.len());
}

/// GUIDs and delta names come from the seed while a Sim lives.
#[test]
fn a_sim_seeds_the_engines_entropy() {
    let draw = |seed| {
        let _s = Sim::new(seed, DirMode::Posix, FaultPlan::none());
        (ublk_ploop::rng::entropy_u128(), ublk_ploop::rng::entropy_u128())
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
    assert_ne!(ublk_ploop::rng::entropy_u128(), draw(7).0, "the system's generator again once the Sim is gone");
}

#[test]
fn completions_come_back_in_a_seed_chosen_order() {
    let (mut first, mut second) = (0, 0);
    for seed in 0..100 {
        let s = world(seed, DirMode::Posix);
        durable_file(&s, FILE, 0, 512);
        let io = s.io();
        let h = Rc::new(open(&io, FILE));
        for byte in [1u8, 2] {
            let (io, h) = (io.clone(), h.clone());
            s.spawn("w", async move { io.write_at(h.fd(), &[byte; 512], 0).await.unwrap() });
        }
        s.run().unwrap();
        match content(&s, FILE).unwrap()[0] {
            1 => second += 1, // the second write landed first
            2 => first += 1,
            b => panic!("seed {seed}: byte {b}"),
        }
    }
    assert!(first > 10 && second > 10, "orders seen: {first} in order, {second} reversed");
}

// ---------------------------------------------------------------------------
// The page cache and power cuts.

#[test]
fn an_unsynced_write_is_sometimes_lost_a_synced_one_never() {
    let (mut kept, mut lost) = (0, 0);
    for seed in 0..200 {
        let s = world(seed, DirMode::Posix);
        durable_file(&s, FILE, 0xAA, 8192);
        run(&s, |io| async move {
            let h = open(&io, FILE);
            io.write_at(h.fd(), &[0xBB; 4096], 0).await.unwrap();
            io.sync_data(h.fd()).await.unwrap();
            io.write_at(h.fd(), &[0xCC; 4096], 4096).await.unwrap();
        });
        s.power_cut();
        let c = content(&s, FILE).unwrap();
        assert_eq!(c.len(), 8192);
        assert!(c[..4096].iter().all(|&b| b == 0xBB), "seed {seed}: a synced write was lost");
        if c[4096..].iter().all(|&b| b == 0xCC) {
            kept += 1;
        } else if c[4096..].iter().all(|&b| b == 0xAA) {
            lost += 1;
        }
    }
    assert!(kept > 20 && lost > 20, "unsynced write kept {kept}, lost {lost} times of 200");
}

#[test]
fn a_torn_write_leaves_each_sector_old_or_new() {
    let mut torn = 0;
    for seed in 0..200 {
        let s = world(seed, DirMode::Posix);
        durable_file(&s, FILE, 0x11, 65536);
        let new: Vec<u8> = (0..65536u32).map(|i| (i / 512) as u8 | 0x80).collect();
        let n = new.clone();
        run(&s, move |io| async move {
            let h = open(&io, FILE);
            io.write_at(h.fd(), &n, 0).await.unwrap();
            // Another write over part of it: a sector may end with either.
            io.write_at(h.fd(), &[0x33; 1024], 8192).await.unwrap();
        });
        s.power_cut();
        let c = content(&s, FILE).unwrap();
        let mut kinds = std::collections::BTreeSet::new();
        for (i, sector) in c.chunks(512).enumerate() {
            let old = sector.iter().all(|&b| b == 0x11);
            let fresh = sector == &new[i * 512..][..512];
            let over = (16..18).contains(&i) && sector.iter().all(|&b| b == 0x33);
            assert!(old || fresh || over, "seed {seed}: sector {i} holds bytes no write gave it: {:?}", &sector[..8]);
            kinds.insert(if old { 0 } else { 1 });
        }
        if kinds.len() == 2 {
            torn += 1;
        }
    }
    assert!(torn > 10, "only {torn} torn writes in 200 cuts");
}

/// The cut against a shadow model, over random writes, punches,
/// allocations, truncations and syncs of one file: after the cut the size
/// is the synced one or one an unsynced op gave, and every sector holds
/// its synced content or one an unsynced op gave it (zeros where a shrink
/// may have cut it), never anything else.
#[test]
fn every_cut_is_explained_by_the_ops_since_the_last_sync() {
    const SECTORS: u64 = 96;
    let mut seen_partial = 0;
    for seed in 0..150u64 {
        let s = world(seed, DirMode::Posix);
        durable_file(&s, FILE, 0, 0);
        // Per sector: the synced tag, the tags given since, the current one.
        let model = Rc::new(RefCell::new((vec![0u64; SECTORS as usize], vec![std::collections::BTreeSet::new(); SECTORS as usize], vec![0u64; SECTORS as usize], 0u64, Vec::<u64>::new())));
        let m = model.clone();
        let ops = 10 + seed % 50;
        run(&s, move |io| async move {
            let h = open(&io, FILE);
            let mut rng = ublk_ploop::rng::Rng::new(seed);
            let mut len = 0u64;
            for op in 0..ops {
                let a = rng.below(SECTORS);
                let n = 1 + rng.below((SECTORS - a).min(24));
                let kind = rng.below(10);
                let to = rng.below(SECTORS) * 512;
                let r = match kind {
                    0..=4 => {
                        let tag = seed << 20 | op << 8 | 1;
                        let data: Vec<u8> = (0..n * 512).map(|i| (tag >> (8 * (i % 8))) as u8).collect();
                        io.write_at(h.fd(), &data, a * 512).await
                    }
                    5 => io.punch_hole(h.fd(), a * 512, n * 512).await,
                    6 => io.allocate(h.fd(), a * 512, n * 512).await,
                    7 => io.set_len(h.fd(), to).await,
                    _ => io.sync_data(h.fd()).await,
                };
                r.unwrap();
                let mut m = m.borrow_mut();
                let (dur, since, cur, dur_len, sizes) = &mut *m;
                match kind {
                    0..=4 => {
                        let tag = seed << 20 | op << 8 | 1;
                        for s in a..a + n {
                            cur[s as usize] = tag;
                            since[s as usize].insert(tag);
                        }
                        if (a + n) * 512 > len {
                            len = (a + n) * 512;
                            sizes.push(len);
                        }
                    }
                    5 => {
                        for s in a..(a + n).min(len / 512) {
                            cur[s as usize] = 0;
                            since[s as usize].insert(0);
                        }
                    }
                    6 => {
                        if (a + n) * 512 > len {
                            len = (a + n) * 512;
                            sizes.push(len);
                        }
                    }
                    7 => {
                        for s in to / 512..SECTORS {
                            if cur[s as usize] != 0 {
                                cur[s as usize] = 0;
                                since[s as usize].insert(0);
                            }
                        }
                        if to != len {
                            len = to;
                            sizes.push(len);
                        }
                    }
                    _ => {
                        dur.clone_from(cur);
                        since.iter_mut().for_each(|x| x.clear());
                        *dur_len = len;
                        sizes.clear();
                    }
                }
            }
        });
        s.power_cut();
        let c = content(&s, FILE).unwrap();
        let m = model.borrow();
        let (dur, since, _, dur_len, sizes) = &*m;
        let len = c.len() as u64;
        assert!(len == *dur_len || sizes.contains(&len), "seed {seed}: size {len}, synced {dur_len}, since {sizes:?}");
        // Below every size the file had since the sync nothing was cut.
        let floor = sizes.iter().copied().chain([*dur_len]).min().unwrap() / 512;
        let mut partial = false;
        for (i, sector) in c.chunks(512).enumerate() {
            let tag = u64::from_le_bytes(sector[..8].try_into().unwrap());
            assert!(sector.chunks(8).all(|w| w == &tag.to_le_bytes()[..]), "seed {seed}: sector {i} is not one write's");
            let ok = tag == dur[i] || since[i].contains(&tag) || (tag == 0 && i as u64 >= floor);
            assert!(ok, "seed {seed}: sector {i} holds {tag:#x}, synced {:#x}, since {:?}", dur[i], since[i]);
            partial |= !since[i].is_empty() && tag == dur[i];
        }
        seen_partial += partial as u32;
    }
    assert!(seen_partial > 10);
}

#[test]
fn fdatasync_makes_the_size_durable() {
    let mut short = 0;
    for seed in 0..100 {
        let s = world(seed, DirMode::Posix);
        durable_file(&s, FILE, 1, 100);
        let synced = seed % 2 == 0;
        run(&s, move |io| async move {
            let h = open(&io, FILE);
            io.write_at(h.fd(), &[2; 10_000], 100).await.unwrap();
            io.set_len(h.fd(), 20_000).await.unwrap();
            if synced {
                io.sync_data(h.fd()).await.unwrap();
            }
        });
        s.power_cut();
        let len = content(&s, FILE).unwrap().len();
        if synced {
            assert_eq!(len, 20_000, "seed {seed}: a synced size was lost");
        } else {
            assert!([100, 10_100, 20_000].contains(&len), "seed {seed}: size {len} no op gave");
            short += (len < 20_000) as u32;
        }
    }
    assert!(short > 5, "an unsynced growth was lost only {short} times");
}

#[test]
fn a_punch_and_an_allocation_read_as_zeros_and_holes_are_seen() {
    let s = world(1, DirMode::Posix);
    durable_file(&s, FILE, 7, 16384);
    let (data_at, hole) = run(&s, |io| async move {
        let h = open(&io, FILE);
        io.punch_hole(h.fd(), 4096, 8192).await.unwrap();
        io.allocate(h.fd(), 16384, 8192).await.unwrap();
        let mut b = vec![9u8; 24576];
        io.read_at(h.fd(), &mut b, 0).await.unwrap();
        assert!(b[..4096].iter().all(|&x| x == 7) && b[4096..12288].iter().all(|&x| x == 0));
        assert!(b[12288..16384].iter().all(|&x| x == 7) && b[16384..].iter().all(|&x| x == 0));
        (io.seek_data(h.fd(), 4096).unwrap(), ublk_ploop::io::is_hole(&io, h.fd(), 4096, 8192))
    });
    assert_eq!(data_at, Some(12288));
    assert!(hole);
    assert_eq!(content(&s, FILE).unwrap().len(), 24576);
}

// ---------------------------------------------------------------------------
// Directories.

/// Create B durably, then rename A over it without syncing the directory.
fn rename_then_cut(seed: u64, mode: DirMode, sync_dir: bool, sync_other: bool) -> bool {
    let s = world(seed, mode);
    durable_file(&s, "/d/a", 1, 512);
    durable_file(&s, "/d/b", 2, 512);
    durable_file(&s, "/d/other", 3, 512);
    run(&s, move |io| async move {
        io.rename(Path::new("/d/a"), Path::new("/d/b")).await.unwrap();
        if sync_dir {
            io.sync_dir(Path::new(DIR)).await.unwrap();
        }
        if sync_other {
            let h = open(&io, "/d/other");
            io.write_at(h.fd(), &[4; 512], 0).await.unwrap();
            io.sync_data(h.fd()).await.unwrap();
        }
    });
    s.power_cut();
    let (a, b) = (content(&s, "/d/a"), content(&s, "/d/b"));
    match (a, b) {
        (None, Some(b)) if b[0] == 1 => true,
        (Some(a), Some(b)) if a[0] == 1 && b[0] == 2 => false,
        other => panic!("seed {seed}: a rename landed halfway: {other:?}"),
    }
}

#[test]
fn posix_a_rename_is_durable_only_after_its_directory_sync() {
    let reverted = (0..100).filter(|&seed| !rename_then_cut(seed, DirMode::Posix, false, true)).count();
    assert!(reverted > 10 && reverted < 90, "reverted {reverted} of 100");
    for seed in 0..50 {
        assert!(rename_then_cut(seed, DirMode::Posix, true, false), "seed {seed}: a synced rename reverted");
    }
}

/// What `Journal` guarantees: namespace changes commit in the order they
/// were made, and a completed fdatasync of any file commits every change
/// made before it.
#[test]
fn journal_an_fdatasync_commits_earlier_names_in_order() {
    for seed in 0..50 {
        assert!(rename_then_cut(seed, DirMode::Journal, false, true), "seed {seed}: a rename before an fdatasync reverted");
    }
    let reverted = (0..100).filter(|&seed| !rename_then_cut(seed, DirMode::Journal, false, false)).count();
    assert!(reverted > 10, "a rename nothing committed always survived");
    let mut only_first = 0;
    for seed in 0..100 {
        let s = world(seed, DirMode::Journal);
        run(&s, |io| async move {
            for name in ["/d/x1", "/d/x2", "/d/x3"] {
                let _ = create(&io, name);
            }
        });
        s.power_cut();
        let there: Vec<bool> = ["/d/x1", "/d/x2", "/d/x3"].iter().map(|p| content(&s, p).is_some()).collect();
        assert!(there.windows(2).all(|w| w[0] || !w[1]), "seed {seed}: a later name without an earlier one: {there:?}");
        only_first += (there == [true, false, false]) as u32;
    }
    assert!(only_first > 0);
}

#[test]
fn an_unlink_reverts_without_a_directory_sync_and_the_file_lives_while_open() {
    let mut back = 0;
    for seed in 0..100 {
        let s = world(seed, DirMode::Posix);
        durable_file(&s, FILE, 5, 4096);
        let sync = seed % 2 == 0;
        run(&s, move |io| async move {
            let h = open(&io, FILE);
            io.remove_file(Path::new(FILE)).unwrap();
            assert!(io.stat(Path::new(FILE)).unwrap().is_none());
            assert_eq!(io.fstat(h.fd()).unwrap().nlink, 0);
            let mut b = [0u8; 512];
            io.read_at(h.fd(), &mut b, 0).await.unwrap();
            assert_eq!(b, [5; 512], "an unlinked file reads on while open");
            if sync {
                io.sync_dir(Path::new(DIR)).await.unwrap();
            }
        });
        s.power_cut();
        if let Some(c) = content(&s, FILE) {
            assert!(!sync, "seed {seed}: a synced unlink reverted");
            assert_eq!(c, vec![5; 4096]);
            back += 1;
        }
        assert!(s.list(Path::new(DIR)).len() <= 1);
    }
    assert!(back > 5, "an unsynced unlink came back {back} times");
}

#[test]
fn namespace_calls_answer_as_linux_does() {
    let s = world(0, DirMode::Posix);
    let io = s.io();
    durable_file(&s, FILE, 1, 10);
    let err = |r: std::io::Result<Handle>| r.unwrap_err().raw_os_error();
    assert_eq!(err(io.open(Path::new(FILE), &OpenHow::create_new(0o600))), Some(libc::EEXIST));
    assert_eq!(err(io.open(Path::new("/d/none"), &OpenHow::read())), Some(libc::ENOENT));
    assert_eq!(io.open(Path::new(DIR), &OpenHow::read()).unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(io.canonicalize(Path::new("/d/../d/./f")).unwrap(), Path::new(FILE));
    assert!(io.canonicalize(Path::new("/d/none")).is_err());
    let st = io.stat(Path::new(DIR)).unwrap().unwrap();
    assert_eq!(st.kind, ublk_ploop::io::FileKind::Dir);
    assert_eq!(io.stat(Path::new(FILE)).unwrap().unwrap().len, 10);
    durable_file(&s, "/d/g", 2, 10);
    assert_eq!(io.rename_noreplace(Path::new(FILE), Path::new("/d/g")).unwrap_err().raw_os_error(), Some(libc::EEXIST));
    io.rename_noreplace(Path::new(FILE), Path::new("/d/h")).unwrap();
    assert_eq!(io.read_dir(Path::new(DIR)).unwrap(), vec!["g", "h"]);
    let h = io.open(Path::new("/d/g"), &OpenHow::read()).unwrap();
    assert!(h.fd() >= 1 << 30);
    // A read-only description cannot write.
    let e = run(&s, move |io| async move { io.write_at(h.fd(), b"x", 0).await.unwrap_err().raw_os_error() });
    assert_eq!(e, Some(libc::EBADF));
    // O_DIRECT refuses unaligned transfers, as the kernel does.
    let d = io.open(Path::new("/d/g"), &OpenHow { write: true, direct: true, ..OpenHow::default() }).unwrap();
    let fd = d.fd();
    let (bad, good) = run(&s, move |io| async move {
        let bad = io.write_at(fd, &[1; 100], 0).await.unwrap_err().raw_os_error();
        let mut b = vec![0u8; 1024];
        (bad, io.read_at(fd, &mut b, 512).await.is_ok())
    });
    assert_eq!((bad, good), (Some(libc::EINVAL), true));
}

const RUN: &str = "/run/u";

/// A world with the ordinary directory DIR and the tmpfs RUN.
fn world_with_tmpfs(seed: u64, mode: DirMode) -> Sim {
    let s = world(seed, mode);
    s.volatile_dir(Path::new(RUN));
    s
}

#[test]
fn a_volatile_file_outlives_a_kill_unsynced() {
    for seed in 0..20 {
        let s = world_with_tmpfs(seed, DirMode::Posix);
        let open_at_kill = run(&s, |io| async move {
            let h = create(&io, "/run/u/log");
            io.write_at(h.fd(), &[7; 1000], 0).await.unwrap();
            h
        });
        s.kill();
        drop(open_at_kill);
        assert_eq!(content(&s, "/run/u/log"), Some(vec![7; 1000]), "seed {seed}");
    }
}

#[test]
fn a_power_cut_empties_a_volatile_directory_whatever_was_synced() {
    for seed in 0..40 {
        let mode = if seed % 2 == 0 { DirMode::Posix } else { DirMode::Journal };
        let s = world_with_tmpfs(seed, mode);
        durable_file(&s, FILE, 3, 4096);
        let io = s.io();
        io.create_dir(Path::new("/run/u/sub")).unwrap();
        run(&s, |io| async move {
            for (name, dir) in [("/run/u/log", RUN), ("/run/u/sub/x", "/run/u/sub")] {
                let h = create(&io, name);
                io.write_at(h.fd(), &[7; 4096], 0).await.unwrap();
                io.sync_data(h.fd()).await.unwrap();
                io.sync_dir(Path::new(dir)).await.unwrap();
            }
            io.sync_dir(Path::new(RUN)).await.unwrap();
        });
        // A write still in flight on an open descriptor at the cut.
        let io2 = io.clone();
        s.spawn("late", async move {
            let h = open(&io2, "/run/u/log");
            io2.write_at(h.fd(), &[8; 512], 8192).await.unwrap();
        });
        s.run_for(2).unwrap();
        s.power_cut();
        for p in ["/run/u/log", "/run/u/sub/x", "/run/u/sub"] {
            assert!(io.stat(Path::new(p)).unwrap().is_none(), "seed {seed}: {p} outlived the cut");
        }
        let e = io.open(Path::new("/run/u/log"), &OpenHow::read()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(s.list(Path::new(RUN)), Vec::<String>::new(), "seed {seed}");
        assert!(io.is_volatile_dir(Path::new(RUN)).unwrap(), "the mount point stays");
        assert_eq!(content(&s, FILE), Some(vec![3; 4096]), "seed {seed}: a synced file on disk is kept");
        // The tmpfs works again after the cut.
        durable_file(&s, "/run/u/log", 9, 10);
        assert_eq!(content(&s, "/run/u/log"), Some(vec![9; 10]));
    }
}

#[test]
fn is_volatile_dir_answers_from_the_world() {
    let s = world_with_tmpfs(0, DirMode::Posix);
    let io = s.io();
    io.create_dir(Path::new("/run/u/sub")).unwrap();
    assert!(io.is_volatile_dir(Path::new(RUN)).unwrap());
    assert!(io.is_volatile_dir(Path::new("/run/u/sub/..//sub")).unwrap());
    assert!(!io.is_volatile_dir(Path::new(DIR)).unwrap());
    assert!(!io.is_volatile_dir(Path::new("/run")).unwrap());
    assert!(!io.is_volatile_dir(Path::new("/")).unwrap());
    assert_eq!(io.is_volatile_dir(Path::new("/none")).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    assert_eq!(io.is_volatile_dir(Path::new("/run/u/none")).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    // Another filesystem: rename(2) does not cross into it or out of it.
    durable_file(&s, FILE, 1, 10);
    durable_file(&s, "/run/u/log", 2, 10);
    assert_eq!(io.rename_noreplace(Path::new(FILE), Path::new("/run/u/f")).unwrap_err().raw_os_error(), Some(libc::EXDEV));
    assert_eq!(io.rename_noreplace(Path::new("/run/u/log"), Path::new("/d/log")).unwrap_err().raw_os_error(), Some(libc::EXDEV));
    io.rename_noreplace(Path::new("/run/u/log"), Path::new("/run/u/sub/log")).unwrap();
}

// ---------------------------------------------------------------------------
// Locks and capacity.

#[test]
fn flocks_conflict_between_descriptions_and_go_with_them() {
    let s = world(0, DirMode::Posix);
    let io = s.io();
    durable_file(&s, FILE, 0, 512);
    let would_block = |r: std::io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::EWOULDBLOCK);
    let a = open(&io, FILE);
    let b = open(&io, FILE);
    io.flock(a.fd(), LockHow::Exclusive).unwrap();
    assert!(would_block(io.flock(b.fd(), LockHow::Shared)));
    io.flock(a.fd(), LockHow::Shared).unwrap(); // conversion
    io.flock(b.fd(), LockHow::Shared).unwrap();
    // A failed conversion loses the lock held (Linux drops it first).
    assert!(would_block(io.flock(a.fd(), LockHow::Exclusive)));
    io.flock(b.fd(), LockHow::Exclusive).unwrap();
    assert!(would_block(io.flock(a.fd(), LockHow::Shared)));
    drop(b); // closing the description releases its lock
    io.flock(a.fd(), LockHow::Exclusive).unwrap();
    io.flock(a.fd(), LockHow::Unlock).unwrap();
    io.flock(a.fd(), LockHow::Exclusive).unwrap();
    // A kill closes every description, whoever still holds the handle.
    s.kill();
    let c = open(&io, FILE);
    io.flock(c.fd(), LockHow::Exclusive).unwrap();
    assert_eq!(io.flock(a.fd(), LockHow::Shared).unwrap_err().raw_os_error(), Some(libc::EBADF));
}

#[test]
fn enospc_at_capacity_and_a_punch_frees() {
    let s = Sim::new(0, DirMode::Posix, FaultPlan { capacity_blocks: 4, ..FaultPlan::none() });
    s.io().create_dir_all(Path::new(DIR)).unwrap();
    run(&s, |io| async move {
        let h = create(&io, FILE);
        io.write_at(h.fd(), &[1; 16384], 0).await.unwrap();
        let e = io.write_at(h.fd(), &[1; 1], 16384).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        // Overwriting takes no new block; a hole past the end is free.
        io.write_at(h.fd(), &[2; 4096], 4096).await.unwrap();
        io.set_len(h.fd(), 1 << 30).await.unwrap();
        assert_eq!(io.allocate(h.fd(), 1 << 20, 4096).await.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        io.punch_hole(h.fd(), 0, 4096).await.unwrap();
        io.write_at(h.fd(), &[3; 4096], 1 << 20).await.unwrap();
        assert_eq!(io.write_at(h.fd(), &[3; 4096], 2 << 20).await.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        // Shrinking frees what it cuts.
        io.set_len(h.fd(), 8192).await.unwrap();
        io.write_at(h.fd(), &[4; 8192], 1 << 20).await.unwrap();
    });
    let full: Vec<_> = s.faults().iter().map(|f| (f.op, f.errno)).collect();
    assert_eq!(full, [("write", libc::ENOSPC), ("allocate", libc::ENOSPC), ("write", libc::ENOSPC)], "a full filesystem is logged as a fault");
}

// ---------------------------------------------------------------------------
// Faults, kills.

#[test]
fn faults_come_as_planned_are_logged_and_can_be_suspended() {
    let plan = FaultPlan { transient: 5, per_op: 2, ..FaultPlan::none() };
    let s = Sim::new(3, DirMode::Posix, plan);
    s.io().create_dir_all(Path::new(DIR)).unwrap();
    let errors = run(&s, |io| async move {
        let h = create(&io, FILE);
        let mut errors = 0;
        for i in 0..100 {
            errors += io.write_at(h.fd(), &[1; 4096], i * 4096).await.is_err() as u32;
        }
        errors
    });
    assert_eq!(errors, 5);
    assert_eq!(s.faults().len(), 5);
    assert!(s.faults().iter().all(|f| f.path == FILE && f.op == "write"));
    let s = Sim::new(3, DirMode::Posix, FaultPlan { sticky_after: Some(10), ..FaultPlan::none() });
    s.io().create_dir_all(Path::new(DIR)).unwrap();
    s.set_faults_enabled(false);
    let ok = run(&s, |io| async move {
        let h = create(&io, FILE);
        let mut ok = 0;
        for i in 0..30 {
            ok += io.write_at(h.fd(), &[1; 512], i * 512).await.is_ok() as u32;
        }
        ok
    });
    assert_eq!(ok, 30, "suspended faults still came");
    s.set_faults_enabled(true);
    let e = run(&s, |io| async move {
        let h = open(&io, FILE);
        io.sync_data(h.fd()).await.unwrap_err().raw_os_error()
    });
    assert_eq!(e, Some(libc::EIO), "the disk died after 10 ops");
}

#[test]
fn an_op_in_flight_at_a_kill_lands_or_not() {
    let (mut landed, mut not) = (0, 0);
    for seed in 0..100 {
        let s = world(seed, DirMode::Posix);
        durable_file(&s, FILE, 0, 512);
        let io = s.io();
        let h = open(&io, FILE);
        let fd = h.fd();
        s.spawn("w", async move { io.write_at(fd, &[9; 512], 0).await });
        s.run_for(1).unwrap(); // submitted, not completed
        s.kill();
        drop(h);
        match content(&s, FILE).unwrap()[0] {
            9 => landed += 1,
            0 => not += 1,
            b => panic!("{b}"),
        }
        assert_eq!(s.stats().kills, 1);
    }
    assert!(landed > 20 && not > 20, "landed {landed}, not {not}");
}

/// A write whose future is dropped after submission is nobody's to
/// complete: the file does not change while the process lives, and the
/// next kill lands it or not.
#[test]
fn an_abandoned_op_lands_or_not_at_the_next_kill() {
    let (mut landed, mut not) = (0, 0);
    for seed in 0..60 {
        let s = world(seed, DirMode::Posix);
        durable_file(&s, FILE, 0, 512);
        let still = run(&s, |io| async move {
            let h = open(&io, FILE);
            assert!(futures_lite::future::poll_once(io.write_at(h.fd(), &[7; 512], 0)).await.is_none());
            let mut b = [1u8; 512];
            io.read_at(h.fd(), &mut b, 0).await.unwrap();
            b[0]
        });
        assert_eq!(still, 0, "seed {seed}: an abandoned write completed while the process lived");
        assert_eq!(s.world.in_flight(), 0);
        s.kill();
        match content(&s, FILE).unwrap()[0] {
            7 => landed += 1,
            _ => not += 1,
        }
    }
    assert!(landed > 5 && not > 5, "landed {landed}, not {not}");
}

/// A killed process runs no destructor: what a task's drop tries to do
/// to the files is refused.
#[test]
fn a_killed_tasks_destructors_change_no_file() {
    struct WritesOnDrop(SimIo, Rc<Handle>);
    impl Drop for WritesOnDrop {
        fn drop(&mut self) {
            let r = futures_lite::future::block_on(self.0.write_at(self.1.fd(), &[9; 512], 0));
            assert!(r.is_err());
            assert!(self.0.remove_file(Path::new(FILE)).is_err());
        }
    }
    let s = world(0, DirMode::Posix);
    durable_file(&s, FILE, 1, 512);
    let io = s.io();
    let guard = WritesOnDrop(io.clone(), Rc::new(open(&io, FILE)));
    s.spawn("holds a guard", async move {
        let _g = guard;
        std::future::pending::<()>().await
    });
    s.run_for(1).unwrap();
    s.kill();
    assert_eq!(content(&s, FILE).unwrap(), vec![1; 512]);
}

// ---------------------------------------------------------------------------
// The executor.

#[test]
fn a_task_waiting_for_nothing_is_a_hang() {
    let s = world(0, DirMode::Posix);
    s.spawn("fine", async {});
    s.spawn("stuck forever", std::future::pending::<()>());
    match s.run() {
        Err(SimError::Hang(report)) => assert!(report.contains("stuck forever"), "{report}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_panicking_task_is_reported_not_fatal() {
    let s = world(0, DirMode::Posix);
    let io = s.io();
    s.spawn("panics", async move {
        let h = create(&io, FILE);
        io.sync_data(h.fd()).await.unwrap();
        panic!("engine bug {}", 42);
    });
    match s.run() {
        Err(SimError::Panic(msg)) => assert!(msg.contains("engine bug 42") && msg.contains("panics"), "{msg}"),
        other => panic!("{other:?}"),
    }
    // The world goes on: the panicked task's handle closed.
    s.kill();
    assert!(s.read_file(Path::new(FILE)).is_some());
}

#[test]
fn a_livelock_ends_at_the_budget() {
    let s = world(0, DirMode::Posix);
    s.set_budget(10_000);
    s.spawn("spins", async {
        loop {
            sim::exec::yield_now().await;
        }
    });
    assert!(matches!(s.run(), Err(SimError::Budget(_))));
}

#[test]
fn sleepers_wake_in_simulated_time_order() {
    for seed in 0..20 {
        let s = world(seed, DirMode::Posix);
        let order = Rc::new(RefCell::new(Vec::new()));
        for ms in [30u64, 10, 20, 10] {
            let (order, sleep) = (order.clone(), s.sleep(Duration::from_millis(ms)));
            s.spawn("sleeper", async move {
                sleep.await;
                order.borrow_mut().push(ms);
            });
        }
        s.run().unwrap();
        assert_eq!(*order.borrow(), [10, 10, 20, 30]);
        assert!(s.now() >= Duration::from_millis(30) && s.now() < Duration::from_millis(31));
        let io = s.io();
        let t0 = io.now();
        io.sleep_blocking(Duration::from_secs(2));
        assert_eq!(io.now() - t0, Duration::from_secs(2));
    }
}

#[test]
fn a_finished_tasks_sleep_does_not_move_the_clock() {
    let s = world(0, DirMode::Posix);
    let sleep = s.sleep(Duration::from_secs(60));
    s.spawn("gives up", async move {
        futures_lite::future::or(sleep, async {}).await;
    });
    s.run().unwrap();
    s.spawn("idle", async {});
    s.run().unwrap();
    assert!(s.now() < Duration::from_secs(1), "{:?}", s.now());
}

/// An op awaited where no task would be woken (the driver's own
/// `block_on`, or one nested in the engine) completes at once instead of
/// parking the thread forever; the world counts it.
#[test]
fn an_op_awaited_outside_the_executor_completes_at_once() {
    let s = world(0, DirMode::Posix);
    let io = s.io();
    let h = create(&io, FILE);
    futures_lite::future::block_on(io.write_at(h.fd(), &[1; 512], 0)).unwrap();
    assert_eq!(s.inline_ops(), 1);
    let io2 = io.clone();
    let fd = h.fd();
    let back = run(&s, move |io| async move {
        let nested = futures_lite::future::block_on(io2.sync_data(fd));
        let mut b = [0u8; 512];
        io.read_at(fd, &mut b, 0).await.unwrap();
        (nested.is_ok(), b[0])
    });
    assert_eq!(back, (true, 1));
    assert_eq!(s.inline_ops(), 2, "the nested block_on completed at once, the task's read went through the executor");
}

/// The cost that bounds how many seeds CI affords: thousands of ops over
/// a sparse 1 TiB file in the debug profile.
#[test]
fn a_busy_world_stays_cheap() {
    let s = world(4, DirMode::Posix);
    let started = std::time::Instant::now();
    let io = s.io();
    for t in 0..4u64 {
        let io = io.clone();
        s.spawn("queue", async move {
            let h = create(&io, &format!("/d/img{t}"));
            io.set_len(h.fd(), 1 << 40).await.unwrap();
            let mut rng = ublk_ploop::rng::Rng::new(t);
            let mut buf = vec![0u8; 65536];
            for i in 0..2500u64 {
                let off = rng.below(4096) * 4096 + (1 << 39);
                let len = 512 * (1 + rng.below(128) as usize);
                match i % 10 {
                    0..=4 => io.write_at(h.fd(), &buf[..len], off).await.unwrap(),
                    5..=7 => io.read_at(h.fd(), &mut buf[..len], off).await.unwrap(),
                    8 => io.punch_hole(h.fd(), off, 65536).await.unwrap(),
                    _ => io.sync_data(h.fd()).await.unwrap(),
                }
            }
        });
    }
    s.run().unwrap();
    s.power_cut();
    let spent = started.elapsed();
    eprintln!("10000 ops, 1 cut: {spent:?}, {:?}", s.stats());
    assert!(spent < Duration::from_secs(20), "{spent:?}");
}

/// Three tasks entering the engine's gate and one taking it exclusively
/// never overlap, whatever the interleaving.
#[test]
fn the_gate_never_lets_a_request_in_beside_its_exclusive_holder() {
    use ublk_ploop::io::wait::Gate;
    for seed in 0..500 {
        let s = world(seed, DirMode::Posix);
        let gate = Rc::new(Gate::new(0u64));
        let inside = Rc::new(Cell::new(0u32));
        let exclusive = Rc::new(Cell::new(false));
        let sleep = |ms| s.sleep(Duration::from_micros(ms));
        for t in 0..3u64 {
            let (gate, inside, exclusive) = (gate.clone(), inside.clone(), exclusive.clone());
            let naps: Vec<_> = (0..4).map(|i| sleep(t * 7 + i * 3)).collect();
            s.spawn("request", async move {
                for nap in naps {
                    let e = gate.enter().await;
                    assert!(!exclusive.get(), "seed {seed}: a request entered beside the exclusive holder");
                    inside.set(inside.get() + 1);
                    let _ = *e;
                    sim::exec::yield_now().await;
                    nap.await;
                    assert!(!exclusive.get(), "seed {seed}: the holder came in while a request was inside");
                    inside.set(inside.get() - 1);
                    drop(e);
                }
            });
        }
        let (g, ins, ex) = (gate.clone(), inside.clone(), exclusive.clone());
        let nap = sleep(5);
        s.spawn("exclusive", async move {
            sim::exec::yield_now().await;
            let mut held = g.exclusive().await;
            assert_eq!(ins.get(), 0, "seed {seed}: exclusive with requests inside");
            ex.set(true);
            *held += 1;
            nap.await;
            sim::exec::yield_now().await;
            ex.set(false);
        });
        s.run().unwrap();
        assert_eq!(inside.get(), 0);
    }
}

// ---------------------------------------------------------------------------
// The engine's own I/O helpers on the world.

/// `open_image_file_in`, `len_in` and `is_hole` go through `Io::open`,
/// `fstat` and `seek_data`: the engine's image helpers run on the world.
/// (`PloopLayer::create` still opens with std::fs on this branch's base,
/// so the layer itself is not driven here.)
#[test]
fn the_engines_file_helpers_run_on_the_world() {
    use ublk_ploop::io::{is_hole, open_image_file_in, Direct};
    let s = world(9, DirMode::Posix);
    durable_file(&s, "/d/img", 0, 0);
    let (len, block, hole, data) = run(&s, |io| async move {
        let f = open_image_file_in(&io, Path::new("/d/img"), true, Direct::Auto).unwrap();
        io.set_len(f.fd(), 1 << 20).await.unwrap();
        io.write_at(f.fd(), &[1; 4096], 65536).await.unwrap();
        io.sync_data(f.fd()).await.unwrap();
        (f.len_in(&io).unwrap(), f.block_size, is_hole(&io, f.fd(), 0, 65536), is_hole(&io, f.fd(), 0, 65537))
    });
    assert_eq!((len, block, hole, data), (1 << 20, 512, true, false));
    assert!(open_image_file_in(&s.io(), Path::new("/d/none"), false, Direct::Off).is_err());
}

/// The ploop layer opened on the world from an image the world holds.
/// Where the engine still makes a raw syscall behind the `Io` (on this
/// branch's base, `load::file_len` calls fstat directly), the virtual
/// descriptor makes it fail with EBADF: an escape the simulation shows,
/// never a wrong answer about some other file. Once that call goes
/// through `Io::fstat`, the layer opens and reads an empty table.
#[test]
fn the_ploop_layer_opens_on_the_world_or_its_escape_shows() {
    use ublk_ploop::io::{open_image_file_in, Direct};
    use ublk_ploop::layers::ploop::header::Header;
    use ublk_ploop::layers::PloopLayer;
    let s = world(2, DirMode::Posix);
    let outcome = run(&s, |io| async move {
        let header = Header::new(16 << 20, 65536).unwrap();
        let h = create(&io, "/d/img.hdd");
        let mut meta = vec![0u8; header.data_off_bytes() as usize];
        meta[..64].copy_from_slice(&header.to_bytes());
        io.write_at(h.fd(), &meta, 0).await.unwrap();
        io.sync_data(h.fd()).await.unwrap();
        drop(h);
        let file = open_image_file_in(&io, Path::new("/d/img.hdd"), true, Direct::Auto).unwrap();
        match PloopLayer::open(&io, file, Direct::Auto, true, None).await {
            Ok((layer, _)) => {
                assert_eq!(layer.size(), 16 << 20);
                assert!((0..256).all(|c| layer.lookup(c).is_none()));
                layer.close(&io).await.map_err(|e| e.errno())
            }
            Err(e) => Err(e.errno()),
        }
    });
    eprintln!("ploop layer on the world: {outcome:?}");
    match outcome {
        Ok(()) => {}
        Err(errno) => assert_eq!(errno, libc::EBADF, "the engine failed on the world other than by an escape"),
    }
}
