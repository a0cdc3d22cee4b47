//! The recipe (what to pack) and the manifest (`bundle.toml`, what a bundle holds): their types,
//! parsing, validation and writing. Nothing else in the crate calls serde on either.
//!
//! Parsing reads the `format` field first, so a newer file gets "format N is newer than this
//! bkbundle supports" rather than a confusing serde error about a field it does not know. Unknown
//! fields are rejected (serde `deny_unknown_fields`); the toml parser's message carries the line.

use crate::bundle::layout;
use crate::digest::is_sha256_hex;
use crate::error::{Error, Kind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// The recipe and bundle format this bkbundle reads and writes.
pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: missing `format = {FORMAT}` at the top")]
    MissingFormat { origin: String },
    #[error("{origin}: {what} format {found} is newer than this bkbundle supports (format {FORMAT}, bkbundle {})", env!("CARGO_PKG_VERSION"))]
    Unsupported {
        origin: String,
        what: &'static str,
        found: i64,
    },
    #[error("{origin}: {} problem(s):\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid { origin: String, problems: Vec<String> },
}

impl ManifestError {
    /// Convert for the edge; `kind` is the class of a syntax/validation problem (Input for a
    /// recipe, Bundle for a bundle's manifest).
    pub fn into_error(self, kind: Kind) -> Error {
        match self {
            ManifestError::Unsupported { what, .. } => {
                let hint = if what == "bundle" {
                    "use the bkbundle that came inside the bundle: `tar -xf BUNDLE bin/bkbundle && ./bin/bkbundle ...`"
                } else {
                    "upgrade bkbundle, or write the recipe in the format this version documents (docs/FORMAT.md)"
                };
                Error::new(Kind::Unsupported, self.to_string()).hint(hint)
            }
            other => {
                let hint = if kind == Kind::Bundle {
                    "the manifest is damaged: copy the bundle again from the original media"
                } else {
                    "see docs/FORMAT.md for the recipe format"
                };
                Error::new(kind, other.to_string()).hint(hint)
            }
        }
    }
}

fn check_format(text: &str, origin: &str, what: &'static str) -> Result<(), ManifestError> {
    #[derive(Deserialize)]
    struct Probe {
        format: Option<toml::Value>,
    }
    let probe: Probe = toml::from_str(text).map_err(|e| syntax(origin, e))?;
    match probe.format {
        None => Err(ManifestError::MissingFormat { origin: origin.into() }),
        Some(toml::Value::Integer(n)) if n == FORMAT as i64 => Ok(()),
        Some(toml::Value::Integer(n)) if n > FORMAT as i64 => Err(ManifestError::Unsupported {
            origin: origin.into(),
            what,
            found: n,
        }),
        Some(v) => Err(ManifestError::Invalid {
            origin: origin.into(),
            problems: vec![format!("`format` must be {FORMAT}, found {v}")],
        }),
    }
}

fn syntax(origin: &str, e: toml::de::Error) -> ManifestError {
    ManifestError::Syntax {
        origin: origin.into(),
        message: e.to_string().trim_end().to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Shared vocabulary

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageType {
    Controller,
    Collector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    Linux,
    Windows,
}

impl PackageType {
    pub fn as_str(self) -> &'static str {
        match self {
            PackageType::Controller => "controller",
            PackageType::Collector => "collector",
        }
    }
}

impl Os {
    pub fn as_str(self) -> &'static str {
        match self {
            Os::Linux => "linux",
            Os::Windows => "windows",
        }
    }
}

/// The platform's CPU architecture names (BKLITE.md): `x86_64` and `arm64`, aliases accepted.
pub fn normalize_arch(arch: &str) -> Option<&'static str> {
    match arch.to_ascii_lowercase().as_str() {
        "x86_64" | "amd64" | "x64" => Some("x86_64"),
        "arm64" | "aarch64" => Some("arm64"),
        _ => None,
    }
}

/// An installer's architecture: the platform's names, or `generic` for a program that runs on
/// every architecture of its OS (the key upstream uses when it has no arch, BKLITE.md).
pub fn normalize_installer_arch(arch: &str) -> Option<&'static str> {
    normalize_arch(arch).or_else(|| arch.eq_ignore_ascii_case("generic").then_some("generic"))
}

/// The installer program names the platform serves per OS (BKLITE.md): agents' bootstraps
/// download them by these names, so another name would never be found.
pub fn installer_names(os: Os) -> &'static [&'static str] {
    match os {
        Os::Linux => &["bklite-controller-installer"],
        Os::Windows => &["bklite-controller-installer.exe", "bklite-controller-bootstrap.exe"],
    }
}

/// Why `name` cannot be an installer for `os` (expected and found), or None when it can.
pub fn installer_name_problem(os: Os, name: &str) -> Option<String> {
    let expected = installer_names(os);
    (!expected.contains(&name)).then(|| {
        format!(
            "a {} installer must be named {}, found {name:?}",
            os.as_str(),
            expected
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(" or ")
        )
    })
}

/// Cloud regions' default sidecar env, carried from the recipe into the manifest unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Regions {
    /// Keys every region must have for agents to work.
    #[serde(default)]
    pub required: Vec<String>,
    /// Default values (may hold `${NAME}` placeholders filled by the install config).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Regions the bundle declares.
    #[serde(default)]
    pub region: Vec<RegionDef>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionDef {
    pub name: String,
    #[serde(default)]
    pub introduction: String,
    #[serde(default)]
    pub proxy_address: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A sidecar env key: upper-case letters, digits and `_`, starting with a letter.
pub fn is_env_key(k: &str) -> bool {
    let mut b = k.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_uppercase())
        && b.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
}

impl Regions {
    fn validate(&self, problems: &mut Vec<String>) {
        for k in self.required.iter().chain(self.env.keys()) {
            if !is_env_key(k) {
                problems.push(format!(
                    "regions: key `{k}` is not an env key (upper-case letters, digits, `_`)"
                ));
            }
        }
        let mut names = BTreeSet::new();
        for (i, r) in self.region.iter().enumerate() {
            if r.name.trim().is_empty() || r.name.len() > 100 {
                problems.push(format!(
                    "regions.region[{i}]: name must be 1 to 100 characters, found {:?}",
                    r.name
                ));
            }
            if !names.insert(&r.name) {
                problems.push(format!("regions.region[{i}]: region {:?} is declared twice", r.name));
            }
            for k in r.env.keys().filter(|k| !is_env_key(k)) {
                problems.push(format!("regions.region[{i}] ({}): key `{k}` is not an env key", r.name));
            }
        }
    }
}

/// A bundle path must be relative with plain components only: no `..`, no `.`, no absolute path,
/// no backslash, no empty component. Both the writer and every reader check it.
pub fn is_safe_bundle_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

// ---------------------------------------------------------------------------------------------
// Recipe

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub format: u32,
    pub bundle: RecipeBundle,
    #[serde(default)]
    pub images: Vec<RecipeImage>,
    #[serde(default)]
    pub packages: Vec<RecipePackage>,
    #[serde(default)]
    pub installers: Vec<RecipeInstaller>,
    pub stack: Option<RecipeStack>,
    #[serde(default)]
    pub regions: Regions,
    /// `[registry]`: the registry plain references are fetched from (upstream's mirror, or an
    /// intranet one), instead of the local engine's export.
    pub registry: Option<RecipeRegistry>,
}

