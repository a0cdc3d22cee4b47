//! The TLS check (issue 12), where the regions' env says `NATS_PROTOCOL = tls`: the NATS server
//! certificate install wrote (the target's `certs/`) expiring or expired, not covering an address
//! a region's agents connect to, not signed by the CA a region's `NATS_TLS_CA` row or a
//! controller package carries; and a NATS that answers in plain text although agents are told
//! `tls` (they then fail their handshake).

use super::{Ctx, Severity, PROBE};
use crate::packages::inject;
use crate::platform::regions::Current;
use crate::ports::ObjectStore;
use crate::tls::{self, Name};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// A certificate that ends within this many days is a warning (install re-issues it then).
const RENEW_DAYS: u64 = 30;

/// Each region's (name, NATS_PROTOCOL, NATS_SERVERS, NATS_TLS_CA) as stored.
fn region_tls(current: &Current) -> Vec<(String, String, String, Option<String>)> {
    current
        .regions
        .iter()
        .map(|r| {
            let get = |k: &str| {
                current
                    .env
                    .iter()
                    .find(|e| e.region_id == r.id && e.key == k)
                    .map(|e| e.value.clone())
            };
            (
                r.name.clone(),
                get("NATS_PROTOCOL").unwrap_or_default().trim().to_ascii_lowercase(),
                get("NATS_SERVERS").unwrap_or_default(),
                get("NATS_TLS_CA"),
            )
        })
        .collect()
}

/// The target's certificate files, found beside the CA bkbundle verifies NATS with.
fn target_certs(ctx: &Ctx<'_>) -> Option<(PathBuf, PathBuf)> {
    let ca = PathBuf::from(ctx.opts.site.get(crate::install::tls::CA_FILE_VALUE)?);
    let cert = ca.parent()?.join("nats-server.crt");
    Some((ca, cert))
}

pub(super) async fn check(ctx: &mut Ctx<'_>, current: &Current, store: Option<&dyn ObjectStore>) {
    let regions = region_tls(current);
    if !regions.iter().any(|r| r.1 == "tls") {
        return;
    }
    plain_text(ctx).await;
    let Some((ca_file, cert_file)) = target_certs(ctx) else {
        ctx.add(
            "tls",
            Severity::Info,
            "NATS certificate",
            "not checked: the install target's certs/ are not known (give --target or --env-file TARGET/.env)",
        );
        return;
    };
    let cert = match std::fs::read_to_string(&cert_file) {
        Ok(c) => c,
        Err(e) => {
            ctx.add(
                "tls",
                Severity::Error,
                cert_file.display().to_string(),
                format!("the NATS server certificate cannot be read: {e}"),
            )
            .fix("bkbundle install BUNDLE --target TARGET   (issues it again from the site CA)");
            return;
        }
    };
    let info = match tls::inspect(&cert) {
        Ok(i) => i,
        Err(e) => {
            ctx.add(
                "tls",
                Severity::Error,
                cert_file.display().to_string(),
                format!("not a certificate: {e}"),
            );
            return;
        }
    };
    expiry(ctx, &cert_file, &info);
    for (name, protocol, servers, ca) in &regions {
        if protocol != "tls" {
            continue;
        }
        coverage(ctx, name, servers, &info, &cert_file);
        if let Some(ca) = ca {
            if let Err(why) = tls::signed_by(&cert, ca, SystemTime::now()) {
                ctx.add(
                    "tls",
                    Severity::Error,
                    format!("region {name:?} NATS_TLS_CA"),
                    "the CA agents of this region are given did not sign the NATS certificate: their TLS handshake fails",
                )
                .evidence(format!("{}: {why}", cert_file.display()))
                .fix("bkbundle install BUNDLE --target TARGET   (writes the site CA into the regions' env)");
            }
        }
    }
    if let (Some(store), Ok(site_ca)) = (store, std::fs::read_to_string(&ca_file)) {
        packages_ca(ctx, store, &site_ca, &ca_file).await;
    }
}

