//! `bkbundle pack`: turn a recipe into a bundle.
//!
//! Everything that can be checked before writing is checked first (recipe, package archives,
//! stack files, image availability), so a bad input fails in seconds and names the thing. Then
//! images stream from the engine (`docker save` through the API, all engine images in one stream so
//! the engine sends shared layers once) or from archives on disk straight into the bundle: no
//! staging copy, memory bounded by buffers. The bundle is written under a temporary name and
//! renamed at the end.
//!
//! One module per step, [`run`] the sequence of them:
//! - [`inputs`]: the recipe and the checks of every input, all problems at once;
//! - [`artifacts`] (with [`extract`]): packages and installers taken from images, read from the
//!   images' layers and checked before anything is written;
//! - [`images`]: engine images and image archives into layers and configs;
//! - [`packages`]: agent packages, installers, stack files and the bkbundle binary;
//! - [`manifest`]: the manifest built from what was written, signed, and the bundle closed.

mod artifacts;
mod extract;
mod images;
mod inputs;
mod manifest;
mod packages;
mod remote;

use crate::bundle::BundleWriter;
use crate::error::Result;
use crate::inspect::human;
use crate::manifest::Compression;
use crate::progress::Reporter;
use crate::report::Report;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

pub use artifacts::{ArtifactError, ImageRead};
pub use inputs::PackInputError;
pub use remote::{Mirror, RemoteError};

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
    /// The bkbundle binary to carry as `bin/bkbundle` (default: the running one); it must start
    /// on the offline hosts ([`crate::portable::check`]).
    pub binary: Option<PathBuf>,
    /// `--no-images`: describe the images but leave their layers out
    /// ([`crate::manifest::BundleInfo::without_layers`]).
    pub no_images: bool,
    /// `--base` / `--base-manifest`: pack a delta of that bundle ([`crate::manifest::Base`]).
    pub base: Option<crate::delta::BaseSource>,
    /// `--mirror HOST[:PORT][/PREFIX]`: fetch the recipe's plain references from this registry,
    /// in place of (or without) the recipe's `[registry] mirror`.
    pub mirror: Option<String>,
    /// How to reach the mirror (CA, plain HTTP, credentials).
    pub access: crate::registry::Access,
    /// `--recompress`: give every layer fetched from a registry or an OCI layout the bundle's
    /// compression, rather than storing gzip and zstd blobs as they are.
    pub recompress: bool,
}

#[derive(Debug, Serialize)]
pub struct PackReport {
    pub bundle: String,
    pub version: String,
    pub output: Vec<PathBuf>,
    pub bytes: u64,
    pub images: usize,
    pub layers: usize,
    /// `--no-images`: the layers are described, not stored.
    pub without_layers: bool,
    /// A delta (`--base`): the base bundle (`NAME VERSION (id …)`), and the payloads and bytes
    /// taken from it rather than stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_of: Option<String>,
    pub files_from_base: usize,
    pub bytes_from_base: u64,
    pub image_bytes_uncompressed: u64,
    pub image_bytes_stored: u64,
    /// Layer blobs fetched from a registry or read from an OCI layout, their bytes, and the
    /// layers of such images not fetched because the bundle already had them.
    pub layers_fetched: usize,
    pub bytes_fetched: u64,
    pub layers_skipped: usize,
    pub packages: usize,
    pub installers: usize,
    /// Images packages or installers were read from: layer bytes read against the image's size.
    pub image_reads: Vec<ImageRead>,
    pub stack_files: usize,
    pub signed_by: Option<String>,
    /// What the carried `bin/bkbundle` needs from its host (`static, needs no libc`).
    pub binary: String,
    pub seconds: f64,
    pub steps: Vec<(String, f64)>,
}

/// Pack the recipe of `opts` into its bundle; progress through `reporter`.
pub fn run(opts: &PackOptions, reporter: &dyn Reporter) -> Result<PackReport> {
    crate::runtime::block_on(pack(opts, reporter))?
}

