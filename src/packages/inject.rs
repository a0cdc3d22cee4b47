//! The site's CA put into each controller package as it is uploaded (issue 12): upstream's
//! installer shipped `fusion-collectors/certs/ca.crt` in every controller package when the site's
//! NATS ran TLS, and the agent reads the CA from there. The bundle's package is the same for every
//! site, so the certificate is added on the way to the object store, streamed: a zip's entries are
//! copied raw (no recompression) and `certs/ca.crt` is appended; a tar.gz is re-packed entry by
//! entry. An earlier `certs/ca.crt` in the package (another site's CA) is dropped.
//!
//! The uploaded object therefore differs from the bundle's file. Its meta records both the
//! bundle's digest and the CA's ([`SOURCE_KEY`], [`CA_KEY`]), so a re-run compares those and sends
//! nothing when neither changed.

use sha2::{Digest, Sha256};
use std::io::{self, Read, Seek, Write};

/// Object meta `metadata` key: SHA-256 (hex) of the bundle's package the object was made from.
pub const SOURCE_KEY: &str = "bkbundle-source-sha256";
/// Object meta `metadata` key: SHA-256 (hex) of the CA certificate (PEM bytes) added to it.
pub const CA_KEY: &str = "bkbundle-ca-sha256";
/// Where the CA goes, under the package's top-level directory.
pub const CA_ENTRY: &str = "certs/ca.crt";

/// The site CA that controller packages carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteCa {
    pub pem: String,
    /// SHA-256 (hex) of `pem`'s bytes.
    pub sha256: String,
}

impl SiteCa {
    pub fn new(pem: String) -> SiteCa {
        let sha256 = hex(&Sha256::digest(pem.as_bytes()));
        SiteCa { pem, sha256 }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The package formats the CA can be added to, by file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Zip,
    TarGz,
}

pub fn format_of(name: &str) -> Option<Format> {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".zip") {
        Some(Format::Zip)
    } else if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
        Some(Format::TarGz)
    } else {
        None
    }
}

fn bad(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// The top-level directory every entry is under (`fusion-collectors/`), or "" when the entries
/// are not all under one directory.
fn top_dir<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut top: Option<&str> = None;
    for n in names {
        let n = n.trim_start_matches("./");
        let Some((first, _)) = n.split_once('/') else {
            return String::new();
        };
        match top {
            None => top = Some(first),
            Some(t) if t == first => {}
            Some(_) => return String::new(),
        }
    }
    top.map(|t| format!("{t}/")).unwrap_or_default()
}

/// Every entry's name, in order.
fn names_of<R: Read + Seek>(archive: &mut zip::ZipArchive<R>) -> io::Result<Vec<String>> {
    (0..archive.len())
        .map(|i| match archive.name_for_index(i) {
            Some(Ok(n)) => Ok(n.to_string()),
            Some(Err(e)) => Err(bad(e)),
            None => Err(bad(format!("entry {i} has no name"))),
        })
        .collect()
}

fn is_ca_entry(name: &str, top: &str) -> bool {
    let n = name.trim_start_matches("./");
    n == format!("{top}{CA_ENTRY}")
}

/// Copy the zip `src` to `out` with `ca` as `<top>/certs/ca.crt`. Entries are copied raw; the
/// output is deterministic for the same input and CA.
pub fn zip_with_ca<R: Read + Seek, W: Write>(src: R, ca: &SiteCa, out: W) -> io::Result<W> {
    use zip::write::SimpleFileOptions;
    let mut archive = zip::ZipArchive::new(src).map_err(bad)?;
    let names = names_of(&mut archive)?;
    let top = top_dir(names.iter().map(String::as_str));
    let certs_dir = format!("{top}certs/");
    let mut has_dir = false;
    let mut w = zip::ZipWriter::new_stream(out);
    for (i, name) in names.iter().enumerate() {
        if is_ca_entry(name, &top) {
            continue;
        }
        has_dir |= name.trim_start_matches("./") == certs_dir;
        let f = archive.by_index_raw(i).map_err(bad)?;
        w.raw_copy_file(f).map_err(bad)?;
    }
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    if !has_dir && !top.is_empty() {
        w.add_directory(certs_dir.trim_end_matches('/'), opts.unix_permissions(0o755))
            .map_err(bad)?;
    }
    w.start_file(format!("{top}{CA_ENTRY}"), opts.unix_permissions(0o644))
        .map_err(bad)?;
    w.write_all(ca.pem.as_bytes())?;
    let inner = w.finish().map_err(bad)?;
    Ok(inner.into_inner())
}

/// Copy the tar.gz `src` to `out` with `ca` as `<top>/certs/ca.crt`. Two passes over the names
/// would need a seekable gzip; the top directory is taken from the first entry instead.
pub fn tar_gz_with_ca<R: Read, W: Write>(src: R, ca: &SiteCa, out: W) -> io::Result<W> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(src));
    let enc = flate2::write::GzEncoder::new(out, flate2::Compression::new(6));
    let mut b = tar::Builder::new(enc);
    b.mode(tar::HeaderMode::Deterministic);
    let mut top: Option<String> = None;
    for entry in ar.entries()? {
        let mut e = entry?;
        let name = String::from_utf8_lossy(&e.path_bytes()).to_string();
        let t = top.get_or_insert_with(|| top_dir(std::iter::once(name.as_str())));
        if is_ca_entry(&name, t) {
            continue;
        }
        let mut h = e.header().clone();
        b.append_data(&mut h, name.trim_start_matches("./"), &mut e)?;
    }
    let top = top.unwrap_or_default();
    let mut h = tar::Header::new_gnu();
    h.set_size(ca.pem.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(0);
    b.append_data(&mut h, format!("{top}{CA_ENTRY}"), ca.pem.as_bytes())?;
    let enc = b.into_inner()?;
    enc.finish()
}

