//! Waiting for another request without blocking the thread.
//!
//! A request that needs what another one is doing (a cluster being copied
//! up, a metadata write, the file growing, a stack change) registers its
//! waker in a [`WaitList`] and yields; the other request wakes the list
//! when done. The other request may run on another queue's thread, whose
//! ring sits in `io_uring_enter` and would not notice a mere waker: each
//! ring-driving thread therefore registers a [`Kick`] (an eventfd its ring
//! polls), and a wake from another thread also kicks it.

use std::cell::{RefCell, UnsafeCell};
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::ThreadId;

use nix::sys::eventfd::{EfdFlags, EventFd};

/// Wakes a thread that is blocked in its ring's `io_uring_enter`.
pub struct Kick {
    efd: EventFd,
    owner: ThreadId,
}

impl Kick {
    /// A kick for the current thread; its ring must poll [`Kick::fd`] and
    /// call [`Kick::clear`] when that poll completes.
    pub fn new() -> std::io::Result<Arc<Kick>> {
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Arc::new(Kick { efd, owner: std::thread::current().id() }))
    }
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.efd.as_raw_fd()
    }
    fn kick(&self) {
        if std::thread::current().id() != self.owner {
            let _ = self.efd.write(1);
        }
    }
    /// Reset the eventfd after its poll completed.
    pub fn clear(&self) {
        let _ = self.efd.read();
    }
}

thread_local! {
    static THREAD_KICK: RefCell<Option<Arc<Kick>>> = const { RefCell::new(None) };
}

/// Make wakes from other threads kick this thread's ring (None: the thread
/// parks and unparks through its waker, as `block_on` does).
pub fn set_thread_kick(kick: Option<Arc<Kick>>) {
    THREAD_KICK.with(|k| *k.borrow_mut() = kick);
}

fn thread_kick() -> Option<Arc<Kick>> {
    THREAD_KICK.with(|k| k.borrow().clone())
}

/// Wakers of requests waiting for one thing.
#[derive(Default)]
pub struct WaitList {
    waiters: Vec<(Waker, Option<Arc<Kick>>)>,
}

impl WaitList {
    /// Be woken by the next `wake_all`; call with the lock that guards the
    /// condition held, after finding it false.
    pub fn register(&mut self, cx: &Context<'_>) {
        if self.waiters.iter().any(|(w, _)| w.will_wake(cx.waker())) {
            return;
        }
        self.waiters.push((cx.waker().clone(), thread_kick()));
    }
    /// Take the waiters out (under the lock) to wake them after releasing it.
    pub fn take(&mut self) -> Woken {
        Woken(std::mem::take(&mut self.waiters))
    }
    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }
}

/// Waiters taken out of a [`WaitList`]; dropping this wakes them.
#[must_use = "dropping wakes the waiters; keep it until the lock is released"]
pub struct Woken(Vec<(Waker, Option<Arc<Kick>>)>);

impl Drop for Woken {
    fn drop(&mut self) {
        for (waker, kick) in self.0.drain(..) {
            waker.wake();
            if let Some(k) = kick {
                k.kick();
            }
        }
    }
}

/// Guards a value that requests read concurrently and that an exclusive
/// holder may change once every request in flight has left: the stack's
/// layer list, which a snapshot or merge swaps while the device serves.
///
/// Entering costs one atomic add (and leaving one subtract) on the hot
/// path. `exclusive` closes the gate (new requests wait), waits for the
/// requests inside to leave, and hands out `&mut T`; dropping that reopens
/// the gate and wakes the waiters. One exclusive holder at a time.
pub struct Gate<T> {
    /// CLOSED bit | requests inside.
    state: AtomicUsize,
    value: UnsafeCell<T>,
    waits: Mutex<GateWaits>,
}

const CLOSED: usize = 1 << (usize::BITS - 1);

#[derive(Default)]
struct GateWaits {
    /// Requests waiting for the gate to open.
    entering: WaitList,
    /// The exclusive holder waiting for the requests inside to leave.
    draining: WaitList,
    /// An exclusive holder exists (or is draining); others queue here.
    owned: bool,
    owners: WaitList,
}

// SAFETY: shared access to `value` happens only between a successful enter
// and the matching leave, exclusive access only while the gate is closed
// and empty (see `exclusive`); the atomics order the two.
unsafe impl<T: Send + Sync> Sync for Gate<T> {}
unsafe impl<T: Send> Send for Gate<T> {}

/// A request inside the gate: shared access to the value.
pub struct Entered<'a, T> {
    gate: &'a Gate<T>,
}

