//! The stack's own PostgreSQL, dumped and restored with the tools of the image it runs, through
//! the Docker Engine API (exec), streamed.
//!
//! Everything runs inside the database's container ([`Engine::exec_read`],
//! [`Engine::exec_write`]): the operator's host may have no PostgreSQL client at all, and a dump
//! must come from a `pg_dump` of the server's own version. Each command is one small `/bin/sh`
//! script ([`SCRIPT`]) that finds the tool (on `PATH` as in the official images, else in
//! Debian's `/usr/lib/postgresql/<major>/bin`), picks the server's socket (else 127.0.0.1) and
//! runs it. Database names, the user and the password reach the script only as environment
//! variables of the exec, never in its text or its arguments: a name may hold quotes, and an
//! error message that shows the command must not show a secret. SQL that needs a name reads it
//! as the psql variable `db` (`:'db'`, `%I` of `format`), so nothing is quoted by hand; the one
//! string built here is the libpq connection string, whose quoting rule is two characters.
//!
//! A dump is `pg_dump -Fc -Z0` (custom format, uncompressed: the backup file compresses it
//! itself) written to the caller's writer as it arrives; a restore is
//! `pg_restore --single-transaction --exit-on-error` fed from the caller's reader: all or
//! nothing. Memory stays bounded whatever the database's size.

use crate::engine::{display_command, Engine, ExecOutcome};
use crate::error::{Error, Result};
use serde::Deserialize;
use std::io;
use zeroize::Zeroizing;

/// Finds and runs a PostgreSQL tool in the container: `sh -c SCRIPT bkbundle-pg TOOL ARGS...`.
///
/// The environment carries what varies: `BKB_CONNINFO` (appended as `-d`), `PGPASSWORD`,
/// and for psql `BKB_SQL` (its input) and `BKB_DB` (the psql variable `db`).
const SCRIPT: &str = r#"set -eu
tool="$1"
shift
# On PATH in the official images; else Debian's layout, the newest major that has the tool.
bin="$(command -v "$tool" 2>/dev/null || true)"
if [ -z "$bin" ]; then
    best=-1
    for d in /usr/lib/postgresql/*/bin; do
        major="${d#/usr/lib/postgresql/}"
        major="${major%%/*}"
        major="${major%%.*}"
        case "$major" in "" | *[!0-9]*) continue ;; esac
        if [ -x "$d/$tool" ] && [ "$major" -gt "$best" ]; then
            best="$major"
            bin="$d/$tool"
        fi
    done
fi
if [ -z "$bin" ]; then
    echo "bkbundle: $tool is neither on PATH nor in /usr/lib/postgresql/*/bin in this container" >&2
    exit 127
fi
# The server's own socket (where pg_hba usually trusts local users), else loopback.
if [ -z "${PGHOST:-}" ]; then
    for d in /var/run/postgresql /run/postgresql /tmp; do
        if [ -S "$d/.s.PGSQL.${PGPORT:-5432}" ]; then
            PGHOST="$d"
            break
        fi
    done
    PGHOST="${PGHOST:-127.0.0.1}"
    export PGHOST
fi
if [ -n "${BKB_SQL+x}" ]; then
    printf '%s\n' "$BKB_SQL" | "$bin" "$@" -v "db=${BKB_DB-}" -d "$BKB_CONNINFO"
    exit
fi
exec "$bin" "$@" -d "$BKB_CONNINFO"
"#;

/// `$0` of the script: what `ps` in the container shows.
const SCRIPT_NAME: &str = "bkbundle-pg";

/// The database catalog queries connect to; for work on `postgres` itself, [`FALLBACK_DB`].
const MAINTENANCE_DB: &str = "postgres";
const FALLBACK_DB: &str = "template1";

/// psql for catalog queries: no psqlrc, unaligned tuples only, quiet (no command tags), stop at
/// the first error.
const PSQL: [&str; 5] = ["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"];

const PG_DUMP: [&str; 4] = ["-Fc", "-Z0", "--no-owner", "--no-privileges"];

const PG_RESTORE: [&str; 4] = [
    "--single-transaction",
    "--exit-on-error",
    "--no-owner",
    "--no-privileges",
];

/// Non-template databases that take connections (and are not half-dropped: `datconnlimit = -2`
/// marks an invalid database since PostgreSQL 15.4), with their sizes, as one JSON array.
const SQL_DATABASES: &str = "SELECT coalesce(json_agg(json_build_object('name', datname, 'size_bytes', \
     pg_database_size(oid)) ORDER BY datname), '[]') FROM pg_database \
     WHERE NOT datistemplate AND datallowconn AND datconnlimit <> -2";

