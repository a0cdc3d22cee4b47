//! The stack's own PostgreSQL, dumped and restored with the tools of the image it runs, through
//! the Docker Engine API (exec), streamed.
// TEMPORARY STUB (replaced by the helper's implementation at merge).
use crate::engine::Engine;
use crate::error::Result;
pub struct Database {
    pub name: String,
    pub size_bytes: u64,
    pub tables: u64,
}
pub struct Postgres<'a> {
    _e: &'a Engine,
}
impl<'a> Postgres<'a> {
    pub fn new(engine: &'a Engine, _id: &str, _name: &str, _user: &str, _password: Option<&str>) -> Self {
        Postgres { _e: engine }
    }
    pub async fn server_version(&self) -> Result<String> {
        todo!()
    }
    pub async fn databases(&self) -> Result<Vec<Database>> {
        todo!()
    }
    pub async fn dump(&self, _db: &str, _out: &mut (dyn std::io::Write + Send)) -> Result<u64> {
        todo!()
    }
    pub async fn create_database(&self, _db: &str) -> Result<()> {
        todo!()
    }
    pub async fn drop_database(&self, _db: &str) -> Result<()> {
        todo!()
    }
    pub async fn restore(&self, _db: &str, _input: &mut (dyn std::io::Read + Send)) -> Result<()> {
        todo!()
    }
}
