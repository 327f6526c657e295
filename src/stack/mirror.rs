//! Writes during a fold, carried into the parent's file for the clusters
//! the fold has copied already, so that they need no second copy: a hot
//! set rewritten faster than a round copies it would otherwise never let
//! the rounds shrink, and the last one (requests held) would copy it all.
//!
//! Per cluster, the fold's copy and every write's mirror run one at a time
//! (a section), and a mirror re-reads the written bytes from the top inside
//! its section, after its own write to the top completed: whichever section
//! runs last leaves the parent's file with the top's newest bytes. A write
//! to a cluster not copied yet, or whose mirror failed, is marked for the
//! next round instead.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use crate::io::wait::WaitList;
use crate::layers::Layer;
use crate::tracker::Tracker;

pub(super) struct Mirror {
    /// The writable opening of the parent's file the fold copies into.
    pub into: Arc<Layer>,
    /// Clusters changed and not carried over: the next round copies them.
    pub tracker: Arc<Tracker>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Copied clusters and where `into` holds them.
    at: HashMap<u64, u64>,
    /// Clusters inside a section, and who waits for them.
    busy: HashMap<u64, WaitList>,
}

/// A cluster held for a copy or a mirror; dropping it lets the next in.
pub(super) struct Section<'a> {
    mirror: &'a Mirror,
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

impl Mirror {
    pub fn new(into: Arc<Layer>, tracker: Arc<Tracker>) -> Mirror {
        Mirror { into, tracker, state: Mutex::default() }
    }

    /// Wait until no other section holds cluster `c`, then hold it.
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

    /// Cluster `c` is copied to `to` in the parent's file (called inside
    /// its section, once the copy's write completed).
    pub fn copied(&self, section: &Section<'_>, to: u64) {
        self.state.lock().unwrap().at.insert(section.c, to);
    }

    /// Where the parent's file holds copied cluster `c` (asked inside its
    /// section).
    pub fn at(&self, c: u64) -> Option<u64> {
        self.state.lock().unwrap().at.get(&c).copied()
    }
}