/// Ordinary tables of the database connected to, outside the system schemas (and not temporary).
const SQL_TABLES: &str = "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND c.relpersistence <> 't' \
     AND n.nspname NOT IN ('pg_catalog', 'information_schema')";

const SQL_VERSION: &str = "SELECT current_setting('server_version')";
const SQL_LISTEN: &str = "SELECT current_setting('listen_addresses')";

/// From template0: template1 may hold objects of its own that the dump's would collide with.
/// The existence check keeps a second create quiet; `VERBOSITY verbose` puts the SQLSTATE in
/// the message, so a create that lost a race to another session is recognised (42P04,
/// duplicate_database) whatever the server's language.
const SQL_CREATE: &str = "\\set VERBOSITY verbose
SELECT format('CREATE DATABASE %I TEMPLATE template0', :'db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')
\\gexec";

/// `WITH (FORCE)` (PostgreSQL 13+) ends the sessions still on the database; an older server
/// refuses while any is.
const SQL_DROP: &str = "SELECT format(CASE WHEN current_setting('server_version_num')::int >= 130000 \
     THEN 'DROP DATABASE IF EXISTS %I WITH (FORCE)' ELSE 'DROP DATABASE IF EXISTS %I' END, :'db')
\\gexec";

/// A database of the server, as `bkbundle backup` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    pub name: String,
    /// `pg_database_size`: the files on disk, not the size of a dump.
    pub size_bytes: u64,
    /// Ordinary tables outside `pg_catalog` and `information_schema`.
    pub tables: u64,
}

/// The PostgreSQL server of one container, reached as `user` through exec in that container.
pub struct Postgres<'a> {
    engine: &'a Engine,
    container_id: String,
    container_name: String,
    user: String,
    /// Wiped when dropped; it leaves only as the exec's `PGPASSWORD`.
    password: Option<Zeroizing<String>>,
}

impl<'a> Postgres<'a> {
    pub fn new(
        engine: &'a Engine,
        container_id: &str,
        container_name: &str,
        user: &str,
        password: Option<&str>,
    ) -> Self {
        Postgres {
            engine,
            container_id: container_id.to_string(),
            container_name: container_name.to_string(),
            user: user.to_string(),
            password: password.map(|p| Zeroizing::new(p.to_string())),
        }
    }

    /// The server's version, e.g. `15.14` (without the packager's suffix).
    pub async fn server_version(&self) -> Result<String> {
        let out = self
            .psql(MAINTENANCE_DB, SQL_VERSION, None, "reading the server version")
            .await?;
        parse_version(&out).ok_or_else(|| {
            Error::external(format!(
                "PostgreSQL in container {} answered {out:?} when asked its version",
                self.container_name
            ))
        })
    }

    /// Whether the server listens on the network (`listen_addresses` is not empty). The postgres
    /// images' first start sets the cluster up with a temporary server on the socket alone
    /// (`listen_addresses=''`), then stops it: that one answers too, for an instant.
    pub async fn listens(&self) -> Result<bool> {
        let out = self
            .psql(MAINTENANCE_DB, SQL_LISTEN, None, "reading listen_addresses")
            .await?;
        Ok(!out.trim().is_empty())
    }

    /// Every non-template database that takes connections, by name, with its size and number of
    /// tables (one query in each database).
    pub async fn databases(&self) -> Result<Vec<Database>> {
        let out = self
            .psql(MAINTENANCE_DB, SQL_DATABASES, None, "listing the databases")
            .await?;
        let listed = parse_databases(&out).map_err(|e| {
            Error::internal(format!(
                "PostgreSQL in container {} listed its databases in a form bkbundle cannot read ({e}): {}",
                self.container_name,
                out.chars().take(200).collect::<String>()
            ))
        })?;
        let mut databases = Vec::with_capacity(listed.len());
        for (name, size_bytes) in listed {
            let what = format!("counting the tables of database \"{name}\"");
            let out = self.psql(&name, SQL_TABLES, None, &what).await?;
            let tables = out.trim().parse().map_err(|_| {
                Error::internal(format!(
                    "PostgreSQL in container {} answered {out:?} when {what}, not a number",
                    self.container_name
                ))
            })?;
            databases.push(Database {
                name,
                size_bytes,
                tables,
            });
        }
        Ok(databases)
    }

