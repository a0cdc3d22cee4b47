//! The database half of backup and restore (`bkbundle::backup::pg`) and the streamed exec under
//! it (`Engine::exec_read`, `Engine::exec_write`), against a container of the demo PostgreSQL
//! image started with `docker run`: the dump is made and restored by the image's own tools,
//! through the Engine API. The data is set up and checked with `docker exec psql`, independently
//! of the code under test. Containers (and their volumes) are removed by a guard, whatever
//! happens.

use crate::harness::{docker_lock, ensure_demo_images, random_alnum, repo_root, run, run_ok, wait_for};
use bkbundle::backup::pg::Postgres;
use bkbundle::engine::{Engine, ExecOutcome, EXEC_TAIL_BYTES};
use std::io::{Read, Seek, SeekFrom, Write};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

const PG_IMAGE: &str = "bkbundle-demo/postgres:15";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const DOCKER_HINT: &str = "install and start Docker with scripts/setup.sh";

/// A multi-threaded runtime, as the binary's (`runtime::block_on`): exec's blocking reads and
/// writes then go through `block_in_place`.
fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The demo PostgreSQL image with the client tools backup needs. An image built before
/// scripts/demo-images.sh copied pg_dump and pg_restore is rebuilt (once per test process).
fn ensure_pg_image() {
    static CHECKED: Mutex<bool> = Mutex::new(false);
    ensure_demo_images();
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if *checked {
        return;
    }
    let has_tools = run(
        Command::new("docker").args([
            "run",
            "--rm",
            "--entrypoint",
            "/bin/sh",
            PG_IMAGE,
            "-c",
            &format!("{PG_BIN}/pg_dump --version && {PG_BIN}/pg_restore --version"),
        ]),
        "docker run",
        DOCKER_HINT,
    )
    .status
    .success();
    if !has_tools {
        run_ok(
            Command::new("bash")
                .arg(repo_root().join("scripts/demo-images.sh"))
                .args(["--rebuild", PG_IMAGE])
                .current_dir(repo_root()),
            "scripts/demo-images.sh --rebuild bkbundle-demo/postgres:15",
            "run scripts/setup.sh first",
        );
    }
    *checked = true;
}

/// A `docker run -d` container of the demo PostgreSQL image; `docker rm -f -v` on drop.
struct PgContainer {
    id: String,
    name: String,
    password: String,
}

