//! Issue 16: a bundle without image layers (`pack --no-images`), installed with the images pulled
//! by the real engine from a real registry (Debian's docker-registry, started by the harness),
//! filled independently of bkbundle by skopeo from the engine.
//!
//! Each test uses an image of its own (a unique layer on the demo base), removed from the engine
//! before the install so that the engine really pulls it, and removed again at the end; the demo
//! images the other tests share are only read.

use crate::harness::{ensure_demo_images, free_port, OwnImages, Registry};
use crate::install::{compose_with, image_id, pack_stack_with, unique_image, Project};
use crate::pack::{bk, run, Run};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const WEB: &str = "bkbundle-demo/web:1";

/// A bundle without layers of the demo web image and an image of the test's own (service `u`).
struct Setup {
    bundle: PathBuf,
    img: String,
    img_id: String,
    web_id: String,
}

fn setup(p: &Project, name: &str, own: &mut OwnImages) -> Setup {
    ensure_demo_images();
    let img = unique_image(p.dir.path());
    own.0.push(img.clone());
    let img_id = image_id(&img).expect("the test's image was built");
    let web_id = image_id(WEB).expect("the demo web image");
    let bundle = pack_stack_with(
        p.dir.path(),
        name,
        "1",
        &[WEB, &img],
        &compose_with(&format!("  u:\n    image: {img}\n")),
        &["--no-images"],
    );
    Setup {
        bundle,
        img,
        img_id,
        web_id,
    }
}

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", r.stdout, r.stderr))
}

/// `docker rmi` of the test's image: its id leaves the engine (nothing else names it).
fn remove_from_engine(s: &Setup) {
    let r = run(Command::new("docker").args(["rmi", &s.img]));
    assert_eq!(r.code, 0, "docker rmi {}: {}", s.img, r.stderr);
    assert!(
        image_id(&s.img_id).is_none(),
        "image {} is still in the engine",
        s.img_id
    );
}

#[test]
fn a_bundle_without_layers_verifies_inspects_and_holds_no_layer() {
    let mut own = OwnImages(vec![]);
    let p = Project::new();
    let s = setup(&p, "nolayers", &mut own);

    let entries = run(Command::new("tar").args(["-tf", arg(&s.bundle)]));
    assert_eq!(entries.code, 0, "{}", entries.stderr);
    assert!(!entries.stdout.contains("images/layers/"), "{}", entries.stdout);
    assert_eq!(
        entries.stdout.matches("images/configs/").count(),
        2,
        "{}",
        entries.stdout
    );

    let r = bk(&["verify", arg(&s.bundle)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("images: 2 (layers not in this bundle: install with --images-from REGISTRY)"),
        "{}",
        r.stdout
    );
    let r = bk(&["inspect", arg(&s.bundle)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("\nimages: 2 (layers not in this bundle"),
        "{}",
        r.stdout
    );
    let v = json(&bk(&["inspect", arg(&s.bundle), "--json"]));
    assert_eq!(v["without_layers"], true);
    let ids: Vec<&str> = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [s.web_id.as_str(), s.img_id.as_str()]);
    // The manifest keeps every layer's digest and size, without a file.
    let m = run(Command::new("tar").args(["-xOf", arg(&s.bundle), "bundle.toml"]));
    let m: toml::Value = toml::from_str(&m.stdout).unwrap();
    assert_eq!(m["bundle"]["without_layers"].as_bool(), Some(true));
    let layers = m["layers"].as_array().unwrap();
    assert!(layers.len() >= 2, "{layers:?}");
    for l in layers {
        assert!(l.get("file").is_none() && l["size"].as_integer().unwrap() > 0, "{l:?}");
    }

    // Without a registry, an image the engine lacks stops the install before anything changes.
    remove_from_engine(&s);
    let r = p.install(&s.bundle, &p.config(60, ""), &[]);
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("the bundle carries no image layers: give --images-from REGISTRY")
            && r.stderr.contains(&s.img)
            && r.stderr.contains(&s.img_id),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains(&format!("{WEB} (")),
        "web is in the engine: {}",
        r.stderr
    );
    assert!(!p.target().exists());
}

