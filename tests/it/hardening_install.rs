//! Issue 11, items 3, 5, 6 and the install messages of item 11, against the real Docker engine
//! and docker-compose: preflight's staging keeps the secrets private and leaves nothing behind; a
//! stack without an env template installs (and is still checked); nothing is built or pulled;
//! containers compose would remove are announced; errors say what really happened.

use crate::harness::{bkbundle, docker_lock, ensure_demo_images, free_port, random_alnum};
use crate::install::{compose_with, pack_stack, Project};
use crate::pack::{bk, run, Run};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Pack a stack of `compose` (and an env template when given) with `images` and any further
/// recipe text (e.g. `[regions]`); returns pack's run and the bundle's path.
fn pack_recipe(dir: &Path, compose: &str, template: Option<&str>, images: &[&str], more: &str) -> (Run, PathBuf) {
    let stack = dir.join(format!("stack-{}", random_alnum(6)));
    fs::create_dir_all(&stack).unwrap();
    fs::write(stack.join("docker-compose.yml"), compose).unwrap();
    let mut recipe = "format = 1\n[bundle]\nname = \"h\"\nversion = \"1\"\n".to_string();
    for i in images {
        recipe.push_str(&format!("[[images]]\nref = \"{i}\"\npull = false\n"));
    }
    recipe.push_str(&format!(
        "[stack]\ndir = \"{}\"\ncompose = \"docker-compose.yml\"\n",
        stack.display()
    ));
    if let Some(t) = template {
        fs::write(stack.join("env.template"), t).unwrap();
        recipe.push_str("env_template = \"env.template\"\n");
    }
    recipe.push_str(more);
    let rp = stack.with_extension("toml");
    fs::write(&rp, recipe).unwrap();
    let out = stack.with_extension("bkb");
    (bk(&["pack", rp.to_str().unwrap(), "-o", out.to_str().unwrap()]), out)
}

/// A web service published on a literal port (no variables: works without an env template).
fn web_on(port: u16) -> String {
    format!(
        "version: \"2.4\"\nservices:\n  web:\n    image: bkbundle-demo/web:1\n    ports: [\"127.0.0.1:{port}:8080\"]\n    healthcheck:\n      test: [\"CMD\", \"/bin/sh\", \"-c\", \"wget -q -O- http://127.0.0.1:8080/ >/dev/null\"]\n      interval: 1s\n      retries: 30\n"
    )
}

/// A `docker-compose` wrapper first in PATH that logs its arguments and, for `--env-file F`, the
/// modes and paths of F and its directory, then runs the real one.
struct ComposeSpy {
    dir: tempfile::TempDir,
}

impl ComposeSpy {
    fn new() -> ComposeSpy {
        let dir = tempfile::tempdir().unwrap();
        let real = ["/usr/bin/docker-compose", "/usr/local/bin/docker-compose"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("docker-compose (v1) is installed: scripts/setup.sh");
        let log = dir.path().join("log");
        let script = format!(
            "#!/bin/bash\nprev=\nfor a in \"$@\"; do\n  if [ \"$prev\" = --env-file ]; then\n    stat -c 'MODE %a %n' \"$(dirname \"$a\")\" \"$a\" >> {log} 2>&1\n  fi\n  prev=$a\ndone\necho \"ARGS $*\" >> {log}\nexec {real} \"$@\"\n",
            log = log.display()
        );
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        fs::write(bin.join("docker-compose"), script).unwrap();
        fs::set_permissions(bin.join("docker-compose"), fs::Permissions::from_mode(0o755)).unwrap();
        ComposeSpy { dir }
    }
    fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }
    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
    fn clear(&self) {
        let _ = fs::remove_file(self.dir.path().join("log"));
    }
}

/// `install` of `bundle` into `p` with `extra` arguments, PATH starting at `spy`'s wrapper and
/// TMPDIR at `tmp`.
fn install_with(p: &Project, bundle: &Path, cfg: &Path, spy: &ComposeSpy, tmp: &Path, extra: &[&str]) -> Run {
    let mut c = bkbundle();
    c.args([
        "install",
        bundle.to_str().unwrap(),
        "--target",
        p.target().to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ])
    .args(extra)
    .env("PATH", spy.path_env())
    .env("TMPDIR", tmp);
    run(&mut c)
}

