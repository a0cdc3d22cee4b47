//! The containers check: each container of the compose project, its state, health, exit code and
//! restarts, and the first line of its log that the known-causes table explains.

use super::{Ctx, Finding, Link, Severity, PROBE};
use crate::engine::{ContainerState, Engine};
use crate::platform::causes;
use crate::ports::Docker;

/// Log lines of each container that are searched for known causes.
const LOG_LINES: usize = 200;

/// Connect the Docker engine (live), when the compose project is known (nothing is tried
/// otherwise: the check says why it did not run).
pub(super) async fn connect(ctx: &Ctx<'_>) -> Link<Engine> {
    if ctx.project().is_none() {
        return Err(vec![]);
    }
    match tokio::time::timeout(PROBE * 2, Engine::connect()).await {
        Ok(Ok(e)) => Ok(e),
        Ok(Err(e)) => Err(vec![Finding::from_error("containers", "Docker engine", e)]),
        Err(_) => {
            let mut f = Finding::new(
                "containers",
                Severity::Error,
                "Docker engine",
                "the Docker engine did not answer within 6 s",
            );
            f.fix("systemctl status docker; journalctl -u docker");
            Err(vec![f])
        }
    }
}

pub(super) async fn check(ctx: &mut Ctx<'_>, docker: &Link<&dyn Docker>) {
    let Some(project) = ctx.project() else {
        ctx.add(
            "containers",
            Severity::Info,
            "compose project",
            "not checked: the compose project is not known",
        )
        .fix("give --target (the install's directory), --project NAME or --bundle BUNDLE");
        return;
    };
    let Some(docker) = ctx.reached(docker) else {
        return;
    };
    let list = match docker.project_containers(&project).await {
        Ok(l) => l,
        Err(e) => return ctx.add_error("containers", "Docker engine", e),
    };
    if list.is_empty() {
        ctx.add(
            "containers",
            Severity::Error,
            format!("compose project {project}"),
            "no container of the stack exists: it was never started, or it was taken down",
        )
        .fix(format!(
            "cd TARGET && docker compose -p {project} up -d   (or re-run `bkbundle install`)"
        ));
        return;
    }
    for c in &list {
        let lines = docker.logs(&c.id, LOG_LINES).await.unwrap_or_default();
        container(ctx, &project, c, &lines);
    }
}

/// Why the container is failing, `None` when it is not (a one-shot service that finished well
/// is not).
fn failing(c: &ContainerState) -> Option<String> {
    let restart_loop = c.status == "restarting" || (c.restart_count >= 3 && c.status != "exited");
    let one_shot_done =
        c.status == "exited" && c.exit_code == 0 && matches!(c.restart_policy.as_str(), "" | "no" | "on-failure");
    if restart_loop {
        Some(format!(
            "restart loop: restarted {} time(s), now {}",
            c.restart_count, c.status
        ))
    } else if c.status == "exited" && !one_shot_done {
        Some(format!("exited with code {}", c.exit_code))
    } else if c.status == "dead" || c.status == "created" {
        Some(format!("is {}", c.status))
    } else if c.status == "running" && c.health.as_deref() == Some("unhealthy") {
        Some("is unhealthy (its health check fails)".to_string())
    } else {
        None
    }
}

/// One container's finding, if any: an error when it fails, a warning when only its log shows
/// a known problem.
fn container(ctx: &mut Ctx<'_>, project: &str, c: &ContainerState, lines: &[String]) {
    let matched = causes::first_match(lines);
    let subject = format!("service {} (container {})", c.service, c.name);
    let state = format!(
        "state {}, health {}, exit code {}, restarts {}{}",
        c.status,
        c.health.as_deref().unwrap_or("none"),
        c.exit_code,
        c.restart_count,
        if c.oom_killed { ", killed for memory" } else { "" }
    );
    match failing(c) {
        Some(what) => {
            let hint = causes::hint_for(lines, c.oom_killed);
            let f = ctx.add("containers", Severity::Error, subject, what);
            f.evidence(state);
            match matched {
                Some((line, _)) => {
                    f.evidence(format!("log: {}", line.trim()));
                }
                None => {
                    for l in lines.iter().rev().take(5).rev() {
                        f.evidence(format!("log: {}", l.trim()));
                    }
                }
            }
            f.fix(match hint {
                Some(h) => format!("{h}; then `docker compose -p {project} up -d {}`", c.service),
                None => format!(
                    "docker logs {}   (then fix its cause and `docker compose -p {project} up -d {}`)",
                    c.name, c.service
                ),
            });
        }
        None => {
            if let Some((line, hint)) = matched {
                ctx.add(
                    "containers",
                    Severity::Warning,
                    subject,
                    "its log shows a known problem",
                )
                .evidence(format!("log: {}", line.trim()))
                .evidence(state)
                .fix(hint);
            }
        }
    }
}
