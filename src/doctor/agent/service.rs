//! The sidecar service: its systemd unit's state (`systemctl show`), and the lines of its
//! journal and of the agent's own log files that name a known cause
//! ([`crate::platform::causes::agent_match`]).
//!
//! A host without systemd (a container, an init-less chroot) is said as an info: the log files
//! are still read there. Each command is bounded by [`STEP`](super::STEP) through
//! [`Commands`](super::Commands); the log files are read from their last 64 KiB only.

use super::config::{mask_url_password, UNITS};
use super::{add, AgentConfig, Host, Ran};
use crate::doctor::{Finding, Severity};
use crate::platform::causes;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

const CHECK: &str = "agent-service";

const PROPERTIES: &str =
    "--property=LoadState,ActiveState,SubState,NRestarts,ExecMainStatus,ExecMainCode,Result,ExecMainStartTimestamp,FragmentPath";

/// More restarts than this is a restart loop, whatever the unit's state now.
const MAX_RESTARTS: u64 = 3;
/// The most of each log file read, from its end.
const LOG_TAIL: u64 = 64 * 1024;
/// The most log files read (the newest).
const MAX_LOG_FILES: usize = 8;
/// The most directory entries of the log dir looked at.
const MAX_LOG_ENTRIES: usize = 1024;

/// What `systemctl show` says of a unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UnitState {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    /// systemd before 235 (CentOS 7's 219) has no `NRestarts`.
    pub n_restarts: Option<u64>,
    /// The main process's exit status or the signal that killed it (see `exec_main_code`).
    pub exec_main_status: Option<i32>,
    /// `CLD_*`: 1 exited, 2 killed, 3 dumped core; 0 while it runs.
    pub exec_main_code: Option<i32>,
    pub result: String,
    pub started: String,
    pub fragment_path: String,
}

/// `systemctl show`'s `Key=Value` lines (unknown keys and other lines ignored).
pub(crate) fn parse_show(text: &str) -> UnitState {
    let mut s = UnitState::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = v.trim().to_string();
        match k.trim() {
            "LoadState" => s.load_state = v,
            "ActiveState" => s.active_state = v,
            "SubState" => s.sub_state = v,
            "NRestarts" => s.n_restarts = v.parse().ok(),
            "ExecMainStatus" => s.exec_main_status = v.parse().ok(),
            "ExecMainCode" => s.exec_main_code = v.parse().ok(),
            "Result" => s.result = v,
            "ExecMainStartTimestamp" => s.started = v,
            "FragmentPath" => s.fragment_path = v,
            _ => {}
        }
    }
    s
}

impl UnitState {
    /// One line of the state for evidence.
    fn summary(&self) -> String {
        let mut s = format!(
            "LoadState={} ActiveState={} SubState={} Result={}",
            self.load_state, self.active_state, self.sub_state, self.result
        );
        if let Some(n) = self.n_restarts {
            s.push_str(&format!(" NRestarts={n}"));
        }
        if let Some(c) = self.exec_main_code {
            s.push_str(&format!(" ExecMainCode={c}"));
        }
        if let Some(st) = self.exec_main_status {
            s.push_str(&format!(" ExecMainStatus={st}"));
        }
        if !self.started.is_empty() {
            s.push_str(&format!(" ExecMainStartTimestamp={}", self.started));
        }
        s
    }

    /// How its main process last ended, in words.
    fn last_exit(&self) -> String {
        match (self.exec_main_code, self.exec_main_status) {
            (Some(2) | Some(3), Some(sig)) => format!("last killed by signal {sig}"),
            (_, Some(st)) => format!("last exit status {st}"),
            _ => "last exit status unknown".into(),
        }
    }
}

