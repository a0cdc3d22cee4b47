//! The server chain (check `server`): the agent's `server_url` reached as the agent reaches it,
//! link by link, stopping at the first broken link: name resolution → TCP → TLS (https) → HTTP,
//! then the clock against the server's `Date`.
//!
//! Every link is bounded by [`STEP`]: a host whose packets to the server are dropped is diagnosed
//! in seconds ("Connection timed out after 3000 milliseconds", curl's words, which operators
//! know from the agent's log).
//!
//! Compromises, and why:
//! - Resolution is the system resolver's (glibc's `files dns`, as the agent's own resolver reads
//!   them, on a thread nothing waits for: [`crate::portable::lookup_within`]); the stub of `dns.rs` runs beside it only for the evidence, so a name that
//!   resolves is never declared broken by the stub's view of it.
//! - The TLS verifier records its verdict and lets the handshake finish: one connection then
//!   shows both what is wrong with the certificate and, where the agent skips verification
//!   (`tls_skip_verify: true`, upstream's default), whether the HTTP path behind it works.
//! - HTTP is a GET written by hand, its status line and headers read (at most 16 KiB): any status
//!   proves the path; the body is never read.

use super::dns::{self, Sources};
use super::{AgentConfig, STEP};
use crate::doctor::{Finding, Severity};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const CHECK: &str = "server";
/// The agent's endpoint under the region's NODE_SERVER_URL.
const AGENT_ENDPOINT: &str = "/api/v1/node_mgmt/open_api/node";
/// The most of an HTTP answer read: the status line and headers.
const HEAD_LIMIT: usize = 16 * 1024;
/// The most resolved addresses tried.
const MAX_ADDRESSES: usize = 8;
/// Clock skew beyond which the installer refuses (and the agent's TLS may fail), and beyond
/// which it is worth a warning.
const SKEW_ERROR: i64 = 300;
const SKEW_WARNING: i64 = 60;
/// The system CA bundles, Debian/Ubuntu/Alpine, RHEL/CentOS/Kylin/UOS, SUSE: those that exist
/// are trusted, as Go (the agent) trusts them.
const CA_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
];
/// How the platform host sets a region's values.
const REGIONS_APPLY: &str = "bkbundle regions apply --bundle BUNDLE --config install.toml --env-file TARGET/.env";

/// What the chain reads from the host besides the network: the resolver's files and the CA
/// bundles (a test's own in tests).
#[derive(Debug, Clone)]
pub(super) struct HostFiles {
    pub dns: Sources,
    pub ca_bundles: Vec<PathBuf>,
}

impl HostFiles {
    pub fn system() -> HostFiles {
        HostFiles {
            dns: Sources::system(),
            ca_bundles: CA_BUNDLES.iter().map(PathBuf::from).collect(),
        }
    }
}

/// Reach the agent's server at `url` as the agent does; see the module documentation.
pub(super) async fn server_chain(cfg: &AgentConfig, url: &str, out: &mut Vec<Finding>) {
    chain_with(&HostFiles::system(), cfg, url, out).await
}

