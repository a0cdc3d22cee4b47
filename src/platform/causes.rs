//! What the field has seen the stack's containers fail of, by the lines they log: the table that
//! install's health wait and `doctor` both match a container's last log lines against.

/// Known causes, matched against a failing service's last log lines (case-insensitive).
pub const LOG_RULES: &[(&[&str], &str)] = &[
    (
        &["pypi.org", "files.pythonhosted.org", "failed to download", "index-url", "uv run", "no solution found when resolving"],
        "the container tries to reach the Python package index, which an offline host cannot: run the venv's python directly instead of `uv run`, or set UV_OFFLINE=1 in the service's environment",
    ),
    (
        &["could not resolve host", "temporary failure in name resolution", "name or service not known", "no such host", "getaddrinfo", "nodename nor servname"],
        "a name does not resolve: on an offline host this usually means the container tries to reach the internet; otherwise check the service names and DNS it uses",
    ),
    (
        &["server-url is not valid"],
        "the region's NODE_SERVER_URL is missing or not a URL: fix it with `bkbundle regions check` / `bkbundle regions apply`",
    ),
    (
        &["password authentication failed"],
        "a password in .env no longer matches what the database was initialised with (its volume keeps the first one): restore the old value in .env",
    ),
    (
        &["address already in use"],
        "a port is taken inside the container or on the host: see which process holds it (`ss -ltnp`)",
    ),
    (
        &["connection refused"],
        "a service it needs (PostgreSQL, NATS, Redis, ...) is not accepting connections yet or at all: check that service above",
    ),
    (&["exec format error"], "the image was built for another CPU architecture than this host's"),
    (&["permission denied"], "a file or volume is not accessible to the container's user: check the ownership of its mounted paths"),
    (&["no space left on device"], "the disk holding Docker's data is full: free space (`docker system df`)"),
];

pub fn hint_for(lines: &[String], oom_killed: bool) -> Option<String> {
    if oom_killed {
        return Some("the container was killed for using too much memory: give the host more memory or lower the service's limits".into());
    }
    let text = lines.join("\n").to_lowercase();
    LOG_RULES
        .iter()
        .find(|(needles, _)| needles.iter().any(|n| text.contains(n)))
        .map(|(_, h)| h.to_string())
}

/// The hint of the first rule (in [`LOG_RULES`] order) that a line matches, with that line: the
/// evidence `doctor` shows.
pub fn first_match(lines: &[String]) -> Option<(&String, &'static str)> {
    LOG_RULES.iter().find_map(|(needles, hint)| {
        lines.iter().find_map(|l| {
            let lower = l.to_lowercase();
            needles.iter().any(|n| lower.contains(n)).then_some((l, *hint))
        })
    })
}
