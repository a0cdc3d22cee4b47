//! `init-packages --dir DIR`: packages given as plain files, recognised by name the way the BK-Lite
//! server parses an uploaded file's name (BKLITE.md): strip `.tar.gz .tgz .zip .tar .gz .exe .deb
//! .rpm`, then `^(.+?)[-_]v?(\d+\.\d+\.\d+(?:\.\d+)?)(?:[-_].*)?$` gives the name and the version.
//! The name also says the object (`fusion-collectors`/`controller` → `Controller`, `telegraf` →
//! `Telegraf`, ...), and `linux`/`windows`, `amd64`/`x86_64`/`arm64`/`aarch64` anywhere in it the
//! OS and architecture. Explicit `--os/--arch/--object/--version/--type` win over the name.
//!
//! Nothing is guessed silently: a file whose version, OS or architecture the name does not tell
//! (and no flag gives) is an error naming the file and the flag to add; every such file is listed
//! at once.

use crate::error::Error;
use crate::manifest::{normalize_arch, Os, Package, PackageType};
use crate::packages::source::Source;
use std::path::{Path, PathBuf};

/// What the operator fixed on the command line; `None` means "from the file name".
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub kind: Option<PackageType>,
    pub os: Option<Os>,
    pub arch: Option<String>,
    pub object: Option<String>,
    pub version: Option<String>,
}

/// What a file name says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// The name part before the version (or the whole stem without one).
    pub name: String,
    pub version: Option<String>,
    pub os: Option<Os>,
    pub arch: Option<&'static str>,
}

const SUFFIXES: [&str; 8] = [".tar.gz", ".tgz", ".zip", ".tar", ".gz", ".exe", ".deb", ".rpm"];

/// The stem of a file name with the upstream suffixes stripped (each at most once, longest first).
fn stem(file: &str) -> &str {
    let lower = file.to_ascii_lowercase();
    for s in SUFFIXES {
        if lower.ends_with(s) {
            return &file[..file.len() - s.len()];
        }
    }
    file
}

/// `\d+\.\d+\.\d+(\.\d+)?` at the start of `s`: its length.
fn version_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut groups = 0;
    loop {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        groups += 1;
        if groups == 4 || i >= b.len() || b[i] != b'.' || !b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            break;
        }
        i += 1;
    }
    (groups >= 3).then_some(i)
}

/// Parse a file name as the server does (see the module documentation).
pub fn parse_name(file: &str) -> Parsed {
    let stem = stem(file);
    let mut parsed = Parsed {
        name: stem.to_string(),
        ..Default::default()
    };
    // `(.+?)[-_]v?(version)(?:[-_].*)?$`: the first separator after a non-empty name that is
    // followed by a whole version.
    for (i, c) in stem.char_indices().skip(1) {
        if c != '-' && c != '_' {
            continue;
        }
        let rest = &stem[i + 1..];
        let rest = rest.strip_prefix('v').unwrap_or(rest);
        if let Some(n) = version_len(rest) {
            let after = &rest[n..];
            if after.is_empty() || after.starts_with('-') || after.starts_with('_') {
                parsed.name = stem[..i].to_string();
                parsed.version = Some(rest[..n].to_string());
                break;
            }
        }
    }
    let lower = file.to_ascii_lowercase();
    let tokens: Vec<&str> = lower.split(['-', '_', '.']).collect();
    parsed.os = if tokens.contains(&"windows") || tokens.contains(&"win") || lower.ends_with(".exe") {
        Some(Os::Windows)
    } else if tokens.contains(&"linux") {
        Some(Os::Linux)
    } else {
        None
    };
    parsed.arch = if lower.contains("x86_64") || lower.contains("x86-64") || tokens.contains(&"amd64") {
        Some("x86_64")
    } else if tokens.contains(&"arm64") || tokens.contains(&"aarch64") {
        Some("arm64")
    } else {
        None
    };
    parsed
}

/// The object and type a package name stands for: the agent package is the `Controller`, the
/// known collectors have the platform's spelling, anything else is a collector of that name.
pub fn object_of(name: &str) -> (String, PackageType) {
    // Drop OS/arch words the name may carry (`telegraf-linux-amd64` → `telegraf`).
    let words: Vec<&str> = name
        .split(['-', '_'])
        .filter(|w| {
            !matches!(
                w.to_ascii_lowercase().as_str(),
                "linux" | "windows" | "win" | "amd64" | "x86" | "64" | "arm64" | "aarch64"
            )
        })
        .collect();
    let base = words.join("-");
    match base.to_ascii_lowercase().as_str() {
        "fusion-collectors" | "fusion-collector" | "collector-sidecar" | "controller" | "sidecar" => {
            ("Controller".into(), PackageType::Controller)
        }
        "telegraf" => ("Telegraf".into(), PackageType::Collector),
        "vector" => ("Vector".into(), PackageType::Collector),
        "nats-executor" => ("NATS-Executor".into(), PackageType::Collector),
        _ => (base, PackageType::Collector),
    }
}

