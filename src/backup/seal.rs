//! Encrypted backups, with [age](https://age-encryption.org): the well-kept format and crate.
//!
//! Each backup gets a key of its own (an X25519 identity). Every payload member is an age stream
//! to that key (`*.age`): streamed, authenticated chunk by chunk, and fast (one key agreement per
//! member, no password hashing). The key itself is the member `key.age`, encrypted with the
//! operator's passphrase (scrypt, about a second of work) or to their age recipients
//! (`age1...`), so a restore asks for the passphrase once and knows before changing anything
//! whether it is right. The payloads' SHA-256 in the manifest are the encrypted bytes': `backup
//! verify` checks a backup's integrity without the passphrase, and with it opens every member.

use crate::error::{Error, Result};
use age::secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::str::FromStr;

/// The member that holds the backup's own key.
pub const KEY_MEMBER: &str = "key.age";
/// The extension of an encrypted member.
pub const SUFFIX: &str = ".age";

/// How a backup is encrypted (`[encryption]` of its manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// Always "age".
    pub method: String,
    /// The member holding the backup's key.
    pub key: String,
    /// What opens the key: "passphrase", or "recipients" (their age identities).
    pub unlock: String,
    /// The recipients the key was encrypted to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
}

/// What a backup is encrypted with (backup).
#[derive(Clone)]
pub enum SealWith {
    Passphrase(SecretString),
    /// age recipients, `age1...`.
    Recipients(Vec<String>),
}

impl std::fmt::Debug for SealWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SealWith::Passphrase(_) => f.write_str("Passphrase(..)"),
            SealWith::Recipients(r) => f.debug_tuple("Recipients").field(r).finish(),
        }
    }
}

/// What opens an encrypted backup (restore, verify).
#[derive(Clone)]
pub enum Unlock {
    Passphrase(SecretString),
    /// The text of age identity files (`AGE-SECRET-KEY-1...` lines).
    Identities(Vec<SecretString>),
}

impl std::fmt::Debug for Unlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unlock::Passphrase(_) => "Passphrase(..)",
            Unlock::Identities(_) => "Identities(..)",
        })
    }
}

/// Encrypts the members of one backup.
pub struct Sealer {
    recipient: age::x25519::Recipient,
}

/// A new key for a backup: the sealer, the `key.age` member's bytes and the manifest's section.
pub fn new_key(with: &SealWith) -> Result<(Sealer, Vec<u8>, Encryption)> {
    let key = age::x25519::Identity::generate();
    let (encryptor, unlock, recipients) = match with {
        SealWith::Passphrase(p) => (age::Encryptor::with_user_passphrase(p.clone()), "passphrase", vec![]),
        SealWith::Recipients(list) => {
            let parsed = parse_recipients(list)?;
            let e = age::Encryptor::with_recipients(parsed.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| Error::input(format!("cannot encrypt to the recipients given: {e}")))?;
            (e, "recipients", list.clone())
        }
    };
    let mut member = Vec::new();
    let mut w = encryptor
        .wrap_output(&mut member)
        .map_err(|e| Error::internal(format!("age: {e}")))?;
    w.write_all(key.to_string().expose_secret().as_bytes())
        .and_then(|_| w.finish().map(|_| ()))
        .map_err(|e| Error::internal(format!("age: {e}")))?;
    let section = Encryption {
        method: "age".into(),
        key: KEY_MEMBER.into(),
        unlock: unlock.into(),
        recipients,
    };
    Ok((
        Sealer {
            recipient: key.to_public(),
        },
        member,
        section,
    ))
}

fn parse_recipients(list: &[String]) -> Result<Vec<age::x25519::Recipient>> {
    if list.is_empty() {
        return Err(Error::input("--recipient needs at least one age recipient (age1...)"));
    }
    list.iter()
        .map(|r| {
            age::x25519::Recipient::from_str(r.trim()).map_err(|e| {
                Error::input(format!("--recipient {r:?} is not an age recipient: {e}"))
                    .hint("an age recipient looks like age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p (`age-keygen` prints one)")
            })
        })
        .collect()
}

