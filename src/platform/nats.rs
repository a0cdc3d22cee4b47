//! Reaching the platform's NATS the way the server does (BKLITE.md: `NATS_SERVERS` with an
//! optional `user:pass@`, user/password, token, credentials file, TLS with a private CA), with
//! each failure named by the stage it happened at.

use crate::error::{chain, Error, Kind};
use async_nats::jetstream::object_store::ObjectStore;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// A resolved NATS target. `Debug` never shows secrets.
#[derive(Clone)]
pub struct NatsTarget {
    pub urls: Vec<String>,
    /// Where the URL came from (`--nats-url`, `NATS_URL`, ...).
    pub source: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub credentials: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl std::fmt::Debug for NatsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NatsTarget({} from {})", self.display(), self.source)
    }
}

/// `scheme://host:port` without credentials.
pub fn strip_credentials(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url));
    let rest = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    format!("{scheme}://{rest}")
}

impl NatsTarget {
    pub fn display(&self) -> String {
        self.urls
            .iter()
            .map(|u| strip_credentials(u))
            .collect::<Vec<_>>()
            .join(",")
    }
    fn tls(&self) -> bool {
        self.ca_file.is_some() || self.urls.iter().any(|u| u.starts_with("tls://"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("where the platform's NATS is was not given: none of --nats-url, NATS_URL, [nats] url or the stack's .env (NATS_PORT, NATS_PASSWORD or NATS_ADMIN_PASSWORD) is set")]
    NoNats,
    #[error("NATS configuration: {0}")]
    BadConfig(String),
    #[error("cannot resolve the NATS host {host} ({nats}): {message}")]
    Resolve {
        nats: String,
        host: String,
        message: String,
    },
    #[error("cannot connect to NATS at {nats} (TCP): {message}")]
    Connect { nats: String, message: String },
    #[error("TLS with NATS at {nats} failed (CA or host name): {message}")]
    Tls { nats: String, message: String },
    #[error("NATS at {nats} refused the credentials: {message}")]
    Auth { nats: String, message: String },
    #[error("NATS at {nats} has no JetStream (or this account may not use it): {message}")]
    NoJetStream { nats: String, message: String },
    #[error("object store bucket {bucket:?} on {nats}: {message}")]
    Bucket {
        nats: String,
        bucket: String,
        message: String,
    },
}

pub const NATS_HINT: &str = "give NATS with --nats-url nats://USER:PASSWORD@HOST:4222 (or tls://...), NATS_URL, [nats] in the install config, or --env-file with the stack's .env (NATS_PORT, NATS_USER, NATS_PASSWORD)";

impl From<NatsError> for Error {
    fn from(e: NatsError) -> Error {
        let message = e.to_string();
        match e {
            NatsError::NoNats | NatsError::BadConfig(_) => Error::new(Kind::Input, message).hint(NATS_HINT),
            NatsError::Resolve { .. } => Error::new(Kind::External, message)
                .hint("check the host name in the NATS URL; on an air-gapped host use an IP address or an /etc/hosts entry"),
            NatsError::Connect { .. } => Error::new(Kind::External, message)
                .hint("is the stack running? `docker compose ps nats`; it publishes NATS on INTERNAL_BIND_IP:NATS_PORT (127.0.0.1:4222 by default)")
                .hint(NATS_HINT),
            NatsError::Tls { .. } => Error::new(Kind::External, message)
                .hint("give the CA that signed the NATS server's certificate with [nats] ca_file (the server's NATS_TLS_CA_FILE), and use the host name the certificate names"),
            NatsError::Auth { .. } => Error::new(Kind::External, message)
                .hint("check the user and password (the stack's NATS_USER/NATS_PASSWORD), the token or the credentials file"),
            NatsError::NoJetStream { .. } => Error::new(Kind::External, message)
                .hint("the platform needs JetStream: enable it in the NATS server config (`jetstream { store_dir: ... }`)"),
            NatsError::Bucket { .. } => Error::new(Kind::External, message)
                .hint("check the bucket name (the server's NATS_NAMESPACE) and the account's JetStream limits"),
        }
    }
}

/// Host and port of a URL, for the name-resolution and TCP stages.
pub(crate) fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let rest = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = rest.strip_prefix('[') {
        if let Some((h, p)) = v6.split_once(']') {
            return (h.to_string(), p.trim_start_matches(':').parse().unwrap_or(4222));
        }
    }
    match rest.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(4222)),
        None => (rest.to_string(), 4222),
    }
}

