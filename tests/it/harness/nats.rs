//! A throwaway `nats-server` with JetStream, from Debian's `nats-server` package.
//!
//! The server gets a generated config file in its own temporary directory (JetStream store,
//! authorization, TLS), listens on a free 127.0.0.1 port and is killed on drop. For TLS a
//! throwaway CA and a server certificate for `localhost` / 127.0.0.1 are made with the `openssl`
//! command. Note that nats-server 2.9 (Debian 12) sends its `INFO` line in plain text before the
//! TLS handshake, as the NATS protocol's classic TLS upgrade does.

use super::{free_port, run_ok, server_tempdir, tail, wait_for};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const INSTALL_HINT: &str = "install it with `apt-get install nats-server` (or run scripts/setup.sh)";
const OPENSSL_HINT: &str = "install it with `apt-get install openssl` (or run scripts/setup.sh)";

/// How to configure a [`NatsServer`]. `Default` is a plain server without authentication.
#[derive(Clone, Debug, Default)]
pub struct NatsOpts {
    /// Require this user and password (`authorization { user, password }`).
    pub user_password: Option<(String, String)>,
    /// Require this token (`authorization { token }`). Not together with `user_password`.
    pub token: Option<String>,
    /// Serve TLS only, with a generated CA (see [`NatsServer::ca_file`]).
    pub tls: bool,
    /// With `tls`: also require a client certificate signed by that CA (see
    /// [`NatsServer::client_cert`]).
    pub verify_clients: bool,
    /// Start without JetStream (to test that it is reported as missing).
    pub no_jetstream: bool,
    /// Decentralised (JWT) authentication: an operator, an account with JetStream and one user,
    /// whose credentials file is [`NatsServer::creds_file`].
    pub jwt: bool,
}

/// A running `nats-server` with JetStream on 127.0.0.1; killed and deleted on drop.
pub struct NatsServer {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// With `tls`: the PEM file of the CA that signed the server's certificate (for
    /// `localhost` and 127.0.0.1).
    pub ca_file: Option<PathBuf>,
    /// With `verify_clients`: a client certificate and key (PEM) the server accepts.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// With `jwt`: the `.creds` file (user JWT and nkey seed) of a user the server accepts.
    pub creds_file: Option<PathBuf>,
    /// The options it was started with.
    pub opts: NatsOpts,
    child: Child,
    log: PathBuf,
    store: PathBuf,
    // Last: removed after `drop` has killed the server.
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `nats-server` with JetStream (store in a temporary directory) on a free loopback
    /// port and returns once the port answers with an `INFO` line (bounded; panics with the
    /// server's log otherwise). Panics naming the install command when `nats-server` is missing.
    pub fn start(opts: NatsOpts) -> NatsServer {
        assert!(
            !(opts.user_password.is_some() && opts.token.is_some()),
            "NatsOpts: nats-server accepts either a user/password or a token, not both"
        );
        let binary = find_nats_server();
        let dir = server_tempdir("bkbundle-nats-");
        let store = dir.path().join("jetstream");
        let log = dir.path().join("nats-server.log");
        let conf_path = dir.path().join("nats-server.conf");
        assert!(!opts.verify_clients || opts.tls, "NatsOpts: verify_clients needs tls");
        let ca_file = opts.tls.then(|| make_certs(dir.path()));
        let client_cert = opts.verify_clients.then(|| make_client_cert(dir.path()));
        let creds_file = opts.jwt.then(|| mint_jwt(dir.path()));

        for attempt in 1..=3 {
            let port = free_port();
            let conf = config(&opts, port, &store, dir.path());
            std::fs::write(&conf_path, conf).expect("write nats-server.conf");
            let logf = std::fs::File::create(&log).expect("create nats-server.log");
            let mut child = match Command::new(&binary)
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(logf.try_clone().expect("clone log file handle"))
                .stderr(logf)
                .spawn()
            {
                Ok(child) => child,
                Err(e) => panic!("cannot run {}: {e}; {INSTALL_HINT}", binary.display()),
            };
            let mut exited = None;
            let ready = wait_for(Duration::from_secs(15), || {
                if let Ok(Some(status)) = child.try_wait() {
                    exited = Some(status);
                    return Some(false);
                }
                read_info(port).ok().map(|_| true)
            });
            if ready == Some(true) {
                return NatsServer {
                    port,
                    ca_file,
                    client_cert,
                    creds_file,
                    opts,
                    child,
                    log,
                    store,
                    dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            let text = tail(&log, 4000);
            match exited {
                Some(_) if attempt < 3 && text.contains("address already in use") => continue,
                Some(status) => {
                    panic!("nats-server exited with {status} before answering on 127.0.0.1:{port}\n--- log ---\n{text}")
                }
                None => {
                    panic!("nats-server did not answer with INFO on 127.0.0.1:{port} within 15 s\n--- log ---\n{text}")
                }
            }
        }
        unreachable!("the loop above returns or panics")
    }

    /// `nats://127.0.0.1:PORT`, or `tls://127.0.0.1:PORT` with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Connects and returns the server's `INFO {...}` line (sent in plain text even with TLS).
    pub fn info(&self) -> String {
        read_info(self.port).unwrap_or_else(|e| panic!("read INFO from 127.0.0.1:{}: {e}", self.port))
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the first line a NATS server sends and checks it is `INFO`.
fn read_info(port: u16) -> std::io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.starts_with("INFO ") {
        Ok(line.trim_end().to_string())
    } else {
        Err(std::io::Error::other(format!("expected an INFO line, got {line:?}")))
    }
}

fn find_nats_server() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    // Debian installs it in /usr/sbin, which a non-root PATH may lack.
    let sbin = PathBuf::from("/usr/sbin/nats-server");
    if sbin.is_file() {
        return sbin;
    }
    panic!("nats-server not found on PATH nor in /usr/sbin: {INSTALL_HINT}");
}

/// A config-file string literal (our values are paths and generated letters and digits).
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn config(opts: &NatsOpts, port: u16, store: &Path, dir: &Path) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "# bkbundle test harness");
    let _ = writeln!(c, "listen: \"127.0.0.1:{port}\"");
    let _ = writeln!(c, "server_name: \"bkbundle-test-{port}\"");
    if !opts.no_jetstream {
        let _ = writeln!(c, "jetstream {{\n  store_dir: {}\n}}", quoted(&store.to_string_lossy()));
    }
    if let Some((user, password)) = &opts.user_password {
        let _ = writeln!(
            c,
            "authorization {{\n  user: {}\n  password: {}\n}}",
            quoted(user),
            quoted(password)
        );
    }
    if opts.jwt {
        let _ = writeln!(c, "include \"operator.conf\"");
    }
    if let Some(token) = &opts.token {
        let _ = writeln!(c, "authorization {{\n  token: {}\n}}", quoted(token));
    }
    if opts.tls {
        let _ = writeln!(
            c,
            "tls {{\n  cert_file: {}\n  key_file: {}\n  timeout: 5\n{}}}",
            quoted(&dir.join("server.pem").to_string_lossy()),
            quoted(&dir.join("server.key").to_string_lossy()),
            if opts.verify_clients {
                format!(
                    "  ca_file: {}\n  verify: true\n",
                    quoted(&dir.join("ca.pem").to_string_lossy())
                )
            } else {
                String::new()
            }
        );
    }
    c
}

