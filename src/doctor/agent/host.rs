//! The agent host itself: free space and inodes on the filesystem of the install dir (the
//! sidecar writes its node id, cache, logs and collector configs there), the memory available,
//! and the agent's binaries present and executable (the sidecar runs only what is under `bin/`,
//! its `collector_binaries_accesslist`).
//!
//! The thresholds and their judging are pure functions of the measured values, so the tests
//! give them any disk or memory; the measuring (statvfs, /proc/meminfo) is thin.

use super::{add, AgentConfig, Host};
use crate::doctor::{Finding, Severity};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

const CHECK: &str = "host";

const MIB: u64 = 1 << 20;
/// Less free space than this is an error: the sidecar cannot even write its node id or a config.
const DISK_ERROR: u64 = 10 * MIB;
/// Less than this (or than [`DISK_WARN_PERCENT`] of the filesystem) is a warning.
const DISK_WARN: u64 = 200 * MIB;
const DISK_WARN_PERCENT: u64 = 5;
const INODES_ERROR: u64 = 100;
const INODES_WARN: u64 = 1000;
const MEMORY_WARN: u64 = 64 * MIB;
/// The most entries under `bin/` looked at.
const MAX_BIN_ENTRIES: usize = 512;

/// A filesystem's free and total space and inodes. Free is what any process may use
/// (`f_bavail`): the blocks reserved for root are not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Space {
    pub free: u64,
    pub total: u64,
    pub free_inodes: u64,
    /// 0 on filesystems without a fixed inode table (btrfs, some network ones).
    pub total_inodes: u64,
}

/// `statvfs(2)` of `path`.
fn statvfs(path: &Path) -> std::io::Result<Space> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between libc targets
    Ok(Space {
        free: s.f_bavail as u64 * s.f_frsize as u64,
        total: s.f_blocks as u64 * s.f_frsize as u64,
        free_inodes: s.f_favail as u64,
        total_inodes: s.f_files as u64,
    })
}

