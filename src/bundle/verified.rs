//! Loading a bundle means verifying it: [`open_verified`] is the one way a command gets a bundle,
//! and [`VerifiedBundle`] hands out only readers that check what they return.
//!
//! Both check levels establish, before anything is read: the tar framing (see [`super::reader`]),
//! the manifest parsed and cross-checked, `SHA256SUMS` equal to the one the manifest implies, the
//! signature (trusted key, the bundle's own key, or required), and the archive's files equal to
//! the manifest's list with their sizes (nothing missing, nothing extra but the descriptive files
//! of [`super::layout::DESCRIPTIVE`]). Then:
//!
//! - [`Check::Full`] reads every byte against its digest now, on several threads at once
//!   (positional reads, so the page cache is the limit, not one core's SHA-256): what `verify` and
//!   `install` do. Every problem is collected and reported together.
//! - [`Check::Structure`] is for commands that read a few entries (regions, doctor, inspect,
//!   init-packages): each entry is hashed while it is read, and the read that would return its
//!   last bytes fails instead when the digest differs ([`EntryReader`]).
//!
//! An entry checked once (by the full check, or by a complete read) is not hashed again: a second
//! read of it is a plain read. The compromise: a bundle changed on disk after that check is not
//! caught again; bkbundle never writes to a bundle it reads.

use super::layout::{self, MANIFEST, PUBKEY, SIGNATURE, SUMS};
use super::parts::RangeReader;
use super::reader::{BundleReader, Entry};
use crate::digest::{sha256_hex, Hasher};
use crate::error::{Error, Result};
use crate::manifest::{FileEntry, Image, Installer, Layer, Manifest};
use crate::progress::Reporter;
use crate::sign;
use serde::Serialize;
use std::collections::HashSet;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// How much of the content [`open_verified`] reads before it returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Check {
    /// Every byte against its digest, now.
    #[default]
    Full,
    /// Framing, manifest, signature and the list of entries now; content as it is read.
    Structure,
}

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Refuse an unsigned bundle (needs `key`).
    pub require_signature: bool,
    /// A trusted minisign public key file; when given, the signature is required.
    pub key: Option<PathBuf>,
    /// Hashing threads of the full check; default: the number of CPUs.
    pub threads: Option<usize>,
    pub check: Check,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SignatureStatus {
    Unsigned,
    /// Checked against the trusted key given with `--key`.
    Verified {
        key_id: String,
        trusted_comment: String,
    },
    /// Checked only against the public key inside the bundle: proves integrity, not origin. Never
    /// counts as verified: `trusted` is always false, and `warning` says so in words.
    SelfSigned {
        key_id: String,
        trusted: bool,
        warning: String,
    },
}

/// What a signature problem calls for, which decides the hint.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SigTrouble {
    /// A trusted key was given but the bundle carries no signature.
    Unsigned { key: String },
    /// Signed by another key than the trusted one.
    OtherSigner {
        signer: String,
        trusted: String,
        key: String,
    },
    /// The right key, but the signature does not match: damage or tampering.
    Damaged,
}

/// What a verified archive's manifest is: a bundle's `bundle.toml`, or a backup's `backup.toml`.
/// The framing, the `SHA256SUMS`, the signature and the digests are the same for both; the
/// manifest names its own file, its signature's and its public key's, and lists the payloads.
pub trait Document: Sized {
    /// What the archive is called in messages ("bundle", "backup").
    const KIND: &'static str;
    /// The manifest's path in the archive.
    const MANIFEST: &'static str;
    /// The minisign signature over the manifest's bytes.
    const SIGNATURE: &'static str;
    /// The signer's public key, carried so that an unkeyed check still catches damage.
    const PUBKEY: &'static str;
    /// The command that checks such a file, for hints ("bkbundle verify").
    const VERIFY: &'static str;
    /// Parse the manifest (format checked first); `origin` names it in errors.
    fn parse(text: &str, origin: &str) -> Result<Self>;
    /// Every payload file, in archive order.
    fn files(&self) -> &[FileEntry];
    /// The payload at `path`.
    fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files().iter().find(|f| f.path == path)
    }
    /// The descriptive files (never listed in `files`).
    fn descriptive() -> [&'static str; 4] {
        [Self::MANIFEST, Self::SIGNATURE, Self::PUBKEY, SUMS]
    }
}