const ATTEMPTS: u32 = 3;

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(300 * (1u64 << attempt.min(4)))
}

/// How hard a connect tries: the commands' patient connect, or doctor --agent's bounded one.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    /// Of the TCP probe and of the handshake, each (only a failure that is neither TLS nor
    /// authentication is tried again).
    attempts: u32,
    /// Of one name resolution; `None`: as long as the resolver takes.
    resolve_timeout: Option<Duration>,
    /// Of one TCP connect.
    tcp_timeout: Duration,
    /// Of the handshake (the client's connection timeout).
    handshake_timeout: Duration,
}

/// [`connect`]'s: three tries, 5 s per TCP connect, 10 s per handshake.
const PATIENT: Bounds = Bounds {
    attempts: ATTEMPTS,
    resolve_timeout: None,
    tcp_timeout: Duration::from_secs(5),
    handshake_timeout: Duration::from_secs(10),
};

impl NatsError {
    /// The link of the chain it broke, as doctor names it.
    pub fn stage(&self) -> &'static str {
        match self {
            NatsError::Resolve { .. } => "name resolution",
            NatsError::Connect { .. } => "TCP",
            NatsError::Tls { .. } => "TLS",
            NatsError::Auth { .. } => "authentication",
            NatsError::NoJetStream { .. } => "JetStream",
            NatsError::Bucket { .. } => "bucket",
            NatsError::NoNats | NatsError::BadConfig(_) => "configuration",
        }
    }
}

/// Connect, staged: name resolution, TCP, then the NATS handshake (TLS, authentication). Bounded
/// retries with backoff on transient failures (refused/timed out).
pub async fn connect(t: &NatsTarget) -> Result<async_nats::Client, NatsError> {
    connect_within(t, &PATIENT).await
}

/// [`connect`] for a diagnosis that must end in seconds: one try of each stage, each bounded by
/// `step` (name resolution, each TCP connect, the handshake), and the whole by four steps.
pub async fn connect_bounded(t: &NatsTarget, step: Duration) -> Result<async_nats::Client, NatsError> {
    let bounds = Bounds {
        attempts: 1,
        resolve_timeout: Some(step),
        tcp_timeout: step,
        handshake_timeout: step,
    };
    let whole = step.saturating_mul(4);
    match tokio::time::timeout(whole, connect_within(t, &bounds)).await {
        Ok(r) => r,
        Err(_) => Err(NatsError::Connect {
            nats: t.display(),
            message: format!("no connection within {} ms", whole.as_millis()),
        }),
    }
}

async fn connect_within(t: &NatsTarget, b: &Bounds) -> Result<async_nats::Client, NatsError> {
    let display = t.display();
    probe_reachable(t, &display, b).await?;
    let (opts, addrs) = connect_options(t, b.handshake_timeout).await?;
    let mut attempt = 0;
    loop {
        match async_nats::connect_with_options(addrs.clone(), opts.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                let err = handshake_error(&e, &display);
                // Only a failure that is neither TLS nor authentication is worth another try.
                if matches!(err, NatsError::Connect { .. }) {
                    attempt += 1;
                    if attempt < b.attempts {
                        tokio::time::sleep(backoff(attempt)).await;
                        continue;
                    }
                }
                return Err(err);
            }
        }
    }
}

/// Stages 1 and 2, per URL: name resolution and TCP, so an unreachable server is reported as such
/// rather than as a handshake failure. One URL that answers is enough (the client then tries
/// them all).
async fn probe_reachable(t: &NatsTarget, display: &str, b: &Bounds) -> Result<(), NatsError> {
    let mut last = None;
    for url in &t.urls {
        let (host, port) = host_port(url);
        let resolved = match b.resolve_timeout {
            None => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map(|a| a.collect::<Vec<_>>()),
            Some(within) => crate::portable::lookup_within(&host, port, within).await,
        };
        let addrs = match resolved {
            Ok(a) => a,
            Err(e) => {
                last = Some(NatsError::Resolve {
                    nats: display.to_string(),
                    host: host.clone(),
                    message: e.to_string(),
                });
                continue;
            }
        };
        for attempt in 0..b.attempts {
            let mut err = None;
            for a in &addrs {
                match tokio::time::timeout(b.tcp_timeout, tokio::net::TcpStream::connect(a)).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => err = Some(format!("{a}: {e}")),
                    Err(_) => err = Some(format!("{a}: timed out after {}", seconds(b.tcp_timeout))),
                }
            }
            last = Some(NatsError::Connect {
                nats: display.to_string(),
                message: err.unwrap_or_else(|| format!("{host} resolved to no address")),
            });
            if attempt + 1 < b.attempts {
                tokio::time::sleep(backoff(attempt)).await;
            }
        }
    }
    Err(last.unwrap_or(NatsError::NoNats))
}

