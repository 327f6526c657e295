//! A QCOW2 image (with its own backing chain) as the bottom layer of a
//! stack: read-only, it holds every cluster below its virtual size, like a
//! raw base, but its bytes come through its tables (inflated, zeroed, from
//! its backing files) instead of from the file at the same offset.
//!
//! The image is read through the page cache: compressed clusters lie at
//! byte offsets and a cluster may be as small as 512 bytes, which O_DIRECT
//! cannot read in place; a template shared by many containers is then
//! cached once for all of them.

use std::path::Path;

use super::image::{CacheStats, Qcow2Image};
use crate::error::{Error, Result};
use crate::io::{ImageFile, Io};

pub struct Qcow2Layer {
    /// The stack's opening: its lock, identity and transfer alignment.
    file: ImageFile,
    image: Qcow2Image,
}

impl Qcow2Layer {
    /// Open the image behind `file` (opened read-only by the stack) and its
    /// backing chain. The image is opened again by name for buffered reads;
    /// both openings must be the same file.
    pub async fn open<I: Io>(io: &I, file: ImageFile) -> Result<Qcow2Layer> {
        if file.writable {
            return Err(read_only(&file.path));
        }
        let image = Qcow2Image::open(io, &file.path).await?;
        let ours = io.fstat(file.fd()).map_err(|e| Error::io(e, file.path.display()))?;
        let theirs = image.identity(io)?;
        if (ours.dev, ours.ino) != theirs {
            return Err(Error::new(libc::EAGAIN, format!("{}: the file changed while it was opened; try again", file.path.display())));
        }
        Ok(Qcow2Layer { file, image })
    }
    pub fn file(&self) -> &ImageFile {
        &self.file
    }
    pub fn into_file(self) -> ImageFile {
        self.file
    }
    pub fn image(&self) -> &Qcow2Image {
        &self.image
    }
    pub fn size(&self) -> u64 {
        self.image.size()
    }
    /// Where the stack finds cluster `c`: its offset on the virtual disk,
    /// which `read_at` takes (every cluster below the size is held).
    #[inline]
    pub fn lookup(&self, c: u64, cluster: u64) -> Option<u64> {
        let offset = c * cluster;
        (offset < self.size()).then_some(offset)
    }
    /// Read the virtual disk at `offset` (what `lookup` gave).
    pub async fn read_at<I: Io>(&self, io: &I, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.image.read(io, offset, buf).await.map_err(std::io::Error::from)
    }
    pub fn cache_stats(&self) -> CacheStats {
        self.image.cache_stats()
    }
    /// Bytes of memory its tables and caches may hold.
    pub fn table_bytes(&self) -> u64 {
        self.image.memory_bound()
    }
}

/// The refusal of a QCOW2 image as the top (or any layer opened for
/// writing).
pub fn read_only(path: &Path) -> Error {
    Error::new(
        libc::EROFS,
        format!(
            "{}: a QCOW2 image is served read-only, as the base of a stack: put a ploop image on it to take the writes \
             (`ublk-ploop image create TOP.hds --size SIZE`, then `--image BASE --image TOP.hds --format qcow2 --format ploop`)",
            path.display()
        ),
    )
}
