//! Writes during a fold (`fold.rs`) that reach the parent's file too, so
//! that a cluster the fold has copied is not copied again.
//!
//! Without it, a cluster written after its copy had to be copied again; a
//! hot set rewritten faster than a round copies it never shrank, and the
//! last round copied all of it with requests held (the bench's 64 MiB hot
//! set: 100 ms with no request served, three times the top's bytes moved).
//!
//! Per cluster, the fold's copy and the requests that change it take turns
//! (a *section*: writes, zeroes and discards share it, a copy holds it
//! alone, and a copy waiting keeps new ones out; a write overlapping one
//! inside waits for it, so that the two files take them in the same
//! order): a copy reads the top after every change that came before it,
//! and a write that comes after it lands in both files. What is not
//! carried over that way is marked *changed* before its section is left,
//! and the next round copies it again:
//! - a write to a cluster not copied yet (it may be new in the top);
//! - a write whose copy into the parent's file or into the top failed;
//! - zeroes and discards (never carried over; a copy forgets a cluster's
//!   mark before it reads).
//!
//! So once requests are held, the parent's file can differ from the top
//! only in the clusters marked changed (and the last round's, which the
//! fold copies then too).

use bitvec::vec::BitVec;
use std::collections::{BTreeSet, HashMap};
use std::future::poll_fn;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use crate::io::wait::WaitList;
use crate::layers::Layer;

use super::OnDrop;

pub(super) struct FoldMirror {
    /// The writable opening of the parent's file the fold copies into.
    pub into: Arc<Layer>,
    cluster: u64,
    state: Mutex<State>,
    /// Requests that changed the disk since the fold last asked.
    changes: AtomicU64,
    /// The fold will not finish (its future was dropped): nothing is
    /// carried any more and nobody waits for a section.
    abandoned: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Clusters copied (one bit per cluster of the disk).
    copied: BitVec,
    /// Where the parent's file holds copied clusters whose entries the
    /// copy has not linked yet (linked ones: `into`'s table).
    unlinked: HashMap<u64, u64>,
    /// Clusters to copy again: changed in the top and not carried over.
    changed: BTreeSet<u64>,
    /// Clusters inside a section.
    busy: HashMap<u64, Turns>,
}

/// Who holds one cluster's section, and who waits for it.
#[derive(Default)]
struct Turns {
    copying: bool,
    /// A copy waits: new writes wait behind it.
    copy_waits: bool,
    /// Byte ranges of the writes inside.
    writes: Vec<Range<u64>>,
    waiters: WaitList,
}

impl Turns {
    fn idle(&self) -> bool {
        !self.copying && !self.copy_waits && self.writes.is_empty()
    }
}

/// The section of a cluster held by the fold's copy.
pub(super) struct CopySection<'a> {
    mirror: &'a FoldMirror,
    c: u64,
}

/// The section of a cluster shared by a write.
pub(super) struct WriteSection<'a> {
    mirror: &'a FoldMirror,
    c: u64,
    /// None once the fold was abandoned: nothing was entered.
    range: Option<Range<u64>>,
}

impl Drop for CopySection<'_> {
    fn drop(&mut self) {
        self.mirror.leave(self.c, |t| t.copying = false);
    }
}

impl Drop for WriteSection<'_> {
    fn drop(&mut self) {
        let Some(range) = self.range.take() else { return };
        self.mirror.leave(self.c, move |t| {
            if let Some(i) = t.writes.iter().position(|r| *r == range) {
                t.writes.swap_remove(i);
            }
        });
    }
}

impl FoldMirror {
    pub fn new(into: Arc<Layer>, disk_size: u64, cluster: u64) -> FoldMirror {
        let state = State { copied: BitVec::repeat(false, disk_size.div_ceil(cluster) as usize), ..Default::default() };
        FoldMirror { into, cluster, state: Mutex::new(state), changes: AtomicU64::new(0), abandoned: AtomicBool::new(false) }
    }