const NAMING_HINT: &str = "name package files as the server parses them (NAME-1.2.3-linux-amd64.tar.gz), or give what the name lacks with --version, --os and --arch";

/// Every package file directly in `dir` (hidden files and subdirectories are passed over), as
/// packages with their sources. Each file is checked as `pack` checks it ([`crate::package_check`]:
/// the archive reads to its end, nothing escapes, no bomb, a controller has what it needs), so a
/// package enters the object store only after the same check whichever way it comes. Every file
/// the name does not fully describe or the check refuses is one problem; all are reported at once.
pub fn scan(dir: &Path, o: &Overrides) -> Result<Vec<(Package, Source)>, Error> {
    let files = package_files(dir)?;
    let mut out = Vec::new();
    let mut problems: Vec<Error> = Vec::new();
    for path in files {
        if let Some(found) = package_of(path, o, &mut problems) {
            out.push(found);
        }
    }
    if problems.is_empty() {
        return Ok(out);
    }
    Err(Error::all(
        format!(
            "{} problem(s) with the package directory {}; nothing was written",
            problems.len(),
            dir.display()
        ),
        problems,
    ))
}

/// The files directly in `dir`, sorted, hidden ones passed over; none is an error, since an
/// empty directory is more likely the wrong one than a request to do nothing.
fn package_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            return Err(Error::io("cannot read the package directory", dir, e)
                .hint("give --dir the directory that holds the package files"))
        }
    };
    let mut files: Vec<PathBuf> = Vec::new();
    for e in rd.flatten() {
        let path = e.path();
        let hidden = e.file_name().to_string_lossy().starts_with('.');
        if !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::input(format!(
            "the package directory {} holds no package files",
            dir.display()
        ))
        .hint("put the package files (not directories) directly in it; hidden files are passed over"));
    }
    Ok(files)
}

/// One file as a package, from its name and the overrides, once checked; `None` (its problems
/// in `problems`) when the name does not tell enough or the check refuses it.
fn package_of(path: PathBuf, o: &Overrides, problems: &mut Vec<Error>) -> Option<(Package, Source)> {
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let p = parse_name(&file);
    let (object, kind) = object_of(&p.name);
    let mut missing = Vec::new();
    let version = o.version.clone().or(p.version.clone());
    if version.is_none() {
        missing.push("its version (NAME-1.2.3...): give --version");
    }
    let os = o.os.or(p.os);
    if os.is_none() {
        missing.push("its OS (linux or windows in the name): give --os");
    }
    let arch = arch_of(o, p.arch, problems);
    if arch.is_none() && o.arch.is_none() {
        missing.push("its architecture (amd64/x86_64 or arm64/aarch64 in the name): give --arch");
    }
    if !missing.is_empty() {
        problems.push(
            Error::input(format!(
                "{}: the file name does not tell {}",
                path.display(),
                missing.join("; nor ")
            ))
            .hint(NAMING_HINT),
        );
        return None;
    }
    let (Some(version), Some(os), Some(arch)) = (version, os, arch) else {
        return None;
    };
    let kind = o.kind.unwrap_or(kind);
    let object = o.object.clone().unwrap_or(object);
    // The one check every package passes, as in `pack`.
    if let Err(e) = crate::package_check::check(&path, kind, os) {
        problems.push(e);
        return None;
    }
    Some((
        Package {
            file: None,
            name: file,
            kind,
            os,
            arch,
            object,
            version,
            description: String::new(),
            from: None,
            entry: None,
            sha256: None,
            size: None,
        },
        Source::File(path),
    ))
}

