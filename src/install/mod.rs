//! `bkbundle install`: verify, preflight, load images, lay out and start the stack, wait on health.
//!
//! Plan, then execute. The plan (images to load or tag, files to write or keep, the rendered
//! `.env`, services to wait on) is computed as data before anything changes; preflight findings are
//! all collected and shown together; `--dry-run` stops there. Execution is a sequence of steps,
//! each idempotent and recorded in the journal, so a re-run after success is a fast no-op and a
//! re-run after a kill completes the install without duplicates.

pub mod compose;
pub mod health;
pub mod journal;
pub mod load;
pub mod offline;
pub mod platform;
pub mod registry;
pub mod staging;
pub mod tls;

use crate::bundle::{self, layout, VerifiedBundle};
use crate::digest::sha256_hex;
use crate::engine::Engine;
use crate::error::{Error, Kind, Result};
use crate::manifest::{Image, Manifest};
use crate::progress::Reporter;
use crate::site::config::InstallConfig;
use crate::site::envfile;
use compose::Compose;
use journal::{BundleId, Journal};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    pub bundle: PathBuf,
    pub target: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub dry_run: bool,
    pub require_signature: bool,
    pub key: Option<PathBuf>,
    /// Overrides the config's health deadline.
    pub timeout_secs: Option<u64>,
    /// How long to wait for another run's lock on the target (default [`crate::lock::DEFAULT_WAIT`]).
    pub lock_wait: Option<Duration>,
    /// Upgrading a site: do not back it up first.
    pub no_backup: bool,
    /// `--images-from HOST[:PORT][/PREFIX]`: the engine pulls the images from this registry
    /// (default: the install config's `[registry] url`).
    pub images_from: Option<String>,
    /// How to reach that registry (the command line's; the config's `[registry]` fills the rest).
    pub registry: crate::registry::Access,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ImageAction {
    Load,
    /// Pulled by the engine from the registry of `--images-from`.
    Pull,
    Tag,
    Present,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedImage {
    pub refs: Vec<String>,
    pub id: String,
    pub size: u64,
    pub action: ImageAction,
    /// For [`ImageAction::Pull`]: the reference the engine pulls (`HOST/PREFIX/path:tag`).
    pub from: Option<String>,
    /// For [`ImageAction::Load`]: the uncompressed bytes of its layers the load streams (those
    /// the engine lacks and no image before it in the plan sends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileAction {
    Create,
    Update,
    Unchanged,
    /// The operator edited the file since bkbundle wrote it: the bundle's version is written beside.
    KeepEdited,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedFile {
    pub path: String,
    pub action: FileAction,
    #[serde(skip)]
    content: Vec<u8>,
    #[serde(skip)]
    mode: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub bundle: BundleId,
    pub target: PathBuf,
    pub project: String,
    /// The registry the images are pulled from (`--images-from`, or the config's `[registry]
    /// url`); `None`: loaded from the bundle.
    pub images_from: Option<String>,
    pub images: Vec<PlannedImage>,
    pub files: Vec<PlannedFile>,
    /// `.env` keys generated, added or updated in this run (values never shown).
    pub env_generated: Vec<String>,
    pub env_added: Vec<String>,
    pub env_updated: Vec<String>,
    pub steps_to_run: Vec<String>,
    /// What the regions and packages steps write into the platform: rows and objects.
    pub platform: platform::PlatformPlan,
    /// The NATS certificates (the bundle's stack serves TLS): generated, kept or issued again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<tls::TlsPlan>,
    /// Preflight's warnings: what will happen that the operator may not expect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// An upgrade's backup of the site, taken before anything changes (none with `--no-backup`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<PlannedBackup>,
}

/// The backup an upgrade takes first: of the site as it runs `from`, into `survey.dir`.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedBackup {
    pub from: BundleId,
    pub survey: crate::backup::take::Survey,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    pub seconds: f64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstallReport {
    pub bundle: String,
    pub version: String,
    pub target: PathBuf,
    pub project: String,
    /// The registry the images came from (as the plan's); `None`: the bundle.
    pub images_from: Option<String>,
    pub already_installed: bool,
    pub dry_run: bool,
    pub plan: Plan,
    pub steps: Vec<Step>,
    pub services: Vec<health::ServiceHealth>,
    pub notes: Vec<String>,
    pub seconds: f64,
}

struct Ctx {
    reader: Arc<VerifiedBundle>,
    manifest: Arc<Manifest>,
    config: InstallConfig,
    target: PathBuf,
    project: String,
    compose_file: PathBuf,
    env_file: PathBuf,
    /// Where the images come from when not from the bundle (`--images-from`).
    registry: Option<registry::Source>,
}

/// Verify, plan, preflight and (unless a dry run) install (`bkbundle install`). See the module
/// documentation.
pub fn run(opts: &InstallOptions, reporter: &dyn Reporter) -> Result<InstallReport> {
    crate::runtime::block_on(install(opts, reporter))?
}

async fn install(opts: &InstallOptions, reporter: &dyn Reporter) -> Result<InstallReport> {
    let t0 = Instant::now();
    let mut steps = Vec::new();

    // 1. Verify: a bundle that fails changes nothing.
    let t = Instant::now();
    let vopts = bundle::OpenOptions {
        require_signature: opts.require_signature,
        key: opts.key.clone(),
        threads: None,
        check: bundle::Check::Full,
    };
    // Reading every byte blocks: off the async workers, borrowing the reporter.
    let reader = tokio::task::block_in_place(|| bundle::open_verified(&opts.bundle, &vopts, reporter))?;
    let manifest = reader.manifest().clone();
    steps.push(Step {
        name: "verify".into(),
        seconds: t.elapsed().as_secs_f64(),
        detail: format!("{} files, {} bytes", reader.files(), reader.bytes()),
    });
    let stack = manifest.stack.clone().ok_or_else(|| {
        Error::input(format!(
            "bundle {} has no compose stack to install",
            reader.display_name()
        ))
    })?;

    let mut config = match &opts.config {
        Some(p) => InstallConfig::load(p)?,
        None => InstallConfig::default(),
    };
    if let Some(t) = opts.timeout_secs {
        config.health.timeout_secs = t;
    }
    let target = opts
        .target
        .clone()
        .or(config.target.clone())
        .unwrap_or_else(|| PathBuf::from(format!("/opt/{}", manifest.bundle.name)));
    let target = if target.is_absolute() {
        target
    } else {
        std::env::current_dir().map(|d| d.join(&target)).unwrap_or(target)
    };
    let project = config.project.clone().unwrap_or(stack.project.clone());
    let strip = |p: &str| layout::stack_relative(p).to_string();
    let registry = registry::Source::resolve(opts.images_from.as_deref(), &opts.registry, &config.registry)?;
    let ctx = Ctx {
        registry,
        compose_file: target.join(strip(&stack.compose)),
        env_file: target.join(".env"),
        reader: Arc::new(reader),
        manifest: Arc::new(manifest),
        config,
        target,
        project,
    };
    let id = BundleId {
        name: ctx.manifest.bundle.name.clone(),
        version: ctx.manifest.bundle.version.clone(),
        manifest_sha256: ctx.reader.manifest_sha256().to_string(),
    };
    // Plan and preflight without the target's lock (a dry run never takes it); the lock is taken
    // before the first change, and when another run changed the target meanwhile, the plan is
    // made again under the lock (so that, e.g., a second run never writes its own secrets).
    let mut lock = None;
    loop {
        match attempt(opts, reporter, &ctx, &stack, &id, steps.clone(), t0, &mut lock).await? {
            Attempt::Done(r) => return Ok(*r),
            Attempt::Replan => continue,
        }
    }
}

/// The target's lock, waiting up to `--lock-wait` (on a blocking thread: the wait sleeps).
async fn take_target_lock(
    opts: &InstallOptions,
    reporter: &dyn Reporter,
    target: &Path,
) -> Result<crate::lock::LockGuard> {
    let wait = opts.lock_wait.unwrap_or(crate::lock::DEFAULT_WAIT);
    // The wait sleeps: off the async workers.
    tokio::task::block_in_place(|| crate::lock::acquire_target(target, wait, &|m| reporter.note(m)))
}

/// What another run changes in the target (journal, `.env`): compared before and after the lock.
fn target_state(target: &Path) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    (
        std::fs::read(journal::path(target)).ok(),
        std::fs::read(target.join(".env")).ok(),
    )
}

/// The steps of an install after preflight, in order; the journal records each by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepName {
    Images,
    Layout,
    Start,
    Health,
    Regions,
    Packages,
}

impl StepName {
    pub const ALL: [StepName; 6] = [
        StepName::Images,
        StepName::Layout,
        StepName::Start,
        StepName::Health,
        StepName::Regions,
        StepName::Packages,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            StepName::Images => "images",
            StepName::Layout => "layout",
            StepName::Start => "start",
            StepName::Health => "health",
            StepName::Regions => "regions",
            StepName::Packages => "packages",
        }
    }
}

/// What planning and preflight found: the plan, the findings, and what the steps need.
struct Planned {
    plan: Plan,
    engine: Option<Engine>,
    compose: Option<Compose>,
    /// The stack's services as preflight read them from the compose file (journaled at start).
    services: Vec<String>,
    findings: Vec<String>,
    hints: Vec<String>,
    /// Set when the engine does not answer: an external failure, not a preflight finding.
    engine_error: Option<Kind>,
    /// What the registry's preflight found (`--images-from`): the engine's CA file to write, and
    /// an external failure (the registry down) like `engine_error`.
    registry: registry::Checked,
    /// The site values (`None` when the env template did not render: already a finding).
    site: Option<std::collections::BTreeMap<String, String>>,
    /// Whether `.env` was rendered (or the bundle has no template).
    rendered: bool,
    has_regions: bool,
    has_packages: bool,
}

/// One attempt's outcome: a report, or "plan again under the lock" (another run changed the
/// target while this one planned).
enum Attempt {
    Done(Box<InstallReport>),
    Replan,
}

