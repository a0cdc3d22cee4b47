//! The BK-Lite server's encryption of `secret` sidecar env values (BKLITE.md, "Secret encryption").
//!
//! key = SHA-256 of the server's Django `SECRET_KEY` (UTF-8), all 32 bytes; AES-256-CBC with a
//! random 16-byte IV and PKCS#7 padding; stored value = URL-safe base64 of IV ‖ ciphertext without
//! `=` padding. Decryption accepts the value with or without padding (and, leniently, the standard
//! base64 alphabet), so values written by the server, by this module or by hand all read back.
//!
//! A fresh IV per encryption means the same plaintext never encrypts to the same text twice:
//! callers compare secrets by decrypting what is stored, never by comparing ciphertexts.

use aes::Aes256;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use sha2::{Digest, Sha256};
use std::fmt;

type Encryptor = cbc::Encryptor<Aes256>;
type Decryptor = cbc::Decryptor<Aes256>;

const IV_LEN: usize = 16;
const BLOCK: usize = 16;

/// The AES key derived from a Django `SECRET_KEY`. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    /// Derive the key the server uses from its `SECRET_KEY` setting.
    pub fn from_django(secret_key: &str) -> SecretKey {
        SecretKey(Sha256::digest(secret_key.as_bytes()).into())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Why a stored value does not decrypt. Never carries the value or the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("it is not base64 text")]
    NotBase64,
    #[error("it holds {0} bytes, not a 16-byte IV followed by whole 16-byte AES blocks")]
    BadLength(usize),
    #[error(
        "it does not decrypt with this SECRET_KEY (bad padding): it was written with another key, or it is damaged"
    )]
    WrongKey,
    #[error("it decrypts to bytes that are not UTF-8 text: it was written with another key, or it is damaged")]
    NotUtf8,
}

/// Encrypt with a given IV (tests use fixed IVs; [`encrypt`] draws a random one).
pub fn encrypt_with_iv(key: &SecretKey, iv: [u8; IV_LEN], plaintext: &str) -> String {
    let ciphertext = Encryptor::new(&key.0.into(), &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(plaintext.as_bytes());
    let mut raw = Vec::with_capacity(IV_LEN + ciphertext.len());
    raw.extend_from_slice(&iv);
    raw.extend_from_slice(&ciphertext);
    URL_SAFE_NO_PAD.encode(raw)
}

/// Encrypt with a random IV from the kernel's CSPRNG (`/dev/urandom`).
pub fn encrypt(key: &SecretKey, plaintext: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut iv = [0u8; IV_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut iv)?;
    Ok(encrypt_with_iv(key, iv, plaintext))
}

/// Decrypt a stored value.
pub fn decrypt(key: &SecretKey, stored: &str) -> Result<String, DecryptError> {
    let text: String = stored
        .trim()
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    let raw = URL_SAFE_NO_PAD
        .decode(text.as_bytes())
        .map_err(|_| DecryptError::NotBase64)?;
    if raw.len() < IV_LEN + BLOCK || !(raw.len() - IV_LEN).is_multiple_of(BLOCK) {
        return Err(DecryptError::BadLength(raw.len()));
    }
    let (iv, ciphertext) = raw.split_at(IV_LEN);
    let mut iv_arr = [0u8; IV_LEN];
    iv_arr.copy_from_slice(iv);
    let plain = Decryptor::new(&key.0.into(), &iv_arr.into())
        .decrypt_padded_vec_mut::<Pkcs7>(ciphertext)
        .map_err(|_| DecryptError::WrongKey)?;
    String::from_utf8(plain).map_err(|_| DecryptError::NotUtf8)
}

/// Length of the stored text for a plaintext of `len` bytes (to check a column's limit before
/// writing): base64 without padding of IV + the padded ciphertext.
pub fn encrypted_len(len: usize) -> usize {
    let bytes = IV_LEN + (len / BLOCK + 1) * BLOCK;
    (bytes * 4).div_ceil(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors computed independently with Python `cryptography` (AES-CBC, PKCS7 padder,
    /// `hashlib.sha256(SECRET_KEY.encode())`, `base64.urlsafe_b64encode`), padding as it printed.
    const VECTORS: &[(&str, [u8; 16], &str, &str)] = &[
        (
            "django-insecure-test-key",
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            "S3cret-NATS-pw",
            "AAECAwQFBgcICQoLDA0OD_OpBr05uhQ0yhZssTT5I54=",
        ),
        (
            "django-insecure-test-key",
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            "",
            "AAECAwQFBgcICQoLDA0OD1XTlnGmKv3W9juXNDP3WoY=",
        ),
        (
            "django-insecure-test-key",
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            "exactly16bytes!!",
            "AAECAwQFBgcICQoLDA0OD0liPcPgouHn3IM3KVVsIg3w9etbtdfBL4e13_kYYkZS",
        ),
        (
            "密钥-ключ",
            [0xa5; 16],
            "pässwörd",
            "paWlpaWlpaWlpaWlpaWlpSruBHok20v20ST2kcuar50=",
        ),
    ];

    #[test]
    fn fixed_iv_vectors_match_an_independent_implementation() {
        for (sk, iv, plain, expected) in VECTORS {
            let key = SecretKey::from_django(sk);
            let ours = encrypt_with_iv(&key, *iv, plain);
            assert_eq!(
                ours,
                expected.trim_end_matches('='),
                "{plain:?}: written without `=` padding"
            );
            assert_eq!(ours.len(), encrypted_len(plain.len()));
            // Both the padded (as Python prints it) and the unpadded form decrypt.
            assert_eq!(decrypt(&key, expected).unwrap(), *plain);
            assert_eq!(decrypt(&key, &ours).unwrap(), *plain);
        }
    }

    #[test]
    fn random_ivs_differ_and_round_trip() {
        let key = SecretKey::from_django("k");
        let a = encrypt(&key, "same").unwrap();
        let b = encrypt(&key, "same").unwrap();
        assert_ne!(a, b, "a fresh IV each time");
        assert!(!a.contains('=') && !a.contains('+') && !a.contains('/'));
        assert_eq!(decrypt(&key, &a).unwrap(), "same");
        assert_eq!(decrypt(&key, &b).unwrap(), "same");
    }

    #[test]
    fn wrong_key_and_damage_are_told_apart() {
        let (sk, iv, _, stored) = VECTORS[0];
        let other = SecretKey::from_django("another-key");
        assert!(matches!(
            decrypt(&other, stored),
            Err(DecryptError::WrongKey | DecryptError::NotUtf8)
        ));
        let key = SecretKey::from_django(sk);
        assert_eq!(decrypt(&key, "not base64!"), Err(DecryptError::NotBase64));
        assert_eq!(
            decrypt(&key, &URL_SAFE_NO_PAD.encode(iv)),
            Err(DecryptError::BadLength(16))
        );
        // Standard alphabet is accepted too.
        let std_alphabet = stored.replace('-', "+").replace('_', "/");
        assert_eq!(decrypt(&key, &std_alphabet).unwrap(), "S3cret-NATS-pw");
    }

    #[test]
    fn debug_hides_the_key() {
        assert_eq!(format!("{:?}", SecretKey::from_django("x")), "SecretKey(<redacted>)");
    }
}
