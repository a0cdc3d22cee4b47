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
        let stage = stage_of(&e);
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

/// The link of the chain an error broke.
fn stage_of(e: &NatsError) -> &'static str {
    match e {
        NatsError::Resolve { .. } => "name resolution",
        NatsError::Connect { .. } => "TCP",
        NatsError::Tls { .. } => "TLS",
        NatsError::Auth { .. } => "authentication",
        NatsError::NoJetStream { .. } => "JetStream",
        NatsError::Bucket { .. } => "bucket",
        NatsError::NoNats | NatsError::BadConfig(_) => "configuration",
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
