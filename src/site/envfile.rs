//! Renders the stack's `.env` from the bundle's env template, the install config and the `.env`
//! already on the host.
//!
//! Template conventions (documented in the templates themselves): `KEY=value` lines; `${NAME}` in a
//! value is a site value taken from the install config's `[env]` (a missing one is an error naming
//! it and the line, never an empty or guessed value); `__GENERATE__` is a secret generated once at
//! random and kept. Merging rules, so that nothing an operator did is lost and re-runs converge:
//! - a key the existing `.env` already has keeps its value (generated secrets, operator edits),
//!   unless the install config sets that key, which wins (it is this run's explicit input);
//! - a key new in the template is added (a new bundle version may need new variables);
//! - keys the operator added by hand, and comments, stay.

use std::collections::{BTreeMap, BTreeSet};

pub const GENERATE: &str = "__GENERATE__";

/// One problem with the template or the config, with the template line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub key: String,
    pub name: String,
    pub line: usize,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The full text to write.
    pub text: String,
    /// Final values of every key.
    pub values: BTreeMap<String, String>,
    /// Keys whose values were generated in this run (never printed).
    pub generated: Vec<String>,
    /// Keys added to an existing file, and keys updated from the install config.
    pub added: Vec<String>,
    pub updated: Vec<String>,
    /// Keys holding secrets (generated now or earlier): for redaction in reports.
    pub secret_keys: BTreeSet<String>,
}

