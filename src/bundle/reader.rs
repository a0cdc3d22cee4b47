//! Reads a bundle: finds its parts, walks the tar headers (seeking over the data) to build an
//! index of entries, and hands out readers over any entry without extracting anything.
//!
//! Opening checks the framing completely: every header's checksum, every entry inside the file,
//! zero padding, the end-of-archive blocks and nothing after them. Content is checked against the
//! manifest by [`super::verified`]: commands get a bundle only through
//! [`super::open_verified`], so this index and its unchecked readers stay inside `bundle/`.

use super::parts::{PartSource, RangeReader};
use super::tarfmt::{self, BLOCK};
use crate::error::{Error, Result};
use crate::manifest::is_safe_bundle_path;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    /// Offset of the entry's data in the bundle's byte stream.
    pub offset: u64,
    pub size: u64,
    pub mode: u32,
}

pub struct BundleReader {
    src: PartSource,
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

/// A size no real entry has (1 PiB): beyond it a header is damaged or crafted, not cut short.
/// Smaller sizes beyond the file's end are refused as a truncated bundle.
const CRAFTED_SIZE: u64 = 1 << 50;

/// Cap on descriptive files read whole into memory (the manifest of the largest real bundle is
/// tens of KiB).
const SMALL_LIMIT: u64 = 16 << 20;

impl BundleReader {
    pub fn open(path: &Path) -> Result<BundleReader> {
        let src = PartSource::open(path)?;
        let (entries, index) = scan(&src)?;
        Ok(BundleReader { src, entries, index })
    }

    pub fn entry(&self, path: &str) -> Option<&Entry> {
        self.index.get(path).map(|&i| &self.entries[i])
    }

    /// Every regular file of the archive, in archive order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The bundle's length in bytes (all parts).
    pub fn len(&self) -> u64 {
        self.src.len
    }

    /// Whether the bundle has no bytes (never true of an opened one: opening refuses that).
    pub fn is_empty(&self) -> bool {
        self.src.len == 0
    }

    /// How many files the bundle is (1, or its numbered parts).
    pub fn parts(&self) -> usize {
        self.src.parts.len()
    }

    /// Human name of the bundle for messages: the single file or its first part and the count.
    pub fn display_name(&self) -> String {
        self.src.display_name()
    }

    /// An unchecked reader over an entry's bytes: for `verified` only, which checks them.
    pub(super) fn reader(&self, e: &Entry) -> RangeReader<'_> {
        self.src.range(e.offset, e.size)
    }

    /// Read a small descriptive file whole (unchecked: `verified` checks it).
    pub(super) fn read_small(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let Some(e) = self.entry(path) else {
            return Ok(None);
        };
        if e.size > SMALL_LIMIT {
            return Err(Error::bundle(format!(
                "{path} in {} is {} bytes, more than the {SMALL_LIMIT} a descriptive file may have",
                self.src.display_name(),
                e.size
            )));
        }
        let mut buf = vec![0u8; e.size as usize];
        self.src
            .read_exact_at(e.offset, &mut buf)
            .map_err(|err| Error::io("cannot read", self.src.part_at(e.offset), err))?;
        Ok(Some(buf))
    }

    /// Parse the archive's manifest (`bundle.toml`, or a backup's `backup.toml`; format checked
    /// first); its bytes too.
    pub(super) fn document<D: super::verified::Document>(&self) -> Result<(D, Vec<u8>)> {
        let name = self.src.display_name();
        let (path, kind) = (D::MANIFEST, D::KIND);
        let bytes = self.read_small(path)?.ok_or_else(|| {
            Error::bundle(format!(
                "{name} has no {path}: it is not a bkbundle {kind}, or it was cut short"
            ))
            .hint(format!(
                "check the file is the {kind} (or its first part) and copy it again if it was truncated"
            ))
        })?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| Error::bundle(format!("{name}: {path} is not UTF-8 text: the {kind} is damaged")))?;
        let m = D::parse(text, &format!("{name}: {path}"))?;
        Ok((m, bytes))
    }
}

