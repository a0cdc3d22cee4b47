//! A throwaway `redis-server` on 127.0.0.1 with a password, no persistence.

use super::{free_port, server_tempdir, tail, wait_for};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const INSTALL_HINT: &str = "install it with `apt-get install redis-server` (or run scripts/setup.sh)";

/// A running `redis-server`; killed and deleted on drop.
pub struct RedisServer {
    pub port: u16,
    pub password: String,
    child: Child,
    log: PathBuf,
    // Last: removed after `drop` has killed the server.
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts it on a free loopback port and returns once it answers `PING` (bounded; panics with
    /// its log otherwise, or naming the install command when `redis-server` is missing).
    pub fn start() -> RedisServer {
        let dir = server_tempdir("bkbundle-redis-");
        let log = dir.path().join("redis.log");
        let password = super::random_alnum(16);
        let port = free_port();
        let child = match Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--requirepass",
                &password,
            ])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                log.to_str().unwrap_or(""),
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("cannot run redis-server: {e}; {INSTALL_HINT}"),
        };
        let s = RedisServer {
            port,
            password,
            child,
            log,
            _dir: dir,
        };
        if wait_for(Duration::from_secs(10), || {
            s.command(0, &["PING"]).ok().filter(|r| r == "+PONG")
        })
        .is_some()
        {
            return s;
        }
        let text = tail(&s.log, 4000);
        drop(s);
        if text.contains("Address already in use") {
            return RedisServer::start();
        }
        panic!("redis-server did not answer PING on 127.0.0.1:{port}\n{text}");
    }

    /// `redis://:PASSWORD@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: u32) -> String {
        format!("redis://:{}@127.0.0.1:{}/{db}", self.password, self.port)
    }

    /// AUTH, SELECT `db`, then `args`; returns the first line of `args`' reply (`+OK`, `:1`, ...).
    pub fn command(&self, db: u32, args: &[&str]) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut out = String::new();
        let db = db.to_string();
        for a in [&["AUTH", self.password.as_str()][..], &["SELECT", db.as_str()], args] {
            out.push_str(&format!("*{}\r\n", a.len()));
            for x in a {
                out.push_str(&format!("${}\r\n{x}\r\n", x.len()));
            }
        }
        s.write_all(out.as_bytes())?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        for _ in 0..3 {
            line.clear();
            r.read_line(&mut line)?;
        }
        Ok(line.trim_end().to_string())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
