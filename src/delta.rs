//! Delta bundles: a bundle packed against a base (`pack --base OLD.bkb`, or `--base-manifest` with
//! just the old `bundle.toml`) stores only the payloads the base does not have; its manifest is
//! complete and names, in `[base]`, the base's id and every payload it takes from there
//! (docs/FORMAT.md, "Delta bundles").
//!
//! Here: reading the base at pack time, and what install needs to know before it changes
//! anything: which layers a site's engine already has (by chain id, as the engine's layer store
//! keys them), and which parts of a delta the site lacks.

use crate::bundle::{open_verified, Check, OpenOptions};
use crate::digest::sha256_hex;
use crate::error::{Error, IoContext, Kind, Result};
use crate::manifest::{FileEntry, Image, Manifest};
use crate::progress::Reporter;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::PathBuf;

/// Where `pack` reads the base from.
#[derive(Debug, Clone)]
pub enum BaseSource {
    /// `--base OLD.bkb`: the base bundle itself (its structure is checked, its payloads not read).
    Bundle(PathBuf),
    /// `--base-manifest bundle.toml`: only the base's manifest, carried back from the site.
    Manifest(PathBuf),
}

/// The base of a delta being packed.
#[derive(Debug, Clone)]
pub struct BaseBundle {
    pub manifest: Manifest,
    /// SHA-256 (hex) of its `bundle.toml`: the id install's journal records.
    pub id: String,
    /// Where it was read, for messages.
    pub origin: String,
}

/// A manifest is a few MB at most (tens of thousands of files); anything larger is not one.
const MANIFEST_MAX: u64 = 64 << 20;

impl BaseBundle {
    pub fn read(src: &BaseSource, reporter: &dyn Reporter) -> Result<BaseBundle> {
        let base = Self::read_any(src, reporter)?;
        if base.manifest.bundle.without_layers {
            return Err(Error::input(format!(
                "--base {}: bundle {} carries no image layers (packed with --no-images), so a delta could leave none to it",
                base.origin,
                base.describe()
            ))
            .hint("give the full bundle of that release (the one pushed to the registry) as the base"));
        }
        Ok(base)
    }

    fn read_any(src: &BaseSource, reporter: &dyn Reporter) -> Result<BaseBundle> {
        match src {
            BaseSource::Bundle(path) => {
                let opts = OpenOptions {
                    require_signature: false,
                    key: None,
                    threads: None,
                    check: Check::Structure,
                };
                let b = open_verified(path, &opts, reporter).map_err(|e| {
                    e.hint(format!(
                        "--base {} must be the bundle the site was installed from (or its bundle.toml with --base-manifest)",
                        path.display()
                    ))
                })?;
                Ok(BaseBundle {
                    manifest: b.manifest().clone(),
                    id: b.manifest_sha256().to_string(),
                    origin: b.display_name(),
                })
            }
            BaseSource::Manifest(path) => {
                let f = std::fs::File::open(path).io_ctx("cannot open base manifest", path)?;
                let mut bytes = Vec::new();
                f.take(MANIFEST_MAX + 1)
                    .read_to_end(&mut bytes)
                    .io_ctx("cannot read base manifest", path)?;
                let origin = path.display().to_string();
                if bytes.len() as u64 > MANIFEST_MAX {
                    return Err(Error::input(format!(
                        "--base-manifest {origin}: larger than {} MiB, so not a bundle.toml",
                        MANIFEST_MAX >> 20
                    ))
                    .hint(
                        "give the base's bundle.toml (`tar -xf OLD.bkb bundle.toml`), or the bundle itself with --base",
                    ));
                }
                let text = std::str::from_utf8(&bytes).map_err(|_| {
                    Error::input(format!(
                        "--base-manifest {origin}: not UTF-8 text, so not a bundle.toml"
                    ))
                    .hint(
                        "give the base's bundle.toml (`tar -xf OLD.bkb bundle.toml`), or the bundle itself with --base",
                    )
                })?;
                let manifest = Manifest::parse(text, &origin).map_err(|e| e.into_error(Kind::Input))?;
                Ok(BaseBundle {
                    manifest,
                    id: sha256_hex(&bytes),
                    origin,
                })
            }
        }
    }

    /// Every payload the base has, stored or (a delta itself) taken from its own base.
    pub fn payloads(&self) -> BTreeMap<String, FileEntry> {
        let m = &self.manifest;
        m.files
            .iter()
            .chain(m.base.iter().flat_map(|b| b.files.iter()))
            .map(|f| (f.path.clone(), f.clone()))
            .collect()
    }

    /// `NAME VERSION (id …)`.
    pub fn describe(&self) -> String {
        format!(
            "{} {} (id {})",
            self.manifest.bundle.name,
            self.manifest.bundle.version,
            crate::manifest::short_id(&self.id)
        )
    }
}

