//! The runner's log: plain lines on stderr, quiet by default.
//!
//! Under cron everything printed is mailed, so a successful run prints
//! nothing: the default level shows warnings and errors only, `-v` adds
//! progress (`info`), `-vv` adds every policy decision (`debug`).

use std::io::Write;
use std::sync::OnceLock;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLog {
    level: LevelFilter,
}

static LOGGER: OnceLock<StderrLog> = OnceLock::new();

/// Installs the logger; `verbosity` is the number of `-v` flags.
pub fn init(verbosity: u8) {
    let level = match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    let logger = LOGGER.get_or_init(|| StderrLog { level });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

impl Log for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // Wasmtime's and Cranelift's own chatter only at -vvv.
        let ours = metadata.target().starts_with("offsite") || metadata.target().starts_with("script");
        metadata.level() <= self.level && (ours || self.level >= LevelFilter::Trace)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let who = record.target().strip_prefix("script:").unwrap_or("offsite");
        let level = match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            Level::Info => "",
            Level::Debug => "debug: ",
            Level::Trace => "trace: ",
        };
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{who}: {level}{}", record.args());
    }

    fn flush(&self) {}
}