/// The recipe's `[registry]`: one registry named once, from which every image without a source
/// of its own (`archive`, `oci_layout`, `engine = true`) is fetched by its plain reference.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeRegistry {
    /// `HOST[:PORT][/PREFIX]` (as [`crate::registry::Target`] parses it): `bklite/server:latest`
    /// is fetched from `HOST/PREFIX/bklite/server:latest` and keeps its plain name in the bundle.
    pub mirror: String,
    /// Docker Hub's official images (a one-component name, `postgres:15`) are kept under
    /// `PREFIX/library/` (`HOST/PREFIX/library/postgres:15`), as upstream's mirror and Docker
    /// Hub pull-through caches keep them. Default false: `HOST/PREFIX/postgres:15`, where
    /// `bkbundle push` puts them.
    #[serde(default)]
    pub library: bool,
    /// The platform taken from a multi-platform image (`os/arch[/variant]`); default linux/amd64.
    pub platform: Option<String>,
}

/// The platform taken from a multi-platform image when the recipe names none.
pub const DEFAULT_PLATFORM: &str = "linux/amd64";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeBundle {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeImage {
    #[serde(rename = "ref")]
    pub reference: String,
    pub archive: Option<PathBuf>,
    #[serde(default = "yes")]
    pub pull: bool,
    /// Read the image from this OCI image layout directory (`oci-layout`, `index.json`,
    /// `blobs/sha256/`, as `skopeo copy ... oci:DIR:TAG` writes it), relative to the recipe.
    pub oci_layout: Option<PathBuf>,
    /// The manifest digest (`sha256:<hex>`) the image must have: what is fetched from the
    /// registry or the OCI layout must hash to it (for a multi-platform image: the index's).
    pub digest: Option<String>,
    /// Take this image from the local engine even though `[registry]` names a mirror.
    #[serde(default)]
    pub engine: bool,
    /// The platform taken from a multi-platform image (`os/arch[/variant]`), overriding
    /// `[registry] platform`.
    pub platform: Option<String>,
}

/// Where an image of the recipe comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSource<'a> {
    /// The local Docker engine's export (pulled through it when absent and allowed).
    Engine,
    /// A `docker save` / OCI archive file.
    Archive(&'a std::path::Path),
    /// An OCI image layout directory.
    OciLayout(&'a std::path::Path),
    /// The registry of `[registry]` (or `pack --mirror`).
    Mirror,
}

impl RecipeImage {
    /// Where the image is read from, `mirror` telling whether a mirror is named (the recipe's
    /// `[registry]` or `pack --mirror`).
    pub fn source(&self, mirror: bool) -> ImageSource<'_> {
        if let Some(a) = &self.archive {
            ImageSource::Archive(a)
        } else if let Some(d) = &self.oci_layout {
            ImageSource::OciLayout(d)
        } else if mirror && !self.engine {
            ImageSource::Mirror
        } else {
            ImageSource::Engine
        }
    }

    /// The manifest digest the image is pinned to: `digest`, or the reference's own `@sha256:`.
    pub fn pinned(&self) -> Option<&str> {
        self.digest
            .as_deref()
            .or_else(|| self.reference.split_once('@').map(|(_, d)| d))
    }
}

/// A platform as `os/arch[/variant]` (`linux/amd64`, `linux/arm64/v8`).
pub fn parse_platform(p: &str) -> Option<(String, String, Option<String>)> {
    let mut parts = p.split('/');
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let (os, arch) = (parts.next()?, parts.next()?);
    let variant = parts.next();
    if parts.next().is_some() || !ok(os) || !ok(arch) || variant.is_some_and(|v| !ok(v)) {
        return None;
    }
    Some((os.to_string(), arch.to_string(), variant.map(str::to_string)))
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipePackage {
    pub file: Option<PathBuf>,
    #[serde(rename = "type")]
    pub kind: PackageType,
    pub os: Os,
    pub arch: String,
    pub object: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    pub from: Option<String>,
    pub entry: Option<String>,
    /// Build the (controller) package from files inside this image, read from its layers.
    pub image: Option<String>,
    /// Read `image` from this `docker save` / OCI archive rather than the local engine.
    pub image_archive: Option<PathBuf>,
    /// The file name of the archive built from the image (`fusion-collectors-linux-amd64.zip`).
    pub name: Option<String>,
    /// What goes into the archive built from the image, applied in order (later wins).
    #[serde(default)]
    pub tree: Vec<TreeRule>,
}

/// One step of an image-built package: the file or directory `from` (an absolute path in the
/// image) placed at `to` (relative to the package's top-level directory; "" is the top itself,
/// or for a file its own name there), without the paths under `from` listed in `exclude`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeRule {
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl RecipePackage {
    /// The package's file name: its `file`'s, or `name` of one built from an image.
    pub fn file_name(&self) -> Option<String> {
        match (&self.file, &self.name) {
            (Some(f), _) => file_name(f),
            (None, Some(n)) if self.image.is_some() => Some(n.clone()),
            _ => None,
        }
    }
}

/// A controller installer program (a third kind of artifact, with no database row): a file next
/// to the recipe, or a file inside an image.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeInstaller {
    pub os: Os,
    pub arch: String,
    pub file: Option<PathBuf>,
    pub image: Option<String>,
    pub image_archive: Option<PathBuf>,
    /// The installer's absolute path inside `image`.
    pub path: Option<String>,
}

impl RecipeInstaller {
    /// The program's file name: its `file`'s or its image `path`'s last component.
    pub fn name(&self) -> String {
        match (&self.file, &self.path) {
            (Some(f), _) => file_name(f).unwrap_or_default(),
            (None, Some(p)) => p.rsplit('/').next().unwrap_or_default().to_string(),
            _ => String::new(),
        }
    }

    /// How messages name it: `installer linux/x86_64 bklite-controller-installer`.
    pub fn describe(&self) -> String {
        format!("installer {}/{} {}", self.os.as_str(), self.arch, self.name())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeStack {
    pub dir: PathBuf,
    pub compose: String,
    pub env_template: Option<String>,
    pub project: Option<String>,
    /// The stack's NATS serves TLS from the target's `certs/` (`ca.crt`, `nats-server.crt`,
    /// `nats-server.key`, which install writes): agents are then given `NATS_PROTOCOL = tls` and
    /// the CA.
    #[serde(default)]
    pub nats_tls: bool,
}

fn is_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
}

impl Recipe {
    /// Parse and validate a recipe; `origin` (the file name) prefixes every message.
    pub fn parse(text: &str, origin: &str) -> Result<Recipe, ManifestError> {
        check_format(text, origin, "recipe")?;
        let mut r: Recipe = toml::from_str(text).map_err(|e| syntax(origin, e))?;
        let mut problems = Vec::new();
        check_recipe_bundle(&r.bundle, &mut problems);
        check_recipe_images(&r.images, &mut problems);
        if let Some(reg) = &r.registry {
            check_recipe_registry(reg, &mut problems);
        }
        check_recipe_packages(&mut r.packages, &mut problems);
        check_recipe_installers(&mut r.installers, &mut problems);
        check_image_archives(&r, &mut problems);
        if let Some(s) = &r.stack {
            check_recipe_stack(s, &mut problems);
        }
        r.regions.validate(&mut problems);
        if problems.is_empty() {
            Ok(r)
        } else {
            Err(ManifestError::Invalid {
                origin: origin.into(),
                problems,
            })
        }
    }
}

/// The bundle's name and version, which name the bundle file and its install.
fn check_recipe_bundle(b: &RecipeBundle, problems: &mut Vec<String>) {
    if !is_name(&b.name) {
        problems.push(format!("bundle.name {:?} must match [a-z0-9][a-z0-9._-]*", b.name));
    }
    if b.version.is_empty() || b.version.contains(|c: char| c.is_whitespace() || c == '/') {
        problems.push(format!(
            "bundle.version {:?} must be non-empty without spaces or `/`",
            b.version
        ));
    }
}

/// Each image reference: well-formed and listed once.
fn check_recipe_images(images: &[RecipeImage], problems: &mut Vec<String>) {
    let mut refs = BTreeSet::new();
    for (i, img) in images.iter().enumerate() {
        if img.reference.trim().is_empty() || img.reference.contains(char::is_whitespace) {
            problems.push(format!(
                "images[{i}]: ref {:?} is not an image reference",
                img.reference
            ));
        } else if !refs.insert(img.reference.clone()) {
            problems.push(format!("images[{i}]: image {:?} is listed twice", img.reference));
        }
        check_image_source(i, img, problems);
    }
}

/// One source per image: `archive`, `oci_layout` or `engine = true` (or, without any, the
/// mirror when there is one, else the engine); `digest` and `platform` only where a manifest is
/// read (a registry or an OCI layout).
fn check_image_source(i: usize, img: &RecipeImage, problems: &mut Vec<String>) {
    let what = format!("images[{i}] ({})", img.reference);
    let mut given: Vec<&str> = Vec::new();
    if img.archive.is_some() {
        given.push("archive");
    }
    if img.oci_layout.is_some() {
        given.push("oci_layout");
    }
    if img.engine {
        given.push("engine = true");
    }
    if given.len() > 1 {
        problems.push(format!(
            "{what}: {} name different sources; give one (archive: a docker save/OCI file, oci_layout: an OCI layout directory, engine = true: the local Docker engine)",
            given.join(" and ")
        ));
    }
    let manifest_free = img.archive.is_some() || img.engine;
    if let Some(d) = &img.digest {
        if !d.strip_prefix("sha256:").is_some_and(is_sha256_hex) {
            problems.push(format!("{what}: digest {d:?} is not sha256:<64 lower-case hex digits>"));
        }
        if manifest_free {
            problems.push(format!(
                "{what}: digest pins a manifest read from a registry or an OCI layout, but {} has none to check; remove digest, or take the image from [registry] or oci_layout",
                if img.engine { "the engine's export" } else { "an archive" }
            ));
        }
        if let Some((_, own)) = img.reference.split_once('@') {
            if own != d {
                problems.push(format!(
                    "{what}: digest {d} differs from the reference's own @{own}; give it once"
                ));
            }
        }
    }
    if let Some(p) = &img.platform {
        if parse_platform(p).is_none() {
            problems.push(format!(
                "{what}: platform {p:?} is not os/arch[/variant], e.g. \"linux/arm64\""
            ));
        }
        if manifest_free {
            problems.push(format!(
                "{what}: platform selects an image of a multi-platform index in a registry or an OCI layout; the engine and archives hold one platform already"
            ));
        }
    }
}

/// `[registry]`: a mirror that is `HOST[:PORT][/PREFIX]`, a platform that is `os/arch[/variant]`.
fn check_recipe_registry(reg: &RecipeRegistry, problems: &mut Vec<String>) {
    if let Err(e) = crate::registry::Target::parse(&reg.mirror) {
        problems.push(format!("registry.mirror: {}", e.message));
    }
    if let Some(p) = reg.platform.as_deref().filter(|p| parse_platform(p).is_none()) {
        problems.push(format!(
            "registry.platform {p:?} is not os/arch[/variant], e.g. \"linux/amd64\""
        ));
    }
}

/// Each package record (its arch normalized in place), and that no two are the same package or
/// share a file name.
fn check_recipe_packages(packages: &mut [RecipePackage], problems: &mut Vec<String>) {
    let mut keys = BTreeSet::new();
    let mut names = BTreeSet::new();
    let controllers: Vec<(String, Os, Option<&'static str>)> = packages
        .iter()
        .filter(|p| p.kind == PackageType::Controller)
        .filter_map(|p| Some((p.file_name()?, p.os, normalize_arch(&p.arch))))
        .collect();
    for (i, p) in packages.iter_mut().enumerate() {
        let what = format!("packages[{i}] ({} {} {})", p.object, p.version, p.os.as_str());
        match normalize_arch(&p.arch) {
            Some(a) => p.arch = a.to_string(),
            None => problems.push(format!(
                "{what}: arch {:?} is not x86_64 or arm64 (amd64, aarch64 accepted)",
                p.arch
            )),
        }
        for (field, v, max) in [("object", &p.object, 100), ("version", &p.version, 100)] {
            if v.trim().is_empty() || v.len() > max || v.contains('/') {
                problems.push(format!(
                    "{what}: {field} {v:?} must be 1 to {max} characters without `/`"
                ));
            }
        }
        check_package_source(p, &what, &controllers, &mut names, problems);
        if p.kind == PackageType::Controller && p.file.is_none() && p.image.is_none() {
            problems.push(format!(
                "{what}: a controller package needs `file`, or `image`, `name` and `tree`"
            ));
        }
        if !keys.insert((p.os, p.arch.clone(), p.object.clone(), p.version.clone())) {
            problems.push(format!("{what}: the same os, arch, object and version is listed twice"));
        }
    }
}

/// Where a package's file comes from: its own `file` (a unique name), or `from` and `entry`
/// inside one of the recipe's controller packages (`controllers`: file name, os, arch).
fn check_package_source(
    p: &RecipePackage,
    what: &str,
    controllers: &[(String, Os, Option<&'static str>)],
    names: &mut BTreeSet<String>,
    problems: &mut Vec<String>,
) {
    let image_fields = p.image.is_some() || p.name.is_some() || !p.tree.is_empty() || p.image_archive.is_some();
    if image_fields && (p.file.is_some() || p.from.is_some() || p.entry.is_some()) {
        problems.push(format!(
            "{what}: give either `file`, or `from` and `entry`, or `image`, `name` and `tree`, not several"
        ));
        return;
    }
    if image_fields {
        return check_image_package(p, what, names, problems);
    }
    match (&p.file, &p.from, &p.entry) {
        (Some(f), None, None) => match file_name(f) {
            Some(n) if n.len() <= 100 => {
                if !names.insert(n.clone()) {
                    problems.push(format!("{what}: another package already has the file name {n:?}"));
                }
            }
            _ => problems.push(format!(
                "{what}: file {} needs a file name of at most 100 characters",
                f.display()
            )),
        },
        (None, Some(from), Some(entry)) => {
            if p.kind != PackageType::Collector {
                problems.push(format!(
                    "{what}: only collector records may point into another package with `from`"
                ));
            }
            if !is_safe_bundle_path(entry) {
                problems.push(format!(
                    "{what}: entry {entry:?} must be a relative path inside the package"
                ));
            }
            let arch = normalize_arch(&p.arch);
            if !controllers
                .iter()
                .any(|(n, os, a)| n == from && *os == p.os && *a == arch)
            {
                problems.push(format!(
                    "{what}: `from = {from:?}` names no controller package of the recipe with os {} and arch {}",
                    p.os.as_str(),
                    p.arch
                ));
            }
        }
        _ => problems.push(format!(
            "{what}: give either `file`, or `from` and `entry` (a collector inside a controller package), or `image`, `name` and `tree`"
        )),
    }
}

/// A controller package built from an image: its image, its archive's name (a unique `.zip`
/// file name) and its tree rules (absolute paths in the image, relative places in the package).
fn check_image_package(p: &RecipePackage, what: &str, names: &mut BTreeSet<String>, problems: &mut Vec<String>) {
    if p.kind != PackageType::Controller {
        problems.push(format!(
            "{what}: only controller packages are built from an image; a collector points into one with `from` and `entry`"
        ));
    }
    check_image_ref(p.image.as_deref(), what, "image, name and tree", problems);
    match p.name.as_deref() {
        Some(n) if n.len() <= 100 && n.ends_with(".zip") && is_safe_bundle_path(n) && !n.contains('/') => {
            if !names.insert(n.to_string()) {
                problems.push(format!("{what}: another package already has the file name {n:?}"));
            }
        }
        Some(n) => problems.push(format!(
            "{what}: name {n:?} must be a file name ending in .zip of at most 100 characters (the archive is built as a zip)"
        )),
        None => problems.push(format!("{what}: a package built from an image needs `name`, the archive's file name")),
    }
    if p.tree.is_empty() {
        problems.push(format!(
            "{what}: a package built from an image needs `tree`, e.g. [{{ from = \"/opt/fusion-collectors\", to = \"\" }}]"
        ));
    }
    for (i, rule) in p.tree.iter().enumerate() {
        if !is_image_path(&rule.from) {
            problems.push(format!(
                "{what}: tree[{i}].from {:?} must be an absolute path in the image without `.` or `..`",
                rule.from
            ));
        }
        if !rule.to.is_empty() && !is_safe_bundle_path(&rule.to) {
            problems.push(format!(
                "{what}: tree[{i}].to {:?} must be \"\" or a relative path inside the package",
                rule.to
            ));
        }
        for x in rule.exclude.iter().filter(|x| !is_safe_bundle_path(x)) {
            problems.push(format!(
                "{what}: tree[{i}].exclude {x:?} must be a relative path under {:?}",
                rule.from
            ));
        }
    }
}

/// An image reference an artifact is read from.
fn check_image_ref(image: Option<&str>, what: &str, needs: &str, problems: &mut Vec<String>) {
    match image {
        Some(r) if !r.trim().is_empty() && !r.contains(char::is_whitespace) => {}
        Some(r) => problems.push(format!("{what}: image {r:?} is not an image reference")),
        None => problems.push(format!("{what}: `image_archive` needs `image` (and {needs})")),
    }
}

/// An absolute path inside an image, with plain components only.
pub fn is_image_path(p: &str) -> bool {
    p.strip_prefix('/').is_some_and(is_safe_bundle_path)
}

/// Each installer: a valid arch (normalised in place, `generic` allowed), a name its OS serves,
/// one source (a file next to the recipe, or a path in an image), and no two for the same OS,
/// arch and name.
fn check_recipe_installers(installers: &mut [RecipeInstaller], problems: &mut Vec<String>) {
    let mut keys = BTreeSet::new();
    for (i, inst) in installers.iter_mut().enumerate() {
        let source = match (&inst.image, &inst.path, &inst.file) {
            (Some(image), Some(path), _) => format!(", {path} in image {image}"),
            (_, _, Some(file)) => format!(", file {}", file.display()),
            _ => String::new(),
        };
        let what = format!("installers[{i}] ({}{source})", inst.describe());
        match normalize_installer_arch(&inst.arch) {
            Some(a) => inst.arch = a.to_string(),
            None => problems.push(format!(
                "{what}: arch {:?} is not x86_64, arm64 or generic (amd64, aarch64 accepted)",
                inst.arch
            )),
        }
        match (&inst.file, &inst.image, &inst.path) {
            (Some(_), None, None) if inst.image_archive.is_none() => {}
            (None, Some(_), Some(path)) => {
                check_image_ref(inst.image.as_deref(), &what, "path", problems);
                if !is_image_path(path) {
                    problems.push(format!(
                        "{what}: path {path:?} must be an absolute path in the image without `.` or `..`"
                    ));
                }
            }
            _ => problems.push(format!(
                "{what}: give either `file` (next to the recipe), or `image` and `path` (inside the image)"
            )),
        }
        if let Some(why) = installer_name_problem(inst.os, &inst.name()) {
            problems.push(format!("{what}: {why}"));
        }
        if !keys.insert((inst.os, inst.arch.clone(), inst.name())) {
            problems.push(format!("{what}: the same os, arch and name is listed twice"));
        }
    }
}

/// An artifact's `image_archive` and the `[[images]]` entry of the same reference agree: one
/// image, one source.
fn check_image_archives(r: &Recipe, problems: &mut Vec<String>) {
    let sources = r
        .packages
        .iter()
        .map(|p| (p.image.as_ref(), p.image_archive.as_ref()))
        .chain(
            r.installers
                .iter()
                .map(|i| (i.image.as_ref(), i.image_archive.as_ref())),
        );
    for (image, archive) in sources {
        let (Some(image), Some(archive)) = (image, archive) else {
            continue;
        };
        let entry = r.images.iter().find(|i| &i.reference == image);
        if let Some(dir) = entry.and_then(|i| i.oci_layout.as_ref()) {
            problems.push(format!(
                "image {image}: image_archive {} differs from the OCI layout {} its [[images]] entry reads; give it once",
                archive.display(),
                dir.display()
            ));
        }
        let listed = entry.and_then(|i| i.archive.as_ref());
        if listed.is_some_and(|l| l != archive) {
            problems.push(format!(
                "image {image}: image_archive {} differs from the archive {} its [[images]] entry reads; give it once",
                archive.display(),
                listed.map(|l| l.display().to_string()).unwrap_or_default()
            ));
        }
    }
}

/// The stack's paths stay inside stack.dir, and its project is a compose project name.
fn check_recipe_stack(s: &RecipeStack, problems: &mut Vec<String>) {
    if !is_safe_bundle_path(&s.compose) {
        problems.push(format!(
            "stack.compose {:?} must be a relative path inside stack.dir",
            s.compose
        ));
    }
    if let Some(t) = &s.env_template {
        if !is_safe_bundle_path(t) {
            problems.push(format!(
                "stack.env_template {t:?} must be a relative path inside stack.dir"
            ));
        }
    }
    if let Some(p) = &s.project {
        if !is_name(p) {
            problems.push(format!(
                "stack.project {p:?} must match [a-z0-9][a-z0-9._-]* (a compose project name)"
            ));
        }
    }
}

fn file_name(p: &std::path::Path) -> Option<String> {
    p.file_name().map(|n| n.to_string_lossy().into_owned())
}

// ---------------------------------------------------------------------------------------------
// Manifest

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub bundle: BundleInfo,
    /// A delta bundle's base: the bundle whose payloads this one leaves out (absent in a full
    /// bundle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Base>,
    #[serde(default)]
    pub files: Vec<FileEntry>,
    #[serde(default)]
    pub layers: Vec<Layer>,
    #[serde(default)]
    pub images: Vec<Image>,
    #[serde(default)]
    pub packages: Vec<Package>,
    /// Controller installer programs (no database row). Absent in bundles packed before them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub installers: Vec<Installer>,
    /// Packages built from an image, and from which (absent for packages given as files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provenance: Vec<Provenance>,
    pub stack: Option<Stack>,
    #[serde(default)]
    pub regions: Regions,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleInfo {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    pub created: String,
    pub created_by: String,
    pub compression: Compression,
    /// Packed with `--no-images`: the images are described (ids, configs, layer diff ids and
    /// sizes) but their layers are not in the bundle; install pulls them from a registry
    /// (`--images-from`) and checks each image id against this manifest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub without_layers: bool,
}

/// What a delta bundle (`pack --base`) leaves to its base. Its manifest is complete (every image,
/// layer, package and installer is described as in a full bundle); only the payloads listed here
/// are not stored: each is the base's own `[[files]]` entry (path, size, SHA-256), so a site, or
/// `merge`, can check by digest that what it takes from elsewhere is the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    /// The base's id: SHA-256 (hex) of its `bundle.toml`.
    pub id: String,
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub created: String,
    /// The payloads taken from the base, as the base lists them.
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

impl Base {
    /// `NAME VERSION (id 0123456789ab…)`, for messages.
    pub fn describe(&self) -> String {
        format!("{} {} (id {})", self.name, self.version, short_id(&self.id))
    }

    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Bytes the delta does not carry.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).fold(0, u64::saturating_add)
    }
}

/// The first 12 hex digits of an id, as `docker images` shows them.
pub fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
}

impl Compression {
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => "zst",
            Compression::Gzip => "gz",
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub diff_id: String,
    /// Its payload in the bundle; empty (absent) in a bundle [`BundleInfo::without_layers`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub refs: Vec<String>,
    pub id: String,
    pub config: String,
    pub os: String,
    pub arch: String,
    pub layers: Vec<String>,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: PackageType,
    pub os: Os,
    pub arch: String,
    pub object: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// SHA-256 (hex) of the package's own bytes: the file's, or for `from`/`entry` the entry's
    /// inside its controller package. Lets init-packages compare with the stored object's digest
    /// without re-reading anything. Absent in bundles packed before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Size in bytes of those same bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// Where a package built from an image came from. A list of its own rather than fields of
/// [`Package`], so that code building `Package` values elsewhere is unaffected: keyed by the
/// package's bundle file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The package's bundle path (a [`Package::file`]).
    pub file: String,
    /// The recipe's image reference, and the id of the image read.
    pub image: String,
    pub image_id: String,
    /// The paths in the image the package's tree took, in the recipe's order.
    pub paths: Vec<String>,
}

/// A controller installer program, stored as it was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Installer {
    /// The program's file name, one its OS serves ([`installer_names`]).
    pub name: String,
    pub os: Os,
    /// x86_64, arm64 or generic.
    pub arch: String,
    /// Its bundle path.
    pub file: String,
    pub size: u64,
    pub sha256: String,
    /// Provenance when read from an image: the recipe's reference, the image id, the path in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stack {
    pub project: String,
    pub compose: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_template: Option<String>,
    pub files: Vec<String>,
    /// The recipe's `[stack] nats_tls`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nats_tls: bool,
}

/// Parse a versioned TOML document `what` (its format checked first), then refuse it with every
/// problem `problems` finds: the one parse of `bundle.toml` and a backup's `backup.toml`.
pub(crate) fn parse_checked<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
    what: &'static str,
    problems: impl FnOnce(&T) -> Vec<String>,
) -> Result<T, ManifestError> {
    check_format(text, origin, what)?;
    let m: T = toml::from_str(text).map_err(|e| syntax(origin, e))?;
    let problems = problems(&m);
    if problems.is_empty() {
        Ok(m)
    } else {
        Err(ManifestError::Invalid {
            origin: origin.into(),
            problems,
        })
    }
}

