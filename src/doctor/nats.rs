//! The nats check: NATS reached link by link (resolution → TCP → TLS → authentication →
//! JetStream → bucket), stopping at the first that breaks; and the bucket's stream space (chunk
//! sets that no object refers to).

use super::{Ctx, Finding, Link, Severity, PROBE};
use crate::platform::nats::{self as pnats, NatsError};
use crate::platform::packages as keys;
use crate::platform::release::Release;
use crate::ports::live::NatsBucket;
use crate::ports::ObjectStore;
use std::time::Duration;

/// Connect NATS and open the package bucket (live); the finding naming the link that broke, or
/// saying that the bucket does not exist. `release` names the default bucket.
pub(super) async fn open(ctx: &Ctx<'_>, release: Option<&Release>) -> Link<NatsBucket> {
    let target = match crate::site::targets::nats(
        ctx.opts.nats_url.as_deref(),
        &ctx.opts.config.nats,
        &ctx.opts.site,
        ctx.env,
    ) {
        Ok(t) => t,
        Err(e) => return Err(vec![Finding::from_error("nats", "NATS", e.into())]),
    };
    let display = target.display();
    let broken = |e: NatsError| {
        let stage = e.stage();
        vec![Finding::from_error(
            "nats",
            format!("NATS {display} ({stage})"),
            e.into(),
        )]
    };
    let nc = match tokio::time::timeout(PROBE * 5, pnats::connect(&target)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(broken(e)),
        Err(_) => {
            let mut f = Finding::new(
                "nats",
                Severity::Error,
                format!("NATS {display}"),
                "no answer within 15 s",
            );
            f.fix("docker compose ps nats; the nats container's log");
            return Err(vec![f]);
        }
    };
    let bucket = ctx
        .opts
        .bucket
        .clone()
        .or_else(|| ctx.opts.config.nats.bucket.clone())
        .unwrap_or_else(|| keys::bucket(&ctx.opts.site, release).0);
    match tokio::time::timeout(PROBE * 3, NatsBucket::open_on(&nc, &target, &bucket, false)).await {
        Ok(Ok(Some(s))) => Ok(s),
        Ok(Ok(None)) => {
            let mut f = Finding::new(
                "nats",
                Severity::Error,
                format!("bucket {bucket:?} on {display}"),
                "the package bucket does not exist: no package was ever uploaded, so agents have nothing to download",
            );
            f.evidence(format!("no stream OBJ_{bucket}")).fix(format!(
                "bkbundle init-packages --auto --bundle {} --env-file TARGET/.env",
                ctx.bundle_arg()
            ));
            Err(vec![f])
        }
        Ok(Err(e)) => Err(broken(e)),
        Err(_) => Err(vec![Finding::new(
            "nats",
            Severity::Error,
            format!("NATS {display} (JetStream)"),
            "JetStream did not answer within 9 s",
        )]),
    }
}