#[test]
fn without_a_registry_the_engines_own_images_are_enough() {
    let mut own = OwnImages(vec![]);
    let p = Project::new();
    let s = setup(&p, "present", &mut own);
    // Every image is in the engine with the manifest's id: nothing to pull, the stack starts.
    let r = p.install(&s.bundle, &p.config(60, ""), &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r);
    assert_eq!(v["images_from"], serde_json::Value::Null);
    assert!(
        v["plan"]["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["action"] == "present"),
        "{v}"
    );
}

/// The registry holds both images at `PREFIX/<reference>`, put there by skopeo from the engine.
fn fill(reg: &Registry, prefix: &str, images: &[&str]) {
    for i in images {
        reg.skopeo_copy_from_daemon(i, &format!("{prefix}/{i}"));
        assert_eq!(
            reg.image_id(&format!("{prefix}/{i}")),
            image_id(i),
            "skopeo put {i} into the registry with the engine's id"
        );
    }
}

#[test]
fn install_pulls_the_images_from_a_plain_registry_and_checks_their_ids() {
    let mut own = OwnImages(vec![]);
    let p = Project::new();
    let s = setup(&p, "plain", &mut own);
    let reg = Registry::plain();
    fill(&reg, "site", &[WEB, &s.img]);
    remove_from_engine(&s);
    let from = format!("{}/site", reg.host());
    own.0.push(format!("{from}/{}", s.img));

    let cfg = p.config(120, "");
    let r = p.install(
        &s.bundle,
        &cfg,
        &["--images-from", &from, "--registry-insecure", "--json"],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, r.stdout);
    let v = json(&r);
    assert_eq!(v["images_from"], from.as_str());
    let planned = v["plan"]["images"].as_array().unwrap();
    let u = planned.iter().find(|i| i["refs"][0] == s.img.as_str()).unwrap();
    assert_eq!(u["action"], "pull");
    assert_eq!(u["from"], format!("{from}/{}", s.img).as_str());
    let web = planned.iter().find(|i| i["refs"][0] == WEB).unwrap();
    assert_eq!(web["action"], "present", "an image the engine has is not pulled");
    assert!(
        r.stderr.contains(&format!("pulled {} ({})", s.img, s.img_id)),
        "{}",
        r.stderr
    );

    // The engine has the bundle's image under the stack's reference, not the registry's name.
    assert_eq!(image_id(&s.img).as_deref(), Some(s.img_id.as_str()));
    assert!(
        image_id(&format!("{from}/{}", s.img)).is_none(),
        "the registry's name is left behind"
    );
    let containers = p.containers();
    assert_eq!(containers.len(), 2, "{containers:?}");
    assert!(containers.iter().all(|c| c.contains(" Up ")), "{containers:?}");
    let journal: serde_json::Value =
        serde_json::from_slice(&fs::read(p.target().join(".bkbundle/journal.json")).unwrap()).unwrap();
    assert_eq!(journal["images_from"], from.as_str());
    assert_eq!(journal["registry_access"]["insecure"], true, "{journal}");

    // doctor checks the registry the journal names: every image there with the bundle's id.
    let registry_findings = |r: &Run| -> Vec<serde_json::Value> {
        json(r)["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["check"] == "registry")
            .cloned()
            .collect()
    };
    let doctor = || {
        bk(&[
            "doctor",
            "--target",
            arg(&p.target()),
            "--bundle",
            arg(&s.bundle),
            "--json",
        ])
    };
    let r = doctor();
    assert!(registry_findings(&r).is_empty(), "{}", r.stdout);
    // Without --bundle: the ids of the images the stack's containers run are checked there.
    let doctor_alone = || bk(&["doctor", "--target", arg(&p.target()), "--json"]);
    let r = doctor_alone();
    assert!(registry_findings(&r).is_empty(), "{}", r.stdout);

    // A re-run finds everything in place: already installed, the registry not even asked.
    let mut reg = reg;
    reg.stop();
    let r = doctor_alone();
    let found = registry_findings(&r);
    assert_eq!(found.len(), 1, "{}", r.stdout);
    assert_eq!(found[0]["severity"], "error", "{}", r.stdout);
    let r = doctor();
    let found = registry_findings(&r);
    assert_eq!(found.len(), 1, "{}", r.stdout);
    assert_eq!(found[0]["subject"], format!("registry {from}").as_str());
    assert_eq!(found[0]["severity"], "error");
    let r = p.install(&s.bundle, &cfg, &["--images-from", &from, "--registry-insecure"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("already installed"), "{}", r.stdout);
}

#[test]
fn a_registry_without_an_image_stops_the_install_before_anything_changes() {
    let mut own = OwnImages(vec![]);
    let p = Project::new();
    let s = setup(&p, "missing", &mut own);
    let reg = Registry::plain();
    fill(&reg, "site", &[WEB]);
    remove_from_engine(&s);
    let from = format!("{}/site", reg.host());
    // A plain-HTTP registry without --registry-insecure: bkbundle's client speaks TLS, and says
    // what to do.
    let r = p.install(&s.bundle, &p.config(60, ""), &["--images-from", &from]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("--registry-insecure"), "{}", r.stderr);
    assert!(!p.target().exists());

    let r = p.install(
        &s.bundle,
        &p.config(60, ""),
        &["--images-from", &from, "--registry-insecure"],
    );
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "image {}: registry {from} has no {from}/{} (expected image {})",
            s.img, s.img, s.img_id
        )),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("nothing was changed"), "{}", r.stderr);
    assert!(!p.target().exists());
    assert!(p.containers().is_empty());
    assert!(image_id(&s.img_id).is_none(), "nothing was pulled");

    // Another image under its name (here web's): named with both ids, nothing changed.
    reg.skopeo_copy_from_daemon(WEB, &format!("site/{}", s.img));
    let r = p.install(
        &s.bundle,
        &p.config(60, ""),
        &["--images-from", &from, "--registry-insecure"],
    );
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "image {}: registry {from} has {from}/{} as image {}, the bundle's is {}",
            s.img, s.img, s.web_id, s.img_id
        )),
        "{}",
        r.stderr
    );
    assert!(!p.target().exists());
    assert!(image_id(&s.img_id).is_none(), "nothing was pulled");
}