/// Plan, preflight and (unless a dry run) execute: the body of [`run`] after verification.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    opts: &InstallOptions,
    reporter: &dyn Reporter,
    ctx: &Ctx,
    stack: &crate::manifest::Stack,
    id: &BundleId,
    mut steps: Vec<Step>,
    t0: Instant,
    lock: &mut Option<crate::lock::LockGuard>,
) -> Result<Attempt> {
    let planned_on = target_state(&ctx.target);
    let mut journal = Journal::load(&ctx.target)?;
    if journal.bundle.as_ref() != Some(id) {
        journal.completed.clear();
    }

    // 2. Plan and preflight (all findings together; nothing changes before this passes).
    let t = Instant::now();
    let mut p = plan(opts, ctx, stack, id, &mut journal).await?;
    if already_installed(opts, ctx, &mut p).await? {
        steps.push(Step {
            name: "check".into(),
            seconds: t.elapsed().as_secs_f64(),
            detail: "already installed".into(),
        });
        return Ok(Attempt::Done(Box::new(report(
            ctx,
            p.plan,
            steps,
            vec![],
            true,
            false,
            vec![],
            t0,
        ))));
    }
    preflight_stack(opts, ctx, id, &journal, &mut p).await?;
    steps.push(Step {
        name: "preflight".into(),
        seconds: t.elapsed().as_secs_f64(),
        detail: format!("{} finding(s)", p.findings.len()),
    });
    // Findings while another run holds the target's lock, or after one changed the target, may be
    // that run's work (a port its stack is taking right now): wait for the lock as a change
    // would, then plan again on what that run left. A dry run never waits.
    let busy = || crate::lock::target_holder(&ctx.target).is_some() || target_state(&ctx.target) != planned_on;
    if !p.findings.is_empty() && !opts.dry_run && lock.is_none() && busy() {
        *lock = Some(take_target_lock(opts, reporter, &ctx.target).await?);
        reporter.note(&format!(
            "another run was changing {} while this one checked it: checking again",
            ctx.target.display()
        ));
        return Ok(Attempt::Replan);
    }
    if !p.findings.is_empty() {
        return Err(preflight_error(ctx, p, lock.is_none()));
    }
    if opts.dry_run {
        return Ok(Attempt::Done(Box::new(report(
            ctx,
            p.plan,
            steps,
            vec![],
            false,
            true,
            vec![],
            t0,
        ))));
    }
    // The target's lock, before the first change (see `run`).
    if lock.is_none() {
        let guard = take_target_lock(opts, reporter, &ctx.target).await?;
        let changed = target_state(&ctx.target) != planned_on;
        *lock = Some(guard);
        if changed {
            reporter.note(&format!(
                "another run changed {} while this one planned: planning again",
                ctx.target.display()
            ));
            return Ok(Attempt::Replan);
        }
    }
    let notes: Vec<String> = lock.as_ref().and_then(|g| g.takeover_note()).into_iter().collect();
    let r = execute(opts, reporter, ctx, id, p, journal, steps, notes, t0).await?;
    Ok(Attempt::Done(Box::new(r)))
}

/// The plan (images, files, env, the platform's rows and objects) and the findings made while
/// making it; nothing changes.
async fn plan(
    opts: &InstallOptions,
    ctx: &Ctx,
    stack: &crate::manifest::Stack,
    id: &BundleId,
    journal: &mut Journal,
) -> Result<Planned> {
    let (mut findings, mut hints) = (Vec::new(), Vec::new());
    let (engine, engine_error) = connect_engine(&mut findings, &mut hints).await;
    let mut images = match &engine {
        Some(engine) => plan_images(engine, &ctx.manifest.images).await?,
        None => vec![],
    };
    if let Some(source) = &ctx.registry {
        registry::mark_pulls(&mut images, source, &mut findings);
    }
    let (mut files, env) = plan_files(ctx, stack, journal, &mut findings, &mut hints)?;
    let mut site = site_values(ctx, stack, env.as_ref());
    let tls_plan = match site.as_mut() {
        Some(site) if stack.nats_tls => plan_tls(ctx, site, &mut findings, &mut hints),
        _ => None,
    };
    let (has_regions, has_packages) = (
        has_regions(&ctx.manifest.regions),
        !ctx.manifest.packages.is_empty() || !ctx.manifest.installers.is_empty(),
    );
    if let Some(site) = &site {
        check_site(
            ctx,
            site,
            has_regions,
            has_packages,
            &mut files,
            &mut findings,
            &mut hints,
        );
    }
    let mut platform_plan = match &site {
        Some(site) => plan_platform(opts, ctx, site, has_packages, &mut findings, &mut hints).await,
        None => platform::PlatformPlan::default(),
    };
    if let Some(t) = &tls_plan {
        if let Some(site) = &site {
            tls_in_platform_plan(ctx, t, site, &mut platform_plan, &mut files, has_regions);
        }
    }
    if let Some(engine) = &engine {
        plan_streams(
            engine,
            ctx,
            &mut images,
            &platform_plan,
            journal,
            &mut findings,
            &mut hints,
        )
        .await?;
    }
    if !has_regions {
        journal.mark(StepName::Regions.as_str());
    }
    if !has_packages {
        journal.mark(StepName::Packages.as_str());
    }
    let mut plan = Plan {
        bundle: id.clone(),
        target: ctx.target.clone(),
        project: ctx.project.clone(),
        images_from: ctx.registry.as_ref().map(|s| s.target.to_string()),
        images,
        files,
        env_generated: env.as_ref().map(|e| e.generated.clone()).unwrap_or_default(),
        env_added: env.as_ref().map(|e| e.added.clone()).unwrap_or_default(),
        env_updated: env.as_ref().map(|e| e.updated.clone()).unwrap_or_default(),
        steps_to_run: vec![],
        platform: platform_plan,
        tls: tls_plan,
        warnings: vec![],
        backup: None,
    };
    if stack.nats_tls && !ctx.config.tls.enabled {
        plan.warnings.push(TLS_DISABLED.into());
    }
    plan.steps_to_run = steps_to_run(&plan, journal);
    Ok(Planned {
        plan,
        engine,
        compose: None,
        services: vec![],
        findings,
        hints,
        engine_error,
        registry: registry::Checked::default(),
        rendered: env.is_some() || stack.env_template.is_none(),
        site,
        has_regions,
        has_packages,
    })
}

const TLS_DISABLED: &str = "[tls] enabled = false, but the bundle's stack serves NATS over TLS from certs/: install writes no certificates, so its NATS may not start and agents are told nats (plain text); remove enabled = false unless the stack was changed to run without TLS";

/// The platform plan as TLS leaves it: a CA generated by this plan shown as such (it exists in
/// memory only: a dry run's would never be the one installed), and a release whose env column
/// cannot hold the CA without it.
fn tls_in_platform_plan(
    ctx: &Ctx,
    t: &tls::TlsPlan,
    site: &std::collections::BTreeMap<String, String>,
    platform_plan: &mut platform::PlatformPlan,
    files: &mut [PlannedFile],
    has_regions: bool,
) {
    if t.action == tls::TlsAction::Generate {
        for r in platform_plan
            .rows
            .iter_mut()
            .filter(|r| r.key == crate::platform::regions::TLS_CA_KEY)
        {
            r.value = Some(tls::GENERATED_CA.into());
        }
    }
    if let Some(max) = platform_plan.value_max {
        if t.ca_pem.len() > max && has_regions {
            narrow_release_ca(ctx, site, files, platform_plan, max);
        }
    }
}

/// The NATS certificates planned (nothing written), and the site values they add (agents get
/// `NATS_PROTOCOL = tls` and the CA; bkbundle verifies NATS with it). A problem is a finding.
fn plan_tls(
    ctx: &Ctx,
    site: &mut std::collections::BTreeMap<String, String>,
    findings: &mut Vec<String>,
    hints: &mut Vec<String>,
) -> Option<tls::TlsPlan> {
    match tls::plan(&ctx.target, &ctx.config, site) {
        Ok(Some(t)) => {
            let ca_file = ctx.target.join(crate::tls::store::CA_CERT);
            tls::site_values(site, &ctx.config, &t.ca_pem, &ca_file);
            Some(t)
        }
        Ok(None) => None,
        Err(e) => {
            findings.push(format!("NATS TLS: {}", e.message));
            hints.extend(e.hints);
            None
        }
    }
}

/// A release whose env values take at most `max` characters (before migration 0022) cannot hold
/// the CA: it is left out of region 1's server environment too (the server would fail writing it
/// and stop seeding the rest), and agents take it from their controller package.
fn narrow_release_ca(
    ctx: &Ctx,
    site: &std::collections::BTreeMap<String, String>,
    files: &mut [PlannedFile],
    platform: &mut platform::PlatformPlan,
    max: usize,
) {
    // Rendered again from the same values, now that the release is known.
    if let Ok(desired) = crate::platform::rules::desired(&bundle_regions(ctx, site), &ctx.config.regions, site) {
        for f in files.iter_mut().filter(|f| f.path == DEFAULT_ZONE_FILE) {
            *f = default_zone_file(&ctx.target, &desired, Some(max));
        }
    }
    platform.notes.push(format!(
        "this release stores env values of at most {max} characters: the site CA is not written to the regions' {} (agents take it from their controller package's certs/ca.crt)",
        crate::platform::regions::TLS_CA_KEY
    ));
}

/// The bundle's `[regions]` as install seeds them: when the stack's NATS serves TLS (the site
/// values carry the CA), every region gets `NATS_PROTOCOL` and `NATS_TLS_CA` from the site values,
/// whatever the bundle says (region 1 through the server's environment too).
fn bundle_regions(ctx: &Ctx, site: &std::collections::BTreeMap<String, String>) -> crate::manifest::Regions {
    tls::regions_for(&ctx.manifest.regions, site)
}

/// The Docker engine, or the finding (and the kind of failure) that it does not answer.
async fn connect_engine(findings: &mut Vec<String>, hints: &mut Vec<String>) -> (Option<Engine>, Option<Kind>) {
    match Engine::connect().await {
        Ok(e) => (Some(e), None),
        Err(e) => {
            findings.push(e.message.clone());
            hints.extend(e.hints);
            (None, Some(e.kind))
        }
    }
}

