//! `bkbundle inspect`: what a bundle holds, from its manifest. The bundle is opened with
//! [`Check::Structure`]: framing, manifest, signature and the list of entries are checked, the
//! content is not hashed (run `verify` for that). The report is data; [`Report::render`] makes
//! the human text.

use crate::bundle::layout::{self, Section};
use crate::bundle::{open_verified, Check, OpenOptions, VerifiedBundle};
use crate::error::Result;
use crate::manifest::{Manifest, Regions};
use crate::progress::Reporter;
use crate::report::Report;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub bundle: String,
    pub name: String,
    pub version: String,
    pub description: String,
    pub created: String,
    pub created_by: String,
    pub compression: String,
    pub signed: bool,
    pub parts: usize,
    /// Packed with `--no-images`: the images are described, their layers are not in the bundle
    /// (install pulls them: `--images-from REGISTRY`).
    pub without_layers: bool,
    /// A delta bundle (`pack --base`): what it needs from its base, and what that saves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<Delta>,
    pub images: Vec<ImageRow>,
    pub packages: Vec<PackageRow>,
    pub installers: Vec<InstallerRow>,
    pub stack: Vec<String>,
    pub project: Option<String>,
    pub regions: Regions,
    pub sizes: Sizes,
}

/// What a delta bundle needs from its base: the payloads it leaves there, by kind.
#[derive(Debug, Serialize)]
pub struct Delta {
    /// `NAME VERSION`, and the base's id (SHA-256 of its bundle.toml).
    pub base: String,
    pub base_id: String,
    pub base_created: String,
    /// Layers left to the base (a site installed from it has them in its engine), and their
    /// stored bytes in the base.
    pub layers: usize,
    pub layer_bytes: u64,
    /// Images whose config too is left to the base: unchanged since it.
    pub unchanged_images: Vec<String>,
    /// Packages and installers left to the base (a site has them in its object store).
    pub packages: Vec<String>,
    pub installers: Vec<String>,
    /// `bin/bkbundle` left to the base (the same program).
    pub binary: bool,
    /// Bytes left to the base, bytes stored here, and the share of a full bundle saved.
    pub bytes_from_base: u64,
    pub bytes_stored: u64,
    pub saved_percent: f64,
}

#[derive(Debug, Serialize)]
pub struct ImageRow {
    pub refs: Vec<String>,
    pub id: String,
    pub platform: String,
    pub size: u64,
    pub stored: u64,
    pub layers: usize,
    pub shared_layers: usize,
    /// Layers a delta leaves to its base.
    #[serde(skip_serializing_if = "is_zero")]
    pub base_layers: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Serialize)]
pub struct PackageRow {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub os: String,
    pub arch: String,
    pub object: String,
    pub version: String,
    pub size: Option<u64>,
    pub inside: Option<String>,
}

/// A controller installer program of the bundle (verify shows them too).
#[derive(Debug, Clone, Serialize)]
pub struct InstallerRow {
    pub name: String,
    pub os: String,
    pub arch: String,
    pub size: u64,
    pub sha256: String,
    /// The image it was read from, when it was.
    pub image: Option<String>,
}

/// The manifest's installers as rows.
pub fn installer_rows(m: &Manifest) -> Vec<InstallerRow> {
    m.installers
        .iter()
        .map(|i| InstallerRow {
            name: i.name.clone(),
            os: i.os.as_str().into(),
            arch: i.arch.clone(),
            size: i.size,
            sha256: i.sha256.clone(),
            image: i.image.clone(),
        })
        .collect()
}

/// The installers' lines of the human rendering (inspect and verify).
pub fn render_installers(s: &mut String, rows: &[InstallerRow]) {
    let _ = writeln!(s, "\ninstallers ({})", rows.len());
    for i in rows {
        let _ = writeln!(
            s,
            "  {:<8} {:<8} {:<34} {:>10}  sha256 {}{}",
            i.os,
            i.arch,
            i.name,
            human(i.size),
            i.sha256,
            i.image.as_ref().map(|r| format!("  from {r}")).unwrap_or_default()
        );
    }
}

#[derive(Debug, Serialize, Default)]
pub struct Sizes {
    pub images: u64,
    pub images_uncompressed: u64,
    pub packages: u64,
    pub installers: u64,
    pub stack: u64,
    pub binary: u64,
    pub total: u64,
}

