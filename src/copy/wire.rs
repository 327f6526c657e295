//! ploop copy's stream format, so that either end can be ploop's.
//!
//! A stream is a sequence of packets: a 24-byte header (`u32 marker,
//! u32 type, u32 size, u32 pad, u64 pos`, little-endian), then, once both
//! ends agreed on it, the MD5 of the payload, then `size` payload bytes.
//! Data packets carry disk bytes at `pos`; command packets carry a u32
//! command first. Over a two-way channel the receiver answers every
//! packet (but asynchronous data) with an i32 status, 0 for success.
//!
//! One-way streams (a file, a pipe) are ours alone (ploop's receiver needs
//! a socket): they always carry payload checksums, and the final packet
//! carries a trailer with the MD5 of everything before it (headers and
//! payload checksums; a payload is covered by its own checksum, so each
//! byte is hashed once), so that a cut or damaged stream, headers
//! included, is refused rather than half applied.

use std::io::{self, Read, Write};

use md5::{Digest, Md5};

use crate::error::{Error, Result};

pub const MARKER: u32 = 0x4cc0_ac3e;
/// ploop 1.x's stream (no packet types, no replies): recognised to refuse it.
pub const LEGACY_MARKER: u32 = 0x4cc0_ac3d;
pub const HEADER_LEN: usize = 24;
pub const DIGEST_LEN: usize = 16;
/// Largest payload accepted: a cluster of ploop's largest (and the INIT
/// command's odd size, a cluster's sector count, stays far below).
pub const MAX_PAYLOAD: u32 = 64 << 20;

/// How much of a payload is read (and so allocated) at a time.
const PAYLOAD_STEP: usize = 1 << 20;

/// Handshake flags (the SYNC command's `pos`).
pub const FLAG_MD5: u64 = 1;
pub const FLAG_COPY_DEVICE: u64 = 2;

/// Commands, the first u32 of a command packet.
pub mod cmd {
    pub const SYNC: u32 = 0;
    pub const FINISH: u32 = 1;
    pub const INIT_PLOOP: u32 = 2;
    pub const INIT_QCOW: u32 = 3;
    pub const MOUNT: u32 = 4;
    pub const UMOUNT: u32 = 5;
}

/// What a one-way stream's FINISH carries after the command: this magic
/// and the MD5 of every stream byte before the FINISH packet.
pub const TRAILER_MAGIC: &[u8; 8] = b"UPLOOPS1";
pub const TRAILER_LEN: usize = 4 + 8 + DIGEST_LEN;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Image-file bytes at a file offset (ploop 7's copy of the top delta).
    Data,
    Cmd,
    /// As `Data`, unanswered.
    DataAsync,
    /// Disk bytes at a disk offset (ploop 9's copy of the device).
    DataDevice,
    /// A changed-block record.
    DataCbt,
}

impl Kind {
    pub fn code(self) -> u32 {
        match self {
            Kind::Data => 0,
            Kind::Cmd => 1,
            Kind::DataAsync => 2,
            Kind::DataDevice => 3,
            Kind::DataCbt => 4,
        }
    }
    pub fn from_code(code: u32) -> Option<Kind> {
        Some(match code {
            0 => Kind::Data,
            1 => Kind::Cmd,
            2 => Kind::DataAsync,
            3 => Kind::DataDevice,
            4 => Kind::DataCbt,
            _ => return None,
        })
    }
    /// Whether the receiver answers it on a two-way channel.
    pub fn answered(self) -> bool {
        self != Kind::DataAsync
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub size: u32,
    pub pos: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MARKER.to_le_bytes());
        b[4..8].copy_from_slice(&self.kind.code().to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.pos.to_le_bytes());
        b
    }

    /// Parse a header; `at` (the stream offset) is for the message.
    pub fn decode(b: &[u8; HEADER_LEN], at: u64) -> Result<Header> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        match u32_at(0) {
            MARKER => {}
            LEGACY_MARKER => {
                return Err(Error::unsupported("this is ploop 1.x's copy stream, which is not supported; send it with a newer ploop"))
            }
            m => return Err(bad(format!("no packet marker at stream offset {at} (found {m:#010x}): not a ploop copy stream, or damaged"))),
        }
        let kind = Kind::from_code(u32_at(4)).ok_or_else(|| bad(format!("unknown packet type {} at stream offset {at}", u32_at(4))))?;
        let size = u32_at(8);
        if size > MAX_PAYLOAD {
            return Err(bad(format!("packet at stream offset {at} claims {size} bytes (at most {MAX_PAYLOAD})")));
        }
        Ok(Header { kind, size, pos: u64::from_le_bytes(b[16..24].try_into().unwrap()) })
    }
}

