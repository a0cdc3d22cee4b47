//! Every object of the site's NATS JetStream object store, read out and written back, streamed
//! and checked by digest.
//!
//! - [`list`] reads every meta message of the bucket (not async-nats' listing, which passes over
//!   entries it cannot parse) and records each live object: name, description, size, digest and
//!   the rest of its meta that a restore must bring back (headers, metadata, options). The
//!   store's own per-upload fields (bucket, nuid, chunks, mtime) are never recorded: a restore
//!   makes its own.
//! - [`download`] streams one object chunk by chunk into a writer (a few chunks in memory,
//!   whatever its size) and checks size and digest against the record at the end: the caller
//!   must treat what was written as garbage when it fails.
//! - [`upload`] goes through the one put path the packages use ([`crate::packages::put_object`]):
//!   chunks first, the meta last and only when every byte was sent and its digest is the
//!   record's, so a damaged backup never replaces a good object. An object already there with
//!   the record's digest and size is left alone (its description and meta are not compared:
//!   the bytes are what a restore must get right, and a re-run sends nothing).
//!
//! Links (an object that names another) are refused by [`list`]: the platform makes none, and
//! copying one as an empty object would lose what it points at.
//!
//! Writing out and reading in run in place on the runtime's worker (`block_in_place`), as the
//! writer and reader are borrowed from the caller: these functions need the multi-threaded
//! runtime ([`crate::runtime::block_on`]).

use crate::digest::{sha256_from_hex, Hasher};
use crate::packages::{self, ChunkSink, ObjectFields, Pending, PutFailure};
use crate::platform::packages::{nats_digest, parse_digest};
use crate::ports::ObjectStore;
use bytes::Bytes;

/// One live object of the bucket, as the backup records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectRecord {
    pub name: String,
    /// `""` when the object has none.
    pub description: String,
    pub size: u64,
    /// `SHA-256=` and the URL-safe base64 of the digest, padded, as the store writes it.
    pub digest: String,
    /// The rest of the object's meta that must survive a restore (headers, metadata, options
    /// such as `max_chunk_size` when present), as a JSON object's text; never the store's own
    /// per-upload fields ([`STORE_FIELDS`]).
    pub meta: String,
}

/// What [`upload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadOutcome {
    /// The store had the object with the record's digest and size: nothing was sent.
    Present,
    /// The object was written: its bytes.
    Sent { bytes: u64 },
}

/// The meta fields that are the store's own (per bucket or per upload) or the record's own
/// columns: never kept in [`ObjectRecord::meta`], always written anew by a restore.
pub const STORE_FIELDS: [&str; 9] = [
    "name",
    "description",
    "bucket",
    "nuid",
    "size",
    "chunks",
    "mtime",
    "digest",
    "deleted",
];

/// `object "NAME" of bucket "B" on SERVER`, the way every message names the object.
fn object(store: &dyn ObjectStore, name: &str) -> String {
    format!("object {name:?} of bucket {:?} on {}", store.bucket(), store.server())
}

fn deleted(meta: &serde_json::Value) -> bool {
    meta.get("deleted").and_then(|d| d.as_bool()).unwrap_or(false)
}

/// The store's digest string in its canonical form (padded URL-safe base64), `None` when it is
/// not a SHA-256.
fn canonical_digest(d: &str) -> Option<String> {
    let raw: [u8; 32] = parse_digest(d)?.try_into().ok()?;
    Some(nats_digest(&raw))
}

