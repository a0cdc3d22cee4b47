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
pub mod inject;
pub mod source;

use crate::bundle::{open_verified, Check, OpenOptions, VerifiedBundle};
use crate::error::{Error, Kind};
use crate::manifest::{normalize_arch, Package, PackageType};
use crate::platform::db::DbError;
use crate::platform::nats::{self, NatsError};
use crate::platform::packages::{self as keys, nats_digest, parse_digest, Row};
use crate::platform::release::{Release, PACKAGE_TABLE};
use crate::ports::live::{NatsBucket, Postgres};
use crate::ports::{ObjectStore, PlatformDb};
use crate::progress::{Reporter, Task};
use crate::site::config::{DatabaseConfig, InstallConfig, NatsConfig};
use bytes::Bytes;
use serde::Serialize;
use source::Source;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Chunk size of bkbundle's puts: 1 MiB (measured fastest), capped by the server's max payload.
pub const CHUNK: usize = 1 << 20;
const LATEST: &str = "latest";

/// The chunk size of a put to a server whose largest message is `max_payload` (0: it does not
/// say): [`CHUNK`], or less when the server takes less.
pub fn chunk_size(max_payload: usize) -> usize {
    if max_payload > 0 {
        CHUNK.min(max_payload)
    } else {
        CHUNK
    }
}

#[derive(Debug, Clone)]
pub struct PackagesOptions {
    /// The bundle holding the packages (`--bundle`), opened with [`Check::Structure`].
    pub bundle: Option<PathBuf>,
    /// Or the bundle already opened (and verified) by the caller: install hands the one it
    /// checked, so that it is neither opened nor checked twice. Wins over `bundle`.
    pub opened: Option<Arc<VerifiedBundle>>,
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
    /// The site's CA, added to each controller package as `certs/ca.crt` at upload (the site's
    /// NATS runs TLS); `None`: packages are uploaded as the bundle has them.
    pub ca: Option<inject::SiteCa>,
}

impl PackagesOptions {
    pub fn new(bundle: PathBuf, config: &InstallConfig, site: BTreeMap<String, String>) -> PackagesOptions {
        PackagesOptions {
            bundle: Some(bundle),
            opened: None,
            dir: None,
            overrides: dir::Overrides::default(),
            force: false,
            dry_run: false,
            database: config.database.clone(),
            database_url: None,
            nats: config.nats.clone(),
            nats_url: None,
            bucket: None,
            ca: site_ca(&site),
            site,
            wait_for_migrations: None,
        }
    }
}

