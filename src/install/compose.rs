//! The host's Docker Compose, the tool operators keep using after install: `docker compose` (v2)
//! or `docker-compose` (v1), detected. bkbundle only ever runs `version`, `config` and `up -d`:
//! never `down`, never anything that removes volumes. `up` never builds and never pulls: v2 gets
//! `--pull never --no-build` (`--no-build` alone on a v2 too old for `--pull`), v1 (1.29 has no
//! `--pull`) gets `--no-build`, and it pulls nothing because preflight made sure every image of
//! every service is in the engine before `up` (see [`super::offline`]).

use crate::error::{Error, Result};
use std::path::Path;
use std::process::{Command, Output};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compose {
    /// The program and leading arguments: ["docker", "compose"] or ["docker-compose"].
    pub argv: Vec<String>,
    pub version: String,
    /// `up` accepts `--pull never` (Compose v2 from 2.7 on).
    pub up_pull_flag: bool,
}

fn try_version(argv: &[&str]) -> Option<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .arg("version")
        .arg("--short")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!v.is_empty()).then_some(v)
}

impl Compose {
    /// `docker compose` (v2) first, then `docker-compose` (v1).
    pub fn detect() -> Result<Compose> {
        for argv in [&["docker", "compose"][..], &["docker-compose"][..]] {
            if let Some(version) = try_version(argv) {
                let up_pull_flag = !is_v1(&version) && up_help_has_pull(argv);
                return Ok(Compose {
                    argv: argv.iter().map(|s| s.to_string()).collect(),
                    version,
                    up_pull_flag,
                });
            }
        }
        Err(
            Error::external("neither `docker compose` (v2) nor `docker-compose` (v1) works on this host").hint(
                "install the Docker Compose plugin (docker-compose-plugin) or docker-compose, then re-run install",
            ),
        )
    }

    pub fn name(&self) -> String {
        format!("{} {}", self.argv.join(" "), self.version)
    }

    /// `env_file`: None when the stack has no env template (compose then reads a `.env` beside
    /// the compose file, if there is one, as it does for the operator).
    fn command(&self, project: &str, compose_file: &Path, env_file: Option<&Path>) -> Command {
        let mut c = Command::new(&self.argv[0]);
        c.args(&self.argv[1..]);
        c.arg("-p").arg(project).arg("-f").arg(compose_file);
        if let Some(env_file) = env_file {
            c.arg("--env-file").arg(env_file);
        }
        if let Some(dir) = compose_file.parent() {
            c.current_dir(dir);
        }
        c
    }

    fn run(&self, mut c: Command, what: &str) -> Result<Output> {
        c.output()
            .map_err(|e| Error::external(format!("cannot run {}: {e}", self.name())).hint(format!("needed to {what}")))
    }

    /// The rendered compose file (`config`), as YAML text.
    pub fn config(&self, project: &str, compose_file: &Path, env_file: Option<&Path>) -> Result<String> {
        let mut c = self.command(project, compose_file, env_file);
        c.arg("config");
        let out = self.run(c, "read the compose file")?;
        if !out.status.success() {
            return Err(Error::input(format!(
                "{} rejects the rendered compose file {}:\n{}",
                self.name(),
                compose_file
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                tail(&out, 15)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The arguments of `up`: detached, never building, never pulling.
    pub fn up_args(&self) -> Vec<&'static str> {
        let mut a = vec!["up", "-d", "--remove-orphans", "--no-build"];
        if self.up_pull_flag {
            a.extend(["--pull", "never"]);
        }
        a
    }

    /// `up -d`: create or update the stack; compose recreates only the services whose
    /// configuration or image changed. Never builds or pulls ([`Compose::up_args`]).
    pub fn up(&self, project: &str, compose_file: &Path, env_file: Option<&Path>) -> Result<()> {
        let mut c = self.command(project, compose_file, env_file);
        c.args(self.up_args());
        let out = self.run(c, "start the stack")?;
        if !out.status.success() {
            return Err(Error::external(format!(
                "`{} -p {project} up -d` failed in {}:\n{}",
                self.argv.join(" "),
                compose_file
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                tail(&out, 30)
            ))
            .hint("fix what compose reports, then re-run install: it resumes where it stopped"));
        }
        Ok(())
    }
}

impl Compose {
    /// `up -d SERVICE...`: start only these services (and what they depend on), as restore does
    /// to bring the database back before the server starts. Never builds or pulls.
    pub fn up_services(
        &self,
        project: &str,
        compose_file: &Path,
        env_file: Option<&Path>,
        services: &[&str],
    ) -> Result<()> {
        let mut c = self.command(project, compose_file, env_file);
        c.args(["up", "-d", "--no-build"]);
        if self.up_pull_flag {
            c.args(["--pull", "never"]);
        }
        c.args(services);
        let out = self.run(c, "start services")?;
        if !out.status.success() {
            return Err(Error::external(format!(
                "`{} -p {project} up -d {}` failed:\n{}",
                self.argv.join(" "),
                services.join(" "),
                tail(&out, 30)
            ))
            .hint("fix what compose reports, then re-run: it resumes where it stopped"));
        }
        Ok(())
    }

    /// `stop`: stop the stack's containers, keeping them and every volume (never `down -v`).
    pub fn stop(&self, project: &str, compose_file: &Path, env_file: Option<&Path>) -> Result<()> {
        let mut c = self.command(project, compose_file, env_file);
        c.arg("stop");
        let out = self.run(c, "stop the stack")?;
        if !out.status.success() {
            return Err(Error::external(format!(
                "`{} -p {project} stop` failed:\n{}",
                self.argv.join(" "),
                tail(&out, 30)
            ))
            .hint("stop the stack yourself (`docker compose stop`), then re-run"));
        }
        Ok(())
    }
}

/// Compose v1 (docker-compose 1.x, Python) reports versions like `1.29.2`; v2 `2.20.2` or `v2.20.2`.
fn is_v1(version: &str) -> bool {
    version.trim_start_matches('v').starts_with("1.")
}

/// Whether this compose's `up` knows `--pull` (v2.7 and later; older v2 would refuse the flag).
fn up_help_has_pull(argv: &[&str]) -> bool {
    Command::new(argv[0])
        .args(&argv[1..])
        .args(["up", "--help"])
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout);
            text.lines().any(|l| l.trim_start().starts_with("--pull"))
        })
        .unwrap_or(false)
}

fn tail(out: &Output, lines: usize) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_never_builds_nor_pulls() {
        let v1 = Compose {
            argv: vec!["docker-compose".into()],
            version: "1.29.2".into(),
            up_pull_flag: false,
        };
        assert_eq!(v1.up_args(), ["up", "-d", "--remove-orphans", "--no-build"]);
        let v2 = Compose {
            argv: vec!["docker".into(), "compose".into()],
            version: "2.20.2".into(),
            up_pull_flag: true,
        };
        assert_eq!(
            v2.up_args(),
            ["up", "-d", "--remove-orphans", "--no-build", "--pull", "never"]
        );
        assert!(is_v1("1.29.2") && !is_v1("v2.20.2") && !is_v1("2.3.3"));
    }
}
