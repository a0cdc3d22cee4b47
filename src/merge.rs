//! `bkbundle merge OLD NEW -o FULL`: a delta bundle (`pack --base OLD`) made whole again, for a
//! site that was never installed from its base. Both bundles are checked first (NEW whole, OLD's
//! structure, and that OLD is the base NEW records); then NEW's payloads and the ones it leaves to
//! OLD are copied into FULL, every byte hashed on the way against the digest NEW's manifest
//! records for it. Nothing is unpacked: memory stays at a few buffers whatever the sizes.
//!
//! When OLD is itself a delta, what NEW leaves to OLD's own base stays left to it: FULL is then a
//! delta of OLD's base (the report says so).

use crate::bundle::{open_verified, BundleWriter, Check, OpenOptions, VerifiedBundle};
use crate::error::{Error, Result};
use crate::manifest::{Base, FileEntry, Manifest};
use crate::progress::{ProgressReader, Reporter};
use crate::report::Report;
use crate::sign::{self, Signer};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// The base bundle (the one NEW was packed against).
    pub base: PathBuf,
    /// The delta bundle.
    pub delta: PathBuf,
    pub output: PathBuf,
    /// Trusted public key for both inputs' signatures (required when given).
    pub key: Option<PathBuf>,
    /// Sign FULL's manifest with this minisign secret key.
    pub sign_key: Option<PathBuf>,
    pub split_size: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct MergeReport {
    pub output: Vec<PathBuf>,
    pub bundle: String,
    pub version: String,
    /// FULL's id (SHA-256 of its bundle.toml; not NEW's: its manifest lists more files).
    pub id: String,
    /// Payloads copied from the delta and from the base, and their bytes.
    pub from_delta: usize,
    pub from_base: usize,
    pub bytes_from_base: u64,
    pub bytes: u64,
    /// Still a delta: what OLD left to its own base stays there (`NAME VERSION (id …)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub still_delta_of: Option<String>,
    pub signed_by: Option<String>,
    pub seconds: f64,
}

