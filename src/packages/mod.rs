//! Uploading the bundle's agent packages to the platform's NATS JetStream object store and
//! upserting their `node_mgmt_packageversion` rows, idempotently (issue 5; the field failures of
//! DESIGN.md: an empty package list after deployment, and a row whose object had vanished).
//!
//! One entry point, [`run`], serves `bkbundle init-packages` (and `install` after the stack is
//! healthy). Stages, nothing written before every check passed:
//!
//! 1. The database: target ([`crate::regions::db::resolve_target`]), schema generation
//!    ([`crate::regions::db::detect_schema`]) which decides the key layout, the current rows.
//! 2. NATS ([`nats::connect`], staged errors), JetStream, the bucket (created when absent).
//! 3. Plan: every package's SHA-256 streamed from the bundle; each object's stored info.
//!    Equal digest → skip (nothing sent); a different object under a fixed version → conflict
//!    (every conflict reported, nothing written) unless `force`; `latest` is always replaced.
//! 4. Write: per package the object first (streamed from the bundle, confirmed by its stored
//!    digest and size), then its row. Then consistency both ways: rows whose object is missing
//!    (repaired when the bundle has the file) and objects without rows.
//!
//! Collector records that point into the controller package (`from`/`entry`): upstream uploads
//! every collector as a file of its own (`package_version_upload` in
//! server/apps/node_mgmt/management/utils.py) and its row's `name` is that file's name, so
//! bkbundle uploads the entry's bytes (streamed out of the controller zip/tar.gz inside the
//! bundle) as the collector's object named by the manifest `name` (the binary's file name).

pub mod dir;
pub mod nats;
pub mod source;

use crate::bundle::BundleReader;
use crate::error::{Error, Kind};
use crate::install::config::{DatabaseConfig, InstallConfig, NatsConfig};
use crate::manifest::{normalize_arch, Package, PackageType};
use crate::regions::db::{self, DbTarget, Generation};
use crate::regions::RegionsError;
use async_nats::jetstream::object_store::ObjectStore;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use source::Source;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DEFAULT_BUCKET: &str = "bklite";
/// Chunk size of bkbundle's puts: 1 MiB (measured fastest), capped by the server's max payload.
pub const CHUNK: usize = 1 << 20;
const LATEST: &str = "latest";

#[derive(Debug, Clone)]
pub struct PackagesOptions {
    /// The bundle holding the packages (`--bundle`).
    pub bundle: Option<PathBuf>,
    /// Or a directory of package files recognised by name (`--dir`), with `overrides`.
    pub dir: Option<PathBuf>,
    pub overrides: dir::Overrides,
    /// Replace a different object under a fixed version, and overwrite existing rows.
    pub force: bool,
    /// Plan only: read the database and the bucket, write nothing.
    pub dry_run: bool,
    pub database: DatabaseConfig,
    pub database_url: Option<String>,
    pub nats: NatsConfig,
    pub nats_url: Option<String>,
    /// `--bucket` (wins over `[nats] bucket`, default `bklite`).
    pub bucket: Option<String>,
    /// The stack's .env values under the install config's `[env]`.
    pub site: BTreeMap<String, String>,
    /// Wait up to this long for the server's tables (install); `None` fails at once.
    pub wait_for_migrations: Option<Duration>,
}

