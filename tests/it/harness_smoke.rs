//! The harness itself, exercised for real: if these fail, every other integration test is
//! suspect. Each test starts its own servers, so they run in parallel.

use crate::harness::{
    bkbundle, docker_lock, ensure_demo_images, free_port, random_alnum, repo_root, require_docker, AgentHost, NatsOpts,
    NatsServer, PgCluster, Registry, DEMO_IMAGES,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn bkbundle_binary_and_repo_root_exist() {
    let cmd = bkbundle();
    let program = Path::new(cmd.get_program());
    assert!(program.is_file(), "{} is not a file", program.display());
    assert!(repo_root().join("Cargo.toml").is_file());
    assert!(repo_root().join("scripts/demo-images.sh").is_file());
}

#[test]
fn free_ports_are_distinct_and_bindable() {
    let a = free_port();
    let b = free_port();
    assert_ne!(a, b);
    TcpListener::bind(("127.0.0.1", a)).expect("bind the first free port");
    TcpListener::bind(("127.0.0.1", b)).expect("bind the second free port");
}

#[test]
fn random_alnum_is_alphanumeric_and_varies() {
    let a = random_alnum(32);
    let b = random_alnum(32);
    assert_eq!(a.len(), 32);
    assert!(a.chars().all(|c| c.is_ascii_alphanumeric()), "{a}");
    assert_ne!(a, b);
}

#[test]
fn postgres_accepts_the_password_over_tcp_and_rejects_a_wrong_one() {
    let pg = PgCluster::start();
    assert_eq!(pg.psql("postgres", "select 1"), "1");
    assert_eq!(
        pg.url(),
        format!("postgres://postgres:{}@127.0.0.1:{}/postgres", pg.password, pg.port)
    );
    // The server really is on TCP 127.0.0.1 and uses scram.
    assert_eq!(
        pg.psql(
            "postgres",
            "select inet_server_addr()::text || ' ' || current_setting('password_encryption')"
        ),
        "127.0.0.1/32 scram-sha-256"
    );
    assert_eq!(
        pg.psql(
            "postgres",
            "select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname = 'postgres'"
        ),
        "t"
    );

    let err = pg
        .try_psql_as("postgres", "not-the-password", "postgres", "select 1")
        .expect_err("a wrong password must be refused");
    assert!(err.contains("password authentication failed"), "{err}");

    let url = pg.create_database("smoke_db");
    assert!(url.ends_with(&format!(":{}/smoke_db", pg.port)), "{url}");
    assert_eq!(pg.psql("smoke_db", "select current_database()"), "smoke_db");
    pg.psql(
        "smoke_db",
        "create table t (id int primary key, v text); insert into t values (1, 'a'), (2, 'b')",
    );
    assert_eq!(pg.psql("smoke_db", "select id, v from t order by id"), "1|a\n2|b");
}

#[test]
fn postgres_stops_and_cleans_up_on_drop() {
    let pg = PgCluster::start();
    let port = pg.port;
    let data = pg.data_dir().to_path_buf();
    assert!(data.join("PG_VERSION").is_file());
    drop(pg);
    assert!(!data.exists(), "{} still exists after drop", data.display());
    assert!(
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_err(),
        "PostgreSQL still listens on {port} after drop"
    );
}

#[test]
fn nats_plain_has_jetstream() {
    let nats = NatsServer::start(NatsOpts::default());
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port));
    assert!(nats.ca_file.is_none());
    let info = raw_info(nats.port);
    assert!(info.contains("\"jetstream\":true"), "{info}");
    assert!(!info.contains("\"auth_required\":true"), "{info}");
    // Without auth a CONNECT + PING gets PONG.
    let reply = connect_and_ping(nats.port, r#"{"verbose":false,"pedantic":false}"#);
    assert!(reply.starts_with("PONG"), "{reply}");
}

