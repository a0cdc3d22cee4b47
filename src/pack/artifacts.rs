//! Packages and installers taken from images, and installers given as files: every one read and
//! checked before the bundle writer writes anything, with every problem listed together.
//!
//! Artifacts are grouped by image, so each image is exported and its layers read once however
//! many artifacts come from it ([`super::extract`]). A controller package is built as a zip with
//! one top-level `fusion-collectors/` (upstream's layout) from its `tree` rules, applied in order
//! (later wins); entries sorted, fixed times, unix modes kept: the same image gives the same bytes.
//! The built archive then goes through [`package_check`] like any package file.
//!
//! What is read is staged in a directory next to the output bundle (same file system, removed
//! when [`Extracted`] is dropped, whether pack succeeds or fails).

use super::extract::{self, is_under, Node, Staged, View, Wanted};
use super::inputs::{EngineImages, PackInputError, Plan};
use super::remote::{Digested, Remote};
use crate::engine::Engine;
use crate::error::{Error, IoContext, Kind, Result};
use crate::manifest::ImageSource;
use crate::manifest::{Os, PackageType, RecipePackage};
use crate::package_check::{self, Listing};
use crate::progress::Reporter;
use crate::savefile::normalize;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use tokio_util::io::{StreamReader, SyncIoBridge};

/// The top-level directory of every controller archive built from an image (upstream's layout).
pub const TOP: &str = "fusion-collectors";

/// How one image was read: the bytes of its layers read against its size show each layer was
/// read once, whatever the number of artifacts taken from it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRead {
    pub image: String,
    pub id: String,
    /// Layer blobs read from the export stream.
    pub layers_read: usize,
    /// Uncompressed bytes of those layers.
    pub bytes_read: u64,
    /// The image's own size: its layers' uncompressed bytes.
    pub image_bytes: u64,
    /// Artifacts taken from it.
    pub artifacts: usize,
}

/// A controller package built from an image.
pub(super) struct Built {
    pub path: PathBuf,
    pub image: String,
    pub image_id: String,
    pub paths: Vec<String>,
}

/// An installer ready to be written: a file on disk (next to the recipe, or staged).
pub(super) struct ReadyInstaller {
    /// Its index in the recipe: the manifest lists installers in recipe order.
    pub index: usize,
    pub name: String,
    pub os: Os,
    pub arch: String,
    pub path: PathBuf,
    /// (image reference, image id, path in the image) when read from an image.
    pub origin: Option<(String, String, String)>,
}

/// Everything taken from images; dropping it removes the staging directory.
#[derive(Default)]
pub(super) struct Extracted {
    /// Built packages by their index in the recipe.
    pub built: BTreeMap<usize, Built>,
    /// Installers in recipe order (those that passed their checks).
    pub installers: Vec<ReadyInstaller>,
    /// Built packages' listings by file name (collectors' `from`/`entry` point into them).
    pub listings: BTreeMap<String, Listing>,
    pub reads: Vec<ImageRead>,
    staging: Option<Staging>,
}

/// A directory removed with everything in it when dropped.
struct Staging(PathBuf);

impl Staging {
    /// `.<output name>.extract-<pid>` next to `output`.
    fn create(output: &Path) -> Result<Staging> {
        let dir = output
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(PackInputError::OutputDir(dir.to_path_buf()).into());
        }
        let name = output
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        reclaim_stale(dir, &name);
        let path = dir.join(format!(".{name}.extract-{}", std::process::id()));
        // A directory of that name is a leftover of a killed run that had this process id.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).io_ctx("cannot create the staging directory", &path)?;
        Ok(Staging(path))
    }
}

/// Remove the staging directories killed packs of the same output left (`.<name>.extract-<pid>`
/// whose process is gone); a live pack's is left alone.
fn reclaim_stale(dir: &Path, name: &str) {
    let prefix = format!(".{name}.extract-");
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = file_name.strip_prefix(&prefix).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid > 0 && !process_alive(pid) && e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Whether a process with this id exists (signal 0: no signal is sent).
fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What an artifact is, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Package(usize),
    Installer(usize),
}

/// One image and the artifacts taken from it.
struct Source {
    image: String,
    /// The archive it is read from; None: the local engine (or `remote`).
    archive: Option<PathBuf>,
    /// Fetched from the mirror or read from an OCI layout instead.
    remote: Option<RemoteWant>,
    targets: Vec<Target>,
}

/// Where an image artifacts come from is fetched: the OCI layout directory (relative to the
/// recipe; None: the mirror), the pinned manifest digest and the platform.
#[derive(Clone, PartialEq, Eq)]
struct RemoteWant {
    layout: Option<PathBuf>,
    pinned: Option<String>,
    platform: String,
}

