//! Pack's inputs: the recipe read and every input it names checked before anything is written
//! (package archives, stack files and their offline guarantee, image archives, the engine's
//! images, pulled when allowed), with every problem reported at once.

use super::PackOptions;
use crate::engine::{Engine, LocalImage};
use crate::error::{Error, IoContext, Kind, Result};
use crate::manifest::{
    self as format, Compression, ImageSource, PackageType, Recipe, RecipeImage, RecipePackage, RecipeStack,
};
use crate::package_check::{self, Listing};
use crate::progress::Reporter;
use crate::sign::Signer;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// A problem with one of pack's inputs; converted into [`Error`] with its kind and hint.
#[derive(Debug, thiserror::Error)]
pub enum PackInputError {
    #[error("--level {level}: {codec} levels are 1 to {max}")]
    Level { level: i32, codec: &'static str, max: i32 },
    #[error("output directory {} does not exist", .0.display())]
    OutputDir(PathBuf),
    #[error("image {reference}: archive {} not found", path.display())]
    ArchiveMissing { reference: String, path: PathBuf },
    #[error("image {reference}: archive {} does not hold it (it holds {holds})", path.display())]
    NotInArchive {
        reference: String,
        path: PathBuf,
        holds: String,
    },
    #[error("image {reference} is not in the local Docker engine ({engine})")]
    NotInEngine {
        reference: String,
        engine: String,
        pull: bool,
    },
    #[error("image {reference} is not in the local Docker engine (not pulled: pulling {first} already failed)")]
    NotPulled { reference: String, first: String },
    #[error("image {reference}: digest {digest} pins a manifest, but the image comes from the local Docker engine (no [registry] mirror, no oci_layout)")]
    DigestFromEngine { reference: String, digest: String },
    #[error("package {package}: entry {entry:?} is not in {from}")]
    EntryMissing {
        package: String,
        entry: String,
        from: String,
    },
    #[error("stack.{field}: {} not found", path.display())]
    StackFileMissing { field: &'static str, path: PathBuf },
    #[error("stack file {} has a name a bundle cannot hold", .0.display())]
    StackName(PathBuf),
    #[error("stack file {} is a symlink or special file; a bundle carries regular files only", .0.display())]
    StackSpecial(PathBuf),
    #[error("compose file {}: not valid YAML: {message}", path.display())]
    ComposeYaml { path: PathBuf, message: String },
    #[error("compose file {}: service {service}: image {image} depends on {}, which the env template does not set; pack cannot tell which image that is", path.display(), missing.join(", "))]
    ImageVariable {
        path: PathBuf,
        service: String,
        image: String,
        missing: Vec<String>,
    },
    #[error("compose file {}: {message}", path.display())]
    NotOffline {
        path: PathBuf,
        message: String,
        hint: String,
    },
}

impl From<PackInputError> for Error {
    fn from(e: PackInputError) -> Error {
        use PackInputError as P;
        let kind = match e {
            P::NotPulled { .. } => Kind::External,
            _ => Kind::Input,
        };
        let hint: Option<String> = match &e {
            P::Level { .. } => Some("pick a level in that range, or leave out --level for the default".into()),
            P::OutputDir(_) => Some("create the directory first, or give -o a path in an existing one".into()),
            P::ArchiveMissing { .. } => Some("make it with `docker save -o FILE REF` or `skopeo copy ... docker-archive:FILE`; paths are relative to the recipe".into()),
            P::NotInArchive { .. } => Some("fix `ref` to one of those tags, or export the right image into the archive".into()),
            P::NotInEngine { pull: true, .. } => Some("the pull reported success but the image is still absent: check the reference".into()),
            P::NotInEngine { pull: false, .. } => Some("load or build it first (`docker load -i FILE`), allow `pull = true`, or give `archive = \"file.tar\"` in the recipe".into()),
            P::NotPulled { .. } => Some("make the registry reachable (or load the images into the engine first) and run pack again".into()),
            P::DigestFromEngine { .. } => Some("name the registry that serves it ([registry] mirror in the recipe, or --mirror), give oci_layout, or remove digest".into()),
            P::EntryMissing { .. } => Some("fix `entry` to a path inside the controller package (`unzip -l FILE` or `tar -tzf FILE` lists them)".into()),
            P::StackFileMissing { .. } => Some("paths in [stack] are relative to stack.dir: fix the name or add the file".into()),
            P::StackName(_) => Some("rename the file to a plain name (no `\\`, no control characters)".into()),
            P::StackSpecial(_) => Some("replace it with a copy of the file it points to".into()),
            P::ComposeYaml { .. } => Some("fix the file (`docker compose config` shows where it fails)".into()),
            P::ImageVariable { .. } => Some("write the service's image as a literal reference (or set the variable in the env template)".into()),
            P::NotOffline { hint, .. } => Some(hint.clone()),
        };
        let mut err = Error::new(kind, e.to_string());
        if let Some(h) = hint {
            err = err.hint(h);
        }
        err
    }
}

/// The recipe and the settings derived from the options, before any input is looked at.
pub(super) struct Plan {
    pub recipe: Recipe,
    /// The recipe's directory: relative paths in it are relative to this.
    pub base: PathBuf,
    pub compression: Compression,
    pub level: i32,
    pub threads: u32,
    pub signer: Option<Signer>,
    /// `--no-images`: layers are read for their digests and sizes, not stored.
    pub no_images: bool,
    /// `--base`: the bundle this one is a delta of.
    pub delta_base: Option<crate::delta::BaseBundle>,
    /// The registry plain references come from: `--mirror`, else the recipe's `[registry]`.
    pub mirror: Option<super::Mirror>,
    /// How to reach it.
    pub access: crate::registry::Access,
    /// `--recompress`: fetched gzip/zstd layers get the bundle's compression too.
    pub recompress: bool,
}

/// What the checks found, for the writing steps.
pub(super) struct Checked {
    /// Each recipe package with its file's path (none for a collector inside a controller).
    pub packages: Vec<(RecipePackage, Option<PathBuf>)>,
    /// Controller packages' listings by file name (collector `from`/`entry` point into them).
    pub listings: BTreeMap<String, Listing>,
    /// The stack directory and its files, relative and sorted.
    pub stack: Option<(PathBuf, Vec<String>)>,
    /// The engine images, when the recipe has any.
    pub engine: Option<EngineImages>,
    /// The images of the mirror and of OCI layouts, resolved (manifests and configs checked).
    pub remote: super::remote::Remote,
}

/// The recipe's images that come from the engine, found (or pulled) there.
pub(super) struct EngineImages {
    pub engine: Engine,
    pub refs: Vec<RecipeImage>,
    /// Recipe reference → (image id, size).
    pub found: HashMap<String, (String, u64)>,
}

/// Read the recipe, and check the options that need no input (level, signing key, the base).
pub(super) fn read(opts: &PackOptions, reporter: &dyn Reporter) -> Result<Plan> {
    let text = fs::read_to_string(&opts.recipe).io_ctx("cannot read recipe", &opts.recipe)?;
    let recipe = Recipe::parse(&text, &opts.recipe.display().to_string()).map_err(|e| e.into_error(Kind::Input))?;
    let base = opts
        .recipe
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let (codec, default, max) = match opts.compression {
        Compression::Zstd => ("zstd", 3, 19),
        Compression::Gzip => ("gzip", 6, 9),
    };
    let level = opts.level.unwrap_or(default);
    if !(1..=max).contains(&level) {
        return Err(PackInputError::Level { level, codec, max }.into());
    }
    let signer = opts.sign_key.as_deref().map(Signer::load).transpose()?;
    let library = recipe.registry.as_ref().is_some_and(|r| r.library);
    let mirror = match (&opts.mirror, &recipe.registry) {
        (Some(m), _) => Some(m.as_str()),
        (None, Some(r)) => Some(r.mirror.as_str()),
        (None, None) => None,
    };
    let mirror = mirror
        .map(|m| crate::registry::Target::parse(m).map(|target| super::Mirror { target, library }))
        .transpose()?;
    let threads = opts.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    if opts.no_images && opts.base.is_some() {
        return Err(
            Error::input("--no-images and --base together: a bundle without layers is already small")
                .hint("leave out --base (or --no-images)"),
        );
    }
    let delta_base = opts
        .base
        .as_ref()
        .map(|b| crate::delta::BaseBundle::read(b, reporter))
        .transpose()?;
    Ok(Plan {
        recipe,
        base,
        compression: opts.compression,
        level,
        threads,
        signer,
        no_images: opts.no_images,
        delta_base,
        mirror,
        access: opts.access.clone(),
        recompress: opts.recompress,
    })
}

/// Check every input the recipe names; the problems found are returned for one report with
/// those of the artifacts taken from images ([`combine`] makes it).
pub(super) async fn check(plan: &Plan, reporter: &dyn Reporter) -> Result<(Checked, Vec<Error>)> {
    let mut problems = Vec::new();
    let (packages, listings) = check_packages(&plan.recipe, &plan.base, &mut problems);
    let stack = plan
        .recipe
        .stack
        .as_ref()
        .map(|s| check_stack(&plan.recipe, &plan.base, s, &mut problems));
    let mirror = plan.mirror.is_some();
    for img in &plan.recipe.images {
        // An explicit `digest` only: a reference `NAME@sha256:...` the engine may hold as such.
        if let (Some(d), ImageSource::Engine) = (img.digest.as_deref(), img.source(mirror)) {
            problems.push(
                PackInputError::DigestFromEngine {
                    reference: img.reference.clone(),
                    digest: d.to_string(),
                }
                .into(),
            );
        }
    }
    let engine = engine_images(&plan.recipe, mirror, reporter, &mut problems).await?;
    let mut remote = super::remote::Remote::new(plan)?;
    remote.resolve_recipe(plan, &mut problems).await;
    for img in &plan.recipe.images {
        if let Some(archive) = &img.archive {
            let path = plan.base.join(archive);
            if !path.is_file() {
                problems.push(
                    PackInputError::ArchiveMissing {
                        reference: img.reference.clone(),
                        path,
                    }
                    .into(),
                );
            }
        }
    }
    let checked = Checked {
        packages,
        listings,
        stack,
        engine,
        remote,
    };
    Ok((checked, problems))
}

/// One error for all problems found, so the operator fixes them in one round.
pub(super) fn combine(mut problems: Vec<Error>) -> Result<()> {
    match problems.len() {
        0 => Ok(()),
        1 => Err(problems.remove(0)),
        n => Err(Error::all(format!("{n} problems with the recipe's inputs"), problems)),
    }
}

type CheckedPackages = (Vec<(RecipePackage, Option<PathBuf>)>, BTreeMap<String, Listing>);

/// Every package file checked as install will read it; collectors' entries found in their
/// controller package.
fn check_packages(recipe: &Recipe, base: &Path, problems: &mut Vec<Error>) -> CheckedPackages {
    let mut listings: BTreeMap<String, Listing> = BTreeMap::new();
    let mut packages = Vec::new();
    for p in &recipe.packages {
        let path = p.file.as_ref().map(|f| base.join(f));
        if let Some(path) = &path {
            match package_check::check(path, p.kind, p.os) {
                Ok(l) if p.kind == PackageType::Controller => {
                    listings.insert(path.file_name().unwrap_or_default().to_string_lossy().to_string(), l);
                }
                Ok(_) => {}
                Err(e) => problems.push(e),
            }
        }
        packages.push((p.clone(), path));
    }
    for p in recipe.packages.iter().filter(|p| p.from.is_some()) {
        let (from, entry) = (p.from.as_deref().unwrap_or(""), p.entry.as_deref().unwrap_or(""));
        if listings.get(from).is_some_and(|l| l.find(entry).is_none()) {
            problems.push(
                PackInputError::EntryMissing {
                    package: format!("{} {} ({}/{})", p.object, p.version, p.os.as_str(), p.arch),
                    entry: entry.to_string(),
                    from: from.to_string(),
                }
                .into(),
            );
        }
    }
    (packages, listings)
}

/// The stack directory's files, the compose file and env template among them, and the compose
/// file's offline guarantee.
fn check_stack(recipe: &Recipe, base: &Path, s: &RecipeStack, problems: &mut Vec<Error>) -> (PathBuf, Vec<String>) {
    let dir = base.join(&s.dir);
    let mut files = Vec::new();
    match walk(&dir, &dir, &mut files) {
        Err(e) => problems.push(e),
        Ok(()) => {
            for (field, want) in [("compose", Some(&s.compose)), ("env_template", s.env_template.as_ref())] {
                if let Some(want) = want.filter(|w| !files.contains(w)) {
                    problems.push(
                        PackInputError::StackFileMissing {
                            field,
                            path: dir.join(want),
                        }
                        .into(),
                    );
                }
            }
            if files.contains(&s.compose) {
                problems.extend(check_offline(recipe, &dir, s));
            }
        }
    }
    files.sort();
    (dir, files)
}

/// The offline guarantee of the stack: every service's image is one the recipe packs, nothing is
/// built, nothing is pulled (`${VAR}` in an image is resolved from the env template, as compose
/// would on the offline host). A recipe that packs no image at all makes a stack-only bundle whose
/// images must already be in the install host's engine (install's preflight checks that).
fn check_offline(recipe: &Recipe, dir: &Path, s: &RecipeStack) -> Vec<Error> {
    use crate::install::offline;
    let path = dir.join(&s.compose);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return vec![Error::io("cannot read compose file", &path, e)],
    };
    let services = match offline::services(&text) {
        Ok(v) => v,
        Err(e) => {
            return vec![PackInputError::ComposeYaml {
                path,
                message: e.to_string(),
            }
            .into()]
        }
    };
    let vars = s
        .env_template
        .as_ref()
        .and_then(|t| fs::read_to_string(dir.join(t)).ok())
        .map(|t| offline::template_values(&t))
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut resolved = Vec::new();
    for mut svc in services {
        if let Some(image) = svc.image.clone().filter(|i| i.contains('$')) {
            match offline::interpolate(&image, &vars) {
                Ok(i) => svc.image = Some(i),
                Err(missing) => {
                    out.push(
                        PackInputError::ImageVariable {
                            path: path.clone(),
                            service: svc.name.clone(),
                            image,
                            missing,
                        }
                        .into(),
                    );
                    continue;
                }
            }
        }
        resolved.push(svc);
    }
    let packed: Vec<String> = recipe
        .images
        .iter()
        .map(|i| offline::normalize_ref(&i.reference))
        .collect();
    let stack_only = recipe.images.is_empty();
    for p in offline::problems(&resolved, &|i| {
        stack_only || packed.contains(&offline::normalize_ref(i))
    }) {
        out.push(
            PackInputError::NotOffline {
                path: path.clone(),
                message: p.message,
                hint: p.hint,
            }
            .into(),
        );
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
            if !format::is_safe_bundle_path(&rel) {
                return Err(PackInputError::StackName(p).into());
            }
            out.push(rel);
        } else {
            return Err(PackInputError::StackSpecial(p).into());
        }
    }
    Ok(())
}

