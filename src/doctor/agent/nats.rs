//! See mod.rs.
use super::{AgentConfig, AgentNats};
use crate::doctor::Finding;

pub(super) async fn chain(_cfg: &AgentConfig, _n: &AgentNats, _out: &mut Vec<Finding>) {}
