//! A QCOW2 image opened for reading: any byte range of its virtual disk,
//! through its L1 and L2 tables, its compressed clusters and its chain of
//! backing files. Nothing here writes; refcounts are not read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::entry::{self, Mapping};
use super::header::{Compression, Header};
use crate::error::{Error, Result};
use crate::io::{Handle, Io, OpenHow};

/// Backing files followed, at most (qemu has no bound; a loop would be
/// endless).
pub const MAX_CHAIN: usize = 16;
/// Memory for L2 tables kept per image (each table is one cluster), and
/// for inflated compressed clusters; each cache holds at least two.
const L2_CACHE_BYTES: u64 = 4 << 20;
const INFLATED_CACHE_BYTES: u64 = 4 << 20;

/// Pieces by host offset, with the tick of their last use.
type Slots = HashMap<u64, (u64, Arc<Vec<u8>>)>;

/// Cluster-sized pieces by host offset, the least recently used dropped
/// first when the cache is full; with its counts of hits and misses.
struct Cache {
    slots: Mutex<Slots>,
    capacity: usize,
    tick: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Cache {
    fn new(budget: u64, piece: u64) -> Cache {
        let capacity = (budget / piece).max(2) as usize;
        Cache { slots: Mutex::new(HashMap::new()), capacity, tick: AtomicU64::new(0), hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }
    fn get(&self, at: u64) -> Option<Arc<Vec<u8>>> {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let found = self.slots.lock().unwrap().get_mut(&at).map(|(used, piece)| {
            *used = tick;
            piece.clone()
        });
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }
    fn put(&self, at: u64, piece: Arc<Vec<u8>>) {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut slots = self.slots.lock().unwrap();
        if slots.len() >= self.capacity && !slots.contains_key(&at) {
            if let Some(&oldest) = slots.iter().min_by_key(|(_, (used, _))| *used).map(|(k, _)| k) {
                slots.remove(&oldest);
            }
        }
        slots.insert(at, (tick, piece));
    }
    fn bytes(&self) -> u64 {
        self.slots.lock().unwrap().values().map(|(_, p)| p.len() as u64).sum()
    }
}

/// What an image's caches hold and how well they serve, its backing
/// chain's included (shown by `status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub l2_bytes: u64,
    pub l2_hits: u64,
    pub l2_misses: u64,
    pub inflated_bytes: u64,
    pub inflate_hits: u64,
    pub inflate_misses: u64,
}

impl std::ops::AddAssign for CacheStats {
    fn add_assign(&mut self, o: CacheStats) {
        self.l2_bytes += o.l2_bytes;
        self.l2_hits += o.l2_hits;
        self.l2_misses += o.l2_misses;
        self.inflated_bytes += o.inflated_bytes;
        self.inflate_hits += o.inflate_hits;
        self.inflate_misses += o.inflate_misses;
    }
}

/// What a QCOW2 image's unallocated clusters read.
enum Backing {
    None,
    Qcow2(Box<Qcow2Image>),
    Raw { file: Handle, len: u64, path: PathBuf },
}

pub struct Qcow2Image {
    path: PathBuf,
    file: Handle,
    len: u64,
    header: Header,
    l1: Vec<u64>,
    backing: Backing,
    /// L2 tables by host offset.
    l2: Cache,
    /// Compressed clusters inflated, by host offset: a read of a whole
    /// cluster in subcluster pieces, or the next request into the same
    /// cluster, inflates it once.
    inflated: Cache,
}

impl Qcow2Image {
    /// Open `path` and its backing chain for reading.
    pub async fn open<I: Io>(io: &I, path: &Path) -> Result<Qcow2Image> {
        Self::open_at(io, path, 0, &mut Vec::new()).await
    }