impl Sealer {
    /// An encrypting writer over `w`; [`finish`] it to get `w` back.
    pub fn wrap<W: Write>(&self, w: W) -> std::io::Result<age::stream::StreamWriter<W>> {
        let e = age::Encryptor::with_recipients(std::iter::once(&self.recipient as &dyn age::Recipient))
            .map_err(|e| std::io::Error::other(format!("age: {e}")))?;
        e.wrap_output(w)
    }
}

/// Text that must not be shown (a passphrase, an identity file), wrapped.
pub fn secret(text: String) -> SecretString {
    SecretString::from(text)
}

/// Environment variable holding a backup's passphrase.
pub const PASSPHRASE_ENV: &str = "BKBUNDLE_BACKUP_PASSPHRASE";

/// The passphrase: `file`'s first line, else `BKBUNDLE_BACKUP_PASSPHRASE`, else on a terminal a
/// prompt (twice when `confirm`); `None` when none of them gives one.
pub fn passphrase(file: Option<&std::path::Path>, confirm: bool) -> Result<Option<SecretString>> {
    use std::io::IsTerminal;
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(|e| Error::io("cannot read the passphrase file", f, e))?;
        let line = text.lines().next().unwrap_or("").to_string();
        if line.is_empty() {
            return Err(Error::input(format!("the passphrase file {} is empty", f.display())));
        }
        return Ok(Some(SecretString::from(line)));
    }
    if let Ok(p) = std::env::var(PASSPHRASE_ENV) {
        if !p.is_empty() {
            return Ok(Some(SecretString::from(p)));
        }
    }
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    let first = rpassword::prompt_password("Backup passphrase: ")
        .map_err(|e| Error::input(format!("cannot read the passphrase: {e}")))?;
    if confirm {
        let again = rpassword::prompt_password("Backup passphrase (again): ")
            .map_err(|e| Error::input(format!("cannot read the passphrase: {e}")))?;
        if again != first {
            return Err(Error::input("the two passphrases differ: nothing was written"));
        }
    }
    if first.is_empty() {
        return Err(Error::input("an empty passphrase encrypts nothing: give one"));
    }
    Ok(Some(SecretString::from(first)))
}

/// Opens the members of one backup.
pub struct Opener {
    key: age::x25519::Identity,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Opener(..)")
    }
}

/// Open the backup's key (the `key.age` member's bytes) with what the operator gave; `backup`
/// names the file in errors.
pub fn open_key(member: &[u8], with: &Unlock, backup: &str) -> Result<Opener> {
    let decryptor = age::Decryptor::new(member).map_err(|e| damaged_key(backup, e))?;
    let wrong = |what: &str, hint: &str| {
        Error::input(format!(
            "{what} does not open backup {backup} (its key, {KEY_MEMBER}): nothing was changed"
        ))
        .hint(hint.to_string())
    };
    let reader = match with {
        Unlock::Passphrase(p) => {
            if !decryptor.is_scrypt() {
                return Err(Error::input(format!(
                    "backup {backup} was encrypted to age recipients, not with a passphrase"
                ))
                .hint("pass the matching age identity file with --identity FILE"));
            }
            let id = age::scrypt::Identity::new(p.clone());
            decryptor
                .decrypt(std::iter::once(&id as &dyn age::Identity))
                .map_err(|e| match e {
                    age::DecryptError::DecryptionFailed | age::DecryptError::NoMatchingKeys => wrong(
                        "the passphrase",
                        "check the passphrase (it is the one given when the backup was taken) and re-run",
                    ),
                    other => damaged_key(backup, other),
                })?
        }
        Unlock::Identities(texts) => {
            if decryptor.is_scrypt() {
                return Err(Error::input(format!(
                    "backup {backup} was encrypted with a passphrase, not to age recipients"
                ))
                .hint("pass the passphrase with --passphrase-file FILE or BKBUNDLE_BACKUP_PASSPHRASE"));
            }
            let ids = parse_identities(texts)?;
            decryptor
                .decrypt(ids.iter().map(|i| i as &dyn age::Identity))
                .map_err(|e| match e {
                    age::DecryptError::NoMatchingKeys | age::DecryptError::DecryptionFailed => wrong(
                        "no identity given",
                        "pass the identity file whose recipient the backup was encrypted to (`backup inspect` lists the recipients)",
                    ),
                    other => damaged_key(backup, other),
                })?
        }
    };
    let mut text = String::new();
    let mut r = reader;
    r.read_to_string(&mut text).map_err(|e| damaged_key(backup, e))?;
    let key = age::x25519::Identity::from_str(text.trim()).map_err(|e| damaged_key(backup, e))?;
    text.clear();
    Ok(Opener { key })
}

