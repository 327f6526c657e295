//! Offline consistency check and repair of a ploop image.
//!
//! Finds what `open` refuses (BAT entries past EOF, into the metadata,
//! misaligned or shared by two virtual clusters) and what it tolerates
//! (leaked clusters, a stale in-use mark), and repairs both in an order
//! that is itself crash safe: data copies, then the BAT, then trimming.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::layers::bat::{self, BadEntry, EntryProblem};
use crate::layers::header::{Header, Variant, CLOSED, HEADER_SIZE, IN_USE};
use crate::layers::{detect_format, Format};

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
    /// What --repair did.
    pub repairs: Vec<String>,
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
    pub fn verdict(&self) -> Verdict {
        if !self.header_errors.is_empty() || !self.bad_entries.is_empty() || self.unclean {
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
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    check_with(path, repair, true)
}

/// The same report without taking the lock, for `info` on an image that a
/// daemon is serving (its BAT may change while being read).
pub fn inspect(path: &Path) -> Result<CheckReport> {
    check_with(path, false, false)
}

fn check_with(path: &Path, repair: bool, take_lock: bool) -> Result<CheckReport> {
    let format = detect_format(path)?;
    let file = OpenOptions::new().read(true).write(repair).open(path).map_err(|e| Error::io(e, path.display()))?;
    let lock = if repair { libc::LOCK_EX } else { libc::LOCK_SH };
    // SAFETY: plain syscall on our own descriptor.
    if take_lock && unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
        return Err(Error::new(libc::EBUSY, format!("{}: image is in use by another process", path.display())));
    }
    let file_size = file.metadata().map_err(|e| Error::io(e, path.display()))?.len();
    let mut report = CheckReport {
        path: path.display().to_string(),
        format,
        file_size,
        disk_size: file_size,
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
        repairs: vec![],
    };
    if format == Format::Raw {
        if file_size % 512 != 0 {
            report.header_errors.push(format!("raw image size {file_size} is not a multiple of 512"));
        }
        return Ok(report);
    }
    let mut head = [0u8; HEADER_SIZE];
    let got = read_at_most(&file, &mut head, 0)?;
    let header = match Header::parse(&head[..got]) {
        Ok(h) => h,
        Err(e) => {
            // Nothing below can be trusted without a header.
            report.header_errors.push(e.message().to_string());
            if repair {
                return Err(Error::corrupt(format!("{}: header is damaged beyond automatic repair: {e}", path.display())));
            }
            return Ok(report);
        }
    };
    report.disk_size = header.size_bytes();
    report.cluster_size = header.cluster_bytes();
    report.variant = Some(header.variant);
    report.bat_entries = Some(header.bat_entries);
    report.data_offset = Some(header.data_off_bytes());
    report.flags = Some(header.flags);
    if file_size < header.bat_end() {
        report.header_errors.push(format!("file is truncated: {file_size} bytes, the BAT ends at {}", header.bat_end()));
        if repair {
            return Err(Error::corrupt(format!("{}: the BAT itself is truncated; cannot repair", path.display())));
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
    let bat_len = (header.bat_end() - HEADER_SIZE as u64) as usize;
    let mut bat_bytes = Vec::new();
    bat_bytes.try_reserve_exact(bat_len).map_err(|_| Error::too_large(path.display(), 2 * bat_len as u64))?;
    bat_bytes.resize(bat_len, 0);
    file.read_exact_at(&mut bat_bytes, HEADER_SIZE as u64).map_err(|e| Error::io(e, path.display()))?;
    let mut values: Vec<u32> = Vec::new();
    values.try_reserve_exact(bat_len / 4).map_err(|_| Error::too_large(path.display(), 2 * bat_len as u64))?;
    values.extend(bat_bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())));
    drop(bat_bytes);
    let scan = bat::scan(&header, &values, file_size);
    fill_scan(&mut report, &header, &scan, &file, file_size);
    if !repair || report.verdict() == Verdict::Clean {
        return Ok(report);
    }

    // Repair. 1: give each bad entry a fate; duplicates get a private copy.
    let cluster = header.cluster_bytes();
    let mut end = header.data_off_bytes() + file_size.saturating_sub(header.data_off_bytes()).next_multiple_of(cluster);
    let mut buf = vec![0u8; cluster as usize];
    let mut repairs = vec![];
    for bad in &scan.bad {
        let i = bad.index as usize;
        match bad.problem {
            EntryProblem::Duplicate => {
                let from = bad.value as u64 * header.bat_unit();
                file.read_exact_at(&mut buf, from).map_err(|e| Error::io(e, path.display()))?;
                file.write_all_at(&buf, end).map_err(|e| Error::io(e, path.display()))?;
                values[i] = header.bat_value(end).ok_or_else(|| Error::new(libc::EFBIG, "image too large to repair"))?;
                repairs.push(format!("entry {i}: shared cluster copied to its own cluster"));
                end += cluster;
            }
            problem => {
                values[i] = 0;
                repairs.push(format!("entry {i} ({problem}): cleared, the cluster reads as zeros"));
            }
        }
    }
    file.sync_data().map_err(|e| Error::io(e, path.display()))?;
    // 2: the BAT and a clean header, durable.
    let mut fixed = header.clone();
    fixed.in_use = CLOSED;
    let mut meta = Vec::with_capacity(header.bat_end() as usize);
    meta.extend_from_slice(&fixed.to_bytes());
    if header.variant == Variant::V1 {
        meta[40..44].fill(0);
    }
    values.iter().for_each(|v| meta.extend_from_slice(&v.to_le_bytes()));
    file.write_all_at(&meta, 0).map_err(|e| Error::io(e, path.display()))?;
    file.sync_data().map_err(|e| Error::io(e, path.display()))?;
    if report.unclean || !report.header_errors.is_empty() {
        repairs.push("header: in-use mark cleared".into());
    }
    // 3: give leaked space back: holes in the middle, truncation at the end.
    let file_size = file.metadata().map_err(|e| Error::io(e, path.display()))?.len();
    let rescan = bat::scan(&header, &values, file_size);
    let data_off = header.data_off_bytes();
    let mut punched = 0;
    for slot in rescan.used.iter_zeros() {
        let at = data_off + slot as u64 * cluster;
        if at + cluster <= rescan.high_water && !is_hole(&file, at, cluster) {
            crate::io::punch_hole(file.as_raw_fd(), at, cluster).map_err(|e| Error::io(e, path.display()))?;
            punched += 1;
        }
    }
    if punched > 0 {
        repairs.push(format!("{punched} leaked clusters inside the file released"));
    }
    if file_size > rescan.high_water {
        file.set_len(rescan.high_water).map_err(|e| Error::io(e, path.display()))?;
        repairs.push(format!("{} leaked bytes cut from the end of the file", file_size - rescan.high_water));
    }
    file.sync_all().map_err(|e| Error::io(e, path.display()))?;
    drop(file);
    let mut after = check_with(path, false, false)?;
    after.repairs = repairs;
    Ok(after)
}

fn fill_scan(report: &mut CheckReport, header: &Header, scan: &bat::BatScan, file: &File, file_size: u64) {
    let cluster = header.cluster_bytes();
    let data_off = header.data_off_bytes();
    report.allocated_clusters = scan.allocated;
    report.bad_entries = scan.bad.clone();
    let inside = ((scan.high_water - data_off) / cluster) as usize;
    // An unreferenced cluster that is a hole owns no space: not a leak.
    let middle = scan.used[..inside.min(scan.used.len())]
        .iter_zeros()
        .filter(|&slot| !is_hole(file, data_off + slot as u64 * cluster, cluster))
        .count() as u64;
    let tail = file_size.saturating_sub(scan.high_water).div_ceil(cluster);
    report.leaked_clusters = middle + tail;
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// True when `[at, at+len)` holds no data blocks (a punched or never
/// written range).
fn is_hole(file: &File, at: u64, len: u64) -> bool {
    // SAFETY: plain syscall on our own descriptor.
    let next = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
    next < 0 || next as u64 >= at + len
}
