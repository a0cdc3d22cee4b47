//! `bkbundle backup` and `bkbundle restore`: a site's data, objects, secrets and stack in one
//! verified file (`.bkbak`), and the site brought back from it.
//!
//! - [`manifest`]: `backup.toml`, what a backup holds (the archive is the bundle's format: see
//!   [`crate::bundle`], which writes and verifies both).
//! - [`take`]: the backup, taken while the site runs.
//! - [`restore`]: the site brought back, on its own host after a `down -v` or on a new one.
//! - [`pg`]: the stack's PostgreSQL through its own container's tools; [`objects`]: the object
//!   store's objects, streamed.

pub mod manifest;
pub mod objects;
pub mod pg;
pub mod restore;
pub mod seal;
pub mod take;

use crate::engine::{ContainerState, Engine};
use crate::error::{Error, Result};
use crate::install::journal::Journal;
use crate::platform::nats::NatsTarget;
use crate::ports::live::NatsBucket;
use crate::site::config::InstallConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use manifest::BackupManifest;

/// Where a site is and how to reach its services: what backup and restore share.
#[derive(Debug, Clone, Default)]
pub struct SiteAccess {
    /// The install's directory (its .env, certificates, journal).
    pub target: PathBuf,
    pub config: InstallConfig,
    /// The stack's .env values under the install config's `[env]`.
    pub site: BTreeMap<String, String>,
    /// The compose project (default: the journal's, the config's).
    pub project: Option<String>,
    pub nats_url: Option<String>,
    /// How long to wait for another run's lock on the target.
    pub lock_wait: Option<Duration>,
}

impl SiteAccess {
    /// The compose project: `--project`, the journal's, the config's, the target's name.
    pub fn project(&self, journal: &Journal) -> String {
        self.project
            .clone()
            .or_else(|| journal.project.clone())
            .or_else(|| self.config.project.clone())
            .unwrap_or_else(|| {
                self.target
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "bklite".into())
            })
    }

    /// The database role and password the stack's PostgreSQL was created with (its .env).
    pub fn database_login(&self) -> (String, Option<String>) {
        let user = self
            .site
            .get("POSTGRES_USER")
            .filter(|u| !u.is_empty())
            .cloned()
            .unwrap_or_else(|| "postgres".into());
        (user, self.site.get("POSTGRES_PASSWORD").cloned())
    }

    /// Where the site's NATS is, as init-packages and doctor find it (`--nats-url`, `NATS_URL`,
    /// `[nats]`, the stack's .env).
    pub fn nats_target(&self) -> std::result::Result<NatsTarget, crate::platform::nats::NatsError> {
        let env = |n: &str| std::env::var(n).ok();
        crate::site::targets::nats(self.nats_url.as_deref(), &self.config.nats, &self.site, &env)
    }

    fn database_service(&self) -> &str {
        &self.config.backup.database_service
    }
}

/// `site` with the values of the target's .env (as restored) under the config's `[env]`.
pub(crate) fn reload_site(mut site: SiteAccess, target: &Path) -> SiteAccess {
    let env = target.join(".env");
    if let Ok(text) = std::fs::read_to_string(&env) {
        let values = crate::site::envfile::parse(&text);
        let mut merged = crate::regions::site_values(&values, &site.config.env);
        crate::install::tls::installed_site_values(target, &mut merged, &site.config);
        for (k, v) in &merged {
            if crate::logging::is_secret_name(k) {
                crate::logging::register_secret(v);
            }
        }
        site.site = merged;
    }
    site
}

/// `p` made absolute against the working directory (the target is recorded and compared).
pub fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// The error for a target that bkbundle did not install.
pub fn not_installed(target: &Path) -> Error {
    Error::input(format!(
        "{} is not a site bkbundle installed: it has no install journal ({})",
        target.display(),
        crate::install::journal::path(target).display()
    ))
    .hint("pass the directory `bkbundle install` laid the stack out in (--target), e.g. /opt/bklite")
}

/// The target exists and has an install journal naming a bundle.
pub fn require_installed(target: &Path) -> Result<()> {
    match Journal::load(target)?.bundle {
        Some(_) => Ok(()),
        None => Err(not_installed(target)),
    }
}

