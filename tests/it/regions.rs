//! Issue 4 and issue 10: seeding every cloud region's sidecar env against a real PostgreSQL, on
//! the node_mgmt tables of every BK-Lite release in the field (tests/fixtures/releases/, see
//! [`RELEASES`]), and the field failure's seed (tests/fixtures/seed-000.sql) on top of each.
//! Every test that touches the database loops over the releases, each with its own database on
//! the shared cluster; what it expects of a release is decided here, from what that release has
//! ([`proxy_column`], [`services_table`], ...). Secrets are checked against an independent
//! implementation (Python `cryptography`).

use crate::harness::{bkbundle, free_port, release_database, repo_root, unique_db_name, PgCluster, RELEASES};
use bkbundle::error::{Error, Kind};
use bkbundle::manifest::Regions;
use bkbundle::platform::regions::Action;
use bkbundle::platform::{crypto, db::DbError};
use bkbundle::regions::{self, Mode, RegionsError, RegionsOptions, RegionsReport};
use bkbundle::site::config::InstallConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SECRET_KEY: &str = "seed-000-secret-key";

// ---------------------------------------------------------------------------------------------
// What each release has (BKLITE.md, "Releases in the field"), as the tests expect it.

/// `node_mgmt_cloudregion.proxy_address` (0027 on).
pub(crate) fn proxy_column(release: &str) -> bool {
    !matches!(release, "0012" | "0022")
}

/// The table `node_mgmt_cloudregionservice` (0022 on).
pub(crate) fn services_table(release: &str) -> bool {
    release != "0012"
}

/// `node_mgmt_packageversion.cpu_architecture`, with the UNIQUE constraint over it (0032 on).
pub(crate) fn arch_column(release: &str) -> bool {
    matches!(release, "0032" | "0044")
}

/// The longest `sidecarenv.value` (varchar(200) before 0022; text after).
pub(crate) fn value_limit(release: &str) -> Option<usize> {
    (release == "0012").then_some(200)
}

/// The server's bucket when its NATS_NAMESPACE is unset: `bk_lite` up to December 2025,
/// `bklite` from 2026-01-08 (0027).
pub(crate) fn default_bucket(release: &str) -> &'static str {
    if matches!(release, "0012" | "0022") {
        "bk_lite"
    } else {
        "bklite"
    }
}

/// The last node_mgmt migration of the release's fixture, as reports name it.
pub(crate) fn release_label(release: &str) -> String {
    let m = match release {
        "0012" => "0012_sidecarapitoken_node_id_alter_sidecarapitoken_token",
        "0022" => "0022_alter_sidecarenv_value",
        "0027" => "0027_cloudregion_proxy_address",
        "0032" => "0032_architecture_support",
        "0044" => "0044_encrypt_installer_passwords",
        other => panic!("no expectations for release {other}"),
    };
    format!("node_mgmt migration {m}")
}