/// The steps still to run: those the journal has not recorded for this bundle, or all of them
/// when any image or file is to change.
fn steps_to_run(plan: &Plan, journal: &Journal) -> Vec<String> {
    let nothing_to_change = plan.images.iter().all(|i| i.action == ImageAction::Present)
        && plan.tls.as_ref().is_none_or(|t| !t.writes())
        && plan
            .files
            .iter()
            .all(|f| matches!(f.action, FileAction::Unchanged | FileAction::KeepEdited));
    StepName::ALL
        .iter()
        .filter(|s| !journal.is_done(s.as_str()) || !nothing_to_change)
        .map(|s| s.as_str().to_string())
        .collect()
}

/// The site values: the rendered `.env` under the install config's `[env]`; without an env
/// template, the install config's over an `.env` of the operator's own. `None` when the template
/// did not render (already a finding).
fn site_values(
    ctx: &Ctx,
    stack: &crate::manifest::Stack,
    env: Option<&envfile::Rendered>,
) -> Option<std::collections::BTreeMap<String, String>> {
    match (env, &stack.env_template) {
        (Some(e), _) => Some(crate::regions::site_values(&e.values, &ctx.config.env)),
        (None, None) => Some(crate::regions::site_values(
            &offline::template_values(&std::fs::read_to_string(&ctx.env_file).unwrap_or_default()),
            &ctx.config.env,
        )),
        (None, Some(_)) => None,
    }
}

/// The rows and objects the platform steps write: planned against the live platform when it
/// answers (a re-run, an upgrade: its regions are checked now too, so one that would hand agents
/// `null` stops the install before anything changes), else against an empty one.
async fn plan_platform(
    opts: &InstallOptions,
    ctx: &Ctx,
    site: &std::collections::BTreeMap<String, String>,
    has_packages: bool,
    findings: &mut Vec<String>,
    hints: &mut Vec<String>,
) -> platform::PlatformPlan {
    let env = |n: &str| std::env::var(n).ok();
    let regions = bundle_regions(ctx, site);
    let inputs = platform::Inputs {
        regions: &regions,
        has_packages,
        bundle: &opts.bundle,
        opened: Some(ctx.reader.clone()),
        config: &ctx.config,
        site,
        env: &env,
    };
    let (plan, live_problems) = platform::plan(&inputs).await;
    if !live_problems.is_empty() {
        findings.extend(live_problems);
        hints.push(
            "fix the region in the UI, or declare it under [[regions]] with the missing keys (`bkbundle regions check --database-url ...` shows the same)"
                .into(),
        );
    }
    plan
}

/// The site values against what the platform steps need: regions validated now, so a
/// configuration that would break agents stops the install before anything changes (and region
/// 1's values rendered for the server's environment); where NATS is, for the packages.
#[allow(clippy::too_many_arguments)]
fn check_site(
    ctx: &Ctx,
    site: &std::collections::BTreeMap<String, String>,
    has_regions: bool,
    has_packages: bool,
    files: &mut Vec<PlannedFile>,
    findings: &mut Vec<String>,
    hints: &mut Vec<String>,
) {
    if has_regions {
        match crate::platform::rules::desired(&bundle_regions(ctx, site), &ctx.config.regions, site) {
            // Region 1's one source: the same values go to the server's environment.
            Ok(desired) => files.push(default_zone_file(&ctx.target, &desired, None)),
            Err(problems) => {
                findings.extend(problems.iter().map(|p| format!("cloud regions: {p}")));
                hints.push(
                    "set the site values under [env] and the regions under [[regions]] in the install config (`bkbundle regions check` shows the same)"
                        .into(),
                );
            }
        }
    }
    if has_packages {
        if let Err(e) = crate::site::targets::nats(None, &ctx.config.nats, site, &|n| std::env::var(n).ok()) {
            let e = Error::from(e);
            findings.push(format!("agent packages: {}", e.message));
            hints.extend(e.hints);
        }
    }
}

/// Already installed: the journal says so and the engine agrees (images there, stack healthy),
/// and nothing found so far (a live region that would hand agents `null` is reported by the
/// preflight, as in a dry run). Otherwise, when only the stack is down, the steps from `start`
/// are to run.
async fn already_installed(opts: &InstallOptions, ctx: &Ctx, p: &mut Planned) -> Result<bool> {
    if !p.plan.steps_to_run.is_empty() || opts.dry_run || !p.findings.is_empty() {
        return Ok(false);
    }
    let Some(engine) = &p.engine else {
        return Ok(false);
    };
    let containers = engine.project_containers(&ctx.project).await?;
    let healthy = !containers.is_empty()
        && containers.iter().all(|c| {
            matches!(
                health::judge(c, c.restart_count, None, Duration::ZERO),
                health::Verdict::Ready(_)
            ) || (c.status == "running" && c.health.is_none())
        });
    if !healthy {
        p.plan.steps_to_run = [StepName::Start, StepName::Health, StepName::Regions, StepName::Packages]
            .iter()
            .map(|s| s.as_str().to_string())
            .collect();
    }
    Ok(healthy)
}

/// Compose, and the stack's own preflight (ports, space, names) when the engine answers; before an
/// upgrade, whether its backup fits.
async fn preflight_stack(
    opts: &InstallOptions,
    ctx: &Ctx,
    id: &BundleId,
    journal: &Journal,
    p: &mut Planned,
) -> Result<()> {
    p.compose = match Compose::detect() {
        Ok(c) => Some(c),
        Err(e) => {
            p.findings.push(e.message.clone());
            p.hints.extend(e.hints);
            None
        }
    };
    if let Some(engine) = &p.engine {
        p.registry = registry::preflight(
            engine,
            &ctx.manifest,
            ctx.registry.as_ref(),
            &p.plan.images,
            &mut p.findings,
            &mut p.hints,
        )
        .await;
    }
    if let (Some(engine), Some(compose)) = (&p.engine, &p.compose) {
        let mut warnings = Vec::new();
        p.services = preflight(
            engine,
            compose,
            ctx,
            &p.plan,
            p.rendered,
            journal,
            &mut p.findings,
            &mut p.hints,
            &mut warnings,
        )
        .await?;
        p.plan.warnings.extend(warnings);
        preflight_backup(opts, ctx, id, journal, p).await;
    }
    Ok(())
}

/// An upgrade (the journal names another bundle) backs the site up first, unless `--no-backup`:
/// surveyed here without writing, a backup that does not fit in `TARGET/backups` is a finding. A
/// survey that fails is a warning: the backup itself, before anything changes, says why.
async fn preflight_backup(opts: &InstallOptions, ctx: &Ctx, id: &BundleId, journal: &Journal, p: &mut Planned) {
    let Some(from) = journal.bundle.clone().filter(|b| b != id) else {
        return;
    };
    if opts.no_backup {
        return;
    }
    match crate::backup::take::survey(&upgrade_backup_options(ctx)).await {
        Ok(survey) => {
            if let Some(shortfall) = survey.shortfall() {
                p.findings.push(format!("the backup before the upgrade from {} {}: {shortfall}", from.name, from.version));
                p.hints.push(format!(
                    "free space in {} (remove old backups, or mount a larger disk there), or pass --no-backup to upgrade without a backup",
                    survey.dir.display()
                ));
            }
            p.plan.backup = Some(PlannedBackup { from, survey });
        }
        Err(e) => p.plan.warnings.push(format!(
            "the site's backup before the upgrade from {} {} could not be surveyed ({}); install backs it up before changing anything, and stops if it cannot",
            from.name, from.version, e.message
        )),
    }
}

/// Preflight's findings as one error: the list, the warnings, and what to do.
fn preflight_error(ctx: &Ctx, p: Planned, unlocked: bool) -> Error {
    let mut e = Error::findings(
        // An unreachable engine or registry is an external system's failure (exit 6), as documented.
        p.engine_error.or(p.registry.error).unwrap_or(Kind::Preflight),
        format!("preflight found {} problem(s); nothing was changed", p.findings.len()),
        p.findings,
        p.plan.warnings,
    );
    let mut hints = p.hints;
    if let Some(h) = crate::lock::target_holder(&ctx.target).filter(|_| unlocked) {
        // Findings may be another run's work in progress (a port its stack just took).
        hints.push(format!(
            "another bkbundle run is changing {} right now: {}; wait for it to finish, then run this again",
            ctx.target.display(),
            h.describe()
        ));
    }
    hints.dedup();
    e.hints = hints;
    e
}

/// The steps' shared state while they run.
struct Exec<'a> {
    opts: &'a InstallOptions,
    reporter: &'a dyn Reporter,
    ctx: &'a Ctx,
    engine: Engine,
    compose: Compose,
    journal: Journal,
    notes: Vec<String>,
    /// The stack's services as preflight read them, journaled when the stack starts.
    planned_services: Vec<String>,
    /// The stack's services as health found them.
    services: Vec<health::ServiceHealth>,
    site: std::collections::BTreeMap<String, String>,
    /// The platform's database, connected at the first step that needs it.
    db: Option<crate::ports::live::Postgres>,
    /// The NATS certificate was written anew: a running NATS restarts to serve it.
    tls_changed: bool,
}