/// The exclusive holder: the gate is closed and empty until this drops.
pub struct Exclusive<'a, T> {
    gate: &'a Gate<T>,
}

impl<T> Gate<T> {
    pub fn new(value: T) -> Gate<T> {
        Gate { state: AtomicUsize::new(0), value: UnsafeCell::new(value), waits: Mutex::new(GateWaits::default()) }
    }

    /// Enter (waiting while an exclusive holder has the gate closed).
    pub async fn enter(&self) -> Entered<'_, T> {
        poll_fn(|cx| self.poll_enter(cx)).await
    }

    /// Enter without waiting, if the gate is open.
    pub fn try_enter(&self) -> Option<Entered<'_, T>> {
        let s = self.state.fetch_add(1, Ordering::Acquire);
        if s & CLOSED == 0 {
            return Some(Entered { gate: self });
        }
        self.leave();
        None
    }

    fn poll_enter(&self, cx: &mut Context<'_>) -> Poll<Entered<'_, T>> {
        loop {
            if let Some(e) = self.try_enter() {
                return Poll::Ready(e);
            }
            let mut w = self.waits.lock().unwrap();
            if self.state.load(Ordering::Acquire) & CLOSED == 0 {
                continue; // reopened meanwhile
            }
            w.entering.register(cx);
            return Poll::Pending;
        }
    }

    fn leave(&self) {
        let s = self.state.fetch_sub(1, Ordering::Release);
        if s == CLOSED | 1 {
            // The last one out of a closed gate: the holder may go on.
            let woken = self.waits.lock().unwrap().draining.take();
            drop(woken);
        }
    }

    /// Requests inside the gate now (for status and tests).
    pub fn inside(&self) -> usize {
        self.state.load(Ordering::Relaxed) & !CLOSED
    }

    /// Close the gate, wait until the requests inside have left, and take
    /// the value exclusively. The caller must not be inside the gate itself.
    pub async fn exclusive(&self) -> Exclusive<'_, T> {
        // One holder at a time.
        poll_fn(|cx| {
            let mut w = self.waits.lock().unwrap();
            if w.owned {
                w.owners.register(cx);
                return Poll::Pending;
            }
            w.owned = true;
            Poll::Ready(())
        })
        .await;
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
        let held = Exclusive { gate: self };
        poll_fn(|cx| {
            let mut w = self.waits.lock().unwrap();
            if self.state.load(Ordering::Acquire) & !CLOSED == 0 {
                return Poll::Ready(());
            }
            w.draining.register(cx);
            Poll::Pending
        })
        .await;
        held
    }
}

impl<T> Drop for Entered<'_, T> {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

impl<T> std::ops::Deref for Entered<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: inside the gate nobody holds it exclusively (see Gate).
        unsafe { &*self.gate.value.get() }
    }
}

impl<T> std::ops::Deref for Exclusive<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: see DerefMut.
        unsafe { &*self.gate.value.get() }
    }
}

impl<T> std::ops::DerefMut for Exclusive<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the gate is closed and empty: requests that race in see
        // CLOSED and back out without touching the value. An Exclusive
        // dropped before draining finished never reaches here.
        unsafe { &mut *self.gate.value.get() }
    }
}

impl<T> Drop for Exclusive<'_, T> {
    fn drop(&mut self) {
        let gate = self.gate;
        gate.state.fetch_and(!CLOSED, Ordering::Release);
        let (entering, owners) = {
            let mut w = gate.waits.lock().unwrap();
            w.owned = false;
            (w.entering.take(), w.owners.take())
        };
        drop(entering);
        drop(owners);
    }
}

/// Group commit of data syncs on one file: a request that needs its
/// completed writes durable joins the next sync to start; while one runs,
/// the requests that arrive meanwhile wait and then share one more. So
/// thirty-two concurrent copy-ups cost two or three fdatasyncs, not
/// thirty-two journal commits and cache flushes in a row.
///
/// A group made with `remember_failure` (every image file) fails every
/// sync after the first one that failed: through the page cache the kernel
/// may have dropped the dirty pages that sync could not write, and with
/// O_DIRECT the device's cache flush failed for writes it may have lost
/// (and the filesystem's extent changes with them); either way a later
/// fdatasync has nothing left to report, so an Ok from it would claim lost
/// writes durable. The device then fails every flush until it is
/// restarted, and the restart checks the image.
#[derive(Default)]
pub struct SyncGroup {
    state: Mutex<SyncState>,
    remember_failure: bool,
}

