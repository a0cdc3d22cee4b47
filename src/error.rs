//! The one error type that reaches the edge, with its documented exit code and hints.
//!
//! Modules keep typed errors of their own (`bundle::BundleError`, `manifest::ManifestError`);
//! they convert into [`Error`], which adds what the operator needs at the edge: a class that
//! maps to an exit code, and `hint:` lines saying what to do next.

use std::fmt;
use std::path::Path;

/// Exit code of `bkbundle doctor` when it found a problem of error severity that `--fix` did not
/// repair (its report is printed as usual; it is a finding, not a failure of bkbundle).
pub const EXIT_FINDINGS: i32 = 10;

/// Exit codes, documented in the README and `bkbundle --help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 1: a bug or an unexpected condition.
    Internal,
    /// 3: the recipe, a package, a key file or another input given on the command line is wrong.
    Input,
    /// 4: the bundle failed verification (checksum, size, signature, truncated, missing part).
    Bundle,
    /// 5: the bundle's format is newer than this bkbundle supports.
    Unsupported,
    /// 6: an external system (Docker engine, registry) is unreachable or refused.
    External,
    /// 7: reading or writing local files failed (disk full, permissions).
    Io,
    /// 8: install's preflight found problems; nothing was changed.
    Preflight,
    /// 9: the stack did not become healthy (a service exited, restart-looped, turned unhealthy
    /// or missed the deadline).
    Unhealthy,
    /// 11: another bkbundle run holds the lock on the same install target or bucket (it waited,
    /// then gave up); nothing was changed.
    Busy,
}

impl Kind {
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Internal => 1,
            Kind::Input => 3,
            Kind::Bundle => 4,
            Kind::Unsupported => 5,
            Kind::External => 6,
            Kind::Io => 7,
            Kind::Preflight => 8,
            Kind::Unhealthy => 9,
            Kind::Busy => 11,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Internal => "internal",
            Kind::Input => "input",
            Kind::Bundle => "bundle",
            Kind::Unsupported => "unsupported",
            Kind::External => "external",
            Kind::Io => "io",
            Kind::Preflight => "preflight",
            Kind::Unhealthy => "unhealthy",
            Kind::Busy => "busy",
        }
    }
}

#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
    pub hints: Vec<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// One error for several problems, so the operator fixes them in one round: `headline`, then
    /// each problem's message as a list item; every problem's hints once; the kind of the first
    /// problem that is not bad input (an unreachable system over a bad name), else input.
    pub fn all(headline: impl Into<String>, problems: Vec<Error>) -> Self {
        let mut e = Error::input(format!(
            "{}:\n  - {}",
            headline.into(),
            problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("\n  - ")
        ));
        if let Some(k) = problems.iter().map(|p| p.kind).find(|k| *k != Kind::Input) {
            e.kind = k;
        }
        for p in problems {
            for h in p.hints {
                if !e.hints.contains(&h) {
                    e.hints.push(h);
                }
            }
        }
        e
    }

    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            hints: Vec::new(),
        }
    }
    pub fn input(message: impl Into<String>) -> Self {
        Self::new(Kind::Input, message)
    }
    pub fn bundle(message: impl Into<String>) -> Self {
        Self::new(Kind::Bundle, message)
    }
    pub fn external(message: impl Into<String>) -> Self {
        Self::new(Kind::External, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hints.push(hint.into());
        self
    }

    /// An I/O error on a named file, with a hint that fits the cause (disk full, permissions).
    pub fn io(what: &str, path: &Path, err: std::io::Error) -> Self {
        let mut e = Self::new(Kind::Io, format!("{what} {}: {err}", path.display()));
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                e = e.hint(format!(
                    "the file system holding {} is full: free space there or write elsewhere",
                    path.display()
                ))
            }
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                e = e.hint(format!("check the permissions of {} and its directory", path.display()))
            }
            _ => {}
        }
        if err.kind() == std::io::ErrorKind::NotFound {
            e = e.hint("check the path; relative paths in a recipe are relative to the recipe file");
        }
        e
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// The error and its causes on one line (tokio-postgres' and async-nats' Display stop at the first
/// level, which often hides the cause an operator needs: refused, timed out, bad certificate).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Attach context to I/O results without repeating the path formatting everywhere.
pub trait IoContext<T> {
    fn io_ctx(self, what: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_ctx(self, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(what, path, e))
    }
}
