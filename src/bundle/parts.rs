//! The bundle as one logical byte stream over one file or numbered parts (`NAME.001`, ...).
//!
//! Writing goes to temporary names (`*.partial`) that are renamed only on [`PartSink::commit`];
//! dropping an uncommitted sink removes them, so a failed or interrupted pack (disk full, Ctrl-C
//! handled, error) never leaves a half bundle under the final name. Reading uses positional reads,
//! so several threads can verify different entries of the same bundle at once.

use crate::error::{Error, IoContext, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The name of part `n` (1-based) of `base`.
pub fn part_path(base: &Path, n: usize) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!(".{n:03}"));
    PathBuf::from(s)
}

fn partial_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

pub struct PartSink {
    base: PathBuf,
    split: Option<u64>,
    /// Permission bits of the files written (0o600 for a backup, which holds secrets).
    mode: u32,
    files: Vec<File>,
    pos: u64,
    len: u64,
    committed: bool,
}

impl PartSink {
    /// Start writing `base` (or its parts of `split` bytes each).
    pub fn create(base: &Path, split: Option<u64>) -> Result<Self> {
        Self::create_with_mode(base, split, 0o644)
    }

    /// [`PartSink::create`] with the files' permission bits: they are set before the first byte
    /// is written, whatever the umask.
    pub fn create_with_mode(base: &Path, split: Option<u64>, mode: u32) -> Result<Self> {
        if let Some(0) = split {
            return Err(Error::input("--split-size must be more than 0 bytes"));
        }
        let mut sink = PartSink {
            base: base.to_path_buf(),
            split,
            mode,
            files: Vec::new(),
            pos: 0,
            len: 0,
            committed: false,
        };
        sink.open_part(0).io_ctx("cannot create", &sink.temp_name(0))?;
        Ok(sink)
    }

    fn final_name(&self, idx: usize) -> PathBuf {
        match self.split {
            None => self.base.clone(),
            Some(_) => part_path(&self.base, idx + 1),
        }
    }

    fn temp_name(&self, idx: usize) -> PathBuf {
        partial_path(&self.final_name(idx))
    }

    fn open_part(&mut self, idx: usize) -> io::Result<()> {
        while self.files.len() <= idx {
            let path = self.temp_name(self.files.len());
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(self.mode)
                .open(&path)?;
            // `mode` on open is masked by the umask and ignored for an existing file.
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(self.mode))?;
            self.files.push(f);
        }
        Ok(())
    }

    fn locate(&self, pos: u64) -> (usize, u64) {
        match self.split {
            None => (0, pos),
            Some(s) => ((pos / s) as usize, pos % s),
        }
    }

    /// Total bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The path a write error should name: the temporary file being written.
    pub fn current_path(&self) -> PathBuf {
        self.temp_name(self.locate(self.pos).0)
    }

    /// Cut the stream back to `at` bytes (used to drop a duplicate layer just written).
    pub fn truncate(&mut self, at: u64) -> io::Result<()> {
        let (idx, off) = self.locate(at);
        // A cut exactly on a part boundary keeps the (now empty) part file: it is refilled next.
        self.open_part(idx)?;
        self.files[idx].set_len(off)?;
        while self.files.len() > idx + 1 {
            let last = self.files.len() - 1;
            self.files.pop();
            let _ = fs::remove_file(self.temp_name(last));
        }
        self.len = at;
        self.pos = at;
        Ok(())
    }

    /// Flush to disk and rename every part to its final name; removes stale parts of an older
    /// bundle of the same name so a reader never mixes two bundles.
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        // An empty trailing part can exist when the data ended exactly on a boundary.
        if self.split.is_some() && self.files.len() > 1 {
            let (idx, off) = self.locate(self.len);
            if off == 0 && idx + 1 == self.files.len() {
                self.files.pop();
                let _ = fs::remove_file(self.temp_name(idx));
            }
        }
        for (i, f) in self.files.iter().enumerate() {
            f.sync_all().io_ctx("cannot flush", &self.temp_name(i))?;
        }
        let mut names = Vec::new();
        for i in 0..self.files.len() {
            let (from, to) = (self.temp_name(i), self.final_name(i));
            fs::rename(&from, &to).io_ctx("cannot rename the finished bundle to", &to)?;
            names.push(to);
        }
        self.committed = true;
        // Stale leftovers: a single-file bundle of the same name when we wrote parts and vice versa,
        // and higher-numbered parts from an earlier, larger bundle.
        if self.split.is_some() {
            let _ = fs::remove_file(&self.base);
        } else {
            let _ = fs::remove_file(part_path(&self.base, 1));
        }
        let mut n = if self.split.is_some() { self.files.len() + 1 } else { 2 };
        while part_path(&self.base, n).exists() {
            let _ = fs::remove_file(part_path(&self.base, n));
            n += 1;
        }
        if let Some(dir) = self.base.parent() {
            if let Ok(d) = File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) {
                let _ = d.sync_all();
            }
        }
        Ok(names)
    }
}

