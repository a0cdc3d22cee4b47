//! The agent's own files: where it is installed, what its `sidecar.yml` says (the server URL,
//! token, node id), how its collectors reach NATS (the configs the server sent into
//! `collector_configuration_directory`) and the CA they trust.
//!
//! Every file is read size-bounded, the generated dir at most [`MAX_GENERATED`] files deep
//! without following symlinks. A value is judged on the text the agent itself reads: the NATS
//! configs' `${VAR}` placeholders are expanded the way nats-executor expands them
//! (`renderEnvVars`: `${NAME}` and `$NAME`, an unset or empty variable left as it is), from the
//! unit's environment file (the environment the collectors run with: the operator's shell is
//! not theirs, so it is never consulted). The token and passwords are
//! never shown: evidence names the token's length and masks passwords as `***`.

use super::{add, read_bounded, AgentConfig, AgentNats, Host, ReadError, MAX_FILE, STEP};
use crate::doctor::{Finding, Severity};
use crate::tls;
use serde_yaml_ng::Value;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

const CHECK: &str = "agent-config";

/// The path of the node manager's agent API, which every `server_url` ends with.
pub(crate) const API_PATH: &str = "/api/v1/node_mgmt/open_api/node";

/// The units upstream's install.sh installs (`bk-sidecar.service`; `sidecar.service` before).
pub(crate) const UNITS: [&str; 2] = ["bk-sidecar.service", "sidecar.service"];

/// The most regular files of the generated dir that are looked at.
const MAX_GENERATED: usize = 256;
/// The most directory entries of the generated dir walked (files, dirs, links together).
const MAX_ENTRIES: usize = 4096;

/// A CA that ends within this many days is a warning.
const RENEW_DAYS: u64 = 30;

/// Read the agent's files under `install_dir` (or where its unit says it is). See the module
/// documentation.
pub(super) fn read(install_dir: &Path, host: &Host, out: &mut Vec<Finding>) -> AgentConfig {
    let mut cfg = AgentConfig {
        install_dir: install_dir.to_path_buf(),
        ..Default::default()
    };
    let Some(file) = locate(install_dir, host, out) else {
        return cfg;
    };
    if let Some(dir) = file.parent() {
        cfg.install_dir = dir.to_path_buf();
    }
    cfg.sidecar_file = Some(file.clone());
    let text = match read_bounded(&file, MAX_FILE) {
        Ok(t) => t,
        Err(e) => {
            add(
                out,
                CHECK,
                Severity::Error,
                file.display().to_string(),
                format!("the agent's config cannot be read: {e}"),
            )
            .evidence(format!("reading {}: {e}", file.display()))
            .fix("reinstall this agent from the node manager (its install.sh writes sidecar.yml)");
            return cfg;
        }
    };
    let doc = match parse_yaml(&file, &text, out) {
        Some(d) => d,
        None => return cfg,
    };
    let sc = Sidecar {
        file: &file,
        text: &text,
        doc: &doc,
    };
    cfg.server_url = server_url(&sc, out);
    token(&sc, out);
    node_id(&sc, &cfg.install_dir, out);
    cfg.tls_skip_verify = doc.get("tls_skip_verify").and_then(scalar).is_some_and(|v| truthy(&v));
    cfg.log_path = doc
        .get("log_path")
        .and_then(scalar)
        .filter(|v| !v.trim().is_empty())
        .map(|v| cfg.install_dir.join(v.trim()));
    let generated = doc
        .get("collector_configuration_directory")
        .and_then(scalar)
        .filter(|v| !v.trim().is_empty())
        .map(|v| cfg.install_dir.join(v.trim()))
        .unwrap_or_else(|| cfg.install_dir.join("generated"));
    cfg.nats = nats(&generated, host, out);
    cfg.ca_file = ca(&cfg.install_dir, cfg.nats.as_ref(), out);
    cfg
}

// ---------------------------------------------------------------------------------------------
// Finding the agent

/// The sidecar config to read: `DIR/sidecar.yml`, else the one a sidecar unit's `ExecStart`
/// runs the agent with (said as an info), else nothing (said as an error).
fn locate(dir: &Path, host: &Host, out: &mut Vec<Finding>) -> Option<PathBuf> {
    let direct = dir.join("sidecar.yml");
    if direct.is_file() {
        return Some(direct);
    }
    let mut looked = vec![format!("{}: {}", direct.display(), absent_or_not_file(&direct))];
    for unit_dir in &host.unit_dirs {
        for unit in UNITS {
            let path = unit_dir.join(unit);
            let text = match read_bounded(&path, MAX_FILE) {
                Ok(t) => t,
                Err(ReadError::Missing) => {
                    looked.push(format!("{}: absent", path.display()));
                    continue;
                }
                Err(e) => {
                    looked.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let Some((line, config)) = exec_start_config(&text) else {
                looked.push(format!("{}: no ExecStart naming a config", path.display()));
                continue;
            };
            if !config.is_file() {
                looked.push(format!(
                    "{}: {line} (its config {} is absent)",
                    path.display(),
                    config.display()
                ));
                continue;
            }
            let found = config.parent().unwrap_or(Path::new("/")).to_path_buf();
            add(
                out,
                CHECK,
                Severity::Info,
                format!("agent install dir {}", found.display()),
                format!(
                    "there is no sidecar.yml under {}; the unit {} runs the agent with {}: reading that",
                    dir.display(),
                    path.display(),
                    config.display()
                ),
            )
            .evidence(format!("{}: {line}", path.display()))
            .fix(format!(
                "bkbundle doctor --agent --install-dir {}   (to name it directly)",
                found.display()
            ));
            return Some(config);
        }
    }
    let f = add(
        out,
        CHECK,
        Severity::Error,
        format!("agent install dir {}", dir.display()),
        format!(
            "no agent is installed under {}: it has no sidecar.yml, and no {} unit names another",
            dir.display(),
            UNITS.join(" or ")
        ),
    );
    for l in looked {
        f.evidence(l);
    }
    f.fix(format!(
        "give the agent's directory with `bkbundle doctor --agent --install-dir DIR` (the one holding sidecar.yml), \
         or install the agent on this host from the node manager (default {})",
        super::DEFAULT_INSTALL_DIR
    ));
    None
}

fn absent_or_not_file(p: &Path) -> &'static str {
    match std::fs::metadata(p) {
        Ok(_) => "not a regular file",
        Err(_) => "absent",
    }
}

/// The `ExecStart=` line of a unit file and the config it passes (`-c PATH`, `--config PATH`,
/// `-c=PATH`); without one, `sidecar.yml` beside the program.
pub(crate) fn exec_start_config(unit: &str) -> Option<(String, PathBuf)> {
    let line = unit
        .lines()
        .map(str::trim)
        .rfind(|l| l.starts_with("ExecStart=") && l.len() > "ExecStart=".len())?;
    let cmd = &line["ExecStart=".len()..];
    // systemd's prefixes: `-` (failure ignored), `@`, `+`, `!`, `!!`, `:`.
    let cmd = cmd.trim_start_matches(['-', '@', '+', '!', ':']);
    let words: Vec<&str> = cmd.split_whitespace().map(|w| w.trim_matches(['"', '\''])).collect();
    let mut config = None;
    for (i, w) in words.iter().enumerate() {
        if let Some(v) = w.strip_prefix("-c=").or_else(|| w.strip_prefix("--config=")) {
            config = Some(v.to_string());
        } else if matches!(*w, "-c" | "--config" | "-config") {
            config = words.get(i + 1).map(|v| v.to_string());
        }
    }
    let config = match config {
        Some(c) => PathBuf::from(c),
        None => Path::new(words.first()?).parent()?.join("sidecar.yml"),
    };
    Some((line.to_string(), config))
}

// ---------------------------------------------------------------------------------------------
// sidecar.yml

/// The parsed sidecar config with its text, for evidence lines.
struct Sidecar<'a> {
    file: &'a Path,
    text: &'a str,
    doc: &'a Value,
}

