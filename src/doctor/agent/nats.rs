//! The NATS chain (check `agent-nats`): NATS reached as this agent's collectors reach it (the
//! servers, credentials and TLS CA of their generated config), through the project's own staged
//! connect ([`crate::platform::nats::connect_bounded`]: name resolution → TCP → TLS →
//! authentication, one try each, bounded), then JetStream, which the agent's package downloads
//! need. The stages are the platform-side doctor's ([`NatsError::stage`]); the fixes are those of
//! an agent host.
//!
//! Where TLS fails, the NATS server's certificate is fetched once more (its INFO line read, then
//! a handshake that records what webpki says of the certificate against the agent's CA) so the
//! finding shows who signed it and the CA the agent holds, and whether the CA or the name is
//! wrong.
//!
//! The password is never shown: every finding is scrubbed of it before it is added.

use super::dns::{self, Sources};
use super::net;
use super::{AgentConfig, AgentNats, STEP};
use crate::doctor::{Finding, Severity};
use crate::platform::nats::{self as pnats, NatsError, NatsTarget};
use rustls::CertificateError;
use std::path::Path;
use tokio::io::AsyncReadExt as _;

const CHECK: &str = "agent-nats";
/// The most of NATS' INFO line read.
const INFO_LIMIT: usize = 16 * 1024;
/// How the platform host sets a region's values.
const REGIONS_APPLY: &str = "bkbundle regions apply --bundle BUNDLE --config install.toml --env-file TARGET/.env";

/// Reach NATS as the agent does; see the module documentation.
pub(super) async fn chain(_cfg: &AgentConfig, n: &AgentNats, out: &mut Vec<Finding>) {
    chain_with(&Sources::system(), n, out).await
}

/// [`chain`] with the resolver's files of `dns` (a test's own in tests).
async fn chain_with(dns: &Sources, n: &AgentNats, out: &mut Vec<Finding>) {
    let mut found = Vec::new();
    run(dns, n, &mut found).await;
    for mut f in found {
        if let Some(p) = n.password.as_deref() {
            scrub(&mut f, p);
        }
        out.push(f);
    }
}

/// The target the agent's config describes: its URLs (`tls://` where it asks for TLS, as its
/// client then requires TLS whatever the scheme), its user and password, its CA.
fn target(n: &AgentNats) -> NatsTarget {
    let urls = n
        .urls
        .iter()
        .map(|u| match u.split_once("://") {
            Some((_, rest)) if n.tls => format!("tls://{rest}"),
            Some(_) => u.clone(),
            None if n.tls => format!("tls://{u}"),
            None => format!("nats://{u}"),
        })
        .collect();
    NatsTarget {
        urls,
        source: n.source.display().to_string(),
        user: n.user.clone(),
        password: n.password.clone(),
        token: None,
        credentials: None,
        ca_file: n.ca_file.clone(),
        cert_file: None,
        key_file: None,
    }
}

async fn run(dns: &Sources, n: &AgentNats, out: &mut Vec<Finding>) {
    let t = target(n);
    let display = t.display();
    if t.urls.is_empty() {
        let mut f = Finding::new(
            CHECK,
            Severity::Error,
            format!("NATS (from {})", n.source.display()),
            "the agent's config names no NATS server",
        );
        f.fix(format!(
            "the region's NATS_SERVERS gives it (on the platform host: `bkbundle doctor`, then {REGIONS_APPLY}); the sidecar then regenerates {}",
            n.source.display()
        ));
        out.push(f);
        return;
    }
    let nc = match pnats::connect_bounded(&t, STEP).await {
        Ok(c) => c,
        Err(e) => {
            let f = broken(dns, n, &t, &e).await;
            out.push(f);
            return;
        }
    };
    let js = match tokio::time::timeout(STEP, pnats::jetstream_answers(&nc, &t)).await {
        Ok(r) => r,
        Err(_) => Err(NatsError::NoJetStream {
            nats: display.clone(),
            message: format!("no answer within {} ms", STEP.as_millis()),
        }),
    };
    if let Err(e) = js {
        out.push(broken(dns, n, &t, &e).await);
    }
}

