//! A ring of the engine's own, for callers that have no ublk queue: the
//! benchmark (which must measure the daemon's code path, so it runs the
//! same `RingIo` on this ring with the same task-per-request structure)
//! and the offline tools. One thread drives it; it is `!Sync` on purpose.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{opcode, squeue, types, IoUring};

use super::ring::{RingIo, Submit};
use super::wait::{set_thread_kick, Kick};

/// user_data of the kick poll; operations use their slot index.
const KICK_TAG: u64 = u64::MAX;

#[derive(Default)]
struct Slot {
    result: Option<i32>,
    waker: Option<Waker>,
}

pub struct OwnRing {
    ring: RefCell<IoUring>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
    kick: Arc<Kick>,
    kick_armed: Cell<bool>,
    /// Inside `run_tasks`: SQEs wait for the next task or the wait (see
    /// there). Elsewhere each goes to the kernel at once: a `block_on`
    /// future may block inside its poll (a pipe write under back-pressure,
    /// a lock's retry), and I/O queued before that would sit unsubmitted.
    deferred: Cell<bool>,
}

impl OwnRing {
    pub fn new(entries: u32) -> io::Result<OwnRing> {
        Ok(OwnRing {
            ring: RefCell::new(new_uring(entries.next_power_of_two().max(8))?),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            kick: Kick::new()?,
            kick_armed: Cell::new(false),
            deferred: Cell::new(false),
        })
    }

    /// Register user memory as the ring's fixed buffers (index = position),
    /// so the zero-copy path (`Io::read_fixed`...) runs on hosts without
    /// ublk: the same opcodes the daemon issues on kernel buffers.
    ///
    /// # Safety
    /// The memory must stay valid while the ring lives.
    pub unsafe fn register_buffers(&self, bufs: &[libc::iovec]) -> io::Result<()> {
        self.ring.borrow().submitter().register_buffers(bufs)
    }

    /// The engine's I/O on this ring.
    pub fn io(&self) -> RingIo<&OwnRing> {
        RingIo::new(self)
    }

    fn push(&self, sqe: &squeue::Entry) {
        // SAFETY: the SQE's buffers are kept alive by the futures that
        // await its completion (see RingIo).
        while unsafe { self.ring.borrow_mut().submission().push(sqe) }.is_err() {
            // Full: hand what is queued to the kernel, and take what has
            // completed (a kernel that refuses new work while completions
            // wait, EBUSY, would otherwise be asked forever), then retry.
            self.enter(0);
            self.reap();
        }
    }

    /// Hand what is queued to the kernel without waiting.
    fn flush(&self) {
        if !self.ring.borrow_mut().submission().is_empty() {
            self.enter(0);
        }
    }

    /// Submit what is queued, waiting for `want` completions.
    fn enter(&self, want: usize) {
        match self.ring.borrow().submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
            Err(e) => panic!("io_uring submit failed: {e}"),
        }
    }

    /// Enter the kernel: submit what is queued and wait for one completion
    /// (or a kick from another thread), then hand out the results.
    fn wait_and_reap(&self) {
        if !self.kick_armed.get() {
            self.push(&opcode::PollAdd::new(types::Fd(self.kick.fd()), libc::POLLIN as u32).build().user_data(KICK_TAG));
            self.kick_armed.set(true);
        }
        self.enter(1);
        self.reap();
    }

    /// Hand out the results of the completions posted so far.
    fn reap(&self) {
        let mut ring = self.ring.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            if cqe.user_data() == KICK_TAG {
                self.kick.clear();
                self.kick_armed.set(false);
                continue;
            }
            let slot = &mut slots[cqe.user_data() as usize];
            slot.result = Some(cqe.result());
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
    }

    /// Run `fut` on this thread, driving the ring until it completes.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        set_thread_kick(Some(self.kick.clone()));
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = pin!(fut);
        let out = loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                break v;
            }
            // Woken while being polled (one part of the future finished what
            // another waited for): poll again before waiting for the ring.
            if !flag.0.swap(false, Ordering::AcqRel) {
                self.wait_and_reap();
            }
        };
        set_thread_kick(None);
        out
    }

    /// Run the tasks of `exe` (which submit on this ring) until `done()`.
    pub fn run_tasks(&self, exe: &async_executor::LocalExecutor<'_>, done: impl Fn() -> bool) {
        set_thread_kick(Some(self.kick.clone()));
        let deferred = self.deferred.replace(true);
        loop {
            // What the first runnable task queues goes to the kernel after
            // the second has run (with the second's), and every later
            // task's after it has run, so the disk starts on a round's I/O
            // while the rest is planned; when the first task is the only
            // one, its I/O goes with the wait, in one enter. A lone request
            // (QD1) then costs one syscall, as on a ublk queue, which
            // submits and waits at once; handing each SQE over alone cost
            // two.
            let mut ran = false;
            while exe.try_tick() {
                if ran {
                    self.flush();
                }
                ran = true;
            }
            if done() {
                self.flush();
                break;
            }
            self.wait_and_reap();
        }
        self.deferred.set(deferred);
        set_thread_kick(None);
    }
}