impl Manifest {
    pub fn parse(text: &str, origin: &str) -> Result<Manifest, ManifestError> {
        parse_checked(text, origin, "bundle", Manifest::problems)
    }

    /// The one writer of `bundle.toml`.
    pub fn to_toml(&self) -> String {
        // Serialising plain data types into TOML cannot fail: no maps with non-string keys, no
        // values after tables within a table (field order above keeps scalars first).
        toml::to_string(self).expect("manifest serialises")
    }

    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Whether payload `path` is one a delta bundle takes from its base (not stored in it).
    pub fn from_base(&self, path: &str) -> bool {
        self.base.as_ref().is_some_and(|b| b.file(path).is_some())
    }

    pub fn layer(&self, diff_id: &str) -> Option<&Layer> {
        self.layers.iter().find(|l| l.diff_id == diff_id)
    }

    /// Cross-checks that make the manifest safe to act on: every reference resolves, every path
    /// is a plain relative path, every digest is well-formed.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let paths = self.file_problems(&mut p);
        let diff_ids = self.layer_problems(&paths, &mut p);
        self.image_problems(&paths, &diff_ids, &mut p);
        self.package_problems(&paths, &mut p);
        self.installer_problems(&mut p);
        for pv in &self.provenance {
            if !self
                .packages
                .iter()
                .any(|pk| pk.file.as_deref() == Some(pv.file.as_str()))
            {
                p.push(format!("provenance: {:?} is not the file of a package", pv.file));
            }
        }
        if let Some(s) = &self.stack {
            for f in s.files.iter().chain([&s.compose]).chain(s.env_template.iter()) {
                if self.file(f).is_none() {
                    p.push(format!("stack: {f:?} is not in files"));
                }
            }
        }
        p
    }

    /// The problems of `files` (and of a delta's `[base]`), and the paths they list, stored or
    /// taken from the base, which every other reference must name.
    fn file_problems(&self, p: &mut Vec<String>) -> BTreeSet<&str> {
        let mut paths = BTreeSet::new();
        let base_files = self.base.iter().flat_map(|b| b.files.iter());
        for (f, list) in self
            .files
            .iter()
            .map(|f| (f, "files"))
            .chain(base_files.map(|f| (f, "base.files")))
        {
            if !is_safe_bundle_path(&f.path) {
                p.push(format!("{list}: path {:?} is not a plain relative path", f.path));
            }
            // Files that describe the bundle rather than being payload are never listed in `files`.
            if layout::DESCRIPTIVE.contains(&f.path.as_str()) {
                p.push(format!("{list}: {:?} is reserved and cannot be a payload", f.path));
            }
            if !is_sha256_hex(&f.sha256) {
                p.push(format!("{list}: {:?} has a malformed sha256 {:?}", f.path, f.sha256));
            }
            if !paths.insert(f.path.as_str()) {
                p.push(format!("{list}: {:?} is listed twice (in files or base.files)", f.path));
            }
        }
        if let Some(b) = &self.base {
            if !is_sha256_hex(&b.id) {
                p.push(format!(
                    "base: malformed id {:?} (the SHA-256 of the base's bundle.toml)",
                    b.id
                ));
            }
            if self.bundle.without_layers {
                p.push("base: a bundle without layers cannot also be a delta of another bundle".into());
            }
            for f in b
                .files
                .iter()
                .filter(|f| layout::section(&f.path) == Some(layout::Section::Stack))
            {
                p.push(format!(
                    "base.files: {:?} is a stack file, which a delta always carries itself",
                    f.path
                ));
            }
        }
        paths
    }

    /// A payload's entry, stored in this bundle or (in a delta) taken from its base.
    pub fn any_file(&self, path: &str) -> Option<&FileEntry> {
        self.file(path)
            .or_else(|| self.base.as_ref().and_then(|b| b.file(path)))
    }

    /// The problems of `layers`, and the diff ids it lists, which every image's layers must name.
    /// In a bundle without layers, no layer has a file and no file is a layer's payload.
    fn layer_problems(&self, paths: &BTreeSet<&str>, p: &mut Vec<String>) -> BTreeSet<&str> {
        let mut diff_ids = BTreeSet::new();
        let without = self.bundle.without_layers;
        if without {
            for f in paths.iter().filter(|f| layout::is_layer_path(f)) {
                p.push(format!(
                    "files: {f:?} is a layer's payload, but the bundle is without layers"
                ));
            }
        }
        for l in &self.layers {
            if without && !l.file.is_empty() {
                p.push(format!(
                    "layers: {} has file {:?}, but the bundle is without layers",
                    l.diff_id, l.file
                ));
            } else if !without && l.file.is_empty() {
                p.push(format!("layers: {} has no file", l.diff_id));
            } else if !without && !paths.contains(l.file.as_str()) {
                p.push(format!(
                    "layers: {} points at {:?}, which is not in files",
                    l.diff_id, l.file
                ));
            }
            if !l.file.is_empty() && layout::layer_compression(&l.file).is_none() {
                // Readers decompress a layer by its extension (either, whatever the bundle's
                // `compression`: layers fetched from a registry are stored as they were there).
                p.push(format!(
                    "layers: {} file {:?} ends neither in .tar.zst nor in .tar.gz",
                    l.diff_id, l.file
                ));
            }
            if !diff_ids.insert(l.diff_id.as_str()) {
                p.push(format!("layers: {} is listed twice", l.diff_id));
            }
            if !l.diff_id.strip_prefix("sha256:").is_some_and(is_sha256_hex) {
                p.push(format!("layers: malformed diff id {:?}", l.diff_id));
            }
        }
        diff_ids
    }

    /// Each image's config is a listed file whose digest is the image id, and its layers are listed.
    fn image_problems(&self, paths: &BTreeSet<&str>, diff_ids: &BTreeSet<&str>, p: &mut Vec<String>) {
        for i in &self.images {
            let name = i.refs.first().cloned().unwrap_or_else(|| i.id.clone());
            if !paths.contains(i.config.as_str()) {
                p.push(format!("images: {name} config {:?} is not in files", i.config));
            }
            match i.id.strip_prefix("sha256:") {
                Some(hex) if is_sha256_hex(hex) => {
                    if let Some(f) = self.any_file(&i.config) {
                        if f.sha256 != hex {
                            p.push(format!(
                                "images: {name} id {} does not match its config's sha256 {}",
                                i.id, f.sha256
                            ));
                        }
                    }
                }
                _ => p.push(format!("images: {name} has a malformed id {:?}", i.id)),
            }
            for l in i.layers.iter().filter(|l| !diff_ids.contains(l.as_str())) {
                p.push(format!("images: {name} needs layer {l}, which is not in layers"));
            }
        }
    }

    /// Each package's file is listed, and its digest and size are well-formed and given together.
    fn package_problems(&self, paths: &BTreeSet<&str>, p: &mut Vec<String>) {
        for pk in &self.packages {
            if let Some(f) = &pk.file {
                if !paths.contains(f.as_str()) {
                    p.push(format!(
                        "packages: {} {} file {f:?} is not in files",
                        pk.object, pk.version
                    ));
                }
            }
            if let Some(sha) = pk.sha256.as_deref().filter(|s| !is_sha256_hex(s)) {
                p.push(format!(
                    "packages: {} {} has a malformed sha256 {sha:?}",
                    pk.object, pk.version
                ));
            }
            if pk.sha256.is_some() != pk.size.is_some() {
                p.push(format!(
                    "packages: {} {} must have both sha256 and size, or neither",
                    pk.object, pk.version
                ));
            }
        }
    }
}

