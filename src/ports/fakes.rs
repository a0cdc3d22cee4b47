//! In-memory fakes of [`super`]'s traits, for unit tests: each holds the state a test sets up
//! and records the writes made to it, so a test asserts on what a command decided and did.

use super::{Cache, Docker, ObjectStore, PlatformDb, RegionPlan, SilentAgent};
use crate::engine::{ContainerState, LocalImage};
use crate::error::{Error, Result};
use crate::platform::crypto::SecretKey;
use crate::platform::db::{DbError, DbName, DbTarget};
use crate::platform::nats::{Inventory, NatsError};
use crate::platform::packages::{NewRow, Row};
use crate::platform::regions::{Action, Current, CurrentEnv, CurrentRegion};
use crate::platform::release::Release;
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

/// A Docker engine with images and containers set up by the test.
#[derive(Default)]
pub struct FakeDocker {
    pub images: BTreeMap<String, LocalImage>,
    pub containers: Vec<ContainerState>,
    pub env: BTreeMap<String, BTreeMap<String, String>>,
    pub logs: BTreeMap<String, Vec<String>>,
    /// Containers restarted, in order.
    pub restarted: Mutex<Vec<String>>,
    /// When set, every call fails with this message (an engine that does not answer).
    pub down: Option<String>,
}

impl FakeDocker {
    fn up(&self) -> Result<()> {
        match &self.down {
            Some(m) => Err(Error::external(m.clone())),
            None => Ok(()),
        }
    }
}

/// A container of `service` in `status` (health `health`), named `project-service-1`.
pub fn container(project: &str, service: &str, status: &str, health: Option<&str>) -> ContainerState {
    ContainerState {
        id: format!("{project}-{service}-1-id"),
        name: format!("{project}-{service}-1"),
        service: service.to_string(),
        status: status.to_string(),
        health: health.map(str::to_string),
        exit_code: 0,
        restart_count: 0,
        restart_policy: "unless-stopped".into(),
        started_at: "2026-11-29T00:00:00Z".into(),
        oom_killed: false,
        ports: vec![],
        image: format!("{project}/{service}:1"),
        image_id: format!("sha256:{:0>64}", service.len()),
    }
}

#[async_trait]
impl Docker for FakeDocker {
    async fn image(&self, reference: &str) -> Result<Option<LocalImage>> {
        self.up()?;
        Ok(self.images.get(reference).cloned())
    }
    async fn project_containers(&self, project: &str) -> Result<Vec<ContainerState>> {
        self.up()?;
        Ok(self
            .containers
            .iter()
            .filter(|c| c.name.starts_with(&format!("{project}-")))
            .cloned()
            .collect())
    }
    async fn container_env(&self, id: &str) -> Result<Option<BTreeMap<String, String>>> {
        self.up()?;
        Ok(self.env.get(id).cloned())
    }
    async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>> {
        self.up()?;
        let all = self.logs.get(id).cloned().unwrap_or_default();
        Ok(all[all.len().saturating_sub(lines)..].to_vec())
    }
    async fn restart(&self, id: &str, _grace: Duration) -> Result<()> {
        self.up()?;
        self.restarted.lock().unwrap().push(id.to_string());
        Ok(())
    }
}

/// A database target for messages (nothing connects to it).
pub fn db_target() -> DbTarget {
    DbTarget {
        config: tokio_postgres::Config::new(),
        name: DbName {
            display: "bklite@fake.invalid:5432/bklite".into(),
            source: "the test".into(),
        },
    }
}

/// The platform's database, in memory: regions, env rows, package rows; writes applied to
/// them as the real tables would take them (secrets stored as given: the fake does not
/// encrypt), and logged in `writes`.
pub struct FakeDb {
    pub target: DbTarget,
    pub release: Release,
    pub current: Mutex<Current>,
    pub rows: Mutex<Vec<Row>>,
    pub cache: Vec<(String, Vec<u8>)>,
    pub agents: Option<Vec<SilentAgent>>,
    /// One line per write, e.g. `insert packageversion linux/telegraf/1.0 -> 7`.
    pub writes: Mutex<Vec<String>>,
    /// When set, every call fails as a database that is not there.
    pub down: Option<String>,
}