impl Sidecar<'_> {
    /// `FILE:LINE: the line` of the top-level `key:`, for evidence.
    fn line(&self, key: &str) -> String {
        match line_of(self.text, key) {
            Some((n, l)) => format!("{}:{n}: {}", self.file.display(), mask_line(l)),
            None => format!("{}: no `{key}:` line", self.file.display()),
        }
    }
    fn value(&self, key: &str) -> Option<String> {
        self.doc.get(key).and_then(scalar)
    }
    fn subject(&self, key: &str) -> String {
        format!("sidecar.yml {key}")
    }
}

/// The YAML document, or an error naming the file and line.
fn parse_yaml(file: &Path, text: &str, out: &mut Vec<Finding>) -> Option<Value> {
    match serde_yaml_ng::from_str::<Value>(text) {
        Ok(v @ Value::Mapping(_)) => Some(v),
        Ok(_) => {
            add(
                out,
                CHECK,
                Severity::Error,
                file.display().to_string(),
                "the agent's config is not a YAML mapping of `key: value` lines",
            )
            .evidence(format!("{}: {} bytes", file.display(), text.len()))
            .fix("reinstall this agent from the node manager (its install.sh writes sidecar.yml)");
            None
        }
        Err(e) => {
            let line = e.location().map(|l| l.line());
            let f = add(
                out,
                CHECK,
                Severity::Error,
                file.display().to_string(),
                match line {
                    Some(n) => format!("the agent's config is not valid YAML at line {n}: {e}"),
                    None => format!("the agent's config is not valid YAML: {e}"),
                },
            );
            if let Some(l) = line.and_then(|n| text.lines().nth(n.saturating_sub(1)).map(|l| (n, l))) {
                f.evidence(format!("{}:{}: {}", file.display(), l.0, mask_line(l.1)));
            }
            f.fix(format!(
                "correct {}{} (YAML: `key: value`, strings in double quotes), then `systemctl restart bk-sidecar`; \
                 or reinstall this agent from the node manager",
                file.display(),
                line.map(|n| format!(" at line {n}")).unwrap_or_default()
            ));
            None
        }
    }
}

/// A scalar as text: strings as they are, numbers and booleans written out; null and
/// collections are no value.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "true" | "1" | "yes" | "on" | "t" | "y"
    )
}

/// The first line (1-based number, text) that sets `key` at the top level.
fn line_of<'t>(text: &'t str, key: &str) -> Option<(usize, &'t str)> {
    text.lines().enumerate().find_map(|(i, l)| {
        let rest = l.strip_prefix(key)?;
        rest.trim_start().starts_with(':').then_some((i + 1, l.trim_end()))
    })
}

/// A config line safe to show: a token's value replaced by its length, passwords in URLs by
/// `***`.
fn mask_line(line: &str) -> String {
    let trimmed = line.trim_start();
    if let Some(rest) = trimmed.strip_prefix("server_api_token") {
        if let Some(v) = rest.trim_start().strip_prefix(':') {
            let v = v.trim().trim_matches(['"', '\'']);
            if v.is_empty() || is_placeholder(v) {
                return line.to_string();
            }
            return format!("server_api_token: <{} characters, not shown>", v.chars().count());
        }
    }
    mask_url_password(line)
}

/// `scheme://user:******@...`: the password of every URL's user information hidden, as the
/// logs hide it.
pub(crate) fn mask_url_password(s: &str) -> String {
    crate::logging::mask_url_passwords(s)
}

/// install.sh's `__NAME__` placeholders, left when it never ran.
fn is_placeholder(v: &str) -> bool {
    let v = v.trim();
    v.len() > 4 && v.starts_with("__") && v.ends_with("__")
}

/// An http(s) URL, as much of it as the checks need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpUrl {
    pub scheme: String,
    /// Without the brackets of an IPv6 address.
    pub host: String,
    pub port: u16,
    /// The path, without query or fragment (`/` when there is none).
    pub path: String,
}

/// What is wrong with a `server_url` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UrlProblem {
    Missing,
    Empty,
    /// install.sh's `__SERVER__URL__` is still there.
    Placeholder,
    /// `null/api/...` (or `None/`, `undefined/`, or a bare `/api/...`): the region's
    /// NODE_SERVER_URL was missing when the agent was installed. The text before the path.
    NoServer(String),
    /// Not an absolute http(s) URL with a host: why.
    NotAbsolute(String),
}

/// Judge a `server_url` value: the URL, or what is wrong with it.
pub(crate) fn judge_server_url(raw: Option<&str>) -> Result<HttpUrl, UrlProblem> {
    let Some(raw) = raw else {
        return Err(UrlProblem::Missing);
    };
    let v = raw.trim();
    if v.is_empty() {
        return Err(UrlProblem::Empty);
    }
    if v.contains("__SERVER__URL__") {
        return Err(UrlProblem::Placeholder);
    }
    let head = v.split('/').next().unwrap_or("");
    if matches!(
        head.to_ascii_lowercase().as_str(),
        "" | "null" | "none" | "nil" | "undefined"
    ) {
        return Err(UrlProblem::NoServer(head.to_string()));
    }
    if v.contains("${") {
        return Err(UrlProblem::NotAbsolute("it holds an unexpanded ${...} variable".into()));
    }
    let Some((scheme, after)) = v.split_once("://") else {
        return Err(UrlProblem::NotAbsolute("it has no scheme (http:// or https://)".into()));
    };
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        s => {
            return Err(UrlProblem::NotAbsolute(format!(
                "its scheme {s:?} is not http or https"
            )))
        }
    };
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(end);
    if authority.contains('@') {
        return Err(UrlProblem::NotAbsolute(
            "it carries user information (user@): the agent authenticates with server_api_token".into(),
        ));
    }
    let (host, port) = split_host_port(authority).map_err(UrlProblem::NotAbsolute)?;
    if !valid_host(&host) {
        return Err(UrlProblem::NotAbsolute(if host.is_empty() {
            "it has no host".into()
        } else {
            format!("{host:?} is not a host name or IP address")
        }));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && !p.starts_with('+') => n,
            _ => {
                return Err(UrlProblem::NotAbsolute(format!(
                    "its port {p:?} is not a number from 1 to 65535"
                )))
            }
        },
    };
    let path = rest.split(['?', '#']).next().unwrap_or("");
    Ok(HttpUrl {
        scheme,
        host,
        port,
        path: if path.is_empty() { "/".into() } else { path.to_string() },
    })
}

/// `host[:port]`, IPv6 in brackets; the host without them.
fn split_host_port(hp: &str) -> Result<(String, Option<&str>), String> {
    if let Some(inner) = hp.strip_prefix('[') {
        let close = inner.find(']').ok_or("its IPv6 address lacks the closing `]`")?;
        let host = &inner[..close];
        let rest = &inner[close + 1..];
        return match rest.strip_prefix(':') {
            Some(p) => Ok((host.to_string(), Some(p))),
            None if rest.is_empty() => Ok((host.to_string(), None)),
            None => Err(format!("unexpected {rest:?} after the host")),
        };
    }
    match hp.rsplit_once(':') {
        Some((h, _)) if h.contains(':') => Err("an IPv6 address must be written in brackets, e.g. [fd00::5]".into()),
        Some((h, p)) => Ok((h.to_string(), Some(p))),
        None => Ok((hp.to_string(), None)),
    }
}

