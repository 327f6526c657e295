//! Command-line parsing and the offline commands.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use ublk_ploop::check::{check, Verdict};
use ublk_ploop::convert::{convert, ConvertOptions};
use ublk_ploop::io::{block_on, BackendKind, Direct, OwnRing, SyncIo};
use ublk_ploop::layers::header::Header;
use ublk_ploop::layers::{Format, PloopLayer};
use ublk_ploop::size::{format_size, parse_size};
use ublk_ploop::Result;

#[derive(Parser)]
#[command(name = "ublk-ploop", version, about = "OpenVZ ploop images as Linux block devices through ublk")]
struct Cli {
    /// More log output (repeat for more); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// Whether image files bypass the host page cache; shared by every command
/// that opens images.
#[derive(Args, Clone)]
struct DirectArg {
    /// Bypass the host page cache: auto (O_DIRECT where the filesystem
    /// allows it, else buffered with a warning), on, off.
    #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<Direct>())]
    direct: Direct,
}

/// Offline tools also choose their I/O engine (the daemon always moves
/// data on its per-queue io_uring).
#[derive(Args, Clone)]
struct IoArgs {
    #[command(flatten)]
    direct: DirectArg,
    /// I/O engine for image files: uring or sync.
    #[arg(long, default_value = "uring", value_parser = |s: &str| s.parse::<BackendKind>())]
    backend: BackendKind,
}

#[derive(Subcommand)]
enum Command {
    /// Create an empty expandable ploop image.
    Create {
        image: PathBuf,
        /// Virtual disk size (K, M, G, T suffixes).
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
        /// Cluster size, a power of two (default 1M).
        #[arg(long, value_parser = parse_size_arg, default_value = "1M")]
        cluster_size: u64,
        #[arg(long)]
        json: bool,
    },
    /// Show an image's header and allocation.
    Info {
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Check an image for damage; exit 0 clean, 2 corrupt, 3 leaked space only.
    Check {
        image: PathBuf,
        /// Fix what can be fixed (the image must not be in use).
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Serve an image (or a stack, bottom first) as /dev/ublkbN.
    Add {
        /// Image file; repeat for a stack, bottom layer first.
        #[arg(long = "image", required = true)]
        images: Vec<PathBuf>,
        /// Device id (default: the kernel picks one).
        #[arg(long)]
        id: Option<u32>,
        #[command(flatten)]
        dev: DeviceArgs,
        /// Stay in the foreground (for systemd and debugging).
        #[arg(long)]
        foreground: bool,
    },
    /// Stop devices: their daemons close the images cleanly.
    Del {
        #[arg(short = 'n', long = "number", required_unless_present = "all", conflicts_with = "all")]
        id: Option<u32>,
        /// Every ublk-ploop device.
        #[arg(long)]
        all: bool,
        /// Stop a device even while its filesystem is mounted.
        #[arg(long)]
        force: bool,
    },
    /// List ublk devices.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Attach a new daemon to a device whose daemon died (user recovery).
    Recover {
        #[arg(short = 'n', long = "number")]
        id: u32,
        #[arg(long)]
        foreground: bool,
    },
    /// What the running kernel's ublk driver supports.
    Features {
        #[arg(long)]
        json: bool,
    },
    /// A device's state, layers and I/O counters, from its daemon.
    Status {
        #[arg(short = 'n', long = "number")]
        id: u32,
        #[arg(long)]
        json: bool,
    },
    /// Run one device from a TOML config in the foreground, recovering it
    /// if it survived its previous daemon (the systemd unit's command).
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Flatten an image or a stack (bottom first) into a new image.
    Convert {
        /// Source images, bottom layer first, then the destination.
        #[arg(required = true, num_args = 2..)]
        paths: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "ploop")]
        to: ToFormat,
        /// Cluster size of a ploop destination (default: the source's).
        #[arg(long, value_parser = parse_size_arg)]
        cluster_size: Option<u64>,
        /// Print progress to stderr (default when stderr is a terminal).
        #[arg(long)]
        progress: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        io: IoArgs,
    },
}

/// Device settings shared by the commands that create a device.
#[derive(Args, Clone)]
struct DeviceArgs {
    /// Number of hardware queues (one thread each).
    #[arg(long, default_value_t = crate::config::DEFAULT_QUEUES)]
    queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = crate::config::DEFAULT_DEPTH)]
    depth: u16,
    /// Serve the stack read-only (the top image is not modified).
    #[arg(long)]
    read_only: bool,
    /// Group allowed on the control socket besides root.
    #[arg(long)]
    socket_group: Option<String>,
    #[command(flatten)]
    io: DirectArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum ToFormat {
    Raw,
    Ploop,
}

fn parse_size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

pub fn main() -> i32 {
    // Usage errors exit 1, never 2: 2 is `check`'s "image is corrupt".
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    init_logging(cli.verbose);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ublk-ploop: error: {e}");
            1
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // journald stamps every line itself; plain lines read best there.
        builder.without_time().init();
    } else {
        builder.init();
    }
}