/// `5 s`, `1.5 s`.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} s", d.as_secs_f64())
    }
}

/// The client's options (credentials, user, token, TLS) and server addresses from the target,
/// checked before the handshake so a bad setting is a configuration error.
async fn connect_options(
    t: &NatsTarget,
    handshake_timeout: Duration,
) -> Result<(async_nats::ConnectOptions, Vec<async_nats::ServerAddr>), NatsError> {
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(handshake_timeout)
        .name("bkbundle");
    if let Some(c) = &t.credentials {
        opts = opts
            .credentials_file(c)
            .await
            .map_err(|e| NatsError::BadConfig(format!("cannot read the NATS credentials file {}: {e}", c.display())))?;
    }
    let addrs: Vec<async_nats::ServerAddr> = t
        .urls
        .iter()
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| NatsError::BadConfig(format!("{}: {e}", strip_credentials(u))))
        })
        .collect::<Result<_, _>>()?;
    // A URL's own `user:pass@` wins (the client does not read it from the URL itself).
    let embedded = addrs.iter().find(|a| a.has_user_pass()).map(|a| {
        (
            percent_decode(a.username().unwrap_or_default()),
            percent_decode(a.password().unwrap_or_default()),
        )
    });
    match (embedded, &t.user) {
        (Some((u, p)), _) => opts = opts.user_and_password(u, p),
        (None, Some(u)) => opts = opts.user_and_password(u.clone(), t.password.clone().unwrap_or_default()),
        (None, None) => {}
    }
    if let Some(tok) = &t.token {
        opts = opts.token(tok.clone());
    }
    if t.tls() {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &t.ca_file {
        if !ca.is_file() {
            return Err(NatsError::BadConfig(format!(
                "the NATS CA file {} does not exist",
                ca.display()
            )));
        }
        opts = opts.add_root_certificates(ca.clone());
    }
    match (&t.cert_file, &t.key_file) {
        (Some(c), Some(k)) => opts = opts.add_client_certificate(c.clone(), k.clone()),
        (None, None) => {}
        _ => return Err(NatsError::BadConfig("[nats] cert_file and key_file go together".into())),
    }
    Ok((opts, addrs))
}

/// The handshake's failure in the operator's terms (TLS, authentication, name, configuration);
/// anything else is a `Connect` failure, the one kind worth retrying.
fn handshake_error(e: &async_nats::ConnectError, display: &str) -> NatsError {
    use async_nats::ConnectErrorKind as K;
    let message = chain(e);
    match e.kind() {
        K::Tls => NatsError::Tls {
            nats: display.to_string(),
            message,
        },
        K::Authentication | K::AuthorizationViolation => NatsError::Auth {
            nats: display.to_string(),
            message,
        },
        K::Dns => NatsError::Resolve {
            nats: display.to_string(),
            host: display.to_string(),
            message,
        },
        K::ServerParse => NatsError::BadConfig(message),
        K::TimedOut | K::Io | K::MaxReconnects => {
            // A TLS problem can surface as an I/O error from the handshake.
            let lower = message.to_ascii_lowercase();
            if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
                NatsError::Tls {
                    nats: display.to_string(),
                    message,
                }
            } else if lower.contains("authorization") {
                NatsError::Auth {
                    nats: display.to_string(),
                    message,
                }
            } else {
                NatsError::Connect {
                    nats: display.to_string(),
                    message,
                }
            }
        }
    }
}

/// `%XX` escapes of a URL's user information decoded (a password may hold `@` or `:`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() && s.is_char_boundary(i + 3) {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

// ---------------------------------------------------------------------------------------------
// The object store

/// The bucket, and its stream for reading meta messages directly.
pub struct Store {
    pub objects: ObjectStore,
    pub stream: async_nats::jetstream::stream::Stream,
    pub js: async_nats::jetstream::Context,
    pub bucket: String,
}

