//! The install config (`install.toml`): what only the site knows. What the bundle knows stays in
//! the bundle. Versioned like every file bkbundle reads; unknown fields are refused with the line.
//!
//! ```toml
//! format = 1
//! target = "/opt/bklite"        # where the stack is laid out (--target wins)
//! project = "bklite"            # compose project name (default: the bundle's)
//!
//! [env]                         # values for the env template: ${NAME} placeholders and overrides
//! HOST_IP = "10.0.0.5"
//! SERVER_URL = "https://10.0.0.5:443"
//!
//! [health]
//! timeout_secs = 600            # deadline for the whole stack to become healthy
//! steady_secs = 5               # a service without a health check is ready after running this long
//!
//! [database]                    # the platform's PostgreSQL, for seeding the regions' sidecar env
//! # All optional. `${NAME}` placeholders are filled from the site values ([env] over the stack's .env).
//! url = "postgres://${POSTGRES_USER}:${POSTGRES_PASSWORD}@127.0.0.1:${POSTGRES_PORT}/${POSTGRES_DB}"
//! secret_key_env = "SECRET_KEY" # site value (else process env var) holding the server's SECRET_KEY
//! # secret_key = "..."          # or the key itself (not both)
//! redis_url = "redis://:${REDIS_PASSWORD}@127.0.0.1:${REDIS_PORT}/1"  # the server's Redis cache
//! migrations_timeout_secs = 300 # install waits this long for the server's tables
//!
//! [[regions]]                   # a cloud region (`default` is region 1, the server's own)
//! name = "east"
//! introduction = "east data centre"
//! proxy_address = "10.1.0.9"    # host of NODE_SERVER_URL and NATS_SERVERS for this region
//! local = false                 # true: agents run on this host, so loopback URLs are allowed
//! [regions.env]                 # this region's own values (others are inherited from `default`)
//! STARGAZER_URL = "http://10.1.0.9:8083"
//!
//! [tls]                         # NATS over TLS (agents verify the server against the site CA)
//! enabled = true                # default true; false runs NATS in plain text
//! validity_days = 825           # of the server certificate bkbundle issues (1 to 3650)
//! names = ["nats.example.com"]  # extra names or addresses the certificate must cover
//! # The site's own CA and certificate instead of the ones bkbundle generates (all three or none):
//! # ca_file = "/etc/pki/site/ca.crt"
//! # cert_file = "/etc/pki/site/nats.crt"
//! # key_file = "/etc/pki/site/nats.key"
//!
//! [registry]                    # the intranet registry the images come from (install --images-from)
//! url = "harbor.intranet/bklite" # HOST[:PORT][/PREFIX]; --images-from wins
//! ca_file = "/etc/pki/site/ca.crt" # the CA of its certificate (written to /etc/docker/certs.d/HOST/)
//! insecure = false              # plain HTTP (the engine must list it in insecure-registries)
//! username = "robot$bklite"     # with password_file (first line), else `docker login`'s file
//! password_file = "/etc/bkbundle/registry.pass"
//! ```

use crate::error::{Error, Kind, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallConfig {
    #[serde(default = "one")]
    pub format: u32,
    pub target: Option<PathBuf>,
    pub project: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub health: Health,
    /// `[database]`: how to reach the platform's PostgreSQL (and cache) and decrypt its secrets.
    #[serde(default)]
    pub database: DatabaseConfig,
    /// `[[regions]]`: the site's cloud regions, merged by name over the bundle's (the site wins).
    #[serde(default)]
    pub regions: Vec<RegionConfig>,
    /// `[nats]`: how to reach the platform's NATS for the agent packages (`init-packages`).
    #[serde(default)]
    pub nats: NatsConfig,
    /// `[tls]`: the stack's NATS over TLS, with the CA bkbundle generates or the site's own.
    #[serde(default)]
    pub tls: TlsConfig,
    /// `[backup]`: the backup install takes before an upgrade, and where the database runs.
    #[serde(default)]
    pub backup: BackupConfig,
    /// `[registry]`: the intranet registry the images are pulled from (`install --images-from`'s
    /// default) and that `doctor` checks them against.
    #[serde(default)]
    pub registry: crate::registry::Settings,
}

/// `[backup]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// How many backups `TARGET/backups` keeps (the oldest are removed after a new one is
    /// written there); 0 keeps all.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// The compose service that runs the platform's PostgreSQL.
    #[serde(default = "default_database_service")]
    pub database_service: String,
}

