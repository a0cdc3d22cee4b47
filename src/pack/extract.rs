//! Files read out of an image's layers without running it: the image's export stream (the
//! engine's `docker save` through the API, or an archive on disk) read once, front to back,
//! through [`savefile::read_archive`], so both the legacy and the OCI layouts are understood.
//!
//! Which blob is a layer of which image, and in which order, is only known from the archive's
//! manifest, which may come after the layers; so every layer is scanned as it streams by (each
//! exactly once, decompressed when gzip or zstd, hashed to its diff id on the way), and the
//! entries at or under the requested paths are kept: regular files staged in a directory on disk
//! (bounded memory, only what was asked for), directories, symlinks and whiteouts noted. At the
//! end the image's layers are applied bottom to top into a [`View`]: whiteouts (`.wh.<name>`)
//! and opaque markers (`.wh..wh..opq`) hide what lower layers put there, later layers replace
//! earlier ones, as the engine's overlay would show the container's file system.
//!
//! Entries that are ancestors of a requested path are noted too (without content), so that a
//! whiteout, a symlink or a file where a requested directory should be is seen. Hard links whose
//! target lies outside the requested paths cannot be staged (the target streamed by before
//! anything said it was needed): they are refused when used, naming them.

use crate::digest::Hasher;
use crate::error::{Error, IoContext, Result};
use crate::progress::Task;
use crate::savefile::{self, normalize, SavedImage};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// A layer's changes at wanted paths, in its tar's order.
pub(super) type Changes = Vec<(String, Change)>;

/// What a layer changes at one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    /// `.wh.<name>`: the path and everything under it are deleted from lower layers.
    Whiteout,
    /// `.wh..wh..opq` in a directory: what lower layers put under it is hidden.
    Opaque,
    Dir {
        mode: u32,
    },
    File(Staged),
    Symlink {
        target: String,
    },
    /// A hard link to a file that was not staged (outside the requested paths).
    HardLink {
        target: String,
    },
    /// Something else (a device, a fifo), or a file above the requested paths: present, no content.
    Other,
}

/// A regular file's content, staged on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Staged {
    pub path: PathBuf,
    pub size: u64,
    pub mode: u32,
}

/// The paths asked for in one image (relative to its root, normalised).
#[derive(Debug, Clone, Default)]
pub(super) struct Wanted {
    roots: Vec<String>,
}

/// Whether `p` is strictly under directory `dir`.
pub(super) fn is_under(p: &str, dir: &str) -> bool {
    dir.is_empty() && !p.is_empty() || p.len() > dir.len() && p.starts_with(dir) && p.as_bytes()[dir.len()] == b'/'
}

impl Wanted {
    pub fn new(paths: impl IntoIterator<Item = String>) -> Wanted {
        let mut roots: Vec<String> = paths.into_iter().map(|p| normalize(&p)).collect();
        roots.sort();
        roots.dedup();
        Wanted { roots }
    }

    /// Whether `p`'s content is asked for: a requested path or under one.
    fn content(&self, p: &str) -> bool {
        self.roots.iter().any(|r| p == r || is_under(p, r))
    }

    /// Whether `p` matters at all: its content, or it is above a requested path.
    fn relevant(&self, p: &str) -> bool {
        self.content(p) || self.roots.iter().any(|r| is_under(r, p))
    }
}

/// One image read: its images, and for each layer (by diff id) the changes at wanted paths.
pub(super) struct Scanned {
    pub images: Vec<SavedImage>,
    /// Each layer's uncompressed size and changes, by diff id.
    pub layers: HashMap<String, (u64, Changes)>,
    /// Uncompressed layer bytes read (each layer blob once).
    pub bytes_read: u64,
    /// Layer blobs read.
    pub blobs: usize,
}

/// Read an image stream once, staging the wanted files under `staging`.
pub(super) fn scan(src: impl Read, source: &str, wanted: &Wanted, staging: &Path, task: &dyn Task) -> Result<Scanned> {
    let mut layers = HashMap::new();
    let mut bytes_read = 0u64;
    let mut blobs = 0usize;
    let progress = |n: u64| task.advance(n);
    let mut on_layer = |_: &str, blob: &mut dyn Read| -> Result<String> {
        let dir = staging.join(format!("layer{blobs}"));
        blobs = blobs.saturating_add(1);
        let (diff_id, size, changes) = scan_layer(blob, source, wanted, &dir, task)?;
        bytes_read = bytes_read.saturating_add(size);
        layers.insert(diff_id.clone(), (size, changes));
        Ok(diff_id)
    };
    let images = savefile::read_archive(src, source, &progress, &mut on_layer)?;
    Ok(Scanned {
        images,
        layers,
        bytes_read,
        blobs,
    })
}

