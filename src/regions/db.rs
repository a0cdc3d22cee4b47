//! The platform's PostgreSQL: where it is, which schema generation it has, what the regions'
//! rows are now, and the one transaction that makes them what they must be.
//!
//! Reading and diffing are separate from writing: [`diff`] is pure (current rows in, plan out, or
//! every problem found), so the dry run and the real run decide the same way and tests can assert
//! on the plan. Writes happen in one transaction that is rolled back unless every statement
//! succeeded (tokio-postgres rolls back a transaction dropped uncommitted).
//!
//! The column lists written come from the schema found in `information_schema`, not from the
//! generation's name, so a release that added a nullable column still works, and one that added a
//! NOT NULL column bkbundle does not know is refused before anything is written.
//!
//! TLS: none. bkbundle reaches the stack's PostgreSQL on the install host (published on
//! 127.0.0.1 by default); a URL asking for `sslmode=require` fails with tokio-postgres' message.

use super::crypto::{self, SecretKey};
use super::validate::{
    check_stored_region, stored_len, DesiredRegion, EnvType, Problem, Source, DEFAULT_REGION_ID,
    DEFAULT_REGION_INTRODUCTION, DEFAULT_REGION_NAME,
};
use super::RegionsError;
use crate::error::chain;
use crate::install::config::DatabaseConfig;
use crate::install::envfile;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient, NoTls};

pub const REGION_TABLE: &str = "node_mgmt_cloudregion";
pub const ENV_TABLE: &str = "node_mgmt_sidecarenv";
pub const PACKAGE_TABLE: &str = "node_mgmt_packageversion";
pub const CACHE_TABLE: &str = "django_cache";

/// Maintainer columns of rows written by tooling (BKLITE.md: `system`, `domain.com`).
const MAINTAINER: &str = "system";
const DOMAIN: &str = "domain.com";

/// The server caches a region's env under this key (BKLITE.md, Cache), with Django's `:1:`
/// prefix (empty KEY_PREFIX, version 1) in both the database and the Redis cache.
pub fn cache_key(region_id: i64) -> String {
    format!(":1:sidecar_env_cache_{region_id}")
}

// ---------------------------------------------------------------------------------------------
// Where the database is

/// Which database, for messages: never holds the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbName {
    /// `user@host:port/database`
    pub display: String,
    /// Where it came from, e.g. `--database-url`.
    pub source: String,
}

/// A database to connect to.
#[derive(Clone)]
pub struct DbTarget {
    pub config: tokio_postgres::Config,
    pub name: DbName,
}

impl std::fmt::Debug for DbTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DbTarget({} from {})", self.name.display, self.name.source)
    }
}

const PG_VARS: [&str; 5] = ["PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE"];

