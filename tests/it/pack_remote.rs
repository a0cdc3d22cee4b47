//! Issue 17: pack without the engine's export. Images fetched by digest from a real registry
//! (Debian's docker-registry on loopback, filled by skopeo independently of bkbundle) and read
//! from OCI layout directories (`skopeo copy docker-daemon:... oci:DIR:TAG`), then verified and
//! installed, the engine's image ids checked against the source's; per-layer dedup counted in the
//! registry's own access log; damaged blobs (in the registry's storage and in a layout), a pinned
//! digest that does not match and an unreachable registry refused, naming the image.

use crate::harness::{ensure_demo_images, free_port, OwnImages, Registry};
use crate::install::{compose_with, image_id, unique_image, Project};
use crate::pack::{bk, fc_image, image_artifacts, json, leftovers, recipe, run, sh, sha256sum, xor_byte, Run};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const WEB: &str = "bkbundle-demo/web:1";
const APP: &str = "bkbundle-demo/app:1";

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An image of the test's own (`u`, a unique layer on the demo base), copied by skopeo into a
/// fresh loopback registry and into an OCI layout (`layout`, tag `1`) in the test's directory.
struct Sources {
    own: OwnImages,
    reg: Registry,
    d: tempfile::TempDir,
    u: String,
    layout: std::path::PathBuf,
}

fn sources() -> Sources {
    let reg = Registry::plain();
    let d = tempfile::tempdir().unwrap();
    let u = unique_image(d.path());
    let own = OwnImages(vec![u.clone()]);
    reg.skopeo_copy_from_daemon(&u, &u);
    let layout = d.path().join("layout");
    oci_layout(&u, &layout, "1");
    Sources { own, reg, d, u, layout }
}

/// `skopeo copy docker-daemon:IMAGE oci:DIR:TAG`: an OCI layout made offline from the engine.
fn oci_layout(image: &str, dir: &Path, tag: &str) {
    sh(&format!(
        "skopeo copy --quiet docker-daemon:{image} oci:{}:{tag}",
        dir.display()
    ));
}

/// The parsed manifest (and its config digest) the layout's index names for `tag`.
fn layout_manifest(dir: &Path, tag: &str) -> serde_json::Value {
    let idx: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let entry = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in {idx}"))
        .clone();
    let digest = entry["digest"].as_str().unwrap();
    serde_json::from_slice(&fs::read(blob(dir, digest)).unwrap()).unwrap()
}

