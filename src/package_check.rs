//! Pack-time checks of agent packages: the archive opens and reads to the end (CRCs checked), no
//! entry could land outside the package's directory on the agent host (`..`, absolute paths,
//! symlinks or hard links pointing out), and a controller package has what the installer runs.

use crate::digest::Hasher;
use crate::error::{Error, Result};
use crate::manifest::{Os, PackageType};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// What a checked package holds: its file paths, relative to its root directory, and the
/// SHA-256 (hex) and size of each regular file's bytes (computed in the same read that checks
/// the archive, so a collector inside a controller package costs no second pass).
#[derive(Debug, Default)]
pub struct Listing {
    pub files: BTreeSet<String>,
    pub digests: BTreeMap<String, (String, u64)>,
}

impl Listing {
    /// SHA-256 (hex) and size of the regular file at `rel` (found as [`Listing::find`] does).
    pub fn digest(&self, rel: &str) -> Option<&(String, u64)> {
        self.digests.get(self.find(rel)?)
    }

    /// The entry at `rel`, at the root or under the package's single top-level directory.
    pub fn find(&self, rel: &str) -> Option<&String> {
        self.files.get(rel).or_else(|| {
            let top = self.single_top()?;
            self.files.get(&format!("{top}/{rel}"))
        })
    }

