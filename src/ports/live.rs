//! The live adapters behind [`super`]'s traits: the Docker engine, one PostgreSQL connection,
//! one opened bucket, Redis. Each holds what it connected once; the SQL and the wire formats
//! stay in [`crate::platform`].

use super::{Cache, Docker, ObjectStore, PlatformDb, RegionPlan, SilentAgent, INSTALLER_TABLES};
use crate::engine::{ContainerState, Engine, LocalImage};
use crate::error::Result;
use crate::platform::cache::{self, RedisTarget};
use crate::platform::crypto::SecretKey;
use crate::platform::db::{self, DbError, DbTarget};
use crate::platform::nats::{self, Inventory, NatsError, NatsTarget, Store};
use crate::platform::packages::{self as keys, NewRow, Row};
use crate::platform::regions::{self, Current};
use crate::platform::release::{self, Release, CACHE_TABLE, REGION_TABLE};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[async_trait]
impl Docker for Engine {
    async fn image(&self, reference: &str) -> Result<Option<LocalImage>> {
        Engine::image(self, reference).await
    }
    async fn project_containers(&self, project: &str) -> Result<Vec<ContainerState>> {
        Engine::project_containers(self, project).await
    }
    async fn container_env(&self, id: &str) -> Result<Option<BTreeMap<String, String>>> {
        Engine::container_env(self, id).await
    }
    async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>> {
        Engine::logs(self, id, lines).await
    }
    async fn restart(&self, id: &str, grace: Duration) -> Result<()> {
        Engine::restart(self, id, grace).await
    }
}

/// One connection to the platform's PostgreSQL.
pub struct Postgres {
    client: tokio::sync::Mutex<tokio_postgres::Client>,
    target: DbTarget,
}

impl Postgres {
    /// Connect (the errors tell "not there" from "refused", see [`db::connect`]).
    pub async fn connect(target: DbTarget) -> std::result::Result<Postgres, DbError> {
        let client = db::connect(&target).await?;
        Ok(Postgres {
            client: tokio::sync::Mutex::new(client),
            target,
        })
    }
}

/// A transaction (read-only ones write nothing even by mistake); dropped without commit, it is
/// rolled back.
async fn begin<'c>(
    client: &'c mut tokio_postgres::Client,
    target: &DbTarget,
    read_only: bool,
) -> std::result::Result<tokio_postgres::Transaction<'c>, DbError> {
    client
        .build_transaction()
        .read_only(read_only)
        .start()
        .await
        .map_err(|e| db::db_err(target, "starting a transaction", e))
}

#[async_trait]
impl PlatformDb for Postgres {
    fn target(&self) -> &DbTarget {
        &self.target
    }

    async fn release(&self, wait: Option<Duration>) -> std::result::Result<Release, DbError> {
        let client = self.client.lock().await;
        release::detect_when_migrated(&*client, &self.target, wait).await
    }

    async fn detect_release(&self) -> std::result::Result<Release, DbError> {
        let client = self.client.lock().await;
        release::detect(&*client, &self.target).await
    }

    async fn regions(&self, release: &Release) -> std::result::Result<Current, DbError> {
        let mut client = self.client.lock().await;
        let tx = begin(&mut client, &self.target, true).await?;
        regions::read_current(&tx, &self.target, release).await
        // dropped: rolled back, nothing was written
    }

