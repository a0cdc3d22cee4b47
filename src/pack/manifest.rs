//! The manifest of what was written, checked, signed, and the bundle's descriptive files; the
//! report from it.

use super::images::Written;
use super::inputs::Plan;
use super::{rfc3339, PackReport};
use crate::bundle::{layout, BundleWriter};
use crate::error::{Error, Result};
use crate::manifest::{Base, BundleInfo, FileEntry, Installer, Manifest, Package, Provenance, Stack, FORMAT};
use crate::sign::{self, Signer};
use std::path::PathBuf;
use std::time::Instant;

/// What the writing steps wrote, for the manifest.
pub(super) struct Payload {
    pub written: Written,
    pub packages: Vec<Package>,
    pub installers: Vec<Installer>,
    pub provenance: Vec<Provenance>,
    pub stack: Option<Stack>,
}

/// The manifest for the payload `writer` holds; a manifest that fails its own cross-checks is a
/// bug of pack, refused before it is written.
pub(super) fn build(plan: &Plan, now: u64, writer: &BundleWriter, payload: Payload) -> Result<Manifest> {
    let Payload {
        written,
        packages,
        installers,
        provenance,
        stack,
    } = payload;
    let recipe = &plan.recipe;
    let m = Manifest {
        format: FORMAT,
        bundle: BundleInfo {
            name: recipe.bundle.name.clone(),
            version: recipe.bundle.version.clone(),
            description: recipe.bundle.description.clone(),
            created: rfc3339(now),
            created_by: format!("bkbundle {}", env!("CARGO_PKG_VERSION")),
            compression: plan.compression,
            without_layers: plan.no_images,
        },
        base: plan
            .delta_base
            .as_ref()
            .map(|b| delta_base(b, writer, &written))
            .transpose()?,
        files: writer.files().to_vec(),
        layers: written.layers,
        images: written.images,
        packages,
        installers,
        provenance,
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
    Ok(m)
}

/// A delta's `[base]`: every payload its manifest names that was not written, as the base lists
/// it (layers and configs of unchanged images were never written; packages, installers and the
/// binary identical to the base's were written and dropped by the writer), in the order the
/// manifest names them.
fn delta_base(b: &crate::delta::BaseBundle, writer: &BundleWriter, written: &Written) -> Result<Base> {
    let payloads = b.payloads();
    let mut files: Vec<FileEntry> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let named = written
        .layers
        .iter()
        .map(|l| &l.file)
        .chain(written.images.iter().map(|i| &i.config))
        .chain(writer.taken_from_base().iter().map(|f| &f.path));
    for path in named {
        if writer.files().iter().any(|f| &f.path == path) || !seen.insert(path.clone()) {
            continue;
        }
        let entry = payloads.get(path).ok_or_else(|| {
            Error::internal(format!(
                "delta: {path} was neither written nor found in the base {}",
                b.origin
            ))
        })?;
        files.push(entry.clone());
    }
    let m = &b.manifest;
    Ok(Base {
        id: b.id.clone(),
        name: m.bundle.name.clone(),
        version: m.bundle.version.clone(),
        created: m.bundle.created.clone(),
        files,
    })
}

/// Write the manifest, its signature when there is a signer, and `SHA256SUMS`. Returns the
/// signing key's id.
pub(super) fn write(
    m: &Manifest,
    signer: Option<&Signer>,
    now: u64,
    writer: &mut BundleWriter,
) -> Result<Option<String>> {
    let text = m.to_toml();
    let signature = match signer {
        Some(signer) => {
            let comment = format!(
                "timestamp:{now}\tfile:{}\tbundle:{} {}",
                layout::MANIFEST,
                m.bundle.name,
                m.bundle.version
            );
            Some(signer.sign(text.as_bytes(), &comment)?)
        }
        None => None,
    };
    writer.add_descriptive(m, &text, signature.as_ref().map(|(s, p)| (s.as_str(), p.as_str())))?;
    Ok(signature
        .and_then(|(_, pubkey)| sign::parse_public_key(&pubkey).ok())
        .map(|pk| sign::key_id(pk.keynum())))
}

/// The report of a finished pack.
pub(super) fn report(
    m: &Manifest,
    output: Vec<PathBuf>,
    bytes: u64,
    signed_by: Option<String>,
    t0: Instant,
    steps: Vec<(String, f64)>,
) -> PackReport {
    let stored = |path: &str| m.file(path).map(|f| f.size).unwrap_or(0);
    let image_bytes_stored =
        m.layers.iter().map(|l| stored(&l.file)).sum::<u64>() + m.images.iter().map(|i| stored(&i.config)).sum::<u64>();
    PackReport {
        bundle: m.bundle.name.clone(),
        version: m.bundle.version.clone(),
        output,
        bytes,
        images: m.images.len(),
        layers: m.layers.len(),
        without_layers: m.bundle.without_layers,
        delta_of: m.base.as_ref().map(|b| b.describe()),
        files_from_base: m.base.as_ref().map(|b| b.files.len()).unwrap_or(0),
        bytes_from_base: m.base.as_ref().map(|b| b.bytes()).unwrap_or(0),
        image_bytes_uncompressed: m.layers.iter().map(|l| l.size).sum(),
        image_bytes_stored,
        layers_fetched: 0,
        bytes_fetched: 0,
        layers_skipped: 0,
        packages: m.packages.len(),
        installers: m.installers.len(),
        image_reads: Vec::new(),
        stack_files: m.stack.as_ref().map(|s| s.files.len()).unwrap_or(0),
        signed_by,
        binary: String::new(),
        seconds: t0.elapsed().as_secs_f64(),
        steps,
    }
}
