//! Issue 11 (hardening): what a hostile bundle, a damaged package directory and a verbose log
//! still broke. Crafted tar headers, signatures checked only against the bundle's own key,
//! misleading messages, secrets in logs, and a bounded fuzz of the bundle reader.

use crate::harness::{bkbundle, free_port, random_alnum, NatsOpts, NatsServer, PgCluster};
use bkbundle::bundle::{BundleReader, BundleWriter};
use bkbundle::manifest::{BundleInfo, Compression, Manifest, Os, Package, PackageType, Stack, FORMAT};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Run `cmd` and wait at most `limit`; a command still running then is killed and the test fails
/// (a hang is never a verdict).
fn run_within(cmd: &mut Command, limit: Duration) -> Run {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bkbundle");
    let t0 = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "{cmd:?} did not finish within {limit:?} (killed)\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collect output");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn bk(args: &[&str]) -> Run {
    run_within(bkbundle().args(args), Duration::from_secs(60))
}

/// A minisign key pair written as `NAME.key` (unencrypted) and `NAME.pub` in `dir`.
fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let (sk, pk) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")));
    fs::write(&sk, kp.sk.to_box(None).unwrap().into_string()).unwrap();
    fs::write(&pk, kp.pk.to_box().unwrap().into_string()).unwrap();
    (sk, pk)
}

/// A small but real bundle written by bkbundle's own writer: a package, two stack files, the
/// manifest, `SHA256SUMS` and, with `sign`, the signature and public key, as `pack` writes them.
/// `edit` may change the manifest before it is written (to make a tampered bundle).
fn small_bundle_with(path: &Path, sign: Option<&Path>, edit: impl FnOnce(&mut Manifest)) -> PathBuf {
    let mut w = BundleWriter::create(path, None, 1_700_000_000).unwrap();
    let pkg = w
        .add_bytes("packages/probe-1.0.0-linux-amd64", 0o644, b"#!/bin/sh\necho probe\n")
        .unwrap();
    w.add_bytes(
        "stack/docker-compose.yml",
        0o644,
        b"services:\n  web:\n    image: bkbundle-demo/web:1\n",
    )
    .unwrap();
    // A path too long for ustar, so that the writer emits a PAX record too.
    let long = format!(
        "stack/conf/{}/{}/{}/app.conf",
        "a".repeat(100),
        "b".repeat(100),
        "c".repeat(60)
    );
    w.add_bytes(&long, 0o644, &[b'x'; 700]).unwrap();
    let mut m = Manifest {
        format: FORMAT,
        bundle: BundleInfo {
            name: "fuzz".into(),
            version: "1".into(),
            description: String::new(),
            created: "2023-11-14T22:13:20Z".into(),
            created_by: "bkbundle test".into(),
            compression: Compression::Zstd,
            without_layers: false,
        },
        base: None,
        files: w.files().to_vec(),
        layers: Vec::new(),
        images: Vec::new(),
        packages: vec![Package {
            file: Some(pkg.path.clone()),
            name: "probe-1.0.0-linux-amd64".into(),
            kind: PackageType::Collector,
            os: Os::Linux,
            arch: "x86_64".into(),
            object: "probe".into(),
            version: "1.0.0".into(),
            description: String::new(),
            from: None,
            entry: None,
            sha256: Some(pkg.sha256.clone()),
            size: Some(pkg.size),
        }],
        installers: Vec::new(),
        provenance: Vec::new(),
        stack: Some(Stack {
            project: "fuzz".into(),
            compose: "stack/docker-compose.yml".into(),
            env_template: None,
            files: vec!["stack/docker-compose.yml".into(), long],
            nats_tls: false,
        }),
        regions: Default::default(),
    };
    edit(&mut m);
    let text = m.to_toml();
    let signature = sign.map(|key| {
        let signer = bkbundle::sign::Signer::load(key).unwrap();
        signer.sign(text.as_bytes(), "timestamp:0\tfile:bundle.toml").unwrap()
    });
    w.add_descriptive(&m, &text, signature.as_ref().map(|(s, p)| (s.as_str(), p.as_str())))
        .unwrap();
    w.commit().unwrap();
    path.to_path_buf()
}

