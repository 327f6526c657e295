//! The device's background jobs (merge, delete, compact, copy, backup):
//! one at a time, each on a thread and ring of its own, its state kept
//! for `status` and `job` until the next one starts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ublk_ploop::io::OwnRing;
use ublk_ploop::protocol::{Job, JobResult, JobState};
use ublk_ploop::{Error, Result, Stack};

use crate::ublk_control::stop_device;
use crate::ublk_target::Device;

/// What a job reports: (copy round, done, total).
pub type JobProgress<'a> = &'a dyn Fn(Option<u32>, u64, u64);

/// What a finished job did, and what comes after.
pub struct Outcome {
    pub result: JobResult,
    /// Something the user should know about the result.
    pub note: Option<String>,
    /// Stop this device after the job's result was fetched.
    pub stop: Option<u32>,
}

impl From<JobResult> for Outcome {
    fn from(result: JobResult) -> Outcome {
        Outcome { result, note: None, stop: None }
    }
}

pub type JobFn = dyn FnOnce(&OwnRing, &Stack, JobProgress<'_>) -> Result<Outcome> + Send;

/// The running or last job.
#[derive(Default)]
pub struct Jobs {
    slot: Arc<Mutex<Option<Job>>>,
    /// The finished job's result was fetched (a device stopping after its
    /// last copy waits for that).
    seen: Arc<AtomicBool>,
}

impl Jobs {
    pub fn running(&self) -> bool {
        self.slot.lock().unwrap().as_ref().is_some_and(|j| j.state == JobState::Running)
    }

    /// The job as `status` shows it.
    pub fn peek(&self) -> Option<Job> {
        self.slot.lock().unwrap().clone()
    }

    /// The job as `job` fetches it: a finished one counts as seen.
    pub fn fetch(&self) -> Option<Job> {
        let job = self.peek();
        if job.as_ref().is_some_and(|j| j.state != JobState::Running) {
            self.seen.store(true, Ordering::Relaxed);
        }
        job
    }

    /// Run a job on a thread of its own (with its own ring); returns its
    /// first status. `guard` (what kept other commands off until the job
    /// is registered) is released once it is.
    pub fn start<G>(&self, job: Job, guard: G, device: Arc<Device>, work: Box<JobFn>) -> Result<Job> {
        *self.slot.lock().unwrap() = Some(job.clone());
        drop(guard);
        let slot = self.slot.clone();
        let seen = self.seen.clone();
        seen.store(false, Ordering::Relaxed);
        let started = Instant::now();
        let spawned = std::thread::Builder::new().name(format!("job-{}", job.kind)).spawn(move || {
            let progress = |round: Option<u32>, done: u64, total: u64| {
                if let Some(j) = slot.lock().unwrap().as_mut() {
                    j.round = round;
                    j.done = done;
                    j.total = total;
                    j.secs = started.elapsed().as_secs_f64();
                }
            };
            let outcome = match OwnRing::new(64) {
                Ok(ring) => work(&ring, &device.stack, &progress),
                Err(e) => Err(Error::io(e, "setting up io_uring")),
            };
            let mut stop = None;
            let mut j = slot.lock().unwrap();
            if let Some(j) = j.as_mut() {
                j.secs = started.elapsed().as_secs_f64();
                match outcome {
                    Ok(o) => {
                        stop = o.stop;
                        j.state = JobState::Done;
                        j.result = o.result;
                        if let Some(n) = o.note {
                            j.note = Some(j.note.take().map_or(n.clone(), |old| format!("{old}; {n}")));
                        }
                    }
                    Err(e) => {
                        tracing::error!("{} failed: {e}", j.kind);
                        j.state = JobState::Failed;
                        j.error = Some(e.message().to_string());
                        j.errno = Some(e.errno());
                    }
                }
            }
            drop(j);
            if let Some(dev_id) = stop {
                let until = Instant::now() + Duration::from_secs(10);
                while !seen.load(Ordering::Relaxed) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
                stop_device(dev_id);
            }
        });
        if let Err(e) = spawned {
            *self.slot.lock().unwrap() = None;
            return Err(Error::io(e, "starting the job"));
        }
        Ok(job)
    }
}
