//! Applying a received incremental stream: the delta it was gathered into
//! is published under the name that says "complete", then its clusters are
//! copied into the target's top; an apply cut short is finished by the
//! next incremental receive (applying a complete delta again is harmless).

use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::temporaries::{forget_in, registry, rename_noreplace, sync_parent, temp_beside};
use super::{check_clean, parent_of};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::io::{block_on, AlignedBuf, Direct, SyncIo};
use crate::stack::{LayerSpec, Stack, StackOptions};

/// A received delta, closed (durable, not in use) and checked, under its
/// name that says "complete": only a complete delta is ever applied.
pub(super) fn publish_delta(delta: &Path, complete: &Path) -> Result<()> {
    let mut reg = registry();
    rename_noreplace(delta, complete).map_err(|e| match e.raw_os_error() {
        Some(libc::EEXIST) => Error::new(libc::EEXIST, format!("{}: another delta is waiting to be applied; refusing to replace it", complete.display())),
        _ => Error::io(e, format_args!("{} -> {}", delta.display(), complete.display())),
    })?;
    forget_in(&mut reg, delta);
    drop(reg);
    sync_parent(complete)
}

/// The layers of the image (or disk) an incremental stream updates. Of a
/// disk directory, only a top inside it is ever written (and only beside
/// it are deltas made and removed): never a file the descriptor names
/// outside, nor one with another hard link.
pub(super) fn target_chain(dest: &Path) -> Result<Vec<LayerSpec>> {
    Ok(if Disk::is_disk(dest) { block_on(Disk::load(dest)?.writable_layers(&SyncIo))? } else { vec![LayerSpec::ploop(dest)] })
}

/// The top of an opened target, as it is now (not as its name was when
/// checked): a regular file with no other hard link, or the apply would
/// change another file too.
pub(super) fn check_top_is_ours(stack: &Stack) -> Result<()> {
    let layers = stack.layers();
    let top = layers.last().expect("a chain is never empty").file();
    let m = crate::io::Io::fstat(&crate::io::SyncIo, top.fd()).map_err(|e| Error::io(e, top.path.display()))?;
    if m.kind != crate::io::FileKind::File || m.nlink != 1 {
        return Err(Error::new(
            libc::EPERM,
            format!(
                "{}: refusing to apply a delta to it: it is not a regular file with a single name ({} links), so writing it would change another file too",
                top.path.display(),
                m.nlink
            ),
        ));
    }
    Ok(())
}

/// Before an incremental receive: a complete delta left by an apply that
/// was cut short (a crash, a signal) is applied now, whatever stream comes
/// next (the sender may have cleared its record of those clusters); stale
/// temporaries of deltas still being received when a receive died are
/// removed. The number of clusters applied, if there was such a delta.
pub fn finish_interrupted_apply(dest: &Path, direct: Direct, note: &mut dyn FnMut(&str)) -> Result<Option<u64>> {
    let target = target_chain(dest)?;
    let top = target.last().expect("a chain is never empty").path.clone();
    discard_stale_deltas(&top, note);
    let complete = temp_beside(&top, ".incoming");
    match std::fs::symlink_metadata(&complete) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(e, complete.display())),
        Ok(m) if !m.is_file() => {
            return Err(Error::new(libc::EEXIST, format!("{}: exists and is not a received delta; move it away", complete.display())))
        }
        Ok(_) => {}
    }
    // Marked in use: the stream was still arriving when it was left (as an
    // older version of this tool received under the final name). Never
    // complete, never applied.
    if block_on(crate::layers::marked_in_use(&SyncIo, &complete))? {
        let f = std::fs::File::open(&complete).map_err(|e| Error::io(e, complete.display()))?;
        // SAFETY: plain syscall on our own descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::new(libc::EBUSY, format!("{}: in use by another process; not touched", complete.display())));
        }
        std::fs::remove_file(&complete).map_err(|e| Error::io(e, complete.display()))?;
        sync_parent(&complete)?;
        note(&format!("removed {}: a delta whose stream never ended (not applied)", complete.display()));
        return Ok(None);
    }
    let n = apply_delta(&complete, &target, direct)?;
    note(&format!("finished an interrupted apply: {} from an earlier receive applied to {} ({n} clusters)", complete.display(), dest.display()));
    Ok(Some(n))
}

