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

/// Exit code of a command-line clap refused (unknown flag, missing argument); clap exits itself.
pub const EXIT_USAGE: i32 = 2;

/// One documented exit code: `name` is the error's `kind` in `--json` (where there is one),
/// `meaning` what the operator reads in `bkbundle --help` and the README (backticks mark flags
/// and commands in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitCodeDoc {
    pub code: i32,
    pub name: &'static str,
    pub meaning: &'static str,
}

/// Every exit code bkbundle has, in order: the one source of `bkbundle --help`'s table, the
/// README's (between its `exit-codes` markers; a unit test keeps them equal) and [`Kind::name`].
pub const EXIT_CODES: &[ExitCodeDoc] = &[
    ExitCodeDoc {
        code: 0,
        name: "success",
        meaning: "success",
    },
    ExitCodeDoc {
        code: 1,
        name: "internal",
        meaning: "internal error (a bug: report it with the output of `-v`)",
    },
    ExitCodeDoc {
        code: EXIT_USAGE,
        name: "usage",
        meaning: "usage error (unknown flag, missing argument)",
    },
    ExitCodeDoc {
        code: 3,
        name: "input",
        meaning: "bad input: recipe, package, key or another file given on the command line; cloud regions \
                  whose env would break agents (every problem listed, nothing written)",
    },
    ExitCodeDoc {
        code: 4,
        name: "bundle",
        meaning: "the bundle failed verification (damaged, truncated, missing part, bad or missing signature)",
    },
    ExitCodeDoc {
        code: 5,
        name: "unsupported",
        meaning: "the bundle's (or recipe's) format is newer than this bkbundle supports, or the platform \
                  database is a newer release (a NOT NULL column bkbundle has no value for)",
    },
    ExitCodeDoc {
        code: 6,
        name: "external",
        meaning: "an external system is unreachable, refused or not ready (Docker engine, registry, \
                  PostgreSQL; the server has not created its tables yet)",
    },
    ExitCodeDoc {
        code: 7,
        name: "io",
        meaning: "local I/O failed (disk full, permissions), writing the output to stdout included",
    },
    ExitCodeDoc {
        code: 8,
        name: "preflight",
        meaning: "preflight found problems (every one listed; `problems` in `--json`): install's, or \
                  restore's (it would replace an existing site: `--force`), or there is no room for a \
                  backup; nothing was changed",
    },
    ExitCodeDoc {
        code: 9,
        name: "unhealthy",
        meaning: "the stack did not become healthy (a service exited, restart-looped, turned unhealthy or \
                  missed the deadline)",
    },
    ExitCodeDoc {
        code: EXIT_FINDINGS,
        name: "findings",
        meaning: "`doctor` found a problem of error severity (that `--fix` did not repair); its report says \
                  which",
    },
    ExitCodeDoc {
        code: 11,
        name: "busy",
        meaning: "another bkbundle run holds the lock on the same install target (or NATS bucket) and did \
                  not finish within `--lock-wait`; the message names its pid, command and start time; \
                  nothing was changed",
    },
];

/// The README's exit-code section: a Markdown table of [`EXIT_CODES`].
pub fn exit_codes_markdown() -> String {
    let mut s = String::from("| code | name | meaning |\n|---|---|---|\n");
    for d in EXIT_CODES {
        s.push_str(&format!("| {} | `{}` | {} |\n", d.code, d.name, d.meaning));
    }
    s
}

/// The classes of error that reach the edge; each has its exit code in [`EXIT_CODES`].
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
    /// Every kind, for the tests that hold [`EXIT_CODES`] and the kinds together.
    pub const ALL: [Kind; 9] = [
        Kind::Internal,
        Kind::Input,
        Kind::Bundle,
        Kind::Unsupported,
        Kind::External,
        Kind::Io,
        Kind::Preflight,
        Kind::Unhealthy,
        Kind::Busy,
    ];

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

    /// The kind's name in `--json` (`"error": {"kind": ...}`): its exit code's in [`EXIT_CODES`].
    pub fn name(self) -> &'static str {
        let code = self.exit_code();
        EXIT_CODES
            .iter()
            .find(|d| d.code == code)
            .map(|d| d.name)
            // Unreachable: the test `every_kind_has_a_documented_code` holds each code in the table.
            .unwrap_or("internal")
    }
}

