//! See mod.rs.
use super::{AgentConfig, Host};
use crate::doctor::Finding;

pub(super) async fn check(_cfg: &AgentConfig, _host: &Host, _out: &mut Vec<Finding>) {}
