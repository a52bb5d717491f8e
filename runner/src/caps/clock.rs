use std::fmt::Write as _;
use std::time::SystemTime;

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, Local, Utc};

use super::{Caps, epoch_parts};
use crate::bindings::clock::{Host, Instant, Zone};
use crate::bindings::types::Error;
use crate::policy::Call;

/// Where "now" comes from.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    System,
    /// `--now`: every reading returns this instant.
    Pinned(SystemTime),
}

impl Clock {
    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Pinned(t) => *t,
        }
    }
}

impl Host for Caps {
    fn now(&mut self) -> Instant {
        let _ = self.decide(Call::ClockNow);
        let (seconds, nanoseconds) = epoch_parts(self.clock.now());
        Instant { seconds, nanoseconds }
    }

    fn format(&mut self, when: Instant, pattern: String, tz: Zone) -> Result<String, Error> {
        let before = self.denials;
        let result = (|| {
            self.decide(Call::ClockFormat)?;
            format_instant(when, &pattern, tz)
        })();
        self.noted("clock.format", before, result)
    }
}

/// strftime-style formatting; an unknown directive is `invalid-argument`
/// rather than a panic or a silently mangled name.
pub fn format_instant(when: Instant, pattern: &str, tz: Zone) -> Result<String, Error> {
    if pattern.len() > 1024 {
        return Err(Error::InvalidArgument("time format pattern is longer than 1024 bytes".into()));
    }
    let items: Vec<Item<'_>> = StrftimeItems::new(pattern).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::InvalidArgument(format!("invalid time format pattern {pattern:?}")));
    }
    let utc = DateTime::<Utc>::from_timestamp(when.seconds, when.nanoseconds)
        .ok_or_else(|| Error::InvalidArgument(format!("instant {}s is out of range", when.seconds)))?;
    let mut out = String::new();
    let written = match tz {
        Zone::Utc => write!(out, "{}", utc.format_with_items(items.into_iter())),
        Zone::Local => write!(out, "{}", utc.with_timezone(&Local).format_with_items(items.into_iter())),
    };
    written.map_err(|_| Error::InvalidArgument(format!("time format pattern {pattern:?} cannot be rendered")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_the_articles_timestamp_in_utc() {
        // 2004-03-21T01:48:44Z
        let when = Instant { seconds: 1_079_833_724, nanoseconds: 0 };
        assert_eq!(format_instant(when, "%Y%m%d-%H%M%S", Zone::Utc).unwrap(), "20040321-014844");
    }

    #[test]
    fn bad_patterns_are_invalid_arguments() {
        let when = Instant { seconds: 0, nanoseconds: 0 };
        assert!(matches!(format_instant(when, "%Q", Zone::Utc), Err(Error::InvalidArgument(_))));
        assert!(matches!(format_instant(when, &"%Y".repeat(600), Zone::Utc), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn pinned_clock_is_what_the_script_reads() {
        let pinned = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_079_833_724);
        let site = crate::site::Site::current_dir(&std::env::temp_dir()).unwrap();
        let policy = crate::policy::Policy::for_site(&site, Default::default());
        let mut caps = Caps::new("t", "s", policy, Clock::Pinned(pinned));
        let now = caps.now();
        assert_eq!((now.seconds, now.nanoseconds), (1_079_833_724, 0));
        assert_eq!(caps.format(now, "%Y".into(), Zone::Utc).unwrap(), "2004");
    }
}
