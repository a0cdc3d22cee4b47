//! `bkbundle doctor`: run the field's diagnosis chains (DESIGN.md, field reports 1-6) against a
//! live install and say what is wrong, with the evidence and the fix as a command.
//!
//! One entry point, [`run`], returns a [`DoctorReport`] of findings; it never fails as a whole:
//! a system that cannot be reached is itself a finding (naming the broken link), and the checks
//! that need it say they were skipped because of it. The checks, each independent:
//!
//! - **containers** of the compose project: state, health, exit code, restart loops, and the
//!   first log line matching the known-causes table ([`crate::platform::causes::LOG_RULES`]);
//! - **regions**: every region's stored sidecar env (required keys, `null`, URLs, loopback), the
//!   server URL's host resolving and its port accepting TCP from this host, and the server's
//!   cached env (`django_cache`, and Redis when known) differing from the rows;
//! - **nats**: resolution → TCP → TLS → authentication → JetStream → bucket, stopping at the first
//!   broken link ([`crate::platform::nats::connect`], [`crate::packages::open_store`]);
//! - **packages**: an empty package list, rows whose object is missing (either key layout),
//!   objects without rows, and with `--bundle` stored objects that differ from the bundle's;
//! - **agents**: install tasks that succeeded for hosts whose agent never registered a node.
//!
//! `--fix` applies only safe repairs and reports each: re-upload missing objects from the bundle
//! (init-packages' own repair), add a region's missing keys from the default region's rows (the
//! server's own inheritance, proxy address applied), remove a stale cache entry. Everything else
//! is advice. Every network step is bounded by a few seconds; nothing reaches beyond the local
//! Docker engine, the configured PostgreSQL and NATS, and the TCP probe of the server URL.

use crate::engine::Engine;
use crate::error::Error;
use crate::manifest::Manifest;
use crate::packages::{self, PackagesOptions};
use crate::platform::cache::{self, ServerCache, ServerContainer};
use crate::platform::causes;
use crate::platform::crypto::SecretKey;
use crate::platform::db::{self, DbTarget};
use crate::platform::nats::{self as pnats, NatsError, Store};
use crate::platform::packages as keys;
use crate::platform::regions::{self as pregions, cache_key, Current};
use crate::platform::release::{self, Release, CACHE_TABLE, ENV_TABLE, PACKAGE_TABLE, REGION_TABLE};
use crate::platform::rules::{self, EnvType, DEFAULT_REGION_ID};
use crate::site::config::InstallConfig;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Keys agents cannot work without, when no bundle says which keys it requires.
pub const AGENT_KEYS: [&str; 3] = ["NODE_SERVER_URL", "NATS_SERVERS", "NATS_PROTOCOL"];
/// How long one probe (DNS, TCP, a query) may take.
const PROBE: Duration = Duration::from_secs(3);
/// Log lines of each container that are searched for known causes.
const LOG_LINES: usize = 200;
/// An agent gets this long after its install task succeeded to register before it is "missing".
const AGENT_GRACE_MINUTES: i64 = 10;

#[derive(Debug, Clone, Default)]
pub struct DoctorOptions {
    /// The bundle that was installed: its required region keys, its packages (compared with the
    /// stored objects, and re-uploaded by `--fix`), its compose project.
    pub bundle: Option<PathBuf>,
    pub config: InstallConfig,
    /// The stack's .env values under the install config's `[env]`.
    pub site: BTreeMap<String, String>,
    /// The compose project (`--project`, else the install journal's, the config's, the bundle's).
    pub project: Option<String>,
    pub database_url: Option<String>,
    pub nats_url: Option<String>,
    pub bucket: Option<String>,
    pub fix: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Warning => "WARNING",
            Severity::Info => "info",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// containers, regions, nats, packages, agents.
    pub check: &'static str,
    pub severity: Severity,
    /// What it is about: `region "east" NODE_SERVER_URL`, `object linux/...`, `container x`.
    pub subject: String,
    pub message: String,
    /// The row, the object key, the log line, the probe's answer.
    pub evidence: Vec<String>,
    /// What to do, as a command where there is one.
    pub fix: Option<String>,
    /// `--fix` repaired it.
    pub fixed: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DoctorReport {
    /// The platform release found in the database (its last node_mgmt migration).
    pub release: Option<String>,
    pub findings: Vec<Finding>,
    pub errors: usize,
    pub warnings: usize,
    pub fixed: usize,
    pub seconds: f64,
}

impl DoctorReport {
    /// An error-severity finding that `--fix` did not repair.
    pub fn has_errors(&self) -> bool {
        self.errors > 0
    }
}

struct Ctx<'a> {
    opts: &'a DoctorOptions,
    env: &'a dyn Fn(&str) -> Option<String>,
    manifest: Option<Manifest>,
    /// The stack's server container (its environment: the region-1 values it enforces, where it
    /// caches), when the engine has one in the project.
    server: Option<ServerContainer>,
    findings: Vec<Finding>,
}

impl Ctx<'_> {
    fn add(
        &mut self,
        check: &'static str,
        severity: Severity,
        subject: impl Into<String>,
        message: impl Into<String>,
    ) -> &mut Finding {
        self.findings.push(Finding {
            check,
            severity,
            subject: subject.into(),
            message: message.into(),
            evidence: vec![],
            fix: None,
            fixed: false,
        });
        let last = self.findings.len() - 1;
        &mut self.findings[last]
    }

    /// A failure of bkbundle's own error type, as one finding (its hints become the fix).
    fn add_error(&mut self, check: &'static str, subject: impl Into<String>, e: Error) {
        let f = self.add(check, Severity::Error, subject, e.message);
        if !e.hints.is_empty() {
            f.fix = Some(e.hints.join("; "));
        }
    }

    fn bundle_arg(&self) -> String {
        match &self.opts.bundle {
            Some(b) => b.display().to_string(),
            None => "BUNDLE".into(),
        }
    }
}

