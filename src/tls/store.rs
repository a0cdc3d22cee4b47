//! The site's TLS files in the install target, and the operator's files named in `[tls]`: the
//! only file I/O of [`crate::tls`].
//!
//! | file | mode | what |
//! |---|---|---|
//! | `.bkbundle/tls/ca.key` | 0600 (dir 0700) | the generated CA: its private key, then its certificate |
//! | `certs/ca.crt` | 0644 | the CA the stack and the agents trust (generated or the operator's) |
//! | `certs/nats-server.crt` | 0644 | the NATS server certificate |
//! | `certs/nats-server.key` | 0600 | its private key |
//!
//! Every write goes through a new temporary file in the same directory, created with the final
//! mode (so a key is never readable by others, not even for a moment), synced, then renamed over
//! the file; a file that already holds the same bytes is not written at all. The generated CA key
//! is written once and never replaced.

use super::cert;
use super::issue::{Material, SiteCa};
use crate::error::{Error, IoContext, Result};
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Paths relative to the install target.
pub const CA_KEY: &str = ".bkbundle/tls/ca.key";
pub const CA_CERT: &str = "certs/ca.crt";
pub const SERVER_CERT: &str = "certs/nats-server.crt";
pub const SERVER_KEY: &str = "certs/nats-server.key";

/// Operator's files larger than this are not certificates or keys (and are not read whole).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// What the install target holds, as [`load`] found it (each `None` when absent).
pub struct Existing {
    /// The CA bkbundle generated here (`.bkbundle/tls/ca.key`).
    pub site_ca: Option<SiteCa>,
    pub ca_pem: Option<String>,
    pub cert_pem: Option<String>,
    pub key_pem: Option<Zeroizing<String>>,
}

