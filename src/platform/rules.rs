//! What every region's sidecar env must be, computed and checked before anything is written.
//!
//! Pure: inputs are the bundle's region defaults ([`Regions`]), the install config's
//! `[[regions]]` and the site values for `${NAME}`; the output is the desired env of each region,
//! or every problem at once, each naming the region and the key with what was expected and what
//! was found (secret values are never shown).
//!
//! Merging, lowest first: the bundle's `[regions.env]` defaults, then the bundle's
//! `[[regions.region]]` entry of the same name, then the install config's `[[regions]]` entry.
//! The `default` region (id 1) comes first. Another region takes, for each key it has no value of
//! its own for, the default region's value, with the host of `NODE_SERVER_URL` and `NATS_SERVERS`
//! replaced by its `proxy_address` when it has one: what the server does when a region is created
//! in its UI. Unlike the server, which replaces the default's host as a substring, the host is
//! replaced as a URL part, so a port or a path that happens to contain the same digits is kept.

use super::crypto;
use crate::manifest::Regions;
use crate::site::config::RegionConfig;
use crate::site::envfile;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

pub const DEFAULT_REGION_ID: i64 = 1;
pub const DEFAULT_REGION_NAME: &str = "default";
pub const DEFAULT_REGION_INTRODUCTION: &str = "default cloud region!";

/// Keys whose host a region's `proxy_address` replaces (BKLITE.md, region inheritance).
/// The server turns each environment variable `DEFAULT_ZONE_VAR_<KEY>` into region 1's `<KEY>`.
pub const DEFAULT_ZONE_VAR_PREFIX: &str = "DEFAULT_ZONE_VAR_";

/// The env key the server stores a region's proxy host under.
pub const PROXY_ADDRESS_KEY: &str = "PROXY_ADDRESS";

pub const PROXIED_KEYS: [&str; 2] = ["NODE_SERVER_URL", "NATS_SERVERS"];

/// The `type` column of `node_mgmt_sidecarenv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvType {
    Str,
    Secret,
    Text,
}

impl EnvType {
    /// The upstream rule: a key containing `password` (any case) is `secret`, `NATS_TLS_CA` is
    /// `text`, everything else `str`.
    pub fn for_key(key: &str) -> EnvType {
        if key.to_ascii_lowercase().contains("password") {
            EnvType::Secret
        } else if key == "NATS_TLS_CA" {
            EnvType::Text
        } else {
            EnvType::Str
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EnvType::Str => "str",
            EnvType::Secret => "secret",
            EnvType::Text => "text",
        }
    }

    /// The stored type. Servers before 2025-12-16 stored region 1's plain values with type `''`:
    /// read as `str`, so such a row is not rewritten for its type alone.
    pub fn parse(s: &str) -> Option<EnvType> {
        match s {
            "str" | "" => Some(EnvType::Str),
            "secret" => Some(EnvType::Secret),
            "text" => Some(EnvType::Text),
            _ => None,
        }
    }
}

/// Where a region's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The region's own value (bundle or install config).
    Own,
    /// The default region's value, as is.
    Inherited,
    /// The default region's value with the host replaced by the region's `proxy_address`.
    Proxied,
}

/// One key's desired value. `Debug` hides secret values.
#[derive(Clone, PartialEq, Eq)]
pub struct DesiredValue {
    pub value: String,
    pub env_type: EnvType,
    pub source: Source,
}

impl fmt::Debug for DesiredValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = if self.env_type == EnvType::Secret {
            "<secret>"
        } else {
            &self.value
        };
        f.debug_struct("DesiredValue")
            .field("value", &value)
            .field("env_type", &self.env_type)
            .field("source", &self.source)
            .finish()
    }
}

/// One region as it must end up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredRegion {
    pub name: String,
    /// `None`: keep an existing region's introduction (`''` for a new one).
    pub introduction: Option<String>,
    /// `None`: keep an existing region's proxy address (`''` for a new one).
    pub proxy_address: Option<String>,
    pub local: bool,
    pub env: BTreeMap<String, DesiredValue>,
}

impl DesiredRegion {
    pub fn is_default(&self) -> bool {
        self.name == DEFAULT_REGION_NAME
    }
}

/// Every region, the default one first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub regions: Vec<DesiredRegion>,
}

impl Desired {
    pub fn has_secrets(&self) -> bool {
        self.regions
            .iter()
            .any(|r| r.env.values().any(|v| v.env_type == EnvType::Secret))
    }
}

/// One problem, naming the region and (when it is about one) the key. An empty `region` is a
/// problem of the whole run (e.g. no SECRET_KEY).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub region: String,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.key, self.region.is_empty()) {
            (Some(k), true) => write!(f, "{k}: {}", self.message),
            (Some(k), false) => write!(f, "region {:?}, {k}: {}", self.region, self.message),
            (None, _) => write!(f, "region {:?}: {}", self.region, self.message),
        }
    }
}

/// The merged specification of one region, before substitution.
struct Spec {
    name: String,
    introduction: Option<String>,
    proxy_address: Option<String>,
    local: bool,
    env: BTreeMap<String, String>,
}