fn default_keep() -> usize {
    3
}
fn default_database_service() -> String {
    "postgres".into()
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            keep: default_keep(),
            database_service: default_database_service(),
        }
    }
}

/// `[tls]`. By default install generates a site CA once and issues the NATS server certificate
/// from it for every address agents use (see [`crate::tls`]); `ca_file`, `cert_file` and
/// `key_file` (all three or none) give the site's own instead, checked before anything is
/// written and never re-issued by bkbundle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Validity of the server certificate bkbundle issues (1 to 3650 days).
    #[serde(default = "default_validity_days")]
    pub validity_days: u32,
    /// Names or addresses (host, host:port or URL) the certificate must cover besides those
    /// install derives (HOST_IP, the server URL's host, the regions' proxy addresses, the service).
    #[serde(default)]
    pub names: Vec<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            enabled: true,
            ca_file: None,
            cert_file: None,
            key_file: None,
            validity_days: default_validity_days(),
            names: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_validity_days() -> u32 {
    crate::tls::Policy::default().validity_days
}

/// The longest server certificate validity accepted: ten years, the generated CA's own.
const MAX_VALIDITY_DAYS: u32 = 3650;

impl TlsConfig {
    /// The operator's own files, when all three are given.
    pub fn operator_files(&self) -> Option<(&Path, &Path, &Path)> {
        match (&self.ca_file, &self.cert_file, &self.key_file) {
            (Some(ca), Some(cert), Some(key)) => Some((ca, cert, key)),
            _ => None,
        }
    }

    /// The renewal policy for the certificates bkbundle issues.
    pub fn policy(&self) -> crate::tls::Policy {
        crate::tls::Policy {
            validity_days: self.validity_days,
            ..crate::tls::Policy::default()
        }
    }

    /// The extra names, parsed (checked at parse time, so this cannot fail afterwards).
    pub fn extra_names(&self) -> Vec<crate::tls::Name> {
        self.names
            .iter()
            .filter_map(|n| crate::tls::Name::parse(n).ok())
            .collect()
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let files = [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ];
        let given: Vec<&str> = files.iter().filter(|(_, f)| f.is_some()).map(|(n, _)| *n).collect();
        if !given.is_empty() && given.len() < files.len() {
            let missing: Vec<&str> = files.iter().filter(|(_, f)| f.is_none()).map(|(n, _)| *n).collect();
            problems.push(format!(
                "[tls] gives {} but not {}: the site's own CA, certificate and key go together (all three or none)",
                given.join(" and "),
                missing.join(" and ")
            ));
        }
        if !self.enabled && !given.is_empty() {
            problems.push(format!("[tls] enabled = false, yet {} given", given.join(", ")));
        }
        if self.validity_days == 0 || self.validity_days > MAX_VALIDITY_DAYS {
            problems.push(format!(
                "[tls] validity_days = {}: must be 1 to {MAX_VALIDITY_DAYS} (the site CA's own ten years)",
                self.validity_days
            ));
        }
        for n in &self.names {
            if let Err(e) = crate::tls::Name::parse(n) {
                problems.push(format!("[tls] names: {e}"));
            }
        }
        problems
    }
}

/// `[nats]`. Every field is optional; `${NAME}` placeholders in `url`, `user`, `password` and
/// `token` are filled from the site values. Default: the stack's NATS (`NATS_PORT` on its
/// `INTERNAL_BIND_IP`, `NATS_USER`/`NATS_PASSWORD` of its .env).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://[user:pass@]host:port` or `tls://...`; several separated by commas.
    pub url: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// A `.creds` file (JWT + NKey seed).
    pub credentials: Option<PathBuf>,
    /// The CA that signed the server's certificate (enables TLS).
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The object store bucket (the server's `NATS_NAMESPACE`); default: the stack's NATS_NAMESPACE,
    /// else the platform release's default (`bk_lite` before 2026, `bklite` since).
    pub bucket: Option<String>,
}

