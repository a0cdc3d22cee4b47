//! Images without the engine's export: fetched by digest from a registry (the recipe's
//! `[registry] mirror`, upstream's or an intranet one) or read from an OCI image layout directory
//! (`oci_layout`, what `skopeo copy ... oci:DIR:TAG` writes).
//!
//! Two phases, as for the other inputs:
//! - [`resolve`], before anything is written: each image's manifest (an index or manifest list
//!   narrowed to the recipe's platform; schema 1 refused), checked against a pinned `digest`, and
//!   its config fetched and hashed (the image id), its `rootfs.diff_ids` matched one to one with
//!   the manifest's layers. The first problem of every image is reported, all images together.
//! - [`store`], while writing: each layer in order, skipped without a request when its diff id is
//!   already stored (shared with an image before it, or — `pack --base` — in the base bundle),
//!   else streamed once: its size held to the descriptor's (counted, never used to allocate), the
//!   SHA-256 of its bytes to the descriptor's digest, and of its decompressed bytes to the diff
//!   id. A gzip or zstd blob is stored as it is (the registry's bytes, no recompression: what
//!   makes this fast), under the extension of its own compression; a plain tar, or every layer
//!   with `--recompress`, gets the bundle's compression as engine layers do.
//!
//! Nothing is staged: the blob streams from the socket or the file into the bundle, memory
//! bounded by the buffers. A mismatch found while streaming fails the pack naming the image, the
//! layer's digest, what was expected and what was found (the partial output is removed as for
//! any failed pack).

use super::inputs::Plan;
use crate::bundle::{layout, BundleWriter};
use crate::digest::{is_sha256_hex, sha256_hex, Hasher};
use crate::error::{Error, Kind, Result};
use crate::manifest::{self as format, Compression, ImageSource, RecipeImage};
use crate::progress::Reporter;
use crate::registry::client::Client;
use crate::registry::{parse_reference, Target};
use crate::savefile::{self, SavedImage, StoredLayer};
use serde::Deserialize;
use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::io::{StreamReader, SyncIoBridge};

/// The largest manifest or index read (distribution's own limit).
const MANIFEST_MAX: u64 = 4 << 20;
/// The largest image config read (real ones are a few KiB; a huge history stays far below).
const CONFIG_MAX: u64 = 8 << 20;

/// The registry images without a source of their own come from: the recipe's `[registry]`, or
/// `pack --mirror`.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub target: Target,
    /// Docker Hub official images (one-component names) under `PREFIX/library/`.
    pub library: bool,
}

impl Mirror {
    /// Where `reference` is in the mirror: `(repository, tag or digest to ask for, full name)`.
    /// Its own registry host is dropped and its path placed under the prefix, as `push` places
    /// it, with `library/` in front of a one-component name when the mirror keeps them so.
    pub fn locate(&self, reference: &str, pinned: Option<&str>) -> Result<(String, String, String)> {
        let parsed = parse_reference(reference)?;
        let path = if self.library && !parsed.path.contains('/') {
            format!("library/{}", parsed.path)
        } else {
            parsed.path.clone()
        };
        let placed = self.target.place(&path)?;
        let wanted = pinned
            .map(str::to_string)
            .or(parsed.tag.clone())
            .unwrap_or_else(|| "latest".to_string());
        let sep = if wanted.starts_with("sha256:") { '@' } else { ':' };
        let full = format!("{}/{}{sep}{wanted}", self.target.host, placed.repository);
        Ok((placed.repository, wanted, full))
    }
}

/// Where an image's manifest and blobs are read.
#[derive(Clone)]
pub(super) enum Origin {
    Registry { client: Arc<Client>, repository: String },
    Layout { dir: PathBuf },
}

/// A content descriptor (OCI image spec): what a manifest says a blob is.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// An image found and checked: its manifest, config and layers, nothing of its layers read yet.
#[derive(Clone)]
pub(super) struct Resolved {
    /// The recipe's reference (the name it keeps in the bundle).
    pub reference: String,
    pub origin: Origin,
    /// How messages name where it was found (`HOST/REPO:TAG`, `OCI layout DIR`).
    pub place: String,
    /// The digest of the manifest that was read (the index's when it was narrowed).
    pub manifest_digest: String,
    pub config: Vec<u8>,
    /// `sha256:<hex>` of the config: the image id.
    pub id: String,
    pub os: String,
    pub arch: String,
    /// Each layer's descriptor with its diff id, bottom to top.
    pub layers: Vec<(Descriptor, String)>,
}

/// How a layer blob is compressed, from its media type (`None`: a plain tar); an error for a
/// media type pack does not read (foreign or non-distributable layers, artifacts of other kinds).
pub(super) fn blob_compression(media_type: &str) -> std::result::Result<Option<Compression>, ()> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar+gzip" | "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            Ok(Some(Compression::Gzip))
        }
        "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Some(Compression::Zstd)),
        "application/vnd.oci.image.layer.v1.tar" | "application/vnd.docker.image.rootfs.diff.tar" => Ok(None),
        _ => Err(()),
    }
}

const SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];
const INDEXES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const CONFIGS: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// A manifest, an index or a manifest list: the fields pack reads of each.
#[derive(Deserialize)]
struct Doc {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<IndexEntry>,
    /// Schema 1's layers: only looked at to refuse it.
    #[serde(rename = "fsLayers")]
    fs_layers: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct IndexEntry {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    variant: Option<String>,
}

/// What a manifest turned out to be: an image manifest (config, layers) or an index.
#[derive(Debug)]
enum Parsed {
    Image(Option<Descriptor>, Vec<Descriptor>),
    Index(Vec<IndexEntry>),
}

/// Parse a manifest's bytes: an image manifest or an index; schema 1 refused.
fn classify(bytes: &[u8], media_type: &str) -> std::result::Result<Parsed, String> {
    let doc: Doc = serde_json::from_slice(bytes).map_err(|e| format!("its manifest is not JSON of a manifest: {e}"))?;
    let mt = doc.media_type.clone().unwrap_or_else(|| media_type.to_string());
    if SCHEMA1.contains(&mt.as_str()) || doc.schema_version == Some(1) || doc.fs_layers.is_some() {
        return Err(
            "its manifest is Docker schema 1 (deprecated, without a config, so no image id can be checked); bkbundle reads schema 2 and OCI manifests".into(),
        );
    }
    if INDEXES.contains(&mt.as_str()) || (!doc.manifests.is_empty() && doc.config.is_none()) {
        return Ok(Parsed::Index(doc.manifests));
    }
    Ok(Parsed::Image(doc.config, doc.layers))
}

/// The entry of an index for `platform` (`os/arch[/variant]`): os and architecture equal, the
/// variant equal when asked for (else one without a variant first). Attestation entries
/// (platform `unknown/unknown`) never match.
fn pick_platform<'a>(entries: &'a [IndexEntry], platform: &str) -> std::result::Result<&'a IndexEntry, String> {
    let (os, arch, variant) =
        format::parse_platform(platform).ok_or_else(|| format!("platform {platform:?} is not os/arch[/variant]"))?;
    let candidates: Vec<&IndexEntry> = entries
        .iter()
        .filter(|e| {
            e.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == arch)
        })
        .filter(|e| match &variant {
            Some(v) => e.platform.as_ref().and_then(|p| p.variant.as_ref()) == Some(v),
            None => true,
        })
        .collect();
    let best = candidates
        .iter()
        .find(|e| e.platform.as_ref().is_some_and(|p| p.variant.is_none()))
        .or(candidates.first());
    best.copied().ok_or_else(|| {
        let offered: Vec<String> = entries
            .iter()
            .filter_map(|e| e.platform.as_ref())
            .filter(|p| p.os != "unknown")
            .map(|p| match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            })
            .collect();
        format!(
            "it is a multi-platform image without {platform} (it has {})",
            if offered.is_empty() {
                "no platform entries".to_string()
            } else {
                offered.join(", ")
            }
        )
    })
}

/// A problem with an image fetched from a registry or an OCI layout, before anything is written.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("image {image}: {place} has no such manifest")]
    NoManifest { image: String, place: String, layout: bool },
    #[error("image {image}: the manifest of {place} is {found}, not the pinned digest {expected}")]
    Pinned {
        image: String,
        place: String,
        expected: String,
        found: String,
    },
    #[error("image {image}: {place}: {why}")]
    Bad {
        image: String,
        place: String,
        why: String,
        layout: bool,
    },
    #[error("image {image}: {place}: {what} {digest} is {found}, expected {expected}")]
    Mismatch {
        image: String,
        place: String,
        what: String,
        digest: String,
        expected: String,
        found: String,
        layout: bool,
    },
    #[error("image {image}: not asked: the registry did not answer for image {first}")]
    NotAsked { image: String, first: String },
    #[error("image {image}: OCI layout {}: {why}", dir.display())]
    Layout { image: String, dir: PathBuf, why: String },
}

impl From<RemoteError> for Error {
    fn from(e: RemoteError) -> Error {
        use RemoteError as R;
        let (kind, hint) = match &e {
            R::NoManifest { layout: false, .. } => (Kind::Input, "check the reference and the recipe's [registry] mirror (`skopeo inspect docker://NAME` lists what the registry serves); `library = true` places one-word names under library/"),
            R::NoManifest { layout: true, .. } => (Kind::Input, "copy the image into the layout (`skopeo copy docker://IMAGE oci:DIR:TAG`) or fix `digest`; its index.json lists what it holds"),
            R::Pinned { .. } => (Kind::Input, "the image under that name changed since the digest was pinned: pin the new digest after checking it, or fetch the pinned one by giving the old tag"),
            R::Bad { layout: false, .. } | R::Mismatch { layout: false, .. } => (Kind::External, "the registry served damaged or unexpected data: check the registry (or a proxy in front of it), then run pack again"),
            R::Bad { layout: true, .. } | R::Mismatch { layout: true, .. } => (Kind::Input, "the OCI layout is damaged or incomplete: copy the image into it again (`skopeo copy ... oci:DIR:TAG`)"),
            R::NotAsked { .. } => (Kind::External, "make the registry reachable and run pack again"),
            R::Layout { .. } => (Kind::Input, "give `oci_layout` the directory skopeo wrote (`skopeo copy ... oci:DIR:TAG`: oci-layout, index.json, blobs/); paths are relative to the recipe"),
        };
        Error::new(kind, e.to_string()).hint(hint)
    }
}

/// `e` with the image named first, unless it names it already.
fn naming(image: &str, e: Error) -> Error {
    if e.message.starts_with("image ") {
        return e;
    }
    let mut out = Error::new(e.kind, format!("image {image}: {}", e.message));
    out.hints = e.hints;
    out
}

