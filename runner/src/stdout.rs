//! Standard output that ends quietly when its reader goes away.
//!
//! `offsite status | head -1` closes the pipe early. Rust ignores SIGPIPE,
//! so a plain `println!` would panic there; the command instead stops
//! writing and finishes as it would have (a run still ends its run and
//! releases its lock), the way `ls | head` ends without a word. Output
//! lost any other way (a full disk) fails the command.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static GONE: AtomicBool = AtomicBool::new(false);
static FAILED: AtomicBool = AtomicBool::new(false);

/// Writes to stdout; once its reader is gone, nothing more is written.
pub fn write(args: std::fmt::Arguments<'_>) {
    if GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.flush()) {
        GONE.store(true, Ordering::Relaxed);
        // A reader that went away ends output quietly; any other failure
        // (a full disk under `> report`) lost what was asked for.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            FAILED.store(true, Ordering::Relaxed);
            eprintln!("offsite: cannot write to standard output: {e}");
        }
    }
}

/// Whether output was lost for another reason than a closed pipe: the
/// command then fails (exit 2) whatever it did otherwise.
pub fn failed() -> bool {
    FAILED.load(Ordering::Relaxed)
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