impl Document for Manifest {
    const KIND: &'static str = "bundle";
    const MANIFEST: &'static str = MANIFEST;
    const SIGNATURE: &'static str = SIGNATURE;
    const PUBKEY: &'static str = PUBKEY;
    const VERIFY: &'static str = "bkbundle verify";
    fn parse(text: &str, origin: &str) -> Result<Self> {
        Manifest::parse(text, origin).map_err(|e| e.into_error(crate::error::Kind::Bundle))
    }
    fn files(&self) -> &[FileEntry] {
        &self.files
    }
    fn file(&self, path: &str) -> Option<&FileEntry> {
        Manifest::file(self, path)
    }
}

/// An archive whose structure and signature were checked (and, after [`Check::Full`], every byte).
pub struct Verified<D: Document> {
    reader: BundleReader,
    manifest: D,
    manifest_sha256: String,
    signature: SignatureStatus,
    /// Payload paths whose every byte was checked against the manifest.
    checked: Mutex<HashSet<String>>,
}

/// A bundle whose structure and signature were checked (and, after [`Check::Full`], every byte).
pub type VerifiedBundle = Verified<Manifest>;

impl<D: Document> std::fmt::Debug for Verified<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("kind", &D::KIND)
            .field("bundle", &self.reader.display_name())
            .field("manifest_sha256", &self.manifest_sha256)
            .field("signature", &self.signature)
            .finish_non_exhaustive()
    }
}

/// A stack file read whole and checked.
#[derive(Debug, Clone)]
pub struct StackFile {
    pub content: Vec<u8>,
    /// The entry's permission bits as packed.
    pub mode: u32,
}

/// Open `path`, check it as `opts` says, and return it; see the module documentation. Any problem
/// fails the open with every problem listed, and the bundle is not handed out.
pub fn open_verified(path: &Path, opts: &OpenOptions, reporter: &dyn Reporter) -> Result<VerifiedBundle> {
    open_document(path, opts, reporter)
}

/// [`open_verified`] for any archive of this format: a bundle, or a backup.
pub fn open_document<D: Document>(path: &Path, opts: &OpenOptions, reporter: &dyn Reporter) -> Result<Verified<D>> {
    let trusted = trusted_key(opts)?;
    let reader = BundleReader::open(path)?;
    let (manifest, manifest_bytes) = reader.document::<D>()?;
    let manifest_sha256 = sha256_hex(&manifest_bytes);
    let mut problems = Vec::new();
    let work = compare_entries(&reader, &manifest, &mut problems);
    let (sig, pubkey) = (reader.read_small(D::SIGNATURE)?, reader.read_small(D::PUBKEY)?);
    check_sums(&reader, &manifest, &manifest_sha256, [&sig, &pubkey], &mut problems)?;
    let before = problems.len();
    let mut trouble = None;
    let sig_opts = SigCheck {
        trusted: trusted.as_ref(),
        key_path: opts.key.as_ref().map(|k| k.display().to_string()).unwrap_or_default(),
        require: opts.require_signature,
    };
    let signature = sig_opts.check::<D>(&sig, &pubkey, &manifest_bytes, &mut problems, &mut trouble);
    let signature_problems = problems.len() - before;
    if opts.check == Check::Full {
        problems.extend(hash_all(&reader, &work, opts.threads, reporter));
    }
    if !problems.is_empty() {
        return Err(failed::<D>(
            &reader.display_name(),
            problems,
            signature_problems,
            trouble,
        ));
    }
    // The full check is what an operator runs before trusting a bundle (verify, install): it says
    // what a self-signed bundle proves. Opening to read a few entries stays quiet.
    if let (Check::Full, SignatureStatus::SelfSigned { warning, .. }) = (opts.check, &signature) {
        reporter.note(&format!("WARNING: {} {}: {warning}", D::KIND, reader.display_name()));
    }
    let checked = match opts.check {
        Check::Full => manifest.files().iter().map(|f| f.path.clone()).collect(),
        Check::Structure => HashSet::new(),
    };
    Ok(Verified {
        reader,
        manifest,
        manifest_sha256,
        signature,
        checked: Mutex::new(checked),
    })
}

