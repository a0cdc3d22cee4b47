//! Issue 13, live: `bkbundle doctor --agent` on agent hosts that are containers of
//! `bkbundle-demo/base:1` (busybox, no libc: the static binary must start there) on a Docker
//! network the test made, with an agent tree laid out as upstream's installer leaves it mounted at
//! /opt/fusion-collectors and the binary under test mounted read-only at /bkbundle.
//!
//! One demo install serves every scenario ([`site`]): its NATS (TLS from the site CA) is published
//! on the network's gateway, its web (standing in for the server: any HTTP answer proves the path)
//! on every address, and the certificate names the gateway (HOST_IP). Each scenario breaks one link
//! of a clean host and asserts the one error that names it (check, severity, subject, what the
//! message or evidence says), that the chain stopped there, and exit 10; the clean host exits 0
//! with no error and no warning.
//!
//! Nothing leaves this machine: the server and NATS are addresses on the test's network, the
//! unresolvable name ends in `.invalid`, and every host's `/etc/resolv.conf` names 127.0.0.1, where
//! nothing answers in the container (Docker's embedded resolver would pass `.invalid` on to this
//! host's upstream nameserver). Dropped traffic is dropped by a rule in the container's own network
//! namespace, never in the host's rules.

use crate::harness::{ensure_demo_images, random_alnum};
use crate::install::Project;
use crate::pack::{demo_bundle, run, Run};
use crate::packages::python_with;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BASE_IMAGE: &str = "bkbundle-demo/base:1";
const INSTALL_DIR: &str = "/opt/fusion-collectors";

/// Upstream's `agents/fusion-collector/misc/linux/sidecar.yml` below a header of `#` lines
/// (tests/agent/sidecar.yml; scripts/bench.sh renders the same file).
const SIDECAR_TEMPLATE: &str = include_str!("../agent/sidecar.yml");

/// The server's endpoint for agents, appended to the region's NODE_SERVER_URL by the install
/// command the server hands out.
const AGENT_ENDPOINT: &str = "/api/v1/node_mgmt/open_api/node";

/// The generated NATS-Executor config's file name under `generated/` (the configuration's id).
const NATS_CONFIG: &str = "3b1f0c52-natsexecutor-linux.yaml";

/// The server API token of every agent host's `sidecar.yml` (a secret: never printed).
const API_TOKEN: &str = "bktToken0123456789abcdefABCDEF";

/// A Docker network this test made (`bkt…`), removed on drop.
struct Network {
    name: String,
    /// This host's address on it: where the demo publishes what agents reach.
    gateway: String,
}

impl Network {
    fn create() -> Network {
        let name = format!("bkt{}", random_alnum(8).to_lowercase());
        let made = run(Command::new("docker").args(["network", "create", &name]));
        assert_eq!(made.code, 0, "docker network create {name}: {}", made.stderr);
        // From here on a panic drops it.
        let mut net = Network {
            name,
            gateway: String::new(),
        };
        let gw = run(Command::new("docker").args([
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
            &net.name,
        ]));
        assert_eq!(gw.code, 0, "docker network inspect {}: {}", net.name, gw.stderr);
        net.gateway = gw.stdout.trim().to_string();
        assert!(
            net.gateway.parse::<std::net::Ipv4Addr>().is_ok(),
            "network {} has no IPv4 gateway: {:?}",
            net.name,
            gw.stdout
        );
        net
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = run(Command::new("docker").args(["network", "rm", &self.name]));
    }
}

/// The demo stack installed for agents on a network of its own. Fields drop in order: the
/// stack's containers and volumes, then the network.
struct Site {
    /// Held for its drop, which removes the stack.
    _stack: Project,
    net: Network,
    web_port: String,
    nats_port: String,
    nats_user: String,
    nats_password: String,
    /// The site CA install made (TARGET/certs/ca.crt): it signed the NATS certificate.
    ca: PathBuf,
    /// A CA of the test's own, which signed nothing the site serves.
    stranger_ca: PathBuf,
}