#[test]
fn a_full_bundle_pushed_by_bkbundle_installs_a_bundle_without_layers_elsewhere() {
    let mut own = OwnImages(vec![]);
    let p = Project::new();
    let s = setup(&p, "pushed", &mut own);
    // The same recipe packed in full (the connected side's bundle), pushed by bkbundle itself.
    let full = pack_stack_with(
        p.dir.path(),
        "pushedfull",
        "1",
        &[WEB, &s.img],
        &compose_with(&format!("  u:\n    image: {}\n", s.img)),
        &[],
    );
    let reg = Registry::plain();
    let from = format!("{}/bklite", reg.host());
    // The small bundle has nothing to push: refused up front, naming what to push instead.
    let r = bk(&["push", arg(&s.bundle), "--registry", &from, "--registry-insecure"]);
    assert_eq!(r.code, 3, "push of a bundle without layers: {}", r.stderr);
    assert!(
        r.stderr.contains("carries no image layers") && r.stderr.contains("full bundle"),
        "{}",
        r.stderr
    );
    let r = bk(&["push", arg(&full), "--registry", &from, "--registry-insecure"]);
    assert_eq!(r.code, 0, "push: {}", r.stderr);
    assert_eq!(
        reg.image_id(&format!("bklite/{}", s.img)).as_deref(),
        Some(s.img_id.as_str())
    );
    remove_from_engine(&s);
    own.0.push(format!("{from}/{}", s.img));
    let r = p.install(
        &s.bundle,
        &p.config(120, ""),
        &["--images-from", &from, "--registry-insecure"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(image_id(&s.img).as_deref(), Some(s.img_id.as_str()));
    assert!(
        p.containers().iter().all(|c| c.contains(" Up ")),
        "{:?}",
        p.containers()
    );
}

#[test]
fn a_registry_that_is_down_is_named_and_nothing_changes() {
    let mut own = OwnImages(vec![]);
    let p = Project::new();
    let s = setup(&p, "down", &mut own);
    remove_from_engine(&s);
    let from = format!("127.0.0.1:{}", free_port()); // nobody listens there
    let r = p.install(&s.bundle, &p.config(60, ""), &["--images-from", &from]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("registry {from}")), "{}", r.stderr);
    assert!(!p.target().exists());
    assert!(image_id(&s.img_id).is_none());
}

/// Removes the engine's CA directory for a test registry, whatever the test leaves.
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What the tests of a registry with a password share: where the images are (`HOST/site`), the
/// engine's CA directory for it (removed at the end), the right and a wrong password's files.
struct Authed {
    from: String,
    certs: PathBuf,
    _certs: Remove,
    pass_file: PathBuf,
    wrong: PathBuf,
}

fn authed(p: &Project, s: &Setup, reg: &Registry, password: &str, own: &mut OwnImages) -> Authed {
    let from = format!("{}/site", reg.host());
    own.0.push(format!("{from}/{}", s.img));
    let certs = crate::harness::engine_certs_dir(&reg.host());
    let pass_file = p.path("registry.pass");
    fs::write(&pass_file, format!("{password}\n")).unwrap();
    let wrong = p.path("wrong.pass");
    fs::write(&wrong, "not-the-password\n").unwrap();
    Authed {
        from,
        _certs: Remove(certs.clone()),
        certs,
        pass_file,
        wrong,
    }
}

#[test]
fn install_pulls_from_a_tls_registry_with_its_ca_and_a_password() {
    let mut own = OwnImages(vec![]);
    let p = Project::new();
    let s = setup(&p, "tls", &mut own);
    let password = crate::harness::random_alnum(20);
    let reg = Registry::tls_auth("bkbundle", &password);
    fill(&reg, "site", &[WEB, &s.img]);
    remove_from_engine(&s);
    let Authed {
        from,
        certs,
        _certs,
        pass_file,
        wrong,
    } = authed(&p, &s, &reg, &password, &mut own);
    // A wrong password (in `wrong`): the registry refuses, before anything changes.
    let base = [
        "--images-from",
        &from,
        "--registry-ca",
        arg(reg.ca_pem_path()),
        "--registry-user",
        "bkbundle",
    ];
    let mut args = base.to_vec();
    args.extend(["--registry-password-file", arg(&wrong)]);
    let cfg = p.config(120, "");
    let r = p.install(&s.bundle, &cfg, &args);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("registry {from}")), "{}", r.stderr);
    assert!(!r.stderr.contains(&password), "the password is never printed");
    assert!(!p.target().exists());

    let mut args = base.to_vec();
    args.extend(["--registry-password-file", arg(&pass_file)]);
    let r = p.install(&s.bundle, &cfg, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains(&password) && !r.stdout.contains(&password));
    // install wrote the engine's CA file for the registry, and said so.
    let ca_file = certs.join("ca.crt");
    assert_eq!(fs::read(&ca_file).unwrap(), fs::read(reg.ca_pem_path()).unwrap());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&ca_file).unwrap().permissions().mode() & 0o777, 0o644);
    assert!(
        r.stdout.contains(&format!("wrote {}", ca_file.display())),
        "{}",
        r.stdout
    );
    assert_eq!(image_id(&s.img).as_deref(), Some(s.img_id.as_str()));

    // Another CA in that file is a preflight problem naming it (a dry run: preflight without the
    // "already installed" short cut).
    fs::write(
        &ca_file,
        "-----BEGIN CERTIFICATE-----\nMIIBother\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    args.push("--dry-run");
    let r = p.install(&s.bundle, &cfg, &args);
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("{} holds another CA than --registry-ca", ca_file.display())),
        "{}",
        r.stderr
    );
}

