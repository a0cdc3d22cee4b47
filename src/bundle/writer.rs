//! Writes a bundle: payload entries streamed into the tar with their digests recorded, then the
//! descriptive files (manifest, signature and public key, `SHA256SUMS`; see [`super::layout`]),
//! then the end of the archive.

use super::layout;
use super::parts::PartSink;
use super::tarfmt::{self, BLOCK};
use super::verified::Document;
use crate::digest::{sha256_hex, Hasher};
use crate::error::{Error, Result};
use crate::manifest::{is_safe_bundle_path, FileEntry, Manifest};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub struct BundleWriter {
    out: BufWriter<PartSink>,
    path: PathBuf,
    files: Vec<FileEntry>,
    names: BTreeSet<String>,
    mtime: u64,
    /// A delta's base: its payloads by path. A payload written with the same path, size and
    /// digest as one of these is dropped again and recorded in `taken` instead (stack files
    /// excepted: a delta always carries its stack).
    base: BTreeMap<String, FileEntry>,
    taken: Vec<FileEntry>,
}

/// One payload being streamed into the bundle. Dropping it without [`EntryWriter::finish`] or
/// [`EntryWriter::discard`] leaves the writer unusable for the rest of the pack (the caller aborts).
pub struct EntryWriter<'a> {
    w: &'a mut BundleWriter,
    header_at: u64,
    ustar_at: u64,
    path: String,
    mode: u32,
    hasher: Hasher,
}

impl BundleWriter {
    pub fn create(path: &Path, split: Option<u64>, mtime: u64) -> Result<Self> {
        Self::create_with_mode(path, split, mtime, 0o644)
    }

    /// [`BundleWriter::create`] for a file that holds secrets: mode `mode` (0o600) from its first
    /// byte on.
    pub fn create_with_mode(path: &Path, split: Option<u64>, mtime: u64, mode: u32) -> Result<Self> {
        let sink = PartSink::create_with_mode(path, split, mode)?;
        Ok(BundleWriter {
            out: BufWriter::with_capacity(1 << 20, sink),
            path: path.to_path_buf(),
            files: Vec::new(),
            names: BTreeSet::new(),
            mtime,
            base: BTreeMap::new(),
            taken: Vec::new(),
        })
    }

    fn io_err(&self, e: io::Error) -> Error {
        Error::io("cannot write bundle", &self.out.get_ref().current_path(), e)
    }

    /// Bytes written so far.
    pub fn position(&mut self) -> Result<u64> {
        self.out.stream_position().map_err(|e| self.io_err(e))
    }

    /// Payload files written so far, in archive order.
    pub fn files(&self) -> &[FileEntry] {
        &self.files
    }

    pub fn contains(&self, path: &str) -> bool {
        self.names.contains(path)
    }

    /// Make this a delta of a base with these payloads (see the field).
    pub fn set_base(&mut self, payloads: BTreeMap<String, FileEntry>) {
        self.base = payloads;
    }

    /// The payloads written but dropped because the base has them, in order.
    pub fn taken_from_base(&self) -> &[FileEntry] {
        &self.taken
    }

    /// Start a payload at `path`. The final path may be changed at [`EntryWriter::finish`] (layers
    /// are named by a digest known only at the end), as long as it fits a plain ustar header.
    pub fn begin(&mut self, path: &str, mode: u32) -> Result<EntryWriter<'_>> {
        if !is_safe_bundle_path(path) {
            return Err(Error::internal(format!(
                "bundle path {path:?} is not a plain relative path"
            )));
        }
        let header_at = self.position()?;
        let header = tarfmt::file_header(path, mode, 0, self.mtime);
        self.out.write_all(&header).map_err(|e| self.io_err(e))?;
        let data_at = header_at + header.len() as u64;
        Ok(EntryWriter {
            w: self,
            header_at,
            ustar_at: data_at - BLOCK,
            path: path.to_string(),
            mode,
            hasher: Hasher::new(),
        })
    }

    /// Add a payload from a reader; returns its entry.
    pub fn add_reader(&mut self, path: &str, mode: u32, r: &mut dyn Read) -> Result<FileEntry> {
        let mut e = self.begin(path, mode)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(Error::io("cannot read", Path::new(path), err)),
            };
            e.write_all(&buf[..n])
                .map_err(|err| Error::io("cannot write bundle", Path::new(path), err))?;
        }
        e.finish(None)
    }

    pub fn add_bytes(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<FileEntry> {
        self.add_reader(path, mode, &mut &data[..])
    }

    /// Write a descriptive (non-payload) file such as `bundle.toml`: not recorded in `files`.
    fn add_meta(&mut self, path: &str, data: &[u8]) -> Result<()> {
        self.add_bytes(path, 0o644, data)?;
        self.files.pop();
        Ok(())
    }

    /// Write the files that describe the payload: the manifest (`manifest_text`, the one
    /// serialisation of `manifest`), its minisign signature and the signer's public key when
    /// `signature` is `Some((signature, public key))`, and `SHA256SUMS` over the manifest's files
    /// and those. Call once, after the last payload and before [`BundleWriter::commit`].
    pub fn add_descriptive(
        &mut self,
        manifest: &Manifest,
        manifest_text: &str,
        signature: Option<(&str, &str)>,
    ) -> Result<()> {
        self.add_document(manifest, manifest_text, signature)
    }

    /// [`BundleWriter::add_descriptive`] for any archive of this format (a backup's manifest).
    pub fn add_document<D: Document>(
        &mut self,
        manifest: &D,
        manifest_text: &str,
        signature: Option<(&str, &str)>,
    ) -> Result<()> {
        self.add_meta(D::MANIFEST, manifest_text.as_bytes())?;
        let mut extra = Vec::new();
        if let Some((sig, pubkey)) = signature {
            self.add_meta(D::SIGNATURE, sig.as_bytes())?;
            self.add_meta(D::PUBKEY, pubkey.as_bytes())?;
            extra.push((D::SIGNATURE, sha256_hex(sig.as_bytes())));
            extra.push((D::PUBKEY, sha256_hex(pubkey.as_bytes())));
        }
        let sums = layout::sha256sums_of(
            manifest.files(),
            D::MANIFEST,
            &sha256_hex(manifest_text.as_bytes()),
            &extra,
        );
        self.add_meta(layout::SUMS, sums.as_bytes())
    }

    /// End the archive and move it to its final name(s).
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        self.out
            .write_all(&[0u8; 2 * BLOCK as usize])
            .map_err(|e| self.io_err(e))?;
        self.out.flush().map_err(|e| self.io_err(e))?;
        let path = self.path.clone();
        let sink = self
            .out
            .into_inner()
            .map_err(|e| Error::io("cannot write bundle", &path, e.into_error()))?;
        sink.commit()
    }
}

