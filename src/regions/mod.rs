//! Seeding every cloud region's sidecar env in the platform's PostgreSQL, and refusing the
//! configurations that break agents (issue 4; the first field failure of DESIGN.md: a region
//! without `NODE_SERVER_URL` handed agents the literal `null`).
//!
//! One entry point, [`run`], serves `bkbundle install` (after the stack is healthy) and
//! `bkbundle regions check|apply`. It works in three stages, each stopping at the first stage
//! with problems, so nothing is ever written half-way:
//!
//! 1. [`validate::desired`] (pure): merge the bundle's defaults, the install config's
//!    `[[regions]]` and the site values into each region's desired env, with the server's
//!    inheritance, and check every value. `check` stops here.
//! 2. Connect, detect the schema generation ([`db::detect_schema`]), read the rows and diff them
//!    ([`db::diff`], pure): created / updated / unchanged per region and key; secrets compared by
//!    decrypting what is stored. `apply --dry-run` stops here (in a read-only transaction).
//! 3. Write in one transaction ([`db::execute`]), commit, then remove the server's cached env of
//!    the touched regions ([`cache`]): from `django_cache`, and from Redis when `redis_url` is set.
//!
//! Secret values never appear in a report, an error or a `Debug` output.

pub mod cache;
pub mod crypto;
pub mod db;
pub mod validate;

use crate::error::{Error, Kind};
use crate::install::config::{DatabaseConfig, InstallConfig, RegionConfig};
use crate::manifest::Regions;
use db::{Action, DbName, DbTarget, Generation, PlannedRegion};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use validate::{EnvType, Problem, Source};

pub use crypto::SecretKey;

/// What [`run`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Validate only; no database.
    Check,
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
    /// turned healthy); `None` fails at once with [`RegionsError::NotMigrated`].
    pub wait_for_migrations: Option<Duration>,
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
    #[error("where the platform's database is was not given: none of --database-url, DATABASE_URL, [database] url, PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE or the stack's POSTGRES_PASSWORD is set")]
    NoDatabase,
    #[error("the database given by {source_name} is not usable: {message}")]
    BadDatabaseUrl { source_name: String, message: String },
    #[error("cannot reach PostgreSQL at {} (from {}): {message}; nothing was changed", db.display, db.source)]
    Unreachable { db: DbName, message: String },
    #[error("PostgreSQL at {} (from {}) refused user {user}: {message}; nothing was changed", db.display, db.source)]
    Refused { db: DbName, user: String, message: String },
    /// The server's tables are not there (yet): it migrates at start-up. Install waits for this.
    #[error("the server has not run its migrations yet in {}: {detail}", db.display)]
    NotMigrated { db: DbName, detail: String },
    #[error("the database {} has a schema this bkbundle does not know: {detail}; nothing was changed", db.display)]
    UnknownSchema { db: DbName, detail: String },
    #[error("PostgreSQL at {}: {what} failed: {message}; the transaction was rolled back, nothing was changed", db.display)]
    Database { db: DbName, what: String, message: String },
    #[error("{0}")]
    Internal(String),
}

const DB_HINT: &str = "give the database with --database-url postgres://USER:PASSWORD@HOST:PORT/DB, DATABASE_URL, [database] url in the install config, the PG* variables, or --env-file with the stack's .env (POSTGRES_*)";

