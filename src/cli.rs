//! Command-line parsing and the offline commands.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use ublk_ploop::layers::ploop::check::{check, CheckReport, Verdict};
use ublk_ploop::convert::{convert, ConvertOptions};
use ublk_ploop::disk::{Disk, Guid};
use ublk_ploop::io::{block_on, BackendKind, Direct, OwnRing, SyncIo};
use ublk_ploop::layers::ploop::header::Header;
use ublk_ploop::layers::{Format, PloopLayer};
use ublk_ploop::size::{format_size, parse_size};
use ublk_ploop::{Error, LayerSpec, Result};

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

/// How image files are read: a disk directory's descriptor says it; plain
/// files are ploop images unless declared raw.
#[derive(Args, Clone)]
struct FormatArg {
    /// Format of image files given by path: ploop (default) or raw. A disk
    /// directory's descriptor declares its own.
    #[arg(long, value_parser = |s: &str| s.parse::<Format>())]
    format: Option<Format>,
}

/// A device (online, through its daemon) or a disk directory (offline):
/// one of the two is required, and a usage error names both.
#[derive(Args, Clone)]
#[group(id = "target", required = true, multiple = false)]
struct Target {
    /// The device serving the disk.
    #[arg(short = 'n', long = "number")]
    id: Option<u32>,
    /// A disk directory (or its DiskDescriptor.xml) no device serves.
    #[arg(value_name = "DISK_DIR")]
    dir: Option<PathBuf>,
}

fn parse_guid(s: &str) -> std::result::Result<Guid, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