/// Every file under `dir` whose content contains `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            out.extend(files_containing(&p, needle));
        } else if m.is_file()
            && m.len() < (1 << 20)
            && String::from_utf8_lossy(&fs::read(&p).unwrap_or_default()).contains(needle)
        {
            out.push(p);
        }
    }
    out
}

fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// The `MODE` lines the spy logged: (mode, path) of each staged env file and its directory.
fn staged(log: &str) -> Vec<(String, PathBuf)> {
    log.lines()
        .filter_map(|l| l.strip_prefix("MODE "))
        .map(|l| {
            let (m, p) = l.split_once(' ').unwrap();
            (m.to_string(), PathBuf::from(p))
        })
        .collect()
}

#[test]
fn preflight_stages_secrets_privately_and_leaves_none_behind() {
    let _g = docker_lock();
    ensure_demo_images();
    let p = Project::new();
    let spy = ComposeSpy::new();
    let tmp = tempfile::tempdir().unwrap();
    let bundle = pack_stack(p.dir.path(), "stage", "1", &["bkbundle-demo/web:1"], &compose_with(""));
    let cfg = p.config(60, "");

    // A dry run on a new target: an unpredictable private directory in TMPDIR, gone afterwards.
    let dry = install_with(&p, &bundle, &cfg, &spy, tmp.path(), &["--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    let s = staged(&spy.log());
    assert_eq!(s.len(), 2, "{}", spy.log());
    let (dmode, dpath) = &s[0];
    let (fmode, fpath) = &s[1];
    assert_eq!((dmode.as_str(), fmode.as_str()), ("700", "600"), "{}", spy.log());
    assert_eq!(fpath.file_name().unwrap(), ".env");
    let name = dpath.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        dpath.parent() == Some(tmp.path()) && name.starts_with("bkbundle-preflight-") && name.len() >= 26,
        "an unpredictable name in TMPDIR: {}",
        dpath.display()
    );
    assert!(!p.target().exists(), "a dry run creates nothing");
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing left in TMPDIR");

    // The install, then a dry run on the live install: staged in the target's 0700 state dir.
    spy.clear();
    let real = install_with(&p, &bundle, &cfg, &spy, tmp.path(), &[]);
    assert_eq!(real.code, 0, "{}", real.stderr);
    let secret = fs::read_to_string(p.target().join(".env"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("SECRET=").map(str::to_string))
        .unwrap();
    spy.clear();
    // Leftovers of killed runs (their pids are gone) in both places.
    let dead = dead_pid();
    let state = p.target().join(".bkbundle");
    let left_in_target = state.join(format!("staging-{dead}"));
    let left_in_tmp = tmp.path().join(format!("bkbundle-preflight-{dead}-AbC123"));
    for d in [&left_in_target, &left_in_tmp] {
        fs::create_dir_all(d).unwrap();
        fs::write(d.join(".env"), format!("SECRET={secret}\n")).unwrap();
    }
    let changed = p.config(60, ""); // new ports: the dry run has something to show
    let live = install_with(&p, &bundle, &changed, &spy, tmp.path(), &["--dry-run"]);
    assert_eq!(live.code, 0, "{}", live.stderr);
    let s = staged(&spy.log());
    assert_eq!(s.len(), 2, "{}", spy.log());
    assert_eq!(s[0].0, "700");
    assert_eq!(s[1].0, "600");
    assert!(
        s[0].1.parent() == Some(state.as_path())
            && s[0].1.file_name().unwrap().to_string_lossy().starts_with("staging-"),
        "staged in the target's state dir: {}",
        s[0].1.display()
    );
    assert_eq!(
        fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700,
        "the state dir is private"
    );
    assert!(
        !left_in_target.exists(),
        "a dead run's staging in the target is removed"
    );
    assert!(!left_in_tmp.exists(), "a dead run's staging in TMPDIR is removed");
    let staging_left: Vec<_> = fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("staging-"))
        .collect();
    assert!(staging_left.is_empty(), "{staging_left:?}");
    assert!(files_containing(tmp.path(), &secret).is_empty());
    let mut in_tmp: Vec<PathBuf> = Vec::new();
    for e in fs::read_dir("/tmp").unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("bkbundle-preflight-") {
            in_tmp.extend(files_containing(&e.path(), &secret));
        }
    }
    assert!(in_tmp.is_empty(), "no secret staged in /tmp: {in_tmp:?}");
}

