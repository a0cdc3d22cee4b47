//! The cloud regions' rows in the platform database: what is there ([`read_current`]), what must
//! change ([`diff`], pure: current rows in, plan out, or every problem found, so the dry run and
//! the real run decide the same way), and the writes ([`execute`], in the caller's transaction,
//! which is rolled back unless every statement succeeded).
//!
//! Every column list comes from the [`Release`] found in the database: a region bkbundle creates
//! looks like one the server of that release creates (BKLITE.md, "A new region"): env rows with
//! `is_pre = false` (region 1's are the server's own, `is_pre = true`), a `PROXY_ADDRESS` row
//! (from the region rules), and its two `node_mgmt_cloudregionservice` rows where that table
//! exists.

use super::crypto::{self, SecretKey};
use super::db::{db_err, DbError, DbTarget};
use super::release::{Release, CACHE_TABLE, ENV_TABLE, REGION_TABLE, SERVICE_TABLE};
use super::rules::{
    check_stored_region, replace_host, stored_len, DesiredRegion, DesiredValue, EnvType, Problem, Source,
    DEFAULT_REGION_ID, DEFAULT_REGION_INTRODUCTION, DEFAULT_REGION_NAME, PROXIED_KEYS,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use tokio_postgres::GenericClient;

/// Maintainer columns of rows written by tooling (BKLITE.md: `system`, `domain.com`).
const MAINTAINER: &str = "system";
const DOMAIN: &str = "domain.com";

/// The services the platform tracks per region (`node_mgmt_cloudregionservice.name`).
pub const REGION_SERVICES: [&str; 2] = ["stargazer", "nats-executor"];

/// The server caches a region's env under this key (BKLITE.md, Cache), with Django's `:1:`
/// prefix (empty KEY_PREFIX, version 1) in both the database and the Redis cache.
pub fn cache_key(region_id: i64) -> String {
    format!(":1:sidecar_env_cache_{region_id}")
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
    pub is_pre: bool,
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
    /// `(region id, service name)` of the `node_mgmt_cloudregionservice` rows (none when the
    /// release has no such table).
    pub services: BTreeSet<(i64, String)>,
}

impl Current {
    /// The services of [`REGION_SERVICES`] region `id` has no row for (always none on a release
    /// without the table).
    pub fn missing_services(&self, release: &Release, id: i64) -> Vec<&'static str> {
        if !release.has_region_services() {
            return Vec::new();
        }
        REGION_SERVICES
            .into_iter()
            .filter(|n| !self.services.contains(&(id, n.to_string())))
            .collect()
    }
}

/// Read every region and every env row. Both tables are small (a region per site or network
/// segment, a few dozen keys each), and regions the install config does not declare are checked
/// too: a region created in the UI without `NODE_SERVER_URL` is the field failure.
pub async fn read_current(client: &impl GenericClient, t: &DbTarget, release: &Release) -> Result<Current, DbError> {
    // Releases before 0027 have no proxy_address: such a region has none.
    let proxy = if release.has_proxy_address() {
        "proxy_address::text"
    } else {
        "''::text"
    };
    let rows = client
        .query(
            &format!("SELECT id::bigint, name::text, introduction::text, {proxy} FROM {REGION_TABLE} ORDER BY id"),
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
                "SELECT id::bigint, cloud_region_id::bigint, key::text, value::text, type::text, is_pre FROM {ENV_TABLE} ORDER BY id"
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
            is_pre: r.get(5),
        })
        .collect();
    let mut services = BTreeSet::new();
    if release.has_region_services() {
        let rows = client
            .query(
                &format!("SELECT cloud_region_id::bigint, name::text FROM {SERVICE_TABLE}"),
                &[],
            )
            .await
            .map_err(|e| db_err(t, &format!("reading {SERVICE_TABLE}"), e))?;
        services.extend(rows.iter().map(|r| (r.get(0), r.get(1))));
    }
    Ok(Current { regions, env, services })
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
    /// The `node_mgmt_cloudregionservice` rows to add (names of [`REGION_SERVICES`]).
    pub services: Vec<&'static str>,
}

impl PlannedRegion {
    pub fn env_changes(&self) -> bool {
        self.keys.iter().any(|k| k.action != Action::Unchanged)
    }
    /// Whether anything of this region is written: the region row, an env row or a service row.
    pub fn changes(&self) -> bool {
        self.action != Action::Unchanged || self.env_changes() || !self.services.is_empty()
    }
}

