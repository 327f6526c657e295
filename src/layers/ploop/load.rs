//! Reading a ploop image's header and BAT: one loader for `open` (which
//! refuses damage) and `check` (which reports it), so the two never
//! disagree on what the file says.

use std::os::fd::RawFd;

use crate::error::{Error, Result};
use crate::io::{AlignedBuf, Io};
use crate::layers::ploop::bat::{BatScan, Scanner};
use crate::layers::ploop::header::{Header, HEADER_SIZE};

/// The header as read from the file.
pub struct HeaderRead {
    pub header: Header,
    pub file_len: u64,
}

/// Read and parse the header. An unparsable header is an error carrying
/// the parser's message (check reports it, open refuses the image).
pub async fn read_header<I: Io>(io: &I, fd: RawFd, path: &str) -> Result<HeaderRead> {
    let file_len = file_len(io, fd, path)?;
    let mut first = AlignedBuf::zeroed(4096);
    io.read_at(fd, &mut first, 0).await.map_err(|e| Error::io(e, path))?;
    let header = Header::parse(&first[..HEADER_SIZE.min(file_len as usize)])?;
    Ok(HeaderRead { header, file_len })
}

/// The disk size an image's header declares.
pub async fn image_size<I: Io>(io: &I, path: &std::path::Path) -> Result<u64> {
    let name = path.display().to_string();
    let file = io.open(path, &crate::io::OpenHow::read()).map_err(|e| Error::io(e, &name))?;
    Ok(read_header(io, file.fd(), &name).await?.header.size_bytes())
}

pub fn file_len<I: Io + ?Sized>(io: &I, fd: RawFd, path: &str) -> Result<u64> {
    io.fstat(fd).map(|st| st.len).map_err(|e| Error::io(e, path))
}

/// Entries the disk needs: one per cluster of the disk. A header may claim
/// more (the format allows a longer BAT); those are never used, so they are
/// neither read nor kept, and a hostile claim costs no memory.
pub fn used_entries(h: &Header) -> u64 {
    h.size_bytes().div_ceil(h.cluster_bytes()).min(h.bat_entries as u64)
}

/// The first bytes of the file up to the end of the used BAT entries,
/// padded to `block` (the O_DIRECT unit), and the entries themselves.
pub struct BatRead {
    /// Header and BAT bytes exactly as on disk; the metadata writes of an
    /// open image rewrite whole `block`s of it.
    pub meta: AlignedBuf,
    pub values: Vec<u32>,
}

pub async fn read_bat<I: Io>(io: &I, fd: RawFd, h: &Header, block: u64, path: &str) -> Result<BatRead> {
    let entries = used_entries(h);
    let end = HEADER_SIZE as u64 + 4 * entries;
    // Never past the data area: whole blocks of it are rewritten.
    let meta_len = end.next_multiple_of(block).min(h.data_off_bytes().max(block));
    let too_large = || Error::too_large(path, meta_len + 4 * entries);
    let mut meta = AlignedBuf::try_zeroed(meta_len as usize).ok_or_else(too_large)?;
    io.read_at(fd, &mut meta, 0).await.map_err(|e| Error::io(e, path))?;
    let mut values: Vec<u32> = Vec::new();
    values.try_reserve_exact(entries as usize).map_err(|_| too_large())?;
    values.extend(meta[HEADER_SIZE..end as usize].chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())));
    Ok(BatRead { meta, values })
}

/// Bytes of the BAT read at a time by `scan_bat`.
const SCAN_CHUNK: u64 = 1 << 20;

/// Check the used BAT entries of an image (see `bat::scan`) reading the
/// table a chunk at a time and skipping the ranges of it the file holds no
/// data for (they read as zeros: unallocated entries). Memory and time
/// follow what the file really holds, not the table's claimed length.
/// The caller has made sure the file reaches the end of the BAT.
pub async fn scan_bat<I: Io>(io: &I, fd: RawFd, h: &Header, file_len: u64, path: &str) -> Result<BatScan> {
    let end = HEADER_SIZE as u64 + 4 * used_entries(h);
    let mut scanner = Scanner::new(h, file_len);
    let mut buf = AlignedBuf::zeroed(SCAN_CHUNK as usize);
    let mut at = 0u64;
    while at < end {
        let data = match io.seek_data(fd, at) {
            Ok(Some(data)) => data,
            // Nothing but holes from here on.
            Ok(None) => break,
            Err(e) => return Err(Error::io(e, path)),
        };
        // Chunks stay aligned (the descriptor may be O_DIRECT).
        at = at.max(data / SCAN_CHUNK * SCAN_CHUNK);
        if at >= end {
            break;
        }
        let len = (end - at).min(SCAN_CHUNK);
        let piece = &mut buf[..(len.next_multiple_of(4096).min(SCAN_CHUNK)) as usize];
        io.read_at(fd, piece, at).await.map_err(|e| Error::io(e, path))?;
        // Entries start at byte HEADER_SIZE; `at` is a multiple of 4.
        let from = at.max(HEADER_SIZE as u64);
        let bytes = &piece[(from - at) as usize..(end.min(at + len) - at) as usize];
        let values: Vec<u32> = bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect();
        scanner.feed((from - HEADER_SIZE as u64) / 4, &values);
        at += len;
    }
    Ok(scanner.finish())
}
