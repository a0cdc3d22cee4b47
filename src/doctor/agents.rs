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
    let mut by_region: BTreeMap<(i64, String), Vec<String>> = BTreeMap::new();
    for a in silent {
        by_region.entry((a.region_id, a.region)).or_default().push(format!(
            "task {} installed {} at {} UTC: status success, no node with that IP ever registered",
            a.task_id, a.ip, a.updated_at
        ));
    }
    for ((id, name), hosts) in by_region {
        let f = ctx.add(
            "agents",
            Severity::Error,
            format!("region {name:?} (id {id}) agents"),
            format!("{} agent(s) installed successfully but never appeared", hosts.len()),
        );
        for h in hosts {
            f.evidence(h);
        }
        f.fix(format!(
            "check region {name:?}'s NODE_SERVER_URL and NATS_SERVERS (findings above); on an agent host: the sidecar's log and `curl -v <NODE_SERVER_URL>`"
        ));
    }
}