/// 3. Execute, journaling each step: a kill after a step resumes past it.
#[allow(clippy::too_many_arguments)]
async fn execute(
    opts: &InstallOptions,
    reporter: &dyn Reporter,
    ctx: &Ctx,
    id: &BundleId,
    p: Planned,
    mut journal: Journal,
    mut steps: Vec<Step>,
    notes: Vec<String>,
    t0: Instant,
) -> Result<InstallReport> {
    let (Some(engine), Some(compose)) = (p.engine, p.compose) else {
        return Err(Error::internal("preflight passed without an engine and compose"));
    };
    let mut notes = notes;
    let upgrade = upgrade_backup(opts, reporter, ctx, id, &journal, &mut steps, &mut notes).await?;
    journal.bundle = Some(id.clone());
    journal.project = Some(ctx.project.clone());
    // Where the images came from, for doctor: the registry given, or the bundle when it has its
    // layers (a bundle without layers whose images were all present keeps what was recorded).
    if let Some(source) = &ctx.registry {
        journal.images_from = Some(source.target.to_string());
        journal.registry_access = Some(journal::RegistryAccess::of(&source.access));
    } else if !ctx.manifest.bundle.without_layers {
        journal.images_from = None;
        journal.registry_access = None;
    }
    journal.history.push(journal::Run {
        bundle: id.clone(),
        started: now(),
        finished: None,
        outcome: "running".into(),
    });
    std::fs::create_dir_all(&ctx.target).map_err(|e| Error::io("cannot create target directory", &ctx.target, e))?;
    journal.save(&ctx.target)?;
    let mut x = Exec {
        opts,
        reporter,
        ctx,
        engine,
        compose,
        journal,
        notes,
        planned_services: p.services,
        services: vec![],
        site: p.site.unwrap_or_default(),
        db: None,
        tls_changed: false,
    };
    for step in StepName::ALL {
        if (step == StepName::Regions && !p.has_regions) || (step == StepName::Packages && !p.has_packages) {
            continue;
        }
        let t = Instant::now();
        let done = match step {
            StepName::Images => {
                load_images(
                    &x.engine,
                    ctx,
                    &p.plan,
                    p.registry.write_ca.as_ref(),
                    reporter,
                    &mut x.notes,
                )
                .await
            }
            StepName::Layout => lay_out(ctx, &p.plan, &mut x.journal, &mut x.notes).and_then(|d| {
                x.tls_changed = apply_tls(ctx, &p.plan, &mut x.notes)?;
                Ok(d)
            }),
            StepName::Start => start(&mut x).await,
            StepName::Health => wait_healthy(&mut x).await,
            StepName::Regions => seed_regions(&mut x).await,
            StepName::Packages => upload_packages(&mut x).await,
        };
        match done {
            Ok(detail) => step_done(&mut x.journal, &ctx.target, &mut steps, step.as_str(), t, detail)?,
            Err(e) => {
                // A health failure is journaled by its cause (its message's first line).
                let what = match step {
                    StepName::Health => e.message.lines().next().unwrap_or("").to_string(),
                    _ => step.as_str().to_string(),
                };
                run_failed(&mut x.journal, &ctx.target, &what);
                return Err(match &upgrade {
                    Some((file, prev)) if step != StepName::Images && step != StepName::Layout => {
                        e.hint(go_back_hint(file, prev, &ctx.target, opts.config.as_deref()))
                    }
                    _ => e,
                });
            }
        }
    }
    if let Some(run) = x.journal.history.last_mut() {
        run.finished = Some(now());
        run.outcome = "installed".into();
    }
    x.journal.save(&ctx.target)?;
    Ok(report(ctx, p.plan, steps, x.services, false, false, x.notes, t0))
}

async fn start(x: &mut Exec<'_>) -> Result<String> {
    let ctx = x.ctx;
    x.reporter.note(&format!(
        "starting compose project {} in {}",
        ctx.project,
        ctx.target.display()
    ));
    let stack = ctx
        .manifest
        .stack
        .as_ref()
        .ok_or_else(|| Error::internal("no stack after planning"))?;
    let env_file = stack.env_template.as_ref().map(|_| ctx.env_file.as_path());
    x.journal.services = x.planned_services.clone();
    // A NATS already running before `up` keeps its old certificate unless restarted (compose
    // recreates a service only when its configuration changed); one `up` starts has the new one.
    let running_before = if x.tls_changed { running_nats(x).await? } else { vec![] };
    x.compose.up(&ctx.project, &ctx.compose_file, env_file)?;
    if !running_before.is_empty() {
        restart_nats(x, &running_before).await?;
    }
    Ok(format!("{} -p {} up -d", x.compose.argv.join(" "), ctx.project))
}

/// Before an upgrade of a site (the journal names another bundle), its backup into
/// `TARGET/backups` (the oldest beyond `[backup] keep` removed), unless `--no-backup`. Returns the
/// backup and the bundle it was taken of. A backup that cannot be taken stops the install before
/// anything changes.
async fn upgrade_backup(
    opts: &InstallOptions,
    reporter: &dyn Reporter,
    ctx: &Ctx,
    id: &BundleId,
    journal: &Journal,
    steps: &mut Vec<Step>,
    notes: &mut Vec<String>,
) -> Result<Option<(PathBuf, BundleId)>> {
    let Some(prev) = journal.bundle.clone().filter(|b| b != id) else {
        return Ok(None);
    };
    if opts.no_backup {
        notes.push(format!(
            "no backup was taken before the upgrade from {} {} (--no-backup)",
            prev.name, prev.version
        ));
        return Ok(None);
    }
    let t = Instant::now();
    reporter.note(&format!(
        "backing the site up before the upgrade from {} {} to {} {}",
        prev.name, prev.version, id.name, id.version
    ));
    let r = crate::backup::take::take(&upgrade_backup_options(ctx), reporter)
        .await
        .map_err(|e| {
            let message = format!(
                "the site in {} could not be backed up before the upgrade: {}",
                ctx.target.display(),
                e.message
            );
            let mut out = Error::new(e.kind, message);
            out.hints = e.hints;
            out.hint("nothing was changed; fix that and re-run, or pass --no-backup to upgrade without a backup")
        })?;
    steps.push(Step {
        name: "backup".into(),
        seconds: t.elapsed().as_secs_f64(),
        detail: format!("{} ({})", r.file.display(), crate::inspect::human(r.bytes)),
    });
    notes.push(format!(
        "the site as it ran {} {} was backed up to {} before the upgrade",
        prev.name,
        prev.version,
        r.file.display()
    ));
    notes.extend(
        r.pruned
            .iter()
            .map(|p| format!("removed the old backup {}", p.display())),
    );
    // What the backup left out (a stack without the database service, links): the operator
    // relies on it to go back.
    notes.extend(r.notes.iter().map(|n| format!("backup: {n}")));
    Ok(Some((r.file, prev)))
}

/// The backup an upgrade takes: of the site in the target, as its `.env` reaches it, into
/// `TARGET/backups`, keeping the config's `[backup] keep`.
fn upgrade_backup_options(ctx: &Ctx) -> crate::backup::take::BackupOptions {
    let access = crate::backup::SiteAccess {
        target: ctx.target.clone(),
        config: ctx.config.clone(),
        site: Default::default(),
        project: Some(ctx.project.clone()),
        nats_url: None,
        lock_wait: None,
    };
    crate::backup::take::BackupOptions {
        site: crate::backup::reload_site(access, &ctx.target),
        output: None,
        sign_key: None,
        keep: ctx.config.backup.keep,
        seal: None,
    }
}

/// What a failed upgrade tells the operator: the command that brings back the site as it ran
/// `prev`, from the backup `file`, with the install config when one was given (restore reads its
/// [env], [nats], [backup] and [health] as install did).
fn go_back_hint(file: &Path, prev: &BundleId, target: &Path, config: Option<&Path>) -> String {
    let config = config
        .map(|c| format!(" --config {}", crate::backup::absolute(c).display()))
        .unwrap_or_default();
    format!(
        "to go back to what ran before the upgrade (bundle {} {}, id {}): bkbundle restore {} --bundle PREVIOUS.bkb --target {}{config} --force   (PREVIOUS.bkb: that bundle's file; restore loads its images, writes back the site's files, database and objects, and starts it)",
        prev.name,
        prev.version,
        prev.manifest_sha256,
        file.display(),
        target.display()
    )
}

/// Write the planned NATS certificates (before the stack starts); whether the server's changed.
fn apply_tls(ctx: &Ctx, plan: &Plan, notes: &mut Vec<String>) -> Result<bool> {
    let Some(t) = &plan.tls else { return Ok(false) };
    let changed = tls::apply(&ctx.target, t)?;
    if t.action == tls::TlsAction::Reissue {
        notes.push(format!(
            "the NATS certificate was issued again from the site CA ({}); valid until {}",
            t.reasons.join("; "),
            t.not_after
        ));
    }
    Ok(changed)
}

/// The project's running `nats` containers: (id, started at).
async fn running_nats(x: &Exec<'_>) -> Result<Vec<(String, String)>> {
    let all = x.engine.project_containers(&x.ctx.project).await?;
    Ok(all
        .into_iter()
        .filter(|c| c.service == "nats" && c.status == "running")
        .map(|c| (c.id, c.started_at))
        .collect())
}

/// `compose up` does not restart a service whose mounted files changed: the `nats` containers
/// that ran before it, and still run unrestarted, restart to load the new certificate.
async fn restart_nats(x: &mut Exec<'_>, before: &[(String, String)]) -> Result<()> {
    let running = x.engine.project_containers(&x.ctx.project).await?;
    let same = |c: &&crate::engine::ContainerState| before.iter().any(|(id, at)| *id == c.id && *at == c.started_at);
    for c in running
        .iter()
        .filter(|c| c.service == "nats" && c.status == "running")
        .filter(same)
    {
        x.reporter
            .note(&format!("restarting {} to serve its new TLS certificate", c.name));
        x.engine.restart(&c.id, Duration::from_secs(10)).await?;
        x.notes
            .push(format!("{} restarted to serve its new TLS certificate", c.name));
    }
    Ok(())
}

fn wait_options(ctx: &Ctx) -> health::WaitOptions {
    health::WaitOptions {
        project: ctx.project.clone(),
        timeout: Duration::from_secs(ctx.config.health.timeout_secs),
        steady: Duration::from_secs(ctx.config.health.steady_secs),
        poll: Duration::from_secs(1),
    }
}

async fn wait_healthy(x: &mut Exec<'_>) -> Result<String> {
    let r = x.reporter;
    x.services = health::wait(&x.engine, &wait_options(x.ctx), &move |m| r.note(m)).await?;
    Ok(format!("{} service(s) ready", x.services.len()))
}

/// The platform's database, connected once for the regions and packages steps (`slot` keeps it).
async fn platform_db<'a>(
    slot: &'a mut Option<crate::ports::live::Postgres>,
    ctx: &Ctx,
    site: &std::collections::BTreeMap<String, String>,
    step: &str,
) -> Result<&'a crate::ports::live::Postgres> {
    let db = match slot.take() {
        Some(db) => db,
        None => {
            let env = |n: &str| std::env::var(n).ok();
            let target = crate::site::targets::database(None, &ctx.config.database, site, &env)
                .map_err(|e| after_start(Error::from(e), step, ctx))?;
            crate::ports::live::Postgres::connect(target)
                .await
                .map_err(|e| after_start(Error::from(e), step, ctx))?
        }
    };
    Ok(slot.insert(db))
}

