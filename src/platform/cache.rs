//! The server's cached env in Redis: a minimal RESP client for `AUTH`, `SELECT`, `DEL` (after
//! seeding) and `GET` (doctor's stale-cache check), the four commands needed, rather than a Redis
//! crate for them.
//!
//! The server caches a region's env for 300 s (BKLITE.md, Cache). The stack configures Django's
//! cache in Redis db 1; Django's key there is the same `:1:sidecar_env_cache_<id>` as in the
//! database cache table. Every step is bounded by a timeout; errors are returned as text for the
//! report (the env rows are committed by then, so a cache that cannot be reached only delays the
//! new values by up to 300 s).

use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Where the Redis cache is. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisTarget({})", self.display())
    }
}

impl RedisTarget {
    /// `host:port/db`, without credentials.
    pub fn display(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("redis://{host}:{}/{}", self.port, self.db)
    }
}

/// The compose service of the BK-Lite server (its container's environment says where it caches).
pub const SERVER_SERVICE: &str = "server";
/// How long the server keeps a region's env in its cache (BKLITE.md, Cache).
pub const CACHE_SECONDS: u64 = 300;

/// Where the server keeps its cache of the regions' env (BKLITE.md): Redis when it has
/// `REDIS_CACHE_URL`, else each server process's own memory, which nothing outside can clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCache {
    /// Redis, as this host reaches it, and where that was learnt.
    Redis {
        from: String,
        target: Result<RedisTarget, String>,
    },
    /// Django's per-process memory cache: only a restart of the server clears it.
    ProcessMemory { from: String },
    /// Nothing says (no server container found, no Redis configured).
    Unknown,
}

/// The stack's server container: its name and environment.
pub struct ServerContainer {
    pub name: String,
    /// Holds secrets: never logged or shown.
    pub env: std::collections::BTreeMap<String, String>,
}

/// The `server` container of compose project `project`, when the engine answers and has one.
pub async fn server_container(docker: &dyn crate::ports::Docker, project: &str) -> Option<ServerContainer> {
    let list = tokio::time::timeout(Duration::from_secs(5), docker.project_containers(project))
        .await
        .ok()?
        .ok()?;
    let c = list.into_iter().find(|c| c.service == SERVER_SERVICE)?;
    let env = docker.container_env(&c.id).await.ok()??;
    Some(ServerContainer { name: c.name, env })
}

/// Parse `redis://[[user]:password@]host[:port][/db]`.
pub fn parse_url(url: &str) -> Result<RedisTarget, String> {
    let rest = match url.trim().split_once("://") {
        Some(("redis", rest)) => rest,
        Some(("rediss", _)) => {
            return Err(
                "rediss:// (Redis over TLS) is not supported; the stack's Redis is plain redis:// on the host".into(),
            )
        }
        _ => return Err("expected redis://[:password@]host[:port][/db]".into()),
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => match u.split_once(':') {
            Some((user, pw)) => (
                Some(crate::site::percent_decode(user)?).filter(|s| !s.is_empty()),
                Some(crate::site::percent_decode(pw)?),
            ),
            None => (None, Some(crate::site::percent_decode(u)?)),
        },
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, p) = h.split_once(']').ok_or("an IPv6 host lacks its closing `]`")?;
        (h.to_string(), p.strip_prefix(':').unwrap_or(""))
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (hostport.to_string(), ""),
        }
    };
    if host.is_empty() {
        return Err("it has no host".into());
    }
    let port = if port.is_empty() {
        6379
    } else {
        // Messages never echo parts of the URL: a mistyped one may hold the password there.
        port.parse::<u16>()
            .map_err(|_| "the port is not a number".to_string())?
    };
    let db_text = path.split(['?', '#']).next().unwrap_or("");
    let db = if db_text.is_empty() {
        0
    } else {
        db_text
            .parse::<u32>()
            .map_err(|_| "the database (after the `/`) is not a number".to_string())?
    };
    Ok(RedisTarget {
        host,
        port,
        username,
        password,
        db,
    })
}

fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One reply: `Ok(text)` for `+` and `:` replies, `Err` for `-` errors. Bulk and array replies
/// are not expected from these commands and are read past as an error.
async fn reply<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<String, String> {
    let mut line = String::new();
    let n = r
        .read_line(&mut line)
        .await
        .map_err(|e| format!("reading the reply: {e}"))?;
    if n == 0 {
        return Err("the server closed the connection".into());
    }
    let line = line.trim_end_matches(['\r', '\n']);
    match line.split_at_checked(1) {
        Some(("+", t)) | Some((":", t)) => Ok(t.to_string()),
        Some(("-", t)) => Err(t.to_string()),
        Some(("$", n)) => {
            // Skip a bulk string (not expected), so the message names what came back.
            if let Ok(len) = n.parse::<usize>() {
                let mut buf = vec![0u8; len + 2];
                let _ = r.read_exact(&mut buf).await;
            }
            Err(format!("unexpected bulk reply to a command: {line}"))
        }
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

type Session = (
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
);

/// Connect, authenticate and select the database.
async fn session(t: &RedisTarget) -> Result<Session, String> {
    let stream = TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    if let Some(pw) = &t.password {
        let cmd = match &t.username {
            Some(u) => command(&["AUTH", u, pw]),
            None => command(&["AUTH", pw]),
        };
        wr.write_all(&cmd).await.map_err(|e| format!("sending AUTH: {e}"))?;
        reply(&mut rd).await.map_err(|e| format!("AUTH refused: {e}"))?;
    }
    if t.db != 0 {
        wr.write_all(&command(&["SELECT", &t.db.to_string()]))
            .await
            .map_err(|e| format!("sending SELECT: {e}"))?;
        reply(&mut rd)
            .await
            .map_err(|e| format!("SELECT {} refused: {e}", t.db))?;
    }
    Ok((rd, wr))
}

async fn del_inner(t: &RedisTarget, keys: &[String]) -> Result<u64, String> {
    let (mut rd, mut wr) = session(t).await?;
    let mut args = vec!["DEL"];
    args.extend(keys.iter().map(String::as_str));
    wr.write_all(&command(&args))
        .await
        .map_err(|e| format!("sending DEL: {e}"))?;
    let n = reply(&mut rd).await.map_err(|e| format!("DEL refused: {e}"))?;
    n.parse::<u64>().map_err(|_| format!("DEL answered {n:?}, not a count"))
}

/// A bulk-string reply: `None` for a missing key (`$-1`).
async fn bulk<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, String> {
    let mut line = String::new();
    r.read_line(&mut line)
        .await
        .map_err(|e| format!("reading the reply: {e}"))?;
    let line = line.trim_end_matches(['\r', '\n']);
    match line.split_at_checked(1) {
        Some(("$", "-1")) => Ok(None),
        Some(("$", n)) => {
            let len: usize = n.parse().map_err(|_| format!("a bulk length {n:?} is not a number"))?;
            // The cached env of a region is a few KiB; anything huge is not what we look for.
            if len > 16 << 20 {
                return Err(format!("a {len}-byte value is larger than any cached env"));
            }
            let mut buf = vec![0u8; len + 2];
            r.read_exact(&mut buf)
                .await
                .map_err(|e| format!("reading the value: {e}"))?;
            buf.truncate(len);
            Ok(Some(buf))
        }
        Some(("-", e)) => Err(e.to_string()),
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

async fn get_inner(t: &RedisTarget, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, String> {
    let (mut rd, mut wr) = session(t).await?;
    let mut out = Vec::new();
    for k in keys {
        wr.write_all(&command(&["GET", k]))
            .await
            .map_err(|e| format!("sending GET: {e}"))?;
        out.push(bulk(&mut rd).await.map_err(|e| format!("GET {k}: {e}"))?);
    }
    Ok(out)
}

/// `GET` each key on the Redis at `t` (`None` where absent). Bounded by `timeout` in all.
pub async fn get(t: &RedisTarget, keys: &[String], timeout: Duration) -> Result<Vec<Option<Vec<u8>>>, String> {
    match tokio::time::timeout(timeout, get_inner(t, keys)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs())),
    }
}

/// `DEL keys` on the Redis at `t`; returns how many existed. Bounded by `timeout` in all.
pub async fn del(t: &RedisTarget, keys: &[String], timeout: Duration) -> Result<u64, String> {
    if keys.is_empty() {
        return Ok(0);
    }
    match tokio::time::timeout(timeout, del_inner(t, keys)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn urls() {
        let t = parse_url("redis://:p%40ss@127.0.0.1:6380/1").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("127.0.0.1", 6380, 1));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        assert_eq!(t.username, None);
        assert!(!format!("{t:?}").contains("p@ss"));
        let t = parse_url("redis://user:pw@[::1]").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("::1", 6379, 0));
        assert_eq!(t.username.as_deref(), Some("user"));
        assert_eq!(t.display(), "redis://[::1]:6379/0");
        assert!(parse_url("rediss://h").unwrap_err().contains("TLS"));
        assert!(parse_url("http://h").is_err());
        assert!(parse_url("redis://h/x").is_err());
    }

    /// A fake Redis on 127.0.0.1 that checks the commands it gets and answers like Redis.
    #[tokio::test]
    async fn auth_select_del_against_a_fake_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            let mut seen = Vec::new();
            for _ in 0..3 {
                let mut head = String::new();
                rd.read_line(&mut head).await.unwrap();
                let n: usize = head.trim()[1..].parse().unwrap();
                let mut args = Vec::new();
                for _ in 0..n {
                    let mut len = String::new();
                    rd.read_line(&mut len).await.unwrap();
                    let mut arg = String::new();
                    rd.read_line(&mut arg).await.unwrap();
                    args.push(arg.trim_end().to_string());
                }
                let answer: &[u8] = match args[0].as_str() {
                    "AUTH" if args[1] == "secret" => b"+OK\r\n",
                    "AUTH" => b"-WRONGPASS invalid password\r\n",
                    "SELECT" => b"+OK\r\n",
                    "DEL" => b":1\r\n",
                    _ => b"-ERR unknown\r\n",
                };
                wr.write_all(answer).await.unwrap();
                seen.push(args);
                if answer.starts_with(b"-") {
                    break;
                }
            }
            seen
        });
        let t = parse_url(&format!("redis://:secret@127.0.0.1:{port}/1")).unwrap();
        let keys = vec![
            ":1:sidecar_env_cache_1".to_string(),
            ":1:sidecar_env_cache_2".to_string(),
        ];
        assert_eq!(del(&t, &keys, Duration::from_secs(5)).await.unwrap(), 1);
        let seen = server.await.unwrap();
        assert_eq!(seen[0], ["AUTH", "secret"]);
        assert_eq!(seen[1], ["SELECT", "1"]);
        assert_eq!(seen[2], ["DEL", ":1:sidecar_env_cache_1", ":1:sidecar_env_cache_2"]);
    }

    /// GET of a present and a missing key, after AUTH (no SELECT for db 0).
    #[tokio::test]
    async fn get_reads_bulk_replies() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            for answer in [&b"+OK\r\n"[..], b"$5\r\na\r\nb\0\r\n", b"$-1\r\n"] {
                let mut head = String::new();
                rd.read_line(&mut head).await.unwrap();
                let n: usize = head.trim()[1..].parse().unwrap();
                for _ in 0..2 * n {
                    let mut l = String::new();
                    rd.read_line(&mut l).await.unwrap();
                }
                wr.write_all(answer).await.unwrap();
            }
        });
        let t = parse_url(&format!("redis://:pw@127.0.0.1:{port}")).unwrap();
        let got = get(&t, &["a".into(), "b".into()], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, vec![Some(b"a\r\nb\0".to_vec()), None]);
    }

    #[tokio::test]
    async fn a_wrong_password_and_a_closed_port_are_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            let mut line = String::new();
            rd.read_line(&mut line).await.unwrap();
            wr.write_all(b"-WRONGPASS invalid username-password pair\r\n")
                .await
                .unwrap();
        });
        let t = parse_url(&format!("redis://:bad@127.0.0.1:{port}/1")).unwrap();
        let e = del(&t, &["k".into()], Duration::from_secs(5)).await.unwrap_err();
        assert!(e.contains("AUTH refused") && e.contains("WRONGPASS"), "{e}");
        // A port nothing listens on.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let t = parse_url(&format!("redis://127.0.0.1:{port}")).unwrap();
        assert!(del(&t, &["k".into()], Duration::from_secs(5))
            .await
            .unwrap_err()
            .contains("cannot connect"));
    }
}
