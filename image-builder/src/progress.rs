//! Progress for long steps: a spinner on a terminal, plain lines elsewhere
//! (CI logs), and the elapsed time of each step either way.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// One step in progress; finish it with [`Step::done`].
pub struct Step {
    bar: Option<ProgressBar>,
    what: String,
    started: Instant,
}

impl Step {
    pub fn start(what: impl Into<String>) -> Self {
        let what = what.into();
        let bar = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .expect("valid template"),
            );
            bar.set_message(what.clone());
            bar.enable_steady_tick(Duration::from_millis(100));
            Some(bar)
        } else {
            eprintln!("  ... {what}");
            None
        };
        Self {
            bar,
            what,
            started: Instant::now(),
        }
    }

    /// Ends the step, printing `result` beside its name.
    pub fn done(self, result: &str) {
        let line = format!(
            "  ok  {} ({:.1} s){}",
            self.what,
            self.started.elapsed().as_secs_f64(),
            suffix(result)
        );
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        eprintln!("{line}");
    }

    /// Ends the step as failed.
    pub fn failed(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        eprintln!("  FAILED {}", self.what);
    }
}

fn suffix(result: &str) -> String {
    if result.is_empty() {
        String::new()
    } else {
        format!(": {result}")
    }
}
