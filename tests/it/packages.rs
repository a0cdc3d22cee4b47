//! Issue 5 and issue 10: uploading the agent packages to a real `nats-server -js` and registering
//! them in a real PostgreSQL with the node_mgmt tables of every BK-Lite release in the field
//! (tests/fixtures/releases/); idempotency, conflicts, repair, orphans, interop with the upstream
//! Python client (nats-py), and NATS auth/TLS failures. Every test that touches the database
//! loops over [`RELEASES`]; the key layout, the columns and the default bucket it expects follow
//! the release ([`arch_column`], [`default_bucket`]).

use crate::harness::{bkbundle, repo_root, NatsOpts, NatsServer, PgCluster, RELEASES};
use crate::regions::{arch_column, default_bucket, release_db, release_label};
use bkbundle::error::{Error, Kind};
use bkbundle::packages::{self, ObjectAction, PackagesError, PackagesOptions, PackagesReport};
use bkbundle::platform::nats::NatsError;
use bkbundle::site::config::InstallConfig;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn demo_zip() -> PathBuf {
    repo_root().join("examples/demo/packages/fusion-collectors-linux-amd64.zip")
}

/// The demo's agent package given as a file (the form recipes had before packages could come
/// from an image's layers, which keeps working): a controller and three collectors inside it.
const FILE_PACKAGES: &str = r#"
[[packages]]
file = "ZIP"
type = "controller"
os = "linux"
arch = "x86_64"
object = "Controller"
version = "1.0.0"
description = "demo controller (collector-sidecar)"

[[packages]]
type = "collector"
os = "linux"
arch = "x86_64"
object = "Telegraf"
version = "1.0.0"
from = "fusion-collectors-linux-amd64.zip"
entry = "bin/telegraf"

[[packages]]
type = "collector"
os = "linux"
arch = "x86_64"
object = "Vector"
version = "1.0.0"
from = "fusion-collectors-linux-amd64.zip"
entry = "bin/vector"

[[packages]]
type = "collector"
os = "linux"
arch = "x86_64"
object = "NATS-Executor"
version = "1.0.0"
from = "fusion-collectors-linux-amd64.zip"
entry = "bin/nats-executor"
"#;

/// A bundle with the demo's packages (controller + three collectors inside it), no images.
pub(crate) fn bundle() -> &'static Path {
    static B: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = B.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pkgs = FILE_PACKAGES.replace("ZIP", &demo_zip().display().to_string());
        let text = format!(
            "format = 1\n[bundle]\nname = \"p\"\nversion = \"1\"\n{pkgs}\n[stack]\ndir = \"{}\"\ncompose = \"docker-compose.yml\"\n",
            repo_root().join("examples/demo/stack").display()
        );
        let recipe = dir.path().join("recipe.toml");
        std::fs::write(&recipe, text).unwrap();
        let out = dir.path().join("p.bkb");
        let o = bkbundle()
            .args(["pack", recipe.to_str().unwrap(), "-o", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "pack: {}", String::from_utf8_lossy(&o.stderr));
        (dir, out)
    });
    p
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn options(db: &str, nats: &str, config: &str) -> PackagesOptions {
    let config = InstallConfig::parse(config, "install.toml").expect("install config");
    let mut o = PackagesOptions::new(bundle().to_path_buf(), &config, BTreeMap::new());
    o.database_url = Some(db.to_string());
    o.nats_url = Some(nats.to_string());
    o
}

fn run(o: &PackagesOptions) -> Result<PackagesReport, PackagesError> {
    rt().block_on(packages::run_with_env(o, &no_env))
}

/// The object key of a demo package (version 1.0.0, x86_64) on `release`: with the architecture
/// exactly where packageversion has cpu_architecture.
fn key(release: &str, object: &str, name: &str) -> String {
    if arch_column(release) {
        format!("linux/x86_64/{object}/1.0.0/{name}")
    } else {
        format!("linux/{object}/1.0.0/{name}")
    }
}

pub(crate) fn python(script: &str, args: &[&str]) -> String {
    python_with(script, args, None)
}

/// Prepended to every nats-py script: connections give up instead of waiting forever (a plain
/// client of a TLS server otherwise hangs), and with `BKBUNDLE_TEST_NATS_CA` set they verify the
/// server against that CA (the install target's certs/ca.crt).
const PY_PRELUDE: &str = r#"
import os as _os, ssl as _ssl, nats as _nats
_connect = _nats.connect
async def _bounded_connect(*a, **k):
    ca = _os.environ.get("BKBUNDLE_TEST_NATS_CA")
    if ca and "tls" not in k:
        k["tls"] = _ssl.create_default_context(cafile=ca)
    k.setdefault("connect_timeout", 10)
    k.setdefault("allow_reconnect", False)
    return await _connect(*a, **k)
_nats.connect = _bounded_connect
"#;