/// A problem with an artifact taken from an image or given as an installer file.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("image {image} is not in the local Docker engine ({engine}); needed by {artifacts}")]
    NotInEngine {
        image: String,
        engine: String,
        artifacts: String,
    },
    #[error("image {image}: archive {} not found; needed by {artifacts}", path.display())]
    ArchiveMissing {
        image: String,
        path: PathBuf,
        artifacts: String,
    },
    #[error("image {image}: archive {} does not hold it (it holds {holds}); needed by {artifacts}", path.display())]
    NotInArchive {
        image: String,
        path: PathBuf,
        holds: String,
        artifacts: String,
    },
    #[error("image {image}: {path} not found (needed by {artifact})")]
    Missing {
        image: String,
        path: String,
        artifact: String,
    },
    #[error("image {image}: {path} is empty (needed by {artifact}); every file taken from an image must have content")]
    Empty {
        image: String,
        path: String,
        artifact: String,
    },
    #[error("image {image}: {path} is {found}, expected {expected} (needed by {artifact})")]
    WrongKind {
        image: String,
        path: String,
        artifact: String,
        expected: &'static str,
        found: String,
    },
    #[error("image {image}: {path} is a symlink to {target:?}, which is outside {tree} (needed by {artifact}); only symlinks that stay inside the requested tree are followed")]
    Symlink {
        image: String,
        path: String,
        target: String,
        tree: String,
        artifact: String,
    },
    #[error("image {image}: {artifact}: its tree ({paths}) has no {}; a {os} controller package needs {} at its top", missing.join(", "), if missing.len() > 1 { "them" } else { "it" })]
    Incomplete {
        image: String,
        artifact: String,
        paths: String,
        os: &'static str,
        missing: Vec<String>,
    },
    #[error("image {image}: {artifact} has no {entry}, which collector {collector} names with `entry`")]
    EntryMissing {
        image: String,
        artifact: String,
        collector: String,
        entry: String,
    },
    #[error("image {image}: {artifact} built from it was refused: {message}")]
    Refused {
        image: String,
        artifact: String,
        message: String,
    },
    #[error("{artifact}: file {} {why}", path.display())]
    File {
        artifact: String,
        path: PathBuf,
        why: &'static str,
    },
}

impl From<ArtifactError> for Error {
    fn from(e: ArtifactError) -> Error {
        use ArtifactError as A;
        let hint = match &e {
            A::NotInEngine { .. } => "load or build it first (`docker load -i FILE`), or give `image_archive = \"file.tar\"` (docker save / OCI) on the artifact",
            A::ArchiveMissing { .. } => "make it with `docker save -o FILE IMAGE`; paths are relative to the recipe",
            A::NotInArchive { .. } => "fix `image` to one of those tags, or export the right image into the archive",
            A::Missing { .. } | A::WrongKind { .. } => "list the image's files (`docker create --name x IMAGE; docker export x | tar -t | grep NAME; docker rm x`) and fix `tree` or `path` in the recipe, or use an image that has it",
            A::Empty { .. } => "the image is incomplete: rebuild or pull it again, or take the file from a release whose image has it",
            A::Symlink { .. } => "take the link's target into the tree with a `tree` rule of its own, or point the rule at the real path",
            A::Incomplete { .. } => "add the missing files with another `tree` rule (e.g. { from = \"/opt/fusion-collectors/misc/linux\", to = \"\" }), or fix the paths",
            A::EntryMissing { .. } => "fix the collector's `entry`, or add the file to the package's `tree`",
            A::Refused { .. } => "fix the package's `tree` so that it holds only the agent's files",
            A::File { .. } => "put the installer program there (a non-empty regular file), or fix `file`; paths are relative to the recipe",
        };
        Error::new(Kind::Input, e.to_string()).hint(hint)
    }
}

/// How messages name a recipe package built from an image.
fn describe_package(p: &RecipePackage) -> String {
    format!(
        "package {} ({} {}/{})",
        p.file_name().unwrap_or_default(),
        p.kind.as_str(),
        p.os.as_str(),
        p.arch
    )
}

impl Target {
    fn describe(self, plan: &Plan) -> String {
        match self {
            Target::Package(i) => describe_package(&plan.recipe.packages[i]),
            Target::Installer(i) => plan.recipe.installers[i].describe(),
        }
    }

    /// The paths this artifact reads from its image (absolute, as the recipe writes them).
    fn paths(self, plan: &Plan) -> Vec<String> {
        match self {
            Target::Package(i) => plan.recipe.packages[i].tree.iter().map(|r| r.from.clone()).collect(),
            Target::Installer(i) => plan.recipe.installers[i].path.iter().cloned().collect(),
        }
    }
}

