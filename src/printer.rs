//! The one printer: how a command's result or error leaves the process.
//!
//! Contract (the binary calls nothing else to write stdout):
//! - A result ([`Output`], made from any [`Report`]) is pretty JSON on stdout with `--json`, else
//!   its text; `-q` prints nothing on success. A result without a JSON form (shell completions)
//!   is printed as text whatever the flags.
//! - An error is `error:` and `hint:` lines on stderr; with `--json` also an object on stdout,
//!   `{"error": {"kind", "message", "hints", "problems", "exit_code"}}`. Every string of it passes
//!   through [`redact`] (a message may quote what a library said about a URL).
//! - Stdout is flushed before the exit code is decided, so a failed write is seen. A closed pipe
//!   (`bkbundle inspect B | head -1`) is not a failure: the command's own exit code stands and
//!   nothing more is said. Any other failure (a full disk behind `> file`, EIO) is one line on
//!   stderr naming stdout, the OS error and what to do, and exit code 7 (local I/O), because the
//!   operator's script would otherwise read a truncated result with exit 0.
//! - Stderr failures are ignored: there is nowhere left to report them.
//!
//! Rust ignores SIGPIPE in its programs, so a write into a closed pipe returns `EPIPE` instead
//! of killing the process; `println!` would then panic, which is why output goes through here.
//! The writers are parameters so that the unit tests can hand in failing ones.

use crate::error::{Error, Kind};
use crate::logging::redact;
use crate::report::Report;
use std::io::{self, Write};

/// A command's result with its type erased: what `--json` prints, the text, the exit code.
#[derive(Debug, Clone)]
pub struct Output {
    /// `None`: the result has no JSON form and is printed as text even with `--json` or `-q`.
    pub json: Option<serde_json::Value>,
    /// The human rendering, without its final newline (the printer adds one).
    pub text: String,
    /// The exit code of a command that ran to its end (0, or doctor's findings).
    pub code: i32,
}

impl Output {
    /// The output of a report: its JSON, [`Report::render`] and [`Report::exit_code`].
    pub fn of(report: &impl Report) -> Result<Output, Error> {
        Ok(Output {
            json: Some(to_json(report)?),
            text: report.render(),
            code: report.exit_code(),
        })
    }

    /// A serializable result whose text is rendered by the caller (exit code 0).
    pub fn new(value: &impl serde::Serialize, text: String) -> Result<Output, Error> {
        Ok(Output {
            json: Some(to_json(value)?),
            text,
            code: 0,
        })
    }

    /// Text that is the result itself (shell completions): printed as is, whatever the flags.
    pub fn text(text: String) -> Output {
        Output {
            json: None,
            text,
            code: 0,
        }
    }
}

fn to_json(value: &impl serde::Serialize) -> Result<serde_json::Value, Error> {
    serde_json::to_value(value).map_err(|e| Error::internal(format!("cannot turn the report into JSON: {e}")))
}

/// Prints results and errors for one run of the binary (see the module documentation).
pub struct Printer<O: Write, E: Write> {
    json: bool,
    quiet: bool,
    out: O,
    err: E,
}

impl Printer<io::Stdout, io::Stderr> {
    /// The printer of the process: `--json` and `-q` as given.
    pub fn stdio(json: bool, quiet: bool) -> Self {
        Printer::new(json, quiet, io::stdout(), io::stderr())
    }
}

impl<O: Write, E: Write> Printer<O, E> {
    pub fn new(json: bool, quiet: bool, out: O, err: E) -> Self {
        Printer { json, quiet, out, err }
    }

    /// Print a command's outcome and return the process's exit code.
    pub fn finish(&mut self, outcome: Result<Output, Error>) -> i32 {
        match outcome {
            Ok(output) => self.output(&output),
            Err(e) => self.error(&e),
        }
    }

    /// Print a report (see [`Output::of`]); returns the exit code.
    pub fn report(&mut self, report: &impl Report) -> i32 {
        self.finish(Output::of(report))
    }

