//! Reads a `docker save` stream or an OCI image archive and stores its images in the bundle:
//! each distinct layer once (as its uncompressed tar, recompressed), each config as is.
//!
//! Both layouts engines produce are understood: the legacy one (`<id>/layer.tar`, `<hex>.json`,
//! `manifest.json`; Docker up to 24) and the OCI one (`blobs/sha256/<hex>`, `index.json`, plus
//! `manifest.json`; Docker 25+, skopeo `oci-archive`). The stream is read once, front to back:
//! which file is a layer and which image it belongs to is only known from `manifest.json` /
//! `index.json`, which come last, so every large blob is stored as a layer as it streams by
//! (named after the SHA-256 of its uncompressed content, its diff id) and small JSON files are kept
//! in memory (bounded) until the end. A layer already stored is dropped again right after it has
//! been hashed, so shared layers take space once whatever the source.

use crate::bundle::{self, BundleWriter};
use crate::digest::{sha256_hex, Hasher};
use crate::error::{Error, Result};
use crate::manifest::Compression;
use serde::Deserialize;
use std::collections::HashMap;
use std::io::{self, Cursor, Read, Write};

/// A layer stored in the bundle.
#[derive(Debug, Clone)]
pub struct StoredLayer {
    pub diff_id: String,
    pub file: String,
    pub size: u64,
}

/// An image found in the archive.
#[derive(Debug, Clone)]
pub struct SavedImage {
    pub tags: Vec<String>,
    pub id: String,
    pub config: Vec<u8>,
    pub os: String,
    pub arch: String,
    pub layers: Vec<String>,
}

pub struct Settings<'a> {
    pub compression: Compression,
    pub level: i32,
    pub threads: u32,
    /// Called with the number of source bytes consumed, for progress.
    pub progress: &'a (dyn Fn(u64) + Sync),
    /// Names the source in messages (`Docker engine` or the archive's path).
    pub source: &'a str,
    /// Store each layer in the bundle. When false (`pack --no-images`) a layer is only hashed and
    /// counted as it streams by (its diff id checked against the config as always) and recorded
    /// with no file.
    pub store_layers: bool,
}

/// Small JSON files kept in memory per archive; far above any real manifest/config set.
const META_BUDGET: usize = 32 << 20;

fn bad(source: &str, what: impl std::fmt::Display) -> Error {
    Error::input(format!("{source}: {what}"))
        .hint("the image archive is not a complete `docker save` or OCI archive: export it again")
}

/// Read the archive, store its layers in `out` (skipping those in `stored`), return its images.
pub fn ingest<R: Read>(
    src: R,
    out: &mut BundleWriter,
    stored: &mut HashMap<String, StoredLayer>,
    s: &Settings,
) -> Result<Vec<SavedImage>> {
    // One compression context for every layer of the archive: a fresh multi-threaded context per
    // layer starts new worker threads and buffers each time, and peak memory crept up with the
    // number of layers.
    let mut zctx = match s.compression {
        Compression::Zstd if s.store_layers => {
            Some(zstd_context(s.level, s.threads).map_err(|e| Error::internal(format!("zstd: {e}")))?)
        }
        Compression::Zstd | Compression::Gzip => None,
    };
    let mut on_layer = |path: &str, layer: &mut dyn Read| {
        // An OCI blob named by a diff id already stored (a delta's base layer, an uncompressed
        // export of Docker 25+) is only hashed, to check it, not compressed again and dropped.
        let known = path
            .strip_prefix("blobs/sha256/")
            .map(|hex| format!("sha256:{hex}"))
            .filter(|d| stored.contains_key(d));
        if let Some(want) = known {
            let got = describe_layer(layer, &mut HashMap::new(), s)?;
            if got != want {
                return Err(bad(
                    s.source,
                    format!("blob {path} is named by digest {want}, but its content hashes to {got}"),
                ));
            }
            return Ok(got);
        }
        store_or_describe(layer, out, stored, zctx.as_mut(), s)
    };
    read_archive(src, s.source, s.progress, &mut on_layer)
}

