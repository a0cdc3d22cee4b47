//! `bkbundle pack`: turn a recipe into a bundle.
//!
//! Everything that can be checked before writing is checked first (recipe, package archives,
//! stack files, image availability), so a bad input fails in seconds and names the thing. Then
//! images stream from the engine (`docker save` through the API, all engine images in one stream so
//! the engine sends shared layers once) or from archives on disk straight into the bundle: no
//! staging copy, memory bounded by buffers. The bundle is written under a temporary name and
//! renamed at the end.

use crate::bundle::{layout, BundleWriter};
use crate::engine::Engine;
use crate::error::{Error, IoContext, Kind, Result};
use crate::manifest::{
    self, BundleInfo, Compression, Image, Layer, Manifest, Package, PackageType, Recipe, Stack, FORMAT,
};
use crate::package_check::{self, Listing};
use crate::progress::Reporter;
use crate::savefile::{self, SavedImage, Settings, StoredLayer};
use crate::sign::{self, Signer};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio_util::io::{StreamReader, SyncIoBridge};

#[derive(Debug, Clone)]
pub struct PackOptions {
    pub recipe: PathBuf,
    pub output: PathBuf,
    pub compression: Compression,
    /// zstd 1..19 (default 3) or gzip 1..9 (default 6).
    pub level: Option<i32>,
    pub split_size: Option<u64>,
    pub sign_key: Option<PathBuf>,
    /// Compression worker threads (zstd); default: the number of CPUs.
    pub threads: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct PackReport {
    pub bundle: String,
    pub version: String,
    pub output: Vec<PathBuf>,
    pub bytes: u64,
    pub images: usize,
    pub layers: usize,
    pub image_bytes_uncompressed: u64,
    pub image_bytes_stored: u64,
    pub packages: usize,
    pub stack_files: usize,
    pub signed_by: Option<String>,
    pub seconds: f64,
    pub steps: Vec<(String, f64)>,
}

struct Checked {
    packages: Vec<(manifest::RecipePackage, Option<PathBuf>)>,
    /// Controller packages' listings by file name (collector `from`/`entry` point into them).
    listings: BTreeMap<String, Listing>,
    stack: Option<(PathBuf, Vec<String>)>,
}

pub async fn run(opts: PackOptions, reporter: Arc<dyn Reporter>) -> Result<PackReport> {
    let t0 = Instant::now();
    let mut steps = Vec::new();
    let text = fs::read_to_string(&opts.recipe).io_ctx("cannot read recipe", &opts.recipe)?;
    let recipe = Recipe::parse(&text, &opts.recipe.display().to_string()).map_err(|e| e.into_error(Kind::Input))?;
    let base = opts.recipe.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    let level = opts.level.unwrap_or(match opts.compression {
        Compression::Zstd => 3,
        Compression::Gzip => 6,
    });
    match opts.compression {
        Compression::Zstd if !(1..=19).contains(&level) => {
            return Err(Error::input(format!("--level {level}: zstd levels are 1 to 19")))
        }
        Compression::Gzip if !(1..=9).contains(&level) => {
            return Err(Error::input(format!("--level {level}: gzip levels are 1 to 9")))
        }
        _ => {}
    }
    let signer = opts.sign_key.as_deref().map(Signer::load).transpose()?;

    // 1. Check every input before writing anything.
    let t = Instant::now();
    let (checked, mut problems) = check_inputs(&recipe, &base);
    let engine_refs: Vec<&manifest::RecipeImage> = recipe.images.iter().filter(|i| i.archive.is_none()).collect();
    let mut engine_ids: HashMap<String, (String, u64)> = HashMap::new();
    let engine = if engine_refs.is_empty() {
        None
    } else {
        Some(Engine::connect().await?)
    };
    if let Some(engine) = &engine {
        // After one failed pull, the others would fail the same way (registry unreachable):
        // don't wait for each, say which pull failed.
        let mut failed_pull: Option<String> = None;
        for img in &engine_refs {
            match find_or_pull(engine, img, failed_pull.as_deref(), &*reporter).await {
                Ok(found) => {
                    engine_ids.insert(img.reference.clone(), (found.id, found.size));
                }
                Err(e) => {
                    if img.pull && failed_pull.is_none() {
                        failed_pull = Some(img.reference.clone());
                    }
                    problems.push(e)
                }
            }
        }
    }
    for img in recipe.images.iter().filter_map(|i| i.archive.as_ref().map(|a| (i, a))) {
        let p = base.join(img.1);
        if !p.is_file() {
            problems.push(
                Error::input(format!("image {}: archive {} not found", img.0.reference, p.display()))
                    .hint("make it with `docker save -o FILE REF` or `skopeo copy ... docker-archive:FILE`; paths are relative to the recipe"),
            );
        }
    }
    combine(problems)?;
    steps.push(("check inputs".to_string(), t.elapsed().as_secs_f64()));

    // 2. Write.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if let Some(dir) = opts.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(Error::input(format!(
                "output directory {} does not exist",
                dir.display()
            )));
        }
    }
    let mut writer = BundleWriter::create(&opts.output, opts.split_size, now)?;
    let mut stored: HashMap<String, StoredLayer> = HashMap::new();
    let threads = opts.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    let mut saved: Vec<(String, SavedImage)> = Vec::new(); // (recipe ref, image)

    let t = Instant::now();
    if let Some(engine) = &engine {
        let refs: Vec<String> = engine_refs.iter().map(|i| i.reference.clone()).collect();
        let total: u64 = engine_ids.values().map(|(_, s)| *s).sum();
        let task: Arc<dyn crate::progress::Task> = Arc::from(reporter.task("exporting images", Some(total)));
        let reader = SyncIoBridge::new(StreamReader::new(Box::pin(engine.export(&refs))));
        let t2 = task.clone();
        let (w, st, images) = tokio::task::spawn_blocking(move || {
            let progress = move |n: u64| t2.advance(n);
            let s = Settings {
                compression: opts.compression,
                level,
                threads,
                progress: &progress,
                source: "the Docker engine",
            };
            let r = savefile::ingest(reader, &mut writer, &mut stored, &s);
            (writer, stored, r)
        })
        .await
        .map_err(|e| Error::internal(format!("image export task: {e}")))?;
        task.finish();
        writer = w;
        stored = st;
        let images = images?;
        for img in &engine_refs {
            let (id, _) = &engine_ids[&img.reference];
            let found = images.iter().find(|i| &i.id == id).ok_or_else(|| {
                Error::external(format!(
                    "the Docker engine's export did not contain image {} ({id})",
                    img.reference
                ))
                .hint("was the image removed or re-tagged while packing? run pack again")
            })?;
            saved.push((img.reference.clone(), found.clone()));
        }
    }
    for img in recipe.images.iter().filter(|i| i.archive.is_some()) {
        let path = base.join(img.archive.as_deref().unwrap_or(Path::new("")));
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let task: Arc<dyn crate::progress::Task> =
            Arc::from(reporter.task(&format!("reading {}", img.reference), Some(size)));
        let file = fs::File::open(&path).io_ctx("cannot open image archive", &path)?;
        let (t2, source) = (task.clone(), path.display().to_string());
        let (w, st, images) = tokio::task::spawn_blocking(move || {
            let progress = move |n: u64| t2.advance(n);
            let s = Settings {
                compression: opts.compression,
                level,
                threads,
                progress: &progress,
                source: &source,
            };
            let r = savefile::ingest(
                std::io::BufReader::with_capacity(1 << 20, file),
                &mut writer,
                &mut stored,
                &s,
            );
            (writer, stored, r)
        })
        .await
        .map_err(|e| Error::internal(format!("image archive task: {e}")))?;
        task.finish();
        writer = w;
        stored = st;
        let images = images?;
        let found = pick_from_archive(&img.reference, &images).ok_or_else(|| {
            let tags: Vec<String> = images.iter().flat_map(|i| i.tags.clone()).collect();
            Error::input(format!(
                "image {}: archive {} does not hold it (it holds {})",
                img.reference,
                path.display(),
                if tags.is_empty() {
                    "untagged images".into()
                } else {
                    tags.join(", ")
                }
            ))
            .hint("fix `ref` to one of those tags, or export the right image into the archive")
        })?;
        saved.push((img.reference.clone(), found));
    }
    steps.push(("images".to_string(), t.elapsed().as_secs_f64()));

    // Configs, once per image id; refs merged.
    let mut images: Vec<Image> = Vec::new();
    for (reference, img) in &saved {
        if let Some(existing) = images.iter_mut().find(|i| i.id == img.id) {
            if !existing.refs.contains(reference) {
                existing.refs.push(reference.clone());
            }
            continue;
        }
        let hex = img.id.trim_start_matches("sha256:");
        let config = layout::config_path(hex);
        if !writer.contains(&config) {
            writer.add_bytes(&config, 0o644, &img.config)?;
        }
        let size = img
            .layers
            .iter()
            .map(|l| stored.get(l).map(|s| s.size).unwrap_or(0))
            .sum();
        images.push(Image {
            refs: vec![reference.clone()],
            id: img.id.clone(),
            config,
            os: img.os.clone(),
            arch: img.arch.clone(),
            layers: img.layers.clone(),
            size,
        });
    }
    let mut layers: Vec<Layer> = stored
        .values()
        .map(|s| Layer {
            diff_id: s.diff_id.clone(),
            file: s.file.clone(),
            size: s.size,
        })
        .collect();
    layers.sort_by(|a, b| a.file.cmp(&b.file));

    // 3. Packages and stack files.
    let t = Instant::now();
    let mut packages = Vec::new();
    for (p, path) in &checked.packages {
        let name = match (&p.file, &p.from) {
            (Some(f), _) => f
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            // A collector inside a controller package is recorded under its binary's name.
            _ => p
                .entry
                .as_deref()
                .and_then(|e| e.rsplit('/').next())
                .unwrap_or_default()
                .to_string(),
        };
        let (file, digest) = match path {
            Some(path) => {
                let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                let task = reporter.task(&format!("package {name}"), Some(size));
                let mut f = fs::File::open(path).io_ctx("cannot open package", path)?;
                let entry =
                    writer.add_reader(&layout::package_path(&name), 0o644, &mut ProgressRead(&mut f, &*task))?;
                task.finish();
                (Some(entry.path), Some((entry.sha256, entry.size)))
            }
            // The entry's digest was taken when its controller package was checked.
            None => (
                None,
                match (&p.from, &p.entry) {
                    (Some(from), Some(entry)) => checked.listings.get(from).and_then(|l| l.digest(entry)).cloned(),
                    _ => None,
                },
            ),
        };
        packages.push(Package {
            file,
            name,
            kind: p.kind,
            os: p.os,
            arch: p.arch.clone(),
            object: p.object.clone(),
            version: p.version.clone(),
            description: p.description.clone(),
            from: p.from.clone(),
            entry: p.entry.clone(),
            sha256: digest.as_ref().map(|d| d.0.clone()),
            size: digest.map(|d| d.1),
        });
    }
    let mut stack = None;
    if let (Some(s), Some((dir, files))) = (&recipe.stack, &checked.stack) {
        let mut paths = Vec::new();
        for rel in files {
            let src = dir.join(rel);
            let mode = file_mode(&src);
            let mut f = fs::File::open(&src).io_ctx("cannot open stack file", &src)?;
            let e = writer.add_reader(&layout::stack_path(rel), mode, &mut f)?;
            paths.push(e.path);
        }
        stack = Some(Stack {
            project: s.project.clone().unwrap_or_else(|| recipe.bundle.name.clone()),
            compose: layout::stack_path(&s.compose),
            env_template: s.env_template.as_deref().map(layout::stack_path),
            files: paths,
        });
    }
    // The tool itself, so the offline host needs nothing else.
    let exe = std::env::current_exe()
        .map_err(|e| Error::internal(format!("cannot locate the running bkbundle binary: {e}")))?;
    let mut f = fs::File::open(&exe).io_ctx("cannot read the bkbundle binary", &exe)?;
    writer.add_reader(layout::BINARY, 0o755, &mut f)?;
    steps.push(("packages and stack".to_string(), t.elapsed().as_secs_f64()));

    // 4. Manifest, signature, sums; then commit.
    let m = Manifest {
        format: FORMAT,
        bundle: BundleInfo {
            name: recipe.bundle.name.clone(),
            version: recipe.bundle.version.clone(),
            description: recipe.bundle.description.clone(),
            created: rfc3339(now),
            created_by: format!("bkbundle {}", env!("CARGO_PKG_VERSION")),
            compression: opts.compression,
        },
        files: writer.files().to_vec(),
        layers,
        images,
        packages,
        stack,
        regions: recipe.regions.clone(),
    };
    let problems = m.problems();
    if !problems.is_empty() {
        return Err(Error::internal(format!(
            "the manifest being written is inconsistent: {}",
            problems.join("; ")
        )));
    }
    let text = m.to_toml();
    let mut signed_by = None;
    let signature = match &signer {
        Some(signer) => {
            let comment = format!(
                "timestamp:{now}\tfile:{}\tbundle:{} {}",
                layout::MANIFEST,
                m.bundle.name,
                m.bundle.version
            );
            let (sig, pubkey) = signer.sign(text.as_bytes(), &comment)?;
            signed_by = sign::parse_public_key(&pubkey).ok().map(|pk| sign::key_id(pk.keynum()));
            Some((sig, pubkey))
        }
        None => None,
    };
    writer.add_descriptive(&m, &text, signature.as_ref().map(|(s, p)| (s.as_str(), p.as_str())))?;
    let bytes = writer.position()? + 1024;
    let output = writer.commit()?;

    let image_bytes_stored = m
        .layers
        .iter()
        .chain(std::iter::empty())
        .filter_map(|l| m.file(&l.file))
        .map(|f| f.size)
        .sum::<u64>()
        + m.images
            .iter()
            .filter_map(|i| m.file(&i.config))
            .map(|f| f.size)
            .sum::<u64>();
    Ok(PackReport {
        bundle: m.bundle.name.clone(),
        version: m.bundle.version.clone(),
        output,
        bytes,
        images: m.images.len(),
        layers: m.layers.len(),
        image_bytes_uncompressed: m.layers.iter().map(|l| l.size).sum(),
        image_bytes_stored,
        packages: m.packages.len(),
        stack_files: m.stack.as_ref().map(|s| s.files.len()).unwrap_or(0),
        signed_by,
        seconds: t0.elapsed().as_secs_f64(),
        steps,
    })
}

