//! Shrinking a failing run and saving it for replay (plan §4.4).
//!
//! A run is a seed's world (its scheduler, faults, crashes and entropy,
//! all derived from the seed) plus a list of `WorkOp`s. Shrinking keeps
//! the world and cuts the list: chunks of halving size, then single ops,
//! then each op's numbers toward 0 and its flags toward false, keeping a
//! change only while the run still fails with the same [`Signature`].
//! The ops are handled through serde, so a new `WorkOp` variant needs
//! nothing here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sim::gen::{self, Config, WorkOp};

/// How a run failed: the message, and where.
#[derive(Clone, Debug)]
pub struct Failure {
    pub why: String,
    /// The op it failed in; `None` for the setup, the list's length for
    /// the final checks.
    pub step: Option<usize>,
    /// What kind of step that was (`Write`, `Kill`, `setup`, `finish`).
    pub kind: String,
}

impl Failure {
    pub fn new(why: String, ops: &[WorkOp], step: Option<usize>) -> Failure {
        let kind = match step {
            None => "setup".to_string(),
            Some(i) => ops.get(i).map_or_else(|| "finish".to_string(), op_kind),
        };
        Failure { why, step, kind }
    }

    pub fn signature(&self) -> Signature {
        Signature { invariant: invariant_of(&self.why), kind: self.kind.clone() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.why)
    }
}

/// What a failure must keep for a cut to count: which invariant broke
/// (or that something panicked) and in what kind of step. The message's
/// details (offsets, step numbers, tags) may change as the list shrinks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub invariant: String,
    pub kind: String,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in a {} step", self.invariant, self.kind)
    }
}

/// "invariant N" from a failure's message (liveness, hang or event
/// budget, is invariant 8), else "panicked", else "other".
fn invariant_of(why: &str) -> String {
    if let Some(at) = why.find("invariant ") {
        let digits: String = why[at + "invariant ".len()..].chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() {
            return format!("invariant {digits}");
        }
    }
    if why.contains("panicked") {
        "panicked".to_string()
    } else {
        "other".to_string()
    }
}

/// The variant's name, from the Debug text (so any variant has one).
pub fn op_kind(op: &WorkOp) -> String {
    format!("{op:?}").chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// The result of a shrink.
#[derive(Debug)]
pub struct Shrunk {
    pub ops: Vec<WorkOp>,
    pub signature: Signature,
    /// Runs tried, the first (the original) included.
    pub runs: u64,
    /// The budget ran out before a full pass changed nothing.
    pub out_of_time: bool,
}

struct Search<F> {
    run: F,
    signature: Signature,
    deadline: Instant,
    runs: u64,
    out_of_time: bool,
}

impl<F: Fn(&[WorkOp]) -> Result<(), Signature>> Search<F> {
    /// Does `ops` still fail the same way? False once time is up.
    fn holds(&mut self, ops: &[WorkOp]) -> bool {
        if Instant::now() >= self.deadline {
            self.out_of_time = true;
            return false;
        }
        self.runs += 1;
        (self.run)(ops).err().as_ref() == Some(&self.signature)
    }

    /// Remove chunks of halving size, then single ops until none goes.
    fn remove(&mut self, ops: &mut Vec<WorkOp>) -> bool {
        let mut changed = false;
        let mut chunk = ops.len().div_ceil(2).max(1);
        while !self.out_of_time {
            let mut removed = false;
            let mut i = 0;
            while i < ops.len() && !self.out_of_time {
                let end = (i + chunk).min(ops.len());
                let cut: Vec<WorkOp> = ops[..i].iter().chain(&ops[end..]).cloned().collect();
                if self.holds(&cut) {
                    *ops = cut;
                    removed = true;
                } else {
                    i += chunk;
                }
            }
            changed |= removed;
            if chunk == 1 {
                if !removed {
                    break;
                }
            } else {
                chunk /= 2;
            }
        }
        changed
    }

    /// Make each op simpler: every number smaller (toward 0), every flag
    /// false, one at a time, keeping what still fails.
    fn simplify(&mut self, ops: &mut [WorkOp]) -> bool {
        let mut changed = false;
        for i in 0..ops.len() {
            let mut value = serde_json::to_value(&ops[i]).expect("a WorkOp serializes");
            let count = leaves(&mut value.clone()).len();
            for k in 0..count {
                'smaller: loop {
                    let mut now = value.clone();
                    let candidates: Vec<Value> = match &*leaves(&mut now)[k] {
                        Value::Bool(true) => vec![Value::Bool(false)],
                        Value::Number(n) => n.as_u64().map(smaller).unwrap_or_default().into_iter().map(Value::from).collect(),
                        _ => Vec::new(),
                    };
                    for c in candidates {
                        if self.out_of_time {
                            return changed;
                        }
                        let mut tried = value.clone();
                        *leaves(&mut tried)[k] = c;
                        let Ok(op) = serde_json::from_value::<WorkOp>(tried.clone()) else { continue };
                        let old = std::mem::replace(&mut ops[i], op);
                        if self.holds(ops) {
                            value = tried;
                            changed = true;
                            continue 'smaller;
                        }
                        ops[i] = old;
                    }
                    break;
                }
            }
        }
        changed
    }
}