/// [`python`] whose nats-py connections verify TLS against `ca`.
pub(crate) fn python_with(script: &str, args: &[&str], ca: Option<&std::path::Path>) -> String {
    let mut c = Command::new("python3");
    c.arg("-c").arg(format!("{PY_PRELUDE}\n{script}")).args(args);
    if let Some(ca) = ca {
        c.env("BKBUNDLE_TEST_NATS_CA", ca);
    }
    let o = c.output().expect("python3");
    assert!(
        o.status.success(),
        "python failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

const PY_GET: &str = r#"
import asyncio, hashlib, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    os_ = await js.object_store(sys.argv[2])
    r = await os_.get(sys.argv[3])
    print(hashlib.sha256(r.data).hexdigest(), r.info.description, r.info.digest, r.info.size)
    await nc.close()
asyncio.run(main())
"#;

const PY_PUT: &str = r#"
import asyncio, sys, nats
from nats.js.api import ObjectMeta, ObjectMetaOptions
async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    os_ = await js.object_store(sys.argv[2])
    data = open(sys.argv[4], 'rb').read()
    meta = ObjectMeta(name=sys.argv[3], description=sys.argv[5], options=ObjectMetaOptions(max_chunk_size=128*1024))
    info = await os_.put(sys.argv[3], data, meta=meta)
    print(info.digest)
    await nc.close()
asyncio.run(main())
"#;

/// `PY_READ_BACK URL BUCKET KEY...`: the streams, then per key what [`PY_GET`] prints, then the
/// bucket stream's message count.
const PY_READ_BACK: &str = r#"
import asyncio, hashlib, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    print(sorted(s.config.name for s in await js.streams_info()))
    os_ = await js.object_store(sys.argv[2])
    for key in sys.argv[3:]:
        r = await os_.get(key)
        print(hashlib.sha256(r.data).hexdigest(), r.info.description, r.info.digest, r.info.size)
    print((await js.stream_info('OBJ_' + sys.argv[2])).state.messages)
    await nc.close()
asyncio.run(main())
"#;

/// `PY_INFO URL BUCKET KEY FILE`: whether the object's info (nats-py) has FILE's size and
/// SHA-256 digest.
const PY_INFO: &str = r#"
import asyncio, base64, hashlib, os, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    os_ = await nc.jetstream().object_store(sys.argv[2])
    info = await os_.get_info(sys.argv[3])
    data = open(sys.argv[4], 'rb').read()
    digest = 'SHA-256=' + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
    if info.size == len(data) and info.digest == digest:
        print('same size and digest')
    else:
        print(info.size, info.digest, len(data), digest)
    await nc.close()
asyncio.run(main())
"#;

/// `PY_DEL URL BUCKET KEY DATA|-`: put DATA under KEY, or delete KEY (nats-py).
pub(crate) const PY_DEL: &str = r#"
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    os_ = await nc.jetstream().object_store(sys.argv[2])
    if sys.argv[4] == '-':
        await os_.delete(sys.argv[3])
    else:
        await os_.put(sys.argv[3], sys.argv[4].encode())
    await nc.close()
asyncio.run(main())
"#;

fn sha_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn telegraf_bytes() -> Vec<u8> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(demo_zip()).unwrap()).unwrap();
    let i = (0..z.len())
        .find(|&i| z.by_index(i).unwrap().name().unwrap().ends_with("bin/telegraf"))
        .unwrap();
    let mut f = z.by_index(i).unwrap();
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut v).unwrap();
    v
}

/// `bkbundle ARGS --database-url DB --nats-url NATS`, with no connection from the environment.
pub(crate) fn init_packages(args: &[&str], db: &str, nats: &str) -> std::process::Output {
    bkbundle()
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .args(args)
        .args(["--database-url", db, "--nats-url", nats])
        .output()
        .unwrap()
}

/// NATS refuses the credentials: an authentication error that does not show the secret.
fn refused(o: &PackagesOptions, secret: &str) {
    let e = run(o).unwrap_err();
    assert!(matches!(e, PackagesError::Nats(NatsError::Auth { .. })), "{e}");
    assert!(!e.to_string().contains(secret), "the secret was shown: {e}");
}

/// A stream's message count, with nats-py.
pub(crate) fn stream_messages(nats: &str, stream: &str) -> String {
    python(
        "import asyncio,sys,nats\nasync def m():\n    nc=await nats.connect(sys.argv[1]); i=await nc.jetstream().stream_info(sys.argv[2]); print(i.state.messages); await nc.close()\nasyncio.run(m())",
        &[nats, stream],
    )
}

/// The object store streams of a server, with nats-py.
fn streams(nats: &str) -> String {
    python(
        "import asyncio,sys,nats\nasync def m():\n    nc=await nats.connect(sys.argv[1]); print(sorted(s.config.name for s in await nc.jetstream().streams_info())); await nc.close()\nasyncio.run(m())",
        &[nats],
    )
}

