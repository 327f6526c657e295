//! DiskDescriptor.xml: ploop's description of a disk directory, read by
//! ploop's own rules and written in ploop's exact layout, so that disks move
//! between ploop and ublk-ploop both ways.
//!
//! Reader rules (as ploop's): the root element's name is not checked;
//! `Disk_Parameters`, one `StorageData/Storage`, every `Image/GUID` and
//! `Image/File`, `Snapshots`, every `Shot/GUID` and `Shot/ParentGUID` are
//! required; unknown elements and `Start`, `End`, `Padding` are ignored;
//! numbers are read as C's `strtoul(s, 0)` does (0x hex, leading-0 octal);
//! the chain is defined by `ParentGUID`, whatever the order of the images.
//! Validation: at least one image, a power-of-two `Blocksize` of 64 to
//! 131072 sectors, one shot per image, and a `TopGUID` that exists and is
//! not temporary.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Largest descriptor file read (a real one is a few KB).
pub const MAX_DESCRIPTOR: u64 = 1 << 20;

/// A ploop GUID: a UUID written lowercase inside braces.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Guid(pub uuid::Uuid);

/// The GUID ploop gives the top delta; it never changes.
pub const TOP_GUID: Guid = Guid(uuid::uuid!("5fbaabe3-6958-40ff-92a7-860e329aab41"));
/// "No parent".
pub const NONE_GUID: Guid = Guid(uuid::Uuid::nil());

impl Guid {
    pub fn random() -> Guid {
        Guid(uuid::Builder::from_random_bytes(crate::rng::entropy_u128().to_le_bytes()).into_uuid())
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}", self.0.hyphenated())
    }
}

impl FromStr for Guid {
    type Err = Error;
    /// `{...}` as ploop writes it; a bare 36-character UUID is accepted
    /// too (ploop's command line adds the braces the same way).
    fn from_str(s: &str) -> Result<Guid> {
        let t = s.trim();
        let inner = match (t.strip_prefix('{'), t.len()) {
            (Some(rest), 38) => rest.strip_suffix('}'),
            (None, 36) => Some(t),
            _ => None,
        };
        inner
            .and_then(|u| uuid::Uuid::parse_str(u).ok().filter(|_| u.len() == 36))
            .map(Guid)
            .ok_or_else(|| Error::invalid(format!("'{s}' is not a GUID (expected {{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}})")))
    }
}

impl serde::Serialize for Guid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Guid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Guid, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How ploop stores the layers: expandable images, or flat files.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize)]
pub enum ImageType {
    /// Expandable ploop images (ploop calls them "Compressed").
    Compressed,
    /// Raw files (ploop's raw mode).
    Plain,
    /// A QCOW2 image as the base, read-only (ours: ploop's tool reads any
    /// type but Plain as its own format, so it refuses this file by its
    /// signature instead of misreading it).
    Qcow2,
}

