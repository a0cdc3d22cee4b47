//! The tar framing of a bundle: ustar headers (PAX records for long paths), written and parsed here
//! and nowhere else.
//!
//! We write our own headers rather than use the `tar` crate's builder because a streamed payload's
//! size (and a layer's name, its digest) is only known after it has been written: the writer leaves
//! a 512-byte header, streams the data, then seeks back and patches the header. Sizes past the
//! 11-digit octal limit (8 GiB) use the base-256 form GNU tar and bsdtar read.

pub const BLOCK: u64 = 512;

/// Bytes of zero padding after `size` bytes of entry data.
pub fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn put_octal(field: &mut [u8], value: u64) {
    // Width-1 octal digits then NUL, zero-padded, as GNU tar writes them.
    let width = field.len() - 1;
    let s = format!("{value:0width$o}");
    field[..width].copy_from_slice(s.as_bytes());
    field[width] = 0;
}

fn put_size(field: &mut [u8; 12], size: u64) {
    if size < (1u64 << 33) {
        put_octal(field, size);
    } else {
        // base-256: high bit of the first byte set, big-endian value in the rest.
        field.fill(0);
        field[0] = 0x80;
        field[4..].copy_from_slice(&size.to_be_bytes());
    }
}

/// Split a path into ustar (prefix, name), or None when it needs a PAX record.
fn split_ustar(path: &str) -> Option<(&str, &str)> {
    if path.len() <= 100 {
        return Some(("", path));
    }
    if path.len() > 256 {
        return None;
    }
    // The prefix ends at a '/', at most 155 bytes; the rest at most 100.
    for (i, b) in path.bytes().enumerate() {
        if b == b'/' && i <= 155 && path.len() - i - 1 <= 100 && i > 0 {
            return Some((&path[..i], &path[i + 1..]));
        }
    }
    None
}

/// True when `path` fits a plain ustar header (no PAX record), which patchable entries require.
pub fn fits_ustar(path: &str) -> bool {
    split_ustar(path).is_some()
}

fn raw_header(name: &str, prefix: &str, mode: u32, size: u64, mtime: u64, typeflag: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    put_octal(&mut h[100..108], mode as u64);
    put_octal(&mut h[108..116], 0);
    put_octal(&mut h[116..124], 0);
    let mut size_field = [0u8; 12];
    put_size(&mut size_field, size);
    h[124..136].copy_from_slice(&size_field);
    put_octal(&mut h[136..148], mtime);
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    set_checksum(&mut h);
    h
}

fn set_checksum(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| b as u64).sum();
    // Six octal digits, NUL, space: the traditional layout every tar accepts.
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

/// The header block(s) for a regular file: one ustar block, or a PAX record then the block.
pub fn file_header(path: &str, mode: u32, size: u64, mtime: u64) -> Vec<u8> {
    match split_ustar(path) {
        Some((prefix, name)) => raw_header(name, prefix, mode, size, mtime, b'0').to_vec(),
        None => {
            let record = pax_record("path", path);
            let mut out = raw_header("././@PaxHeader", "", 0o644, record.len() as u64, mtime, b'x').to_vec();
            out.extend_from_slice(&record);
            out.resize(out.len() + padding(record.len() as u64) as usize, 0);
            // The ustar name is a truncated stand-in; readers take the PAX path.
            let short: String = path
                .chars()
                .rev()
                .take(99)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let short = short.trim_start_matches('/');
            out.extend_from_slice(&raw_header(short, "", mode, size, mtime, b'0'));
            out
        }
    }
}

fn pax_record(key: &str, value: &str) -> Vec<u8> {
    // "<len> <key>=<value>\n" where len counts itself.
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    loop {
        let candidate = len.to_string().len() + body.len();
        if candidate == len {
            break;
        }
        len = candidate;
    }
    format!("{len}{body}").into_bytes()
}

