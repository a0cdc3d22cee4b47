//! Where things sit inside a bundle (docs/FORMAT.md): the one place that names the entries.
//!
//! Payload paths are built here (`stack/...`, `packages/...`, `installers/...`, `images/...`,
//! `bin/bkbundle`), and so are the descriptive files that describe the payload rather than being
//! part of it: the manifest, its signature and public key, and the `SHA256SUMS` that
//! `sha256sum -c` accepts.

use crate::manifest::{Compression, FileEntry};

/// The manifest.
pub const MANIFEST: &str = "bundle.toml";
/// The minisign signature over the manifest's bytes.
pub const SIGNATURE: &str = "bundle.toml.minisig";
/// The signer's public key, carried so that an unkeyed check still catches damage.
pub const PUBKEY: &str = "bundle.pub";
/// `sha256sum -c` input over every payload and descriptive file.
pub const SUMS: &str = "SHA256SUMS";
/// The bkbundle binary itself, so the offline host needs nothing else.
pub const BINARY: &str = "bin/bkbundle";

/// The files the format adds beside the payload: never listed in the manifest's `files`.
pub const DESCRIPTIVE: [&str; 4] = [MANIFEST, SIGNATURE, PUBKEY, SUMS];

const STACK: &str = "stack/";
const PACKAGES: &str = "packages/";
const INSTALLERS: &str = "installers/";
const IMAGES: &str = "images/";

/// Bundle path of a layer's payload, named by its diff id's hex.
pub fn layer_path(diff_hex: &str, ext: &str) -> String {
    format!("{IMAGES}layers/{diff_hex}.tar.{ext}")
}

/// How a layer payload is compressed, from its file name: `.tar.zst` zstd, `.tar.gz` gzip (a
/// layer fetched from a registry is stored as it was compressed there, whatever the bundle's
/// `compression`); `None` for any other name.
pub fn layer_compression(path: &str) -> Option<Compression> {
    if path.ends_with(".tar.zst") {
        Some(Compression::Zstd)
    } else if path.ends_with(".tar.gz") {
        Some(Compression::Gzip)
    } else {
        None
    }
}

/// Whether `path` is where [`layer_path`] puts a layer's payload.
pub fn is_layer_path(path: &str) -> bool {
    path.strip_prefix(IMAGES).is_some_and(|p| p.starts_with("layers/"))
}

/// Bundle path of an image config, named by the image id's hex.
pub fn config_path(id_hex: &str) -> String {
    format!("{IMAGES}configs/{id_hex}.json")
}

/// Bundle path of a package file.
pub fn package_path(file_name: &str) -> String {
    format!("{PACKAGES}{file_name}")
}

/// Bundle path of a controller installer program: per OS and arch, since the same file name
/// (`bklite-controller-installer`) exists for several architectures.
pub fn installer_path(os: &str, arch: &str, file_name: &str) -> String {
    format!("{INSTALLERS}{os}/{arch}/{file_name}")
}

/// Bundle path of a stack file, `rel` relative to the stack directory.
pub fn stack_path(rel: &str) -> String {
    format!("{STACK}{rel}")
}

/// A stack file's path relative to the install target (the bundle path without `stack/`).
pub fn stack_relative(path: &str) -> &str {
    path.strip_prefix(STACK).unwrap_or(path)
}

/// What part of the bundle a payload belongs to, for size summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Images,
    Packages,
    Installers,
    Stack,
    Binary,
}

/// The section of payload `path`, `None` for anything else.
pub fn section(path: &str) -> Option<Section> {
    if path.starts_with(IMAGES) {
        Some(Section::Images)
    } else if path.starts_with(PACKAGES) {
        Some(Section::Packages)
    } else if path.starts_with(INSTALLERS) {
        Some(Section::Installers)
    } else if path.starts_with(STACK) {
        Some(Section::Stack)
    } else if path == BINARY {
        Some(Section::Binary)
    } else {
        None
    }
}

/// The `SHA256SUMS` text: one `<hex>  <path>` line per payload file, then the manifest's, then
/// the `extra` descriptive files' (signature and public key, when signed). Its one writer, used
/// by pack and by verify (which compares the bundle's with it).
pub fn sha256sums(files: &[FileEntry], manifest_sha256: &str, extra: &[(&str, String)]) -> String {
    sha256sums_of(files, MANIFEST, manifest_sha256, extra)
}

/// [`sha256sums`] for an archive whose manifest is `manifest` (a backup's `backup.toml`).
pub fn sha256sums_of(files: &[FileEntry], manifest: &str, manifest_sha256: &str, extra: &[(&str, String)]) -> String {
    let mut out = String::new();
    for f in files {
        out.push_str(&format!("{}  {}\n", f.sha256, f.path));
    }
    out.push_str(&format!("{manifest_sha256}  {manifest}\n"));
    for (path, sha) in extra {
        out.push_str(&format!("{sha}  {path}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_sections_agree() {
        assert_eq!(section(&layer_path("ab", "zst")), Some(Section::Images));
        assert_eq!(layer_compression(&layer_path("ab", "zst")), Some(Compression::Zstd));
        assert_eq!(layer_compression(&layer_path("ab", "gz")), Some(Compression::Gzip));
        assert_eq!(layer_compression("images/layers/ab.tar"), None);
        assert_eq!(section(&config_path("ab")), Some(Section::Images));
        assert_eq!(section(&package_path("a.zip")), Some(Section::Packages));
        assert_eq!(section(&stack_path("docker-compose.yml")), Some(Section::Stack));
        assert_eq!(
            installer_path("linux", "x86_64", "bklite-controller-installer"),
            "installers/linux/x86_64/bklite-controller-installer"
        );
        assert_eq!(
            section(&installer_path("windows", "generic", "a.exe")),
            Some(Section::Installers)
        );
        assert_eq!(section(BINARY), Some(Section::Binary));
        assert_eq!(section(MANIFEST), None);
        assert_eq!(stack_relative(&stack_path("conf/a.env")), "conf/a.env");
    }
}