    /// Print a result; returns its exit code, or 7 when stdout failed.
    pub fn output(&mut self, output: &Output) -> i32 {
        let written = match &output.json {
            Some(v) if self.json => write_line(&mut self.out, &pretty(v)),
            Some(_) if self.quiet => Ok(()),
            _ => write_line(&mut self.out, &output.text),
        };
        self.settle(output.code, written)
    }

    /// Print an error; returns its exit code. With `--json` its object goes to stdout first;
    /// when that write fails the error's own code stands (stderr still has the message), and
    /// the failure is said on a line of its own.
    pub fn error(&mut self, e: &Error) -> i32 {
        // Messages may quote what a library said about a URL or a connection: never a secret.
        let message = redact(&e.message);
        let hints: Vec<String> = e.hints.iter().map(|h| redact(h)).collect();
        let code = e.kind.exit_code();
        let written = if self.json {
            let problems: Vec<String> = e.problems.iter().map(|p| redact(p)).collect();
            let v = serde_json::json!({
                "error": {
                    "kind": e.kind.name(),
                    "message": message,
                    "hints": hints,
                    "problems": problems,
                    "exit_code": code,
                }
            });
            write_line(&mut self.out, &pretty(&v))
        } else {
            Ok(())
        };
        let mut text = format!("error: {message}\n");
        for h in &hints {
            text.push_str(&format!("hint: {h}\n"));
        }
        if e.kind == Kind::Internal {
            text.push_str("hint: this is a bug in bkbundle; re-run with -v and report the output\n");
        }
        let _ = self.err.write_all(text.as_bytes());
        let _ = self.err.flush();
        // The error's own code stands even when its JSON was lost: stderr has the message.
        self.settle(code, written);
        code
    }

    /// The exit code once the fate of a write to stdout is known (this printer's, or another
    /// writer's such as clap's `--help`): `code` when it succeeded or the reader went away, else
    /// 7 with one line on stderr.
    pub fn settle(&mut self, code: i32, written: io::Result<()>) -> i32 {
        match written {
            Ok(()) => code,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => code,
            Err(e) => {
                let hint = match e.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                        "free space where stdout goes (the file or device it is redirected to), or redirect it elsewhere"
                    }
                    _ => "check where stdout goes (the file, pipe or device it is redirected to) and run again",
                };
                let _ = writeln!(
                    self.err,
                    "error: cannot write the output to stdout: {}; hint: {hint}",
                    redact(&e.to_string())
                );
                let _ = self.err.flush();
                Kind::Io.exit_code()
            }
        }
    }
}

