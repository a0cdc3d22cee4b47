//! Making the site CA and the NATS server certificate (rcgen, ECDSA P-256: what NATS, rustls, Go
//! and OpenSSL all accept, with small keys and fast handshakes).

use super::{cert, Name, Policy};
use crate::error::{Error, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::fmt;
use std::time::SystemTime;
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// The subject CN of the CA bkbundle generates.
pub const CA_CN: &str = "BK-Lite site CA";
/// The generated CA lives ten years: agents carry it in their packages, so it should outlast
/// many server certificates.
const CA_DAYS: i64 = 3650;
/// Certificates start this long before they are made (hosts without a time source drift).
const BACKDATE: time::Duration = time::Duration::days(1);

/// The CA bkbundle generated for the site: its certificate and its private key (PKCS#8 PEM).
pub struct SiteCa {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

/// What the NATS server needs: the CA to publish, its certificate and private key (PKCS#8 PEM).
pub struct Material {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

// By hand, so that no `{:?}` (a log line, a panic message) can ever print a private key.
impl fmt::Debug for SiteCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteCa")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn rcgen_error(what: &str, e: rcgen::Error) -> Error {
    Error::internal(format!("{what}: {e}"))
}

/// `t` as rcgen's time, whole seconds.
fn datetime(t: SystemTime) -> Result<OffsetDateTime> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok());
    secs.ok_or_else(|| Error::internal("the clock is outside the dates a certificate can hold"))
}

fn days_after(t: OffsetDateTime, days: i64) -> Result<OffsetDateTime> {
    t.checked_add(time::Duration::days(days)).ok_or_else(|| {
        Error::input(format!(
            "{days} days after {t} is beyond the dates a certificate can hold"
        ))
    })
}

fn ca_params(cn: &str, not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertificateParams {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.not_before = not_before;
    params.not_after = not_after;
    // Path length 0: this CA signs server certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A new site CA named `cn`, valid ten years from `now` (ECDSA P-256, basicConstraints CA with
/// path length 0, keyCertSign).
pub fn generate_ca(cn: &str, now: SystemTime) -> Result<SiteCa> {
    let start = datetime(now)?;
    let params = ca_params(cn, start - BACKDATE, days_after(start, CA_DAYS)?);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| rcgen_error("CA key", e))?;
    let cert = params.self_signed(&key).map_err(|e| rcgen_error("CA certificate", e))?;
    Ok(SiteCa {
        cert_pem: cert.pem(),
        key_pem: Zeroizing::new(key.serialize_pem()),
    })
}

/// A new NATS server certificate from `ca` for `names` (CN the first, subject alternative names
/// all of them), with a new key, valid `policy.validity_days` from `now` but never past the CA.
pub fn issue_server(ca: &SiteCa, names: &[Name], policy: &Policy, now: SystemTime) -> Result<Material> {
    let first = names
        .first()
        .ok_or_else(|| Error::internal("a server certificate needs at least one name"))?;
    let ca_info = cert::inspect(&ca.cert_pem).map_err(|e| Error::input(format!("the site CA: {e}")))?;
    if ca_info.not_after <= now {
        return Err(Error::input(format!(
            "the site CA (CN={}) expired on {}: it can issue no certificate",
            ca_info.subject_cn,
            super::date(ca_info.not_after)
        ))
        .hint("give the site's own CA, certificate and key in [tls] of the install config"));
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| rcgen_error("the site CA's key cannot be read", e))?;
    // rcgen signs with the issuer's name and key identifier as given: rebuild them as generate_ca
    // made them, then check the result below, so a mismatch can never ship.
    let issuer = Issuer::new(
        ca_params(
            &ca_info.subject_cn,
            OffsetDateTime::UNIX_EPOCH,
            OffsetDateTime::UNIX_EPOCH,
        ),
        ca_key,
    );
    let start = datetime(now)?;
    let ca_end = datetime(ca_info.not_after)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // The CN is at most 64 characters (RFC 5280); clients read the alternative names anyway.
    let cn = first.to_string();
    dn.push(
        DnType::CommonName,
        if cn.len() <= 64 { cn.as_str() } else { "nats-server" },
    );
    params.distinguished_name = dn;
    params.not_before = start - BACKDATE;
    params.not_after = days_after(start, i64::from(policy.validity_days))?.min(ca_end);
    params.subject_alt_names = names.iter().map(san).collect::<Result<_>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    // OpenSSL's strict verification (Python 3.13's default) wants the authority key identifier.
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| rcgen_error("server key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| rcgen_error("server certificate", e))?;
    let cert_pem = cert.pem();
    cert::verify_chain(&cert_pem, &ca.cert_pem, now)
        .map_err(|e| Error::internal(format!("the server certificate just issued fails its own check: {e}")))?;
    Ok(Material {
        ca_pem: ca.cert_pem.clone(),
        cert_pem,
        key_pem: Zeroizing::new(key.serialize_pem()),
    })
}

fn san(name: &Name) -> Result<SanType> {
    Ok(match name {
        Name::Ip(ip) => SanType::IpAddress(*ip),
        Name::Dns(d) => SanType::DnsName(
            d.clone()
                .try_into()
                .map_err(|e| Error::input(format!("{d:?} cannot be a certificate name: {e}")))?,
        ),
    })
}