/// Whether an error says that the registry could not be reached at all.
fn unreachable(e: &Error) -> bool {
    e.kind == Kind::External && e.message.contains("cannot connect")
}

/// The remote images of a pack: the mirror and its client, and every image found.
#[derive(Default)]
pub(super) struct Remote {
    pub mirror: Option<Mirror>,
    client: Option<Arc<Client>>,
    /// Images resolved, by recipe reference.
    pub images: Vec<Resolved>,
    /// The first image whose registry could not be reached: the others are not asked.
    unreachable: Option<String>,
}

impl Remote {
    /// A mirror (when the recipe or `--mirror` names one) and a client for it; nothing is sent.
    pub fn new(plan: &Plan) -> Result<Remote> {
        let mut r = Remote {
            mirror: plan.mirror.clone(),
            ..Remote::default()
        };
        if let Some(m) = &r.mirror {
            r.client = Some(Arc::new(Client::new(&m.target.host, &plan.access)?));
        }
        Ok(r)
    }

    /// The resolved image of `reference`, if it was resolved.
    pub fn get(&self, reference: &str) -> Option<&Resolved> {
        self.images.iter().find(|i| i.reference == reference)
    }

    /// Find and check one image: its manifest (narrowed to `platform`), its config, its layers'
    /// diff ids. `source` is where the recipe says it is.
    pub async fn resolve(
        &mut self,
        plan: &Plan,
        reference: &str,
        source: ImageSource<'_>,
        pinned: Option<&str>,
        platform: &str,
    ) -> Result<Resolved> {
        if let Some(r) = self.get(reference) {
            return Ok(r.clone());
        }
        let found = match source {
            ImageSource::OciLayout(dir) => resolve_layout(reference, &plan.base.join(dir), pinned, platform),
            ImageSource::Mirror => {
                if let Some(first) = &self.unreachable {
                    return Err(RemoteError::NotAsked {
                        image: reference.to_string(),
                        first: first.clone(),
                    }
                    .into());
                }
                let (Some(m), Some(c)) = (&self.mirror, &self.client) else {
                    return Err(Error::internal(format!(
                        "image {reference}: no mirror to fetch it from"
                    )));
                };
                // The client's errors name the registry and the request; say which image too.
                let r = resolve_registry(reference, m, c.clone(), pinned, platform)
                    .await
                    .map_err(|e| naming(reference, e));
                if r.as_ref().err().is_some_and(unreachable) {
                    self.unreachable = Some(reference.to_string());
                }
                r
            }
            ImageSource::Engine | ImageSource::Archive(_) => {
                return Err(Error::internal(format!(
                    "image {reference}: not an image of a registry or an OCI layout"
                )))
            }
        }?;
        tracing::info!(
            image = reference,
            place = %found.place,
            manifest = %found.manifest_digest,
            id = %found.id,
            "image resolved"
        );
        self.images.push(found.clone());
        Ok(found)
    }

    /// Resolve every `[[images]]` entry that comes from the mirror or an OCI layout; each
    /// image's first problem goes to `problems`.
    pub async fn resolve_recipe(&mut self, plan: &Plan, problems: &mut Vec<Error>) {
        let mirror = self.mirror.is_some();
        for img in &plan.recipe.images {
            let source = img.source(mirror);
            if !matches!(source, ImageSource::Mirror | ImageSource::OciLayout(_)) {
                continue;
            }
            let platform = platform_of(plan, img);
            if let Err(e) = self
                .resolve(plan, &img.reference, source, img.pinned(), &platform)
                .await
            {
                problems.push(e);
            }
        }
    }
}

/// The platform to take of `img`: its own, the recipe's `[registry] platform`, else linux/amd64.
pub(super) fn platform_of(plan: &Plan, img: &RecipeImage) -> String {
    img.platform
        .clone()
        .or_else(|| plan.recipe.registry.as_ref().and_then(|r| r.platform.clone()))
        .unwrap_or_else(|| format::DEFAULT_PLATFORM.to_string())
}

/// The pieces of resolution both origins share: the manifest's bytes in, the image out.
struct Reader<'a> {
    image: &'a str,
    place: String,
    layout: bool,
}

