//! The OCI distribution protocol, client side: what `push`, `install --images-from` and `doctor`
//! need of a registry, over HTTP/1.1 (hyper, already in the tree through the Docker client) with
//! rustls for TLS.
//!
//! - Auth as registries ask for it: a `401` names the scheme in `WWW-Authenticate` (parsed with
//!   the `http-auth` crate). `Basic`: the credentials on every request from then on. `Bearer`
//!   (distribution's token auth, Harbor): a token from the challenge's realm for the scope the
//!   request needs (`repository:NAME:pull,push`), fetched with the credentials (or anonymously),
//!   cached per scope; the realm may be on another host or port, over HTTPS even when the
//!   registry is plain HTTP (checked against --registry-ca, else the system's CAs). An anonymous
//!   token the registry refuses (`insufficient_scope`) makes it ask for credentials on a
//!   terminal, once, as basic auth does; otherwise the error tells a missing right from a wrong
//!   password. A body that streams is never sent before its scope's auth is settled, so no
//!   upload has to be replayed.
//! - Blobs: `HEAD` (present?), a cross-repository mount (`POST ...?mount=&from=`, `201`), and an
//!   upload as one streamed `PATCH` (chunked transfer, no copy) closed by `PUT ?digest=` with the
//!   digest computed while streaming; the registry's answer is checked against it.
//! - Manifests: `GET` (bounded), `PUT` (the digest the registry answers checked).
//!
//! Every error names the registry, the repository and the blob or tag, with the status and the
//! registry's own error codes, and a hint.

use super::{Access, Credentials, Placement, Target};
use crate::digest::sha256_hex;
use crate::error::{Error, Kind, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::either::Either;

type Body = BoxBody<Bytes, io::Error>;

/// A GET of `path` on `authority` without a body, with bkbundle's User-Agent and `auth` (an
/// Authorization value) when given: a blob's or a token's request.
fn get_request(path: &str, authority: &str, auth: Option<HeaderValue>) -> Result<Request<Body>> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, authority)
        .header(header::USER_AGENT, concat!("bkbundle/", env!("CARGO_PKG_VERSION")))
        .body(Empty::new().map_err(|e| match e {}).boxed())
        .map_err(|e| Error::internal(format!("request GET {path}: {e}")))?;
    if let Some(a) = auth {
        req.headers_mut().insert(header::AUTHORIZATION, a);
    }
    Ok(req)
}
type Conn = SendRequest<Body>;

/// The largest manifest read (distribution's own limit is 4 MiB).
const MANIFEST_MAX: usize = 4 << 20;
/// The most of an error or token body read.
const SMALL_BODY_MAX: usize = 256 << 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a request without a streamed body may take to be answered (closing an upload of a
/// large blob on a slow storage backend included).
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a streamed upload may make no progress (the registry stopped reading, or has not
/// answered since its last byte) before it is given up.
const STALL_TIMEOUT: Duration = Duration::from_secs(300);

/// What every manifest request accepts: image manifests of both kinds and both index kinds.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// A connection pool to one registry, with its auth state.
pub struct Client {
    /// `host[:port]` as the operator gave it (the HTTP authority).
    host: String,
    tls: Option<Tls>,
    /// Where the registry's certificate must chain to, for messages.
    trust: String,
    insecure: bool,
    /// `--registry-ca`, for a token service over HTTPS when the registry is plain HTTP.
    ca_file: Option<std::path::PathBuf>,
    /// The TLS settings of such a token service, made when first needed.
    realm_tls: Mutex<Option<(Tls, String)>>,
    credentials: Option<Credentials>,
    prompt: bool,
    auth: Mutex<AuthState>,
    /// Held while credentials are asked for on the terminal, so parallel uploads ask once.
    asking: tokio::sync::Mutex<()>,
    /// Stands in for the terminal in tests.
    #[cfg(test)]
    asker: Option<fn() -> Credentials>,
    pool: Mutex<Vec<Conn>>,
    /// Blob bytes sent in upload bodies.
    sent: AtomicU64,
}

#[derive(Clone)]
struct Tls {
    config: Arc<rustls::ClientConfig>,
}

#[derive(Default)]
struct AuthState {
    scheme: Scheme,
    /// Bearer tokens by scope string.
    tokens: HashMap<String, String>,
    /// Credentials asked for on the terminal (when none were given).
    asked: Option<Credentials>,
}

#[derive(Default, Clone, Debug, PartialEq, Eq)]
enum Scheme {
    /// Not known yet: the first request goes without auth.
    #[default]
    Unknown,
    /// The registry answered without asking.
    Open,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// What a request needs the right to do (the token scope of bearer auth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `/v2/` itself.
    Registry,
    Pull(String),
    Push(String),
    /// Push to the first, pull from the second (a cross-repository mount).
    Mount(String, String),
}

impl Scope {
    fn strings(&self) -> Vec<String> {
        match self {
            Scope::Registry => Vec::new(),
            Scope::Pull(r) => vec![format!("repository:{r}:pull")],
            Scope::Push(r) => vec![format!("repository:{r}:pull,push")],
            Scope::Mount(r, from) => vec![format!("repository:{r}:pull,push"), format!("repository:{from}:pull")],
        }
    }
    fn key(&self) -> String {
        self.strings().join(" ")
    }
    /// What the scope allows, for messages: "push to site/app".
    fn describe(&self) -> String {
        match self {
            Scope::Registry => "use the registry".to_string(),
            Scope::Pull(r) => format!("pull from {r}"),
            Scope::Push(r) => format!("push to {r}"),
            Scope::Mount(r, from) => format!("push to {r} (mounting a blob from {from})"),
        }
    }
    /// The repository written to (or read from).
    fn repository(&self) -> Option<&str> {
        match self {
            Scope::Registry => None,
            Scope::Pull(r) | Scope::Push(r) | Scope::Mount(r, _) => Some(r),
        }
    }
}

/// Whether a `401` is a bearer challenge with `error="insufficient_scope"`: the token was good
/// but does not grant what the request needs (distribution, Harbor).
fn insufficient_scope(r: &Reply) -> bool {
    let Some(h) = r.header("www-authenticate") else {
        return false;
    };
    let Ok(challenges) = http_auth::parse_challenges(h) else {
        return false;
    };
    challenges.iter().any(|c| {
        c.scheme.eq_ignore_ascii_case("bearer")
            && c.params
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("error") && v.to_unescaped() == "insufficient_scope")
    })
}

/// A request body: replayable (sent again after an auth challenge) or streamed (once).
enum Payload {
    None,
    Bytes(Bytes),
    Stream(mpsc::Receiver<io::Result<Bytes>>),
}

/// A response read whole (bodies here are small: manifests, errors, tokens).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A manifest as the registry has it.
#[derive(Debug, Clone)]
pub struct RemoteManifest {
    pub media_type: String,
    /// `sha256:<hex>` of its bytes.
    pub digest: String,
    /// The config blob's digest (for an image manifest): the image id.
    pub config_digest: Option<String>,
    /// The layers' digests and sizes, bottom to top.
    pub layers: Vec<(String, u64)>,
}

/// A blob's bytes as they arrive ([`Client::blob_stream`]).
pub struct BlobStream {
    /// The `Content-Length` the registry announced, if any (a hint only: never trusted to size
    /// anything).
    pub length: Option<u64>,
    pub body: std::pin::Pin<Box<dyn futures_util::Stream<Item = io::Result<Bytes>> + Send>>,
}

/// A blob pushed: its digest and size as the registry confirmed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub digest: String,
    pub size: u64,
}

impl Client {
    /// A client for `host` (`host[:port]`); nothing is sent yet. TLS trusts `access.ca_file`
    /// when given, else the system's CAs; `access.insecure` is plain HTTP.
    pub fn new(host: &str, access: &Access) -> Result<Client> {
        let credentials = access.credentials(host)?;
        let (tls, trust) = if access.insecure {
            (None, "plain HTTP".to_string())
        } else {
            let (t, trust) = tls_settings(host, access.ca_file.as_deref())?;
            (Some(t), trust)
        };
        Ok(Client {
            host: host.to_string(),
            tls,
            trust,
            insecure: access.insecure,
            ca_file: access.ca_file.clone(),
            realm_tls: Mutex::new(None),
            credentials,
            prompt: access.prompt,
            auth: Mutex::new(AuthState::default()),
            asking: tokio::sync::Mutex::new(()),
            #[cfg(test)]
            asker: None,
            pool: Mutex::new(Vec::new()),
            sent: AtomicU64::new(0),
        })
    }

