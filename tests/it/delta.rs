//! Issue 17: delta bundles (`pack --base`), installed on a site installed from the base with the
//! rest taken from the real engine; refused on a site that lost a part; `merge` back into a full
//! bundle; and the load of any bundle streaming only the layers the engine lacks.
//!
//! Each test builds images of its own (a unique layer on the demo base, and a version 2 with one
//! more layer on top), so removing them disturbs no other test; they are removed at the end.

use crate::harness::{ensure_demo_images, OwnImages};
use crate::install::{compose_with, image_id, pack_stack_with, unique_image, Project};
use crate::pack::{bk, run, Run};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const WEB: &str = "bkbundle-demo/web:1";

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", r.stdout, r.stderr))
}

/// `FROM base` plus one layer of fresh random bytes (`size` of them), tagged `name`.
fn image_on(dir: &Path, base: &str, name: &str, size: usize) {
    let ctx = dir.join(format!("ctx-{}", name.replace(['/', ':'], "-")));
    fs::create_dir_all(&ctx).unwrap();
    let mut data = vec![0u8; size];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i as u32)
            .wrapping_mul(2654435761)
            .wrapping_add(rand_seed())
            .to_le_bytes()[1];
    }
    fs::write(ctx.join("payload"), data).unwrap();
    fs::write(ctx.join("Dockerfile"), format!("FROM {base}\nCOPY payload /payload2\n")).unwrap();
    let r = run(Command::new("docker")
        .args(["build", "-q", "-t", name, ctx.to_str().unwrap()])
        .env("DOCKER_BUILDKIT", "0"));
    assert_eq!(r.code, 0, "docker build {name}: {}", r.stderr);
}

fn rand_seed() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

fn rmi(reference: &str) {
    let r = run(Command::new("docker").args(["rmi", reference]));
    assert_eq!(r.code, 0, "docker rmi {reference}: {}", r.stderr);
}

