//! The shape of a JSON document as sorted lines, for snapshot tests of `--json` outputs: a field
//! added, removed, renamed or retyped shows in review as a changed line, while the values (sizes,
//! digests, durations) do not.
//!
//! One line per path and type, `PATH: TYPE`, sorted by path (a path right before the paths inside
//! it), then type:
//! - the root is `.`, an object's field `.a.b`, every element of an array `.a[]` (all elements
//!   merged into one shape), every value of a map `.a{}`;
//! - types are `null`, `boolean`, `integer`, `number` (a number with a fraction or exponent),
//!   `string`, `array`, `object` and `map`; a path seen with several types has a line for each
//!   (an `Option` field that is `null` here and a string there);
//! - an object is a **map** when its keys are data rather than field names: when any key is not
//!   a snake_case name (`HOST_IP`, `sha256:…`, `docker-compose.yml`, an image reference), or when
//!   it has more than [`MAX_FIELDS`] keys. Serde's field names in this crate are all snake_case,
//!   so the rule never turns a struct into a map; a map whose keys happen to be snake_case names
//!   (region names like `default`) still reads as an object, and its keys show in the schema.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

/// The environment variable that makes [`compare_snapshot`] rewrite the snapshot instead of
/// comparing with it (`BKBUNDLE_BLESS=1 cargo test`).
pub const BLESS_ENV: &str = "BKBUNDLE_BLESS";

/// More keys than this and an object is a map: no report struct has that many fields.
pub const MAX_FIELDS: usize = 40;

/// The schema of `v` (see the module documentation), one line per path and type, each ending
/// in a newline.
pub fn schema_lines(v: &Value) -> String {
    let mut lines = BTreeSet::new();
    walk(v, ".", &mut lines);
    lines.into_iter().map(|(path, ty)| format!("{path}: {ty}\n")).collect()
}

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
        "{} differs from what is produced now:{diff}\nif the change is intended, run the test again with {BLESS_ENV}=1 and commit the file",
        path.display()
    ))
}

/// Lines as (path, type), so that a path sorts right before the paths inside it.
type Lines = BTreeSet<(String, &'static str)>;

fn walk(v: &Value, path: &str, lines: &mut Lines) {
    let ty = match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(items) => {
            let inner = child(path, "[]");
            for item in items {
                walk(item, &inner, lines);
            }
            "array"
        }
        Value::Object(fields) if is_map(fields) => {
            let inner = child(path, "{}");
            for value in fields.values() {
                walk(value, &inner, lines);
            }
            "map"
        }
        Value::Object(fields) => {
            for (key, value) in fields {
                walk(value, &child(path, &format!(".{key}")), lines);
            }
            "object"
        }
    };
    lines.insert((path.to_string(), ty));
}

/// `path` extended by `suffix` (`.name`, `[]`, `{}`); the root's `.` is not repeated.
fn child(path: &str, suffix: &str) -> String {
    if path == "." {
        if suffix.starts_with('.') {
            suffix.to_string()
        } else {
            format!(".{suffix}")
        }
    } else {
        format!("{path}{suffix}")
    }
}

fn is_map(fields: &serde_json::Map<String, Value>) -> bool {
    fields.len() > MAX_FIELDS || fields.keys().any(|k| !is_field_name(k))
}

/// A snake_case name: a lower-case letter, then lower-case letters, digits and underscores.
fn is_field_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_arrays_and_maps() {
        let v = json!({
            "bundle": "demo",
            "size": 12,
            "seconds": 1.5,
            "signed_by": null,
            "images": [{"ref": "a", "layers": 2}, {"ref": "b", "layers": 3, "note": "x"}],
            "env": {"HOST_IP": "10.0.0.5", "WEB_PORT": "80"},
            "digests": {"sha256:ab": {"size": 1}},
            "empty": [],
        });
        assert_eq!(
            schema_lines(&v),
            "\
.: object
.bundle: string
.digests: map
.digests{}: object
.digests{}.size: integer
.empty: array
.env: map
.env{}: string
.images: array
.images[]: object
.images[].layers: integer
.images[].note: string
.images[].ref: string
.seconds: number
.signed_by: null
.size: integer
"
        );
    }

    #[test]
    fn values_do_not_change_the_schema_but_types_do() {
        let a = json!({"x": [1, 2], "m": {"A": true}});
        let b = json!({"x": [7], "m": {"B": false, "C": true}});
        assert_eq!(schema_lines(&a), schema_lines(&b));
        let c = json!({"x": ["7"], "m": {"A": true}});
        assert_ne!(schema_lines(&a), schema_lines(&c));
        assert_eq!(
            schema_lines(&json!([[1], null])),
            ".: array\n.[]: array\n.[]: null\n.[][]: integer\n"
        );
    }

    #[test]
    fn many_snake_case_keys_make_a_map() {
        let big: serde_json::Map<String, Value> = (0..=MAX_FIELDS).map(|i| (format!("k{i}"), json!(i))).collect();
        assert_eq!(schema_lines(&Value::Object(big)), ".: map\n.{}: integer\n");
        assert!(is_field_name("already_installed") && is_field_name("x86"));
        assert!(!is_field_name("HOST_IP") && !is_field_name("_x") && !is_field_name("a-b") && !is_field_name(""));
    }
}
