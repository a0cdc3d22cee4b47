//! `bkbundle push`: a bundle's images into an OCI distribution registry, streamed from the
//! bundle's layers.
//!
//! 1. Everything is checked before the first byte is sent: the bundle's structure and signature,
//!    every reference placed under the target (names a registry refuses are listed together),
//!    the registry reached and the credentials accepted (`GET /v2/`).
//! 2. Each (image, repository) whose tags already name the bundle's image id is done: a re-run
//!    sends nothing but a few small requests.
//! 3. Blobs: the config as stored (its digest is the image id); each layer as the registry format
//!    needs it. Sent as stored (gzip bundles, or `--compression zstd`) its digest is known before
//!    sending, so a `HEAD` tells whether it is there. Recompressed (zstd → gzip, the default) it is
//!    decompressed and gzip-compressed on a blocking thread straight into the request body, hashed
//!    on the way; the digest is known at its end and closes the upload. The digest each layer got
//!    is remembered in a small cache file, so a killed push (or the same layer of another bundle)
//!    finds it with a `HEAD` next time. A layer shared by images of several repositories is sent
//!    once and mounted into the others. At most `jobs` uploads at once.
//! 4. A manifest (Docker schema 2 for gzip, OCI for zstd) is put only when all its blobs are in
//!    its repository, under each of the image's tags: nothing is ever half-tagged.

use super::client::{Client, Pushed};
use super::{Access, Placement, Target};
use crate::bundle::{open_verified, Check, OpenOptions, VerifiedBundle};
use crate::digest::HashingWriter;
use crate::error::{Error, Result};
use crate::install::load::ChannelWriter;
use crate::manifest::{Compression, Image, Layer};
use crate::progress::{ProgressReader, Reporter, Task};
use bytes::Bytes;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, OnceCell, Semaphore};

const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const MEDIA_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The largest image config read into memory.
const CONFIG_MAX: u64 = 16 << 20;
/// How many tags of a repository push reads to learn the layer blobs it holds.
const LEARN_TAGS: usize = 16;
/// The largest layer-digest cache file read.
const CACHE_MAX: u64 = 8 << 20;

/// How layers go to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerFormat {
    Gzip,
    Zstd,
}

