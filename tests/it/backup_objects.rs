//! The object store half of backup and restore, live: objects put by nats-py (the upstream
//! client, an implementation independent of bkbundle's) are listed and downloaded by
//! `bkbundle::backup::objects`, uploaded into a fresh bucket on a second `nats-server -js`, and
//! read back by nats-py: the same names, bytes, descriptions, headers, metadata and digests.

use crate::harness::{NatsOpts, NatsServer};
use crate::packages::{python, stream_messages};
use bkbundle::backup::objects::{self, ObjectRecord, UploadOutcome};
use bkbundle::digest::{sha256_from_hex, sha256_hex};
use bkbundle::platform::nats::NatsTarget;
use bkbundle::platform::packages::nats_digest;
use bkbundle::ports::live::NatsBucket;
use std::path::{Path, PathBuf};

/// `PY_PUT URL BUCKET SPEC`: create the bucket and put each `{name, file, description?,
/// headers?, metadata?}` of SPEC's `put` (nats-py's default 128 KiB chunks), then delete each
/// name of its `delete`. nats-py has no `metadata` field: it is added to the meta message the
/// way the Go and Rust clients write it.
const PY_PUT: &str = r#"
import asyncio, base64, json, sys, nats
from nats.js.api import ObjectMeta
async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    bucket = sys.argv[2]
    os_ = await js.create_object_store(bucket)
    spec = json.loads(sys.argv[3])
    for o in spec["put"]:
        meta = ObjectMeta(name=o["name"], description=o.get("description"), headers=o.get("headers"))
        with open(o["file"], "rb") as f:
            await os_.put(o["name"], f, meta=meta)
        if "metadata" in o:
            subj = f"$O.{bucket}.M." + base64.urlsafe_b64encode(o["name"].encode()).decode()
            raw = json.loads((await js.get_last_msg(f"OBJ_{bucket}", subj)).data)
            raw["metadata"] = o["metadata"]
            await js.publish(subj, json.dumps(raw).encode(), headers={"Nats-Rollup": "sub"})
    for name in spec["delete"]:
        await os_.delete(name)
    await nc.close()
asyncio.run(main())
"#;

/// `PY_READ URL BUCKET`: every live object as nats-py reads it (its `get`, which checks the
/// digest), as sorted JSON: name -> the meta message without the per-upload fields (bucket, nuid,
/// chunks, mtime; a missing description as ""), the data's SHA-256 and length.
const PY_READ: &str = r#"
import asyncio, base64, hashlib, json, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    bucket = sys.argv[2]
    os_ = await js.object_store(bucket)
    out = {}
    for info in await os_.list():
        if info.deleted:
            continue
        r = await os_.get(info.name)
        subj = f"$O.{bucket}.M." + base64.urlsafe_b64encode(info.name.encode()).decode()
        raw = json.loads((await js.get_last_msg(f"OBJ_{bucket}", subj)).data)
        for k in ("bucket", "nuid", "chunks", "mtime"):
            raw.pop(k, None)
        if raw.get("deleted") is False:
            del raw["deleted"]
        raw["description"] = raw.get("description") or ""
        raw["data_sha256"] = hashlib.sha256(r.data).hexdigest()
        raw["data_len"] = len(r.data)
        out[info.name] = raw
    print(json.dumps(out, sort_keys=True))
    await nc.close()
asyncio.run(main())
"#;

