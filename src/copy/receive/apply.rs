//! Applying a received incremental stream: the delta it was gathered into
//! is published under the name that says "complete", then its clusters are
//! copied into the target's top; an apply cut short is finished by the
//! next incremental receive (applying a complete delta again is harmless).

use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::temporaries::{registry, sync_parent, temp_beside};
use super::{check_clean, parent_of, Hooks};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::io::{block_on, AlignedBuf, Direct, FileKind, Io, LockHow, OpenHow, SyncIo};
use crate::stack::{LayerSpec, Stack, StackOptions};

/// A received delta, closed (durable, not in use) and checked, under its
/// name that says "complete": only a complete delta is ever applied.
pub(super) async fn publish_delta<I: Io>(io: &I, delta: &Path, complete: &Path) -> Result<()> {
    {
        let mut reg = registry();
        io.rename_noreplace(delta, complete).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) => Error::new(libc::EEXIST, format!("{}: another delta is waiting to be applied; refusing to replace it", complete.display())),
            _ => Error::io(e, format_args!("{} -> {}", delta.display(), complete.display())),
        })?;
        reg.forget(delta);
    }
    sync_parent(io, complete).await
}

/// The layers of the image (or disk) an incremental stream updates. Of a
/// disk directory, only a top inside it is ever written (and only beside
/// it are deltas made and removed): never a file the descriptor names
/// outside, nor one with another hard link.
pub(super) async fn target_chain<I: Io>(io: &I, dest: &Path) -> Result<Vec<LayerSpec>> {
    // Disk::is_disk and Disk::load still ask the host (their `Io` forms
    // are the disk module's to add).
    Ok(if Disk::is_disk(dest) { Disk::load(dest)?.writable_layers(io).await? } else { vec![LayerSpec::ploop(dest)] })
}

