//! Progress on a terminal: a live line per transfer (an archive being
//! written, a file being fetched, a command's output being stored) with
//! bytes done, rate, elapsed time, and the total and ETA where the size is
//! known up front. Only for `offsite run` on a terminal: never under cron,
//! in a pipe, under systemd or with `--json`. `NO_COLOR` turns colour off.
//!
//! Log lines are written between redraws ([`suspend`]), so they never mix
//! with a progress line.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

static MULTI: OnceLock<MultiProgress> = OnceLock::new();

/// Shows progress from now on if stderr is a terminal (and not `TERM=dumb`);
/// `wanted` is false for `--json`.
pub fn enable(wanted: bool) {
    use std::io::IsTerminal;
    let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
    if wanted && !dumb && std::io::stderr().is_terminal() {
        let _ = MULTI.set(MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10)));
    }
}

/// Whether progress lines are shown.
pub fn shown() -> bool {
    MULTI.get().is_some()
}

/// Runs `f` (which writes to stderr) with the progress lines cleared, then
/// draws them again.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    match MULTI.get() {
        Some(m) => m.suspend(f),
        None => f(),
    }
}

/// One transfer's line; nothing at all when progress is not shown. It
/// disappears when dropped.
pub struct Bar(Option<ProgressBar>);

impl Bar {
    /// A line labelled `label` (escaped: it may name what a script chose),
    /// with `total` bytes when known.
    pub fn new(label: &str, total: Option<u64>) -> Bar {
        let Some(multi) = MULTI.get() else { return Bar(None) };
        let colour = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let (spin, rate) = if colour {
            ("{spinner:.green}", "{binary_bytes_per_sec:.cyan}")
        } else {
            ("{spinner}", "{binary_bytes_per_sec}")
        };
        let template = match total {
            Some(_) => {
                format!("{spin} {{prefix}} {{bytes}}/{{total_bytes}} {rate} {{elapsed}} ETA {{eta}} {{wide_msg}}")
            }
            None => format!("{spin} {{prefix}} {{bytes}} {rate} {{elapsed}} {{wide_msg}}"),
        };
        let style = ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = match total {
            Some(t) => ProgressBar::new(t),
            None => ProgressBar::no_length(),
        };
        let bar = multi.add(bar.with_style(style).with_prefix(crate::text::escape(label).into_owned()));
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar(Some(bar))
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    /// What it is on now (the file being archived), escaped.
    pub fn set_message(&self, message: impl FnOnce() -> String) {
        if let Some(b) = &self.0 {
            b.set_message(Cow::Owned(crate::text::escape(&message()).into_owned()));
        }
    }

    /// Whether a line is drawn (callers skip work only it needs).
    pub fn is_shown(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.finish_and_clear();
            if let Some(m) = MULTI.get() {
                m.remove(&b);
            }
        }
    }
}