#[derive(Debug, Clone)]
pub struct PushOptions {
    pub bundle: PathBuf,
    pub target: Target,
    pub access: Access,
    /// References of the bundle's images to push; empty: all.
    pub images: Vec<String>,
    pub format: LayerFormat,
    /// gzip level of recompressed layers.
    pub level: u32,
    pub jobs: usize,
    /// A trusted minisign key: the bundle must be signed by it.
    pub key: Option<PathBuf>,
    pub lock_wait: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub bundle: String,
    pub registry: String,
    /// `https` or `http` (`--registry-insecure`).
    pub transport: &'static str,
    pub format: LayerFormat,
    pub images: Vec<ImageReport>,
    pub blobs: BlobCounts,
    /// Blob bytes sent in this run (0 on a re-run).
    pub bytes_sent: u64,
    pub seconds: f64,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BlobCounts {
    pub uploaded: u64,
    pub mounted: u64,
    pub present: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    /// The bundle's reference.
    pub reference: String,
    /// Where it is now: `HOST/PREFIX/path:tag`.
    pub pushed_as: String,
    pub image_id: String,
    /// `pushed`, or `present` (the tag already named this image: nothing sent).
    pub state: &'static str,
    pub manifest_digest: Option<String>,
    pub blobs: BlobCounts,
}

/// One repository an image goes to, with the tags it gets there.
struct Unit {
    image: Image,
    repository: String,
    placements: Vec<Placement>,
}

/// Where a layer's blob first went in this run.
#[derive(Debug, Clone)]
struct Home {
    digest: String,
    size: u64,
    repository: String,
}

pub fn run(opts: &PushOptions, reporter: &dyn Reporter) -> Result<PushReport> {
    let started = Instant::now();
    let open = OpenOptions {
        require_signature: opts.key.is_some(),
        key: opts.key.clone(),
        check: Check::Structure,
        ..Default::default()
    };
    let bundle = Arc::new(open_verified(&opts.bundle, &open, reporter)?);
    let m = bundle.manifest().clone();
    if m.bundle.without_layers {
        return Err(Error::input(format!(
            "{}: this bundle carries no image layers (packed with --no-images): there is nothing to push from it",
            bundle.display_name()
        ))
        .hint("push the full bundle of the same release (packed without --no-images); hosts then install this small one with --images-from"));
    }
    if let Some(base) = &m.base {
        return Err(Error::input(format!(
            "{}: this is a delta bundle: it leaves {} payload(s) to its base bundle {}, so it cannot push every layer of its images",
            bundle.display_name(),
            base.files.len(),
            base.describe()
        ))
        .hint("make a full bundle first (`bkbundle merge BASE.bkb THIS.bkb -o FULL.bkb`) and push that"));
    }
    let units = plan(&m.images, opts)?;
    let stored = m.bundle.compression;
    let format = opts.format;
    let not_zstd = m
        .layers
        .iter()
        .find(|l| crate::bundle::layout::layer_compression(&l.file).unwrap_or(stored) != Compression::Zstd);
    if let (LayerFormat::Zstd, Some(l)) = (format, not_zstd) {
        return Err(Error::input(format!(
            "{}: --compression zstd sends layers as stored, but this bundle stores layer {} as {}",
            bundle.display_name(),
            l.diff_id,
            crate::bundle::layout::layer_compression(&l.file)
                .unwrap_or(stored)
                .as_str()
        ))
        .hint("push it with --compression gzip (the default)"));
    }
    let lock_dir = crate::lock::bucket_lock_dir()?;
    let stem = crate::digest::sha256_hex(opts.target.host.as_bytes());
    let _lock = crate::lock::acquire(
        &lock_dir.join(format!("push-{}.lock", &stem[..24])),
        &format!("pushes to registry {}", opts.target.host),
        opts.lock_wait,
        &|_| {},
    )?;
    let client = Arc::new(Client::new(&opts.target.host, &opts.access)?);
    let mut notes = Vec::new();
    if opts.access.insecure {
        let n = format!(
            "registry {} is reached over plain HTTP (--registry-insecure): credentials and images cross the network unencrypted and unauthenticated",
            opts.target.host
        );
        reporter.note(&format!("WARNING: {n}"));
        notes.push(n);
    }
    let cache = Arc::new(DigestCache::open(format, opts.level));
    let ctx = Arc::new(Ctx {
        bundle: bundle.clone(),
        client: client.clone(),
        format,
        stored,
        level: opts.level,
        uploads: Semaphore::new(opts.jobs.max(1)),
        homes: Mutex::new(HashMap::new()),
        cache,
        counts: Mutex::new(BlobCounts::default()),
        learned: Mutex::new(HashMap::new()),
    });
    let display = bundle.display_name();
    let images = crate::runtime::block_on(push_units(ctx.clone(), units, reporter))??;
    let counts = ctx.counts.lock().map(|c| c.clone()).unwrap_or_default();
    Ok(PushReport {
        bundle: display,
        registry: opts.target.to_string(),
        transport: if opts.access.insecure { "http" } else { "https" },
        format,
        images,
        blobs: counts,
        bytes_sent: client.bytes_sent(),
        seconds: started.elapsed().as_secs_f64(),
        notes,
    })
}

/// The units to push: the selected images' references placed under the target, every problem
/// listed together before anything is sent.
fn plan(images: &[Image], opts: &PushOptions) -> Result<Vec<Unit>> {
    let mut problems = Vec::new();
    for wanted in &opts.images {
        if !images.iter().any(|i| i.refs.iter().any(|r| r == wanted)) {
            problems.push(
                Error::input(format!("image {wanted} is not in the bundle"))
                    .hint("bkbundle inspect BUNDLE lists its images"),
            );
        }
    }
    let mut units: BTreeMap<(String, String), Unit> = BTreeMap::new();
    for img in images {
        if !opts.images.is_empty() && !img.refs.iter().any(|r| opts.images.contains(r)) {
            continue;
        }
        if img.refs.is_empty() {
            problems.push(Error::input(format!(
                "image {} has no reference to push it under",
                img.id
            )));
            continue;
        }
        for r in &img.refs {
            match opts.target.place(r) {
                Ok(p) if p.tag.is_none() => problems.push(
                    Error::input(format!(
                        "image {r}: a reference by digest only cannot be pushed (the registry's manifest differs from the upstream one it names)"
                    ))
                    .hint("give the image a tag in the recipe"),
                ),
                Ok(p) => {
                    let key = (img.id.clone(), p.repository.clone());
                    units
                        .entry(key)
                        .or_insert_with(|| Unit {
                            image: img.clone(),
                            repository: p.repository.clone(),
                            placements: Vec::new(),
                        })
                        .placements
                        .push(p);
                }
                Err(e) => problems.push(e),
            }
        }
    }
    if !problems.is_empty() {
        return Err(Error::all(
            format!("cannot push to registry {}: nothing was sent", opts.target),
            problems,
        ));
    }
    Ok(units.into_values().collect())
}

struct Ctx {
    bundle: Arc<VerifiedBundle>,
    client: Arc<Client>,
    format: LayerFormat,
    stored: Compression,
    level: u32,
    uploads: Semaphore,
    /// Per layer (diff id): where its blob went first in this run.
    homes: Mutex<HashMap<String, Arc<OnceCell<Home>>>>,
    cache: Arc<DigestCache>,
    counts: Mutex<BlobCounts>,
    /// Layer blobs the registry's repositories already hold, by diff id (learned from their
    /// manifests and configs): whatever tool pushed them, a blob of the same diff id serves.
    learned: Mutex<HashMap<String, (String, u64)>>,
}

#[derive(Clone, Copy)]
enum Outcome {
    Uploaded,
    Mounted,
    Present,
}

impl Ctx {
    fn count(&self, o: Outcome, mine: &mut BlobCounts) {
        let bump = |c: &mut BlobCounts| match o {
            Outcome::Uploaded => c.uploaded += 1,
            Outcome::Mounted => c.mounted += 1,
            Outcome::Present => c.present += 1,
        };
        bump(mine);
        if let Ok(mut c) = self.counts.lock() {
            bump(&mut c);
        }
    }