impl FakeDb {
    pub fn new(release: Release) -> FakeDb {
        FakeDb {
            target: db_target(),
            release,
            current: Mutex::new(Current::default()),
            rows: Mutex::new(vec![]),
            cache: vec![],
            agents: Some(vec![]),
            writes: Mutex::new(vec![]),
            down: None,
        }
    }

    /// Add region `id` with `env` rows of type `str` (`is_pre` as the server makes region 1's).
    pub fn with_region(self, id: i64, name: &str, env: &[(&str, &str)]) -> FakeDb {
        {
            let mut c = self.current.lock().unwrap();
            c.regions.push(CurrentRegion {
                id,
                name: name.into(),
                introduction: String::new(),
                proxy_address: String::new(),
            });
            for (k, v) in env {
                let row = c.env.len() as i64 + 1;
                c.env.push(CurrentEnv {
                    id: row,
                    region_id: id,
                    key: k.to_string(),
                    value: v.to_string(),
                    env_type: "str".into(),
                    is_pre: id == 1,
                });
            }
        }
        self
    }

    /// Add a `node_mgmt_packageversion` row of a `linux/x86_64` package, version 1.0.0.
    pub fn with_package_row(self, id: i64, object: &str, name: &str) -> FakeDb {
        self.rows.lock().unwrap().push(Row {
            id,
            os: "linux".into(),
            arch: "x86_64".into(),
            object: object.into(),
            version: "1.0.0".into(),
            name: name.into(),
        });
        self
    }

    fn up(&self) -> std::result::Result<(), DbError> {
        match &self.down {
            Some(m) => Err(DbError::Unreachable {
                db: self.target.name.clone(),
                message: m.clone(),
            }),
            None => Ok(()),
        }
    }

    fn log(&self, line: String) {
        self.writes.lock().unwrap().push(line);
    }
}