#[test]
fn nats_user_password_is_required() {
    let nats = NatsServer::start(NatsOpts {
        user_password: Some(("bk".into(), "s3cret".into())),
        ..NatsOpts::default()
    });
    let info = nats.info();
    assert!(info.contains("\"auth_required\":true"), "{info}");
    assert!(info.contains("\"jetstream\":true"), "{info}");
    let ok = connect_and_ping(nats.port, r#"{"verbose":false,"user":"bk","pass":"s3cret"}"#);
    assert!(ok.starts_with("PONG"), "right credentials: {ok}");
    let bad = connect_and_ping(nats.port, r#"{"verbose":false,"user":"bk","pass":"wrong"}"#);
    assert!(bad.contains("Authorization Violation"), "wrong password: {bad}");
}

#[test]
fn nats_token_is_required() {
    let nats = NatsServer::start(NatsOpts {
        token: Some("tok3n".into()),
        ..NatsOpts::default()
    });
    assert!(nats.info().contains("\"auth_required\":true"));
    let ok = connect_and_ping(nats.port, r#"{"verbose":false,"auth_token":"tok3n"}"#);
    assert!(ok.starts_with("PONG"), "right token: {ok}");
    let bad = connect_and_ping(nats.port, r#"{"verbose":false,"auth_token":"nope"}"#);
    assert!(bad.contains("Authorization Violation"), "wrong token: {bad}");
}

#[test]
fn nats_tls_certificate_verifies_against_the_ca() {
    let nats = NatsServer::start(NatsOpts {
        tls: true,
        ..NatsOpts::default()
    });
    assert_eq!(nats.url(), format!("tls://127.0.0.1:{}", nats.port));
    let info = nats.info();
    assert!(
        info.contains("\"tls_required\":true") || info.contains("\"tls_available\":true"),
        "{info}"
    );
    let ca = nats.ca_file.clone().expect("a TLS server has a CA file");
    assert!(ca.is_file());

    // nats-server 2.9 writes INFO in plain text before the handshake, which a bare
    // `openssl s_client` takes for a broken TLS record ("wrong version number", yet it still
    // prints "Verify return code: 0"). So s_client talks to the server through a relay that
    // swallows the INFO line, and we require both its exit code 0 and a verified peer.
    let ok = s_client(nats.port, &ca, &["-verify_ip", "127.0.0.1"]);
    assert!(ok.0, "s_client -verify_ip 127.0.0.1 failed:\n{}", ok.1);
    let ok = s_client(nats.port, &ca, &["-verify_hostname", "localhost"]);
    assert!(ok.0, "s_client -verify_hostname localhost failed:\n{}", ok.1);

    // Negative controls: the wrong name, and a trust anchor that did not sign it.
    let bad = s_client(nats.port, &ca, &["-verify_hostname", "example.com"]);
    assert!(!bad.0, "hostname example.com must not verify:\n{}", bad.1);
    let other_ca = ca.with_file_name("server.pem");
    let bad = s_client(nats.port, &other_ca, &["-verify_ip", "127.0.0.1"]);
    assert!(!bad.0, "the server certificate is not its own CA:\n{}", bad.1);
}

/// An agent host reaches a listener on its host side address, and nothing on the host's loopback:
/// what runs in it sees the stack only as agents on another machine would.
#[test]
fn an_agent_host_reaches_its_host_address_and_not_the_hosts_loopback() {
    let host = AgentHost::create();
    let other = AgentHost::create();
    assert_ne!(host.host_ip, other.host_ip, "two agent hosts share a subnet");
    let on_host_ip = TcpListener::bind((host.host_ip, 0)).expect("bind the agent host's HOST_IP");
    let on_loopback = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1");
    let connect = |ip: String, port: u16| {
        let out = host.run(Command::new("python3").args([
            "-c",
            "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); print('connected')",
            &ip,
            &port.to_string(),
        ]));
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = connect(host.host_ip.to_string(), on_host_ip.local_addr().unwrap().port());
    assert!(ok, "the agent host cannot reach {}: {err}", host.host_ip);
    let (ok, _) = connect("127.0.0.1".into(), on_loopback.local_addr().unwrap().port());
    assert!(!ok, "the agent host reached the host's loopback");
    // The namespace's address is its own and its route goes through the host side only.
    let route = host.run(Command::new("ip").args(["-4", "route", "show"]));
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(route.contains(&format!("default via {}", host.host_ip)), "{route}");
    let ns = host.ns.clone();
    drop(host);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&ns), "{ns} left behind");
}

#[test]
fn docker_is_available() {
    require_docker();
}

#[test]
fn demo_images_share_the_base_layer() {
    let _docker = docker_lock();
    ensure_demo_images();
    ensure_demo_images(); // a second call is a cheap check, not a rebuild
    let layers: Vec<Vec<String>> = DEMO_IMAGES
        .iter()
        .map(|image| {
            let out = Command::new("docker")
                .args(["image", "inspect", "--format", "{{json .RootFS.Layers}}", image])
                .output()
                .expect("run docker image inspect");
            assert!(
                out.status.success(),
                "docker image inspect {image}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            parse_json_strings(&String::from_utf8_lossy(&out.stdout))
        })
        .collect();
    let (base, app, web) = (&layers[0], &layers[1], &layers[2]);
    assert_eq!(base.len(), 1, "base: {base:?}");
    assert_eq!(app.len(), 2, "app: {app:?}");
    assert_eq!(web.len(), 2, "web: {web:?}");
    assert_eq!(app[0], base[0], "app does not sit on the base layer");
    assert_eq!(web[0], base[0], "web does not sit on the base layer");
    assert_ne!(app[1], web[1]);
    for l in base.iter().chain(app).chain(web) {
        assert!(l.starts_with("sha256:") && l.len() == 71, "{l}");
    }

    // The base really has a shell and busybox applets.
    let out = Command::new("docker")
        .args(["run", "--rm", "--network", "none", DEMO_IMAGES[2], "/bin/sh", "-c"])
        .arg("test -f /www/index.html && ls /bin/wget && echo ok")
        .output()
        .expect("run docker run");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok"),
        "docker run web: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `["a","b"]` strings of a flat JSON string array.
fn parse_json_strings(s: &str) -> Vec<String> {
    s.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|x| x.trim().trim_matches('"').to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

/// The INFO line read over a raw TCP connection.
fn raw_info(port: u16) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to nats");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("read INFO");
    assert!(line.starts_with("INFO {"), "{line}");
    line
}

/// Sends CONNECT + PING on a fresh connection and returns the first reply line after INFO
/// (`PONG`, or `-ERR ...`).
fn connect_and_ping(port: u16, connect_json: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to nats");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).expect("read INFO");
    assert!(line.starts_with("INFO "), "{line}");
    write!(stream, "CONNECT {connect_json}\r\nPING\r\n").expect("send CONNECT");
    line.clear();
    reader.read_line(&mut line).expect("read the reply");
    line.trim_end().to_string()
}

/// Runs `openssl s_client` against the NATS server through a relay that removes the plain-text
/// INFO line; returns (exit code 0 and a peer certificate verified, output).
fn s_client(nats_port: u16, ca: &Path, extra: &[&str]) -> (bool, String) {
    let relay = info_stripping_relay(nats_port);
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{relay}"))
        .arg("-CAfile")
        .arg(ca)
        .args(["-servername", "localhost", "-verify_return_error"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("run openssl s_client (apt-get install openssl, or scripts/setup.sh)");
    drop(child.stdin.take()); // EOF: s_client closes after the handshake
    let out = child.wait_with_output().expect("wait for openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let verified =
        out.status.success() && text.contains("Verify return code: 0 (ok)") && text.contains("subject=CN = localhost");
    (verified, text)
}

/// A one-connection loopback relay to the NATS port that drops the server's first line (INFO)
/// and then copies bytes both ways; returns its port.
fn info_stripping_relay(nats_port: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let Ok((client, _)) = listener.accept() else {
            return;
        };
        let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", nats_port)) else {
            return;
        };
        // Read the INFO line byte by byte so nothing after it is consumed here.
        let mut byte = [0u8; 1];
        loop {
            match upstream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) => {}
                _ => return,
            }
        }
        let (mut c_read, mut u_write) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        let to_server = std::thread::spawn(move || {
            let _ = std::io::copy(&mut c_read, &mut u_write);
            let _ = u_write.shutdown(Shutdown::Write);
        });
        let mut client_w = client;
        let _ = std::io::copy(&mut upstream, &mut client_w);
        let _ = client_w.shutdown(Shutdown::Write);
        let _ = to_server.join();
    });
    port
}

// ---------------------------------------------------------------------------------------------
// The image registry (docker-registry), read and filled by skopeo and the engine.

fn docker_image_id(reference: &str) -> String {
    let out = Command::new("docker")
        .args(["image", "inspect", "-f", "{{.Id}}", reference])
        .output()
        .expect("docker image inspect");
    assert!(
        out.status.success(),
        "docker image inspect {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_plain_registry_takes_an_image_from_skopeo_and_the_engine_pulls_it() {
    let _docker = docker_lock();
    ensure_demo_images();
    let reg = Registry::plain();
    assert!(!reg.is_tls());
    let repo = format!("smoke{}/base:1", random_alnum(8).to_lowercase());
    assert_eq!(reg.image_id(&repo), None, "a fresh registry has nothing");
    reg.skopeo_copy_from_daemon(DEMO_IMAGES[0], &repo);
    // The registry's manifest names the engine's config: the same image id.
    assert_eq!(
        reg.image_id(&repo).as_deref(),
        Some(docker_image_id(DEMO_IMAGES[0]).as_str())
    );
    // The engine pulls from it over plain HTTP (127.0.0.0/8 is an insecure registry by default).
    let pulled = format!("{}/{repo}", reg.host());
    let out = Command::new("docker").args(["pull", "-q", &pulled]).output().unwrap();
    let id = (out.status.success()).then(|| docker_image_id(&pulled));
    let _ = Command::new("docker").args(["rmi", &pulled]).output();
    assert!(
        out.status.success(),
        "docker pull {pulled}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(id.as_deref(), Some(docker_image_id(DEMO_IMAGES[0]).as_str()));
    // Stopped, it refuses connections; restarted, it still has the image.
    let mut reg = reg;
    reg.stop();
    assert!(TcpStream::connect(("127.0.0.1", reg.port)).is_err());
    reg.restart();
    assert!(reg.image_id(&repo).is_some(), "the storage survives a restart");
}

#[test]
fn a_tls_registry_wants_its_ca_and_the_password() {
    let _docker = docker_lock();
    ensure_demo_images();
    let password = random_alnum(20);
    let reg = Registry::tls_auth("smoke", &password);
    assert!(reg.is_tls());
    let repo = "smoke/base:1";
    reg.skopeo_copy_from_daemon(DEMO_IMAGES[0], repo);
    assert_eq!(
        reg.image_id(repo).as_deref(),
        Some(docker_image_id(DEMO_IMAGES[0]).as_str())
    );
    let url = format!("docker://{}/{repo}", reg.host());
    let ca_dir = reg.ca_pem_path().parent().unwrap().join("certs");
    let cert_dir = format!("--cert-dir={}", ca_dir.display());
    // Without credentials: the registry's 401 challenge.
    let out = crate::harness::skopeo(&["inspect", "--raw", "--no-creds", &cert_dir, &url]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("authentication required"),
        "{err}"
    );
    // A wrong password.
    let creds = "--creds=smoke:wrong".to_string();
    let out = crate::harness::skopeo(&["inspect", "--raw", &cert_dir, &creds, &url]);
    assert!(!out.status.success(), "a wrong password was accepted");
    // Without the CA: the certificate is not trusted.
    let authfile = format!("--authfile={}", reg.docker_config_dir().join("config.json").display());
    let out = crate::harness::skopeo(&["inspect", "--raw", &authfile, &url]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("certificate"), "{err}");
    // The engine pulls with the CA in certs.d and the login file's credentials; the CA file goes
    // with the guard.
    let certs = crate::harness::engine_certs_dir(&reg.host());
    let pulled = format!("{}/{repo}", reg.host());
    let out = {
        let _trust = reg.trust_in_engine();
        assert!(certs.join("ca.crt").is_file());
        Command::new("docker")
            .arg("--config")
            .arg(reg.docker_config_dir())
            .args(["pull", "-q", &pulled])
            .output()
            .unwrap()
    };
    let _ = Command::new("docker").args(["rmi", &pulled]).output();
    assert!(
        out.status.success(),
        "docker pull {pulled}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!certs.exists(), "{} is left behind", certs.display());
}

#[test]
fn a_token_auth_registry_takes_skopeo_with_the_password_only() {
    let _docker = docker_lock();
    ensure_demo_images();
    let password = random_alnum(20);
    let reg = Registry::token_auth("smoke", &password);
    assert!(reg.is_tls());
    let repo = "smoke/base:1";
    // skopeo follows the Bearer challenge to the token server (HTTPS, the harness CA).
    reg.skopeo_copy_from_daemon(DEMO_IMAGES[0], repo);
    assert_eq!(
        reg.image_id(repo).as_deref(),
        Some(docker_image_id(DEMO_IMAGES[0]).as_str())
    );
    let url = format!("docker://{}/{repo}", reg.host());
    let ca_dir = reg.ca_pem_path().parent().unwrap().join("certs");
    let cert_dir = format!("--cert-dir={}", ca_dir.display());
    // Anonymous: a token that grants nothing, and the registry's refusal.
    let out = crate::harness::skopeo(&["inspect", "--raw", "--no-creds", &cert_dir, &url]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an anonymous token was let in: {err}");
    // A wrong password: the token server refuses it.
    let out = crate::harness::skopeo(&["inspect", "--raw", &cert_dir, "--creds=smoke:wrong", &url]);
    assert!(!out.status.success(), "a wrong password was accepted");
    let log = reg.token_log();
    assert!(log.contains("refused credentials for user 'smoke'"), "{log}");
    assert!(!log.contains(&password), "the token server never logs the password");
}