fn small_bundle(path: &Path, sign: Option<&Path>) -> PathBuf {
    small_bundle_with(path, sign, |_| {})
}

/// `data` as `bin/FILE` inside a small valid `.tar.gz`: what a package file named `.tar.gz` must
/// be now that every package is checked as pack checks it (also used by the packages tests).
pub(crate) fn tgz_of(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        t.append_data(&mut h, "bin/FILE", data).unwrap();
        t.into_inner().unwrap().finish().unwrap();
    }
    out
}

/// Set a tar header block's checksum as bkbundle writes it ("NNNNNN\0 ").
fn set_checksum(h: &mut [u8]) {
    h[148..156].fill(b' ');
    let sum: u64 = h[..512].iter().map(|&b| b as u64).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// A header block for `name` with type `typeflag` and the raw 12-byte size field `size`.
fn crafted_header(name: &str, typeflag: u8, size: [u8; 12]) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000755\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(&size);
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    set_checksum(&mut h);
    h
}

/// A base-256 size field holding `v` in its last 8 bytes (and `high` in the bytes before).
fn base256(v: u64, high: u8) -> [u8; 12] {
    let mut f = [0u8; 12];
    f[0] = 0x80;
    f[1..4].fill(high);
    f[4..].copy_from_slice(&v.to_be_bytes());
    f
}

// ---------------------------------------------------------------------------------------------
// Item 1: crafted tar headers end in a verdict

#[test]
fn crafted_tar_headers_are_refused_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let good = fs::read(small_bundle(&dir.path().join("good.bkb"), None)).unwrap();
    let cases: [(&str, u8, [u8; 12]); 5] = [
        ("directory, size 2^64-512", b'5', base256(u64::MAX - 511, 0)),
        ("global PAX, size 2^64-512", b'g', base256(u64::MAX - 511, 0)),
        ("file, size 2^64-1", b'0', base256(u64::MAX, 0)),
        ("directory, size 2^64 (a bit above 64)", b'5', base256(0, 1)),
        ("file, size 2^80 + 10", b'0', base256(10, 1)),
    ];
    for (what, typeflag, size) in cases {
        let p = dir.path().join("crafted.bkb");
        let mut bytes = crafted_header("images/", typeflag, size).to_vec();
        bytes.extend_from_slice(&good);
        fs::write(&p, &bytes).unwrap();
        for cmd in ["verify", "inspect"] {
            let r = run_within(bkbundle().args([cmd, p.to_str().unwrap()]), Duration::from_secs(20));
            assert_eq!(
                r.code, 4,
                "{what}: `{cmd}` must refuse the bundle:\n{}{}",
                r.stdout, r.stderr
            );
            assert!(
                r.stderr.contains("images/") && r.stderr.contains("size"),
                "{what}: `{cmd}` must name the entry and its size field:\n{}",
                r.stderr
            );
        }
        let target = dir.path().join("target");
        let r = run_within(
            bkbundle().args([
                "install",
                p.to_str().unwrap(),
                "--dry-run",
                "--target",
                target.to_str().unwrap(),
            ]),
            Duration::from_secs(20),
        );
        assert_eq!(r.code, 4, "{what}: install must refuse the bundle:\n{}", r.stderr);
        assert!(!target.exists(), "{what}: install created its target");
    }
}

