//! Bandwidth limits (`bandwidth = "20MiB/s"`, per host and per site).
//!
//! A [`Pace`] is shared by every transfer it limits: all of a run's
//! transfers from one host share the host's, and all of a run's transfers
//! share the site's. Each read from a remote command takes its bytes from
//! every pace that applies and sleeps until they are paid for. Reading
//! slower is all it takes: the SSH channel's window then fills, and the
//! server's TCP stack slows to what we read.
//!
//! The rule is a virtual schedule (GCRA): each byte has a time slot of
//! `1 / rate`, consecutive across every caller, and a caller waits until
//! its last byte's slot is less than [`BURST`] ahead of now. So over any
//! window the bytes read are at most `rate × (window + BURST)`: within 5%
//! over 10 s with a quarter-second burst.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far ahead of its schedule a transfer may run.
pub const BURST: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct Pace {
    /// Bytes per second.
    rate: u64,
    /// When the bytes taken so far will have been paid for.
    paid_until: Mutex<Option<Instant>>,
}

impl Pace {
    pub fn new(rate: u64) -> Pace {
        Pace { rate: rate.max(1), paid_until: Mutex::new(None) }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Takes `bytes` read at `now`; returns how long the reader must wait
    /// before it reads more.
    pub fn take(&self, bytes: u64, now: Instant) -> Duration {
        let mut paid = self.paid_until.lock().unwrap_or_else(|e| e.into_inner());
        let from = paid.map_or(now, |p| p.max(now));
        let until = from + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        *paid = Some(until);
        until.saturating_duration_since(now + BURST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_sharing_a_pace_get_the_rate_between_them() {
        let pace = Pace::new(1 << 20);
        let t0 = Instant::now();
        // The first quarter second of bytes is free; the rest waits.
        assert_eq!(pace.take(256 << 10, t0), Duration::ZERO);
        let wait = pace.take(256 << 10, t0);
        assert_eq!(wait, Duration::from_millis(250));
        // A second reader queues behind the first: its bytes are paid
        // after the first's.
        let other = pace.take(512 << 10, t0);
        assert_eq!(other, Duration::from_millis(750));
        // Time that passes pays the debt: a second later, the slot is free
        // again up to the burst.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(pace.take(256 << 10, later), Duration::ZERO);
    }

    #[test]
    fn over_any_window_the_bytes_stay_within_the_rate_and_the_burst() {
        // Readers that obey the waits, taking 64 KiB at a time: over 10 s
        // of simulated time they read at most rate × (10 s + burst).
        let rate = 10u64 << 20;
        let pace = Pace::new(rate);
        let t0 = Instant::now();
        let mut now = t0;
        let mut read = 0u64;
        while now < t0 + Duration::from_secs(10) {
            read += 64 << 10;
            now += pace.take(64 << 10, now);
        }
        let most = rate as f64 * (10.0 + BURST.as_secs_f64()) + f64::from(64 << 10);
        assert!((read as f64) <= most, "{read} > {most}");
        assert!((read as f64) >= rate as f64 * 10.0, "{read}: the rate is reached too");
    }
}
