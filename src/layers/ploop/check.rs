//! Offline consistency check and repair of a ploop image.
//!
//! Finds what `open` refuses (BAT entries past EOF, into the metadata,
//! misaligned or shared by two virtual clusters) and what it tolerates
//! (leaked clusters, a stale in-use mark), and repairs both in an order
//! that is itself crash safe: data copies, then the BAT, then trimming.

use std::path::Path;


use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::io::{is_hole, Io};
use crate::layers::ploop::bat::{self, BadEntry, EntryProblem};
use crate::layers::ploop::ext::{self, Extension};
use crate::layers::ploop::header::{Header, Variant, CLOSED, HEADER_SIZE, IN_USE};
use crate::layers::ploop::load;
use crate::layers::{not_ploop, Format};

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub path: String,
    pub format: Format,
    pub file_size: u64,
    pub disk_size: u64,
    pub cluster_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<Variant>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bat_entries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flags: Option<u32>,
    pub allocated_clusters: u64,
    /// Header problems (an unreadable header makes everything else moot).
    pub header_errors: Vec<String>,
    pub bad_entries: Vec<BadEntry>,
    /// Data-area clusters no BAT entry references.
    pub leaked_clusters: u64,
    /// The in-use mark was set: the last writer did not close the image.
    pub unclean: bool,
    /// Clusters of the format extension (a kept changed-block record):
    /// used, not leaked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extension_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_bitmaps: Option<usize>,
    /// What --repair did.
    pub repairs: Vec<String>,
    /// What --repair left undone, and why (space it could not give back:
    /// the image is sound, the space stays leaked).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_repaired: Vec<String>,
    /// Damage that --repair cannot mend (the header itself), and what to
    /// do instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beyond_repair: Option<String>,
    /// A QCOW2 image's table entries that point nowhere valid.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub table_errors: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Clean,
    /// Only leaked space: no data at risk.
    Leaks,
    Corrupt,
}

impl CheckReport {
    /// A report on `path` before anything was read from it: nothing found
    /// yet, and no disk size known.
    fn blank(path: String, format: Format, file_size: u64) -> CheckReport {
        CheckReport {
            path,
            format,
            file_size,
            disk_size: 0,
            cluster_size: 0,
            variant: None,
            bat_entries: None,
            data_offset: None,
            flags: None,
            allocated_clusters: 0,
            header_errors: vec![],
            bad_entries: vec![],
            leaked_clusters: 0,
            unclean: false,
            extension_clusters: None,
            dirty_bitmaps: None,
            repairs: vec![],
            not_repaired: vec![],
            beyond_repair: None,
            table_errors: vec![],
        }
    }

    pub fn verdict(&self) -> Verdict {
        if !self.header_errors.is_empty() || !self.bad_entries.is_empty() || !self.table_errors.is_empty() || self.unclean {
            Verdict::Corrupt
        } else if self.leaked_clusters > 0 {
            Verdict::Leaks
        } else {
            Verdict::Clean
        }
    }
    /// qemu-img's convention: 0 clean, 2 corrupt, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        match self.verdict() {
            Verdict::Clean => 0,
            Verdict::Corrupt => 2,
            Verdict::Leaks => 3,
        }
    }
}

/// Check `path`; with `repair`, fix what can be fixed and report the image
/// as it is afterwards (the actions taken are listed in `repairs`).
/// Refuses an image another process has open for writing.
pub async fn check<I: Io>(io: &I, path: &Path, format: Format, repair: bool) -> Result<CheckReport> {
    check_in(io, path, format, repair, None).await
}

