//! The upgrade contract, live: `install` of a newer bundle over a running site backs it up first
//! into TARGET/backups (`--no-backup` skips it), keeps the last `[backup] keep`, refuses in
//! preflight when the backup would not fit, and when the upgrade fails on health says how to go
//! back (the previous bundle, named by its id, and the backup); that command, run as written,
//! brings the site back.

use crate::harness::{bkbundle, ensure_demo_images, repo_root};
use crate::install::Project;
use crate::pack::{bk, demo_bundle, run, Run};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The demo recipe copied into `p`'s directory as bundle version `version` (the bundle's own
/// version only: its packages keep theirs), its compose file passed through `edit`, packed.
fn demo_version(p: &Project, version: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let demo = repo_root().join("examples/demo");
    let copy = p.path(&format!("demo-{version}"));
    fs::create_dir_all(copy.join("stack")).unwrap();
    for f in ["env.template", "server-schema.sql"] {
        fs::copy(demo.join("stack").join(f), copy.join("stack").join(f)).unwrap();
    }
    let compose = fs::read_to_string(demo.join("stack/docker-compose.yml")).unwrap();
    fs::write(copy.join("stack/docker-compose.yml"), edit(&compose)).unwrap();
    let recipe = fs::read_to_string(demo.join("recipe.toml")).unwrap();
    assert!(recipe.contains("\nversion = \"1.0.0\"\n"), "the demo recipe changed");
    let recipe = recipe.replacen("\nversion = \"1.0.0\"\n", &format!("\nversion = \"{version}\"\n"), 1);
    fs::write(copy.join("recipe.toml"), recipe).unwrap();
    let bundle = p.path(&format!("demo-{version}.bkb"));
    let packed = bk(&[
        "pack",
        copy.join("recipe.toml").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
    ]);
    assert_eq!(packed.code, 0, "{}", packed.stderr);
    bundle
}

/// The demo's install config for `p`, with `extra` appended (a `[backup]` section).
fn config(p: &Project, extra: &str) -> PathBuf {
    let cfg = p.config(
        180,
        "HOST_IP = \"192.0.2.10\"\nSERVER_URL = \"http://192.0.2.10:18080\"",
    );
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str(extra);
    fs::write(&cfg, text).unwrap();
    cfg
}

/// The demo 1.0.0 installed into `p`, with a marker table the platform knows nothing about.
fn installed(p: &Project, cfg: &Path) {
    let r = p.install(demo_bundle(), cfg, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    p.stack_psql("create table bk_marker (id int primary key, note text); insert into bk_marker values (1, 'before the upgrade')");
}

/// The backups in TARGET/backups, oldest first (their names sort by time).
fn backups(target: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = fs::read_dir(target.join("backups"))
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    all.retain(|p| p.extension().is_some_and(|x| x == "bkbak"));
    all.sort();
    all
}

fn journal(target: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(target.join(".bkbundle/journal.json")).unwrap()).unwrap()
}

