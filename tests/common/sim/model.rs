//! What the disk may read as (plan §3.2): per 512-byte sector, every
//! version a write, a write-zeroes or a discard may have left there, with
//! the model times it was issued and completed. A read (or the read-back
//! after a crash) may return a version unless another write that completed
//! for sure overwrote it before the read began.
//!
//! Writes carry unique tags: each sector's payload is tag ‖ disk offset ‖
//! filler ([`payload`]), so a sector read back names the write that made
//! it ([`decode`]); a zero sector is tag 0. Write-zeroes is a version of
//! tag 0; a discard is one only where the top layer holds the cluster
//! (data only lower layers hold stays), as `Model::discard` of
//! tests/model.rs.
//!
//! The clock is the model's own: every call ticks it, and the driver calls
//! the model in the order things happen on the one simulated thread, so
//! "issued before" and "completed before" are exact. A request's task
//! records its completion the moment the engine's future returns.
//!
//! Durability: a FLUSH that completes Ok makes every write completed before
//! it was issued durable. After a power cut the disk may read as a read
//! that began at the last such FLUSH's issue and ends at the cut; after a
//! kill (page cache survives) as a read at the kill. In-flight writes at a
//! crash become failed writes: they may or may not have landed, sector by
//! sector.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use ublk_ploop::rng::mix;

pub const SECTOR: u64 = 512;

/// The write that produced a sector; 0 means zeros.
pub type Tag = u64;
/// The model's clock.
pub type Time = u64;

/// Not yet completed.
const IN_FLIGHT: Time = Time::MAX;

/// The payload of `len` bytes written with `tag` at disk offset `off`:
/// per sector, the tag, the sector's disk offset, then a filler both
/// determine (so a torn or misplaced sector does not decode as whole).
pub fn payload(tag: Tag, off: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    fill_payload(&mut out, tag, off);
    out
}

pub fn fill_payload(out: &mut [u8], tag: Tag, off: u64) {
    assert!(tag != 0 && out.len() as u64 % SECTOR == 0 && off % SECTOR == 0);
    for (i, sector) in out.chunks_exact_mut(SECTOR as usize).enumerate() {
        let at = off + i as u64 * SECTOR;
        sector[0..8].copy_from_slice(&tag.to_le_bytes());
        sector[8..16].copy_from_slice(&at.to_le_bytes());
        let base = filler(tag, at);
        for (j, word) in sector[16..].chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&base.wrapping_add(j as u64).to_le_bytes());
        }
    }
}

fn filler(tag: Tag, at: u64) -> u64 {
    mix(tag ^ at.rotate_left(29))
}

/// What one sector read back says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A whole sector of write `Tag` (0: zeros).
    Tag(Tag),
    /// Write `tag`'s sector for disk offset `meant`, found elsewhere.
    Misplaced { tag: Tag, meant: u64 },
    /// Neither zeros nor any write's whole sector (torn inside a sector,
    /// metadata, garbage); the first 16 bytes.
    Garbage([u8; 16]),
}

pub fn decode(sector: &[u8], at: u64) -> Seen {
    debug_assert_eq!(sector.len() as u64, SECTOR);
    // Slice equality is a memcmp even in a debug build: read-backs decode
    // every sector of the disk.
    if sector == &[0u8; SECTOR as usize][..] {
        return Seen::Tag(0);
    }
    let word = |i: usize| u64::from_le_bytes(sector[i * 8..i * 8 + 8].try_into().unwrap());
    let (tag, meant) = (word(0), word(1));
    let base = filler(tag, meant);
    // The filler's first and last words: the world tears whole sectors
    // only, so these tell a payload from metadata or garbage.
    let last = SECTOR as usize / 8 - 1;
    let whole = tag != 0 && meant % SECTOR == 0 && word(2) == base && word(last) == base.wrapping_add(last as u64 - 2);
    if !whole {
        return Seen::Garbage(sector[0..16].try_into().unwrap());
    }
    if meant != at {
        return Seen::Misplaced { tag, meant };
    }
    Seen::Tag(tag)
}

/// Does a cluster's layer hold it? Unknown while a write that would
/// allocate it is in flight or failed, and across a snapshot or a cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Own {
    No,
    Maybe,
    Yes,
}

