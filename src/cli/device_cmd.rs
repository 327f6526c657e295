//! The device verbs: start a daemon for a device (`add`, `serve`,
//! `recover`), stop it (`del`), and ask the kernel (`list`, `features`) or
//! a device's daemon (`status`) about it.

use std::path::PathBuf;

use ublk_ploop::disk::{resolve, Guid};
use ublk_ploop::protocol::DeviceRow;
use ublk_ploop::Result;

use crate::cli::args::{DeviceArgs, DeviceCommand, FormatArg};
use crate::cli::output::{print_json, print_status};

pub fn run(command: DeviceCommand) -> Result<i32> {
    match command {
        DeviceCommand::Add { images, format, snapshot, id, name, dev, foreground } => add(images, format, snapshot, id, name, dev, foreground),
        DeviceCommand::Del { id, all, force } => del(id, all, force),
        DeviceCommand::List { json } => list(json),
        DeviceCommand::Recover { id, foreground } => recover(id, foreground),
        DeviceCommand::Features { json } => features(json),
        DeviceCommand::Status { id, json } => status(id, json),
        DeviceCommand::Serve { config } => serve(config),
    }
}

/// Start a daemon serving the images (or a disk, or its snapshot).
fn add(images: Vec<PathBuf>, format: FormatArg, snapshot: Option<Guid>, id: Option<u32>, name: Option<String>, dev: DeviceArgs, foreground: bool) -> Result<i32> {
    let resolved = resolve::layers(&images, &format.format, snapshot)?;
    let config = crate::daemon::DeviceConfig {
        images: resolved.layers,
        disk: resolved.disk,
        snapshot,
        queues: crate::daemon::config::validate_queues(dev.queues)?,
        depth: crate::daemon::config::validate_depth(dev.depth)?,
        // A snapshot is served read-only, as `ploop mount -r -u` does.
        read_only: dev.read_only || snapshot.is_some(),
        direct: dev.io.direct,
        socket_gid: dev.socket_group.as_deref().map(crate::daemon::config::group_id).transpose()?,
        copy_mode: dev.copy_mode,
        io_scheduler: dev.io_scheduler,
        name,
        link_log: match (dev.link_log, dev.no_link_log) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        link_dir_id: None,
    };
    config.check_new()?;
    let mode = crate::ublk_control::Mode::Add { id: id.map_or(-1, |i| i as i32) };
    crate::daemon::start(config, mode, foreground)
}

/// Stop one device, or every one of ours.
fn del(id: Option<u32>, all: bool, force: bool) -> Result<i32> {
    crate::ublk_control::require_ublk()?;
    let ids = if all { our_devices() } else { vec![id.expect("clap requires -n or --all")] };
    for id in ids {
        crate::ublk_control::delete(id, force)?;
        println!("deleted /dev/ublkb{id}");
    }
    Ok(0)
}

/// Every ublk device, ours with what it serves.
fn list(json: bool) -> Result<i32> {
    crate::ublk_control::require_ublk()?;
    let devices = list_devices();
    if json {
        print_json(&devices);
    } else if devices.is_empty() {
        println!("no ublk devices");
    } else {
        for d in &devices {
            println!("{} {} pid {} {} {}", d.device, d.state, d.pid, d.target, d.what);
        }
    }
    Ok(0)
}

/// A new daemon for a device whose daemon died, from its stored config.
fn recover(id: u32, foreground: bool) -> Result<i32> {
    crate::ublk_control::require_ublk()?;
    let config = crate::ublk_control::stored_config(id)?;
    crate::ublk_control::wait_quiesced(id, std::time::Duration::from_secs(10))?;
    crate::daemon::start(config, crate::ublk_control::Mode::Recover { id }, foreground)
}

