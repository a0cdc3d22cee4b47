//! Diagnostics on stderr (`-v`, `-vv`, `BKBUNDLE_LOG`) without secrets and without library noise.
//!
//! - Levels: by default only bkbundle's own warnings; `-v` its info; `-vv` debug for bkbundle *and*
//!   the libraries it drives (async-nats, tokio-postgres, bollard, hyper, ...). `BKBUNDLE_LOG`
//!   takes a full tracing filter and wins.
//! - Secrets: every line is scrubbed before it is written. Libraries print what they are given:
//!   async-nats logs its server address with `?Debug`, which shows a URL's `user:password@`, and
//!   at trace level the whole CONNECT message (`pass`, `auth_token`). So whatever the level or
//!   filter, a line loses (1) the password of any `scheme://user:password@` URL, (2) the value of
//!   `pass`/`password`/`auth_token`/`token`/`secret` fields as Rust's `Debug` writes them and
//!   (3) every secret value registered with [`register_secret`] (the site's passwords and tokens,
//!   found by the caller before any connection is made).

use std::io::{self, Write};
use std::sync::{Mutex, OnceLock};

/// What a removed secret is replaced with.
pub const MASK: &str = "******";

fn secrets() -> &'static Mutex<Vec<String>> {
    static S: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(Vec::new()))
}

/// Never print `value` in a log line (values shorter than 4 characters are too common to mask).
pub fn register_secret(value: &str) {
    if value.len() < 4 {
        return;
    }
    let mut s = secrets().lock().unwrap_or_else(|p| p.into_inner());
    if !s.iter().any(|v| v == value) {
        s.push(value.to_string());
        // Longest first, so that a secret containing another is masked whole.
        s.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }
}

/// Whether a setting of this name holds a secret (`NATS_PASSWORD`, `SECRET_KEY`, `API_TOKEN`...).
pub fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    [
        "PASSWORD",
        "PASSWD",
        "SECRET",
        "TOKEN",
        "PRIVATE",
        "CREDENTIAL",
        "_KEY",
        "APIKEY",
    ]
    .iter()
    .any(|w| n.contains(w))
        || n == "KEY"
}

/// `text` with every secret masked (see the module documentation).
pub fn redact(text: &str) -> String {
    let mut out = mask_url_passwords(text);
    out = mask_debug_fields(&out);
    let s = secrets().lock().unwrap_or_else(|p| p.into_inner());
    for v in s.iter() {
        if out.contains(v.as_str()) {
            out = out.replace(v.as_str(), MASK);
        }
        // URL-encoded too, as it appears inside a URL's user information.
        let enc = percent_encode(v);
        if enc != *v && out.contains(&enc) {
            out = out.replace(&enc, MASK);
        }
    }
    out
}

