//! The regions check, on the platform's database: every region's stored sidecar env (and whether
//! its server URL answers from here), its service rows, region 1 against the server's
//! `DEFAULT_ZONE_VAR_*`, and the server's cached env against the rows.

use super::{Ctx, Finding, Link, Severity, PROBE};
use crate::error::Error;
use crate::platform::cache::{self, ServerCache};
use crate::platform::crypto::SecretKey;
use crate::platform::regions::{cache_key, Current, CurrentRegion};
use crate::platform::release::{Release, CACHE_TABLE, ENV_TABLE, REGION_TABLE};
use crate::platform::rules::{self, EnvType, DEFAULT_REGION_ID};
use crate::ports::live::{Postgres, Redis};
use crate::ports::{Cache, PlatformDb};
use std::collections::{BTreeMap, BTreeSet};

/// Keys agents cannot work without, when no bundle says which keys it requires.
pub const AGENT_KEYS: [&str; 3] = ["NODE_SERVER_URL", "NATS_SERVERS", "NATS_PROTOCOL"];

/// Connect the platform's PostgreSQL (live); the finding when it cannot be.
pub(super) async fn connect(ctx: &Ctx<'_>) -> Link<Postgres> {
    let target = match crate::site::targets::database(
        ctx.opts.database_url.as_deref(),
        &ctx.opts.config.database,
        &ctx.opts.site,
        ctx.env,
    ) {
        Ok(t) => t,
        Err(e) => return Err(vec![Finding::from_error("regions", "database", e.into())]),
    };
    let subject = format!("database {}", target.name.display);
    match tokio::time::timeout(PROBE * 3, Postgres::connect(target)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(vec![Finding::from_error("regions", subject, e.into())]),
        Err(_) => {
            let mut f = Finding::new(
                "regions",
                Severity::Error,
                subject,
                "PostgreSQL did not answer within 9 s",
            );
            f.fix("docker compose ps postgres; docker logs of the postgres container");
            Err(vec![f])
        }
    }
}

/// Which release the database is, as found (a release bkbundle could not write to is still
/// diagnosed); the finding when it cannot tell.
pub(super) async fn release_of(db: &dyn PlatformDb) -> Link<Release> {
    db.detect_release().await.map_err(|e| {
        vec![Finding::from_error(
            "regions",
            format!("database {}", db.target().name.display),
            e.into(),
        )]
    })
}

/// A region's stored env: key → (value, type).
type Stored = BTreeMap<String, (String, Option<EnvType>)>;

fn stored_of(current: &Current, id: i64) -> Stored {
    current
        .env
        .iter()
        .filter(|e| e.region_id == id)
        .map(|e| (e.key.clone(), (e.value.clone(), EnvType::parse(&e.env_type))))
        .collect()
}

/// `region "east" (id 2) KEY`: the subject of a finding about one of a region's keys.
fn subject(region: &CurrentRegion, key: &str) -> String {
    format!("region {:?} (id {}) {key}", region.name, region.id)
}