/// What the kernel's ublk driver offers, and the data path a new device gets.
fn features(json: bool) -> Result<i32> {
    crate::ublk_control::require_ublk()?;
    let bits = libublk::ctrl::UblkCtrl::get_features();
    let names = bits.map(crate::ublk_control::feature_names).unwrap_or_default();
    // What a new device gets (a device keeps what it was created with).
    let data_path = crate::ublk_control::data_path(crate::ublk_control::wanted_flags(bits.unwrap_or(0), true));
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

/// A device's state, as its daemon tells it.
fn status(id: u32, json: bool) -> Result<i32> {
    let status: ublk_ploop::protocol::Status = crate::control::request(id, ublk_ploop::protocol::Request::Status)?;
    if json {
        print_json(&status);
    } else {
        print_status(&status);
    }
    Ok(0)
}

/// One device from a TOML config, in the foreground (recovered when it
/// outlived its daemon).
fn serve(config: PathBuf) -> Result<i32> {
    let (config, id) = crate::daemon::config::load(&config)?;
    crate::ublk_control::require_ublk()?;
    let mode = match id {
        Some(id) if crate::ublk_control::open_ctrl(id).is_some() => {
            // The device outlived its daemon (a crash and a restart).
            crate::ublk_control::wait_quiesced(id, std::time::Duration::from_secs(10))?;
            tracing::warn!("device {id} exists without a daemon; recovering it");
            crate::ublk_control::Mode::Recover { id }
        }
        Some(id) => crate::ublk_control::Mode::Add { id: id as i32 },
        None => crate::ublk_control::Mode::Add { id: -1 },
    };
    crate::daemon::start(config, mode, true)
}

/// Every ublk device, with what we know of ours.
fn list_devices() -> Vec<DeviceRow> {
    let found = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let sink = found.clone();
    libublk::ctrl::UblkCtrl::for_each_dev_id(move |id| {
        if let Some(ctrl) = crate::ublk_control::open_ctrl(id) {
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
            sink.borrow_mut().push(DeviceRow {
                id,
                device: format!("/dev/ublkb{id}"),
                state: crate::ublk_control::state_name(info.state).to_string(),
                pid: info.ublksrv_pid,
                queues: info.nr_hw_queues,
                depth: info.queue_depth,
                target,
                images,
                disk: data.get("disk").cloned(),
                snapshot: data.get("snapshot").cloned(),
                what,
            });
        }
    });
    let mut v = found.take();
    v.sort_by_key(|d| d.id);
    v
}

fn our_devices() -> Vec<u32> {
    list_devices()
        .iter()
        .filter(|d| d.target == crate::ublk_control::TARGET_NAME)
        .map(|d| d.id)
        .collect()
}

/// The live device of ours that serves the disk directory `dir`
/// read-write: its daemon holds ploop's lock on the disk for its life.
pub(crate) fn served_by(dir: &std::path::Path) -> Option<DeviceRow> {
    let me = std::fs::canonicalize(ublk_ploop::disk::Disk::descriptor_path(dir)).ok()?;
    let me = me.parent().map(|p| p.to_path_buf()).unwrap_or(me);
    // What the daemon serves is in the device's target data (its config).
    let read_only = |id: u32| {
        let data = crate::ublk_control::open_ctrl(id).and_then(|c| c.get_target_data_from_json());
        data.and_then(|d| d.get("read_only").and_then(|v| v.as_bool())).unwrap_or(true)
    };
    list_devices().into_iter().find(|d| {
        d.target == crate::ublk_control::TARGET_NAME
            && d.state == "live"
            && d.disk.as_ref().and_then(|v| v.as_str()).is_some_and(|s| std::fs::canonicalize(s).is_ok_and(|p| p == me))
            && !read_only(d.id)
    })
}

/// Refuse an offline change of a disk directory one of our devices serves
/// read-write, naming the device: its daemon holds ploop's lock on the
/// disk, which the change would otherwise wait for and then fail on.
pub(crate) fn refuse_if_served(dir: &std::path::Path) -> Result<()> {
    match served_by(dir) {
        Some(d) => Err(ublk_ploop::Error::new(
            libc::EBUSY,
            format!("{}: {} serves this disk; run the command on the device (-n {})", dir.display(), d.device, d.id),
        )),
        None => Ok(()),
    }
}