/// The record of one meta message; `None` for a deleted object's tombstone.
fn record_of(meta: serde_json::Value) -> Result<Option<ObjectRecord>, String> {
    let mut fields = match meta {
        serde_json::Value::Object(fields) => fields,
        other => return Err(format!("a meta message that is not a JSON object: {other}")),
    };
    if fields.get("deleted").and_then(|d| d.as_bool()).unwrap_or(false) {
        return Ok(None);
    }
    let Some(name) = fields.get("name").and_then(|n| n.as_str()).map(str::to_string) else {
        return Err(format!(
            "a meta message without an object name: {}",
            serde_json::Value::Object(fields)
        ));
    };
    if let Some(link) = fields
        .get("options")
        .and_then(|o| o.get("link"))
        .filter(|l| !l.is_null())
    {
        return Err(format!(
            "object {name:?} is a link ({link}), not an object: replace it with a copy of what it points at, or delete it"
        ));
    }
    let size = fields.get("size").and_then(|s| s.as_u64()).ok_or_else(|| {
        format!(
            "object {name:?}: its meta has no size (found {})",
            fields.get("size").unwrap_or(&serde_json::Value::Null)
        )
    })?;
    let stored = fields.get("digest").and_then(|d| d.as_str()).unwrap_or_default();
    let digest = canonical_digest(stored).ok_or_else(|| {
        format!(
            "object {name:?}: its meta has no SHA-256 digest (found {stored:?}), so a copy of it could not be checked"
        )
    })?;
    let description = fields
        .get("description")
        .and_then(|d| d.as_str())
        .unwrap_or_default()
        .to_string();
    for f in STORE_FIELDS {
        fields.remove(f);
    }
    Ok(Some(ObjectRecord {
        name,
        description,
        size,
        digest,
        meta: serde_json::Value::Object(fields).to_string(),
    }))
}

/// Every live object of the bucket (deleted ones left out), sorted by name. Every object that
/// cannot be backed up (a link, a meta without a digest) is named in one error.
pub async fn list(store: &dyn ObjectStore) -> Result<Vec<ObjectRecord>, String> {
    let metas = store.metas().await.map_err(|e| {
        format!(
            "cannot list the objects of bucket {:?} on {}: {e}",
            store.bucket(),
            store.server()
        )
    })?;
    let mut records = Vec::new();
    let mut problems = Vec::new();
    for meta in metas {
        match record_of(meta) {
            Ok(Some(r)) => records.push(r),
            Ok(None) => {}
            Err(p) => problems.push(p),
        }
    }
    if !problems.is_empty() {
        return Err(format!(
            "bucket {:?} on {}: {} object(s) cannot be backed up:\n  - {}",
            store.bucket(),
            store.server(),
            problems.len(),
            problems.join("\n  - ")
        ));
    }
    records.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(records)
}

/// Stream object `rec` into `out`, chunk by chunk (a few chunks in memory), and check its size
/// and digest against the record; the bytes written. On an error, what was written is not the
/// object: the error names the bucket, the object and the expected and found values.
pub async fn download(
    store: &dyn ObjectStore,
    rec: &ObjectRecord,
    out: &mut (dyn std::io::Write + Send),
) -> Result<u64, String> {
    let what = object(store, &rec.name);
    let meta = store
        .meta(&rec.name)
        .await
        .map_err(|e| format!("cannot read the meta of {what}: {e}"))?
        .filter(|m| !deleted(m))
        .ok_or_else(|| format!("{what} is gone: it was deleted after the objects were listed; list them again"))?;
    let stored_digest = meta.get("digest").and_then(|d| d.as_str()).unwrap_or_default();
    let stored_size = meta.get("size").and_then(|s| s.as_u64()).unwrap_or(0);
    if parse_digest(stored_digest) != parse_digest(&rec.digest) || stored_size != rec.size {
        return Err(format!(
            "{what} changed after it was listed: expected digest {} and {} bytes, found {stored_digest} and {stored_size} bytes; list the objects again",
            rec.digest, rec.size
        ));
    }
    let nuid = meta
        .get("nuid")
        .and_then(|n| n.as_str())
        .ok_or_else(|| format!("{what}: its meta names no chunks (no nuid)"))?;

    let mut hasher = Hasher::new();
    // Why the sink stopped the read, when it did (the read's own error is then only "stopped").
    let mut stopped: Option<String> = None;
    let read = {
        let mut sink = |chunk: Bytes| -> Result<(), String> {
            if hasher.len() + chunk.len() as u64 > rec.size {
                stopped = Some(format!(
                    "{what} is damaged: expected {} bytes, found more (its chunks hold at least {})",
                    rec.size,
                    hasher.len() + chunk.len() as u64
                ));
                return Err("stopped".into());
            }
            hasher.update(&chunk);
            if let Err(e) = tokio::task::block_in_place(|| out.write_all(&chunk)) {
                stopped = Some(format!("writing {what} out: {e}"));
                return Err("stopped".into());
            }
            Ok(())
        };
        store.read_chunks(nuid, &mut sink).await
    };
    if let Some(why) = stopped {
        return Err(why);
    }
    read.map_err(|e| format!("cannot read the chunks of {what}: {e}"))?;
    let (hex, size) = hasher.finish();
    let found = sha256_from_hex(&hex).map(|sha| nats_digest(&sha)).unwrap_or(hex);
    if size != rec.size || parse_digest(&found) != parse_digest(&rec.digest) {
        return Err(format!(
            "{what} is damaged: expected {} bytes with digest {}, found {size} bytes with digest {found}",
            rec.size, rec.digest
        ));
    }
    Ok(size)
}

