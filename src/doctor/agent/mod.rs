//! `bkbundle doctor --agent`: on a Linux agent host, read-only and with no configuration, why
//! this node never appeared (DESIGN.md, field reports 1 and 5; issue 13). It finds the installed
//! agent (`/opt/fusion-collectors` unless `--install-dir`), reads its own files, and runs one
//! chain per link, each stopping at its first broken link with the evidence:
//!
//! - **config** (`config.rs`): `sidecar.yml`'s `server_url` a valid absolute URL (never
//!   `null/...`, never empty, not loopback unless the server is on this host), node id and token
//!   present, the CA file the agent's configs name present and a certificate; and the NATS
//!   settings the agent's generated collector configs hold (servers, credentials, TLS CA);
//! - **service** (`service.rs`): the systemd unit's state, sub-state, restart count and last exit
//!   status (`systemctl show`), the last journal lines matching a known cause
//!   ([`crate::platform::causes`]); a host without systemd is reported, not an error;
//! - **server** (`net.rs`, `dns.rs`): the URL's host resolved (what `/etc/hosts` says, which
//!   nameserver of `/etc/resolv.conf` answered what), TCP with a bounded timeout, an HTTP request
//!   to the agent's endpoint (any HTTP answer proves the path), TLS verified where the URL is
//!   https, the clock against the server's `Date` (the installer refuses more than 300 s);
//! - **nats** (`nats.rs`): resolution → TCP → TLS → authentication → JetStream as this agent
//!   connects, through [`crate::platform::nats`] (the platform-side doctor's own stages);
//! - **host** (`host.rs`): free space and inodes under the install dir, memory, the collectors'
//!   binaries present and executable.
//!
//! Every network step is bounded (a clean host in about a second, one with every link broken
//! in seconds). The report is doctor's ([`super::DoctorReport`]): `--json`, exit 10 while an
//! error remains.

mod config;
mod dns;
mod host;
mod nats;
mod net;
mod service;

use super::{DoctorReport, Finding, Severity};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where upstream's Linux installer puts the agent.
pub const DEFAULT_INSTALL_DIR: &str = "/opt/fusion-collectors";

/// The longest any one network step (a DNS query, a TCP connect, a request) may take.
pub(crate) const STEP: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// The agent's install dir (default [`DEFAULT_INSTALL_DIR`]).
    pub install_dir: Option<PathBuf>,
}

/// What the agent's own files say, as far as they could be read ([`config::read`]); the
/// later chains run on what is there.
#[derive(Debug, Clone, Default)]
pub struct AgentConfig {
    pub install_dir: PathBuf,
    /// `sidecar.yml`'s `server_url`, when it is a usable absolute http(s) URL.
    pub server_url: Option<String>,
    /// `sidecar.yml`'s `tls_skip_verify` (upstream's template says `true`).
    pub tls_skip_verify: bool,
    /// The CA file the agent's configs name (NATS `tls_ca_file`, else `certs/ca.crt` of the
    /// install dir when present).
    pub ca_file: Option<PathBuf>,
    /// NATS as the agent's generated collector configs have it.
    pub nats: Option<AgentNats>,
    /// The sidecar config that was read (`sidecar.yml` of the install dir, or the file the unit's
    /// `ExecStart=... -c PATH` names); `None` when no agent was found.
    pub sidecar_file: Option<PathBuf>,
    /// `sidecar.yml`'s `log_path`: the directory of the sidecar's own log files.
    pub log_path: Option<PathBuf>,
}

/// NATS as one of the agent's collectors connects (nats-executor's `nats_urls` and TLS keys).
#[derive(Clone, Default)]
pub struct AgentNats {
    /// The generated config file it came from.
    pub source: PathBuf,
    /// Server URLs (`tls://HOST:PORT`, `nats://...`), credentials stripped.
    pub urls: Vec<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for AgentNats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        write!(
            f,
            "AgentNats({} from {}, user {:?}, tls {})",
            self.urls.join(","),
            self.source.display(),
            self.user,
            self.tls
        )
    }
}

/// What the chains read of this machine beyond the install dir, in one place: the real paths
/// and programs in [`Host::real`], a tempdir and canned command outputs in the tests (which so
/// never depend on the test machine's systemd).
pub(crate) struct Host {
    /// Where unit files are looked for, in systemd's order of precedence.
    pub unit_dirs: Vec<PathBuf>,
    /// The sidecar unit's `EnvironmentFile`, the environment its collectors inherit (their
    /// `${VAR}` placeholders are expanded from it).
    pub environment_file: PathBuf,
    /// `/proc/meminfo`.
    pub meminfo: PathBuf,
    /// Runs `systemctl` and `journalctl`.
    pub commands: Box<dyn Commands>,
}

impl Host {
    pub fn real() -> Host {
        Host {
            unit_dirs: [
                "/etc/systemd/system",
                "/run/systemd/system",
                "/usr/lib/systemd/system",
                "/lib/systemd/system",
            ]
            .iter()
            .map(PathBuf::from)
            .collect(),
            environment_file: PathBuf::from("/etc/fusion-collectors/environment"),
            meminfo: PathBuf::from("/proc/meminfo"),
            commands: Box::new(System),
        }
    }
}