    async fn apply_regions(
        &self,
        release: &Release,
        key: Option<&SecretKey>,
        plan: &(dyn for<'c> Fn(&'c Current) -> RegionPlan + Send + Sync),
    ) -> std::result::Result<RegionPlan, DbError> {
        let mut client = self.client.lock().await;
        let tx = begin(&mut client, &self.target, false).await?;
        let current = regions::read_current(&tx, &self.target, release).await?;
        let mut planned = match plan(&current) {
            Ok(p) => p,
            Err(problems) => return Ok(Err(problems)),
        };
        if planned.iter().any(|r| r.changes()) {
            regions::execute(&tx, &self.target, release, &mut planned, key).await?;
            tx.commit()
                .await
                .map_err(|e| db::db_err(&self.target, "committing", e))?;
        }
        Ok(Ok(planned))
    }

    async fn add_region_services(
        &self,
        release: &Release,
        region_id: i64,
        region: &str,
        services: &[&str],
    ) -> std::result::Result<(), DbError> {
        let mut client = self.client.lock().await;
        let tx = begin(&mut client, &self.target, false).await?;
        regions::add_services(&tx, &self.target, release, region_id, region, services).await?;
        tx.commit().await.map_err(|e| db::db_err(&self.target, "committing", e))
    }

    async fn copy_env_from_default(
        &self,
        release: &Release,
        region_id: i64,
        proxy: &str,
        keys: &[String],
    ) -> std::result::Result<(), DbError> {
        let mut client = self.client.lock().await;
        let tx = begin(&mut client, &self.target, false).await?;
        let current = regions::read_current(&tx, &self.target, release).await?;
        regions::copy_from_default(&tx, &self.target, &current, region_id, proxy, keys).await?;
        tx.commit().await.map_err(|e| db::db_err(&self.target, "committing", e))
    }

    async fn cached_env(&self, keys: &[String]) -> std::result::Result<Vec<(String, Vec<u8>)>, DbError> {
        use base64::Engine as _;
        let client = self.client.lock().await;
        let sql = format!(
            "SELECT cache_key::text, value::text FROM {CACHE_TABLE} WHERE cache_key = ANY($1) AND expires > now()"
        );
        let rows = client
            .query(sql.as_str(), &[&keys])
            .await
            .map_err(|e| db::db_err(&self.target, &format!("reading {CACHE_TABLE}"), e))?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let value: String = row.get(1);
                let blob = base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?;
                Some((row.get(0), blob))
            })
            .collect())
    }

    async fn invalidate_cached_env(&self, region_ids: &BTreeSet<i64>) -> std::result::Result<u64, DbError> {
        let client = self.client.lock().await;
        regions::invalidate_db_cache(&*client, &self.target, region_ids).await
    }

    async fn package_rows(&self, release: &Release) -> std::result::Result<Vec<Row>, DbError> {
        let client = self.client.lock().await;
        keys::read_rows(&*client, &self.target, release).await
    }

    async fn insert_package_row(
        &self,
        release: &Release,
        row: &NewRow<'_>,
        key: &str,
    ) -> std::result::Result<i64, DbError> {
        let client = self.client.lock().await;
        keys::insert_row(&*client, &self.target, release, row, key).await
    }

    async fn update_package_row_name(&self, id: i64, name: &str, key: &str) -> std::result::Result<(), DbError> {
        let client = self.client.lock().await;
        keys::update_row_name(&*client, &self.target, id, name, key).await
    }

    async fn silent_agents(&self, grace_minutes: i64) -> std::result::Result<Option<Vec<SilentAgent>>, DbError> {
        let tables = INSTALLER_TABLES;
        let client = self.client.lock().await;
        let present: i64 = client
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ANY($1)",
                &[&tables.to_vec()],
            )
            .await
            .map(|r| r.get(0))
            .map_err(|e| db::db_err(&self.target, "reading information_schema.tables", e))?;
        if present < tables.len() as i64 {
            return Ok(None);
        }
        let sql = format!(
            "SELECT r.name::text, t.cloud_region_id::bigint, tn.ip::text, t.id::bigint, to_char(t.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') \
             FROM node_mgmt_controllertasknode tn JOIN node_mgmt_controllertask t ON t.id = tn.task_id \
             JOIN {REGION_TABLE} r ON r.id = t.cloud_region_id \
             WHERE lower(tn.status) = 'success' AND t.updated_at < now() - make_interval(mins => $1::int) \
             AND NOT EXISTS (SELECT 1 FROM node_mgmt_node n WHERE n.cloud_region_id = t.cloud_region_id AND n.ip = tn.ip) \
             ORDER BY t.cloud_region_id, tn.ip"
        );
        let minutes = i32::try_from(grace_minutes).unwrap_or(i32::MAX);
        let rows = client
            .query(sql.as_str(), &[&minutes])
            .await
            .map_err(|e| db::db_err(&self.target, "reading the install tasks", e))?;
        Ok(Some(
            rows.iter()
                .map(|r| SilentAgent {
                    region: r.get(0),
                    region_id: r.get(1),
                    ip: r.get(2),
                    task_id: r.get(3),
                    updated_at: r.get(4),
                })
                .collect(),
        ))
    }
}

/// One opened bucket, and the server it is on.
pub struct NatsBucket {
    store: Store,
    server: String,
    max_payload: usize,
}

impl NatsBucket {
    /// Connect to `target` and open `bucket` (created when absent and `create`); `Ok(None)` when
    /// it is absent and not created. Staged errors: see [`nats::connect`], [`nats::open_store`].
    pub async fn open(
        target: &NatsTarget,
        bucket: &str,
        create: bool,
    ) -> std::result::Result<Option<NatsBucket>, NatsError> {
        let nc = nats::connect(target).await?;
        Self::open_on(&nc, target, bucket, create).await
    }

    /// [`NatsBucket::open`] on a client already connected.
    pub async fn open_on(
        nc: &async_nats::Client,
        target: &NatsTarget,
        bucket: &str,
        create: bool,
    ) -> std::result::Result<Option<NatsBucket>, NatsError> {
        let store = nats::open_store(nc, target, bucket, create).await?;
        Ok(store.map(|store| NatsBucket {
            store,
            server: target.display(),
            max_payload: nc.server_info().max_payload,
        }))
    }
}

