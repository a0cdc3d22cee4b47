//! `bkbundle backup`: the site's database, objects, stack files and secrets into one `.bkbak`.
//!
//! The site keeps running. Each part is streamed into the archive as it is read: the database by
//! the `pg_dump` of the image the stack runs (through the Engine API, compressed here with
//! zstd), each object chunk by chunk, each file of the target directory. Nothing is staged: the
//! archive is written under a temporary name (mode 0600 from its first byte: it holds the
//! site's secrets) and renamed only when complete, so a failed or killed backup leaves no file
//! that looks like a backup.

use super::manifest::{
    BackupInfo, BackupManifest, Database, Dump, ObjectEntry, SiteFile, DATABASE_DIR, FORMAT, OBJECTS_DIR, SITE_DIR,
};
use super::{objects, pg, SiteAccess};
use crate::bundle::BundleWriter;
use crate::error::{Error, Result};
use crate::install::journal::{self, BundleId, Journal};
use crate::progress::{ProgressWriter, Reporter};
use serde::Serialize;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where automatic backups go, inside the target.
pub const BACKUPS_DIR: &str = "backups";
/// The extension of a backup file.
pub const EXTENSION: &str = "bkbak";

#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    pub site: SiteAccess,
    /// The backup file; default `TARGET/backups/site-<time>.bkbak`.
    pub output: Option<PathBuf>,
    /// Sign the manifest with this minisign secret key.
    pub sign_key: Option<PathBuf>,
    /// How many backups of `TARGET/backups` to keep after writing one there (0: keep all).
    pub keep: usize,
    /// Encrypt every member (see [`super::seal`]).
    pub seal: Option<super::seal::SealWith>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartReport {
    /// "site files", "database bklite", "bucket bklite".
    pub part: String,
    pub items: usize,
    /// Bytes read from the site.
    pub bytes: u64,
    /// Bytes in the backup.
    pub stored: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub file: PathBuf,
    pub bytes: u64,
    pub bundle: BundleId,
    pub target: PathBuf,
    pub project: String,
    pub parts: Vec<PartReport>,
    pub signed_by: Option<String>,
    /// Backups removed by `keep`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<PathBuf>,
    pub notes: Vec<String>,
    pub seconds: f64,
}

/// Take a backup (`bkbundle backup`): the target's lock first (an install or restore must not
/// change the site while it is read), then [`take`].
pub fn run(opts: &BackupOptions, reporter: &dyn Reporter) -> Result<BackupReport> {
    crate::runtime::block_on(async {
        let target = &opts.site.target;
        super::require_installed(target)?;
        let wait = opts.site.lock_wait.unwrap_or(crate::lock::DEFAULT_WAIT);
        let _lock = tokio::task::block_in_place(|| crate::lock::acquire_target(target, wait, &|m| reporter.note(m)))?;
        take(opts, reporter).await
    })?
}

/// The default file name of a backup taken now: `site-<UTC time>.bkbak`, sorting by time.
pub fn default_name() -> String {
    let stamp = crate::install::now().replace([':', '-'], "");
    format!("site-{}.{EXTENSION}", stamp.trim_end_matches('Z'))
}

/// What a backup of the site would hold and take, found without writing anything: install's
/// preflight asks it before an upgrade (see [`survey`]), and [`take`] before it writes.
#[derive(Debug, Clone, Serialize)]
pub struct Survey {
    /// The directory the backup would be written in.
    pub dir: PathBuf,
    /// Bytes it may take at most: the databases' size on disk (an upper bound of their dumps),
    /// every object's size, every file's.
    pub need: u64,
    pub databases: usize,
    pub objects: usize,
    pub files: usize,
    /// Free bytes in `dir` (or the nearest directory above it that exists), when known.
    pub free: Option<u64>,
    /// What the backup leaves out (no database service, no NATS, links).
    pub notes: Vec<String>,
}