#[async_trait]
impl PlatformDb for FakeDb {
    fn target(&self) -> &DbTarget {
        &self.target
    }
    async fn release(&self, _wait: Option<Duration>) -> std::result::Result<Release, DbError> {
        self.up()?;
        Ok(self.release.clone())
    }
    async fn detect_release(&self) -> std::result::Result<Release, DbError> {
        self.up()?;
        Ok(self.release.clone())
    }
    async fn regions(&self, _release: &Release) -> std::result::Result<Current, DbError> {
        self.up()?;
        Ok(self.current.lock().unwrap().clone())
    }
    async fn apply_regions(
        &self,
        _release: &Release,
        _key: Option<&SecretKey>,
        plan: &(dyn for<'c> Fn(&'c Current) -> RegionPlan + Send + Sync),
    ) -> std::result::Result<RegionPlan, DbError> {
        self.up()?;
        let mut current = self.current.lock().unwrap();
        let mut planned = match plan(&current) {
            Ok(p) => p,
            Err(problems) => return Ok(Err(problems)),
        };
        for r in planned.iter_mut() {
            let id = match r.id {
                Some(id) => id,
                None => {
                    let id = current.regions.iter().map(|r| r.id).max().unwrap_or(0) + 1;
                    current.regions.push(CurrentRegion {
                        id,
                        name: r.name.clone(),
                        introduction: r.introduction.clone(),
                        proxy_address: r.proxy_address.clone(),
                    });
                    self.log(format!("insert cloudregion {} -> {id}", r.name));
                    r.id = Some(id);
                    id
                }
            };
            for k in &r.keys {
                match k.action {
                    Action::Unchanged => {}
                    Action::Create => {
                        let row = current.env.len() as i64 + 1;
                        current.env.push(CurrentEnv {
                            id: row,
                            region_id: id,
                            key: k.key.clone(),
                            value: k.value.clone(),
                            env_type: k.env_type.as_str().to_string(),
                            is_pre: false,
                        });
                        self.log(format!("insert sidecarenv {}/{}", r.name, k.key));
                    }
                    Action::Update => {
                        if let Some(e) = current.env.iter_mut().find(|e| Some(e.id) == k.row_id) {
                            e.value = k.value.clone();
                            e.env_type = k.env_type.as_str().to_string();
                        }
                        self.log(format!("update sidecarenv {}/{}", r.name, k.key));
                    }
                }
            }
            for s in &r.services {
                current.services.insert((id, s.to_string()));
                self.log(format!("insert cloudregionservice {}/{s}", r.name));
            }
        }
        Ok(Ok(planned))
    }
    async fn add_region_services(
        &self,
        _release: &Release,
        region_id: i64,
        region: &str,
        services: &[&str],
    ) -> std::result::Result<(), DbError> {
        self.up()?;
        let mut current = self.current.lock().unwrap();
        for s in services {
            current.services.insert((region_id, s.to_string()));
            self.log(format!("insert cloudregionservice {region}/{s}"));
        }
        Ok(())
    }
    /// Copies region 1's rows; the proxy host replaces only `127.0.0.1` (the real substitution is
    /// [`crate::platform::rules`]'s, tested there).
    async fn copy_env_from_default(
        &self,
        _release: &Release,
        region_id: i64,
        proxy: &str,
        keys: &[String],
    ) -> std::result::Result<(), DbError> {
        self.up()?;
        let mut current = self.current.lock().unwrap();
        for key in keys {
            let Some(src) = current.env.iter().find(|e| e.region_id == 1 && &e.key == key).cloned() else {
                continue;
            };
            let row = current.env.len() as i64 + 1;
            let value = if proxy.is_empty() {
                src.value.clone()
            } else {
                src.value.replace("127.0.0.1", proxy)
            };
            current.env.push(CurrentEnv {
                id: row,
                region_id,
                key: key.clone(),
                value,
                env_type: src.env_type.clone(),
                is_pre: false,
            });
            self.log(format!("insert sidecarenv {region_id}/{key} from region 1"));
        }
        Ok(())
    }
    async fn cached_env(&self, keys: &[String]) -> std::result::Result<Vec<(String, Vec<u8>)>, DbError> {
        self.up()?;
        Ok(self.cache.iter().filter(|(k, _)| keys.contains(k)).cloned().collect())
    }
    async fn invalidate_cached_env(&self, region_ids: &BTreeSet<i64>) -> std::result::Result<u64, DbError> {
        self.up()?;
        self.log(format!("delete cache entries of regions {region_ids:?}"));
        Ok(0)
    }
    async fn package_rows(&self, _release: &Release) -> std::result::Result<Vec<Row>, DbError> {
        self.up()?;
        Ok(self.rows.lock().unwrap().clone())
    }
    async fn insert_package_row(
        &self,
        _release: &Release,
        row: &NewRow<'_>,
        key: &str,
    ) -> std::result::Result<i64, DbError> {
        self.up()?;
        let mut rows = self.rows.lock().unwrap();
        let id = rows.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        rows.push(Row {
            id,
            os: row.os.into(),
            arch: row.arch.into(),
            object: row.object.into(),
            version: row.version.into(),
            name: row.name.into(),
        });
        self.log(format!("insert packageversion {key} -> {id}"));
        Ok(id)
    }
    async fn update_package_row_name(&self, id: i64, name: &str, key: &str) -> std::result::Result<(), DbError> {
        self.up()?;
        if let Some(r) = self.rows.lock().unwrap().iter_mut().find(|r| r.id == id) {
            r.name = name.into();
        }
        self.log(format!("update packageversion {id} name {name} ({key})"));
        Ok(())
    }
    async fn silent_agents(&self, _grace_minutes: i64) -> std::result::Result<Option<Vec<SilentAgent>>, DbError> {
        self.up()?;
        Ok(self.agents.clone())
    }
}

/// The pieces [`FakeStore`] hands a reader: small, so that a test's object spans several.
pub const FAKE_READ_CHUNK: usize = 64 << 10;

/// A tombstone: the meta of a deleted object.
fn deleted(meta: &serde_json::Value) -> bool {
    meta.get("deleted").and_then(|d| d.as_bool()).unwrap_or(false)
}

