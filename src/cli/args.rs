//! The command line as clap reads it: every verb's arguments, and the
//! argument groups and value parsers several verbs share. The verbs' work
//! is in the `*_cmd` files beside this one.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use ublk_ploop::disk::Guid;
use ublk_ploop::io::{BackendKind, Direct};
use ublk_ploop::layers::Format;
use ublk_ploop::size::parse_size;
use ublk_ploop::Error;

#[derive(Parser)]
#[command(name = "ublk-ploop", version, about = "OpenVZ ploop images as Linux block devices through ublk")]
pub struct Cli {
    /// More log output (repeat for more); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// Whether image files bypass the host page cache; shared by every command
/// that opens images.
#[derive(Args, Clone)]
pub struct DirectArg {
    /// Bypass the host page cache: auto (O_DIRECT where the filesystem
    /// allows it, else buffered with a warning), on, off.
    #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<Direct>())]
    pub direct: Direct,
}

/// Offline tools also choose their I/O engine (the daemon always moves
/// data on its per-queue io_uring).
#[derive(Args, Clone)]
pub struct IoArgs {
    #[command(flatten)]
    pub direct: DirectArg,
    /// I/O engine for image files: uring or sync.
    #[arg(long, default_value = "uring", value_parser = |s: &str| s.parse::<BackendKind>())]
    pub backend: BackendKind,
}

/// How image files are read: a disk directory's descriptor says it; plain
/// files are ploop images unless declared raw.
#[derive(Args, Clone)]
pub struct FormatArg {
    /// Format of image files given by path: ploop (default), raw, or qcow2
    /// (read-only, the bottom of a stack). Once for all images, or once per
    /// image in order; qcow2 once for a stack declares its bottom (the rest
    /// are ploop). A disk directory's descriptor declares its own.
    #[arg(long, value_parser = |s: &str| s.parse::<Format>())]
    pub format: Vec<Format>,
}

/// A device (online, through its daemon) or a disk directory (offline):
/// one of the two is required, and a usage error names both.
#[derive(Args, Clone)]
#[group(id = "target", required = true, multiple = false)]
pub struct Target {
    /// The device serving the disk.
    #[arg(short = 'n', long = "number")]
    pub id: Option<u32>,
    /// A disk directory (or its DiskDescriptor.xml) no device serves.
    #[arg(value_name = "DISK_DIR")]
    pub dir: Option<PathBuf>,
}

pub fn parse_guid(s: &str) -> std::result::Result<Guid, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

#[derive(Subcommand)]
pub enum Command {
    // The verbs by group, each group's enum flattened in: the help lists
    // them in this order, as one list.
    #[command(flatten)]
    Image(ImageCommand),
    #[command(flatten)]
    Device(DeviceCommand),
    /// Flatten an image, a stack (bottom first) or a disk directory into a new image.
    Convert(ConvertArgs),
    #[command(flatten)]
    Snapshot(SnapshotCommand),
    #[command(flatten)]
    Copy(CopyCommand),
}

/// Offline image tools (and their online forms with -n).
#[derive(Subcommand)]
pub enum ImageCommand {
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
}

/// Devices and their daemons.
#[derive(Subcommand)]
pub enum DeviceCommand {
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
        /// A stable name: /dev/ublk-ploop/NAME points at the device while
        /// it serves.
        #[arg(long)]
        name: Option<String>,
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
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Sources (bottom layer first, or one disk directory), then the destination.
    #[arg(required = true, num_args = 2..)]
    pub paths: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "ploop")]
    pub to: ToFormat,
    #[command(flatten)]
    pub format: FormatArg,
    /// Convert this snapshot of the disk directory instead of its top.
    #[arg(long, value_parser = parse_guid)]
    pub snapshot: Option<Guid>,
    /// Cluster size of a ploop destination, a power of two from 32K to
    /// 64M (default: the source's).
    #[arg(long, value_parser = parse_cluster_arg)]
    pub cluster_size: Option<u64>,
    /// Print progress to stderr (default when stderr is a terminal).
    #[arg(long)]
    pub progress: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub io: IoArgs,
}

