//! The image verbs: make, inspect, repair, resize, compact and convert
//! image files and disk directories no device serves (resize and compact
//! also online, through a device's daemon, with -n).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use ublk_ploop::layers::ploop::check::{check_in, CheckReport, Verdict};
use ublk_ploop::convert::{convert, ConvertOptions};
use ublk_ploop::disk::resolve::{self, Named};
use ublk_ploop::disk::{Disk, Place};
use ublk_ploop::io::{block_on, BackendKind, OwnRing, SyncIo};
use ublk_ploop::layers::ploop::header::Header;
use ublk_ploop::layers::{Format, PloopLayer};
use ublk_ploop::size::format_size;
use ublk_ploop::tracker::Tracker;
use ublk_ploop::{Error, LayerSpec, Result, Stack, StackOptions};

use crate::cli::args::{ConvertArgs, FormatArg, Geometry, ImageCommand, ToFormat};
use crate::cli::output::{follow, print_json, Bar};
use crate::cli::signals::clean_up_on_signals;
use crate::control::request;
use ublk_ploop::protocol::{Job, Request};

pub fn run(command: ImageCommand) -> Result<i32> {
    match command {
        ImageCommand::Create { image, geometry, json } => create(image, geometry, json),
        ImageCommand::Init { dir, geometry, json } => init(dir, geometry, json),
        ImageCommand::Info { images, format, json } => info(images, format, json),
        ImageCommand::Check { image, repair, format, json } => check_cmd(image, repair, format, json),
        ImageCommand::Resize { id, image, size, format, json } => resize_cmd(id, image, size, format, json),
        ImageCommand::Compact { id, image, step, speed, base, json } => compact(id, image, step, speed, base, json),
    }
}

/// A new empty expandable image file.
fn create(image: PathBuf, geometry: Geometry, json: bool) -> Result<i32> {
    let Geometry { size, cluster_size } = geometry;
    // In whole clusters, as ploop's tool rounds a new image's size.
    let size = ublk_ploop::layers::ploop::header::whole_clusters(size, cluster_size)?;
    let header = block_on(PloopLayer::create(&SyncIo, &image, size, cluster_size))?;
    let info = InfoOut::from_header(&image, &header, 0, header.data_off_bytes());
    if json {
        print_json(&info);
    } else {
        println!(
            "created {}: {} disk, {} clusters",
            image.display(),
            format_size(size),
            format_size(cluster_size)
        );
    }
    Ok(0)
}

/// A new disk directory: a base delta and its descriptor.
fn init(dir: PathBuf, geometry: Geometry, json: bool) -> Result<i32> {
    let Geometry { size, cluster_size } = geometry;
    // In whole clusters, as ploop's tool rounds a new disk's size.
    let size = ublk_ploop::layers::ploop::header::whole_clusters(size, cluster_size)?;
    let disk = block_on(Disk::init(&SyncIo, &dir, size, cluster_size))?;
    if json {
        print_json(&serde_json::json!({
            "dir": disk.dir,
            "descriptor": disk.xml_path(),
            "size": disk.desc.size(),
            "cluster_size": disk.desc.cluster_size(),
            "top": disk.desc.top,
        }));
    } else {
        println!("created {}: {} disk, {} clusters, base {}", disk.xml_path().display(), format_size(disk.desc.size()),
            format_size(cluster_size), disk.dir.join(ublk_ploop::disk::BASE_FILE).display());
    }
    Ok(0)
}

