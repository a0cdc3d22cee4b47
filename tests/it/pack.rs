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

fn sh(script: &str) -> Run {
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
fn recipe(dir: &Path, images: &str, packages: &str) -> PathBuf {
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

fn json(r: &Run) -> serde_json::Value {
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
    assert_eq!(images.len(), 4);
    // app, web, postgres and nats share the base layer: each has 2 layers, 1 shared, 5 distinct.
    for img in images {
        assert_eq!(img["layers"], 2, "{img}");
        assert_eq!(img["shared_layers"], 1, "{img}");
        let id =
            run(Command::new("docker").args(["image", "inspect", "-f", "{{.Id}}", img["refs"][0].as_str().unwrap()]));
        assert_eq!(
            id.stdout.trim(),
            img["id"].as_str().unwrap(),
            "image id must be the engine's"
        );
    }
    assert_eq!(j["packages"].as_array().unwrap().len(), 4);
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
    assert_eq!(layers.len(), 5, "shared layer stored once");
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
