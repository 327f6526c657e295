//! Device control: the ublk driver's side of a device's life, beside
//! `ublk_target.rs` (the queue side). Whether the kernel has ublk, which
//! features and flags it offers, adding or re-attaching a device, stopping
//! and deleting it, waiting until a dead daemon's device can be recovered,
//! and the block-layer scheduler the device runs with.

use std::time::{Duration, Instant};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::{sys, UblkFlags};
use nix::unistd::Pid;

use ublk_ploop::{Error, Result};

use crate::mount;

/// Largest request the kernel sends us (the device's I/O buffer); one
/// cluster at the default size.
pub const MAX_IO_BYTES: u32 = 1 << 20;

/// Our target name in the kernel's and libublk's records.
pub const TARGET_NAME: &str = "ploop";

/// Refuse early, with the fix, when the kernel has no ublk.
pub fn require_ublk() -> Result<()> {
    if std::path::Path::new("/dev/ublk-control").exists() {
        return Ok(());
    }
    let why = if std::path::Path::new("/sys/module/ublk_drv").exists() {
        "module ublk_drv is loaded, but no control device"
    } else {
        "module ublk_drv not loaded: modprobe ublk_drv"
    };
    Err(Error::new(
        libc::ENODEV,
        format!("the kernel has no ublk ({why}): /dev/ublk-control is missing; or use a kernel built with CONFIG_BLK_DEV_UBLK"),
    ))
}

/// How a daemon comes by its device.
pub enum Mode {
    /// A new device (`id` -1: the kernel picks one).
    Add { id: i32 },
    /// Re-attach to the quiesced device of a daemon that died.
    Recover { id: u32 },
}

/// Create the device (`Add`, with `queues` of `depth`, zero copy where
/// offered unless `copy_mode`) or re-attach to a quiesced one (`Recover`,
/// keeping its geometry).
pub fn open_device(mode: &Mode, queues: u16, depth: u16, copy_mode: bool) -> Result<UblkCtrl> {
    let features = UblkCtrl::get_features().unwrap_or(0);
    let ctrl = match *mode {
        Mode::Add { id } if id >= 0 && open_ctrl(id as u32).is_some() => {
            return Err(Error::new(libc::EEXIST, format!("ublk device {id} already exists")));
        }
        Mode::Add { id } => UblkCtrlBuilder::default()
            .name(TARGET_NAME)
            .id(id)
            .nr_queues(queues)
            .depth(depth)
            .io_buf_bytes(MAX_IO_BYTES)
            .ctrl_flags(wanted_flags(features, !copy_mode))
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|e| ublk_err(e, "creating the ublk device"))?,
        Mode::Recover { id } => {
            let old = UblkCtrl::new_simple(id as i32).map_err(|e| ublk_err(e, "opening the device"))?;
            let rc = old.start_user_recover().map_err(|e| ublk_err(e, "starting user recovery"))?;
            if rc < 0 {
                return Err(Error::new(-rc, format!("device {id}: the kernel refused recovery ({rc})")));
            }
            let info = old.dev_info();
            UblkCtrlBuilder::default()
                .name(TARGET_NAME)
                .id(id as i32)
                .nr_queues(info.nr_hw_queues)
                .depth(info.queue_depth)
                .io_buf_bytes(info.max_io_buf_bytes)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(|e| ublk_err(e, "re-attaching to the device"))?
        }
    };
    Ok(ctrl)
}

/// Feature bits the running kernel's ublk driver reports, by name.
pub fn feature_names(bits: u64) -> Vec<&'static str> {
    const NAMES: &[(u32, &str)] = &[
        (sys::UBLK_F_SUPPORT_ZERO_COPY, "zero_copy"),
        (sys::UBLK_F_URING_CMD_COMP_IN_TASK, "uring_cmd_comp_in_task"),
        (sys::UBLK_F_NEED_GET_DATA, "need_get_data"),
        (sys::UBLK_F_USER_RECOVERY, "user_recovery"),
        (sys::UBLK_F_USER_RECOVERY_REISSUE, "user_recovery_reissue"),
        (sys::UBLK_F_UNPRIVILEGED_DEV, "unprivileged_dev"),
        (sys::UBLK_F_CMD_IOCTL_ENCODE, "cmd_ioctl_encode"),
        (sys::UBLK_F_USER_COPY, "user_copy"),
        (sys::UBLK_F_ZONED, "zoned"),
        (sys::UBLK_F_USER_RECOVERY_FAIL_IO, "user_recovery_fail_io"),
        (sys::UBLK_F_UPDATE_SIZE, "update_size"),
        (sys::UBLK_F_AUTO_BUF_REG, "auto_buf_reg"),
        (sys::UBLK_F_QUIESCE, "quiesce"),
        (sys::UBLK_F_PER_IO_DAEMON, "per_io_daemon"),
    ];
    NAMES.iter().filter(|(bit, _)| bits & *bit as u64 != 0).map(|(_, name)| *name).collect()
}