/// The trusted key of `--key`, parsed; `--require-signature` without one is refused.
fn trusted_key(opts: &OpenOptions) -> Result<Option<minisign::PublicKey>> {
    if opts.require_signature && opts.key.is_none() {
        return Err(
            Error::input("--require-signature needs --key PUBKEY: the public key you trust")
                .hint("pass the minisign .pub file the bundle's publisher gave you"),
        );
    }
    let Some(k) = &opts.key else { return Ok(None) };
    let text = std::fs::read_to_string(k).map_err(|e| Error::io("cannot read public key", k, e))?;
    sign::parse_public_key(&text)
        .map(Some)
        .map_err(|e| Error::input(format!("public key {}: not a minisign public key ({e})", k.display())))
}

/// The archive's files against the manifest's list: what is missing, of another size, or not
/// listed. Returns the entries to hash with their expected digests.
fn compare_entries<'a, D: Document>(
    reader: &'a BundleReader,
    manifest: &'a D,
    problems: &mut Vec<String>,
) -> Vec<(&'a Entry, &'a str)> {
    let mut work = Vec::new();
    for f in manifest.files() {
        match reader.entry(&f.path) {
            None => problems.push(format!("{}: missing from the {}", f.path, D::KIND)),
            Some(e) if e.size != f.size => {
                problems.push(format!("{}: size expected {} bytes, found {}", f.path, f.size, e.size))
            }
            Some(e) => work.push((e, f.sha256.as_str())),
        }
    }
    for e in reader.entries() {
        if manifest.file(&e.path).is_none() && !D::descriptive().contains(&e.path.as_str()) {
            problems.push(format!("{}: in the {} but not listed in its manifest", e.path, D::KIND));
        }
    }
    work
}

/// `SHA256SUMS` against the one the manifest (and the signature files present) imply.
fn check_sums<D: Document>(
    reader: &BundleReader,
    manifest: &D,
    manifest_sha256: &str,
    [sig, pubkey]: [&Option<Vec<u8>>; 2],
    problems: &mut Vec<String>,
) -> Result<()> {
    let mut extra = Vec::new();
    for (path, data) in [(D::SIGNATURE, sig), (D::PUBKEY, pubkey)] {
        if let Some(d) = data {
            extra.push((path, sha256_hex(d)));
        }
    }
    let expected = layout::sha256sums_of(manifest.files(), D::MANIFEST, manifest_sha256, &extra);
    match reader.read_small(SUMS)? {
        None => problems.push(format!("{SUMS}: missing from the {}", D::KIND)),
        Some(s) if s != expected.as_bytes() => problems.push(format!(
            "{SUMS}: does not match the manifest ({} or {SUMS} was altered)",
            D::MANIFEST
        )),
        Some(_) => {}
    }
    Ok(())
}

