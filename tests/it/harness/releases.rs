//! BK-Lite releases as databases: the hand-written fixtures of `tests/fixtures/releases/` (the
//! node_mgmt tables bkbundle touches, as each release has them, with the rows a live site holds
//! after the server's first start) and the real `pg_dump` schemas they are checked against
//! (`bklite-schemas/`, outside the repository).

use super::{repo_root, PgCluster};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// The releases with a fixture, named by their last node_mgmt migration, oldest first.
pub const RELEASES: [&str; 5] = ["0012", "0022", "0027", "0032", "0044"];

/// The SQL of `tests/fixtures/releases/<release>.sql`; panics naming [`RELEASES`] for any other.
pub fn release_fixture(release: &str) -> String {
    assert!(
        RELEASES.contains(&release),
        "no fixture for release {release:?}: the releases are {RELEASES:?}"
    );
    let path = repo_root()
        .join("tests/fixtures/releases")
        .join(format!("{release}.sql"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Creates database `name` on `pg`, loads `release`'s fixture into it and returns its URL.
/// `name` must be unique on the cluster ([`unique_db_name`] makes one).
pub fn release_database(pg: &PgCluster, release: &str, name: &str) -> String {
    let sql = release_fixture(release);
    let url = pg.create_database(name);
    pg.psql_script(name, &sql, &format!("the fixture of release {release}"));
    url
}

/// A database name no other call in this test process returns: `prefix` (letters, digits and
/// `_` kept, lower-cased, at most 40 characters) and a counter, e.g. `seed_0044_7`.
pub fn unique_db_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let clean = if clean.is_empty() { "db".to_string() } else { clean };
    format!("{clean}_{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The folder of real schemas (`pg_dump --schema-only` after each release's own migrations):
/// `$BKBUNDLE_SCHEMAS` when set, else `<repo>/../shared/bklite-schemas`. `Err` with the path
/// looked at when that folder does not exist.
pub fn reference_schemas_dir() -> Result<PathBuf, PathBuf> {
    let dir = match std::env::var_os("BKBUNDLE_SCHEMAS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root().join("../shared/bklite-schemas"),
    };
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(dir)
    }
}

/// The reference dump of each release that has one (`release`, file name in
/// [`reference_schemas_dir`]).
pub const REFERENCES: [(&str, &str); 4] = [
    ("0012", "huangpu-dev-0012.sql"),
    ("0027", "upstream-0027.sql"),
    ("0032", "upstream-0032.sql"),
    ("0044", "upstream-head-0044.sql"),
];

/// A pg_dump file made loadable by psql 15 against a PostgreSQL 15 server, changing nothing
/// else. Removed: `\restrict` / `\unrestrict` lines (pg_dump from August 2025 on writes them;
/// psql before 15.14 does not know them, and they only guard against a hostile server) and
/// `SET transaction_timeout` (pg_dump 17 writes it; a 15 server has no such setting). The dumps
/// of `bklite-schemas/` (pg_dump 15.18, `--no-owner`) contain neither today and load as they are.
pub fn loadable_dump(dump: &str) -> String {
    dump.lines()
        .filter(|line| {
            let l = line.trim_start();
            !(l.starts_with("\\restrict ")
                || l.starts_with("\\unrestrict ")
                || l.starts_with("SET transaction_timeout "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Creates database `name` on `pg` with the reference dump `file` of [`reference_schemas_dir`]
/// (`dir`) loaded, and returns its URL.
pub fn reference_database(pg: &PgCluster, dir: &std::path::Path, file: &str, name: &str) -> String {
    let path = dir.join(file);
    let dump = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let url = pg.create_database(name);
    pg.psql_script(name, &loadable_dump(&dump), &path.display().to_string());
    url
}
