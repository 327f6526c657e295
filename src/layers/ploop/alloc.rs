//! Cluster allocation at the end of the file, from space grown ahead.
//!
//! The file grows in steps (an fallocate and a data sync, both on the
//! caller's ring), each made durable before any BAT entry can point into
//! it, so an entry never points past EOF after a crash. The next step
//! starts when half of the current one is left, by the request whose
//! reservation crossed that mark; the others go on taking clusters from
//! what is left and wait only if it runs out.

use std::future::poll_fn;
use std::task::Poll;

use crate::error::{Error, Result};
use crate::io::Io;

use super::PloopLayer;

/// A step is an eighth of the file, at least this many clusters and
/// `PREALLOC_MIN` bytes, at most `PREALLOC_MAX`: each step costs an
/// fallocate and a sync (and ext4's fallocate drains the file's in-flight
/// direct I/O), so steps grow with the image. Unused space is given back on
/// close, or trimmed on the next open after a crash.
const PREALLOC_CLUSTERS: u64 = 16;
const PREALLOC_MIN: u64 = 64 << 20;
const PREALLOC_MAX: u64 = 1 << 30;

/// A planned growth of the file to `wanted` bytes (at least `needed`).
struct Grow {
    from: u64,
    needed: u64,
    wanted: u64,
}

enum Step {
    Reserved(u64, Option<Grow>),
    MustGrow(Grow),
}

impl PloopLayer {
    /// Reserve a fresh cluster at the end of the file. It reads as zeros and
    /// lies inside the file size that is already durable.
    pub async fn reserve_cluster<I: Io>(&self, io: &I) -> Result<u64> {
        loop {
            let step = poll_fn(|cx| {
                let mut meta = self.meta.lock().unwrap();
                let offset = meta.next_free;
                if meta.header.bat_value(offset).is_none() {
                    let path = self.file.path.display();
                    return Poll::Ready(Err(Error::new(libc::EFBIG, format!("{path}: image too large for its BAT"))));
                }
                let end = offset + self.cluster;
                let max_end = meta.header.data_off_bytes() + self.table.entries() * self.cluster;
                let step = (meta.prealloc_end / 8).clamp(PREALLOC_MIN, PREALLOC_MAX).max(PREALLOC_CLUSTERS * self.cluster);
                if end <= meta.prealloc_end {
                    meta.next_free = end;
                    let from = meta.prealloc_end;
                    let early = !meta.growing && from < max_end && from - end < step / 2;
                    let grow = early.then(|| {
                        meta.growing = true;
                        Grow { from, needed: from + self.cluster, wanted: (from + step).min(max_end) }
                    });
                    return Poll::Ready(Ok(Step::Reserved(offset, grow)));
                }
                if meta.growing {
                    meta.grow_waiters.register(cx);
                    return Poll::Pending;
                }
                meta.growing = true;
                let from = meta.prealloc_end.max(offset);
                Poll::Ready(Ok(Step::MustGrow(Grow { from, needed: end, wanted: end.max((from + step).min(max_end)) })))
            })
            .await?;
            match step {
                Step::Reserved(offset, None) => return Ok(offset),
                Step::Reserved(offset, Some(grow)) => {
                    // Our cluster is durable already; a failed early step is
                    // retried by a later reservation.
                    if let Err(e) = self.grow(io, grow).await {
                        tracing::warn!("{}: growing the image ahead: {e}", self.file.path.display());
                    }
                    return Ok(offset);
                }
                Step::MustGrow(grow) => self.grow(io, grow).await?,
            }
        }
    }

    /// Grow the file by a step now, before any request needs the space: a
    /// snapshot's new top does so before it is swapped in, so that its
    /// first copy-ups do not wait for the file to grow while the device is
    /// at its busiest.
    pub async fn grow_ahead<I: Io>(&self, io: &I) -> Result<()> {
        let grow = {
            let mut meta = self.meta.lock().unwrap();
            let max_end = meta.header.data_off_bytes() + self.table.entries() * self.cluster;
            let from = meta.prealloc_end;
            if meta.growing || from >= max_end {
                return Ok(());
            }
            let step = (from / 8).clamp(PREALLOC_MIN, PREALLOC_MAX).max(PREALLOC_CLUSTERS * self.cluster);
            meta.growing = true;
            Grow { from, needed: from + self.cluster, wanted: (from + step).min(max_end) }
        };
        self.grow(io, grow).await
    }

    /// Grow the file (durably) and publish the new end; wakes the waiters
    /// whatever the outcome.
    async fn grow<I: Io>(&self, io: &I, g: Grow) -> Result<()> {
        let result = self.grow_file(io, &g).await;
        let woken = {
            let mut meta = self.meta.lock().unwrap();
            if let Ok(end) = result {
                meta.prealloc_end = meta.prealloc_end.max(end);
            }
            meta.growing = false;
            meta.grow_waiters.take()
        };
        drop(woken);
        result.map(drop)
    }

    async fn grow_file<I: Io>(&self, io: &I, g: &Grow) -> Result<u64> {
        let path = self.file.path.display();
        let what = format_args!("{path}: growing the image");
        let grown = match self.allocate_range(io, g.from, g.wanted).await {
            // Short of space for a whole step: take just what is needed.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && g.wanted > g.needed => {
                self.allocate_range(io, g.from, g.needed).await.map(|()| g.needed)
            }
            other => other.map(|()| g.wanted),
        }
        .map_err(|e| Error::io(e, what))?;
        self.sync_data(io).await.map_err(|e| Error::io(e, format_args!("{path}: growing the image")))?;
        Ok(grown)
    }

    /// Space `[from, to)` that reads as zeros: fallocate, or a larger file
    /// size where the filesystem cannot preallocate.
    async fn allocate_range<I: Io>(&self, io: &I, from: u64, to: u64) -> std::io::Result<()> {
        let fd = self.file.fd();
        match io.allocate(fd, from, to - from).await {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => io.set_len(fd, to).await,
            other => other,
        }
    }
}
