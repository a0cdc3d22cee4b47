//! Exclusive locks, so that two operators (or a script and an operator) never change the same
//! thing at once: one lock per install target (`TARGET/.bkbundle/install.lock`, taken by
//! `install` before it changes anything) and one per NATS object-store bucket (for uploads).
//!
//! A lock is flock(2) on a lock file, held for the life of the [`LockGuard`]. The kernel drops it
//! when the holder exits, however it exits, so a killed run never leaves a lock that blocks the
//! next one. Inside the file the holder records its pid, the time it took the lock and its command
//! line, so that a second run can say who holds it; a record left by a run that was killed (its
//! pid is gone, or was reused by another process) is reported as taken over.
//!
//! Where bucket locks live: `/run/lock/bkbundle/` (created 0755 by root), else
//! `$XDG_RUNTIME_DIR/bkbundle/`, else a private 0700 `bkbundle-locks-<uid>` directory in the
//! temporary directory; `BKBUNDLE_LOCK_DIR` overrides all three. Two uploads to one bucket contend
//! only when they see the same directory (runs as root on the host do).

use crate::digest::sha256_hex;
use crate::error::{Error, IoContext, Kind, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a second run waits for a lock before it refuses, unless told otherwise.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// The install lock's file name in the target's state directory.
pub const TARGET_LOCK: &str = "install.lock";
const POLL: Duration = Duration::from_millis(100);

/// Who holds (or held) a lock, as recorded in its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// When the lock was taken (UTC, RFC 3339).
    pub started: String,
    /// The holder's command line.
    pub command: String,
    /// What the lock protects ("install target /opt/bklite", "NATS bucket ...").
    #[serde(default)]
    pub what: String,
    /// The holder's start time in clock ticks since boot (/proc/PID/stat), to tell a reused pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proc_start: Option<u64>,
}

impl Holder {
    fn me(what: &str) -> Holder {
        let pid = std::process::id();
        Holder {
            pid,
            started: crate::pack::rfc3339(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            ),
            command: own_command(),
            what: what.to_string(),
            proc_start: proc_start(pid),
        }
    }