/// The engine's image for a recipe entry, pulled through the engine when absent and allowed
/// (unless an earlier pull, `failed_pull`, already failed).
async fn find_or_pull(
    engine: &Engine,
    img: &manifest::RecipeImage,
    failed_pull: Option<&str>,
    reporter: &dyn Reporter,
) -> Result<crate::engine::LocalImage> {
    let mut found = engine.image(&img.reference).await?;
    if found.is_none() && img.pull {
        if let Some(first) = failed_pull {
            return Err(Error::external(format!(
                "image {} is not in the local Docker engine (not pulled: pulling {first} already failed)",
                img.reference
            )));
        }
        reporter.note(&format!("pulling image {} through the Docker engine", img.reference));
        engine.pull(&img.reference).await?;
        found = engine.image(&img.reference).await?;
    }
    found.ok_or_else(|| {
        Error::input(format!("image {} is not in the local Docker engine ({})", img.reference, engine.address())).hint(
            if img.pull {
                "the pull reported success but the image is still absent: check the reference"
            } else {
                "load or build it first (`docker load -i FILE`), allow `pull = true`, or give `archive = \"file.tar\"` in the recipe"
            },
        )
    })
}

/// One error for all problems found, so the operator fixes them in one round.
fn combine(mut problems: Vec<Error>) -> Result<()> {
    match problems.len() {
        0 => Ok(()),
        1 => Err(problems.remove(0)),
        n => Err(Error::all(format!("{n} problems with the recipe's inputs"), problems)),
    }
}