/// The images artifacts come from, each with its artifacts: read from the artifact's
/// `image_archive`, else from the archive its `[[images]]` entry names, else from the engine.
fn sources(plan: &Plan) -> Vec<Source> {
    let r = &plan.recipe;
    let wants = r
        .packages
        .iter()
        .enumerate()
        .map(|(i, p)| (Target::Package(i), &p.image, &p.image_archive))
        .chain(
            r.installers
                .iter()
                .enumerate()
                .map(|(i, x)| (Target::Installer(i), &x.image, &x.image_archive)),
        );
    let mut out: Vec<Source> = Vec::new();
    for (target, image, archive) in wants {
        let Some(image) = image else { continue };
        let entry = r.images.iter().find(|i| &i.reference == image);
        let listed = entry.and_then(|i| i.archive.clone());
        let archive = archive.clone().or(listed).map(|a| plan.base.join(a));
        // Not from an archive: from where its [[images]] entry says, or (an image the bundle does
        // not carry) from the mirror when there is one, like the recipe's plain references.
        let mirror = plan.mirror.is_some();
        let remote = match (&archive, entry) {
            (Some(_), _) => None,
            (None, Some(e)) => match e.source(mirror) {
                ImageSource::Mirror | ImageSource::OciLayout(_) => Some(RemoteWant {
                    layout: e.oci_layout.clone(),
                    pinned: e.pinned().map(str::to_string),
                    platform: super::remote::platform_of(plan, e),
                }),
                _ => None,
            },
            (None, None) if mirror => Some(RemoteWant {
                layout: None,
                pinned: None,
                platform: plan
                    .recipe
                    .registry
                    .as_ref()
                    .and_then(|r| r.platform.clone())
                    .unwrap_or_else(|| crate::manifest::DEFAULT_PLATFORM.to_string()),
            }),
            (None, None) => None,
        };
        match out
            .iter_mut()
            .find(|s| &s.image == image && s.archive == archive && s.remote == remote)
        {
            Some(s) => s.targets.push(target),
            None => out.push(Source {
                image: image.clone(),
                archive,
                remote,
                targets: vec![target],
            }),
        }
    }
    out
}

/// Read every image artifacts come from and build or check each artifact; problems go to
/// `problems` (all of them, for one report with the other inputs'). Installers given as files
/// are checked here too.
pub(super) async fn run(
    plan: &Plan,
    engine: Option<&EngineImages>,
    remote: &mut Remote,
    output: &Path,
    reporter: &dyn Reporter,
    problems: &mut Vec<Error>,
) -> Result<Extracted> {
    let mut ex = Extracted::default();
    installer_files(plan, &mut ex, problems);
    let sources = sources(plan);
    if sources.is_empty() {
        return Ok(ex);
    }
    let staging = Staging::create(output)?;
    let mut own_engine: Option<Engine> = None;
    for (k, src) in sources.iter().enumerate() {
        let dir = staging.0.join(format!("image{k}"));
        let read = match &src.remote {
            Some(want) => read_remote(plan, src, want, remote, &dir, reporter).await,
            None => read_source(plan, src, engine, &mut own_engine, &dir, reporter).await,
        };
        match read {
            Ok((view, read)) => {
                for t in &src.targets {
                    take(plan, *t, &view, &read, &dir, &mut ex, problems);
                }
                ex.reads.push(read);
            }
            Err(e) => problems.push(e),
        }
    }
    check_collectors(plan, &ex, problems);
    ex.installers.sort_by_key(|i| i.index);
    ex.staging = Some(staging);
    Ok(ex)
}

/// Installers given as files next to the recipe: present, regular, not empty.
fn installer_files(plan: &Plan, ex: &mut Extracted, problems: &mut Vec<Error>) {
    for (index, inst) in plan.recipe.installers.iter().enumerate() {
        let Some(file) = &inst.file else { continue };
        let path = plan.base.join(file);
        let why = match fs::metadata(&path) {
            Err(_) => Some("not found"),
            Ok(m) if !m.is_file() => Some("is not a regular file"),
            Ok(m) if m.len() == 0 => Some("is empty"),
            Ok(_) => None,
        };
        match why {
            Some(why) => problems.push(
                ArtifactError::File {
                    artifact: inst.describe(),
                    path,
                    why,
                }
                .into(),
            ),
            None => ex.installers.push(ReadyInstaller {
                index,
                name: inst.name(),
                os: inst.os,
                arch: inst.arch.clone(),
                path,
                origin: None,
            }),
        }
    }
}

/// An image's export stream: from its archive, or from the engine (the image looked up first).
struct Opened {
    reader: Box<dyn Read>,
    /// Bytes expected, for progress: the archive's size, or the engine's size of the image.
    total: u64,
    /// The engine's id of the image (the export must contain it); None for an archive.
    want_id: Option<String>,
    /// How messages name the source.
    name: String,
}

async fn open_source(
    src: &Source,
    artifacts: &str,
    engine: Option<&EngineImages>,
    own_engine: &mut Option<Engine>,
) -> Result<Opened> {
    if let Some(path) = &src.archive {
        let file = fs::File::open(path).map_err(|_| ArtifactError::ArchiveMissing {
            image: src.image.clone(),
            path: path.clone(),
            artifacts: artifacts.to_string(),
        })?;
        return Ok(Opened {
            total: file.metadata().map(|m| m.len()).unwrap_or(0),
            reader: Box::new(io::BufReader::with_capacity(1 << 20, file)),
            want_id: None,
            name: path.display().to_string(),
        });
    }
    let engine = match engine {
        Some(e) => &e.engine,
        None => own_engine.insert(Engine::connect().await?),
    };
    let found = engine
        .image(&src.image)
        .await?
        .ok_or_else(|| ArtifactError::NotInEngine {
            image: src.image.clone(),
            engine: engine.address().to_string(),
            artifacts: artifacts.to_string(),
        })?;
    let stream = engine.export(std::slice::from_ref(&src.image));
    Ok(Opened {
        reader: Box::new(SyncIoBridge::new(StreamReader::new(Box::pin(stream)))),
        total: found.size,
        want_id: Some(found.id),
        name: "the Docker engine".to_string(),
    })
}

