//! Reaching the platform's NATS the way the server does (BKLITE.md: `NATS_SERVERS` with an
//! optional `user:pass@`, user/password, token, credentials file, TLS with a private CA), with
//! each failure named by the stage it happened at.

use super::PackagesError;
use crate::error::chain;
use crate::install::config::NatsConfig;
use std::collections::BTreeMap;
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

/// Choose NATS: `--nats-url`, `NATS_URL`, `[nats] url`, the stack's .env (`NATS_PORT` on its
/// `INTERNAL_BIND_IP`, 127.0.0.1 by default). Credentials: `[nats]`, else the stack's
/// `NATS_USER`/`NATS_PASSWORD` (a URL's own `user:pass@` wins inside the client).
pub fn resolve_target(
    cli_url: Option<&str>,
    cfg: &NatsConfig,
    site: &BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<NatsTarget, PackagesError> {
    let sub = |v: &Option<String>, what: &str| -> Result<Option<String>, PackagesError> {
        let Some(v) = v else { return Ok(None) };
        let mut missing = Vec::new();
        let s = crate::install::envfile::substitute(v, site, &mut missing);
        if !missing.is_empty() {
            return Err(PackagesError::BadNatsConfig(format!(
                "[nats] {what}: placeholder(s) {} are not set",
                missing
                    .iter()
                    .map(|m| format!("${{{m}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(Some(s))
    };
    let (url, source) = if let Some(u) = cli_url.filter(|u| !u.trim().is_empty()) {
        (u.to_string(), "--nats-url".to_string())
    } else if let Some(u) = env("NATS_URL").filter(|u| !u.trim().is_empty()) {
        (u, "NATS_URL".to_string())
    } else if let Some(u) = sub(&cfg.url, "url")? {
        (u, "[nats] url of the install config".to_string())
    } else if site.contains_key("NATS_PORT")
        || site.contains_key("NATS_PASSWORD")
        || site.contains_key("NATS_ADMIN_PASSWORD")
    {
        let port = site.get("NATS_PORT").map(String::as_str).unwrap_or("4222");
        let host = crate::regions::db::stack_host(site);
        (
            format!("nats://{host}:{port}"),
            "the stack's .env (NATS_PORT, INTERNAL_BIND_IP)".to_string(),
        )
    } else {
        return Err(PackagesError::NoNats);
    };
    let urls: Vec<String> = url
        .split(',')
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .map(|u| {
            if u.contains("://") {
                u.to_string()
            } else {
                format!("nats://{u}")
            }
        })
        .collect();
    if urls.is_empty() {
        return Err(PackagesError::BadNatsConfig(format!(
            "{source}: no server URL in {url:?}"
        )));
    }
    // The demo stack names its account NATS_USER/NATS_PASSWORD; BK-Lite's own template has the
    // full-access account as NATS_ADMIN_USERNAME/NATS_ADMIN_PASSWORD.
    let (user_key, password_key) = if site.contains_key("NATS_USER") || !site.contains_key("NATS_ADMIN_USERNAME") {
        ("NATS_USER", "NATS_PASSWORD")
    } else {
        ("NATS_ADMIN_USERNAME", "NATS_ADMIN_PASSWORD")
    };
    let user = sub(&cfg.user, "user")?.or_else(|| site.get(user_key).cloned());
    let password = sub(&cfg.password, "password")?.or_else(|| site.get(password_key).cloned());
    Ok(NatsTarget {
        urls,
        source,
        user: user.filter(|u| !u.is_empty()),
        password,
        token: sub(&cfg.token, "token")?.filter(|t| !t.is_empty()),
        credentials: cfg.credentials.clone(),
        ca_file: cfg.ca_file.clone(),
        cert_file: cfg.cert_file.clone(),
        key_file: cfg.key_file.clone(),
    })
}

/// Host and port of a URL, for the name-resolution and TCP stages.
fn host_port(url: &str) -> (String, u16) {
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

/// Connect, staged: name resolution, TCP, then the NATS handshake (TLS, authentication). Bounded
/// retries with backoff on transient failures (refused/timed out).
pub async fn connect(t: &NatsTarget) -> Result<async_nats::Client, PackagesError> {
    let display = t.display();
    // Stages 1 and 2, per URL: one that answers is enough (the client then tries them all).
    let mut last = None;
    let mut reachable = false;
    'urls: for url in &t.urls {
        let (host, port) = host_port(url);
        let addrs = match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(a) => a.collect::<Vec<_>>(),
            Err(e) => {
                last = Some(PackagesError::NatsResolve {
                    nats: display.clone(),
                    host: host.clone(),
                    message: e.to_string(),
                });
                continue;
            }
        };
        for attempt in 0..ATTEMPTS {
            let mut err = None;
            for a in &addrs {
                match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(a)).await {
                    Ok(Ok(_)) => {
                        reachable = true;
                        break 'urls;
                    }
                    Ok(Err(e)) => err = Some(format!("{a}: {e}")),
                    Err(_) => err = Some(format!("{a}: timed out after 5 s")),
                }
            }
            last = Some(PackagesError::NatsConnect {
                nats: display.clone(),
                message: err.unwrap_or_else(|| format!("{host} resolved to no address")),
            });
            if attempt + 1 < ATTEMPTS {
                tokio::time::sleep(backoff(attempt)).await;
            }
        }
    }
    if !reachable {
        return Err(last.unwrap_or(PackagesError::NoNats));
    }
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(10))
        .name("bkbundle");
    if let Some(c) = &t.credentials {
        opts = opts.credentials_file(c).await.map_err(|e| {
            PackagesError::BadNatsConfig(format!("cannot read the NATS credentials file {}: {e}", c.display()))
        })?;
    }
    let addrs: Vec<async_nats::ServerAddr> = t
        .urls
        .iter()
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| PackagesError::BadNatsConfig(format!("{}: {e}", strip_credentials(u))))
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
            return Err(PackagesError::BadNatsConfig(format!(
                "the NATS CA file {} does not exist",
                ca.display()
            )));
        }
        opts = opts.add_root_certificates(ca.clone());
    }
    match (&t.cert_file, &t.key_file) {
        (Some(c), Some(k)) => opts = opts.add_client_certificate(c.clone(), k.clone()),
        (None, None) => {}
        _ => {
            return Err(PackagesError::BadNatsConfig(
                "[nats] cert_file and key_file go together".into(),
            ))
        }
    }
    let mut attempt = 0;
    loop {
        match async_nats::connect_with_options(addrs.clone(), opts.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                use async_nats::ConnectErrorKind as K;
                let message = chain(&e);
                let err = match e.kind() {
                    K::Tls => PackagesError::NatsTls {
                        nats: display.clone(),
                        message,
                    },
                    K::Authentication | K::AuthorizationViolation => PackagesError::NatsAuth {
                        nats: display.clone(),
                        message,
                    },
                    K::Dns => PackagesError::NatsResolve {
                        nats: display.clone(),
                        host: display.clone(),
                        message,
                    },
                    K::ServerParse => PackagesError::BadNatsConfig(message),
                    K::TimedOut | K::Io | K::MaxReconnects => {
                        // A TLS problem can surface as an I/O error from the handshake.
                        let lower = message.to_ascii_lowercase();
                        if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
                            PackagesError::NatsTls {
                                nats: display.clone(),
                                message,
                            }
                        } else if lower.contains("authorization") {
                            PackagesError::NatsAuth {
                                nats: display.clone(),
                                message,
                            }
                        } else {
                            attempt += 1;
                            if attempt < ATTEMPTS {
                                tokio::time::sleep(backoff(attempt)).await;
                                continue;
                            }
                            PackagesError::NatsConnect {
                                nats: display.clone(),
                                message,
                            }
                        }
                    }
                };
                return Err(err);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_in_order_and_without_secrets() {
        let none = |_: &str| None;
        let site = BTreeMap::from([
            ("NATS_PORT".to_string(), "14222".to_string()),
            ("NATS_USER".to_string(), "admin".to_string()),
            ("NATS_PASSWORD".to_string(), "pw".to_string()),
        ]);
        let t = resolve_target(None, &NatsConfig::default(), &site, &none).unwrap();
        assert_eq!(t.display(), "nats://127.0.0.1:14222");
        assert_eq!((t.user.as_deref(), t.password.as_deref()), (Some("admin"), Some("pw")));
        let t = resolve_target(Some("nats://u:secret@a:1, b:2"), &NatsConfig::default(), &site, &none).unwrap();
        assert_eq!(t.display(), "nats://a:1,nats://b:2");
        assert!(!format!("{t:?}").contains("secret"));
        assert_eq!(host_port("tls://u:p@h.example:4333"), ("h.example".to_string(), 4333));
        assert!(matches!(
            resolve_target(None, &NatsConfig::default(), &BTreeMap::new(), &none),
            Err(PackagesError::NoNats)
        ));
    }
}