/// Check packages and stack files, collecting every problem.
fn check_inputs(recipe: &Recipe, base: &Path) -> (Checked, Vec<Error>) {
    let mut problems: Vec<Error> = Vec::new();
    let mut listings: BTreeMap<String, Listing> = BTreeMap::new();
    let mut packages = Vec::new();
    for p in &recipe.packages {
        let path = p.file.as_ref().map(|f| base.join(f));
        if let Some(path) = &path {
            match package_check::check(path, p.kind, p.os) {
                Ok(l) => {
                    if p.kind == PackageType::Controller {
                        listings.insert(path.file_name().unwrap_or_default().to_string_lossy().to_string(), l);
                    }
                }
                Err(e) => problems.push(e),
            }
        }
        packages.push((p.clone(), path));
    }
    for p in recipe.packages.iter().filter(|p| p.from.is_some()) {
        let (from, entry) = (p.from.as_deref().unwrap_or(""), p.entry.as_deref().unwrap_or(""));
        if let Some(l) = listings.get(from) {
            if l.find(entry).is_none() {
                problems.push(Error::input(format!(
                    "package {} {} ({}/{}): entry {entry:?} is not in {from}",
                    p.object,
                    p.version,
                    p.os.as_str(),
                    p.arch
                )));
            }
        }
    }
    let mut stack = None;
    if let Some(s) = &recipe.stack {
        let dir = base.join(&s.dir);
        let mut files = Vec::new();
        match walk(&dir, &dir, &mut files) {
            Err(e) => problems.push(e),
            Ok(()) => {
                for (what, want) in [("compose", Some(&s.compose)), ("env_template", s.env_template.as_ref())] {
                    if let Some(want) = want {
                        if !files.contains(want) {
                            problems.push(Error::input(format!(
                                "stack.{what}: {} not found",
                                dir.join(want).display()
                            )));
                        }
                    }
                }
                if files.contains(&s.compose) {
                    problems.extend(check_offline(recipe, &dir, s));
                }
            }
        }
        files.sort();
        stack = Some((dir, files));
    }
    (
        Checked {
            packages,
            listings,
            stack,
        },
        problems,
    )
}