/// `backup inspect --json` of `file`: its manifest.
fn inspect(file: &Path) -> serde_json::Value {
    let r = bk(&["backup", "inspect", file.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["manifest"].clone()
}

/// The project's containers: name, id and start time (a recreated or restarted one differs).
fn containers(p: &Project) -> Vec<String> {
    let r = run(Command::new("bash").arg("-c").arg(format!(
        "docker ps -aq --filter label=com.docker.compose.project={} | xargs -r docker inspect -f '{{{{.Name}}}} {{{{.Id}}}} {{{{.State.StartedAt}}}} {{{{.State.Status}}}}' | sort",
        p.name
    )));
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout.lines().map(str::to_string).collect()
}

fn upgraded(r: &Run, version: &str) {
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with(&format!("installed demo {version} ")),
        "{}",
        r.stdout
    );
}

/// A tmpfs of 1 MiB mounted on `dir` until dropped.
struct TinyMount(PathBuf);

impl TinyMount {
    fn new(dir: &Path) -> TinyMount {
        fs::create_dir_all(dir).unwrap();
        let m = run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", dir.to_str().unwrap()]));
        assert_eq!(m.code, 0, "mount: {}", m.stderr);
        TinyMount(dir.to_path_buf())
    }
}

impl Drop for TinyMount {
    fn drop(&mut self) {
        let _ = run(Command::new("umount").arg(&self.0));
    }
}

#[test]
fn an_upgrade_is_backed_up_first_and_the_last_n_backups_are_kept() {
    ensure_demo_images();
    let p = Project::new();
    let target = p.target();
    let cfg = config(&p, "[backup]\nkeep = 2\n");
    installed(&p, &cfg);
    let tables = p.stack_psql("select count(*) from information_schema.tables where table_schema = 'public'");
    let first_id = journal(&target)["bundle"]["manifest_sha256"].clone();

    // 1. The upgrade to 1.0.1: backed up first, into TARGET/backups, as the report says.
    let v101 = demo_version(&p, "1.0.1", str::to_string);
    let dry = p.install(&v101, &cfg, &["--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(
        dry.stdout.contains(&format!(
            "backup first: the site as it runs demo 1.0.0, into {}/backups (up to ",
            target.display()
        )),
        "{}",
        dry.stdout
    );
    assert!(backups(&target).is_empty(), "a dry run takes no backup");
    let r = p.install(&v101, &cfg, &[]);
    upgraded(&r, "1.0.1");
    let taken = backups(&target);
    assert_eq!(taken.len(), 1, "{taken:?}");
    let file = taken[0].display().to_string();
    assert!(
        r.stdout.contains(&format!(
            "the site as it ran demo 1.0.0 was backed up to {file} before the upgrade"
        )),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("backup") && l.contains(&file)),
        "the backup step is in the report: {}",
        r.stdout
    );
    let m = inspect(&taken[0]);
    assert_eq!(m["bundle"]["name"], "demo");
    assert_eq!(m["bundle"]["version"], "1.0.0");
    assert_eq!(m["bundle"]["manifest_sha256"], first_id);
    assert!(
        m["objects"].as_array().is_some_and(|o| o.len() >= 5),
        "the stack's NATS objects are in it: {}",
        m["objects"]
    );
    let dumps = m["database"]["dumps"].as_array().unwrap();
    let bklite = dumps
        .iter()
        .find(|d| d["name"] == "bklite")
        .expect("the bklite database");
    assert_eq!(
        bklite["tables"].to_string(),
        tables,
        "the dump holds every table, the marker's too"
    );
    let text = bk(&["backup", "inspect", &file]);
    assert!(
        text.stdout.contains("needs the bundle demo 1.0.0 (id "),
        "{}",
        text.stdout
    );
    assert_eq!(journal(&target)["bundle"]["version"], "1.0.1");
    assert_eq!(p.stack_psql("select note from bk_marker"), "before the upgrade");

    // The same bundle again: already installed, no second backup.
    let again = p.install(&v101, &cfg, &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stdout.starts_with("already installed: demo 1.0.1"),
        "{}",
        again.stdout
    );
    assert_eq!(backups(&target), taken);

    // 2. keep = 2: after two more upgrades, the two newest backups (of 1.0.1 and 1.0.2).
    let v102 = demo_version(&p, "1.0.2", str::to_string);
    let v103 = demo_version(&p, "1.0.3", str::to_string);
    upgraded(&p.install(&v102, &cfg, &[]), "1.0.2");
    assert_eq!(backups(&target).len(), 2);
    let r = p.install(&v103, &cfg, &[]);
    upgraded(&r, "1.0.3");
    let kept = backups(&target);
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(!kept.contains(&taken[0]), "the oldest was removed: {kept:?}");
    assert!(
        r.stdout.contains(&format!("removed the old backup {file}")),
        "{}",
        r.stdout
    );
    let versions: Vec<String> = kept
        .iter()
        .map(|b| inspect(b)["bundle"]["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(versions, ["1.0.1", "1.0.2"]);

    // --no-backup: none taken, and the report says so.
    let v104 = demo_version(&p, "1.0.4", str::to_string);
    let r = p.install(&v104, &cfg, &["--no-backup"]);
    upgraded(&r, "1.0.4");
    assert_eq!(backups(&target), kept);
    assert!(
        r.stdout
            .contains("no backup was taken before the upgrade from demo 1.0.3 (--no-backup)"),
        "{}",
        r.stdout
    );

    // 4. No room for the backup (a 1 MiB tmpfs on TARGET/backups): refused before anything
    // changes, a dry run included; the journal and the containers are as they were.
    let journal_before = fs::read(target.join(".bkbundle/journal.json")).unwrap();
    let running = containers(&p);
    let (dry, r) = {
        let _tiny = TinyMount::new(&target.join("backups"));
        (p.install(&v103, &cfg, &["--dry-run"]), p.install(&v103, &cfg, &[]))
    };
    for r in [&dry, &r] {
        assert_eq!(r.code, 8, "{}\n{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains("preflight found") && r.stderr.contains("nothing was changed"),
            "{}",
            r.stderr
        );
        let finding = format!(
            "  - the backup before the upgrade from demo 1.0.4: not enough space for the backup in {}/backups: up to ",
            target.display()
        );
        assert!(
            r.stderr.contains(&finding) && r.stderr.contains("MiB needed (") && r.stderr.contains("), 1.0 MiB free"),
            "{}",
            r.stderr
        );
        assert!(!r.stderr.contains("loading"), "{}", r.stderr);
    }
    assert!(r.stderr.contains("--no-backup"), "{}", r.stderr);
    assert_eq!(fs::read(target.join(".bkbundle/journal.json")).unwrap(), journal_before);
    assert_eq!(containers(&p), running);
    assert_eq!(backups(&target), kept, "the backups under the mount are untouched");
}

#[test]
fn a_failed_upgrade_says_how_to_go_back_and_that_command_works() {
    ensure_demo_images();
    let p = Project::new();
    let target = p.target();
    let cfg = config(&p, "");
    installed(&p, &cfg);
    let before = journal(&target)["bundle"].clone();

    // 1.0.1's web service never becomes healthy: install fails at its health step.
    let broken = demo_version(&p, "1.0.1", |compose| {
        let (head, web) = compose.split_once("\n  web:\n").unwrap();
        let web = web.replacen(
            "test: [\"CMD\", \"/bin/sh\", \"-c\", \"wget -q -O- http://127.0.0.1:8080/ >/dev/null\"]",
            "test: [\"CMD\", \"/bin/false\"]",
            1,
        );
        assert!(web.contains("/bin/false"));
        format!("{head}\n  web:\n{web}")
    });
    let r = p.install(&broken, &cfg, &["--timeout", "20"]);
    assert_eq!(r.code, 9, "{}\n{}", r.stdout, r.stderr);
    let taken = backups(&target);
    assert_eq!(taken.len(), 1, "{taken:?}");
    let hint = r
        .stderr
        .lines()
        .find(|l| l.starts_with("hint: ") && l.contains("bkbundle restore"))
        .unwrap_or_else(|| panic!("no hint to go back: {}", r.stderr));
    assert!(
        hint.contains(&format!(
            "bundle demo 1.0.0, id {}",
            before["manifest_sha256"].as_str().unwrap()
        )),
        "{hint}"
    );
    assert!(hint.contains(&taken[0].display().to_string()), "{hint}");
    assert!(hint.contains(&format!("--config {}", cfg.display())), "{hint}");
    assert_eq!(journal(&target)["bundle"]["version"], "1.0.1");

    // The hint's command, as written, with the previous bundle's path for PREVIOUS.bkb.
    let command = &hint[hint.find("bkbundle restore").unwrap()..];
    let command = command.split("   (").next().unwrap().trim();
    let args: Vec<String> = command
        .split_whitespace()
        .skip(1)
        .map(|a| match a {
            "PREVIOUS.bkb" => demo_bundle().display().to_string(),
            a => a.to_string(),
        })
        .collect();
    assert!(args.iter().any(|a| a == demo_bundle().to_str().unwrap()), "{command}");
    let back = run(bkbundle().args(&args));
    assert_eq!(back.code, 0, "`{command}`:\n{}\n{}", back.stdout, back.stderr);

    // Healthy on 1.0.0 again, with the marker, the journal naming the previous bundle.
    let ps = p.containers();
    assert_eq!(ps.iter().filter(|c| c.contains("(healthy)")).count(), 4, "{ps:?}");
    assert_eq!(p.stack_psql("select note from bk_marker"), "before the upgrade");
    assert_eq!(journal(&target)["bundle"], before);
    let again = p.install(demo_bundle(), &cfg, &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stdout.starts_with("already installed: demo 1.0.0"),
        "{}",
        again.stdout
    );
}