pub(super) async fn check(ctx: &mut Ctx<'_>, db: &dyn PlatformDb, release: &Release, cache: Option<&dyn Cache>) {
    let current = match db.regions(release).await {
        Ok(c) => c,
        Err(e) => return ctx.add_error("regions", ENV_TABLE, e.into()),
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
    let default_rows = stored_of(&current, DEFAULT_REGION_ID);
    let mut probed: BTreeSet<(String, u16)> = BTreeSet::new();
    let mut touched: BTreeSet<i64> = BTreeSet::new();
    for region in &current.regions {
        let stored = stored_of(&current, region.id);
        // A release without the proxy_address column keeps the proxy in the PROXY_ADDRESS row.
        let proxy = match stored.get(rules::PROXY_ADDRESS_KEY) {
            Some((p, _)) if region.proxy_address.is_empty() => p.clone(),
            _ => region.proxy_address.clone(),
        };
        let missing = env_problems(ctx, region, &stored, &default_rows, &proxy);
        if ctx.opts.fix && !missing.is_empty() && add_from_default(ctx, db, release, region, &proxy, &missing).await {
            touched.insert(region.id);
        }
        probe_server_url(ctx, region, &stored, &mut probed).await;
    }
    if !touched.is_empty() && release.cache_table {
        let _ = db.invalidate_cached_env(&touched).await;
    }
    region_services(ctx, db, release, &current).await;
    default_region_vs_server(ctx, &current);
    stale_cache(ctx, db, release, cache, &current).await;
}

/// One finding per problem of a region's stored rows; the missing keys region default has,
/// which `--fix` can add.
fn env_problems(
    ctx: &mut Ctx<'_>,
    region: &CurrentRegion,
    stored: &Stored,
    default_rows: &Stored,
    proxy: &str,
) -> Vec<String> {
    let required: Vec<String> = match &ctx.manifest {
        Some(m) if !m.regions.required.is_empty() => m.regions.required.clone(),
        _ => AGENT_KEYS.iter().map(|k| k.to_string()).collect(),
    };
    let why = if ctx.manifest.is_some() {
        "required by the bundle"
    } else {
        "needed by agents"
    };
    let local = ctx.opts.config.regions.iter().any(|r| r.name == region.name && r.local);
    let mut missing = Vec::new();
    for (key, message) in rules::stored_problems(stored, &required, why, local) {
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
        let f = ctx.add("regions", Severity::Error, subject(region, &key), message);
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
    missing
}

/// `--fix`: add the region's `missing` keys from region default's rows (proxy applied), and mark
/// their findings fixed. Whether the rows were added.
async fn add_from_default(
    ctx: &mut Ctx<'_>,
    db: &dyn PlatformDb,
    release: &Release,
    region: &CurrentRegion,
    proxy: &str,
    missing: &[String],
) -> bool {
    let added = db
        .copy_env_from_default(release, region.id, proxy, missing)
        .await
        .map_err(|e| Error::from(e).message);
    match added {
        Ok(()) => {
            for f in ctx
                .findings
                .iter_mut()
                .filter(|f| f.check == "regions" && missing.iter().any(|k| f.subject == subject(region, k)))
            {
                f.fixed = true;
                f.evidence.push(format!(
                    "fixed: the row was added from region default (id {DEFAULT_REGION_ID})"
                ));
            }
            true
        }
        Err(e) => {
            ctx.add(
                "regions",
                Severity::Error,
                subject(region, &missing.join(", ")),
                format!("--fix could not add the keys: {e}"),
            );
            false
        }
    }
}

/// Whether agents can reach the server from here: resolution, then TCP (each host:port once).
async fn probe_server_url(
    ctx: &mut Ctx<'_>,
    region: &CurrentRegion,
    stored: &Stored,
    probed: &mut BTreeSet<(String, u16)>,
) {
    let Some((url, _)) = stored.get("NODE_SERVER_URL") else {
        return;
    };
    let Some((host, port)) = url_host_port(url) else {
        return;
    };
    if !probed.insert((host.clone(), port)) {
        return;
    }
    if let Err(what) = probe(&host, port).await {
        ctx.add(
            "regions",
            Severity::Warning,
            subject(region, "NODE_SERVER_URL"),
            format!("the server URL does not answer from this host: {what}"),
        )
        .evidence(format!("row: NODE_SERVER_URL = {url:?}"))
        .fix(format!(
            "make {host}:{port} reach the server (traefik/web published on it, firewall open); agents report `Could not resolve host` or connect timeouts otherwise. From an agent host: `bkbundle doctor --agent` (the bundle's bin/bkbundle), or curl -v {url}"
        ));
    }
}

/// Regions without their `node_mgmt_cloudregionservice` rows (created by an older bkbundle or by
/// hand): the UI shows them "not deployed" forever, since the health task only updates rows
/// that exist. `--fix` adds them as the server does for a new region.
async fn region_services(ctx: &mut Ctx<'_>, db: &dyn PlatformDb, release: &Release, current: &Current) {
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
            match db.add_region_services(release, region.id, &region.name, &missing).await {
                Ok(()) => {
                    if let Some(f) = ctx.finding_mut(&subject) {
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
enum CacheSource<'c> {
    Database,
    Redis(&'c dyn Cache),
}

impl CacheSource<'_> {
    fn label(&self) -> String {
        match self {
            CacheSource::Database => CACHE_TABLE.to_string(),
            CacheSource::Redis(c) => format!("Redis {}", c.display()),
        }
    }
}

/// The server's cached env of each region (a pickle: base64 of it in Django's database cache,
/// raw in Redis) against the rows: a cached entry that does not hold a row's current value is
/// stale. Both caches are read when known: the database table when the schema has it, Redis from
/// `[database] redis_url` or the stack's .env (through `cache`, when given).
async fn stale_cache(
    ctx: &mut Ctx<'_>,
    db: &dyn PlatformDb,
    release: &Release,
    cache: Option<&dyn Cache>,
    current: &Current,
) {
    let keys: Vec<String> = current.regions.iter().map(|r| cache_key(r.id)).collect();
    // (source, cache key, the pickle)
    let mut cached: Vec<(usize, String, Vec<u8>)> = Vec::new();
    let mut sources = Vec::new();
    if release.cache_table {
        match db.cached_env(&keys).await {
            Ok(entries) => cached.extend(entries.into_iter().map(|(k, blob)| (sources.len(), k, blob))),
            Err(e) => {
                ctx.add(
                    "regions",
                    Severity::Info,
                    CACHE_TABLE,
                    format!("the server's cache was not checked: {e}"),
                );
            }
        }
        sources.push(CacheSource::Database);
    }
    let live: Redis;
    let redis: Option<&dyn Cache> = match (redis_target(ctx), cache) {
        (Some(_), Some(c)) => Some(c),
        (Some(t), None) => {
            live = Redis(t);
            Some(&live)
        }
        (None, _) => None,
    };
    if let Some(redis) = redis {
        match redis.get(&keys, PROBE).await {
            Ok(values) => {
                for (k, v) in keys.iter().zip(values) {
                    if let Some(blob) = v {
                        cached.push((sources.len(), k.clone(), blob));
                    }
                }
                sources.push(CacheSource::Redis(redis));
            }
            Err(e) => {
                ctx.add(
                    "regions",
                    Severity::Warning,
                    format!("Redis {}", redis.display()),
                    format!("the server's Redis cache could not be read: {e}"),
                )
                .fix("check [database] redis_url (or REDIS_PASSWORD/REDIS_PORT of the stack's .env) and that the redis service runs");
            }
        }
    }
    let stale = stale_entries(ctx, current, &sources, cached);
    if ctx.opts.fix {
        clear_stale(ctx, db, &sources, stale).await;
    }
}

/// The Redis the server caches in, when this host can read it; otherwise a finding says why
/// not, when that is worth saying.
fn redis_target(ctx: &mut Ctx<'_>) -> Option<cache::RedisTarget> {
    match crate::site::targets::server_cache(
        &ctx.opts.config.database,
        &ctx.opts.site,
        ctx.server.as_ref().map(|s| &s.env),
    ) {
        ServerCache::Redis { target: Ok(t), .. } => Some(t),
        ServerCache::Redis { from, target: Err(e) } => {
            ctx.add("regions", Severity::Warning, "Redis cache", format!("{from}: {e}"));
            None
        }
        ServerCache::ProcessMemory { from } => {
            ctx.add(
                "regions",
                Severity::Info,
                "server cache",
                format!("the server caches the regions' env in process memory ({from}): it cannot be read or cleared from outside; after changing rows agents get the old values for up to {} s unless the server is restarted", cache::CACHE_SECONDS),
            );
            None
        }
        ServerCache::Unknown => None,
    }
}

/// One finding per cached entry that lacks a row's current value; per source, the regions whose
/// entry is stale.
fn stale_entries(
    ctx: &mut Ctx<'_>,
    current: &Current,
    sources: &[CacheSource<'_>],
    cached: Vec<(usize, String, Vec<u8>)>,
) -> BTreeMap<usize, BTreeSet<i64>> {
    let mut stale: BTreeMap<usize, BTreeSet<i64>> = BTreeMap::new();
    for (source, key, blob) in cached {
        let Some(region) = current.regions.iter().find(|r| cache_key(r.id) == key) else {
            continue;
        };
        let stored = stored_of(current, region.id);
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
    stale
}

/// `--fix`: remove the stale entries from each source, and mark their findings fixed.
async fn clear_stale(
    ctx: &mut Ctx<'_>,
    db: &dyn PlatformDb,
    sources: &[CacheSource<'_>],
    stale: BTreeMap<usize, BTreeSet<i64>>,
) {
    for (source, regions) in stale {
        let label = sources[source].label();
        let removed = match &sources[source] {
            CacheSource::Database => db
                .invalidate_cached_env(&regions)
                .await
                .map(|_| ())
                .map_err(|e| Error::from(e).message),
            CacheSource::Redis(redis) => {
                let keys: Vec<String> = regions.iter().map(|id| cache_key(*id)).collect();
                redis.del(&keys, PROBE).await.map(|_| ())
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

pub(super) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Host and port of an http(s) URL (default ports 80/443).
pub(super) fn url_host_port(url: &str) -> Option<(String, u16)> {
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

#[cfg(test)]
mod tests {
    use super::super::testing::{answering, closed_port, diagnose, healthy_db, no_finding, opts, the};
    use super::super::Severity;
    use crate::platform::release::Release;
    use crate::ports::fakes::{container, FakeCache, FakeDb, FakeDocker};
    use std::collections::BTreeMap;

    fn set(db: &FakeDb, region: i64, key: &str, value: &str) {
        let mut c = db.current.lock().unwrap();
        match c.env.iter_mut().find(|e| e.region_id == region && e.key == key) {
            Some(e) => e.value = value.into(),
            None => panic!("no row {key} in region {region}"),
        }
    }

    fn writes(db: &FakeDb) -> Vec<String> {
        db.writes.lock().unwrap().clone()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_key_is_an_error_and_fix_adds_it_from_region_default() {
        let (_server, url) = answering();
        let mut db = healthy_db(&url);
        db.release.cache_table = true;
        db.current
            .lock()
            .unwrap()
            .env
            .retain(|e| !(e.region_id == 2 && e.key == "NODE_SERVER_URL"));
        let docker = FakeDocker::default();
        let r = diagnose(&opts(), &docker, Some(&db), None, None).await;
        let f = the(&r, "regions", Severity::Error, "region \"east\" (id 2) NODE_SERVER_URL");
        assert_eq!(f.message, "needed by agents and missing");
        assert_eq!(
            f.evidence[0],
            "no row for NODE_SERVER_URL in node_mgmt_sidecarenv with cloud_region_id = 2"
        );
        assert_eq!(
            f.fix.as_deref(),
            Some("bkbundle doctor --fix (adds it from region default)")
        );
        assert!(!f.fixed && writes(&db).is_empty(), "{:?}", writes(&db));

        let mut fix = opts();
        fix.fix = true;
        let r = diagnose(&fix, &docker, Some(&db), None, None).await;
        let f = the(&r, "regions", Severity::Error, "region \"east\" (id 2) NODE_SERVER_URL");
        assert!(f.fixed, "{f:#?}");
        assert_eq!(
            f.evidence.last().map(String::as_str),
            Some("fixed: the row was added from region default (id 1)")
        );
        assert_eq!(
            writes(&db),
            [
                "insert sidecarenv 2/NODE_SERVER_URL from region 1",
                "delete cache entries of regions {2}"
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_null_value_is_an_error_that_fix_leaves_to_the_operator() {
        let (_server, url) = answering();
        let db = healthy_db(&url);
        set(&db, 2, "NODE_SERVER_URL", "null");
        let mut fix = opts();
        fix.fix = true;
        let r = diagnose(&fix, &FakeDocker::default(), Some(&db), None, None).await;
        let f = the(&r, "regions", Severity::Error, "region \"east\" (id 2) NODE_SERVER_URL");
        assert!(
            f.message.starts_with("the stored value: ") && f.message.contains("\"null\""),
            "{f:#?}"
        );
        assert_eq!(f.evidence[0], "row: NODE_SERVER_URL = \"null\"");
        assert!(f.fix.as_deref().unwrap_or("").contains("regions apply"), "{f:#?}");
        assert!(!f.fixed && writes(&db).is_empty(), "{:?}", writes(&db));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_url_that_does_not_answer_is_a_warning() {
        let (_server, url) = answering();
        let db = healthy_db(&url);
        let port = closed_port();
        let closed = format!("http://127.0.0.1:{port}");
        set(&db, 2, "NODE_SERVER_URL", &closed);
        let r = diagnose(&opts(), &FakeDocker::default(), Some(&db), None, None).await;
        let f = the(
            &r,
            "regions",
            Severity::Warning,
            "region \"east\" (id 2) NODE_SERVER_URL",
        );
        assert!(
            f.message.starts_with(&format!(
                "the server URL does not answer from this host: TCP connect to 127.0.0.1:{port}: "
            )),
            "{f:#?}"
        );
        assert_eq!(f.evidence, [format!("row: NODE_SERVER_URL = {closed:?}")]);
        no_finding(&r, "regions", "region \"default\" (id 1) NODE_SERVER_URL");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_service_rows_are_a_warning_and_fix_adds_them() {
        let (_server, url) = answering();
        let db = healthy_db(&url);
        db.current.lock().unwrap().services.clear();
        let r = diagnose(&opts(), &FakeDocker::default(), Some(&db), None, None).await;
        let f = the(&r, "regions", Severity::Warning, "region \"east\" (id 2) services");
        assert_eq!(
            f.evidence,
            ["no node_mgmt_cloudregionservice row named stargazer, nats-executor with cloud_region_id = 2"]
        );
        assert!(!f.fixed);

        let mut fix = opts();
        fix.fix = true;
        let r = diagnose(&fix, &FakeDocker::default(), Some(&db), None, None).await;
        assert!(the(&r, "regions", Severity::Warning, "region \"east\" (id 2) services").fixed);
        assert_eq!(
            writes(&db),
            [
                "insert cloudregionservice east/stargazer",
                "insert cloudregionservice east/nats-executor"
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn region_default_rows_that_differ_from_the_servers_environment_are_warnings() {
        let (_server, url) = answering();
        let key = crate::platform::crypto::SecretKey::from_django("django-key");
        let old = crate::platform::crypto::encrypt(&key, "old-password").unwrap();
        let db = healthy_db(&url);
        db.current
            .lock()
            .unwrap()
            .env
            .push(crate::platform::regions::CurrentEnv {
                id: 99,
                region_id: 1,
                key: "NATS_PASSWORD".into(),
                value: old,
                env_type: "secret".into(),
                is_pre: true,
            });
        let mut docker = FakeDocker {
            containers: vec![container("p", "server", "running", Some("healthy"))],
            ..Default::default()
        };
        docker.env.insert(
            "p-server-1-id".into(),
            BTreeMap::from([
                ("SECRET_KEY".to_string(), "django-key".to_string()),
                (
                    "DEFAULT_ZONE_VAR_NODE_SERVER_URL".to_string(),
                    "http://10.0.0.9:80".to_string(),
                ),
                ("DEFAULT_ZONE_VAR_NATS_PASSWORD".to_string(), "new-password".to_string()),
            ]),
        );
        let r = diagnose(&opts(), &docker, Some(&db), None, None).await;
        let f = the(
            &r,
            "regions",
            Severity::Warning,
            "region \"default\" (id 1) NODE_SERVER_URL",
        );
        assert_eq!(
            f.message,
            format!("the row holds {url:?}, but the server's environment sets \"http://10.0.0.9:80\": at the next server restart the environment wins and rewrites the row")
        );
        assert_eq!(
            f.evidence,
            ["container p-server-1: DEFAULT_ZONE_VAR_NODE_SERVER_URL = \"http://10.0.0.9:80\""]
        );
        let f = the(
            &r,
            "regions",
            Severity::Warning,
            "region \"default\" (id 1) NATS_PASSWORD",
        );
        assert!(
            f.message
                .starts_with("the row holds another secret, but the server's environment sets (secret, not shown)"),
            "{f:#?}"
        );
        assert!(!format!("{:?}", r.findings).contains("new-password"));
        // A server without REDIS_CACHE_URL caches in its own memory.
        let f = the(&r, "regions", Severity::Info, "server cache");
        assert!(f.message.contains("process memory"), "{f:#?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_entry_in_redis_is_a_warning_and_fix_removes_it() {
        let (_server, url) = answering();
        let db = healthy_db(&url);
        let mut o = opts();
        o.site.insert("REDIS_PASSWORD".into(), "pw".into());
        let current = format!("{url} 127.0.0.1:4222 nats");
        let redis = FakeCache::default();
        redis.entries.lock().unwrap().extend([
            (":1:sidecar_env_cache_1".to_string(), current.into_bytes()),
            (":1:sidecar_env_cache_2".to_string(), b"old-pickle".to_vec()),
        ]);
        let r = diagnose(&o, &FakeDocker::default(), Some(&db), None, Some(&redis)).await;
        let label = "Redis redis://fake.invalid:6379/0";
        let f = the(
            &r,
            "regions",
            Severity::Warning,
            &format!("region \"east\" (id 2) cached env in {label}"),
        );
        assert_eq!(
            f.evidence,
            [format!("{label}: \":1:sidecar_env_cache_2\" lacks the current value of NATS_PROTOCOL, NATS_SERVERS, NODE_SERVER_URL")]
        );
        assert!(!f.fixed);
        no_finding(&r, "regions", "region \"default\" (id 1) cached env");

        o.fix = true;
        let r = diagnose(&o, &FakeDocker::default(), Some(&db), None, Some(&redis)).await;
        assert!(the(&r, "regions", Severity::Warning, "cached env in Redis").fixed);
        let left: Vec<String> = redis.entries.lock().unwrap().keys().cloned().collect();
        assert_eq!(left, [":1:sidecar_env_cache_1"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_entry_in_the_database_cache_and_a_redis_that_does_not_answer() {
        let (_server, url) = answering();
        let mut db = healthy_db(&url);
        db.release.cache_table = true;
        db.cache = vec![(":1:sidecar_env_cache_1".into(), b"stale".to_vec())];
        let mut o = opts();
        o.site.insert("REDIS_PASSWORD".into(), "pw".into());
        o.fix = true;
        let redis = FakeCache {
            down: Some("connection refused".into()),
            ..Default::default()
        };
        let r = diagnose(&o, &FakeDocker::default(), Some(&db), None, Some(&redis)).await;
        let f = the(
            &r,
            "regions",
            Severity::Warning,
            "region \"default\" (id 1) cached env in django_cache",
        );
        assert!(f.fixed, "{f:#?}");
        assert_eq!(writes(&db), ["delete cache entries of regions {1}"]);
        let f = the(&r, "regions", Severity::Warning, "Redis redis://fake.invalid:6379/0");
        assert_eq!(
            f.message,
            "the server's Redis cache could not be read: connection refused"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_without_regions_is_an_error() {
        let db = FakeDb::new(Release::newest_known());
        let r = diagnose(&opts(), &FakeDocker::default(), Some(&db), None, None).await;
        let f = the(&r, "regions", Severity::Error, "node_mgmt_cloudregion");
        assert!(f.message.starts_with("no cloud region exists"), "{f:#?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_that_is_down_is_an_error_and_its_checks_are_skipped() {
        let mut db = FakeDb::new(Release::newest_known());
        db.down = Some("connection refused".into());
        let r = diagnose(&opts(), &FakeDocker::default(), Some(&db), None, None).await;
        let f = the(
            &r,
            "regions",
            Severity::Error,
            "database bklite@fake.invalid:5432/bklite",
        );
        assert!(f.message.contains("connection refused"), "{f:#?}");
        let f = the(&r, "packages", Severity::Info, "node_mgmt_packageversion");
        assert_eq!(
            f.message,
            "not checked: the database is not reachable (see the regions finding)"
        );
        assert_eq!(r.release, None);
        assert!(r.has_errors());
    }
}