/// The running container of the database service; `None` when the stack has no such service.
async fn database_container(
    engine: &Engine,
    project: &str,
    site: &SiteAccess,
) -> Result<Option<(ContainerState, String)>> {
    let service = site.database_service().to_string();
    let all = engine.project_containers(project).await?;
    if let Some(c) = all.iter().find(|c| c.service == service && c.status == "running") {
        return Ok(Some((c.clone(), service)));
    }
    if all.is_empty() {
        return Err(Error::external(format!(
            "compose project {project} has no containers: the site in {} is not running",
            site.target.display()
        ))
        .hint(format!(
            "start it (docker compose -p {project} -f {}/docker-compose.yml up -d), or pass --project when it runs under another project",
            site.target.display()
        )));
    }
    if !all.iter().any(|c| c.service == service) {
        return Ok(None);
    }
    Err(Error::external(format!(
        "the database service {service} of compose project {project} is not running"
    ))
    .hint(format!(
        "start it: docker compose -p {project} -f {}/docker-compose.yml up -d {service}",
        site.target.display()
    )))
}

/// A NATS connection to the site's server.
pub(crate) struct Nats {
    pub client: async_nats::Client,
    pub target: NatsTarget,
    /// The install's directory, for the hints of errors.
    pub site_target: PathBuf,
}

