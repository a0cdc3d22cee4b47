//! An OCI distribution registry in the intranet: where `push` sends a bundle's images, where
//! `install --images-from` has the engine pull them, and what `doctor` checks them against.
//!
//! - [`Target`]: `HOST[:PORT][/PREFIX]` as the operator writes it, and how a bundle's image
//!   reference maps into it ([`Target::place`]): the reference's own registry host is dropped,
//!   its path and tag kept under the prefix (`bklite/server:3.1.0` → `HOST/PREFIX/bklite/server:3.1.0`).
//! - [`Access`]: how to reach it (CA file, plain HTTP) and with which credentials, found the way
//!   registry clients find them ([`Access::credentials`]).
//! - [`client`]: the distribution protocol (blobs, uploads, mounts, manifests, auth challenges).
//! - [`push`]: the `push` command.

pub mod client;
pub mod push;

use crate::error::{Error, Result};
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The longest repository name (host included) distribution accepts.
const NAME_MAX: usize = 255;
/// The longest tag the distribution spec allows.
const TAG_MAX: usize = 128;

/// A registry and the repository prefix images go under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host` or `host:port`, as given (lower-cased).
    pub host: String,
    /// Repository path prefix without slashes at either end; may be empty.
    pub prefix: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            f.write_str(&self.host)
        } else {
            write!(f, "{}/{}", self.host, self.prefix)
        }
    }
}

/// Where one image of the bundle goes in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The bundle's reference (as the stack uses it).
    pub source: String,
    /// The repository under the registry host: `PREFIX/path`.
    pub repository: String,
    /// The tag; `None` for a reference by digest only.
    pub tag: Option<String>,
    /// `HOST/PREFIX/path:tag`, what the engine pulls.
    pub reference: String,
}

impl Target {
    /// Parse `HOST[:PORT][/PREFIX]`. A scheme is refused (plain HTTP is `--insecure`).
    pub fn parse(text: &str) -> Result<Target> {
        let bad = |why: &str| {
            Error::input(format!("registry {text:?}: {why}"))
                .hint("give the registry as HOST[:PORT][/PREFIX], e.g. harbor.intranet:443/bklite or 10.0.0.5:5000")
        };
        let t = text.trim();
        if t.contains("://") {
            return Err(bad("has a scheme").hint("drop https://; for a plain-HTTP registry add --insecure"));
        }
        let t = t.trim_end_matches('/');
        let (host, prefix) = match t.split_once('/') {
            Some((h, p)) => (h, p),
            None => (t, ""),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p)) if !n.ends_with(']') || n.starts_with('[') => (n, Some(p)),
            _ => (host, None),
        };
        if let Some(p) = port {
            if p.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
                return Err(bad(&format!("port {p:?} is not a port number (1-65535)")));
            }
        }
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
        if !name_ok {
            return Err(bad(&format!("host {name:?} is not a host name or address")));
        }
        for comp in prefix.split('/').filter(|_| !prefix.is_empty()) {
            if !component_ok(comp) {
                return Err(bad(&format!(
                    "prefix component {comp:?} is not a valid repository name component (lower-case letters, digits, and . _ - between them)"
                )));
            }
        }
        Ok(Target {
            host: host.to_ascii_lowercase(),
            prefix: prefix.to_string(),
        })
    }

    /// Where `reference` (one of a bundle image's references) goes under this target; refused
    /// when the result is not a name a registry takes (upper case, too long), naming both.
    pub fn place(&self, reference: &str) -> Result<Placement> {
        let parsed = parse_reference(reference)?;
        let repository = if self.prefix.is_empty() {
            parsed.path.clone()
        } else {
            format!("{}/{}", self.prefix, parsed.path)
        };
        let refused = |why: String| {
            Error::input(format!("image {reference}: cannot be pushed to registry {self} as {repository}: {why}"))
                .hint("registries take lower-case repository names of at most 255 characters; rename the image in the recipe (or choose a shorter --registry prefix)")
        };
        for comp in repository.split('/') {
            if !component_ok(comp) {
                return Err(refused(format!(
                    "path component {comp:?} is not valid (lower-case letters, digits, and . _ - between them)"
                )));
            }
        }
        let full = format!("{}/{}", self.host, repository);
        if full.len() > NAME_MAX {
            return Err(refused(format!(
                "the name {full} is {} characters (at most {NAME_MAX})",
                full.len()
            )));
        }
        let reference_out = match (&parsed.tag, &parsed.digest) {
            (Some(tag), _) => format!("{full}:{tag}"),
            (None, Some(d)) => format!("{full}@{d}"),
            (None, None) => format!("{full}:latest"),
        };
        let tag = match (&parsed.tag, &parsed.digest) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(Placement {
            source: reference.to_string(),
            repository,
            tag,
            reference: reference_out,
        })
    }
}

