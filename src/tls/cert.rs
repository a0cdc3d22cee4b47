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

/// The chain check alone (the CA's own dates aside): webpki, as rustls runs it for a server.
pub(super) fn verify_chain(cert_pem: &str, ca_pem: &str, at: SystemTime) -> Result<(), String> {
    let ca_der = first_der(ca_pem).map_err(|e| format!("the CA: {e}"))?;
    let cert_der = first_der(cert_pem)?;
    let (ca, cert) = (parse(&ca_der)?, parse(&cert_der)?);
    let anchors = [webpki::anchor_from_trusted_cert(&ca_der).map_err(|e| format!("the CA is unusable ({e})"))?];
    let ee = webpki::EndEntityCert::try_from(&cert_der).map_err(|e| format!("unusable ({e})"))?;
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let result = ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &[],
        UnixTime::since_unix_epoch(since),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    );
    let Err(e) = result.map(|_| ()) else { return Ok(()) };
    let cn = |c: &x509_cert::Certificate| common_name(&c.tbs_certificate.subject);
    let from_epoch = |t: UnixTime| date(SystemTime::UNIX_EPOCH + Duration::from_secs(t.as_secs()));
    Err(match e {
        webpki::Error::CertExpired { not_after, .. } => format!("expired on {}", from_epoch(not_after)),
        webpki::Error::CertNotValidYet { not_before, .. } => format!("not valid before {}", from_epoch(not_before)),
        webpki::Error::UnknownIssuer => format!(
            "issued by CN={}, not by CN={}",
            common_name(&cert.tbs_certificate.issuer),
            cn(&ca)
        ),
        webpki::Error::InvalidSignatureForPublicKey => format!(
            "bad signature: it names CN={} as its issuer but that CA's key did not sign it",
            cn(&ca)
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
