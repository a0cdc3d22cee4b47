//! Issue 2: pack, verify and inspect against the real Docker engine, and every bad input the
//! issue names (missing image or package, malformed recipe, escaping packages, truncated or
//! altered bundles, missing parts, a newer format, a full disk).

use crate::harness::{bkbundle, docker_lock, ensure_demo_images, free_port, repo_root};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Run {
    let out = cmd.output().expect("run command");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// XOR the byte at `at` of `path` with `mask` (twice restores it).
pub fn xor_byte(path: &Path, at: u64, mask: u8) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ mask]).unwrap();
}

pub fn bk(args: &[&str]) -> Run {
    run(bkbundle().args(args))
}

pub(crate) fn sh(script: &str) -> Run {
    let r = run(Command::new("bash").args(["-c", script]));
    assert_eq!(r.code, 0, "`{script}` failed:\n{}{}", r.stdout, r.stderr);
    r
}

fn demo_dir() -> PathBuf {
    repo_root().join("examples/demo")
}

/// The demo bundle, packed once per test process; tests that alter a bundle work on copies.
pub fn demo_bundle() -> &'static Path {
    static B: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = B.get_or_init(|| {
        ensure_demo_images();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("demo.bkb");
        let r = bk(&[
            "pack",
            demo_dir().join("recipe.toml").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(r.code, 0, "pack failed: {}", r.stderr);
        (dir, out)
    });
    p
}

/// A recipe in `dir` with the given image and package sections and a stack of one service per
/// image (pack refuses a stack whose images the recipe does not pack).
pub(crate) fn recipe(dir: &Path, images: &str, packages: &str) -> PathBuf {
    let stack = dir.join("stack");
    fs::create_dir_all(&stack).unwrap();
    let mut compose = String::from("services:\n");
    for (n, r) in images.lines().filter_map(|l| l.strip_prefix("ref = ")).enumerate() {
        compose.push_str(&format!("  s{n}:\n    image: {r}\n"));
    }
    if compose == "services:\n" {
        compose = "services: {}\n".into();
    }
    fs::write(stack.join("docker-compose.yml"), compose).unwrap();
    let text = format!(
        "format = 1\n[bundle]\nname = \"t\"\nversion = \"1\"\n{images}\n{packages}\n[stack]\ndir = \"{}\"\ncompose = \"docker-compose.yml\"\n",
        stack.display()
    );
    let p = dir.join("recipe.toml");
    fs::write(&p, text).unwrap();
    p
}

fn controller(file: &Path) -> String {
    format!(
        "[[packages]]\nfile = \"{}\"\ntype = \"controller\"\nos = \"linux\"\narch = \"amd64\"\nobject = \"Controller\"\nversion = \"1.0.0\"\n",
        file.display()
    )
}

pub(crate) fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.stdout))
}