/// Headers and allocation of image files or of a disk's deltas; exit 2
/// when any is damaged.
fn info(images: Vec<PathBuf>, format: FormatArg, json: bool) -> Result<i32> {
    let (disk, paths) = resolve::files(&images, &format.format)?;
    let found = paths.iter().map(|(p, f)| image_info(p, *f)).collect::<Result<Vec<_>>>()?;
    let infos: Vec<InfoOut> = found.iter().map(|(i, _)| i.clone()).collect();
    let disk_problems = match &disk {
        Some(d) => disk_size_problems(d, &infos.iter().map(|i| (i.path.clone(), i.disk_size)).collect::<Vec<_>>()),
        None => vec![],
    };
    let damaged = found.iter().any(|(_, problems)| !problems.is_empty()) || !disk_problems.is_empty();
    if json {
        match &disk {
            Some(d) => print_json(&serde_json::json!({
                "disk": d.dir,
                "size": d.desc.size(),
                "cluster_size": d.desc.cluster_size(),
                "top": d.desc.top,
                "snapshots": d.snapshot_rows(),
                "images": infos,
                "problems": disk_problems,
            })),
            None if infos.len() == 1 => print_json(&infos[0]),
            None => print_json(&infos),
        }
    } else {
        if let Some(d) = &disk {
            println!("disk:         {} ({} deltas, {} clusters)", d.xml_path().display(), d.desc.images.len(), format_size(d.desc.cluster_size()));
            println!("disk size:    {} ({} bytes)", format_size(d.desc.size()), d.desc.size());
            print!("{}", ublk_ploop::disk::format_snapshot_rows(&d.snapshot_rows()));
        }
        infos.iter().for_each(print_info);
    }
    for i in infos.iter().filter(|i| !i.problems.is_empty()) {
        eprintln!("ublk-ploop: {}: damaged: {} (run `ublk-ploop check`)", i.path, i.problems.join("; "));
    }
    for p in &disk_problems {
        eprintln!("ublk-ploop: {}: {p}", disk.as_ref().map(|d| d.xml_path().display().to_string()).unwrap_or_default());
    }
    Ok(if damaged { 2 } else { 0 })
}

/// Check (and with `repair`, fix) an image or every delta of a disk; the
/// exit code says the worst found.
fn check_cmd(image: PathBuf, repair: bool, format: FormatArg, json: bool) -> Result<i32> {
    let (mut disk, mut paths) = resolve::files(std::slice::from_ref(&image), &format.format)?;
    // A repair changes the disk: under ploop's disk lock (waiting
    // for another holder, as snapshot and resize do), with the
    // descriptor read again once the lock is ours.
    let _lock = match (&disk, repair) {
        (Some(d), true) => {
            super::device_cmd::refuse_if_served(&d.dir)?;
            let lock = d.lock()?;
            (disk, paths) = resolve::files(std::slice::from_ref(&image), &[])?;
            Some(lock)
        }
        _ => None,
    };
    // A repair writes only the disk's own deltas: one outside its
    // directory (a template shared with clones) is checked read-only, and
    // its damage is reported for whoever owns it to repair.
    let own: Vec<bool> = match &disk {
        Some(d) => d.desc.images.iter().map(|img| d.home_place(img) == Place::Inside).collect(),
        None => vec![true; paths.len()],
    };
    let mut reports = Vec::new();
    for ((path, format), own) in paths.iter().zip(&own) {
        // A disk's QCOW2 base is never written: checked (its tables), not
        // repaired; a QCOW2 image named alone refuses --repair itself.
        let writable = *own && (*format != Format::Qcow2 || disk.is_none());
        if repair && !writable {
            eprintln!("{}: a shared delta or a QCOW2 image: checked, not repaired", path.display());
        }
        let report = match block_on(check_in(&SyncIo, path, *format, repair && writable, None)) {
            // Damage no repair can mend is the image's verdict, not a
            // failure of the command: reported (exit 2), as without --repair.
            Err(e) if repair && writable && e.errno() == libc::EUCLEAN => {
                eprintln!("not repaired: {e}");
                block_on(check_in(&SyncIo, path, *format, false, None))?
            }
            report => report?,
        };
        reports.push(report);
    }
    let problems = match &disk {
        Some(d) => disk_size_problems(d, &reports.iter().map(|r| (r.path.clone(), known_size(r))).collect::<Vec<_>>()),
        None => vec![],
    };
    // The worst: corrupt (2) over leaks (3) over clean (0); a disk
    // whose deltas disagree with its descriptor counts as corrupt.
    let worst = reports.iter().map(|r| r.verdict()).chain(problems.iter().map(|_| Verdict::Corrupt)).max_by_key(|v| match v {
        Verdict::Corrupt => 2,
        Verdict::Leaks => 1,
        Verdict::Clean => 0,
    });
    let worst = worst.unwrap_or(Verdict::Clean);
    if json {
        // One shape whatever the number of deltas.
        let deltas: Vec<_> = reports.iter().map(|r| serde_json::json!({ "verdict": r.verdict(), "report": r })).collect();
        print_json(&serde_json::json!({ "verdict": worst, "deltas": deltas, "problems": problems }));
    } else {
        reports.iter().for_each(print_check);
        for p in &problems {
            println!("{}: {p}", disk.as_ref().map(|d| d.xml_path().display().to_string()).unwrap_or_default());
        }
    }
    Ok(match worst {
        Verdict::Clean => 0,
        Verdict::Corrupt => 2,
        Verdict::Leaks => 3,
    })
}

