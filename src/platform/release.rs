//! Which BK-Lite release a live database is, as a set of features read from the database itself.
//!
//! Sites run every release from the October 2025 field fork (node_mgmt migration 0012) to the
//! newest (0044), and releases between the published milestones mix their changes (BKLITE.md,
//! "Releases in the field"). So nothing here names a generation: [`Release`] is what the
//! database has (the tables bkbundle reads and writes, their columns with type, length and
//! nullability, their UNIQUE constraints, and the last applied node_mgmt migration for the
//! report), built once per connection by [`detect`] and passed down; every behaviour asks it one
//! question at a time ([`Release::has_proxy_address`], [`Release::has_package_arch`], ...).
//!
//! A NOT NULL column without a default that bkbundle has no value for means a newer release: it
//! is refused before anything is written, naming table and column ([`Release::check_writable`]).
//! Unknown nullable columns are left alone (they stay NULL, as the server's own inserts leave
//! columns it does not know of a later release).

use super::db::{db_err, DbError, DbTarget};
use std::collections::BTreeMap;
use tokio_postgres::GenericClient;

pub const REGION_TABLE: &str = "node_mgmt_cloudregion";
pub const ENV_TABLE: &str = "node_mgmt_sidecarenv";
pub const PACKAGE_TABLE: &str = "node_mgmt_packageversion";
pub const SERVICE_TABLE: &str = "node_mgmt_cloudregionservice";
pub const CACHE_TABLE: &str = "django_cache";
pub const MIGRATIONS_TABLE: &str = "django_migrations";

/// Columns every release has (migration 0012 on): a table lacking one is not migrated yet.
const REGION_BASE: [&str; 9] = [
    "id",
    "name",
    "introduction",
    "created_at",
    "updated_at",
    "created_by",
    "updated_by",
    "domain",
    "updated_by_domain",
];
const ENV_BASE: [&str; 7] = ["id", "key", "value", "type", "description", "cloud_region_id", "is_pre"];
const PACKAGE_BASE: [&str; 13] = [
    "id",
    "type",
    "os",
    "object",
    "version",
    "name",
    "description",
    "created_at",
    "updated_at",
    "created_by",
    "updated_by",
    "domain",
    "updated_by_domain",
];
const SERVICE_BASE: [&str; 8] = [
    "id",
    "name",
    "status",
    "description",
    "cloud_region_id",
    "deployed_message",
    "deployed_status",
    "message",
];

/// Columns bkbundle writes a value to when they exist (later releases).
const REGION_OPTIONAL: [&str; 1] = ["proxy_address"];
const PACKAGE_OPTIONAL: [&str; 1] = ["cpu_architecture"];

/// One column as `information_schema` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub data_type: String,
    pub nullable: bool,
    /// A default, identity or generated column: an INSERT may leave it out.
    pub has_default: bool,
    /// `character varying(n)`'s n.
    pub max_len: Option<i32>,
}

/// One table: its columns and the column sets of its UNIQUE constraints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub columns: BTreeMap<String, Column>,
    pub uniques: Vec<Vec<String>>,
}

impl Table {
    pub fn has(&self, column: &str) -> bool {
        self.columns.contains_key(column)
    }
    pub fn max_len(&self, column: &str) -> Option<usize> {
        self.columns
            .get(column)
            .and_then(|c| c.max_len)
            .map(|n| n.max(0) as usize)
    }
    /// Whether a UNIQUE constraint covers exactly `columns` (in any order).
    pub fn unique_on(&self, columns: &[&str]) -> bool {
        self.uniques
            .iter()
            .any(|u| u.len() == columns.len() && columns.iter().all(|c| u.iter().any(|x| x == c)))
    }
}

/// What the live platform database has. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The last applied node_mgmt migration (`0044_...`), when `django_migrations` exists.
    pub migration: Option<String>,
    pub region: Table,
    pub env: Table,
    pub package: Table,
    /// `node_mgmt_cloudregionservice` (migration 0022 on).
    pub service: Option<Table>,
    /// Django's `createcachetable` table (not the server's default cache backend).
    pub cache_table: bool,
}

/// Why a database is not usable (pure half of [`detect`]).
#[derive(Debug, PartialEq, Eq)]
pub enum ReleaseProblem {
    NotMigrated(String),
}