/// Decide every region's and key's action; secrets are compared by decrypting what is stored.
/// Problems (a stored secret that does not decrypt, a value longer than the column, a `default`
/// region that is not id 1, a region in the database but not in `desired` whose stored env would
/// break agents) are all returned together. `required` are the bundle's required keys.
pub fn diff(
    desired: &[DesiredRegion],
    current: &Current,
    release: &Release,
    key: Option<&SecretKey>,
    required: &[String],
) -> Result<Vec<PlannedRegion>, Vec<Problem>> {
    let mut problems = Vec::new();
    check_unmanaged(desired, current, required, &mut problems);
    let mut plan = Vec::new();
    let value_max = release.env_value_max();
    for d in desired {
        let existing = existing_region(d, current, &mut problems);
        let (action, introduction, proxy_address) = region_action(d, existing, release);
        check_region_lengths(d, &proxy_address, release, &mut problems);
        let region_id = existing.map(|r| r.id);
        let mut keys = Vec::new();
        for (k, v) in &d.env {
            if left_out(k, v, value_max) {
                continue;
            }
            let row = region_id.and_then(|id| current.env.iter().find(|e| e.region_id == id && e.key == *k));
            let pk = plan_key(&d.name, k, v, row, key, &mut problems);
            if pk.action != Action::Unchanged {
                if let Some(max) = value_max {
                    check_value_length(&d.name, k, v, max, release, &mut problems);
                }
            }
            keys.push(pk);
        }
        // A region the server creates has its service rows; region 1 gets them from the server
        // itself, so bkbundle adds them only to a region 1 it creates.
        let services = match region_id {
            Some(id) if !d.is_default() => current.missing_services(release, id),
            Some(_) => Vec::new(),
            None if release.has_region_services() => REGION_SERVICES.to_vec(),
            None => Vec::new(),
        };
        plan.push(PlannedRegion {
            name: d.name.clone(),
            id: region_id,
            action,
            introduction,
            proxy_address,
            local: d.local,
            keys,
            services,
        });
    }
    if problems.is_empty() {
        Ok(plan)
    } else {
        Err(problems)
    }
}

/// The problems of the regions bkbundle does not manage, from their stored rows: they are not
/// seeded, but their agents still break on a bad stored value.
fn check_unmanaged(desired: &[DesiredRegion], current: &Current, required: &[String], problems: &mut Vec<Problem>) {
    for r in unmanaged(desired, current) {
        let stored: BTreeMap<String, (String, Option<EnvType>)> = current
            .env
            .iter()
            .filter(|e| e.region_id == r.id)
            .map(|e| (e.key.clone(), (e.value.clone(), EnvType::parse(&e.env_type))))
            .collect();
        problems.extend(check_stored_region(&r.name, r.id, &stored, required));
    }
}

/// The stored region a desired one is: region 1 for the default (another region named "default"
/// is a problem), otherwise the one with the same name.
fn existing_region<'a>(
    d: &DesiredRegion,
    current: &'a Current,
    problems: &mut Vec<Problem>,
) -> Option<&'a CurrentRegion> {
    if d.is_default() {
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
    }
}

/// The region row's action and the introduction and proxy address it ends up with, which
/// depend on whether it exists, is region 1, and whether the release has the proxy column.
fn region_action(d: &DesiredRegion, existing: Option<&CurrentRegion>, release: &Release) -> (Action, String, String) {
    match existing {
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
            // A release without the column keeps the proxy host in the env rows only.
            let proxy = match release.has_proxy_address() {
                true => d.proxy_address.clone().unwrap_or_else(|| r.proxy_address.clone()),
                false => r.proxy_address.clone(),
            };
            let action = if intro != r.introduction || proxy != r.proxy_address {
                Action::Update
            } else {
                Action::Unchanged
            };
            (action, intro, proxy)
        }
    }
}

/// The region's name and proxy address against this release's column widths, so a too long
/// one is a problem before anything is written.
fn check_region_lengths(d: &DesiredRegion, proxy_address: &str, release: &Release, problems: &mut Vec<Problem>) {
    for (what, v, col) in [
        ("name", d.name.as_str(), "name"),
        ("proxy_address", proxy_address, "proxy_address"),
    ] {
        if let Some(max) = release.region.max_len(col) {
            if v.chars().count() > max {
                problems.push(Problem {
                    region: d.name.clone(),
                    key: None,
                    message: format!("the {what} is longer than the {max} characters {REGION_TABLE}.{col} takes"),
                });
            }
        }
    }
}