/// One layer blob (compressed or not) stored under its diff id with the bundle's compression, or
/// with `store_layers` false only hashed and counted; returns its diff id. A layer already in
/// `stored` is hashed and dropped again. Archive images and registry blobs that are plain tars
/// (or `pack --recompress`) all go through here.
pub fn store_or_describe<R: Read>(
    layer: R,
    out: &mut BundleWriter,
    stored: &mut HashMap<String, StoredLayer>,
    zctx: Option<&mut zstd::zstd_safe::CCtx<'static>>,
    s: &Settings,
) -> Result<String> {
    if s.store_layers {
        store_layer(layer, out, stored, zctx, s)
    } else {
        describe_layer(layer, stored, s)
    }
}

/// One pass over a `docker save` or OCI archive: every layer blob is handed to `on_layer` (with
/// its path in the archive) as it streams by, which reads it and returns its diff id (the SHA-256
/// of its uncompressed content); the images are known at the end, from `manifest.json` or
/// `index.json`. `progress` is called with the metadata bytes read (`on_layer` reports its own).
/// Pack's image ingest and its extraction of files from images (`pack::extract`) both read
/// archives through it, so they understand the same layouts.
pub fn read_archive<R: Read>(
    src: R,
    source: &str,
    progress: &(dyn Fn(u64) + Sync),
    on_layer: &mut dyn FnMut(&str, &mut dyn Read) -> Result<String>,
) -> Result<Vec<SavedImage>> {
    let streamed = stream_entries(src, source, progress, on_layer)?;
    let items = if let Some(m) = streamed.meta.get("manifest.json") {
        let items: Vec<DockerItem> =
            serde_json::from_slice(m).map_err(|e| bad(source, format!("manifest.json: {e}")))?;
        items
            .into_iter()
            .map(|i| (i.repo_tags.unwrap_or_default(), i.config, i.layers))
            .collect::<Vec<_>>()
    } else if let Some(idx) = streamed.meta.get("index.json") {
        oci_items(idx, &streamed.meta, source)?
    } else {
        return Err(bad(source, "it has neither manifest.json nor index.json"));
    };
    let mut images = Vec::new();
    for (tags, config_path, layer_paths) in items {
        images.push(streamed.image(tags, &config_path, &layer_paths, source)?);
    }
    Ok(images)
}

/// What one pass over the archive leaves: which image is which is only known at its end.
struct Streamed {
    /// Small JSON files (manifests, configs, index) by path.
    meta: HashMap<String, Vec<u8>>,
    /// The diff id of each layer stored, by its path in the archive.
    layer_of: HashMap<String, String>,
    /// Symbolic and hard links, path to target.
    links: HashMap<String, String>,
}

/// The archive read once, front to back: links noted, small JSON kept, every other file handed
/// to `on_layer` as it streams by.
fn stream_entries<R: Read>(
    src: R,
    source: &str,
    progress: &(dyn Fn(u64) + Sync),
    on_layer: &mut dyn FnMut(&str, &mut dyn Read) -> Result<String>,
) -> Result<Streamed> {
    let mut archive = tar::Archive::new(src);
    let mut streamed = Streamed {
        meta: HashMap::new(),
        layer_of: HashMap::new(),
        links: HashMap::new(),
    };
    let mut meta_bytes = 0usize;
    let read_err = |e: io::Error| Error::external(format!("reading images from {source}: {e}"));
    for entry in archive.entries().map_err(read_err)? {
        let mut e = entry.map_err(read_err)?;
        let path = normalize(&String::from_utf8_lossy(&e.path_bytes()));
        let kind = e.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = String::from_utf8_lossy(&e.link_name_bytes().unwrap_or_default()).to_string();
            let base = if kind.is_symlink() {
                parent(&path).to_string()
            } else {
                String::new()
            };
            streamed.links.insert(path, normalize(&format!("{base}/{target}")));
            continue;
        }
        if !(kind.is_file() || kind.is_contiguous()) {
            continue;
        }
        let size = e.size();
        let mut peek = Vec::with_capacity(512);
        (&mut e).take(512).read_to_end(&mut peek).map_err(read_err)?;
        if is_meta(&path, &peek, size) {
            meta_bytes = meta_bytes.saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
            if meta_bytes > META_BUDGET {
                return Err(bad(
                    source,
                    format!("more than {META_BUDGET} bytes of image metadata; is this an image archive?"),
                ));
            }
            let mut data = peek;
            e.read_to_end(&mut data).map_err(read_err)?;
            progress(size);
            streamed.meta.insert(path, data);
            continue;
        }
        let mut layer = Cursor::new(peek).chain(&mut e);
        let diff_id = on_layer(&path, &mut layer).map_err(|err| {
            if err.kind == crate::error::Kind::Io {
                err
            } else {
                Error::new(err.kind, format!("{} (layer {path})", err.message))
            }
        })?;
        streamed.layer_of.insert(path, diff_id);
    }
    Ok(streamed)
}