fn damaged(src: &PartSource, at: u64, what: String) -> Error {
    Error::bundle(format!(
        "{}: {what} (at byte {at}, in {})",
        src.display_name(),
        src.part_at(at.min(src.len.saturating_sub(1))).display()
    ))
    .hint("the bundle is damaged: copy it again from the original media and re-run `bkbundle verify`")
}

fn truncated(src: &PartSource, what: String) -> Error {
    let next = if src.parts.len() > 1 || src.parts[0].0.to_string_lossy().ends_with(".001") {
        let base = src.parts[0].0.to_string_lossy().trim_end_matches(".001").to_string();
        format!(", or its next part {}.{:03} is missing", base, src.parts.len() + 1)
    } else {
        String::new()
    };
    Error::bundle(format!("{}: {what}: the bundle is truncated{next}", src.display_name()))
        .hint("copy the bundle (every part) again from the original media and re-run `bkbundle verify`")
}

/// What a file starting with `head` is, when it is a known format that is not a tar.
fn sniff(head: &[u8]) -> Option<(&'static str, &'static str)> {
    const KNOWN: [(&[u8], &str, &str); 7] = [
        (&[0x1f, 0x8b], "gzip-compressed file", "gunzip -k FILE"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd-compressed file", "zstd -d FILE"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz-compressed file", "xz -dk FILE"),
        (b"BZh", "bzip2-compressed file", "bunzip2 -k FILE"),
        (b"PK\x03\x04", "zip archive", "unzip FILE"),
        (b"PK\x05\x06", "zip archive (empty)", "unzip FILE"),
        (&[b'7', b'z', 0xbc, 0xaf, 0x27, 0x1c], "7-zip archive", "7z x FILE"),
    ];
    KNOWN
        .iter()
        .find(|(magic, _, _)| head.starts_with(magic))
        .map(|(_, what, how)| (*what, *how))
}

/// Where a damaged header sits, for messages: after which entry, and what it claims to be.
fn around(prev: &Option<String>, block: &[u8; 512]) -> String {
    let before = match prev {
        Some(p) => format!("after entry {p}"),
        None => "at the start of the archive".to_string(),
    };
    match tarfmt::claimed_name(block) {
        Some(n) => format!("{before}; the damaged header names entry {n}"),
        None => before,
    }
}

fn scan(src: &PartSource) -> Result<(Vec<Entry>, HashMap<String, usize>)> {
    let mut entries = Vec::new();
    let mut index = HashMap::new();
    let mut pos = 0u64;
    let mut pax_path: Option<String> = None;
    // The last entry read (whatever its type), to say where damage is.
    let mut prev: Option<String> = None;
    let mut block = [0u8; 512];
    check_is_tar(src)?;
    loop {
        let block_end = pos.checked_add(BLOCK).filter(|&e| e <= src.len);
        let Some(data) = block_end else {
            return Err(truncated(
                src,
                format!(
                    "the archive ends at byte {} without its end marker{}",
                    src.len,
                    prev.as_ref().map(|p| format!(" (last entry {p})")).unwrap_or_default()
                ),
            ));
        };
        read_at(src, pos, &mut block)?;
        if tarfmt::is_zero_block(&block) {
            check_end_of_archive(src, pos, data, &prev)?;
            break;
        }
        let h = tarfmt::parse_header(&block)
            .map_err(|e| damaged(src, pos, format!("bad tar header {}: {e}", around(&prev, &block))))?;
        let name = pax_path.take().unwrap_or(h.name.clone());
        let end = entry_end(src, pos, data, &h, &name)?;
        match h.typeflag {
            b'x' => pax_path = pax_record(src, pos, data, &h, &prev, &block)?,
            b'g' | b'5' => {}
            b'0' | 0 => {
                let entry = file_entry(src, pos, data, &h, &name)?;
                if index.insert(entry.path.clone(), entries.len()).is_some() {
                    return Err(damaged(src, pos, format!("entry {} appears twice", entry.path)));
                }
                entries.push(entry);
            }
            t => {
                return Err(damaged(
                    src,
                    pos,
                    format!(
                        "entry {name} has type {:?}; a bundle holds regular files only",
                        t as char
                    ),
                ));
            }
        }
        prev = Some(match (h.typeflag, &pax_path) {
            (b'x', Some(p)) => format!("{p}'s PAX record"),
            (b'x', None) => format!("{name} (a PAX record)"),
            _ => name,
        });
        // `end` is at least one block past `pos`: the scan always advances.
        debug_assert!(end > pos);
        pos = end;
    }
    Ok((entries, index))
}