impl Drop for PartSink {
    fn drop(&mut self) {
        if !self.committed {
            for i in 0..self.files.len() {
                let _ = fs::remove_file(self.temp_name(i));
            }
        }
    }
}

impl Write for PartSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let (idx, off) = self.locate(self.pos);
        self.open_part(idx)?;
        let room = self.split.map(|s| s - off).unwrap_or(u64::MAX);
        let n = (buf.len() as u64).min(room) as usize;
        self.files[idx].write_all_at(&buf[..n], off)?;
        self.pos += n as u64;
        self.len = self.len.max(self.pos);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for PartSink {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => self.len.checked_add_signed(d).ok_or(io::ErrorKind::InvalidInput)?,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or(io::ErrorKind::InvalidInput)?,
        };
        Ok(self.pos)
    }
}

/// Read side: the files making up a bundle, in order, with their sizes.
#[derive(Debug)]
pub struct PartSource {
    pub parts: Vec<(PathBuf, u64)>,
    files: Vec<File>,
    starts: Vec<u64>,
    pub len: u64,
}

impl PartSource {
    /// Open `path`: a single bundle file, its first part `NAME.001`, or `NAME` whose parts exist.
    pub fn open(path: &Path) -> Result<Self> {
        let (base, split) = resolve(path)?;
        if !split {
            let f = File::open(&base).io_ctx("cannot open bundle", &base)?;
            let len = f.metadata().io_ctx("cannot read", &base)?.len();
            return Ok(PartSource {
                parts: vec![(base, len)],
                files: vec![f],
                starts: vec![0],
                len,
            });
        }
        let mut parts = Vec::new();
        let mut n = 1;
        while let Ok(md) = fs::metadata(part_path(&base, n)) {
            parts.push((part_path(&base, n), md.len()));
            n += 1;
        }
        // A gap: a later part exists although this one does not.
        if let Some(later) = later_parts(&base, n) {
            return Err(Error::bundle(format!(
                "bundle part {} is missing (found parts 1..{} and {})",
                part_path(&base, n).display(),
                n - 1,
                later
            ))
            .hint("copy the missing part from the original media; all parts must sit side by side"));
        }
        let first = parts[0].1;
        for (i, (p, size)) in parts.iter().enumerate() {
            if i + 1 < parts.len() && *size != first {
                return Err(Error::bundle(format!(
                    "bundle part {} is {size} bytes, expected {first} like part 1: it is truncated or was copied incompletely",
                    p.display()
                ))
                .hint("copy that part again from the original media"));
            }
        }
        let mut files = Vec::new();
        let mut starts = Vec::new();
        let mut len = 0;
        for (p, size) in &parts {
            files.push(File::open(p).io_ctx("cannot open bundle part", p)?);
            starts.push(len);
            len += size;
        }
        Ok(PartSource {
            parts,
            files,
            starts,
            len,
        })
    }

