//! The thin binary: parse arguments, run one command, and hand its result or error to the one
//! printer ([`bkbundle::printer`]), whose exit code the process returns.

mod cli;

use bkbundle::error::Error;
use bkbundle::printer::{Output, Printer};
use bkbundle::progress::{Reporter, Terminal};
use bkbundle::site::{config::InstallConfig, envfile};
use bkbundle::{backup, doctor, inspect, install, pack, packages, regions, verify};
use clap::{CommandFactory, Parser};
use cli::{Cli, Command, RegionsCommand};
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Before any thread resolves a name: the static glibc's lookups use /etc/hosts and DNS only.
    bkbundle::portable::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return exit_code(parse_failure(e)),
    };
    // Secrets the environment holds (PGPASSWORD, BKBUNDLE_SIGN_PASSWORD, ...) never reach a log.
    for (k, v) in std::env::vars() {
        if bkbundle::logging::is_secret_name(&k) {
            bkbundle::logging::register_secret(&v);
        }
    }
    bkbundle::logging::init(cli.global.verbose);
    let g = cli.global;
    let reporter = Terminal::new(!g.no_progress && !g.json, g.quiet);
    let outcome = dispatch(cli.command, &reporter);
    let code = Printer::stdio(g.json, g.quiet).finish(outcome);
    if g.verbose > 0 {
        // Our own peak memory (not docker-compose's, which rusage of children would include).
        if let Some(hwm) = peak_memory() {
            let _ = writeln!(std::io::stderr(), "bkbundle: peak memory {hwm}");
        }
    }
    exit_code(code)
}

fn exit_code(code: i32) -> ExitCode {
    // Every documented code is 0..=11; anything else would be a bug, reported as one.
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// A command line clap did not run: a usage error (stderr, exit 2) as clap prints it, or
/// `--help`/`--version`, whose write to stdout is judged as any output's (a closed pipe is fine,
/// a full disk is exit 7).
fn parse_failure(e: clap::Error) -> i32 {
    if e.use_stderr() {
        e.exit();
    }
    let written = e.print().and_then(|()| std::io::stdout().flush());
    Printer::stdio(false, false).settle(e.exit_code(), written)
}

fn peak_memory() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .map(|v| v.trim().to_string())
}

/// Run one command to its result (printed by the caller).
fn dispatch(command: Command, reporter: &dyn Reporter) -> Result<Output, Error> {
    match command {
        Command::Pack(a) => pack(a, reporter),
        Command::Verify(a) => verify(a, reporter),
        Command::Inspect(a) => inspect(a, reporter),
        Command::Merge(a) => merge(a, reporter),
        Command::Install(a) => install(a, reporter),
        Command::Regions(a) => regions(a, reporter),
        Command::InitPackages(a) => init_packages(a, reporter),
        Command::Doctor(a) => doctor(a, reporter),
        Command::Backup(a) => backup(a, reporter),
        Command::Restore(a) => restore(a, reporter),
        Command::Push(a) => push(a, reporter),
        Command::Completions { shell } => Ok(completions(shell)),
    }
}

fn pack(a: cli::PackArgs, reporter: &dyn Reporter) -> Result<Output, Error> {
    Output::of(&pack::run(&a.into(), reporter)?)
}

fn push(a: cli::PushArgs, reporter: &dyn Reporter) -> Result<Output, Error> {
    use bkbundle::registry::push::{self, LayerFormat};
    let settings = match &a.config {
        Some(p) => InstallConfig::load(p)?.registry,
        None => Default::default(),
    };
    let registry = a.registry.or_else(|| settings.url.clone()).ok_or_else(|| {
        Error::input("push needs a registry: --registry HOST[:PORT][/PREFIX], or [registry] url in the --config file")
    })?;
    let opts = push::PushOptions {
        target: bkbundle::registry::Target::parse(&registry)?,
        access: a.access.access().merged_with(&settings),
        bundle: a.bundle,
        images: a.images,
        format: match a.compression {
            cli::CompressionArg::Gzip => LayerFormat::Gzip,
            cli::CompressionArg::Zstd => LayerFormat::Zstd,
        },
        level: a.level,
        jobs: a.jobs as usize,
        key: a.key,
        lock_wait: std::time::Duration::from_secs(a.lock_wait),
    };
    Output::of(&push::run(&opts, reporter)?)
}

fn verify(a: cli::VerifyArgs, reporter: &dyn Reporter) -> Result<Output, Error> {
    Output::of(&verify::run(&a.into(), reporter)?)
}

fn inspect(a: cli::InspectArgs, reporter: &dyn Reporter) -> Result<Output, Error> {
    Output::of(&inspect::run(&a.bundle, reporter)?)
}

