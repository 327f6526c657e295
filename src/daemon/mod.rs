//! The device daemon: opens the stack, creates (or recovers) the ublk
//! device, serves its control socket, and closes the images cleanly when
//! the device is stopped. `process` is its life as a process, `config`
//! what it serves, `handler` its answers to requests, `jobs` the work it
//! does in the background.

pub mod config;
pub mod devlink;
mod handler;
mod jobs;
mod process;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use libublk::ctrl::UblkCtrl;
use libublk::io::UblkDev;

use ublk_ploop::disk::{ops, Disk};
use ublk_ploop::io::{block_on, SyncIo};
use ublk_ploop::tracker::Tracker;
use ublk_ploop::{Result, Stack, StackOptions};

use crate::control::{self, Access};
use crate::ublk_control::{self, data_path, require_ublk, set_io_scheduler, ublk_err, Mode};
use crate::ublk_target::{self, Counters, Device};
use handler::DaemonHandler;
use jobs::Jobs;
use process::{install_stop_signals, report, Ready};

pub use config::DeviceConfig;

/// Start a device daemon. Unless `foreground`, fork: the parent returns
/// once the device is live (printing its path) or failed.
pub fn start(mut config: DeviceConfig, mode: Mode, foreground: bool) -> Result<i32> {
    require_ublk()?;
    if let Some(name) = &config.name {
        devlink::validate(name)?;
        let own = match mode {
            Mode::Recover { id } => Some(id),
            Mode::Add { .. } => None,
        };
        devlink::check_free(name, own)?;
    }
    process::ignore_sigpipe();
    // Open the images before forking so that bad input fails right here.
    let link_log = match (config.link_log, config.read_only) {
        (Some(false), _) | (_, true) => None,
        (Some(true), false) => Some(config::link_dir()?),
        (None, false) => match config::link_dir() {
            Ok(dir) => Some(dir),
            Err(e) => {
                tracing::info!("copy-ups are synced before they are acknowledged: {e}");
                None
            }
        },
    };
    if let (Mode::Recover { id }, Some(kept)) = (&mode, &config.link_dir_id) {
        config::check_link_dir_kept(kept, &config::link_dir_path(), *id)?;
    }
    config.link_dir_id = link_log.as_deref().and_then(config::link_dir_identity);
    let opts = StackOptions { read_only: config.read_only, direct: config.direct, offline: false, link_log };
    // A disk served read-write is locked as ploop locks a disk it mounts,
    // for the device's whole life: ploop's tools then see it in use, and
    // every change the daemon makes goes through this one lock (a second
    // one taken by the daemon would conflict with it).
    let mut disk = match (&config.disk, config.locks_disk()) {
        (Some(dir), true) => Some(Disk::load_locked(dir)?),
        _ => None,
    };
    let layers = config.layers(disk.as_ref())?;
    let (stack, reports) = block_on(Stack::open_layers(&SyncIo, &layers, &opts))?;
    if let Some(disk) = disk.as_mut() {
        // A merge a crash interrupted is finished before serving.
        let merged = block_on(ops::finish_merges(&SyncIo, &stack, disk))?;
        for m in merged {
            tracing::warn!("finished merging {} into {} (interrupted before)", m.child, m.parent);
        }
        // The byte-range lock for the device's life, the `.lck` flock for
        // each change (a clone of a snapshot reads the chain in between).
        disk.keep_range_lock_only();
    }
    for (spec, r) in layers.iter().zip(&reports) {
        if r.was_in_use {
            tracing::warn!(image = %spec.path.display(), trimmed = r.trimmed_leak, "image was not closed cleanly; checked, no damage");
        }
        if r.relinked > 0 {
            tracing::warn!(image = %spec.path.display(), copy_ups = r.relinked, "linked again the copy-ups a killed daemon's link log held");
        }
    }
    if foreground {
        return run(stack, disk, config, mode, Ready::Foreground);
    }
    // The lock lives in open file descriptions, which the forked daemon
    // shares: it stays held when the parent exits.
    process::fork_daemon(move |ready| match run(stack, disk, config, mode, ready) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            1
        }
    })
}

fn run(stack: Stack, disk: Option<Disk>, config: DeviceConfig, mode: Mode, ready: Ready) -> Result<i32> {
    let mut ready = Some(ready);
    let device = Arc::new(Device { stack, counters: Counters::default() });
    // ploop's lock outlives the handler: it is let go only once the
    // images are closed clean (a waiting ploop would find them in use).
    let lock_until_closed = disk.clone();
    let result = run_inner(&device, disk, config, mode, &mut ready);
    if let Err(e) = &result {
        report(&mut ready, Err(e.to_string()));
    }
    // Whatever happened, the images are left consistent and marked clean.
    let closed = block_on(device.stack.close(&SyncIo));
    drop(lock_until_closed);
    let code = result?;
    closed?;
    Ok(code)
}

