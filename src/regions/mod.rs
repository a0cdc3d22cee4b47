//! Seeding every cloud region's sidecar env in the platform's PostgreSQL, and refusing the
//! configurations that break agents (issue 4; the first field failure of DESIGN.md: a region
//! without `NODE_SERVER_URL` handed agents the literal `null`).
//!
//! One entry point, [`run`], serves `bkbundle install` (after the stack is healthy) and
//! `bkbundle regions check|apply`. It works in three stages, each stopping at the first stage
//! with problems, so nothing is ever written half-way:
//!
//! 1. [`rules::desired`] (pure): merge the bundle's defaults, the install config's
//!    `[[regions]]` and the site values into each region's desired env, with the server's
//!    inheritance, and check every value. `check` stops here.
//! 2. Connect, find which release the database is ([`release::detect_when_migrated`]), read the
//!    rows and diff them ([`regions::diff`], pure): created / updated / unchanged per region and
//!    key; secrets compared by decrypting what is stored. `apply --dry-run` stops here (in a
//!    read-only transaction).
//! 3. Write in one transaction ([`regions::execute`]), commit, then make the server drop its
//!    cached env of the touched regions: the keys in Redis when it caches there; a restart of the
//!    server container when it caches in process memory and belongs to the stack being
//!    installed; otherwise a plain note that agents get the old values for up to 300 s.
//!
//! Secret values never appear in a report, an error or a `Debug` output.

use crate::error::{Error, Kind};
use crate::manifest::Regions;
use crate::platform::cache::{self, ServerCache, CACHE_SECONDS, SERVER_SERVICE};
use crate::platform::db::{DbError, DbTarget};
use crate::platform::regions::{self, cache_key, Action, PlannedRegion};
use crate::platform::release::{Release, CACHE_TABLE};
use crate::platform::rules::{self, EnvType, Problem, Source};
use crate::ports::live::{Postgres, Redis};
use crate::ports::{Cache, Docker, PlatformDb};
use crate::progress::Reporter;
use crate::site::config::{DatabaseConfig, InstallConfig, RegionConfig};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

pub use crate::platform::crypto::SecretKey;

/// What [`run`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Validate only; no database.
    Check,
    /// Validate, and check the regions already in the live database too; write nothing
    /// (`regions check --database-url`).
    CheckDatabase,
    /// Validate, read the database and report what would change; write nothing.
    DryRun,
    /// Validate, then write in one transaction and invalidate the server's cache.
    Apply,
}

/// The plain options of [`run`].
#[derive(Debug, Clone)]
pub struct RegionsOptions {
    pub mode: Mode,
    /// The bundle's region defaults (manifest `[regions]`): required keys, default values.
    pub bundle: Regions,
    /// The install config's `[[regions]]`.
    pub regions: Vec<RegionConfig>,
    /// The install config's `[database]`.
    pub database: DatabaseConfig,
    /// Values for `${NAME}`: the install config's `[env]` over the stack's rendered `.env`
    /// (see [`site_values`]).
    pub site: BTreeMap<String, String>,
    /// `--database-url` (wins over `DATABASE_URL`, `[database] url`, `PG*` and the stack's .env).
    pub database_url: Option<String>,
    /// Wait up to this long for the server to create its tables (install, right after the stack
    /// turned healthy); `None` fails at once with [`DbError::NotMigrated`].
    pub wait_for_migrations: Option<Duration>,
    /// The compose project of the stack: its `server` container's environment says where the
    /// server caches the regions' env.
    pub project: Option<String>,
    /// Restart that container when it caches in process memory (install: the stack is the one
    /// being installed, so a restart is part of the job).
    pub restart_server: bool,
}

impl RegionsOptions {
    /// Options from the bundle's defaults, the install config and the site values.
    pub fn new(mode: Mode, bundle: &Regions, config: &InstallConfig, site: BTreeMap<String, String>) -> RegionsOptions {
        RegionsOptions {
            mode,
            bundle: bundle.clone(),
            regions: config.regions.clone(),
            database: config.database.clone(),
            site,
            database_url: None,
            wait_for_migrations: None,
            project: config.project.clone(),
            restart_server: false,
        }
    }
}

