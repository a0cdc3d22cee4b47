//! Pack-time checks of agent packages: the archive opens and reads to the end (CRCs checked), no
//! entry could land outside the package's directory on the agent host (`..`, absolute paths,
//! symlinks or hard links pointing out), and a controller package has what the installer runs.

use crate::digest::{Hasher, HashingWriter};
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

fn check_zip(path: &Path) -> Result<Listing> {
    let f = File::open(path).map_err(|e| Error::io("cannot open package", path, e))?;
    let mut z = zip::ZipArchive::new(io::BufReader::new(f))
        .map_err(|e| refuse(path, format!("not a readable zip archive: {e}")))?;
    let mut listing = Listing::default();
    let mut sink = vec![0u8; 1 << 16];
    for i in 0..z.len() {
        let mut e = z.by_index(i).map_err(|e| refuse(path, format!("entry {i}: {e}")))?;
        let name = e
            .name()
            .map(|n| n.to_string())
            .map_err(|err| refuse(path, format!("entry {i}: {err}")))?;
        let comps = safe_components(&name).map_err(|m| refuse(path, m))?;
        let is_link = e.unix_mode().is_some_and(|m| m & 0o170000 == 0o120000);
        if is_link {
            let mut target = String::new();
            e.read_to_string(&mut target)
                .map_err(|err| refuse(path, format!("entry {name:?}: {err}")))?;
            if !link_stays_inside(&comps, &target, true) {
                return Err(refuse(
                    path,
                    format!("symlink {name:?} points outside the package ({target:?})"),
                ));
            }
        } else {
            // Read to the end: the zip reader checks the CRC there.
            let mut h = Hasher::new();
            loop {
                match e.read(&mut sink) {
                    Ok(0) => break,
                    Ok(n) => h.update(&sink[..n]),
                    Err(err) => return Err(refuse(path, format!("entry {name:?} is damaged: {err}"))),
                }
            }
            if !e.is_dir() && !comps.is_empty() {
                listing.digests.insert(comps.join("/"), h.finish());
            }
        }
        if !e.is_dir() && !comps.is_empty() {
            listing.files.insert(comps.join("/"));
        }
    }
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
    let entries = a
        .entries()
        .map_err(|e| refuse(path, format!("not a readable tar archive: {e}")))?;
    for entry in entries {
        let mut e = entry.map_err(|e| refuse(path, format!("not a readable tar archive: {e}")))?;
        let name = String::from_utf8_lossy(&e.path_bytes()).to_string();
        let comps = safe_components(&name).map_err(|m| refuse(path, m))?;
        let t = e.header().entry_type();
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
        }
        let mut h = HashingWriter::new(io::sink());
        io::copy(&mut e, &mut h).map_err(|err| refuse(path, format!("entry {name:?} is damaged: {err}")))?;
        if t.is_file() && !comps.is_empty() {
            listing.digests.insert(comps.join("/"), h.hasher.finish());
        }
        if (t.is_file() || t.is_symlink() || t.is_hard_link()) && !comps.is_empty() {
            listing.files.insert(comps.join("/"));
        }
    }
    if listing.files.is_empty() {
        return Err(refuse(path, "the archive holds no files"));
    }
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
}