/// A host name (letters, digits, `-`, `_` labels), an IPv4 or an IPv6 address.
fn valid_host(h: &str) -> bool {
    if h.parse::<IpAddr>().is_ok() {
        return true;
    }
    if h.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        // All-numeric dotted text that is not an IPv4 address (10.0.0.256) is a typo.
        return false;
    }
    h.len() <= 253
        && h.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The fix for a server_url that names no usable server.
fn server_url_fix(file: &Path) -> String {
    format!(
        "on the platform host run `bkbundle regions check`, then `bkbundle regions apply` (the region's NODE_SERVER_URL), \
         and reinstall this agent from the node manager; or set `server_url: \"http://SERVER:PORT{API_PATH}\"` \
         (https:// where the server is served over TLS) in {} and run `systemctl restart bk-sidecar`",
        file.display()
    )
}

/// The `server_url` findings; the URL when the agent can use it.
fn server_url(sc: &Sidecar<'_>, out: &mut Vec<Finding>) -> Option<String> {
    let raw = sc.value("server_url");
    let subject = sc.subject("server_url");
    let evidence = sc.line("server_url");
    let url = match judge_server_url(raw.as_deref()) {
        Ok(u) => u,
        Err(problem) => {
            let shown = raw.as_deref().map(mask_url_password).unwrap_or_default();
            let message = match problem {
                UrlProblem::Missing => "sidecar.yml has no server_url: the agent does not know where the server is".to_string(),
                UrlProblem::Empty => "server_url is empty: the agent does not know where the server is".to_string(),
                UrlProblem::Placeholder => format!(
                    "server_url is still install.sh's placeholder {shown:?}: the installer never filled it in (it did not run, \
                     or failed before writing the config), so the agent does not know where the server is"
                ),
                UrlProblem::NoServer(head) => format!(
                    "server_url is {shown:?}, not http(s)://SERVER{API_PATH}: the region's NODE_SERVER_URL was {} \
                     when this agent was installed, so the agent restart-loops with \"Server-url is not valid\"",
                    if head.is_empty() { "empty".to_string() } else { format!("missing (the installer wrote {head:?} in its place)") }
                ),
                UrlProblem::NotAbsolute(why) => format!(
                    "server_url {shown:?} is not an absolute http(s) URL with a host ({why}): expected http(s)://SERVER{API_PATH}"
                ),
            };
            add(out, CHECK, Severity::Error, subject, message)
                .evidence(evidence)
                .fix(server_url_fix(sc.file));
            return None;
        }
    };
    let raw = raw.unwrap_or_default().trim().to_string();
    if crate::platform::rules::is_loopback_host(&url.host) {
        match local_listener(&url.host, url.port) {
            Ok(addr) => {
                add(
                    out,
                    CHECK,
                    Severity::Info,
                    subject.clone(),
                    format!(
                        "server_url's host {} is a loopback address and {addr} accepts connections: the server is on this host",
                        url.host
                    ),
                )
                .evidence(evidence.clone())
                .fix("none needed while the server runs on this host; agents on other hosts need its address instead");
            }
            Err(why) => {
                add(
                    out,
                    CHECK,
                    Severity::Error,
                    subject,
                    format!(
                        "server_url's host {} is a loopback address, and nothing on this host accepts TCP on port {}: \
                         the agent connects to itself, not to the server",
                        url.host, url.port
                    ),
                )
                .evidence(evidence)
                .evidence(why)
                .fix(format!(
                    "on the platform host give the region the address its agents reach the server at (`bkbundle regions check`, \
                     `bkbundle regions apply`) and reinstall this agent; or set server_url in {} to \
                     \"http://SERVER:PORT{API_PATH}\" and `systemctl restart bk-sidecar`",
                    sc.file.display()
                ));
                return None;
            }
        }
    }
    if url.path.trim_end_matches('/') != API_PATH {
        add(
            out,
            CHECK,
            Severity::Warning,
            subject,
            format!(
                "server_url's path is {:?}, not {API_PATH:?}: unless a proxy maps it there, the agent's requests reach no \
                 API (404) and it never registers",
                url.path
            ),
        )
        .evidence(evidence)
        .fix(format!(
            "set server_url in {} to \"{}://{}{API_PATH}\" and run `systemctl restart bk-sidecar`",
            sc.file.display(),
            url.scheme,
            host_port_for_url(&url)
        ));
    }
    Some(raw)
}

fn host_port_for_url(u: &HttpUrl) -> String {
    let host = if u.host.contains(':') {
        format!("[{}]", u.host)
    } else {
        u.host.clone()
    };
    format!("{host}:{}", u.port)
}

/// Something on this host accepting TCP at a loopback `host`'s `port`: the address that
/// answered, or why none did. `localhost` is tried as 127.0.0.1 and ::1 without asking a
/// resolver; the unspecified addresses as their loopback.
fn local_listener(host: &str, port: u16) -> Result<SocketAddr, String> {
    let h = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let ips: Vec<IpAddr> = match h.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) if a.is_unspecified() => vec![Ipv4Addr::LOCALHOST.into()],
        Ok(IpAddr::V6(a)) if a.is_unspecified() => vec![Ipv6Addr::LOCALHOST.into()],
        Ok(IpAddr::V6(a)) => vec![a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(a))],
        Ok(a) => vec![a],
        Err(_) => vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
    };
    let mut why = Vec::new();
    for ip in ips {
        let addr = SocketAddr::new(ip, port);
        match TcpStream::connect_timeout(&addr, STEP) {
            Ok(_) => return Ok(addr),
            Err(e) => why.push(format!("connect {addr}: {e}")),
        }
    }
    Err(why.join("; "))
}

fn token(sc: &Sidecar<'_>, out: &mut Vec<Finding>) {
    let value = sc.value("server_api_token");
    let problem = match value.as_deref().map(str::trim) {
        None => "sidecar.yml has no server_api_token: the server refuses the agent's requests (401)",
        Some("") => "server_api_token is empty: the server refuses the agent's requests (401)",
        Some(v) if is_placeholder(v) => {
            "server_api_token is still install.sh's placeholder: the installer never filled it in, and the server \
             refuses the agent's requests (401)"
        }
        Some(_) => return,
    };
    add(out, CHECK, Severity::Error, sc.subject("server_api_token"), problem)
        .evidence(sc.line("server_api_token"))
        .fix(
            "reinstall this agent from the platform's node manager (the install writes the token it issues into \
             sidecar.yml), then check that `systemctl status bk-sidecar` is active",
        );
}

fn node_id(sc: &Sidecar<'_>, dir: &Path, out: &mut Vec<Finding>) {
    let subject = sc.subject("node_id");
    let value = sc.value("node_id").map(|v| v.trim().to_string()).unwrap_or_default();
    if value.is_empty() {
        add(
            out,
            CHECK,
            Severity::Error,
            subject,
            "sidecar.yml has no node_id: the agent cannot identify itself to the server",
        )
        .evidence(sc.line("node_id"))
        .fix(format!(
            "add `node_id: \"file:{}\"` to {} and run `systemctl restart bk-sidecar` (the sidecar writes its id there), \
             or reinstall this agent",
            dir.join("node-id").display(),
            sc.file.display()
        ));
        return;
    }
    let Some(path) = value.strip_prefix("file:") else {
        return;
    };
    let path = dir.join(path.trim());
    let state = match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.len() > 0 => return,
        Ok(m) if m.is_file() => "is empty",
        Ok(_) => "is not a regular file",
        Err(_) => "does not exist",
    };
    add(
        out,
        CHECK,
        Severity::Warning,
        subject,
        format!(
            "the node id file {} {state}: the sidecar writes it at its first start; still missing after a start means \
             it cannot write there",
            path.display()
        ),
    )
    .evidence(sc.line("node_id"))
    .evidence(format!("{}: {state}", path.display()))
    .fix(format!(
        "systemctl restart bk-sidecar; if {} is still missing or empty, make its directory writable for root \
         (`touch {}` shows why not: a read-only mount, full disk, permissions)",
        path.display(),
        path.display()
    ));
}