/// Export (or open) one image, read its layers once, and return its merged view at the
/// requested paths.
async fn read_source(
    plan: &Plan,
    src: &Source,
    engine: Option<&EngineImages>,
    own_engine: &mut Option<Engine>,
    dir: &Path,
    reporter: &dyn Reporter,
) -> Result<(View, ImageRead)> {
    let artifacts = src
        .targets
        .iter()
        .map(|t| t.describe(plan))
        .collect::<Vec<_>>()
        .join(", ");
    let wanted = Wanted::new(src.targets.iter().flat_map(|t| t.paths(plan)));
    let opened = open_source(src, &artifacts, engine, own_engine).await?;
    let task = reporter.task(&format!("reading files from {}", src.image), Some(opened.total));
    let scanned = tokio::task::block_in_place(|| extract::scan(opened.reader, &opened.name, &wanted, dir, &*task));
    task.finish();
    let scanned = scanned?;
    let image = match &opened.want_id {
        Some(id) => scanned.images.iter().find(|i| &i.id == id).cloned().ok_or_else(|| {
            Error::external(format!(
                "the Docker engine's export did not contain image {} ({id})",
                src.image
            ))
            .hint("was the image removed or re-tagged while packing? run pack again")
        })?,
        None => super::images::pick_from_archive(&src.image, &scanned.images).ok_or_else(|| {
            let tags: Vec<String> = scanned.images.iter().flat_map(|i| i.tags.clone()).collect();
            ArtifactError::NotInArchive {
                image: src.image.clone(),
                path: src.archive.clone().unwrap_or_default(),
                holds: if tags.is_empty() {
                    "untagged images".into()
                } else {
                    tags.join(", ")
                },
                artifacts: artifacts.clone(),
            }
        })?,
    };
    let layers: Vec<&[(String, extract::Change)]> = image
        .layers
        .iter()
        .filter_map(|d| scanned.layers.get(d).map(|(_, c)| c.as_slice()))
        .collect();
    let image_bytes = image
        .layers
        .iter()
        .filter_map(|d| scanned.layers.get(d).map(|(n, _)| *n))
        .fold(0u64, u64::saturating_add);
    let read = ImageRead {
        image: src.image.clone(),
        id: image.id.clone(),
        layers_read: scanned.blobs,
        bytes_read: scanned.bytes_read,
        image_bytes,
        artifacts: src.targets.len(),
    };
    Ok((View::build(layers), read))
}

/// Fetch (or read from its OCI layout) one image's manifest, config and layers, each layer blob
/// once and checked as pack's image fetch checks it, and return its merged view at the requested
/// paths.
async fn read_remote(
    plan: &Plan,
    src: &Source,
    want: &RemoteWant,
    remote: &mut Remote,
    dir: &Path,
    reporter: &dyn Reporter,
) -> Result<(View, ImageRead)> {
    let source = match &want.layout {
        Some(d) => ImageSource::OciLayout(d),
        None => ImageSource::Mirror,
    };
    let img = remote
        .resolve(plan, &src.image, source, want.pinned.as_deref(), &want.platform)
        .await?;
    let wanted = Wanted::new(src.targets.iter().flat_map(|t| t.paths(plan)));
    let total = img.layers.iter().map(|(d, _)| d.size).fold(0u64, u64::saturating_add);
    let task = reporter.task(&format!("reading files from {}", src.image), Some(total));
    let mut layers = Vec::new();
    let mut bytes_read = 0u64;
    let result: Result<()> = async {
        for (k, (d, diff)) in img.layers.iter().enumerate() {
            let raw = img.open_blob(d).await?;
            let layer_dir = dir.join(format!("layer{k}"));
            let scanned = tokio::task::block_in_place(|| {
                // Progress is counted in uncompressed bytes by the scan: none here.
                let noop = |_: u64| {};
                let mut blob = Digested::new(raw, d, &noop);
                let r = extract::scan_layer(&mut blob, &img.place, &wanted, &layer_dir, &*task)
                    .and_then(|x| blob.drain().map(|_| x).map_err(|e| Error::external(e.to_string())));
                if r.is_err() && blob.failure.is_none() {
                    // The blob's digest, if it is wrong, is the cause to name.
                    let _ = blob.drain();
                }
                match (r, blob.failure.clone()) {
                    (_, Some(f)) => Err(img.blob_error(d, Some(&f), None)),
                    (r, None) => r,
                }
            })?;
            let (got, size, changes) = scanned;
            if &got != diff {
                return Err(img.blob_error(d, None, Some((diff, &got))));
            }
            bytes_read = bytes_read.saturating_add(size);
            layers.push(changes);
        }
        Ok(())
    }
    .await;
    task.finish();
    result?;
    let read = ImageRead {
        image: src.image.clone(),
        id: img.id.clone(),
        layers_read: layers.len(),
        bytes_read,
        image_bytes: bytes_read,
        artifacts: src.targets.len(),
    };
    Ok((View::build(layers.iter().map(|c| c.as_slice())), read))
}

