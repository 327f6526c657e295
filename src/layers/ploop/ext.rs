//! The format extension: one cluster addressed by the header's
//! `ext_off` (in sectors), holding a magic, the MD5 of the rest of the
//! cluster, and feature records; the one feature we know is the dirty
//! bitmap (changed-block tracking), whose bits live in clusters of their
//! own, listed in an L1 table (0 = all clear, 1 = all set, else a sector
//! offset). ploop writes it on a clean close and marks the header "closed
//! with a valid extension"; a read-write open takes the bitmap and drops
//! the extension from the file, so a crash loses it (then every block
//! counts as changed).
//!
//! Everything read here comes from the file: sizes are checked against
//! the disk and the file before anything is allocated.

use bitvec::vec::BitVec;
use md5::{Digest, Md5};

use crate::error::{Error, Result};
use crate::io::Io;
use crate::layers::ploop::header::{Header, SECTOR};

pub const EXT_MAGIC: u64 = 0xAB23_4CEF_23DC_EA87;
pub const DIRTY_BITMAP_MAGIC: u64 = 0x2038_5FAE_252C_B34A;
/// A feature that must be understood, or the image left alone.
pub const FLAG_NECESSARY: u64 = 1;
/// A feature to keep as it is when not understood.
pub const FLAG_TRANSIT: u64 = 2;
const RECORD_HEADER: usize = 24;
const BITMAP_HEADER: usize = 32;
/// Bits of all the dirty bitmaps of one extension together: more are
/// refused, so memory is bounded whatever a file claims (256 MiB; a
/// 50 TiB disk at ploop's default 64 KiB granularity needs 100 MiB).
pub const MAX_BITMAP_BITS: u64 = 1 << 31;
/// Dirty bitmap records in one extension: ploop writes one (a disk has one
/// changed-block record), qemu one per bitmap it keeps. A record costs a
/// read of its bitmap's clusters, so a cluster packed with records that
/// all name the same clusters must not cost thousands of reads.
pub const MAX_BITMAPS: usize = 8;

/// A dirty bitmap: which `granularity`-byte blocks of the disk changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// ploop's CBT id (a raw UUID), for matching a backup to its base.
    pub id: [u8; 16],
    /// Bytes per bit (a power of two, at least a sector).
    pub granularity: u64,
    pub bits: BitVec,
}

