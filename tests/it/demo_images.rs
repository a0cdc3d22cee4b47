//! The demo stack's own PostgreSQL and NATS images, made offline by `scripts/demo-images.sh` from
//! this machine's Debian packages. Each test runs the image with `docker run` on a free loopback
//! port with a generated password and checks it from the host over TCP, as `bkbundle install`
//! (region seeding, package upload) and the agents will use it. Containers and their anonymous
//! volumes are removed by a guard, whatever happens.

use crate::harness::{docker_lock, ensure_demo_images, free_port, random_alnum, repo_root};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const PG_IMAGE: &str = "bkbundle-demo/postgres:15";
const NATS_IMAGE: &str = "bkbundle-demo/nats:2";
const FUSION_IMAGE: &str = "bkbundle-demo/fusion-collector:1";
const PG_HINT: &str = "install PostgreSQL's client with `apt-get install postgresql` (or run scripts/setup.sh)";

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `docker {}`: {e} (run scripts/setup.sh)", args.join(" ")))
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).trim().to_string()
}

fn image_exists(image: &str) -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", image])
        .status
        .success()
}

/// The demo images, PostgreSQL and NATS included; runs scripts/demo-images.sh again when
/// `ensure_demo_images` (which checks app/web/base only) left one of ours missing.
fn ensure_images() {
    ensure_demo_images();
    if image_exists(PG_IMAGE) && image_exists(NATS_IMAGE) && image_exists(FUSION_IMAGE) {
        return;
    }
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/demo-images.sh"))
        .current_dir(repo_root())
        .output()
        .expect("run scripts/demo-images.sh");
    for image in [PG_IMAGE, NATS_IMAGE, FUSION_IMAGE] {
        assert!(
            out.status.success() && image_exists(image),
            "{image} is missing and scripts/demo-images.sh did not build it ({}); run scripts/setup.sh first\n\
             --- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

/// A container this test started; `docker rm -f -v` (container and anonymous volumes) on drop.
struct Container {
    name: String,
    /// Known once `docker run` printed it; removal uses it, else the (unique) name.
    id: Option<String>,
}

impl Container {
    /// `docker run -d` of `image` with `env`, its `container_port` (if any) published on a free
    /// 127.0.0.1 port; retries on a new port when the chosen one was taken meanwhile.
    fn run(what: &str, image: &str, env: &[(&str, &str)], container_port: Option<u16>) -> (Container, u16) {
        Container::run_with(what, image, env, container_port, &[])
    }

    /// [`Container::run`] with more `docker run` options (volumes) before the image.
    fn run_with(
        what: &str,
        image: &str,
        env: &[(&str, &str)],
        container_port: Option<u16>,
        options: &[String],
    ) -> (Container, u16) {
        for _ in 0..5 {
            let port = container_port.map(|_| free_port()).unwrap_or(0);
            let mut c = Container {
                name: format!("bkbundle-it-{what}-{}", random_alnum(12).to_lowercase()),
                id: None,
            };
            let mut cmd = Command::new("docker");
            cmd.args(["run", "-d", "--name", &c.name]);
            if let Some(cp) = container_port {
                cmd.arg("-p").arg(format!("127.0.0.1:{port}:{cp}"));
            }
            for (k, v) in env {
                cmd.arg("-e").arg(format!("{k}={v}"));
            }
            cmd.args(options);
            cmd.arg(image);
            let out = cmd.output().expect("run docker run");
            if out.status.success() {
                c.id = Some(text(&out.stdout));
                return (c, port);
            }
            let err = text(&out.stderr);
            drop(c); // removes a container created but not started
            if err.contains("already in use") || err.contains("already allocated") {
                continue;
            }
            panic!("docker run {image} failed ({}): {err}", out.status);
        }
        panic!("docker run {image}: no free loopback port after 5 tries");
    }

    fn target(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.name)
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", "--tail", "200", self.target()]);
        format!("{}\n{}", text(&out.stdout), text(&out.stderr))
    }

    /// `State.Status` and `State.Health.Status` (empty without a healthcheck).
    fn state(&self) -> (String, String) {
        let out = docker(&[
            "inspect",
            "--format",
            "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
            self.target(),
        ]);
        let s = text(&out.stdout);
        let mut parts = s.splitn(2, ' ');
        (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        )
    }

    /// Waits (bounded) until the image's own healthcheck reports healthy; panics with the logs
    /// when the container exits or the time runs out.
    fn wait_healthy(&self, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, health) = self.state();
            if status == "running" && health == "healthy" {
                return;
            }
            if status == "exited" || status == "dead" {
                panic!(
                    "{what} container exited before it was healthy\n--- logs ---\n{}",
                    self.logs()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what} container not healthy within {timeout:?} (state {status:?}, health {health:?})\n--- logs ---\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits (bounded) for the container to exit and returns its exit code.
    fn wait_exit(&self, what: &str, timeout: Duration) -> i64 {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, _) = self.state();
            if status == "exited" || status == "dead" {
                let out = docker(&["inspect", "--format", "{{.State.ExitCode}}", self.target()]);
                return text(&out.stdout).parse().unwrap_or(-1);
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what} container still {status:?} after {timeout:?}\n--- logs ---\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let target = self.target().to_string();
        let _ = Command::new("docker").args(["rm", "-f", "-v", &target]).output();
    }
}

/// The host's psql (Debian's `postgresql` package), not the pg_wrapper script.
fn psql_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join("bin/psql"))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("psql not found under /usr/lib/postgresql/*/bin: {PG_HINT}"))
}