/// One bucket in memory: objects by key (content, meta), chunk sets by upload.
#[derive(Default)]
pub struct FakeStore {
    pub bucket: String,
    pub objects: Mutex<BTreeMap<String, (Vec<u8>, serde_json::Value)>>,
    /// Chunks by upload nuid (what a killed upload leaves is a set without a meta).
    pub chunks: Mutex<BTreeMap<String, Vec<u8>>>,
    /// When set, `send_chunks` fails with it (a server that drops the connection).
    pub fail_sends: Option<String>,
}

impl FakeStore {
    pub fn new(bucket: &str) -> FakeStore {
        FakeStore {
            bucket: bucket.into(),
            ..Default::default()
        }
    }

    /// Store `content` under `key` as a finished upload would.
    pub fn with_object(self, key: &str, content: &[u8]) -> FakeStore {
        let sha = crate::digest::sha256_from_hex(&crate::digest::sha256_hex(content)).unwrap_or_default();
        let meta = serde_json::json!({
            "name": key, "nuid": format!("seed-{key}"), "size": content.len(),
            "digest": crate::platform::packages::nats_digest(&sha),
        });
        self.objects
            .lock()
            .unwrap()
            .insert(key.into(), (content.to_vec(), meta));
        self
    }

    /// A deleted object under `key`: its tombstone, as the object store's delete leaves it.
    pub fn with_deleted(self, key: &str) -> FakeStore {
        let meta = serde_json::json!({
            "name": key, "nuid": format!("seed-{key}"), "size": 0, "chunks": 0, "digest": "", "deleted": true,
        });
        self.objects.lock().unwrap().insert(key.into(), (vec![], meta));
        self
    }

    /// The keys stored (deleted ones included).
    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().unwrap().keys().cloned().collect()
    }
}

#[async_trait]
impl ObjectStore for FakeStore {
    fn bucket(&self) -> &str {
        &self.bucket
    }
    fn server(&self) -> &str {
        "nats://fake.invalid:4222"
    }
    fn max_payload(&self) -> usize {
        1 << 20
    }
    async fn list(&self) -> std::result::Result<BTreeSet<String>, NatsError> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, (_, m))| !deleted(m))
            .map(|(k, _)| k.clone())
            .collect())
    }
    async fn info(&self, key: &str) -> std::result::Result<Option<(String, u64)>, String> {
        let objects = self.objects.lock().unwrap();
        Ok(objects.get(key).filter(|(_, m)| !deleted(m)).map(|(c, m)| {
            (
                m.get("digest").and_then(|d| d.as_str()).unwrap_or_default().to_string(),
                c.len() as u64,
            )
        }))
    }
    async fn meta(&self, key: &str) -> std::result::Result<Option<serde_json::Value>, String> {
        Ok(self.objects.lock().unwrap().get(key).map(|(_, m)| m.clone()))
    }
    async fn metas(&self) -> std::result::Result<Vec<serde_json::Value>, String> {
        Ok(self.objects.lock().unwrap().values().map(|(_, m)| m.clone()).collect())
    }
    /// The content of the object whose meta names `nuid` (or of a chunk set without a meta), in
    /// [`FAKE_READ_CHUNK`] pieces.
    async fn read_chunks(
        &self,
        nuid: &str,
        sink: &mut (dyn FnMut(Bytes) -> std::result::Result<(), String> + Send),
    ) -> std::result::Result<u64, String> {
        let content = {
            let objects = self.objects.lock().unwrap();
            let stored = objects
                .values()
                .find(|(_, m)| m.get("nuid").and_then(|n| n.as_str()) == Some(nuid))
                .map(|(c, _)| c.clone());
            stored.or_else(|| self.chunks.lock().unwrap().get(nuid).cloned())
        };
        let content = content.unwrap_or_default();
        for piece in content.chunks(FAKE_READ_CHUNK) {
            sink(Bytes::copy_from_slice(piece))?;
        }
        Ok(content.len() as u64)
    }
    async fn inventory(&self) -> std::result::Result<Inventory, String> {
        let objects = self.objects.lock().unwrap();
        let live: BTreeSet<String> = objects
            .values()
            .filter_map(|(_, m)| m.get("nuid").and_then(|n| n.as_str()).map(str::to_string))
            .collect();
        let chunks = self.chunks.lock().unwrap();
        Ok(Inventory {
            stream_bytes: objects.values().map(|(c, _)| c.len() as u64).sum::<u64>()
                + chunks.values().map(|c| c.len() as u64).sum::<u64>(),
            live_objects: objects.len(),
            live_bytes: objects.values().map(|(c, _)| c.len() as u64).sum(),
            unreferenced: chunks
                .iter()
                .filter(|(n, _)| !live.contains(*n))
                .map(|(n, c)| (n.clone(), c.len().div_ceil(1 << 20).max(1)))
                .collect(),
        })
    }
    async fn purge_chunks(&self, nuid: &str) -> std::result::Result<u64, String> {
        Ok(self.chunks.lock().unwrap().remove(nuid).map(|_| 1).unwrap_or(0))
    }
    async fn send_chunks(
        &self,
        nuid: &str,
        chunks: &mut tokio::sync::mpsc::Receiver<Bytes>,
    ) -> std::result::Result<(usize, u64), String> {
        let (mut count, mut sent) = (0usize, 0u64);
        while let Some(c) = chunks.recv().await {
            if let Some(f) = &self.fail_sends {
                chunks.close();
                self.chunks.lock().unwrap().remove(nuid);
                return Err(f.clone());
            }
            count += 1;
            sent += c.len() as u64;
            self.chunks
                .lock()
                .unwrap()
                .entry(nuid.to_string())
                .or_default()
                .extend_from_slice(&c);
        }
        Ok((count, sent))
    }
    async fn publish_meta(&self, key: &str, meta: &serde_json::Value) -> std::result::Result<(), String> {
        let nuid = meta
            .get("nuid")
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_string();
        let content = self.chunks.lock().unwrap().remove(&nuid).unwrap_or_default();
        self.objects
            .lock()
            .unwrap()
            .insert(key.to_string(), (content, meta.clone()));
        Ok(())
    }
}

