//! Issue 15: the shape of every command's `--json`, snapshotted in `tests/snapshots/NAME.schema`
//! (one `path: type` line each, see `bkbundle::schema`), so that a change of format shows in
//! review as a changed line. `BKBUNDLE_BLESS=1` writes the snapshots anew.
//!
//! The runs are the real binary on the demo bundle the other tests share (packed once per test
//! process); only `pack --json` packs again, into a directory of its own. `init-packages` runs
//! on the packages tests' bundle, one release's tables and a throwaway NATS.

use crate::harness::{ensure_demo_images, repo_root, NatsOpts, NatsServer};
use crate::install::Project;
use crate::pack::{bk, demo_bundle, Run};
use crate::packages::{bundle as packages_bundle, init_packages};
use crate::regions::release_db;
use std::fs;
use std::path::Path;

/// Compare the schema of `r`'s stdout with `tests/snapshots/{name}.schema` (or write it, blessed).
pub(crate) fn assert_schema(name: &str, r: &Run) {
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| {
        panic!(
            "{name}: stdout is not JSON ({e}):\n{}\n--- stderr ---\n{}",
            r.stdout, r.stderr
        )
    });
    let path = repo_root().join("tests/snapshots").join(format!("{name}.schema"));
    if let Err(e) = bkbundle::schema::compare_snapshot(&path, &bkbundle::schema::schema_lines(&v)) {
        panic!("the schema of `{name} --json`: {e}");
    }
}

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn pack_verify_and_inspect() {
    ensure_demo_images();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo.bkb");
    let recipe = repo_root().join("examples/demo/recipe.toml");
    let r = bk(&["pack", arg(&recipe), "-o", arg(&out), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_schema("pack", &r);

    let r = bk(&["verify", arg(demo_bundle()), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_schema("verify", &r);

    let r = bk(&["inspect", arg(demo_bundle()), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_schema("inspect", &r);

    // A delta of the demo (nothing changed: every image and package left to the base), what
    // inspect says of it, and the merge back.
    let delta = dir.path().join("delta.bkb");
    let r = bk(&[
        "pack",
        arg(&recipe),
        "-o",
        arg(&delta),
        "--base",
        arg(demo_bundle()),
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = bk(&["inspect", arg(&delta), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_schema("inspect-delta", &r);
    let full = dir.path().join("full.bkb");
    let r = bk(&["merge", arg(demo_bundle()), arg(&delta), "-o", arg(&full), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_schema("merge", &r);
}

#[test]
fn install_dry_run_on_a_fresh_target() {
    ensure_demo_images();
    let p = Project::new();
    let cfg = p.config(60, "HOST_IP = \"192.0.2.10\"\nSERVER_URL = \"http://192.0.2.10:18080\"");
    let r = p.install(demo_bundle(), &cfg, &["--dry-run", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!p.target().exists(), "a dry run creates nothing");
    assert_schema("install-dry-run", &r);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let nats_port = fs::read_to_string(&cfg)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("NATS_PORT = ").map(|v| v.trim_matches('"').to_string()))
        .unwrap();
    assert_snapshot(
        "demo-plan.txt",
        &plan_text(&v["plan"]).replace(&nats_port, "<NATS_PORT>"),
    );
}

/// The demo's plan, one line per thing it would do, without what differs between machines and
/// runs (image ids and sizes, the target's path, object digests, free ports).
fn plan_text(plan: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let each = |key: &str| plan[key].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for i in each("images") {
        let refs: Vec<String> = i["refs"].as_array().unwrap().iter().map(s).collect();
        out.push(format!("image  {} {}", s(&i["action"]), refs.join(", ")));
    }
    for f in each("files") {
        out.push(format!("file   {} {}", s(&f["action"]), s(&f["path"])));
    }
    for k in each("env_generated") {
        out.push(format!("secret generated {}", s(&k)));
    }
    let platform = &plan["platform"];
    out.push(format!(
        "platform {} assumed={}",
        s(&platform["release"]),
        platform["assumed"]
    ));
    for r in platform["rows"].as_array().unwrap() {
        let value = r["value"]
            .as_str()
            .map(|v| format!("= {v}"))
            .unwrap_or_else(|| "(secret)".into());
        out.push(format!(
            "row    {} {}/{} {} {value}",
            s(&r["action"]),
            s(&r["region"]),
            s(&r["key"]),
            s(&r["env_type"])
        ));
    }
    for sv in platform["services"].as_array().unwrap() {
        out.push(format!("service create {}", s(sv)));
    }
    for o in platform["packages"].as_array().unwrap() {
        let row = &o["row"];
        out.push(format!(
            "object {} {}/{}{} row {} {}/{} {} {} {}",
            s(&o["action"]),
            s(&platform["bucket"]),
            s(&o["key"]),
            if o["ca_added"] == true { " +ca" } else { "" },
            s(&row["type"]),
            s(&row["os"]),
            s(&row["arch"]),
            s(&row["object"]),
            s(&row["version"]),
            s(&row["name"])
        ));
    }
    for o in platform["installers"].as_array().unwrap() {
        out.push(format!(
            "object {} {}/{} (installer, no row)",
            s(&o["action"]),
            s(&platform["bucket"]),
            s(&o["key"])
        ));
    }
    if let Some(t) = plan.get("tls").filter(|t| !t.is_null()) {
        out.push(format!(
            "tls    {} names {}",
            s(&t["action"]),
            t["names"]
                .as_array()
                .unwrap()
                .iter()
                .map(s)
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    for st in each("steps_to_run") {
        out.push(format!("step   {}", s(&st)));
    }
    out.join("\n") + "\n"
}

/// Compare `got` with `tests/snapshots/{name}` (or write it, blessed).
fn assert_snapshot(name: &str, got: &str) {
    let path = repo_root().join("tests/snapshots").join(name);
    if let Err(e) = bkbundle::schema::compare_snapshot(&path, got) {
        panic!("{e}");
    }
}

#[test]
fn regions_check_without_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("install.toml");
    fs::write(
        &config,
        "format = 1\n[env]\nHOST_IP = \"10.0.0.5\"\nSERVER_URL = \"https://10.0.0.5:443\"\nNATS_PORT = \"4222\"\n\
         NATS_USER = \"bklite\"\nNATS_PASSWORD = \"example-password\"\nSECRET_KEY = \"example-secret-key\"\n\
         [[regions]]\nname = \"east\"\nproxy_address = \"10.1.0.9\"\n",
    )
    .unwrap();
    let r = bk(&[
        "regions",
        "check",
        "--bundle",
        arg(demo_bundle()),
        "--config",
        arg(&config),
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_schema("regions-check", &r);
}

/// On the newest release's tables and an empty NATS: every package would be sent.
#[test]
fn init_packages_dry_run() {
    let nats = NatsServer::start(NatsOpts::default());
    let (_, db) = release_db("0044", "schema", false);
    let args = [
        "--json",
        "init-packages",
        "--auto",
        "--dry-run",
        "--bundle",
        arg(packages_bundle()),
    ];
    let o = init_packages(&args, &db, &nats.url());
    let r = Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_schema("init-packages-dry-run", &r);
}

/// An error's object, with several problems at once (`Error::all`): two package files of the
/// recipe are missing. No image is packed, so this needs no engine.
#[test]
fn an_error_lists_its_problems() {
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("stack");
    fs::create_dir_all(&stack).unwrap();
    fs::write(stack.join("docker-compose.yml"), "services: {}\n").unwrap();
    let package = |name: &str| {
        format!(
            "[[packages]]\nfile = \"{}\"\ntype = \"collector\"\nos = \"linux\"\narch = \"amd64\"\nobject = \"{name}\"\nversion = \"1\"\n",
            dir.path().join(format!("{name}.tar.gz")).display()
        )
    };
    let recipe = dir.path().join("recipe.toml");
    fs::write(
        &recipe,
        format!(
            "format = 1\n[bundle]\nname = \"t\"\nversion = \"1\"\n{}{}[stack]\ndir = \"{}\"\ncompose = \"docker-compose.yml\"\n",
            package("Telegraf"),
            package("Vector"),
            stack.display()
        ),
    )
    .unwrap();
    let out = dir.path().join("t.bkb");
    let r = bk(&["pack", arg(&recipe), "-o", arg(&out), "--json"]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let problems = v["error"]["problems"].as_array().expect("problems is a list");
    assert_eq!(problems.len(), 2, "{}", r.stdout);
    assert!(
        problems
            .iter()
            .all(|p| p.as_str().is_some_and(|p| r.stderr.contains(p))),
        "every problem is also in the text:\n{}\n{}",
        r.stdout,
        r.stderr
    );
    assert_schema("error", &r);
}

/// doctor's report with no link reachable (closed loopback ports): the findings' shape, `fix`
/// both given and absent, no release.
#[test]
fn doctor_with_nothing_reachable() {
    let r = bk(&[
        "doctor",
        "--project",
        "bkbundle-schema-none",
        "--database-url",
        "postgres://bklite:pw@127.0.0.1:1/bklite",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--json",
    ]);
    assert_eq!(r.code, 10, "{}\n{}", r.stdout, r.stderr);
    assert_schema("doctor", &r);
}