/// What is wrong with a unit that is loaded: (message, fix), or `None` when it runs.
pub(crate) fn judge(unit: &str, s: &UnitState) -> Option<(Severity, String, String)> {
    let restarts = s.n_restarts.unwrap_or(0);
    let restart = format!("systemctl restart {unit}");
    let cause = "fix the cause its journal names (`journalctl -u UNIT -n 50`)".replace("UNIT", unit);
    match (s.load_state.as_str(), s.active_state.as_str(), s.sub_state.as_str()) {
        ("masked", ..) => Some((
            Severity::Error,
            format!("{unit} is masked: systemd never starts the agent"),
            format!("systemctl unmask {unit} && systemctl enable --now {unit}"),
        )),
        (l, ..) if l != "loaded" => Some((
            Severity::Error,
            format!("{unit}'s unit file cannot be loaded (LoadState={l})"),
            format!("systemctl status {unit} names the error in its unit file; correct it, then `systemctl daemon-reload && {restart}`"),
        )),
        (_, _, "auto-restart") => Some((
            Severity::Error,
            format!(
                "{unit} is restart-looping: it has restarted {restarts} times, {} (Result={})",
                s.last_exit(),
                s.result
            ),
            format!("{cause}, then `{restart}`"),
        )),
        (_, "failed", _) => Some((
            Severity::Error,
            format!("{unit} has failed: {} (Result={}), after {restarts} restarts", s.last_exit(), s.result),
            format!("{cause}, then `{restart}`"),
        )),
        (_, "inactive", _) => Some((
            Severity::Error,
            format!("{unit} is not running (inactive/{}): the agent is stopped", s.sub_state),
            format!("systemctl enable --now {unit}"),
        )),
        // Running now: the restarts are history (a server that was down for a while), worth a
        // look but not the reason this node is missing.
        (_, "active", _) if restarts > MAX_RESTARTS => Some((
            Severity::Warning,
            format!(
                "{unit} runs now but has restarted {restarts} times since it was started, {}: it keeps failing",
                s.last_exit()
            ),
            format!("{cause}, then `{restart}`"),
        )),
        (_, "active", _) => None,
        (_, a, sub) => Some((
            Severity::Warning,
            format!("{unit} is {a}/{sub}, not active/running"),
            format!("systemctl status {unit}; if it stays so, {cause} and `{restart}`"),
        )),
    }
}

/// What asking systemd came to.
enum Systemd {
    /// No systemd on this host: the evidence.
    Absent(String),
    /// systemctl could not be asked (timed out, failed): said already.
    Unknown,
    /// The unit systemd knows (the first of [`UNITS`] not `not-found`), and its state.
    Unit(String, UnitState),
    /// Neither unit is known: each one's `systemctl show` line.
    NotFound(Vec<String>),
}

/// `systemctl show UNIT`.
async fn show(host: &Host, unit: &str, out: &mut Vec<Finding>) -> Result<UnitState, Systemd> {
    let ran = host.commands.run(&["systemctl", "show", unit, PROPERTIES]).await;
    let subject = format!("unit {unit}");
    match ran {
        Ran::NotFound => Err(Systemd::Absent("systemctl: not found on this host".into())),
        Ran::Exited { code, stdout, stderr } => {
            let text = format!("{stdout}\n{stderr}");
            if let Some(l) = text.lines().find(|l| no_systemd(l)) {
                return Err(Systemd::Absent(format!("systemctl show {unit}: {}", l.trim())));
            }
            if code == Some(0) && stdout.contains("LoadState=") {
                return Ok(parse_show(&stdout));
            }
            let f = add(
                out,
                CHECK,
                Severity::Warning,
                subject,
                format!(
                    "`systemctl show {unit}` failed (exit {}): the service was not checked",
                    exit(code)
                ),
            );
            for l in text.lines().filter(|l| !l.trim().is_empty()).take(3) {
                f.evidence(l.trim().to_string());
            }
            f.fix(format!("systemctl status {unit}"));
            Err(Systemd::Unknown)
        }
        Ran::TimedOut => {
            add(
                out,
                CHECK,
                Severity::Warning,
                subject,
                format!(
                    "`systemctl show {unit}` did not answer within {} s: the service was not checked",
                    super::STEP.as_secs()
                ),
            )
            .evidence("systemctl show: killed after the time limit")
            .fix(format!(
                "systemctl status {unit}   (systemd itself may be hung: `systemctl list-jobs`)"
            ));
            Err(Systemd::Unknown)
        }
        Ran::Failed(why) => {
            add(
                out,
                CHECK,
                Severity::Warning,
                subject,
                "systemctl could not be run: the service was not checked",
            )
            .evidence(why)
            .fix(format!("systemctl status {unit}"));
            Err(Systemd::Unknown)
        }
    }
}

