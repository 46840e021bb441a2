//! Time as the controller reads it: a monotonic instant for the start rate
//! and the wall-clock time for the maintenance window, together, so a run
//! on the broker reads the system's clocks and a forecast reads virtual
//! ones that it moves itself.

use chrono::{DateTime, Utc};
use std::time::{Duration, Instant};

/// One moment on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    pub instant: Instant,
    pub wall: DateTime<Utc>,
}

impl Moment {
    /// Now, on the system's clocks.
    pub fn now() -> Moment {
        Moment {
            instant: Instant::now(),
            wall: Utc::now(),
        }
    }

    pub fn after(self, elapsed: Duration) -> Moment {
        Moment {
            instant: self.instant + elapsed,
            wall: self.wall + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX),
        }
    }

    /// The moment the wall clock reads `wall` (now, if that has passed).
    pub fn at_wall(self, wall: DateTime<Utc>) -> Moment {
        self.after((wall - self.wall).to_std().unwrap_or_default())
    }

    /// The moment of `instant` (now, if that has passed).
    pub fn at_instant(self, instant: Instant) -> Moment {
        self.after(instant.saturating_duration_since(self.instant))
    }

    /// Time from `earlier` to this moment.
    pub fn since(self, earlier: Moment) -> Duration {
        self.instant.saturating_duration_since(earlier.instant)
    }
}
