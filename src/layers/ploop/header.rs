//! The on-disk header of a ploop (Parallels) expandable image: pure data,
//! parsed and validated here, with no I/O and no device logic.
//!
//! Layout (little endian): magic[16], version u32, heads u32, cylinders u32,
//! cluster size in sectors u32, BAT entries u32, disk size in sectors u64,
//! in-use mark u32, first data sector u32, flags u32, format-extension
//! sector u64. The u32 BAT follows at byte 64.

use crate::error::{Error, Result};

pub const HEADER_SIZE: usize = 64;
pub const SECTOR: u64 = 512;
pub const MAGIC_V1: &[u8; 16] = b"WithoutFreeSpace";
pub const MAGIC_V2: &[u8; 16] = b"WithouFreSpacExt";
pub const VERSION: u32 = 2;
/// Written while the image is open read-write; left behind by a crash.
pub const IN_USE: u32 = 0x746F_6E59;
/// Written on a clean close by software that knows format extensions.
pub const CLOSED: u32 = 0x312E_3276;
/// "No data was ever written": the BAT is to be ignored.
pub const FLAG_EMPTY: u32 = 1;
/// ploop's tool is converting the image between v1 and v2 and keeps a copy
/// of the table to put back: the table in place may be half converted.
pub const FLAG_VERSION_CONVERT: u32 = 2;
pub const DEFAULT_CLUSTER: u64 = 1 << 20;

/// A new disk size in whole clusters, rounded up as ploop's tool rounds
/// every size it is given (`round_bdsize`): its merge copies whole clusters
/// only, so the last part of a partial one would be lost to it.
pub fn whole_clusters(size: u64, cluster: u64) -> Result<u64> {
    if size == 0 || size % SECTOR != 0 {
        return Err(Error::invalid(format!("size {size} must be a non-zero multiple of 512 bytes")));
    }
    size.checked_next_multiple_of(cluster.max(1))
        .ok_or_else(|| Error::invalid(format!("size {size} rounded up to whole clusters of {cluster} bytes is too large")))
}
pub const MIN_CLUSTER: u64 = 512;
pub const MAX_CLUSTER: u64 = 256 << 20;

/// v1 images address clusters in sectors, v2 ("Ext") images in clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Variant {
    #[serde(rename = "WithoutFreeSpace")]
    V1,
    #[serde(rename = "WithouFreSpacExt")]
    V2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub variant: Variant,
    pub heads: u32,
    pub cylinders: u32,
    pub cluster_sectors: u32,
    pub bat_entries: u32,
    pub size_sectors: u64,
    pub in_use: u32,
    pub data_off_sectors: u32,
    pub flags: u32,
    pub ext_off_sectors: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// True when `buf` starts with either ploop signature (format detection).
pub fn has_magic(buf: &[u8]) -> bool {
    buf.len() >= 16 && (&buf[..16] == MAGIC_V1 || &buf[..16] == MAGIC_V2)
}

impl Header {
    /// A fresh v2 header for a disk of `size` bytes, laid out as qemu and
    /// ploop lay out new images: the data area starts at the first cluster
    /// boundary after the BAT.
    pub fn new(size: u64, cluster: u64) -> Result<Header> {
        Self::new_variant(size, cluster, Variant::V2)
    }

    /// A fresh header of either version, laid out alike (ploop aligns the
    /// data area to a cluster for both). A v1 image keeps its size in 32
    /// bits of sectors and addresses clusters by sector.
    pub fn new_variant(size: u64, cluster: u64, variant: Variant) -> Result<Header> {
        validate_cluster(cluster)?;
        if variant == Variant::V1 && size / SECTOR > u32::MAX as u64 {
            return Err(Error::invalid(format!("disk size {size} is too large for a v1 (WithoutFreeSpace) image")));
        }
        if size == 0 || size % SECTOR != 0 {
            return Err(Error::invalid(format!("disk size {size} must be a non-zero multiple of 512 bytes")));
        }
        let entries = size.div_ceil(cluster);
        if entries > u32::MAX as u64 {
            return Err(Error::invalid(format!("disk size {size} needs more than 2^32 clusters of {cluster} bytes")));
        }
        let meta = (HEADER_SIZE as u64 + 4 * entries).next_multiple_of(cluster);
        let data_off = meta / SECTOR;
        if data_off > u32::MAX as u64 {
            return Err(Error::invalid("block address table too large for this cluster size"));
        }
        let size_sectors = size / SECTOR;
        Ok(Header {
            variant,
            heads: 16,
            cylinders: (size_sectors / 16 / 32).min(u32::MAX as u64) as u32,
            cluster_sectors: (cluster / SECTOR) as u32,
            bat_entries: entries as u32,
            size_sectors,
            in_use: 0,
            data_off_sectors: data_off as u32,
            flags: 0,
            ext_off_sectors: 0,
        })
    }