impl Reader<'_> {
    fn bad(&self, why: impl Into<String>) -> Error {
        RemoteError::Bad {
            image: self.image.to_string(),
            place: self.place.clone(),
            why: why.into(),
            layout: self.layout,
        }
        .into()
    }

    fn mismatch(&self, what: &str, digest: &str, expected: String, found: String) -> Error {
        RemoteError::Mismatch {
            image: self.image.to_string(),
            place: self.place.clone(),
            what: what.to_string(),
            digest: digest.to_string(),
            expected,
            found,
            layout: self.layout,
        }
        .into()
    }

    /// A manifest's bytes against the digest it was asked for by (when it was).
    fn check_digest(&self, bytes: &[u8], asked: Option<&str>, pinned: bool) -> Result<String> {
        let digest = format!("sha256:{}", sha256_hex(bytes));
        if let Some(want) = asked.filter(|w| *w != digest) {
            if pinned {
                return Err(RemoteError::Pinned {
                    image: self.image.to_string(),
                    place: self.place.clone(),
                    expected: want.to_string(),
                    found: digest,
                }
                .into());
            }
            return Err(self.mismatch("manifest", want, want.to_string(), digest));
        }
        Ok(digest)
    }

    /// The image from its manifest and config: config digest, size and media type checked,
    /// diff ids one per layer, every layer of a media type pack reads.
    fn image(
        &self,
        origin: Origin,
        manifest_digest: String,
        config_desc: Option<Descriptor>,
        layers: Vec<Descriptor>,
        config: Vec<u8>,
    ) -> Result<Resolved> {
        let Some(cd) = config_desc else {
            return Err(self.bad("its manifest has no config"));
        };
        let found = format!("sha256:{}", sha256_hex(&config));
        if found != cd.digest {
            return Err(self.mismatch("config", &cd.digest, cd.digest.clone(), found));
        }
        let cfg: crate::savefile::ImageConfig = serde_json::from_slice(&config)
            .map_err(|e| self.bad(format!("config {}: not an image config: {e}", cd.digest)))?;
        let diff_ids = cfg.rootfs.map(|r| r.diff_ids).unwrap_or_default();
        if diff_ids.len() != layers.len() {
            return Err(self.bad(format!(
                "its config lists {} layer diff ids, its manifest {} layers",
                diff_ids.len(),
                layers.len()
            )));
        }
        for (l, d) in layers.iter().zip(&diff_ids) {
            if blob_compression(&l.media_type).is_err() {
                return Err(self.bad(format!(
                    "layer {} has media type {:?}, which bkbundle does not read (it reads tar layers, gzip, zstd or uncompressed)",
                    l.digest, l.media_type
                )));
            }
            if !is_digest(&l.digest) || !is_digest(d) {
                return Err(self.bad(format!(
                    "layer {} (diff id {d}) is not named by a sha256 digest",
                    l.digest
                )));
            }
        }
        Ok(Resolved {
            reference: self.image.to_string(),
            origin,
            place: self.place.clone(),
            manifest_digest,
            id: found,
            os: cfg.os.unwrap_or_default(),
            arch: cfg.architecture.unwrap_or_default(),
            config,
            layers: layers.into_iter().zip(diff_ids).collect(),
        })
    }

    /// The config descriptor: a media type of an image config, a size pack will read.
    fn config_ok(&self, cd: &Option<Descriptor>) -> Result<()> {
        if let Some(cd) = cd {
            if !cd.media_type.is_empty() && !CONFIGS.contains(&cd.media_type.as_str()) {
                return Err(self.bad(format!(
                    "its config has media type {:?}: not a container image (an artifact of another kind?)",
                    cd.media_type
                )));
            }
            if cd.size > CONFIG_MAX {
                return Err(self.bad(format!(
                    "its config is {} bytes (at most {CONFIG_MAX} are read)",
                    cd.size
                )));
            }
            if !is_digest(&cd.digest) {
                return Err(self.bad(format!("its config digest {:?} is not sha256:<hex>", cd.digest)));
            }
        }
        Ok(())
    }
}

fn is_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(is_sha256_hex)
}

/// Resolve an image of the mirror.
async fn resolve_registry(
    reference: &str,
    mirror: &Mirror,
    client: Arc<Client>,
    pinned: Option<&str>,
    platform: &str,
) -> Result<Resolved> {
    let (repository, wanted, full) = mirror.locate(reference, pinned)?;
    let rd = Reader {
        image: reference,
        place: full.clone(),
        layout: false,
    };
    let Some((bytes, media_type)) = client.manifest_bytes(&repository, &wanted).await? else {
        return Err(RemoteError::NoManifest {
            image: reference.to_string(),
            place: format!("registry {}: {full}", client.display()),
            layout: false,
        }
        .into());
    };
    let asked = wanted.starts_with("sha256:").then_some(wanted.as_str());
    let manifest_digest = rd.check_digest(&bytes, asked, pinned.is_some())?;
    let (config_desc, layers) = match classify(&bytes, &media_type).map_err(|w| rd.bad(w))? {
        Parsed::Image(c, l) => (c, l),
        Parsed::Index(entries) => {
            let e = pick_platform(&entries, platform).map_err(|w| rd.bad(w))?;
            let Some((sub, sub_type)) = client.manifest_bytes(&repository, &e.digest).await? else {
                return Err(rd.bad(format!(
                    "its index names manifest {} for {platform}, which the registry does not have",
                    e.digest
                )));
            };
            rd.check_digest(&sub, Some(&e.digest), false)?;
            match classify(
                &sub,
                if e.media_type.is_empty() {
                    &sub_type
                } else {
                    &e.media_type
                },
            )
            .map_err(|w| rd.bad(w))?
            {
                Parsed::Image(c, l) => (c, l),
                Parsed::Index(_) => {
                    return Err(rd.bad(format!(
                        "its index's entry {} for {platform} is an index again",
                        e.digest
                    )))
                }
            }
        }
    };
    rd.config_ok(&config_desc)?;
    let config = match &config_desc {
        Some(cd) => fetch_small(&client, &repository, cd, &rd).await?,
        None => Vec::new(),
    };
    let origin = Origin::Registry { client, repository };
    rd.image(origin, manifest_digest, config_desc, layers, config)
}

