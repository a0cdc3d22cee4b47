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

fn backdated(t: OffsetDateTime) -> Result<OffsetDateTime> {
    t.checked_sub(BACKDATE)
        .ok_or_else(|| Error::internal("the clock is outside the dates a certificate can hold"))
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
    let params = ca_params(cn, backdated(start)?, days_after(start, CA_DAYS)?);
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
    params.not_before = backdated(start)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_support::{names, openssl, site};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};
    use std::io::{Read, Write};
    use std::sync::Arc;

    #[test]
    fn debug_never_prints_a_private_key() {
        let (ca, m) = site(&["10.0.0.5"], 825);
        for (printed, key) in [
            (format!("{m:?}"), m.key_pem.as_str()),
            (format!("{ca:?}"), ca.key_pem.as_str()),
            (format!("{m:#?}"), m.key_pem.as_str()),
        ] {
            assert!(
                printed.contains("<redacted>") && printed.contains("BEGIN CERTIFICATE"),
                "{printed}"
            );
            assert!(!printed.contains("PRIVATE KEY"), "{printed}");
            let body: String = key.lines().nth(1).unwrap().into();
            assert!(!printed.contains(&body), "a line of the key is printed: {printed}");
        }
    }

    /// Move everything `from` wants to send into `to`.
    fn pump(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rest = &wire[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets()?;
        }
        Ok(())
    }

    /// A TLS handshake in memory between a rustls server holding `m`'s certificate and key and a
    /// rustls client trusting only `m`'s CA and asking for `server_name`; then one message each way.
    fn handshake(m: &Material, server_name: &str) -> Result<(), rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = vec![CertificateDer::from_pem_slice(m.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(m.key_pem.as_bytes()).unwrap();
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(m.ca_pem.as_bytes()).unwrap())?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(server_name.to_string()).unwrap();
        let mut c = Connection::from(ClientConnection::new(Arc::new(client), name)?);
        let mut s = Connection::from(ServerConnection::new(Arc::new(server))?);
        for _ in 0..10 {
            pump(&mut c, &mut s)?;
            pump(&mut s, &mut c)?;
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        assert!(
            !c.is_handshaking() && !s.is_handshaking(),
            "the handshake did not finish"
        );
        c.writer().write_all(b"PING\r\n").unwrap();
        pump(&mut c, &mut s)?;
        let mut got = [0u8; 6];
        s.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"PING\r\n");
        Ok(())
    }

    #[test]
    fn rustls_accepts_the_generated_chain_for_an_ip_and_a_dns_name() {
        let ca = generate_ca(CA_CN, SystemTime::now()).unwrap();
        let wanted = names(&["10.0.0.5", "nats.example.com", "fd00::5"]);
        let m = issue_server(&ca, &wanted, &Policy::default(), SystemTime::now()).unwrap();
        for name in ["10.0.0.5", "nats.example.com", "fd00::5"] {
            handshake(&m, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        // A name the certificate does not cover, and another CA: the client refuses.
        let e = handshake(&m, "10.0.0.7").unwrap_err();
        assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e}");
        let other = generate_ca("Other CA", SystemTime::now()).unwrap();
        let mixed = Material {
            ca_pem: other.cert_pem.clone(),
            cert_pem: m.cert_pem.clone(),
            key_pem: m.key_pem.clone(),
        };
        let e = handshake(&mixed, "10.0.0.5").unwrap_err();
        assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e}");
    }

    #[test]
    fn openssl_strict_verification_accepts_the_generated_chain() {
        // OpenSSL's X.509 strict mode (Python 3.13's ssl default, so nats-py's) wants the key
        // identifiers and constraints RFC 5280 asks for.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = generate_ca(CA_CN, SystemTime::now()).unwrap();
        let m = issue_server(
            &ca,
            &names(&["10.0.0.5", "nats"]),
            &Policy::default(),
            SystemTime::now(),
        )
        .unwrap();
        std::fs::write(d.join("ca.crt"), &m.ca_pem).unwrap();
        std::fs::write(d.join("server.crt"), &m.cert_pem).unwrap();
        let ok = openssl(
            d,
            &[
                "verify",
                "-x509_strict",
                "-purpose",
                "sslserver",
                "-verify_ip",
                "10.0.0.5",
                "-CAfile",
                "ca.crt",
                "server.crt",
            ],
        );
        assert!(ok.contains("server.crt: OK"), "{ok}");
        openssl(
            d,
            &[
                "verify",
                "-x509_strict",
                "-verify_hostname",
                "nats",
                "-CAfile",
                "ca.crt",
                "server.crt",
            ],
        );
        let text = openssl(d, &["x509", "-noout", "-text", "-in", "server.crt"]);
        for needle in ["TLS Web Server Authentication", "Authority Key Identifier", "CA:FALSE"] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
    }

    #[test]
    fn nothing_to_issue_for_and_an_expired_ca_are_refused() {
        let (ca, _) = site(&["10.0.0.5"], 825);
        let now = crate::tls::test_support::day(1);
        assert!(issue_server(&ca, &[], &Policy::default(), now).is_err());
        let late = crate::tls::test_support::day(3651);
        let e = issue_server(&ca, &names(&["10.0.0.5"]), &Policy::default(), late).unwrap_err();
        assert!(
            e.message.contains("expired on") && e.kind == crate::Kind::Input,
            "{}",
            e.message
        );
    }
}
