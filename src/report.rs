//! What every command returns: a report that serializes to `--json` and renders for the
//! operator. The one printer (in `main`) prints either, and takes the exit code from it.

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
