//! `bkbundle verify`: is every byte of the bundle what its manifest says?
//!
//! The check itself is [`crate::bundle::open_verified`] with [`Check::Full`] (framing, manifest,
//! `SHA256SUMS`, signature, and every payload's size and SHA-256 on several threads, every problem
//! reported together); this module turns its outcome into the command's report.

use crate::bundle::{open_verified, Check, OpenOptions};
use crate::error::Result;
use crate::inspect::{human, images_without_layers, installer_rows, render_installers, InstallerRow};
use crate::progress::Reporter;
use crate::report::Report;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

pub use crate::bundle::SignatureStatus;

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
pub struct VerifyReport {
    pub bundle: String,
    pub name: String,
    pub version: String,
    pub files: usize,
    pub bytes: u64,
    pub signature: SignatureStatus,
    /// Packed with `--no-images`: every file checked, but the images' layers are not among them.
    pub without_layers: bool,
    pub images: usize,
    /// A delta (`pack --base`): its base (`NAME VERSION (id …)`) and the payloads left to it,
    /// which are not in this file and so not checked here (install checks them by digest on the
    /// site; `merge` as it copies them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_of: Option<String>,
    pub files_left_to_base: usize,
    /// The controller installer programs, each checked with the rest.
    pub installers: Vec<InstallerRow>,
    pub seconds: f64,
}

pub fn run(opts: &VerifyOptions, reporter: &dyn Reporter) -> Result<VerifyReport> {
    let t0 = Instant::now();
    let open = OpenOptions {
        require_signature: opts.require_signature,
        key: opts.key.clone(),
        threads: opts.threads,
        check: Check::Full,
    };
    let bundle = open_verified(&opts.bundle, &open, reporter)?;
    let m = bundle.manifest();
    Ok(VerifyReport {
        bundle: bundle.display_name(),
        name: m.bundle.name.clone(),
        version: m.bundle.version.clone(),
        files: bundle.files(),
        bytes: bundle.bytes(),
        signature: bundle.signature().clone(),
        without_layers: m.bundle.without_layers,
        images: m.images.len(),
        delta_of: m.base.as_ref().map(|b| b.describe()),
        files_left_to_base: m.base.as_ref().map(|b| b.files.len()).unwrap_or(0),
        installers: installer_rows(m),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

impl Report for VerifyReport {
    fn render(&self) -> String {
        let sig = match &self.signature {
            SignatureStatus::Unsigned => "unsigned".to_string(),
            SignatureStatus::Verified { key_id, .. } => format!("signature verified with trusted key {key_id}"),
            SignatureStatus::SelfSigned { key_id, .. } => {
                format!("signed by key {key_id}, NOT verified by a trusted key (checked only against the key inside the bundle; pass --key PUBKEY to check who signed it)")
            }
        };
        let rate = self.bytes as f64 / self.seconds.max(1e-9);
        let mut installers = String::new();
        if !self.installers.is_empty() {
            render_installers(&mut installers, &self.installers);
        }
        let mut layers = if self.without_layers {
            format!("\n{}", images_without_layers(self.images))
        } else {
            String::new()
        };
        if let Some(base) = &self.delta_of {
            layers.push_str(&format!(
                "\na delta of bundle {base}: the {} payload(s) it leaves to that bundle are not in this file (install takes them from the site, checked by digest)",
                self.files_left_to_base
            ));
        }
        format!(
            "OK {} {} ({}): {} files, {} checked in {:.2}s ({}/s); {sig}{layers}{}",
            self.name,
            self.version,
            self.bundle,
            self.files,
            human(self.bytes),
            self.seconds,
            human(rate as u64),
            installers.trim_end()
        )
    }
}