fn print_json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("serialisable"));
}

fn run(command: Command) -> Result<i32> {
    match command {
        Command::Add { images, id, dev, foreground } => {
            let config = crate::daemon::DeviceConfig {
                images: crate::config::canonical_images(&images)?,
                queues: crate::config::validate_queues(dev.queues)?,
                depth: crate::config::validate_depth(dev.depth)?,
                read_only: dev.read_only,
                direct: dev.io.direct,
                socket_gid: dev.socket_group.as_deref().map(crate::config::group_id).transpose()?,
            };
            let mode = crate::daemon::Mode::Add { id: id.map_or(-1, |i| i as i32) };
            crate::daemon::start(config, mode, foreground)
        }
        Command::Del { id, all, force } => {
            let ids = if all { our_devices() } else { vec![id.expect("clap requires -n or --all")] };
            for id in ids {
                crate::daemon::delete(id, force)?;
                println!("deleted /dev/ublkb{id}");
            }
            Ok(0)
        }
        Command::List { json } => {
            let devices = list_devices();
            if json {
                print_json(&devices);
            } else if devices.is_empty() {
                println!("no ublk devices");
            } else {
                for d in &devices {
                    println!("{} {} pid {} {} {}", d["device"].as_str().unwrap_or("?"), d["state"].as_str().unwrap_or("?"),
                        d["pid"], d["target"].as_str().unwrap_or("?"),
                        d["images"].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(" <- ")).unwrap_or_default());
                }
            }
            Ok(0)
        }
        Command::Recover { id, foreground } => {
            crate::daemon::require_ublk()?;
            let config = crate::daemon::stored_config(id)?;
            crate::daemon::wait_quiesced(id, std::time::Duration::from_secs(10))?;
            crate::daemon::start(config, crate::daemon::Mode::Recover { id }, foreground)
        }
        Command::Features { json } => {
            crate::daemon::require_ublk()?;
            let bits = libublk::ctrl::UblkCtrl::get_features();
            let names = bits.map(crate::ublk_target::feature_names).unwrap_or_default();
            if json {
                print_json(&serde_json::json!({ "features": bits, "names": names }));
            } else {
                match bits {
                    Some(b) => println!("ublk features {b:#x}: {}", names.join(" ")),
                    None => println!("the ublk driver does not report features (kernel older than 6.5)"),
                }
            }
            Ok(0)
        }
        Command::Status { id, json } => {
            let status = crate::control::request(id, "status", serde_json::Value::Null)?;
            if json {
                print_json(&status);
            } else {
                println!("{} (pid {}), {} bytes{}", status["device"].as_str().unwrap_or("?"), status["pid"], status["size"],
                    if status["read_only"] == true { ", read-only" } else { "" });
                for (i, l) in status["layers"].as_array().into_iter().flatten().enumerate() {
                    println!("  layer {i}: {} ({}{})", l["path"].as_str().unwrap_or("?"), l["format"].as_str().unwrap_or("?"),
                        if l["writable"] == true { ", writable" } else { "" });
                }
                println!("  counters: {}", status["counters"]);
            }
            Ok(0)
        }
        Command::Serve { config } => {
            let (config, id) = crate::config::load(&config)?;
            crate::daemon::require_ublk()?;
            let mode = match id {
                Some(id) if crate::ublk_target::open_ctrl(id).is_some() => {
                    // The device outlived its daemon (a crash and a restart).
                    crate::daemon::wait_quiesced(id, std::time::Duration::from_secs(10))?;
                    tracing::warn!("device {id} exists without a daemon; recovering it");
                    crate::daemon::Mode::Recover { id }
                }
                Some(id) => crate::daemon::Mode::Add { id: id as i32 },
                None => crate::daemon::Mode::Add { id: -1 },
            };
            crate::daemon::start(config, mode, true)
        }
        Command::Create { image, size, cluster_size, json } => {
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
        Command::Info { images, json } => {
            let found = images.iter().map(|p| image_info(p)).collect::<Result<Vec<_>>>()?;
            let damaged = found.iter().any(|(_, problems)| !problems.is_empty());
            let infos: Vec<InfoOut> = found.into_iter().map(|(i, _)| i).collect();
            if json {
                if infos.len() == 1 {
                    print_json(&infos[0]);
                } else {
                    print_json(&infos);
                }
            } else {
                infos.iter().for_each(print_info);
            }
            for i in infos.iter().filter(|i| !i.problems.is_empty()) {
                eprintln!("ublk-ploop: {}: damaged: {} (run `ublk-ploop check`)", i.path, i.problems.join("; "));
            }
            Ok(if damaged { 2 } else { 0 })
        }
        Command::Check { image, repair, json } => {
            let report = block_on(check(&SyncIo, &image, repair))?;
            if json {
                print_json(&serde_json::json!({ "verdict": report.verdict(), "report": report }));
            } else {
                print_check(&report);
            }
            Ok(report.exit_code())
        }
        Command::Convert { mut paths, to, cluster_size, progress, json, io } => {
            let dst = paths.pop().expect("clap requires two paths");
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
            let stats = match io.backend {
                BackendKind::Sync => block_on(convert(&SyncIo, &paths, &dst, &opts, &mut report))?,
                BackendKind::Uring => {
                    let ring = OwnRing::new(64).map_err(|e| ublk_ploop::Error::io(e, "setting up io_uring"))?;
                    ring.block_on(convert(&ring.io(), &paths, &dst, &opts, &mut report))?
                }
            };
            if json {
                print_json(&stats);
            } else {
                println!(
                    "converted {} layer(s) into {}: {} of {} clusters held data",
                    paths.len(),
                    dst.display(),
                    stats.copied_clusters,
                    stats.clusters
                );
            }
            Ok(0)
        }
    }
}