impl Release {
    /// `cloudregion.proxy_address` (0027 on): regions have a proxy host column.
    pub fn has_proxy_address(&self) -> bool {
        self.region.has("proxy_address")
    }
    /// `packageversion.cpu_architecture` (0032 on): packages are per architecture, and objects
    /// are stored under the key with the architecture (BKLITE.md, "Package object key").
    pub fn has_package_arch(&self) -> bool {
        self.package.has("cpu_architecture")
    }
    /// Whether two architectures of one (os, object, version) can both have a row: the UNIQUE
    /// constraint includes `cpu_architecture` (0032 on).
    pub fn packages_unique_per_arch(&self) -> bool {
        self.has_package_arch() && !self.package.unique_on(&["os", "object", "version"])
    }
    /// `cloudregionservice` (0022 on): a region needs its service rows to leave "not deployed".
    pub fn has_region_services(&self) -> bool {
        self.service.is_some()
    }
    /// The longest value `sidecarenv.value` takes (`varchar(200)` before 0022), `None`: text.
    pub fn env_value_max(&self) -> Option<usize> {
        self.env.max_len("value")
    }
    /// The object store bucket the server of this release uses when its `NATS_NAMESPACE` is
    /// unset: `bk_lite` up to December 2025, `bklite` from 2026-01-08 (migration 0027, the one
    /// that added `proxy_address`, is of that day).
    pub fn default_bucket(&self) -> &'static str {
        if self.has_proxy_address() {
            "bklite"
        } else {
            "bk_lite"
        }
    }
    /// The release for reports: `node_mgmt 0044_...` or what the columns say when the database
    /// has no migration record.
    pub fn label(&self) -> String {
        match &self.migration {
            Some(m) => format!("node_mgmt migration {m}"),
            None => format!(
                "no django_migrations record; {}",
                [
                    (self.has_proxy_address(), "proxy_address"),
                    (self.has_package_arch(), "cpu_architecture"),
                    (self.has_region_services(), "cloudregionservice"),
                ]
                .iter()
                .map(|(has, what)| format!("{}{what}", if *has { "" } else { "no " }))
                .collect::<Vec<_>>()
                .join(", ")
            ),
        }
    }

    /// Every NOT NULL column without a default of the tables bkbundle inserts into that it has
    /// no value for: a newer release. Empty when bkbundle can write every table.
    pub fn unknown_required(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |name: &str, t: &Table, known: &[&[&str]]| {
            for (c, col) in &t.columns {
                if !col.nullable && !col.has_default && !known.iter().any(|k| k.contains(&c.as_str())) {
                    out.push(format!("{name}.{c} ({})", col.data_type));
                }
            }
        };
        check(REGION_TABLE, &self.region, &[&REGION_BASE, &REGION_OPTIONAL]);
        check(ENV_TABLE, &self.env, &[&ENV_BASE]);
        check(PACKAGE_TABLE, &self.package, &[&PACKAGE_BASE, &PACKAGE_OPTIONAL]);
        if let Some(s) = &self.service {
            check(SERVICE_TABLE, s, &[&SERVICE_BASE]);
        }
        out
    }

    /// [`Release::unknown_required`] as the error that stops a run before it writes.
    pub fn check_writable(&self, t: &DbTarget) -> Result<(), DbError> {
        let unknown = self.unknown_required();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(DbError::UnknownSchema {
            db: t.name.clone(),
            release: self.label(),
            detail: format!(
                "NOT NULL column(s) {} have no default and bkbundle has no value for them (a newer server release)",
                unknown.join(", ")
            ),
        })
    }
}

/// Build a [`Release`] from the columns and uniques read from the catalog (pure).
pub fn from_catalog(mut tables: BTreeMap<String, Table>, migration: Option<String>) -> Result<Release, ReleaseProblem> {
    let missing: Vec<&str> = [REGION_TABLE, ENV_TABLE, PACKAGE_TABLE]
        .into_iter()
        .filter(|t| !tables.contains_key(*t))
        .collect();
    if !missing.is_empty() {
        return Err(ReleaseProblem::NotMigrated(format!(
            "table(s) {} do not exist",
            missing.join(", ")
        )));
    }
    let region = tables.remove(REGION_TABLE).unwrap_or_default();
    let env = tables.remove(ENV_TABLE).unwrap_or_default();
    let package = tables.remove(PACKAGE_TABLE).unwrap_or_default();
    let service = tables.remove(SERVICE_TABLE);
    let mut lacking = Vec::new();
    for (name, t, base) in [
        (REGION_TABLE, &region, &REGION_BASE[..]),
        (ENV_TABLE, &env, &ENV_BASE[..]),
        (PACKAGE_TABLE, &package, &PACKAGE_BASE[..]),
    ]
    .into_iter()
    .chain(service.as_ref().map(|s| (SERVICE_TABLE, s, &SERVICE_BASE[..])))
    {
        lacking.extend(base.iter().filter(|c| !t.has(c)).map(|c| format!("{name}.{c}")));
    }
    if !lacking.is_empty() {
        return Err(ReleaseProblem::NotMigrated(format!(
            "column(s) {} do not exist (migrations still running, or not a BK-Lite database)",
            lacking.join(", ")
        )));
    }
    Ok(Release {
        migration,
        region,
        env,
        package,
        service,
        cache_table: tables.contains_key(CACHE_TABLE),
    })
}

