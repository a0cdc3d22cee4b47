//! See mod.rs.
use super::AgentConfig;
use crate::doctor::Finding;
use std::path::Path;

pub(super) fn read(install_dir: &Path, _out: &mut Vec<Finding>) -> AgentConfig {
    AgentConfig { install_dir: install_dir.to_path_buf(), ..Default::default() }
}