/// A reader that hashes what passes and reports it as progress.
struct Counted<'a, R> {
    inner: R,
    hasher: Hasher,
    task: &'a dyn Task,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.task.advance(n as u64);
        Ok(n)
    }
}

/// One layer blob: its diff id, uncompressed size and the changes at wanted paths (files staged
/// under `dir`, created when the first one is).
pub(super) fn scan_layer(
    blob: &mut dyn Read,
    source: &str,
    wanted: &Wanted,
    dir: &Path,
    task: &dyn Task,
) -> Result<(String, u64, Changes)> {
    let read_err = |e: io::Error| Error::external(format!("reading a layer of the image from {source}: {e}"));
    let mut counted = Counted {
        inner: savefile::plain_layer(blob, source)?,
        hasher: Hasher::new(),
        task,
    };
    let mut changes: Changes = Vec::new();
    {
        let mut archive = tar::Archive::new(&mut counted);
        for entry in archive.entries().map_err(read_err)? {
            let mut e = entry.map_err(read_err)?;
            let path = normalize(&String::from_utf8_lossy(&e.path_bytes()));
            if let Some(change) = classify(&mut e, &path, wanted, dir, &changes, changes.len())? {
                changes.push(change);
            }
        }
    }
    // Whatever follows the tar's end still belongs to the blob and to its digest.
    io::copy(&mut counted, &mut io::sink()).map_err(read_err)?;
    let (hex, size) = counted.hasher.finish();
    Ok((format!("sha256:{hex}"), size, changes))
}

/// The change one tar entry makes at a wanted path, if any; a wanted file's bytes are staged.
fn classify<R: Read>(
    e: &mut tar::Entry<'_, R>,
    path: &str,
    wanted: &Wanted,
    dir: &Path,
    earlier: &[(String, Change)],
    seq: usize,
) -> Result<Option<(String, Change)>> {
    let (parent, name) = match path.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", path),
    };
    if name == ".wh..wh..opq" {
        return Ok(wanted.relevant(parent).then(|| (parent.to_string(), Change::Opaque)));
    }
    if let Some(hidden) = name.strip_prefix(".wh.") {
        let target = if parent.is_empty() {
            hidden.to_string()
        } else {
            format!("{parent}/{hidden}")
        };
        return Ok(wanted.relevant(&target).then_some((target, Change::Whiteout)));
    }
    if path.is_empty() || !wanted.relevant(path) {
        return Ok(None);
    }
    let kind = e.header().entry_type();
    let mode = e.header().mode().unwrap_or(0o644) & 0o7777;
    let link = || normalize(&String::from_utf8_lossy(&e.link_name_bytes().unwrap_or_default()));
    let change = if kind.is_dir() {
        Change::Dir { mode }
    } else if kind.is_symlink() {
        Change::Symlink {
            target: String::from_utf8_lossy(&e.link_name_bytes().unwrap_or_default()).to_string(),
        }
    } else if kind.is_hard_link() {
        let target = link();
        // A hard link's target is an earlier entry of the same layer: staged when it was wanted.
        match earlier.iter().rev().find(|(p, _)| *p == target) {
            Some((_, Change::File(staged))) => Change::File(Staged { mode, ..staged.clone() }),
            _ => Change::HardLink { target },
        }
    } else if (kind.is_file() || kind.is_contiguous()) && wanted.content(path) {
        Change::File(stage(e, dir, seq, mode)?)
    } else {
        Change::Other
    };
    Ok(Some((path.to_string(), change)))
}

/// Copy one entry's bytes to `dir/<seq>`.
fn stage(e: &mut dyn Read, dir: &Path, seq: usize, mode: u32) -> Result<Staged> {
    fs::create_dir_all(dir).io_ctx("cannot create staging directory", dir)?;
    let path = dir.join(seq.to_string());
    let mut out = fs::File::create(&path).io_ctx("cannot create staged file", &path)?;
    let size = io::copy(e, &mut out).io_ctx("cannot stage a file of the image in", &path)?;
    Ok(Staged { path, size, mode })
}

