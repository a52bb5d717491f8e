//! Standard output that ends quietly when its reader goes away.
//!
//! `offsite status | head -1` closes the pipe early. Rust ignores SIGPIPE,
//! so a plain `println!` would panic there; the command instead stops
//! writing and finishes as it would have (a run still ends its run and
//! releases its lock), the way `ls | head` ends without a word.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static GONE: AtomicBool = AtomicBool::new(false);

/// Writes to stdout; once its reader is gone, nothing more is written.
pub fn write(args: std::fmt::Arguments<'_>) {
    if GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.flush()) {
        gone(&e);
    }
}

/// Notes a failed write to stdout: a closed pipe ends output quietly, any
/// other failure is said once on stderr.
pub fn gone(e: &std::io::Error) {
    if !GONE.swap(true, Ordering::Relaxed) && e.kind() != std::io::ErrorKind::BrokenPipe {
        eprintln!("offsite: cannot write to standard output: {e}");
    }
}

/// Whether a write to stdout has failed.
pub fn is_gone() -> bool {
    GONE.load(Ordering::Relaxed)
}

/// `print!` to stdout, quiet when its reader has gone.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::stdout::write(format_args!($($arg)*)) };
}

/// `println!` to stdout, quiet when its reader has gone.
#[macro_export]
macro_rules! outln {
    () => { $crate::stdout::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::stdout::write(format_args!("{}\n", format_args!($($arg)*))) };
}
