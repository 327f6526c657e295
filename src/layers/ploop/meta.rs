//! BAT changes and their crash-safe write-back: linking an entry in memory,
//! group-committing the chunk writes that carry it (one write in flight per
//! image, the requests that finish meanwhile share the next one), and
//! rolling entries back when such a write fails.

use std::future::poll_fn;
use std::ops::Range;
use std::task::Poll;

use crate::error::{Error, Result};
use crate::io::{join_all, AlignedBuf, Io};
use crate::layers::ploop::header::HEADER_SIZE;

use super::links::{Link, LinkLog};
use super::PloopLayer;

/// A failed header/BAT write, with the clusters whose new entries were
/// rolled back because of it (the stack re-resolves them).
#[derive(Debug)]
pub struct MetaError {
    pub error: Error,
    pub rolled_back: Vec<u64>,
}

impl From<Error> for MetaError {
    fn from(error: Error) -> Self {
        MetaError { error, rolled_back: vec![] }
    }
}

impl PloopLayer {
    /// Point virtual cluster `c` at `offset`, in memory (so I/O uses it at
    /// once), and queue the BAT entry; returns its generation. The entry
    /// reaches the disk with `write_metadata`, which the request that
    /// needed it waits for before it completes, so a killed daemon loses
    /// nothing it acknowledged. Concurrent allocations share chunk writes.
    /// The caller guarantees the cluster already holds the disk's current
    /// bytes durably (fresh zeros in grown-ahead space, or a synced
    /// copy-up), so the entry may reach the disk at any moment without
    /// exposing wrong data after a power loss.
    pub fn link(&self, c: u64, offset: u64) -> u64 {
        let value = (offset / self.bat_unit) as u32;
        let at = HEADER_SIZE + 4 * c as usize;
        let mut meta = self.meta.lock().unwrap();
        let previous = self.table.set(c, value);
        meta.dirty.insert(at / self.file.block_size as usize);
        meta.published += 1;
        let generation = meta.published;
        meta.pending.push((generation, c, previous));
        generation
    }

    /// Whether copy-ups may be linked through the link log (see `links`).
    pub fn defers_links(&self) -> bool {
        self.links.is_some()
    }

    /// Record cluster `c`'s new entry (`offset`, a copy written but not
    /// synced) in the link log; returns the record's slot for
    /// `link_logged`. None without a log, or when the record could not be
    /// written: then the caller syncs the copy and links it as usual.
    pub async fn log_link<I: Io>(&self, io: &I, c: u64, offset: u64) -> Option<u32> {
        let log = self.links.as_ref()?;
        {
            let meta = self.meta.lock().unwrap();
            if !meta.disk_in_use || self.sync_failed() {
                // A replay would refuse the record: sync this one, whose
                // table write carries the mark. After a failed sync the log
                // stays empty (see `sync_data`).
                return None;
            }
            let at = (HEADER_SIZE + 4 * c as usize) / self.file.block_size as usize;
            if meta.stale_on_disk.contains(&at) && !crate::mutant::off("stale-block-log") {
                // The file may still name a cluster here that a failed
                // write's rollback took back: a replay would keep that one
                // and drop this record. Link it through the table.
                return None;
            }
        }
        let link = Link { cluster: c, value: (offset / self.bat_unit) as u32 };
        match log.append(io, link).await {
            // A sync that failed while the record was written emptied the
            // log, maybe before the record landed: empty it again, and
            // let the caller's sync fail this copy-up.
            Ok(_) if self.sync_failed() => {
                empty_after_failed_sync(io, log).await;
                None
            }
            Ok(slot) => Some(slot),
            Err(e) => {
                tracing::warn!(log = %log.path.display(), "writing the link log failed ({e}); syncing the copy instead");
                None
            }
        }
    }