/// The architecture: `--arch` (normalized; an unknown one is a problem) over the name's.
fn arch_of(o: &Overrides, from_name: Option<&'static str>, problems: &mut Vec<Error>) -> Option<String> {
    match &o.arch {
        Some(a) => match normalize_arch(a) {
            Some(a) => Some(a.to_string()),
            None => {
                problems.push(
                    Error::input(format!("--arch {a:?}: expected x86_64 (amd64) or arm64 (aarch64)"))
                        .hint("give --arch x86_64 or --arch arm64"),
                );
                None
            }
        },
        None => from_name.map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_as_the_server_parses_them() {
        let p = parse_name("telegraf-1.28.3-linux-amd64.tar.gz");
        assert_eq!(
            p,
            Parsed {
                name: "telegraf".into(),
                version: Some("1.28.3".into()),
                os: Some(Os::Linux),
                arch: Some("x86_64"),
            }
        );
        let p = parse_name("fusion-collectors_v2.0.1.4_windows_x86_64.zip");
        assert_eq!(p.name, "fusion-collectors");
        assert_eq!(p.version.as_deref(), Some("2.0.1.4"));
        assert_eq!((p.os, p.arch), (Some(Os::Windows), Some("x86_64")));
        // No version in the name: the whole stem is the name.
        let p = parse_name("fusion-collectors-linux-arm64.zip");
        assert_eq!((p.name.as_str(), p.version), ("fusion-collectors-linux-arm64", None));
        assert_eq!(p.arch, Some("arm64"));
        // A version must be followed by the end or a separator, and have three or four parts.
        assert_eq!(parse_name("nats-executor-1.2.tar.gz").version, None);
        assert_eq!(parse_name("vector-0.39.0x.tgz").version, None);
        assert_eq!(parse_name("vector-0.39.0-aarch64.rpm").arch, Some("arm64"));
        assert_eq!(parse_name("a-1.2.3.4.5.zip").version, None);
        assert_eq!(parse_name("agent.exe").os, Some(Os::Windows));
    }

    #[test]
    fn objects_have_the_platform_spelling() {
        assert_eq!(object_of("fusion-collectors-linux-amd64").0, "Controller");
        assert_eq!(object_of("fusion-collectors").1, PackageType::Controller);
        assert_eq!(object_of("telegraf"), ("Telegraf".into(), PackageType::Collector));
        assert_eq!(object_of("nats-executor-linux").0, "NATS-Executor");
        assert_eq!(object_of("my-probe").0, "my-probe");
    }

    /// A small valid `.tar.gz` holding one file.
    fn tiny_tgz() -> Vec<u8> {
        let mut out = Vec::new();
        {
            let gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
            let mut t = tar::Builder::new(gz);
            let mut h = tar::Header::new_gnu();
            h.set_size(2);
            h.set_mode(0o755);
            t.append_data(&mut h, "bin/probe", &b"x\n"[..]).unwrap();
            t.into_inner().unwrap().finish().unwrap();
        }
        out
    }

    #[test]
    fn a_directory_lists_every_file_it_cannot_describe() {
        let d = tempfile::tempdir().unwrap();
        // Real archives: every file is checked as pack checks it.
        std::fs::write(d.path().join("telegraf-1.28.3-linux-amd64.tar.gz"), tiny_tgz()).unwrap();
        std::fs::write(d.path().join("vector-linux-amd64.tar.gz"), tiny_tgz()).unwrap();
        std::fs::write(d.path().join("probe-1.0.0"), b"x").unwrap();
        std::fs::write(d.path().join(".hidden"), b"x").unwrap();
        let e = scan(d.path(), &Overrides::default()).unwrap_err();
        let lines: Vec<&str> = e.message.lines().skip(1).collect();
        assert!(e.message.starts_with("2 problem(s)"), "{}", e.message);
        assert!(
            lines
                .iter()
                .any(|m| m.contains("vector-linux-amd64.tar.gz") && m.contains("--version")),
            "{e:?}"
        );
        assert!(
            lines
                .iter()
                .any(|m| m.contains("probe-1.0.0") && m.contains("--os") && m.contains("--arch")),
            "{e:?}"
        );
        assert!(e.hints.iter().any(|h| h.contains("--version")), "{:?}", e.hints);
        let o = Overrides {
            version: Some("9.9.9".into()),
            os: Some(Os::Linux),
            arch: Some("amd64".into()),
            ..Default::default()
        };
        let ok = scan(d.path(), &o).unwrap();
        assert_eq!(ok.len(), 3);
        assert!(ok.iter().all(|(p, _)| p.version == "9.9.9" && p.arch == "x86_64"));
        assert_eq!(ok[0].0.object, "probe");
        assert_eq!(ok[2].0.object, "Vector");
    }

    #[test]
    fn damaged_archives_are_refused_as_pack_refuses_them() {
        let d = tempfile::tempdir().unwrap();
        // Collectors, which were not checked at all: random bytes named .tar.gz, a cut zip.
        std::fs::write(d.path().join("telegraf-1.28.3-linux-amd64.tar.gz"), [0x5a; 3000]).unwrap();
        let mut zip = Vec::new();
        {
            use std::io::Write;
            let mut z = zip::ZipWriter::new(std::io::Cursor::new(&mut zip));
            z.start_file("vector", zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(&[1u8; 5000]).unwrap();
            z.finish().unwrap();
        }
        std::fs::write(d.path().join("vector-0.39.0-linux-amd64.zip"), &zip[..zip.len() / 2]).unwrap();
        let e = format!("{:?}", scan(d.path(), &Overrides::default()).unwrap_err());
        assert!(e.contains("telegraf-1.28.3-linux-amd64.tar.gz"), "{e}");
        assert!(e.contains("vector-0.39.0-linux-amd64.zip"), "{e}");
    }
}
