//! Schedules: when a site runs under `offsite watch`, and when it runs next
//! for `offsite status`.
//!
//! A schedule is a five-field cron expression (`34 3,20 * * *`, the
//! article's crontab) read in the site's time zone: the system's local time,
//! or `timezone = "Europe/Berlin"`. Expressions are parsed by croner; what
//! happens at daylight saving changes is decided here, the way Vixie cron
//! does it:
//!
//! - **Clocks go forward** (a wall-clock hour does not exist): a run due in
//!   the missing hour happens at the first instant after the change; several
//!   due in the gap become one run.
//! - **Clocks go back** (an hour happens twice): a run due in the repeated
//!   hour happens once, the first time.
//!
//! Everything here takes the current time as an argument, so tests inject
//! any instant they like; nothing reads the clock or sleeps.

use std::str::FromStr;

use anyhow::{Result, anyhow};
use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, TimeZone, Timelike, Utc};

/// A site's schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The expression as written.
    pub expression: String,
    cron: croner::Cron,
    pub zone: Zone,
}

/// The time zone a schedule is read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// The system's local time (`TZ`, else `/etc/localtime`).
    Local,
    Named(chrono_tz::Tz),
}

impl std::fmt::Display for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Zone::Local => f.write_str("local time"),
            Zone::Named(tz) => f.write_str(tz.name()),
        }
    }
}

/// What `watch` does at start-up about runs that came due while it was not
/// running (the machine was off or asleep).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Missed {
    /// Run once at start-up, however many were missed.
    #[default]
    RunOnce,
    /// Wait for the next scheduled time.
    Skip,
}

impl FromStr for Missed {
    type Err = String;
    fn from_str(s: &str) -> Result<Missed, String> {
        match s {
            "run-once" => Ok(Missed::RunOnce),
            "skip" => Ok(Missed::Skip),
            other => Err(format!("{other:?}: use \"run-once\" or \"skip\"")),
        }
    }
}

impl Schedule {
    /// Parses `expression` (five fields: minute hour day-of-month month
    /// day-of-week) in `timezone` (an IANA name; `None` for local time).
    pub fn parse(expression: &str, timezone: Option<&str>) -> Result<Schedule> {
        if expression.split_whitespace().count() != 5 {
            return Err(anyhow!(
                "{expression:?} must have five fields: minute hour day-of-month month day-of-week, like \"34 3,20 * * *\""
            ));
        }
        let cron = croner::Cron::from_str(expression).map_err(|e| anyhow!("{expression:?}: {e}"))?;
        let zone = match timezone {
            None => Zone::Local,
            Some(name) => Zone::Named(
                name.parse().map_err(|_| anyhow!("{name:?} is not a time zone name like \"Europe/Berlin\""))?,
            ),
        };
        Ok(Schedule { expression: expression.to_string(), cron, zone })
    }

    /// The first scheduled instant strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.zone {
            Zone::Local => self.next_in(&chrono::Local, after),
            Zone::Named(tz) => self.next_in(&tz, after),
        }
    }

    /// Whether a scheduled time passed in `(last, now]`: a run was missed.
    pub fn missed_between(&self, last: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        self.next_after(last).is_some_and(|t| t <= now)
    }

    /// The cron fields are matched against wall-clock time (as if it were a
    /// calendar without DST), and each match is then placed on the time
    /// line by [`resolve`].
    fn next_in<Tz: TimeZone>(&self, tz: &Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Whole seconds: a match is a minute's first instant, not `after`'s
        // fraction of a second past it.
        let wall = after.with_timezone(tz).naive_local().with_nanosecond(0)?;
        // Start before `after`'s wall time: after the clocks went back, the
        // wall time repeats, and a match in the first pass was already due.
        let mut probe = Utc.from_utc_datetime(&(wall - Duration::hours(3)));
        for _ in 0..10_000 {
            let found = self.cron.find_next_occurrence(&probe, false).ok()?;
            let at = resolve(tz, found.naive_utc())?;
            if at > after {
                return Some(at);
            }
            probe = found;
        }
        None
    }
}