fn merge(a: cli::MergeArgs, reporter: &dyn Reporter) -> Result<Output, Error> {
    let opts = bkbundle::merge::MergeOptions {
        base: a.base,
        delta: a.delta,
        output: a.output,
        key: a.key,
        sign_key: a.sign,
        split_size: a.split_size,
    };
    Output::of(&bkbundle::merge::run(&opts, reporter)?)
}

fn install(a: cli::InstallArgs, reporter: &dyn Reporter) -> Result<Output, Error> {
    Output::of(&install::run(&a.into(), reporter)?)
}

fn regions(a: cli::RegionsArgs, reporter: &dyn Reporter) -> Result<Output, Error> {
    let (mode, common, database_url) = match a.command {
        // With a database, check reads it (a dry run's read-only transaction) so that the
        // regions already there are checked too; without, it needs no database at all.
        RegionsCommand::Check(c) => {
            let mode = if c.database_url.is_some() {
                regions::Mode::CheckDatabase
            } else {
                regions::Mode::Check
            };
            (mode, c.common, c.database_url)
        }
        RegionsCommand::Apply(a) => {
            let mode = if a.dry_run {
                regions::Mode::DryRun
            } else {
                regions::Mode::Apply
            };
            (mode, a.common, a.database_url)
        }
    };
    // Only the manifest is read: checked whole, every other entry left unread.
    let open = bkbundle::bundle::OpenOptions {
        check: bkbundle::bundle::Check::Structure,
        ..Default::default()
    };
    let bundle = bkbundle::bundle::open_verified(&common.bundle, &open, reporter)?;
    let (config, site) = site(common.config.as_deref(), |_| common.env_file.clone())?;
    // A target whose NATS serves TLS keeps NATS_PROTOCOL = tls and its CA, as install wrote them.
    let bundle_regions = install::tls::regions_for(&bundle.manifest().regions, &site);
    let mut opts = regions::RegionsOptions::new(mode, &bundle_regions, &config, site);
    opts.database_url = database_url;
    Output::of(&regions::run(&opts, reporter)?)
}

fn init_packages(a: cli::InitPackagesArgs, reporter: &dyn Reporter) -> Result<Output, Error> {
    if !a.auto {
        return Err(
            Error::input("init-packages needs --auto (upload every package found, without asking)")
                .hint("bkbundle init-packages --auto --bundle BUNDLE   (or --dir DIR)"),
        );
    }
    let (config, site) = site(a.site.config.as_deref(), |_| a.site.env_file.clone())?;
    let mut opts = packages::PackagesOptions::new(Default::default(), &config, site);
    opts.overrides = a.overrides();
    opts.bundle = a.bundle;
    opts.dir = a.dir;
    opts.force = a.force;
    opts.dry_run = a.dry_run;
    opts.database_url = a.site.database_url;
    opts.nats_url = a.site.nats_url;
    opts.bucket = a.site.bucket;
    Output::of(&packages::run(&opts, reporter)?)
}

fn doctor(a: cli::DoctorArgs, reporter: &dyn Reporter) -> Result<Output, Error> {
    if a.agent {
        let opts = doctor::agent::AgentOptions {
            install_dir: a.install_dir,
        };
        return Output::of(&doctor::agent::run(&opts, reporter)?);
    }
    // The stack's .env: --env-file, else the install's own beside its journal.
    let (config, site) = site(a.site.config.as_deref(), |config| {
        a.site.env_file.clone().or_else(|| {
            a.target
                .clone()
                .or(config.target.clone())
                .map(|t| t.join(".env"))
                .filter(|p| p.is_file())
        })
    })?;
    let target = a.target.clone().or(config.target.clone());
    let journal = target.as_ref().and_then(|t| install::journal::Journal::load(t).ok());
    let project = match (&a.project, &journal) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(j)) => j.project.clone(),
        (None, None) => None,
    };
    // The registry the images came from, reached as install reached it unless told otherwise.
    let recorded = journal
        .as_ref()
        .and_then(|j| j.registry_access.clone())
        .unwrap_or_default();
    let images_from = journal.and_then(|j| j.images_from);
    let opts = doctor::DoctorOptions {
        bundle: a.bundle,
        site,
        config,
        project,
        database_url: a.site.database_url,
        nats_url: a.site.nats_url,
        bucket: a.site.bucket,
        fix: a.fix,
        images_from,
        registry: a.registry.access().merged_with(&recorded.settings()),
    };
    Output::of(&doctor::run(&opts, reporter)?)
}

