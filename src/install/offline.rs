//! The offline guarantee of a compose stack: every service runs an image the bundle carries (or
//! the engine already has), none is built, none is pulled. Checked by `pack` on the recipe's
//! compose file and by install's preflight on compose's own rendering of it (`config`); compose is
//! then started with pulling and building turned off ([`super::compose::Compose::up`]).

use std::collections::BTreeMap;

/// What the offline check needs of one compose service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub image: Option<String>,
    pub build: bool,
    pub pull_policy: Option<String>,
}

/// The services of a compose file (raw or as `compose config` prints it).
pub fn services(yaml: &str) -> Result<Vec<ServiceSpec>, String> {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
    let Some(services) = doc.get("services").and_then(|s| s.as_mapping()) else {
        return Ok(vec![]);
    };
    let text = |v: &serde_yaml_ng::Value| match v {
        serde_yaml_ng::Value::String(s) => Some(s.clone()),
        serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    Ok(services
        .iter()
        .map(|(name, svc)| ServiceSpec {
            name: name.as_str().unwrap_or("").to_string(),
            image: svc.get("image").and_then(text),
            build: svc.get("build").is_some_and(|b| !b.is_null()),
            pull_policy: svc.get("pull_policy").and_then(text),
        })
        .collect())
}

/// The one spelling of an image reference that `docker` treats alike: `redis:5`,
/// `docker.io/library/redis:5` and `index.docker.io/library/redis:5` are one image; no tag means
/// `latest`.
pub fn normalize_ref(r: &str) -> String {
    let r = r.trim();
    let r = r
        .strip_prefix("docker.io/")
        .or_else(|| r.strip_prefix("index.docker.io/"))
        .unwrap_or(r);
    let r = r.strip_prefix("library/").unwrap_or(r);
    let last = r.rsplit('/').next().unwrap_or(r);
    if last.contains(':') || last.contains('@') {
        r.to_string()
    } else {
        format!("{r}:latest")
    }
}

/// A pull policy that lets compose reach a registry.
fn pulls(policy: &str) -> bool {
    !matches!(policy, "never" | "missing" | "if_not_present")
}

/// One problem of a service, with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub message: String,
    pub hint: String,
}

/// Every way `services` would make compose build or pull; `has_image` says whether an image
/// reference is available offline (in the bundle, or in the engine).
pub fn problems(services: &[ServiceSpec], has_image: &dyn Fn(&str) -> bool) -> Vec<Problem> {
    let mut out = Vec::new();
    for s in services {
        if s.build {
            out.push(Problem {
                message: format!(
                    "service {} has `build:`; compose would build it on the offline host (fetching its base images and packages)",
                    s.name
                ),
                hint: "build the image on the connected machine, add it to the recipe's [[images]], and give the service `image:` instead of `build:`".into(),
            });
        }
        if let Some(p) = s.pull_policy.as_deref().filter(|p| pulls(p)) {
            out.push(Problem {
                message: format!(
                    "service {} has `pull_policy: {p}`; compose would pull its image from a registry",
                    s.name
                ),
                hint: "remove pull_policy from the service (or set it to `missing` or `never`)".into(),
            });
        }
        match &s.image {
            None if !s.build => out.push(Problem {
                message: format!("service {} has no `image:`", s.name),
                hint: "give every service an `image:` that the recipe packs".into(),
            }),
            Some(i) if !has_image(i) => out.push(Problem {
                message: format!(
                    "service {} uses image {i}, which the bundle does not carry; compose would pull it",
                    s.name
                ),
                hint: format!(
                    "add `[[images]] ref = \"{i}\"` to the recipe (or correct the service's image to one the recipe packs) and pack again"
                ),
            }),
            _ => {}
        }
    }
    out
}