/// A journal or log line as evidence: trimmed, and a password in a URL it logs hidden.
fn shown(line: &str) -> String {
    mask_url_password(line.trim())
}

fn exit(code: Option<i32>) -> String {
    code.map(|c| c.to_string()).unwrap_or_else(|| "by a signal".into())
}

/// systemctl's words for "there is no systemd to ask".
fn no_systemd(line: &str) -> bool {
    line.contains("System has not been booted with systemd")
        || line.contains("Failed to connect to bus")
        || line.contains("systemd as init system (PID 1)")
}

async fn systemd(host: &Host, out: &mut Vec<Finding>) -> Systemd {
    let mut lines = Vec::new();
    for unit in UNITS {
        match show(host, unit, out).await {
            Ok(s) if s.load_state == "not-found" => lines.push(format!("systemctl show {unit}: LoadState=not-found")),
            Ok(s) => return Systemd::Unit(unit.to_string(), s),
            Err(e) => return e,
        }
    }
    Systemd::NotFound(lines)
}

/// The service check. See the module documentation.
pub(super) async fn check(cfg: &AgentConfig, host: &Host, out: &mut Vec<Finding>) {
    match systemd(host, out).await {
        Systemd::Absent(evidence) => {
            add(
                out,
                CHECK,
                Severity::Info,
                format!("unit {}", UNITS[0]),
                "no systemd on this host: the service was not checked",
            )
            .evidence(evidence)
            .fix("none needed; to see whether the agent runs: `ps -ef | grep collector-sidecar`");
        }
        Systemd::Unknown => {}
        Systemd::NotFound(lines) => not_installed(host, lines, out),
        Systemd::Unit(unit, state) => unit_finding(host, &unit, &state, out).await,
    }
    logs(cfg, out);
}

/// Neither unit known to systemd: whether a unit file is there (daemon-reload) or not.
fn not_installed(host: &Host, lines: Vec<String>, out: &mut Vec<Finding>) {
    let file = host
        .unit_dirs
        .iter()
        .flat_map(|d| UNITS.iter().map(move |u| d.join(u)))
        .find(|p| p.is_file());
    let f = add(
        out,
        CHECK,
        Severity::Error,
        format!("unit {}", UNITS[0]),
        format!(
            "the agent is not installed as a service: systemd knows neither {}",
            UNITS.join(" nor ")
        ),
    );
    for l in lines {
        f.evidence(l);
    }
    match file {
        Some(p) => {
            let unit = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            f.evidence(format!("{} exists: systemd has not loaded it", p.display()));
            f.fix(format!("systemctl daemon-reload && systemctl enable --now {unit}"));
        }
        None => {
            f.fix(
                "reinstall this agent from the node manager (its install.sh installs and enables bk-sidecar.service)",
            );
        }
    }
}

