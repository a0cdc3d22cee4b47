//! The site's configuration: the install config (`install.toml`, [`config`]), the stack's
//! rendered `.env` ([`envfile`]), and where the site's services are ([`targets`]). Pure data and
//! parsing; the connections themselves are [`crate::platform`]'s.

pub mod config;
pub mod envfile;
pub mod targets;
