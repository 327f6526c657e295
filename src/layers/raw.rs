//! A flat file as a layer: it holds every cluster it covers, at the same
//! offset. Bytes past its end read as zeros.

use crate::error::Result;
use crate::io::ImageFile;

pub struct RawLayer {
    file: ImageFile,
    len: u64,
}

impl RawLayer {
    pub fn open(file: ImageFile) -> Result<RawLayer> {
        let len = file.len()?;
        Ok(RawLayer { file, len })
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