/// Remove `TOP.incoming.XXXXXX`, deltas a receive died receiving (the
/// caller holds the destination's lock: no receive is making one now).
fn discard_stale_deltas(top: &Path, note: &mut dyn FnMut(&str)) {
    let Some(name) = top.file_name() else { return };
    let mut prefix = name.to_os_string();
    prefix.push(".incoming.");
    let prefix = prefix.as_bytes();
    let Ok(entries) = std::fs::read_dir(parent_of(top)) else { return };
    for e in entries.flatten() {
        let n = e.file_name();
        let b = n.as_bytes();
        let ours = b.len() == prefix.len() + 6 && b.starts_with(prefix) && b[prefix.len()..].iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !ours || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        // A receive still writing it (into this image under another name)
        // holds its lock.
        let Ok(f) = std::fs::File::open(e.path()) else { continue };
        // SAFETY: plain syscall on our own descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        if std::fs::remove_file(e.path()).is_ok() {
            note(&format!("removed {}: a delta whose stream never ended (not applied)", e.path().display()));
        }
    }
}

/// Copy the clusters of a complete delta into the target's top, make that
/// durable, and only then remove the delta. The target is marked in use
/// meanwhile (an interruption shows). Applying a delta again is harmless:
/// each cluster is written whole, with the same bytes.
pub(super) fn apply_delta(delta: &Path, target: &[LayerSpec], direct: Direct) -> Result<u64> {
    let io = &SyncIo;
    check_clean(delta)?;
    let (src, _) = block_on(Stack::open_layers(io, &[LayerSpec::ploop(delta)], &StackOptions { read_only: true, direct }))?;
    let (dst, _) = block_on(Stack::open_layers(io, target, &StackOptions { read_only: false, direct }))?;
    if let Err(e) = check_top_is_ours(&dst) {
        let _ = block_on(dst.close(io));
        return Err(e);
    }
    if src.size() != dst.size() || src.cluster_size() != dst.cluster_size() {
        let _ = block_on(dst.close(io));
        return Err(Error::invalid(format!(
            "{}: the delta's disk ({} bytes, clusters of {}) is not the image's ({} bytes, clusters of {}); not applied",
            delta.display(),
            src.size(),
            src.cluster_size(),
            dst.size(),
            dst.cluster_size()
        )));
    }
    // Tests stop the apply here, as a crash would.
    let crash_after: Option<u64> = std::env::var("UBLK_PLOOP_TEST_CRASH_APPLY_AFTER").ok().and_then(|v| v.parse().ok());
    let cluster = src.cluster_size();
    let mut buf = AlignedBuf::zeroed(cluster as usize);
    let mut applied = 0;
    let copied = (|| {
        for c in block_on(src.allocated()).iter_ones() {
            if crash_after == Some(applied) {
                // SAFETY: the process kills itself, as a crash would.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
            let at = c as u64 * cluster;
            let len = (src.size() - at).min(cluster) as usize;
            block_on(src.read(io, at, &mut buf[..len]))?;
            block_on(dst.write(io, at, &buf[..len]))?;
            applied += 1;
        }
        block_on(dst.flush(io))
    })();
    let closed = block_on(dst.close(io));
    drop(dst);
    copied?;
    closed?;
    drop(src);
    check_clean(&target.last().expect("never empty").path)?;
    std::fs::remove_file(delta).map_err(|e| Error::io(e, delta.display()))?;
    sync_parent(delta)?;
    Ok(applied)
}