/// The device control flags we ask for, given what the kernel offers:
/// recovery (re-issuing in-flight I/O to the new daemon), online resize,
/// and zero copy (automatic registration of each request's pages on the
/// queue's ring) unless `zero_copy` is off.
pub fn wanted_flags(features: u64, zero_copy: bool) -> u64 {
    let mut flags = 0u64;
    let mut wanted = vec![sys::UBLK_F_USER_RECOVERY, sys::UBLK_F_USER_RECOVERY_REISSUE, sys::UBLK_F_UPDATE_SIZE];
    if zero_copy {
        wanted.push(sys::UBLK_F_AUTO_BUF_REG);
    }
    for bit in wanted {
        if features & bit as u64 != 0 {
            flags |= bit as u64;
        }
    }
    flags
}

/// How a device with these flags moves request data.
pub fn data_path(flags: u64) -> &'static str {
    if flags & sys::UBLK_F_AUTO_BUF_REG as u64 != 0 {
        "zero_copy"
    } else {
        "copy"
    }
}

/// Device state as text.
pub fn state_name(state: u16) -> &'static str {
    match state as u32 {
        sys::UBLK_S_DEV_LIVE => "live",
        sys::UBLK_S_DEV_QUIESCED => "quiesced",
        sys::UBLK_S_DEV_FAIL_IO => "fail_io",
        _ => "dead",
    }
}

/// Open an existing device's control handle; None when it does not exist.
pub fn open_ctrl(id: u32) -> Option<UblkCtrl> {
    if !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        return None;
    }
    UblkCtrl::new_simple(id as i32).ok()
}

/// Ask the kernel to stop a device from a thread of the daemon (libublk's
/// control handles are per thread); `run_target` then ends.
pub fn stop_device(dev_id: u32) {
    if let Ok(ctrl) = UblkCtrl::new_simple(dev_id as i32) {
        let _ = ctrl.kill_dev();
    }
}

/// A libublk failure as our error, saying what was being done.
pub fn ublk_err(e: libublk::UblkError, what: &str) -> Error {
    Error::new(libc::EIO, format!("{what}: {e}"))
}

/// No scheduler: the requests go straight to our queue, as they do to a
/// loop device or ploop's device-mapper target. With one queue the kernel
/// would pick mq-deadline, whose dispatch from a worker thread cost 15-50%
/// of 4k IOPS in the VM (measured with fio, 1 queue, QD32).
pub const DEFAULT_IO_SCHEDULER: &str = "none";

/// The value of `--io-scheduler` that leaves the kernel's choice alone.
pub const KERNEL_IO_SCHEDULER: &str = "kernel";

pub fn default_io_scheduler() -> String {
    DEFAULT_IO_SCHEDULER.to_string()
}

/// A scheduler name as sysfs takes it; the kernel judges whether it knows it.
pub fn parse_io_scheduler(s: &str) -> std::result::Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("`{s}` is not a scheduler name (none, mq-deadline, kyber, bfq, or `kernel` for the kernel's choice)"))
    }
}

fn scheduler_path(dev_id: u32) -> String {
    format!("/sys/block/ublkb{dev_id}/queue/scheduler")
}

