//! A simulated device's clock: the machine's, off by the fleet's
//! `Quirks::clock_offset`, and stepped by [`Fleet::step_clocks`] as NTP
//! steps a real appliance's clock. Every timestamp a device writes into
//! its records and every `Date` header it sends come from it, as a real
//! appliance's would from its own (perhaps wrong) clock. A fleet with
//! `Quirks::no_date_header` sends no `Date` header at all.
//!
//! [`Fleet::step_clocks`]: crate::Fleet::step_clocks

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// One fleet's clock, shared by its devices (cheap to clone).
#[derive(Debug, Clone, Default)]
pub(crate) struct Clock {
    /// Seconds the devices' clock is ahead of the machine's (negative:
    /// behind).
    offset: Arc<AtomicI64>,
    /// The devices send no `Date` header.
    undated: bool,
}

impl Clock {
    pub(crate) fn new(offset: i64, dated: bool) -> Self {
        Clock {
            offset: Arc::new(AtomicI64::new(offset)),
            undated: !dated,
        }
    }

    /// Moves the clock `seconds` forward (negative: back), at once.
    pub(crate) fn step(&self, seconds: i64) {
        self.offset.fetch_add(seconds, Ordering::SeqCst);
    }

    /// The device's time now.
    pub(crate) fn now(&self) -> SystemTime {
        let real = SystemTime::now();
        let offset = self.offset.load(Ordering::SeqCst);
        let shift = Duration::from_secs(offset.unsigned_abs());
        if offset >= 0 {
            real + shift
        } else {
            real - shift
        }
    }

    /// The device's time now, in epoch seconds.
    pub(crate) fn epoch_seconds(&self) -> i64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }

    /// The device's time now as an HTTP `Date` header, unless the devices
    /// send none.
    pub(crate) fn http_date(&self) -> Option<String> {
        if self.undated {
            return None;
        }
        Some(
            chrono::DateTime::<chrono::Utc>::from(self.now())
                .format("%a, %d %b %Y %H:%M:%S GMT")
                .to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_moves_every_copy_of_the_clock_at_once() {
        let clock = Clock::new(600, true);
        let device = clock.clone();
        let before = device.epoch_seconds();
        clock.step(-900);
        let after = device.epoch_seconds();
        assert!((before - after - 900).abs() <= 1, "{before} then {after}");
        assert!(device.http_date().is_some());
        assert_eq!(Clock::new(0, false).http_date(), None);
    }
}