    /// `https://host` or `http://host`, for messages.
    pub fn display(&self) -> String {
        format!("{}://{}", if self.tls.is_some() { "https" } else { "http" }, self.host)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Blob bytes sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// `GET /v2/`: reachable, speaks the protocol, the credentials are accepted. With bearer auth
    /// a token is fetched, which is where a wrong password shows.
    pub async fn ping(&self) -> Result<()> {
        let r = self
            .call(
                Method::GET,
                "/v2/",
                Scope::Registry,
                HeaderMap::new(),
                Payload::None,
                SMALL_BODY_MAX,
            )
            .await?;
        if r.status.is_success() {
            return Ok(());
        }
        Err(self.refused(&r, "the API check GET /v2/", None))
    }

    /// Whether `repository` has blob `digest`; its size when it has.
    pub async fn blob_size(&self, repository: &str, digest: &str) -> Result<Option<u64>> {
        let path = format!("/v2/{repository}/blobs/{digest}");
        let r = self
            .call(
                Method::HEAD,
                &path,
                Scope::Pull(repository.into()),
                HeaderMap::new(),
                Payload::None,
                0,
            )
            .await?;
        match r.status {
            s if s.is_success() => Ok(Some(
                r.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.refused(&r, &format!("HEAD of blob {digest} in {repository}"), Some(repository))),
        }
    }

    /// Mount `digest` from `from` into `repository`: `true` when the registry did (201), `false`
    /// when it offered an upload instead (it cannot mount: the session is cancelled).
    pub async fn mount(&self, repository: &str, from: &str, digest: &str) -> Result<bool> {
        let path = format!("/v2/{repository}/blobs/uploads/?mount={digest}&from={from}");
        let scope = Scope::Mount(repository.into(), from.into());
        let r = self
            .call(
                Method::POST,
                &path,
                scope,
                content_length_zero(),
                Payload::None,
                SMALL_BODY_MAX,
            )
            .await?;
        match r.status {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                if let Some(loc) = r.header("location") {
                    let p = self.location_path(loc);
                    let _ = self
                        .call(
                            Method::DELETE,
                            &p,
                            Scope::Push(repository.into()),
                            HeaderMap::new(),
                            Payload::None,
                            SMALL_BODY_MAX,
                        )
                        .await;
                }
                Ok(false)
            }
            _ => Err(self.refused(
                &r,
                &format!("mount of blob {digest} from {from} into {repository}"),
                Some(repository),
            )),
        }
    }

    /// Upload one blob into `repository`: `data` streamed as one `PATCH`, then `done` gives the
    /// digest and size the producer computed from what it sent, which the `PUT` that closes the
    /// upload names and the registry must confirm. `label` names the blob in errors (its digest
    /// is not known before the end). A failed upload is cancelled (`DELETE`).
    pub async fn upload(
        &self,
        repository: &str,
        data: mpsc::Receiver<io::Result<Bytes>>,
        done: tokio::sync::oneshot::Receiver<Result<(String, u64)>>,
        label: &str,
    ) -> Result<Pushed> {
        let what = format!("upload of {label} to {repository}");
        let scope = Scope::Push(repository.into());
        let mut location = self.begin_upload(repository, &what).await?;
        let result = async {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            let r = self
                .call(
                    Method::PATCH,
                    &location,
                    scope.clone(),
                    headers,
                    Payload::Stream(data),
                    SMALL_BODY_MAX,
                )
                .await;
            // The producer's own error (a damaged bundle entry) explains a broken stream better.
            let produced = done
                .await
                .map_err(|_| Error::internal(format!("{what}: the blob's producer ended without a result")))?;
            let (digest, size) = produced?;
            let r = r?;
            if r.status != StatusCode::ACCEPTED {
                return Err(self.refused(&r, &format!("{what} ({digest}, {size} bytes)"), Some(repository)));
            }
            if let Some(range) = r.header("range") {
                let end = range.rsplit('-').next().and_then(|e| e.trim().parse::<u64>().ok());
                if size > 0 && end != Some(size - 1) {
                    return Err(Error::external(format!(
                        "registry {}: the {what} ({digest}) stored {range:?}, expected 0-{} ({size} bytes sent)",
                        self.display(),
                        size - 1
                    ))
                    .hint("the registry lost part of the stream; run push again"));
                }
            }
            if let Some(loc) = r.header("location") {
                location = self.location_path(loc);
            }
            let sep = if location.contains('?') { '&' } else { '?' };
            let close = format!("{location}{sep}digest={digest}");
            let r = self
                .call(
                    Method::PUT,
                    &close,
                    scope.clone(),
                    content_length_zero(),
                    Payload::None,
                    SMALL_BODY_MAX,
                )
                .await?;
            if r.status != StatusCode::CREATED {
                return Err(self.refused(&r, &format!("{what} ({digest}, {size} bytes)"), Some(repository)));
            }
            self.confirm_digest(&r, &digest, &format!("blob {digest} ({label}) in {repository}"))?;
            self.sent.fetch_add(size, Ordering::Relaxed);
            Ok(Pushed { digest, size })
        }
        .await;
        if result.is_err() {
            let _ = self
                .call(
                    Method::DELETE,
                    &location,
                    scope,
                    HeaderMap::new(),
                    Payload::None,
                    SMALL_BODY_MAX,
                )
                .await;
        }
        result
    }

    /// Open an upload session in `repository` (`POST .../blobs/uploads/`); its location's path.
    async fn begin_upload(&self, repository: &str, what: &str) -> Result<String> {
        let start = format!("/v2/{repository}/blobs/uploads/");
        let r = self
            .call(
                Method::POST,
                &start,
                Scope::Push(repository.into()),
                content_length_zero(),
                Payload::None,
                SMALL_BODY_MAX,
            )
            .await?;
        if r.status != StatusCode::ACCEPTED {
            return Err(self.refused(&r, &format!("start of the {what}"), Some(repository)));
        }
        let loc = r
            .header("location")
            .ok_or_else(|| self.protocol(&format!("answered the start of the {what} without a Location")))?;
        Ok(self.location_path(loc))
    }

    /// Upload a small blob held in memory (a config) whose digest is known.
    pub async fn upload_bytes(&self, repository: &str, digest: &str, data: Bytes) -> Result<Pushed> {
        let what = format!("upload of blob {digest} to {repository}");
        let scope = Scope::Push(repository.into());
        let location = self.begin_upload(repository, &what).await?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let size = data.len() as u64;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        let r = self
            .call(
                Method::PUT,
                &format!("{location}{sep}digest={digest}"),
                scope,
                headers,
                Payload::Bytes(data),
                SMALL_BODY_MAX,
            )
            .await?;
        if r.status != StatusCode::CREATED {
            return Err(self.refused(&r, &what, Some(repository)));
        }
        self.sent.fetch_add(size, Ordering::Relaxed);
        self.confirm_digest(&r, digest, &format!("blob {digest} in {repository}"))?;
        Ok(Pushed {
            digest: digest.to_string(),
            size,
        })
    }

    /// The manifest `reference` (tag or digest) of `repository`, or `None` when there is none.
    pub async fn manifest(&self, repository: &str, reference: &str) -> Result<Option<RemoteManifest>> {
        let Some((body, media_type)) = self.manifest_bytes(repository, reference).await? else {
            return Ok(None);
        };
        let digest = format!("sha256:{}", sha256_hex(&body));
        #[derive(serde::Deserialize)]
        struct Descriptor {
            digest: String,
            #[serde(default)]
            size: u64,
        }
        #[derive(serde::Deserialize)]
        struct Doc {
            config: Option<Descriptor>,
            #[serde(default)]
            layers: Vec<Descriptor>,
        }
        let doc: Doc = self.json(
            &body,
            &format!("GET of manifest {repository}:{reference}"),
            "a manifest",
        )?;
        Ok(Some(RemoteManifest {
            media_type,
            digest,
            config_digest: doc.config.map(|c| c.digest),
            layers: doc.layers.into_iter().map(|l| (l.digest, l.size)).collect(),
        }))
    }

    /// The manifest `reference` (tag or digest) of `repository` as the registry serves it: its
    /// bytes (at most 4 MiB) and its media type (the body's `mediaType`, else `Content-Type`), or
    /// `None` when there is none. Nothing is checked here: pack hashes the bytes itself.
    pub async fn manifest_bytes(&self, repository: &str, reference: &str) -> Result<Option<(Bytes, String)>> {
        let path = format!("/v2/{repository}/manifests/{reference}");
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT_MANIFESTS));
        let r = self.get(&path, repository, headers, MANIFEST_MAX).await?;
        match r.status {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => {
                return Err(self.refused(
                    &r,
                    &format!("GET of manifest {repository}:{reference}"),
                    Some(repository),
                ))
            }
        }
        #[derive(serde::Deserialize)]
        struct Doc {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
        }
        let declared = serde_json::from_slice::<Doc>(&r.body).ok().and_then(|d| d.media_type);
        let media_type = declared
            .or_else(|| {
                r.header("content-type")
                    .map(|c| c.split(';').next().unwrap_or(c).trim().to_string())
            })
            .unwrap_or_default();
        Ok(Some((r.body, media_type)))
    }

    /// A blob of `repository` as it streams (image layers: never held whole), or `None` when the
    /// registry does not have it. Redirects (a storage backend serving the bytes) are followed,
    /// without credentials when they leave the registry. The stream fails when no data comes for
    /// [`STALL_TIMEOUT`]; what it yields is not checked here (the caller hashes it).
    pub async fn blob_stream(&self, repository: &str, digest: &str) -> Result<Option<BlobStream>> {
        let scope = Scope::Pull(repository.into());
        let what = format!("GET of blob {digest} in {repository}");
        let mut path = format!("/v2/{repository}/blobs/{digest}");
        let mut challenged = false;
        // A redirect's URL on another host or port: (tls, authority).
        let mut elsewhere: Option<(bool, String)> = None;
        for _ in 0..8 {
            let (mut conn, authority, auth) = match &elsewhere {
                None => (self.conn().await?, self.host.clone(), self.authorization(&scope).await?),
                Some((tls, authority)) => {
                    let conn = if *tls {
                        let (t, trust) = self.realm_tls(&format!("https://{authority}/"))?;
                        self.connect(authority, Some(&t), &trust).await?
                    } else {
                        self.connect(authority, None, "").await?
                    };
                    (conn, authority.clone(), None)
                }
            };
            let req = get_request(&path, &authority, auth)?;
            let failed = |e: String| {
                Error::external(format!("registry {}: {what}: {e}", self.display()))
                    .hint("check that the registry runs and that this host reaches it; run pack again")
            };
            let resp = tokio::time::timeout(REPLY_TIMEOUT, conn.send_request(req))
                .await
                .map_err(|_| failed(format!("no answer within {} s", REPLY_TIMEOUT.as_secs())))?
                .map_err(|e| failed(crate::error::chain(&e)))?;
            let (parts, mut body) = resp.into_parts();
            if parts.status.is_success() {
                let length = parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                let stream = futures_util::stream::unfold(Some((body, conn)), |state| async move {
                    let (mut body, conn) = state?;
                    loop {
                        match tokio::time::timeout(STALL_TIMEOUT, body.frame()).await {
                            Err(_) => {
                                let e = io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    format!("no data for {} s", STALL_TIMEOUT.as_secs()),
                                );
                                return Some((Err(e), None));
                            }
                            Ok(None) => return None,
                            Ok(Some(Err(e))) => return Some((Err(io::Error::other(e)), None)),
                            Ok(Some(Ok(frame))) => {
                                if let Ok(data) = frame.into_data() {
                                    if !data.is_empty() {
                                        return Some((Ok(data), Some((body, conn))));
                                    }
                                }
                            }
                        }
                    }
                });
                return Ok(Some(BlobStream {
                    length,
                    body: Box::pin(stream),
                }));
            }
            // Not the blob: read the (small) answer for the message, the challenge or the redirect.
            let mut buf = Vec::new();
            let read = async {
                while let Some(Ok(frame)) = body.frame().await {
                    if let Ok(data) = frame.into_data() {
                        if buf.len() + data.len() > SMALL_BODY_MAX {
                            break;
                        }
                        buf.extend_from_slice(&data);
                    }
                }
            };
            let _ = tokio::time::timeout(REPLY_TIMEOUT, read).await;
            let reply = Reply {
                status: parts.status,
                headers: parts.headers,
                body: Bytes::from(buf),
            };
            match reply.status {
                StatusCode::NOT_FOUND => return Ok(None),
                StatusCode::UNAUTHORIZED if !challenged && elsewhere.is_none() => {
                    challenged = true;
                    self.answer_challenge(&reply, &scope).await?;
                }
                StatusCode::UNAUTHORIZED => return Err(self.unauthorized(&reply, Some(&scope))),
                s if s.is_redirection() => {
                    let loc = reply
                        .header("location")
                        .ok_or_else(|| self.protocol(&format!("redirected the {what} without a Location")))?;
                    match split_url(loc) {
                        Some((tls, auth, p)) if auth != self.host || tls != self.tls.is_some() => {
                            elsewhere = Some((tls, auth));
                            path = p;
                        }
                        _ => path = self.location_path(loc),
                    }
                }
                _ => return Err(self.refused(&reply, &what, Some(repository))),
            }
        }
        Err(self.protocol(&format!("redirected the {what} more than 8 times")))
    }

    /// `GET path` with the right to pull from `repository`; at most `max` bytes of body.
    async fn get(&self, path: &str, repository: &str, headers: HeaderMap, max: usize) -> Result<Reply> {
        self.call(
            Method::GET,
            path,
            Scope::Pull(repository.into()),
            headers,
            Payload::None,
            max,
        )
        .await
    }

    /// Up to `max` tags of `repository` (none when it does not exist).
    pub async fn tags(&self, repository: &str, max: usize) -> Result<Vec<String>> {
        let path = format!("/v2/{repository}/tags/list?n={max}");
        let r = self.get(&path, repository, HeaderMap::new(), SMALL_BODY_MAX).await?;
        match r.status {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => return Ok(Vec::new()),
            _ => return Err(self.refused(&r, &format!("the tag list of {repository}"), Some(repository))),
        }
        #[derive(serde::Deserialize)]
        struct Tags {
            tags: Option<Vec<String>>,
        }
        let t: Tags = self.json(&r.body, &format!("the tag list of {repository}"), "a tag list")?;
        let mut tags = t.tags.unwrap_or_default();
        tags.truncate(max);
        Ok(tags)
    }

    /// A small blob's bytes (at most `max`), or `None` when the registry does not serve it here.
    pub async fn small_blob(&self, repository: &str, digest: &str, max: usize) -> Result<Option<Bytes>> {
        let path = format!("/v2/{repository}/blobs/{digest}");
        let r = self.get(&path, repository, HeaderMap::new(), max).await?;
        if !r.status.is_success() || format!("sha256:{}", sha256_hex(&r.body)) != digest {
            return Ok(None);
        }
        Ok(Some(r.body))
    }

    /// Put a manifest under `reference` (a tag, or its own digest); returns its digest, which the
    /// registry must confirm.
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<String> {
        let digest = format!("sha256:{}", sha256_hex(&body));
        let path = format!("/v2/{repository}/manifests/{reference}");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(media_type).map_err(|_| Error::internal(format!("media type {media_type:?}")))?,
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len() as u64));
        let r = self
            .call(
                Method::PUT,
                &path,
                Scope::Push(repository.into()),
                headers,
                Payload::Bytes(body),
                SMALL_BODY_MAX,
            )
            .await?;
        if r.status != StatusCode::CREATED {
            return Err(self.refused(
                &r,
                &format!("PUT of manifest {repository}:{reference} ({digest})"),
                Some(repository),
            ));
        }
        self.confirm_digest(&r, &digest, &format!("manifest {repository}:{reference}"))?;
        Ok(digest)
    }

    // ---- plumbing --------------------------------------------------------------------------

    /// Send a request, answering one auth challenge (replayable payloads only: a streamed body
    /// goes out after its scope's auth was settled by the request before it).
    async fn call(
        &self,
        method: Method,
        path: &str,
        scope: Scope,
        headers: HeaderMap,
        payload: Payload,
        max_body: usize,
    ) -> Result<Reply> {
        let mut payload = Some(payload);
        let mut challenged = false;
        let mut asked = false;
        // When the body's last chunk went out (a streamed body only).
        let progress = Arc::new(Mutex::new(Instant::now()));
        loop {
            let auth = self.authorization(&scope).await?;
            let p = payload.take().unwrap_or(Payload::None);
            let (body, replay, streamed) = match p {
                Payload::None => (Empty::new().map_err(|e| match e {}).boxed(), Some(Payload::None), false),
                Payload::Bytes(b) => (
                    Full::new(b.clone()).map_err(|e| match e {}).boxed(),
                    Some(Payload::Bytes(b)),
                    false,
                ),
                Payload::Stream(rx) => (stream_body(rx, progress.clone()), None, true),
            };
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(header::HOST, &self.host)
                .header(header::USER_AGENT, concat!("bkbundle/", env!("CARGO_PKG_VERSION")))
                .body(body)
                .map_err(|e| Error::internal(format!("request {method} {path}: {e}")))?;
            req.headers_mut().extend(headers.clone());
            if let Some(a) = &auth {
                req.headers_mut().insert(header::AUTHORIZATION, a.clone());
            }
            if streamed {
                req.headers_mut()
                    .insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            }
            let stamp = streamed.then(|| progress.clone());
            let reply = self.send(req, max_body, stamp, &format!("{method} {path}")).await?;
            if reply.status == StatusCode::UNAUTHORIZED {
                if let Some(again) = replay {
                    if !challenged {
                        challenged = true;
                        self.answer_challenge(&reply, &scope).await?;
                        payload = Some(again);
                        continue;
                    }
                    // A token service hands out anonymous tokens (Harbor, distribution's): the
                    // challenge is answered without asking, and only the registry's refusal of
                    // the anonymous token shows that credentials are needed. Ask then, as for
                    // basic auth, and try again with a token for the user.
                    if !asked && self.credentials.is_none() && self.prompt && insufficient_scope(&reply) {
                        asked = true;
                        self.ask_for_bearer().await?;
                        payload = Some(again);
                        continue;
                    }
                }
                return Err(self.unauthorized(&reply, Some(&scope)));
            }
            if let Ok(mut a) = self.auth.lock() {
                if a.scheme == Scheme::Unknown {
                    a.scheme = Scheme::Open;
                }
            }
            return Ok(reply);
        }
    }

    /// The `Authorization` header for `scope` as far as the registry's scheme is known.
    async fn authorization(&self, scope: &Scope) -> Result<Option<HeaderValue>> {
        let scheme = self.auth.lock().map(|a| a.scheme.clone()).unwrap_or_default();
        match scheme {
            Scheme::Unknown | Scheme::Open => Ok(None),
            Scheme::Basic => Ok(self.current_credentials().map(|c| basic(&c))),
            Scheme::Bearer { realm, service } => {
                let key = scope.key();
                // A push token of a repository serves its pulls too.
                let wider = match scope {
                    Scope::Pull(r) => Some(Scope::Push(r.clone()).key()),
                    _ => None,
                };
                let cached = self.auth.lock().ok().and_then(|a| {
                    a.tokens
                        .get(&key)
                        .or_else(|| wider.as_ref().and_then(|w| a.tokens.get(w)))
                        .cloned()
                });
                let token = match cached {
                    Some(t) => t,
                    None => self.fetch_token(&realm, service.as_deref(), scope).await?,
                };
                Ok(Some(bearer(&token)?))
            }
        }
    }

    fn current_credentials(&self) -> Option<Credentials> {
        self.credentials
            .clone()
            .or_else(|| self.auth.lock().ok().and_then(|a| a.asked.clone()))
    }

    /// Learn the scheme from a 401's `WWW-Authenticate`, and get what it asks for.
    async fn answer_challenge(&self, reply: &Reply, scope: &Scope) -> Result<()> {
        let header = reply.header("www-authenticate").unwrap_or("").to_string();
        let challenges = http_auth::parse_challenges(&header).map_err(|e| {
            self.protocol(&format!(
                "asked for credentials with a WWW-Authenticate header that does not parse ({e}): {header:?}"
            ))
        })?;
        let bearer_c = challenges.iter().find(|c| c.scheme.eq_ignore_ascii_case("bearer"));
        let basic_c = challenges.iter().find(|c| c.scheme.eq_ignore_ascii_case("basic"));
        if let Some(c) = bearer_c {
            let param = |name: &str| {
                c.params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_unescaped())
            };
            let realm =
                param("realm").ok_or_else(|| self.protocol("asked for a bearer token without naming its realm"))?;
            let service = param("service");
            if let Ok(mut a) = self.auth.lock() {
                a.scheme = Scheme::Bearer {
                    realm: realm.clone(),
                    service: service.clone(),
                };
            }
            self.fetch_token(&realm, service.as_deref(), scope).await?;
            return Ok(());
        }
        if basic_c.is_some() {
            if self.current_credentials().is_none() {
                let asked = self.ask_credentials()?;
                if let Ok(mut a) = self.auth.lock() {
                    a.asked = Some(asked);
                }
            }
            if let Ok(mut a) = self.auth.lock() {
                a.scheme = Scheme::Basic;
            }
            return Ok(());
        }
        Err(Error::new(
            Kind::Unsupported,
            format!(
                "registry {}: asks for an authentication scheme bkbundle does not speak: {header:?}",
                self.display()
            ),
        )
        .hint("registries are reached with Basic or Bearer (token) auth; check the registry's auth configuration"))
    }

    /// Credentials for the bearer flow, asked for once (parallel requests wait for the answer),
    /// after which the anonymous tokens are dropped.
    async fn ask_for_bearer(&self) -> Result<()> {
        let _one = self.asking.lock().await;
        let have = self.auth.lock().map(|a| a.asked.is_some()).unwrap_or(false);
        if have {
            return Ok(());
        }
        let asked = self.ask_credentials()?;
        if let Ok(mut a) = self.auth.lock() {
            a.asked = Some(asked);
            a.tokens.clear();
        }
        Ok(())
    }

    /// Credentials from the terminal, when allowed; else the error that says how to give them.
    fn ask_credentials(&self) -> Result<Credentials> {
        #[cfg(test)]
        if let Some(ask) = self.asker {
            return Ok(ask());
        }
        let needs = || {
            Error::external(format!("registry {} asks for credentials and none were given", self.display())).hint(format!(
                "give --registry-user USER with --registry-password-file FILE (or BKBUNDLE_REGISTRY_PASSWORD), or run docker login {}",
                self.host
            ))
        };
        if !self.prompt {
            return Err(needs());
        }
        let user = {
            use std::io::Write;
            eprint!("User for {}: ", self.host);
            let _ = io::stderr().flush();
            let mut line = String::new();
            io::stdin().read_line(&mut line).map_err(|_| needs())?;
            line.trim().to_string()
        };
        if user.is_empty() {
            return Err(needs());
        }
        let password = super::prompt_password(&self.host, &user)?;
        Ok(Credentials {
            username: user,
            password,
            source: "prompt".into(),
        })
    }

    /// A bearer token for `scope` from `realm` (with the credentials when there are any).
    async fn fetch_token(&self, realm: &str, service: Option<&str>, scope: &Scope) -> Result<String> {
        let mut query: Vec<String> = Vec::new();
        if let Some(s) = service {
            query.push(format!("service={}", encode(s)));
        }
        for s in scope.strings() {
            query.push(format!("scope={}", encode(&s)));
        }
        let (tls, authority, mut path) = split_url(realm)
            .ok_or_else(|| self.protocol(&format!("names a token realm that is not an http(s) URL: {realm:?}")))?;
        if !query.is_empty() {
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str(&query.join("&"));
        }
        if tls && self.tls.is_none() && authority == self.host {
            return Err(Error::input(format!(
                "registry {}: its token service {realm} is HTTPS while --registry-insecure is plain HTTP",
                self.display()
            ))
            .hint("drop --registry-insecure and give --registry-ca if its certificate is from a private CA"));
        }
        let creds = self.current_credentials();
        if creds.is_some() && !tls && !self.insecure {
            // A TLS registry whose token service is plain HTTP: the password would cross the
            // network in the clear. Only an operator who chose plain HTTP gets that.
            return Err(Error::input(format!(
                "registry {}: its token service {realm} is plain HTTP: the password would cross the network unencrypted",
                self.display()
            ))
            .hint("serve the token service over HTTPS (the registry's auth.token.realm), or accept plain HTTP with --registry-insecure"));
        }
        let req = get_request(&path, &authority, creds.as_ref().map(basic))?;
        let conn = if tls {
            let (t, trust) = self.realm_tls(realm)?;
            self.connect(&authority, Some(&t), &trust).await?
        } else {
            self.connect(&authority, None, "").await?
        };
        let reply = self
            .exchange(conn, req, SMALL_BODY_MAX, None, &format!("token request to {realm}"))
            .await?
            .0;
        if reply.status == StatusCode::UNAUTHORIZED || reply.status == StatusCode::FORBIDDEN {
            return Err(self.token_refused(&reply, realm));
        }
        if !reply.status.is_success() {
            return Err(self.refused(&reply, &format!("token request to {realm}"), None));
        }
        #[derive(serde::Deserialize)]
        struct TokenReply {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: TokenReply = self.json(&reply.body, &format!("the token request to {realm}"), "a token")?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.protocol(&format!("token service {realm} answered without a token")))?;
        if let Ok(mut a) = self.auth.lock() {
            a.tokens.insert(scope.key(), token.clone());
        }
        Ok(token)
    }

    /// The TLS settings for a token service over HTTPS: the registry's, or when the registry is
    /// plain HTTP (`--registry-insecure`), the CA file's or the system's CAs.
    fn realm_tls(&self, realm: &str) -> Result<(Tls, String)> {
        if let Some(t) = &self.tls {
            return Ok((t.clone(), self.trust.clone()));
        }
        if let Some(t) = self.realm_tls.lock().ok().and_then(|t| t.clone()) {
            return Ok(t);
        }
        let t = tls_settings(realm, self.ca_file.as_deref())?;
        if let Ok(mut slot) = self.realm_tls.lock() {
            *slot = Some(t.clone());
        }
        Ok(t)
    }

    /// A pooled connection to the registry, or a new one.
    async fn conn(&self) -> Result<Conn> {
        loop {
            let c = self.pool.lock().ok().and_then(|mut p| p.pop());
            match c {
                Some(mut c) => {
                    if c.is_closed() {
                        continue;
                    }
                    if c.ready().await.is_ok() {
                        return Ok(c);
                    }
                }
                None => return self.connect(&self.host, self.tls.as_ref(), &self.trust).await,
            }
        }
    }

    /// A new HTTP/1.1 connection to `authority`: TLS with `tls` (trusting what `trust` names)
    /// when given, else plain.
    async fn connect(&self, authority: &str, tls: Option<&Tls>, trust: &str) -> Result<Conn> {
        let addr = match host_and_port(authority) {
            (_, Some(_)) => authority.to_string(),
            (h, None) => format!("{h}:{}", if tls.is_some() { 443 } else { 80 }),
        };
        let unreachable = |why: String| {
            Error::external(format!("registry {}: cannot connect to {addr}: {why}", self.display()))
                .hint("check that the registry runs and that this host reaches it (address, port, firewall)")
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
            .await
            .map_err(|_| unreachable(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs())))?
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let io = if let Some(t) = tls {
            let name = host_and_port(authority).0.trim_start_matches('[').trim_end_matches(']');
            let server_name = rustls_pki_types::ServerName::try_from(name.to_string()).map_err(|_| {
                Error::input(format!(
                    "registry {}: {name:?} is not a host name for TLS",
                    self.display()
                ))
            })?;
            let connector = tokio_rustls::TlsConnector::from(t.config.clone());
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name, tcp))
                .await
                .map_err(|_| unreachable("no TLS handshake within the timeout".into()))?
                .map_err(|e| self.tls_error(&addr, e, trust))?;
            Either::Right(stream)
        } else {
            Either::Left(tcp)
        };
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| unreachable(format!("HTTP handshake: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    /// The TLS handshake failed: say why in the operator's words.
    fn tls_error(&self, addr: &str, e: io::Error, trust: &str) -> Error {
        let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
        let (why, hint) = match inner {
            Some(rustls::Error::InvalidCertificate(c)) => match c {
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature => (
                    format!("its certificate is not signed by {trust}"),
                    "give --registry-ca FILE with the CA that signs the registry's certificate".to_string(),
                ),
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. } => {
                    (
                        format!("its certificate is not for the name {}", self.host),
                        "reach the registry by a name its certificate carries (or reissue it with this name)"
                            .to_string(),
                    )
                }
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => (
                    "its certificate has expired".to_string(),
                    "renew the registry's certificate (check this host's clock too)".to_string(),
                ),
                other => (
                    format!("its certificate is refused: {other:?}"),
                    "check the registry's certificate".to_string(),
                ),
            },
            Some(other) => (
                format!("TLS failed: {other}"),
                "if the registry speaks plain HTTP, add --registry-insecure".to_string(),
            ),
            None => (
                format!("TLS failed: {e}"),
                "if the registry speaks plain HTTP, add --registry-insecure".to_string(),
            ),
        };
        Error::external(format!("registry {} ({addr}): {why}", self.display())).hint(hint)
    }

    /// One request on a pooled connection, the connection returned to the pool after its reply.
    async fn send(
        &self,
        req: Request<Body>,
        max_body: usize,
        progress: Option<Arc<Mutex<Instant>>>,
        what: &str,
    ) -> Result<Reply> {
        let conn = self.conn().await?;
        let (reply, conn) = self.exchange(conn, req, max_body, progress, what).await?;
        if let Some(c) = conn {
            if let Ok(mut p) = self.pool.lock() {
                p.push(c);
            }
        }
        Ok(reply)
    }

    /// Send `req` on `conn` and read the reply (at most `max_body` bytes of body; the rest makes
    /// the connection unusable, so it is dropped). Returns the connection when reusable.
    async fn exchange(
        &self,
        mut conn: Conn,
        req: Request<Body>,
        max_body: usize,
        progress: Option<Arc<Mutex<Instant>>>,
        what: &str,
    ) -> Result<(Reply, Option<Conn>)> {
        let head_only = req.method() == Method::HEAD;
        let failed = |e: String| {
            let mut err = Error::external(format!("registry {}: {what}: {e}", self.display()));
            if self.insecure && e.contains("invalid HTTP") {
                err = err.hint("the registry does not answer plain HTTP: drop --registry-insecure (it may speak TLS)");
            } else {
                err = err.hint("check that the registry runs; run the command again to resume");
            }
            err
        };
        let fut = conn.send_request(req);
        let resp = match &progress {
            // A streamed body: given up only when it makes no progress for STALL_TIMEOUT.
            Some(stamp) => {
                let mut fut = std::pin::pin!(fut);
                loop {
                    tokio::select! {
                        r = &mut fut => break r,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {
                            let idle = stamp.lock().map(|t| t.elapsed()).unwrap_or_default();
                            if idle > STALL_TIMEOUT {
                                return Err(failed(format!("no progress for {} s", STALL_TIMEOUT.as_secs())));
                            }
                        }
                    }
                }
            }
            None => tokio::time::timeout(REPLY_TIMEOUT, fut)
                .await
                .map_err(|_| failed(format!("no answer within {} s", REPLY_TIMEOUT.as_secs())))?,
        }
        .map_err(|e| failed(crate::error::chain(&e)))?;
        let (parts, mut body) = resp.into_parts();
        let mut buf = Vec::new();
        let mut complete = true;
        if !head_only {
            let read = async {
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| failed(format!("reading the answer: {e}")))?;
                    if let Ok(data) = frame.into_data() {
                        if buf.len() + data.len() > max_body {
                            complete = false;
                            break;
                        }
                        buf.extend_from_slice(&data);
                    }
                }
                Ok::<_, Error>(())
            };
            tokio::time::timeout(REPLY_TIMEOUT, read)
                .await
                .map_err(|_| failed(format!("the answer did not end within {} s", REPLY_TIMEOUT.as_secs())))??;
        }
        if !complete && parts.status.is_success() {
            return Err(failed(format!("the answer is larger than {max_body} bytes")));
        }
        let reusable = complete && !conn.is_closed();
        Ok((
            Reply {
                status: parts.status,
                headers: parts.headers,
                body: Bytes::from(buf),
            },
            reusable.then_some(conn),
        ))
    }

    /// A `Location` as a path on this registry (absolute URLs keep their path and query).
    fn location_path(&self, loc: &str) -> String {
        match split_url(loc) {
            Some((_, _, path)) => path,
            None if loc.starts_with('/') => loc.to_string(),
            None => format!("/{loc}"),
        }
    }

    /// The registry answered with a digest other than the one sent.
    fn confirm_digest(&self, r: &Reply, expected: &str, what: &str) -> Result<()> {
        match r.header("docker-content-digest") {
            Some(d) if d != expected => Err(Error::external(format!(
                "registry {}: {what}: it answered with digest {d}, expected {expected}",
                self.display()
            ))
            .hint("the registry (or a proxy in front of it) changed the data; check it, then run push again")),
            _ => Ok(()),
        }
    }

    /// A JSON answer to `request`, which should be `kind`; else an error naming both.
    fn json<T: serde::de::DeserializeOwned>(&self, body: &[u8], request: &str, kind: &str) -> Result<T> {
        serde_json::from_slice(body)
            .map_err(|e| self.protocol(&format!("answered {request} with a body that is not {kind}: {e}")))
    }

    fn protocol(&self, what: &str) -> Error {
        Error::external(format!("registry {} {what}", self.display()))
            .hint("check that the address is an OCI distribution registry (Harbor, registry:2)")
    }

    /// The registry answered `401` to a request for `scope` even with the auth it asked for. A
    /// bearer token that was accepted but grants too little (`error="insufficient_scope"`, what
    /// distribution answers to an anonymous token, or to a user without the right) is told apart
    /// from credentials that are wrong.
    fn unauthorized(&self, r: &Reply, scope: Option<&Scope>) -> Error {
        let codes = error_codes(&r.body);
        if let (true, Some(scope)) = (insufficient_scope(r), scope) {
            let what = scope.describe();
            return match self.current_credentials() {
                Some(c) => Error::external(format!(
                    "registry {}: user {} (credentials from {}) may not {what}: the token it was given does not grant it: {} {}",
                    self.display(),
                    c.username,
                    c.source,
                    r.status,
                    codes
                ))
                .hint(format!(
                    "the password was accepted, the right is missing: grant {} pull and push on {} in the registry's token service (on Harbor: a project member with the Developer role or more), or push under a --registry prefix the user may write to",
                    c.username,
                    scope.repository().unwrap_or("the repository")
                )),
                None => Error::external(format!(
                    "registry {} asks for credentials to {what} and none were given: its token service gave an anonymous token, which does not allow it: {} {}",
                    self.display(),
                    r.status,
                    codes
                ))
                .hint("give --registry-user USER with --registry-password-file FILE, or run docker login to the registry"),
            };
        }
        match self.current_credentials() {
            Some(c) => Error::external(format!(
                "registry {}: refused user {} (credentials from {}): {} {}",
                self.display(),
                c.username,
                c.source,
                r.status,
                codes
            ))
            .hint("check the user name and password (docker login to the registry tests them)"),
            None => Error::external(format!(
                "registry {} asks for credentials and none were given: {} {}",
                self.display(),
                r.status,
                codes
            ))
            .hint("give --registry-user USER with --registry-password-file FILE, or run docker login to the registry"),
        }
    }

    /// The token service (`realm`) refused to issue a token: wrong credentials, or none where it
    /// wants some.
    fn token_refused(&self, r: &Reply, realm: &str) -> Error {
        let codes = error_codes(&r.body);
        match self.current_credentials() {
            Some(c) => Error::external(format!(
                "registry {}: its token service {realm} refused user {} (credentials from {}): {} {}",
                self.display(),
                c.username,
                c.source,
                r.status,
                codes
            ))
            .hint("check the user name and password (docker login to the registry tests them)"),
            None => Error::external(format!(
                "registry {} asks for credentials and none were given: its token service {realm} answered {} {}",
                self.display(),
                r.status,
                codes
            ))
            .hint("give --registry-user USER with --registry-password-file FILE, or run docker login to the registry"),
        }
    }

    /// Any other refusal: the status, the registry's error codes, a hint per status.
    fn refused(&self, r: &Reply, what: &str, repository: Option<&str>) -> Error {
        let codes = error_codes(&r.body);
        let msg = format!("registry {}: {what}: {} {}", self.display(), r.status, codes);
        let hint = match r.status.as_u16() {
            401 => return self.unauthorized(r, None),
            400 if self.insecure && codes.contains("HTTPS server") => {
                "the registry speaks TLS: drop --registry-insecure (and give --registry-ca if its CA is private)".to_string()
            }
            403 => format!(
                "the user may not push to {} (ask the registry's admin for push rights, or create the project first on Harbor)",
                repository.unwrap_or("this repository")
            ),
            404 => "the repository (or Harbor project) does not exist and the registry does not create it: create it first".to_string(),
            413 => "the registry (or a proxy before it, e.g. nginx client_max_body_size) refuses bodies this large: raise its limit".to_string(),
            507 => "the registry's storage is full: free space on it, then run push again (it resumes)".to_string(),
            400 if codes.contains("NAME_INVALID") || codes.contains("TAG_INVALID") => {
                "the registry refuses this name: rename the image in the recipe or choose another --registry prefix".to_string()
            }
            400 if codes.contains("DIGEST_INVALID") => {
                "the registry computed another digest than the one sent (data changed on the way): run push again".to_string()
            }
            s if s >= 500 => "the registry failed: check its log and storage, then run push again (it resumes)".to_string(),
            _ => "see the registry's error above; run push again once it is fixed (it resumes)".to_string(),
        };
        Error::external(msg).hint(hint)
    }
}

