//! Reading certificates: what one says (names, validity, issuer), whether a CA signed it, and
//! which names it leaves uncovered. x509-cert reads the fields; rustls-webpki, the verifier rustls
//! itself uses, judges the chain, so "signed" here means what the NATS clients will accept.

use super::{date, Name};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::der::oid::AssociatedOid;
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, SubjectAltName};

/// The common name attribute (2.5.4.3).
const CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

/// What a certificate says, for decisions and messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject_cn: String,
    pub issuer_cn: String,
    /// Its subject alternative names (DNS names keep a leading `*.` wildcard).
    pub names: Vec<Name>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// SHA-256 of the DER, lower-case hex.
    pub sha256_fingerprint: String,
    /// basicConstraints says CA:TRUE.
    pub is_ca: bool,
}

/// The first certificate of a PEM text, as DER.
pub(super) fn first_der(pem: &str) -> Result<CertificateDer<'static>, String> {
    match CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
        Some(Ok(der)) => Ok(der),
        Some(Err(e)) => Err(format!("not a PEM certificate ({e})")),
        None => Err("no PEM certificate (`-----BEGIN CERTIFICATE-----`) in it".into()),
    }
}

pub(super) fn parse(der: &[u8]) -> Result<x509_cert::Certificate, String> {
    x509_cert::Certificate::from_der(der).map_err(|e| format!("not a valid X.509 certificate ({e})"))
}

/// What the first certificate of `pem` says.
pub fn inspect(pem: &str) -> Result<CertInfo, String> {
    let der = first_der(pem)?;
    let cert = parse(&der)?;
    let tbs = &cert.tbs_certificate;
    let mut names = Vec::new();
    let mut is_ca = false;
    for ext in tbs.extensions.iter().flatten() {
        let value = ext.extn_value.as_bytes();
        if ext.extn_id == SubjectAltName::OID {
            let san = SubjectAltName::from_der(value).map_err(|e| format!("bad subjectAltName ({e})"))?;
            names.extend(san.0.iter().filter_map(san_name));
        } else if ext.extn_id == BasicConstraints::OID {
            is_ca = BasicConstraints::from_der(value)
                .map_err(|e| format!("bad basicConstraints ({e})"))?
                .ca;
        }
    }
    let at = |t: x509_cert::time::Time| {
        SystemTime::UNIX_EPOCH
            .checked_add(t.to_unix_duration())
            .ok_or_else(|| "a validity date out of range".to_string())
    };
    Ok(CertInfo {
        subject_cn: common_name(&tbs.subject),
        issuer_cn: common_name(&tbs.issuer),
        names,
        not_before: at(tbs.validity.not_before)?,
        not_after: at(tbs.validity.not_after)?,
        sha256_fingerprint: crate::digest::sha256_hex(&der),
        is_ca,
    })
}

fn san_name(g: &GeneralName) -> Option<Name> {
    match g {
        GeneralName::DnsName(d) => Some(Name::Dns(d.as_str().trim_end_matches('.').to_ascii_lowercase())),
        GeneralName::IpAddress(o) => match o.as_bytes().len() {
            4 => <[u8; 4]>::try_from(o.as_bytes())
                .ok()
                .map(|b| Name::Ip(IpAddr::from(b))),
            16 => <[u8; 16]>::try_from(o.as_bytes())
                .ok()
                .map(|b| Name::Ip(IpAddr::from(b))),
            _ => None,
        },
        _ => None,
    }
}

/// The first CN of a name (empty when it has none), as text for messages.
fn common_name(name: &x509_cert::name::Name) -> String {
    name.0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == CN)
        .map(|atv| String::from_utf8_lossy(atv.value.value()).into_owned())
        .unwrap_or_default()
}

/// The names of `wanted` that `cert` does not cover: an IP address needs an IP SAN equal to it, a
/// DNS name a DNS SAN equal to it (any case) or a wildcard `*.rest` standing for its first label.
pub fn uncovered(cert: &CertInfo, wanted: &[Name]) -> Vec<Name> {
    wanted
        .iter()
        .filter(|w| !cert.names.iter().any(|n| covers(n, w)))
        .cloned()
        .collect()
}

