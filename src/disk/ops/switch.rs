//! ploop's `snapshot-switch`: the disk shows a snapshot's content on a
//! new empty top, and the old top's delta is removed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{drop_new_top, no_such, put_back, refresh, remove_file};
use crate::disk::{Disk, Guid, Image, Shot, Temporary, TOP_GUID};
use crate::error::{Error, Result};
use crate::io::{Direct, Io};
use crate::layers::Layer;
use crate::stack::Stack;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Switched {
    pub snapshot: Guid,
    /// The new, empty top delta.
    pub file: PathBuf,
    pub stall: Duration,
}

/// Switch to the snapshot `guid`, as ploop's `snapshot-switch`: the disk
/// shows that snapshot's content on a new empty top; the old top's delta
/// (and what was written since that snapshot) is removed.
pub async fn switch<I: Io>(io: &I, stack: &Stack, disk: &mut Disk, guid: Guid) -> Result<Switched> {
    let _lock = refresh(io, disk, stack).await?;
    let old_top = disk.desc.top;
    if guid == old_top {
        return Err(Error::invalid(format!("{guid} is the current top already")));
    }
    let shot = disk.desc.shot(guid).cloned().ok_or_else(|| no_such(disk, guid))?;
    if shot.temporary != Temporary::No {
        return Err(Error::invalid(format!("{guid} is a temporary snapshot: ploop does not switch to those")));
    }
    // The old top is removed: it must be the disk's own file.
    let top_img = disk.desc.image(old_top).cloned().ok_or_else(|| no_such(disk, old_top))?;
    disk.writable_path_in(io, &top_img, "remove (switch away from)")?;
    let chain = disk.layers(Some(guid))?;
    // Which of them are the disk's own files, by where they are (a
    // symbolic link on the way, or a second hard link, makes one another
    // file's), not by how the descriptor spells them.
    let own: Vec<bool> = disk.desc.chain(guid)?.into_iter().map(|img| matches!(disk.place_in(io, img), crate::disk::Place::Inside)).collect();
    // ploop names the new top after the first image, without stripping;
    // it is made in the disk directory.
    let file = disk.switch_top_name();
    let path = disk.dir.join(&file);
    let current = stack.layers_now().await;
    let mut layers = Vec::with_capacity(chain.len() + 1);
    for (spec, own) in chain.iter().zip(own) {
        let layer = match current.iter().find(|l| l.file().path == spec.path) {
            Some(l) => l.clone(),
            None => {
                let direct = if current[0].file().direct { Direct::Auto } else { Direct::Off };
                let file = crate::io::open_image_file_in(io, &spec.path, false, direct)?;
                // As the served chain's layers when the device starts
                // (`settle_lower`): a delta of the other branch an
                // interrupted operation left in use (a delete merging into
                // it) is cleaned, any other synced, before it is served.
                // Only the disk directory's own deltas are ever written.
                let cleaned = if own {
                    crate::layers::settle_lower(io, &file, spec.format, direct, stack.link_dir()).await?
                } else {
                    crate::layers::sync_lower(io, &file).await?;
                    false
                };
                if cleaned {
                    tracing::warn!(image = %spec.path.display(), "a delta was left in use by an operation that did not finish; checked and closed");
                }
                Arc::new(Layer::open_file(io, file, spec.format, direct).await?.0)
            }
        };
        layers.push(layer);
    }
    // The new top takes the version of the chain it goes on.
    let variant = layers.last().and_then(|l| l.variant());
    let new_top = stack.prepare_top_variant(io, &path, variant).await?;
    layers.push(new_top.clone());
    let mut next = disk.clone();
    let kind = next.desc.delta_kind();
    next.desc.images.retain(|i| i.guid != old_top);
    next.desc.shots.retain(|s| s.guid != old_top);
    next.desc.images.push(Image { guid: TOP_GUID, kind, file });
    next.desc.shots.push(Shot { guid: TOP_GUID, parent: guid, temporary: Temporary::No });
    next.desc.top = TOP_GUID;
    if let Err(e) = next.replace(io, disk).await {
        drop(layers);
        drop_new_top(io, stack, new_top, &e).await;
        return Err(e);
    }
    let started = io.now();
    let old = match stack.replace_layers(layers).await {
        Ok(old) => old,
        Err(e) => {
            put_back(io, stack, disk, &next, new_top).await;
            return Err(e);
        }
    };
    let stall = io.now().duration_since(started);
    *disk = next;
    drop(current);
    // The old top's content is discarded by the switch.
    let old_top_layer = old.last().cloned().expect("a stack is never empty");
    let old_path = old_top_layer.file().path.clone();
    let _ = old_top_layer.close(io).await;
    old_top_layer.remove_link_log(io);
    drop((old, old_top_layer));
    remove_file(io, &old_path);
    Ok(Switched { snapshot: guid, file: path, stall })
}