/// The recipe's engine images found in the engine (pulled when absent and allowed); `None` when
/// the recipe has none (no engine is needed then). Images not found are problems.
async fn engine_images(
    recipe: &Recipe,
    mirror: bool,
    reporter: &dyn Reporter,
    problems: &mut Vec<Error>,
) -> Result<Option<EngineImages>> {
    let refs: Vec<RecipeImage> = recipe
        .images
        .iter()
        .filter(|i| i.source(mirror) == ImageSource::Engine)
        .cloned()
        .collect();
    if refs.is_empty() {
        return Ok(None);
    }
    let engine = Engine::connect().await?;
    let mut found = HashMap::new();
    // After one failed pull, the others would fail the same way (registry unreachable):
    // don't wait for each, say which pull failed.
    let mut failed_pull: Option<String> = None;
    for img in &refs {
        match find_or_pull(&engine, img, failed_pull.as_deref(), reporter).await {
            Ok(image) => {
                found.insert(img.reference.clone(), (image.id, image.size));
            }
            Err(e) => {
                if img.pull && failed_pull.is_none() {
                    failed_pull = Some(img.reference.clone());
                }
                problems.push(e)
            }
        }
    }
    Ok(Some(EngineImages { engine, refs, found }))
}

/// The engine's image for a recipe entry, pulled through the engine when absent and allowed
/// (unless an earlier pull, `failed_pull`, already failed).
async fn find_or_pull(
    engine: &Engine,
    img: &RecipeImage,
    failed_pull: Option<&str>,
    reporter: &dyn Reporter,
) -> Result<LocalImage> {
    let mut found = engine.image(&img.reference).await?;
    if found.is_none() && img.pull {
        if let Some(first) = failed_pull {
            return Err(PackInputError::NotPulled {
                reference: img.reference.clone(),
                first: first.to_string(),
            }
            .into());
        }
        reporter.note(&format!("pulling image {} through the Docker engine", img.reference));
        engine.pull(&img.reference).await?;
        found = engine.image(&img.reference).await?;
    }
    found.ok_or_else(|| {
        PackInputError::NotInEngine {
            reference: img.reference.clone(),
            engine: engine.address().to_string(),
            pull: img.pull,
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_errors_keep_their_kind_and_hint() {
        let e: Error = PackInputError::NotPulled {
            reference: "a:1".into(),
            first: "b:1".into(),
        }
        .into();
        assert_eq!(e.kind, Kind::External);
        assert_eq!(
            e.message,
            "image a:1 is not in the local Docker engine (not pulled: pulling b:1 already failed)"
        );
        let e: Error = PackInputError::StackSpecial(PathBuf::from("/s/link")).into();
        assert_eq!(e.kind, Kind::Input);
        assert!(e.message.contains("/s/link is a symlink"), "{}", e.message);
        assert_eq!(e.hints, ["replace it with a copy of the file it points to"]);
    }

    #[test]
    fn levels_outside_the_codec_range_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("r.toml");
        fs::write(&recipe, "format = 1\n[bundle]\nname = \"x\"\nversion = \"1\"\n").unwrap();
        let opts = |compression, level| PackOptions {
            recipe: recipe.clone(),
            output: dir.path().join("x.bkb"),
            compression,
            level: Some(level),
            split_size: None,
            sign_key: None,
            threads: None,
            binary: None,
            no_images: false,
            base: None,
            mirror: None,
            access: Default::default(),
            recompress: false,
        };
        let r = crate::progress::Silent;
        let e = read(&opts(Compression::Gzip, 10), &r).err().unwrap();
        assert_eq!(e.message, "--level 10: gzip levels are 1 to 9");
        let e = read(&opts(Compression::Zstd, 0), &r).err().unwrap();
        assert_eq!(e.message, "--level 0: zstd levels are 1 to 19");
        assert_eq!(read(&opts(Compression::Zstd, 19), &r).unwrap().level, 19);
    }
}