/// JetStream answers this connection's account: `$JS.API.INFO` gets a reply that is not an
/// error; without JetStream nobody responds. (async-nats' own account-info call cannot parse
/// nats-server 2.9's reply.)
pub async fn jetstream_answers(nc: &async_nats::Client, nt: &NatsTarget) -> Result<(), NatsError> {
    match nc.request("$JS.API.INFO", Bytes::new()).await {
        Ok(m) if !String::from_utf8_lossy(&m.payload).contains("\"error\"") => Ok(()),
        Ok(m) => Err(NatsError::NoJetStream {
            nats: nt.display(),
            message: String::from_utf8_lossy(&m.payload).to_string(),
        }),
        Err(e) => Err(NatsError::NoJetStream {
            nats: nt.display(),
            message: crate::error::chain(&e),
        }),
    }
}

/// Check that JetStream answers, then open the bucket; when it is absent, create it (`create`)
/// or return `None`. Used by init-packages and doctor, so both name the same broken link.
pub async fn open_store(
    nc: &async_nats::Client,
    nt: &NatsTarget,
    bucket: &str,
    create: bool,
) -> Result<Option<Store>, NatsError> {
    let js = async_nats::jetstream::new(nc.clone());
    jetstream_answers(nc, nt).await?;
    let bucket_err = |message: String| NatsError::Bucket {
        nats: nt.display(),
        bucket: bucket.to_string(),
        message,
    };
    let objects = match js.get_object_store(bucket).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), async_nats::jetstream::context::ObjectStoreErrorKind::GetStore) => {
            if !create {
                return Ok(None);
            }
            let cfg = async_nats::jetstream::object_store::Config {
                bucket: bucket.to_string(),
                ..Default::default()
            };
            js.create_object_store(cfg)
                .await
                .map_err(|e| bucket_err(format!("cannot create it: {}", crate::error::chain(&e))))?
        }
        Err(e) => return Err(bucket_err(crate::error::chain(&e))),
    };
    let stream = js
        .get_stream(format!("OBJ_{bucket}"))
        .await
        .map_err(|e| bucket_err(format!("its stream OBJ_{bucket}: {}", crate::error::chain(&e))))?;
    Ok(Some(Store {
        objects,
        stream,
        js,
        bucket: bucket.to_string(),
    }))
}

/// The subject an upload's chunks are published on.
pub fn chunk_subject(bucket: &str, nuid: &str) -> String {
    format!("$O.{bucket}.C.{nuid}")
}

/// The subject of an object's meta message (the name URL-safe base64, padded).
pub fn meta_subject(bucket: &str, key: &str) -> String {
    format!(
        "$O.{bucket}.M.{}",
        base64::engine::general_purpose::URL_SAFE.encode(key)
    )
}

/// The names of the live (not deleted) objects in the bucket.
pub async fn list_objects(s: &Store, nats: &str) -> Result<BTreeSet<String>, NatsError> {
    let mut names = BTreeSet::new();
    let mut list = s.objects.list().await.map_err(|e| NatsError::Bucket {
        nats: nats.to_string(),
        bucket: s.bucket.clone(),
        message: format!("listing: {}", crate::error::chain(&e)),
    })?;
    while let Some(o) = list.next().await {
        match o {
            Ok(o) if !o.deleted => {
                names.insert(o.name);
            }
            Ok(_) => {}
            // A tombstone the upstream Python client wrote (its `mtime` is not RFC 3339):
            // a deleted object, nothing to judge.
            Err(e) => tracing::debug!("listing {}: skipped an entry: {}", s.bucket, crate::error::chain(&e)),
        }
    }
    Ok(names)
}

/// The stored digest and size of `key`, `None` when absent or deleted. Reads the object's meta
/// message itself: the upstream Python client writes tombstones (`mtime` not RFC 3339) that
/// async-nats' `info` refuses.
pub async fn info(s: &Store, key: &str) -> Result<Option<(String, u64)>, String> {
    use async_nats::jetstream::object_store::InfoErrorKind;
    let mut attempt = 0;
    loop {
        match s.objects.info(key).await {
            Ok(i) if i.deleted => return Ok(None),
            Ok(i) => return Ok(Some((i.digest.unwrap_or_default(), i.size as u64))),
            Err(e) if e.kind() == InfoErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == InfoErrorKind::TimedOut && attempt < 3 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(300 << attempt)).await;
            }
            Err(e) => {
                let first = crate::error::chain(&e);
                return raw_info(s, key)
                    .await
                    .map_err(|raw| format!("{first}; reading the meta message: {raw}"));
            }
        }
    }
}