/// A registry with distribution's token auth: install's preflight (bkbundle's client, pull
/// tokens from the token service on another port) and the engine's pull (its own bearer flow,
/// the CA in certs.d) both get in with the password; a wrong one is refused before anything
/// changes.
#[test]
fn install_pulls_from_a_registry_with_token_auth() {
    let mut own = OwnImages(vec![]);
    let p = Project::new();
    let s = setup(&p, "token", &mut own);
    let password = crate::harness::random_alnum(20);
    let reg = Registry::token_auth("bkbundle", &password);
    fill(&reg, "site", &[WEB, &s.img]);
    remove_from_engine(&s);
    let Authed {
        from,
        _certs,
        pass_file,
        wrong,
        ..
    } = authed(&p, &s, &reg, &password, &mut own);
    let base = [
        "--images-from",
        &from,
        "--registry-ca",
        arg(reg.ca_pem_path()),
        "--registry-user",
        "bkbundle",
    ];
    let cfg = p.config(120, "");

    let mut args = base.to_vec();
    args.extend(["--registry-password-file", arg(&wrong)]);
    let r = p.install(&s.bundle, &cfg, &args);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("token service") && r.stderr.contains("refused user bkbundle"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("not-the-password"), "the password is never printed");
    assert!(!p.target().exists());

    let mut args = base.to_vec();
    args.extend(["--registry-password-file", arg(&pass_file)]);
    let r = p.install(&s.bundle, &cfg, &args);
    assert_eq!(r.code, 0, "{}\n--- token server ---\n{}", r.stderr, reg.token_log());
    assert!(!r.stderr.contains(&password) && !r.stdout.contains(&password));
    assert_eq!(image_id(&s.img).as_deref(), Some(s.img_id.as_str()));
}