/// Every entry's content against its digest, largest first, over several threads; the problems
/// found, sorted.
fn hash_all(
    reader: &BundleReader,
    work: &[(&Entry, &str)],
    threads: Option<usize>,
    reporter: &dyn Reporter,
) -> Vec<String> {
    let mut work = work.to_vec();
    work.sort_by_key(|w| std::cmp::Reverse(w.0.size));
    let total: u64 = work.iter().map(|(e, _)| e.size).fold(0, u64::saturating_add);
    let task = reporter.task("verifying", Some(total));
    let threads = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
        .max(1);
    let next = AtomicUsize::new(0);
    let found = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.min(work.len().max(1)) {
            s.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                while let Some((e, want)) = work.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let mut r = reader.reader(e);
                    let mut h = Hasher::new();
                    let outcome = loop {
                        match r.read(&mut buf) {
                            Ok(0) => break Ok(h.finish().0),
                            Ok(n) => {
                                h.update(&buf[..n]);
                                task.advance(n as u64);
                            }
                            Err(err) => break Err(format!("{}: cannot read: {err}", e.path)),
                        }
                    };
                    let problem = match outcome {
                        Ok(got) if got == *want => None,
                        Ok(got) => Some(format!("{}: sha256 expected {want}, found {got}", e.path)),
                        Err(m) => Some(m),
                    };
                    if let Some(p) = problem {
                        found.lock().unwrap_or_else(|p| p.into_inner()).push(p);
                    }
                }
            });
        }
    });
    task.finish();
    let mut found = found.into_inner().unwrap_or_else(|p| p.into_inner());
    found.sort();
    found
}

/// The one error for a bundle that failed its check: every problem (the first 20 shown), and the
/// hint that fits: another signer's key, a missing signature, or damage.
fn failed<D: Document>(
    name: &str,
    problems: Vec<String>,
    signature_problems: usize,
    trouble: Option<SigTrouble>,
) -> Error {
    const SHOWN: usize = 20;
    let more = problems.len().saturating_sub(SHOWN);
    let mut msg = format!(
        "{} {name} failed verification ({} problem(s)):\n  - {}",
        D::KIND,
        problems.len(),
        problems[..problems.len().min(SHOWN)].join("\n  - ")
    );
    if more > 0 {
        msg.push_str(&format!("\n  ... and {more} more"));
    }
    let mut e = Error::bundle(msg);
    // A key that is not the signer's is no damage: copying the bundle again would not help.
    let only_signature = signature_problems > 0 && signature_problems == problems.len();
    match &trouble {
        Some(SigTrouble::OtherSigner { signer, trusted, key }) => {
            e = e
                .hint(format!(
                    "the bundle was signed by key {signer}, but --key {key} is key {trusted}: pass the public key of whoever packed this bundle (key id {signer}) with --key"
                ))
                .hint(format!(
                    "if you expected key {trusted}, this bundle does not come from that signer: do not install it; ask its publisher for a bundle signed with that key"
                ));
        }
        Some(SigTrouble::Unsigned { key }) => {
            e = e.hint(format!(
                "--key {key} means the signature is required: ask the publisher for a signed bundle (`bkbundle pack --sign KEY`), or leave out --key only if you accept an unsigned bundle"
            ));
        }
        _ => {}
    }
    if !only_signature || matches!(trouble, None | Some(SigTrouble::Damaged)) {
        e = e.hint(match D::KIND {
            "bundle" => {
                "nothing was changed; copy the bundle again from the original media (or re-run pack) and verify again"
                    .to_string()
            }
            kind => format!(
                "nothing was changed; copy the {kind} again from where it was kept and verify it again ({} FILE)",
                D::VERIFY
            ),
        });
    }
    e
}

/// What the signature is checked against, and whether one is required.
struct SigCheck<'a> {
    trusted: Option<&'a minisign::PublicKey>,
    /// `--key`'s path as given, for messages.
    key_path: String,
    require: bool,
}

