//! The time, as the runner sees it (pinned under `offsite run --now`).

use crate::HostError;
use crate::wit::offsite::backup::clock as raw;

/// ```no_run
/// use offsite_sdk::clock::{Zone, now};
/// let utc = now().format_in("%Y%m%d", Zone::Utc)?;
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
#[doc(inline)]
pub use raw::Zone;

/// A point in time, as returned by [`now`].
///
/// ```no_run
/// let stamp = offsite_sdk::clock::now().format("%Y%m%d-%H%M%S")?;
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    /// Seconds since 1970-01-01T00:00:00Z.
    pub seconds: i64,
    /// Nanoseconds past `seconds`.
    pub nanoseconds: u32,
}

/// The current time, or the pinned time under `--now`.
///
/// ```no_run
/// let t = offsite_sdk::clock::now();
/// assert!(t.seconds > 0);
/// ```
pub fn now() -> Timestamp {
    let i = raw::now();
    Timestamp { seconds: i.seconds, nanoseconds: i.nanoseconds }
}

impl Timestamp {
    /// Formats in the runner's local time zone, like `date +PATTERN`.
    ///
    /// ```no_run
    /// let name = format!("beoserver.{}.tgz", offsite_sdk::clock::now().format("%Y%m%d-%H%M%S")?);
    /// # Ok::<(), offsite_sdk::HostError>(())
    /// ```
    pub fn format(&self, pattern: &str) -> Result<String, HostError> {
        self.format_in(pattern, Zone::Local)
    }

    /// Formats in UTC, like `date -u +PATTERN`.
    ///
    /// ```no_run
    /// let day = offsite_sdk::clock::now().format_utc("%Y-%m-%d")?;
    /// # Ok::<(), offsite_sdk::HostError>(())
    /// ```
    pub fn format_utc(&self, pattern: &str) -> Result<String, HostError> {
        self.format_in(pattern, Zone::Utc)
    }

    /// Formats in the given zone.
    ///
    /// ```no_run
    /// use offsite_sdk::clock::{now, Zone};
    /// let s = now().format_in("%H:%M", Zone::Utc)?;
    /// # Ok::<(), offsite_sdk::HostError>(())
    /// ```
    pub fn format_in(&self, pattern: &str, zone: Zone) -> Result<String, HostError> {
        raw::format(raw::Instant { seconds: self.seconds, nanoseconds: self.nanoseconds }, pattern, zone)
            .map_err(HostError::from)
    }
}