// ---------------------------------------------------------------------------------------------
// NATS, from the generated collector configs

/// The environment the collectors inherit: `KEY=VALUE` lines of the unit's environment file
/// (`export ` and matching quotes allowed, `#` comments skipped).
pub(crate) fn parse_environment(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
                return None;
            }
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = [('"', '"'), ('\'', '\'')]
                .iter()
                .find_map(|(a, b)| v.strip_prefix(*a).and_then(|x| x.strip_suffix(*b)))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

/// `s` with its `${NAME}` and `$NAME` expanded as nats-executor's `renderEnvVars` does (a
/// variable unset or empty stays as written), and the `${NAME}` forms that stayed. A bare
/// `$NAME` that stays is not reported: it may be a literal `$` in a password, and the executor
/// keeps it the same way.
pub(crate) fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> (String, Vec<String>) {
    let mut out = String::with_capacity(s.len());
    let mut unresolved = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, braced, len) = match after.strip_prefix('{') {
            Some(inner) => match inner.find('}') {
                Some(close) if is_var_name(&inner[..close]) => (&inner[..close], true, close + 2),
                _ => ("", true, 0),
            },
            None => {
                let n = after
                    .char_indices()
                    .find(|&(j, c)| !(c == '_' || c.is_ascii_alphabetic() || (j > 0 && c.is_ascii_digit())))
                    .map(|(j, _)| j)
                    .unwrap_or(after.len());
                (&after[..n], false, n)
            }
        };
        if name.is_empty() {
            out.push('$');
            rest = after;
            continue;
        }
        let written = &rest[i..i + 1 + len];
        match lookup(name).filter(|v| !v.is_empty()) {
            Some(v) => out.push_str(&v),
            None => {
                out.push_str(written);
                if braced && !unresolved.iter().any(|u| u == name) {
                    unresolved.push(name.to_string());
                }
            }
        }
        rest = &rest[i + 1 + len..];
    }
    out.push_str(rest);
    (out, unresolved)
}

fn is_var_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next().is_some_and(|f| f == '_' || f.is_ascii_alphabetic()) && c.all(|x| x == '_' || x.is_ascii_alphanumeric())
}

/// `nats_urls` as nats-executor connects: servers without credentials, the user and password
/// (percent-decoded), whether the scheme is `tls`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct NatsUrls {
    pub urls: Vec<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls_scheme: bool,
}

impl std::fmt::Debug for NatsUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        write!(
            f,
            "NatsUrls({:?}, user {:?}, tls {})",
            self.urls, self.user, self.tls_scheme
        )
    }
}

/// Parse an expanded `nats_urls`: `SCHEME://[USER[:PASS]@]HOST:PORT[,HOST:PORT...]` (later
/// entries may carry their own `SCHEME://`; a missing port is NATS's 4222).
pub(crate) fn parse_nats_urls(v: &str) -> Result<NatsUrls, String> {
    let v = v.trim();
    if v.is_empty() {
        return Err("it is empty".into());
    }
    let Some((scheme, after)) = v.split_once("://") else {
        return Err("it has no scheme (nats:// or tls://)".into());
    };
    let scheme = scheme.to_ascii_lowercase();
    if !matches!(scheme.as_str(), "nats" | "tls") {
        return Err(format!("its scheme {scheme:?} is not nats or tls"));
    }
    let (userinfo, hosts) = match after.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, after),
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (user, pass) = match u.split_once(':') {
                Some((a, b)) => (a, Some(b)),
                None => (u, None),
            };
            let user = crate::site::percent_decode(user).map_err(|e| format!("its user name: {e}"))?;
            let pass = pass
                .map(crate::site::percent_decode)
                .transpose()
                .map_err(|e| format!("its password: {e}"))?;
            (Some(user), pass)
        }
    };
    let mut urls = Vec::new();
    let mut tls_scheme = scheme == "tls";
    for (i, entry) in hosts.split(',').enumerate() {
        let n = i + 1;
        let e = entry.trim();
        let (s, hp) = match e.split_once("://") {
            Some((s, hp)) => (s.to_ascii_lowercase(), hp),
            None => (scheme.clone(), e),
        };
        if !matches!(s.as_str(), "nats" | "tls") {
            return Err(format!("server {n} {e:?}: the scheme {s:?} is not nats or tls"));
        }
        tls_scheme |= s == "tls";
        let hp = hp.trim_end_matches('/');
        if hp.is_empty() {
            return Err(format!("server {n} is empty"));
        }
        if hp.contains(['/', '@', '?', '#', ' ']) {
            return Err(format!("server {n} {:?} is not HOST:PORT", mask_url_password(e)));
        }
        let (host, port) = split_host_port(hp).map_err(|m| format!("server {n} {e:?}: {m}"))?;
        if !valid_host(&host) {
            return Err(format!("server {n}: {host:?} is not a host name or IP address"));
        }
        let port = match port {
            None => 4222,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("server {n} {e:?}: the port {p:?} is not a number from 1 to 65535"))?,
        };
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        urls.push(format!("{s}://{host}:{port}"));
    }
    Ok(NatsUrls {
        urls,
        user,
        password,
        tls_scheme,
    })
}

/// The regular files of the generated dir (and its direct subdirectories), in name order,
/// bounded; symlinks are not followed. `None` when the dir cannot be read.
fn generated_files(dir: &Path) -> Option<(Vec<PathBuf>, usize)> {
    let mut files = Vec::new();
    let mut skipped = 0;
    let mut entries = 0;
    let mut dirs = vec![(dir.to_path_buf(), 0)];
    let mut first = true;
    while let Some((d, depth)) = dirs.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(_) if !first => continue,
            Err(_) => return None,
        };
        first = false;
        let mut names: Vec<_> = rd.flatten().take(MAX_ENTRIES - entries.min(MAX_ENTRIES)).collect();
        entries += names.len();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() && depth == 0 {
                dirs.push((e.path(), depth + 1));
            } else if t.is_file() {
                if files.len() >= MAX_GENERATED {
                    skipped += 1;
                } else {
                    files.push(e.path());
                }
            }
        }
    }
    files.sort();
    Some((files, skipped))
}

/// NATS as the agent's collectors connect: the first generated config (in name order) with
/// `nats_urls`.
fn nats(generated: &Path, host: &Host, out: &mut Vec<Finding>) -> Option<AgentNats> {
    let env_text = read_bounded(&host.environment_file, MAX_FILE).unwrap_or_default();
    let env_vars = parse_environment(&env_text);
    let lookup = |k: &str| {
        env_vars
            .iter()
            .rev()
            .find(|(n, v)| n == k && !v.is_empty())
            .map(|(_, v)| v.clone())
    };
    let Some((files, skipped)) = generated_files(generated) else {
        not_registered(
            generated,
            format!("{}: does not exist or cannot be read", generated.display()),
            out,
        );
        return None;
    };
    let mut looked = 0;
    for file in &files {
        looked += 1;
        let Ok(text) = read_bounded(file, MAX_FILE) else {
            continue;
        };
        if line_of(&text, "nats_urls").is_none() {
            continue;
        }
        return nats_file(file, &text, &lookup, &host.environment_file, out);
    }
    not_registered(
        generated,
        format!(
            "{}: {looked} file(s) looked at{}, none sets nats_urls",
            generated.display(),
            if skipped > 0 {
                format!(" ({skipped} more left unread)")
            } else {
                String::new()
            }
        ),
        out,
    );
    None
}