async fn raw_info(s: &Store, key: &str) -> Result<Option<(String, u64)>, String> {
    let Some(v) = raw_meta(s, key).await? else {
        return Ok(None);
    };
    if v.get("deleted").and_then(|d| d.as_bool()).unwrap_or(false) {
        return Ok(None);
    }
    Ok(Some((
        v.get("digest").and_then(|d| d.as_str()).unwrap_or_default().to_string(),
        v.get("size").and_then(|d| d.as_u64()).unwrap_or(0),
    )))
}

/// The object's meta message as JSON, `None` when there is none.
pub async fn raw_meta(s: &Store, key: &str) -> Result<Option<serde_json::Value>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let subject = meta_subject(&s.bucket, key);
    let m = match s.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => m,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(e) => return Err(crate::error::chain(&e)),
    };
    serde_json::from_slice(&m.payload).map(Some).map_err(|e| e.to_string())
}

/// What the bucket's stream holds: its bytes, the live objects (by the nuid of their chunks) and
/// chunk sets no live object refers to (an upload that was killed before its meta was written,
/// or a replaced version whose chunks were not purged).
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub stream_bytes: u64,
    pub live_objects: usize,
    pub live_bytes: u64,
    /// `(nuid, chunk messages)` of chunk sets no live object's meta names.
    pub unreferenced: Vec<(String, usize)>,
}

/// Every meta message of the bucket (one per object, small; tombstones included), as the
/// stream's own per-subject index lists them: `(subject, payload)`. A subject purged between the
/// listing and the read is left out.
async fn meta_messages(s: &Store) -> Result<Vec<(String, Bytes)>, String> {
    let mut metas = s
        .stream
        .info_with_subjects(format!("$O.{}.M.>", s.bucket))
        .await
        .map_err(|e| chain(&e))?;
    let mut subjects = Vec::new();
    while let Some(x) = metas.next().await {
        subjects.push(x.map_err(|e| chain(&e))?.0);
    }
    let mut out = Vec::with_capacity(subjects.len());
    for subject in subjects {
        match s.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => out.push((subject, m.payload)),
            Err(_) => continue, // purged meanwhile
        }
    }
    Ok(out)
}

/// Every object's meta message as JSON, tombstones included, none skipped: unlike
/// [`list_objects`] (async-nats' listing, which passes over entries it cannot parse), a meta that
/// is not JSON is an error naming its subject, so a backup never silently leaves an object out.
pub async fn metas(s: &Store) -> Result<Vec<serde_json::Value>, String> {
    meta_messages(s)
        .await?
        .into_iter()
        .map(|(subject, payload)| {
            serde_json::from_slice(&payload)
                .map_err(|e| format!("the meta message on {subject} is not an object's JSON meta: {e}"))
        })
        .collect()
}

/// Read the bucket's [`Inventory`]: the metas (one per object, small) and the chunk subjects with
/// their message counts (the stream's own per-subject index), never a chunk's payload.
pub async fn inventory(s: &Store) -> Result<Inventory, String> {
    let info = s.stream.get_info().await.map_err(|e| chain(&e))?;
    let mut inv = Inventory {
        stream_bytes: info.state.bytes,
        ..Default::default()
    };
    let mut live: BTreeSet<String> = BTreeSet::new();
    for (_, payload) in meta_messages(s).await? {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&payload) else {
            continue;
        };
        if v.get("deleted").and_then(|d| d.as_bool()).unwrap_or(false) {
            continue;
        }
        if let Some(n) = v.get("nuid").and_then(|n| n.as_str()) {
            live.insert(n.to_string());
            inv.live_objects += 1;
            inv.live_bytes += v.get("size").and_then(|z| z.as_u64()).unwrap_or(0);
        }
    }
    let prefix = format!("$O.{}.C.", s.bucket);
    let mut chunks = s
        .stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| chain(&e))?;
    while let Some(x) = chunks.next().await {
        let (subject, count) = x.map_err(|e| chain(&e))?;
        if let Some(nuid) = subject.strip_prefix(&prefix) {
            if !live.contains(nuid) {
                inv.unreferenced.push((nuid.to_string(), count));
            }
        }
    }
    inv.unreferenced.sort();
    Ok(inv)
}

/// Chunks a read asks the server for at a time: what sits in this process at most (the pull
/// consumer asks for more when half are consumed), so a download holds a few chunks (a few MiB),
/// whatever the object's size.
const READ_BATCH: i64 = 4;

/// How long a read waits for the next chunk before it gives up (the ordered consumer recreates
/// itself on gaps and missed heartbeats; this bounds a server that went away).
const CHUNK_WAIT: Duration = Duration::from_secs(30);

