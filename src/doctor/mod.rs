//! `bkbundle doctor`: run the field's diagnosis chains (DESIGN.md, field reports 1-6) against a
//! live install and say what is wrong, with the evidence and the fix as a command.
//!
//! One entry point, [`run`], returns a [`DoctorReport`] of findings; it never fails as a whole:
//! a system that cannot be reached is itself a finding (naming the broken link), and the checks
//! that need it say they were skipped because of it. The checks, each independent:
//!
//! - **containers** of the compose project: state, health, exit code, restart loops, and the
//!   first log line matching the known-causes table ([`crate::platform::causes::LOG_RULES`]);
//! - **regions**: every region's stored sidecar env (required keys, `null`, URLs, loopback), the
//!   server URL's host resolving and its port accepting TCP from this host, and the server's
//!   cached env (`django_cache`, and Redis when known) differing from the rows;
//! - **nats**: resolution → TCP → TLS → authentication → JetStream → bucket, stopping at the first
//!   broken link ([`crate::platform::nats::connect`], [`crate::platform::nats::open_store`]);
//! - **packages**: an empty package list, rows whose object is missing (either key layout),
//!   objects without rows, and with `--bundle` stored objects that differ from the bundle's;
//! - **agents**: install tasks that succeeded for hosts whose agent never registered a node;
//! - **tls** (regions told `NATS_PROTOCOL = tls`): the NATS certificate's expiry and names against
//!   the regions' `NATS_SERVERS`, the CA of the env rows and packages against it, and a NATS that
//!   answers in plain text;
//! - **registry** (the images came from a registry, `install --images-from`, or the config names
//!   one): every image of the bundle is there with the bundle's id.
//!
//! `--fix` applies only safe repairs and reports each: re-upload missing objects from the bundle
//! (init-packages' own repair), add a region's missing keys from the default region's rows (the
//! server's own inheritance, proxy address applied), remove a stale cache entry. Everything else
//! is advice. Every network step is bounded by a few seconds; nothing reaches beyond the local
//! Docker engine, the configured PostgreSQL and NATS, and the TCP probe of the server URL.
//!
//! Layout: [`run_with_env`] connects each system once (the engine, PostgreSQL, NATS and the
//! package bucket) and hands the connections to [`run_on`] as [`Seams`]; a link that could not be
//! made travels in its place as the findings that say why, reported where its check runs. Each
//! check lives in a file of its own (`containers.rs`, `regions.rs`, `agents.rs`, `nats.rs`,
//! `packages.rs`) and reaches the systems only through the traits of [`crate::ports`], so every
//! finding can be produced from the in-memory fakes in a unit test.

pub mod agent;
mod agents;
mod containers;
mod installers;
mod nats;
mod packages;
mod regions;
mod registry;
mod tls;

pub use regions::AGENT_KEYS;

use crate::error::Error;
use crate::manifest::Manifest;
use crate::platform::cache::{self, ServerContainer};
use crate::platform::release::Release;
use crate::ports::{Cache, Docker, ObjectStore, PlatformDb};
use crate::progress::Reporter;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long one probe (DNS, TCP, a query) may take.
const PROBE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Default)]
pub struct DoctorOptions {
    /// The bundle that was installed: its required region keys, its packages (compared with the
    /// stored objects, and re-uploaded by `--fix`), its compose project.
    pub bundle: Option<PathBuf>,
    pub config: crate::site::config::InstallConfig,
    /// The stack's .env values under the install config's `[env]`.
    pub site: BTreeMap<String, String>,
    /// The compose project (`--project`, else the install journal's, the config's, the bundle's).
    pub project: Option<String>,
    pub database_url: Option<String>,
    pub nats_url: Option<String>,
    pub bucket: Option<String>,
    pub fix: bool,
    /// The registry the install pulled the images from (its journal's `images_from`); else the
    /// config's `[registry] url`.
    pub images_from: Option<String>,
    /// How to reach that registry (the command line's; the config's `[registry]` fills the rest).
    pub registry: crate::registry::Access,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Warning => "WARNING",
            Severity::Info => "info",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// containers, regions, nats, packages, agents.
    pub check: &'static str,
    pub severity: Severity,
    /// What it is about: `region "east" NODE_SERVER_URL`, `object linux/...`, `container x`.
    pub subject: String,
    pub message: String,
    /// The row, the object key, the log line, the probe's answer.
    pub evidence: Vec<String>,
    /// What to do, as a command where there is one.
    pub fix: Option<String>,
    /// `--fix` repaired it.
    pub fixed: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DoctorReport {
    /// The platform release found in the database (its last node_mgmt migration).
    pub release: Option<String>,
    pub findings: Vec<Finding>,
    pub errors: usize,
    pub warnings: usize,
    pub fixed: usize,
    pub seconds: f64,
}

impl DoctorReport {
    /// An error-severity finding that `--fix` did not repair.
    pub fn has_errors(&self) -> bool {
        self.errors > 0
    }
}

impl Finding {
    fn new(check: &'static str, severity: Severity, subject: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding {
            check,
            severity,
            subject: subject.into(),
            message: message.into(),
            evidence: vec![],
            fix: None,
            fixed: false,
        }
    }

