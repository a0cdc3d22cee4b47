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
use std::path::PathBuf;
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
        write!(f, "AgentNats({} from {}, user {:?}, tls {})", self.urls.join(","), self.source.display(), self.user, self.tls)
    }
}

/// Diagnose this agent host. See the module documentation.
pub fn run(opts: &AgentOptions, reporter: &dyn crate::progress::Reporter) -> crate::Result<DoctorReport> {
    crate::runtime::block_on(diagnose(opts, reporter))?
}

async fn diagnose(opts: &AgentOptions, reporter: &dyn crate::progress::Reporter) -> crate::Result<DoctorReport> {
    let t0 = Instant::now();
    let mut findings: Vec<Finding> = Vec::new();
    let install_dir = opts
        .install_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_INSTALL_DIR));
    reporter.note(&format!("doctor --agent: reading the agent under {}", install_dir.display()));
    let cfg = config::read(&install_dir, &mut findings);
    reporter.note("doctor --agent: the sidecar service");
    service::check(&cfg, &mut findings).await;
    if let Some(url) = cfg.server_url.clone() {
        reporter.note(&format!("doctor --agent: reaching the server {url}"));
        net::server_chain(&cfg, &url, &mut findings).await;
    }
    if let Some(n) = cfg.nats.clone() {
        reporter.note("doctor --agent: reaching NATS as the agent does");
        nats::chain(&cfg, &n, &mut findings).await;
    }
    host::check(&cfg, &mut findings);
    let _ = Severity::Info;
    Ok(super::report(findings, None, t0))
}