/// The index of the spec named `name`, added empty when there is none yet.
fn spec_for(specs: &mut Vec<Spec>, name: &str) -> usize {
    match specs.iter().position(|s| s.name == name) {
        Some(i) => i,
        None => {
            specs.push(Spec {
                name: name.to_string(),
                introduction: None,
                proxy_address: None,
                local: false,
                env: BTreeMap::new(),
            });
            specs.len() - 1
        }
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// Compute and check the desired env of every region. `site` holds the values for `${NAME}`
/// (the install config's `[env]` over the stack's rendered `.env`).
pub fn desired(
    bundle: &Regions,
    config: &[RegionConfig],
    site: &BTreeMap<String, String>,
) -> Result<Desired, Vec<Problem>> {
    let mut problems = Vec::new();
    let specs = merge_specs(bundle, config);
    for s in &specs {
        check_spec(s, &mut problems);
    }
    let (substituted, unresolved) = substitute_site(&specs, site, &mut problems);

    // 4. Inheritance, types, and the checks of each final value.
    let default_env = substituted[0].clone();
    let default_local = specs[0].local;
    let mut regions = Vec::with_capacity(specs.len());
    for (i, (s, own)) in specs.iter().zip(substituted).enumerate() {
        let env = final_env(s, &own, &default_env);
        check_required(&bundle.required, s, &env, &mut problems);
        let protocol = env.get("NATS_PROTOCOL").map(|(v, _)| v.trim().to_string());
        let at_default = DefaultRegion {
            env: &default_env,
            local: default_local,
        };
        check_final_values(i, s, &env, protocol.as_deref(), &unresolved, at_default, &mut problems);
        if protocol.as_deref() == Some("tls") && !env.contains_key("NATS_TLS_CA") {
            problems.push(Problem {
                region: s.name.clone(),
                key: Some("NATS_TLS_CA".into()),
                message: "NATS_PROTOCOL is tls, so agents need the CA certificate: expected a PEM certificate (-----BEGIN CERTIFICATE-----), found none".into(),
            });
        }
        regions.push(desired_region(s, env));
    }
    if problems.is_empty() {
        Ok(Desired { regions })
    } else {
        Err(problems)
    }
}

/// Stage 1, the specs merged by name: default first, then the bundle's, then the site's new ones, so
/// every later stage sees one spec per region.
fn merge_specs(bundle: &Regions, config: &[RegionConfig]) -> Vec<Spec> {
    let mut specs: Vec<Spec> = vec![Spec {
        name: DEFAULT_REGION_NAME.into(),
        introduction: None,
        proxy_address: None,
        local: false,
        env: bundle.env.clone(),
    }];
    for r in &bundle.region {
        let i = spec_for(&mut specs, &r.name);
        let s = &mut specs[i];
        // The manifest cannot tell "not given" from empty: empty keeps what is there.
        s.introduction = non_empty(&r.introduction).or(s.introduction.take());
        s.proxy_address = non_empty(&r.proxy_address).or(s.proxy_address.take());
        s.env.extend(r.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    for r in config {
        let i = spec_for(&mut specs, &r.name);
        let s = &mut specs[i];
        if r.introduction.is_some() {
            s.introduction = r.introduction.clone();
        }
        if r.proxy_address.is_some() {
            s.proxy_address = r.proxy_address.clone();
        }
        s.local = r.local;
        s.env.extend(r.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    specs
}

/// Stage 2, the region-level checks of one spec (name, default region's fixed fields, proxy host, env
/// keys), which do not depend on any value.
fn check_spec(s: &Spec, problems: &mut Vec<Problem>) {
    let name = &s.name;
    let mut region_problem = |message: String| {
        problems.push(Problem {
            region: name.clone(),
            key: None,
            message,
        })
    };
    if name.trim().is_empty() || name.chars().count() > 100 {
        region_problem(format!("the name must be 1 to 100 characters, found {name:?}"));
    }
    if s.name == DEFAULT_REGION_NAME {
        if let Some(i) = s.introduction.as_deref().filter(|i| *i != DEFAULT_REGION_INTRODUCTION) {
            region_problem(format!(
                "the default region's introduction is the server's ({DEFAULT_REGION_INTRODUCTION:?}; it resets it at every start), found {i:?}: remove `introduction`"
            ));
        }
        if let Some(p) = s.proxy_address.as_deref().filter(|p| !p.is_empty()) {
            region_problem(format!(
                "the default region is the server's own and has no proxy address, found {p:?}: declare another region for agents behind a proxy"
            ));
        }
    }
    if let Some(p) = s.proxy_address.as_deref().filter(|p| !p.is_empty()) {
        if p.len() > 255 || !valid_host(p.trim_start_matches('[').trim_end_matches(']')) {
            region_problem(format!(
                "proxy_address must be a host only (an IP address or a name, no scheme, no port: the ports of NODE_SERVER_URL and NATS_SERVERS are kept), found {p:?}"
            ));
        }
    }
    for k in s.env.keys() {
        if !crate::manifest::is_env_key(k) || k.len() > 100 {
            problems.push(Problem {
                region: name.clone(),
                key: Some(k.clone()),
                message: "expected an env key of upper-case letters, digits and `_` (at most 100)".into(),
            });
        }
    }
}

/// The `(spec index, key)` pairs whose value has an unset placeholder.
type Unresolved = BTreeSet<(usize, String)>;

/// Stage 3, every spec's env with the site values substituted, and the `(spec index, key)` pairs left
/// with an unset placeholder: such a key is reported once, here, and skipped by the value checks.
fn substitute_site(
    specs: &[Spec],
    site: &BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
) -> (Vec<BTreeMap<String, String>>, Unresolved) {
    let mut unresolved: Unresolved = BTreeSet::new();
    let mut substituted: Vec<BTreeMap<String, String>> = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        let mut env = BTreeMap::new();
        for (k, raw) in &s.env {
            let mut missing = Vec::new();
            let v = envfile::substitute(raw, site, &mut missing);
            if !missing.is_empty() {
                unresolved.insert((i, k.clone()));
            }
            let mut seen = BTreeSet::new();
            for name in missing.into_iter().filter(|n| seen.insert(n.clone())) {
                problems.push(Problem {
                    region: s.name.clone(),
                    key: Some(k.clone()),
                    message: format!(
                        "the placeholder ${{{name}}} is not set: give {name} under [env] of the install config (or in the stack's .env)"
                    ),
                });
            }
            env.insert(k.clone(), v);
        }
        substituted.push(env);
    }
    (substituted, unresolved)
}

/// Stage 4a, a region's final env: its own values, then (for any region but the default) the default
/// region's, with the proxied keys' host replaced by the region's proxy address.
fn final_env(
    s: &Spec,
    own: &BTreeMap<String, String>,
    default_env: &BTreeMap<String, String>,
) -> BTreeMap<String, (String, Source)> {
    let proxy = s.proxy_address.as_deref().filter(|p| !p.is_empty());
    let mut env = BTreeMap::new();
    for (k, v) in own {
        env.insert(k.clone(), (v.clone(), Source::Own));
    }
    if !s.name.eq(DEFAULT_REGION_NAME) {
        for (k, v) in default_env {
            if env.contains_key(k) {
                continue;
            }
            let replaced = match proxy {
                Some(p) if PROXIED_KEYS.contains(&k.as_str()) => replace_host(k, v, p),
                _ => None,
            };
            match replaced {
                Some(nv) => env.insert(k.clone(), (nv, Source::Proxied)),
                None => env.insert(k.clone(), (v.clone(), Source::Inherited)),
            };
        }
    }
    // The server gives a region it creates a PROXY_ADDRESS row holding its proxy host.
    if let (false, Some(p)) = (s.name == DEFAULT_REGION_NAME, proxy) {
        env.entry(PROXY_ADDRESS_KEY.to_string())
            .or_insert_with(|| (p.to_string(), Source::Own));
    }
    env
}

/// Stage 4b, the keys the bundle requires, missing or empty in a region's final env.
fn check_required(
    required: &[String],
    s: &Spec,
    env: &BTreeMap<String, (String, Source)>,
    problems: &mut Vec<Problem>,
) {
    for req in required {
        match env.get(req) {
            None => problems.push(Problem {
                region: s.name.clone(),
                key: Some(req.clone()),
                message: "required by the bundle and missing: give it under [regions.env] of the install config (for every region) or under [[regions]] env for this one".into(),
            }),
            Some((v, _)) if v.trim().is_empty() => problems.push(Problem {
                region: s.name.clone(),
                key: Some(req.clone()),
                message: "required by the bundle and empty".into(),
            }),
            _ => {}
        }
    }
}

/// The default region's final env and locality, against which an inherited value is checked.
#[derive(Clone, Copy)]
struct DefaultRegion<'a> {
    env: &'a BTreeMap<String, String>,
    local: bool,
}

/// Stage 4c, the checks of each final value of region `i`, skipping a key whose placeholder is unset
/// (reported in stage 3) and an inherited problem already reported for the default region.
fn check_final_values(
    i: usize,
    s: &Spec,
    env: &BTreeMap<String, (String, Source)>,
    protocol: Option<&str>,
    unresolved: &Unresolved,
    default: DefaultRegion<'_>,
    problems: &mut Vec<Problem>,
) {
    for (k, (v, source)) in env {
        let from = if *source == Source::Own { i } else { 0 };
        if unresolved.contains(&(from, k.clone())) {
            continue;
        }
        let mut found = check_value(k, v, s.local, protocol);
        if *source == Source::Inherited {
            // The default region's own problems are reported once, for the default region.
            let at_default = check_value(k, v, default.local, default_env_protocol(default.env).as_deref());
            found.retain(|m| !at_default.contains(m));
        }
        let suffix = match source {
            Source::Own => "",
            Source::Inherited => " (inherited from region \"default\")",
            Source::Proxied => " (inherited from region \"default\", host replaced by proxy_address)",
        };
        problems.extend(found.into_iter().map(|m| Problem {
            region: s.name.clone(),
            key: Some(k.clone()),
            message: format!("{m}{suffix}"),
        }));
    }
}

/// Stage 4d, the region as the plan carries it, each value with its env type.
fn desired_region(s: &Spec, env: BTreeMap<String, (String, Source)>) -> DesiredRegion {
    DesiredRegion {
        name: s.name.clone(),
        introduction: s.introduction.clone(),
        proxy_address: s.proxy_address.clone(),
        local: s.local,
        env: env
            .into_iter()
            .map(|(k, (value, source))| {
                let env_type = EnvType::for_key(&k);
                (
                    k,
                    DesiredValue {
                        value,
                        env_type,
                        source,
                    },
                )
            })
            .collect(),
    }
}

/// Check a region that exists in the database but not in the install config, from its stored
/// rows (`(value, type)`; secrets are not decrypted, only their presence counts). bkbundle does
/// not seed such a region (it does not know its proxy address or its agents), so every problem
/// comes with the way to have it seeded.
pub fn check_stored_region(
    name: &str,
    id: i64,
    stored: &BTreeMap<String, (String, Option<EnvType>)>,
    required: &[String],
) -> Vec<Problem> {
    let fix = format!(
        "region {name:?} (id {id}) is in the database but not in the install config: declare it under [[regions]] so bkbundle seeds it (keys it does not set are inherited from default, with its proxy_address), or fix it in the UI"
    );
    stored_problems(stored, required, "required by the bundle", false)
        .into_iter()
        .map(|(key, message)| Problem {
            region: name.to_string(),
            key: Some(key),
            message: format!("{message}; {fix}"),
        })
        .collect()
}

/// The problems of a region's stored rows, as `(key, message)`: required keys missing or empty,
/// and stored values that would break agents (`null`, not a URL, a loopback server URL unless
/// `local`). Secrets are not judged (only their presence). `why` says who requires the keys.
pub fn stored_problems(
    stored: &BTreeMap<String, (String, Option<EnvType>)>,
    required: &[String],
    why: &str,
    local: bool,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for req in required {
        match stored.get(req) {
            None => out.push((req.clone(), format!("{why} and missing"))),
            Some((v, _)) if v.trim().is_empty() => out.push((req.clone(), format!("{why} and empty"))),
            _ => {}
        }
    }
    let protocol = stored.get("NATS_PROTOCOL").map(|(v, _)| v.trim().to_string());
    for (k, (v, t)) in stored {
        if *t == Some(EnvType::Secret) || EnvType::for_key(k) == EnvType::Secret {
            continue;
        }
        for m in check_value(k, v, local, protocol.as_deref()) {
            out.push((k.clone(), format!("the stored value: {m}")));
        }
    }
    out
}

fn default_env_protocol(env: &BTreeMap<String, String>) -> Option<String> {
    env.get("NATS_PROTOCOL").map(|v| v.trim().to_string())
}

/// `found` for a message: the value quoted, or nothing for secrets.
fn shown(key: &str, value: &str) -> String {
    if EnvType::for_key(key) == EnvType::Secret {
        "a secret value (not shown)".into()
    } else if value.chars().count() > 120 {
        format!("{:?}...", value.chars().take(120).collect::<String>())
    } else {
        format!("{value:?}")
    }
}

/// Values that a missing setting turned into text somewhere upstream.
fn is_nullish(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "null" | "none" | "undefined" | "nil"
    )
}

/// The problems of one final value (messages without region and key).
fn check_value(key: &str, value: &str, local: bool, protocol: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if value.contains("${") {
        out.push(format!(
            "expected a value, found an unresolved placeholder in {}",
            shown(key, value)
        ));
        return out;
    }
    match key {
        "NODE_SERVER_URL" => {
            if let Err(e) = check_http_url(value, !local) {
                out.push(format!(
                    "{e}; expected the absolute http(s) URL agents reach the server at, e.g. https://10.0.0.5:443, found {}",
                    shown(key, value)
                ));
            }
        }
        "NATS_SERVERS" => {
            if let Err(e) = check_nats_servers(value, !local, protocol) {
                out.push(format!(
                    "{e}; expected host:port[,host:port...] (optionally nats:// or tls://), e.g. 10.0.0.5:4222, found {}",
                    shown(key, value)
                ));
            }
        }
        "NATS_PROTOCOL" => {
            if !matches!(value, "nats" | "tls") {
                out.push(format!("expected `nats` or `tls`, found {}", shown(key, value)));
            }
        }
        "NATS_TLS_CA" => {
            // Empty is "no CA" (fine unless TLS is used, which is checked per region).
            let unset = value.trim().is_empty() && protocol != Some("tls");
            if !unset && !is_pem_certificate(value) {
                out.push(format!(
                    "expected a PEM certificate (-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----), found {}",
                    shown(key, value)
                ));
            }
        }
        "NATS_INSTALLER_CREDENTIALS_MODE" => {
            if !matches!(value, "legacy" | "strict") {
                out.push(format!("expected `legacy` or `strict`, found {}", shown(key, value)));
            }
        }
        k if k.ends_with("_URL") => {
            // Other service URLs (STARGAZER_URL, WEBHOOK_SERVER_URL, ...) commonly name Docker
            // network hosts: no loopback rule, but they must be URLs.
            if value.is_empty() {
                return out;
            }
            if let Err(e) = check_http_url(value, false) {
                out.push(format!(
                    "{e}; expected an absolute http(s) URL, found {}",
                    shown(key, value)
                ));
            }
        }
        _ => {
            if is_nullish(value) && EnvType::for_key(key) != EnvType::Secret {
                out.push(format!(
                    "expected a value, found the literal {} (what a missing setting becomes upstream)",
                    shown(key, value)
                ));
            }
        }
    }
    out
}

fn is_pem_certificate(v: &str) -> bool {
    let t = v.trim();
    match (
        t.find("-----BEGIN CERTIFICATE-----"),
        t.rfind("-----END CERTIFICATE-----"),
    ) {
        (Some(b), Some(e)) => b < e && t[b + 27..e].trim().len() > 16,
        _ => false,
    }
}

/// The parts of an absolute URL this module needs.
struct Url<'a> {
    scheme: &'a str,
    userinfo: Option<&'a str>,
    /// Without the brackets of an IPv6 address.
    host: &'a str,
    port: Option<&'a str>,
    rest: &'a str,
}

fn parse_url(v: &str) -> Result<Url<'_>, String> {
    if v.trim() != v {
        return Err("it has leading or trailing spaces".into());
    }
    if v.is_empty() {
        return Err("it is empty".into());
    }
    if is_nullish(v) {
        return Err(format!("it is the literal {v:?} (agents would get `{v}/api/v1/...`)"));
    }
    let Some((scheme, after)) = v.split_once("://") else {
        return Err(if v.starts_with('/') {
            "it is a bare path, without scheme and host".into()
        } else {
            "it has no scheme (http:// or https://)".into()
        });
    };
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(end);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (host, port) = split_host_port(hostport)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(Url {
        scheme,
        userinfo,
        host,
        port,
        rest,
    })
}

/// `host[:port]` with IPv6 in brackets. The host is returned as written.
fn split_host_port(hp: &str) -> Result<(&str, Option<&str>), String> {
    if hp.starts_with('[') {
        let close = hp.find(']').ok_or("its IPv6 address lacks the closing `]`")?;
        let (h, rest) = hp.split_at(close + 1);
        return match rest.strip_prefix(':') {
            Some(p) => Ok((h, Some(p))),
            None if rest.is_empty() => Ok((h, None)),
            None => Err(format!("unexpected {rest:?} after the host")),
        };
    }
    match hp.rsplit_once(':') {
        Some((h, _)) if h.contains(':') => Err("an IPv6 address must be written in brackets, e.g. [fd00::5]".into()),
        Some((h, p)) => Ok((h, Some(p))),
        None => Ok((hp, None)),
    }
}

fn check_port(p: &str) -> Result<(), String> {
    match p.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) && !p.starts_with('+') => Ok(()),
        _ => Err(format!("the port {p:?} is not a number from 1 to 65535")),
    }
}