pub fn run(opts: &MergeOptions, reporter: &dyn Reporter) -> Result<MergeReport> {
    let t0 = std::time::Instant::now();
    let signer = opts.sign_key.as_deref().map(Signer::load).transpose()?;
    let open = |check| OpenOptions {
        require_signature: opts.key.is_some(),
        key: opts.key.clone(),
        threads: None,
        check,
    };
    let delta = open_verified(&opts.delta, &open(Check::Full), reporter)?;
    let dm = delta.manifest();
    let Some(want) = dm.base.clone() else {
        return Err(Error::input(format!(
            "{} is a full bundle (not packed with --base): there is nothing to merge into it",
            delta.display_name()
        ))
        .hint("install or copy it as it is"));
    };
    // The base's payloads are hashed as they are copied (against NEW's record of them), so only
    // its structure is checked here.
    let base = open_verified(&opts.base, &open(Check::Structure), reporter)?;
    if base.manifest_sha256() != want.id {
        let bm = base.manifest();
        return Err(Error::input(format!(
            "{} is bundle {} {} (id {}), but {} is a delta of bundle {}",
            base.display_name(),
            bm.bundle.name,
            bm.bundle.version,
            crate::manifest::short_id(base.manifest_sha256()),
            delta.display_name(),
            want.describe()
        ))
        .hint(format!(
            "give the bundle {} {} NEW was packed against (`bkbundle inspect` shows a bundle's id), as the first argument",
            want.name, want.version
        )));
    }
    let (manifest, plan) = merged(dm, &want, &base)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if let Some(dir) = opts.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(
                Error::input(format!("output directory {} does not exist", dir.display()))
                    .hint("create the directory first, or give -o a path in an existing one"),
            );
        }
    }
    let mut w = BundleWriter::create(&opts.output, opts.split_size, now)?;
    let total: u64 = plan.iter().map(|(f, _)| f.size).fold(0, u64::saturating_add);
    let task = reporter.task("merging", Some(total));
    let mut bytes_from_base = 0u64;
    for (f, from_base) in &plan {
        let src: &VerifiedBundle = if *from_base { &base } else { &delta };
        let mut r = src.payload(&f.path)?;
        let mode = r.mode();
        // A base payload is hashed against NEW's record of it (the same path, size and digest
        // OLD lists: checked when planning), so a damaged or substituted one fails here.
        let e = w.add_reader(
            &f.path,
            mode,
            &mut ProgressReader {
                inner: &mut r,
                task: &*task,
            },
        )?;
        if e.sha256 != f.sha256 || e.size != f.size {
            return Err(Error::bundle(format!(
                "{}: {} is {} bytes with sha256 {}, but the delta records {} bytes with sha256 {}",
                src.display_name(),
                f.path,
                e.size,
                e.sha256,
                f.size,
                f.sha256
            ))
            .hint("copy the bundle again from the original media and verify it"));
        }
        if *from_base {
            bytes_from_base = bytes_from_base.saturating_add(f.size);
        }
    }
    task.finish();
    if w.files() != manifest.files.as_slice() {
        return Err(Error::internal(
            "merge: the files written differ from the manifest's list",
        ));
    }
    let text = manifest.to_toml();
    let signature = match &signer {
        Some(s) => Some(s.sign(
            text.as_bytes(),
            &format!(
                "timestamp:{now}\tfile:{}\tbundle:{} {}",
                crate::bundle::layout::MANIFEST,
                manifest.bundle.name,
                manifest.bundle.version
            ),
        )?),
        None => None,
    };
    w.add_descriptive(
        &manifest,
        &text,
        signature.as_ref().map(|(s, p)| (s.as_str(), p.as_str())),
    )?;
    let bytes = w.position()? + 1024;
    let output = w.commit()?;
    Ok(MergeReport {
        output,
        bundle: manifest.bundle.name.clone(),
        version: manifest.bundle.version.clone(),
        id: crate::digest::sha256_hex(text.as_bytes()),
        from_delta: plan.iter().filter(|(_, b)| !b).count(),
        from_base: plan.iter().filter(|(_, b)| *b).count(),
        bytes_from_base,
        bytes,
        still_delta_of: manifest.base.as_ref().map(|b| b.describe()),
        signed_by: signature
            .and_then(|(_, pubkey)| sign::parse_public_key(&pubkey).ok())
            .map(|pk| sign::key_id(pk.keynum())),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// FULL's manifest and the payloads to copy, in order (`true`: from the base). Every payload NEW
/// leaves to the base must be one the base stores with the same size and digest, or one the base
/// itself leaves to its own base (which FULL then leaves there too).
fn merged(dm: &Manifest, want: &Base, base: &VerifiedBundle) -> Result<(Manifest, Vec<(FileEntry, bool)>)> {
    let bm = base.manifest();
    let mut plan: Vec<(FileEntry, bool)> = dm.files.iter().map(|f| (f.clone(), false)).collect();
    let mut still = Vec::new();
    let mut problems = Vec::new();
    for f in &want.files {
        match (bm.file(&f.path), bm.base.as_ref().and_then(|b| b.file(&f.path))) {
            (Some(b), _) if b == f => plan.push((f.clone(), true)),
            (None, Some(b)) if b == f => still.push(f.clone()),
            (Some(b), _) | (None, Some(b)) => problems.push(format!(
                "{}: the delta records {} bytes with sha256 {}, the base lists {} bytes with sha256 {}",
                f.path, f.size, f.sha256, b.size, b.sha256
            )),
            (None, None) => problems.push(format!("{}: not in the base", f.path)),
        }
    }
    if !problems.is_empty() {
        return Err(Error::bundle(format!(
            "{} does not hold what the delta leaves to it ({} problem(s)):\n  - {}",
            base.display_name(),
            problems.len(),
            problems.join("\n  - ")
        ))
        .hint(
            "the base's manifest matches the id the delta records, so the delta itself is inconsistent: pack it again",
        ));
    }
    let mut m = dm.clone();
    m.files = plan.iter().map(|(f, _)| f.clone()).collect();
    m.base = match (&bm.base, still.is_empty()) {
        (Some(b), false) => Some(Base {
            files: still,
            ..b.clone()
        }),
        _ => None,
    };
    let problems = m.problems();
    if !problems.is_empty() {
        return Err(Error::internal(format!(
            "merge: the merged manifest is inconsistent: {}",
            problems.join("; ")
        )));
    }
    Ok((m, plan))
}

impl Report for MergeReport {
    fn render(&self) -> String {
        use crate::inspect::human;
        let mut s = format!(
            "merged {} {} into {} (id {})\n  {} payload(s) from the delta, {} ({}) from the base; {} in all",
            self.bundle,
            self.version,
            self.output
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            crate::manifest::short_id(&self.id),
            self.from_delta,
            self.from_base,
            human(self.bytes_from_base),
            human(self.bytes)
        );
        if let Some(b) = &self.still_delta_of {
            s.push_str(&format!(
                "\n  still a delta: the base was itself a delta, and what it left to bundle {b} stays there"
            ));
        }
        if let Some(k) = &self.signed_by {
            s.push_str(&format!("\n  signed by key {k}"));
        }
        s.push_str(&format!("\n  {:.1}s", self.seconds));
        s
    }
}