#[test]
fn a_stack_without_env_template_is_checked_and_installs() {
    let _g = docker_lock();
    ensure_demo_images();
    let p = Project::new();
    let port = free_port();
    let (packed, bundle) = pack_recipe(p.dir.path(), &web_on(port), None, &["bkbundle-demo/web:1"], "");
    assert_eq!(packed.code, 0, "{}", packed.stderr);
    let cfg = p.config(60, "");
    // Preflight still checks compose and ports: a taken port is found.
    let holder = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let r = p.install(&bundle, &cfg, &["--dry-run"]);
    assert_eq!(r.code, 8, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains(&format!("port {port}/tcp (service web) on 127.0.0.1 is already in use")),
        "{}",
        r.stderr
    );
    drop(holder);
    let r = p.install(&bundle, &cfg, &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        p.containers().iter().any(|c| c.contains("(healthy)")),
        "{:?}",
        p.containers()
    );
    let again = p.install(&bundle, &cfg, &["--json"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.stdout.contains("\"already_installed\": true"), "{}", again.stdout);
}

#[test]
fn pack_refuses_a_stack_that_would_build_or_pull() {
    ensure_demo_images();
    let d = tempfile::tempdir().unwrap();
    let web = "bkbundle-demo/web:1";
    for (compose, needle) in [
        (
            "services:\n  web:\n    image: bkbundle-demo/web:1\n  b:\n    build: .\n",
            "service b has `build:`",
        ),
        (
            "services:\n  web:\n    image: bkbundle-demo/web:1\n    pull_policy: always\n",
            "service web has `pull_policy: always`",
        ),
        (
            "services:\n  web:\n    image: bkbundle-demo/web:1\n  cache:\n    image: redis:7\n",
            "service cache uses image redis:7, which the bundle does not carry",
        ),
        (
            "services:\n  web:\n    image: bkbundle-demo/web:${TAG}\n",
            "image bkbundle-demo/web:${TAG} depends on TAG",
        ),
    ] {
        let (r, out) = pack_recipe(d.path(), compose, None, &[web], "");
        assert_eq!(r.code, 3, "{compose}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{compose}: {}", r.stderr);
        assert!(r.stderr.contains("hint:"), "{}", r.stderr);
        assert!(!out.exists());
    }
    // Variables the env template sets resolve, as compose resolves them on the host.
    let (r, _) = pack_recipe(
        d.path(),
        "services:\n  web:\n    image: bkbundle-demo/web:${TAG}\n",
        Some("TAG=1\n"),
        &[web],
        "",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn preflight_refuses_to_build_or_pull_and_up_is_told_not_to() {
    let _g = docker_lock();
    ensure_demo_images();
    let p = Project::new();
    let spy = ComposeSpy::new();
    let tmp = tempfile::tempdir().unwrap();
    let bundle = pack_stack(p.dir.path(), "off", "1", &["bkbundle-demo/web:1"], &compose_with(""));
    let cfg = p.config(60, "");
    let r = install_with(&p, &bundle, &cfg, &spy, tmp.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let log = spy.log();
    let ups: Vec<&str> = log.lines().filter(|l| l.contains(" up ")).collect();
    assert_eq!(ups.len(), 1, "{}", spy.log());
    assert!(ups[0].ends_with("up -d --remove-orphans --no-build"), "{}", ups[0]);

    // The operator's edited compose file is used as it is: preflight checks it too.
    let compose = p.target().join("docker-compose.yml");
    let mine = fs::read_to_string(&compose).unwrap();
    for (edit, needle) in [
        (
            "  b:\n    build: .\n    image: local/b:1\n",
            "offline: service b has `build:`",
        ),
        (
            "  c:\n    image: bkbundle-test/absent:1\n",
            "offline: service c uses image bkbundle-test/absent:1, which the bundle does not carry",
        ),
        (
            "  d:\n    image: bkbundle-demo/app:1\n    pull_policy: always\n",
            "offline: service d has `pull_policy: always`",
        ),
    ] {
        fs::write(&compose, format!("{mine}{edit}")).unwrap();
        let r = p.install(&bundle, &p.config(60, ""), &["--dry-run"]);
        assert_eq!(r.code, 8, "{edit}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{edit}: {}", r.stderr);
    }
    // An image the bundle lacks but the engine has (by reference) is fine.
    fs::write(&compose, format!("{mine}  e:\n    image: bkbundle-demo/app:1\n")).unwrap();
    let r = p.install(&bundle, &p.config(60, ""), &["--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn preflight_warns_of_containers_compose_would_remove() {
    let _g = docker_lock();
    ensure_demo_images();
    let p = Project::new();
    let bundle = pack_stack(p.dir.path(), "orph", "1", &["bkbundle-demo/web:1"], &compose_with(""));
    let cfg = p.config(60, "");
    // A container of another compose file in the same project (Project's drop removes it).
    let name = format!("{}-stranger", p.name);
    let started = run(Command::new("docker").args([
        "run",
        "-d",
        "--name",
        &name,
        "--label",
        &format!("com.docker.compose.project={}", p.name),
        "--label",
        "com.docker.compose.service=stranger",
        "bkbundle-demo/app:1",
    ]));
    assert_eq!(started.code, 0, "{}", started.stderr);
    let dry = p.install(&bundle, &cfg, &["--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(
        dry.stdout.contains(&format!(
            "warning: compose project {} has container {name} (service stranger), which this stack does not define and bkbundle did not create; `up --remove-orphans` will remove it",
            p.name
        )),
        "{}",
        dry.stdout
    );
    // Our own services are no such warning after an install.
    let _ = run(Command::new("docker").args(["rm", "-f", &name]));
    assert_eq!(p.install(&bundle, &cfg, &[]).code, 0);
    let again = p.install(&bundle, &p.config(60, ""), &["--dry-run"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(!again.stdout.contains("warning:"), "{}", again.stdout);
}

#[test]
fn an_unreachable_docker_exits_6() {
    ensure_demo_images();
    let p = Project::new();
    let bundle = pack_stack(
        p.dir.path(),
        "nodocker",
        "1",
        &["bkbundle-demo/web:1"],
        &compose_with(""),
    );
    let cfg = p.config(60, "");
    let r = run(bkbundle()
        .args([
            "install",
            bundle.to_str().unwrap(),
            "--target",
            p.target().to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--dry-run",
        ])
        .env("DOCKER_HOST", format!("unix://{}/no.sock", p.dir.path().display())));
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("cannot reach the Docker engine"), "{}", r.stderr);
}

#[test]
fn a_layout_failure_is_recorded_as_failed_in_the_journal() {
    let _g = docker_lock();
    ensure_demo_images();
    let p = Project::new();
    let bundle = pack_stack(p.dir.path(), "lay", "1", &["bkbundle-demo/web:1"], &compose_with(""));
    let cfg = p.config(60, "");
    // A directory where the compose file goes: laying it out fails.
    fs::create_dir_all(p.target().join("docker-compose.yml")).unwrap();
    let r = p.install(&bundle, &cfg, &[]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    let j: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(p.target().join(".bkbundle/journal.json")).unwrap()).unwrap();
    let last = j["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["outcome"], "failed: layout", "{j}");
    assert!(last["finished"].is_string(), "{j}");
    assert!(p.containers().is_empty());
}

#[test]
fn a_failure_after_the_stack_started_does_not_claim_nothing_changed() {
    let _g = docker_lock();
    ensure_demo_images();
    let p = Project::new();
    let (packed, bundle) = pack_recipe(
        p.dir.path(),
        &compose_with(""),
        Some("WEB_PORT=18080\n"),
        &["bkbundle-demo/web:1"],
        "[regions]\nrequired = [\"NODE_SERVER_URL\"]\n[regions.env]\nNODE_SERVER_URL = \"http://192.0.2.1:18080\"\n",
    );
    assert_eq!(packed.code, 0, "{}", packed.stderr);
    // The platform database is somewhere nothing listens: the regions step fails after `up`.
    let cfg = p.config(
        60,
        &format!(
            "[database]\nurl = \"postgres://postgres:x@127.0.0.1:{}/bklite\"\nmigrations_timeout_secs = 1",
            free_port()
        ),
    );
    let r = p.install(&bundle, &cfg, &[]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("cannot reach PostgreSQL"), "{}", r.stderr);
    assert!(!r.stderr.contains("nothing was changed"), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "install stopped at its regions step: it had already loaded the images, laid out {} and started compose project {}",
            p.target().display(),
            p.name
        )),
        "{}",
        r.stderr
    );
    assert!(!p.containers().is_empty(), "the stack was started");
}