/// Read what the database has: columns and UNIQUE constraints of the tables bkbundle uses (in
/// the current schema, `public` for Django), and the last node_mgmt migration.
pub async fn detect(client: &impl GenericClient, t: &DbTarget) -> Result<Release, DbError> {
    let names = vec![
        REGION_TABLE,
        ENV_TABLE,
        PACKAGE_TABLE,
        SERVICE_TABLE,
        CACHE_TABLE,
        MIGRATIONS_TABLE,
    ];
    let rows = client
        .query(
            "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text = 'YES', \
             (column_default IS NOT NULL OR is_identity::text = 'YES' OR is_generated::text <> 'NEVER'), \
             character_maximum_length::int \
             FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name::text = ANY($1::text[])",
            &[&names],
        )
        .await
        .map_err(|e| db_err(t, "reading information_schema.columns", e))?;
    let mut tables: BTreeMap<String, Table> = BTreeMap::new();
    for r in rows {
        tables.entry(r.get(0)).or_default().columns.insert(
            r.get(1),
            Column {
                data_type: r.get(2),
                nullable: r.get(3),
                has_default: r.get(4),
                max_len: r.get(5),
            },
        );
    }
    let uniques = client
        .query(
            "SELECT c.conrelid::regclass::text, \
             array_agg(a.attname::text ORDER BY a.attname) \
             FROM pg_constraint c \
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey) \
             WHERE c.contype = 'u' AND c.connamespace = current_schema()::regnamespace \
             AND c.conrelid::regclass::text = ANY($1::text[]) \
             GROUP BY c.oid, c.conrelid",
            &[&names],
        )
        .await
        .map_err(|e| db_err(t, "reading the UNIQUE constraints from pg_constraint", e))?;
    for r in uniques {
        let table: String = r.get(0);
        if let Some(tb) = tables.get_mut(&table) {
            tb.uniques.push(r.get(1));
        }
    }
    let migration = if tables.contains_key(MIGRATIONS_TABLE) {
        client
            .query_opt(
                &format!("SELECT max(name)::text FROM {MIGRATIONS_TABLE} WHERE app = 'node_mgmt'"),
                &[],
            )
            .await
            .map_err(|e| db_err(t, &format!("reading {MIGRATIONS_TABLE}"), e))?
            .and_then(|r| r.get::<_, Option<String>>(0))
    } else {
        None
    };
    from_catalog(tables, migration).map_err(|e| match e {
        ReleaseProblem::NotMigrated(detail) => DbError::NotMigrated {
            db: t.name.clone(),
            detail,
        },
    })
}