/// What running a command came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ran {
    /// It ran to its end (`code` None: killed by a signal).
    Exited {
        code: Option<i32>,
        stdout: String,
        stderr: String,
    },
    /// The program is not on this host.
    NotFound,
    /// It did not finish within [`STEP`] and was killed.
    TimedOut,
    /// It could not be started for another reason.
    Failed(String),
}

/// The programs the service check runs, behind a seam so tests give recorded outputs.
#[async_trait::async_trait]
pub(crate) trait Commands: Send + Sync {
    async fn run(&self, argv: &[&str]) -> Ran;
}

/// The host's own programs, each bounded by [`STEP`]: killed when it takes longer. (std's
/// process with a deadline, not tokio's: tokio's `process` feature would add a crate to the
/// lock file for two short commands.)
struct System;

/// The most of a command's stdout or stderr kept; the rest is read and dropped.
const OUTPUT_LIMIT: u64 = 1 << 20;

#[async_trait::async_trait]
impl Commands for System {
    async fn run(&self, argv: &[&str]) -> Ran {
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || run_bounded(&argv, STEP))
            .await
            .unwrap_or_else(|e| Ran::Failed(format!("the command's thread failed: {e}")))
    }
}

fn run_bounded(argv: &[String], limit: Duration) -> Ran {
    use std::process::{Command, Stdio};
    let Some((program, args)) = argv.split_first() else {
        return Ran::Failed("no command".into());
    };
    let spawned = Command::new(program)
        .args(args)
        // English messages (the no-systemd check matches them), and no pager.
        .env("LC_ALL", "C")
        .env("SYSTEMD_PAGER", "")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ran::NotFound,
        Err(e) => return Ran::Failed(format!("cannot run {program}: {e}")),
    };
    // Both pipes drained on their own threads, so a full pipe never stalls the child.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            if let Some(mut p) = pipe {
                let _ = (&mut p).take(OUTPUT_LIMIT).read_to_end(&mut kept);
                let _ = std::io::copy(&mut p, &mut std::io::sink());
            }
            String::from_utf8_lossy(&kept).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Ran::Failed(format!("waiting for {program}: {e}"));
            }
        }
    };
    let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    match status {
        Some(s) => Ran::Exited {
            code: s.code(),
            stdout,
            stderr,
        },
        None => Ran::TimedOut,
    }
}

/// Why a file could not be read as text.
#[derive(Debug)]
pub(crate) enum ReadError {
    Missing,
    /// Larger than the limit: its size.
    TooLarge(u64),
    Io(std::io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Missing => write!(f, "it does not exist"),
            ReadError::TooLarge(n) => write!(f, "it is {n} bytes, more than the {MAX_FILE} a config can be"),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// The most of any one config file that is read.
pub(crate) const MAX_FILE: u64 = 1 << 20;

/// A file as text, refused when larger than `limit` (invalid UTF-8 replaced: the files are
/// only searched and shown).
pub(crate) fn read_bounded(path: &Path, limit: u64) -> Result<String, ReadError> {
    let f = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ReadError::Missing,
        _ => ReadError::Io(e),
    })?;
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).map_err(ReadError::Io)?;
    if buf.len() as u64 > limit {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(buf.len() as u64);
        return Err(ReadError::TooLarge(size));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Push a finding and return it for its evidence and fix.
fn add<'a>(
    out: &'a mut Vec<Finding>,
    check: &'static str,
    severity: Severity,
    subject: impl Into<String>,
    message: impl Into<String>,
) -> &'a mut Finding {
    out.push(Finding::new(check, severity, subject, message));
    // Just pushed: the vector is not empty.
    out.last_mut().expect("a finding was just pushed")
}

/// Diagnose this agent host. See the module documentation.
pub fn run(opts: &AgentOptions, reporter: &dyn crate::progress::Reporter) -> crate::Result<DoctorReport> {
    crate::runtime::block_on(diagnose(opts, &Host::real(), reporter))
}

async fn diagnose(opts: &AgentOptions, host: &Host, reporter: &dyn crate::progress::Reporter) -> DoctorReport {
    let t0 = Instant::now();
    let mut findings: Vec<Finding> = Vec::new();
    let install_dir = opts
        .install_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_INSTALL_DIR));
    reporter.note(&format!(
        "doctor --agent: reading the agent under {}",
        install_dir.display()
    ));
    let cfg = config::read(&install_dir, host, &mut findings);
    reporter.note("doctor --agent: the sidecar service");
    service::check(&cfg, host, &mut findings).await;
    if let Some(url) = cfg.server_url.clone() {
        reporter.note(&format!("doctor --agent: reaching the server {url}"));
        net::server_chain(&cfg, &url, &mut findings).await;
    }
    if let Some(n) = cfg.nats.clone() {
        reporter.note("doctor --agent: reaching NATS as the agent does");
        nats::chain(&cfg, &n, &mut findings).await;
    }
    host::check(&cfg, host, &mut findings);
    super::report(findings, None, t0)
}