impl Own {
    fn join(self, other: Own) -> Own {
        if self == other {
            self
        } else {
            Own::Maybe
        }
    }
    /// A write may have allocated it.
    fn touched(self) -> Own {
        if self == Own::Yes {
            Own::Yes
        } else {
            Own::Maybe
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Zeroes,
    Discard,
    Flush,
    /// The content a read-back found (a collapse).
    Observed,
}

/// One request the model follows, by id.
#[derive(Clone, Debug)]
struct Op {
    kind: Kind,
    off: u64,
    len: u64,
    tag: Tag,
    issued: Time,
    /// For a discard: the clusters it found held by the top (zeroed for
    /// sure), maybe held (zeroed or not), or not held at issue.
    discard_own: Vec<Own>,
}

#[derive(Clone, Copy, Debug)]
struct Version {
    tag: Tag,
    issued: Time,
    done: Time,
    /// Completed Ok and took effect for sure: it overwrote what came
    /// before it. A failed write, or a discard over a cluster the top
    /// may not hold, never overwrites for sure.
    firm: bool,
    op: u64,
}

/// Where a tag came from, for failure messages.
#[derive(Clone, Debug)]
pub struct TagInfo {
    pub kind: Kind,
    pub off: u64,
    pub len: u64,
    pub step: u64,
    pub issued: Time,
    pub done: Option<(Time, bool)>,
}

pub type OpId = u64;

pub struct Model {
    size: u64,
    cluster: u64,
    now: Time,
    sectors: Vec<Vec<Version>>,
    ops: BTreeMap<OpId, Op>,
    next_op: OpId,
    next_tag: Tag,
    tags: BTreeMap<Tag, TagInfo>,
    top: Vec<Own>,
    lower: Vec<Own>,
    /// The issue time of the latest FLUSH (or snapshot) that completed
    /// Ok: what was completed before it is durable.
    durable_at: Time,
    /// A crash happened: the next full read-back is checked as a read
    /// from this time.
    recover_from: Option<Time>,
    /// A writeback failed since the last reopen: the engine's tables in
    /// memory may be ahead of the ones on disk, so what it reads now (and
    /// a read-back takes as the content) a restart may not read again.
    cache_lost: bool,
    /// When a write, write-zeroes or discard last failed: until a flush
    /// issued after it succeeds, what it linked may live only in the
    /// engine's memory (its table entry unwritten), so a kill may take
    /// back what a read showed of it.
    failed_at: Option<Time>,
    /// A snapshot is between its start and its end: clusters written
    /// meanwhile may be the old top's or the new one's.
    snap: Option<(Time, Vec<bool>)>,
    /// The last snapshot's end: writes issued before it and completed
    /// after it may have landed in either layer.
    snap_done: Time,
    /// The driver's workload step, for messages.
    pub step: u64,
}

impl Model {
    pub fn new(size: u64, cluster: u64) -> Model {
        assert!(size % SECTOR == 0);
        let nsec = (size / SECTOR) as usize;
        let initial = Version { tag: 0, issued: 0, done: 0, firm: true, op: 0 };
        let nclusters = size.div_ceil(cluster) as usize;
        Model {
            size,
            cluster,
            now: 1,
            sectors: vec![vec![initial]; nsec],
            ops: BTreeMap::new(),
            next_op: 1,
            next_tag: 1,
            tags: BTreeMap::new(),
            top: vec![Own::No; nclusters],
            lower: vec![Own::No; nclusters],
            durable_at: 0,
            recover_from: None,
            cache_lost: false,
            failed_at: None,
            snap: None,
            snap_done: 0,
            step: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn tick(&mut self) -> Time {
        self.now += 1;
        self.now
    }

    fn sector_range(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        assert!(off % SECTOR == 0 && len % SECTOR == 0 && off + len <= self.size, "request {off}+{len} outside the model");
        (off / SECTOR) as usize..((off + len) / SECTOR) as usize
    }

    fn cluster_range(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        (off / self.cluster) as usize..(off + len).div_ceil(self.cluster) as usize
    }

    fn new_op(&mut self, kind: Kind, off: u64, len: u64, tag: Tag) -> OpId {
        let issued = self.tick();
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(id, Op { kind, off, len, tag, issued, discard_own: Vec::new() });
        if kind != Kind::Read && kind != Kind::Flush {
            self.tags.entry(tag).or_insert(TagInfo { kind, off, len, step: self.step, issued, done: None });
        }
        id
    }

    /// Record a write issued now: returns its id and the tag its payload
    /// must carry.
    pub fn issue_write(&mut self, off: u64, len: u64) -> (OpId, Tag) {
        let tag = self.next_tag;
        self.next_tag += 1;
        let id = self.new_op(Kind::Write, off, len, tag);
        self.add_versions(id, off, len, tag);
        for c in self.cluster_range(off, len) {
            self.top[c] = self.top[c].touched();
            self.touch_in_snapshot(c);
            self.discards_may_punch(c);
        }
        (id, tag)
    }

    pub fn issue_zeroes(&mut self, off: u64, len: u64) -> OpId {
        let id = self.new_op(Kind::Zeroes, off, len, 0);
        self.add_versions(id, off, len, 0);
        let snapping = self.snap.is_some();
        for c in self.cluster_range(off, len) {
            // Zeroing over lower data needs a top cluster to hide it; during
            // a snapshot the old top may be lower by the time it runs.
            if self.lower[c] != Own::No || snapping && self.top[c] != Own::No {
                self.top[c] = self.top[c].touched();
                self.touch_in_snapshot(c);
                self.discards_may_punch(c);
            }
        }
        id
    }

    pub fn issue_discard(&mut self, off: u64, len: u64) -> OpId {
        let id = self.new_op(Kind::Discard, off, len, 0);
        // During a snapshot the discard may run on the new top, which
        // holds nothing yet.
        let snapping = self.snap.is_some();
        let own: Vec<Own> = self.cluster_range(off, len).map(|c| if snapping { self.top[c].unsure() } else { self.top[c] }).collect();
        let first = self.cluster_range(off, len).start;
        for (i, o) in own.iter().enumerate() {
            if *o == Own::No {
                continue;
            }
            let c = (first + i) as u64;
            let lo = (c * self.cluster).max(off);
            let hi = ((c + 1) * self.cluster).min(off + len);
            self.add_versions(id, lo, hi - lo, 0);
        }
        self.ops.get_mut(&id).unwrap().discard_own = own;
        id
    }

    pub fn issue_read(&mut self, off: u64, len: u64) -> OpId {
        self.sector_range(off, len);
        self.new_op(Kind::Read, off, len, 0)
    }

    pub fn issue_flush(&mut self) -> OpId {
        self.new_op(Kind::Flush, 0, 0, 0)
    }

    fn add_versions(&mut self, op: OpId, off: u64, len: u64, tag: Tag) {
        let issued = self.ops[&op].issued;
        let horizon = self.horizon();
        for s in self.sector_range(off, len) {
            self.prune_sector(s, horizon);
            self.sectors[s].push(Version { tag, issued, done: IN_FLIGHT, firm: false, op });
        }
    }

    /// A request that may allocate cluster `c` in the top makes every
    /// discard in flight there, which found the cluster not held, able to
    /// punch it after all: the two are unordered, so the discard's lookup
    /// may come after the allocation (and its zeros show before it ends).
    fn discards_may_punch(&mut self, c: usize) {
        let cluster = self.cluster;
        let racing: Vec<(OpId, u64, u64)> = self
            .ops
            .iter_mut()
            .filter(|(_, o)| o.kind == Kind::Discard)
            .filter_map(|(&id, o)| {
                let first = (o.off / cluster) as usize;
                let own = o.discard_own.get_mut(c.checked_sub(first)?)?;
                if *own != Own::No {
                    return None;
                }
                *own = Own::Maybe;
                let lo = (c as u64 * cluster).max(o.off);
                let hi = ((c as u64 + 1) * cluster).min(o.off + o.len);
                Some((id, lo, hi - lo))
            })
            .collect();
        for (id, off, len) in racing {
            self.add_versions(id, off, len, 0);
        }
    }

    fn touch_in_snapshot(&mut self, c: usize) {
        if let Some((_, touched)) = &mut self.snap {
            touched[c] = true;
        }
    }

    /// A write, write-zeroes, discard or flush completed (`ok`: without
    /// error).
    pub fn complete(&mut self, id: OpId, ok: bool) {
        let now = self.tick();
        let op = self.ops.remove(&id).unwrap_or_else(|| panic!("model: op {id} completed twice or never issued"));
        if let Some(info) = self.tags.get_mut(&op.tag).filter(|_| op.kind == Kind::Write) {
            info.done = Some((now, ok));
        }
        if !ok && matches!(op.kind, Kind::Write | Kind::Zeroes | Kind::Discard) {
            self.failed_at = Some(now);
        }
        match op.kind {
            Kind::Flush => {
                if ok {
                    self.durable_at = self.durable_at.max(op.issued);
                }
            }
            Kind::Read | Kind::Observed => panic!("model: complete() on a read; use check_read"),
            Kind::Write | Kind::Zeroes | Kind::Discard => {
                let first = self.cluster_range(op.off, op.len).start;
                for s in self.sector_range(op.off, op.len) {
                    let c = s as u64 * SECTOR / self.cluster;
                    // A discard zeroes for sure only where the top held the
                    // cluster when it began.
                    let sure = op.kind != Kind::Discard || op.discard_own[c as usize - first] == Own::Yes;
                    for v in self.sectors[s].iter_mut().filter(|v| v.op == id) {
                        v.done = now;
                        v.firm = ok && sure;
                    }
                }
                if op.kind == Kind::Discard {
                    self.discard_raced(&op, id, now);
                } else {
                    self.owned_after(&op, ok);
                }
            }
        }
    }

    /// A discard that found a cluster not held may still have punched it
    /// if a concurrent write allocated it meanwhile: zeros become possible
    /// there (never for sure).
    fn discard_raced(&mut self, op: &Op, id: OpId, now: Time) {
        let first = self.cluster_range(op.off, op.len).start;
        for (i, own) in op.discard_own.clone().into_iter().enumerate() {
            let c = first + i;
            if own != Own::No || self.top[c] == Own::No {
                continue;
            }
            let lo = (c as u64 * self.cluster).max(op.off);
            let hi = ((c as u64 + 1) * self.cluster).min(op.off + op.len);
            for s in self.sector_range(lo, hi - lo) {
                self.sectors[s].push(Version { tag: 0, issued: op.issued, done: now, firm: false, op: id });
            }
        }
    }

    /// Who holds the clusters a write or write-zeroes touched, now that it
    /// completed.
    fn owned_after(&mut self, op: &Op, ok: bool) {
        let straddles = self.snap.is_some() || op.issued < self.snap_done;
        for c in self.cluster_range(op.off, op.len) {
            if op.kind == Kind::Zeroes && self.lower[c] == Own::No && !(straddles && self.top[c] != Own::No) {
                continue;
            }
            if straddles {
                // It may have landed in the old top (now lower) or the new.
                self.top[c] = self.top[c].touched();
                self.lower[c] = self.lower[c].touched();
            } else if ok && (op.kind == Kind::Write || self.lower[c] == Own::Yes) {
                // Acknowledged after a writeback failed (it was in flight):
                // its table entry may have been among the pages lost, and a
                // restart reads the table on disk.
                self.top[c] = if self.cache_lost { self.top[c].touched() } else { Own::Yes };
            }
        }
    }

    /// A merge (or a delete that merges) begins or ends: the top may
    /// take the parent's clusters, so every cluster a lower layer may hold
    /// may be the top's now, and a discard in flight may punch its copy.
    /// Lower merges change no holder the model follows; they are treated
    /// the same (less exact, still sound).
    pub fn merge_moves_holdings(&mut self) {
        for c in 0..self.top.len() {
            if self.lower[c] != Own::No {
                self.top[c] = self.top[c].max_own(Own::Maybe);
                self.lower[c] = self.lower[c].unsure();
                self.discards_may_punch(c);
            }
        }
    }

    /// The disk grew to `size` (the new part reads as zeros, no layer
    /// holds it).
    pub fn grow(&mut self, size: u64) {
        assert!(size >= self.size && size % SECTOR == 0, "model: grow from {} to {size}", self.size);
        let initial = Version { tag: 0, issued: 0, done: 0, firm: true, op: 0 };
        self.sectors.resize((size / SECTOR) as usize, vec![initial]);
        let clusters = size.div_ceil(self.cluster) as usize;
        self.top.resize(clusters, Own::No);
        self.lower.resize(clusters, Own::No);
        self.size = size;
    }

    /// The content per sector (its tag) as a quiet read-back found it:
    /// what a snapshot taken now holds.
    pub fn content(&self) -> Result<Vec<Tag>, String> {
        self.sectors
            .iter()
            .enumerate()
            .map(|(s, v)| match v.as_slice() {
                [only] if only.firm => Ok(only.tag),
                _ => Err(format!("model: sector {s} has {} versions where one was expected (not quiet?)", v.len())),
            })
            .collect()
    }

    /// A switch to a snapshot: the disk now reads as `content` (sector
    /// tags), durably; a new empty top over layers that hold the
    /// snapshot's data.
    pub fn switched(&mut self, content: &[Tag]) {
        assert!(self.ops.is_empty(), "model: a switch with requests in flight");
        assert_eq!(content.len(), self.sectors.len(), "model: a switch to a snapshot of another size");
        let now = self.tick();
        let id = self.next_op;
        self.next_op += 1;
        for (s, &tag) in content.iter().enumerate() {
            self.sectors[s] = vec![Version { tag, issued: now, done: now, firm: true, op: id }];
        }
        let per = (self.cluster / SECTOR) as usize;
        for c in 0..self.top.len() {
            self.top[c] = Own::No;
            let data = content[c * per..((c + 1) * per).min(content.len())].iter().any(|&t| t != 0);
            self.lower[c] = if data { Own::Yes } else { Own::Maybe };
        }
        self.durable_at = now;
        self.recover_from = None;
        self.snap = None;
        self.snap_done = now;
    }

    /// A snapshot (a new top over the current one) begins.
    pub fn snapshot_begin(&mut self) {
        let now = self.tick();
        let mut touched = vec![false; self.top.len()];
        // Writes in flight now may land on either side of the swap.
        for op in self.ops.values().filter(|o| matches!(o.kind, Kind::Write | Kind::Zeroes)) {
            for c in self.cluster_range(op.off, op.len) {
                touched[c] = true;
            }
        }
        // A discard in flight may run on either top.
        for op in self.ops.values_mut().filter(|o| o.kind == Kind::Discard) {
            for o in &mut op.discard_own {
                *o = o.unsure();
            }
        }
        self.snap = Some((now, touched));
    }

    /// The snapshot ended: `swapped` says whether the new top is in the
    /// stack (Ok, or an error after the swap; None: unknown).
    pub fn snapshot_end(&mut self, swapped: Option<bool>, ok: bool) {
        let now = self.tick();
        let (began, touched) = self.snap.take().expect("model: snapshot_end without snapshot_begin");
        match swapped {
            Some(false) => {
                for (c, t) in touched.into_iter().enumerate() {
                    if t {
                        self.top[c] = self.top[c].touched();
                    }
                }
            }
            Some(true) | None => {
                for c in 0..self.top.len() {
                    let old_top = self.top[c];
                    self.lower[c] = match swapped {
                        Some(true) => self.lower[c].max_own(old_top),
                        _ => self.lower[c].max_own(old_top.touched_if(old_top != Own::No)),
                    };
                    self.top[c] = if touched[c] || swapped.is_none() && old_top != Own::No { Own::Maybe } else { Own::No };
                }
                self.snap_done = now;
                // Retiring the old top synced it: what completed before the
                // snapshot began is durable.
                if ok {
                    self.durable_at = self.durable_at.max(began);
                }
            }
        }
    }

    /// The process died: every request in flight may or may not have
    /// landed, sector by sector; the page cache keeps the rest.
    pub fn kill(&mut self) {
        // (Before the requests in flight fail with the process: those may
        // or may not have landed anyway.)
        let unflushed_failure = self.failed_at.is_some_and(|t| t > self.durable_at);
        let now = self.fail_in_flight();
        // After a failed writeback the restart reads the tables on disk:
        // anything since the last durable point, as after a power cut.
        self.recover_from = Some(if self.cache_lost || unflushed_failure { self.durable_at } else { now });
    }

    /// The power went: as a kill, and what was not durable may be lost.
    pub fn power_cut(&mut self) {
        self.fail_in_flight();
        self.recover_from = Some(self.durable_at);
        // An allocation not synced yet may be gone again.
        for t in &mut self.top {
            if *t == Own::Yes {
                *t = Own::Maybe;
            }
        }
    }

    fn fail_in_flight(&mut self) -> Time {
        let ids: Vec<OpId> = self.ops.keys().copied().collect();
        for id in ids {
            if self.ops[&id].kind == Kind::Read {
                self.ops.remove(&id);
            } else {
                self.complete(id, false);
            }
        }
        if self.snap.is_some() {
            self.snapshot_end(None, false);
        }
        self.tick()
    }

    /// A writeback failed (a sync's EIO): the world may have thrown the
    /// dirty pages away, so until a later write lands a sector may read as
    /// anything a power cut now would leave, or as zeros (a copied-up
    /// cluster whose data was never written back). The engine owes only
    /// failing every later flush (invariant 7 checks that side).
    pub fn page_cache_lost(&mut self) {
        self.cache_lost = true;
        let now = self.tick();
        let from = self.durable_at;
        let id = self.next_op;
        self.next_op += 1;
        for s in 0..self.sectors.len() {
            let mut tags: Vec<Tag> = self.allowed(s, from, now).iter().map(|v| v.tag).collect();
            tags.push(0);
            tags.sort_unstable();
            tags.dedup();
            for tag in tags {
                self.sectors[s].push(Version { tag, issued: now, done: now, firm: false, op: id });
            }
        }
        for t in &mut self.top {
            *t = t.unsure();
        }
    }

    /// After a crash and a reopen, the stack's layers may not be the ones
    /// the model assumed (a snapshot in flight): every holding is unsure.
    pub fn unsure_holdings(&mut self) {
        for o in self.top.iter_mut().chain(self.lower.iter_mut()) {
            if *o != Own::No {
                *o = Own::Maybe;
            }
        }
    }

    /// A read `id` returned `data`: check every sector, then forget it.
    pub fn check_read(&mut self, id: OpId, data: &[u8]) -> Result<(), String> {
        let now = self.tick();
        let op = self.ops.remove(&id).unwrap_or_else(|| panic!("model: read {id} checked twice or never issued"));
        assert_eq!(op.kind, Kind::Read);
        assert_eq!(data.len() as u64, op.len);
        self.check_window(op.off, data, op.issued, now, "read")
    }

    /// A read failed: nothing to check.
    pub fn read_failed(&mut self, id: OpId) {
        let op = self.ops.remove(&id).unwrap_or_else(|| panic!("model: read {id} ended twice or never issued"));
        assert_eq!(op.kind, Kind::Read);
    }

    /// The full read-back after a reopen (or any quiet moment): `data` is
    /// the disk from `off`. After a crash it is checked against what the
    /// crash allowed; either way the model then takes what was read as the
    /// content (the collapse), so later checks are exact again.
    pub fn check_readback(&mut self, off: u64, data: &[u8]) -> Result<(), String> {
        self.may_read_back(off, data)?;
        let now = self.tick();
        self.collapse(off, data, now);
        Ok(())
    }

    /// The check of [`check_readback`] without the collapse.
    pub fn may_read_back(&mut self, off: u64, data: &[u8]) -> Result<(), String> {
        let now = self.tick();
        assert!(self.ops.values().all(|o| o.kind == Kind::Read), "model: read-back with requests in flight");
        let from = self.recover_from.unwrap_or(now);
        let what = if self.recover_from.is_some() { "read-back after a crash" } else { "read-back" };
        self.check_window(off, data, from, now, what)
    }

    /// The clock now (ticked): a moment the driver names later, as a
    /// backup's frozen point.
    pub fn mark_time(&mut self) -> Time {
        self.tick()
    }

    /// Writes, write-zeroes and discards not yet completed.
    pub fn changes_in_flight(&self) -> usize {
        self.ops.values().filter(|o| matches!(o.kind, Kind::Write | Kind::Zeroes | Kind::Discard)).count()
    }

    /// Check `data` at `off` as a read that began at `from` and ended at
    /// `to` (a backup's content, taken somewhere between its freeze and
    /// its thaw), with no collapse.
    pub fn check_as_read(&self, off: u64, data: &[u8], from: Time, to: Time, what: &str) -> Result<(), String> {
        self.check_window(off, data, from, to, what)
    }

    /// The crash has been resolved by a whole read-back.
    pub fn recovered(&mut self) {
        self.recover_from = None;
        self.cache_lost = false;
        self.failed_at = None;
    }

    /// Take the sectors read as the content now. The versions stay for a
    /// later power cut (what was not flushed may still vanish), but none
    /// of them may be read again while the power stays on.
    fn collapse(&mut self, off: u64, data: &[u8], now: Time) {
        let id = self.next_op;
        self.next_op += 1;
        let horizon = self.horizon();
        for (i, sector) in data.chunks_exact(SECTOR as usize).enumerate() {
            let at = off + i as u64 * SECTOR;
            if let Seen::Tag(tag) = decode(sector, at) {
                let s = (at / SECTOR) as usize;
                if let [only] = self.sectors[s].as_slice() {
                    if only.tag == tag && only.firm {
                        continue;
                    }
                }
                self.prune_sector(s, horizon);
                self.sectors[s].push(Version { tag, issued: now, done: now, firm: true, op: id });
            }
        }
    }

    /// Which versions of sector `s` a read over [from, to] may return.
    fn allowed(&self, s: usize, from: Time, to: Time) -> Vec<&Version> {
        let versions = &self.sectors[s];
        // The latest issue of a version surely done before `from`: every
        // version completed before that issue was overwritten for sure.
        let cover = versions.iter().filter(|w| w.firm && w.done < from).map(|w| w.issued).max().unwrap_or(0);
        versions.iter().filter(|v| v.issued < to && !(v.done < cover)).collect()
    }

    /// `allowed(s, from, to)` holds `tag` (without building the list: the
    /// read-backs ask this of every sector).
    fn may_be(&self, s: usize, from: Time, to: Time, tag: Tag) -> bool {
        let versions = &self.sectors[s];
        if let [only] = versions.as_slice() {
            return only.tag == tag && only.issued < to;
        }
        let cover = versions.iter().filter(|w| w.firm && w.done < from).map(|w| w.issued).max().unwrap_or(0);
        versions.iter().any(|v| v.tag == tag && v.issued < to && !(v.done < cover))
    }

    fn check_window(&self, off: u64, data: &[u8], from: Time, to: Time, what: &str) -> Result<(), String> {
        for (i, sector) in data.chunks_exact(SECTOR as usize).enumerate() {
            let at = off + i as u64 * SECTOR;
            let s = (at / SECTOR) as usize;
            let seen = decode(sector, at);
            if let Seen::Tag(tag) = seen {
                if self.may_be(s, from, to, tag) {
                    continue;
                }
            }
            return Err(self.mismatch(what, at, seen, &self.allowed(s, from, to)));
        }
        Ok(())
    }

    fn mismatch(&self, what: &str, at: u64, seen: Seen, allowed: &[&Version]) -> String {
        let mut msg = format!("invariant 1 (reads match): step {}, {what}: sector {} (disk offset {at:#x}) read ", self.step, at / SECTOR);
        match seen {
            Seen::Tag(tag) => msg += &self.describe(tag),
            Seen::Misplaced { tag, meant } => {
                let _ = write!(msg, "{}'s sector meant for offset {meant:#x} (misplaced)", self.describe(tag));
            }
            Seen::Garbage(head) => {
                let _ = write!(msg, "garbage starting {head:02x?}");
            }
        }
        msg += "; allowed: ";
        let mut tags: Vec<Tag> = allowed.iter().map(|v| v.tag).collect();
        tags.sort_unstable();
        tags.dedup();
        msg += &tags.iter().map(|&t| self.describe(t)).collect::<Vec<_>>().join(", ");
        let _ = write!(msg, " (durable since t{}, now t{}); the sector's versions:", self.durable_at, self.now);
        for v in &self.sectors[(at / SECTOR) as usize] {
            let done = if v.done == IN_FLIGHT { "in flight".to_string() } else { format!("done t{}", v.done) };
            let _ = write!(msg, " [tag {} issued t{} {done}{}]", v.tag, v.issued, if v.firm { " firm" } else { "" });
        }
        msg
    }

    /// A tag, decoded: which op wrote it, where, when.
    pub fn describe(&self, tag: Tag) -> String {
        if tag == 0 {
            return "zeros".into();
        }
        match self.tags.get(&tag) {
            Some(i) => {
                let done = match i.done {
                    None => "in flight".to_string(),
                    Some((t, true)) => format!("acked t{t}"),
                    Some((t, false)) => format!("failed t{t}"),
                };
                format!("write #{tag} ({:#x}+{:#x}, step {}, issued t{}, {done})", i.off, i.len, i.step, i.issued)
            }
            None => format!("unknown tag {tag:#x}"),
        }
    }

    /// Before this time nothing can be read any more: no read in flight
    /// began earlier, and a power cut goes back no further.
    fn horizon(&self) -> Time {
        let reads = self.ops.values().filter(|o| o.kind == Kind::Read).map(|o| o.issued).min().unwrap_or(Time::MAX);
        reads.min(self.durable_at).min(self.recover_from.unwrap_or(Time::MAX)).min(self.now)
    }

    /// Forget the versions of sector `s` that nothing can return any more
    /// (done lazily, when the sector gains a version).
    fn prune_sector(&mut self, s: usize, horizon: Time) {
        let versions = &mut self.sectors[s];
        if versions.len() < 2 {
            return;
        }
        let cover = versions.iter().filter(|w| w.firm && w.done < horizon).map(|w| w.issued).max().unwrap_or(0);
        versions.retain(|v| !(v.done < cover));
    }

    /// Versions kept in all (a figure for the run's statistics).
    pub fn versions(&self) -> usize {
        self.sectors.iter().map(Vec::len).sum()
    }

    /// Requests the model still waits for.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }
}

impl Own {
    fn max_own(self, other: Own) -> Own {
        match (self, other) {
            (Own::Yes, _) | (_, Own::Yes) => Own::Yes,
            (Own::Maybe, _) | (_, Own::Maybe) => Own::Maybe,
            _ => Own::No,
        }
    }
    /// Held for sure is no longer sure.
    fn unsure(self) -> Own {
        if self == Own::Yes {
            Own::Maybe
        } else {
            self
        }
    }
    fn touched_if(self, cond: bool) -> Own {
        if cond {
            Own::Maybe
        } else {
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = 4096;

    /// The sectors of a payload, or zeros.
    fn data(tag: Tag, off: u64, len: u64) -> Vec<u8> {
        if tag == 0 {
            vec![0; len as usize]
        } else {
            payload(tag, off, len as usize)
        }
    }

    fn read(m: &mut Model, off: u64, got: &[u8]) -> Result<(), String> {
        let r = m.issue_read(off, got.len() as u64);
        m.check_read(r, got)
    }

    fn write(m: &mut Model, off: u64, len: u64) -> Tag {
        let (id, tag) = m.issue_write(off, len);
        m.complete(id, true);
        tag
    }

    fn flush(m: &mut Model) {
        let f = m.issue_flush();
        m.complete(f, true);
    }

    #[test]
    fn payload_decodes_to_its_tag_and_catches_tearing_and_misplacement() {
        let p = payload(7, 1024, 1024);
        assert_eq!(decode(&p[..512], 1024), Seen::Tag(7));
        assert_eq!(decode(&p[512..], 1536), Seen::Tag(7));
        assert_eq!(decode(&p[512..], 1024), Seen::Misplaced { tag: 7, meant: 1536 });
        assert_eq!(decode(&[0; 512], 0), Seen::Tag(0));
        let mut torn = p[..512].to_vec();
        torn[300..].fill(0);
        assert!(matches!(decode(&torn, 1024), Seen::Garbage(_)));
    }

    #[test]
    fn the_last_acked_write_is_what_reads_return() {
        let mut m = Model::new(8 * C, C);
        read(&mut m, 0, &data(0, 0, C)).unwrap();
        let a = write(&mut m, 0, C);
        let b = write(&mut m, 512, 512);
        let mut want = data(a, 0, C);
        want[512..1024].copy_from_slice(&data(b, 512, 512));
        read(&mut m, 0, &want).unwrap();
        let err = read(&mut m, 0, &data(a, 0, C)).unwrap_err();
        assert!(err.contains("invariant 1") && err.contains("sector 1") && err.contains(&format!("write #{a}")) && err.contains(&format!("write #{b}")), "{err}");
    }

    #[test]
    fn a_write_in_flight_or_failed_may_or_may_not_show() {
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, C);
        let (w, b) = m.issue_write(0, C);
        read(&mut m, 0, &data(a, 0, C)).unwrap();
        read(&mut m, 0, &data(b, 0, C)).unwrap();
        m.complete(w, false);
        // Torn per sector: the first half new, the rest old.
        let mut mixed = data(b, 0, C);
        mixed[2048..].copy_from_slice(&data(a, 2048, 2048));
        read(&mut m, 0, &mixed).unwrap();
        // A later acked write settles it.
        let c = write(&mut m, 0, C);
        read(&mut m, 0, &data(c, 0, C)).unwrap();
        read(&mut m, 0, &data(b, 0, C)).unwrap_err();
    }

    #[test]
    fn concurrent_writes_leave_either() {
        let mut m = Model::new(8 * C, C);
        let (w1, t1) = m.issue_write(0, 512);
        let (w2, t2) = m.issue_write(0, 512);
        m.complete(w2, true);
        m.complete(w1, true);
        read(&mut m, 0, &data(t1, 0, 512)).unwrap();
        read(&mut m, 0, &data(t2, 0, 512)).unwrap();
        read(&mut m, 0, &data(0, 0, 512)).unwrap_err();
    }

    #[test]
    fn a_read_overlapping_a_write_sees_old_or_new_but_not_older() {
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, 512);
        let b = write(&mut m, 0, 512);
        let r = m.issue_read(0, 512);
        let (w, c) = m.issue_write(0, 512);
        m.complete(w, true);
        assert!(m.check_read(r, &data(a, 0, 512)).is_err());
        let r = m.issue_read(0, 512);
        let (w, d) = m.issue_write(0, 512);
        m.complete(w, true);
        let _ = (b, d);
        m.check_read(r, &data(c, 0, 512)).unwrap();
    }

    #[test]
    fn write_zeroes_and_discard_follow_the_top_layer() {
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, 2 * C);
        // A snapshot: cluster 0 and 1 are the lower layer's now.
        m.snapshot_begin();
        m.snapshot_end(Some(true), true);
        let b = write(&mut m, C, 512);
        // Discard over lower-only data leaves it; over the top's, zeros.
        let d = m.issue_discard(0, 2 * C);
        m.complete(d, true);
        let mut want = data(a, 0, 2 * C);
        want[C as usize..].fill(0);
        read(&mut m, 0, &want).unwrap();
        let _ = b;
        // Write-zeroes hides lower data.
        let z = m.issue_zeroes(0, 512);
        m.complete(z, true);
        want[..512].fill(0);
        read(&mut m, 0, &want).unwrap();
    }

    #[test]
    fn a_discard_in_flight_may_punch_what_a_later_write_allocates() {
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, C);
        m.snapshot_begin();
        m.snapshot_end(Some(true), true);
        // The top holds nothing at the discard's issue; a write then
        // allocates the cluster while the discard is still in flight.
        let d = m.issue_discard(0, C);
        let b = write(&mut m, 0, 2 * C);
        read(&mut m, 0, &data(b, 0, C)).unwrap();
        read(&mut m, 0, &data(0, 0, C)).unwrap();
        m.complete(d, true);
        read(&mut m, 0, &data(0, 0, C)).unwrap();
        // Where no discard ran, only the write.
        assert!(read(&mut m, C, &data(0, C, C)).is_err());
        assert!(read(&mut m, 0, &data(a, 0, C)).is_err());
    }

    #[test]
    fn a_discard_during_a_snapshot_may_find_the_new_empty_top() {
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, C);
        m.snapshot_begin();
        let d = m.issue_discard(0, C);
        m.complete(d, true);
        m.snapshot_end(Some(true), true);
        read(&mut m, 0, &data(a, 0, C)).unwrap();
        read(&mut m, 0, &data(0, 0, C)).unwrap();
    }

    #[test]
    fn write_zeroes_during_a_snapshot_may_copy_up_into_the_new_top() {
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, C);
        m.snapshot_begin();
        let z = m.issue_zeroes(512, 512);
        m.complete(z, true);
        m.snapshot_end(Some(true), true);
        // The zeroes may have copied the cluster up: a discard may zero it.
        let d = m.issue_discard(0, C);
        m.complete(d, true);
        read(&mut m, 0, &data(0, 0, 512)).unwrap();
        read(&mut m, 0, &data(a, 0, 512)).unwrap();
    }

