//! The site's TLS material: a CA bkbundle generates once per install target, the NATS server
//! certificate it issues from that CA for every address agents use, or an operator's own CA,
//! certificate and key checked before anything is written.
//!
//! Everything here is pure (PEM text in, values and reasons out) except [`store`], the one place
//! that reads and writes files. The install step is expected to run:
//!
//! 1. operator files named in `[tls]` → [`store::read_operator`], [`check_operator`] (every
//!    problem at once; nothing written when there is one), then [`store::save`] copies them in;
//! 2. otherwise [`store::load`] → [`decide`]: [`Decision::Generate`] ([`generate_ca`] then
//!    [`issue_server`]), [`Decision::Reissue`] ([`issue_server`] from the same CA, the reasons
//!    reported), [`Decision::Keep`], or [`Decision::Operator`] (the target holds certificates
//!    bkbundle did not make: check them with [`store::read_operator`] on the target's
//!    [`store::CA_CERT`], [`store::SERVER_CERT`] and [`store::SERVER_KEY`] and
//!    [`check_operator`], never replace them).
//!
//! `doctor` needs only the pure half: [`inspect`], [`signed_by`], [`uncovered`], [`key_matches`].
//!
//! Compromises, and why:
//! - The CA key and the CA certificate live together in `.bkbundle/tls/ca.key` (two PEM blocks),
//!   written in one atomic rename: a killed run never leaves a CA certificate without its key or
//!   a key without its certificate. `certs/ca.crt` is the copy published for the stack and the
//!   agents; when it differs from the generated CA, the operator put their own there.
//! - Certificates start one day before they are made: air-gapped hosts often run without a time
//!   source, and an agent whose clock is a few hours behind must not see "not yet valid".
//! - A server certificate never outlives its CA (its end is clamped to the CA's).
//! - Name coverage follows what TLS clients check today (Go, rustls, OpenSSL's host check): the
//!   subject alternative names only, never the subject CN.

mod cert;
mod issue;
mod keys;
pub mod store;
#[cfg(test)]
mod test_support;

pub use cert::{inspect, signed_by, uncovered, CertInfo};
pub use issue::{generate_ca, issue_server, Material, SiteCa, CA_CN};
pub use keys::key_matches;
pub use store::{load, read_operator, save, Existing, OperatorFiles};

use crate::error::Error;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// One name a certificate must cover: an IP address or a DNS name (lower case, no trailing dot).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Name {
    Ip(IpAddr),
    Dns(String),
}

impl Name {
    /// The host of an address as operators and the env write it: `10.0.0.5`, `10.0.0.5:4222`,
    /// `[fd00::5]:4222`, `fd00::5`, `nats.example.com`, `tls://user:pw@nats:4222`,
    /// `https://10.0.0.5:443/path`. The error says what is wrong with it.
    pub fn parse(address: &str) -> Result<Name, String> {
        let s = address.trim();
        let s = match s.split_once("://") {
            Some((_, rest)) => rest.split(['/', '?', '#']).next().unwrap_or_default(),
            // A path without a scheme is no address (the field's `null/api/v1/...`).
            None if s.contains('/') => return Err(format!("{address:?}: a path without a scheme (scheme://host)")),
            None => s,
        };
        let s = s.rsplit_once('@').map_or(s, |(_, host)| host);
        let host = if let Some(rest) = s.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{address:?}: `[` without `]`"))?;
            if !(after.is_empty() || is_port(after)) {
                return Err(format!("{address:?}: {after:?} after `]` is not a port"));
            }
            inside
        } else if s.parse::<IpAddr>().is_ok() {
            s
        } else {
            match s.split_once(':') {
                Some((host, port)) if is_port(&format!(":{port}")) => host,
                Some(_) => return Err(format!("{address:?}: not a host, host:port or URL")),
                None => s,
            }
        };
        if host.is_empty() {
            return Err(format!("{address:?}: no host"));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Name::Ip(ip));
        }
        let dns = host.trim_end_matches('.').to_ascii_lowercase();
        if dns.contains('*') || rustls_pki_types::DnsName::try_from(dns.as_str()).is_err() {
            return Err(format!("{address:?}: {host:?} is neither an IP address nor a DNS name"));
        }
        Ok(Name::Dns(dns))
    }
}

