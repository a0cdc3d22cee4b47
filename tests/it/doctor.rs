//! Issue 6: `bkbundle doctor` against a live install of the demo (real engine and docker-compose,
//! the stack's own PostgreSQL and NATS with JetStream): no finding on the healthy install, then
//! each field fault injected alone, diagnosed by the right finding, repaired (by `--fix` where it
//! is a safe repair) and gone again.

use crate::harness::{ensure_demo_images, free_port, RedisServer};
use crate::install::Project;
use crate::pack::{bk, demo_bundle, run, Run};
use crate::packages::{python_with, PY_DEL};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

struct Live {
    p: Project,
    env: BTreeMap<String, String>,
}

impl Live {
    /// The demo installed with every address on loopback (its regions marked `local`), so that
    /// the server URL probe and every connection stay on this machine.
    fn install() -> Live {
        ensure_demo_images();
        let p = Project::new();
        let web = free_port();
        let config = p.dir.path().join("install.toml");
        std::fs::write(
            &config,
            format!(
                "format = 1\nproject = \"{}\"\n[env]\nWEB_PORT = \"{web}\"\nPOSTGRES_PORT = \"{}\"\nNATS_PORT = \"{}\"\n\
                 HOST_IP = \"127.0.0.1\"\nSERVER_URL = \"http://127.0.0.1:{web}\"\n[health]\ntimeout_secs = 180\nsteady_secs = 2\n\
                 [[regions]]\nname = \"default\"\nlocal = true\n[[regions]]\nname = \"east\"\nlocal = true\n",
                p.name,
                free_port(),
                free_port()
            ),
        )
        .unwrap();
        let r = p.install(demo_bundle(), &config, &[]);
        assert_eq!(r.code, 0, "install: {}\n{}", r.stdout, r.stderr);
        let env = std::fs::read_to_string(p.target().join(".env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // The demo's server stand-in creates the newest release's tables, the installer's among them.
        Live { p, env }
    }

    fn target(&self) -> PathBuf {
        self.p.target()
    }

    /// `bkbundle --json doctor --target T --bundle B EXTRA...`: the run and its JSON report.
    fn doctor(&self, extra: &[&str]) -> (Run, Value) {
        let target = self.target();
        let config = self.p.dir.path().join("install.toml");
        let mut args = vec![
            "--json",
            "doctor",
            "--config",
            config.to_str().unwrap(),
            "--target",
            target.to_str().unwrap(),
            "--bundle",
            demo_bundle().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let r = run(crate::harness::bkbundle()
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .args(&args));
        let v: Value = serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {}\n{}", r.stdout, r.stderr));
        (r, v)
    }

    fn psql(&self, sql: &str) -> String {
        let r = run(Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.env["POSTGRES_PORT"],
                "-U",
                "postgres",
                "-d",
                "bklite",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .env("PGPASSWORD", &self.env["POSTGRES_PASSWORD"]));
        assert_eq!(r.code, 0, "psql {sql}: {}", r.stderr);
        r.stdout.trim().to_string()
    }

    /// The stack's NATS serves TLS with the site CA install wrote into the target.
    fn nats_url(&self) -> String {
        format!(
            "tls://{}:{}@127.0.0.1:{}",
            self.env["NATS_USER"], self.env["NATS_PASSWORD"], self.env["NATS_PORT"]
        )
    }

    /// Put (`data`) or delete (`None`) an object in the stack's bucket with nats-py.
    fn object(&self, key: &str, data: Option<&str>) {
        let ca = self.p.target().join("certs/ca.crt");
        python_with(
            PY_DEL,
            &[&self.nats_url(), "bklite", key, data.unwrap_or("-")],
            Some(&ca),
        );
    }

    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.p.name)
    }
}

/// The findings of one check and severity.
fn findings<'a>(v: &'a Value, check: &str, severity: &str) -> Vec<&'a Value> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["check"] == check && f["severity"] == severity)
        .collect()
}

/// The one finding of `check`/`severity` whose subject contains every one of `subject`.
pub(crate) fn the_finding<'a>(v: &'a Value, check: &str, severity: &str, subject: &[&str]) -> &'a Value {
    let all = findings(v, check, severity);
    let hit: Vec<_> = all
        .iter()
        .filter(|f| subject.iter().all(|s| f["subject"].as_str().unwrap().contains(s)))
        .collect();
    assert_eq!(
        hit.len(),
        1,
        "expected one {severity} {check} finding about {subject:?}:\n{v:#}"
    );
    hit[0]
}

fn text_of(f: &Value) -> String {
    f.to_string()
}