impl Streamed {
    /// A path with its links followed (bounded, so a link cycle cannot hang the read).
    fn resolve(&self, p: &str) -> String {
        let mut p = normalize(p);
        for _ in 0..16 {
            match self.links.get(&p) {
                Some(t) => p = t.clone(),
                None => break,
            }
        }
        p
    }

    /// One image of the archive's manifest, its layers checked against its config's diff ids so
    /// a damaged image is refused at pack time.
    fn image(&self, tags: Vec<String>, config_path: &str, layer_paths: &[String], source: &str) -> Result<SavedImage> {
        let config = self
            .meta
            .get(&self.resolve(config_path))
            .ok_or_else(|| bad(source, format!("image config {config_path} is missing")))?
            .clone();
        let mut layers = Vec::new();
        for p in layer_paths {
            let diff = self
                .layer_of
                .get(&self.resolve(p))
                .ok_or_else(|| bad(source, format!("layer {p} is missing")))?;
            layers.push(diff.clone());
        }
        let id = format!("sha256:{}", sha256_hex(&config));
        let name = tags.first().cloned().unwrap_or_else(|| id.clone());
        let cfg: ImageConfig =
            serde_json::from_slice(&config).map_err(|e| bad(source, format!("config of {name}: {e}")))?;
        if let Some(rootfs) = &cfg.rootfs {
            if rootfs.diff_ids != layers {
                let detail = rootfs
                    .diff_ids
                    .iter()
                    .zip(&layers)
                    .enumerate()
                    .find(|(_, (a, b))| a != b)
                    .map(|(i, (a, b))| format!("layer {} should be {a} but its content hashes to {b}", i + 1))
                    .unwrap_or_else(|| {
                        format!(
                            "config lists {} layers, the archive has {}",
                            rootfs.diff_ids.len(),
                            layers.len()
                        )
                    });
                return Err(Error::input(format!("{}: image {name}: {detail}", source))
                    .hint("the image in the engine or archive is damaged: remove and pull/load it again"));
            }
        }
        Ok(SavedImage {
            tags,
            id,
            config,
            os: cfg.os.unwrap_or_default(),
            arch: cfg.architecture.unwrap_or_default(),
            layers,
        })
    }
}

/// The one zstd compression context a pack's layers share (level, worker threads).
pub fn zstd_context(level: i32, threads: u32) -> io::Result<zstd::zstd_safe::CCtx<'static>> {
    use zstd::zstd_safe::CParameter;
    let mut c = zstd::zstd_safe::CCtx::create();
    let mut set = |p: CParameter| {
        c.set_parameter(p)
            .map(|_| ())
            .map_err(|code| io::Error::other(zstd::zstd_safe::get_error_name(code)))
    };
    set(CParameter::CompressionLevel(level))?;
    set(CParameter::ChecksumFlag(true))?;
    if threads > 1 {
        set(CParameter::NbWorkers(threads))?;
        // Multi-threaded zstd keeps a few jobs in flight, each buffering its input and output;
        // the default job (4x the window, 8 MiB at level 3) put peak memory at ~64 MiB. 2 MiB jobs
        // keep it near 25 MiB whatever the bundle size, for a negligible loss of ratio.
        set(CParameter::JobSize(2 << 20))?;
    }
    Ok(c)
}

