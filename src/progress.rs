//! Progress reporting: bars on a terminal, one plain line per step otherwise
//! (CI logs, the journal), nothing with `--quiet`.

use indicatif::{ProgressBar, ProgressStyle};
use is_terminal::IsTerminal;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bars,
    Lines,
    Quiet,
}

#[derive(Debug, Clone)]
pub struct Progress {
    mode: Mode,
}

impl Progress {
    /// Bars only when stderr is a terminal and CI is not set.
    pub fn detect(quiet: bool) -> Self {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() && std::env::var_os("CI").is_none() {
            Mode::Bars
        } else {
            Mode::Lines
        };
        Progress { mode }
    }

    pub fn quiet() -> Self {
        Progress { mode: Mode::Quiet }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A one-line notice (not an error); suppressed by `--quiet`.
    pub fn note(&self, msg: &str) {
        if self.mode != Mode::Quiet {
            eprintln!("{msg}");
        }
    }

    /// Starts a step. `total` in bytes (or items) when known gives a bar, else a spinner.
    pub fn step(&self, name: &str, total: Option<u64>) -> Step {
        let bar = match self.mode {
            Mode::Bars => {
                let b = match total {
                    Some(t) => {
                        let b = ProgressBar::new(t);
                        b.set_style(
                            ProgressStyle::with_template(
                                "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                            )
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                        );
                        b
                    }
                    None => {
                        let b = ProgressBar::new_spinner();
                        b.set_style(
                            ProgressStyle::with_template("{prefix:>12} {spinner} {msg} {elapsed}")
                                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                        );
                        b.enable_steady_tick(Duration::from_millis(120));
                        b
                    }
                };
                b.set_prefix(name.to_string());
                Some(b)
            }
            Mode::Lines => {
                eprintln!("{name}: started");
                None
            }
            Mode::Quiet => None,
        };
        Step {
            name: name.to_string(),
            bar,
            start: Instant::now(),
            mode: self.mode,
        }
    }
}

pub struct Step {
    name: String,
    bar: Option<ProgressBar>,
    start: Instant,
    mode: Mode,
}

impl Step {
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }
    pub fn set_message(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
        }
    }
    /// Ends the step and returns how long it took.
    pub fn finish(self) -> Duration {
        let d = self.start.elapsed();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        match self.mode {
            Mode::Bars => eprintln!("{:>12} done in {:.1}s", self.name, d.as_secs_f64()),
            Mode::Lines => eprintln!("{}: done in {:.1}s", self.name, d.as_secs_f64()),
            Mode::Quiet => {}
        }
        d
    }
}
