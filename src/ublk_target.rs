//! The ublk frontend: serves a `Stack` as /dev/ublkbN.
//!
//! It only translates ublk requests into engine calls. Each queue thread
//! runs one async task per tag on libublk's per-queue io_uring, and the
//! engine's I/O runs on that same ring ([`QueueRing`]): a request that
//! waits (a copy-up, the file growing, a BAT write, a stack change)
//! yields, and the queue's other requests go on.

use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, UblkDev, UblkQueue};
use libublk::{sys, UblkError};
use serde::Serialize;

use ublk_ploop::io::wait::{set_thread_kick, Kick};
use ublk_ploop::io::{ring_setup, FixedBuf, RingIo, Submit};
use ublk_ploop::Stack;

use crate::ublk_control::MAX_IO_BYTES;
// Device control moved to `ublk_control`; the CLI still names these here.

/// Per-device I/O counters, shown by `status`.
#[derive(Default, Serialize)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub errors: AtomicU64,
}

/// What every queue thread shares.
pub struct Device {
    pub stack: Stack,
    pub counters: Counters,
}

/// Fill in the device parameters from the stack.
pub fn init_target(dev: &mut UblkDev, stack: &Stack, read_only: bool) -> Result<(), UblkError> {
    let depth = dev.dev_info.queue_depth;
    let tgt = &mut dev.tgt;
    // Room for the ublk commands plus several image I/Os per request.
    tgt.sq_depth = depth.saturating_mul(4).min(4096);
    tgt.cq_depth = tgt.sq_depth.saturating_mul(2).min(8192);
    dev.set_default_params(stack.size());
    let p = &mut dev.tgt.params;
    let block_shift = stack.block_size().trailing_zeros() as u8;
    p.basic.logical_bs_shift = block_shift;
    p.basic.physical_bs_shift = block_shift.max(12);
    p.basic.io_min_shift = block_shift.max(12);
    p.basic.io_opt_shift = stack.cluster_size().min(MAX_IO_BYTES as u64).trailing_zeros() as u8;
    if read_only {
        p.basic.attrs |= sys::UBLK_ATTR_READ_ONLY;
    } else {
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = sys::ublk_param_discard {
            discard_granularity: stack.block_size().max(4096),
            max_discard_sectors: u32::MAX >> 9,
            max_write_zeroes_sectors: u32::MAX >> 9,
            max_discard_segments: 1,
            ..Default::default()
        };
    }
    Ok(())
}

/// The queue's own ring, as the engine's I/O submits to it.
pub struct QueueRing<'a> {
    q: &'a UblkQueue<'a>,
}

impl Submit for QueueRing<'_> {
    fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32> {
        // Queued only: the queue loop submits everything its tasks queued
        // in one io_uring_enter before it waits again, so a batch of
        // requests reaches the image's disk under one plug (one kick of a
        // virtio disk, say) instead of one syscall and kick each. Measured
        // in the VM on 7.3 (fio 4k random read QD32, 1 queue, 3 rounds):
        // 6.6k-12.2k IOPS submitting each SQE at once, 12.9k-15.2k batched,
        // loop with direct I/O 12.4k-14.1k. Nothing waits on the ring
        // outside that loop, so a queued SQE is never left behind; a full
        // SQ is flushed by libublk.
        self.q.ublk_submit_sqe(sqe)
    }
    fn run_task_work(&self) {
        libublk::io::with_task_io_ring(ring_setup::run_task_work);
    }
}