#[derive(Serialize)]
struct InfoOut {
    path: String,
    format: Format,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<ublk_ploop::layers::header::Variant>,
    disk_size: u64,
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
}

impl InfoOut {
    fn from_header(path: &std::path::Path, h: &Header, allocated: u64, file_size: u64) -> InfoOut {
        InfoOut {
            path: path.display().to_string(),
            format: Format::Ploop,
            variant: Some(h.variant),
            disk_size: h.size_bytes(),
            file_size,
            cluster_size: Some(h.cluster_bytes()),
            bat_entries: Some(h.bat_entries),
            allocated_clusters: Some(allocated),
            data_offset: Some(h.data_off_bytes()),
            in_use: Some(h.in_use == ublk_ploop::layers::header::IN_USE),
            flags: Some(h.flags),
            problems: vec![],
        }
    }
}

/// Header and allocation of an image, read without opening it as a layer
/// (so it works on an image a daemon is serving). Damage found on the way
/// is returned with it.
fn image_info(path: &std::path::Path) -> Result<(InfoOut, Vec<String>)> {
    let r = block_on(ublk_ploop::check::inspect(&SyncIo, path))?;
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
        disk_size: r.disk_size,
        file_size: r.file_size,
        cluster_size: ploop.then_some(r.cluster_size),
        bat_entries: r.bat_entries,
        allocated_clusters: ploop.then_some(r.allocated_clusters),
        data_offset: r.data_offset,
        in_use: ploop.then_some(r.unclean),
        flags: r.flags,
        problems: problems.clone(),
    };
    Ok((info, problems))
}

fn print_info(i: &InfoOut) {
    println!("image:        {}", i.path);
    println!("format:       {:?}", i.format);
    println!("disk size:    {} ({} bytes)", format_size(i.disk_size), i.disk_size);
    println!("file size:    {} bytes", i.file_size);
    if let (Some(v), Some(c), Some(n), Some(a)) = (i.variant, i.cluster_size, i.bat_entries, i.allocated_clusters) {
        println!("variant:      {v:?}");
        println!("cluster size: {}", format_size(c));
        println!("clusters:     {a} of {n} allocated");
        println!("in use:       {}", if i.in_use == Some(true) { "yes (open read-write, or not closed cleanly)" } else { "no" });
    }
}

fn print_check(r: &ublk_ploop::check::CheckReport) {
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
    if r.leaked_clusters > 0 {
        println!("  {} leaked cluster(s)", r.leaked_clusters);
    }
    for fix in &r.repairs {
        println!("  repaired: {fix}");
    }
    let verdict = match r.verdict() {
        Verdict::Clean => "no errors",
        Verdict::Leaks => "leaked space only; `check --repair` gives it back",
        Verdict::Corrupt => "DAMAGED; `check --repair` fixes what it can",
    };
    println!("  {} allocated cluster(s); {verdict}", r.allocated_clusters);
}

/// Every ublk device, with what we know of ours.
fn list_devices() -> Vec<serde_json::Value> {
    let found = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let sink = found.clone();
    libublk::ctrl::UblkCtrl::for_each_dev_id(move |id| {
        if let Some(ctrl) = crate::ublk_target::open_ctrl(id) {
            let info = ctrl.dev_info();
            let target = ctrl.get_target_type_from_json().unwrap_or_default();
            let images = ctrl.get_target_data_from_json().and_then(|d| d.get("images").cloned()).unwrap_or_default();
            sink.borrow_mut().push(serde_json::json!({
                "id": id,
                "device": format!("/dev/ublkb{id}"),
                "state": crate::ublk_target::state_name(info.state),
                "pid": info.ublksrv_pid,
                "queues": info.nr_hw_queues,
                "depth": info.queue_depth,
                "target": target,
                "images": images,
            }));
        }
    });
    let mut v = found.take();
    v.sort_by_key(|d| d["id"].as_u64());
    v
}

fn our_devices() -> Vec<u32> {
    list_devices()
        .iter()
        .filter(|d| d["target"] == crate::daemon::TARGET_NAME)
        .filter_map(|d| d["id"].as_u64().map(|i| i as u32))
        .collect()
}
