//! Reading a package's bytes straight from the bundle, without extracting anything: a bundle
//! entry, or a file inside a controller package (zip or tar.gz) that is itself a bundle entry;
//! or, for `init-packages --dir`, a plain file on disk.

use crate::bundle::parts::PartSource;
use crate::bundle::BundleReader;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;

/// Where a package's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A bundle entry (`packages/NAME`).
    Entry(String),
    /// `entry` inside the controller package stored at bundle entry `container`.
    Inner { container: String, entry: String },
    /// A file on disk (`init-packages --dir`).
    File(PathBuf),
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::Entry(p) => p.clone(),
            Source::Inner { container, entry } => format!("{entry} in {container}"),
            Source::File(p) => p.display().to_string(),
        }
    }
}

/// A seekable view of a bundle entry (zip needs to seek to its central directory).
struct SeekRange<'a> {
    src: &'a PartSource,
    offset: u64,
    len: u64,
    pos: u64,
}

impl Read for SeekRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.len.saturating_sub(self.pos) as usize).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.src.read_at(self.offset + self.pos, &mut buf[..want])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SeekRange<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let p = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::End(d) => self.len as i128 + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if p < 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"));
        }
        self.pos = p as u64;
        Ok(self.pos)
    }
}

/// Whether archive path `name` is `entry`, at the root or under one top-level directory.
fn matches_entry(name: &str, entry: &str) -> bool {
    let name = name.trim_start_matches("./");
    let entry = entry.trim_start_matches("./");
    name == entry
        || name
            .split_once('/')
            .is_some_and(|(top, rest)| !top.is_empty() && rest == entry)
}

fn not_found(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, what.to_string())
}

/// Run `f` over a reader of the source's bytes (streamed: nothing is held whole in memory).
/// `bundle` is needed for the bundle's sources only.
pub fn with_reader<T>(
    bundle: Option<&BundleReader>,
    source: &Source,
    f: impl FnOnce(&mut dyn Read) -> io::Result<T>,
) -> io::Result<T> {
    let need_bundle = || bundle.ok_or_else(|| not_found(format!("{} needs the bundle", source.describe())));
    match source {
        Source::File(p) => {
            let mut file = std::fs::File::open(p)?;
            f(&mut file)
        }
        Source::Entry(path) => {
            let bundle = need_bundle()?;
            let e = bundle
                .entry(path)
                .ok_or_else(|| not_found(format!("{path} is not in the bundle")))?;
            let mut r = bundle.reader(e);
            f(&mut r)
        }
        Source::Inner { container, entry } => {
            let bundle = need_bundle()?;
            let e = bundle
                .entry(container)
                .ok_or_else(|| not_found(format!("{container} is not in the bundle")))?;
            let lower = container.to_ascii_lowercase();
            if lower.ends_with(".zip") {
                let r = SeekRange {
                    src: &bundle.src,
                    offset: e.offset,
                    len: e.size,
                    pos: 0,
                };
                let mut zip = zip::ZipArchive::new(r).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let index = (0..zip.len())
                    .find(|&i| matches!(zip.name_for_index(i), Some(Ok(n)) if matches_entry(&n, entry)))
                    .ok_or_else(|| not_found(format!("{entry} is not in {container}")))?;
                let mut file = zip
                    .by_index(index)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                f(&mut file)
            } else {
                let raw = bundle.reader(e);
                let inner: Box<dyn Read> = if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
                    Box::new(flate2::read::GzDecoder::new(raw))
                } else {
                    Box::new(raw)
                };
                let mut ar = tar::Archive::new(inner);
                for item in ar.entries()? {
                    let mut item = item?;
                    let name = item.path()?.to_string_lossy().to_string();
                    if matches_entry(&name, entry) {
                        return f(&mut item);
                    }
                }
                Err(not_found(format!("{entry} is not in {container}")))
            }
        }
    }
}

/// SHA-256 and size of a source, streamed.
pub fn hash(bundle: Option<&BundleReader>, source: &Source) -> io::Result<([u8; 32], u64)> {
    let (hex, size) = with_reader(bundle, source, |r| crate::digest::sha256_reader(r))?;
    let sha = crate::digest::sha256_from_hex(&hex).ok_or_else(|| io::Error::other("internal: bad digest"))?;
    Ok((sha, size))
}

/// Read until `buf` is full or the end: object chunks then have the size asked for.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_match_at_the_root_or_under_one_directory() {
        assert!(matches_entry("bin/telegraf", "bin/telegraf"));
        assert!(matches_entry("fusion-collectors/bin/telegraf", "bin/telegraf"));
        assert!(matches_entry("./bin/telegraf", "bin/telegraf"));
        assert!(!matches_entry("a/b/bin/telegraf", "bin/telegraf"));
        assert!(!matches_entry("bin/telegraf2", "bin/telegraf"));
    }
}
