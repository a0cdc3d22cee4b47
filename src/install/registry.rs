//! `install --images-from REGISTRY`: the engine pulls the bundle's images from a registry in the
//! intranet (where `push` put them) instead of loading them from the bundle's layers, which a
//! bundle packed with `--no-images` does not carry.
//!
//! Preflight (nothing changes): every image to pull is in the registry with the manifest's id
//! ([`crate::registry::client::check_images`]); the engine can reach the registry the way it is
//! given (its CA in `/etc/docker/certs.d/HOST/ca.crt`, or plain HTTP allowed by the engine's
//! `insecure-registries`). The images step then writes that CA file when it is missing, pulls each
//! image by its placed reference, checks the pulled id against the manifest, tags it with the
//! bundle's references (what the stack uses) and removes the registry's name again, so that the
//! engine ends as a load from the bundle leaves it.

use super::{ImageAction, PlannedImage};
use crate::engine::Engine;
use crate::error::{Error, Kind, Result};
use crate::manifest::Manifest;
use crate::progress::Reporter;
use crate::registry::client::{self, Presence, Wanted};
use crate::registry::{Access, Settings, Target};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Images the engine is asked to pull at once.
const PULLS_AT_ONCE: usize = 4;

/// Where the Docker engine looks for a registry's CA: `CERTS_D/HOST[:PORT]/ca.crt`.
pub const CERTS_D: &str = "/etc/docker/certs.d";

/// The registry images are pulled from, and how to reach it.
#[derive(Debug, Clone)]
pub struct Source {
    pub target: Target,
    pub access: Access,
}

impl Source {
    /// `--images-from` (else the config's `[registry] url`), reached with the command line's
    /// access over the config's. `None` when neither names a registry.
    pub fn resolve(images_from: Option<&str>, access: &Access, settings: &Settings) -> Result<Option<Source>> {
        let Some(text) = images_from.or(settings.url.as_deref()) else {
            return Ok(None);
        };
        let target = Target::parse(text)?;
        Ok(Some(Source {
            target,
            access: access.clone().merged_with(settings),
        }))
    }

    /// The engine's CA file for this registry.
    pub fn certs_file(&self, certs_d: &Path) -> PathBuf {
        certs_d.join(&self.target.host).join("ca.crt")
    }
}

/// Images to load become images to pull from `source`, each at its first reference's place
/// there; a reference the registry cannot hold is a finding.
pub(super) fn mark_pulls(images: &mut [PlannedImage], source: &Source, findings: &mut Vec<String>) {
    for i in images.iter_mut().filter(|i| i.action == ImageAction::Load) {
        let Some(first) = i.refs.first() else { continue };
        match source.target.place(first) {
            Ok(p) => {
                i.action = ImageAction::Pull;
                i.from = Some(p.reference);
            }
            Err(e) => findings.push(e.message),
        }
    }
}

/// What preflight found out about the registry: the CA file the images step writes, and the kind
/// of error when the registry could not be asked (an external system's failure, exit 6).
#[derive(Debug, Default)]
pub(super) struct Checked {
    pub write_ca: Option<(PathBuf, Vec<u8>)>,
    pub error: Option<Kind>,
}

