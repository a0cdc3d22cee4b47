//! bkbundle's integration tests: one test binary (`cargo test --test it`), so the helpers in
//! [`harness`] are compiled once and shared. The tests run against the real things: the host's
//! Docker engine, a throwaway PostgreSQL cluster and a throwaway `nats-server -js`, each started on
//! free loopback ports. A missing prerequisite fails the test with the command that installs it
//! (`scripts/setup.sh`); nothing is skipped silently.

mod agent;
mod agent_doctor;
mod backup;
mod backup_objects;
mod backup_pg;
mod backup_upgrade;
mod concurrency;
mod delta;
mod demo_images;
mod doctor;
mod doctor_releases;
mod fixtures;
mod hardening;
mod hardening_install;
mod harness;
mod harness_smoke;
mod images_from;
mod install;
mod output;
mod pack;
mod pack_remote;
mod packages;
mod push;
mod regions;
mod schema;
mod tls;
