//! A throwaway image registry: Debian's `docker-registry` (distribution 2.8), on a free loopback
//! port, storage in its own temporary directory, killed and deleted on drop.
//!
//! Three flavours: [`Registry::plain`] (HTTP, anonymous; the Docker engine pulls from it without
//! configuration because it allows plain HTTP on 127.0.0.0/8), [`Registry::tls_auth`] (TLS
//! with a certificate from the harness CA, as NATS's, and htpasswd basic auth, so clients meet
//! the `401` challenge flow registries use), and [`Registry::token_auth`] (TLS as that one, and
//! distribution's token auth: a bearer token from `registry_token.py` beside this file, a token
//! server over HTTPS with the same certificate on its own port, the flow Harbor uses). Each test
//! can start its own: one starts in well under a second. [`skopeo`] and the `skopeo_*` methods read and fill a registry independently of
//! bkbundle; [`Registry::trust_in_engine`] makes the engine trust the TLS one's CA.

use super::{free_port, is_root, run, run_ok, server_tempdir, tail, wait_for};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const INSTALL_HINT: &str = "install it with `apt-get install docker-registry` (or run scripts/setup.sh)";
const HTPASSWD_HINT: &str = "install it with `apt-get install apache2-utils` (or run scripts/setup.sh)";
const PYTHON_HINT: &str =
    "install python3 and Python's cryptography with `pip install cryptography` (or run scripts/setup.sh)";
const SKOPEO_HINT: &str = "install it with `apt-get install skopeo` (or run scripts/setup.sh)";
const BINARY: &str = "/usr/bin/docker-registry";

/// The token auth settings of [`Registry::token_auth`] (the registry config's `auth: token:`).
pub const TOKEN_SERVICE: &str = "bkbundle-test";
pub const TOKEN_ISSUER: &str = "bkbundle-test-issuer";

/// How a registry authenticates its clients.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Auth {
    None,
    Htpasswd,
    Token,
}

/// A running registry; killed and its storage deleted on drop.
pub struct Registry {
    pub port: u16,
    /// `Some((user, password))` for the TLS flavours.
    pub credentials: Option<(String, String)>,
    auth: Auth,
    /// Whether the registry itself serves TLS.
    tls: bool,
    /// The token server of the token flavour, and its port.
    token_server: Option<Child>,
    pub token_port: Option<u16>,
    /// The CA that signed the TLS flavour's certificate (for `localhost` and 127.0.0.1).
    ca: Option<PathBuf>,
    child: Option<Child>,
    log: PathBuf,
    config: PathBuf,
    storage: PathBuf,
    // Last: removed after `drop` has killed the server.
    dir: tempfile::TempDir,
}

impl Registry {
    /// Plain HTTP on 127.0.0.1, no authentication.
    pub fn plain() -> Registry {
        Registry::start(None, Auth::None, false)
    }

    /// TLS (the harness CA: [`Registry::ca_pem_path`]) and htpasswd basic auth for `user` with
    /// `password` (bcrypt, made with `htpasswd -B`).
    pub fn tls_auth(user: &str, password: &str) -> Registry {
        Registry::start(Some((user.to_string(), password.to_string())), Auth::Htpasswd, true)
    }

    /// TLS as [`Registry::tls_auth`], and token auth: the registry accepts bearer tokens signed
    /// by the token server's key (its self-signed certificate is the `rootcertbundle`), issued
    /// for service [`TOKEN_SERVICE`] by [`TOKEN_ISSUER`]. The token server
    /// (`https://127.0.0.1:TOKEN_PORT/token`, the harness CA's certificate) grants `user` with
    /// `password` every action asked for (but only `pull` under `readonly/`), refuses a wrong
    /// password with 401, and gives an anonymous request a token that grants nothing.
    pub fn token_auth(user: &str, password: &str) -> Registry {
        Registry::start(Some((user.to_string(), password.to_string())), Auth::Token, true)
    }

    /// [`Registry::token_auth`] with the registry itself on plain HTTP (its token server stays
    /// HTTPS, with the harness CA): an intranet registry whose auth lives elsewhere.
    pub fn token_auth_over_http(user: &str, password: &str) -> Registry {
        Registry::start(Some((user.to_string(), password.to_string())), Auth::Token, false)
    }