#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    /// The whole text; for several problems, the headline and every problem as a list item.
    pub message: String,
    pub hints: Vec<String>,
    /// Each problem's own message when the error reports several at once ([`Error::all`],
    /// [`Error::findings`]), so that `--json` lists them; empty for a single error.
    pub problems: Vec<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// One error for several problems, so the operator fixes them in one round: `headline`, then
    /// each problem's message as a list item; every problem's hints once; the kind of the first
    /// problem that is not bad input (an unreachable system over a bad name), else input.
    pub fn all(headline: impl Into<String>, problems: Vec<Error>) -> Self {
        let kind = problems
            .iter()
            .map(|p| p.kind)
            .find(|k| *k != Kind::Input)
            .unwrap_or(Kind::Input);
        let mut hints: Vec<String> = Vec::new();
        let mut messages = Vec::with_capacity(problems.len());
        for p in problems {
            for h in p.hints {
                if !hints.contains(&h) {
                    hints.push(h);
                }
            }
            messages.push(p.message);
        }
        let mut e = Error::findings(kind, headline, messages, Vec::new());
        e.hints = hints;
        e
    }

    /// Findings reported together (install's preflight): `headline`, each problem as a list item,
    /// then each warning on a `warning:` line; `problems` keeps the list for `--json`.
    pub fn findings(kind: Kind, headline: impl Into<String>, problems: Vec<String>, warnings: Vec<String>) -> Self {
        let message = format!(
            "{}:\n  - {}{}",
            headline.into(),
            problems.join("\n  - "),
            warnings.iter().map(|w| format!("\nwarning: {w}")).collect::<String>()
        );
        Self {
            kind,
            message,
            hints: Vec::new(),
            problems,
        }
    }

    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            hints: Vec::new(),
            problems: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exit_code_is_documented_once_in_order() {
        let codes: Vec<i32> = EXIT_CODES.iter().map(|d| d.code).collect();
        assert_eq!(codes, (0..=11).collect::<Vec<_>>(), "0 to 11, each once, in order");
        for k in Kind::ALL {
            let doc = EXIT_CODES.iter().find(|d| d.code == k.exit_code());
            assert!(doc.is_some(), "{k:?}: exit code {} is not in EXIT_CODES", k.exit_code());
            assert_eq!(k.name(), doc.map(|d| d.name).unwrap_or_default());
        }
        let names: std::collections::BTreeSet<_> = EXIT_CODES.iter().map(|d| d.name).collect();
        assert_eq!(names.len(), EXIT_CODES.len(), "names are unique");
        // The JSON kinds scripts already match on.
        assert_eq!(Kind::Input.name(), "input");
        assert_eq!(Kind::Busy.name(), "busy");
        assert_eq!(Kind::Io.exit_code(), 7);
    }

    #[test]
    fn all_keeps_each_problem_for_json_and_the_text_as_before() {
        let e = Error::all(
            "2 problems with the recipe's inputs",
            vec![
                Error::input("package a.zip: not found").hint("check the path"),
                Error::external("image x: engine unreachable").hint("check the path"),
            ],
        );
        assert_eq!(
            e.message,
            "2 problems with the recipe's inputs:\n  - package a.zip: not found\n  - image x: engine unreachable"
        );
        assert_eq!(e.problems, ["package a.zip: not found", "image x: engine unreachable"]);
        assert_eq!(e.kind, Kind::External);
        assert_eq!(e.hints, ["check the path"]);
        assert!(Error::input("one").problems.is_empty());
    }

    #[test]
    fn findings_read_as_install_preflight_always_has() {
        let e = Error::findings(
            Kind::Preflight,
            "preflight found 2 problem(s); nothing was changed",
            vec!["port 80 is in use".into(), "HOST_IP is not set".into()],
            vec!["project has containers bkbundle did not create".into()],
        );
        assert_eq!(
            e.message,
            "preflight found 2 problem(s); nothing was changed:\n  - port 80 is in use\n  - HOST_IP is not set\
             \nwarning: project has containers bkbundle did not create"
        );
        assert_eq!(e.problems.len(), 2);
        assert_eq!(e.kind.exit_code(), 8);
    }

    /// README.md's exit-code section is [`exit_codes_markdown`]; `BKBUNDLE_BLESS=1` rewrites it.
    #[test]
    fn readme_exit_codes_are_the_table() {
        const BEGIN: &str = "<!-- exit-codes:begin -->\n";
        const END: &str = "<!-- exit-codes:end -->";
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
        let readme = std::fs::read_to_string(&path).unwrap();
        let start = readme.find(BEGIN).expect("README.md has `<!-- exit-codes:begin -->`") + BEGIN.len();
        let end = start
            + readme[start..]
                .find(END)
                .expect("README.md has `<!-- exit-codes:end -->`");
        let want = exit_codes_markdown();
        if readme[start..end] == want {
            return;
        }
        if std::env::var_os("BKBUNDLE_BLESS").is_some_and(|v| v == "1") {
            std::fs::write(&path, format!("{}{want}{}", &readme[..start], &readme[end..])).unwrap();
            return;
        }
        panic!(
            "README.md's exit codes differ from error::EXIT_CODES; run with BKBUNDLE_BLESS=1 to rewrite them.\n\
             --- README.md ---\n{}--- EXIT_CODES ---\n{want}",
            &readme[start..end]
        );
    }
}
