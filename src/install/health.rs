//! Waiting for the stack to be healthy, through the Engine API, per service.
//!
//! Bounded by a deadline; fails within one poll when a container exits (other than a one-shot
//! service that finished with 0), turns unhealthy, or restarts (a restart loop). A service without
//! a health check is ready once it has run steadily for a few seconds. On failure, each failing
//! service is shown with its state, exit code, restart count, last log lines and a hint from the
//! table of known causes ([`crate::platform::causes`]).

use crate::engine::{ContainerState, Engine};
use crate::error::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::platform::causes::hint_for;

#[derive(Debug, Clone, Serialize)]
pub struct ServiceHealth {
    pub service: String,
    pub container: String,
    pub state: String,
    pub ready_after_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub service: String,
    pub container: String,
    pub reason: String,
    pub status: String,
    pub health: Option<String>,
    pub exit_code: i64,
    pub restart_count: i64,
    pub logs: Vec<String>,
    pub hint: Option<String>,
}

/// What a poll concludes about one container.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Ready(&'static str),
    Waiting(&'static str),
    Failed(String),
}

/// Judge one container. `first_restarts` is its restart count when the wait began; `running_for`
/// how long it has been running (None when unknown).
pub fn judge(c: &ContainerState, first_restarts: i64, running_for: Option<Duration>, steady: Duration) -> Verdict {
    if c.restart_count > first_restarts || c.status == "restarting" {
        return Verdict::Failed(format!(
            "restart loop: restarted {} time(s) while waiting (exit code {})",
            c.restart_count - first_restarts,
            c.exit_code
        ));
    }
    match c.status.as_str() {
        "exited" | "dead" => {
            let one_shot = matches!(c.restart_policy.as_str(), "" | "no" | "on-failure");
            if c.exit_code == 0 && one_shot && c.status == "exited" {
                Verdict::Ready("completed")
            } else {
                Verdict::Failed(format!("{} with exit code {}", c.status, c.exit_code))
            }
        }
        "running" => match c.health.as_deref() {
            Some("healthy") => Verdict::Ready("healthy"),
            Some("unhealthy") => Verdict::Failed("its health check reports unhealthy".into()),
            Some(_) => Verdict::Waiting("health check starting"),
            None => match running_for {
                Some(d) if d >= steady => Verdict::Ready("running"),
                _ => Verdict::Waiting("running, not yet steady"),
            },
        },
        "paused" => Verdict::Failed("paused".into()),
        _ => Verdict::Waiting("created, not started"),
    }
}

fn running_for(started_at: &str) -> Option<Duration> {
    // RFC 3339 with nanoseconds, UTC ("2026-11-22T06:00:00.123456789Z").
    let (date, time) = started_at.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.trim_end_matches('Z');
    let time = time.split(['+']).next()?;
    let mut t = time.split(':');
    let (h, mi) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let s: f64 = t.next()?.parse().ok()?;
    // days from civil (inverse of pack::rfc3339)
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let started = days as f64 * 86_400.0 + (h * 3600 + mi * 60) as f64 + s;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    (y > 1970).then(|| Duration::from_secs_f64((now - started).max(0.0)))
}

pub struct WaitOptions {
    pub project: String,
    pub timeout: Duration,
    pub steady: Duration,
    pub poll: Duration,
}

/// Wait until every container of the project is ready; or fail with the evidence.
pub async fn wait(engine: &Engine, opts: &WaitOptions, note: &dyn Fn(&str)) -> Result<Vec<ServiceHealth>> {
    let t0 = Instant::now();
    let deadline = t0 + opts.timeout;
    let mut first_restarts: BTreeMap<String, i64> = BTreeMap::new();
    let mut ready: BTreeMap<String, ServiceHealth> = BTreeMap::new();
    let mut last_waiting = String::new();
    loop {
        let containers = engine.project_containers(&opts.project).await?;
        if containers.is_empty() {
            return Err(Error::external(format!(
                "compose project {} has no containers after `up -d`",
                opts.project
            ))
            .hint("check the compose file's services (a profile may exclude them all)"));
        }
        let (mut failures, waiting) = judge_round(&containers, &mut first_restarts, &mut ready, t0, opts.steady);
        let timed_out = Instant::now() >= deadline;
        if failures.is_empty() && timed_out {
            for c in &containers {
                if !ready.contains_key(&c.id) {
                    let reason = format!(
                        "not ready after {}s ({})",
                        opts.timeout.as_secs(),
                        c.health.as_deref().unwrap_or(&c.status)
                    );
                    failures.push((c.clone(), reason));
                }
            }
        }
        if !failures.is_empty() {
            let out = with_evidence(engine, failures).await;
            return Err(failure_error(&opts.project, &out));
        }
        if waiting.is_empty() {
            let mut v: Vec<ServiceHealth> = ready.into_values().collect();
            v.sort_by(|a, b| a.service.cmp(&b.service));
            return Ok(v);
        }
        let w = waiting.join(", ");
        if w != last_waiting {
            note(&format!("waiting for {w}"));
            last_waiting = w;
        }
        tokio::time::sleep(
            opts.poll
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(50)),
        )
        .await;
    }
}

