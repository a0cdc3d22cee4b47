//! Issue 14: backup and restore against the real engine, the demo stack's own PostgreSQL and its
//! NATS (TLS): a site with region rows, package rows, objects and a marker table survives the
//! field's `docker-compose down -v`, and comes back on a "new host" (another directory and
//! compose project); bad backups, another bundle, another site's database, a full disk and a
//! kill are refused or completed as the issue says.

use crate::harness::ensure_demo_images;
use crate::install::{oldest_release_demo_bundle, Project};
use crate::pack::{bk, demo_bundle, run, xor_byte};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The demo installed into `p`, with a marker table the platform knows nothing about.
fn installed(p: &Project) -> PathBuf {
    let cfg = p.config(
        180,
        "HOST_IP = \"192.0.2.10\"\nSERVER_URL = \"http://192.0.2.10:18080\"",
    );
    let r = p.install(demo_bundle(), &cfg, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    p.stack_psql("create table bk_marker (id int primary key, note text); insert into bk_marker values (1, 'kept'), (2, 'é\"quote''s')");
    cfg
}

/// What must come back: the platform's rows, the marker, the objects (by nats-py), the secrets.
#[derive(Debug, PartialEq, Eq)]
struct SiteState {
    regions: String,
    packages: String,
    marker: String,
    objects: BTreeMap<String, String>,
    env: String,
    ca_key: String,
}

fn state(p: &Project, target: &Path) -> SiteState {
    let psql = |sql: &str| {
        let r = run(Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &env_of(target, "POSTGRES_PORT"),
                "-U",
                "postgres",
                "-d",
                "bklite",
                "-Atc",
                sql,
            ])
            .env("PGPASSWORD", env_of(target, "POSTGRES_PASSWORD")));
        assert_eq!(r.code, 0, "{sql}: {}", r.stderr);
        r.stdout.trim().to_string()
    };
    let _ = p;
    SiteState {
        regions: psql("select r.name, e.key, e.value, e.type, e.is_pre from node_mgmt_sidecarenv e join node_mgmt_cloudregion r on r.id = e.cloud_region_id order by 1, 2"),
        packages: psql("select type, os, object, version, name from node_mgmt_packageversion order by 1, 2, 3, 4, 5"),
        marker: psql("select id, note from bk_marker order by id"),
        objects: objects(target),
        env: fs::read_to_string(target.join(".env")).unwrap(),
        ca_key: fs::read_to_string(target.join(".bkbundle/tls/ca.key")).unwrap(),
    }
}

fn env_of(target: &Path, key: &str) -> String {
    let env = fs::read_to_string(target.join(".env")).unwrap();
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} is not in {}/.env", target.display()))
        .to_string()
}