/// A host name (RFC 1123 labels), an IPv4 address or an IPv6 address (without brackets).
fn valid_host(h: &str) -> bool {
    if h.parse::<Ipv6Addr>().is_ok() || h.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    // All-numeric dotted text that is not an IPv4 address (e.g. 10.0.0.256) is a typo.
    if h.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Loopback or unspecified: an address that means "this machine" to whoever uses it.
pub fn is_loopback_host(h: &str) -> bool {
    let h = h.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    if h == "localhost" || h.ends_with(".localhost") {
        return true;
    }
    if let Ok(a) = h.parse::<Ipv4Addr>() {
        return a.is_loopback() || a.is_unspecified();
    }
    if let Ok(a) = h.parse::<Ipv6Addr>() {
        return a.is_loopback()
            || a.is_unspecified()
            || a.to_ipv4_mapped()
                .is_some_and(|v4| v4.is_loopback() || v4.is_unspecified());
    }
    false
}

const LOOPBACK_HINT: &str = "agents on other machines would connect to themselves: use the address they reach this host at (set `local = true` on the region only if its agents run on this host)";

fn check_host(host: &str, refuse_loopback: bool) -> Result<(), String> {
    if host.is_empty() {
        return Err("it has no host".into());
    }
    if !valid_host(host) {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    if refuse_loopback && is_loopback_host(host) {
        return Err(format!("its host {host} is a loopback address: {LOOPBACK_HINT}"));
    }
    Ok(())
}

fn check_http_url(v: &str, refuse_loopback: bool) -> Result<(), String> {
    let u = parse_url(v)?;
    if !matches!(u.scheme.to_ascii_lowercase().as_str(), "http" | "https") {
        return Err(format!("the scheme {:?} is not http or https", u.scheme));
    }
    if u.userinfo.is_some() {
        return Err("it carries credentials (user@): agents must not get them in a URL".into());
    }
    check_host(u.host, refuse_loopback)?;
    if let Some(p) = u.port {
        check_port(p)?;
    }
    if u.rest.contains(['?', '#']) {
        return Err("it has a query or fragment, and agents append /api/v1/node_mgmt/open_api/node to it".into());
    }
    Ok(())
}

fn check_nats_servers(v: &str, refuse_loopback: bool, protocol: Option<&str>) -> Result<(), String> {
    if v.trim().is_empty() {
        return Err("it is empty".into());
    }
    if is_nullish(v) {
        return Err(format!("it is the literal {:?}", v.trim()));
    }
    for (i, entry) in v.split(',').enumerate() {
        let e = entry.trim();
        let n = i + 1;
        if e.is_empty() {
            return Err(format!("entry {n} is empty"));
        }
        let (scheme, hp) = match e.split_once("://") {
            Some((s, rest)) => (Some(s), rest),
            None => (None, e),
        };
        if let Some(s) = scheme {
            if !matches!(s, "nats" | "tls") {
                return Err(format!("entry {n} {e:?}: the scheme {s:?} is not nats:// or tls://"));
            }
            if let Some(p) = protocol.filter(|p| matches!(*p, "nats" | "tls") && *p != s) {
                return Err(format!(
                    "entry {n} {e:?}: the scheme {s}:// contradicts NATS_PROTOCOL = {p}"
                ));
            }
        }
        if hp.contains('@') {
            return Err(format!(
                "entry {n}: it carries credentials (user:password@): use NATS_USERNAME and NATS_PASSWORD"
            ));
        }
        if hp.contains(['/', '?', '#']) {
            return Err(format!("entry {n} {e:?} has a path"));
        }
        let (host, port) = split_host_port(hp).map_err(|m| format!("entry {n} {e:?}: {m}"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        check_host(host, refuse_loopback).map_err(|m| format!("entry {n}: {m}"))?;
        match port {
            Some(p) => check_port(p).map_err(|m| format!("entry {n} {e:?}: {m}"))?,
            None => return Err(format!("entry {n} {e:?} has no port")),
        }
    }
    Ok(())
}

/// The host as it goes into a URL: IPv6 in brackets.
fn host_for_url(proxy: &str) -> String {
    let bare = proxy.trim_start_matches('[').trim_end_matches(']');
    if bare.contains(':') {
        format!("[{bare}]")
    } else {
        bare.to_string()
    }
}

/// The value with its host(s) replaced by `proxy`; `None` when the value is not parseable (its
/// own check reports that).
pub fn replace_host(key: &str, value: &str, proxy: &str) -> Option<String> {
    let new_host = host_for_url(proxy);
    match key {
        "NODE_SERVER_URL" => {
            let u = parse_url(value).ok()?;
            let mut out = format!("{}://", u.scheme);
            if let Some(ui) = u.userinfo {
                out.push_str(ui);
                out.push('@');
            }
            out.push_str(&new_host);
            if let Some(p) = u.port {
                out.push(':');
                out.push_str(p);
            }
            out.push_str(u.rest);
            Some(out)
        }
        "NATS_SERVERS" => {
            let mut parts = Vec::new();
            for entry in value.split(',') {
                let e = entry.trim();
                let (scheme, hp) = match e.split_once("://") {
                    Some((s, rest)) => (Some(s), rest),
                    None => (None, e),
                };
                let (_, port) = split_host_port(hp).ok()?;
                let mut out = scheme.map(|s| format!("{s}://")).unwrap_or_default();
                out.push_str(&new_host);
                if let Some(p) = port {
                    out.push(':');
                    out.push_str(p);
                }
                parts.push(out);
            }
            Some(parts.join(","))
        }
        _ => None,
    }
}

/// The stored length of a value (secrets are stored encrypted), to check a column's limit.
pub fn stored_len(v: &DesiredValue) -> usize {
    match v.env_type {
        EnvType::Secret => crypto::encrypted_len(v.value.len()),
        _ => v.value.chars().count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::RegionDef;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn bundle() -> Regions {
        Regions {
            required: vec![
                "NODE_SERVER_URL".into(),
                "NATS_SERVERS".into(),
                "NATS_PROTOCOL".into(),
                "NATS_PASSWORD".into(),
            ],
            env: map(&[
                ("NODE_SERVER_URL", "${SERVER_URL}"),
                ("NATS_SERVERS", "${HOST_IP}:4222"),
                ("NATS_PROTOCOL", "nats"),
                ("NATS_PASSWORD", "${NATS_ADMIN_PASSWORD}"),
                ("STARGAZER_URL", "http://stargazer:8083"),
            ]),
            region: vec![RegionDef {
                name: "default".into(),
                introduction: "default cloud region!".into(),
                ..Default::default()
            }],
        }
    }

    fn site() -> BTreeMap<String, String> {
        map(&[
            ("SERVER_URL", "https://10.0.0.5:443"),
            ("HOST_IP", "10.0.0.5"),
            ("NATS_ADMIN_PASSWORD", "pw"),
        ])
    }

    fn region(name: &str) -> RegionConfig {
        RegionConfig {
            name: name.into(),
            ..Default::default()
        }
    }

    fn messages(p: &[Problem]) -> String {
        p.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn default_first_with_types_and_sources() {
        let d = desired(&bundle(), &[region("east")], &site()).unwrap();
        assert_eq!(d.regions[0].name, "default");
        assert_eq!(d.regions[1].name, "east");
        let def = &d.regions[0].env;
        assert_eq!(def["NODE_SERVER_URL"].value, "https://10.0.0.5:443");
        assert_eq!(def["NATS_PASSWORD"].env_type, EnvType::Secret);
        assert_eq!(def["NODE_SERVER_URL"].env_type, EnvType::Str);
        assert_eq!(d.regions[1].env["NATS_SERVERS"].source, Source::Inherited);
        assert!(d.has_secrets());
        assert!(!format!("{d:?}").contains("\"pw\""), "Debug hides secrets");
    }

    #[test]
    fn type_rule() {
        assert_eq!(EnvType::for_key("NATS_ADMIN_PASSWORD"), EnvType::Secret);
        assert_eq!(EnvType::for_key("My_Password_2"), EnvType::Secret);
        assert_eq!(EnvType::for_key("NATS_TLS_CA"), EnvType::Text);
        assert_eq!(EnvType::for_key("NATS_TLS_CA_FILE"), EnvType::Str);
        assert_eq!(EnvType::for_key("NATS_USERNAME"), EnvType::Str);
    }

    #[test]
    fn proxy_replaces_the_host_only() {
        let mut east = region("east");
        east.proxy_address = Some("10.1.0.9".into());
        let mut b = bundle();
        b.env
            .insert("NATS_SERVERS".into(), "tls://10.0.0.5:4222, 10.0.0.6:4223".into());
        b.env.insert("NATS_PROTOCOL".into(), "tls".into());
        b.env.insert(
            "NATS_TLS_CA".into(),
            "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUb\n-----END CERTIFICATE-----\n".into(),
        );
        let d = desired(&b, &[east], &site()).unwrap();
        let e = &d.regions[1].env;
        assert_eq!(e["NODE_SERVER_URL"].value, "https://10.1.0.9:443");
        assert_eq!(e["NODE_SERVER_URL"].source, Source::Proxied);
        assert_eq!(e["NATS_SERVERS"].value, "tls://10.1.0.9:4222,10.1.0.9:4223");
        assert_eq!(e["STARGAZER_URL"].source, Source::Inherited);
        assert_eq!(
            replace_host("NODE_SERVER_URL", "http://a.example:8080/bk", "fd00::9").unwrap(),
            "http://[fd00::9]:8080/bk"
        );
        assert_eq!(
            replace_host("NATS_SERVERS", "[fd00::1]:4222", "node-proxy").unwrap(),
            "node-proxy:4222"
        );
    }

    #[test]
    fn own_values_win_and_merge_order_is_bundle_then_site() {
        let mut b = bundle();
        b.region.push(RegionDef {
            name: "east".into(),
            introduction: "from bundle".into(),
            proxy_address: "10.1.0.1".into(),
            env: map(&[("STARGAZER_URL", "http://bundle:1")]),
        });
        let mut east = region("east");
        east.introduction = Some("from site".into());
        east.env = map(&[("NODE_SERVER_URL", "https://east.example:443")]);
        let d = desired(&b, &[east], &site()).unwrap();
        let r = &d.regions[1];
        assert_eq!(r.introduction.as_deref(), Some("from site"));
        assert_eq!(r.proxy_address.as_deref(), Some("10.1.0.1"));
        assert_eq!(r.env["NODE_SERVER_URL"].value, "https://east.example:443");
        assert_eq!(r.env["NODE_SERVER_URL"].source, Source::Own);
        assert_eq!(r.env["STARGAZER_URL"].value, "http://bundle:1");
        assert_eq!(r.env["NATS_SERVERS"].value, "10.1.0.1:4222");
    }

    #[test]
    fn every_problem_at_once_naming_region_and_key() {
        let mut b = bundle();
        b.env.remove("NODE_SERVER_URL");
        let mut east = region("east");
        east.env = map(&[("NATS_PROTOCOL", "nat"), ("NATS_SERVERS", "10.0.0.5")]);
        let mut west = region("west");
        west.env = map(&[("NODE_SERVER_URL", "null")]);
        let p = desired(&b, &[east, west], &map(&[("HOST_IP", "10.0.0.5")])).unwrap_err();
        let m = messages(&p);
        for needle in [
            "region \"default\", NODE_SERVER_URL: required by the bundle and missing",
            "region \"east\", NODE_SERVER_URL: required by the bundle and missing",
            "region \"east\", NATS_PROTOCOL: expected `nats` or `tls`, found \"nat\"",
            "region \"east\", NATS_SERVERS: entry 1 \"10.0.0.5\" has no port",
            "region \"west\", NODE_SERVER_URL: it is the literal \"null\"",
            "region \"default\", NATS_PASSWORD: the placeholder ${NATS_ADMIN_PASSWORD} is not set",
        ] {
            assert!(m.contains(needle), "missing {needle:?} in\n{m}");
        }
        // Inherited problems are not repeated per region.
        assert!(!m.contains("region \"west\", NATS_PASSWORD"), "{m}");
        assert!(!m.contains("placeholder in a secret"), "{m}");
    }

    #[test]
    fn server_url_forms() {
        for bad in [
            "",
            "null",
            "None",
            "undefined",
            "/api",
            "10.0.0.5:443",
            "ftp://10.0.0.5",
            "https://",
            "https://:443",
            "https://a b",
            "https://10.0.0.5:0",
            "https://10.0.0.5:99999",
            "https://u:p@10.0.0.5",
            "https://10.0.0.5/?x",
            " https://10.0.0.5",
            "https://fd00::1:443",
            "https://300.1.1.1",
        ] {
            assert!(check_http_url(bad, true).is_err(), "{bad:?} accepted");
        }
        for good in [
            "https://10.0.0.5:443",
            "http://10.0.0.5:8080",
            "https://bk.example.com",
            "https://[fd00::5]:443/",
            "https://bk.example.com/prefix",
        ] {
            assert!(check_http_url(good, true).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn loopback_is_refused_unless_local() {
        for h in [
            "127.0.0.1",
            "127.1.2.3",
            "localhost",
            "LOCALHOST",
            "[::1]",
            "::1",
            "0.0.0.0",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        assert!(!is_loopback_host("10.0.0.5"));
        let s = map(&[
            ("SERVER_URL", "http://127.0.0.1:8000"),
            ("HOST_IP", "localhost"),
            ("NATS_ADMIN_PASSWORD", "pw"),
        ]);
        let p = desired(&bundle(), &[], &s).unwrap_err();
        let m = messages(&p);
        assert!(
            m.contains("region \"default\", NODE_SERVER_URL: its host 127.0.0.1 is a loopback address"),
            "{m}"
        );
        assert!(
            m.contains("region \"default\", NATS_SERVERS: entry 1: its host localhost is a loopback address"),
            "{m}"
        );
        let mut def = region("default");
        def.local = true;
        assert!(desired(&bundle(), &[def.clone()], &s).is_ok());
        // A remote region inheriting the local default's loopback URL is refused.
        let p = desired(&bundle(), &[def, region("east")], &s).unwrap_err();
        let m = messages(&p);
        assert!(
            m.contains("region \"east\", NODE_SERVER_URL: its host 127.0.0.1 is a loopback address")
                && m.contains("inherited from region \"default\""),
            "{m}"
        );
        assert!(!m.contains("region \"default\","), "{m}");
    }

    #[test]
    fn nats_servers_and_tls() {
        assert!(check_nats_servers("10.0.0.5:4222,nats://b.example:4222", true, Some("nats")).is_ok());
        assert!(check_nats_servers("tls://[fd00::1]:4222", true, Some("tls")).is_ok());
        for bad in [
            "",
            "null",
            "10.0.0.5",
            "10.0.0.5:4222,",
            "http://10.0.0.5:4222",
            "u:p@10.0.0.5:4222",
            "10.0.0.5:4222/x",
            "tls://10.0.0.5:4222",
        ] {
            assert!(check_nats_servers(bad, true, Some("nats")).is_err(), "{bad:?} accepted");
        }
        let mut b = bundle();
        b.env.insert("NATS_PROTOCOL".into(), "tls".into());
        let m = messages(&desired(&b, &[], &site()).unwrap_err());
        assert!(
            m.contains("region \"default\", NATS_TLS_CA: NATS_PROTOCOL is tls") && m.contains("found none"),
            "{m}"
        );
        b.env.insert("NATS_TLS_CA".into(), "/etc/ca.pem".into());
        let m = messages(&desired(&b, &[], &site()).unwrap_err());
        assert!(
            m.contains("NATS_TLS_CA: expected a PEM certificate") && m.contains("found \"/etc/ca.pem\""),
            "{m}"
        );
    }

    #[test]
    fn region_level_problems() {
        let mut def = region("default");
        def.introduction = Some("mine".into());
        def.proxy_address = Some("10.0.0.9".into());
        let mut east = region("east");
        east.proxy_address = Some("https://10.1.0.9:443".into());
        let m = messages(&desired(&bundle(), &[def, east], &site()).unwrap_err());
        assert!(
            m.contains("region \"default\": the default region's introduction"),
            "{m}"
        );
        assert!(
            m.contains("region \"default\": the default region is the server's own"),
            "{m}"
        );
        assert!(m.contains("region \"east\": proxy_address must be a host only"), "{m}");
    }

    #[test]
    fn secrets_are_never_shown_in_problems() {
        let mut east = region("east");
        east.env = map(&[("NATS_PASSWORD", "${NOPE}topsecret")]);
        let m = messages(&desired(&bundle(), &[east], &site()).unwrap_err());
        assert!(m.contains("${NOPE} is not set") && !m.contains("topsecret"), "{m}");
    }
}