/// `dir`, or its nearest parent that exists (the filesystem it would be on).
fn existing(dir: &Path) -> PathBuf {
    dir.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

fn mib(n: u64) -> String {
    if n >= 10 * MIB {
        format!("{} MiB", n / MIB)
    } else {
        format!("{:.1} MiB", n as f64 / MIB as f64)
    }
}

/// The disk and inode findings for `space` of the filesystem holding `dir`:
/// (check subject, severity, message, evidence, fix).
pub(crate) fn judge_space(dir: &Path, space: &Space) -> Vec<(String, Severity, String, String, String)> {
    let mut out = Vec::new();
    let percent = (space.free as u128 * 100)
        .checked_div(space.total as u128)
        .unwrap_or(100) as u64;
    let evidence = format!(
        "statvfs {}: {} free of {} ({percent}%), {} of {} inodes free",
        dir.display(),
        mib(space.free),
        mib(space.total),
        space.free_inodes,
        space.total_inodes
    );
    let fix = format!(
        "free space on the filesystem of {0} (`df -h {0}`; old logs: `du -sh {0}/log {0}/cache`), then `systemctl restart bk-sidecar`",
        dir.display()
    );
    let disk = if space.free < DISK_ERROR {
        Some((
            Severity::Error,
            format!(
                "{} free under {}, less than {}: the agent cannot write its node id, configs or logs",
                mib(space.free),
                dir.display(),
                mib(DISK_ERROR)
            ),
        ))
    } else if space.free < DISK_WARN || percent < DISK_WARN_PERCENT {
        Some((
            Severity::Warning,
            format!(
                "{} free under {} ({percent}% of the filesystem): less than {} or {DISK_WARN_PERCENT}%, and the collectors' \
                 logs and caches grow",
                mib(space.free),
                dir.display(),
                mib(DISK_WARN)
            ),
        ))
    } else {
        None
    };
    if let Some((severity, message)) = disk {
        out.push((
            format!("disk {}", dir.display()),
            severity,
            message,
            evidence.clone(),
            fix.clone(),
        ));
    }
    if space.total_inodes > 0 {
        let inodes = if space.free_inodes < INODES_ERROR {
            Some(Severity::Error)
        } else if space.free_inodes < INODES_WARN {
            Some(Severity::Warning)
        } else {
            None
        };
        if let Some(severity) = inodes {
            let limit = if severity == Severity::Error {
                INODES_ERROR
            } else {
                INODES_WARN
            };
            out.push((
                format!("inodes {}", dir.display()),
                severity,
                format!(
                    "{} free inodes on the filesystem of {}, fewer than {limit}: new files (configs, logs) cannot be created",
                    space.free_inodes,
                    dir.display()
                ),
                evidence,
                format!(
                    "remove the many small files on that filesystem (`find {} -xdev -type f | cut -d/ -f2-4 | sort | uniq -c | sort -n | tail`)",
                    existing(dir).display()
                ),
            ));
        }
    }
    out
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (kernels before 3.14 have none).
pub(crate) fn mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// A binary's problem: (severity, message, fix), or `None` when it is a regular executable.
fn binary_problem(path: &Path) -> Option<(Severity, String, String)> {
    let reinstall = "reinstall this agent from the node manager (its package carries the binaries)";
    let link = std::fs::symlink_metadata(path);
    let m = match (&link, std::fs::metadata(path)) {
        (_, Ok(m)) => m,
        (Ok(l), Err(_)) if l.file_type().is_symlink() => {
            let target = std::fs::read_link(path)
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            return Some((
                Severity::Error,
                format!(
                    "{} is a broken symlink (to {target}): the sidecar cannot run it",
                    path.display()
                ),
                reinstall.into(),
            ));
        }
        (_, Err(_)) => {
            return Some((
                Severity::Error,
                format!("{} is missing: the sidecar cannot run it", path.display()),
                reinstall.into(),
            ))
        }
    };
    if !m.is_file() {
        return Some((
            Severity::Error,
            format!("{} is not a regular file", path.display()),
            reinstall.into(),
        ));
    }
    let mode = m.permissions().mode();
    if mode & 0o111 == 0 {
        return Some((
            Severity::Error,
            format!(
                "{} is not executable (mode {:o}): the sidecar cannot start it",
                path.display(),
                mode & 0o7777
            ),
            format!("chmod +x {}   (then `systemctl restart bk-sidecar`)", path.display()),
        ));
    }
    None
}

/// The regular files (and symlinks) under `bin`, and one level of subdirectories (the
/// sidecar's accesslist is `bin/*` and `bin/*/*`), in name order, at most [`MAX_BIN_ENTRIES`].
fn bin_files(bin: &Path) -> (Vec<PathBuf>, bool) {
    let mut files = Vec::new();
    let mut seen = 0;
    let mut cut = false;
    let mut dirs = vec![(bin.to_path_buf(), 0)];
    while let Some((d, depth)) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        let mut entries: Vec<_> = rd.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            seen += 1;
            if seen > MAX_BIN_ENTRIES {
                cut = true;
                break;
            }
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                if depth == 0 {
                    dirs.push((e.path(), 1));
                }
            } else if t.is_file() || t.is_symlink() {
                files.push(e.path());
            }
        }
    }
    files.sort();
    (files, cut)
}