    fn start(credentials: Option<(String, String)>, auth: Auth, tls: bool) -> Registry {
        if !Path::new(BINARY).is_file() {
            panic!("{BINARY} not found: {INSTALL_HINT}");
        }
        let dir = server_tempdir("bkbundle-registry-");
        let storage = dir.path().join("data");
        let log = dir.path().join("registry.log");
        let config = dir.path().join("config.yml");
        let ca = credentials.as_ref().map(|(user, password)| {
            write_htpasswd(&dir.path().join("htpasswd"), user, password);
            let ca = super::nats::make_certs(dir.path());
            // skopeo's --cert-dir takes CA certificates as *.crt files of a directory.
            let certs = dir.path().join("certs");
            std::fs::create_dir_all(&certs).expect("create the registry's certs directory");
            std::fs::copy(&ca, certs.join("ca.crt")).expect("copy the CA into the certs directory");
            ca
        });
        let mut reg = Registry {
            port: 0,
            credentials,
            auth,
            tls,
            token_server: None,
            token_port: None,
            ca,
            child: None,
            log,
            config,
            storage,
            dir,
        };
        if auth == Auth::Token {
            reg.start_token_server();
        }
        for attempt in 1..=3 {
            reg.port = free_port();
            if let Some((user, password)) = &reg.credentials {
                // The login file names the host, port included.
                write_auth_file(&reg.dir.path().join("docker"), &reg.host(), user, password);
            }
            std::fs::write(&reg.config, reg.config_text()).expect("write the registry config");
            match reg.spawn() {
                Ok(()) => return reg,
                Err(text) if attempt < 3 && text.contains("address already in use") => continue,
                Err(text) => panic!(
                    "docker-registry did not start on 127.0.0.1:{} within 15 s\n--- log ---\n{text}",
                    reg.port
                ),
            }
        }
        unreachable!("the loop above returns or panics")
    }