/// The finding of the stage `e` broke.
async fn broken(dns: &Sources, n: &AgentNats, t: &NatsTarget, e: &NatsError) -> Finding {
    let stage = e.stage();
    let source = n.source.display();
    let (host, port) = first_host_port(t);
    let mut f = Finding::new(
        CHECK,
        Severity::Error,
        format!("NATS {} ({stage})", t.display()),
        e.to_string(),
    );
    f.evidence(format!("from {source}"));
    if let Some(ca) = &n.ca_file {
        let what = match std::fs::read_to_string(ca) {
            Ok(pem) => net::ca_summary(&pem),
            Err(e) => format!("cannot be read ({e})"),
        };
        f.evidence(format!("CA file {}: {what}", ca.display()));
    }
    let apply = format!(
        "on the platform host `bkbundle doctor` checks the region's env and `{REGIONS_APPLY}` sets it; the sidecar then regenerates {source}"
    );
    let fix = match e {
        NatsError::Resolve { .. } => {
            for line in dns::evidence(dns, &host).await {
                f.evidence(line);
            }
            format!(
                "on this agent host add a line `IP {host}` to /etc/hosts (IP: the platform host's address), or a DNS record for {host}; or make the region's NATS_SERVERS an address agents reach: {apply}"
            )
        }
        NatsError::Connect { .. } => format!(
            "open TCP port {port} from this agent host to {host}: the platform host's firewall (`firewall-cmd --permanent --add-port={port}/tcp && firewall-cmd --reload`) and any in between; NATS must be published on the address of the region's NATS_SERVERS: {apply}"
        ),
        NatsError::Tls { .. } => tls_fix(n, t, &host, port, &mut f).await,
        NatsError::Auth { .. } => format!(
            "the user {} and its password in {source} (written from the region's NATS_ADMIN_USERNAME and NATS_ADMIN_PASSWORD) are refused; {apply}",
            n.user.as_deref().map(|u| format!("{u:?}")).unwrap_or_else(|| "(none)".into())
        ),
        NatsError::NoJetStream { .. } => {
            "NATS answers, but JetStream does not for this account (the agent downloads its packages from it): on the platform host, `bkbundle doctor` checks NATS and its JetStream".to_string()
        }
        NatsError::NoNats | NatsError::BadConfig(_) | NatsError::Bucket { .. } => {
            format!("check the NATS settings in {source}; they come from the region's NATS_* values: {apply}")
        }
    };
    f.fix(fix);
    f
}

fn first_host_port(t: &NatsTarget) -> (String, u16) {
    pnats::host_port(t.urls.first().map(String::as_str).unwrap_or_default())
}

/// The TLS stage's fix, after a look at the NATS server's certificate (its evidence added).
async fn tls_fix(n: &AgentNats, t: &NatsTarget, host: &str, port: u16, f: &mut Finding) -> String {
    let ca = n
        .ca_file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the agent's CA file".into());
    let wrong_ca = format!(
        "the CA at {ca} did not sign the NATS server's certificate: copy the site's CA from the platform host's TARGET/certs/ca.crt to {ca}, or reinstall the agent from the current controller package"
    );
    let Some(verdict) = nats_certificate(host, port, n.ca_file.as_deref(), f).await else {
        return wrong_ca;
    };
    match &verdict.error {
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => format!(
            "the NATS server's certificate does not name {host}, the address in {}: on the platform host `bkbundle install` issues it for every address agents use (give {host} among them), or make the region's NATS_SERVERS an address it names ({REGIONS_APPLY})",
            t.source
        ),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        )) => "the NATS server's certificate is not valid at this host's time: renew it on the platform host (`bkbundle install` reissues it), or set this host's clock if it is wrong (see the server clock finding)".to_string(),
        _ => wrong_ca,
    }
}