async fn chain_with(files: &HostFiles, cfg: &AgentConfig, url: &str, out: &mut Vec<Finding>) {
    let u = match ServerUrl::parse(url) {
        Ok(u) => u,
        Err(e) => {
            // config.rs has checked it; this is the safety net, not a diagnosis.
            out.push(Finding::new(
                CHECK,
                Severity::Error,
                format!("server {url}"),
                format!("not a usable server URL: {e}"),
            ));
            return;
        }
    };
    // What the links so far found, shown with every later finding.
    let mut trail = Vec::new();
    let Some(addrs) = resolve(files, &u, &mut trail, out).await else {
        return;
    };
    let Some(tcp) = connect(&u, &addrs, &mut trail, out).await else {
        return;
    };
    let (head, agent_refuses) = if u.https {
        let (roots, trusted) = trust(cfg.ca_file.as_deref(), &files.ca_bundles);
        let (mut tls, verdict) = match handshake(tcp, &u.host, roots).await {
            Ok(t) => t,
            Err(why) => {
                let mut f = Finding::new(CHECK, Severity::Error, format!("server {} (TLS)", u.url), why);
                for e in &trail {
                    f.evidence(e.clone());
                }
                f.fix(format!(
                    "is {} the server's TLS port? `curl -vk {}` on this host; if the server speaks plain HTTP there, the region's NODE_SERVER_URL must be http:// ({REGIONS_APPLY}, then reinstall this agent)",
                    u.host_port(),
                    u.url
                ));
                out.push(f);
                return;
            }
        };
        let refuses = judge_tls(cfg, &u, &verdict, &trusted, &mut trail, out);
        (request(&mut tls, &u).await, refuses)
    } else {
        let mut tcp = tcp;
        (request(&mut tcp, &u).await, false)
    };
    // Where the agent refuses the certificate, it never gets to HTTP: no HTTP finding. The
    // clock is still read, as an expired or not-yet-valid verdict may be this host's clock.
    if !agent_refuses {
        judge_http(&u, &head, &trail, out);
    }
    if let Ok(h) = &head {
        if let Some(f) = clock(h.date.as_deref(), SystemTime::now(), &u) {
            out.push(f);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The URL

/// The parts of the server URL the links use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ServerUrl {
    pub url: String,
    pub https: bool,
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
    /// Path and query, `/` at least.
    pub path: String,
}

impl ServerUrl {
    pub fn parse(url: &str) -> Result<ServerUrl, String> {
        let url = url.trim();
        let (scheme, rest) = url.split_once("://").ok_or("no scheme (http:// or https://)")?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            other => return Err(format!("scheme {other:?} is neither http nor https")),
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let authority = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("an IPv6 address without its closing ]")?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        let port = match port {
            None | Some("") => {
                if https {
                    443
                } else {
                    80
                }
            }
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("port {p:?} is not a port number"))?,
        };
        let tail = tail.split('#').next().unwrap_or_default();
        let path = if tail.is_empty() {
            "/".to_string()
        } else if tail.starts_with('?') {
            format!("/{tail}")
        } else {
            tail.to_string()
        };
        Ok(ServerUrl {
            url: url.to_string(),
            https,
            host: host.to_string(),
            port,
            path,
        })
    }

    /// `HOST:PORT`, brackets around an IPv6 address.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The `Host` header: the port only when it is not the scheme's.
    fn host_header(&self) -> String {
        if self.port == if self.https { 443 } else { 80 } {
            if self.host.contains(':') {
                format!("[{}]", self.host)
            } else {
                self.host.clone()
            }
        } else {
            self.host_port()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Name resolution

/// The URL's addresses: the host itself when it is an IP address, else resolved as the agent
/// resolves it; the finding when it does not resolve.
async fn resolve(
    files: &HostFiles,
    u: &ServerUrl,
    trail: &mut Vec<String>,
    out: &mut Vec<Finding>,
) -> Option<Vec<SocketAddr>> {
    if let Ok(ip) = u.host.parse::<IpAddr>() {
        return Some(vec![SocketAddr::new(ip, u.port)]);
    }
    // The stub asks beside the resolver, and is dropped unheard when the name resolves: a clean
    // host does not wait on a dead nameserver for evidence nobody reads.
    let lookup = crate::portable::lookup_within(&u.host, u.port, STEP);
    let stub = dns::evidence(&files.dns, &u.host);
    tokio::pin!(lookup, stub);
    let mut evidence = None;
    let looked = loop {
        tokio::select! {
            r = &mut lookup => break r,
            e = &mut stub, if evidence.is_none() => evidence = Some(e),
        }
    };
    let why = match looked {
        Ok(found) => {
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for a in found {
                if !addrs.contains(&a) && addrs.len() < MAX_ADDRESSES {
                    addrs.push(a);
                }
            }
            if !addrs.is_empty() {
                trail.push(format!("{} resolved to {}", u.host, list_ips(&addrs)));
                return Some(addrs);
            }
            "it resolved to no address".to_string()
        }
        Err(e) => e.to_string(),
    };
    let mut f = Finding::new(
        CHECK,
        Severity::Error,
        format!("server {} (name resolution)", u.host),
        format!("Could not resolve host: {}", u.host),
    );
    f.evidence(format!("this host's resolver (/etc/hosts, then DNS): {why}"));
    let evidence = match evidence {
        Some(e) => e,
        None => stub.await,
    };
    for e in evidence {
        f.evidence(e);
    }
    f.fix(format!(
        "on this agent host add a line `IP {host}` to /etc/hosts (IP: the platform host's address agents use), or a DNS record for {host} on the nameservers above; or make the region's NODE_SERVER_URL an address agents reach (on the platform host: {REGIONS_APPLY}) and reinstall this agent",
        host = u.host
    ));
    out.push(f);
    None
}

fn list_ips(addrs: &[SocketAddr]) -> String {
    addrs.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ")
}

// ---------------------------------------------------------------------------------------------
// TCP

/// Why one address did not connect.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TcpFailure {
    TimedOut,
    Refused,
    Unreachable(String),
    Other(String),
}

fn tcp_failure(e: &std::io::Error) -> TcpFailure {
    match e.kind() {
        ErrorKind::ConnectionRefused => TcpFailure::Refused,
        ErrorKind::TimedOut => TcpFailure::TimedOut,
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => TcpFailure::Unreachable(e.to_string()),
        _ => TcpFailure::Other(e.to_string()),
    }
}

/// A TCP connection to the first of `addrs` to accept (all tried at once, each once, within
/// [`STEP`]; the others are not waited for, as the agent's dialer does not); the finding when
/// none does.
async fn connect(
    u: &ServerUrl,
    addrs: &[SocketAddr],
    trail: &mut Vec<String>,
    out: &mut Vec<Finding>,
) -> Option<TcpStream> {
    use futures_util::StreamExt as _;
    let mut attempts: futures_util::stream::FuturesUnordered<_> = addrs
        .iter()
        .map(|&a| async move {
            let r = match tokio::time::timeout(STEP, TcpStream::connect(a)).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(tcp_failure(&e)),
                Err(_) => Err(TcpFailure::TimedOut),
            };
            (a, r)
        })
        .collect();
    let mut connected = None;
    let mut failed = Vec::new();
    while let Some((a, r)) = attempts.next().await {
        match r {
            Ok(s) => {
                connected = Some((a, s));
                break;
            }
            Err(why) => failed.push((a, why)),
        }
    }
    let describe = |a: &SocketAddr, why: &TcpFailure| match why {
        TcpFailure::TimedOut => format!("{a}: no answer within {} ms", STEP.as_millis()),
        TcpFailure::Refused => format!("{a}: connection refused"),
        TcpFailure::Unreachable(e) | TcpFailure::Other(e) => format!("{a}: {e}"),
    };
    if let Some((a, s)) = connected {
        trail.push(format!("TCP connected to {a}"));
        // The agent falls back to the address that answers, as this check did.
        trail.extend(failed.iter().map(|(a, why)| describe(a, why)));
        return Some(s);
    }
    let any = |p: fn(&TcpFailure) -> bool| failed.iter().any(|(_, w)| p(w));
    let port = u.port;
    let firewalld = format!("`firewall-cmd --permanent --add-port={port}/tcp && firewall-cmd --reload`");
    let first = addrs.first().map(|a| a.ip().to_string()).unwrap_or_default();
    let (message, fix) = if any(|w| *w == TcpFailure::TimedOut) {
        (
            format!(
                "Connection timed out after {} milliseconds: nothing answered on port {port} (the packets are dropped on the way: a firewall or a missing route)",
                STEP.as_millis()
            ),
            format!(
                "open TCP port {port} from this agent host to {}: the platform host's firewall ({firewalld}) and any firewall in between; check the route from here with `ip route get {first}`",
                u.host
            ),
        )
    } else if any(|w| *w == TcpFailure::Refused) {
        (
            format!("Connection refused: nothing listens on port {port} of {}, or a firewall rejects the connection", u.host),
            format!(
                "on the platform host: is its web entry published on port {port} (`bkbundle doctor`, `docker compose ps`)? Is the region's NODE_SERVER_URL's port the published one? A firewall that rejects: {firewalld}"
            ),
        )
    } else if any(|w| matches!(w, TcpFailure::Unreachable(_))) {
        (
            format!("No route to host: {} is unreachable from this host", u.host_port()),
            format!(
                "check this host's route to {first} (`ip route get {first}`); firewalld on the platform host rejects with \"No route to host\" too: {firewalld}"
            ),
        )
    } else {
        (
            format!("could not connect to {}", u.host_port()),
            format!("check the network between this host and {}", u.host_port()),
        )
    };
    let mut f = Finding::new(
        CHECK,
        Severity::Error,
        format!("server {} (TCP)", u.host_port()),
        message,
    );
    for e in trail.iter() {
        f.evidence(e.clone());
    }
    for (a, why) in &failed {
        f.evidence(describe(a, why));
    }
    f.fix(fix);
    out.push(f);
    None
}

// ---------------------------------------------------------------------------------------------
// TLS

/// The CA bundles that exist and `ca_file`, as roots; evidence lines saying what is trusted.
pub(super) fn trust(ca_file: Option<&Path>, bundles: &[PathBuf]) -> (RootCertStore, Vec<String>) {
    let mut roots = RootCertStore::empty();
    let mut said = Vec::new();
    for b in bundles {
        // Absent bundles are the other distributions' paths: nothing to say.
        let Ok(pem) = std::fs::read(b) else { continue };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem).filter_map(|c| c.ok()).collect();
        let (added, _) = roots.add_parsable_certificates(certs);
        said.push(format!("trusted: {} ({added} certificates)", b.display()));
    }
    if let Some(ca) = ca_file {
        match std::fs::read(ca) {
            Ok(pem) => {
                let certs: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(&pem).filter_map(|c| c.ok()).collect();
                let (added, _) = roots.add_parsable_certificates(certs);
                let what = if added == 0 {
                    "no usable certificate in it".to_string()
                } else {
                    ca_summary(&String::from_utf8_lossy(&pem))
                };
                said.push(format!("trusted: {} ({what})", ca.display()));
            }
            Err(e) => said.push(format!("{}: cannot be read ({e})", ca.display())),
        }
    }
    if said.is_empty() {
        said.push("trusted: nothing (no system CA bundle, no CA file in the agent's config)".into());
    }
    (roots, said)
}

/// What the first certificate of `pem` is, in one line.
pub(super) fn ca_summary(pem: &str) -> String {
    match crate::tls::inspect(pem) {
        Ok(i) => format!(
            "CN={}, issued by CN={}, valid {} to {}, sha256 {}",
            i.subject_cn,
            i.issuer_cn,
            crate::tls::date(i.not_before),
            crate::tls::date(i.not_after),
            i.sha256_fingerprint
        ),
        Err(e) => e,
    }
}

/// A DER certificate as PEM, for [`crate::tls::inspect`].
fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// What the peer presented and what verification said of it.
#[derive(Debug, Default)]
pub(super) struct Verdict {
    /// `None`: verified.
    pub error: Option<rustls::Error>,
    /// The end-entity certificate first.
    pub chain: Vec<CertificateDer<'static>>,
}

impl Verdict {
    /// The server's certificate in one line.
    pub fn presented(&self) -> String {
        match self.chain.first() {
            None => "no certificate".into(),
            Some(der) => match crate::tls::inspect(&pem_of(der)) {
                Ok(i) => format!(
                    "CN={}, issued by CN={}, for {}, valid {} to {}, sha256 {}",
                    i.subject_cn,
                    i.issuer_cn,
                    if i.names.is_empty() {
                        "no subject alternative name".to_string()
                    } else {
                        i.names.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
                    },
                    crate::tls::date(i.not_before),
                    crate::tls::date(i.not_after),
                    i.sha256_fingerprint
                ),
                Err(e) => e,
            },
        }
    }
}

/// A verifier that runs webpki's verdict, keeps it and the chain, and lets the handshake finish
/// (the signatures of the handshake itself are still checked).
#[derive(Debug)]
struct Recording {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Verdict>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let error = match &self.webpki {
            Some(v) => v
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .err(),
            // No root at all: nothing can be verified.
            None => Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)),
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.error = error;
        seen.chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS handshake over `stream` for `host` within [`STEP`], the certificate judged against
/// `roots` but accepted either way (see [`Recording`]); the error in words when there is no TLS.
pub(super) async fn handshake<S>(
    stream: S,
    host: &str,
    roots: RootCertStore,
) -> Result<(tokio_rustls::client::TlsStream<S>, Verdict), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = if roots.is_empty() {
        None
    } else {
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .ok()
    };
    let recording = Arc::new(Recording {
        webpki,
        provider: provider.clone(),
        seen: Mutex::new(Verdict::default()),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS cannot be set up: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(recording.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = match tokio::time::timeout(STEP, connector.connect(name, stream)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(handshake_failure(&e)),
        Err(_) => {
            return Err(format!(
                "no TLS handshake within {} ms: the server accepted the connection but did not answer TLS",
                STEP.as_millis()
            ))
        }
    };
    let verdict = std::mem::take(&mut *recording.seen.lock().unwrap_or_else(|p| p.into_inner()));
    Ok((tls, verdict))
}

fn handshake_failure(e: &std::io::Error) -> String {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidMessage(_)) => {
            format!("no TLS handshake: the server does not speak TLS on this port ({e})")
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("no TLS handshake: the server refused it with the alert {alert:?}")
        }
        Some(r) => format!("no TLS handshake: {r}"),
        None if e.kind() == ErrorKind::UnexpectedEof => {
            "no TLS handshake: the server closed the connection during it".to_string()
        }
        None => format!("no TLS handshake: {e}"),
    }
}

/// What is wrong with a certificate for `host`, in words, and its fix.
pub(super) fn distrust(e: &rustls::Error, host: &str, ca_file: Option<&Path>) -> (String, String) {
    let ca_fix = format!(
        "give this agent the CA that signed the server's certificate: copy the platform host's TARGET/certs/ca.crt to {} (or add it to this host's trust store: `cp ca.crt /etc/pki/ca-trust/source/anchors/ && update-ca-trust`; Debian/Ubuntu: /usr/local/share/ca-certificates/ and `update-ca-certificates`)",
        ca_file.map(|p| p.display().to_string()).unwrap_or_else(|| "the agent's certs/ca.crt".into())
    );
    let clock_fix =
        "renew the server's certificate; if this host's clock is wrong instead, set it (see the server clock finding)";
    let when = |t: &UnixTime| crate::tls::date(SystemTime::UNIX_EPOCH + Duration::from_secs(t.as_secs()));
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => (
                "unknown issuer: no CA this host trusts signed the server's certificate".into(),
                ca_fix,
            ),
            CertificateError::NotValidForName => (
                format!("name mismatch: the certificate is not for {}", host),
                format!(
                    "use a NODE_SERVER_URL whose host the certificate names, or issue the server's certificate for {}",
                    host
                ),
            ),
            CertificateError::NotValidForNameContext { presented, .. } => (
                format!(
                    "name mismatch: the certificate is for {}, not {}",
                    if presented.is_empty() {
                        "no name".to_string()
                    } else {
                        presented
                            .iter()
                            .map(|p| presented_name(p))
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    host
                ),
                format!(
                    "use a NODE_SERVER_URL whose host the certificate names, or issue the server's certificate for {}",
                    host
                ),
            ),
            CertificateError::Expired => ("expired".into(), clock_fix.into()),
            CertificateError::ExpiredContext { time, not_after } => (
                format!("expired on {}; this host's clock says {}", when(not_after), when(time)),
                clock_fix.into(),
            ),
            CertificateError::NotValidYet => ("not yet valid".into(), clock_fix.into()),
            CertificateError::NotValidYetContext { time, not_before } => (
                format!(
                    "not valid before {}; this host's clock says {}",
                    when(not_before),
                    when(time)
                ),
                clock_fix.into(),
            ),
            other => (format!("{other:?}"), ca_fix),
        },
        other => (other.to_string(), ca_fix),
    }
}

