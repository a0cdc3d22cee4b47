//! Issue 12, TLS by default, against the real engine and the demo bundle (whose NATS serves TLS
//! from the target's certs/): the site CA and certificate install generates (modes, chain, never
//! printed, served to an independent client, refused to a plain one), kept byte for byte by a
//! re-run, re-issued from the same CA for a new region's proxy address (NATS restarted, packages
//! not re-sent); an operator's own files used as given, and refused before anything changes when
//! they do not fit; `doctor` on the result.

use crate::harness::{ensure_demo_images, free_port};
use crate::install::Project;
use crate::pack::{bk, demo_bundle, run, Run};
use crate::packages::{python, python_with};
use serde_json::Value;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An install config for `p` with every address on loopback (region `default` local), so that
/// doctor's probes stay on this machine; `extra` is appended (further `[[regions]]`, `[tls]`).
fn loopback_config(p: &Project, extra: &str) -> PathBuf {
    let web = free_port();
    let config = p.dir.path().join("install.toml");
    fs::write(
        &config,
        format!(
            "format = 1\nproject = \"{}\"\n[env]\nWEB_PORT = \"{web}\"\nPOSTGRES_PORT = \"{}\"\nNATS_PORT = \"{}\"\n\
             HOST_IP = \"127.0.0.1\"\nSERVER_URL = \"http://127.0.0.1:{web}\"\n[health]\ntimeout_secs = 180\nsteady_secs = 2\n\
             [[regions]]\nname = \"default\"\nlocal = true\n{extra}",
            p.name,
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    config
}

/// The base64 lines of the first PEM block of `pem` (a private key: what would show if it were
/// printed, even JSON-escaped).
fn key_lines(pem: &str) -> Vec<String> {
    assert!(pem.starts_with("-----BEGIN") && pem.lines().next().unwrap().contains("PRIVATE KEY"));
    let body: Vec<String> = pem
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .map(str::to_string)
        .collect();
    assert!(!body.is_empty(), "no key body");
    body
}

fn assert_not_printed(r: &Run, key_pem: &str, what: &str) {
    for line in key_lines(key_pem) {
        assert!(
            !r.stdout.contains(&line) && !r.stderr.contains(&line),
            "{what}: a line of a private key was printed"
        );
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `openssl ARGS` must succeed; its stdout.
fn openssl(dir: &Path, args: &[&str]) -> String {
    let r = run(Command::new("openssl").args(args).current_dir(dir));
    assert_eq!(
        r.code,
        0,
        "openssl {} failed ({}); the tls tests need the OpenSSL CLI: apt-get install openssl",
        args.join(" "),
        r.stderr
    );
    r.stdout
}

/// TLS on the NATS port as a client sees it: the INFO line (must require TLS), then a handshake
/// verifying against `ca` for the name 127.0.0.1. Prints the SHA-256 of the certificate served
/// and of the one in `cert_file` (DER both).
const PY_SERVED: &str = r#"
import hashlib, socket, ssl, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
info = b""
while not info.endswith(b"\r\n"):
    b = s.recv(1)
    if not b: break
    info += b
assert b'"tls_required":true' in info, info
t = ssl.create_default_context(cafile=sys.argv[2]).wrap_socket(s, server_hostname="127.0.0.1")
served = hashlib.sha256(t.getpeercert(True)).hexdigest()
on_disk = hashlib.sha256(ssl.PEM_cert_to_DER_cert(open(sys.argv[3]).read().strip())).hexdigest()
print(served, on_disk)
"#;

/// The certificate NATS serves on `port` is `cert_file`, and chains to `ca` for 127.0.0.1.
fn nats_serves(port: &str, ca: &Path, cert_file: &Path) {
    let out = python(PY_SERVED, &[port, ca.to_str().unwrap(), cert_file.to_str().unwrap()]);
    let (served, on_disk) = out.split_once(' ').unwrap();
    assert_eq!(
        served,
        on_disk,
        "NATS serves another certificate than {}",
        cert_file.display()
    );
}

/// nats-py over TLS (verifying against `ca`, host 127.0.0.1) logs in and round-trips a PING.
fn nats_py_tls(user: &str, password: &str, port: &str, ca: &Path) {
    let url = format!("tls://{user}:{password}@127.0.0.1:{port}");
    let out = python_with(
        "import asyncio,sys,nats\nasync def m():\n    nc=await nats.connect(sys.argv[1])\n    await nc.flush(timeout=5)\n    print('connected', nc.connected_url.scheme)\n    await nc.close()\nasyncio.run(m())",
        &[&url],
        Some(ca),
    );
    assert_eq!(out, "connected tls");
}

/// A client speaking plain NATS gets nowhere: nats-py with `nats://` and no CA fails (bounded by
/// its connect_timeout), and a raw `CONNECT`/`PING` in plain text never gets its `PONG`.
const PY_PLAIN: &str = r#"
import asyncio, socket, sys, nats
async def m():
    try:
        nc = await nats.connect(sys.argv[1], connect_timeout=5)
        await nc.flush(timeout=5)
        print("connected in plain text")
    except Exception as e:
        print("nats-py refused:", type(e).__name__)
asyncio.run(m())
s = socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=10)
s.recv(4096)
s.sendall(b'CONNECT {"verbose":false,"user":"%s","pass":"%s"}\r\nPING\r\n' % (sys.argv[3].encode(), sys.argv[4].encode()))
got = b""
try:
    while True:
        b = s.recv(4096)
        if not b: break
        got += b
except OSError as e:
    got += b" [" + type(e).__name__.encode() + b"]"
print("raw:", got)
"#;

fn plain_client_refused(user: &str, password: &str, port: &str) {
    let url = format!("nats://{user}:{password}@127.0.0.1:{port}");
    let out = python(PY_PLAIN, &[&url, port, user, password]);
    assert!(out.contains("nats-py refused:"), "{out}");
    let raw = out.lines().find(|l| l.starts_with("raw:")).unwrap();
    assert!(!raw.contains("PONG"), "a plain-text client was served: {out}");
}

/// The four files of a generated site, by path relative to the target.
const SITE_FILES: [&str; 4] = [
    ".bkbundle/tls/ca.key",
    "certs/ca.crt",
    "certs/nats-server.crt",
    "certs/nats-server.key",
];

fn site_files(p: &Project) -> Vec<Vec<u8>> {
    SITE_FILES
        .iter()
        .map(|f| fs::read(p.target().join(f)).unwrap())
        .collect()
}

/// The stack's NATS login and published port, from its `.env`.
fn nats_login(p: &Project) -> (String, String, String) {
    (
        p.env_value("NATS_USER"),
        p.env_value("NATS_PASSWORD"),
        p.env_value("NATS_PORT"),
    )
}

/// Every stored object as `name nuid digest`, read by nats-py: a re-sent object gets a new nuid.
fn objects(p: &Project, bucket: &str) -> String {
    let (user, password, port) = nats_login(p);
    python_with(
        "import asyncio,sys,nats\nasync def m():\n    nc=await nats.connect(sys.argv[1]); o=await nc.jetstream().object_store(sys.argv[2])\n    for i in sorted(await o.list(), key=lambda i: i.name): print(i.name, i.nuid, i.digest)\n    await nc.close()\nasyncio.run(m())",
        &[&format!("tls://{user}:{password}@127.0.0.1:{port}"), bucket],
        Some(&p.target().join("certs/ca.crt")),
    )
}

/// After the first install: the key files private, the certificate chaining to the published CA
/// (checked by OpenSSL), no private key in what install printed.
fn generated_files_are_private_and_chain(p: &Project, first: &Run) {
    let t = p.target();
    assert_eq!(mode(&t.join(".bkbundle/tls")), 0o700);
    assert_eq!(mode(&t.join(".bkbundle/tls/ca.key")), 0o600);
    assert_eq!(mode(&t.join("certs/nats-server.key")), 0o600);
    let verified = openssl(&t, &["verify", "-CAfile", "certs/ca.crt", "certs/nats-server.crt"]);
    assert_eq!(verified.trim(), "certs/nats-server.crt: OK");
    let ca_key = fs::read_to_string(t.join(".bkbundle/tls/ca.key")).unwrap();
    // The file holds the CA's key, then its certificate (the one published in certs/).
    assert!(ca_key.ends_with(&fs::read_to_string(t.join("certs/ca.crt")).unwrap()));
    assert_not_printed(first, &ca_key, "install --json");
    let server_key = fs::read_to_string(t.join("certs/nats-server.key")).unwrap();
    assert_not_printed(first, &server_key, "install --json");
}

/// `bkbundle --json doctor --target T --config C --bundle B`: the run and its report. The config
/// says region `default` is local (else its loopback URLs are errors), the bundle which
/// installers the site has (else those of every platform are expected).
fn doctor(p: &Project) -> (Run, Value) {
    let config = p.dir.path().join("install.toml");
    let r = run(crate::harness::bkbundle()
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .args(["--json", "doctor", "--target", p.target().to_str().unwrap()])
        .args(["--config", config.to_str().unwrap()])
        .args(["--bundle", demo_bundle().to_str().unwrap()]));
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {}\n{}", r.stdout, r.stderr));
    (r, v)
}

fn tls_findings(v: &Value) -> Vec<&Value> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["check"] == "tls")
        .collect()
}

/// Doctor finds nothing wrong with TLS on the clean install; region 1's `NATS_TLS_CA` row replaced
/// by another CA's certificate is an error (exit 10) naming the region; the row is then restored.
fn doctor_sees_a_region_given_another_ca(p: &Project) {
    let (r, v) = doctor(p);
    assert!(tls_findings(&v).is_empty(), "{:#?}", tls_findings(&v));
    assert_eq!(r.code, 0, "a clean install: {}", r.stdout);
    let dir = tempfile::tempdir().unwrap();
    openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "o.key",
            "-days",
            "30",
            "-subj",
            "/CN=Other CA",
            "-out",
            "o.crt",
        ],
    );
    let other = fs::read_to_string(dir.path().join("o.crt")).unwrap();
    p.stack_psql(&format!(
        "create table tlstest_saved as select id, value from node_mgmt_sidecarenv where key = 'NATS_TLS_CA' and cloud_region_id = 1; \
         update node_mgmt_sidecarenv set value = $pem${other}$pem$ where key = 'NATS_TLS_CA' and cloud_region_id = 1"
    ));
    let (r, v) = doctor(p);
    let found = tls_findings(&v);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["severity"], "error");
    assert_eq!(found[0]["subject"], "region \"default\" NATS_TLS_CA", "{found:#?}");
    assert!(
        found[0]["message"]
            .as_str()
            .unwrap()
            .contains("did not sign the NATS certificate"),
        "{found:#?}"
    );
    assert_eq!(r.code, 10, "{}", r.stdout);
    p.stack_psql(
        "update node_mgmt_sidecarenv e set value = s.value from tlstest_saved s where e.id = s.id; drop table tlstest_saved",
    );
}