/// One key's action against its stored row (if any), comparing a stored secret by decrypting
/// it; the old value and type are kept only where the plan may show them.
fn plan_key(
    region: &str,
    k: &str,
    v: &DesiredValue,
    row: Option<&CurrentEnv>,
    key: Option<&SecretKey>,
    problems: &mut Vec<Problem>,
) -> PlannedKey {
    let mut pk = PlannedKey {
        key: k.to_string(),
        env_type: v.env_type,
        source: v.source,
        action: Action::Create,
        row_id: row.map(|r| r.id),
        value: v.value.clone(),
        old_value: None,
        old_type: None,
    };
    let Some(row) = row else {
        return pk;
    };
    let stored_type = EnvType::parse(&row.env_type);
    let same_value = match (stored_type, v.env_type) {
        (Some(EnvType::Secret), EnvType::Secret) => match key.map(|key| crypto::decrypt(key, &row.value)) {
            Some(Ok(plain)) => plain == v.value,
            Some(Err(e)) => {
                problems.push(Problem {
                    region: region.to_string(),
                    key: Some(k.to_string()),
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
    pk
}

/// The key of the CA agents verify NATS with (PEM): left out on releases whose `value` column is
/// too narrow for a certificate (before migration 0022).
pub const TLS_CA_KEY: &str = "NATS_TLS_CA";

/// Whether a key is not written on a release whose `value` column takes at most `max` characters:
/// the CA (PEM) where it does not fit; its agents take it from their controller package's
/// `certs/ca.crt` instead. Every other value too long is a problem ([`diff`]).
pub fn left_out(key: &str, v: &DesiredValue, max: Option<usize>) -> bool {
    key == TLS_CA_KEY && max.is_some_and(|max| stored_len(v) > max)
}

/// A value to write against the release's `value` column width (`max`), which older releases
/// limit: too long a value is a problem rather than a failed write.
fn check_value_length(
    region: &str,
    k: &str,
    v: &DesiredValue,
    max: usize,
    release: &Release,
    problems: &mut Vec<Problem>,
) {
    let len = stored_len(v);
    if len > max {
        problems.push(Problem {
            region: region.to_string(),
            key: Some(k.to_string()),
            message: format!(
                "the value is {len} characters{} but {ENV_TABLE}.value takes at most {max} in this release ({}); expected a shorter value, or upgrade the server to one with migration 0022 or later (value becomes text)",
                if v.env_type == EnvType::Secret { " once encrypted" } else { "" },
                release.label()
            ),
        });
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
/// ones: `$1` name, `$2` introduction, `$3` proxy address where the release has the column).
/// Nullable columns of later releases (`pending_proxy_address*`) are left out: NULL, as the
/// server leaves them for a new region.
fn region_insert(release: &Release, explicit_id: bool) -> String {
    let mut cols: Vec<&str> = Vec::new();
    let mut vals: Vec<String> = Vec::new();
    if explicit_id {
        cols.push("id");
        vals.push(DEFAULT_REGION_ID.to_string());
    }
    for (c, v) in [
        ("name", "$1::text".to_string()),
        ("introduction", "$2::text".to_string()),
        ("created_at", "now()".to_string()),
        ("updated_at", "now()".to_string()),
        // The server's cloud_init leaves region 1's maintainer empty (the model default).
        ("created_by", format!("'{}'", if explicit_id { "" } else { MAINTAINER })),
        ("updated_by", format!("'{}'", if explicit_id { "" } else { MAINTAINER })),
        ("domain", format!("'{DOMAIN}'")),
        ("updated_by_domain", format!("'{DOMAIN}'")),
    ] {
        cols.push(c);
        vals.push(v);
    }
    if release.has_proxy_address() {
        cols.push("proxy_address");
        vals.push("$3::text".into());
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
async fn advance_sequence(client: &impl GenericClient, t: &DbTarget, table: &str) -> Result<(), DbError> {
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

/// The service rows of region `region_id` the plan adds, as the server writes them: for a region
/// created in the UI `not_deployed`, 0, description `<name> 服务`; for region 1 (created by
/// the server's `cloud_init`) `Service <name> for default cloud region`, `normal`/2 from
/// migration 0031 on (which backfilled that status), `not_deployed`/0 before.
pub async fn add_services(
    tx: &impl GenericClient,
    t: &DbTarget,
    release: &Release,
    region_id: i64,
    region: &str,
    services: &[&str],
) -> Result<(), DbError> {
    let normal = region_id == DEFAULT_REGION_ID && release.migration.as_deref().is_some_and(|m| m >= "0031");
    let (status, deployed): (&str, i16) = if normal { ("normal", 2) } else { ("not_deployed", 0) };
    for name in services {
        let description = if region_id == DEFAULT_REGION_ID {
            format!("Service {name} for default cloud region")
        } else {
            format!("{name} 服务")
        };
        tx.execute(
            &format!(
                "INSERT INTO {SERVICE_TABLE} (name, status, description, cloud_region_id, deployed_message, deployed_status, message) \
                 VALUES ($1::text, $2::text, $5::text, $3::bigint, '', $4::smallint, '') ON CONFLICT (cloud_region_id, name) DO NOTHING"
            ),
            &[name, &status, &region_id, &deployed, &description],
        )
        .await
        .map_err(|e| db_err(t, &format!("adding the {name} service row of region {region:?}"), e))?;
    }
    Ok(())
}

/// Apply the plan in the caller's transaction; fills every created region's id into the plan.
pub async fn execute(
    tx: &impl GenericClient,
    t: &DbTarget,
    release: &Release,
    plan: &mut [PlannedRegion],
    key: Option<&SecretKey>,
) -> Result<(), DbError> {
    let creates_regions = plan.iter().any(|r| r.action == Action::Create);
    create_default_region(tx, t, release, plan).await?;
    if creates_regions {
        advance_sequence(tx, t, REGION_TABLE).await?;
    }
    for r in plan.iter_mut() {
        match (r.action, r.id) {
            (Action::Create, None) => r.id = Some(create_region(tx, t, release, r).await?),
            (Action::Update, Some(id)) => update_region(tx, t, release, r, id).await?,
            _ => {}
        }
    }
    if plan.iter().any(|r| r.keys.iter().any(|k| k.action == Action::Create)) {
        advance_sequence(tx, t, ENV_TABLE).await?;
    }
    for r in plan.iter() {
        let Some(region_id) = r.id else {
            return Err(DbError::Internal(format!(
                "region {:?} has no id after creation",
                r.name
            )));
        };
        write_env_rows(tx, t, r, region_id, key).await?;
        add_services(tx, t, release, region_id, &r.name, &r.services).await?;
    }
    Ok(())
}

/// The default region first, with its explicit id (1), before the sequence is advanced past it.
async fn create_default_region(
    tx: &impl GenericClient,
    t: &DbTarget,
    release: &Release,
    plan: &mut [PlannedRegion],
) -> Result<(), DbError> {
    if let Some(def) = plan
        .iter_mut()
        .find(|r| r.name == DEFAULT_REGION_NAME && r.action == Action::Create)
    {
        let sql = region_insert(release, true);
        let res = if release.has_proxy_address() {
            tx.query_opt(&sql, &[&DEFAULT_REGION_NAME, &DEFAULT_REGION_INTRODUCTION, &""])
                .await
        } else {
            tx.query_opt(&sql, &[&DEFAULT_REGION_NAME, &DEFAULT_REGION_INTRODUCTION])
                .await
        };
        res.map_err(|e| db_err(t, "creating the default region (id 1)", e))?;
        def.id = Some(DEFAULT_REGION_ID);
    }
    Ok(())
}

/// A new region's row, and its id: the one created, or the one someone else created meanwhile.
async fn create_region(
    tx: &impl GenericClient,
    t: &DbTarget,
    release: &Release,
    r: &PlannedRegion,
) -> Result<i64, DbError> {
    let sql = region_insert(release, false);
    let row = if release.has_proxy_address() {
        tx.query_opt(&sql, &[&r.name, &r.introduction, &r.proxy_address]).await
    } else {
        tx.query_opt(&sql, &[&r.name, &r.introduction]).await
    }
    .map_err(|e| db_err(t, &format!("creating region {:?}", r.name), e))?;
    Ok(match row {
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
    })
}

/// An existing region's introduction (and proxy address, where the release has the column).
async fn update_region(
    tx: &impl GenericClient,
    t: &DbTarget,
    release: &Release,
    r: &PlannedRegion,
    id: i64,
) -> Result<(), DbError> {
    let set = format!("updated_at = now(), updated_by = '{MAINTAINER}', updated_by_domain = '{DOMAIN}'");
    let res = if release.has_proxy_address() {
        tx.execute(
            &format!(
                "UPDATE {REGION_TABLE} SET introduction = $2::text, proxy_address = $3::text, {set} WHERE id = $1::bigint"
            ),
            &[&id, &r.introduction, &r.proxy_address],
        )
        .await
    } else {
        tx.execute(
            &format!("UPDATE {REGION_TABLE} SET introduction = $2::text, {set} WHERE id = $1::bigint"),
            &[&id, &r.introduction],
        )
        .await
    };
    res.map_err(|e| db_err(t, &format!("updating region {:?} (id {id})", r.name), e))?;
    Ok(())
}

/// The changed env rows of one region, a secret encrypted just before its write.
async fn write_env_rows(
    tx: &impl GenericClient,
    t: &DbTarget,
    r: &PlannedRegion,
    region_id: i64,
    key: Option<&SecretKey>,
) -> Result<(), DbError> {
    // Region 1's rows are the server's own (`is_pre`, rewritten from DEFAULT_ZONE_VAR_* at
    // its start); another region's are editable copies.
    let is_pre = region_id == DEFAULT_REGION_ID;
    for k in r.keys.iter().filter(|k| k.action != Action::Unchanged) {
        let stored = match k.env_type {
            EnvType::Secret => {
                let key = key.ok_or_else(|| DbError::Internal(format!("no SECRET_KEY to encrypt {} with", k.key)))?;
                crypto::encrypt(key, &k.value)
                    .map_err(|e| DbError::Internal(format!("cannot read /dev/urandom for an IV: {e}")))?
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
                         VALUES ($1::text, $2::text, $3::text, '', $4::bigint, $5::bool) \
                         ON CONFLICT (key, cloud_region_id) DO UPDATE SET value = EXCLUDED.value, type = EXCLUDED.type"
                    ),
                    &[&k.key, &stored, &k.env_type.as_str(), &region_id, &is_pre],
                )
                .await
                .map_err(|e| db_err(t, &what, e))?,
        };
    }
    Ok(())
}

/// Copy region 1's rows of `keys` into region `region_id` as the server does when it creates a
/// region: type and description kept, `is_pre = false`, the host of `NODE_SERVER_URL` and
/// `NATS_SERVERS` replaced by the region's proxy host (`proxy`, when not empty). A stored secret
/// is copied as it is (the same SECRET_KEY decrypts it). Existing rows are left alone.
pub async fn copy_from_default(
    tx: &impl GenericClient,
    t: &DbTarget,
    current: &Current,
    region_id: i64,
    proxy: &str,
    keys: &[String],
) -> Result<(), DbError> {
    for key in keys {
        let Some(row) = current
            .env
            .iter()
            .find(|e| e.region_id == DEFAULT_REGION_ID && e.key == *key)
        else {
            continue;
        };
        let value = match proxy.trim() {
            p if !p.is_empty() && PROXIED_KEYS.contains(&key.as_str()) => {
                replace_host(key, &row.value, p).unwrap_or_else(|| row.value.clone())
            }
            _ => row.value.clone(),
        };
        tx.execute(
            &format!(
                "INSERT INTO {ENV_TABLE} (key, value, type, description, cloud_region_id, is_pre) \
                 SELECT key, $2::text, type, description, $3::bigint, false FROM {ENV_TABLE} WHERE id = $1::bigint \
                 ON CONFLICT (key, cloud_region_id) DO NOTHING"
            ),
            &[&row.id, &value, &region_id],
        )
        .await
        .map_err(|e| db_err(t, &format!("adding {key} to region id {region_id} from region 1"), e))?;
    }
    Ok(())
}

/// Remove the server's cached env of `region_ids` from the database cache table; returns how
/// many entries were there.
pub async fn invalidate_db_cache(
    client: &impl GenericClient,
    t: &DbTarget,
    region_ids: &BTreeSet<i64>,
) -> Result<u64, DbError> {
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
    use crate::platform::release::tests::release;
    use crate::platform::rules::DesiredValue;

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
        let schema = release(true, false, false, Some(200));
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
                    is_pre: true,
                },
                CurrentEnv {
                    id: 11,
                    region_id: 1,
                    key: "NATS_PROTOCOL".into(),
                    value: "tls".into(),
                    env_type: "str".into(),
                    is_pre: true,
                },
            ],
            services: BTreeSet::new(),
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
            is_pre: false,
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