/// Body of one queue thread: a task per tag, all on the queue's ring.
pub fn run_queue(qid: u16, dev: &UblkDev, device: Arc<Device>) {
    // Our ring, not libublk's default: set up on this thread (a single
    // issuer) before the queue that uses it.
    let ring = libublk::io::ublk_init_task_ring(|cell| {
        if cell.get().is_none() {
            let ring = ring_setup::build_ring(dev.tgt.sq_depth as u32, dev.tgt.cq_depth as u32).map_err(UblkError::IOError)?;
            tracing::debug!(qid, deferred = ring.params().is_setup_single_issuer(), "queue ring set up");
            cell.set(std::cell::RefCell::new(ring)).map_err(|_| UblkError::OtherError(-libc::EEXIST))?;
        }
        Ok(())
    });
    let q = match ring.and_then(|()| UblkQueue::new(qid, dev)) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!("queue {qid}: setup failed: {e}");
            // Let start_dev fail instead of waiting for us forever.
            dev.notify_buffer_registration_complete(true);
            return;
        }
    };
    let kick = match Kick::new() {
        Ok(k) => k,
        Err(e) => {
            tracing::error!("queue {qid}: eventfd: {e}");
            dev.notify_buffer_registration_complete(true);
            return;
        }
    };
    // Requests of other queues (and the control thread) that wake one of
    // ours kick this eventfd, which the ring polls.
    set_thread_kick(Some(kick.clone()));
    let exe = Rc::new(async_executor::LocalExecutor::new());
    let tasks: Vec<_> = q
        .tags()
        .map(|tag| {
            let (q, device) = (q.clone(), device.clone());
            exe.spawn(async move {
                match io_task(&q, tag, &device).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => tracing::error!("queue {qid} tag {tag}: {e}"),
                }
            })
        })
        .collect();
    let q2 = q.clone();
    exe.spawn(async move {
        loop {
            let poll = opcode::PollAdd::new(types::Fd(kick.fd()), libc::POLLIN as u32).build();
            if q2.ublk_submit_sqe(poll).await < 0 {
                tracing::error!("queue {qid}: polling the wake-up eventfd failed");
                return;
            }
            kick.clear();
        }
    })
    .detach();
    let exe2 = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while exe2.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        let reap = |timed_out| libublk::uring_async::ublk_reap_io_events_with_update_queue(&q, timed_out, None, |c| libublk::uring_async::ublk_wake_task(c.user_data(), c));
        if let Err(e) = libublk::uring_async::run_uring_tasks(|| wait_for_completions(&q, &done), reap, run_ops, &done).await {
            tracing::error!("queue {qid}: {e}");
        }
    }));
    set_thread_kick(None);
}

/// Submit what is queued and wait for a completion (or 20 s: the queue
/// then counts as idle). Unlike libublk's own wait, this one still waits
/// once the queue is stopping: with deferred task work the aborts of a
/// stopping device are posted only while this thread waits for
/// completions, and a wait that asks for none would spin forever. Once
/// every tag's task has ended (`done`, also through an error other than
/// the stop's abort), it returns at once, so the queue thread ends.
async fn wait_for_completions(q: &UblkQueue<'_>, done: &impl Fn() -> bool) -> Result<bool, UblkError> {
    if done() {
        return Err(UblkError::QueueIsDown);
    }
    let ts = types::Timespec::new().sec(20);
    let args = types::SubmitArgs::new().timespec(&ts);
    let timed_out = match libublk::io::with_task_io_ring_mut(|r| r.submitter().submit_with_args(1, &args)) {
        Ok(_) => false,
        Err(e) if e.raw_os_error() == Some(libc::ETIME) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => false,
        Err(e) => return Err(UblkError::IOError(e)),
    };
    // Stopping: the caller leaves once every tag's task is done.
    match q.is_stopping() {
        true => Err(UblkError::QueueIsDown),
        false => Ok(timed_out),
    }
}

async fn io_task(q: &UblkQueue<'_>, tag: u16, device: &Device) -> Result<(), UblkError> {
    let io = RingIo::new(QueueRing { q });
    if q.support_auto_buf_zc() {
        // Zero copy: before handing us a request with data, the kernel
        // registers its pages on this ring at index `tag` (and takes them
        // back when we commit); our reads and writes name that index. No
        // fallback: a failed registration fails the request with EIO.
        let reg = sys::ublk_auto_buf_reg { index: tag, ..Default::default() };
        q.submit_io_prep_cmd(tag, BufDesc::AutoReg(reg), 0, None).await?;
        loop {
            let res = handle(&io, q, tag, Data::Registered(tag), device).await;
            next_request(q.submit_io_commit_cmd(tag, BufDesc::AutoReg(reg), res).await?)?;
        }
    }
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf)).await?;
    loop {
        let res = handle(&io, q, tag, Data::Copied(buf.as_mut_slice()), device).await;
        next_request(q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res).await?)?;
    }
}