/// Write object `rec` from `input` (its bytes, as [`download`] wrote them) into the store,
/// unless the store already has it with the record's digest and size. The meta (name,
/// description, the record's kept meta, the new nuid, chunks, size, digest and mtime) is
/// published only when every byte was sent and their digest is the record's: otherwise the
/// chunks are purged and the object there, if any, stays as it was. `pending` (the bucket lock
/// holder's list) records the upload so that a killed run's chunks are removed by the next.
pub async fn upload(
    store: &dyn ObjectStore,
    rec: &ObjectRecord,
    input: &mut (dyn std::io::Read + Send),
    pending: Option<&Pending>,
) -> Result<UploadOutcome, String> {
    let what = object(store, &rec.name);
    let want: [u8; 32] = parse_digest(&rec.digest)
        .and_then(|d| d.try_into().ok())
        .ok_or_else(|| {
            format!(
                "the backup's record of object {:?} has no SHA-256 digest (found {:?}): the backup is damaged",
                rec.name, rec.digest
            )
        })?;
    let present = store
        .info(&rec.name)
        .await
        .map_err(|e| format!("cannot read the info of {what}: {e}"))?;
    if let Some((digest, size)) = present {
        if parse_digest(&digest).as_deref() == Some(&want[..]) && size == rec.size {
            return Ok(UploadOutcome::Present);
        }
    }
    let mut rest: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&rec.meta).map_err(|e| {
        format!(
            "the backup's record of object {:?}: its meta is not a JSON object ({e}): the backup is damaged",
            rec.name
        )
    })?;
    // A record never carries them; should one, the store's own are the upload's.
    for f in STORE_FIELDS {
        rest.remove(f);
    }
    let fields = ObjectFields {
        name: rec.name.clone(),
        description: rec.description.clone(),
        rest,
    };
    let chunk = packages::chunk_size(store.max_payload());
    let task = crate::progress::Reporter::task(&crate::progress::Silent, &rec.name, Some(rec.size));
    let task: &dyn crate::progress::Task = &*task;
    let content = move |tx| async move {
        let mut sink = ChunkSink::new(tx, chunk, task);
        sink.feed(input).await.map_err(|e| PutFailure::Read(e.to_string()))?;
        Ok(sink.into_hasher())
    };
    let check = |sha: &[u8; 32], size: u64| {
        if *sha == want && size == rec.size {
            return Ok(());
        }
        Err(format!(
            "expected {} bytes with digest {}, found {size} bytes with digest {}; the object there, if any, was left as it was",
            rec.size,
            rec.digest,
            nats_digest(sha)
        ))
    };
    let (sha, size) = packages::put_object(store, &fields, pending, content, check)
        .await
        .map_err(|f| match f {
            PutFailure::Read(m) => format!("restoring {what} from the backup: {m}"),
            PutFailure::Nats(m) => format!("uploading {what}: {m}; the object there, if any, was left as it was"),
        })?;
    // The store's own word on what it now holds.
    let (found, found_size) = store
        .info(&rec.name)
        .await
        .map_err(|e| format!("confirming {what} after its upload: {e}"))?
        .unwrap_or_default();
    if parse_digest(&found).as_deref() != Some(&sha[..]) || found_size != size {
        return Err(format!(
            "{what} after its upload: expected digest {} and {size} bytes, found {found:?} and {found_size} bytes",
            nats_digest(&sha)
        ));
    }
    Ok(UploadOutcome::Sent { bytes: size })
}

