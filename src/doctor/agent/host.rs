//! See mod.rs.
use super::AgentConfig;
use crate::doctor::Finding;

pub(super) fn check(_cfg: &AgentConfig, _out: &mut Vec<Finding>) {}