/// The bucket's stream against its live objects: chunk sets no object refers to (uploads killed
/// before their meta was written, replaced versions) take disk for nothing. `--fix` removes them,
/// holding the bucket's upload lock so that no upload of bkbundle's is in flight.
pub(super) async fn stream_space(ctx: &mut Ctx<'_>, store: &dyn ObjectStore) {
    let bucket = store.bucket();
    let inv = match store.inventory().await {
        Ok(i) => i,
        Err(e) => {
            ctx.add(
                "packages",
                Severity::Info,
                format!("bucket {bucket:?}"),
                format!("the stream's space was not checked: {e}"),
            );
            return;
        }
    };
    if inv.unreferenced.is_empty() {
        return;
    }
    let subject = format!("bucket {bucket:?} stream OBJ_{bucket}");
    let messages: usize = inv.unreferenced.iter().map(|(_, n)| n).sum();
    ctx.add(
        "packages",
        Severity::Warning,
        subject.clone(),
        format!(
            "{} chunk set(s), {messages} message(s), belong to no object (uploads that never completed): the stream holds {} bytes for {} bytes of {} live object(s)",
            inv.unreferenced.len(),
            inv.stream_bytes,
            inv.live_bytes,
            inv.live_objects
        ),
    )
    .evidence(format!(
        "unreferenced chunk subjects: {}",
        inv.unreferenced
            .iter()
            .take(5)
            .map(|(n, c)| format!("$O.{bucket}.C.{n} ({c})"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .fix("bkbundle doctor --fix (removes them while holding the bucket's upload lock; run it when no upload from the UI is in progress)");
    if ctx.opts.fix {
        purge_unreferenced(ctx, store, &subject).await;
    }
}

/// `--fix` of [`stream_space`]: under the bucket's lock, read the stream again (an upload that
/// finished meanwhile is live now) and purge what is still unreferenced.
async fn purge_unreferenced(ctx: &mut Ctx<'_>, store: &dyn ObjectStore, subject: &str) {
    let guard = match crate::lock::acquire_bucket_async(store.server(), store.bucket(), Duration::from_secs(30)).await {
        Ok(g) => g,
        Err(e) => return ctx.add_error("packages", subject, e),
    };
    let again = store.inventory().await.map(|i| i.unreferenced).unwrap_or_default();
    let mut purged = 0u64;
    let mut failed = Vec::new();
    for (nuid, _) in &again {
        match store.purge_chunks(nuid).await {
            Ok(n) => purged += n,
            Err(e) => failed.push(format!("{nuid}: {e}")),
        }
    }
    drop(guard);
    if let Some(f) = ctx.finding_mut(subject) {
        if failed.is_empty() {
            f.fixed = true;
            f.evidence.push(format!("fixed: {purged} chunk message(s) removed"));
        } else {
            f.evidence
                .push(format!("--fix could not remove: {}", failed.join("; ")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{answering, closed_port, healthy_db, no_env, opts, the};
    use super::super::{database, run_on, Ctx, Seams, Severity};
    use super::open;
    use crate::ports::fakes::{FakeDocker, FakeStore};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreferenced_chunks_are_a_warning_and_fix_purges_them() {
        let (_server, url) = answering();
        let db = healthy_db(&url).with_package_row(1, "Telegraf", "telegraf");
        // A bucket of this test's own: --fix takes its lock.
        let store =
            FakeStore::new("doctor-unit-unreferenced").with_object("linux/x86_64/Telegraf/1.0.0/telegraf", b"t");
        store.chunks.lock().unwrap().insert("killed-upload".into(), vec![0; 10]);
        let subject = "bucket \"doctor-unit-unreferenced\" stream OBJ_doctor-unit-unreferenced";
        let docker = FakeDocker::default();
        let r = super::super::testing::diagnose(&opts(), &docker, Some(&db), Some(&store), None).await;
        let f = the(&r, "packages", Severity::Warning, subject);
        assert_eq!(
            f.message,
            "1 chunk set(s), 1 message(s), belong to no object (uploads that never completed): the stream holds 11 bytes for 1 bytes of 1 live object(s)"
        );
        assert_eq!(
            f.evidence,
            ["unreferenced chunk subjects: $O.doctor-unit-unreferenced.C.killed-upload (1)"]
        );
        assert!(!f.fixed);

        let mut fix = opts();
        fix.fix = true;
        let r = super::super::testing::diagnose(&fix, &docker, Some(&db), Some(&store), None).await;
        let f = the(&r, "packages", Severity::Warning, subject);
        assert!(f.fixed, "{f:#?}");
        assert_eq!(
            f.evidence.last().map(String::as_str),
            Some("fixed: 1 chunk message(s) removed")
        );
        assert!(store.chunks.lock().unwrap().is_empty());
        assert_eq!(store.keys(), ["linux/x86_64/Telegraf/1.0.0/telegraf"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_that_refuses_tcp_names_the_link_and_the_objects_are_not_checked() {
        let port = closed_port();
        let mut o = opts();
        o.nats_url = Some(format!("nats://127.0.0.1:{port}"));
        let why = match open(&Ctx::new(&o, &no_env), None).await {
            Ok(_) => panic!("nothing listens on 127.0.0.1:{port}"),
            Err(why) => why,
        };
        assert_eq!(why.len(), 1, "{why:#?}");
        assert_eq!(why[0].check, "nats");
        assert_eq!(why[0].severity, Severity::Error);
        assert!(
            why[0].subject.contains(&format!("127.0.0.1:{port}")) && why[0].subject.ends_with(" (TCP)"),
            "{why:#?}"
        );

        let (_server, url) = answering();
        let db = healthy_db(&url).with_package_row(1, "Telegraf", "telegraf");
        let docker = FakeDocker::default();
        let seams = Seams {
            docker: Ok(&docker),
            db: database(&db).await,
            store: Err(why),
            cache: None,
        };
        let r = run_on(&o, &no_env, &seams).await;
        the(&r, "nats", Severity::Error, "(TCP)");
        let f = the(&r, "packages", Severity::Info, "package objects");
        assert_eq!(
            f.message,
            "not checked: NATS or its bucket is not reachable (see the nats finding)"
        );
    }
}