/// The site's NATS, connected; `None` when the site has none (no `NATS_*` in its .env, no
/// `[nats] url`).
async fn connect_nats(site: &SiteAccess) -> Result<Option<Nats>> {
    let target = match site.nats_target() {
        Ok(t) => t,
        Err(crate::platform::nats::NatsError::NoNats) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let client = crate::platform::nats::connect(&target).await?;
    Ok(Some(Nats {
        client,
        target,
        site_target: site.target.clone(),
    }))
}

/// Why the stack has no NATS of its own, when the site's NATS is known from the stack's .env
/// alone (no `--nats-url`, `NATS_URL` or `[nats] url`) and no container of the compose project
/// publishes its port: the .env merely names a port (a stack without NATS). `None` otherwise: a
/// NATS that should answer (a stopped one included: its container still publishes the port).
async fn stack_without_nats(engine: &Engine, project: &str, site: &SiteAccess) -> Result<Option<String>> {
    let target = match site.nats_target() {
        Ok(t) if t.source == crate::site::targets::STACK_ENV_NATS => t,
        _ => return Ok(None),
    };
    let Some(port) = target.urls.first().map(|u| crate::platform::nats::host_port(u).1) else {
        return Ok(None);
    };
    let containers = engine.project_containers(project).await?;
    if containers.iter().any(|c| c.ports.iter().any(|(_, p, _)| *p == port)) {
        return Ok(None);
    }
    Ok(Some(format!(
        "no container of compose project {project} publishes port {port} (NATS_PORT of the stack's .env): the stack has no NATS, no objects in this backup (give [nats] url in the install config if the site's NATS runs elsewhere)"
    )))
}

/// [`connect_nats`] to a NATS that may still be starting: tried again until it connects and
/// JetStream answers, or `deadline` passes (then its last error).
async fn connect_nats_when_ready(site: &SiteAccess, deadline: std::time::Instant) -> Result<Option<Nats>> {
    loop {
        let attempt = async {
            let Some(n) = connect_nats(site).await? else {
                return Ok(None);
            };
            crate::platform::nats::jetstream_answers(&n.client, &n.target).await?;
            Ok::<_, Error>(Some(n))
        };
        match attempt.await {
            Ok(n) => return Ok(n),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Every object store bucket of the server (its `OBJ_*` streams), sorted.
async fn object_buckets(nc: &async_nats::Client) -> Result<Vec<String>> {
    use futures_util::StreamExt;
    let js = async_nats::jetstream::new(nc.clone());
    let mut names = js.stream_names();
    let mut out = Vec::new();
    while let Some(n) = names.next().await {
        let n = n.map_err(|e| {
            Error::external(format!("cannot list the NATS streams: {}", crate::error::chain(&e)))
                .hint("check the NATS account may use JetStream ($JS.API.STREAM.NAMES)")
        })?;
        if let Some(b) = n.strip_prefix("OBJ_") {
            out.push(b.to_string());
        }
    }
    out.sort();
    Ok(out)
}

async fn open_bucket(nats: &Nats, bucket: &str) -> Result<NatsBucket> {
    NatsBucket::open_on(&nats.client, &nats.target, bucket, true)
        .await?
        .ok_or_else(|| Error::internal(format!("bucket {bucket} was not opened")))
}

fn objects_error(nats: &Nats, bucket: &str, m: String) -> Error {
    Error::external(format!("NATS {} bucket {bucket}: {m}", nats.target.display())).hint(format!(
        "check the site's NATS with `bkbundle doctor --target {}`, then re-run",
        nats.site_target.display()
    ))
}

/// A verified backup, with what opens its members when it is encrypted.
pub struct Sealed<'a> {
    pub backup: &'a crate::bundle::Verified<BackupManifest>,
    pub opener: Option<&'a seal::Opener>,
}

impl Sealed<'_> {
    pub fn manifest(&self) -> &BackupManifest {
        self.backup.manifest()
    }
    pub fn manifest_sha256(&self) -> &str {
        self.backup.manifest_sha256()
    }
    /// A member's content: checked against its digest as it is read, and decrypted.
    pub fn open(&self, file: &str) -> Result<Box<dyn std::io::Read + Send + '_>> {
        let r = self.backup.payload(file)?;
        match self.opener {
            None => Ok(Box::new(r)),
            Some(o) => {
                let d = o.reader(r).map_err(|e| {
                    Error::bundle(format!("{file}: cannot be decrypted: {e}"))
                        .hint("the backup is damaged: copy it again and run `bkbundle backup verify`")
                })?;
                Ok(Box::new(d))
            }
        }
    }
}

/// What opens `backup`'s members: `None` for a backup that is not encrypted; for one that is,
/// its key opened with `unlock` (or a passphrase asked for on a terminal), before anything
/// changes.
pub fn opener(
    backup: &crate::bundle::Verified<BackupManifest>,
    unlock: Option<&seal::Unlock>,
    path: &Path,
) -> Result<Option<seal::Opener>> {
    let Some(enc) = &backup.manifest().encryption else {
        return Ok(None);
    };
    let asked;
    let unlock = match unlock {
        Some(u) => u,
        None if enc.unlock == "passphrase" => match seal::passphrase(None, false)? {
            Some(p) => {
                asked = seal::Unlock::Passphrase(p);
                &asked
            }
            None => return Err(encrypted(path, enc)),
        },
        None => return Err(encrypted(path, enc)),
    };
    let mut member = Vec::new();
    std::io::Read::read_to_end(&mut backup.payload(&enc.key)?, &mut member)
        .map_err(|e| Error::bundle(format!("{}: {e}", enc.key)))?;
    seal::open_key(&member, unlock, &path.display().to_string()).map(Some)
}

fn encrypted(path: &Path, enc: &seal::Encryption) -> Error {
    let how = if enc.unlock == "passphrase" {
        format!(
            "pass its passphrase with --passphrase-file FILE or {}",
            seal::PASSPHRASE_ENV
        )
    } else {
        format!(
            "pass the age identity file of one of its recipients ({}) with --identity FILE",
            enc.recipients.join(", ")
        )
    };
    Error::input(format!("backup {} is encrypted ({})", path.display(), enc.unlock)).hint(how)
}

/// Check a backup (`bkbundle backup verify`): framing, manifest, signature, every byte. With
/// `unlock`, an encrypted backup's members are all decrypted too (which proves the passphrase
/// and every member's authenticity).
pub fn verify(
    path: &Path,
    opts: &crate::bundle::OpenOptions,
    unlock: Option<&seal::Unlock>,
    reporter: &dyn crate::progress::Reporter,
) -> Result<BackupSummary> {
    let b = crate::bundle::open_document::<BackupManifest>(path, opts, reporter)?;
    let mut summary = BackupSummary::of(path, &b);
    if let (Some(enc), Some(unlock)) = (&b.manifest().encryption, unlock) {
        let opener = opener(&b, Some(unlock), path)?;
        let sealed = Sealed {
            backup: &b,
            opener: opener.as_ref(),
        };
        let task = reporter.task("decrypting", Some(b.bytes()));
        for f in b.manifest().files.iter().filter(|f| f.path != enc.key) {
            let mut r = sealed.open(&f.path)?;
            let n = std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| {
                Error::bundle(format!(
                    "backup {}: {}: cannot be decrypted: {e}",
                    path.display(),
                    f.path
                ))
            })?;
            task.advance(n);
        }
        task.finish();
        summary.decrypted = true;
    }
    Ok(summary)
}