    /// How `layer` is stored: by its file's name (a bundle may mix them), else the bundle's.
    fn stored_as(&self, layer: &Layer) -> Compression {
        crate::bundle::layout::layer_compression(&layer.file).unwrap_or(self.stored)
    }

    /// A layer's digest and size when known before sending: stored as sent, or remembered.
    fn known(&self, layer: &Layer) -> Option<(String, u64)> {
        let sent_as_stored = match self.format {
            LayerFormat::Zstd => true,
            LayerFormat::Gzip => self.stored_as(layer) == Compression::Gzip,
        };
        if sent_as_stored {
            let f = self.bundle.manifest().file(&layer.file)?;
            return Some((format!("sha256:{}", f.sha256), f.size));
        }
        self.cache
            .get(&layer.diff_id)
            .or_else(|| self.learned.lock().ok()?.get(&layer.diff_id).cloned())
    }

    /// Learn which layer blobs `repo` already holds, from up to [`LEARN_TAGS`] of its tags: each
    /// manifest's layers paired with its config's `rootfs.diff_ids`. Best effort: what cannot be
    /// read is not learned, and costs only an upload.
    async fn learn(&self, repo: &str) {
        let Ok(tags) = self.client.tags(repo, LEARN_TAGS).await else {
            return;
        };
        for tag in tags {
            let Ok(Some(m)) = self.client.manifest(repo, &tag).await else {
                continue;
            };
            let Some(config) = m.config_digest else { continue };
            let Ok(Some(body)) = self.client.small_blob(repo, &config, CONFIG_MAX as usize).await else {
                continue;
            };
            #[derive(serde::Deserialize)]
            struct Rootfs {
                diff_ids: Vec<String>,
            }
            #[derive(serde::Deserialize)]
            struct Config {
                rootfs: Rootfs,
            }
            let Ok(c) = serde_json::from_slice::<Config>(&body) else {
                continue;
            };
            if c.rootfs.diff_ids.len() != m.layers.len() {
                continue;
            }
            if let Ok(mut l) = self.learned.lock() {
                for (diff, blob) in c.rootfs.diff_ids.into_iter().zip(m.layers) {
                    l.entry(diff).or_insert(blob);
                }
            }
        }
    }

    fn layer_media_type(&self) -> &'static str {
        match self.format {
            LayerFormat::Gzip => MEDIA_DOCKER_LAYER_GZIP,
            LayerFormat::Zstd => MEDIA_OCI_LAYER_ZSTD,
        }
    }
}