#[test]
fn upload_rows_and_rerun_sends_nothing_on_each_release() {
    let pg = PgCluster::shared();
    for release in RELEASES {
        let nats = NatsServer::start(NatsOpts::default());
        let (name, db) = release_db(release, "upload", false);
        let o = options(&db, &nats.url(), "");
        let r = run(&o).unwrap_or_else(|e| panic!("{release}: {e}"));
        assert_eq!(
            (r.uploaded, r.skipped, r.rows_created),
            (4, 0, 4),
            "{release}: {}",
            packages::render(&r)
        );
        assert_eq!(r.release, Some(release_label(release)), "{release}");
        // Nothing names the bucket: the default of the release.
        let bucket = default_bucket(release);
        assert_eq!(r.bucket, bucket, "{release}");
        let rows = pg.psql(
            &name,
            "SELECT type || '|' || object || '|' || version || '|' || name || '|' || created_by || '|' || domain FROM node_mgmt_packageversion ORDER BY id",
        );
        assert!(
            rows.contains("controller|Controller|1.0.0|fusion-collectors-linux-amd64.zip|system|domain.com"),
            "{rows}"
        );
        assert!(
            rows.contains("collector|Telegraf|1.0.0|telegraf|system|domain.com"),
            "{rows}"
        );
        if arch_column(release) {
            let arch = pg.psql(&name, "SELECT DISTINCT cpu_architecture FROM node_mgmt_packageversion");
            assert_eq!(arch, "x86_64");
        }
        // nats-py reads what bkbundle wrote under the release's key: same bytes, description,
        // digest.
        let zip = std::fs::read(demo_zip()).unwrap();
        let controller = key(release, "Controller", "fusion-collectors-linux-amd64.zip");
        let ctl = r.packages.iter().find(|p| p.object == "Controller").unwrap();
        assert_eq!(ctl.key, controller, "{release}");
        // One nats-py run reads it all back (each run costs half a second of imports).
        let telegraf = key(release, "Telegraf", "telegraf");
        let out = python(PY_READ_BACK, &[&nats.url(), bucket, &controller, &telegraf]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert_eq!(lines[0], format!("['OBJ_{bucket}']"), "{release}: the only bucket");
        let parts: Vec<&str> = lines[1].split(' ').collect();
        assert_eq!(parts[0], sha_hex(&zip), "{out}");
        assert_eq!(parts[1], "fusion-collectors-linux-amd64.zip");
        assert_eq!(parts[2], ctl.digest);
        assert!(lines[2].starts_with(&sha_hex(&telegraf_bytes())), "{out}");
        // 4 objects: a chunk and a meta message each.
        assert_eq!(lines[3], "8", "{release}: {out}");
        assert!(
            r.orphan_objects.is_empty() && r.missing_objects.is_empty(),
            "{}",
            packages::render(&r)
        );

        // Re-run: everything skipped, nothing sent, rows unchanged.
        let r2 = run(&o).unwrap();
        assert_eq!((r2.skipped, r2.uploaded, r2.replaced, r2.bytes_sent), (4, 0, 0, 0));
        assert_eq!(r2.rows_unchanged, 4);
        assert!(r2.seconds < 1.5, "re-run took {} s", r2.seconds);
    }
}

#[test]
fn the_bucket_is_the_releases_default_unless_something_names_it() {
    let nats = NatsServer::start(NatsOpts::default());
    for release in RELEASES {
        let (_, db) = release_db(release, "bucket", false);
        let dry = |config: &str, site: &[(&str, &str)], flag: Option<&str>| {
            let mut o = options(&db, &nats.url(), config);
            o.dry_run = true;
            o.site = site.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            o.bucket = flag.map(str::to_string);
            run(&o).unwrap_or_else(|e| panic!("{release}: {e}")).bucket
        };
        assert_eq!(dry("", &[], None), default_bucket(release), "{release}");
        // The stack's NATS_NAMESPACE (the server's setting) > the default; [nats] bucket > it;
        // --bucket > everything.
        let ns = [("NATS_NAMESPACE", "site_ns")];
        assert_eq!(dry("", &ns, None), "site_ns", "{release}");
        assert_eq!(dry("[nats]\nbucket = \"cfg\"\n", &ns, None), "cfg", "{release}");
        assert_eq!(
            dry("[nats]\nbucket = \"cfg\"\n", &ns, Some("flag")),
            "flag",
            "{release}"
        );
    }
    assert_eq!(streams(&nats.url()), "[]", "dry runs create no bucket");
}

#[test]
fn object_written_by_nats_py_with_128k_chunks_is_unchanged() {
    for release in RELEASES {
        let nats = NatsServer::start(NatsOpts::default());
        let (_, db) = release_db(release, "py", false);
        let bucket = default_bucket(release);
        // Create the bucket and the object with nats-py first.
        let k = key(release, "Controller", "fusion-collectors-linux-amd64.zip");
        python(
            "import asyncio,sys,nats\nasync def m():\n    nc=await nats.connect(sys.argv[1]); await nc.jetstream().create_object_store(sys.argv[2]); await nc.close()\nasyncio.run(m())",
            &[&nats.url(), bucket],
        );
        python(
            PY_PUT,
            &[
                &nats.url(),
                bucket,
                &k,
                demo_zip().to_str().unwrap(),
                "fusion-collectors-linux-amd64.zip",
            ],
        );
        let r = run(&options(&db, &nats.url(), "")).unwrap_or_else(|e| panic!("{release}: {e}"));
        let ctl = r.packages.iter().find(|p| p.object == "Controller").unwrap();
        assert_eq!(ctl.action, ObjectAction::Skipped, "{release}: {}", packages::render(&r));
        assert_eq!(r.uploaded, 3, "{release}");
    }
}

#[test]
fn conflict_force_repair_and_orphans() {
    let pg = PgCluster::shared();
    for release in RELEASES {
        let nats = NatsServer::start(NatsOpts::default());
        let (name, db) = release_db(release, "cf", false);
        let bucket = default_bucket(release);
        let o = options(&db, &nats.url(), "");
        run(&o).unwrap_or_else(|e| panic!("{release}: {e}"));
        let k = key(release, "Vector", "vector");
        // A different object under a fixed version.
        python(PY_DEL, &[&nats.url(), bucket, &k, "something else"]);
        let e = run(&o).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, PackagesError::Conflict(_)), "{release}: {msg}");
        assert!(msg.contains(&k) && msg.contains("stored SHA-256="), "{msg}");
        let err = Error::from(e);
        assert_eq!(err.kind, Kind::Input);
        assert!(err.hints.iter().any(|h| h.contains("--force")));
        let mut forced = o.clone();
        forced.force = true;
        let r = run(&forced).unwrap();
        assert_eq!(r.replaced, 1, "{release}: {}", packages::render(&r));
        // The replaced version's chunks were purged: one chunk and one meta per object remain.
        assert_eq!(
            stream_messages(&nats.url(), &format!("OBJ_{bucket}")),
            "8",
            "{release}: stale chunks left in OBJ_{bucket}"
        );
        assert_eq!(run(&o).unwrap().skipped, 4);

        // A deleted object is reported and repaired from the bundle.
        let k = key(release, "Telegraf", "telegraf");
        python(PY_DEL, &[&nats.url(), bucket, &k, "-"]);
        let r = run(&o).unwrap();
        assert_eq!(r.missing_objects.len(), 1, "{release}: {}", packages::render(&r));
        assert!(r.missing_objects[0].repaired);
        assert_eq!(r.missing_objects[0].key, k);
        let tel = python(PY_GET, &[&nats.url(), bucket, &k]);
        assert!(tel.starts_with(&sha_hex(&telegraf_bytes())), "{tel}");

        // An orphan object (in the release's layout); and a row whose object is gone and not in
        // the bundle.
        let stray = key(release, "Stray", "stray.bin");
        python(PY_DEL, &[&nats.url(), bucket, &stray, "x"]);
        let (arch_col, arch_val) = if arch_column(release) {
            (", cpu_architecture", ", 'x86_64'")
        } else {
            ("", "")
        };
        pg.psql(
            &name,
            &format!(
                "INSERT INTO node_mgmt_packageversion (type, os, object, version, name, description, created_at, updated_at, created_by, updated_by, domain, updated_by_domain{arch_col}) \
                 VALUES ('collector','linux','Ghost','9.9.9','ghost','',now(),now(),'system','system','domain.com','domain.com'{arch_val})"
            ),
        );
        let r = run(&o).unwrap();
        let text = packages::render(&r);
        assert_eq!(r.orphan_objects, vec![stray], "{release}: {text}");
        let ghost: Vec<_> = r.missing_objects.iter().filter(|m| !m.repaired).collect();
        assert_eq!(ghost.len(), 1, "{release}: {text}");
        assert!(
            text.contains("NOT repaired") && text.contains(&format!("row {}", ghost[0].row_id)),
            "{text}"
        );
    }
}

