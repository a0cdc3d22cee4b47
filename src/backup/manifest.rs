//! The backup's manifest, `backup.toml`: what a `.bkbak` holds, in the bundle's style (a
//! versioned TOML file listing every payload with its size and SHA-256, a `SHA256SUMS` that
//! `sha256sum -c` accepts after extraction, an optional minisign signature). The archive itself
//! is written and read by [`crate::bundle`]'s code, which knows the framing.

use crate::bundle::Document;
use crate::error::{Error, Kind, Result};
use crate::install::journal::BundleId;
use crate::manifest::{is_safe_bundle_path, FileEntry, ManifestError};
use serde::{Deserialize, Serialize};

pub const FORMAT: u32 = crate::manifest::FORMAT;
pub const MANIFEST: &str = "backup.toml";
pub const SIGNATURE: &str = "backup.toml.minisig";
pub const PUBKEY: &str = "backup.pub";

/// Where each part sits in the archive.
pub const SITE_DIR: &str = "site/";
pub const DATABASE_DIR: &str = "database/";
pub const OBJECTS_DIR: &str = "objects/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupManifest {
    pub format: u32,
    pub backup: BackupInfo,
    /// The bundle the site runs (from its install journal): restore needs that bundle.
    pub bundle: BundleId,
    /// Every payload file, in archive order.
    #[serde(default)]
    pub files: Vec<FileEntry>,
    /// The target directory's files (stack, `.env`, certificates, the journal).
    #[serde(default)]
    pub site: Vec<SiteFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<Database>,
    #[serde(default)]
    pub objects: Vec<ObjectEntry>,
    /// Present when every payload is encrypted (see [`super::seal`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<super::seal::Encryption>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupInfo {
    pub created: String,
    pub created_by: String,
    /// The host it was taken on (its name), for the operator.
    #[serde(default)]
    pub host: String,
    /// The target directory it was taken from.
    pub target: String,
    /// The compose project.
    pub project: String,
    /// Always true: `.env`, the site CA's key and the database hold the site's secrets.
    pub secrets: bool,
    /// How the database dumps are compressed.
    pub compression: String,
}

/// One file of the target directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteFile {
    /// Relative to the target directory.
    pub path: String,
    /// The payload in the archive.
    pub file: String,
    /// Permission bits.
    pub mode: u32,
    /// SHA-256 of the file's content (the payload's own digest differs when it is encrypted).
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// The compose service that runs PostgreSQL, and its image.
    pub service: String,
    pub image: String,
    pub server_version: String,
    /// The role the dumps were taken as (restored as the same).
    pub user: String,
    #[serde(default)]
    pub dumps: Vec<Dump>,
}

/// One database: `pg_dump -Fc -Z0` of it, compressed with zstd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dump {
    pub name: String,
    pub file: String,
    /// The dump's bytes before compression.
    pub size: u64,
    /// Ordinary tables when it was taken.
    pub tables: u64,
}

/// One object of the NATS object store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectEntry {
    pub bucket: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub size: u64,
    /// As the store records it: `SHA-256=` and URL-safe base64.
    pub digest: String,
    /// The rest of the object's meta (headers, metadata, options), as JSON.
    #[serde(default)]
    pub meta: String,
    pub file: String,
}

impl BackupManifest {
    pub fn parse(text: &str, origin: &str) -> std::result::Result<BackupManifest, ManifestError> {
        crate::manifest::parse_checked(text, origin, "backup", BackupManifest::problems)
    }

