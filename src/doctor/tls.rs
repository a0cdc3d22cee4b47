//! The TLS check (issue 12), where the regions' env says `NATS_PROTOCOL = tls`: the NATS server
//! certificate install wrote (the target's `certs/`) expiring or expired, not covering an address
//! a region's agents connect to, not signed by the CA a region's `NATS_TLS_CA` row or a
//! controller package carries; and a NATS that answers in plain text although agents are told
//! `tls` (they then fail their handshake).

use super::{Ctx, Severity, PROBE};
use crate::packages::inject;
use crate::platform::regions::Current;
use crate::ports::ObjectStore;
use crate::tls::{self, store, Name};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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

/// The target's CA and NATS certificate files: the CA bkbundle verifies NATS with is the
/// target's `certs/ca.crt` ([`store::CA_CERT`]), the certificate beside it ([`store::SERVER_CERT`]).
fn target_certs(ctx: &Ctx<'_>) -> Option<(PathBuf, PathBuf)> {
    let ca = PathBuf::from(ctx.opts.site.get(crate::install::tls::CA_FILE_VALUE)?);
    let target = ca.ancestors().nth(Path::new(store::CA_CERT).components().count())?;
    Some((ca.clone(), target.join(store::SERVER_CERT)))
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
    // An expired certificate is reported once, above: the CA rows are judged by whether they
    // signed it, checked inside its validity (else every region would be blamed for the expiry).
    let now = SystemTime::now();
    let at = if info.not_after <= now { info.not_before } else { now };
    for (name, protocol, servers, ca) in &regions {
        if protocol != "tls" {
            continue;
        }
        coverage(ctx, name, servers, &info, &cert_file);
        if let Some(ca) = ca {
            if let Err(why) = tls::signed_by(&cert, ca, at) {
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

#[cfg(test)]
mod tests {
    use super::super::testing::{answering, diagnose, no_finding, opts, the};
    use super::super::{DoctorOptions, DoctorReport, Severity};
    use crate::platform::release::Release;
    use crate::ports::fakes::{FakeDb, FakeDocker, FakeStore};
    use crate::tls::{generate_ca, issue_server, Material, Name, Policy, SiteCa, CA_CN};
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    const DAY: Duration = Duration::from_secs(86_400);

    /// A site CA and a server certificate for `names`, issued `age` ago for `days`.
    fn site(names: &[&str], age: Duration, days: u32) -> (SiteCa, Material) {
        let then = SystemTime::now() - age;
        let ca = generate_ca(CA_CN, then).unwrap();
        let names: Vec<Name> = names.iter().map(|n| Name::parse(n).unwrap()).collect();
        let policy = Policy {
            validity_days: days,
            ..Policy::default()
        };
        let m = issue_server(&ca, &names, &policy, then).unwrap();
        (ca, m)
    }

    /// A target laid out as install leaves it (`certs/ca.crt`, `certs/nats-server.crt`), and
    /// doctor's options pointing at it.
    fn target(dir: &Path, m: &Material) -> DoctorOptions {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(certs.join("ca.crt"), &m.ca_pem).unwrap();
        std::fs::write(certs.join("nats-server.crt"), &m.cert_pem).unwrap();
        let mut o = opts();
        o.site.insert(
            crate::install::tls::CA_FILE_VALUE.into(),
            certs.join("ca.crt").display().to_string(),
        );
        o
    }

    /// Regions `default` (1) and `east` (2) told `tls`, connecting to `servers`, given `ca`.
    fn tls_db(url: &str, servers: [&str; 2], ca: [&str; 2]) -> FakeDb {
        let rows = |i: usize| {
            [
                ("NODE_SERVER_URL", url),
                ("NATS_SERVERS", servers[i]),
                ("NATS_PROTOCOL", "tls"),
                ("NATS_TLS_CA", ca[i]),
            ]
        };
        FakeDb::new(Release::newest_known())
            .with_region(1, "default", &rows(0))
            .with_region(2, "east", &rows(1))
    }

    async fn run(o: &DoctorOptions, db: &FakeDb, store: &FakeStore) -> DoctorReport {
        diagnose(o, &FakeDocker::default(), Some(db), Some(store), None).await
    }

    fn tls_findings(r: &DoctorReport) -> Vec<&super::super::Finding> {
        r.findings.iter().filter(|f| f.check == "tls").collect()
    }

    /// A NATS stand-in on a free loopback port: every connection gets `info` as its first line.
    async fn nats_info_server(info: &'static str) -> u16 {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(info.as_bytes()).await;
                let _ = s.flush().await;
            }
        });
        port
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clean_tls_site_has_no_tls_finding() {
        let dir = tempfile::tempdir().unwrap();
        let (_, m) = site(&["10.0.0.5", "nats", "127.0.0.1"], Duration::ZERO, 825);
        let mut o = target(dir.path(), &m);
        let port = nats_info_server("INFO {\"server_id\":\"x\",\"tls_required\":true}\r\n").await;
        o.site.insert("NATS_PORT".into(), port.to_string());
        let (_server, url) = answering();
        let db = tls_db(&url, ["10.0.0.5:4222", "nats:4222"], [&m.ca_pem, &m.ca_pem]);
        let r = run(&o, &db, &FakeStore::new("bklite")).await;
        assert!(tls_findings(&r).is_empty(), "{:#?}", tls_findings(&r));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_the_certificate_does_not_cover_is_an_error_naming_host_and_region() {
        let dir = tempfile::tempdir().unwrap();
        let (_, m) = site(&["10.0.0.5", "nats"], Duration::ZERO, 825);
        let o = target(dir.path(), &m);
        let (_server, url) = answering();
        let db = tls_db(
            &url,
            ["10.0.0.5:4222", "tls://10.0.0.9:4222,nats:4222"],
            [&m.ca_pem, &m.ca_pem],
        );
        let r = run(&o, &db, &FakeStore::new("bklite")).await;
        let f = the(&r, "tls", Severity::Error, "region \"east\" NATS_SERVERS");
        assert!(f.message.contains("connect to 10.0.0.9"), "{f:#?}");
        assert!(f.evidence[0].ends_with("names 10.0.0.5, nats"), "{f:#?}");
        assert!(f.fix.as_deref().unwrap().contains("\"10.0.0.9\""), "{f:#?}");
        no_finding(&r, "tls", "region \"default\"");
        assert_eq!(tls_findings(&r).len(), 1, "{:#?}", tls_findings(&r));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_region_given_another_ca_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_, m) = site(&["10.0.0.5"], Duration::ZERO, 825);
        let other = generate_ca("Other CA", SystemTime::now()).unwrap();
        let o = target(dir.path(), &m);
        let (_server, url) = answering();
        let db = tls_db(&url, ["10.0.0.5", "10.0.0.5"], [&m.ca_pem, &other.cert_pem]);
        let r = run(&o, &db, &FakeStore::new("bklite")).await;
        let f = the(&r, "tls", Severity::Error, "region \"east\" NATS_TLS_CA");
        assert!(f.message.contains("did not sign the NATS certificate"), "{f:#?}");
        assert!(f.evidence[0].contains("nats-server.crt"), "{f:#?}");
        no_finding(&r, "tls", "region \"default\"");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_certificate_is_an_error_and_one_ending_soon_a_warning() {
        let (_server, url) = answering();
        let dir = tempfile::tempdir().unwrap();
        let (_, old) = site(&["10.0.0.5"], 100 * DAY, 30);
        let o = target(dir.path(), &old);
        let db = tls_db(&url, ["10.0.0.5", "10.0.0.5"], [&old.ca_pem, &old.ca_pem]);
        let r = run(&o, &db, &FakeStore::new("bklite")).await;
        let f = the(&r, "tls", Severity::Error, "nats-server.crt");
        assert!(f.message.contains("expired on"), "{f:#?}");
        // Expired is the one problem: the regions' CA did sign it.
        assert_eq!(tls_findings(&r).len(), 1, "{:#?}", tls_findings(&r));

        let dir = tempfile::tempdir().unwrap();
        let (_, soon) = site(&["10.0.0.5"], Duration::ZERO, 10);
        let o = target(dir.path(), &soon);
        let db = tls_db(&url, ["10.0.0.5", "10.0.0.5"], [&soon.ca_pem, &soon.ca_pem]);
        let r = run(&o, &db, &FakeStore::new("bklite")).await;
        let f = the(&r, "tls", Severity::Warning, "nats-server.crt");
        assert!(f.message.contains("within 30 days"), "{f:#?}");
        assert_eq!(tls_findings(&r).len(), 1, "{:#?}", tls_findings(&r));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_controller_package_carrying_another_ca_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_, m) = site(&["10.0.0.5"], Duration::ZERO, 825);
        let o = target(dir.path(), &m);
        let (_server, url) = answering();
        let db = tls_db(&url, ["10.0.0.5", "10.0.0.5"], [&m.ca_pem, &m.ca_pem]);
        let (good, bad) = (
            "linux/x86_64/Controller/1.0.0/fusion-collectors-linux-amd64.zip",
            "windows/x86_64/Controller/1.0.0/fusion-collectors-windows-amd64.zip",
        );
        let store = FakeStore::new("bklite")
            .with_object(good, b"zip")
            .with_object(bad, b"zip");
        for (key, ca) in [(good, m.ca_pem.as_str()), (bad, "another CA")] {
            let mut objects = store.objects.lock().unwrap();
            let meta = &mut objects.get_mut(key).unwrap().1;
            meta["metadata"] = serde_json::json!({ super::inject::CA_KEY: crate::digest::sha256_hex(ca.as_bytes()) });
        }
        let r = run(&o, &db, &store).await;
        let f = the(&r, "tls", Severity::Error, &format!("object {bad}"));
        assert!(f.message.contains("another CA than the site's"), "{f:#?}");
        assert!(
            f.evidence[0].contains(&crate::digest::sha256_hex(m.ca_pem.as_bytes())),
            "{f:#?}"
        );
        no_finding(&r, "tls", good);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_answering_in_plain_text_where_regions_say_tls_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_, m) = site(&["10.0.0.5", "127.0.0.1"], Duration::ZERO, 825);
        let mut o = target(dir.path(), &m);
        let port = nats_info_server("INFO {\"server_id\":\"x\",\"tls_required\":false}\r\n").await;
        o.site.insert("NATS_PORT".into(), port.to_string());
        let (_server, url) = answering();
        let db = tls_db(&url, ["10.0.0.5", "10.0.0.5"], [&m.ca_pem, &m.ca_pem]);
        let r = run(&o, &db, &FakeStore::new("bklite")).await;
        let f = the(&r, "tls", Severity::Error, &format!("NATS 127.0.0.1:{port}"));
        assert!(f.message.contains("answers in plain text"), "{f:#?}");
        assert!(f.evidence[0].contains("\"tls_required\":false"), "{f:#?}");
        assert_eq!(tls_findings(&r).len(), 1, "{:#?}", tls_findings(&r));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn regions_told_plain_nats_are_not_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (_, old) = site(&["10.0.0.5"], 100 * DAY, 30);
        let o = target(dir.path(), &old);
        let (_server, url) = answering();
        let db = super::super::testing::healthy_db(&url);
        let r = run(&o, &db, &FakeStore::new("bklite")).await;
        assert!(tls_findings(&r).is_empty(), "{:#?}", tls_findings(&r));
    }
}