#[derive(Subcommand)]
enum Command {
    /// Create an empty expandable ploop image file.
    Create {
        image: PathBuf,
        #[command(flatten)]
        geometry: Geometry,
        #[arg(long)]
        json: bool,
    },
    /// Create a ploop disk directory: root.hds and DiskDescriptor.xml
    /// (ploop's descriptor allows clusters of 32K to 64M).
    Init {
        dir: PathBuf,
        #[command(flatten)]
        geometry: Geometry,
        #[arg(long)]
        json: bool,
    },
    /// Show an image's (or a disk directory's) header and allocation.
    Info {
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[command(flatten)]
        format: FormatArg,
        #[arg(long)]
        json: bool,
    },
    /// Check an image (or every delta of a disk directory) for damage;
    /// exit 0 clean, 2 corrupt, 3 leaked space only.
    Check {
        image: PathBuf,
        /// Fix what can be fixed (the image must not be in use).
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        format: FormatArg,
        #[arg(long)]
        json: bool,
    },
    /// Change the disk size of an image or a disk directory no device
    /// serves (ploop's `resize`): growing moves data clusters out of the
    /// way of a larger table when needed; shrinking only drops space no
    /// data was written to.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["id", "image"])))]
    Resize {
        /// The device serving the disk (online: needs a kernel with
        /// UPDATE_SIZE; only the top image grows, as with ploop).
        #[arg(short = 'n', long = "number")]
        id: Option<u32>,
        /// Image file, or a disk directory (or its DiskDescriptor.xml), no
        /// device serves.
        #[arg(value_name = "IMAGE_OR_DISK_DIR")]
        image: Option<PathBuf>,
        /// New disk size (bytes, or with K/M/G/T/P/E).
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
        #[command(flatten)]
        format: FormatArg,
        #[arg(long)]
        json: bool,
    },
    /// Give the space of discarded clusters back to the host filesystem:
    /// clusters from the end of the top image move into the holes, then the
    /// file is cut (online with -n: requests wait one step at a time).
    #[command(group(clap::ArgGroup::new("target").required(true).args(["id", "image"])))]
    Compact {
        /// The device serving the disk.
        #[arg(short = 'n', long = "number")]
        id: Option<u32>,
        /// Image file, or a disk directory (or its DiskDescriptor.xml), no
        /// device serves.
        #[arg(value_name = "IMAGE_OR_DISK_DIR")]
        image: Option<PathBuf>,
        /// Clusters moved per step; online, requests wait for one step
        /// (default 16 online, 256 offline).
        #[arg(long)]
        step: Option<u64>,
        /// Limit the moves to this many bytes per second on average (K/M/G
        /// suffixes), to leave the container's I/O room.
        #[arg(long, value_parser = parse_size_arg)]
        speed: Option<u64>,
        /// The image file is a base: nothing lies below it. Only then are
        /// its discarded clusters unlinked when no DiskDescriptor.xml beside
        /// it names it (a delta's unlinked cluster would show its parent's
        /// old data); without it they stay linked, reading as zeros.
        #[arg(long, conflicts_with = "id")]
        base: bool,
        #[arg(long)]
        json: bool,
    },
    /// Serve an image, a stack (bottom first) or a disk directory as /dev/ublkbN.
    Add {
        /// Image file (repeat for a stack, bottom layer first), or one disk
        /// directory (or its DiskDescriptor.xml).
        #[arg(long = "image", required = true)]
        images: Vec<PathBuf>,
        #[command(flatten)]
        format: FormatArg,
        /// Serve this snapshot of the disk directory, read-only, beside the
        /// device that serves the disk (as `ploop mount -r -u GUID`).
        #[arg(long, value_parser = parse_guid)]
        snapshot: Option<Guid>,
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
    /// A device's state, layers, I/O counters and running job, from its daemon.
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
    /// Flatten an image, a stack (bottom first) or a disk directory into a new image.
    Convert {
        /// Sources (bottom layer first, or one disk directory), then the destination.
        #[arg(required = true, num_args = 2..)]
        paths: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "ploop")]
        to: ToFormat,
        #[command(flatten)]
        format: FormatArg,
        /// Convert this snapshot of the disk directory instead of its top.
        #[arg(long, value_parser = parse_guid)]
        snapshot: Option<Guid>,
        /// Cluster size of a ploop destination, a power of two from 32K to
        /// 64M (default: the source's).
        #[arg(long, value_parser = parse_cluster_arg)]
        cluster_size: Option<u64>,
        /// Print progress to stderr (default when stderr is a terminal).
        #[arg(long)]
        progress: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        io: IoArgs,
    },
    /// Take a snapshot: the top delta is frozen under a new GUID (printed)
    /// and a new empty top takes the writes.
    Snapshot {
        #[command(flatten)]
        target: Target,
        /// GUID for the snapshot (default: a random one).
        #[arg(short = 'u', long, value_parser = parse_guid)]
        uuid: Option<Guid>,
        #[arg(long)]
        json: bool,
    },
    /// List the snapshots of a disk (ploop's columns; * marks the top).
    SnapshotList {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Merge a delta (the top by default) into its parent, online.
    SnapshotMerge {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'u', long, value_parser = parse_guid)]
        uuid: Option<Guid>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (merged into its child when it has one).
    SnapshotDelete {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'u', long, value_parser = parse_guid, required = true)]
        uuid: Guid,
        #[arg(long)]
        json: bool,
    },
    /// Switch the disk to a snapshot (roll back): its content on a new
    /// empty top; the old top and what was written since are removed.
    SnapshotSwitch {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'u', long, value_parser = parse_guid, required = true)]
        uuid: Guid,
        /// Switch even while the device's filesystem is mounted.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// The write tracker: `start`, then `get` prints the byte ranges
    /// changed since the last `get` (and clears them), `stop`.
    Track {
        #[arg(value_enum)]
        action: TrackArg,
        #[arg(short = 'n', long = "number")]
        id: u32,
        #[arg(long)]
        json: bool,
    },
    /// Copy a serving device live (ploop copy): everything, then rounds of
    /// what changed, then a short freeze (the filesystem on it too) for the
    /// last changes. The copy goes to a stream that `receive` makes an
    /// image of; the report goes to stderr when the stream is stdout.
    Copy {
        #[arg(short = 'n', long = "number")]
        id: u32,
        #[command(flatten)]
        dest: DestArgs,
        /// Stop the device after the last pass (a migration).
        #[arg(long)]
        stop: bool,
        /// With --stop: even while its filesystem is mounted.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        limits: LimitArgs,
        #[arg(long)]
        json: bool,
    },
    /// Back up a serving device from a frozen point: everything, or with
    /// --incremental what changed since the previous backup (changes are
    /// tracked from the first backup on, across clean restarts).
    Backup {
        #[arg(short = 'n', long = "number")]
        id: u32,
        #[command(flatten)]
        dest: DestArgs,
        #[arg(long)]
        incremental: bool,
        #[command(flatten)]
        limits: LimitArgs,
        #[arg(long)]
        json: bool,
    },
    /// Make a ploop image (or, for a directory, a disk directory) from a
    /// copy stream, or with --incremental bring an existing one up to date.
    Receive {
        /// The image (or empty directory) to create, or to update.
        #[arg(long = "image")]
        image: PathBuf,
        /// A stream file, or - for stdin (the default).
        #[arg(long, conflicts_with = "listen")]
        from: Option<PathBuf>,
        /// Accept one sender on HOST:PORT or a unix socket path, and
        /// answer it packet by packet (as ploop's receiver does).
        #[arg(long)]
        listen: Option<String>,
        #[arg(long)]
        incremental: bool,
        /// Refuse a stream that describes a larger disk (default: the free
        /// space of the destination's filesystem).
        #[arg(long = "max-size", value_parser = parse_size_arg)]
        max_size: Option<u64>,
        /// Give up on a socket that stays silent this many seconds (0:
        /// wait forever).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        io: DirectArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TrackArg {
    Start,
    Get,
    Stop,
}

