//! The agents check: install tasks that reported success for hosts whose agent never registered
//! a node (the symptom of a region whose env hands agents a server they cannot reach).

use super::{Ctx, Severity};
use crate::ports::{PlatformDb, INSTALLER_TABLES};
use std::collections::BTreeMap;

/// An agent gets this long after its install task succeeded to register before it is "missing".
const AGENT_GRACE_MINUTES: i64 = 10;

pub(super) async fn check(ctx: &mut Ctx<'_>, db: &dyn PlatformDb) {
    let silent = match db.silent_agents(AGENT_GRACE_MINUTES).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            ctx.add(
                "agents",
                Severity::Info,
                "install tasks",
                format!(
                    "not checked: this database has no {} tables (a server without the installer)",
                    INSTALLER_TABLES.join("/")
                ),
            );
            return;
        }
        Err(e) => {
            ctx.add("agents", Severity::Info, "install tasks", format!("not checked: {e}"));
            return;
        }
    };
    let bundle = ctx.bundle_arg();
    let mut by_region: BTreeMap<(i64, String), Vec<(String, String)>> = BTreeMap::new();
    for a in silent {
        let line = format!(
            "task {} installed {} at {} UTC: status success, no node with that IP ever registered",
            a.task_id, a.ip, a.updated_at
        );
        by_region.entry((a.region_id, a.region)).or_default().push((a.ip, line));
    }
    for ((id, name), hosts) in by_region {
        let f = ctx.add(
            "agents",
            Severity::Error,
            format!("region {name:?} (id {id}) agents"),
            format!("{} agent(s) installed successfully but never appeared", hosts.len()),
        );
        let mut ips: Vec<&str> = hosts.iter().map(|(ip, _)| ip.as_str()).collect();
        ips.sort_unstable();
        ips.dedup();
        for (_, line) in &hosts {
            f.evidence(line.clone());
        }
        // The diagnosis of why is on the agent host: the same tool, from the bundle.
        f.fix(format!(
            "check region {name:?}'s NODE_SERVER_URL and NATS_SERVERS (findings above); then on each host ({}) run the agent-side diagnosis: `tar -xf {bundle} bin/bkbundle && scp bin/bkbundle root@HOST:/tmp/ && ssh root@HOST /tmp/bkbundle doctor --agent` (it reads that agent's config and service, and reaches the server and NATS as that host does)",
            ips.join(", ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{answering, diagnose, healthy_db, opts, the};
    use super::super::Severity;
    use crate::ports::fakes::FakeDocker;
    use crate::ports::SilentAgent;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agents_installed_but_never_registered_are_an_error_per_region() {
        let (_server, url) = answering();
        let mut db = healthy_db(&url);
        db.agents = Some(vec![SilentAgent {
            region_id: 1,
            region: "default".into(),
            ip: "10.9.9.9".into(),
            task_id: 7,
            updated_at: "2026-11-29 10:00".into(),
        }]);
        let r = diagnose(&opts(), &FakeDocker::default(), Some(&db), None, None).await;
        let f = the(&r, "agents", Severity::Error, "region \"default\" (id 1) agents");
        assert_eq!(f.message, "1 agent(s) installed successfully but never appeared");
        assert_eq!(
            f.evidence,
            ["task 7 installed 10.9.9.9 at 2026-11-29 10:00 UTC: status success, no node with that IP ever registered"]
        );
        assert!(!f.fixed);
        let fix = f.fix.as_deref().unwrap();
        assert!(
            fix.contains("on each host (10.9.9.9)")
                && fix.contains("tar -xf BUNDLE bin/bkbundle && scp bin/bkbundle root@HOST:/tmp/ && ssh root@HOST /tmp/bkbundle doctor --agent"),
            "{fix}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_without_the_installer_is_not_checked() {
        let (_server, url) = answering();
        let mut db = healthy_db(&url);
        db.agents = None;
        let r = diagnose(&opts(), &FakeDocker::default(), Some(&db), None, None).await;
        let f = the(&r, "agents", Severity::Info, "install tasks");
        assert_eq!(
            f.message,
            "not checked: this database has no node_mgmt_controllertask/node_mgmt_controllertasknode/node_mgmt_node tables (a server without the installer)"
        );
    }
}