/// Build or take one artifact from the view of its image.
fn take(
    plan: &Plan,
    t: Target,
    view: &View,
    read: &ImageRead,
    dir: &Path,
    ex: &mut Extracted,
    problems: &mut Vec<Error>,
) {
    let ctx = Ctx {
        image: &read.image,
        artifact: t.describe(plan),
    };
    match t {
        Target::Installer(i) => {
            let inst = &plan.recipe.installers[i];
            let path = inst.path.clone().unwrap_or_default();
            match ctx.single_file(view, &path) {
                Ok(staged) => ex.installers.push(ReadyInstaller {
                    index: i,
                    name: inst.name(),
                    os: inst.os,
                    arch: inst.arch.clone(),
                    path: staged.path,
                    origin: Some((read.image.clone(), read.id.clone(), path)),
                }),
                Err(e) => problems.push(e.into()),
            }
        }
        Target::Package(i) => {
            let p = &plan.recipe.packages[i];
            match build_package(&ctx, p, view, dir) {
                Ok((path, listing)) => {
                    let name = p.file_name().unwrap_or_default();
                    ex.listings.insert(name, listing);
                    ex.built.insert(
                        i,
                        Built {
                            path,
                            image: read.image.clone(),
                            image_id: read.id.clone(),
                            paths: t.paths(plan),
                        },
                    );
                }
                Err(errs) => problems.extend(errs),
            }
        }
    }
}

/// The image and artifact every message of one artifact names.
struct Ctx<'a> {
    image: &'a str,
    artifact: String,
}

/// What a path in the image turned out to be, when it is not what was asked for.
enum Found {
    Missing,
    Kind(&'static str, String),
    Link(String, String),
}

impl Ctx<'_> {
    fn error(&self, path: &str, found: Found, expected: &'static str, tree: &str) -> ArtifactError {
        let (image, artifact) = (self.image.to_string(), self.artifact.clone());
        match found {
            Found::Missing => ArtifactError::Missing {
                image,
                path: path.to_string(),
                artifact,
            },
            Found::Kind(what, at) => ArtifactError::WrongKind {
                image,
                path: at,
                artifact,
                expected,
                found: what.to_string(),
            },
            Found::Link(at, target) => ArtifactError::Symlink {
                image,
                path: at,
                target,
                tree: tree.to_string(),
                artifact,
            },
        }
    }

    /// A regular file named by its own path (an installer, a file rule): present and not empty.
    fn single_file(&self, view: &View, path: &str) -> std::result::Result<Staged, ArtifactError> {
        match lookup(view, path) {
            Ok(Node::File(s)) if s.size == 0 => Err(ArtifactError::Empty {
                image: self.image.to_string(),
                path: path.to_string(),
                artifact: self.artifact.clone(),
            }),
            Ok(Node::File(s)) => Ok(s),
            Ok(n) => Err(self.error(path, Found::Kind(kind_of(&n), path.to_string()), "a regular file", path)),
            Err(f) => Err(self.error(path, f, "a regular file", path)),
        }
    }
}

fn kind_of(n: &Node) -> &'static str {
    match n {
        Node::Dir { .. } => "a directory",
        Node::File(_) => "a regular file",
        Node::Symlink { .. } => "a symlink",
        Node::HardLink { .. } => "a hard link to a file outside the requested paths",
        Node::Other => "a special file",
    }
}

/// The node at absolute image path `path`, refusing a symlink or non-directory above it (a
/// symlink at the path itself is returned as such).
fn lookup(view: &View, path: &str) -> std::result::Result<Node, Found> {
    let rel = normalize(path);
    let mut at = String::new();
    for c in rel.split('/').take(rel.split('/').count().saturating_sub(1)) {
        at = if at.is_empty() {
            c.to_string()
        } else {
            format!("{at}/{c}")
        };
        match view.nodes.get(&at) {
            Some(Node::Symlink { target }) => return Err(Found::Link(format!("/{at}"), target.clone())),
            Some(Node::Dir { .. }) | None => {}
            Some(n) => return Err(Found::Kind(kind_of(n), format!("/{at}"))),
        }
    }
    match view.get(&rel) {
        None => Err(Found::Missing),
        Some(Node::Symlink { target }) => Err(Found::Link(path.to_string(), target.clone())),
        Some(n) => Ok(n),
    }
}

/// A package file's content in the assembled tree, with the image path it came from.
#[derive(Clone)]
enum Item {
    Dir(u32),
    File { staged: Staged, from: String, named: bool },
}

