//! Install's TLS step (issue 12): the stack's NATS serves TLS with a certificate from the site CA,
//! and agents verify it with that CA (in region env `NATS_TLS_CA` and in each controller package's
//! `certs/ca.crt`). Planned with everything else (nothing written), applied before the stack
//! starts. The CA is generated once and kept; the server certificate is issued again from it when
//! it no longer covers an address agents use or ends within 30 days, and the reasons reported. An
//! operator's own CA, certificate and key (`[tls]` of the install config) replace the generated
//! ones, checked first and never re-issued.

use crate::error::{Error, Result};
use crate::site::config::{InstallConfig, TlsConfig};
use crate::tls::{self, store, Decision, Material, Name, Policy, SiteCa};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::SystemTime;

/// Site value: the path of the CA file bkbundle itself verifies the stack's NATS with (install,
/// init-packages and doctor connect over TLS when `NATS_PROTOCOL` is `tls`). Internal: it is no
/// env template variable and no region key.
pub const CA_FILE_VALUE: &str = "BKBUNDLE_NATS_CA_FILE";

/// How a plan shows the CA of a site that has none yet (it is generated when install runs).
pub const GENERATED_CA: &str = "(the site CA install generates)";

/// What install does with the certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsAction {
    /// Generate the site CA and issue the NATS certificate.
    Generate,
    /// Everything in place.
    Keep,
    /// Issue the NATS certificate again from the same CA (see `reasons`).
    Reissue,
    /// The operator's own files: copied in (from `[tls]`) or kept as found.
    Operator,
}

/// The TLS part of install's plan.
#[derive(Clone, Serialize)]
pub struct TlsPlan {
    pub action: TlsAction,
    pub reasons: Vec<String>,
    /// The names the NATS certificate must cover.
    pub names: Vec<String>,
    /// SHA-256 (hex) of the CA certificate's PEM agents get.
    pub ca_sha256: String,
    /// The end of the NATS certificate's validity.
    pub not_after: String,
    #[serde(skip)]
    pub ca_pem: String,
    /// What to write, when anything.
    #[serde(skip)]
    write: Option<std::sync::Arc<(Material, Option<SiteCa>)>>,
}

impl std::fmt::Debug for TlsPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPlan")
            .field("action", &self.action)
            .field("reasons", &self.reasons)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// The addresses agents and bkbundle reach the stack's NATS by: `HOST_IP`, the host of
/// `SERVER_URL` and of `NATS_SERVERS`, every region's proxy address, the service name `nats`,
/// the loopback bkbundle itself connects on, and the extra `[tls] names`.
pub fn wanted_names(config: &InstallConfig, site: &BTreeMap<String, String>) -> (Vec<Name>, Vec<String>) {
    let mut raw: Vec<String> = vec!["nats".into(), "localhost".into(), "127.0.0.1".into()];
    for key in ["HOST_IP", "SERVER_URL", "NATS_SERVERS", "NATS_BIND_IP"] {
        if let Some(v) = site.get(key) {
            raw.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && *v != "0.0.0.0")
                    .map(str::to_string),
            );
        }
    }
    raw.extend(
        config
            .regions
            .iter()
            .filter_map(|r| r.proxy_address.clone())
            .filter(|a| !a.is_empty()),
    );
    raw.extend(config.tls.names.iter().cloned());
    let mut names = BTreeSet::new();
    let mut problems = Vec::new();
    for r in raw {
        match Name::parse(&r) {
            Ok(n) => {
                names.insert(n);
            }
            // A site value that is no address (a placeholder left unrendered) is for the region
            // checks to report; an extra name of [tls] that is none is refused here.
            Err(e) if config.tls.names.contains(&r) => problems.push(format!("[tls] names: {e}")),
            Err(_) => {}
        }
    }
    (names.into_iter().collect(), problems)
}