/// Preflight of the images' source. Without a registry: a bundle without layers needs every image
/// in the engine already. With one: the engine can reach it, and it holds every image to pull with
/// the manifest's id.
pub(super) async fn preflight(
    engine: &Engine,
    manifest: &Manifest,
    source: Option<&Source>,
    images: &[PlannedImage],
    findings: &mut Vec<String>,
    hints: &mut Vec<String>,
) -> Checked {
    let mut checked = Checked::default();
    let Some(source) = source else {
        let missing: Vec<String> = images
            .iter()
            .filter(|i| i.action == ImageAction::Load)
            .map(|i| format!("{} ({})", i.refs.join(", "), i.id))
            .collect();
        if manifest.bundle.without_layers && !missing.is_empty() {
            findings.push(format!(
                "the bundle carries no image layers: give --images-from REGISTRY (not in this Docker engine: {})",
                missing.join("; ")
            ));
            hints.push(
                "push the full bundle into the intranet registry (`bkbundle push FULL.bkb --registry HOST[:PORT][/PREFIX]`), then install with --images-from HOST[:PORT][/PREFIX] (or [registry] url in the install config); or install the full bundle"
                    .into(),
            );
        }
        return checked;
    };
    let registry = source.target.to_string();
    if source.access.insecure {
        if !is_loopback(&source.target.host) {
            match engine.registry_config().await {
                Ok(rc) if engine_allows_http(&rc, &source.target.host) => {}
                Ok(_) => {
                    findings.push(format!(
                        "registry {registry}: --registry-insecure (plain HTTP), but the Docker engine does not allow plain HTTP to {} (not in \"insecure-registries\" of /etc/docker/daemon.json)",
                        source.target.host
                    ));
                    hints.push(format!(
                        "add \"{}\" to \"insecure-registries\" in /etc/docker/daemon.json and restart the Docker engine; or serve the registry over TLS and give --registry-ca FILE",
                        source.target.host
                    ));
                }
                Err(e) => findings.push(e.message),
            }
        }
    } else if let Some(ca) = &source.access.ca_file {
        match ca_file_plan(ca, &source.certs_file(Path::new(CERTS_D))) {
            Ok(write) => checked.write_ca = write,
            Err((finding, hint)) => {
                findings.push(finding);
                hints.push(hint);
            }
        }
    }
    let wanted: Vec<(usize, Wanted)> = images
        .iter()
        .enumerate()
        .filter(|(_, i)| i.action == ImageAction::Pull)
        .filter_map(|(n, i)| {
            let placement = source.target.place(i.refs.first()?).ok()?;
            Some((
                n,
                Wanted {
                    placement,
                    image_id: i.id.clone(),
                },
            ))
        })
        .collect();
    if wanted.is_empty() {
        return checked;
    }
    let list: Vec<Wanted> = wanted.iter().map(|(_, w)| w.clone()).collect();
    let found = match client::Client::new(&source.target.host, &source.access) {
        Ok(c) => client::check_images(&c, &source.target, &list).await,
        Err(e) => Err(e),
    };
    match found {
        Ok(presences) => {
            let mut absent = false;
            for ((n, w), presence) in wanted.iter().zip(presences) {
                let name = images[*n].refs.join(", ");
                absent |= !matches!(presence, Presence::Present { .. });
                match presence {
                    Presence::Present { .. } => {}
                    Presence::Missing => findings.push(format!(
                        "image {name}: registry {registry} has no {} (expected image {})",
                        w.placement.reference, w.image_id
                    )),
                    Presence::Other { config_digest } => findings.push(format!(
                        "image {name}: registry {registry} has {} as image {config_digest}, the bundle's is {}",
                        w.placement.reference, w.image_id
                    )),
                }
            }
            if absent {
                hints.push(format!(
                    "push the bundle's images there first: `bkbundle push FULL.bkb --registry {registry}` (with the bundle this one was packed from)"
                ));
            }
        }
        Err(e) => {
            findings.push(format!("registry {registry}: {}", e.message));
            hints.extend(e.hints);
            if e.kind == Kind::External {
                checked.error = Some(Kind::External);
            }
        }
    }
    checked
}

/// A CA file for the engine to write: where, and its bytes.
type CaWrite = (PathBuf, Vec<u8>);