/// `psql -At` with a connection URL over TCP; `Err(stderr)` when it fails.
fn psql(url: &str, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new(psql_bin());
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGSERVICE",
        "PGSSLMODE",
        "PGOPTIONS",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd
        .env("PGCONNECT_TIMEOUT", "5")
        .env("PGPASSFILE", "/dev/null")
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        .output()
        .unwrap_or_else(|e| panic!("cannot run psql: {e}: {PG_HINT}"));
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!("psql exited with {}: {}", out.status, text(&out.stderr)))
    }
}

/// Retries `psql` until it succeeds (bounded), for right after a restart.
fn psql_eventually(url: &str, sql: &str, timeout: Duration, c: &Container) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        match psql(url, sql) {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!(
                    "psql `{sql}` still failing after {timeout:?}: {e}\n--- logs ---\n{}",
                    c.logs()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn postgres_image_initialises_bklite_and_takes_scram_password_logins_over_tcp() {
    let _lock = docker_lock(); // a running container pins the image: keep image-removing tests out
    ensure_images();
    let password = random_alnum(24);
    let (c, port) = Container::run("pg", PG_IMAGE, &[("POSTGRES_PASSWORD", &password)], Some(5432));
    c.wait_healthy("postgres", Duration::from_secs(90));

    let url = format!("postgres://postgres:{password}@127.0.0.1:{port}/bklite");
    assert_eq!(
        psql(
            &url,
            "select current_database() || ' ' || current_setting('password_encryption') || ' ' \
             || current_setting('server_version_num')::int / 10000"
        )
        .unwrap_or_else(|e| panic!("{e}\n--- logs ---\n{}", c.logs())),
        "bklite scram-sha-256 15"
    );
    assert_eq!(
        psql(
            &url,
            "select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname = 'postgres'"
        )
        .unwrap(),
        "t",
        "the superuser's password is stored as a SCRAM verifier"
    );
    let wrong = format!("postgres://postgres:{}@127.0.0.1:{port}/bklite", random_alnum(24));
    let err = psql(&wrong, "select 1").expect_err("a wrong password must be refused");
    assert!(err.contains("password authentication failed"), "{err}");

    // Data survives a restart, and the entrypoint initialises only once.
    psql(&url, "create table kept (v int); insert into kept values (42)").unwrap();
    let r = docker(&["restart", "-t", "20", c.target()]);
    assert!(r.status.success(), "docker restart: {}", text(&r.stderr));
    assert_eq!(
        psql_eventually(&url, "select v from kept", Duration::from_secs(60), &c),
        "42"
    );
    let logs = c.logs();
    assert_eq!(logs.matches("initialising a new cluster").count(), 1, "{logs}");
    c.wait_healthy("postgres after restart", Duration::from_secs(60));
}

#[test]
fn postgres_image_refuses_to_initialise_without_a_password() {
    let _lock = docker_lock();
    ensure_images();
    let (c, _) = Container::run("pg-nopw", PG_IMAGE, &[], None);
    let code = c.wait_exit("postgres without POSTGRES_PASSWORD", Duration::from_secs(30));
    let logs = c.logs();
    assert_ne!(code, 0, "{logs}");
    assert!(logs.contains("POSTGRES_PASSWORD is not set"), "{logs}");
}

/// The server's first line, which must be `INFO {...}`.
fn nats_info(port: u16) -> String {
    let stream = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to NATS on 127.0.0.1:{port}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("read the INFO line");
    assert!(line.starts_with("INFO {"), "expected an INFO line, got {line:?}");
    line.trim_end().to_string()
}

fn json_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Logs in with `user`/`password` and asks the JetStream API for the account info. `Ok(reply)`
/// with the API's JSON reply, `Err(line)` with the server's `-ERR` line (or why it gave none).
fn nats_login_and_jetstream_info(port: u16, user: &str, password: &str) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("read INFO: {e}"))?;
    let connect = format!(
        "CONNECT {{\"user\":{},\"pass\":{},\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\n\
         SUB _INBOX.bkbundle-it 1\r\nPUB $JS.API.INFO _INBOX.bkbundle-it 0\r\n\r\nPING\r\n",
        json_string(user),
        json_string(password)
    );
    w.write_all(connect.as_bytes())
        .map_err(|e| format!("send CONNECT: {e}"))?;
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Err("connection closed without a reply".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
        let l = line.trim_end();
        if l.starts_with("-ERR") {
            return Err(l.to_string());
        } else if l == "PING" {
            let _ = w.write_all(b"PONG\r\n");
        } else if let Some(rest) = l.strip_prefix("MSG ") {
            let len: usize = rest
                .split_whitespace()
                .last()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("bad MSG line {l:?}"))?;
            let mut payload = vec![0u8; len + 2];
            r.read_exact(&mut payload)
                .map_err(|e| format!("read MSG payload: {e}"))?;
            return Ok(String::from_utf8_lossy(&payload[..len]).into_owned());
        }
        // PONG, +OK, INFO updates: keep reading.
    }
}