/// The chain id of each prefix of `diff_ids` (bottom to top), as the engine's layer store names a
/// layer: the first is the first diff id, each next `sha256("<parent chain> <diff id>")`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let id = match out.last() {
            None => d.clone(),
            Some(parent) => format!("sha256:{}", sha256_hex(format!("{parent} {d}").as_bytes())),
        };
        out.push(id);
    }
    out
}

/// What the engine already holds, as far as loading is concerned.
#[derive(Debug, Clone, Default)]
pub struct EngineLayers {
    /// The chain ids of every layer of every image in the engine.
    pub chains: BTreeSet<String>,
    /// The engine keeps images in containerd's store (`driver-type io.containerd.snapshotter.v1`):
    /// its `docker load` wants every layer in the stream, so none can be left out.
    pub containerd_store: bool,
}

impl EngineLayers {
    /// For each layer of `img`, whether the engine has it (at the same place in the chain), so
    /// that a load can leave it out of the stream.
    pub fn present(&self, img: &Image) -> Vec<bool> {
        if self.containerd_store {
            return vec![false; img.layers.len()];
        }
        chain_ids(&img.layers).iter().map(|c| self.chains.contains(c)).collect()
    }
}

/// What loading `images` (in this order) streams: each image's uncompressed layer bytes the engine
/// lacks (a layer shared with an image before it counted there), and the bytes of their layers
/// the engine already has (left out of the stream).
pub fn stream_bytes(m: &Manifest, images: &[&Image], engine: &EngineLayers) -> (Vec<u64>, u64) {
    let (mut sent, mut skipped) = (BTreeSet::new(), 0u64);
    let per_image = images
        .iter()
        .map(|img| {
            let mut bytes = 0u64;
            for (d, present) in img.layers.iter().zip(engine.present(img)) {
                let size = m.layer(d).map(|l| l.size).unwrap_or(0);
                if present {
                    skipped = skipped.saturating_add(size);
                } else if sent.insert(d.clone()) {
                    bytes = bytes.saturating_add(size);
                }
            }
            bytes
        })
        .collect();
    (per_image, skipped)
}

/// The parts of `images` (those to load) that the bundle leaves to its base and the engine does
/// not have: a config (the image itself is absent) or a layer. Empty for a full bundle.
pub fn image_gaps(m: &Manifest, images: &[&Image], engine: &EngineLayers) -> Vec<String> {
    let Some(base) = &m.base else { return vec![] };
    let mut gaps = Vec::new();
    let mut named = BTreeSet::new();
    for img in images {
        let name = img.refs.first().cloned().unwrap_or_else(|| img.id.clone());
        if base.file(&img.config).is_some() {
            gaps.push(format!(
                "image {name} ({}): not in the Docker engine, and this delta bundle leaves it to its base",
                crate::manifest::short_id(&img.id)
            ));
            continue;
        }
        for (diff, present) in img.layers.iter().zip(engine.present(img)) {
            let Some(layer) = m.layer(diff) else { continue };
            if present || base.file(&layer.file).is_none() || !named.insert(diff.clone()) {
                continue;
            }
            gaps.push(format!(
                "layer {diff} ({}) of image {name}: not in the Docker engine{}, and this delta bundle leaves it to its base",
                crate::inspect::human(layer.size),
                if engine.containerd_store {
                    " (its containerd image store takes no layer from what it has)"
                } else {
                    ""
                }
            ));
        }
    }
    gaps
}

