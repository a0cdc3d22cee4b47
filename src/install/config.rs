//! The install config (`install.toml`): what only the site knows. What the bundle knows stays in
//! the bundle. Versioned like every file bkbundle reads; unknown fields are refused with the line.
//!
//! ```toml
//! format = 1
//! target = "/opt/bklite"        # where the stack is laid out (--target wins)
//! project = "bklite"            # compose project name (default: the bundle's)
//!
//! [env]                         # values for the env template: ${NAME} placeholders and overrides
//! HOST_IP = "10.0.0.5"
//! SERVER_URL = "https://10.0.0.5:443"
//!
//! [health]
//! timeout_secs = 600            # deadline for the whole stack to become healthy
//! steady_secs = 5               # a service without a health check is ready after running this long
//! ```

use crate::error::{Error, Kind, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallConfig {
    #[serde(default = "one")]
    pub format: u32,
    pub target: Option<PathBuf>,
    pub project: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub health: Health,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    #[serde(default = "default_steady")]
    pub steady_secs: u64,
}

fn default_timeout() -> u64 {
    600
}
fn default_steady() -> u64 {
    5
}

impl Default for Health {
    fn default() -> Self {
        Health {
            timeout_secs: default_timeout(),
            steady_secs: default_steady(),
        }
    }
}

impl InstallConfig {
    pub fn load(path: &Path) -> Result<InstallConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read install config", path, e))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<InstallConfig> {
        let c: InstallConfig = toml::from_str(text).map_err(|e| {
            Error::input(format!("{origin}: {}", e.to_string().trim_end()))
                .hint("see `bkbundle install --help` for the install config's fields")
        })?;
        if c.format > 1 {
            return Err(Error::new(
                Kind::Unsupported,
                format!(
                    "{origin}: install config format {} is newer than this bkbundle supports (1)",
                    c.format
                ),
            ));
        }
        let mut problems = Vec::new();
        for k in c.env.keys() {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                problems.push(format!("[env] key {k:?} is not a variable name"));
            }
        }
        for (k, v) in &c.env {
            if v.contains('\n') {
                problems.push(format!("[env] {k}: values cannot span lines"));
            }
        }
        if c.health.timeout_secs == 0 {
            problems.push("[health] timeout_secs must be at least 1".into());
        }
        if let Some(p) = &c.project {
            if p.is_empty()
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                problems.push(format!(
                    "project {p:?} must be lower-case letters, digits, `-` or `_` (a compose project name)"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(Error::input(format!("{origin}: {}", problems.join("; "))));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_fields_with_the_line() {
        let c = InstallConfig::parse("format = 1\n[env]\nHOST_IP = \"10.0.0.5\"\n", "i.toml").unwrap();
        assert_eq!(c.env["HOST_IP"], "10.0.0.5");
        assert_eq!(c.health.timeout_secs, 600);
        let e = InstallConfig::parse("[env]\nA = \"1\"\n[helth]\nx = 1\n", "i.toml").unwrap_err();
        assert!(
            e.message.contains("i.toml") && e.message.contains("line 3"),
            "{}",
            e.message
        );
        let e = InstallConfig::parse("format = 3\n", "i.toml").unwrap_err();
        assert_eq!(e.kind, Kind::Unsupported);
    }
}
