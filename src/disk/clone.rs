//! Thin clones of a template disk: a new disk directory whose lower deltas
//! are the template's files, named by absolute path and only ever read
//! (the rules of [`Disk::place`]), with an empty top of its own that takes
//! the clone's writes. Making one costs a descriptor and an empty image,
//! whatever the template holds; many clones are served over one template.
//!
//! `detach` makes a clone stand alone again: the template's clusters are
//! copied up into the clone's top, delta by delta, and the template's
//! files leave the clone's descriptor (they are never removed).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::ops::{self, Merged};
use super::{Disk, Guid, Image, ImageType, Shot, Temporary, DESCRIPTOR, NONE_GUID, TOP_GUID};
use crate::error::{Error, Result};
use crate::io::{Direct, Io};
use crate::layers::{marked_in_use, Format, Layer, PloopLayer};
use crate::stack::Stack;

/// What `clone_disk` made.
#[derive(Clone, Debug, Serialize)]
pub struct Cloned {
    /// The new disk directory.
    pub dir: PathBuf,
    /// Its own top, the only file it writes.
    pub top: PathBuf,
    /// The template's deltas it reads, bottom first.
    pub shared: Vec<PathBuf>,
}

/// Make `dir` a thin clone of the disk `template` as it stands at snapshot
/// `at` (its top when None). The template must not be served read-write
/// (its top would go on changing under the clones) nor be half merged;
/// its files are read, never written. `served`: a device of ours serves
/// the template (the caller looked), which keeps its part of the lock.
pub async fn clone_disk<I: Io>(io: &I, template: &Path, dir: &Path, at: Option<Guid>, served: bool) -> Result<Cloned> {
    // Under the template's lock, so that no tool changes its chain while we
    // read it; let go once the clone's descriptor is stored. Beside a
    // device, only a snapshot of the template can be cloned (its top is
    // marked in use).
    let tmpl = match served {
        true => Disk::load_beside_device_in(io, template).await?,
        false => Disk::load_locked_in(io, template).await?,
    };
    let at = at.unwrap_or(tmpl.desc.top);
    if tmpl.desc.shot(at).is_none() {
        return Err(Error::new(libc::ENOENT, format!("{}: no snapshot {at}", tmpl.xml_path().display())));
    }
    let chain: Vec<Image> = tmpl.desc.chain(at)?.into_iter().cloned().collect();
    let mut shared = Vec::with_capacity(chain.len());
    for img in &chain {
        let what = tmpl.xml_path();
        if img.kind != ImageType::Compressed {
            return Err(Error::invalid(format!(
                "{}: delta {} is a raw (Plain) image: only a ploop-format disk can be a template",
                what.display(),
                img.file
            )));
        }
        if tmpl.desc.shot(img.guid).is_some_and(|s| s.temporary != Temporary::No) {
            return Err(Error::new(
                libc::EBUSY,
                format!("{}: delta {} is half merged; open the template once (or merge it) before cloning it", what.display(), img.file),
            ));
        }
        let path = io.canonicalize(&tmpl.file_path(img)).map_err(|e| Error::io(e, tmpl.file_path(img).display()))?;
        if marked_in_use(io, &path).await? {
            return Err(Error::new(
                libc::EBUSY,
                format!(
                    "{}: is marked in use (served read-write, or not closed cleanly); a template must be frozen: stop its device, or clone a snapshot of it",
                    path.display()
                ),
            ));
        }
        if path.to_str().is_none() {
            return Err(Error::invalid(format!("{}: a descriptor names files by UTF-8 paths", path.display())));
        }
        shared.push(path);
    }
    // The new top takes the version of the delta below it (ploop merges
    // only deltas of one version).
    let below = shared.last().expect("a chain is never empty");
    let (lower, _) = Layer::open(io, below, Format::Ploop, false, Direct::Off).await?;
    let variant = lower.variant().expect("a ploop layer");
    drop(lower);

    // The template's deltas keep their GUIDs, except its top's fixed one,
    // which the clone's own top takes (as a snapshot renames it).
    let frozen = Guid::random();
    let rename = |g: Guid| if g == TOP_GUID { frozen } else { g };
    let mut desc = tmpl.desc.clone();
    desc.images = chain
        .iter()
        .zip(&shared)
        .map(|(img, path)| Image { guid: rename(img.guid), kind: img.kind, file: path.to_str().expect("checked").to_string() })
        .collect();
    desc.shots = chain
        .iter()
        .map(|img| {
            let parent = tmpl.desc.shot(img.guid).map_or(NONE_GUID, |s| s.parent);
            Shot { guid: rename(img.guid), parent: rename(parent), temporary: Temporary::No }
        })
        .collect();
    let parent = rename(chain.last().expect("a chain is never empty").guid);
    let size = desc.size();
    let cluster = desc.cluster_size();

    super::clones::listable_name(dir)?;
    let dir = new_disk_dir(io, dir, Some(&tmpl.dir))?;
    // Listed first: a template that does not know a clone could merge its
    // base away while the clone is stopped.
    super::clones::list_clone(io, &tmpl, &dir).await?;
    let mut clone = Disk::from_parts(dir.clone(), desc);
    let file = clone.new_delta_name();
    let top = dir.join(&file);
    clone.desc.images.push(Image { guid: TOP_GUID, kind: ImageType::Compressed, file });
    clone.desc.shots.push(Shot { guid: TOP_GUID, parent, temporary: Temporary::No });
    clone.desc.top = TOP_GUID;
    PloopLayer::create_variant(io, &top, size, cluster, variant).await?;
    store_with_top(io, &clone, &top).await?;
    drop(tmpl);
    Ok(Cloned { dir, top, shared })
}