/// Hand the chunks of upload `nuid` to `sink` in order, one message at a time; the bytes read.
///
/// An ordered pull consumer of our own over `$O.<bucket>.C.<nuid>` rather than async-nats'
/// object `get`: its batch is capped ([`READ_BATCH`]) so memory stays bounded, each chunk
/// reaches the sink as the message's own buffer (`get` copies every byte through a queue),
/// and the caller checks size and digest against what it recorded, naming the object; `get`
/// also resolves the object through async-nats' meta parsing, which refuses metas the upstream
/// Python client writes (see [`info`]).
pub async fn read_chunks(
    s: &Store,
    nuid: &str,
    sink: &mut (dyn FnMut(Bytes) -> Result<(), String> + Send),
) -> Result<u64, String> {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    let subject = chunk_subject(&s.bucket, nuid);
    let consumer = s
        .stream
        .create_consumer(OrderedConfig {
            filter_subject: subject.clone(),
            max_batch: READ_BATCH,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot read {subject}: {}", chain(&e)))?;
    let name = consumer.cached_info().name.clone();
    // The server counts the messages the consumer has to deliver when it creates it.
    let read = if consumer.cached_info().num_pending == 0 {
        Ok(0) // an empty object has no chunks
    } else {
        read_ordered(consumer, &subject, sink).await
    };
    // Ephemeral, it would go by itself after 30 s idle; a backup of many objects should not
    // leave one per object behind meanwhile.
    let _ = s.stream.delete_consumer(&name).await;
    read
}

async fn read_ordered(
    consumer: async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::OrderedConfig>,
    subject: &str,
    sink: &mut (dyn FnMut(Bytes) -> Result<(), String> + Send),
) -> Result<u64, String> {
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("cannot read {subject}: {}", chain(&e)))?;
    let mut bytes = 0u64;
    loop {
        let m = match tokio::time::timeout(CHUNK_WAIT, messages.next()).await {
            Err(_) => {
                return Err(format!(
                    "no chunk on {subject} within {} after {bytes} bytes",
                    seconds(CHUNK_WAIT)
                ))
            }
            Ok(None) => return Err(format!("the read of {subject} ended after {bytes} bytes")),
            Ok(Some(m)) => m.map_err(|e| format!("reading {subject} after {bytes} bytes: {}", chain(&e)))?,
        };
        let last = m
            .info()
            .map_err(|e| format!("reading {subject}: a chunk without JetStream info: {e}"))?
            .pending
            == 0;
        let (message, _) = m.split();
        bytes += message.payload.len() as u64;
        sink(message.payload)?;
        if last {
            return Ok(bytes);
        }
    }
}

/// Remove the chunks of `nuid` from the bucket's stream; returns how many messages went.
pub async fn purge_chunks(s: &Store, nuid: &str) -> Result<u64, String> {
    s.stream
        .purge()
        .filter(chunk_subject(&s.bucket, nuid))
        .await
        .map(|r| r.purged)
        .map_err(|e| chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_of_a_url() {
        assert_eq!(host_port("tls://u:p@h.example:4333"), ("h.example".to_string(), 4333));
        assert_eq!(host_port("[::1]:4"), ("::1".to_string(), 4));
        assert_eq!(host_port("h"), ("h".to_string(), 4222));
    }

    fn target(url: String) -> NatsTarget {
        NatsTarget {
            urls: vec![url],
            source: "test".into(),
            user: None,
            password: None,
            token: None,
            credentials: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }

    #[tokio::test]
    async fn the_bounded_connect_tries_once_and_ends_within_its_steps() {
        let step = Duration::from_millis(500);
        // Refused: at once, no retries (connect's three tries with backoff take about a second).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t0 = std::time::Instant::now();
        let e = connect_bounded(&target(format!("nats://127.0.0.1:{port}")), step)
            .await
            .unwrap_err();
        assert_eq!(e.stage(), "TCP", "{e}");
        assert!(t0.elapsed() < Duration::from_millis(300), "{:?}", t0.elapsed());
        // A port that accepts and never says INFO: the handshake's step, not the client's 10 s.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let t0 = std::time::Instant::now();
        let e = connect_bounded(&target(format!("nats://127.0.0.1:{port}")), step)
            .await
            .unwrap_err();
        assert_eq!(e.stage(), "TCP", "{e}");
        assert!(t0.elapsed() < step * 4, "{:?}", t0.elapsed());
        drop(silent);
    }
}
