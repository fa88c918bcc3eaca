//! Progress on a terminal for the long commands (`images`, `verify`, `gc`,
//! and the waiting client commands such as `restore`): drawn on stderr only
//! when stderr is a terminal and the output is not `--json`; nothing
//! otherwise, so scripts and tests see the same output as before.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use supervise::store::Progress;

/// Whether progress may be drawn: stderr is a terminal and not `--json`.
pub fn wanted(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// A byte bar for the store's [`Progress`] hook, one per phase.
#[derive(Default)]
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bar {
    /// A bar if [`wanted`], else `None` (the store stays silent).
    pub fn for_terminal(json: bool) -> Option<Arc<dyn Progress>> {
        wanted(json).then(|| Arc::new(Bar::default()) as Arc<dyn Progress>)
    }
}

impl Progress for Bar {
    fn start(&self, what: &str, total_bytes: u64) {
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        if let Some(old) = self
            .bar
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(bar)
        {
            old.finish_and_clear();
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish_and_clear();
        }
    }
}

/// A spinner with the elapsed time while a client command waits for the
/// supervisor (which does the work and reports only when done); `None`
/// when [`wanted`] is false. Cleared when dropped.
pub struct Spinner(ProgressBar);

impl Spinner {
    pub fn start(message: String) -> Option<Spinner> {
        if !wanted(false) {
            return None;
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(120));
        Some(Spinner(bar))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
