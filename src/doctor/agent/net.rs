//! See mod.rs.
use super::AgentConfig;
use crate::doctor::Finding;

pub(super) async fn server_chain(_cfg: &AgentConfig, _url: &str, _out: &mut Vec<Finding>) {}