/// Options with a bucket of the release's own, for tests that share NATS servers across
/// releases and are about the connection, not the bucket.
fn options_in(release: &str, db: &str, nats: &str, config: &str) -> PackagesOptions {
    let mut o = options(db, nats, config);
    o.bucket = Some(format!("b{release}"));
    o
}

#[test]
fn user_password_and_tls_errors_are_named() {
    let nats = NatsServer::start(NatsOpts {
        user_password: Some(("bk".into(), "right-pw".into())),
        ..Default::default()
    });
    let tls = NatsServer::start(NatsOpts {
        tls: true,
        ..Default::default()
    });
    let ca = tls.ca_file.clone().unwrap();
    // A CA that did not sign the server's certificate.
    let other = NatsServer::start(NatsOpts {
        tls: true,
        ..Default::default()
    });
    for release in RELEASES {
        let (_, db) = release_db(release, "auth", false);
        let url = format!("nats://bk:right-pw@127.0.0.1:{}", nats.port);
        assert_eq!(
            run(&options_in(release, &db, &url, ""))
                .unwrap_or_else(|e| panic!("{release}: {e}"))
                .uploaded,
            4
        );
        let o = options_in(
            release,
            &db,
            &nats.url(),
            "[nats]\nuser = \"bk\"\npassword = \"right-pw\"\n",
        );
        assert_eq!(run(&o).unwrap().skipped, 4);
        refused(
            &options_in(
                release,
                &db,
                &nats.url(),
                "[nats]\nuser = \"bk\"\npassword = \"wrong\"\n",
            ),
            "wrong",
        );

        let (_, db2) = release_db(release, "tls", false);
        let o = options_in(
            release,
            &db2,
            &tls.url(),
            &format!("[nats]\nca_file = \"{}\"\n", ca.display()),
        );
        assert_eq!(run(&o).unwrap_or_else(|e| panic!("{release}: {e}")).uploaded, 4);
        let o = options_in(
            release,
            &db2,
            &tls.url(),
            &format!("[nats]\nca_file = \"{}\"\n", other.ca_file.clone().unwrap().display()),
        );
        let e = run(&o).unwrap_err();
        assert!(matches!(e, PackagesError::Nats(NatsError::Tls { .. })), "{e}");
        // Nothing listening.
        let o = options_in(release, &db2, "nats://127.0.0.1:1", "");
        let e = run(&o).unwrap_err();
        assert!(matches!(e, PackagesError::Nats(NatsError::Connect { .. })), "{e}");
        // A host name that cannot resolve. An empty label makes the C library refuse the name
        // itself, so no query leaves the machine.
        let o = options_in(release, &db2, "nats://no..such:4222", "");
        let e = run(&o).unwrap_err();
        assert!(
            matches!(e, PackagesError::Nats(NatsError::Resolve { ref host, .. }) if host == "no..such"),
            "{e}"
        );
        assert!(Error::from(e).hints.iter().any(|h| h.contains("/etc/hosts")));
    }
}

