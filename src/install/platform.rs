//! The platform half of install's plan: the sidecar env rows and region services it will write,
//! and the objects (with their rows) it will upload, so that `install --dry-run --json` shows all
//! of them before anything changes.
//!
//! Planned against the live platform when it is reachable now (a re-run, an upgrade): the same
//! decisions `regions apply --dry-run` and `init-packages --dry-run` make. Before the platform
//! exists (a first install), against an empty database of the newest release bkbundle knows,
//! marked `assumed`: the steps decide again on the live database once the server has migrated it,
//! and the install report shows what they wrote.

use crate::manifest::Regions;
use crate::packages::{self, ObjectAction, PackagesOptions};
use crate::platform::packages::{self as keys, nats_digest};
use crate::platform::regions::{Action, Current, PlannedRegion};
use crate::platform::release::Release;
use crate::platform::rules::EnvType;
use crate::ports::live::{NatsBucket, Postgres};
use crate::ports::{ObjectStore, PlatformDb};
use crate::regions::{self, Mode, RegionsError, RegionsOptions};
use crate::site::config::InstallConfig;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// How long preflight gives the live database and NATS to answer: a first install has neither.
const PROBE: Duration = Duration::from_secs(5);

/// One sidecar env row the regions step writes (or finds as wanted).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlannedRow {
    pub region: String,
    pub key: String,
    pub env_type: String,
    pub action: Action,
    /// The value; absent for secrets (never shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// One object the packages step uploads (or finds in place), with its row.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlannedObject {
    pub key: String,
    /// `SHA-256=` + URL-safe base64, as the object store records it.
    pub digest: String,
    pub size: u64,
    pub action: ObjectAction,
    /// The site CA is added to the package at upload: the stored object's digest and size are
    /// then the new archive's (recorded in its meta beside `digest`, the bundle file's).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ca_added: bool,
    /// The package's row; `None` for an installer program (no row).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row: Option<PlannedPackageRow>,
    /// A delta bundle leaves this object's file (the path) to its base, yet the step would send
    /// its bytes: the object store lacks it. Install refuses before changing anything.
    #[serde(skip)]
    pub from_base: Option<String>,
}

/// The `node_mgmt_packageversion` row of a planned object.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlannedPackageRow {
    #[serde(rename = "type")]
    pub kind: String,
    pub os: String,
    /// Empty on releases without `cpu_architecture`.
    pub arch: String,
    pub object: String,
    pub version: String,
    pub name: String,
    /// The row already there (`None`: the step inserts one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
}

/// What install writes into the platform.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlatformPlan {
    /// The release planned for (`node_mgmt migration ...`).
    pub release: Option<String>,
    /// No live database yet: planned for an empty database of the newest known release.
    pub assumed: bool,
    pub rows: Vec<PlannedRow>,
    /// `region/service` rows of `node_mgmt_cloudregionservice` to add.
    pub services: Vec<String>,
    pub bucket: Option<String>,
    pub packages: Vec<PlannedObject>,
    /// Controller installer programs (no row).
    pub installers: Vec<PlannedObject>,
    /// What the plan could not see, and what the steps then do.
    pub notes: Vec<String>,
    /// The widest env value the release's column takes (`None`: text).
    #[serde(skip)]
    pub value_max: Option<usize>,
}

/// The inputs: the bundle's manifest and path, the install config, the site values.
pub struct Inputs<'a> {
    /// The bundle's `[regions]`.
    pub regions: &'a Regions,
    /// Whether the bundle has packages (read from `opened`, else `bundle`).
    pub has_packages: bool,
    pub bundle: &'a Path,
    /// The bundle as install verified it.
    pub opened: Option<std::sync::Arc<crate::bundle::VerifiedBundle>>,
    pub config: &'a InstallConfig,
    pub site: &'a BTreeMap<String, String>,
    pub env: &'a (dyn Fn(&str) -> Option<String> + Sync),
}

/// Plan the rows and objects. Problems of the live regions (a region that would hand agents
/// `null`) are returned as preflight findings; an unreachable platform is no finding (a first
/// install), it is planned as assumed.
pub async fn plan(i: &Inputs<'_>) -> (PlatformPlan, Vec<String>) {
    let live = connect(i).await;
    let (db, release) = match &live {
        Some((db, r)) => (Some(db as &dyn PlatformDb), Some(r.clone())),
        None => (None, None),
    };
    let mut notes = Vec::new();
    let store = match (&release, i.has_packages) {
        (Some(r), true) => open_bucket(i, &bucket_name(i, r))
            .await
            .map_err(|why| notes.push(format!("the object store was not read ({why}): every package is shown as to upload; the packages step compares each digest and skips the objects already there")))
            .ok(),
        _ => None,
    };
    let (bundle, inputs) = if i.has_packages {
        packages::inputs(&package_options(i)).unwrap_or_else(|e| {
            notes.push(format!("the bundle's packages were not planned: {e}"));
            (None, vec![])
        })
    } else {
        (None, vec![])
    };
    let seams = Seams {
        db,
        release,
        store: store.as_ref().map(|s| s as &dyn ObjectStore),
    };
    let (mut plan, findings) = plan_on(i, &seams, bundle.as_ref(), &inputs).await;
    plan.notes.splice(0..0, notes);
    (plan, findings)
}

