//! The packages check, on the database's package rows and the bucket's objects: an empty list,
//! rows whose object is missing (the download 404), objects without rows, the stream's space,
//! and with `--bundle` stored objects that differ from the bundle's. `--fix` uploads missing
//! objects again from the bundle, as `init-packages` does.

use super::{Ctx, Severity};
use crate::packages::{self as upload, PackagesError, PackagesOptions, PackagesReport};
use crate::platform::packages::{self as keys, Row};
use crate::platform::release::{Release, PACKAGE_TABLE};
use crate::ports::{ObjectStore, PlatformDb};
use std::collections::BTreeSet;
use std::time::Instant;

/// The check on what was reached: with both the rows and the bucket, everything; with the rows
/// alone, the empty-list case; without the database, nothing.
pub(super) async fn check(ctx: &mut Ctx<'_>, db: Option<(&dyn PlatformDb, &Release)>, store: Option<&dyn ObjectStore>) {
    match (db, store) {
        (Some((db, release)), Some(store)) => objects(ctx, db, release, store).await,
        // The rows alone still tell the empty-list case.
        (Some((db, release)), None) => match db.package_rows(release).await {
            Ok(rows) if rows.is_empty() => empty_list(ctx),
            Ok(_) => {
                ctx.add(
                    "packages",
                    Severity::Info,
                    "package objects",
                    "not checked: NATS or its bucket is not reachable (see the nats finding)",
                );
            }
            Err(e) => ctx.add_error("packages", PACKAGE_TABLE, e.into()),
        },
        (None, _) => {
            ctx.add(
                "packages",
                Severity::Info,
                PACKAGE_TABLE,
                "not checked: the database is not reachable (see the regions finding)",
            );
        }
    }
}

fn empty_list(ctx: &mut Ctx<'_>) {
    let bundle = ctx.bundle_arg();
    ctx.add(
        "packages",
        Severity::Error,
        PACKAGE_TABLE,
        "the probe package list is empty: nothing uploaded the packages nor created their rows",
    )
    .evidence(format!("SELECT count(*) FROM {} = 0", PACKAGE_TABLE))
    .fix(format!(
        "bkbundle init-packages --auto --bundle {bundle} --env-file TARGET/.env"
    ));
}

/// The rows against the bucket, both ways; the stream's space; the bundle's digests.
async fn objects(ctx: &mut Ctx<'_>, db: &dyn PlatformDb, release: &Release, store: &dyn ObjectStore) {
    let rows = match db.package_rows(release).await {
        Ok(r) => r,
        Err(e) => return ctx.add_error("packages", PACKAGE_TABLE, e.into()),
    };
    if rows.is_empty() {
        empty_list(ctx);
    }
    let names = match store.list().await {
        Ok(n) => n,
        Err(e) => return ctx.add_error("packages", format!("bucket {:?}", store.bucket()), e.into()),
    };
    let (missing, orphans) = keys::consistency(&rows, release, &names);
    let missing_subjects = missing_objects(ctx, &rows, release, &missing);
    super::installers::check(ctx, release, &rows, store, &names).await;
    let bundle = ctx.bundle_arg();
    for o in &orphans {
        ctx.add("packages", Severity::Warning, format!("object {o}"), format!("no {} row points at this object: it is not offered for download", PACKAGE_TABLE))
            .evidence(format!("bucket {:?} on {}", store.bucket(), store.server()))
            .fix(format!("bkbundle init-packages --auto --bundle {bundle} records it if the bundle has it; otherwise remove it: nats object rm {} {o:?}", store.bucket()));
    }
    super::nats::stream_space(ctx, store).await;
    differ_from_bundle(ctx, release, store).await;
    if ctx.opts.fix && !missing_subjects.is_empty() {
        reupload(ctx, db, release, store, missing_subjects).await;
    }
}

/// One finding per row whose object is missing; their (row id, subject).
fn missing_objects(
    ctx: &mut Ctx<'_>,
    rows: &[Row],
    release: &Release,
    missing: &[(i64, String)],
) -> Vec<(i64, String)> {
    let bundle = ctx.bundle_arg();
    let mut subjects = Vec::new();
    for (row_id, _) in missing {
        let Some(r) = rows.iter().find(|r| r.id == *row_id) else {
            continue;
        };
        let keys = r.keys(release);
        let subject = format!("package row {} ({} {} {})", r.id, r.object, r.version, r.name);
        ctx.add(
            "packages",
            Severity::Error,
            subject.clone(),
            "its object is missing from the store: downloads of this package return 404",
        )
        .evidence(format!(
            "{} row id={} os={} arch={} object={} version={} name={}",
            PACKAGE_TABLE,
            r.id,
            r.os,
            if r.arch.is_empty() { "-" } else { &r.arch },
            r.object,
            r.version,
            r.name
        ))
        .evidence(format!("no object under {}", keys.join(" nor ")))
        .fix(format!("bkbundle doctor --fix --bundle {bundle}   (or init-packages --auto --bundle {bundle}; a package the bundle lacks must be uploaded again in the UI)"));
        subjects.push((*row_id, subject));
    }
    subjects
}