/// A name as rustls presents it (`DnsName("x")`, `IpAddress(10.0.0.5)`), as operators write it.
fn presented_name(p: &str) -> String {
    let inner = p
        .strip_prefix("DnsName(")
        .or_else(|| p.strip_prefix("IpAddress("))
        .and_then(|r| r.strip_suffix(')'));
    inner.unwrap_or(p).trim_matches('"').to_string()
}

/// The TLS link's finding, when verification failed; whether the agent refuses the server
/// (it verifies, and verification failed).
fn judge_tls(
    cfg: &AgentConfig,
    u: &ServerUrl,
    verdict: &Verdict,
    trusted: &[String],
    trail: &mut Vec<String>,
    out: &mut Vec<Finding>,
) -> bool {
    let Some(e) = &verdict.error else {
        trail.push(format!("TLS verified: {}", verdict.presented()));
        return false;
    };
    let (why, fix) = distrust(e, &u.host, cfg.ca_file.as_deref());
    let (severity, message) = if cfg.tls_skip_verify {
        (
            Severity::Warning,
            format!("the server's certificate does not verify ({why}); the agent skips verification (tls_skip_verify: true), so it still connects"),
        )
    } else {
        (
            Severity::Error,
            format!("the server's certificate does not verify ({why}): the agent (tls_skip_verify: false) refuses the server"),
        )
    };
    let mut f = Finding::new(CHECK, severity, format!("server {} (TLS)", u.url), message);
    for t in trail.iter() {
        f.evidence(t.clone());
    }
    f.evidence(format!("the server's certificate: {}", verdict.presented()));
    for t in trusted {
        f.evidence(t.clone());
    }
    f.fix(fix);
    out.push(f);
    trail.push(format!("TLS not verified ({why}): {}", verdict.presented()));
    !cfg.tls_skip_verify
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// An HTTP answer's status line and the headers the checks use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head {
    pub status: u16,
    pub status_line: String,
    pub date: Option<String>,
    pub location: Option<String>,
    pub server: Option<String>,
}

