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

#[cfg(test)]
mod tests {
    use super::super::testing::{diagnose, no_finding, opts, the};
    use super::super::{DoctorOptions, Severity};
    use crate::ports::fakes::{container, FakeDocker};

    fn engine(containers: Vec<crate::engine::ContainerState>) -> FakeDocker {
        FakeDocker {
            containers,
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_exited_container_is_an_error_with_its_last_lines() {
        let mut web = container("p", "web", "exited", None);
        web.exit_code = 2;
        let mut docker = engine(vec![web]);
        docker
            .logs
            .insert("p-web-1-id".into(), vec!["starting".into(), "fatal: bad config".into()]);
        let r = diagnose(&opts(), &docker, None, None, None).await;
        let f = the(&r, "containers", Severity::Error, "service web (container p-web-1)");
        assert_eq!(f.message, "exited with code 2");
        assert!(f.evidence.contains(&"log: fatal: bad config".to_string()), "{f:#?}");
        assert!(
            f.fix.as_deref().unwrap_or("").starts_with("docker logs p-web-1"),
            "{f:#?}"
        );
        assert!(!f.fixed);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_loop_shows_the_known_cause_and_its_hint() {
        let mut probe = container("p", "probe", "restarting", None);
        probe.restart_count = 5;
        probe.exit_code = 1;
        let mut docker = engine(vec![probe]);
        docker.logs.insert(
            "p-probe-1-id".into(),
            vec!["curl: (6) Could not resolve host: repo.example.com".into()],
        );
        let r = diagnose(&opts(), &docker, None, None, None).await;
        let f = the(&r, "containers", Severity::Error, "service probe");
        assert_eq!(f.message, "restart loop: restarted 5 time(s), now restarting");
        assert!(
            f.evidence
                .contains(&"log: curl: (6) Could not resolve host: repo.example.com".to_string()),
            "{f:#?}"
        );
        assert!(
            f.fix.as_deref().unwrap_or("").contains("a name does not resolve"),
            "{f:#?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unhealthy_container_is_an_error_and_a_finished_one_shot_is_not() {
        let mut init = container("p", "init", "exited", None);
        init.restart_policy = "no".into();
        let docker = engine(vec![container("p", "server", "running", Some("unhealthy")), init]);
        let r = diagnose(&opts(), &docker, None, None, None).await;
        let f = the(&r, "containers", Severity::Error, "service server");
        assert_eq!(f.message, "is unhealthy (its health check fails)");
        assert_eq!(
            f.evidence[0],
            "state running, health unhealthy, exit code 0, restarts 0"
        );
        no_finding(&r, "containers", "service init");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_known_cause_in_a_running_containers_log_is_a_warning() {
        let mut docker = engine(vec![container("p", "web", "running", Some("healthy"))]);
        docker.logs.insert(
            "p-web-1-id".into(),
            vec![
                "ok".into(),
                "FATAL: password authentication failed for user \"bk\"".into(),
            ],
        );
        let r = diagnose(&opts(), &docker, None, None, None).await;
        let f = the(&r, "containers", Severity::Warning, "service web");
        assert_eq!(f.message, "its log shows a known problem");
        assert_eq!(
            f.evidence[0],
            "log: FATAL: password authentication failed for user \"bk\""
        );
        assert!(
            f.fix.as_deref().unwrap_or("").contains("restore the old value in .env"),
            "{f:#?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_engine_that_does_not_answer_is_an_error() {
        let docker = FakeDocker {
            down: Some("cannot reach the Docker engine at unix:///var/run/docker.sock".into()),
            ..Default::default()
        };
        let r = diagnose(&opts(), &docker, None, None, None).await;
        let f = the(&r, "containers", Severity::Error, "Docker engine");
        assert!(f.message.contains("cannot reach the Docker engine"), "{f:#?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stack_without_containers_and_an_unknown_project() {
        let r = diagnose(&opts(), &engine(vec![]), None, None, None).await;
        let f = the(&r, "containers", Severity::Error, "compose project p");
        assert!(f.message.starts_with("no container of the stack exists"), "{f:#?}");

        let unknown = DoctorOptions::default();
        let r = diagnose(&unknown, &engine(vec![]), None, None, None).await;
        let f = the(&r, "containers", Severity::Info, "compose project");
        assert_eq!(f.message, "not checked: the compose project is not known");
    }
}