/// The offline guarantee of the stack: every service's image is one the recipe packs, nothing is
/// built, nothing is pulled (`${VAR}` in an image is resolved from the env template, as compose
/// would on the offline host). A recipe that packs no image at all makes a stack-only bundle whose
/// images must already be in the install host's engine (install's preflight checks that).
fn check_offline(recipe: &Recipe, dir: &Path, s: &manifest::RecipeStack) -> Vec<Error> {
    use crate::install::offline;
    let path = dir.join(&s.compose);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return vec![Error::io("cannot read compose file", &path, e)],
    };
    let services = match offline::services(&text) {
        Ok(v) => v,
        Err(e) => {
            return vec![Error::input(format!(
                "compose file {}: not valid YAML: {e}",
                path.display()
            ))]
        }
    };
    let vars = s
        .env_template
        .as_ref()
        .and_then(|t| fs::read_to_string(dir.join(t)).ok())
        .map(|t| offline::template_values(&t))
        .unwrap_or_default();
    let packed: Vec<String> = recipe
        .images
        .iter()
        .map(|i| offline::normalize_ref(&i.reference))
        .collect();
    let mut out = Vec::new();
    let mut resolved = Vec::new();
    for mut svc in services {
        if let Some(image) = svc.image.clone().filter(|i| i.contains('$')) {
            match offline::interpolate(&image, &vars) {
                Ok(i) => svc.image = Some(i),
                Err(missing) => {
                    out.push(
                        Error::input(format!(
                            "compose file {}: service {}: image {image} depends on {}, which the env template does not set; pack cannot tell which image that is",
                            path.display(),
                            svc.name,
                            missing.join(", ")
                        ))
                        .hint("write the service's image as a literal reference (or set the variable in the env template)"),
                    );
                    continue;
                }
            }
        }
        resolved.push(svc);
    }
    let stack_only = recipe.images.is_empty();
    for p in offline::problems(&resolved, &|i| {
        stack_only || packed.contains(&offline::normalize_ref(i))
    }) {
        out.push(Error::input(format!("compose file {}: {}", path.display(), p.message)).hint(p.hint));
    }
    out
}

