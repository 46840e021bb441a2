//! A simulated device's clock: the machine's, off by the fleet's
//! `Quirks::clock_offset`. Every timestamp a device writes into its
//! records and every `Date` header it sends come from it, as a real
//! appliance's would from its own (perhaps wrong) clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Clock {
    /// Seconds the device's clock is ahead of the machine's (negative:
    /// behind).
    pub(crate) offset: i64,
}

impl Clock {
    /// The device's time now.
    pub(crate) fn now(self) -> SystemTime {
        let real = SystemTime::now();
        let shift = Duration::from_secs(self.offset.unsigned_abs());
        if self.offset >= 0 {
            real + shift
        } else {
            real - shift
        }
    }

    /// The device's time now, in epoch seconds.
    pub(crate) fn epoch_seconds(self) -> i64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }

    /// The device's time now as an HTTP `Date` header.
    pub(crate) fn http_date(self) -> String {
        chrono::DateTime::<chrono::Utc>::from(self.now())
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string()
    }
}