/// `buf.len()` bytes of the bundle from `at`, a failure naming the part that holds them.
fn read_at(src: &PartSource, at: u64, buf: &mut [u8]) -> Result<()> {
    src.read_exact_at(at, buf)
        .map_err(|e| Error::io("cannot read", src.part_at(at), e))
}

/// Not a tar at all (empty, or a known compressed or archive format): say what it is rather
/// than "bad tar header".
fn check_is_tar(src: &PartSource) -> Result<()> {
    if src.len == 0 {
        return Err(
            Error::bundle(format!("{} is empty (0 bytes): it is not a bundle", src.display_name()))
                .hint("copy the bundle again from the original media; `bkbundle pack` writes it"),
        );
    }
    let mut head = [0u8; 8];
    let n = (src.len as usize).min(head.len());
    read_at(src, 0, &mut head[..n])?;
    if let Some((what, how)) = sniff(&head[..n]) {
        return Err(Error::bundle(format!(
            "{} is a {what}, not a bkbundle bundle (a bundle is a plain, uncompressed tar written by `bkbundle pack`)",
            src.display_name()
        ))
        .hint(format!(
            "if the bundle was compressed or archived for transport, unpack it first (`{how}`) and give the .bkb file; otherwise give the .bkb file itself"
        )));
    }
    Ok(())
}

/// End of archive at the zero block at `pos`: a second zero block, then nothing but zeros, so
/// bytes appended to a bundle are found.
fn check_end_of_archive(src: &PartSource, pos: u64, data: u64, prev: &Option<String>) -> Result<()> {
    if data + BLOCK > src.len {
        return Err(truncated(src, "the end-of-archive marker is cut short".into()));
    }
    let mut rest = vec![0u8; (src.len - pos).min(1 << 20) as usize];
    let mut at = pos;
    while at < src.len {
        let n = ((src.len - at) as usize).min(rest.len());
        read_at(src, at, &mut rest[..n])?;
        if let Some(i) = rest[..n].iter().position(|&b| b != 0) {
            return Err(damaged(
                src,
                at + i as u64,
                format!(
                    "unexpected bytes after the end of the archive{}",
                    prev.as_ref().map(|p| format!(" (last entry {p})")).unwrap_or_default()
                ),
            ));
        }
        at += n as u64;
    }
    Ok(())
}

/// Where the entry whose header is at `pos` (data at `data`) ends, its size checked against the
/// bundle's and its padding checked to be zeros.
fn entry_end(src: &PartSource, pos: u64, data: u64, h: &tarfmt::Header, name: &str) -> Result<u64> {
    // Every size and offset read from the archive is checked: a size beyond the file's end is
    // refused before any arithmetic on it, so the scan always advances and never wraps.
    let remaining = src.len - data;
    if h.size > CRAFTED_SIZE {
        return Err(damaged(
            src,
            pos,
            format!(
                "entry {name} has a size field of {} bytes, more than any bundle holds (this one has {} bytes): the header is damaged or crafted",
                h.size, src.len
            ),
        ));
    }
    let pad = tarfmt::padding(h.size);
    let end = match h.size.checked_add(pad).filter(|&n| n <= remaining) {
        Some(n) => data + n,
        None => {
            return Err(truncated(
                src,
                format!(
                    "entry {name} needs {} bytes (size field) from byte {data} but the bundle ends at byte {}",
                    h.size, src.len
                ),
            ))
        }
    };
    // Padding must be zeros: a flipped byte there changes nothing else we could detect.
    if pad > 0 {
        let mut p = [0u8; 512];
        read_at(src, data + h.size, &mut p[..pad as usize])?;
        if let Some(i) = p[..pad as usize].iter().position(|&b| b != 0) {
            return Err(damaged(
                src,
                data + h.size + i as u64,
                format!("non-zero padding after entry {name}"),
            ));
        }
    }
    Ok(end)
}