/// The number and flag leaves of a serialized op, in a fixed order.
fn leaves(v: &mut Value) -> Vec<&mut Value> {
    fn walk<'a>(v: &'a mut Value, out: &mut Vec<&'a mut Value>) {
        if matches!(v, Value::Bool(_) | Value::Number(_)) {
            out.push(v);
            return;
        }
        match v {
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, out)),
            Value::Object(m) => m.values_mut().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

/// Values below `n`, smallest first: 0, then halving the distance to `n`.
/// A whole number of sectors stays one (offsets and lengths keep reading
/// as the workload's, though the driver would round them anyway).
fn smaller(n: u64) -> Vec<u64> {
    let unit = if n % gen::SECTOR == 0 { gen::SECTOR } else { 1 };
    let mut out = Vec::new();
    let mut d = n / unit;
    while d > 0 {
        out.push(n - d * unit);
        d /= 2;
    }
    out
}

/// Shrink `ops` while `run` fails with the signature the whole list
/// fails with, for at most `budget`. `None` when `ops` does not fail.
pub fn shrink(ops: &[WorkOp], budget: Duration, run: impl Fn(&[WorkOp]) -> Result<(), Signature>) -> Option<Shrunk> {
    let signature = run(ops).err()?;
    let mut s = Search { run, signature, deadline: Instant::now() + budget, runs: 1, out_of_time: false };
    let mut ops = ops.to_vec();
    loop {
        let removed = s.remove(&mut ops);
        let simpler = s.simplify(&mut ops);
        if s.out_of_time || !(removed || simpler) {
            break;
        }
    }
    Some(Shrunk { ops, signature: s.signature, runs: s.runs, out_of_time: s.out_of_time })
}

/// Where a seed's shrunk failure is saved: the target directory.
pub fn fail_file(seed: u64) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"), PathBuf::from);
    target.join(format!("sim-fail-{seed}.json"))
}

#[derive(serde::Deserialize)]
struct Saved {
    seed: u64,
    ops: Vec<WorkOp>,
}

/// The saved run as JSON, one op a line (so that it diffs and reads).
pub fn to_text(seed: u64, why: &str, ops: &[WorkOp]) -> String {
    let lines: Vec<String> = ops.iter().map(|op| format!("    {}", serde_json::to_string(op).expect("a WorkOp serializes"))).collect();
    format!("{{\n  \"seed\": {seed},\n  \"failure\": {},\n  \"ops\": [\n{}\n  ]\n}}\n", serde_json::Value::from(why), lines.join(",\n"))
}

/// A saved run's seed and ops.
pub fn from_text(text: &str) -> Result<(u64, Vec<WorkOp>), String> {
    let saved: Saved = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok((saved.seed, saved.ops))
}

pub fn load(path: &Path) -> (u64, Vec<WorkOp>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    from_text(&text).unwrap_or_else(|e| panic!("{} is not a saved run: {e}", path.display()))
}