/// A Redis in memory.
#[derive(Default)]
pub struct FakeCache {
    pub entries: Mutex<BTreeMap<String, Vec<u8>>>,
    pub down: Option<String>,
}

#[async_trait]
impl Cache for FakeCache {
    fn display(&self) -> String {
        "redis://fake.invalid:6379/0".into()
    }
    async fn get(&self, keys: &[String], _timeout: Duration) -> std::result::Result<Vec<Option<Vec<u8>>>, String> {
        if let Some(d) = &self.down {
            return Err(d.clone());
        }
        let e = self.entries.lock().unwrap();
        Ok(keys.iter().map(|k| e.get(k).cloned()).collect())
    }
    async fn del(&self, keys: &[String], _timeout: Duration) -> std::result::Result<u64, String> {
        if let Some(d) = &self.down {
            return Err(d.clone());
        }
        let mut e = self.entries.lock().unwrap();
        Ok(keys.iter().filter(|k| e.remove(*k).is_some()).count() as u64)
    }
}

/// A controller package of version `version` for linux/amd64, a file `dir/NAME` holding
/// `content` (the manifest records no digest: it is hashed when planned).
pub fn controller_package(dir: &std::path::Path, version: &str, content: &[u8]) -> crate::packages::Input {
    use crate::manifest::{Os, Package, PackageType};
    let name = format!("fusion-collectors-{version}-linux-amd64.zip");
    let path = dir.join(&name);
    std::fs::write(&path, content).expect("writing a package in the test's directory");
    crate::packages::Input {
        pkg: Package {
            file: None,
            name,
            kind: PackageType::Controller,
            os: Os::Linux,
            arch: "amd64".into(),
            object: "Controller".into(),
            version: version.into(),
            description: String::new(),
            from: None,
            entry: None,
            sha256: None,
            size: None,
        },
        source: crate::packages::source::Source::File(path),
        known: None,
        installer: false,
    }
}