/// With the bundle: the stored objects of its packages against its digests.
async fn differ_from_bundle(ctx: &mut Ctx<'_>, release: &Release, store: &dyn ObjectStore) {
    let Some(m) = &ctx.manifest else { return };
    let mut differ = Vec::new();
    for p in &m.packages {
        let (Some(sha), Some(size)) = (p.sha256.as_deref().and_then(crate::digest::sha256_from_hex), p.size) else {
            continue;
        };
        let arch = crate::manifest::normalize_arch(&p.arch).unwrap_or(p.arch.as_str());
        let key = keys::object_key(release, p.os.as_str(), arch, &p.object, &p.version, &p.name);
        if let Ok(Some((d, sz))) = store.info(&key).await {
            if (keys::parse_digest(&d).as_deref() != Some(&sha[..]) || sz != size)
                && !made_from(store, &key, &sha).await
            {
                differ.push((key, d, sz, keys::nats_digest(&sha), size));
            }
        }
    }
    let bundle = ctx.bundle_arg();
    for (key, d, sz, want, want_size) in differ {
        ctx.add(
            "packages",
            Severity::Warning,
            format!("object {key}"),
            "the stored object differs from the bundle's package",
        )
        .evidence(format!(
            "stored {d}, {sz} bytes; the bundle has {want}, {want_size} bytes"
        ))
        .fix(format!(
            "if the bundle's is the one to serve: bkbundle init-packages --auto --bundle {bundle} --force"
        ));
    }
}

/// Whether the stored object was made from the bundle's file `sha` (the site CA added to it at
/// upload: its meta records the file's digest).
async fn made_from(store: &dyn ObjectStore, key: &str, sha: &[u8; 32]) -> bool {
    let Ok(Some(meta)) = store.meta(key).await else {
        return false;
    };
    meta.get("metadata")
        .and_then(|m| m.get(upload::inject::SOURCE_KEY))
        .and_then(|v| v.as_str())
        .is_some_and(|s| s == crate::digest::hex(sha))
}

/// `--fix`: upload the missing objects again from the bundle (init-packages' own repair, on the
/// connections this run already has), and mark the rows it repaired fixed.
async fn reupload(
    ctx: &mut Ctx<'_>,
    db: &dyn PlatformDb,
    release: &Release,
    store: &dyn ObjectStore,
    missing: Vec<(i64, String)>,
) {
    let Some(b) = ctx.opts.bundle.clone() else {
        ctx.add(
            "packages",
            Severity::Info,
            "--fix",
            "missing objects can only be re-uploaded from a bundle: give --bundle",
        );
        return;
    };
    let mut po = PackagesOptions::new(b, &ctx.opts.config, ctx.opts.site.clone());
    po.database_url = ctx.opts.database_url.clone();
    po.nats_url = ctx.opts.nats_url.clone();
    po.bucket = Some(store.bucket().to_string());
    match upload_from_bundle(&po, db, release, store).await {
        Ok(r) => {
            let repaired: BTreeSet<i64> = r
                .missing_objects
                .iter()
                .filter(|m| m.repaired)
                .map(|m| m.row_id)
                .collect();
            for (id, subject) in missing {
                if let Some(f) = ctx.finding_mut(&subject) {
                    if repaired.contains(&id) {
                        f.fixed = true;
                        f.evidence.push("fixed: uploaded again from the bundle".into());
                    } else {
                        f.evidence
                            .push("not fixed: the bundle does not have this package".into());
                    }
                }
            }
        }
        Err(e) => ctx.add_error("packages", "--fix", e.into()),
    }
}