/// The unit's finding, with the journal line that explains it.
async fn unit_finding(host: &Host, unit: &str, state: &UnitState, out: &mut Vec<Finding>) {
    let journal = journal(host, unit).await;
    let matched = journal.as_ref().ok().and_then(|lines| causes::agent_match(lines));
    let subject = format!("unit {unit}");
    let evidence = format!("systemctl show {unit}: {}", state.summary());
    match judge(unit, state) {
        Some((severity, message, fix)) => {
            let f = add(out, CHECK, severity, subject, message);
            f.evidence(evidence);
            match (&journal, matched) {
                (_, Some((line, hint))) => {
                    f.evidence(format!("journal: {}", shown(line)));
                    f.fix(format!("{hint}; then `systemctl restart {unit}`"));
                }
                (Ok(lines), None) => {
                    for l in lines.iter().rev().take(5).rev() {
                        f.evidence(format!("journal: {}", shown(l)));
                    }
                    f.fix(fix);
                }
                (Err(why), None) => {
                    f.evidence(format!("journal: {why}"));
                    f.fix(fix);
                }
            }
        }
        None => match matched {
            Some((line, hint)) => {
                add(
                    out,
                    CHECK,
                    Severity::Warning,
                    subject,
                    format!("{unit} runs, but its journal shows a known problem"),
                )
                .evidence(format!("journal: {}", shown(line)))
                .evidence(evidence)
                .fix(hint);
            }
            None => {
                add(
                    out,
                    CHECK,
                    Severity::Info,
                    subject,
                    format!("{unit} is active/{}", state.sub_state),
                )
                .evidence(evidence)
                .fix("none needed");
            }
        },
    }
}

/// The unit's last journal lines (`-o cat`: the messages alone), or why there are none.
async fn journal(host: &Host, unit: &str) -> Result<Vec<String>, String> {
    match host
        .commands
        .run(&["journalctl", "-u", unit, "-n", "200", "--no-pager", "-o", "cat"])
        .await
    {
        Ran::Exited {
            code: Some(0), stdout, ..
        } => Ok(stdout
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("-- "))
            .map(str::to_string)
            .collect()),
        Ran::Exited { code, stderr, .. } => Err(format!(
            "journalctl -u {unit} failed (exit {}): {}",
            exit(code),
            stderr.lines().next().unwrap_or("").trim()
        )),
        Ran::NotFound => Err("journalctl: not found on this host".into()),
        Ran::TimedOut => Err(format!(
            "journalctl -u {unit} did not answer within {} s",
            super::STEP.as_secs()
        )),
        Ran::Failed(why) => Err(why),
    }
}

/// The log dir's `*.log` files, newest first, at most [`MAX_LOG_FILES`]; symlinks not followed.
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .take(MAX_LOG_ENTRIES)
        .filter_map(|e| {
            let m = std::fs::symlink_metadata(e.path()).ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            (m.is_file() && name.ends_with(".log")).then(|| (m.modified().unwrap_or(std::time::UNIX_EPOCH), e.path()))
        })
        .collect();
    files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    files.into_iter().take(MAX_LOG_FILES).map(|(_, p)| p).collect()
}

/// The whole lines of the last [`LOG_TAIL`] bytes of a file.
pub(crate) fn tail(path: &Path, limit: u64) -> std::io::Result<Vec<String>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(limit);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(limit).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if start > 0 && !lines.is_empty() {
        // The first line was cut by the seek.
        lines.remove(0);
    }
    Ok(lines)
}