fn run_inner(device: &Arc<Device>, disk: Option<Disk>, config: DeviceConfig, mode: Mode, ready: &mut Option<Ready>) -> Result<i32> {
    let ctrl = ublk_control::open_device(&mode, config.queues, config.depth, config.copy_mode)?;
    let dev_id = ctrl.dev_info().dev_id;
    // A recovered device keeps the data path it was created with.
    let data_path = data_path(ctrl.dev_info().flags);
    tracing::info!(data_path, "ublk device {dev_id}");
    install_stop_signals(dev_id);
    // Changed-block tracking a clean stop kept: tracking goes on.
    let mut cbt = None;
    if !config.read_only {
        if let Some(bm) = block_on(device.stack.take_saved_bitmaps()).into_iter().next() {
            let t = Arc::new(Tracker::from_bits(device.stack.size(), bm.granularity, &bm.bits));
            block_on(device.stack.add_tracker(t.clone()))?;
            device.stack.keep_on_close(Some((t.clone(), bm.id)));
            tracing::info!(changed = t.dirty_count(), "changed-block record since the last backup loaded");
            cbt = Some(t);
        }
    }
    let handler = Arc::new(DaemonHandler {
        device: device.clone(),
        dev_id,
        config: config.clone(),
        started: Instant::now(),
        disk: Mutex::new(disk),
        jobs: Jobs::default(),
        tracker: Mutex::new(None),
        cbt: Arc::new(Mutex::new(cbt)),
        data_path,
    });
    let server = control::Server::start(&control::socket_path(dev_id), Access { group: config.socket_gid }, handler)?;

    let read_only = config.read_only;
    let target_json = serde_json::to_value(&config).expect("config serialises");
    let dev_for_init = device.clone();
    let tgt_init = move |dev: &mut UblkDev| {
        ublk_target::init_target(dev, &dev_for_init.stack, read_only)?;
        dev.set_target_json(target_json);
        Ok(())
    };
    let dev_for_queues = device.clone();
    let queue_fn = move |qid: u16, dev: &UblkDev| ublk_target::run_queue(qid, dev, dev_for_queues.clone());
    // Shared with the live callback; if the device never goes live, it is
    // still here to carry the error back to whoever started us.
    let shared_ready = Arc::new(std::sync::Mutex::new(ready.take()));
    let ready_for_live = shared_ready.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let scheduler = config.io_scheduler.clone();
    let name = config.name.clone();
    let on_live = move |c: &UblkCtrl| {
        tracing::info!(device = %c.get_bdev_path(), "device is live");
        set_io_scheduler(c.dev_info().dev_id, &scheduler);
        if let Some(name) = &name {
            match devlink::link(name, c.dev_info().dev_id) {
                Ok(()) => tracing::info!("{}/{name} names it", devlink::dir().display()),
                Err(e) => tracing::warn!("{}/{name}: {e}", devlink::dir().display()),
            }
        }
        report(&mut ready_for_live.lock().unwrap(), Ok(c.dev_info().dev_id));
        let _ = tx.send(());
    };
    let served = ctrl.run_target(tgt_init, queue_fn, on_live);
    let went_live = rx.try_recv().is_ok();
    *ready = shared_ready.lock().unwrap().take();

    drop(server);
    if let (Some(name), true) = (&config.name, served.is_ok()) {
        devlink::unlink(name, dev_id);
    }
    // The device is deleted without waiting for its last opener: one
    // stopped under a mounted filesystem (`copy --stop --force`, `del
    // --force`) is freed by the kernel at the unmount, while we close the
    // images and exit, so that a container bound to our unit is stopped
    // (and unmounts it); waiting would hang both units. Kernels without the
    // asynchronous delete get the synchronous one. A recovered control
    // does not delete the device when dropped; a failed recovery leaves it
    // quiesced for another attempt.
    if served.is_ok() && went_live {
        if let Err(e) = ctrl.del_dev_async() {
            tracing::debug!("asynchronous delete: {e}; deleting synchronously");
            let _ = ctrl.del_dev();
        }
    }
    served.map_err(|e| ublk_err(e, if went_live { "serving the device" } else { "starting the device" }))?;
    tracing::info!("device {dev_id} stopped");
    Ok(0)
}