impl SigCheck<'_> {
    fn check<D: Document>(
        &self,
        sig: &Option<Vec<u8>>,
        pubkey: &Option<Vec<u8>>,
        manifest: &[u8],
        problems: &mut Vec<String>,
        trouble: &mut Option<SigTrouble>,
    ) -> SignatureStatus {
        let key_path = self.key_path.clone();
        let (sig_file, kind) = (D::SIGNATURE, D::KIND);
        let Some(sig) = sig else {
            // A trusted key means the signature is required, --require-signature or not.
            if self.trusted.is_some() {
                problems.push(format!(
                    "{sig_file}: the {kind} is not signed, but --key {key_path} was given: a trusted key requires a signature"
                ));
                *trouble = Some(SigTrouble::Unsigned { key: key_path });
            } else if self.require {
                problems.push(format!(
                    "{sig_file}: the {kind} is not signed, and --require-signature was given"
                ));
            }
            return SignatureStatus::Unsigned;
        };
        let sig_text = String::from_utf8_lossy(sig);
        match self.trusted {
            Some(pk) => Self::trusted::<D>(pk, &sig_text, manifest, key_path, problems, trouble),
            None => Self::self_signed::<D>(pubkey, &sig_text, manifest, problems),
        }
    }

    fn trusted<D: Document>(
        pk: &minisign::PublicKey,
        sig_text: &str,
        manifest: &[u8],
        key_path: String,
        problems: &mut Vec<String>,
        trouble: &mut Option<SigTrouble>,
    ) -> SignatureStatus {
        let sig_file = D::SIGNATURE;
        let id = sign::key_id(pk.keynum());
        let e = match sign::verify(pk, sig_text, manifest) {
            Ok(trusted_comment) => {
                return SignatureStatus::Verified {
                    key_id: id,
                    trusted_comment,
                }
            }
            Err(e) => e,
        };
        match sign::signature_key_id(sig_text) {
            Some(signer) if signer != id => {
                problems.push(format!(
                    "{sig_file}: signed by key {signer}, not the key {id} given with --key {key_path}"
                ));
                *trouble = Some(SigTrouble::OtherSigner {
                    signer,
                    trusted: id,
                    key: key_path,
                });
            }
            _ => {
                problems.push(format!(
                    "{sig_file}: does not verify with the trusted key {id} ({key_path}): {e}"
                ));
                *trouble = Some(SigTrouble::Damaged);
            }
        }
        SignatureStatus::Unsigned
    }

    /// No trusted key: check against the key the bundle carries, which catches damage, not forgery.
    fn self_signed<D: Document>(
        pubkey: &Option<Vec<u8>>,
        sig_text: &str,
        manifest: &[u8],
        problems: &mut Vec<String>,
    ) -> SignatureStatus {
        let (sig_file, pub_file, kind) = (D::SIGNATURE, D::PUBKEY, D::KIND);
        let pk = match pubkey
            .as_ref()
            .map(|p| sign::parse_public_key(&String::from_utf8_lossy(p)))
        {
            Some(Ok(pk)) => pk,
            Some(Err(e)) => {
                problems.push(format!("{pub_file}: unreadable public key: {e}"));
                return SignatureStatus::Unsigned;
            }
            None => {
                problems.push(format!("{sig_file}: present but {pub_file} is missing"));
                return SignatureStatus::Unsigned;
            }
        };
        let key_id = sign::key_id(pk.keynum());
        match sign::verify(&pk, sig_text, manifest) {
            Ok(_) => SignatureStatus::SelfSigned {
                warning: format!(
                    "the signature (key {key_id}) was checked only against the public key the {kind} carries itself ({pub_file}): that shows the manifest is intact, but anyone can sign a {kind} with a key of their own, so it is NOT verified by a trusted key; pass --key with the publisher's .pub file to check who signed it"
                ),
                key_id,
                trusted: false,
            },
            Err(e) => {
                problems.push(format!("{sig_file}: does not verify with the {kind}'s own key {key_id}: {e}"));
                SignatureStatus::Unsigned
            }
        }
    }
}

impl<D: Document> Verified<D> {
    pub fn manifest(&self) -> &D {
        &self.manifest
    }