    /// The one writer of `backup.toml`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("backup manifest serialises")
    }

    /// What makes a manifest unusable: a part that names a payload the archive does not list, a
    /// site path that would leave the target directory, a payload path that is not plain.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let listed: std::collections::BTreeSet<&str> = self.files.iter().map(|f| f.path.as_str()).collect();
        for f in &self.files {
            if !is_safe_bundle_path(&f.path) {
                p.push(format!("files: {:?} is not a plain relative path", f.path));
            }
            if !crate::digest::is_sha256_hex(&f.sha256) {
                p.push(format!("files: {}: sha256 {:?} is not 64 hex digits", f.path, f.sha256));
            }
        }
        let mut need = |what: String, file: &str| {
            if !listed.contains(file) {
                p.push(format!("{what}: its payload {file} is not listed in [[files]]"));
            }
        };
        for s in &self.site {
            need(format!("site file {}", s.path), &s.file);
        }
        for d in self.database.iter().flat_map(|d| d.dumps.iter()) {
            need(format!("database {}", d.name), &d.file);
        }
        for o in &self.objects {
            need(format!("object {} of bucket {}", o.name, o.bucket), &o.file);
        }
        if let Some(e) = &self.encryption {
            need("[encryption] key".into(), &e.key);
            if e.method != "age" {
                p.push(format!("[encryption] method {:?}: only \"age\" is known", e.method));
            }
        }
        for s in &self.site {
            if !is_safe_bundle_path(&s.path) {
                p.push(format!(
                    "site file {:?}: not a plain path inside the target directory",
                    s.path
                ));
            }
        }
        p
    }

    /// The payload's size in the archive.
    pub fn stored(&self, file: &str) -> u64 {
        self.files.iter().find(|f| f.path == file).map(|f| f.size).unwrap_or(0)
    }
}

impl Document for BackupManifest {
    const KIND: &'static str = "backup";
    const MANIFEST: &'static str = MANIFEST;
    const SIGNATURE: &'static str = SIGNATURE;
    const PUBKEY: &'static str = PUBKEY;
    const VERIFY: &'static str = "bkbundle backup verify";
    fn parse(text: &str, origin: &str) -> Result<Self> {
        BackupManifest::parse(text, origin).map_err(|e| match e {
            ManifestError::Unsupported { .. } => Error::new(Kind::Unsupported, e.to_string())
                .hint("restore it with the bkbundle that took it (or a newer one)"),
            other => Error::new(Kind::Bundle, other.to_string())
                .hint("the backup's manifest is damaged: copy the backup again from where it was kept"),
        })
    }
    fn files(&self) -> &[FileEntry] {
        &self.files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BackupManifest {
        BackupManifest {
            format: FORMAT,
            backup: BackupInfo {
                created: "2026-12-07T00:00:00Z".into(),
                created_by: "bkbundle test".into(),
                host: "h".into(),
                target: "/opt/bklite".into(),
                project: "bklite".into(),
                secrets: true,
                compression: "zstd".into(),
            },
            bundle: BundleId {
                name: "bklite".into(),
                version: "3.1.0".into(),
                manifest_sha256: "ab".repeat(32),
            },
            files: vec![FileEntry {
                path: "site/.env".into(),
                size: 3,
                sha256: "cd".repeat(32),
            }],
            site: vec![SiteFile {
                path: ".env".into(),
                file: "site/.env".into(),
                mode: 0o600,
                sha256: "cd".repeat(32),
            }],
            database: None,
            objects: vec![],
            encryption: None,
        }
    }

    #[test]
    fn round_trips_and_refuses_what_it_cannot_use() {
        let m = sample();
        assert_eq!(BackupManifest::parse(&m.to_toml(), "t").unwrap(), m);
        let mut bad = sample();
        bad.site[0].path = "../etc/passwd".into();
        bad.objects.push(ObjectEntry {
            bucket: "b".into(),
            name: "k".into(),
            description: String::new(),
            size: 1,
            digest: "SHA-256=x".into(),
            meta: String::new(),
            file: "objects/b/0".into(),
        });
        let e = BackupManifest::parse(&bad.to_toml(), "t").unwrap_err().to_string();
        assert!(e.contains("\"../etc/passwd\": not a plain path"), "{e}");
        assert!(
            e.contains("object k of bucket b: its payload objects/b/0 is not listed"),
            "{e}"
        );
        let newer = m.to_toml().replacen("format = 1", "format = 2", 1);
        let e = <BackupManifest as Document>::parse(&newer, "t").unwrap_err();
        assert_eq!(e.kind, Kind::Unsupported, "{}", e.message);
    }
}