    /// Human name of the bundle for messages: the single file or `NAME.001..NNN`.
    pub fn display_name(&self) -> String {
        if self.parts.len() == 1 {
            self.parts[0].0.display().to_string()
        } else {
            format!("{} (+{} more parts)", self.parts[0].0.display(), self.parts.len() - 1)
        }
    }

    /// The part file holding byte `offset`, for messages.
    pub fn part_at(&self, offset: u64) -> &Path {
        let i = self.starts.partition_point(|&s| s <= offset).saturating_sub(1);
        &self.parts[i].0
    }

    /// Positional read of up to `buf.len()` bytes at `offset`; may span parts; short only at the end.
    pub fn read_at(&self, mut offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() && offset < self.len {
            let i = self.starts.partition_point(|&s| s <= offset) - 1;
            let within = offset - self.starts[i];
            let avail = self.parts[i].1 - within;
            let want = ((buf.len() - done) as u64).min(avail) as usize;
            let n = self.files[i].read_at(&mut buf[done..done + want], within)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while being read", self.parts[i].0.display()),
                ));
            }
            done += n;
            offset += n as u64;
        }
        Ok(done)
    }

    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = self.read_at(offset, buf)?;
        if n < buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// A `Read` (and `Seek`, for zip's central directory) over `len` bytes starting at `offset`.
    pub fn range(&self, offset: u64, len: u64) -> RangeReader<'_> {
        RangeReader {
            src: self,
            start: offset,
            pos: offset,
            end: offset + len,
        }
    }
}

pub struct RangeReader<'a> {
    src: &'a PartSource,
    start: u64,
    pos: u64,
    end: u64,
}

impl Seek for RangeReader<'_> {
    /// Positions are relative to the range; seeking past its end is allowed (reads there return
    /// nothing), before its start is not.
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let len = (self.end - self.start) as i128;
        let at = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::End(d) => len + d as i128,
            SeekFrom::Current(d) => (self.pos - self.start) as i128 + d as i128,
        };
        let at = u64::try_from(at)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of a bundle entry"))?;
        self.pos = self.start.saturating_add(at);
        Ok(at)
    }
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end.saturating_sub(self.pos) as usize).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.src.read_at(self.pos, &mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Work out whether `path` names a single file or a set of parts, and the parts' base name.
fn resolve(path: &Path) -> Result<(PathBuf, bool)> {
    let s = path.to_string_lossy();
    if let Some((base, num)) = s.rsplit_once('.') {
        if num.len() == 3 && num.bytes().all(|b| b.is_ascii_digit()) {
            let base = PathBuf::from(base);
            if num != "001" {
                return Err(Error::input(format!(
                    "{} is part {} of a split bundle; give the first part ({}) or the name without the number",
                    path.display(),
                    num.trim_start_matches('0'),
                    part_path(&base, 1).display()
                )));
            }
            return Ok((base, true));
        }
    }
    if path.is_file() {
        return Ok((path.to_path_buf(), false));
    }
    if let Ok(md) = fs::metadata(path) {
        return Err(not_a_file(path, &md));
    }
    if part_path(path, 1).is_file() {
        return Ok((path.to_path_buf(), true));
    }
    if let Some(later) = later_parts(path, 1) {
        return Err(Error::bundle(format!(
            "bundle part {} is missing (found {later})",
            part_path(path, 1).display()
        ))
        .hint("copy the missing part from the original media; all parts must sit side by side"));
    }
    Err(Error::input(format!(
        "bundle {} not found (nor its first part {})",
        path.display(),
        part_path(path, 1).display()
    ))
    .hint("give the path of the .bkb file, or of its first part when it was split"))
}

/// `path` exists but is no regular file: say what it is (and, for a directory, what it holds).
fn not_a_file(path: &Path, md: &fs::Metadata) -> Error {
    use std::os::unix::fs::FileTypeExt;
    let t = md.file_type();
    let what = if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a named pipe"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    let mut e = Error::input(format!("{} is {what}, not a bundle file", path.display()));
    if t.is_dir() {
        let mut found: Vec<String> = fs::read_dir(path)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.ends_with(".bkb") || n.ends_with(".bkb.001"))
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        e = match found.first() {
            Some(f) => e.hint(format!(
                "it holds {}; give the bundle file itself, e.g. {}",
                found.join(", "),
                path.join(f).display()
            )),
            None => e.hint("give the path of the .bkb file (or of its first part, NAME.bkb.001), not of its directory"),
        };
    } else {
        e = e.hint("give the path of the .bkb file, or of its first part when it was split");
    }
    e
}

