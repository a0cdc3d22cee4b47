//! bkbundle: pack BK-Lite into one verified offline bundle and install it on an air-gapped host.
//!
//! Each command is one module with one entry point taking plain options and returning a report:
//! [`pack::run`], [`verify::run`], [`inspect::run`], [`install::run`], [`regions::run`], [`packages::run`], [`doctor::run`]. The
//! bundle format lives in [`bundle`] and [`manifest`] only. External systems sit behind
//! [`engine`]. The library never prints: progress goes through [`progress::Reporter`], results
//! are returned.

pub mod bundle;
pub mod digest;
pub mod doctor;
pub mod engine;
pub mod error;
pub mod inspect;
pub mod install;
pub mod lock;
pub mod logging;
pub mod manifest;
pub mod pack;
pub mod package_check;
pub mod packages;
pub mod platform;
pub mod progress;
pub mod regions;
pub mod report;
pub mod runtime;
pub mod savefile;
pub mod schema;
pub mod sign;
pub mod site;
pub mod verify;

pub use error::{Error, Kind, Result};