#[test]
fn cli_json_report() {
    for release in RELEASES {
        let nats = NatsServer::start(NatsOpts::default());
        let (_, db) = release_db(release, "cli", false);
        let o = init_packages(
            &[
                "--json",
                "init-packages",
                "--auto",
                "--bundle",
                bundle().to_str().unwrap(),
            ],
            &db,
            &nats.url(),
        );
        assert!(o.status.success(), "{release}: {}", String::from_utf8_lossy(&o.stdout));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["uploaded"], 4, "{release}: {v}");
        assert_eq!(v["release"], release_label(release).as_str(), "{v}");
        assert_eq!(v["bucket"], default_bucket(release), "{v}");
        assert!(v.get("generation").is_none(), "{v}");
    }
}

#[test]
fn two_arches_collide_where_the_unique_constraint_lacks_the_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let arm = dir.path().join("fusion-collectors-linux-arm64.zip");
    std::fs::copy(demo_zip(), &arm).unwrap();
    let ctl = |file: &Path, arch: &str| {
        format!(
            "[[packages]]\nfile = \"{}\"\ntype = \"controller\"\nos = \"linux\"\narch = \"{arch}\"\nobject = \"Controller\"\nversion = \"1.0.0\"\n",
            file.display()
        )
    };
    let text = format!(
        "format = 1\n[bundle]\nname = \"a\"\nversion = \"1\"\n{}{}\n[stack]\ndir = \"{}\"\ncompose = \"docker-compose.yml\"\n",
        ctl(&demo_zip(), "x86_64"),
        ctl(&arm, "arm64"),
        repo_root().join("examples/demo/stack").display()
    );
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(&recipe, text).unwrap();
    let out = dir.path().join("a.bkb");
    let o = bkbundle()
        .args(["pack", recipe.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "pack: {}", String::from_utf8_lossy(&o.stderr));
    let pg = PgCluster::shared();
    let nats = NatsServer::start(NatsOpts::default());
    for release in RELEASES {
        let (name, db) = release_db(release, "arches", false);
        let mut o = options_in(release, &db, &nats.url(), "");
        o.bundle = Some(out.clone());
        let r = run(&o).unwrap_or_else(|e| panic!("{release}: {e}"));
        let text = packages::render(&r);
        let rows = pg.psql(&name, "SELECT count(*) FROM node_mgmt_packageversion");
        if arch_column(release) {
            assert_eq!((r.uploaded, rows.as_str()), (2, "2"), "{release}: {text}");
            assert!(!text.contains("collides"), "{release}: {text}");
        } else {
            // One row per (os, object, version): the second architecture is left alone, named.
            assert_eq!((r.uploaded, rows.as_str()), (1, "1"), "{release}: {text}");
            assert!(text.contains("collides") && text.contains("arm64"), "{release}: {text}");
        }
    }
}