/// The same; a repair first applies the link log a killed daemon left in
/// `links` (an image still marked in use is opened read-write with it and
/// closed), so that the copy-ups it acknowledged are not released as
/// leaks. An image that does not open that way (damage) is repaired as
/// it is, and its log dropped.
/// Without `links`, the directory this process was given for leftover logs
/// (`links::set_leftover_dir`) is used, and a log there this user may not
/// read refuses the repair of an image left in use.
pub async fn check_in<I: Io>(io: &I, path: &Path, format: Format, repair: bool, links: Option<&Path>) -> Result<CheckReport> {
    // A log the repair makes stale, dropped once the repair went through
    // (an image beyond repair keeps it: its copies were not released).
    let mut stale_log = None;
    if let (true, Format::Ploop) = (repair, format) {
        let file = crate::io::open_image_file_in(io, path, false, crate::io::Direct::Off)?;
        // A header too damaged to say counts as in use.
        let in_use = crate::layers::file_marked_in_use(io, &file).await.unwrap_or(true);
        let dir = match links {
            Some(d) => Some(d.to_path_buf()),
            None if in_use => super::links::leftover_dir(io, &path.display().to_string(), file.fd(), true)?,
            None => None,
        };
        if let Some(dir) = dir {
            match crate::layers::clean_file_if_in_use(io, &file, crate::io::Direct::Auto, Some(&dir)).await {
                Ok(_) => {}
                Err(e) if e.errno() == libc::EUCLEAN => {
                    // Damage the repair deals with: it releases the copies
                    // the log recorded, so the log goes too, once it has.
                    tracing::warn!(image = %path.display(), "not opened with its link log before the repair: {e}; log dropped");
                    stale_log = Some((dir, file));
                }
                Err(e) => return Err(e),
            }
        }
    }
    let mut report = check_with(io, path, format, repair, true).await?;
    if let Some((dir, file)) = stale_log {
        super::links::remove_log_of(io, &dir, file.fd());
    }
    if repair && !(report.repairs.is_empty() && report.not_repaired.is_empty()) {
        let repairs = std::mem::take(&mut report.repairs);
        let not_repaired = std::mem::take(&mut report.not_repaired);
        report = check_with(io, path, format, false, false).await?;
        report.repairs = repairs;
        report.not_repaired = not_repaired;
    }
    Ok(report)
}

