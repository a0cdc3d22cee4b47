//! SHA-256 helpers shared by every module that checks or records content.
//!
//! sha2 0.11 no longer implements `io::Write` nor `LowerHex`, so the adapters that let a digest sit
//! inside a reader or writer chain live here, once.

use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};

/// A SHA-256 digest as lower-case hex (64 characters), the form the manifest and `SHA256SUMS` use.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// True when `s` is 64 lower-case hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Hex SHA-256 of a byte slice.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The 32 bytes of a 64-character lower-case hex SHA-256; `None` when malformed.
pub fn sha256_from_hex(s: &str) -> Option<[u8; 32]> {
    if !is_sha256_hex(s) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A running SHA-256 with a byte count.
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Finish and return (hex digest, byte count).
    pub fn finish(self) -> (String, u64) {
        (hex(&self.inner.finalize()), self.len)
    }
}

/// A writer that hashes and counts everything passing through to `inner`.
pub struct HashingWriter<W> {
    pub inner: W,
    pub hasher: Hasher,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Hasher::new(),
        }
    }
    pub fn into_parts(self) -> (W, Hasher) {
        (self.inner, self.hasher)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts everything read from `inner`.
pub struct HashingReader<R> {
    pub inner: R,
    pub hasher: Hasher,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Hasher::new(),
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Hash a whole reader with a large buffer; returns (hex, bytes).
pub fn sha256_reader<R: Read>(mut r: R) -> io::Result<(String, u64)> {
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (h, n) = sha256_reader(&b"abc"[..]).unwrap();
        assert_eq!((h.as_str(), n), (sha256_hex(b"abc").as_str(), 3));
        assert!(is_sha256_hex(&h));
        assert!(!is_sha256_hex("ABC"));
        let raw = sha256_from_hex(&h).unwrap();
        assert_eq!(hex(&raw), h);
        assert_eq!(sha256_from_hex("abc"), None);
    }

    #[test]
    fn writer_counts_and_hashes() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"ab").unwrap();
        w.write_all(b"c").unwrap();
        let (v, h) = w.into_parts();
        assert_eq!(v, b"abc");
        assert_eq!(h.finish(), (sha256_hex(b"abc"), 3));
    }
}