impl Manifest {
    /// Each installer's name fits its OS, its arch is known, it is listed once, and its file is a
    /// listed payload of the same size and digest (installers are stored as they are).
    fn installer_problems(&self, p: &mut Vec<String>) {
        let mut keys = BTreeSet::new();
        for i in &self.installers {
            let what = format!("installers: {}/{} {}", i.os.as_str(), i.arch, i.name);
            if let Some(why) = installer_name_problem(i.os, &i.name) {
                p.push(format!("{what}: {why}"));
            }
            if normalize_installer_arch(&i.arch) != Some(i.arch.as_str()) {
                p.push(format!("{what}: arch must be x86_64, arm64 or generic"));
            }
            if !keys.insert((i.os, &i.arch, &i.name)) {
                p.push(format!("{what}: listed twice"));
            }
            match self.any_file(&i.file) {
                None => p.push(format!("{what}: file {:?} is not in files", i.file)),
                Some(f) if f.sha256 != i.sha256 || f.size != i.size => p.push(format!(
                    "{what}: size {} and sha256 {} differ from its file's ({} bytes, {})",
                    i.size, i.sha256, f.size, f.sha256
                )),
                Some(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str = r#"
format = 1
[bundle]
name = "demo"
version = "1.0.0"

[[images]]
ref = "bkbundle-demo/app:1"

[[packages]]
file = "packages/fusion-collectors-linux-amd64.zip"
type = "controller"
os = "linux"
arch = "amd64"
object = "Controller"
version = "1.0.0"

[[packages]]
type = "collector"
os = "linux"
arch = "x86_64"
object = "Telegraf"
version = "1.0.0"
from = "fusion-collectors-linux-amd64.zip"
entry = "bin/telegraf"

[regions]
required = ["NODE_SERVER_URL"]
[regions.env]
NODE_SERVER_URL = "${SERVER_URL}"
"#;

    #[test]
    fn recipe_parses_and_normalises_arch() {
        let r = Recipe::parse(RECIPE, "recipe.toml").unwrap();
        assert_eq!(r.packages[0].arch, "x86_64");
        assert_eq!(r.images[0].reference, "bkbundle-demo/app:1");
        assert!(r.images[0].pull);
    }

    #[test]
    fn unknown_field_names_the_line() {
        let text = RECIPE.replace("ref = \"bkbundle-demo/app:1\"", "ref = \"x\"\ncolour = \"red\"");
        let e = Recipe::parse(&text, "recipe.toml").unwrap_err().to_string();
        assert!(
            e.contains("recipe.toml") && e.contains("colour") && e.contains("line 9"),
            "{e}"
        );
    }

    #[test]
    fn newer_format_is_refused_before_anything_else() {
        let text = "format = 99\n[whatever]\nx = 1\n";
        let e = Manifest::parse(text, "bundle.toml").unwrap_err();
        assert!(matches!(e, ManifestError::Unsupported { found: 99, .. }));
        let err = e.into_error(Kind::Bundle);
        assert_eq!(err.kind, Kind::Unsupported);
        assert!(
            err.message.contains("format 99 is newer than this bkbundle supports"),
            "{}",
            err.message
        );
    }

    #[test]
    fn collector_must_point_at_a_controller_of_the_recipe() {
        let text = RECIPE.replace("from = \"fusion-collectors-linux-amd64.zip\"", "from = \"other.zip\"");
        let e = Recipe::parse(&text, "r.toml").unwrap_err().to_string();
        assert!(e.contains("other.zip") && e.contains("Telegraf"), "{e}");
    }

    const IMAGE_RECIPE: &str = r#"
format = 1
[bundle]
name = "demo"
version = "1"

[[packages]]
type = "controller"
os = "linux"
arch = "amd64"
object = "Controller"
version = "1.0.1"
image = "bklite/fusion-collector:latest"
name = "fusion-collectors-linux-amd64.zip"
tree = [
  { from = "/opt/fusion-collectors", to = "", exclude = ["misc"] },
  { from = "/opt/fusion-collectors/misc/VERSION", to = "VERSION" },
]

[[packages]]
type = "collector"
os = "linux"
arch = "x86_64"
object = "Telegraf"
version = "latest"
from = "fusion-collectors-linux-amd64.zip"
entry = "bin/telegraf"

[[installers]]
os = "linux"
arch = "aarch64"
image = "bklite/fusion-collector:latest"
path = "/opt/release/linux/fusion-collectors/bklite-controller-installer"

[[installers]]
os = "windows"
arch = "generic"
file = "packages/bklite-controller-bootstrap.exe"
"#;

    #[test]
    fn image_packages_and_installers_parse() {
        let r = Recipe::parse(IMAGE_RECIPE, "r.toml").unwrap();
        assert_eq!(
            r.packages[0].file_name().as_deref(),
            Some("fusion-collectors-linux-amd64.zip")
        );
        assert_eq!(r.packages[0].tree[0].exclude, ["misc"]);
        assert_eq!(r.installers[0].arch, "arm64");
        assert_eq!(r.installers[0].name(), "bklite-controller-installer");
        assert_eq!(r.installers[1].arch, "generic");
    }

    #[test]
    fn installer_names_must_match_their_os() {
        let bad = IMAGE_RECIPE.replace("os = \"windows\"", "os = \"linux\"");
        let e = Recipe::parse(&bad, "r.toml").unwrap_err().to_string();
        assert!(
            e.contains("installers[1]")
                && e.contains("a linux installer must be named \"bklite-controller-installer\", found \"bklite-controller-bootstrap.exe\""),
            "{e}"
        );
        let bad = IMAGE_RECIPE.replace("bklite-controller-bootstrap.exe", "setup.exe");
        let e = Recipe::parse(&bad, "r.toml").unwrap_err().to_string();
        assert!(
            e.contains(
                "\"bklite-controller-installer.exe\" or \"bklite-controller-bootstrap.exe\", found \"setup.exe\""
            ),
            "{e}"
        );
        let bad = IMAGE_RECIPE.replace("arch = \"generic\"", "arch = \"mips\"");
        assert!(Recipe::parse(&bad, "r.toml")
            .unwrap_err()
            .to_string()
            .contains("not x86_64, arm64 or generic"));
        // generic is for installers only.
        let bad = IMAGE_RECIPE.replace("arch = \"amd64\"", "arch = \"generic\"");
        assert!(Recipe::parse(&bad, "r.toml").is_err());
    }

    #[test]
    fn image_package_fields_are_checked() {
        for (from, to, needle) in [
            (
                "name = \"fusion-collectors-linux-amd64.zip\"",
                "name = \"x.tar.gz\"",
                "ending in .zip",
            ),
            (
                "from = \"/opt/fusion-collectors\", to",
                "from = \"opt/../etc\", to",
                "must be an absolute path",
            ),
            (
                "to = \"VERSION\"",
                "to = \"../VERSION\"",
                "relative path inside the package",
            ),
            ("exclude = [\"misc\"]", "exclude = [\"/misc\"]", "tree[0].exclude"),
            (
                "image = \"bklite/fusion-collector:latest\"\nname",
                "file = \"a.zip\"\nimage = \"x\"\nname",
                "not several",
            ),
            ("colour", "colour", ""),
        ] {
            if needle.is_empty() {
                let bad = IMAGE_RECIPE.replace("tree = [", "colour = 1\ntree = [");
                let e = Recipe::parse(&bad, "r.toml").unwrap_err().to_string();
                assert!(e.contains("colour") && e.contains("line 15"), "{e}");
                continue;
            }
            let bad = IMAGE_RECIPE.replace(from, to);
            assert_ne!(bad, IMAGE_RECIPE, "{from}");
            let e = Recipe::parse(&bad, "r.toml").unwrap_err().to_string();
            assert!(e.contains("packages[0]") && e.contains(needle), "{needle}: {e}");
        }
        // A collector may point into a package built from an image, by its name.
        let bad = IMAGE_RECIPE.replace("from = \"fusion-collectors-linux-amd64.zip\"", "from = \"other.zip\"");
        assert!(Recipe::parse(&bad, "r.toml")
            .unwrap_err()
            .to_string()
            .contains("other.zip"));
    }

    const REMOTE_RECIPE: &str = r#"
format = 1
[bundle]
name = "demo"
version = "1"

[registry]
mirror = "bk-lite.tencentcloudcr.com/bklite"
library = true

[[images]]
ref = "bklite/server:latest"
digest = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
platform = "linux/arm64/v8"

[[images]]
ref = "postgres:15"
engine = true

[[images]]
ref = "app:1"
oci_layout = "layouts/app"
"#;

    #[test]
    fn registry_and_layout_sources_parse() {
        let r = Recipe::parse(REMOTE_RECIPE, "r.toml").unwrap();
        let reg = r.registry.as_ref().unwrap();
        assert_eq!(
            (reg.mirror.as_str(), reg.library),
            ("bk-lite.tencentcloudcr.com/bklite", true)
        );
        assert_eq!(r.images[0].source(true), ImageSource::Mirror);
        assert_eq!(r.images[0].source(false), ImageSource::Engine);
        assert_eq!(r.images[0].pinned(), r.images[0].digest.as_deref());
        assert_eq!(r.images[1].source(true), ImageSource::Engine);
        assert_eq!(
            r.images[2].source(true),
            ImageSource::OciLayout(std::path::Path::new("layouts/app"))
        );
        assert_eq!(
            parse_platform("linux/arm64/v8"),
            Some(("linux".into(), "arm64".into(), Some("v8".into())))
        );
        assert_eq!(parse_platform("linux"), None);
        assert_eq!(parse_platform("linux/amd64/v1/x"), None);
    }

    #[test]
    fn contradictory_image_sources_are_refused_all_at_once() {
        let bad = REMOTE_RECIPE
            .replace(
                "engine = true",
                "engine = true\narchive = \"pg.tar\"\ndigest = \"sha256:00\"",
            )
            .replace(
                "oci_layout = \"layouts/app\"",
                "oci_layout = \"x\"\narchive = \"y.tar\"\nplatform = \"amd64\"",
            )
            .replace("library = true", "library = true\nplatform = \"linux/\"")
            .replace("bk-lite.tencentcloudcr.com/bklite", "https://mirror");
        let e = Recipe::parse(&bad, "r.toml").unwrap_err().to_string();
        for needle in [
            "registry.mirror: registry \"https://mirror\": has a scheme",
            "registry.platform \"linux/\" is not os/arch",
            "images[1] (postgres:15): archive and engine = true name different sources",
            "images[1] (postgres:15): digest \"sha256:00\" is not sha256:<64",
            "images[1] (postgres:15): digest pins a manifest read from a registry or an OCI layout, but the engine's export has none",
            "images[2] (app:1): archive and oci_layout name different sources",
            "images[2] (app:1): platform \"amd64\" is not os/arch",
        ] {
            assert!(e.contains(needle), "{needle}:\n{e}");
        }
        // Unknown fields of [registry] are rejected like any other.
        let bad = REMOTE_RECIPE.replace("library = true", "library = true\nmirrors = \"x\"");
        let e = Recipe::parse(&bad, "r.toml").unwrap_err().to_string();
        assert!(e.contains("mirrors"), "{e}");
        // A reference pinned twice must agree.
        let bad = REMOTE_RECIPE.replace(
            "ref = \"bklite/server:latest\"",
            &format!("ref = \"bklite/server@sha256:{}\"", "b".repeat(64)),
        );
        let e = Recipe::parse(&bad, "r.toml").unwrap_err().to_string();
        assert!(e.contains("differs from the reference's own @sha256:bbbb"), "{e}");
    }

    /// The BK-Lite recipe stays valid as it changes: packages and installers from the image.
    #[test]
    fn the_bklite_recipe_parses() {
        let r = Recipe::parse(include_str!("../manifests/bklite.toml"), "manifests/bklite.toml").unwrap();
        let built: Vec<String> = r
            .packages
            .iter()
            .filter(|p| p.image.is_some())
            .filter_map(|p| p.file_name())
            .collect();
        assert_eq!(
            built,
            [
                "fusion-collectors-linux-amd64.zip",
                "fusion-collectors-linux-arm64.zip",
                "fusion-collectors-windows-amd64.zip"
            ]
        );
        let installers: Vec<String> = r.installers.iter().map(|i| i.describe()).collect();
        assert_eq!(
            installers,
            [
                "installer linux/x86_64 bklite-controller-installer",
                "installer windows/x86_64 bklite-controller-installer.exe"
            ]
        );
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in ["../x", "/etc/passwd", "a/../b", "a//b", "./a", "a\\b", ""] {
            assert!(!is_safe_bundle_path(bad), "{bad}");
        }
        assert!(is_safe_bundle_path("images/layers/x.tar.zst"));
    }

    #[test]
    fn manifest_round_trips_and_cross_checks() {
        let sha = "a".repeat(64);
        let m = Manifest {
            format: FORMAT,
            bundle: BundleInfo {
                name: "demo".into(),
                version: "1".into(),
                description: String::new(),
                created: "2026-01-01T00:00:00Z".into(),
                created_by: "bkbundle".into(),
                compression: Compression::Zstd,
                without_layers: false,
            },
            base: None,
            files: vec![FileEntry {
                path: format!("images/configs/{sha}.json"),
                size: 3,
                sha256: sha.clone(),
            }],
            layers: vec![],
            images: vec![Image {
                refs: vec!["a:1".into()],
                id: format!("sha256:{sha}"),
                config: format!("images/configs/{sha}.json"),
                os: "linux".into(),
                arch: "amd64".into(),
                layers: vec![format!("sha256:{}", "b".repeat(64))],
                size: 0,
            }],
            packages: vec![],
            installers: vec![],
            provenance: vec![],
            stack: None,
            regions: Regions::default(),
        };
        let text = m.to_toml();
        let e = Manifest::parse(&text, "bundle.toml").unwrap_err().to_string();
        assert!(e.contains("needs layer sha256:bbbb"), "{e}");
        let mut ok = m.clone();
        ok.images[0].layers.clear();
        assert_eq!(Manifest::parse(&ok.to_toml(), "bundle.toml").unwrap(), ok);
    }

    /// An installer read from an image (image id `a`, content digest `b`).
    fn installer(a: &str, b: &str) -> Installer {
        Installer {
            name: "bklite-controller-installer".into(),
            os: Os::Linux,
            arch: "x86_64".into(),
            file: layout::installer_path("linux", "x86_64", "bklite-controller-installer"),
            size: 1,
            sha256: b.to_string(),
            image: Some("bklite/fusion-collector:latest".into()),
            image_id: Some(format!("sha256:{a}")),
            path: Some("/opt/release/linux/fusion-collectors/bklite-controller-installer".into()),
        }
    }

    /// The image a package was built from (image id `a`).
    fn provenance_of(a: &str) -> Provenance {
        Provenance {
            file: String::new(),
            image: "bklite/fusion-collector:latest".into(),
            image_id: format!("sha256:{a}"),
            paths: vec![],
        }
    }

    /// Every field of the manifest populated, so that its schema lists them all.
    fn complete() -> Manifest {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let file = |path: String, sha: &str| FileEntry {
            path,
            size: 1,
            sha256: sha.to_string(),
        };
        Manifest {
            format: FORMAT,
            bundle: BundleInfo {
                name: "demo".into(),
                version: "1".into(),
                description: "d".into(),
                created: "2026-01-01T00:00:00Z".into(),
                created_by: "bkbundle".into(),
                compression: Compression::Zstd,
                without_layers: false,
            },
            base: None,
            files: vec![
                file(layout::config_path(&a), &a),
                file(layout::layer_path(&b, "zst"), &b),
                file(layout::package_path("c.zip"), &a),
                file(
                    layout::installer_path("linux", "x86_64", "bklite-controller-installer"),
                    &b,
                ),
                file(layout::stack_path("compose.yml"), &a),
                file(layout::stack_path("env.template"), &a),
            ],
            layers: vec![Layer {
                diff_id: format!("sha256:{b}"),
                file: layout::layer_path(&b, "zst"),
                size: 2,
            }],
            images: vec![Image {
                refs: vec!["a:1".into()],
                id: format!("sha256:{a}"),
                config: layout::config_path(&a),
                os: "linux".into(),
                arch: "amd64".into(),
                layers: vec![format!("sha256:{b}")],
                size: 2,
            }],
            packages: vec![Package {
                file: Some(layout::package_path("c.zip")),
                name: "c.zip".into(),
                kind: PackageType::Collector,
                os: Os::Linux,
                arch: "x86_64".into(),
                object: "Telegraf".into(),
                version: "1".into(),
                description: "d".into(),
                from: Some("c.zip".into()),
                entry: Some("bin/telegraf".into()),
                sha256: Some(a.clone()),
                size: Some(1),
            }],
            provenance: vec![Provenance {
                file: layout::package_path("c.zip"),
                paths: vec!["/opt/fusion-collectors".into()],
                ..provenance_of(&a)
            }],
            installers: vec![installer(&a, &b)],
            stack: Some(Stack {
                project: "demo".into(),
                compose: layout::stack_path("compose.yml"),
                env_template: Some(layout::stack_path("env.template")),
                files: vec![layout::stack_path("compose.yml"), layout::stack_path("env.template")],
                nats_tls: false,
            }),
            regions: Regions {
                required: vec!["NODE_SERVER_URL".into()],
                env: BTreeMap::from([("NODE_SERVER_URL".into(), "${SERVER_URL}".into())]),
                region: vec![RegionDef {
                    name: "east".into(),
                    introduction: "i".into(),
                    proxy_address: "10.0.0.1".into(),
                    env: BTreeMap::from([("NATS_URL".into(), "nats://x".into())]),
                }],
            },
        }
    }

    /// `complete()` as `pack --no-images` writes it: no layer payloads, the rest unchanged.
    fn without_layers() -> Manifest {
        let mut m = complete();
        m.bundle.without_layers = true;
        m.files.retain(|f| !layout::is_layer_path(&f.path));
        for l in &mut m.layers {
            l.file.clear();
        }
        m
    }

    #[test]
    fn a_bundle_without_layers_has_no_layer_files() {
        let m = without_layers();
        let text = m.to_toml();
        assert!(text.contains("without_layers = true"), "{text}");
        // A layer without a file writes no `file` key; the full bundle writes no `without_layers`.
        let layers = text.split("[[layers]]").nth(1).unwrap().split("[[").next().unwrap();
        assert!(!layers.contains("file"), "{layers}");
        assert!(!complete().to_toml().contains("without_layers"));
        assert_eq!(Manifest::parse(&text, "bundle.toml").unwrap(), m);

        // A layer that keeps its file in a bundle without layers; its payload listed.
        let mut mixed = without_layers();
        mixed.layers[0].file = complete().layers[0].file.clone();
        mixed.files.push(complete().files[1].clone());
        let e = Manifest::parse(&mixed.to_toml(), "bundle.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("has file \"images/layers/bbbb"), "{e}");
        assert!(
            e.contains("is a layer's payload, but the bundle is without layers"),
            "{e}"
        );

        // A full bundle whose layer lost its file.
        let mut lost = complete();
        lost.layers[0].file.clear();
        let e = Manifest::parse(&lost.to_toml(), "bundle.toml").unwrap_err().to_string();
        assert!(
            e.contains(&format!("layers: sha256:{} has no file", "b".repeat(64))),
            "{e}"
        );

        // The same diff id twice.
        let mut twice = without_layers();
        twice.layers.push(twice.layers[0].clone());
        let e = Manifest::parse(&twice.to_toml(), "bundle.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is listed twice"), "{e}");

        // Images keep their configs: a config still has to be a listed file.
        let mut no_config = without_layers();
        no_config.files.retain(|f| f.path != no_config.images[0].config);
        let e = Manifest::parse(&no_config.to_toml(), "bundle.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("config \"images/configs/aaaa"), "{e}");
    }

    /// The manifest's format as a committed schema (tests/snapshots/manifest.schema): a change
    /// of a field shows in review. `BKBUNDLE_BLESS=1` rewrites the file.
    #[test]
    fn manifest_schema_matches_the_snapshot() {
        let m = complete();
        // The complete example is a valid manifest, and one that survives its own writer.
        assert_eq!(Manifest::parse(&m.to_toml(), "bundle.toml").unwrap(), m);
        let mut value = serde_json::to_value(&m).unwrap();
        // `without_layers` is written only when true, which a bundle with layers never is (see
        // `a_bundle_without_layers_has_no_layer_files`): listed here so the schema shows it.
        value["bundle"]["without_layers"] = serde_json::Value::Bool(true);
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/manifest.schema");
        if let Err(e) = crate::schema::compare_snapshot(&path, &crate::schema::schema_lines(&value)) {
            panic!("{e}");
        }
    }
}