impl Finding {
    fn evidence(&mut self, e: impl Into<String>) -> &mut Finding {
        self.evidence.push(e.into());
        self
    }
    fn fix(&mut self, f: impl Into<String>) -> &mut Finding {
        self.fix = Some(f.into());
        self
    }
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Diagnose the live install. See the module documentation.
pub async fn run(opts: &DoctorOptions) -> DoctorReport {
    run_with_env(opts, &process_env).await
}

/// [`run`] with the environment (`DATABASE_URL`, `PG*`, `NATS_URL`) looked up through `env`.
pub async fn run_with_env(opts: &DoctorOptions, env: &dyn Fn(&str) -> Option<String>) -> DoctorReport {
    let t0 = Instant::now();
    let mut ctx = Ctx {
        opts,
        env,
        manifest: None,
        server: None,
        findings: vec![],
    };
    if let Some(b) = &opts.bundle {
        let open = crate::bundle::OpenOptions {
            check: crate::bundle::Check::Structure,
            ..Default::default()
        };
        match crate::bundle::open_verified(b, &open, &crate::progress::Silent) {
            Ok(bundle) => ctx.manifest = Some(bundle.manifest().clone()),
            Err(e) => ctx.add_error("bundle", b.display().to_string(), e),
        }
    }
    containers(&mut ctx).await;
    if let Some(p) = project(&ctx) {
        ctx.server = cache::server_container(&p).await;
    }
    let database = database(&mut ctx).await;
    if let Some((client, target, release)) = &database {
        regions(&mut ctx, client, target, release).await;
        agents(&mut ctx, client).await;
    }
    let store = nats(&mut ctx, database.as_ref().map(|d| &d.2)).await;
    match (&database, &store) {
        (Some((client, target, release)), Some((store, display))) => {
            packages_check(&mut ctx, client, target, release, store, display).await
        }
        (Some((client, target, release)), None) => {
            // The rows alone still tell the empty-list case.
            match keys::read_rows(client, target, release).await {
                Ok(rows) if rows.is_empty() => empty_list(&mut ctx),
                Ok(_) => {
                    ctx.add(
                        "packages",
                        Severity::Info,
                        "package objects",
                        "not checked: NATS or its bucket is not reachable (see the nats finding)",
                    );
                }
                Err(e) => ctx.add_error("packages", PACKAGE_TABLE, e.into()),
            }
        }
        (None, _) => {
            ctx.add(
                "packages",
                Severity::Info,
                PACKAGE_TABLE,
                "not checked: the database is not reachable (see the regions finding)",
            );
        }
    }
    let mut findings = ctx.findings;
    findings.sort_by_key(|f| f.severity);
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error && !f.fixed)
        .count();
    let warnings = findings
        .iter()
        .filter(|f| f.severity == Severity::Warning && !f.fixed)
        .count();
    let fixed = findings.iter().filter(|f| f.fixed).count();
    DoctorReport {
        release: database.as_ref().map(|d| d.2.label()),
        findings,
        errors,
        warnings,
        fixed,
        seconds: t0.elapsed().as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------------------------
// Containers

/// The compose project: `--project`, the config's, the bundle's.
fn project(ctx: &Ctx<'_>) -> Option<String> {
    ctx.opts
        .project
        .clone()
        .or_else(|| ctx.opts.config.project.clone())
        .or_else(|| {
            ctx.manifest
                .as_ref()
                .and_then(|m| m.stack.as_ref().map(|s| s.project.clone()))
        })
}

async fn containers(ctx: &mut Ctx<'_>) {
    let Some(project) = project(ctx) else {
        ctx.add(
            "containers",
            Severity::Info,
            "compose project",
            "not checked: the compose project is not known",
        )
        .fix("give --target (the install's directory), --project NAME or --bundle BUNDLE");
        return;
    };
    let engine = match tokio::time::timeout(PROBE * 2, Engine::connect()).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => return ctx.add_error("containers", "Docker engine", e),
        Err(_) => {
            ctx.add(
                "containers",
                Severity::Error,
                "Docker engine",
                "the Docker engine did not answer within 6 s",
            )
            .fix("systemctl status docker; journalctl -u docker");
            return;
        }
    };
    let list = match engine.project_containers(&project).await {
        Ok(l) => l,
        Err(e) => return ctx.add_error("containers", "Docker engine", e),
    };
    if list.is_empty() {
        ctx.add(
            "containers",
            Severity::Error,
            format!("compose project {project}"),
            "no container of the stack exists: it was never started, or it was taken down",
        )
        .fix(format!(
            "cd TARGET && docker compose -p {project} up -d   (or re-run `bkbundle install`)"
        ));
        return;
    }
    for c in &list {
        let lines = engine.logs(&c.id, LOG_LINES).await.unwrap_or_default();
        let matched = causes::first_match(&lines);
        let subject = format!("service {} (container {})", c.service, c.name);
        let restart_loop = c.status == "restarting" || (c.restart_count >= 3 && c.status != "exited");
        let one_shot_done =
            c.status == "exited" && c.exit_code == 0 && matches!(c.restart_policy.as_str(), "" | "no" | "on-failure");
        let failing = if restart_loop {
            Some(format!(
                "restart loop: restarted {} time(s), now {}",
                c.restart_count, c.status
            ))
        } else if c.status == "exited" && !one_shot_done {
            Some(format!("exited with code {}", c.exit_code))
        } else if c.status == "dead" || c.status == "created" {
            Some(format!("is {}", c.status))
        } else if c.status == "running" && c.health.as_deref() == Some("unhealthy") {
            Some("is unhealthy (its health check fails)".to_string())
        } else {
            None
        };
        let state = format!(
            "state {}, health {}, exit code {}, restarts {}{}",
            c.status,
            c.health.as_deref().unwrap_or("none"),
            c.exit_code,
            c.restart_count,
            if c.oom_killed { ", killed for memory" } else { "" }
        );
        match failing {
            Some(what) => {
                let hint = causes::hint_for(&lines, c.oom_killed);
                let f = ctx.add("containers", Severity::Error, subject, what);
                f.evidence(state);
                match matched {
                    Some((line, _)) => {
                        f.evidence(format!("log: {}", line.trim()));
                    }
                    None => {
                        for l in lines.iter().rev().take(5).rev() {
                            f.evidence(format!("log: {}", l.trim()));
                        }
                    }
                }
                f.fix(match hint {
                    Some(h) => format!("{h}; then `docker compose -p {project} up -d {}`", c.service),
                    None => format!(
                        "docker logs {}   (then fix its cause and `docker compose -p {project} up -d {}`)",
                        c.name, c.service
                    ),
                });
            }
            None => {
                if let Some((line, hint)) = matched {
                    ctx.add(
                        "containers",
                        Severity::Warning,
                        subject,
                        "its log shows a known problem",
                    )
                    .evidence(format!("log: {}", line.trim()))
                    .evidence(state)
                    .fix(hint);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The database and the regions

async fn database(ctx: &mut Ctx<'_>) -> Option<(tokio_postgres::Client, DbTarget, Release)> {
    let target = match crate::site::targets::database(
        ctx.opts.database_url.as_deref(),
        &ctx.opts.config.database,
        &ctx.opts.site,
        ctx.env,
    ) {
        Ok(t) => t,
        Err(e) => {
            ctx.add_error("regions", "database", e.into());
            return None;
        }
    };
    let client = match tokio::time::timeout(PROBE * 3, db::connect(&target)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            ctx.add_error("regions", format!("database {}", target.name.display), e.into());
            return None;
        }
        Err(_) => {
            ctx.add(
                "regions",
                Severity::Error,
                format!("database {}", target.name.display),
                "PostgreSQL did not answer within 9 s",
            )
            .fix("docker compose ps postgres; docker logs of the postgres container");
            return None;
        }
    };
    match release::detect(&client, &target).await {
        Ok(r) => Some((client, target, r)),
        Err(e) => {
            ctx.add_error("regions", format!("database {}", target.name.display), e.into());
            None
        }
    }
}

/// A region's stored env: key → (value, type).
type Stored = BTreeMap<String, (String, Option<EnvType>)>;

async fn regions(ctx: &mut Ctx<'_>, client: &tokio_postgres::Client, target: &DbTarget, release: &Release) {
    let current = match pregions::read_current(client, target, release).await {
        Ok(c) => c,
        Err(e) => return ctx.add_error("regions", ENV_TABLE, e.into()),
    };
    let required: Vec<String> = match &ctx.manifest {
        Some(m) if !m.regions.required.is_empty() => m.regions.required.clone(),
        _ => AGENT_KEYS.iter().map(|k| k.to_string()).collect(),
    };
    let why = if ctx.manifest.is_some() {
        "required by the bundle"
    } else {
        "needed by agents"
    };
    if current.regions.is_empty() {
        ctx.add(
            "regions",
            Severity::Error,
            REGION_TABLE,
            "no cloud region exists: the server has not run its init commands (node_init creates region 1)",
        )
        .fix("check the server container's log; then `bkbundle regions apply --bundle BUNDLE --config install.toml --env-file TARGET/.env`");
        return;
    }
    let stored_of = |id: i64| -> Stored {
        current
            .env
            .iter()
            .filter(|e| e.region_id == id)
            .map(|e| (e.key.clone(), (e.value.clone(), EnvType::parse(&e.env_type))))
            .collect()
    };
    let default_rows = stored_of(DEFAULT_REGION_ID);
    let mut probed: BTreeSet<(String, u16)> = BTreeSet::new();
    let mut touched: BTreeSet<i64> = BTreeSet::new();
    for region in &current.regions {
        let stored = stored_of(region.id);
        let local = ctx.opts.config.regions.iter().any(|r| r.name == region.name && r.local);
        let subject = |key: &str| format!("region {:?} (id {}) {key}", region.name, region.id);
        let problems = rules::stored_problems(&stored, &required, why, local);
        // A release without the proxy_address column keeps the proxy in the PROXY_ADDRESS row.
        let proxy = match stored.get(rules::PROXY_ADDRESS_KEY) {
            Some((p, _)) if region.proxy_address.is_empty() => p.clone(),
            _ => region.proxy_address.clone(),
        };
        let mut missing = Vec::new();
        for (key, message) in problems {
            let is_missing = !stored.contains_key(&key);
            let shown = stored
                .get(&key)
                .map(|(v, t)| {
                    if *t == Some(EnvType::Secret) {
                        format!("row: {key} = (secret, not shown)")
                    } else {
                        format!("row: {key} = {v:?}")
                    }
                })
                .unwrap_or_else(|| format!("no row for {key} in {} with cloud_region_id = {}", ENV_TABLE, region.id));
            let inheritable = is_missing && region.id != DEFAULT_REGION_ID && default_rows.contains_key(&key);
            let bundle = ctx.bundle_arg();
            let f = ctx.add("regions", Severity::Error, subject(&key), message);
            f.evidence(shown);
            if key == "NODE_SERVER_URL" {
                f.evidence("agents of this region get server_url \"null/api/v1/node_mgmt/open_api/node\" (or no server) and restart-loop while their install tasks say success");
            }
            f.fix(if inheritable {
                format!("bkbundle doctor --fix (adds it from region default{})", if proxy.is_empty() { String::new() } else { format!(", with proxy {proxy}") })
            } else {
                format!(
                    "declare region {:?} in the install config ([[regions]]) and run `bkbundle regions apply --bundle {} --config install.toml --env-file TARGET/.env`, or set it in the UI",
                    region.name,
                    bundle
                )
            });
            if inheritable {
                missing.push(key);
            }
        }
        if ctx.opts.fix && !missing.is_empty() {
            let added = pregions::copy_from_default(client, target, &current, region.id, &proxy, &missing)
                .await
                .map_err(|e| Error::from(e).message);
            match added {
                Ok(()) => {
                    touched.insert(region.id);
                    for f in ctx
                        .findings
                        .iter_mut()
                        .filter(|f| f.check == "regions" && missing.iter().any(|k| f.subject == subject(k)))
                    {
                        f.fixed = true;
                        f.evidence.push(format!(
                            "fixed: the row was added from region default (id {DEFAULT_REGION_ID})"
                        ));
                    }
                }
                Err(e) => {
                    ctx.add(
                        "regions",
                        Severity::Error,
                        subject(&missing.join(", ")),
                        format!("--fix could not add the keys: {e}"),
                    );
                }
            }
        }
        // Whether agents can reach the server from here: resolution, then TCP.
        if let Some((url, _)) = stored.get("NODE_SERVER_URL") {
            if let Some((host, port)) = url_host_port(url) {
                if probed.insert((host.clone(), port)) {
                    if let Err(what) = probe(&host, port).await {
                        ctx.add(
                            "regions",
                            Severity::Warning,
                            subject("NODE_SERVER_URL"),
                            format!("the server URL does not answer from this host: {what}"),
                        )
                        .evidence(format!("row: NODE_SERVER_URL = {url:?}"))
                        .fix(format!(
                            "make {host}:{port} reach the server (traefik/web published on it, firewall open); agents report `Could not resolve host` or connect timeouts otherwise. From an agent host: curl -v {url}"
                        ));
                    }
                }
            }
        }
    }
    if !touched.is_empty() && release.cache_table {
        let _ = pregions::invalidate_db_cache(client, target, &touched).await;
    }
    region_services(ctx, client, target, release, &current).await;
    default_region_vs_server(ctx, &current);
    stale_cache(ctx, client, target, release, &current, &stored_of).await;
}

/// Regions without their `node_mgmt_cloudregionservice` rows (created by an older bkbundle or by
/// hand): the UI shows them "not deployed" forever, since the health task only updates rows
/// that exist. `--fix` adds them as the server does for a new region.
async fn region_services(
    ctx: &mut Ctx<'_>,
    client: &tokio_postgres::Client,
    target: &DbTarget,
    release: &Release,
    current: &Current,
) {
    for region in current.regions.iter().filter(|r| r.id != DEFAULT_REGION_ID) {
        let missing = current.missing_services(release, region.id);
        if missing.is_empty() {
            continue;
        }
        let subject = format!("region {:?} (id {}) services", region.name, region.id);
        ctx.add(
            "regions",
            Severity::Warning,
            subject.clone(),
            "the region has no service rows: the UI shows its stargazer and nats-executor \"not deployed\" forever, even once its proxy runs",
        )
        .evidence(format!(
            "no node_mgmt_cloudregionservice row named {} with cloud_region_id = {}",
            missing.join(", "),
            region.id
        ))
        .fix("bkbundle doctor --fix (adds them as the server does for a new region: not_deployed)");
        if ctx.opts.fix {
            match pregions::add_services(client, target, release, region.id, &region.name, &missing).await {
                Ok(()) => {
                    if let Some(f) = ctx.findings.iter_mut().find(|f| f.subject == subject) {
                        f.fixed = true;
                        f.evidence.push("fixed: the service rows were added".into());
                    }
                }
                Err(e) => {
                    ctx.add_error("regions", subject, e.into());
                }
            }
        }
    }
}

/// Region 1's rows against the server's environment: at every start the server rewrites each
/// `is_pre` row from `DEFAULT_ZONE_VAR_<KEY>`, so a row that differs is reverted at the next
/// restart (the environment wins). Secrets are compared when the SECRET_KEY is known.
fn default_region_vs_server(ctx: &mut Ctx<'_>, current: &Current) {
    let Some(server) = &ctx.server else { return };
    let secret_key = crate::site::targets::secret_key(&ctx.opts.config.database, &ctx.opts.site, ctx.env)
        .map(|(k, _)| k)
        .or_else(|| server.env.get("SECRET_KEY").map(|k| SecretKey::from_django(k)));
    let name = server.name.clone();
    let mut found = Vec::new();
    for (var, value) in &server.env {
        let Some(key) = var.strip_prefix(rules::DEFAULT_ZONE_VAR_PREFIX) else {
            continue;
        };
        let row = current
            .env
            .iter()
            .find(|e| e.region_id == DEFAULT_REGION_ID && e.key == key);
        let secret = EnvType::for_key(key) == EnvType::Secret;
        let differs = match row {
            None => Some("has no row (the next restart adds it)".to_string()),
            Some(r) if secret => match secret_key
                .as_ref()
                .map(|k| crate::platform::crypto::decrypt(k, &r.value))
            {
                Some(Ok(plain)) if plain != *value => Some("holds another secret".to_string()),
                _ => None,
            },
            Some(r) if r.value != *value => Some(format!("holds {:?}", r.value)),
            Some(_) => None,
        };
        if let Some(what) = differs {
            let shown = if secret {
                "(secret, not shown)".to_string()
            } else {
                format!("{value:?}")
            };
            found.push((key.to_string(), what, shown, row.map(|r| r.is_pre)));
        }
    }
    for (key, what, shown, is_pre) in found {
        let f = ctx.add(
            "regions",
            Severity::Warning,
            format!("region \"default\" (id 1) {key}"),
            match is_pre {
                Some(false) => format!("the row {what}, but the server's environment sets {shown}; the row has is_pre = false, so the server leaves it alone and agents keep getting the row's value"),
                _ => format!("the row {what}, but the server's environment sets {shown}: at the next server restart the environment wins and rewrites the row"),
            },
        );
        f.evidence(format!(
            "container {name}: {}{key} = {shown}",
            rules::DEFAULT_ZONE_VAR_PREFIX
        ));
        f.fix("change the value in one place, the install config ([env] / [regions.env]), and run `bkbundle install` again: it renders the server's DEFAULT_ZONE_VAR_* and the rows from it");
    }
}

/// Where the server's cached env was read from.
enum CacheSource {
    Database,
    Redis(crate::platform::cache::RedisTarget),
}

impl CacheSource {
    fn label(&self) -> String {
        match self {
            CacheSource::Database => CACHE_TABLE.to_string(),
            CacheSource::Redis(t) => format!("Redis {}", t.display()),
        }
    }
}

/// The server's cached env of each region (a pickle: base64 of it in Django's database cache,
/// raw in Redis) against the rows: a cached entry that does not hold a row's current value is
/// stale. Both caches are read when known: the database table when the schema has it, Redis from
/// `[database] redis_url` or the stack's .env.
async fn stale_cache(
    ctx: &mut Ctx<'_>,
    client: &tokio_postgres::Client,
    target: &DbTarget,
    release: &Release,
    current: &Current,
    stored_of: &dyn Fn(i64) -> Stored,
) {
    let keys: Vec<String> = current.regions.iter().map(|r| cache_key(r.id)).collect();
    // (source, cache key, the pickle)
    let mut cached: Vec<(usize, String, Vec<u8>)> = Vec::new();
    let mut sources = Vec::new();
    if release.cache_table {
        let sql = format!(
            "SELECT cache_key::text, value::text FROM {} WHERE cache_key = ANY($1) AND expires > now()",
            CACHE_TABLE
        );
        match client.query(sql.as_str(), &[&keys]).await {
            Ok(rows) => {
                use base64::Engine as _;
                for row in rows {
                    let value: String = row.get(1);
                    if let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(value.trim()) {
                        cached.push((sources.len(), row.get(0), blob));
                    }
                }
            }
            Err(e) => {
                ctx.add(
                    "regions",
                    Severity::Info,
                    CACHE_TABLE,
                    format!("the server's cache was not checked: {}", crate::error::chain(&e)),
                );
            }
        }
        sources.push(CacheSource::Database);
    }
    match crate::site::targets::server_cache(
        &ctx.opts.config.database,
        &ctx.opts.site,
        ctx.server.as_ref().map(|s| &s.env),
    ) {
        ServerCache::Redis { target: Ok(t), .. } => match cache::get(&t, &keys, PROBE).await {
            Ok(values) => {
                for (k, v) in keys.iter().zip(values) {
                    if let Some(blob) = v {
                        cached.push((sources.len(), k.clone(), blob));
                    }
                }
                sources.push(CacheSource::Redis(t));
            }
            Err(e) => {
                ctx.add(
                    "regions",
                    Severity::Warning,
                    format!("Redis {}", t.display()),
                    format!("the server's Redis cache could not be read: {e}"),
                )
                .fix("check [database] redis_url (or REDIS_PASSWORD/REDIS_PORT of the stack's .env) and that the redis service runs");
            }
        },
        ServerCache::Redis { from, target: Err(e) } => {
            ctx.add("regions", Severity::Warning, "Redis cache", format!("{from}: {e}"));
        }
        ServerCache::ProcessMemory { from } => {
            ctx.add(
                "regions",
                Severity::Info,
                "server cache",
                format!("the server caches the regions' env in process memory ({from}): it cannot be read or cleared from outside; after changing rows agents get the old values for up to {} s unless the server is restarted", cache::CACHE_SECONDS),
            );
        }
        ServerCache::Unknown => {}
    }
    // Per source, the regions whose entry is stale.
    let mut stale: BTreeMap<usize, BTreeSet<i64>> = BTreeMap::new();
    for (source, key, blob) in cached {
        let Some(region) = current.regions.iter().find(|r| cache_key(r.id) == key) else {
            continue;
        };
        let stored = stored_of(region.id);
        let differing: Vec<&str> = stored
            .iter()
            .filter(|(_, (v, t))| *t != Some(EnvType::Secret) && !v.is_empty())
            .filter(|(_, (v, _))| !contains(&blob, v.as_bytes()))
            .map(|(k, _)| k.as_str())
            .collect();
        if differing.is_empty() {
            continue;
        }
        let label = sources[source].label();
        let f = ctx.add(
            "regions",
            Severity::Warning,
            format!("region {:?} (id {}) cached env in {label}", region.name, region.id),
            "the server's cached env differs from the rows: agents get the old values until it expires (up to 300 s)",
        );
        f.evidence(format!(
            "{label}: {key:?} lacks the current value of {}",
            differing.join(", ")
        ));
        f.fix(match &sources[source] {
            CacheSource::Database => format!(
                "bkbundle doctor --fix (removes the entry), or: DELETE FROM {} WHERE cache_key = '{key}';",
                CACHE_TABLE
            ),
            CacheSource::Redis(_) => {
                format!("bkbundle doctor --fix (removes the entry), or: redis-cli -n 1 DEL '{key}'")
            }
        });
        stale.entry(source).or_default().insert(region.id);
    }
    if !ctx.opts.fix {
        return;
    }
    for (source, regions) in stale {
        let label = sources[source].label();
        let removed = match &sources[source] {
            CacheSource::Database => pregions::invalidate_db_cache(client, target, &regions)
                .await
                .map(|_| ())
                .map_err(|e| Error::from(e).message),
            CacheSource::Redis(t) => {
                let keys: Vec<String> = regions.iter().map(|id| cache_key(*id)).collect();
                cache::del(t, &keys, PROBE).await.map(|_| ())
            }
        };
        match removed {
            Ok(()) => {
                for f in ctx
                    .findings
                    .iter_mut()
                    .filter(|f| f.check == "regions" && f.subject.ends_with(&format!("cached env in {label}")))
                {
                    f.fixed = true;
                    f.evidence.push("fixed: the cache entry was removed".into());
                }
            }
            Err(e) => {
                ctx.add(
                    "regions",
                    Severity::Error,
                    label,
                    format!("--fix could not remove the stale entries: {e}"),
                );
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Host and port of an http(s) URL (default ports 80/443).
fn url_host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.trim().split_once("://")?;
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']')?;
        let port = p.strip_prefix(':').map(|p| p.parse().ok()).unwrap_or(Some(default))?;
        return Some((h.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), default)),
    }
    .filter(|(h, _)| !h.is_empty())
}

/// Resolve, then connect: `Err` names the stage that failed.
async fn probe(host: &str, port: u16) -> Result<(), String> {
    let addrs: Vec<_> = match tokio::time::timeout(PROBE, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => return Err(format!("{host} does not resolve ({e})")),
        Err(_) => return Err(format!("resolving {host} took longer than 3 s")),
    };
    let mut last = format!("{host} resolved to no address");
    for a in addrs {
        match tokio::time::timeout(PROBE, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = format!("TCP connect to {a}: {e}"),
            Err(_) => last = format!("TCP connect to {a}: no answer within 3 s"),
        }
    }
    Err(last)
}

// ---------------------------------------------------------------------------------------------
// Agents

async fn agents(ctx: &mut Ctx<'_>, client: &tokio_postgres::Client) {
    let tables = [
        "node_mgmt_controllertask",
        "node_mgmt_controllertasknode",
        "node_mgmt_node",
    ];
    let present = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ANY($1)",
            &[&tables.to_vec()],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0);
    if present < 3 {
        ctx.add(
            "agents",
            Severity::Info,
            "install tasks",
            format!(
                "not checked: this database has no {} tables (a server without the installer)",
                tables.join("/")
            ),
        );
        return;
    }
    let sql = format!(
        "SELECT r.name::text, t.cloud_region_id::bigint, tn.ip::text, t.id::bigint, to_char(t.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') \
         FROM node_mgmt_controllertasknode tn JOIN node_mgmt_controllertask t ON t.id = tn.task_id \
         JOIN {} r ON r.id = t.cloud_region_id \
         WHERE lower(tn.status) = 'success' AND t.updated_at < now() - interval '{AGENT_GRACE_MINUTES} minutes' \
         AND NOT EXISTS (SELECT 1 FROM node_mgmt_node n WHERE n.cloud_region_id = t.cloud_region_id AND n.ip = tn.ip) \
         ORDER BY t.cloud_region_id, tn.ip",
        REGION_TABLE
    );
    let rows = match client.query(sql.as_str(), &[]).await {
        Ok(r) => r,
        Err(e) => {
            ctx.add(
                "agents",
                Severity::Info,
                "install tasks",
                format!("not checked: {}", crate::error::chain(&e)),
            );
            return;
        }
    };
    let mut by_region: BTreeMap<(i64, String), Vec<String>> = BTreeMap::new();
    for r in rows {
        let name: String = r.get(0);
        let id: i64 = r.get(1);
        let ip: String = r.get(2);
        let task: i64 = r.get(3);
        let at: String = r.get(4);
        by_region.entry((id, name)).or_default().push(format!(
            "task {task} installed {ip} at {at} UTC: status success, no node with that IP ever registered"
        ));
    }
    for ((id, name), hosts) in by_region {
        let f = ctx.add(
            "agents",
            Severity::Error,
            format!("region {name:?} (id {id}) agents"),
            format!("{} agent(s) installed successfully but never appeared", hosts.len()),
        );
        for h in hosts {
            f.evidence(h);
        }
        f.fix(format!(
            "check region {name:?}'s NODE_SERVER_URL and NATS_SERVERS (findings above); on an agent host: the sidecar's log and `curl -v <NODE_SERVER_URL>`"
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// NATS and the packages

async fn nats(ctx: &mut Ctx<'_>, release: Option<&Release>) -> Option<(Store, String)> {
    let target = match crate::site::targets::nats(
        ctx.opts.nats_url.as_deref(),
        &ctx.opts.config.nats,
        &ctx.opts.site,
        ctx.env,
    ) {
        Ok(t) => t,
        Err(e) => {
            ctx.add_error("nats", "NATS", e.into());
            return None;
        }
    };
    let display = target.display();
    let nc = match tokio::time::timeout(PROBE * 5, pnats::connect(&target)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let stage = stage_of(&e);
            ctx.add_error("nats", format!("NATS {display} ({stage})"), e.into());
            return None;
        }
        Err(_) => {
            ctx.add(
                "nats",
                Severity::Error,
                format!("NATS {display}"),
                "no answer within 15 s",
            )
            .fix("docker compose ps nats; the nats container's log");
            return None;
        }
    };
    let bucket = ctx
        .opts
        .bucket
        .clone()
        .or_else(|| ctx.opts.config.nats.bucket.clone())
        .unwrap_or_else(|| keys::bucket(&ctx.opts.site, release).0);
    match tokio::time::timeout(PROBE * 3, pnats::open_store(&nc, &target, &bucket, false)).await {
        Ok(Ok(Some(s))) => Some((s, display)),
        Ok(Ok(None)) => {
            let bundle = ctx.bundle_arg();
            ctx.add(
                "nats",
                Severity::Error,
                format!("bucket {bucket:?} on {display}"),
                "the package bucket does not exist: no package was ever uploaded, so agents have nothing to download",
            )
            .evidence(format!("no stream OBJ_{bucket}"))
            .fix(format!(
                "bkbundle init-packages --auto --bundle {bundle} --env-file TARGET/.env"
            ));
            None
        }
        Ok(Err(e)) => {
            let stage = stage_of(&e);
            ctx.add_error("nats", format!("NATS {display} ({stage})"), e.into());
            None
        }
        Err(_) => {
            ctx.add(
                "nats",
                Severity::Error,
                format!("NATS {display} (JetStream)"),
                "JetStream did not answer within 9 s",
            );
            None
        }
    }
}

/// The link of the chain an error broke.
fn stage_of(e: &NatsError) -> &'static str {
    match e {
        NatsError::Resolve { .. } => "name resolution",
        NatsError::Connect { .. } => "TCP",
        NatsError::Tls { .. } => "TLS",
        NatsError::Auth { .. } => "authentication",
        NatsError::NoJetStream { .. } => "JetStream",
        NatsError::Bucket { .. } => "bucket",
        NatsError::NoNats | NatsError::BadConfig(_) => "configuration",
    }
}

/// The bucket's stream against its live objects: chunk sets no object refers to (uploads killed
/// before their meta was written, replaced versions) take disk for nothing. `--fix` removes them,
/// holding the bucket's upload lock so that no upload of bkbundle's is in flight.
async fn stream_space(ctx: &mut Ctx<'_>, store: &Store, display: &str) {
    let inv = match pnats::inventory(store).await {
        Ok(i) => i,
        Err(e) => {
            ctx.add(
                "packages",
                Severity::Info,
                format!("bucket {:?}", store.bucket),
                format!("the stream's space was not checked: {e}"),
            );
            return;
        }
    };
    if inv.unreferenced.is_empty() {
        return;
    }
    let subject = format!("bucket {:?} stream OBJ_{}", store.bucket, store.bucket);
    let messages: usize = inv.unreferenced.iter().map(|(_, n)| n).sum();
    ctx.add(
        "packages",
        Severity::Warning,
        subject.clone(),
        format!(
            "{} chunk set(s), {messages} message(s), belong to no object (uploads that never completed): the stream holds {} bytes for {} bytes of {} live object(s)",
            inv.unreferenced.len(),
            inv.stream_bytes,
            inv.live_bytes,
            inv.live_objects
        ),
    )
    .evidence(format!(
        "unreferenced chunk subjects: {}",
        inv.unreferenced
            .iter()
            .take(5)
            .map(|(n, c)| format!("$O.{}.C.{n} ({c})", store.bucket))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .fix("bkbundle doctor --fix (removes them while holding the bucket's upload lock; run it when no upload from the UI is in progress)");
    if !ctx.opts.fix {
        return;
    }
    let guard = match crate::lock::acquire_bucket_async(display, &store.bucket, Duration::from_secs(30)).await {
        Ok(g) => g,
        Err(e) => return ctx.add_error("packages", subject, e),
    };
    // Read again under the lock: an upload that finished meanwhile is live now.
    let again = pnats::inventory(store)
        .await
        .map(|i| i.unreferenced)
        .unwrap_or_default();
    let mut purged = 0u64;
    let mut failed = Vec::new();
    for (nuid, _) in &again {
        match pnats::purge_chunks(store, nuid).await {
            Ok(n) => purged += n,
            Err(e) => failed.push(format!("{nuid}: {e}")),
        }
    }
    drop(guard);
    if let Some(f) = ctx.findings.iter_mut().find(|f| f.subject == subject) {
        if failed.is_empty() {
            f.fixed = true;
            f.evidence.push(format!("fixed: {purged} chunk message(s) removed"));
        } else {
            f.evidence
                .push(format!("--fix could not remove: {}", failed.join("; ")));
        }
    }
}

fn empty_list(ctx: &mut Ctx<'_>) {
    let bundle = ctx.bundle_arg();
    ctx.add(
        "packages",
        Severity::Error,
        PACKAGE_TABLE,
        "the probe package list is empty: nothing uploaded the packages nor created their rows",
    )
    .evidence(format!("SELECT count(*) FROM {} = 0", PACKAGE_TABLE))
    .fix(format!(
        "bkbundle init-packages --auto --bundle {bundle} --env-file TARGET/.env"
    ));
}

async fn packages_check(
    ctx: &mut Ctx<'_>,
    client: &tokio_postgres::Client,
    target: &DbTarget,
    release: &Release,
    store: &Store,
    display: &str,
) {
    let rows = match keys::read_rows(client, target, release).await {
        Ok(r) => r,
        Err(e) => return ctx.add_error("packages", PACKAGE_TABLE, e.into()),
    };
    if rows.is_empty() {
        empty_list(ctx);
    }
    let names = match pnats::list_objects(store, display).await {
        Ok(n) => n,
        Err(e) => return ctx.add_error("packages", format!("bucket {:?}", store.bucket), e.into()),
    };
    let (missing, orphans) = keys::consistency(&rows, release, &names);
    let bundle = ctx.bundle_arg();
    let mut missing_subjects = Vec::new();
    for (row_id, _) in &missing {
        let Some(r) = rows.iter().find(|r| r.id == *row_id) else {
            continue;
        };
        let keys = r.keys(release);
        let subject = format!("package row {} ({} {} {})", r.id, r.object, r.version, r.name);
        ctx.add(
            "packages",
            Severity::Error,
            subject.clone(),
            "its object is missing from the store: downloads of this package return 404",
        )
        .evidence(format!(
            "{} row id={} os={} arch={} object={} version={} name={}",
            PACKAGE_TABLE,
            r.id,
            r.os,
            if r.arch.is_empty() { "-" } else { &r.arch },
            r.object,
            r.version,
            r.name
        ))
        .evidence(format!("no object under {}", keys.join(" nor ")))
        .fix(format!("bkbundle doctor --fix --bundle {bundle}   (or init-packages --auto --bundle {bundle}; a package the bundle lacks must be uploaded again in the UI)"));
        missing_subjects.push((*row_id, subject));
    }
    for o in &orphans {
        ctx.add("packages", Severity::Warning, format!("object {o}"), format!("no {} row points at this object: it is not offered for download", PACKAGE_TABLE))
            .evidence(format!("bucket {:?} on {display}", store.bucket))
            .fix(format!("bkbundle init-packages --auto --bundle {bundle} records it if the bundle has it; otherwise remove it: nats object rm {} {o:?}", store.bucket));
    }
    stream_space(ctx, store, display).await;
    // With the bundle: the stored objects of its packages against its digests.
    if let Some(m) = &ctx.manifest {
        let mut differ = Vec::new();
        for p in &m.packages {
            let (Some(sha), Some(size)) = (p.sha256.as_deref().and_then(crate::digest::sha256_from_hex), p.size) else {
                continue;
            };
            let arch = crate::manifest::normalize_arch(&p.arch).unwrap_or(p.arch.as_str());
            let key = keys::object_key(release, p.os.as_str(), arch, &p.object, &p.version, &p.name);
            if let Ok(Some((d, sz))) = pnats::info(store, &key).await {
                if keys::parse_digest(&d).as_deref() != Some(&sha[..]) || sz != size {
                    differ.push((key, d, sz, keys::nats_digest(&sha), size));
                }
            }
        }
        for (key, d, sz, want, want_size) in differ {
            ctx.add(
                "packages",
                Severity::Warning,
                format!("object {key}"),
                "the stored object differs from the bundle's package",
            )
            .evidence(format!(
                "stored {d}, {sz} bytes; the bundle has {want}, {want_size} bytes"
            ))
            .fix(format!(
                "if the bundle's is the one to serve: bkbundle init-packages --auto --bundle {bundle} --force"
            ));
        }
    }
    if ctx.opts.fix && !missing_subjects.is_empty() {
        let Some(b) = ctx.opts.bundle.clone() else {
            ctx.add(
                "packages",
                Severity::Info,
                "--fix",
                "missing objects can only be re-uploaded from a bundle: give --bundle",
            );
            return;
        };
        let mut po = PackagesOptions::new(b, &ctx.opts.config, ctx.opts.site.clone());
        po.database_url = ctx.opts.database_url.clone();
        po.nats_url = ctx.opts.nats_url.clone();
        po.bucket = Some(store.bucket.clone());
        match packages::run_with_env(&po, ctx.env).await {
            Ok(r) => {
                let repaired: BTreeSet<i64> = r
                    .missing_objects
                    .iter()
                    .filter(|m| m.repaired)
                    .map(|m| m.row_id)
                    .collect();
                for (id, subject) in missing_subjects {
                    if let Some(f) = ctx.findings.iter_mut().find(|f| f.subject == subject) {
                        if repaired.contains(&id) {
                            f.fixed = true;
                            f.evidence.push("fixed: uploaded again from the bundle".into());
                        } else {
                            f.evidence
                                .push("not fixed: the bundle does not have this package".into());
                        }
                    }
                }
            }
            Err(e) => ctx.add_error("packages", "--fix", e.into()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Output

/// The human rendering: errors first, each with its evidence and fix; one summary line.
pub fn render(r: &DoctorReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for f in &r.findings {
        let label = if f.fixed { "FIXED" } else { f.severity.label() };
        let _ = writeln!(s, "{label:<8}[{}] {}: {}", f.check, f.subject, f.message);
        for e in &f.evidence {
            let _ = writeln!(s, "           evidence: {e}");
        }
        if let (Some(fix), false) = (&f.fix, f.fixed) {
            let _ = writeln!(s, "           fix: {fix}");
        }
    }
    let _ = write!(
        s,
        "doctor: {} error(s), {} warning(s){} in {:.1} s{}",
        r.errors,
        r.warnings,
        if r.fixed > 0 {
            format!(", {} fixed", r.fixed)
        } else {
            String::new()
        },
        r.seconds,
        if r.errors == 0 && r.warnings == 0 {
            ": all checks passed"
        } else {
            ""
        }
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_url_host_and_port() {
        assert_eq!(url_host_port("https://10.0.0.5:443/"), Some(("10.0.0.5".into(), 443)));
        assert_eq!(url_host_port("http://bk.example"), Some(("bk.example".into(), 80)));
        assert_eq!(url_host_port("https://[::1]/x"), Some(("::1".into(), 443)));
        assert_eq!(url_host_port("null/api/v1"), None);
        assert_eq!(url_host_port("http://:80"), None);
    }

    #[test]
    fn errors_come_first_and_fixed_ones_do_not_count() {
        let f = |severity, fixed| Finding {
            check: "regions",
            severity,
            subject: "s".into(),
            message: "m".into(),
            evidence: vec!["e".into()],
            fix: Some("do it".into()),
            fixed,
        };
        let mut findings = vec![
            f(Severity::Info, false),
            f(Severity::Error, true),
            f(Severity::Warning, false),
        ];
        findings.sort_by_key(|f| f.severity);
        let r = DoctorReport {
            release: None,
            errors: 0,
            warnings: 1,
            fixed: 1,
            findings,
            seconds: 0.1,
        };
        let text = render(&r);
        assert!(text.starts_with("FIXED"), "{text}");
        assert!(
            text.contains("WARNING [regions] s: m\n           evidence: e\n           fix: do it"),
            "{text}"
        );
        assert!(
            text.ends_with("doctor: 0 error(s), 1 warning(s), 1 fixed in 0.1 s"),
            "{text}"
        );
        assert!(!r.has_errors());
        assert!(contains(b"abcNODE", b"NODE") && !contains(b"abc", b""));
    }
}
