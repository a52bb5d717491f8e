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
        let target = format!("script:{}", self.script);
        ::log::log!(target: &target, level, "{}", self.redact(&message));
    }
}