impl From<RegionsError> for Error {
    fn from(e: RegionsError) -> Error {
        let message = e.to_string();
        match e {
            RegionsError::Invalid(_) => Error::new(Kind::Input, message)
                .hint("fix the install config's [[regions]] and [env] (or the bundle's [regions]), then run again")
                .hint("site values come from the install config's [env] and, with --env-file, the stack's .env"),
            RegionsError::NoDatabase | RegionsError::BadDatabaseUrl { .. } => Error::new(Kind::Input, message).hint(DB_HINT),
            RegionsError::Unreachable { .. } => Error::new(Kind::External, message)
                .hint("is the stack running? `docker compose ps postgres` in the install directory; it publishes PostgreSQL on INTERNAL_BIND_IP:POSTGRES_PORT (127.0.0.1:5432 by default)")
                .hint(DB_HINT),
            RegionsError::Refused { .. } => Error::new(Kind::External, message)
                .hint("check the user, password and database name: the stack's are POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB in its .env")
                .hint(DB_HINT),
            RegionsError::NotMigrated { .. } => Error::new(Kind::External, message).hint(
                "the server creates its tables when it starts: wait until the `server` service is healthy and run again (`bkbundle install` waits by itself, up to [database] migrations_timeout_secs)",
            ),
            RegionsError::UnknownSchema { .. } => Error::new(Kind::Unsupported, message)
                .hint("this bkbundle knows the 2025 and 2026 BK-Lite schemas: use the bkbundle that came with the server's bundle"),
            RegionsError::Database { .. } => Error::new(Kind::External, message)
                .hint("run again with -v; if it persists, check the server's database with psql"),
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
    /// The keys removed (one per touched region).
    pub keys: Vec<String>,
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
    pub generation: Option<Generation>,
    pub regions: Vec<RegionReport>,
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
    }
}

fn key_report(k: &validate::DesiredValue, key: &str, planned: Option<&db::PlannedKey>) -> KeyReport {
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
    desired: &validate::Desired,
    plan: Option<&[PlannedRegion]>,
    target: Option<&DbTarget>,
    generation: Option<Generation>,
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
        generation,
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

/// The key that encrypts secrets: `[database] secret_key`, else the site value (then process
/// variable) named by `secret_key_env` (default `SECRET_KEY`). Returns where it came from.
pub fn resolve_secret_key(
    cfg: &DatabaseConfig,
    site: &BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<(SecretKey, String)> {
    if let Some(k) = cfg.secret_key.as_deref().filter(|k| !k.is_empty()) {
        return Some((SecretKey::from_django(k), "[database] secret_key".into()));
    }
    let name = cfg.secret_key_env.as_deref().unwrap_or("SECRET_KEY");
    if let Some(k) = site.get(name).filter(|k| !k.is_empty()) {
        return Some((SecretKey::from_django(k), format!("site value {name}")));
    }
    env(name)
        .filter(|k| !k.is_empty())
        .map(|k| (SecretKey::from_django(&k), format!("environment variable {name}")))
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Validate, and (per `mode`) diff and apply. See the module documentation.
pub async fn run(opts: &RegionsOptions) -> Result<RegionsReport, RegionsError> {
    run_with_env(opts, &process_env).await
}

/// [`run`] with the process environment looked up through `env` (`DATABASE_URL`, `PG*`,
/// `SECRET_KEY`): for tests, which must not change their own process's environment.
pub async fn run_with_env(
    opts: &RegionsOptions,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RegionsReport, RegionsError> {
    let t0 = Instant::now();
    // 1. The desired env, every problem at once.
    let mut problems = Vec::new();
    let desired = match validate::desired(&opts.bundle, &opts.regions, &opts.site) {
        Ok(d) => Some(d),
        Err(p) => {
            problems.extend(p);
            None
        }
    };
    let secret_key = resolve_secret_key(&opts.database, &opts.site, env);
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
    let desired = match desired {
        Some(d) if problems.is_empty() => d,
        _ => return Err(RegionsError::Invalid(problems)),
    };
    if opts.mode == Mode::Check {
        return Ok(report_from(Mode::Check, &desired, None, None, None, t0));
    }

    // 2. The database: where, which schema, what is there, what to change.
    let target = db::resolve_target(opts.database_url.as_deref(), &opts.database, &opts.site, env)?;
    let mut client = db::connect(&target).await?;
    let deadline = opts.wait_for_migrations.map(|w| Instant::now() + w);
    let schema = loop {
        match db::detect_schema(&client, &target).await {
            Err(RegionsError::NotMigrated { db, detail }) => match deadline {
                Some(d) if Instant::now() < d => {
                    tracing::info!("waiting for the server's migrations: {detail}");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                _ => {
                    let waited = opts
                        .wait_for_migrations
                        .map(|w| format!(" (waited {} s)", w.as_secs()))
                        .unwrap_or_default();
                    return Err(RegionsError::NotMigrated {
                        db,
                        detail: format!("{detail}{waited}"),
                    });
                }
            },
            other => break other?,
        }
    };
    let key = secret_key.as_ref().map(|(k, _)| k);
    let read_only = opts.mode == Mode::DryRun;
    let tx = client
        .build_transaction()
        .read_only(read_only)
        .start()
        .await
        .map_err(|e| RegionsError::Database {
            db: target.name.clone(),
            what: "starting a transaction".into(),
            message: e.to_string(),
        })?;
    let current = db::read_current(&tx, &target).await?;
    let mut plan =
        db::diff(&desired.regions, &current, &schema, key, &opts.bundle.required).map_err(RegionsError::Invalid)?;
    let unmanaged: Vec<String> = db::unmanaged(&desired.regions, &current)
        .iter()
        .map(|r| format!("{} (id {})", r.name, r.id))
        .collect();
    if opts.mode == Mode::DryRun {
        drop(tx); // rolled back: nothing was written
        let mut r = report_from(
            Mode::DryRun,
            &desired,
            Some(&plan),
            Some(&target),
            Some(schema.generation),
            t0,
        );
        r.notes.extend(unmanaged_note(&unmanaged));
        r.notes.push("dry run: nothing was written".into());
        return Ok(r);
    }

    // 3. Write, commit, then invalidate the server's cache for the regions whose env changed.
    let changed = plan.iter().any(|r| r.action != Action::Unchanged || r.env_changes());
    if changed {
        db::execute(&tx, &target, &schema, &mut plan, key).await?;
        tx.commit().await.map_err(|e| RegionsError::Database {
            db: target.name.clone(),
            what: "committing".into(),
            message: e.to_string(),
        })?;
    } else {
        drop(tx);
    }
    let mut report = report_from(
        Mode::Apply,
        &desired,
        Some(&plan),
        Some(&target),
        Some(schema.generation),
        t0,
    );
    report.notes.extend(unmanaged_note(&unmanaged));
    if let Some((_, from)) = &secret_key {
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
    if !touched.is_empty() {
        invalidate(&client, &target, &schema, opts, &touched, &mut report).await;
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

/// Remove the touched regions' cached env. Failures become notes: the rows are committed, and a
/// stale cache expires by itself within 300 s.
async fn invalidate(
    client: &tokio_postgres::Client,
    target: &DbTarget,
    schema: &db::Schema,
    opts: &RegionsOptions,
    touched: &BTreeSet<i64>,
    report: &mut RegionsReport,
) {
    report.cache.keys = touched.iter().map(|id| db::cache_key(*id)).collect();
    if schema.cache_table {
        match db::invalidate_db_cache(client, target, touched).await {
            Ok(n) => report.cache.database_entries = Some(n),
            Err(e) => report.notes.push(format!(
                "the new values are written, but the server's cached env could not be removed from {}: {e}; the server may serve the old values for up to 300 s",
                db::CACHE_TABLE
            )),
        }
    }
    match redis_target(&opts.database, &opts.site) {
        Some((from, target)) => {
            let result = match target {
                Ok(t) => {
                    report.cache.redis = Some(format!("{} (from {from})", t.display()));
                    cache::del(&t, &report.cache.keys, Duration::from_secs(5))
                        .await
                        .map_err(|e| format!("{}: {e}", t.display()))
                }
                Err(e) => Err(format!("{from}: {e}")),
            };
            match result {
                Ok(n) => report.cache.redis_entries = Some(n),
                Err(e) => report.notes.push(format!(
                    "the new values are written, but the server's cached env could not be removed from Redis ({e}): agents may get the old values for up to 300 s"
                )),
            }
        }
        None => report.notes.push(
            "no [database] redis_url (and no REDIS_PASSWORD in the site values): if the server caches in Redis (the stack does, db 1), agents may get the old values for up to 300 s".into(),
        ),
    }
}

/// The server's Redis cache and where it came from: `[database] redis_url` (with `${NAME}` from
/// the site values), else the stack's own when its .env is known (it has `REDIS_PASSWORD`): the
/// stack's server caches in db 1 of the `redis` service, published on
/// `INTERNAL_BIND_IP:REDIS_PORT`.
pub fn redis_target(
    cfg: &DatabaseConfig,
    site: &BTreeMap<String, String>,
) -> Option<(&'static str, Result<cache::RedisTarget, String>)> {
    if let Some(url) = &cfg.redis_url {
        let mut missing = Vec::new();
        let url = crate::install::envfile::substitute(url, site, &mut missing);
        let target = if missing.is_empty() {
            cache::parse_url(&url)
        } else {
            Err(format!(
                "placeholder(s) {} not set",
                missing
                    .iter()
                    .map(|m| format!("${{{m}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        };
        return Some(("[database] redis_url", target));
    }
    let password = site.get("REDIS_PASSWORD")?;
    let from = "the stack's .env (REDIS_PASSWORD, REDIS_PORT, INTERNAL_BIND_IP)";
    let port = site.get("REDIS_PORT").map(String::as_str).unwrap_or("6379");
    let target = port
        .parse::<u16>()
        .map_err(|_| format!("REDIS_PORT {port:?} is not a port number"))
        .map(|port| cache::RedisTarget {
            host: db::stack_host(site)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            username: None,
            password: Some(password.clone()).filter(|p| !p.is_empty()),
            db: 1,
        });
    Some((from, target))
}

/// The human rendering of a report.
pub fn render(r: &RegionsReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let head = match r.mode {
        Mode::Check => "regions check: the sidecar env of every region is valid".to_string(),
        Mode::DryRun => format!(
            "regions apply --dry-run on {} (schema {}): would create {}, update {}, leave {} unchanged",
            r.database.as_deref().unwrap_or("?"),
            r.generation.map(|g| g.as_str()).unwrap_or("?"),
            r.created,
            r.updated,
            r.unchanged
        ),
        Mode::Apply => format!(
            "regions applied on {} (schema {}): {} created, {} updated, {} unchanged",
            r.database.as_deref().unwrap_or("?"),
            r.generation.map(|g| g.as_str()).unwrap_or("?"),
            r.created,
            r.updated,
            r.unchanged
        ),
    };
    let _ = writeln!(s, "{head}");
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
            let shown = match (&k.value, k.env_type) {
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
            };
            let src = match k.source {
                Source::Own => "",
                Source::Inherited => "  (from default)",
                Source::Proxied => "  (from default, proxy host)",
            };
            let _ = writeln!(s, "  {a:<9} {:<32} {shown}{src}", k.key);
        }
    }
    if !r.cache.keys.is_empty() {
        let _ = writeln!(
            s,
            "server cache cleared for: {}{}{}",
            r.cache.keys.join(", "),
            r.cache
                .database_entries
                .map(|n| format!("; {n} entr{} in {}", if n == 1 { "y" } else { "ies" }, db::CACHE_TABLE))
                .unwrap_or_default(),
            r.cache
                .redis_entries
                .map(|n| format!("; {n} in Redis"))
                .unwrap_or_default()
        );
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn secret_key_sources_in_order() {
        let mut cfg = DatabaseConfig::default();
        let site = BTreeMap::from([("SECRET_KEY".to_string(), "from-site".to_string())]);
        let (_, from) = resolve_secret_key(&cfg, &site, &no_env).unwrap();
        assert_eq!(from, "site value SECRET_KEY");
        cfg.secret_key_env = Some("DJANGO_KEY".into());
        assert!(resolve_secret_key(&cfg, &site, &no_env).is_none());
        let env = |k: &str| (k == "DJANGO_KEY").then(|| "x".to_string());
        assert_eq!(
            resolve_secret_key(&cfg, &site, &env).unwrap().1,
            "environment variable DJANGO_KEY"
        );
        cfg.secret_key = Some("literal".into());
        assert_eq!(
            resolve_secret_key(&cfg, &site, &env).unwrap().1,
            "[database] secret_key"
        );
    }

    #[test]
    fn database_sources_in_order() {
        let mut cfg = DatabaseConfig::default();
        let site = BTreeMap::from([
            ("POSTGRES_PASSWORD".to_string(), "pw".to_string()),
            ("POSTGRES_PORT".to_string(), "15432".to_string()),
            ("POSTGRES_DB".to_string(), "bklite".to_string()),
            ("PGU".to_string(), "site-user".to_string()),
        ]);
        let t = db::resolve_target(None, &cfg, &site, &no_env).unwrap();
        assert_eq!(t.name.display, "postgres@127.0.0.1:15432/bklite");
        let pg = |k: &str| match k {
            "PGHOST" => Some("db.local".to_string()),
            "PGUSER" => Some("bk".to_string()),
            _ => None,
        };
        let t = db::resolve_target(None, &cfg, &site, &pg).unwrap();
        assert_eq!(
            (t.name.display.as_str(), t.name.source.as_str()),
            ("bk@db.local:5432/bk", "the PG* environment variables")
        );
        cfg.url = Some("postgres://${PGU}@h:1/d".into());
        let t = db::resolve_target(None, &cfg, &site, &pg).unwrap();
        assert_eq!(t.name.display, "site-user@h:1/d");
        let dburl = |k: &str| (k == "DATABASE_URL").then(|| "postgres://e@envhost/x".to_string());
        assert_eq!(
            db::resolve_target(None, &cfg, &site, &dburl).unwrap().name.display,
            "e@envhost:5432/x"
        );
        let t = db::resolve_target(Some("postgres://c:secret@clihost:7/y"), &cfg, &site, &dburl).unwrap();
        assert_eq!(
            (t.name.display.as_str(), t.name.source.as_str()),
            ("c@clihost:7/y", "--database-url")
        );
        assert!(!format!("{t:?}").contains("secret"));
        cfg.url = Some("postgres://${NOPE}@h/d".into());
        let e = db::resolve_target(None, &cfg, &site, &no_env).unwrap_err().to_string();
        assert!(e.contains("${NOPE}"), "{e}");
        assert!(matches!(
            db::resolve_target(None, &DatabaseConfig::default(), &BTreeMap::new(), &no_env),
            Err(RegionsError::NoDatabase)
        ));
    }

    #[test]
    fn redis_from_the_config_or_the_stack() {
        let mut site = BTreeMap::from([("REDIS_PASSWORD".to_string(), "p/w@x".to_string())]);
        let mut cfg = DatabaseConfig::default();
        let (from, t) = redis_target(&cfg, &site).unwrap();
        let t = t.unwrap();
        assert!(from.contains("stack's .env"));
        assert_eq!((t.host.as_str(), t.port, t.db), ("127.0.0.1", 6379, 1));
        assert_eq!(t.password.as_deref(), Some("p/w@x"));
        site.insert("INTERNAL_BIND_IP".into(), "10.9.0.1".into());
        site.insert("REDIS_PORT".into(), "16379".into());
        let t = redis_target(&cfg, &site).unwrap().1.unwrap();
        assert_eq!((t.host.as_str(), t.port), ("10.9.0.1", 16379));
        cfg.redis_url = Some("redis://:${REDIS_PASSWORD}@cache:6380/2".into());
        let (from, t) = redis_target(&cfg, &site).unwrap();
        assert_eq!(from, "[database] redis_url");
        // `/` in a password must be percent-encoded in a URL: the parse fails, clearly.
        assert!(t.is_err());
        cfg.redis_url = Some("redis://:${NOPE}@cache/2".into());
        assert!(redis_target(&cfg, &site).unwrap().1.unwrap_err().contains("${NOPE}"));
        assert!(redis_target(&DatabaseConfig::default(), &BTreeMap::new()).is_none());
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
}
