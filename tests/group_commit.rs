//! Group-committed BAT writes under failure: a request must never be
//! acknowledged when an entry it relied on was rolled back, and one failed
//! metadata write must not poison later, unrelated writes.

use std::path::PathBuf;

use ublk_ploop::io::{Direct, FaultBackend, FaultPlan, IoBackend, IoOp, SyncBackend};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::{Seg, Stack, StackOptions};

const C: u64 = 64 * 1024;

fn fresh(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ublk-ploop-gc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{tag}.hdd"));
    let _ = std::fs::remove_file(&p);
    PloopLayer::create(&p, 64 * C, C).unwrap();
    p
}

fn opts() -> StackOptions {
    StackOptions { read_only: false, direct: Direct::Auto }
}

/// Move a planned write's data, as a frontend does between plan and finish.
fn transfer(segs: &[Seg], data: &[u8]) {
    for s in segs {
        if let Seg::Data { fd, file_off, buf_off, len } = *s {
            SyncBackend::new().submit(&mut [IoOp::write(fd, file_off, &data[buf_off..buf_off + len])]).unwrap();
        }
    }
}

/// A backend whose first write fails (the BAT chunk write).
fn failing() -> FaultBackend<SyncBackend> {
    FaultBackend::new(SyncBackend::new(), FaultPlan { fail_write_at: Some(0), ..Default::default() })
}

fn read4k(stack: &Stack, off: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    stack.read(&mut SyncBackend::new(), off, &mut b).unwrap();
    b
}

#[test]
fn a_write_relying_on_a_rolled_back_entry_is_not_acknowledged() {
    let p = fresh("rollback");
    let (stack, _) = Stack::open(&[p.clone()], &opts()).unwrap();
    let mut io = SyncBackend::new();
    let mut segs = vec![];
    let data = vec![0xAAu8; 4096];
    // A links cluster 0 and moves its data, but has not finished yet.
    let ta = stack.plan_write(&mut io, 0, 4096, &mut segs).unwrap();
    transfer(&segs, &data);
    // B links cluster 1; the shared BAT write fails: both entries roll back.
    let tb = stack.plan_write(&mut io, C, 4096, &mut segs).unwrap();
    transfer(&segs, &data);
    assert!(stack.finish_write(&mut failing(), tb).is_err());
    // C links cluster 2 and succeeds, moving the written mark past A.
    let tc = stack.plan_write(&mut io, 2 * C, 4096, &mut segs).unwrap();
    transfer(&segs, &data);
    stack.finish_write(&mut io, tc).unwrap();
    // A must fail: its cluster is no longer linked.
    let ra = stack.finish_write(&mut io, ta);
    assert!(ra.is_err(), "a write whose BAT entry was rolled back was acknowledged");
    assert_eq!(read4k(&stack, 0), vec![0; 4096], "the rolled-back cluster still shows data");
    assert_eq!(read4k(&stack, 2 * C), data);
    stack.close(&mut io).unwrap();
    let (stack, _) = Stack::open(&[p.clone()], &opts()).unwrap();
    assert_eq!(read4k(&stack, 0), vec![0; 4096], "a failed write reappeared after reopen");
    assert_eq!(read4k(&stack, 2 * C), data, "an acknowledged write was lost");
    let report = ublk_ploop::check::check(&p, false);
    drop(stack);
    assert!(report.is_err() || report.unwrap().bad_entries.is_empty());
}

#[test]
fn one_failed_bat_write_does_not_fail_later_writes() {
    let p = fresh("sticky");
    let (stack, _) = Stack::open(&[p], &opts()).unwrap();
    let mut io = SyncBackend::new();
    let mut segs = vec![];
    let data = vec![0x11u8; 4096];
    stack.write(&mut io, 0, &data).unwrap();
    let tb = stack.plan_write(&mut io, C, 4096, &mut segs).unwrap();
    assert!(stack.finish_write(&mut failing(), tb).is_err());
    for i in 0..3 {
        stack.write(&mut io, 0, &data).unwrap_or_else(|e| panic!("overwrite {i} after an unrelated failure: {e}"));
    }
    // And the failed cluster can be allocated again.
    stack.write(&mut io, C, &data).unwrap();
    assert_eq!(read4k(&stack, C), data);
    stack.close(&mut io).unwrap();
}

#[test]
fn whole_cluster_write_zeroes_zeroes_a_copied_up_cluster() {
    // Lower layer with data, a top that got the cluster from a copy-up
    // (a write planned but not finished); a whole-cluster write-zeroes
    // must still zero it. (The two-queue race where the copy-up wins
    // inside `allocate` is what `allocate`'s "fresh" flag is for; this
    // single-threaded test pins the semantics, not the race.)
    let base = fresh("wz-base");
    {
        let (s, _) = Stack::open(&[base.clone()], &opts()).unwrap();
        s.write(&mut SyncBackend::new(), 0, &vec![7u8; C as usize]).unwrap();
        s.close(&mut SyncBackend::new()).unwrap();
    }
    let top = fresh("wz-top");
    let (stack, _) = Stack::open(&[base, top], &opts()).unwrap();
    let mut io = SyncBackend::new();
    let mut segs = vec![];
    // The "concurrent" write: planned (cluster copied up and linked) first.
    let t = stack.plan_write(&mut io, 0, 4096, &mut segs).unwrap();
    stack.write_zeroes(&mut io, 0, C as usize).unwrap();
    transfer(&segs, &[9u8; 4096]);
    stack.finish_write(&mut io, t).unwrap();
    let mut all = vec![0u8; C as usize];
    stack.read(&mut io, 0, &mut all).unwrap();
    assert!(all[4096..].iter().all(|&b| b == 0), "lower data survived a whole-cluster write-zeroes");
    stack.close(&mut io).unwrap();
}
