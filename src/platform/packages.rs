//! Agent packages on the platform: where their objects are (bucket and key layout, by release),
//! their digests as the object store writes them, and their `node_mgmt_packageversion` rows.
//!
//! The key layout (BKLITE.md, "Package object key"): releases whose `packageversion` has
//! `cpu_architecture` read `{os}/{arch}/{object}/{version}/{name}` (first); earlier ones only
//! `{os}/{object}/{version}/{name}`. So the arch key is written exactly when the column exists.

use super::db::{db_err, DbError, DbTarget};
use super::release::{Release, PACKAGE_TABLE};
use base64::Engine as _;
use std::collections::BTreeMap;
use tokio_postgres::GenericClient;

/// The object store bucket: the site's `NATS_NAMESPACE` (the server's setting), else the default
/// of the database's release (`bk_lite` before 2026, `bklite` since), else `bklite`.
pub fn bucket(site: &BTreeMap<String, String>, release: Option<&Release>) -> (String, &'static str) {
    if let Some(ns) = site.get("NATS_NAMESPACE").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        return (ns.to_string(), "NATS_NAMESPACE of the stack");
    }
    match release {
        Some(r) => (r.default_bucket().to_string(), "the default of the platform's release"),
        None => ("bklite".to_string(), "the default of current releases"),
    }
}

/// The object key of a package: with the architecture exactly when the release's rows have one.
pub fn object_key(release: &Release, os: &str, arch: &str, object: &str, version: &str, name: &str) -> String {
    if release.has_package_arch() {
        arch_key(os, arch, object, version, name)
    } else {
        plain_key(os, object, version, name)
    }
}

/// The object key of a controller installer program (BKLITE.md): `installer/{os}/{arch}/{file}`
/// (an empty arch is `generic`) on releases from 2026-04-27, which are the ones whose package rows
/// have an architecture (migration 0032, the same day); `installer/{os}/{file}` before. Releases
/// older than 2026-04-08 read no installer at all: the key without arch is harmless there.
pub fn installer_key(release: &Release, os: &str, arch: &str, file: &str) -> String {
    if release.has_package_arch() {
        let arch = if arch.is_empty() { "generic" } else { arch };
        format!("installer/{os}/{arch}/{file}")
    } else {
        format!("installer/{os}/{file}")
    }
}

fn arch_key(os: &str, arch: &str, object: &str, version: &str, name: &str) -> String {
    let arch = if arch.is_empty() { "generic" } else { arch };
    format!("{os}/{arch}/{object}/{version}/{name}")
}

fn plain_key(os: &str, object: &str, version: &str, name: &str) -> String {
    format!("{os}/{object}/{version}/{name}")
}

/// How many `/`-separated parts a package key has on this release (orphan detection).
pub fn key_depths(release: &Release) -> &'static [usize] {
    if release.has_package_arch() {
        &[4, 5]
    } else {
        &[4]
    }
}

/// The identity of a package row under the release's UNIQUE constraint: two architectures of one
/// (os, object, version) collide where the constraint does not include the architecture.
pub fn row_identity(release: &Release, os: &str, arch: &str, object: &str, version: &str) -> String {
    if release.packages_unique_per_arch() {
        format!("{os}/{arch}/{object}/{version}")
    } else {
        format!("{os}/{object}/{version}")
    }
}

/// `SHA-256=` + URL-safe base64 with padding, as the object store writes it.
pub fn nats_digest(sha: &[u8; 32]) -> String {
    format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(sha))
}

/// The raw SHA-256 of an object info digest (padding or not, URL-safe or standard alphabet).
pub fn parse_digest(d: &str) -> Option<Vec<u8>> {
    let b = d.strip_prefix("SHA-256=").or_else(|| d.strip_prefix("sha-256="))?;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    URL_SAFE
        .decode(b)
        .or_else(|_| URL_SAFE_NO_PAD.decode(b))
        .or_else(|_| STANDARD.decode(b))
        .ok()
        .filter(|v| v.len() == 32)
}

/// One `node_mgmt_packageversion` row (`arch` is empty on releases without the column).
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub os: String,
    pub arch: String,
    pub object: String,
    pub version: String,
    pub name: String,
}

impl Row {
    /// The keys the row's object may be under: the release's layout first, then the plain one
    /// (objects an older release or tool uploaded), as the server looks them up.
    pub fn keys(&self, release: &Release) -> Vec<String> {
        let mut keys = vec![object_key(
            release,
            &self.os,
            &self.arch,
            &self.object,
            &self.version,
            &self.name,
        )];
        if release.has_package_arch() {
            keys.push(plain_key(&self.os, &self.object, &self.version, &self.name));
        }
        keys
    }
}

pub async fn read_rows(client: &impl GenericClient, t: &DbTarget, release: &Release) -> Result<Vec<Row>, DbError> {
    let arch = if release.has_package_arch() {
        "cpu_architecture"
    } else {
        "''::varchar"
    };
    let sql = format!(
        "SELECT id::bigint, os::text, {arch}::text, object::text, version::text, name::text FROM {PACKAGE_TABLE} ORDER BY id"
    );
    let rows = client
        .query(sql.as_str(), &[])
        .await
        .map_err(|e| db_err(t, &format!("reading {PACKAGE_TABLE}"), e))?;
    Ok(rows
        .iter()
        .map(|r| Row {
            id: r.get(0),
            os: r.get(1),
            arch: r.get(2),
            object: r.get(3),
            version: r.get(4),
            name: r.get(5),
        })
        .collect())
}