/// Regular files under `dir`, relative, refusing links and special files.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let rd = fs::read_dir(dir).io_ctx("cannot read stack directory", dir)?;
    for e in rd {
        let e = e.io_ctx("cannot read stack directory", dir)?;
        let p = e.path();
        let ft = e.file_type().io_ctx("cannot stat", &p)?;
        if ft.is_dir() {
            walk(root, &p, out)?;
        } else if ft.is_file() {
            let rel = p.strip_prefix(root).unwrap_or(&p).to_string_lossy().to_string();
            if !manifest::is_safe_bundle_path(&rel) {
                return Err(Error::input(format!(
                    "stack file {} has a name a bundle cannot hold",
                    p.display()
                )));
            }
            out.push(rel);
        } else {
            return Err(Error::input(format!(
                "stack file {} is a symlink or special file; a bundle carries regular files only",
                p.display()
            ))
            .hint("replace it with a copy of the file it points to"));
        }
    }
    Ok(())
}

fn file_mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    match fs::metadata(p) {
        Ok(m) if m.permissions().mode() & 0o111 != 0 => 0o755,
        _ => 0o644,
    }
}

/// Pick the archive image a recipe ref names; a lone image is taken whatever its tag.
fn pick_from_archive(reference: &str, images: &[SavedImage]) -> Option<SavedImage> {
    let norm = crate::install::offline::normalize_ref;
    let want = norm(reference);
    images
        .iter()
        .find(|i| i.tags.iter().any(|t| norm(t) == want))
        .or_else(|| if images.len() == 1 { images.first() } else { None })
        .cloned()
}

struct ProgressRead<'a, R>(&'a mut R, &'a dyn crate::progress::Task);

impl<R: std::io::Read> std::io::Read for ProgressRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.advance(n as u64);
        Ok(n)
    }
}

/// RFC 3339 UTC time from Unix seconds (civil-from-days, no date crate needed).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_316_645), "2026-11-22T03:04:05Z");
    }

    #[test]
    fn archive_refs_match_normalised_tags() {
        let img = |t: &str| SavedImage {
            tags: vec![t.into()],
            id: t.into(),
            config: vec![],
            os: String::new(),
            arch: String::new(),
            layers: vec![],
        };
        let imgs = vec![img("docker.io/library/postgres:15"), img("bklite/server:3.1")];
        assert_eq!(
            pick_from_archive("postgres:15", &imgs).unwrap().id,
            "docker.io/library/postgres:15"
        );
        assert!(pick_from_archive("redis", &imgs).is_none());
        assert_eq!(
            pick_from_archive("anything", &imgs[..1]).unwrap().id,
            "docker.io/library/postgres:15"
        );
    }
}