#[cfg(test)]
pub(crate) mod testing {
    //! A host made of a tempdir and canned command outputs, for the chains' unit tests.
    use super::{Commands, Finding, Host, Ran};
    use std::path::Path;

    /// Write `text` to `path`, creating its directories.
    pub fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A host whose unit dirs, environment file and meminfo live under `dir/.host`, with no
    /// systemd (every command [`Ran::NotFound`]).
    pub fn host(dir: &Path) -> Host {
        let root = dir.join(".host");
        Host {
            unit_dirs: vec![root.join("etc/systemd/system"), root.join("usr/lib/systemd/system")],
            environment_file: root.join("etc/fusion-collectors/environment"),
            meminfo: root.join("proc/meminfo"),
            commands: Box::new(FakeCommands::default()),
        }
    }

    /// Recorded output of a command that succeeded.
    pub fn recorded(stdout: &str) -> Ran {
        Ran::Exited {
            code: Some(0),
            stdout: stdout.to_string(),
            stderr: String::new(),
        }
    }

    /// Answers by the longest registered prefix of the command line; [`Ran::NotFound`] for any
    /// other.
    #[derive(Default)]
    pub struct FakeCommands(Vec<(String, Ran)>);

    impl FakeCommands {
        pub fn with(mut self, prefix: &str, ran: Ran) -> Self {
            self.0.push((prefix.to_string(), ran));
            self
        }
    }

    #[async_trait::async_trait]
    impl Commands for FakeCommands {
        async fn run(&self, argv: &[&str]) -> Ran {
            let line = argv.join(" ");
            self.0
                .iter()
                .filter(|(p, _)| line.starts_with(p.as_str()))
                .max_by_key(|(p, _)| p.len())
                .map(|(_, r)| r.clone())
                .unwrap_or(Ran::NotFound)
        }
    }

    /// Upstream's `agents/fusion-collector/misc/linux/sidecar.yml`, with its install dir moved
    /// to `dir` and its placeholders replaced as install.sh replaces them.
    pub fn render_template(dir: &Path, server_url: &str, token: &str) -> String {
        template()
            .replace("/opt/fusion-collectors", &dir.display().to_string())
            .replace("__SERVER__URL__", server_url)
            .replace("__SERVER__API__TOKEN__", token)
            .replace("__TAGS__", "\"zone:1\", \"group:1\"")
            .replace("__NODE__NAME__", "web-01")
    }

    /// Upstream's template, verbatim: the copy the live tests use, its header comment left out.
    pub fn template() -> String {
        include_str!("../../../tests/agent/sidecar.yml")
            .lines()
            .skip_while(|l| l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// The finding about `subject` (panics listing them all when there is none).
    pub fn by_subject<'a>(out: &'a [Finding], subject: &str) -> &'a Finding {
        out.iter()
            .find(|f| f.subject == subject)
            .unwrap_or_else(|| panic!("no finding about {subject:?} in {out:#?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{host, render_template, write};
    use super::*;

    #[test]
    fn commands_are_bounded() {
        let ok = run_bounded(
            &["sh".into(), "-c".into(), "echo out; echo err >&2; exit 3".into()],
            STEP,
        );
        assert_eq!(
            ok,
            Ran::Exited {
                code: Some(3),
                stdout: "out\n".into(),
                stderr: "err\n".into()
            }
        );
        let t0 = Instant::now();
        assert_eq!(
            run_bounded(&["sleep".into(), "30".into()], Duration::from_millis(200)),
            Ran::TimedOut
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(run_bounded(&["/nonexistent/systemctl".into()], STEP), Ran::NotFound);
    }

    #[test]
    fn files_are_read_bounded() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        write(&p, "12345");
        assert_eq!(read_bounded(&p, 5).unwrap(), "12345");
        assert!(matches!(read_bounded(&p, 4), Err(ReadError::TooLarge(5))));
        assert!(matches!(read_bounded(&t.path().join("g"), 4), Err(ReadError::Missing)));
    }

    /// The field's host end to end: the `null` URL, its journal, no systemd for the rest.
    #[tokio::test]
    async fn the_fields_agent_is_diagnosed_with_exit_10() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("opt");
        let h = host(t.path());
        write(&h.meminfo, "MemAvailable:  4000000 kB\n");
        write(
            &dir.join("sidecar.yml"),
            &render_template(&dir, "null/api/v1/node_mgmt/open_api/node", "T0KEN-4f1c"),
        );
        write(&dir.join("collector-sidecar"), "");
        std::fs::set_permissions(
            dir.join("collector-sidecar"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let opts = AgentOptions {
            install_dir: Some(dir.clone()),
        };
        let r = diagnose(&opts, &h, &crate::progress::Silent).await;
        assert!(r.has_errors());
        assert_eq!(r.errors, 1, "{:#?}", r.findings);
        assert_eq!(r.findings[0].subject, "sidecar.yml server_url");
        // No secret anywhere in the report.
        assert!(!serde_json::to_string(&r).unwrap().contains("T0KEN"));
    }
}