async fn seed_regions(x: &mut Exec<'_>) -> Result<String> {
    let (ctx, reporter) = (x.ctx, x.reporter);
    let regions = bundle_regions(ctx, &x.site);
    let mut ropts =
        crate::regions::RegionsOptions::new(crate::regions::Mode::Apply, &regions, &ctx.config, x.site.clone());
    ropts.wait_for_migrations = Some(Duration::from_secs(ctx.config.database.migrations_timeout_secs));
    // The stack being installed: its server may be restarted to drop an in-memory cache.
    ropts.project = Some(ctx.project.clone());
    ropts.restart_server = true;
    reporter.note("seeding the cloud regions' sidecar env (waiting for the server's tables if needed)");
    let env = |n: &str| std::env::var(n).ok();
    let v = crate::regions::validate(&ropts, &env).map_err(|e| after_start(e.into(), "regions", ctx))?;
    let db = platform_db(&mut x.db, ctx, &x.site, "regions").await?;
    let seams = crate::regions::Seams {
        db,
        docker: Some(&x.engine),
        cache: None,
    };
    let r = crate::regions::run_on(&ropts, &v, &seams, reporter, Instant::now())
        .await
        .map_err(|e| after_start(e.into(), "regions", ctx))?;
    x.notes.extend(r.notes.iter().cloned());
    let max = match x.site.contains_key(tls::CA_FILE_VALUE) {
        true => crate::ports::PlatformDb::release(db, None)
            .await
            .ok()
            .and_then(|r| r.env_value_max()),
        false => None,
    };
    if let Some(max) = max {
        if narrow_default_zone(x, max)? {
            reporter
                .note("recreating the server without the site CA in its environment (this release cannot store it)");
            let env_file = Some(ctx.env_file.as_path());
            x.compose.up(&ctx.project, &ctx.compose_file, env_file)?;
            health::wait(&x.engine, &wait_options(ctx), &move |m| reporter.note(m)).await?;
        }
    }
    if let Some(name) = &r.cache.restarted {
        // The server was restarted to drop its in-memory cache: ready again before going on.
        reporter.note(&format!("waiting for {name} to be ready again after its restart"));
        health::wait(&x.engine, &wait_options(ctx), &move |m| reporter.note(m)).await?;
    }
    Ok(format!(
        "{} region(s) in {} ({}): {} key(s) created, {} updated, {} unchanged",
        r.regions.len(),
        r.database.as_deref().unwrap_or("?"),
        r.release.as_deref().unwrap_or("release unknown"),
        r.created,
        r.updated,
        r.unchanged
    ))
}

/// A first install plans region 1's server environment before the server has migrated, so for
/// the newest release; once the release is known, one whose env column takes at most `max`
/// characters gets it again without the CA (the server would fail writing it and stop seeding the
/// rest). Whether the file changed (compose then recreates the server with it).
fn narrow_default_zone(x: &Exec<'_>, max: usize) -> Result<bool> {
    let ctx = x.ctx;
    let Ok(desired) = crate::platform::rules::desired(&bundle_regions(ctx, &x.site), &ctx.config.regions, &x.site)
    else {
        return Ok(false);
    };
    let f = default_zone_file(&ctx.target, &desired, Some(max));
    if f.action == FileAction::Unchanged {
        return Ok(false);
    }
    journal::write_atomic(&ctx.target.join(DEFAULT_ZONE_FILE), &f.content, f.mode)?;
    Ok(true)
}

async fn upload_packages(x: &mut Exec<'_>) -> Result<String> {
    let (ctx, reporter) = (x.ctx, x.reporter);
    let mut popts = crate::packages::PackagesOptions::new(x.opts.bundle.clone(), &ctx.config, x.site.clone());
    // The bundle install verified, not opened again.
    popts.opened = Some(ctx.reader.clone());
    popts.wait_for_migrations = Some(Duration::from_secs(ctx.config.database.migrations_timeout_secs));
    reporter.note("uploading the agent packages to the NATS object store and recording their rows");
    let failed = |e: Error| {
        after_start(e, "packages", ctx).hint(
            "after fixing it, re-run `bkbundle install` (it resumes here) or `bkbundle init-packages --auto --bundle BUNDLE --env-file TARGET/.env`",
        )
    };
    let (bundle, inputs) = crate::packages::inputs(&popts).map_err(|e| failed(e.into()))?;
    let db = platform_db(&mut x.db, ctx, &x.site, "packages").await.map_err(failed)?;
    let env = |n: &str| std::env::var(n).ok();
    let r = crate::packages::run_connected(&popts, bundle.as_ref(), &inputs, db, &env, reporter)
        .await
        .map_err(|e| failed(e.into()))?;
    x.notes.extend(r.notes.iter().cloned());
    for m in r.missing_objects.iter().filter(|m| !m.repaired) {
        x.notes.push(format!(
            "package row {} points at object {}, which is missing and not in this bundle (downloads of it fail)",
            m.row_id, m.key
        ));
    }
    Ok(format!(
        "{} package(s) on {} bucket {:?}: {} uploaded, {} skipped, {} replaced; rows {} created, {} updated, {} unchanged",
        r.packages.len(),
        r.nats.as_deref().unwrap_or("?"),
        r.bucket,
        r.uploaded,
        r.skipped,
        r.replaced,
        r.rows_created,
        r.rows_updated,
        r.rows_unchanged
    ))
}

/// Record a completed step in the journal (saved at once, so a kill after it resumes past it)
/// and in the report.
fn step_done(
    journal: &mut Journal,
    target: &Path,
    steps: &mut Vec<Step>,
    name: &str,
    t: Instant,
    detail: String,
) -> Result<()> {
    journal.mark(name);
    journal.save(target)?;
    steps.push(Step {
        name: name.into(),
        seconds: t.elapsed().as_secs_f64(),
        detail,
    });
    Ok(())
}

/// Close the journal's current run as failed at `what` (best effort: the step's own error is the
/// one to report).
fn run_failed(journal: &mut Journal, target: &Path, what: &str) {
    if let Some(run) = journal.history.last_mut() {
        run.finished = Some(now());
        run.outcome = format!("failed: {what}");
    }
    let _ = journal.save(target);
}

/// The error of a step that runs after the stack was started (regions, packages): the step's own
/// message may say "nothing was changed" of its data; make it true of the install as a whole.
fn after_start(mut e: Error, step: &str, ctx: &Ctx) -> Error {
    let what = match step {
        "regions" => "the cloud regions' env was not changed",
        "packages" => "no package was changed",
        _ => "this step changed nothing",
    };
    for phrase in ["nothing was changed", "nothing was written"] {
        e.message = e.message.replace(phrase, what);
    }
    e.message.push_str(&format!(
        "\ninstall stopped at its {step} step: it had already loaded the images, laid out {} and started compose project {} (the stack is running)",
        ctx.target.display(),
        ctx.project
    ));
    e
}

/// Whether the bundle declares cloud-region env to seed.
/// The file the `server` service reads region 1's values from (`DEFAULT_ZONE_VAR_<KEY>`; see
/// the bundle's compose file), rendered from the desired default region: always rewritten, it
/// is derived from the bundle and the install config alone. Mode 0600: it holds secrets.
pub const DEFAULT_ZONE_FILE: &str = "default-zone.env";

/// `value_max`: the release's `value` column width, when known; a key it does not write
/// ([`crate::platform::regions::left_out`]) is left out here too, or the server would fail writing
/// it at start and stop seeding the rest.
fn default_zone_file(
    target: &Path,
    desired: &crate::platform::rules::Desired,
    value_max: Option<usize>,
) -> PlannedFile {
    let mut text = String::from(
        "# Written by `bkbundle install` from the bundle's [regions.env] and the install config: region 1's\n\
         # sidecar env, which the BK-Lite server turns into region 1's rows at every start. Edit the\n\
         # install config and run `bkbundle install` again; changes made here are overwritten.\n",
    );
    if let Some(default) = desired.regions.iter().find(|r| r.is_default()) {
        for (k, v) in default
            .env
            .iter()
            .filter(|(k, v)| !crate::platform::regions::left_out(k, v, value_max))
        {
            text.push_str(&format!(
                "{}{k}={}\n",
                crate::platform::rules::DEFAULT_ZONE_VAR_PREFIX,
                env_file_value(&v.value)
            ));
        }
    }
    let content = text.into_bytes();
    let action = rendered_action(&target.join(DEFAULT_ZONE_FILE), &content);
    PlannedFile {
        path: DEFAULT_ZONE_FILE.into(),
        action,
        content,
        mode: 0o600,
    }
}

/// What writing `content` to a file bkbundle renders (always rewritten) does.
fn rendered_action(path: &Path, content: &[u8]) -> FileAction {
    match std::fs::read(path) {
        Err(_) => FileAction::Create,
        Ok(old) if old == content => FileAction::Unchanged,
        Ok(_) => FileAction::Update,
    }
}

/// A value as an env_file line holds it. The server takes `DEFAULT_ZONE_VAR_*` from its process
/// environment as is (no unescaping), so a multi-line value (a PEM CA) must reach it with real
/// newlines: written double-quoted with `\n` escapes, which both compose v1 (python-dotenv) and
/// compose v2 turn back into newlines (checked with docker-compose 1.29 here). Single-line values
/// stay unquoted, as before.
fn env_file_value(v: &str) -> String {
    if !v.contains('\n') {
        return v.to_string();
    }
    let escaped = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    format!("\"{escaped}\"")
}

fn has_regions(r: &crate::manifest::Regions) -> bool {
    !r.required.is_empty() || !r.env.is_empty() || !r.region.is_empty()
}

// The report's parts, as install gathered them; issue 15 turns the install into one plan value.
#[allow(clippy::too_many_arguments)]
fn report(
    ctx: &Ctx,
    plan: Plan,
    steps: Vec<Step>,
    services: Vec<health::ServiceHealth>,
    already_installed: bool,
    dry_run: bool,
    notes: Vec<String>,
    t0: Instant,
) -> InstallReport {
    InstallReport {
        bundle: ctx.manifest.bundle.name.clone(),
        version: ctx.manifest.bundle.version.clone(),
        target: ctx.target.clone(),
        project: ctx.project.clone(),
        images_from: plan.images_from.clone(),
        already_installed,
        dry_run,
        plan,
        steps,
        services,
        notes,
        seconds: t0.elapsed().as_secs_f64(),
    }
}