/// Hash and count one layer without storing it (`pack --no-images`); returns its diff id.
fn describe_layer<R: Read>(src: R, stored: &mut HashMap<String, StoredLayer>, s: &Settings) -> Result<String> {
    let mut plain = plain_layer(src, s.source)?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match plain.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::external(format!("reading images from {}: {e}", s.source))),
        };
        hasher.update(&buf[..n]);
        (s.progress)(n as u64);
    }
    let (hex, size) = hasher.finish();
    let diff_id = format!("sha256:{hex}");
    stored.entry(diff_id.clone()).or_insert_with(|| StoredLayer {
        diff_id: diff_id.clone(),
        file: String::new(),
        size,
    });
    Ok(diff_id)
}

/// Stream one layer into the bundle; returns its diff id.
fn store_layer<R: Read>(
    src: R,
    out: &mut BundleWriter,
    stored: &mut HashMap<String, StoredLayer>,
    zctx: Option<&mut zstd::zstd_safe::CCtx<'static>>,
    s: &Settings,
) -> Result<String> {
    // A compressed layer (containerd image store, OCI archives) is stored uncompressed-then-
    // recompressed so that its name is its diff id and install can hand the engine a plain tar.
    let mut plain = plain_layer(src, s.source)?;
    let ext = s.compression.extension();
    let mut entry = out.begin(&bundle::layout::layer_path("incoming", ext), 0o644)?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let write_err = |e: io::Error| Error::io("cannot write bundle", std::path::Path::new("(layer)"), e);
    {
        let mut enc: Box<dyn Encoder + '_> = match zctx {
            Some(ctx) => Box::new(zstd::stream::zio::Writer::new(
                &mut entry,
                zstd::stream::raw::Encoder::with_context(ctx),
            )),
            None => Box::new(flate2::write::GzEncoder::new(
                &mut entry,
                flate2::Compression::new(s.level.clamp(1, 9) as u32),
            )),
        };
        loop {
            let n = match plain.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::external(format!("reading images from {}: {e}", s.source))),
            };
            hasher.update(&buf[..n]);
            enc.write_all(&buf[..n]).map_err(write_err)?;
            (s.progress)(n as u64);
        }
        enc.finish_box().map_err(write_err)?;
    }
    let (hex, size) = hasher.finish();
    let diff_id = format!("sha256:{hex}");
    if stored.contains_key(&diff_id) {
        entry.discard()?;
    } else {
        let f = entry.finish(Some(&bundle::layout::layer_path(&hex, ext)))?;
        stored.insert(
            diff_id.clone(),
            StoredLayer {
                diff_id: diff_id.clone(),
                file: f.path,
                size,
            },
        );
    }
    Ok(diff_id)
}

/// A layer blob's uncompressed tar: gzip and zstd layers (OCI archives, the containerd image
/// store) are decompressed, a plain tar passes through.
pub fn plain_layer<'r, R: Read + 'r>(src: R, source: &str) -> Result<Box<dyn Read + 'r>> {
    let mut src = io::BufReader::with_capacity(1 << 16, src);
    let magic = {
        use io::BufRead;
        src.fill_buf()
            .map_err(|e| Error::external(format!("reading images from {source}: {e}")))?
            .to_vec()
    };
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(src))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::new(src).map_err(|e| Error::internal(format!("zstd: {e}")))?)
    } else {
        Box::new(src)
    })
}

/// Both encoders, finished through one call.
trait Encoder: Write {
    fn finish_box(self: Box<Self>) -> io::Result<()>;
}

impl<W: Write> Encoder for zstd::stream::zio::Writer<W, zstd::stream::raw::Encoder<'_>> {
    fn finish_box(mut self: Box<Self>) -> io::Result<()> {
        self.finish()?;
        self.flush()
    }
}