    /// `seen`: the identities of the files opened above in the chain.
    async fn open_at<I: Io>(io: &I, path: &Path, depth: usize, seen: &mut Vec<(u64, u64)>) -> Result<Qcow2Image> {
        let name = path.display().to_string();
        let io_err = |e| Error::io(e, &name);
        // The image named by the user may be a block device; a backing
        // file is named by the image, which may come from anywhere: only
        // regular files (never a host disk read into a conversion).
        let file = io.open(path, &OpenHow { block_ok: depth == 0, ..OpenHow::read() }).map_err(io_err)?;
        backing_rules(io, &file, &name, depth, seen)?;
        let len = io.fstat(file.fd()).map_err(io_err)?.len;
        // The header and its extensions lie in the first cluster (at most 2 MiB).
        let mut head = vec![0u8; (len.min(2 << 20)) as usize];
        io.read_at(file.fd(), &mut head, 0).await.map_err(io_err)?;
        let header = Header::parse(&head).map_err(|e| e.context(&name))?;
        let l1_bytes = header.l1_entries as u64 * 8;
        if header.l1_offset.checked_add(l1_bytes).map_or(true, |end| end > len) {
            return Err(Error::corrupt(format!("{name}: the L1 table lies past the end of the file")));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        io.read_at(file.fd(), &mut raw, header.l1_offset).await.map_err(io_err)?;
        let l1 = raw.chunks_exact(8).map(|b| u64::from_be_bytes(b.try_into().unwrap())).collect();
        let backing = match header.backing_name(&head).map_err(|e| e.context(&name))? {
            None => Backing::None,
            Some(bname) => {
                if depth + 1 >= MAX_CHAIN {
                    return Err(Error::invalid(format!("{name}: a chain of more than {MAX_CHAIN} backing files")));
                }
                let bpath = backing_path(path, bname);
                match header.backing_format.as_deref() {
                    Some("qcow2") => Backing::Qcow2(Box::new(Box::pin(Self::open_at(io, &bpath, depth + 1, seen)).await?)),
                    Some("raw") => {
                        let bname = bpath.display().to_string();
                        let file = io.open(&bpath, &OpenHow::read()).map_err(|e| Error::io(e, &bname))?;
                        backing_rules(io, &file, &bname, depth + 1, seen)?;
                        let len = io.fstat(file.fd()).map_err(|e| Error::io(e, &bname))?.len;
                        Backing::Raw { file, len, path: bpath }
                    }
                    Some(other) => {
                        return Err(Error::unsupported(format!("{name}: backing file {bname} in format {other} (only qcow2 and raw)")))
                    }
                    None => {
                        return Err(Error::invalid(format!(
                            "{name}: does not name the format of its backing file {bname}; formats are declared, never guessed \
                             (qemu-img rebase -u -F qcow2|raw -b {bname} names it)"
                        )))
                    }
                }
            }
        };
        let cluster = header.cluster_size();
        Ok(Qcow2Image {
            path: path.to_path_buf(),
            file,
            len,
            header,
            l1,
            backing,
            l2: Cache::new(L2_CACHE_BYTES, cluster),
            inflated: Cache::new(INFLATED_CACHE_BYTES, cluster),
        })
    }

    /// The file's identity (device, inode).
    pub fn identity<I: Io>(&self, io: &I) -> Result<(u64, u64)> {
        let st = io.fstat(self.file.fd()).map_err(|e| Error::io(e, self.path.display()))?;
        Ok((st.dev, st.ino))
    }
    /// Walk every L1 and L2 entry of this file (not its backing files,
    /// which opened already): each must point inside the file, aligned,
    /// and a compressed one must describe a readable range. Returns the
    /// guest clusters this file stores and the problems found (at most
    /// `MAX_PROBLEMS` named, the rest counted). Refcounts are not read.
    pub async fn check_tables<I: Io>(&self, io: &I) -> Result<(u64, Vec<String>)> {
        const MAX_PROBLEMS: usize = 32;
        let h = &self.header;
        let (mut stored, mut problems, mut more) = (0u64, Vec::new(), 0usize);
        let mut note = |p: String| {
            if problems.len() < MAX_PROBLEMS {
                problems.push(p);
            } else {
                more += 1;
            }
        };
        let clusters = self.size().div_ceil(h.cluster_size());
        let mut table = vec![0u8; h.cluster_size() as usize];
        // Each table is read once: the active L1 never shares one, and a
        // hostile image repeating one would cost its size over and over.
        let mut seen = std::collections::HashSet::new();
        for (l1i, &l1e) in self.l1.iter().enumerate() {
            let first = l1i as u64 * h.l2_entries();
            if first >= clusters {
                if l1e != 0 {
                    note(format!("L1 entry {l1i} lies past the disk's end but is not empty"));
                }
                continue;
            }
            let at = match entry::l1_entry(l1e, h.cluster_bits, self.len) {
                Ok(Some(at)) => at,
                Ok(None) => continue,
                Err(e) => {
                    note(format!("L1 entry {l1i}: {}", e.message()));
                    continue;
                }
            };
            if !seen.insert(at) {
                note(format!("L1 entry {l1i} points at an L2 table another entry uses ({at})"));
                continue;
            }
            io.read_at(self.file.fd(), &mut table, at).await.map_err(|e| Error::io(e, self.path.display()))?;
            let be = |i: u64| u64::from_be_bytes(table[i as usize..i as usize + 8].try_into().unwrap());
            for l2i in 0..h.l2_entries().min(clusters - first) {
                let pos = l2i * h.l2_entry_bytes();
                let bitmap = h.extended_l2.then(|| be(pos + 8));
                match entry::l2_entry(be(pos), bitmap, h.cluster_bits, self.len) {
                    Ok(e) if matches!(e.mapping, Mapping::Data(_) | Mapping::Compressed { .. }) => stored += 1,
                    Ok(_) => {}
                    Err(e) => note(format!("L2 entry of cluster {}: {}", first + l2i, e.message())),
                }
            }
        }
        if more > 0 {
            problems.push(format!("and {more} more"));
        }
        Ok((stored, problems))
    }

    /// The identities of every file of the chain, this one first.
    pub fn chain_identities<I: Io>(&self, io: &I) -> Result<Vec<(u64, u64)>> {
        let mut ids = vec![self.identity(io)?];
        match &self.backing {
            Backing::Qcow2(b) => ids.extend(b.chain_identities(io)?),
            Backing::Raw { file, path, .. } => {
                let st = io.fstat(file.fd()).map_err(|e| Error::io(e, path.display()))?;
                ids.push((st.dev, st.ino));
            }
            Backing::None => {}
        }
        Ok(ids)
    }
    pub fn header(&self) -> &Header {
        &self.header
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn size(&self) -> u64 {
        self.header.size
    }
    /// The files of the chain, this one first (a raw backing file last).
    pub fn chain(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.path.clone()];
        match &self.backing {
            Backing::Qcow2(b) => paths.extend(b.chain()),
            Backing::Raw { path, .. } => paths.push(path.clone()),
            Backing::None => {}
        }
        paths
    }

    /// Read `buf.len()` bytes of the virtual disk from `offset`; past the
    /// disk's end reads zeros.
    pub async fn read<I: Io>(&self, io: &I, offset: u64, buf: &mut [u8]) -> Result<()> {
        let piece = self.piece();
        // Pieces stored one after another in the file are read as one
        // transfer (a sequential read of an image qemu-img wrote is one
        // read, not one per cluster): (file offset, start in buf, length).
        let mut run: Option<(u64, usize, usize)> = None;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let n = ((piece - at % piece) as usize).min(buf.len() - done);
            if at >= self.size() {
                buf[done..done + n].fill(0);
                done += n;
                continue;
            }
            let n_disk = (self.size() - at).min(n as u64) as usize;
            let mapping = self.mapping(io, at).await?;
            if let Some(host) = self.stored_at(mapping, at) {
                match &mut run {
                    Some((from, start, len)) if *from + *len as u64 == host && *start + *len == done => *len += n_disk,
                    _ => {
                        self.read_run(io, run.take(), buf).await?;
                        run = Some((host, done, n_disk));
                    }
                }
            } else {
                self.read_piece(io, at, mapping, &mut buf[done..done + n_disk]).await?;
            }
            buf[done + n_disk..done + n].fill(0);
            done += n;
        }
        self.read_run(io, run, buf).await
    }