fn is_port(s: &str) -> bool {
    s.strip_prefix(':')
        .is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Name::Ip(ip) => write!(f, "{ip}"),
            Name::Dns(d) => f.write_str(d),
        }
    }
}

/// How long a certificate bkbundle issues lives, and when it is issued again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Validity of the server certificate (default 825 days, as upstream's installer).
    pub validity_days: u32,
    /// A certificate that ends within this many days is issued again.
    pub renew_within_days: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            validity_days: 825,
            renew_within_days: 30,
        }
    }
}

/// What install does with the server certificate, decided by [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No site CA yet: generate it, then issue the server certificate.
    Generate,
    /// The certificate on disk is signed by the site CA, matches its key, covers every name and
    /// does not end within the renewal window.
    Keep,
    /// Issue the server certificate again from the same CA, for these reasons (to report).
    Reissue { reasons: Vec<String> },
    /// The target holds certificates bkbundle did not make (an operator's): check, never replace.
    Operator,
}

/// What to do with the certificates found in the target (`existing`, from [`store::load`]) so
/// that the server certificate covers `wanted` at `now`. Pure.
pub fn decide(existing: Option<&Existing>, wanted: &[Name], policy: &Policy, now: SystemTime) -> Decision {
    let Some(ex) = existing else {
        return Decision::Generate;
    };
    let Some(ca) = &ex.site_ca else {
        // Files in certs/ that bkbundle did not write are an operator's: never replace them.
        let any = ex.ca_pem.is_some() || ex.cert_pem.is_some() || ex.key_pem.is_some();
        return if any { Decision::Operator } else { Decision::Generate };
    };
    if let Some(published) = &ex.ca_pem {
        if !cert::same_certificate(published, &ca.cert_pem) {
            return Decision::Operator;
        }
    }
    let mut reasons = Vec::new();
    if ex.ca_pem.is_none() {
        reasons.push(format!("{} is missing", store::CA_CERT));
    }
    match (&ex.cert_pem, &ex.key_pem) {
        (Some(cert), Some(key)) => reasons.extend(server_problems(ca, cert, key, wanted, policy, now)),
        (None, _) => reasons.push(format!("{} is missing", store::SERVER_CERT)),
        (Some(_), None) => reasons.push(format!("{} is missing", store::SERVER_KEY)),
    }
    if reasons.is_empty() {
        Decision::Keep
    } else {
        Decision::Reissue { reasons }
    }
}

/// Why the server certificate bkbundle issued earlier no longer serves (empty: it does).
fn server_problems(
    ca: &SiteCa,
    cert_pem: &str,
    key_pem: &str,
    wanted: &[Name],
    policy: &Policy,
    now: SystemTime,
) -> Vec<String> {
    let info = match inspect(cert_pem) {
        Ok(i) => i,
        Err(e) => return vec![format!("{} cannot be read: {e}", store::SERVER_CERT)],
    };
    let mut reasons = Vec::new();
    // Expiry is judged below, with the renewal window; the chain is checked inside the validity.
    if let Err(e) = cert::verify_chain(cert_pem, &ca.cert_pem, info.not_before) {
        reasons.push(format!("{}: {e}", store::SERVER_CERT));
    }
    match key_matches(cert_pem, key_pem) {
        Ok(true) => {}
        Ok(false) => reasons.push(format!("{} does not match the certificate", store::SERVER_KEY)),
        Err(e) => reasons.push(format!("{}: {e}", store::SERVER_KEY)),
    }
    reasons.extend(uncovered(&info, wanted).iter().map(|n| format!("does not cover {n}")));
    reasons.extend(expiry_problem(&info, policy, now));
    reasons
}

