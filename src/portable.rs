//! The binary that travels inside bundles runs on the field's hosts: CentOS 7 (glibc 2.17),
//! Kylin V10, UOS, RHEL 8, Ubuntu 20.04, Debian 11, and busybox containers with no libc at all.
//! So it links glibc statically (.cargo/config.toml) and needs no libc on the host; [`check`]
//! reads a binary's ELF to say whether it would start there, and `pack` refuses one that would
//! not.
//!
//! A static glibc cannot load the host's NSS modules (sss, mdns, myhostname, ...: they are built
//! against the host's own libc), but its `files` and `dns` services are built in (glibc 2.34 on).
//! [`init`] makes host name lookups use exactly those two, as musl-based tools do: `/etc/hosts`,
//! then the nameservers of `/etc/resolv.conf`. A site whose host names come from LDAP or sssd
//! gives bkbundle addresses, or `/etc/hosts` entries (README, "Host requirements").
//! [`lookup_within`] bounds one lookup for the diagnoses that must end in seconds.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

/// The oldest glibc of the field's hosts (CentOS 7): a binary may need no newer symbol version.
pub const OLDEST_GLIBC: (u32, u32) = (2, 17);

/// Make name lookups use `/etc/hosts` and DNS only, never an NSS module of the host (see the
/// module documentation). Call once at start, before any thread resolves a name.
pub fn init() {
    #[cfg(all(target_os = "linux", target_env = "gnu", target_feature = "crt-static"))]
    {
        extern "C" {
            // glibc's <nss.h>; present in every release since 2.0.
            fn __nss_configure_lookup(db: *const libc::c_char, service_line: *const libc::c_char) -> libc::c_int;
        }
        // SAFETY: two NUL-terminated static strings; glibc copies what it keeps. Called before
        // any lookup (the function is not thread-safe against concurrent lookups).
        unsafe {
            __nss_configure_lookup(c"hosts".as_ptr(), c"files dns".as_ptr());
        }
    }
}

/// `host:port` resolved by the system's resolver (as `tokio::net::lookup_host`), given up after
/// `within`. The lookup runs on a thread of its own that nothing waits for: a resolver stuck on
/// a nameserver that drops packets (glibc tries each for 5 s, twice) must not hold up the end of
/// the run, as a runtime's blocking task would when the runtime shuts down.
pub async fn lookup_within(host: &str, port: u16, within: Duration) -> std::io::Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs as _;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = host.to_string();
    let spawned = std::thread::Builder::new()
        .name("bkbundle-resolve".into())
        .spawn(move || {
            let _ = tx.send((name.as_str(), port).to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
        });
    let answer = match spawned {
        Ok(_) => {
            tokio::time::timeout(within, async {
                rx.await
                    .unwrap_or_else(|_| Err(std::io::Error::other("the resolver thread ended without an answer")))
            })
            .await
        }
        // No thread to be had: the runtime's blocking pool then.
        Err(_) => {
            tokio::time::timeout(within, async {
                tokio::net::lookup_host((host, port)).await.map(|a| a.collect())
            })
            .await
        }
    };
    answer.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from the resolver within {} ms", within.as_millis()),
        ))
    })
}

/// What a binary needs from the host that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct BinaryNeeds {
    /// The ELF machine (62: x86-64).
    pub machine: u16,
    /// The dynamic loader it names (`/lib64/ld-linux-x86-64.so.2`); none for a static binary.
    pub interpreter: Option<String>,
    /// Shared libraries it needs (DT_NEEDED).
    pub libraries: Vec<String>,
    /// Symbol versions it needs from them (`GLIBC_2.34`, ...), sorted.
    pub versions: Vec<String>,
}

impl BinaryNeeds {
    /// The newest `GLIBC_x.y` among [`Self::versions`].
    pub fn newest_glibc(&self) -> Option<(u32, u32)> {
        self.versions.iter().filter_map(|v| glibc_version(v)).max()
    }

    /// Starts on every x86-64 Linux from glibc [`OLDEST_GLIBC`] on.
    pub fn portable(&self) -> bool {
        self.machine == EM_X86_64 && self.newest_glibc().is_none_or(|v| v <= OLDEST_GLIBC)
    }

    /// One line for reports: `static (no libc needed)`, `needs GLIBC_2.34 (libc.so.6, ...)`.
    pub fn describe(&self) -> String {
        if self.interpreter.is_none() && self.libraries.is_empty() {
            return "static, needs no libc".into();
        }
        match self.newest_glibc() {
            Some((a, b)) => format!("dynamic, needs GLIBC_{a}.{b} ({})", self.libraries.join(", ")),
            None => format!("dynamic, needs {}", self.libraries.join(", ")),
        }
    }
}

const EM_X86_64: u16 = 62;

fn glibc_version(v: &str) -> Option<(u32, u32)> {
    let rest = v.strip_prefix("GLIBC_")?;
    let mut parts = rest.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().unwrap_or("0").parse().ok()?;
    Some((major, minor))
}