    /// Parse and validate. Every size is checked for overflow before use, so
    /// a hostile header yields an error, never a panic or a huge allocation.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < HEADER_SIZE {
            return Err(Error::corrupt(format!("file too short for a ploop header ({} bytes)", buf.len())));
        }
        let variant = match &buf[..16] {
            m if m == MAGIC_V2 => Variant::V2,
            m if m == MAGIC_V1 => Variant::V1,
            _ => return Err(Error::not_ploop("not a ploop image (no WithouFreSpacExt/WithoutFreeSpace signature)")),
        };
        let version = le32(buf, 16);
        if version != VERSION {
            return Err(Error::unsupported(format!("unsupported ploop image version {version} (only 2 is known)")));
        }
        let mut h = Header {
            variant,
            heads: le32(buf, 20),
            cylinders: le32(buf, 24),
            cluster_sectors: le32(buf, 28),
            bat_entries: le32(buf, 32),
            size_sectors: le64(buf, 36),
            in_use: le32(buf, 44),
            data_off_sectors: le32(buf, 48),
            flags: le32(buf, 52),
            ext_off_sectors: le64(buf, 56),
        };
        if variant == Variant::V1 {
            // v1 keeps the size in the low 32 bits only.
            h.size_sectors &= 0xffff_ffff;
        }
        validate_cluster(h.cluster_bytes()).map_err(|e| Error::corrupt(e.message().to_string()))?;
        let size = h.size_sectors.checked_mul(SECTOR).ok_or_else(|| Error::corrupt("disk size overflows"))?;
        if size == 0 {
            return Err(Error::corrupt("disk size is zero"));
        }
        let covered = (h.bat_entries as u64) * h.cluster_bytes();
        if covered < size {
            return Err(Error::corrupt(format!(
                "BAT of {} entries covers {covered} bytes, less than the disk size {size}",
                h.bat_entries
            )));
        }
        let bat_end = HEADER_SIZE as u64 + 4 * h.bat_entries as u64;
        if h.data_off_sectors == 0 {
            if variant == Variant::V2 {
                return Err(Error::corrupt("first data sector is 0 in a WithouFreSpacExt image"));
            }
            // Old v1 images: data follows the BAT, sector aligned.
            h.data_off_sectors = u32::try_from(bat_end.div_ceil(SECTOR)).map_err(|_| Error::corrupt("BAT too large"))?;
        }
        if h.data_off_bytes() < bat_end {
            return Err(Error::corrupt(format!(
                "data area starts at byte {} inside the BAT, which ends at {bat_end}",
                h.data_off_bytes()
            )));
        }
        if variant == Variant::V2 && h.data_off_bytes() % h.cluster_bytes() != 0 {
            return Err(Error::corrupt("first data sector is not cluster aligned"));
        }
        Ok(h)
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..16].copy_from_slice(match self.variant {
            Variant::V1 => MAGIC_V1,
            Variant::V2 => MAGIC_V2,
        });
        b[16..20].copy_from_slice(&VERSION.to_le_bytes());
        b[20..24].copy_from_slice(&self.heads.to_le_bytes());
        b[24..28].copy_from_slice(&self.cylinders.to_le_bytes());
        b[28..32].copy_from_slice(&self.cluster_sectors.to_le_bytes());
        b[32..36].copy_from_slice(&self.bat_entries.to_le_bytes());
        b[36..44].copy_from_slice(&self.size_sectors.to_le_bytes());
        b[44..48].copy_from_slice(&self.in_use.to_le_bytes());
        b[48..52].copy_from_slice(&self.data_off_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.flags.to_le_bytes());
        b[56..64].copy_from_slice(&self.ext_off_sectors.to_le_bytes());
        b
    }

    pub fn cluster_bytes(&self) -> u64 {
        self.cluster_sectors as u64 * SECTOR
    }
    pub fn size_bytes(&self) -> u64 {
        self.size_sectors * SECTOR
    }
    pub fn data_off_bytes(&self) -> u64 {
        self.data_off_sectors as u64 * SECTOR
    }
    /// Bytes from the start of the file to the end of the BAT.
    pub fn bat_end(&self) -> u64 {
        HEADER_SIZE as u64 + 4 * self.bat_entries as u64
    }
    /// Multiply a BAT value by this to get a byte offset.
    pub fn bat_unit(&self) -> u64 {
        match self.variant {
            Variant::V1 => SECTOR,
            Variant::V2 => self.cluster_bytes(),
        }
    }
    /// The BAT value that addresses byte `offset` (a cluster start).
    pub fn bat_value(&self, offset: u64) -> Option<u32> {
        u32::try_from(offset / self.bat_unit()).ok()
    }
}

fn validate_cluster(cluster: u64) -> Result<()> {
    if !cluster.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cluster) {
        return Err(Error::invalid(format!(
            "cluster size {cluster} is not a power of two between {MIN_CLUSTER} and {MAX_CLUSTER} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_header_round_trips() {
        let h = Header::new(10 << 30, DEFAULT_CLUSTER).unwrap();
        assert_eq!(h.bat_entries, 10240);
        assert_eq!(h.data_off_bytes(), 1 << 20);
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn rejects_bad_headers() {
        let good = Header::new(64 << 20, DEFAULT_CLUSTER).unwrap().to_bytes();
        let mut b = good;
        b[0] = b'X';
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::NotPloop);
        assert!(e.message().contains("not a ploop image"));
        let mut b = good;
        b[28..32].copy_from_slice(&3000u32.to_le_bytes());
        assert!(Header::parse(&b).unwrap_err().message().contains("power of two"));
        let mut b = good;
        b[36..44].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Header::parse(&b).is_err());
        let mut b = good;
        b[32..36].copy_from_slice(&1u32.to_le_bytes());
        assert!(Header::parse(&b).unwrap_err().message().contains("covers"));
        let mut b = good;
        b[48..52].copy_from_slice(&0u32.to_le_bytes());
        assert!(Header::parse(&b).is_err());
        assert!(Header::parse(&good[..40]).is_err());
    }

    #[test]
    fn rejects_bad_create_arguments() {
        assert!(Header::new(1000, DEFAULT_CLUSTER).is_err());
        assert!(Header::new(1 << 20, 3 << 19).is_err());
        assert!(Header::new(0, DEFAULT_CLUSTER).is_err());
        assert!(Header::new(u64::MAX - 511, 512).is_err());
    }
}
