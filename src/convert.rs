//! Flatten an image or a stack into a new raw or ploop image.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::io::{AlignedBuf, Direct, Io};
use crate::layers::ploop::load;
use crate::layers::{Format, PloopLayer};
use crate::stack::{LayerSpec, Stack, StackOptions};

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub to: Format,
    /// Cluster size of a ploop destination; the source's when None.
    pub cluster_size: Option<u64>,
    pub direct: Direct,
}

#[derive(Debug, Default, Serialize)]
pub struct ConvertStats {
    pub disk_size: u64,
    pub clusters: u64,
    /// Clusters that held non-zero data and were written.
    pub copied_clusters: u64,
    pub copied_bytes: u64,
}

/// Copy what `sources` (bottom first) show into a new image at `dst`.
/// Zero clusters are not written, so the result stays sparse. `progress`
/// is called with (clusters done, clusters total), first with (0, 0) as
/// soon as the destination is made (exclusively: a caller may then take
/// it for its own, to remove on a signal). On error the partial
/// destination is removed.
pub async fn convert<I: Io>(
    io: &I,
    sources: &[LayerSpec],
    dst: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    // A QCOW2 image alone is read directly; under ploop layers (a clone of
    // a cloud image) it is the stack's base like any other.
    if let [q] = sources {
        if q.format == Format::Qcow2 {
            return convert_qcow2(io, &q.path, dst, opts, progress).await;
        }
    }
    // Before anything is read: a header claiming an absurd table is
    // refused, not loaded.
    // (A file or header that cannot be read is left to the open below,
    // which says what is wrong with it.)
    for spec in sources.iter().filter(|s| s.format == Format::Ploop) {
        let name = spec.path.display().to_string();
        let Ok(file) = crate::io::open_named(&spec.path, false, 0, true) else { continue };
        if let Ok(read) = load::read_header(io, std::os::fd::AsRawFd::as_raw_fd(&file), &name).await {
            within_table_limit(&name, read.header.size_bytes(), read.header.cluster_bytes())?;
        }
    }
    let (src, _) = Stack::open_layers(io, sources, &StackOptions { read_only: true, direct: opts.direct, offline: false, link_log: None }).await?;
    let out = create_destination(io, dst, src.size(), opts, src.cluster_size(), progress).await?;
    let result = copy_all(io, &src, &out, progress).await;
    removed_on_error(dst, result)
}