/// Refuse a binary that would not start on the field's hosts (see [`BinaryNeeds::portable`]).
pub fn check(path: &Path) -> Result<BinaryNeeds> {
    let needs = read_needs(path).map_err(|e| e.hint(BUILD_HINT).hint(BINARY_HINT))?;
    if needs.portable() {
        return Ok(needs);
    }
    let found = if needs.machine != EM_X86_64 {
        format!("an ELF for machine {}, not x86-64", needs.machine)
    } else {
        needs.describe()
    };
    Err(Error::input(format!(
        "the bkbundle binary to carry in the bundle ({}) would not start on the offline hosts: expected a binary that runs from glibc {}.{} on (static, or no symbol version above GLIBC_{}.{}), found {found}",
        path.display(),
        OLDEST_GLIBC.0,
        OLDEST_GLIBC.1,
        OLDEST_GLIBC.0,
        OLDEST_GLIBC.1,
    ))
    .hint(BUILD_HINT)
    .hint(BINARY_HINT))
}

const BUILD_HINT: &str = "build bkbundle from its source tree (`cargo build --release`: .cargo/config.toml links glibc statically) and pack with that binary";
const BINARY_HINT: &str = "or give one with --binary PATH";

// ---------------------------------------------------------------------------------------------
// ELF reading: the program headers (PT_INTERP), and the sections `.dynamic` (DT_NEEDED) and
// `.gnu.version_r` (needed symbol versions) with their string tables. Positional reads of what is
// needed only; every size read from the file is checked and bounded.

const MAX_SECTION: u64 = 4 << 20;
const MAX_ENTRIES: u64 = 1 << 16;

/// Read what `path` needs from its host (see [`BinaryNeeds`]).
pub fn read_needs(path: &Path) -> Result<BinaryNeeds> {
    let f = File::open(path).map_err(|e| Error::io("cannot open the binary", path, e))?;
    let bad = |what: &str| {
        Error::input(format!(
            "{} is not a readable 64-bit little-endian ELF executable: {what}",
            path.display()
        ))
    };
    let elf = Elf { f: &f, path };
    let ident = elf.bytes(0, 64)?;
    if ident.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(bad("no ELF magic"));
    }
    if ident[4] != 2 || ident[5] != 1 {
        return Err(bad("not ELFCLASS64/ELFDATA2LSB"));
    }
    let mut needs = BinaryNeeds {
        machine: u16le(&ident, 18),
        ..Default::default()
    };
    let (phoff, phentsize, phnum) = (u64le(&ident, 32), u16le(&ident, 54) as u64, u16le(&ident, 56) as u64);
    let (shoff, shentsize, shnum) = (u64le(&ident, 40), u16le(&ident, 58) as u64, u16le(&ident, 60) as u64);
    if phentsize < 56 && phnum > 0 || shentsize < 64 && shnum > 0 {
        return Err(bad("header entry sizes too small"));
    }
    for i in 0..phnum {
        let off = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(|| bad("program header offset overflows"))?;
        let ph = elf.bytes(off, 56)?;
        if u32le(&ph, 0) == 3 {
            // PT_INTERP: a NUL-terminated path.
            let s = elf.bytes(u64le(&ph, 8), u64le(&ph, 32).min(4096))?;
            needs.interpreter = Some(cstr(&s, 0));
        }
    }
    let mut sections = Vec::new();
    for i in 0..shnum {
        let off = i
            .checked_mul(shentsize)
            .and_then(|o| o.checked_add(shoff))
            .ok_or_else(|| bad("section header offset overflows"))?;
        let sh = elf.bytes(off, 64)?;
        sections.push((u32le(&sh, 4), u64le(&sh, 24), u64le(&sh, 32), u32le(&sh, 40)));
    }
    let strtab = |link: u32| -> Result<Vec<u8>> {
        let (_, off, size, _) = *sections
            .get(link as usize)
            .ok_or_else(|| bad("a string table index out of range"))?;
        elf.bytes(off, size)
    };
    for &(kind, off, size, link) in &sections {
        match kind {
            // SHT_DYNAMIC: (tag, value) pairs; DT_NEEDED = 1, DT_NULL = 0 ends them.
            6 => {
                let data = elf.bytes(off, size)?;
                let strs = strtab(link)?;
                for e in data.chunks_exact(16).take(MAX_ENTRIES as usize) {
                    match u64le(e, 0) {
                        0 => break,
                        1 => needs.libraries.push(cstr(&strs, u64le(e, 8))),
                        _ => {}
                    }
                }
            }
            // SHT_GNU_verneed: Verneed records, each with a chain of Vernaux (version names).
            0x6fff_fffe => {
                let data = elf.bytes(off, size)?;
                let strs = strtab(link)?;
                let mut at = 0u64;
                for _ in 0..MAX_ENTRIES {
                    let rec = data
                        .get(at as usize..)
                        .filter(|r| r.len() >= 16)
                        .ok_or_else(|| bad("a Verneed record out of its section"))?;
                    let (count, aux, next) = (u16le(rec, 2), u32le(rec, 8) as u64, u32le(rec, 12) as u64);
                    let mut a = at.checked_add(aux).ok_or_else(|| bad("Vernaux offset overflows"))?;
                    for _ in 0..count {
                        let v = data
                            .get(a as usize..)
                            .filter(|r| r.len() >= 16)
                            .ok_or_else(|| bad("a Vernaux record out of its section"))?;
                        needs.versions.push(cstr(&strs, u32le(v, 8) as u64));
                        match u32le(v, 12) {
                            0 => break,
                            n => a = a.checked_add(n as u64).ok_or_else(|| bad("Vernaux offset overflows"))?,
                        }
                    }
                    if next == 0 {
                        break;
                    }
                    at = at.checked_add(next).ok_or_else(|| bad("Verneed offset overflows"))?;
                }
            }
            _ => {}
        }
    }
    needs.versions.sort();
    needs.versions.dedup();
    Ok(needs)
}