/// `[database]`. Every field is optional; `${NAME}` placeholders in `url` and `redis_url` are
/// filled from the site values (the install config's `[env]` over the stack's rendered `.env`), so
/// the generated passwords never have to be copied into the config.
///
/// Where the database URL comes from, first match wins: `--database-url`, the `DATABASE_URL`
/// variable, `url` here, the usual `PG*` variables (when any is set), the stack's own `.env`
/// (`POSTGRES_USER`, `POSTGRES_PASSWORD`, `POSTGRES_PORT`, `POSTGRES_DB` on its
/// `INTERNAL_BIND_IP`, 127.0.0.1 by default).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/database` (or libpq `key=value` form).
    pub url: Option<String>,
    /// The server's Django `SECRET_KEY` itself, which encrypts `secret` env values. Prefer
    /// `secret_key_env`: a key written here is one more copy of the secret to protect.
    pub secret_key: Option<String>,
    /// The name of the site value holding `SECRET_KEY` (looked up in the site values, then in
    /// bkbundle's own environment). Default `SECRET_KEY`, the stack's `.env` variable.
    pub secret_key_env: Option<String>,
    /// `redis://[user][:password]@host:port/db` of the server's Django cache, when it is Redis
    /// (the stack's is: db 1). Default: the stack's Redis when its `.env` is known (it has
    /// `REDIS_PASSWORD`). Without either only the database cache table is invalidated and the
    /// server may serve a region's old env for up to 300 s.
    pub redis_url: Option<String>,
    /// How long install waits for the server to create its tables (it migrates at start-up).
    #[serde(default = "default_migrations_timeout")]
    pub migrations_timeout_secs: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            secret_key: None,
            secret_key_env: None,
            redis_url: None,
            migrations_timeout_secs: default_migrations_timeout(),
        }
    }
}

fn default_migrations_timeout() -> u64 {
    300
}

/// `[[regions]]`: one cloud region as the site wants it.
///
/// `introduction` and `proxy_address` left out keep what the bundle (or an existing region)
/// has; `proxy_address = ""` explicitly clears it. Keys not under `env` are inherited from the
/// `default` region, with the host of `NODE_SERVER_URL` and `NATS_SERVERS` replaced by
/// `proxy_address` when it is set, as the server does for a new region.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub name: String,
    pub introduction: Option<String>,
    /// The host (IP address or name, no scheme, no port) that this region's agents reach the
    /// platform through.
    pub proxy_address: Option<String>,
    /// The region's agents run on this very host, so loopback addresses (127.0.0.1, ::1,
    /// localhost) in `NODE_SERVER_URL` and `NATS_SERVERS` are allowed. Default false: for agents
    /// elsewhere a loopback address points at their own machine.
    #[serde(default)]
    pub local: bool,
    /// This region's own sidecar env values (may hold `${NAME}` placeholders).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    #[serde(default = "default_steady")]
    pub steady_secs: u64,
}

fn default_timeout() -> u64 {
    600
}
fn default_steady() -> u64 {
    5
}

impl Default for Health {
    fn default() -> Self {
        Health {
            timeout_secs: default_timeout(),
            steady_secs: default_steady(),
        }
    }
}

