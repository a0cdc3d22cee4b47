//! The installers check: agents cannot be installed on releases from April 2026 without the
//! controller installer programs in the object store (the Linux bootstrap downloads the installer,
//! which fetches the controller package itself). A missing one is the 404 of the field's package
//! failure, for the installer: an error. With `--bundle`, an installer that differs from the
//! bundle's is a warning (it may not match the bundle's controller package).

use super::{Ctx, Severity};
use crate::platform::packages::{self as keys, Row};
use crate::platform::release::Release;
use crate::ports::ObjectStore;
use std::collections::{BTreeMap, BTreeSet};

/// The installer file each OS's agents need (the GUI/bootstrap installer of Windows remote
/// install, `bklite-controller-bootstrap.exe`, is checked when the bundle carries it).
fn needed_file(os: &str) -> Option<&'static str> {
    match os {
        "linux" => Some("bklite-controller-installer"),
        "windows" => Some("bklite-controller-installer.exe"),
        _ => None,
    }
}

/// What should be there: the bundle's installers (with their digests) when a bundle is given;
/// else, on releases that key installers by architecture (from 2026-04-27, which surely read
/// them), one per (os, arch) of the controller rows.
fn wanted(ctx: &Ctx<'_>, release: &Release, rows: &[Row]) -> BTreeMap<String, Option<(Vec<u8>, u64)>> {
    let mut out = BTreeMap::new();
    if let Some(m) = &ctx.manifest {
        for i in &m.installers {
            let arch = crate::manifest::normalize_arch(&i.arch).unwrap_or(i.arch.as_str());
            let key = keys::installer_key(release, i.os.as_str(), arch, &i.name);
            let want = crate::digest::sha256_from_hex(&i.sha256).map(|s| (s.to_vec(), i.size));
            out.insert(key, want);
        }
        if !m.installers.is_empty() {
            return out;
        }
    }
    if !release.has_package_arch() {
        return out;
    }
    let platforms: BTreeSet<(&str, &str)> = rows
        .iter()
        .filter(|r| r.object == "Controller")
        .map(|r| (r.os.as_str(), r.arch.as_str()))
        .collect();
    for (os, arch) in platforms {
        if let Some(file) = needed_file(os) {
            out.insert(keys::installer_key(release, os, arch, file), None);
        }
    }
    out
}

pub(super) async fn check(
    ctx: &mut Ctx<'_>,
    release: &Release,
    rows: &[Row],
    store: &dyn ObjectStore,
    names: &BTreeSet<String>,
) {
    let bundle = ctx.bundle_arg();
    for (key, want) in wanted(ctx, release, rows) {
        if !names.contains(&key) {
            ctx.add(
                "packages",
                Severity::Error,
                format!("installer {key}"),
                "the controller installer is missing from the store: agents of this platform cannot be installed (the bootstrap's download of the installer returns 404)",
            )
            .evidence(format!("no object {key} in bucket {:?} on {}", store.bucket(), store.server()))
            .fix(format!("bkbundle init-packages --auto --bundle {bundle}   (uploads the bundle's installers)"));
            continue;
        }
        let Some((sha, size)) = want else { continue };
        let Ok(Some((d, sz))) = store.info(&key).await else {
            continue;
        };
        if keys::parse_digest(&d).as_deref() != Some(&sha[..]) || sz != size {
            let sha: [u8; 32] = sha.try_into().unwrap_or_default();
            ctx.add(
                "packages",
                Severity::Warning,
                format!("installer {key}"),
                "the stored installer differs from the bundle's: it may not match the bundle's controller package",
            )
            .evidence(format!(
                "stored {d}, {sz} bytes; the bundle has {}, {size} bytes",
                keys::nats_digest(&sha)
            ))
            .fix(format!(
                "bkbundle init-packages --auto --bundle {bundle}   (replaces it)"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{answering, diagnose, healthy_db, no_finding, opts, the};
    use super::super::Severity;
    use crate::ports::fakes::{FakeDocker, FakeStore};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_installer_is_an_error_and_a_present_one_is_no_finding() {
        let (_server, url) = answering();
        let db = healthy_db(&url).with_package_row(1, "Controller", "fusion-collectors-linux-amd64.zip");
        let package = "linux/x86_64/Controller/1.0.0/fusion-collectors-linux-amd64.zip";
        let store = FakeStore::new("bklite").with_object(package, b"zip");
        let r = diagnose(&opts(), &FakeDocker::default(), Some(&db), Some(&store), None).await;
        let key = "installer/linux/x86_64/bklite-controller-installer";
        let f = the(&r, "packages", Severity::Error, &format!("installer {key}"));
        assert!(
            f.message.contains("agents of this platform cannot be installed"),
            "{f:#?}"
        );
        assert_eq!(
            f.evidence,
            [format!(
                "no object {key} in bucket \"bklite\" on nats://fake.invalid:4222"
            )]
        );

        let store = FakeStore::new("bklite")
            .with_object(package, b"zip")
            .with_object(key, b"#!/bin/sh");
        let r = diagnose(&opts(), &FakeDocker::default(), Some(&db), Some(&store), None).await;
        no_finding(&r, "packages", "installer");
    }
}