/// `init-packages` on the connected database and bucket: what [`upload::run_with_env`] does
/// after connecting (the release must be one bkbundle can write; the bucket's lock is held).
async fn upload_from_bundle(
    po: &PackagesOptions,
    db: &dyn PlatformDb,
    release: &Release,
    store: &dyn ObjectStore,
) -> Result<PackagesReport, PackagesError> {
    let t0 = Instant::now();
    let (bundle, inputs) = upload::inputs(po)?;
    release.check_writable(db.target())?;
    let mut report = PackagesReport::default();
    let (_bucket_lock, pending) = upload::lock_bucket(store.server(), store.bucket(), &mut report.notes).await?;
    let run = upload::Run {
        opts: po,
        bundle: bundle.as_ref(),
        inputs: &inputs,
        release,
        pending: Some(&pending),
        reporter: &crate::progress::Silent,
    };
    let seams = upload::Seams {
        db,
        store: Some(store),
        server: store.server().to_string(),
        bucket: store.bucket().to_string(),
    };
    upload::run_on(&run, &seams, report, t0).await
}

#[cfg(test)]
mod tests {
    use super::super::testing::{answering, diagnose, healthy_db, no_finding, opts, the};
    use super::super::Severity;
    use crate::ports::fakes::{FakeDocker, FakeStore};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_package_list_is_an_error() {
        let (_server, url) = answering();
        let db = healthy_db(&url);
        let store = FakeStore::new("bklite");
        let r = diagnose(&opts(), &FakeDocker::default(), Some(&db), Some(&store), None).await;
        let f = the(&r, "packages", Severity::Error, "node_mgmt_packageversion");
        assert_eq!(
            f.message,
            "the probe package list is empty: nothing uploaded the packages nor created their rows"
        );
        assert_eq!(f.evidence, ["SELECT count(*) FROM node_mgmt_packageversion = 0"]);
        assert_eq!(
            f.fix.as_deref(),
            Some("bkbundle init-packages --auto --bundle BUNDLE --env-file TARGET/.env")
        );
        // The rows alone tell it when the bucket was not reached.
        let r = diagnose(&opts(), &FakeDocker::default(), Some(&db), None, None).await;
        let f = the(&r, "packages", Severity::Error, "node_mgmt_packageversion");
        assert!(f.message.starts_with("the probe package list is empty"), "{f:#?}");
        no_finding(&r, "packages", "package objects");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_whose_object_is_missing_is_an_error_that_fix_needs_a_bundle_for() {
        let (_server, url) = answering();
        let db = healthy_db(&url).with_package_row(1, "Telegraf", "telegraf");
        let store = FakeStore::new("bklite");
        let mut fix = opts();
        fix.fix = true;
        let r = diagnose(&fix, &FakeDocker::default(), Some(&db), Some(&store), None).await;
        let f = the(
            &r,
            "packages",
            Severity::Error,
            "package row 1 (Telegraf 1.0.0 telegraf)",
        );
        assert_eq!(
            f.message,
            "its object is missing from the store: downloads of this package return 404"
        );
        assert_eq!(
            f.evidence[0],
            "node_mgmt_packageversion row id=1 os=linux arch=x86_64 object=Telegraf version=1.0.0 name=telegraf"
        );
        assert!(
            f.evidence[1].starts_with("no object under linux/x86_64/Telegraf/1.0.0/telegraf"),
            "{f:#?}"
        );
        assert!(!f.fixed);
        let f = the(&r, "packages", Severity::Info, "--fix");
        assert_eq!(
            f.message,
            "missing objects can only be re-uploaded from a bundle: give --bundle"
        );
        assert!(db.writes.lock().unwrap().is_empty() && store.keys().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_object_without_a_row_is_a_warning() {
        let (_server, url) = answering();
        let db = healthy_db(&url).with_package_row(1, "Telegraf", "telegraf");
        let stray = "linux/x86_64/Stray/1.0.0/stray.bin";
        let store = FakeStore::new("bklite")
            .with_object("linux/x86_64/Telegraf/1.0.0/telegraf", b"t")
            .with_object(stray, b"s");
        let r = diagnose(&opts(), &FakeDocker::default(), Some(&db), Some(&store), None).await;
        let f = the(&r, "packages", Severity::Warning, &format!("object {stray}"));
        assert_eq!(
            f.message,
            "no node_mgmt_packageversion row points at this object: it is not offered for download"
        );
        assert_eq!(f.evidence, ["bucket \"bklite\" on nats://fake.invalid:4222"]);
        assert!(
            f.fix
                .as_deref()
                .unwrap_or("")
                .ends_with(&format!("nats object rm bklite {stray:?}")),
            "{f:#?}"
        );
        no_finding(&r, "packages", "package row");
    }
}
