//! Issue 16: `bkbundle push` into a real registry (Debian's docker-registry, plain HTTP, TLS
//! with htpasswd basic auth, and TLS with token auth from a token server on another port), read
//! back by an independent client (skopeo: every layer decompressed and compared with the bundle's
//! diff ids, every config with its image id) and pulled by the real engine. A re-run sends
//! nothing; a killed push resumes and nothing is ever half-tagged; a registry that is down, a
//! wrong password, an untrusted CA and refused names end in a clear error with nothing sent.

use crate::harness::{bkbundle, docker_lock, Registry};
use crate::pack::{demo_bundle, run, Run};
use bkbundle::manifest::Manifest;
use std::io::Read;
use std::path::Path;
use std::process::Command;

fn manifest(bundle: &Path) -> Manifest {
    let r = run(Command::new("tar").arg("-xOf").arg(bundle).arg("bundle.toml"));
    assert_eq!(r.code, 0, "{}", r.stderr);
    Manifest::parse(&r.stdout, "bundle.toml").unwrap()
}

/// `bkbundle push` with its own digest cache (so each test starts cold) and no docker login file.
fn push(cache: &Path, args: &[&str]) -> Run {
    run(bkbundle()
        .arg("push")
        .args(args)
        .env("BKBUNDLE_CACHE_DIR", cache)
        .env("DOCKER_CONFIG", cache.join("no-docker-config")))
}

fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", r.stdout, r.stderr))
}

/// Every image of the bundle is in `reg` under `prefix`, as skopeo reads it: the config digest is
/// the image id and each layer, decompressed, has the bundle's diff id, in order.
fn assert_all_there(reg: &Registry, m: &Manifest, prefix: &str) {
    for img in &m.images {
        for r in &img.refs {
            assert_all_there_one(reg, img, &format!("{prefix}{r}"));
        }
    }
}

/// Image `img` is in `reg` as `reference`, as skopeo reads it (see [`assert_all_there`]).
fn assert_all_there_one(reg: &Registry, img: &bkbundle::manifest::Image, reference: &str) {
    let dir = tempfile::tempdir().unwrap();
    reg.skopeo_copy_to_dir(reference, dir.path());
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        doc["config"]["digest"].as_str(),
        Some(img.id.as_str()),
        "{reference}: config"
    );
    let layers = doc["layers"].as_array().unwrap();
    assert_eq!(layers.len(), img.layers.len(), "{reference}: layer count");
    for (l, diff) in layers.iter().zip(&img.layers) {
        let digest = l["digest"].as_str().unwrap();
        let blob = std::fs::File::open(dir.path().join(digest.trim_start_matches("sha256:"))).unwrap();
        let mut plain: Box<dyn Read> = match l["mediaType"].as_str().unwrap() {
            t if t.ends_with("gzip") => Box::new(flate2::read::GzDecoder::new(blob)),
            t if t.ends_with("zstd") => Box::new(zstd::stream::read::Decoder::new(blob).unwrap()),
            t => panic!("{reference}: layer media type {t}"),
        };
        let mut h = bkbundle::digest::Hasher::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = plain.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        assert_eq!(format!("sha256:{}", h.finish().0), *diff, "{reference}: layer {digest}");
    }
}