/// The engine's CA file for the registry against `--registry-ca`: `Ok(Some)` to write it (it is
/// missing), `Ok(None)` when it holds that CA already, `Err((finding, hint))` when it holds
/// another or the CA file cannot be read.
fn ca_file_plan(ca: &Path, certs_file: &Path) -> std::result::Result<Option<CaWrite>, (String, String)> {
    let pem = std::fs::read(ca).map_err(|e| {
        (
            format!("--registry-ca {}: cannot read it: {e}", ca.display()),
            "give the PEM file of the CA that signs the registry's certificate".to_string(),
        )
    })?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err((
            format!("--registry-ca {}: not a PEM certificate", ca.display()),
            "give the PEM file of the CA that signs the registry's certificate".to_string(),
        ));
    }
    match std::fs::read(certs_file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some((certs_file.to_path_buf(), pem))),
        Err(e) => Err((
            format!("{}: cannot read it: {e}", certs_file.display()),
            "the Docker engine verifies the registry with this file: check its permissions".to_string(),
        )),
        Ok(have) if String::from_utf8_lossy(&have).contains(String::from_utf8_lossy(&pem).trim()) => Ok(None),
        Ok(_) => Err((
            format!(
                "{} holds another CA than --registry-ca {}: the Docker engine verifies the registry with that file",
                certs_file.display(),
                ca.display()
            ),
            format!(
                "if {} is the registry's CA now, replace the file with it (`cp {} {}`); otherwise give --registry-ca the CA the file holds",
                ca.display(),
                ca.display(),
                certs_file.display()
            ),
        )),
    }
}

/// Write the engine's CA file for the registry (0644, its directory 0755).
pub(super) fn write_ca(path: &Path, pem: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    }
    super::journal::write_atomic(path, pem, 0o644)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::io("cannot set permissions of", path, e))
}

