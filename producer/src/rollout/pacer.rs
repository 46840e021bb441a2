//! The start rate: devices started per minute, optionally ramping up
//! exponentially with successes (as AWS IoT Jobs' rollout rate does).

use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    pub per_minute: f64,
    pub ramp: Option<Ramp>,
}

/// Multiply the rate by `factor` for every `every_successes` successes, up
/// to `max_per_minute`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ramp {
    pub factor: f64,
    pub every_successes: u64,
    pub max_per_minute: f64,
}

impl Rate {
    /// The rate in effect after `successes` devices succeeded.
    pub fn per_minute_after(&self, successes: u64) -> f64 {
        match &self.ramp {
            None => self.per_minute,
            Some(ramp) => {
                let steps = (successes / ramp.every_successes.max(1)).min(64) as i32;
                (self.per_minute * ramp.factor.powi(steps)).min(ramp.max_per_minute)
            }
        }
    }
}

/// Spaces device starts to the rate in effect.
#[derive(Debug)]
pub struct Pacer {
    rate: Rate,
    next_at: Option<Instant>,
}

impl Pacer {
    pub fn new(rate: Rate) -> Self {
        Pacer {
            rate,
            next_at: None,
        }
    }

    /// How many of `wanted` devices may start at `now`. A pacer left idle
    /// does not bank starts: it catches up by at most one interval.
    pub fn take(&mut self, now: Instant, wanted: usize, successes: u64) -> usize {
        let interval = self.interval(successes);
        let mut next = match self.next_at {
            Some(next) if next + interval >= now => next,
            _ => now,
        };
        let mut granted = 0;
        while granted < wanted && next <= now {
            granted += 1;
            next += interval;
        }
        self.next_at = Some(next);
        granted
    }

    /// When the next device may start.
    pub fn next_at(&self) -> Option<Instant> {
        self.next_at
    }

    fn interval(&self, successes: u64) -> Duration {
        Duration::from_secs_f64(60.0 / self.rate.per_minute_after(successes).max(f64::MIN_POSITIVE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ramp_multiplies_per_step_of_successes_up_to_its_ceiling() {
        let rate = Rate {
            per_minute: 60.0,
            ramp: Some(Ramp {
                factor: 2.0,
                every_successes: 10,
                max_per_minute: 300.0,
            }),
        };
        assert_eq!(rate.per_minute_after(0), 60.0);
        assert_eq!(rate.per_minute_after(9), 60.0);
        assert_eq!(rate.per_minute_after(10), 120.0);
        assert_eq!(rate.per_minute_after(25), 240.0);
        assert_eq!(rate.per_minute_after(1000), 300.0);
    }

    #[test]
    fn starts_are_spaced_and_idle_time_is_not_banked() {
        let mut pacer = Pacer::new(Rate {
            per_minute: 120.0,
            ramp: None,
        });
        let t0 = Instant::now();
        assert_eq!(pacer.take(t0, 10, 0), 1);
        assert_eq!(pacer.take(t0 + Duration::from_millis(100), 10, 0), 0);
        assert_eq!(pacer.next_at(), Some(t0 + Duration::from_millis(500)));
        assert_eq!(pacer.take(t0 + Duration::from_millis(500), 10, 0), 1);
        // A little late: one interval of catching up at most.
        assert_eq!(pacer.take(t0 + Duration::from_millis(1400), 10, 0), 1);
        // Idle for a minute: no burst.
        assert_eq!(pacer.take(t0 + Duration::from_secs(61), 10, 0), 1);
    }
}