/// The TLS settings for `host`: trusting the CA file when given, else the system's CAs; with
/// the words that name that trust in messages.
fn tls_settings(host: &str, ca_file: Option<&std::path::Path>) -> Result<(Tls, String)> {
    let mut roots = rustls::RootCertStore::empty();
    let trust = if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| Error::io("reading the registry CA file", ca, e))?;
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .filter_map(|c| c.ok())
            .collect();
        if certs.is_empty() {
            return Err(Error::input(format!("{}: holds no PEM certificate", ca.display()))
                    .hint("give --registry-ca a PEM file (-----BEGIN CERTIFICATE-----) of the CA that signs the registry's certificate"));
        }
        for c in certs {
            roots.add(c).map_err(|e| {
                Error::input(format!("{}: not a usable CA certificate: {e}", ca.display()))
                    .hint("give --registry-ca a PEM file of the CA that signs the registry's certificate")
            })?;
        }
        format!("the CA in {}", ca.display())
    } else {
        let found = rustls_native_certs::load_native_certs();
        for c in found.certs {
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(Error::input(format!(
                "registry {host}: this host has no CA certificates to check its TLS certificate with"
            ))
            .hint(
                "give --registry-ca FILE (the CA that signs the registry's certificate), or install ca-certificates",
            ));
        }
        "the system's CAs".to_string()
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((
        Tls {
            config: Arc::new(config),
        },
        trust,
    ))
}