/// Why there is no HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NoAnswer {
    Timeout,
    Closed,
    Failed(String),
    /// The first bytes, escaped.
    NotHttp(String),
}

/// One GET of the URL's path over `s`; its status line and headers, within [`STEP`].
async fn request<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, u: &ServerUrl) -> Result<Head, NoAnswer> {
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bkbundle-doctor\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        u.path,
        u.host_header()
    );
    let exchange = async {
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| NoAnswer::Failed(e.to_string()))?;
        s.flush().await.map_err(|e| NoAnswer::Failed(e.to_string()))?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            let n = match s.read(&mut chunk).await {
                Ok(n) => n,
                Err(e) if buf.is_empty() => return Err(NoAnswer::Failed(e.to_string())),
                // A close without TLS close_notify after the head: what was read stands.
                Err(_) => 0,
            };
            if n == 0 {
                break;
            }
            let room = HEAD_LIMIT.saturating_sub(buf.len());
            buf.extend_from_slice(chunk.get(..n.min(room)).unwrap_or_default());
            let seen = buf.len().min(5);
            if buf.get(..seen) != b"HTTP/".get(..seen) {
                return Err(NoAnswer::NotHttp(escaped(&buf)));
            }
            if buf.len() >= HEAD_LIMIT
                || buf.windows(4).any(|w| w == b"\r\n\r\n")
                || buf.windows(2).any(|w| w == b"\n\n")
            {
                break;
            }
        }
        if buf.is_empty() {
            return Err(NoAnswer::Closed);
        }
        parse_head(&buf).ok_or_else(|| NoAnswer::NotHttp(escaped(&buf)))
    };
    match tokio::time::timeout(STEP, exchange).await {
        Ok(r) => r,
        Err(_) => Err(NoAnswer::Timeout),
    }
}

/// The first bytes of an answer, printable.
fn escaped(b: &[u8]) -> String {
    let head = b.get(..b.len().min(64)).unwrap_or_default();
    head.escape_ascii().to_string()
}

/// The status line and headers of an HTTP answer's head; `None` when it is not HTTP.
pub(super) fn parse_head(buf: &[u8]) -> Option<Head> {
    let text = String::from_utf8_lossy(buf);
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let status_line = lines.next()?.to_string();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?;
    let code = parts.next()?;
    if !version.starts_with("HTTP/") || code.len() != 3 {
        return None;
    }
    let status = code.parse::<u16>().ok().filter(|s| (100..=999).contains(s))?;
    let mut head = Head {
        status,
        status_line: status_line.clone(),
        date: None,
        location: None,
        server: None,
    };
    for line in lines {
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = Some(value.trim().chars().take(200).collect::<String>());
        match name.trim().to_ascii_lowercase().as_str() {
            "date" => head.date = value,
            "location" => head.location = value,
            "server" => head.server = value,
            _ => {}
        }
    }
    Some(head)
}