#[test]
fn nats_image_has_jetstream_and_requires_the_password() {
    let _lock = docker_lock();
    ensure_images();
    let user = "bklite";
    // All digits: a `$NATS_PASSWORD` reference in nats.conf would be parsed as a number and the
    // server would not start; and one with the characters a config string must escape.
    let digits: String = random_alnum(24).bytes().map(|b| char::from(b'0' + b % 10)).collect();
    let special = format!("{} \"q\\ $x#y", random_alnum(12));
    for password in [digits, special] {
        let (c, port) = Container::run(
            "nats",
            NATS_IMAGE,
            &[("NATS_USER", user), ("NATS_PASSWORD", &password)],
            Some(4222),
        );
        c.wait_healthy("nats", Duration::from_secs(60));

        let info = nats_info(port);
        assert!(info.contains("\"jetstream\":true"), "{info}");
        assert!(info.contains("\"auth_required\":true"), "{info}");

        let reply = nats_login_and_jetstream_info(port, user, &password)
            .unwrap_or_else(|e| panic!("login with password {password:?}: {e}\n--- logs ---\n{}", c.logs()));
        assert!(
            reply.contains("io.nats.jetstream.api.v1.account_info_response") && !reply.contains("\"error\""),
            "JetStream account info: {reply}"
        );

        let err =
            nats_login_and_jetstream_info(port, user, &random_alnum(24)).expect_err("a wrong password must be refused");
        assert!(err.contains("Authorization Violation"), "{err}");
    }
}