    /// Point cluster `c` at `offset` in memory, its record in the link log
    /// at `slot`: BAT writes leave the entry out until `settle` has synced
    /// its copy. The cluster had no entry (the caller holds its claim).
    pub fn link_logged(&self, c: u64, offset: u64, slot: u32) {
        let value = (offset / self.bat_unit) as u32;
        let mut meta = self.meta.lock().unwrap();
        // Pending before it can be found (see `link_pending`).
        meta.unsynced.insert(c, slot);
        let previous = self.table.set(c, value);
        debug_assert_eq!(previous, 0, "a logged link replaced an entry");
    }

    /// Whether cluster `c`'s link lives in the link log only: its copy must
    /// keep data (a record over a hole counts as released at replay), so
    /// zeroes and discards write zeros there instead of punching.
    pub fn link_pending(&self, c: u64) -> bool {
        let meta = self.meta.lock().unwrap();
        meta.unsynced.contains_key(&c) || meta.settling.values().any(|&(_, x)| x == c)
    }

    /// Whether entries of the link log wait for a sync or a BAT write.
    pub fn has_logged_links(&self) -> bool {
        let meta = self.meta.lock().unwrap();
        !meta.unsynced.is_empty() || !meta.settling.is_empty()
    }

    /// Make the logged links ordinary entries: sync their copies (each was
    /// written before it was logged), let the BAT writes carry them, write
    /// every dirty chunk, sync, and release their records. Returns whether
    /// it ran, which is then a flush of everything completed before it.
    pub async fn settle<I: Io>(&self, io: &I) -> Result<bool> {
        let Some(log) = &self.links else { return Ok(false) };
        let path = self.file.path.display();
        let taken: Vec<u64> = self.meta.lock().unwrap().unsynced.keys().copied().collect();
        if !taken.is_empty() {
            if !crate::mutant::off("link-settle-sync") {
                self.sync_data(io).await.map_err(|e| Error::io(e, format_args!("{path}: syncing copied clusters")))?;
            }
            let block = self.file.block_size as usize;
            let mut meta = self.meta.lock().unwrap();
            for c in taken {
                // Another settle may have taken it meanwhile.
                if let Some(slot) = meta.unsynced.remove(&c) {
                    meta.settles += 1;
                    let n = meta.settles;
                    meta.settling.insert(n, (slot, c));
                    meta.dirty.insert((HEADER_SIZE + 4 * c as usize) / block);
                }
            }
        }
        let settling: Vec<u64> = self.meta.lock().unwrap().settling.keys().copied().collect();
        if settling.is_empty() {
            return Ok(false);
        }
        self.write_all_meta(io, true).await.map_err(|e| e.error)?;
        let slots: Vec<u32> = {
            let mut meta = self.meta.lock().unwrap();
            settling.iter().filter_map(|n| meta.settling.remove(n)).map(|(slot, _)| slot).collect()
        };
        log.release(&slots);
        Ok(true)
    }

    /// The oldest generation that may still be unwritten: a request reads
    /// this before it looks at the BAT, so every entry it can find that is
    /// not yet on disk has a generation at or above it.
    pub fn first_unwritten(&self) -> u64 {
        self.meta.lock().unwrap().written + 1
    }

    /// The newest linked generation.
    pub fn published(&self) -> u64 {
        self.meta.lock().unwrap().published
    }

    /// Make sure every entry linked in generations `lo..=hi` (the window a
    /// request may depend on) is written, not synced. A request that finds
    /// a write in flight waits for it and then, if its generations are still
    /// unwritten, writes whatever is pending: requests that complete
    /// together share the writes. If an entry of that window for one of
    /// the request's `clusters` was rolled back after a failed write (the
    /// request's own, or one it found linked and relied on), the request
    /// fails: its data may sit in an unlinked cluster. Entries of other
    /// clusters that failed do not concern it.
    pub async fn write_metadata<I: Io>(&self, io: &I, lo: u64, hi: u64, clusters: Range<u64>) -> std::result::Result<(), MetaError> {
        loop {
            let must_write = poll_fn(|cx| {
                let mut meta = self.meta.lock().unwrap();
                if meta.failed.iter().any(|&(g, c)| lo <= g && g <= hi && clusters.contains(&c)) {
                    return Poll::Ready(Err(MetaError::from(Error::new(
                        libc::EIO,
                        format!("{}: writing the BAT failed", self.file.path.display()),
                    ))));
                }
                if meta.written >= hi {
                    return Poll::Ready(Ok(false));
                }
                if meta.writing {
                    meta.write_waiters.register(cx);
                    return Poll::Pending;
                }
                meta.writing = true;
                Poll::Ready(Ok(true))
            })
            .await?;
            if !must_write {
                return Ok(());
            }
            // On success the next turn finds the window written.
            self.write_round(io, false).await?;
        }
    }