/// Where a copy stream goes.
#[derive(Args, Clone)]
struct DestArgs {
    /// A new file, or - for stdout (a one-way stream with checksums).
    #[arg(long, conflicts_with = "connect", required_unless_present = "connect")]
    to: Option<PathBuf>,
    /// A receiver at HOST:PORT or a unix socket path (`receive --listen`,
    /// or ploop's), answering packet by packet.
    #[arg(long)]
    connect: Option<String>,
}

/// Bounds of a copy or backup.
#[derive(Args, Clone)]
struct LimitArgs {
    /// Seconds the last pass may keep the filesystem frozen and requests
    /// held; past it the copy gives up, thaws and fails (default 30).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    freeze_limit: Option<f64>,
    /// Seconds the copy waits for a receiver that stops reading or
    /// answering before it fails (default 60).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<f64>,
    /// When the device is in use but no filesystem on it is found to
    /// freeze, copy anyway (not filesystem-consistent) instead of refusing.
    #[arg(long)]
    allow_unfrozen: bool,
}

impl From<LimitArgs> for crate::copy_cmd::Limits {
    fn from(a: LimitArgs) -> Self {
        crate::copy_cmd::Limits { freeze_limit: a.freeze_limit, timeout: a.timeout, allow_unfrozen: a.allow_unfrozen }
    }
}

fn parse_secs(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86400.0 => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds between 0 and 86400")),
    }
}

/// The size of a new disk.
#[derive(Args, Clone)]
struct Geometry {
    /// Virtual disk size (K, M, G, T, P, E suffixes).
    #[arg(long, value_parser = parse_size_arg)]
    size: u64,
    /// Cluster size, a power of two from 32K to 64M, ploop's range (default 1M).
    #[arg(long, value_parser = parse_cluster_arg, default_value = "1M")]
    cluster_size: u64,
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
    /// Move request data through the daemon's buffers even where the
    /// kernel offers zero copy (auto buffer registration, Linux 6.16+).
    #[arg(long)]
    copy_mode: bool,
    /// Block-layer I/O scheduler of the device: `none` (as a loop device
    /// or ploop's device-mapper target has), another name the kernel
    /// knows (mq-deadline, kyber, bfq), or `kernel` for the kernel's choice.
    #[arg(long, default_value = crate::daemon::DEFAULT_IO_SCHEDULER, value_parser = crate::daemon::parse_io_scheduler)]
    io_scheduler: String,
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

/// One rule for the clusters of every image the CLI makes (`create`,
/// `init`, `convert`): ploop's, so that ploop opens whatever we create.
fn parse_cluster_arg(s: &str) -> std::result::Result<u64, String> {
    let bytes = parse_size_arg(s)?;
    ublk_ploop::disk::descriptor::check_cluster_size(bytes).map_err(|_| {
        format!("cluster size '{s}': the cluster size must be a power of two between 32K and 64M (ploop's range)")
    })?;
    Ok(bytes)
}

pub fn main() -> i32 {
    // A command whose reader went away ends quietly, as Unix tools do
    // (`info --json | grep -q`), instead of panicking on the write. The
    // daemon puts this back to "ignore" before it serves.
    // SAFETY: setting a signal disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
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

pub fn print_json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("serialisable"));
}