#[test]
fn token_client_certificate_and_missing_jetstream() {
    let nats = NatsServer::start(NatsOpts {
        token: Some("s3cret-token".into()),
        ..Default::default()
    });
    // A server that requires a client certificate signed by its CA.
    let mtls = NatsServer::start(NatsOpts {
        tls: true,
        verify_clients: true,
        ..Default::default()
    });
    let ca = mtls.ca_file.clone().unwrap();
    let (cert, key) = mtls.client_cert.clone().unwrap();
    // JetStream not enabled.
    let plain = NatsServer::start(NatsOpts {
        no_jetstream: true,
        ..Default::default()
    });
    for release in RELEASES {
        let (_, db) = release_db(release, "tok", false);
        let o = options_in(release, &db, &nats.url(), "[nats]\ntoken = \"s3cret-token\"\n");
        assert_eq!(run(&o).unwrap_or_else(|e| panic!("{release}: {e}")).uploaded, 4);
        refused(
            &options_in(release, &db, &nats.url(), "[nats]\ntoken = \"not-it\"\n"),
            "not-it",
        );

        let (_, db2) = release_db(release, "mtls", false);
        let o = options_in(
            release,
            &db2,
            &mtls.url(),
            &format!(
                "[nats]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                ca.display(),
                cert.display(),
                key.display()
            ),
        );
        assert_eq!(run(&o).unwrap_or_else(|e| panic!("{release}: {e}")).uploaded, 4);
        let o = options_in(
            release,
            &db2,
            &mtls.url(),
            &format!("[nats]\nca_file = \"{}\"\n", ca.display()),
        );
        let e = run(&o).unwrap_err();
        assert!(
            matches!(
                e,
                PackagesError::Nats(NatsError::Tls { .. }) | PackagesError::Nats(NatsError::Auth { .. })
            ),
            "without the client certificate: {e}"
        );
        // Only one of cert/key is a configuration error, named before connecting.
        let o = options_in(
            release,
            &db2,
            &mtls.url(),
            &format!("[nats]\ncert_file = \"{}\"\n", cert.display()),
        );
        let e = run(&o).unwrap_err();
        assert!(matches!(e, PackagesError::Nats(NatsError::BadConfig(_))), "{e}");

        let e = run(&options_in(release, &db, &plain.url(), "")).unwrap_err();
        assert!(matches!(e, PackagesError::Nats(NatsError::NoJetStream { .. })), "{e}");
        let err = Error::from(e);
        assert!(err.hints.iter().any(|h| h.contains("jetstream")), "{:?}", err.hints);
    }
}

#[test]
fn a_credentials_file_of_the_platform_jwt_auth() {
    let nats = NatsServer::start(NatsOpts {
        jwt: true,
        ..Default::default()
    });
    let creds = nats.creds_file.clone().unwrap();
    let other = tempfile::tempdir().unwrap();
    let stranger = crate::harness::mint_jwt(other.path());
    for release in RELEASES {
        let (_, db) = release_db(release, "creds", false);
        let o = options_in(
            release,
            &db,
            &nats.url(),
            &format!("[nats]\ncredentials = \"{}\"\n", creds.display()),
        );
        assert_eq!(run(&o).unwrap_or_else(|e| panic!("{release}: {e}")).uploaded, 4);
        // Without credentials, and with a user of an account the server does not know.
        let e = run(&options_in(release, &db, &nats.url(), "")).unwrap_err();
        assert!(matches!(e, PackagesError::Nats(NatsError::Auth { .. })), "{e}");
        let o = options_in(
            release,
            &db,
            &nats.url(),
            &format!("[nats]\ncredentials = \"{}\"\n", stranger.display()),
        );
        let e = run(&o).unwrap_err();
        assert!(matches!(e, PackagesError::Nats(NatsError::Auth { .. })), "{e}");
        // A credentials file that is not there is named before connecting.
        let o = options_in(
            release,
            &db,
            &nats.url(),
            "[nats]\ncredentials = \"/nonexistent/user.creds\"\n",
        );
        let e = run(&o).unwrap_err();
        assert!(
            matches!(e, PackagesError::Nats(NatsError::BadConfig(ref m)) if m.contains("/nonexistent/user.creds")),
            "{e}"
        );
    }
}