impl Site {
    fn install() -> Site {
        ensure_demo_images();
        let net = Network::create();
        let p = Project::new();
        let gw = net.gateway.clone();
        // NATS published on the gateway only: install reaches it there too ([nats] url), and the
        // certificate install issues names it (HOST_IP). The web is published on every address.
        let cfg = p.config(
            180,
            &format!(
                "HOST_IP = \"{gw}\"\nSERVER_URL = \"http://{gw}:@WEB_PORT@\"\nNATS_BIND_IP = \"{gw}\"\n\
                 [nats]\nurl = \"tls://{gw}:${{NATS_PORT}}\""
            ),
        );
        let text = fs::read_to_string(&cfg).unwrap();
        let web_port = config_value(&text, "WEB_PORT");
        fs::write(&cfg, text.replace("@WEB_PORT@", &web_port)).unwrap();
        let r = p.install(demo_bundle(), &cfg, &[]);
        assert_eq!(
            r.code, 0,
            "the demo install for agent hosts:\n{}\n{}",
            r.stdout, r.stderr
        );
        let stranger_ca = p.path("stranger-ca.crt");
        self_signed_ca(&p.path("stranger-ca.key"), &stranger_ca);
        Site {
            web_port,
            nats_port: p.env_value("NATS_PORT"),
            nats_user: p.env_value("NATS_USER"),
            nats_password: p.env_value("NATS_PASSWORD"),
            ca: p.target().join("certs/ca.crt"),
            stranger_ca,
            _stack: p,
            net,
        }
    }

    /// The server as a clean agent has it: the web of the demo on the gateway.
    fn server(&self) -> String {
        format!("http://{}:{}", self.net.gateway, self.web_port)
    }

    /// What a clean agent host of this site has (each scenario changes one thing).
    fn clean_agent(&self) -> AgentFiles {
        AgentFiles {
            server_url: format!("{}{AGENT_ENDPOINT}", self.server()),
            nats_url: format!(
                "tls://{}:{}@{}:{}",
                self.nats_user, self.nats_password, self.net.gateway, self.nats_port
            ),
            ca: self.ca.clone(),
        }
    }
}

/// How NATS answers `url` (`tls://USER:PASSWORD@HOST:PORT`) verified against `ca`, asked by
/// nats-py from this host (the gateway is one of its addresses): "ok" when it connects and
/// JetStream answers, else the exception. The premise of a NATS scenario, checked without bkbundle.
fn nats_answer(url: &str, ca: &Path) -> String {
    python_with(NATS_PROBE, &[url], Some(ca))
}

const NATS_PROBE: &str = r#"
import asyncio, sys, nats
async def main():
    async def quiet(e):
        pass
    try:
        nc = await nats.connect(sys.argv[1], error_cb=quiet)
        await nc.jetstream().account_info()
        await nc.close()
        print("ok")
    except Exception as e:
        print(type(e).__name__, e)
asyncio.run(main())
"#;

/// `KEY = "VALUE"` of an install config's text.
fn config_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{key} is not in the install config:\n{text}"))
        .to_string()
}

/// A self-signed CA (key and certificate), made by the OpenSSL CLI, not by bkbundle's own code.
fn self_signed_ca(key: &Path, cert: &Path) {
    let r = run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/CN=bkbundle test stranger CA",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]));
    assert_eq!(r.code, 0, "openssl req -x509 (apt-get install openssl): {}", r.stderr);
}

/// The one site of this test process, installed by the first scenario that needs it (the others
/// wait). A static is never dropped, so a `libc::atexit` hook drops it when the test process
/// exits (as [`crate::harness::PgCluster::shared`] does); an install that failed is not retried by
/// every later scenario: they fail naming the first failure.
fn site() -> Arc<Site> {
    static SITE: Mutex<Option<Result<Arc<Site>, String>>> = Mutex::new(None);
    extern "C" fn remove_site() {
        let site = SITE.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(site);
    }
    let mut slot = SITE.lock().unwrap_or_else(|e| e.into_inner());
    match &*slot {
        Some(Ok(site)) => return site.clone(),
        Some(Err(first)) => panic!("the shared demo install failed in an earlier scenario: {first}"),
        None => {}
    }
    match std::panic::catch_unwind(Site::install) {
        Ok(site) => {
            // SAFETY: registers a plain `extern "C" fn` without arguments, as atexit(3) expects.
            let rc = unsafe { libc::atexit(remove_site) };
            assert_eq!(rc, 0, "atexit could not register the agent site's cleanup"); // drops it
            let site = Arc::new(site);
            *slot = Some(Ok(site.clone()));
            site
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into());
            *slot = Some(Err(message));
            std::panic::resume_unwind(panic)
        }
    }
}