/// "expired on DATE" or "expires DATE (within N days)", when the certificate ends too soon.
fn expiry_problem(info: &CertInfo, policy: &Policy, now: SystemTime) -> Option<String> {
    let window = Duration::from_secs(u64::from(policy.renew_within_days) * 86_400);
    let end = date(info.not_after);
    if info.not_after <= now {
        Some(format!("expired on {end}"))
    } else if now.checked_add(window).is_none_or(|limit| info.not_after <= limit) {
        Some(format!("expires {end} (within {} days)", policy.renew_within_days))
    } else {
        None
    }
}

/// Every problem with an operator's own CA, certificate and key (empty: they serve `wanted`):
/// each names the file, what was expected and found, and what to do. Names a certificate does not
/// cover are errors here, since bkbundle cannot issue the operator's certificate again.
pub fn check_operator(files: &OperatorFiles, wanted: &[Name], policy: &Policy, now: SystemTime) -> Vec<Error> {
    let (ca_file, cert_file, key_file) = (
        files.ca_file.display(),
        files.cert_file.display(),
        files.key_file.display(),
    );
    let mut problems = Vec::new();
    let ca_ok = check_operator_ca(files, policy, now, &mut problems);
    let cert = match inspect(&files.cert_pem) {
        Ok(c) => c,
        Err(e) => {
            problems.push(Error::input(format!("{cert_file}: {e}")).hint("give the server certificate in PEM form"));
            return problems;
        }
    };
    if ca_ok {
        if let Err(e) = cert::verify_chain(&files.cert_pem, &files.ca_pem, cert.not_before) {
            problems.push(
                Error::input(format!("{cert_file}: not signed by the CA in {ca_file} ({e})"))
                    .hint(format!("give the certificate that CA issued, {OWN_OR_ISSUED}")),
            );
        }
    }
    if let Some(e) = expiry_problem(&cert, policy, now) {
        problems
            .push(Error::input(format!("{cert_file}: {e}")).hint(format!("renew the certificate, {OWN_OR_ISSUED}")));
    }
    match key_matches(&files.cert_pem, &files.key_pem) {
        Ok(true) => {}
        Ok(false) => problems.push(
            Error::input(format!(
                "{key_file}: does not match the certificate in {cert_file} (its public key differs)"
            ))
            .hint("give the private key the certificate was issued for"),
        ),
        Err(e) => problems.push(Error::input(format!("{key_file}: {e}")).hint("give the private key in PEM form")),
    }
    let missing = uncovered(&cert, wanted);
    if !missing.is_empty() {
        let covers = if cert.names.is_empty() {
            "no subject alternative names".to_string()
        } else {
            join(&cert.names)
        };
        problems.push(
            Error::input(format!(
                "{cert_file}: does not cover {} (it covers: {covers})",
                join(&missing)
            ))
            .hint(format!(
                "issue a certificate naming every address agents use, {OWN_OR_ISSUED}"
            )),
        );
    }
    problems
}

/// The end of the hints about an operator's files: the other way out.
const OWN_OR_ISSUED: &str = "or remove ca_file, cert_file and key_file from [tls] to let bkbundle issue one";

/// The operator's CA: a CA certificate, not ending within the renewal window. True when the
/// chain can be checked against it.
fn check_operator_ca(files: &OperatorFiles, policy: &Policy, now: SystemTime, problems: &mut Vec<Error>) -> bool {
    let ca_file = files.ca_file.display();
    match inspect(&files.ca_pem) {
        Ok(ca) if ca.is_ca => {
            if let Some(e) = expiry_problem(&ca, policy, now) {
                problems.push(
                    Error::input(format!("{ca_file}: the CA CN={} {e}", ca.subject_cn))
                        .hint("agents stop trusting the server when the CA ends: renew the CA and its certificates"),
                );
            }
            true
        }
        Ok(ca) => {
            problems.push(
                Error::input(format!(
                    "{ca_file}: CN={} is not a CA certificate (no basicConstraints CA:TRUE)",
                    ca.subject_cn
                ))
                .hint(format!(
                    "give the certificate of the CA that issued {}",
                    files.cert_file.display()
                )),
            );
            false
        }
        Err(e) => {
            problems.push(Error::input(format!("{ca_file}: {e}")).hint("give the CA certificate in PEM form"));
            false
        }
    }
}