/// An operator's own CA, certificate and key, read from the files `[tls]` names.
pub struct OperatorFiles {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

impl OperatorFiles {
    /// What the target gets: the operator's files, copied.
    pub fn material(&self) -> Material {
        Material {
            ca_pem: self.ca_pem.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

// By hand: a private key is never formatted.
impl fmt::Debug for Existing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Existing")
            .field("site_ca", &self.site_ca)
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &self.key_pem.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl fmt::Debug for OperatorFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OperatorFiles")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Read the operator's CA, certificate and key (each must exist and be text).
pub fn read_operator(ca_file: &Path, cert_file: &Path, key_file: &Path) -> Result<OperatorFiles> {
    let read = |what: &str, path: &Path| -> Result<Zeroizing<String>> {
        let len = std::fs::metadata(path)
            .map_err(|e| Error::io(&format!("cannot read [tls] {what}"), path, e))?
            .len();
        if len > MAX_PEM_BYTES {
            return Err(Error::input(format!(
                "[tls] {what} {}: {len} bytes, not a PEM certificate or key (at most {MAX_PEM_BYTES})",
                path.display()
            )));
        }
        let bytes = Zeroizing::new(std::fs::read(path).io_ctx(&format!("cannot read [tls] {what}"), path)?);
        match std::str::from_utf8(&bytes) {
            Ok(text) => Ok(Zeroizing::new(text.to_string())),
            Err(_) => Err(Error::input(format!("[tls] {what} {}: not PEM text", path.display()))
                .hint("give the file in PEM form (`openssl x509 -inform der -in FILE -out FILE.pem`)")),
        }
    };
    Ok(OperatorFiles {
        ca_pem: read("ca_file", ca_file)?.to_string(),
        cert_pem: read("cert_file", cert_file)?.to_string(),
        key_pem: read("key_file", key_file)?,
        ca_file: ca_file.to_path_buf(),
        cert_file: cert_file.to_path_buf(),
        key_file: key_file.to_path_buf(),
    })
}

/// A file's text, `None` when it does not exist.
fn read_optional(target: &Path, rel: &str) -> Result<Option<Zeroizing<String>>> {
    let path = target.join(rel);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            match std::str::from_utf8(&bytes) {
                Ok(text) => Ok(Some(Zeroizing::new(text.to_string()))),
                Err(_) => Err(Error::input(format!("{}: not PEM text", path.display()))
                    .hint("move it aside so that bkbundle writes it again, or give a PEM file")),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("cannot read", &path, e)),
    }
}

/// What the target holds; `None` when it holds none of the files.
pub fn load(target: &Path) -> Result<Option<Existing>> {
    let existing = Existing {
        site_ca: read_optional(target, CA_KEY)?
            .map(|text| split_site_ca(target, &text))
            .transpose()?,
        ca_pem: read_optional(target, CA_CERT)?.map(|t| t.to_string()),
        cert_pem: read_optional(target, SERVER_CERT)?.map(|t| t.to_string()),
        key_pem: read_optional(target, SERVER_KEY)?,
    };
    let none = existing.site_ca.is_none()
        && existing.ca_pem.is_none()
        && existing.cert_pem.is_none()
        && existing.key_pem.is_none();
    Ok(if none { None } else { Some(existing) })
}

/// `.bkbundle/tls/ca.key` holds the CA's key then its certificate: split and check they agree.
fn split_site_ca(target: &Path, text: &str) -> Result<SiteCa> {
    let path = target.join(CA_KEY);
    let damaged = |why: String| {
        Error::input(format!("{}: {why}", path.display())).hint(format!(
            "restore it from a backup of {}: agents trust the CA it holds (never delete it to start over \
             unless every agent is to get the new CA)",
            target.display()
        ))
    };
    let at = text
        .find("-----BEGIN CERTIFICATE-----")
        .ok_or_else(|| damaged("no CA certificate after the key".into()))?;
    let ca = SiteCa {
        key_pem: Zeroizing::new(text[..at].to_string()),
        cert_pem: text[at..].to_string(),
    };
    match super::key_matches(&ca.cert_pem, &ca.key_pem) {
        Ok(true) => Ok(ca),
        Ok(false) => Err(damaged("its key and certificate do not belong together".into())),
        Err(e) => Err(damaged(e)),
    }
}

/// Write `material` into the target: with `site_ca`, the CA bkbundle generated (its key written
/// once: a different one already there is refused); without, an operator's files. Files already
/// holding the same bytes are left alone.
pub fn save(target: &Path, material: &Material, site_ca: Option<&SiteCa>) -> Result<()> {
    if let Some(ca) = site_ca {
        if !cert::same_certificate(&material.ca_pem, &ca.cert_pem) {
            return Err(Error::internal("the material to save is not from the site CA given"));
        }
        if let Some(published) = read_optional(target, CA_CERT)? {
            if !cert::same_certificate(&published, &ca.cert_pem) {
                return Err(Error::input(format!(
                    "{}: holds a CA bkbundle did not generate; not replacing it",
                    target.join(CA_CERT).display()
                ))
                .hint("name it with cert_file and key_file in [tls] of the install config, or move it aside"));
            }
        }
        save_site_ca(target, ca)?;
    }
    let certs = target.join("certs");
    make_dir(&certs, 0o755)?;
    write_if_changed(&target.join(CA_CERT), material.ca_pem.as_bytes(), 0o644)?;
    // The key before the certificate: a run killed in between leaves a pair that does not match,
    // which the next run re-issues, never a certificate whose key is gone.
    write_if_changed(&target.join(SERVER_KEY), material.key_pem.as_bytes(), 0o600)?;
    write_if_changed(&target.join(SERVER_CERT), material.cert_pem.as_bytes(), 0o644)
}

fn save_site_ca(target: &Path, ca: &SiteCa) -> Result<()> {
    let state = crate::install::journal::state_dir(target)?;
    let dir = state.join("tls");
    make_dir(&dir, 0o700)?;
    let path = target.join(CA_KEY);
    let content = Zeroizing::new(format!("{}{}", ca.key_pem.as_str(), ca.cert_pem));
    match read_optional(target, CA_KEY)? {
        Some(old) if old.as_bytes() == content.as_bytes() => Ok(()),
        Some(_) => Err(Error::internal(format!(
            "{}: a site CA exists already; it is never replaced",
            path.display()
        ))),
        None => write_atomic(&path, content.as_bytes(), 0o600),
    }
}

/// Create `dir` (and its parents) with `mode` when it does not exist; an existing one is kept as
/// it is, except that a private one (0700) is made private again.
fn make_dir(dir: &Path, mode: u32) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {
            if mode == 0o700 && m.permissions().mode() & 0o777 != 0o700 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .io_ctx("cannot set permissions of", dir)?;
            }
            Ok(())
        }
        Ok(_) => Err(Error::input(format!("{} is not a directory", dir.display())).hint("move it aside, then re-run")),
        Err(_) => {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent).io_ctx("cannot create", parent)?;
            }
            match std::fs::DirBuilder::new().mode(mode).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("cannot create", dir, e)),
            }
            // The umask may have narrowed the mode: set it as wanted.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .io_ctx("cannot set permissions of", dir)
        }
    }
}