/// A small blob (a config) of at most its descriptor's size, read whole.
async fn fetch_small(client: &Client, repository: &str, d: &Descriptor, rd: &Reader<'_>) -> Result<Vec<u8>> {
    use futures_util::StreamExt;
    let Some(mut s) = client.blob_stream(repository, &d.digest).await? else {
        return Err(rd.bad(format!("its config {} is not in the registry", d.digest)));
    };
    let mut out = Vec::new();
    while let Some(chunk) = s.body.next().await {
        let chunk = chunk.map_err(|e| rd.bad(format!("reading config {}: {e}", d.digest)))?;
        if out.len() as u64 + chunk.len() as u64 > d.size {
            return Err(rd.mismatch("config", &d.digest, format!("{} bytes", d.size), "more bytes".into()));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Resolve an image of an OCI layout directory: the index entry the pinned digest names, else
/// the one whose `org.opencontainers.image.ref.name` is the reference, its tag or its full name,
/// else the only one.
fn resolve_layout(reference: &str, dir: &Path, pinned: Option<&str>, platform: &str) -> Result<Resolved> {
    let layout_err = |why: String| -> Error {
        RemoteError::Layout {
            image: reference.to_string(),
            dir: dir.to_path_buf(),
            why,
        }
        .into()
    };
    if !dir.join("oci-layout").is_file() || !dir.join("index.json").is_file() {
        return Err(layout_err(
            "not an OCI image layout (no oci-layout or index.json)".into(),
        ));
    }
    let rd = Reader {
        image: reference,
        place: format!("OCI layout {}", dir.display()),
        layout: true,
    };
    let index =
        read_limited(&dir.join("index.json"), MANIFEST_MAX).map_err(|e| layout_err(format!("index.json: {e}")))?;
    let entries = match classify(&index, "application/vnd.oci.image.index.v1+json")
        .map_err(|w| rd.bad(format!("index.json: {w}")))?
    {
        Parsed::Index(e) => e,
        Parsed::Image(..) => return Err(layout_err("index.json is not an index".into())),
    };
    let names: Vec<&str> = entries
        .iter()
        .filter_map(|e| {
            e.annotations
                .get("org.opencontainers.image.ref.name")
                .map(String::as_str)
        })
        .collect();
    let parsed = parse_reference(reference).ok();
    let tag = parsed
        .as_ref()
        .and_then(|p| p.tag.clone())
        .unwrap_or_else(|| "latest".into());
    let entry = match pinned {
        Some(d) => entries.iter().find(|e| e.digest == d),
        None => {
            let named: Vec<&IndexEntry> = entries
                .iter()
                .filter(|e| {
                    e.annotations.get("org.opencontainers.image.ref.name").is_some_and(|n| {
                        n == reference
                            || n == &tag
                            || crate::install::offline::normalize_ref(n)
                                == crate::install::offline::normalize_ref(reference)
                    })
                })
                .collect();
            match (named.len(), entries.len()) {
                (1, _) => named.first().copied(),
                (0, 1) => entries.first(),
                _ => None,
            }
        }
    };
    let Some(entry) = entry else {
        let holds = if names.is_empty() {
            format!("{} untagged entries", entries.len())
        } else {
            names.join(", ")
        };
        return Err(match pinned {
            Some(d) => RemoteError::NoManifest {
                image: reference.to_string(),
                place: format!("OCI layout {} (holding {holds}): {d}", dir.display()),
                layout: true,
            }
            .into(),
            None => layout_err(format!(
                "it holds {holds}, none (or more than one) named {reference} or {tag}: give the image's `digest`"
            )),
        });
    };
    let blob = |d: &str| blob_path(dir, d);
    let read_manifest = |d: &str| -> Result<Vec<u8>> {
        let p = blob(d).ok_or_else(|| rd.bad(format!("manifest {d} is not named by a sha256 digest")))?;
        let bytes = read_limited(&p, MANIFEST_MAX).map_err(|e| rd.bad(format!("manifest {d}: {e}")))?;
        rd.check_digest(&bytes, Some(d), false)?;
        Ok(bytes)
    };
    let bytes = read_manifest(&entry.digest)?;
    let manifest_digest = entry.digest.clone();
    let (config_desc, layers) = match classify(&bytes, &entry.media_type).map_err(|w| rd.bad(w))? {
        Parsed::Image(c, l) => (c, l),
        Parsed::Index(sub) => {
            let e = pick_platform(&sub, platform).map_err(|w| rd.bad(w))?;
            let b = read_manifest(&e.digest)?;
            match classify(&b, &e.media_type).map_err(|w| rd.bad(w))? {
                Parsed::Image(c, l) => (c, l),
                Parsed::Index(_) => return Err(rd.bad(format!("its index's entry {} is an index again", e.digest))),
            }
        }
    };
    rd.config_ok(&config_desc)?;
    let config = match &config_desc {
        Some(cd) => {
            let p = blob(&cd.digest).ok_or_else(|| rd.bad("config not named by sha256"))?;
            read_limited(&p, CONFIG_MAX).map_err(|e| rd.bad(format!("config {}: {e}", cd.digest)))?
        }
        None => Vec::new(),
    };
    rd.image(
        Origin::Layout { dir: dir.to_path_buf() },
        manifest_digest,
        config_desc,
        layers,
        config,
    )
}

/// `DIR/blobs/sha256/<hex>` for a well-formed digest.
fn blob_path(dir: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:").filter(|h| is_sha256_hex(h))?;
    Some(dir.join("blobs/sha256").join(hex))
}

/// A file of at most `max` bytes, read whole.
fn read_limited(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = fs::File::open(path)?;
    let mut out = Vec::new();
    f.take(max.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Streaming one blob

/// What a blob turned out to be when its stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Found {
    /// More bytes than the descriptor says (counted as they came: the stream is cut there).
    TooLong { expected: u64 },
    /// Fewer bytes than the descriptor says.
    TooShort { expected: u64, found: u64 },
    /// Its SHA-256 is another.
    Digest { found: String },
}

/// A blob's bytes as they are read, counted and hashed: past the descriptor's size, or at the
/// end when size or digest differ, the read fails and `failure` says how.
pub(super) struct Digested<'a, R> {
    inner: R,
    hasher: Option<Hasher>,
    read: u64,
    expected_size: u64,
    expected_digest: String,
    pub failure: Option<Found>,
    progress: &'a dyn Fn(u64),
}

impl<'a, R: Read> Digested<'a, R> {
    pub fn new(inner: R, d: &Descriptor, progress: &'a dyn Fn(u64)) -> Self {
        Digested {
            inner,
            hasher: Some(Hasher::new()),
            read: 0,
            expected_size: d.size,
            expected_digest: d.digest.clone(),
            failure: None,
            progress,
        }
    }

    /// Read what is left (a compressed stream may end before its blob does) so that the whole
    /// blob is counted and hashed.
    pub fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(|_| ())
    }
}

impl<R: Read> Read for Digested<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(f) = &self.failure {
            return Err(io::Error::other(format!("{f:?}")));
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            if let Some(h) = self.hasher.take() {
                let (hex, _) = h.finish();
                let found = format!("sha256:{hex}");
                if self.read != self.expected_size {
                    self.failure = Some(Found::TooShort {
                        expected: self.expected_size,
                        found: self.read,
                    });
                } else if found != self.expected_digest {
                    self.failure = Some(Found::Digest { found });
                }
                if let Some(f) = &self.failure {
                    return Err(io::Error::other(format!("{f:?}")));
                }
            }
            return Ok(0);
        }
        match self.read.checked_add(n as u64) {
            Some(t) if t <= self.expected_size => self.read = t,
            _ => {
                self.failure = Some(Found::TooLong {
                    expected: self.expected_size,
                });
                return Err(io::Error::other("blob longer than its descriptor"));
            }
        }
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        (self.progress)(n as u64);
        Ok(n)
    }
}

