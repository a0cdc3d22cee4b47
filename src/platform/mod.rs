//! Everything bkbundle knows about the BK-Lite platform, in one place: its tables and the SQL
//! that reads and writes them, which release a live database is ([`release`]), the region rules
//! ([`rules`]), how secrets are encrypted ([`crypto`]), the object store's keys and bucket
//! ([`packages`]), the server's cache ([`cache`]), the known causes of containers' failures
//! ([`causes`]), and the adapters that reach its services
//! ([`db`], [`nats`], [`cache`]; the Docker engine is [`crate::engine`]).
//!
//! The commands (`install`, `regions`, `packages`, `doctor`) sit above this module and
//! [`crate::site`] (where the services are), and depend on nothing sideways. Each adapter has its
//! own error type.

pub mod cache;
pub mod causes;
pub mod crypto;
pub mod db;
pub mod nats;
pub mod packages;
pub mod regions;
pub mod release;
pub mod rules;