/// What differs between agent hosts: the rest of the tree is the same everywhere.
struct AgentFiles {
    /// `sidecar.yml`'s `server_url`.
    server_url: String,
    /// nats-executor's `nats_urls`: `tls://USER:PASSWORD@HOST:PORT`.
    nats_url: String,
    /// The file installed as `certs/ca.crt` (which the NATS config names).
    ca: PathBuf,
}

impl AgentFiles {
    /// The agent's install dir as upstream's package and install.sh leave it: `sidecar.yml` with
    /// the placeholders replaced, `node-id`, the sidecar and the collectors executable, the CA,
    /// and the NATS-Executor config the server generated (NATS-Executor.json's template).
    fn lay_out(&self, dir: &Path) {
        let node_id = format!("bkt-node-{}", random_alnum(6).to_lowercase());
        let template: String = SIDECAR_TEMPLATE
            .lines()
            .skip_while(|l| l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let sidecar = template
            .replace("__SERVER__URL__", &self.server_url)
            .replace("__SERVER__API__TOKEN__", API_TOKEN)
            .replace("__TAGS__", "\"zone:1\", \"group:1\"")
            .replace("__NODE__NAME__", "agent-host-1");
        let nats = format!(
            "nats_urls: \"{}\"\nnats_instanceId: \"{node_id}\"\nnats_conn_timeout: 600\n\n\
             tls_enabled: \"true\"\ntls_skip_verify: \"false\"\ntls_ca_file: \"{INSTALL_DIR}/certs/ca.crt\"\n",
            self.nats_url
        );
        let nats_config = format!("generated/{NATS_CONFIG}");
        let executable = |name: &str| format!("#!/bin/sh\n# {name} (bkbundle test agent)\nexec sleep 3600\n");
        for (path, text, mode) in [
            ("sidecar.yml", sidecar, 0o600),
            ("node-id", format!("{node_id}\n"), 0o644),
            ("collector-sidecar", executable("collector-sidecar"), 0o755),
            ("bin/telegraf", executable("telegraf"), 0o755),
            ("bin/vector", executable("vector"), 0o755),
            ("bin/nats-executor", executable("nats-executor"), 0o755),
            ("certs/ca.crt", fs::read_to_string(&self.ca).unwrap(), 0o644),
            (nats_config.as_str(), nats, 0o600),
        ] {
            let p = dir.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, text).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        }
        for d in ["cache", "log"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
    }
}

/// An agent host: a container of the demo's busybox base on the site's network with the agent
/// tree (read-only: doctor only reads) and the binary under test mounted; removed on drop. It
/// idles (`sleep`) and doctor runs in it by `docker exec`, the same for every scenario, so that a
/// rule of its own network namespace can be in place before doctor starts.
struct AgentHost {
    name: String,
    _tree: tempfile::TempDir,
}

impl AgentHost {
    fn start(site: &Site, files: &AgentFiles) -> AgentHost {
        let tree = tempfile::tempdir().unwrap();
        let agent = tree.path().join("fusion-collectors");
        files.lay_out(&agent);
        let resolv = tree.path().join("resolv.conf");
        fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
        let host = AgentHost {
            name: format!("bkt{}", random_alnum(8).to_lowercase()),
            _tree: tree,
        };
        let started = run(Command::new("docker")
            .args(["run", "-d", "--rm", "--name", &host.name, "--network", &site.net.name])
            .arg("-v")
            .arg(format!("{}:{INSTALL_DIR}:ro", agent.display()))
            .arg("-v")
            .arg(format!("{}:/bkbundle:ro", env!("CARGO_BIN_EXE_bkbundle")))
            .arg("-v")
            .arg(format!("{}:/etc/resolv.conf:ro", resolv.display()))
            .args([BASE_IMAGE, "sleep", "600"]));
        assert_eq!(started.code, 0, "docker run {BASE_IMAGE}: {}", started.stderr);
        host
    }

    /// Drops TCP to `addr:port` inside this container's own network namespace (the host's rules
    /// are not touched).
    fn drop_tcp_to(&self, addr: &str, port: &str) {
        let pid = run(Command::new("docker").args(["inspect", "-f", "{{.State.Pid}}", &self.name]));
        assert_eq!(pid.code, 0, "docker inspect {}: {}", self.name, pid.stderr);
        let rule = run(Command::new("nsenter")
            .args([
                "-t",
                pid.stdout.trim(),
                "-n",
                "iptables",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
            ])
            .args([addr, "--dport", port, "-j", "DROP"]));
        assert_eq!(
            rule.code, 0,
            "nsenter ... iptables (apt-get install iptables util-linux, or scripts/setup.sh): {}",
            rule.stderr
        );
    }

