//! Helpers shared by the integration tests: the bkbundle binary, the Docker engine and demo
//! images, throwaway PostgreSQL, NATS and image registry servers, and agent hosts (network
//! namespaces).
//!
//! Rules every helper follows:
//! - A missing prerequisite is a panic that says how to install it (`scripts/setup.sh`), never a
//!   silent skip.
//! - Servers listen on 127.0.0.1 only, on free ports, so tests run in parallel; each lives in its
//!   own temporary directory that its `Drop` removes after stopping it; the one shared
//!   PostgreSQL cluster ([`PgCluster::shared`]) is stopped and removed when the process exits.
//!   The one exception is an [`AgentHost`]: a network namespace whose host side address (in
//!   198.18.0.0/15) is where a test publishes what agents must reach.
//! - Every wait is bounded and a timeout panics with the server's log.
//! - Only std, `tempfile` and `libc` (for the shared cluster's exit hook); the registry's helpers
//!   also `base64` (a `docker login` file) and `serde_json` (skopeo's output).

#![allow(dead_code)] // not every test module uses every helper

mod agent_host;
mod docker;
mod nats;
mod pg;
mod redis;
mod registry;
mod releases;

pub use agent_host::AgentHost;
pub use docker::{docker_lock, ensure_demo_images, require_docker, OwnImages, DEMO_IMAGES};
pub use nats::{mint_jwt, NatsOpts, NatsServer};
pub use pg::PgCluster;
pub use redis::RedisServer;
pub use registry::{engine_certs_dir, skopeo, Registry};
pub use releases::{
    loadable_dump, reference_database, reference_schemas_dir, release_database, release_fixture, unique_db_name,
    REFERENCES, RELEASES,
};

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A [`Command`] for the `bkbundle` binary under test (`CARGO_BIN_EXE_bkbundle`).
pub fn bkbundle() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bkbundle"))
}

/// The repository's root directory (`CARGO_MANIFEST_DIR`), e.g. to find `examples/demo`.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding port 0 and is released before returning, so something else may
/// still take it; within this test process the same port is never handed out twice, and the
/// server helpers retry on a new port when theirs turns out to be taken.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
        let port = listener.local_addr().expect("local_addr of a bound listener").port();
        drop(listener);
        let mut given = given.lock().unwrap_or_else(|e| e.into_inner());
        if given.insert(port) {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 after 100 tries");
}

/// A random string of `len` ASCII letters and digits (for passwords, tokens and unique names;
/// safe in URLs, config files and SQL literals without quoting). From std's randomly seeded
/// hasher, which is plenty for throwaway test credentials.
pub fn random_alnum(len: usize) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let state = RandomState::new();
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let mut h = state.build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        let mut v = h.finish();
        for _ in 0..10 {
            if out.len() == len {
                break;
            }
            out.push(CHARS[(v % CHARS.len() as u64) as usize] as char);
            v /= CHARS.len() as u64;
        }
    }
    out
}

/// Runs `cmd` to completion and returns its output; panics when it cannot be started, naming
/// `what` and `hint` (how to install it).
pub(crate) fn run(cmd: &mut Command, what: &str, hint: &str) -> Output {
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{what}: {:?} not found: {hint}", cmd.get_program())
        }
        Err(e) => panic!("{what}: cannot run {:?}: {e}", cmd.get_program()),
    }
}

/// Runs `cmd` and panics with its stdout and stderr unless it exits 0.
pub(crate) fn run_ok(cmd: &mut Command, what: &str, hint: &str) -> Output {
    let out = run(cmd, what, hint);
    if !out.status.success() {
        panic!(
            "{what} failed ({}): {cmd:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes (then `None`).
pub(crate) fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `max` bytes of a log file, for panic messages.
pub(crate) fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// Whether this process runs as root (the owner of `/proc/self` is the effective user).
pub(crate) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A fresh temporary directory whose parents every user can traverse (`/tmp`, not `$TMPDIR`,
/// which may sit under root's home): servers run as other users need to reach it.
pub(crate) fn server_tempdir(prefix: &str) -> tempfile::TempDir {
    let base = Path::new("/tmp");
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix(prefix);
        b
    };
    let dir = if base.is_dir() {
        builder.tempdir_in(base)
    } else {
        builder.tempdir()
    };
    dir.expect("create a temporary directory")
}
