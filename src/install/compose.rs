//! The host's Docker Compose, the tool operators keep using after install: `docker compose` (v2)
//! or `docker-compose` (v1), detected. bkbundle only ever runs `version`, `config` and `up -d`:
//! never `down`, never anything that removes volumes.

use crate::error::{Error, Result};
use std::path::Path;
use std::process::{Command, Output};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compose {
    /// The program and leading arguments: ["docker", "compose"] or ["docker-compose"].
    pub argv: Vec<String>,
    pub version: String,
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
                return Ok(Compose {
                    argv: argv.iter().map(|s| s.to_string()).collect(),
                    version,
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

    fn command(&self, project: &str, compose_file: &Path, env_file: &Path) -> Command {
        let mut c = Command::new(&self.argv[0]);
        c.args(&self.argv[1..]);
        c.arg("-p")
            .arg(project)
            .arg("-f")
            .arg(compose_file)
            .arg("--env-file")
            .arg(env_file);
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
    pub fn config(&self, project: &str, compose_file: &Path, env_file: &Path) -> Result<String> {
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

    /// `up -d`: create or update the stack; compose recreates only the services whose
    /// configuration or image changed.
    pub fn up(&self, project: &str, compose_file: &Path, env_file: &Path) -> Result<()> {
        let mut c = self.command(project, compose_file, env_file);
        c.args(["up", "-d", "--remove-orphans"]);
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