/// Mints an operator, accounts and a user in `dir` (`operator.conf`, `user.creds`) with
/// `mint_nats_jwt.py` beside this file; returns the credentials file.
pub fn mint_jwt(dir: &Path) -> PathBuf {
    let script = super::repo_root().join("tests/it/harness/mint_nats_jwt.py");
    run_ok(
        Command::new("python3").arg(&script).arg(dir),
        "python3 mint_nats_jwt.py",
        "install Python's cryptography with `pip install cryptography` (or run scripts/setup.sh)",
    );
    dir.join("user.creds")
}

/// Makes `ca.pem`/`ca.key` and `server.pem`/`server.key` (EC P-256, SAN `localhost` and
/// 127.0.0.1, valid for two days) in `dir`; returns the CA file. The harness CA: the test
/// registry's TLS uses it too.
pub(super) fn make_certs(dir: &Path) -> PathBuf {
    let openssl = |args: &[&str], what: &str| {
        run_ok(Command::new("openssl").args(args).current_dir(dir), what, OPENSSL_HINT);
    };
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=bkbundle test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        "openssl: make the test CA",
    );
    issue(
        dir,
        "server",
        "/CN=localhost",
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n\
         basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\n",
    );
    dir.join("ca.pem")
}

/// Makes `client.pem`/`client.key`, signed by the CA [`make_certs`] made in `dir`.
fn make_client_cert(dir: &Path) -> (PathBuf, PathBuf) {
    issue(
        dir,
        "client",
        "/CN=bkbundle-client",
        "basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature\n\
         extendedKeyUsage = clientAuth\n",
    )
}

/// Makes `NAME.key` (EC P-256) and `NAME.pem` for `subject` with the extensions `ext`, signed by
/// `ca.pem`/`ca.key` in `dir`, valid for two days.
fn issue(dir: &Path, name: &str, subject: &str, ext: &str) -> (PathBuf, PathBuf) {
    let openssl = |args: &[&str], what: &str| {
        run_ok(Command::new("openssl").args(args).current_dir(dir), what, OPENSSL_HINT);
    };
    let (key, csr, pem, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ],
        &format!("openssl: make the {name} key and request"),
    );
    std::fs::write(dir.join(&extfile), ext).unwrap_or_else(|e| panic!("write {extfile}: {e}"));
    let serial = format!(
        "0x{}",
        super::random_alnum(8)
            .as_bytes()
            .iter()
            .fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            },)
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial,
            "-days",
            "2",
            "-extfile",
            &extfile,
            "-out",
            &pem,
        ],
        &format!("openssl: sign the {name} certificate"),
    );
    (dir.join(pem), dir.join(key))
}