pub(crate) fn now() -> String {
    crate::pack::rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// What each image to load streams (its layers the engine lacks), and for a delta bundle what the
/// site lacks of what it leaves to its base: layers and configs not in the engine, packages and
/// installers not in the object store. Those are findings: the install stops before it changes
/// anything, naming each part and the base bundle to bring.
async fn plan_streams(
    engine: &Engine,
    ctx: &Ctx,
    images: &mut [PlannedImage],
    platform: &platform::PlatformPlan,
    journal: &Journal,
    findings: &mut Vec<String>,
    hints: &mut Vec<String>,
) -> Result<()> {
    let m = &ctx.manifest;
    let to_load: Vec<&Image> = images
        .iter()
        .filter(|p| p.action == ImageAction::Load)
        .filter_map(|p| m.images.iter().find(|i| i.id == p.id))
        .collect();
    let mut gaps = Vec::new();
    if !to_load.is_empty() && !m.bundle.without_layers {
        let layers = engine.layers().await?;
        let (bytes, _) = crate::delta::stream_bytes(m, &to_load, &layers);
        let loads = images.iter_mut().filter(|p| p.action == ImageAction::Load);
        for (p, b) in loads.zip(bytes) {
            p.stream = Some(b);
        }
        gaps = crate::delta::image_gaps(m, &to_load, &layers);
    }
    if m.base.is_some() {
        for o in platform.packages.iter().chain(platform.installers.iter()) {
            if let Some(path) = o.from_base.as_deref() {
                gaps.push(format!(
                    "object {} ({}): not in the object store with digest {}, and this delta bundle leaves its file {path} to its base",
                    o.key,
                    crate::inspect::human(o.size),
                    o.digest
                ));
            }
        }
    }
    if !gaps.is_empty() {
        let installed = journal.bundle.as_ref().map(|b| {
            format!(
                "{} {} (id {})",
                b.name,
                b.version,
                crate::manifest::short_id(&b.manifest_sha256)
            )
        });
        let e = crate::delta::gaps_error(m, &gaps, installed.as_deref());
        findings.push(e.message);
        hints.extend(e.hints);
    }
    Ok(())
}

/// Each image: loaded (its id is not in the engine), tagged (it is, under another reference),
/// or present.
async fn plan_images(engine: &dyn crate::ports::Docker, images: &[Image]) -> Result<Vec<PlannedImage>> {
    let mut out = Vec::new();
    for img in images {
        let action = if engine.image(&img.id).await?.is_none() {
            ImageAction::Load
        } else {
            let mut all_tagged = true;
            for r in &img.refs {
                if engine.image(r).await?.map(|i| i.id) != Some(img.id.clone()) {
                    all_tagged = false;
                }
            }
            if all_tagged {
                ImageAction::Present
            } else {
                ImageAction::Tag
            }
        };
        out.push(PlannedImage {
            refs: img.refs.clone(),
            id: img.id.clone(),
            size: img.size,
            action,
            from: None,
            stream: None,
        });
    }
    Ok(out)
}

fn plan_files(
    ctx: &Ctx,
    stack: &crate::manifest::Stack,
    journal: &Journal,
    findings: &mut Vec<String>,
    hints: &mut Vec<String>,
) -> Result<(Vec<PlannedFile>, Option<envfile::Rendered>)> {
    let mut files = Vec::new();
    for path in &stack.files {
        let bundle::StackFile { content, mode } = ctx.reader.stack_file(path)?;
        let rel = layout::stack_relative(path).to_string();
        let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
        files.push(decide(&ctx.target, rel, content, mode, journal));
    }
    // .env: rendered from the template, merged with what is there.
    let mut env = None;
    if let Some(t) = &stack.env_template {
        let template = String::from_utf8_lossy(&ctx.reader.stack_file(t)?.content).into_owned();
        let existing = std::fs::read_to_string(&ctx.env_file).ok();
        let mut secret_err = None;
        let rendered = envfile::render(&template, existing.as_deref(), &ctx.config.env, || {
            envfile::random_secret(32).unwrap_or_else(|e| {
                secret_err = Some(e);
                String::new()
            })
        });
        if let Some(e) = secret_err {
            return Err(Error::internal(format!("cannot read random bytes for secrets: {e}")));
        }
        match rendered {
            Ok(r) => {
                // Generated and site secrets never reach a log line (install logs at -v/-vv).
                for (k, v) in &r.values {
                    if crate::logging::is_secret_name(k) || r.generated.contains(k) {
                        crate::logging::register_secret(v);
                    }
                }
                let action = match &existing {
                    None => FileAction::Create,
                    Some(old) if *old == r.text => FileAction::Unchanged,
                    Some(_) => FileAction::Update,
                };
                files.push(PlannedFile {
                    path: ".env".into(),
                    action,
                    content: r.text.clone().into_bytes(),
                    mode: 0o600,
                });
                env = Some(r);
            }
            Err(missing) => {
                for m in missing {
                    findings.push(format!(
                        "install config: {} is required by {t} line {} ({}=...${{{}}}...) and is not set",
                        m.name, m.line, m.key, m.name
                    ));
                }
                hints.push(
                    "set each under [env] in the install config (--config install.toml), e.g. HOST_IP = \"10.0.0.5\""
                        .into(),
                );
            }
        }
    }
    Ok((files, env))
}

fn decide(target: &Path, rel: String, content: Vec<u8>, mode: u32, journal: &Journal) -> PlannedFile {
    let dest = target.join(&rel);
    let new_sha = sha256_hex(&content);
    let action = match std::fs::read(&dest) {
        Err(_) => FileAction::Create,
        Ok(old) => {
            let old_sha = sha256_hex(&old);
            if old_sha == new_sha {
                FileAction::Unchanged
            } else if journal.files.get(&rel) == Some(&old_sha) {
                FileAction::Update
            } else {
                FileAction::KeepEdited
            }
        }
    };
    PlannedFile {
        path: rel,
        action,
        content,
        mode,
    }
}

/// The checks that need the engine and compose. `rendered`: the stack's `.env` is known (rendered
/// from the template, or the stack has none). Returns the stack's services.
#[allow(clippy::too_many_arguments)]
async fn preflight(
    engine: &Engine,
    compose: &Compose,
    ctx: &Ctx,
    plan: &Plan,
    rendered: bool,
    journal: &Journal,
    findings: &mut Vec<String>,
    hints: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<Vec<String>> {
    check_space(engine, ctx, plan, findings, hints).await?;
    if !rendered {
        return Ok(vec![]); // the env template did not render: already a finding
    }
    let yaml = match compose_config(compose, ctx, plan)? {
        Ok(y) => Some(y),
        Err(finding) => {
            findings.push(finding);
            None
        }
    };
    let mut services = Vec::new();
    if let Some(yaml) = &yaml {
        match offline::services(yaml) {
            Ok(s) => services = s,
            Err(e) => findings.push(format!("cannot read `{} config` output: {e}", compose.name())),
        }
    }
    check_offline(engine, ctx, &services, findings, hints).await?;
    // `up --remove-orphans` removes the project's containers of services this stack lacks.
    let names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
    if let Some(yaml) = yaml {
        orphan_warnings(engine, ctx, journal, &names, warnings).await?;
        check_ports(engine, ctx, &yaml, findings, hints).await?;
    }
    Ok(names)
}

/// Free space: docker load unpacks through a temporary copy, so twice the images' size; the
/// target needs the stack files.
async fn check_space(
    engine: &Engine,
    ctx: &Ctx,
    plan: &Plan,
    findings: &mut Vec<String>,
    hints: &mut Vec<String>,
) -> Result<()> {
    let to_load: u64 = plan
        .images
        .iter()
        .filter(|i| i.action == ImageAction::Load || i.action == ImageAction::Pull)
        .map(|i| i.stream.unwrap_or(i.size))
        .sum();
    if to_load > 0 {
        let root = engine.data_root().await?;
        if let Some(free) = free_space(Path::new(&root)) {
            let need = to_load * 2 + to_load / 10;
            if free < need {
                findings.push(format!(
                    "Docker data root {root}: {} free, the images need about {} (twice their {} uncompressed, plus 10 %)",
                    crate::inspect::human(free),
                    crate::inspect::human(need),
                    crate::inspect::human(to_load)
                ));
                hints.push(format!(
                    "free space under {root} (`docker system df`, remove unused images), or move Docker's data root"
                ));
            }
        }
    }
    let files_size: u64 = plan.files.iter().map(|f| f.content.len() as u64).sum::<u64>() + (1 << 20);
    if let Some(free) = free_space(&ctx.target) {
        if free < files_size {
            findings.push(format!(
                "target {}: {} free, the stack files need {}",
                ctx.target.display(),
                crate::inspect::human(free),
                crate::inspect::human(files_size)
            ));
        }
    }
    Ok(())
}

/// The rendered compose file as compose itself reads it (`config`), from a private staging copy
/// (it holds the secrets: see `staging`), removed when this returns. `Ok(Err(finding))` when
/// compose refuses the file.
fn compose_config(compose: &Compose, ctx: &Ctx, plan: &Plan) -> Result<std::result::Result<String, String>> {
    staging::remove_stale(&ctx.target);
    let staging = staging::Staging::new(&ctx.target)?;
    for f in &plan.files {
        // Operator-edited files are used as they are: check those, not the bundle's.
        if f.action == FileAction::KeepEdited {
            staging.copy_in(&ctx.target.join(&f.path), &f.path)?;
        } else {
            staging.write(&f.path, &f.content)?;
        }
    }
    let with_template = plan.files.iter().any(|f| f.path == ".env");
    if !with_template && ctx.env_file.is_file() {
        // No template: compose reads the operator's own .env beside the compose file.
        staging.copy_in(&ctx.env_file, ".env")?;
    }
    let cf = staging
        .path()
        .join(ctx.compose_file.strip_prefix(&ctx.target).unwrap_or(&ctx.compose_file));
    let ef = staging.path().join(".env");
    match compose.config(&ctx.project, &cf, with_template.then_some(ef.as_path())) {
        Ok(y) => Ok(Ok(y)),
        Err(e) if e.kind == Kind::Input => Ok(Err(e.message)),
        Err(e) => Err(e),
    }
}

/// The offline guarantee: every service's image is in the bundle or the engine; nothing to
/// build, nothing to pull.
async fn check_offline(
    engine: &Engine,
    ctx: &Ctx,
    services: &[offline::ServiceSpec],
    findings: &mut Vec<String>,
    hints: &mut Vec<String>,
) -> Result<()> {
    let mut available = std::collections::BTreeSet::new();
    for s in services {
        let Some(image) = &s.image else { continue };
        let n = offline::normalize_ref(image);
        let in_bundle = ctx
            .manifest
            .images
            .iter()
            .any(|i| i.refs.iter().any(|r| offline::normalize_ref(r) == n));
        if in_bundle || engine.image(image).await?.is_some() {
            available.insert(image.clone());
        }
    }
    for p in offline::problems(services, &|i| available.contains(i)) {
        findings.push(format!("offline: {}", p.message));
        hints.push(p.hint);
    }
    Ok(())
}

/// Every published port free, except those this stack's own containers hold (a re-run).
async fn check_ports(
    engine: &Engine,
    ctx: &Ctx,
    yaml: &str,
    findings: &mut Vec<String>,
    hints: &mut Vec<String>,
) -> Result<()> {
    let ours: Vec<(String, u16, String)> = engine
        .project_containers(&ctx.project)
        .await?
        .into_iter()
        .flat_map(|c| c.ports)
        .collect();
    for (service, ip, port, proto) in published_ports(yaml) {
        if ours.iter().any(|(_, p, pr)| *p == port && *pr == proto) {
            continue;
        }
        if let Err(e) = try_bind(&ip, port, &proto) {
            findings.push(format!(
                "port {port}/{proto} (service {service}) on {} is already in use: {e}",
                if ip.is_empty() { "0.0.0.0" } else { &ip }
            ));
            hints.push(format!(
                "find what holds it (`ss -lntup | grep :{port}`) and stop it, or publish the service on another port via the install config's [env]"
            ));
        }
    }
    Ok(())
}

/// Warn about the containers of the compose project that bkbundle did not create here: `up
/// --remove-orphans` removes those of services this stack lacks, and compose takes over (recreates)
/// those of services it has.
async fn orphan_warnings(
    engine: &Engine,
    ctx: &Ctx,
    journal: &Journal,
    services: &[String],
    warnings: &mut Vec<String>,
) -> Result<()> {
    let ours_before = journal.project.as_deref() == Some(ctx.project.as_str());
    for c in engine.project_containers(&ctx.project).await? {
        let in_stack = services.contains(&c.service);
        // Services of the stack bkbundle started here before (removed by this version: expected).
        let known = ours_before && (journal.services.is_empty() || journal.services.contains(&c.service));
        if !in_stack && !known {
            warnings.push(format!(
                "compose project {} has container {} (service {}), which this stack does not define and bkbundle did not create; `up --remove-orphans` will remove it (choose another `project` in the install config to keep it)",
                ctx.project, c.name, c.service
            ));
        } else if in_stack && !ours_before {
            warnings.push(format!(
                "compose project {} already has container {} (service {}), not created by an install in {}; compose will recreate it with this stack's configuration",
                ctx.project,
                c.name,
                c.service,
                ctx.target.display()
            ));
        }
    }
    Ok(())
}

/// (service, host ip, port, protocol) of every published port in `compose config` output, in
/// either the short (`"127.0.0.1:8080:80/tcp"`) or the long form.
pub fn published_ports(yaml: &str) -> Vec<(String, String, u16, String)> {
    let mut out = Vec::new();
    let Ok(doc) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(yaml) else {
        return out;
    };
    let Some(services) = doc.get("services").and_then(|s| s.as_mapping()) else {
        return out;
    };
    for (name, svc) in services {
        let name = name.as_str().unwrap_or("").to_string();
        for p in svc.get("ports").and_then(|p| p.as_sequence()).into_iter().flatten() {
            if let Some(s) = p.as_str() {
                let (spec, proto) = s.split_once('/').unwrap_or((s, "tcp"));
                let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
                // container[, host[, ip]] reversed
                if parts.len() >= 2 {
                    let ip = parts
                        .get(2)
                        .map(|s| s.trim_matches(['[', ']']).to_string())
                        .unwrap_or_default();
                    if let Ok(port) = parts[1].parse() {
                        out.push((name.clone(), ip, port, proto.to_string()));
                    }
                }
            } else if let Some(published) = p.get("published") {
                let port = published
                    .as_u64()
                    .map(|v| v as u16)
                    .or_else(|| published.as_str().and_then(|s| s.parse().ok()));
                if let Some(port) = port {
                    let ip = p.get("host_ip").and_then(|v| v.as_str()).unwrap_or("").to_string();
                    let proto = p.get("protocol").and_then(|v| v.as_str()).unwrap_or("tcp").to_string();
                    out.push((name.clone(), ip, port, proto));
                }
            }
        }
    }
    out
}

/// Whether the port can be bound now. A failure is tried again a few times over half a second:
/// another run's preflight probing the same port holds it for an instant.
fn try_bind(ip: &str, port: u16, proto: &str) -> std::io::Result<()> {
    let ip = if ip.is_empty() { "0.0.0.0" } else { ip };
    let addr = format!("{ip}:{port}");
    let once = || {
        if proto == "udp" {
            std::net::UdpSocket::bind(&addr).map(|_| ())
        } else {
            std::net::TcpListener::bind(&addr).map(|_| ())
        }
    };
    let mut last = once();
    for _ in 0..5 {
        match &last {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                std::thread::sleep(Duration::from_millis(100));
                last = once();
            }
            _ => break,
        }
    }
    last
}

pub(crate) fn free_space(path: &Path) -> Option<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
    }
    let c = std::ffi::CString::new(p.to_string_lossy().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

async fn load_images(
    engine: &Engine,
    ctx: &Ctx,
    plan: &Plan,
    write_ca: Option<&(PathBuf, Vec<u8>)>,
    reporter: &dyn Reporter,
    notes: &mut Vec<String>,
) -> Result<String> {
    match &ctx.registry {
        Some(source) => {
            let pulled = registry::pull(engine, source, &plan.images, write_ca, reporter, notes).await?;
            // What the pull did not cover: images there under another name.
            let rest = load_planned(engine, &ctx.reader, &ctx.manifest, &plan.images, reporter).await?;
            Ok(format!("{pulled} pulled from {}, {rest}", source.target))
        }
        None => load_planned(engine, &ctx.reader, &ctx.manifest, &plan.images, reporter).await,
    }
}

/// Every image of `reader`'s bundle in the engine, with its references: loaded from the bundle
/// when its id is missing, tagged when a reference is (restore brings a site's images back so).
pub(crate) async fn ensure_images(
    engine: &Engine,
    reader: &Arc<VerifiedBundle>,
    reporter: &dyn Reporter,
) -> Result<String> {
    let manifest = Arc::new(reader.manifest().clone());
    let planned = plan_images(engine, &manifest.images).await?;
    load_planned(engine, reader, &manifest, &planned, reporter).await
}

async fn load_planned(
    engine: &Engine,
    reader: &Arc<VerifiedBundle>,
    manifest: &Arc<Manifest>,
    planned: &[PlannedImage],
    reporter: &dyn Reporter,
) -> Result<String> {
    let to_load: Vec<Image> = planned
        .iter()
        .filter(|p| p.action == ImageAction::Load)
        .filter_map(|p| manifest.images.iter().find(|i| i.id == p.id).cloned())
        .collect();
    if manifest.bundle.without_layers && !to_load.is_empty() {
        let names: Vec<String> = to_load
            .iter()
            .map(|i| format!("{} ({})", i.refs.join(", "), i.id))
            .collect();
        return Err(Error::new(
            Kind::Preflight,
            format!(
                "the bundle carries no image layers and the Docker engine lacks {}",
                names.join("; ")
            ),
        )
        .hint("give --images-from REGISTRY (the registry the full bundle was pushed to), or use the full bundle"));
    }
    let mut loaded = 0;
    let mut streamed = String::new();
    if !to_load.is_empty() {
        // What the engine has now (an operator may have pruned since the plan).
        let layers = engine.layers().await?;
        let refs: Vec<&Image> = to_load.iter().collect();
        let gaps = crate::delta::image_gaps(manifest, &refs, &layers);
        if !gaps.is_empty() {
            return Err(crate::delta::gaps_error(manifest, &gaps, None));
        }
        let (per_image, skipped) = crate::delta::stream_bytes(manifest, &refs, &layers);
        let total = per_image.iter().fold(0u64, |a, b| a.saturating_add(*b));
        streamed = format!(
            " ({} of layers streamed{})",
            crate::inspect::human(total),
            if skipped > 0 {
                format!(", {} already in the engine", crate::inspect::human(skipped))
            } else {
                String::new()
            }
        );
        let names: Vec<String> = to_load.iter().map(|i| i.refs.join(", ")).collect();
        reporter.note(&format!("loading {} image(s): {}", to_load.len(), names.join("; ")));
        let task: Arc<dyn crate::progress::Task> = Arc::from(reporter.task("loading images", Some(total)));
        let (body, writer) = load::spawn_load_stream(
            reader.clone(),
            manifest.clone(),
            to_load.clone(),
            Arc::new(layers),
            task.clone(),
        );
        let res = engine.load(body).await;
        let wres = writer
            .await
            .map_err(|e| Error::internal(format!("image stream task: {e}")))?;
        task.finish();
        wres?;
        res?;
        loaded = to_load.len();
    }
    // Tags the engine lacks (the image is there under another name, or a re-tag was lost).
    let mut tagged = 0;
    for p in planned
        .iter()
        .filter(|p| p.action != ImageAction::Present && p.action != ImageAction::Pull)
    {
        for r in &p.refs {
            if engine.image(r).await?.map(|i| i.id) != Some(p.id.clone()) {
                engine.tag(&p.id, r).await?;
                tagged += 1;
            }
        }
        if engine.image(&p.id).await?.is_none() {
            return Err(Error::external(format!(
                "image {} ({}) is still missing after loading",
                p.refs.join(", "),
                p.id
            )));
        }
    }
    let present = planned.iter().filter(|p| p.action == ImageAction::Present).count();
    if planned.iter().any(|p| p.action == ImageAction::Pull) {
        return Ok(format!("{tagged} tag(s) set, {present} already present"));
    }
    Ok(format!(
        "{loaded} loaded{streamed}, {tagged} tag(s) set, {present} already present"
    ))
}

fn lay_out(ctx: &Ctx, plan: &Plan, journal: &mut Journal, notes: &mut Vec<String>) -> Result<String> {
    let (mut written, mut kept) = (0, 0);
    for f in &plan.files {
        let dest = ctx.target.join(&f.path);
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::io("cannot create", d, e))?;
        }
        match f.action {
            FileAction::Unchanged => {}
            FileAction::Create | FileAction::Update => {
                journal::write_atomic(&dest, &f.content, f.mode)?;
                written += 1;
            }
            FileAction::KeepEdited => {
                let beside = dest.with_file_name(format!(
                    "{}.bkbundle-new",
                    dest.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
                ));
                journal::write_atomic(&beside, &f.content, f.mode)?;
                notes.push(format!(
                    "kept your edited {}; the bundle's version is beside it as {} (compare and merge by hand)",
                    dest.display(),
                    beside.display()
                ));
                kept += 1;
                continue;
            }
        }
        journal.files.insert(f.path.clone(), sha256_hex(&f.content));
    }
    let secrets = plan.env_generated.len();
    if secrets > 0 {
        notes.push(format!(
            "generated {secrets} secret(s) in {} (mode 0600): {}",
            ctx.env_file.display(),
            plan.env_generated.join(", ")
        ));
    }
    Ok(format!(
        "{written} written, {kept} kept (edited by you), {} unchanged",
        plan.files.len() - written - kept
    ))
}