    /// Start `registry_token.py` in the registry's directory (its settings in `token.json`, mode
    /// 0600: the password is never on a command line) and wait for the port it bound.
    fn start_token_server(&mut self) {
        let d = self.dir.path();
        let (user, password) = self.credentials.clone().expect("token auth has credentials");
        let conf = serde_json::json!({
            "user": user,
            "password": password,
            "service": TOKEN_SERVICE,
            "issuer": TOKEN_ISSUER,
            "tls": true,
        });
        let conf_path = d.join("token.json");
        std::fs::write(&conf_path, conf.to_string()).expect("write token.json");
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&conf_path, std::fs::Permissions::from_mode(0o600));
        let log_path = d.join("token.log");
        let logf = std::fs::File::create(&log_path).expect("create token.log");
        let script = super::repo_root().join("tests/it/harness/registry_token.py");
        let mut child = match Command::new("python3")
            .arg(&script)
            .arg(d)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("clone log file handle"))
            .stderr(logf)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("cannot run python3 {}: {e}; {PYTHON_HINT}", script.display()),
        };
        let port_file = d.join("token.port");
        let port = wait_for(Duration::from_secs(15), || {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(None);
            }
            std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.trim().parse::<u16>().ok())
                .map(Some)
        })
        .flatten();
        match port {
            Some(p) => {
                self.token_port = Some(p);
                self.token_server = Some(child);
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "registry_token.py did not start within 15 s ({PYTHON_HINT})\n--- log ---\n{}",
                    tail(&log_path, 4000)
                );
            }
        }
    }

    /// The token server's log so far (the token flavour; empty otherwise).
    pub fn token_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.path().join("token.log")).unwrap_or_default()).into_owned()
    }

    /// Start the process on `self.port` and wait until it answers; `Err(log)` when it does not.
    fn spawn(&mut self) -> Result<(), String> {
        let logf = std::fs::File::create(&self.log).expect("create registry.log");
        let mut child = match Command::new(BINARY)
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("clone log file handle"))
            .stderr(logf)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("cannot run {BINARY}: {e}; {INSTALL_HINT}"),
        };
        let port = self.port;
        let tls = self.tls;
        let log = self.log.clone();
        let ready = wait_for(Duration::from_secs(15), || {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(false);
            }
            let listening = std::fs::read_to_string(&log)
                .map(|t| t.contains(&format!("listening on 127.0.0.1:{port}")))
                .unwrap_or(false);
            (listening && answers(port, tls)).then_some(true)
        });
        if ready == Some(true) {
            self.child = Some(child);
            return Ok(());
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(tail(&self.log, 4000))
    }

    fn config_text(&self) -> String {
        let mut c = format!(
            "# bkbundle test harness\nversion: 0.1\nlog:\n  level: info\n  formatter: text\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{}\n  secret: {}\n",
            yaml_quoted(&self.storage),
            self.port,
            super::random_alnum(24)
        );
        let d = self.dir.path();
        if self.tls {
            c.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                yaml_quoted(&d.join("server.pem")),
                yaml_quoted(&d.join("server.key")),
            ));
        }
        match self.auth {
            Auth::None => {}
            Auth::Htpasswd => c.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: bkbundle-test\n    path: {}\n",
                yaml_quoted(&d.join("htpasswd"))
            )),
            Auth::Token => c.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                yaml_quoted(Path::new(&self.token_realm())),
                yaml_quoted(&d.join("signing.pem"))
            )),
        }
        c.push_str("health:\n  storagedriver:\n    enabled: false\n");
        c
    }

    /// The token flavour's realm, `https://127.0.0.1:TOKEN_PORT/token`.
    pub fn token_realm(&self) -> String {
        format!(
            "https://127.0.0.1:{}/token",
            self.token_port.expect("only Registry::token_auth has a token server")
        )
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Whether it serves TLS (with basic or token auth).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The harness CA's PEM file (the TLS flavour only; panics for the plain one).
    pub fn ca_pem_path(&self) -> &Path {
        self.ca
            .as_deref()
            .expect("a plain registry has no CA: use Registry::tls_auth")
    }

    /// A directory holding a `docker login` file (`config.json`) with this registry's credentials,
    /// for `DOCKER_CONFIG` (the TLS flavour only).
    pub fn docker_config_dir(&self) -> PathBuf {
        assert!(self.credentials.is_some(), "a plain registry takes no credentials");
        self.dir.path().join("docker")
    }

    /// Where the registry stores blobs and manifests.
    pub fn storage_dir(&self) -> &Path {
        &self.storage
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Stop the server (its storage stays until drop; a token server keeps running): what a
    /// registry that went down looks like.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port with the same storage, after [`Registry::stop`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the registry is running");
        if let Err(text) = self.spawn() {
            panic!(
                "docker-registry did not start again on 127.0.0.1:{}\n--- log ---\n{text}",
                self.port
            );
        }
    }

    /// Makes the host's Docker engine trust this registry's CA until the guard is dropped
    /// (`/etc/docker/certs.d/127.0.0.1:PORT/ca.crt`; the engine reads it at every pull, no
    /// restart). Needs root.
    pub fn trust_in_engine(&self) -> EngineTrust {
        let dir = engine_certs_dir(&self.host());
        assert!(is_root(), "writing {} needs root", dir.display());
        let created = !dir.exists();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        std::fs::copy(self.ca_pem_path(), dir.join("ca.crt"))
            .unwrap_or_else(|e| panic!("write {}/ca.crt: {e}", dir.display()));
        EngineTrust { dir, created }
    }

    /// The arguments that let skopeo reach this registry as a source (`inspect`, `copy`'s
    /// source): `--tls-verify=false`, or the CA directory and the auth file.
    fn skopeo_src_args(&self) -> Vec<String> {
        let mut args = if self.is_tls() {
            vec![format!("--cert-dir={}", self.dir.path().join("certs").display())]
        } else {
            vec!["--tls-verify=false".into()]
        };
        if self.credentials.is_some() {
            args.push(format!(
                "--authfile={}",
                self.docker_config_dir().join("config.json").display()
            ));
        }
        args
    }

    fn skopeo_dest_args(&self) -> Vec<String> {
        self.skopeo_src_args()
            .into_iter()
            .map(|a| a.replacen("--", "--dest-", 1))
            .collect()
    }

    /// `skopeo copy docker-daemon:IMAGE docker://HOST/DEST`: puts an image of the engine into
    /// the registry as `DEST` (`repo:tag`) without bkbundle. Panics unless it succeeds.
    pub fn skopeo_copy_from_daemon(&self, image: &str, dest: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet"])
            .args(self.skopeo_dest_args())
            .arg(format!("docker-daemon:{image}"))
            .arg(format!("docker://{}/{dest}", self.host()));
        run_ok(
            &mut cmd,
            &format!("skopeo copy {image} to {}/{dest}", self.host()),
            SKOPEO_HINT,
        );
    }

    /// `skopeo copy docker://HOST/SRC dir:DIR`: every blob of `SRC` (`repo:tag`) into `dir`,
    /// named by digest, with `manifest.json`. Panics unless it succeeds.
    pub fn skopeo_copy_to_dir(&self, src: &str, dir: &Path) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet"]);
        for a in self.skopeo_src_args() {
            cmd.arg(a.replacen("--", "--src-", 1));
        }
        cmd.arg(format!("docker://{}/{src}", self.host()))
            .arg(format!("dir:{}", dir.display()));
        run_ok(
            &mut cmd,
            &format!("skopeo copy {}/{src} to a directory", self.host()),
            SKOPEO_HINT,
        );
    }

    /// `skopeo inspect --raw docker://HOST/REF`: the manifest's bytes as the registry serves
    /// them, or `Err(skopeo's message)` (no such tag, refused, ...).
    pub fn skopeo_manifest(&self, reference: &str) -> Result<String, String> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["inspect", "--raw"])
            .args(self.skopeo_src_args())
            .arg(format!("docker://{}/{reference}", self.host()));
        let out = run(&mut cmd, "skopeo inspect", SKOPEO_HINT);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// The config digest (the image id) of the manifest `reference` (`repo:tag`) names, or
    /// `None` when the registry has no such manifest.
    pub fn image_id(&self, reference: &str) -> Option<String> {
        let text = match self.skopeo_manifest(reference) {
            Ok(t) => t,
            Err(e) if e.contains("manifest unknown") || e.contains("name unknown") => return None,
            Err(e) => panic!("skopeo inspect {}/{reference}: {e}", self.host()),
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("manifest of {reference} is not JSON: {e}\n{text}"));
        Some(
            v["config"]["digest"]
                .as_str()
                .unwrap_or_else(|| panic!("manifest of {reference} has no config digest: {text}"))
                .to_string(),
        )
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut c) = self.token_server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `/etc/docker/certs.d/HOST` (for the registry `HOST`, port included), where the Docker engine
/// looks for a registry's CA (`ca.crt`).
pub fn engine_certs_dir(host: &str) -> PathBuf {
    Path::new("/etc/docker/certs.d").join(host)
}

