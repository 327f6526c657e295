//! A flat file as a layer: it holds every cluster it covers, at the same
//! offset. Bytes past its end read as zeros.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::io::{wait::SyncGroup, ImageFile, Io};

pub struct RawLayer {
    file: ImageFile,
    /// Grows (never shrinks) when a raw top is grown online.
    len: AtomicU64,
    /// Data syncs of the file; through the page cache, a failed one is
    /// remembered for good (see `SyncGroup`).
    syncs: SyncGroup,
}

impl RawLayer {
    pub fn open<I: crate::io::Io>(io: &I, file: ImageFile) -> Result<RawLayer> {
        let len = AtomicU64::new(file.len_in(io)?);
        let syncs = SyncGroup::new(true);
        Ok(RawLayer { file, len, syncs })
    }
    /// Extend the file to `new_size` (a hole: it reads as zeros, as the
    /// bytes past its end did), durably, before the layer shows the new
    /// size. The caller holds requests. Returns the old size.
    pub async fn grow<I: Io>(&self, io: &I, new_size: u64) -> Result<u64> {
        let old = self.size();
        let name = self.file.path.display().to_string();
        if !self.file.writable {
            return Err(Error::invalid(format!("{name}: opened read-only, so it cannot grow")));
        }
        let stat = io.fstat(self.file.fd()).map_err(|e| Error::io(e, &name))?;
        if stat.kind != crate::io::FileKind::File {
            return Err(Error::unsupported(format!("{name}: a block device, not a file: its size is the device's own, so the disk cannot grow")));
        }
        if new_size > old {
            // A sync that fails after the extension leaves the file longer
            // than the disk (harmless: the layer keeps its old length, and
            // a reopen shows zeros there) and the layer's syncs failed for
            // good, as any failed writeback does.
            io.set_len(self.file.fd(), new_size).await.map_err(|e| Error::io(e, format_args!("{name}: growing the raw file")))?;
            self.sync_data(io).await.map_err(|e| Error::io(e, format_args!("{name}: syncing the grown raw file")))?;
            self.len.store(new_size, Ordering::Release);
        }
        Ok(old)
    }
    /// Make the writes to the file completed so far durable.
    pub async fn sync_data<I: Io>(&self, io: &I) -> std::io::Result<()> {
        self.syncs.sync(io, self.file.fd()).await
    }
    /// A sync of the file failed (see `SyncGroup`).
    pub fn sync_failed(&self) -> bool {
        self.syncs.failed()
    }
    pub fn poison_syncs(&self) {
        self.syncs.poison()
    }
    pub fn file(&self) -> &ImageFile {
        &self.file
    }
    pub fn into_file(self) -> ImageFile {
        self.file
    }
    pub fn size(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    #[inline]
    pub fn lookup(&self, c: u64, cluster: u64) -> Option<u64> {
        let offset = c * cluster;
        (offset < self.len.load(Ordering::Relaxed)).then_some(offset)
    }
}