/// Some part numbered `from` or later that exists, for gap messages.
fn later_parts(base: &Path, from: usize) -> Option<String> {
    let dir = base
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let stem = base.file_name()?.to_string_lossy().to_string();
    let mut found: Vec<usize> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let num = name.strip_prefix(&stem)?.strip_prefix('.')?;
            (num.len() == 3).then(|| num.parse::<usize>().ok()).flatten()
        })
        .filter(|&n| n > from)
        .collect();
    found.sort();
    found.first().map(|n| part_path(base, *n).display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_writes_and_reads_back_across_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("b.bkb");
        let mut sink = PartSink::create(&base, Some(10)).unwrap();
        sink.write_all(b"0123456789abcdefghijXYZ").unwrap();
        // Patch across a boundary.
        sink.seek(SeekFrom::Start(8)).unwrap();
        sink.write_all(b"..").unwrap();
        sink.seek(SeekFrom::End(0)).unwrap();
        sink.write_all(b"!").unwrap();
        let names = sink.commit().unwrap();
        assert_eq!(names.len(), 3);
        let src = PartSource::open(&base).unwrap();
        let mut all = Vec::new();
        src.range(0, src.len).read_to_end(&mut all).unwrap();
        assert_eq!(all, b"01234567..abcdefghijXYZ!");
        assert_eq!(src.part_at(12), part_path(&base, 2));
        // Opening by the first part works too; by a later part is refused.
        assert_eq!(PartSource::open(&part_path(&base, 1)).unwrap().len, 24);
        assert!(PartSource::open(&part_path(&base, 2)).is_err());
    }

    #[test]
    fn truncate_drops_data_and_later_parts() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("b.bkb");
        let mut sink = PartSink::create(&base, Some(4)).unwrap();
        sink.write_all(b"aaaabbbbcc").unwrap();
        sink.truncate(4).unwrap();
        sink.write_all(b"zz").unwrap();
        sink.commit().unwrap();
        let src = PartSource::open(&base).unwrap();
        assert_eq!(src.len, 6);
        assert!(!part_path(&base, 3).exists());
    }

    #[test]
    fn a_missing_middle_part_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("b.bkb");
        let mut sink = PartSink::create(&base, Some(4)).unwrap();
        sink.write_all(b"aaaabbbbcccc").unwrap();
        sink.commit().unwrap();
        fs::remove_file(part_path(&base, 2)).unwrap();
        let err = PartSource::open(&base).unwrap_err();
        assert!(err.message.contains("b.bkb.002 is missing"), "{}", err.message);
    }

    #[test]
    fn uncommitted_sink_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("b.bkb");
        {
            let mut sink = PartSink::create(&base, None).unwrap();
            sink.write_all(b"half").unwrap();
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_directory_or_device_is_named_for_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let e = PartSource::open(dir.path()).unwrap_err();
        assert!(e.message.contains("is a directory"), "{}", e.message);
        assert!(!e.message.contains("not found"), "{}", e.message);
        let e = PartSource::open(Path::new("/dev/null")).unwrap_err();
        assert!(e.message.contains("/dev/null is a character device"), "{}", e.message);
    }
}