/// `host:port` → (host, port); `[v6]:port` → ("[v6]", port); no port → (authority, None).
fn host_and_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((h, p)) if (!h.contains(':') || (h.starts_with('[') && h.ends_with(']'))) => match p.parse::<u16>() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

fn content_length_zero() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    h
}

fn basic(c: &Credentials) -> HeaderValue {
    use base64::Engine;
    let raw = zeroize::Zeroizing::new(format!("{}:{}", c.username, c.password.as_str()));
    let enc = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(raw.as_bytes()));
    let mut v = HeaderValue::from_str(&format!("Basic {}", enc.as_str())).unwrap_or(HeaderValue::from_static("Basic"));
    v.set_sensitive(true);
    v
}

fn bearer(token: &str) -> Result<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| Error::external("the registry's token service issued a token that is not a header value"))?;
    v.set_sensitive(true);
    Ok(v)
}

/// A streamed request body from a channel of chunks; an `Err` aborts the request.
fn stream_body(rx: mpsc::Receiver<io::Result<Bytes>>, progress: Arc<Mutex<Instant>>) -> Body {
    let s = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }).map(
        move |r| {
            if let Ok(mut t) = progress.lock() {
                *t = Instant::now();
            }
            r.map(Frame::data)
        },
    );
    BodyExt::boxed(StreamBody::new(s))
}