impl Resolved {
    /// A layer blob's bytes, unchecked (wrap them in [`Digested`]).
    pub async fn open_blob(&self, d: &Descriptor) -> Result<Box<dyn Read + Send>> {
        match &self.origin {
            Origin::Layout { dir } => {
                let p = blob_path(dir, &d.digest).ok_or_else(|| Error::internal("layer digest checked at resolve"))?;
                let f = fs::File::open(&p).map_err(|e| {
                    Error::from(RemoteError::Bad {
                        image: self.reference.clone(),
                        place: self.place.clone(),
                        why: format!("layer {}: {}: {e}", d.digest, p.display()),
                        layout: true,
                    })
                })?;
                Ok(Box::new(io::BufReader::with_capacity(1 << 20, f)))
            }
            Origin::Registry { client, repository } => match client
                .blob_stream(repository, &d.digest)
                .await
                .map_err(|e| naming(&self.reference, e))?
            {
                Some(s) => Ok(Box::new(SyncIoBridge::new(StreamReader::new(s.body)))),
                None => Err(RemoteError::Bad {
                    image: self.reference.clone(),
                    place: self.place.clone(),
                    why: format!("layer {} is not in the registry (the manifest names it)", d.digest),
                    layout: false,
                }
                .into()),
            },
        }
    }

    /// The error for a blob whose stream ended as `found`, or whose decompressed content hashes
    /// to `diff` instead of the config's diff id.
    pub fn blob_error(&self, d: &Descriptor, found: Option<&Found>, diff: Option<(&str, &str)>) -> Error {
        let layout = matches!(self.origin, Origin::Layout { .. });
        let (what, expected, got) = match (found, diff) {
            (Some(Found::TooLong { expected }), _) => {
                ("layer".to_string(), format!("{expected} bytes"), "longer".to_string())
            }
            (Some(Found::TooShort { expected, found }), _) => (
                "layer".to_string(),
                format!("{expected} bytes"),
                format!("{found} bytes"),
            ),
            (Some(Found::Digest { found }), _) => (
                "layer".to_string(),
                format!("content {}", d.digest),
                format!("content {found}"),
            ),
            (None, Some((want, got))) => (
                "layer".to_string(),
                format!("diff id {want}"),
                format!("uncompressed content {got}"),
            ),
            (None, None) => ("layer".to_string(), String::new(), String::new()),
        };
        RemoteError::Mismatch {
            image: self.reference.clone(),
            place: self.place.clone(),
            what,
            digest: d.digest.clone(),
            expected,
            found: got,
            layout,
        }
        .into()
    }

    /// The image as the other sources describe theirs, for the manifest.
    pub fn saved(&self) -> SavedImage {
        SavedImage {
            tags: vec![self.reference.clone()],
            id: self.id.clone(),
            config: self.config.clone(),
            os: self.os.clone(),
            arch: self.arch.clone(),
            layers: self.layers.iter().map(|(_, d)| d.clone()).collect(),
        }
    }
}

/// Layers fetched and skipped, for the pack report.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Fetched {
    pub blobs: usize,
    pub bytes: u64,
    pub skipped: usize,
}