/// The HTTP link's finding: info with the status when the path is proven, a warning when the
/// server answers but fails or does not know the path, an error when nothing HTTP answers.
fn judge_http(u: &ServerUrl, head: &Result<Head, NoAnswer>, trail: &[String], out: &mut Vec<Finding>) {
    let subject = format!("server {} (HTTP)", u.url);
    let doctor = "on the platform host: `bkbundle doctor` (the server's containers, their health and logs)";
    let mut f = match head {
        Ok(h) if h.status == 404 => {
            let mut f = Finding::new(
                CHECK,
                Severity::Warning,
                subject,
                format!(
                    "HTTP {}: the server answers, but not at {}: the URL's prefix may be wrong",
                    h.status, u.path
                ),
            );
            f.fix(format!(
                "server_url is the region's NODE_SERVER_URL followed by {AGENT_ENDPOINT}: NODE_SERVER_URL must be where the platform's web entry answers (with the path prefix of any proxy in front of it); check it on the platform host with `bkbundle doctor`, set it with `{REGIONS_APPLY}`, then reinstall this agent"
            ));
            f
        }
        Ok(h) if h.status >= 500 => {
            let mut f = Finding::new(
                CHECK,
                Severity::Warning,
                subject,
                format!("HTTP {}: the server answers but fails", h.status),
            );
            f.fix(doctor);
            f
        }
        Ok(h) => Finding::new(
            CHECK,
            Severity::Info,
            subject,
            format!("HTTP {}: the server answers at this URL", h.status),
        ),
        Err(why) => {
            let message = match why {
                NoAnswer::Timeout => format!(
                    "no HTTP answer within {} ms: the connection was accepted but nothing answered (is {} the server's port? a proxy in between that holds the request?)",
                    STEP.as_millis(),
                    u.port
                ),
                NoAnswer::Closed => "no HTTP answer: the connection was closed without one".to_string(),
                NoAnswer::Failed(e) => format!("no HTTP answer: {e}"),
                NoAnswer::NotHttp(first) if !u.https && (first.starts_with("\\x15\\x03") || first.starts_with("\\x16\\x03")) => {
                    format!("no HTTP answer: the port speaks TLS (it answered {first}): the URL should be https://")
                }
                NoAnswer::NotHttp(first) => format!("no HTTP answer: the port answered `{first}`, which is not HTTP"),
            };
            let mut f = Finding::new(CHECK, Severity::Error, subject, message);
            f.fix(format!(
                "check that {} is the platform's web entry (the region's NODE_SERVER_URL): `curl -v {}` on this host; {doctor}",
                u.host_port(),
                u.url
            ));
            f
        }
    };
    for t in trail {
        f.evidence(t.clone());
    }
    if let Ok(h) = head {
        f.evidence(format!("status line: {}", h.status_line));
        if let Some(l) = &h.location {
            f.evidence(format!("Location: {l}"));
        }
        if let Some(s) = &h.server {
            f.evidence(format!("Server: {s}"));
        }
    }
    out.push(f);
}

// ---------------------------------------------------------------------------------------------
// The clock

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 7231 7.1.1.1) as seconds since 1970.
pub(super) fn parse_http_date(s: &str) -> Option<i64> {
    let (_weekday, rest) = s.trim().split_once(", ")?;
    let f: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, hms, "GMT"] = f.as_slice() else {
        return None;
    };
    let month = MONTHS.iter().position(|m| m == month)?;
    let month = time::Month::try_from(u8::try_from(month + 1).ok()?).ok()?;
    let date = time::Date::from_calendar_date(year.parse().ok()?, month, day.parse().ok()?).ok()?;
    let mut t = hms.split(':');
    let (h, m, sec) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if t.next().is_some() || day.len() != 2 || year.len() != 4 {
        return None;
    }
    let time = time::Time::from_hms(h, m, sec).ok()?;
    Some(time::PrimitiveDateTime::new(date, time).assume_utc().unix_timestamp())
}

/// Seconds since 1970 as `YYYY-MM-DD HH:MM:SS` (UTC), what `date -u -s` takes.
fn utc(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{secs} s after 1970"),
    }
}

/// A skew in words: `412 s (7 min)`.
fn span(secs: i64) -> String {
    let a = secs.unsigned_abs();
    match a {
        0..=119 => format!("{a} s"),
        120..=7199 => format!("{a} s ({} min)", a / 60),
        7200..=172_799 => format!("{a} s ({} h)", a / 3600),
        _ => format!("{a} s ({} days)", a / 86_400),
    }
}

