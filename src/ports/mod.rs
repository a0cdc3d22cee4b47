//! The seams between the commands and the systems they reach: one small trait per system, over
//! the calls the commands actually make. A command run connects each system once ([`live`])
//! and passes the connection down; unit tests pass the in-memory fakes of [`fakes`] instead, so
//! the install plan, the regions diff, the packages plan and each doctor check are tested in
//! milliseconds without Docker, PostgreSQL or NATS.
//!
//! - [`Docker`]: images and the stack's containers (the engine).
//! - [`PlatformDb`]: the platform's PostgreSQL, in the platform's own terms (release, regions,
//!   package rows, install tasks), never SQL.
//! - [`ObjectStore`]: one bucket of the JetStream object store.
//! - [`Cache`]: the server's Redis cache.
//!
//! Errors stay the adapters' own ([`DbError`], [`NatsError`], or a message where the caller only
//! reports it), so the commands' messages are the same whichever side of the seam they come from.

pub mod live;

#[cfg(test)]
pub mod fakes;

use crate::engine::{ContainerState, LocalImage};
use crate::error::Result;
use crate::platform::crypto::SecretKey;
use crate::platform::db::{DbError, DbTarget};
use crate::platform::nats::{Inventory, NatsError};
use crate::platform::packages::{NewRow, Row};
use crate::platform::regions::{Current, PlannedRegion};
use crate::platform::release::Release;
use crate::platform::rules::Problem;
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The Docker engine, as planning and diagnosis use it. (Loading and exporting image streams
/// stay on [`crate::engine::Engine`]: they are execution, not decisions.)
#[async_trait]
pub trait Docker: Send + Sync {
    /// The local image `reference` (a reference or an id), `None` when absent.
    async fn image(&self, reference: &str) -> Result<Option<LocalImage>>;
    /// The containers of compose project `project`, any state.
    async fn project_containers(&self, project: &str) -> Result<Vec<ContainerState>>;
    /// A container's environment (`None` when the container is gone). Holds secrets.
    async fn container_env(&self, id: &str) -> Result<Option<BTreeMap<String, String>>>;
    /// The last `lines` lines of a container's log.
    async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>>;
    /// Restart a container, giving it `grace` to stop.
    async fn restart(&self, id: &str, grace: Duration) -> Result<()>;
}

/// How a region-plan function answers: the plan, or every problem that stops it.
pub type RegionPlan = std::result::Result<Vec<PlannedRegion>, Vec<Problem>>;

/// The installer's tables that [`PlatformDb::silent_agents`] reads: a server without them has
/// no install tasks to check.
pub const INSTALLER_TABLES: [&str; 3] = [
    "node_mgmt_controllertask",
    "node_mgmt_controllertasknode",
    "node_mgmt_node",
];

/// An agent install task that reported success for a host that never registered a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SilentAgent {
    pub region_id: i64,
    pub region: String,
    pub ip: String,
    pub task_id: i64,
    /// `YYYY-MM-DD HH:MM` (UTC).
    pub updated_at: String,
}