/// The NATS server's certificate as the agent's CA judges it, added to `f`'s evidence: NATS
/// sends its INFO line in the clear, then TLS is started. `None` when it could not be had.
async fn nats_certificate(host: &str, port: u16, ca_file: Option<&Path>, f: &mut Finding) -> Option<net::Verdict> {
    let get = async {
        let addrs = crate::portable::lookup_within(host, port, STEP)
            .await
            .map_err(|e| e.to_string())?;
        let addr = addrs.first().ok_or("no address")?;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut info = Vec::new();
        let mut b = [0u8; 1024];
        while !info.contains(&b'\n') && info.len() < INFO_LIMIT {
            let n = tcp.read(&mut b).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the server closed the connection before INFO".to_string());
            }
            info.extend_from_slice(&b[..n]);
        }
        if !info.starts_with(b"INFO ") {
            return Err("the server did not start with INFO".to_string());
        }
        let (roots, _) = net::trust(ca_file, &[]);
        net::handshake(tcp, host, roots).await.map(|(_, v)| v)
    };
    match tokio::time::timeout(STEP, get).await {
        Ok(Ok(v)) => {
            f.evidence(format!("the NATS server's certificate: {}", v.presented()));
            f.evidence(match &v.error {
                None => "against the agent's CA: verified (the failure is elsewhere: see the error)".to_string(),
                Some(e) => format!("against the agent's CA: {}", net::distrust(e, host, ca_file).0),
            });
            Some(v)
        }
        Ok(Err(why)) => {
            f.evidence(format!("the NATS server's certificate could not be read: {why}"));
            None
        }
        Err(_) => {
            f.evidence(format!(
                "the NATS server's certificate could not be read within {} ms",
                STEP.as_millis()
            ));
            None
        }
    }
}