/// A directory given where an image or a disk is wanted must be a disk
/// directory: say so instead of "Is a directory".
pub fn refuse_bare_dirs(paths: &[PathBuf]) -> Result<()> {
    match paths.iter().find(|p| p.is_dir() && !Disk::is_disk(p)) {
        Some(dir) => Err(ublk_ploop::disk::no_descriptor(dir)),
        None => Ok(()),
    }
}

/// What image arguments name: one disk directory (its chain, or a
/// snapshot's), or image files of one declared format. Paths come back
/// absolute, so a daemon (and a later `recover`) finds them from anywhere.
pub struct Resolved {
    pub layers: Vec<LayerSpec>,
    pub disk: Option<PathBuf>,
}

pub fn resolve_images(paths: &[PathBuf], format: Option<Format>, snapshot: Option<Guid>) -> Result<Resolved> {
    refuse_bare_dirs(paths)?;
    match paths {
        [one] if Disk::is_disk(one) => {
            if format.is_some() {
                return Err(Error::invalid(format!("{}: a disk directory declares its formats; drop --format", one.display())));
            }
            let disk = Disk::load(one)?;
            Ok(Resolved { layers: disk.layers(snapshot)?, disk: Some(disk.dir) })
        }
        _ => {
            if let Some(p) = paths.iter().find(|p| Disk::is_disk(p)) {
                return Err(Error::invalid(format!("{}: a disk directory must be the only image given", p.display())));
            }
            if snapshot.is_some() {
                return Err(Error::invalid("--snapshot needs a disk directory (a DiskDescriptor.xml) as the image"));
            }
            let format = format.unwrap_or_default();
            let layers = crate::config::canonical_images(paths)?.into_iter().map(|path| LayerSpec { path, format }).collect();
            Ok(Resolved { layers, disk: None })
        }
    }
}

