//! Reading a package's bytes straight from the bundle, without extracting anything: a bundle
//! entry, or a file inside a controller package (zip or tar.gz) that is itself a bundle entry;
//! or, for `init-packages --dir`, a plain file on disk. The bundle's bytes come through
//! [`VerifiedBundle`]'s checked readers: a damaged package fails its read, naming both digests.

use crate::bundle::VerifiedBundle;
use std::io::{self, Read};
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

/// The bundle's own error (entry not listed, digest differs) as the `io::Error` callers expect.
pub(crate) fn bundle_error(e: crate::error::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.message)
}

/// Run `f` over a reader of the source's bytes (streamed: nothing is held whole in memory).
/// `bundle` is needed for the bundle's sources only.
pub fn with_reader<T>(
    bundle: Option<&VerifiedBundle>,
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
            let mut r = need_bundle()?.package(path).map_err(bundle_error)?;
            f(&mut r)
        }
        Source::Inner { container, entry } => {
            // The container is read as an archive, not front to back: checked whole first.
            let r = need_bundle()?.package_archive(container).map_err(bundle_error)?;
            let lower = container.to_ascii_lowercase();
            if lower.ends_with(".zip") {
                let mut zip = zip::ZipArchive::new(r).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let index = (0..zip.len())
                    .find(|&i| matches!(zip.name_for_index(i), Some(Ok(n)) if matches_entry(&n, entry)))
                    .ok_or_else(|| not_found(format!("{entry} is not in {container}")))?;
                let mut file = zip
                    .by_index(index)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                f(&mut file)
            } else {
                let inner: Box<dyn Read> = if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
                    Box::new(flate2::read::GzDecoder::new(r))
                } else {
                    Box::new(r)
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
pub fn hash(bundle: Option<&VerifiedBundle>, source: &Source) -> io::Result<([u8; 32], u64)> {
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