async fn pack(opts: &PackOptions, reporter: &dyn Reporter) -> Result<PackReport> {
    let t0 = Instant::now();
    let mut steps = Vec::new();
    let plan = inputs::read(opts, reporter)?;

    // 1. Check every input before writing anything, artifacts taken from images included.
    let t = Instant::now();
    let (mut checked, mut problems) = inputs::check(&plan, reporter).await?;
    let mut extracted = artifacts::run(
        &plan,
        checked.engine.as_ref(),
        &mut checked.remote,
        &opts.output,
        reporter,
        &mut problems,
    )
    .await?;
    // The carried binary must start on the offline hosts (old glibc): a problem like the others.
    let carried = packages::carried_binary(opts).and_then(|b| crate::portable::check(&b).map(|n| (b, n)));
    let carried = carried.map_err(|e| problems.push(e)).ok();
    inputs::combine(problems)?;
    let Some((binary, needs)) = carried else {
        return Err(crate::error::Error::internal(
            "the carried binary was neither checked nor refused",
        ));
    };
    // Built packages are written like package files; collectors find their entries in them.
    for (i, built) in &extracted.built {
        checked.packages[*i].1 = Some(built.path.clone());
    }
    checked.listings.append(&mut extracted.listings);
    steps.push(("check inputs".to_string(), t.elapsed().as_secs_f64()));

    // 2. Write: images, then packages, stack and the binary.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut writer = create_output(opts, now)?;
    if let Some(b) = &plan.delta_base {
        writer.set_base(b.payloads());
    }
    let t = Instant::now();
    let written = images::write(&plan, checked.engine.as_ref(), &checked.remote, &mut writer, reporter).await?;
    let fetched = written.fetched;
    steps.push(("images".to_string(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let (packages, provenance) = packages::write_packages(&checked, &extracted, &mut writer, reporter)?;
    let installers = packages::write_installers(&extracted, &mut writer, reporter)?;
    let stack = packages::write_stack(&plan.recipe, &checked, &mut writer)?;
    packages::write_binary(&binary, &mut writer)?;
    steps.push(("packages and stack".to_string(), t.elapsed().as_secs_f64()));

    // 3. Manifest, signature, sums; then commit.
    let payload = manifest::Payload {
        written,
        packages,
        installers,
        provenance,
        stack,
    };
    let m = manifest::build(&plan, now, &writer, payload)?;
    let signed_by = manifest::write(&m, plan.signer.as_ref(), now, &mut writer)?;
    let bytes = writer.position()? + 1024;
    let output = writer.commit()?;
    let mut report = manifest::report(&m, output, bytes, signed_by, t0, steps);
    report.image_reads = extracted.reads.clone();
    report.binary = needs.describe();
    report.layers_fetched = fetched.blobs;
    report.bytes_fetched = fetched.bytes;
    report.layers_skipped = fetched.skipped;
    Ok(report)
}

/// The bundle writer at `opts.output` (temporary names until commit).
fn create_output(opts: &PackOptions, now: u64) -> Result<BundleWriter> {
    if let Some(dir) = opts.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(PackInputError::OutputDir(dir.to_path_buf()).into());
        }
    }
    BundleWriter::create(&opts.output, opts.split_size, now)
}

impl Report for PackReport {
    fn render(&self) -> String {
        let reads: String = self
            .image_reads
            .iter()
            .map(|r| {
                format!(
                    "\n  {} artifact(s) from {}: {} layer(s) read once, {} read of the image's {}",
                    r.artifacts,
                    r.image,
                    r.layers_read,
                    human(r.bytes_read),
                    human(r.image_bytes)
                )
            })
            .collect();
        let fetched = if self.layers_fetched + self.layers_skipped > 0 {
            format!(
                "\n  {} layer(s) fetched from registries and OCI layouts ({}), {} not fetched: already in the bundle",
                self.layers_fetched,
                human(self.bytes_fetched),
                self.layers_skipped
            )
        } else {
            String::new()
        };
        let stored = if self.without_layers {
            "layers not stored: install with --images-from REGISTRY".to_string()
        } else {
            format!("{} stored", human(self.image_bytes_stored))
        };
        let delta = match &self.delta_of {
            Some(base) => format!(
                "\n  a delta of bundle {base}: {} payload(s), {}, left to the base (install it on a site installed from the base, or `bkbundle merge`)",
                self.files_from_base,
                human(self.bytes_from_base)
            ),
            None => String::new(),
        };
        format!(
            "packed {} {} into {}\n  {} images ({} distinct layers, {} uncompressed, {stored}), {} packages, {} installers, {} stack files{}{fetched}{reads}{delta}\n  bin/bkbundle: {}\n  {} in {:.1}s",
            self.bundle,
            self.version,
            self.output.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            self.images,
            self.layers,
            human(self.image_bytes_uncompressed),
            self.packages,
            self.installers,
            self.stack_files,
            self.signed_by.as_ref().map(|k| format!(", signed by key {k}")).unwrap_or_default(),
            self.binary,
            human(self.bytes),
            self.seconds
        )
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
}