/// The engine trusts a test registry's CA while this lives (see [`Registry::trust_in_engine`]).
pub struct EngineTrust {
    dir: PathBuf,
    created: bool,
}

impl Drop for EngineTrust {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("ca.crt"));
        if self.created {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Runs `skopeo ARGS`; panics naming the install command when skopeo is missing.
pub fn skopeo(args: &[&str]) -> Output {
    run(Command::new("skopeo").args(args), "skopeo", SKOPEO_HINT)
}

/// Whether the registry answers on `port`: `GET /v2/` gives 200 (or 401) over HTTP; with TLS, the port
/// accepts a connection (the smoke test checks the TLS and auth side with skopeo).
fn answers(port: u16, tls: bool) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    if tls {
        return true;
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    // 401: it asks for a token (the token flavour over plain HTTP).
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && matches!(&head[9..12], b"200" | b"401")
}

/// `htpasswd -B` (bcrypt, what distribution accepts) for `user`, the password given on stdin.
fn write_htpasswd(path: &Path, user: &str, password: &str) {
    let mut child = match Command::new("htpasswd")
        .args(["-niB", user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("cannot run htpasswd: {e}; {HTPASSWD_HINT}"),
    };
    child
        .stdin
        .take()
        .expect("htpasswd's stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password to htpasswd");
    let out = child.wait_with_output().expect("wait for htpasswd");
    assert!(
        out.status.success(),
        "htpasswd -niB failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(path, &out.stdout).expect("write the htpasswd file");
}

/// `DIR/config.json`, a `docker login` file with `user`'s credentials for `host` (mode 0600).
fn write_auth_file(dir: &Path, host: &str, user: &str, password: &str) {
    use base64::Engine;
    std::fs::create_dir_all(dir).expect("create the docker config directory");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join("config.json");
    std::fs::write(&path, format!("{{\"auths\":{{\"{host}\":{{\"auth\":\"{auth}\"}}}}}}\n"))
        .expect("write the docker login file");
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
}

fn yaml_quoted(p: &Path) -> String {
    format!("\"{}\"", p.to_string_lossy().replace('\\', "\\\\").replace('"', "\\\""))
}