/// Snapshots, online or on a disk directory no device serves.
#[derive(Subcommand)]
pub enum SnapshotCommand {
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
    /// Make a thin clone of a template disk: a new disk directory whose
    /// lower deltas are the template's files (read, never written, merged
    /// into, moved or removed from here) and whose own empty top takes the
    /// writes. The template must not be served read-write.
    Clone {
        /// The template: a disk directory no device serves read-write, or
        /// with `--format qcow2` a QCOW2 image (a cloud image).
        template: PathBuf,
        /// The new disk directory.
        dir: PathBuf,
        /// Clone the template as of this snapshot (default: its top).
        #[arg(short = 'u', long, value_parser = parse_guid)]
        uuid: Option<Guid>,
        /// `qcow2`: the template is a QCOW2 image file, read-only under the
        /// clone's own ploop top.
        #[arg(long, value_parser = |s: &str| s.parse::<Format>())]
        format: Option<Format>,
        /// Cluster size of the clone's top over a QCOW2 template (a disk
        /// directory's clone takes its template's).
        #[arg(long, value_parser = parse_cluster_arg)]
        cluster_size: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Make a clone stand alone: copy the template's data up into the
    /// clone's top, online with -n, and drop the template's deltas from
    /// its descriptor (their files stay as they are).
    Detach {
        #[command(flatten)]
        target: Target,
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
}

/// The write tracker and the copy stream.
#[derive(Subcommand)]
pub enum CopyCommand {
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

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrackArg {
    Start,
    Get,
    Stop,
}

/// Where a copy stream goes.
#[derive(Args, Clone)]
pub struct DestArgs {
    /// A new file, or - for stdout (a one-way stream with checksums).
    #[arg(long, conflicts_with = "connect", required_unless_present = "connect")]
    pub to: Option<PathBuf>,
    /// A receiver at HOST:PORT or a unix socket path (`receive --listen`,
    /// or ploop's), answering packet by packet.
    #[arg(long)]
    pub connect: Option<String>,
}

/// Bounds of a copy or backup.
#[derive(Args, Clone)]
pub struct LimitArgs {
    /// Seconds the last pass may keep the filesystem frozen and requests
    /// held; past it the copy gives up, thaws and fails (default 30).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub freeze_limit: Option<f64>,
    /// Seconds the copy waits for a receiver that stops reading or
    /// answering before it fails (default 60).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<f64>,
    /// When the device is in use but no filesystem on it is found to
    /// freeze, copy anyway (not filesystem-consistent) instead of refusing.
    #[arg(long)]
    pub allow_unfrozen: bool,
}

pub fn parse_secs(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86400.0 => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds between 0 and 86400")),
    }
}

/// The size of a new disk.
#[derive(Args, Clone)]
pub struct Geometry {
    /// Virtual disk size (K, M, G, T, P, E suffixes).
    #[arg(long, value_parser = parse_size_arg)]
    pub size: u64,
    /// Cluster size, a power of two from 32K to 64M, ploop's range (default 1M).
    #[arg(long, value_parser = parse_cluster_arg, default_value = "1M")]
    pub cluster_size: u64,
}

/// Device settings shared by the commands that create a device.
#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// Number of hardware queues (one thread each).
    #[arg(long, default_value_t = crate::daemon::config::DEFAULT_QUEUES)]
    pub queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = crate::daemon::config::DEFAULT_DEPTH)]
    pub depth: u16,
    /// Serve the stack read-only (the top image is not modified).
    #[arg(long)]
    pub read_only: bool,
    /// Group allowed on the control socket besides root.
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Move request data through the daemon's buffers even where the
    /// kernel offers zero copy (auto buffer registration, Linux 6.16+).
    #[arg(long)]
    pub copy_mode: bool,
    /// Block-layer I/O scheduler of the device: `none` (as a loop device
    /// or ploop's device-mapper target has), another name the kernel
    /// knows (mq-deadline, kyber, bfq), or `kernel` for the kernel's choice.
    #[arg(long, default_value = crate::ublk_control::DEFAULT_IO_SCHEDULER, value_parser = crate::ublk_control::parse_io_scheduler)]
    pub io_scheduler: String,
    /// Acknowledge a first write into a snapshot's cluster before its copy
    /// is synced: the link is kept in a log on tmpfs until the next flush,
    /// so a killed daemon's successor finds it and a power cut loses only
    /// what was not flushed. The default wherever /run is a tmpfs; with
    /// this flag, refused elsewhere.
    #[arg(long, conflicts_with = "no_link_log")]
    pub link_log: bool,
    /// Sync each copy-up before acknowledging it (no link log).
    #[arg(long)]
    pub no_link_log: bool,
    #[command(flatten)]
    pub io: DirectArg,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ToFormat {
    Raw,
    Ploop,
}

pub fn parse_size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// One rule for the clusters of every image the CLI makes (`create`,
/// `init`, `convert`): ploop's, so that ploop opens whatever we create.
pub fn parse_cluster_arg(s: &str) -> std::result::Result<u64, String> {
    let bytes = parse_size_arg(s)?;
    ublk_ploop::disk::descriptor::check_cluster_size(bytes).map_err(|_| {
        format!("cluster size '{s}': the cluster size must be a power of two between 32K and 64M (ploop's range)")
    })?;
    Ok(bytes)
}