/// Store every layer of the resolved images the bundle does not have yet (`stored`), each blob
/// streamed once; returns the images for the manifest with what was fetched.
pub(super) async fn store(
    plan: &Plan,
    images: &[Resolved],
    writer: &mut BundleWriter,
    stored: &mut HashMap<String, StoredLayer>,
    reporter: &dyn Reporter,
) -> Result<(Vec<(String, SavedImage)>, Fetched)> {
    let mut fetched = Fetched::default();
    let mut zctx = match plan.compression {
        Compression::Zstd if !plan.no_images => {
            Some(savefile::zstd_context(plan.level, plan.threads).map_err(|e| Error::internal(format!("zstd: {e}")))?)
        }
        _ => None,
    };
    let mut out = Vec::new();
    for img in images {
        let todo: u64 = img
            .layers
            .iter()
            .filter(|(_, diff)| !stored.contains_key(diff))
            .map(|(d, _)| d.size)
            .fold(0u64, u64::saturating_add);
        let task = reporter.task(&format!("fetching {}", img.reference), Some(todo));
        let progress = |n: u64| task.advance(n);
        for (d, diff) in &img.layers {
            // The per-layer dedup: a layer the bundle (or the base) has is never requested.
            if stored.contains_key(diff) {
                fetched.skipped += 1;
                continue;
            }
            let raw = img.open_blob(d).await?;
            let layer = tokio::task::block_in_place(|| {
                let mut src = Digested::new(raw, d, &progress);
                let r = store_one(plan, img, d, diff, &mut src, writer, zctx.as_mut());
                if r.is_err() && src.failure.is_none() {
                    // A damaged blob often fails to decompress before its end: read the rest so
                    // that its digest, the real cause, is what the error names.
                    let _ = src.drain();
                }
                match (r, src.failure.clone()) {
                    (_, Some(f)) => Err(img.blob_error(d, Some(&f), None)),
                    (r, None) => r,
                }
            });
            let layer = match layer {
                Ok(l) => l,
                Err(e) => {
                    task.finish();
                    return Err(e);
                }
            };
            fetched.blobs += 1;
            fetched.bytes = fetched.bytes.saturating_add(d.size);
            stored.insert(diff.clone(), layer);
        }
        task.finish();
        out.push((img.reference.clone(), img.saved()));
    }
    Ok((out, fetched))
}

/// Stream one blob into the bundle (or, `--no-images`, only hash and count it), checking its
/// uncompressed content against `diff`.
fn store_one<R: Read>(
    plan: &Plan,
    img: &Resolved,
    d: &Descriptor,
    diff: &str,
    src: &mut Digested<'_, R>,
    writer: &mut BundleWriter,
    zctx: Option<&mut zstd::zstd_safe::CCtx<'static>>,
) -> Result<StoredLayer> {
    let compression = blob_compression(&d.media_type).map_err(|_| Error::internal("media type checked at resolve"))?;
    let source = img.place.clone();
    let read_err = |e: io::Error| Error::external(format!("{source}: layer {}: {e}", d.digest));
    let (got, layer) = match compression {
        Some(c) if !plan.recompress && !plan.no_images => {
            let (got, size, file) = store_as_is(src, c, diff, writer, &read_err)?;
            (
                got,
                StoredLayer {
                    diff_id: diff.to_string(),
                    file,
                    size,
                },
            )
        }
        _ => {
            // A plain tar (or --recompress, or --no-images): through the same path as engine
            // layers, compressed with the bundle's compression under the diff id it hashes to.
            let noop = |_: u64| {};
            let s = savefile::Settings {
                compression: plan.compression,
                level: plan.level,
                threads: plan.threads,
                progress: &noop,
                source: &source,
                store_layers: !plan.no_images,
            };
            let mut scratch = HashMap::new();
            let got = savefile::store_or_describe(&mut *src, writer, &mut scratch, zctx, &s)?;
            src.drain().map_err(read_err)?;
            let layer = scratch
                .remove(&got)
                .ok_or_else(|| Error::internal("a layer just stored is not recorded"))?;
            (got, layer)
        }
    };
    if got != diff {
        return Err(img.blob_error(d, None, Some((diff, &got))));
    }
    Ok(layer)
}

/// Copy a compressed blob into the bundle as it is while decompressing it to hash its content:
/// returns (its diff id as found, its uncompressed size, its bundle path).
fn store_as_is<R: Read>(
    src: &mut Digested<'_, R>,
    c: Compression,
    diff: &str,
    writer: &mut BundleWriter,
    read_err: &dyn Fn(io::Error) -> Error,
) -> Result<(String, u64, String)> {
    let hex = diff.trim_start_matches("sha256:");
    let path = layout::layer_path(hex, c.extension());
    let mut entry = writer.begin(&path, 0o644)?;
    let mut write_err: Option<io::Error> = None;
    let (found, size) = {
        let mut tee = Tee {
            inner: &mut *src,
            out: &mut entry,
            err: &mut write_err,
        };
        let mut hasher = Hasher::new();
        {
            let mut plain: Box<dyn Read + '_> = match c {
                Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut tee)),
                Compression::Zstd => Box::new(
                    zstd::stream::read::Decoder::new(&mut tee).map_err(|e| Error::internal(format!("zstd: {e}")))?,
                ),
            };
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match plain.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => hasher.update(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(read_err(e)),
                }
            }
        }
        io::copy(&mut tee, &mut io::sink()).map_err(read_err)?;
        hasher.finish()
    };
    if let Some(e) = write_err {
        return Err(Error::io("cannot write bundle", Path::new(&path), e));
    }
    let f = entry.finish(None)?;
    Ok((format!("sha256:{found}"), size, f.path))
}