/// Set up as the daemon's queue rings are (see `ring_setup`), so the
/// benchmark measures what the daemon runs. Every wait here asks for a
/// completion, as deferred task work needs.
fn new_uring(entries: u32) -> io::Result<IoUring> {
    super::ring_setup::build_ring(entries, entries * 2)
}

/// `block_on` polls again after every completion; its waker only notes a
/// wake from within a poll (a wake from another thread comes with a kick).
struct Flag(AtomicBool);
impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

/// The completion of one SQE on an [`OwnRing`].
pub struct OpFuture<'a> {
    ring: &'a OwnRing,
    slot: usize,
}

impl Submit for OwnRing {
    fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32> {
        let slot = {
            let mut slots = self.slots.borrow_mut();
            let i = self.free.borrow_mut().pop().unwrap_or_else(|| {
                slots.push(Slot::default());
                slots.len() - 1
            });
            slots[i] = Slot::default();
            i
        };
        self.push(&sqe.user_data(slot as u64));
        // Deferred, `run_tasks` hands it over after the next task or with
        // its wait. Batching a whole round into the wait cost 5-30% of 4k
        // IOPS on virtio disks (the engine benchmark), so a round is not
        // held back.
        if !self.deferred.get() {
            self.enter(0);
        }
        OpFuture { ring: self, slot }
    }
    fn run_task_work(&self) {
        if let Ok(ring) = self.ring.try_borrow() {
            super::ring_setup::run_task_work(&ring);
        }
    }
}

impl Drop for OwnRing {
    /// A job's ring goes with its thread: what it still holds of closed
    /// files is let go now, not later by the kernel's teardown of the ring
    /// (on a workqueue), so the next job finds their locks free.
    fn drop(&mut self) {
        self.run_task_work();
    }
}

impl Future for OpFuture<'_> {
    type Output = i32;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let mut slots = self.ring.slots.borrow_mut();
        let slot = &mut slots[self.slot];
        match slot.result.take() {
            Some(res) => {
                *slot = Slot::default();
                self.ring.free.borrow_mut().push(self.slot);
                Poll::Ready(res)
            }
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn block_on_polls_again_after_a_wake_from_within_the_future() {
        // A waits for B; B runs after A in the same poll and wakes it; no
        // I/O is in flight, so waiting for the ring would wait forever.
        let ring = OwnRing::new(8).unwrap();
        let ready = Cell::new(false);
        let waiter = std::cell::RefCell::new(None::<Waker>);
        let a = std::future::poll_fn(|cx| {
            if ready.get() {
                Poll::Ready(1)
            } else {
                *waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        });
        let b = std::future::poll_fn(|_| {
            ready.set(true);
            if let Some(w) = waiter.borrow_mut().take() {
                w.wake();
            }
            Poll::Ready(2)
        });
        let out = ring.block_on(futures_lite::future::zip(a, b));
        assert_eq!(out, (1, 2));
    }

    #[test]
    fn a_blocking_wait_runs_the_ring_s_deferred_work() {
        // An fdatasync completes on an io-wq worker; with deferred task work
        // its completion, like the last put of a finished request and of its
        // file, waits until this thread enters the ring for events. A lock
        // retry's wait must do that, or a closed image's lock outlives it.
        use crate::io::Io;
        use std::os::fd::AsRawFd;
        let ring = OwnRing::new(8).unwrap();
        if !ring.ring.borrow().params().is_setup_single_issuer() {
            eprintln!("no deferred task work on this kernel: nothing to test");
            return;
        }
        let file = tempfile::tempfile().unwrap();
        let sync = opcode::Fsync::new(types::Fd(file.as_raw_fd())).flags(types::FsyncFlags::DATASYNC).build().user_data(7);
        // SAFETY: the SQE points at no memory.
        unsafe { ring.ring.borrow_mut().submission().push(&sync).unwrap() };
        ring.ring.borrow().submit().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(ring.ring.borrow_mut().completion().is_empty(), "the completion came without entering the ring");
        // The sync itself may take a while on a loaded disk: wait for it as
        // a lock retry would (a wait that only sleeps never sees it).
        let start = std::time::Instant::now();
        let mut done: Vec<u64> = Vec::new();
        while done.is_empty() && start.elapsed() < std::time::Duration::from_secs(10) {
            ring.io().sleep_blocking(std::time::Duration::from_millis(20));
            done = ring.ring.borrow_mut().completion().map(|c| c.user_data()).collect();
        }
        assert_eq!(done, [7], "the wait left the ring's deferred work undone");
    }
}