impl ImageType {
    /// The layer format this type means.
    pub fn format(self) -> crate::layers::Format {
        match self {
            ImageType::Compressed => crate::layers::Format::Ploop,
            ImageType::Plain => crate::layers::Format::Raw,
            ImageType::Qcow2 => crate::layers::Format::Qcow2,
        }
    }
    /// The word in `<Image/Type>`.
    pub fn xml_name(self) -> &'static str {
        match self {
            ImageType::Compressed => "Compressed",
            ImageType::Plain => "Plain",
            ImageType::Qcow2 => "QCOW2",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Image {
    pub guid: Guid,
    pub kind: ImageType,
    /// As written: relative to the descriptor's directory, or absolute.
    pub file: String,
}

/// ploop's temporary-snapshot markers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Temporary {
    No,
    Temporary,
    Zero,
    ZeroSwap,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Shot {
    pub guid: Guid,
    pub parent: Guid,
    pub temporary: Temporary,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Descriptor {
    pub size_sectors: u64,
    /// Kept as read (ploop writes it only when non-zero).
    pub max_delta_size: u64,
    pub cylinders: u64,
    pub heads: u64,
    pub sectors: u64,
    /// Encryption key id, kept as read (ublk-ploop does not encrypt).
    pub key_id: Option<String>,
    pub blocksize_sectors: u64,
    pub preallocated: bool,
    pub images: Vec<Image>,
    pub top: Guid,
    pub shots: Vec<Shot>,
}

/// Sectors of 512 bytes, as the descriptor counts sizes.
const SECTOR: u64 = 512;
/// ploop's limit on snapshots per disk (it refuses more).
pub const MAX_SNAPSHOTS: usize = 126;

/// C's `strtoul(s, NULL, 0)` for what a descriptor holds: decimal, 0x
/// hex, leading-zero octal, surrounding blanks.
fn parse_number(s: &str, what: &str) -> Result<u64> {
    let t = s.trim();
    let r = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8)
    } else {
        t.parse()
    };
    r.map_err(|_| Error::invalid(format!("DiskDescriptor.xml: <{what}> holds '{s}', not a number")))
}

fn child<'a>(node: roxmltree::Node<'a, 'a>, name: &str) -> Option<roxmltree::Node<'a, 'a>> {
    node.children().find(|c| c.is_element() && c.tag_name().name() == name)
}

fn children<'a>(node: roxmltree::Node<'a, 'a>, name: &'a str) -> impl Iterator<Item = roxmltree::Node<'a, 'a>> + 'a {
    node.children().filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn required<'a>(node: roxmltree::Node<'a, 'a>, name: &str, path: &str) -> Result<roxmltree::Node<'a, 'a>> {
    child(node, name).ok_or_else(|| Error::invalid(format!("DiskDescriptor.xml: <{path}/{name}> is missing")))
}

fn text(node: roxmltree::Node<'_, '_>) -> String {
    node.text().unwrap_or("").trim().to_string()
}

impl Descriptor {
    /// The type of the disk's own deltas (a new top takes it): ploop's
    /// one type for the disk, whatever a QCOW2 base is.
    pub fn delta_kind(&self) -> ImageType {
        self.images.iter().map(|i| i.kind).find(|&k| k != ImageType::Qcow2).unwrap_or(ImageType::Compressed)
    }

    /// A descriptor for a new disk of one image, as `ploop init` writes it.
    pub fn new(size: u64, cluster: u64, file: &str, kind: ImageType) -> Result<Descriptor> {
        if size == 0 || size % SECTOR != 0 {
            return Err(Error::invalid(format!("disk size {size} must be a non-zero multiple of 512 bytes")));
        }
        check_cluster_size(cluster)?;
        let blocksize = cluster / SECTOR;
        let size_sectors = size / SECTOR;
        let (heads, per_track) = (16u64, 32u64);
        let cylinders = (size_sectors / (heads * per_track)).max(1);
        Ok(Descriptor {
            size_sectors,
            max_delta_size: 0,
            cylinders,
            heads,
            sectors: size_sectors / (cylinders * heads),
            key_id: None,
            blocksize_sectors: blocksize,
            preallocated: false,
            images: vec![Image { guid: TOP_GUID, kind, file: file.to_string() }],
            top: TOP_GUID,
            shots: vec![Shot { guid: TOP_GUID, parent: NONE_GUID, temporary: Temporary::No }],
        })
    }

    pub fn size(&self) -> u64 {
        self.size_sectors * SECTOR
    }

    /// A new disk size, with the CHS geometry ploop derives from it.
    pub fn set_size(&mut self, size: u64) -> Result<()> {
        let fresh = Descriptor::new(size, self.cluster_size(), "-", ImageType::Compressed)?;
        (self.size_sectors, self.cylinders, self.heads, self.sectors) = (fresh.size_sectors, fresh.cylinders, fresh.heads, fresh.sectors);
        Ok(())
    }
    pub fn cluster_size(&self) -> u64 {
        self.blocksize_sectors * SECTOR
    }