/// A blob's file in an OCI layout.
fn blob(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

/// A blob's file in the registry's storage.
fn registry_blob(reg: &Registry, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    reg.storage_dir()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

/// The registry's manifest of `reference`, parsed.
fn registry_manifest(reg: &Registry, reference: &str) -> serde_json::Value {
    serde_json::from_str(&reg.skopeo_manifest(reference).unwrap()).unwrap()
}

/// A stack recipe in `dir`: the demo web service from the engine (`engine = true`), and the
/// image `u` as `u_entry` says (service `u`), with `head` (e.g. a `[registry]` section) first.
fn stack_recipe(dir: &Path, version: &str, head: &str, u: &str, u_entry: &str) -> PathBuf {
    let stack = dir.join(format!("stack-{version}"));
    fs::create_dir_all(&stack).unwrap();
    fs::write(
        stack.join("docker-compose.yml"),
        compose_with(&format!("  u:\n    image: {u}\n")),
    )
    .unwrap();
    fs::write(
        stack.join("env.template"),
        "WEB_PORT=18080\nPOSTGRES_PORT=15432\nNATS_PORT=14222\nSECRET=__GENERATE__\n",
    )
    .unwrap();
    let text = format!(
        "format = 1\n[bundle]\nname = \"r{version}\"\nversion = \"{version}\"\n{head}\n[[images]]\nref = \"{WEB}\"\nengine = true\n[[images]]\nref = \"{u}\"\n{u_entry}\n[stack]\ndir = \"{}\"\ncompose = \"docker-compose.yml\"\nenv_template = \"env.template\"\n",
        stack.display()
    );
    let p = dir.join(format!("recipe-{version}.toml"));
    fs::write(&p, text).unwrap();
    p
}

fn rmi(image: &str) {
    let r = run(Command::new("docker").args(["rmi", image]));
    assert_eq!(r.code, 0, "docker rmi {image}: {}", r.stderr);
    assert!(image_id(image).is_none(), "{image} is still in the engine");
}

#[test]
fn images_from_a_registry_and_an_oci_layout_install_with_the_sources_ids() {
    ensure_demo_images();
    let Sources {
        own: _own,
        reg,
        d,
        u,
        layout,
    } = sources();
    let reg_id = reg.image_id(&u).expect("the registry has the image");
    let layout_id = layout_manifest(&layout, "1")["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    // The engine no longer has it: whatever install loads came through the bundle from the source.
    rmi(&u);

    // From the registry (pinned to the digest it has; web from the engine although a mirror is
    // named). The bundle is zstd (web's layers, from the engine) with the registry's gzip layer
    // stored as it is: install decompresses each layer as its file's name says.
    let raw = d.path().join("manifest.json");
    fs::write(&raw, reg.skopeo_manifest(&u).unwrap()).unwrap();
    let manifest_digest = format!("sha256:{}", sha256sum(&raw));
    let head = format!("[registry]\nmirror = \"{}\"\n", reg.host());
    let r = stack_recipe(d.path(), "1", &head, &u, &format!("digest = \"{manifest_digest}\""));
    let out = d.path().join("reg.bkb");
    let v = bk(&["--json", "pack", arg(&r), "-o", arg(&out), "--registry-insecure"]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    let j = json(&v);
    assert_eq!(
        j["layers_fetched"], 1,
        "only u's own layer: the base is the engine's web's: {j}"
    );
    assert_eq!(j["layers_skipped"], 1, "{j}");
    assert_eq!(bk(&["verify", arg(&out)]).code, 0);
    let p = Project::new();
    let i = p.install(&out, &p.config(60, ""), &[]);
    assert_eq!(i.code, 0, "{}\n{}", i.stdout, i.stderr);
    assert_eq!(
        image_id(&u).as_deref(),
        Some(reg_id.as_str()),
        "the registry's image id"
    );
    drop(p);
    rmi(&u);

    // From the OCI layout (skopeo writes its layers gzip-compressed: stored as they are).
    let r = stack_recipe(d.path(), "2", "", &u, &format!("oci_layout = \"{}\"", layout.display()));
    let out = d.path().join("oci.bkb");
    let v = bk(&["pack", arg(&r), "-o", arg(&out)]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert_eq!(bk(&["verify", arg(&out)]).code, 0);
    let p = Project::new();
    let i = p.install(&out, &p.config(60, ""), &[]);
    assert_eq!(i.code, 0, "{}\n{}", i.stdout, i.stderr);
    assert_eq!(
        image_id(&u).as_deref(),
        Some(layout_id.as_str()),
        "the layout's image id"
    );
}

/// Occurrences of a bkbundle GET of blob `digest` (in any repository) in the registry's log.
fn blob_gets(reg: &Registry, digest: &str) -> usize {
    reg.log()
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} ")) && l.contains("bkbundle/"))
        .count()
}

#[test]
fn a_layer_shared_by_two_images_is_fetched_once_and_stored_once() {
    ensure_demo_images();
    let reg = Registry::plain();
    reg.skopeo_copy_from_daemon(APP, APP);
    reg.skopeo_copy_from_daemon(WEB, WEB);
    let app = registry_manifest(&reg, APP);
    let web = registry_manifest(&reg, WEB);
    let base = app["layers"][0]["digest"].as_str().unwrap().to_string();
    assert_eq!(web["layers"][0]["digest"], base.as_str(), "both on the demo base");

    let d = tempfile::tempdir().unwrap();
    let images = format!(
        "[registry]\nmirror = \"{}\"\n[[images]]\nref = \"{APP}\"\n[[images]]\nref = \"{WEB}\"\n",
        reg.host()
    );
    let r = recipe(d.path(), &images, "");
    let out = d.path().join("a.bkb");
    let v = bk(&["--json", "pack", arg(&r), "-o", arg(&out), "--registry-insecure"]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    let j = json(&v);
    assert_eq!(
        (j["layers_fetched"].as_u64(), j["layers_skipped"].as_u64()),
        (Some(3), Some(1)),
        "{j}"
    );
    assert_eq!(
        blob_gets(&reg, &base),
        1,
        "the shared blob is requested once:\n{}",
        reg.log()
    );
    let own = web["layers"][1]["digest"].as_str().unwrap();
    assert_eq!(blob_gets(&reg, own), 1);

    // One file per distinct layer, stored as the registry holds it (gzip) in a zstd bundle.
    let listing = run(Command::new("tar").args(["-tf", arg(&out)])).stdout;
    let layers: Vec<&str> = listing.lines().filter(|l| l.starts_with("images/layers/")).collect();
    assert_eq!(layers.len(), 3, "{listing}");
    assert!(layers.iter().all(|l| l.ends_with(".tar.gz")), "{listing}");
    let x = d.path().join("x");
    fs::create_dir(&x).unwrap();
    sh(&format!("tar -xf {} -C {}", out.display(), x.display()));
    // The stored file is the registry's blob, byte for byte.
    let stored = layers
        .iter()
        .find(|l| sha256sum(&x.join(l)) == base.trim_start_matches("sha256:"))
        .is_some();
    assert!(stored, "the base layer is the registry's blob as it was");
    assert_eq!(bk(&["verify", arg(&out)]).code, 0);
    let i = json(&bk(&["--json", "inspect", arg(&out)]));
    assert_eq!(i["images"][0]["id"], app["config"]["digest"], "{i}");

    // --recompress gives every layer the bundle's compression.
    let out2 = d.path().join("b.bkb");
    let v = bk(&["pack", arg(&r), "-o", arg(&out2), "--registry-insecure", "--recompress"]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    let listing = run(Command::new("tar").args(["-tf", arg(&out2)])).stdout;
    let zst = listing
        .lines()
        .filter(|l| l.starts_with("images/layers/") && l.ends_with(".tar.zst"))
        .count();
    assert_eq!(zst, 3, "{listing}");
    assert_eq!(bk(&["verify", arg(&out2)]).code, 0);
}

/// The pack `r` fails with `code`, names every `needle`, and leaves nothing but the recipe's files.
fn refused(d: &Path, r: &Path, extra: &[&str], code: i32, needles: &[&str]) -> Run {
    let out = d.join("out.bkb");
    let mut args = vec!["pack", arg(r), "-o", arg(&out)];
    args.extend_from_slice(extra);
    let v = bk(&args);
    assert_eq!(v.code, code, "{}", v.stderr);
    for n in needles {
        assert!(v.stderr.contains(n), "{n}:\n{}", v.stderr);
    }
    assert!(!out.exists());
    assert!(
        leftovers(d).iter().all(|f| !f.contains("out.bkb")),
        "{:?}",
        leftovers(d)
    );
    v
}

#[test]
fn damaged_blobs_and_a_pinned_digest_that_does_not_match_are_named() {
    ensure_demo_images();
    let Sources {
        own: _own,
        reg,
        d,
        u,
        layout,
    } = sources();
    let mirror = format!("[registry]\nmirror = \"{}\"\n", reg.host());

    // A layer blob altered in the registry's storage (its own top layer: small, gzip).
    let m = registry_manifest(&reg, &u);
    let top = m["layers"][1]["digest"].as_str().unwrap().to_string();
    let f = registry_blob(&reg, &top);
    let len = fs::metadata(&f).unwrap().len();
    xor_byte(&f, len / 2, 0x55);
    let r = recipe(d.path(), &format!("{mirror}[[images]]\nref = \"{u}\"\n"), "");
    refused(
        d.path(),
        &r,
        &["--registry-insecure"],
        6,
        &[
            &format!("image {u}: "),
            &format!("layer {top} is content"),
            &format!("expected content {top}"),
        ],
    );
    xor_byte(&f, len / 2, 0x55);

    // The same in the OCI layout (an uncompressed tar there).
    let lm = layout_manifest(&layout, "1");
    let ltop = lm["layers"][1]["digest"].as_str().unwrap().to_string();
    let lf = blob(&layout, &ltop);
    xor_byte(&lf, 100, 0x55);
    let r = recipe(
        d.path(),
        &format!("[[images]]\nref = \"{u}\"\noci_layout = \"{}\"\n", layout.display()),
        "",
    );
    refused(
        d.path(),
        &r,
        &[],
        3,
        &[
            &format!("image {u}: OCI layout {}", layout.display()),
            &format!("layer {ltop} is content sha256:"),
            &format!("expected content {ltop}"),
        ],
    );
    xor_byte(&lf, 100, 0x55);

    // A config altered: refused before anything is written.
    let cfg = lm["config"]["digest"].as_str().unwrap().to_string();
    let cf = blob(&layout, &cfg);
    let text = fs::read_to_string(&cf).unwrap();
    fs::write(&cf, text.replacen("\"architecture\"", " \"architecture\"", 1)).unwrap();
    refused(
        d.path(),
        &r,
        &[],
        3,
        &[&format!("config {cfg} is sha256:"), &format!("expected {cfg}")],
    );
    fs::write(&cf, text).unwrap();

    // A pinned digest the registry does not have, and one the layout does not have: both named.
    let zero = format!("sha256:{}", "0".repeat(64));
    let r = recipe(
        d.path(),
        &format!(
            "{mirror}[[images]]\nref = \"{u}\"\ndigest = \"{zero}\"\n[[images]]\nref = \"{APP}\"\noci_layout = \"{}\"\ndigest = \"{zero}\"\n",
            layout.display()
        ),
        "",
    );
    let v = refused(
        d.path(),
        &r,
        &["--registry-insecure"],
        3,
        &[
            &format!(
                "{}/{}@{zero} has no such manifest",
                reg.host(),
                u.split(':').next().unwrap()
            ),
            &format!("image {APP}: OCI layout {}", layout.display()),
        ],
    );
    assert!(v.stderr.contains("2 problems"), "{}", v.stderr);
}

#[test]
fn an_unreachable_mirror_is_asked_once_and_every_image_named() {
    let d = tempfile::tempdir().unwrap();
    let port = free_port(); // nothing listens there
    let images = format!(
        "[registry]\nmirror = \"127.0.0.1:{port}/site\"\nlibrary = true\n[[images]]\nref = \"postgres:15\"\n[[images]]\nref = \"bklite/server:latest\"\n"
    );
    let r = recipe(d.path(), &images, "");
    let v = refused(
        d.path(),
        &r,
        &["--registry-insecure"],
        6,
        &[
            "image postgres:15: registry http://127.0.0.1:",
            "cannot connect",
            "image bklite/server:latest: not asked: the registry did not answer for image postgres:15",
        ],
    );
    assert!(v.stderr.contains("2 problems"), "{}", v.stderr);
}

#[test]
fn packages_and_installers_come_from_the_mirror_like_the_images() {
    let (img, _) = fc_image();
    let reg = Registry::plain();
    reg.skopeo_copy_from_daemon(img, img);
    let d = tempfile::tempdir().unwrap();
    // From the engine, for reference; then from the mirror only.
    let from_engine = recipe(d.path(), "", &image_artifacts(img));
    let a = d.path().join("a.bkb");
    assert_eq!(bk(&["pack", arg(&from_engine), "-o", arg(&a)]).code, 0);
    let m = d.path().join("m");
    fs::create_dir(&m).unwrap();
    let images = format!("[registry]\nmirror = \"{}\"\n[[images]]\nref = \"{img}\"\n", reg.host());
    let r = recipe(&m, &images, &image_artifacts(img));
    let b = m.join("b.bkb");
    let v = bk(&["--json", "pack", arg(&r), "-o", arg(&b), "--registry-insecure"]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    let j = json(&v);
    assert_eq!(j["image_reads"][0]["artifacts"], 4, "{j}");
    let manifest = registry_manifest(&reg, img);
    for l in manifest["layers"].as_array().unwrap() {
        // Once to read the artifacts' files, once to store the layer.
        assert_eq!(blob_gets(&reg, l["digest"].as_str().unwrap()), 2, "{}", reg.log());
    }
    assert_eq!(bk(&["verify", arg(&b)]).code, 0);
    let (x, y) = (d.path().join("x"), d.path().join("y"));
    for (dir, bundle) in [(&x, &a), (&y, &b)] {
        fs::create_dir(dir).unwrap();
        sh(&format!("tar -xf {} -C {}", bundle.display(), dir.display()));
    }
    for f in [
        "packages/fusion-collectors-linux-amd64.zip",
        "packages/fusion-collectors-windows-amd64.zip",
        "installers/linux/x86_64/bklite-controller-installer",
    ] {
        assert_eq!(
            sha256sum(&x.join(f)),
            sha256sum(&y.join(f)),
            "{f}: the same bytes from either source"
        );
    }
}

#[test]
fn a_mirror_with_tls_and_a_password_and_upstreams_library_layout() {
    ensure_demo_images();
    // Upstream's mirror layout: a one-word name under PREFIX/library/, others under PREFIX/.
    let reg = Registry::token_auth("alice", "s3cret-pw");
    let (_, password) = reg.credentials.clone().unwrap();
    let d = tempfile::tempdir().unwrap();
    let pw = d.path().join("pw");
    fs::write(&pw, format!("{password}\n")).unwrap();
    let lib = "bkbtestlib:1";
    reg.skopeo_copy_from_daemon(APP, &format!("site/library/{lib}"));
    reg.skopeo_copy_from_daemon(WEB, &format!("site/{WEB}"));
    let images = format!(
        "[registry]\nmirror = \"{}/site\"\nlibrary = true\n[[images]]\nref = \"{lib}\"\n[[images]]\nref = \"{WEB}\"\n",
        reg.host()
    );
    let r = recipe(d.path(), &images, "");
    let ca = reg.ca_pem_path().to_str().unwrap().to_string();
    let out = d.path().join("a.bkb");
    let no_login = d.path().join("no-docker-config");
    // Without credentials: the registry's refusal, named with the image.
    let v = run(crate::harness::bkbundle()
        .args(["pack", arg(&r), "-o", arg(&out), "--registry-ca", &ca])
        .env("DOCKER_CONFIG", &no_login));
    assert_eq!(v.code, 6, "{}", v.stderr);
    assert!(
        v.stderr
            .contains(&format!("image {lib}: registry https://{}", reg.host())),
        "{}",
        v.stderr
    );
    let v = run(crate::harness::bkbundle()
        .args([
            "--json",
            "pack",
            arg(&r),
            "-o",
            arg(&out),
            "--registry-ca",
            &ca,
            "--registry-user",
            "alice",
            "--registry-password-file",
            arg(&pw),
        ])
        .env("DOCKER_CONFIG", &no_login));
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert!(!v.stdout.contains(&password) && !v.stderr.contains(&password));
    assert_eq!(json(&v)["layers_fetched"], 3, "{}", v.stdout);
    let i = json(&bk(&["--json", "inspect", arg(&out)]));
    assert_eq!(i["images"][0]["refs"][0], lib, "the plain reference is kept: {i}");
    assert_eq!(
        i["images"][0]["id"].as_str(),
        reg.image_id(&format!("site/library/{lib}")).as_deref()
    );
    assert_eq!(bk(&["verify", arg(&out)]).code, 0);
}

#[test]
fn a_multi_platform_index_in_an_oci_layout_is_narrowed_to_the_platform() {
    ensure_demo_images();
    let d = tempfile::tempdir().unwrap();
    let layout = d.path().join("layout");
    oci_layout(APP, &layout, "app");
    oci_layout(WEB, &layout, "web");
    // An index of the two: app as linux/amd64, web as linux/arm64/v8 (what `skopeo copy --all`
    // of a multi-platform image writes, with other content).
    let entry = |tag: &str, arch: &str, variant: Option<&str>| {
        let idx: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
        let mut e = idx["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap()
            .clone();
        e.as_object_mut().unwrap().remove("annotations");
        e["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            e["platform"]["variant"] = v.into();
        }
        e
    };
    let multi = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry("app", "amd64", None), entry("web", "arm64", Some("v8"))],
    })
    .to_string();
    let multi_file = d.path().join("multi.json");
    fs::write(&multi_file, &multi).unwrap();
    let digest = format!("sha256:{}", sha256sum(&multi_file));
    fs::write(blob(&layout, &digest), &multi).unwrap();
    let mut idx: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    idx["manifests"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": digest,
        "size": multi.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"},
    }));
    fs::write(layout.join("index.json"), idx.to_string()).unwrap();
    let config_of = |tag: &str| {
        layout_manifest(&layout, tag)["config"]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };

    for (platform, want) in [
        ("", config_of("app")),
        ("platform = \"linux/arm64\"\n", config_of("web")),
    ] {
        let images = format!(
            "[[images]]\nref = \"bkbundle-test/multi:multi\"\noci_layout = \"{}\"\ndigest = \"{digest}\"\n{platform}",
            layout.display()
        );
        let r = recipe(d.path(), &images, "");
        let out = d.path().join("m.bkb");
        let _ = fs::remove_file(&out);
        let v = bk(&["pack", arg(&r), "-o", arg(&out)]);
        assert_eq!(v.code, 0, "{platform}: {}", v.stderr);
        let i = json(&bk(&["--json", "inspect", arg(&out)]));
        assert_eq!(i["images"][0]["id"].as_str(), Some(want.as_str()), "{platform}: {i}");
    }
    let images = format!(
        "[[images]]\nref = \"bkbundle-test/multi:multi\"\noci_layout = \"{}\"\nplatform = \"windows/amd64\"\n",
        layout.display()
    );
    let r = recipe(d.path(), &images, "");
    refused(
        d.path(),
        &r,
        &[],
        3,
        &["it is a multi-platform image without windows/amd64 (it has linux/amd64, linux/arm64/v8)"],
    );
}