async fn push_units(ctx: Arc<Ctx>, units: Vec<Unit>, reporter: &dyn Reporter) -> Result<Vec<ImageReport>> {
    ctx.client.ping().await?;
    let mut futures = Vec::new();
    for unit in units {
        let total: u64 = unit
            .image
            .layers
            .iter()
            .filter_map(|d| ctx.bundle.manifest().layer(d))
            .filter_map(|l| ctx.bundle.manifest().file(&l.file).map(|f| f.size))
            .sum();
        let task: Arc<dyn Task> = Arc::from(reporter.task(&format!("push {}", unit.placements[0].source), Some(total)));
        futures.push(push_unit(ctx.clone(), unit, task));
    }
    let results = futures_util::future::join_all(futures).await;
    let mut reports = Vec::new();
    let mut problems = Vec::new();
    for r in results {
        match r {
            Ok(mut rs) => reports.append(&mut rs),
            Err(e) => problems.push(e),
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        let mut e = Error::all(
            format!(
                "push to registry {} failed for {n} image(s); no image was tagged before all its blobs were there, and a re-run resumes",
                ctx.client.display()
            ),
            problems,
        );
        if !reports.is_empty() {
            let done: Vec<String> = reports.iter().map(|r| r.pushed_as.clone()).collect();
            e.hints.push(format!("done: {}", done.join(", ")));
        }
        return Err(e);
    }
    Ok(reports)
}

/// One image into one repository: its tags checked, its blobs made present, its manifest put.
async fn push_unit(ctx: Arc<Ctx>, unit: Unit, task: Arc<dyn Task>) -> Result<Vec<ImageReport>> {
    let repo = unit.repository.clone();
    let img = &unit.image;
    let mut missing = Vec::new();
    let mut present_digest = None;
    for p in &unit.placements {
        let tag = p.tag.as_deref().unwrap_or("latest");
        match ctx.client.manifest(&repo, tag).await? {
            Some(m) if m.config_digest.as_deref() == Some(img.id.as_str()) => present_digest = Some(m.digest),
            _ => missing.push(p.clone()),
        }
    }
    let mut reports = Vec::new();
    if missing.is_empty() {
        task.message("already there");
        task.finish();
        for p in &unit.placements {
            reports.push(ImageReport {
                reference: p.source.clone(),
                pushed_as: p.reference.clone(),
                image_id: img.id.clone(),
                state: "present",
                manifest_digest: present_digest.clone(),
                blobs: BlobCounts::default(),
            });
        }
        return Ok(reports);
    }
    let mut mine = BlobCounts::default();
    // The config, as stored: its digest is the image id.
    let config = read_config(&ctx.bundle, img)?;
    let config_size = config.len() as u64;
    if ctx.client.blob_size(&repo, &img.id).await?.is_some() {
        ctx.count(Outcome::Present, &mut mine);
    } else {
        ctx.client.upload_bytes(&repo, &img.id, config).await?;
        ctx.count(Outcome::Uploaded, &mut mine);
    }
    // A layer whose blob digest is not known before sending may be in the repository already,
    // pushed by an earlier release's bundle (or another tool): learn from its tags first.
    let unknown = img
        .layers
        .iter()
        .filter_map(|d| ctx.bundle.manifest().layer(d))
        .any(|l| ctx.known(l).is_none());
    if unknown {
        ctx.learn(&repo).await;
    }
    // The layers, at most `jobs` uploads at once across all images.
    let mut layer_futs = Vec::new();
    for diff in &img.layers {
        let layer = ctx.bundle.manifest().layer(diff).cloned().ok_or_else(|| {
            Error::bundle(format!(
                "{}: layer {diff} is not in the manifest",
                ctx.bundle.display_name()
            ))
        })?;
        layer_futs.push(push_layer(ctx.clone(), repo.clone(), layer, task.clone()));
    }
    let mut layers = Vec::new();
    let mut problems = Vec::new();
    for r in futures_util::future::join_all(layer_futs).await {
        match r {
            Ok((home, o)) => {
                ctx.count(o, &mut mine);
                layers.push(home);
            }
            Err(e) => problems.push(e),
        }
    }
    if let Some(first) = problems.into_iter().next() {
        let mut e = first;
        e.message = format!("image {}: {}", unit.placements[0].source, e.message);
        return Err(e);
    }
    let (media_type, body) = manifest_body(&ctx, &img.id, config_size, &layers);
    let body = Bytes::from(body);
    // Only the tags that do not name the image yet: one already right is left as it is.
    let mut digest = None;
    for p in &missing {
        let tag = p.tag.as_deref().unwrap_or("latest");
        digest = Some(
            ctx.client
                .put_manifest(&repo, tag, media_type, body.clone())
                .await
                .map_err(|mut e| {
                    e.message = format!("image {}: {}", p.source, e.message);
                    e
                })?,
        );
    }
    task.finish();
    for p in &unit.placements {
        let pushed = missing.iter().any(|m| m.reference == p.reference);
        reports.push(ImageReport {
            reference: p.source.clone(),
            pushed_as: p.reference.clone(),
            image_id: img.id.clone(),
            state: if pushed { "pushed" } else { "present" },
            manifest_digest: if pushed { digest.clone() } else { present_digest.clone() },
            blobs: if pushed { mine.clone() } else { BlobCounts::default() },
        });
    }
    Ok(reports)
}

fn read_config(bundle: &VerifiedBundle, img: &Image) -> Result<Bytes> {
    let size = bundle.manifest().file(&img.config).map(|f| f.size).unwrap_or(0);
    if size > CONFIG_MAX {
        return Err(Error::bundle(format!(
            "{}: the config of {} is {size} bytes (at most {CONFIG_MAX})",
            bundle.display_name(),
            img.refs.join(", ")
        )));
    }
    let mut buf = Vec::with_capacity(size as usize);
    bundle
        .config(img)?
        .take(CONFIG_MAX + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::bundle(format!("{}: cannot read {}: {e}", bundle.display_name(), img.config)))?;
    Ok(Bytes::from(buf))
}

/// The image manifest: Docker schema 2 with gzip layers, OCI with zstd layers.
fn manifest_body(ctx: &Ctx, config_digest: &str, config_size: u64, layers: &[Home]) -> (&'static str, Vec<u8>) {
    let (media, config_media) = match ctx.format {
        LayerFormat::Gzip => (MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_CONFIG),
        LayerFormat::Zstd => (MEDIA_OCI_MANIFEST, MEDIA_OCI_CONFIG),
    };
    let layer_media = ctx.layer_media_type();
    let doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media,
        "config": { "mediaType": config_media, "size": config_size, "digest": config_digest },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": layer_media, "size": l.size, "digest": l.digest,
        })).collect::<Vec<_>>(),
    });
    (media, serde_json::to_vec_pretty(&doc).unwrap_or_default())
}