    /// `pg_dump -Fc -Z0 --no-owner --no-privileges` of `db`, written to `out` as it arrives;
    /// returns the bytes written. A failed dump is an error naming the database, the container
    /// and what pg_dump said (`out` then holds a partial dump the caller must discard).
    pub async fn dump(&self, db: &str, out: &mut (dyn io::Write + Send)) -> Result<u64> {
        let what = format!("pg_dump of database \"{db}\" in container {}", self.container_name);
        let cmd = command("pg_dump", &PG_DUMP);
        let env = self.env(db, None, None);
        let mut counted = Counted { inner: out, bytes: 0 };
        let outcome = self
            .engine
            .exec_read(&self.container_id, &cmd, &env, &mut counted)
            .await
            .map_err(|e| context(&what, e))?;
        if !outcome.success() {
            return Err(self.failed(&what, &cmd, &outcome).hint(format!(
                "check the database exists and {} may read all of it: `docker exec {} psql -U {} -l`",
                self.user, self.container_name, self.user
            )));
        }
        Ok(counted.bytes)
    }

    /// `CREATE DATABASE` (from template0); one that exists already is left as it is.
    pub async fn create_database(&self, db: &str) -> Result<()> {
        let what = format!("creating database \"{db}\"");
        match self.psql(maintenance_for(db), SQL_CREATE, Some(db), &what).await {
            Err(e) if e.message.contains("42P04") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// `DROP DATABASE IF EXISTS ... WITH (FORCE)`: the sessions still on it are ended. The
    /// session that drops is never on it (for `postgres` itself it connects to template1).
    pub async fn drop_database(&self, db: &str) -> Result<()> {
        let on = maintenance_for(db);
        if on == db {
            // Unreachable with maintenance_for's choice; kept so a change there cannot turn into
            // a confusing "cannot drop the currently open database".
            return Err(Error::internal(format!(
                "refusing to drop database \"{db}\" in container {}: it is the database the session is on",
                self.container_name
            )));
        }
        self.psql(on, SQL_DROP, Some(db), &format!("dropping database \"{db}\""))
            .await
            .map(|_| ())
    }

    /// `pg_restore --single-transaction --exit-on-error --no-owner --no-privileges` into `db`
    /// (which should be empty: [`Postgres::create_database`]) from `input`, a custom-format
    /// dump: all or nothing. A failure is an error naming the database, the container and what
    /// pg_restore said (the object or row that failed), and nothing of the dump is left in the
    /// database: the one transaction rolled back.
    pub async fn restore(&self, db: &str, input: &mut (dyn io::Read + Send)) -> Result<()> {
        let what = format!("restore of database \"{db}\" in container {}", self.container_name);
        let cmd = command("pg_restore", &PG_RESTORE);
        let env = self.env(db, None, None);
        let outcome = self
            .engine
            .exec_write(&self.container_id, &cmd, &env, input)
            .await
            .map_err(|e| context(&what, e))?;
        if !outcome.success() {
            let mut e = self.failed(&what, &cmd, &outcome);
            e.message.push_str(&format!(
                "\nnothing was restored: pg_restore ran in one transaction, which rolled back; database \"{db}\" is as it was before"
            ));
            return Err(e.hint(
                "pg_restore's last lines above name the object or row that failed; restore into an \
                 empty database (one that already holds the objects fails on the first of them), \
                 and check the dump is whole (a cut dump fails at its end)",
            ));
        }
        Ok(())
    }

    /// The exec environment: where to connect (`dbname`), as whom, the password; for psql the
    /// SQL and the variable `db`.
    fn env(&self, connect_to: &str, sql: Option<&str>, db_var: Option<&str>) -> Vec<String> {
        exec_env(
            connect_to,
            &self.user,
            self.password.as_ref().map(|p| p.as_str()),
            sql,
            db_var,
        )
    }

    /// psql of `sql` in database `connect_to`, with `db` as the psql variable `db`; its output.
    async fn psql(&self, connect_to: &str, sql: &str, db: Option<&str>, what: &str) -> Result<String> {
        let what = format!("{what} in container {} (psql)", self.container_name);
        let cmd = command("psql", &PSQL);
        let env = self.env(connect_to, Some(sql), db);
        // Catalog answers are small (a line per database at most): kept in memory.
        let mut out = Vec::new();
        let outcome = self
            .engine
            .exec_read(&self.container_id, &cmd, &env, &mut out)
            .await
            .map_err(|e| context(&what, e))?;
        if !outcome.success() {
            return Err(self.failed(&what, &cmd, &outcome));
        }
        Ok(String::from_utf8_lossy(&out).trim_end_matches('\n').to_string())
    }

    /// The error of a tool that exited non-zero (or whose exit code the engine did not report).
    fn failed(&self, what: &str, cmd: &[String], outcome: &ExecOutcome) -> Error {
        let exit = match outcome.exit_code {
            Some(127) if outcome.stderr_tail.contains("bkbundle:") => "the tool is missing".to_string(),
            Some(code) => format!("exit code {code}"),
            None => "no exit code reported".to_string(),
        };
        let said = outcome.stderr_tail.trim();
        let said = if said.is_empty() {
            "(nothing on stderr)".to_string()
        } else {
            said.to_string()
        };
        let e = Error::external(format!(
            "{what} failed ({exit}; `{}`):\n{said}",
            display_command(&cmd[SCRIPT_ARGS..])
        ));
        if outcome.exit_code == Some(127) {
            e.hint(format!(
                "container {} must be the stack's PostgreSQL with its client tools (psql, pg_dump, \
                 pg_restore) on PATH or in /usr/lib/postgresql/<major>/bin",
                self.container_name
            ))
        } else {
            e
        }
    }
}

/// The environment of an exec of [`SCRIPT`]: the one way names and the password reach it.
fn exec_env(
    connect_to: &str,
    user: &str,
    password: Option<&str>,
    sql: Option<&str>,
    db_var: Option<&str>,
) -> Vec<String> {
    let mut env = vec![
        format!("BKB_CONNINFO={}", conninfo(connect_to, user)),
        // A server that does not answer fails the command instead of hanging it.
        "PGCONNECT_TIMEOUT=15".to_string(),
    ];
    if let Some(p) = password {
        env.push(format!("PGPASSWORD={p}"));
    }
    if let Some(sql) = sql {
        env.push(format!("BKB_SQL={sql}"));
    }
    if let Some(db) = db_var {
        env.push(format!("BKB_DB={db}"));
    }
    env
}

/// How many leading arguments of [`command`] are the script (`/bin/sh -c SCRIPT NAME`).
const SCRIPT_ARGS: usize = 4;

/// `/bin/sh -c SCRIPT bkbundle-pg TOOL ARGS...`: constant text only, never a name or a secret.
fn command(tool: &str, args: &[&str]) -> Vec<String> {
    let mut cmd: Vec<String> = vec![
        "/bin/sh".into(),
        "-c".into(),
        SCRIPT.into(),
        SCRIPT_NAME.into(),
        tool.into(),
    ];
    cmd.extend(args.iter().map(|a| a.to_string()));
    debug_assert_eq!(cmd.len() - args.len() - 1, SCRIPT_ARGS);
    cmd
}

/// The database a session for work on `db` connects to: never `db` itself.
fn maintenance_for(db: &str) -> &'static str {
    if db == MAINTENANCE_DB {
        FALLBACK_DB
    } else {
        MAINTENANCE_DB
    }
}

/// A libpq connection string for `dbname` and `user`: each value in single quotes, with
/// backslashes and single quotes escaped by a backslash (libpq's rule), so any name is taken
/// literally (a bare `-d NAME` holding `=` would be read as a connection string).
fn conninfo(dbname: &str, user: &str) -> String {
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    format!(
        "dbname={} user={} application_name=bkbundle",
        quote(dbname),
        quote(user)
    )
}

/// `15.14` of `15.14 (Debian 15.14-1.pgdg120+1)`.
fn parse_version(out: &str) -> Option<String> {
    let v = out.split_whitespace().next()?;
    v.starts_with(|c: char| c.is_ascii_digit()).then(|| v.to_string())
}

/// The JSON array of [`SQL_DATABASES`]: (name, size in bytes).
fn parse_databases(out: &str) -> std::result::Result<Vec<(String, u64)>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Row {
        name: String,
        size_bytes: u64,
    }
    let rows: Vec<Row> = serde_json::from_str(out.trim())?;
    Ok(rows.into_iter().map(|r| (r.name, r.size_bytes)).collect())
}