    /// Whether the recorded process still runs (the same process: a reused pid does not count).
    pub fn alive(&self) -> bool {
        if !pid_alive(self.pid) {
            return false;
        }
        match (self.proc_start, proc_start(self.pid)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }

    /// "pid 1234 (`bkbundle install ...`), started 2026-...Z".
    pub fn describe(&self) -> String {
        if self.pid == 0 {
            return "a process that left no record (not a bkbundle run, or one that is just starting)".into();
        }
        format!("pid {} (`{}`), started {}", self.pid, self.command, self.started)
    }
}

/// A held lock: released (and its record cleared) when dropped, or by the kernel when the process
/// exits.
#[derive(Debug)]
pub struct LockGuard {
    file: File,
    path: PathBuf,
    /// The record of a holder that was killed without releasing the lock, taken over here.
    pub stale: Option<Holder>,
    /// How long this run waited for the lock.
    pub waited: Duration,
}

impl LockGuard {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A line for the report when a stale lock was taken over.
    pub fn takeover_note(&self) -> Option<String> {
        self.stale.as_ref().map(|h| {
            format!(
                "took over the lock {} left by {}, which is no longer running (it was killed or crashed; re-running completes its work)",
                self.path.display(),
                h.describe()
            )
        })
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // A cleared record tells the next holder this run ended cleanly (best effort: the kernel
        // releases the lock itself when the file is closed).
        let _ = self.file.set_len(0);
    }
}

/// The exclusive lock of the install target `target` (which must exist): the file
/// `TARGET/.bkbundle/install.lock`, in the target's 0700 state directory.
pub fn acquire_target(target: &Path, wait: Duration, on_wait: &dyn Fn(&str)) -> Result<LockGuard> {
    let dir = crate::install::journal::state_dir(target)?;
    acquire(
        &dir.join(TARGET_LOCK),
        &format!("install target {}", target.display()),
        wait,
        on_wait,
    )
    .map_err(|e| match e.kind {
        Kind::Busy => e.hint("or let install wait longer for it: --lock-wait SECS"),
        _ => e,
    })
}

/// The holder of the target's install lock, if another process holds it now (read-only).
pub fn target_holder(target: &Path) -> Option<Holder> {
    holder_of(&target.join(crate::install::journal::DIR).join(TARGET_LOCK))
}

/// The exclusive lock of one object-store bucket on one NATS system, for uploads: at most one
/// upload per bucket at a time. `nats_display` names the server(s) as shown to the operator (no
/// credentials); the lock file is named by a digest of it and the bucket. Waits up to `wait`, then
/// refuses naming the holder (exit code 11).
///
/// Blocks (sleeping) while it waits: from async code use [`acquire_bucket_async`].
pub fn acquire_bucket(nats_display: &str, bucket: &str, wait: Duration) -> Result<LockGuard> {
    acquire_bucket_in(&bucket_lock_dir()?, nats_display, bucket, wait)
}

/// [`acquire_bucket`] on a blocking thread, for async callers (the packages step, before its first
/// write to the bucket; keep the guard until the last write is done).
pub async fn acquire_bucket_async(nats_display: &str, bucket: &str, wait: Duration) -> Result<LockGuard> {
    let (n, b) = (nats_display.to_string(), bucket.to_string());
    tokio::task::spawn_blocking(move || acquire_bucket(&n, &b, wait))
        .await
        .map_err(|e| Error::internal(format!("bucket lock task: {e}")))?
}

/// [`acquire_bucket`] with its lock directory given (tests).
pub fn acquire_bucket_in(dir: &Path, nats_display: &str, bucket: &str, wait: Duration) -> Result<LockGuard> {
    let name = format!("{}.lock", bucket_stem(nats_display, bucket));
    acquire(
        &dir.join(name),
        &format!("NATS bucket {bucket:?} on {nats_display}"),
        wait,
        &|_| {},
    )
}

fn bucket_stem(nats_display: &str, bucket: &str) -> String {
    let key = sha256_hex(format!("{nats_display}\0{bucket}").as_bytes());
    format!("bucket-{}", key.get(..24).unwrap_or(&key))
}

/// The file, beside the bucket's lock, in which the lock's holder lists the uploads it has begun
/// (the nuids of their chunks) until each is finished or cleaned up: what a killed upload left in
/// the stream, for the next holder to remove.
pub fn bucket_pending_file(nats_display: &str, bucket: &str) -> Result<PathBuf> {
    Ok(bucket_lock_dir()?.join(format!("{}.pending", bucket_stem(nats_display, bucket))))
}

/// The directory bucket locks live in (see the module documentation), created if needed.
pub fn bucket_lock_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("BKBUNDLE_LOCK_DIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        std::fs::create_dir_all(&d).io_ctx("cannot create lock directory", &d)?;
        return Ok(d);
    }
    let system = Path::new("/run/lock");
    if system.is_dir() {
        let d = system.join("bkbundle");
        if ensure_dir(&d, 0o755).is_ok() && writable(&d) {
            return Ok(d);
        }
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(x).join("bkbundle");
        if ensure_dir(&d, 0o700).is_ok() && writable(&d) {
            return Ok(d);
        }
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let d = std::env::temp_dir().join(format!("bkbundle-locks-{uid}"));
    ensure_dir(&d, 0o700)?;
    // A directory someone else made at this predictable name is not ours to trust.
    let m = std::fs::symlink_metadata(&d).io_ctx("cannot read", &d)?;
    if !m.is_dir() || m.uid() != uid || m.mode() & 0o022 != 0 {
        return Err(Error::new(
            Kind::Io,
            format!(
                "lock directory {} is not a private directory of this user (owner uid {}, mode {:o})",
                d.display(),
                m.uid(),
                m.mode() & 0o7777
            ),
        )
        .hint("remove it, or set BKBUNDLE_LOCK_DIR to a directory of your own"));
    }
    Ok(d)
}

fn ensure_dir(d: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(mode).create(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => Ok(()),
        Err(e) => Err(Error::io("cannot create lock directory", d, e)),
    }
}

fn writable(d: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(d.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Take the exclusive lock `path`, waiting up to `wait` for its holder; `on_wait` is told once
/// (with the holder's description) when this run has to wait.
pub fn acquire(path: &Path, what: &str, wait: Duration, on_wait: &dyn Fn(&str)) -> Result<LockGuard> {
    let t0 = Instant::now();
    let mut told = false;
    loop {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .io_ctx("cannot open lock file", path)?;
        loop {
            // SAFETY: a valid open file descriptor; flock does not touch memory.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => {}
                _ => return Err(Error::io("cannot lock", path, err)),
            }
            let holder = read_record(&mut file);
            if !told {
                told = true;
                on_wait(&format!(
                    "waiting up to {}s for {what}, locked by {}",
                    wait.as_secs(),
                    holder
                        .as_ref()
                        .map(Holder::describe)
                        .unwrap_or_else(|| "another process".into())
                ));
            }
            if t0.elapsed() >= wait {
                return Err(busy(path, what, holder, t0.elapsed()));
            }
            std::thread::sleep(POLL);
        }
        // The file may have been replaced or removed between open and lock: then the lock is on
        // a file nobody else will lock; start again on the current one.
        let same = match (file.metadata(), std::fs::symlink_metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if !same {
            continue;
        }
        // A record left behind means its holder ended without releasing (killed): it is stale,
        // since the kernel gave us the lock.
        let stale = read_record(&mut file);
        let me = Holder::me(what);
        let text = serde_json::to_vec(&me).map_err(|e| Error::internal(format!("lock record: {e}")))?;
        file.set_len(0).io_ctx("cannot write lock file", path)?;
        file.seek(SeekFrom::Start(0)).io_ctx("cannot write lock file", path)?;
        file.write_all(&text).io_ctx("cannot write lock file", path)?;
        return Ok(LockGuard {
            file,
            path: path.to_path_buf(),
            stale,
            waited: t0.elapsed(),
        });
    }
}

/// The holder of the lock `path` if another process holds it now (a read-only probe).
pub fn holder_of(path: &Path) -> Option<Holder> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    // SAFETY: a valid open file descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    if rc == 0 {
        // SAFETY: as above; releases the probe's shared lock.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        return None;
    }
    read_record(&mut file).or(Some(Holder {
        pid: 0,
        started: "?".into(),
        command: "?".into(),
        what: String::new(),
        proc_start: None,
    }))
}

fn busy(path: &Path, what: &str, holder: Option<Holder>, waited: Duration) -> Error {
    let who = match &holder {
        Some(h) if h.alive() => h.describe(),
        Some(h) => format!(
            "a process that inherited it from {} (which is no longer running)",
            h.describe()
        ),
        None => "a process that left no record (not a bkbundle run, or one that is just starting)".into(),
    };
    let mut e = Error::new(
        Kind::Busy,
        format!(
            "{what} is locked by another bkbundle run: {who}; waited {:.0}s for it (lock file {}); nothing was changed",
            waited.as_secs_f64(),
            path.display()
        ),
    );
    e = e.hint("let that run finish, then run this command again (it is safe to re-run)");
    if let Some(h) = holder.filter(|h| h.alive()) {
        e = e.hint(format!(
            "see what it is doing with `ps -o pid,etime,args -p {}`; the lock is released when it exits (never delete the lock file by hand)",
            h.pid
        ));
    }
    e
}

fn read_record(file: &mut File) -> Option<Holder> {
    // The holder writes its record right after locking: a few tries cover that moment.
    for i in 0..3 {
        let mut text = Vec::new();
        if file.seek(SeekFrom::Start(0)).is_ok() && file.read_to_end(&mut text).is_ok() {
            if text.is_empty() {
                return None;
            }
            if let Ok(h) = serde_json::from_slice::<Holder>(&text) {
                return Some(h);
            }
        }
        if i < 2 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    None
}

/// Whether a process with this pid exists (EPERM: it exists but belongs to another user).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A process's start time in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn proc_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn own_command() -> String {
    let raw = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    let mut s = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    if s.is_empty() {
        s = "bkbundle".into();
    }
    // The record is shown to the next operator: never a password given in a URL or registered
    // as a secret (`--database-url postgres://user:PASSWORD@...`).
    s = crate::logging::redact(&s);
    if s.len() > 300 {
        let mut cut = 300;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(" ...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid that certainly does not run: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    #[test]
    fn a_second_acquirer_waits_then_refuses_naming_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        let first = acquire(&p, "target T", Duration::ZERO, &|_| {}).unwrap();
        assert!(first.stale.is_none());
        let told = std::sync::Mutex::new(Vec::new());
        let t = Instant::now();
        let e = acquire(&p, "target T", Duration::from_millis(400), &|m| {
            told.lock().unwrap().push(m.to_string())
        })
        .unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(400), "it waited");
        assert_eq!(e.kind, Kind::Busy);
        assert_eq!(e.kind.exit_code(), 11);
        let pid = std::process::id();
        assert!(e.message.contains(&format!("pid {pid}")), "{}", e.message);
        assert!(e.message.contains("target T is locked"), "{}", e.message);
        assert!(e.message.contains("started 20"), "{}", e.message);
        assert!(e.message.contains("(`"), "the command is named: {}", e.message);
        assert!(
            e.hints.iter().any(|h| h.contains("run this command again")),
            "{:?}",
            e.hints
        );
        assert_eq!(told.lock().unwrap().len(), 1, "told once that it waits");
        assert_eq!(holder_of(&p).map(|h| h.pid), Some(pid));
        drop(first);
        assert_eq!(holder_of(&p), None, "released on drop");
        let second = acquire(&p, "target T", Duration::ZERO, &|_| {}).unwrap();
        assert!(second.stale.is_none(), "a cleanly released lock is not stale");
    }

    #[test]
    fn a_waiter_gets_the_lock_when_the_holder_releases_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        let first = acquire(&p, "T", Duration::ZERO, &|_| {}).unwrap();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let second = acquire(&p, "T", Duration::from_secs(5), &|_| {}).unwrap();
        assert!(second.waited >= Duration::from_millis(200));
        h.join().unwrap();
    }