fn write_if_changed(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    match std::fs::read(path).map(Zeroizing::new) {
        Ok(old) if old.as_slice() == data => {
            // Same bytes; still make sure a key is not readable by others.
            let current = std::fs::metadata(path)
                .io_ctx("cannot read", path)?
                .permissions()
                .mode()
                & 0o777;
            if current != mode {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .io_ctx("cannot set permissions of", path)?;
            }
            Ok(())
        }
        Ok(_) => write_atomic(path, data, mode),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_atomic(path, data, mode),
        Err(e) => Err(Error::io("cannot read", path, e)),
    }
}

/// Write through a new temporary file created with `mode` (a leftover one is removed first, so
/// its mode cannot be inherited), synced, renamed over `path`, and the directory synced.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::internal(format!("{} has no directory", path.display())))?;
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.bkbundle-tmp"));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("cannot remove", &tmp, e)),
    }
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed `mode` (never widened it): set it exactly, before any byte.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("cannot write", path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_support::{day, names, site};
    use crate::tls::{decide, issue_server, Decision, Policy};

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn save_then_load_round_trip_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("bklite");
        assert!(load(&target).unwrap().is_none());
        let (ca, m) = site(&["10.0.0.5"], 825);
        save(&target, &m, Some(&ca)).unwrap();
        assert_eq!(mode(&target.join(".bkbundle")), 0o700);
        assert_eq!(mode(&target.join(".bkbundle/tls")), 0o700);
        assert_eq!(mode(&target.join(CA_KEY)), 0o600);
        assert_eq!(mode(&target.join("certs")), 0o755);
        assert_eq!(mode(&target.join(CA_CERT)), 0o644);
        assert_eq!(mode(&target.join(SERVER_CERT)), 0o644);
        assert_eq!(mode(&target.join(SERVER_KEY)), 0o600);
        let ex = load(&target).unwrap().unwrap();
        let site_ca = ex.site_ca.as_ref().unwrap();
        assert_eq!(
            (site_ca.cert_pem.as_str(), site_ca.key_pem.as_str()),
            (ca.cert_pem.as_str(), ca.key_pem.as_str())
        );
        assert_eq!(ex.ca_pem.as_deref(), Some(m.ca_pem.as_str()));
        assert_eq!(ex.cert_pem.as_deref(), Some(m.cert_pem.as_str()));
        assert_eq!(ex.key_pem.as_deref().map(String::as_str), Some(m.key_pem.as_str()));
        assert_eq!(
            decide(Some(&ex), &names(&["10.0.0.5"]), &Policy::default(), day(1)),
            Decision::Keep
        );
        assert!(!format!("{ex:?}").contains("PRIVATE KEY"), "{ex:?}");
        // No temporary file is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(target.join("certs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains("tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn reissue_keeps_the_ca_and_a_different_ca_key_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path();
        let (ca, m) = site(&["10.0.0.5"], 825);
        save(target, &m, Some(&ca)).unwrap();
        let key_before = std::fs::read(target.join(CA_KEY)).unwrap();
        let ex = load(target).unwrap().unwrap();
        let want = names(&["10.0.0.5", "10.0.0.7"]);
        assert!(matches!(
            decide(Some(&ex), &want, &Policy::default(), day(1)),
            Decision::Reissue { .. }
        ));
        let site_ca = ex.site_ca.unwrap();
        let again = issue_server(&site_ca, &want, &Policy::default(), day(1)).unwrap();
        save(target, &again, Some(&site_ca)).unwrap();
        assert_eq!(
            std::fs::read(target.join(CA_KEY)).unwrap(),
            key_before,
            "the CA key is untouched"
        );
        let ex = load(target).unwrap().unwrap();
        assert_eq!(ex.cert_pem.as_deref(), Some(again.cert_pem.as_str()));
        assert_eq!(decide(Some(&ex), &want, &Policy::default(), day(2)), Decision::Keep);
        // Another CA offered for the same target: refused, nothing changed.
        let (other_ca, other) = site(&["10.0.0.5"], 825);
        assert!(save(target, &other, Some(&other_ca)).is_err());
        assert_eq!(std::fs::read(target.join(CA_KEY)).unwrap(), key_before);
        assert_eq!(std::fs::read_to_string(target.join(CA_CERT)).unwrap(), ca.cert_pem);
    }

    #[test]
    fn operator_files_are_copied_in_and_then_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (site_dir, target) = (dir.path().join("site"), dir.path().join("t"));
        std::fs::create_dir(&site_dir).unwrap();
        let (ca, m) = site(&["10.0.0.5"], 825);
        for (name, text) in [("ca.crt", &ca.cert_pem), ("n.crt", &m.cert_pem), ("n.key", &*m.key_pem)] {
            std::fs::write(site_dir.join(name), text).unwrap();
        }
        let files = read_operator(
            &site_dir.join("ca.crt"),
            &site_dir.join("n.crt"),
            &site_dir.join("n.key"),
        )
        .unwrap();
        assert!(!format!("{files:?}").contains("PRIVATE KEY"));
        save(&target, &files.material(), None).unwrap();
        assert_eq!(mode(&target.join(SERVER_KEY)), 0o600);
        assert!(!target.join(CA_KEY).exists(), "no CA key for an operator's CA");
        let ex = load(&target).unwrap().unwrap();
        assert_eq!(
            decide(Some(&ex), &names(&["10.0.0.5"]), &Policy::default(), day(1)),
            Decision::Operator
        );
        // A generated CA may not replace the operator's published one.
        let (gen_ca, gen) = site(&["10.0.0.5"], 825);
        let e = save(&target, &gen, Some(&gen_ca)).unwrap_err();
        assert!(
            e.message.contains("holds a CA bkbundle did not generate"),
            "{}",
            e.message
        );
        assert_eq!(std::fs::read_to_string(target.join(CA_CERT)).unwrap(), ca.cert_pem);
        let e = read_operator(
            &site_dir.join("none.crt"),
            &site_dir.join("n.crt"),
            &site_dir.join("n.key"),
        )
        .unwrap_err();
        assert!(
            e.message.contains("[tls] ca_file") && e.message.contains("none.crt"),
            "{}",
            e.message
        );
    }

    #[test]
    fn writes_never_widen_a_key_and_fix_a_widened_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        // A leftover temporary file readable by all must not lend its mode to the key.
        let tmp = dir.path().join(".k.key.bkbundle-tmp");
        std::fs::write(&tmp, "old").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_if_changed(&path, b"secret", 0o600).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(!tmp.exists());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_if_changed(&path, b"secret", 0o600).unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_damaged_site_ca_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, m) = site(&["10.0.0.5"], 825);
        save(dir.path(), &m, Some(&ca)).unwrap();
        let (other, _) = site(&["10.0.0.5"], 825);
        let path = dir.path().join(CA_KEY);
        std::fs::write(&path, format!("{}{}", other.key_pem.as_str(), ca.cert_pem)).unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(
            e.message
                .contains("ca.key: its key and certificate do not belong together"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("PRIVATE KEY") && e.hints[0].contains("restore it"));
        std::fs::write(&path, other.key_pem.as_str()).unwrap();
        assert!(load(dir.path()).unwrap_err().message.contains("no CA certificate"));
    }
}
