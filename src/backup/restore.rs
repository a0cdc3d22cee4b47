//! `bkbundle restore`: bring a site back from a backup, on its own host (after a `down -v`, a
//! disk failure) or on a new one.
//!
//! Nothing changes before the backup and the bundle are verified, the backup's bundle is the one
//! given, and preflight has said what would be replaced (refused unless `--force`). Then, each
//! step recorded in `TARGET/.bkbundle/restore.json` so that a re-run after a kill completes the
//! restore: the site files are written; the bundle's images loaded; a running stack stopped
//! (never `down -v`); the database service alone started and every database restored, each in
//! one transaction (all of it or nothing), before the server ever starts; the stack started and
//! waited on; the objects uploaded (digest-checked; one already there is not sent); the install
//! journal written last, so that `install` of the same bundle then says "already installed".
//! Doctor's checks run at the end.

use super::manifest::{BackupManifest, SiteFile};
use super::{objects, pg, take, Sealed, SiteAccess};
use crate::bundle::{self, Verified, VerifiedBundle};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::install::compose::Compose;
use crate::install::journal::{self, Journal};
use crate::progress::{ProgressReader, Reporter};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub backup: PathBuf,
    /// The bundle the backed-up site ran (the backup names it by id).
    pub bundle: PathBuf,
    /// Where to restore to, the compose project (default: the backup's), the install config.
    pub site: SiteAccess,
    /// Replace an existing site's files, databases and containers' state.
    pub force: bool,
    /// Do not back the existing site up before replacing it (with --force).
    pub no_backup: bool,
    /// A trusted minisign key: the backup's signature is then required.
    pub key: Option<PathBuf>,
    /// What opens an encrypted backup (asked for on a terminal when missing).
    pub unlock: Option<super::seal::Unlock>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreStep {
    pub name: String,
    pub seconds: f64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup: PathBuf,
    pub target: PathBuf,
    pub project: String,
    pub bundle: journal::BundleId,
    /// What was there and was replaced (with --force).
    pub replaced: Vec<String>,
    /// The backup of the replaced site, when one was taken.
    pub safety_backup: Option<PathBuf>,
    pub steps: Vec<RestoreStep>,
    pub services: Vec<crate::install::health::ServiceHealth>,
    /// Doctor's findings after the restore (severity, subject, message).
    pub doctor: Vec<String>,
    pub doctor_errors: usize,
    pub doctor_warnings: usize,
    pub notes: Vec<String>,
    pub seconds: f64,
}

/// What a restore has done so far, for a re-run after a kill.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    /// SHA-256 of the backup's manifest: a state of another backup is started afresh.
    backup: String,
    completed: Vec<String>,
    /// Databases whose restore began: on a re-run, what is in them is this restore's own work.
    begun: Vec<String>,
}

const STATE_FILE: &str = "restore.json";

impl State {
    fn path(target: &Path) -> PathBuf {
        target.join(journal::DIR).join(STATE_FILE)
    }
    fn load(target: &Path, backup: &str) -> State {
        let s: Option<State> = std::fs::read(Self::path(target))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match s {
            Some(s) if s.backup == backup => s,
            _ => State {
                backup: backup.to_string(),
                ..Default::default()
            },
        }
    }
    fn save(&self, target: &Path) -> Result<()> {
        journal::state_dir(target)?;
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::internal(format!("restore state: {e}")))?;
        journal::write_atomic(&Self::path(target), &text, 0o600)
    }
    fn done(&self, step: &str) -> bool {
        self.completed.iter().any(|s| s == step)
    }
    fn mark(&mut self, target: &Path, step: &str) -> Result<()> {
        if !self.done(step) {
            self.completed.push(step.to_string());
        }
        self.save(target)
    }
}

pub fn run(opts: &RestoreOptions, reporter: &dyn Reporter) -> Result<RestoreReport> {
    crate::runtime::block_on(restore(opts, reporter))?
}