/// One layer made present in `repo`: found there, mounted from where this run sent it, or sent.
async fn push_layer(ctx: Arc<Ctx>, repo: String, layer: Layer, task: Arc<dyn Task>) -> Result<(Home, Outcome)> {
    let client = &ctx.client;
    if let Some((digest, size)) = ctx.known(&layer) {
        if client.blob_size(&repo, &digest).await?.is_some() {
            return Ok((
                Home {
                    digest,
                    size,
                    repository: repo,
                },
                Outcome::Present,
            ));
        }
    }
    let cell = {
        let mut homes = ctx.homes.lock().map_err(|_| Error::internal("push state poisoned"))?;
        homes.entry(layer.diff_id.clone()).or_default().clone()
    };
    let mut sent_here = false;
    let home = cell
        .get_or_try_init(|| async {
            sent_here = true;
            let p = upload_layer(&ctx, &repo, &layer, task.clone()).await?;
            Ok::<_, Error>(Home {
                digest: p.digest,
                size: p.size,
                repository: repo.clone(),
            })
        })
        .await?
        .clone();
    if sent_here {
        return Ok((home, Outcome::Uploaded));
    }
    if home.repository == repo || client.blob_size(&repo, &home.digest).await?.is_some() {
        return Ok((
            Home {
                repository: repo,
                ..home
            },
            Outcome::Present,
        ));
    }
    if client.mount(&repo, &home.repository, &home.digest).await? {
        return Ok((
            Home {
                repository: repo,
                ..home
            },
            Outcome::Mounted,
        ));
    }
    let p = upload_layer(&ctx, &repo, &layer, task).await?;
    Ok((
        Home {
            digest: p.digest,
            size: p.size,
            repository: repo,
        },
        Outcome::Uploaded,
    ))
}