/// Human report.
pub fn render(r: &InstallReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let head = if r.dry_run {
        "dry run (nothing changed): would install"
    } else if r.already_installed {
        "already installed:"
    } else {
        "installed"
    };
    let _ = writeln!(
        s,
        "{head} {} {} in {} (compose project {})",
        r.bundle,
        r.version,
        r.target.display(),
        r.project
    );
    if r.dry_run || !r.already_installed {
        match &r.images_from {
            Some(reg) => {
                let _ = writeln!(s, "images (from registry {reg}):");
            }
            None => {
                let _ = writeln!(s, "images:");
            }
        }
        for i in &r.plan.images {
            let a = match i.action {
                ImageAction::Load => "load",
                ImageAction::Pull => "pull",
                ImageAction::Tag => "tag",
                ImageAction::Present => "present",
            };
            let _ = writeln!(
                s,
                "  {a:<8} {:<48} {}{}",
                i.refs.join(", "),
                crate::inspect::human(i.size),
                i.from.as_ref().map(|f| format!("  from {f}")).unwrap_or_default()
            );
        }
        let _ = writeln!(s, "files:");
        for f in &r.plan.files {
            let a = match f.action {
                FileAction::Create => "create",
                FileAction::Update => "update",
                FileAction::Unchanged => "same",
                FileAction::KeepEdited => "keep",
            };
            let _ = writeln!(s, "  {a:<8} {}", f.path);
        }
        if !r.plan.env_generated.is_empty() {
            let _ = writeln!(
                s,
                "secrets generated (values in .env only): {}",
                r.plan.env_generated.join(", ")
            );
        }
    }
    if r.dry_run {
        if let Some(b) = &r.plan.backup {
            let _ = writeln!(
                s,
                "backup first: the site as it runs {} {}, into {} (up to {}{})",
                b.from.name,
                b.from.version,
                b.survey.dir.display(),
                crate::inspect::human(b.survey.need),
                b.survey
                    .free
                    .map(|f| format!(", {} free", crate::inspect::human(f)))
                    .unwrap_or_default()
            );
        }
        render_platform(&mut s, &r.plan.platform);
    }
    for st in &r.steps {
        let _ = writeln!(s, "  {:<10} {:>7.2}s  {}", st.name, st.seconds, st.detail);
    }
    for sv in &r.services {
        let _ = writeln!(
            s,
            "  service {:<20} {:<10} after {:.1}s",
            sv.service, sv.state, sv.ready_after_secs
        );
    }
    for w in &r.plan.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    let _ = write!(s, "total {:.1}s", r.seconds);
    s
}