pub fn run(path: &Path, reporter: &dyn Reporter) -> Result<InspectReport> {
    let open = OpenOptions {
        check: Check::Structure,
        ..Default::default()
    };
    let bundle = open_verified(path, &open, reporter)?;
    Ok(report(&bundle))
}

fn report(bundle: &VerifiedBundle) -> InspectReport {
    let m = bundle.manifest();
    InspectReport {
        bundle: bundle.display_name(),
        name: m.bundle.name.clone(),
        version: m.bundle.version.clone(),
        description: m.bundle.description.clone(),
        created: m.bundle.created.clone(),
        created_by: m.bundle.created_by.clone(),
        compression: layer_compressions(m),
        signed: bundle.is_signed(),
        parts: bundle.parts(),
        without_layers: m.bundle.without_layers,
        delta: delta(m),
        images: image_rows(m),
        packages: package_rows(m),
        installers: installer_rows(m),
        stack: m.stack.as_ref().map(|s| s.files.clone()).unwrap_or_default(),
        project: m.stack.as_ref().map(|s| s.project.clone()),
        regions: m.regions.clone(),
        sizes: sizes(m, bundle.bytes()),
    }
}

/// How the layers are compressed: the bundle's compression, or each one found when layers differ
/// (`zstd+gzip`: layers fetched from a registry keep the registry's compression).
fn layer_compressions(m: &Manifest) -> String {
    let mut found: Vec<&str> = Vec::new();
    for l in &m.layers {
        if let Some(c) = layout::layer_compression(&l.file) {
            if !found.contains(&c.as_str()) {
                found.push(c.as_str());
            }
        }
    }
    if found.len() > 1 {
        found.sort_by_key(|c| *c != m.bundle.compression.as_str());
        found.join("+")
    } else {
        found
            .first()
            .copied()
            .unwrap_or(m.bundle.compression.as_str())
            .to_string()
    }
}

/// A payload's size as the manifest lists it (0 when it does not).
fn size_of(m: &Manifest, path: &str) -> u64 {
    m.file(path).map(|f| f.size).unwrap_or(0)
}

fn image_rows(m: &Manifest) -> Vec<ImageRow> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for i in &m.images {
        for l in &i.layers {
            *uses.entry(l.as_str()).or_default() += 1;
        }
    }
    m.images
        .iter()
        .map(|i| ImageRow {
            refs: i.refs.clone(),
            id: i.id.clone(),
            platform: format!("{}/{}", i.os, i.arch),
            size: i.size,
            stored: i
                .layers
                .iter()
                .filter_map(|l| m.layer(l))
                .map(|l| size_of(m, &l.file))
                .fold(size_of(m, &i.config), u64::saturating_add),
            layers: i.layers.len(),
            shared_layers: i
                .layers
                .iter()
                .filter(|l| uses.get(l.as_str()).copied().unwrap_or(0) > 1)
                .count(),
            base_layers: i
                .layers
                .iter()
                .filter_map(|l| m.layer(l))
                .filter(|l| m.from_base(&l.file))
                .count(),
        })
        .collect()
}

/// A delta's needs from its base, by kind.
fn delta(m: &Manifest) -> Option<Delta> {
    let b = m.base.as_ref()?;
    let from = |p: &str| b.file(p).is_some();
    let layers: Vec<&crate::manifest::Layer> = m.layers.iter().filter(|l| from(&l.file)).collect();
    let stored: u64 = m.files.iter().map(|f| f.size).fold(0, u64::saturating_add);
    let base_bytes = b.bytes();
    let full = base_bytes.saturating_add(stored);
    Some(Delta {
        base: format!("{} {}", b.name, b.version),
        base_id: b.id.clone(),
        base_created: b.created.clone(),
        layers: layers.len(),
        layer_bytes: layers
            .iter()
            .filter_map(|l| b.file(&l.file))
            .map(|f| f.size)
            .fold(0, u64::saturating_add),
        unchanged_images: m
            .images
            .iter()
            .filter(|i| from(&i.config))
            .map(|i| i.refs.join(", "))
            .collect(),
        packages: m
            .packages
            .iter()
            .filter(|p| p.file.as_deref().is_some_and(from))
            .map(|p| format!("{} {} ({})", p.object, p.version, p.name))
            .collect(),
        installers: m
            .installers
            .iter()
            .filter(|i| from(&i.file))
            .map(|i| format!("{}/{} {}", i.os.as_str(), i.arch, i.name))
            .collect(),
        binary: from(layout::BINARY),
        bytes_from_base: base_bytes,
        bytes_stored: stored,
        saved_percent: if full == 0 {
            0.0
        } else {
            base_bytes as f64 * 100.0 / full as f64
        },
    })
}

