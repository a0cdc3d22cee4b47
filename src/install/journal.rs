//! The install journal, `<target>/.bkbundle/journal.json`: which bundle was installed here, which
//! steps of its install completed, the digest of every file as bkbundle last wrote it (to tell an
//! operator's edit from our own file), and a history of runs. Written atomically after each step,
//! so a killed install resumes from the last completed step.

use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DIR: &str = ".bkbundle";
pub const FILE: &str = "journal.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleId {
    pub name: String,
    pub version: String,
    pub manifest_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub bundle: BundleId,
    pub started: String,
    pub finished: Option<String>,
    pub outcome: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Journal {
    pub bundle: Option<BundleId>,
    /// The compose project the stack runs as (for `doctor`; absent in journals written before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The compose services of the stack bkbundle last started here (to tell its containers from
    /// others in the same project; absent in journals written before).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// The registry the images were pulled from (`install --images-from`); absent when they were
    /// loaded from the bundle (and in journals written before). `doctor` checks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_from: Option<String>,
    /// How install reached that registry, so that `doctor` reaches it the same way without being
    /// told again. Holds no secret: a password is only ever a file's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_access: Option<RegistryAccess>,
    /// Steps completed for `bundle`.
    pub completed: Vec<String>,
    /// Path relative to the target → sha256 of the content bkbundle last wrote there.
    pub files: BTreeMap<String, String>,
    pub history: Vec<Run>,
}

/// The journal's record of how a registry was reached (`install --images-from`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryAccess {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

impl RegistryAccess {
    /// What `access` says, its files made absolute (a later run may start elsewhere).
    pub fn of(access: &crate::registry::Access) -> RegistryAccess {
        let abs = |p: &Option<PathBuf>| p.as_ref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
        RegistryAccess {
            ca_file: abs(&access.ca_file),
            insecure: access.insecure,
            username: access.username.clone(),
            password_file: abs(&access.password_file),
        }
    }

    /// As the install config's `[registry]` section (without its url), to merge access under.
    pub fn settings(&self) -> crate::registry::Settings {
        crate::registry::Settings {
            url: None,
            ca_file: self.ca_file.clone(),
            insecure: self.insecure,
            username: self.username.clone(),
            password_file: self.password_file.clone(),
        }
    }
}

pub fn path(target: &Path) -> PathBuf {
    target.join(DIR).join(FILE)
}

/// The target's state directory `TARGET/.bkbundle` (journal, lock, staging), created if needed and
/// kept private: mode 0700, since staging copies of `.env` hold the stack's secrets.
pub fn state_dir(target: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = target.join(DIR);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {
            if m.permissions().mode() & 0o777 != 0o700 {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .io_ctx("cannot set permissions of", &dir)?;
            }
        }
        Ok(_) => {
            return Err(Error::input(format!(
                "{} is not a directory (bkbundle keeps its journal and lock there)",
                dir.display()
            ))
            .hint("move it aside, then re-run"))
        }
        Err(_) => {
            std::fs::create_dir_all(target).io_ctx("cannot create target directory", target)?;
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("cannot create", &dir, e)),
            }
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .io_ctx("cannot set permissions of", &dir)?;
        }
    }
    Ok(dir)
}

impl Journal {
    pub fn load(target: &Path) -> Result<Journal> {
        let p = path(target);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::input(format!("install journal {} is unreadable: {e}", p.display()))
                    .hint("it is bkbundle's record of this install; restore it from a backup, or move it aside to start the journal afresh (files you edited will then be kept, not overwritten)")
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(e) => Err(Error::io("cannot read install journal", &p, e)),
        }
    }

    pub fn save(&self, target: &Path) -> Result<()> {
        let p = path(target);
        state_dir(target)?;
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::internal(format!("journal: {e}")))?;
        write_atomic(&p, &text, 0o600)
    }

    pub fn is_done(&self, step: &str) -> bool {
        self.completed.iter().any(|s| s == step)
    }

    pub fn mark(&mut self, step: &str) {
        if !self.is_done(step) {
            self.completed.push(step.to_string());
        }
    }
}

/// Write through a temporary file in the same directory and rename: a reader (or a killed run)
/// never sees half a file.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    write_atomic_with(path, mode, |f, tmp| f.write_all(data).io_ctx("cannot write", tmp))
}

/// [`write_atomic`] of what `fill` writes into the temporary file (given with its path, for
/// errors): streamed, never whole in memory. A failing `fill` leaves the old file as it was.
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut std::fs::File, &Path) -> Result<()>,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_file_name(format!(
        ".{}.bkbundle-tmp",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .io_ctx("cannot write", &tmp)?;
    if let Err(e) = fill(&mut f, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    f.sync_all().io_ctx("cannot write", &tmp)?;
    // `mode` on open applies only to new files (and is masked by the umask): set it explicitly.
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .io_ctx("cannot set permissions of", &tmp)?;
    std::fs::rename(&tmp, path).io_ctx("cannot write", path)
}