/// The platform's PostgreSQL, in its own terms. One connection per command run.
#[async_trait]
pub trait PlatformDb: Send + Sync {
    /// Which database (for messages; never the password).
    fn target(&self) -> &DbTarget;
    /// Which release it is (the features bkbundle uses); with `wait`, waits up to that long for
    /// the server's migrations to create the tables.
    async fn release(&self, wait: Option<Duration>) -> std::result::Result<Release, DbError>;
    /// Which release it is, as found: unlike [`PlatformDb::release`], a release whose schema
    /// bkbundle could not write to is returned, not refused (diagnosis only reads).
    async fn detect_release(&self) -> std::result::Result<Release, DbError>;
    /// The regions, their env rows and service rows, read in one snapshot.
    async fn regions(&self, release: &Release) -> std::result::Result<Current, DbError>;
    /// In one transaction: read the regions, ask `plan` what to change, write it (secrets
    /// encrypted with `key`) and commit. Returns the plan as written (created regions' ids filled
    /// in); when `plan` refuses, nothing is written and its problems are returned.
    async fn apply_regions(
        &self,
        release: &Release,
        key: Option<&SecretKey>,
        plan: &(dyn for<'c> Fn(&'c Current) -> RegionPlan + Send + Sync),
    ) -> std::result::Result<RegionPlan, DbError>;
    /// Add region `region_id`'s missing `node_mgmt_cloudregionservice` rows, in one transaction.
    async fn add_region_services(
        &self,
        release: &Release,
        region_id: i64,
        region: &str,
        services: &[&str],
    ) -> std::result::Result<(), DbError>;
    /// Copy `keys` from region 1 into region `region_id` (proxy host substituted), in one
    /// transaction.
    async fn copy_env_from_default(
        &self,
        release: &Release,
        region_id: i64,
        proxy: &str,
        keys: &[String],
    ) -> std::result::Result<(), DbError>;
    /// Django's database cache entries (`cache_key`, decoded pickle) of `keys` that have not
    /// expired (the table exists when `release.cache_table`).
    async fn cached_env(&self, keys: &[String]) -> std::result::Result<Vec<(String, Vec<u8>)>, DbError>;
    /// Remove the database cache entries of these regions; how many went.
    async fn invalidate_cached_env(&self, region_ids: &BTreeSet<i64>) -> std::result::Result<u64, DbError>;
    /// The `node_mgmt_packageversion` rows.
    async fn package_rows(&self, release: &Release) -> std::result::Result<Vec<Row>, DbError>;
    /// Insert a package row for the object at `key`; its id.
    async fn insert_package_row(
        &self,
        release: &Release,
        row: &NewRow<'_>,
        key: &str,
    ) -> std::result::Result<i64, DbError>;
    /// Point row `id` at file `name` (object `key`), as the upstream rule overwrites `latest`.
    async fn update_package_row_name(&self, id: i64, name: &str, key: &str) -> std::result::Result<(), DbError>;
    /// Install tasks older than `grace_minutes` that reported success for an IP that never
    /// registered a node; `None` when the release has no [`INSTALLER_TABLES`].
    async fn silent_agents(&self, grace_minutes: i64) -> std::result::Result<Option<Vec<SilentAgent>>, DbError>;
}

/// One bucket of the JetStream object store, opened (see [`crate::platform::nats::open_store`]).
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// The bucket's name.
    fn bucket(&self) -> &str;
    /// Which server (for messages; never credentials).
    fn server(&self) -> &str;
    /// The largest message the server takes (0 when it does not say).
    fn max_payload(&self) -> usize;
    /// The names of the live objects.
    async fn list(&self) -> std::result::Result<BTreeSet<String>, NatsError>;
    /// The stored digest (`SHA-256=...`) and size of `key`, `None` when absent or deleted.
    async fn info(&self, key: &str) -> std::result::Result<Option<(String, u64)>, String>;
    /// The object's meta message as JSON, `None` when there is none.
    async fn meta(&self, key: &str) -> std::result::Result<Option<serde_json::Value>, String>;
    /// Every object's meta message as JSON, deleted objects' tombstones included and none passed
    /// over (a backup must not silently leave an object out).
    async fn metas(&self) -> std::result::Result<Vec<serde_json::Value>, String>;
    /// Hand the chunks of upload `nuid` to `sink` in order, a few chunks in memory at a time;
    /// the bytes read. An error from `sink` stops the read and is returned.
    async fn read_chunks(
        &self,
        nuid: &str,
        sink: &mut (dyn FnMut(Bytes) -> std::result::Result<(), String> + Send),
    ) -> std::result::Result<u64, String>;
    /// What the stream holds: live objects, and chunk sets no object refers to.
    async fn inventory(&self) -> std::result::Result<Inventory, String>;
    /// Remove the chunks of upload `nuid`; how many messages went.
    async fn purge_chunks(&self, nuid: &str) -> std::result::Result<u64, String>;
    /// Publish the chunks received from `chunks` under upload `nuid` until the channel closes,
    /// with acks pipelined; the number of chunks and bytes sent. On failure the chunks sent are
    /// purged.
    async fn send_chunks(
        &self,
        nuid: &str,
        chunks: &mut tokio::sync::mpsc::Receiver<Bytes>,
    ) -> std::result::Result<(usize, u64), String>;
    /// Publish an object's meta message (replacing the previous version of `key`, whose chunks
    /// are then purged unless they are `meta.nuid`'s).
    async fn publish_meta(&self, key: &str, meta: &serde_json::Value) -> std::result::Result<(), String>;
}

/// The server's Redis cache of the regions' env.
#[async_trait]
pub trait Cache: Send + Sync {
    /// Where (for messages; never the password).
    fn display(&self) -> String;
    /// The values of `keys` (`None` for an absent key).
    async fn get(&self, keys: &[String], timeout: Duration) -> std::result::Result<Vec<Option<Vec<u8>>>, String>;
    /// Delete `keys`; how many existed.
    async fn del(&self, keys: &[String], timeout: Duration) -> std::result::Result<u64, String>;
}