/// The platform part of a dry run's plan: the rows and objects the steps would write.
fn render_platform(s: &mut String, p: &platform::PlatformPlan) {
    use std::fmt::Write as _;
    if p.rows.is_empty() && p.packages.is_empty() && p.services.is_empty() && p.notes.is_empty() {
        return;
    }
    let release = p.release.as_deref().unwrap_or("release unknown");
    let _ = writeln!(
        s,
        "platform ({release}{}):",
        if p.assumed {
            ", assumed: the database does not answer yet; the steps decide again on the live one"
        } else {
            ""
        }
    );
    for r in &p.rows {
        let value = r
            .value
            .as_deref()
            .map(|v| format!(" = {v}"))
            .unwrap_or_else(|| " (secret)".into());
        let _ = writeln!(s, "  {:<8} env {}/{}{value}", r.action.as_str(), r.region, r.key);
    }
    for sv in &p.services {
        let _ = writeln!(s, "  {:<8} service {sv}", "create");
    }
    for o in &p.packages {
        let a = match o.action {
            crate::packages::ObjectAction::Uploaded => "upload",
            crate::packages::ObjectAction::Skipped => "present",
            crate::packages::ObjectAction::Replaced => "replace",
            crate::packages::ObjectAction::Repaired => "repair",
            crate::packages::ObjectAction::LeftAlone => "leave",
        };
        let _ = writeln!(
            s,
            "  {a:<8} object {}/{} ({}, {})",
            p.bucket.as_deref().unwrap_or("?"),
            o.key,
            crate::inspect::human(o.size),
            o.digest
        );
    }
    for n in &p.notes {
        let _ = writeln!(s, "  note: {n}");
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_multi_line_value_reaches_the_server_with_its_newlines() {
        assert_eq!(env_file_value("nats"), "nats");
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            env_file_value(pem),
            "\"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n\""
        );
        assert_eq!(env_file_value("a\"b\\\nc"), "\"a\\\"b\\\\\\nc\"");
    }
    use super::*;

    #[tokio::test]
    async fn images_are_loaded_tagged_or_present_as_the_engine_has_them() {
        use crate::engine::LocalImage;
        use crate::ports::fakes::FakeDocker;
        let image = |reference: &str, id: &str| Image {
            refs: vec![reference.into()],
            id: id.into(),
            config: String::new(),
            os: "linux".into(),
            arch: "amd64".into(),
            layers: vec![],
            size: 10,
        };
        let present = |id: &str| LocalImage {
            id: id.into(),
            size: 10,
        };
        let mut docker = FakeDocker::default();
        // app: the id and its reference; web: the id under another tag only; db: nothing.
        for (reference, id) in [
            ("sha256:a", "sha256:a"),
            ("demo/app:1", "sha256:a"),
            ("sha256:w", "sha256:w"),
        ] {
            docker.images.insert(reference.into(), present(id));
        }
        docker.images.insert("demo/web:1".into(), present("sha256:old"));
        let images = [
            image("demo/app:1", "sha256:a"),
            image("demo/web:1", "sha256:w"),
            image("demo/db:1", "sha256:d"),
        ];
        let plan = plan_images(&docker, &images).await.unwrap();
        let actions: Vec<ImageAction> = plan.iter().map(|p| p.action.clone()).collect();
        assert_eq!(actions, vec![ImageAction::Present, ImageAction::Tag, ImageAction::Load]);

        docker.down = Some("Cannot connect to the Docker daemon".into());
        let e = plan_images(&docker, &images).await.unwrap_err();
        assert_eq!(e.kind, Kind::External, "{e}");
    }

    #[test]
    fn the_way_back_names_the_backup_the_previous_bundle_and_the_config() {
        let prev = BundleId {
            name: "demo".into(),
            version: "1.0.0".into(),
            manifest_sha256: "ab12".into(),
        };
        let file = Path::new("/opt/demo/backups/site-20261207T000000.bkbak");
        let h = go_back_hint(
            file,
            &prev,
            Path::new("/opt/demo"),
            Some(Path::new("/etc/bk/install.toml")),
        );
        assert!(
            h.contains("(bundle demo 1.0.0, id ab12): bkbundle restore /opt/demo/backups/site-20261207T000000.bkbak --bundle PREVIOUS.bkb --target /opt/demo --config /etc/bk/install.toml --force   ("),
            "{h}"
        );
        // A relative config is given as install found it (restore may run elsewhere).
        let h = go_back_hint(file, &prev, Path::new("/opt/demo"), Some(Path::new("install.toml")));
        let cwd = std::env::current_dir().unwrap();
        assert!(
            h.contains(&format!("--config {} --force", cwd.join("install.toml").display())),
            "{h}"
        );
        let h = go_back_hint(file, &prev, Path::new("/opt/demo"), None);
        assert!(h.contains("--target /opt/demo --force"), "{h}");
    }

    #[test]
    fn ports_from_both_compose_forms() {
        let v1 = "services:\n  web:\n    ports:\n    - 127.0.0.1:18080:8080/tcp\n    - 9000:9000\n";
        assert_eq!(
            published_ports(v1),
            vec![
                ("web".into(), "127.0.0.1".into(), 18080, "tcp".into()),
                ("web".into(), "".into(), 9000, "tcp".into())
            ]
        );
        let v2 = "services:\n  nats:\n    ports:\n      - mode: ingress\n        host_ip: 0.0.0.0\n        target: 4222\n        published: \"14222\"\n        protocol: tcp\n";
        assert_eq!(
            published_ports(v2),
            vec![("nats".into(), "0.0.0.0".into(), 14222, "tcp".into())]
        );
    }
}
