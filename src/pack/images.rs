//! Images into the bundle: the engine's (one `docker save` stream through the API for all of
//! them, so shared layers come once) and image archives on disk, each streamed through
//! [`savefile::ingest`] into compressed layers stored once; then one config per image id.

use super::inputs::{EngineImages, PackInputError, Plan};
use super::remote::{self, Fetched, Remote};
use crate::bundle::{layout, BundleWriter};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{Image, ImageSource, Layer, RecipeImage};
use crate::progress::Reporter;
use crate::savefile::{self, SavedImage, Settings, StoredLayer};
use std::collections::HashMap;
use std::fs;
use std::io::Read;
use tokio_util::io::{StreamReader, SyncIoBridge};

/// The manifest's images and layers, for what was written.
pub(super) struct Written {
    pub images: Vec<Image>,
    pub layers: Vec<Layer>,
    /// What was fetched from registries and OCI layouts.
    pub fetched: Fetched,
}

/// Layers by diff id, as stored so far (a layer already stored is skipped).
type Stored = HashMap<String, StoredLayer>;

/// Write every image of the recipe: the engine's first, then each archive's, then those of the
/// mirror and of OCI layouts (whose layers already stored are not fetched at all).
pub(super) async fn write(
    plan: &Plan,
    engine: Option<&EngineImages>,
    remote: &Remote,
    writer: &mut BundleWriter,
    reporter: &dyn Reporter,
) -> Result<Written> {
    // A delta's base layers count as stored: never written again (docs/FORMAT.md, "Delta bundles").
    let mut stored: Stored = match &plan.delta_base {
        Some(b) => b
            .manifest
            .layers
            .iter()
            .map(|l| {
                let s = StoredLayer {
                    diff_id: l.diff_id.clone(),
                    file: l.file.clone(),
                    size: l.size,
                };
                (l.diff_id.clone(), s)
            })
            .collect(),
        None => Stored::new(),
    };
    // (recipe ref, image), in recipe order per source.
    let mut saved: Vec<(String, SavedImage)> = Vec::new();
    let mut unchanged: Vec<(String, Image)> = Vec::new();
    if let Some(engine) = engine {
        let (exported, same) = from_engine(plan, engine, writer, &mut stored, reporter).await?;
        saved.extend(exported);
        unchanged = same;
    }
    for img in plan.recipe.images.iter().filter(|i| i.archive.is_some()) {
        let found = from_archive(plan, img, writer, &mut stored, reporter)?;
        saved.push((img.reference.clone(), found));
    }
    let mirror = plan.mirror.is_some();
    let fetch: Vec<remote::Resolved> = plan
        .recipe
        .images
        .iter()
        .filter(|i| matches!(i.source(mirror), ImageSource::Mirror | ImageSource::OciLayout(_)))
        .map(|i| {
            remote
                .get(&i.reference)
                .cloned()
                .ok_or_else(|| Error::internal(format!("image {} was not resolved before writing", i.reference)))
        })
        .collect::<Result<_>>()?;
    let (from_remote, fetched) = remote::store(plan, &fetch, writer, &mut stored, reporter).await?;
    saved.extend(from_remote);
    let mut images = configs(&saved, &stored, writer)?;
    for (reference, img) in unchanged {
        match images.iter_mut().find(|i| i.id == img.id) {
            Some(i) if !i.refs.contains(&reference) => i.refs.push(reference),
            Some(_) => {}
            None => images.push(Image {
                refs: vec![reference],
                ..img
            }),
        }
    }
    // Only the layers the images use (a delta's base may have others).
    let used: std::collections::HashSet<&String> = images.iter().flat_map(|i| i.layers.iter()).collect();
    let mut layers: Vec<Layer> = stored
        .into_values()
        .filter(|s| used.contains(&s.diff_id))
        .map(|s| Layer {
            diff_id: s.diff_id,
            file: s.file,
            size: s.size,
        })
        .collect();
    layers.sort_by(|a, b| (&a.file, &a.diff_id).cmp(&(&b.file, &b.diff_id)));
    Ok(Written {
        images,
        layers,
        fetched,
    })
}

/// Ingest an image stream on this thread (the runtime moves its other work elsewhere meanwhile),
/// with progress in source bytes.
fn ingest(
    plan: &Plan,
    src: impl Read,
    source: &str,
    writer: &mut BundleWriter,
    stored: &mut Stored,
    task: &dyn crate::progress::Task,
) -> Result<Vec<SavedImage>> {
    let progress = |n: u64| task.advance(n);
    let s = Settings {
        compression: plan.compression,
        level: plan.level,
        threads: plan.threads,
        progress: &progress,
        source,
        store_layers: !plan.no_images,
    };
    tokio::task::block_in_place(|| savefile::ingest(src, writer, stored, &s))
}