/// Shrink a seed's failing run with the real driver for `secs`, print
/// what it came to and save it; the file's path.
pub fn shrink_seed(cfg: &Config, ops: &[WorkOp], failure: &Failure, secs: u64) -> PathBuf {
    let seed = cfg.seed;
    let started = Instant::now();
    // Each failing try would print its panic otherwise.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let run = |ops: &[WorkOp]| super::run_ops(cfg.clone(), ops).map(|_| ()).map_err(|f| f.signature());
    // The ops after the failing one never ran: drop them first.
    let mut start = ops.to_vec();
    if let Some(step) = failure.step.filter(|&s| s + 1 < ops.len()) {
        if run(&ops[..=step]).err() == Some(failure.signature()) {
            start.truncate(step + 1);
        }
    }
    let shrunk = shrink(&start, Duration::from_secs(secs), run);
    let last = shrunk.as_ref().and_then(|s| super::run_ops(cfg.clone(), &s.ops).err());
    std::panic::set_hook(hook);
    let (Some(shrunk), Some(last)) = (shrunk, last) else {
        panic!("seed {seed}: the failure ({failure}) did not recur when rerun: the simulation is not deterministic");
    };
    let path = fail_file(seed);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let text = to_text(seed, &last.why, &shrunk.ops);
    let saved = std::fs::write(&path, &text).map(|_| "saved").unwrap_or("not saved");
    eprintln!(
        "seed {seed}: shrunk {} ops to {} in {:.1} s ({} runs{}), keeping {}; {saved} to {}",
        ops.len(),
        shrunk.ops.len(),
        started.elapsed().as_secs_f64(),
        shrunk.runs,
        if shrunk.out_of_time { ", out of time" } else { "" },
        shrunk.signature,
        path.display()
    );
    eprintln!("shrunk trace (seed {seed}, {:?}):", cfg);
    for (i, op) in shrunk.ops.iter().enumerate() {
        eprintln!("  {i}: {op:?}");
    }
    eprintln!("shrunk failure: {last}");
    path
}