    /// Where the byte at `at` is stored in this file uncompressed, if it is.
    fn stored_at(&self, mapping: Mapping, at: u64) -> Option<u64> {
        let Mapping::Data(host) = mapping else { return None };
        let cluster = self.header.cluster_size();
        // With extended L2 `host` is the subcluster's start.
        let skip = if self.header.extended_l2 { at % (cluster / 32) } else { at % cluster };
        Some(host + skip)
    }

    async fn read_run<I: Io>(&self, io: &I, run: Option<(u64, usize, usize)>, buf: &mut [u8]) -> Result<()> {
        let Some((from, start, len)) = run else { return Ok(()) };
        io.read_at(self.file.fd(), &mut buf[start..start + len], from).await.map_err(|e| Error::io(e, self.path.display()))
    }

    /// What the piece at `at` (within one cluster, one subcluster with
    /// extended L2) maps to in this file.
    async fn mapping<I: Io>(&self, io: &I, at: u64) -> Result<Mapping> {
        let h = &self.header;
        let cluster = h.cluster_size();
        let c = at / cluster;
        let (l1i, l2i) = (c / h.l2_entries(), c % h.l2_entries());
        let name = || self.path.display().to_string();
        let Some(&l1e) = self.l1.get(l1i as usize) else { return Ok(Mapping::Backing) };
        let Some(table) = entry::l1_entry(l1e, h.cluster_bits, self.len).map_err(|e| e.context(name()))? else {
            return Ok(Mapping::Backing);
        };
        let l2 = self.l2_table(io, table).await?;
        let be = |i: u64| u64::from_be_bytes(l2[i as usize..i as usize + 8].try_into().unwrap());
        let pos = l2i * h.l2_entry_bytes();
        let bitmap = h.extended_l2.then(|| be(pos + 8));
        let e = entry::l2_entry(be(pos), bitmap, h.cluster_bits, self.len).map_err(|e| e.context(name()))?;
        let sub = cluster / 32;
        Ok(e.subcluster(((at % cluster) / sub.max(1)) as u32 % 32, h.extended_l2, sub))
    }