/// Plan the certificates: `None` when `[tls] enabled = false`. Errors are preflight findings
/// (an operator's files that do not fit, a target whose certificates cannot be read).
pub fn plan(target: &Path, config: &InstallConfig, site: &BTreeMap<String, String>) -> Result<Option<TlsPlan>> {
    let cfg: &TlsConfig = &config.tls;
    if !cfg.enabled {
        return Ok(None);
    }
    let (wanted, problems) = wanted_names(config, site);
    if !problems.is_empty() {
        return Err(Error::input(problems.join("\n")).hint("give host names or IP addresses in [tls] names"));
    }
    let policy = Policy {
        validity_days: cfg.validity_days,
        ..Policy::default()
    };
    let now = SystemTime::now();
    let names: Vec<String> = wanted.iter().map(|n| n.to_string()).collect();
    if let Some((ca, cert, key)) = cfg.operator_files() {
        let files = store::read_operator(ca, cert, key)?;
        let errors = tls::check_operator(&files, &wanted, &policy, now);
        if !errors.is_empty() {
            return Err(Error::findings(
                crate::error::Kind::Input,
                "the certificates named in [tls] do not serve the site",
                errors.into_iter().map(|e| e.message).collect(),
                vec![],
            ));
        }
        // Already copied in: nothing to write, so that a re-run can find the install complete.
        let in_place = store::load(target)?.is_some_and(|e| {
            e.ca_pem.as_deref() == Some(files.ca_pem.as_str())
                && e.cert_pem.as_deref() == Some(files.cert_pem.as_str())
                && e.key_pem.as_ref().map(|k| k.as_str()) == Some(files.key_pem.as_str())
        });
        return finish(TlsAction::Operator, vec![], names, files.material(), None, !in_place);
    }
    let existing = store::load(target)?;
    match tls::decide(existing.as_ref(), &wanted, &policy, now) {
        Decision::Generate => {
            let ca = tls::generate_ca(tls::CA_CN, now)?;
            let m = tls::issue_server(&ca, &wanted, &policy, now)?;
            finish(TlsAction::Generate, vec![], names, m, Some(ca), true)
        }
        Decision::Reissue { reasons } => {
            let ca = existing
                .and_then(|e| e.site_ca)
                .ok_or_else(|| Error::internal("re-issue without the site CA"))?;
            let m = tls::issue_server(&ca, &wanted, &policy, now)?;
            finish(TlsAction::Reissue, reasons, names, m, Some(ca), true)
        }
        Decision::Keep | Decision::Operator => {
            let e = existing.ok_or_else(|| Error::internal("no certificates to keep"))?;
            let action = if e.site_ca.is_some() {
                TlsAction::Keep
            } else {
                TlsAction::Operator
            };
            let m = Material {
                ca_pem: e.ca_pem.clone().unwrap_or_default(),
                cert_pem: e.cert_pem.clone().unwrap_or_default(),
                key_pem: e.key_pem.clone().unwrap_or_default(),
            };
            finish(action, vec![], names, m, None, false)
        }
    }
}

fn finish(
    action: TlsAction,
    reasons: Vec<String>,
    names: Vec<String>,
    m: Material,
    site_ca: Option<SiteCa>,
    write: bool,
) -> Result<Option<TlsPlan>> {
    let not_after = tls::inspect(&m.cert_pem)
        .map(|i| tls::date(i.not_after))
        .unwrap_or_default();
    Ok(Some(TlsPlan {
        action,
        reasons,
        names,
        ca_sha256: crate::digest::sha256_hex(m.ca_pem.as_bytes()),
        not_after,
        ca_pem: m.ca_pem.clone(),
        write: write.then(|| std::sync::Arc::new((m, site_ca))),
    }))
}

impl TlsPlan {
    /// Whether applying it writes anything.
    pub fn writes(&self) -> bool {
        self.write.is_some()
    }
}

/// Write what the plan decided (nothing for `Keep`). Returns whether the NATS certificate changed
/// (a running NATS must then restart to serve it).
pub fn apply(target: &Path, plan: &TlsPlan) -> Result<bool> {
    let Some(w) = &plan.write else { return Ok(false) };
    let (m, ca) = &**w;
    let before = std::fs::read(target.join(store::SERVER_CERT)).ok();
    store::save(target, m, ca.as_ref())?;
    Ok(before.as_deref() != Some(m.cert_pem.as_bytes()))
}

/// The site values TLS adds: `NATS_PROTOCOL = tls`, the CA's PEM as `NATS_TLS_CA` (for the
/// region env, through `${NATS_TLS_CA}` in the bundle's `[regions.env]`), and the CA file
/// bkbundle verifies NATS with. Values the install config's `[env]` sets win.
pub fn site_values(site: &mut BTreeMap<String, String>, config: &InstallConfig, ca_pem: &str, ca_file: &Path) {
    let mut set = |k: &str, v: String| {
        if !config.env.contains_key(k) {
            site.insert(k.to_string(), v);
        }
    };
    set("NATS_PROTOCOL", "tls".into());
    set("NATS_TLS_CA", ca_pem.to_string());
    set(CA_FILE_VALUE, ca_file.display().to_string());
}

