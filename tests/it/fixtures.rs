//! The release fixtures (`tests/fixtures/releases/`) against the real DDL: each fixture's
//! node_mgmt tables, catalog against catalog, with the `pg_dump` of the same release after its
//! own migrations (`bklite-schemas/`); and every fixture, with seed 000 on top, loading with the
//! rows they are documented to hold. All on the process's shared PostgreSQL cluster.

use crate::harness::{
    loadable_dump, reference_database, reference_schemas_dir, release_database, release_fixture, unique_db_name,
    PgCluster, REFERENCES, RELEASES,
};
use std::collections::{BTreeMap, BTreeSet};

/// One column as `information_schema.columns` describes it.
#[derive(Debug, PartialEq, Eq)]
struct Column {
    data_type: String,
    character_maximum_length: String,
    is_nullable: String,
    is_identity: String,
    column_default: String,
}

/// One table's catalog: columns by name, the primary key and UNIQUE constraints as column sets,
/// foreign keys as `(columns) -> table(columns)` with their deferral.
#[derive(Debug, Default)]
struct Table {
    columns: BTreeMap<String, Column>,
    primary_key: BTreeSet<String>,
    uniques: BTreeSet<String>,
    foreign_keys: BTreeMap<String, ForeignKey>,
}

#[derive(Debug, PartialEq, Eq)]
struct ForeignKey {
    /// The referenced table.
    table: String,
    deferrable: String,
    initially_deferred: String,
}

/// psql -At output uses `|` between columns; none of the catalog values compared contain one.
const COLUMNS_SQL: &str = "SELECT table_name, column_name, data_type, \
     coalesce(character_maximum_length::text, ''), is_nullable, is_identity, coalesce(column_default, '') \
     FROM information_schema.columns \
     WHERE table_schema = current_schema() AND table_name LIKE 'node\\_mgmt\\_%' \
     ORDER BY 1, 2";

/// p/u/f constraints of the node_mgmt tables; key columns sorted for p and u (sets), in key
/// order for f (paired with the referenced columns).
const CONSTRAINTS_SQL: &str = "SELECT cl.relname, c.contype, \
     (SELECT string_agg(a.attname, ',' ORDER BY CASE WHEN c.contype = 'f' THEN lpad(array_position(c.conkey, a.attnum)::text, 4, '0') ELSE a.attname::text END) \
        FROM pg_attribute a WHERE a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)), \
     coalesce(fc.relname, ''), \
     coalesce((SELECT string_agg(a.attname, ',' ORDER BY array_position(c.confkey, a.attnum)) \
        FROM pg_attribute a WHERE a.attrelid = c.confrelid AND a.attnum = ANY (c.confkey)), ''), \
     c.condeferrable, c.condeferred \
     FROM pg_constraint c \
     JOIN pg_class cl ON cl.oid = c.conrelid \
     JOIN pg_namespace n ON n.oid = cl.relnamespace \
     LEFT JOIN pg_class fc ON fc.oid = c.confrelid \
     WHERE n.nspname = current_schema() AND cl.relname LIKE 'node\\_mgmt\\_%' AND c.contype IN ('p', 'u', 'f') \
     ORDER BY 1, 2, 3";

fn catalog(pg: &PgCluster, db: &str) -> BTreeMap<String, Table> {
    let mut tables: BTreeMap<String, Table> = BTreeMap::new();
    for line in pg.psql(db, COLUMNS_SQL).lines() {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f.len(), 7, "unexpected catalog row from {db}: {line}");
        tables.entry(f[0].to_string()).or_default().columns.insert(
            f[1].to_string(),
            Column {
                data_type: f[2].to_string(),
                character_maximum_length: f[3].to_string(),
                is_nullable: f[4].to_string(),
                is_identity: f[5].to_string(),
                column_default: f[6].to_string(),
            },
        );
    }
    for line in pg.psql(db, CONSTRAINTS_SQL).lines() {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f.len(), 7, "unexpected constraint row from {db}: {line}");
        let t = tables.entry(f[0].to_string()).or_default();
        match f[1] {
            "p" => t.primary_key = f[2].split(',').map(str::to_string).collect(),
            "u" => {
                t.uniques.insert(format!("({})", f[2]));
            }
            "f" => {
                t.foreign_keys.insert(
                    format!("({}) -> {}({})", f[2], f[3], f[4]),
                    ForeignKey {
                        table: f[3].to_string(),
                        deferrable: f[5].to_string(),
                        initially_deferred: f[6].to_string(),
                    },
                );
            }
            other => panic!("constraint type {other} was not asked for: {line}"),
        }
    }
    tables
}