fn not_registered(generated: &Path, evidence: String, out: &mut Vec<Finding>) {
    add(
        out,
        CHECK,
        Severity::Info,
        format!("NATS config {}", generated.display()),
        "the server has not sent this agent's configurations yet (it never registered): NATS is checked once it has",
    )
    .evidence(evidence)
    .fix("none for NATS yet: make the agent register (the sidecar.yml, service and server findings), then run doctor --agent again");
}

/// One generated config with `nats_urls`: its NATS settings, or the error that stops them.
fn nats_file(
    file: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    env_file: &Path,
    out: &mut Vec<Finding>,
) -> Option<AgentNats> {
    let subject = format!("NATS config {}", file.display());
    let line = |key: &str| match line_of(text, key) {
        Some((n, l)) => format!("{}:{n}: {}", file.display(), mask_line(l)),
        None => format!("{}: no `{key}:` line", file.display()),
    };
    let fix_resend =
        "have the server send the agent's configurations again: on the platform host `bkbundle regions check` \
                      (the region's NATS_* rows), then restart the agent (`systemctl restart bk-sidecar`)";
    let doc: Value = match serde_yaml_ng::from_str(text) {
        Ok(d) => d,
        Err(e) => {
            let n = e.location().map(|l| l.line());
            let f = add(
                out,
                CHECK,
                Severity::Error,
                subject,
                format!(
                    "this collector config sets nats_urls but is not valid YAML{}: {e}",
                    n.map(|n| format!(" at line {n}")).unwrap_or_default()
                ),
            );
            if let Some((n, l)) = n.and_then(|n| text.lines().nth(n.saturating_sub(1)).map(|l| (n, l))) {
                f.evidence(format!("{}:{n}: {}", file.display(), mask_line(l)));
            }
            f.fix(fix_resend);
            return None;
        }
    };
    let get = |k: &str| doc.get(k).and_then(scalar).unwrap_or_default();
    let mut unresolved: Vec<(&str, String)> = Vec::new();
    let mut expanded = |k: &'static str| {
        let (v, missing) = expand(&get(k), lookup);
        unresolved.extend(missing.into_iter().map(|m| (k, m)));
        v
    };
    let urls = expanded("nats_urls");
    let tls_enabled = expanded("tls_enabled");
    let ca_file = expanded("tls_ca_file");
    let skip_verify = expanded("tls_skip_verify");
    if !unresolved.is_empty() {
        let names: Vec<String> = unresolved.iter().map(|(_, v)| format!("${{{v}}}")).collect();
        let f = add(
            out,
            CHECK,
            Severity::Error,
            subject,
            format!(
                "{} not set in {}: nats-executor connects with the placeholder text instead",
                names.join(", "),
                env_file.display()
            ),
        );
        let mut keys: Vec<&str> = unresolved.iter().map(|(k, _)| *k).collect();
        keys.dedup();
        for k in keys {
            f.evidence(line(k));
        }
        f.fix(format!(
            "add the missing variable(s) as `NAME=value` lines to {} and run `systemctl restart bk-sidecar`; or have \
             the server render them (on the platform host `bkbundle regions check` for the region's NATS_* rows)",
            env_file.display()
        ));
        return None;
    }
    let parsed = match parse_nats_urls(&urls) {
        Ok(p) => p,
        Err(why) => {
            add(
                out,
                CHECK,
                Severity::Error,
                subject,
                format!("nats_urls is not SCHEME://USER:PASSWORD@HOST:PORT[,HOST:PORT] (nats or tls): {why}"),
            )
            .evidence(line("nats_urls"))
            .fix(fix_resend);
            return None;
        }
    };
    let tls = parsed.tls_scheme || truthy(&tls_enabled);
    let ca_file = Some(ca_file.trim()).filter(|c| !c.is_empty()).map(PathBuf::from);
    add(
        out,
        CHECK,
        Severity::Info,
        subject,
        format!(
            "the agent connects to NATS at {} as {}{}",
            parsed.urls.join(","),
            parsed
                .user
                .as_deref()
                .map(|u| format!("user {u:?}"))
                .unwrap_or_else(|| "no user".into()),
            match (&ca_file, tls) {
                (_, false) => ", in plain text".to_string(),
                (Some(c), true) => format!(", over TLS verified with {}", c.display()),
                (None, true) => ", over TLS".to_string(),
            }
        ),
    )
    .evidence(line("nats_urls"))
    .fix(if truthy(&skip_verify) {
        "none needed (its tls_skip_verify is true: the NATS certificate is not verified)"
    } else {
        "none needed"
    });
    Some(AgentNats {
        source: file.to_path_buf(),
        urls: parsed.urls,
        user: parsed.user,
        password: parsed.password,
        tls,
        ca_file,
    })
}

// ---------------------------------------------------------------------------------------------
// The CA