#[test]
fn nats_image_refuses_to_start_without_credentials() {
    let _lock = docker_lock();
    ensure_images();
    let (c, _) = Container::run("nats-nopw", NATS_IMAGE, &[("NATS_USER", "bklite")], None);
    let code = c.wait_exit("nats without NATS_PASSWORD", Duration::from_secs(30));
    let logs = c.logs();
    assert_ne!(code, 0, "{logs}");
    assert!(logs.contains("NATS_PASSWORD is not set"), "{logs}");
}

/// A CA and a NATS server certificate for 127.0.0.1 in a new directory `certs/` as install lays
/// it out (`nats-server.crt`, `nats-server.key` mode 0600 owned by root), with the CA beside it.
fn site_certs(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let ca = dir.join("ca.crt");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (apt-get install openssl)");
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out.stderr));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=bkbundle-it CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "certs/nats-server.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=nats",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:nats\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "certs/nats-server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(certs.join("nats-server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    (certs, ca)
}

/// With the target's certs/ mounted, clients must use TLS (verified against the site CA, here
/// with nats-py), the leafnode listener gets the same certificate, the root-only key reaches the
/// nats user through a private copy, and monitoring (the healthcheck) stays plain HTTP.
#[test]
fn nats_image_serves_tls_with_the_mounted_certificate() {
    let _lock = docker_lock();
    ensure_images();
    let dir = tempfile::Builder::new()
        .prefix("bkbundle-it-certs-")
        .tempdir_in("/tmp")
        .unwrap();
    let (certs, ca) = site_certs(dir.path());
    let password = random_alnum(24);
    let (c, port) = Container::run_with(
        "nats-tls",
        NATS_IMAGE,
        &[("NATS_USER", "bklite"), ("NATS_PASSWORD", &password)],
        Some(4222),
        &["-v".into(), format!("{}:/etc/nats/certs:ro", certs.display())],
    );
    c.wait_healthy("nats with TLS", Duration::from_secs(60));
    let info = nats_info(port);
    assert!(info.contains("\"tls_required\":true"), "{info}");
    let script = "import asyncio, ssl, sys, nats\n\
        async def main():\n\
        \x20   ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
        \x20   nc = await nats.connect(sys.argv[1], user='bklite', password=sys.argv[3], tls=ctx, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)\n\
        \x20   info = await nc.jetstream().account_info()\n\
        \x20   print('tls ok', info.streams)\n\
        \x20   await nc.close()\n\
        asyncio.run(main())\n";
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            &format!("tls://127.0.0.1:{port}"),
            ca.to_str().unwrap(),
            &password,
        ])
        .output()
        .expect("run python3 (scripts/setup.sh installs nats-py)");
    assert!(
        out.status.success() && text(&out.stdout).starts_with("tls ok"),
        "nats-py over TLS with the site CA: {}\n{}\n--- logs ---\n{}",
        text(&out.stdout),
        text(&out.stderr),
        c.logs()
    );
    let inside = docker(&[
        "exec",
        c.target(),
        "sh",
        "-c",
        "stat -c '%U %a' /run/nats/certs/nats-server.key; grep -c cert_file /run/nats/leafnodes.conf; wget -q -O- http://127.0.0.1:8222/healthz",
    ]);
    assert_eq!(
        text(&inside.stdout),
        "nats 600\n1\n{\"status\":\"ok\"}",
        "{}",
        text(&inside.stderr)
    );
    assert!(
        c.logs().contains("Listening for leafnode connections on 0.0.0.0:7422"),
        "{}",
        c.logs()
    );
}