    /// The fold stopped without finishing: writes are no longer carried
    /// (the parent's file is not the disk's any more, and a later merge
    /// copies everything again), and those waiting for a section go on.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        let woken: Vec<_> = self.state.lock().unwrap().busy.values_mut().map(|t| t.waiters.take()).collect();
        drop(woken);
    }

    pub fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    /// Hold cluster `c` alone for a copy, once the writes inside have left.
    pub async fn copy_section(&self, c: u64) -> CopySection<'_> {
        // A copy dropped while it waits takes its wait back: writes that
        // queued behind it would otherwise wait for good.
        let waiting = OnDrop::new(|| self.leave(c, |t| t.copy_waits = false));
        poll_fn(|cx| {
            let mut state = self.state.lock().unwrap();
            let t = state.busy.entry(c).or_default();
            if t.copying || !t.writes.is_empty() {
                t.copy_waits = true;
                t.waiters.register(cx);
                Poll::Pending
            } else {
                t.copying = true;
                t.copy_waits = false;
                Poll::Ready(())
            }
        })
        .await;
        waiting.defuse();
        CopySection { mirror: self, c }
    }

    /// Share the sections of every cluster `range` (disk bytes) touches,
    /// in ascending order (see `write_section`).
    pub async fn write_sections(&self, clusters: Range<u64>, range: Range<u64>) -> Vec<WriteSection<'_>> {
        let mut sections = Vec::with_capacity((clusters.end - clusters.start) as usize);
        for c in clusters {
            sections.push(self.write_section(c, range.clone()).await);
        }
        sections
    }

    /// Share cluster `c`'s section for a change of `range` (disk bytes),
    /// unless a copy holds it or waits for it, or a change inside overlaps
    /// `range`.
    async fn write_section(&self, c: u64, range: Range<u64>) -> WriteSection<'_> {
        let entered = poll_fn(|cx| {
            let mut state = self.state.lock().unwrap();
            if self.abandoned() {
                // No copy will come: nothing to take turns with.
                return Poll::Ready(false);
            }
            let t = state.busy.entry(c).or_default();
            if t.copying || t.copy_waits || t.writes.iter().any(|r| r.start < range.end && range.start < r.end) {
                t.waiters.register(cx);
                return Poll::Pending;
            }
            t.writes.push(range.clone());
            Poll::Ready(true)
        })
        .await;
        WriteSection { mirror: self, c, range: entered.then_some(range) }
    }

    fn leave(&self, c: u64, f: impl FnOnce(&mut Turns)) {
        let woken = {
            let mut state = self.state.lock().unwrap();
            let Some(t) = state.busy.get_mut(&c) else { return };
            f(t);
            let woken = t.waiters.take();
            if t.idle() {
                state.busy.remove(&c);
            }
            woken
        };
        drop(woken);
    }

    /// A copy of the section's cluster is about to read the top: every
    /// change so far is in what it reads.
    pub fn copy_starts(&self, section: &CopySection<'_>) {
        self.state.lock().unwrap().changed.remove(&section.c);
    }

    /// The section's cluster is copied to `to` in the parent's file: writes
    /// from now on are carried there.
    pub fn copied(&self, section: &CopySection<'_>, to: u64) {
        let mut state = self.state.lock().unwrap();
        state.copied.set(section.c as usize, true);
        state.unlinked.insert(section.c, to);
    }

    /// The copy linked these clusters in `into`'s table.
    pub fn linked(&self, clusters: impl Iterator<Item = u64>) {
        let mut state = self.state.lock().unwrap();
        for c in clusters {
            state.unlinked.remove(&c);
        }
    }

    /// Where the parent's file holds cluster `c`, if copied (asked inside
    /// its section).
    pub fn placed(&self, c: u64) -> Option<u64> {
        let state = self.state.lock().unwrap();
        if self.abandoned() || !state.copied.get(c as usize).is_some_and(|b| *b) {
            return None;
        }
        state.unlinked.get(&c).copied().or_else(|| self.into.lookup(c, self.cluster))
    }

    /// Clusters whose change was not carried into the parent's file: the
    /// next round copies them again, and writes to them go to the top
    /// alone until then.
    pub fn changed(&self, clusters: Range<u64>) {
        let mut state = self.state.lock().unwrap();
        for c in clusters {
            if let Some(mut bit) = state.copied.get_mut(c as usize) {
                *bit = false;
            }
            state.changed.insert(c);
        }
    }

    /// A request changed the disk (carried over or not).
    pub fn note_change(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether requests changed the disk since the last call: the fold
    /// then copies with fewer clusters in flight, to leave them the disk.
    pub fn requests_went_on(&self) -> bool {
        self.changes.swap(0, Ordering::Relaxed) > 0
    }

    /// Take the changed clusters, ascending.
    pub fn take_changed(&self) -> Vec<u64> {
        std::mem::take(&mut self.state.lock().unwrap().changed).into_iter().collect()
    }
}