fn covers(san: &Name, wanted: &Name) -> bool {
    match (san, wanted) {
        (Name::Ip(a), Name::Ip(b)) => a == b,
        (Name::Dns(pattern), Name::Dns(host)) => {
            if pattern.eq_ignore_ascii_case(host) {
                return true;
            }
            match (pattern.strip_prefix("*."), host.split_once('.')) {
                (Some(rest), Some((first, host_rest))) => !first.is_empty() && rest.eq_ignore_ascii_case(host_rest),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Whether `ca_pem`'s CA signed `cert_pem` and both are valid at `at`; the reason when not
/// (expired, not yet valid, issued by another CA, bad signature, not a server certificate).
pub fn signed_by(cert_pem: &str, ca_pem: &str, at: SystemTime) -> Result<(), String> {
    let ca = super::inspect(ca_pem).map_err(|e| format!("the CA: {e}"))?;
    if at > ca.not_after {
        return Err(format!("the CA CN={} expired on {}", ca.subject_cn, date(ca.not_after)));
    }
    if at < ca.not_before {
        return Err(format!(
            "the CA CN={} is not valid before {}",
            ca.subject_cn,
            date(ca.not_before)
        ));
    }
    verify_chain(cert_pem, ca_pem, at)
}

/// Every certificate of a PEM text, in order (at least one).
fn all_ders(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let all = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate ({e})"))?;
    if all.is_empty() {
        return Err("no PEM certificate (`-----BEGIN CERTIFICATE-----`) in it".into());
    }
    Ok(all)
}

/// The chain check alone (the CA's own dates aside): webpki, as rustls runs it for a server.
/// Every certificate in `ca_pem` is trusted (a CA bundle); certificates after the first in
/// `cert_pem` are intermediates (a server certificate file with its chain, as NATS reads it).
pub(super) fn verify_chain(cert_pem: &str, ca_pem: &str, at: SystemTime) -> Result<(), String> {
    let ca_ders = all_ders(ca_pem).map_err(|e| format!("the CA: {e}"))?;
    let mut chain = all_ders(cert_pem)?;
    let cert_der = chain.remove(0);
    let cert = parse(&cert_der)?;
    let anchors = ca_ders
        .iter()
        .map(|der| webpki::anchor_from_trusted_cert(der).map_err(|e| format!("the CA is unusable ({e})")))
        .collect::<Result<Vec<_>, _>>()?;
    let ee = webpki::EndEntityCert::try_from(&cert_der).map_err(|e| format!("unusable ({e})"))?;
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let result = ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain,
        UnixTime::since_unix_epoch(since),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    );
    let Err(e) = result.map(|_| ()) else { return Ok(()) };
    let ca_names = ca_ders
        .iter()
        .map(|der| parse(der).map(|c| format!("CN={}", common_name(&c.tbs_certificate.subject))))
        .collect::<Result<Vec<_>, _>>()?
        .join(" or ");
    let from_epoch = |t: UnixTime| {
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(t.as_secs()))
            .map_or_else(|| format!("{} s after 1970", t.as_secs()), date)
    };
    Err(match e {
        webpki::Error::CertExpired { not_after, .. } => format!("expired on {}", from_epoch(not_after)),
        webpki::Error::CertNotValidYet { not_before, .. } => format!("not valid before {}", from_epoch(not_before)),
        webpki::Error::UnknownIssuer => format!(
            "issued by CN={}, not by {ca_names}",
            common_name(&cert.tbs_certificate.issuer)
        ),
        webpki::Error::InvalidSignatureForPublicKey => format!(
            "bad signature: it names CN={} as its issuer but that CA's key did not sign it",
            common_name(&cert.tbs_certificate.issuer)
        ),
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            "not for servers (its extended key usage lacks serverAuth)".into()
        }
        webpki::Error::CaUsedAsEndEntity => "a CA certificate, not a server certificate".into(),
        other => format!("rejected by the verifier ({other})"),
    })
}

/// Whether two PEM texts hold the same certificate (their first, compared as DER).
pub(super) fn same_certificate(a: &str, b: &str) -> bool {
    match (first_der(a), first_der(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// A certificate's public key, for the key checks.
pub(super) struct PublicKey {
    /// The AlgorithmIdentifier as DER (to wrap a SEC1 key into PKCS#8).
    pub algorithm_der: Vec<u8>,
    pub algorithm: ObjectIdentifier,
    /// The named curve of an EC key.
    pub curve: Option<ObjectIdentifier>,
    /// The subjectPublicKey bits (an EC point, an RSAPublicKey, an Ed25519 key).
    pub bits: Vec<u8>,
}

pub(super) fn public_key(cert_pem: &str) -> Result<PublicKey, String> {
    let cert = parse(&first_der(cert_pem)?)?;
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let algorithm_der = spki
        .algorithm
        .to_der()
        .map_err(|e| format!("its key algorithm cannot be encoded ({e})"))?;
    Ok(PublicKey {
        algorithm_der,
        algorithm: spki.algorithm.oid,
        curve: spki.algorithm.parameters.as_ref().and_then(|p| p.decode_as().ok()),
        bits: spki.subject_public_key.raw_bytes().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_support::{day, names, openssl_rsa, site};
    use crate::tls::{generate_ca, issue_server, Policy, CA_CN};

    #[test]
    fn generated_ca_and_server_certificate_read_back() {
        let (ca, m) = site(&["10.0.0.5", "nats.example.com", "fd00::5"], 825);
        let info = inspect(&ca.cert_pem).unwrap();
        assert_eq!((info.subject_cn.as_str(), info.issuer_cn.as_str()), (CA_CN, CA_CN));
        assert!(info.is_ca && info.names.is_empty());
        // Ten years from day 0, started a day early.
        assert_eq!(info.not_after, day(3650));
        assert_eq!(info.not_before, day(0) - Duration::from_secs(86_400));
        let s = inspect(&m.cert_pem).unwrap();
        assert_eq!((s.subject_cn.as_str(), s.issuer_cn.as_str()), ("10.0.0.5", CA_CN));
        assert_eq!(s.names, names(&["10.0.0.5", "nats.example.com", "fd00::5"]));
        assert!(!s.is_ca);
        assert_eq!(s.not_after, day(825));
        assert_eq!(s.sha256_fingerprint.len(), 64);
        assert_ne!(s.sha256_fingerprint, info.sha256_fingerprint);
        assert_eq!(m.ca_pem, ca.cert_pem);
        signed_by(&m.cert_pem, &ca.cert_pem, day(1)).unwrap();
        assert!(uncovered(&s, &names(&["10.0.0.5", "NATS.example.com.", "fd00::5"])).is_empty());
        assert_eq!(
            uncovered(&s, &names(&["10.0.0.7", "nats.example.com", "other.example.com"])),
            names(&["10.0.0.7", "other.example.com"])
        );
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused_with_both_names() {
        let (_, m) = site(&["10.0.0.5"], 825);
        let other = generate_ca("Other CA", day(0)).unwrap();
        let e = signed_by(&m.cert_pem, &other.cert_pem, day(1)).unwrap_err();
        assert_eq!(e, format!("issued by CN={CA_CN}, not by CN=Other CA"));
        // Same name, another key: the signature does not verify.
        let twin = generate_ca(CA_CN, day(0)).unwrap();
        let e = signed_by(&m.cert_pem, &twin.cert_pem, day(1)).unwrap_err();
        assert!(e.starts_with("bad signature"), "{e}");
        // A CA is not a server certificate.
        let e = signed_by(&twin.cert_pem, &twin.cert_pem, day(1)).unwrap_err();
        assert!(e.contains("CA certificate"), "{e}");
    }

    #[test]
    fn dates_are_checked_for_the_certificate_and_the_ca() {
        let (ca, m) = site(&["10.0.0.5"], 40);
        let e = signed_by(&m.cert_pem, &ca.cert_pem, day(41)).unwrap_err();
        assert_eq!(e, format!("expired on {}", crate::tls::date(day(40))));
        let e = signed_by(&m.cert_pem, &ca.cert_pem, day(0) - Duration::from_secs(3 * 86_400)).unwrap_err();
        assert!(e.starts_with("the CA CN=BK-Lite site CA is not valid before"), "{e}");
        let e = signed_by(&m.cert_pem, &ca.cert_pem, day(3651)).unwrap_err();
        assert!(e.starts_with("the CA CN=BK-Lite site CA expired on"), "{e}");
        // A certificate asked to outlive its CA ends with it.
        let policy = Policy {
            validity_days: 3650,
            ..Policy::default()
        };
        let late = issue_server(&ca, &names(&["10.0.0.5"]), &policy, day(3000)).unwrap();
        assert_eq!(inspect(&late.cert_pem).unwrap().not_after, day(3650));
    }

    #[test]
    fn wildcards_cover_one_label_and_ips_only_ips() {
        let cert = CertInfo {
            subject_cn: String::new(),
            issuer_cn: String::new(),
            names: vec![Name::Dns("*.example.com".into()), Name::Ip("10.0.0.5".parse().unwrap())],
            not_before: day(0),
            not_after: day(1),
            sha256_fingerprint: String::new(),
            is_ca: false,
        };
        assert!(uncovered(&cert, &names(&["nats.example.com", "10.0.0.5", "A.EXAMPLE.COM"])).is_empty());
        assert_eq!(
            uncovered(&cert, &names(&["example.com", "a.b.example.com", "10.0.0.6"])),
            names(&["example.com", "a.b.example.com", "10.0.0.6"])
        );
        // An IP written as a DNS SAN does not cover the IP (clients compare IP SANs only).
        let dns_ip = CertInfo {
            names: vec![Name::Dns("10.0.0.5".into())],
            ..cert
        };
        assert_eq!(uncovered(&dns_ip, &names(&["10.0.0.5"])), names(&["10.0.0.5"]));
    }

    #[test]
    fn reads_an_openssl_made_rsa_certificate_and_refuses_what_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        let (crt, _) = openssl_rsa(dir.path(), "Upstream CA");
        let info = inspect(&crt).unwrap();
        assert_eq!((info.subject_cn.as_str(), info.is_ca), ("Upstream CA", true));
        assert!(inspect("hello").unwrap_err().contains("no PEM certificate"));
        let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(inspect(broken).unwrap_err().contains("not a valid X.509 certificate"));
    }
}