fn backup(a: cli::BackupArgs, reporter: &dyn Reporter) -> Result<Output, Error> {
    match a.command {
        Some(cli::BackupCommand::Verify { file, key, unlock }) => {
            let opts = bkbundle::bundle::OpenOptions {
                require_signature: key.is_some(),
                key,
                ..Default::default()
            };
            let unlock = unlock_of(&unlock)?;
            return Output::of(&backup::verify(&file, &opts, unlock.as_ref(), reporter)?);
        }
        Some(cli::BackupCommand::Inspect { file }) => return Output::of(&backup::inspect(&file, reporter)?),
        None => {}
    }
    let target = a
        .target
        .ok_or_else(|| Error::input("backup needs --target DIR: the install's directory"))?;
    let (config, site) = site(a.config.as_deref(), |_| {
        Some(target.join(".env")).filter(|p| p.is_file())
    })?;
    let keep = config.backup.keep;
    let opts = backup::take::BackupOptions {
        site: backup::SiteAccess {
            target: backup::absolute(&target),
            config,
            site,
            project: a.project,
            nats_url: a.nats_url,
            lock_wait: Some(std::time::Duration::from_secs(a.lock_wait)),
        },
        output: a.output,
        sign_key: a.sign,
        keep,
        seal: if a.encrypt {
            let p = backup::seal::passphrase(a.passphrase_file.as_deref(), true)?.ok_or_else(|| {
                Error::input("--encrypt needs a passphrase: --passphrase-file FILE, BKBUNDLE_BACKUP_PASSPHRASE, or a terminal to be asked on")
            })?;
            Some(backup::seal::SealWith::Passphrase(p))
        } else if !a.recipient.is_empty() {
            Some(backup::seal::SealWith::Recipients(a.recipient))
        } else {
            None
        },
    };
    Output::of(&backup::take::run(&opts, reporter)?)
}

fn restore(a: cli::RestoreArgs, reporter: &dyn Reporter) -> Result<Output, Error> {
    let config = match &a.config {
        Some(p) => InstallConfig::load(p)?,
        None => InstallConfig::default(),
    };
    let opts = backup::restore::RestoreOptions {
        backup: a.backup,
        bundle: a.bundle,
        site: backup::SiteAccess {
            target: backup::absolute(&a.target),
            config,
            site: Default::default(),
            project: a.project,
            nats_url: None,
            lock_wait: Some(std::time::Duration::from_secs(a.lock_wait)),
        },
        force: a.force,
        no_backup: a.no_backup,
        key: a.key,
        unlock: unlock_of(&a.unlock)?,
    };
    Output::of(&backup::restore::run(&opts, reporter)?)
}

/// What opens an encrypted backup: identity files, a passphrase file or the environment's
/// passphrase; `None` leaves it to be asked when the backup turns out to be encrypted.
fn unlock_of(a: &cli::UnlockArgs) -> Result<Option<backup::seal::Unlock>, Error> {
    if !a.identity.is_empty() {
        let mut texts = Vec::new();
        for f in &a.identity {
            let t = std::fs::read_to_string(f).map_err(|e| Error::io("cannot read the age identity file", f, e))?;
            texts.push(bkbundle::backup::seal::secret(t));
        }
        return Ok(Some(backup::seal::Unlock::Identities(texts)));
    }
    if a.passphrase_file.is_some() || std::env::var_os(backup::seal::PASSPHRASE_ENV).is_some() {
        let p = backup::seal::passphrase(a.passphrase_file.as_deref(), false)?;
        return Ok(p.map(backup::seal::Unlock::Passphrase));
    }
    Ok(None)
}

fn completions(shell: clap_complete::Shell) -> Output {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "bkbundle", &mut out);
    Output::text(String::from_utf8_lossy(&out).trim_end().to_string())
}

/// The install config (`--config`, else empty) and the site values: the stack's .env (at the
/// path `env_file` gives for that config, when any) under the config's `[env]`.
fn site(
    config: Option<&std::path::Path>,
    env_file: impl FnOnce(&InstallConfig) -> Option<std::path::PathBuf>,
) -> Result<(InstallConfig, std::collections::BTreeMap<String, String>), Error> {
    let config = match config {
        Some(p) => InstallConfig::load(p)?,
        None => InstallConfig::default(),
    };
    let path = env_file(&config);
    let values = match &path {
        Some(p) => envfile::parse(
            &std::fs::read_to_string(p).map_err(|e| Error::io("cannot read the stack's env file", p, e))?,
        ),
        None => Default::default(),
    };
    let mut site = regions::site_values(&values, &config.env);
    // The stack's .env beside the install's certificates: its NATS serves TLS with the site CA.
    if let Some(target) = path.as_deref().and_then(|p| p.parent()) {
        install::tls::installed_site_values(target, &mut site, &config);
    }
    // Before anything connects: the site's passwords and tokens never appear in a log line.
    for (k, v) in &site {
        if bkbundle::logging::is_secret_name(k) {
            bkbundle::logging::register_secret(v);
        }
    }
    for v in [&config.nats.password, &config.nats.token].into_iter().flatten() {
        bkbundle::logging::register_secret(v);
    }
    Ok((config, site))
}