/// A bundle's `[regions]` as a site whose NATS serves TLS seeds them (install, and `regions`
/// run on an installed target): every region gets `NATS_PROTOCOL` and `NATS_TLS_CA` from the
/// site values, whatever the bundle says, so a later `regions apply` keeps what install wrote.
pub fn regions_for(regions: &crate::manifest::Regions, site: &BTreeMap<String, String>) -> crate::manifest::Regions {
    let mut r = regions.clone();
    let declares = !r.required.is_empty() || !r.env.is_empty() || !r.region.is_empty();
    if site.contains_key(CA_FILE_VALUE) && declares {
        for k in ["NATS_PROTOCOL", "NATS_TLS_CA"] {
            if site.contains_key(k) {
                r.env.insert(k.to_string(), format!("${{{k}}}"));
            }
        }
    }
    r
}

/// The site values of an installed target whose NATS serves TLS (its `certs/` holds the CA and
/// the NATS certificate): for the commands run after install (`init-packages`, `doctor`,
/// `regions`) with `--env-file TARGET/.env`.
pub fn installed_site_values(target: &Path, site: &mut BTreeMap<String, String>, config: &InstallConfig) {
    let ca_file = target.join(store::CA_CERT);
    if !config.tls.enabled || !target.join(store::SERVER_CERT).is_file() {
        return;
    }
    if let Ok(pem) = std::fs::read_to_string(&ca_file) {
        site_values(site, config, &pem, &ca_file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: [&str; 4] = ["10.0.0.5", "nats", "localhost", "127.0.0.1"];

    fn site() -> BTreeMap<String, String> {
        BTreeMap::from([("HOST_IP".to_string(), "10.0.0.5".to_string())])
    }

    /// An operator's CA, certificate and key for [`NAMES`] in `dir`, and a config naming them.
    fn operator_config(dir: &Path) -> InstallConfig {
        let now = SystemTime::now();
        let ca = tls::generate_ca("Operator CA", now).unwrap();
        let names: Vec<Name> = NAMES.iter().map(|n| Name::parse(n).unwrap()).collect();
        let m = tls::issue_server(&ca, &names, &Policy::default(), now).unwrap();
        for (file, pem) in [
            ("ca.crt", &m.ca_pem),
            ("nats.crt", &m.cert_pem),
            ("nats.key", &*m.key_pem),
        ] {
            std::fs::write(dir.join(file), pem).unwrap();
        }
        let f = |n: &str| dir.join(n).display().to_string();
        let text = format!(
            "[tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            f("ca.crt"),
            f("nats.crt"),
            f("nats.key")
        );
        InstallConfig::parse(&text, "install.toml").unwrap()
    }

    #[test]
    fn a_generated_site_is_written_once_then_kept() {
        let target = tempfile::tempdir().unwrap();
        let config = InstallConfig::parse("", "install.toml").unwrap();
        let first = plan(target.path(), &config, &site()).unwrap().unwrap();
        assert_eq!((first.action, first.writes()), (TlsAction::Generate, true));
        assert!(apply(target.path(), &first).unwrap());
        let again = plan(target.path(), &config, &site()).unwrap().unwrap();
        assert_eq!((again.action, again.writes()), (TlsAction::Keep, false));
        assert_eq!(again.ca_sha256, first.ca_sha256);
    }

    #[test]
    fn an_operators_files_are_copied_once_then_a_rerun_writes_nothing() {
        let (pki, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let config = operator_config(pki.path());
        let first = plan(target.path(), &config, &site()).unwrap().unwrap();
        assert_eq!((first.action, first.writes()), (TlsAction::Operator, true));
        assert!(apply(target.path(), &first).unwrap());
        assert_eq!(
            std::fs::read(target.path().join(store::CA_CERT)).unwrap(),
            std::fs::read(pki.path().join("ca.crt")).unwrap()
        );
        // Nothing to write: a re-run must be able to find the install complete.
        let again = plan(target.path(), &config, &site()).unwrap().unwrap();
        assert_eq!((again.action, again.writes()), (TlsAction::Operator, false));
        assert!(!apply(target.path(), &again).unwrap());
        // The operator's renewed certificate is copied in again.
        let renewed = operator_config(pki.path());
        let third = plan(target.path(), &renewed, &site()).unwrap().unwrap();
        assert!(third.writes());
        assert!(apply(target.path(), &third).unwrap());
    }
}