    /// Write every dirty chunk (and sync if asked), waiting for a write in
    /// flight first.
    pub(super) async fn write_all_meta<I: Io>(&self, io: &I, sync: bool) -> std::result::Result<(), MetaError> {
        poll_fn(|cx| {
            let mut meta = self.meta.lock().unwrap();
            if meta.writing {
                meta.write_waiters.register(cx);
                return Poll::Pending;
            }
            meta.writing = true;
            Poll::Ready(())
        })
        .await;
        self.write_round(io, sync).await
    }

    /// One metadata write: the dirty chunks of header+BAT, then a sync if
    /// asked. The caller set `writing`; this clears it and wakes the
    /// waiters. On failure the entries it carried for the first time are
    /// undone, in memory and in the on-disk image, and reported.
    async fn write_round<I: Io>(&self, io: &I, sync: bool) -> std::result::Result<(), MetaError> {
        let block = self.file.block_size as usize;
        let (snapshot, chunks, bufs, head_mark): (u64, Vec<usize>, Vec<AlignedBuf>, Option<bool>) = {
            let mut meta = self.meta.lock().unwrap();
            let head_mark = meta.dirty.contains(&0).then_some(meta.header.in_use == super::header::IN_USE);
            let taken = std::mem::take(&mut meta.dirty);
            let (chunks, bufs) = taken
                .into_iter()
                .map(|i| {
                    let mut buf = AlignedBuf::zeroed(block);
                    self.table.bytes_at(&meta.head, &meta.tail, i * block, &mut buf);
                    mask_unsynced(&meta.unsynced, i * block, &mut buf);
                    (i, buf)
                })
                .unzip();
            (meta.published, chunks, bufs, head_mark)
        };
        let fd = self.file.fd();
        let writes = chunks.iter().zip(&bufs).map(|(&i, b)| io.write_at(fd, b, (i * block) as u64)).collect();
        let mut result = join_all(writes).await.into_iter().collect::<std::io::Result<Vec<()>>>().map(drop);
        if result.is_ok() && sync {
            result = self.sync_data(io).await;
        }
        let (outcome, woken) = {
            let mut meta = self.meta.lock().unwrap();
            let outcome = match result {
                Ok(()) => {
                    if let Some(marked) = head_mark {
                        meta.disk_in_use = marked;
                    }
                    for i in &chunks {
                        meta.stale_on_disk.remove(i);
                    }
                    meta.written = meta.written.max(snapshot);
                    meta.pending.retain(|&(g, _, _)| g > snapshot);
                    Ok(())
                }
                Err(e) => {
                    if head_mark.is_some() {
                        // Block 0 may or may not have landed.
                        meta.disk_in_use = false;
                    }
                    meta.stale_on_disk.extend(chunks.iter().copied());
                    meta.dirty.extend(chunks);
                    let mut rolled_back = vec![];
                    let undo: Vec<(u64, u64, u32)> =
                        meta.pending.iter().copied().filter(|&(g, _, _)| g <= snapshot).collect();
                    for &(g, c, previous) in undo.iter().rev() {
                        let at = HEADER_SIZE + 4 * c as usize;
                        self.table.set(c, previous);
                        meta.dirty.insert(at / block);
                        meta.failed.push((g, c));
                        rolled_back.push(c);
                    }
                    meta.pending.retain(|&(g, _, _)| g > snapshot);
                    meta.written = meta.written.max(snapshot);
                    let error = Error::io(e, format_args!("{}: writing the BAT", self.file.path.display()));
                    Err(MetaError { error, rolled_back })
                }
            };
            meta.writing = false;
            (outcome, meta.write_waiters.take())
        };
        drop(woken);
        outcome
    }