fn expiry(ctx: &mut Ctx<'_>, file: &std::path::Path, info: &tls::CertInfo) {
    let now = SystemTime::now();
    let soon = now.checked_add(Duration::from_secs(RENEW_DAYS * 86_400));
    let end = tls::date(info.not_after);
    let (severity, message) = if info.not_after <= now {
        (
            Severity::Error,
            format!("the NATS certificate expired on {end}: agents refuse the server"),
        )
    } else if soon.is_none_or(|s| info.not_after <= s) {
        (
            Severity::Warning,
            format!("the NATS certificate expires on {end}, within {RENEW_DAYS} days"),
        )
    } else {
        return;
    };
    ctx.add("tls", severity, file.display().to_string(), message)
        .evidence(format!("not after {end}"))
        .fix("bkbundle install BUNDLE --target TARGET   (issues it again from the same site CA; agents keep working)");
}

fn coverage(ctx: &mut Ctx<'_>, region: &str, servers: &str, info: &tls::CertInfo, file: &std::path::Path) {
    let wanted: Vec<Name> = servers.split(',').filter_map(|s| Name::parse(s.trim()).ok()).collect();
    for n in tls::uncovered(info, &wanted) {
        let names: Vec<String> = info.names.iter().map(|n| n.to_string()).collect();
        ctx.add(
            "tls",
            Severity::Error,
            format!("region {region:?} NATS_SERVERS"),
            format!("agents of this region connect to {n}, which the NATS certificate does not cover: their TLS handshake fails"),
        )
        .evidence(format!("{} names {}", file.display(), names.join(", ")))
        .fix(format!("add \"{n}\" to [tls] names in the install config (or set it as the region's proxy_address), then re-run bkbundle install (the certificate is issued again)"));
    }
}

/// Controller packages whose meta says they carry another CA than the site's.
async fn packages_ca(ctx: &mut Ctx<'_>, store: &dyn ObjectStore, site_ca: &str, ca_file: &std::path::Path) {
    let want = crate::digest::sha256_hex(site_ca.as_bytes());
    let Ok(names) = store.list().await else { return };
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    for key in names.iter().filter(|k| k.contains("/Controller/")) {
        let Ok(Some(meta)) = store.meta(key).await else {
            continue;
        };
        if let Some(ca) = meta
            .get("metadata")
            .and_then(|m| m.get(inject::CA_KEY))
            .and_then(|v| v.as_str())
        {
            found.insert(key.clone(), ca.to_string());
        }
    }
    let bundle = ctx.bundle_arg();
    for (key, ca) in found.into_iter().filter(|(_, ca)| *ca != want) {
        ctx.add(
            "tls",
            Severity::Error,
            format!("object {key}"),
            "this controller package carries another CA than the site's: agents installed from it refuse the NATS server",
        )
        .evidence(format!("its certs/ca.crt has SHA-256 {ca}; {} has {want}", ca_file.display()))
        .fix(format!("bkbundle init-packages --auto --bundle {bundle}   (uploads it again with the site CA)"));
    }
}

/// The stack's NATS port answering in plain text (its INFO does not require TLS).
async fn plain_text(ctx: &mut Ctx<'_>) {
    let Some(port) = ctx.opts.site.get("NATS_PORT").and_then(|p| p.parse::<u16>().ok()) else {
        return;
    };
    let host = crate::site::targets::stack_host(&ctx.opts.site).to_string();
    let Ok(Some(info)) = nats_info(&host, port).await else {
        return;
    };
    if !info.contains("\"tls_required\":true") {
        ctx.add(
            "tls",
            Severity::Error,
            format!("NATS {host}:{port}"),
            "the regions' env says NATS_PROTOCOL = tls but NATS answers in plain text: every agent's TLS handshake fails",
        )
        .evidence(info.chars().take(200).collect::<String>())
        .fix("mount the target's certs/ into the NATS service and restart it (bkbundle install BUNDLE --target TARGET does both for a bundle whose stack serves TLS)");
    }
}

/// The first line a NATS server sends (`INFO {...}`), bounded by [`PROBE`].
async fn nats_info(host: &str, port: u16) -> Result<Option<String>, String> {
    use tokio::io::AsyncBufReadExt;
    let connect = tokio::net::TcpStream::connect((host, port));
    let stream = tokio::time::timeout(PROBE, connect)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    let mut r = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(stream, 64 << 10));
    tokio::time::timeout(PROBE, r.read_line(&mut line))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(line.starts_with("INFO").then_some(line))
}