/// Send one layer: a blocking thread reads it from the bundle (checked against its digest as it
/// is read), recompresses it when needed and writes it into the request body, hashing it.
async fn upload_layer(ctx: &Arc<Ctx>, repo: &str, layer: &Layer, task: Arc<dyn Task>) -> Result<Pushed> {
    let _permit = ctx
        .uploads
        .acquire()
        .await
        .map_err(|_| Error::internal("upload slots closed"))?;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    let (done_tx, done_rx) = oneshot::channel();
    let c = ctx.clone();
    let l = layer.clone();
    let producer = tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter::new(tx.clone(), "the registry");
        let r = produce(&c, &l, writer, &*task);
        if let Err(e) = &r {
            // Abort the request body: the upload is then cancelled, nothing is committed.
            let _ = tx.blocking_send(Err(io::Error::other(e.message.clone())));
        }
        let _ = done_tx.send(r);
    });
    let label = format!("layer {} ({})", layer.diff_id, layer.file);
    let pushed = ctx.client.upload(repo, rx, done_rx, &label).await;
    let _ = producer.await;
    let pushed = pushed?;
    if ctx.format == LayerFormat::Gzip && ctx.stored_as(layer) != Compression::Gzip {
        ctx.cache.put(&layer.diff_id, &pushed.digest, pushed.size);
    }
    Ok(pushed)
}

/// Write `layer` as the registry gets it into `w`; returns its digest and size.
fn produce(ctx: &Ctx, layer: &Layer, w: ChannelWriter, task: &dyn Task) -> Result<(String, u64)> {
    let name = ctx.bundle.display_name();
    let raw = ProgressReader {
        inner: ctx.bundle.layer(layer)?,
        task,
    };
    let mut out = HashingWriter::new(w);
    let sent_err = |e: io::Error| {
        Error::external(format!(
            "sending {} ({}) to the registry: {e}",
            layer.diff_id, layer.file
        ))
        .hint("check that the registry runs; run push again (it resumes)")
    };
    let read_err = |e: io::Error| Error::bundle(format!("{name}: cannot read {}: {e}", layer.file));
    let recompress = ctx.format == LayerFormat::Gzip && ctx.stored_as(layer) == Compression::Zstd;
    if recompress {
        let mut plain = zstd::stream::read::Decoder::new(raw).map_err(|e| Error::internal(format!("zstd: {e}")))?;
        let mut gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::new(ctx.level));
        copy(&mut plain, &mut gz, read_err, sent_err)?;
        gz.finish().map_err(sent_err)?;
    } else {
        let mut raw = raw;
        copy(&mut raw, &mut out, read_err, sent_err)?;
    }
    out.flush().map_err(sent_err)?;
    let (_, hasher) = out.into_parts();
    let (hex, size) = hasher.finish();
    Ok((format!("sha256:{hex}"), size))
}

/// Copy with read and write errors told apart (a damaged bundle vs. a registry that stopped).
fn copy(
    r: &mut dyn Read,
    w: &mut dyn Write,
    read_err: impl Fn(io::Error) -> Error,
    write_err: impl Fn(io::Error) -> Error,
) -> Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        w.write_all(&buf[..n]).map_err(&write_err)?;
    }
}

/// The digests recompressed layers got, by diff id and compressor: a cache (losing it costs only
/// time), in `$BKBUNDLE_CACHE_DIR`, else `$XDG_CACHE_HOME/bkbundle`, else `~/.cache/bkbundle`.
/// Only ever used to ask the registry whether it has a blob: a wrong line costs an upload.
struct DigestCache {
    path: Option<PathBuf>,
    kind: String,
    known: Mutex<HashMap<String, (String, u64)>>,
}

impl DigestCache {
    fn open(format: LayerFormat, level: u32) -> DigestCache {
        let kind = match format {
            LayerFormat::Gzip => format!("gzip-{level}"),
            LayerFormat::Zstd => "zstd".into(),
        };
        let path = cache_dir().map(|d| d.join("registry-layers.tsv"));
        let mut known = HashMap::new();
        if let Some(p) = &path {
            if let Ok(f) = std::fs::File::open(p) {
                let mut text = String::new();
                let _ = f.take(CACHE_MAX).read_to_string(&mut text);
                for line in text.lines() {
                    let f: Vec<&str> = line.split('\t').collect();
                    if let [diff, k, digest, size] = f[..] {
                        if k == kind && digest.starts_with("sha256:") && digest.len() == 71 {
                            if let Ok(size) = size.parse() {
                                known.insert(diff.to_string(), (digest.to_string(), size));
                            }
                        }
                    }
                }
            }
        }
        DigestCache {
            path,
            kind,
            known: Mutex::new(known),
        }
    }