/// A region with a new proxy address: the certificate is issued again from the same CA to cover
/// it (and the run says why), NATS restarted serves it, and no package is sent again.
fn reissued_for_a_new_proxy(p: &Project, before: &[Vec<u8>], bucket: &str) {
    let stored = objects(p, bucket);
    let config = p.dir.path().join("install.toml");
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str("[[regions]]\nname = \"west\"\nproxy_address = \"192.0.2.77\"\n");
    fs::write(&config, text).unwrap();
    let r = p.install(demo_bundle(), &config, &["--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["plan"]["tls"]["action"], "reissue", "{}", j["plan"]["tls"]);
    assert_eq!(
        j["plan"]["tls"]["reasons"],
        serde_json::json!(["does not cover 192.0.2.77"])
    );
    let notes = j["notes"].to_string();
    assert!(
        notes.contains("issued again from the site CA (does not cover 192.0.2.77)")
            && notes.contains("restarted to serve its new TLS certificate"),
        "{notes}"
    );
    let after = site_files(p);
    assert_eq!(after[0], before[0], "the CA key file changed");
    assert_eq!(after[1], before[1], "the published CA changed");
    assert_ne!(after[2], before[2], "the certificate was not issued again");
    let t = p.target();
    let text = openssl(
        &t,
        &[
            "x509",
            "-in",
            "certs/nats-server.crt",
            "-noout",
            "-ext",
            "subjectAltName",
        ],
    );
    assert!(text.contains("IP Address:192.0.2.77"), "{text}");
    assert_eq!(
        openssl(&t, &["verify", "-CAfile", "certs/ca.crt", "certs/nats-server.crt"]).trim(),
        "certs/nats-server.crt: OK"
    );
    assert_not_printed(&r, &String::from_utf8_lossy(&after[0]), "install --json (re-issue)");
    let (_, _, port) = nats_login(p);
    nats_serves(&port, &t.join("certs/ca.crt"), &t.join("certs/nats-server.crt"));
    assert_eq!(
        objects(p, bucket),
        stored,
        "objects were sent again though the CA did not change"
    );
}

#[test]
fn demo_site_ca_generated_once_kept_reissued_for_a_new_proxy_and_diagnosed() {
    ensure_demo_images();
    let p = Project::new();
    let config = loopback_config(&p, "");
    let first = p.install(demo_bundle(), &config, &["--json"]);
    assert_eq!(first.code, 0, "{}\n{}", first.stdout, first.stderr);
    let j: Value = serde_json::from_str(&first.stdout).unwrap();
    assert_eq!(j["plan"]["tls"]["action"], "generate", "{}", j["plan"]["tls"]);
    let bucket = j["plan"]["platform"]["bucket"].as_str().unwrap().to_string();
    generated_files_are_private_and_chain(&p, &first);

    let (user, password, port) = nats_login(&p);
    let t = p.target();
    nats_py_tls(&user, &password, &port, &t.join("certs/ca.crt"));
    nats_serves(&port, &t.join("certs/ca.crt"), &t.join("certs/nats-server.crt"));
    plain_client_refused(&user, &password, &port);

    // A re-run keeps every file byte for byte and prints no key either.
    let before = site_files(&p);
    let second = p.install(demo_bundle(), &config, &[]);
    assert_eq!(second.code, 0, "{}\n{}", second.stdout, second.stderr);
    assert_eq!(site_files(&p), before, "a re-run rewrote the site's TLS files");
    assert_not_printed(&second, &String::from_utf8_lossy(&before[0]), "install (re-run)");

    doctor_sees_a_region_given_another_ca(&p);
    regions_apply_keeps_what_install_wrote(&p, &config);
    reissued_for_a_new_proxy(&p, &before, &bucket);
}

/// `regions apply` on the installed target (its .env beside certs/) keeps `NATS_PROTOCOL = tls`
/// and the CA, although the demo bundle's own `[regions.env]` says `nats`.
fn regions_apply_keeps_what_install_wrote(p: &Project, config: &Path) {
    let rows = "select key || '=' || md5(value) from node_mgmt_sidecarenv where cloud_region_id = 1 and key in ('NATS_PROTOCOL', 'NATS_TLS_CA') order by key";
    let before = p.stack_psql(rows);
    assert!(before.starts_with("NATS_PROTOCOL="), "{before}");
    let env_file = p.target().join(".env");
    let r = bk(&[
        "regions",
        "apply",
        "--bundle",
        demo_bundle().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--env-file",
        env_file.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(
        p.stack_psql(rows),
        before,
        "regions apply changed what install wrote: {}",
        r.stdout
    );
    assert_eq!(
        p.stack_psql("select value from node_mgmt_sidecarenv where cloud_region_id = 1 and key = 'NATS_PROTOCOL'"),
        "tls"
    );
}

/// An operator's PKI made with the OpenSSL CLI in `d`: an RSA CA (`ca`), a server key and a
/// certificate it signed for 127.0.0.1, 192.0.2.10, nats and localhost (`nats`); and the bad
/// variants: another CA (`other`), a key of no certificate (`stray.key`), and a certificate
/// from `ca` that leaves out 192.0.2.10 (`narrow`).
fn operator_pki(d: &Path) {
    let ca = |name: &str| {
        let subj = format!("/CN=Operator {name}");
        let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
        openssl(
            d,
            &[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-days", "365", "-subj", &subj,
                "-out", &crt,
            ],
        );
    };
    ca("ca");
    ca("other");
    openssl(d, &["genrsa", "-out", "stray.key", "2048"]);
    for (name, san) in [
        ("nats", "IP:127.0.0.1,IP:192.0.2.10,DNS:nats,DNS:localhost"),
        ("narrow", "IP:127.0.0.1,DNS:nats,DNS:localhost"),
    ] {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        openssl(d, &["genrsa", "-out", &key, "2048"]);
        openssl(d, &["req", "-new", "-key", &key, "-subj", "/CN=nats", "-out", &csr]);
        fs::write(
            d.join(&ext),
            format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "365",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        );
    }
}

/// The install config of `p` (HOST_IP 192.0.2.10) naming `ca`, `cert` and `key` of `d` in [tls].
fn operator_config(p: &Project, d: &Path, ca: &str, cert: &str, key: &str) -> PathBuf {
    let web = free_port();
    let f = |n: &str| d.join(n).display().to_string();
    p.config(
        180,
        &format!(
            "HOST_IP = \"192.0.2.10\"\nSERVER_URL = \"http://192.0.2.10:{web}\"\n[tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            f(ca),
            f(cert),
            f(key)
        ),
    )
}

/// Each misfit refused by preflight (exit 8), naming the file, what was expected and found,
/// before anything is written or started.
fn operator_misfits_refused(p: &Project, d: &Path) {
    let cases = [
        (
            ("other.crt", "nats.crt", "nats.key"),
            format!(
                "{}: not signed by the CA in {} (issued by CN=Operator ca, not by CN=Operator other)",
                d.join("nats.crt").display(),
                d.join("other.crt").display()
            ),
        ),
        (
            ("ca.crt", "nats.crt", "stray.key"),
            format!(
                "{}: does not match the certificate in {} (its public key differs)",
                d.join("stray.key").display(),
                d.join("nats.crt").display()
            ),
        ),
        (
            ("ca.crt", "narrow.crt", "narrow.key"),
            format!(
                "{}: does not cover 192.0.2.10 (it covers: 127.0.0.1, nats, localhost)",
                d.join("narrow.crt").display()
            ),
        ),
    ];
    for ((ca, cert, key), want) in cases {
        let config = operator_config(p, d, ca, cert, key);
        let r = p.install(demo_bundle(), &config, &[]);
        assert_eq!(r.code, 8, "{ca} {cert} {key}: {}\n{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains(&want),
            "{ca} {cert} {key}: want {want:?} in\n{}",
            r.stderr
        );
        assert!(!p.target().exists(), "{ca} {cert} {key}: the target was written");
        assert!(p.containers().is_empty(), "{ca} {cert} {key}: {:?}", p.containers());
    }
}

#[test]
fn operator_ca_and_certificate_are_used_as_given_and_misfits_refused_first() {
    ensure_demo_images();
    let p = Project::new();
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    operator_pki(d);
    operator_misfits_refused(&p, d);

    let config = operator_config(&p, d, "ca.crt", "nats.crt", "nats.key");
    let r = p.install(demo_bundle(), &config, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let t = p.target();
    let ca = fs::read(d.join("ca.crt")).unwrap();
    assert_eq!(
        fs::read(t.join("certs/ca.crt")).unwrap(),
        ca,
        "certs/ca.crt is not the operator's CA"
    );
    assert_eq!(
        fs::read(t.join("certs/nats-server.crt")).unwrap(),
        fs::read(d.join("nats.crt")).unwrap()
    );
    assert_eq!(mode(&t.join("certs/nats-server.key")), 0o600);
    assert!(
        !t.join(".bkbundle/tls/ca.key").exists(),
        "a CA was generated beside the operator's"
    );
    assert_not_printed(
        &r,
        &fs::read_to_string(d.join("nats.key")).unwrap(),
        "install (operator)",
    );
    let row = p.stack_psql(
        "select encode(sha256(convert_to(value, 'UTF8')), 'hex') from node_mgmt_sidecarenv where key = 'NATS_TLS_CA' and cloud_region_id = 1",
    );
    assert_eq!(row, bkbundle::digest::sha256_hex(&ca), "region 1's NATS_TLS_CA row");
    let (user, password, port) = nats_login(&p);
    nats_serves(&port, &d.join("ca.crt"), &d.join("nats.crt"));
    nats_py_tls(&user, &password, &port, &d.join("ca.crt"));
    // A re-run with the same files has nothing to do.
    let again = p.install(demo_bundle(), &config, &["--json"]);
    assert_eq!(again.code, 0, "{}\n{}", again.stdout, again.stderr);
    let j: Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(j["already_installed"], true, "{}", j["plan"]["tls"]);
    assert_eq!(fs::read(t.join("certs/ca.crt")).unwrap(), ca);
}