/// The CA controller packages carry: the site's, when its NATS serves TLS (`NATS_PROTOCOL = tls`
/// and `NATS_TLS_CA` in the site values, as install sets them; see [`crate::install::tls`]).
fn site_ca(site: &BTreeMap<String, String>) -> Option<inject::SiteCa> {
    let tls = site.get("NATS_PROTOCOL").is_some_and(|p| p.trim() == "tls");
    let pem = site
        .get("NATS_TLS_CA")
        .filter(|p| p.contains("-----BEGIN CERTIFICATE-----"))?;
    tls.then(|| inject::SiteCa::new(pem.clone()))
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
    Database(#[from] DbError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// Opening the bundle or reading its manifest failed: that error, kind and hints kept.
    #[error("{}", .0.message)]
    Bundle(Error),
    /// The package directory's files (`--dir`): every problem, kind and hints kept.
    #[error("{}", .0.message)]
    Dir(Error),
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

impl From<PackagesError> for Error {
    fn from(e: PackagesError) -> Error {
        let message = e.to_string();
        match e {
            PackagesError::Database(r) => Error::from(r),
            PackagesError::Bundle(e) | PackagesError::Dir(e) => e,
            PackagesError::Nats(e) => Error::from(e),
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

/// What an uploaded artifact is: a package (with its row) or a controller installer (no row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    Controller,
    Collector,
    Installer,
}

impl ArtifactKind {
    pub fn of(p: &Package, installer: bool) -> ArtifactKind {
        match (installer, p.kind) {
            (true, _) => ArtifactKind::Installer,
            (false, PackageType::Controller) => ArtifactKind::Controller,
            (false, PackageType::Collector) => ArtifactKind::Collector,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PackageReport {
    pub package: String,
    #[serde(rename = "type")]
    pub kind: ArtifactKind,
    pub os: String,
    pub arch: String,
    pub object: String,
    pub version: String,
    pub key: String,
    /// The bundle's file: its size and digest.
    pub size: u64,
    pub digest: String,
    /// The stored object's digest when it differs from the file's (the site CA added to a
    /// controller package); `None` when the object is the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_digest: Option<String>,
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
    /// The release found in the database (its last node_mgmt migration, or its features).
    pub release: Option<String>,
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

// ---------------------------------------------------------------------------------------------
// The plan

/// One package's decision: its object (key, digest, size, action) and the row it has.
#[derive(Debug, Clone)]
pub struct Planned {
    pub pkg: Package,
    /// A controller installer: an object without a row.
    pub installer: bool,
    pub arch: String,
    pub source: Source,
    pub key: String,
    /// The bundle file's digest and size.
    pub sha: [u8; 32],
    pub size: u64,
    /// The site CA to add on the way (a controller package, the site's NATS on TLS).
    pub inject: Option<inject::SiteCa>,
    /// The row already there, if any.
    pub row: Option<Row>,
    /// The stored object's digest, if any.
    pub stored: Option<String>,
    pub action: ObjectAction,
    /// Whether the object's bytes are sent.
    pub upload: bool,
    pub note: Option<String>,
}

/// One package to upload, where its bytes are, and its digest when the manifest records it.
#[derive(Debug, Clone)]
pub struct Input {
    pub pkg: Package,
    pub source: Source,
    pub known: Option<([u8; 32], u64)>,
    /// A controller installer (`pkg.name` its file name, `object` [`INSTALLER_OBJECT`]): uploaded
    /// at the release's installer key, no row.
    pub installer: bool,
}

/// The `object` an installer's [`Input`] carries (installers have no row, so it names them only).
pub const INSTALLER_OBJECT: &str = "installer";

fn label(p: &Package) -> String {
    if p.object == INSTALLER_OBJECT && p.version.is_empty() {
        return format!("installer {} ({}/{})", p.name, p.os.as_str(), p.arch);
    }
    format!("{} {} ({}/{})", p.object, p.version, p.os.as_str(), p.arch)
}

/// The packages to upload: the bundle's (opened, its manifest read; collectors inside the
/// controller package located) or the directory's (recognised by name). Every problem at once.
pub fn inputs(opts: &PackagesOptions) -> Result<(Option<Arc<VerifiedBundle>>, Vec<Input>), PackagesError> {
    let from_bundle = opts.opened.is_some() || opts.bundle.is_some();
    if let Some(d) = &opts.dir {
        if from_bundle {
            return Err(PackagesError::Input("give either --bundle or --dir, not both".into()));
        }
        let found = dir::scan(d, &opts.overrides).map_err(PackagesError::Dir)?;
        let inputs = found
            .into_iter()
            .map(|(pkg, source)| Input {
                pkg,
                source,
                known: None,
                installer: false,
            })
            .collect();
        return Ok((None, inputs));
    }
    let bundle = match (&opts.opened, &opts.bundle) {
        (Some(b), _) => b.clone(),
        (None, Some(path)) => {
            let open = OpenOptions {
                check: Check::Structure,
                ..Default::default()
            };
            Arc::new(open_verified(path, &open, &crate::progress::Silent).map_err(PackagesError::Bundle)?)
        }
        (None, None) => {
            return Err(PackagesError::Input(
                "no packages to upload: give --bundle BUNDLE or --dir DIR".into(),
            ))
        }
    };
    bundle_inputs(bundle)
}

/// The bundle's packages, collectors inside the controller package located. Every problem at once.
fn bundle_inputs(bundle: Arc<VerifiedBundle>) -> Result<(Option<Arc<VerifiedBundle>>, Vec<Input>), PackagesError> {
    let manifest = bundle.manifest();
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
            (None, Some(from), Some(entry)) => match controllers.get(from.as_str()).and_then(|c| c.file.clone()) {
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
            },
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
            installer: false,
        });
    }
    inputs.extend(installer_inputs(manifest));
    if !problems.is_empty() {
        return Err(PackagesError::Input(problems.join("\n")));
    }
    Ok((Some(bundle), inputs))
}

/// The bundle's controller installers, as inputs without rows.
fn installer_inputs(manifest: &crate::manifest::Manifest) -> Vec<Input> {
    manifest
        .installers
        .iter()
        .map(|i| Input {
            pkg: Package {
                file: Some(i.file.clone()),
                name: i.name.clone(),
                kind: PackageType::Controller,
                os: i.os,
                arch: i.arch.clone(),
                object: INSTALLER_OBJECT.into(),
                version: String::new(),
                description: i.name.clone(),
                from: None,
                entry: None,
                sha256: Some(i.sha256.clone()),
                size: Some(i.size),
            },
            source: Source::Entry(i.file.clone()),
            known: crate::digest::sha256_from_hex(&i.sha256).map(|b| (b, i.size)),
            installer: true,
        })
        .collect()
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Upload the packages and upsert their rows (`bkbundle init-packages`). See the module
/// documentation.
pub fn run(opts: &PackagesOptions, reporter: &dyn Reporter) -> crate::Result<PackagesReport> {
    crate::runtime::block_on(run_reporting(opts, &process_env, reporter))?.map_err(Error::from)
}

/// [`run`] with the environment (`DATABASE_URL`, `PG*`, `NATS_URL`) looked up through `env`,
/// and no progress shown: for tests, which must not change their own process's environment.
pub async fn run_with_env(
    opts: &PackagesOptions,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PackagesReport, PackagesError> {
    run_reporting(opts, env, &crate::progress::Silent).await
}

/// Every input problem first, before any connection; then the database, once.
async fn run_reporting(
    opts: &PackagesOptions,
    env: &dyn Fn(&str) -> Option<String>,
    reporter: &dyn Reporter,
) -> Result<PackagesReport, PackagesError> {
    let (bundle, inputs) = inputs(opts)?;
    let target = crate::site::targets::database(opts.database_url.as_deref(), &opts.database, &opts.site, env)?;
    let db = Postgres::connect(target).await?;
    run_connected(opts, bundle.as_ref(), &inputs, &db, env, reporter).await
}

/// On a database already connected (install's, doctor's): find its release, connect NATS, take
/// the bucket's lock and run [`run_on`].
pub async fn run_connected(
    opts: &PackagesOptions,
    bundle: Option<&Arc<VerifiedBundle>>,
    inputs: &[Input],
    db: &dyn PlatformDb,
    env: &dyn Fn(&str) -> Option<String>,
    reporter: &dyn Reporter,
) -> Result<PackagesReport, PackagesError> {
    let t0 = Instant::now();
    // 1. Which release the database is (it decides keys, columns and the bucket).
    let release = db.release(opts.wait_for_migrations).await?;
    let bucket = opts
        .bucket
        .clone()
        .or_else(|| opts.nats.bucket.clone())
        .unwrap_or_else(|| keys::bucket(&opts.site, Some(&release)).0);
    let mut report = PackagesReport::default();

    // 2. NATS.
    let nt = crate::site::targets::nats(opts.nats_url.as_deref(), &opts.nats, &opts.site, env)?;
    let nc = nats::connect(&nt).await?;
    // One upload per bucket at a time (a second run waits, then refuses naming the holder); the
    // holder keeps a list of the uploads it began, so that what a killed run left is removed.
    let (_bucket_lock, pending) = if opts.dry_run {
        (None, None)
    } else {
        let (guard, pending) = lock_bucket(&nt.display(), &bucket, &mut report.notes).await?;
        (Some(guard), Some(pending))
    };
    let store = NatsBucket::open_on(&nc, &nt, &bucket, !opts.dry_run).await?;
    let seams = Seams {
        db,
        store: store.as_ref().map(|s| s as &dyn ObjectStore),
        server: nt.display(),
        bucket,
    };
    let run = Run {
        opts,
        bundle,
        inputs,
        release: &release,
        pending: pending.as_ref(),
        reporter,
    };
    run_on(&run, &seams, report, t0).await
}

/// Take bucket `bucket`'s upload lock on NATS server `server` (waiting for another upload to
/// finish), and the holder's list of uploads begun: what [`run_on`] needs before it writes. Keep
/// the guard until the last write is done. A lock taken over from a killed run is noted.
pub async fn lock_bucket(
    server: &str,
    bucket: &str,
    notes: &mut Vec<String>,
) -> Result<(crate::lock::LockGuard, Pending), PackagesError> {
    let guard = crate::lock::acquire_bucket_async(server, bucket, BUCKET_LOCK_WAIT)
        .await
        .map_err(PackagesError::Bundle)?;
    notes.extend(guard.takeover_note());
    let pending = crate::lock::bucket_pending_file(server, bucket)
        .map(Pending)
        .map_err(PackagesError::Bundle)?;
    Ok((guard, pending))
}

/// The systems a run reaches, connected once by the caller.
pub struct Seams<'a> {
    pub db: &'a dyn PlatformDb,
    /// The bucket; `None` when it does not exist (a dry run does not create it).
    pub store: Option<&'a dyn ObjectStore>,
    /// The NATS server and the bucket's name, for the report.
    pub server: String,
    pub bucket: String,
}

/// What one run works on: its options, the packages and where their bytes are, the release.
pub struct Run<'a> {
    pub opts: &'a PackagesOptions,
    pub bundle: Option<&'a Arc<VerifiedBundle>>,
    pub inputs: &'a [Input],
    pub release: &'a Release,
    /// The bucket lock holder's list of uploads begun (none in a dry run).
    pub pending: Option<&'a Pending>,
    /// Each upload's progress, in bytes.
    pub reporter: &'a dyn Reporter,
}

/// Plan, write and check, on connected systems (stages 3 to 5 of the module documentation).
pub async fn run_on(
    run: &Run<'_>,
    seams: &Seams<'_>,
    mut report: PackagesReport,
    t0: Instant,
) -> Result<PackagesReport, PackagesError> {
    let opts = run.opts;
    report.dry_run = opts.dry_run;
    report.bucket = seams.bucket.clone();
    report.database = Some(seams.db.target().name.display.clone());
    report.release = Some(run.release.label());
    report.nats = Some(seams.server.clone());
    report.chunk_size = chunk_size(seams.store.map(|s| s.max_payload()).unwrap_or(0));
    if seams.store.is_none() {
        report
            .notes
            .push(format!("bucket {:?} does not exist: it would be created", seams.bucket));
    }
    if let (Some(s), Some(p)) = (seams.store, run.pending) {
        reclaim_interrupted(s, p, &mut report).await;
    }
    // The rows, read under the bucket's lock: a run that waited for another sees its rows.
    let rows = seams.db.package_rows(run.release).await?;

    // 3. The plan.
    let planned = plan(run, &rows, seams.store, &seams.bucket, &mut report.notes).await?;
    if let Some(b) = run.bundle {
        let gaps = base_gaps(b.manifest(), &planned);
        if !gaps.is_empty() {
            return Err(PackagesError::Bundle(crate::delta::gaps_error(
                b.manifest(),
                &gaps,
                None,
            )));
        }
    }

    // 4. Write: the object, confirmed, then its row.
    for pl in &planned {
        execute_one(run, seams, pl, &mut report).await?;
    }

    // 5. Consistency both ways.
    if let Some(s) = seams.store {
        let rows = seams.db.package_rows(run.release).await?;
        let names = s.list().await?;
        let (missing, orphans) = keys::consistency(&rows, run.release, &names);
        for (row_id, key) in missing {
            if !report.missing_objects.iter().any(|r| r.row_id == row_id) {
                report.missing_objects.push(MissingObject {
                    row_id,
                    key,
                    repaired: false,
                });
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

impl Planned {
    /// The bundle file a delta leaves to its base that this object's bytes would have to come
    /// from: the object is to be sent (the store lacks it, or holds other bytes) but the bundle
    /// does not carry it.
    pub fn missing_from_base<'a>(&'a self, m: &crate::manifest::Manifest) -> Option<&'a str> {
        let path = match &self.source {
            Source::Entry(path) | Source::Inner { container: path, .. } => path,
            Source::File(_) => return None,
        };
        (self.upload && m.from_base(path)).then_some(path.as_str())
    }
}

/// The objects a delta bundle would have to send but leaves to its base: the store lacks them (or
/// holds other bytes), so the site was not installed from that base or lost them.
pub fn base_gaps(m: &crate::manifest::Manifest, planned: &[Planned]) -> Vec<String> {
    planned
        .iter()
        .filter_map(|p| {
            p.missing_from_base(m).map(|path| {
                format!(
                    "object {} ({} {}): not in the object store with digest {}, and this delta bundle leaves its file {path} to its base",
                    p.key,
                    p.pkg.object,
                    p.pkg.version,
                    keys::nats_digest(&p.sha)
                )
            })
        })
        .collect()
}

/// Decide each package's object and row (stage 3): nothing is written. `store` `None`: the bucket
/// is not there (every object is to be uploaded). Conflicts (a different object under a fixed
/// version, without `force`) are all returned together.
pub async fn plan(
    run: &Run<'_>,
    rows: &[Row],
    store: Option<&dyn ObjectStore>,
    bucket: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<Planned>, PackagesError> {
    let release = run.release;
    let mut plan: Vec<Planned> = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for input in run.inputs {
        let p = &input.pkg;
        let label = label(p);
        let arch = normalize_arch(&p.arch).unwrap_or(p.arch.as_str()).to_string();
        let (key, ident) = key_and_identity(release, input, &arch);
        if let Some(first) = seen.get(&ident) {
            notes.push(format!(
                "package {label} was left alone: it collides with {first} on (os, object, version) = ({}, {}, {}); this release ({}) holds one architecture per version (its {PACKAGE_TABLE} is unique on those three columns)",
                p.os.as_str(), p.object, p.version, release.label()
            ));
            continue;
        }
        seen.insert(ident, label.clone());
        let (sha, size) = digest_of(run, &input.source, input.known.as_ref(), &label).await?;
        let row = row_of(rows, release, input, &arch);
        let inject =
            run.opts.ca.clone().filter(|_| {
                !input.installer && p.kind == PackageType::Controller && inject::format_of(&p.name).is_some()
            });
        let stored = stored_object(store, bucket, &key, inject.is_some()).await?;
        let existing = Existing {
            stored: stored.as_ref(),
            row: row.as_ref(),
            installer: input.installer,
        };
        let (action, upload, note) = match decide(p, &sha, size, &existing, inject.as_ref(), run.opts.force) {
            Decision::Conflict(stored_digest) => {
                conflicts.push(Conflict {
                    key: key.clone(),
                    stored_digest,
                    file_digest: nats_digest(&sha),
                });
                (ObjectAction::LeftAlone, false, None)
            }
            Decision::Do(action, upload, note) => (action, upload, note),
        };
        plan.push(Planned {
            pkg: p.clone(),
            installer: input.installer,
            arch,
            source: input.source.clone(),
            key,
            sha,
            size,
            inject,
            row,
            stored: stored.map(|s| s.digest),
            action,
            upload,
            note,
        });
    }
    if !conflicts.is_empty() {
        return Err(PackagesError::Conflict(conflicts));
    }
    Ok(plan)
}

/// An input's object key, and its identity under the release's UNIQUE constraint (releases whose
/// constraint has no architecture hold one row per (os, object, version)); an installer's is its key.
fn key_and_identity(release: &Release, input: &Input, arch: &str) -> (String, String) {
    let p = &input.pkg;
    if input.installer {
        let key = keys::installer_key(release, p.os.as_str(), arch, &p.name);
        return (key.clone(), key);
    }
    (
        keys::object_key(release, p.os.as_str(), arch, &p.object, &p.version, &p.name),
        keys::row_identity(release, p.os.as_str(), arch, &p.object, &p.version),
    )
}

/// The row already there for a package (an installer has none).
fn row_of(rows: &[Row], release: &Release, input: &Input, arch: &str) -> Option<Row> {
    let p = &input.pkg;
    if input.installer {
        return None;
    }
    rows.iter()
        .find(|r| {
            r.os == p.os.as_str()
                && r.object == p.object
                && r.version == p.version
                && (!release.has_package_arch() || r.arch == arch)
        })
        .cloned()
}

/// An object in the store: its digest, size, and the bundle file and CA it was made from when
/// bkbundle added the site CA to it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub digest: String,
    pub size: u64,
    /// `(source sha256 hex, CA sha256 hex)` from the object's meta.
    pub made_from: Option<(String, String)>,
}

/// The stored object under `key`, with what it was made from when `with_meta` (a package the CA
/// is added to: its digest alone cannot say whether it is this bundle's file plus this CA).
async fn stored_object(
    store: Option<&dyn ObjectStore>,
    bucket: &str,
    key: &str,
    with_meta: bool,
) -> Result<Option<Stored>, PackagesError> {
    let Some(s) = store else { return Ok(None) };
    let err = |what: &str, m: String| {
        PackagesError::Nats(NatsError::Bucket {
            nats: s.server().to_string(),
            bucket: bucket.to_string(),
            message: format!("reading the {what} of {key}: {m}"),
        })
    };
    let Some((digest, size)) = s.info(key).await.map_err(|m| err("info", m))? else {
        return Ok(None);
    };
    let made_from = if with_meta {
        s.meta(key).await.map_err(|m| err("meta", m))?.and_then(|m| {
            let md = m.get("metadata")?;
            let src = md.get(inject::SOURCE_KEY)?.as_str()?.to_string();
            let ca = md.get(inject::CA_KEY)?.as_str()?.to_string();
            Some((src, ca))
        })
    } else {
        None
    };
    Ok(Some(Stored {
        digest,
        size,
        made_from,
    }))
}

/// A package's SHA-256 and size: the manifest's when it records them (no byte read: a re-run
/// stays fast whatever the package sizes), else hashed, streamed. Uploads confirm the digest
/// either way.
async fn digest_of(
    run: &Run<'_>,
    source: &Source,
    known: Option<&([u8; 32], u64)>,
    label: &str,
) -> Result<([u8; 32], u64), PackagesError> {
    if let Some(k) = known {
        return Ok(*k);
    }
    let (b, s2) = (run.bundle.cloned(), source.clone());
    tokio::task::spawn_blocking(move || source::hash(b.as_deref(), &s2))
        .await
        .map_err(|e| PackagesError::Internal(format!("hashing task: {e}")))?
        .map_err(|e| PackagesError::Read {
            package: label.to_string(),
            source_desc: source.describe(),
            message: e.to_string(),
        })
}

/// One package's action, from its stored object (digest, size) and its row.
enum Decision {
    /// (action, whether the bytes are sent, a note)
    Do(ObjectAction, bool, Option<String>),
    /// A different object under a fixed version, not forced: the stored digest.
    Conflict(String),
}

/// What is there for one package: its stored object and its row.
struct Existing<'a> {
    stored: Option<&'a Stored>,
    row: Option<&'a Row>,
    installer: bool,
}

/// The upstream rules: an equal object is skipped; a different one under a fixed version is a
/// conflict unless forced (`latest` is always replaced); a row whose object is gone is repaired;
/// a row of the same version with another file is left alone unless forced. An installer (no
/// version, no row) is replaced whenever it differs: it must match the bundle's controller. A
/// package that gets the site CA is "equal" when its meta says it was made from this file and
/// this CA; made from this file with another CA, it is replaced (the site's CA changed).
fn decide(p: &Package, sha: &[u8; 32], size: u64, e: &Existing, ca: Option<&inject::SiteCa>, force: bool) -> Decision {
    let latest = p.version == LATEST || e.installer;
    let file_hex = crate::digest::hex(sha);
    let same_file = |s: &Stored| parse_digest(&s.digest).as_deref() == Some(&sha[..]) && s.size == size;
    let (same, ours) = match (e.stored, ca) {
        (Some(s), Some(ca)) => match &s.made_from {
            Some((src, c)) if *src == file_hex => (*c == ca.sha256, true),
            // The bundle's own file, stored without the CA (before the site ran TLS): ours too.
            _ => (false, same_file(s)),
        },
        (Some(s), None) => (same_file(s), false),
        (None, _) => (false, false),
    };
    match (e.stored, same) {
        (Some(_), true) => Decision::Do(ObjectAction::Skipped, false, None),
        (Some(_), false) if ours => Decision::Do(
            ObjectAction::Replaced,
            true,
            Some("stored without the site's current CA: uploaded again with it in certs/ca.crt".into()),
        ),
        (Some(s), false) if !latest && !force => Decision::Conflict(s.digest.clone()),
        (Some(_), false) => Decision::Do(ObjectAction::Replaced, true, None),
        (None, _) => match e.row {
            Some(r) if r.name == p.name => Decision::Do(ObjectAction::Repaired, true, None),
            Some(r) if !latest && !force => Decision::Do(
                ObjectAction::LeftAlone,
                false,
                Some(format!(
                    "row {} already holds version {} with file {}; left alone (upstream rule), --force replaces it",
                    r.id, p.version, r.name
                )),
            ),
            _ => Decision::Do(ObjectAction::Uploaded, true, None),
        },
    }
}

/// Write one planned package (unless a dry run) and add it to the report.
async fn execute_one(
    run: &Run<'_>,
    seams: &Seams<'_>,
    pl: &Planned,
    report: &mut PackagesReport,
) -> Result<(), PackagesError> {
    let opts = run.opts;
    let t = Instant::now();
    let mut row_action = None;
    let mut row_id = pl.row.as_ref().map(|r| r.id);
    // Skipped with the CA: the stored digest is the object's.
    let mut object_digest = pl
        .inject
        .as_ref()
        .and_then(|_| pl.stored.clone())
        .filter(|_| !pl.upload);
    if !opts.dry_run {
        if pl.upload {
            let s = seams
                .store
                .ok_or_else(|| PackagesError::Internal("no object store after planning".into()))?;
            let sent = upload(s, run, pl, report.chunk_size).await?;
            report.bytes_sent += sent.1;
            object_digest = pl.inject.as_ref().map(|_| nats_digest(&sent.0));
        }
        if pl.action != ObjectAction::LeftAlone && !pl.installer {
            let (a, id) = upsert_row(seams.db, run.release, pl, opts.force).await?;
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
        kind: ArtifactKind::of(&pl.pkg, pl.installer),
        os: pl.pkg.os.as_str().to_string(),
        arch: pl.arch.clone(),
        object: pl.pkg.object.clone(),
        version: pl.pkg.version.clone(),
        key: pl.key.clone(),
        size: pl.size,
        digest: nats_digest(&pl.sha),
        object_digest,
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
    Ok(())
}

/// How long a run waits for another upload to the same bucket to finish.
const BUCKET_LOCK_WAIT: Duration = Duration::from_secs(300);

/// The uploads the bucket lock's holder began and has not finished: one nuid per line
/// ([`crate::lock::bucket_pending_file`]). Only the holder of the bucket's lock touches it.
pub struct Pending(std::path::PathBuf);

impl Pending {
    fn list(&self) -> Vec<String> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
    fn write(&self, nuids: &[String]) -> std::io::Result<()> {
        use std::io::Write as _;
        let tmp = self.0.with_extension("pending.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        for n in nuids {
            writeln!(f, "{n}")?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &self.0)
    }
    fn add(&self, nuid: &str) -> std::io::Result<()> {
        let mut all = self.list();
        all.push(nuid.to_string());
        self.write(&all)
    }
    fn remove(&self, nuid: &str) -> std::io::Result<()> {
        let all: Vec<String> = self.list().into_iter().filter(|n| n != nuid).collect();
        self.write(&all)
    }
}

/// Remove the chunks of uploads a killed run began (listed in `pending`) that no object refers
/// to, so that kills do not fill the stream with unreachable chunks.
async fn reclaim_interrupted(s: &dyn ObjectStore, pending: &Pending, report: &mut PackagesReport) {
    let listed = pending.list();
    if listed.is_empty() {
        return;
    }
    let inv = match s.inventory().await {
        Ok(i) => i,
        Err(e) => {
            report.notes.push(format!(
                "the chunks of {} interrupted upload(s) were not removed (the stream could not be read: {e}); `bkbundle doctor --fix` removes them later",
                listed.len()
            ));
            return;
        }
    };
    let mut purged = 0u64;
    let mut left = Vec::new();
    for nuid in &listed {
        if !inv.unreferenced.iter().any(|(n, _)| n == nuid) {
            continue; // finished after all (its meta names it), or nothing was sent
        }
        match s.purge_chunks(nuid).await {
            Ok(n) => purged += n,
            Err(_) => left.push(nuid.clone()),
        }
    }
    let _ = pending.write(&left);
    if purged > 0 {
        report.notes.push(format!(
            "removed {purged} chunk message(s) of {} upload(s) a killed run had begun",
            listed.len() - left.len()
        ));
    }
}

/// Stream one package into the object store (bounded memory: a few chunks in flight), then
/// confirm the stored digest and size. Bounded retries; on a failed first attempt the chunk
/// size drops below the server's max payload. Returns the object's digest and size (the file's,
/// or with the site CA added, the new archive's).
async fn upload(
    s: &dyn ObjectStore,
    run: &Run<'_>,
    pl: &Planned,
    chunk: usize,
) -> Result<([u8; 32], u64), PackagesError> {
    let mut chunk = chunk;
    let mut last = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            chunk = chunk.min(CHUNK - (64 << 10));
        }
        let task = run.reporter.task(&format!("upload {}", pl.key), Some(pl.size));
        let result = put(s, run.bundle, pl, chunk, run.pending, task).await;
        match result {
            Ok(sent) => return confirm(s, pl, sent).await.map(|_| sent),
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
        bucket: s.bucket().into(),
        message: last,
    })
}

/// The stored object's digest and size are the ones sent.
async fn confirm(s: &dyn ObjectStore, pl: &Planned, (sha, size): ([u8; 32], u64)) -> Result<(), PackagesError> {
    let found = s.info(&pl.key).await.map_err(|m| PackagesError::Upload {
        key: pl.key.clone(),
        bucket: s.bucket().into(),
        message: format!("confirming: {m}"),
    })?;
    let (d, sz) = found.unwrap_or_default();
    if parse_digest(&d).as_deref() != Some(&sha[..]) || sz != size {
        return Err(PackagesError::Confirm {
            key: pl.key.clone(),
            expected: nats_digest(&sha),
            expected_size: size,
            found: d,
            found_size: sz,
        });
    }
    Ok(())
}

/// Why a put failed: its content (unreadable, or not the bytes expected), or the store.
pub(crate) enum PutFailure {
    Read(String),
    Nats(String),
}

/// One package put through [`put_object`]: its bytes (the file, or the archive with the site CA
/// added) read and cut into chunks on a blocking thread, checked against the plan.
async fn put(
    s: &dyn ObjectStore,
    bundle: Option<&Arc<VerifiedBundle>>,
    pl: &Planned,
    chunk: usize,
    pending: Option<&Pending>,
    task: Box<dyn Task>,
) -> Result<([u8; 32], u64), PutFailure> {
    let (b, planned) = (bundle.cloned(), pl.clone());
    let content = move |tx| async move {
        let made = tokio::task::spawn_blocking(move || {
            let mut sink = ChunkSink::new(tx, chunk, &*task);
            let made = produce(b.as_deref(), &planned, &mut sink).and_then(|_| sink.flush_chunk());
            task.finish();
            made.map(|_| sink.into_hasher())
        })
        .await
        .map_err(|e| PutFailure::Read(format!("reading task: {e}")))?;
        made.map_err(|e| PutFailure::Read(e.to_string()))
    };
    let check = |sha: &[u8; 32], size: u64| check_sent(pl, sha, size);
    put_object(s, &package_fields(pl, chunk), pending, content, check).await
}

/// What an object's meta message says besides the fields each upload sets itself (bucket, nuid,
/// size, chunks, mtime, digest).
#[derive(Debug, Clone)]
pub(crate) struct ObjectFields {
    pub name: String,
    pub description: String,
    /// The rest, written as given: headers, metadata, options, whatever else a client recorded.
    pub rest: serde_json::Map<String, serde_json::Value>,
}

/// A package object's fields; with the CA added, `metadata` records the bundle file's digest and
/// the CA's, so a re-run can tell the object is up to date.
fn package_fields(pl: &Planned, chunk: usize) -> ObjectFields {
    let metadata = match &pl.inject {
        Some(ca) => serde_json::json!({
            inject::SOURCE_KEY: crate::digest::hex(&pl.sha),
            inject::CA_KEY: ca.sha256,
        }),
        None => serde_json::json!({}),
    };
    let mut rest = serde_json::Map::new();
    rest.insert("metadata".into(), metadata);
    rest.insert("headers".into(), serde_json::Value::Null);
    rest.insert(
        "options".into(),
        serde_json::json!({ "link": null, "max_chunk_size": chunk }),
    );
    ObjectFields {
        name: pl.key.clone(),
        description: pl.pkg.name.clone(),
        rest,
    }
}

/// One object put, wire-compatible with the JetStream object store, for every upload bkbundle
/// makes (packages, a backup's objects): the chunks under a new upload id (listed in `pending`
/// first, so that a kill leaves nothing the next run cannot remove), then the meta message, which
/// replaces the previous version. `content` produces the bytes into a [`ChunkSink`] over the
/// channel it is given and returns the sink's hasher; the meta is published only when the whole
/// content was produced, every byte was taken by the store and `check` accepts the digest and
/// size sent, so a failure leaves the previous object in place (its chunks are purged).
/// Returns the digest and size sent.
pub(crate) async fn put_object<P, F>(
    s: &dyn ObjectStore,
    fields: &ObjectFields,
    pending: Option<&Pending>,
    content: P,
    check: impl FnOnce(&[u8; 32], u64) -> Result<(), String>,
) -> Result<([u8; 32], u64), PutFailure>
where
    P: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> F,
    F: std::future::Future<Output = Result<crate::digest::Hasher, PutFailure>>,
{
    let nuid = nuid::next().to_string();
    if let Some(p) = pending {
        p.add(&nuid)
            .map_err(|e| PutFailure::Nats(format!("cannot record the upload in {}: {e}", p.0.display())))?;
    }
    let result = put_chunks(s, fields, &nuid, content, check).await;
    if let Some(p) = pending {
        let _ = p.remove(&nuid);
    }
    result
}

/// The chunk channel's depth: with the store's own window, what one put holds in memory.
const CHANNEL_CHUNKS: usize = 4;

async fn put_chunks<P, F>(
    s: &dyn ObjectStore,
    fields: &ObjectFields,
    nuid: &str,
    content: P,
    check: impl FnOnce(&[u8; 32], u64) -> Result<(), String>,
) -> Result<([u8; 32], u64), PutFailure>
where
    P: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> F,
    F: std::future::Future<Output = Result<crate::digest::Hasher, PutFailure>>,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
    let send = async move {
        let mut rx = rx;
        let sent = s.send_chunks(nuid, &mut rx).await;
        // A producer still writing then sees the store stopped, rather than a full channel.
        drop(rx);
        sent
    };
    let (read, sent) = tokio::join!(content(tx), send);
    let (chunks, sent) = sent.map_err(PutFailure::Nats)?;
    let hasher = match read {
        Ok(h) => h,
        Err(e) => {
            let _ = s.purge_chunks(nuid).await;
            return Err(e);
        }
    };
    let size = hasher.len();
    let sha = crate::digest::sha256_from_hex(&hasher.finish().0)
        .ok_or_else(|| PutFailure::Read("internal: malformed digest".into()))?;
    if let Err(m) = check(&sha, size) {
        let _ = s.purge_chunks(nuid).await;
        return Err(PutFailure::Read(m));
    }
    if size != sent {
        let _ = s.purge_chunks(nuid).await;
        return Err(PutFailure::Nats(format!("the store took {sent} of {size} bytes")));
    }
    let meta = object_meta(s.bucket(), fields, nuid, chunks, size, &sha);
    if let Err(e) = s.publish_meta(&fields.name, &meta).await {
        let _ = s.purge_chunks(nuid).await;
        return Err(PutFailure::Nats(format!("publishing the object's meta: {e}")));
    }
    Ok((sha, size))
}

/// Cuts the bytes of one put into `chunk`-sized messages for the store, hashing and counting
/// them. Two ways in: written to from a blocking thread ([`std::io::Write`], sends block), or
/// fed from a reader by a task of the runtime ([`ChunkSink::feed`], sends await).
pub(crate) struct ChunkSink<'a> {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    chunk: usize,
    hasher: crate::digest::Hasher,
    task: &'a dyn Task,
}

fn store_stopped() -> std::io::Error {
    // The store reports its own error.
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the object store stopped")
}

impl<'a> ChunkSink<'a> {
    pub(crate) fn new(tx: tokio::sync::mpsc::Sender<Bytes>, chunk: usize, task: &'a dyn Task) -> ChunkSink<'a> {
        ChunkSink {
            tx,
            buf: Vec::with_capacity(chunk),
            chunk,
            hasher: crate::digest::Hasher::new(),
            task,
        }
    }

    /// The bytes buffered, hashed, as one message; `None` when there are none.
    fn take_chunk(&mut self) -> Option<Bytes> {
        if self.buf.is_empty() {
            return None;
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
        self.hasher.update(&full);
        Some(Bytes::from(full))
    }

    /// Send what is buffered (from a blocking thread).
    fn flush_chunk(&mut self) -> std::io::Result<()> {
        match self.take_chunk() {
            Some(c) => self.tx.blocking_send(c).map_err(|_| store_stopped()),
            None => Ok(()),
        }
    }

    /// Read `input` to its end and send it, chunk by chunk, from a task of the multi-threaded
    /// runtime: each chunk's reads run in place (`block_in_place`, as [`crate::runtime`] has
    /// blocking parts do), so the reader may be borrowed from the caller.
    pub(crate) async fn feed(&mut self, input: &mut (dyn std::io::Read + Send)) -> std::io::Result<()> {
        loop {
            let ended = tokio::task::block_in_place(|| self.fill(input))?;
            if let Some(c) = self.take_chunk() {
                self.tx.send(c).await.map_err(|_| store_stopped())?;
            }
            if ended {
                return Ok(());
            }
        }
    }

    /// Read from `input` until a whole chunk is buffered (false) or the input ends (true).
    fn fill(&mut self, input: &mut (dyn std::io::Read + Send)) -> std::io::Result<bool> {
        let mut filled = self.buf.len();
        self.buf.resize(self.chunk, 0);
        let ended = loop {
            if filled == self.chunk {
                break Ok(false);
            }
            match input.read(&mut self.buf[filled..]) {
                Ok(0) => break Ok(true),
                Ok(n) => {
                    filled += n;
                    self.task.advance(n as u64);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.buf.truncate(filled);
        ended
    }

    /// The digest and count of every byte sent.
    pub(crate) fn into_hasher(self) -> crate::digest::Hasher {
        self.hasher
    }
}

impl std::io::Write for ChunkSink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.task.advance(n as u64);
        if self.buf.len() == self.chunk {
            self.flush_chunk()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Write the package's bytes, or the archive with the site CA added, into `sink`.
fn produce(bundle: Option<&VerifiedBundle>, pl: &Planned, sink: &mut ChunkSink<'_>) -> std::io::Result<()> {
    let Some(ca) = &pl.inject else {
        return source::with_reader(bundle, &pl.source, |r| std::io::copy(r, sink).map(|_| ()));
    };
    let other = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    // `package_archive` checked the whole entry against the manifest: these are the planned bytes.
    match (&pl.source, bundle) {
        (Source::Entry(path), Some(b)) => add_ca(b.package_archive(path).map_err(source::bundle_error)?, pl, ca, sink),
        (Source::File(path), _) => add_ca(std::fs::File::open(path)?, pl, ca, sink),
        _ => Err(other(format!(
            "{}: the site CA can only be added to a whole package",
            pl.source.describe()
        ))),
    }
}

fn add_ca<R: std::io::Read + std::io::Seek>(
    file: R,
    pl: &Planned,
    ca: &inject::SiteCa,
    sink: &mut ChunkSink<'_>,
) -> std::io::Result<()> {
    match inject::format_of(&pl.pkg.name) {
        Some(inject::Format::Zip) => inject::zip_with_ca(file, ca, sink).map(|_| ()),
        Some(inject::Format::TarGz) => inject::tar_gz_with_ca(file, ca, sink).map(|_| ()),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a zip or tar.gz", pl.pkg.name),
        )),
    }
}

/// The bytes sent are the file planned (else a damaged bundle or a file changed under us).
fn check_sent(pl: &Planned, sha: &[u8; 32], size: u64) -> Result<(), String> {
    if pl.inject.is_some() || (*sha == pl.sha && size == pl.size) {
        return Ok(());
    }
    Err(format!(
        "read {size} bytes with digest {}, but {} bytes with digest {} were expected; the stored object was left as it was",
        nats_digest(sha),
        pl.size,
        nats_digest(&pl.sha)
    ))
}

/// The object's meta message (the object store's JSON): `fields`, and what this upload made of
/// it (bucket, upload id, size, chunks, time, digest).
fn object_meta(
    bucket: &str,
    fields: &ObjectFields,
    nuid: &str,
    chunks: usize,
    size: u64,
    sha: &[u8; 32],
) -> serde_json::Value {
    let mtime = crate::pack::rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    let mut meta = fields.rest.clone();
    for (key, value) in [
        ("name", serde_json::json!(fields.name)),
        ("description", serde_json::json!(fields.description)),
        ("bucket", serde_json::json!(bucket)),
        ("nuid", serde_json::json!(nuid)),
        ("size", serde_json::json!(size)),
        ("chunks", serde_json::json!(chunks)),
        ("mtime", serde_json::json!(mtime)),
        ("digest", serde_json::json!(nats_digest(sha))),
    ] {
        meta.insert(key.to_string(), value);
    }
    serde_json::Value::Object(meta)
}

/// Insert the row, or per the upstream rule overwrite `name` and `updated_at` (`latest`, or forced).
async fn upsert_row(
    db: &dyn PlatformDb,
    release: &Release,
    pl: &Planned,
    force: bool,
) -> Result<(RowAction, i64), PackagesError> {
    let p = &pl.pkg;
    if let Some(r) = &pl.row {
        let overwrite = p.version == LATEST || force;
        if overwrite && (r.name != p.name || pl.action == ObjectAction::Replaced) {
            db.update_package_row_name(r.id, &p.name, &pl.key).await?;
            return Ok((RowAction::Updated, r.id));
        }
        return Ok((RowAction::Unchanged, r.id));
    }
    let row = keys::NewRow {
        kind: p.kind.as_str(),
        os: p.os.as_str(),
        arch: &pl.arch,
        object: &p.object,
        version: &p.version,
        name: &p.name,
        description: &p.description,
    };
    let id = db.insert_package_row(release, &row, &pl.key).await?;
    Ok((RowAction::Created, id))
}

/// The human rendering of a report.
pub fn render(r: &PackagesReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let (upload, replace, create, update) = if r.dry_run {
        (
            "would be uploaded",
            "would be replaced",
            "would be created",
            "would be updated",
        )
    } else {
        ("uploaded", "replaced", "created", "updated")
    };
    let _ = writeln!(
        s,
        "{}packages on {} bucket {:?} (database {}, {}): {} {upload}, {} skipped, {} {replace}; rows {} {create}, {} {update}, {} unchanged; {:.1} s",
        if r.dry_run { "dry run, nothing written: " } else { "" },
        r.nats.as_deref().unwrap_or("?"),
        r.bucket,
        r.database.as_deref().unwrap_or("?"),
        r.release.as_deref().unwrap_or("release unknown"),
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
        let action = format!("{:?}", p.action).to_lowercase();
        let action = match (r.dry_run, p.action) {
            (true, ObjectAction::Uploaded | ObjectAction::Replaced | ObjectAction::Repaired) => {
                format!("would be {action}")
            }
            _ => action,
        };
        let _ = writeln!(s, "  {:<10} {} ({} bytes{speed}{row})", action, p.key, p.size);
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
        let _ = writeln!(s, "object {o} has no row in {PACKAGE_TABLE}");
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    //! The plan and the writes on the seams, with fakes: no PostgreSQL, no NATS.
    use super::*;
    use crate::platform::release::catalog;
    use crate::ports::fakes::{controller_package, FakeDb, FakeStore};
    use crate::site::config::InstallConfig;

    const CONTENT: &[u8] = b"PK\x05\x06 the controller package, version 1";

    async fn run_fake(
        opts: &PackagesOptions,
        inputs: &[Input],
        release: &Release,
        db: &FakeDb,
        store: &FakeStore,
    ) -> Result<PackagesReport, PackagesError> {
        let run = Run {
            opts,
            bundle: None,
            inputs,
            release,
            pending: None,
            reporter: &crate::progress::Silent,
        };
        let seams = Seams {
            db,
            store: Some(store),
            server: store.server().to_string(),
            bucket: store.bucket.clone(),
        };
        run_on(&run, &seams, PackagesReport::default(), Instant::now()).await
    }

    fn options() -> PackagesOptions {
        PackagesOptions::new(PathBuf::new(), &InstallConfig::default(), BTreeMap::new())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_the_object_then_its_row_and_a_rerun_sends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = [controller_package(dir.path(), "1.0.0", CONTENT)];
        let release = Release::newest_known();
        let (db, store) = (FakeDb::new(release.clone()), FakeStore::new("bklite"));
        let r = run_fake(&options(), &inputs, &release, &db, &store).await.unwrap();
        assert_eq!((r.uploaded, r.rows_created, r.bytes_sent), (1, 1, CONTENT.len() as u64));
        // The newest release keys objects by architecture (normalised: amd64 is x86_64).
        let key = "linux/x86_64/Controller/1.0.0/fusion-collectors-1.0.0-linux-amd64.zip";
        assert_eq!(store.keys(), vec![key.to_string()]);
        assert_eq!(store.objects.lock().unwrap()[key].0, CONTENT);
        assert_eq!(r.packages[0].digest, store.objects.lock().unwrap()[key].1["digest"]);
        assert_eq!(db.rows.lock().unwrap()[0].arch, "x86_64");

        let again = run_fake(&options(), &inputs, &release, &db, &store).await.unwrap();
        assert_eq!((again.skipped, again.rows_unchanged, again.bytes_sent), (1, 1, 0));
        assert!(again.missing_objects.is_empty() && again.orphan_objects.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_different_object_under_a_fixed_version_is_a_conflict_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let release = catalog(false, false, false, None, Some("0012_old"));
        let key = "linux/Controller/1.0.0/fusion-collectors-1.0.0-linux-amd64.zip";
        let store = FakeStore::new("bk_lite").with_object(key, b"another build");
        let db = FakeDb::new(release.clone());
        let inputs = [controller_package(dir.path(), "1.0.0", CONTENT)];
        let e = run_fake(&options(), &inputs, &release, &db, &store).await.unwrap_err();
        let PackagesError::Conflict(c) = e else { panic!("{e}") };
        assert_eq!(c[0].key, key);
        assert!(db.writes.lock().unwrap().is_empty());
        assert_eq!(store.objects.lock().unwrap()[key].0, b"another build");

        let mut forced = options();
        forced.force = true;
        let r = run_fake(&forced, &inputs, &release, &db, &store).await.unwrap();
        assert_eq!(r.replaced, 1);
        assert_eq!(store.objects.lock().unwrap()[key].0, CONTENT);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_whose_object_vanished_is_repaired_and_a_dry_run_only_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let release = Release::newest_known();
        let db =
            FakeDb::new(release.clone()).with_package_row(7, "Controller", "fusion-collectors-1.0.0-linux-amd64.zip");
        let store = FakeStore::new("bklite");
        let inputs = [controller_package(dir.path(), "1.0.0", CONTENT)];
        let mut dry = options();
        dry.dry_run = true;
        let r = run_fake(&dry, &inputs, &release, &db, &store).await.unwrap();
        assert_eq!(r.packages[0].action, ObjectAction::Repaired);
        assert!(!r.missing_objects[0].repaired && store.keys().is_empty());

        let r = run_fake(&options(), &inputs, &release, &db, &store).await.unwrap();
        assert_eq!(r.missing_objects.len(), 1);
        assert!(r.missing_objects[0].repaired);
        assert_eq!(r.rows_unchanged, 1, "the row was right: only its object was gone");
        assert_eq!(store.keys().len(), 1);
    }

    /// A real zip controller package (the CA goes into zips and tar.gz only).
    fn zip_package(dir: &std::path::Path, content: &[u8]) -> Input {
        use std::io::Write as _;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        w.start_file("fusion-collectors/install.sh", zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(content).unwrap();
        let bytes = w.finish().unwrap().into_inner();
        controller_package(dir, "1.0.0", &bytes)
    }

    fn installer(dir: &std::path::Path, name: &str, content: &[u8]) -> Input {
        let mut i = controller_package(dir, "", content);
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        i.pkg.name = name.into();
        i.pkg.object = INSTALLER_OBJECT.into();
        i.source = Source::File(path);
        i.installer = true;
        i
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn installers_go_to_the_release_key_without_a_row_and_are_replaced_when_they_differ() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = [installer(dir.path(), "bklite-controller-installer", b"#!/bin/sh\n")];
        let newest = Release::newest_known();
        let (db, store) = (FakeDb::new(newest.clone()), FakeStore::new("bklite"));
        let r = run_fake(&options(), &inputs, &newest, &db, &store).await.unwrap();
        let key = "installer/linux/x86_64/bklite-controller-installer";
        assert_eq!(store.keys(), vec![key.to_string()]);
        assert_eq!((r.uploaded, r.rows_created), (1, 0));
        assert_eq!(r.packages[0].kind, ArtifactKind::Installer);
        assert!(db.writes.lock().unwrap().is_empty(), "an installer has no row");
        assert!(r.orphan_objects.is_empty(), "an installer is no orphan package");
        let again = run_fake(&options(), &inputs, &newest, &db, &store).await.unwrap();
        assert_eq!((again.skipped, again.bytes_sent), (1, 0));
        // A different installer under the same key replaces it without --force.
        let newer = [installer(
            dir.path(),
            "bklite-controller-installer",
            b"#!/bin/sh\n# 2\n",
        )];
        let r = run_fake(&options(), &newer, &newest, &db, &store).await.unwrap();
        assert_eq!(r.replaced, 1);
        // Releases before 2026-04-27 (no cpu_architecture) read installer/{os}/{file}.
        let old = catalog(true, false, true, None, Some("0027_x"));
        let store = FakeStore::new("bklite");
        run_fake(&options(), &inputs, &old, &FakeDb::new(old.clone()), &store)
            .await
            .unwrap();
        assert_eq!(
            store.keys(),
            vec!["installer/linux/bklite-controller-installer".to_string()]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_site_ca_goes_into_controller_packages_and_a_rerun_sends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = [zip_package(dir.path(), b"#!/bin/sh\n")];
        let release = Release::newest_known();
        let (db, store) = (FakeDb::new(release.clone()), FakeStore::new("bklite"));
        let mut opts = options();
        opts.ca = Some(inject::SiteCa::new(
            "-----BEGIN CERTIFICATE-----\nCA1\n-----END CERTIFICATE-----\n".into(),
        ));
        let r = run_fake(&opts, &inputs, &release, &db, &store).await.unwrap();
        let key = "linux/x86_64/Controller/1.0.0/fusion-collectors-1.0.0-linux-amd64.zip";
        let (bytes, meta) = store.objects.lock().unwrap()[key].clone();
        let ca = inject::ca_in_zip(std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!(ca.as_deref(), Some(opts.ca.as_ref().unwrap().pem.as_str()));
        // Both digests recorded: the report's, and the object's meta.
        let p = &r.packages[0];
        assert_eq!(p.object_digest.as_deref(), meta["digest"].as_str());
        assert_ne!(p.object_digest.as_deref(), Some(p.digest.as_str()));
        assert_eq!(r.bytes_sent, bytes.len() as u64);
        assert_eq!(
            meta["metadata"][inject::SOURCE_KEY].as_str().unwrap(),
            crate::digest::sha256_hex(&std::fs::read(dir.path().join(&p.package)).unwrap())
        );
        let again = run_fake(&opts, &inputs, &release, &db, &store).await.unwrap();
        assert_eq!((again.skipped, again.bytes_sent), (1, 0));
        assert_eq!(again.packages[0].object_digest, p.object_digest);
        // Another CA (the operator's own, say): the same package is uploaded again with it,
        // without --force although the version is fixed.
        opts.ca = Some(inject::SiteCa::new("CA2".into()));
        let r = run_fake(&opts, &inputs, &release, &db, &store).await.unwrap();
        assert_eq!(r.replaced, 1, "{:?}", r.packages[0]);
        let bytes = store.objects.lock().unwrap()[key].0.clone();
        assert_eq!(
            inject::ca_in_zip(std::io::Cursor::new(&bytes)).unwrap().as_deref(),
            Some("CA2")
        );
        // A package stored without the CA (the site before TLS) gets it the same way.
        let (db, store) = (FakeDb::new(release.clone()), FakeStore::new("bklite"));
        run_fake(&options(), &inputs, &release, &db, &store).await.unwrap();
        let r = run_fake(&opts, &inputs, &release, &db, &store).await.unwrap();
        assert_eq!(r.replaced, 1);
    }
}
