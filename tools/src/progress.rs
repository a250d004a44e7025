//! Progress bars for long work (replay, conversion, checksum verification), drawn with
//! indicatif on stderr, and only when stderr is a terminal: SPEC section 7 asks for progress
//! on a terminal and quiet otherwise, so a bar is hidden (every call a no-op) when stderr is
//! redirected to a file or a pipe.
//!
//! A bar counts bytes of input against a known total (the bar, the byte counts and the ETA);
//! a bar with events also shows the events so far and their rate.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar over `total` bytes. Cheap to update (indicatif limits redraws to 20 a
/// second); clone it to share it between threads.
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
    start: Instant,
}

impl Progress {
    /// A bar labelled `what`, over `total` bytes, counting events too if `events`. Hidden
    /// unless stderr is a terminal.
    pub fn new(what: &str, total: u64, events: bool) -> Progress {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        // The bar takes the width the rest leaves on the terminal's line.
        let template = if events {
            "{prefix} [{wide_bar}] {bytes}/{total_bytes}, {msg}, ETA {eta}"
        } else {
            "{prefix} [{wide_bar}] {bytes}/{total_bytes}, {bytes_per_sec}, ETA {eta}"
        };
        let style = ProgressStyle::with_template(template)
            .expect("a valid template")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(what.to_string());
        Progress {
            bar,
            start: Instant::now(),
        }
    }

    /// Whether the bar is drawn (stderr is a terminal).
    pub fn is_drawn(&self) -> bool {
        !self.bar.is_hidden()
    }

    /// Sets the bytes done.
    pub fn set_bytes(&self, bytes: u64) {
        self.bar.set_position(bytes);
    }

    /// Sets the bytes and the events done; the rate is the events over the time since the
    /// bar was made.
    pub fn set(&self, bytes: u64, events: u64) {
        if self.bar.is_hidden() {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        self.bar.set_message(format!(
            "{} events ({}/s)",
            HumanCount(events),
            HumanCount((events as f64 / secs) as u64)
        ));
        self.bar.set_position(bytes);
    }

    /// Removes the bar from the terminal (the caller prints its own summary).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