    #[test]
    fn a_discard_racing_a_first_write_may_zero_it() {
        let mut m = Model::new(8 * C, C);
        let d = m.issue_discard(0, C);
        let (w, t) = m.issue_write(0, C);
        m.complete(w, true);
        m.complete(d, true);
        read(&mut m, 0, &data(t, 0, C)).unwrap();
        read(&mut m, 0, &data(0, 0, C)).unwrap();
    }

    #[test]
    fn a_power_cut_keeps_what_a_flush_covered_and_anything_after() {
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, 512);
        let b = write(&mut m, 0, 512);
        flush(&mut m);
        let c = write(&mut m, 0, 512);
        let d = write(&mut m, 0, 512);
        let (_, e) = m.issue_write(0, 512);
        m.power_cut();
        for t in [b, c, d, e] {
            m.may_read_back(0, &data(t, 0, 512)).unwrap();
        }
        let err = m.may_read_back(0, &data(a, 0, 512)).unwrap_err();
        assert!(err.contains("after a crash"), "{err}");
        m.recovered();
        // After the read-back the content is what was read.
        m.check_readback(0, &data(d, 0, 512)).unwrap();
        read(&mut m, 0, &data(d, 0, 512)).unwrap();
        read(&mut m, 0, &data(c, 0, 512)).unwrap_err();
    }

    #[test]
    fn a_flush_only_covers_writes_completed_before_it_was_issued() {
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, 512);
        let (w, b) = m.issue_write(0, 512);
        let f = m.issue_flush();
        m.complete(w, true);
        m.complete(f, true);
        m.power_cut();
        m.may_read_back(0, &data(a, 0, 512)).unwrap();
        m.may_read_back(0, &data(b, 0, 512)).unwrap();
        m.may_read_back(0, &data(0, 0, 512)).unwrap_err();
    }

    #[test]
    fn a_failed_flush_makes_nothing_durable() {
        let mut m = Model::new(8 * C, C);
        write(&mut m, 0, 512);
        let f = m.issue_flush();
        m.complete(f, false);
        m.power_cut();
        m.check_readback(0, &data(0, 0, 512)).unwrap();
    }

    #[test]
    fn a_kill_keeps_every_acked_write() {
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, 512);
        let (_, b) = m.issue_write(512, 512);
        m.kill();
        m.may_read_back(0, &data(a, 0, 512)).unwrap();
        m.may_read_back(0, &data(0, 0, 512)).unwrap_err();
        m.may_read_back(512, &data(b, 512, 512)).unwrap();
        m.may_read_back(512, &data(0, 512, 512)).unwrap();
    }

    #[test]
    fn a_cut_after_a_kill_may_lose_what_the_read_back_saw_unless_flushed() {
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, 512);
        m.kill();
        m.check_readback(0, &data(a, 0, 512)).unwrap();
        m.recovered();
        m.power_cut();
        m.check_readback(0, &data(0, 0, 512)).unwrap();
        m.recovered();
        let b = write(&mut m, 0, 512);
        flush(&mut m);
        m.power_cut();
        m.may_read_back(0, &data(0, 0, 512)).unwrap_err();
        m.may_read_back(0, &data(b, 0, 512)).unwrap();
    }

    #[test]
    fn a_failed_writeback_may_lose_what_was_not_flushed_until_rewritten() {
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, 512);
        flush(&mut m);
        let b = write(&mut m, 0, 512);
        m.page_cache_lost();
        read(&mut m, 0, &data(a, 0, 512)).unwrap();
        read(&mut m, 0, &data(b, 0, 512)).unwrap();
        read(&mut m, 0, &data(0, 0, 512)).unwrap();
        let c = write(&mut m, 0, 512);
        read(&mut m, 0, &data(c, 0, 512)).unwrap();
        read(&mut m, 0, &data(a, 0, 512)).unwrap_err();
    }

    #[test]
    fn a_kill_after_a_failed_writeback_may_show_what_was_durable_before_it() {
        // The live stack read the new write (its table in memory links it)
        // and a read-back took it as the content; the restart reads the
        // table on disk, which the lost writeback never updated.
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, 512);
        flush(&mut m);
        let b = write(&mut m, 0, 512);
        m.page_cache_lost();
        m.check_readback(0, &data(b, 0, 512)).unwrap();
        m.kill();
        m.may_read_back(0, &data(a, 0, 512)).unwrap();
        m.check_readback(0, &data(a, 0, 512)).unwrap();
        m.recovered();
        // Once reopened, a kill keeps what the reopened stack showed.
        m.kill();
        m.may_read_back(0, &data(b, 0, 512)).unwrap_err();
    }

    #[test]
    fn a_kill_after_a_failed_write_may_take_back_what_a_read_showed_until_a_flush() {
        // A failed write-zeroes linked a zeroed cluster in the engine's
        // memory only; a read showed the zeros; the restart reads the table.
        let mut m = Model::new(8 * C, C);
        let a = write(&mut m, 0, 512);
        flush(&mut m);
        let id = m.issue_zeroes(0, 512);
        m.complete(id, false);
        m.check_readback(0, &data(0, 0, 512)).unwrap();
        m.kill();
        m.may_read_back(0, &data(a, 0, 512)).unwrap();
        m.check_readback(0, &data(a, 0, 512)).unwrap();
        m.recovered();
        // A flush after the failure makes what was read stay.
        let id = m.issue_zeroes(0, 512);
        m.complete(id, false);
        m.check_readback(0, &data(0, 0, 512)).unwrap();
        flush(&mut m);
        m.kill();
        m.may_read_back(0, &data(a, 0, 512)).unwrap_err();
    }

    #[test]
    fn versions_are_pruned_once_nothing_can_return_them() {
        let mut m = Model::new(8 * C, C);
        for _ in 0..100 {
            write(&mut m, 0, 512);
            flush(&mut m);
        }
        assert!(m.versions() < 8 * C as usize / 512 + 4, "{} versions", m.versions());
    }
}
