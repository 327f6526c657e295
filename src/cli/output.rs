//! What every verb prints with: JSON, progress bars, following a
//! device's job to its end, and a device's status.

use std::io::IsTerminal;
use std::time::Duration;

use serde::Serialize;

use ublk_ploop::{Error, Result};

use crate::control::request;
use ublk_ploop::protocol::{Job, JobState, Request, Status};

pub fn print_json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("serialisable"));
}

/// Follow a device's job to its end, with a progress bar on a terminal.
pub fn follow(id: u32, json: bool) -> Result<Job> {
    let mut bar: Option<Bar> = None;
    loop {
        let job: Option<Job> = request(id, Request::Job)?;
        let job = job.ok_or_else(|| Error::new(libc::EPROTO, "the daemon has no job to report"))?;
        // Labelled by the kind the daemon reports (every job was "merging").
        let bar = bar.get_or_insert_with(|| Bar::new(json, job.kind.doing()));
        if let Some(r) = job.round {
            bar.label(&format!("{}, round {r}", job.kind.doing()));
        }
        bar.set(job.done, job.total);
        match job.state {
            JobState::Running => std::thread::sleep(Duration::from_millis(200)),
            JobState::Done => {
                bar.finish();
                return Ok(job);
            }
            JobState::Failed => {
                bar.finish();
                return Err(Error::new(job.errno.unwrap_or(libc::EIO), job.error.unwrap_or_else(|| format!("the {} failed", job.kind))));
            }
        }
    }
}

/// A progress bar on stderr when it is a terminal (and not --json).
pub struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    pub fn new(json: bool, label: &str) -> Bar {
        if json || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} clusters ({eta})")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        Bar(Some(bar))
    }
    pub fn label(&self, label: &str) {
        if let Some(b) = &self.0 {
            b.set_message(label.to_string());
        }
    }
    pub fn set(&self, done: u64, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
            b.set_position(done);
        }
    }
    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

pub fn print_status(s: &Status) {
    println!(
        "{} (pid {}), {} bytes{}{}",
        s.device,
        s.pid,
        s.size,
        if s.read_only { ", read-only" } else { "" },
        s.snapshot.map(|g| format!(", snapshot {g}")).unwrap_or_default()
    );
    if let Some(d) = &s.disk {
        println!("  disk: {}", d.display());
    }
    if !s.data_path.is_empty() {
        println!("  data path: {}", s.data_path.replace('_', " "));
    }
    if let Some(sched) = &s.io_scheduler {
        println!("  I/O scheduler: {sched}");
    }
    for (i, l) in s.layers.iter().enumerate() {
        println!("  layer {i}: {} ({:?}{})", l.path.display(), l.format, if l.writable { ", writable" } else { "" });
        if let Some(c) = &l.caches {
            println!(
                "    caches: L2 tables {} KiB ({} hits, {} misses), inflated clusters {} KiB ({} hits, {} misses)",
                c.l2_bytes >> 10,
                c.l2_hits,
                c.l2_misses,
                c.inflated_bytes >> 10,
                c.inflate_hits,
                c.inflate_misses
            );
        }
    }
    let c = &s.counters;
    println!(
        "  counters: reads {} ({} bytes), writes {} ({} bytes), flushes {}, discards {}, write-zeroes {}, errors {}; copy-ups {}",
        c.reads, c.read_bytes, c.writes, c.write_bytes, c.flushes, c.discards, c.write_zeroes, c.errors, s.copy_ups
    );
    if let Some(j) = &s.job {
        let what = j.uuid.map(|g| format!(" {g}")).unwrap_or_default();
        match j.state {
            JobState::Running => {
                let round = j.round.map(|r| format!(" round {r}")).unwrap_or_default();
                println!("  job: {}{what}{round}: {}/{} clusters, {:.0} s", j.kind, j.done, j.total, j.secs)
            }
            JobState::Done => println!("  last job: {}{what} done in {:.1} s", j.kind, j.secs),
            JobState::Failed => println!("  last job: {}{what} failed: {}", j.kind, j.error.as_deref().unwrap_or("?")),
        }
    }
}