/// The CA file the agent uses: NATS's `tls_ca_file`, else `DIR/certs/ca.crt` when present;
/// judged when present (a certificate, within its validity), an error when TLS needs it and it
/// is missing. `None` when there is no file.
fn ca(dir: &Path, nats: Option<&AgentNats>, out: &mut Vec<Finding>) -> Option<PathBuf> {
    let shipped = dir.join("certs").join("ca.crt");
    let named = nats.and_then(|n| n.ca_file.clone());
    let tls = nats.is_some_and(|n| n.tls);
    let path = match named {
        Some(p) => dir.join(p),
        None if shipped.is_file() => shipped.clone(),
        None if tls => {
            let n = nats.map(|n| n.source.display().to_string()).unwrap_or_default();
            add(
                out,
                CHECK,
                Severity::Error,
                format!("CA file {}", shipped.display()),
                format!(
                    "the agent connects to NATS over TLS, but its NATS config names no tls_ca_file and {} is missing: \
                     it cannot verify the NATS certificate",
                    shipped.display()
                ),
            )
            .evidence(format!("{n}: no tls_ca_file"))
            .evidence(format!("{}: absent", shipped.display()))
            .fix(
                "reinstall this agent from a controller package that carries the site CA (on the platform host \
                 `bkbundle init-packages --auto` uploads it with certs/ca.crt)",
            );
            return None;
        }
        None => return None,
    };
    let subject = format!("CA file {}", path.display());
    let text = match read_bounded(&path, MAX_FILE) {
        Ok(t) => t,
        Err(e) => {
            if tls {
                add(
                    out,
                    CHECK,
                    Severity::Error,
                    subject,
                    format!(
                        "the agent verifies NATS with {}, which cannot be read: {e}",
                        path.display()
                    ),
                )
                .evidence(format!("{}: {e}", path.display()))
                .fix(format!(
                    "copy the site CA (the platform host's certs/ca.crt) to {} and run `systemctl restart bk-sidecar`; \
                     or reinstall this agent from a controller package that carries it",
                    path.display()
                ));
            }
            return None;
        }
    };
    let fix_replace = format!(
        "copy the site CA (the platform host's certs/ca.crt under the install target) to {} and run \
         `systemctl restart bk-sidecar`",
        path.display()
    );
    let info = match tls::inspect(&text) {
        Ok(i) => i,
        Err(why) => {
            // Only a PEM header line is shown: the file may hold anything, a key or a secret.
            let first = text.lines().next().unwrap_or("").trim();
            let header = if first.starts_with("-----") {
                format!("first line {first:?}")
            } else {
                "no PEM header".into()
            };
            add(
                out,
                CHECK,
                Severity::Error,
                subject,
                format!("the CA file the agent trusts is not a certificate: {why}"),
            )
            .evidence(format!("{}: {} bytes, {header}", path.display(), text.len()))
            .fix(fix_replace);
            return Some(path);
        }
    };
    let now = SystemTime::now();
    let (start, end) = (tls::date(info.not_before), tls::date(info.not_after));
    let evidence = format!(
        "{}: CN {:?}, valid {start} to {end}, SHA-256 {}",
        path.display(),
        info.subject_cn,
        info.sha256_fingerprint
    );
    let soon = now.checked_add(Duration::from_secs(RENEW_DAYS * 86_400));
    let verdict = if info.not_after <= now {
        Some((
            Severity::Error,
            format!("the CA expired on {end}: the agent refuses every certificate it signed"),
        ))
    } else if info.not_before > now {
        Some((
            Severity::Error,
            format!("the CA is valid only from {start}: this host's clock is behind, or the CA is not yet usable"),
        ))
    } else if soon.is_none_or(|s| info.not_after <= s) {
        Some((
            Severity::Warning,
            format!("the CA expires on {end}, within {RENEW_DAYS} days"),
        ))
    } else {
        None
    };
    if let Some((severity, message)) = verdict {
        add(out, CHECK, severity, subject, message).evidence(evidence).fix(if info.not_before > now {
            "set this host's clock (`date`; chronyd or ntpd against the site's time server), then `systemctl restart bk-sidecar`"
                .to_string()
        } else {
            format!(
                "renew the site CA on the platform host (bkbundle install re-issues it), then {}",
                fix_replace.replace("copy the site CA", "copy it")
            )
        });
    }
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{by_subject, host, render_template, write};
    use super::*;

    #[test]
    fn server_urls_are_judged() {
        let ok = judge_server_url(Some("http://10.0.0.5:8011/api/v1/node_mgmt/open_api/node")).unwrap();
        assert_eq!(
            (ok.scheme.as_str(), ok.host.as_str(), ok.port, ok.path.as_str()),
            ("http", "10.0.0.5", 8011, API_PATH)
        );
        assert_eq!(
            judge_server_url(Some("https://bk.example/api/v1/node_mgmt/open_api/node"))
                .unwrap()
                .port,
            443
        );
        assert_eq!(judge_server_url(Some("http://[fd00::5]/x")).unwrap().host, "fd00::5");
        assert_eq!(judge_server_url(None), Err(UrlProblem::Missing));
        assert_eq!(judge_server_url(Some("  ")), Err(UrlProblem::Empty));
        assert_eq!(judge_server_url(Some("__SERVER__URL__")), Err(UrlProblem::Placeholder));
        assert_eq!(
            judge_server_url(Some("null/api/v1/node_mgmt/open_api/node")),
            Err(UrlProblem::NoServer("null".into()))
        );
        assert_eq!(
            judge_server_url(Some("/api/v1/node_mgmt/open_api/node")),
            Err(UrlProblem::NoServer("".into()))
        );
        for bad in [
            "10.0.0.5/api",
            "ftp://h/api",
            "http:///api",
            "http://h:0/",
            "http://h:99999/",
            "http://u:p@h/",
            "http://10.0.0.256/",
            "http://fd00::5/",
            "${NODE_SERVER_URL}/api",
        ] {
            assert!(
                matches!(judge_server_url(Some(bad)), Err(UrlProblem::NotAbsolute(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn exec_start_names_the_config() {
        let unit = "[Service]\nExecStart=/data/agent/collector-sidecar -c /data/agent/sidecar.yml\n";
        let (line, cfg) = exec_start_config(unit).unwrap();
        assert_eq!(cfg, PathBuf::from("/data/agent/sidecar.yml"));
        assert!(line.starts_with("ExecStart=/data"));
        assert_eq!(
            exec_start_config("ExecStart=-/x/sidecar --config=/y/s.yml").unwrap().1,
            PathBuf::from("/y/s.yml")
        );
        assert_eq!(
            exec_start_config("ExecStart=/x/collector-sidecar").unwrap().1,
            PathBuf::from("/x/sidecar.yml")
        );
        assert_eq!(exec_start_config("[Unit]\nDescription=x\n"), None);
    }

    #[test]
    fn variables_expand_as_nats_executor_does() {
        let env = |k: &str| match k {
            "A" => Some("1".to_string()),
            "E" => Some(String::new()),
            _ => None,
        };
        assert_eq!(expand("x${A}y$A-z", &env), ("x1y1-z".into(), vec![]));
        assert_eq!(
            expand("${B}:${E}:$C:${node.id}:$", &env),
            ("${B}:${E}:$C:${node.id}:$".into(), vec!["B".into(), "E".into()])
        );
    }

    #[test]
    fn nats_urls_parse() {
        let p = parse_nats_urls("tls://admin:p%40ss%3Aw@10.0.0.5:4222,10.0.0.6:4223").unwrap();
        assert_eq!(p.urls, vec!["tls://10.0.0.5:4222", "tls://10.0.0.6:4223"]);
        assert_eq!(p.user.as_deref(), Some("admin"));
        assert_eq!(p.password.as_deref(), Some("p@ss:w"));
        assert!(p.tls_scheme);
        let p = parse_nats_urls("nats://h").unwrap();
        assert_eq!(
            (p.urls, p.user, p.tls_scheme),
            (vec!["nats://h:4222".to_string()], None, false)
        );
        assert_eq!(
            parse_nats_urls("nats://[fd00::1]:4222").unwrap().urls,
            vec!["nats://[fd00::1]:4222"]
        );
        for bad in [
            "",
            "h:4222",
            "http://h:1",
            "nats://u:p%zz@h:1",
            "nats://u:p@",
            "nats://h:x",
            "nats://h:1,,h:2",
        ] {
            assert!(parse_nats_urls(bad).is_err(), "{bad}");
        }
        // The error never shows the password.
        let e = parse_nats_urls("nats://u:secret@h/x").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn environment_files_parse() {
        let vars = parse_environment("# c\nA=1\nexport B=\"two words\"\nC='3'\n\nbad line\n");
        assert_eq!(
            vars,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "3".into())
            ]
        );
    }

    #[test]
    fn passwords_and_tokens_are_masked() {
        assert_eq!(
            mask_url_password("nats_urls: \"tls://u:secret@h:1\""),
            "nats_urls: \"tls://u:******@h:1\""
        );
        assert_eq!(mask_url_password("http://h/a@b"), "http://h/a@b");
        assert_eq!(
            mask_line("server_api_token: \"abcdef\""),
            "server_api_token: <6 characters, not shown>"
        );
        assert_eq!(
            mask_line("server_api_token: \"__SERVER__API__TOKEN__\""),
            "server_api_token: \"__SERVER__API__TOKEN__\""
        );
    }

    /// The upstream template as install.sh renders it for `url`, under `dir`.
    fn installed(dir: &Path, url: &str) -> Host {
        let h = host(dir);
        write(&dir.join("sidecar.yml"), &render_template(dir, url, "tok-0123456789"));
        write(&dir.join("node-id"), "1f0e");
        h
    }

    #[test]
    fn a_rendered_template_reads_clean() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("opt");
        let h = installed(&dir, "http://10.0.0.5:8011/api/v1/node_mgmt/open_api/node");
        let mut out = Vec::new();
        let cfg = read(&dir, &h, &mut out);
        assert_eq!(
            cfg.server_url.as_deref(),
            Some("http://10.0.0.5:8011/api/v1/node_mgmt/open_api/node")
        );
        assert!(cfg.tls_skip_verify);
        assert_eq!(cfg.log_path, Some(dir.join("log")));
        assert_eq!(cfg.sidecar_file, Some(dir.join("sidecar.yml")));
        assert!(cfg.nats.is_none());
        // Only the info that the server has not sent configs yet.
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].severity, Severity::Info);
        assert!(out[0].subject.starts_with("NATS config "), "{out:#?}");
        assert!(out[0].message.contains("never registered"));
    }

    #[test]
    fn the_fields_null_server_url_is_named_with_its_fix() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let h = installed(&dir, "null/api/v1/node_mgmt/open_api/node");
        let mut out = Vec::new();
        let cfg = read(&dir, &h, &mut out);
        assert_eq!(cfg.server_url, None);
        let f = by_subject(&out, "sidecar.yml server_url");
        assert_eq!((f.check, f.severity), (CHECK, Severity::Error));
        assert!(f.message.contains("NODE_SERVER_URL was missing"), "{}", f.message);
        assert!(
            f.message.contains("\"null/api/v1/node_mgmt/open_api/node\""),
            "{}",
            f.message
        );
        assert_eq!(
            f.evidence,
            vec![format!(
                "{}:1: server_url: \"null/api/v1/node_mgmt/open_api/node\"",
                dir.join("sidecar.yml").display()
            )]
        );
        let fix = f.fix.as_deref().unwrap();
        assert!(
            fix.contains("bkbundle regions check") && fix.contains("systemctl restart bk-sidecar"),
            "{fix}"
        );
    }

    #[test]
    fn an_unrendered_template_names_the_placeholders() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let h = host(&dir);
        let template = "server_url: \"__SERVER__URL__\"\nserver_api_token: \"__SERVER__API__TOKEN__\"\n\
                        node_id: \"file:/nonexistent/node-id\"\ncollector_configuration_directory: \"/nonexistent/generated\"\n";
        write(&dir.join("sidecar.yml"), template);
        let mut out = Vec::new();
        read(&dir, &h, &mut out);
        let f = by_subject(&out, "sidecar.yml server_url");
        assert_eq!(f.severity, Severity::Error);
        assert!(f.message.contains("placeholder \"__SERVER__URL__\""), "{}", f.message);
        let f = by_subject(&out, "sidecar.yml server_api_token");
        assert_eq!(f.severity, Severity::Error);
        assert!(
            f.evidence[0].ends_with("server_api_token: \"__SERVER__API__TOKEN__\""),
            "{:?}",
            f.evidence
        );
        let f = by_subject(&out, "sidecar.yml node_id");
        assert_eq!(f.severity, Severity::Warning);
        assert!(
            f.message.contains("/nonexistent/node-id does not exist"),
            "{}",
            f.message
        );
    }

    #[test]
    fn missing_token_and_node_id_are_errors_and_the_token_is_never_shown() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let h = host(&dir);
        write(
            &dir.join("sidecar.yml"),
            "server_url: \"http://h/api/v1/node_mgmt/open_api/node\"\nserver_api_token: \"\"\n",
        );
        let mut out = Vec::new();
        read(&dir, &h, &mut out);
        assert!(by_subject(&out, "sidecar.yml server_api_token")
            .message
            .contains("empty"));
        assert_eq!(by_subject(&out, "sidecar.yml node_id").severity, Severity::Error);

        write(
            &dir.join("sidecar.yml"),
            "server_url: \"http://h/other\"\nserver_api_token: \"s3cr3t-t0ken\"\nnode_id: x\n",
        );
        let mut out = Vec::new();
        read(&dir, &h, &mut out);
        let f = by_subject(&out, "sidecar.yml server_url");
        assert_eq!(f.severity, Severity::Warning, "a path other than the API's");
        assert!(f
            .fix
            .as_deref()
            .unwrap()
            .contains("http://h:80/api/v1/node_mgmt/open_api/node"));
        let all = format!("{out:?}");
        assert!(!all.contains("s3cr3t"), "{all}");
    }

    #[test]
    fn a_yaml_error_names_the_file_and_line() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let h = host(&dir);
        write(
            &dir.join("sidecar.yml"),
            "server_url: \"http://h\"\nnode_id: [unclosed\nx: 1\n",
        );
        let mut out = Vec::new();
        let cfg = read(&dir, &h, &mut out);
        assert!(cfg.server_url.is_none());
        let f = by_subject(&out, &dir.join("sidecar.yml").display().to_string());
        assert_eq!(f.severity, Severity::Error);
        assert!(f.message.contains("line "), "{}", f.message);
        assert!(f.evidence[0].contains("sidecar.yml:"), "{:?}", f.evidence);
    }

    #[test]
    fn a_loopback_server_is_an_error_unless_it_answers_here() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let h = installed(&dir, &format!("http://127.0.0.1:{port}{API_PATH}"));
        let mut out = Vec::new();
        let cfg = read(&dir, &h, &mut out);
        assert!(cfg.server_url.is_some());
        let f = by_subject(&out, "sidecar.yml server_url");
        assert_eq!(f.severity, Severity::Info);
        assert!(f.message.contains("the server is on this host"));
        drop(listener);
        let mut out = Vec::new();
        let cfg = read(&dir, &h, &mut out);
        assert!(cfg.server_url.is_none());
        let f = by_subject(&out, "sidecar.yml server_url");
        assert_eq!(f.severity, Severity::Error);
        assert!(
            f.message
                .contains(&format!("nothing on this host accepts TCP on port {port}")),
            "{}",
            f.message
        );
        assert!(
            f.evidence[1].contains(&format!("connect 127.0.0.1:{port}")),
            "{:?}",
            f.evidence
        );
    }

    #[test]
    fn the_agent_is_found_through_its_unit_or_named_missing() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("data/agent");
        let h = installed(&real, "http://10.0.0.5/api/v1/node_mgmt/open_api/node");
        let units = &h.unit_dirs[0];
        write(
            &units.join("bk-sidecar.service"),
            &format!(
                "[Service]\nExecStart={0}/collector-sidecar -c {0}/sidecar.yml\n",
                real.display()
            ),
        );
        let given = t.path().join("opt/fusion-collectors");
        let mut out = Vec::new();
        let cfg = read(&given, &h, &mut out);
        assert_eq!(cfg.install_dir, real);
        assert!(cfg.server_url.is_some());
        let f = by_subject(&out, &format!("agent install dir {}", real.display()));
        assert_eq!(f.severity, Severity::Info);
        assert!(f.evidence[0].contains("ExecStart="));

        std::fs::remove_file(units.join("bk-sidecar.service")).unwrap();
        let mut out = Vec::new();
        let cfg = read(&given, &h, &mut out);
        assert!(cfg.sidecar_file.is_none());
        assert_eq!(out.len(), 1);
        let f = by_subject(&out, &format!("agent install dir {}", given.display()));
        assert_eq!(f.severity, Severity::Error);
        assert!(f
            .message
            .starts_with(&format!("no agent is installed under {}", given.display())));
        assert!(
            f.evidence.iter().any(|e| e.contains("bk-sidecar.service: absent")),
            "{:?}",
            f.evidence
        );
        assert!(f.fix.as_deref().unwrap().contains("--install-dir"));
    }

    /// nats-executor's config as the server renders its template (NATS-Executor.json) with TLS,
    /// the credentials left as `${VAR}` for the executor's environment.
    fn nats_executor_yaml(ca: &Path) -> String {
        format!(
            "nats_urls: \"tls://${{NATS_ADMIN_USERNAME}}:${{NATS_ADMIN_PASSWORD}}@${{NATS_SERVERS}}\"\n\
             nats_instanceId: \"${{node.id}}\"\nnats_conn_timeout: 600\n\n\ntls_enabled: \"true\"\n\
             tls_skip_verify: \"false\"\ntls_ca_file: \"{}\"\n",
            ca.display()
        )
    }

    #[test]
    fn nats_settings_come_from_the_generated_config_and_its_environment() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("opt");
        let h = installed(&dir, "http://10.0.0.5/api/v1/node_mgmt/open_api/node");
        let ca = dir.join("certs/ca.crt");
        let site = crate::tls::generate_ca(crate::tls::CA_CN, SystemTime::now() - Duration::from_secs(60)).unwrap();
        write(&ca, &site.cert_pem);
        write(&dir.join("generated/telegraf.conf"), "[agent]\n");
        write(&dir.join("generated/nats-executor.yaml"), &nats_executor_yaml(&ca));
        write(
            &h.environment_file,
            "NATS_ADMIN_USERNAME=admin\nNATS_ADMIN_PASSWORD=\"p%40ss\"\nNATS_SERVERS=nats.site:4222,10.0.0.6:4222\n",
        );
        let mut out = Vec::new();
        let cfg = read(&dir, &h, &mut out);
        let n = cfg.nats.expect("NATS settings");
        assert_eq!(n.urls, vec!["tls://nats.site:4222", "tls://10.0.0.6:4222"]);
        assert_eq!(
            (n.user.as_deref(), n.password.as_deref(), n.tls),
            (Some("admin"), Some("p@ss"), true)
        );
        assert_eq!(n.ca_file.as_deref(), Some(ca.as_path()));
        assert_eq!(cfg.ca_file.as_deref(), Some(ca.as_path()));
        let f = by_subject(
            &out,
            &format!("NATS config {}", dir.join("generated/nats-executor.yaml").display()),
        );
        assert_eq!(f.severity, Severity::Info);
        assert!(f.message.contains("over TLS verified with"), "{}", f.message);
        assert!(!format!("{out:?}").contains("p@ss") && !format!("{out:?}").contains("p%40ss"));
        assert!(out.iter().all(|f| f.severity == Severity::Info), "{out:#?}");
    }

    #[test]
    fn an_unresolved_variable_names_itself_and_the_environment_file() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("opt");
        let h = installed(&dir, "http://10.0.0.5/api/v1/node_mgmt/open_api/node");
        write(
            &dir.join("generated/nats-executor.yaml"),
            &nats_executor_yaml(&dir.join("certs/ca.crt")),
        );
        write(
            &h.environment_file,
            "NATS_ADMIN_USERNAME=admin\nNATS_SERVERS=nats.site:4222\n",
        );
        let mut out = Vec::new();
        let cfg = read(&dir, &h, &mut out);
        assert!(cfg.nats.is_none());
        let f = by_subject(
            &out,
            &format!("NATS config {}", dir.join("generated/nats-executor.yaml").display()),
        );
        assert_eq!(f.severity, Severity::Error);
        assert!(
            f.message.starts_with("${NATS_ADMIN_PASSWORD} not set in"),
            "{}",
            f.message
        );
        assert!(f.message.contains(&h.environment_file.display().to_string()));
        assert!(
            f.evidence[0].contains("nats_urls: \"tls://${NATS_ADMIN_USERNAME}:******@"),
            "{:?}",
            f.evidence
        );
    }

    #[test]
    fn a_malformed_nats_url_is_an_error_with_its_file() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("opt");
        let h = installed(&dir, "http://10.0.0.5/api/v1/node_mgmt/open_api/node");
        write(&dir.join("generated/a.yaml"), "nats_urls: \"https://u:pw@h:1\"\n");
        let mut out = Vec::new();
        read(&dir, &h, &mut out);
        let f = by_subject(&out, &format!("NATS config {}", dir.join("generated/a.yaml").display()));
        assert_eq!(f.severity, Severity::Error);
        assert!(f.message.contains("scheme \"https\""), "{}", f.message);
        assert!(f.evidence[0].contains("u:******@h:1"));
    }

    #[test]
    fn the_ca_is_judged() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("opt");
        let h = installed(&dir, "http://10.0.0.5/api/v1/node_mgmt/open_api/node");
        let ca = dir.join("certs/ca.crt");
        let gen = dir.join("generated/nats-executor.yaml");
        write(&gen, "nats_urls: \"tls://u:p@h:4222\"\n");
        let ca_finding = |out: &[Finding]| by_subject(out, &format!("CA file {}", ca.display())).clone();

        // TLS, no tls_ca_file and no certs/ca.crt.
        let mut out = Vec::new();
        let cfg = read(&dir, &h, &mut out);
        assert!(cfg.ca_file.is_none());
        assert!(ca_finding(&out).message.contains("names no tls_ca_file"));

        // Not a certificate.
        write(&ca, "hello\n");
        let mut out = Vec::new();
        assert_eq!(read(&dir, &h, &mut out).ca_file, Some(ca.clone()));
        let f = ca_finding(&out);
        assert_eq!(f.severity, Severity::Error);
        assert!(f.message.contains("is not a certificate"), "{}", f.message);
        assert!(f.evidence[0].ends_with("6 bytes, no PEM header"), "{:?}", f.evidence);

        // Expired (made 11 years ago; the site CA is valid 10), and expiring.
        let old = crate::tls::generate_ca(
            crate::tls::CA_CN,
            SystemTime::now() - Duration::from_secs(11 * 365 * 86_400),
        )
        .unwrap();
        write(&ca, &old.cert_pem);
        let mut out = Vec::new();
        read(&dir, &h, &mut out);
        let f = ca_finding(&out);
        assert_eq!(f.severity, Severity::Error, "{f:?}");
        assert!(f.message.contains("expired"), "{}", f.message);
        let info = crate::tls::inspect(&old.cert_pem).unwrap();
        let life = info.not_after.duration_since(info.not_before).unwrap();
        let nearly = crate::tls::generate_ca(
            crate::tls::CA_CN,
            SystemTime::now() - life + Duration::from_secs(10 * 86_400),
        )
        .unwrap();
        write(&ca, &nearly.cert_pem);
        let mut out = Vec::new();
        read(&dir, &h, &mut out);
        let f = ca_finding(&out);
        assert_eq!(f.severity, Severity::Warning, "{f:?}");
        assert!(f.message.contains("within 30 days"));

        // A named tls_ca_file that is missing.
        write(
            &gen,
            "nats_urls: \"nats://u:p@h:4222\"\ntls_enabled: \"true\"\ntls_ca_file: \"/nonexistent/ca.pem\"\n",
        );
        let mut out = Vec::new();
        let cfg = read(&dir, &h, &mut out);
        assert!(cfg.ca_file.is_none());
        let f = by_subject(&out, "CA file /nonexistent/ca.pem");
        assert_eq!(f.severity, Severity::Error);
        assert!(f.message.contains("cannot be read: it does not exist"), "{}", f.message);
    }

    #[test]
    fn the_generated_dir_is_bounded_and_does_not_follow_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let gen = t.path().join("generated");
        let outside = t.path().join("outside.yaml");
        write(&outside, "nats_urls: \"nats://h:1\"\n");
        std::fs::create_dir_all(&gen).unwrap();
        std::os::unix::fs::symlink(&outside, gen.join("link.yaml")).unwrap();
        for i in 0..(MAX_GENERATED + 3) {
            write(&gen.join(format!("f{i:04}")), "x: 1\n");
        }
        let (files, skipped) = generated_files(&gen).unwrap();
        assert_eq!((files.len(), skipped), (MAX_GENERATED, 3));
        assert!(!files.iter().any(|f| f.ends_with("link.yaml")));
    }
}