#[cfg(test)]
mod tests {
    //! On the in-memory store: no NATS (the live store is tests/it/backup_objects.rs's).
    use super::*;
    use crate::ports::fakes::{FakeStore, FAKE_READ_CHUNK};

    /// Bytes that span several of the fake's read pieces, different per `seed`.
    fn content(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn digest_of(data: &[u8]) -> String {
        nats_digest(&sha256_from_hex(&crate::digest::sha256_hex(data)).unwrap())
    }

    /// A store with `a.bin` (three pieces, with a description, headers and metadata), `b.bin`
    /// and the tombstone of `gone.bin`.
    fn source() -> FakeStore {
        let store = FakeStore::new("bklite")
            .with_object("b.bin", &content(2, 100))
            .with_object("a.bin", &content(1, 2 * FAKE_READ_CHUNK + 7))
            .with_deleted("gone.bin");
        {
            let mut objects = store.objects.lock().unwrap();
            let meta = &mut objects.get_mut("a.bin").unwrap().1;
            meta["description"] = "the controller".into();
            meta["headers"] = serde_json::json!({ "X-Site": ["one"] });
            meta["metadata"] = serde_json::json!({ "source": "bkbundle" });
            meta["options"] = serde_json::json!({ "max_chunk_size": 131072 });
            meta["mtime"] = "2026-01-01T00:00:00Z".into();
            meta["bucket"] = "bklite".into();
            meta["chunks"] = 3.into();
        }
        store
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn list_records_the_live_objects_by_name_without_the_stores_own_fields() {
        let records = list(&source()).await.unwrap();
        let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a.bin", "b.bin"], "sorted, the deleted one left out");
        let a = &records[0];
        assert_eq!(a.description, "the controller");
        assert_eq!(
            (a.size, a.digest.as_str()),
            (
                2 * FAKE_READ_CHUNK as u64 + 7,
                digest_of(&content(1, 2 * FAKE_READ_CHUNK + 7)).as_str()
            )
        );
        let kept: serde_json::Value = serde_json::from_str(&a.meta).unwrap();
        assert_eq!(
            kept,
            serde_json::json!({
                "headers": { "X-Site": ["one"] },
                "metadata": { "source": "bkbundle" },
                "options": { "max_chunk_size": 131072 },
            })
        );
        assert_eq!((records[1].description.as_str(), records[1].meta.as_str()), ("", "{}"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn list_refuses_links_and_metas_without_a_digest_naming_each() {
        let store = source();
        {
            let mut objects = store.objects.lock().unwrap();
            objects.get_mut("b.bin").unwrap().1["digest"] = "".into();
            objects.insert(
                "link.bin".into(),
                (vec![], serde_json::json!({ "name": "link.bin", "options": { "link": { "bucket": "bklite", "name": "a.bin" } } })),
            );
        }
        let e = list(&store).await.unwrap_err();
        assert!(
            e.contains("bucket \"bklite\" on nats://fake.invalid:4222: 2 object(s)"),
            "{e}"
        );
        assert!(e.contains("object \"b.bin\": its meta has no SHA-256 digest"), "{e}");
        assert!(e.contains("object \"link.bin\" is a link"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn download_streams_the_object_and_checks_it_against_the_record() {
        let store = source();
        let records = list(&store).await.unwrap();
        let mut out = Vec::new();
        let n = download(&store, &records[0], &mut out).await.unwrap();
        assert_eq!((n, out), (records[0].size, content(1, 2 * FAKE_READ_CHUNK + 7)));

        // One byte of the middle chunk flipped in the store.
        store.objects.lock().unwrap().get_mut("a.bin").unwrap().0[FAKE_READ_CHUNK + 3] ^= 1;
        let e = download(&store, &records[0], &mut Vec::new()).await.unwrap_err();
        assert!(
            e.starts_with("object \"a.bin\" of bucket \"bklite\" on nats://fake.invalid:4222 is damaged: expected"),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "digest {}, found {} bytes with digest SHA-256=",
                records[0].digest, records[0].size
            )),
            "{e}"
        );
        // A chunk too many: stopped as soon as it exceeds the record.
        store.objects.lock().unwrap().get_mut("b.bin").unwrap().0.push(0);
        let e = download(&store, &records[1], &mut Vec::new()).await.unwrap_err();
        assert!(
            e.contains("\"b.bin\"") && e.contains("expected 100 bytes, found more"),
            "{e}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn download_of_an_object_replaced_or_deleted_since_the_listing_says_so() {
        let store = source();
        let records = list(&store).await.unwrap();
        let store = store.with_object("b.bin", b"another");
        let e = download(&store, &records[1], &mut Vec::new()).await.unwrap_err();
        assert!(
            e.contains("\"b.bin\"") && e.contains("changed after it was listed: expected digest"),
            "{e}"
        );
        assert!(e.contains("found SHA-256=") && e.contains("and 7 bytes"), "{e}");
        let store = store.with_deleted("b.bin");
        let e = download(&store, &records[1], &mut Vec::new()).await.unwrap_err();
        assert!(e.contains("is gone"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upload_writes_the_object_with_its_meta_and_skips_it_when_present() {
        let records = list(&source()).await.unwrap();
        let target = FakeStore::new("restored");
        let a = &records[0];
        let data = content(1, 2 * FAKE_READ_CHUNK + 7);
        let r = upload(&target, a, &mut &data[..], None).await.unwrap();
        assert_eq!(r, UploadOutcome::Sent { bytes: a.size });
        let (stored, meta) = target.objects.lock().unwrap()["a.bin"].clone();
        assert_eq!(stored, data);
        assert_eq!(meta["description"], "the controller");
        assert_eq!(meta["headers"], serde_json::json!({ "X-Site": ["one"] }));
        assert_eq!(meta["metadata"], serde_json::json!({ "source": "bkbundle" }));
        assert_eq!(meta["options"], serde_json::json!({ "max_chunk_size": 131072 }));
        assert_eq!(
            (meta["bucket"].as_str(), meta["digest"].as_str()),
            (Some("restored"), Some(a.digest.as_str()))
        );
        assert_ne!(meta["nuid"], "seed-a.bin", "a new upload id");
        assert_ne!(meta["mtime"], "2026-01-01T00:00:00Z");
        // Read back, it is the same record.
        assert_eq!(list(&target).await.unwrap()[0], *a);

        let again = upload(&target, a, &mut &b"not read"[..], None).await.unwrap();
        assert_eq!(again, UploadOutcome::Present);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upload_of_damaged_bytes_leaves_the_object_there_and_no_chunks() {
        let records = list(&source()).await.unwrap();
        let a = &records[0];
        let old = content(9, 10);
        let target = FakeStore::new("restored").with_object("a.bin", &old);
        let mut damaged = content(1, 2 * FAKE_READ_CHUNK + 7);
        damaged[5] ^= 1;
        let e = upload(&target, a, &mut &damaged[..], None).await.unwrap_err();
        assert!(
            e.starts_with("restoring object \"a.bin\" of bucket \"restored\" on nats://fake.invalid:4222 from the backup: expected"),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "digest {}, found {} bytes with digest SHA-256=",
                a.digest, a.size
            )),
            "{e}"
        );
        assert_eq!(target.objects.lock().unwrap()["a.bin"].0, old, "the old object stays");
        assert!(target.chunks.lock().unwrap().is_empty(), "the chunks sent were purged");
        // Short input: the same refusal.
        let e = upload(&target, a, &mut &damaged[..10], None).await.unwrap_err();
        assert!(e.contains("found 10 bytes"), "{e}");
        assert_eq!(target.objects.lock().unwrap()["a.bin"].0, old);
    }
}