impl PgContainer {
    fn start(what: &str) -> PgContainer {
        let name = format!("bkbundle-it-{what}-{}", random_alnum(12).to_lowercase());
        let password = random_alnum(24);
        let out = run(
            Command::new("docker").args([
                "run",
                "-d",
                "--name",
                &name,
                "-e",
                &format!("POSTGRES_PASSWORD={password}"),
                PG_IMAGE,
            ]),
            "docker run",
            DOCKER_HINT,
        );
        let c = PgContainer {
            id: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            name,
            password,
        };
        assert!(
            out.status.success(),
            "docker run {PG_IMAGE} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // Over TCP: the entrypoint's setup server listens on the socket only, and stops again.
        let ready = wait_for(Duration::from_secs(90), || {
            let out = Command::new("docker")
                .args(["exec", &c.id, &format!("{PG_BIN}/pg_isready"), "-q", "-h", "127.0.0.1"])
                .output()
                .ok()?;
            out.status.success().then_some(())
        });
        assert!(ready.is_some(), "PostgreSQL did not become ready in 90 s\n{}", c.logs());
        c
    }

    fn logs(&self) -> String {
        let out = Command::new("docker")
            .args(["logs", "--tail", "100", &self.id])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default();
        format!("--- logs of {} ---\n{out}", self.name)
    }

    /// psql in database `db` (given as PGDATABASE, taken literally), `sql` on stdin; `Err`
    /// with stderr when it fails.
    fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut child = Command::new("docker")
            .args(["exec", "-i", "-e", &format!("PGDATABASE={db}"), &self.id])
            .args([
                &format!("{PG_BIN}/psql"),
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run docker exec psql");
        child.stdin.take().unwrap().write_all(sql.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql in {db:?}: {sql}\n{e}\n{}", self.logs()))
    }

    /// Tables of `db` outside the system schemas.
    fn tables(&self, db: &str) -> Vec<String> {
        let out = self.psql(
            db,
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
        );
        out.lines().map(str::to_string).collect()
    }
}

impl Drop for PgContainer {
    fn drop(&mut self) {
        let target = if self.id.is_empty() { &self.name } else { &self.id };
        let _ = Command::new("docker").args(["rm", "-f", "-v", target]).output();
    }
}

/// The rows of the test table as one digest and a count (`count|md5`).
const ROWS_DIGEST: &str =
    "SELECT count(*) || '|' || md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM \"it's \"\"rows\"\"\"";

#[test]
fn a_database_is_dumped_and_restored_through_exec_with_names_that_need_quoting() {
    let _lock = docker_lock(); // a running container pins the image: keep image-removing tests out
    ensure_pg_image();
    let c = PgContainer::start("backup-pg");
    let rt = rt();
    let engine = rt.block_on(Engine::connect()).unwrap();
    let pg = Postgres::new(&engine, &c.id, &c.name, "postgres", Some(&c.password));

    let version = rt.block_on(pg.server_version()).unwrap();
    assert!(version.starts_with("15."), "{version}");
    assert!(!version.contains(' '), "{version}");

    // A name with a quote, a double quote, a space and an `=` (which -d would read as a
    // connection string); creating it twice is not an error.
    let src = "it's \"src\" db=1";
    rt.block_on(pg.create_database(src)).unwrap();
    rt.block_on(pg.create_database(src)).unwrap();
    // Enough rows that the dump is several MB: many exec frames and several 1 MiB input reads.
    c.psql(
        src,
        "CREATE TABLE a_first (x int);
         INSERT INTO a_first VALUES (1), (2);
         CREATE TABLE \"it's \"\"rows\"\"\" (id int PRIMARY KEY, v text NOT NULL);
         INSERT INTO \"it's \"\"rows\"\"\" SELECT i, repeat(md5(i::text), 4) FROM generate_series(1, 40000) i;
         INSERT INTO \"it's \"\"rows\"\"\" VALUES (0, 'quote '' and \"double\" and \\ backslash');",
    );
    let original = c.psql(src, ROWS_DIGEST);
    assert!(original.starts_with("40001|"), "{original}");

    let listed = rt.block_on(pg.databases()).unwrap();
    let names: Vec<&str> = listed.iter().map(|d| d.name.as_str()).collect();
    assert!(names.contains(&"bklite") && names.contains(&"postgres"), "{listed:?}");
    assert!(
        !names.contains(&"template0") && !names.contains(&"template1"),
        "{listed:?}"
    );
    let s = listed
        .iter()
        .find(|d| d.name == src)
        .expect("the new database is listed");
    assert_eq!(s.tables, 2, "{s:?}");
    assert!(s.size_bytes > 5_000_000, "{s:?}");
    assert_eq!(listed.iter().find(|d| d.name == "bklite").unwrap().tables, 0);

    // Dump to a file (never held in memory by bkbundle).
    let mut dump = tempfile::tempfile().unwrap();
    let bytes = rt.block_on(pg.dump(src, &mut dump)).unwrap();
    let len = dump.metadata().unwrap().len();
    assert_eq!(bytes, len);
    assert!(len > 5_000_000, "an uncompressed dump of 40000 rows: {len} bytes");
    let mut magic = [0u8; 5];
    dump.seek(SeekFrom::Start(0)).unwrap();
    dump.read_exact(&mut magic).unwrap();
    assert_eq!(&magic, b"PGDMP", "custom format");

    // Restored into a new database: the same rows.
    let dst = "restored 'copy'";
    rt.block_on(pg.create_database(dst)).unwrap();
    dump.seek(SeekFrom::Start(0)).unwrap();
    rt.block_on(pg.restore(dst, &mut dump)).unwrap();
    assert_eq!(c.psql(dst, ROWS_DIGEST), original);
    assert_eq!(c.tables(dst), ["a_first", "it's \"rows\""]);

    // Again into the same, now non-empty, database: refused, naming it; nothing committed.
    dump.seek(SeekFrom::Start(0)).unwrap();
    let e = rt.block_on(pg.restore(dst, &mut dump)).unwrap_err();
    assert!(
        e.message.contains("restore of database \"restored 'copy'\""),
        "{}",
        e.message
    );
    assert!(e.message.contains(&c.name), "{}", e.message);
    assert!(
        e.message.contains("already exists"),
        "pg_restore's own words: {}",
        e.message
    );
    assert!(e.message.contains("nothing was restored"), "{}", e.message);
    assert!(!e.message.contains(&c.password), "{}", e.message);
    assert_eq!(c.psql(dst, ROWS_DIGEST), original, "no row was added");
    assert_eq!(c.psql(dst, "SELECT count(*) FROM a_first"), "2");

    // All or nothing: the first table restores, the second collides, and the first is gone too.
    let partial = "collides";
    rt.block_on(pg.create_database(partial)).unwrap();
    c.psql(partial, "CREATE TABLE \"it's \"\"rows\"\"\" (other int)");
    dump.seek(SeekFrom::Start(0)).unwrap();
    let e = rt.block_on(pg.restore(partial, &mut dump)).unwrap_err();
    assert!(e.message.contains("\"collides\""), "{}", e.message);
    assert_eq!(c.tables(partial), ["it's \"rows\""], "a_first was rolled back");

    // A cut dump fails at its end and leaves the target empty.
    let cut = "cut";
    rt.block_on(pg.create_database(cut)).unwrap();
    dump.seek(SeekFrom::Start(0)).unwrap();
    let mut half = (&mut dump).take(len * 2 / 3);
    let e = rt.block_on(pg.restore(cut, &mut half)).unwrap_err();
    assert!(e.message.contains("restore of database \"cut\""), "{}", e.message);
    assert!(e.message.contains("pg_restore"), "{}", e.message);
    assert_eq!(c.tables(cut), Vec::<String>::new(), "{}", e.message);

    // Dropped although a session is on it (WITH (FORCE)); dropping what is gone is no error.
    let mut session = Command::new("docker")
        .args(["exec", "-e", &format!("PGDATABASE={dst}"), &c.id])
        .args([
            &format!("{PG_BIN}/psql"),
            "-X",
            "-U",
            "postgres",
            "-c",
            "SELECT pg_sleep(60)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let connected = wait_for(Duration::from_secs(20), || {
        let n = c.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}'",
                dst.replace('\'', "''")
            ),
        );
        (n != "0").then_some(())
    });
    assert!(connected.is_some(), "the sleeping session did not connect");
    rt.block_on(pg.drop_database(dst)).unwrap();
    rt.block_on(pg.drop_database(dst)).unwrap();
    let _ = session.wait();
    let left = rt.block_on(pg.databases()).unwrap();
    assert!(!left.iter().any(|d| d.name == dst), "{left:?}");

