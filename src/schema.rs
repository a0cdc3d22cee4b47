//! The shape of a serialised value as sorted `path: type` lines, for snapshot tests: a change of
//! the manifest's format (or of a command's `--json` output) shows in review as a change of a
//! committed file, and the values themselves (digests, times) do not churn it.
//!
//! Paths join object keys with `.` and mark array elements with `[]`; the elements of an array
//! are merged, so a field present in any element is listed once, and a path seen with several
//! types lists them all (`integer|null`). Maps with data as keys (a region's env) list the keys
//! of the value given: snapshot a value with fixed keys.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The environment variable that makes [`compare_snapshot`] rewrite the snapshot instead of
/// comparing with it (`BKBUNDLE_BLESS=1 cargo test`).
pub const BLESS_ENV: &str = "BKBUNDLE_BLESS";

/// `value`'s schema: one `path: type` line per path, sorted, each ending in a newline.
pub fn schema_lines(value: &Value) -> String {
    let mut types: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    walk(value, String::new(), &mut types);
    types
        .into_iter()
        .map(|(path, t)| format!("{path}: {}\n", t.into_iter().collect::<Vec<_>>().join("|")))
        .collect()
}

fn walk(value: &Value, path: String, types: &mut BTreeMap<String, BTreeSet<&'static str>>) {
    let name = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    if !path.is_empty() {
        types.entry(path.clone()).or_default().insert(name(value));
    }
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk(v, child, types);
            }
        }
        Value::Array(items) => {
            for v in items {
                walk(v, format!("{path}[]"), types);
            }
        }
        _ => {}
    }
}

/// Compare `actual` with the snapshot file at `path`; with [`BLESS_ENV`] set to `1`, write it
/// instead. `Err` says what differs and how to accept the change.
pub fn compare_snapshot(path: &Path, actual: &str) -> Result<(), String> {
    if std::env::var(BLESS_ENV).is_ok_and(|v| v == "1") {
        return std::fs::write(path, actual).map_err(|e| format!("cannot write {}: {e}", path.display()));
    }
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    if expected == actual {
        return Ok(());
    }
    let (old, new): (BTreeSet<&str>, BTreeSet<&str>) = (expected.lines().collect(), actual.lines().collect());
    let mut diff = String::new();
    for l in old.difference(&new) {
        diff.push_str(&format!("\n  - {l}"));
    }
    for l in new.difference(&old) {
        diff.push_str(&format!("\n  + {l}"));
    }
    Err(format!(
        "{} differs from the schema now produced:{diff}\nif the change is intended, run the test again with {BLESS_ENV}=1 and commit the file",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_merge_their_elements_and_types_join() {
        let v = serde_json::json!({
            "a": 1,
            "b": [{"x": "s"}, {"y": true, "x": null}],
            "c": {"d": 1.5, "e": []},
        });
        assert_eq!(
            schema_lines(&v),
            "a: integer\nb: array\nb[]: object\nb[].x: null|string\nb[].y: boolean\nc: object\nc.d: number\nc.e: array\n"
        );
    }
}
