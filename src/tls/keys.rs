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