impl Survey {
    /// The problem when the backup does not fit in its directory.
    pub fn shortfall(&self) -> Option<String> {
        let free = self.free.filter(|f| *f < self.need)?;
        Some(format!(
            "not enough space for the backup in {}: up to {} needed (the databases' size, {} object(s), {} file(s)), {} free",
            self.dir.display(),
            crate::inspect::human(self.need),
            self.objects,
            self.files,
            crate::inspect::human(free)
        ))
    }
}

/// What a backup of the site in `opts` (to `opts.output`, by default into `TARGET/backups`) would
/// hold and need, without writing anything: the databases listed through the database service's
/// container, the objects through NATS, the files walked.
pub async fn survey(opts: &BackupOptions) -> Result<Survey> {
    let target = &opts.site.target;
    let journal = Journal::load(target)?;
    journal.bundle.as_ref().ok_or_else(|| super::not_installed(target))?;
    let project = opts.site.project(&journal);
    let output = output_path(opts);
    let engine = crate::engine::Engine::connect().await?;
    let found = find(&engine, opts, &project, &output).await?;
    Ok(found.survey(&output))
}

/// The backup's file: `--output`, else a new name in `TARGET/backups`.
fn output_path(opts: &BackupOptions) -> PathBuf {
    match &opts.output {
        Some(o) => o.clone(),
        None => opts.site.target.join(BACKUPS_DIR).join(default_name()),
    }
}

/// The database service's container as a backup reads it: the handle, the service, its image,
/// the server's version, the databases.
type FoundDatabase<'e> = (pg::Postgres<'e>, String, String, String, Vec<pg::Database>);

/// What there is to back up.
struct Found<'e> {
    database: Option<FoundDatabase<'e>>,
    nats: Option<super::Nats>,
    listed: Vec<(String, crate::ports::live::NatsBucket, Vec<objects::ObjectRecord>)>,
    files: Vec<LocalFile>,
    notes: Vec<String>,
}

impl Found<'_> {
    fn survey(&self, output: &Path) -> Survey {
        let databases: &[pg::Database] = self.database.as_ref().map(|d| d.4.as_slice()).unwrap_or(&[]);
        let need = databases
            .iter()
            .map(|d| d.size_bytes)
            .chain(self.listed.iter().flat_map(|(_, _, r)| r.iter().map(|o| o.size)))
            .chain(self.files.iter().map(|f| f.size))
            .fold(0u64, u64::saturating_add);
        let dir = output
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Survey {
            free: crate::install::free_space(&dir),
            dir,
            need,
            databases: databases.len(),
            objects: self.listed.iter().map(|(_, _, r)| r.len()).sum(),
            files: self.files.len(),
            notes: self.notes.clone(),
        }
    }
}

/// The database's container and databases, the buckets and their objects, the files. A stack
/// without the database service, or a site without NATS, is backed up without them (noted).
async fn find<'e>(
    engine: &'e crate::engine::Engine,
    opts: &BackupOptions,
    project: &str,
    output: &Path,
) -> Result<Found<'e>> {
    let target = &opts.site.target;
    let mut notes = Vec::new();
    let (user, password) = opts.site.database_login();
    let database = match super::database_container(engine, project, &opts.site).await? {
        Some((container, service)) => {
            let db = pg::Postgres::new(engine, &container.id, &container.name, &user, password.as_deref());
            let server_version = db.server_version().await?;
            let databases = db.databases().await?;
            let image = engine.container_image(&container.id).await?.unwrap_or_default();
            Some((db, service, image, server_version, databases))
        }
        None => {
            notes.push(format!(
                "compose project {project} has no service {} (the platform's PostgreSQL): no database in this backup ([backup] database_service names another)",
                opts.site.config.backup.database_service
            ));
            None
        }
    };
    let nats = match super::stack_without_nats(engine, project, &opts.site).await? {
        Some(why) => {
            notes.push(why);
            None
        }
        None => {
            let nats = super::connect_nats(&opts.site).await?;
            if nats.is_none() {
                notes.push(
                    "the site has no NATS (no NATS_* in its .env, no [nats] url): no objects in this backup".into(),
                );
            }
            nats
        }
    };
    let mut listed = Vec::new();
    if let Some(nats) = &nats {
        for b in super::object_buckets(&nats.client).await? {
            let store = super::open_bucket(nats, &b).await?;
            let records = objects::list(&store)
                .await
                .map_err(|m| super::objects_error(nats, &b, m))?;
            listed.push((b, store, records));
        }
    }
    let skip = output_skip(target, output);
    let files = site_files(target, &skip, &mut notes)?;
    Ok(Found {
        database,
        nats,
        listed,
        files,
        notes,
    })
}