/// One path component of a repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-", then an alphanumeric.
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn tag_ok(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= TAG_MAX
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

/// A reference split: its registry host (if any) dropped, the path, tag and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedReference {
    pub domain: Option<String>,
    pub path: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

/// Split an image reference as the engine reads one. Only the tag's syntax is checked here:
/// the path is checked where it is placed (its case is the registry's business).
pub fn parse_reference(reference: &str) -> Result<ParsedReference> {
    let bad = |why: &str| {
        Error::input(format!("image reference {reference:?}: {why}"))
            .hint("references look like NAME[:TAG][@sha256:DIGEST], e.g. bklite/server:3.1.0")
    };
    let (rest, digest) = match reference.split_once('@') {
        Some((r, d)) => {
            let hex = d
                .strip_prefix("sha256:")
                .ok_or_else(|| bad("its digest is not sha256:<hex>"))?;
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("its digest is not sha256:<64 hex digits>"));
            }
            (r, Some(d.to_string()))
        }
        None => (reference, None),
    };
    let (domain, remainder) = match rest.split_once('/') {
        Some((first, remainder)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            (Some(first.to_string()), remainder)
        }
        _ => (None, rest),
    };
    let (path, tag) = match remainder.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, Some(t.to_string())),
        _ => (remainder, None),
    };
    if path.is_empty() || path.split('/').any(str::is_empty) {
        return Err(bad("its name is empty or has an empty path component"));
    }
    if let Some(t) = &tag {
        if !tag_ok(t) {
            return Err(bad(&format!(
                "tag {t:?} is not valid (letters, digits, _ . -; at most {TAG_MAX} characters, not starting with . or -)"
            )));
        }
    }
    Ok(ParsedReference {
        domain,
        path: path.to_string(),
        tag,
        digest,
    })
}

/// A user name and password for a registry. Never printed: `Debug` shows the user only.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: Zeroizing<String>,
    /// Where they came from, for messages ("--username", "/root/.docker/config.json", "prompt").
    pub source: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials({} from {}, password hidden)",
            self.username, self.source
        )
    }
}

/// How to reach a registry: TLS trust, plain HTTP, credentials. From the command line, or from
/// an install config's `[registry]` section (see [`Settings`]).
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// A PEM file of the CA(s) that sign the registry's certificate; without it, the system's
    /// roots (from the host's CA bundle).
    pub ca_file: Option<PathBuf>,
    /// Plain HTTP, no TLS.
    pub insecure: bool,
    pub username: Option<String>,
    /// A file whose first line is the password (mode 0600 recommended).
    pub password_file: Option<PathBuf>,
    /// Ask for a password on the terminal when the registry wants one and none was found.
    pub prompt: bool,
}