fn assert_clean(live: &Live, when: &str) {
    let (r, v) = live.doctor(&[]);
    assert_eq!(r.code, 0, "{when}: {v:#}");
    // One info remains on the demo, and only it: its server caches in process memory (no
    // REDIS_CACHE_URL), which nobody outside it can read or clear.
    for f in v["findings"].as_array().unwrap() {
        assert!(
            f["severity"] == "info" && text_of(f).contains("process memory"),
            "{when}: {v:#}"
        );
    }
    assert!(v["release"].as_str().unwrap_or("").contains("0044_"), "{when}: {v:#}");
    eprintln!("doctor, {when}: clean in {:.2} s", v["seconds"].as_f64().unwrap_or(0.0));
}

#[test]
fn doctor_diagnoses_each_fault_of_a_live_install() {
    let live = Live::install();
    let t = Instant::now();
    assert_clean(&live, "the healthy install");
    assert!(t.elapsed() < Duration::from_secs(20), "doctor took {:?}", t.elapsed());

    // 1. Region 2 without NODE_SERVER_URL (field report 1): named, then added by --fix from
    //    region 1's row.
    let east = "(SELECT id FROM node_mgmt_cloudregion WHERE name = 'east')";
    live.psql(&format!(
        "DELETE FROM node_mgmt_sidecarenv WHERE key = 'NODE_SERVER_URL' AND cloud_region_id = {east}"
    ));
    let (r, v) = live.doctor(&[]);
    assert_eq!(r.code, 10, "{v:#}");
    let f = the_finding(&v, "regions", "error", &["east", "NODE_SERVER_URL"]);
    assert!(
        text_of(f).contains("missing") && text_of(f).contains("doctor --fix"),
        "{f:#}"
    );
    let (r, v) = live.doctor(&["--fix"]);
    assert_eq!(r.code, 0, "--fix: {v:#}");
    assert_eq!(
        the_finding(&v, "regions", "error", &["east", "NODE_SERVER_URL"])["fixed"],
        true
    );
    assert_eq!(
        live.psql(&format!(
            "SELECT value || '|' || type || '|' || is_pre FROM node_mgmt_sidecarenv WHERE key = 'NODE_SERVER_URL' AND cloud_region_id = {east}"
        )),
        // A region's rows are editable copies of region 1's (is_pre false), as the server makes them.
        format!("http://127.0.0.1:{}|str|false", live.env["WEB_PORT"])
    );
    assert_clean(&live, "after --fix of the missing key");

    // 2. A literal `null`: an error with the row as evidence; not a safe repair.
    live.psql(&format!(
        "UPDATE node_mgmt_sidecarenv SET value = 'null' WHERE key = 'NODE_SERVER_URL' AND cloud_region_id = {east}"
    ));
    let (r, v) = live.doctor(&["--fix"]);
    assert_eq!(r.code, 10, "{v:#}");
    let f = the_finding(&v, "regions", "error", &["east", "NODE_SERVER_URL"]);
    assert!(text_of(f).contains("null") && f["fixed"] == false, "{f:#}");
    live.psql(&format!(
        "UPDATE node_mgmt_sidecarenv SET value = 'http://127.0.0.1:{}' WHERE key = 'NODE_SERVER_URL' AND cloud_region_id = {east}",
        live.env["WEB_PORT"]
    ));

    // 2b. Region east without its service rows (made by an older bkbundle, or by hand): the UI
    //     shows it "not deployed" forever; --fix adds them as the server does for a new region.
    live.psql(&format!(
        "DELETE FROM node_mgmt_cloudregionservice WHERE cloud_region_id = {east}"
    ));
    let (r, v) = live.doctor(&[]);
    assert_eq!(r.code, 0, "a warning alone exits 0: {v:#}");
    let f = the_finding(&v, "regions", "warning", &["east", "services"]);
    assert!(
        text_of(f).contains("not deployed") && text_of(f).contains("stargazer"),
        "{f:#}"
    );
    live.doctor(&["--fix"]);
    assert_eq!(
        live.psql(&format!(
            "SELECT string_agg(name || '|' || status || '|' || deployed_status, ',' ORDER BY name) FROM node_mgmt_cloudregionservice WHERE cloud_region_id = {east}"
        )),
        "nats-executor|not_deployed|0,stargazer|not_deployed|0"
    );

    // 2c. A region-1 row that disagrees with the server's environment: the next restart of the
    //     server rewrites it, and doctor says which side wins.
    // (The same server with a trailing slash: the URL probe still answers, on loopback.)
    live.psql(&format!(
        "UPDATE node_mgmt_sidecarenv SET value = 'http://127.0.0.1:{}/' WHERE key = 'NODE_SERVER_URL' AND cloud_region_id = 1",
        live.env["WEB_PORT"]
    ));
    let (_, v) = live.doctor(&[]);
    let f = the_finding(&v, "regions", "warning", &["default", "NODE_SERVER_URL"]);
    assert!(
        text_of(f).contains("environment wins") && text_of(f).contains("DEFAULT_ZONE_VAR_NODE_SERVER_URL"),
        "{f:#}"
    );
    live.psql(&format!(
        "UPDATE node_mgmt_sidecarenv SET value = 'http://127.0.0.1:{}' WHERE key = 'NODE_SERVER_URL' AND cloud_region_id = 1",
        live.env["WEB_PORT"]
    ));
    assert_clean(&live, "after the service rows and region 1 were repaired");

    // 3. A stale cached env: a warning; --fix removes the entry.
    live.psql("INSERT INTO django_cache VALUES (':1:sidecar_env_cache_1', 'gAWVAAAAAAAAAAB9lC4=', now() + interval '300 seconds')");
    let (r, v) = live.doctor(&[]);
    assert_eq!(r.code, 0, "a warning alone exits 0: {v:#}");
    let f = the_finding(&v, "regions", "warning", &["default", "cached env"]);
    assert!(text_of(f).contains("sidecar_env_cache_1"), "{f:#}");
    live.doctor(&["--fix"]);
    assert_eq!(live.psql("SELECT count(*) FROM django_cache"), "0");

    // ... and in the server's Redis cache (db 1, as the stack configures Django), read when the
    // config names it: a stale entry is named with the Redis it is in; --fix deletes it.
    let redis = RedisServer::start();
    let config = live.p.dir.path().join("install.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}[database]\nredis_url = \"{}\"\n", redis.url(1))).unwrap();
    assert_eq!(
        redis
            .command(1, &["SET", ":1:sidecar_env_cache_2", "old-pickle"])
            .unwrap(),
        "+OK"
    );
    let (r, v) = live.doctor(&[]);
    assert_eq!(r.code, 0, "{v:#}");
    let f = the_finding(&v, "regions", "warning", &["east", "cached env in Redis"]);
    assert!(
        text_of(f).contains("NODE_SERVER_URL") && !r.stdout.contains(&redis.password),
        "{f:#}"
    );
    live.doctor(&["--fix"]);
    assert_eq!(redis.command(1, &["EXISTS", ":1:sidecar_env_cache_2"]).unwrap(), ":0");
    assert_clean(&live, "after the stale caches were removed");

    // 4. A package row whose object was deleted (field report 3): the 404; --fix re-uploads it.
    let key = "linux/x86_64/Telegraf/1.0.0/telegraf";
    live.object(key, None);
    let (r, v) = live.doctor(&[]);
    assert_eq!(r.code, 10, "{v:#}");
    let f = the_finding(&v, "packages", "error", &["Telegraf"]);
    assert!(text_of(f).contains(key) && text_of(f).contains("404"), "{f:#}");
    let (r, v) = live.doctor(&["--fix"]);
    assert_eq!(r.code, 0, "{v:#}");
    assert_eq!(the_finding(&v, "packages", "error", &["Telegraf"])["fixed"], true);
    assert_clean(&live, "after the object was uploaded again");

    // 5. An object no row points at: a warning naming it.
    let stray = "linux/x86_64/Stray/1.0.0/stray.bin";
    live.object(stray, Some("stray"));
    let (_, v) = live.doctor(&[]);
    the_finding(&v, "packages", "warning", &[stray]);
    live.object(stray, None);

    // A stored object that is not the bundle's package (with --bundle): a warning with both digests.
    let vector = "linux/x86_64/Vector/1.0.0/vector";
    live.object(vector, Some("a different vector"));
    let (_, v) = live.doctor(&[]);
    let f = the_finding(&v, "packages", "warning", &[vector]);
    assert!(
        text_of(f).contains("differs from the bundle") && text_of(f).contains("SHA-256="),
        "{f:#}"
    );

    // The empty package list (field report 2): named, with init-packages as the fix, which
    // (with --force for the changed object) brings everything back.
    live.psql("DELETE FROM node_mgmt_packageversion");
    let (r, v) = live.doctor(&[]);
    assert_eq!(r.code, 10, "{v:#}");
    let f = the_finding(&v, "packages", "error", &["node_mgmt_packageversion"]);
    assert!(
        text_of(f).contains("empty") && text_of(f).contains("init-packages"),
        "{f:#}"
    );
    let env_file = live.target().join(".env");
    let r = bk(&[
        "init-packages",
        "--auto",
        "--force",
        "--bundle",
        demo_bundle().to_str().unwrap(),
        "--env-file",
        env_file.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_clean(&live, "after init-packages");

    // 6. An agent whose install task succeeded but that never registered (field report 1).
    live.psql(
        "INSERT INTO node_mgmt_controllertask (created_at, updated_at, created_by, updated_by, domain, updated_by_domain, cloud_region_id, type, status, work_node, package_version_id) \
         VALUES (now() - interval '1 hour', now() - interval '1 hour', 'admin', 'admin', 'domain.com', 'domain.com', 1, 'install', 'finished', '', 1); \
         INSERT INTO node_mgmt_controllertasknode (task_id, ip, os, organizations, port, username, password, status, result, node_name, passphrase, \
         private_key, cpu_architecture, resolved_package_version_id, node_id, winrm_scheme, winrm_transport, winrm_cert_validation, connectivity_observed_node_id) \
         SELECT max(id), '10.9.9.9', 'linux', '[]', 22, 'root', '', 'success', '{}', '', '', '', 'x86_64', 1, '', '', '', false, '' FROM node_mgmt_controllertask",
    );
    let (r, v) = live.doctor(&[]);
    assert_eq!(r.code, 10, "{v:#}");
    let f = the_finding(&v, "agents", "error", &["default"]);
    assert!(text_of(f).contains("10.9.9.9") && text_of(f).contains("never"), "{f:#}");
    // Once its node registers, the task is no longer a finding.
    live.psql(
        "INSERT INTO node_mgmt_node (created_at, updated_at, created_by, updated_by, id, name, ip, operating_system, collector_configuration_directory, \
         metrics, status, tags, log_file_list, cloud_region_id, domain, updated_by_domain, install_method, node_type, cpu_architecture, cmdb_id, monitor_id, push_status) \
         VALUES (now(), now(), 'admin', 'admin', 'n1', 'host-10-9-9-9', '10.9.9.9', 'linux', '', '{}', '{}', '[]', '[]', 1, 'domain.com', 'domain.com', '', '', 'x86_64', '', '', '{}')",
    );
    assert_clean(&live, "after the agent registered");

    // 7. A restart-looping container of the stack whose log shows a name resolution failure.
    let looping = live.container("probe");
    let r = run(Command::new("docker").args([
        "run",
        "-d",
        "--name",
        &looping,
        "--label",
        &format!("com.docker.compose.project={}", live.p.name),
        "--label",
        "com.docker.compose.service=probe",
        "--restart",
        "always",
        "bkbundle-demo/base:1",
        "/bin/sh",
        "-c",
        "echo 'curl: (6) Could not resolve host: repo.example.com'; exit 1",
    ]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = run(Command::new("docker").args(["inspect", "-f", "{{.RestartCount}}", &looping]));
        if n.stdout.trim().parse::<i64>().unwrap_or(0) >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the probe container did not restart 3 times in 60 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (r, v) = live.doctor(&[]);
    let _ = run(Command::new("docker").args(["rm", "-f", &looping]));
    assert_eq!(r.code, 10, "{v:#}");
    let f = the_finding(&v, "containers", "error", &["probe"]);
    let s = text_of(f);
    assert!(
        s.contains("restart") && s.contains("Could not resolve host: repo.example.com"),
        "{f:#}"
    );
    assert!(s.contains("a name does not resolve"), "the hint: {f:#}");
    assert_clean(&live, "after the looping container was removed");

    // 8. A wrong NATS password: the authentication link, the password not shown.
    let wrong = format!(
        "nats://{}:not-the-password@127.0.0.1:{}",
        live.env["NATS_USER"], live.env["NATS_PORT"]
    );
    let (r, v) = live.doctor(&["--nats-url", &wrong]);
    assert_eq!(r.code, 10, "{v:#}");
    the_finding(&v, "nats", "error", &["authentication"]);
    assert!(!r.stdout.contains("not-the-password"), "{}", r.stdout);

    // 9. NATS down: the TCP link is named, and the package objects are not judged.
    let r = run(Command::new("docker").args(["stop", &live.container("nats")]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (r, v) = live.doctor(&[]);
    assert_eq!(r.code, 10, "{v:#}");
    the_finding(&v, "nats", "error", &["TCP"]);
    let f = the_finding(&v, "packages", "info", &["package objects"]);
    assert!(text_of(f).contains("not checked"), "{f:#}");
    let config = live.p.dir.path().join("install.toml");
    let r = bk(&[
        "doctor",
        "--config",
        config.to_str().unwrap(),
        "--target",
        live.target().to_str().unwrap(),
    ]);
    assert_eq!(r.code, 10);
    assert!(
        r.stdout.lines().next().unwrap_or("").starts_with("ERROR"),
        "errors first:\n{}",
        r.stdout
    );
    assert!(r.stdout.contains("fix: "), "{}", r.stdout);
}