impl InstallConfig {
    pub fn load(path: &Path) -> Result<InstallConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read install config", path, e))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<InstallConfig> {
        let c: InstallConfig = toml::from_str(text).map_err(|e| {
            Error::input(format!("{origin}: {}", e.to_string().trim_end()))
                .hint("see `bkbundle install --help` for the install config's fields")
        })?;
        if c.format > 1 {
            return Err(Error::new(
                Kind::Unsupported,
                format!(
                    "{origin}: install config format {} is newer than this bkbundle supports (1)",
                    c.format
                ),
            ));
        }
        let mut problems = Vec::new();
        for k in c.env.keys() {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                problems.push(format!("[env] key {k:?} is not a variable name"));
            }
        }
        for (k, v) in &c.env {
            if v.contains('\n') {
                problems.push(format!("[env] {k}: values cannot span lines"));
            }
        }
        if let Some(url) = &c.registry.url {
            if let Err(e) = crate::registry::Target::parse(url) {
                problems.push(format!("[registry] url: {}", e.message));
            }
        }
        if c.registry.password_file.is_some() && c.registry.username.is_none() {
            problems.push("[registry]: password_file needs username".into());
        }
        if c.database.secret_key.is_some() && c.database.secret_key_env.is_some() {
            problems.push("[database]: give either secret_key or secret_key_env, not both".into());
        }
        if c.database.migrations_timeout_secs == 0 {
            problems.push("[database] migrations_timeout_secs must be at least 1".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in c.regions.iter().enumerate() {
            let what = format!("[[regions]] #{} ({:?})", i + 1, r.name);
            if r.name.trim().is_empty() || r.name.chars().count() > 100 {
                problems.push(format!("{what}: name must be 1 to 100 characters"));
            }
            if !names.insert(r.name.as_str()) {
                problems.push(format!("{what}: region {:?} is declared twice", r.name));
            }
            for k in r.env.keys() {
                if !crate::manifest::is_env_key(k) || k.len() > 100 {
                    problems.push(format!(
                        "{what}: env key {k:?} is not a sidecar env key (upper-case letters, digits, `_`, at most 100)"
                    ));
                }
            }
        }
        problems.extend(c.tls.problems());
        if c.health.timeout_secs == 0 {
            problems.push("[health] timeout_secs must be at least 1".into());
        }
        if let Some(p) = &c.project {
            if p.is_empty()
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                problems.push(format!(
                    "project {p:?} must be lower-case letters, digits, `-` or `_` (a compose project name)"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(Error::input(format!("{origin}: {}", problems.join("; "))));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_fields_with_the_line() {
        let c = InstallConfig::parse("format = 1\n[env]\nHOST_IP = \"10.0.0.5\"\n", "i.toml").unwrap();
        assert_eq!(c.env["HOST_IP"], "10.0.0.5");
        assert_eq!(c.health.timeout_secs, 600);
        let e = InstallConfig::parse("[env]\nA = \"1\"\n[helth]\nx = 1\n", "i.toml").unwrap_err();
        assert!(
            e.message.contains("i.toml") && e.message.contains("line 3"),
            "{}",
            e.message
        );
        let e = InstallConfig::parse("format = 3\n", "i.toml").unwrap_err();
        assert_eq!(e.kind, Kind::Unsupported);
    }

    #[test]
    fn regions_and_database() {
        let c = InstallConfig::parse(
            "[database]\nurl = \"postgres://u@h/db\"\n[[regions]]\nname = \"east\"\nproxy_address = \"10.1.0.9\"\n\
             [regions.env]\nSTARGAZER_URL = \"http://x\"\n[[regions]]\nname = \"default\"\nlocal = true\n",
            "i.toml",
        )
        .unwrap();
        assert_eq!(c.regions.len(), 2);
        assert_eq!(c.regions[0].proxy_address.as_deref(), Some("10.1.0.9"));
        assert!(c.regions[1].local && c.regions[1].introduction.is_none());
        assert_eq!(c.database.migrations_timeout_secs, 300);
        let e = InstallConfig::parse(
            "[database]\nsecret_key = \"a\"\nsecret_key_env = \"B\"\n[[regions]]\nname = \"x\"\n\
             [[regions]]\nname = \"x\"\n[regions.env]\nlower = \"1\"\n",
            "i.toml",
        )
        .unwrap_err();
        for needle in ["not both", "declared twice", "\"lower\""] {
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
        let e = InstallConfig::parse("[[regions]]\nname = \"x\"\nproxy = \"y\"\n", "i.toml").unwrap_err();
        assert!(
            e.message.contains("proxy") && e.message.contains("line 3"),
            "{}",
            e.message
        );
    }

    fn tls_error(text: &str) -> String {
        InstallConfig::parse(text, "i.toml").unwrap_err().message
    }

    #[test]
    fn tls_defaults_on_with_825_days_and_no_files() {
        let c = InstallConfig::parse("format = 1\n", "i.toml").unwrap();
        assert!(c.tls.enabled);
        assert_eq!(c.tls.validity_days, 825);
        assert!(c.tls.operator_files().is_none() && c.tls.names.is_empty());
        assert_eq!(c.tls.policy(), crate::tls::Policy::default());
        let c = InstallConfig::parse("[tls]\nenabled = false\nvalidity_days = 3650\n", "i.toml").unwrap();
        assert!(!c.tls.enabled);
        assert_eq!(c.tls.policy().validity_days, 3650);
    }

    #[test]
    fn tls_operator_files_all_three_or_none_naming_what_is_missing() {
        let c = InstallConfig::parse(
            "[tls]\nca_file = \"/p/ca.crt\"\ncert_file = \"/p/n.crt\"\nkey_file = \"/p/n.key\"\n",
            "i.toml",
        )
        .unwrap();
        let (ca, cert, key) = c.tls.operator_files().unwrap();
        assert_eq!(
            (ca, cert, key),
            (Path::new("/p/ca.crt"), Path::new("/p/n.crt"), Path::new("/p/n.key"))
        );
        let e = tls_error("[tls]\ncert_file = \"/p/n.crt\"\n");
        assert!(
            e.contains("i.toml") && e.contains("gives cert_file but not ca_file and key_file"),
            "{e}"
        );
        let e = tls_error("[tls]\nca_file = \"/p/ca.crt\"\ncert_file = \"/p/n.crt\"\n");
        assert!(e.contains("gives ca_file and cert_file but not key_file"), "{e}");
    }

    #[test]
    fn tls_files_with_tls_disabled_are_refused() {
        let e = tls_error("[tls]\nenabled = false\nca_file = \"a\"\ncert_file = \"b\"\nkey_file = \"c\"\n");
        assert!(
            e.contains("enabled = false, yet ca_file, cert_file, key_file given"),
            "{e}"
        );
    }

    #[test]
    fn tls_validity_days_zero_or_over_ten_years_refused() {
        for (days, ok) in [(0, false), (1, true), (3650, true), (3651, false)] {
            let r = InstallConfig::parse(&format!("[tls]\nvalidity_days = {days}\n"), "i.toml");
            assert_eq!(r.is_ok(), ok, "{days}: {:?}", r.err().map(|e| e.message));
            if let Err(e) = r {
                assert!(
                    e.message
                        .contains(&format!("validity_days = {days}: must be 1 to 3650")),
                    "{}",
                    e.message
                );
            }
        }
        // Negative or huge numbers do not fit: serde's own message, with the line.
        assert!(tls_error("[tls]\nvalidity_days = -1\n").contains("line 2"));
    }

    #[test]
    fn tls_names_parsed_bad_ones_named() {
        let c = InstallConfig::parse(
            "[tls]\nnames = [\"nats.example.com\", \"10.0.0.7:4222\", \"tls://[fd00::1]:4222\"]\n",
            "i.toml",
        )
        .unwrap();
        let names: Vec<String> = c.tls.extra_names().iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["nats.example.com", "10.0.0.7", "fd00::1"]);
        let e = tls_error("[tls]\nnames = [\"ok.example\", \"bad name!\", \"\"]\n");
        assert!(
            e.contains("[tls] names: \"bad name!\"") && e.contains("\"\": no host"),
            "{e}"
        );
    }

    #[test]
    fn tls_unknown_field_refused_with_the_line() {
        let e = tls_error("[tls]\nenabled = true\nca = \"x\"\n");
        assert!(e.contains("unknown field `ca`") && e.contains("line 3"), "{e}");
    }
}