    /// Read within one cluster (one subcluster with extended L2) that
    /// `mapping` locates.
    async fn read_piece<I: Io>(&self, io: &I, at: u64, mapping: Mapping, out: &mut [u8]) -> Result<()> {
        let h = &self.header;
        let cluster = h.cluster_size();
        let in_cluster = at % cluster;
        let name = || self.path.display().to_string();
        match mapping {
            Mapping::Backing => self.read_backing(io, at, out).await,
            Mapping::Zero => {
                out.fill(0);
                Ok(())
            }
            Mapping::Data(_) => {
                let host = self.stored_at(mapping, at).expect("data is stored");
                io.read_at(self.file.fd(), out, host).await.map_err(|e| Error::io(e, name()))
            }
            Mapping::Compressed { offset, len } => {
                let whole = match self.inflated.get(offset) {
                    Some(whole) => whole,
                    None => {
                        let mut packed = vec![0u8; len as usize];
                        io.read_at(self.file.fd(), &mut packed, offset).await.map_err(|e| Error::io(e, name()))?;
                        let mut whole = vec![0u8; cluster as usize];
                        decompress(h.compression, &packed, &mut whole)
                            .map_err(|e| e.context(format!("{}: cluster {}", name(), at / cluster)))?;
                        let whole = Arc::new(whole);
                        self.inflated.put(offset, whole.clone());
                        whole
                    }
                };
                out.copy_from_slice(&whole[in_cluster as usize..in_cluster as usize + out.len()]);
                Ok(())
            }
        }
    }

    /// Whether any byte of `[offset, offset + len)` is stored somewhere in
    /// the chain (data, compressed, or a raw backing file's range): false
    /// means the range reads as zeros without reading any data.
    pub async fn holds_data<I: Io>(&self, io: &I, offset: u64, len: u64) -> Result<bool> {
        let end = offset.saturating_add(len).min(self.size());
        let piece = self.piece();
        let mut at = offset;
        while at < end {
            let held = match self.mapping(io, at).await? {
                Mapping::Zero => false,
                Mapping::Data(_) | Mapping::Compressed { .. } => true,
                Mapping::Backing => match &self.backing {
                    Backing::None => false,
                    Backing::Qcow2(b) => Box::pin(b.holds_data(io, at, piece - at % piece)).await?,
                    Backing::Raw { len, .. } => at < *len,
                },
            };
            if held {
                return Ok(true);
            }
            at = (at / piece + 1) * piece;
        }
        Ok(false)
    }

    /// The unit of mapping: a cluster, or a subcluster with extended L2.
    fn piece(&self) -> u64 {
        let bits = self.header.cluster_bits;
        if self.header.extended_l2 {
            1u64 << (bits - 5)
        } else {
            1u64 << bits
        }
    }

    /// The caches of this image and its backing chain.
    pub fn cache_stats(&self) -> CacheStats {
        let mut s = CacheStats {
            l2_bytes: self.l2.bytes(),
            l2_hits: self.l2.hits.load(Ordering::Relaxed),
            l2_misses: self.l2.misses.load(Ordering::Relaxed),
            inflated_bytes: self.inflated.bytes(),
            inflate_hits: self.inflated.hits.load(Ordering::Relaxed),
            inflate_misses: self.inflated.misses.load(Ordering::Relaxed),
        };
        if let Backing::Qcow2(b) = &self.backing {
            s += b.cache_stats();
        }
        s
    }