    /// A failure of bkbundle's own error type, as one finding (its hints become the fix).
    fn from_error(check: &'static str, subject: impl Into<String>, e: Error) -> Finding {
        let mut f = Finding::new(check, Severity::Error, subject, e.message);
        if !e.hints.is_empty() {
            f.fix = Some(e.hints.join("; "));
        }
        f
    }

    fn evidence(&mut self, e: impl Into<String>) -> &mut Finding {
        self.evidence.push(e.into());
        self
    }
    fn fix(&mut self, f: impl Into<String>) -> &mut Finding {
        self.fix = Some(f.into());
        self
    }
}

/// A system as the checks get it: connected, or the findings that say why it is not (empty when
/// nothing was tried, e.g. the engine when the compose project is not known).
pub type Link<T> = Result<T, Vec<Finding>>;

/// The systems a run reaches, each connected once by the caller ([`run_with_env`], or a test
/// with the in-memory fakes of `crate::ports::fakes`).
pub struct Seams<'a> {
    /// The Docker engine.
    pub docker: Link<&'a dyn Docker>,
    /// The platform's database and the release it was found to be ([`database`]).
    pub db: Link<(&'a dyn PlatformDb, Release)>,
    /// The package bucket, opened; its findings name the link of NATS that broke, or say that
    /// the bucket does not exist.
    pub store: Link<&'a dyn ObjectStore>,
    /// The server's Redis; `None`: connected from the site values when the server caches there.
    pub cache: Option<&'a dyn Cache>,
}

/// The connected database with the release it is, or the finding saying why not (as `regions`).
pub async fn database(db: &dyn PlatformDb) -> Link<(&dyn PlatformDb, Release)> {
    regions::release_of(db).await.map(|r| (db, r))
}

/// What a run carries from check to check: its inputs, what earlier checks learnt, the findings.
struct Ctx<'a> {
    opts: &'a DoctorOptions,
    env: &'a dyn Fn(&str) -> Option<String>,
    manifest: Option<Manifest>,
    /// The stack's server container (its environment: the region-1 values it enforces, where it
    /// caches), when the engine has one in the project.
    server: Option<ServerContainer>,
    findings: Vec<Finding>,
}