/// The CA entry of a package's bytes (zip), for checks: `None` when it has none.
pub fn ca_in_zip<R: Read + Seek>(src: R) -> io::Result<Option<String>> {
    let mut archive = zip::ZipArchive::new(src).map_err(bad)?;
    let names = names_of(&mut archive)?;
    let top = top_dir(names.iter().map(String::as_str));
    let Some(name) = names.iter().find(|n| is_ca_entry(n, &top)) else {
        return Ok(None);
    };
    let mut f = archive.by_name(name).map_err(bad)?;
    let mut s = String::new();
    f.by_ref().take(1 << 20).read_to_string(&mut s)?;
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (n, d) in entries {
            if n.ends_with('/') {
                w.add_directory(n.trim_end_matches('/'), zip::write::SimpleFileOptions::default())
                    .unwrap();
            } else {
                w.start_file(*n, zip::write::SimpleFileOptions::default().unix_permissions(0o755))
                    .unwrap();
                w.write_all(d).unwrap();
            }
        }
        w.finish().unwrap().into_inner()
    }

    fn read_zip(bytes: &[u8]) -> Vec<(String, Vec<u8>, Option<u32>)> {
        let mut a = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        (0..a.len())
            .map(|i| {
                let mut f = a.by_index(i).unwrap();
                let mut d = Vec::new();
                f.read_to_end(&mut d).unwrap();
                (f.name().unwrap().to_string(), d, f.unix_mode())
            })
            .collect()
    }

    #[test]
    fn the_ca_goes_under_the_top_directory_and_replaces_an_old_one() {
        let src = zip_of(&[
            ("fusion-collectors/", b""),
            ("fusion-collectors/install.sh", b"#!/bin/sh\n"),
            ("fusion-collectors/certs/", b""),
            ("fusion-collectors/certs/ca.crt", b"OTHER SITE"),
            ("fusion-collectors/bin/telegraf", b"bin"),
        ]);
        let ca = SiteCa::new("-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n".into());
        let out = zip_with_ca(Cursor::new(&src), &ca, Vec::new()).unwrap();
        let entries = read_zip(&out);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "fusion-collectors/",
                "fusion-collectors/install.sh",
                "fusion-collectors/certs/",
                "fusion-collectors/bin/telegraf",
                "fusion-collectors/certs/ca.crt"
            ]
        );
        let ca_entry = entries.iter().find(|e| e.0.ends_with("ca.crt")).unwrap();
        assert_eq!(ca_entry.1, ca.pem.as_bytes());
        assert_eq!(ca_entry.2.map(|m| m & 0o777), Some(0o644));
        let sh = entries.iter().find(|e| e.0.ends_with("install.sh")).unwrap();
        assert_eq!(sh.1, b"#!/bin/sh\n");
        assert_eq!(sh.2.map(|m| m & 0o777), Some(0o755));
        assert_eq!(ca_in_zip(Cursor::new(&out)).unwrap().as_deref(), Some(ca.pem.as_str()));
        // Deterministic: the same input and CA give the same bytes (the digest a re-run expects).
        assert_eq!(out, zip_with_ca(Cursor::new(&src), &ca, Vec::new()).unwrap());
        let other = SiteCa::new("another".into());
        assert_ne!(out, zip_with_ca(Cursor::new(&src), &other, Vec::new()).unwrap());
    }

    #[test]
    fn a_package_without_one_top_directory_gets_the_ca_at_its_root() {
        let src = zip_of(&[("install.sh", b"x"), ("bin/vector", b"y")]);
        let ca = SiteCa::new("pem".into());
        let out = zip_with_ca(Cursor::new(&src), &ca, Vec::new()).unwrap();
        let names: Vec<String> = read_zip(&out).into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["install.sh", "bin/vector", "certs/ca.crt"]);
    }

    #[test]
    fn a_tar_gz_is_repacked_with_the_ca() {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (n, d) in [
            ("fusion-collectors/install.sh", &b"x"[..]),
            ("fusion-collectors/certs/ca.crt", b"old"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(d.len() as u64);
            h.set_mode(0o755);
            b.append_data(&mut h, n, d).unwrap();
        }
        let src = b.into_inner().unwrap().finish().unwrap();
        let ca = SiteCa::new("pem-bytes".into());
        let out = tar_gz_with_ca(Cursor::new(&src), &ca, Vec::new()).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(Cursor::new(out)));
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut d = String::new();
            e.read_to_string(&mut d).unwrap();
            seen.push((e.path().unwrap().display().to_string(), d));
        }
        assert_eq!(
            seen,
            [
                ("fusion-collectors/install.sh".to_string(), "x".to_string()),
                ("fusion-collectors/certs/ca.crt".to_string(), "pem-bytes".to_string())
            ]
        );
    }

    #[test]
    fn formats_by_name() {
        assert_eq!(format_of("fusion-collectors-linux-amd64.zip"), Some(Format::Zip));
        assert_eq!(format_of("x.TGZ"), Some(Format::TarGz));
        assert_eq!(format_of("telegraf"), None);
    }
}