    /// The first line `ADDR:PORT` answers an HTTP request from this host with (busybox nc, 3 s),
    /// empty when nothing answers: a premise checked without bkbundle.
    fn http_answer(&self, addr: &str, port: &str) -> String {
        self.first_line(&format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {addr} {port}"))
    }

    /// The first line NATS at `ADDR:PORT` greets this host with (its plain-text INFO, which comes
    /// before TLS), empty when nothing answers.
    fn nats_greeting(&self, addr: &str, port: &str) -> String {
        self.first_line(&format!("nc -w 3 {addr} {port} </dev/null"))
    }

    fn first_line(&self, script: &str) -> String {
        let r = run(Command::new("docker").args(["exec", &self.name, "/bin/sh", "-c", script]));
        r.stdout.lines().next().unwrap_or_default().to_string()
    }

    /// `bkbundle --json doctor --agent` on this host.
    fn doctor(&self) -> Doctor {
        let t = Instant::now();
        let r = run(Command::new("docker").args(["exec", &self.name, "/bkbundle", "--json", "doctor", "--agent"]));
        let took = t.elapsed();
        let report = serde_json::from_str(&r.stdout).unwrap_or_else(|e| {
            panic!(
                "doctor --agent printed no JSON report ({e}), exit {}:\n{}\n{}",
                r.code, r.stdout, r.stderr
            )
        });
        Doctor { run: r, report, took }
    }
}

impl Drop for AgentHost {
    fn drop(&mut self) {
        let _ = run(Command::new("docker").args(["rm", "-f", &self.name]));
    }
}

/// One run of `doctor --agent` and its report.
struct Doctor {
    run: Run,
    report: Value,
    took: Duration,
}

impl Doctor {
    fn findings(&self) -> &[Value] {
        self.report["findings"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_else(|| panic!("the report has no findings array: {}", self.run.stdout))
    }

    fn errors(&self) -> Vec<&Value> {
        self.findings().iter().filter(|f| f["severity"] == "error").collect()
    }

    /// The one finding of `check` whose subject contains `subject`, with `severity`; panics with
    /// the whole report when there is none.
    fn finding(&self, check: &str, severity: &str, subject: &str) -> &Value {
        self.findings()
            .iter()
            .find(|f| f["check"] == check && f["severity"] == severity && text(&f["subject"]).contains(subject))
            .unwrap_or_else(|| {
                panic!(
                    "no {severity} of check {check:?} about {subject:?} in the report:\n{}",
                    self.pretty()
                )
            })
    }

    /// The findings of `check` whose subject contains any of `subjects`.
    fn any_of(&self, check: &str, subjects: &[&str]) -> Vec<&Value> {
        self.findings()
            .iter()
            .filter(|f| f["check"] == check && subjects.iter().any(|s| text(&f["subject"]).contains(s)))
            .collect()
    }

    /// Exit 10 and exactly one error: `check`'s about `subject`, whose message or evidence says
    /// `says` (when given). Returns it.
    fn the_one_error(&self, check: &str, subject: &str, says: Option<&str>) -> &Value {
        let f = self.finding(check, "error", subject);
        if let Some(says) = says {
            let said = format!("{} {}", text(&f["message"]), f["evidence"]);
            assert!(
                said.contains(says),
                "the error does not say {says:?}:\n{}",
                self.pretty()
            );
        }
        assert_eq!(self.errors().len(), 1, "one broken link, one error:\n{}", self.pretty());
        assert_eq!(self.report["errors"], 1, "{}", self.pretty());
        assert_eq!(self.run.code, 10, "exit 10 while an error remains:\n{}", self.pretty());
        f
    }

    /// No secret of the agent's files is printed (the NATS password in its URL, the API token).
    fn prints_no_secret(&self, secrets: &[&str]) {
        for s in secrets {
            assert!(
                !self.run.stdout.contains(s) && !self.run.stderr.contains(s),
                "a secret of the agent's files was printed:\n{}\n{}",
                self.run.stdout,
                self.run.stderr
            );
        }
    }

    fn pretty(&self) -> String {
        format!(
            "exit {}, {:?}\n{}\n--- stderr ---\n{}",
            self.run.code,
            self.took,
            serde_json::to_string_pretty(&self.report).unwrap_or_default(),
            self.run.stderr
        )
    }
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// The stages of the server chain and of the NATS chain, in order.
const SERVER_STAGES: [&str; 5] = ["(name resolution)", "(TCP)", "(HTTP)", "(TLS)", "clock"];
const NATS_STAGES: [&str; 5] = ["(name resolution)", "(TCP)", "(TLS)", "(authentication)", "(JetStream)"];

/// The stages after `stage` in `stages` (a chain that stopped at `stage` reports none of them).
fn after<'a>(stages: &'a [&'a str], stage: &str) -> &'a [&'a str] {
    let i = stages.iter().position(|s| *s == stage).unwrap();
    &stages[i + 1..]
}

fn diagnose(site: &Site, files: &AgentFiles) -> Doctor {
    AgentHost::start(site, files).doctor()
}

#[test]
fn agent_doctor_the_carried_binary_starts_on_a_host_without_libc() {
    ensure_demo_images();
    let r = run(Command::new("docker")
        .args(["run", "--rm", "--network", "none", "-v"])
        .arg(format!("{}:/bkbundle:ro", env!("CARGO_BIN_EXE_bkbundle")))
        .args([BASE_IMAGE, "/bkbundle", "--version"]));
    assert_eq!(
        r.code, 0,
        "bkbundle --version in {BASE_IMAGE}: {}{}",
        r.stdout, r.stderr
    );
    assert!(
        r.stdout.starts_with(&format!("bkbundle {}", env!("CARGO_PKG_VERSION"))),
        "{}",
        r.stdout
    );
    // The image really has no C library nor dynamic loader: the binary is all there is to run.
    let libc = run(Command::new("docker").args([
        "run",
        "--rm",
        BASE_IMAGE,
        "find",
        "/",
        "-xdev",
        "(",
        "-name",
        "libc.so*",
        "-o",
        "-name",
        "ld-linux*",
        "-o",
        "-name",
        "ld-musl*",
        ")",
    ]));
    assert_eq!(libc.code, 0, "find in {BASE_IMAGE}: {}", libc.stderr);
    assert_eq!(libc.stdout.trim(), "", "{BASE_IMAGE} has a C library");
}

#[test]
fn agent_doctor_a_clean_host_reaches_the_server_and_nats() {
    let site = site();
    let files = site.clean_agent();
    let host = AgentHost::start(&site, &files);
    // The premises, without bkbundle: the host reaches the server and NATS, and NATS takes the
    // agent's URL verified against its CA.
    let gw = &site.net.gateway;
    assert!(host.http_answer(gw, &site.web_port).starts_with("HTTP/1."));
    assert!(host.nats_greeting(gw, &site.nats_port).starts_with("INFO "));
    assert_eq!(nats_answer(&files.nats_url, &files.ca), "ok");
    let d = host.doctor();
    assert_eq!(d.report["errors"], 0, "{}", d.pretty());
    assert_eq!(d.report["warnings"], 0, "{}", d.pretty());
    assert_eq!(d.run.code, 0, "{}", d.pretty());
    assert!(d.report["release"].is_null(), "{}", d.pretty());
    for f in d.findings() {
        for key in ["check", "severity", "subject", "message", "evidence", "fix", "fixed"] {
            assert!(f.get(key).is_some(), "a finding without {key}: {f}");
        }
    }
    // A busybox container has no systemd: one info about the unit, not an error.
    let service = d.any_of("agent-service", &["bk-sidecar.service"]);
    assert_eq!(service.len(), 1, "{}", d.pretty());
    assert_eq!(service[0]["severity"], "info", "{}", d.pretty());
    d.prints_no_secret(&[&site.nats_password, API_TOKEN]);
}

#[test]
fn agent_doctor_names_a_null_server_url_and_goes_no_further() {
    let site = site();
    // Seed 000: the region had no NODE_SERVER_URL when the install command was rendered.
    let files = AgentFiles {
        server_url: format!("null{AGENT_ENDPOINT}"),
        ..site.clean_agent()
    };
    let d = diagnose(&site, &files);
    d.the_one_error(
        "agent-config",
        "sidecar.yml server_url",
        Some("null/api/v1/node_mgmt/open_api/node"),
    );
    assert!(
        d.findings().iter().all(|f| f["check"] != "server"),
        "the server chain stops at the config:\n{}",
        d.pretty()
    );
    d.prints_no_secret(&[&site.nats_password, API_TOKEN]);
}

#[test]
fn agent_doctor_names_a_server_that_does_not_resolve() {
    let site = site();
    // Seed 002: `Could not resolve host`.
    let files = AgentFiles {
        server_url: format!("http://bklite-server.invalid:18080{AGENT_ENDPOINT}"),
        ..site.clean_agent()
    };
    let d = diagnose(&site, &files);
    let f = d.the_one_error("server", "(name resolution)", Some("Could not resolve host"));
    assert!(text(&f["subject"]).contains("bklite-server.invalid"), "{}", d.pretty());
    let later = d.any_of("server", after(&SERVER_STAGES, "(name resolution)"));
    assert!(
        later.is_empty(),
        "the server chain stops at resolution:\n{}",
        d.pretty()
    );
}

#[test]
fn agent_doctor_names_dropped_server_traffic_as_a_bounded_timeout() {
    let site = site();
    let host = AgentHost::start(&site, &site.clean_agent());
    host.drop_tcp_to(&site.net.gateway, &site.web_port);
    // The premise: the server no longer answers this host; NATS still does.
    assert_eq!(host.http_answer(&site.net.gateway, &site.web_port), "");
    assert!(host
        .nats_greeting(&site.net.gateway, &site.nats_port)
        .starts_with("INFO "));
    let d = host.doctor();
    let f = d.the_one_error("server", "(TCP)", Some("timed out"));
    let addr = format!("{}:{}", site.net.gateway, site.web_port);
    assert!(text(&f["subject"]).contains(&addr), "{}", d.pretty());
    let later = d.any_of("server", after(&SERVER_STAGES, "(TCP)"));
    assert!(later.is_empty(), "the server chain stops at TCP:\n{}", d.pretty());
    // Every network step is bounded: the whole diagnosis ends in seconds (the issue's figure for a
    // host with every link broken, as a ceiling; the benchmark measures it).
    assert!(d.took < Duration::from_secs(15), "took {:?}:\n{}", d.took, d.pretty());
}

#[test]
fn agent_doctor_names_a_ca_that_did_not_sign_the_nats_certificate() {
    let site = site();
    let files = AgentFiles {
        ca: site.stranger_ca.clone(),
        ..site.clean_agent()
    };
    let premise = nats_answer(&files.nats_url, &files.ca);
    assert!(premise.starts_with("SSLCertVerificationError"), "{premise}");
    let d = diagnose(&site, &files);
    let f = d.the_one_error("agent-nats", "(TLS)", None);
    let addr = format!("{}:{}", site.net.gateway, site.nats_port);
    assert!(
        text(&f["subject"]).starts_with("NATS ") && text(&f["subject"]).contains(&addr),
        "{}",
        d.pretty()
    );
    let later = d.any_of("agent-nats", after(&NATS_STAGES, "(TLS)"));
    assert!(later.is_empty(), "the NATS chain stops at TLS:\n{}", d.pretty());
    d.prints_no_secret(&[&site.nats_password]);
}

#[test]
fn agent_doctor_names_a_wrong_nats_password() {
    let site = site();
    let wrong = format!("wrong{}", random_alnum(12));
    let files = AgentFiles {
        nats_url: format!(
            "tls://{}:{wrong}@{}:{}",
            site.nats_user, site.net.gateway, site.nats_port
        ),
        ..site.clean_agent()
    };
    let premise = nats_answer(&files.nats_url, &files.ca);
    assert!(premise.contains("Authorization Violation"), "{premise}");
    let d = diagnose(&site, &files);
    let f = d.the_one_error("agent-nats", "(authentication)", None);
    let addr = format!("{}:{}", site.net.gateway, site.nats_port);
    assert!(text(&f["subject"]).contains(&addr), "{}", d.pretty());
    let later = d.any_of("agent-nats", after(&NATS_STAGES, "(authentication)"));
    assert!(
        later.is_empty(),
        "the NATS chain stops at authentication:\n{}",
        d.pretty()
    );
    d.prints_no_secret(&[&wrong, &site.nats_password]);
}