fn pretty(v: &serde_json::Value) -> String {
    // A Value's keys are strings and its numbers finite: serializing it cannot fail.
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// `text` and a newline, flushed: a buffered write's failure shows only at the flush.
fn write_line(out: &mut impl Write, text: &str) -> io::Result<()> {
    out.write_all(text.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stdout that fails every write with `errno`.
    struct Failing(i32);

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(self.0))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A stdout whose failure shows only at the flush, as a buffered one's does.
    struct FailsAtFlush(Vec<u8>);

    impl Write for FailsAtFlush {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
    }

    #[derive(serde::Serialize)]
    struct Found {
        errors: usize,
    }

    impl Report for Found {
        fn render(&self) -> String {
            format!("{} error(s)", self.errors)
        }
        fn exit_code(&self) -> i32 {
            if self.errors > 0 {
                crate::error::EXIT_FINDINGS
            } else {
                0
            }
        }
    }

    fn printed(
        json: bool,
        quiet: bool,
        f: impl FnOnce(&mut Printer<&mut Vec<u8>, &mut Vec<u8>>) -> i32,
    ) -> (i32, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = f(&mut Printer::new(json, quiet, &mut out, &mut err));
        (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    }

    #[test]
    fn a_report_is_text_or_pretty_json_and_keeps_its_exit_code() {
        let r = Found { errors: 2 };
        assert_eq!(
            printed(false, false, |p| p.report(&r)),
            (10, "2 error(s)\n".into(), String::new())
        );
        assert_eq!(
            printed(true, false, |p| p.report(&r)),
            (10, "{\n  \"errors\": 2\n}\n".into(), String::new())
        );
        assert_eq!(
            printed(false, true, |p| p.report(&r)),
            (10, String::new(), String::new())
        );
        // -q with --json still prints the JSON, as it always has.
        assert_eq!(printed(true, true, |p| p.report(&r)).1, "{\n  \"errors\": 2\n}\n");
        // Completions have no JSON form: printed whatever the flags.
        let c = Output::text("complete -F _bkbundle bkbundle".into());
        assert_eq!(
            printed(true, true, |p| p.output(&c)).1,
            "complete -F _bkbundle bkbundle\n"
        );
    }

    #[test]
    fn an_error_is_text_on_stderr_and_with_json_an_object_with_its_problems() {
        crate::logging::register_secret("hunter2-secret");
        let e = Error::all(
            "2 problems",
            vec![
                Error::input("package a: missing"),
                Error::input("cannot reach postgres://u:hunter2-secret@db/x").hint("start it"),
            ],
        );
        let (code, out, err) = printed(false, false, |p| p.error(&e));
        assert_eq!(code, 3);
        assert_eq!(out, "");
        assert_eq!(
            err,
            "error: 2 problems:\n  - package a: missing\n  - cannot reach postgres://u:******@db/x\nhint: start it\n"
        );
        let (code, out, _) = printed(true, false, |p| p.error(&e));
        assert_eq!(code, 3);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"]["kind"], "input");
        assert_eq!(v["error"]["exit_code"], 3);
        assert_eq!(v["error"]["hints"][0], "start it");
        assert_eq!(v["error"]["problems"][0], "package a: missing");
        assert_eq!(v["error"]["problems"][1], "cannot reach postgres://u:******@db/x");
        assert!(!out.contains("hunter2"), "{out}");
        let (_, out, _) = printed(true, false, |p| p.error(&Error::input("one")));
        assert!(out.contains("\"problems\": []"), "{out}");
        let (code, _, err) = printed(false, false, |p| p.error(&Error::internal("oops")));
        assert_eq!(code, 1);
        assert!(err.ends_with("hint: this is a bug in bkbundle; re-run with -v and report the output\n"));
    }

    #[test]
    fn a_closed_pipe_keeps_the_exit_code_and_says_nothing() {
        let mut err = Vec::new();
        let code = Printer::new(false, false, Failing(libc::EPIPE), &mut err).report(&Found { errors: 0 });
        assert_eq!((code, err.as_slice()), (0, &b""[..]));
        let code = Printer::new(true, false, Failing(libc::EPIPE), &mut err).report(&Found { errors: 1 });
        assert_eq!((code, err.as_slice()), (10, &b""[..]));
    }

    #[test]
    fn another_write_failure_exits_7_naming_stdout_and_the_cause() {
        let mut err = Vec::new();
        let code = Printer::new(true, false, Failing(libc::ENOSPC), &mut err).report(&Found { errors: 0 });
        assert_eq!(code, 7);
        let err = String::from_utf8(err).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: cannot write the output to stdout: "), "{err}");
        assert!(
            err.contains("os error 28") && err.contains("free space where stdout goes"),
            "{err}"
        );

        let mut err = Vec::new();
        let code = Printer::new(false, false, FailsAtFlush(Vec::new()), &mut err).report(&Found { errors: 0 });
        assert_eq!(code, 7, "a failure seen only at the flush counts");
        let err = String::from_utf8(err).unwrap();
        assert!(
            err.contains("os error 5") && err.contains("check where stdout goes"),
            "{err}"
        );
    }

    #[test]
    fn a_failed_json_error_keeps_the_errors_own_code() {
        let mut err = Vec::new();
        let code = Printer::new(true, false, Failing(libc::ENOSPC), &mut err).error(&Error::bundle("bad part"));
        assert_eq!(code, 4);
        let err = String::from_utf8(err).unwrap();
        assert!(err.starts_with("error: bad part\n"), "{err}");
        assert!(err.contains("cannot write the output to stdout"), "{err}");
    }
}