/// What a format extension holds and where.
#[derive(Clone, Debug, Default)]
pub struct Extension {
    pub bitmaps: Vec<DirtyBitmap>,
    /// File offsets of its clusters (the extension cluster, then the
    /// bitmap clusters), so that `check` counts them as used.
    pub clusters: Vec<u64>,
    /// Features we do not know, by magic.
    pub unknown: Vec<u64>,
}

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::corrupt(format!("format extension: {msg}"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// A cluster offset the extension names must sit in the data area on a
/// cluster boundary, inside the file.
fn check_cluster(h: &Header, at: u64, file_len: u64, what: &str) -> Result<()> {
    let (cluster, data_off) = (h.cluster_bytes(), h.data_off_bytes());
    if at < data_off || (at - data_off) % cluster != 0 || at.checked_add(cluster).map_or(true, |e| e > file_len) {
        return Err(bad(format!("{what} at byte {at} is not a cluster of the data area inside the file ({file_len} bytes)")));
    }
    Ok(())
}

/// Read the extension the header points at.
pub async fn read<I: Io>(io: &I, fd: std::os::fd::RawFd, h: &Header, file_len: u64) -> Result<Extension> {
    read_within(io, fd, h, file_len, MAX_BITMAP_BITS).await
}

/// `read`, with at most `max_bits` bits of bitmaps in all.
async fn read_within<I: Io>(io: &I, fd: std::os::fd::RawFd, h: &Header, file_len: u64, max_bits: u64) -> Result<Extension> {
    let cluster = h.cluster_bytes();
    let at = h.ext_off_sectors.checked_mul(SECTOR).ok_or_else(|| bad("offset overflows"))?;
    check_cluster(h, at, file_len, "the extension cluster")?;
    let mut block = vec![0u8; cluster as usize];
    io.read_at(fd, &mut block, at).await.map_err(|e| Error::io(e, "reading the format extension"))?;
    if le64(&block, 0) != EXT_MAGIC {
        return Err(bad("no magic"));
    }
    let sum: [u8; 16] = Md5::digest(&block[24..]).into();
    if block[8..24] != sum {
        return Err(bad("checksum mismatch"));
    }
    let mut ext = Extension { clusters: vec![at], ..Default::default() };
    let mut bits_left = max_bits;
    let mut pos = 24usize;
    loop {
        if pos + RECORD_HEADER > block.len() {
            return Err(bad("feature list runs past the cluster"));
        }
        let (magic, flags, size) = (le64(&block, pos), le64(&block, pos + 8), le32(&block, pos + 16) as usize);
        if magic == 0 {
            break;
        }
        let data = pos + RECORD_HEADER;
        if size > block.len() - data {
            return Err(bad(format!("feature {magic:#x} claims {size} bytes, past the cluster")));
        }
        match magic {
            DIRTY_BITMAP_MAGIC => {
                if ext.bitmaps.len() == MAX_BITMAPS {
                    return Err(Error::unsupported(format!("format extension: more than {MAX_BITMAPS} dirty bitmaps")));
                }
                let (bm, clusters) = read_bitmap(io, fd, h, file_len, &block[data..data + size], bits_left).await?;
                bits_left -= bm.bits.len() as u64;
                ext.bitmaps.push(bm);
                ext.clusters.extend(clusters);
            }
            other if flags & FLAG_NECESSARY != 0 => {
                return Err(Error::unsupported(format!("format extension: necessary feature {other:#x} is unknown")));
            }
            other => ext.unknown.push(other),
        }
        pos = data + size.next_multiple_of(8);
    }
    Ok(ext)
}

async fn read_bitmap<I: Io>(io: &I, fd: std::os::fd::RawFd, h: &Header, file_len: u64, d: &[u8], max_bits: u64) -> Result<(DirtyBitmap, Vec<u64>)> {
    if d.len() < BITMAP_HEADER {
        return Err(bad("dirty bitmap record too short"));
    }
    let size_sectors = le64(d, 0);
    let id: [u8; 16] = d[8..24].try_into().unwrap();
    let gran_sectors = le32(d, 24) as u64;
    let l1_size = le32(d, 28) as u64;
    if size_sectors != h.size_sectors {
        return Err(bad(format!("dirty bitmap covers {size_sectors} sectors, the disk has {}", h.size_sectors)));
    }
    if gran_sectors == 0 || !gran_sectors.is_power_of_two() {
        return Err(bad(format!("dirty bitmap granularity {gran_sectors} is not a power of two")));
    }
    let nbits = size_sectors.div_ceil(gran_sectors);
    if nbits > max_bits {
        return Err(Error::unsupported(format!(
            "format extension: a dirty bitmap of {nbits} bits is more than supported ({max_bits} bits left of {MAX_BITMAP_BITS} for all)"
        )));
    }
    let cluster = h.cluster_bytes();
    let bytes = nbits.div_ceil(8);
    // ploop's reader takes any number of L1 entries the record holds: a
    // chunk with no entry is all clear (`ploop snapshot -b` on a stopped
    // disk writes an L1 of none), an entry past the bitmap is ignored.
    if (BITMAP_HEADER as u64 + 8 * l1_size) > d.len() as u64 {
        return Err(bad(format!("dirty bitmap L1 of {l1_size} entries runs past its record")));
    }
    let chunks = bytes.div_ceil(cluster);
    let mut raw = vec![0u8; (chunks * cluster) as usize];
    let mut clusters = Vec::new();
    for i in 0..l1_size.min(chunks) as usize {
        let entry = le64(d, BITMAP_HEADER + 8 * i);
        let chunk = &mut raw[i * cluster as usize..(i + 1) * cluster as usize];
        match entry {
            0 => {}
            1 => chunk.fill(0xff),
            sector => {
                let at = sector.checked_mul(SECTOR).ok_or_else(|| bad("bitmap offset overflows"))?;
                check_cluster(h, at, file_len, "a bitmap cluster")?;
                io.read_at(fd, chunk, at).await.map_err(|e| Error::io(e, "reading a dirty bitmap"))?;
                clusters.push(at);
            }
        }
    }
    // LSB first within each byte (ploop's 32-bit little-endian words read
    // the same way), which is bit i of the little-endian words BitVec
    // stores: taken a word at a time (the chunks are whole sectors).
    let words: Vec<usize> = raw.chunks_exact(std::mem::size_of::<usize>()).map(|w| usize::from_le_bytes(w.try_into().unwrap())).collect();
    drop(raw);
    let mut bits: BitVec = BitVec::from_vec(words);
    bits.truncate(nbits as usize);
    Ok((DirtyBitmap { id, granularity: gran_sectors * SECTOR, bits }, clusters))
}

/// Lay out an extension holding `bitmaps` at file offset `at` (a cluster
/// boundary of the data area): bitmap clusters first, then the extension
/// cluster, as ploop appends them. Returns the bytes to write at `at` and
/// the extension cluster's offset.
pub fn encode(h: &Header, bitmaps: &[DirtyBitmap], at: u64) -> Result<(Vec<u8>, u64)> {
    let cluster = h.cluster_bytes() as usize;
    let mut out = Vec::new();
    let mut records = Vec::new();
    for bm in bitmaps {
        let gran = bm.granularity / SECTOR;
        if bm.granularity % SECTOR != 0 || !gran.is_power_of_two() || bm.bits.len() as u64 != h.size_sectors.div_ceil(gran) {
            return Err(Error::invalid("dirty bitmap does not fit this disk"));
        }
        let mut raw = vec![0u8; bm.bits.len().div_ceil(8)];
        for i in bm.bits.iter_ones() {
            raw[i / 8] |= 1 << (i % 8);
        }
        let chunks = raw.len().div_ceil(cluster);
        let mut l1 = Vec::with_capacity(chunks);
        for chunk in raw.chunks(cluster) {
            if chunk.iter().all(|&b| b == 0) {
                l1.push(0u64);
            } else {
                let pos = at + out.len() as u64;
                out.extend_from_slice(chunk);
                out.resize(out.len().next_multiple_of(cluster), 0);
                l1.push(pos / SECTOR);
            }
        }
        let mut data = Vec::with_capacity(BITMAP_HEADER + 8 * l1.len());
        data.extend_from_slice(&h.size_sectors.to_le_bytes());
        data.extend_from_slice(&bm.id);
        data.extend_from_slice(&(gran as u32).to_le_bytes());
        data.extend_from_slice(&(l1.len() as u32).to_le_bytes());
        l1.iter().for_each(|e| data.extend_from_slice(&e.to_le_bytes()));
        records.extend_from_slice(&DIRTY_BITMAP_MAGIC.to_le_bytes());
        records.extend_from_slice(&0u64.to_le_bytes());
        records.extend_from_slice(&(data.len() as u32).to_le_bytes());
        records.extend_from_slice(&0u32.to_le_bytes());
        records.extend_from_slice(&data);
        records.resize(records.len().next_multiple_of(8), 0);
    }
    // The end-of-features record: all zeros.
    records.extend_from_slice(&[0u8; RECORD_HEADER]);
    if 24 + records.len() > cluster {
        return Err(Error::invalid("dirty bitmaps too large for one extension cluster"));
    }
    let ext_at = at + out.len() as u64;
    let mut block = vec![0u8; cluster];
    block[..8].copy_from_slice(&EXT_MAGIC.to_le_bytes());
    block[24..24 + records.len()].copy_from_slice(&records);
    let sum: [u8; 16] = Md5::digest(&block[24..]).into();
    block[8..24].copy_from_slice(&sum);
    out.extend_from_slice(&block);
    Ok((out, ext_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{block_on, SyncIo};
    use std::os::fd::AsRawFd;

    #[test]
    fn encodes_and_reads_back() {
        let h = Header::new(8 << 20, 64 << 10).unwrap();
        let mut bits = BitVec::repeat(false, (8 << 20) / 4096);
        for i in [0, 7, 8, 63, 64, 1000, 2047] {
            bits.set(i, true);
        }
        let bm = DirtyBitmap { id: [7; 16], granularity: 4096, bits };
        let data_off = h.data_off_bytes();
        let (bytes, ext_at) = encode(&h, std::slice::from_ref(&bm), data_off).unwrap();
        assert_eq!(ext_at, data_off + (64 << 10), "one bitmap cluster, then the extension");
        let dir = std::env::temp_dir().join(format!("ublk-ploop-ext-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x");
        let mut file = vec![0u8; data_off as usize];
        file.extend_from_slice(&bytes);
        std::fs::write(&path, &file).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let mut hh = h.clone();
        hh.ext_off_sectors = ext_at / 512;
        let ext = block_on(read(&SyncIo, f.as_raw_fd(), &hh, file.len() as u64)).unwrap();
        assert_eq!(ext.bitmaps, vec![bm.clone()]);
        assert_eq!(ext.clusters, vec![ext_at, data_off]);
        // An all-clear bitmap needs no cluster of its own.
        let clear = DirtyBitmap { bits: BitVec::repeat(false, bm.bits.len()), ..bm.clone() };
        let (bytes, ext_at2) = encode(&h, &[clear], data_off).unwrap();
        assert_eq!((bytes.len(), ext_at2), (64 << 10, data_off));
        // Damage is refused, not misread.
        let mut broken = file.clone();
        broken[ext_at as usize + 40] ^= 1;
        std::fs::write(&path, &broken).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        assert!(block_on(read(&SyncIo, f.as_raw_fd(), &hh, file.len() as u64)).is_err());
        assert!(block_on(read(&SyncIo, f.as_raw_fd(), &hh, ext_at)).is_err(), "past the end of the file");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Read an extension of `bitmaps` (written after the header's data
    /// offset) with at most `max_bits` bits in all.
    fn read_back(h: &Header, bitmaps: &[DirtyBitmap], max_bits: u64) -> Result<Extension> {
        let data_off = h.data_off_bytes();
        let (bytes, ext_at) = encode(h, bitmaps, data_off).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &vec![0u8; data_off as usize]).unwrap();
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        let mut h = h.clone();
        h.ext_off_sectors = ext_at / 512;
        block_on(read_within(&SyncIo, file.as_raw_fd(), &h, data_off + bytes.len() as u64, max_bits))
    }

    #[test]
    fn bitmaps_are_bounded_in_number_and_in_bits_together() {
        // A cluster packed with records, each as large as the disk allows,
        // must not cost memory or reads without end.
        let h = Header::new(8 << 20, 64 << 10).unwrap();
        let mut bits = BitVec::repeat(false, (8 << 20) / 4096);
        bits.set(5, true);
        let bm = DirtyBitmap { id: [1; 16], granularity: 4096, bits };
        let n = bm.bits.len() as u64;
        let two = [bm.clone(), bm.clone()];
        assert_eq!(read_back(&h, &two, 2 * n).unwrap().bitmaps.len(), 2);
        let e = read_back(&h, &two, 2 * n - 1).unwrap_err();
        assert!(e.to_string().contains("more than supported"), "{e}");
        let many = vec![bm.clone(); MAX_BITMAPS];
        assert_eq!(read_back(&h, &many, MAX_BITMAP_BITS).unwrap().bitmaps, many);
        let too_many = vec![bm; MAX_BITMAPS + 1];
        let e = read_back(&h, &too_many, MAX_BITMAP_BITS).unwrap_err();
        assert!(e.to_string().contains("more than 8 dirty bitmaps"), "{e}");
    }
}
