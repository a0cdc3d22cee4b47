//! Every object of the site's NATS JetStream object store, read out and written back, streamed
//! and checked by digest.
// TEMPORARY STUB (replaced by the helper's implementation at merge).
use crate::ports::ObjectStore;
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectRecord {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub digest: String,
    pub meta: String,
}
pub enum UploadOutcome {
    Present,
    Sent { bytes: u64 },
}
pub async fn list(_store: &dyn ObjectStore) -> Result<Vec<ObjectRecord>, String> {
    todo!()
}
pub async fn download(
    _store: &dyn ObjectStore,
    _rec: &ObjectRecord,
    _out: &mut (dyn std::io::Write + Send),
) -> Result<u64, String> {
    todo!()
}
pub async fn upload(
    _store: &dyn ObjectStore,
    _rec: &ObjectRecord,
    _input: &mut (dyn std::io::Read + Send),
    _pending: Option<&crate::packages::Pending>,
) -> Result<UploadOutcome, String> {
    todo!()
}