/// What a commit's completion says: the next request arrived, the queue
/// is going down, or the driver refused the commit (then serving the old
/// request descriptor again would spin; the tag stops with an error).
fn next_request(result: i32) -> Result<(), UblkError> {
    match result {
        r if r == sys::UBLK_IO_RES_OK as i32 => Ok(()),
        sys::UBLK_IO_RES_ABORT => Err(UblkError::QueueIsDown),
        r => Err(UblkError::OtherError(r)),
    }
}

/// Where a request's data is.
enum Data<'a> {
    /// Copy mode: the kernel copies it to or from this buffer of ours.
    Copied(&'a mut [u8]),
    /// Zero copy: the request's own pages, registered at this index.
    Registered(u16),
}

/// Serve one request; returns what the kernel expects: bytes moved for
/// reads and writes, 0 for the rest, or -errno.
async fn handle(io: &RingIo<QueueRing<'_>>, q: &UblkQueue<'_>, tag: u16, data: Data<'_>, device: &Device) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let offset = iod.start_sector << 9;
    let len = (iod.nr_sectors as usize) << 9;
    let stack = &device.stack;
    let c = &device.counters;
    let result = match op {
        sys::UBLK_IO_OP_READ => {
            c.reads.fetch_add(1, Ordering::Relaxed);
            c.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
            match data {
                Data::Registered(index) => stack.read_fixed(io, offset, registered(index, len)).await,
                Data::Copied(buf) => match buf.get_mut(..len) {
                    Some(data) => stack.read(io, offset, data).await,
                    None => Err(too_large()),
                },
            }
        }
        sys::UBLK_IO_OP_WRITE => {
            c.writes.fetch_add(1, Ordering::Relaxed);
            c.write_bytes.fetch_add(len as u64, Ordering::Relaxed);
            match data {
                Data::Registered(index) => stack.write_fixed(io, offset, registered(index, len)).await,
                Data::Copied(buf) => match buf.get(..len) {
                    Some(data) => stack.write(io, offset, data).await,
                    None => Err(too_large()),
                },
            }
        }
        sys::UBLK_IO_OP_FLUSH => {
            c.flushes.fetch_add(1, Ordering::Relaxed);
            stack.flush(io).await
        }
        sys::UBLK_IO_OP_DISCARD => {
            c.discards.fetch_add(1, Ordering::Relaxed);
            stack.discard(io, offset, len).await
        }
        sys::UBLK_IO_OP_WRITE_ZEROES => {
            c.write_zeroes.fetch_add(1, Ordering::Relaxed);
            stack.write_zeroes(io, offset, len).await
        }
        _ => Err(ublk_ploop::Error::new(libc::EOPNOTSUPP, "unsupported request")),
    };
    match result {
        Ok(()) if op == sys::UBLK_IO_OP_READ || op == sys::UBLK_IO_OP_WRITE => len as i32,
        Ok(()) => 0,
        Err(e) => {
            c.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(op, offset, len, errno = e.errno(), "request failed: {e}");
            -e.errno()
        }
    }
}

/// A request's pages as the ring knows them: a kernel buffer is addressed
/// from 0.
fn registered(index: u16, len: usize) -> FixedBuf {
    FixedBuf { index, base: 0, off: 0, len }
}

fn too_large() -> ublk_ploop::Error {
    ublk_ploop::Error::invalid("request larger than the I/O buffer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_results_name_the_next_step() {
        assert!(next_request(0).is_ok());
        assert!(matches!(next_request(sys::UBLK_IO_RES_ABORT), Err(UblkError::QueueIsDown)));
        assert!(matches!(next_request(-libc::EINVAL), Err(UblkError::OtherError(e)) if e == -libc::EINVAL));
    }
}
