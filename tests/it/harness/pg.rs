//! A throwaway PostgreSQL cluster from Debian's `postgresql` package.
//!
//! initdb and the server refuse to run as root, so when the tests run as root the cluster's
//! directory is handed to the `postgres` user and initdb / pg_ctl run through `runuser`. Clients
//! (psql here, bkbundle in the tests) connect over TCP to 127.0.0.1 with scram-sha-256 password
//! authentication as the superuser `postgres`, as they would to a real install.

use super::{free_port, is_root, random_alnum, run, run_ok, server_tempdir, tail, wait_for};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

const INSTALL_HINT: &str = "install PostgreSQL with `apt-get install postgresql` (or run scripts/setup.sh)";
/// The OS user that owns and runs the cluster when the tests run as root.
const OS_USER: &str = "postgres";

/// A running throwaway PostgreSQL cluster on 127.0.0.1; stopped and deleted on drop.
pub struct PgCluster {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Password of the superuser `postgres` (letters and digits only).
    pub password: String,
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    as_root: bool,
    // Last: removed after `drop` has stopped the server.
    dir: tempfile::TempDir,
}

impl PgCluster {
    /// initdb a fresh cluster in a new temporary directory and start it on a free port, with a
    /// generated superuser password; returns once it accepts password logins over TCP (bounded;
    /// panics with the server log otherwise). Panics naming `apt-get install postgresql` when the
    /// binaries are missing.
    pub fn start() -> PgCluster {
        let bin = find_bin_dir();
        let as_root = is_root();
        let dir = server_tempdir("bkbundle-pg-");
        let data = dir.path().join("data");
        let sockets = dir.path().join("sockets");
        let log = dir.path().join("postgres.log");
        let pwfile = dir.path().join("pwfile");
        let password = random_alnum(24);
        std::fs::create_dir(&sockets).expect("create the socket directory");
        std::fs::write(&pwfile, format!("{password}\n")).expect("write the password file");
        if as_root {
            chown_to_postgres(dir.path());
        }

        let mut cluster = PgCluster {
            port: 0,
            password,
            bin,
            data,
            log,
            as_root,
            dir,
        };

        let initdb = cluster.bin.join("initdb");
        let out = run(
            cluster
                .pg_command(&initdb)
                .arg("-D")
                .arg(&cluster.data)
                .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display())),
            "initdb",
            INSTALL_HINT,
        );
        let _ = std::fs::remove_file(&pwfile);
        if !out.status.success() {
            panic!(
                "initdb failed ({}) in {}:\n{}\n{}",
                out.status,
                cluster.data.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        // Settings for a fast, private, disposable server. Appended by us (root or the owner);
        // the file keeps its owner.
        let conf = format!(
            "\n# bkbundle test harness\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             password_encryption = 'scram-sha-256'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 50\n\
             shared_buffers = '32MB'\n",
            sockets.display()
        );
        append(&cluster.data.join("postgresql.conf"), &conf);

        // The port is chosen at start so that a port taken in the meantime means a retry.
        for attempt in 1..=3 {
            let port = free_port();
            let pg_ctl = cluster.bin.join("pg_ctl");
            let out = run(
                cluster
                    .pg_command(&pg_ctl)
                    .arg("-D")
                    .arg(&cluster.data)
                    .arg("-l")
                    .arg(&cluster.log)
                    .args(["-o", &format!("-p {port}"), "-w", "-t", "30", "start"]),
                "pg_ctl start",
                INSTALL_HINT,
            );
            if out.status.success() {
                cluster.port = port;
                break;
            }
            let log = tail(&cluster.log, 4000);
            if attempt < 3 && log.contains("could not bind") {
                continue;
            }
            panic!(
                "PostgreSQL did not start on 127.0.0.1:{port} ({}):\n{}\n{}\n--- {} ---\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                cluster.log.display()
            );
        }

        // pg_ctl -w waited for the postmaster; also wait until a password login over TCP works.
        let mut last = String::new();
        let ready = wait_for(Duration::from_secs(30), || {
            match cluster.try_psql_as("postgres", &cluster.password, "postgres", "select 1") {
                Ok(v) if v == "1" => Some(()),
                Ok(v) => {
                    last = v;
                    None
                }
                Err(e) => {
                    last = e;
                    None
                }
            }
        });
        if ready.is_none() {
            panic!(
                "PostgreSQL on 127.0.0.1:{} does not accept logins after 30 s: {last}\n--- log ---\n{}",
                cluster.port,
                tail(&cluster.log, 4000)
            );
        }
        cluster
    }

    /// The one cluster of this test process, started on first use (by whichever test thread
    /// comes first; the others wait for it). Tests that share it must use their own databases
    /// ([`super::unique_db_name`]). A static is never dropped, so a `libc::atexit` hook stops the
    /// server and removes its directory when the test process exits (normally or through
    /// `process::exit`, as the test harness does on failure; not when it is killed).
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        extern "C" fn stop_shared() {
            if let Some(cluster) = SHARED.get() {
                cluster.stop();
                let _ = std::fs::remove_dir_all(cluster.dir.path());
            }
        }
        SHARED.get_or_init(|| {
            let cluster = PgCluster::start();
            // SAFETY: registers a plain `extern "C" fn` without arguments, as atexit(3) expects.
            let rc = unsafe { libc::atexit(stop_shared) };
            if rc != 0 {
                // Dropping it stops the server again instead of leaving it running after the tests.
                drop(cluster);
                panic!("atexit could not register the shared PostgreSQL cluster's cleanup (rc {rc})");
            }
            cluster
        })
    }

    /// `postgres://postgres:PASSWORD@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of database `db` on this cluster, as the superuser.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres:{}@127.0.0.1:{}/{db}", self.password, self.port)
    }

    /// Creates database `name` and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")),
        );
        self.url_for(name)
    }

    /// Runs `sql` in database `db` with `psql -At` as the superuser over TCP and returns its
    /// output, trimmed (rows on lines, columns separated by `|`); panics with psql's stderr
    /// when it fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql_as("postgres", &self.password, db, sql)
            .unwrap_or_else(|e| panic!("psql on {db} failed for `{sql}`: {e}"))
    }

    /// Like [`PgCluster::psql`] with any user and password; `Err(stderr)` when psql fails
    /// (e.g. a wrong password).
    pub fn try_psql_as(&self, user: &str, password: &str, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = self.psql_command(user, password, db);
        cmd.args(["-c", sql]);
        let out: Output = run(&mut cmd, "psql", INSTALL_HINT);
        psql_result(out)
    }

    /// Runs `script` in database `db` as the superuser the way `psql -f` runs a file (statement
    /// by statement, psql's meta-commands allowed, stopping at the first error), fed on stdin, so
    /// its size is not bounded by the command line. Returns the output, trimmed; panics with
    /// psql's stderr and `what` when it fails.
    pub fn psql_script(&self, db: &str, script: &str, what: &str) -> String {
        let mut cmd = self.psql_command("postgres", &self.password, db);
        cmd.args(["-q", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("psql: cannot run {:?}: {e}: {INSTALL_HINT}", cmd.get_program()),
        };
        let mut stdin = child.stdin.take().expect("psql's stdin is piped");
        let script_owned = script.to_string();
        // Written from another thread so that psql's output cannot fill a pipe and stall both.
        let writer = std::thread::spawn(move || stdin.write_all(script_owned.as_bytes()));
        let out = child.wait_with_output().expect("wait for psql");
        let written = writer.join().expect("the thread feeding psql panicked");
        match psql_result(out) {
            Ok(v) => {
                written.unwrap_or_else(|e| panic!("feed {what} to psql on {db}: {e}"));
                v
            }
            Err(e) => panic!("psql on {db} failed running {what}: {e}"),
        }
    }

    /// `psql -X -At -v ON_ERROR_STOP=1` over TCP to 127.0.0.1 as `user`, with every libpq
    /// variable of our environment removed.
    fn psql_command(&self, user: &str, password: &str, db: &str) -> Command {
        let mut cmd = Command::new(self.bin.join("psql"));
        for var in [
            "PGHOST",
            "PGHOSTADDR",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGSERVICE",
            "PGSERVICEFILE",
            "PGPASSFILE",
            "PGSSLMODE",
            "PGOPTIONS",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .env("PGPASSFILE", "/dev/null")
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", user, "-d", db]);
        cmd
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server log so far (for assertions and failure messages).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// A command for a PostgreSQL server program, run as the `postgres` user when we are root.
    fn pg_command(&self, program: &Path) -> Command {
        let mut cmd = if self.as_root {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", OS_USER, "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        };
        // A working directory the postgres user can enter, whatever ours is.
        cmd.current_dir(self.dir.path()).env_remove("PGDATA");
        cmd
    }
}

impl PgCluster {
    /// Stops the server (immediate shutdown, waited for); does nothing for a cluster that never
    /// started.
    fn stop(&self) {
        if self.port == 0 {
            return; // never started
        }
        let pg_ctl = self.bin.join("pg_ctl");
        let _ = self
            .pg_command(&pg_ctl)
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "10", "stop"])
            .output();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        // `dir` (TempDir) is removed when the fields drop, after this.
    }
}

/// psql's trimmed stdout, or `Err` with its exit status and stderr.
fn psql_result(out: Output) -> Result<String, String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "psql exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has initdb.
fn find_bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version = name.split('.').next().and_then(|v| v.parse::<u32>().ok());
            let bin = entry.path().join("bin");
            if let Some(version) = version {
                if bin.join("initdb").is_file()
                    && bin.join("pg_ctl").is_file()
                    && bin.join("psql").is_file()
                    && best.as_ref().is_none_or(|(v, _)| version > *v)
                {
                    best = Some((version, bin));
                }
            }
        }
    }
    match best {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL server binaries (initdb, pg_ctl, psql) under {}/*/bin: {INSTALL_HINT}",
            root.display()
        ),
    }
}

fn chown_to_postgres(dir: &Path) {
    run_ok(
        Command::new("chown")
            .arg("-R")
            .arg(format!("{OS_USER}:{OS_USER}"))
            .arg(dir),
        "chown the cluster directory to the postgres user",
        INSTALL_HINT,
    );
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} to append: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}