/// Take the backup; the caller holds the target's lock (install, before an upgrade, does).
pub async fn take(opts: &BackupOptions, reporter: &dyn Reporter) -> Result<BackupReport> {
    let t0 = Instant::now();
    let target = &opts.site.target;
    let journal = Journal::load(target)?;
    let bundle = journal.bundle.clone().ok_or_else(|| super::not_installed(target))?;
    let project = opts.site.project(&journal);
    let output = output_path(opts);
    let signer = opts.sign_key.as_deref().map(crate::sign::Signer::load).transpose()?;

    // 1. What there is: the database's container and databases, the buckets, the files.
    let engine = crate::engine::Engine::connect().await?;
    let found = find(&engine, opts, &project, &output).await?;
    let survey = found.survey(&output);
    let Found {
        database,
        nats,
        listed,
        files,
        mut notes,
    } = found;
    let databases: &[pg::Database] = database.as_ref().map(|d| d.4.as_slice()).unwrap_or(&[]);
    let (user, _) = opts.site.database_login();

    // 2. Room for it: the databases' size is an upper bound of their dumps.
    let dir = &survey.dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create the backup's directory", dir, e))?;
    if *dir == target.join(BACKUPS_DIR) {
        // What a killed backup left there (the target's lock is held: no backup is writing it).
        for stale in partials(dir) {
            if std::fs::remove_file(&stale).is_ok() {
                notes.push(format!("removed {}, left by a backup that was killed", stale.display()));
            }
        }
    }
    if let Some(shortfall) = survey.shortfall() {
        return Err(Error::new(crate::error::Kind::Preflight, shortfall)
            .hint("free space there, or write the backup elsewhere with -o PATH (another disk)"));
    }

    // 3. The archive: files, databases, objects; then the manifest.
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut w = BundleWriter::create_with_mode(&output, None, mtime, 0o600)?;
    let (sealer, encryption) = match &opts.seal {
        Some(with) => {
            let (sealer, member, section) = super::seal::new_key(with)?;
            w.add_bytes(super::seal::KEY_MEMBER, 0o600, &member)?;
            (Some(sealer), Some(section))
        }
        None => (None, None),
    };
    let sealer = sealer.as_ref();
    let mut parts = Vec::new();
    let site = write_site_files(&mut w, &files, sealer, reporter, &mut parts)?;
    let mut dumps = Vec::new();
    if let Some((db, ..)) = &database {
        for (i, d) in databases.iter().enumerate() {
            dumps.push(write_dump(&mut w, db, d, i, sealer, reporter, &mut parts).await?);
        }
    }
    let mut objects_out = Vec::new();
    for (bi, (bucket, store, records)) in listed.iter().enumerate() {
        let t = Instant::now();
        let total: u64 = records.iter().map(|r| r.size).sum();
        let task = reporter.task(&format!("bucket {bucket}"), Some(total));
        for (i, rec) in records.iter().enumerate() {
            task.message(&rec.name);
            let path = member(&format!("{OBJECTS_DIR}{bi}/{i}"), sealer);
            let io = |err: std::io::Error| Error::io("cannot write the backup", Path::new(&path), err);
            let fail = |m: String| match &nats {
                Some(n) => super::objects_error(n, bucket, m),
                None => Error::internal(m),
            };
            let e = w.begin(&path, 0o600)?;
            let e = match sealer {
                Some(s) => {
                    let mut sw = s.wrap(e).map_err(io)?;
                    let mut sink = ProgressWriter {
                        inner: &mut sw,
                        task: &*task,
                    };
                    objects::download(store, rec, &mut sink).await.map_err(fail)?;
                    sw.finish().map_err(io)?
                }
                None => {
                    let mut e = e;
                    let mut sink = ProgressWriter {
                        inner: &mut e,
                        task: &*task,
                    };
                    objects::download(store, rec, &mut sink).await.map_err(fail)?;
                    e
                }
            };
            e.finish(None)?;
            objects_out.push(ObjectEntry {
                bucket: bucket.clone(),
                name: rec.name.clone(),
                description: rec.description.clone(),
                size: rec.size,
                digest: rec.digest.clone(),
                meta: rec.meta.clone(),
                file: path,
            });
        }
        task.finish();
        parts.push(PartReport {
            part: format!("bucket {bucket}"),
            items: records.len(),
            bytes: total,
            stored: total,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    let m = BackupManifest {
        format: FORMAT,
        backup: BackupInfo {
            created: crate::install::now(),
            created_by: format!("bkbundle {}", env!("CARGO_PKG_VERSION")),
            host: hostname(),
            target: target.display().to_string(),
            project: project.clone(),
            secrets: true,
            compression: "zstd".into(),
        },
        bundle: bundle.clone(),
        files: w.files().to_vec(),
        site,
        database: database.map(|(_, service, image, server_version, _)| Database {
            service,
            image,
            server_version,
            user,
            dumps,
        }),
        objects: objects_out,
        encryption,
    };
    let text = m.to_toml();
    let signature = match &signer {
        Some(s) => Some(s.sign(
            text.as_bytes(),
            &format!("bkbundle backup of {} ({})", target.display(), bundle.name),
        )?),
        None => None,
    };
    w.add_document(&m, &text, signature.as_ref().map(|(a, b)| (a.as_str(), b.as_str())))?;
    let written = w.commit()?;
    let file = written.into_iter().next().unwrap_or(output.clone());
    let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let pruned = if opts.keep > 0 && file.parent() == Some(target.join(BACKUPS_DIR).as_path()) {
        prune(&target.join(BACKUPS_DIR), opts.keep, &file, &mut notes)
    } else {
        vec![]
    };
    Ok(BackupReport {
        file,
        bytes,
        bundle,
        target: target.clone(),
        project,
        parts,
        signed_by: signer.as_ref().map(|s| s.key_id()),
        pruned,
        notes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// One file of the target directory, to be backed up.
#[derive(Debug, Clone)]
pub struct LocalFile {
    pub rel: String,
    pub path: PathBuf,
    pub mode: u32,
    pub size: u64,
}

/// The paths the walk leaves out: the backups directory, and the output itself when it is
/// written inside the target.
fn output_skip(target: &Path, output: &Path) -> Vec<PathBuf> {
    vec![target.join(BACKUPS_DIR), output.to_path_buf()]
}

/// The state directory's subdirectory of the site CA and certificates (see [`crate::tls::store`]).
const TLS_DIR: &str = "tls";

/// Every regular file under `target` (sorted), but the state directory's (only its journal and
/// its `tls/` (the site CA's key) are kept: locks and staging are a run's own), what `skip` names, temporary files; symbolic links
/// and special files are left out with a note.
pub fn site_files(target: &Path, skip: &[PathBuf], notes: &mut Vec<String>) -> Result<Vec<LocalFile>> {
    let mut out = Vec::new();
    walk(target, target, skip, &mut out, notes)?;
    // The site CA and the NATS certificates install generated live in the state directory.
    let tls = target.join(journal::DIR).join(TLS_DIR);
    if tls.is_dir() {
        walk(target, &tls, skip, &mut out, notes)?;
    }
    let journal = journal::path(target);
    if let Ok(m) = std::fs::metadata(&journal) {
        out.push(LocalFile {
            rel: format!("{}/{}", journal::DIR, journal::FILE),
            path: journal,
            mode: 0o600,
            size: m.len(),
        });
    }
    Ok(out)
}

fn walk(root: &Path, dir: &Path, skip: &[PathBuf], out: &mut Vec<LocalFile>, notes: &mut Vec<String>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io("cannot read directory", dir, e))?;
    let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if skip.contains(&path) || (dir == root && path == root.join(journal::DIR)) {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".bkbundle-tmp") || name.ends_with(".partial") {
            continue;
        }
        let Ok(rel) = path.strip_prefix(root) else { continue };
        let Some(rel) = rel.to_str().map(str::to_string) else {
            notes.push(format!("{}: not backed up (its name is not UTF-8)", path.display()));
            continue;
        };
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io("cannot read", &path, e))?;
        if meta.is_dir() {
            walk(root, &path, skip, out, notes)?;
        } else if meta.is_file() {
            if !crate::manifest::is_safe_bundle_path(&format!("{SITE_DIR}{rel}")) {
                notes.push(format!("{}: not backed up (an unusual name)", path.display()));
                continue;
            }
            out.push(LocalFile {
                rel,
                path,
                mode: meta.permissions().mode() & 0o7777,
                size: meta.len(),
            });
        } else if meta.file_type().is_symlink() {
            let to = std::fs::read_link(&path)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            notes.push(format!(
                "{}: a symbolic link (to {to}), not backed up: make it again after a restore",
                path.display()
            ));
        } else {
            notes.push(format!("{}: not a regular file, not backed up", path.display()));
        }
    }
    Ok(())
}

/// A member's path: `base`, with `.age` when the backup is encrypted.
fn member(base: &str, sealer: Option<&super::seal::Sealer>) -> String {
    match sealer {
        Some(_) => format!("{base}{}", super::seal::SUFFIX),
        None => base.to_string(),
    }
}

fn write_site_files(
    w: &mut BundleWriter,
    files: &[LocalFile],
    sealer: Option<&super::seal::Sealer>,
    reporter: &dyn Reporter,
    parts: &mut Vec<PartReport>,
) -> Result<Vec<SiteFile>> {
    let t = Instant::now();
    let total: u64 = files.iter().map(|f| f.size).sum();
    let task = reporter.task("site files", Some(total));
    let mut out = Vec::new();
    for f in files {
        let file = member(&format!("{SITE_DIR}{}", f.rel), sealer);
        let file_io = |e: std::io::Error| Error::io("cannot back up", &f.path, e);
        let mut r = crate::digest::HashingReader::new(std::fs::File::open(&f.path).map_err(file_io)?);
        match sealer {
            None => {
                w.add_reader(&file, 0o600, &mut r as &mut dyn Read)?;
            }
            Some(s) => {
                let e = w.begin(&file, 0o600)?;
                let mut sw = s.wrap(e).map_err(file_io)?;
                std::io::copy(&mut r, &mut sw).map_err(file_io)?;
                sw.finish().map_err(file_io)?.finish(None)?;
            }
        }
        let sha256 = r.hasher.finish().0;
        task.advance(f.size);
        out.push(SiteFile {
            path: f.rel.clone(),
            file,
            mode: f.mode,
            sha256,
        });
    }
    task.finish();
    parts.push(PartReport {
        part: "site files".into(),
        items: files.len(),
        bytes: total,
        stored: total,
        seconds: t.elapsed().as_secs_f64(),
    });
    Ok(out)
}

/// One database, dumped by the container's `pg_dump` and compressed with zstd on its way in
/// (then encrypted, when the backup is).
async fn write_dump(
    w: &mut BundleWriter,
    db: &pg::Postgres<'_>,
    d: &pg::Database,
    index: usize,
    sealer: Option<&super::seal::Sealer>,
    reporter: &dyn Reporter,
    parts: &mut Vec<PartReport>,
) -> Result<Dump> {
    let t = Instant::now();
    let path = member(&format!("{DATABASE_DIR}{index}.dump.zst"), sealer);
    let task = reporter.task(&format!("database {}", d.name), None);
    let e = w.begin(&path, 0o600)?;
    let io = |err: std::io::Error| Error::io("cannot write the backup", Path::new(&path), err);
    let (e, size) = match sealer {
        Some(s) => {
            let sw = s.wrap(e).map_err(io)?;
            let (sw, size) = compressed_dump(db, &d.name, sw, &*task, &path).await?;
            (sw.finish().map_err(io)?, size)
        }
        None => compressed_dump(db, &d.name, e, &*task, &path).await?,
    };
    let entry = e.finish(None)?;
    task.finish();
    parts.push(PartReport {
        part: format!("database {}", d.name),
        items: 1,
        bytes: size,
        stored: entry.size,
        seconds: t.elapsed().as_secs_f64(),
    });
    Ok(Dump {
        name: d.name.clone(),
        file: path,
        size,
        tables: d.tables,
    })
}

/// `pg_dump` of `name` into `w` through zstd; `w` back, and the dump's size.
async fn compressed_dump<W: Write + Send>(
    db: &pg::Postgres<'_>,
    name: &str,
    w: W,
    task: &dyn crate::progress::Task,
    path: &str,
) -> Result<(W, u64)> {
    let io = |err: std::io::Error| Error::io("cannot write the backup", Path::new(path), err);
    let mut z = zstd::stream::Encoder::new(w, 3).map_err(io)?;
    // Compression on a worker thread of its own: the dump keeps flowing while a block is packed.
    z.multithread(1).map_err(io)?;
    // The default job (4x the window, 8 MiB at level 3) made the dump the backup's peak, ~58 MiB
    // of the 64 allowed (~40 MiB while objects stream); 2 MiB jobs, as for image layers
    // (savefile.rs), for a negligible loss of ratio.
    z.set_parameter(zstd::zstd_safe::CParameter::JobSize(2 << 20))
        .map_err(io)?;
    let size = db.dump(name, &mut ProgressWriter { inner: &mut z, task }).await?;
    Ok((z.finish().map_err(io)?, size))
}

/// The unfinished backups (`*.bkbak.partial`) in `dir`.
fn partials(dir: &Path) -> Vec<PathBuf> {
    let suffix = format!(".{EXTENSION}.partial");
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(&suffix))
                .collect()
        })
        .unwrap_or_default()
}