    // `postgres` itself is dropped from template1, and created again.
    rt.block_on(pg.drop_database("postgres")).unwrap();
    rt.block_on(pg.create_database("postgres")).unwrap();

    // A dump of a database that is not there names it and says what pg_dump said.
    let e = rt.block_on(pg.dump("no such db", &mut Vec::new())).unwrap_err();
    assert!(
        e.message.contains("pg_dump of database \"no such db\""),
        "{}",
        e.message
    );
    assert!(e.message.contains("does not exist"), "{}", e.message);
}

#[test]
fn exec_write_closes_stdin_and_exec_read_streams_stdout() {
    let _lock = docker_lock();
    ensure_pg_image();
    let c = PgContainer::start("exec");
    let rt = rt();
    let engine = rt.block_on(Engine::connect()).unwrap();
    let sh = |script: &str| -> Vec<String> { vec!["/bin/sh".into(), "-c".into(), script.into()] };

    // `wc -c` prints only once its input ends: the half-close reaches the process as EOF.
    let input = vec![7u8; 3 * 1024 * 1024 + 5];
    let out: ExecOutcome = bounded(&rt, engine.exec_write(&c.id, &sh("wc -c"), &[], &mut input.as_slice()))
        .expect("exec_write returned: stdin was closed")
        .unwrap();
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    assert_eq!(out.stdout_tail.trim(), (3 * 1024 * 1024 + 5).to_string());

    // Env values reach the process; a process that exits early is judged by its exit code,
    // the input it did not read is abandoned.
    let mut endless = std::io::repeat(b'x').take(200 * 1024 * 1024);
    let out = bounded(
        &rt,
        engine.exec_write(
            &c.id,
            &sh("head -c 10 >/dev/null; echo \"$BKB_TEST\" >&2; exit 5"),
            &["BKB_TEST=it's here".into()],
            &mut endless,
        ),
    )
    .expect("exec_write returned after the process exited")
    .unwrap();
    assert_eq!(out.exit_code, Some(5), "{out:?}");
    assert_eq!(out.stderr_tail, "it's here\n");

    // stdout streamed to the writer (20 MB, in frames); stderr kept as a bounded tail.
    let mut sink = Counter(0);
    let out = bounded(&rt, engine.exec_read(
        &c.id,
        &sh("head -c 20000000 /dev/zero; i=0; while [ $i -lt 20000 ]; do echo \"line $i\" >&2; i=$((i+1)); done; exit 3"),
        &[],
        &mut sink,
    ))
    .unwrap()
    .unwrap();
    assert_eq!(sink.0, 20_000_000);
    assert_eq!(out.exit_code, Some(3));
    assert!(out.stdout_tail.is_empty());
    assert!(
        out.stderr_tail.len() <= EXEC_TAIL_BYTES + 32,
        "{}",
        out.stderr_tail.len()
    );
    assert!(
        out.stderr_tail.starts_with("[earlier output cut]\nline "),
        "{}",
        &out.stderr_tail[..40]
    );
    assert!(out.stderr_tail.ends_with("line 19998\nline 19999\n"));

    // Errors name the container and the command, never the env values.
    let e = bounded(
        &rt,
        engine.exec_read(
            "bkbundle-it-no-such-container",
            &sh("true"),
            &["PGPASSWORD=secret-value".into()],
            &mut Counter(0),
        ),
    )
    .unwrap()
    .unwrap_err();
    assert!(e.message.contains("bkbundle-it-no-such-container"), "{}", e.message);
    assert!(e.message.contains("/bin/sh -c true"), "{}", e.message);
    assert!(!e.message.contains("secret-value"), "{}", e.message);
}

/// `f` on `rt`, failing (Err) instead of hanging past a minute.
fn bounded<F: std::future::Future>(
    rt: &tokio::runtime::Runtime,
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), f).await })
}

/// Counts the bytes written to it.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