/// A file system node of the merged image, at a wanted path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Node {
    Dir { mode: u32 },
    File(Staged),
    Symlink { target: String },
    HardLink { target: String },
    Other,
}

/// The image's file system at the wanted paths, its layers applied bottom to top.
#[derive(Debug, Default)]
pub(super) struct View {
    pub nodes: BTreeMap<String, Node>,
}

impl View {
    /// Apply the layers in order (bottom first).
    pub fn build<'a>(layers: impl IntoIterator<Item = &'a [(String, Change)]>) -> View {
        let mut v = View::default();
        for layer in layers {
            v.apply(layer);
        }
        v
    }

    /// One layer: its whiteouts hide lower layers' entries only, so they go first; then its
    /// entries replace what is there (a non-directory also hides what was under the path).
    fn apply(&mut self, changes: &[(String, Change)]) {
        for (p, c) in changes {
            match c {
                Change::Opaque => self.remove_under(p),
                Change::Whiteout => {
                    self.nodes.remove(p);
                    self.remove_under(p);
                }
                _ => {}
            }
        }
        for (p, c) in changes {
            let node = match c {
                Change::Whiteout | Change::Opaque => continue,
                Change::Dir { mode } => Node::Dir { mode: *mode },
                Change::File(s) => Node::File(s.clone()),
                Change::Symlink { target } => Node::Symlink { target: target.clone() },
                Change::HardLink { target } => Node::HardLink { target: target.clone() },
                Change::Other => Node::Other,
            };
            if !matches!(node, Node::Dir { .. }) {
                self.remove_under(p);
            }
            self.nodes.insert(p.clone(), node);
        }
    }

    fn remove_under(&mut self, dir: &str) {
        let under: Vec<String> = self
            .nodes
            .range(format!("{dir}/")..)
            .take_while(|(k, _)| is_under(k, dir))
            .map(|(k, _)| k.clone())
            .collect();
        for k in under {
            self.nodes.remove(&k);
        }
    }

    /// The node at `p`; a path with nodes under it but no entry of its own is a directory.
    pub fn get(&self, p: &str) -> Option<Node> {
        self.nodes.get(p).cloned().or_else(|| {
            self.nodes
                .range(format!("{p}/")..)
                .next()
                .filter(|(k, _)| is_under(k, p))
                .map(|_| Node::Dir { mode: 0o755 })
        })
    }

    /// The nodes strictly under directory `dir`, in path order.
    pub fn under<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = (&'a String, &'a Node)> + 'a {
        self.nodes
            .range(format!("{dir}/")..)
            .take_while(move |(k, _)| is_under(k, dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Reporter;
    use crate::progress::Silent;

    /// A layer tar in memory: (path, Some(content) | None for a directory, symlink target).
    /// (path, content or None for a directory, symlink target).
    type Spec<'a> = (&'a str, Option<&'a [u8]>, Option<&'a str>);

    fn layer(entries: &[Spec]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            if let Some(t) = link {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, path, t).unwrap();
            } else if let Some(d) = data {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                b.append_data(&mut h, path, *d).unwrap();
            } else {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    fn scan_all(layers: &[Vec<u8>], wanted: &Wanted, dir: &Path) -> View {
        let task = Silent.task("t", None);
        let scanned: Vec<Changes> = layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let mut r: &[u8] = l;
                scan_layer(&mut r, "test", wanted, &dir.join(i.to_string()), &*task)
                    .unwrap()
                    .2
            })
            .collect();
        View::build(scanned.iter().map(|l| l.as_slice()))
    }

    fn content(v: &View, p: &str) -> Option<String> {
        match v.nodes.get(p)? {
            Node::File(s) => Some(fs::read_to_string(&s.path).unwrap()),
            _ => None,
        }
    }

    #[test]
    fn later_layers_win_and_whiteouts_delete() {
        let d = tempfile::tempdir().unwrap();
        let w = Wanted::new(["opt/fc".to_string()]);
        let l1 = layer(&[
            ("opt/", None, None),
            ("opt/fc/", None, None),
            ("opt/fc/a", Some(b"one"), None),
            ("opt/fc/b", Some(b"gone"), None),
            ("opt/fc/sub/c", Some(b"c"), None),
            ("opt/other", Some(b"not wanted"), None),
        ]);
        let l2 = layer(&[
            ("opt/fc/a", Some(b"two"), None),
            ("opt/fc/.wh.b", Some(b""), None),
            ("opt/fc/.wh.sub", Some(b""), None),
        ]);
        let v = scan_all(&[l1, l2], &w, d.path());
        assert_eq!(content(&v, "opt/fc/a").as_deref(), Some("two"));
        assert!(v.get("opt/fc/b").is_none());
        assert!(v.get("opt/fc/sub").is_none() && v.get("opt/fc/sub/c").is_none());
        assert!(!v.nodes.contains_key("opt/other"), "only wanted paths are kept");
        assert_eq!(v.get("opt"), Some(Node::Dir { mode: 0o755 }));
    }

    #[test]
    fn opaque_directories_hide_lower_layers_only() {
        let d = tempfile::tempdir().unwrap();
        let w = Wanted::new(["opt/fc".to_string()]);
        let l1 = layer(&[("opt/fc/old", Some(b"old"), None), ("opt/fc/keep", Some(b"k"), None)]);
        // The marker may come after the layer's own new entries: it still hides only lower ones.
        let l2 = layer(&[
            ("opt/fc/new", Some(b"new"), None),
            ("opt/fc/.wh..wh..opq", Some(b""), None),
        ]);
        let v = scan_all(&[l1, l2], &w, d.path());
        assert_eq!(content(&v, "opt/fc/new").as_deref(), Some("new"));
        assert!(v.get("opt/fc/old").is_none() && v.get("opt/fc/keep").is_none());
        // An opaque marker above the wanted tree hides it too; one elsewhere does nothing.
        let l3 = layer(&[
            ("opt/.wh..wh..opq", Some(b""), None),
            ("var/.wh..wh..opq", Some(b""), None),
        ]);
        let l1 = layer(&[("opt/fc/x", Some(b"x"), None)]);
        let v = scan_all(&[l1, l3], &w, d.path());
        assert!(v.get("opt/fc").is_none());
    }

    #[test]
    fn layer_order_decides_and_a_file_replaces_a_directory() {
        let d = tempfile::tempdir().unwrap();
        let w = Wanted::new(["opt/fc".to_string(), "opt/inst".to_string()]);
        let a = layer(&[("opt/fc/bin/x", Some(b"x"), None), ("opt/inst", Some(b"A"), None)]);
        let b = layer(&[("opt/fc/bin", Some(b"file now"), None), ("opt/inst", Some(b"B"), None)]);
        let v = scan_all(&[a.clone(), b.clone()], &w, d.path());
        assert_eq!(content(&v, "opt/inst").as_deref(), Some("B"));
        assert_eq!(content(&v, "opt/fc/bin").as_deref(), Some("file now"));
        assert!(v.get("opt/fc/bin/x").is_none());
        let v = scan_all(&[b, a], &w, d.path());
        assert_eq!(content(&v, "opt/inst").as_deref(), Some("A"));
        assert_eq!(content(&v, "opt/fc/bin/x").as_deref(), Some("x"));
    }

    #[test]
    fn ancestors_symlinks_and_hard_links_are_noted() {
        let d = tempfile::tempdir().unwrap();
        let w = Wanted::new(["opt/fc".to_string()]);
        let l = layer(&[
            ("opt", None, Some("/srv")),
            ("opt/fc/link", None, Some("../elsewhere")),
            ("srv/x", Some(b"x"), None),
        ]);
        let v = scan_all(&[l], &w, d.path());
        assert_eq!(v.get("opt"), Some(Node::Symlink { target: "/srv".into() }));
        assert_eq!(
            v.get("opt/fc/link"),
            Some(Node::Symlink {
                target: "../elsewhere".into()
            })
        );
        assert!(v.get("srv/x").is_none());
    }

    #[test]
    fn gzip_layers_are_read_and_hashed_uncompressed() {
        use std::io::Write;
        let plain = layer(&[("opt/fc/a", Some(b"a"), None)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let d = tempfile::tempdir().unwrap();
        let task = Silent.task("t", None);
        let w = Wanted::new(["opt/fc".to_string()]);
        let (id, size, changes) = scan_layer(&mut &gz[..], "t", &w, d.path(), &*task).unwrap();
        assert_eq!(id, format!("sha256:{}", crate::digest::sha256_hex(&plain)));
        assert_eq!(size, plain.len() as u64);
        assert_eq!(changes.len(), 1);
    }
}