/// A certificate without its key (or the reverse) is a mistake to name, not plain text.
#[test]
fn nats_image_refuses_half_a_certificate() {
    let _lock = docker_lock();
    ensure_images();
    let dir = tempfile::Builder::new()
        .prefix("bkbundle-it-certs-")
        .tempdir_in("/tmp")
        .unwrap();
    let (certs, _) = site_certs(dir.path());
    std::fs::remove_file(certs.join("nats-server.key")).unwrap();
    let (c, _) = Container::run_with(
        "nats-halfcert",
        NATS_IMAGE,
        &[("NATS_USER", "bklite"), ("NATS_PASSWORD", "pw")],
        None,
        &["-v".into(), format!("{}:/etc/nats/certs:ro", certs.display())],
    );
    let code = c.wait_exit("nats with a certificate but no key", Duration::from_secs(30));
    let logs = c.logs();
    assert_ne!(code, 0, "{logs}");
    assert!(logs.contains("/etc/nats/certs/nats-server.key is missing"), "{logs}");
}

/// The fusion-collector image carries every artifact upstream's release runbook exports, non-empty,
/// in three layers (base, the trees, a fix); the fix's replaced telegraf is what the image shows,
/// and the file it deletes is gone (a whiteout in its layer).
#[test]
fn fusion_collector_image_has_upstreams_layout_and_a_deleting_layer() {
    ensure_images();
    let files = [
        "/opt/fusion-collectors/collector-sidecar",
        "/opt/fusion-collectors/bin/telegraf",
        "/opt/fusion-collectors/bin/vector",
        "/opt/fusion-collectors/bin/nats-executor",
        "/opt/fusion-collectors/misc/VERSION",
        "/opt/fusion-collectors/misc/linux/install.sh",
        "/opt/fusion-collectors/misc/linux/uninstall.sh",
        "/opt/fusion-collectors/misc/linux/sidecar.yml",
        "/opt/fusion-collectors/misc/linux/sidecar.service",
        "/opt/release/linux/fusion-collectors/bklite-controller-installer",
        "/opt/release/windows/fusion-collectors/bklite-controller-installer.exe",
        "/opt/release/windows/fusion-collectors/bin/telegraf.exe",
        "/opt/release/windows/fusion-collectors/bin/vector.exe",
        "/opt/release/windows/fusion-collectors/bin/nats-executor.exe",
        "/opt/release/windows/fusion-collectors/sidecar.yml",
        "/opt/release/linux/prestage/arm64/collector-sidecar",
        "/opt/release/linux/prestage/arm64/telegraf",
        "/opt/release/linux/prestage/arm64/vector",
        "/opt/release/linux/prestage/arm64/nats-executor",
    ];
    let mut check = String::from("for f in \"$@\"; do test -s \"$f\" || echo \"missing or empty: $f\"; done; ");
    check.push_str("test -e /opt/fusion-collectors/bin/debug-dump && echo 'debug-dump not deleted'; ");
    check.push_str(
        "grep -q 'Telegraf 1.0.0 (demo)' /opt/fusion-collectors/bin/telegraf || echo 'telegraf not replaced'; ",
    );
    check.push_str("grep -c __SERVER__URL__ /opt/fusion-collectors/misc/linux/sidecar.yml");
    let mut args = vec![
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        FUSION_IMAGE,
        "-c",
        &check,
        "sh",
    ];
    args.extend(files);
    let out = docker(&args);
    assert_eq!(text(&out.stdout), "1", "{}", text(&out.stderr));
    let layers = docker(&[
        "image",
        "inspect",
        "-f",
        "{{range .RootFS.Layers}}{{println .}}{{end}}",
        FUSION_IMAGE,
    ]);
    let base = docker(&[
        "image",
        "inspect",
        "-f",
        "{{index .RootFS.Layers 0}}",
        "bkbundle-demo/base:1",
    ]);
    let layers = text(&layers.stdout);
    let layers: Vec<&str> = layers.lines().collect();
    assert_eq!(layers.len(), 3, "{layers:?}");
    assert_eq!(layers[0], text(&base.stdout), "the first layer is the base's");
}
