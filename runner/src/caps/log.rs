use ::log::Level as LogLevel;

use super::Caps;
use crate::bindings::log::{Host, Level};
use crate::policy::Call;

impl Host for Caps {
    fn log(&mut self, level: Level, message: String) {
        if self.decide(Call::Log).is_err() {
            return;
        }
        let level = match level {
            Level::Error => LogLevel::Error,
            Level::Warn => LogLevel::Warn,
            Level::Info => LogLevel::Info,
            Level::Debug => LogLevel::Debug,
        };
        // Cut before anything else is done with it (redaction first
        // needs room for a whole secret at the cut), then again after.
        let longest = self.secrets.iter().map(String::len).max().unwrap_or(0);
        let message = crate::text::truncate(&message, crate::logging::MAX_MESSAGE + longest);
        let message = self.redact(&message);
        let target = format!("script:{}", self.script);
        ::log::log!(target: &target, level, "{}", crate::text::truncate(&message, crate::logging::MAX_MESSAGE));
    }
}
