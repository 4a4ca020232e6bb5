//! Progress of long command-line work (training, evaluation, packaging) on stderr: what is being
//! done, how much of it, and the time left. Where stderr is a terminal, an indicatif bar; where it
//! is not (a log file, a container's log), indicatif draws nothing at all, so plain lines take its
//! place: one every [`PLAIN_LINE_EVERY`] and one per milestone (a finished epoch, a scored model).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Positions of the bar: fractions of the whole work in 1/10000.
const STEPS: u64 = 10_000;
/// How often a plain progress line is written where stderr is no terminal.
pub const PLAIN_LINE_EVERY: Duration = Duration::from_secs(30);

pub struct Reporter {
    what: String,
    bar: Option<indicatif::ProgressBar>,
    terminal: bool,
    last_plain_line: Option<Instant>,
    /// When and at which fraction this process's share of the work began (a resumed run starts
    /// part of the way in, and its time left counts only what is still to do).
    began: Option<(Instant, f64)>,
}

impl Reporter {
    /// A reporter for `what` (e.g. `training`), drawing on stderr.
    pub fn new(what: &str) -> Self {
        Self::with_terminal(what, std::io::stderr().is_terminal())
    }

    fn with_terminal(what: &str, terminal: bool) -> Self {
        Self { what: what.to_string(), bar: None, terminal, last_plain_line: None, began: None }
    }

    /// The work stands at `fraction` (0 to 1) of the whole, doing `message`.
    pub fn update(&mut self, fraction: f64, message: &str) {
        let fraction = fraction.clamp(0.0, 1.0);
        let (start, from) = *self.began.get_or_insert((Instant::now(), fraction));
        if !self.terminal {
            if self.last_plain_line.is_none_or(|t| t.elapsed() >= PLAIN_LINE_EVERY) {
                let left = time_left(start.elapsed(), from, fraction).map(|d| format!(" | {} left", human(d))).unwrap_or_default();
                eprintln!("{} {:>3.0}% {message}{left}", self.what, 100.0 * fraction);
                self.last_plain_line = Some(Instant::now());
            }
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::new(STEPS);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {percent:>3}% {msg} | ETA {eta_precise}")
                    .expect("a valid template")
                    .progress_chars("#>."),
            );
            bar.set_prefix(self.what.clone());
            bar.set_position((STEPS as f64 * from) as u64);
            bar.reset_eta();
            bar
        });
        bar.set_message(message.to_string());
        bar.set_position((STEPS as f64 * fraction) as u64);
    }

    /// A line that stays in the log.
    pub fn milestone(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Clears the bar (a finished or stopped run).
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The time left when `fraction` of the work is done, `elapsed` after it stood at `from`: the
/// rate so far, carried to the end. None until there is a rate to go by.
fn time_left(elapsed: Duration, from: f64, fraction: f64) -> Option<Duration> {
    let done = fraction - from;
    (done > 1e-4 && elapsed > Duration::from_millis(500)).then(|| elapsed.mul_f64((1.0 - fraction) / done))
}

/// `1h02m`, `3m05s` or `42s`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_follows_the_rate_of_this_process_alone() {
        // Resumed at 40 %, at 60 % after 10 s: 20 % per 10 s, 40 % to go.
        assert_eq!(time_left(Duration::from_secs(10), 0.4, 0.6), Some(Duration::from_secs(20)));
        assert_eq!(time_left(Duration::from_secs(10), 0.4, 0.4), None, "no rate yet");
        assert_eq!(human(Duration::from_secs(42)), "42s");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
        assert_eq!(human(Duration::from_secs(3725)), "1h02m");
    }
}