/// An engine error with what was being done in front.
fn context(what: &str, e: Error) -> Error {
    Error {
        message: format!("{what}: {}", e.message),
        ..e
    }
}

/// A writer that counts what passes through.
struct Counted<'w> {
    inner: &'w mut (dyn io::Write + Send),
    bytes: u64,
}

impl io::Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn conninfo_quotes_every_value_so_names_are_literal() {
        assert_eq!(
            conninfo("bklite", "postgres"),
            "dbname='bklite' user='postgres' application_name=bkbundle"
        );
        assert_eq!(
            conninfo(r"it's a\b host=evil", "u"),
            r"dbname='it\'s a\\b host=evil' user='u' application_name=bkbundle"
        );
    }

    #[test]
    fn commands_hold_no_names_and_the_env_holds_them() {
        for (tool, args) in [
            ("pg_dump", &PG_DUMP[..]),
            ("pg_restore", &PG_RESTORE[..]),
            ("psql", &PSQL[..]),
        ] {
            let cmd = command(tool, args);
            assert_eq!(cmd[..4], ["/bin/sh", "-c", SCRIPT, SCRIPT_NAME]);
            assert_eq!(cmd[SCRIPT_ARGS], tool);
            assert_eq!(&cmd[SCRIPT_ARGS + 1..], args);
        }
        assert_eq!(
            display_command(&command("pg_dump", &PG_DUMP)[SCRIPT_ARGS..]),
            "pg_dump -Fc -Z0 --no-owner --no-privileges"
        );
        assert_eq!(
            display_command(&command("pg_dump", &PG_DUMP)),
            "/bin/sh -c … bkbundle-pg pg_dump -Fc -Z0 --no-owner --no-privileges"
        );
        // The script names no database: every name arrives through the environment.
        for name in ["bklite", "template1", "dbname"] {
            assert!(!SCRIPT.contains(name), "{name}");
        }
        let env = exec_env("it's", "postgres", Some("pw'secret"), Some("SELECT :'db'"), Some("x y"));
        assert_eq!(
            env,
            [
                "BKB_CONNINFO=dbname='it\\'s' user='postgres' application_name=bkbundle",
                "PGCONNECT_TIMEOUT=15",
                "PGPASSWORD=pw'secret",
                "BKB_SQL=SELECT :'db'",
                "BKB_DB=x y",
            ]
        );
        assert_eq!(
            exec_env("d", "u", None, None, None).len(),
            2,
            "no password, no psql input"
        );
        assert_eq!(maintenance_for("postgres"), "template1");
        assert_eq!(maintenance_for("bklite"), "postgres");
    }

    #[test]
    fn versions_lose_the_packagers_suffix() {
        assert_eq!(
            parse_version("15.14 (Debian 15.14-1.pgdg120+1)").as_deref(),
            Some("15.14")
        );
        assert_eq!(parse_version("16.4").as_deref(), Some("16.4"));
        assert_eq!(parse_version("17beta2").as_deref(), Some("17beta2"));
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("ERROR"), None);
    }

    #[test]
    fn the_database_list_is_read_from_json_names_with_any_character() {
        let out = r#"[{"name" : "bklite", "size_bytes" : 7754531}, {"name" : "it's a \"db\"|\nx", "size_bytes" : 0}]"#;
        assert_eq!(
            parse_databases(out).unwrap(),
            vec![("bklite".to_string(), 7754531), ("it's a \"db\"|\nx".to_string(), 0)]
        );
        assert_eq!(parse_databases("[]").unwrap(), vec![]);
        assert!(parse_databases("psql: error").is_err());
    }

    /// Runs [`SCRIPT`] with the host's /bin/sh and a fake tool on PATH that prints its
    /// arguments and its input: names with quotes, spaces and `$` arrive intact, as single
    /// arguments, and are never evaluated.
    #[test]
    fn the_script_passes_names_through_unevaluated() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("psql");
        std::fs::write(
            &fake,
            "#!/bin/sh\nfor a in \"$@\"; do printf '<%s>\\n' \"$a\"; done\ncat\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let name = "it's \"q\" $(touch /tmp/x) `id`";
        let out = Command::new("/bin/sh")
            .args(&command("psql", &PSQL)[1..])
            .env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
            .env("PGHOST", "/nonexistent")
            .env("BKB_CONNINFO", conninfo(name, "postgres"))
            .env("BKB_SQL", "SELECT :'db'")
            .env("BKB_DB", name)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let expected = format!(
            "<-X>\n<-q>\n<-At>\n<-v>\n<ON_ERROR_STOP=1>\n<-v>\n<db={name}>\n<-d>\n<{}>\nSELECT :'db'\n",
            conninfo(name, "postgres")
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn the_script_says_which_tool_is_missing() {
        let out = Command::new("/bin/sh")
            .args(&command("pg_nonexistent_tool", &[])[1..])
            .env_clear()
            .env("PATH", "/nonexistent")
            .env("BKB_CONNINFO", "dbname='x'")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(127));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("bkbundle: pg_nonexistent_tool is neither on PATH"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn a_counted_writer_counts_what_it_passes_on() {
        let mut sink = Vec::new();
        let mut c = Counted {
            inner: &mut sink,
            bytes: 0,
        };
        io::Write::write_all(&mut c, b"hello").unwrap();
        io::Write::write_all(&mut c, b" world").unwrap();
        assert_eq!(c.bytes, 11);
        assert_eq!(sink, b"hello world");
    }
}