    /// SHA-256 (hex) of the manifest's bytes: with the manifest listing every payload's digest,
    /// it identifies the bundle's whole content (install's journal keys on it).
    pub fn manifest_sha256(&self) -> &str {
        &self.manifest_sha256
    }

    /// Human name for messages: the single file, or its first part and how many more.
    pub fn display_name(&self) -> String {
        self.reader.display_name()
    }

    pub fn signature(&self) -> &SignatureStatus {
        &self.signature
    }

    /// Whether the bundle carries a signature (it verified, or opening would have failed).
    pub fn is_signed(&self) -> bool {
        self.reader.entry(D::SIGNATURE).is_some()
    }

    /// Payload files the manifest lists.
    pub fn files(&self) -> usize {
        self.manifest.files().len()
    }

    /// The bundle's size in bytes, all parts.
    pub fn bytes(&self) -> u64 {
        self.reader.len()
    }

    /// How many files the bundle is (1, or its numbered parts).
    pub fn parts(&self) -> usize {
        self.reader.parts()
    }
}

impl Verified<Manifest> {
    /// The config of `image`, checked as it is read.
    pub fn config(&self, image: &Image) -> Result<EntryReader<'_>> {
        self.payload(&image.config)
    }

    /// The compressed payload of `layer`, checked as it is read.
    pub fn layer(&self, layer: &Layer) -> Result<EntryReader<'_>> {
        self.payload(&layer.file)
    }

    /// A package file (a manifest package's `file`), checked as it is read.
    pub fn package(&self, path: &str) -> Result<EntryReader<'_>> {
        self.payload(path)
    }

    /// A controller installer program's bytes (a manifest installer's `file`), checked as they
    /// are read: a damaged installer fails the read that would return its last bytes.
    pub fn installer(&self, installer: &Installer) -> Result<EntryReader<'_>> {
        self.payload(&installer.file)
    }
}

impl<D: Document> Verified<D> {
    /// A package file that is read as an archive (zip needs to seek): checked whole first, unless
    /// it was already, then handed out seekable.
    pub fn package_archive(&self, path: &str) -> Result<EntryReader<'_, D>> {
        let mut r = self.payload(path)?;
        if r.hasher.is_some() {
            io::copy(&mut r, &mut io::sink()).map_err(|e| self.read_error(path, e))?;
            r = self.payload(path)?;
        }
        Ok(r)
    }

    /// A stack file (a path of the manifest's `stack.files`), read whole and checked.
    pub fn stack_file(&self, path: &str) -> Result<StackFile> {
        let mut r = self.payload(path)?;
        let mut content = Vec::with_capacity(r.size().min(1 << 20) as usize);
        r.read_to_end(&mut content).map_err(|e| self.read_error(path, e))?;
        Ok(StackFile { content, mode: r.mode })
    }

    fn read_error(&self, path: &str, e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::InvalidData {
            // Our own digest message: it names the entry and both digests already.
            return Error::bundle(e.to_string()).hint(self.damage_hint());
        }
        Error::bundle(format!("{}: cannot read {path}: {e}", self.display_name())).hint(self.damage_hint())
    }

    fn damage_hint(&self) -> String {
        format!(
            "run `{} {}`, and copy it again from the original media",
            D::VERIFY,
            self.display_name()
        )
    }

    /// A reader over payload `path`: hashing unless already checked.
    pub fn payload(&self, path: &str) -> Result<EntryReader<'_, D>> {
        let file = self.manifest.file(path).ok_or_else(|| {
            Error::bundle(format!("{}: {path} is not listed in its manifest", self.display_name())).hint(format!(
                "the manifest refers to a file it does not list: the {} is damaged; copy it again and run `{}`",
                D::KIND,
                D::VERIFY
            ))
        })?;
        // Opening compared every listed file with the archive: the entry is there, this size.
        let entry = self.reader.entry(path).ok_or_else(|| {
            Error::internal(format!(
                "{path} is listed but was not found after the bundle was checked"
            ))
        })?;
        let checked = self.checked.lock().unwrap_or_else(|p| p.into_inner()).contains(path);
        Ok(EntryReader {
            bundle: self,
            file,
            mode: entry.mode,
            inner: self.reader.reader(entry),
            hasher: (!checked).then(Hasher::new),
            read: 0,
            failed: None,
        })
    }
}

