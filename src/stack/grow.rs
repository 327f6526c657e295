//! Growing layers online: the top (a ploop image closed, resized and
//! opened again; a raw file extended) and a lower layer a larger child is
//! about to be merged into.

use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::io::Io;
use crate::layers::ploop::resize::Resized;
use crate::layers::{Format, Layer};

use super::{owner_map, Stack};

impl Stack {
    /// Grow a lower ploop or raw layer's file to `new_size` (a merge into
    /// it of a larger child: only the top grows online, so a delta frozen
    /// after a grow is larger than its parent), with requests held: a larger table
    /// may move data clusters out of its way, and the stack's opening of
    /// the layer would read their old places. The layer is opened afresh,
    /// read-only and without a lock (the caller holds the file's lock
    /// through its own handle of the old opening). Zeros past the old end
    /// read as before, so the disk shows the same.
    pub async fn grow_lower<I: Io>(&self, io: &I, index: usize, new_size: u64) -> Result<Resized> {
        let mut shape = self.shape.exclusive().await;
        shape.check_open()?;
        let format = shape.layers.get(index).map(|l| l.format());
        if index + 1 >= shape.layers.len() || !matches!(format, Some(Format::Ploop | Format::Raw)) {
            return Err(Error::invalid(format!("layer {index} is the top, not a ploop or raw image, or does not exist")));
        }
        let format = format.expect("checked above");
        let path = shape.layers[index].file().path.clone();
        let direct = if shape.layers[index].file().direct { crate::io::Direct::Auto } else { crate::io::Direct::Off };
        let file = crate::io::open_image_file_in(io, &path, true, direct)?;
        let grown = if format == Format::Raw {
            // As ploop's merge grows a raw base the disk outgrew: the file
            // is extended (a hole reads the zeros its end showed), durably.
            crate::layers::ploop::resize::resize_raw_file(io, &file, new_size, true).await
        } else {
            crate::layers::ploop::resize::resize_file(io, &file, new_size, true).await
        };
        drop(file);
        // Whatever the resize did (a failure may follow moved clusters),
        // the stack reads the file as it is now.
        self.reload_lower(io, &mut shape, index, format, direct, false)
            .await
            .map_err(|e| e.context(format_args!("{}: reopening a lower layer after growing it", path.display())))?;
        grown.map_err(|e| e.context(format_args!("{}: growing the parent to its child's size", path.display())))
    }

    /// Grow the disk online, as ploop does: only the top image grows (the
    /// lower layers keep their size and show zeros past it). Requests are
    /// held meanwhile: the top is closed cleanly, resized as a closed image
    /// (`layers::ploop::resize`), opened again and swapped in with the new
    /// size. The caller tells the kernel afterwards. If the resize fails,
    /// the top is opened again at its old size.
    pub async fn grow_top<I: Io>(&self, io: &I, new_size: u64) -> Result<Resized> {
        use crate::layers::ploop::resize::resize_locked;
        self.check_writable()?;
        let old_size = self.size();
        if new_size < old_size {
            return Err(Error::invalid(format!(
                "a served disk is never shrunk ({old_size} bytes now, {new_size} asked); ploop does not shrink devices either"
            )));
        }
        if new_size % self.block as u64 != 0 {
            return Err(Error::invalid(format!("{new_size} is not a multiple of the disk's block of {} bytes", self.block)));
        }
        if new_size == old_size {
            return Ok(Resized { old_size, new_size, ..Default::default() });
        }
        // A look without holding requests: a ploop top's grow holds them
        // once, in `with_top_closed`.
        let raw_top = self.layers_now().await.last().is_some_and(|l| l.format() == Format::Raw);
        if raw_top {
            if let Some(done) = self.grow_raw_top(io, old_size, new_size).await? {
                return Ok(done);
            }
        }
        self.with_top_closed(io, true, |io, file, _| async move {
            let done = resize_locked(io, &file, new_size, true).await;
            if done.is_ok() {
                self.size.store(new_size, Ordering::Release);
            }
            (file, done)
        })
        .await
    }
    /// A raw top (ploop's raw mode, or left by a merge into a raw base)
    /// grows as ploop grows a raw image: its file is extended, durably,
    /// with requests held, and then the disk shows the new size. None when
    /// the top is not raw.
    async fn grow_raw_top<I: Io>(&self, io: &I, old_size: u64, new_size: u64) -> Result<Option<Resized>> {
        let mut shape = self.shape.exclusive().await;
        shape.check_open()?;
        let Layer::Raw(raw) = &**shape.top() else { return Ok(None) };
        self.check_no_trackers(&shape)?;
        self.retire_pending(io).await?;
        raw.grow(io, new_size).await?;
        self.size.store(new_size, Ordering::Release);
        shape.owner = owner_map(&shape.layers, self.size(), self.cluster);
        self.end_kept_record(&mut shape);
        Ok(Some(Resized { old_size, new_size, ..Default::default() }))
    }
}