/// What a parsed header block says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub mode: u32,
    pub size: u64,
    pub typeflag: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("header checksum mismatch: the field records {recorded}, the header's bytes sum to {computed}")]
    Checksum { recorded: u64, computed: u64 },
    /// The sum is right but the field is not spelled as bkbundle writes it ("NNNNNN\0 ").
    #[error(
        "header checksum field reads {found}, expected {expected} (the digits match; a byte after them was altered)"
    )]
    ChecksumField { found: String, expected: String },
    #[error("unreadable numeric field `{field}` in tar header: {found}")]
    Number { field: &'static str, found: String },
    #[error("numeric field `{field}` in tar header holds a base-256 number of more than 64 bits")]
    TooLarge { field: &'static str },
    #[error("numeric field `{field}` in tar header holds a negative base-256 number")]
    Negative { field: &'static str },
    #[error("the entry name is not UTF-8")]
    Name,
}

pub fn is_zero_block(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Bytes as a quoted string with `\0` and `\xNN` escapes, for messages.
pub fn escaped(b: &[u8]) -> String {
    let mut s = String::from("\"");
    for &c in b {
        match c {
            0 => s.push_str("\\0"),
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s.push('"');
    s
}

fn parse_octal(field: &[u8], name: &'static str) -> Result<u64, HeaderError> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // Base-256 (GNU): the rest of the first byte and the following bytes, big-endian; a set
        // 0x40 bit marks a negative number. Every bit must fit in 64: none is silently dropped.
        if field[0] & 0x40 != 0 {
            return Err(HeaderError::Negative { field: name });
        }
        let mut v: u64 = (field[0] & 0x3f) as u64;
        for &b in &field[1..] {
            if v >> 56 != 0 {
                return Err(HeaderError::TooLarge { field: name });
            }
            v = (v << 8) | b as u64;
        }
        return Ok(v);
    }
    let bad = || HeaderError::Number {
        field: name,
        found: escaped(field),
    };
    let s: Vec<u8> = field.iter().copied().take_while(|&b| b != 0).collect();
    let s = std::str::from_utf8(&s).map_err(|_| bad())?;
    let s = s.trim();
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|_| bad())
}

fn cstr(field: &[u8]) -> Result<String, HeaderError> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8(field[..end].to_vec()).map_err(|_| HeaderError::Name)
}

/// Parse one 512-byte header block, checking its checksum.
pub fn parse_header(h: &[u8; 512]) -> Result<Header, HeaderError> {
    let recorded = parse_octal(&h[148..156], "chksum")?;
    let computed: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| if (148..156).contains(&i) { b' ' as u64 } else { b as u64 })
        .sum();
    // Strict: the field must read exactly as written ("NNNNNN\0 "), so that a flipped byte after
    // the digits (which a lenient parser ignores) is caught too. Bundles are only ever written by
    // bkbundle, so no other tar's spelling needs accepting.
    if recorded != computed {
        return Err(HeaderError::Checksum { recorded, computed });
    }
    let expected = format!("{computed:06o}\0 ");
    if h[148..156] != *expected.as_bytes() {
        return Err(HeaderError::ChecksumField {
            found: escaped(&h[148..156]),
            expected: escaped(expected.as_bytes()),
        });
    }
    let name = cstr(&h[..100])?;
    let prefix = if &h[257..262] == b"ustar" {
        cstr(&h[345..500])?
    } else {
        String::new()
    };
    let name = if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    };
    Ok(Header {
        name,
        mode: u32::try_from(parse_octal(&h[100..108], "mode")?).map_err(|_| HeaderError::TooLarge { field: "mode" })?,
        size: parse_octal(&h[124..136], "size")?,
        typeflag: h[156],
    })
}

/// The name a (possibly damaged) header block claims, for messages: prefix and name, lossy,
/// with unprintable bytes escaped; None when the name field is empty.
pub fn claimed_name(h: &[u8; 512]) -> Option<String> {
    let field = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        b[..end].to_vec()
    };
    let name = field(&h[..100]);
    if name.is_empty() {
        return None;
    }
    let prefix = if &h[257..262] == b"ustar" {
        field(&h[345..500])
    } else {
        Vec::new()
    };
    let mut full = prefix;
    if !full.is_empty() {
        full.push(b'/');
    }
    full.extend_from_slice(&name);
    let quoted = escaped(&full);
    Some(quoted[1..quoted.len() - 1].to_string())
}