/// Site values: the stack's rendered `.env` values, overridden by the install config's `[env]`
/// (the run's explicit input wins, as when the `.env` is rendered).
pub fn site_values(
    env_file: &BTreeMap<String, String>,
    config_env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut site = env_file.clone();
    site.extend(config_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    site
}

#[derive(Debug, thiserror::Error)]
pub enum RegionsError {
    /// The configuration would break agents (or does not fit the database): every problem.
    #[error("{} problem(s) with the cloud regions' sidecar env; nothing was written:\n  - {}", .0.len(), .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  - "))]
    Invalid(Vec<Problem>),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Internal(String),
}

impl From<RegionsError> for Error {
    fn from(e: RegionsError) -> Error {
        let message = e.to_string();
        match e {
            RegionsError::Invalid(_) => Error::new(Kind::Input, message)
                .hint("fix the install config's [[regions]] and [env] (or the bundle's [regions]), then run again")
                .hint("site values come from the install config's [env] and, with --env-file, the stack's .env"),
            RegionsError::Db(e) => Error::from(e),
            RegionsError::Internal(_) => Error::new(Kind::Internal, message),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Debug, Clone, Serialize)]
pub struct KeyReport {
    pub key: String,
    #[serde(rename = "type")]
    pub env_type: EnvType,
    pub source: Source,
    /// `None` for `check`, which does not read the database.
    pub action: Option<Action>,
    /// The value, for non-secret keys only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value before an update, for non-secret keys only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_value: Option<String>,
    /// The type before, when an update changes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_type: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegionReport {
    pub name: String,
    /// The region's id (`None` for `check`, and for regions a dry run would create).
    pub id: Option<i64>,
    pub action: Option<Action>,
    pub introduction: Option<String>,
    pub proxy_address: Option<String>,
    pub local: bool,
    pub keys: Vec<KeyReport>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CacheReport {
    /// The server's cache keys of the touched regions (one per region).
    pub keys: Vec<String>,
    /// Where the server caches: `redis`, `process_memory` or `unknown`.
    pub backend: Option<String>,
    /// Whether the server no longer has the old values: the keys were deleted from Redis, or
    /// the server container was restarted. `false` means agents may get the old values for up
    /// to 300 s (the notes say why and what to do).
    pub cleared: bool,
    /// The server container restarted to clear its in-memory cache.
    pub restarted: Option<String>,
    /// Entries that were in `django_cache` (`None`: no such table).
    pub database_entries: Option<u64>,
    /// The Redis cache used, without credentials (`None`: none known).
    pub redis: Option<String>,
    /// Keys that were in Redis (`None`: no Redis known, or it failed: see the notes).
    pub redis_entries: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegionsReport {
    pub mode: Mode,
    /// `user@host:port/db` (no password).
    pub database: Option<String>,
    pub database_source: Option<String>,
    /// The platform release found in the database (its last node_mgmt migration).
    pub release: Option<String>,
    pub regions: Vec<RegionReport>,
    /// Service rows (`node_mgmt_cloudregionservice`) added, as `region/service`.
    pub services_added: Vec<String>,
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub cache: CacheReport,
    pub notes: Vec<String>,
    pub seconds: f64,
}

impl RegionsReport {
    /// Whether this run wrote (or, dry, would write) anything.
    pub fn changes(&self) -> bool {
        self.created + self.updated > 0
            || self
                .regions
                .iter()
                .any(|r| matches!(r.action, Some(Action::Create | Action::Update)))
            || !self.services_added.is_empty()
    }
}

fn key_report(k: &rules::DesiredValue, key: &str, planned: Option<&regions::PlannedKey>) -> KeyReport {
    let visible = |v: &str| (k.env_type != EnvType::Secret).then(|| v.to_string());
    KeyReport {
        key: key.to_string(),
        env_type: k.env_type,
        source: k.source,
        action: planned.map(|p| p.action),
        value: visible(&k.value),
        old_value: planned.and_then(|p| p.old_value.clone()),
        old_type: planned.and_then(|p| p.old_type.clone()),
    }
}

fn report_from(
    mode: Mode,
    desired: &rules::Desired,
    plan: Option<&[PlannedRegion]>,
    target: Option<&DbTarget>,
    release: Option<&Release>,
    t0: Instant,
) -> RegionsReport {
    let mut regions = Vec::new();
    let (mut created, mut updated, mut unchanged) = (0, 0, 0);
    for (i, d) in desired.regions.iter().enumerate() {
        let p = plan.and_then(|p| p.get(i));
        let keys: Vec<KeyReport> = d
            .env
            .iter()
            .map(|(k, v)| {
                let pk = p.and_then(|p| p.keys.iter().find(|pk| pk.key == *k));
                match pk.map(|pk| pk.action) {
                    Some(Action::Create) => created += 1,
                    Some(Action::Update) => updated += 1,
                    Some(Action::Unchanged) => unchanged += 1,
                    None => {}
                }
                key_report(v, k, pk)
            })
            .collect();
        regions.push(RegionReport {
            name: d.name.clone(),
            id: p.and_then(|p| p.id),
            action: p.map(|p| p.action),
            introduction: p.map(|p| p.introduction.clone()).or(d.introduction.clone()),
            proxy_address: p.map(|p| p.proxy_address.clone()).or(d.proxy_address.clone()),
            local: d.local,
            keys,
        });
    }
    RegionsReport {
        mode,
        database: target.map(|t| t.name.display.clone()),
        database_source: target.map(|t| t.name.source.clone()),
        release: release.map(|r| r.label()),
        services_added: plan
            .unwrap_or_default()
            .iter()
            .flat_map(|r| r.services.iter().map(move |s| format!("{}/{s}", r.name)))
            .collect(),
        regions,
        created,
        updated,
        unchanged,
        cache: CacheReport::default(),
        notes: Vec::new(),
        seconds: t0.elapsed().as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------------------------
// The entry point

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Validate, and (per `mode`) diff and apply (`bkbundle regions check|apply`). See the module
/// documentation.
pub fn run(opts: &RegionsOptions, reporter: &dyn Reporter) -> crate::Result<RegionsReport> {
    crate::runtime::block_on(run_reporting(opts, &process_env, reporter))?.map_err(Error::from)
}

/// The validated input of a run (stage 1): each region's desired env, and the server's
/// `SECRET_KEY` with where it came from (when any secret is to be written).
pub struct Validated {
    pub desired: rules::Desired,
    pub secret_key: Option<(SecretKey, String)>,
}

/// Stage 1, pure: the desired env and the key, every problem at once.
pub fn validate(opts: &RegionsOptions, env: &dyn Fn(&str) -> Option<String>) -> Result<Validated, RegionsError> {
    let mut problems = Vec::new();
    let desired = match rules::desired(&opts.bundle, &opts.regions, &opts.site) {
        Ok(d) => Some(d),
        Err(p) => {
            problems.extend(p);
            None
        }
    };
    let secret_key = crate::site::targets::secret_key(&opts.database, &opts.site, env);
    // From the inputs rather than the desired env, so that this is reported with the others
    // even when the desired env could not be computed.
    let secret_keys: BTreeSet<&str> = opts
        .bundle
        .env
        .keys()
        .chain(opts.bundle.region.iter().flat_map(|r| r.env.keys()))
        .chain(opts.regions.iter().flat_map(|r| r.env.keys()))
        .map(String::as_str)
        .filter(|k| EnvType::for_key(k) == EnvType::Secret)
        .collect();
    if !secret_keys.is_empty() && secret_key.is_none() {
        let name = opts.database.secret_key_env.as_deref().unwrap_or("SECRET_KEY");
        problems.push(Problem {
            region: String::new(),
            key: Some(name.to_string()),
            message: format!(
                "the server's SECRET_KEY is needed to encrypt {}, but none was found: expected {name} in the stack's .env (--env-file), in [env], in the environment, or [database] secret_key",
                secret_keys.into_iter().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    match desired {
        Some(desired) if problems.is_empty() => Ok(Validated { desired, secret_key }),
        _ => Err(RegionsError::Invalid(problems)),
    }
}

/// The systems a run reaches, connected once by the caller.
pub struct Seams<'a> {
    pub db: &'a dyn PlatformDb,
    /// The engine, to find the stack's `server` container (where it caches; restarting it).
    pub docker: Option<&'a dyn Docker>,
    /// The server's Redis; `None`: connected from the site values when the server caches there.
    pub cache: Option<&'a dyn Cache>,
}

/// The plan against a database (stages 1 and 2), nothing written: the release, each desired
/// region's plan (in the order of `v.desired.regions`) and the regions left alone.
pub async fn plan(
    opts: &RegionsOptions,
    v: &Validated,
    db: &dyn PlatformDb,
) -> Result<(Release, Vec<PlannedRegion>, Vec<String>), RegionsError> {
    let release = db.release(opts.wait_for_migrations).await?;
    let current = db.regions(&release).await?;
    let key = v.secret_key.as_ref().map(|(k, _)| k);
    let plan = regions::diff(&v.desired.regions, &current, &release, key, &opts.bundle.required)
        .map_err(RegionsError::Invalid)?;
    Ok((release, plan, unmanaged_names(&v.desired, &current)))
}

fn unmanaged_names(desired: &rules::Desired, current: &regions::Current) -> Vec<String> {
    regions::unmanaged(&desired.regions, current)
        .iter()
        .map(|r| format!("{} (id {})", r.name, r.id))
        .collect()
}

/// [`run`] with the process environment looked up through `env` (`DATABASE_URL`, `PG*`,
/// `SECRET_KEY`) and nothing shown: for tests, which must not change their own process's
/// environment.
pub async fn run_with_env(
    opts: &RegionsOptions,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RegionsReport, RegionsError> {
    run_reporting(opts, env, &crate::progress::Silent).await
}

/// Connect the database (and, to apply with a project, the engine) once and run [`run_on`].
async fn run_reporting(
    opts: &RegionsOptions,
    env: &dyn Fn(&str) -> Option<String>,
    reporter: &dyn Reporter,
) -> Result<RegionsReport, RegionsError> {
    let t0 = Instant::now();
    let v = validate(opts, env)?;
    if opts.mode == Mode::Check {
        return Ok(report_from(Mode::Check, &v.desired, None, None, None, t0));
    }
    let target = crate::site::targets::database(opts.database_url.as_deref(), &opts.database, &opts.site, env)?;
    let db = Postgres::connect(target).await?;
    let engine = match &opts.project {
        Some(_) if opts.mode == Mode::Apply => {
            match tokio::time::timeout(Duration::from_secs(5), crate::engine::Engine::connect()).await {
                Ok(Ok(e)) => Some(e),
                _ => None,
            }
        }
        _ => None,
    };
    let seams = Seams {
        db: &db,
        docker: engine.as_ref().map(|e| e as &dyn Docker),
        cache: None,
    };
    run_on(opts, &v, &seams, reporter, t0).await
}

/// Stages 2 and 3 on connected systems (see the module documentation).
pub async fn run_on(
    opts: &RegionsOptions,
    v: &Validated,
    seams: &Seams<'_>,
    reporter: &dyn Reporter,
    t0: Instant,
) -> Result<RegionsReport, RegionsError> {
    let target = seams.db.target().clone();
    if matches!(opts.mode, Mode::Check | Mode::DryRun | Mode::CheckDatabase) {
        let (release, plan, unmanaged) = plan(opts, v, seams.db).await?;
        let mode = if opts.mode == Mode::Check {
            Mode::CheckDatabase
        } else {
            opts.mode
        };
        let mut r = report_from(mode, &v.desired, Some(&plan), Some(&target), Some(&release), t0);
        r.notes.extend(unmanaged_note(&unmanaged));
        r.notes.push(match mode {
            Mode::CheckDatabase => "read only: nothing was written".into(),
            _ => "dry run: nothing was written".into(),
        });
        return Ok(r);
    }

    // Read, diff and write in one transaction, then invalidate the server's cache for the
    // regions whose env changed.
    let release = seams.db.release(opts.wait_for_migrations).await?;
    let key = v.secret_key.as_ref().map(|(k, _)| k);
    let unmanaged = std::sync::Mutex::new(Vec::new());
    let plan_fn = |current: &regions::Current| {
        *unmanaged.lock().unwrap_or_else(|e| e.into_inner()) = unmanaged_names(&v.desired, current);
        regions::diff(&v.desired.regions, current, &release, key, &opts.bundle.required)
    };
    reporter.note(&format!(
        "cloud regions: writing {} region(s)' sidecar env in {} ({}), in one transaction",
        v.desired.regions.len(),
        target.name.display,
        release.label()
    ));
    let plan = seams
        .db
        .apply_regions(&release, key, &plan_fn)
        .await?
        .map_err(RegionsError::Invalid)?;
    let unmanaged = unmanaged.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut report = report_from(Mode::Apply, &v.desired, Some(&plan), Some(&target), Some(&release), t0);
    report.notes.extend(unmanaged_note(&unmanaged));
    if let Some((_, from)) = &v.secret_key {
        let wrote_secrets = plan
            .iter()
            .flat_map(|r| r.keys.iter())
            .any(|k| k.env_type == EnvType::Secret && k.action != Action::Unchanged);
        if wrote_secrets {
            report
                .notes
                .push(format!("secrets encrypted with the SECRET_KEY from {from}"));
        }
    }
    let touched: BTreeSet<i64> = plan.iter().filter(|r| r.env_changes()).filter_map(|r| r.id).collect();
    reporter.note(&format!(
        "cloud regions: {} row(s) created, {} updated, {} unchanged",
        report.created, report.updated, report.unchanged
    ));
    if !touched.is_empty() {
        invalidate(seams, &release, opts, &touched, &mut report).await;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

fn unmanaged_note(unmanaged: &[String]) -> Option<String> {
    (!unmanaged.is_empty()).then(|| {
        format!(
            "checked and left alone (not in the install config): region(s) {}",
            unmanaged.join(", ")
        )
    })
}

/// Make the server drop the touched regions' cached env (see the module documentation).
/// Failures become notes: the rows are committed, and a stale cache expires by itself.
async fn invalidate(
    seams: &Seams<'_>,
    release: &Release,
    opts: &RegionsOptions,
    touched: &BTreeSet<i64>,
    report: &mut RegionsReport,
) {
    report.cache.keys = touched.iter().map(|id| cache_key(*id)).collect();
    // Django's database cache table is not the server's default backend, but a stale entry there
    // would serve old values to a server configured to use it.
    if release.cache_table {
        match seams.db.invalidate_cached_env(touched).await {
            Ok(n) => report.cache.database_entries = Some(n),
            Err(e) => report
                .notes
                .push(format!("the stale entries of {CACHE_TABLE} could not be removed: {e}")),
        }
    }
    let server = match (&opts.project, seams.docker) {
        (Some(p), Some(docker)) => cache::server_container(docker, p).await,
        _ => None,
    };
    let stale = format!("agents may get the old values for up to {CACHE_SECONDS} s");
    match crate::site::targets::server_cache(&opts.database, &opts.site, server.as_ref().map(|s| &s.env)) {
        ServerCache::Redis { from, target } => {
            report.cache.backend = Some("redis".into());
            clear_redis(seams, &from, target, &stale, report).await;
        }
        ServerCache::ProcessMemory { from } => {
            report.cache.backend = Some("process_memory".into());
            restart_server(seams, opts, server, &from, &stale, report).await;
        }
        ServerCache::Unknown => {
            report.cache.backend = Some("unknown".into());
            report.notes.push(format!(
                "where the server caches is not known (no `{SERVER_SERVICE}` container{}, no [database] redis_url, no REDIS_CACHE_URL or REDIS_PASSWORD in the site values): {stale}, or restart the server",
                opts.project.as_deref().map(|p| format!(" in compose project {p}")).unwrap_or_default()
            ));
        }
    }
}

/// The touched keys deleted from the server's Redis (`target`, learnt `from`), or a note saying
/// why they could not be.
async fn clear_redis(
    seams: &Seams<'_>,
    from: &str,
    target: Result<cache::RedisTarget, String>,
    stale: &str,
    report: &mut RegionsReport,
) {
    let result = match target {
        Ok(t) => {
            report.cache.redis = Some(format!("{} (from {from})", t.display()));
            let live = Redis(t);
            let redis = seams.cache.unwrap_or(&live);
            redis
                .del(&report.cache.keys, Duration::from_secs(5))
                .await
                .map_err(|e| format!("{}: {e}", redis.display()))
        }
        Err(e) => Err(format!("{from}: {e}")),
    };
    match result {
        Ok(n) => {
            report.cache.redis_entries = Some(n);
            report.cache.cleared = true;
        }
        Err(e) => report.notes.push(format!(
            "the new values are written, but the server's cached env could not be removed from Redis ({e}): {stale}"
        )),
    }
}

/// A server caching in process memory restarted when the operator asked for it (nothing else
/// clears that cache); otherwise a note saying how to.
async fn restart_server(
    seams: &Seams<'_>,
    opts: &RegionsOptions,
    server: Option<cache::ServerContainer>,
    from: &str,
    stale: &str,
    report: &mut RegionsReport,
) {
    match server {
        Some(cache::ServerContainer { name, .. }) if opts.restart_server && seams.docker.is_some() => {
            let docker = seams.docker.expect("checked above");
            match docker.restart(&name, Duration::from_secs(30)).await {
                Ok(()) => {
                    report.cache.cleared = true;
                    report.notes.push(format!(
                        "the server caches in process memory ({from}): restarted container {name} so that it serves the new values"
                    ));
                    report.cache.restarted = Some(name);
                }
                Err(e) => report.notes.push(format!(
                    "the server caches in process memory ({from}) and restarting container {name} failed ({}): {stale}; restart it with `docker restart {name}`",
                    e.message
                )),
            }
        }
        Some(cache::ServerContainer { name, .. }) => report.notes.push(format!(
            "the server caches in process memory ({from}), which nothing outside it can clear: {stale}, or restart it now with `docker restart {name}`"
        )),
        None => report.notes.push(format!(
            "the server caches in process memory ({from}): {stale}, or restart the server container"
        )),
    }
}

/// The human rendering of a report.
pub fn render(r: &RegionsReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "{}", headline(r));
    for reg in &r.regions {
        let id = reg.id.map(|i| format!(" (id {i})")).unwrap_or_default();
        let action = reg.action.map(|a| format!(" [{}]", a.as_str())).unwrap_or_default();
        let proxy = reg
            .proxy_address
            .as_deref()
            .filter(|p| !p.is_empty())
            .map(|p| format!(", proxy {p}"))
            .unwrap_or_default();
        let local = if reg.local { ", local" } else { "" };
        let _ = writeln!(s, "region {}{id}{action}{proxy}{local}", reg.name);
        for k in &reg.keys {
            let a = k.action.map(|a| a.as_str()).unwrap_or("ok");
            let src = match k.source {
                Source::Own => "",
                Source::Inherited => "  (from default)",
                Source::Proxied => "  (from default, proxy host)",
            };
            let _ = writeln!(s, "  {a:<9} {:<32} {}{src}", k.key, shown_value(k));
        }
    }
    if !r.services_added.is_empty() {
        let _ = writeln!(s, "service rows added: {}", r.services_added.join(", "));
    }
    if !r.cache.keys.is_empty() && r.cache.cleared {
        let how = match (&r.cache.restarted, r.cache.redis_entries) {
            (Some(c), _) => format!("restarted container {c}"),
            (None, Some(n)) => format!("{n} key(s) deleted in Redis"),
            (None, None) => String::new(),
        };
        let _ = writeln!(s, "server cache cleared for: {} ({how})", r.cache.keys.join(", "));
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s.trim_end().to_string()
}

/// The report's first line: what was run, on which database, and the counts.
fn headline(r: &RegionsReport) -> String {
    let on = format!(
        "{} ({})",
        r.database.as_deref().unwrap_or("?"),
        r.release.as_deref().unwrap_or("release unknown")
    );
    match r.mode {
        Mode::Check => "regions check: the sidecar env of every region is valid".to_string(),
        Mode::CheckDatabase => format!(
            "regions check on {on}: the sidecar env of every region, configured and stored, is valid; `regions apply` would create {}, update {}, leave {} unchanged",
            r.created, r.updated, r.unchanged
        ),
        Mode::DryRun => format!(
            "regions apply --dry-run on {on}: would create {}, update {}, leave {} unchanged",
            r.created, r.updated, r.unchanged
        ),
        Mode::Apply => format!(
            "regions applied on {on}: {} created, {} updated, {} unchanged",
            r.created, r.updated, r.unchanged
        ),
    }
}

/// A key's value as shown: a secret never, a multi-line value by its first line, an update as
/// old -> new.
fn shown_value(k: &KeyReport) -> String {
    match (&k.value, k.env_type) {
        (_, EnvType::Secret) => "(secret, not shown)".to_string(),
        (Some(v), _) => {
            let one_line = v.lines().next().unwrap_or("");
            let more = if v.lines().count() > 1 { " ..." } else { "" };
            match &k.old_value {
                Some(old) if k.action == Some(Action::Update) => {
                    format!("{:?} -> {one_line:?}{more}", old.lines().next().unwrap_or(""))
                }
                _ => format!("{one_line:?}{more}"),
            }
        }
        (None, _) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[tokio::test]
    async fn check_needs_no_database_but_a_secret_key() {
        let bundle = Regions {
            required: vec!["NODE_SERVER_URL".into()],
            env: BTreeMap::from([
                ("NODE_SERVER_URL".to_string(), "https://10.0.0.5:443".to_string()),
                ("NATS_PASSWORD".to_string(), "pw".to_string()),
            ]),
            region: vec![],
        };
        let mut opts = RegionsOptions::new(Mode::Check, &bundle, &InstallConfig::default(), BTreeMap::new());
        let e = run_with_env(&opts, &no_env).await.unwrap_err();
        let Error { kind, message, .. } = Error::from(e);
        assert_eq!(kind, Kind::Input);
        assert!(
            message.contains("SECRET_KEY is needed to encrypt NATS_PASSWORD"),
            "{message}"
        );
        opts.site.insert("SECRET_KEY".into(), "k".into());
        let r = run_with_env(&opts, &no_env).await.unwrap();
        assert_eq!(r.regions.len(), 1);
        let text = render(&r);
        assert!(
            text.contains("(secret, not shown)") && !text.contains("\"pw\""),
            "{text}"
        );
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("\"pw\""), "{json}");
    }

    // ---- On the seams, with fakes: the diff and the writes, no PostgreSQL.

    use crate::platform::release::catalog;
    use crate::ports::fakes::{container, FakeCache, FakeDb, FakeDocker};

    fn demo_regions() -> Regions {
        Regions {
            required: vec!["NODE_SERVER_URL".into(), "NATS_SERVERS".into()],
            env: BTreeMap::from([
                ("NODE_SERVER_URL".to_string(), "${SERVER_URL}".to_string()),
                ("NATS_SERVERS".to_string(), "${HOST_IP}:4222".to_string()),
            ]),
            region: vec![],
        }
    }

    fn options(mode: Mode) -> RegionsOptions {
        let site = BTreeMap::from([
            ("SERVER_URL".to_string(), "http://192.0.2.10:18080".to_string()),
            ("HOST_IP".to_string(), "192.0.2.10".to_string()),
        ]);
        RegionsOptions::new(mode, &demo_regions(), &InstallConfig::default(), site)
    }

    async fn run_on_silent(
        opts: &RegionsOptions,
        v: &Validated,
        seams: &Seams<'_>,
        t0: Instant,
    ) -> Result<RegionsReport, RegionsError> {
        run_on(opts, v, seams, &crate::progress::Silent, t0).await
    }

    fn seams<'a>(db: &'a FakeDb, docker: Option<&'a FakeDocker>, cache: Option<&'a FakeCache>) -> Seams<'a> {
        Seams {
            db,
            docker: docker.map(|d| d as &dyn Docker),
            cache: cache.map(|c| c as &dyn Cache),
        }
    }

    #[tokio::test]
    async fn apply_creates_the_region_its_rows_and_services_and_a_rerun_changes_nothing() {
        let db = FakeDb::new(Release::newest_known());
        let opts = options(Mode::Apply);
        let v = validate(&opts, &no_env).unwrap();
        let r = run_on_silent(&opts, &v, &seams(&db, None, None), Instant::now())
            .await
            .unwrap();
        assert_eq!((r.created, r.updated, r.unchanged), (2, 0, 0));
        assert_eq!(r.services_added, vec!["default/stargazer", "default/nats-executor"]);
        let writes = db.writes.lock().unwrap().clone();
        assert!(
            writes.contains(&"insert sidecarenv default/NODE_SERVER_URL".to_string()),
            "{writes:?}"
        );
        let again = run_on_silent(&opts, &v, &seams(&db, None, None), Instant::now())
            .await
            .unwrap();
        assert_eq!((again.created, again.updated, again.unchanged), (0, 0, 2));
        assert_eq!(db.writes.lock().unwrap().len(), writes.len(), "a re-run wrote");
    }

    #[tokio::test]
    async fn a_dry_run_reports_the_updates_and_writes_nothing() {
        let db = FakeDb::new(Release::newest_known()).with_region(
            1,
            "default",
            &[("NODE_SERVER_URL", "null"), ("NATS_SERVERS", "192.0.2.10:4222")],
        );
        let opts = options(Mode::DryRun);
        let v = validate(&opts, &no_env).unwrap();
        let r = run_on_silent(&opts, &v, &seams(&db, None, None), Instant::now())
            .await
            .unwrap();
        assert_eq!((r.created, r.updated, r.unchanged), (0, 1, 1));
        let url = r.regions[0].keys.iter().find(|k| k.key == "NODE_SERVER_URL").unwrap();
        assert_eq!(url.old_value.as_deref(), Some("null"));
        assert!(db.writes.lock().unwrap().is_empty());
        assert!(r.notes.iter().any(|n| n == "dry run: nothing was written"));
    }

    #[tokio::test]
    async fn a_value_longer_than_the_release_takes_is_refused_before_any_write() {
        let release = catalog(false, false, false, Some(200), Some("0012_old"));
        let db = FakeDb::new(release);
        let mut opts = options(Mode::Apply);
        opts.site
            .insert("SERVER_URL".into(), format!("http://192.0.2.10/{}", "x".repeat(220)));
        let v = validate(&opts, &no_env).unwrap();
        let e = run_on_silent(&opts, &v, &seams(&db, None, None), Instant::now())
            .await
            .unwrap_err();
        let RegionsError::Invalid(problems) = e else {
            panic!("{e}")
        };
        assert!(problems.iter().any(|p| p.to_string().contains("200")), "{problems:?}");
        assert!(db.writes.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn changed_rows_clear_the_servers_redis_entries() {
        let db = FakeDb::new(Release::newest_known());
        let cache = FakeCache::default();
        cache.entries.lock().unwrap().insert(cache_key(1), b"stale".to_vec());
        let mut opts = options(Mode::Apply);
        opts.site
            .insert("REDIS_CACHE_URL".into(), "redis://:pw@127.0.0.1:6379/0".into());
        let v = validate(&opts, &no_env).unwrap();
        let r = run_on_silent(&opts, &v, &seams(&db, None, Some(&cache)), Instant::now())
            .await
            .unwrap();
        assert!(r.cache.cleared, "{:?}", r.cache);
        assert_eq!(r.cache.redis_entries, Some(1));
        assert!(cache.entries.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_server_caching_in_process_memory_is_restarted_only_when_install_asks() {
        let db = FakeDb::new(Release::newest_known());
        let mut docker = FakeDocker::default();
        let server = container("demo", SERVER_SERVICE, "running", Some("healthy"));
        docker.env.insert(
            server.id.clone(),
            BTreeMap::from([("DEBUG".to_string(), "0".to_string())]),
        );
        docker.containers.push(server);
        let mut opts = options(Mode::Apply);
        opts.project = Some("demo".into());
        let v = validate(&opts, &no_env).unwrap();
        let r = run_on_silent(&opts, &v, &seams(&db, Some(&docker), None), Instant::now())
            .await
            .unwrap();
        assert!(!r.cache.cleared);
        assert!(
            r.notes.iter().any(|n| n.contains("docker restart demo-server-1")),
            "{:?}",
            r.notes
        );
        assert!(docker.restarted.lock().unwrap().is_empty());

        let db = FakeDb::new(Release::newest_known());
        opts.restart_server = true;
        let r = run_on_silent(&opts, &v, &seams(&db, Some(&docker), None), Instant::now())
            .await
            .unwrap();
        assert_eq!(r.cache.restarted.as_deref(), Some("demo-server-1"));
        assert_eq!(*docker.restarted.lock().unwrap(), vec!["demo-server-1".to_string()]);
    }
}