    /// Read a descriptor file's text, refusing one larger than
    /// `MAX_DESCRIPTOR` unread: a real descriptor is a few KB, and the
    /// path may name any file at all.
    pub fn read_text(path: &std::path::Path) -> Result<String> {
        crate::io::block_on(Self::read_text_in(&crate::io::SyncIo, path))
    }

    /// The same through `io`.
    pub async fn read_text_in<I: crate::io::Io + ?Sized>(io: &I, path: &std::path::Path) -> Result<String> {
        let file = io.open(path, &crate::io::OpenHow::read()).map_err(|e| Error::io(e, path.display()))?;
        let len = io.fstat(file.fd()).map_err(|e| Error::io(e, path.display()))?.len;
        if len > MAX_DESCRIPTOR {
            return Err(Error::invalid(format!(
                "{}: larger than {} KiB, not a DiskDescriptor.xml",
                path.display(),
                MAX_DESCRIPTOR >> 10
            )));
        }
        let mut bytes = vec![0u8; len as usize];
        io.read_at(file.fd(), &mut bytes, 0).await.map_err(|e| Error::io(e, path.display()))?;
        String::from_utf8(bytes)
            .map_err(|_| Error::invalid(format!("{}: not UTF-8 text, not a DiskDescriptor.xml", path.display())))
    }