/// The password out of everything a finding says.
fn scrub(f: &mut Finding, password: &str) {
    if password.is_empty() {
        return;
    }
    let hide = |s: &mut String| {
        if s.contains(password) {
            *s = s.replace(password, "<password>");
        }
    };
    hide(&mut f.subject);
    hide(&mut f.message);
    f.evidence.iter_mut().for_each(hide);
    if let Some(fix) = f.fix.as_mut() {
        hide(fix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    fn agent_nats(urls: &[String], tls: bool, ca_file: Option<PathBuf>) -> AgentNats {
        AgentNats {
            source: PathBuf::from("/opt/fusion-collectors/etc/nats-executor.yml"),
            urls: urls.to_vec(),
            user: Some("admin".into()),
            password: Some("s3cret-Pa55".into()),
            tls,
            ca_file,
        }
    }

    #[test]
    fn the_target_requires_tls_where_the_agent_does() {
        let n = agent_nats(&["nats://10.0.0.5:4222".into(), "10.0.0.6:4222".into()], true, None);
        let t = target(&n);
        assert_eq!(t.urls, ["tls://10.0.0.5:4222", "tls://10.0.0.6:4222"]);
        assert_eq!(t.user.as_deref(), Some("admin"));
        assert_eq!(t.display(), "tls://10.0.0.5:4222,tls://10.0.0.6:4222");
        let n = agent_nats(&["10.0.0.5:4222".into()], false, None);
        assert_eq!(target(&n).urls, ["nats://10.0.0.5:4222"]);
        assert_eq!(first_host_port(&target(&n)), ("10.0.0.5".to_string(), 4222));
        let n = agent_nats(&["tls://[fd00::5]".into()], true, None);
        assert_eq!(first_host_port(&target(&n)), ("fd00::5".to_string(), 4222));
    }

    #[tokio::test]
    async fn a_closed_port_is_the_tcp_stage_at_once() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let n = agent_nats(&[format!("nats://127.0.0.1:{port}")], false, None);
        let t0 = Instant::now();
        let mut out = Vec::new();
        chain(&AgentConfig::default(), &n, &mut out).await;
        let took = t0.elapsed();
        assert_eq!(out.len(), 1, "{out:#?}");
        let f = &out[0];
        assert_eq!((f.check, f.severity), ("agent-nats", Severity::Error));
        assert_eq!(f.subject, format!("NATS nats://127.0.0.1:{port} (TCP)"));
        assert!(f.message.contains("refused"), "{f:#?}");
        assert_eq!(f.evidence[0], "from /opt/fusion-collectors/etc/nats-executor.yml");
        assert!(
            f.fix.as_deref().unwrap().contains(&format!("--add-port={port}/tcp")),
            "{f:#?}"
        );
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    #[tokio::test]
    async fn a_tls_server_signed_by_another_ca_shows_both_certificates() {
        // A NATS stand-in: INFO in the clear, then TLS with a certificate of its own CA.
        let now = std::time::SystemTime::now();
        let server_ca = crate::tls::generate_ca("NATS CA", now).unwrap();
        let m = crate::tls::issue_server(
            &server_ca,
            &[crate::tls::Name::parse("127.0.0.1").unwrap()],
            &crate::tls::Policy::default(),
            now,
        )
        .unwrap();
        let agent_ca = crate::tls::generate_ca(crate::tls::CA_CN, now).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_path = dir.path().join("ca.crt");
        std::fs::write(&ca_path, &agent_ca.cert_pem).unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![rustls::pki_types::pem::PemObject::from_pem_slice(m.cert_pem.as_bytes()).unwrap()],
                    rustls::pki_types::pem::PemObject::from_pem_slice(m.key_pem.as_bytes()).unwrap(),
                )
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let info = format!("INFO {{\"server_id\":\"t\",\"version\":\"2.10.0\",\"proto\":1,\"host\":\"127.0.0.1\",\"port\":{port},\"max_payload\":1048576,\"tls_required\":true}}\r\n");
                    let _ = s.write_all(info.as_bytes()).await;
                    let _ = acceptor.accept(s).await;
                });
            }
        });
        let n = agent_nats(&[format!("tls://127.0.0.1:{port}")], true, Some(ca_path.clone()));
        let mut out = Vec::new();
        let t0 = Instant::now();
        chain(&AgentConfig::default(), &n, &mut out).await;
        let took = t0.elapsed();
        assert_eq!(out.len(), 1, "{out:#?}");
        let f = &out[0];
        assert_eq!(f.subject, format!("NATS tls://127.0.0.1:{port} (TLS)"), "{f:#?}");
        assert!(
            f.evidence
                .iter()
                .any(|e| e.starts_with(&format!("CA file {}: CN=BK-Lite site CA", ca_path.display()))),
            "{f:#?}"
        );
        assert!(
            f.evidence
                .iter()
                .any(|e| e.starts_with("the NATS server's certificate: CN=127.0.0.1, issued by CN=NATS CA")),
            "{f:#?}"
        );
        assert!(
            f.fix
                .as_deref()
                .unwrap()
                .contains("did not sign the NATS server's certificate"),
            "{f:#?}"
        );
        assert!(
            f.evidence.iter().any(|e| e
                == "against the agent's CA: unknown issuer: no CA this host trusts signed the server's certificate"),
            "{f:#?}"
        );
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test]
    async fn an_unresolvable_nats_host_shows_what_the_host_knows() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::write(dir.path().join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        let src = Sources {
            hosts: dir.path().join("hosts"),
            resolv_conf: dir.path().join("resolv.conf"),
            dns_port: dns::fake::nameserver("known.invalid").await,
        };
        let n = agent_nats(&["nats://bklite-nats.invalid:4222".into()], false, None);
        let mut out = Vec::new();
        let t0 = Instant::now();
        chain_with(&src, &n, &mut out).await;
        assert!(t0.elapsed() < STEP + Duration::from_secs(1), "{:?}", t0.elapsed());
        assert_eq!(out.len(), 1, "{out:#?}");
        let f = &out[0];
        assert_eq!(f.subject, "NATS nats://bklite-nats.invalid:4222 (name resolution)");
        assert_eq!(
            f.evidence[1..],
            [
                format!("{}/hosts: no entry for bklite-nats.invalid", dir.path().display()),
                format!("{}/resolv.conf: nameserver 127.0.0.1", dir.path().display()),
                "nameserver 127.0.0.1: bklite-nats.invalid → NXDOMAIN (no such name)".to_string(),
            ]
        );
        assert!(f
            .fix
            .as_deref()
            .unwrap()
            .contains("`IP bklite-nats.invalid` to /etc/hosts"));
    }

    #[test]
    fn the_password_is_never_in_a_finding() {
        let mut f = Finding::new(CHECK, Severity::Error, "NATS x", "auth for admin:s3cret-Pa55 failed");
        f.evidence("url tls://admin:s3cret-Pa55@h:4222").fix("s3cret-Pa55");
        scrub(&mut f, "s3cret-Pa55");
        let all = format!("{f:?}");
        assert!(!all.contains("s3cret-Pa55"), "{all}");
        assert_eq!(f.message, "auth for admin:<password> failed");
    }
}