/// Every object of every bucket, read by nats-py: `bucket/name` -> "digest size description".
fn objects(target: &Path) -> BTreeMap<String, String> {
    let url = format!(
        "tls://{}:{}@127.0.0.1:{}",
        env_of(target, "NATS_USER"),
        env_of(target, "NATS_PASSWORD"),
        env_of(target, "NATS_PORT")
    );
    let out = crate::packages::python_with(
        r#"
import asyncio, sys, nats
async def m():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    for s in sorted([s.config.name for s in await js.streams_info()]):
        if not s.startswith("OBJ_"):
            continue
        o = await js.object_store(s[4:])
        for i in sorted(await o.list(), key=lambda i: i.name):
            print(s[4:] + "/" + i.name, i.digest, i.size, i.description or "")
    await nc.close()
asyncio.run(m())
"#,
        &[&url],
        Some(&target.join("certs/ca.crt")),
    );
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn down_v(p: &Project, target: &Path) {
    let r = run(Command::new("docker-compose")
        .args(["-p", &p.name, "-f"])
        .arg(target.join("docker-compose.yml"))
        .arg("--env-file")
        .arg(target.join(".env"))
        .args(["down", "-v"])
        .current_dir(target));
    assert_eq!(r.code, 0, "down -v: {}", r.stderr);
}

/// `bkbundle backup --target TARGET -o FILE EXTRA...`.
fn take(target: &Path, file: &Path, extra: &[&str]) -> crate::pack::Run {
    let mut args = vec![
        "backup",
        "--target",
        target.to_str().unwrap(),
        "-o",
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    bk(&args)
}

fn restore(backup: &Path, bundle: &Path, target: &Path, extra: &[&str]) -> crate::pack::Run {
    let mut args = vec![
        "restore",
        backup.to_str().unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    bk(&args)
}

#[test]
fn a_site_survives_down_v_and_comes_back_on_a_new_host() {
    ensure_demo_images();
    let p = Project::new();
    installed(&p);
    let before = state(&p, &p.target());
    assert!(
        before.objects.len() >= 5,
        "the demo stores packages and installers: {:?}",
        before.objects
    );
    assert!(
        before.packages.lines().count() >= 5 && before.regions.contains("NODE_SERVER_URL"),
        "{before:?}"
    );

    // The backup: one file, 0600, verified, inspectable, and `sha256sum -c` after extraction.
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("site.bkbak");
    let b = take(&p.target(), &file, &[]);
    assert_eq!(b.code, 0, "{}\n{}", b.stdout, b.stderr);
    assert!(
        b.stdout.contains("database bklite") && b.stdout.contains("bucket"),
        "{}",
        b.stdout
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    for secret in [
        env_of(&p.target(), "POSTGRES_PASSWORD"),
        env_of(&p.target(), "NATS_PASSWORD"),
    ] {
        assert!(
            !b.stdout.contains(&secret) && !b.stderr.contains(&secret),
            "a secret was printed"
        );
    }
    let v = bk(&["backup", "verify", file.to_str().unwrap()]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    let i = bk(&["backup", "inspect", file.to_str().unwrap(), "--json"]);
    assert_eq!(i.code, 0, "{}", i.stderr);
    crate::schema::assert_schema("backup-inspect", &i);
    let inspected: serde_json::Value = serde_json::from_str(&i.stdout).unwrap();
    assert_eq!(inspected["manifest"]["bundle"]["name"], "demo");
    assert_eq!(
        inspected["manifest"]["objects"].as_array().unwrap().len(),
        before.objects.len()
    );
    let x = work.path().join("x");
    fs::create_dir(&x).unwrap();
    let sums = run(Command::new("bash")
        .arg("-c")
        .arg(format!("tar -xf {} && sha256sum -c --quiet SHA256SUMS", file.display()))
        .current_dir(&x));
    assert_eq!(sums.code, 0, "{}{}", sums.stdout, sums.stderr);

    // The field's mistake, then the restore onto the same directory: no --force needed (the
    // files are the backup's own, no container is left).
    down_v(&p, &p.target());
    assert!(p.containers().is_empty());
    let r = restore(&file, demo_bundle(), &p.target(), &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("doctor: 0 error(s)"), "{}", r.stdout);
    assert_eq!(state(&p, &p.target()), before);
    // The site is installed again as far as install is concerned.
    let again = restore(&file, demo_bundle(), &p.target(), &[]);
    assert_eq!(
        again.code, 8,
        "a second restore over the running site is refused: {}",
        again.stdout
    );
    assert!(again.stderr.contains("--force"), "{}", again.stderr);

    // The new host: another directory, another compose project (the old one is gone first: the
    // ports are the backup's).
    down_v(&p, &p.target());
    let q = Project::new();
    let r = restore(&file, demo_bundle(), &q.target(), &["--project", &q.name, "--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    crate::schema::assert_schema("restore", &r);
    // The databases and the objects went in before the stack started (NATS started with the
    // database service), so the server's first start finds them.
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let at = |n: &str| {
        steps
            .iter()
            .position(|s| *s == n)
            .unwrap_or_else(|| panic!("no step {n}: {steps:?}"))
    };
    assert!(at("database") < at("start") && at("objects") < at("start"), "{steps:?}");
    assert!(!q.containers().is_empty() && p.containers().is_empty());
    assert_eq!(state(&q, &q.target()), before);
    let j: serde_json::Value =
        serde_json::from_slice(&fs::read(q.target().join(".bkbundle/journal.json")).unwrap()).unwrap();
    assert_eq!(j["project"], q.name.as_str());
}

#[test]
fn bad_backups_another_bundle_and_another_sites_database_change_nothing() {
    ensure_demo_images();
    let p = Project::new();
    installed(&p);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("site.bkbak");
    let b = take(&p.target(), &file, &["--json"]);
    assert_eq!(b.code, 0, "{}", b.stderr);
    crate::schema::assert_schema("backup", &b);
    let empty = work.path().join("empty");

    // Truncated: refused before anything changes.
    let cut = work.path().join("cut.bkbak");
    let len = fs::metadata(&file).unwrap().len();
    fs::copy(&file, &cut).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let r = restore(&cut, demo_bundle(), &empty, &[]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(!empty.exists(), "nothing may be created");

    // A damaged member: named by verify and by restore.
    let bad = work.path().join("bad.bkbak");
    fs::copy(&file, &bad).unwrap();
    let listing = run(Command::new("tar").args(["-tvf", bad.to_str().unwrap()]));
    assert!(listing.stdout.contains("database/0.dump.zst"), "{}", listing.stdout);
    let at = dump_offset(&bad);
    xor_byte(&bad, at + 100, 0x20);
    let v = bk(&["backup", "verify", bad.to_str().unwrap()]);
    assert_eq!(v.code, 4, "{}", v.stderr);
    assert!(
        v.stderr.contains("database/0.dump.zst: sha256 expected"),
        "{}",
        v.stderr
    );
    let r = restore(&bad, demo_bundle(), &empty, &[]);
    assert_eq!(r.code, 4);
    assert!(r.stderr.contains("database/0.dump.zst"), "{}", r.stderr);
    assert!(!empty.exists());

    // Another bundle than the site ran: named by both ids.
    let other = oldest_release_demo_bundle(&p);
    let r = restore(&file, &other, &empty, &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains("was taken of a site running bundle demo 1.0.0 (id "),
        "{}",
        r.stderr
    );
    assert!(!empty.exists());

    // Over a running site (its own, or another's): every thing it would replace named, nothing
    // changed; with --force, replaced after a backup of what was there.
    p.stack_psql("insert into bk_marker values (3, 'after the backup')");
    let r = restore(&file, demo_bundle(), &p.target(), &[]);
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(
        r.stderr.contains("would replace")
            && r.stderr.contains("database bklite (")
            && r.stderr.contains("container(s) of compose project"),
        "{}",
        r.stderr
    );
    assert!(p.stack_psql("select count(*) from bk_marker") == "3");
    let r = restore(&file, demo_bundle(), &p.target(), &["--force"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(
        p.stack_psql("select string_agg(note, ',' order by id) from bk_marker"),
        "kept,é\"quote's"
    );
    let kept: Vec<PathBuf> = fs::read_dir(p.target().join("backups"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(kept.len(), 1, "the replaced site was backed up first: {kept:?}");

    // No room for the backup: refused before writing, nothing left behind.
    let mnt = work.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let m = run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt.to_str().unwrap()]));
    assert_eq!(m.code, 0, "{}", m.stderr);
    let out = mnt.join("site.bkbak");
    let r = take(&p.target(), &out, &[]);
    let left: Vec<_> = fs::read_dir(&mnt).unwrap().collect();
    let _ = run(Command::new("umount").arg(&mnt));
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(r.stderr.contains("not enough space for the backup"), "{}", r.stderr);
    assert!(left.is_empty());
}

/// Where the first database dump's data starts in the backup (after its tar header).
fn dump_offset(file: &Path) -> u64 {
    let data = fs::read(file).unwrap();
    let name = b"database/0.dump.zst";
    let at = data.windows(name.len()).position(|w| w == name).unwrap();
    (at as u64 / 512 + 1) * 512
}

/// bkbundle with the backup passphrase in its environment.
fn bk_with_passphrase(passphrase: &str, args: &[&str]) -> crate::pack::Run {
    run(crate::harness::bkbundle()
        .env("BKBUNDLE_BACKUP_PASSPHRASE", passphrase)
        .args(args))
}

#[test]
fn an_encrypted_backup_opens_with_its_passphrase_only_and_a_killed_restore_completes() {
    ensure_demo_images();
    let p = Project::new();
    installed(&p);
    let before = state(&p, &p.target());
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("site.bkbak");
    let target = p.target();
    let restore_args = [
        "restore",
        file.to_str().unwrap(),
        "--bundle",
        demo_bundle().to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
    ];
    let b = bk_with_passphrase(
        "night shift 42",
        &[
            "backup",
            "--target",
            target.to_str().unwrap(),
            "-o",
            file.to_str().unwrap(),
            "--encrypt",
        ],
    );
    assert_eq!(b.code, 0, "{}", b.stderr);
    // No secret shows in the file: the .env and the database are encrypted.
    let bytes = fs::read(&file).unwrap();
    for secret in [env_of(&target, "POSTGRES_PASSWORD"), env_of(&target, "NATS_PASSWORD")] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "a secret is in the clear"
        );
    }
    assert!(
        !bytes.windows(14).any(|w| w == b"POSTGRES_USER="),
        "the .env is in the clear"
    );
    // Verify checks the stored bytes without the passphrase, and opens every member with it.
    let v = bk(&["backup", "verify", file.to_str().unwrap()]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert!(v.stdout.contains("not opened"), "{}", v.stdout);
    let v = bk_with_passphrase("night shift 42", &["backup", "verify", file.to_str().unwrap()]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert!(v.stdout.contains("every member decrypted"), "{}", v.stdout);
    down_v(&p, &target);
    // A wrong passphrase: refused before anything changes.
    let wrong = bk_with_passphrase("day shift", &restore_args);
    assert_eq!(wrong.code, 3, "{}", wrong.stderr);
    assert!(
        wrong.stderr.contains("the passphrase does not open backup"),
        "{}",
        wrong.stderr
    );
    assert!(p.containers().is_empty() && !target.join(".bkbundle/restore.json").exists());
    // Killed once its database step began (the state file names a database it started).
    let state_file = p.target().join(".bkbundle/restore.json");
    let mut child = crate::harness::bkbundle()
        .env("BKBUNDLE_BACKUP_PASSPHRASE", "night shift 42")
        .args([
            "restore",
            file.to_str().unwrap(),
            "--bundle",
            demo_bundle().to_str().unwrap(),
            "--target",
            p.target().to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(work.path().join("killed.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !fs::read_to_string(&state_file).is_ok_and(|s| s.contains("\"begun\": [\n    \"")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the restore never began its database step"
        );
        if let Some(s) = child.try_wait().unwrap() {
            panic!(
                "the restore ended ({s}) before it could be killed: {}",
                fs::read_to_string(work.path().join("killed.err")).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let r = bk_with_passphrase("night shift 42", &restore_args);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(state(&p, &p.target()), before);
    assert!(!state_file.exists());
}
