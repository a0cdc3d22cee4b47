//! The thin binary: parse arguments, run one command, print its report, map errors to exit codes.

mod cli;

use bkbundle::error::{Error, Kind};
use bkbundle::manifest::Compression;
use bkbundle::progress::{Reporter, Terminal};
use bkbundle::report::Report;
use bkbundle::site::{config::InstallConfig, envfile};
use bkbundle::{doctor, inspect, install, pack, packages, regions, verify};
use clap::{CommandFactory, Parser};
use cli::{Cli, Command, CompressionArg, RegionsCommand};
use serde::Serialize;
use std::io::Write;
use std::sync::Arc;

fn main() {
    let cli = Cli::parse();
    // Secrets the environment holds (PGPASSWORD, BKBUNDLE_SIGN_PASSWORD, ...) never reach a log.
    for (k, v) in std::env::vars() {
        if bkbundle::logging::is_secret_name(&k) {
            bkbundle::logging::register_secret(&v);
        }
    }
    bkbundle::logging::init(cli.global.verbose);
    let g = cli.global.clone();
    let reporter: Arc<dyn Reporter> = Arc::new(Terminal::new(!g.no_progress && !g.json, g.quiet));
    let verbose = g.verbose;
    let code = match run(cli, reporter.clone()) {
        Ok(out) => {
            emit(&out, &g);
            out.code
        }
        Err(e) => {
            report_error(&e, &g);
            e.kind.exit_code()
        }
    };
    if verbose > 0 {
        // Our own peak memory (not docker-compose's, which rusage of children would include).
        if let Some(hwm) = peak_memory() {
            let _ = writeln!(std::io::stderr(), "bkbundle: peak memory {hwm}");
        }
    }
    std::process::exit(code);
}

fn peak_memory() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .map(|v| v.trim().to_string())
}

/// A command's result: JSON value plus its human rendering.
struct Output {
    json: serde_json::Value,
    text: String,
    /// The exit code of a command that ran to the end: 0, or `doctor`'s
    /// [`bkbundle::error::EXIT_FINDINGS`].
    code: i32,
}

fn output<T: Serialize>(v: &T, text: String) -> Output {
    Output {
        json: serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
        text,
        code: 0,
    }
}