fn package_rows(m: &Manifest) -> Vec<PackageRow> {
    m.packages
        .iter()
        .map(|p| PackageRow {
            name: p.name.clone(),
            kind: p.kind.as_str().into(),
            os: p.os.as_str().into(),
            arch: p.arch.clone(),
            object: p.object.clone(),
            version: p.version.clone(),
            size: p.file.as_deref().map(|f| size_of(m, f)),
            inside: p
                .from
                .as_ref()
                .map(|f| format!("{f}:{}", p.entry.as_deref().unwrap_or(""))),
        })
        .collect()
}

/// Payload sizes by section. They come from the manifest, which inspect reads without checking
/// every byte: added without overflowing whatever they claim.
fn sizes(m: &Manifest, total: u64) -> Sizes {
    let mut sizes = Sizes {
        total,
        ..Default::default()
    };
    for f in &m.files {
        let slot = match layout::section(&f.path) {
            Some(Section::Images) => &mut sizes.images,
            Some(Section::Packages) => &mut sizes.packages,
            Some(Section::Installers) => &mut sizes.installers,
            Some(Section::Stack) => &mut sizes.stack,
            Some(Section::Binary) => &mut sizes.binary,
            None => continue,
        };
        *slot = slot.saturating_add(f.size);
    }
    sizes.images_uncompressed = m.layers.iter().map(|l| l.size).fold(0, u64::saturating_add);
    sizes
}

/// How inspect and verify say that a bundle's images have no layers in it.
pub fn images_without_layers(n: usize) -> String {
    format!("images: {n} (layers not in this bundle: install with --images-from REGISTRY)")
}

/// Byte counts as operators read them (binary units, one decimal).
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl Report for InspectReport {
    fn render(&self) -> String {
        let mut s = String::new();
        self.render_header(&mut s);
        self.render_delta(&mut s);
        self.render_images(&mut s);
        self.render_packages(&mut s);
        render_installers(&mut s, &self.installers);
        self.render_stack(&mut s);
        self.render_regions(&mut s);
        let z = &self.sizes;
        let _ = writeln!(
            s,
            "\nsizes: images {} (uncompressed {}), packages {}, installers {}, stack {}, bkbundle {}, total {}",
            human(z.images),
            human(z.images_uncompressed),
            human(z.packages),
            human(z.installers),
            human(z.stack),
            human(z.binary),
            human(z.total)
        );
        s.trim_end().to_string()
    }
}

/// The sections of the human rendering, in order.
impl InspectReport {
    fn render_header(&self, s: &mut String) {
        let _ = writeln!(s, "bundle   {} {} ({})", self.name, self.version, self.bundle);
        if !self.description.is_empty() {
            let _ = writeln!(s, "         {}", self.description);
        }
        let _ = writeln!(
            s,
            "created  {} by {}; layers {}; {}; {} part(s)",
            self.created,
            self.created_by,
            self.compression,
            if self.signed { "signed" } else { "unsigned" },
            self.parts
        );
    }

    fn render_delta(&self, s: &mut String) {
        let Some(d) = &self.delta else { return };
        let _ = writeln!(
            s,
            "delta    of bundle {} (id {}, created {}): install it on a site installed from that bundle, or make a full one with `bkbundle merge`",
            d.base, d.base_id, d.base_created
        );
        let _ = writeln!(
            s,
            "         needs from it: {} layer(s) ({} stored there), {} unchanged image(s), {} package(s), {} installer(s){}",
            d.layers,
            human(d.layer_bytes),
            d.unchanged_images.len(),
            d.packages.len(),
            d.installers.len(),
            if d.binary { ", bin/bkbundle" } else { "" }
        );
        for p in d
            .unchanged_images
            .iter()
            .chain(d.packages.iter())
            .chain(d.installers.iter())
        {
            let _ = writeln!(s, "           {p}");
        }
        let _ = writeln!(
            s,
            "         saves {} of {} ({:.1} %): stores {}",
            human(d.bytes_from_base),
            human(d.bytes_from_base.saturating_add(d.bytes_stored)),
            d.saved_percent,
            human(d.bytes_stored)
        );
    }