#[test]
fn push_to_a_plain_registry_reads_back_pulls_and_reruns_for_nothing() {
    let bundle = demo_bundle();
    let m = manifest(bundle);
    let reg = Registry::plain();
    let cache = tempfile::tempdir().unwrap();
    let target = format!("{}/site", reg.host());
    let bundle_s = bundle.to_str().unwrap();

    let r = push(
        cache.path(),
        &[bundle_s, "--registry", &target, "--registry-insecure", "--json"],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("plain HTTP"),
        "--registry-insecure is said loudly: {}",
        r.stderr
    );
    crate::schema::assert_schema("push", &r);
    let j = json(&r);
    let refs: usize = m.images.iter().map(|i| i.refs.len()).sum();
    assert_eq!(j["images"].as_array().unwrap().len(), refs);
    assert!(
        j["images"].as_array().unwrap().iter().all(|i| i["state"] == "pushed"),
        "{j}"
    );
    assert!(j["bytes_sent"].as_u64().unwrap() > 1_000_000, "{j}");
    // The demo images share their base layer: sent once, mounted into the other repositories.
    assert!(j["blobs"]["mounted"].as_u64().unwrap() >= 1, "{j}");
    assert_all_there(&reg, &m, "site/");

    // A re-run: every tag already names its image, nothing is sent.
    let r = push(
        cache.path(),
        &[bundle_s, "--registry", &target, "--registry-insecure", "--json"],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j = json(&r);
    assert_eq!(j["bytes_sent"], 0, "{j}");
    assert!(
        j["images"].as_array().unwrap().iter().all(|i| i["state"] == "present"),
        "{j}"
    );

    // The engine pulls it and gets the bundle's image id.
    let img = &m.images[0];
    let pulled = format!("{target}/{}", img.refs[0]);
    let _g = docker_lock();
    let r = run(Command::new("docker").args(["pull", "-q", &pulled]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(Command::new("docker").args(["image", "inspect", "-f", "{{.Id}}", &pulled]));
    assert_eq!(r.stdout.trim(), img.id);
    let _ = run(Command::new("docker").args(["rmi", &pulled]));

    // zstd layers as stored, to another prefix: the same images, OCI manifests.
    let r = push(
        cache.path(),
        &[
            bundle_s,
            "--registry",
            &format!("{}/z", reg.host()),
            "--registry-insecure",
            "--compression",
            "zstd",
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_all_there(&reg, &m, "z/");

    // An image another tool pushed (skopeo, its own gzip): its blobs are found from the
    // repository's tags and configs, without any cache, and not sent again.
    let app = &m.images[0].refs[0];
    let repo = app.rsplit_once(':').unwrap().0;
    reg.skopeo_copy_from_daemon(app, &format!("other/{repo}:old"));
    let fresh = tempfile::tempdir().unwrap();
    let r = push(
        fresh.path(),
        &[
            bundle_s,
            "--registry",
            &format!("{}/other", reg.host()),
            "--registry-insecure",
            "--image",
            app,
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j = json(&r);
    assert_eq!(j["bytes_sent"], 0, "{j}");
    assert_eq!(j["images"][0]["state"], "pushed", "{j}");
    assert_all_there_one(&reg, &m.images[0], &format!("other/{app}"));
}

/// A cache directory for the run, holding the right password's file and a wrong one's.
fn password_files(right: &str, wrong: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let cache = tempfile::tempdir().unwrap();
    let pw = cache.path().join("pw");
    std::fs::write(&pw, format!("{right}\n")).unwrap();
    let bad = cache.path().join("bad");
    std::fs::write(&bad, format!("{wrong}\n")).unwrap();
    (cache, pw, bad)
}

#[test]
fn push_to_a_tls_registry_with_basic_auth() {
    let bundle = demo_bundle();
    let m = manifest(bundle);
    let reg = Registry::tls_auth("alice", "s3cret-pw");
    let (_, password) = reg.credentials.clone().unwrap();
    let (cache, pw, bad) = password_files(&password, "not-the-password");
    let host = reg.host();
    let ca = reg.ca_pem_path().to_str().unwrap().to_string();
    let b = bundle.to_str().unwrap();
    let one = m.images[0].refs[0].as_str();

    // A CA that does not sign its certificate (the system's).
    let r = push(cache.path(), &[b, "--registry", &host, "--image", one]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        r.stderr.contains(&host) && r.stderr.contains("not signed by the system's CAs"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--registry-ca"), "{}", r.stderr);
    // No credentials.
    let r = push(
        cache.path(),
        &[b, "--registry", &host, "--registry-ca", &ca, "--image", one],
    );
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("asks for credentials"), "{}", r.stderr);
    // A wrong password: refused, named, never printed.
    let r = push(
        cache.path(),
        &[
            b,
            "--registry",
            &host,
            "--registry-ca",
            &ca,
            "--registry-user",
            "alice",
            "--registry-password-file",
            bad.to_str().unwrap(),
            "--image",
            one,
        ],
    );
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("refused user alice"), "{}", r.stderr);
    assert!(!r.stderr.contains("not-the-password") && !r.stdout.contains("not-the-password"));
    assert_eq!(reg.image_id(one), None, "nothing was pushed");

    // The right password: pushed; then the docker login file of the harness serves as well.
    let r = push(
        cache.path(),
        &[
            b,
            "--registry",
            &host,
            "--registry-ca",
            &ca,
            "--registry-user",
            "alice",
            "--registry-password-file",
            pw.to_str().unwrap(),
            "--json",
            "-vv",
        ],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(
        !r.stderr.contains(&password) && !r.stdout.contains(&password),
        "the password is never printed"
    );
    assert_all_there(&reg, &m, "");
    let r = run(bkbundle()
        .args(["push", b, "--registry", &host, "--registry-ca", &ca, "--json"])
        .env("BKBUNDLE_CACHE_DIR", cache.path())
        .env("DOCKER_CONFIG", reg.docker_config_dir()));
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(json(&r)["bytes_sent"], 0);
    // Everything from an install config's [registry] section.
    let cfg = cache.path().join("install.toml");
    std::fs::write(
        &cfg,
        format!("format = 1\n[registry]\nurl = \"{host}\"\nca_file = \"{ca}\"\nusername = \"alice\"\npassword_file = \"{}\"\n", pw.display()),
    )
    .unwrap();
    let r = push(cache.path(), &[b, "--config", cfg.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(json(&r)["bytes_sent"], 0);
}

/// distribution's token auth (the bearer flow of Harbor and Docker Hub) against the real registry:
/// a token server on another port (HTTPS, the harness CA) signs tokens the registry checks
/// against its `rootcertbundle`; bkbundle fetches one per scope (a mount's two scopes included).
#[test]
fn push_to_a_registry_with_token_auth() {
    let bundle = demo_bundle();
    let m = manifest(bundle);
    let reg = Registry::token_auth("bob", "t0ken-pw-9");
    let (user, password) = reg.credentials.clone().unwrap();
    let (cache, pw, bad) = password_files(&password, "wrong-token-pw");
    let host = reg.host();
    let ca = reg.ca_pem_path().to_str().unwrap().to_string();
    let b = bundle.to_str().unwrap();
    let one = m.images[0].refs[0].as_str();
    let target = format!("{host}/site");
    let with_password = |file: &Path, extra: &[&str]| {
        let mut args = vec![
            b,
            "--registry",
            &target,
            "--registry-ca",
            &ca,
            "--registry-user",
            &user,
            "--registry-password-file",
            file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        push(cache.path(), &args)
    };

    // A wrong password: the token service's 401, named, the password never printed.
    let r = with_password(&bad, &["--image", one]);
    assert_eq!(r.code, 6, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains(&format!("token service {} refused user bob", reg.token_realm())),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains(&host), "{}", r.stderr);
    assert!(!r.stderr.contains("wrong-token-pw") && !r.stdout.contains("wrong-token-pw"));
    // No credentials: the token service hands out an anonymous token that grants nothing, the
    // registry refuses it.
    let r = push(
        cache.path(),
        &[b, "--registry", &target, "--registry-ca", &ca, "--image", one],
    );
    assert_eq!(r.code, 6, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(&host)
            && r.stderr.contains(&format!(
                "asks for credentials to pull from site/{} and none were given",
                one.rsplit_once(':').unwrap().0
            ))
            && r.stderr.contains("anonymous token"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--registry-user"), "{}", r.stderr);
    assert_eq!(reg.image_id(&format!("site/{one}")), None, "nothing was pushed");
    // The right password, a repository the user may only pull from (the token service grants
    // no push under readonly/): the missing right is named, not the password.
    let r = push(
        cache.path(),
        &[
            b,
            "--registry",
            &format!("{host}/readonly"),
            "--registry-ca",
            &ca,
            "--registry-user",
            &user,
            "--registry-password-file",
            pw.to_str().unwrap(),
            "--image",
            one,
        ],
    );
    assert_eq!(r.code, 6, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("user bob (credentials from --registry-user) may not push to readonly/"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("password was accepted"), "{}", r.stderr);
    assert_eq!(reg.image_id(&format!("readonly/{one}")), None, "nothing was pushed");

    // The right password: every image, read back by skopeo (its own bearer flow).
    let r = with_password(&pw, &["--json", "-vv"]);
    assert_eq!(r.code, 0, "{}\n{}\n--- registry ---\n{}", r.stdout, r.stderr, reg.log());
    assert!(
        !r.stderr.contains(&password) && !r.stdout.contains(&password),
        "the password is never printed"
    );
    let j = json(&r);
    assert!(
        j["images"].as_array().unwrap().iter().all(|i| i["state"] == "pushed"),
        "{j}"
    );
    assert!(j["bytes_sent"].as_u64().unwrap() > 1_000_000, "{j}");
    // The shared base layer was mounted across repositories: a token for two scopes.
    assert!(j["blobs"]["mounted"].as_u64().unwrap() >= 1, "{j}");
    assert_all_there(&reg, &m, "site/");
    let log = reg.token_log();
    assert!(log.contains("token for bob"), "{log}");
    assert!(!log.contains(&password), "the token server never logs the password");

    // A re-run sends nothing.
    let r = with_password(&pw, &["--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j = json(&r);
    assert_eq!(j["bytes_sent"], 0, "{j}");
    assert!(
        j["images"].as_array().unwrap().iter().all(|i| i["state"] == "present"),
        "{j}"
    );
    // The `docker login` file's credentials for the registry go to its token service as well.
    let r = run(bkbundle()
        .args(["push", b, "--registry", &target, "--registry-ca", &ca, "--json"])
        .env("BKBUNDLE_CACHE_DIR", cache.path())
        .env("DOCKER_CONFIG", reg.docker_config_dir()));
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(json(&r)["bytes_sent"], 0);
}

/// A plain-HTTP registry (`--registry-insecure`) whose token service is HTTPS on another port:
/// the token service's certificate is checked against --registry-ca (or the system's CAs).
#[test]
fn push_to_a_plain_http_registry_with_an_https_token_service() {
    let bundle = demo_bundle();
    let m = manifest(bundle);
    let reg = Registry::token_auth_over_http("carol", "http-reg-pw");
    assert!(!reg.is_tls());
    let cache = tempfile::tempdir().unwrap();
    let pw = cache.path().join("pw");
    std::fs::write(&pw, "http-reg-pw\n").unwrap();
    let host = reg.host();
    let ca = reg.ca_pem_path().to_str().unwrap().to_string();
    let b = bundle.to_str().unwrap();
    let one = m.images[0].refs[0].as_str();
    let base = [
        b,
        "--registry",
        &host,
        "--registry-insecure",
        "--registry-user",
        "carol",
        "--registry-password-file",
        pw.to_str().unwrap(),
        "--image",
        one,
        "--json",
    ];

    // Without the CA, the token service's certificate is not trusted: named, with the way out.
    let r = push(cache.path(), &base);
    assert_eq!(r.code, 6, "{}\n{}", r.stdout, r.stderr);
    let token_addr = format!("127.0.0.1:{}", reg.token_port.unwrap());
    assert!(
        r.stderr.contains(&token_addr) && r.stderr.contains("not signed by the system's CAs"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--registry-ca"), "{}", r.stderr);

    let mut args = base.to_vec();
    args.extend_from_slice(&["--registry-ca", &ca]);
    let r = push(cache.path(), &args);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(json(&r)["bytes_sent"].as_u64().unwrap() > 0, "{}", r.stdout);
    assert_all_there_one(&reg, &m.images[0], one);
    assert!(reg.token_log().contains("token for carol"));
}

#[test]
fn push_refuses_names_and_a_down_registry_and_resumes_after_a_kill() {
    let bundle = demo_bundle();
    let m = manifest(bundle);
    let mut reg = Registry::plain();
    let cache = tempfile::tempdir().unwrap();
    let b = bundle.to_str().unwrap();

    // Names no registry takes: every image listed, nothing sent.
    let long = format!("{}/{}", reg.host(), "p".repeat(240));
    let r = push(cache.path(), &[b, "--registry", &long, "--registry-insecure"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    for img in &m.images {
        assert!(r.stderr.contains(&format!("image {}", img.refs[0])), "{}", r.stderr);
    }
    assert!(r.stderr.contains("at most 255"), "{}", r.stderr);
    let r = push(
        cache.path(),
        &[b, "--registry", &format!("{}/Site", reg.host()), "--registry-insecure"],
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("\"Site\""), "{}", r.stderr);
    let r = push(
        cache.path(),
        &[
            b,
            "--registry",
            &reg.host(),
            "--registry-insecure",
            "--image",
            "no/such:1",
        ],
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("no/such:1 is not in the bundle"), "{}", r.stderr);
    assert!(
        !reg.storage_dir().join("docker").exists(),
        "nothing reached the registry"
    );

    // Down: named, with what to check.
    reg.stop();
    let r = push(cache.path(), &[b, "--registry", &reg.host(), "--registry-insecure"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("cannot connect to {}", reg.host())),
        "{}",
        r.stderr
    );
    reg.restart();

    // Killed at some instant of its upload: no tag names an image whose blobs are missing, and
    // the next run completes.
    let mut child = bkbundle()
        .args([
            "push",
            b,
            "--registry",
            &reg.host(),
            "--registry-insecure",
            "--jobs",
            "1",
        ])
        .env("BKBUNDLE_CACHE_DIR", cache.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first blob upload has begun (the registry's upload directory appears).
    let uploads = reg.storage_dir().join("docker/registry/v2/repositories");
    let t0 = std::time::Instant::now();
    while !uploads.exists() && t0.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for img in &m.images {
        for r in &img.refs {
            if let Ok(text) = reg.skopeo_manifest(r) {
                // A tag exists only with all its blobs: skopeo can copy it whole.
                let dir = tempfile::tempdir().unwrap();
                reg.skopeo_copy_to_dir(r, dir.path());
                assert!(text.contains(&img.id));
            }
        }
    }
    let r = push(
        cache.path(),
        &[b, "--registry", &reg.host(), "--registry-insecure", "--json"],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_all_there(&reg, &m, "");
}