/// The `errors` of a distribution error body, as `CODE: message; ...` (or the body's start).
fn error_codes(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errs {
        errors: Vec<E>,
    }
    #[derive(serde::Deserialize)]
    struct E {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(e) = serde_json::from_slice::<Errs>(body) {
        let parts: Vec<String> = e
            .errors
            .into_iter()
            .map(|e| match (e.code, e.message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c,
                (None, Some(m)) => m,
                (None, None) => String::new(),
            })
            .filter(|s| !s.is_empty())
            .collect();
        if !parts.is_empty() {
            return format!("({})", parts.join("; "));
        }
    }
    let text: String = String::from_utf8_lossy(body).chars().take(200).collect();
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!("({})", text.replace('\n', " "))
    }
}

/// `http(s)://authority/path?query` → (tls, authority, path-and-query).
fn split_url(url: &str) -> Option<(bool, String, String)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return None;
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path
    };
    Some((tls, authority.to_string(), path))
}

/// Percent-encoding of a query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One image `check_images` looks for: where it is placed and the image id it must have.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub placement: Placement,
    /// `sha256:<hex>`: the bundle's image id (the config blob's digest).
    pub image_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// The tag's manifest names the bundle's config: the image is there.
    Present { manifest_digest: String },
    /// No such tag (or repository).
    Missing,
    /// The tag names another image.
    Other { config_digest: String },
}