/// The top of an opened target, as it is now (not as its name was when
/// checked): a regular file with no other hard link, or the apply would
/// change another file too.
pub(super) fn check_top_is_ours<I: Io>(io: &I, stack: &Stack) -> Result<()> {
    let layers = stack.layers();
    let top = layers.last().expect("a chain is never empty").file();
    let m = io.fstat(top.fd()).map_err(|e| Error::io(e, top.path.display()))?;
    if m.kind != FileKind::File || m.nlink != 1 {
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
    block_on(finish_interrupted_apply_in(&SyncIo, dest, direct, &mut Hooks::with_env_crash(note)))
}

/// As [`finish_interrupted_apply`], through `io`.
pub async fn finish_interrupted_apply_in<I: Io>(io: &I, dest: &Path, direct: Direct, hooks: &mut Hooks<'_>) -> Result<Option<u64>> {
    let target = target_chain(io, dest).await?;
    let top = target.last().expect("a chain is never empty").path.clone();
    discard_stale_deltas(io, &top, &mut hooks.note);
    let complete = temp_beside(&top, ".incoming");
    match io.stat(&complete) {
        Ok(None) => return Ok(None),
        Err(e) => return Err(Error::io(e, complete.display())),
        Ok(Some(m)) if m.kind != FileKind::File => {
            return Err(Error::new(libc::EEXIST, format!("{}: exists and is not a received delta; move it away", complete.display())))
        }
        Ok(Some(_)) => {}
    }
    // Marked in use: the stream was still arriving when it was left (as an
    // older version of this tool received under the final name). Never
    // complete, never applied.
    if crate::layers::marked_in_use(io, &complete).await? {
        let f = io.open(&complete, &OpenHow::read()).map_err(|e| Error::io(e, complete.display()))?;
        if io.flock(f.fd(), LockHow::Exclusive).is_err() {
            return Err(Error::new(libc::EBUSY, format!("{}: in use by another process; not touched", complete.display())));
        }
        io.remove_file(&complete).map_err(|e| Error::io(e, complete.display()))?;
        sync_parent(io, &complete).await?;
        (hooks.note)(&format!("removed {}: a delta whose stream never ended (not applied)", complete.display()));
        return Ok(None);
    }
    let n = apply_delta(io, &complete, &target, direct, hooks).await?;
    (hooks.note)(&format!("finished an interrupted apply: {} from an earlier receive applied to {} ({n} clusters)", complete.display(), dest.display()));
    Ok(Some(n))
}

/// Remove `TOP.incoming.XXXXXX`, deltas a receive died receiving (the
/// caller holds the destination's lock: no receive is making one now).
fn discard_stale_deltas<I: Io>(io: &I, top: &Path, note: &mut dyn FnMut(&str)) {
    let Some(name) = top.file_name() else { return };
    let mut prefix = name.to_os_string();
    prefix.push(".incoming.");
    let prefix = prefix.as_bytes();
    let dir = parent_of(top);
    let Ok(names) = io.read_dir(dir) else { return };
    for n in names {
        let b = n.as_bytes();
        let ours = b.len() == prefix.len() + 6 && b.starts_with(prefix) && b[prefix.len()..].iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let path = dir.join(&n);
        if !ours || !matches!(io.stat(&path), Ok(Some(st)) if st.kind == FileKind::File) {
            continue;
        }
        // A receive still writing it (into this image under another name)
        // holds its lock.
        let Ok(f) = io.open(&path, &OpenHow::read()) else { continue };
        if io.flock(f.fd(), LockHow::Exclusive).is_err() {
            continue;
        }
        if io.remove_file(&path).is_ok() {
            note(&format!("removed {}: a delta whose stream never ended (not applied)", path.display()));
        }
    }
}

/// Copy the clusters of a complete delta into the target's top, make that
/// durable, and only then remove the delta. The target is marked in use
/// meanwhile (an interruption shows). Applying a delta again is harmless:
/// each cluster is written whole, with the same bytes.
pub(super) async fn apply_delta<I: Io>(io: &I, delta: &Path, target: &[LayerSpec], direct: Direct, hooks: &mut Hooks<'_>) -> Result<u64> {
    check_clean(io, delta).await?;
    let (src, _) = Stack::open_layers(io, &[LayerSpec::ploop(delta)], &StackOptions { read_only: true, direct, offline: false, link_log: None }).await?;
    let (dst, _) = Stack::open_layers(io, target, &StackOptions { read_only: false, direct, offline: false, link_log: None }).await?;
    if let Err(e) = check_top_is_ours(io, &dst) {
        let _ = dst.close(io).await;
        return Err(e);
    }
    if src.size() != dst.size() || src.cluster_size() != dst.cluster_size() {
        let _ = dst.close(io).await;
        return Err(Error::invalid(format!(
            "{}: the delta's disk ({} bytes, clusters of {}) is not the image's ({} bytes, clusters of {}); not applied",
            delta.display(),
            src.size(),
            src.cluster_size(),
            dst.size(),
            dst.cluster_size()
        )));
    }
    let cluster = src.cluster_size();
    let mut buf = AlignedBuf::zeroed(cluster as usize);
    let mut applied = 0;
    let copied: Result<()> = async {
        for c in src.allocated().await.iter_ones() {
            // Tests stop the apply here, as a crash would.
            if (hooks.before_cluster)(applied) == ControlFlow::Break(()) {
                std::future::pending::<()>().await;
            }
            let at = c as u64 * cluster;
            let len = (src.size() - at).min(cluster) as usize;
            src.read(io, at, &mut buf[..len]).await?;
            dst.write(io, at, &buf[..len]).await?;
            applied += 1;
        }
        dst.flush(io).await
    }
    .await;
    let closed = dst.close(io).await;
    drop(dst);
    copied?;
    closed?;
    drop(src);
    check_clean(io, &target.last().expect("never empty").path).await?;
    io.remove_file(delta).map_err(|e| Error::io(e, delta.display()))?;
    sync_parent(io, delta).await?;
    Ok(applied)
}