#[test]
fn huge_sizes_in_the_manifest_do_not_overflow_inspect() {
    // The manifest is the attacker's text too: sizes near i64::MAX (TOML's largest integer) that
    // add up past u64. inspect reads it without verifying every byte, so it must not overflow.
    let dir = tempfile::tempdir().unwrap();
    let b = small_bundle_with(&dir.path().join("b.bkb"), None, |m| {
        for f in &mut m.files {
            f.size = i64::MAX as u64;
        }
        for i in 0..3 {
            m.files.push(bkbundle::manifest::FileEntry {
                path: format!("stack/extra{i}"),
                size: i64::MAX as u64,
                sha256: "0".repeat(64),
            });
        }
    });
    let r = bk(&["--json", "inspect", b.to_str().unwrap()]);
    assert!(
        r.code == 0 || r.code == 4,
        "inspect must end in a verdict, exit {}:\n{}",
        r.code,
        r.stderr
    );
    let r = bk(&["verify", b.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("size expected"), "{}", r.stderr);
}

// ---------------------------------------------------------------------------------------------
// Item 4: a key means a signature is required; a self-signed bundle says so loudly

#[test]
fn a_key_alone_requires_a_signature() {
    let dir = tempfile::tempdir().unwrap();
    let (_, trusted_pub) = keypair(dir.path(), "trusted");
    let unsigned = small_bundle(&dir.path().join("unsigned.bkb"), None);
    // Also the attack: the manifest edited and SHA256SUMS regenerated, no signature at all.
    let edited = small_bundle_with(&dir.path().join("edited.bkb"), None, |m| {
        m.bundle.version = "666".into()
    });
    for b in [&unsigned, &edited] {
        for cmd in ["verify", "install"] {
            let mut args = vec![cmd, b.to_str().unwrap(), "--key", trusted_pub.to_str().unwrap()];
            let target = dir.path().join("target");
            if cmd == "install" {
                args.extend(["--dry-run", "--target", target.to_str().unwrap()]);
            }
            let r = bk(&args);
            assert_eq!(
                r.code, 4,
                "`{cmd} --key` must refuse an unsigned bundle:\n{}{}",
                r.stdout, r.stderr
            );
            assert!(
                r.stderr.contains("not signed") && r.stderr.contains("--key"),
                "{}",
                r.stderr
            );
            assert!(!target.exists());
        }
    }
}

#[test]
fn a_bundle_signed_only_by_its_own_key_says_so_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let (attacker_key, _) = keypair(dir.path(), "attacker");
    let b = small_bundle(&dir.path().join("self.bkb"), Some(&attacker_key));
    let r = bk(&["verify", b.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("WARNING") && r.stderr.contains("NOT verified by a trusted key"),
        "a self-signed bundle must be flagged on stderr:\n{}\n{}",
        r.stdout,
        r.stderr
    );
    assert!(!r.stdout.contains("signature verified"), "{}", r.stdout);
    let j = bk(&["--json", "verify", b.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    assert_eq!(v["signature"]["state"], "self_signed", "{v}");
    assert_eq!(v["signature"]["trusted"], false, "{v}");
    // With --require-signature and no trusted key it is not enough.
    let r = bk(&["verify", b.to_str().unwrap(), "--require-signature"]);
    assert_ne!(r.code, 0);
}

// ---------------------------------------------------------------------------------------------
// Item 11: messages that said the wrong thing

#[test]
fn a_directory_or_device_given_as_the_bundle_is_named_for_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let r = bk(&["verify", dir.path().to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(!r.stderr.contains("not found"), "{}", r.stderr);
    assert!(r.stderr.contains("is a directory"), "{}", r.stderr);
    let r = bk(&["inspect", "/dev/null"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(!r.stderr.contains("not found"), "{}", r.stderr);
    assert!(r.stderr.contains("/dev/null is a character device"), "{}", r.stderr);
}

#[test]
fn a_compressed_file_given_as_the_bundle_is_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let b = small_bundle(&dir.path().join("b.bkb"), None);
    let gz = dir.path().join("b.bkb.gz");
    let mut e = flate2::write::GzEncoder::new(fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    e.write_all(&fs::read(&b).unwrap()).unwrap();
    e.finish().unwrap();
    let zip = dir.path().join("b.zip");
    {
        let mut z = zip::ZipWriter::new(fs::File::create(&zip).unwrap());
        z.start_file("b.bkb", zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(&fs::read(&b).unwrap()).unwrap();
        z.finish().unwrap();
    }
    for (file, what) in [(&gz, "gzip"), (&zip, "zip")] {
        let r = bk(&["verify", file.to_str().unwrap()]);
        assert_eq!(r.code, 4, "{}", r.stderr);
        assert!(!r.stderr.contains("bad tar header"), "{}", r.stderr);
        assert!(r.stderr.contains(&format!("is a {what}")), "{}", r.stderr);
        assert!(r.stderr.contains("hint:"), "{}", r.stderr);
    }
}

#[test]
fn a_flipped_checksum_trailer_shows_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let b = small_bundle(&dir.path().join("b.bkb"), None);
    let mut bytes = fs::read(&b).unwrap();
    // The first header's checksum field ends "\0 "; turn the space into '!'.
    assert_eq!(&bytes[154..156], b"\0 ");
    bytes[155] = b'!';
    fs::write(&b, &bytes).unwrap();
    let r = bk(&["verify", b.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    let line = r.stderr.lines().next().unwrap_or_default();
    assert!(
        line.contains(r#"\0!"#) && line.contains(r#"\0 "#),
        "the message must show the field as found and as expected: {line}"
    );
    assert!(!line.contains("recorded"), "{line}");
}

#[test]
fn a_damaged_header_names_the_entries_around_it() {
    let dir = tempfile::tempdir().unwrap();
    let b = small_bundle(&dir.path().join("b.bkb"), None);
    let reader = BundleReader::open(&b).unwrap();
    // The second entry's header: the block before its data.
    let second = reader.entries()[1].clone();
    let first = reader.entries()[0].path.clone();
    drop(reader);
    let mut bytes = fs::read(&b).unwrap();
    let at = (second.offset - 512) as usize;
    bytes[at + 100] ^= 0x01; // the mode field: the checksum no longer matches
    fs::write(&b, &bytes).unwrap();
    let r = bk(&["verify", b.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("after entry {first}")) && r.stderr.contains(&second.path),
        "the message must name the entry before the damaged header and the one it claims to be:\n{}",
        r.stderr
    );
}

#[test]
fn a_signature_from_another_key_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (signer_key, _) = keypair(dir.path(), "signer");
    let (_, other_pub) = keypair(dir.path(), "other");
    let b = small_bundle(&dir.path().join("b.bkb"), Some(&signer_key));
    let r = bk(&["verify", b.to_str().unwrap(), "--key", other_pub.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("signed by key"), "{}", r.stderr);
    assert!(r.stderr.contains("not the key"), "{}", r.stderr);
    let hints: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("hint:")).collect();
    assert!(
        hints.iter().all(|h| !h.contains("copy the bundle again")),
        "a key mismatch is not damage: {hints:?}"
    );
    assert!(hints.iter().any(|h| h.contains("--key")), "{hints:?}");
}

// ---------------------------------------------------------------------------------------------
// Item 8: init-packages --dir refuses damaged archives as pack does, with a hint

#[test]
fn init_packages_dir_refuses_damaged_archives_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let pkgs = dir.path().join("probes");
    fs::create_dir(&pkgs).unwrap();
    let mut demo_zip = Vec::new();
    {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(&mut demo_zip));
        z.start_file("vector/bin/vector", zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(random_alnum(20_000).as_bytes()).unwrap();
        z.finish().unwrap();
    }
    // A truncated zip, a truncated .tar.gz, random bytes named .tar.gz: collectors all three.
    fs::write(
        pkgs.join("vector-0.39.0-linux-amd64.zip"),
        &demo_zip[..demo_zip.len() / 2],
    )
    .unwrap();
    let mut tgz = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut tgz, flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        let data = vec![7u8; 64 << 10];
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        t.append_data(&mut h, "telegraf/bin/telegraf", &data[..]).unwrap();
        t.into_inner().unwrap().finish().unwrap();
    }
    fs::write(pkgs.join("telegraf-1.28.3-linux-amd64.tar.gz"), &tgz[..tgz.len() - 40]).unwrap();
    fs::write(pkgs.join("nats-executor-1.0.0-linux-amd64.tar.gz"), random_alnum(4096)).unwrap();
    let closed = free_port();
    let r = bk(&[
        "init-packages",
        "--auto",
        "--dir",
        pkgs.to_str().unwrap(),
        "--database-url",
        &format!("postgres://u:p@127.0.0.1:{closed}/db"),
        "--nats-url",
        &format!("nats://127.0.0.1:{closed}"),
    ]);
    assert_eq!(
        r.code, 3,
        "damaged packages are bad input, found before any connection:\n{}",
        r.stderr
    );
    for f in [
        "vector-0.39.0-linux-amd64.zip",
        "telegraf-1.28.3-linux-amd64.tar.gz",
        "nats-executor-1.0.0-linux-amd64.tar.gz",
    ] {
        assert!(r.stderr.contains(f), "{f} must be named:\n{}", r.stderr);
    }
    assert!(
        r.stderr.lines().any(|l| l.starts_with("hint:")),
        "every error has a hint:\n{}",
        r.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Item 10: no secret at any log level; library noise only at -vv

#[test]
fn no_secret_and_no_library_noise_in_any_log_level() {
    let password = format!("Pw{}", random_alnum(20));
    let nats = NatsServer::start(NatsOpts {
        user_password: Some(("bk".into(), password.clone())),
        ..Default::default()
    });
    let db = crate::harness::release_database(PgCluster::shared(), "0044", &crate::harness::unique_db_name("logs"));
    let dir = tempfile::tempdir().unwrap();
    let pkgs = dir.path().join("probes");
    fs::create_dir(&pkgs).unwrap();
    fs::write(pkgs.join("probe-1.0.0-linux-amd64"), b"#!/bin/sh\n").unwrap();
    let env_file = dir.path().join(".env");
    fs::write(&env_file, format!("NATS_USER=bk\nNATS_PASSWORD={password}\n")).unwrap();
    let with_url_password = format!("nats://bk:{password}@127.0.0.1:{}", nats.port);
    let base = |c: &mut Command| {
        c.env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .env_remove("BKBUNDLE_LOG")
            .args(["init-packages", "--auto", "--dry-run", "--dir", pkgs.to_str().unwrap()])
            .args(["--database-url", &db]);
    };
    // A wrong password at the default level: bkbundle's own error, no raw library line.
    let mut c = bkbundle();
    base(&mut c);
    c.args([
        "--nats-url",
        &format!("nats://bk:wrong{password}@127.0.0.1:{}", nats.port),
    ]);
    let r = run_within(&mut c, Duration::from_secs(60));
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        r.stderr.starts_with("error: "),
        "bkbundle's error comes first:\n{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("async_nats"),
        "library noise at the default level:\n{}",
        r.stderr
    );
    assert!(!r.stderr.contains(&password), "{}", r.stderr);
    // -v: still no library noise.
    let mut c = bkbundle();
    base(&mut c);
    c.args(["-v", "--nats-url", &with_url_password]);
    let r = run_within(&mut c, Duration::from_secs(60));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("async_nats"), "library noise at -v:\n{}", r.stderr);
    // -vv, BKBUNDLE_LOG=debug and =trace, the password in the URL or in the .env: never shown.
    let runs: [(&[&str], Option<&str>); 4] = [
        (&["-vv", "--nats-url", &with_url_password], None),
        (&["--nats-url", &with_url_password], Some("debug")),
        (&["--nats-url", &with_url_password], Some("trace")),
        (&["-vv", "--env-file", env_file.to_str().unwrap()], Some("trace")),
    ];
    for (args, log) in runs {
        let mut c = bkbundle();
        base(&mut c);
        c.args(args);
        if args.contains(&"--env-file") {
            c.args(["--nats-url", &nats.url()]);
        }
        if let Some(l) = log {
            c.env("BKBUNDLE_LOG", l);
        }
        let r = run_within(&mut c, Duration::from_secs(60));
        assert_eq!(r.code, 0, "{args:?} {log:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("async_nats"),
            "{args:?} {log:?}: library diagnostics are expected here:\n{}",
            r.stderr
        );
        assert!(
            !r.stderr.contains(&password) && !r.stdout.contains(&password),
            "{args:?} {log:?}: the NATS password is in the output:\n{}",
            r.stderr
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Bounded fuzz of the bundle reader

/// xorshift64*: a fixed seed gives the same cases on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Offsets of every header block of a bundle bkbundle wrote (PAX records included).
fn header_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 512 <= bytes.len() && bytes[pos..pos + 512].iter().any(|&b| b != 0) {
        out.push(pos);
        let size = std::str::from_utf8(&bytes[pos + 124..pos + 135])
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim_matches(char::from(0)), 8).ok())
            .unwrap_or(0) as usize;
        pos += 512 + size.div_ceil(512) * 512;
    }
    out
}

fn mutate(rng: &mut Rng, good: &[u8], headers: &[usize]) -> (String, Vec<u8>) {
    let mut b = good.to_vec();
    let h = headers[rng.below(headers.len() as u64) as usize];
    let what = match rng.below(7) {
        0 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let at = rng.below(b.len() as u64) as usize;
                b[at] ^= 1 + rng.below(255) as u8;
            }
            format!("{n} byte flip(s)")
        }
        1 => {
            let at = rng.below(b.len() as u64) as usize;
            b.truncate(at);
            format!("truncated at {at}")
        }
        2 | 3 => {
            // A size field rewrite, checksum fixed so the header parses.
            let field: [u8; 12] = match rng.below(6) {
                0 => base256(u64::MAX - 511, 0),
                1 => base256(u64::MAX, 0),
                2 => base256(rng.next(), rng.below(256) as u8),
                3 => base256(rng.below(1 << 40), 0),
                4 => {
                    let mut f = [0u8; 12];
                    f.copy_from_slice(format!("{:011o}\0", rng.below(1 << 33)).as_bytes());
                    f
                }
                _ => {
                    let mut f = [0u8; 12];
                    f.copy_from_slice(format!("{:011o}\0", rng.below(4096)).as_bytes());
                    f
                }
            };
            b[h + 124..h + 136].copy_from_slice(&field);
            if rng.below(4) != 0 {
                set_checksum(&mut b[h..h + 512]);
            }
            format!("size field of the header at {h} set to {field:02x?}")
        }
        4 => {
            let t = b"5gxLK0\0 1"[rng.below(9) as usize];
            b[h + 156] = t;
            set_checksum(&mut b[h..h + 512]);
            format!("typeflag of the header at {h} set to {:?}", t as char)
        }
        5 => {
            // A name rewrite: escapes and odd bytes.
            let names: [&[u8]; 5] = [
                b"../../etc/passwd",
                b"/etc/shadow",
                b"bundle.toml",
                b"a\xffb",
                b"./SHA256SUMS",
            ];
            let n = names[rng.below(5) as usize];
            b[h..h + 100].fill(0);
            b[h..h + n.len()].copy_from_slice(n);
            set_checksum(&mut b[h..h + 512]);
            format!("name of the header at {h} set to {:?}", String::from_utf8_lossy(n))
        }
        _ => {
            let n = 1 + rng.below(2048) as usize;
            let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let at = rng.below(b.len() as u64) as usize;
            b.splice(at..at, junk);
            format!("{n} bytes inserted at {at}")
        }
    };
    (what, b)
}

/// Every file under `dir` with its contents.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push((p.clone(), fs::read(&p).unwrap_or_default()));
        }
    }
    out.sort();
    out
}

#[test]
fn fuzz_every_damaged_bundle_ends_in_a_verdict_within_bounds() {
    const CASES: u64 = 600;
    const LIMIT: Duration = Duration::from_secs(10);
    let work = tempfile::tempdir().unwrap();
    let (key, key_pub) = keypair(work.path(), "k");
    let unsigned = fs::read(small_bundle(&work.path().join("u.bkb"), None)).unwrap();
    let signed = fs::read(small_bundle(&work.path().join("s.bkb"), Some(&key))).unwrap();
    let mut rng = Rng(0x5eed_b0b5_1e5c_a1ed);
    let mut verdicts = [0usize; 2];
    for case in 0..CASES {
        let good = if case % 2 == 0 { &unsigned } else { &signed };
        let headers = header_offsets(good);
        assert!(headers.len() >= 6, "the seed bundle has its entries");
        let (what, bytes) = mutate(&mut rng, good, &headers);
        // Each case in a fresh directory beside a decoy, split into parts every third case.
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("bundle");
        fs::create_dir(&dir).unwrap();
        fs::write(root.path().join("decoy"), b"outside").unwrap();
        let base = dir.join("b.bkb");
        let split = case % 3 == 0 && bytes.len() > 1024;
        if split {
            let half = (bytes.len() / 2).max(1);
            fs::write(dir.join("b.bkb.001"), &bytes[..half]).unwrap();
            fs::write(dir.join("b.bkb.002"), &bytes[half..]).unwrap();
        } else {
            fs::write(&base, &bytes).unwrap();
        }
        let before = snapshot(root.path());
        let (tx, rx) = std::sync::mpsc::channel();
        let (b2, k2) = (base.clone(), key_pub.clone());
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(|| {
                let mut ok = 0;
                if let Ok(r) = BundleReader::open(&b2) {
                    // The index hands out only ranges inside the bundle, under plain names.
                    for e in r.entries() {
                        assert!(e.offset.checked_add(e.size).is_some_and(|end| end <= r.len()), "{e:?}");
                        assert!(bkbundle::manifest::is_safe_bundle_path(&e.path), "{e:?}");
                    }
                }
                let reporter = bkbundle::progress::Silent;
                for key in [None, Some(k2.clone())] {
                    let opts = bkbundle::verify::VerifyOptions {
                        bundle: b2.clone(),
                        key,
                        threads: Some(2),
                        ..Default::default()
                    };
                    match bkbundle::verify::run(&opts, &reporter) {
                        Ok(_) => ok += 1,
                        Err(e) => assert!(!e.message.is_empty()),
                    }
                }
                if let Err(e) = bkbundle::inspect::run(&b2, &reporter) {
                    assert!(!e.message.is_empty());
                }
                ok
            });
            let _ = tx.send(outcome.map_err(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            }));
        });
        match rx.recv_timeout(LIMIT) {
            Ok(Ok(ok)) => verdicts[(ok > 0) as usize] += 1,
            Ok(Err(panic)) => panic!("case {case} ({what}): the reader panicked: {panic}"),
            Err(_) => panic!("case {case} ({what}): no verdict within {LIMIT:?}"),
        }
        assert_eq!(
            snapshot(root.path()),
            before,
            "case {case} ({what}): reading the bundle changed files"
        );
    }
    // Most mutations must be caught; a few (a flip in an unused header byte) may not matter.
    assert!(verdicts[0] > CASES as usize * 3 / 4, "refused/accepted: {verdicts:?}");
}

