//! `bkbundle verify`: is every byte of the bundle what its manifest says?
//!
//! Opening the bundle checks the tar framing (see `bundle::reader`); then every payload's size and
//! SHA-256 are checked against the manifest, on several threads at once (positional reads, so the
//! page cache is the limit, not one core's SHA-256), `SHA256SUMS` is checked against the manifest,
//! and the signature when there is one. Every problem is collected and reported together.

use crate::bundle::BundleReader;
use crate::digest::{sha256_hex, Hasher};
use crate::error::{Error, Result};
use crate::manifest::{Manifest, MANIFEST_PATH, PUBKEY_PATH, SIGNATURE_PATH, SUMS_PATH};
use crate::progress::Reporter;
use crate::sign;
use serde::Serialize;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    pub bundle: PathBuf,
    pub require_signature: bool,
    /// A trusted minisign public key file.
    pub key: Option<PathBuf>,
    /// Hashing threads; default: the number of CPUs.
    pub threads: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
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

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub bundle: String,
    pub name: String,
    pub version: String,
    pub files: usize,
    pub bytes: u64,
    pub signature: SignatureStatus,
    pub seconds: f64,
}

/// Verify and return the opened bundle and its manifest (what install builds on).
pub fn open_verified(opts: &VerifyOptions, reporter: &dyn Reporter) -> Result<(BundleReader, Manifest, VerifyReport)> {
    let t0 = Instant::now();
    if opts.require_signature && opts.key.is_none() {
        return Err(
            Error::input("--require-signature needs --key PUBKEY: the public key you trust")
                .hint("pass the minisign .pub file the bundle's publisher gave you"),
        );
    }
    let trusted =
        match &opts.key {
            Some(k) => {
                let text = std::fs::read_to_string(k).map_err(|e| Error::io("cannot read public key", k, e))?;
                Some(sign::parse_public_key(&text).map_err(|e| {
                    Error::input(format!("public key {}: not a minisign public key ({e})", k.display()))
                })?)
            }
            None => None,
        };
    let reader = BundleReader::open(&opts.bundle)?;
    let name = reader.src.display_name();
    let (manifest, manifest_bytes) = reader.manifest()?;
    let mut problems: Vec<String> = Vec::new();

    // Entries against the manifest.
    let described = [MANIFEST_PATH, SIGNATURE_PATH, PUBKEY_PATH, SUMS_PATH];
    let mut work = Vec::new();
    for f in &manifest.files {
        match reader.entry(&f.path) {
            None => problems.push(format!("{}: missing from the bundle", f.path)),
            Some(e) if e.size != f.size => {
                problems.push(format!("{}: size expected {} bytes, found {}", f.path, f.size, e.size))
            }
            Some(e) => work.push((e.clone(), f.sha256.clone())),
        }
    }
    for e in &reader.entries {
        if manifest.file(&e.path).is_none() && !described.contains(&e.path.as_str()) {
            problems.push(format!("{}: in the bundle but not listed in its manifest", e.path));
        }
    }

    // Signature and SHA256SUMS.
    let sig = reader.read_small(SIGNATURE_PATH)?;
    let pubkey = reader.read_small(PUBKEY_PATH)?;
    let mut extra = Vec::new();
    for (path, data) in [(SIGNATURE_PATH, &sig), (PUBKEY_PATH, &pubkey)] {
        if let Some(d) = data {
            extra.push((path, sha256_hex(d)));
        }
    }
    let expected_sums = manifest.sha256sums(&sha256_hex(&manifest_bytes), &extra);
    match reader.read_small(SUMS_PATH)? {
        None => problems.push(format!("{SUMS_PATH}: missing from the bundle")),
        Some(s) if s != expected_sums.as_bytes() => problems.push(format!(
            "{SUMS_PATH}: does not match the manifest ({MANIFEST_PATH} or {SUMS_PATH} was altered)"
        )),
        Some(_) => {}
    }
    let problems_before_signature = problems.len();
    let mut trouble = None;
    let signature = check_signature(
        &sig,
        &pubkey,
        trusted.as_ref(),
        &manifest_bytes,
        opts,
        &mut problems,
        &mut trouble,
    );
    let signature_problems = problems.len() - problems_before_signature;

    // Content digests, largest first, over several threads.
    work.sort_by_key(|w| std::cmp::Reverse(w.0.size));
    let total: u64 = work.iter().map(|(e, _)| e.size).fold(0, u64::saturating_add);
    let task = reporter.task("verifying", Some(total));
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
        .max(1);
    let next = AtomicUsize::new(0);
    let found = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.min(work.len().max(1)) {
            s.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((e, want)) = work.get(i) else { break };
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
                        Ok(got) if &got == want => None,
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
    problems.extend(found);

    if !problems.is_empty() {
        const SHOWN: usize = 20;
        let more = problems.len().saturating_sub(SHOWN);
        let mut msg = format!(
            "bundle {name} failed verification ({} problem(s)):\n  - {}",
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
                e = e.hint(format!(
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
            e = e.hint(
                "nothing was changed; copy the bundle again from the original media (or re-run pack) and verify again",
            );
        }
        return Err(e);
    }
    if let SignatureStatus::SelfSigned { warning, .. } = &signature {
        reporter.note(&format!("WARNING: bundle {name}: {warning}"));
    }
    let report = VerifyReport {
        bundle: name,
        name: manifest.bundle.name.clone(),
        version: manifest.bundle.version.clone(),
        files: manifest.files.len(),
        bytes: reader.src.len,
        signature,
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((reader, manifest, report))
}

pub fn run(opts: &VerifyOptions, reporter: &dyn Reporter) -> Result<VerifyReport> {
    open_verified(opts, reporter).map(|(_, _, r)| r)
}

fn check_signature(
    sig: &Option<Vec<u8>>,
    pubkey: &Option<Vec<u8>>,
    trusted: Option<&minisign::PublicKey>,
    manifest: &[u8],
    opts: &VerifyOptions,
    problems: &mut Vec<String>,
    trouble: &mut Option<SigTrouble>,
) -> SignatureStatus {
    let key_path = opts.key.as_ref().map(|k| k.display().to_string()).unwrap_or_default();
    let Some(sig) = sig else {
        // A trusted key means the signature is required, --require-signature or not.
        if trusted.is_some() {
            problems.push(format!(
                "{SIGNATURE_PATH}: the bundle is not signed, but --key {key_path} was given: a trusted key requires a signature"
            ));
            *trouble = Some(SigTrouble::Unsigned { key: key_path });
        } else if opts.require_signature {
            problems.push(format!(
                "{SIGNATURE_PATH}: the bundle is not signed, and --require-signature was given"
            ));
        }
        return SignatureStatus::Unsigned;
    };
    let sig_text = String::from_utf8_lossy(sig);
    if let Some(pk) = trusted {
        let id = sign::key_id(pk.keynum());
        return match sign::verify(pk, &sig_text, manifest) {
            Ok(trusted_comment) => SignatureStatus::Verified {
                key_id: id,
                trusted_comment,
            },
            Err(e) => {
                match sign::signature_key_id(&sig_text) {
                    Some(signer) if signer != id => {
                        problems.push(format!(
                            "{SIGNATURE_PATH}: signed by key {signer}, not the key {id} given with --key {key_path}"
                        ));
                        *trouble = Some(SigTrouble::OtherSigner {
                            signer,
                            trusted: id,
                            key: key_path,
                        });
                    }
                    _ => {
                        problems.push(format!(
                            "{SIGNATURE_PATH}: does not verify with the trusted key {id} ({key_path}): {e}"
                        ));
                        *trouble = Some(SigTrouble::Damaged);
                    }
                }
                SignatureStatus::Unsigned
            }
        };
    }
    // No trusted key: check against the key the bundle carries, which catches damage, not forgery.
    match pubkey
        .as_ref()
        .map(|p| sign::parse_public_key(&String::from_utf8_lossy(p)))
    {
        Some(Ok(pk)) => match sign::verify(&pk, &sig_text, manifest) {
            Ok(_) => {
                let key_id = sign::key_id(pk.keynum());
                SignatureStatus::SelfSigned {
                    warning: format!(
                        "the signature (key {key_id}) was checked only against the public key the bundle carries itself ({PUBKEY_PATH}): that shows the manifest is intact, but anyone can sign a bundle with a key of their own, so it is NOT verified by a trusted key; pass --key with the publisher's .pub file to check who signed it"
                    ),
                    key_id,
                    trusted: false,
                }
            }
            Err(e) => {
                problems.push(format!(
                    "{SIGNATURE_PATH}: does not verify with the bundle's own key {}: {e}",
                    sign::key_id(pk.keynum())
                ));
                SignatureStatus::Unsigned
            }
        },
        Some(Err(e)) => {
            problems.push(format!("{PUBKEY_PATH}: unreadable public key: {e}"));
            SignatureStatus::Unsigned
        }
        None => {
            problems.push(format!("{SIGNATURE_PATH}: present but {PUBKEY_PATH} is missing"));
            SignatureStatus::Unsigned
        }
    }
}