    fn render_images(&self, s: &mut String) {
        if self.without_layers {
            let _ = writeln!(s, "\n{}", images_without_layers(self.images.len()));
        } else {
            let _ = writeln!(s, "\nimages ({})", self.images.len());
        }
        let _ = writeln!(
            s,
            "  {:<44} {:<19} {:<12} {:>10} {:>10} {:>6} {:>6}",
            "REFERENCE", "ID", "PLATFORM", "SIZE", "STORED", "LAYERS", "SHARED"
        );
        for i in &self.images {
            let id = i.id.trim_start_matches("sha256:").chars().take(12).collect::<String>();
            let _ = writeln!(
                s,
                "  {:<44} {:<19} {:<12} {:>10} {:>10} {:>6} {:>6}",
                i.refs.join(", "),
                id,
                i.platform,
                human(i.size),
                human(i.stored),
                i.layers,
                i.shared_layers
            );
            if i.base_layers > 0 {
                let _ = writeln!(s, "  {:<44} {} of its layers left to the base", "", i.base_layers);
            }
        }
    }

    fn render_packages(&self, s: &mut String) {
        let _ = writeln!(s, "\npackages ({})", self.packages.len());
        for p in &self.packages {
            let where_ = match (&p.size, &p.inside) {
                (Some(n), _) => human(*n),
                (None, Some(i)) => format!("in {i}"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "  {:<10} {:<8} {:<7} {:<14} {:<10} {:<40} {}",
                p.kind, p.os, p.arch, p.object, p.version, p.name, where_
            );
        }
    }

    fn render_stack(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "\nstack ({} files{})",
            self.stack.len(),
            self.project
                .as_ref()
                .map(|p| format!(", compose project {p}"))
                .unwrap_or_default()
        );
        for f in &self.stack {
            let _ = writeln!(s, "  {f}");
        }
    }

    fn render_regions(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "\nregions: required keys {}",
            if self.regions.required.is_empty() {
                "(none)".into()
            } else {
                self.regions.required.join(", ")
            }
        );
        for (k, v) in &self.regions.env {
            let _ = writeln!(s, "  {k} = {v}");
        }
        for r in &self.regions.region {
            let _ = writeln!(
                s,
                "  region {:?}{}",
                r.name,
                if r.proxy_address.is_empty() {
                    String::new()
                } else {
                    format!(" via {}", r.proxy_address)
                }
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(without_layers: bool) -> InspectReport {
        InspectReport {
            bundle: "demo.bkb".into(),
            name: "demo".into(),
            version: "1".into(),
            description: String::new(),
            created: "2026-01-01T00:00:00Z".into(),
            created_by: "bkbundle".into(),
            compression: "zstd".into(),
            signed: false,
            parts: 1,
            without_layers,
            delta: None,
            images: vec![ImageRow {
                refs: vec!["bkbundle-demo/web:1".into()],
                id: format!("sha256:{}", "a".repeat(64)),
                platform: "linux/amd64".into(),
                size: 2048,
                stored: 300,
                layers: 2,
                shared_layers: 0,
                base_layers: 0,
            }],
            packages: vec![],
            installers: vec![],
            stack: vec![],
            project: None,
            regions: Regions::default(),
            sizes: Sizes::default(),
        }
    }

    #[test]
    fn a_bundle_without_layers_says_where_its_images_come_from() {
        let text = report(true).render();
        assert!(
            text.contains("\nimages: 1 (layers not in this bundle: install with --images-from REGISTRY)\n"),
            "{text}"
        );
        // The images are still listed, each with its id and layer count.
        assert!(
            text.contains("bkbundle-demo/web:1") && text.contains("aaaaaaaaaaaa"),
            "{text}"
        );
        let text = report(false).render();
        assert!(
            text.contains("\nimages (1)\n") && !text.contains("--images-from"),
            "{text}"
        );
        let v = serde_json::to_value(report(true)).unwrap();
        assert_eq!(v["without_layers"], true);
    }
}