fn join(names: &[Name]) -> String {
    names.iter().map(Name::to_string).collect::<Vec<_>>().join(", ")
}

/// A day as `YYYY-MM-DD` (UTC), for messages.
pub fn date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    match i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
    {
        Some(d) => format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day()),
        None => format!("{secs} s after 1970"),
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{day, names, openssl, openssl_rsa, read, site};
    use super::*;

    #[test]
    fn names_from_every_way_an_address_is_written() {
        let cases = [
            ("10.0.0.5", "10.0.0.5"),
            (" 10.0.0.5:4222 ", "10.0.0.5"),
            ("fd00::5", "fd00::5"),
            ("[fd00::5]:4222", "fd00::5"),
            ("tls://user:pw@[fd00::5]:4222", "fd00::5"),
            ("https://10.0.0.5:443/api/v1/node", "10.0.0.5"),
            ("nats://NATS.Example.com.:4222", "nats.example.com"),
            ("nats", "nats"),
            ("http://server?x=1", "server"),
        ];
        for (address, want) in cases {
            assert_eq!(
                Name::parse(address).map(|n| n.to_string()),
                Ok(want.to_string()),
                "{address}"
            );
        }
        assert!(matches!(Name::parse("10.0.0.5:1"), Ok(Name::Ip(_))));
        assert!(matches!(Name::parse("nats"), Ok(Name::Dns(_))));
        for bad in [
            "",
            "http://",
            "a b",
            "host:port",
            "*.example.com",
            "[fd00::5",
            "[fd00::5]x",
            "null/api",
        ] {
            assert!(Name::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Name::parse("").unwrap_err(), "\"\": no host");
    }

    fn existing(ca: &SiteCa, m: &Material) -> Existing {
        Existing {
            site_ca: Some(SiteCa {
                cert_pem: ca.cert_pem.clone(),
                key_pem: ca.key_pem.clone(),
            }),
            ca_pem: Some(m.ca_pem.clone()),
            cert_pem: Some(m.cert_pem.clone()),
            key_pem: Some(m.key_pem.clone()),
        }
    }

    #[test]
    fn decide_generate_keep_and_reissue_with_reasons() {
        let policy = Policy::default();
        let want = names(&["10.0.0.5", "nats"]);
        assert_eq!(decide(None, &want, &policy, day(1)), Decision::Generate);
        let (ca, m) = site(&["10.0.0.5", "nats"], 825);
        let ex = existing(&ca, &m);
        assert_eq!(decide(Some(&ex), &want, &policy, day(1)), Decision::Keep);
        assert_eq!(decide(Some(&ex), &names(&["nats"]), &policy, day(1)), Decision::Keep);
        assert_eq!(
            decide(Some(&ex), &names(&["10.0.0.5", "10.0.0.7"]), &policy, day(1)),
            Decision::Reissue {
                reasons: vec!["does not cover 10.0.0.7".into()]
            }
        );
        // 825 days: day 795 is the last day outside the 30-day window.
        assert_eq!(decide(Some(&ex), &want, &policy, day(794)), Decision::Keep);
        assert_eq!(
            decide(Some(&ex), &want, &policy, day(800)),
            Decision::Reissue {
                reasons: vec![format!("expires {} (within 30 days)", date(day(825)))]
            }
        );
        assert_eq!(
            decide(Some(&ex), &want, &policy, day(900)),
            Decision::Reissue {
                reasons: vec![format!("expired on {}", date(day(825)))]
            }
        );
    }

    #[test]
    fn decide_reissues_a_short_lived_certificate_and_a_broken_pair() {
        let policy = Policy::default();
        let want = names(&["10.0.0.5"]);
        let (ca, m) = site(&["10.0.0.5"], 20);
        let Decision::Reissue { reasons } = decide(Some(&existing(&ca, &m)), &want, &policy, day(0)) else {
            panic!("a 20-day certificate must be re-issued")
        };
        assert_eq!(reasons, [format!("expires {} (within 30 days)", date(day(20)))]);
        // Another key in place, another CA's certificate, files missing.
        let (other_ca, other) = site(&["10.0.0.5"], 825);
        let mut ex = existing(&ca, &m);
        ex.key_pem = Some(other.key_pem.clone());
        ex.cert_pem = Some(other.cert_pem.clone());
        let Decision::Reissue { reasons } = decide(
            Some(&ex),
            &want,
            &Policy {
                renew_within_days: 1,
                ..policy
            },
            day(0),
        ) else {
            panic!("another CA's certificate must be re-issued")
        };
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(
            reasons[0].starts_with("certs/nats-server.crt: bad signature"),
            "{reasons:?}"
        );
        ex.key_pem = None;
        ex.ca_pem = None;
        let Decision::Reissue { reasons } = decide(Some(&ex), &want, &policy, day(0)) else {
            panic!("missing files must be re-issued")
        };
        assert_eq!(reasons, ["certs/ca.crt is missing", "certs/nats-server.key is missing"]);
        // A published CA that is not the generated one is the operator's: never replaced.
        let mut ex = existing(&ca, &m);
        ex.ca_pem = Some(other_ca.cert_pem.clone());
        assert_eq!(decide(Some(&ex), &want, &policy, day(0)), Decision::Operator);
        // Files bkbundle did not write, without a generated CA: the operator's.
        let ex = Existing {
            site_ca: None,
            ca_pem: None,
            cert_pem: Some(m.cert_pem.clone()),
            key_pem: None,
        };
        assert_eq!(decide(Some(&ex), &want, &policy, day(0)), Decision::Operator);
    }

    fn operator(ca_pem: &str, cert_pem: &str, key_pem: &str) -> OperatorFiles {
        OperatorFiles {
            ca_file: "/site/ca.crt".into(),
            cert_file: "/site/nats.crt".into(),
            key_file: "/site/nats.key".into(),
            ca_pem: ca_pem.into(),
            cert_pem: cert_pem.into(),
            key_pem: zeroize::Zeroizing::new(key_pem.into()),
        }
    }

    #[test]
    fn operator_files_that_belong_together_pass() {
        let (ca, m) = site(&["10.0.0.5", "nats"], 825);
        let files = operator(&ca.cert_pem, &m.cert_pem, &m.key_pem);
        let problems = check_operator(&files, &names(&["nats", "10.0.0.5"]), &Policy::default(), day(1));
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn operator_files_every_problem_named_with_file_expected_found_and_hint() {
        let (_, m) = site(&["10.0.0.5"], 40);
        let other = generate_ca("Other CA", day(0)).unwrap();
        let (_, stranger) = site(&["10.0.0.5"], 825);
        let files = operator(&other.cert_pem, &m.cert_pem, &stranger.key_pem);
        let problems = check_operator(&files, &names(&["10.0.0.5", "10.0.0.7"]), &Policy::default(), day(20));
        let text: Vec<&str> = problems.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            text,
            [
                format!(
                    "/site/nats.crt: not signed by the CA in /site/ca.crt (issued by CN={CA_CN}, not by CN=Other CA)"
                )
                .as_str(),
                format!("/site/nats.crt: expires {} (within 30 days)", date(day(40))).as_str(),
                "/site/nats.key: does not match the certificate in /site/nats.crt (its public key differs)",
                "/site/nats.crt: does not cover 10.0.0.7 (it covers: 10.0.0.5)",
            ]
        );
        assert!(problems
            .iter()
            .all(|e| e.kind == crate::Kind::Input && !e.hints.is_empty()));
        assert!(problems[0].hints[0].starts_with("give the certificate that CA issued"));
        assert!(!format!("{problems:?}").contains(stranger.key_pem.as_str()));
    }

    #[test]
    fn operator_upstream_style_rsa_ca_and_a_server_certificate_it_signed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (ca_crt, _) = openssl_rsa(d, "ca");
        openssl(d, &["genrsa", "-traditional", "-out", "nats.key", "2048"]);
        openssl(
            d,
            &[
                "req", "-new", "-key", "nats.key", "-subj", "/CN=nats", "-out", "nats.csr",
            ],
        );
        std::fs::write(d.join("ext"), "subjectAltName=IP:10.0.0.5,DNS:nats\n").unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "nats.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                "-extfile",
                "ext",
                "-out",
                "nats.crt",
            ],
        );
        let files = operator(&ca_crt, &read(d, "nats.crt"), &read(d, "nats.key"));
        let now = SystemTime::now();
        let policy = Policy {
            renew_within_days: 7,
            ..Policy::default()
        };
        let problems = check_operator(&files, &names(&["10.0.0.5", "nats"]), &policy, now);
        assert!(problems.is_empty(), "{problems:?}");
        // The CA itself given as the server certificate: not a server certificate.
        let files = operator(&read(d, "nats.crt"), &ca_crt, &read(d, "ca.key"));
        let problems = check_operator(&files, &names(&["10.0.0.5"]), &policy, now);
        assert!(
            problems[0]
                .message
                .contains("/site/ca.crt: CN=nats is not a CA certificate"),
            "{problems:?}"
        );
    }

    #[test]
    fn operator_chain_through_an_intermediate_and_a_ca_near_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (root, _) = openssl_rsa(d, "root");
        std::fs::write(
            d.join("ca.ext"),
            "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=keyCertSign\n",
        )
        .unwrap();
        std::fs::write(
            d.join("srv.ext"),
            "subjectAltName=DNS:nats\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let sign = |csr: &str, ca: &str, ext: &str, out: &str| {
            let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    csr,
                    "-CA",
                    &ca_crt,
                    "-CAkey",
                    &ca_key,
                    "-CAcreateserial",
                    "-days",
                    "20",
                    "-extfile",
                    ext,
                    "-out",
                    out,
                ],
            );
        };
        openssl(d, &["genrsa", "-out", "inter.key", "2048"]);
        openssl(
            d,
            &[
                "req",
                "-new",
                "-key",
                "inter.key",
                "-subj",
                "/CN=inter",
                "-out",
                "inter.csr",
            ],
        );
        sign("inter.csr", "root", "ca.ext", "inter.crt");
        openssl(d, &["genrsa", "-out", "leaf.key", "2048"]);
        openssl(
            d,
            &[
                "req", "-new", "-key", "leaf.key", "-subj", "/CN=nats", "-out", "leaf.csr",
            ],
        );
        sign("leaf.csr", "inter", "srv.ext", "leaf.crt");
        let policy = Policy {
            renew_within_days: 7,
            ..Policy::default()
        };
        let now = SystemTime::now();
        let chain = format!("{}{}", read(d, "leaf.crt"), read(d, "inter.crt"));
        let files = operator(&root, &chain, &read(d, "leaf.key"));
        let problems = check_operator(&files, &names(&["nats"]), &policy, now);
        assert!(problems.is_empty(), "{problems:?}");
        // Without the intermediate the root did not sign it.
        let files = operator(&root, &read(d, "leaf.crt"), &read(d, "leaf.key"));
        let problems = check_operator(&files, &names(&["nats"]), &policy, now);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].message.contains("(issued by CN=inter, not by CN=root)"),
            "{problems:?}"
        );
        // The CA (30 days) and the certificate (20) both end within a 60-day window.
        let policy = Policy {
            renew_within_days: 60,
            ..Policy::default()
        };
        let files = operator(&root, &chain, &read(d, "leaf.key"));
        let text: Vec<String> = check_operator(&files, &names(&["nats"]), &policy, now)
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(text[0].starts_with("/site/ca.crt: the CA CN=root expires") && text[0].ends_with("(within 60 days)"));
        assert!(text[1].starts_with("/site/nats.crt: expires"), "{text:?}");
    }
}
