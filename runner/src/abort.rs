//! Stopping a run early, cleanly.
//!
//! SIGTERM or SIGINT (systemd stopping a timer's service, `offsite watch`
//! ending a run past its grace period, Ctrl-C) does not kill `offsite run`
//! outright. It sets one process-wide flag, and everything that can take a
//! while looks at it:
//! - the script itself, at its next epoch tick (10 ms), traps;
//! - a script asleep wakes within 100 ms (crate::sleep) and then traps;
//! - a remote command being read kills its `ssh` and returns an error;
//! - an archive stops between blocks.
//!
//! The run then ends the normal way: unfinished files are deleted with
//! their temporary names, complete ones stay aside, and the manifest says
//! `failed` with the reason.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static REASON: OnceLock<String> = OnceLock::new();

/// Asks everything in this process to stop; the first reason given wins.
pub fn request(reason: &str) {
    let _ = REASON.set(reason.to_string());
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// Why, once a stop was asked for.
pub fn reason() -> Option<&'static str> {
    if requested() { REASON.get().map(String::as_str) } else { None }
}

/// Waits `wait` (a retry's back-off), or less if a stop is asked for
/// meanwhile (noticed within 100 ms). Returns whether it waited it out.
pub fn nap(wait: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + wait;
    while !requested() {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(100)));
    }
    false
}

/// The error message of whatever stopped because of it.
pub fn message() -> String {
    format!("aborted: {}", reason().unwrap_or("stop requested"))
}

/// Turns SIGTERM and SIGINT into [`request`] for the life of the process.
/// A third signal, if the run is still not done, ends the process at once
/// (the next run of the site then recovers what it left).
pub fn on_signals() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut seen = 0;
        for signal in signals.forever() {
            seen += 1;
            let name = if signal == SIGINT { "SIGINT" } else { "SIGTERM" };
            if seen == 1 {
                log::warn!(target: "offsite::run", "received {name}: stopping the run");
            }
            request(&format!("received {name}"));
            if seen >= 3 {
                log::error!(target: "offsite::run", "received {name} a third time: exiting now");
                std::process::exit(128 + signal);
            }
        }
    })?;
    Ok(())
}
