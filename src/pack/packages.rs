//! Agent packages, installers, stack files and the bkbundle binary into the bundle.

use super::artifacts::Extracted;
use super::inputs::Checked;
use crate::bundle::{layout, BundleWriter};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{Installer, Package, Provenance, Recipe, RecipePackage, Stack};
use crate::progress::{ProgressReader, Reporter};
use std::fs;
use std::path::Path;

/// Every recipe package: its file written (with progress), or for a collector inside a
/// controller package the entry's digest taken when the controller was checked; and where the
/// packages built from images came from.
pub(super) fn write_packages(
    checked: &Checked,
    extracted: &Extracted,
    writer: &mut BundleWriter,
    reporter: &dyn Reporter,
) -> Result<(Vec<Package>, Vec<Provenance>)> {
    let mut packages = Vec::new();
    let mut provenance = Vec::new();
    for (i, (p, path)) in checked.packages.iter().enumerate() {
        let name = package_name(p);
        let (file, digest) = match path {
            Some(path) => {
                let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                let task = reporter.task(&format!("package {name}"), Some(size));
                let mut f = fs::File::open(path).io_ctx("cannot open package", path)?;
                let entry = writer.add_reader(
                    &layout::package_path(&name),
                    0o644,
                    &mut ProgressReader {
                        inner: &mut f,
                        task: &*task,
                    },
                )?;
                task.finish();
                (Some(entry.path), Some((entry.sha256, entry.size)))
            }
            None => (
                None,
                match (&p.from, &p.entry) {
                    (Some(from), Some(entry)) => checked.listings.get(from).and_then(|l| l.digest(entry)).cloned(),
                    _ => None,
                },
            ),
        };
        if let (Some(built), Some(file)) = (extracted.built.get(&i), &file) {
            provenance.push(Provenance {
                file: file.clone(),
                image: built.image.clone(),
                image_id: built.image_id.clone(),
                paths: built.paths.clone(),
            });
        }
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
    Ok((packages, provenance))
}

/// Every installer, stored as it is under its OS and arch, with its provenance.
pub(super) fn write_installers(
    extracted: &Extracted,
    writer: &mut BundleWriter,
    reporter: &dyn Reporter,
) -> Result<Vec<Installer>> {
    let mut out = Vec::new();
    for inst in &extracted.installers {
        let size = fs::metadata(&inst.path).map(|m| m.len()).unwrap_or(0);
        let task = reporter.task(&format!("installer {}", inst.name), Some(size));
        let mut f = fs::File::open(&inst.path).io_ctx("cannot open installer", &inst.path)?;
        let bundle_path = layout::installer_path(inst.os.as_str(), &inst.arch, &inst.name);
        let entry = writer.add_reader(
            &bundle_path,
            0o755,
            &mut ProgressReader {
                inner: &mut f,
                task: &*task,
            },
        )?;
        task.finish();
        let (image, image_id, path) = match &inst.origin {
            Some((image, id, path)) => (Some(image.clone()), Some(id.clone()), Some(path.clone())),
            None => (None, None, None),
        };
        out.push(Installer {
            name: inst.name.clone(),
            os: inst.os,
            arch: inst.arch.clone(),
            file: entry.path,
            size: entry.size,
            sha256: entry.sha256,
            image,
            image_id,
            path,
        });
    }
    Ok(out)
}

/// A package's name: its file's (or the archive built from an image), or for a collector
/// inside a controller package its binary's.
fn package_name(p: &RecipePackage) -> String {
    match p.file_name() {
        Some(n) => n,
        None => p
            .entry
            .as_deref()
            .and_then(|e| e.rsplit('/').next())
            .unwrap_or_default()
            .to_string(),
    }
}

/// The stack directory's files, executables keeping their bit.
pub(super) fn write_stack(recipe: &Recipe, checked: &Checked, writer: &mut BundleWriter) -> Result<Option<Stack>> {
    let (Some(s), Some((dir, files))) = (&recipe.stack, &checked.stack) else {
        return Ok(None);
    };
    let mut paths = Vec::new();
    for rel in files {
        let src = dir.join(rel);
        let mut f = fs::File::open(&src).io_ctx("cannot open stack file", &src)?;
        let e = writer.add_reader(&layout::stack_path(rel), file_mode(&src), &mut f)?;
        paths.push(e.path);
    }
    Ok(Some(Stack {
        project: s.project.clone().unwrap_or_else(|| recipe.bundle.name.clone()),
        compose: layout::stack_path(&s.compose),
        env_template: s.env_template.as_deref().map(layout::stack_path),
        files: paths,
        nats_tls: s.nats_tls,
    }))
}

/// The bkbundle binary the bundle carries: `--binary`, else the running one.
pub(super) fn carried_binary(opts: &super::PackOptions) -> Result<std::path::PathBuf> {
    match &opts.binary {
        Some(b) => Ok(b.clone()),
        None => std::env::current_exe()
            .map_err(|e| Error::internal(format!("cannot locate the running bkbundle binary: {e}"))),
    }
}

/// The tool itself, so the offline host needs nothing else (checked portable by the caller).
pub(super) fn write_binary(exe: &Path, writer: &mut BundleWriter) -> Result<()> {
    let mut f = fs::File::open(exe).io_ctx("cannot read the bkbundle binary", exe)?;
    writer.add_reader(layout::BINARY, 0o755, &mut f)?;
    Ok(())
}

fn file_mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    match fs::metadata(p) {
        Ok(m) if m.permissions().mode() & 0o111 != 0 => 0o755,
        _ => 0o644,
    }
}
