//! The site's configuration: the install config (`install.toml`, [`config`]), the stack's
//! rendered `.env` ([`envfile`]), and where the site's services are ([`targets`]). Pure data and
//! parsing; the connections themselves are [`crate::platform`]'s.

pub mod config;
pub mod envfile;
pub mod targets;

/// `%XX` escapes decoded; a `%` not followed by two hex digits is an error (Go's url.Parse
/// refuses it too).
pub fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) if s.as_bytes()[i + 1].is_ascii_hexdigit() => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                _ => {
                    return Err(format!(
                        "a `%` at character {} is not followed by two hex digits",
                        i + 1
                    ))
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "its %-escapes are not UTF-8".to_string())
}
