//! Does a private key belong to a certificate? ring loads the key (it checks that the private and
//! public halves agree) and its public key is compared with the certificate's. Nothing here ever
//! formats key material: errors say which form was found, never the bytes.

use super::cert;
use ring::signature::{self, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use x509_cert::der::asn1::ObjectIdentifier;
use zeroize::Zeroizing;

const RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// Whether `key_pem` is the private key of the first certificate in `cert_pem`. Reads PKCS#8
/// (`BEGIN PRIVATE KEY`: EC P-256/P-384, RSA, Ed25519), PKCS#1 RSA (`BEGIN RSA PRIVATE KEY`, what
/// `openssl genrsa` writes) and SEC1 EC (`BEGIN EC PRIVATE KEY`). A key of another type than the
/// certificate's is `Ok(false)`; a key that cannot be read at all is the error.
pub fn key_matches(cert_pem: &str, key_pem: &str) -> Result<bool, String> {
    if key_pem.contains("ENCRYPTED") {
        return Err("the private key is encrypted: give it decrypted (`openssl pkey -in KEY -out PLAIN`)".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            "no PEM private key (`-----BEGIN PRIVATE KEY-----`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`) in it"
                .to_string()
        }
        other => format!("not a readable PEM private key ({other})"),
    })?;
    let cert_key = cert::public_key(cert_pem)?;
    if let PrivateKeyDer::Pkcs8(k) = &key {
        if pkcs8_algorithm(k.secret_pkcs8_der()) != Some(cert_key.algorithm) {
            return Ok(false);
        }
    }
    let found = match (&key, cert_key.algorithm) {
        (PrivateKeyDer::Pkcs1(k), RSA) => rsa_public(signature::RsaKeyPair::from_der(k.secret_pkcs1_der()))?,
        (PrivateKeyDer::Pkcs8(k), RSA) => rsa_public(signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()))?,
        (PrivateKeyDer::Pkcs8(k), ED25519) => {
            match signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(k.secret_pkcs8_der()) {
                Ok(pair) => Some(pair.public_key().as_ref().to_vec()),
                Err(_) => None,
            }
        }
        (PrivateKeyDer::Pkcs8(k), EC) => ec_public(&cert_key, k.secret_pkcs8_der())?,
        (PrivateKeyDer::Sec1(k), EC) => {
            // ring reads EC keys only as PKCS#8: wrap the SEC1 structure with the certificate's
            // algorithm identifier (a SEC1 key for another curve is then refused by ring).
            ec_public(
                &cert_key,
                &pkcs8_from_sec1(&cert_key.algorithm_der, k.secret_sec1_der()),
            )?
        }
        _ => None,
    };
    Ok(found.is_some_and(|k| k == cert_key.bits))
}

/// The key algorithm a PKCS#8 `PrivateKeyInfo { version, algorithm, ... }` names.
fn pkcs8_algorithm(der: &[u8]) -> Option<ObjectIdentifier> {
    use x509_cert::der::asn1::AnyRef;
    use x509_cert::der::{Decode, SliceReader};
    let outer = AnyRef::from_der(der).ok()?;
    let mut fields = SliceReader::new(outer.value()).ok()?;
    let _version = AnyRef::decode(&mut fields).ok()?;
    let algorithm = x509_cert::spki::AlgorithmIdentifierRef::decode(&mut fields).ok()?;
    Some(algorithm.oid)
}

fn rsa_public(pair: Result<signature::RsaKeyPair, ring::error::KeyRejected>) -> Result<Option<Vec<u8>>, String> {
    match pair {
        Ok(pair) => Ok(Some(pair.public().as_ref().to_vec())),
        Err(e) => Err(format!("an RSA private key ring refuses ({e})")),
    }
}

/// The public key of an EC private key (PKCS#8) on the curve of the certificate's key, `None`
/// when the key is on another curve.
fn ec_public(cert_key: &cert::PublicKey, pkcs8: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let rng = ring::rand::SystemRandom::new();
    let alg = match cert_key.curve {
        Some(P256) => &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        Some(P384) => &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
        other => {
            let curve = other.map_or_else(|| "none".to_string(), |c| c.to_string());
            return Err(format!(
                "the certificate's EC key is on curve {curve} (P-256 and P-384 are supported)"
            ));
        }
    };
    match signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8, &rng) {
        Ok(pair) => Ok(Some(pair.public_key().as_ref().to_vec())),
        Err(_) => Ok(None),
    }
}

/// PKCS#8 `PrivateKeyInfo { version 0, algorithm, privateKey OCTET STRING (the SEC1 key) }`.
fn pkcs8_from_sec1(alg_der: &[u8], sec1: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut body = Zeroizing::new(vec![0x02, 0x01, 0x00]);
    body.extend_from_slice(alg_der);
    body.extend_from_slice(&tlv(0x04, sec1));
    tlv(0x30, &body)
}

