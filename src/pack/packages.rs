//! Agent packages, stack files and the bkbundle binary into the bundle.

use super::inputs::Checked;
use crate::bundle::{layout, BundleWriter};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{Package, Recipe, RecipePackage, Stack};
use crate::progress::{Reporter, Task};
use std::fs;
use std::io::Read;
use std::path::Path;

/// Every recipe package: its file written (with progress), or for a collector inside a
/// controller package the entry's digest taken when the controller was checked.
pub(super) fn write_packages(
    checked: &Checked,
    writer: &mut BundleWriter,
    reporter: &dyn Reporter,
) -> Result<Vec<Package>> {
    let mut packages = Vec::new();
    for (p, path) in &checked.packages {
        let name = package_name(p);
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
    Ok(packages)
}

/// A package's name: its file's, or for a collector inside a controller package its binary's.
fn package_name(p: &RecipePackage) -> String {
    match (&p.file, &p.from) {
        (Some(f), _) => f
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
        _ => p
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

/// The tool itself, so the offline host needs nothing else.
pub(super) fn write_binary(writer: &mut BundleWriter) -> Result<()> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::internal(format!("cannot locate the running bkbundle binary: {e}")))?;
    let mut f = fs::File::open(&exe).io_ctx("cannot read the bkbundle binary", &exe)?;
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

struct ProgressRead<'a, R>(&'a mut R, &'a dyn Task);

impl<R: Read> Read for ProgressRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.advance(n as u64);
        Ok(n)
    }
}