    fn get(&self, diff_id: &str) -> Option<(String, u64)> {
        self.known.lock().ok()?.get(diff_id).cloned()
    }

    /// Remember a digest (best effort: a cache that cannot be written only costs time later).
    fn put(&self, diff_id: &str, digest: &str, size: u64) {
        if let Ok(mut k) = self.known.lock() {
            if k.get(diff_id).is_some_and(|(d, _)| d == digest) {
                return;
            }
            k.insert(diff_id.to_string(), (digest.to_string(), size));
        }
        let Some(p) = &self.path else { return };
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(p)
        {
            let _ = f.write_all(format!("{diff_id}\t{}\t{digest}\t{size}\n", self.kind).as_bytes());
        }
    }
}

fn cache_dir() -> Option<PathBuf> {
    let var = |n: &str| std::env::var_os(n).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("BKBUNDLE_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("bkbundle")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/bkbundle")))
}

/// The human report.
pub fn render(r: &PushReport) -> String {
    let mut out = String::new();
    let pushed = r.images.iter().filter(|i| i.state == "pushed").count();
    let present = r.images.len() - pushed;
    out.push_str(&format!(
        "{}: {} image reference(s) in registry {} ({}, layers {}): {pushed} pushed, {present} already there\n",
        r.bundle,
        r.images.len(),
        r.registry,
        r.transport,
        match r.format {
            LayerFormat::Gzip => "gzip",
            LayerFormat::Zstd => "zstd",
        }
    ));
    for i in &r.images {
        let b = &i.blobs;
        let detail = if i.state == "pushed" {
            format!(
                "pushed ({} blob(s) sent, {} mounted, {} already there)",
                b.uploaded, b.mounted, b.present
            )
        } else {
            "already there".to_string()
        };
        out.push_str(&format!("  {} -> {}  {detail}\n", i.reference, i.pushed_as));
    }
    out.push_str(&format!(
        "blobs: {} sent, {} mounted, {} already there; {} sent in {:.1} s",
        r.blobs.uploaded,
        r.blobs.mounted,
        r.blobs.present,
        crate::inspect::human(r.bytes_sent),
        r.seconds
    ));
    for n in &r.notes {
        out.push_str(&format!("\nWARNING: {n}"));
    }
    out
}

impl crate::report::Report for PushReport {
    fn render(&self) -> String {
        render(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_lists_every_problem_and_groups_tags_by_repository() {
        let img = |refs: &[&str], id: &str| Image {
            refs: refs.iter().map(|s| s.to_string()).collect(),
            id: id.into(),
            config: String::new(),
            os: "linux".into(),
            arch: "amd64".into(),
            layers: vec![],
            size: 0,
        };
        let images = vec![
            img(&["a/b:1", "a/b:latest", "c:2"], "sha256:1"),
            img(&["Up/Per:1"], "sha256:2"),
        ];
        let mut opts = PushOptions {
            bundle: PathBuf::new(),
            target: Target::parse("r.local:5000/site").unwrap(),
            access: Access::default(),
            images: vec![],
            format: LayerFormat::Gzip,
            level: 1,
            jobs: 2,
            key: None,
            lock_wait: Duration::from_secs(1),
        };
        let e = plan(&images, &opts).err().unwrap();
        assert!(e.problems.iter().any(|p| p.contains("Up/Per:1")), "{:?}", e.problems);
        opts.images = vec!["a/b:1".into(), "nope:1".into()];
        let e = plan(&images, &opts).err().unwrap();
        assert!(
            e.problems.iter().any(|p| p.contains("nope:1 is not in the bundle")),
            "{:?}",
            e.problems
        );
        opts.images = vec!["a/b:1".into()];
        let units = plan(&images, &opts).unwrap();
        assert_eq!(units.len(), 2);
        let ab = units.iter().find(|u| u.repository == "site/a/b").unwrap();
        assert_eq!(ab.placements.len(), 2);
    }
}