/// Build the package's archive under `dir` and check it; every problem found.
fn build_package(
    ctx: &Ctx,
    p: &RecipePackage,
    view: &View,
    dir: &Path,
) -> std::result::Result<(PathBuf, Listing), Vec<Error>> {
    let items = assemble(ctx, p, view)?;
    let problems = check_tree(ctx, p, &items);
    if !problems.is_empty() {
        return Err(problems);
    }
    let name = p.file_name().unwrap_or_default();
    let path = dir.join(&name);
    write_zip(&items, &path).map_err(|e| vec![e])?;
    let listing = package_check::check(&path, PackageType::Controller, p.os).map_err(|e| {
        vec![ArtifactError::Refused {
            image: ctx.image.to_string(),
            artifact: ctx.artifact.clone(),
            message: e.message.replace(&path.display().to_string(), &name),
        }
        .into()]
    })?;
    Ok((path, listing))
}

/// The package's tree: each rule's file or directory placed, later rules replacing earlier ones.
fn assemble(ctx: &Ctx, p: &RecipePackage, view: &View) -> std::result::Result<BTreeMap<String, Item>, Vec<Error>> {
    let mut items = BTreeMap::new();
    let mut errors: Vec<Error> = Vec::new();
    for rule in &p.tree {
        let root = normalize(&rule.from);
        match lookup(view, &rule.from) {
            Err(f) => errors.push(ctx.error(&rule.from, f, "a file or directory", &rule.from).into()),
            Ok(Node::File(staged)) => {
                let to = if rule.to.is_empty() {
                    root.rsplit('/').next().unwrap_or_default().to_string()
                } else {
                    rule.to.clone()
                };
                let from = rule.from.clone();
                place(
                    &mut items,
                    &to,
                    Item::File {
                        staged,
                        from,
                        named: true,
                    },
                );
            }
            Ok(Node::Dir { mode }) => {
                if !rule.to.is_empty() {
                    place(&mut items, &rule.to, Item::Dir(mode));
                }
                for (path, node) in view.under(&root) {
                    let rel = &path[root.len() + 1..];
                    if rule.exclude.iter().any(|x| rel == x || is_under(rel, x)) {
                        continue;
                    }
                    let to = if rule.to.is_empty() {
                        rel.to_string()
                    } else {
                        format!("{}/{rel}", rule.to)
                    };
                    match tree_item(ctx, view, path, node, &root) {
                        Ok(item) => place(&mut items, &to, item),
                        Err(e) => errors.push(e.into()),
                    }
                }
            }
            Ok(n) => errors.push(
                ctx.error(
                    &rule.from,
                    Found::Kind(kind_of(&n), rule.from.clone()),
                    "a file or directory",
                    "",
                )
                .into(),
            ),
        }
    }
    if errors.is_empty() {
        Ok(items)
    } else {
        Err(errors)
    }
}

/// One node under a tree rule's directory as a package item; symlinks followed when their target
/// stays inside the tree.
fn tree_item(ctx: &Ctx, view: &View, path: &str, node: &Node, root: &str) -> std::result::Result<Item, ArtifactError> {
    let show = format!("/{path}");
    let tree = format!("/{root}");
    let mut node = node.clone();
    let mut at = path.to_string();
    for _ in 0..16 {
        match node {
            Node::Dir { mode } => return Ok(Item::Dir(mode)),
            Node::File(staged) => {
                return Ok(Item::File {
                    staged,
                    from: show,
                    named: false,
                })
            }
            Node::Symlink { target } => {
                let parent = at.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                let next = if target.starts_with('/') {
                    normalize(&target)
                } else {
                    normalize(&format!("{parent}/{target}"))
                };
                match view.get(&next) {
                    Some(n @ (Node::File(_) | Node::Symlink { .. })) if is_under(&next, root) => {
                        node = n;
                        at = next;
                    }
                    Some(Node::Dir { .. }) if is_under(&next, root) => {
                        return Err(ctx.error(
                            &show,
                            Found::Kind("a symlink to a directory", show.clone()),
                            "a file",
                            &tree,
                        ))
                    }
                    _ if is_under(&next, root) => {
                        return Err(ctx.error(&format!("/{next}"), Found::Missing, "a file", &tree))
                    }
                    _ => return Err(ctx.error(&show, Found::Link(show.clone(), target), "a file", &tree)),
                }
            }
            n => {
                return Err(ctx.error(
                    &show,
                    Found::Kind(kind_of(&n), show.clone()),
                    "a regular file or directory",
                    &tree,
                ))
            }
        }
    }
    Err(ctx.error(&show, Found::Kind("a loop of symlinks", show.clone()), "a file", &tree))
}

/// Put `item` at `to`: a file replaces whatever was under that path, and a file above it.
fn place(items: &mut BTreeMap<String, Item>, to: &str, item: Item) {
    if matches!(item, Item::File { .. }) {
        let under: Vec<String> = items.keys().filter(|k| is_under(k, to)).cloned().collect();
        for k in under {
            items.remove(&k);
        }
    }
    let mut at = String::new();
    for c in to.split('/') {
        if !at.is_empty() && matches!(items.get(&at), Some(Item::File { .. })) {
            items.remove(&at);
        }
        at = if at.is_empty() {
            c.to_string()
        } else {
            format!("{at}/{c}")
        };
    }
    items.insert(to.to_string(), item);
}