/// All engine images in one export stream; each recipe reference matched to its image by id.
/// For a delta, an image whose id its base has is not exported at all: it comes back as the
/// base's description of it (second list), every payload of it in the base.
async fn from_engine(
    plan: &Plan,
    e: &EngineImages,
    writer: &mut BundleWriter,
    stored: &mut Stored,
    reporter: &dyn Reporter,
) -> Result<(Vec<(String, SavedImage)>, Vec<(String, Image)>)> {
    let id_of = |r: &RecipeImage| e.found.get(&r.reference).map(|(id, _)| id.clone()).unwrap_or_default();
    let in_base = |r: &RecipeImage| {
        plan.delta_base
            .as_ref()
            .and_then(|b| b.manifest.images.iter().find(|i| i.id == id_of(r)))
            .cloned()
    };
    let unchanged: Vec<(String, Image)> = e
        .refs
        .iter()
        .filter_map(|r| in_base(r).map(|i| (r.reference.clone(), i)))
        .collect();
    let wanted: Vec<&RecipeImage> = e.refs.iter().filter(|r| in_base(r).is_none()).collect();
    if wanted.is_empty() {
        return Ok((Vec::new(), unchanged));
    }
    let refs: Vec<String> = wanted.iter().map(|i| i.reference.clone()).collect();
    let total: u64 = wanted
        .iter()
        .filter_map(|r| e.found.get(&r.reference))
        .map(|(_, s)| *s)
        .sum();
    let task = reporter.task("exporting images", Some(total));
    let reader = SyncIoBridge::new(StreamReader::new(Box::pin(e.engine.export(&refs))));
    let images = ingest(plan, reader, "the Docker engine", writer, stored, &*task);
    task.finish();
    let images = images?;
    let mut out = Vec::new();
    for img in wanted {
        let id = e
            .found
            .get(&img.reference)
            .map(|(id, _)| id.as_str())
            .unwrap_or_default();
        let found = images.iter().find(|i| i.id == id).ok_or_else(|| {
            Error::external(format!(
                "the Docker engine's export did not contain image {} ({id})",
                img.reference
            ))
            .hint("was the image removed or re-tagged while packing? run pack again")
        })?;
        out.push((img.reference.clone(), found.clone()));
    }
    Ok((out, unchanged))
}

/// One image archive (`docker save` or OCI) from disk; the image its recipe entry names.
fn from_archive(
    plan: &Plan,
    img: &RecipeImage,
    writer: &mut BundleWriter,
    stored: &mut Stored,
    reporter: &dyn Reporter,
) -> Result<SavedImage> {
    let path = plan
        .base
        .join(img.archive.as_deref().unwrap_or(std::path::Path::new("")));
    let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let task = reporter.task(&format!("reading {}", img.reference), Some(size));
    let file = fs::File::open(&path).io_ctx("cannot open image archive", &path)?;
    let src = std::io::BufReader::with_capacity(1 << 20, file);
    let images = ingest(plan, src, &path.display().to_string(), writer, stored, &*task);
    task.finish();
    let images = images?;
    pick_from_archive(&img.reference, &images).ok_or_else(|| {
        let tags: Vec<String> = images.iter().flat_map(|i| i.tags.clone()).collect();
        PackInputError::NotInArchive {
            reference: img.reference.clone(),
            path: path.clone(),
            holds: if tags.is_empty() {
                "untagged images".into()
            } else {
                tags.join(", ")
            },
        }
        .into()
    })
}

/// Configs, once per image id; refs of the same image merged.
fn configs(saved: &[(String, SavedImage)], stored: &Stored, writer: &mut BundleWriter) -> Result<Vec<Image>> {
    let mut images: Vec<Image> = Vec::new();
    for (reference, img) in saved {
        if let Some(existing) = images.iter_mut().find(|i| i.id == img.id) {
            if !existing.refs.contains(reference) {
                existing.refs.push(reference.clone());
            }
            continue;
        }
        let config = layout::config_path(img.id.trim_start_matches("sha256:"));
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
    Ok(images)
}

/// Pick the archive image a recipe ref names; a lone image is taken whatever its tag.
pub(super) fn pick_from_archive(reference: &str, images: &[SavedImage]) -> Option<SavedImage> {
    let norm = crate::install::offline::normalize_ref;
    let want = norm(reference);
    images
        .iter()
        .find(|i| i.tags.iter().any(|t| norm(t) == want))
        .or_else(|| if images.len() == 1 { images.first() } else { None })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

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