/// The agent's own log files: a finding for each whose tail matches a known cause.
fn logs(cfg: &AgentConfig, out: &mut Vec<Finding>) {
    if cfg.sidecar_file.is_none() {
        return;
    }
    let dir = cfg.log_path.clone().unwrap_or_else(|| cfg.install_dir.join("log"));
    for file in log_files(&dir) {
        let Ok(lines) = tail(&file, LOG_TAIL) else { continue };
        if let Some((line, hint)) = causes::agent_match(&lines) {
            add(
                out,
                CHECK,
                Severity::Warning,
                format!("log {}", file.display()),
                "the agent's log shows a known problem",
            )
            .evidence(format!("{}: {}", file.display(), shown(line)))
            .fix(hint);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{by_subject, host, recorded, write, FakeCommands};
    use super::*;

    /// `systemctl show` of an agent that runs (systemd 249's order of the properties).
    pub(crate) const HEALTHY: &str =
        "Result=success\nNRestarts=0\nExecMainStartTimestamp=Tue 2024-05-14 10:21:33 CST\n\
        ExecMainCode=0\nExecMainStatus=0\nFragmentPath=/etc/systemd/system/bk-sidecar.service\nLoadState=loaded\n\
        ActiveState=active\nSubState=running\n";
    /// The field's agent, 524 restarts into its loop.
    pub(crate) const LOOPING: &str =
        "Result=exit-code\nNRestarts=524\nExecMainStartTimestamp=Tue 2024-05-14 11:05:02 CST\n\
        ExecMainCode=1\nExecMainStatus=1\nFragmentPath=/etc/systemd/system/bk-sidecar.service\nLoadState=loaded\n\
        ActiveState=activating\nSubState=auto-restart\n";
    pub(crate) const NOT_FOUND: &str = "Result=success\nNRestarts=0\nExecMainStartTimestamp=\nExecMainCode=0\n\
        ExecMainStatus=0\nFragmentPath=\nLoadState=not-found\nActiveState=inactive\nSubState=dead\n";
    /// Failed after its start limit, on CentOS 7 (systemd 219: no NRestarts).
    const FAILED_219: &str = "Result=start-limit\nExecMainStartTimestamp=Tue 2024-05-14 11:05:02 CST\nExecMainCode=1\n\
        ExecMainStatus=2\nFragmentPath=/etc/systemd/system/bk-sidecar.service\nLoadState=loaded\nActiveState=failed\n\
        SubState=failed\n";
    const INACTIVE: &str = "Result=success\nNRestarts=0\nExecMainStartTimestamp=\nExecMainCode=0\nExecMainStatus=0\n\
        FragmentPath=/etc/systemd/system/bk-sidecar.service\nLoadState=loaded\nActiveState=inactive\nSubState=dead\n";
    /// The field's journal (`-o cat`).
    const JOURNAL: &str = "Started Fusion Collector BK Sidecar.\n\
        time=\"2024-05-14T11:05:02+08:00\" level=info msg=\"Using node-id: 7f3c\"\n\
        time=\"2024-05-14T11:05:02+08:00\" level=fatal msg=\"Server-url is not valid: parse \\\"null/api/v1/node_mgmt/open_api/node\\\": invalid URI for request\"\n\
        bk-sidecar.service: main process exited, code=exited, status=1/FAILURE\n\
        Unit bk-sidecar.service entered failed state.\n\
        bk-sidecar.service failed.\n";

    #[test]
    fn systemctl_show_parses() {
        let s = parse_show(LOOPING);
        assert_eq!(
            (
                s.load_state.as_str(),
                s.active_state.as_str(),
                s.sub_state.as_str(),
                s.n_restarts,
                s.exec_main_status
            ),
            ("loaded", "activating", "auto-restart", Some(524), Some(1))
        );
        assert_eq!(s.result, "exit-code");
        assert_eq!(s.started, "Tue 2024-05-14 11:05:02 CST");
        assert_eq!(parse_show(FAILED_219).n_restarts, None);
        assert_eq!(parse_show(NOT_FOUND).fragment_path, "");
    }

    #[test]
    fn unit_states_are_judged() {
        let u = "bk-sidecar.service";
        assert_eq!(judge(u, &parse_show(HEALTHY)), None);
        let (sev, msg, _) = judge(u, &parse_show(LOOPING)).unwrap();
        assert_eq!(sev, Severity::Error);
        assert!(
            msg.contains("restart-looping: it has restarted 524 times, last exit status 1 (Result=exit-code)"),
            "{msg}"
        );
        let (sev, msg, _) = judge(u, &parse_show(FAILED_219)).unwrap();
        assert_eq!(sev, Severity::Error);
        assert!(
            msg.contains("has failed: last exit status 2 (Result=start-limit)"),
            "{msg}"
        );
        let (sev, _, fix) = judge(u, &parse_show(INACTIVE)).unwrap();
        assert_eq!(
            (sev, fix.as_str()),
            (Severity::Error, "systemctl enable --now bk-sidecar.service")
        );
        let flapping = HEALTHY.replace("NRestarts=0", "NRestarts=4");
        assert_eq!(judge(u, &parse_show(&flapping)).unwrap().0, Severity::Warning);
        let masked = HEALTHY.replace("LoadState=loaded", "LoadState=masked");
        assert!(judge(u, &parse_show(&masked))
            .unwrap()
            .2
            .starts_with("systemctl unmask"));
        let starting = HEALTHY
            .replace("ActiveState=active", "ActiveState=activating")
            .replace("SubState=running", "SubState=start");
        assert_eq!(judge(u, &parse_show(&starting)).unwrap().0, Severity::Warning);
    }

    async fn run(h: &Host, cfg: &AgentConfig) -> Vec<Finding> {
        let mut out = Vec::new();
        check(cfg, h, &mut out).await;
        out
    }

    #[tokio::test]
    async fn a_restart_loop_is_named_with_its_journal_line() {
        let t = tempfile::tempdir().unwrap();
        let mut h = host(t.path());
        h.commands = Box::new(
            FakeCommands::default()
                .with("systemctl show bk-sidecar.service", recorded(LOOPING))
                .with("journalctl -u bk-sidecar.service", recorded(JOURNAL)),
        );
        let out = run(&h, &AgentConfig::default()).await;
        assert_eq!(out.len(), 1, "{out:#?}");
        let f = by_subject(&out, "unit bk-sidecar.service");
        assert_eq!((f.check, f.severity), (CHECK, Severity::Error));
        assert!(f.message.contains("524 times"));
        assert!(f.evidence[0].contains("NRestarts=524"), "{:?}", f.evidence);
        assert!(
            f.evidence[1].starts_with("journal: time=") && f.evidence[1].contains("Server-url is not valid"),
            "{:?}",
            f.evidence
        );
        assert!(f.fix.as_deref().unwrap().contains("bkbundle regions check"));
    }

    #[tokio::test]
    async fn the_older_unit_is_found_and_a_missing_one_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let mut h = host(t.path());
        h.commands = Box::new(
            FakeCommands::default()
                .with("systemctl show bk-sidecar.service", recorded(NOT_FOUND))
                .with("systemctl show sidecar.service", recorded(HEALTHY))
                .with("journalctl -u sidecar.service", recorded("Started.\n")),
        );
        let out = run(&h, &AgentConfig::default()).await;
        let f = by_subject(&out, "unit sidecar.service");
        assert_eq!(f.severity, Severity::Info);

        h.commands = Box::new(
            FakeCommands::default()
                .with("systemctl show bk-sidecar.service", recorded(NOT_FOUND))
                .with("systemctl show sidecar.service", recorded(NOT_FOUND)),
        );
        let out = run(&h, &AgentConfig::default()).await;
        let f = by_subject(&out, "unit bk-sidecar.service");
        assert_eq!(f.severity, Severity::Error);
        assert!(f.message.contains("not installed as a service"));
        assert_eq!(f.evidence.len(), 2);
        assert!(f.fix.as_deref().unwrap().contains("reinstall"));
        write(
            &h.unit_dirs[0].join("bk-sidecar.service"),
            "[Service]\nExecStart=/x -c /y\n",
        );
        let out = run(&h, &AgentConfig::default()).await;
        let fix = by_subject(&out, "unit bk-sidecar.service").fix.clone().unwrap();
        assert_eq!(
            fix,
            "systemctl daemon-reload && systemctl enable --now bk-sidecar.service"
        );
    }

    #[tokio::test]
    async fn no_systemd_is_an_info_and_the_logs_are_still_read() {
        let t = tempfile::tempdir().unwrap();
        let h = host(t.path());
        let log = t.path().join("log");
        // A long log: the match is in its last 64 KiB; an old one before it is not read.
        let mut text = String::from("level=error msg=\"Authorization Violation\"\n");
        text.push_str(&"level=info msg=\"tick\"\n".repeat(8000));
        text.push_str("level=error msg=\"Get \\\"http://bk.site.invalid/api/v1/node_mgmt/open_api/node\\\": dial tcp: lookup bk.site.invalid: no such host\"\n");
        write(&log.join("sidecar.log"), &text);
        write(&log.join("old.log.gz"), "connection refused\n");
        let cfg = AgentConfig {
            install_dir: t.path().to_path_buf(),
            sidecar_file: Some(t.path().join("sidecar.yml")),
            log_path: Some(log.clone()),
            ..Default::default()
        };
        let out = run(&h, &cfg).await;
        assert_eq!(out.len(), 2, "{out:#?}");
        let f = by_subject(&out, "unit bk-sidecar.service");
        assert_eq!(f.severity, Severity::Info);
        assert_eq!(f.message, "no systemd on this host: the service was not checked");
        let f = by_subject(&out, &format!("log {}", log.join("sidecar.log").display()));
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.evidence[0].contains("no such host"), "{:?}", f.evidence);
        assert!(f.fix.as_deref().unwrap().contains("/etc/hosts"));

        // systemctl present but no bus (a container).
        let mut h = h;
        h.commands = Box::new(FakeCommands::default().with(
            "systemctl show bk-sidecar.service",
            Ran::Exited {
                code: Some(1),
                stdout: String::new(),
                stderr: "System has not been booted with systemd as init system (PID 1). Can't operate.\nFailed to connect to bus: Host is down\n".into(),
            },
        ));
        let out = run(&h, &AgentConfig::default()).await;
        let f = by_subject(&out, "unit bk-sidecar.service");
        assert_eq!(f.severity, Severity::Info);
        assert!(f.evidence[0].contains("System has not been booted"), "{:?}", f.evidence);
    }

    #[tokio::test]
    async fn a_running_unit_with_a_known_problem_in_its_journal_is_a_warning() {
        let t = tempfile::tempdir().unwrap();
        let mut h = host(t.path());
        h.commands = Box::new(
            FakeCommands::default()
                .with("systemctl show bk-sidecar.service", recorded(HEALTHY))
                .with(
                    "journalctl -u bk-sidecar.service",
                    recorded(
                        "connect tls://admin:hunter2@nats.site:4222: nats: Authorization Violation\nreconnecting\n",
                    ),
                ),
        );
        let out = run(&h, &AgentConfig::default()).await;
        let f = by_subject(&out, "unit bk-sidecar.service");
        assert_eq!(f.severity, Severity::Warning);
        assert_eq!(
            f.evidence[0],
            "journal: connect tls://admin:******@nats.site:4222: nats: Authorization Violation"
        );
    }

    #[tokio::test]
    async fn a_hung_systemctl_is_a_warning() {
        let t = tempfile::tempdir().unwrap();
        let mut h = host(t.path());
        h.commands = Box::new(FakeCommands::default().with("systemctl show bk-sidecar.service", Ran::TimedOut));
        let out = run(&h, &AgentConfig::default()).await;
        let f = by_subject(&out, "unit bk-sidecar.service");
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.message.contains("did not answer within 3 s"));
    }

    #[test]
    fn a_tail_drops_its_cut_first_line() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.log");
        write(&p, "first line\nsecond\nthird\n");
        assert_eq!(tail(&p, 1000).unwrap(), vec!["first line", "second", "third"]);
        assert_eq!(tail(&p, 10).unwrap(), vec!["third"]);
    }
}