/// The clock's finding: this host's time against the server's `Date` (`now`: this host's time
/// when the answer came).
fn clock(date: Option<&str>, now: SystemTime, u: &ServerUrl) -> Option<Finding> {
    let subject = "server clock";
    let Some(date) = date else {
        return Some(Finding::new(
            CHECK,
            Severity::Info,
            subject,
            format!("not checked: the server's answer at {} has no Date header", u.url),
        ));
    };
    let Some(server) = parse_http_date(date) else {
        let mut f = Finding::new(
            CHECK,
            Severity::Info,
            subject,
            "not checked: the server's Date header is not an HTTP date",
        );
        f.evidence(format!("Date: {date}"));
        return Some(f);
    };
    let here = match now.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let skew = server.saturating_sub(here);
    let severity = match skew.unsigned_abs() {
        s if s > SKEW_ERROR as u64 => Severity::Error,
        s if s > SKEW_WARNING as u64 => Severity::Warning,
        _ => return None,
    };
    let direction = if skew > 0 { "behind" } else { "ahead of" };
    let consequence = if severity == Severity::Error {
        format!("the installer refuses more than {SKEW_ERROR} s, and the agent's TLS may fail")
    } else {
        format!("more than {SKEW_WARNING} s; the installer refuses more than {SKEW_ERROR} s")
    };
    let mut f = Finding::new(
        CHECK,
        severity,
        subject,
        format!(
            "this host's clock is {} {direction} the server's: {consequence}",
            span(skew)
        ),
    );
    f.evidence(format!("the server's Date: {date} (from {})", u.url))
        .evidence(format!("this host's clock: {} UTC", utc(here)))
        .fix(format!(
            "synchronise this host's clock: `chronyc makestep` where chronyd runs, `ntpdate NTP-SERVER`, or set it by hand to the server's time: `date -u -s '{}'`",
            utc(server)
        ));
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{generate_ca, issue_server, Name, Policy, CA_CN};
    use std::time::Instant;
    use tokio::net::TcpListener;

    #[test]
    fn urls_are_taken_apart() {
        let u = ServerUrl::parse("https://bklite.corp:8443/api/v1/node_mgmt/open_api/node").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.path.as_str()),
            (true, "bklite.corp", 8443, "/api/v1/node_mgmt/open_api/node")
        );
        assert_eq!(u.host_header(), "bklite.corp:8443");
        let u = ServerUrl::parse("http://[fd00::5]/x?y=1#frag").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("fd00::5", 80, "/x?y=1"));
        assert_eq!(
            (u.host_port(), u.host_header()),
            ("[fd00::5]:80".into(), "[fd00::5]".into())
        );
        let u = ServerUrl::parse("HTTPS://user:pw@10.0.0.5").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("10.0.0.5", 443, "/"));
        for bad in [
            "null/api/v1",
            "ftp://x/",
            "http://:80/",
            "http://h:99999/",
            "http://[::1/",
        ] {
            assert!(ServerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn http_heads_and_dates_are_read() {
        let h = parse_head(
            b"HTTP/1.1 401 Unauthorized\r\nServer: nginx\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\nbody",
        )
        .unwrap();
        assert_eq!(h.status, 401);
        assert_eq!(h.server.as_deref(), Some("nginx"));
        assert_eq!(parse_http_date(h.date.as_deref().unwrap()), Some(784_111_777));
        assert!(parse_head(b"SSH-2.0-OpenSSH_8.0\r\n").is_none());
        assert!(parse_head(b"HTTP/1.1 20 OK\r\n").is_none());
        assert_eq!(utc(784_111_777), "1994-11-06 08:49:37");
        for bad in [
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun, 06 Nov 1994 08:49:37 +0000",
            "Sun, 31 Feb 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
    }

    fn url(port: u16, path: &str) -> ServerUrl {
        ServerUrl::parse(&format!("http://127.0.0.1:{port}{path}")).unwrap()
    }

    #[test]
    fn the_clock_is_an_error_beyond_300_s_and_a_warning_beyond_60_s() {
        let u = url(1, "/");
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert!(clock(Some(date), at(784_111_777 + 60), &u).is_none());
        let f = clock(Some(date), at(784_111_777 + 61), &u).unwrap();
        assert_eq!(f.severity, Severity::Warning);
        let f = clock(Some(date), at(784_111_777 - 7200), &u).unwrap();
        assert_eq!((f.severity, f.subject.as_str()), (Severity::Error, "server clock"));
        assert_eq!(
            f.message,
            "this host's clock is 7200 s (2 h) behind the server's: the installer refuses more than 300 s, and the agent's TLS may fail"
        );
        assert_eq!(f.evidence[1], "this host's clock: 1994-11-06 06:49:37 UTC");
        assert!(
            f.fix.as_deref().unwrap().contains("date -u -s '1994-11-06 08:49:37'"),
            "{f:?}"
        );
        assert_eq!(clock(None, at(0), &u).unwrap().severity, Severity::Info);
        assert_eq!(clock(Some("yesterday"), at(0), &u).unwrap().severity, Severity::Info);
    }

    /// Host files of the test's own: no hosts entry, a loopback nameserver that knows no name,
    /// no system CA.
    async fn files(dir: &Path) -> HostFiles {
        std::fs::write(dir.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        HostFiles {
            dns: Sources {
                hosts: dir.join("hosts"),
                resolv_conf: dir.join("resolv.conf"),
                dns_port: dns::fake::nameserver("known.invalid").await,
            },
            ca_bundles: vec![],
        }
    }

    /// A server on loopback that reads one request's head and answers `answer` (`None`: says
    /// nothing and holds the connection); the port and the request it got.
    async fn server(answer: Option<Vec<u8>>) -> (u16, tokio::sync::oneshot::Receiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            // Bounded: a TLS client hello has no blank line.
            let got = tokio::time::timeout(Duration::from_millis(300), read_head(&mut s))
                .await
                .unwrap_or_default();
            let _ = tx.send(got);
            match answer {
                Some(a) => {
                    let _ = s.write_all(&a).await;
                    let _ = s.shutdown().await;
                }
                None => tokio::time::sleep(Duration::from_secs(30)).await,
            }
        });
        (port, rx)
    }

    async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
        let mut got = Vec::new();
        let mut b = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&b[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    fn answer(status: &str, date: Option<String>) -> Vec<u8> {
        let date = date.map(|d| format!("Date: {d}\r\n")).unwrap_or_default();
        format!("HTTP/1.1 {status}\r\nServer: test\r\n{date}Content-Length: 2\r\n\r\n{{}}").into_bytes()
    }

    fn http_date(t: SystemTime) -> String {
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        let d = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
        let wd = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][d.weekday().number_days_from_monday() as usize];
        format!(
            "{wd}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
            d.day(),
            MONTHS[u8::from(d.month()) as usize - 1],
            d.year(),
            d.hour(),
            d.minute(),
            d.second()
        )
    }

    async fn run(files: &HostFiles, cfg: &AgentConfig, url: &str) -> (Vec<Finding>, Duration) {
        let t0 = Instant::now();
        let mut out = Vec::new();
        chain_with(files, cfg, url, &mut out).await;
        (out, t0.elapsed())
    }

    #[tokio::test]
    async fn an_answer_with_a_date_proves_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path()).await;
        let (port, got) = server(Some(answer(
            "405 Method Not Allowed",
            Some(http_date(SystemTime::now())),
        )))
        .await;
        let (out, _) = run(
            &f,
            &AgentConfig::default(),
            &format!("http://127.0.0.1:{port}{AGENT_ENDPOINT}"),
        )
        .await;
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!((out[0].severity, out[0].check), (Severity::Info, "server"));
        assert_eq!(
            out[0].subject,
            format!("server http://127.0.0.1:{port}{AGENT_ENDPOINT} (HTTP)")
        );
        assert_eq!(out[0].message, "HTTP 405: the server answers at this URL");
        assert_eq!(
            out[0].evidence,
            [
                format!("TCP connected to 127.0.0.1:{port}"),
                "status line: HTTP/1.1 405 Method Not Allowed".into(),
                "Server: test".into()
            ]
        );
        assert_eq!(
            got.await.unwrap(),
            format!("GET {AGENT_ENDPOINT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: bkbundle-doctor\r\nAccept: */*\r\nConnection: close\r\n\r\n")
        );
    }

    #[tokio::test]
    async fn a_skewed_date_is_a_clock_finding() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path()).await;
        let behind = SystemTime::now() - Duration::from_secs(900);
        let (port, _got) = server(Some(answer("200 OK", Some(http_date(behind))))).await;
        let (out, _) = run(&f, &AgentConfig::default(), &format!("http://127.0.0.1:{port}/")).await;
        let c = out.iter().find(|f| f.subject == "server clock").unwrap();
        assert_eq!(c.severity, Severity::Error);
        assert!(c.message.starts_with("this host's clock is 9"), "{c:#?}");
        assert!(c.message.contains(" ahead of the server's"), "{c:#?}");

        let (port, _got) = server(Some(answer("200 OK", None))).await;
        let (out, _) = run(&f, &AgentConfig::default(), &format!("http://127.0.0.1:{port}/")).await;
        let c = out.iter().find(|f| f.subject == "server clock").unwrap();
        assert_eq!(c.severity, Severity::Info);
    }

    #[tokio::test]
    async fn a_404_or_a_5xx_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path()).await;
        let (port, _got) = server(Some(answer("404 Not Found", Some(http_date(SystemTime::now()))))).await;
        let (out, _) = run(
            &f,
            &AgentConfig::default(),
            &format!("http://127.0.0.1:{port}/prefix{AGENT_ENDPOINT}"),
        )
        .await;
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].severity, Severity::Warning);
        assert_eq!(
            out[0].message,
            format!("HTTP 404: the server answers, but not at /prefix{AGENT_ENDPOINT}: the URL's prefix may be wrong")
        );
        assert!(out[0].fix.as_deref().unwrap().contains("NODE_SERVER_URL"));

        let (port, _got) = server(Some(answer("502 Bad Gateway", Some(http_date(SystemTime::now()))))).await;
        let (out, _) = run(&f, &AgentConfig::default(), &format!("http://127.0.0.1:{port}/")).await;
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(
            (out[0].severity, out[0].message.as_str()),
            (Severity::Warning, "HTTP 502: the server answers but fails")
        );
    }

    #[tokio::test]
    async fn a_server_that_says_nothing_is_bounded_by_a_step() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path()).await;
        let (port, _got) = server(None).await;
        let (out, took) = run(&f, &AgentConfig::default(), &format!("http://127.0.0.1:{port}/")).await;
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].severity, Severity::Error);
        assert!(out[0].message.starts_with("no HTTP answer within 3000 ms"), "{out:#?}");
        assert!(took >= STEP && took < STEP + Duration::from_secs(1), "{took:?}");
    }

    #[tokio::test]
    async fn garbage_instead_of_http_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path()).await;
        let (port, _got) = server(Some(b"SSH-2.0-OpenSSH_8.0\r\n".to_vec())).await;
        let (out, took) = run(&f, &AgentConfig::default(), &format!("http://127.0.0.1:{port}/")).await;
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].severity, Severity::Error);
        assert_eq!(
            out[0].message,
            "no HTTP answer: the port answered `SSH-2.0-OpenSSH_8.0\\r\\n`, which is not HTTP"
        );
        assert!(took < Duration::from_secs(1));
        // A TLS alert to a plain request: the URL should be https.
        let (port, _got) = server(Some(vec![0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x46])).await;
        let (out, _) = run(&f, &AgentConfig::default(), &format!("http://127.0.0.1:{port}/")).await;
        assert!(out[0].message.contains("the URL should be https://"), "{out:#?}");
    }

    #[tokio::test]
    async fn a_closed_port_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path()).await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (out, took) = run(&f, &AgentConfig::default(), &format!("http://127.0.0.1:{port}/")).await;
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].subject, format!("server 127.0.0.1:{port} (TCP)"));
        assert_eq!(
            out[0].message,
            format!(
                "Connection refused: nothing listens on port {port} of 127.0.0.1, or a firewall rejects the connection"
            )
        );
        assert_eq!(out[0].evidence, [format!("127.0.0.1:{port}: connection refused")]);
        assert!(took < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn dropped_syns_time_out_within_a_step() {
        // A listener whose accept queue is full drops further SYNs, as a firewall's DROP does.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = sock.listen(0).unwrap();
        let addr = l.local_addr().unwrap();
        let mut fill = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                fill.push(s);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path()).await;
        let (out, took) = run(&f, &AgentConfig::default(), &format!("http://{addr}/")).await;
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].subject, format!("server {addr} (TCP)"));
        assert!(
            out[0]
                .message
                .starts_with("Connection timed out after 3000 milliseconds"),
            "{out:#?}"
        );
        assert!(out[0]
            .fix
            .as_deref()
            .unwrap()
            .contains(&format!("--add-port={}/tcp", addr.port())));
        assert!(took < STEP + Duration::from_secs(1), "{took:?}");
        drop(l);
    }

    #[tokio::test]
    async fn an_unresolvable_name_shows_what_the_host_knows() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path()).await;
        let (out, took) = run(&f, &AgentConfig::default(), "http://bklite.invalid:8080/").await;
        assert_eq!(out.len(), 1, "{out:#?}");
        let e = &out[0];
        assert_eq!((e.severity, e.check), (Severity::Error, "server"));
        assert_eq!(e.subject, "server bklite.invalid (name resolution)");
        assert_eq!(e.message, "Could not resolve host: bklite.invalid");
        let d = dir.path().display();
        assert_eq!(
            e.evidence[1..],
            [
                format!("{d}/hosts: no entry for bklite.invalid"),
                format!("{d}/resolv.conf: nameserver 127.0.0.1"),
                "nameserver 127.0.0.1: bklite.invalid → NXDOMAIN (no such name)".to_string(),
            ]
        );
        assert!(
            e.fix.as_deref().unwrap().contains("`IP bklite.invalid` to /etc/hosts"),
            "{e:#?}"
        );
        assert!(took < STEP + Duration::from_secs(1), "{took:?}");
    }

    #[tokio::test]
    async fn a_name_that_resolves_does_not_wait_on_a_silent_nameserver() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = files(dir.path()).await;
        // Bound and never answering.
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        f.dns.dns_port = silent.local_addr().unwrap().port();
        let (port, _got) = server(Some(answer("200 OK", Some(http_date(SystemTime::now()))))).await;
        let (out, took) = run(&f, &AgentConfig::default(), &format!("http://localhost:{port}/")).await;
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].message, "HTTP 200: the server answers at this URL");
        assert!(out[0].evidence[0].starts_with("localhost resolved to "), "{out:#?}");
        assert!(took < dns::QUERY_TIMEOUT, "{took:?}");
    }

    /// A TLS server on loopback with a certificate for `names` from a new CA; answers one
    /// request with 200 and a Date. The port and the CA's PEM.
    async fn tls_server(names: &[&str]) -> (u16, String) {
        let now = SystemTime::now();
        let ca = generate_ca(CA_CN, now).unwrap();
        let names: Vec<Name> = names.iter().map(|n| Name::parse(n).unwrap()).collect();
        let m = issue_server(&ca, &names, &Policy::default(), now).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(m.cert_pem.as_bytes()).unwrap()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(m.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let Ok(mut s) = acceptor.accept(s).await else { return };
            read_head(&mut s).await;
            let _ = s
                .write_all(&answer("401 Unauthorized", Some(http_date(SystemTime::now()))))
                .await;
            let _ = s.shutdown().await;
        });
        (port, ca.cert_pem.clone())
    }

    #[tokio::test]
    async fn tls_verified_by_the_agents_ca_is_no_finding_but_the_http_one() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path()).await;
        let (port, ca) = tls_server(&["127.0.0.1"]).await;
        std::fs::write(dir.path().join("ca.crt"), &ca).unwrap();
        let cfg = AgentConfig {
            ca_file: Some(dir.path().join("ca.crt")),
            ..Default::default()
        };
        let (out, _) = run(&f, &cfg, &format!("https://127.0.0.1:{port}{AGENT_ENDPOINT}")).await;
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(
            (out[0].severity, out[0].message.as_str()),
            (Severity::Info, "HTTP 401: the server answers at this URL")
        );
        assert!(
            out[0].evidence[1].starts_with("TLS verified: CN=127.0.0.1, issued by CN=BK-Lite site CA, for 127.0.0.1"),
            "{out:#?}"
        );
    }

    #[tokio::test]
    async fn tls_from_an_unknown_ca_is_an_error_unless_the_agent_skips_verification() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path()).await;
        let (port, _ca) = tls_server(&["127.0.0.1"]).await;
        let url = format!("https://127.0.0.1:{port}/");
        let (out, _) = run(&f, &AgentConfig::default(), &url).await;
        assert_eq!(out.len(), 1, "the chain stops at TLS: {out:#?}");
        assert_eq!(
            (out[0].severity, out[0].subject.clone()),
            (Severity::Error, format!("server {url} (TLS)"))
        );
        assert_eq!(
            out[0].message,
            "the server's certificate does not verify (unknown issuer: no CA this host trusts signed the server's certificate): the agent (tls_skip_verify: false) refuses the server"
        );
        assert!(
            out[0]
                .evidence
                .iter()
                .any(|e| e.starts_with("the server's certificate: CN=127.0.0.1, issued by CN=BK-Lite site CA")),
            "{out:#?}"
        );
        assert!(out[0].fix.as_deref().unwrap().contains("TARGET/certs/ca.crt"));

        let (port, _ca) = tls_server(&["127.0.0.1"]).await;
        let cfg = AgentConfig {
            tls_skip_verify: true,
            ..Default::default()
        };
        let (out, _) = run(&f, &cfg, &format!("https://127.0.0.1:{port}/")).await;
        assert_eq!(out.len(), 2, "{out:#?}");
        assert_eq!(out[0].severity, Severity::Warning);
        assert!(out[0]
            .message
            .ends_with("the agent skips verification (tls_skip_verify: true), so it still connects"));
        assert_eq!(
            (out[1].severity, out[1].message.as_str()),
            (Severity::Info, "HTTP 401: the server answers at this URL")
        );
    }

    #[tokio::test]
    async fn tls_for_another_name_is_a_name_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path()).await;
        let (port, ca) = tls_server(&["10.0.0.5", "bklite.corp"]).await;
        std::fs::write(dir.path().join("ca.crt"), &ca).unwrap();
        let cfg = AgentConfig {
            ca_file: Some(dir.path().join("ca.crt")),
            ..Default::default()
        };
        let (out, _) = run(&f, &cfg, &format!("https://127.0.0.1:{port}/")).await;
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(
            out[0].message,
            "the server's certificate does not verify (name mismatch: the certificate is for 10.0.0.5, bklite.corp, not 127.0.0.1): the agent (tls_skip_verify: false) refuses the server"
        );
        assert_eq!(presented_name("DnsName(\"a.b\")"), "a.b");
        assert_eq!(presented_name("other"), "other");
    }

    #[tokio::test]
    async fn plain_http_behind_an_https_url_has_no_tls() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path()).await;
        let (port, _got) = server(Some(answer("400 Bad Request", None))).await;
        let (out, took) = run(&f, &AgentConfig::default(), &format!("https://127.0.0.1:{port}/")).await;
        assert_eq!(out.len(), 1, "{out:#?}");
        assert!(out[0].subject.ends_with("(TLS)"));
        assert!(
            out[0]
                .message
                .starts_with("no TLS handshake: the server does not speak TLS on this port"),
            "{out:#?}"
        );
        assert!(took < Duration::from_secs(1));
    }
}