#[test]
fn dry_run_writes_nothing() {
    let pg = PgCluster::shared();
    let nats = NatsServer::start(NatsOpts::default());
    for release in RELEASES {
        let (name, db) = release_db(release, "dry", false);
        let mut o = options(&db, &nats.url(), "");
        o.dry_run = true;
        let r = run(&o).unwrap_or_else(|e| panic!("{release}: {e}"));
        let text = packages::render(&r);
        assert!(r.dry_run && text.starts_with("dry run"), "{text}");
        assert_eq!(r.packages.len(), 4, "{text}");
        assert!(
            r.packages
                .iter()
                .all(|p| p.action == ObjectAction::Uploaded && p.row.is_none()),
            "{text}"
        );
        assert_eq!(
            r.packages.iter().find(|p| p.object == "Telegraf").unwrap().key,
            key(release, "Telegraf", "telegraf"),
            "{release}"
        );
        assert!(text.contains("would be created"), "{text}");
        assert!(
            text.contains(&format!("bucket \"{}\" does not exist", default_bucket(release))),
            "{release}: {text}"
        );
        assert_eq!(r.bytes_sent, 0);
        assert_eq!(pg.psql(&name, "SELECT count(*) FROM node_mgmt_packageversion"), "0");
    }
    assert_eq!(streams(&nats.url()), "[]", "the dry run created a stream");
}

#[test]
fn the_manifest_records_each_package_digest() {
    let out = Command::new("tar")
        .args(["-xOf", bundle().to_str().unwrap(), "bundle.toml"])
        .output()
        .unwrap();
    let manifest = String::from_utf8_lossy(&out.stdout).to_string();
    let telegraf = sha_hex(&telegraf_bytes());
    assert!(
        manifest.contains(&format!("sha256 = \"{telegraf}\"")),
        "the Telegraf record lacks its entry's digest:\n{manifest}"
    );
    let zip = sha_hex(&std::fs::read(demo_zip()).unwrap());
    assert!(manifest.matches(&zip).count() >= 2, "{manifest}");
}

#[test]
fn a_directory_of_packages_recognised_by_name() {
    let pg = PgCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(demo_zip(), dir.path().join("fusion-collectors-2.1.0-linux-amd64.zip")).unwrap();
    let tgz = crate::hardening::tgz_of(&telegraf_bytes()); // a real .tar.gz: --dir checks it as pack does
    std::fs::write(dir.path().join("telegraf_v1.28.3_linux_arm64.tar.gz"), &tgz).unwrap();
    for release in RELEASES {
        let nats = NatsServer::start(NatsOpts::default());
        let (name, db) = release_db(release, "dir", false);
        let bucket = default_bucket(release);
        let cli = |extra: &[&str]| {
            let mut args = vec![
                "--json",
                "init-packages",
                "--auto",
                "--dir",
                dir.path().to_str().unwrap(),
            ];
            args.extend_from_slice(extra);
            init_packages(&args, &db, &nats.url())
        };
        let o = cli(&[]);
        assert!(o.status.success(), "{release}: {}", String::from_utf8_lossy(&o.stdout));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["uploaded"], 2, "{release}: {v}");
        if arch_column(release) {
            let rows = pg.psql(
                &name,
                "SELECT type || '|' || os || '|' || cpu_architecture || '|' || object || '|' || version || '|' || name FROM node_mgmt_packageversion ORDER BY id",
            );
            assert_eq!(
                rows,
                "controller|linux|x86_64|Controller|2.1.0|fusion-collectors-2.1.0-linux-amd64.zip\n\
                 collector|linux|arm64|Telegraf|1.28.3|telegraf_v1.28.3_linux_arm64.tar.gz"
            );
        } else {
            let rows = pg.psql(
                &name,
                "SELECT type || '|' || os || '|' || object || '|' || version || '|' || name FROM node_mgmt_packageversion ORDER BY id",
            );
            assert_eq!(
                rows,
                "controller|linux|Controller|2.1.0|fusion-collectors-2.1.0-linux-amd64.zip\n\
                 collector|linux|Telegraf|1.28.3|telegraf_v1.28.3_linux_arm64.tar.gz",
                "{release}"
            );
        }
        let object = if arch_column(release) {
            "linux/arm64/Telegraf/1.28.3/telegraf_v1.28.3_linux_arm64.tar.gz"
        } else {
            "linux/Telegraf/1.28.3/telegraf_v1.28.3_linux_arm64.tar.gz"
        };
        let got = python(PY_GET, &[&nats.url(), bucket, object]);
        assert!(got.starts_with(&sha_hex(&tgz)), "{release}: {got}");
        // Unchanged: nothing sent.
        let v: serde_json::Value = serde_json::from_slice(&cli(&[]).stdout).unwrap();
        assert_eq!(
            (v["skipped"].as_u64(), v["bytes_sent"].as_u64()),
            (Some(2), Some(0)),
            "{release}: {v}"
        );

        // A file whose name says no version is named, with the flag that fixes it; nothing
        // written.
        std::fs::write(
            dir.path().join("vector-linux-amd64.tar.gz"),
            crate::hardening::tgz_of(b"v"),
        )
        .unwrap();
        let o = cli(&[]);
        assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stdout));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let msg = v.to_string();
        assert!(
            msg.contains("vector-linux-amd64.tar.gz") && msg.contains("--version"),
            "{msg}"
        );
        assert_eq!(pg.psql(&name, "SELECT count(*) FROM node_mgmt_packageversion"), "2");
        // The flags override the name for every file of the directory.
        let one = tempfile::tempdir().unwrap();
        std::fs::rename(
            dir.path().join("vector-linux-amd64.tar.gz"),
            one.path().join("vector-linux-amd64.tar.gz"),
        )
        .unwrap();
        let o = init_packages(
            &[
                "init-packages",
                "--auto",
                "--dir",
                one.path().to_str().unwrap(),
                "--version",
                "0.39.0",
                "--arch",
                "aarch64",
            ],
            &db,
            &nats.url(),
        );
        assert!(o.status.success(), "{release}: {}", String::from_utf8_lossy(&o.stderr));
        let arch = if arch_column(release) {
            "cpu_architecture"
        } else {
            "'-'"
        };
        assert_eq!(
            pg.psql(
                &name,
                &format!("SELECT object || '|' || version || '|' || {arch} FROM node_mgmt_packageversion WHERE name = 'vector-linux-amd64.tar.gz'")
            ),
            if arch_column(release) { "Vector|0.39.0|arm64" } else { "Vector|0.39.0|-" },
            "{release}"
        );
    }
}