/// The install config's `[registry]` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `HOST[:PORT][/PREFIX]`: the default of `install --images-from` and what doctor checks.
    pub url: Option<String>,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub insecure: bool,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl Access {
    /// Command-line values first, then the config's.
    pub fn merged_with(mut self, s: &Settings) -> Access {
        if self.ca_file.is_none() {
            self.ca_file = s.ca_file.clone();
        }
        self.insecure |= s.insecure;
        if self.username.is_none() {
            self.username = s.username.clone();
        }
        if self.password_file.is_none() {
            self.password_file = s.password_file.clone();
        }
        self
    }

    /// The credentials for `host`: `username` with the password from `password_file` (or the
    /// `BKBUNDLE_REGISTRY_PASSWORD` variable, or a prompt); else the `docker login` file
    /// (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`); else none (anonymous, or a
    /// prompt when the registry asks and `prompt` is set: see the client).
    pub fn credentials(&self, host: &str) -> Result<Option<Credentials>> {
        if let Some(user) = &self.username {
            let password = if let Some(f) = &self.password_file {
                read_password_file(f)?
            } else if let Ok(p) = std::env::var("BKBUNDLE_REGISTRY_PASSWORD") {
                Zeroizing::new(p)
            } else if self.prompt {
                prompt_password(host, user)?
            } else {
                return Err(Error::input(format!(
                    "registry {host}: user {user} has no password (no --password-file, no BKBUNDLE_REGISTRY_PASSWORD, and no terminal to ask on)"
                ))
                .hint("give --password-file FILE (first line: the password) or set BKBUNDLE_REGISTRY_PASSWORD"));
            };
            return Ok(Some(Credentials {
                username: user.clone(),
                password,
                source: "--registry-user".into(),
            }));
        }
        if let Some(path) = docker_config_path() {
            if let Some(c) = docker_config_credentials(&path, host)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }
}

/// Ask for `user`'s password at `host` on the terminal.
pub fn prompt_password(host: &str, user: &str) -> Result<Zeroizing<String>> {
    rpassword::prompt_password(format!("Password for {user} at {host}: "))
        .map(Zeroizing::new)
        .map_err(|e| {
            Error::input(format!("registry {host}: cannot ask for {user}'s password: {e}"))
                .hint("give --password-file FILE or set BKBUNDLE_REGISTRY_PASSWORD")
        })
}

fn read_password_file(path: &Path) -> Result<Zeroizing<String>> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| Error::io("reading the registry password file", path, e))?,
    );
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        return Err(
            Error::input(format!("{}: the registry password file is empty", path.display()))
                .hint("write the password on the file's first line"),
        );
    }
    Ok(Zeroizing::new(line.to_string()))
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The credentials `docker login HOST` stored in `path`, if any. A credentials helper
/// (`credsStore`, `credHelpers`) is not run: bkbundle runs no program it was not built with.
pub fn docker_config_credentials(path: &Path, host: &str) -> Result<Option<Credentials>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading the docker login file", path, e)),
    };
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let file: File = serde_json::from_str(&text).map_err(|e| {
        Error::input(format!("{}: not a docker login file: {e}", path.display()))
            .hint("fix or move the file, or give --username and --password-file")
    })?;
    for (key, entry) in &file.auths {
        let k = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .trim_end_matches("/v2");
        if !k.eq_ignore_ascii_case(host) {
            continue;
        }
        let found = |user: String, pass: String| Credentials {
            username: user,
            password: Zeroizing::new(pass),
            source: path.display().to_string(),
        };
        if let Some(a) = &entry.auth {
            use base64::Engine;
            let raw = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(a.trim())
                    .map_err(|_| {
                        Error::input(format!("{}: the auth of {key} is not base64", path.display()))
                            .hint(format!("run docker login {host} again"))
                    })?,
            );
            let pair = Zeroizing::new(String::from_utf8_lossy(&raw).into_owned());
            if let Some((u, p)) = pair.split_once(':') {
                return Ok(Some(found(u.to_string(), p.to_string())));
            }
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Some(found(u.clone(), p.clone())));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = Target::parse("Harbor.intranet:443/bklite/").unwrap();
        assert_eq!(t.host, "harbor.intranet:443");
        assert_eq!(t.prefix, "bklite");
        assert_eq!(t.to_string(), "harbor.intranet:443/bklite");
        let t = Target::parse("10.0.0.5:5000").unwrap();
        assert_eq!((t.host.as_str(), t.prefix.as_str()), ("10.0.0.5:5000", ""));
        for bad in [
            "https://r:5000",
            "",
            "r:0",
            "r:99999",
            "r:x",
            "r/Upper",
            "r/a//b",
            "r_x y",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn references_are_placed_under_the_prefix() {
        let t = Target::parse("reg.local:5000/site").unwrap();
        let p = t.place("bklite/server:3.1.0").unwrap();
        assert_eq!(p.repository, "site/bklite/server");
        assert_eq!(p.tag.as_deref(), Some("3.1.0"));
        assert_eq!(p.reference, "reg.local:5000/site/bklite/server:3.1.0");
        let p = t.place("docker.io/library/redis").unwrap();
        assert_eq!(p.reference, "reg.local:5000/site/library/redis:latest");
        let p = t.place("localhost:5000/x/y:1").unwrap();
        assert_eq!(p.repository, "site/x/y");
        let d = format!("sha256:{}", "a".repeat(64));
        let p = t.place(&format!("pg@{d}")).unwrap();
        assert_eq!((p.tag, p.reference), (None, format!("reg.local:5000/site/pg@{d}")));
    }

    #[test]
    fn refused_references_name_the_image_and_the_reason() {
        let t = Target::parse("reg.local:5000").unwrap();
        let e = t.place("BKLite/Server:1").unwrap_err();
        assert!(
            e.message.contains("BKLite/Server:1") && e.message.contains("\"BKLite\""),
            "{}",
            e.message
        );
        let long = format!("a/{}:1", "b".repeat(260));
        let e = t.place(&long).unwrap_err();
        assert!(e.message.contains("at most 255"), "{}", e.message);
        assert!(t.place("a:bad tag").is_err());
        assert!(t.place(&format!("a:{}", "t".repeat(129))).is_err());
        assert!(component_ok("a__b") && component_ok("a-----b") && component_ok("a.b_c"));
        assert!(!component_ok("a___b") && !component_ok("-a") && !component_ok("a.") && !component_ok("a._b"));
    }

    #[test]
    fn docker_login_file_is_read_not_printed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        // "user:pa:ss" in base64; a password may hold a colon.
        std::fs::write(
            &f,
            r#"{"auths":{"https://reg.local:5000/v2/":{"auth":"dXNlcjpwYTpzcw=="},"other":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        let c = docker_config_credentials(&f, "reg.local:5000").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("user", "pa:ss"));
        assert!(!format!("{c:?}").contains("pa:ss"));
        let c = docker_config_credentials(&f, "other").unwrap().unwrap();
        assert_eq!(c.password.as_str(), "p");
        assert!(docker_config_credentials(&f, "none").unwrap().is_none());
        assert!(docker_config_credentials(&dir.path().join("absent"), "x")
            .unwrap()
            .is_none());
    }
}
