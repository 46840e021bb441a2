//! Percentiles of a sample of durations.

use std::time::Duration;

/// A sample of durations, summarised.
pub(crate) struct Sample {
    sorted: Vec<Duration>,
}

impl Sample {
    pub(crate) fn new(mut durations: Vec<Duration>) -> Self {
        durations.sort();
        Sample { sorted: durations }
    }

    /// The `p`-th percentile (nearest rank), zero for an empty sample.
    pub(crate) fn percentile(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    pub(crate) fn len(&self) -> usize {
        self.sorted.len()
    }

    /// `p50 … p99 … max (n)`, in milliseconds.
    pub(crate) fn summary(&self) -> String {
        format!(
            "p50 {:>6.0} ms   p99 {:>6.0} ms   max {:>6.0} ms   (n = {})",
            ms(self.percentile(50.0)),
            ms(self.percentile(99.0)),
            ms(self.percentile(100.0)),
            self.len()
        )
    }
}

pub(crate) fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let sample = Sample::new((1..=100).rev().map(Duration::from_millis).collect());
        assert_eq!(sample.percentile(50.0), Duration::from_millis(50));
        assert_eq!(sample.percentile(99.0), Duration::from_millis(99));
        assert_eq!(sample.percentile(100.0), Duration::from_millis(100));
        assert_eq!(Sample::new(vec![]).percentile(50.0), Duration::ZERO);
    }
}