fn set(s: &BTreeSet<String>) -> String {
    format!("{{{}}}", s.iter().cloned().collect::<Vec<_>>().join(", "))
}

/// Every difference between the fixture's node_mgmt tables and the reference's, one line each,
/// naming the release, the table, the column or constraint, and both values.
fn differences(release: &str, fixture: &BTreeMap<String, Table>, reference: &BTreeMap<String, Table>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, fx) in fixture {
        let Some(rf) = reference.get(name) else {
            out.push(format!(
                "release {release}, table {name}: in the fixture, not in the reference"
            ));
            continue;
        };
        for (col, fc) in &fx.columns {
            let Some(rc) = rf.columns.get(col) else {
                out.push(format!(
                    "release {release}, table {name}, column {col}: in the fixture ({} {}), not in the reference",
                    fc.data_type, fc.is_nullable
                ));
                continue;
            };
            for (what, f, r) in [
                ("data_type", &fc.data_type, &rc.data_type),
                (
                    "character_maximum_length",
                    &fc.character_maximum_length,
                    &rc.character_maximum_length,
                ),
                ("is_nullable", &fc.is_nullable, &rc.is_nullable),
                ("is_identity", &fc.is_identity, &rc.is_identity),
                ("column_default", &fc.column_default, &rc.column_default),
            ] {
                if f != r {
                    out.push(format!(
                        "release {release}, table {name}, column {col}, {what}: fixture {f:?}, reference {r:?}"
                    ));
                }
            }
        }
        for (col, rc) in &rf.columns {
            if !fx.columns.contains_key(col) {
                out.push(format!(
                    "release {release}, table {name}, column {col}: in the reference ({} {}), not in the fixture",
                    rc.data_type, rc.is_nullable
                ));
            }
        }
        if fx.primary_key != rf.primary_key {
            out.push(format!(
                "release {release}, table {name}, primary key: fixture {}, reference {}",
                set(&fx.primary_key),
                set(&rf.primary_key)
            ));
        }
        if fx.uniques != rf.uniques {
            out.push(format!(
                "release {release}, table {name}, UNIQUE constraints: fixture {}, reference {}",
                set(&fx.uniques),
                set(&rf.uniques)
            ));
        }
        // Foreign keys to tables the fixture leaves out may be left out with them.
        let keep = |fks: &BTreeMap<String, ForeignKey>| -> BTreeSet<String> {
            fks.iter()
                .filter(|(_, fk)| fixture.contains_key(&fk.table))
                .map(|(k, fk)| {
                    format!(
                        "{k} deferrable={} initially_deferred={}",
                        fk.deferrable, fk.initially_deferred
                    )
                })
                .collect()
        };
        let (ffk, rfk) = (keep(&fx.foreign_keys), keep(&rf.foreign_keys));
        if ffk != rfk {
            out.push(format!(
                "release {release}, table {name}, foreign keys: fixture {}, reference {}",
                set(&ffk),
                set(&rfk)
            ));
        }
    }
    out
}

#[test]
fn release_fixtures_match_the_real_ddl_of_their_release() {
    let dir = match reference_schemas_dir() {
        Ok(dir) => dir,
        Err(missing) if std::env::var_os("CI").is_some() => panic!(
            "no real schemas at {} ($BKBUNDLE_SCHEMAS, else <repo>/../shared/bklite-schemas), and CI is set: \
             CI must compare the release fixtures with them",
            missing.display()
        ),
        Err(missing) => {
            println!(
                "release fixtures NOT compared with the real DDL: no folder {} ($BKBUNDLE_SCHEMAS, else <repo>/../shared/bklite-schemas)",
                missing.display()
            );
            return;
        }
    };
    let pg = PgCluster::shared();
    let mut problems = Vec::new();
    for (release, file) in REFERENCES {
        let reference_db = unique_db_name(&format!("reference_{release}"));
        reference_database(pg, &dir, file, &reference_db);
        let fixture_db = unique_db_name(&format!("fixture_{release}"));
        release_database(pg, release, &fixture_db);

        let fixture = catalog(pg, &fixture_db);
        let reference = catalog(pg, &reference_db);
        assert!(
            fixture.contains_key("node_mgmt_cloudregion") && reference.contains_key("node_mgmt_cloudregion"),
            "release {release}: no node_mgmt tables read from {fixture_db} or {reference_db}"
        );
        problems.extend(differences(release, &fixture, &reference));
    }
    assert!(
        problems.is_empty(),
        "release fixtures differ from the real DDL ({}):\n{}",
        dir.display(),
        problems.join("\n")
    );
}

