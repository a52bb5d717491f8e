//! Messages in the runner's log, under the script's name. `info` and
//! `debug` show only with `offsite -v`; warnings and errors always show
//! (and so reach cron's mail).

use crate::wit::offsite::backup::log::{Level, log};

/// Logs an error line.
///
/// ```no_run
/// offsite_sdk::log::error("dump of sitedb failed");
/// ```
pub fn error(message: impl AsRef<str>) {
    log(Level::Error, message.as_ref());
}

/// Logs a warning line.
///
/// ```no_run
/// offsite_sdk::log::warn("table cache was empty");
/// ```
pub fn warn(message: impl AsRef<str>) {
    log(Level::Warn, message.as_ref());
}

/// Logs a progress line (shown with `-v`).
///
/// ```no_run
/// offsite_sdk::log::info("archiving beoserver");
/// ```
pub fn info(message: impl AsRef<str>) {
    log(Level::Info, message.as_ref());
}

/// Logs a detail line (shown with `-vv`).
///
/// ```no_run
/// offsite_sdk::log::debug("using pattern %Y%m%d");
/// ```
pub fn debug(message: impl AsRef<str>) {
    log(Level::Debug, message.as_ref());
}

/// `format!`-style [`info`].
///
/// ```no_run
/// offsite_sdk::info!("stored {} bytes", 42);
/// ```
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::info(::std::format!($($arg)*)) };
}

/// `format!`-style [`warn`].
///
/// ```no_run
/// offsite_sdk::warn!("{} files skipped", 3);
/// ```
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::warn(::std::format!($($arg)*)) };
}