fn parse_identities(texts: &[SecretString]) -> Result<Vec<age::x25519::Identity>> {
    let mut out = Vec::new();
    for t in texts {
        for line in t.expose_secret().lines().map(str::trim) {
            if line.starts_with("AGE-SECRET-KEY-") {
                out.push(
                    age::x25519::Identity::from_str(line)
                        .map_err(|e| Error::input(format!("an age identity given is malformed: {e}")))?,
                );
            }
        }
    }
    if out.is_empty() {
        return Err(
            Error::input("no age identity (AGE-SECRET-KEY-1...) in the --identity file(s)")
                .hint("pass the file `age-keygen -o FILE` wrote"),
        );
    }
    Ok(out)
}

fn damaged_key(backup: &str, e: impl std::fmt::Display) -> Error {
    Error::bundle(format!("backup {backup}: its key ({KEY_MEMBER}) cannot be read: {e}"))
        .hint("the backup is damaged: copy it again from where it was kept and run `bkbundle backup verify`")
}

impl Opener {
    /// A decrypting reader over a member's bytes.
    pub fn reader<R: Read>(&self, r: R) -> std::io::Result<age::stream::StreamReader<R>> {
        let d =
            age::Decryptor::new(r).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        d.decrypt(std::iter::once(&self.key as &dyn age::Identity))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("age: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(sealer: &Sealer, opener: &Opener, data: &[u8]) -> Vec<u8> {
        let mut w = sealer.wrap(Vec::new()).unwrap();
        w.write_all(data).unwrap();
        let sealed = w.finish().unwrap();
        if data.len() >= 16 {
            assert!(!sealed.windows(16).any(|x| x == &data[..16]), "the plaintext shows");
        }
        let mut out = Vec::new();
        opener.reader(&sealed[..]).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn a_passphrase_opens_the_key_and_a_wrong_one_is_named() {
        let with = SealWith::Passphrase(SecretString::from("correct horse"));
        let (sealer, member, section) = new_key(&with).unwrap();
        assert_eq!(
            (section.unlock.as_str(), section.key.as_str()),
            ("passphrase", KEY_MEMBER)
        );
        let opener = open_key(&member, &Unlock::Passphrase(SecretString::from("correct horse")), "b").unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(roundtrip(&sealer, &opener, &data), data);
        let e = open_key(&member, &Unlock::Passphrase(SecretString::from("wrong")), "b").unwrap_err();
        assert!(
            e.message.contains("the passphrase does not open backup b"),
            "{}",
            e.message
        );
        let e = open_key(&member, &Unlock::Identities(vec![]), "b").unwrap_err();
        assert!(e.message.contains("encrypted with a passphrase"), "{}", e.message);
    }

    #[test]
    fn recipients_open_with_their_identity_only() {
        let me = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let with = SealWith::Recipients(vec![me.to_public().to_string()]);
        let (sealer, member, section) = new_key(&with).unwrap();
        assert_eq!(section.recipients, [me.to_public().to_string()]);
        let file = format!("# created: today\n{}\n", me.to_string().expose_secret());
        let opener = open_key(&member, &Unlock::Identities(vec![SecretString::from(file)]), "b").unwrap();
        assert_eq!(roundtrip(&sealer, &opener, b"secret .env"), b"secret .env");
        let e = open_key(&member, &Unlock::Identities(vec![other.to_string()]), "b").unwrap_err();
        assert!(e.message.contains("does not open backup b"), "{}", e.message);
        let e = new_key(&SealWith::Recipients(vec!["age1nope".into()])).err().unwrap();
        assert!(e.message.contains("is not an age recipient"), "{}", e.message);
    }
}
