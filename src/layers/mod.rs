//! Image formats that can be a layer of a stack, detected by their magic.

pub mod bat;
pub mod header;
pub mod ploop;
pub mod raw;

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::{open_image_file, AlignedBuf, Direct, ImageFile, IoBackend, IoOp, SyncBackend};

pub use ploop::{OpenReport, PloopLayer};
pub use raw::RawLayer;

/// The formats a layer file can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Ploop,
    Raw,
}

pub enum Layer {
    Ploop(PloopLayer),
    Raw(RawLayer),
}

/// Other formats' magics: served as raw they would expose their metadata
/// as disk content, so they are refused by name instead.
const FOREIGN_MAGICS: &[(&[u8], &str)] = &[
    (b"QFI\xfb", "qcow2"),
    (b"KDMV", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vhd"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
];

/// Detect the format of an image by its first bytes.
pub fn detect_format(path: &Path) -> Result<Format> {
    let file = open_image_file(path, false, Direct::Off)?;
    let mut head = AlignedBuf::zeroed(4096);
    SyncBackend::new()
        .submit(&mut [IoOp::read(file.fd(), 0, &mut head)])
        .map_err(|e| Error::io(e, path.display()))?;
    if header::has_magic(&head) {
        return Ok(Format::Ploop);
    }
    let len = file.len()?;
    if len == 0 {
        return Err(Error::invalid(format!("{}: empty file: neither a ploop image nor a usable raw disk", path.display())));
    }
    if head.starts_with(b"WithouFr") || head.starts_with(b"WithoutF") {
        // Most of a ploop signature: a damaged header, not a raw disk whose
        // "data" would be the image's own BAT.
        return Err(Error::corrupt(format!(
            "{}: damaged ploop signature {:?}; refusing to treat it as a raw disk",
            path.display(),
            String::from_utf8_lossy(&head[..16])
        )));
    }
    for (magic, name) in FOREIGN_MAGICS {
        if head.starts_with(magic) {
            return Err(Error::unsupported(format!("{}: {name} images are not supported as layers", path.display())));
        }
    }
    Ok(Format::Raw)
}

impl Layer {
    /// Open a layer file, detecting its format.
    pub fn open(path: &Path, writable: bool, direct: Direct) -> Result<(Layer, OpenReport)> {
        let format = detect_format(path)?;
        let file = open_image_file(path, writable, direct)?;
        lock(&file, writable)?;
        match format {
            Format::Ploop => PloopLayer::open(file, direct).map(|(l, r)| (Layer::Ploop(l), r)),
            Format::Raw => {
                let layer = RawLayer::open(file)?;
                if layer.size() % 512 != 0 {
                    return Err(Error::invalid(format!("{}: raw image size is not a multiple of 512", path.display())));
                }
                Ok((Layer::Raw(layer), OpenReport::default()))
            }
        }
    }

    pub fn file(&self) -> &ImageFile {
        match self {
            Layer::Ploop(l) => l.file(),
            Layer::Raw(l) => l.file(),
        }
    }
    pub fn format(&self) -> Format {
        match self {
            Layer::Ploop(_) => Format::Ploop,
            Layer::Raw(_) => Format::Raw,
        }
    }
    /// Virtual disk size this layer describes.
    pub fn size(&self) -> u64 {
        match self {
            Layer::Ploop(l) => l.size(),
            Layer::Raw(l) => l.size(),
        }
    }
    /// The cluster size the format imposes, if any.
    pub fn cluster_size(&self) -> Option<u64> {
        match self {
            Layer::Ploop(l) => Some(l.cluster_size()),
            Layer::Raw(_) => None,
        }
    }
    /// File offset of virtual cluster `c`, if this layer holds it.
    #[inline]
    pub fn lookup(&self, c: u64, cluster: u64) -> Option<u64> {
        match self {
            Layer::Ploop(l) => l.lookup(c),
            Layer::Raw(l) => l.lookup(c, cluster),
        }
    }
    /// Turn the writable top into a read-only lower layer, keeping its open
    /// descriptor: the exclusive lock becomes a shared one. Call after
    /// `close`, which left the image consistent and marked clean.
    pub fn demote(&mut self) -> Result<()> {
        let file = match self {
            Layer::Ploop(l) => l.file_mut(),
            Layer::Raw(l) => l.file_mut(),
        };
        if file.writable {
            lock(file, false)?;
            file.writable = false;
        }
        Ok(())
    }

    pub fn flush(&self, io: &mut dyn IoBackend) -> Result<()> {
        match self {
            Layer::Ploop(l) => l.flush(io).map_err(|e| e.error),
            Layer::Raw(l) if l.file().writable => {
                io.sync_data(l.file().fd()).map_err(|e| Error::io(e, l.file().path.display()))
            }
            Layer::Raw(_) => Ok(()),
        }
    }
    pub fn close(&self, io: &mut dyn IoBackend) -> Result<()> {
        match self {
            Layer::Ploop(l) => l.close(io),
            Layer::Raw(_) => self.flush(io),
        }
    }
}

/// One writer per image, and no writer on an image others read as a lower
/// layer: a second daemon or tool on the same file would corrupt it. The
/// lock dies with the descriptor, even on kill -9.
pub(crate) fn lock(file: &ImageFile, exclusive: bool) -> Result<()> {
    // Converting our own exclusive lock to a shared one is atomic in flock.
    let mode = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    // SAFETY: plain syscall on a descriptor we own.
    let rc = unsafe { libc::flock(file.fd(), mode | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(Error::new(
            err.raw_os_error().unwrap_or(libc::EBUSY),
            format!("{}: image is in use by another process ({err})", file.path.display()),
        ));
    }
    Ok(())
}
