//! Human sizes on the command line: `10G`, `512K`, `1048576`.

use crate::error::{Error, Result};

/// What `parse_size` accepts after the number, for messages.
pub const SUFFIXES: &str = "K, M, G, T, P, E (powers of 1024, optionally followed by B or iB), or S (512-byte sectors)";

/// Parse a byte count with an optional binary suffix (K, M, G, T, P, E; an
/// optional trailing `B` or `iB` is accepted; S counts 512-byte sectors).
/// Overflow is an error, not a wrap.
pub fn parse_size(text: &str) -> Result<u64> {
    let s = text.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits_end == 0 {
        return Err(Error::invalid(format!("bad size '{text}': expected a number with an optional suffix: {SUFFIXES}")));
    }
    let number: u64 = s[..digits_end]
        .parse()
        .map_err(|_| Error::invalid(format!("bad size '{text}': number too large")))?;
    let suffix = s[digits_end..].trim().to_ascii_uppercase();
    let shift = match suffix.as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        "E" | "EB" | "EIB" => 60,
        "S" => 9, // 512-byte sectors, as qemu-img accepts
        _ => return Err(Error::invalid(format!("bad size '{text}': unknown suffix '{}' (use {SUFFIXES})", s[digits_end..].trim()))),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| Error::invalid(format!("bad size '{text}': too large (at most 16E - 1 bytes)")))
}

/// The reverse, for messages: the largest exact binary unit.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 6] = [("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)];
    for (unit, shift) in UNITS {
        if bytes >= (1u64 << shift) && bytes % (1u64 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1K").unwrap(), 1024);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        assert_eq!(parse_size("3s").unwrap(), 1536);
        assert_eq!(parse_size("1E").unwrap(), 1 << 60);
        assert_eq!(parse_size("15EiB").unwrap(), 15 << 60);
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999P").is_err());
        assert!(parse_size("16E").is_err());
        assert!(parse_size("184467440737095516160").is_err());
    }

    #[test]
    fn formats_exact_units() {
        assert_eq!(format_size(1 << 20), "1M");
        assert_eq!(format_size(1536), "1536");
        assert_eq!(format_size(3 << 30), "3G");
    }
}