impl EntryWriter<'_> {
    /// Finish the entry: pad, patch its header with the size (and `final_path` if given).
    pub fn finish(mut self, final_path: Option<&str>) -> Result<FileEntry> {
        let path = final_path.map(str::to_string).unwrap_or_else(|| self.path.clone());
        if path != self.path
            && (!tarfmt::fits_ustar(&path) || self.ustar_at != self.header_at || !is_safe_bundle_path(&path))
        {
            return Err(Error::internal(format!(
                "cannot rename bundle entry {} to {path}",
                self.path
            )));
        }
        if !self.w.names.insert(path.clone()) {
            return Err(Error::internal(format!("bundle entry {path} written twice")));
        }
        let (sha256, size) = std::mem::take(&mut self.hasher).finish();
        let same =
            self.w.base.get(&path).filter(|b| {
                b.sha256 == sha256 && b.size == size && layout::section(&path) != Some(layout::Section::Stack)
            });
        if let Some(b) = same.cloned() {
            self.w.taken.push(b.clone());
            let (w, at) = (self.w, self.header_at);
            w.out.flush().map_err(|e| w.io_err(e))?;
            w.out.get_mut().truncate(at).map_err(|e| w.io_err(e))?;
            return Ok(b);
        }
        let w = &mut *self.w;
        let pad = tarfmt::padding(size) as usize;
        let res: io::Result<()> = (|| {
            w.out.write_all(&[0u8; BLOCK as usize][..pad])?;
            let end = w.out.stream_position()?;
            let header = tarfmt::file_header(&path, self.mode, size, w.mtime);
            w.out.seek(SeekFrom::Start(self.ustar_at))?;
            w.out.write_all(&header[header.len() - BLOCK as usize..])?;
            w.out.seek(SeekFrom::Start(end))?;
            Ok(())
        })();
        res.map_err(|e| w.io_err(e))?;
        let entry = FileEntry { path, size, sha256 };
        w.files.push(entry.clone());
        Ok(entry)
    }

    /// Drop the entry just written (e.g. a layer that turned out to be stored already).
    pub fn discard(self) -> Result<()> {
        let w = self.w;
        let at = self.header_at;
        w.out.flush().map_err(|e| w.io_err(e))?;
        w.out.get_mut().truncate(at).map_err(|e| w.io_err(e))?;
        Ok(())
    }

    /// Bytes of payload written so far.
    pub fn written(&self) -> u64 {
        self.hasher.len()
    }
}

impl Write for EntryWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256_hex;

    #[test]
    fn a_payload_the_base_has_is_dropped_and_recorded_a_changed_one_and_the_stack_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("d.bkb");
        let mut w = BundleWriter::create(&out, None, 0).unwrap();
        let entry = |path: &str, data: &[u8]| FileEntry {
            path: path.into(),
            size: data.len() as u64,
            sha256: sha256_hex(data),
        };
        let base: BTreeMap<String, FileEntry> = [
            entry("packages/a.zip", b"same"),
            entry("packages/b.zip", b"old"),
            entry("stack/docker-compose.yml", b"services: {}"),
        ]
        .into_iter()
        .map(|e| (e.path.clone(), e))
        .collect();
        w.set_base(base);
        let before = w.position().unwrap();
        let a = w.add_bytes("packages/a.zip", 0o644, b"same").unwrap();
        assert_eq!(w.position().unwrap(), before, "the base's payload was cut again");
        assert_eq!(a, entry("packages/a.zip", b"same"));
        w.add_bytes("packages/b.zip", 0o644, b"new").unwrap();
        w.add_bytes("stack/docker-compose.yml", 0o644, b"services: {}").unwrap();
        assert_eq!(w.taken_from_base(), [entry("packages/a.zip", b"same")]);
        let stored: Vec<&str> = w.files().iter().map(|f| f.path.as_str()).collect();
        assert_eq!(stored, ["packages/b.zip", "stack/docker-compose.yml"]);
        assert!(w.contains("packages/a.zip"));
        // The same path twice is still refused.
        assert!(w.add_bytes("packages/a.zip", 0o644, b"same").is_err());
    }
}
