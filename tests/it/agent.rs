//! Issue 12's proof that an agent host can use what install wrote: a network namespace on a veth
//! (tests/it/harness/agent_host.rs) reaches the stack only by the address agents are given, starts
//! from what a real bootstrap gets (the region id and the server's address), and does what the
//! agent does with the rows and objects bkbundle wrote (tests/agent/agent.py, nats-py: never
//! bkbundle): the region's session from a stand-in for the server's installer-session API
//! (tests/agent/server_standin.py, reading the rows install wrote, secrets decrypted with the
//! independent `cryptography`), NATS over TLS verified against the site CA, the installer and the
//! controller package at the keys the release reads with their SHA-256 against the object info,
//! the package unpacked with its `certs/ca.crt`, and `sidecar.yml` rendered with a valid server
//! URL. For the newest release and the oldest (whose env cannot hold the CA: the agent takes it
//! from the package the server sends, as agents of that release got packages from the server).

use crate::harness::{ensure_demo_images, free_port, repo_root, AgentHost};
use crate::install::{oldest_release_demo_bundle, Project};
use crate::pack::demo_bundle;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The stand-in server, killed on drop.
struct Standin(Child);

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the stand-in on the agent-facing address, reading the stack's database and NATS.
fn start_standin(p: &Project, listen: &str, bucket: &str) -> Standin {
    let db = format!(
        "postgresql://postgres:{}@127.0.0.1:{}/bklite",
        p.env_value("POSTGRES_PASSWORD"),
        p.env_value("POSTGRES_PORT")
    );
    let nats = format!("tls://127.0.0.1:{}", p.env_value("NATS_PORT"));
    let ca = p.target().join("certs/ca.crt");
    let mut child = Command::new("python3")
        .arg(repo_root().join("tests/agent/server_standin.py"))
        .args(["--listen", listen, "--db", &db, "--bucket", bucket, "--nats", &nats])
        .arg("--nats-ca")
        .arg(&ca)
        .env("SECRET_KEY", p.env_value("SECRET_KEY"))
        .env("NATS_USER", p.env_value("NATS_USER"))
        .env("NATS_PASSWORD", p.env_value("NATS_PASSWORD"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 (scripts/setup.sh installs it)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let standin = Standin(child);
    assert!(line.starts_with("listening on"), "the stand-in did not start: {line:?}");
    standin
}

/// Install `bundle` for agents at the agent host's address, then bootstrap an agent there.
fn an_agent_bootstraps(p: &Project, bundle: &Path, bucket: &str) -> serde_json::Value {
    let host = AgentHost::create();
    let ip = host.host_ip.to_string();
    let server = format!("http://{ip}:{}", free_port());
    // NATS published on every address: bkbundle reaches it on loopback, agents on HOST_IP.
    let cfg = p.config(
        180,
        &format!("HOST_IP = \"{ip}\"\nSERVER_URL = \"{server}\"\nNATS_BIND_IP = \"0.0.0.0\""),
    );
    let r = p.install(bundle, &cfg, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let _standin = start_standin(p, server.trim_start_matches("http://"), bucket);
    let work = p.path("agent");
    let out = host.run(
        Command::new("python3")
            .arg(repo_root().join("tests/agent/agent.py"))
            .args(["--server", &server, "--region", "1", "--work"])
            .arg(&work),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "the agent's bootstrap failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let findings: serde_json::Value = serde_json::from_str(stdout.trim()).expect("the agent's JSON line");
    assert_eq!(findings["ok"], true, "{findings}");
    assert_eq!(findings["nats"]["tls"], true, "{findings}");
    assert_eq!(
        findings["sidecar_server_url"],
        format!("{server}/api/v1/node_mgmt/open_api/node"),
        "{findings}"
    );
    // The agent reached NATS by HOST_IP, never by a loopback shortcut.
    let connected = findings["nats"]["connected_url"].as_str().unwrap_or_default();
    assert!(connected.contains(&ip), "{findings}");
    // What it unpacked carries the site CA.
    let ca = fs::read_to_string(p.target().join("certs/ca.crt")).unwrap();
    let unpacked = fs::read_to_string(work.join("unpacked/fusion-collectors/certs/ca.crt")).unwrap();
    assert_eq!(unpacked.trim(), ca.trim());
    findings
}

#[test]
fn an_agent_host_bootstraps_from_what_install_wrote_on_the_newest_release() {
    ensure_demo_images();
    let p = Project::new();
    let f = an_agent_bootstraps(&p, demo_bundle(), "bklite");
    assert_eq!(f["ca_from"], "NATS_TLS_CA", "{f}");
    assert_eq!(
        f["session"]["installer_key"], "installer/linux/x86_64/bklite-controller-installer",
        "{f}"
    );
    assert_eq!(
        f["session"]["package_key"], "linux/x86_64/Controller/1.0.0/fusion-collectors-linux-amd64.zip",
        "{f}"
    );
}

#[test]
fn an_agent_host_bootstraps_from_what_install_wrote_on_the_oldest_release() {
    ensure_demo_images();
    let p = Project::new();
    let bundle = oldest_release_demo_bundle(&p);
    let f = an_agent_bootstraps(&p, &bundle, "bk_lite");
    // varchar(200) holds no certificate: the env says tls, the CA comes in the package.
    assert_eq!(f["ca_from"], "the package the server sent", "{f}");
    assert_eq!(
        p.stack_psql("SELECT count(*) FROM node_mgmt_sidecarenv WHERE key = 'NATS_TLS_CA'"),
        "0"
    );
    // Nor in the server's environment, which that release's server would fail to write.
    let zone = fs::read_to_string(p.target().join("default-zone.env")).unwrap();
    assert!(zone.contains("DEFAULT_ZONE_VAR_NATS_PROTOCOL=tls\n"), "{zone}");
    assert!(!zone.contains("NATS_TLS_CA"), "{zone}");
    assert_eq!(
        f["session"]["package_key"], "linux/Controller/1.0.0/fusion-collectors-linux-amd64.zip",
        "{f}"
    );
    assert_eq!(
        f["session"]["installer_key"], "installer/linux/bklite-controller-installer",
        "{f}"
    );
}