impl<'a> Ctx<'a> {
    /// A run's context, the bundle's manifest read (or the finding that it cannot be).
    fn new(opts: &'a DoctorOptions, env: &'a dyn Fn(&str) -> Option<String>) -> Ctx<'a> {
        let mut ctx = Ctx {
            opts,
            env,
            manifest: None,
            server: None,
            findings: vec![],
        };
        if let Some(b) = &opts.bundle {
            let open = crate::bundle::OpenOptions {
                check: crate::bundle::Check::Structure,
                ..Default::default()
            };
            match crate::bundle::open_verified(b, &open, &crate::progress::Silent) {
                Ok(bundle) => ctx.manifest = Some(bundle.manifest().clone()),
                Err(e) => ctx.add_error("bundle", b.display().to_string(), e),
            }
        }
        ctx
    }

    fn add(
        &mut self,
        check: &'static str,
        severity: Severity,
        subject: impl Into<String>,
        message: impl Into<String>,
    ) -> &mut Finding {
        self.findings.push(Finding::new(check, severity, subject, message));
        let last = self.findings.len() - 1;
        &mut self.findings[last]
    }

    /// A failure of bkbundle's own error type, as one finding (its hints become the fix).
    fn add_error(&mut self, check: &'static str, subject: impl Into<String>, e: Error) {
        self.findings.push(Finding::from_error(check, subject, e));
    }

    /// The system behind `link`, or `None` with the findings saying why it is not there.
    fn reached<T: Copy>(&mut self, link: &Link<T>) -> Option<T> {
        match link {
            Ok(t) => Some(*t),
            Err(why) => {
                self.findings.extend(why.iter().cloned());
                None
            }
        }
    }

    /// The finding about `subject`, to mark it fixed.
    fn finding_mut(&mut self, subject: &str) -> Option<&mut Finding> {
        self.findings.iter_mut().find(|f| f.subject == subject)
    }

    fn bundle_arg(&self) -> String {
        match &self.opts.bundle {
            Some(b) => b.display().to_string(),
            None => "BUNDLE".into(),
        }
    }

    /// The compose project: `--project`, the config's, the bundle's.
    fn project(&self) -> Option<String> {
        self.opts
            .project
            .clone()
            .or_else(|| self.opts.config.project.clone())
            .or_else(|| {
                self.manifest
                    .as_ref()
                    .and_then(|m| m.stack.as_ref().map(|s| s.project.clone()))
            })
    }
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Diagnose the live install. See the module documentation.
pub fn run(opts: &DoctorOptions, reporter: &dyn Reporter) -> crate::Result<DoctorReport> {
    crate::runtime::block_on(diagnose(opts, &process_env, reporter))
}

/// [`run`] with the environment (`DATABASE_URL`, `PG*`, `NATS_URL`) looked up through `env`,
/// and nothing shown: for tests, which must not change their own process's environment.
pub async fn run_with_env(opts: &DoctorOptions, env: &dyn Fn(&str) -> Option<String>) -> DoctorReport {
    diagnose(opts, env, &crate::progress::Silent).await
}

/// Connect each system once (saying which), then run the checks on them ([`run_on`]).
async fn diagnose(opts: &DoctorOptions, env: &dyn Fn(&str) -> Option<String>, reporter: &dyn Reporter) -> DoctorReport {
    let t0 = Instant::now();
    let ctx = Ctx::new(opts, env);
    reporter.note("doctor: asking the Docker engine for the stack's containers");
    let engine = containers::connect(&ctx).await;
    reporter.note("doctor: reading the platform's database (release, regions, install tasks, packages)");
    let postgres = regions::connect(&ctx).await;
    let db = match &postgres {
        Ok(p) => database(p).await,
        Err(why) => Err(why.clone()),
    };
    // The release names the default bucket.
    reporter.note("doctor: checking NATS link by link and the packages' bucket");
    let bucket = nats::open(&ctx, db.as_ref().ok().map(|(_, r)| r)).await;
    let seams = Seams {
        docker: engine.as_ref().map(|e| e as &dyn Docker).map_err(Clone::clone),
        db,
        store: bucket.as_ref().map(|b| b as &dyn ObjectStore).map_err(Clone::clone),
        cache: None,
    };
    checks(ctx, &seams, t0).await
}

/// Run every check on connected systems (see the module documentation).
pub async fn run_on(opts: &DoctorOptions, env: &dyn Fn(&str) -> Option<String>, seams: &Seams<'_>) -> DoctorReport {
    let t0 = Instant::now();
    checks(Ctx::new(opts, env), seams, t0).await
}