fn percent_encode(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// `scheme://user:password@host` → `scheme://user:******@host`.
pub(crate) fn mask_url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first character it cannot hold ('/', '?', '#', whitespace, a
        // double quote, angle brackets); its user information at the last '@' before that. A
        // password may hold what RFC 3986 allows in user information (`'(),;` and the rest of
        // the sub-delims) or a `${VAR}` placeholder: none of those ends it, so none stops the
        // mask early (masking a little too much is the safe side).
        let end = tail
            .find(|c: char| c.is_whitespace() || "/?#\"<>`".contains(c))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon + 1]);
                        out.push_str(MASK);
                    }
                    // A bare user, or a token given as the user: the whole thing may be secret.
                    None if userinfo.len() >= 16 => out.push_str(MASK),
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `pass: Some("x")`, `password: "x"`, `auth_token: Some("x")` → the value masked. The url crate's
/// `Debug` of a URL also writes `password: Some("x")`.
fn mask_debug_fields(text: &str) -> String {
    const FIELDS: [&str; 6] = ["pass", "password", "auth_token", "token", "secret", "nkey_seed"];
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while !rest.is_empty() {
        for f in FIELDS {
            // The field name must start a word: `user_pass: ` is not `pass: `.
            let Some(after_name) = rest.strip_prefix(f) else {
                continue;
            };
            let word_start = out
                .chars()
                .last()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            let Some(after) = after_name
                .strip_prefix(": ")
                .or_else(|| after_name.strip_prefix('='))
                .filter(|_| word_start)
            else {
                continue;
            };
            out.push_str(&rest[..rest.len() - after.len()]);
            let (prefix, value_start) = if let Some(v) = after.strip_prefix("Some(\"") {
                ("Some(\"", v)
            } else if let Some(v) = after.strip_prefix('"') {
                ("\"", v)
            } else if after_name.starts_with('=') {
                // libpq's `password=secret host=...`: up to the next blank or separator.
                let end = after
                    .find(|c: char| c.is_whitespace() || ",;&)".contains(c))
                    .unwrap_or(after.len());
                if end > 0 {
                    out.push_str(MASK);
                }
                rest = &after[end..];
                continue 'scan;
            } else {
                rest = after;
                continue 'scan;
            };
            // The value ends at the first unescaped quote.
            let mut end = value_start.len();
            let mut escaped = false;
            for (i, c) in value_start.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = i;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            out.push_str(prefix);
            out.push_str(MASK);
            rest = &value_start[end..];
            continue 'scan;
        }
        let c = rest.chars().next().unwrap_or(' ');
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Targets whose events appear only from `-vv` on (or when `BKBUNDLE_LOG` names them).
const LIBRARIES: [&str; 9] = [
    "async_nats",
    "tokio_postgres",
    "postgres_protocol",
    "bollard",
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
    "tokio_util",
];

/// The tracing filter for `-v` count `verbose` (0: warnings, 1: info, 2+: debug with libraries).
pub fn filter_directives(verbose: u8) -> String {
    match verbose {
        0 => "off,bkbundle=warn".into(),
        1 => "off,bkbundle=info".into(),
        _ => {
            let mut d = "info,bkbundle=debug".to_string();
            for l in LIBRARIES {
                d.push_str(&format!(",{l}=debug"));
            }
            d
        }
    }
}

/// A stderr writer that scrubs each formatted event before writing it.
pub struct RedactingStderr;

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        io::stderr().lock().write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Set up diagnostics for `-v` count `verbose`; `BKBUNDLE_LOG` (a tracing filter) wins.
pub fn init(verbose: u8) {
    let filter = std::env::var("BKBUNDLE_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .and_then(|s| tracing_subscriber::EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(filter_directives(verbose)));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| RedactingStderr)
        .with_ansi(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            redact(r#"server = ServerAddr("nats://bk:s3cr%40t@127.0.0.1:4222") attempt"#),
            r#"server = ServerAddr("nats://bk:******@127.0.0.1:4222") attempt"#
        );
        assert_eq!(
            redact("postgres://postgres:pw@10.0.0.5:5432/bklite and nats://h:4222"),
            "postgres://postgres:******@10.0.0.5:5432/bklite and nats://h:4222"
        );
        // A long bare user is a token in disguise.
        assert_eq!(redact("nats://0123456789abcdef0123@h:4222"), "nats://******@h:4222");
        // What RFC 3986 lets a password hold unencoded does not end the mask early.
        assert_eq!(redact("tls://u:p,a;s(s)'w@h:1 next"), "tls://u:******@h:1 next");
        assert_eq!(redact("(nats://u:pw@h:1)"), "(nats://u:******@h:1)");
        assert_eq!(
            redact(r#"nats_urls: "tls://${USER}:${PASSWORD}@${NATS_SERVERS}""#),
            r#"nats_urls: "tls://${USER}:******@${NATS_SERVERS}""#
        );
    }

    #[test]
    fn debug_fields_are_masked() {
        let line =
            r#"ConnectInfo { user: Some("bk"), pass: Some("pw\"x"), auth_token: Some("tok"), name: Some("bkbundle") }"#;
        assert_eq!(
            redact(line),
            r#"ConnectInfo { user: Some("bk"), pass: Some("******"), auth_token: Some("******"), name: Some("bkbundle") }"#
        );
        // The url crate's Debug of a URL.
        assert_eq!(
            redact(r#"Url { username: "bk", password: Some("pw"), host: Some(Ipv4(127.0.0.1)) }"#),
            r#"Url { username: "bk", password: Some("******"), host: Some(Ipv4(127.0.0.1)) }"#
        );
        assert_eq!(redact("bypass: 3, passport: x"), "bypass: 3, passport: x");
        assert_eq!(redact("password: None"), "password: None");
        assert_eq!(
            redact("host=db user=bk password=s3cret dbname=x"),
            "host=db user=bk password=****** dbname=x"
        );
    }

    #[test]
    fn registered_secrets_are_masked_everywhere() {
        register_secret("hunter2-registered");
        register_secret("a b/c");
        assert_eq!(redact("x hunter2-registered y"), "x ****** y");
        assert_eq!(redact("u:a%20b%2Fc@"), "u:******@");
        register_secret("ab"); // too short to mask
        assert_eq!(redact("abc"), "abc");
    }

    #[test]
    fn libraries_only_from_vv() {
        assert!(!filter_directives(0).contains("async_nats"));
        assert!(!filter_directives(1).contains("async_nats"));
        assert!(filter_directives(2).contains("async_nats=debug"));
        assert!(is_secret_name("NATS_PASSWORD") && is_secret_name("SECRET_KEY") && is_secret_name("token"));
        assert!(!is_secret_name("NATS_USER") && !is_secret_name("HOST_IP"));
    }
}
