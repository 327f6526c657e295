//! A flat file as a layer: it holds every cluster it covers, at the same
//! offset. Bytes past its end read as zeros.

use crate::error::Result;
use crate::io::{wait::SyncGroup, ImageFile, Io};

pub struct RawLayer {
    file: ImageFile,
    len: u64,
    /// Data syncs of the file; through the page cache, a failed one is
    /// remembered for good (see `SyncGroup`).
    syncs: SyncGroup,
}

impl RawLayer {
    pub fn open<I: crate::io::Io>(io: &I, file: ImageFile) -> Result<RawLayer> {
        let len = file.len_in(io)?;
        let syncs = SyncGroup::new(true);
        Ok(RawLayer { file, len, syncs })
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
    pub fn size(&self) -> u64 {
        self.len
    }
    #[inline]
    pub fn lookup(&self, c: u64, cluster: u64) -> Option<u64> {
        let offset = c * cluster;
        (offset < self.len).then_some(offset)
    }
}