impl PackagesOptions {
    pub fn new(bundle: PathBuf, config: &InstallConfig, site: BTreeMap<String, String>) -> PackagesOptions {
        PackagesOptions {
            bundle: Some(bundle),
            dir: None,
            overrides: dir::Overrides::default(),
            force: false,
            dry_run: false,
            database: config.database.clone(),
            database_url: None,
            nats: config.nats.clone(),
            nats_url: None,
            bucket: None,
            site,
            wait_for_migrations: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Conflict {
    pub key: String,
    pub stored_digest: String,
    pub file_digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PackagesError {
    #[error(transparent)]
    Database(#[from] RegionsError),
    /// Opening the bundle or reading its manifest failed: that error, kind and hints kept.
    #[error("{}", .0.message)]
    Bundle(Error),
    /// The package directory's files (`--dir`): every problem, kind and hints kept.
    #[error("{}", .0.message)]
    Dir(Error),
    #[error("where the platform's NATS is was not given: none of --nats-url, NATS_URL, [nats] url or the stack's .env (NATS_PORT, NATS_PASSWORD or NATS_ADMIN_PASSWORD) is set")]
    NoNats,
    #[error("NATS configuration: {0}")]
    BadNatsConfig(String),
    #[error("cannot resolve the NATS host {host} ({nats}): {message}")]
    NatsResolve {
        nats: String,
        host: String,
        message: String,
    },
    #[error("cannot connect to NATS at {nats} (TCP): {message}")]
    NatsConnect { nats: String, message: String },
    #[error("TLS with NATS at {nats} failed (CA or host name): {message}")]
    NatsTls { nats: String, message: String },
    #[error("NATS at {nats} refused the credentials: {message}")]
    NatsAuth { nats: String, message: String },
    #[error("NATS at {nats} has no JetStream (or this account may not use it): {message}")]
    NoJetStream { nats: String, message: String },
    #[error("object store bucket {bucket:?} on {nats}: {message}")]
    Bucket {
        nats: String,
        bucket: String,
        message: String,
    },
    #[error("{} object(s) differ from the bundle's file under a fixed version; nothing was written:\n  - {}", .0.len(), .0.iter().map(|c| format!("{}: stored {} but the file is {}", c.key, c.stored_digest, c.file_digest)).collect::<Vec<_>>().join("\n  - "))]
    Conflict(Vec<Conflict>),
    #[error("package {package}: cannot read {source_desc} from the bundle: {message}")]
    Read {
        package: String,
        source_desc: String,
        message: String,
    },
    #[error("uploading {key} to bucket {bucket:?} failed: {message}")]
    Upload {
        key: String,
        bucket: String,
        message: String,
    },
    #[error("object {key} after upload: expected digest {expected} and {expected_size} bytes, found {found} and {found_size} bytes")]
    Confirm {
        key: String,
        expected: String,
        expected_size: u64,
        found: String,
        found_size: u64,
    },
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Internal(String),
}

const NATS_HINT: &str = "give NATS with --nats-url nats://USER:PASSWORD@HOST:4222 (or tls://...), NATS_URL, [nats] in the install config, or --env-file with the stack's .env (NATS_PORT, NATS_USER, NATS_PASSWORD)";

impl From<PackagesError> for Error {
    fn from(e: PackagesError) -> Error {
        let message = e.to_string();
        match e {
            PackagesError::Database(r) => Error::from(r),
            PackagesError::Bundle(e) | PackagesError::Dir(e) => e,
            PackagesError::NoNats | PackagesError::BadNatsConfig(_) => Error::new(Kind::Input, message).hint(NATS_HINT),
            PackagesError::NatsResolve { .. } => Error::new(Kind::External, message)
                .hint("check the host name in the NATS URL; on an air-gapped host use an IP address or an /etc/hosts entry"),
            PackagesError::NatsConnect { .. } => Error::new(Kind::External, message)
                .hint("is the stack running? `docker compose ps nats`; it publishes NATS on INTERNAL_BIND_IP:NATS_PORT (127.0.0.1:4222 by default)")
                .hint(NATS_HINT),
            PackagesError::NatsTls { .. } => Error::new(Kind::External, message)
                .hint("give the CA that signed the NATS server's certificate with [nats] ca_file (the server's NATS_TLS_CA_FILE), and use the host name the certificate names"),
            PackagesError::NatsAuth { .. } => Error::new(Kind::External, message)
                .hint("check the user and password (the stack's NATS_USER/NATS_PASSWORD), the token or the credentials file"),
            PackagesError::NoJetStream { .. } => Error::new(Kind::External, message)
                .hint("the platform needs JetStream: enable it in the NATS server config (`jetstream { store_dir: ... }`)"),
            PackagesError::Bucket { .. } => Error::new(Kind::External, message)
                .hint("check the bucket name (the server's NATS_NAMESPACE) and the account's JetStream limits"),
            PackagesError::Conflict(_) => Error::new(Kind::Input, message)
                .hint("a fixed version must not change: give the package a new version, or run again with --force to replace the objects (and overwrite their rows)"),
            PackagesError::Read { .. } => Error::new(Kind::Bundle, message)
                .hint("run `bkbundle verify` on the bundle; copy it again if it is damaged"),
            PackagesError::Upload { .. } | PackagesError::Confirm { .. } => Error::new(Kind::External, message)
                .hint("run again: objects already stored are skipped and an interrupted upload is redone"),
            PackagesError::Input(_) => Error::new(Kind::Input, message),
            PackagesError::Internal(_) => Error::new(Kind::Internal, message),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectAction {
    Uploaded,
    Skipped,
    Replaced,
    /// A row pointed at a missing object: uploaded again.
    Repaired,
    /// Left alone (the 2025 schema collision, or an existing row of a fixed version not forced).
    LeftAlone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowAction {
    Created,
    Updated,
    Unchanged,
}

#[derive(Debug, Clone, Serialize)]
pub struct PackageReport {
    pub package: String,
    #[serde(rename = "type")]
    pub kind: PackageType,
    pub os: String,
    pub arch: String,
    pub object: String,
    pub version: String,
    pub key: String,
    pub size: u64,
    pub digest: String,
    pub action: ObjectAction,
    pub row: Option<RowAction>,
    pub row_id: Option<i64>,
    pub seconds: f64,
    /// Upload speed in MB/s (uploads only).
    pub mb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MissingObject {
    pub row_id: i64,
    pub key: String,
    pub repaired: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PackagesReport {
    pub dry_run: bool,
    pub database: Option<String>,
    pub generation: Option<Generation>,
    pub nats: Option<String>,
    pub bucket: String,
    pub chunk_size: usize,
    pub packages: Vec<PackageReport>,
    pub uploaded: usize,
    pub skipped: usize,
    pub replaced: usize,
    pub rows_created: usize,
    pub rows_updated: usize,
    pub rows_unchanged: usize,
    /// Rows whose object was missing (the download 404).
    pub missing_objects: Vec<MissingObject>,
    /// Objects in the bucket no row points at.
    pub orphan_objects: Vec<String>,
    pub notes: Vec<String>,
    pub bytes_sent: u64,
    pub seconds: f64,
}

// ---------------------------------------------------------------------------------------------
// Keys and digests

/// The object key of a package under a schema generation (BKLITE.md).
pub fn object_key(g: Generation, os: &str, arch: &str, object: &str, version: &str, name: &str) -> String {
    match g {
        Generation::Y2025 => format!("{os}/{object}/{version}/{name}"),
        Generation::Y2026 => format!("{os}/{arch}/{object}/{version}/{name}"),
    }
}

/// `SHA-256=` + URL-safe base64 with padding, as the object store writes it.
pub fn nats_digest(sha: &[u8; 32]) -> String {
    format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(sha))
}

/// The raw SHA-256 of an object info digest (padding or not, URL-safe or standard alphabet).
pub fn parse_digest(d: &str) -> Option<Vec<u8>> {
    let b = d.strip_prefix("SHA-256=").or_else(|| d.strip_prefix("sha-256="))?;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    URL_SAFE
        .decode(b)
        .or_else(|_| URL_SAFE_NO_PAD.decode(b))
        .or_else(|_| STANDARD.decode(b))
        .ok()
        .filter(|v| v.len() == 32)
}

// ---------------------------------------------------------------------------------------------
// Rows

/// One `node_mgmt_packageversion` row (`arch` is empty on the 2025 schema).
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub os: String,
    pub arch: String,
    pub object: String,
    pub version: String,
    pub name: String,
}

pub async fn read_rows(client: &tokio_postgres::Client, t: &DbTarget, g: Generation) -> Result<Vec<Row>, RegionsError> {
    let arch = if g == Generation::Y2026 {
        "cpu_architecture"
    } else {
        "''::varchar"
    };
    let sql = format!(
        "SELECT id, os::text, {arch}::text, object::text, version::text, name::text FROM {} ORDER BY id",
        db::PACKAGE_TABLE
    );
    let rows = client
        .query(sql.as_str(), &[])
        .await
        .map_err(|e| RegionsError::Database {
            db: t.name.clone(),
            what: format!("reading {}", db::PACKAGE_TABLE),
            message: e.to_string(),
        })?;
    Ok(rows
        .iter()
        .map(|r| Row {
            id: r.get(0),
            os: r.get(1),
            arch: r.get(2),
            object: r.get(3),
            version: r.get(4),
            name: r.get(5),
        })
        .collect())
}

/// The keys a row's object may be under: its generation's layout first, then the 2025 one.
pub fn row_key(g: Generation, r: &Row) -> [String; 2] {
    [
        object_key(g, &r.os, &r.arch, &r.object, &r.version, &r.name),
        object_key(Generation::Y2025, &r.os, &r.arch, &r.object, &r.version, &r.name),
    ]
}

// ---------------------------------------------------------------------------------------------
// The plan

struct Planned {
    pkg: Package,
    arch: String,
    source: Source,
    key: String,
    sha: [u8; 32],
    size: u64,
    row: Option<Row>,
    stored: Option<String>,
    /// `None`: nothing to send.
    action: ObjectAction,
    upload: bool,
    note: Option<String>,
}

/// One package to upload, where its bytes are, and its digest when the manifest records it.
struct Input {
    pkg: Package,
    source: Source,
    known: Option<([u8; 32], u64)>,
}

fn label(p: &Package) -> String {
    format!("{} {} ({}/{})", p.object, p.version, p.os.as_str(), p.arch)
}

/// The packages to upload: the bundle's (opened, its manifest read; collectors inside the
/// controller package located) or the directory's (recognised by name). Every problem at once.
fn inputs(opts: &PackagesOptions) -> Result<(Option<Arc<BundleReader>>, Vec<Input>), PackagesError> {
    match (&opts.bundle, &opts.dir) {
        (Some(_), Some(_)) => Err(PackagesError::Input("give either --bundle or --dir, not both".into())),
        (None, None) => Err(PackagesError::Input(
            "no packages to upload: give --bundle BUNDLE or --dir DIR".into(),
        )),
        (None, Some(d)) => {
            let found = dir::scan(d, &opts.overrides).map_err(PackagesError::Dir)?;
            let inputs = found
                .into_iter()
                .map(|(pkg, source)| Input {
                    pkg,
                    source,
                    known: None,
                })
                .collect();
            Ok((None, inputs))
        }
        (Some(path), None) => {
            let bundle = Arc::new(BundleReader::open(path).map_err(PackagesError::Bundle)?);
            let (manifest, _) = bundle.manifest().map_err(PackagesError::Bundle)?;
            let files: BTreeMap<&str, &crate::manifest::FileEntry> =
                manifest.files.iter().map(|f| (f.path.as_str(), f)).collect();
            let controllers: BTreeMap<&str, &Package> = manifest
                .packages
                .iter()
                .filter(|p| p.kind == PackageType::Controller)
                .map(|p| (p.name.as_str(), p))
                .collect();
            let mut inputs = Vec::new();
            let mut problems = Vec::new();
            for p in &manifest.packages {
                let source = match (&p.file, &p.from, &p.entry) {
                    (Some(f), _, _) => Source::Entry(f.clone()),
                    (None, Some(from), Some(entry)) => {
                        match controllers.get(from.as_str()).and_then(|c| c.file.clone()) {
                            Some(c) => Source::Inner {
                                container: c,
                                entry: entry.clone(),
                            },
                            None => {
                                problems.push(format!(
                                    "package {}: its controller package {from} is not in the bundle",
                                    label(p)
                                ));
                                continue;
                            }
                        }
                    }
                    _ => {
                        problems.push(format!("package {}: neither a file nor from/entry", label(p)));
                        continue;
                    }
                };
                let recorded = match (&p.sha256, p.size, &p.file) {
                    (Some(h), Some(sz), _) => Some((h.as_str(), sz)),
                    (_, _, Some(f)) => files.get(f.as_str()).map(|e| (e.sha256.as_str(), e.size)),
                    _ => None,
                };
                let known = recorded.and_then(|(h, sz)| crate::digest::sha256_from_hex(h).map(|b| (b, sz)));
                inputs.push(Input {
                    pkg: p.clone(),
                    source,
                    known,
                });
            }
            if !problems.is_empty() {
                return Err(PackagesError::Input(problems.join("\n")));
            }
            Ok((Some(bundle), inputs))
        }
    }
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Upload the packages and upsert their rows. See the module documentation.
pub async fn run(opts: &PackagesOptions) -> Result<PackagesReport, PackagesError> {
    run_with_env(opts, &process_env).await
}

/// [`run`] with the environment (`DATABASE_URL`, `PG*`, `NATS_URL`) looked up through `env`.
pub async fn run_with_env(
    opts: &PackagesOptions,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PackagesReport, PackagesError> {
    let t0 = Instant::now();
    // Every input problem first, before any connection.
    let (bundle, inputs) = inputs(opts)?;
    let bucket = opts
        .bucket
        .clone()
        .or_else(|| opts.nats.bucket.clone())
        .unwrap_or_else(|| DEFAULT_BUCKET.to_string());
    let mut report = PackagesReport {
        dry_run: opts.dry_run,
        bucket: bucket.clone(),
        ..Default::default()
    };

    // 1. The database.
    let target = db::resolve_target(opts.database_url.as_deref(), &opts.database, &opts.site, env)?;
    let client = db::connect(&target).await?;
    let deadline = opts.wait_for_migrations.map(|w| Instant::now() + w);
    let schema = loop {
        match db::detect_schema(&client, &target).await {
            Err(RegionsError::NotMigrated { .. }) if deadline.is_some_and(|d| Instant::now() < d) => {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            other => break other?,
        }
    };
    let g = schema.generation;
    report.database = Some(target.name.display.clone());
    report.generation = Some(g);
    let rows = read_rows(&client, &target, g).await?;

    // 2. NATS.
    let nt = nats::resolve_target(opts.nats_url.as_deref(), &opts.nats, &opts.site, env)?;
    report.nats = Some(nt.display());
    let nc = nats::connect(&nt).await?;
    let max_payload = nc.server_info().max_payload;
    report.chunk_size = if max_payload > 0 { CHUNK.min(max_payload) } else { CHUNK };
    let store = open_store(&nc, &nt, &bucket, !opts.dry_run).await?;
    if store.is_none() {
        report
            .notes
            .push(format!("bucket {bucket:?} does not exist: it would be created"));
    }

    // 3. The plan.
    let mut plan: Vec<Planned> = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for Input { pkg: p, source, known } in &inputs {
        let label = label(p);
        let arch = normalize_arch(&p.arch).unwrap_or(p.arch.as_str()).to_string();
        let key = object_key(g, p.os.as_str(), &arch, &p.object, &p.version, &p.name);
        // The 2025 schema has no architecture: two arches collide on (os, object, version).
        let ident = match g {
            Generation::Y2025 => format!("{}/{}/{}", p.os.as_str(), p.object, p.version),
            Generation::Y2026 => format!("{}/{arch}/{}/{}", p.os.as_str(), p.object, p.version),
        };
        if let Some(first) = seen.get(&ident) {
            report.notes.push(format!(
                "package {label} was left alone: on the {} schema it collides with {first} on (os, object, version) = ({}, {}, {}); the 2025 schema holds one architecture per version",
                g.as_str(), p.os.as_str(), p.object, p.version
            ));
            continue;
        }
        seen.insert(ident, label.clone());
        // The manifest's digest when it has one (no byte read: the re-run stays fast whatever
        // the package sizes); else hashed, streamed. Uploads confirm the digest either way.
        let (sha, size) = match known {
            Some(k) => *k,
            None => {
                let b = bundle.clone();
                let s2 = source.clone();
                tokio::task::spawn_blocking(move || source::hash(b.as_deref(), &s2))
                    .await
                    .map_err(|e| PackagesError::Internal(format!("hashing task: {e}")))?
                    .map_err(|e| PackagesError::Read {
                        package: label.clone(),
                        source_desc: source.describe(),
                        message: e.to_string(),
                    })?
            }
        };
        let row = rows
            .iter()
            .find(|r| {
                r.os == p.os.as_str()
                    && r.object == p.object
                    && r.version == p.version
                    && (g == Generation::Y2025 || r.arch == arch)
            })
            .cloned();
        let stored = match &store {
            Some(s) => info(s, &key).await.map_err(|m| PackagesError::Bucket {
                nats: nt.display(),
                bucket: bucket.clone(),
                message: format!("reading the info of {key}: {m}"),
            })?,
            None => None,
        };
        let file_digest = nats_digest(&sha);
        let latest = p.version == LATEST;
        let same = stored
            .as_ref()
            .is_some_and(|(d, sz)| parse_digest(d).as_deref() == Some(&sha[..]) && *sz == size);
        let (action, upload, note) = match (&stored, same) {
            (Some(_), true) => (ObjectAction::Skipped, false, None),
            (Some((d, _)), false) if !latest && !opts.force => {
                conflicts.push(Conflict {
                    key: key.clone(),
                    stored_digest: d.clone(),
                    file_digest: file_digest.clone(),
                });
                (ObjectAction::LeftAlone, false, None)
            }
            (Some(_), false) => (ObjectAction::Replaced, true, None),
            (None, _) => match &row {
                Some(r) if r.name == p.name => (ObjectAction::Repaired, true, None),
                Some(r) if !latest && !opts.force => (
                    ObjectAction::LeftAlone,
                    false,
                    Some(format!(
                        "row {} already holds version {} with file {}; left alone (upstream rule), --force replaces it",
                        r.id, p.version, r.name
                    )),
                ),
                _ => (ObjectAction::Uploaded, true, None),
            },
        };
        plan.push(Planned {
            pkg: p.clone(),
            arch,
            source: source.clone(),
            key,
            sha,
            size,
            row,
            stored: stored.map(|(d, _)| d),
            action,
            upload,
            note,
        });
    }
    if !conflicts.is_empty() {
        return Err(PackagesError::Conflict(conflicts));
    }

    // 4. Write: the object, confirmed, then its row.
    for pl in &plan {
        let t = Instant::now();
        let mut row_action = None;
        let mut row_id = pl.row.as_ref().map(|r| r.id);
        if !opts.dry_run {
            if pl.upload {
                let s = store
                    .as_ref()
                    .ok_or_else(|| PackagesError::Internal("no object store after planning".into()))?;
                upload(s, &bundle, pl, report.chunk_size, &bucket).await?;
                report.bytes_sent += pl.size;
            }
            if pl.action != ObjectAction::LeftAlone {
                let (a, id) = upsert_row(&client, &target, g, pl, opts.force).await?;
                row_action = Some(a);
                row_id = Some(id);
            }
        }
        match pl.action {
            ObjectAction::Uploaded | ObjectAction::Repaired => report.uploaded += 1,
            ObjectAction::Replaced => report.replaced += 1,
            ObjectAction::Skipped => report.skipped += 1,
            ObjectAction::LeftAlone => {}
        }
        match row_action {
            Some(RowAction::Created) => report.rows_created += 1,
            Some(RowAction::Updated) => report.rows_updated += 1,
            Some(RowAction::Unchanged) => report.rows_unchanged += 1,
            None => {}
        }
        if pl.action == ObjectAction::Repaired {
            if let Some(r) = &pl.row {
                report.missing_objects.push(MissingObject {
                    row_id: r.id,
                    key: pl.key.clone(),
                    repaired: !opts.dry_run,
                });
            }
        }
        let secs = t.elapsed().as_secs_f64();
        report.packages.push(PackageReport {
            package: pl.pkg.name.clone(),
            kind: pl.pkg.kind,
            os: pl.pkg.os.as_str().to_string(),
            arch: pl.arch.clone(),
            object: pl.pkg.object.clone(),
            version: pl.pkg.version.clone(),
            key: pl.key.clone(),
            size: pl.size,
            digest: nats_digest(&pl.sha),
            action: pl.action,
            row: row_action,
            row_id,
            seconds: secs,
            mb_per_s: (pl.upload && !opts.dry_run && secs > 0.0).then(|| pl.size as f64 / 1e6 / secs),
            note: pl.note.clone().or_else(|| {
                pl.stored
                    .as_ref()
                    .filter(|_| pl.action == ObjectAction::Replaced)
                    .map(|d| format!("replaced stored {d}"))
            }),
        });
    }

    // 5. Consistency both ways.
    if let Some(s) = &store {
        let rows = read_rows(&client, &target, g).await?;
        let (missing, orphans) = consistency(&rows, g, s, &nt.display()).await?;
        for m in missing {
            if !report.missing_objects.iter().any(|r| r.row_id == m.row_id) {
                report.missing_objects.push(m);
            }
        }
        report.orphan_objects = orphans;
    }
    if opts.dry_run {
        report.notes.push("dry run: nothing was written".into());
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The bucket, and its stream for reading meta messages directly.
pub struct Store {
    pub objects: ObjectStore,
    pub stream: async_nats::jetstream::stream::Stream,
    pub js: async_nats::jetstream::Context,
    pub bucket: String,
}

/// Check that JetStream answers, then open the bucket; when it is absent, create it (`create`)
/// or return `None`. Used by init-packages and doctor, so both name the same broken link.
pub async fn open_store(
    nc: &async_nats::Client,
    nt: &nats::NatsTarget,
    bucket: &str,
    create: bool,
) -> Result<Option<Store>, PackagesError> {
    let js = async_nats::jetstream::new(nc.clone());
    // JetStream answers `$JS.API.INFO`; without it nobody responds. (async-nats' own account-info
    // call cannot parse nats-server 2.9's reply.)
    match nc.request("$JS.API.INFO", Bytes::new()).await {
        Ok(m) if !String::from_utf8_lossy(&m.payload).contains("\"error\"") => {}
        Ok(m) => {
            return Err(PackagesError::NoJetStream {
                nats: nt.display(),
                message: String::from_utf8_lossy(&m.payload).to_string(),
            })
        }
        Err(e) => {
            return Err(PackagesError::NoJetStream {
                nats: nt.display(),
                message: crate::error::chain(&e),
            })
        }
    }
    let bucket_err = |message: String| PackagesError::Bucket {
        nats: nt.display(),
        bucket: bucket.to_string(),
        message,
    };
    let objects = match js.get_object_store(bucket).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), async_nats::jetstream::context::ObjectStoreErrorKind::GetStore) => {
            if !create {
                return Ok(None);
            }
            let cfg = async_nats::jetstream::object_store::Config {
                bucket: bucket.to_string(),
                ..Default::default()
            };
            js.create_object_store(cfg)
                .await
                .map_err(|e| bucket_err(format!("cannot create it: {}", crate::error::chain(&e))))?
        }
        Err(e) => return Err(bucket_err(crate::error::chain(&e))),
    };
    let stream = js
        .get_stream(format!("OBJ_{bucket}"))
        .await
        .map_err(|e| bucket_err(format!("its stream OBJ_{bucket}: {}", crate::error::chain(&e))))?;
    Ok(Some(Store {
        objects,
        stream,
        js,
        bucket: bucket.to_string(),
    }))
}

/// The names of the live (not deleted) objects in the bucket.
pub async fn list_objects(s: &Store, nats: &str) -> Result<BTreeSet<String>, PackagesError> {
    let mut names = BTreeSet::new();
    let mut list = s.objects.list().await.map_err(|e| PackagesError::Bucket {
        nats: nats.to_string(),
        bucket: s.bucket.clone(),
        message: format!("listing: {}", crate::error::chain(&e)),
    })?;
    while let Some(o) = list.next().await {
        match o {
            Ok(o) if !o.deleted => {
                names.insert(o.name);
            }
            Ok(_) => {}
            // A tombstone the upstream Python client wrote (its `mtime` is not RFC 3339):
            // a deleted object, nothing to judge.
            Err(e) => tracing::debug!("listing {}: skipped an entry: {}", s.bucket, crate::error::chain(&e)),
        }
    }
    Ok(names)
}

/// Consistency both ways: rows whose object is missing under either key layout (the download
/// 404), and package-shaped objects no row points at. Nothing is repaired here.
pub async fn consistency(
    rows: &[Row],
    g: Generation,
    s: &Store,
    nats: &str,
) -> Result<(Vec<MissingObject>, Vec<String>), PackagesError> {
    let names = list_objects(s, nats).await?;
    let mut missing = Vec::new();
    let mut pointed = BTreeSet::new();
    for r in rows {
        let keys = row_key(g, r);
        pointed.extend(keys.iter().cloned());
        if !keys.iter().any(|k| names.contains(k)) {
            missing.push(MissingObject {
                row_id: r.id,
                key: keys[0].clone(),
                repaired: false,
            });
        }
    }
    // The server's other objects (installers, aliases) live under other prefixes; only keys
    // shaped like package keys are judged.
    let depth = match g {
        Generation::Y2025 => 4,
        Generation::Y2026 => 5,
    };
    let orphans = names
        .into_iter()
        .filter(|n| !pointed.contains(n))
        .filter(|n| {
            let d = n.split('/').count();
            (d == 4 || d == depth) && (n.starts_with("linux/") || n.starts_with("windows/"))
        })
        .collect();
    Ok((missing, orphans))
}

/// The stored digest and size of `key`, `None` when absent or deleted. Reads the object's meta
/// message itself: the upstream Python client writes tombstones (`mtime` not RFC 3339) that
/// async-nats' `info` refuses.
pub async fn info(s: &Store, key: &str) -> Result<Option<(String, u64)>, String> {
    use async_nats::jetstream::object_store::InfoErrorKind;
    let mut attempt = 0;
    loop {
        match s.objects.info(key).await {
            Ok(i) if i.deleted => return Ok(None),
            Ok(i) => return Ok(Some((i.digest.unwrap_or_default(), i.size as u64))),
            Err(e) if e.kind() == InfoErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == InfoErrorKind::TimedOut && attempt < 3 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(300 << attempt)).await;
            }
            Err(e) => {
                let first = crate::error::chain(&e);
                return raw_info(s, key)
                    .await
                    .map_err(|raw| format!("{first}; reading the meta message: {raw}"));
            }
        }
    }
}

async fn raw_info(s: &Store, key: &str) -> Result<Option<(String, u64)>, String> {
    let Some(v) = raw_meta(s, key).await? else {
        return Ok(None);
    };
    if v.get("deleted").and_then(|d| d.as_bool()).unwrap_or(false) {
        return Ok(None);
    }
    Ok(Some((
        v.get("digest").and_then(|d| d.as_str()).unwrap_or_default().to_string(),
        v.get("size").and_then(|d| d.as_u64()).unwrap_or(0),
    )))
}

/// The object's meta message as JSON, `None` when there is none.
async fn raw_meta(s: &Store, key: &str) -> Result<Option<serde_json::Value>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let subject = format!(
        "$O.{}.M.{}",
        s.bucket,
        base64::engine::general_purpose::URL_SAFE.encode(key)
    );
    let m = match s.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => m,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(e) => return Err(crate::error::chain(&e)),
    };
    serde_json::from_slice(&m.payload).map(Some).map_err(|e| e.to_string())
}

/// Publishes in flight before the oldest ack is awaited. async-nats' own `put` awaits every
/// chunk's ack before sending the next (measured: 1 MiB chunks ~330 MB/s end to end here);
/// keeping a few in flight hides the round trip. Memory: WINDOW + channel chunks of `CHUNK`.
const WINDOW: usize = 8;

/// Stream one package into the object store (bounded memory: a few chunks in flight), then
/// confirm the stored digest and size. Bounded retries; on a failed first attempt the chunk
/// size drops below the server's max payload.
async fn upload(
    s: &Store,
    bundle: &Option<Arc<BundleReader>>,
    pl: &Planned,
    chunk: usize,
    bucket: &str,
) -> Result<(), PackagesError> {
    let expected = nats_digest(&pl.sha);
    let mut chunk = chunk;
    let mut last = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            chunk = chunk.min(CHUNK - (64 << 10));
        }
        match put(s, bundle, pl, chunk).await {
            Ok((sha, size)) if sha == pl.sha && size == pl.size => {
                let found = info(s, &pl.key).await.map_err(|m| PackagesError::Upload {
                    key: pl.key.clone(),
                    bucket: bucket.into(),
                    message: format!("confirming: {m}"),
                })?;
                let (d, sz) = found.unwrap_or_default();
                if parse_digest(&d).as_deref() != Some(&pl.sha[..]) || sz != pl.size {
                    return Err(PackagesError::Confirm {
                        key: pl.key.clone(),
                        expected,
                        expected_size: pl.size,
                        found: d,
                        found_size: sz,
                    });
                }
                return Ok(());
            }
            // The bytes read are not the ones planned (a damaged bundle or a file changed under
            // us): no meta was published, so the stored object (if any) is untouched.
            Ok((sha, size)) => {
                return Err(PackagesError::Read {
                    package: pl.pkg.name.clone(),
                    source_desc: pl.source.describe(),
                    message: format!(
                        "read {size} bytes with digest {}, but {} bytes with digest {expected} were expected; the stored object was left as it was",
                        nats_digest(&sha),
                        pl.size
                    ),
                })
            }
            Err(PutFailure::Read(message)) => {
                return Err(PackagesError::Read {
                    package: pl.pkg.name.clone(),
                    source_desc: pl.source.describe(),
                    message,
                })
            }
            Err(PutFailure::Nats(m)) => {
                last = m;
                tracing::warn!("upload of {} failed (attempt {}): {last}", pl.key, attempt + 1);
            }
        }
    }
    Err(PackagesError::Upload {
        key: pl.key.clone(),
        bucket: bucket.into(),
        message: last,
    })
}

enum PutFailure {
    Read(String),
    Nats(String),
}

/// One object put, wire-compatible with the JetStream object store (the chunks under
/// `$O.<bucket>.C.<nuid>`, then the meta message under `$O.<bucket>.M.<base64 name>` with a
/// subject rollup, then the old version's chunks purged), with acks pipelined. The content is
/// read and hashed on a blocking thread; the meta is published only when the whole content was
/// read, so a failure leaves the previous object in place. Returns the digest and size read.
async fn put(
    s: &Store,
    bundle: &Option<Arc<BundleReader>>,
    pl: &Planned,
    chunk: usize,
) -> Result<([u8; 32], u64), PutFailure> {
    let previous = raw_meta(s, &pl.key)
        .await
        .ok()
        .flatten()
        .and_then(|v| v.get("nuid").and_then(|n| n.as_str()).map(str::to_string));
    let nuid = nuid::next().to_string();
    let chunk_subject = format!("$O.{}.C.{nuid}", s.bucket);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let b = bundle.clone();
    let src = pl.source.clone();
    let reader_task = tokio::task::spawn_blocking(move || {
        source::with_reader(b.as_deref(), &src, |r| {
            let mut h = crate::digest::Hasher::new();
            loop {
                let mut buf = vec![0u8; chunk];
                let n = source::read_full(r, &mut buf)?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                h.update(&buf);
                if tx.blocking_send(Bytes::from(buf)).is_err() {
                    // The uploader stopped (it reports its own error).
                    break;
                }
            }
            Ok(h)
        })
    });
    let purge_ours = || async {
        let _ = s.stream.purge().filter(chunk_subject.clone()).await;
    };
    let mut in_flight = std::collections::VecDeque::new();
    let mut chunks = 0usize;
    let mut sent = 0u64;
    let mut failure = None;
    while let Some(payload) = rx.recv().await {
        sent += payload.len() as u64;
        chunks += 1;
        match s.js.publish(chunk_subject.clone(), payload).await {
            Ok(ack) => in_flight.push_back(ack),
            Err(e) => {
                failure = Some(format!("publishing chunk {chunks}: {}", crate::error::chain(&e)));
                break;
            }
        }
        if in_flight.len() >= WINDOW {
            if let Some(ack) = in_flight.pop_front() {
                if let Err(e) = ack.await {
                    failure = Some(format!("ack of a chunk: {}", crate::error::chain(&e)));
                    break;
                }
            }
        }
    }
    // Let the reader finish (or see the closed channel) before judging.
    drop(rx);
    for ack in in_flight {
        if let Err(e) = ack.await {
            failure.get_or_insert_with(|| format!("ack of a chunk: {}", crate::error::chain(&e)));
        }
    }
    let read = reader_task
        .await
        .map_err(|e| PutFailure::Read(format!("reading task: {e}")))?;
    if let Some(f) = failure {
        purge_ours().await;
        return Err(PutFailure::Nats(f));
    }
    let hasher = match read {
        Ok(h) => h,
        Err(e) => {
            purge_ours().await;
            return Err(PutFailure::Read(e.to_string()));
        }
    };
    let size = hasher.len();
    let sha = crate::digest::sha256_from_hex(&hasher.finish().0)
        .ok_or_else(|| PutFailure::Read("internal: malformed digest".into()))?;
    if size != sent || sha != pl.sha || size != pl.size {
        purge_ours().await;
        return Ok((sha, size));
    }
    let meta = serde_json::json!({
        "name": pl.key,
        "description": pl.pkg.name,
        "metadata": {},
        "headers": null,
        "options": { "link": null, "max_chunk_size": chunk },
        "bucket": s.bucket,
        "nuid": nuid,
        "size": size,
        "chunks": chunks,
        "mtime": crate::pack::rfc3339(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ),
        "digest": nats_digest(&sha),
    });
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    let subject = format!(
        "$O.{}.M.{}",
        s.bucket,
        base64::engine::general_purpose::URL_SAFE.encode(&pl.key)
    );
    let published = match s
        .js
        .publish_with_headers(subject, headers, Bytes::from(meta.to_string()))
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| crate::error::chain(&e)),
        Err(e) => Err(crate::error::chain(&e)),
    };
    if let Err(e) = published {
        purge_ours().await;
        return Err(PutFailure::Nats(format!("publishing the object's meta: {e}")));
    }
    // The previous version's chunks are unreachable now.
    if let Some(old) = previous.filter(|o| *o != nuid) {
        let _ = s.stream.purge().filter(format!("$O.{}.C.{old}", s.bucket)).await;
    }
    Ok((sha, size))
}

/// Insert the row, or per the upstream rule overwrite `name` and `updated_at` (`latest`, or forced).
async fn upsert_row(
    client: &tokio_postgres::Client,
    t: &DbTarget,
    g: Generation,
    pl: &Planned,
    force: bool,
) -> Result<(RowAction, i64), PackagesError> {
    let dberr = |what: &str, e: tokio_postgres::Error| {
        PackagesError::Database(RegionsError::Database {
            db: t.name.clone(),
            what: format!("{what} the {} row of {}", db::PACKAGE_TABLE, pl.key),
            message: e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string()),
        })
    };
    let p = &pl.pkg;
    if let Some(r) = &pl.row {
        let overwrite = p.version == LATEST || force;
        if overwrite && (r.name != p.name || pl.action == ObjectAction::Replaced) {
            client
                .execute(
                    format!(
                        "UPDATE {} SET name = $1, updated_at = now() WHERE id = $2",
                        db::PACKAGE_TABLE
                    )
                    .as_str(),
                    &[&p.name, &r.id],
                )
                .await
                .map_err(|e| dberr("updating", e))?;
            return Ok((RowAction::Updated, r.id));
        }
        return Ok((RowAction::Unchanged, r.id));
    }
    let (cols, vals) = match g {
        Generation::Y2025 => ("", ""),
        Generation::Y2026 => (", cpu_architecture", ", $7"),
    };
    let sql = format!(
        "INSERT INTO {} (type, os, object, version, name, description, created_at, updated_at, created_by, updated_by, domain, updated_by_domain{cols}) \
         VALUES ($1, $2, $3, $4, $5, $6, now(), now(), 'system', 'system', 'domain.com', 'domain.com'{vals}) RETURNING id",
        db::PACKAGE_TABLE
    );
    let kind = p.kind.as_str();
    let os = p.os.as_str();
    let row = match g {
        Generation::Y2025 => {
            client
                .query_one(
                    sql.as_str(),
                    &[&kind, &os, &p.object, &p.version, &p.name, &p.description],
                )
                .await
        }
        Generation::Y2026 => {
            client
                .query_one(
                    sql.as_str(),
                    &[&kind, &os, &p.object, &p.version, &p.name, &p.description, &pl.arch],
                )
                .await
        }
    }
    .map_err(|e| dberr("inserting", e))?;
    Ok((RowAction::Created, row.get(0)))
}

/// The human rendering of a report.
pub fn render(r: &PackagesReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}packages on {} bucket {:?} (database {}, schema {}): {} uploaded, {} skipped, {} replaced; rows {} created, {} updated, {} unchanged; {:.1} s",
        if r.dry_run { "dry run: " } else { "" },
        r.nats.as_deref().unwrap_or("?"),
        r.bucket,
        r.database.as_deref().unwrap_or("?"),
        r.generation.map(|g| g.as_str()).unwrap_or("?"),
        r.uploaded,
        r.skipped,
        r.replaced,
        r.rows_created,
        r.rows_updated,
        r.rows_unchanged,
        r.seconds
    );
    for p in &r.packages {
        let speed = p.mb_per_s.map(|m| format!(", {m:.0} MB/s")).unwrap_or_default();
        let row = match (p.row, p.row_id) {
            (Some(a), Some(id)) => format!(", row {id} {a:?}").to_lowercase(),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "  {:<10} {} ({} bytes{speed}{row})",
            format!("{:?}", p.action).to_lowercase(),
            p.key,
            p.size
        );
        if let Some(n) = &p.note {
            let _ = writeln!(s, "             {n}");
        }
    }
    for m in &r.missing_objects {
        let _ = writeln!(
            s,
            "row {} pointed at missing object {}: {}",
            m.row_id,
            m.key,
            if m.repaired {
                "uploaded again from the bundle"
            } else {
                "NOT repaired (the bundle does not have this file)"
            }
        );
    }
    for o in &r.orphan_objects {
        let _ = writeln!(s, "object {o} has no row in {}", db::PACKAGE_TABLE);
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_digests() {
        assert_eq!(
            object_key(Generation::Y2025, "linux", "x86_64", "Controller", "1.0.0", "a.zip"),
            "linux/Controller/1.0.0/a.zip"
        );
        assert_eq!(
            object_key(Generation::Y2026, "linux", "x86_64", "Controller", "1.0.0", "a.zip"),
            "linux/x86_64/Controller/1.0.0/a.zip"
        );
        let sha = [0xfbu8; 32];
        let d = nats_digest(&sha);
        assert!(d.starts_with("SHA-256=") && d.ends_with('=') && d.contains('-'), "{d}");
        assert_eq!(parse_digest(&d).unwrap(), sha.to_vec());
        assert_eq!(parse_digest(d.trim_end_matches('=')).unwrap(), sha.to_vec());
    }
}
