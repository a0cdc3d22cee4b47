//! Issue 3: install against the real Docker engine and Docker Compose: the demo end to end, the
//! failure variants (never healthy, exits at once, restart loop, port taken, corrupted bundle), a
//! kill at a random point followed by a re-run, a second run, edited files, dry run, upgrade.

use crate::harness::{ensure_demo_images, free_port, random_alnum, repo_root};
use crate::pack::{bk, demo_bundle, run, xor_byte, Run};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A throwaway compose project: removed (containers and volumes) when the test ends. Only tests
/// may do that; bkbundle itself never removes volumes.
pub(crate) struct Project {
    pub(crate) name: String,
    pub(crate) dir: tempfile::TempDir,
}

impl Project {
    pub(crate) fn new() -> Project {
        Project {
            name: format!("bkt{}", random_alnum(8).to_lowercase()),
            dir: tempfile::tempdir().unwrap(),
        }
    }
    pub(crate) fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    pub(crate) fn target(&self) -> PathBuf {
        self.path("target")
    }
    /// An install config with this project's name, a free web port and a short deadline.
    pub(crate) fn config(&self, timeout: u64, extra_env: &str) -> PathBuf {
        let p = self.path("install.toml");
        let text = format!(
            "format = 1\nproject = \"{}\"\n[env]\nWEB_PORT = \"{}\"\nPOSTGRES_PORT = \"{}\"\nNATS_PORT = \"{}\"\n{extra_env}\n[health]\ntimeout_secs = {timeout}\nsteady_secs = 2\n",
            self.name,
            free_port(),
            free_port(),
            free_port()
        );
        fs::write(&p, text).unwrap();
        p
    }
    /// A value of the installed stack's `.env`.
    pub(crate) fn env_value(&self, key: &str) -> String {
        let env = fs::read_to_string(self.target().join(".env")).unwrap();
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} is not in the stack's .env"))
            .to_string()
    }
    /// `psql -Atc SQL` on the installed stack's own PostgreSQL; panics unless it succeeds.
    pub(crate) fn stack_psql(&self, sql: &str) -> String {
        let r = run(Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.env_value("POSTGRES_PORT"),
                "-U",
                "postgres",
                "-d",
                "bklite",
                "-Atc",
                sql,
            ])
            .env("PGPASSWORD", self.env_value("POSTGRES_PASSWORD")));
        assert_eq!(r.code, 0, "{sql}: {}", r.stderr);
        r.stdout.trim().to_string()
    }
    pub(crate) fn install(&self, bundle: &Path, config: &Path, extra: &[&str]) -> Run {
        let target = self.target();
        let mut args = vec![
            "install",
            bundle.to_str().unwrap(),
            "--target",
            target.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        bk(&args)
    }
    pub(crate) fn containers(&self) -> Vec<String> {
        let r = run(Command::new("docker").args([
            "ps",
            "-a",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--format",
            "{{.Names}} {{.Status}}",
        ]));
        r.stdout.lines().map(str::to_string).collect()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let ids = run(Command::new("docker").args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
        ]));
        for id in ids.stdout.split_whitespace() {
            let _ = run(Command::new("docker").args(["rm", "-f", "-v", id]));
        }
        let vols = run(Command::new("docker").args([
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
        ]));
        for v in vols.stdout.split_whitespace() {
            let _ = run(Command::new("docker").args(["volume", "rm", v]));
        }
        let _ = run(Command::new("docker").args(["network", "rm", &format!("{}_default", self.name)]));
    }
}

/// Pack a bundle of `images` and a compose file `compose` (a string) into `dir`.
pub(crate) fn pack_stack(dir: &Path, name: &str, version: &str, images: &[&str], compose: &str) -> PathBuf {
    pack_stack_with(dir, name, version, images, compose, &[])
}