/// Make `dir` (and its parents) and return its canonical path, refused
/// when it holds a disk descriptor already or is the template's own.
fn new_disk_dir<I: Io>(io: &I, dir: &Path, template: Option<&Path>) -> Result<PathBuf> {
    io.create_dir_all(dir).map_err(|e| Error::io(e, dir.display()))?;
    let dir = io.canonicalize(dir).map_err(|e| Error::io(e, dir.display()))?;
    if template == Some(dir.as_path()) || io.stat(&dir.join(DESCRIPTOR)).ok().flatten().is_some() {
        return Err(Error::new(libc::EEXIST, format!("{}: a disk descriptor exists already", dir.join(DESCRIPTOR).display())));
    }
    Ok(dir)
}

/// Store a new clone's descriptor; if that fails before it is in place,
/// its new top goes too.
async fn store_with_top<I: Io>(io: &I, clone: &Disk, top: &Path) -> Result<()> {
    clone.store_naming_new(io, top).await
}

/// Make `dir` a thin clone over the QCOW2 image `template` (a cloud
/// image, with its own backing chain): its descriptor names the image as
/// its base by absolute path (type QCOW2), and an empty ploop top of
/// `cluster` bytes per cluster, `root.hds`, takes the writes. The image is
/// read, never written; nothing is converted.
pub async fn clone_qcow2<I: Io>(io: &I, template: &Path, dir: &Path, cluster: u64) -> Result<Cloned> {
    let path = io.canonicalize(template).map_err(|e| Error::io(e, template.display()))?;
    let size = crate::layers::qcow2::Qcow2Image::open(io, &path).await?.size();
    let Some(file) = path.to_str() else {
        return Err(Error::invalid(format!("{}: a descriptor names files by UTF-8 paths", path.display())));
    };
    // Its size must be whole sectors, which the new descriptor checks.
    let mut desc = super::Descriptor::new(size, cluster, file, ImageType::Qcow2).map_err(|e| e.context(path.display()))?;
    let base = Guid::random();
    desc.images[0].guid = base;
    desc.shots[0].guid = base;
    desc.images.push(Image { guid: TOP_GUID, kind: ImageType::Compressed, file: super::BASE_FILE.to_string() });
    desc.shots.push(Shot { guid: TOP_GUID, parent: base, temporary: Temporary::No });
    desc.top = TOP_GUID;

    let dir = new_disk_dir(io, dir, None)?;
    let top = dir.join(super::BASE_FILE);
    PloopLayer::create(io, &top, size, cluster).await?;
    store_with_top(io, &Disk::from_parts(dir.clone(), desc), &top).await?;
    Ok(Cloned { dir, top, shared: vec![path] })
}

pub use super::place::is_shared;

/// How many shared deltas `disk` reads below its top (0: it stands
/// alone), when it can be detached as it stands: every delta below its top
/// is shared (outside the directory). A clone with snapshots of its own
/// merges them first: copying the template up into a snapshot is not
/// something ploop's layout lets a lower delta take.
pub fn detach_plan(disk: &Disk) -> Result<usize> {
    let chain = disk.desc.chain(disk.desc.top)?;
    let (top, lower) = chain.split_last().expect("a chain is never empty");
    if is_shared(disk, top) {
        return Err(Error::invalid(format!("{}: the top delta is not in the disk directory", disk.xml_path().display())));
    }
    if !lower.iter().any(|img| is_shared(disk, img)) {
        return Ok(0);
    }
    if let Some(own) = lower.iter().find(|img| !is_shared(disk, img)) {
        return Err(Error::invalid(format!(
            "{}: delta {} is a snapshot of this disk's own; merge the disk's snapshots into the top first (snapshot-merge), then detach",
            disk.xml_path().display(),
            own.file
        )));
    }
    Ok(lower.len())
}

/// Copy every cluster the shared deltas show up into the top, one delta at
/// a time from the nearest, until the disk stands alone. Each merge drops a
/// shared delta from the descriptor and leaves its file alone; a crash
/// between them leaves a clone with fewer shared deltas, detached again
/// by running this once more. `progress` gets (done, to do) per delta.
pub async fn detach<I: Io>(io: &I, stack: &Stack, disk: &mut Disk, progress: &dyn Fn(u64, u64)) -> Result<Vec<Merged>> {
    let mut merged = Vec::new();
    while detach_plan(disk)? > 0 {
        merged.push(ops::merge(io, stack, disk, None, progress).await?);
    }
    Ok(merged)
}