#[derive(Default)]
struct SyncState {
    /// Rounds started and finished (one in flight at a time).
    started: u64,
    finished: u64,
    /// The newest round that succeeded, and the error of the newest that failed.
    last_ok: u64,
    last_errno: i32,
    in_flight: bool,
    waiters: WaitList,
    /// A sync failed and the group remembers it: every later one fails.
    failed_for_good: bool,
}

enum SyncStep {
    Done(std::io::Result<()>),
    Start(u64),
}

impl SyncGroup {
    /// A group that fails every sync after one failed (see above) when
    /// `remember_failure`, else one where a later sync may succeed again.
    pub fn new(remember_failure: bool) -> SyncGroup {
        SyncGroup { remember_failure, ..Default::default() }
    }

    /// A sync failed and is remembered: every later one fails.
    pub fn failed(&self) -> bool {
        self.state.lock().unwrap().failed_for_good
    }

    /// Remember a failure met through another opening of the same file
    /// (the writeback it reported is this file's too).
    pub fn poison(&self) {
        let mut s = self.state.lock().unwrap();
        s.failed_for_good = true;
        s.last_errno = libc::EIO;
    }

    /// Make every write to `fd` completed before this call durable.
    pub async fn sync<I: super::Io>(&self, io: &I, fd: std::os::fd::RawFd) -> std::io::Result<()> {
        // A round already running may have started before our writes
        // completed: ours is the next one.
        let mine = self.state.lock().unwrap().started + 1;
        loop {
            let step = poll_fn(|cx| {
                let mut s = self.state.lock().unwrap();
                if s.finished >= mine {
                    // Any successful round from ours on covers our writes.
                    let result = if s.last_ok >= mine { Ok(()) } else { Err(std::io::Error::from_raw_os_error(s.last_errno)) };
                    return Poll::Ready(SyncStep::Done(result));
                }
                if s.failed_for_good {
                    return Poll::Ready(SyncStep::Done(Err(std::io::Error::from_raw_os_error(libc::EIO))));
                }
                if !s.in_flight {
                    s.in_flight = true;
                    s.started += 1;
                    return Poll::Ready(SyncStep::Start(s.started));
                }
                s.waiters.register(cx);
                Poll::Pending
            })
            .await;
            match step {
                SyncStep::Done(result) => return result,
                SyncStep::Start(round) => {
                    let result = io.sync_data(fd).await;
                    let woken = {
                        let mut s = self.state.lock().unwrap();
                        s.finished = round;
                        match &result {
                            Ok(()) => s.last_ok = round,
                            Err(e) => {
                                s.last_errno = e.raw_os_error().unwrap_or(libc::EIO);
                                s.failed_for_good |= self.remember_failure;
                            }
                        }
                        s.in_flight = false;
                        s.waiters.take()
                    };
                    drop(woken);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[test]
    fn exclusive_waits_for_requests_inside_and_holds_new_ones() {
        let gate = Arc::new(Gate::new(0u64));
        let inside = futures_lite::future::block_on(gate.enter());
        let swapped = Arc::new(AtomicBool::new(false));
        let (g2, s2) = (gate.clone(), swapped.clone());
        let holder = std::thread::spawn(move || {
            futures_lite::future::block_on(async {
                let mut ex = g2.exclusive().await;
                *ex += 1;
                s2.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            })
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!swapped.load(Ordering::SeqCst), "exclusive access while a request was inside");
        assert_eq!(*inside, 0);
        drop(inside);
        while !swapped.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // The gate is closed now: a new request waits until the holder is done.
        let seen = futures_lite::future::block_on(async { *gate.enter().await });
        assert_eq!(seen, 1);
        holder.join().unwrap();
        assert_eq!(gate.inside(), 0);
    }

    #[test]
    fn many_threads_and_swaps_never_overlap() {
        let gate = Arc::new(Gate::new((0u64, 0u64)));
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut readers = vec![];
        for _ in 0..4 {
            let (g, stop, reads) = (gate.clone(), stop.clone(), reads.clone());
            readers.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    futures_lite::future::block_on(async {
                        let v = g.enter().await;
                        let (a, b) = *v;
                        assert_eq!(a, b, "saw a half-done change");
                    });
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        // Swap until the readers have really run between the swaps.
        let mut swaps = 0u64;
        while swaps < 200 || reads.load(Ordering::Relaxed) < 10_000 {
            futures_lite::future::block_on(async {
                let mut ex = gate.exclusive().await;
                ex.0 += 1;
                std::hint::spin_loop();
                ex.1 += 1;
            });
            swaps += 1;
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
        readers.into_iter().for_each(|r| r.join().unwrap());
        let v = futures_lite::future::block_on(gate.enter());
        assert_eq!(*v, (swaps, swaps));
    }
}