/// A new disk size, online through the device's daemon or offline.
fn resize_cmd(id: Option<u32>, image: Option<PathBuf>, size: u64, format: FormatArg, json: bool) -> Result<i32> {
    use ublk_ploop::layers::ploop::header::whole_clusters;
    use ublk_ploop::layers::ploop::resize::{cluster_of, resize, resize_raw, Resized};
    let image = match (id, image) {
        (Some(id), _) => {
            let done: Resized = request(id, Request::Resize { size })?;
            if json {
                print_json(&[done]);
            } else {
                println!("/dev/ublkb{id}: {} -> {} bytes", done.old_size, done.new_size);
            }
            return Ok(0);
        }
        (None, Some(image)) => image,
        (None, None) => unreachable!("clap requires -n or IMAGE"),
    };
    // A resize does not stop halfway (its images are marked in use while
    // their tables grow): Ctrl-C lets it finish, and only a second one
    // ends it at once, as a crash would.
    crate::cli::signals::stop_between_steps_on_signals("resize", "the resize finishes first");
    let done = match resolve::files(std::slice::from_ref(&image), &format.format)? {
        // In whole clusters, as ploop's resize rounds it (raw deltas too:
        // the disk's size is one for every delta).
        (Some(mut disk), _) => {
            super::device_cmd::refuse_if_served(&disk.dir)?;
            let size = whole_clusters(size, disk.desc.cluster_size())?;
            block_on(disk.resize(&SyncIo, size))?
        }
        (None, paths) => {
            let (path, format) = &paths[0];
            // A delta of a disk named on its own keeps the disk's rules.
            let _disk = resolve::disk_of_image(path, "resize")?;
            vec![match format {
                Format::Raw => block_on(resize_raw(&SyncIo, path, size, true))?,
                _ => block_on(resize(&SyncIo, path, whole_clusters(size, block_on(cluster_of(&SyncIo, path))?)?, true))?,
            }]
        }
    };
    if json {
        print_json(&done);
    } else {
        let old = done.first().map_or(size, |d| d.old_size);
        let moved: u64 = done.iter().map(|d| d.relocated).sum();
        println!("{}: {} -> {} bytes{}", image.display(), old, size, if moved > 0 { format!(" ({moved} clusters moved for the larger table)") } else { String::new() });
        if done.iter().any(|d| d.dropped_change_record) {
            println!("the changed-block record was dropped (it described the old size): the next incremental backup sends everything");
        }
    }
    if let Some(sig) = crate::cli::signals::stop_asked() {
        eprintln!("ublk-ploop: resize: {} came while resizing; the resize finished first (its images are closed clean)", crate::cli::signals::signal_name(sig));
    }
    Ok(0)
}