/// A reader over one payload. Until the entry has been checked, it hashes what it returns, and the
/// read that reaches the last byte fails (an [`io::ErrorKind::InvalidData`] naming the entry and
/// the expected and found digests) instead of returning those bytes when the digest differs; the
/// failure repeats on every later read. Seeking is possible only in an entry already checked.
pub struct EntryReader<'a, D: Document = Manifest> {
    bundle: &'a Verified<D>,
    file: &'a FileEntry,
    mode: u32,
    inner: RangeReader<'a>,
    hasher: Option<Hasher>,
    read: u64,
    failed: Option<String>,
}

impl<D: Document> EntryReader<'_, D> {
    /// The payload's size in bytes.
    pub fn size(&self) -> u64 {
        self.file.size
    }

    /// The payload's path in the bundle.
    pub fn path(&self) -> &str {
        &self.file.path
    }

    /// The entry's permission bits as packed.
    pub fn mode(&self) -> u32 {
        self.mode
    }

    fn mismatch(&mut self, got: &str) -> io::Error {
        let m = format!(
            "{} in {}: sha256 expected {}, found {got}: the {} is damaged",
            self.file.path,
            self.bundle.display_name(),
            self.file.sha256,
            D::KIND
        );
        self.failed = Some(m.clone());
        io::Error::new(io::ErrorKind::InvalidData, m)
    }
}

impl<D: Document> Read for EntryReader<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(m) = &self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, m.clone()));
        }
        let n = self.inner.read(buf)?;
        let Some(h) = &mut self.hasher else { return Ok(n) };
        h.update(&buf[..n]);
        self.read += n as u64;
        if self.read < self.file.size {
            return Ok(n);
        }
        let Some(h) = self.hasher.take() else { return Ok(n) };
        let (got, _) = h.finish();
        if got != self.file.sha256 {
            return Err(self.mismatch(&got));
        }
        self.bundle
            .checked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.file.path.clone());
        Ok(n)
    }
}