/// A damaged or malformed stream.
pub fn bad(msg: impl std::fmt::Display) -> Error {
    Error::new(libc::EBADMSG, format!("copy stream: {msg}"))
}

/// Writes packets, keeping the running digest of the stream.
pub struct Writer<W: Write> {
    inner: W,
    md5: bool,
    stream: Md5,
    written: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(inner: W) -> Writer<W> {
        Writer { inner, md5: false, stream: Md5::new(), written: 0 }
    }

    /// Payload checksums from the next packet on.
    pub fn set_md5(&mut self, on: bool) {
        self.md5 = on;
    }

    pub fn md5(&self) -> bool {
        self.md5
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Write bytes; `digest` says whether the stream digest covers them.
    fn put(&mut self, bytes: &[u8], digest: bool) -> io::Result<()> {
        self.inner.write_all(bytes)?;
        if digest {
            self.stream.update(bytes);
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    pub fn packet(&mut self, kind: Kind, pos: u64, payload: &[u8]) -> io::Result<()> {
        self.packet_with_digest(kind, pos, payload, None)
    }

    /// The same with the payload's MD5 computed already (by another thread).
    pub fn packet_with_digest(&mut self, kind: Kind, pos: u64, payload: &[u8], digest: Option<[u8; DIGEST_LEN]>) -> io::Result<()> {
        let size = u32::try_from(payload.len()).ok().filter(|&s| s <= MAX_PAYLOAD).ok_or_else(|| io::Error::from_raw_os_error(libc::EMSGSIZE))?;
        self.put(&Header { kind, size, pos }.encode(), true)?;
        if self.md5 {
            let digest = digest.unwrap_or_else(|| Md5::digest(payload).into());
            self.put(&digest, true)?;
        }
        self.put(payload, !self.md5)
    }

    /// A command packet whose payload is the command and `extra` after it.
    pub fn command(&mut self, command: u32, pos: u64, extra: &[u8]) -> io::Result<()> {
        let mut payload = Vec::with_capacity(4 + extra.len());
        payload.extend_from_slice(&command.to_le_bytes());
        payload.extend_from_slice(extra);
        self.packet(Kind::Cmd, pos, &payload)
    }

    /// The FINISH command; with `trailer`, the stream's digest in it.
    pub fn finish(&mut self, trailer: bool) -> io::Result<()> {
        let mut extra = Vec::new();
        if trailer {
            extra.extend_from_slice(TRAILER_MAGIC);
            extra.extend_from_slice(&self.stream.clone().finalize());
        }
        self.command(cmd::FINISH, 0, &extra)?;
        self.inner.flush()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

/// Reads packets, checking marker, size, payload checksum and (for the
/// final packet of a one-way stream) the stream's digest.
pub struct Reader<R: Read> {
    inner: R,
    md5: bool,
    stream: Md5,
    read: u64,
    /// The stream digest up to the start of the last packet read.
    before_last: [u8; DIGEST_LEN],
    /// The last header as read.
    last_header: [u8; HEADER_LEN],
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R) -> Reader<R> {
        Reader { inner, md5: false, stream: Md5::new(), read: 0, before_last: [0; DIGEST_LEN], last_header: [0; HEADER_LEN] }
    }

    pub fn set_md5(&mut self, on: bool) {
        self.md5 = on;
    }

    pub fn md5(&self) -> bool {
        self.md5
    }

    /// Stream bytes read so far.
    pub fn offset(&self) -> u64 {
        self.read
    }

    /// Fill `buf`; false if the stream ended before its first byte. The
    /// stream digest covers it unless it is a checksummed payload.
    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 && what == "header" => return Ok(false),
                Ok(0) => {
                    return Err(bad(format!(
                        "the stream ends inside a packet's {what} at offset {} (cut off?)",
                        self.read + got as u64
                    )))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A read timeout on the channel: the sender went silent.
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(Error::new(
                        libc::ETIMEDOUT,
                        format!("copy stream: the sender went silent at offset {} ({e}); giving up", self.read + got as u64),
                    ))
                }
                Err(e) => return Err(Error::io(e, "reading the copy stream")),
            }
        }
        if !(what == "payload" && self.md5) {
            self.stream.update(&*buf);
        }
        self.read += buf.len() as u64;
        Ok(true)
    }

    /// The next packet, its payload in `payload`; None where the stream
    /// ends between packets.
    pub fn next(&mut self, payload: &mut Vec<u8>) -> Result<Option<Header>> {
        self.before_last = self.stream.clone().finalize().into();
        let at = self.read;
        let mut hb = [0u8; HEADER_LEN];
        if !self.fill(&mut hb, "header")? {
            return Ok(None);
        }
        let header = Header::decode(&hb, at)?;
        self.last_header = hb;
        let mut digest = [0u8; DIGEST_LEN];
        if self.md5 {
            self.fill(&mut digest, "checksum")?;
        }
        // The payload grows as its bytes arrive, not by what the header
        // claims: a stream that stops short costs no more than it sent.
        payload.clear();
        let want = header.size as usize;
        while payload.len() < want {
            let at = payload.len();
            payload.resize(at + (want - at).min(PAYLOAD_STEP), 0);
            self.fill(&mut payload[at..], "payload")?;
        }
        if self.md5 {
            let actual: [u8; DIGEST_LEN] = Md5::digest(&payload[..]).into();
            if actual != digest {
                return Err(bad(format!("the payload of the packet at stream offset {at} does not match its checksum (damaged)")));
            }
        }
        Ok(Some(header))
    }

    /// Check a FINISH payload's trailer against the stream read before it;
    /// false if it has none.
    pub fn check_trailer(&self, finish_payload: &[u8]) -> Result<bool> {
        if finish_payload.len() < TRAILER_LEN || &finish_payload[4..12] != TRAILER_MAGIC {
            return Ok(false);
        }
        // The trailer covers what came before; the FINISH header itself
        // must be exactly what the writer makes.
        if finish_payload[12..TRAILER_LEN] != self.before_last || self.last_header[12..24] != [0; 12] {
            return Err(bad("the stream's digest does not match its content (damaged)"));
        }
        Ok(true)
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// The command of a command packet.
pub fn command_of(payload: &[u8]) -> Result<u32> {
    payload.get(..4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).ok_or_else(|| bad("a command packet without a command"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new());
        w.command(cmd::SYNC, FLAG_MD5, &[]).unwrap();
        w.set_md5(true);
        w.command(cmd::INIT_PLOOP, 2048, &[0; 2044]).unwrap();
        w.packet(Kind::DataDevice, 1 << 20, &[7u8; 4096]).unwrap();
        w.finish(true).unwrap();
        w.get_mut().clone()
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Header>> {
        let mut r = Reader::new(bytes);
        let mut out = Vec::new();
        let mut payload = Vec::new();
        while let Some(h) = r.next(&mut payload)? {
            out.push(h);
            if h.kind == Kind::Cmd && command_of(&payload)? == cmd::SYNC && out.len() == 1 {
                r.set_md5(h.pos & FLAG_MD5 != 0);
            }
            if h.kind == Kind::Cmd && command_of(&payload)? == cmd::FINISH && !r.check_trailer(&payload)? {
                return Err(bad("no trailer"));
            }
        }
        Ok(out)
    }

    #[test]
    fn header_layout_is_ploops() {
        let b = Header { kind: Kind::DataDevice, size: 0x1000, pos: 0x0102_0304_0506_0708 }.encode();
        assert_eq!(&b[0..4], &[0x3e, 0xac, 0xc0, 0x4c]);
        assert_eq!(&b[4..8], &[3, 0, 0, 0]);
        assert_eq!(&b[8..12], &[0, 0x10, 0, 0]);
        assert_eq!(&b[12..16], &[0; 4]);
        assert_eq!(&b[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
    }

    #[test]
    fn roundtrip_and_every_damage_refused() {
        let s = sample();
        let headers = read_all(&s).unwrap();
        assert_eq!(headers.len(), 4);
        assert_eq!(headers[2], Header { kind: Kind::DataDevice, size: 4096, pos: 1 << 20 });
        // Every cut short of the whole stream fails or misses the end.
        for cut in [1, 23, 24, 30, 60, s.len() / 2, s.len() - 1] {
            match read_all(&s[..cut]) {
                Err(_) => {}
                Ok(h) => assert!(h.len() < 4, "cut at {cut} read as whole"),
            }
        }
        // Every single flipped byte is refused (headers included).
        for i in 0..s.len() {
            let mut d = s.clone();
            d[i] ^= 0x40;
            assert!(read_all(&d).is_err(), "flipped byte {i} of {} went unnoticed", s.len());
        }
    }

    #[test]
    fn refuses_legacy_and_huge_packets() {
        let mut b = Header { kind: Kind::Data, size: 0, pos: 0 }.encode();
        b[0..4].copy_from_slice(&LEGACY_MARKER.to_le_bytes());
        assert!(Header::decode(&b, 0).unwrap_err().to_string().contains("1.x"));
        let b = Header { kind: Kind::Data, size: MAX_PAYLOAD + 1, pos: 0 }.encode();
        assert!(Header::decode(&b, 0).is_err());
    }
}