/// A row to insert.
pub struct NewRow<'a> {
    pub kind: &'a str,
    pub os: &'a str,
    pub arch: &'a str,
    pub object: &'a str,
    pub version: &'a str,
    pub name: &'a str,
    pub description: &'a str,
}

/// Insert a row as the server's upload does (maintainer `system`); `key` names it in errors.
pub async fn insert_row(
    client: &impl GenericClient,
    t: &DbTarget,
    release: &Release,
    r: &NewRow<'_>,
    key: &str,
) -> Result<i64, DbError> {
    let arch = release.has_package_arch();
    let (cols, vals) = if arch { (", cpu_architecture", ", $7") } else { ("", "") };
    let sql = format!(
        "INSERT INTO {PACKAGE_TABLE} (type, os, object, version, name, description, created_at, updated_at, created_by, updated_by, domain, updated_by_domain{cols}) \
         VALUES ($1, $2, $3, $4, $5, $6, now(), now(), 'system', 'system', 'domain.com', 'domain.com'{vals}) RETURNING id::bigint"
    );
    let res = if arch {
        client
            .query_one(
                sql.as_str(),
                &[&r.kind, &r.os, &r.object, &r.version, &r.name, &r.description, &r.arch],
            )
            .await
    } else {
        client
            .query_one(
                sql.as_str(),
                &[&r.kind, &r.os, &r.object, &r.version, &r.name, &r.description],
            )
            .await
    };
    res.map(|row| row.get(0))
        .map_err(|e| db_err(t, &format!("inserting the {PACKAGE_TABLE} row of {key}"), e))
}

/// The upstream overwrite: only `name` and `updated_at` change.
pub async fn update_row_name(
    client: &impl GenericClient,
    t: &DbTarget,
    id: i64,
    name: &str,
    key: &str,
) -> Result<(), DbError> {
    client
        .execute(
            format!("UPDATE {PACKAGE_TABLE} SET name = $1, updated_at = now() WHERE id = $2").as_str(),
            &[&name, &id],
        )
        .await
        .map(|_| ())
        .map_err(|e| db_err(t, &format!("updating the {PACKAGE_TABLE} row of {key}"), e))
}

/// Consistency both ways, from the rows and the bucket's object names: rows whose object is
/// missing under every key the server looks up (the download 404), as `(row id, key)`, and
/// package-shaped objects no row points at. The server's other objects (installers, aliases)
/// live under other prefixes; only keys shaped like package keys are judged.
pub fn consistency(
    rows: &[Row],
    release: &Release,
    names: &std::collections::BTreeSet<String>,
) -> (Vec<(i64, String)>, Vec<String>) {
    let mut missing = Vec::new();
    let mut pointed = std::collections::BTreeSet::new();
    for r in rows {
        let keys = r.keys(release);
        if !keys.iter().any(|k| names.contains(k)) {
            missing.push((r.id, keys[0].clone()));
        }
        pointed.extend(keys);
    }
    let depths = key_depths(release);
    let orphans = names
        .iter()
        .filter(|n| !pointed.contains(*n))
        .filter(|n| depths.contains(&n.split('/').count()) && (n.starts_with("linux/") || n.starts_with("windows/")))
        .cloned()
        .collect();
    (missing, orphans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::release::tests::release;

    #[test]
    fn keys_follow_the_arch_column() {
        let old = release(false, false, false, Some(200));
        let new = release(true, true, true, None);
        assert_eq!(
            object_key(&old, "linux", "x86_64", "Controller", "1.0.0", "a.zip"),
            "linux/Controller/1.0.0/a.zip"
        );
        assert_eq!(
            object_key(&new, "linux", "x86_64", "Controller", "1.0.0", "a.zip"),
            "linux/x86_64/Controller/1.0.0/a.zip"
        );
        assert_eq!(object_key(&new, "linux", "", "C", "1", "a"), "linux/generic/C/1/a");
        assert_eq!(row_identity(&old, "linux", "arm64", "C", "1"), "linux/C/1");
        assert_eq!(row_identity(&new, "linux", "arm64", "C", "1"), "linux/arm64/C/1");
        let site = BTreeMap::from([("NATS_NAMESPACE".to_string(), "ns".to_string())]);
        assert_eq!(bucket(&site, Some(&old)).0, "ns");
        assert_eq!(bucket(&BTreeMap::new(), Some(&old)).0, "bk_lite");
        assert_eq!(bucket(&BTreeMap::new(), Some(&new)).0, "bklite");
    }

    #[test]
    fn digests_round_trip() {
        let sha = [0xfbu8; 32];
        let d = nats_digest(&sha);
        assert!(d.starts_with("SHA-256=") && d.ends_with('=') && d.contains('-'), "{d}");
        assert_eq!(parse_digest(&d).unwrap(), sha.to_vec());
        assert_eq!(parse_digest(d.trim_end_matches('=')).unwrap(), sha.to_vec());
        assert!(parse_digest("MD5=abc").is_none());
    }
}
