//! The on-disk header of a QCOW2 image and its extensions: pure data,
//! parsed and validated here, with no I/O. Only what reading needs is
//! kept; what would make a read wrong (encryption, an external data file)
//! or what we do not carry (persistent bitmaps) is refused by name, and so
//! is any incompatible feature bit we do not know.
//!
//! Layout (big endian): magic u32, version u32, backing file offset u64
//! and size u32, cluster bits u32, size u64, encryption method u32, L1
//! entries u32 and offset u64, refcount table offset u64 and clusters u32,
//! snapshots u32 and offset u64 (72 bytes, version 2); version 3 adds the
//! incompatible, compatible and autoclear feature masks (u64 each), the
//! refcount order u32, the header length u32 and, past 104 bytes, the
//! compression type u8. Extensions (type u32, length u32, data padded to
//! 8 bytes) follow the header, up to one of type 0.

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Clusters of 512 bytes to 2 MiB, as qemu allows. The header and its
/// extensions lie in the first cluster.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's own bound on the L1 table (32 MiB): more describes more than
/// any image qemu makes, and would only cost memory.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's bound on a backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// The largest disk a QCOW2 image may describe here (as for ploop:
/// sectors fit an i64 and offsets never overflow).
pub const MAX_SIZE: u64 = 1 << 60;

const V2_LEN: usize = 72;
const V3_LEN: usize = 104;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_ENCRYPTION: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// How compressed clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub l1_entries: u32,
    pub l1_offset: u64,
    /// Where the backing file's name is, and its length (0: none).
    pub backing_offset: u64,
    pub backing_len: u32,
    /// The backing file's format as the image names it, if it does.
    pub backing_format: Option<String>,
    pub incompatible: u64,
    pub compression: Compression,
    /// 128-bit L2 entries with 32 subclusters each.
    pub extended_l2: bool,
    /// Bytes of header and extensions: nothing of them lies past this.
    pub header_len: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// True when `buf` starts with the QCOW magic (format detection).