/// The host check. See the module documentation.
pub(super) fn check(cfg: &AgentConfig, host: &Host, out: &mut Vec<Finding>) {
    let dir = &cfg.install_dir;
    let measured = existing(dir);
    match statvfs(&measured) {
        Ok(space) => {
            for (subject, severity, message, evidence, fix) in judge_space(dir, &space) {
                add(out, CHECK, severity, subject, message).evidence(evidence).fix(fix);
            }
        }
        Err(e) => {
            add(
                out,
                CHECK,
                Severity::Warning,
                format!("disk {}", dir.display()),
                format!("the free space under {} cannot be read: {e}", dir.display()),
            )
            .evidence(format!("statvfs {}: {e}", measured.display()))
            .fix(format!("df -h {} ; df -i {}", measured.display(), measured.display()));
        }
    }
    if let Some(avail) = std::fs::read_to_string(&host.meminfo)
        .ok()
        .as_deref()
        .and_then(mem_available)
    {
        if avail < MEMORY_WARN {
            add(
                out,
                CHECK,
                Severity::Warning,
                "memory",
                format!(
                    "{} of memory available, less than {}: the sidecar and its collectors may be killed for memory",
                    mib(avail),
                    mib(MEMORY_WARN)
                ),
            )
            .evidence(format!("{}: MemAvailable: {} kB", host.meminfo.display(), avail / 1024))
            .fix("stop what uses the memory (`ps aux --sort=-rss | head`), or give the host more");
        }
    }
    // The binaries only where an agent was found: its absence is said once, by the config check.
    if cfg.sidecar_file.is_none() {
        return;
    }
    let mut binaries = vec![dir.join("collector-sidecar")];
    let (files, cut) = bin_files(&dir.join("bin"));
    binaries.extend(files);
    for b in binaries {
        if let Some((severity, message, fix)) = binary_problem(&b) {
            let evidence = match std::fs::symlink_metadata(&b) {
                Ok(m) => format!(
                    "{}: mode {:o}, {} bytes",
                    b.display(),
                    m.permissions().mode() & 0o7777,
                    m.len()
                ),
                Err(e) => format!("{}: {e}", b.display()),
            };
            add(out, CHECK, severity, format!("binary {}", b.display()), message)
                .evidence(evidence)
                .fix(fix);
        }
    }
    if cut {
        add(
            out,
            CHECK,
            Severity::Info,
            format!("binary {}", dir.join("bin").display()),
            format!("more than {MAX_BIN_ENTRIES} entries under bin/: only the first {MAX_BIN_ENTRIES} were checked"),
        )
        .evidence(format!(
            "{}: more than {MAX_BIN_ENTRIES} entries",
            dir.join("bin").display()
        ))
        .fix(format!("ls -l {}", dir.join("bin").display()));
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{by_subject, host, write};
    use super::*;

    fn space(free: u64, total: u64, free_inodes: u64) -> Space {
        Space {
            free,
            total,
            free_inodes,
            total_inodes: 100_000,
        }
    }

    #[test]
    fn disk_and_inodes_are_judged() {
        let d = Path::new("/opt/fusion-collectors");
        let gib = 1 << 30;
        assert!(judge_space(d, &space(50 * gib, 100 * gib, 50_000)).is_empty());
        let v = judge_space(d, &space(5 * MIB, 100 * gib, 50_000));
        assert_eq!(
            (v[0].0.as_str(), v[0].1),
            ("disk /opt/fusion-collectors", Severity::Error)
        );
        assert!(
            v[0].2
                .starts_with("5.0 MiB free under /opt/fusion-collectors, less than 10 MiB"),
            "{}",
            v[0].2
        );
        assert!(
            v[0].3
                .starts_with("statvfs /opt/fusion-collectors: 5.0 MiB free of 102400 MiB (0%)"),
            "{}",
            v[0].3
        );
        assert_eq!(judge_space(d, &space(150 * MIB, gib, 50_000))[0].1, Severity::Warning);
        // 4% of a large disk is a warning although it is many MiB.
        assert_eq!(
            judge_space(d, &space(4 * gib, 100 * gib, 50_000))[0].1,
            Severity::Warning
        );
        let v = judge_space(d, &space(50 * gib, 100 * gib, 500));
        assert_eq!(
            (v[0].0.as_str(), v[0].1),
            ("inodes /opt/fusion-collectors", Severity::Warning)
        );
        assert_eq!(judge_space(d, &space(50 * gib, 100 * gib, 50))[0].1, Severity::Error);
        // No inode table: no inode finding.
        let mut s = space(50 * gib, 100 * gib, 0);
        s.total_inodes = 0;
        assert!(judge_space(d, &s).is_empty());
    }

    #[test]
    fn meminfo_parses() {
        let m = "MemTotal:        3861364 kB\nMemFree:          123456 kB\nMemAvailable:      40000 kB\n";
        assert_eq!(mem_available(m), Some(40_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    fn agent(dir: &Path) -> AgentConfig {
        AgentConfig {
            install_dir: dir.to_path_buf(),
            sidecar_file: Some(dir.join("sidecar.yml")),
            ..Default::default()
        }
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn binaries_must_be_there_and_executable() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("opt");
        let h = host(t.path());
        write(&h.meminfo, "MemAvailable:  4000000 kB\n");
        write(&dir.join("bin/nats-executor"), "#!/bin/sh\n");
        chmod(&dir.join("bin/nats-executor"), 0o644);
        write(&dir.join("bin/telegraf/telegraf"), "#!/bin/sh\n");
        chmod(&dir.join("bin/telegraf/telegraf"), 0o755);
        std::os::unix::fs::symlink(dir.join("bin/gone"), dir.join("bin/dangling")).unwrap();
        let mut out = Vec::new();
        check(&agent(&dir), &h, &mut out);
        let f = by_subject(&out, &format!("binary {}", dir.join("collector-sidecar").display()));
        assert_eq!((f.check, f.severity), (CHECK, Severity::Error));
        assert!(f.message.contains("is missing"));
        let f = by_subject(&out, &format!("binary {}", dir.join("bin/nats-executor").display()));
        assert_eq!(f.severity, Severity::Error);
        assert!(f.message.contains("not executable (mode 644)"), "{}", f.message);
        assert_eq!(
            f.fix.as_deref().unwrap(),
            format!(
                "chmod +x {}   (then `systemctl restart bk-sidecar`)",
                dir.join("bin/nats-executor").display()
            )
        );
        assert!(
            by_subject(&out, &format!("binary {}", dir.join("bin/dangling").display()))
                .message
                .contains("broken symlink")
        );
        assert!(!out.iter().any(|f| f.subject.contains("telegraf")), "{out:#?}");
        assert!(
            !out.iter()
                .any(|f| f.subject.starts_with("disk") || f.subject == "memory"),
            "{out:#?}"
        );
        assert_eq!(out.len(), 3, "{out:#?}");
    }

    #[test]
    fn low_memory_is_a_warning_and_a_missing_agent_checks_no_binaries() {
        let t = tempfile::tempdir().unwrap();
        let h = host(t.path());
        write(&h.meminfo, "MemTotal: 500000 kB\nMemAvailable:   30000 kB\n");
        let cfg = AgentConfig {
            install_dir: t.path().join("not/there"),
            ..Default::default()
        };
        let mut out = Vec::new();
        check(&cfg, &h, &mut out);
        assert_eq!(out.len(), 1, "{out:#?}");
        let f = by_subject(&out, "memory");
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.evidence[0].ends_with("MemAvailable: 30000 kB"));
    }

    #[test]
    fn bin_is_bounded() {
        let t = tempfile::tempdir().unwrap();
        let bin = t.path().join("bin");
        for i in 0..(MAX_BIN_ENTRIES + 5) {
            write(&bin.join(format!("b{i:04}")), "");
        }
        let (files, cut) = bin_files(&bin);
        assert_eq!(files.len(), MAX_BIN_ENTRIES);
        assert!(cut);
    }

    #[test]
    fn statvfs_reads_a_real_filesystem() {
        let t = tempfile::tempdir().unwrap();
        let s = statvfs(&existing(&t.path().join("a/b"))).unwrap();
        assert!(s.total > 0 && s.free <= s.total, "{s:?}");
    }
}