/// [`detect`], waiting up to `wait` for the server to create its tables (install runs right
/// after the stack turned healthy, while the server may still be migrating); then refuses a
/// release with a NOT NULL column bkbundle has no value for ([`Release::check_writable`]).
pub async fn detect_when_migrated(
    client: &impl GenericClient,
    t: &DbTarget,
    wait: Option<std::time::Duration>,
) -> Result<Release, DbError> {
    let deadline = wait.map(|w| std::time::Instant::now() + w);
    let release = loop {
        match detect(client, t).await {
            Err(DbError::NotMigrated { db, detail }) => match deadline {
                Some(d) if std::time::Instant::now() < d => {
                    tracing::info!("waiting for the server's migrations: {detail}");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
                _ => {
                    let waited = wait.map(|w| format!(" (waited {} s)", w.as_secs())).unwrap_or_default();
                    return Err(DbError::NotMigrated {
                        db,
                        detail: format!("{detail}{waited}"),
                    });
                }
            },
            other => break other?,
        }
    };
    release.check_writable(t)?;
    Ok(release)
}

/// The newest release bkbundle knows (node_mgmt migration 0044, August 2026): what a plan made
/// before the platform's database exists assumes (the step itself decides again on the live
/// database).
pub const NEWEST_KNOWN: &str = "0044_encrypt_installer_passwords";

impl Release {
    /// The features of [`NEWEST_KNOWN`].
    pub fn newest_known() -> Release {
        catalog(true, true, true, None, Some(NEWEST_KNOWN))
    }
}

fn col(nullable: bool, has_default: bool, max_len: Option<i32>) -> Column {
    Column {
        data_type: "character varying".into(),
        nullable,
        has_default,
        max_len,
    }
}

fn table(cols: &[&str], uniques: &[&[&str]]) -> Table {
    Table {
        columns: cols
            .iter()
            .map(|c| (c.to_string(), col(false, *c == "id", None)))
            .collect(),
        uniques: uniques
            .iter()
            .map(|u| u.iter().map(|c| c.to_string()).collect())
            .collect(),
    }
}

/// A catalog with the given features, as the columns bkbundle reads make it (the tables'
/// other columns left out): for plans made before the database exists, and for tests.
pub fn catalog(proxy: bool, arch: bool, services: bool, value_max: Option<i32>, migration: Option<&str>) -> Release {
    let mut region = table(&REGION_BASE, &[&["name"]]);
    if proxy {
        region
            .columns
            .insert("proxy_address".into(), col(false, false, Some(255)));
    }
    let mut env = table(&ENV_BASE, &[&["key", "cloud_region_id"]]);
    env.columns.get_mut("value").unwrap().max_len = value_max;
    let mut package = table(&PACKAGE_BASE, &[]);
    if arch {
        package
            .columns
            .insert("cpu_architecture".into(), col(false, false, Some(20)));
        package.uniques.push(vec![
            "cpu_architecture".into(),
            "object".into(),
            "os".into(),
            "version".into(),
        ]);
    } else {
        package
            .uniques
            .push(vec!["object".into(), "os".into(), "version".into()]);
    }
    let mut tables = BTreeMap::from([
        (REGION_TABLE.to_string(), region),
        (ENV_TABLE.to_string(), env),
        (PACKAGE_TABLE.to_string(), package),
    ]);
    if services {
        tables.insert(
            SERVICE_TABLE.into(),
            table(&SERVICE_BASE, &[&["cloud_region_id", "name"]]),
        );
    }
    from_catalog(tables, migration.map(str::to_string)).expect("a catalog of the known tables is a release")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A catalog with the given features, for unit tests here and in the command modules.
    pub(crate) fn release(proxy: bool, arch: bool, services: bool, value_max: Option<i32>) -> Release {
        catalog(proxy, arch, services, value_max, None)
    }

    #[test]
    fn features_one_at_a_time() {
        // The field fork: nothing of the later releases.
        let r = release(false, false, false, Some(200));
        assert!(!r.has_proxy_address() && !r.has_package_arch() && !r.has_region_services());
        assert_eq!((r.env_value_max(), r.default_bucket()), (Some(200), "bk_lite"));
        assert!(!r.packages_unique_per_arch());
        // A release between the milestones (0032-0037): proxy and arch, no pending columns.
        let r = release(true, true, true, None);
        assert!(r.has_proxy_address() && r.has_package_arch() && r.packages_unique_per_arch());
        assert_eq!((r.env_value_max(), r.default_bucket()), (None, "bklite"));
        assert!(r.unknown_required().is_empty());
        assert!(r.label().contains("no django_migrations"), "{}", r.label());
    }

    #[test]
    fn an_unknown_not_null_column_is_a_newer_release_and_a_nullable_one_is_not() {
        let mut r = release(true, true, true, None);
        r.region
            .columns
            .insert("pending_proxy_address".into(), col(true, false, Some(255)));
        assert!(r.unknown_required().is_empty());
        r.service
            .as_mut()
            .unwrap()
            .columns
            .insert("colour".into(), col(false, false, None));
        assert_eq!(
            r.unknown_required(),
            vec![format!("{SERVICE_TABLE}.colour (character varying)")]
        );
    }

    #[test]
    fn missing_tables_or_columns_are_not_migrated() {
        let r = release(false, false, false, None);
        let mut t = BTreeMap::from([
            (REGION_TABLE.to_string(), r.region.clone()),
            (PACKAGE_TABLE.to_string(), r.package.clone()),
        ]);
        assert!(matches!(from_catalog(t.clone(), None), Err(ReleaseProblem::NotMigrated(m)) if m.contains(ENV_TABLE)));
        let mut env = r.env.clone();
        env.columns.remove("is_pre");
        t.insert(ENV_TABLE.into(), env);
        assert!(
            matches!(from_catalog(t, None), Err(ReleaseProblem::NotMigrated(m)) if m.contains("node_mgmt_sidecarenv.is_pre"))
        );
    }
}
