//! Helpers for the tls unit tests: fixed times, a generated site, and the `openssl` CLI for keys
//! and certificates made the way operators and upstream's installer make them.

use super::{generate_ca, issue_server, Material, Name, Policy, SiteCa, CA_CN};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

/// 2026-06-01T00:00:00Z plus `days`.
pub fn day(days: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_272_000 + days * 86_400)
}

pub fn names(list: &[&str]) -> Vec<Name> {
    list.iter().map(|n| Name::parse(n).unwrap()).collect()
}

/// A site CA and a server certificate for `list`, made at `day(0)`.
pub fn site(list: &[&str], validity_days: u32) -> (SiteCa, Material) {
    let ca = generate_ca(CA_CN, day(0)).unwrap();
    let policy = Policy {
        validity_days,
        ..Policy::default()
    };
    let m = issue_server(&ca, &names(list), &policy, day(0)).unwrap();
    (ca, m)
}

/// Run `openssl ARGS` in `dir`; a missing openssl fails the test with how to install it.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = match Command::new("openssl").args(args).current_dir(dir).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run `openssl` ({e}): the tls tests need the OpenSSL command-line tool; \
             install it with `apt-get install openssl` (or `dnf install openssl`)"
        ),
    };
    assert!(
        out.status.success(),
        "openssl {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

/// A self-signed RSA certificate for `cn` and its key as `openssl genrsa` writes it (PKCS#1,
/// `BEGIN RSA PRIVATE KEY`), the way upstream's installer made its CA: (cert, key).
pub fn openssl_rsa(dir: &Path, cn: &str) -> (String, String) {
    let key = format!("{cn}.key");
    let crt = format!("{cn}.crt");
    openssl(dir, &["genrsa", "-traditional", "-out", &key, "2048"]);
    let subj = format!("/CN={cn}");
    openssl(
        dir,
        &[
            "req", "-x509", "-new", "-key", &key, "-days", "30", "-subj", &subj, "-out", &crt,
        ],
    );
    let key = read(dir, &key);
    assert!(
        key.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "PKCS#1 expected: {}",
        &key[..40]
    );
    (read(dir, &crt), key)
}