fn target(url: &str) -> NatsTarget {
    NatsTarget {
        urls: vec![url.to_string()],
        source: "the test".into(),
        user: None,
        password: None,
        token: None,
        credentials: None,
        ca_file: None,
        cert_file: None,
        key_file: None,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `len` bytes that do not compress, different per `seed` (xorshift; fast enough for 20 MB).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// What the backup holds of each object: its record and the file its bytes went to.
struct Backup {
    records: Vec<ObjectRecord>,
    files: Vec<PathBuf>,
}

const BIG: usize = 20 * (1 << 20) + 12_345;

#[test]
fn objects_put_by_nats_py_are_backed_up_and_restored_into_a_fresh_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let put = |name: &str, data: &[u8]| -> PathBuf {
        let p = dir.path().join(format!("src-{}", name.replace('/', "_")));
        std::fs::write(&p, data).unwrap();
        p
    };
    let big = put("big.bin", &noise(1, BIG));
    let described = put("described.zip", &noise(2, 300_000));
    let spaced = put("dir/with spaces.bin", &noise(3, 1000));
    let empty = put("empty.txt", b"");
    let gone = put("gone.bin", b"deleted before the backup");
    let spec = serde_json::json!({
        "put": [
            { "name": "big.bin", "file": big },
            { "name": "described.zip", "file": described, "description": "the controller, v1",
              "headers": { "X-Site": ["one", "two"] }, "metadata": { "source": "bkbundle-test" } },
            { "name": "dir/with spaces.bin", "file": spaced },
            { "name": "empty.txt", "file": empty },
            { "name": "gone.bin", "file": gone },
        ],
        "delete": ["gone.bin"],
    });
    let source = NatsServer::start(NatsOpts::default());
    python(PY_PUT, &[&source.url(), "bklite", &spec.to_string()]);
    let want = python(PY_READ, &[&source.url(), "bklite"]);
    let originals = [&big, &described, &spaced, &empty];

    // Backup: list, and each object to a file.
    let backup = rt().block_on(async {
        let src = NatsBucket::open(&target(&source.url()), "bklite", false)
            .await
            .unwrap()
            .expect("the bucket nats-py made");
        let records = objects::list(&src).await.unwrap();
        let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["big.bin", "described.zip", "dir/with spaces.bin", "empty.txt"],
            "sorted, the deleted one left out"
        );
        let d = &records[1];
        assert_eq!(d.description, "the controller, v1");
        let kept: serde_json::Value = serde_json::from_str(&d.meta).unwrap();
        assert_eq!(
            kept["headers"],
            serde_json::json!({ "X-Site": ["one", "two"] }),
            "{}",
            d.meta
        );
        assert_eq!(kept["metadata"], serde_json::json!({ "source": "bkbundle-test" }));
        assert_eq!(kept["options"]["max_chunk_size"], 131072, "{}", d.meta);
        let mut files = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let path = dir.path().join(format!("backup-{i}"));
            let mut f = std::fs::File::create(&path).unwrap();
            let n = objects::download(&src, r, &mut f).await.unwrap();
            assert_eq!(n, r.size, "{}", r.name);
            assert_eq!(
                std::fs::read(&path).unwrap(),
                std::fs::read(originals[i]).unwrap(),
                "{}",
                r.name
            );
            files.push(path);
        }
        Backup { records, files }
    });
    drop(source);

    // Restore into a fresh bucket on another server.
    let restored = NatsServer::start(NatsOpts::default());
    rt().block_on(async {
        let dst = NatsBucket::open(&target(&restored.url()), "restored", true)
            .await
            .unwrap()
            .expect("created");
        for (r, f) in backup.records.iter().zip(&backup.files) {
            let out = objects::upload(&dst, r, &mut open(f), None).await.unwrap();
            assert_eq!(out, UploadOutcome::Sent { bytes: r.size }, "{}", r.name);
        }
        assert_eq!(
            objects::list(&dst).await.unwrap(),
            backup.records,
            "the same records read back"
        );
        // Again: every object is there, nothing is sent.
        for (r, f) in backup.records.iter().zip(&backup.files) {
            let out = objects::upload(&dst, r, &mut open(f), None).await.unwrap();
            assert_eq!(out, UploadOutcome::Present, "{}", r.name);
        }
    });
    let got = python(PY_READ, &[&restored.url(), "restored"]);
    assert_eq!(got, want, "nats-py reads the restored bucket as it read the original");
    // 1 MiB chunks: 21 + 1 + 1 + 0, and four meta messages; nothing else left behind.
    let messages = stream_messages(&restored.url(), "OBJ_restored");
    assert_eq!(messages, "27");

    // A newer version of described.zip whose copy in the backup is damaged: refused, the good
    // object stays, its chunks are purged.
    let newer = noise(9, 300_000);
    let mut record = backup.records[1].clone();
    record.digest = nats_digest(&sha256_from_hex(&sha256_hex(&newer)).unwrap());
    let mut damaged = newer.clone();
    damaged[150_000] ^= 0x40;
    let e = rt().block_on(async {
        let dst = NatsBucket::open(&target(&restored.url()), "restored", false)
            .await
            .unwrap()
            .unwrap();
        objects::upload(&dst, &record, &mut &damaged[..], None)
            .await
            .unwrap_err()
    });
    assert!(
        e.starts_with("restoring object \"described.zip\" of bucket \"restored\" on nats://127.0.0.1:"),
        "{e}"
    );
    let expected = format!(
        "expected 300000 bytes with digest {}, found 300000 bytes with digest SHA-256=",
        record.digest
    );
    assert!(e.contains(&expected), "{e}");
    assert_eq!(
        python(PY_READ, &[&restored.url(), "restored"]),
        want,
        "the good object stays"
    );
    assert_eq!(
        stream_messages(&restored.url(), "OBJ_restored"),
        "27",
        "its chunks were purged"
    );
}

fn open(p: &Path) -> std::fs::File {
    std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