    #[test]
    fn a_stale_lock_of_a_dead_pid_is_taken_over_and_reported() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        let dead = Holder {
            pid: dead_pid(),
            started: "2026-01-01T00:00:00Z".into(),
            command: "bkbundle install old.bkb".into(),
            what: "T".into(),
            proc_start: None,
        };
        assert!(!dead.alive());
        std::fs::write(&p, serde_json::to_vec(&dead).unwrap()).unwrap();
        let t = Instant::now();
        let g = acquire(&p, "T", Duration::from_secs(10), &|_| {}).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "no waiting on a dead holder");
        assert_eq!(g.stale.as_ref(), Some(&dead));
        let note = g.takeover_note().unwrap();
        assert!(
            note.contains(&format!("pid {}", dead.pid)) && note.contains("bkbundle install old.bkb"),
            "{note}"
        );
        // The record is now ours.
        let rec: Holder = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(rec.pid, std::process::id());
    }

    #[test]
    fn a_record_of_a_reused_pid_is_stale_too() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        // Our own pid, but another start time: the pid was reused after the holder died.
        let reused = Holder {
            pid: std::process::id(),
            started: "2026-01-01T00:00:00Z".into(),
            command: "bkbundle install old.bkb".into(),
            what: "T".into(),
            proc_start: proc_start(std::process::id()).map(|s| s + 1),
        };
        assert!(!reused.alive());
        std::fs::write(&p, serde_json::to_vec(&reused).unwrap()).unwrap();
        let g = acquire(&p, "T", Duration::ZERO, &|_| {}).unwrap();
        assert_eq!(g.stale, Some(reused));
    }

    #[test]
    fn a_lock_file_that_is_a_symlink_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        std::os::unix::fs::symlink(d.path().join("elsewhere"), &p).unwrap();
        let e = acquire(&p, "T", Duration::ZERO, &|_| {}).unwrap_err();
        assert_eq!(e.kind, Kind::Io);
        assert!(!d.path().join("elsewhere").exists());
    }

    #[test]
    fn bucket_locks_are_per_server_and_bucket() {
        let d = tempfile::tempdir().unwrap();
        let a = acquire_bucket_in(d.path(), "nats://127.0.0.1:4222", "bklite", Duration::ZERO).unwrap();
        let e = acquire_bucket_in(d.path(), "nats://127.0.0.1:4222", "bklite", Duration::from_millis(150)).unwrap_err();
        assert_eq!(e.kind, Kind::Busy);
        assert!(
            e.message
                .contains("NATS bucket \"bklite\" on nats://127.0.0.1:4222 is locked"),
            "{}",
            e.message
        );
        // Another bucket, or the same bucket on another server: no contention.
        let _b = acquire_bucket_in(d.path(), "nats://127.0.0.1:4222", "other", Duration::ZERO).unwrap();
        let _c = acquire_bucket_in(d.path(), "nats://127.0.0.1:5222", "bklite", Duration::ZERO).unwrap();
        drop(a);
        let _a2 = acquire_bucket_in(d.path(), "nats://127.0.0.1:4222", "bklite", Duration::ZERO).unwrap();
    }

    #[tokio::test]
    async fn the_async_bucket_lock_does_not_block_the_runtime_while_it_waits() {
        let bucket = format!("test-async-{}", std::process::id());
        let held = acquire_bucket("nats://127.0.0.1:2", &bucket, Duration::ZERO).unwrap();
        // On a current-thread runtime, a blocking wait would stall this timer until it gave up.
        let waiter = tokio::spawn({
            let bucket = bucket.clone();
            async move { acquire_bucket_async("nats://127.0.0.1:2", &bucket, Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
        let g = waiter.await.unwrap().unwrap();
        assert!(g.waited >= Duration::from_millis(200) && g.waited < Duration::from_secs(5));
        let path = g.path().to_path_buf();
        drop(g);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn the_default_bucket_lock_dir_is_usable() {
        let d = bucket_lock_dir().unwrap();
        assert!(d.is_dir() && writable(&d), "{}", d.display());
        let bucket = format!("test-{}", std::process::id());
        let g = acquire_bucket("nats://127.0.0.1:1", &bucket, Duration::ZERO).unwrap();
        assert!(g.path().starts_with(&d));
        let path = g.path().to_path_buf();
        drop(g);
        let _ = std::fs::remove_file(path);
    }
}