struct Elf<'a> {
    f: &'a File,
    path: &'a Path,
}

impl Elf<'_> {
    fn bytes(&self, off: u64, len: u64) -> Result<Vec<u8>> {
        if len > MAX_SECTION {
            return Err(Error::input(format!(
                "{}: an ELF structure of {len} bytes at offset {off} (at most {MAX_SECTION} expected)",
                self.path.display()
            )));
        }
        let mut buf = vec![0; len as usize];
        self.f.read_exact_at(&mut buf, off).map_err(|e| {
            Error::input(format!(
                "{}: cannot read {len} bytes of ELF structure at offset {off}: {e} (a truncated or damaged binary)",
                self.path.display()
            ))
        })?;
        Ok(buf)
    }
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The NUL-terminated string at `at` of a string table (empty when out of range).
fn cstr(table: &[u8], at: u64) -> String {
    let Some(rest) = usize::try_from(at).ok().and_then(|a| table.get(a..)) else {
        return String::new();
    };
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_is_built_the_portable_way() {
        // The unit tests are built with the project's own config: static glibc.
        let me = std::env::current_exe().unwrap();
        let needs = read_needs(&me).unwrap();
        assert_eq!(needs.machine, EM_X86_64);
        assert_eq!(needs.interpreter, None, "{needs:?}");
        assert!(needs.libraries.is_empty() && needs.versions.is_empty(), "{needs:?}");
        assert!(needs.portable());
        assert_eq!(needs.describe(), "static, needs no libc");
        check(&me).unwrap();
    }

    #[test]
    fn a_dynamic_system_binary_names_its_glibc_and_is_refused_when_newer_than_2_17() {
        // Debian's own tools link the host's glibc (2.36 on the build machines).
        let ls = Path::new("/bin/ls");
        let needs = read_needs(ls).unwrap();
        assert!(
            needs.interpreter.as_deref().is_some_and(|i| i.contains("ld-linux")),
            "{needs:?}"
        );
        assert!(needs.libraries.iter().any(|l| l == "libc.so.6"), "{needs:?}");
        let newest = needs.newest_glibc().expect("a GLIBC_ version");
        assert!(newest >= (2, 3), "{needs:?}");
        // Cross-checked with binutils' own reading of the same file.
        let out = std::process::Command::new("readelf")
            .args(["-V", "-W"])
            .arg(ls)
            .output()
            .expect("readelf (binutils)");
        let text = String::from_utf8_lossy(&out.stdout);
        for v in &needs.versions {
            assert!(text.contains(v.as_str()), "readelf does not list {v}");
        }
        let readelf_newest = text.split_whitespace().filter_map(glibc_version).max().unwrap();
        assert_eq!(readelf_newest, newest);
        if newest > OLDEST_GLIBC {
            let e = check(ls).unwrap_err();
            assert!(
                e.message.contains(&format!("needs GLIBC_{}.{}", newest.0, newest.1)),
                "{}",
                e.message
            );
            assert!(e.message.contains("/bin/ls"), "{}", e.message);
        }
    }

    #[test]
    fn damaged_files_are_refused_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let p = dir.path().join("b");
        // Not ELF; truncated headers; section table pointing past the end; huge counts.
        let mut cases: Vec<Vec<u8>> = vec![b"#!/bin/sh\n".to_vec(), me[..40].to_vec(), me[..64].to_vec()];
        let mut far = me[..4096].to_vec();
        far[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push(far);
        let mut many = me[..4096].to_vec();
        many[60..62].copy_from_slice(&u16::MAX.to_le_bytes());
        cases.push(many);
        for (i, c) in cases.iter().enumerate() {
            std::fs::write(&p, c).unwrap();
            let e = read_needs(&p).unwrap_err();
            assert!(e.message.contains(&p.display().to_string()), "case {i}: {}", e.message);
            // pack's check says what to carry instead.
            let e = check(&p).unwrap_err();
            assert_eq!(e.hints, [BUILD_HINT, BINARY_HINT], "case {i}");
        }
        assert_eq!(glibc_version("GLIBC_2.34"), Some((2, 34)));
        assert_eq!(glibc_version("GLIBC_PRIVATE"), None);
        assert_eq!(cstr(b"abc\0def\0", 4), "def");
        assert_eq!(cstr(b"abc", 99), "");
    }
}