impl<W: Write> Encoder for flate2::write::GzEncoder<W> {
    fn finish_box(self: Box<Self>) -> io::Result<()> {
        (*self).finish().map(|_| ())
    }
}

fn is_meta(path: &str, peek: &[u8], size: u64) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    if matches!(
        base,
        "manifest.json" | "index.json" | "repositories" | "oci-layout" | "json" | "VERSION"
    ) {
        return true;
    }
    if size > 8 << 20 {
        return false;
    }
    matches!(peek.iter().find(|b| !b.is_ascii_whitespace()), Some(b'{') | Some(b'['))
}

fn parent(p: &str) -> &str {
    p.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

/// Collapse `.`, `..` and empty components; archive paths are always relative.
pub(crate) fn normalize(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerItem {
    config: String,
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The fields of an image config pack reads (an archive's, or one fetched by `pack::remote`).
#[derive(Deserialize)]
pub(crate) struct ImageConfig {
    pub os: Option<String>,
    pub architecture: Option<String>,
    pub rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct OciIndex {
    #[serde(default)]
    manifests: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
struct OciDescriptor {
    digest: String,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
struct OciManifest {
    #[serde(default)]
    manifests: Vec<OciDescriptor>,
    config: Option<OciDescriptor>,
    #[serde(default)]
    layers: Vec<OciDescriptor>,
}

fn blob_path(digest: &str) -> String {
    digest.replacen(':', "/", 1).replace("sha256/", "blobs/sha256/")
}

type Item = (Vec<String>, String, Vec<String>);

fn oci_items(index: &[u8], meta: &HashMap<String, Vec<u8>>, source: &str) -> Result<Vec<Item>> {
    let idx: OciIndex = serde_json::from_slice(index).map_err(|e| bad(source, format!("index.json: {e}")))?;
    let mut out = Vec::new();
    let mut queue: Vec<(OciDescriptor, Vec<String>)> = idx
        .manifests
        .into_iter()
        .map(|d| {
            let tags = tags_of(&d);
            (d, tags)
        })
        .collect();
    while let Some((d, tags)) = queue.pop() {
        let path = blob_path(&d.digest);
        let m = meta
            .get(&path)
            .ok_or_else(|| bad(source, format!("manifest {path} is missing")))?;
        let m: OciManifest = serde_json::from_slice(m).map_err(|e| bad(source, format!("{path}: {e}")))?;
        if !m.manifests.is_empty() {
            // A nested index (multi-platform): keep only manifests present in the archive.
            for sub in m.manifests {
                if meta.contains_key(&blob_path(&sub.digest)) {
                    queue.push((sub, tags.clone()));
                }
            }
            continue;
        }
        let config = m.config.ok_or_else(|| bad(source, format!("{path} has no config")))?;
        out.push((
            tags,
            blob_path(&config.digest),
            m.layers.iter().map(|l| blob_path(&l.digest)).collect(),
        ));
    }
    Ok(out)
}

fn tags_of(d: &OciDescriptor) -> Vec<String> {
    if let Some(n) = d.annotations.get("io.containerd.image.name") {
        return vec![n.clone()];
    }
    match d.annotations.get("org.opencontainers.image.ref.name") {
        Some(n) if n.contains(':') || n.contains('/') => vec![n.clone()],
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise() {
        assert_eq!(normalize("./a/../b//c"), "b/c");
        assert_eq!(normalize("abc/../def/layer.tar"), "def/layer.tar");
        assert_eq!(blob_path("sha256:abc"), "blobs/sha256/abc");
    }

    #[test]
    fn metadata_is_told_from_layers() {
        assert!(is_meta("manifest.json", b"[", 10));
        assert!(is_meta("blobs/sha256/aa", b"  {\"x\":1}", 10));
        assert!(!is_meta("blobs/sha256/aa", b"bin/\0\0", 10));
        assert!(!is_meta("abc/layer.tar", b"etc/", 10));
    }
}