/// One poll's verdicts: `ready` updated (a container that falls back to waiting leaves it), and
/// the failed containers with their reasons and the services still waiting returned.
fn judge_round(
    containers: &[ContainerState],
    first_restarts: &mut BTreeMap<String, i64>,
    ready: &mut BTreeMap<String, ServiceHealth>,
    t0: Instant,
    steady: Duration,
) -> (Vec<(ContainerState, String)>, Vec<String>) {
    let mut failures = Vec::new();
    let mut waiting = Vec::new();
    for c in containers {
        let first = *first_restarts.entry(c.id.clone()).or_insert(c.restart_count);
        match judge(c, first, running_for(&c.started_at), steady) {
            Verdict::Ready(state) => {
                ready.entry(c.id.clone()).or_insert_with(|| ServiceHealth {
                    service: c.service.clone(),
                    container: c.name.clone(),
                    state: state.to_string(),
                    ready_after_secs: t0.elapsed().as_secs_f64(),
                });
            }
            Verdict::Waiting(why) => {
                ready.remove(&c.id);
                waiting.push(format!("{} ({why})", c.service));
            }
            Verdict::Failed(reason) => failures.push((c.clone(), reason)),
        }
    }
    (failures, waiting)
}

/// Each failed container with its last log lines and the hint they suggest, the evidence the
/// operator needs without running `docker logs`.
async fn with_evidence(engine: &Engine, failures: Vec<(ContainerState, String)>) -> Vec<Failure> {
    let mut out = Vec::new();
    for (c, reason) in failures {
        let logs = engine
            .logs(&c.id, 30)
            .await
            .unwrap_or_else(|e| vec![format!("(logs unavailable: {e})")]);
        let hint = hint_for(&logs, c.oom_killed);
        out.push(Failure {
            service: c.service.clone(),
            container: c.name.clone(),
            reason,
            status: c.status.clone(),
            health: c.health.clone(),
            exit_code: c.exit_code,
            restart_count: c.restart_count,
            logs,
            hint,
        });
    }
    out
}

fn failure_error(project: &str, failures: &[Failure]) -> Error {
    let mut msg = format!(
        "the stack (compose project {project}) is not healthy: {} service(s) failed",
        failures.len()
    );
    let mut hints = Vec::new();
    for f in failures {
        msg.push_str(&format!(
            "\n\nservice {} (container {}): {}\n  state {}{}, exit code {}, restarts {}\n  last {} log lines:",
            f.service,
            f.container,
            f.reason,
            f.status,
            f.health.as_ref().map(|h| format!(" ({h})")).unwrap_or_default(),
            f.exit_code,
            f.restart_count,
            f.logs.len()
        ));
        for l in &f.logs {
            msg.push_str(&format!("\n    | {l}"));
        }
        if let Some(h) = &f.hint {
            hints.push(format!("{}: {h}", f.service));
        }
    }
    let mut e = Error::external(msg);
    e.kind = crate::error::Kind::Unhealthy;
    for h in hints {
        e = e.hint(h);
    }
    e.hint("fix the cause, then re-run install (it resumes); `docker logs <container>` shows more; data volumes are kept (never `down -v`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(status: &str, health: Option<&str>, exit: i64, restarts: i64, policy: &str) -> ContainerState {
        ContainerState {
            status: status.into(),
            health: health.map(String::from),
            exit_code: exit,
            restart_count: restarts,
            restart_policy: policy.into(),
            ..Default::default()
        }
    }

    #[test]
    fn verdicts() {
        let steady = Duration::from_secs(5);
        assert_eq!(
            judge(&c("running", Some("healthy"), 0, 0, "always"), 0, None, steady),
            Verdict::Ready("healthy")
        );
        assert!(matches!(
            judge(&c("running", Some("unhealthy"), 0, 0, "always"), 0, None, steady),
            Verdict::Failed(_)
        ));
        assert!(matches!(
            judge(&c("running", Some("starting"), 0, 0, "always"), 0, None, steady),
            Verdict::Waiting(_)
        ));
        assert!(
            matches!(judge(&c("exited", None, 3, 0, "no"), 0, None, steady), Verdict::Failed(r) if r.contains("exit code 3"))
        );
        assert_eq!(
            judge(&c("exited", None, 0, 0, "no"), 0, None, steady),
            Verdict::Ready("completed")
        );
        assert!(matches!(
            judge(&c("exited", None, 0, 0, "always"), 0, None, steady),
            Verdict::Failed(_)
        ));
        assert!(
            matches!(judge(&c("running", None, 1, 3, "always"), 1, None, steady), Verdict::Failed(r) if r.contains("restart loop"))
        );
        assert!(matches!(
            judge(&c("restarting", None, 1, 0, "always"), 0, None, steady),
            Verdict::Failed(_)
        ));
        assert!(matches!(
            judge(
                &c("running", None, 0, 0, "always"),
                0,
                Some(Duration::from_secs(1)),
                steady
            ),
            Verdict::Waiting(_)
        ));
        assert_eq!(
            judge(
                &c("running", None, 0, 0, "always"),
                0,
                Some(Duration::from_secs(6)),
                steady
            ),
            Verdict::Ready("running")
        );
    }

    #[test]
    fn hints_from_logs() {
        let l = |s: &str| vec![s.to_string()];
        assert!(hint_for(
            &l("error: Failed to download `django==4.2` from https://pypi.org/simple"),
            false
        )
        .unwrap()
        .contains("UV_OFFLINE=1"));
        assert!(hint_for(&l("curl: (6) Could not resolve host: example.com"), false)
            .unwrap()
            .contains("internet"));
        assert!(hint_for(&l("Server-url is not valid"), false)
            .unwrap()
            .contains("NODE_SERVER_URL"));
        assert!(hint_for(&l("all fine"), false).is_none());
        assert!(hint_for(&l(""), true).unwrap().contains("memory"));
    }

    #[test]
    fn started_at_parses() {
        let d = running_for(&crate::pack::rfc3339(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                - 10,
        ));
        let d = d.unwrap().as_secs();
        assert!((9..=11).contains(&d), "{d}");
        assert!(running_for("0001-01-01T00:00:00Z").is_none());
    }
}