/// `host` (without its port) is 127.0.0.0/8, ::1 or localhost: the engine allows plain HTTP there.
fn is_loopback(host: &str) -> bool {
    let name = host_name(host);
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

/// A `host[:port]` without the port (and without the brackets of an IPv6 address).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Whether the engine pulls from `host` over plain HTTP: named in `insecure-registries` (its index
/// config is not secure), or an address in one of its insecure CIDRs.
fn engine_allows_http(rc: &crate::engine::RegistryConfig, host: &str) -> bool {
    if rc.secure.get(host) == Some(&false) {
        return true;
    }
    let Ok(ip) = host_name(host).parse::<IpAddr>() else {
        return false;
    };
    rc.insecure_cidrs.iter().any(|c| cidr_contains(c, ip))
}

fn cidr_contains(cidr: &str, ip: IpAddr) -> bool {
    let Some((net, bits)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u32>()) else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) if bits <= 32 => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if bits <= 128 => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// The images step from a registry: the engine's CA file written when preflight planned it, then
/// each image to pull pulled, its id checked, tagged with the bundle's references.
pub(super) async fn pull(
    engine: &Engine,
    source: &Source,
    planned: &[PlannedImage],
    write_ca_file: Option<&(PathBuf, Vec<u8>)>,
    reporter: &dyn Reporter,
    notes: &mut Vec<String>,
) -> Result<usize> {
    let registry = source.target.to_string();
    if let Some((path, pem)) = write_ca_file {
        write_ca(path, pem)?;
        notes.push(format!(
            "wrote {} (mode 0644): the CA of --registry-ca, with which the Docker engine verifies registry {registry}",
            path.display()
        ));
    }
    let to_pull: Vec<&PlannedImage> = planned.iter().filter(|p| p.action == ImageAction::Pull).collect();
    if to_pull.is_empty() {
        return Ok(0);
    }
    // Found once, handed to the engine with each pull; never logged.
    let credentials = source.access.credentials(&source.target.host)?;
    reporter.note(&format!("pulling {} image(s) from registry {registry}", to_pull.len()));
    // All at once (at most PULLS_AT_ONCE): the engine downloads a layer several images share
    // once, and one image's extraction overlaps another's download.
    let slots = tokio::sync::Semaphore::new(PULLS_AT_ONCE);
    let pulls = to_pull.iter().map(|p| {
        let (slots, credentials, registry) = (&slots, credentials.as_ref(), &registry);
        async move {
            let name = p.refs.join(", ");
            let reference = p.from.clone().ok_or_else(|| {
                Error::internal(format!("image {name} is to be pulled but has no registry reference"))
            })?;
            let _slot = slots
                .acquire()
                .await
                .map_err(|_| Error::internal("pull slots closed"))?;
            let task = reporter.task(&format!("pulling {reference}"), None);
            let pulled = engine.pull_with(&reference, credentials, &|n| task.advance(n)).await;
            task.finish();
            pulled.map_err(|msg| pull_error(&name, &reference, registry, source, &msg))?;
            Ok::<_, Error>(reference)
        }
    });
    let results = futures_util::future::join_all(pulls).await;
    // Every pulled image settled (checked, tagged, its registry name removed), even when another
    // failed; then every problem together.
    let mut problems = Vec::new();
    for (p, pulled) in to_pull.iter().zip(results) {
        match pulled {
            Ok(reference) => {
                if let Err(e) = settle(engine, p, &reference, &registry).await {
                    problems.push(e);
                } else {
                    reporter.note(&format!("pulled {} ({}) from {reference}", p.refs.join(", "), p.id));
                }
            }
            Err(e) => problems.push(e),
        }
    }
    match problems.len() {
        0 => {}
        1 => return Err(problems.remove(0)),
        n => {
            return Err(Error::all(
                format!("{n} images could not be pulled from registry {registry}"),
                problems,
            ))
        }
    }
    Ok(to_pull.len())
}

/// A pulled image: its id checked against the manifest's, tagged with the bundle's references,
/// its registry name removed (also when the id is wrong).
async fn settle(engine: &Engine, p: &PlannedImage, reference: &str, registry: &str) -> Result<()> {
    let name = p.refs.join(", ");
    let found = engine.image(reference).await?.map(|i| i.id);
    if found.as_deref() != Some(p.id.as_str()) {
        if !p.refs.iter().any(|r| r == reference) {
            engine.untag(reference).await?;
        }
        return Err(Error::external(format!(
            "image {name}: {reference} pulled from registry {registry} is image {}, the bundle's is {} (the pulled name was removed again)",
            found.as_deref().unwrap_or("(none)"),
            p.id
        ))
        .hint(format!(
            "the registry holds another image under that name: push the bundle's images again (`bkbundle push FULL.bkb --registry {registry}`), or give the registry the bundle was pushed to"
        )));
    }
    for r in &p.refs {
        if engine.image(r).await?.map(|i| i.id).as_deref() != Some(p.id.as_str()) {
            engine.tag(&p.id, r).await?;
        }
    }
    if !p.refs.iter().any(|r| r == reference) {
        engine.untag(reference).await?;
    }
    Ok(())
}

/// A pull the engine refused: image, reference, the engine's message, and the likely fix.
fn pull_error(name: &str, reference: &str, registry: &str, source: &Source, msg: &str) -> Error {
    let host = &source.target.host;
    let lower = msg.to_ascii_lowercase();
    let hint = if lower.contains("x509") || lower.contains("certificate") || lower.contains("tls") {
        format!(
            "the Docker engine does not trust {host}'s certificate: give --registry-ca FILE (install writes it to {}/{host}/ca.crt), or put the CA there yourself",
            CERTS_D
        )
    } else if lower.contains("http response to https client") || lower.contains("server gave http") {
        format!(
            "{host} speaks plain HTTP: add \"{host}\" to \"insecure-registries\" in /etc/docker/daemon.json, restart the engine, and give --registry-insecure"
        )
    } else if lower.contains("unauthorized")
        || lower.contains("authentication required")
        || lower.contains("denied")
        || lower.contains("forbidden")
    {
        format!(
            "the registry wants credentials: give --registry-user USER with --registry-password-file FILE (or `docker login {host}`)"
        )
    } else if lower.contains("connection refused") || lower.contains("no such host") || lower.contains("timeout") {
        format!("check that the registry {registry} is up and reachable from this host (`curl -v https://{host}/v2/`)")
    } else {
        format!("try `docker pull {reference}` on this host to see the engine's full account")
    };
    Error::external(format!(
        "image {name}: the Docker engine could not pull {reference} from registry {registry}: {msg}"
    ))
    .hint(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_and_insecure_cidrs() {
        assert!(is_loopback("127.0.0.1:5000") && is_loopback("localhost") && is_loopback("[::1]:5000"));
        assert!(!is_loopback("10.0.0.5:5000") && !is_loopback("harbor.intranet"));
        let rc = crate::engine::RegistryConfig {
            insecure_cidrs: vec!["127.0.0.0/8".into(), "10.1.0.0/16".into()],
            secure: [
                ("reg.intranet:5000".to_string(), false),
                ("docker.io".to_string(), true),
            ]
            .into_iter()
            .collect(),
        };
        assert!(engine_allows_http(&rc, "10.1.200.3:5000"));
        assert!(!engine_allows_http(&rc, "10.2.0.1:5000"));
        assert!(engine_allows_http(&rc, "reg.intranet:5000"));
        assert!(!engine_allows_http(&rc, "reg.intranet"));
        assert!(!engine_allows_http(&rc, "docker.io"));
        assert!(cidr_contains("0.0.0.0/0", "1.2.3.4".parse().unwrap()));
        assert!(!cidr_contains("bad", "1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn the_engines_ca_file_is_written_when_missing_and_refused_when_another() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca.pem");
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        std::fs::write(&ca, pem).unwrap();
        let certs = d.path().join("certs.d/reg:5000/ca.crt");
        let plan = ca_file_plan(&ca, &certs).unwrap().unwrap();
        assert_eq!(plan, (certs.clone(), pem.as_bytes().to_vec()));
        write_ca(&plan.0, &plan.1).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&certs).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(
            ca_file_plan(&ca, &certs).unwrap(),
            None,
            "the same CA: nothing to write"
        );
        std::fs::write(
            &certs,
            "-----BEGIN CERTIFICATE-----\nOTHER\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let (finding, hint) = ca_file_plan(&ca, &certs).unwrap_err();
        assert!(
            finding.contains(&certs.display().to_string()) && finding.contains("another CA"),
            "{finding}"
        );
        assert!(hint.contains("cp "), "{hint}");
        std::fs::write(&ca, "not a pem").unwrap();
        assert!(ca_file_plan(&ca, &certs).unwrap_err().0.contains("not a PEM"));
    }

    #[test]
    fn the_images_source_is_the_flag_else_the_config() {
        let settings = Settings {
            url: Some("reg.intranet:5000/site".into()),
            insecure: true,
            ..Default::default()
        };
        let s = Source::resolve(None, &Access::default(), &settings).unwrap().unwrap();
        assert_eq!(s.target.to_string(), "reg.intranet:5000/site");
        assert!(s.access.insecure);
        let s = Source::resolve(Some("other:443"), &Access::default(), &settings)
            .unwrap()
            .unwrap();
        assert_eq!(s.target.host, "other:443");
        assert!(Source::resolve(None, &Access::default(), &Settings::default())
            .unwrap()
            .is_none());
        assert_eq!(
            Source::resolve(Some("https://x"), &Access::default(), &Settings::default())
                .unwrap_err()
                .kind,
            Kind::Input
        );
        assert_eq!(
            s.certs_file(Path::new("/etc/docker/certs.d")),
            Path::new("/etc/docker/certs.d/other:443/ca.crt")
        );
    }

    #[test]
    fn pull_errors_name_the_image_and_hint_at_the_cause() {
        let s = Source {
            target: Target::parse("reg:5000").unwrap(),
            access: Access::default(),
        };
        let e = pull_error(
            "a:1",
            "reg:5000/a:1",
            "reg:5000",
            &s,
            "x509: certificate signed by unknown authority",
        );
        assert_eq!(e.kind, Kind::External);
        assert!(e.message.contains("image a:1") && e.message.contains("reg:5000/a:1") && e.message.contains("x509"));
        assert!(e.hints[0].contains("certs.d/reg:5000/ca.crt"), "{:?}", e.hints);
        let e = pull_error(
            "a:1",
            "reg:5000/a:1",
            "reg:5000",
            &s,
            "http: server gave HTTP response to HTTPS client",
        );
        assert!(e.hints[0].contains("insecure-registries"), "{:?}", e.hints);
        let e = pull_error(
            "a:1",
            "reg:5000/a:1",
            "reg:5000",
            &s,
            "unauthorized: authentication required",
        );
        assert!(e.hints[0].contains("--registry-user"), "{:?}", e.hints);
    }
}