/// Whether each of `wanted` is in the registry with the bundle's image id (by its tag; a
/// reference by digest only is looked up by that digest). An unreachable registry or refused
/// credentials is an error for all.
pub async fn check_images(client: &Client, target: &Target, wanted: &[Wanted]) -> Result<Vec<Presence>> {
    let _ = target;
    client.ping().await?;
    let mut out = Vec::with_capacity(wanted.len());
    for w in wanted {
        let reference = match (&w.placement.tag, w.placement.reference.rsplit_once('@')) {
            (Some(t), _) => t.clone(),
            (None, Some((_, d))) => d.to_string(),
            (None, None) => "latest".to_string(),
        };
        let found = client.manifest(&w.placement.repository, &reference).await?;
        out.push(match found {
            None => Presence::Missing,
            Some(m) => match m.config_digest {
                Some(c) if c == w.image_id => Presence::Present {
                    manifest_digest: m.digest,
                },
                Some(c) => Presence::Other { config_digest: c },
                None => Presence::Other {
                    config_digest: format!("(an index, {}, not an image manifest)", m.media_type),
                },
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split() {
        assert_eq!(
            split_url("https://auth.local:5001/token?x=1"),
            Some((true, "auth.local:5001".into(), "/token?x=1".into()))
        );
        assert_eq!(split_url("http://r"), Some((false, "r".into(), "/".into())));
        assert_eq!(split_url("/v2/x"), None);
        assert_eq!(encode("repository:a/b:pull,push"), "repository%3Aa%2Fb%3Apull%2Cpush");
        assert_eq!(host_and_port("r.local:5000"), ("r.local", Some(5000)));
        assert_eq!(host_and_port("r.local"), ("r.local", None));
        assert_eq!(host_and_port("[::1]:443"), ("[::1]", Some(443)));
        assert_eq!(host_and_port("[::1]"), ("[::1]", None));
    }

    #[test]
    fn error_bodies_are_summarised() {
        let b = br#"{"errors":[{"code":"NAME_INVALID","message":"invalid repository name","detail":{}}]}"#;
        assert_eq!(error_codes(b), "(NAME_INVALID: invalid repository name)");
        assert_eq!(error_codes(b""), "");
        assert_eq!(
            error_codes(b"<html>413 Request Entity Too Large</html>\n"),
            "(<html>413 Request Entity Too Large</html>)"
        );
    }

    /// How the fake registry misbehaves.
    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        None,
        WrongDigest,
        TooLarge,
        Full,
    }

    /// A registry answering from memory: bearer auth (alice / pw) through its own token
    /// endpoint, uploads as distribution does them, and one fault. As distribution with a token
    /// server: a request without credentials gets an anonymous token that only opens `/v2/`, and
    /// alice may only pull from `readonly/...`; a token short of the right is refused with
    /// `error="insufficient_scope"`.
    async fn fake(fault: Fault) -> String {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let realm = format!("http://{addr}/token");
        // A storage backend blobs are redirected to: the same server under another authority.
        let storage = format!(
            "http://localhost:{}/storage/blob",
            listener.local_addr().unwrap().port()
        );
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let realm = realm.clone();
                let storage = storage.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let realm = realm.clone();
                        let storage = storage.clone();
                        async move {
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let path = req.uri().path().to_string();
                            let query = req.uri().query().unwrap_or("").to_string();
                            let method = req.method().clone();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let mut r = http::Response::builder();
                            let reply = |r: http::response::Builder, status: u16, body: &str| {
                                Ok::<_, std::convert::Infallible>(
                                    r.status(status).body(Full::new(Bytes::from(body.to_string()))).unwrap(),
                                )
                            };
                            if path == "/storage/blob" {
                                // Credentials never follow a redirect to another host.
                                return if auth.is_empty() {
                                    reply(r, 200, "from storage")
                                } else {
                                    reply(r, 400, "credentials sent to the storage backend")
                                };
                            }
                            if path == "/token" {
                                // alice:pw
                                if auth == "Basic YWxpY2U6cHc=" && query.contains("service=fake") {
                                    return reply(r, 200, r#"{"token":"T0K"}"#);
                                }
                                if auth.is_empty() && query.contains("service=fake") {
                                    return reply(r, 200, r#"{"token":"ANON"}"#);
                                }
                                return reply(
                                    r,
                                    401,
                                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
                                );
                            }
                            let writes = matches!(method.as_str(), "POST" | "PATCH" | "PUT" | "DELETE");
                            let short = (auth == "Bearer ANON" && path != "/v2/")
                                || (auth == "Bearer T0K" && path.starts_with("/v2/readonly/") && writes);
                            if short {
                                r = r.header(
                                    "www-authenticate",
                                    format!("Bearer realm=\"{realm}\",service=\"fake\",scope=\"repository:x:pull,push\",error=\"insufficient_scope\""),
                                );
                                return reply(
                                    r,
                                    401,
                                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
                                );
                            }
                            if auth != "Bearer T0K" && auth != "Bearer ANON" {
                                r = r.header(
                                    "www-authenticate",
                                    format!("Bearer realm=\"{realm}\",service=\"fake\",scope=\"repository:x:pull\""),
                                );
                                return reply(r, 401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
                            }
                            match (method.as_str(), path.as_str()) {
                                ("GET", "/v2/") => reply(r, 200, "{}"),
                                ("GET", p) if p.ends_with("/blobs/sha256:direct") => reply(r, 200, "direct"),
                                ("GET", p) if p.ends_with("/blobs/sha256:moved") => {
                                    r = r.header("location", storage);
                                    reply(r, 307, "")
                                }
                                ("POST", p) if p.ends_with("/blobs/uploads/") => {
                                    r = r.header("location", format!("{p}u1?_state=s"));
                                    reply(r, 202, "")
                                }
                                ("PATCH", _) => {
                                    if fault == Fault::TooLarge {
                                        return reply(r, 413, "<html>413 Request Entity Too Large</html>");
                                    }
                                    r = r.header("range", format!("0-{}", body.len().saturating_sub(1)));
                                    r = r.header("location", format!("{path}?_state=t"));
                                    reply(r, 202, "")
                                }
                                ("PUT", _) if path.contains("/blobs/uploads/") => {
                                    if fault == Fault::Full {
                                        return reply(r, 507, "");
                                    }
                                    let d = query
                                        .split('&')
                                        .find_map(|kv| kv.strip_prefix("digest="))
                                        .unwrap_or("")
                                        .to_string();
                                    let d = if fault == Fault::WrongDigest {
                                        format!("sha256:{}", "0".repeat(64))
                                    } else {
                                        d
                                    };
                                    r = r.header("docker-content-digest", d);
                                    reply(r, 201, "")
                                }
                                ("DELETE", _) => reply(r, 204, ""),
                                _ => reply(r, 404, r#"{"errors":[{"code":"NOT_FOUND"}]}"#),
                            }
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn client(addr: &str, password: &str) -> Client {
        let mut c = Client::new(
            addr,
            &Access {
                insecure: true,
                ..Default::default()
            },
        )
        .unwrap();
        c.credentials = Some(Credentials {
            username: "alice".into(),
            password: zeroize::Zeroizing::new(password.into()),
            source: "test".into(),
        });
        c
    }

    /// Upload `data` through the client the way push does: a channel of chunks, then the digest.
    async fn upload(c: &Client, data: &'static [u8]) -> Result<Pushed> {
        upload_to(c, "site/app", data).await
    }

    async fn upload_to(c: &Client, repository: &str, data: &'static [u8]) -> Result<Pushed> {
        let (tx, rx) = mpsc::channel(2);
        let (dtx, drx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tx.send(Ok(Bytes::from_static(data))).await.unwrap();
            drop(tx);
            let _ = dtx.send(Ok((format!("sha256:{}", sha256_hex(data)), data.len() as u64)));
        });
        c.upload(repository, rx, drx, "layer L").await
    }

    #[tokio::test]
    async fn bearer_tokens_are_fetched_and_uploads_confirmed() {
        let addr = fake(Fault::None).await;
        let c = client(&addr, "pw");
        c.ping().await.unwrap();
        let p = upload(&c, b"hello layer").await.unwrap();
        assert_eq!(p.size, 11);
        assert_eq!(c.bytes_sent(), 11);
        assert_eq!(c.blob_size("site/app", &p.digest).await.unwrap(), None);
        let e = client(&addr, "wrong").ping().await.unwrap_err();
        assert!(e.message.contains("refused user alice"), "{}", e.message);
        assert!(
            e.message.contains(&format!("token service http://{addr}/token")),
            "the token service is named: {}",
            e.message
        );
        assert!(!format!("{e:?}").contains("wrong"), "the password is never shown");
    }

    /// Blobs stream after the auth challenge of a first request, through a redirect to another
    /// host (without the credentials), and an absent one is `None`.
    #[tokio::test(flavor = "multi_thread")]
    async fn blobs_stream_through_a_challenge_and_a_redirect() {
        let addr = fake(Fault::None).await;
        let c = client(&addr, "pw");
        async fn read(s: BlobStream) -> String {
            let chunks: Vec<io::Result<Bytes>> = s.body.collect().await;
            let bytes: Vec<u8> = chunks.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
            String::from_utf8(bytes).unwrap()
        }
        let s = c.blob_stream("site/app", "sha256:direct").await.unwrap().unwrap();
        assert_eq!(s.length, Some(6));
        assert_eq!(read(s).await, "direct");
        let s = c.blob_stream("site/app", "sha256:moved").await.unwrap().unwrap();
        assert_eq!(read(s).await, "from storage");
        assert!(c.blob_stream("site/app", "sha256:absent").await.unwrap().is_none());
    }

    /// A token that was issued but grants too little is not a wrong password: anonymous, the
    /// registry asks for credentials; a user without the right is told which one is missing.
    #[tokio::test]
    async fn tokens_short_of_the_right_are_told_apart_from_wrong_passwords() {
        let addr = fake(Fault::None).await;
        let anonymous = Client::new(
            &addr,
            &Access {
                insecure: true,
                ..Default::default()
            },
        )
        .unwrap();
        anonymous.ping().await.expect("an anonymous token opens /v2/");
        let e = upload(&anonymous, b"data").await.unwrap_err();
        assert!(
            e.message
                .contains("asks for credentials to push to site/app and none were given")
                && e.message.contains("anonymous token"),
            "{}",
            e.message
        );
        assert!(e.hints.iter().any(|h| h.contains("--registry-user")), "{:?}", e.hints);

        let e = upload_to(&client(&addr, "pw"), "readonly/app", b"data")
            .await
            .unwrap_err();
        assert!(
            e.message
                .contains("user alice (credentials from test) may not push to readonly/app"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("refused"), "{}", e.message);
        assert!(
            e.hints
                .iter()
                .any(|h| h.contains("password was accepted") && h.contains("readonly/app")),
            "{:?}",
            e.hints
        );
    }

    /// On a terminal, a registry that refuses the anonymous token makes bkbundle ask for
    /// credentials (as basic auth does), once for all parallel requests, and go on with them.
    #[tokio::test]
    async fn an_anonymous_token_refused_asks_for_credentials_once_on_a_terminal() {
        static ASKED: AtomicU64 = AtomicU64::new(0);
        let addr = fake(Fault::None).await;
        let mut c = Client::new(
            &addr,
            &Access {
                insecure: true,
                prompt: true,
                ..Default::default()
            },
        )
        .unwrap();
        c.asker = Some(|| {
            ASKED.fetch_add(1, Ordering::SeqCst);
            Credentials {
                username: "alice".into(),
                password: zeroize::Zeroizing::new("pw".into()),
                source: "prompt".into(),
            }
        });
        c.ping().await.unwrap();
        assert_eq!(ASKED.load(Ordering::SeqCst), 0, "/v2/ takes the anonymous token");
        let (a, b) = tokio::join!(upload(&c, b"one"), upload(&c, b"two"));
        a.unwrap();
        b.unwrap();
        assert_eq!(ASKED.load(Ordering::SeqCst), 1, "asked once");
        assert_eq!(c.bytes_sent(), 6);
    }

    /// A plain-HTTP registry (--registry-insecure) may send its clients to a token service over
    /// HTTPS on another host or port: its certificate is checked against --registry-ca, else the
    /// system's CAs (it was an internal error: no TLS settings).
    #[test]
    fn an_https_token_service_of_a_plain_registry_has_tls_settings() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["auth.local".to_string()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let with_ca = Client::new(
            "r.local:5000",
            &Access {
                insecure: true,
                ca_file: Some(ca.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(with_ca.tls.is_none(), "the registry itself stays plain HTTP");
        let (_, trust) = with_ca.realm_tls("https://auth.local:5001/token").unwrap();
        assert_eq!(trust, format!("the CA in {}", ca.display()));
        let tls = Client::new(
            "r.local:5000",
            &Access {
                ca_file: Some(ca.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        let (_, trust) = tls.realm_tls("https://auth.local:5001/token").unwrap();
        assert_eq!(
            trust, tls.trust,
            "a TLS registry's own settings serve its token service"
        );
    }

    #[tokio::test]
    async fn registry_faults_are_named() {
        let addr = fake(Fault::WrongDigest).await;
        let e = upload(&client(&addr, "pw"), b"data").await.unwrap_err();
        assert!(
            e.message.contains("answered with digest sha256:000") && e.message.contains("site/app"),
            "{}",
            e.message
        );
        let addr = fake(Fault::TooLarge).await;
        let e = upload(&client(&addr, "pw"), b"data").await.unwrap_err();
        assert!(
            e.message.contains("413") && e.message.contains("layer L"),
            "{}",
            e.message
        );
        assert!(
            e.hints.iter().any(|h| h.contains("client_max_body_size")),
            "{:?}",
            e.hints
        );
        let addr = fake(Fault::Full).await;
        let e = upload(&client(&addr, "pw"), b"data").await.unwrap_err();
        assert!(e.message.contains("507"), "{}", e.message);
        assert!(e.hints.iter().any(|h| h.contains("storage is full")), "{:?}", e.hints);
    }

    #[tokio::test]
    async fn a_password_never_goes_to_a_plain_http_token_service_of_a_tls_registry() {
        let mut c = client("127.0.0.1:1", "pw");
        c.insecure = false;
        let e = c
            .fetch_token("http://127.0.0.1:1/token", Some("s"), &Scope::Registry)
            .await
            .unwrap_err();
        assert!(
            e.message.contains("plain HTTP") && e.message.contains("unencrypted"),
            "{}",
            e.message
        );
        assert!(!format!("{e:?}").contains("pw\""));
    }

    #[test]
    fn scopes() {
        assert_eq!(
            Scope::Mount("a/b".into(), "c".into()).key(),
            "repository:a/b:pull,push repository:c:pull"
        );
        assert!(Scope::Registry.strings().is_empty());
    }
}