/// What `backup verify` and `backup inspect` say about a backup.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupSummary {
    pub file: PathBuf,
    pub bytes: u64,
    pub manifest_sha256: String,
    pub signature: crate::bundle::SignatureStatus,
    pub manifest: BackupManifest,
    /// Whether every byte was checked (verify), or only the structure (inspect).
    pub verified: bool,
    /// Whether every member of an encrypted backup was decrypted (verify with its passphrase).
    pub decrypted: bool,
}

impl BackupSummary {
    fn of(path: &Path, b: &crate::bundle::Verified<BackupManifest>) -> BackupSummary {
        BackupSummary {
            file: path.to_path_buf(),
            bytes: b.bytes(),
            manifest_sha256: b.manifest_sha256().to_string(),
            signature: b.signature().clone(),
            manifest: b.manifest().clone(),
            verified: true,
            decrypted: false,
        }
    }
}

/// What a backup holds (`bkbundle backup inspect`): its structure checked, no payload read.
pub fn inspect(path: &Path, reporter: &dyn crate::progress::Reporter) -> Result<BackupSummary> {
    let opts = crate::bundle::OpenOptions {
        check: crate::bundle::Check::Structure,
        ..Default::default()
    };
    let b = crate::bundle::open_document::<BackupManifest>(path, &opts, reporter)?;
    let mut s = BackupSummary::of(path, &b);
    s.verified = false;
    Ok(s)
}

pub fn render_summary(s: &BackupSummary) -> String {
    use crate::inspect::human;
    let m = &s.manifest;
    let mut out = format!(
        "{} backup {} ({}): {} of {} (compose project {}), taken {} on {} by {}\n",
        if s.verified { "verified" } else { "structure checked:" },
        s.file.display(),
        human(s.bytes),
        m.backup.target,
        m.bundle.name,
        m.backup.project,
        m.backup.created,
        if m.backup.host.is_empty() { "?" } else { &m.backup.host },
        m.backup.created_by
    );
    out.push_str(&format!(
        "needs the bundle {} {} (id {}) to restore\n",
        m.bundle.name, m.bundle.version, m.bundle.manifest_sha256
    ));
    out.push_str(&format!("  site files: {}\n", m.site.len()));
    if let Some(d) = &m.database {
        out.push_str(&format!(
            "  database: service {} ({}, PostgreSQL {}), as {}\n",
            d.service, d.image, d.server_version, d.user
        ));
        for dump in &d.dumps {
            out.push_str(&format!(
                "    {:<24} {:>6} table(s)  dump {:>10}  stored {:>10}\n",
                dump.name,
                dump.tables,
                human(dump.size),
                human(m.stored(&dump.file))
            ));
        }
    }
    let mut buckets: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for o in &m.objects {
        let e = buckets.entry(o.bucket.as_str()).or_default();
        e.0 += 1;
        e.1 += o.size;
    }
    for (b, (n, bytes)) in buckets {
        out.push_str(&format!("  bucket {b}: {n} object(s), {}\n", human(bytes)));
    }
    match &s.signature {
        crate::bundle::SignatureStatus::Unsigned => out.push_str("unsigned\n"),
        crate::bundle::SignatureStatus::Verified { key_id, .. } => {
            out.push_str(&format!("signed by key {key_id} (verified with --key)\n"))
        }
        crate::bundle::SignatureStatus::SelfSigned { key_id, .. } => out.push_str(&format!(
            "signed by key {key_id} (checked only against the key it carries: pass --key to verify who signed it)\n"
        )),
    }
    match (&m.encryption, s.decrypted) {
        (None, _) => out.push_str("not encrypted: it holds the site's secrets, keep it as you keep them"),
        (Some(e), true) => out.push_str(&format!("encrypted (age, {}); every member decrypted and checked", e.unlock)),
        (Some(e), false) => out.push_str(&format!(
            "encrypted (age, {}{}); members checked as stored, not opened (give the passphrase or identity to open them)",
            e.unlock,
            if e.recipients.is_empty() { String::new() } else { format!(": {}", e.recipients.join(", ")) }
        )),
    }
    out
}
