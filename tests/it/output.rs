//! Issue 15: how results leave the process. A reader that went away (`| head -1`) is not a
//! failure: the command's own exit code stands, with no panic and no message. Any other failure
//! to write stdout (a full disk) exits 7 with one line saying so.

use crate::harness::bkbundle;
use crate::pack::{demo_bundle, run, Run};
use std::fs::File;
use std::process::{Command, Stdio};

/// `bkbundle ARGS` with stdout on `/dev/full` (every write fails with ENOSPC).
fn to_dev_full(args: &[&str]) -> Run {
    let full = File::options().write(true).open("/dev/full").expect("open /dev/full");
    run(bkbundle().args(args).stdout(full))
}

/// `bkbundle ARGS` with stdout a pipe whose reading end is already closed (every write fails
/// with EPIPE), as after `| head -1` has read its line.
fn to_closed_pipe(args: &[&str]) -> Run {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    run(bkbundle().args(args).stdout(writer))
}

fn assert_stdout_failure(r: &Run) {
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "one line:\n{}", r.stderr);
    assert!(
        r.stderr
            .starts_with("error: cannot write the output to stdout: No space left on device")
            && r.stderr.contains("hint: free space where stdout goes"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_full_disk_behind_stdout_exits_7_naming_stdout() {
    assert_stdout_failure(&to_dev_full(&["completions", "bash"]));
    assert_stdout_failure(&to_dev_full(&["inspect", demo_bundle().to_str().unwrap(), "--json"]));
    assert_stdout_failure(&to_dev_full(&["verify", demo_bundle().to_str().unwrap()]));
}

#[test]
fn a_closed_pipe_keeps_the_commands_own_exit_code() {
    for args in [
        &["completions", "bash"][..],
        &["inspect", demo_bundle().to_str().unwrap(), "--json"],
    ] {
        let r = to_closed_pipe(args);
        assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{args:?}");
    }
    // An error keeps its code too, and its text on stderr.
    let missing = ["verify", "/nonexistent/bundle.bkb", "--json"];
    let normal = run(bkbundle().args(missing).stdout(Stdio::piped()));
    assert!(normal.code > 1, "{}", normal.stderr);
    let r = to_closed_pipe(&missing);
    assert_eq!(r.code, normal.code, "{}", r.stderr);
    assert_eq!(r.stderr, normal.stderr);
}

#[test]
fn head_of_a_pipe_is_success() {
    let script = format!(
        "set -o pipefail; {} inspect {} | head -1 >/dev/null",
        env!("CARGO_BIN_EXE_bkbundle"),
        demo_bundle().display()
    );
    let r = run(Command::new("bash").args(["-c", &script]));
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{}", r.stderr);
}
