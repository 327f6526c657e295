//! Reading a ploop image's header and BAT: one loader for `open` (which
//! refuses damage) and `check` (which reports it), so the two never
//! disagree on what the file says.

use std::os::fd::RawFd;

use crate::error::{Error, Result};
use crate::io::{AlignedBuf, Io};
use crate::layers::ploop::bat::{BatScan, Scanner};
use crate::layers::ploop::header::{Header, HEADER_SIZE};
use crate::layers::ploop::table::Table;

/// The header as read from the file.
pub struct HeaderRead {
    pub header: Header,
    /// Its bytes as on disk (a table block write rewrites them as they are).
    pub head: [u8; HEADER_SIZE],
    pub file_len: u64,
}

/// Read and parse the header. An unparsable header is an error carrying
/// the parser's message (check reports it, open refuses the image).
pub async fn read_header<I: Io>(io: &I, fd: RawFd, path: &str) -> Result<HeaderRead> {
    let file_len = file_len(io, fd, path)?;
    let mut first = AlignedBuf::zeroed(4096);
    io.read_at(fd, &mut first, 0).await.map_err(|e| Error::io(e, path))?;
    let header = Header::parse(&first[..HEADER_SIZE.min(file_len as usize)])?;
    let head = first[..HEADER_SIZE].try_into().unwrap();
    Ok(HeaderRead { header, head, file_len })
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

/// Largest piece of the BAT read at once; pieces start at 4 KiB after a
/// jump over a hole and double while the data goes on, so a table of a few
/// scattered blocks costs a few small reads and a written one large reads.
const MAX_PIECE: u64 = 1 << 20;
const MIN_PIECE: u64 = 4096;

/// Call `each(first, entries)` for the used BAT entries the file holds
/// data for, skipping the ranges it has none for (holes read as zeros:
/// unallocated entries). Time and memory follow what the file really
/// holds, not the table's claimed length. The caller has made sure the
/// file reaches the end of the BAT; `align` is the descriptor's O_DIRECT
/// unit.
async fn walk_bat<I: Io>(io: &I, fd: RawFd, h: &Header, align: u64, path: &str, mut each: impl FnMut(u64, &[u32])) -> Result<()> {
    let end = HEADER_SIZE as u64 + 4 * used_entries(h);
    let unit = align.max(MIN_PIECE);
    let mut buf = AlignedBuf::zeroed(MAX_PIECE.max(unit) as usize);
    let mut values: Vec<u32> = Vec::with_capacity(buf.len() / 4);
    let (mut at, mut piece) = (0u64, unit);
    while at < end {
        let data = match io.seek_data(fd, at) {
            Ok(Some(data)) => data,
            // Nothing but holes from here on.
            Ok(None) => break,
            Err(e) => return Err(Error::io(e, path)),
        };
        let start = data / unit * unit;
        if start > at {
            (at, piece) = (start, unit);
        }
        if at >= end {
            break;
        }
        let len = (end - at).min(piece);
        let bytes = &mut buf[..len.next_multiple_of(unit) as usize];
        io.read_at(fd, bytes, at).await.map_err(|e| Error::io(e, path))?;
        // Entries start at byte HEADER_SIZE; `at` is a multiple of 4.
        let from = at.max(HEADER_SIZE as u64);
        values.clear();
        values.extend(bytes[(from - at) as usize..len as usize].chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())));
        each((from - HEADER_SIZE as u64) / 4, &values);
        at += len;
        piece = (piece * 2).min(MAX_PIECE.max(unit));
    }
    Ok(())
}

/// Check the used BAT entries of an image (see `bat::Scanner`) without ever
/// holding the table whole (see `walk_bat`).
pub async fn scan_bat<I: Io>(io: &I, fd: RawFd, h: &Header, file_len: u64, path: &str) -> Result<BatScan> {
    let mut scanner = Scanner::new(h, file_len);
    walk_bat(io, fd, h, MIN_PIECE, path, |first, values| scanner.feed(first, values)).await?;
    Ok(scanner.finish())
}

/// An image's table as an open layer keeps it.
pub struct TableRead {
    pub table: Table,
    pub scan: BatScan,
    /// The bytes after the last used entry up to the end of its `block`
    /// (never into the data area): block writes rewrite them as they were.
    pub tail: Vec<u8>,
}

/// Load the used entries into a chunked table, checking them as `check`
/// does; memory follows the non-zero entries, time the table's data.
pub async fn load_table<I: Io>(io: &I, fd: RawFd, h: &Header, block: u64, file_len: u64, path: &str) -> Result<TableRead> {
    let entries = used_entries(h);
    let end = HEADER_SIZE as u64 + 4 * entries;
    let table = Table::new(entries, path)?;
    let mut scanner = Scanner::new(h, file_len);
    walk_bat(io, fd, h, block, path, |first, values| {
        scanner.feed(first, values);
        table.fill(first, values);
    })
    .await?;
    // Never past the data area: whole blocks of it are rewritten.
    let meta_len = end.next_multiple_of(block).min(h.data_off_bytes().max(block));
    let mut tail = Vec::new();
    if meta_len > end {
        let from = end / block * block;
        let mut last = AlignedBuf::zeroed(block as usize);
        io.read_at(fd, &mut last, from).await.map_err(|e| Error::io(e, path))?;
        tail.extend_from_slice(&last[(end - from) as usize..(meta_len - from) as usize]);
    }
    Ok(TableRead { table, scan: scanner.finish(), tail })
}