/// [`pack_stack`] with more arguments for `pack` (e.g. `--no-images`).
pub(crate) fn pack_stack_with(
    dir: &Path,
    name: &str,
    version: &str,
    images: &[&str],
    compose: &str,
    pack_args: &[&str],
) -> PathBuf {
    let stack = dir.join(format!("stack-{version}"));
    fs::create_dir_all(&stack).unwrap();
    fs::write(stack.join("docker-compose.yml"), compose).unwrap();
    fs::write(
        stack.join("env.template"),
        "WEB_PORT=18080\nPOSTGRES_PORT=15432\nNATS_PORT=14222\nSECRET=__GENERATE__\n",
    )
    .unwrap();
    let mut recipe = format!("format = 1\n[bundle]\nname = \"{name}\"\nversion = \"{version}\"\n");
    for i in images {
        recipe.push_str(&format!("[[images]]\nref = \"{i}\"\npull = false\n"));
    }
    recipe.push_str(&format!(
        "[stack]\ndir = \"{}\"\ncompose = \"docker-compose.yml\"\nenv_template = \"env.template\"\n",
        stack.display()
    ));
    let rp = dir.join(format!("recipe-{version}.toml"));
    fs::write(&rp, recipe).unwrap();
    let out = dir.join(format!("{name}-{version}.bkb"));
    let mut args = vec!["pack", rp.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend_from_slice(pack_args);
    let r = bk(&args);
    assert_eq!(r.code, 0, "pack: {}", r.stderr);
    out
}

/// A compose file: a healthy web service plus `extra` services.
pub(crate) fn compose_with(extra: &str) -> String {
    format!(
        r#"version: "2.4"
services:
  web:
    image: bkbundle-demo/web:1
    ports: ["127.0.0.1:${{WEB_PORT}}:8080"]
    healthcheck:
      test: ["CMD", "/bin/sh", "-c", "wget -q -O- http://127.0.0.1:8080/ >/dev/null"]
      interval: 1s
      retries: 30
{extra}"#
    )
}

/// A unique image only this test uses (so removing it disturbs no other test).
pub(crate) fn unique_image(dir: &Path) -> String {
    let name = format!("bkbundle-test/u{}:1", random_alnum(8).to_lowercase());
    let ctx = dir.join("imgctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(ctx.join("stamp"), random_alnum(32)).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM bkbundle-demo/base:1\nCOPY stamp /stamp\nCMD [\"/bin/sh\", \"-c\", \"while true; do sleep 1; done\"]\n",
    )
    .unwrap();
    let r = run(Command::new("docker")
        .args(["build", "-q", "-t", &name, ctx.to_str().unwrap()])
        .env("DOCKER_BUILDKIT", "0"));
    assert_eq!(r.code, 0, "docker build: {}", r.stderr);
    name
}

/// A bundle of web, `others` and a unique image (service `u`); returns it, the image and its id.
fn stack_with_unique_image(p: &Project, name: &str, others: &[&str]) -> (PathBuf, String, String) {
    ensure_demo_images();
    let img = unique_image(p.dir.path());
    let mut images = vec!["bkbundle-demo/web:1"];
    images.extend_from_slice(others);
    images.push(&img);
    let b = pack_stack(
        p.dir.path(),
        name,
        "1",
        &images,
        &compose_with(&format!("  u:\n    image: {img}\n")),
    );
    let id = image_id(&img).unwrap();
    (b, img, id)
}

pub(crate) fn image_id(reference: &str) -> Option<String> {
    let r = run(Command::new("docker").args(["image", "inspect", "-f", "{{.Id}}", reference]));
    (r.code == 0).then(|| r.stdout.trim().to_string())
}

#[test]
fn demo_installs_healthy_seeds_its_region_then_reruns_as_a_no_op() {
    ensure_demo_images();
    let p = Project::new();
    // Without the site values the region env needs, preflight refuses (naming region and key).
    let bare = p.config(120, "");
    let refused = p.install(demo_bundle(), &bare, &["--dry-run"]);
    assert_eq!(refused.code, 8, "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains("region \"default\", NODE_SERVER_URL: the placeholder ${SERVER_URL} is not set"),
        "{}",
        refused.stderr
    );
    let cfg = p.config(
        120,
        "HOST_IP = \"192.0.2.10\"\nSERVER_URL = \"http://192.0.2.10:18080\"",
    );
    let dry = p.install(demo_bundle(), &cfg, &["--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(dry.stdout.starts_with("dry run (nothing changed)"), "{}", dry.stdout);
    assert!(
        dry.stdout
            .contains("create   env default/NODE_SERVER_URL = http://192.0.2.10:18080"),
        "{}",
        dry.stdout
    );
    let dry_json = p.install(demo_bundle(), &cfg, &["--dry-run", "--json"]);
    assert_eq!(dry_json.code, 0, "{}", dry_json.stderr);
    let planned: serde_json::Value = serde_json::from_str(&dry_json.stdout).unwrap();
    assert!(!p.target().exists(), "a dry run creates nothing");
    assert!(p.containers().is_empty());

    let first = p.install(demo_bundle(), &cfg, &[]);
    assert_eq!(first.code, 0, "{}\n{}", first.stdout, first.stderr);
    assert!(first.stdout.contains("installed demo 1.0.0"), "{}", first.stdout);
    let ps = p.containers();
    assert_eq!(ps.len(), 5, "{ps:?}");
    assert_eq!(ps.iter().filter(|c| c.contains("(healthy)")).count(), 4, "{ps:?}");
    assert!(
        ps.iter().any(|c| c.contains("_migrate_") && c.contains("Exited (0)")),
        "{ps:?}"
    );

    // Secrets: generated, in .env with mode 0600, never printed.
    let env = fs::read_to_string(p.target().join(".env")).unwrap();
    let value = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    let secret = value("POSTGRES_PASSWORD");
    assert!(
        secret.len() >= 24 && secret.chars().all(|c| c.is_ascii_alphanumeric()),
        "{secret}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(p.target().join(".env")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        !first.stdout.contains(&secret) && !first.stderr.contains(&secret),
        "a secret was printed"
    );

    // The region was seeded in the stack's own PostgreSQL, with the site's values.
    let rows = p.stack_psql("select r.name, e.key, e.value, e.is_pre from node_mgmt_sidecarenv e join node_mgmt_cloudregion r on r.id = e.cloud_region_id order by e.key");
    assert!(
        rows.contains("default|NODE_SERVER_URL|http://192.0.2.10:18080|t"),
        "{rows}"
    );
    assert!(
        rows.contains(&format!("default|NATS_SERVERS|192.0.2.10:{}|t", value("NATS_PORT"))),
        "{rows}"
    );

    // Region 1 has one source: the same values went to the server's environment.
    let zone = p.target().join("default-zone.env");
    assert_eq!(fs::metadata(&zone).unwrap().permissions().mode() & 0o777, 0o600);
    let inspect = run(Command::new("docker").args([
        "inspect",
        "-f",
        "{{range .Config.Env}}{{println .}}{{end}}",
        &format!("{}_server_1", p.name),
    ]));
    assert_eq!(inspect.code, 0, "{}", inspect.stderr);
    assert!(
        inspect
            .stdout
            .contains("DEFAULT_ZONE_VAR_NODE_SERVER_URL=http://192.0.2.10:18080"),
        "{}",
        inspect.stdout
    );
    // The demo's server caches in process memory (no REDIS_CACHE_URL): install restarted it
    // after seeding, and says so rather than claiming a cache was cleared.
    assert!(
        first.stdout.contains("caches in process memory") && first.stdout.contains("restarted container"),
        "{}",
        first.stdout
    );

    // The agent packages were uploaded to the stack's NATS and recorded in its PostgreSQL.
    assert_eq!(
        p.stack_psql("select type, object, version, name from node_mgmt_packageversion order by id"),
        "controller|Controller|1.0.0|fusion-collectors-linux-amd64.zip\n\
         controller|Controller|1.0.0|fusion-collectors-linux-arm64.zip\n\
         controller|Controller|1.0.0|fusion-collectors-windows-amd64.zip\n\
         collector|Telegraf|1.0.0|telegraf\n\
         collector|Vector|1.0.0|vector\n\
         collector|NATS-Executor|1.0.0|nats-executor",
        "{}",
        first.stdout
    );
    assert!(first.stdout.contains("packages"), "{}", first.stdout);
    the_dry_run_planned_what_the_install_wrote(
        &p,
        &planned["plan"]["platform"],
        &value("NATS_PORT"),
        &value("NATS_PASSWORD"),
    );

    // Second run: a fast no-op that says so, and the secret is kept.
    let t = Instant::now();
    let second = p.install(demo_bundle(), &cfg, &["--json"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    let j: serde_json::Value = serde_json::from_str(&second.stdout).unwrap();
    assert_eq!(j["already_installed"], true, "{}", second.stdout);
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(fs::read_to_string(p.target().join(".env"))
        .unwrap()
        .contains(&format!("POSTGRES_PASSWORD={secret}")));
    assert_eq!(p.containers().len(), 5);

    // The field failure in the live database (a region made in the UI whose rows lack
    // NODE_SERVER_URL): a re-run's preflight, and a dry run's, read the live regions and stop
    // before anything changes, naming the region and the key.
    p.stack_psql(
        "INSERT INTO node_mgmt_cloudregion (id, created_at, updated_at, created_by, updated_by, domain, updated_by_domain, name, introduction, proxy_address) \
         SELECT max(id) + 1, now(), now(), 'admin', 'admin', 'domain.com', 'domain.com', 'west', '', '' FROM node_mgmt_cloudregion; \
         INSERT INTO node_mgmt_sidecarenv (key, value, type, description, cloud_region_id, is_pre) \
         SELECT 'NATS_SERVERS', '192.0.2.10:4222', 'str', '', id, false FROM node_mgmt_cloudregion WHERE name = 'west'",
    );
    let before = fs::read(p.target().join(".bkbundle/journal.json")).unwrap();
    for extra in [&["--dry-run"][..], &[]] {
        let r = p.install(demo_bundle(), &cfg, extra);
        assert_eq!(r.code, 8, "{extra:?}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains("cloud regions in the live database")
                && r.stderr.contains("region \"west\"")
                && r.stderr.contains("NODE_SERVER_URL"),
            "{extra:?}: {}",
            r.stderr
        );
    }
    assert_eq!(
        fs::read(p.target().join(".bkbundle/journal.json")).unwrap(),
        before,
        "nothing changed"
    );
}

/// The rows and objects `install --dry-run --json` listed before the first install are exactly
/// the ones the install then wrote: env rows (region, key, value; secrets by key only), service
/// rows, package rows, and objects (key, digest, size, read back with nats-py).
fn the_dry_run_planned_what_the_install_wrote(
    p: &Project,
    plan: &serde_json::Value,
    nats_port: &str,
    nats_password: &str,
) {
    assert_eq!(plan["assumed"], true, "{plan}");
    let mut rows: Vec<String> = plan["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["action"], "create", "{r}");
            format!(
                "{}|{}|{}",
                r["region"].as_str().unwrap(),
                r["key"].as_str().unwrap(),
                r["value"].as_str().unwrap_or("(secret)")
            )
        })
        .collect();
    rows.sort();
    let mut written: Vec<String> = p
        .stack_psql(
            "select r.name, e.key, case when e.type = 'secret' then '(secret)' \
             when e.key = 'NATS_TLS_CA' then 'sha256:' || encode(sha256(convert_to(e.value, 'UTF8')), 'hex') \
             else e.value end \
             from node_mgmt_sidecarenv e join node_mgmt_cloudregion r on r.id = e.cloud_region_id",
        )
        .lines()
        .map(str::to_string)
        .collect();
    written.sort();
    assert!(!rows.is_empty());
    // The CA a first install generates is not known to its dry run; the one written is the
    // target's certs/ca.crt, which the stack's NATS certificate chains to.
    let ca = fs::read(p.target().join("certs/ca.crt")).expect("install wrote certs/ca.crt");
    let ca_row = format!("default|NATS_TLS_CA|sha256:{}", bkbundle::digest::sha256_hex(&ca));
    for r in rows.iter_mut().filter(|r| r.starts_with("default|NATS_TLS_CA|")) {
        assert_eq!(r, "default|NATS_TLS_CA|(the site CA install generates)");
        *r = ca_row.clone();
    }
    assert!(written.contains(&ca_row), "{written:?}");
    assert!(rows.contains(&"default|NATS_PROTOCOL|tls".to_string()), "{rows:?}");
    assert_eq!(rows, written, "planned env rows vs written");

    let mut services: Vec<String> = plan["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    services.sort();
    let written = p.stack_psql(
        "select r.name || '/' || s.name from node_mgmt_cloudregionservice s join node_mgmt_cloudregion r on r.id = s.cloud_region_id order by 1",
    );
    assert_eq!(services.join("\n"), written, "planned service rows vs written");

    let objects = plan["packages"].as_array().unwrap();
    assert_eq!(objects.len(), 6, "{plan}");
    let mut planned_rows: Vec<String> = objects
        .iter()
        .map(|o| {
            let r = &o["row"];
            format!(
                "{}|{}|{}|{}|{}|{}",
                r["type"].as_str().unwrap(),
                r["os"].as_str().unwrap(),
                r["arch"].as_str().unwrap(),
                r["object"].as_str().unwrap(),
                r["version"].as_str().unwrap(),
                r["name"].as_str().unwrap()
            )
        })
        .collect();
    planned_rows.sort();
    let mut written: Vec<String> = p
        .stack_psql("select type, os, cpu_architecture, object, version, name from node_mgmt_packageversion")
        .lines()
        .map(str::to_string)
        .collect();
    written.sort();
    assert_eq!(planned_rows, written, "planned package rows vs written");

    // The objects, read back by an independent client: key, digest and size as planned.
    let bucket = plan["bucket"].as_str().unwrap();
    // The stack's NATS serves TLS: verified against the site CA install wrote.
    let url = format!("tls://bklite:{nats_password}@127.0.0.1:{nats_port}");
    let ca = p.target().join("certs/ca.crt");
    let listed = crate::packages::python_with(
        "import asyncio,sys,nats\nasync def m():\n    nc=await nats.connect(sys.argv[1]); o=await nc.jetstream().object_store(sys.argv[2])\n    for i in sorted(await o.list(), key=lambda i: i.name): print(i.name, i.digest, i.size)\n    await nc.close()\nasyncio.run(m())",
        &[&url, bucket],
        Some(&ca),
    );
    let listed: BTreeMap<&str, (&str, &str)> = listed
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0], (f[1], f[2]))
        })
        .collect();
    let installers = plan["installers"].as_array().unwrap();
    assert_eq!(installers.len(), 3, "{plan}");
    assert_eq!(
        listed.len(),
        objects.len() + installers.len(),
        "planned objects vs stored: {listed:?}"
    );
    for o in objects.iter().chain(installers) {
        let key = o["key"].as_str().unwrap();
        let stored = listed
            .get(key)
            .unwrap_or_else(|| panic!("{key} was planned but is not stored"));
        if o["ca_added"] == true {
            // The controller package carries the site CA: a new archive, whose bytes are checked.
            the_package_carries_the_ca(&url, bucket, key, &ca);
        } else {
            assert_eq!(
                *stored,
                (o["digest"].as_str().unwrap(), o["size"].to_string().as_str()),
                "{key}"
            );
        }
    }
}