/// Remove the oldest backups of `dir` beyond `keep` (by name: they sort by time), never `just`.
fn prune(dir: &Path, keep: usize, just: &Path, notes: &mut Vec<String>) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return vec![] };
    let mut all: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == EXTENSION) && p.is_file())
        .collect();
    all.sort();
    let mut removed = Vec::new();
    let excess = all.len().saturating_sub(keep);
    for p in all.into_iter().take(excess) {
        if p == just {
            continue;
        }
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) => notes.push(format!("could not remove the old backup {}: {e}", p.display())),
        }
    }
    removed
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn render(r: &BackupReport) -> String {
    let mut s = format!(
        "backup of {} (compose project {}, bundle {} {}) written to {} ({})\n",
        r.target.display(),
        r.project,
        r.bundle.name,
        r.bundle.version,
        r.file.display(),
        crate::inspect::human(r.bytes)
    );
    for p in &r.parts {
        s.push_str(&format!(
            "  {:<28} {:>5} item(s)  {:>10} read  {:>10} stored  {:.1} s\n",
            p.part,
            p.items,
            crate::inspect::human(p.bytes),
            crate::inspect::human(p.stored),
            p.seconds
        ));
    }
    if let Some(k) = &r.signed_by {
        s.push_str(&format!("signed by key {k}\n"));
    }
    for p in &r.pruned {
        s.push_str(&format!("removed the old backup {}\n", p.display()));
    }
    for n in &r.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    s.push_str(&format!(
        "it holds the site's secrets (.env, the site CA's key, the database): keep it as you keep them (mode 0600)\ntook {:.1} s; check it with `bkbundle backup verify {}`",
        r.seconds,
        r.file.display()
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_keeps_the_journal_and_leaves_out_backups_state_and_links() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path();
        std::fs::write(t.join("docker-compose.yml"), "x").unwrap();
        std::fs::create_dir_all(t.join("certs")).unwrap();
        std::fs::write(t.join("certs/ca.key"), "k").unwrap();
        std::fs::create_dir_all(t.join(BACKUPS_DIR)).unwrap();
        std::fs::write(t.join(BACKUPS_DIR).join("old.bkbak"), "b").unwrap();
        let state = journal::state_dir(t).unwrap();
        std::fs::write(state.join("install.lock"), "l").unwrap();
        Journal::default().save(t).unwrap();
        std::fs::create_dir_all(state.join("tls")).unwrap();
        std::fs::write(state.join("tls/ca.key"), "k").unwrap();
        std::os::unix::fs::symlink("/etc/hosts", t.join("hosts")).unwrap();
        std::fs::write(t.join(".env.bkbundle-tmp"), "t").unwrap();
        let mut notes = vec![];
        let out = output_skip(t, &t.join(BACKUPS_DIR).join("new.bkbak"));
        let files = site_files(t, &out, &mut notes).unwrap();
        let rels: Vec<&str> = files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(
            rels,
            [
                "certs/ca.key",
                "docker-compose.yml",
                ".bkbundle/tls/ca.key",
                ".bkbundle/journal.json"
            ]
        );
        assert!(
            notes.iter().any(|n| n.contains("symbolic link (to /etc/hosts)")),
            "{notes:?}"
        );
    }

    #[test]
    fn a_backup_that_does_not_fit_is_a_shortfall_naming_need_and_free() {
        let mut s = Survey {
            dir: PathBuf::from("/opt/demo/backups"),
            need: 3 << 20,
            databases: 1,
            objects: 9,
            files: 10,
            free: Some(1 << 20),
            notes: vec![],
        };
        assert_eq!(
            s.shortfall().unwrap(),
            "not enough space for the backup in /opt/demo/backups: up to 3.0 MiB needed (the databases' size, 9 object(s), 10 file(s)), 1.0 MiB free"
        );
        s.free = Some(3 << 20);
        assert_eq!(s.shortfall(), None);
        s.free = None;
        assert_eq!(s.shortfall(), None, "unknown free space is not a finding");
    }

    #[test]
    fn prune_keeps_the_newest_and_the_one_just_written() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            "site-20261201T000000.bkbak",
            "site-20261202T000000.bkbak",
            "site-20261203T000000.bkbak",
        ] {
            std::fs::write(d.path().join(n), "x").unwrap();
        }
        std::fs::write(d.path().join("notes.txt"), "x").unwrap();
        std::fs::write(d.path().join("site-20261204T000000.bkbak.partial"), "x").unwrap();
        assert_eq!(
            partials(d.path()),
            [d.path().join("site-20261204T000000.bkbak.partial")]
        );
        let mut notes = vec![];
        let just = d.path().join("site-20261203T000000.bkbak");
        let removed = prune(d.path(), 2, &just, &mut notes);
        assert_eq!(removed, [d.path().join("site-20261201T000000.bkbak")]);
        assert!(d.path().join("notes.txt").exists() && just.exists());
        assert!(default_name().starts_with("site-") && default_name().ends_with(".bkbak"));
    }
}