/// The platform as the plan sees it: the live database and its release, and the bucket, each
/// `None` when it does not answer (yet).
pub struct Seams<'a> {
    pub db: Option<&'a dyn PlatformDb>,
    pub release: Option<Release>,
    pub store: Option<&'a dyn ObjectStore>,
}

/// [`plan`] on connected (or fake) systems, for the packages in `inputs`.
pub async fn plan_on(
    i: &Inputs<'_>,
    seams: &Seams<'_>,
    bundle: Option<&std::sync::Arc<crate::bundle::VerifiedBundle>>,
    inputs: &[packages::Input],
) -> (PlatformPlan, Vec<String>) {
    let mut out = PlatformPlan::default();
    let mut findings = Vec::new();
    let (db, release) = match (seams.db, &seams.release) {
        (Some(db), Some(r)) => (Some(db), r.clone()),
        _ => {
            out.assumed = true;
            (None, Release::newest_known())
        }
    };
    out.release = Some(release.label());
    out.value_max = release.env_value_max();

    if has_regions(i.regions) {
        // An invalid configuration is preflight's own finding (checked without a database).
        let opts = RegionsOptions::new(Mode::DryRun, i.regions, i.config, i.site.clone());
        let validated = regions::validate(&opts, i.env);
        match region_rows(&opts, validated, db, &release).await {
            Ok(plan) => {
                out.services = plan
                    .iter()
                    .flat_map(|r| r.services.iter().map(move |s| format!("{}/{s}", r.name)))
                    .collect();
                out.rows = rows_of(&plan);
            }
            Err(RegionsError::Invalid(problems)) if db.is_some() => findings.extend(
                problems
                    .iter()
                    .map(|p| format!("cloud regions in the live database: {p}")),
            ),
            Err(e) => out.notes.push(format!("the cloud regions' rows were not planned: {e}")),
        }
    }
    if !inputs.is_empty() {
        let bucket = bucket_name(i, &release);
        let store = db.and(seams.store);
        match objects(i, db, &release, store, &bucket, bundle, inputs).await {
            Ok(p) => {
                (out.installers, out.packages) = p.into_iter().partition(|o| o.row.is_none());
            }
            Err(e) => out.notes.push(format!("the bundle's packages were not planned: {e}")),
        }
        out.bucket = Some(bucket);
    }
    (out, findings)
}

fn bucket_name(i: &Inputs<'_>, release: &Release) -> String {
    i.config
        .nats
        .bucket
        .clone()
        .unwrap_or_else(|| keys::bucket(i.site, Some(release)).0)
}

fn package_options(i: &Inputs<'_>) -> PackagesOptions {
    let mut opts = PackagesOptions::new(i.bundle.to_path_buf(), i.config, i.site.clone());
    opts.opened = i.opened.clone();
    opts.dry_run = true;
    opts
}

fn has_regions(r: &Regions) -> bool {
    !r.required.is_empty() || !r.env.is_empty() || !r.region.is_empty()
}

/// The live database, when it answers within [`PROBE`] and the server has migrated it.
async fn connect(i: &Inputs<'_>) -> Option<(Postgres, Release)> {
    let target = crate::site::targets::database(None, &i.config.database, i.site, i.env).ok()?;
    let db = match tokio::time::timeout(PROBE, Postgres::connect(target)).await {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => {
            tracing::debug!("live database not planned against: {e}");
            return None;
        }
        Err(_) => return None,
    };
    let release = tokio::time::timeout(PROBE, db.release(None)).await.ok()?.ok()?;
    Some((db, release))
}

/// The bucket, or why the plan cannot look into it.
async fn open_bucket(i: &Inputs<'_>, bucket: &str) -> Result<NatsBucket, String> {
    let nt = crate::site::targets::nats(None, &i.config.nats, i.site, i.env).map_err(|e| e.to_string())?;
    match tokio::time::timeout(PROBE, NatsBucket::open(&nt, bucket, false)).await {
        Ok(Ok(Some(b))) => Ok(b),
        Ok(Ok(None)) => Err(format!("bucket {bucket:?} does not exist yet on {}", nt.display())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("{} did not answer within {} s", nt.display(), PROBE.as_secs())),
    }
}