/// A reader that writes what it reads to `out` (the blob's bytes into the bundle entry); a write
/// error is kept for the caller (the read fails with it).
struct Tee<'a, R, W> {
    inner: R,
    out: &'a mut W,
    err: &'a mut Option<io::Error>,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Err(e) = self.out.write_all(&buf[..n]) {
            let msg = e.to_string();
            *self.err = Some(e);
            return Err(io::Error::other(msg));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(os: &str, arch: &str, variant: Option<&str>, digest: &str) -> IndexEntry {
        IndexEntry {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: digest.into(),
            platform: Some(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: variant.map(str::to_string),
            }),
            annotations: HashMap::new(),
        }
    }

    #[test]
    fn platforms_are_picked_from_an_index() {
        let idx = vec![
            entry("linux", "arm", Some("v7"), "a"),
            entry("linux", "arm64", Some("v8"), "b"),
            entry("unknown", "unknown", None, "att"),
            entry("linux", "amd64", None, "c"),
        ];
        assert_eq!(pick_platform(&idx, "linux/amd64").unwrap().digest, "c");
        assert_eq!(pick_platform(&idx, "linux/arm64").unwrap().digest, "b");
        assert_eq!(pick_platform(&idx, "linux/arm/v7").unwrap().digest, "a");
        let e = pick_platform(&idx, "windows/amd64").unwrap_err();
        assert_eq!(
            e,
            "it is a multi-platform image without windows/amd64 (it has linux/arm/v7, linux/arm64/v8, linux/amd64)"
        );
        assert!(pick_platform(&idx, "linux/arm/v6").is_err());
    }

    #[test]
    fn manifests_are_told_apart_and_schema1_refused() {
        let img = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:aa","size":3},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:bb","size":5}]}"#;
        assert!(matches!(classify(img, ""), Ok(Parsed::Image(Some(_), l)) if l.len() == 1));
        let idx = br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:cc","size":1,"platform":{"os":"linux","architecture":"amd64"}}]}"#;
        assert!(
            matches!(classify(idx, "application/vnd.oci.image.index.v1+json"), Ok(Parsed::Index(e)) if e.len() == 1)
        );
        let s1 = br#"{"schemaVersion":1,"name":"x","tag":"1","fsLayers":[{"blobSum":"sha256:dd"}]}"#;
        assert!(
            classify(s1, "application/vnd.docker.distribution.manifest.v1+prettyjws")
                .unwrap_err()
                .contains("schema 1")
        );
        assert!(classify(b"<html>", "text/html").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn layer_media_types() {
        assert_eq!(
            blob_compression("application/vnd.oci.image.layer.v1.tar+gzip"),
            Ok(Some(Compression::Gzip))
        );
        assert_eq!(
            blob_compression("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Ok(Some(Compression::Gzip))
        );
        assert_eq!(
            blob_compression("application/vnd.oci.image.layer.v1.tar+zstd"),
            Ok(Some(Compression::Zstd))
        );
        assert_eq!(blob_compression("application/vnd.oci.image.layer.v1.tar"), Ok(None));
        assert!(blob_compression("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip").is_err());
        assert!(blob_compression("application/vnd.cncf.helm.chart.content.v1.tar+gzip").is_err());
    }

    #[test]
    fn mirrors_place_plain_references_as_upstream_does() {
        let m = Mirror {
            target: Target::parse("bk-lite.tencentcloudcr.com/bklite").unwrap(),
            library: true,
        };
        let (repo, want, full) = m.locate("postgres:15", None).unwrap();
        assert_eq!((repo.as_str(), want.as_str()), ("bklite/library/postgres", "15"));
        assert_eq!(full, "bk-lite.tencentcloudcr.com/bklite/library/postgres:15");
        let (repo, want, _) = m.locate("bklite/server", None).unwrap();
        assert_eq!((repo.as_str(), want.as_str()), ("bklite/bklite/server", "latest"));
        let d = format!("sha256:{}", "a".repeat(64));
        let (_, want, full) = m.locate("pgvector/pgvector:pg15", Some(&d)).unwrap();
        assert_eq!(want, d);
        assert_eq!(full, format!("bk-lite.tencentcloudcr.com/bklite/pgvector/pgvector@{d}"));
        let plain = Mirror { library: false, ..m };
        assert_eq!(plain.locate("redis:5.0.14", None).unwrap().0, "bklite/redis");
    }

    #[test]
    fn blobs_are_held_to_their_descriptor() {
        let data = b"hello layer".to_vec();
        let d = Descriptor {
            media_type: String::new(),
            digest: format!("sha256:{}", sha256_hex(&data)),
            size: data.len() as u64,
        };
        let noop = |_: u64| {};
        let mut ok = Digested::new(&data[..], &d, &noop);
        ok.drain().unwrap();
        assert_eq!(ok.failure, None);
        let short = Descriptor { size: 100, ..d.clone() };
        let mut s = Digested::new(&data[..], &short, &noop);
        assert!(s.drain().is_err());
        assert_eq!(
            s.failure,
            Some(Found::TooShort {
                expected: 100,
                found: 11
            })
        );
        let long = Descriptor { size: 4, ..d.clone() };
        let mut l = Digested::new(&data[..], &long, &noop);
        assert!(l.drain().is_err());
        assert_eq!(l.failure, Some(Found::TooLong { expected: 4 }));
        let mut other = data.clone();
        other[0] ^= 1;
        let mut t = Digested::new(&other[..], &d, &noop);
        assert!(t.drain().is_err());
        assert!(matches!(t.failure, Some(Found::Digest { .. })));
    }
}
