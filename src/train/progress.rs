//! What a run shows while it trains. On a terminal: a progress bar. Anywhere else (a script,
//! CI, `nohup`), where a bar would hide itself and the run would say nothing for an hour: a
//! plain line every `log_every` steps or 30 seconds, whichever comes first, and at the last
//! step — as Hugging Face's Trainer logs.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Longest silence between two plain lines.
const LINE_INTERVAL: Duration = Duration::from_secs(30);

enum Mode {
    /// `--quiet`: nothing.
    Hidden,
    Bar(indicatif::ProgressBar),
    Lines {
        every: usize,
        last_line: Instant,
    },
}

/// The bar or the plain lines, and what both show: smoothed tokens/s, elapsed time, ETA.
pub struct Progress {
    mode: Mode,
    total: usize,
    /// Where this session started (a resume starts past 0) and when, for the ETA.
    first_step: usize,
    started: Instant,
    recent_tok_s: f64,
}

impl Progress {
    /// A bar when `show` and stderr is a terminal, plain lines every `every` steps when `show`
    /// and it is not, nothing otherwise. `at` is the step the run starts from.
    pub fn new(total: usize, at: usize, show: bool, every: usize) -> Self {
        let mode = if !show {
            Mode::Hidden
        } else if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len} {msg} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_position(at as u64);
            Mode::Bar(bar)
        } else {
            Mode::Lines {
                every,
                last_line: Instant::now(),
            }
        };
        Self {
            mode,
            total,
            first_step: at,
            started: Instant::now(),
            recent_tok_s: 0.0,
        }
    }

    /// The step count changed (a time budget was fitted).
    pub fn set_total(&mut self, total: usize) {
        self.total = total;
        if let Mode::Bar(bar) = &self.mode {
            bar.set_length(total as u64);
        }
    }

    /// Reports a finished step.
    pub fn step(&mut self, step: usize, loss: f64, lr: f64, tok_s: f64, val: Option<f64>) {
        self.recent_tok_s = if self.recent_tok_s == 0.0 {
            tok_s
        } else {
            0.8 * self.recent_tok_s + 0.2 * tok_s
        };
        let elapsed = self.started.elapsed();
        let val = val.map_or(String::new(), |v| format!(" val {v:.4}"));
        match &mut self.mode {
            Mode::Hidden => {}
            Mode::Bar(bar) => {
                bar.set_position(step as u64);
                bar.set_message(format!(
                    "loss {loss:.4}{val} lr {lr:.2e} {:.0} tok/s",
                    self.recent_tok_s
                ));
            }
            Mode::Lines { every, last_line } => {
                let due = step == self.total
                    || step == self.first_step + 1
                    || (*every > 0 && step.is_multiple_of(*every))
                    || last_line.elapsed() >= LINE_INTERVAL;
                if due {
                    *last_line = Instant::now();
                    let done = step.saturating_sub(self.first_step).max(1);
                    let left = self.total.saturating_sub(step);
                    let eta = elapsed.as_secs_f64() / done as f64 * left as f64;
                    eprintln!(
                        "step {step}/{} loss {loss:.4}{val} lr {lr:.2e} {:.0} tok/s elapsed {} ETA {}",
                        self.total,
                        self.recent_tok_s,
                        clock(elapsed.as_secs_f64()),
                        clock(eta)
                    );
                }
            }
        }
    }

    /// A message between progress updates (above the bar on a terminal).
    pub fn println(&self, msg: String) {
        match &self.mode {
            Mode::Hidden => {}
            Mode::Bar(bar) => bar.println(msg),
            Mode::Lines { .. } => eprintln!("{msg}"),
        }
    }

    pub fn finish(&self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish();
        }
    }
}

/// Seconds as `1h02m03s`, `2m05s` or `12s`.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::clock;

    #[test]
    fn clock_reads_like_a_clock() {
        assert_eq!(clock(0.2), "0s");
        assert_eq!(clock(59.6), "1m00s");
        assert_eq!(clock(125.0), "2m05s");
        assert_eq!(clock(3723.0), "1h02m03s");
    }
}