/// Make the empty destination image of `size` bytes (never over a file
/// that exists) and open it. `progress(0, 0)` says the moment it is made.
async fn create_destination<I: Io>(
    io: &I,
    dst: &Path,
    size: u64,
    opts: &ConvertOptions,
    src_cluster: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Stack> {
    if dst.exists() {
        return Err(Error::new(libc::EEXIST, format!("{}: destination exists; refusing to overwrite it", dst.display())));
    }
    match opts.to {
        Format::Qcow2 => {
            return Err(Error::unsupported("convert writes ploop or raw images, not QCOW2"));
        }
        Format::Raw => {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(crate::layers::IMAGE_MODE)
                .open(dst)
                .map_err(|e| Error::io(e, dst.display()))?;
            f.set_len(size).map_err(|e| Error::io(e, dst.display()))?;
        }
        Format::Ploop => {
            let cluster = opts.cluster_size.unwrap_or(src_cluster);
            within_table_limit(&dst.display().to_string(), size, cluster)?;
            PloopLayer::create(io, dst, size, cluster).await?;
        }
    }
    progress(0, 0);
    let out_spec = LayerSpec { path: dst.to_path_buf(), format: opts.to };
    let opened = Stack::open_layers(io, &[out_spec], &StackOptions { read_only: false, direct: opts.direct, offline: false, link_log: None }).await;
    removed_on_error(dst, opened.map(|(out, _)| out))
}

/// A conversion that failed leaves no partial destination behind.
fn removed_on_error<T>(dst: &Path, result: Result<T>) -> Result<T> {
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// Flatten a QCOW2 image and its backing chain into `dst`: every cluster
/// of the destination that reads other than zeros is written.
async fn convert_qcow2<I: Io>(io: &I, path: &Path, dst: &Path, opts: &ConvertOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<ConvertStats> {
    let src = crate::layers::qcow2::Qcow2Image::open(io, path).await?;
    let size = src.size();
    let out = create_destination(io, dst, size, opts, crate::layers::ploop::header::DEFAULT_CLUSTER, progress).await?;
    let result = copy_qcow2(io, &src, &out, opts.to, progress).await;
    removed_on_error(dst, result)
}

/// Every piece of the QCOW2 image that reads other than zeros, into `out`.
async fn copy_qcow2<I: Io>(
    io: &I,
    src: &crate::layers::qcow2::Qcow2Image,
    out: &Stack,
    to: Format,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let size = src.size();
    // A ploop destination allocates whole clusters; a raw one stays
    // sparse at 64 KiB.
    let step = if to == Format::Ploop { out.cluster_size() } else { 64 << 10 };
    let clusters = size.div_ceil(step);
    let mut buf = AlignedBuf::zeroed(step as usize);
    let mut stats = ConvertStats { disk_size: size, clusters, ..Default::default() };
    for c in 0..clusters {
        let offset = c * step;
        let n = (size - offset).min(step) as usize;
        src.read(io, offset, &mut buf[..n]).await?;
        write_unless_zero(io, out, offset, &buf[..n], &mut stats).await?;
        if c % 64 == 63 {
            progress(c + 1, clusters);
        }
    }
    progress(clusters, clusters);
    out.close(io).await?;
    Ok(stats)
}

async fn copy_all<I: Io>(io: &I, src: &Stack, out: &Stack, progress: &mut dyn FnMut(u64, u64)) -> Result<ConvertStats> {
    let size = src.size();
    // Zero detection at the finer of the two cluster sizes, so a sparse
    // source stays sparse in a destination with smaller clusters.
    let step = src.cluster_size().min(out.cluster_size());
    let clusters = size.div_ceil(step);
    let mut buf = AlignedBuf::zeroed(step as usize);
    let mut stats = ConvertStats { disk_size: size, clusters, ..Default::default() };
    // Only the clusters some layer holds are visited: a thin disk costs
    // its data. Progress goes by position on the disk.
    let per_source = src.cluster_size() / step;
    let mut next = 0;
    let mut reported = 0;
    loop {
        let held = src.held_clusters(next, 1024).await;
        let Some(&last) = held.last() else { break };
        for sc in held {
            let first = sc * per_source;
            for c in first..(first + per_source).min(clusters) {
                let offset = c * step;
                let n = (size - offset).min(step) as usize;
                src.read(io, offset, &mut buf[..n]).await?;
                write_unless_zero(io, out, offset, &buf[..n], &mut stats).await?;
                if c >= reported + 64 {
                    progress(c + 1, clusters);
                    reported = c;
                }
            }
        }
        next = last + 1;
    }
    progress(clusters, clusters);
    out.close(io).await?;
    Ok(stats)
}

/// Write `data` at `offset` of the destination unless it is all zeros
/// (the destination reads zeros there already: it stays sparse).
async fn write_unless_zero<I: Io>(io: &I, out: &Stack, offset: u64, data: &[u8], stats: &mut ConvertStats) -> Result<()> {
    if !is_zero(data) {
        out.write(io, offset, data).await?;
        stats.copied_clusters += 1;
        stats.copied_bytes += data.len() as u64;
    }
    Ok(())
}

/// Clusters a ploop image taking part in a conversion may have: the
/// destination's table is allocated on disk whole (512 MiB at this bound),
/// so a few bytes of hostile header must not make it claim gigabytes.
pub const MAX_CLUSTERS: u64 = 1 << 27;

fn within_table_limit(path: &str, size: u64, cluster: u64) -> Result<()> {
    let clusters = size.div_ceil(cluster);
    if clusters > MAX_CLUSTERS {
        return Err(Error::new(
            libc::EFBIG,
            format!(
                "{path}: a disk of {size} bytes in clusters of {cluster} bytes has {clusters} clusters; \
                 convert handles at most {MAX_CLUSTERS} (a table entry each in memory)"
            ),
        ));
    }
    Ok(())
}

pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}