fn parse_line(line: &str) -> Option<(&str, &str)> {
    let t = line.trim_start();
    if t.starts_with('#') || t.is_empty() {
        return None;
    }
    let (k, v) = t.split_once('=')?;
    let k = k.trim();
    (!k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')).then_some((k, v))
}

/// Parse an env file's `KEY=value` lines.
pub fn parse(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(parse_line)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Substitute `${NAME}` from `site` (one pass: substituted text is not scanned again); names not
/// found are pushed to `missing` and left in the text as written.
pub fn substitute(value: &str, site: &BTreeMap<String, String>, missing: &mut Vec<String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) if after[..end].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && end > 0 => {
                let name = &after[..end];
                match site.get(name) {
                    Some(v) => out.push_str(v),
                    None => {
                        missing.push(name.to_string());
                        out.push_str(&rest[start..start + 2 + end + 1]);
                    }
                }
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Render. `secret` makes a fresh random secret.
pub fn render(
    template: &str,
    existing: Option<&str>,
    site: &BTreeMap<String, String>,
    mut secret: impl FnMut() -> String,
) -> Result<Rendered, Vec<Missing>> {
    let old = existing.map(parse).unwrap_or_default();
    let mut r = Rendered::default();
    let mut missing = Vec::new();
    let mut fresh: Vec<(String, String)> = Vec::new();
    let mut template_text = String::new();
    for (i, line) in template.lines().enumerate() {
        let Some((key, raw)) = parse_line(line) else {
            template_text.push_str(line);
            template_text.push('\n');
            continue;
        };
        let raw = raw.trim();
        if raw == GENERATE {
            r.secret_keys.insert(key.to_string());
        }
        // The install config first, then the operator's file, then the template.
        let value = match site.get(key).or_else(|| old.get(key)) {
            Some(v) => v.clone(),
            None if raw == GENERATE => {
                r.generated.push(key.to_string());
                secret()
            }
            None => template_value(key, raw, i + 1, site, &mut missing),
        };
        if existing.is_some() {
            match old.get(key) {
                None => r.added.push(key.to_string()),
                Some(o) if *o != value => r.updated.push(key.to_string()),
                _ => {}
            }
        }
        template_text.push_str(&format!("{key}={value}\n"));
        fresh.push((key.to_string(), value.clone()));
        r.values.insert(key.to_string(), value);
    }
    if !missing.is_empty() {
        return Err(missing);
    }
    r.text = match existing {
        None => template_text,
        Some(text) => merge_existing(text, &mut r, &fresh, old),
    };
    Ok(r)
}

/// The template's value of `key` (template line `line`) with the site values substituted; each
/// unset placeholder is a `Missing`, so all are reported together.
fn template_value(
    key: &str,
    raw: &str,
    line: usize,
    site: &BTreeMap<String, String>,
    missing: &mut Vec<Missing>,
) -> String {
    let mut names = Vec::new();
    let v = substitute(raw, site, &mut names);
    for name in names {
        missing.push(Missing {
            key: key.to_string(),
            name,
            line,
        });
    }
    v
}

/// The operator's existing file with only the keys the config changed rewritten and the new keys
/// (`fresh`, in template order) appended; the file's other keys join `r.values`.
fn merge_existing(text: &str, r: &mut Rendered, fresh: &[(String, String)], old: BTreeMap<String, String>) -> String {
    // Keep the operator's file: change only keys the config sets, append new keys.
    let mut out = String::new();
    for line in text.lines() {
        match parse_line(line) {
            Some((k, _)) if r.updated.iter().any(|u| u == k) => out.push_str(&format!("{k}={}\n", r.values[k])),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if !r.added.is_empty() {
        out.push_str("\n# added by bkbundle install (new in this bundle)\n");
        for (k, v) in fresh.iter().filter(|(k, _)| r.added.contains(k)) {
            out.push_str(&format!("{k}={v}\n"));
        }
    }
    for (k, v) in old {
        r.values.entry(k).or_insert(v);
    }
    out
}

/// A random secret of letters and digits (usable unquoted in URLs, YAML and nats.conf), from the
/// kernel's CSPRNG.
pub fn random_secret(len: usize) -> std::io::Result<String> {
    use std::io::Read;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut f = std::fs::File::open("/dev/urandom")?;
    let mut out = String::with_capacity(len);
    let mut b = [0u8; 64];
    // A leading letter: some consumers read an all-digit value as a number (nats.conf does).
    while out.len() < len {
        f.read_exact(&mut b)?;
        for &x in &b {
            // 248 = 4 * 62: reject the top values so every character is equally likely.
            if x < 248 && out.len() < len {
                let c = CHARS[(x % 62) as usize];
                if out.is_empty() && !c.is_ascii_alphabetic() {
                    continue;
                }
                out.push(c as char);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const T: &str = "# c\nHOST_IP=${HOST_IP}\nURL=https://${HOST_IP}:${PORT}\nPORT=443\nPW=__GENERATE__\n";

    #[test]
    fn fresh_render_fills_site_values_and_generates_secrets() {
        let r = render(T, None, &site(&[("HOST_IP", "10.0.0.5"), ("PORT", "8443")]), || {
            "S3cret".into()
        })
        .unwrap();
        assert_eq!(r.values["URL"], "https://10.0.0.5:8443");
        assert_eq!(r.values["PW"], "S3cret");
        assert_eq!(r.values["PORT"], "8443", "the config overrides a template default");
        assert_eq!(r.generated, vec!["PW"]);
        assert!(r.text.starts_with("# c\nHOST_IP=10.0.0.5\n"));
    }

    #[test]
    fn missing_site_values_are_named_with_their_line() {
        let e = render(T, None, &site(&[]), || "x".into()).unwrap_err();
        assert_eq!(
            e[0],
            Missing {
                key: "HOST_IP".into(),
                name: "HOST_IP".into(),
                line: 2
            }
        );
        assert!(
            e.iter().any(|m| m.key == "URL" && m.name == "PORT" && m.line == 3) || e.iter().any(|m| m.key == "URL")
        );
    }

    #[test]
    fn rerender_keeps_secrets_and_edits_and_adds_new_keys() {
        let s = site(&[("HOST_IP", "10.0.0.5"), ("PORT", "443")]);
        let first = render(T, None, &s, || "first".into()).unwrap();
        let edited = first.text.replace("PORT=443", "PORT=443\nMINE=1");
        let t2 = format!("{T}NEW=v\n");
        let second = render(&t2, Some(&edited), &s, || "second".into()).unwrap();
        assert_eq!(second.values["PW"], "first", "a generated secret is never rotated");
        assert!(second.generated.is_empty());
        assert_eq!(second.added, vec!["NEW"]);
        assert!(second.text.contains("MINE=1") && second.text.ends_with("NEW=v\n"));
        // Config value wins over the file and is reported as updated.
        let third = render(
            &t2,
            Some(&second.text),
            &site(&[("HOST_IP", "10.0.0.6"), ("PORT", "443")]),
            || "x".into(),
        )
        .unwrap();
        assert_eq!(third.values["HOST_IP"], "10.0.0.6");
        assert_eq!(third.updated, vec!["HOST_IP"]);
        assert!(third.text.contains("HOST_IP=10.0.0.6\n"));
    }

    #[test]
    fn secrets_are_alphanumeric_and_start_with_a_letter() {
        for _ in 0..50 {
            let s = random_secret(24).unwrap();
            assert_eq!(s.len(), 24);
            assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()));
            assert!(s.as_bytes()[0].is_ascii_alphabetic());
        }
    }
}