/// The stored controller package, downloaded by nats-py: its digest is the object's, and it holds
/// `certs/ca.crt` equal to the target's CA.
fn the_package_carries_the_ca(url: &str, bucket: &str, key: &str, ca: &std::path::Path) {
    let out = crate::packages::python_with(
        r#"
import asyncio, base64, hashlib, io, sys, zipfile, nats
async def m():
    nc = await nats.connect(sys.argv[1])
    o = await nc.jetstream().object_store(sys.argv[2])
    r = await o.get(sys.argv[3])
    d = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(r.data).digest()).decode()
    assert d == r.info.digest, (d, r.info.digest)
    z = zipfile.ZipFile(io.BytesIO(r.data))
    name = [n for n in z.namelist() if n == "certs/ca.crt" or n.endswith("/certs/ca.crt")]
    print(z.read(name[0]).decode() if name else "NO CA")
    await nc.close()
asyncio.run(m())
"#,
        &[url, bucket, key],
        Some(ca),
    );
    assert_eq!(
        out.trim(),
        fs::read_to_string(ca).unwrap().trim(),
        "certs/ca.crt in {key}"
    );
}

#[test]
fn an_edited_file_is_kept_and_the_new_version_written_beside_it() {
    ensure_demo_images();
    let p = Project::new();
    let v1 = pack_stack(p.dir.path(), "edit", "1", &["bkbundle-demo/web:1"], &compose_with(""));
    let cfg = p.config(60, "");
    assert_eq!(p.install(&v1, &cfg, &[]).code, 0);
    let compose = p.target().join("docker-compose.yml");
    let mine = format!("{}\n# my local change\n", fs::read_to_string(&compose).unwrap());
    fs::write(&compose, &mine).unwrap();
    // A new version of the bundle with a changed compose file.
    let v2 = pack_stack(
        p.dir.path(),
        "edit",
        "2",
        &["bkbundle-demo/web:1"],
        &compose_with("").replace("retries: 30", "retries: 31"),
    );
    let r = p.install(&v2, &cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        fs::read_to_string(&compose).unwrap(),
        mine,
        "the operator's file is untouched"
    );
    let beside = fs::read_to_string(p.target().join("docker-compose.yml.bkbundle-new")).unwrap();
    assert!(beside.contains("retries: 31"));
    assert!(r.stdout.contains("kept your edited"), "{}", r.stdout);
}