/// What a controller package must hold (BKLITE.md): sidecar.yml, install.sh on linux, at least one
/// `bin/*.exe` on windows; and no empty file where content is needed.
fn check_tree(ctx: &Ctx, p: &RecipePackage, items: &BTreeMap<String, Item>) -> Vec<Error> {
    let is_file = |k: &str| matches!(items.get(k), Some(Item::File { .. }));
    let mut missing = Vec::new();
    if p.os == Os::Linux && !is_file("install.sh") {
        missing.push("install.sh".to_string());
    }
    if !is_file("sidecar.yml") {
        missing.push("sidecar.yml".to_string());
    }
    let exe = |k: &String| is_under(k, "bin") && k.to_ascii_lowercase().ends_with(".exe");
    if p.os == Os::Windows && !items.keys().any(|k| exe(k) && is_file(k)) {
        missing.push("bin/*.exe".to_string());
    }
    let mut problems: Vec<Error> = Vec::new();
    if !missing.is_empty() {
        problems.push(
            ArtifactError::Incomplete {
                image: ctx.image.to_string(),
                artifact: ctx.artifact.clone(),
                paths: p.tree.iter().map(|r| r.from.as_str()).collect::<Vec<_>>().join(", "),
                os: p.os.as_str(),
                missing,
            }
            .into(),
        );
    }
    let needed = [
        "install.sh",
        "uninstall.sh",
        "sidecar.yml",
        "VERSION",
        "collector-sidecar",
    ];
    for (k, item) in items {
        if let Item::File { staged, from, named } = item {
            if staged.size == 0 && (*named || needed.contains(&k.as_str()) || is_under(k, "bin")) {
                problems.push(
                    ArtifactError::Empty {
                        image: ctx.image.to_string(),
                        path: from.clone(),
                        artifact: ctx.artifact.clone(),
                    }
                    .into(),
                );
            }
        }
    }
    problems
}

/// The archive: `fusion-collectors/` and every item under it, directories (also implied ones)
/// and files sorted, deflated, with a fixed time and the image's permission bits.
fn write_zip(items: &BTreeMap<String, Item>, path: &Path) -> Result<()> {
    use zip::write::SimpleFileOptions;
    let mut all: BTreeMap<String, Item> = items.clone();
    for k in items.keys() {
        let mut at = String::new();
        for c in k.split('/').take(k.split('/').count().saturating_sub(1)) {
            at = if at.is_empty() {
                c.to_string()
            } else {
                format!("{at}/{c}")
            };
            all.entry(at.clone()).or_insert(Item::Dir(0o755));
        }
    }
    let zerr = |e: zip::result::ZipError| Error::io("cannot write package", path, io::Error::other(e));
    let file = fs::File::create(path).io_ctx("cannot create package", path)?;
    let mut z = zip::ZipWriter::new(io::BufWriter::new(file));
    let base = SimpleFileOptions::default().last_modified_time(zip::DateTime::DEFAULT);
    z.add_directory(format!("{TOP}/"), base.unix_permissions(0o755))
        .map_err(zerr)?;
    for (k, item) in &all {
        match item {
            Item::Dir(mode) => {
                let mode = if mode & 0o777 == 0 { 0o755 } else { mode & 0o777 };
                z.add_directory(format!("{TOP}/{k}/"), base.unix_permissions(mode))
                    .map_err(zerr)?;
            }
            Item::File { staged, .. } => {
                let opts = base
                    .compression_method(zip::CompressionMethod::Deflated)
                    .unix_permissions(staged.mode & 0o777)
                    .large_file(staged.size >= u64::from(u32::MAX));
                z.start_file(format!("{TOP}/{k}"), opts).map_err(zerr)?;
                let mut f = fs::File::open(&staged.path).io_ctx("cannot read staged file", &staged.path)?;
                io::copy(&mut f, &mut z).io_ctx("cannot write package", path)?;
            }
        }
    }
    let mut w = z.finish().map_err(zerr)?;
    io::Write::flush(&mut w).io_ctx("cannot write package", path)?;
    Ok(())
}