    /// A flush: every acknowledged write has its data and its BAT entries
    /// written already, so one fdatasync makes them all durable (with
    /// logged links, `settle` syncs their copies, writes them, and syncs
    /// again instead). Chunks
    /// still dirty (entries of requests in flight, or entries rolled back
    /// after a failed write, whose old values must replace whatever that
    /// write left on disk) are written first, so that nothing a session
    /// stopped showing can come back after a crash.
    ///
    /// A BAT write still in flight is waited for first: its sync must not
    /// run before the write landed (a merge flushes to make the entries it
    /// found linked durable before it drops their parent), and if it fails,
    /// the chunks it rolled back are dirty again and written here.
    pub async fn flush<I: Io>(&self, io: &I) -> Result<()> {
        if self.settle(io).await? {
            return Ok(());
        }
        self.write_dirty_meta(io).await.map_err(|e| e.error)?;
        self.sync_data(io).await.map_err(|e| Error::io(e, format_args!("{}: flushing", self.file.path.display())))
    }

    /// Wait for a metadata write in flight, then write the chunks still
    /// dirty, if any (no sync). Afterwards every entry linked before this
    /// call is written or was rolled back (and reported, if this call's
    /// own write rolled it back).
    pub async fn write_dirty_meta<I: Io>(&self, io: &I) -> std::result::Result<(), MetaError> {
        let must_write = poll_fn(|cx| {
            let mut meta = self.meta.lock().unwrap();
            if meta.writing {
                meta.write_waiters.register(cx);
                return Poll::Pending;
            }
            if meta.dirty.is_empty() {
                return Poll::Ready(false);
            }
            meta.writing = true;
            Poll::Ready(true)
        })
        .await;
        if must_write {
            self.write_round(io, false).await?;
        }
        Ok(())
    }

    /// Make the writes to the file completed so far durable, sharing the
    /// fdatasync with other requests that need one at the same time.
    pub async fn sync_data<I: Io>(&self, io: &I) -> std::io::Result<()> {
        let result = self.syncs.sync(io, self.file.fd()).await;
        if let (Err(_), Some(log)) = (&result, &self.links) {
            // Logged copies may never reach the disk now (their pages
            // dropped): a restart must not link them. No flush succeeded
            // since they were acknowledged, and none will (`SyncGroup`).
            empty_after_failed_sync(io, log).await;
        }
        result
    }
    /// A sync of the file failed (see `SyncGroup`).
    pub fn sync_failed(&self) -> bool {
        self.syncs.failed()
    }
    pub fn poison_syncs(&self) {
        self.syncs.poison()
    }
}

/// Empty `log` for good after a failed sync of its image (see `sync_data`).
async fn empty_after_failed_sync<I: Io>(io: &I, log: &LinkLog) {
    if let Err(e) = log.reset(io).await {
        tracing::warn!(log = %log.path.display(), "emptying the link log after a failed sync: {e}");
    }
}

/// Put the on-disk value (none) in place of every entry of `unsynced` that
/// lies in the metadata block starting at byte `at`.
fn mask_unsynced(unsynced: &std::collections::BTreeMap<u64, u32>, at: usize, buf: &mut [u8]) {
    if unsynced.is_empty() || crate::mutant::off("link-mask") {
        return;
    }
    let first = at.saturating_sub(HEADER_SIZE).div_ceil(4) as u64;
    let end = (at + buf.len()).saturating_sub(HEADER_SIZE) / 4;
    for &c in unsynced.range(first..end as u64).map(|(c, _)| c) {
        let pos = HEADER_SIZE + 4 * c as usize - at;
        buf[pos..pos + 4].fill(0);
    }
}
