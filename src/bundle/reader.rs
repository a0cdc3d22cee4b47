//! Reads a bundle: finds its parts, walks the tar headers (seeking over the data) to build an
//! index of entries, and hands out readers over any entry without extracting anything.
//!
//! Opening checks the framing completely: every header's checksum, every entry inside the file,
//! zero padding, the end-of-archive blocks and nothing after them. Content digests are checked by
//! `verify`, which reads every byte.

use super::parts::{PartSource, RangeReader};
use super::tarfmt::{self, BLOCK};
use crate::error::{Error, Kind, Result};
use crate::manifest::{is_safe_bundle_path, Manifest, MANIFEST_PATH};
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
    pub src: PartSource,
    pub entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

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

    pub fn reader(&self, e: &Entry) -> RangeReader<'_> {
        self.src.range(e.offset, e.size)
    }

    /// Read a small descriptive file whole.
    pub fn read_small(&self, path: &str) -> Result<Option<Vec<u8>>> {
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

    /// Parse `bundle.toml` (format checked first).
    pub fn manifest(&self) -> Result<(Manifest, Vec<u8>)> {
        let name = self.src.display_name();
        let bytes = self.read_small(MANIFEST_PATH)?.ok_or_else(|| {
            Error::bundle(format!(
                "{name} has no {MANIFEST_PATH}: it is not a bkbundle bundle, or it was cut short"
            ))
            .hint("check the file is the .bkb bundle (or its first part) and copy it again if it was truncated")
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            Error::bundle(format!(
                "{name}: {MANIFEST_PATH} is not UTF-8 text: the bundle is damaged"
            ))
        })?;
        let m = Manifest::parse(text, &format!("{name}: {MANIFEST_PATH}")).map_err(|e| e.into_error(Kind::Bundle))?;
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

fn scan(src: &PartSource) -> Result<(Vec<Entry>, HashMap<String, usize>)> {
    let mut entries = Vec::new();
    let mut index = HashMap::new();
    let mut pos = 0u64;
    let mut pax_path: Option<String> = None;
    let mut block = [0u8; 512];
    let rd = |at: u64, buf: &mut [u8]| {
        src.read_exact_at(at, buf)
            .map_err(|e| Error::io("cannot read", src.part_at(at), e))
    };
    loop {
        if pos + BLOCK > src.len {
            return Err(truncated(
                src,
                format!("the archive ends at byte {} without its end marker", src.len),
            ));
        }
        rd(pos, &mut block)?;
        if tarfmt::is_zero_block(&block) {
            // End of archive: a second zero block, then nothing but zeros.
            if pos + 2 * BLOCK > src.len {
                return Err(truncated(src, "the end-of-archive marker is cut short".into()));
            }
            let mut rest = vec![0u8; (src.len - pos).min(1 << 20) as usize];
            let mut at = pos;
            while at < src.len {
                let n = ((src.len - at) as usize).min(rest.len());
                rd(at, &mut rest[..n])?;
                if let Some(i) = rest[..n].iter().position(|&b| b != 0) {
                    return Err(damaged(
                        src,
                        at + i as u64,
                        "unexpected bytes after the end of the archive".into(),
                    ));
                }
                at += n as u64;
            }
            break;
        }
        let h = tarfmt::parse_header(&block).map_err(|e| damaged(src, pos, format!("bad tar header: {e}")))?;
        let data = pos + BLOCK;
        let end = data + h.size + tarfmt::padding(h.size);
        let name = pax_path.take().unwrap_or(h.name.clone());
        if end > src.len {
            return Err(truncated(
                src,
                format!(
                    "entry {name} needs {} bytes from byte {data} but the bundle ends at byte {}",
                    h.size, src.len
                ),
            ));
        }
        // Padding must be zeros: a flipped byte there changes nothing else we could detect.
        let pad = tarfmt::padding(h.size) as usize;
        if pad > 0 {
            let mut p = [0u8; 512];
            rd(data + h.size, &mut p[..pad])?;
            if let Some(i) = p[..pad].iter().position(|&b| b != 0) {
                return Err(damaged(
                    src,
                    data + h.size + i as u64,
                    format!("non-zero padding after entry {name}"),
                ));
            }
        }
        match h.typeflag {
            b'x' => {
                if h.size > 64 << 10 {
                    return Err(damaged(src, pos, format!("oversized PAX header ({} bytes)", h.size)));
                }
                let mut d = vec![0u8; h.size as usize];
                rd(data, &mut d)?;
                pax_path = tarfmt::pax_path(&d);
            }
            b'g' | b'5' => {}
            b'0' | 0 => {
                let name = name.trim_start_matches("./").to_string();
                if !is_safe_bundle_path(&name) {
                    return Err(damaged(
                        src,
                        pos,
                        format!("entry name {name:?} is not a plain relative path"),
                    ));
                }
                if index.insert(name.clone(), entries.len()).is_some() {
                    return Err(damaged(src, pos, format!("entry {name} appears twice")));
                }
                entries.push(Entry {
                    path: name,
                    offset: data,
                    size: h.size,
                    mode: h.mode,
                });
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
        pos = end;
    }
    Ok((entries, index))
}