/// The first of `ops`' generated seeds whose list holds `pattern`.
#[cfg(test)]
fn seed_with(pattern: impl Fn(&[WorkOp]) -> bool) -> (u64, Vec<WorkOp>) {
    (1..1000).map(|seed| (seed, gen::generate(seed).1)).find(|(_, ops)| pattern(ops)).expect("some seed draws it")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: u64 = 65536;
    const X: u64 = 3;

    fn hits_x(op: &WorkOp) -> bool {
        matches!(*op, WorkOp::Write { off, len, .. } if off < (X + 1) * CLUSTER && off + len > X * CLUSTER)
    }

    /// A stand-in for an engine bug: invariant 1 breaks at a kill that
    /// follows a write to cluster X with no settle between.
    fn write_then_kill(ops: &[WorkOp]) -> Result<(), Signature> {
        let mut armed = false;
        for op in ops {
            match op {
                WorkOp::Settle => armed = false,
                WorkOp::Kill { .. } if armed => return Err(Signature { invariant: "invariant 1".into(), kind: "Kill".into() }),
                op if hits_x(op) => armed = true,
                _ => {}
            }
        }
        Ok(())
    }

    #[test]
    fn a_stand_in_bug_shrinks_to_its_two_ops() {
        let (seed, ops) = seed_with(|ops| write_then_kill(ops).is_err() && ops.len() > 300);
        let shrunk = shrink(&ops, Duration::from_secs(30), write_then_kill).unwrap();
        assert!(!shrunk.out_of_time, "seed {seed}");
        assert_eq!(shrunk.signature, Signature { invariant: "invariant 1".into(), kind: "Kill".into() });
        assert!(write_then_kill(&shrunk.ops).is_err());
        // The two ops, each as simple as it gets while it still fails.
        assert_eq!(shrunk.ops.len(), 2, "seed {seed}: {:?}", shrunk.ops);
        assert!(hits_x(&shrunk.ops[0]), "{:?}", shrunk.ops);
        assert_eq!(shrunk.ops[1], WorkOp::Kill { after: 0, repair: false });
        let WorkOp::Write { queue, off, len, misalign } = shrunk.ops[0] else { unreachable!() };
        assert_eq!((queue, misalign), (0, 0));
        assert!(off % gen::SECTOR == 0 && len % gen::SECTOR == 0, "still in sectors: {:?}", shrunk.ops);
        assert_eq!(off + len, X * CLUSTER + gen::SECTOR, "off and len as small as still reach X: {:?}", shrunk.ops);
        eprintln!("seed {seed}: {} ops shrunk to {:?} in {} runs", ops.len(), shrunk.ops, shrunk.runs);
    }

    /// A change that fails another way is not kept: here a kill with no
    /// events before it breaks invariant 8, which simplifying the kill
    /// of the stand-in bug would reach.
    #[test]
    fn a_change_that_fails_differently_is_not_kept() {
        let other = |ops: &[WorkOp]| {
            if ops.iter().any(|op| matches!(op, WorkOp::Kill { after: 0, .. })) {
                return Err(Signature { invariant: "invariant 8".into(), kind: "Kill".into() });
            }
            write_then_kill(ops)
        };
        let (seed, ops) = seed_with(|ops| other(ops).is_err_and(|s| s.invariant == "invariant 1"));
        let shrunk = shrink(&ops, Duration::from_secs(30), other).unwrap();
        assert_eq!(shrunk.signature.invariant, "invariant 1");
        assert_eq!(other(&shrunk.ops), Err(shrunk.signature.clone()), "seed {seed}: {:?}", shrunk.ops);
        assert_eq!(shrunk.ops.len(), 2, "{:?}", shrunk.ops);
        assert_eq!(shrunk.ops[1], WorkOp::Kill { after: 1, repair: false });
    }

    #[test]
    fn a_passing_list_does_not_shrink_and_time_is_kept() {
        assert!(shrink(&gen::generate(1).1, Duration::from_secs(5), |_| Ok(())).is_none());
        // No time: the list comes back as it was, marked so.
        let (_, ops) = seed_with(|ops| write_then_kill(ops).is_err());
        let shrunk = shrink(&ops, Duration::ZERO, write_then_kill).unwrap();
        assert!(shrunk.out_of_time && shrunk.ops == ops && shrunk.runs == 1);
    }

    #[test]
    fn numbers_shrink_toward_zero_and_sectors_stay_sectors() {
        assert_eq!(smaller(0), Vec::<u64>::new());
        assert_eq!(smaller(1), vec![0]);
        assert_eq!(smaller(37), vec![0, 19, 28, 33, 35, 36]);
        assert_eq!(smaller(8 * 512), vec![0, 4 * 512, 6 * 512, 7 * 512]);
    }

    #[test]
    fn a_failure_names_its_invariant_and_step_kind() {
        let ops = [WorkOp::Settle, WorkOp::Kill { after: 3, repair: true }];
        let sig = |why: &str, step| Failure::new(why.into(), &ops, step).signature().to_string();
        assert_eq!(sig("invariant 7 (errors owed): step 1: ...", Some(1)), "invariant 7 in a Kill step");
        assert_eq!(sig("invariant 12 (x): step 0", Some(0)), "invariant 12 in a Settle step");
        assert_eq!(sig("step 2: a task panicked: task 'write': boom", Some(2)), "panicked in a finish step");
        assert_eq!(sig("setup: creating /sim/disk: no space", None), "other in a setup step");
    }

    /// Seed 24's run as shrinking left it (1180 ops to 6) under the
    /// `copy-up-sync` mutant: a write after a snapshot and a clean reopen
    /// copies its cluster up into the new top, then the power goes. The
    /// intact engine syncs the copy before its table entry links it.
    const COPY_UP_SYNC_CASE: &str = r#"{
  "seed": 24,
  "failure": "invariant 1 (reads match): step 5, read-back after a crash: sector 4230 read zeros (under the mutant)",
  "ops": [
    {"Write":{"queue":0,"off":2165760,"len":0,"misalign":0}},
    "Snapshot",
    "CleanReopen",
    {"Flush":{"queue":0}},
    {"Write":{"queue":0,"off":2162688,"len":0,"misalign":0}},
    {"PowerCut":{"after":15,"repair":false}}
  ]
}"#;

    #[test]
    fn a_saved_case_runs_in_its_seeds_world() {
        let (seed, ops) = from_text(COPY_UP_SYNC_CASE).unwrap();
        let (cfg, _) = gen::generate(seed);
        if let Err(f) = crate::run_ops(cfg, &ops) {
            panic!("seed {seed}'s saved case failed in a {} step: {f}", f.kind);
        }
    }

    #[test]
    fn a_saved_run_reads_back_the_same() {
        let (seed, ops) = (7, gen::generate(7).1);
        let text = to_text(seed, "invariant 1 (\"quoted\")\nsecond line", &ops);
        assert_eq!(text.lines().count(), ops.len() + 6, "one op a line");
        assert_eq!(from_text(&text).unwrap(), (seed, ops));
        assert_eq!(from_text(&to_text(3, "", &[])).unwrap(), (3, vec![]));
        assert!(from_text("{\"seed\": 1}").is_err());
    }
}