/// Messages in the bucket's stream, read with nats-py (the upstream client).
fn stream_state(nats: &str, bucket: &str) -> u64 {
    let n = crate::packages::stream_messages(nats, &format!("OBJ_{bucket}"));
    n.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a message count: {n:?}"))
}

/// Issue 11 item 7: uploads killed again and again leave no chunks behind once a run completes,
/// and chunks nobody refers to (from any client) are reported by doctor and removed by --fix.
#[test]
fn killed_uploads_leave_no_chunks_and_doctor_reclaims_strays() {
    let pg = PgCluster::shared();
    let name = crate::harness::unique_db_name("chunks");
    let db = crate::harness::release_database(pg, "0044", &name);
    let nats = NatsServer::start(NatsOpts::default());
    let dir = tempfile::tempdir().unwrap();
    let locks = tempfile::tempdir().unwrap();
    let file = dir.path().join("bigprobe-1.0.0-linux-amd64");
    {
        // 64 MiB of a counter pattern (it does not compress away).
        let mut f = std::io::BufWriter::new(fs::File::create(&file).unwrap());
        let mut block = vec![0u8; 1 << 20];
        for i in 0u32..64 {
            for (j, b) in block.iter_mut().enumerate() {
                *b = (j as u32).wrapping_mul(2654435761).wrapping_add(i) as u8;
            }
            f.write_all(&block).unwrap();
        }
    }
    let cmd = |extra: &[&str]| {
        let mut c = bkbundle();
        c.env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .env("BKBUNDLE_LOCK_DIR", locks.path())
            .args(["init-packages", "--auto", "--dir", dir.path().to_str().unwrap()])
            .args(["--database-url", &db, "--nats-url", &nats.url()])
            .args(extra);
        c
    };
    // Kill runs part-way through their upload: once one has listed an upload as begun (its
    // bucket lock's `.pending` file), and a moment later, when chunks are on their way.
    let pending = || -> Vec<String> {
        fs::read_dir(locks.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pending"))
            .flat_map(|e| {
                fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter(|l| !l.trim().is_empty())
            .collect()
    };
    // This run listed an upload of its own (the list may still hold the killed run's before this
    // run reclaims them).
    let upload_begun = |before: &[String]| pending().iter().any(|n| !before.contains(n));
    // Three kills, the last of which left chunks (each run removes what the one before left, and
    // on a loaded machine a kill can land before the first chunk: then kill once more, later).
    // The wait after an upload began grows each time a kill came too early (a loaded machine).
    let (mut kills, mut messages, mut wait_ms) = (0, 0, 30);
    for _ in 0..20 {
        if kills >= 3 && messages > 0 {
            break;
        }
        let before = pending();
        let mut child = cmd(&[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && child.try_wait().unwrap().is_none() && !upload_begun(&before) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(wait_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            kills += 1;
            messages = stream_state(&nats.url(), "bklite");
            if messages == 0 {
                wait_ms = (wait_ms + 25).min(200);
            }
        } else {
            assert_eq!(
                pg.psql(&name, "SELECT count(*) FROM node_mgmt_packageversion"),
                "0",
                "a run finished: make the package bigger"
            );
        }
    }
    assert!(kills >= 3, "could not kill three uploads part-way");
    assert!(messages > 0, "the kills left chunks behind: {messages}");
    // The next run completes and removes what the killed ones left: one object of 64 chunks and
    // its meta remain.
    let out = cmd(&["--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["notes"].to_string().contains("a killed run had begun"), "{v}");
    // The killed holder's command line is named, without the database password in its URL.
    let password = db.split(':').nth(2).and_then(|p| p.split('@').next()).unwrap();
    assert!(
        v["notes"].to_string().contains("took over the lock")
            && !out.stdout.windows(password.len()).any(|w| w == password.as_bytes()),
        "{v}"
    );
    assert_eq!(stream_state(&nats.url(), "bklite"), 65, "{v}");

    // Chunks of another client's upload that never completed: doctor reports, --fix removes.
    crate::packages::python(
        "import asyncio,sys,nats\nasync def m():\n    nc=await nats.connect(sys.argv[1]); js=nc.jetstream()\n    for i in range(3): await js.publish('$O.bklite.C.strayNUID0123456789ab', b'x'*1000)\n    await nc.close()\nasyncio.run(m())",
        &[&nats.url()],
    );
    assert_eq!(stream_state(&nats.url(), "bklite"), 68);
    let doctor = |extra: &[&str]| {
        let out = bkbundle()
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .env("BKBUNDLE_LOCK_DIR", locks.path())
            .args(["--json", "doctor", "--database-url", &db, "--nats-url", &nats.url()])
            .args(extra)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let v = doctor(&[]);
    let f: Vec<_> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["subject"].as_str().unwrap_or("").contains("stream OBJ_bklite"))
        .collect();
    assert_eq!(f.len(), 1, "{v:#}");
    assert!(
        f[0].to_string().contains("strayNUID0123456789ab") && f[0]["severity"] == "warning",
        "{v:#}"
    );
    let v = doctor(&["--fix"]);
    assert!(v.to_string().contains("fixed: 3 chunk message(s) removed"), "{v:#}");
    assert_eq!(stream_state(&nats.url(), "bklite"), 65);
}

/// Issue 11 item 2: two `init-packages` started together on one bucket, many times: the second
/// waits for the first's upload lock, both succeed, and every row and object exists once with no
/// stray chunks (the loser used to exit 6 after it had replaced an object).
#[test]
fn two_uploads_at_once_converge_on_one_row_and_one_object() {
    let pg = PgCluster::shared();
    let name = crate::harness::unique_db_name("twice");
    let db = crate::harness::release_database(pg, "0044", &name);
    let nats = NatsServer::start(NatsOpts::default());
    let locks = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut f = std::io::BufWriter::new(fs::File::create(dir.path().join("twinprobe-1.0.0-linux-amd64")).unwrap());
    for i in 0u32..(8 << 10) {
        f.write_all(&[(i % 251) as u8; 1024]).unwrap();
    }
    drop(f);
    let start = || {
        bkbundle()
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .env("BKBUNDLE_LOCK_DIR", locks.path())
            .args([
                "--json",
                "init-packages",
                "--auto",
                "--force",
                "--dir",
                dir.path().to_str().unwrap(),
            ])
            .args(["--database-url", &db, "--nats-url", &nats.url()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    for round in 0..5 {
        let (a, b) = (start(), start());
        for (who, child) in [("first", a), ("second", b)] {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}, {who}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(
            pg.psql(&name, "SELECT count(*) FROM node_mgmt_packageversion"),
            "1",
            "round {round}"
        );
        // One object of 8 chunks and its meta: no second copy, no stray chunks.
        assert_eq!(stream_state(&nats.url(), "bklite"), 9, "round {round}");
    }
}
