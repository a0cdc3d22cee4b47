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

/// What the field has seen an agent host's sidecar and collectors fail of, by their own log lines
/// (matched case-insensitively, before [`LOG_RULES`], by [`agent_match`]). Kept apart from
/// [`LOG_RULES`]: the same words ("connection refused") mean another thing and another fix on
/// the agent host than in the stack's containers.
pub const AGENT_RULES: &[(&[&str], &str)] = &[
    (
        &["server-url is not valid"],
        "the agent's server_url (sidecar.yml) is not a URL: the region's NODE_SERVER_URL was missing when it was installed; on the platform host `bkbundle regions check` / `bkbundle regions apply`, then reinstall this agent (or correct server_url in sidecar.yml and `systemctl restart bk-sidecar`)",
    ),
    (
        &["certificate signed by unknown authority"],
        "the agent does not trust the certificate it is shown: its CA file (certs/ca.crt, or tls_ca_file in its NATS config) is not the site CA that signed the server's or NATS's certificate; on the platform host `bkbundle init-packages --auto` uploads the controller package with the site CA, then reinstall this agent",
    ),
    (
        &["certificate is not valid for", "certificate is valid for"],
        "the certificate does not cover the name or address the agent connects to: add that address to [tls] names in the install config and re-run `bkbundle install` on the platform host (the certificate is issued again), or connect through a name it covers",
    ),
    (
        &["authorization violation"],
        "NATS refuses the agent's user and password: the credentials in its generated NATS config (or /etc/fusion-collectors/environment) are not the server's; on the platform host `bkbundle regions check` (the region's NATS_* rows), then `systemctl restart bk-sidecar` here so the server sends them again",
    ),
    (
        &["unauthorized", "status code 401", "status: 401", "status=401", "code 401", "code=401", "http 401", "(401)"],
        "the server refuses the agent's API token (401): server_api_token in sidecar.yml is not one the server issued; reinstall this agent from the node manager (it writes a new token)",
    ),
    (
        &["could not resolve host", "no such host", "temporary failure in name resolution", "name or service not known"],
        "this host cannot resolve the server's (or NATS's) name: add it to /etc/hosts or to the DNS server in /etc/resolv.conf, or use its IP address in the region's NODE_SERVER_URL / NATS_SERVERS (`bkbundle regions apply` on the platform host) and reinstall this agent",
    ),
    (
        &["connection timed out after", "i/o timeout", "connect: connection timed out", "context deadline exceeded"],
        "the server's (or NATS's) address does not answer from this host: a firewall drops the traffic, or the address or port is wrong; check the port is open between this host and the platform host (`nc -zv HOST PORT`)",
    ),
    (
        &["connection refused"],
        "nothing accepts connections at the server's (or NATS's) address and port from this host: that service is down, or the port in server_url / nats_urls is wrong",
    ),
];

/// The line an agent host's journal or log explains itself by, with its hint: the rules of
/// [`AGENT_RULES`] first, then [`LOG_RULES`], in order; within a rule the newest (last) line
/// matching it, since an agent that keeps retrying logs the same cause over and over and the
/// last one is the current one.
pub fn agent_match(lines: &[String]) -> Option<(&String, &'static str)> {
    AGENT_RULES.iter().chain(LOG_RULES).find_map(|(needles, hint)| {
        lines.iter().rev().find_map(|l| {
            let lower = l.to_lowercase();
            needles.iter().any(|n| lower.contains(n)).then_some((l, *hint))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn agent_rules_come_first_and_the_newest_line_is_shown() {
        let journal = lines(&[
            "time=\"2024-05-14T11:05:01+08:00\" level=error msg=\"dial tcp 10.0.0.5:8011: connect: connection refused\"",
            "time=\"2024-05-14T11:05:02+08:00\" level=fatal msg=\"Server-url is not valid: parse \\\"null/api/v1/node_mgmt/open_api/node\\\"\"",
            "bk-sidecar.service: main process exited, code=exited, status=1/FAILURE",
            "time=\"2024-05-14T11:05:07+08:00\" level=fatal msg=\"Server-url is not valid: again\"",
        ]);
        let (line, hint) = agent_match(&journal).unwrap();
        assert!(line.ends_with("again\""), "{line}");
        assert!(hint.contains("NODE_SERVER_URL"));
        // The agent's hint for "connection refused", not the containers' one.
        let (_, hint) = agent_match(&journal[..1]).unwrap();
        assert!(hint.contains("server_url / nats_urls"), "{hint}");
        // LOG_RULES after the agent's own.
        let (_, hint) = agent_match(&lines(&["write /opt/x: no space left on device"])).unwrap();
        assert!(hint.contains("disk"));
        assert!(agent_match(&lines(&["level=info msg=\"all good, took 401ms\""])).is_none());
    }

    #[test]
    fn each_agent_message_has_its_rule() {
        for (line, word) in [
            ("curl: (6) Could not resolve host: bk.site.invalid", "resolve"),
            (
                "curl: (28) Connection timed out after 5000 milliseconds",
                "does not answer",
            ),
            ("x509: certificate signed by unknown authority", "site CA"),
            ("x509: certificate is valid for nats.site, not 10.0.0.5", "[tls] names"),
            ("nats: Authorization Violation", "user and password"),
            ("request failed: 401 Unauthorized", "API token"),
            ("dial tcp: lookup bk.site.invalid: no such host", "resolve"),
            ("read tcp 10.0.0.9:51234->10.0.0.5:4222: i/o timeout", "does not answer"),
        ] {
            let (_, hint) = agent_match(&lines(&[line])).unwrap_or_else(|| panic!("{line}"));
            assert!(hint.contains(word), "{line}: {hint}");
        }
    }

    #[test]
    fn log_rules_behave_as_before_for_the_containers() {
        let l = lines(&["dial tcp 10.0.0.5:8011: connect: connection refused"]);
        let (_, hint) = first_match(&l).unwrap();
        assert!(hint.contains("PostgreSQL, NATS, Redis"));
        assert!(hint_for(&l, false).unwrap().contains("PostgreSQL"));
    }
}