/// Each desired region's plan: against the live database, else against an empty one.
async fn region_rows(
    opts: &RegionsOptions,
    validated: Result<regions::Validated, RegionsError>,
    db: Option<&dyn PlatformDb>,
    release: &Release,
) -> Result<Vec<PlannedRegion>, RegionsError> {
    let v = match validated {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!("regions not planned: {e}");
            return Ok(vec![]);
        }
    };
    match db {
        Some(db) => regions::plan(opts, &v, db).await.map(|(_, plan, _)| plan),
        None => crate::platform::regions::diff(
            &v.desired.regions,
            &Current::default(),
            release,
            v.secret_key.as_ref().map(|(k, _)| k),
            &opts.bundle.required,
        )
        .map_err(RegionsError::Invalid),
    }
}

fn rows_of(plan: &[PlannedRegion]) -> Vec<PlannedRow> {
    plan.iter()
        .flat_map(|r| {
            r.keys.iter().map(|k| PlannedRow {
                region: r.name.clone(),
                key: k.key.clone(),
                env_type: k.env_type.as_str().to_string(),
                action: k.action,
                value: (k.env_type != EnvType::Secret).then(|| k.value.clone()),
            })
        })
        .collect()
}

/// Each package's object and row: against the live rows and bucket, else against none.
async fn objects(
    i: &Inputs<'_>,
    db: Option<&dyn PlatformDb>,
    release: &Release,
    store: Option<&dyn ObjectStore>,
    bucket: &str,
    bundle: Option<&std::sync::Arc<crate::bundle::VerifiedBundle>>,
    inputs: &[packages::Input],
) -> Result<Vec<PlannedObject>, packages::PackagesError> {
    let opts = package_options(i);
    let rows = match db {
        Some(db) => db.package_rows(release).await?,
        None => vec![],
    };
    let run = packages::Run {
        opts: &opts,
        bundle,
        inputs,
        release,
        pending: None,
        reporter: &crate::progress::Silent,
    };
    let mut notes = Vec::new();
    let planned = packages::plan(&run, &rows, store, bucket, &mut notes).await?;
    Ok(planned
        .iter()
        .map(|p| PlannedObject {
            key: p.key.clone(),
            digest: nats_digest(&p.sha),
            size: p.size,
            action: p.action,
            ca_added: p.inject.is_some(),
            from_base: bundle
                .and_then(|b| p.missing_from_base(b.manifest()))
                .map(str::to_string),
            row: (!p.installer).then(|| PlannedPackageRow {
                kind: p.pkg.kind.as_str().to_string(),
                os: p.pkg.os.as_str().to_string(),
                arch: if release.has_package_arch() {
                    p.arch.clone()
                } else {
                    String::new()
                },
                object: p.pkg.object.clone(),
                version: p.pkg.version.clone(),
                name: p.pkg.name.clone(),
                id: p.row.as_ref().map(|r| r.id),
            }),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::release::catalog;
    use crate::ports::fakes::{FakeDb, FakeStore};

    fn regions() -> Regions {
        Regions {
            required: vec!["NODE_SERVER_URL".into(), "NATS_SERVERS".into(), "NATS_PROTOCOL".into()],
            env: BTreeMap::from([
                ("NODE_SERVER_URL".to_string(), "${SERVER_URL}".to_string()),
                ("NATS_SERVERS".to_string(), "${HOST_IP}:4222".to_string()),
                ("NATS_PROTOCOL".to_string(), "nats".to_string()),
            ]),
            region: vec![],
        }
    }

    fn site() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("SERVER_URL".to_string(), "http://192.0.2.10:18080".to_string()),
            ("HOST_IP".to_string(), "192.0.2.10".to_string()),
        ])
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// One controller package, a file on disk.
    fn package(dir: &Path) -> packages::Input {
        crate::ports::fakes::controller_package(dir, "1.0.0", b"PK\x05\x06 a controller package")
    }

    /// The inputs of a plan of the demo-like regions and site.
    fn inputs<'a>(
        regions: &'a Regions,
        site: &'a BTreeMap<String, String>,
        config: &'a InstallConfig,
        dir: &'a Path,
        has_packages: bool,
    ) -> Inputs<'a> {
        Inputs {
            regions,
            has_packages,
            bundle: dir,
            opened: None,
            config,
            site,
            env: &no_env,
        }
    }

    #[tokio::test]
    async fn a_first_install_plans_every_row_and_object_for_the_newest_release() {
        let dir = tempfile::tempdir().unwrap();
        let (regions, site, config) = (regions(), site(), InstallConfig::default());
        let i = inputs(&regions, &site, &config, dir.path(), true);
        let seams = Seams {
            db: None,
            release: None,
            store: None,
        };
        let (p, findings) = plan_on(&i, &seams, None, &[package(dir.path())]).await;
        assert!(findings.is_empty(), "{findings:?}");
        assert!(p.assumed);
        assert_eq!(
            p.release.as_deref(),
            Some("node_mgmt migration 0044_encrypt_installer_passwords")
        );
        let url = p
            .rows
            .iter()
            .find(|r| r.region == "default" && r.key == "NODE_SERVER_URL")
            .expect("region 1's server URL is planned");
        assert_eq!(url.action, Action::Create);
        assert_eq!(url.value.as_deref(), Some("http://192.0.2.10:18080"));
        assert_eq!(
            p.rows.iter().filter(|r| r.region == "default").count(),
            3,
            "{:?}",
            p.rows
        );
        // A region created on a release with the table gets its two service rows.
        assert_eq!(
            p.services,
            vec!["default/stargazer".to_string(), "default/nats-executor".to_string()]
        );
        // The newest release stores packages per architecture, in bucket `bklite`.
        assert_eq!(p.bucket.as_deref(), Some("bklite"));
        assert_eq!(p.packages.len(), 1);
        let o = &p.packages[0];
        assert_eq!(o.action, ObjectAction::Uploaded);
        assert!(o.key.contains("x86_64"), "{}", o.key);
        assert_eq!(o.row.as_ref().unwrap().arch, "x86_64");
        assert_eq!(o.row.as_ref().unwrap().id, None);
        assert_eq!(o.size, 25);
    }

    #[tokio::test]
    async fn the_live_platform_decides_rows_objects_and_their_layout() {
        let dir = tempfile::tempdir().unwrap();
        let input = package(dir.path());
        // A 2025 release (no proxy_address, no cpu_architecture, varchar(200) values) whose
        // region 1 already has the wanted values, and whose bucket already has the object.
        let release = catalog(false, false, true, Some(200), Some("0022_cloudregionservice"));
        let db = FakeDb::new(release.clone()).with_region(
            1,
            "default",
            &[
                ("NODE_SERVER_URL", "http://192.0.2.10:18080"),
                ("NATS_SERVERS", "192.0.2.10:4222"),
                ("NATS_PROTOCOL", "nats"),
            ],
        );
        let key =
            crate::platform::packages::object_key(&release, "linux", "x86_64", "Controller", "1.0.0", &input.pkg.name);
        assert!(!key.contains("x86_64"), "{key}");
        let store = FakeStore::new("bk_lite").with_object(&key, b"PK\x05\x06 a controller package");
        let (regions, site, config) = (regions(), site(), InstallConfig::default());
        let i = inputs(&regions, &site, &config, dir.path(), true);
        let seams = Seams {
            db: Some(&db),
            release: Some(release),
            store: Some(&store),
        };
        let (p, findings) = plan_on(&i, &seams, None, &[input]).await;
        assert!(findings.is_empty(), "{findings:?}");
        assert!(!p.assumed);
        assert_eq!(
            p.release.as_deref(),
            Some("node_mgmt migration 0022_cloudregionservice")
        );
        assert!(p.rows.iter().all(|r| r.action == Action::Unchanged), "{:?}", p.rows);
        // Region 1 exists: its service rows are the server's to keep.
        assert!(p.services.is_empty(), "{:?}", p.services);
        assert_eq!(p.bucket.as_deref(), Some("bk_lite"));
        assert_eq!(p.packages[0].key, key);
        assert_eq!(p.packages[0].action, ObjectAction::Skipped);
        assert_eq!(p.packages[0].row.as_ref().unwrap().arch, "");
        assert!(db.writes.lock().unwrap().is_empty(), "planning wrote");
    }

    #[tokio::test]
    async fn a_live_region_that_would_hand_agents_null_is_a_preflight_finding() {
        let dir = tempfile::tempdir().unwrap();
        let db = FakeDb::new(Release::newest_known())
            .with_region(1, "default", &[("NODE_SERVER_URL", "http://192.0.2.10:18080")])
            .with_region(2, "west", &[("NODE_SERVER_URL", "null"), ("NATS_SERVERS", "null")]);
        let (regions, site, config) = (regions(), site(), InstallConfig::default());
        let i = inputs(&regions, &site, &config, dir.path(), false);
        let seams = Seams {
            db: Some(&db),
            release: Some(Release::newest_known()),
            store: None,
        };
        let (p, findings) = plan_on(&i, &seams, None, &[]).await;
        assert!(
            findings
                .iter()
                .any(|f| f.starts_with("cloud regions in the live database:") && f.contains("west")),
            "{findings:?}"
        );
        assert!(p.rows.is_empty());
        // Without a database the same configuration is no finding: it is planned as assumed.
        let offline = Seams {
            db: None,
            release: None,
            store: None,
        };
        let (p, findings) = plan_on(&i, &offline, None, &[]).await;
        assert!(findings.is_empty() && p.assumed && !p.rows.is_empty());
    }
}
