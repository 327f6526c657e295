//! Writes during a fold (`fold.rs`) that reach the parent's file too, so
//! that a cluster the fold has copied is never copied again.
//!
//! Without it, a cluster written after its copy had to be copied again; a
//! hot set rewritten faster than a round copies it never shrank, and the
//! last round copied all of it with requests held (the bench's 64 MiB hot
//! set: 100 ms with no request served, three times the top's bytes moved).
//!
//! Per cluster, the fold's copy and each write run one at a time (a
//! *section*): a copy reads the top after every write that came before it,
//! and a write that comes after it lands in both files. What is not carried
//! that way is marked *changed*, and the next round copies it again:
//! - a write to a cluster not copied yet (it may be new in the top);
//! - a write whose copy into the parent's file or into the top failed;
//! - zeroes and discards (they take no section: their mark comes after
//!   they completed, and a copy forgets a cluster's mark before it reads).
//!
//! So once requests are held, the changed clusters are the only ones where
//! the parent's file may differ from the top.

use std::collections::{BTreeSet, HashMap};
use std::future::poll_fn;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use crate::io::wait::WaitList;
use crate::layers::Layer;

pub(super) struct FoldMirror {
    /// The writable opening of the parent's file the fold copies into.
    pub into: Arc<Layer>,
    state: Mutex<State>,
    /// Requests that changed the disk since the fold last asked.
    changes: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Clusters copied, and where the parent's file holds each.
    placed: HashMap<u64, u64>,
    /// Clusters to copy again: changed in the top and not carried over.
    changed: BTreeSet<u64>,
    /// Clusters inside a section, and who waits for them.
    busy: HashMap<u64, WaitList>,
}

/// A cluster held by a copy or a write; dropping it lets the next one in.
pub(super) struct Section<'a> {
    mirror: &'a FoldMirror,
    c: u64,
}

impl Drop for Section<'_> {
    fn drop(&mut self) {
        let waiters = self.mirror.state.lock().unwrap().busy.remove(&self.c);
        if let Some(mut w) = waiters {
            drop(w.take());
        }
    }
}

impl FoldMirror {
    pub fn new(into: Arc<Layer>) -> FoldMirror {
        FoldMirror { into, state: Mutex::default(), changes: AtomicU64::new(0) }
    }

    /// Wait until no other copy or write holds cluster `c`, then hold it.
    /// A caller holding several takes them in ascending order.
    pub async fn section(&self, c: u64) -> Section<'_> {
        poll_fn(|cx| {
            let mut state = self.state.lock().unwrap();
            match state.busy.get_mut(&c) {
                Some(waiters) => {
                    waiters.register(cx);
                    Poll::Pending
                }
                None => {
                    state.busy.insert(c, WaitList::default());
                    Poll::Ready(())
                }
            }
        })
        .await;
        Section { mirror: self, c }
    }

    /// A copy of the section's cluster is about to read the top: every
    /// change so far is in what it reads.
    pub fn copy_starts(&self, section: &Section<'_>) {
        self.state.lock().unwrap().changed.remove(&section.c);
    }

    /// The section's cluster is copied to `to` in the parent's file: writes
    /// from now on are carried there.
    pub fn copied(&self, section: &Section<'_>, to: u64) {
        self.state.lock().unwrap().placed.insert(section.c, to);
    }

    /// Where the parent's file holds cluster `c`, if copied (asked inside
    /// its section).
    pub fn placed(&self, c: u64) -> Option<u64> {
        self.state.lock().unwrap().placed.get(&c).copied()
    }

    /// Clusters whose change was not carried into the parent's file: the
    /// next round copies them again, and writes to them go to the top
    /// alone until then.
    pub fn changed(&self, clusters: Range<u64>) {
        let mut state = self.state.lock().unwrap();
        for c in clusters {
            state.placed.remove(&c);
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
