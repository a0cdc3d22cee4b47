//! Issue 4: seeding every cloud region's sidecar env against a real PostgreSQL, on a schema
//! fixture of each generation written from BKLITE.md (tests/fixtures/schema-*.sql), and the field
//! failure's seed (tests/fixtures/seed-000.sql). Secrets are checked against an independent
//! implementation (Python `cryptography`).

use crate::harness::{bkbundle, free_port, repo_root, PgCluster};
use bkbundle::error::{Error, Kind};
use bkbundle::manifest::Regions;
use bkbundle::platform::regions::Action;
use bkbundle::platform::{crypto, db::DbError};
use bkbundle::regions::{self, Mode, RegionsError, RegionsOptions, RegionsReport};
use bkbundle::site::config::InstallConfig;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const GENERATIONS: [&str; 2] = ["2025", "2026"];
const SECRET_KEY: &str = "seed-000-secret-key";

fn fixture(name: &str) -> String {
    let p = repo_root().join("tests/fixtures").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A fresh database on `pg` with the schema of `generation` (and the seed when given).
fn database(pg: &PgCluster, name: &str, generation: &str, seed: bool) -> String {
    let url = pg.create_database(name);
    pg.psql(name, &fixture(&format!("schema-{generation}.sql")));
    if seed {
        pg.psql(name, &fixture("seed-000.sql"));
    }
    url
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

/// Every row (with its xmin, which changes on any update) and the sequences: equal snapshots
/// mean nothing was written.
fn snapshot(pg: &PgCluster, db: &str) -> String {
    pg.psql(
        db,
        "SELECT xmin, * FROM node_mgmt_cloudregion ORDER BY id; \
         SELECT xmin, * FROM node_mgmt_sidecarenv ORDER BY id; \
         SELECT cache_key FROM django_cache ORDER BY 1; \
         SELECT last_value, is_called FROM node_mgmt_cloudregion_id_seq; \
         SELECT last_value, is_called FROM node_mgmt_sidecarenv_id_seq;",
    )
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

#[test]
fn each_schema_generation_is_detected_and_seeded_from_empty() {
    let pg = PgCluster::start();
    for generation in GENERATIONS {
        let db = format!("gen{generation}");
        let url = database(&pg, &db, generation, false);
        let r = apply(Mode::Apply, "", &url).expect("apply");
        assert!(r.release.is_some(), "{r:?}");
        assert_eq!((r.created, r.updated, r.unchanged), (4, 0, 0), "{r:?}");
        // The default region the way the server creates it: explicit id 1, every NOT NULL column.
        let row = pg.psql(
            &db,
            "SELECT id, name, introduction, proxy_address, created_by, updated_by, domain, updated_by_domain, \
             created_at IS NOT NULL AND updated_at IS NOT NULL FROM node_mgmt_cloudregion",
        );
        assert_eq!(
            row,
            "1|default|default cloud region!||system|system|domain.com|domain.com|t"
        );
        if generation == "2026" {
            assert_eq!(
                pg.psql(
                    &db,
                    "SELECT pending_proxy_address IS NULL AND pending_proxy_address_created_at IS NULL FROM node_mgmt_cloudregion"
                ),
                "t"
            );
        }
        assert_eq!(
            env_row(&pg, &db, 1, "NODE_SERVER_URL"),
            "https://10.0.0.5:443|str|true|"
        );
        assert_eq!(env_row(&pg, &db, 1, "NATS_SERVERS"), "10.0.0.5:4222|str|true|");
        let pw = env_row(&pg, &db, 1, "NATS_PASSWORD");
        assert!(pw.ends_with("|secret|true|") && !pw.contains("nats-admin-pw"), "{pw}");
    }
}

#[test]
fn tables_missing_means_not_migrated_and_the_wait_is_bounded() {
    let pg = PgCluster::start();
    let url = pg.create_database("empty");
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
    // ...and goes on as soon as the tables appear.
    o.wait_for_migrations = Some(Duration::from_secs(60));
    let migrate = std::thread::scope(|s| {
        let h = s.spawn(|| {
            std::thread::sleep(Duration::from_secs(1));
            pg.psql("empty", &fixture("schema-2026.sql"));
        });
        let r = rt().block_on(regions::run_with_env(&o, &no_env));
        h.join().expect("migrate thread");
        r
    });
    assert_eq!(migrate.expect("apply after waiting").created, 4);
}

#[test]
fn seed_000_region_without_node_server_url_is_refused_and_nothing_is_written() {
    let pg = PgCluster::start();
    for generation in GENERATIONS {
        let db = format!("seed{generation}");
        let url = database(&pg, &db, generation, true);
        let before = snapshot(&pg, &db);
        // Region 2 is in the database, not in the config: checked, not guessed.
        let e = apply(Mode::Apply, "", &url).unwrap_err();
        let msg = Error::from(e).message;
        assert!(
            msg.contains("region \"east\", NODE_SERVER_URL: required by the bundle and missing")
                && msg.contains("nothing was written"),
            "{msg}"
        );
        assert_eq!(snapshot(&pg, &db), before, "a refused run writes nothing");

        // A `null` stored in region 2 is refused the same way.
        pg.psql(
            &db,
            "BEGIN; INSERT INTO node_mgmt_sidecarenv (key, value, type, description, cloud_region_id, is_pre) \
             VALUES ('NODE_SERVER_URL', 'null', 'str', '', 2, false); COMMIT;",
        );
        let before = snapshot(&pg, &db);
        let msg = Error::from(apply(Mode::Apply, "", &url).unwrap_err()).message;
        assert!(
            msg.contains("region \"east\", NODE_SERVER_URL: the stored value: it is the literal \"null\""),
            "{msg}"
        );
        assert_eq!(snapshot(&pg, &db), before);
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
        let r = rt().block_on(regions::run_with_env(&o, &no_env)).expect("apply");
        assert_eq!(key_action(&r, "east", "NODE_SERVER_URL"), Some(Action::Create));
        assert_eq!(key_action(&r, "east", "NATS_SERVERS"), Some(Action::Unchanged));
        assert_eq!(key_action(&r, "east", "NATS_PASSWORD"), Some(Action::Unchanged));
        assert_eq!(key_action(&r, "default", "NATS_PASSWORD"), Some(Action::Unchanged));
        assert_eq!((r.created, r.updated), (1, 0), "{r:?}");
        assert_eq!(
            env_row(&pg, &db, 2, "NODE_SERVER_URL"),
            "https://10.1.0.9:443|str|true|"
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
        assert!(!r.notes.iter().any(|n| n.contains("Redis")), "{:?}", r.notes);
    }
}

#[test]
fn a_null_value_in_the_config_is_refused_naming_region_and_key() {
    let pg = PgCluster::start();
    let url = database(&pg, "nullcfg", "2026", false);
    let before = snapshot(&pg, "nullcfg");
    let config = "[[regions]]\nname = \"west\"\n[regions.env]\nNODE_SERVER_URL = \"null\"\n\
                  [[regions]]\nname = \"north\"\n[regions.env]\nNODE_SERVER_URL = \"/api\"\n";
    let msg = Error::from(apply(Mode::Apply, config, &url).unwrap_err()).message;
    assert!(
        msg.contains("region \"west\", NODE_SERVER_URL: it is the literal \"null\"")
            && msg.contains("region \"north\", NODE_SERVER_URL: it is a bare path")
            && msg.contains("2 problem(s)"),
        "{msg}"
    );
    assert_eq!(snapshot(&pg, "nullcfg"), before);
}

#[test]
fn proxy_address_replaces_the_host_and_ids_never_collide() {
    let pg = PgCluster::start();
    for generation in GENERATIONS {
        let db = format!("proxy{generation}");
        let url = database(&pg, &db, generation, false);
        // The server's node_init: region 1 with an explicit id, the identity sequence left at 1.
        pg.psql(
            &db,
            "INSERT INTO node_mgmt_cloudregion (id, created_at, updated_at, created_by, updated_by, domain, \
             updated_by_domain, name, introduction, proxy_address) VALUES (1, now(), now(), 'system', 'system', \
             'domain.com', 'domain.com', 'default', 'default cloud region!', '')",
        );
        let config = "[[regions]]\nname = \"west\"\nintroduction = \"west site\"\nproxy_address = \"10.2.0.7\"\n\
                      [regions.env]\nSTARGAZER_URL = \"http://10.2.0.7:8083\"\n";
        let r = apply(Mode::Apply, config, &url).expect("apply");
        let west = r.regions.iter().find(|x| x.name == "west").unwrap();
        assert_eq!(west.id, Some(2), "region 2 after the explicit id 1");
        assert_eq!(west.action, Some(Action::Create));
        assert_eq!(
            env_row(&pg, &db, 2, "NODE_SERVER_URL"),
            "https://10.2.0.7:443|str|true|"
        );
        assert_eq!(env_row(&pg, &db, 2, "NATS_SERVERS"), "10.2.0.7:4222|str|true|");
        assert_eq!(env_row(&pg, &db, 2, "STARGAZER_URL"), "http://10.2.0.7:8083|str|true|");
        assert_eq!(
            env_row(&pg, &db, 1, "NODE_SERVER_URL"),
            "https://10.0.0.5:443|str|true|"
        );
        assert_eq!(
            pg.psql(
                &db,
                "SELECT name, introduction, proxy_address, created_by, domain FROM node_mgmt_cloudregion WHERE id = 2"
            ),
            "west|west site|10.2.0.7|system|domain.com"
        );
        // The server (or the UI) creating a region next gets a fresh id too.
        let next = pg.psql(
            &db,
            "INSERT INTO node_mgmt_cloudregion (created_at, updated_at, created_by, updated_by, domain, \
             updated_by_domain, name, introduction, proxy_address) VALUES (now(), now(), 'admin', 'admin', \
             'domain.com', 'domain.com', 'ui-made', '', '') RETURNING id",
        );
        assert_eq!(next.lines().next(), Some("3"), "{next}");
        // (A region without env rows would now be refused, as the seed 000 test shows.)
        pg.psql(&db, "DELETE FROM node_mgmt_cloudregion WHERE name = 'ui-made'");
        // Changing the proxy updates the region and its proxied keys only.
        let config2 = config.replace("10.2.0.7\"\n[regions", "10.2.0.8\"\n[regions");
        let r = apply(Mode::Apply, &config2, &url).expect("apply");
        assert_eq!(
            r.regions.iter().find(|x| x.name == "west").unwrap().action,
            Some(Action::Update)
        );
        assert_eq!(key_action(&r, "west", "NODE_SERVER_URL"), Some(Action::Update));
        assert_eq!(key_action(&r, "west", "STARGAZER_URL"), Some(Action::Unchanged));
        assert_eq!(env_row(&pg, &db, 2, "NATS_SERVERS"), "10.2.0.8:4222|str|true|");
    }
}

#[test]
fn secrets_round_trip_with_python_cryptography() {
    let pg = PgCluster::start();
    let url = database(&pg, "secrets", "2026", false);
    apply(Mode::Apply, "", &url).expect("apply");
    let stored = pg.psql(
        "secrets",
        "SELECT value FROM node_mgmt_sidecarenv WHERE cloud_region_id = 1 AND key = 'NATS_PASSWORD'",
    );
    assert!(
        !stored.contains('=') && !stored.contains('+') && !stored.contains('/'),
        "{stored}"
    );
    assert_eq!(
        python(PY_DECRYPT, &[SECRET_KEY, &stored]),
        "nats-admin-pw",
        "bkbundle -> Python"
    );

    // Python -> bkbundle: the library decrypts it, and apply sees the same plaintext as unchanged.
    let from_python = python(PY_ENCRYPT, &[SECRET_KEY, "nats-admin-pw"]);
    assert!(from_python.ends_with('='), "Python keeps the padding: {from_python}");
    let key = crypto::SecretKey::from_django(SECRET_KEY);
    assert_eq!(crypto::decrypt(&key, &from_python).unwrap(), "nats-admin-pw");
    pg.psql(
        "secrets",
        &format!(
            "UPDATE node_mgmt_sidecarenv SET value = '{from_python}' WHERE cloud_region_id = 1 AND key = 'NATS_PASSWORD'"
        ),
    );
    let before = snapshot(&pg, "secrets");
    let r = apply(Mode::Apply, "", &url).expect("apply");
    assert_eq!(key_action(&r, "default", "NATS_PASSWORD"), Some(Action::Unchanged));
    assert_eq!(snapshot(&pg, "secrets"), before, "a re-encryption is not a change");

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
        "secrets",
        "SELECT value FROM node_mgmt_sidecarenv WHERE cloud_region_id = 1 AND key = 'NATS_PASSWORD'",
    );
    assert_eq!(python(PY_DECRYPT, &[SECRET_KEY, &stored]), "rotated-pw");

    // The wrong SECRET_KEY cannot compare the stored secret: refused, not overwritten.
    let before = snapshot(&pg, "secrets");
    let mut o = options(Mode::Apply, "", &url);
    o.site.insert("SECRET_KEY".into(), "not-the-servers-key".into());
    let e = rt().block_on(regions::run_with_env(&o, &no_env)).unwrap_err();
    assert!(
        e.to_string()
            .contains("region \"default\", NATS_PASSWORD: the stored secret"),
        "{e}"
    );
    assert_eq!(snapshot(&pg, "secrets"), before);
}

#[test]
fn a_rerun_reports_everything_unchanged_and_touches_no_row() {
    let pg = PgCluster::start();
    for generation in GENERATIONS {
        let db = format!("rerun{generation}");
        let url = database(&pg, &db, generation, true);
        let config = "[[regions]]\nname = \"east\"\nproxy_address = \"10.1.0.9\"\n";
        let first = apply(Mode::Apply, config, &url).expect("first apply");
        assert!(first.changes());
        // Let the server cache again, then re-run.
        pg.psql(
            &db,
            "INSERT INTO django_cache VALUES (':1:sidecar_env_cache_2', 'x', now() + interval '300 s') ON CONFLICT DO NOTHING",
        );
        let before = snapshot(&pg, &db);
        let second = apply(Mode::Apply, config, &url).expect("second apply");
        assert_eq!((second.created, second.updated), (0, 0), "{second:?}");
        assert_eq!(second.unchanged, 8);
        assert!(!second.changes());
        assert!(second.regions.iter().all(|r| r.action == Some(Action::Unchanged)));
        assert!(second.cache.keys.is_empty(), "nothing changed, nothing to invalidate");
        assert_eq!(snapshot(&pg, &db), before, "no row, xmin or sequence changed");
    }
}

#[test]
fn dry_run_shows_the_diff_and_writes_nothing() {
    let pg = PgCluster::start();
    let url = database(&pg, "dry", "2025", true);
    let before = snapshot(&pg, "dry");
    let config = "[[regions]]\nname = \"east\"\nproxy_address = \"10.1.0.9\"\n\
                  [[regions]]\nname = \"south\"\nproxy_address = \"10.3.0.1\"\n";
    let r = apply(Mode::DryRun, config, &url).expect("dry run");
    assert_eq!(r.mode, Mode::DryRun);
    assert_eq!(key_action(&r, "east", "NODE_SERVER_URL"), Some(Action::Create));
    let south = r.regions.iter().find(|x| x.name == "south").unwrap();
    assert_eq!((south.action, south.id), (Some(Action::Create), None));
    assert_eq!(r.created, 5);
    assert!(
        regions::render(&r).contains("would create 5"),
        "{}",
        regions::render(&r)
    );
    assert_eq!(snapshot(&pg, "dry"), before);
}

#[test]
fn an_old_2025_value_column_limits_values_before_anything_is_written() {
    let pg = PgCluster::start();
    let url = database(&pg, "old", "2025", false);
    pg.psql(
        "old",
        "ALTER TABLE node_mgmt_sidecarenv ALTER COLUMN value TYPE varchar(200)",
    );
    // A valid URL (labels of at most 63 characters) longer than 200 characters.
    let long = format!("http://{}.example:8083", vec!["a".repeat(60); 3].join("."));
    assert!(long.len() > 200);
    let config = format!("[[regions]]\nname = \"default\"\n[regions.env]\nSTARGAZER_URL = \"{long}\"\n");
    let before = snapshot(&pg, "old");
    let msg = Error::from(apply(Mode::Apply, &config, &url).unwrap_err()).message;
    assert!(
        msg.contains(&format!(
            "region \"default\", STARGAZER_URL: the value is {} characters",
            long.len()
        )) && msg.contains("at most 200"),
        "{msg}"
    );
    assert_eq!(snapshot(&pg, "old"), before);
}

#[test]
fn a_database_down_or_refusing_the_password_is_clear_and_changes_nothing() {
    let pg = PgCluster::start();
    let url = database(&pg, "auth", "2026", true);
    let before = snapshot(&pg, "auth");
    let wrong = url.replace(&pg.password, "wrong-password");
    let err = Error::from(apply(Mode::Apply, "[[regions]]\nname = \"east\"\n", &wrong).unwrap_err());
    assert_eq!(err.kind, Kind::External);
    let where_ = format!("postgres@127.0.0.1:{}/auth", pg.port);
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
    assert_eq!(snapshot(&pg, "auth"), before);

    let down = free_port();
    let err = Error::from(
        apply(
            Mode::Apply,
            "[[regions]]\nname = \"east\"\n",
            &format!("postgres://postgres:x@127.0.0.1:{down}/auth"),
        )
        .unwrap_err(),
    );
    assert_eq!(err.kind, Kind::External);
    assert!(
        err.message
            .contains(&format!("cannot reach PostgreSQL at postgres@127.0.0.1:{down}/auth"))
            && err.message.contains("nothing was changed"),
        "{}",
        err.message
    );
    assert!(
        err.hints.iter().any(|h| h.contains("docker compose ps postgres")),
        "{:?}",
        err.hints
    );
    assert_eq!(snapshot(&pg, "auth"), before);
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

#[test]
fn the_cli_checks_and_applies_with_documented_exit_codes() {
    let pg = PgCluster::start();
    let url = database(&pg, "cli", "2026", true);
    let dir = tempfile::tempdir().unwrap();
    let bundle = regions_bundle(dir.path());
    let b = bundle.to_str().unwrap();
    let env_file = dir.path().join(".env");
    std::fs::write(
        &env_file,
        format!("HOST_IP=10.0.0.5\nNATS_ADMIN_PASSWORD=nats-admin-pw\nSECRET_KEY={SECRET_KEY}\n"),
    )
    .unwrap();
    let e = env_file.to_str().unwrap();
    let config = dir.path().join("install.toml");
    std::fs::write(
        &config,
        "format = 1\n[env]\nSERVER_URL = \"https://10.0.0.5:443\"\n[[regions]]\nname = \"east\"\nproxy_address = \"10.1.0.9\"\n",
    )
    .unwrap();
    let c = config.to_str().unwrap();

    let r = bk(
        &["regions", "check", "--bundle", b, "--config", c, "--env-file", e],
        &[],
    );
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

    // Dry run through DATABASE_URL, then apply through the PG* variables, in JSON.
    let before = snapshot(&pg, "cli");
    let r = bk(
        &[
            "regions",
            "apply",
            "--dry-run",
            "--bundle",
            b,
            "--config",
            c,
            "--env-file",
            e,
        ],
        &[("DATABASE_URL", url.as_str())],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("would create 1"), "{}", r.stdout);
    assert_eq!(snapshot(&pg, "cli"), before);
    let port = pg.port.to_string();
    let r = bk(
        &[
            "--json",
            "regions",
            "apply",
            "--bundle",
            b,
            "--config",
            c,
            "--env-file",
            e,
        ],
        &[
            ("PGHOST", "127.0.0.1"),
            ("PGPORT", port.as_str()),
            ("PGUSER", "postgres"),
            ("PGPASSWORD", pg.password.as_str()),
            ("PGDATABASE", "cli"),
        ],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(j["created"], 1);
    assert_eq!(j["generation"], "2026");
    assert_eq!(j["database_source"], "the PG* environment variables");
    assert!(!r.stdout.contains("nats-admin-pw") && !r.stdout.contains(&pg.password));
    assert_eq!(
        env_row(&pg, "cli", 2, "NODE_SERVER_URL"),
        "https://10.1.0.9:443|str|true|"
    );

    // A refused password: exit 6, host:port and user named.
    let wrong = url.replace(&pg.password, "nope");
    let r = bk(
        &[
            "regions",
            "apply",
            "--bundle",
            b,
            "--config",
            c,
            "--env-file",
            e,
            "--database-url",
            &wrong,
        ],
        &[],
    );
    assert_eq!(r.code, 6, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(&format!("postgres@127.0.0.1:{}/cli", pg.port)) && r.stderr.contains("hint:"),
        "{}",
        r.stderr
    );
}

#[test]
fn check_with_a_database_finds_the_seed_000_region_without_writing() {
    let pg = PgCluster::start();
    let url = database(&pg, "check000", "2026", true);
    let dir = tempfile::tempdir().unwrap();
    let bundle = regions_bundle(dir.path());
    let env_file = dir.path().join(".env");
    std::fs::write(
        &env_file,
        format!("HOST_IP=10.0.0.5\nNATS_ADMIN_PASSWORD=nats-admin-pw\nSECRET_KEY={SECRET_KEY}\n"),
    )
    .unwrap();
    let config = dir.path().join("install.toml");
    std::fs::write(&config, "format = 1\n[env]\nSERVER_URL = \"https://10.0.0.5:443\"\n").unwrap();
    let args = |db: Option<&str>| {
        let mut a = vec![
            "regions".to_string(),
            "check".into(),
            "--bundle".into(),
            bundle.display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--env-file".into(),
            env_file.display().to_string(),
        ];
        if let Some(db) = db {
            a.extend(["--database-url".to_string(), db.to_string()]);
        }
        a
    };
    // Without the database, the configuration alone is fine ...
    let a = args(None);
    let r = bk(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // ... but the live database holds region 2 ("east") without NODE_SERVER_URL: refused, named.
    let before = snapshot(&pg, "check000");
    let a = args(Some(&url));
    let r = bk(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("region \"east\", NODE_SERVER_URL: required by the bundle and missing"),
        "{}",
        r.stderr
    );
    assert_eq!(snapshot(&pg, "check000"), before, "check writes nothing");
}