    /// Bytes of memory the chain's tables and caches hold at most: its L1
    /// tables and full caches.
    pub fn memory_bound(&self) -> u64 {
        let cluster = self.header.cluster_size();
        let own = self.l1.len() as u64 * 8 + (self.l2.capacity + self.inflated.capacity) as u64 * cluster;
        own + match &self.backing {
            Backing::Qcow2(b) => b.memory_bound(),
            _ => 0,
        }
    }

    async fn read_backing<I: Io>(&self, io: &I, at: u64, out: &mut [u8]) -> Result<()> {
        match &self.backing {
            Backing::None => {
                out.fill(0);
                Ok(())
            }
            Backing::Qcow2(b) => Box::pin(b.read(io, at, out)).await,
            Backing::Raw { file, len, .. } => {
                // Past a shorter backing file: zeros.
                let n = len.saturating_sub(at).min(out.len() as u64) as usize;
                if n > 0 {
                    io.read_at(file.fd(), &mut out[..n], at).await.map_err(|e| Error::io(e, "the raw backing file"))?;
                }
                out[n..].fill(0);
                Ok(())
            }
        }
    }

    async fn l2_table<I: Io>(&self, io: &I, at: u64) -> Result<Arc<Vec<u8>>> {
        if let Some(table) = self.l2.get(at) {
            return Ok(table);
        }
        let mut table = vec![0u8; self.header.cluster_size() as usize];
        io.read_at(self.file.fd(), &mut table, at).await.map_err(|e| Error::io(e, self.path.display()))?;
        let table = Arc::new(table);
        self.l2.put(at, table.clone());
        Ok(table)
    }
}

/// A file of the chain appears once (a chain that loops back would open
/// the same file again and again), and a backing file is held with a
/// shared lock while it is read, as a ploop layer below a top is: our own
/// daemon serving it writable is refused, and cannot start while it is read.
/// The image itself (depth 0) is locked by whoever serves it as a layer.
fn backing_rules<I: Io>(io: &I, file: &Handle, name: &str, depth: usize, seen: &mut Vec<(u64, u64)>) -> Result<()> {
    let st = io.fstat(file.fd()).map_err(|e| Error::io(e, name))?;
    if seen.contains(&(st.dev, st.ino)) {
        return Err(Error::invalid(format!("{name}: the backing chain leads back to this file")));
    }
    seen.push((st.dev, st.ino));
    if depth > 0 {
        crate::layers::flock_waiting(io, file.fd(), false)
            .map_err(|e| Error::new(libc::EBUSY, format!("{name}: a backing file in use by a writer ({e})")))?;
    }
    Ok(())
}

/// A backing file's name as QCOW2 stores it: relative to the image's
/// directory unless absolute (as qemu resolves it).
fn backing_path(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        name.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(name)
    }
}

/// Inflate one compressed cluster into `out` (exactly a cluster): raw
/// deflate as qemu writes it, or a zstd frame. The input may run on past
/// the stream's end (up to its last sector); the output must be filled.
fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<()> {
    let want = out.len();
    let short = |got: usize| Error::corrupt(format!("compressed cluster inflates to {got} bytes, not {want}"));
    match kind {
        Compression::Zlib => {
            let mut d = flate2::Decompress::new(false);
            let status = d.decompress(input, out, flate2::FlushDecompress::Finish);
            match status {
                Ok(_) if d.total_out() as usize == want => Ok(()),
                Ok(_) => Err(short(d.total_out() as usize)),
                Err(e) => Err(Error::corrupt(format!("compressed cluster: {e}"))),
            }
        }
        Compression::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(|e| Error::io(e, "zstd"))?;
            let mut src = InBuffer::around(input);
            let mut dst = OutBuffer::around(out);
            while dst.pos() < dst.capacity() {
                let before = (src.pos(), dst.pos());
                d.run(&mut src, &mut dst).map_err(|e| Error::corrupt(format!("compressed cluster: {e}")))?;
                if (src.pos(), dst.pos()) == before {
                    break;
                }
            }
            let got = dst.pos();
            if got == want {
                Ok(())
            } else {
                Err(short(got))
            }
        }
    }
}