/// Extract the `path` value from a PAX extended header's data, if present.
pub fn pax_path(data: &[u8]) -> Option<String> {
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len == 0 || len > rest.len() {
            return None;
        }
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(v) = rec.strip_prefix(b"path=") {
            return String::from_utf8(v.to_vec()).ok();
        }
        rest = &rest[len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = file_header("images/layers/abc.tar.zst", 0o644, 12345, 1_700_000_000);
        assert_eq!(h.len(), 512);
        let p = parse_header(h[..512].try_into().unwrap()).unwrap();
        assert_eq!(
            p,
            Header {
                name: "images/layers/abc.tar.zst".into(),
                mode: 0o644,
                size: 12345,
                typeflag: b'0'
            }
        );
    }

    #[test]
    fn big_sizes_use_base256() {
        let size = 20u64 << 30;
        let h = file_header("x", 0o644, size, 0);
        assert_eq!(parse_header(h[..512].try_into().unwrap()).unwrap().size, size);
    }

    #[test]
    fn long_paths_use_prefix_then_pax() {
        let mid = format!("stack/{}/{}", "d".repeat(120), "f".repeat(50));
        let h = file_header(&mid, 0o644, 1, 0);
        assert_eq!(h.len(), 512);
        assert_eq!(parse_header(h[..512].try_into().unwrap()).unwrap().name, mid);

        let long = format!("stack/{}", "x".repeat(300));
        let h = file_header(&long, 0o644, 1, 0);
        let pax = parse_header(h[..512].try_into().unwrap()).unwrap();
        assert_eq!(pax.typeflag, b'x');
        let data = &h[512..512 + pax.size as usize];
        assert_eq!(pax_path(data).as_deref(), Some(long.as_str()));
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let mut h: [u8; 512] = file_header("bundle.toml", 0o644, 10, 0)[..512].try_into().unwrap();
        h[3] ^= 0x01;
        assert!(matches!(parse_header(&h), Err(HeaderError::Checksum { .. })));
        // Every single byte of a header matters, the checksum field's own padding included.
        let good: [u8; 512] = file_header("bundle.toml", 0o644, 10, 0)[..512].try_into().unwrap();
        for i in 0..512 {
            let mut h = good;
            h[i] ^= 0x20;
            assert!(
                parse_header(&h).is_err() || parse_header(&h) != parse_header(&good),
                "byte {i}"
            );
        }
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let r = pax_record("path", "a");
        assert_eq!(r, b"9 path=a\n");
        let r = pax_record("path", &"y".repeat(95));
        assert_eq!(
            String::from_utf8(r.clone())
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap(),
            r.len()
        );
    }

    /// Recompute a header's checksum as bkbundle writes it, after a test edited the block.
    fn fix_checksum(h: &mut [u8; 512]) {
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| b as u64).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    #[test]
    fn base256_numbers_beyond_64_bits_or_negative_are_refused() {
        let good: [u8; 512] = file_header("x", 0o644, 10, 0)[..512].try_into().unwrap();
        // 2^80 + 10: the bit above 64 used to be dropped, leaving a plausible size of 10.
        let mut h = good;
        h[124..136].copy_from_slice(&[0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10]);
        fix_checksum(&mut h);
        let e = parse_header(&h).unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        // A negative base-256 number (0xff prefix) is no size either.
        let mut h = good;
        h[124..136].copy_from_slice(&[0xff; 12]);
        fix_checksum(&mut h);
        assert!(parse_header(&h).is_err());
        // The largest value that fits is read exactly.
        let mut h = good;
        h[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        fix_checksum(&mut h);
        assert_eq!(parse_header(&h).unwrap().size, u64::MAX);
    }

    #[test]
    fn a_flipped_checksum_trailer_shows_the_field_as_found_and_expected() {
        let mut h: [u8; 512] = file_header("bundle.toml", 0o644, 10, 0)[..512].try_into().unwrap();
        h[155] = b'!';
        let e = parse_header(&h).unwrap_err().to_string();
        assert!(e.contains(r#"\0!""#), "{e}");
        assert!(e.contains(r#"\0 ""#), "{e}");
        assert!(!e.contains("recorded"), "{e}");
    }
}