fn entries(bundle: &Path) -> Vec<String> {
    let r = run(Command::new("tar").args(["-tf", arg(bundle)]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout.lines().map(str::to_string).collect()
}

fn manifest(bundle: &Path) -> toml::Value {
    let m = run(Command::new("tar").args(["-xOf", arg(bundle), "bundle.toml"]));
    assert_eq!(m.code, 0, "{}", m.stderr);
    toml::from_str(&m.stdout).unwrap()
}

fn sha256_file(p: &Path) -> String {
    let r = run(Command::new("sha256sum").arg(p));
    r.stdout.split_whitespace().next().unwrap().to_string()
}

/// Version 1 (web + image `a`) and version 2 (web + `a2`: `a` plus one layer), packed; version 2 as
/// a delta of version 1.
struct Versions {
    a: String,
    a2: String,
    a2_id: String,
    old: PathBuf,
    new: PathBuf,
}

fn versions(p: &Project, own: &mut OwnImages, name: &str) -> Versions {
    ensure_demo_images();
    let a = unique_image(p.dir.path());
    own.0.push(a.clone());
    let a2 = a.replace(":1", ":2");
    image_on(p.dir.path(), &a, &a2, 3 << 20);
    own.0.push(a2.clone());
    let a2_id = image_id(&a2).unwrap();
    let old = pack_stack_with(
        p.dir.path(),
        name,
        "1",
        &[WEB, &a],
        &compose_with(&format!("  u:\n    image: {a}\n")),
        &[],
    );
    let new = pack_stack_with(
        p.dir.path(),
        name,
        "2",
        &[WEB, &a2],
        &compose_with(&format!("  u:\n    image: {a2}\n")),
        &["--base", arg(&old)],
    );
    Versions { a, a2, a2_id, old, new }
}

#[test]
fn a_delta_stores_only_what_changed_verifies_alone_and_says_what_it_needs() {
    let mut own = OwnImages(vec![]);
    let p = Project::new();
    let v = versions(&p, &mut own, "dstore");

    // Stored: a2's one new layer and its config, the stack; not the web image, not a's layers,
    // not the bkbundle binary (the same program packed both).
    let listed = entries(&v.new);
    let layers: Vec<&String> = listed.iter().filter(|e| e.starts_with("images/layers/")).collect();
    assert_eq!(layers.len(), 1, "{listed:?}");
    assert_eq!(
        listed.iter().filter(|e| e.starts_with("images/configs/")).count(),
        1,
        "{listed:?}"
    );
    assert!(!listed.iter().any(|e| e == "bin/bkbundle"), "{listed:?}");
    assert!(listed.iter().any(|e| e == "stack/docker-compose.yml"), "{listed:?}");

    let m = manifest(&v.new);
    let base = &m["base"];
    assert_eq!(
        base["id"].as_str().unwrap(),
        sha256_file_of_member(&v.old, "bundle.toml")
    );
    assert_eq!(base["version"].as_str(), Some("1"));
    let left: Vec<&str> = base["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(left.contains(&"bin/bkbundle"), "{left:?}");
    // Every image and layer is still described: a2's layers are a's and one more.
    let images = m["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let a2_layers = images
        .iter()
        .find(|i| i["id"].as_str() == Some(v.a2_id.as_str()))
        .unwrap()["layers"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(m["layers"].as_array().unwrap().len(), a2_layers + web_only_layers(&m));

    // verify checks the delta alone, and says so.
    let r = bk(&["verify", arg(&v.new)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("a delta of bundle dstore 1"), "{}", r.stdout);
    // inspect: what it needs from the base and what that saves.
    let r = bk(&["inspect", arg(&v.new)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("delta    of bundle dstore 1"), "{}", r.stdout);
    assert!(r.stdout.contains("1 unchanged image(s)"), "{}", r.stdout);
    let d = json(&bk(&["inspect", arg(&v.new), "--json"]));
    let delta = &d["delta"];
    assert_eq!(delta["unchanged_images"], serde_json::json!([WEB]));
    assert_eq!(delta["binary"], true);
    assert_eq!(
        delta["layers"].as_u64().unwrap() as usize,
        a2_layers - 1 + web_only_layers(&m)
    );
    let saved = delta["bytes_from_base"].as_u64().unwrap();
    let stored = delta["bytes_stored"].as_u64().unwrap();
    assert!(saved > stored, "saved {saved}, stored {stored}");
    assert!(fs::metadata(&v.old).unwrap().len() > fs::metadata(&v.new).unwrap().len() * 2);

    // --base-manifest (the old bundle.toml alone) makes the same delta.
    let bm = p.path("old-bundle.toml");
    fs::write(
        &bm,
        run(Command::new("tar").args(["-xOf", arg(&v.old), "bundle.toml"])).stdout,
    )
    .unwrap();
    let again = p.path("again.bkb");
    let recipe = p.path("recipe-2.toml");
    let r = bk(&["pack", arg(&recipe), "-o", arg(&again), "--base-manifest", arg(&bm)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m2 = manifest(&again);
    assert_eq!(m2["base"]["id"], m["base"]["id"]);
    assert_eq!(m2["base"]["files"], m["base"]["files"]);
    assert_eq!(m2["images"], m["images"]);
    let _ = (&v.a, &v.a2);
}

/// The layers of the web image that a's image does not share (the demo base is shared).
fn web_only_layers(m: &toml::Value) -> usize {
    let images = m["images"].as_array().unwrap();
    let web = images.iter().find(|i| i["refs"][0].as_str() == Some(WEB)).unwrap();
    let other = images.iter().find(|i| i["refs"][0].as_str() != Some(WEB)).unwrap();
    let theirs: Vec<&toml::Value> = other["layers"].as_array().unwrap().iter().collect();
    web["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| !theirs.contains(l))
        .count()
}

fn sha256_file_of_member(bundle: &Path, member: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let r = run(Command::new("tar").args(["-xf", arg(bundle), "-C", dir.path().to_str().unwrap(), member]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    sha256_file(&dir.path().join(member))
}

#[test]
fn a_delta_installs_on_the_base_site_streaming_only_the_new_layer_and_merges_into_a_full_bundle() {
    let mut own = OwnImages(vec![]);
    let p = Project::new();
    let v = versions(&p, &mut own, "dinst");
    let cfg = p.config(120, "");

    // The site runs version 1.
    let r = p.install(&v.old, &cfg, &["--json"]);
    assert_eq!(r.code, 0, "install v1: {}", r.stderr);

    // a2 is not in the engine (a, its parent, is): the delta loads it, streaming its one new
    // layer, and takes the rest from the engine.
    rmi(&v.a2);
    let r = p.install(&v.new, &cfg, &["--json", "--no-backup"]);
    assert_eq!(r.code, 0, "install the delta: {}", r.stderr);
    let rep = json(&r);
    let images = rep["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "images")
        .unwrap_or_else(|| panic!("no images step: {rep}"));
    let detail = images["detail"].as_str().unwrap();
    assert!(detail.starts_with("1 loaded ("), "{detail}");
    assert!(detail.contains("already in the engine"), "{detail}");
    assert_eq!(image_id(&v.a2).as_deref(), Some(v.a2_id.as_str()));
    let planned = rep["plan"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"].as_str() == Some(v.a2_id.as_str()))
        .unwrap()
        .clone();
    let streamed = planned["stream"].as_u64().unwrap();
    assert!(
        (3 << 20..(3 << 20) + (1 << 20)).contains(&streamed),
        "streamed {streamed} bytes, the new layer is 3 MiB: {planned}"
    );

    // merge OLD NEW makes a full bundle: verified whole, no [base], every layer stored, and the
    // same images as the delta describes.
    let full = p.path("full.bkb");
    let r = bk(&["merge", arg(&v.old), arg(&v.new), "-o", arg(&full)]);
    assert_eq!(r.code, 0, "merge: {}", r.stderr);
    assert!(r.stdout.contains("from the base"), "{}", r.stdout);
    let r = bk(&["verify", arg(&full)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stdout.contains("a delta of"), "{}", r.stdout);
    let mf = manifest(&full);
    assert!(mf.get("base").is_none(), "{mf}");
    assert_eq!(mf["images"], manifest(&v.new)["images"]);
    let listed = entries(&full);
    assert_eq!(
        listed.iter().filter(|e| e.starts_with("images/layers/")).count(),
        mf["layers"].as_array().unwrap().len()
    );
    assert!(listed.iter().any(|e| e == "bin/bkbundle"), "{listed:?}");

    // The site loses a2 and its parent a (stack stopped, images pruned): the delta is refused
    // before anything changes, naming the layer, the image and the base bundle to bring.
    let ids = run(Command::new("docker").args([
        "ps",
        "-aq",
        "--filter",
        &format!("label=com.docker.compose.project={}", p.name),
    ]));
    for id in ids.stdout.split_whitespace() {
        let _ = run(Command::new("docker").args(["rm", "-f", id]));
    }
    rmi(&v.a2);
    rmi(&v.a);
    let before = fs::read(p.target().join("docker-compose.yml")).unwrap();
    let r = p.install(&v.new, &cfg, &["--no-backup"]);
    assert_eq!(r.code, 8, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("this delta bundle needs what its base bundle dinst 1"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains(&format!("of image {}", v.a2)), "{}", r.stderr);
    assert!(r.stderr.contains("bkbundle merge BASE.bkb THIS.bkb"), "{}", r.stderr);
    assert_eq!(fs::read(p.target().join("docker-compose.yml")).unwrap(), before);
    assert!(image_id(&v.a2).is_none());

    // The full bundle installs where the delta cannot.
    let r = p.install(&full, &cfg, &["--json", "--no-backup"]);
    assert_eq!(r.code, 0, "install the merged bundle: {}", r.stderr);
    assert_eq!(image_id(&v.a2).as_deref(), Some(v.a2_id.as_str()));
}

#[test]
fn merge_refuses_a_base_that_is_not_the_one_recorded_and_a_full_bundle() {
    let mut own = OwnImages(vec![]);
    let p = Project::new();
    let v = versions(&p, &mut own, "dmerge");
    let out = p.path("x.bkb");
    // NEW's base is OLD, not NEW.
    let r = bk(&["merge", arg(&v.new), arg(&v.new), "-o", arg(&out)]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("is a delta of bundle dmerge 1 (id"), "{}", r.stderr);
    assert!(r.stderr.contains("give the bundle dmerge 1"), "{}", r.stderr);
    // A full bundle has nothing to merge.
    let r = bk(&["merge", arg(&v.old), arg(&v.old), "-o", arg(&out)]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("is a full bundle"), "{}", r.stderr);
    assert!(!out.exists());
    // A delta cannot be pushed.
    let r = bk(&["push", arg(&v.new), "--registry", "registry.invalid:5000"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("this is a delta bundle"), "{}", r.stderr);
}

/// The packages of a delta: left to the base when unchanged, taken from the object store by digest
/// (nothing read, nothing sent), refused naming each object when the store lacks them.
#[test]
fn a_deltas_packages_come_from_the_object_store_or_the_run_is_refused_naming_them() {
    use crate::harness::{NatsOpts, NatsServer, RELEASES};
    use bkbundle::packages::{self, PackagesError, PackagesOptions};
    use bkbundle::site::config::InstallConfig;
    let base = crate::packages::bundle();
    let dir = tempfile::tempdir().unwrap();
    let recipe = fs::read_to_string(base.parent().unwrap().join("recipe.toml"))
        .unwrap()
        .replace("name = \"p\"\nversion = \"1\"", "name = \"p\"\nversion = \"2\"");
    assert!(recipe.contains("version = \"2\""), "{recipe}");
    let rp = dir.path().join("recipe.toml");
    fs::write(&rp, recipe).unwrap();
    let delta = dir.path().join("p2.bkb");
    let r = bk(&["pack", arg(&rp), "-o", arg(&delta), "--base", arg(base)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = manifest(&delta);
    let left: Vec<&str> = m["base"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(left.contains(&"packages/fusion-collectors-linux-amd64.zip"), "{left:?}");
    assert!(!entries(&delta).iter().any(|e| e.starts_with("packages/")));

    let release = RELEASES[RELEASES.len() - 1];
    let nats = NatsServer::start(NatsOpts::default());
    let (_, db) = crate::regions::release_db(release, "delta", false);
    let config = InstallConfig::parse("", "install.toml").unwrap();
    let opts = |bundle: &Path| {
        let mut o = PackagesOptions::new(bundle.to_path_buf(), &config, std::collections::BTreeMap::new());
        o.database_url = Some(db.clone());
        o.nats_url = Some(nats.url());
        o
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let no_env = |_: &str| None;
    // An empty store: refused, every object named with the base to bring; nothing written.
    let e = match rt.block_on(packages::run_with_env(&opts(&delta), &no_env)) {
        Err(PackagesError::Bundle(e)) => e,
        other => panic!(
            "expected the delta to be refused: {:?}",
            other.map(|r| packages::render(&r))
        ),
    };
    assert_eq!(e.kind, bkbundle::error::Kind::Preflight, "{}", e.message);
    assert!(
        e.message.contains("this delta bundle needs what its base bundle p 1"),
        "{}",
        e.message
    );
    assert!(
        e.message
            .contains("fusion-collectors-linux-amd64.zip (Controller 1.0.0)")
            && e.message
                .contains("leaves its file packages/fusion-collectors-linux-amd64.zip to its base"),
        "{}",
        e.message
    );
    assert!(e.message.contains("(Telegraf 1.0.0)"), "{}", e.message);
    // The base uploads; then the delta finds every object in place and reads no package.
    let r = rt.block_on(packages::run_with_env(&opts(base), &no_env)).unwrap();
    assert_eq!(r.uploaded, 4, "{}", packages::render(&r));
    let r = rt.block_on(packages::run_with_env(&opts(&delta), &no_env)).unwrap();
    assert_eq!((r.uploaded, r.skipped), (0, 4), "{}", packages::render(&r));
}

/// A delta of a delta: what the middle bundle left to its own base stays left to it through a
/// merge with the middle one, and a second merge with the first makes the whole bundle.
#[test]
fn a_chain_of_deltas_merges_step_by_step_into_a_full_bundle() {
    let mut own = OwnImages(vec![]);
    let p = Project::new();
    let v = versions(&p, &mut own, "dchain");
    // Version 3: the same images as version 2, another stack.
    let v3 = pack_stack_with(
        p.dir.path(),
        "dchain",
        "3",
        &[WEB, &v.a2],
        &compose_with(&format!("  u:\n    image: {}\n    restart: always\n", v.a2)),
        &["--base", arg(&v.new)],
    );
    let m3 = manifest(&v3);
    assert_eq!(m3["base"]["version"].as_str(), Some("2"));
    // Nothing but the stack is stored: every image payload is v2's, stored there or left by v2 to v1.
    assert!(
        entries(&v3).iter().all(|e| e.starts_with("stack/") || !e.contains('/')),
        "{:?}",
        entries(&v3)
    );
    let mid = p.path("mid.bkb");
    let r = bk(&["merge", arg(&v.new), arg(&v3), "-o", arg(&mid)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("still a delta"), "{}", r.stdout);
    let mm = manifest(&mid);
    assert_eq!(mm["base"]["version"].as_str(), Some("1"));
    assert_eq!(mm["base"]["id"], manifest(&v.new)["base"]["id"]);
    assert_eq!(bk(&["verify", arg(&mid)]).code, 0);
    let full = p.path("full3.bkb");
    let r = bk(&["merge", arg(&v.old), arg(&mid), "-o", arg(&full)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = bk(&["verify", arg(&full)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mf = manifest(&full);
    assert!(mf.get("base").is_none());
    assert_eq!(mf["images"], m3["images"]);
    assert_eq!(mf["stack"], m3["stack"]);
    // A damaged base is caught as its bytes are copied (the digest recorded by the delta).
    let bad = p.path("bad-base.bkb");
    fs::copy(&v.old, &bad).unwrap();
    let layer = manifest(&v.old)["layers"][0]["file"].as_str().unwrap().to_string();
    let offset = member_offset(&bad, &layer) + 100;
    crate::pack::xor_byte(&bad, offset, 0xff);
    let r = bk(&["merge", arg(&bad), arg(&mid), "-o", arg(&p.path("x.bkb"))]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stderr.contains(&layer), "{}", r.stderr);
    assert!(!p.path("x.bkb").exists());
}

/// The byte offset of `member`'s data in an uncompressed tar.
fn member_offset(tar: &Path, member: &str) -> u64 {
    let f = fs::File::open(tar).unwrap();
    let mut a = ::tar::Archive::new(f);
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        if e.path().unwrap().to_str() == Some(member) {
            return e.raw_file_position();
        }
    }
    panic!("{member} is not in {}", tar.display());
}