pub fn has_magic(buf: &[u8]) -> bool {
    buf.len() >= 4 && &buf[..4] == MAGIC
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Bytes of one L2 entry.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }
    /// Entries of one L2 table (a table fills one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }
    /// The L1 entries a disk of this size needs.
    pub fn l1_needed(&self) -> u64 {
        self.size.div_ceil(self.cluster_size() * self.l2_entries())
    }
    /// The last run of a clean close left metadata that needs a check
    /// before writing (refcounts); reading does not use them.
    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    /// Parse and check the header in `buf`, the image's first bytes (the
    /// whole first cluster; extensions past a shorter buffer are refused).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_LEN || !has_magic(buf) {
            return Err(Error::invalid("not a QCOW2 image (no QFI\\xfb magic)"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!("QCOW version {version} (only 2 and 3 are read)")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::corrupt(format!(
                "cluster size 2^{cluster_bits} is outside 512 bytes .. 2 MiB"
            )));
        }
        let cluster = 1u64 << cluster_bits;
        let size = be64(buf, 24);
        if size > MAX_SIZE {
            return Err(Error::corrupt(format!("disk size {size} is beyond {MAX_SIZE} bytes")));
        }
        match be32(buf, 32) {
            0 => {}
            1 => return Err(Error::unsupported("AES-encrypted QCOW2 images are not supported")),
            2 => return Err(Error::unsupported("LUKS-encrypted QCOW2 images are not supported")),
            m => return Err(Error::corrupt(format!("unknown encryption method {m}"))),
        }
        let (incompatible, autoclear, header_len, compression_byte) = if version == 3 {
            if buf.len() < V3_LEN {
                return Err(Error::corrupt("version 3 header cut short"));
            }
            let len = be32(buf, 100);
            if (len as usize) < V3_LEN || len % 8 != 0 {
                return Err(Error::corrupt(format!("header length {len} (at least 104, a multiple of 8)")));
            }
            if len as u64 > cluster {
                return Err(Error::corrupt(format!("header length {len} beyond the first cluster")));
            }
            let byte = if len as usize > V3_LEN { buf.get(V3_LEN).copied() } else { None };
            (be64(buf, 72), be64(buf, 88), len, byte)
        } else {
            (0, 0, V2_LEN as u32, None)
        };
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Error::corrupt("marked corrupt by qemu; repair it with qemu-img check -r all first"));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported("QCOW2 images with an external data file are not supported"));
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(format!("unknown incompatible QCOW2 features {unknown:#x}")));
        }
        let compression = if incompatible & INCOMPAT_COMPRESSION != 0 {
            match compression_byte {
                Some(0) => Compression::Zlib,
                Some(1) => Compression::Zstd,
                Some(t) => return Err(Error::unsupported(format!("QCOW2 compression type {t}"))),
                None => return Err(Error::corrupt("compression type bit set in a header without the field")),
            }
        } else {
            match compression_byte {
                None | Some(0) => Compression::Zlib,
                Some(t) => return Err(Error::corrupt(format!("compression type {t} without its feature bit"))),
            }
        };
        let extended_l2 = incompatible & INCOMPAT_EXTL2 != 0;
        if extended_l2 && cluster_bits < 14 {
            return Err(Error::corrupt("extended L2 entries need clusters of at least 16 KiB"));
        }
        let l1_entries = be32(buf, 36);
        let l1_offset = be64(buf, 40);
        let backing_offset = be64(buf, 8);
        let backing_len = be32(buf, 16);
        let mut header = Header {
            version,
            cluster_bits,
            size,
            l1_entries,
            l1_offset,
            backing_offset,
            backing_len,
            backing_format: None,
            incompatible,
            compression,
            extended_l2,
            header_len,
        };
        if (l1_entries as u64) < header.l1_needed() {
            return Err(Error::corrupt(format!(
                "L1 table of {l1_entries} entries is too small for a disk of {size} bytes ({} needed)",
                header.l1_needed()
            )));
        }
        if l1_entries as u64 * 8 > MAX_L1_BYTES {
            return Err(Error::corrupt(format!("L1 table of {l1_entries} entries is beyond qemu's 32 MiB")));
        }
        if l1_entries > 0 && (l1_offset == 0 || l1_offset % cluster != 0) {
            return Err(Error::corrupt(format!("L1 table offset {l1_offset} is not cluster aligned")));
        }
        if backing_len > 0 {
            if backing_len > MAX_BACKING_NAME {
                return Err(Error::corrupt(format!("backing file name of {backing_len} bytes (qemu allows {MAX_BACKING_NAME})")));
            }
            if backing_offset.checked_add(backing_len as u64).map_or(true, |end| end > cluster) {
                return Err(Error::corrupt("backing file name beyond the first cluster"));
            }
        }
        header.read_extensions(buf, autoclear)?;
        Ok(header)
    }

    fn read_extensions(&mut self, buf: &[u8], autoclear: u64) -> Result<()> {
        let end = (1usize << self.cluster_bits).min(buf.len());
        let mut at = self.header_len as usize;
        let mut bitmaps = false;
        loop {
            if at + 8 > end {
                // qemu writes an end marker; a header filling the cluster
                // without one is damaged.
                return Err(Error::corrupt("header extensions run past the first cluster"));
            }
            let (kind, len) = (be32(buf, at), be32(buf, at + 4) as usize);
            at += 8;
            if kind == EXT_END {
                break;
            }
            let padded = len.div_ceil(8) * 8;
            if at + padded > end {
                return Err(Error::corrupt(format!("header extension {kind:#x} of {len} bytes runs past the first cluster")));
            }
            let data = &buf[at..at + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    let name = std::str::from_utf8(data).map_err(|_| Error::corrupt("backing format name is not UTF-8"))?;
                    self.backing_format = Some(name.to_string());
                }
                EXT_ENCRYPTION => return Err(Error::unsupported("encrypted QCOW2 images are not supported")),
                EXT_DATA_FILE => return Err(Error::unsupported("QCOW2 images with an external data file are not supported")),
                EXT_BITMAPS => bitmaps = true,
                // Feature names and anything newer: not needed to read.
                _ => {}
            }
            at += padded;
        }
        if bitmaps && autoclear & AUTOCLEAR_BITMAPS != 0 {
            return Err(Error::unsupported(
                "QCOW2 images with persistent dirty bitmaps are not supported (qemu-img bitmap --remove them, or convert the image)",
            ));
        }
        if self.backing_len > 0 && self.backing_offset < at as u64 {
            return Err(Error::corrupt("backing file name overlaps the header"));
        }
        Ok(())
    }

    /// The backing file's name as stored, from the image's first cluster.
    pub fn backing_name<'a>(&self, buf: &'a [u8]) -> Result<Option<&'a str>> {
        if self.backing_len == 0 {
            return Ok(None);
        }
        let (at, len) = (self.backing_offset as usize, self.backing_len as usize);
        let bytes = buf.get(at..at + len).ok_or_else(|| Error::corrupt("backing file name beyond the header read"))?;
        let name = std::str::from_utf8(bytes).map_err(|_| Error::corrupt("backing file name is not UTF-8"))?;
        if name.is_empty() || name.contains('\0') {
            return Err(Error::corrupt("backing file name is empty or holds a NUL"));
        }
        Ok(Some(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 3 header of a 1 GiB disk with 64 KiB clusters, an L1 at
    /// 192 KiB and no extensions but the end marker.
    fn v3() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b
    }

    #[test]
    fn a_plain_v3_header_parses() {
        let h = Header::parse(&v3()).unwrap();
        assert_eq!((h.version, h.cluster_size(), h.size, h.l1_entries), (3, 65536, 1 << 30, 2));
        assert_eq!((h.l2_entries(), h.l1_needed(), h.compression, h.extended_l2), (8192, 2, Compression::Zlib, false));
    }

    #[test]
    fn what_would_read_wrong_is_refused_by_name() {
        let set = |at: usize, v: u64| {
            let mut b = v3();
            b[at..at + 8].copy_from_slice(&v.to_be_bytes());
            Header::parse(&b).unwrap_err().to_string()
        };
        assert!(set(72, INCOMPAT_DATA_FILE).contains("external data file"));
        assert!(set(72, INCOMPAT_CORRUPT).contains("corrupt"));
        assert!(set(72, 1 << 9).contains("unknown incompatible"));
        let mut b = v3();
        b[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert!(Header::parse(&b).unwrap_err().to_string().contains("LUKS"));
        // A compatible bit we do not know (at 80) is ignored.
        let mut b = v3();
        b[80..88].copy_from_slice(&(1u64 << 7).to_be_bytes());
        Header::parse(&b).unwrap();
    }

    #[test]
    fn hostile_sizes_are_refused() {
        let mut b = v3();
        b[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert!(Header::parse(&b).is_err(), "a 1 GiB cluster");
        let mut b = v3();
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        assert!(Header::parse(&b).unwrap_err().to_string().contains("too small"));
        let mut b = v3();
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Header::parse(&b).unwrap_err().to_string().contains("32 MiB"));
        let mut b = v3();
        b[104..108].copy_from_slice(&0xe279_2acau32.to_be_bytes());
        b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Header::parse(&b).unwrap_err().to_string().contains("past the first cluster"));
        // Everything cut short fails cleanly.
        let full = v3();
        for len in 0..200 {
            let _ = Header::parse(&full[..len]);
        }
    }

    #[test]
    fn extensions_name_the_backing_format_and_bitmaps_are_refused() {
        let mut b = v3();
        b[104..108].copy_from_slice(&0xe279_2acau32.to_be_bytes());
        b[108..112].copy_from_slice(&3u32.to_be_bytes());
        b[112..115].copy_from_slice(b"raw");
        // end marker at 120 (zeros)
        b[8..16].copy_from_slice(&128u64.to_be_bytes());
        b[16..20].copy_from_slice(&4u32.to_be_bytes());
        b[128..132].copy_from_slice(b"base");
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(h.backing_name(&b).unwrap(), Some("base"));
        let mut b = v3();
        b[88..96].copy_from_slice(&AUTOCLEAR_BITMAPS.to_be_bytes());
        b[104..108].copy_from_slice(&0x2385_2875u32.to_be_bytes());
        b[108..112].copy_from_slice(&8u32.to_be_bytes());
        assert!(Header::parse(&b).unwrap_err().to_string().contains("bitmaps"));
    }
}