/// Choose the database: `--database-url`, `DATABASE_URL`, `[database] url` (with `${NAME}` from
/// `site`), the `PG*` variables (when any is set), the stack's `.env` (`POSTGRES_*`, on its
/// `INTERNAL_BIND_IP`, 127.0.0.1 by default). `env` looks a process environment variable up.
pub fn resolve_target(
    cli_url: Option<&str>,
    cfg: &DatabaseConfig,
    site: &BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<DbTarget, RegionsError> {
    if let Some(url) = cli_url.filter(|u| !u.trim().is_empty()) {
        return target_from_url(url, "--database-url");
    }
    if let Some(url) = env("DATABASE_URL").filter(|u| !u.trim().is_empty()) {
        return target_from_url(&url, "DATABASE_URL");
    }
    if let Some(url) = &cfg.url {
        let mut missing = Vec::new();
        let url = envfile::substitute(url, site, &mut missing);
        if !missing.is_empty() {
            return Err(RegionsError::BadDatabaseUrl {
                source_name: "[database] url of the install config".into(),
                message: format!(
                    "its placeholder(s) {} are not set (give them under [env] or pass the stack's .env with --env-file)",
                    missing.iter().map(|m| format!("${{{m}}}")).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        return target_from_url(&url, "[database] url of the install config");
    }
    if PG_VARS.iter().any(|v| env(v).is_some()) {
        let mut c = tokio_postgres::Config::new();
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".into());
        let host = env("PGHOST").unwrap_or_else(|| "localhost".into());
        c.host(&host)
            .user(&user)
            .dbname(env("PGDATABASE").unwrap_or_else(|| user.clone()));
        if let Some(p) = env("PGPORT") {
            let port = p.parse::<u16>().map_err(|_| RegionsError::BadDatabaseUrl {
                source_name: "PGPORT".into(),
                message: format!("expected a port number, found {p:?}"),
            })?;
            c.port(port);
        }
        if let Some(pw) = env("PGPASSWORD") {
            c.password(pw);
        }
        return Ok(finish_target(c, "the PG* environment variables"));
    }
    if let Some(pw) = site.get("POSTGRES_PASSWORD") {
        let mut c = tokio_postgres::Config::new();
        let port = site.get("POSTGRES_PORT").map(String::as_str).unwrap_or("5432");
        let port = port.parse::<u16>().map_err(|_| RegionsError::BadDatabaseUrl {
            source_name: "POSTGRES_PORT of the stack's .env".into(),
            message: format!("expected a port number, found {port:?}"),
        })?;
        c.host(stack_host(site))
            .port(port)
            .user(site.get("POSTGRES_USER").map(String::as_str).unwrap_or("postgres"))
            .dbname(site.get("POSTGRES_DB").map(String::as_str).unwrap_or("postgres"))
            .password(pw.as_str());
        return Ok(finish_target(
            c,
            "the stack's .env (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_PORT, POSTGRES_DB, INTERNAL_BIND_IP)",
        ));
    }
    Err(RegionsError::NoDatabase)
}

/// Where the stack publishes its internal services on this host: `INTERNAL_BIND_IP` of its .env,
/// or 127.0.0.1 when it is unset or a wildcard address.
pub fn stack_host(site: &BTreeMap<String, String>) -> &str {
    match site.get("INTERNAL_BIND_IP").map(|s| s.trim()) {
        Some(ip) if !ip.is_empty() && ip != "0.0.0.0" && ip != "::" && ip != "[::]" => ip,
        _ => "127.0.0.1",
    }
}

fn target_from_url(url: &str, source: &str) -> Result<DbTarget, RegionsError> {
    let c = tokio_postgres::Config::from_str(url.trim()).map_err(|e| RegionsError::BadDatabaseUrl {
        source_name: source.into(),
        message: format!("it is not a PostgreSQL URL ({e}); expected postgres://user:password@host:port/database"),
    })?;
    Ok(finish_target(c, source))
}

fn finish_target(mut c: tokio_postgres::Config, source: &str) -> DbTarget {
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(Duration::from_secs(10));
    }
    c.application_name("bkbundle");
    let host = match c.get_hosts().first() {
        Some(Host::Tcp(h)) if h.contains(':') => format!("[{h}]"),
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let user = c.get_user().unwrap_or("(no user)").to_string();
    let db = c.get_dbname().unwrap_or(&user).to_string();
    DbTarget {
        name: DbName {
            display: format!("{user}@{host}:{port}/{db}"),
            source: source.into(),
        },
        config: c,
    }
}

/// Connect, telling "not there" from "refused".
pub async fn connect(t: &DbTarget) -> Result<Client, RegionsError> {
    let (client, connection) = t.config.connect(NoTls).await.map_err(|e| classify_connect(t, &e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("database connection ended: {e}");
        }
    });
    Ok(client)
}

fn classify_connect(t: &DbTarget, e: &tokio_postgres::Error) -> RegionsError {
    let user = t.config.get_user().unwrap_or("(no user)").to_string();
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            || *code == SqlState::INVALID_CATALOG_NAME
            || code.code().starts_with("28")
        {
            return RegionsError::Refused {
                db: t.name.clone(),
                user,
                message: db.message().to_string(),
            };
        }
    }
    let text = chain(e);
    if text.contains("password missing") || text.starts_with("authentication error") {
        return RegionsError::Refused {
            db: t.name.clone(),
            user,
            message: text,
        };
    }
    RegionsError::Unreachable {
        db: t.name.clone(),
        message: text,
    }
}

fn db_err(t: &DbTarget, what: &str, e: tokio_postgres::Error) -> RegionsError {
    let message = match e.as_db_error() {
        Some(db) => format!(
            "{}{}",
            db.message(),
            db.detail().map(|d| format!(" ({d})")).unwrap_or_default()
        ),
        None => chain(&e),
    };
    RegionsError::Database {
        db: t.name.clone(),
        what: what.into(),
        message,
    }
}

// ---------------------------------------------------------------------------------------------
// Which schema

/// The two schema generations in the field (BKLITE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Generation {
    /// Releases up to early 2026.
    #[serde(rename = "2025")]
    Y2025,
    /// Releases after the arch-aware package change (April 2026).
    #[serde(rename = "2026")]
    Y2026,
}

impl Generation {
    pub fn as_str(self) -> &'static str {
        match self {
            Generation::Y2025 => "2025",
            Generation::Y2026 => "2026",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub nullable: bool,
    pub has_default: bool,
    pub max_len: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    pub generation: Generation,
    pub region_columns: BTreeMap<String, Column>,
    pub env_columns: BTreeMap<String, Column>,
    pub cache_table: bool,
}

const REGION_COLUMNS: [&str; 10] = [
    "id",
    "name",
    "introduction",
    "proxy_address",
    "created_at",
    "updated_at",
    "created_by",
    "updated_by",
    "domain",
    "updated_by_domain",
];
const REGION_COLUMNS_2026: [&str; 2] = ["pending_proxy_address", "pending_proxy_address_created_at"];
const ENV_COLUMNS: [&str; 7] = ["id", "key", "value", "type", "description", "cloud_region_id", "is_pre"];

impl Schema {
    /// The longest value the `value` column takes (old 2025 releases: varchar(200)).
    pub fn env_value_max(&self) -> Option<usize> {
        self.env_columns
            .get("value")
            .and_then(|c| c.max_len)
            .map(|n| n.max(0) as usize)
    }
}

/// Read the columns of the tables bkbundle writes from `information_schema` (the current schema,
/// `public` for Django) and decide the generation.
pub async fn detect_schema(client: &impl GenericClient, t: &DbTarget) -> Result<Schema, RegionsError> {
    let rows = client
        .query(
            "SELECT table_name::text, column_name::text, is_nullable::text = 'YES', \
             (column_default IS NOT NULL OR is_identity::text = 'YES' OR is_generated::text <> 'NEVER'), \
             character_maximum_length::int \
             FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name::text = ANY($1::text[])",
            &[&vec![REGION_TABLE, ENV_TABLE, PACKAGE_TABLE, CACHE_TABLE]],
        )
        .await
        .map_err(|e| db_err(t, "reading information_schema.columns", e))?;
    let mut tables: BTreeMap<String, BTreeMap<String, Column>> = BTreeMap::new();
    for r in rows {
        tables.entry(r.get(0)).or_default().insert(
            r.get(1),
            Column {
                nullable: r.get(2),
                has_default: r.get(3),
                max_len: r.get(4),
            },
        );
    }
    schema_from_columns(tables).map_err(|e| match e {
        SchemaProblem::NotMigrated(detail) => RegionsError::NotMigrated {
            db: t.name.clone(),
            detail,
        },
        SchemaProblem::Unknown(detail) => RegionsError::UnknownSchema {
            db: t.name.clone(),
            detail,
        },
    })
}

#[derive(Debug, PartialEq, Eq)]
pub enum SchemaProblem {
    NotMigrated(String),
    Unknown(String),
}

/// The pure half of [`detect_schema`].
pub fn schema_from_columns(mut tables: BTreeMap<String, BTreeMap<String, Column>>) -> Result<Schema, SchemaProblem> {
    let missing: Vec<&str> = [REGION_TABLE, ENV_TABLE, PACKAGE_TABLE]
        .into_iter()
        .filter(|t| !tables.contains_key(*t))
        .collect();
    if !missing.is_empty() {
        return Err(SchemaProblem::NotMigrated(format!(
            "table(s) {} do not exist",
            missing.join(", ")
        )));
    }
    let region = tables.remove(REGION_TABLE).unwrap_or_default();
    let env = tables.remove(ENV_TABLE).unwrap_or_default();
    let package = tables.remove(PACKAGE_TABLE).unwrap_or_default();
    let mut lacking = Vec::new();
    for c in REGION_COLUMNS.iter().filter(|c| !region.contains_key(**c)) {
        lacking.push(format!("{REGION_TABLE}.{c}"));
    }
    for c in ENV_COLUMNS.iter().filter(|c| !env.contains_key(**c)) {
        lacking.push(format!("{ENV_TABLE}.{c}"));
    }
    if !lacking.is_empty() {
        return Err(SchemaProblem::NotMigrated(format!(
            "column(s) {} do not exist (an older release, or migrations still running)",
            lacking.join(", ")
        )));
    }
    let has_pending = REGION_COLUMNS_2026.iter().all(|c| region.contains_key(*c));
    let has_arch = package.contains_key("cpu_architecture");
    let generation = match (has_pending, has_arch) {
        (true, true) => Generation::Y2026,
        (false, false) => Generation::Y2025,
        (p, a) => {
            return Err(SchemaProblem::NotMigrated(format!(
                "the schema is between generations: {REGION_TABLE}.pending_proxy_address {} but {PACKAGE_TABLE}.cpu_architecture {} (migrations still running?)",
                if p { "exists" } else { "is missing" },
                if a { "exists" } else { "is missing" }
            )))
        }
    };
    // Every NOT NULL column without a default must be one bkbundle supplies.
    let mut unknown = Vec::new();
    for (table, cols, known) in [
        (REGION_TABLE, &region, &REGION_COLUMNS[..]),
        (ENV_TABLE, &env, &ENV_COLUMNS[..]),
    ] {
        for (name, c) in cols.iter() {
            if !c.nullable && !c.has_default && !known.contains(&name.as_str()) {
                unknown.push(format!("{table}.{name}"));
            }
        }
    }
    if !unknown.is_empty() {
        return Err(SchemaProblem::Unknown(format!(
            "NOT NULL column(s) {} without a default are unknown to this bkbundle (a newer server release)",
            unknown.join(", ")
        )));
    }
    Ok(Schema {
        generation,
        region_columns: region,
        env_columns: env,
        cache_table: tables.contains_key(CACHE_TABLE),
    })
}

// ---------------------------------------------------------------------------------------------
// What is there, and what to change

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentRegion {
    pub id: i64,
    pub name: String,
    pub introduction: String,
    pub proxy_address: String,
}

#[derive(Clone, PartialEq, Eq)]
pub struct CurrentEnv {
    pub id: i64,
    pub region_id: i64,
    pub key: String,
    pub value: String,
    pub env_type: String,
}

impl std::fmt::Debug for CurrentEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CurrentEnv({} {} {} in region {})",
            self.id, self.key, self.env_type, self.region_id
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Current {
    pub regions: Vec<CurrentRegion>,
    pub env: Vec<CurrentEnv>,
}

/// Read every region and every env row. Both tables are small (a region per site or network
/// segment, a few dozen keys each), and regions the install config does not declare are checked
/// too: a region created in the UI without `NODE_SERVER_URL` is the field failure.
pub async fn read_current(client: &impl GenericClient, t: &DbTarget) -> Result<Current, RegionsError> {
    let rows = client
        .query(
            &format!(
                "SELECT id::bigint, name::text, introduction::text, proxy_address::text FROM {REGION_TABLE} ORDER BY id"
            ),
            &[],
        )
        .await
        .map_err(|e| db_err(t, &format!("reading {REGION_TABLE}"), e))?;
    let regions: Vec<CurrentRegion> = rows
        .iter()
        .map(|r| CurrentRegion {
            id: r.get(0),
            name: r.get(1),
            introduction: r.get(2),
            proxy_address: r.get(3),
        })
        .collect();
    let rows = client
        .query(
            &format!(
                "SELECT id::bigint, cloud_region_id::bigint, key::text, value::text, type::text FROM {ENV_TABLE} ORDER BY id"
            ),
            &[],
        )
        .await
        .map_err(|e| db_err(t, &format!("reading {ENV_TABLE}"), e))?;
    let env = rows
        .iter()
        .map(|r| CurrentEnv {
            id: r.get(0),
            region_id: r.get(1),
            key: r.get(2),
            value: r.get(3),
            env_type: r.get(4),
        })
        .collect();
    Ok(Current { regions, env })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    Unchanged,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Unchanged => "unchanged",
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct PlannedKey {
    pub key: String,
    pub env_type: EnvType,
    pub source: Source,
    pub action: Action,
    /// The row to update.
    pub row_id: Option<i64>,
    /// The plaintext to store (encrypted on write when secret).
    pub value: String,
    /// The stored value before, for non-secret updates (reports show old → new).
    pub old_value: Option<String>,
    /// The stored type before, when it changes.
    pub old_type: Option<String>,
}

impl std::fmt::Debug for PlannedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PlannedKey({} {} {:?})",
            self.key,
            self.env_type.as_str(),
            self.action
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRegion {
    pub name: String,
    pub id: Option<i64>,
    pub action: Action,
    pub introduction: String,
    pub proxy_address: String,
    pub local: bool,
    pub keys: Vec<PlannedKey>,
}

impl PlannedRegion {
    pub fn env_changes(&self) -> bool {
        self.keys.iter().any(|k| k.action != Action::Unchanged)
    }
}

/// Decide every region's and key's action; secrets are compared by decrypting what is stored.
/// Problems (a stored secret that does not decrypt, a value longer than the column, a `default`
/// region that is not id 1, a region in the database but not in `desired` whose stored env would
/// break agents) are all returned together. `required` are the bundle's required keys.
pub fn diff(
    desired: &[DesiredRegion],
    current: &Current,
    schema: &Schema,
    key: Option<&SecretKey>,
    required: &[String],
) -> Result<Vec<PlannedRegion>, Vec<Problem>> {
    let mut problems = Vec::new();
    for r in unmanaged(desired, current) {
        let stored: BTreeMap<String, (String, Option<EnvType>)> = current
            .env
            .iter()
            .filter(|e| e.region_id == r.id)
            .map(|e| (e.key.clone(), (e.value.clone(), EnvType::parse(&e.env_type))))
            .collect();
        problems.extend(check_stored_region(&r.name, r.id, &stored, required));
    }
    let mut plan = Vec::new();
    let value_max = schema.env_value_max();
    for d in desired {
        let existing = if d.is_default() {
            if let Some(other) = current
                .regions
                .iter()
                .find(|r| r.name == DEFAULT_REGION_NAME && r.id != DEFAULT_REGION_ID)
            {
                problems.push(Problem {
                    region: d.name.clone(),
                    key: None,
                    message: format!(
                        "a region named \"default\" exists with id {}, but the server's default region is id 1: rename or remove that region in the UI first",
                        other.id
                    ),
                });
            }
            current.regions.iter().find(|r| r.id == DEFAULT_REGION_ID)
        } else {
            current.regions.iter().find(|r| r.name == d.name)
        };
        let (action, introduction, proxy_address) = match existing {
            None if d.is_default() => (Action::Create, DEFAULT_REGION_INTRODUCTION.to_string(), String::new()),
            None => (
                Action::Create,
                d.introduction.clone().unwrap_or_default(),
                d.proxy_address.clone().unwrap_or_default(),
            ),
            // Region 1 keeps what the server gave it: the server resets it at every start.
            Some(r) if d.is_default() => (Action::Unchanged, r.introduction.clone(), r.proxy_address.clone()),
            Some(r) => {
                let intro = d.introduction.clone().unwrap_or_else(|| r.introduction.clone());
                let proxy = d.proxy_address.clone().unwrap_or_else(|| r.proxy_address.clone());
                let action = if intro != r.introduction || proxy != r.proxy_address {
                    Action::Update
                } else {
                    Action::Unchanged
                };
                (action, intro, proxy)
            }
        };
        for (what, v, col) in [
            ("name", &d.name, "name"),
            ("proxy_address", &proxy_address, "proxy_address"),
        ] {
            if let Some(max) = schema.region_columns.get(col).and_then(|c| c.max_len) {
                if v.chars().count() > max.max(0) as usize {
                    problems.push(Problem {
                        region: d.name.clone(),
                        key: None,
                        message: format!("the {what} is longer than the {max} characters {REGION_TABLE}.{col} takes"),
                    });
                }
            }
        }
        let region_id = existing.map(|r| r.id);
        let mut keys = Vec::new();
        for (k, v) in &d.env {
            let row = region_id.and_then(|id| current.env.iter().find(|e| e.region_id == id && e.key == *k));
            let mut pk = PlannedKey {
                key: k.clone(),
                env_type: v.env_type,
                source: v.source,
                action: Action::Create,
                row_id: row.map(|r| r.id),
                value: v.value.clone(),
                old_value: None,
                old_type: None,
            };
            if let Some(row) = row {
                let stored_type = EnvType::parse(&row.env_type);
                let same_value = match (stored_type, v.env_type) {
                    (Some(EnvType::Secret), EnvType::Secret) => match key.map(|key| crypto::decrypt(key, &row.value)) {
                        Some(Ok(plain)) => plain == v.value,
                        Some(Err(e)) => {
                            problems.push(Problem {
                                region: d.name.clone(),
                                key: Some(k.clone()),
                                message: format!(
                                    "the stored secret (row id {}) cannot be compared: {e}; expected the SECRET_KEY the server runs with",
                                    row.id
                                ),
                            });
                            false
                        }
                        None => false,
                    },
                    (Some(EnvType::Secret), _) => false,
                    _ => row.value == v.value,
                };
                pk.action = if same_value && stored_type == Some(v.env_type) {
                    Action::Unchanged
                } else {
                    Action::Update
                };
                if pk.action == Action::Update {
                    if stored_type != Some(EnvType::Secret) && v.env_type != EnvType::Secret {
                        pk.old_value = Some(row.value.clone());
                    }
                    if stored_type != Some(v.env_type) {
                        pk.old_type = Some(row.env_type.clone());
                    }
                }
            }
            if pk.action != Action::Unchanged {
                if let Some(max) = value_max {
                    let len = stored_len(v);
                    if len > max {
                        problems.push(Problem {
                            region: d.name.clone(),
                            key: Some(k.clone()),
                            message: format!(
                                "the value is {len} characters{} but {ENV_TABLE}.value takes at most {max} in this (old 2025) schema; expected a shorter value, or upgrade the server",
                                if v.env_type == EnvType::Secret { " once encrypted" } else { "" }
                            ),
                        });
                    }
                }
            }
            keys.push(pk);
        }
        plan.push(PlannedRegion {
            name: d.name.clone(),
            id: region_id,
            action,
            introduction,
            proxy_address,
            local: d.local,
            keys,
        });
    }
    if problems.is_empty() {
        Ok(plan)
    } else {
        Err(problems)
    }
}

/// Regions in the database that `desired` does not name (region 1 is always desired).
pub fn unmanaged<'a>(desired: &[DesiredRegion], current: &'a Current) -> Vec<&'a CurrentRegion> {
    current
        .regions
        .iter()
        .filter(|r| r.id != DEFAULT_REGION_ID && !desired.iter().any(|d| d.name == r.name))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Writing

/// The region columns bkbundle writes, with their SQL values (`$n` parameters for the variable
/// ones). The 2026 nullable columns are written as NULL explicitly, as the server leaves them.
fn region_insert(schema: &Schema, explicit_id: bool) -> String {
    let mut cols: Vec<&str> = Vec::new();
    let mut vals: Vec<String> = Vec::new();
    if explicit_id {
        cols.push("id");
        vals.push(DEFAULT_REGION_ID.to_string());
    }
    for (c, v) in [
        ("name", "$1::text".to_string()),
        ("introduction", "$2::text".to_string()),
        ("proxy_address", "$3::text".to_string()),
        ("created_at", "now()".to_string()),
        ("updated_at", "now()".to_string()),
        ("created_by", format!("'{MAINTAINER}'")),
        ("updated_by", format!("'{MAINTAINER}'")),
        ("domain", format!("'{DOMAIN}'")),
        ("updated_by_domain", format!("'{DOMAIN}'")),
    ] {
        cols.push(c);
        vals.push(v);
    }
    for c in REGION_COLUMNS_2026 {
        if schema.region_columns.contains_key(c) {
            cols.push(c);
            vals.push("NULL".into());
        }
    }
    let conflict = if explicit_id {
        "ON CONFLICT DO NOTHING"
    } else {
        "ON CONFLICT (name) DO NOTHING"
    };
    format!(
        "INSERT INTO {REGION_TABLE} ({}) VALUES ({}) {conflict} RETURNING id::bigint",
        cols.join(", "),
        vals.join(", ")
    )
}

/// Move the region id sequence past every id in use (the default region is inserted with an
/// explicit id, which leaves an identity sequence behind), never backwards.
async fn advance_sequence(client: &impl GenericClient, t: &DbTarget, table: &str) -> Result<(), RegionsError> {
    client
        .query_opt(
            &format!(
                "SELECT setval(s.seq, GREATEST((SELECT COALESCE(max(id), 0) FROM {table}), \
                 COALESCE(pg_sequence_last_value(s.seq::regclass), 0), 1)) \
                 FROM (SELECT pg_get_serial_sequence('{table}', 'id') AS seq) s WHERE s.seq IS NOT NULL"
            ),
            &[],
        )
        .await
        .map_err(|e| db_err(t, &format!("advancing the id sequence of {table}"), e))?;
    Ok(())
}

/// Apply the plan in the caller's transaction; returns the plan with every region's id filled.
pub async fn execute(
    tx: &impl GenericClient,
    t: &DbTarget,
    schema: &Schema,
    plan: &mut [PlannedRegion],
    key: Option<&SecretKey>,
) -> Result<(), RegionsError> {
    let creates_regions = plan.iter().any(|r| r.action == Action::Create);
    // The default region first, with its explicit id.
    if let Some(def) = plan
        .iter_mut()
        .find(|r| r.name == DEFAULT_REGION_NAME && r.action == Action::Create)
    {
        tx.query_opt(
            &region_insert(schema, true),
            &[&DEFAULT_REGION_NAME, &DEFAULT_REGION_INTRODUCTION, &""],
        )
        .await
        .map_err(|e| db_err(t, "creating the default region (id 1)", e))?;
        def.id = Some(DEFAULT_REGION_ID);
    }
    if creates_regions {
        advance_sequence(tx, t, REGION_TABLE).await?;
    }
    for r in plan.iter_mut() {
        match (r.action, r.id) {
            (Action::Create, None) => {
                let row = tx
                    .query_opt(
                        &region_insert(schema, false),
                        &[&r.name, &r.introduction, &r.proxy_address],
                    )
                    .await
                    .map_err(|e| db_err(t, &format!("creating region {:?}", r.name), e))?;
                let id: i64 = match row {
                    Some(row) => row.get(0),
                    // Created meanwhile by someone else (the UI): use that one.
                    None => tx
                        .query_one(
                            &format!("SELECT id::bigint FROM {REGION_TABLE} WHERE name = $1::text"),
                            &[&r.name],
                        )
                        .await
                        .map_err(|e| db_err(t, &format!("finding region {:?}", r.name), e))?
                        .get(0),
                };
                r.id = Some(id);
            }
            (Action::Update, Some(id)) => {
                tx.execute(
                    &format!(
                        "UPDATE {REGION_TABLE} SET introduction = $2::text, proxy_address = $3::text, updated_at = now(), \
                         updated_by = '{MAINTAINER}', updated_by_domain = '{DOMAIN}' WHERE id = $1::bigint"
                    ),
                    &[&id, &r.introduction, &r.proxy_address],
                )
                .await
                .map_err(|e| db_err(t, &format!("updating region {:?} (id {id})", r.name), e))?;
            }
            _ => {}
        }
    }
    if plan.iter().any(|r| r.keys.iter().any(|k| k.action == Action::Create)) {
        advance_sequence(tx, t, ENV_TABLE).await?;
    }
    for r in plan.iter() {
        let Some(region_id) = r.id else {
            return Err(RegionsError::Internal(format!(
                "region {:?} has no id after creation",
                r.name
            )));
        };
        for k in r.keys.iter().filter(|k| k.action != Action::Unchanged) {
            let stored = match k.env_type {
                EnvType::Secret => {
                    let key =
                        key.ok_or_else(|| RegionsError::Internal(format!("no SECRET_KEY to encrypt {} with", k.key)))?;
                    crypto::encrypt(key, &k.value)
                        .map_err(|e| RegionsError::Internal(format!("cannot read /dev/urandom for an IV: {e}")))?
                }
                _ => k.value.clone(),
            };
            let what = format!("writing {} of region {:?}", k.key, r.name);
            match k.row_id {
                Some(id) => tx
                    .execute(
                        &format!("UPDATE {ENV_TABLE} SET value = $2::text, type = $3::text WHERE id = $1::bigint"),
                        &[&id, &stored, &k.env_type.as_str()],
                    )
                    .await
                    .map_err(|e| db_err(t, &what, e))?,
                None => tx
                    .execute(
                        &format!(
                            "INSERT INTO {ENV_TABLE} (key, value, type, description, cloud_region_id, is_pre) \
                             VALUES ($1::text, $2::text, $3::text, '', $4::bigint, true) \
                             ON CONFLICT (key, cloud_region_id) DO UPDATE SET value = EXCLUDED.value, type = EXCLUDED.type"
                        ),
                        &[&k.key, &stored, &k.env_type.as_str(), &region_id],
                    )
                    .await
                    .map_err(|e| db_err(t, &what, e))?,
            };
        }
    }
    Ok(())
}

/// Remove the server's cached env of `region_ids` from the database cache table; returns how
/// many entries were there.
pub async fn invalidate_db_cache(
    client: &Client,
    t: &DbTarget,
    region_ids: &BTreeSet<i64>,
) -> Result<u64, RegionsError> {
    let keys: Vec<String> = region_ids.iter().map(|id| cache_key(*id)).collect();
    client
        .execute(
            &format!("DELETE FROM {CACHE_TABLE} WHERE cache_key = ANY($1::text[])"),
            &[&keys],
        )
        .await
        .map_err(|e| db_err(t, &format!("removing cached env from {CACHE_TABLE}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regions::validate::DesiredValue;

    fn col(nullable: bool, has_default: bool, max_len: Option<i32>) -> Column {
        Column {
            nullable,
            has_default,
            max_len,
        }
    }

    fn tables(gen2026: bool) -> BTreeMap<String, BTreeMap<String, Column>> {
        let mut region: BTreeMap<String, Column> = REGION_COLUMNS
            .iter()
            .map(|c| (c.to_string(), col(false, *c == "id", None)))
            .collect();
        let mut package = BTreeMap::from([("id".to_string(), col(false, true, None))]);
        if gen2026 {
            for c in REGION_COLUMNS_2026 {
                region.insert(c.into(), col(true, false, None));
            }
            package.insert("cpu_architecture".into(), col(false, false, Some(20)));
        }
        let env = ENV_COLUMNS
            .iter()
            .map(|c| (c.to_string(), col(false, *c == "id", (*c == "value").then_some(200))))
            .collect();
        BTreeMap::from([
            (REGION_TABLE.to_string(), region),
            (ENV_TABLE.to_string(), env),
            (PACKAGE_TABLE.to_string(), package),
        ])
    }

    #[test]
    fn generations_and_not_migrated() {
        let s = schema_from_columns(tables(false)).unwrap();
        assert_eq!(s.generation, Generation::Y2025);
        assert_eq!(s.env_value_max(), Some(200));
        assert!(!s.cache_table);
        let mut t = tables(true);
        t.insert(CACHE_TABLE.into(), BTreeMap::new());
        let s = schema_from_columns(t).unwrap();
        assert_eq!(s.generation, Generation::Y2026);
        assert!(s.cache_table);
        assert!(region_insert(&s, true).contains("pending_proxy_address_created_at"));

        let mut t = tables(true);
        t.remove(ENV_TABLE);
        assert!(matches!(schema_from_columns(t), Err(SchemaProblem::NotMigrated(m)) if m.contains(ENV_TABLE)));
        let mut t = tables(true);
        t.get_mut(PACKAGE_TABLE).unwrap().remove("cpu_architecture");
        assert!(
            matches!(schema_from_columns(t), Err(SchemaProblem::NotMigrated(m)) if m.contains("between generations"))
        );
        let mut t = tables(false);
        t.get_mut(REGION_TABLE)
            .unwrap()
            .insert("colour".into(), col(false, false, None));
        assert!(
            matches!(schema_from_columns(t), Err(SchemaProblem::Unknown(m)) if m.contains("node_mgmt_cloudregion.colour"))
        );
    }

    fn desired_region(name: &str, env: &[(&str, &str)]) -> DesiredRegion {
        DesiredRegion {
            name: name.into(),
            introduction: None,
            proxy_address: None,
            local: false,
            env: env
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        DesiredValue {
                            value: v.to_string(),
                            env_type: EnvType::for_key(k),
                            source: Source::Own,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn diff_compares_secrets_by_decrypting() {
        let schema = schema_from_columns(tables(false)).unwrap();
        let key = SecretKey::from_django("k");
        let d = vec![
            desired_region(
                "default",
                &[
                    ("NATS_PASSWORD", "pw"),
                    ("NATS_PROTOCOL", "nats"),
                    ("A_URL", "http://a"),
                ],
            ),
            desired_region("east", &[("NATS_PASSWORD", "pw")]),
        ];
        let current = Current {
            regions: vec![CurrentRegion {
                id: 1,
                name: "default".into(),
                introduction: DEFAULT_REGION_INTRODUCTION.into(),
                proxy_address: String::new(),
            }],
            env: vec![
                CurrentEnv {
                    id: 10,
                    region_id: 1,
                    key: "NATS_PASSWORD".into(),
                    value: crypto::encrypt(&key, "pw").unwrap(),
                    env_type: "secret".into(),
                },
                CurrentEnv {
                    id: 11,
                    region_id: 1,
                    key: "NATS_PROTOCOL".into(),
                    value: "tls".into(),
                    env_type: "str".into(),
                },
            ],
        };
        let plan = diff(&d, &current, &schema, Some(&key), &[]).unwrap();
        let def = &plan[0];
        assert_eq!(def.action, Action::Unchanged);
        let by = |k: &str| def.keys.iter().find(|p| p.key == k).unwrap();
        assert_eq!(
            by("NATS_PASSWORD").action,
            Action::Unchanged,
            "same plaintext, other IV"
        );
        assert_eq!(by("NATS_PROTOCOL").action, Action::Update);
        assert_eq!(by("NATS_PROTOCOL").old_value.as_deref(), Some("tls"));
        assert_eq!(by("A_URL").action, Action::Create);
        assert_eq!(plan[1].action, Action::Create);
        assert_eq!(plan[1].id, None);

        // With another key the stored secret is a problem, not an overwrite.
        let p = diff(&d, &current, &schema, Some(&SecretKey::from_django("other")), &[]).unwrap_err();
        assert_eq!(p.len(), 1);
        assert!(p[0]
            .to_string()
            .contains("region \"default\", NATS_PASSWORD: the stored secret (row id 10)"));

        // A value too long for the old varchar(200).
        let long = "x".repeat(201);
        let d2 = vec![desired_region("default", &[("STARGAZER_URL", &long)])];
        let p = diff(&d2, &current, &schema, Some(&key), &[]).unwrap_err();
        assert!(p[0].message.contains("at most 200"), "{p:?}");

        // A region in the database but not in the config is checked, not seeded.
        let mut with_east = current.clone();
        with_east.regions.push(CurrentRegion {
            id: 2,
            name: "east".into(),
            introduction: String::new(),
            proxy_address: String::new(),
        });
        with_east.env.push(CurrentEnv {
            id: 12,
            region_id: 2,
            key: "NATS_PROTOCOL".into(),
            value: "nats".into(),
            env_type: "str".into(),
        });
        let d3 = vec![desired_region("default", &[("NATS_PROTOCOL", "tls")])];
        let p = diff(&d3, &with_east, &schema, Some(&key), &["NODE_SERVER_URL".to_string()]).unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].to_string()
                .starts_with("region \"east\", NODE_SERVER_URL: required by the bundle and missing"),
            "{}",
            p[0]
        );
    }
}
