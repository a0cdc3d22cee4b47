//! Progress and status lines: the library reports through [`Reporter`]; the one implementation
//! that draws (indicatif) lives here and nowhere else. Bars are hidden when stderr is not a
//! terminal, with `--json`, `--no-progress` or `-q`; status notes go to stderr unless `-q`.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::time::Duration;

pub trait Reporter: Send + Sync {
    /// Start a long step; `total` in bytes when known.
    fn task(&self, label: &str, total: Option<u64>) -> Box<dyn Task>;
    /// A one-line status note for the operator (stderr), e.g. "pulled image X".
    fn note(&self, msg: &str);
}

pub trait Task: Send + Sync {
    fn advance(&self, bytes: u64);
    /// Say what the step is working on now (e.g. which image).
    fn message(&self, _msg: &str) {}
    fn finish(&self);
}

/// A reader that advances `task` by every byte read from `inner`.
pub struct ProgressReader<'a, R> {
    pub inner: R,
    pub task: &'a dyn Task,
}

impl<R: std::io::Read> std::io::Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.task.advance(n as u64);
        Ok(n)
    }
}

/// A writer that advances `task` by every byte written to `inner`.
pub struct ProgressWriter<'a, W> {
    pub inner: W,
    pub task: &'a dyn Task,
}

impl<W: std::io::Write> std::io::Write for ProgressWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.task.advance(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reports nothing: for tests and `--json`-only callers.
pub struct Silent;

struct NoTask;

impl Task for NoTask {
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

impl Reporter for Silent {
    fn task(&self, _: &str, _: Option<u64>) -> Box<dyn Task> {
        Box::new(NoTask)
    }
    fn note(&self, _: &str) {}
}

/// The terminal reporter.
pub struct Terminal {
    multi: MultiProgress,
    bars: bool,
    quiet: bool,
}

impl Terminal {
    /// `bars` is the caller's wish; bars still stay hidden when stderr is not a terminal.
    pub fn new(bars: bool, quiet: bool) -> Self {
        let bars = bars && !quiet && std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if bars {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        Terminal { multi, bars, quiet }
    }
}

struct BarTask(ProgressBar);

impl Task for BarTask {
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn message(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Reporter for Terminal {
    fn task(&self, label: &str, total: Option<u64>) -> Box<dyn Task> {
        if !self.bars {
            return Box::new(NoTask);
        }
        let bar = match total {
            Some(t) => {
                let b = ProgressBar::new(t);
                b.set_style(
                    ProgressStyle::with_template("{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                        .map(|s| s.progress_chars("=> "))
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                b
            }
            None => {
                let b = ProgressBar::new_spinner();
                b.set_style(
                    ProgressStyle::with_template("{spinner} {msg} {bytes} {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                b.enable_steady_tick(Duration::from_millis(200));
                b
            }
        };
        bar.set_message(label.to_string());
        Box::new(BarTask(self.multi.add(bar)))
    }

    fn note(&self, msg: &str) {
        if self.quiet {
            return;
        }
        if self.bars {
            let _ = self.multi.println(msg);
        } else {
            // Not eprintln!, which panics when stderr is gone (`2>&-`, a closed pipe): a note
            // that cannot be shown is not worth failing the command for.
            let _ = writeln!(std::io::stderr().lock(), "{msg}");
        }
    }
}