fn run(command: Command) -> Result<i32> {
    match command {
        Command::Add { images, format, snapshot, id, dev, foreground } => {
            let resolved = resolve_images(&images, format.format, snapshot)?;
            let config = crate::daemon::DeviceConfig {
                images: resolved.layers,
                disk: resolved.disk,
                snapshot,
                queues: crate::config::validate_queues(dev.queues)?,
                depth: crate::config::validate_depth(dev.depth)?,
                // A snapshot is served read-only, as `ploop mount -r -u` does.
                read_only: dev.read_only || snapshot.is_some(),
                direct: dev.io.direct,
                socket_gid: dev.socket_group.as_deref().map(crate::config::group_id).transpose()?,
                copy_mode: dev.copy_mode,
                io_scheduler: dev.io_scheduler,
            };
            let mode = crate::daemon::Mode::Add { id: id.map_or(-1, |i| i as i32) };
            crate::daemon::start(config, mode, foreground)
        }
        Command::Del { id, all, force } => {
            crate::daemon::require_ublk()?;
            let ids = if all { our_devices() } else { vec![id.expect("clap requires -n or --all")] };
            for id in ids {
                crate::daemon::delete(id, force)?;
                println!("deleted /dev/ublkb{id}");
            }
            Ok(0)
        }
        Command::List { json } => {
            crate::daemon::require_ublk()?;
            let devices = list_devices();
            if json {
                print_json(&devices);
            } else if devices.is_empty() {
                println!("no ublk devices");
            } else {
                for d in &devices {
                    println!("{} {} pid {} {} {}", d["device"].as_str().unwrap_or("?"), d["state"].as_str().unwrap_or("?"),
                        d["pid"], d["target"].as_str().unwrap_or("?"), d["what"].as_str().unwrap_or(""));
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
            // What a new device gets (a device keeps what it was created with).
            let data_path = crate::ublk_target::data_path(crate::ublk_target::wanted_flags(bits.unwrap_or(0), true));
            if json {
                print_json(&serde_json::json!({ "features": bits, "names": names, "data_path": data_path }));
            } else {
                match bits {
                    Some(b) => println!("ublk features {b:#x}: {}", names.join(" ")),
                    None => println!("the ublk driver does not report features (kernel older than 6.5)"),
                }
                match data_path {
                    "zero_copy" => println!("new devices: zero copy (request pages registered on each queue's ring; --copy-mode to opt out)"),
                    _ => println!("new devices: copy mode (request data through the daemon's buffers; zero copy needs auto_buf_reg, Linux 6.16+)"),
                }
            }
            Ok(0)
        }
        Command::Status { id, json } => {
            let status: crate::protocol::Status = crate::control::request(id, crate::protocol::Request::Status)?;
            if json {
                print_json(&status);
            } else {
                crate::snapshot_cmd::print_status(&status);
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
        Command::Create { image, geometry: Geometry { size, cluster_size }, json } => {
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
        Command::Init { dir, geometry: Geometry { size, cluster_size }, json } => {
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
                println!("created {}: {} disk, {} clusters, base {}", disk.xml_path().display(), format_size(size),
                    format_size(cluster_size), disk.dir.join(ublk_ploop::disk::BASE_FILE).display());
            }
            Ok(0)
        }
        Command::Info { images, format, json } => {
            let (disk, paths) = info_targets(&images, format.format)?;
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
        Command::Resize { id, image, size, format, json } => {
            use ublk_ploop::layers::ploop::resize::{resize, resize_raw, Resized};
            let image = match (id, image) {
                (Some(id), _) => {
                    let done: Resized = crate::control::request(id, crate::protocol::Request::Resize { size })?;
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
            let done = match info_targets(std::slice::from_ref(&image), format.format)? {
                (Some(mut disk), _) => block_on(disk.resize(&SyncIo, size))?,
                (None, paths) => {
                    let (path, format) = &paths[0];
                    vec![match format {
                        Format::Raw => block_on(resize_raw(&SyncIo, path, size, true))?,
                        _ => block_on(resize(&SyncIo, path, size, true))?,
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
            Ok(0)
        }
        Command::Compact { id, image, step, speed, base, json } => crate::snapshot_cmd::compact(id, image, step, speed, base, json),
        Command::Check { image, repair, format, json } => {
            let (mut disk, mut paths) = info_targets(std::slice::from_ref(&image), format.format)?;
            // A repair changes the disk: under ploop's disk lock (waiting
            // for another holder, as snapshot and resize do), with the
            // descriptor read again once the lock is ours.
            let _lock = match (&disk, repair) {
                (Some(d), true) => {
                    let lock = d.lock()?;
                    (disk, paths) = info_targets(std::slice::from_ref(&image), None)?;
                    Some(lock)
                }
                _ => None,
            };
            if let (true, Some(disk)) = (repair, &disk) {
                // A repair writes every delta: refused for any not the disk's own.
                for img in &disk.desc.images {
                    disk.writable_path(img, "repair")?;
                }
            }
            let mut reports = Vec::new();
            for (path, format) in &paths {
                reports.push(block_on(check(&SyncIo, path, *format, repair))?);
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
        Command::Convert { mut paths, to, format, snapshot, cluster_size, progress, json, io } => {
            let dst = paths.pop().expect("clap requires two paths");
            let sources = resolve_images(&paths, format.format, snapshot)?.layers;
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
                BackendKind::Sync => block_on(convert(&SyncIo, &sources, &dst, &opts, &mut report))?,
                BackendKind::Uring => {
                    let ring = OwnRing::new(64).map_err(|e| ublk_ploop::Error::io(e, "setting up io_uring"))?;
                    ring.block_on(convert(&ring.io(), &sources, &dst, &opts, &mut report))?
                }
            };
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
        Command::Snapshot { target, uuid, json } => crate::snapshot_cmd::snapshot(target.id, target.dir, uuid, json),
        Command::SnapshotList { target, json } => crate::snapshot_cmd::list(target.id, target.dir, json),
        Command::SnapshotMerge { target, uuid, json } => crate::snapshot_cmd::merge(target.id, target.dir, uuid, json),
        Command::SnapshotDelete { target, uuid, json } => crate::snapshot_cmd::delete(target.id, target.dir, uuid, json),
        Command::Track { action, id, json } => {
            let action = match action {
                TrackArg::Start => crate::copy_cmd::TrackAction::Start,
                TrackArg::Get => crate::copy_cmd::TrackAction::Get,
                TrackArg::Stop => crate::copy_cmd::TrackAction::Stop,
            };
            crate::copy_cmd::track(id, action, json)
        }
        Command::Copy { id, dest, stop, force, limits, json } => {
            crate::copy_cmd::copy(id, &crate::copy_cmd::Destination { to: dest.to, connect: dest.connect }, stop, force, &limits.into(), json)
        }
        Command::Backup { id, dest, incremental, limits, json } => {
            crate::copy_cmd::backup(id, &crate::copy_cmd::Destination { to: dest.to, connect: dest.connect }, incremental, &limits.into(), json)
        }
        Command::Receive { image, from, listen, incremental, max_size, timeout, io, json } => crate::copy_cmd::receive(&crate::copy_cmd::ReceiveArgs {
            image: &image,
            from: from.as_deref(),
            listen: listen.as_deref(),
            incremental,
            direct: io.direct,
            json,
            max_size,
            timeout,
        }),
        Command::SnapshotSwitch { target, uuid, force, json } => crate::snapshot_cmd::switch(target.id, target.dir, uuid, force, json),
    }
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

/// The files `info` and `check` look at: every delta a disk directory's
/// descriptor names (with its format), or the files given.
/// A disk directory (when given one) and the files to look at, with their formats.
type Targets = (Option<Disk>, Vec<(PathBuf, Format)>);

fn info_targets(paths: &[PathBuf], format: Option<Format>) -> Result<Targets> {
    refuse_bare_dirs(paths)?;
    match paths {
        [one] if Disk::is_disk(one) => {
            if format.is_some() {
                return Err(Error::invalid(format!("{}: a disk directory declares its formats; drop --format", one.display())));
            }
            let disk = Disk::load(one)?;
            let files = disk
                .desc
                .images
                .iter()
                .map(|i| (disk.file_path(i), i.kind.format()))
                .collect();
            Ok((Some(disk), files))
        }
        _ => Ok((None, paths.iter().map(|p| (p.clone(), format.unwrap_or_default())).collect())),
    }
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
        }
    }
}

/// Header and allocation of an image, read without opening it as a layer
/// (so it works on an image a daemon is serving). Damage found on the way
/// is returned with it.
fn image_info(path: &Path, format: Format) -> Result<(InfoOut, Vec<String>)> {
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
    if r.leaked_clusters > 0 {
        println!("  {} leaked cluster(s)", r.leaked_clusters);
    }
    for fix in &r.repairs {
        println!("  repaired: {fix}");
    }
    let verdict = match (r.verdict(), &r.beyond_repair) {
        (Verdict::Clean, _) => "no errors".to_string(),
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

/// Every ublk device, with what we know of ours.
fn list_devices() -> Vec<serde_json::Value> {
    let found = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let sink = found.clone();
    libublk::ctrl::UblkCtrl::for_each_dev_id(move |id| {
        if let Some(ctrl) = crate::ublk_target::open_ctrl(id) {
            let info = ctrl.dev_info();
            let target = ctrl.get_target_type_from_json().unwrap_or_default();
            let data = ctrl.get_target_data_from_json().unwrap_or_default();
            let images = data.get("images").cloned().unwrap_or_default();
            // What it serves, in a word: the disk directory, or the files.
            let what = match data.get("disk").and_then(|d| d.as_str()) {
                Some(dir) => match data.get("snapshot").and_then(|s| s.as_str()) {
                    Some(snap) => format!("{dir} (snapshot {snap}, read-only)"),
                    None => dir.to_string(),
                },
                None => images
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.get("path").or(Some(v)).and_then(|p| p.as_str())).collect::<Vec<_>>().join(" <- "))
                    .unwrap_or_default(),
            };
            sink.borrow_mut().push(serde_json::json!({
                "id": id,
                "device": format!("/dev/ublkb{id}"),
                "state": crate::ublk_target::state_name(info.state),
                "pid": info.ublksrv_pid,
                "queues": info.nr_hw_queues,
                "depth": info.queue_depth,
                "target": target,
                "images": images,
                "disk": data.get("disk"),
                "snapshot": data.get("snapshot"),
                "what": what,
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
