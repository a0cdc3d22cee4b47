//! bkbundle: pack BK-Lite into one verified offline bundle and install it on an air-gapped host.
//!
//! Every command has one shape: a module with one entry point,
//! `run(&Options, &dyn progress::Reporter) -> Result<Report>` ([`pack::run`], [`verify::run`],
//! [`inspect::run`], [`install::run`], [`regions::run`], [`packages::run`], [`doctor::run`]),
//! whose report implements [`report::Report`] (`--json` and text), printed by the binary through
//! the one [`printer`]. Commands get a bundle only from [`bundle::open_verified`] (loading means
//! verifying); its layout lives in [`bundle`] and [`manifest`] only. The systems a command reaches
//! (the Docker engine, the platform's database, the object store, the server's cache) sit behind
//! the small traits of [`ports`], connected once per run and passed down, with in-memory fakes
//! for unit tests. The library never prints.

pub mod backup;
pub mod bundle;
pub mod delta;
pub mod digest;
pub mod doctor;
pub mod engine;
pub mod error;
pub mod inspect;
pub mod install;
pub mod lock;
pub mod logging;
pub mod manifest;
pub mod merge;
pub mod pack;
pub mod package_check;
pub mod packages;
pub mod platform;
pub mod portable;
pub mod ports;
pub mod printer;
pub mod progress;
pub mod regions;
pub mod registry;
pub mod report;
pub mod runtime;
pub mod savefile;
pub mod schema;
pub mod sign;
pub mod site;
pub mod tls;
pub mod verify;

pub use error::{Error, Kind, Result};