#[test]
fn demo_packs_verifies_inspects_and_extracts_with_plain_tools() {
    let b = demo_bundle();
    let v = bk(&["verify", b.to_str().unwrap()]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert!(v.stdout.starts_with("OK demo 1.0.0"), "{}", v.stdout);

    let i = bk(&["--json", "inspect", b.to_str().unwrap()]);
    assert_eq!(i.code, 0, "{}", i.stderr);
    let j = json(&i);
    let images = j["images"].as_array().unwrap();
    assert_eq!(images.len(), 5);
    // app, web, postgres, nats and fusion-collector share the base layer: each has 2 layers (the
    // fusion-collector 3), 1 shared, 7 distinct.
    for img in images {
        let fc = img["refs"][0] == "bkbundle-demo/fusion-collector:1";
        assert_eq!(img["layers"], if fc { 3 } else { 2 }, "{img}");
        assert_eq!(img["shared_layers"], 1, "{img}");
        let id =
            run(Command::new("docker").args(["image", "inspect", "-f", "{{.Id}}", img["refs"][0].as_str().unwrap()]));
        assert_eq!(
            id.stdout.trim(),
            img["id"].as_str().unwrap(),
            "image id must be the engine's"
        );
    }
    // Three controllers built from the fusion-collector image's layers, three collectors inside
    // the linux one, three installers (linux x86_64 and arm64, windows).
    assert_eq!(j["packages"].as_array().unwrap().len(), 6);
    assert_eq!(j["installers"].as_array().unwrap().len(), 3, "{}", i.stdout);
    assert_eq!(j["stack"].as_array().unwrap().len(), 3);
    assert_eq!(j["regions"]["required"].as_array().unwrap().len(), 3);
    let human = bk(&["inspect", b.to_str().unwrap()]);
    assert!(
        human.stdout.contains("bkbundle-demo/app:1") && human.stdout.contains("NATS-Executor"),
        "{}",
        human.stdout
    );

    // Plain tar and sha256sum -c accept it; each stored layer decompresses to its diff id.
    let x = tempfile::tempdir().unwrap();
    let xs = x.path().display();
    sh(&format!(
        "tar -xf {} -C {xs} && cd {xs} && sha256sum --quiet -c SHA256SUMS",
        b.display()
    ));
    let layers: Vec<PathBuf> = fs::read_dir(x.path().join("images/layers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(layers.len(), 7, "shared layer stored once");
    for l in layers {
        let name = l.file_name().unwrap().to_string_lossy().to_string();
        let got = sh(&format!("zstd -dc {} | sha256sum", l.display()));
        assert_eq!(
            got.stdout.split_whitespace().next().unwrap(),
            name.trim_end_matches(".tar.zst")
        );
    }
    let version = run(Command::new(x.path().join("bin/bkbundle")).arg("--version"));
    assert!(
        version.stdout.starts_with("bkbundle "),
        "the bundle carries a runnable bkbundle"
    );
}

#[test]
fn gzip_layers_are_selectable() {
    ensure_demo_images();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("g.bkb");
    let r = bk(&[
        "pack",
        demo_dir().join("recipe.toml").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--compression",
        "gzip",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(bk(&["verify", out.to_str().unwrap()]).code, 0);
    let xs = d.path().join("x");
    fs::create_dir(&xs).unwrap();
    sh(&format!("tar -xf {} -C {}", out.display(), xs.display()));
    for l in fs::read_dir(xs.join("images/layers")).unwrap() {
        let l = l.unwrap().path();
        let name = l.file_name().unwrap().to_string_lossy().to_string();
        assert!(name.ends_with(".tar.gz"), "{name}");
        let got = sh(&format!("gzip -dc {} | sha256sum", l.display()));
        assert_eq!(
            got.stdout.split_whitespace().next().unwrap(),
            name.trim_end_matches(".tar.gz")
        );
    }
}

#[test]
fn split_bundle_verifies_and_names_a_missing_part() {
    ensure_demo_images();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("s.bkb");
    let r = bk(&[
        "pack",
        demo_dir().join("recipe.toml").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--split-size",
        "20M",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!out.exists(), "split output has no unnumbered file");
    let parts: Vec<PathBuf> = (1..)
        .map(|n| d.path().join(format!("s.bkb.{n:03}")))
        .take_while(|p| p.exists())
        .collect();
    assert!(parts.len() >= 3, "expected several parts, got {}", parts.len());
    for p in &parts[..parts.len() - 1] {
        assert_eq!(fs::metadata(p).unwrap().len(), 20_000_000);
    }
    assert_eq!(bk(&["verify", out.to_str().unwrap()]).code, 0);
    assert_eq!(bk(&["verify", parts[0].to_str().unwrap()]).code, 0);
    sh(&format!(
        "cat {}/s.bkb.* | tar -t | grep -qx bundle.toml",
        d.path().display()
    ));

    // The last part missing: truncated, and the next part is named.
    let last = parts.last().unwrap();
    let keep = d.path().join("last");
    fs::rename(last, &keep).unwrap();
    let v = bk(&["verify", out.to_str().unwrap()]);
    assert_eq!(v.code, 4, "{}", v.stderr);
    assert!(
        v.stderr.contains("truncated") && v.stderr.contains(&format!("s.bkb.{:03} is missing", parts.len())),
        "{}",
        v.stderr
    );
    fs::rename(&keep, last).unwrap();

    // A middle part missing: named.
    fs::remove_file(&parts[1]).unwrap();
    let v = bk(&["verify", out.to_str().unwrap()]);
    assert_eq!(v.code, 4, "{}", v.stderr);
    assert!(v.stderr.contains("s.bkb.002 is missing"), "{}", v.stderr);
}

#[test]
fn a_flipped_byte_anywhere_fails_verification() {
    let d = tempfile::tempdir().unwrap();
    let copy = d.path().join("c.bkb");
    fs::copy(demo_bundle(), &copy).unwrap();
    let len = fs::metadata(&copy).unwrap().len();
    let reader = bkbundle::bundle::BundleReader::open(&copy).unwrap();
    let manifest = reader.entry("bundle.toml").unwrap().clone();
    // Every entry's header (name, checksum padding), first/middle/last data byte, padding,
    // the end-of-archive blocks, plus pseudo-random positions.
    let mut positions = vec![0u64, 155, 511, len - 1, len - 1024];
    for e in reader.entries() {
        let h = e.offset - 512;
        positions.extend([
            h + 10,
            h + 124,
            h + 155,
            e.offset,
            e.offset + e.size / 2,
            e.offset + e.size - 1,
        ]);
        if e.size % 512 != 0 {
            positions.push(e.offset + e.size);
        }
    }
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..12 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        positions.push(x % len);
    }
    drop(reader);
    let flip = |at: u64| xor_byte(&copy, at, 0x01);
    for at in positions {
        flip(at);
        let v = bk(&["verify", copy.to_str().unwrap()]);
        flip(at);
        let in_manifest = (manifest.offset..manifest.offset + manifest.size).contains(&at);
        assert!(
            v.code == 4 || (in_manifest && v.code == 5),
            "flip at byte {at} of {len}: exit {} {}{}",
            v.code,
            v.stdout,
            v.stderr
        );
        assert!(v.stderr.starts_with("error: "), "flip at {at}: {}", v.stderr);
    }
    assert_eq!(bk(&["verify", copy.to_str().unwrap()]).code, 0, "all flips undone");
}

#[test]
fn a_truncated_bundle_says_so() {
    let d = tempfile::tempdir().unwrap();
    let copy = d.path().join("t.bkb");
    fs::copy(demo_bundle(), &copy).unwrap();
    let len = fs::metadata(&copy).unwrap().len();
    for cut in [len / 2, len - 1, len - 512, 100] {
        fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let v = bk(&["verify", copy.to_str().unwrap()]);
        assert_eq!(v.code, 4, "cut at {cut}: {}", v.stderr);
        assert!(v.stderr.contains("truncated"), "cut at {cut}: {}", v.stderr);
        let i = bk(&["inspect", copy.to_str().unwrap()]);
        assert_eq!(i.code, 4, "inspect of a truncated bundle fails too");
        fs::copy(demo_bundle(), &copy).unwrap();
    }
}

#[test]
fn a_newer_format_is_refused_clearly() {
    let d = tempfile::tempdir().unwrap();
    let x = d.path().join("x");
    fs::create_dir(&x).unwrap();
    sh(&format!(
        "tar -xf {b} -C {x} && cd {x} && sed -i 's/^format = 1$/format = 99/' bundle.toml && tar --format=ustar -cf {out} *",
        b = demo_bundle().display(),
        x = x.display(),
        out = d.path().join("new.bkb").display()
    ));
    for cmd in ["verify", "inspect"] {
        let v = bk(&[cmd, d.path().join("new.bkb").to_str().unwrap()]);
        assert_eq!(v.code, 5, "{cmd}: {}", v.stderr);
        assert!(
            v.stderr
                .contains("bundle format 99 is newer than this bkbundle supports"),
            "{cmd}: {}",
            v.stderr
        );
        assert!(
            v.stderr.contains("hint: use the bkbundle that came inside the bundle"),
            "{}",
            v.stderr
        );
    }
}

#[test]
fn signed_bundles_verify_with_stock_minisign_and_a_trusted_key() {
    ensure_demo_images();
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    sh(&format!(
        "minisign -G -W -p {} -s {} && minisign -G -W -p {} -s {}",
        p("k.pub"),
        p("k.key"),
        p("o.pub"),
        p("o.key")
    ));
    let r = bk(&[
        "pack",
        demo_dir().join("recipe.toml").to_str().unwrap(),
        "-o",
        &p("s.bkb"),
        "--sign",
        &p("k.key"),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("signed by key"), "{}", r.stdout);
    // The stock minisign verifies the manifest after plain extraction.
    sh(&format!(
        "mkdir {x} && tar -xf {b} -C {x} && cd {x} && minisign -V -p {k} -m bundle.toml",
        x = p("x"),
        b = p("s.bkb"),
        k = p("k.pub")
    ));
    let ok = bk(&["verify", &p("s.bkb"), "--require-signature", "--key", &p("k.pub")]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(
        ok.stdout.contains("signature verified with trusted key"),
        "{}",
        ok.stdout
    );
    let other = bk(&["verify", &p("s.bkb"), "--require-signature", "--key", &p("o.pub")]);
    assert_eq!(other.code, 4, "{}", other.stderr);
    // Another signer is not damage: the message names both keys (issue 11).
    assert!(
        other.stderr.contains("signed by key") && other.stderr.contains("not the key"),
        "{}",
        other.stderr
    );
    let unsigned = bk(&[
        "verify",
        demo_bundle().to_str().unwrap(),
        "--require-signature",
        "--key",
        &p("k.pub"),
    ]);
    assert_eq!(unsigned.code, 4);
    assert!(unsigned.stderr.contains("not signed"), "{}", unsigned.stderr);
    let nokey = bk(&["verify", &p("s.bkb"), "--require-signature"]);
    assert_eq!(nokey.code, 2, "clap refuses --require-signature without --key");
}

#[test]
fn a_missing_image_is_named_and_nothing_is_written() {
    ensure_demo_images();
    let d = tempfile::tempdir().unwrap();
    let r = recipe(
        d.path(),
        "[[images]]\nref = \"bkbundle-demo/absent:9\"\npull = false\n",
        "",
    );
    let out = d.path().join("o.bkb");
    let v = bk(&["pack", r.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(v.code, 3, "{}", v.stderr);
    assert!(
        v.stderr
            .contains("image bkbundle-demo/absent:9 is not in the local Docker engine"),
        "{}",
        v.stderr
    );
    assert_eq!(
        fs::read_dir(d.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name() != "stack")
            .count(),
        1,
        "only the recipe (and its stack): no bundle, no partial file"
    );
}

#[test]
fn a_missing_package_file_is_named() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("packages/nope.zip");
    let r = recipe(d.path(), "", &controller(&missing));
    let v = bk(&[
        "pack",
        r.to_str().unwrap(),
        "-o",
        d.path().join("o.bkb").to_str().unwrap(),
    ]);
    assert_eq!(v.code, 3, "{}", v.stderr);
    assert!(
        v.stderr
            .contains(&format!("package {}: file not found", missing.display())),
        "{}",
        v.stderr
    );
    assert!(!d.path().join("o.bkb").exists());
}

#[test]
fn a_malformed_recipe_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.toml");
    fs::write(
        &p,
        "format = 1\n[bundle]\nname = \"x\"\nversion = \"1\"\ncolour = \"red\"\n",
    )
    .unwrap();
    let v = bk(&["pack", p.to_str().unwrap(), "-o", d.path().join("o").to_str().unwrap()]);
    assert_eq!(v.code, 3, "{}", v.stderr);
    assert!(
        v.stderr.contains("bad.toml") && v.stderr.contains("line 5") && v.stderr.contains("colour"),
        "{}",
        v.stderr
    );
    fs::write(&p, "format = 1\n[bundle\nname = \"x\"\n").unwrap();
    let v = bk(&["pack", p.to_str().unwrap(), "-o", d.path().join("o").to_str().unwrap()]);
    assert_eq!(v.code, 3);
    assert!(
        v.stderr.contains("bad.toml") && v.stderr.contains("line 2"),
        "{}",
        v.stderr
    );
    fs::write(&p, "format = 2\n").unwrap();
    let v = bk(&["pack", p.to_str().unwrap(), "-o", d.path().join("o").to_str().unwrap()]);
    assert_eq!(v.code, 5);
    assert!(v.stderr.contains("recipe format 2 is newer"), "{}", v.stderr);
}

/// Write an archive with Python's zipfile/tarfile (independent of the code under test).
fn python(script: &str) {
    let r = run(Command::new("python3").args(["-c", script]));
    assert_eq!(r.code, 0, "python failed: {}", r.stderr);
}

#[test]
fn escaping_or_incomplete_packages_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path().display().to_string();
    python(&format!(
        r##"
import zipfile, tarfile, io
def zipwith(name, entries):
    with zipfile.ZipFile("{dp}/" + name, "w") as z:
        for n, data in entries: z.writestr(n, data)
zipwith("evil.zip", [("install.sh", "#!/bin/sh"), ("sidecar.yml", "x"), ("../evil", "boom")])
zipwith("nosidecar.zip", [("install.sh", "#!/bin/sh")])
def tarwith(name, members):
    with tarfile.open("{dp}/" + name, "w:gz") as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
def f(n, data=b"x"):
    ti = tarfile.TarInfo(n); ti.size = len(data); return (ti, data)
def link(n, target):
    ti = tarfile.TarInfo(n); ti.type = tarfile.SYMTYPE; ti.linkname = target; return (ti, None)
tarwith("abs.tar.gz", [f("install.sh"), f("sidecar.yml"), f("/etc/cron.d/evil")])
tarwith("link.tar.gz", [f("install.sh"), f("sidecar.yml"), link("bin/x", "../../etc/passwd")])
"##
    ));
    for (file, needle) in [
        ("evil.zip", "\"../evil\" escapes the package root"),
        ("abs.tar.gz", "\"/etc/cron.d/evil\" is an absolute path"),
        ("link.tar.gz", "symlink \"bin/x\" points outside the package"),
        ("nosidecar.zip", "must contain sidecar.yml"),
    ] {
        let pkg = d.path().join(file);
        let sub = d.path().join(file.replace('.', "_"));
        fs::create_dir(&sub).unwrap();
        let r = recipe(&sub, "", &controller(&pkg));
        let out = sub.join("o.bkb");
        let v = bk(&["pack", r.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert_eq!(v.code, 3, "{file}: {}", v.stderr);
        assert!(
            v.stderr.contains(&format!("package {}", pkg.display())) && v.stderr.contains(needle),
            "{file}: {}",
            v.stderr
        );
        assert!(!out.exists());
    }
}

#[test]
fn a_full_disk_leaves_no_bundle_under_the_final_name() {
    ensure_demo_images();
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("small");
    fs::create_dir(&mnt).unwrap();
    sh(&format!("mount -t tmpfs -o size=8m tmpfs {}", mnt.display()));
    let out = mnt.join("demo.bkb");
    let v = bk(&[
        "pack",
        demo_dir().join("recipe.toml").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let left: Vec<String> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    sh(&format!("umount {}", mnt.display()));
    assert_eq!(v.code, 7, "{}", v.stderr);
    assert!(
        v.stderr.contains("No space left on device") && v.stderr.contains("hint: the file system holding"),
        "{}",
        v.stderr
    );
    assert!(left.is_empty(), "nothing may be left behind: {left:?}");
}

#[test]
fn images_from_docker_save_and_oci_archives() {
    ensure_demo_images();
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).display().to_string();
    sh(&format!("docker save -o {} bkbundle-demo/web:1", p("web.tar")));
    sh(&format!(
        "skopeo copy --quiet docker-daemon:bkbundle-demo/app:1 oci-archive:{}:bkbundle-demo/app:1",
        p("app-oci.tar")
    ));
    let images = format!(
        "[[images]]\nref = \"bkbundle-demo/web:1\"\narchive = \"{}\"\n[[images]]\nref = \"bkbundle-demo/app:1\"\narchive = \"{}\"\n",
        p("web.tar"),
        p("app-oci.tar")
    );
    let r = recipe(d.path(), &images, "");
    let v = bk(&["pack", r.to_str().unwrap(), "-o", &p("a.bkb")]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert_eq!(bk(&["verify", &p("a.bkb")]).code, 0);
    let j = json(&bk(&["--json", "inspect", &p("a.bkb")]));
    let imgs = j["images"].as_array().unwrap();
    assert_eq!(imgs.len(), 2);
    // The docker-save image keeps the engine's id; the OCI copy's layers are the same content,
    // so the base layer is still shared and stored once.
    let web_id = run(Command::new("docker").args(["image", "inspect", "-f", "{{.Id}}", "bkbundle-demo/web:1"])).stdout;
    assert_eq!(imgs[0]["id"].as_str().unwrap(), web_id.trim());
    assert_eq!(imgs[1]["shared_layers"], 1, "{}", j);
}

#[test]
fn an_absent_image_is_pulled_through_the_engine_from_a_registry() {
    let _g = docker_lock();
    ensure_demo_images();
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = d.path().join("registry.yml");
    fs::write(
        &cfg,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            d.path().join("data").display()
        ),
    )
    .unwrap();
    let bin = ["/usr/bin/docker-registry", "/usr/bin/registry"]
        .into_iter()
        .find(|b| Path::new(b).exists())
        .unwrap_or_else(|| {
            panic!("docker-registry is not installed: run scripts/setup.sh (apt-get install docker-registry)")
        });
    let mut reg = Command::new(bin)
        .args(["serve", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let reference = format!("127.0.0.1:{port}/bkbundle-demo/pulled:1");
    let pushed = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(200));
        run(Command::new("bash").args(["-c", &format!("docker tag bkbundle-demo/app:1 {reference} && docker push {reference} >/dev/null && docker rmi {reference} >/dev/null")])).code == 0
    });
    let r = recipe(d.path(), &format!("[[images]]\nref = \"{reference}\"\n"), "");
    let v = bk(&[
        "pack",
        r.to_str().unwrap(),
        "-o",
        d.path().join("p.bkb").to_str().unwrap(),
    ]);
    let present = run(Command::new("docker").args(["image", "inspect", &reference])).code == 0;
    let _ = run(Command::new("docker").args(["rmi", &reference]));
    let _ = reg.kill();
    let _ = reg.wait();
    assert!(pushed, "could not push to the local registry on port {port}");
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert!(v.stderr.contains(&format!("pulling image {reference}")), "{}", v.stderr);
    assert!(present, "the image was pulled into the engine");
}

#[test]
fn an_unreachable_registry_fails_once_and_names_every_image() {
    let d = tempfile::tempdir().unwrap();
    let port = free_port(); // nothing listens there
    let images = format!("[[images]]\nref = \"127.0.0.1:{port}/a:1\"\n[[images]]\nref = \"127.0.0.1:{port}/b:1\"\n");
    let r = recipe(d.path(), &images, "");
    let v = bk(&[
        "pack",
        r.to_str().unwrap(),
        "-o",
        d.path().join("o.bkb").to_str().unwrap(),
    ]);
    assert_eq!(v.code, 6, "{}", v.stderr);
    assert!(
        v.stderr.contains(&format!(
            "image 127.0.0.1:{port}/a:1 is not in the local Docker engine and pulling it failed"
        )),
        "{}",
        v.stderr
    );
    assert!(v.stderr.contains(&format!("image 127.0.0.1:{port}/b:1 is not in the local Docker engine (not pulled: pulling 127.0.0.1:{port}/a:1 already failed)")), "{}", v.stderr);
    assert!(!d.path().join("o.bkb").exists());
}

// ---------------------------------------------------------------------------------------------
// Issue 12: packages and installers taken from an image's layers.

/// The test image's first layer: path, content, mode.
const FC_FILES: &[(&str, &str, u32)] = &[
    ("opt/fusion-collectors/bin/telegraf", "telegraf v1\n", 0o755),
    ("opt/fusion-collectors/bin/vector", "vector\n", 0o755),
    ("opt/fusion-collectors/bin/nats-executor", "nats-executor\n", 0o755),
    ("opt/fusion-collectors/collector-sidecar", "sidecar\n", 0o755),
    ("opt/fusion-collectors/sidecar.yml", "the container's\n", 0o644),
    ("opt/fusion-collectors/stale.txt", "deleted by layer 2\n", 0o644),
    ("opt/fusion-collectors/misc/VERSION", "1.0.1\n", 0o644),
    (
        "opt/fusion-collectors/misc/linux/install.sh",
        "#!/bin/sh\necho install\n",
        0o755,
    ),
    ("opt/fusion-collectors/misc/linux/uninstall.sh", "#!/bin/sh\n", 0o755),
    (
        "opt/fusion-collectors/misc/linux/sidecar.yml",
        "server_url: __SERVER__URL__\n",
        0o640,
    ),
    (
        "opt/fusion-collectors/misc/olddir/x",
        "deleted with its directory\n",
        0o644,
    ),
    (
        "opt/release/linux/fusion-collectors/bklite-controller-installer",
        "#!/bin/sh\necho installer\n",
        0o755,
    ),
    (
        "opt/release/windows/fusion-collectors/bklite-controller-installer.exe",
        "MZ installer\n",
        0o644,
    ),
    (
        "opt/release/windows/fusion-collectors/install.ps1",
        "Write-Host install\n",
        0o644,
    ),
    (
        "opt/release/windows/fusion-collectors/sidecar.yml",
        "server_url: x\n",
        0o644,
    ),
    (
        "opt/release/windows/fusion-collectors/bin/telegraf.exe",
        "exe1\n",
        0o644,
    ),
    (
        "opt/release/windows/fusion-collectors/bin/nats-executor.exe",
        "gone in layer 2\n",
        0o644,
    ),
    ("opt/empty/bklite-controller-installer", "", 0o755),
    ("opt/bad/fusion-collectors/sidecar.yml", "x\n", 0o644),
    ("opt/bad/fusion-collectors/bin/telegraf", "t\n", 0o755),
    ("opt/nosidecar/fusion-collectors/install.sh", "#!/bin/sh\n", 0o755),
    ("opt/linky/fusion-collectors/install.sh", "#!/bin/sh\n", 0o755),
    ("opt/linky/fusion-collectors/sidecar.yml", "x\n", 0o644),
];

/// The second layer overrides a file, deletes a file and a directory, adds symlinks (one that
/// leaves its tree) and recreates a directory with one of its files.
const FC_DOCKERFILE: &str = "FROM bkbundle-demo/base:1\nCOPY opt /opt\n\
     RUN rm /opt/fusion-collectors/stale.txt && rm -r /opt/fusion-collectors/misc/olddir \
     && echo 'telegraf v2' > /opt/fusion-collectors/bin/telegraf \
     && ln -s telegraf /opt/fusion-collectors/bin/telegraf-link \
     && mkdir -p /opt/linky/fusion-collectors/bin && ln -s /etc/passwd /opt/linky/fusion-collectors/bin/x \
     && rm -r /opt/release/windows/fusion-collectors/bin && mkdir /opt/release/windows/fusion-collectors/bin \
     && echo exe2 > /opt/release/windows/fusion-collectors/bin/telegraf.exe\n";

/// The test image: `bkbundle-demo/base:1` plus two layers, built once per test process with the
/// classic builder (offline). The first layer (COPY) lays out upstream's paths; the second (RUN)
/// overrides a file, deletes a file and a directory, and replaces a directory with a new one, so
/// that whiteouts and layer order decide what pack reads. Returns (reference, build context).
pub(crate) fn fc_image() -> &'static (String, PathBuf) {
    static IMG: OnceLock<(String, PathBuf, tempfile::TempDir)> = OnceLock::new();
    let (r, c, _) = IMG.get_or_init(|| {
        ensure_demo_images();
        let ctx = tempfile::tempdir().unwrap();
        for (path, content, mode) in FC_FILES {
            use std::os::unix::fs::PermissionsExt;
            let p = ctx.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, content).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
        }
        fs::write(ctx.path().join("Dockerfile"), FC_DOCKERFILE).unwrap();
        let reference = "bkbundle-test/fusion-collector:1".to_string();
        sh(&format!(
            "DOCKER_BUILDKIT=0 docker build -q -t {reference} {} >/dev/null",
            ctx.path().display()
        ));
        (reference, ctx.path().to_path_buf(), ctx)
    });
    // The tuple without the guard: the context lives as long as the process.
    static VIEW: OnceLock<(String, PathBuf)> = OnceLock::new();
    VIEW.get_or_init(|| (r.clone(), c.clone()))
}

/// The BK-Lite shape of a recipe's image-sourced artifacts, for image `img`.
pub(crate) fn image_artifacts(img: &str) -> String {
    format!(
        r#"
[[packages]]
type = "controller"
os = "linux"
arch = "x86_64"
object = "Controller"
version = "1.0.1"
image = "{img}"
name = "fusion-collectors-linux-amd64.zip"
tree = [
  {{ from = "/opt/fusion-collectors", to = "", exclude = ["misc"] }},
  {{ from = "/opt/fusion-collectors/misc/linux", to = "" }},
  {{ from = "/opt/fusion-collectors/misc/VERSION", to = "VERSION" }},
]

[[packages]]
type = "collector"
os = "linux"
arch = "x86_64"
object = "Telegraf"
version = "latest"
from = "fusion-collectors-linux-amd64.zip"
entry = "bin/telegraf"

[[packages]]
type = "controller"
os = "windows"
arch = "x86_64"
object = "Controller"
version = "1.0.1"
image = "{img}"
name = "fusion-collectors-windows-amd64.zip"
tree = [
  {{ from = "/opt/release/windows/fusion-collectors", to = "", exclude = ["bklite-controller-installer.exe"] }},
  {{ from = "/opt/fusion-collectors/misc/VERSION", to = "VERSION" }},
]

[[packages]]
type = "collector"
os = "windows"
arch = "x86_64"
object = "Telegraf"
version = "latest"
from = "fusion-collectors-windows-amd64.zip"
entry = "bin/telegraf.exe"

[[installers]]
os = "linux"
arch = "amd64"
image = "{img}"
path = "/opt/release/linux/fusion-collectors/bklite-controller-installer"

[[installers]]
os = "windows"
arch = "x86_64"
image = "{img}"
path = "/opt/release/windows/fusion-collectors/bklite-controller-installer.exe"
"#
    )
}

/// Every entry of a zip as Python's zipfile sees it: name -> (unix mode, size, sha256, text).
fn zip_entries(zip: &Path) -> serde_json::Value {
    let r = run(Command::new("python3").args([
        "-c",
        r#"
import hashlib, json, sys, zipfile
out = {}
with zipfile.ZipFile(sys.argv[1]) as z:
    assert z.testzip() is None
    for i in z.infolist():
        data = z.read(i)
        out[i.filename] = [(i.external_attr >> 16) & 0o7777, len(data), hashlib.sha256(data).hexdigest(),
                           data.decode("utf-8", "replace") if len(data) < 200 else "", list(i.date_time)]
print(json.dumps(out))
"#,
        zip.to_str().unwrap(),
    ]));
    assert_eq!(r.code, 0, "python zipfile: {}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

/// sha256sum's digest of a file.
pub(crate) fn sha256sum(p: &Path) -> String {
    let r = sh(&format!("sha256sum {}", p.display()));
    r.stdout.split_whitespace().next().unwrap().to_string()
}

/// What a pack left in `dir` besides the recipe and its stack.
pub(crate) fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n != "stack" && n != "recipe.toml")
        .collect()
}

/// The archives built from the test image: upstream's layout, layer 2's changes applied, modes
/// kept, entries sorted.
fn check_archives(x: &Path) {
    // The linux archive: upstream's layout, layer 2's changes applied, modes kept.
    let z = zip_entries(&x.join("packages/fusion-collectors-linux-amd64.zip"));
    let names: Vec<&String> = z.as_object().unwrap().keys().collect();
    assert!(names.iter().all(|n| n.starts_with("fusion-collectors/")), "{names:?}");
    for gone in ["stale.txt", "misc/", "misc/olddir/x", "misc/VERSION"] {
        assert!(
            z.get(format!("fusion-collectors/{gone}")).is_none(),
            "{gone} must not be there: {names:?}"
        );
    }
    let e = |n: &str| {
        z.get(format!("fusion-collectors/{n}"))
            .unwrap_or_else(|| panic!("{n} missing: {names:?}"))
    };
    assert_eq!(e("bin/telegraf")[3], "telegraf v2\n", "the upper layer wins");
    assert_eq!(
        e("bin/telegraf-link")[3],
        "telegraf v2\n",
        "a symlink inside the tree is followed"
    );
    assert_eq!(e("bin/telegraf")[0], 0o755);
    assert_eq!(e("install.sh")[0], 0o755);
    assert_eq!(
        e("sidecar.yml")[3],
        "server_url: __SERVER__URL__\n",
        "the later rule wins"
    );
    assert_eq!(e("sidecar.yml")[0], 0o640);
    assert_eq!(e("VERSION")[3], "1.0.1\n");
    assert_eq!(e("bin/")[0], 0o755);
    let sorted = {
        let mut s = names.clone();
        s.sort();
        s
    };
    assert_eq!(names, sorted, "entries are sorted");

    // The windows archive: the directory layer 2 recreated holds only what it put there.
    let w = zip_entries(&x.join("packages/fusion-collectors-windows-amd64.zip"));
    assert_eq!(w["fusion-collectors/bin/telegraf.exe"][3], "exe2\n");
    assert!(w.get("fusion-collectors/bin/nats-executor.exe").is_none(), "{w}");
    assert!(
        w.get("fusion-collectors/bklite-controller-installer.exe").is_none(),
        "{w}"
    );
}

/// The manifest's sizes and digests are those of the files, and the installers are the image's.
fn check_manifest(x: &Path, img: &str, ctx: &Path) {
    let z = zip_entries(&x.join("packages/fusion-collectors-linux-amd64.zip"));
    let telegraf = z["fusion-collectors/bin/telegraf"][2].as_str().unwrap().to_string();
    let m = bkbundle::manifest::Manifest::parse(&fs::read_to_string(x.join("bundle.toml")).unwrap(), "bundle.toml")
        .unwrap();
    for p in m.packages.iter().filter(|p| p.file.is_some()) {
        let f = x.join(p.file.as_ref().unwrap());
        assert_eq!(p.sha256.as_deref(), Some(sha256sum(&f).as_str()), "{}", p.name);
        assert_eq!(p.size, Some(fs::metadata(&f).unwrap().len()), "{}", p.name);
    }
    assert_eq!(m.provenance.len(), 2);
    assert_eq!(m.provenance[0].image, img);
    assert!(m.provenance[0].image_id.starts_with("sha256:"));
    let collector = m
        .packages
        .iter()
        .find(|p| p.object == "Telegraf" && p.os.as_str() == "linux")
        .unwrap();
    assert_eq!(collector.sha256.as_deref(), Some(telegraf.as_str()));
    assert_eq!(m.installers.len(), 3);
    for i in &m.installers[..2] {
        let f = x.join(&i.file);
        assert_eq!(i.sha256, sha256sum(&f), "{}", i.name);
        assert_eq!(i.size, fs::metadata(&f).unwrap().len());
        let in_ctx = ctx.join(i.path.as_ref().unwrap().trim_start_matches('/'));
        assert_eq!(i.sha256, sha256sum(&in_ctx), "{} is the image's file", i.name);
        assert_eq!(i.image.as_deref(), Some(img));
    }
    assert_eq!(
        m.installers[0].file,
        "installers/linux/x86_64/bklite-controller-installer"
    );
    let from_file = &m.installers[2];
    assert_eq!(from_file.file, "installers/linux/generic/bklite-controller-installer");
    assert_eq!(from_file.sha256, m.installers[0].sha256);
    assert!(from_file.image.is_none() && from_file.path.is_none());
}

#[test]
fn packages_and_installers_are_taken_from_an_image_in_one_pass() {
    let (img, ctx) = fc_image();
    let d = tempfile::tempdir().unwrap();
    // A third installer given as a file keeps working beside those from the image.
    let file_installer = format!(
        "[[installers]]\nos = \"linux\"\narch = \"generic\"\nfile = \"{}\"\n",
        ctx.join("opt/release/linux/fusion-collectors/bklite-controller-installer")
            .display()
    );
    let r = recipe(d.path(), "", &(image_artifacts(img) + &file_installer));
    let out = d.path().join("fc.bkb");
    let v = bk(&["--json", "pack", r.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    let j = json(&v);
    assert_eq!(j["installers"], 3, "{j}");
    assert_eq!(leftovers(d.path()), ["fc.bkb"], "the staging directory is gone");

    // One image, six artifacts, one export: every layer read once, and nothing but its layers.
    let reads = j["image_reads"].as_array().unwrap();
    assert_eq!(reads.len(), 1, "{j}");
    let layers = run(Command::new("docker").args(["image", "inspect", "-f", "{{len .RootFS.Layers}}", img]));
    assert_eq!(reads[0]["layers_read"].to_string(), layers.stdout.trim(), "{j}");
    assert_eq!(reads[0]["bytes_read"], reads[0]["image_bytes"], "{j}");
    assert_eq!(reads[0]["artifacts"], 4, "{j}");
    eprintln!(
        "layer bytes read {} of the image's {}",
        reads[0]["bytes_read"], reads[0]["image_bytes"]
    );

    assert_eq!(bk(&["verify", out.to_str().unwrap()]).code, 0);
    let x = d.path().join("x");
    fs::create_dir(&x).unwrap();
    sh(&format!("tar -xf {} -C {}", out.display(), x.display()));

    check_archives(&x);

    check_manifest(&x, img, ctx);

    // inspect and verify show them; the same image packs to the same archive bytes.
    let i = json(&bk(&["--json", "inspect", out.to_str().unwrap()]));
    assert_eq!(i["installers"][1]["name"], "bklite-controller-installer.exe", "{i}");
    let vr = bk(&["verify", out.to_str().unwrap()]);
    assert!(vr.stdout.contains("bklite-controller-installer.exe"), "{}", vr.stdout);
    let again = d.path().join("again.bkb");
    assert_eq!(
        bk(&["pack", r.to_str().unwrap(), "-o", again.to_str().unwrap()]).code,
        0
    );
    let y = d.path().join("y");
    fs::create_dir(&y).unwrap();
    sh(&format!("tar -xf {} -C {}", again.display(), y.display()));
    let zip = "packages/fusion-collectors-linux-amd64.zip";
    assert_eq!(
        sha256sum(&x.join(zip)),
        sha256sum(&y.join(zip)),
        "deterministic archives"
    );
}

/// One bad input per case: what it is, the recipe's artifacts, what the message must name.
fn bad_cases(img: &str) -> Vec<(&'static str, String, Vec<String>)> {
    let installer = |os: &str, path: &str| {
        format!("[[installers]]\nos = \"{os}\"\narch = \"x86_64\"\nimage = \"{img}\"\npath = \"{path}\"\n")
    };
    let package = |os: &str, name: &str, tree: &str, extra: &str| {
        format!(
            "[[packages]]\ntype = \"controller\"\nos = \"{os}\"\narch = \"x86_64\"\nobject = \"Controller\"\nversion = \"1\"\nimage = \"{img}\"\nname = \"{name}\"\ntree = [{tree}]\n{extra}"
        )
    };
    vec![
        (
            "missing path",
            installer("linux", "/opt/release/linux/nope/bklite-controller-installer"),
            vec![
                format!("image {img}: /opt/release/linux/nope/bklite-controller-installer not found"),
                "installer linux/x86_64 bklite-controller-installer".into(),
            ],
        ),
        (
            "empty file",
            installer("linux", "/opt/empty/bklite-controller-installer"),
            vec![format!("image {img}: /opt/empty/bklite-controller-installer is empty (needed by installer linux/x86_64 bklite-controller-installer)")],
        ),
        (
            "no install.sh",
            package("linux", "l.zip", "{ from = \"/opt/bad/fusion-collectors\" }", ""),
            vec![format!("image {img}: package l.zip (controller linux/x86_64): its tree (/opt/bad/fusion-collectors) has no install.sh")],
        ),
        (
            "no sidecar.yml",
            package("linux", "s.zip", "{ from = \"/opt/nosidecar/fusion-collectors\" }", ""),
            vec![format!("image {img}: package s.zip (controller linux/x86_64): its tree (/opt/nosidecar/fusion-collectors) has no sidecar.yml")],
        ),
        (
            "windows without exe",
            package("windows", "w.zip", "{ from = \"/opt/release/windows/fusion-collectors\", exclude = [\"bin\"] }", ""),
            vec![format!("image {img}: package w.zip (controller windows/x86_64): its tree (/opt/release/windows/fusion-collectors) has no bin/*.exe")],
        ),
        (
            "windows collector exe missing",
            package(
                "windows",
                "w.zip",
                "{ from = \"/opt/release/windows/fusion-collectors\" }",
                "[[packages]]\ntype = \"collector\"\nos = \"windows\"\narch = \"x86_64\"\nobject = \"NATS-Executor\"\nversion = \"latest\"\nfrom = \"w.zip\"\nentry = \"bin/nats-executor.exe\"\n",
            ),
            vec![format!("image {img}: package w.zip (controller windows/x86_64) has no bin/nats-executor.exe, which collector NATS-Executor windows/x86_64 names")],
        ),
        (
            "symlink out of the tree",
            package("linux", "k.zip", "{ from = \"/opt/linky/fusion-collectors\" }", ""),
            vec![format!("image {img}: /opt/linky/fusion-collectors/bin/x is a symlink to \"/etc/passwd\", which is outside /opt/linky/fusion-collectors (needed by package k.zip (controller linux/x86_64))")],
        ),
        (
            "installer name",
            installer("linux", "/opt/release/windows/fusion-collectors/bklite-controller-installer.exe"),
            vec![
                "installers[0] (installer linux/x86_64 bklite-controller-installer.exe, /opt/release/windows/fusion-collectors/bklite-controller-installer.exe in image".into(),
                img.to_string(),
                "a linux installer must be named \"bklite-controller-installer\", found \"bklite-controller-installer.exe\"".into(),
            ],
        ),
        (
            "empty installer file",
            format!(
                "[[installers]]\nos = \"linux\"\narch = \"x86_64\"\nfile = \"{}\"\n",
                fc_image().1.join("opt/empty/bklite-controller-installer").display()
            ),
            vec![format!(
                "installer linux/x86_64 bklite-controller-installer: file {} is empty",
                fc_image().1.join("opt/empty/bklite-controller-installer").display()
            )],
        ),
        (
            "image absent",
            installer("linux", "/opt/release/linux/fusion-collectors/bklite-controller-installer")
                .replace(img, "bkbundle-test/absent:1"),
            vec!["image bkbundle-test/absent:1 is not in the local Docker engine".into(), "needed by installer linux/x86_64 bklite-controller-installer".into()],
        ),
    ]
}

#[test]
fn bad_image_artifacts_are_refused_before_anything_is_written() {
    let (img, _) = fc_image();
    for (what, artifacts, needles) in bad_cases(img) {
        let d = tempfile::tempdir().unwrap();
        let r = recipe(d.path(), "", &artifacts);
        let out = d.path().join("o.bkb");
        let v = bk(&["pack", r.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert_eq!(v.code, 3, "{what}: {}", v.stderr);
        for n in &needles {
            assert!(
                v.stderr.contains(n.as_str()),
                "{what}: expected {n:?} in:\n{}",
                v.stderr
            );
        }
        assert!(v.stderr.contains("hint: "), "{what}: {}", v.stderr);
        assert_eq!(
            leftovers(d.path()),
            Vec::<String>::new(),
            "{what}: nothing may be left behind"
        );
    }
}

#[test]
fn an_oci_archive_with_compressed_layers_gives_the_same_artifacts() {
    let (img, _) = fc_image();
    let d = tempfile::tempdir().unwrap();
    let archive = d.path().join("fc-oci.tar");
    sh(&format!(
        "skopeo copy --quiet docker-daemon:{img} oci-archive:{}:{img}",
        archive.display()
    ));
    let from_archive = image_artifacts(img).replace(
        &format!("image = \"{img}\"\n"),
        &format!("image = \"{img}\"\nimage_archive = \"{}\"\n", archive.display()),
    );
    let sub = d.path().join("a");
    fs::create_dir(&sub).unwrap();
    let r = recipe(&sub, "", &from_archive);
    let out = sub.join("a.bkb");
    let v = bk(&["--json", "pack", r.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert_eq!(json(&v)["image_reads"][0]["layers_read"], 3, "{}", v.stdout);
    let sub2 = d.path().join("e");
    fs::create_dir(&sub2).unwrap();
    let r2 = recipe(&sub2, "", &image_artifacts(img));
    let out2 = sub2.join("e.bkb");
    assert_eq!(
        bk(&["pack", r2.to_str().unwrap(), "-o", out2.to_str().unwrap()]).code,
        0
    );
    let m = |b: &Path| {
        let x = b.with_extension("x");
        fs::create_dir(&x).unwrap();
        sh(&format!("tar -xf {} -C {}", b.display(), x.display()));
        bkbundle::manifest::Manifest::parse(&fs::read_to_string(x.join("bundle.toml")).unwrap(), "b").unwrap()
    };
    let (a, e) = (m(&out), m(&out2));
    let digests = |m: &bkbundle::manifest::Manifest| {
        let mut v: Vec<Option<String>> = m.packages.iter().map(|p| p.sha256.clone()).collect();
        v.extend(m.installers.iter().map(|i| Some(i.sha256.clone())));
        v
    };
    assert_eq!(
        digests(&a),
        digests(&e),
        "the archive's layers (gzip, OCI) give the engine's bytes"
    );
}

/// Issue 13: the `bin/bkbundle` a bundle carries starts on the field's hosts. Read from the
/// packed bundle itself: no glibc symbol version above 2.17 (binutils' `readelf` reads the same
/// file independently), and it runs in a container with no libc at all (the demo's busybox base)
/// where its name lookups still work (/etc/hosts of the container; `.invalid` fails cleanly).
#[test]
fn the_carried_binary_needs_no_glibc_above_2_17_and_runs_where_there_is_no_libc() {
    let bundle = demo_bundle();
    let dir = tempfile::tempdir().unwrap();
    sh(&format!(
        "tar -xf {} -C {} bin/bkbundle",
        bundle.display(),
        dir.path().display()
    ));
    let bin = dir.path().join("bin/bkbundle");
    let needs = bkbundle::portable::read_needs(&bin).unwrap();
    assert!(needs.portable(), "{needs:?}");
    assert!(
        needs.newest_glibc().is_none_or(|v| v <= (2, 17)),
        "needs {:?}",
        needs.newest_glibc()
    );
    let readelf = sh(&format!("readelf -V -W -l {}", bin.display()));
    let above: Vec<&str> = readelf
        .stdout
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter(|w| {
            w.strip_prefix("GLIBC_")
                .and_then(|v| v.split_once('.'))
                .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.split('.').next()?.parse::<u32>().ok()?)))
                .is_some_and(|v| v > (2, 17))
        })
        .collect();
    assert!(above.is_empty(), "readelf lists {above:?}");
    assert!(
        !readelf.stdout.contains("Requesting program interpreter"),
        "{}",
        readelf.stdout
    );

    // Busybox only: no /lib, no libc, no NSS modules.
    let _g = docker_lock();
    let run_in_busybox = |args: &str| {
        run(Command::new("docker")
            .args(["run", "--rm", "--network", "none", "-v"])
            .arg(format!("{}:/bkbundle:ro", bin.display()))
            .args(["bkbundle-demo/base:1", "sh", "-c", args]))
    };
    let v = run_in_busybox("ls /lib /lib64 /usr/lib 2>&1; /bkbundle --version");
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    assert!(
        v.stdout.contains(&format!("bkbundle {}", env!("CARGO_PKG_VERSION"))),
        "{}",
        v.stdout
    );
    assert!(
        !v.stdout.contains("libc.so"),
        "the container was meant to have no libc: {}",
        v.stdout
    );
    // doctor's NATS probe resolves names the static way: localhost from the container's
    // /etc/hosts (nothing listens: TCP refused), a `.invalid` name not at all.
    let local = run_in_busybox(
        "/bkbundle --json doctor --nats-url nats://localhost:1 --database-url postgres://u:p@127.0.0.1:1/x; true",
    );
    assert!(local.stdout.contains("(TCP)"), "{}{}", local.stdout, local.stderr);
    let invalid = run_in_busybox("/bkbundle --json doctor --nats-url nats://nats.bkbundle.invalid:4222 --database-url postgres://u:p@127.0.0.1:1/x; true");
    assert!(
        invalid.stdout.contains("(name resolution)"),
        "{}{}",
        invalid.stdout,
        invalid.stderr
    );
}

/// A binary that would not start on CentOS 7 is refused before anything is written, naming the
/// glibc it needs and what to do.
#[test]
fn pack_refuses_to_carry_a_binary_that_needs_a_newer_glibc() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "", "");
    let out = dir.path().join("x.bkb");
    let run = bk(&[
        "--json",
        "pack",
        r.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--binary",
        "/bin/ls",
    ]);
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    let e: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("/bin/ls") && message.contains("needs GLIBC_2."),
        "{message}"
    );
    assert!(message.contains("glibc 2.17"), "{message}");
    assert!(!out.exists());
    let listing: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        listing.iter().all(|n| !n.to_string_lossy().contains("x.bkb")),
        "{listing:?}"
    );
}