/// The sequence: containers, regions and agents (on the database), packages (on the database and
/// the bucket). A link that is down is reported where its first check would run.
async fn checks(mut ctx: Ctx<'_>, seams: &Seams<'_>, t0: Instant) -> DoctorReport {
    containers::check(&mut ctx, &seams.docker).await;
    registry::check(&mut ctx, &seams.docker).await;
    if let (Some(p), Ok(docker)) = (ctx.project(), &seams.docker) {
        ctx.server = cache::server_container(*docker, &p).await;
    }
    let db = match &seams.db {
        Ok((db, release)) => Some((*db, release)),
        Err(why) => {
            ctx.findings.extend(why.iter().cloned());
            None
        }
    };
    if let Some((db, release)) = db {
        regions::check(&mut ctx, db, release, seams.cache).await;
        agents::check(&mut ctx, db).await;
    }
    let store = ctx.reached(&seams.store);
    if let Some((db, release)) = db {
        if let Ok(current) = db.regions(release).await {
            tls::check(&mut ctx, &current, store).await;
        }
    }
    packages::check(&mut ctx, db, store).await;
    report(ctx.findings, db.map(|(_, r)| r.label()), t0)
}

/// The findings, errors first, counted.
fn report(mut findings: Vec<Finding>, release: Option<String>, t0: Instant) -> DoctorReport {
    findings.sort_by_key(|f| f.severity);
    let count = |severity| findings.iter().filter(|f| f.severity == severity && !f.fixed).count();
    let (errors, warnings) = (count(Severity::Error), count(Severity::Warning));
    let fixed = findings.iter().filter(|f| f.fixed).count();
    DoctorReport {
        release,
        findings,
        errors,
        warnings,
        fixed,
        seconds: t0.elapsed().as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------------------------
// Output

/// The human rendering: errors first, each with its evidence and fix; one summary line.
pub fn render(r: &DoctorReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for f in &r.findings {
        let label = if f.fixed { "FIXED" } else { f.severity.label() };
        let _ = writeln!(s, "{label:<8}[{}] {}: {}", f.check, f.subject, f.message);
        for e in &f.evidence {
            let _ = writeln!(s, "           evidence: {e}");
        }
        if let (Some(fix), false) = (&f.fix, f.fixed) {
            let _ = writeln!(s, "           fix: {fix}");
        }
    }
    let _ = write!(
        s,
        "doctor: {} error(s), {} warning(s){} in {:.1} s{}",
        r.errors,
        r.warnings,
        if r.fixed > 0 {
            format!(", {} fixed", r.fixed)
        } else {
            String::new()
        },
        r.seconds,
        if r.errors == 0 && r.warnings == 0 {
            ": all checks passed"
        } else {
            ""
        }
    );
    s
}

/// What the checks' unit tests share: options, the fakes wired as [`Seams`], finding lookups.
#[cfg(test)]
mod testing {
    use super::*;
    use crate::platform::regions::REGION_SERVICES;
    use crate::ports::fakes::{FakeCache, FakeDb, FakeDocker, FakeStore};
    use crate::site::config::RegionConfig;

    pub fn no_env(_: &str) -> Option<String> {
        None
    }

    /// Options for compose project `p`, whose regions `default` and `east` are local (their
    /// agents run here, so loopback URLs are right for them).
    pub fn opts() -> DoctorOptions {
        let mut o = DoctorOptions {
            project: Some("p".into()),
            ..Default::default()
        };
        for name in ["default", "east"] {
            o.config.regions.push(RegionConfig {
                name: name.into(),
                introduction: None,
                proxy_address: None,
                local: true,
                env: BTreeMap::new(),
            });
        }
        o
    }

    /// A server URL that answers: a listener on loopback, open while the guard lives.
    pub fn answering() -> (std::net::TcpListener, String) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let url = format!("http://127.0.0.1:{}", l.local_addr().expect("its address").port());
        (l, url)
    }

    /// A loopback port nothing listens on.
    pub fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        l.local_addr().expect("its address").port()
    }

    /// The rows agents need, pointing at `url`.
    pub fn agent_env(url: &str) -> Vec<(&'static str, String)> {
        vec![
            ("NODE_SERVER_URL", url.to_string()),
            ("NATS_SERVERS", "127.0.0.1:4222".to_string()),
            ("NATS_PROTOCOL", "nats".to_string()),
        ]
    }

    /// A database of the newest release whose regions `default` (1) and `east` (2) have every
    /// key agents need, pointing at `url`, and east its service rows.
    pub fn healthy_db(url: &str) -> FakeDb {
        let env = agent_env(url);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let db = FakeDb::new(Release::newest_known())
            .with_region(1, "default", &env)
            .with_region(2, "east", &env);
        for s in REGION_SERVICES {
            db.current.lock().unwrap().services.insert((2, s.to_string()));
        }
        db
    }

    /// Run the checks on the fakes; `db` `None`: a database that was never reached (no finding of
    /// its own), as `store` `None` is a bucket never reached.
    pub async fn diagnose(
        opts: &DoctorOptions,
        docker: &FakeDocker,
        db: Option<&FakeDb>,
        store: Option<&FakeStore>,
        cache: Option<&FakeCache>,
    ) -> DoctorReport {
        let db = match db {
            Some(d) => database(d).await,
            None => Err(vec![]),
        };
        let seams = Seams {
            docker: Ok(docker),
            db,
            store: store.map(|s| s as &dyn ObjectStore).ok_or_else(Vec::new),
            cache: cache.map(|c| c as &dyn Cache),
        };
        run_on(opts, &no_env, &seams).await
    }

    /// The one finding of `check` and `severity` whose subject contains `subject`.
    pub fn the<'r>(r: &'r DoctorReport, check: &str, severity: Severity, subject: &str) -> &'r Finding {
        let hits: Vec<&Finding> = r
            .findings
            .iter()
            .filter(|f| f.check == check && f.severity == severity && f.subject.contains(subject))
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "expected one {severity:?} {check} finding about {subject:?}: {:#?}",
            r.findings
        );
        hits[0]
    }

    /// No finding of `check` whose subject contains `subject`.
    pub fn no_finding(r: &DoctorReport, check: &str, subject: &str) {
        let hits: Vec<&Finding> = r
            .findings
            .iter()
            .filter(|f| f.check == check && f.subject.contains(subject))
            .collect();
        assert!(
            hits.is_empty(),
            "expected no {check} finding about {subject:?}: {hits:#?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::regions::{contains, url_host_port};
    use super::*;

    #[test]
    fn server_url_host_and_port() {
        assert_eq!(url_host_port("https://10.0.0.5:443/"), Some(("10.0.0.5".into(), 443)));
        assert_eq!(url_host_port("http://bk.example"), Some(("bk.example".into(), 80)));
        assert_eq!(url_host_port("https://[::1]/x"), Some(("::1".into(), 443)));
        assert_eq!(url_host_port("null/api/v1"), None);
        assert_eq!(url_host_port("http://:80"), None);
    }

    #[test]
    fn errors_come_first_and_fixed_ones_do_not_count() {
        let f = |severity, fixed| Finding {
            check: "regions",
            severity,
            subject: "s".into(),
            message: "m".into(),
            evidence: vec!["e".into()],
            fix: Some("do it".into()),
            fixed,
        };
        let mut findings = vec![
            f(Severity::Info, false),
            f(Severity::Error, true),
            f(Severity::Warning, false),
        ];
        findings.sort_by_key(|f| f.severity);
        let r = DoctorReport {
            release: None,
            errors: 0,
            warnings: 1,
            fixed: 1,
            findings,
            seconds: 0.1,
        };
        let text = render(&r);
        assert!(text.starts_with("FIXED"), "{text}");
        assert!(
            text.contains("WARNING [regions] s: m\n           evidence: e\n           fix: do it"),
            "{text}"
        );
        assert!(
            text.ends_with("doctor: 0 error(s), 1 warning(s), 1 fixed in 0.1 s"),
            "{text}"
        );
        assert!(!r.has_errors());
        assert!(contains(b"abcNODE", b"NODE") && !contains(b"abc", b""));
    }
}