impl<D: Document> Seek for EntryReader<'_, D> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        if self.hasher.is_some() {
            return Err(io::Error::other(format!(
                "{} is being checked as it is read and cannot seek (open it with package_archive)",
                self.file.path
            )));
        }
        self.inner.seek(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::BundleWriter;
    use crate::manifest::{BundleInfo, Compression, Stack, FORMAT};
    use crate::progress::Silent;

    /// A bundle with two stack files, one of them then damaged in place when `flip` is set.
    fn bundle(dir: &Path, flip: bool) -> PathBuf {
        let p = dir.join("b.bkb");
        let mut w = BundleWriter::create(&p, None, 0).unwrap();
        let a = w
            .add_bytes(&layout::stack_path("a.yml"), 0o644, b"services: {}\n")
            .unwrap();
        let b = w
            .add_bytes(&layout::stack_path("run.sh"), 0o755, b"#!/bin/sh\n")
            .unwrap();
        let m = Manifest {
            format: FORMAT,
            bundle: BundleInfo {
                name: "t".into(),
                version: "1".into(),
                description: String::new(),
                created: "2026-01-01T00:00:00Z".into(),
                created_by: "test".into(),
                compression: Compression::Zstd,
                without_layers: false,
            },
            base: None,
            files: w.files().to_vec(),
            layers: vec![],
            images: vec![],
            packages: vec![],
            installers: vec![],
            provenance: vec![],
            stack: Some(Stack {
                project: "t".into(),
                compose: a.path.clone(),
                env_template: None,
                files: vec![a.path, b.path],
                nats_tls: false,
            }),
            regions: Default::default(),
        };
        w.add_descriptive(&m, &m.to_toml(), None).unwrap();
        w.commit().unwrap();
        if flip {
            let mut bytes = std::fs::read(&p).unwrap();
            let at = bytes.windows(9).position(|w| w == b"services:").unwrap();
            bytes[at] = b'S';
            std::fs::write(&p, bytes).unwrap();
        }
        p
    }

    fn structure() -> OpenOptions {
        OpenOptions {
            check: Check::Structure,
            ..Default::default()
        }
    }

    #[test]
    fn structure_opens_a_damaged_payload_but_its_read_fails_naming_both_digests() {
        let dir = tempfile::tempdir().unwrap();
        let p = bundle(dir.path(), true);
        let b = open_verified(&p, &structure(), &Silent).unwrap();
        let e = b.stack_file("stack/a.yml").unwrap_err();
        assert!(
            e.message.contains("stack/a.yml") && e.message.contains("sha256 expected") && e.message.contains("found"),
            "{}",
            e.message
        );
        let f = b.stack_file("stack/run.sh").unwrap();
        assert_eq!((f.content.as_slice(), f.mode), (&b"#!/bin/sh\n"[..], 0o755));
        // The full check refuses it before handing anything out.
        let e = open_verified(&p, &OpenOptions::default(), &Silent).unwrap_err();
        assert!(e.message.contains("stack/a.yml: sha256 expected"), "{}", e.message);
    }

    #[test]
    fn a_checked_entry_reads_again_and_seeks() {
        let dir = tempfile::tempdir().unwrap();
        let p = bundle(dir.path(), false);
        let b = open_verified(&p, &structure(), &Silent).unwrap();
        let mut r = b.package_archive("stack/a.yml").unwrap();
        r.seek(SeekFrom::Start(10)).unwrap();
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "{}\n");
        assert_eq!(b.stack_file("stack/a.yml").unwrap().content, b"services: {}\n");
        assert!(b.payload("stack/none").is_err());
        assert_eq!(b.files(), 2);
        assert!(!b.is_signed());
    }

    #[test]
    fn an_extra_entry_fails_the_structure_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bkb");
        let mut w = BundleWriter::create(&p, None, 0).unwrap();
        w.add_bytes("stack/a", 0o644, b"a").unwrap();
        let m = Manifest {
            format: FORMAT,
            bundle: BundleInfo {
                name: "t".into(),
                version: "1".into(),
                description: String::new(),
                created: "x".into(),
                created_by: "x".into(),
                compression: Compression::Zstd,
                without_layers: false,
            },
            base: None,
            files: vec![],
            layers: vec![],
            images: vec![],
            packages: vec![],
            installers: vec![],
            provenance: vec![],
            stack: None,
            regions: Default::default(),
        };
        w.add_descriptive(&m, &m.to_toml(), None).unwrap();
        w.commit().unwrap();
        let e = open_verified(&p, &structure(), &Silent).unwrap_err();
        assert!(
            e.message.contains("stack/a: in the bundle but not listed"),
            "{}",
            e.message
        );
    }

    #[test]
    fn an_altered_sums_file_or_a_missing_key_fails_even_the_structure_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = bundle(dir.path(), false);
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes.windows(14).position(|w| w == b"  stack/a.yml\n").unwrap() - 1;
        bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
        std::fs::write(&p, bytes).unwrap();
        let e = open_verified(&p, &structure(), &Silent).unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::Bundle);
        assert!(
            e.message.contains("SHA256SUMS: does not match the manifest"),
            "{}",
            e.message
        );
        let opts = OpenOptions {
            require_signature: true,
            ..structure()
        };
        let e = open_verified(&p, &opts, &Silent).unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::Input);
        assert!(e.message.contains("--require-signature needs --key"), "{}", e.message);
    }
}
