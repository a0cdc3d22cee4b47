//! Issue 11, item 2: two operators at once. Two `install` runs started together on one target,
//! many times: one installs, the other either waits for it and finds the stack installed or gives
//! up naming the holder (exit 11); afterwards the stack is healthy and exactly one set of secrets
//! was generated. A stale lock is taken over; a dry run takes no lock.

use crate::harness::{bkbundle, docker_lock, ensure_demo_images};
use crate::install::{compose_with, pack_stack, Project};
use crate::pack::{demo_bundle, run};
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn spawn_install(p: &Project, bundle: &Path, cfg: &Path, lock_wait: u64) -> std::process::Child {
    bkbundle()
        .args([
            "--json",
            "install",
            bundle.to_str().unwrap(),
            "--target",
            p.target().to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .env("BKBUNDLE_LOCK_WAIT", lock_wait.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn env_value(p: &Project, key: &str) -> String {
    let env = fs::read_to_string(p.target().join(".env")).unwrap();
    let values: Vec<&str> = env.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).collect();
    assert_eq!(values.len(), 1, "one {key} in .env: {env}");
    values[0].to_string()
}

/// Start two installs together and check the outcome: one generated the secrets, the other
/// waited and found the stack installed, or refused naming the first. Returns the outputs.
fn race(p: &Project, bundle: &Path, cfg: &Path, lock_wait: u64, what: &str) -> [(u32, Output); 2] {
    let a = spawn_install(p, bundle, cfg, lock_wait);
    let b = spawn_install(p, bundle, cfg, lock_wait);
    let (pa, pb) = (a.id(), b.id());
    let outs = [(pa, a.wait_with_output().unwrap()), (pb, b.wait_with_output().unwrap())];
    let mut generated = 0;
    let mut installed = 0;
    for (i, (pid, o)) in outs.iter().enumerate() {
        let other = outs[1 - i].0;
        let code = o.status.code().unwrap_or(-1);
        match code {
            0 => {
                installed += 1;
                let j: serde_json::Value = serde_json::from_slice(&o.stdout)
                    .unwrap_or_else(|e| panic!("{what}: pid {pid}: not JSON ({e}): {}", text(o)));
                if !j["plan"]["env_generated"].as_array().unwrap().is_empty() {
                    generated += 1;
                }
            }
            11 => {
                // The loser names the holder: its pid, command and start time, and what to do.
                let t = text(o);
                assert!(
                    t.contains(&format!("is locked by another bkbundle run: pid {other} (`"))
                        && t.contains(" install ")
                        && t.contains("started 20")
                        && t.contains("--lock-wait"),
                    "{what}: the refusal of pid {pid} names the holder {other}: {t}"
                );
            }
            _ => panic!("{what}: pid {pid} exited {code}: {}", text(o)),
        }
    }
    assert!(installed >= 1, "{what}: one of the two installs succeeded");
    assert_eq!(
        generated,
        1,
        "{what}: exactly one run generated secrets:\n{}\n---\n{}",
        text(&outs[0].1),
        text(&outs[1].1)
    );
    // Afterwards the stack is healthy: a third run finds it installed.
    let again = p.install(bundle, cfg, &["--json"]);
    assert_eq!(again.code, 0, "{what}: {}", again.stderr);
    let j: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(j["already_installed"], true, "{what}: {}", again.stdout);
    assert!(
        !p.target().join(".env.bkbundle-new").exists(),
        "{what}: no second .env was written beside"
    );
    outs
}

#[test]
fn two_installs_started_together_leave_one_healthy_stack_and_one_set_of_secrets() {
    let _g = docker_lock();
    ensure_demo_images();
    // The app service gets the generated secret: had the second run written its own .env after
    // the first started the stack, the running container and the .env would disagree.
    let extra = "  app:\n    image: bkbundle-demo/app:1\n    environment:\n      SECRET: ${SECRET}\n";
    let dir = tempfile::tempdir().unwrap();
    let bundle = pack_stack(
        dir.path(),
        "race",
        "1",
        &["bkbundle-demo/web:1", "bkbundle-demo/app:1"],
        &compose_with(extra),
    );
    let mut refused = 0;
    for round in 0..6 {
        let p = Project::new();
        let cfg = p.config(120, "");
        // Short waits make the loser give up; long ones make it wait, plan again and find the
        // stack installed.
        let wait = if round % 2 == 0 { 1 } else { 120 };
        let what = format!("round {round} (--lock-wait {wait})");
        let outs = race(&p, &bundle, &cfg, wait, &what);
        refused += outs.iter().filter(|(_, o)| o.status.code() == Some(11)).count();
        let secret = env_value(&p, "SECRET");
        let id = run(Command::new("docker").args([
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.compose.project={}", p.name),
            "--filter",
            "label=com.docker.compose.service=app",
        ]));
        let ids: Vec<&str> = id.stdout.split_whitespace().collect();
        assert_eq!(ids.len(), 1, "{what}: one app container: {:?}", p.containers());
        let env =
            run(Command::new("docker").args(["inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", ids[0]]));
        assert!(
            env.stdout.lines().any(|l| l == format!("SECRET={secret}")),
            "{what}: the running stack uses the .env's secret"
        );
        assert_eq!(p.containers().len(), 2, "{what}: no duplicates: {:?}", p.containers());
    }
    assert!(
        refused >= 1,
        "at least one short wait ended in a refusal naming the holder"
    );
}

#[test]
fn two_demo_installs_started_together_seed_with_the_one_generated_password() {
    let _g = docker_lock();
    ensure_demo_images();
    let p = Project::new();
    let cfg = p.config(
        300,
        "HOST_IP = \"192.0.2.10\"\nSERVER_URL = \"http://192.0.2.10:18080\"",
    );
    race(&p, demo_bundle(), &cfg, 600, "demo");
    // The database was initialised with the password in .env, and the regions and packages were
    // seeded through it once.
    let rows = run(Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &env_value(&p, "POSTGRES_PORT"),
            "-U",
            "postgres",
            "-d",
            "bklite",
            "-Atc",
        ])
        .arg("select count(*) from node_mgmt_packageversion")
        .env("PGPASSWORD", env_value(&p, "POSTGRES_PASSWORD")));
    assert_eq!(rows.code, 0, "{}", rows.stderr);
    assert_eq!(rows.stdout.trim(), "6", "every package row exists once");
    assert_eq!(p.containers().len(), 5, "{:?}", p.containers());
}

#[test]
fn a_stale_lock_is_taken_over_and_a_held_one_refused_while_a_dry_run_goes_ahead() {
    let _g = docker_lock();
    ensure_demo_images();
    let p = Project::new();
    let bundle = pack_stack(p.dir.path(), "stale", "1", &["bkbundle-demo/web:1"], &compose_with(""));
    let cfg = p.config(60, "");
    // A record left by a run that was killed (its pid is gone).
    let mut c = Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let state = p.target().join(".bkbundle");
    fs::create_dir_all(&state).unwrap();
    fs::write(
        state.join("install.lock"),
        format!(
            "{{\"pid\":{dead},\"started\":\"2026-01-01T00:00:00Z\",\"command\":\"bkbundle install killed.bkb\",\"what\":\"x\"}}"
        ),
    )
    .unwrap();
    let r = p.install(&bundle, &cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(&format!(
            "took over the lock {} left by pid {dead} (`bkbundle install killed.bkb`)",
            state.join("install.lock").display()
        )),
        "{}",
        r.stdout
    );
    assert_eq!(
        fs::read(state.join("install.lock")).unwrap().len(),
        0,
        "released cleanly at the end"
    );

    // A lock held by another process: install waits its --lock-wait, then refuses (exit 11);
    // a dry run changes nothing and takes no lock.
    let mut holder = Command::new("flock")
        .args([state.join("install.lock").to_str().unwrap(), "sleep", "60"])
        .spawn()
        .expect("flock(1) from util-linux");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let dry = p.install(&bundle, &cfg, &["--dry-run", "--lock-wait", "1"]);
    // Findings while another run holds the lock may be its work in progress: said so.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = fs::read_to_string(&cfg).unwrap();
    let busy_port = p.dir.path().join("busy-port.toml");
    fs::write(
        &busy_port,
        text.lines()
            .map(|l| {
                if l.starts_with("WEB_PORT") {
                    format!("WEB_PORT = \"{port}\"")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let findings = p.install(&bundle, &busy_port, &["--dry-run"]);
    drop(taken);
    let t = std::time::Instant::now();
    let busy = p.install(&bundle, &cfg, &["--lock-wait", "2"]);
    let took = t.elapsed();
    // A changed config makes the second run want to change something (not "already installed").
    let changed = p.config(61, "");
    let busy2 = p.install(&bundle, &changed, &["--lock-wait", "2"]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert_eq!(findings.code, 8, "{}", findings.stderr);
    assert!(
        findings.stderr.contains(&format!(
            "hint: another bkbundle run is changing {} right now",
            p.target().display()
        )),
        "{}",
        findings.stderr
    );
    // Nothing to change: "already installed" needs no lock either.
    assert_eq!(busy.code, 0, "{}", busy.stderr);
    assert!(took < std::time::Duration::from_secs(30));
    assert_eq!(busy2.code, 11, "{}", busy2.stderr);
    assert!(
        busy2.stderr.contains("is locked by another bkbundle run")
            && busy2.stderr.contains("nothing was changed")
            && busy2.stderr.contains("hint:"),
        "{}",
        busy2.stderr
    );
}