/// A QCOW2 image, read-only: its header, its backing chain (each opens),
/// and every L1 and L2 entry of its own file. Refcounts are qemu-img
/// check's; nothing is ever repaired here (the image is never written).
async fn check_qcow2<I: Io>(io: &I, path: &Path, repair: bool) -> Result<CheckReport> {
    if repair {
        return Err(Error::unsupported(format!(
            "{}: QCOW2 images are never written here; `qemu-img check -r all` repairs them",
            path.display()
        )));
    }
    let name = path.display().to_string();
    let file_size = io.stat(path).map_err(|e| Error::io(e, &name))?.map_or(0, |s| s.len);
    let mut report = CheckReport::blank(name, Format::Qcow2, file_size);
    const QEMU_REPAIRS: &str = "QCOW2 images are repaired by `qemu-img check -r all`, never here";
    let image = match crate::layers::qcow2::Qcow2Image::open(io, path).await {
        Ok(image) => image,
        Err(e) if e.errno() == libc::EUCLEAN => {
            report.header_errors.push(e.message().to_string());
            report.beyond_repair = Some(QEMU_REPAIRS.into());
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    report.disk_size = image.size();
    report.cluster_size = image.header().cluster_size();
    let (stored, problems) = image.check_tables(io).await?;
    report.allocated_clusters = stored;
    if !problems.is_empty() {
        report.beyond_repair = Some(QEMU_REPAIRS.into());
    }
    report.table_errors = problems;
    Ok(report)
}

/// Repair a closed image whose lock the caller holds through an opening
/// of its own (a resize that gave clusters up): nothing can open it
/// between the two, and no second lock has to wait for the first.
pub(crate) async fn repair_locked<I: Io>(io: &I, path: &Path, format: Format) -> Result<CheckReport> {
    check_with(io, path, format, true, false).await
}

/// The same report without taking the lock, for `info` on an image that a
/// daemon is serving (its BAT may change while being read).
pub async fn inspect<I: Io>(io: &I, path: &Path, format: Format) -> Result<CheckReport> {
    check_with(io, path, format, false, false).await
}

async fn check_with<I: Io>(io: &I, path: &Path, format: Format, repair: bool, take_lock: bool) -> Result<CheckReport> {
    if format == Format::Qcow2 {
        return check_qcow2(io, path, repair).await;
    }
    // A repair writes: never through a symlink.
    let how = crate::io::OpenHow { write: repair, nofollow: repair, block_ok: format == Format::Raw, ..Default::default() };
    let file = io.open(path, &how).map_err(|e| Error::io(e, path.display()))?;
    let fd = file.fd();
    if take_lock && crate::layers::flock_waiting(io, fd, repair).is_err() {
        return Err(Error::new(libc::EBUSY, format!("{}: image is in use by another process", path.display())));
    }
    let name = path.display().to_string();
    let file_size = load::file_len(io, fd, &name)?;
    let mut report = CheckReport { disk_size: file_size, ..CheckReport::blank(name.clone(), format, file_size) };
    if format == Format::Raw {
        if file_size % 512 != 0 {
            report.header_errors.push(format!("raw image size {file_size} is not a multiple of 512"));
        }
        return Ok(report);
    }
    let header = match load::read_header(io, fd, &name).await {
        Ok(read) => read.header,
        Err(e) if e.errno() == libc::EUCLEAN || e.errno() == libc::EOPNOTSUPP => {
            // Nothing below can be trusted without a header.
            let e = if e.kind() == ErrorKind::NotPloop { not_ploop(io, path, e).await } else { e };
            report.header_errors.push(e.message().to_string());
            // Without a header nothing says where the disk's clusters are.
            report.disk_size = 0;
            report.beyond_repair = Some(BEYOND_REPAIR_HEADER.into());
            if repair {
                return Err(Error::corrupt(format!("{name}: header is damaged beyond automatic repair: {e}")));
            }
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    report.disk_size = header.size_bytes();
    report.cluster_size = header.cluster_bytes();
    report.variant = Some(header.variant);
    report.bat_entries = Some(header.bat_entries);
    report.data_offset = Some(header.data_off_bytes());
    report.flags = Some(header.flags);
    if file_size < header.bat_end() {
        report.header_errors.push(format!("file is truncated: {file_size} bytes, the BAT ends at {}", header.bat_end()));
        report.beyond_repair = Some(
            "the file ends inside its block address table, so the clusters it does not reach cannot be found; \
             restore the image from a backup or copy"
                .into(),
        );
        if repair {
            return Err(Error::corrupt(format!("{name}: the BAT itself is truncated; cannot repair")));
        }
        return Ok(report);
    }
    // Nothing of a half converted table is judged or mended here: a repair
    // would clear entries ploop's tool restores from its copy.
    if header.flags & super::header::FLAG_VERSION_CONVERT != 0 {
        report.header_errors.push(format!("flags {:#x}: {}", header.flags, super::CONVERSION_INTERRUPTED));
        report.beyond_repair = Some(super::CONVERSION_INTERRUPTED.into());
        if repair {
            return Err(Error::corrupt(format!("{name}: {}", super::CONVERSION_INTERRUPTED)));
        }
        return Ok(report);
    }
    // (Non-zero high bits of a v1 disk size are ignored, as by qemu and by
    // open; repair clears them.)
    match header.in_use {
        0 | CLOSED => {}
        IN_USE => report.unclean = true,
        other => report.header_errors.push(format!("unknown in-use mark {other:#x}")),
    }
    // Streamed: a table the header claims but the file holds no data for
    // costs neither memory nor reads.
    let mut scan = load::scan_bat(io, fd, &header, file_size, &name).await?;
    let extension = read_extension(io, fd, &header, file_size, &mut report).await;
    if let Some(ext) = &extension {
        if let Err(e) = claim_extension(&header, ext, &mut scan) {
            report.header_errors.push(format!("{e}; --repair drops the extension"));
        }
    }
    fill_scan(io, &mut report, &header, &scan, file.fd(), file_size);
    // Kept through a repair only if it is sound and the image was closed.
    let keep_extension = extension.is_some() && report.header_errors.is_empty() && !report.unclean;
    if !repair || report.verdict() == Verdict::Clean {
        return Ok(report);
    }

    // Repair. 1: give each bad entry a fate; duplicates get a private copy.
    let io_err = |e| Error::io(e, &name);
    let cluster = header.cluster_bytes();
    let mut end = header.data_off_bytes() + file_size.saturating_sub(header.data_off_bytes()).next_multiple_of(cluster);
    let mut buf = vec![0u8; cluster as usize];
    let mut repairs = vec![];
    let mut not_repaired = vec![];
    // Only the entries that change are kept and rewritten, never the table.
    let mut changes: Vec<(u32, u32)> = Vec::with_capacity(scan.bad.len());
    for bad in &scan.bad {
        let i = bad.index;
        match bad.problem {
            EntryProblem::Duplicate => {
                let from = bad.value as u64 * header.bat_unit();
                io.read_at(fd, &mut buf, from).await.map_err(io_err)?;
                io.write_at(fd, &buf, end).await.map_err(io_err)?;
                let value = header.bat_value(end).ok_or_else(|| Error::new(libc::EFBIG, "image too large to repair"))?;
                changes.push((i, value));
                repairs.push(format!("entry {i}: shared cluster copied to its own cluster"));
                end += cluster;
            }
            problem => {
                changes.push((i, 0));
                repairs.push(format!("entry {i} ({problem}): cleared, the cluster reads as zeros"));
            }
        }
    }
    io.sync_data(fd).await.map_err(io_err)?;
    // 2: the BAT and a clean header, durable.
    let mut fixed = header.clone();
    fixed.in_use = CLOSED;
    if header.ext_off_sectors != 0 && !keep_extension {
        // As ploop's check does: the header stops pointing at it.
        fixed.ext_off_sectors = 0;
        repairs.push("format extension dropped (changed-block tracking starts over)".into());
    }
    for (i, value) in changes {
        io.write_at(fd, &value.to_le_bytes(), HEADER_SIZE as u64 + 4 * i as u64).await.map_err(io_err)?;
    }
    let mut head = fixed.to_bytes();
    if header.variant == Variant::V1 {
        head[40..44].fill(0);
    }
    io.write_at(fd, &head, 0).await.map_err(io_err)?;
    io.sync_data(fd).await.map_err(io_err)?;
    if report.unclean || !report.header_errors.is_empty() {
        repairs.push("header: in-use mark cleared".into());
    }
    // 3: give leaked space back: holes in the middle, truncation at the end.
    let file_size = load::file_len(io, fd, &name)?;
    let mut rescan = load::scan_bat(io, fd, &header, file_size, &name).await?;
    if let (Some(ext), true) = (&extension, keep_extension) {
        claim_extension(&header, ext, &mut rescan)?;
    }
    // Nothing points at these clusters any more, so a punch that fails
    // (a filesystem without holes) loses nothing: they stay leaked, are
    // reported, and the rest of the repair goes on.
    let data_off = header.data_off_bytes();
    let leaked: Vec<u64> = rescan.unreferenced_inside(data_off, cluster).filter(|&at| !is_hole(io, fd, at, cluster)).collect();
    let mut punched = 0;
    for &at in &leaked {
        if let Err(e) = io.punch_hole(fd, at, cluster).await {
            let left = leaked.len() - punched;
            let why = match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => "the filesystem cannot punch holes",
                _ => "punching a hole failed",
            };
            not_repaired.push(format!("{left} leaked clusters inside the file not released: {why} ({e})"));
            break;
        }
        punched += 1;
    }
    if punched > 0 {
        repairs.push(format!("{punched} leaked clusters inside the file released"));
    }
    if file_size > rescan.high_water {
        io.set_len(fd, rescan.high_water).await.map_err(io_err)?;
        repairs.push(format!("{} leaked bytes cut from the end of the file", file_size - rescan.high_water));
    }
    io.sync_data(fd).await.map_err(io_err)?;
    report.repairs = repairs;
    report.not_repaired = not_repaired;
    Ok(report)
}

/// The format extension the header points at, if any and readable (a
/// stale one of an unclean image is not trusted; an unreadable one is
/// reported).
async fn read_extension<I: Io>(io: &I, fd: std::os::fd::RawFd, header: &Header, file_size: u64, report: &mut CheckReport) -> Option<Extension> {
    if header.ext_off_sectors == 0 || header.in_use == IN_USE {
        return None;
    }
    match ext::read(io, fd, header, file_size).await {
        Ok(e) => {
            report.extension_clusters = Some(e.clusters.len() as u64);
            report.dirty_bitmaps = Some(e.bitmaps.len());
            Some(e)
        }
        Err(e) => {
            report.header_errors.push(format!("{}; --repair drops it", e.message()));
            None
        }
    }
}

/// Count the extension's clusters as used; one the BAT uses too is damage.
fn claim_extension(header: &Header, ext: &Extension, scan: &mut bat::BatScan) -> Result<()> {
    let (cluster, data_off) = (header.cluster_bytes(), header.data_off_bytes());
    for &at in &ext.clusters {
        let slot = ((at - data_off) / cluster) as usize;
        if slot >= scan.used.len() {
            scan.used.resize(slot + 1, false);
        }
        if scan.used[slot] {
            return Err(Error::corrupt(format!("format extension: cluster at byte {at} is also a data cluster")));
        }
        scan.used.set(slot, true);
        scan.high_water = scan.high_water.max(at + cluster);
    }
    Ok(())
}

/// What to do when the header cannot be read.
const BEYOND_REPAIR_HEADER: &str = "the header cannot be trusted, so nothing says where the disk's clusters are; \
    restore the image from a backup or copy";

fn fill_scan<I: Io>(io: &I, report: &mut CheckReport, header: &Header, scan: &bat::BatScan, fd: std::os::fd::RawFd, file_size: u64) {
    let cluster = header.cluster_bytes();
    let data_off = header.data_off_bytes();
    report.allocated_clusters = scan.allocated;
    report.bad_entries = scan.bad.clone();
    // An unreferenced cluster that is a hole owns no space: not a leak.
    let middle = scan.unreferenced_inside(data_off, cluster).filter(|&at| !is_hole(io, fd, at, cluster)).count() as u64;
    let tail = file_size.saturating_sub(scan.high_water).div_ceil(cluster);
    report.leaked_clusters = middle + tail;
}

