//! Preflight's staging copy of the rendered stack (compose checks it with `config` before
//! anything is laid out). The copy holds the rendered `.env`, i.e. the stack's secrets, so:
//! - it lives in the target's own 0700 state directory, `TARGET/.bkbundle/staging-<pid>/`, when
//!   that exists; else (a first install, nothing may be created yet) in a fresh directory with an
//!   unpredictable name made by mkdtemp(3), `$TMPDIR/bkbundle-preflight-<pid>-XXXXXX`, mode 0700;
//! - every file in it is 0600, every directory 0700;
//! - it is removed when the [`Staging`] guard drops (every return, error or panic), and a run
//!   removes the staging directories that killed runs left (their pid no longer runs).

use crate::error::{Error, IoContext, Result};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const IN_TARGET: &str = "staging-";
const IN_TMP: &str = "bkbundle-preflight-";

/// A private staging directory, removed on drop.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// A new staging directory for `target` (see the module documentation).
    pub fn new(target: &Path) -> Result<Staging> {
        let pid = std::process::id();
        let state = target.join(super::journal::DIR);
        let is_private_dir = std::fs::symlink_metadata(&state)
            .map(|m| m.is_dir() && m.uid() == euid())
            .unwrap_or(false);
        let dir = if is_private_dir {
            let state = super::journal::state_dir(target)?; // makes sure it is 0700
            let dir = state.join(format!("{IN_TARGET}{pid}"));
            if dir.exists() {
                std::fs::remove_dir_all(&dir).io_ctx("cannot remove old staging directory", &dir)?;
            }
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .io_ctx("cannot create staging directory", &dir)?;
            dir
        } else {
            mkdtemp(&std::env::temp_dir().join(format!("{IN_TMP}{pid}-XXXXXX")))?
        };
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .io_ctx("cannot set permissions of", &dir)?;
        Ok(Staging { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Write `rel` (a relative path) with mode 0600, its directories 0700.
    pub fn write(&self, rel: &str, content: &[u8]) -> Result<PathBuf> {
        use std::io::Write;
        let p = self.dir.join(rel);
        if let Some(d) = p.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .io_ctx("cannot create", d)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .io_ctx("cannot write", &p)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .io_ctx("cannot set permissions of", &p)?;
        f.write_all(content).io_ctx("cannot write", &p)?;
        Ok(p)
    }

    /// Copy the file `from` in as `rel` (0600).
    pub fn copy_in(&self, from: &Path, rel: &str) -> Result<()> {
        let content = std::fs::read(from).io_ctx("cannot read", from)?;
        self.write(rel, &content).map(|_| ())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// mkdtemp(3): a new directory, mode 0700, whose name ends in six unpredictable characters
/// (`template` ends in `XXXXXX`).
fn mkdtemp(template: &Path) -> Result<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let mut bytes = template.as_os_str().as_encoded_bytes().to_vec();
    bytes.push(0);
    // SAFETY: `bytes` is a writable NUL-terminated buffer that mkdtemp fills in place.
    let p = unsafe { libc::mkdtemp(bytes.as_mut_ptr() as *mut libc::c_char) };
    if p.is_null() {
        return Err(Error::io(
            "cannot create a staging directory in",
            template.parent().unwrap_or(Path::new("/")),
            std::io::Error::last_os_error(),
        ));
    }
    bytes.pop();
    Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
}

/// Remove the staging directories that runs which no longer run left behind (killed during
/// preflight): `TARGET/.bkbundle/staging-<pid>` and this user's `$TMPDIR/bkbundle-preflight-<pid>-*`.
/// Returns what was removed.
pub fn remove_stale(target: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let me = std::process::id();
    let mut sweep = |dir: &Path, prefix: &str, check_owner: bool| {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(prefix) else {
                continue;
            };
            let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
            let Some(pid) = pid else { continue };
            if pid == me || crate::lock::pid_alive(pid) {
                continue;
            }
            let path = e.path();
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if !m.is_dir() || (check_owner && m.uid() != euid()) {
                continue;
            }
            if std::fs::remove_dir_all(&path).is_ok() {
                removed.push(path);
            }
        }
    };
    sweep(&target.join(super::journal::DIR), IN_TARGET, false);
    sweep(&std::env::temp_dir(), IN_TMP, true);
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn staging_in_an_installed_target_is_private_and_removed_on_drop() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join(".bkbundle")).unwrap();
        std::fs::set_permissions(t.path().join(".bkbundle"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = Staging::new(t.path()).unwrap();
        assert_eq!(
            s.path(),
            t.path().join(format!(".bkbundle/staging-{}", std::process::id()))
        );
        let env = s.write(".env", b"SECRET=x\n").unwrap();
        let nested = s.write("conf/a/b.yml", b"x").unwrap();
        assert_eq!(
            mode(&t.path().join(".bkbundle")),
            0o700,
            "the state dir is made private"
        );
        assert_eq!(mode(s.path()), 0o700);
        assert_eq!(mode(&env), 0o600);
        assert_eq!(mode(&nested), 0o600);
        assert_eq!(mode(nested.parent().unwrap()), 0o700);
        let dir = s.path().to_path_buf();
        drop(s);
        assert!(!dir.exists());
    }

    #[test]
    fn staging_for_a_new_target_is_unpredictable_and_creates_nothing_there() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("new");
        let a = Staging::new(&target).unwrap();
        let b = Staging::new(&target).unwrap();
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!("bkbundle-preflight-{}-", std::process::id())),
            "{name}"
        );
        assert_eq!(mode(a.path()), 0o700);
        assert!(!target.exists());
        let dir = a.path().to_path_buf();
        drop(a);
        assert!(!dir.exists());
    }

    #[test]
    fn leftovers_of_dead_runs_are_removed_and_live_ones_kept() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join(".bkbundle");
        std::fs::create_dir(&state).unwrap();
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let dead = c.id();
        c.wait().unwrap();
        std::fs::create_dir(state.join(format!("staging-{dead}"))).unwrap();
        std::fs::write(state.join(format!("staging-{dead}/.env")), "S=1").unwrap();
        let live = state.join(format!("staging-{}", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        std::fs::write(state.join("journal.json"), "{}").unwrap();
        let removed = remove_stale(t.path());
        assert!(removed.contains(&state.join(format!("staging-{dead}"))), "{removed:?}");
        assert!(!state.join(format!("staging-{dead}")).exists());
        assert!(live.exists(), "our own is not a leftover");
        assert!(state.join("journal.json").exists());
    }
}