async fn restore(opts: &RestoreOptions, reporter: &dyn Reporter) -> Result<RestoreReport> {
    let t0 = Instant::now();
    let mut steps = Vec::new();

    // 1. Verify the backup and the bundle: a damaged one changes nothing.
    let t = Instant::now();
    let vopts = bundle::OpenOptions {
        require_signature: opts.key.is_some(),
        key: opts.key.clone(),
        threads: None,
        check: bundle::Check::Full,
    };
    let backup: Verified<BackupManifest> =
        tokio::task::block_in_place(|| bundle::open_document(&opts.backup, &vopts, reporter))?;
    let m = backup.manifest().clone();
    let bopts = bundle::OpenOptions {
        check: bundle::Check::Full,
        ..Default::default()
    };
    let reader = Arc::new(tokio::task::block_in_place(|| {
        bundle::open_verified(&opts.bundle, &bopts, reporter)
    })?);
    same_bundle(&m, &reader, &opts.bundle)?;
    let opener = super::opener(&backup, opts.unlock.as_ref(), &opts.backup)?;
    let backup = Sealed {
        backup: &backup,
        opener: opener.as_ref(),
    };
    steps.push(step(
        "verify",
        t,
        format!("backup and bundle {} {} verified", m.bundle.name, m.bundle.version),
    ));

    // 2. Where, and the lock before anything changes.
    let target = super::absolute(&opts.site.target);
    let project = opts.site.project.clone().unwrap_or_else(|| m.backup.project.clone());
    std::fs::create_dir_all(&target).map_err(|e| Error::io("cannot create the target directory", &target, e))?;
    let wait = opts.site.lock_wait.unwrap_or(crate::lock::DEFAULT_WAIT);
    let _lock = tokio::task::block_in_place(|| crate::lock::acquire_target(&target, wait, &|n| reporter.note(n)))?;
    let mut state = State::load(&target, backup.manifest_sha256());
    let engine = Engine::connect().await?;
    let compose = Compose::detect()?;
    let compose_file = compose_file(&target, &reader)?;
    let site = SiteAccess {
        target: target.clone(),
        project: Some(project.clone()),
        ..opts.site.clone()
    };
    let mut notes = Vec::new();

    // 3. Preflight: what would be replaced, room for it.
    let t = Instant::now();
    let resumed = !state.completed.is_empty() || !state.begun.is_empty();
    let replaced = if resumed {
        vec![]
    } else {
        what_is_replaced(&backup, &target, &engine, &project, &site).await?
    };
    if !replaced.is_empty() && !opts.force {
        return Err(Error::new(crate::error::Kind::Preflight, format!(
            "{} already holds a site; restoring {} would replace:\n  - {}",
            target.display(),
            opts.backup.display(),
            replaced.join("\n  - ")
        ))
        .hint(format!(
            "nothing was changed; to replace it, re-run with --force (the site there is backed up first into {}/{}, unless --no-backup)",
            target.display(),
            take::BACKUPS_DIR
        ))
        .hint("or restore into an empty directory (--target) with another compose project (--project)"));
    }
    check_space(&m, &engine, &target).await?;
    steps.push(step("preflight", t, format!("{} thing(s) to replace", replaced.len())));

    // 4. The site there is backed up before anything of it is replaced.
    let mut safety_backup = None;
    if !replaced.is_empty() && !opts.no_backup && Journal::load(&target)?.bundle.is_some() {
        let t = Instant::now();
        let bopts = take::BackupOptions {
            site: site_for_existing(&site, &target),
            output: None,
            sign_key: None,
            keep: 0,
            seal: None,
        };
        match take::take(&bopts, reporter).await {
            Ok(r) => {
                steps.push(step("safety backup", t, r.file.display().to_string()));
                safety_backup = Some(r.file);
            }
            Err(e) => {
                return Err(Error::new(
                    e.kind,
                    format!(
                        "the site in {} could not be backed up before it is replaced: {}",
                        target.display(),
                        e.message
                    ),
                )
                .hint(
                    "start its stack so that it can be backed up, or pass --no-backup to replace it without a backup",
                ))
            }
        }
    }

    // 5. The steps.
    if !state.done("files") {
        let t = Instant::now();
        let n = write_site_files(&backup, &target)?;
        state.mark(&target, "files")?;
        steps.push(step("files", t, format!("{n} file(s) written")));
    }
    let env_file = target.join(".env");
    let env_arg = env_file.is_file().then_some(env_file.as_path());
    let site = super::reload_site(site, &target);
    if !state.done("images") {
        let t = Instant::now();
        let d = crate::install::ensure_images(&engine, &reader, reporter).await?;
        state.mark(&target, "images")?;
        steps.push(step("images", t, d));
    }
    if !state.done("stop") {
        let t = Instant::now();
        let running = engine
            .project_containers(&project)
            .await?
            .into_iter()
            .filter(|c| c.status == "running" || c.status == "restarting")
            .count();
        if running > 0 {
            reporter.note(&format!(
                "stopping the {running} running container(s) of compose project {project}"
            ));
            compose.stop(&project, &compose_file, env_arg)?;
        }
        state.mark(&target, "stop")?;
        steps.push(step("stop", t, format!("{running} container(s) stopped")));
    }
    // The database service (and, when the stack runs it, NATS) alone: the databases are restored
    // before the server ever starts, and the objects go in at the same time.
    let nats_service = if state.done("objects") || m.objects.is_empty() {
        None
    } else {
        nats_service(&compose, &project, &compose_file, env_arg, &site)
    };
    let db_todo = m.database.as_ref().filter(|_| !state.done("database"));
    if let Some(db) = db_todo {
        let mut first: Vec<&str> = vec![&db.service];
        first.extend(nats_service.as_deref());
        reporter.note(&format!("starting {} alone", first.join(" and ")));
        compose.up_services(&project, &compose_file, env_arg, &first)?;
    }
    let objects_early = nats_service.is_some() && db_todo.is_some();
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(site.config.health.timeout_secs);
    let mut object_notes = Vec::new();
    let databases = async {
        match db_todo {
            Some(db) => restore_databases(&backup, db, &engine, &site, &project, &mut state, opts.force, reporter)
                .await
                .map(Some),
            None => Ok(None),
        }
    };
    let objects = async {
        match objects_early {
            true => restore_objects(&backup, &site, Some(deadline), reporter, &mut object_notes)
                .await
                .map(Some),
            false => Ok(None),
        }
    };
    let (databases, objects) = tokio::join!(databases, objects);
    let (databases, objects) = (databases?, objects?);
    notes.append(&mut object_notes);
    if let Some(d) = databases {
        state.mark(&target, "database")?;
        steps.push(step("database", t, d));
    }
    if let Some(d) = objects {
        state.mark(&target, "objects")?;
        steps.push(step("objects", t, d));
    }
    let t = Instant::now();
    reporter.note(&format!("starting compose project {project} in {}", target.display()));
    compose.up(&project, &compose_file, env_arg)?;
    steps.push(step("start", t, format!("{} -p {project} up -d", compose.name())));
    let t = Instant::now();
    let wait = crate::install::health::WaitOptions {
        project: project.clone(),
        timeout: Duration::from_secs(site.config.health.timeout_secs),
        steady: Duration::from_secs(site.config.health.steady_secs),
        poll: Duration::from_millis(250),
    };
    let services = crate::install::health::wait(&engine, &wait, &|n| reporter.note(n)).await?;
    steps.push(step("health", t, format!("{} service(s) ready", services.len())));
    if !state.done("objects") {
        let t = Instant::now();
        let d = restore_objects(&backup, &site, None, reporter, &mut notes).await?;
        state.mark(&target, "objects")?;
        steps.push(step("objects", t, d));
    }
    // The journal last: until it is there, `install` does not take the site for installed.
    let t = Instant::now();
    write_journal(&backup, &target, &project, &opts.backup)?;
    let _ = std::fs::remove_file(State::path(&target));
    steps.push(step("journal", t, "the install journal of the backup".into()));

    // 6. Doctor's checks on what was brought back.
    let t = Instant::now();
    let dopts = crate::doctor::DoctorOptions {
        bundle: Some(opts.bundle.clone()),
        config: site.config.clone(),
        site: site.site.clone(),
        project: Some(project.clone()),
        database_url: None,
        nats_url: site.nats_url.clone(),
        bucket: None,
        fix: false,
        images_from: None,
        registry: Default::default(),
    };
    let env = |n: &str| std::env::var(n).ok();
    let dr = crate::doctor::run_with_env(&dopts, &env).await;
    let doctor: Vec<String> = dr
        .findings
        .iter()
        .filter(|f| f.severity != crate::doctor::Severity::Info)
        .map(|f| format!("{:?} {} {}: {}", f.severity, f.check, f.subject, f.message))
        .collect();
    steps.push(step(
        "doctor",
        t,
        format!("{} error(s), {} warning(s)", dr.errors, dr.warnings),
    ));

    Ok(RestoreReport {
        backup: opts.backup.clone(),
        target,
        project,
        bundle: m.bundle.clone(),
        replaced,
        safety_backup,
        steps,
        services,
        doctor,
        doctor_errors: dr.errors,
        doctor_warnings: dr.warnings,
        notes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn step(name: &str, t: Instant, detail: String) -> RestoreStep {
    RestoreStep {
        name: name.into(),
        seconds: t.elapsed().as_secs_f64(),
        detail,
    }
}

/// The bundle given is the one the backed-up site ran.
fn same_bundle(m: &BackupManifest, reader: &VerifiedBundle, path: &Path) -> Result<()> {
    let b = reader.manifest();
    if reader.manifest_sha256() == m.bundle.manifest_sha256 {
        return Ok(());
    }
    Err(Error::input(format!(
        "the backup was taken of a site running bundle {} {} (id {}), but {} is bundle {} {} (id {})",
        m.bundle.name,
        m.bundle.version,
        m.bundle.manifest_sha256,
        path.display(),
        b.bundle.name,
        b.bundle.version,
        reader.manifest_sha256()
    ))
    .hint(format!(
        "nothing was changed; pass the bundle {} {} with --bundle (`bkbundle inspect` shows a bundle's id); to move the site to a newer bundle, restore with the old one, then install the new one",
        m.bundle.name, m.bundle.version
    )))
}

/// The compose file's path in the target (the bundle's stack).
fn compose_file(target: &Path, reader: &VerifiedBundle) -> Result<PathBuf> {
    let stack = reader
        .manifest()
        .stack
        .as_ref()
        .ok_or_else(|| Error::input("the bundle has no compose stack to restore"))?;
    Ok(target.join(crate::bundle::layout::stack_relative(&stack.compose)))
}

/// Everything at the target that the restore would replace: files that differ, a stack with
/// containers, databases that hold tables.
async fn what_is_replaced(
    backup: &Sealed<'_>,
    target: &Path,
    engine: &Engine,
    project: &str,
    site: &SiteAccess,
) -> Result<Vec<String>> {
    let m = backup.manifest();
    let mut out = Vec::new();
    for f in &m.site {
        let path = target.join(&f.path);
        let Ok(have) = std::fs::read(&path) else { continue };
        if crate::digest::sha256_hex(&have) != f.sha256 {
            out.push(format!("file {} (different from the backup's)", path.display()));
        }
    }
    let containers = engine.project_containers(project).await?;
    if !containers.is_empty() {
        out.push(format!(
            "the {} container(s) of compose project {project} (stopped; their volumes are kept)",
            containers.len()
        ));
    }
    // A running database with tables in a database of the backup: its content would be replaced.
    if let Some(db) = &m.database {
        let c = containers
            .iter()
            .find(|c| c.service == db.service && c.status == "running");
        if let Some(c) = c {
            let local = super::reload_site(site.clone(), target);
            let (user, password) = local.database_login();
            let pg = pg::Postgres::new(engine, &c.id, &c.name, &user, password.as_deref());
            if let Ok(dbs) = pg.databases().await {
                for d in dbs {
                    if d.tables > 0 && db.dumps.iter().any(|x| x.name == d.name) {
                        out.push(format!(
                            "database {} ({} table(s), {})",
                            d.name,
                            d.tables,
                            crate::inspect::human(d.size_bytes)
                        ));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The engine's disk must take the databases and the objects.
async fn check_space(m: &BackupManifest, engine: &Engine, target: &Path) -> Result<()> {
    let need: u64 = m
        .database
        .iter()
        .flat_map(|d| d.dumps.iter().map(|x| x.size))
        .chain(m.objects.iter().map(|o| o.size))
        .fold(0u64, u64::saturating_add);
    let root = engine.data_root().await.unwrap_or_default();
    let at = if root.is_empty() {
        target.to_path_buf()
    } else {
        PathBuf::from(root)
    };
    if let Some(free) = crate::install::free_space(&at) {
        if free < need {
            return Err(Error::new(crate::error::Kind::Preflight, format!(
                "not enough space in {} (the Docker engine's data) for the restored databases and objects: {} needed, {} free",
                at.display(),
                crate::inspect::human(need),
                crate::inspect::human(free)
            ))
            .hint("nothing was changed; free space there (e.g. `docker image prune`), then re-run"));
        }
    }
    Ok(())
}

/// A copy of `site` that reads the existing target (for its safety backup).
fn site_for_existing(site: &SiteAccess, target: &Path) -> SiteAccess {
    let mut s = super::reload_site(site.clone(), target);
    s.project = None;
    s
}

/// Write the backup's files into the target (each atomically, with its mode), but the journal.
fn write_site_files(backup: &Sealed<'_>, target: &Path) -> Result<usize> {
    let m = backup.manifest();
    let journal_rel = format!("{}/{}", journal::DIR, journal::FILE);
    let mut n = 0;
    for f in m.site.iter().filter(|f| f.path != journal_rel) {
        write_one(backup, target, f)?;
        n += 1;
    }
    Ok(n)
}

fn write_one(backup: &Sealed<'_>, target: &Path, f: &SiteFile) -> Result<()> {
    let dest = target.join(&f.path);
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create directory", dir, e))?;
    }
    // The state directory and what is under it stay private (the site CA's key is there).
    if f.path.starts_with(&format!("{}/", journal::DIR)) {
        journal::state_dir(target)?;
        if let Some(dir) = dest.parent().filter(|d| *d != target.join(journal::DIR)) {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io("cannot set permissions of", dir, e))?;
        }
    }
    // Streamed: a site file may be large.
    let mut r = backup.open(&f.file)?;
    journal::write_atomic_with(&dest, f.mode & 0o7777, |out, tmp| {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::bundle(format!("{}: {e}", f.file))
                        .hint("nothing of it was written; run `bkbundle backup verify` on the backup"))
                }
            };
            std::io::Write::write_all(out, &buf[..n]).map_err(|e| Error::io("cannot write", tmp, e))?;
        }
    })
}

/// The backup's journal, as the target's, naming the project it now runs as and the restore.
fn write_journal(backup: &Sealed<'_>, target: &Path, project: &str, from: &Path) -> Result<()> {
    let m = backup.manifest();
    let journal_rel = format!("{}/{}", journal::DIR, journal::FILE);
    let mut j = match m.site.iter().find(|f| f.path == journal_rel) {
        Some(f) => {
            let mut r = backup.open(&f.file)?;
            let mut b = Vec::new();
            r.read_to_end(&mut b)
                .map_err(|e| Error::bundle(format!("{}: {e}", f.file)))?;
            serde_json::from_slice::<Journal>(&b).unwrap_or_default()
        }
        None => Journal::default(),
    };
    j.bundle = Some(m.bundle.clone());
    j.project = Some(project.to_string());
    let now = crate::install::now();
    j.history.push(journal::Run {
        bundle: m.bundle.clone(),
        started: now.clone(),
        finished: Some(now),
        outcome: format!("restored from {}", from.display()),
    });
    j.save(target)
}

/// Restore every database of the backup into the database service (started by the caller).
#[allow(clippy::too_many_arguments)]
async fn restore_databases(
    backup: &Sealed<'_>,
    db: &super::manifest::Database,
    engine: &Engine,
    site: &SiteAccess,
    project: &str,
    state: &mut State,
    force: bool,
    reporter: &dyn Reporter,
) -> Result<String> {
    let target = site.target.clone();
    let (user, password) = site.database_login();
    let container = wait_for_database(engine, project, &db.service, &user, password.as_deref(), site).await?;
    let pg = pg::Postgres::new(engine, &container.id, &container.name, &user, password.as_deref());
    let existing: BTreeMap<String, u64> = pg.databases().await?.into_iter().map(|d| (d.name, d.tables)).collect();
    let mut restored = 0;
    for d in &db.dumps {
        let key = format!("database:{}", d.name);
        if state.done(&key) {
            continue;
        }
        let ours = state.begun.contains(&d.name);
        match existing.get(&d.name) {
            Some(tables) if *tables > 0 && !(ours || force) => {
                return Err(Error::input(format!(
                    "database {} in {} already holds {tables} table(s): it is another site's data",
                    d.name, container.name
                ))
                .hint("nothing was restored into it; re-run with --force to replace it"));
            }
            Some(tables) if *tables > 0 => {
                pg.drop_database(&d.name).await?;
                pg.create_database(&d.name).await?;
            }
            Some(_) => {}
            None => pg.create_database(&d.name).await?,
        }
        state.begun.push(d.name.clone());
        state.save(&target)?;
        let task = reporter.task(&format!("restoring database {}", d.name), Some(d.size));
        let r = backup.open(&d.file)?;
        let z =
            zstd::stream::Decoder::new(r).map_err(|e| Error::io("cannot read the backup", Path::new(&d.file), e))?;
        let mut input = ProgressReader { inner: z, task: &*task };
        pg.restore(&d.name, &mut input).await?;
        task.finish();
        state.mark(&target, &key)?;
        restored += 1;
    }
    Ok(format!("{restored} database(s) restored into {}", container.name))
}

/// The database service's container, once PostgreSQL answers in it on the network (the image's
/// first-start setup server answers on the socket alone, then stops).
async fn wait_for_database(
    engine: &Engine,
    project: &str,
    service: &str,
    user: &str,
    password: Option<&str>,
    site: &SiteAccess,
) -> Result<crate::engine::ContainerState> {
    let deadline = Instant::now() + Duration::from_secs(site.config.health.timeout_secs);
    let mut last = String::from("its container did not start");
    // An image's entrypoint may run a temporary server on the socket while it initialises a new
    // data directory, then stop it: PostgreSQL is ready when it answers and listens on the
    // network, and the container's health check (where it has one) says so.
    loop {
        let all = engine.project_containers(project).await?;
        if let Some(c) = all.iter().find(|c| c.service == service && c.status == "running") {
            let pg = pg::Postgres::new(engine, &c.id, &c.name, user, password);
            // Not the image's first-start setup server (socket only, stopped a moment later):
            // a restore into it fails when it shuts down.
            let probe = async {
                pg.server_version().await?;
                pg.listens().await
            };
            match probe.await {
                Ok(true) if matches!(c.health.as_deref(), None | Some("healthy")) => return Ok(c.clone()),
                Ok(true) => {
                    last = format!(
                        "its health check says {}",
                        c.health.as_deref().unwrap_or_default()
                    )
                }
                Ok(false) => {
                    last = "it answers on its socket only (listen_addresses is empty): the image's first-start setup is still running".into()
                }
                Err(e) => last = e.message,
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::external(format!(
                "the database service {service} of compose project {project} did not answer within {} s: {last}",
                site.config.health.timeout_secs
            ))
            .hint(format!("look at its log: docker logs $(docker ps -aq -f label=com.docker.compose.service={service}); then re-run restore: it resumes")));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The compose service that publishes the site's NATS port (from the stack's `compose config`),
/// when there is one: restore starts it with the database and uploads the objects meanwhile.
fn nats_service(
    compose: &Compose,
    project: &str,
    compose_file: &Path,
    env_file: Option<&Path>,
    site: &SiteAccess,
) -> Option<String> {
    let port = crate::platform::nats::host_port(site.nats_target().ok()?.urls.first()?).1;
    let yaml = compose.config(project, compose_file, env_file).ok()?;
    crate::install::published_ports(&yaml)
        .into_iter()
        .find(|(_, _, p, _)| *p == port)
        .map(|(service, ..)| service)
}

/// Every object of the backup into its bucket; one already there with its digest is not sent.
/// With a `deadline`, NATS may still be starting: it is waited for until then.
async fn restore_objects(
    backup: &Sealed<'_>,
    site: &SiteAccess,
    deadline: Option<Instant>,
    reporter: &dyn Reporter,
    notes: &mut Vec<String>,
) -> Result<String> {
    let m = backup.manifest();
    if m.objects.is_empty() {
        return Ok("no objects".into());
    }
    let nats = match deadline {
        Some(d) => super::connect_nats_when_ready(site, d).await?,
        None => super::connect_nats(site).await?,
    };
    let Some(nats) = nats else {
        return Err(Error::input(format!(
            "the backup holds {} object(s), but the restored site has no NATS to put them in (no NATS_* in its .env, no [nats] url)",
            m.objects.len()
        ))
        .hint("give the NATS URL in the install config ([nats] url) and re-run restore"));
    };
    let mut by_bucket: BTreeMap<&str, Vec<&super::manifest::ObjectEntry>> = BTreeMap::new();
    for o in &m.objects {
        by_bucket.entry(o.bucket.as_str()).or_default().push(o);
    }
    let (mut sent, mut present, mut bytes) = (0usize, 0usize, 0u64);
    for (bucket, list) in by_bucket {
        let (_guard, pending) = crate::packages::lock_bucket(&nats.target.display(), bucket, notes)
            .await
            .map_err(Error::from)?;
        let store = super::open_bucket(&nats, bucket).await?;
        let total: u64 = list.iter().map(|o| o.size).sum();
        let task = reporter.task(&format!("bucket {bucket}"), Some(total));
        for o in list {
            task.message(&o.name);
            let rec = objects::ObjectRecord {
                name: o.name.clone(),
                description: o.description.clone(),
                size: o.size,
                digest: o.digest.clone(),
                meta: o.meta.clone(),
            };
            let r = backup.open(&o.file)?;
            let mut input = ProgressReader { inner: r, task: &*task };
            match objects::upload(&store, &rec, &mut input, Some(&pending))
                .await
                .map_err(|e| super::objects_error(&nats, bucket, e))?
            {
                objects::UploadOutcome::Present => present += 1,
                objects::UploadOutcome::Sent { bytes: b } => {
                    sent += 1;
                    bytes += b;
                }
            }
        }
        task.finish();
    }
    Ok(format!(
        "{sent} object(s) uploaded ({}), {present} already there",
        crate::inspect::human(bytes)
    ))
}

pub fn render(r: &RestoreReport) -> String {
    let mut s = format!(
        "restored {} into {} (compose project {}, bundle {} {})\n",
        r.backup.display(),
        r.target.display(),
        r.project,
        r.bundle.name,
        r.bundle.version
    );
    for x in &r.replaced {
        s.push_str(&format!("  replaced: {x}\n"));
    }
    if let Some(b) = &r.safety_backup {
        s.push_str(&format!(
            "  the site it replaced was backed up first to {}\n",
            b.display()
        ));
    }
    for st in &r.steps {
        s.push_str(&format!("  {:<14} {:>6.1} s  {}\n", st.name, st.seconds, st.detail));
    }
    for sv in &r.services {
        s.push_str(&format!("  {:<14} {}\n", sv.service, sv.state));
    }
    s.push_str(&format!(
        "doctor: {} error(s), {} warning(s)\n",
        r.doctor_errors, r.doctor_warnings
    ));
    for d in &r.doctor {
        s.push_str(&format!("  - {d}\n"));
    }
    for n in &r.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    s.push_str(&format!("took {:.1} s", r.seconds));
    s
}