/// Compact a served disk (a job) or a disk directory or image no device
/// serves: its top image's free space goes back to the host filesystem.
fn compact(id: Option<u32>, target: Option<PathBuf>, step: Option<u64>, speed: Option<u64>, base: bool, json: bool) -> Result<i32> {
    use ublk_ploop::layers::ploop::compact::Compacted;
    let done: Compacted = match (id, target) {
        (Some(id), _) => {
            let _started: Job = request(id, Request::Compact { step, speed })?;
            follow(id, json)?.compacted().cloned().ok_or_else(|| Error::new(libc::EPROTO, "the daemon reported no result"))?
        }
        (None, Some(target)) => {
            // ploop's lock is held (the disk) until the image is closed:
            // another offline command holding it is waited for, and the
            // descriptor is read once it is ours; only a top inside the
            // directory is ever compacted.
            let (_disk, layers, unknown_below) = match resolve::name(std::slice::from_ref(&target), &[])? {
                Named::Disk(dir) => {
                    super::device_cmd::refuse_if_served(&dir)?;
                    let disk = Disk::load_locked(&dir)?;
                    let layers = block_on(disk.writable_layers(&SyncIo))?;
                    (Some(disk), layers, false)
                }
                // An image file given on its own: the chain below it when
                // its disk names it (its lower layers say which discarded
                // clusters must stay, reading as zeros over theirs), else
                // the file alone, over an unknown lower part unless the
                // caller says it is a base.
                Named::Images(..) => match resolve::disk_of_image(&target, "compact")? {
                    Some((disk, layers)) => (Some(disk), layers, false),
                    None => (None, vec![LayerSpec { path: target.clone(), format: Format::Ploop }], !base),
                },
            };
            // Ctrl-C or a service stop ends it between steps, closed clean
            // (set before the image is first opened; the lock is held).
            crate::cli::signals::stop_between_steps_on_signals("compact", "stopping after the step under way");
            // Refused before the image is opened: opening marks it in use.
            let top = layers.last().expect("a chain is never empty");
            if top.format == Format::Ploop {
                let seen = block_on(ublk_ploop::layers::ploop::check::inspect(&SyncIo, &top.path, top.format))?;
                if seen.variant == Some(ublk_ploop::layers::ploop::header::Variant::V1) {
                    return Err(Error::unsupported(format!(
                        "{}: compacting v1 (WithoutFreeSpace) images is not supported; convert it first",
                        top.path.display()
                    )));
                }
            }
            let (stack, _) = block_on(Stack::open_layers(&SyncIo, &layers, &StackOptions::default()))?;
            // The read-write open took the top's record of changes out of
            // the file; it goes back in when the stack closes (compaction
            // moves clusters in the file, not on the disk the record maps).
            if let Some(bm) = block_on(stack.take_saved_bitmaps()).into_iter().next() {
                let t = Arc::new(Tracker::from_bits(stack.size(), bm.granularity, &bm.bits));
                stack.keep_on_close(Some((t, bm.id)));
            }
            let bar = Bar::new(json, "compacting");
            let pace = crate::pace::Pace::new(speed);
            let cluster = stack.cluster_size();
            let stopping = || crate::cli::signals::stop_asked().is_some();
            let result = block_on(stack.compact_with(
                &SyncIo,
                step.unwrap_or(256).max(1),
                unknown_below,
                &|d, t| {
                    bar.set(d, t);
                    pace.wait_unless(&SyncIo, d * cluster, d >= t, &stopping);
                },
                &|| !stopping(),
            ));
            bar.finish();
            let closed = block_on(stack.close(&SyncIo));
            let done = result?;
            closed?;
            if unknown_below && !json {
                eprintln!(
                    "note: {} may be a delta over other images (no DiskDescriptor.xml beside it names it): \
                     discarded clusters were kept; give --base if nothing lies below it",
                    target.display()
                );
            }
            done
        }
        (None, None) => unreachable!("clap requires -n or a path"),
    };
    if json {
        print_json(&done);
    } else {
        println!(
            "compacted: {} discarded clusters unlinked, {} moved; file {} -> {} bytes",
            done.unlinked, done.moved, done.file_size_before, done.file_size_after
        );
    }
    match crate::cli::signals::stop_asked() {
        Some(sig) if !done.done => {
            eprintln!(
                "ublk-ploop: compact stopped by {} with {} moves left; the image is closed clean: run compact again to go on",
                crate::cli::signals::signal_name(sig),
                done.remaining
            );
            Ok(128 + sig)
        }
        _ => Ok(0),
    }
}

