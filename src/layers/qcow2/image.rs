//! A QCOW2 image opened for reading: any byte range of its virtual disk,
//! through its L1 and L2 tables, its compressed clusters and its chain of
//! backing files. Nothing here writes; refcounts are not read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::entry::{self, Mapping};
use super::header::{Compression, Header};
use crate::error::{Error, Result};
use crate::io::{Handle, Io, OpenHow};

/// Backing files followed, at most (qemu has no bound; a loop would be
/// endless).
pub const MAX_CHAIN: usize = 16;
/// L2 tables kept in memory per image (each one cluster), most recent first.
const L2_CACHE: usize = 64;

/// L2 tables by host offset, with the tick of their last use.
type L2Cache = HashMap<u64, (u64, Arc<Vec<u8>>)>;

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
    l2: Mutex<L2Cache>,
    tick: std::sync::atomic::AtomicU64,
    /// The last compressed cluster inflated, by host offset: a read of a
    /// whole cluster in subcluster pieces, or the next request into the
    /// same cluster, inflates it once.
    unpacked: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

impl Qcow2Image {
    /// Open `path` and its backing chain for reading.
    pub async fn open<I: Io>(io: &I, path: &Path) -> Result<Qcow2Image> {
        Self::open_at(io, path, 0).await
    }

    async fn open_at<I: Io>(io: &I, path: &Path, depth: usize) -> Result<Qcow2Image> {
        let name = path.display().to_string();
        let io_err = |e| Error::io(e, &name);
        // The image named by the user may be a block device; a backing
        // file is named by the image, which may come from anywhere: only
        // regular files (never a host disk read into a conversion).
        let file = io.open(path, &OpenHow { block_ok: depth == 0, ..OpenHow::read() }).map_err(io_err)?;
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
                    Some("qcow2") => Backing::Qcow2(Box::new(Box::pin(Self::open_at(io, &bpath, depth + 1)).await?)),
                    Some("raw") => {
                        let bname = bpath.display().to_string();
                        let file = io.open(&bpath, &OpenHow::read()).map_err(|e| Error::io(e, &bname))?;
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
        Ok(Qcow2Image {
            path: path.to_path_buf(),
            file,
            len,
            header,
            l1,
            backing,
            l2: Mutex::new(HashMap::new()),
            tick: Default::default(),
            unpacked: Mutex::new(None),
        })
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
        let (extended, bits) = (self.header.extended_l2, self.header.cluster_bits);
        let piece = if extended { 1u64 << (bits - 5) } else { 1u64 << bits };
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let in_piece = at % piece;
            let n = ((piece - in_piece) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if at >= self.size() {
                out.fill(0);
            } else {
                let n_disk = (self.size() - at).min(n as u64) as usize;
                self.read_piece(io, at, &mut out[..n_disk]).await?;
                out[n_disk..].fill(0);
            }
            done += n;
        }
        Ok(())
    }

    /// Read within one cluster (one subcluster with extended L2).
    async fn read_piece<I: Io>(&self, io: &I, at: u64, out: &mut [u8]) -> Result<()> {
        let h = &self.header;
        let cluster = h.cluster_size();
        let (c, in_cluster) = (at / cluster, at % cluster);
        let (l1i, l2i) = (c / h.l2_entries(), c % h.l2_entries());
        let name = || self.path.display().to_string();
        let Some(&l1e) = self.l1.get(l1i as usize) else { return self.read_backing(io, at, out).await };
        let Some(table) = entry::l1_entry(l1e, h.cluster_bits, self.len).map_err(|e| e.context(name()))? else {
            return self.read_backing(io, at, out).await;
        };
        let l2 = self.l2_table(io, table).await?;
        let be = |i: u64| u64::from_be_bytes(l2[i as usize..i as usize + 8].try_into().unwrap());
        let pos = l2i * h.l2_entry_bytes();
        let bitmap = h.extended_l2.then(|| be(pos + 8));
        let e = entry::l2_entry(be(pos), bitmap, h.cluster_bits, self.len).map_err(|e| e.context(name()))?;
        let sub = cluster / 32;
        match e.subcluster((in_cluster / sub.max(1)) as u32 % 32, h.extended_l2, sub) {
            Mapping::Backing => self.read_backing(io, at, out).await,
            Mapping::Zero => {
                out.fill(0);
                Ok(())
            }
            Mapping::Data(host) => {
                // With extended L2 `host` is the subcluster's start.
                let skip = if h.extended_l2 { in_cluster % sub } else { in_cluster };
                io.read_at(self.file.fd(), out, host + skip).await.map_err(|e| Error::io(e, name()))
            }
            Mapping::Compressed { offset, len } => {
                let kept = self.unpacked.lock().unwrap().as_ref().filter(|(at, _)| *at == offset).map(|(_, w)| w.clone());
                let whole = match kept {
                    Some(whole) => whole,
                    None => {
                        let mut packed = vec![0u8; len as usize];
                        io.read_at(self.file.fd(), &mut packed, offset).await.map_err(|e| Error::io(e, name()))?;
                        let mut whole = vec![0u8; cluster as usize];
                        decompress(h.compression, &packed, &mut whole).map_err(|e| e.context(format!("{}: cluster {c}", name())))?;
                        let whole = Arc::new(whole);
                        *self.unpacked.lock().unwrap() = Some((offset, whole.clone()));
                        whole
                    }
                };
                out.copy_from_slice(&whole[in_cluster as usize..in_cluster as usize + out.len()]);
                Ok(())
            }
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
        let tick = self.tick.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((used, table)) = self.l2.lock().unwrap().get_mut(&at) {
            *used = tick;
            return Ok(table.clone());
        }
        let mut table = vec![0u8; self.header.cluster_size() as usize];
        io.read_at(self.file.fd(), &mut table, at).await.map_err(|e| Error::io(e, self.path.display()))?;
        let table = Arc::new(table);
        let mut cache = self.l2.lock().unwrap();
        if cache.len() >= L2_CACHE {
            if let Some(&oldest) = cache.iter().min_by_key(|(_, (used, _))| *used).map(|(k, _)| k) {
                cache.remove(&oldest);
            }
        }
        cache.insert(at, (tick, table.clone()));
        Ok(table)
    }
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