#[test]
fn a_killed_upload_rerun_completes() {
    let pg = PgCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bigprobe-1.0.0-linux-amd64");
    // 96 MiB that do not compress to nothing: a counter pattern.
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        let mut block = vec![0u8; 1 << 20];
        for i in 0u32..96 {
            for (j, b) in block.iter_mut().enumerate() {
                *b = (j as u32).wrapping_mul(2654435761).wrapping_add(i) as u8;
            }
            f.write_all(&block).unwrap();
        }
    }
    let file_sha = sha_hex(&std::fs::read(&file).unwrap());
    for release in RELEASES {
        let nats = NatsServer::start(NatsOpts::default());
        let (name, db) = release_db(release, "kill", false);
        let bucket = default_bucket(release);
        let args = |extra: &[&str]| {
            let mut c = bkbundle();
            c.env_remove("DATABASE_URL")
                .env_remove("NATS_URL")
                .args(["init-packages", "--auto", "--dir", dir.path().to_str().unwrap()])
                .args(["--database-url", &db, "--nats-url", &nats.url()])
                .args(extra);
            c
        };
        let mut killed = false;
        for delay_ms in [150u64, 60, 20] {
            let mut child = args(&[]).spawn().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                child.wait().unwrap();
                killed = true;
                break;
            }
            child.wait().unwrap();
            // It finished first: start over from nothing and kill sooner.
            pg.psql(&name, "DELETE FROM node_mgmt_packageversion");
            python(
                "import asyncio,sys,nats\nasync def m():\n    nc=await nats.connect(sys.argv[1]); await nc.jetstream().delete_object_store(sys.argv[2]); await nc.close()\nasyncio.run(m())",
                &[&nats.url(), bucket],
            );
        }
        assert!(
            killed,
            "{release}: the upload always finished before it could be killed"
        );
        // Nothing half-written is visible: no row, and no object (its meta is published last).
        assert_eq!(pg.psql(&name, "SELECT count(*) FROM node_mgmt_packageversion"), "0");
        let out = args(&["--json"]).output().unwrap();
        assert!(
            out.status.success(),
            "{release}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["uploaded"], 1, "{release}: {v}");
        let object = if arch_column(release) {
            "linux/x86_64/bigprobe/1.0.0/bigprobe-1.0.0-linux-amd64"
        } else {
            "linux/bigprobe/1.0.0/bigprobe-1.0.0-linux-amd64"
        };
        // nats-py finds it whole under the release's key: size and digest of the file (the
        // whole 96 MiB read back once, on the newest release: reading it is the slow part).
        let info = python(PY_INFO, &[&nats.url(), bucket, object, file.to_str().unwrap()]);
        assert_eq!(info, "same size and digest", "{release}");
        if release == RELEASES[RELEASES.len() - 1] {
            let got = python(PY_GET, &[&nats.url(), bucket, object]);
            assert!(got.starts_with(&file_sha), "{release}: {got}");
        }
        assert_eq!(pg.psql(&name, "SELECT count(*) FROM node_mgmt_packageversion"), "1");
    }
}