    fn single_top(&self) -> Option<String> {
        let tops: BTreeSet<&str> = self.files.iter().map(|f| f.split('/').next().unwrap_or("")).collect();
        (tops.len() == 1 && self.files.iter().all(|f| f.contains('/')))
            .then(|| tops.into_iter().next().unwrap_or("").to_string())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    Zip,
    TarGz,
    Tar,
    Other,
}

fn format_of(name: &str) -> Format {
    let n = name.to_ascii_lowercase();
    if n.ends_with(".zip") {
        Format::Zip
    } else if n.ends_with(".tar.gz") || n.ends_with(".tgz") {
        Format::TarGz
    } else if n.ends_with(".tar") {
        Format::Tar
    } else {
        Format::Other
    }
}

fn refuse(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::input(format!("package {}: {what}", path.display()))
        .hint("rebuild the package without it: bkbundle refuses packages that could write outside their directory on an agent host or that cannot be read")
}

/// Split an archive path into plain components, refusing anything that escapes the root.
fn safe_components(name: &str) -> std::result::Result<Vec<&str>, String> {
    if name.starts_with('/') || name.starts_with('\\') || name.as_bytes().get(1) == Some(&b':') {
        return Err(format!("entry {name:?} is an absolute path"));
    }
    let mut out = Vec::new();
    for c in name.split(['/', '\\']) {
        match c {
            "" | "." => {}
            ".." => return Err(format!("entry {name:?} escapes the package root with `..`")),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Whether a link at `entry` with `target` stays inside the root.
fn link_stays_inside(entry: &[&str], target: &str, symlink: bool) -> bool {
    if target.starts_with('/') || target.starts_with('\\') {
        return false;
    }
    let mut depth: Vec<&str> = if symlink {
        entry[..entry.len().saturating_sub(1)].to_vec()
    } else {
        Vec::new()
    };
    for c in target.split(['/', '\\']) {
        match c {
            "" | "." => {}
            ".." => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            c => depth.push(c),
        }
    }
    true
}

/// Bounds on what a package may expand to, so that a zip bomb is refused after reading a bounded
/// amount rather than after filling the disk of every agent host that unpacks it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Total bytes of all entries, uncompressed.
    pub total: u64,
    /// Uncompressed bytes per byte of the package file, checked once past `ratio_floor`.
    pub ratio: u64,
    /// Below this many uncompressed bytes the ratio is not checked (a small file of zeros is fine).
    pub ratio_floor: u64,
}

/// Real agent packages: tens to a few hundred MiB unpacked, compressed 2-10 times.
pub const LIMITS: Limits = Limits {
    total: 4 << 30,
    ratio: 100,
    ratio_floor: 64 << 20,
};

/// Counts uncompressed bytes against [`Limits`] while an archive is read.
struct Expansion {
    limits: Limits,
    packed: u64,
    total: u64,
}

impl Expansion {
    fn add(&mut self, n: u64, path: &Path, entry: &str) -> Result<()> {
        self.total = self.total.saturating_add(n);
        let too_big = self.total > self.limits.total;
        let too_dense =
            self.total > self.limits.ratio_floor && self.total > self.packed.max(1).saturating_mul(self.limits.ratio);
        if too_big || too_dense {
            let why = if too_big {
                format!("more than {} bytes in all", self.limits.total)
            } else {
                format!(
                    "more than {} times the archive's {} bytes",
                    self.limits.ratio, self.packed
                )
            };
            return Err(Error::input(format!(
                "package {}: expands to {why} (stopped reading at entry {entry:?}, {} bytes unpacked so far): a decompression bomb, or not an agent package",
                path.display(),
                self.total
            ))
            .hint("check that this is the agent package you downloaded; bkbundle refuses archives that expand beyond those bounds"));
        }
        Ok(())
    }
}

/// Links of an archive resolved as an extractor would: through every symlink, wherever it sits.
/// `links` maps an entry's path (components) to its target.
fn resolve_physically(
    links: &BTreeMap<Vec<String>, String>,
    path: &[String],
    follow_last: bool,
) -> std::result::Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    let mut queue: std::collections::VecDeque<String> = path.iter().cloned().collect();
    let mut hops = 0;
    while let Some(c) = queue.pop_front() {
        match c.as_str() {
            "" | "." => continue,
            ".." => {
                if out.pop().is_none() {
                    return Err("leaves the package's directory".into());
                }
                continue;
            }
            _ => out.push(c),
        }
        if !follow_last && queue.is_empty() {
            continue;
        }
        if let Some(target) = links.get(&out) {
            hops += 1;
            if hops > 40 {
                return Err("is a loop of symlinks".into());
            }
            if target.starts_with('/') || target.starts_with('\\') || target.as_bytes().get(1) == Some(&b':') {
                return Err(format!("reaches the absolute path {target:?}"));
            }
            out.pop();
            for t in target.split(['/', '\\']).rev() {
                queue.push_front(t.to_string());
            }
        }
    }
    Ok(out)
}

/// What an archive holds, for the escape check after the whole archive was read.
#[derive(Default)]
struct Tree {
    /// Symlinks in archive order: where the archive puts them, and their targets.
    symlinks: Vec<(Vec<String>, String)>,
    hardlinks: Vec<(Vec<String>, String)>,
    others: Vec<Vec<String>>,
}

impl Tree {
    /// Refuse any entry that an extractor, following the archive's own symlinks, would put or
    /// point outside the package's directory. Links are placed where an extractor puts them (their
    /// directory resolved through the links before them), then every target is resolved from
    /// there through all of them.
    fn check(&self, path: &Path) -> Result<()> {
        let show = |c: &[String]| c.join("/");
        let mut placed: BTreeMap<Vec<String>, String> = BTreeMap::new();
        let mut at_of = Vec::new();
        for (at, target) in &self.symlinks {
            let (name, parent) = at.split_last().map(|(n, p)| (n.clone(), p)).unwrap_or_default();
            let mut physical = resolve_physically(&placed, parent, true).map_err(|why| {
                refuse(
                    path,
                    format!("symlink {:?} is written through a symlink that {why}", show(at)),
                )
            })?;
            physical.push(name);
            placed.insert(physical.clone(), target.clone());
            at_of.push((at, physical, target));
        }
        for (at, physical, target) in at_of {
            let mut from: Vec<String> = physical[..physical.len().saturating_sub(1)].to_vec();
            from.extend(target.split(['/', '\\']).map(str::to_string));
            if let Err(why) = resolve_physically(&placed, &from, true) {
                return Err(refuse(
                    path,
                    format!(
                        "symlink {:?} -> {target:?} {why} once extracted (following the archive's other symlinks)",
                        show(at)
                    ),
                ));
            }
        }
        for (at, target) in &self.hardlinks {
            let t: Vec<String> = target.split(['/', '\\']).map(str::to_string).collect();
            if let Err(why) = resolve_physically(&placed, &t, true) {
                return Err(refuse(
                    path,
                    format!(
                        "hard link {:?} -> {target:?}: its target {why} once extracted",
                        show(at)
                    ),
                ));
            }
        }
        for at in self.others.iter().chain(self.hardlinks.iter().map(|(a, _)| a)) {
            if let Err(why) = resolve_physically(&placed, at, false) {
                return Err(refuse(
                    path,
                    format!("entry {:?} is written through a symlink that {why}", show(at)),
                ));
            }
        }
        Ok(())
    }
}

/// Check the package file; returns its listing (empty for a non-archive collector file).
pub fn check(path: &Path, kind: PackageType, os: Os) -> Result<Listing> {
    if !path.is_file() {
        return Err(Error::input(format!("package {}: file not found", path.display()))
            .hint("put the package file there (see the recipe's comments), or fix `file` in the recipe; paths are relative to the recipe"));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let format = format_of(&name);
    let listing = match format {
        Format::Zip => check_zip(path)?,
        Format::TarGz | Format::Tar => check_tar(path, format == Format::TarGz)?,
        Format::Other => {
            if kind == PackageType::Controller {
                return Err(refuse(
                    path,
                    "a controller package must be a .zip, .tar.gz, .tgz or .tar archive",
                ));
            }
            File::open(path).map_err(|e| Error::io("cannot open package", path, e))?;
            return Ok(Listing::default());
        }
    };
    if kind == PackageType::Controller {
        let mut missing = Vec::new();
        if listing.find("sidecar.yml").is_none() {
            missing.push("sidecar.yml");
        }
        let installers: &[&str] = match os {
            Os::Linux => &["install.sh"],
            Os::Windows => &["install.bat", "install.ps1", "install.cmd", "install.sh"],
        };
        if !installers.iter().any(|i| listing.find(i).is_some()) {
            missing.push(installers[0]);
        }
        if !missing.is_empty() {
            return Err(Error::input(format!(
                "package {}: a {} controller package must contain {} at its root (or under one top-level directory); it has {} files, not those",
                path.display(),
                os.as_str(),
                missing.join(" and "),
                listing.files.len()
            ))
            .hint("check this is the agent (fusion-collectors) package for that OS, not another download"));
        }
    }
    Ok(listing)
}

fn packed_size(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| Error::io("cannot read package", path, e))
}

fn check_zip(path: &Path) -> Result<Listing> {
    let f = File::open(path).map_err(|e| Error::io("cannot open package", path, e))?;
    let mut z = zip::ZipArchive::new(io::BufReader::new(f))
        .map_err(|e| refuse(path, format!("not a readable zip archive: {e}")))?;
    let mut listing = Listing::default();
    let mut tree = Tree::default();
    let mut expansion = Expansion {
        limits: LIMITS,
        packed: packed_size(path)?,
        total: 0,
    };
    let mut sink = vec![0u8; 1 << 16];
    for i in 0..z.len() {
        let mut e = z.by_index(i).map_err(|e| refuse(path, format!("entry {i}: {e}")))?;
        let name = e
            .name()
            .map(|n| n.to_string())
            .map_err(|err| refuse(path, format!("entry {i}: {err}")))?;
        let comps = safe_components(&name).map_err(|m| refuse(path, m))?;
        let owned: Vec<String> = comps.iter().map(|c| c.to_string()).collect();
        let is_link = e.unix_mode().is_some_and(|m| m & 0o170000 == 0o120000);
        if is_link {
            let mut target = String::new();
            (&mut e)
                .take(4096)
                .read_to_string(&mut target)
                .map_err(|err| refuse(path, format!("entry {name:?}: {err}")))?;
            if !link_stays_inside(&comps, &target, true) {
                return Err(refuse(
                    path,
                    format!("symlink {name:?} points outside the package ({target:?})"),
                ));
            }
            tree.symlinks.push((owned, target));
        } else {
            // Read to the end: the zip reader checks the CRC there. Bounded: a bomb stops early.
            let mut h = Hasher::new();
            loop {
                match e.read(&mut sink) {
                    Ok(0) => break,
                    Ok(n) => {
                        h.update(&sink[..n]);
                        expansion.add(n as u64, path, &name)?;
                    }
                    Err(err) => return Err(refuse(path, format!("entry {name:?} is damaged: {err}"))),
                }
            }
            if !e.is_dir() && !comps.is_empty() {
                listing.digests.insert(comps.join("/"), h.finish());
            }
            if !owned.is_empty() {
                tree.others.push(owned);
            }
        }
        if !e.is_dir() && !comps.is_empty() {
            listing.files.insert(comps.join("/"));
        }
    }
    tree.check(path)?;
    Ok(listing)
}

fn check_tar(path: &Path, gz: bool) -> Result<Listing> {
    let f = File::open(path).map_err(|e| Error::io("cannot open package", path, e))?;
    let r: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(f)))
    } else {
        Box::new(io::BufReader::new(f))
    };
    let mut a = tar::Archive::new(r);
    let mut listing = Listing::default();
    let mut tree = Tree::default();
    let mut expansion = Expansion {
        limits: LIMITS,
        packed: packed_size(path)?,
        total: 0,
    };
    let entries = a
        .entries()
        .map_err(|e| refuse(path, format!("not a readable tar archive: {e}")))?;
    let mut buf = vec![0u8; 1 << 16];
    for entry in entries {
        let mut e = entry.map_err(|e| refuse(path, format!("not a readable tar archive: {e}")))?;
        let name = String::from_utf8_lossy(&e.path_bytes()).to_string();
        let comps = safe_components(&name).map_err(|m| refuse(path, m))?;
        let owned: Vec<String> = comps.iter().map(|c| c.to_string()).collect();
        let t = e.header().entry_type();
        // Headers count too: a tar of millions of empty entries expands as well.
        expansion.add(512, path, &name)?;
        if t.is_symlink() || t.is_hard_link() {
            let target = e
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).to_string())
                .unwrap_or_default();
            if !link_stays_inside(&comps, &target, t.is_symlink()) {
                let what = if t.is_symlink() { "symlink" } else { "hard link" };
                return Err(refuse(
                    path,
                    format!("{what} {name:?} points outside the package ({target:?})"),
                ));
            }
            if t.is_symlink() {
                tree.symlinks.push((owned.clone(), target));
            } else {
                tree.hardlinks.push((owned.clone(), target));
            }
        } else if !owned.is_empty() {
            tree.others.push(owned.clone());
        }
        let mut h = Hasher::new();
        loop {
            match e.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    expansion.add(n as u64, path, &name)?;
                    h.update(&buf[..n]);
                }
                Err(err) => return Err(refuse(path, format!("entry {name:?} is damaged: {err}"))),
            }
        }
        if t.is_file() && !comps.is_empty() {
            listing.digests.insert(comps.join("/"), h.finish());
        }
        if (t.is_file() || t.is_symlink() || t.is_hard_link()) && !comps.is_empty() {
            listing.files.insert(comps.join("/"));
        }
    }
    if listing.files.is_empty() {
        return Err(refuse(path, "the archive holds no files"));
    }
    tree.check(path)?;
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_recognised() {
        assert!(safe_components("../evil").is_err());
        assert!(safe_components("a/../../evil").is_err());
        assert!(safe_components("/etc/passwd").is_err());
        assert!(safe_components("C:\\evil").is_err());
        assert!(safe_components("..\\evil").is_err());
        assert_eq!(safe_components("./bin/telegraf").unwrap(), vec!["bin", "telegraf"]);
        assert!(link_stays_inside(&["bin", "x"], "../lib/y", true));
        assert!(!link_stays_inside(&["bin", "x"], "../../y", true));
        assert!(!link_stays_inside(&["x"], "/etc/passwd", true));
    }

    #[test]
    fn listing_finds_under_one_top_dir() {
        let mut l = Listing::default();
        l.files.insert("pkg/install.sh".into());
        l.files.insert("pkg/bin/telegraf".into());
        assert!(l.find("install.sh").is_some());
        assert!(l.find("bin/telegraf").is_some());
        assert!(l.find("sidecar.yml").is_none());
    }

    fn tar_with(path: &Path, entries: &[(&str, Option<&str>, &[u8])]) {
        let mut b = tar::Builder::new(File::create(path).unwrap());
        for (name, link, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            match link {
                Some(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, name, target).unwrap();
                }
                None => {
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, name, *data).unwrap();
                }
            }
        }
        b.finish().unwrap();
    }

    #[test]
    fn symlink_chains_that_escape_when_extracted_are_refused() {
        let d = tempfile::tempdir().unwrap();
        // `sub/up` points at the root (lexically fine); `sub/up/esc` then sits at the root and
        // its `..` leaves the package: only resolving the links as an extractor does shows it.
        let p = d.path().join("chain.tar");
        tar_with(
            &p,
            &[
                ("bin/telegraf", None, b"x"),
                ("sub/up", Some(".."), b""),
                ("sub/up/esc", Some("../etc"), b""),
            ],
        );
        let e = check(&p, PackageType::Collector, Os::Linux).unwrap_err();
        assert!(e.message.contains("sub/up/esc"), "{}", e.message);
        // A link through a link that ends outside.
        let p = d.path().join("via.tar");
        tar_with(
            &p,
            &[
                ("bin/telegraf", None, b"x"),
                ("a/up", Some(".."), b""),
                ("b", Some("a/up/.."), b""),
            ],
        );
        assert!(check(&p, PackageType::Collector, Os::Linux).is_err());
        // A loop is refused too, rather than followed forever.
        let p = d.path().join("loop.tar");
        tar_with(
            &p,
            &[
                ("bin/telegraf", None, b"x"),
                ("l1", Some("l2/x"), b""),
                ("l2", Some("l1/y"), b""),
            ],
        );
        assert!(check(&p, PackageType::Collector, Os::Linux).is_err());
        // Links that stay inside, through other links, are fine.
        let p = d.path().join("fine.tar");
        tar_with(
            &p,
            &[
                ("pkg/bin/telegraf", None, b"x"),
                ("pkg/current", Some("bin"), b""),
                ("pkg/lib/t", Some("../current/telegraf"), b""),
            ],
        );
        check(&p, PackageType::Collector, Os::Linux).unwrap();
    }

    #[test]
    fn zip_bombs_are_refused() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fusion-collectors-linux-amd64.zip");
        {
            let mut z = zip::ZipWriter::new(File::create(&p).unwrap());
            let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
            z.start_file("install.sh", o).unwrap();
            z.write_all(b"#!/bin/sh\n").unwrap();
            z.start_file("sidecar.yml", o).unwrap();
            z.write_all(b"a: 1\n").unwrap();
            z.start_file("zeros", o).unwrap();
            let block = vec![0u8; 1 << 20];
            for _ in 0..256 {
                z.write_all(&block).unwrap();
            }
            z.finish().unwrap();
        }
        let t0 = std::time::Instant::now();
        let e = check(&p, PackageType::Controller, Os::Linux).unwrap_err();
        assert!(e.message.contains("expands"), "{}", e.message);
        assert!(t0.elapsed() < std::time::Duration::from_secs(20));
    }
}