/// `KEY=VALUE` lines of an env template (comments and blanks skipped, quotes removed).
pub fn template_values(template: &str) -> BTreeMap<String, String> {
    template
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("export ").unwrap_or(l).split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// Compose's variable substitution (`$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
/// `${VAR:?err}`, `$$`) with `vars`; the names left unresolved are the error.
pub fn interpolate(s: &str, vars: &BTreeMap<String, String>) -> Result<String, Vec<String>> {
    let mut out = String::new();
    let mut missing = Vec::new();
    let mut rest = s;
    let resolvable = |v: &str| !v.contains('$') && !v.contains("__GENERATE");
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(a) = after.strip_prefix('{') {
            let Some(end) = a.find('}') else {
                missing.push(a.to_string());
                rest = "";
                break;
            };
            let inner = &a[..end];
            let (name, op, default) = match inner.find([':', '-', '?']) {
                Some(k) => {
                    let op_len = if inner[k..].starts_with(":-") || inner[k..].starts_with(":?") {
                        2
                    } else {
                        1
                    };
                    (&inner[..k], &inner[k..k + op_len], Some(&inner[k + op_len..]))
                }
                None => (inner, "", None),
            };
            match vars.get(name).filter(|v| resolvable(v)) {
                Some(v) if !(v.is_empty() && op == ":-") => out.push_str(v),
                _ => match (op, default) {
                    (":-" | "-", Some(d)) => out.push_str(d),
                    _ => missing.push(name.to_string()),
                },
            }
            rest = &a[end + 1..];
        } else {
            let n = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            let name = &after[..n];
            match vars.get(name).filter(|v| resolvable(v)) {
                Some(v) => out.push_str(v),
                None => missing.push(name.to_string()),
            }
            rest = &after[n..];
        }
    }
    out.push_str(rest);
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_like_docker() {
        assert_eq!(normalize_ref("redis"), "redis:latest");
        assert_eq!(normalize_ref("docker.io/library/redis:5"), "redis:5");
        assert_eq!(normalize_ref("library/redis:5"), "redis:5");
        assert_eq!(normalize_ref("registry:5000/a/b"), "registry:5000/a/b:latest");
        assert_eq!(normalize_ref("a/b@sha256:00"), "a/b@sha256:00");
    }

    #[test]
    fn build_pull_and_foreign_images_are_problems() {
        let yaml = "services:\n  a:\n    image: x/a:1\n  b:\n    build: ./b\n    image: x/b:1\n  c:\n    image: x/c:1\n    pull_policy: always\n  d:\n    image: redis\n  e:\n    image: x/e:1\n    pull_policy: missing\n";
        let s = services(yaml).unwrap();
        let have = |i: &str| ["x/a:1", "x/b:1", "x/c:1", "x/e:1"].contains(&normalize_ref(i).as_str());
        let p: Vec<String> = problems(&s, &have).into_iter().map(|p| p.message).collect();
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("service b has `build:`"), "{p:?}");
        assert!(p[1].starts_with("service c has `pull_policy: always`"), "{p:?}");
        assert!(
            p[2].starts_with("service d uses image redis, which the bundle does not carry"),
            "{p:?}"
        );
    }

    #[test]
    fn interpolation_follows_compose() {
        let vars = template_values("# c\nTAG=1.2\nEMPTY=\nGEN=__GENERATE__\nQ=\"q\"\n");
        assert_eq!(interpolate("a:${TAG}", &vars).unwrap(), "a:1.2");
        assert_eq!(interpolate("a:$TAG-x", &vars).unwrap(), "a:1.2-x");
        assert_eq!(interpolate("a:${NOPE:-3}", &vars).unwrap(), "a:3");
        assert_eq!(interpolate("a:${EMPTY:-3}", &vars).unwrap(), "a:3");
        assert_eq!(interpolate("a:${Q}$$", &vars).unwrap(), "a:q$");
        assert_eq!(interpolate("a:${NOPE}:${GEN}", &vars).unwrap_err(), vec!["NOPE", "GEN"]);
    }
}