fn run(cli: Cli, reporter: Arc<dyn Reporter>) -> Result<Output, Error> {
    match cli.command {
        Command::Pack(a) => {
            let opts = pack::PackOptions {
                recipe: a.recipe,
                output: a.output,
                compression: match a.compression {
                    CompressionArg::Zstd => Compression::Zstd,
                    CompressionArg::Gzip => Compression::Gzip,
                },
                level: a.level,
                split_size: a.split_size,
                sign_key: a.sign,
                threads: a.threads,
            };
            let r = pack::run(&opts, &*reporter)?;
            Ok(output(&r, r.render()))
        }
        Command::Verify(a) => {
            let opts = verify::VerifyOptions {
                bundle: a.bundle,
                require_signature: a.require_signature,
                key: a.key,
                threads: a.threads,
            };
            let r = verify::run(&opts, &*reporter)?;
            Ok(output(&r, r.render()))
        }
        Command::Inspect(a) => {
            let r = inspect::run(&a.bundle, &*reporter)?;
            Ok(output(&r, r.render()))
        }
        Command::Install(a) => {
            let opts = install::InstallOptions {
                bundle: a.bundle,
                target: a.target,
                config: a.config,
                dry_run: a.dry_run,
                require_signature: a.require_signature,
                key: a.key,
                timeout_secs: a.timeout,
                lock_wait: Some(std::time::Duration::from_secs(a.lock_wait)),
            };
            let rt = runtime()?;
            let r = rt.block_on(install::run(opts, reporter))?;
            let text = install::render(&r);
            Ok(output(&r, text))
        }
        Command::Regions(a) => {
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
            let open = bkbundle::bundle::OpenOptions {
                check: bkbundle::bundle::Check::Structure,
                ..Default::default()
            };
            let bundle = bkbundle::bundle::open_verified(&common.bundle, &open, &*reporter)?;
            let manifest = bundle.manifest();
            let (config, site) = site(common.config.as_deref(), |_| common.env_file.clone())?;
            let mut opts = regions::RegionsOptions::new(mode, &manifest.regions, &config, site);
            opts.database_url = database_url;
            let rt = runtime()?;
            let r = rt.block_on(regions::run(&opts))?;
            let text = regions::render(&r);
            Ok(output(&r, text))
        }
        Command::InitPackages(a) => {
            if !a.auto {
                return Err(
                    Error::input("init-packages needs --auto (upload every package found, without asking)")
                        .hint("bkbundle init-packages --auto --bundle BUNDLE   (or --dir DIR)"),
                );
            }
            let (config, site) = site(a.site.config.as_deref(), |_| a.site.env_file.clone())?;
            let mut opts = packages::PackagesOptions::new(Default::default(), &config, site);
            opts.bundle = a.bundle;
            opts.dir = a.dir;
            opts.overrides = packages::dir::Overrides {
                kind: a.kind.map(|k| match k {
                    cli::PackageTypeArg::Controller => bkbundle::manifest::PackageType::Controller,
                    cli::PackageTypeArg::Collector => bkbundle::manifest::PackageType::Collector,
                }),
                os: a.os.map(|o| match o {
                    cli::OsArg::Linux => bkbundle::manifest::Os::Linux,
                    cli::OsArg::Windows => bkbundle::manifest::Os::Windows,
                }),
                arch: a.arch,
                object: a.object,
                version: a.version,
            };
            opts.force = a.force;
            opts.dry_run = a.dry_run;
            opts.database_url = a.site.database_url;
            opts.nats_url = a.site.nats_url;
            opts.bucket = a.site.bucket;
            let rt = runtime()?;
            let r = rt.block_on(packages::run(&opts))?;
            let text = packages::render(&r);
            Ok(output(&r, text))
        }
        Command::Doctor(a) => {
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
            let project = match (&a.project, &target) {
                (Some(p), _) => Some(p.clone()),
                (None, Some(t)) => install::journal::Journal::load(t).ok().and_then(|j| j.project),
                (None, None) => None,
            };
            let opts = doctor::DoctorOptions {
                bundle: a.bundle,
                site,
                config,
                project,
                database_url: a.site.database_url,
                nats_url: a.site.nats_url,
                bucket: a.site.bucket,
                fix: a.fix,
            };
            let rt = runtime()?;
            let r = rt.block_on(doctor::run(&opts));
            let text = doctor::render(&r);
            let mut out = output(&r, text);
            if r.has_errors() {
                out.code = bkbundle::error::EXIT_FINDINGS;
            }
            Ok(out)
        }
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "bkbundle", &mut out);
            Ok(Output {
                json: serde_json::Value::Null,
                text: String::from_utf8_lossy(&out).trim_end().to_string(),
                code: 0,
            })
        }
    }
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
    let values = match env_file(&config) {
        Some(p) => envfile::parse(
            &std::fs::read_to_string(&p).map_err(|e| Error::io("cannot read the stack's env file", &p, e))?,
        ),
        None => Default::default(),
    };
    let site = regions::site_values(&values, &config.env);
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

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("cannot start the async runtime: {e}")))
}

/// Write to stdout; a closed pipe (`bkbundle inspect B | head`) is not an error.
fn write_stdout(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
}

fn emit(out: &Output, g: &cli::Global) {
    if g.json && !out.json.is_null() {
        write_stdout(&serde_json::to_string_pretty(&out.json).unwrap_or_default());
    } else if !g.quiet || out.json.is_null() {
        write_stdout(&out.text);
    }
}

fn report_error(e: &Error, g: &cli::Global) {
    // Messages may quote what a library said about a URL or a connection: never a secret.
    let message = bkbundle::logging::redact(&e.message);
    let hints: Vec<String> = e.hints.iter().map(|h| bkbundle::logging::redact(h)).collect();
    if g.json {
        let v = serde_json::json!({
            "error": { "kind": e.kind.name(), "message": message, "hints": hints, "exit_code": e.kind.exit_code() }
        });
        write_stdout(&serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "error: {message}");
    for h in &hints {
        let _ = writeln!(err, "hint: {h}");
    }
    if e.kind == Kind::Internal {
        let _ = writeln!(
            err,
            "hint: this is a bug in bkbundle; re-run with -v and report the output"
        );
    }
}