/// The scheduler the device runs with, from sysfs (the bracketed name).
pub fn io_scheduler(dev_id: u32) -> Option<String> {
    let text = std::fs::read_to_string(scheduler_path(dev_id)).ok()?;
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

/// Set the device's scheduler; a failure is logged, the device serves on
/// (it only costs speed).
pub fn set_io_scheduler(dev_id: u32, name: &str) {
    if name == KERNEL_IO_SCHEDULER {
        return;
    }
    match std::fs::write(scheduler_path(dev_id), name) {
        Ok(()) => tracing::debug!(scheduler = name, "I/O scheduler set"),
        Err(e) => tracing::warn!("cannot set the I/O scheduler of /dev/ublkb{dev_id} to {name}: {e}"),
    }
}

/// Stop a device: ask the kernel to stop it (its daemon then closes the
/// images and exits), wait for the daemon, and delete the device. A mounted
/// device is refused unless `force`: its filesystem would see I/O errors.
pub fn delete(id: u32, force: bool) -> Result<()> {
    require_ublk()?;
    let ctrl = open_ctrl(id).ok_or_else(|| Error::new(libc::ENODEV, format!("no ublk device {id}")))?;
    if !force {
        if let Some(why) = mount::in_use(id) {
            return Err(Error::new(libc::EBUSY, format!("/dev/ublkb{id} is in use ({why}); unmount it first (or use --force)")));
        }
    }
    let pid = ctrl.dev_info().ublksrv_pid;
    // A daemon that died long ago left its pid behind, and another
    // process may have it now: waiting for that one to exit would wait
    // out the limit for nothing.
    let serving = pid > 0 && holds_char_device(pid, id) != Some(false);
    let _ = ctrl.kill_dev();
    if serving {
        wait_for_exit(pid, Duration::from_secs(60));
    }
    if open_ctrl(id).is_none() {
        // The daemon deleted it on its way out.
        return Ok(());
    }
    let rc = ctrl.del_dev().map_err(|e| ublk_err(e, "deleting the device"))?;
    if rc < 0 && rc != -libc::ENOENT {
        return Err(Error::new(-rc, format!("deleting device {id} failed")));
    }
    Ok(())
}

fn wait_for_exit(pid: i32, limit: Duration) {
    let start = Instant::now();
    loop {
        // A zombie child of ours would linger; reap it if it is one.
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        if proc_state(pid) == ProcState::Gone || start.elapsed() >= limit {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid` holds device `id`'s char device open, as its
/// daemon does until it exits; None when its files cannot be read (not
/// ours to see, or gone meanwhile).
fn holds_char_device(pid: i32, id: u32) -> Option<bool> {
    holds_open(pid, std::path::Path::new(&format!("/dev/ublkc{id}")))
}

/// Compared by what the files are, not by name: a daemon in another
/// mount namespace may know the node by another path. Only files in the
/// same directory as `path` are looked at (by their links' names first):
/// following every link would stat the daemon's images, and one on a
/// hung network mount would hang `del` before it kills the device.
fn holds_open(pid: i32, path: &std::path::Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let same = |m: &std::fs::Metadata, n: &std::fs::Metadata| if m.rdev() != 0 { m.rdev() == n.rdev() } else { (m.dev(), m.ino()) == (n.dev(), n.ino()) };
    let want = std::fs::metadata(path).ok()?;
    let dir = path.parent()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(dir)) && std::fs::metadata(fd.path()).is_ok_and(|m| same(&want, &m))
    }))
}

/// Where a process is on its way out, in order.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ProcState {
    /// Reaped, or a zombie: its files (the ublk device among them) are closed.
    Gone,
    /// Killed and exiting: it serves nothing any more, though its files
    /// may still be open for a moment.
    Exiting,
    Running,
}

/// A daemon killed a moment ago is still "alive" to signal 0 until it is
/// reaped, and its parent may never reap it; /proc tells a zombie (state Z
/// or X) and an exiting process (PF_EXITING among the flags) apart.
fn proc_state(pid: i32) -> ProcState {
    match std::fs::read(format!("/proc/{pid}/stat")) {
        Ok(stat) => parse_proc_stat(&String::from_utf8_lossy(&stat)),
        Err(_) => match nix::sys::signal::kill(Pid::from_raw(pid), None) {
            Ok(()) => ProcState::Running,
            Err(_) => ProcState::Gone,
        },
    }
}

fn parse_proc_stat(stat: &str) -> ProcState {
    const PF_EXITING: u64 = 0x4;
    // After the command name (which may hold anything, ")" too): the
    // state, then the flags as the seventh field.
    let rest: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    match (rest.first().copied(), rest.get(6).and_then(|f| f.parse::<u64>().ok())) {
        (Some("Z" | "X" | "x"), _) => ProcState::Gone,
        (_, Some(flags)) if flags & PF_EXITING != 0 => ProcState::Exiting,
        _ => ProcState::Running,
    }
}

/// The stored configuration of an existing device, for `recover` (what
/// the daemon stored as the target's data: its `DeviceConfig`).
pub fn stored_config<T: serde::de::DeserializeOwned>(id: u32) -> Result<T> {
    let ctrl = open_ctrl(id).ok_or_else(|| Error::new(libc::ENODEV, format!("no ublk device {id}")))?;
    let target = ctrl.get_target_type_from_json().unwrap_or_default();
    if target != TARGET_NAME {
        return Err(Error::invalid(format!("device {id} is not a ublk-ploop device (target '{target}')")));
    }
    let data = ctrl
        .get_target_data_from_json()
        .ok_or_else(|| Error::new(libc::ENOENT, format!("device {id}: its stored configuration is missing")))?;
    serde_json::from_value(data).map_err(|e| Error::invalid(format!("device {id}: stored configuration unreadable: {e}")))
}

/// Wait (briefly) until a device whose daemon died is ready for recovery.
/// A daemon still running after a moment serves the device: refused.
pub fn wait_quiesced(id: u32, limit: Duration) -> Result<()> {
    // A process sent SIGKILL a moment ago shows no sign of it until its
    // thread runs again (under load, or while it dumps core).
    const KILL_GRACE: Duration = Duration::from_secs(1);
    let start = Instant::now();
    loop {
        let ctrl = open_ctrl(id).ok_or_else(|| Error::new(libc::ENODEV, format!("no ublk device {id}")))?;
        let info = ctrl.dev_info();
        if info.flags & sys::UBLK_F_USER_RECOVERY as u64 == 0 {
            return Err(Error::invalid(format!("device {id} was created without user recovery; it cannot be recovered")));
        }
        match info.state as u32 {
            sys::UBLK_S_DEV_QUIESCED => return Ok(()),
            sys::UBLK_S_DEV_LIVE
                if info.ublksrv_pid > 0
                    && proc_state(info.ublksrv_pid) == ProcState::Running
                    && holds_char_device(info.ublksrv_pid, id) != Some(false)
                    && start.elapsed() >= KILL_GRACE =>
            {
                return Err(Error::new(libc::EBUSY, format!("device {id} is live, served by pid {}", info.ublksrv_pid)))
            }
            _ if start.elapsed() > limit => {
                return Err(Error::new(
                    libc::EBUSY,
                    format!("device {id} is {} and not ready for recovery", state_name(info.state)),
                ))
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_daemon_counts_as_gone_and_a_running_one_as_running() {
        let mut running = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        let zpid = zombie.id() as i32;
        let start = Instant::now();
        // Not reaped: it stays a zombie (signal 0 still finds it).
        while proc_state(zpid) != ProcState::Gone && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(nix::sys::signal::kill(Pid::from_raw(zpid), None).is_ok(), "the zombie was reaped");
        assert_eq!(proc_state(zpid), ProcState::Gone);
        assert_eq!(proc_state(running.id() as i32), ProcState::Running);
        running.kill().unwrap();
        running.wait().unwrap();
        zombie.wait().unwrap();
        assert_eq!(proc_state(zpid), ProcState::Gone);
    }

    #[test]
    fn a_process_is_known_by_the_files_it_holds_open() {
        // `del` waits only for a pid that holds the device's char device:
        // another process may have a dead daemon's pid by now.
        let dir = tempfile::tempdir().unwrap();
        let (held, other) = (dir.path().join("held"), dir.path().join("other"));
        std::fs::write(&held, b"").unwrap();
        std::fs::write(&other, b"").unwrap();
        let mut child = std::process::Command::new("sleep").arg("30").stdin(std::fs::File::open(&held).unwrap()).spawn().unwrap();
        let pid = child.id() as i32;
        assert_eq!(holds_open(pid, &held), Some(true));
        assert_eq!(holds_open(pid, &other), Some(false));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(holds_open(pid, &held), None, "a reaped process has no files to read");
    }

    #[test]
    fn proc_stat_lines_read_state_and_exiting_flag_after_the_name() {
        let line = |name: &str, state: &str, flags: u64| format!("4242 ({name}) {state} 1 4242 4242 0 -1 {flags} 120 0 0 0 5 3 0 0 20 0 3 0 99 0\n");
        assert_eq!(parse_proc_stat(&line("ublk-ploop", "S", 0x400040)), ProcState::Running);
        assert_eq!(parse_proc_stat(&line("ublk-ploop", "D", 0x400044)), ProcState::Exiting);
        assert_eq!(parse_proc_stat(&line("ublk-ploop", "Z", 0x400044)), ProcState::Gone);
        assert_eq!(parse_proc_stat(&line("ublk-ploop", "X", 0)), ProcState::Gone);
        // A name made to look like a zombie's line, and one with spaces.
        assert_eq!(parse_proc_stat(&line("a) Z (b", "R", 0x400040)), ProcState::Running);
        assert_eq!(parse_proc_stat(&line("x y) D 1 2 3 4 5 4", "S", 0x40)), ProcState::Running);
        assert_eq!(parse_proc_stat("garbage"), ProcState::Running);
    }
}
