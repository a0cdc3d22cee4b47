//! What every command returns: a report that serializes to `--json` and renders for the
//! operator. The one printer ([`crate::printer`]) prints either, and takes the exit code from it.
//!
//! The commands whose text is their module's `render` get their impl here, next to the trait,
//! so that the command modules stay free of the edge's concerns.

use crate::doctor::DoctorReport;
use crate::install::InstallReport;
use crate::packages::PackagesReport;
use crate::regions::RegionsReport;
use serde::Serialize;

/// A command's result. `Serialize` gives `--json`; [`Report::render`] the text.
pub trait Report: Serialize {
    /// The human rendering (no trailing newline needed).
    fn render(&self) -> String;
    /// The exit code of a command that ran to its end: 0, or
    /// [`crate::error::EXIT_FINDINGS`] when `doctor` found an error it did not repair.
    fn exit_code(&self) -> i32 {
        0
    }
}

impl Report for InstallReport {
    fn render(&self) -> String {
        crate::install::render(self)
    }
}

impl Report for RegionsReport {
    fn render(&self) -> String {
        crate::regions::render(self)
    }
}

impl Report for PackagesReport {
    fn render(&self) -> String {
        crate::packages::render(self)
    }
}

impl Report for DoctorReport {
    fn render(&self) -> String {
        crate::doctor::render(self)
    }
    /// A finding is not a failure of bkbundle: the report is printed as usual, with its own code.
    fn exit_code(&self) -> i32 {
        if self.has_errors() {
            crate::error::EXIT_FINDINGS
        } else {
            0
        }
    }
}

impl Report for crate::backup::take::BackupReport {
    fn render(&self) -> String {
        crate::backup::take::render(self)
    }
}

impl Report for crate::backup::restore::RestoreReport {
    fn render(&self) -> String {
        crate::backup::restore::render(self)
    }
}

impl Report for crate::backup::BackupSummary {
    fn render(&self) -> String {
        crate::backup::render_summary(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doctor_exits_10_only_with_an_error_left() {
        let mut r = DoctorReport::default();
        assert_eq!(r.exit_code(), 0);
        r.warnings = 2;
        assert_eq!(r.exit_code(), 0);
        r.errors = 1;
        assert_eq!(r.exit_code(), crate::error::EXIT_FINDINGS);
        assert_eq!(r.render(), crate::doctor::render(&r));
    }
}