/// Collectors pointing into a package built from an image: their entry is in it.
fn check_collectors(plan: &Plan, ex: &Extracted, problems: &mut Vec<Error>) {
    for (i, b) in &ex.built {
        let controller = &plan.recipe.packages[*i];
        let name = controller.file_name().unwrap_or_default();
        let Some(listing) = ex.listings.get(&name) else {
            continue;
        };
        for p in plan.recipe.packages.iter().filter(|p| p.from.as_ref() == Some(&name)) {
            let entry = p.entry.clone().unwrap_or_default();
            if listing.find(&entry).is_none() {
                problems.push(
                    ArtifactError::EntryMissing {
                        image: b.image.clone(),
                        artifact: describe_package(controller),
                        collector: format!("{} {}/{}", p.object, p.os.as_str(), p.arch),
                        entry,
                    }
                    .into(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_killed_packs_staging_is_removed_and_a_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("x.bkb");
        // A process that has exited: its id is free (or another process's, which is then kept).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = d.path().join(format!(".x.bkb.extract-{dead}"));
        let live = d
            .path()
            .join(format!(".x.bkb.extract-{}", std::os::unix::process::parent_id()));
        let other = d.path().join(format!(".y.bkb.extract-{dead}"));
        for p in [&stale, &live, &other] {
            std::fs::create_dir_all(p.join("image0/layer0")).unwrap();
        }
        let staging = super::Staging::create(&out).unwrap();
        assert_eq!(
            !stale.exists(),
            !super::process_alive(dead as i32),
            "a dead pack's staging is removed"
        );
        assert!(live.exists(), "a live pack's staging is kept");
        assert!(other.exists(), "another output's staging is not this pack's");
        assert!(staging.0.is_dir());
        let own = staging.0.clone();
        drop(staging);
        assert!(!own.exists());
    }

    use super::*;
    use crate::manifest::TreeRule;

    fn file(dir: &Path, name: &str, content: &str, mode: u32) -> Node {
        let path = dir.join(name.replace('/', "_"));
        fs::write(&path, content).unwrap();
        Node::File(Staged {
            path,
            size: content.len() as u64,
            mode,
        })
    }

    fn package(os: Os, tree: Vec<TreeRule>) -> RecipePackage {
        RecipePackage {
            file: None,
            kind: PackageType::Controller,
            os,
            arch: "x86_64".into(),
            object: "Controller".into(),
            version: "1".into(),
            description: String::new(),
            from: None,
            entry: None,
            image: Some("img:1".into()),
            image_archive: None,
            name: Some("p.zip".into()),
            tree,
        }
    }

    fn rule(from: &str, to: &str, exclude: &[&str]) -> TreeRule {
        TreeRule {
            from: from.into(),
            to: to.into(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn rules_apply_in_order_with_excludes_and_links_inside_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let mut view = View::default();
        for (p, c, m) in [
            ("opt/fc/install.sh", "old", 0o755),
            ("opt/fc/sidecar.yml", "s", 0o644),
            ("opt/fc/misc/linux/install.sh", "new", 0o700),
            ("opt/fc/misc/VERSION", "1.0.1", 0o644),
            ("opt/fc/bin/t", "t", 0o755),
        ] {
            view.nodes.insert(p.into(), file(d.path(), p, c, m));
        }
        view.nodes
            .insert("opt/fc/bin/l".into(), Node::Symlink { target: "t".into() });
        let p = package(
            Os::Linux,
            vec![
                rule("/opt/fc", "", &["misc"]),
                rule("/opt/fc/misc/linux", "", &[]),
                rule("/opt/fc/misc/VERSION", "VERSION", &[]),
            ],
        );
        let ctx = Ctx {
            image: "img:1",
            artifact: describe_package(&p),
        };
        let items = assemble(&ctx, &p, &view).unwrap_or_else(|e| panic!("{e:?}"));
        let keys: Vec<&str> = items.keys().map(String::as_str).collect();
        assert_eq!(keys, ["VERSION", "bin/l", "bin/t", "install.sh", "sidecar.yml"]);
        match &items["install.sh"] {
            Item::File { staged, .. } => assert_eq!(staged.mode, 0o700, "the later rule's file"),
            Item::Dir(_) => panic!("a file"),
        }
        match &items["bin/l"] {
            Item::File { staged, .. } => assert_eq!(fs::read_to_string(&staged.path).unwrap(), "t"),
            Item::Dir(_) => panic!("a file"),
        }
        assert!(check_tree(&ctx, &p, &items).is_empty());
        // The same tree is not a windows package: it has no bin/*.exe.
        let w = package(Os::Windows, p.tree.clone());
        let e = check_tree(&ctx, &w, &items);
        assert!(e[0].message.contains("has no bin/*.exe"), "{}", e[0].message);
    }

    #[test]
    fn links_leaving_the_tree_and_links_above_it_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut view = View::default();
        view.nodes
            .insert("etc/passwd".into(), file(d.path(), "p", "root", 0o644));
        view.nodes
            .insert("opt/fc/sidecar.yml".into(), file(d.path(), "s", "s", 0o644));
        view.nodes.insert(
            "opt/fc/x".into(),
            Node::Symlink {
                target: "../../etc/passwd".into(),
            },
        );
        view.nodes.insert("srv".into(), Node::Symlink { target: "opt".into() });
        let ctx = Ctx {
            image: "img:1",
            artifact: "package p.zip".into(),
        };
        let e = assemble(&ctx, &package(Os::Linux, vec![rule("/opt/fc", "", &[])]), &view)
            .err()
            .unwrap();
        assert!(
            e[0].message
                .contains("/opt/fc/x is a symlink to \"../../etc/passwd\", which is outside /opt/fc"),
            "{}",
            e[0].message
        );
        let e = assemble(&ctx, &package(Os::Linux, vec![rule("/srv/fc", "", &[])]), &view)
            .err()
            .unwrap();
        assert!(
            e[0].message.contains("image img:1: /srv is a symlink to \"opt\""),
            "{}",
            e[0].message
        );
        let e = ctx.single_file(&view, "/opt/fc").err().unwrap().to_string();
        assert!(e.contains("/opt/fc is a directory, expected a regular file"), "{e}");
    }
}