/// Publishes in flight before the oldest ack is awaited. async-nats' own `put` awaits every
/// chunk's ack before sending the next (measured: 1 MiB chunks ~330 MB/s end to end here);
/// keeping a few in flight hides the round trip. Memory: WINDOW + channel chunks.
const WINDOW: usize = 8;

#[async_trait]
impl ObjectStore for NatsBucket {
    fn bucket(&self) -> &str {
        &self.store.bucket
    }
    fn server(&self) -> &str {
        &self.server
    }
    fn max_payload(&self) -> usize {
        self.max_payload
    }
    async fn list(&self) -> std::result::Result<BTreeSet<String>, NatsError> {
        nats::list_objects(&self.store, &self.server).await
    }
    async fn info(&self, key: &str) -> std::result::Result<Option<(String, u64)>, String> {
        nats::info(&self.store, key).await
    }
    async fn meta(&self, key: &str) -> std::result::Result<Option<serde_json::Value>, String> {
        nats::raw_meta(&self.store, key).await
    }
    async fn metas(&self) -> std::result::Result<Vec<serde_json::Value>, String> {
        nats::metas(&self.store).await
    }
    async fn read_chunks(
        &self,
        nuid: &str,
        sink: &mut (dyn FnMut(Bytes) -> std::result::Result<(), String> + Send),
    ) -> std::result::Result<u64, String> {
        nats::read_chunks(&self.store, nuid, sink).await
    }
    async fn inventory(&self) -> std::result::Result<Inventory, String> {
        nats::inventory(&self.store).await
    }
    async fn purge_chunks(&self, nuid: &str) -> std::result::Result<u64, String> {
        nats::purge_chunks(&self.store, nuid).await
    }

    async fn send_chunks(
        &self,
        nuid: &str,
        chunks: &mut tokio::sync::mpsc::Receiver<Bytes>,
    ) -> std::result::Result<(usize, u64), String> {
        let subject = nats::chunk_subject(&self.store.bucket, nuid);
        let mut in_flight = std::collections::VecDeque::new();
        let (mut count, mut sent) = (0usize, 0u64);
        let mut failure = None;
        while let Some(payload) = chunks.recv().await {
            sent += payload.len() as u64;
            count += 1;
            match self.store.js.publish(subject.clone(), payload).await {
                Ok(ack) => in_flight.push_back(ack),
                Err(e) => {
                    failure = Some(format!("publishing chunk {count}: {}", crate::error::chain(&e)));
                    break;
                }
            }
            if in_flight.len() >= WINDOW {
                if let Some(ack) = in_flight.pop_front() {
                    if let Err(e) = ack.await {
                        failure = Some(format!("ack of a chunk: {}", crate::error::chain(&e)));
                        break;
                    }
                }
            }
        }
        // The sender sees a closed channel and stops.
        chunks.close();
        for ack in in_flight {
            if let Err(e) = ack.await {
                failure.get_or_insert_with(|| format!("ack of a chunk: {}", crate::error::chain(&e)));
            }
        }
        match failure {
            Some(f) => {
                let _ = nats::purge_chunks(&self.store, nuid).await;
                Err(f)
            }
            None => Ok((count, sent)),
        }
    }

    async fn publish_meta(&self, key: &str, meta: &serde_json::Value) -> std::result::Result<(), String> {
        let previous = nats::raw_meta(&self.store, key)
            .await
            .ok()
            .flatten()
            .and_then(|v| v.get("nuid").and_then(|n| n.as_str()).map(str::to_string));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        let published = match self
            .store
            .js
            .publish_with_headers(
                nats::meta_subject(&self.store.bucket, key),
                headers,
                Bytes::from(meta.to_string()),
            )
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| crate::error::chain(&e)),
            Err(e) => Err(crate::error::chain(&e)),
        };
        published?;
        // The previous version's chunks are unreachable now.
        let ours = meta.get("nuid").and_then(|n| n.as_str());
        if let Some(old) = previous.filter(|o| Some(o.as_str()) != ours) {
            let _ = nats::purge_chunks(&self.store, &old).await;
        }
        Ok(())
    }
}

/// The server's Redis.
pub struct Redis(pub RedisTarget);

#[async_trait]
impl Cache for Redis {
    fn display(&self) -> String {
        self.0.display()
    }
    async fn get(&self, keys: &[String], timeout: Duration) -> std::result::Result<Vec<Option<Vec<u8>>>, String> {
        cache::get(&self.0, keys, timeout).await
    }
    async fn del(&self, keys: &[String], timeout: Duration) -> std::result::Result<u64, String> {
        cache::del(&self.0, keys, timeout).await
    }
}