/// The one error for a delta the site cannot take: every gap, and the bundle to bring.
pub fn gaps_error(m: &Manifest, gaps: &[String], installed: Option<&str>) -> Error {
    let base = m.base.as_ref().map(|b| b.describe()).unwrap_or_default();
    let site = match installed {
        Some(i) => format!(" (this site was installed from bundle {i})"),
        None => String::new(),
    };
    Error::new(
        Kind::Preflight,
        format!(
            "this delta bundle needs what its base bundle {base} installed, and the site lacks {} part(s){site}:\n  - {}",
            gaps.len(),
            gaps.join("\n  - ")
        ),
    )
    .hint(format!(
        "nothing was changed; bring the base bundle {base} and make a full bundle with `bkbundle merge BASE.bkb THIS.bkb -o FULL.bkb`, then install FULL.bkb (or install the base first, then this delta)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Base, BundleInfo, Compression, Layer};

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn chain_ids_are_the_engines() {
        // Values from `printf 'sha256:<parent> sha256:<diff>' | sha256sum`, the layer store's rule.
        let ids = chain_ids(&[d('a'), d('b'), d('c')]);
        assert_eq!(ids[0], d('a'));
        assert_eq!(
            ids[1],
            "sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c"
        );
        assert_eq!(
            ids[2],
            "sha256:c1377126441fb2f5ec2c21ae2a60255331d639e830f0ee1b40a36e52d4c40588"
        );
        assert!(chain_ids(&[]).is_empty());
    }

    fn image(layers: &[String]) -> Image {
        Image {
            refs: vec!["app:2".into()],
            id: d('9'),
            config: format!("images/configs/{}.json", "9".repeat(64)),
            os: "linux".into(),
            arch: "amd64".into(),
            layers: layers.to_vec(),
            size: 3,
        }
    }

    fn delta_manifest() -> Manifest {
        let f = |p: &str, c: char| FileEntry {
            path: p.into(),
            size: 1,
            sha256: c.to_string().repeat(64),
        };
        let layer = |c: char| Layer {
            diff_id: d(c),
            file: format!("images/layers/{}.tar.zst", c.to_string().repeat(64)),
            size: 1,
        };
        Manifest {
            format: 1,
            bundle: BundleInfo {
                name: "x".into(),
                version: "2".into(),
                description: String::new(),
                created: String::new(),
                created_by: String::new(),
                compression: Compression::Zstd,
                without_layers: false,
            },
            base: Some(Base {
                id: "e".repeat(64),
                name: "x".into(),
                version: "1".into(),
                created: String::new(),
                files: vec![f(&layer('a').file, '1'), f(&layer('b').file, '2')],
            }),
            files: vec![
                f(&layer('c').file, '3'),
                f(&format!("images/configs/{}.json", "9".repeat(64)), '9'),
            ],
            layers: vec![layer('a'), layer('b'), layer('c')],
            images: vec![image(&[d('a'), d('b'), d('c')])],
            packages: vec![],
            installers: vec![],
            provenance: vec![],
            stack: None,
            regions: Default::default(),
        }
    }

    #[test]
    fn a_layer_left_to_the_base_is_a_gap_only_where_the_engine_lacks_its_chain() {
        let m = delta_manifest();
        assert!(m.problems().is_empty(), "{:?}", m.problems());
        let img = &m.images[0];
        let ids = chain_ids(&img.layers);
        // The engine has a and a+b: nothing missing; c is stored in the delta.
        let full = EngineLayers {
            chains: ids[..2].iter().cloned().collect(),
            containerd_store: false,
        };
        assert!(image_gaps(&m, &[img], &full).is_empty());
        assert_eq!(full.present(img), [true, true, false]);
        // The engine has b, but on another parent: a chain id it lacks, so b is a gap.
        let other = EngineLayers {
            chains: [ids[0].clone(), chain_ids(&[d('f'), d('b')])[1].clone()]
                .into_iter()
                .collect(),
            containerd_store: false,
        };
        let gaps = image_gaps(&m, &[img], &other);
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert!(
            gaps[0].starts_with(&format!("layer {} (1 B) of image app:2", d('b'))),
            "{gaps:?}"
        );
        // containerd's store loads nothing from what it has.
        let ctd = EngineLayers {
            chains: ids.iter().cloned().collect(),
            containerd_store: true,
        };
        assert_eq!(image_gaps(&m, &[img], &ctd).len(), 2);
        let e = gaps_error(&m, &gaps, Some("x 0 (id 0123)"));
        assert_eq!(e.kind, Kind::Preflight);
        assert!(e.message.contains("base bundle x 1 (id eeeeeeeeeeee)"), "{}", e.message);
        assert!(
            e.message.contains("this site was installed from bundle x 0 (id 0123)"),
            "{}",
            e.message
        );
        // A full bundle has no gaps whatever the engine holds.
        let mut fullb = m.clone();
        fullb.base = None;
        assert!(image_gaps(&fullb, &[img], &EngineLayers::default()).is_empty());
    }

    #[test]
    fn the_manifest_refuses_an_inconsistent_base() {
        let mut m = delta_manifest();
        let b = m.base.as_mut().unwrap();
        b.id = "nothex".into();
        b.files.push(m.files[0].clone());
        b.files.push(FileEntry {
            path: "stack/docker-compose.yml".into(),
            size: 1,
            sha256: "1".repeat(64),
        });
        m.layers[0].file = "images/layers/a.tar.xz".into();
        let p = m.problems().join("\n");
        assert!(p.contains("base: malformed id \"nothex\""), "{p}");
        assert!(p.contains("is listed twice (in files or base.files)"), "{p}");
        assert!(
            p.contains("is a stack file, which a delta always carries itself"),
            "{p}"
        );
        assert!(p.contains("ends neither in .tar.zst nor in .tar.gz"), "{p}");
    }
}