pub(crate) fn fixture(name: &str) -> String {
    let p = repo_root().join("tests/fixtures").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A fresh database of `release` on the shared cluster (with seed 000 on top when `seed`):
/// its name and URL.
pub(crate) fn release_db(release: &str, what: &str, seed: bool) -> (String, String) {
    let pg = PgCluster::shared();
    let name = unique_db_name(&format!("{what}_{release}"));
    let url = release_database(pg, release, &name);
    if seed {
        pg.psql_script(&name, &fixture("seed-000.sql"), "tests/fixtures/seed-000.sql");
    }
    (name, url)
}

/// The bundle's defaults, as manifests/bklite.toml has them (trimmed to what the tests need).
fn bundle_regions() -> Regions {
    let text = r#"
required = ["NODE_SERVER_URL", "NATS_SERVERS", "NATS_PROTOCOL", "NATS_PASSWORD"]
[env]
NODE_SERVER_URL = "${SERVER_URL}"
NATS_SERVERS = "${HOST_IP}:${NATS_PORT}"
NATS_PROTOCOL = "nats"
NATS_PASSWORD = "${NATS_ADMIN_PASSWORD}"
[[region]]
name = "default"
introduction = "default cloud region!"
proxy_address = ""
"#;
    toml::from_str(text).expect("bundle regions")
}

/// The site values (what the stack's .env would hold).
fn site() -> BTreeMap<String, String> {
    [
        ("SERVER_URL", "https://10.0.0.5:443"),
        ("HOST_IP", "10.0.0.5"),
        ("NATS_PORT", "4222"),
        ("NATS_ADMIN_PASSWORD", "nats-admin-pw"),
        ("SECRET_KEY", SECRET_KEY),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn options(mode: Mode, config: &str, url: &str) -> RegionsOptions {
    let config = InstallConfig::parse(config, "install.toml").expect("install config");
    let mut o = RegionsOptions::new(mode, &bundle_regions(), &config, site());
    o.database_url = Some(url.to_string());
    o
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn apply(mode: Mode, config: &str, url: &str) -> Result<RegionsReport, RegionsError> {
    rt().block_on(regions::run_with_env(&options(mode, config, url), &no_env))
}

/// Every row of the tables bkbundle writes that the database has (with its xmin, which changes
/// on any update), the cache keys and the identity sequences: equal snapshots mean nothing was
/// written.
pub(crate) fn snapshot(pg: &PgCluster, db: &str) -> String {
    let tables = pg.psql(
        db,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() AND table_name IN \
         ('node_mgmt_cloudregion', 'node_mgmt_sidecarenv', 'node_mgmt_cloudregionservice', 'node_mgmt_packageversion') \
         ORDER BY 1",
    );
    let mut sql = String::new();
    for t in tables.lines() {
        sql.push_str(&format!(
            "SELECT '{t}'; SELECT xmin, * FROM {t} ORDER BY id; \
             SELECT last_value, is_called FROM {t}_id_seq; "
        ));
    }
    sql.push_str("SELECT cache_key FROM django_cache ORDER BY 1;");
    pg.psql(db, &sql)
}

fn env_row(pg: &PgCluster, db: &str, region: i64, key: &str) -> String {
    pg.psql(
        db,
        &format!(
            "SELECT value || '|' || type || '|' || is_pre || '|' || description FROM node_mgmt_sidecarenv \
             WHERE cloud_region_id = {region} AND key = '{key}'"
        ),
    )
}

fn key_action(r: &RegionsReport, region: &str, key: &str) -> Option<Action> {
    r.regions
        .iter()
        .find(|x| x.name == region)
        .and_then(|x| x.keys.iter().find(|k| k.key == key))
        .and_then(|k| k.action)
}

const PY_DECRYPT: &str = r#"
import sys, hashlib, base64
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives import padding
sk, v = sys.argv[1], sys.argv[2]
raw = base64.urlsafe_b64decode(v + '=' * (-len(v) % 4))
key = hashlib.sha256(sk.encode()).digest()
d = Cipher(algorithms.AES(key), modes.CBC(raw[:16])).decryptor()
u = padding.PKCS7(128).unpadder()
sys.stdout.write((u.update(d.update(raw[16:]) + d.finalize()) + u.finalize()).decode())
"#;

const PY_ENCRYPT: &str = r#"
import sys, os, hashlib, base64
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives import padding
sk, plain = sys.argv[1], sys.argv[2]
key = hashlib.sha256(sk.encode()).digest()
iv = os.urandom(16)
p = padding.PKCS7(128).padder()
data = p.update(plain.encode()) + p.finalize()
e = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
sys.stdout.write(base64.urlsafe_b64encode(iv + e.update(data) + e.finalize()).decode())
"#;

/// Run a Python script with `cryptography`; panics with how to install it.
fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}: install it with scripts/setup.sh"));
    assert!(
        out.status.success(),
        "python failed (is `cryptography` installed? run scripts/setup.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A fake Redis on 127.0.0.1 for one connection, answering AUTH (with `password`), SELECT and
/// DEL like Redis; the commands it got come through the channel.
fn fake_redis(password: &'static str) -> (u16, std::sync::mpsc::Receiver<Vec<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a fake Redis");
    let port = listener.local_addr().expect("its port").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else { return };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut writer = stream.try_clone().expect("clone the stream");
        let mut reader = BufReader::new(stream);
        let mut commands = Vec::new();
        loop {
            let mut head = String::new();
            if reader.read_line(&mut head).unwrap_or(0) == 0 {
                break;
            }
            let n: usize = head.trim().trim_start_matches('*').parse().unwrap_or(0);
            let mut args = Vec::new();
            for _ in 0..n {
                let (mut len, mut arg) = (String::new(), String::new());
                let _ = reader.read_line(&mut len);
                let _ = reader.read_line(&mut arg);
                args.push(arg.trim_end_matches(['\r', '\n']).to_string());
            }
            let answer: &[u8] = match args.first().map(String::as_str) {
                Some("AUTH") if args.get(1).map(String::as_str) == Some(password) => b"+OK\r\n",
                Some("AUTH") => b"-WRONGPASS invalid username-password pair\r\n",
                Some("SELECT") => b"+OK\r\n",
                Some("DEL") => b":1\r\n",
                _ => b"-ERR unknown command\r\n",
            };
            let _ = writer.write_all(answer);
            let done = args.first().map(String::as_str) == Some("DEL");
            commands.push(args);
            if done {
                break;
            }
        }
        let _ = tx.send(commands);
    });
    (port, rx)
}

/// Region 1 and its service rows as they are, every column but the timestamps (JSON, one row a
/// line), for comparing with what bkbundle writes.
fn region_one_rows(pg: &PgCluster, db: &str, release: &str) -> String {
    let mut sql =
        "SELECT to_jsonb(r) - 'created_at' - 'updated_at' FROM node_mgmt_cloudregion r WHERE id = 1;".to_string();
    if services_table(release) {
        sql.push_str(
            "SELECT to_jsonb(s) - 'id' FROM node_mgmt_cloudregionservice s WHERE cloud_region_id = 1 ORDER BY name;",
        );
    }
    pg.psql(db, &sql)
}

#[test]
fn each_release_is_detected_and_seeded_from_empty() {
    let pg = PgCluster::shared();
    for release in RELEASES {
        // The server's first start: region 1 without env rows (and its services).
        let (db, url) = release_db(release, "empty", false);
        let server_made = region_one_rows(pg, &db, release);
        let r = apply(Mode::Apply, "", &url).unwrap_or_else(|e| panic!("{release}: {e}"));
        assert_eq!(r.release, Some(release_label(release)), "{release}");
        assert_eq!((r.created, r.updated, r.unchanged), (4, 0, 0), "{release}: {r:?}");
        assert_eq!(
            r.regions[0].action,
            Some(Action::Unchanged),
            "{release}: region 1 is the server's"
        );
        assert!(r.services_added.is_empty(), "{release}: {:?}", r.services_added);
        assert_eq!(region_one_rows(pg, &db, release), server_made, "{release}");
        assert_eq!(
            env_row(pg, &db, 1, "NODE_SERVER_URL"),
            "https://10.0.0.5:443|str|true|",
            "{release}"
        );
        assert_eq!(
            env_row(pg, &db, 1, "NATS_SERVERS"),
            "10.0.0.5:4222|str|true|",
            "{release}"
        );
        let pw = env_row(pg, &db, 1, "NATS_PASSWORD");
        assert!(
            pw.ends_with("|secret|true|") && !pw.contains("nats-admin-pw"),
            "{release}: {pw}"
        );

        // Before the server's first start (no region 1): bkbundle creates region 1 and its
        // service rows exactly as the server's cloud_init of this release does.
        pg.psql(
            &db,
            &format!(
                "DELETE FROM node_mgmt_sidecarenv; {} DELETE FROM node_mgmt_cloudregion;",
                if services_table(release) {
                    "DELETE FROM node_mgmt_cloudregionservice;"
                } else {
                    ""
                }
            ),
        );
        let r = apply(Mode::Apply, "", &url).unwrap_or_else(|e| panic!("{release}: {e}"));
        assert_eq!(r.regions[0].action, Some(Action::Create), "{release}");
        assert_eq!(r.regions[0].id, Some(1), "{release}");
        assert_eq!(r.created, 4, "{release}");
        assert_eq!(
            region_one_rows(pg, &db, release),
            server_made,
            "{release}: region 1 as the server makes it"
        );
        let row = pg.psql(
            &db,
            "SELECT id, name, introduction, created_by, updated_by, domain, updated_by_domain FROM node_mgmt_cloudregion",
        );
        assert_eq!(
            row, "1|default|default cloud region!|||domain.com|domain.com",
            "{release}"
        );
        if proxy_column(release) {
            assert_eq!(
                pg.psql(&db, "SELECT proxy_address = '' FROM node_mgmt_cloudregion"),
                "t",
                "{release}"
            );
        }
        if release == "0044" {
            assert_eq!(
                pg.psql(
                    &db,
                    "SELECT pending_proxy_address IS NULL AND pending_proxy_address_created_at IS NULL FROM node_mgmt_cloudregion"
                ),
                "t"
            );
        }
        assert_eq!(
            env_row(pg, &db, 1, "NODE_SERVER_URL"),
            "https://10.0.0.5:443|str|true|",
            "{release}"
        );
    }
}

#[test]
fn tables_missing_means_not_migrated_and_the_wait_is_bounded() {
    let pg = PgCluster::shared();
    let name = unique_db_name("empty");
    let url = pg.create_database(&name);
    let e = apply(Mode::Apply, "", &url).unwrap_err();
    assert!(matches!(e, RegionsError::Db(DbError::NotMigrated { .. })), "{e}");
    let err = Error::from(e);
    assert_eq!(err.kind, Kind::External);
    assert!(
        err.message.contains("the server has not run its migrations yet")
            && err.message.contains("node_mgmt_cloudregion"),
        "{}",
        err.message
    );

    // Waiting: gives up after the bound...
    let mut o = options(Mode::Apply, "", &url);
    o.wait_for_migrations = Some(Duration::from_secs(2));
    let t = Instant::now();
    let e = rt().block_on(regions::run_with_env(&o, &no_env)).unwrap_err();
    assert!(
        matches!(e, RegionsError::Db(DbError::NotMigrated { .. })) && e.to_string().contains("waited 2 s"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(15));
    // ...and goes on as soon as the tables of any release appear (the releases side by side:
    // each wait is mostly sleeping).
    std::thread::scope(|s| {
        let waits: Vec<_> = RELEASES
            .iter()
            .map(|&release| {
                let h = s.spawn(move || {
                    let name = unique_db_name(&format!("migrating_{release}"));
                    let mut o = options(Mode::Apply, "", &pg.create_database(&name));
                    o.wait_for_migrations = Some(Duration::from_secs(60));
                    let migrate = std::thread::scope(|s| {
                        let h = s.spawn(|| {
                            std::thread::sleep(Duration::from_millis(500));
                            pg.psql_script(&name, &crate::harness::release_fixture(release), release);
                        });
                        let r = rt().block_on(regions::run_with_env(&o, &no_env));
                        h.join().expect("migrate thread");
                        r
                    });
                    migrate.unwrap_or_else(|e| panic!("{release}: apply after waiting: {e}"))
                });
                (release, h)
            })
            .collect();
        for (release, h) in waits {
            let r = h.join().expect("a waiting apply panicked");
            assert_eq!(r.created, 4, "{release}");
            assert_eq!(r.release, Some(release_label(release)));
        }
    });
}

#[test]
fn seed_000_region_without_node_server_url_is_refused_and_nothing_is_written() {
    let pg = PgCluster::shared();
    for release in RELEASES {
        let (db, url) = release_db(release, "seed", true);
        let before = snapshot(pg, &db);
        // Region 2 is in the database, not in the config: checked, not guessed.
        let e = apply(Mode::Apply, "", &url).unwrap_err();
        let msg = Error::from(e).message;
        assert!(
            msg.contains("region \"east\", NODE_SERVER_URL: required by the bundle and missing")
                && msg.contains("nothing was written"),
            "{release}: {msg}"
        );
        assert_eq!(snapshot(pg, &db), before, "{release}: a refused run writes nothing");

        // A `null` stored in region 2 is refused the same way.
        pg.psql(
            &db,
            "BEGIN; INSERT INTO node_mgmt_sidecarenv (key, value, type, description, cloud_region_id, is_pre) \
             VALUES ('NODE_SERVER_URL', 'null', 'str', '', 2, false); COMMIT;",
        );
        let before = snapshot(pg, &db);
        let msg = Error::from(apply(Mode::Apply, "", &url).unwrap_err()).message;
        assert!(
            msg.contains("region \"east\", NODE_SERVER_URL: the stored value: it is the literal \"null\""),
            "{release}: {msg}"
        );
        assert_eq!(snapshot(pg, &db), before, "{release}");
        pg.psql(
            &db,
            "DELETE FROM node_mgmt_sidecarenv WHERE cloud_region_id = 2 AND key = 'NODE_SERVER_URL'",
        );

        // Declared, region 2 is seeded from the default's values with its proxy host; its rows
        // that are already right (the secret written by Python, too) are left alone.
        let (redis_port, redis_commands) = fake_redis("cache-pw");
        let config = format!(
            "[database]\nredis_url = \"redis://:${{REDIS_PASSWORD}}@127.0.0.1:{redis_port}/1\"\n\
             [[regions]]\nname = \"east\"\nproxy_address = \"10.1.0.9\"\n"
        );
        let mut o = options(Mode::Apply, &config, &url);
        o.site.insert("REDIS_PASSWORD".into(), "cache-pw".into());
        let r = rt()
            .block_on(regions::run_with_env(&o, &no_env))
            .unwrap_or_else(|e| panic!("{release}: {e}"));
        assert_eq!(key_action(&r, "east", "NODE_SERVER_URL"), Some(Action::Create));
        assert_eq!(key_action(&r, "east", "NATS_SERVERS"), Some(Action::Unchanged));
        assert_eq!(key_action(&r, "east", "NATS_PASSWORD"), Some(Action::Unchanged));
        assert_eq!(key_action(&r, "east", "PROXY_ADDRESS"), Some(Action::Unchanged));
        assert_eq!(key_action(&r, "default", "NATS_PASSWORD"), Some(Action::Unchanged));
        assert_eq!((r.created, r.updated), (1, 0), "{release}: {r:?}");
        assert!(
            r.services_added.is_empty(),
            "{release}: east has its services: {:?}",
            r.services_added
        );
        // An editable copy, as the server's own copy of region 1's rows is.
        assert_eq!(
            env_row(pg, &db, 2, "NODE_SERVER_URL"),
            "https://10.1.0.9:443|str|false|",
            "{release}"
        );
        // The touched region's cached env is gone; the untouched region's is kept.
        assert_eq!(
            pg.psql(&db, "SELECT cache_key FROM django_cache"),
            ":1:sidecar_env_cache_1"
        );
        assert_eq!(r.cache.keys, vec![":1:sidecar_env_cache_2".to_string()]);
        assert_eq!(r.cache.database_entries, Some(1));
        // ... and from the Redis cache.
        let commands = redis_commands
            .recv_timeout(Duration::from_secs(10))
            .expect("bkbundle talked to the Redis cache");
        assert_eq!(
            commands,
            [
                vec!["AUTH", "cache-pw"],
                vec!["SELECT", "1"],
                vec!["DEL", ":1:sidecar_env_cache_2"]
            ]
        );
        assert_eq!(r.cache.redis_entries, Some(1));
        assert_eq!(r.cache.backend.as_deref(), Some("redis"));
        assert!(r.cache.cleared, "{release}: {:?}", r.cache);
        assert!(!r.notes.iter().any(|n| n.contains("Redis")), "{:?}", r.notes);
    }
}

#[test]
fn a_null_value_in_the_config_is_refused_naming_region_and_key() {
    let pg = PgCluster::shared();
    for release in RELEASES {
        let (db, url) = release_db(release, "nullcfg", false);
        let before = snapshot(pg, &db);
        let config = "[[regions]]\nname = \"west\"\n[regions.env]\nNODE_SERVER_URL = \"null\"\n\
                      [[regions]]\nname = \"north\"\n[regions.env]\nNODE_SERVER_URL = \"/api\"\n";
        let msg = Error::from(apply(Mode::Apply, config, &url).unwrap_err()).message;
        assert!(
            msg.contains("region \"west\", NODE_SERVER_URL: it is the literal \"null\"")
                && msg.contains("region \"north\", NODE_SERVER_URL: it is a bare path")
                && msg.contains("2 problem(s)"),
            "{release}: {msg}"
        );
        assert_eq!(snapshot(pg, &db), before, "{release}");
    }
}

/// The region row bkbundle wrote: name, introduction, the proxy column where the release has
/// it, maintainer.
fn region_row(pg: &PgCluster, db: &str, release: &str, id: i64) -> String {
    let proxy = if proxy_column(release) { "proxy_address, " } else { "" };
    pg.psql(
        db,
        &format!("SELECT name, introduction, {proxy}created_by, domain FROM node_mgmt_cloudregion WHERE id = {id}"),
    )
}

/// The service rows of region `id`: name, status, deployed_status, description, messages.
fn service_rows(pg: &PgCluster, db: &str, id: i64) -> String {
    pg.psql(
        db,
        &format!(
            "SELECT name, status, deployed_status, description, deployed_message, message \
             FROM node_mgmt_cloudregionservice WHERE cloud_region_id = {id} ORDER BY name"
        ),
    )
}

#[test]
fn proxy_address_replaces_the_host_and_ids_never_collide() {
    let pg = PgCluster::shared();
    for release in RELEASES {
        // The server's first start left region 1 with an explicit id, the identity sequence at 1.
        let (db, url) = release_db(release, "proxy", false);
        let config = "[[regions]]\nname = \"west\"\nintroduction = \"west site\"\nproxy_address = \"10.2.0.7\"\n\
                      [regions.env]\nSTARGAZER_URL = \"http://10.2.0.7:8083\"\n";
        let r = apply(Mode::Apply, config, &url).unwrap_or_else(|e| panic!("{release}: {e}"));
        let west = r.regions.iter().find(|x| x.name == "west").unwrap();
        assert_eq!(west.id, Some(2), "{release}: region 2 after the explicit id 1");
        assert_eq!(west.action, Some(Action::Create));
        // No Redis and no server container known: nothing can clear the server's cache, and the
        // report says so instead of claiming it was cleared.
        assert_eq!(r.cache.backend.as_deref(), Some("unknown"), "{release}");
        assert!(!r.cache.cleared, "{release}: {:?}", r.cache);
        let text = regions::render(&r);
        assert!(
            !text.contains("server cache cleared") && text.contains("agents may get the old values for up to 300 s"),
            "{release}: {text}"
        );
        assert_eq!(
            env_row(pg, &db, 2, "NODE_SERVER_URL"),
            "https://10.2.0.7:443|str|false|",
            "{release}"
        );
        assert_eq!(env_row(pg, &db, 2, "NATS_SERVERS"), "10.2.0.7:4222|str|false|");
        assert_eq!(env_row(pg, &db, 2, "STARGAZER_URL"), "http://10.2.0.7:8083|str|false|");
        assert_eq!(env_row(pg, &db, 2, "PROXY_ADDRESS"), "10.2.0.7|str|false|");
        assert_eq!(env_row(pg, &db, 1, "NODE_SERVER_URL"), "https://10.0.0.5:443|str|true|");
        let expected = if proxy_column(release) {
            "west|west site|10.2.0.7|system|domain.com"
        } else {
            "west|west site|system|domain.com"
        };
        assert_eq!(region_row(pg, &db, release, 2), expected, "{release}");
        // The server (or the UI) creating a region next gets a fresh id too.
        let (cols, vals) = if proxy_column(release) {
            (", proxy_address", ", ''")
        } else {
            ("", "")
        };
        let next = pg.psql(
            &db,
            &format!(
                "INSERT INTO node_mgmt_cloudregion (created_at, updated_at, created_by, updated_by, domain, \
                 updated_by_domain, name, introduction{cols}) VALUES (now(), now(), 'admin', 'admin', \
                 'domain.com', 'domain.com', 'ui-made', ''{vals}) RETURNING id"
            ),
        );
        assert_eq!(next.lines().next(), Some("3"), "{release}: {next}");
        // (A region without env rows would now be refused, as the seed 000 test shows.)
        pg.psql(&db, "DELETE FROM node_mgmt_cloudregion WHERE name = 'ui-made'");
        // Changing the proxy updates its proxied keys and PROXY_ADDRESS, and the region's column
        // where the release has one.
        let config2 = config.replace("10.2.0.7\"\n[regions", "10.2.0.8\"\n[regions");
        let r = apply(Mode::Apply, &config2, &url).unwrap_or_else(|e| panic!("{release}: {e}"));
        let expected = if proxy_column(release) {
            Action::Update
        } else {
            Action::Unchanged
        };
        assert_eq!(
            r.regions.iter().find(|x| x.name == "west").unwrap().action,
            Some(expected),
            "{release}"
        );
        assert_eq!(key_action(&r, "west", "NODE_SERVER_URL"), Some(Action::Update));
        assert_eq!(key_action(&r, "west", "PROXY_ADDRESS"), Some(Action::Update));
        assert_eq!(key_action(&r, "west", "STARGAZER_URL"), Some(Action::Unchanged));
        assert_eq!(env_row(pg, &db, 2, "NATS_SERVERS"), "10.2.0.8:4222|str|false|");
        assert_eq!(env_row(pg, &db, 2, "PROXY_ADDRESS"), "10.2.0.8|str|false|");
        if proxy_column(release) {
            assert_eq!(
                pg.psql(&db, "SELECT proxy_address FROM node_mgmt_cloudregion WHERE id = 2"),
                "10.2.0.8"
            );
        }
    }
}

#[test]
fn a_region_created_by_apply_looks_like_one_the_server_creates_on_each_release() {
    let pg = PgCluster::shared();
    for release in RELEASES {
        // Seed 000's east is a region made in the UI of this release: west must look the same.
        let (db, url) = release_db(release, "server_like", true);
        pg.psql(
            &db,
            "INSERT INTO node_mgmt_sidecarenv (key, value, type, description, cloud_region_id, is_pre) \
             VALUES ('NODE_SERVER_URL', 'https://10.1.0.9:443', 'str', '', 2, false)",
        );
        let config = "[[regions]]\nname = \"west\"\nintroduction = \"west site\"\nproxy_address = \"10.2.0.7\"\n";
        let r = apply(Mode::Apply, config, &url).unwrap_or_else(|e| panic!("{release}: {e}"));
        assert_eq!(r.release, Some(release_label(release)), "{release}");
        let west = r.regions.iter().find(|x| x.name == "west").unwrap();
        assert_eq!((west.id, west.action), (Some(3), Some(Action::Create)), "{release}");
        let render = regions::render(&r);
        assert!(render.contains(&release_label(release)), "{render}");

        // Env rows: region 1's keys, editable (is_pre false), the proxy host substituted, and
        // PROXY_ADDRESS; the same keys, types and flags as east's.
        let rows = |id: i64| {
            pg.psql(
                &db,
                &format!(
                    "SELECT key || '|' || type || '|' || is_pre || '|' || description FROM node_mgmt_sidecarenv \
                     WHERE cloud_region_id = {id} ORDER BY key"
                ),
            )
        };
        assert_eq!(rows(3), rows(2), "{release}: west's env rows as east's");
        assert_eq!(
            pg.psql(
                &db,
                "SELECT count(*) FROM node_mgmt_sidecarenv WHERE cloud_region_id = 3 AND is_pre"
            ),
            "0"
        );
        assert_eq!(env_row(pg, &db, 3, "PROXY_ADDRESS"), "10.2.0.7|str|false|");
        assert_eq!(
            env_row(pg, &db, 3, "NODE_SERVER_URL"),
            "https://10.2.0.7:443|str|false|"
        );
        let pw = pg.psql(
            &db,
            "SELECT value FROM node_mgmt_sidecarenv WHERE cloud_region_id = 3 AND key = 'NATS_PASSWORD'",
        );
        assert_eq!(python(PY_DECRYPT, &[SECRET_KEY, &pw]), "nats-admin-pw");

        // The region row: the proxy column only where the release has one.
        let expected = if proxy_column(release) {
            "west|west site|10.2.0.7|system|domain.com"
        } else {
            "west|west site|system|domain.com"
        };
        assert_eq!(region_row(pg, &db, release, 3), expected, "{release}");
        assert_eq!(
            pg.psql(
                &db,
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'node_mgmt_cloudregion' AND column_name = 'proxy_address'"
            ),
            if proxy_column(release) { "1" } else { "0" },
            "{release}: bkbundle never changes the schema"
        );

        // Its two service rows where the table exists, exactly as the UI made east's.
        if services_table(release) {
            assert_eq!(
                r.services_added,
                vec!["west/stargazer".to_string(), "west/nats-executor".to_string()],
                "{release}"
            );
            assert_eq!(
                service_rows(pg, &db, 3),
                "nats-executor|not_deployed|0|nats-executor 服务||\nstargazer|not_deployed|0|stargazer 服务||"
            );
            assert_eq!(service_rows(pg, &db, 3), service_rows(pg, &db, 2), "{release}");
        } else {
            assert!(r.services_added.is_empty(), "{release}: {:?}", r.services_added);
        }

        // A managed region without its service rows (an older bkbundle's, or made by hand) gets
        // them on apply; nothing else changes.
        if services_table(release) {
            pg.psql(
                &db,
                "DELETE FROM node_mgmt_cloudregionservice WHERE cloud_region_id = 3 AND name = 'stargazer'",
            );
            let r = apply(Mode::DryRun, config, &url).unwrap();
            assert_eq!(r.services_added, vec!["west/stargazer".to_string()], "{release}");
            assert!(r.changes());
            let r = apply(Mode::Apply, config, &url).unwrap();
            assert_eq!(r.services_added, vec!["west/stargazer".to_string()], "{release}");
            assert_eq!((r.created, r.updated), (0, 0), "{release}");
            assert!(regions::render(&r).contains("service rows added: west/stargazer"));
            assert_eq!(service_rows(pg, &db, 3), service_rows(pg, &db, 2), "{release}");
        }
        let before = snapshot(pg, &db);
        let r = apply(Mode::Apply, config, &url).unwrap();
        assert!(!r.changes(), "{release}: {r:?}");
        assert_eq!(snapshot(pg, &db), before, "{release}");
    }
}

#[test]
fn secrets_round_trip_with_python_cryptography() {
    let pg = PgCluster::shared();
    for release in RELEASES {
        let (db, url) = release_db(release, "secrets", false);
        apply(Mode::Apply, "", &url).unwrap_or_else(|e| panic!("{release}: {e}"));
        let stored = pg.psql(
            &db,
            "SELECT value FROM node_mgmt_sidecarenv WHERE cloud_region_id = 1 AND key = 'NATS_PASSWORD'",
        );
        assert!(
            !stored.contains('=') && !stored.contains('+') && !stored.contains('/'),
            "{stored}"
        );
        assert_eq!(
            python(PY_DECRYPT, &[SECRET_KEY, &stored]),
            "nats-admin-pw",
            "{release}: bkbundle -> Python"
        );

        // Python -> bkbundle: the library decrypts it, and apply sees the same plaintext as
        // unchanged.
        let from_python = python(PY_ENCRYPT, &[SECRET_KEY, "nats-admin-pw"]);
        assert!(from_python.ends_with('='), "Python keeps the padding: {from_python}");
        let key = crypto::SecretKey::from_django(SECRET_KEY);
        assert_eq!(crypto::decrypt(&key, &from_python).unwrap(), "nats-admin-pw");
        pg.psql(
            &db,
            &format!(
                "UPDATE node_mgmt_sidecarenv SET value = '{from_python}' WHERE cloud_region_id = 1 AND key = 'NATS_PASSWORD'"
            ),
        );
        let before = snapshot(pg, &db);
        let r = apply(Mode::Apply, "", &url).expect("apply");
        assert_eq!(key_action(&r, "default", "NATS_PASSWORD"), Some(Action::Unchanged));
        assert_eq!(snapshot(pg, &db), before, "{release}: a re-encryption is not a change");

        // A new password is re-encrypted (and never shown).
        let mut o = options(Mode::Apply, "", &url);
        o.site.insert("NATS_ADMIN_PASSWORD".into(), "rotated-pw".into());
        let r = rt().block_on(regions::run_with_env(&o, &no_env)).expect("apply");
        assert_eq!(key_action(&r, "default", "NATS_PASSWORD"), Some(Action::Update));
        let text = regions::render(&r) + &serde_json::to_string(&r).unwrap();
        assert!(
            !text.contains("rotated-pw") && !text.contains("nats-admin-pw"),
            "{text}"
        );
        let stored = pg.psql(
            &db,
            "SELECT value FROM node_mgmt_sidecarenv WHERE cloud_region_id = 1 AND key = 'NATS_PASSWORD'",
        );
        assert_eq!(python(PY_DECRYPT, &[SECRET_KEY, &stored]), "rotated-pw", "{release}");

        // The wrong SECRET_KEY cannot compare the stored secret: refused, not overwritten.
        let before = snapshot(pg, &db);
        let mut o = options(Mode::Apply, "", &url);
        o.site.insert("SECRET_KEY".into(), "not-the-servers-key".into());
        let e = rt().block_on(regions::run_with_env(&o, &no_env)).unwrap_err();
        assert!(
            e.to_string()
                .contains("region \"default\", NATS_PASSWORD: the stored secret"),
            "{release}: {e}"
        );
        assert_eq!(snapshot(pg, &db), before, "{release}");
    }
}

#[test]
fn a_rerun_reports_everything_unchanged_and_touches_no_row() {
    let pg = PgCluster::shared();
    for release in RELEASES {
        let (db, url) = release_db(release, "rerun", true);
        let config = "[[regions]]\nname = \"east\"\nproxy_address = \"10.1.0.9\"\n";
        let first = apply(Mode::Apply, config, &url).unwrap_or_else(|e| panic!("{release}: {e}"));
        assert!(first.changes());
        // Let the server cache again, then re-run.
        pg.psql(
            &db,
            "INSERT INTO django_cache VALUES (':1:sidecar_env_cache_2', 'x', now() + interval '300 s') ON CONFLICT DO NOTHING",
        );
        let before = snapshot(pg, &db);
        let second = apply(Mode::Apply, config, &url).expect("second apply");
        assert_eq!((second.created, second.updated), (0, 0), "{release}: {second:?}");
        // default: 4 keys; east: the same 4 and PROXY_ADDRESS.
        assert_eq!(second.unchanged, 9, "{release}");
        assert!(!second.changes());
        assert!(second.services_added.is_empty());
        assert!(second.regions.iter().all(|r| r.action == Some(Action::Unchanged)));
        assert!(second.cache.keys.is_empty(), "nothing changed, nothing to invalidate");
        assert_eq!(snapshot(pg, &db), before, "{release}: no row, xmin or sequence changed");
    }
}

#[test]
fn dry_run_shows_the_diff_and_writes_nothing() {
    let pg = PgCluster::shared();
    for release in RELEASES {
        let (db, url) = release_db(release, "dry", true);
        let before = snapshot(pg, &db);
        let config = "[[regions]]\nname = \"east\"\nproxy_address = \"10.1.0.9\"\n\
                      [[regions]]\nname = \"south\"\nproxy_address = \"10.3.0.1\"\n";
        let r = apply(Mode::DryRun, config, &url).unwrap_or_else(|e| panic!("{release}: {e}"));
        assert_eq!(r.mode, Mode::DryRun);
        assert_eq!(r.release, Some(release_label(release)));
        assert_eq!(key_action(&r, "east", "NODE_SERVER_URL"), Some(Action::Create));
        assert_eq!(key_action(&r, "south", "PROXY_ADDRESS"), Some(Action::Create));
        let south = r.regions.iter().find(|x| x.name == "south").unwrap();
        assert_eq!((south.action, south.id), (Some(Action::Create), None));
        // east's NODE_SERVER_URL, and south's 4 keys and PROXY_ADDRESS.
        assert_eq!(r.created, 6, "{release}: {r:?}");
        let services: Vec<String> = if services_table(release) {
            vec!["south/stargazer".into(), "south/nats-executor".into()]
        } else {
            vec![]
        };
        assert_eq!(r.services_added, services, "{release}");
        assert!(
            regions::render(&r).contains("would create 6"),
            "{}",
            regions::render(&r)
        );
        assert_eq!(snapshot(pg, &db), before, "{release}");
    }
}

#[test]
fn a_value_longer_than_0012s_varchar_200_is_refused_before_anything_is_written() {
    let pg = PgCluster::shared();
    // A valid URL (labels of at most 63 characters) longer than 200 characters.
    let long = format!("http://{}.example:8083", vec!["a".repeat(60); 3].join("."));
    assert!(long.len() > 200);
    let config = format!(
        "[[regions]]\nname = \"default\"\n[regions.env]\nSTARGAZER_URL = \"{long}\"\n\
         [[regions]]\nname = \"east\"\nproxy_address = \"10.1.0.9\"\n"
    );
    for release in RELEASES {
        let (db, url) = release_db(release, "long", false);
        let before = snapshot(pg, &db);
        let result = apply(Mode::Apply, &config, &url);
        match value_limit(release) {
            Some(limit) => {
                let msg = Error::from(result.unwrap_err()).message;
                assert!(
                    msg.contains(&format!(
                        "region \"default\", STARGAZER_URL: the value is {} characters",
                        long.len()
                    )) && msg.contains(&format!("at most {limit}"))
                        && msg.contains(&release_label(release)),
                    "{release}: {msg}"
                );
                // east inherits it too: named as well.
                assert!(msg.contains("region \"east\", STARGAZER_URL"), "{release}: {msg}");
                assert_eq!(snapshot(pg, &db), before, "{release}: nothing written");
            }
            None => {
                let r = result.unwrap_or_else(|e| panic!("{release}: {e}"));
                assert_eq!(key_action(&r, "default", "STARGAZER_URL"), Some(Action::Create));
                assert_eq!(env_row(pg, &db, 1, "STARGAZER_URL"), format!("{long}|str|true|"));
            }
        }
    }
}

#[test]
fn a_database_down_or_refusing_the_password_is_clear_and_changes_nothing() {
    let pg = PgCluster::shared();
    for release in RELEASES {
        let (db, url) = release_db(release, "auth", true);
        let before = snapshot(pg, &db);
        let wrong = url.replace(&pg.password, "wrong-password");
        let err = Error::from(apply(Mode::Apply, "[[regions]]\nname = \"east\"\n", &wrong).unwrap_err());
        assert_eq!(err.kind, Kind::External);
        let where_ = format!("postgres@127.0.0.1:{}/{db}", pg.port);
        assert!(
            err.message.contains(&where_)
                && err.message.contains("refused user postgres")
                && err.message.contains("password authentication failed")
                && !err.message.contains("wrong-password"),
            "{}",
            err.message
        );
        assert!(
            err.hints.iter().any(|h| h.contains("POSTGRES_PASSWORD")),
            "{:?}",
            err.hints
        );
        assert_eq!(snapshot(pg, &db), before);

        let down = free_port();
        let err = Error::from(
            apply(
                Mode::Apply,
                "[[regions]]\nname = \"east\"\n",
                &format!("postgres://postgres:x@127.0.0.1:{down}/{db}"),
            )
            .unwrap_err(),
        );
        assert_eq!(err.kind, Kind::External);
        assert!(
            err.message
                .contains(&format!("cannot reach PostgreSQL at postgres@127.0.0.1:{down}/{db}"))
                && err.message.contains("nothing was changed"),
            "{}",
            err.message
        );
        assert!(
            err.hints.iter().any(|h| h.contains("docker compose ps postgres")),
            "{:?}",
            err.hints
        );
        assert_eq!(snapshot(pg, &db), before, "{release}");
    }
}

/// A bundle holding only the demo stack and region defaults (no images: no engine needed).
fn regions_bundle(dir: &Path) -> std::path::PathBuf {
    let recipe = dir.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "format = 1\n[bundle]\nname = \"regions-test\"\nversion = \"1\"\n\
             [stack]\ndir = \"{}\"\ncompose = \"docker-compose.yml\"\n\
             [regions]\nrequired = [\"NODE_SERVER_URL\", \"NATS_SERVERS\", \"NATS_PROTOCOL\", \"NATS_PASSWORD\"]\n\
             [regions.env]\nNODE_SERVER_URL = \"${{SERVER_URL}}\"\nNATS_SERVERS = \"${{HOST_IP}}:4222\"\n\
             NATS_PROTOCOL = \"nats\"\nNATS_PASSWORD = \"${{NATS_ADMIN_PASSWORD}}\"\n",
            repo_root().join("examples/demo/stack").display()
        ),
    )
    .unwrap();
    let out = dir.join("regions.bkb");
    let r = bkbundle()
        .args(["pack", recipe.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(r.status.success(), "pack: {}", String::from_utf8_lossy(&r.stderr));
    out
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn bk(args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = bkbundle();
    for v in [
        "DATABASE_URL",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGPASSWORD",
        "PGDATABASE",
        "SECRET_KEY",
    ] {
        cmd.env_remove(v);
    }
    let out = cmd.args(args).envs(env.iter().copied()).output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What the CLI tests give bkbundle: a regions bundle, the stack's .env and an install config
/// declaring east with its proxy.
struct CliSite {
    _dir: tempfile::TempDir,
    bundle: PathBuf,
    env_file: PathBuf,
    config: PathBuf,
}

impl CliSite {
    fn new(config: &str) -> CliSite {
        let dir = tempfile::tempdir().unwrap();
        let bundle = regions_bundle(dir.path());
        let env_file = dir.path().join(".env");
        std::fs::write(
            &env_file,
            format!("HOST_IP=10.0.0.5\nNATS_ADMIN_PASSWORD=nats-admin-pw\nSECRET_KEY={SECRET_KEY}\n"),
        )
        .unwrap();
        let path = dir.path().join("install.toml");
        std::fs::write(
            &path,
            format!("format = 1\n[env]\nSERVER_URL = \"https://10.0.0.5:443\"\n{config}"),
        )
        .unwrap();
        CliSite {
            _dir: dir,
            bundle,
            env_file,
            config: path,
        }
    }

    /// `regions SUBCOMMAND --bundle B --config C --env-file E EXTRA...`
    fn regions(&self, sub: &str, extra: &[&str], env: &[(&str, &str)]) -> Out {
        let mut args = vec!["regions", sub];
        args.extend([
            "--bundle",
            self.bundle.to_str().unwrap(),
            "--config",
            self.config.to_str().unwrap(),
            "--env-file",
            self.env_file.to_str().unwrap(),
        ]);
        args.extend_from_slice(extra);
        bk(&args, env)
    }
}

const EAST: &str = "[[regions]]\nname = \"east\"\nproxy_address = \"10.1.0.9\"\n";

#[test]
fn the_cli_checks_and_applies_with_documented_exit_codes() {
    let pg = PgCluster::shared();
    let site = CliSite::new(EAST);
    let (b, c) = (site.bundle.to_str().unwrap(), site.config.to_str().unwrap());

    let r = site.regions("check", &[], &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("region east") && r.stdout.contains("\"https://10.1.0.9:443\""),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("nats-admin-pw"), "{}", r.stdout);

    // Without the .env the placeholders are unresolved: exit 3, every problem named.
    let r = bk(&["regions", "check", "--bundle", b, "--config", c], &[]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("region \"default\", NATS_SERVERS: the placeholder ${HOST_IP} is not set")
            && r.stderr.contains("SECRET_KEY: the server's SECRET_KEY is needed"),
        "{}",
        r.stderr
    );

    for release in RELEASES {
        let (db, url) = release_db(release, "cli", true);
        // Dry run through DATABASE_URL, then apply through the PG* variables, in JSON.
        let before = snapshot(pg, &db);
        let r = site.regions("apply", &["--dry-run"], &[("DATABASE_URL", url.as_str())]);
        assert_eq!(r.code, 0, "{release}: {}{}", r.stdout, r.stderr);
        assert!(r.stdout.contains("would create 1"), "{}", r.stdout);
        assert!(r.stdout.contains(&release_label(release)), "{}", r.stdout);
        assert_eq!(snapshot(pg, &db), before, "{release}");
        let port = pg.port.to_string();
        let mut args = vec!["--json", "regions", "apply"];
        args.extend([
            "--bundle",
            b,
            "--config",
            c,
            "--env-file",
            site.env_file.to_str().unwrap(),
        ]);
        let r = bk(
            &args,
            &[
                ("PGHOST", "127.0.0.1"),
                ("PGPORT", port.as_str()),
                ("PGUSER", "postgres"),
                ("PGPASSWORD", pg.password.as_str()),
                ("PGDATABASE", db.as_str()),
            ],
        );
        assert_eq!(r.code, 0, "{release}: {}{}", r.stdout, r.stderr);
        let j: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
        assert_eq!(j["created"], 1, "{release}: {j}");
        assert_eq!(j["release"], release_label(release).as_str());
        assert!(j.get("generation").is_none(), "{j}");
        assert_eq!(j["database_source"], "the PG* environment variables");
        assert!(!r.stdout.contains("nats-admin-pw") && !r.stdout.contains(&pg.password));
        assert_eq!(
            env_row(pg, &db, 2, "NODE_SERVER_URL"),
            "https://10.1.0.9:443|str|false|",
            "{release}"
        );

        // A refused password: exit 6, host:port and user named.
        let wrong = url.replace(&pg.password, "nope");
        let r = site.regions("apply", &["--database-url", &wrong], &[]);
        assert_eq!(r.code, 6, "{}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains(&format!("postgres@127.0.0.1:{}/{db}", pg.port)) && r.stderr.contains("hint:"),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn check_with_a_database_finds_the_seed_000_region_without_writing() {
    let pg = PgCluster::shared();
    let site = CliSite::new("");
    // Without the database, the configuration alone is fine ...
    let r = site.regions("check", &[], &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    for release in RELEASES {
        // ... but the live database holds region 2 ("east") without NODE_SERVER_URL: refused,
        // named.
        let (db, url) = release_db(release, "check000", true);
        let before = snapshot(pg, &db);
        let r = site.regions("check", &["--database-url", &url], &[]);
        assert_eq!(r.code, 3, "{release}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr
                .contains("region \"east\", NODE_SERVER_URL: required by the bundle and missing"),
            "{release}: {}",
            r.stderr
        );
        assert_eq!(snapshot(pg, &db), before, "{release}: check writes nothing");
    }
}

#[test]
fn a_release_newer_than_known_is_refused_with_nothing_written_and_a_nullable_column_is_not() {
    use crate::harness::{NatsOpts, NatsServer};
    let pg = PgCluster::shared();
    let nats = NatsServer::start(NatsOpts::default());
    let site = CliSite::new(EAST);
    let packages_bundle = crate::packages::bundle().to_str().unwrap().to_string();
    let streams = || {
        crate::packages::python(
            "import asyncio,sys,nats\nasync def m():\n    nc=await nats.connect(sys.argv[1]); print(sorted(s.config.name for s in await nc.jetstream().streams_info())); await nc.close()\nasyncio.run(m())",
            &[&nats.url()],
        )
    };
    for release in RELEASES {
        for table in ["node_mgmt_sidecarenv", "node_mgmt_packageversion"] {
            let (db, url) = release_db(release, "newer", true);
            // As a newer release's migration adds it (Django fills the rows there are through a
            // default it drops again).
            pg.psql(
                &db,
                &format!(
                    "ALTER TABLE {table} ADD COLUMN colour varchar(10) NOT NULL DEFAULT 'red'; \
                     ALTER TABLE {table} ALTER COLUMN colour DROP DEFAULT"
                ),
            );
            let before = snapshot(pg, &db);
            let r = site.regions("apply", &["--database-url", &url], &[]);
            assert_eq!(r.code, 5, "{release} {table}: {}{}", r.stdout, r.stderr);
            assert!(
                r.stderr.contains(&format!("{table}.colour"))
                    && r.stderr.contains("nothing was changed")
                    && r.stderr.contains("hint:"),
                "{release} {table}: {}",
                r.stderr
            );
            let r = crate::packages::init_packages(
                &["init-packages", "--auto", "--bundle", &packages_bundle],
                &url,
                &nats.url(),
            );
            let stderr = String::from_utf8_lossy(&r.stderr);
            assert_eq!(r.status.code(), Some(5), "{release} {table}: {stderr}");
            assert!(
                stderr.contains(&format!("{table}.colour")) && stderr.contains("nothing was changed"),
                "{release} {table}: {stderr}"
            );
            assert_eq!(snapshot(pg, &db), before, "{release} {table}: nothing written");

            // The same column, nullable: a later release's column bkbundle leaves alone.
            pg.psql(&db, &format!("ALTER TABLE {table} ALTER COLUMN colour DROP NOT NULL"));
            let r = site.regions("apply", &["--database-url", &url], &[]);
            assert_eq!(r.code, 0, "{release} {table}: {}{}", r.stdout, r.stderr);
            assert_eq!(
                env_row(pg, &db, 2, "NODE_SERVER_URL"),
                "https://10.1.0.9:443|str|false|",
                "{release} {table}"
            );
            let mut args = vec!["init-packages", "--auto", "--bundle", &packages_bundle];
            let bucket = format!("newer{release}{}", &table[10..13]);
            args.extend(["--bucket", &bucket]);
            let r = crate::packages::init_packages(&args, &url, &nats.url());
            assert!(
                r.status.success(),
                "{release} {table}: {}",
                String::from_utf8_lossy(&r.stderr)
            );
            assert_eq!(
                pg.psql(&db, "SELECT count(*) FROM node_mgmt_packageversion"),
                "4",
                "{release} {table}"
            );
            let written = if table == "node_mgmt_sidecarenv" {
                "SELECT count(*) FROM node_mgmt_sidecarenv WHERE cloud_region_id = 2 AND key = 'NODE_SERVER_URL' AND colour IS NULL"
            } else {
                "SELECT count(*) FROM node_mgmt_packageversion WHERE colour IS NULL"
            };
            let expected = if table == "node_mgmt_sidecarenv" { "1" } else { "4" };
            assert_eq!(
                pg.psql(&db, written),
                expected,
                "{release} {table}: the unknown column of the rows written stays NULL"
            );
        }
    }
    // The refused runs created no bucket (they would have made the release's default one):
    // only the accepted runs' own buckets exist.
    let mut expected: Vec<String> = RELEASES
        .iter()
        .flat_map(|r| [format!("'OBJ_newer{r}pac'"), format!("'OBJ_newer{r}sid'")])
        .collect();
    expected.sort();
    assert_eq!(streams(), format!("[{}]", expected.join(", ")));
}