#[test]
fn an_upgrade_restarts_only_changed_services() {
    ensure_demo_images();
    let p = Project::new();
    let extra = "  app:\n    image: bkbundle-demo/app:1\n";
    let v1 = pack_stack(
        p.dir.path(),
        "up",
        "1",
        &["bkbundle-demo/web:1", "bkbundle-demo/app:1"],
        &compose_with(extra),
    );
    let cfg = p.config(60, "");
    assert_eq!(p.install(&v1, &cfg, &[]).code, 0);
    let started = |svc: &str| {
        let id = run(Command::new("docker").args([
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.compose.project={}", p.name),
            "--filter",
            &format!("label=com.docker.compose.service={svc}"),
        ]));
        let id = id.stdout.trim().to_string();
        assert!(!id.is_empty(), "service {svc} has a container");
        run(Command::new("docker").args(["inspect", "-f", "{{.Id}} {{.State.StartedAt}}", &id]))
            .stdout
            .trim()
            .to_string()
    };
    let (web1, app1) = (started("web"), started("app"));
    let changed = compose_with(&extra.replace("app:1\n", "app:1\n    environment:\n      CHANGED: \"yes\"\n"));
    let v2 = pack_stack(
        p.dir.path(),
        "up",
        "2",
        &["bkbundle-demo/web:1", "bkbundle-demo/app:1"],
        &changed,
    );
    let r = p.install(&v2, &cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("installed up 2"), "{}", r.stdout);
    // The stack has no postgres service and no NATS (its .env names a NATS_PORT nothing
    // publishes): backed up first without a database and objects, and said so.
    assert!(
        r.stdout.contains("was backed up to")
            && r.stdout.contains("no database in this backup")
            && r.stdout.contains("the stack has no NATS, no objects in this backup"),
        "{}",
        r.stdout
    );
    assert_eq!(started("web"), web1, "the unchanged service was not restarted");
    assert_ne!(started("app"), app1, "the changed service was recreated");
}