/// The node_mgmt migrations every release fixture records, `0001` to the release's own.
fn migration_numbers(release: &str) -> String {
    let last: u32 = release.parse().expect("a release is its last migration's number");
    (1..=last).map(|n| format!("{n:04}")).collect::<Vec<_>>().join(",")
}

fn has_column(pg: &PgCluster, db: &str, table: &str, column: &str) -> bool {
    pg.psql(
        db,
        &format!(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema() \
             AND table_name = '{table}' AND column_name = '{column}'"
        ),
    ) == "1"
}

fn has_table(pg: &PgCluster, db: &str, table: &str) -> bool {
    pg.psql(
        db,
        &format!(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = '{table}'"
        ),
    ) == "1"
}

#[test]
fn every_release_fixture_and_seed_000_load_with_the_rows_described() {
    let pg = PgCluster::shared();
    let seed = std::fs::read_to_string(crate::harness::repo_root().join("tests/fixtures/seed-000.sql"))
        .expect("read tests/fixtures/seed-000.sql");
    for release in RELEASES {
        let n: u32 = release.parse().unwrap();
        let db = unique_db_name(&format!("rows_{release}"));
        release_database(pg, release, &db);

        // The features of BKLITE.md's table, one at a time.
        let proxy = has_column(pg, &db, "node_mgmt_cloudregion", "proxy_address");
        let services = has_table(pg, &db, "node_mgmt_cloudregionservice");
        assert_eq!(proxy, n >= 27, "release {release}: cloudregion.proxy_address");
        assert_eq!(services, n >= 22, "release {release}: node_mgmt_cloudregionservice");
        assert_eq!(
            has_column(pg, &db, "node_mgmt_packageversion", "cpu_architecture"),
            n >= 32,
            "release {release}: packageversion.cpu_architecture"
        );
        assert_eq!(
            has_column(pg, &db, "node_mgmt_cloudregion", "pending_proxy_address"),
            n >= 38,
            "release {release}: cloudregion.pending_proxy_address"
        );
        assert_eq!(
            pg.psql(
                &db,
                "SELECT data_type || coalesce('(' || character_maximum_length || ')', '') FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = 'node_mgmt_sidecarenv' AND column_name = 'value'"
            ),
            if n >= 22 { "text" } else { "character varying(200)" },
            "release {release}: sidecarenv.value"
        );

        // Region 1 as the server's cloud_init writes it: explicit id, model defaults, no env.
        assert_eq!(
            pg.psql(
                &db,
                "SELECT id, name, introduction, created_by, updated_by, domain, updated_by_domain \
                 FROM node_mgmt_cloudregion ORDER BY id"
            ),
            "1|default|default cloud region!|||domain.com|domain.com",
            "release {release}: region 1"
        );
        if proxy {
            assert_eq!(
                pg.psql(&db, "SELECT proxy_address = '' FROM node_mgmt_cloudregion WHERE id = 1"),
                "t",
                "release {release}: region 1's proxy_address"
            );
        }
        assert_eq!(
            pg.psql(&db, "SELECT is_called FROM node_mgmt_cloudregion_id_seq"),
            "f",
            "release {release}: the explicit id 1 leaves the identity unused"
        );
        assert_eq!(pg.psql(&db, "SELECT count(*) FROM node_mgmt_sidecarenv"), "0");
        if services {
            // Region 1's services: not_deployed / 0 up to 0027, normal / 2 (DEPLOYED) from 0031.
            let (status, deployed) = if n >= 31 { ("normal", 2) } else { ("not_deployed", 0) };
            assert_eq!(
                pg.psql(
                    &db,
                    "SELECT name, status, deployed_status, description, deployed_message, message \
                     FROM node_mgmt_cloudregionservice WHERE cloud_region_id = 1 ORDER BY id"
                ),
                format!(
                    "stargazer|{status}|{deployed}|Service stargazer for default cloud region||\n\
                     nats-executor|{status}|{deployed}|Service nats-executor for default cloud region||"
                ),
                "release {release}: region 1's services"
            );
        }
        // Django's tables: every node_mgmt migration up to the release's, the cache empty.
        assert_eq!(
            pg.psql(
                &db,
                "SELECT string_agg(left(name, 4), ',' ORDER BY id) FROM django_migrations WHERE app = 'node_mgmt'"
            ),
            migration_numbers(release),
            "release {release}: django_migrations"
        );
        assert_eq!(
            pg.psql(
                &db,
                "SELECT count(*) FROM django_migrations WHERE app <> 'node_mgmt' OR name NOT LIKE '____\\_%'"
            ),
            "0"
        );
        assert_eq!(pg.psql(&db, "SELECT count(*) FROM django_cache"), "0");

        // Seed 000 on top.
        pg.psql_script(&db, &seed, "tests/fixtures/seed-000.sql");
        assert_eq!(
            pg.psql(
                &db,
                "SELECT id, name, introduction, created_by FROM node_mgmt_cloudregion ORDER BY id"
            ),
            "1|default|default cloud region!|\n2|east|east data centre|admin",
            "release {release}: regions after seed 000"
        );
        assert_eq!(
            pg.psql(
                &db,
                "SELECT cloud_region_id, key, value, type, is_pre FROM node_mgmt_sidecarenv ORDER BY cloud_region_id, key"
            ),
            "1|NATS_PASSWORD|BwcHBwcHBwcHBwcHBwcHB2pc6d4zHg6Jp30mj7j04VY=|secret|t\n\
             1|NATS_PROTOCOL|nats|str|t\n\
             1|NATS_SERVERS|10.0.0.5:4222|str|t\n\
             1|NODE_SERVER_URL|https://10.0.0.5:443|str|t\n\
             2|NATS_PASSWORD|CQkJCQkJCQkJCQkJCQkJCWVPfxRLUGwfhXYnOO6FXR4=|secret|f\n\
             2|NATS_PROTOCOL|nats|str|f\n\
             2|NATS_SERVERS|10.1.0.9:4222|str|f\n\
             2|PROXY_ADDRESS|10.1.0.9|str|f",
            "release {release}: env after seed 000"
        );
        if proxy {
            assert_eq!(
                pg.psql(&db, "SELECT proxy_address FROM node_mgmt_cloudregion WHERE id = 2"),
                "10.1.0.9",
                "release {release}: region 2's proxy_address"
            );
        }
        if services {
            assert_eq!(
                pg.psql(
                    &db,
                    "SELECT name, status, deployed_status, description, deployed_message, message \
                     FROM node_mgmt_cloudregionservice WHERE cloud_region_id = 2 ORDER BY id"
                ),
                "stargazer|not_deployed|0|stargazer 服务||\nnats-executor|not_deployed|0|nats-executor 服务||",
                "release {release}: region 2's services"
            );
        }
        assert_eq!(
            pg.psql(&db, "SELECT is_called FROM node_mgmt_cloudregion_id_seq"),
            "f",
            "release {release}: seed 000 leaves the cloudregion identity unused"
        );
        assert_eq!(
            pg.psql(
                &db,
                "SELECT string_agg(cache_key, ',' ORDER BY cache_key) FROM django_cache"
            ),
            ":1:sidecar_env_cache_1,:1:sidecar_env_cache_2"
        );
    }
}

#[test]
fn each_fixture_names_its_release_and_reference_and_dumps_lose_only_what_psql_15_cannot_run() {
    for release in RELEASES {
        let sql = release_fixture(release);
        let header: String = sql
            .lines()
            .take_while(|l| l.starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            header.contains(&format!("release {release}")),
            "{release}.sql header: {header}"
        );
        match REFERENCES.iter().find(|(r, _)| *r == release) {
            Some((_, file)) => assert!(header.contains(file), "{release}.sql does not name {file}: {header}"),
            None => assert!(header.contains("Reference: none"), "{release}.sql: {header}"),
        }
    }
    let dump = "\\restrict AbC\nSET statement_timeout = 0;\nSET transaction_timeout = 0;\n\
                CREATE TABLE t (x text);\n\\unrestrict AbC\n";
    assert_eq!(
        loadable_dump(dump),
        "SET statement_timeout = 0;\nCREATE TABLE t (x text);"
    );
}
