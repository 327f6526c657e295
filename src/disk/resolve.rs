//! What path arguments name: one disk directory (or its
//! DiskDescriptor.xml), or image files of one format (a stack, bottom
//! first). The commands, the daemon's config and every offline tool ask
//! here, so they all read the same arguments the same way and refuse the
//! same mistakes with the same words.

use std::path::{Path, PathBuf};

use super::{no_descriptor, Disk, Guid};
use crate::error::{Error, Result};
use crate::layers::Format;
use crate::stack::LayerSpec;

/// What the path arguments name, before anything is read.
pub enum Named {
    /// One disk directory, or its descriptor file, as given.
    Disk(PathBuf),
    /// Image files, bottom first, each with its format.
    Images(Vec<PathBuf>, Vec<Format>),
}

/// The one reading of path arguments: a directory that is no disk is
/// refused, a lone disk directory declares its own formats (so `formats`
/// are refused with it), and anything else is image files, ploop unless
/// declared otherwise: one format for all, or one per image in order.
pub fn name(paths: &[PathBuf], formats: &[Format]) -> Result<Named> {
    refuse_bare_dirs(paths)?;
    match paths {
        [one] if Disk::is_disk(one) => {
            if !formats.is_empty() {
                return Err(Error::invalid(format!("{}: a disk directory declares its formats; drop --format", one.display())));
            }
            Ok(Named::Disk(one.clone()))
        }
        _ => Ok(Named::Images(paths.to_vec(), per_image(paths.len(), formats)?)),
    }
}

/// The format of each of `images` files: none given means ploop, one
/// applies to all, else one per image. A QCOW2 image can only be the
/// bottom of a stack, so `qcow2` given once for a stack can only mean its
/// bottom: the layers above it are ploop (`--image cloud.qcow2 --format
/// qcow2 --image top.hds`).
pub fn per_image(images: usize, formats: &[Format]) -> Result<Vec<Format>> {
    match formats {
        [] => Ok(vec![Format::Ploop; images]),
        [Format::Qcow2] if images > 1 => Ok(std::iter::once(Format::Qcow2).chain(std::iter::repeat(Format::Ploop).take(images - 1)).collect()),
        [one] => Ok(vec![*one; images]),
        many if many.len() == images => Ok(many.to_vec()),
        many => Err(Error::invalid(format!(
            "{} formats for {images} images: give one --format for all of them, or one per image in order (--format qcow2 --format ploop)",
            many.len()
        ))),
    }
}

/// A directory given where an image or a disk is wanted must be a disk
/// directory: say so instead of "Is a directory".
pub fn refuse_bare_dirs(paths: &[PathBuf]) -> Result<()> {
    match paths.iter().find(|p| p.is_dir() && !Disk::is_disk(p)) {
        Some(dir) => Err(no_descriptor(dir)),
        None => Ok(()),
    }
}

/// The layers to open for a device or a conversion: a disk's chain (or a
/// snapshot's), or the image files. Paths come back absolute, so a daemon
/// (and a later `recover`) finds them from anywhere.
pub struct Resolved {
    pub layers: Vec<LayerSpec>,
    /// The disk directory, when one was named.
    pub disk: Option<PathBuf>,
}

/// The layers `paths` name; `snapshot` picks a snapshot of a disk.
pub fn layers(paths: &[PathBuf], formats: &[Format], snapshot: Option<Guid>) -> Result<Resolved> {
    match name(paths, formats)? {
        Named::Disk(dir) => {
            let disk = Disk::load(&dir)?;
            Ok(Resolved { layers: disk.layers(snapshot)?, disk: Some(disk.dir) })
        }
        Named::Images(paths, formats) => {
            if let Some(p) = paths.iter().find(|p| Disk::is_disk(p)) {
                return Err(Error::invalid(format!("{}: a disk directory must be the only image given", p.display())));
            }
            if snapshot.is_some() {
                return Err(Error::invalid("--snapshot needs a disk directory (a DiskDescriptor.xml) as the image"));
            }
            let layers = paths
                .iter()
                .zip(formats)
                .map(|(p, format)| std::fs::canonicalize(p).map(|path| LayerSpec { path, format }).map_err(|e| Error::io(e, p.display())))
                .collect::<Result<_>>()?;
            Ok(Resolved { layers, disk: None })
        }
    }
}

/// A disk directory (when one was named) and the files to look at, each
/// with its format.
pub type Files = (Option<Disk>, Vec<(PathBuf, Format)>);

/// The files an inspection looks at (`info`, `check`, `resize`): every
/// delta a disk's descriptor names, with its format, or the files given.
pub fn files(paths: &[PathBuf], formats: &[Format]) -> Result<Files> {
    match name(paths, formats)? {
        Named::Disk(dir) => {
            let disk = Disk::load(&dir)?;
            let files = disk.desc.images.iter().map(|i| (disk.file_path(i), disk.desc.format_of(i))).collect();
            Ok((Some(disk), files))
        }
        Named::Images(paths, formats) => Ok((None, paths.into_iter().zip(formats).collect())),
    }
}

/// The disk an image file given on its own belongs to: when a
/// DiskDescriptor.xml beside it names it, that disk (locked, for a
/// command about to change the file) and the chain from the base up to
/// this delta. Only a delta of the disk's own qualifies; `what` names the
/// command in the refusal. None when no descriptor beside it names it.
pub fn disk_of_image(image: &Path, what: &str) -> Result<Option<(Disk, Vec<LayerSpec>)>> {
    match named_by_its_disk(image, true)? {
        Some((disk, image)) => {
            disk.writable_path(&image, what)?;
            let layers = disk.layers(Some(image.guid))?;
            Ok(Some((disk, layers)))
        }
        None => Ok(None),
    }
}

/// An image file served read-write on its own (`add --image FILE`): when a
/// descriptor beside it names it, the disk's rules hold as at the disk's
/// own start. It must be the disk's to change (a file a clone stands on is
/// not), and its top: writing a snapshot changes what the deltas above it
/// show.
/// A descriptor beside it that does not read is left to the user (a
/// stray file must not stop a plain image from being served).
pub fn check_served_alone(image: &Path) -> Result<()> {
    let Ok(Some((disk, img))) = named_by_its_disk(image, false) else { return Ok(()) };
    disk.writable_path(&img, "write")?;
    if !disk.desc.children(img.guid).is_empty() {
        return Err(Error::new(
            libc::EBUSY,
            format!(
                "{}: it is snapshot {} of the disk {}, with deltas above it: writing it would change what they show; \
                 serve the disk directory, or this file --read-only",
                image.display(),
                img.guid,
                disk.dir.display()
            ),
        ));
    }
    Ok(())
}

/// The disk whose descriptor, beside `image`, names it, and its entry
/// there (the disk locked if `locked`).
fn named_by_its_disk(image: &Path, locked: bool) -> Result<Option<(Disk, super::Image)>> {
    let dir = match image.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => Path::new("."),
    };
    if !Disk::is_disk(dir) {
        return Ok(None);
    }
    let me = std::fs::canonicalize(image).map_err(|e| Error::io(e, image.display()))?;
    let disk = if locked { Disk::load_locked(dir)? } else { Disk::load(dir)? };
    let named = disk.desc.images.iter().find(|i| std::fs::canonicalize(disk.file_path(i)).is_ok_and(|p| p == me)).cloned();
    Ok(named.map(|img| (disk, img)))
}