/// The instant a wall-clock time names in `tz`: the earlier one when it
/// happens twice, the end of the gap when it does not happen at all.
fn resolve<Tz: TimeZone>(tz: &Tz, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
        // In a gap: the first wall-clock minute after it that exists,
        // which is the instant of the change.
        LocalResult::None => (1..=24 * 60)
            .find_map(|m| tz.from_local_datetime(&(wall + Duration::minutes(m))).earliest())
            .map(|t| t.with_timezone(&Utc)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn nexts(s: &Schedule, from: &str, n: usize) -> Vec<String> {
        let mut t = utc(from);
        (0..n)
            .map(|_| {
                t = s.next_after(t).unwrap();
                match s.zone {
                    Zone::Named(tz) => t.with_timezone(&tz).to_rfc3339(),
                    Zone::Local => t.to_rfc3339(),
                }
            })
            .collect()
    }

    #[test]
    fn the_articles_crontab_fires_twice_a_day_in_its_zone() {
        let s = Schedule::parse("34 3,20 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            nexts(&s, "2026-11-26T12:00:00Z", 3),
            ["2026-11-26T20:34:00+01:00", "2026-11-27T03:34:00+01:00", "2026-11-27T20:34:00+01:00"]
        );
        // Exactly at a scheduled instant: the next one, not the same.
        assert_eq!(s.next_after(utc("2026-11-26T19:34:00Z")), Some(utc("2026-11-27T02:34:00Z")));
    }

    #[test]
    fn when_clocks_go_forward_a_run_in_the_missing_hour_happens_right_after() {
        // Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST.
        let s = Schedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            nexts(&s, "2026-03-27T12:00:00Z", 3),
            ["2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]
        );
        // Every quarter hour: the four in the gap become one run at 03:00.
        let s = Schedule::parse("*/15 * * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            nexts(&s, "2026-03-29T00:40:00Z", 4),
            [
                "2026-03-29T01:45:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-29T03:15:00+02:00",
                "2026-03-29T03:30:00+02:00"
            ]
        );
    }

    #[test]
    fn when_clocks_go_back_a_run_in_the_repeated_hour_happens_once() {
        // Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET.
        let s = Schedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(nexts(&s, "2026-10-24T12:00:00Z", 2), ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]);
        // Asked during the second pass through 02:xx: not again that day.
        assert_eq!(s.next_after(utc("2026-10-25T01:10:00Z")), Some(utc("2026-10-26T01:30:00Z")));
        // Hourly: 02:00 once (the first pass), then 03:00 CET, two hours later.
        let s = Schedule::parse("0 * * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            nexts(&s, "2026-10-24T23:30:00Z", 3),
            ["2026-10-25T02:00:00+02:00", "2026-10-25T03:00:00+01:00", "2026-10-25T04:00:00+01:00"]
        );
    }

    #[test]
    fn missed_runs_are_found_between_two_instants() {
        let s = Schedule::parse("34 3,20 * * *", Some("UTC")).unwrap();
        assert!(s.missed_between(utc("2026-11-26T03:35:00Z"), utc("2026-11-26T21:00:00Z")));
        assert!(!s.missed_between(utc("2026-11-26T03:35:00Z"), utc("2026-11-26T20:00:00Z")));
        assert_eq!("skip".parse::<Missed>(), Ok(Missed::Skip));
        assert!("sometimes".parse::<Missed>().is_err());
    }

    #[test]
    fn bad_expressions_and_zones_are_explained() {
        assert!(Schedule::parse("34 3,20 * *", None).unwrap_err().to_string().contains("five fields"));
        assert!(Schedule::parse("61 3 * * *", None).is_err());
        assert!(Schedule::parse("0 3 * * *", Some("Mars/Olympus")).unwrap_err().to_string().contains("time zone"));
    }
}