    /// Parse and validate by ploop's reader rules.
    pub fn parse(xml: &str) -> Result<Descriptor> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| Error::invalid(format!("DiskDescriptor.xml: not well-formed XML: {e}")))?;
        let root = doc.root_element();
        let params = required(root, "Disk_Parameters", "")?;
        let number = |node: roxmltree::Node<'_, '_>, name: &str| -> Result<Option<u64>> {
            child(node, name).map(|n| parse_number(&text(n), name)).transpose()
        };
        let size_sectors = number(params, "Disk_size")?.unwrap_or(0);
        let storage_data = required(root, "StorageData", "")?;
        // A volume stands on another disk's descriptor (ploop follows its
        // Parent) or is one others stand on (ReadOnly): neither is followed
        // here, and a descriptor stored back would lose those marks.
        if child(storage_data, "Volume").is_some() {
            return Err(Error::unsupported(
                "DiskDescriptor.xml: <StorageData/Volume> (a ploop volume, standing on or under another disk) is not supported",
            ));
        }
        let mut storages = children(storage_data, "Storage");
        let storage = storages.next().ok_or_else(|| Error::invalid("DiskDescriptor.xml: <StorageData/Storage> is missing"))?;
        if storages.next().is_some() {
            return Err(Error::unsupported("DiskDescriptor.xml: more than one <Storage> (a split disk) is not supported"));
        }
        let mut images = Vec::new();
        for img in children(storage, "Image") {
            let guid: Guid = text(required(img, "GUID", "Image")?).parse().map_err(|e: Error| e.context("DiskDescriptor.xml: <Image/GUID>"))?;
            let file = text(required(img, "File", "Image")?);
            if file.is_empty() {
                return Err(Error::invalid(format!("DiskDescriptor.xml: <Image/File> of {guid} is empty")));
            }
            let kind = match child(img, "Type").map(text).as_deref() {
                Some("Plain") => ImageType::Plain,
                Some("Compressed") | None => ImageType::Compressed,
                Some("QCOW2") => ImageType::Qcow2,
                Some(other) => {
                    return Err(Error::invalid(format!("DiskDescriptor.xml: <Image/Type> '{other}' of {guid} is neither Compressed, Plain nor QCOW2")))
                }
            };
            images.push(Image { guid, kind, file });
        }
        let snapshots = required(root, "Snapshots", "")?;
        let top: Guid = match child(snapshots, "TopGUID") {
            Some(t) => text(t).parse().map_err(|e: Error| e.context("DiskDescriptor.xml: <Snapshots/TopGUID>"))?,
            None => return Err(Error::invalid("DiskDescriptor.xml: <Snapshots/TopGUID> is missing")),
        };
        let mut shots = Vec::new();
        for shot in children(snapshots, "Shot") {
            let guid: Guid = text(required(shot, "GUID", "Shot")?).parse().map_err(|e: Error| e.context("DiskDescriptor.xml: <Shot/GUID>"))?;
            let parent: Guid =
                text(required(shot, "ParentGUID", "Shot")?).parse().map_err(|e: Error| e.context("DiskDescriptor.xml: <Shot/ParentGUID>"))?;
            // ploop 9 reads the reverse merge's states before the plain
            // mark (a later state wins), so a shot carrying both tags is in
            // the reverse merge's state.
            let temporary = if child(shot, "TemporaryZeroSwap").is_some() {
                Temporary::ZeroSwap
            } else if child(shot, "TemporaryZero").is_some() {
                Temporary::Zero
            } else if child(shot, "Temporary").is_some() {
                Temporary::Temporary
            } else {
                Temporary::No
            };
            shots.push(Shot { guid, parent, temporary });
        }
        let d = Descriptor {
            size_sectors,
            max_delta_size: number(params, "Max_delta_size")?.unwrap_or(0),
            cylinders: number(params, "Cylinders")?.unwrap_or(0),
            heads: number(params, "Heads")?.unwrap_or(0),
            sectors: number(params, "Sectors")?.unwrap_or(0),
            key_id: child(params, "Encryption").and_then(|e| child(e, "KeyId")).map(text),
            blocksize_sectors: number(storage, "Blocksize")?.unwrap_or(0),
            preallocated: number(storage, "Preallocated")?.unwrap_or(0) != 0,
            images,
            top,
            shots,
        };
        d.validate()?;
        Ok(d)
    }

    /// ploop's validation, and what a chain needs to be followed.
    pub fn validate(&self) -> Result<()> {
        if self.size_sectors == 0 {
            return Err(Error::invalid("DiskDescriptor.xml: <Disk_Parameters/Disk_size> is missing or zero"));
        }
        if self.size_sectors > u64::MAX / SECTOR {
            return Err(Error::invalid(format!(
                "DiskDescriptor.xml: <Disk_Parameters/Disk_size> {} sectors is more bytes than a 64-bit count holds",
                self.size_sectors
            )));
        }
        if self.images.is_empty() {
            return Err(Error::invalid("DiskDescriptor.xml: no <Image> in <StorageData/Storage>"));
        }
        check_blocksize(self.blocksize_sectors)?;
        if self.images.len() != self.shots.len() {
            return Err(Error::invalid(format!(
                "DiskDescriptor.xml: {} <Image> elements but {} <Shot> elements (one each per delta)",
                self.images.len(),
                self.shots.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        let mut files = std::collections::HashMap::new();
        for img in &self.images {
            if !seen.insert(img.guid) {
                return Err(Error::invalid(format!("DiskDescriptor.xml: two <Image> elements have GUID {}", img.guid)));
            }
            // One file in two places of a chain would be written through
            // one and read through the other (`a//b` and `./a` spell `a`).
            let spelled: Vec<_> = std::path::Path::new(&img.file).components().filter(|c| *c != std::path::Component::CurDir).collect();
            if let Some(other) = files.insert(spelled, img.guid) {
                return Err(Error::invalid(format!("DiskDescriptor.xml: <Image> {other} and {} both name the file {}", img.guid, img.file)));
            }
            if self.shot(img.guid).is_none() {
                return Err(Error::invalid(format!("DiskDescriptor.xml: <Image> {} has no <Shot>", img.guid)));
            }
        }
        // ploop's rule: one type for the whole disk; ours adds a QCOW2 base.
        let mut kinds = self.images.iter().map(|i| i.kind).filter(|&k| k != ImageType::Qcow2);
        if let Some(kind) = kinds.next() {
            if kinds.any(|k| k != kind) {
                return Err(Error::invalid("DiskDescriptor.xml: <Image/Type> differs between images"));
            }
        }
        for img in self.images.iter().filter(|i| i.kind == ImageType::Qcow2) {
            if self.shot(img.guid).is_some_and(|s| s.parent != NONE_GUID) {
                return Err(Error::invalid(format!("DiskDescriptor.xml: QCOW2 image {} is not the base: a QCOW2 image can only be the bottom", img.guid)));
            }
        }
        match self.shot(self.top) {
            None => return Err(Error::invalid(format!("DiskDescriptor.xml: <TopGUID> {} names no <Shot>", self.top))),
            Some(s) if s.temporary != Temporary::No => {
                return Err(Error::invalid(format!("DiskDescriptor.xml: <TopGUID> {} is a temporary snapshot", self.top)))
            }
            Some(_) => {}
        }
        // The chain from the top must reach the base without loops.
        self.chain(self.top)?;
        Ok(())
    }

    pub fn shot(&self, guid: Guid) -> Option<&Shot> {
        self.shots.iter().find(|s| s.guid == guid)
    }
    pub fn image(&self, guid: Guid) -> Option<&Image> {
        self.images.iter().find(|i| i.guid == guid)
    }
    /// The format of `img`'s file. In ploop's raw mode every image is
    /// typed `Plain`, but only the base is a raw file ("Only base image
    /// could be in RAW format", ploop's merge.c): its snapshots' deltas
    /// are ploop images.
    pub fn format_of(&self, img: &Image) -> crate::layers::Format {
        match img.kind {
            ImageType::Plain if self.shot(img.guid).is_some_and(|s| s.parent != NONE_GUID) => crate::layers::Format::Ploop,
            kind => kind.format(),
        }
    }
    /// Deltas whose parent is `guid`.
    pub fn children(&self, guid: Guid) -> Vec<Guid> {
        self.shots.iter().filter(|s| s.parent == guid).map(|s| s.guid).collect()
    }

    /// The deltas from the base up to `guid`, bottom first.
    pub fn chain(&self, guid: Guid) -> Result<Vec<&Image>> {
        let mut out = Vec::new();
        let mut at = guid;
        while at != NONE_GUID {
            if out.len() > self.shots.len() {
                return Err(Error::invalid(format!("DiskDescriptor.xml: the ParentGUID chain from {guid} loops")));
            }
            let shot = self.shot(at).ok_or_else(|| Error::invalid(format!("DiskDescriptor.xml: {at} (in the chain of {guid}) has no <Shot>")))?;
            let img = self.image(at).ok_or_else(|| Error::invalid(format!("DiskDescriptor.xml: {at} (in the chain of {guid}) has no <Image>")))?;
            out.push(img);
            at = shot.parent;
        }
        out.reverse();
        Ok(out)
    }

    /// The descriptor as ploop writes it (element order, indentation).
    pub fn to_xml(&self) -> String {
        let mut x = String::from("<?xml version=\"1.0\"?>\n<Virtuozzo_disk_image>\n  <Disk_Parameters>\n");
        let el = |x: &mut String, indent: usize, name: &str, value: &dyn fmt::Display| {
            x.push_str(&format!("{:indent$}<{name}>{value}</{name}>\n", "", indent = indent));
        };
        el(&mut x, 4, "Disk_size", &self.size_sectors);
        if self.max_delta_size != 0 {
            el(&mut x, 4, "Max_delta_size", &self.max_delta_size);
        }
        el(&mut x, 4, "Cylinders", &self.cylinders);
        el(&mut x, 4, "Heads", &self.heads);
        el(&mut x, 4, "Sectors", &self.sectors);
        el(&mut x, 4, "Padding", &0);
        if let Some(k) = &self.key_id {
            x.push_str("    <Encryption>\n");
            el(&mut x, 6, "KeyId", &escape(k));
            x.push_str("    </Encryption>\n");
        }
        x.push_str("  </Disk_Parameters>\n  <StorageData>\n    <Storage>\n");
        el(&mut x, 6, "Start", &0);
        el(&mut x, 6, "End", &self.size_sectors);
        el(&mut x, 6, "Blocksize", &self.blocksize_sectors);
        if self.preallocated {
            el(&mut x, 6, "Preallocated", &1);
        }
        for img in &self.images {
            x.push_str("      <Image>\n");
            el(&mut x, 8, "GUID", &img.guid);
            el(&mut x, 8, "Type", &img.kind.xml_name());
            el(&mut x, 8, "File", &escape(&img.file));
            x.push_str("      </Image>\n");
        }
        x.push_str("    </Storage>\n  </StorageData>\n  <Snapshots>\n");
        el(&mut x, 4, "TopGUID", &self.top);
        for shot in &self.shots {
            x.push_str("    <Shot>\n");
            el(&mut x, 6, "GUID", &shot.guid);
            el(&mut x, 6, "ParentGUID", &shot.parent);
            match shot.temporary {
                Temporary::No => {}
                Temporary::Temporary => x.push_str("      <Temporary/>\n"),
                Temporary::Zero => x.push_str("      <TemporaryZero/>\n"),
                Temporary::ZeroSwap => x.push_str("      <TemporaryZeroSwap/>\n"),
            }
            x.push_str("    </Shot>\n");
        }
        x.push_str("  </Snapshots>\n</Virtuozzo_disk_image>\n");
        x
    }
}

/// The cluster sizes ploop accepts (its `Blocksize` of 64 to 131072
/// sectors): the one rule for every new image and disk directory.
pub const MIN_CLUSTER: u64 = 64 * SECTOR;
pub const MAX_CLUSTER: u64 = 131072 * SECTOR;

/// A cluster size ploop can describe, or an error that says which are.
pub fn check_cluster_size(bytes: u64) -> Result<()> {
    if !bytes.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&bytes) {
        return Err(Error::invalid(format!(
            "cluster size {bytes} bytes: the cluster size must be a power of two between 32K and 64M (ploop's range)"
        )));
    }
    Ok(())
}

fn check_blocksize(b: u64) -> Result<()> {
    if !b.is_power_of_two() || !(64..=131072).contains(&b) {
        return Err(Error::invalid(format!(
            "DiskDescriptor.xml: <Blocksize> {b} sectors is not a power of two between 64 and 131072 (32 KiB to 64 MiB clusters)"
        )));
    }
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_parse_and_print_as_ploop_writes_them() {
        let g: Guid = "{5FBAABE3-6958-40FF-92A7-860E329AAB41}".parse().unwrap();
        assert_eq!(g, TOP_GUID);
        assert_eq!(g.to_string(), "{5fbaabe3-6958-40ff-92a7-860e329aab41}");
        assert_eq!("5fbaabe3-6958-40ff-92a7-860e329aab41".parse::<Guid>().unwrap(), TOP_GUID);
        for bad in ["", "{}", "{5fbaabe3-6958-40ff-92a7-860e329aab41", "5fbaabe3695840ff92a7860e329aab41", "{zzzzzzzz-6958-40ff-92a7-860e329aab41}"] {
            assert!(bad.parse::<Guid>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn numbers_read_as_strtoul_base_0() {
        assert_eq!(parse_number(" 2048 ", "x").unwrap(), 2048);
        assert_eq!(parse_number("0x800", "x").unwrap(), 2048);
        assert_eq!(parse_number("04000", "x").unwrap(), 2048);
        assert_eq!(parse_number("0", "x").unwrap(), 0);
        assert!(parse_number("12ab", "x").is_err());
    }

    #[test]
    fn a_new_descriptor_round_trips() {
        let d = Descriptor::new(10 << 30, 1 << 20, "root.hds", ImageType::Compressed).unwrap();
        assert_eq!((d.size_sectors, d.cylinders, d.heads, d.sectors, d.blocksize_sectors), (20971520, 40960, 16, 32, 2048));
        let x = d.to_xml();
        assert_eq!(Descriptor::parse(&x).unwrap(), d);
        assert!(x.contains("<GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID>"));
        assert!(x.contains("<ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>"));
    }
}