/// Flatten a stack or a disk (or one of its snapshots) into a new image.
pub fn convert_cmd(args: ConvertArgs) -> Result<i32> {
    let ConvertArgs { mut paths, to, format, snapshot, cluster_size, progress, json, io } = args;
    let dst = paths.pop().expect("clap requires two paths");
    let sources = resolve::layers(&paths, &format.format, snapshot)?.layers;
    if dst == Path::new("-") {
        return Err(Error::invalid("convert writes an image file, not a stream: name the destination file ('-' is not stdout here)"));
    }
    // An interrupted convert leaves no partial destination: the signal's
    // handler removes it, listed at the first progress report, which
    // comes as soon as convert has made it (exclusively: it is ours).
    clean_up_on_signals("convert");
    let mut listed = false;
    let opts = ConvertOptions {
        to: match to {
            ToFormat::Raw => Format::Raw,
            ToFormat::Ploop => Format::Ploop,
        },
        cluster_size,
        direct: io.direct.direct,
    };
    let show = progress || std::io::stderr().is_terminal();
    let mut last_pct = u64::MAX;
    let mut report = |done: u64, total: u64| {
        if !listed {
            ublk_ploop::copy::receive::register_temporary(&dst, false);
            listed = true;
        }
        if total == 0 {
            return;
        }
        let pct = done * 100 / total.max(1);
        if show && pct != last_pct {
            last_pct = pct;
            eprint!("\rconverting: {pct:3}% ({done}/{total} clusters)");
            if done == total {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    };
    let converted = match io.backend {
        BackendKind::Sync => block_on(convert(&SyncIo, &sources, &dst, &opts, &mut report)),
        BackendKind::Uring => {
            let ring = OwnRing::new(64).map_err(|e| Error::io(e, "setting up io_uring"))?;
            ring.block_on(convert(&ring.io(), &sources, &dst, &opts, &mut report))
        }
    };
    // Done or failed (and then removed by convert): no longer ours to remove.
    ublk_ploop::copy::receive::forget_temporary(&dst);
    let stats = converted?;
    if json {
        print_json(&stats);
    } else {
        println!(
            "converted {} layer(s) into {}: {} of {} clusters held data",
            sources.len(),
            dst.display(),
            stats.copied_clusters,
            stats.clusters
        );
    }
    Ok(0)
}

/// The disk size a report found, when its header said one.
fn known_size(r: &CheckReport) -> Option<u64> {
    (r.format == Format::Raw || r.variant.is_some()).then_some(r.disk_size)
}

/// Deltas whose disk size disagrees with the descriptor (a resize that
/// stopped between the deltas and the descriptor): the top must have the
/// descriptor's size, a lower delta at most that (an online grow grows
/// only the top). `sizes` are in the descriptor's order.
fn disk_size_problems(disk: &Disk, sizes: &[(String, Option<u64>)]) -> Vec<String> {
    let want = disk.desc.size();
    let top = disk.desc.image(disk.desc.top).map(|i| disk.file_path(i).display().to_string());
    let mut problems = vec![];
    for (path, size) in sizes {
        let Some(size) = *size else { continue };
        let is_top = top.as_deref() == Some(path.as_str());
        if size > want || (is_top && size != want) {
            problems.push(format!(
                "the delta {path} has a disk size of {size} bytes but the descriptor says {want}: \
                 a resize did not finish; `ublk-ploop resize {} --size {}` finishes it",
                disk.dir.display(),
                if is_top { size } else { want }
            ));
        }
    }
    problems
}

#[derive(Serialize, Clone)]
struct InfoOut {
    path: String,
    format: Format,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<ublk_ploop::layers::ploop::header::Variant>,
    /// None when the header that would say it cannot be read.
    disk_size: Option<u64>,
    file_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bat_entries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allocated_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_use: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flags: Option<u32>,
    /// Damage seen while reading (details: `check`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    problems: Vec<String>,
    /// A QCOW2 image's version, compression and backing files (nearest
    /// first).
    #[serde(skip_serializing_if = "Option::is_none")]
    qcow2: Option<Qcow2Info>,
}

#[derive(Serialize, Clone)]
struct Qcow2Info {
    version: u32,
    compression: &'static str,
    extended_l2: bool,
    backing: Vec<String>,
}

impl InfoOut {
    fn from_header(path: &std::path::Path, h: &Header, allocated: u64, file_size: u64) -> InfoOut {
        InfoOut {
            path: path.display().to_string(),
            format: Format::Ploop,
            variant: Some(h.variant),
            disk_size: Some(h.size_bytes()),
            file_size,
            cluster_size: Some(h.cluster_bytes()),
            bat_entries: Some(h.bat_entries),
            allocated_clusters: Some(allocated),
            data_offset: Some(h.data_off_bytes()),
            in_use: Some(h.in_use == ublk_ploop::layers::ploop::header::IN_USE),
            flags: Some(h.flags),
            problems: vec![],
            qcow2: None,
        }
    }
}

/// Header and allocation of an image, read without opening it as a layer
/// (so it works on an image a daemon is serving). Damage found on the way
/// is returned with it.
fn image_info(path: &Path, format: Format) -> Result<(InfoOut, Vec<String>)> {
    if format == Format::Qcow2 {
        let q = block_on(ublk_ploop::layers::qcow2::Qcow2Image::open(&SyncIo, path))?;
        let h = q.header();
        let info = InfoOut {
            path: path.display().to_string(),
            format,
            variant: None,
            disk_size: Some(q.size()),
            file_size: std::fs::metadata(path).map_err(|e| Error::io(e, path.display()))?.len(),
            cluster_size: Some(h.cluster_size()),
            bat_entries: None,
            allocated_clusters: None,
            data_offset: None,
            in_use: None,
            flags: None,
            problems: vec![],
            qcow2: Some(Qcow2Info {
                version: h.version,
                compression: match h.compression {
                    ublk_ploop::layers::qcow2::header::Compression::Zlib => "zlib",
                    ublk_ploop::layers::qcow2::header::Compression::Zstd => "zstd",
                },
                extended_l2: h.extended_l2,
                backing: q.chain().into_iter().skip(1).map(|p| p.display().to_string()).collect(),
            }),
        };
        return Ok((info, vec![]));
    }
    let r = block_on(ublk_ploop::layers::ploop::check::inspect(&SyncIo, path, format))?;
    let mut problems = r.header_errors.clone();
    problems.extend(r.bad_entries.iter().map(|b| format!("BAT entry {} {}", b.index, b.problem)));
    if r.header_errors.is_empty() && r.format == Format::Ploop && r.variant.is_none() {
        problems.push("unreadable header".into());
    }
    let ploop = r.format == Format::Ploop && r.variant.is_some();
    let info = InfoOut {
        path: r.path,
        format: r.format,
        variant: r.variant,
        disk_size: (!(r.format == Format::Ploop && r.variant.is_none())).then_some(r.disk_size),
        file_size: r.file_size,
        cluster_size: ploop.then_some(r.cluster_size),
        bat_entries: r.bat_entries,
        allocated_clusters: ploop.then_some(r.allocated_clusters),
        data_offset: r.data_offset,
        in_use: ploop.then_some(r.unclean),
        flags: r.flags,
        problems: problems.clone(),
        qcow2: None,
    };
    Ok((info, problems))
}

fn print_info(i: &InfoOut) {
    println!("image:        {}", i.path);
    println!("format:       {:?}", i.format);
    match i.disk_size {
        Some(d) => println!("disk size:    {} ({d} bytes)", format_size(d)),
        None => println!("disk size:    unknown (the header is unreadable)"),
    }
    println!("file size:    {} bytes", i.file_size);
    if let (Some(v), Some(c), Some(n), Some(a)) = (i.variant, i.cluster_size, i.bat_entries, i.allocated_clusters) {
        println!("variant:      {v:?}");
        println!("cluster size: {}", format_size(c));
        println!("clusters:     {a} of {n} allocated");
        println!("in use:       {}", if i.in_use == Some(true) { "yes (open read-write, or not closed cleanly)" } else { "no" });
    }
    if let (Some(q), Some(c)) = (&i.qcow2, i.cluster_size) {
        println!("version:      {}{}", q.version, if q.extended_l2 { ", extended L2" } else { "" });
        println!("cluster size: {}", format_size(c));
        println!("compression:  {}", q.compression);
        for b in &q.backing {
            println!("backing file: {b}");
        }
    }
}

fn print_check(r: &CheckReport) {
    println!("{}: {:?} image", r.path, r.format);
    for e in &r.header_errors {
        println!("  header: {e}");
    }
    if r.unclean {
        println!("  in-use mark set: the image was not closed cleanly");
    }
    for b in &r.bad_entries {
        println!("  BAT entry {} (value {}) {}", b.index, b.value, b.problem);
    }
    for t in &r.table_errors {
        println!("  {t}");
    }
    if r.leaked_clusters > 0 {
        println!("  {} leaked cluster(s)", r.leaked_clusters);
    }
    for fix in &r.repairs {
        println!("  repaired: {fix}");
    }
    for left in &r.not_repaired {
        println!("  not repaired: {left}");
    }
    let verdict = match (r.verdict(), &r.beyond_repair) {
        (Verdict::Clean, _) => "no errors".to_string(),
        (Verdict::Leaks, _) if !r.not_repaired.is_empty() => "leaked space only; no data at risk".to_string(),
        (Verdict::Leaks, _) => "leaked space only; `check --repair` gives it back".to_string(),
        (Verdict::Corrupt, Some(why)) => format!("DAMAGED beyond automatic repair: {why}"),
        (Verdict::Corrupt, None) => "DAMAGED; `check --repair` fixes what it can".to_string(),
    };
    if r.variant.is_none() && r.format == Format::Ploop {
        println!("  {verdict}");
    } else {
        println!("  {} allocated cluster(s); {verdict}", r.allocated_clusters);
    }
}