/// The path a PAX extended header gives the next entry, its size bounded first.
fn pax_record(
    src: &PartSource,
    pos: u64,
    data: u64,
    h: &tarfmt::Header,
    prev: &Option<String>,
    block: &[u8; 512],
) -> Result<Option<String>> {
    if h.size > 64 << 10 {
        return Err(damaged(
            src,
            pos,
            format!(
                "oversized PAX header ({} bytes, size field) {}",
                h.size,
                around(prev, block)
            ),
        ));
    }
    let mut d = vec![0u8; h.size as usize];
    read_at(src, data, &mut d)?;
    Ok(tarfmt::pax_path(&d))
}

/// A regular file's entry, its name refused unless it is a plain relative path.
fn file_entry(src: &PartSource, pos: u64, data: u64, h: &tarfmt::Header, name: &str) -> Result<Entry> {
    let name = name.trim_start_matches("./").to_string();
    if !is_safe_bundle_path(&name) {
        return Err(damaged(
            src,
            pos,
            format!("entry name {name:?} is not a plain relative path"),
        ));
    }
    Ok(Entry {
        path: name,
        offset: data,
        size: h.size,
        mode: h.mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fix_checksum(h: &mut [u8]) {
        h[148..156].fill(b' ');
        let sum: u64 = h[..512].iter().map(|&b| b as u64).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    /// Open `bytes` as a bundle in a thread; fail when no verdict comes within a few seconds.
    fn open_within(bytes: &[u8]) -> Result<BundleReader> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.bkb");
        std::fs::write(&p, bytes).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(BundleReader::open(&p));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("BundleReader::open reached no verdict (it hung or panicked)")
    }

    /// A header for `name` of type `typeflag` whose size field is base-256 `size`, then a valid
    /// small file entry and the end of the archive.
    fn crafted(name: &str, typeflag: u8, size: u64) -> Vec<u8> {
        let mut h: [u8; 512] = tarfmt::file_header(name, 0o755, 0, 0)[..512].try_into().unwrap();
        h[124..136].fill(0);
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
        h[156] = typeflag;
        fix_checksum(&mut h);
        let mut out = h.to_vec();
        out.extend_from_slice(&tarfmt::file_header("bundle.toml", 0o644, 3, 0));
        out.extend_from_slice(b"x=1");
        out.resize(out.len() + 509 + 1024, 0);
        out
    }

    #[test]
    fn huge_sizes_on_any_entry_type_end_in_a_verdict() {
        for t in [b'5', b'g', b'x', b'0'] {
            for size in [u64::MAX - 511, u64::MAX, u64::MAX - 1023, 1 << 62] {
                let Err(e) = open_within(&crafted("images/", t, size)) else {
                    panic!("type {:?} size {size}: accepted", t as char)
                };
                assert_eq!(e.kind, crate::error::Kind::Bundle, "{}", e.message);
                assert!(e.message.contains("images/"), "{}", e.message);
            }
        }
        // The scan itself is fine with the valid remainder.
        let mut ok = crafted("images/", b'5', 0);
        ok.drain(..512);
        assert_eq!(open_within(&ok).unwrap().entries().len(), 1);
    }
}
