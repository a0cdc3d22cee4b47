//! Where the site's services are: the platform database, its Redis cache and NATS, resolved from
//! the command line, the process environment, the install config and the stack's `.env`, in that
//! order. The adapters in [`crate::platform`] own the connections; this module only decides
//! what to connect to and says where each value came from (never showing a password).

use super::config::{DatabaseConfig, NatsConfig};
use super::envfile;
use crate::platform::cache::{self, RedisTarget, ServerCache};
use crate::platform::crypto::SecretKey;
use crate::platform::db::{DbError, DbName, DbTarget};
use crate::platform::nats::{NatsError, NatsTarget};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::config::Host;

/// `${NAME}` placeholders of `value` filled from `site`, or the names that are not set.
fn fill(value: &str, site: &BTreeMap<String, String>) -> Result<String, String> {
    let mut missing = Vec::new();
    let s = envfile::substitute(value, site, &mut missing);
    if missing.is_empty() {
        Ok(s)
    } else {
        Err(format!(
            "placeholder(s) {} are not set",
            missing
                .iter()
                .map(|m| format!("${{{m}}}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

const PG_VARS: [&str; 5] = ["PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE"];

/// Choose the database: `--database-url`, `DATABASE_URL`, `[database] url` (with `${NAME}` from
/// `site`), the `PG*` variables (when any is set), the stack's `.env` (`POSTGRES_*`, on its
/// `INTERNAL_BIND_IP`, 127.0.0.1 by default). `env` looks a process environment variable up.
pub fn database(
    cli_url: Option<&str>,
    cfg: &DatabaseConfig,
    site: &BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<DbTarget, DbError> {
    if let Some(url) = cli_url.filter(|u| !u.trim().is_empty()) {
        return target_from_url(url, "--database-url");
    }
    if let Some(url) = env("DATABASE_URL").filter(|u| !u.trim().is_empty()) {
        return target_from_url(&url, "DATABASE_URL");
    }
    if let Some(url) = &cfg.url {
        let url = fill(url, site).map_err(|m| DbError::BadDatabaseUrl {
            source_name: "[database] url of the install config".into(),
            message: format!("its {m} (give them under [env] or pass the stack's .env with --env-file)"),
        })?;
        return target_from_url(&url, "[database] url of the install config");
    }
    if PG_VARS.iter().any(|v| env(v).is_some()) {
        let mut c = tokio_postgres::Config::new();
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".into());
        let host = env("PGHOST").unwrap_or_else(|| "localhost".into());
        c.host(&host)
            .user(&user)
            .dbname(env("PGDATABASE").unwrap_or_else(|| user.clone()));
        if let Some(p) = env("PGPORT") {
            let port = p.parse::<u16>().map_err(|_| DbError::BadDatabaseUrl {
                source_name: "PGPORT".into(),
                message: format!("expected a port number, found {p:?}"),
            })?;
            c.port(port);
        }
        if let Some(pw) = env("PGPASSWORD") {
            c.password(pw);
        }
        return Ok(finish_target(c, "the PG* environment variables"));
    }
    if let Some(pw) = site.get("POSTGRES_PASSWORD") {
        let mut c = tokio_postgres::Config::new();
        let port = site.get("POSTGRES_PORT").map(String::as_str).unwrap_or("5432");
        let port = port.parse::<u16>().map_err(|_| DbError::BadDatabaseUrl {
            source_name: "POSTGRES_PORT of the stack's .env".into(),
            message: format!("expected a port number, found {port:?}"),
        })?;
        c.host(stack_host(site))
            .port(port)
            .user(site.get("POSTGRES_USER").map(String::as_str).unwrap_or("postgres"))
            .dbname(site.get("POSTGRES_DB").map(String::as_str).unwrap_or("postgres"))
            .password(pw.as_str());
        return Ok(finish_target(
            c,
            "the stack's .env (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_PORT, POSTGRES_DB, INTERNAL_BIND_IP)",
        ));
    }
    Err(DbError::NoDatabase)
}

/// Where the stack publishes its internal services on this host: `INTERNAL_BIND_IP` of its .env,
/// or 127.0.0.1 when it is unset or a wildcard address.
pub fn stack_host(site: &BTreeMap<String, String>) -> &str {
    match site.get("INTERNAL_BIND_IP").map(|s| s.trim()) {
        Some(ip) if !ip.is_empty() && ip != "0.0.0.0" && ip != "::" && ip != "[::]" => ip,
        _ => "127.0.0.1",
    }
}

fn target_from_url(url: &str, source: &str) -> Result<DbTarget, DbError> {
    let c = tokio_postgres::Config::from_str(url.trim()).map_err(|e| DbError::BadDatabaseUrl {
        source_name: source.into(),
        message: format!("it is not a PostgreSQL URL ({e}); expected postgres://user:password@host:port/database"),
    })?;
    Ok(finish_target(c, source))
}

fn finish_target(mut c: tokio_postgres::Config, source: &str) -> DbTarget {
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(Duration::from_secs(10));
    }
    c.application_name("bkbundle");
    let host = match c.get_hosts().first() {
        Some(Host::Tcp(h)) if h.contains(':') => format!("[{h}]"),
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let user = c.get_user().unwrap_or("(no user)").to_string();
    let db = c.get_dbname().unwrap_or(&user).to_string();
    DbTarget {
        name: DbName {
            display: format!("{user}@{host}:{port}/{db}"),
            source: source.into(),
        },
        config: c,
    }
}

/// Where the server caches the regions' env: `[database] redis_url` (with `${NAME}` from the
/// site values) when given; else the server container's environment (`server_env`, read through
/// the engine) or, without one, the site values: `REDIS_CACHE_URL` means Redis, reached on the
/// stack's published port (`INTERNAL_BIND_IP:REDIS_PORT`: the URL names the compose service,
/// which only containers resolve), with the URL's password and db; a server container without it
/// caches in process memory. With neither, the stack's own Redis when its `.env` is known
/// (`REDIS_PASSWORD`, db 1, as BK-Lite's template configures the server).
pub fn server_cache(
    cfg: &DatabaseConfig,
    site: &BTreeMap<String, String>,
    server_env: Option<&BTreeMap<String, String>>,
) -> ServerCache {
    if let Some(url) = &cfg.redis_url {
        return ServerCache::Redis {
            from: "[database] redis_url".into(),
            target: fill(url, site).and_then(|u| cache::parse_url(&u)),
        };
    }
    let (url, from) = match server_env {
        Some(env) => match env.get("REDIS_CACHE_URL").filter(|u| !u.trim().is_empty()) {
            Some(u) => (Some(u.clone()), "REDIS_CACHE_URL of the server container"),
            None => {
                return ServerCache::ProcessMemory {
                    from: "the server container has no REDIS_CACHE_URL".into(),
                }
            }
        },
        None => (
            site.get("REDIS_CACHE_URL").filter(|u| !u.trim().is_empty()).cloned(),
            "REDIS_CACHE_URL of the site values",
        ),
    };
    let published = |password: Option<String>, db: u32| -> Result<RedisTarget, String> {
        let port = site.get("REDIS_PORT").map(String::as_str).unwrap_or("6379");
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("REDIS_PORT {port:?} is not a port number"))?;
        Ok(RedisTarget {
            host: stack_host(site)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            username: None,
            password,
            db,
        })
    };
    if let Some(url) = url {
        let target = fill(&url, site)
            .and_then(|u| cache::parse_url(&u))
            .and_then(|t| published(t.password.clone(), t.db));
        return ServerCache::Redis {
            from: format!("{from}, on the stack's published port (INTERNAL_BIND_IP, REDIS_PORT)"),
            target,
        };
    }
    match site.get("REDIS_PASSWORD") {
        Some(pw) => ServerCache::Redis {
            from: "the stack's .env (REDIS_PASSWORD, REDIS_PORT, INTERNAL_BIND_IP)".into(),
            target: published(Some(pw.clone()).filter(|p| !p.is_empty()), 1),
        },
        None => ServerCache::Unknown,
    }
}

/// The [`NatsTarget::source`] of a NATS found from the stack's .env alone (no URL given).
///
/// [`NatsTarget::source`]: crate::platform::nats::NatsTarget::source
pub const STACK_ENV_NATS: &str = "the stack's .env (NATS_PORT, INTERNAL_BIND_IP)";

/// Choose NATS: `--nats-url`, `NATS_URL`, `[nats] url`, the stack's .env (`NATS_PORT` on its
/// `INTERNAL_BIND_IP`, 127.0.0.1 by default). Credentials: `[nats]`, else the stack's
/// `NATS_USER`/`NATS_PASSWORD` (a URL's own `user:pass@` wins inside the client).
pub fn nats(
    cli_url: Option<&str>,
    cfg: &NatsConfig,
    site: &BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<NatsTarget, NatsError> {
    let sub = |v: &Option<String>, what: &str| -> Result<Option<String>, NatsError> {
        let Some(v) = v else { return Ok(None) };
        fill(v, site)
            .map(Some)
            .map_err(|m| NatsError::BadConfig(format!("[nats] {what}: {m}")))
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
        let host = stack_host(site);
        // The stack's NATS on TLS (install wrote its certificates): verified against the site CA.
        let scheme = if tls_site(site) { "tls" } else { "nats" };
        (format!("{scheme}://{host}:{port}"), STACK_ENV_NATS.to_string())
    } else {
        return Err(NatsError::NoNats);
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
        return Err(NatsError::BadConfig(format!("{source}: no server URL in {url:?}")));
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
        ca_file: cfg.ca_file.clone().or_else(|| {
            site.get(crate::install::tls::CA_FILE_VALUE)
                .filter(|_| tls_site(site))
                .map(std::path::PathBuf::from)
        }),
        cert_file: cfg.cert_file.clone(),
        key_file: cfg.key_file.clone(),
    })
}

/// Whether the site's NATS serves TLS from the target's certificates (see [`crate::install::tls`]).
fn tls_site(site: &BTreeMap<String, String>) -> bool {
    site.get("NATS_PROTOCOL").is_some_and(|p| p.trim() == "tls")
        && site.contains_key(crate::install::tls::CA_FILE_VALUE)
}

/// The key that encrypts secrets: `[database] secret_key`, else the site value (then process
/// variable) named by `secret_key_env` (default `SECRET_KEY`). Returns where it came from.
pub fn secret_key(
    cfg: &DatabaseConfig,
    site: &BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<(SecretKey, String)> {
    if let Some(k) = cfg.secret_key.as_deref().filter(|k| !k.is_empty()) {
        return Some((SecretKey::from_django(k), "[database] secret_key".into()));
    }
    let name = cfg.secret_key_env.as_deref().unwrap_or("SECRET_KEY");
    if let Some(k) = site.get(name).filter(|k| !k.is_empty()) {
        return Some((SecretKey::from_django(k), format!("site value {name}")));
    }
    env(name)
        .filter(|k| !k.is_empty())
        .map(|k| (SecretKey::from_django(&k), format!("environment variable {name}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::config::NatsConfig;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn database_sources_in_order() {
        let mut cfg = DatabaseConfig::default();
        let site = BTreeMap::from([
            ("POSTGRES_PASSWORD".to_string(), "pw".to_string()),
            ("POSTGRES_PORT".to_string(), "15432".to_string()),
            ("POSTGRES_DB".to_string(), "bklite".to_string()),
            ("PGU".to_string(), "site-user".to_string()),
        ]);
        let t = database(None, &cfg, &site, &no_env).unwrap();
        assert_eq!(t.name.display, "postgres@127.0.0.1:15432/bklite");
        let pg = |k: &str| match k {
            "PGHOST" => Some("db.local".to_string()),
            "PGUSER" => Some("bk".to_string()),
            _ => None,
        };
        let t = database(None, &cfg, &site, &pg).unwrap();
        assert_eq!(
            (t.name.display.as_str(), t.name.source.as_str()),
            ("bk@db.local:5432/bk", "the PG* environment variables")
        );
        cfg.url = Some("postgres://${PGU}@h:1/d".into());
        let t = database(None, &cfg, &site, &pg).unwrap();
        assert_eq!(t.name.display, "site-user@h:1/d");
        let dburl = |k: &str| (k == "DATABASE_URL").then(|| "postgres://e@envhost/x".to_string());
        assert_eq!(
            database(None, &cfg, &site, &dburl).unwrap().name.display,
            "e@envhost:5432/x"
        );
        let t = database(Some("postgres://c:secret@clihost:7/y"), &cfg, &site, &dburl).unwrap();
        assert_eq!(
            (t.name.display.as_str(), t.name.source.as_str()),
            ("c@clihost:7/y", "--database-url")
        );
        assert!(!format!("{t:?}").contains("secret"));
        cfg.url = Some("postgres://${NOPE}@h/d".into());
        let e = database(None, &cfg, &site, &no_env).unwrap_err().to_string();
        assert!(e.contains("${NOPE}"), "{e}");
        assert!(matches!(
            database(None, &DatabaseConfig::default(), &BTreeMap::new(), &no_env),
            Err(DbError::NoDatabase)
        ));
    }

    fn redis_of(c: ServerCache) -> (String, Result<RedisTarget, String>) {
        match c {
            ServerCache::Redis { from, target } => (from, target),
            other => panic!("expected Redis, found {other:?}"),
        }
    }

    #[test]
    fn where_the_server_caches() {
        let mut site = BTreeMap::from([("REDIS_PASSWORD".to_string(), "p/w@x".to_string())]);
        let mut cfg = DatabaseConfig::default();
        let (from, t) = redis_of(server_cache(&cfg, &site, None));
        let t = t.unwrap();
        assert!(from.contains("stack's .env"));
        assert_eq!((t.host.as_str(), t.port, t.db), ("127.0.0.1", 6379, 1));
        assert_eq!(t.password.as_deref(), Some("p/w@x"));
        site.insert("INTERNAL_BIND_IP".into(), "10.9.0.1".into());
        site.insert("REDIS_PORT".into(), "16379".into());
        let t = redis_of(server_cache(&cfg, &site, None)).1.unwrap();
        assert_eq!((t.host.as_str(), t.port), ("10.9.0.1", 16379));
        // The server container decides: REDIS_CACHE_URL names the compose service; this host
        // reaches it on the published port, with the URL's password and db.
        let env = BTreeMap::from([("REDIS_CACHE_URL".to_string(), "redis://:s3@redis:6379/3".to_string())]);
        let (from, t) = redis_of(server_cache(&cfg, &site, Some(&env)));
        let t = t.unwrap();
        assert!(from.contains("server container"), "{from}");
        assert_eq!(
            (t.host.as_str(), t.port, t.db, t.password.as_deref()),
            ("10.9.0.1", 16379, 3, Some("s3"))
        );
        // Without it the server caches in its own memory, whatever the site has.
        assert!(matches!(
            server_cache(&cfg, &site, Some(&BTreeMap::new())),
            ServerCache::ProcessMemory { .. }
        ));
        assert_eq!(server_cache(&cfg, &BTreeMap::new(), None), ServerCache::Unknown);
        cfg.redis_url = Some("redis://:${REDIS_PASSWORD}@cache:6380/2".into());
        let (from, t) = redis_of(server_cache(&cfg, &site, Some(&BTreeMap::new())));
        assert_eq!(from, "[database] redis_url");
        // `/` in a password must be percent-encoded in a URL: the parse fails, clearly.
        assert!(t.is_err());
        cfg.redis_url = Some("redis://:${NOPE}@cache/2".into());
        assert!(redis_of(server_cache(&cfg, &site, None))
            .1
            .unwrap_err()
            .contains("${NOPE}"));
    }

    #[test]
    fn targets_in_order_and_without_secrets() {
        let none = |_: &str| None;
        let site = BTreeMap::from([
            ("NATS_PORT".to_string(), "14222".to_string()),
            ("NATS_USER".to_string(), "admin".to_string()),
            ("NATS_PASSWORD".to_string(), "pw".to_string()),
        ]);
        let t = nats(None, &NatsConfig::default(), &site, &none).unwrap();
        assert_eq!(t.display(), "nats://127.0.0.1:14222");
        assert_eq!((t.user.as_deref(), t.password.as_deref()), (Some("admin"), Some("pw")));
        let t = nats(Some("nats://u:secret@a:1, b:2"), &NatsConfig::default(), &site, &none).unwrap();
        assert_eq!(t.display(), "nats://a:1,nats://b:2");
        assert!(!format!("{t:?}").contains("secret"));
        assert!(matches!(
            nats(None, &NatsConfig::default(), &BTreeMap::new(), &none),
            Err(NatsError::NoNats)
        ));
    }

    #[test]
    fn secret_key_sources_in_order() {
        let mut cfg = DatabaseConfig::default();
        let site = BTreeMap::from([("SECRET_KEY".to_string(), "from-site".to_string())]);
        let (_, from) = secret_key(&cfg, &site, &no_env).unwrap();
        assert_eq!(from, "site value SECRET_KEY");
        cfg.secret_key_env = Some("DJANGO_KEY".into());
        assert!(secret_key(&cfg, &site, &no_env).is_none());
        let env = |k: &str| (k == "DJANGO_KEY").then(|| "x".to_string());
        assert_eq!(
            secret_key(&cfg, &site, &env).unwrap().1,
            "environment variable DJANGO_KEY"
        );
        cfg.secret_key = Some("literal".into());
        assert_eq!(secret_key(&cfg, &site, &env).unwrap().1, "[database] secret_key");
    }
}