/// One DER tag-length-value (definite length, short or long form), wiped when dropped since it
/// may hold a key.
fn tlv(tag: u8, content: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(vec![tag]);
    let len = content.len().to_be_bytes();
    let significant: Vec<u8> = len.into_iter().skip_while(|b| *b == 0).collect();
    match significant.as_slice() {
        [] => out.push(0),
        [n] if *n < 0x80 => out.push(*n),
        // At most 8 length bytes (a usize): 0x80 | 8 fits.
        more => {
            out.push(0x80 | more.len() as u8);
            out.extend_from_slice(more);
        }
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_support::{openssl, openssl_rsa, read, site};

    #[test]
    fn generated_ec_key_matches_its_certificate_only() {
        let (ca, m) = site(&["10.0.0.5"], 825);
        assert_eq!(key_matches(&m.cert_pem, &m.key_pem), Ok(true));
        assert_eq!(key_matches(&ca.cert_pem, &ca.key_pem), Ok(true));
        assert_eq!(key_matches(&m.cert_pem, &ca.key_pem), Ok(false));
        assert_eq!(key_matches(&ca.cert_pem, &m.key_pem), Ok(false));
    }

    #[test]
    fn openssl_rsa_pkcs1_key_from_genrsa_matches_and_another_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = openssl_rsa(dir.path(), "upstream");
        let (other_crt, other_key) = openssl_rsa(dir.path(), "other");
        assert_eq!(key_matches(&crt, &key), Ok(true));
        assert_eq!(key_matches(&other_crt, &other_key), Ok(true));
        assert_eq!(key_matches(&crt, &other_key), Ok(false));
        // The same RSA key as PKCS#8 (`BEGIN PRIVATE KEY`).
        openssl(
            dir.path(),
            &["pkcs8", "-topk8", "-nocrypt", "-in", "upstream.key", "-out", "p8.key"],
        );
        let p8 = read(dir.path(), "p8.key");
        assert!(p8.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(key_matches(&crt, &p8), Ok(true));
        // An EC key for an RSA certificate, and the reverse: not the key.
        let (_, m) = site(&["10.0.0.5"], 825);
        assert_eq!(key_matches(&crt, &m.key_pem), Ok(false));
        assert_eq!(key_matches(&m.cert_pem, &key), Ok(false));
    }

    #[test]
    fn openssl_sec1_p384_and_ed25519_keys() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let selfsigned = |key: &str, crt: &str| {
            openssl(
                d,
                &[
                    "req", "-x509", "-new", "-key", key, "-days", "30", "-subj", "/CN=t", "-out", crt,
                ],
            );
            read(d, crt)
        };
        for (curve, key) in [("prime256v1", "p256.key"), ("secp384r1", "p384.key")] {
            openssl(d, &["ecparam", "-name", curve, "-genkey", "-noout", "-out", key]);
            let sec1 = read(d, key);
            assert!(
                sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"),
                "{curve}: SEC1 expected"
            );
            let crt = selfsigned(key, &format!("{curve}.crt"));
            assert_eq!(key_matches(&crt, &sec1), Ok(true), "{curve} SEC1");
            openssl(d, &["pkcs8", "-topk8", "-nocrypt", "-in", key, "-out", "p8.key"]);
            assert_eq!(key_matches(&crt, &read(d, "p8.key")), Ok(true), "{curve} PKCS#8");
        }
        // A P-256 SEC1 key against the P-384 certificate: not its key.
        assert_eq!(key_matches(&read(d, "secp384r1.crt"), &read(d, "p256.key")), Ok(false));
        openssl(
            d,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "other.key",
            ],
        );
        assert_eq!(
            key_matches(&read(d, "prime256v1.crt"), &read(d, "other.key")),
            Ok(false)
        );
        openssl(d, &["genpkey", "-algorithm", "ed25519", "-out", "ed.key"]);
        openssl(d, &["genpkey", "-algorithm", "ed25519", "-out", "ed2.key"]);
        let crt = selfsigned("ed.key", "ed.crt");
        assert_eq!(key_matches(&crt, &read(d, "ed.key")), Ok(true));
        assert_eq!(key_matches(&crt, &read(d, "ed2.key")), Ok(false));
    }

    #[test]
    fn unreadable_and_encrypted_keys_are_errors_that_print_no_key() {
        let (_, m) = site(&["10.0.0.5"], 825);
        let e = key_matches(&m.cert_pem, "not a key").unwrap_err();
        assert!(e.starts_with("no PEM private key"), "{e}");
        let e = key_matches(
            &m.cert_pem,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap_err();
        assert!(e.contains("encrypted"), "{e}");
        // A certificate instead of a key.
        assert!(key_matches(&m.cert_pem, &m.cert_pem).is_err());
    }

    #[test]
    fn long_der_lengths_are_encoded_in_long_form() {
        assert_eq!(tlv(0x04, &[1, 2]).as_slice(), [0x04, 2, 1, 2]);
        let long = tlv(0x04, &[0; 300]);
        assert_eq!(&long[..4], [0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(long.len(), 304);
        assert_eq!(&tlv(0x30, &[0; 128])[..3], [0x30, 0x81, 0x80]);
    }
}