/// Install a stack of web plus the `extra` services, expecting the health wait to fail (exit 9);
/// returns the run and how long it took.
fn install_unhealthy(p: &Project, name: &str, extra: &str, timeout: u64) -> (Run, Duration) {
    ensure_demo_images();
    let images = ["bkbundle-demo/web:1", "bkbundle-demo/app:1"];
    let b = pack_stack(p.dir.path(), name, "1", &images, &compose_with(extra));
    let t = Instant::now();
    let r = p.install(&b, &p.config(timeout, ""), &[]);
    let took = t.elapsed();
    assert_eq!(r.code, 9, "{}", r.stderr);
    (r, took)
}

#[test]
fn a_service_that_exits_at_once_fails_within_a_poll_with_its_logs() {
    ensure_demo_images();
    let p = Project::new();
    let extra = "  bad:\n    image: bkbundle-demo/app:1\n    command: [\"/bin/sh\", \"-c\", \"echo 'curl: (6) Could not resolve host: pypi.org'; exit 3\"]\n";
    let (r, took) = install_unhealthy(&p, "exit", extra, 300);
    assert!(
        took < Duration::from_secs(120),
        "failed fast, not at the 300 s deadline ({took:?})"
    );
    assert!(
        r.stderr.contains("service bad") && r.stderr.contains("exited with exit code 3"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("| curl: (6) Could not resolve host: pypi.org"),
        "the log lines are shown: {}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("hint: bad: the container tries to reach the Python package index"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_restart_loop_is_caught() {
    ensure_demo_images();
    let p = Project::new();
    let extra = "  loop:\n    image: bkbundle-demo/app:1\n    restart: always\n    command: [\"/bin/sh\", \"-c\", \"echo starting; sleep 1; exit 1\"]\n";
    let (r, took) = install_unhealthy(&p, "loop", extra, 300);
    assert!(took < Duration::from_secs(120));
    assert!(
        r.stderr.contains("service loop") && r.stderr.contains("restart"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("| starting"), "{}", r.stderr);
}

#[test]
fn a_service_that_never_becomes_healthy_fails_at_the_deadline() {
    ensure_demo_images();
    let p = Project::new();
    let extra = "  slow:\n    image: bkbundle-demo/app:1\n    command: [\"/bin/sh\", \"-c\", \"echo still warming up; while true; do sleep 1; done\"]\n    healthcheck:\n      test: [\"CMD\", \"/bin/false\"]\n      interval: 1s\n      start_period: 1h\n";
    let (r, took) = install_unhealthy(&p, "slow", extra, 8);
    assert!(took >= Duration::from_secs(8), "waited for the deadline ({took:?})");
    assert!(
        r.stderr.contains("service slow") && r.stderr.contains("not ready after 8s"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("| still warming up"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("service web"),
        "only the failing service is reported: {}",
        r.stderr
    );
}

#[test]
fn a_taken_port_fails_preflight_and_changes_nothing() {
    ensure_demo_images();
    let p = Project::new();
    let b = pack_stack(p.dir.path(), "port", "1", &["bkbundle-demo/web:1"], &compose_with(""));
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let cfg = p.config(60, "");
    let text = fs::read_to_string(&cfg).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("WEB_PORT") {
                format!("WEB_PORT = \"{port}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(&cfg, text).unwrap();
    let r = p.install(&b, &cfg, &[]);
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("port {port}/tcp (service web) on 127.0.0.1 is already in use")),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("nothing was changed"), "{}", r.stderr);
    assert!(!p.target().exists());
    assert!(p.containers().is_empty());
}

#[test]
fn missing_site_values_are_all_named_before_anything_changes() {
    ensure_demo_images();
    let p = Project::new();
    let b = pack_stack(p.dir.path(), "site", "1", &["bkbundle-demo/web:1"], &compose_with(""));
    // Repack with a template that needs site values.
    let stack = p.dir.path().join("stack-1");
    fs::write(
        stack.join("env.template"),
        "WEB_PORT=18080\nHOST_IP=${HOST_IP}\nURL=https://${HOST_IP}:${TLS_PORT}\n",
    )
    .unwrap();
    let rp = p.dir.path().join("recipe-1.toml");
    assert_eq!(bk(&["pack", rp.to_str().unwrap(), "-o", b.to_str().unwrap()]).code, 0);
    let r = p.install(&b, &p.config(60, ""), &[]);
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(
        r.stderr.contains("HOST_IP is required by stack/env.template line 2"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("TLS_PORT is required by stack/env.template line 3"),
        "{}",
        r.stderr
    );
    assert!(!p.target().exists());
}

#[test]
fn a_corrupted_bundle_loads_nothing() {
    let p = Project::new();
    let (b, img, id) = stack_with_unique_image(&p, "corrupt", &[]);
    assert_eq!(run(Command::new("docker").args(["rmi", &img])).code, 0);
    // Flip one byte in the middle of the bundle.
    xor_byte(&b, fs::metadata(&b).unwrap().len() / 3, 0xff);
    let r = p.install(&b, &p.config(60, ""), &[]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("failed verification") && r.stderr.contains("nothing was changed"),
        "{}",
        r.stderr
    );
    assert!(image_id(&id).is_none(), "no image was loaded");
    assert!(!p.target().exists());
    assert!(p.containers().is_empty());
}

#[test]
fn a_killed_install_converges_on_rerun() {
    let p = Project::new();
    let (b, img, id) = stack_with_unique_image(&p, "kill", &["bkbundle-demo/app:1"]);
    let cfg = p.config(120, "");
    // Kill at pseudo-random points across the steps (verify, load, layout, up, health).
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    for round in 0..3 {
        let _ = run(Command::new("docker").args(["rmi", "-f", &img]));
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(300 + (seed >> 33) % 6000);
        let mut child = crate::harness::bkbundle()
            .args([
                "install",
                b.to_str().unwrap(),
                "--target",
                p.target().to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        let r = p.install(&b, &cfg, &[]);
        assert_eq!(
            r.code, 0,
            "round {round}, killed after {delay:?}: {}\n{}",
            r.stdout, r.stderr
        );
        assert_eq!(
            image_id(&img).as_deref(),
            Some(id.as_str()),
            "the image is loaded with its id"
        );
        let ps = p.containers();
        assert_eq!(ps.len(), 2, "no duplicates: {ps:?}");
        let j = fs::read_to_string(p.target().join(".bkbundle/journal.json")).unwrap();
        assert!(j.contains("\"health\""), "{j}");
    }
}

#[test]
fn the_demo_stack_files_are_what_compose_accepts() {
    // The stack in examples/demo must render with its template alone plus examples/demo/install.toml,
    // so that scripts/demo.sh installs with nothing but Docker.
    let t = fs::read_to_string(repo_root().join("examples/demo/stack/env.template")).unwrap();
    assert!(!t.contains("${"), "the demo needs no site values in its .env");
    // The demo's stand-in for the server's migrations is the newest release's fixture (checked
    // against the real DDL in fixtures.rs): one schema, two copies (the stack must carry its
    // own), kept from drifting apart here.
    let body = |p: &str| {
        let text = fs::read_to_string(repo_root().join(p)).unwrap();
        text.lines()
            .skip_while(|l| l.starts_with("--") || l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        body("examples/demo/stack/server-schema.sql"),
        body("tests/fixtures/releases/0044.sql")
    );
}

/// The demo stack whose server stand-in creates the tables of the oldest release in the field
/// (the October 2025 fork, migration 0012): no proxy_address, no cpu_architecture, no service
/// table, varchar(200) values, the `bk_lite` bucket.
/// The demo bundle with the oldest release's schema (node_mgmt 0012) as its server's migrations.
pub(crate) fn oldest_release_demo_bundle(p: &Project) -> PathBuf {
    let demo = repo_root().join("examples/demo");
    let copy = p.path("demo");
    fs::create_dir_all(copy.join("stack")).unwrap();
    for f in ["docker-compose.yml", "env.template"] {
        fs::copy(demo.join("stack").join(f), copy.join("stack").join(f)).unwrap();
    }
    fs::copy(
        repo_root().join("tests/fixtures/releases/0012.sql"),
        copy.join("stack/server-schema.sql"),
    )
    .unwrap();
    fs::copy(demo.join("recipe.toml"), copy.join("recipe.toml")).unwrap();
    let bundle = p.path("old.bkb");
    let packed = bk(&[
        "pack",
        copy.join("recipe.toml").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
    ]);
    assert_eq!(packed.code, 0, "{}", packed.stderr);
    bundle
}

#[test]
fn the_demo_installs_on_the_oldest_release() {
    ensure_demo_images();
    let p = Project::new();
    let bundle = oldest_release_demo_bundle(&p);
    let cfg = p.config(
        120,
        "HOST_IP = \"192.0.2.10\"\nSERVER_URL = \"http://192.0.2.10:18080\"\n[[regions]]\nname = \"east\"\nproxy_address = \"192.0.2.77\"",
    );
    let r = p.install(&bundle, &cfg, &["--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let psql = |sql: &str| p.stack_psql(sql);
    // Region east as that release's server would create it: no proxy column, the proxy host in
    // the rows, editable rows (is_pre false) and PROXY_ADDRESS.
    assert_eq!(
        psql("SELECT e.key || '=' || e.value || '|' || e.is_pre FROM node_mgmt_sidecarenv e JOIN node_mgmt_cloudregion r ON r.id = e.cloud_region_id WHERE r.name = 'east' AND e.key IN ('NODE_SERVER_URL', 'PROXY_ADDRESS') ORDER BY e.key"),
        "NODE_SERVER_URL=http://192.0.2.77:18080|false\nPROXY_ADDRESS=192.0.2.77|false"
    );
    // Packages: the key without architecture, in the release's default bucket; one architecture
    // per (os, object, version) on this release, so the arm64 controller is left alone (noted).
    assert!(
        r.stdout.contains("Controller 1.0.0 (linux/arm64) was left alone"),
        "{}",
        r.stdout
    );
    assert_eq!(
        psql("SELECT count(*) FROM node_mgmt_packageversion"),
        "5",
        "{}",
        r.stdout
    );
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let text = j.to_string();
    assert!(text.contains("0012_"), "the report names the release: {text}");
    assert!(
        text.contains("bucket \\\"bk_lite\\\""),
        "the release's default bucket: {text}"
    );
}
