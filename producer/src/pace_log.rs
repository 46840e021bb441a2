//! What a campaign's pace is measured from, small enough to travel in a
//! snapshot: `status` of a running campaign starts from its newest
//! snapshot, which holds no finished device, so per-device times cannot
//! give the rate there.

use crate::status_view::RATE_WINDOW;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Finishes are counted per this many seconds: the rate's precision.
const BUCKET_SECONDS: i64 = 10;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PaceLog {
    first_start: Option<DateTime<Utc>>,
    last_finish: Option<DateTime<Utc>>,
    /// (bucket start in Unix seconds, finishes in it), oldest first,
    /// covering the rate window before the newest finish.
    buckets: VecDeque<(i64, u64)>,
}

impl PaceLog {
    /// When the first device was published or took its first step.
    pub fn first_start(&self) -> Option<DateTime<Utc>> {
        self.first_start
    }

    pub fn last_finish(&self) -> Option<DateTime<Utc>> {
        self.last_finish
    }

    pub fn started(&mut self, at: DateTime<Utc>) {
        self.first_start = Some(self.first_start.map_or(at, |first| first.min(at)));
    }

    pub fn finished(&mut self, at: DateTime<Utc>) {
        self.last_finish = Some(self.last_finish.map_or(at, |last| last.max(at)));
        let bucket = at.timestamp().div_euclid(BUCKET_SECONDS) * BUCKET_SECONDS;
        match self.buckets.iter().position(|(start, _)| *start >= bucket) {
            Some(i) if self.buckets[i].0 == bucket => self.buckets[i].1 += 1,
            Some(i) => self.buckets.insert(i, (bucket, 1)),
            None => self.buckets.push_back((bucket, 1)),
        }
        let newest = self.buckets.back().map_or(bucket, |(start, _)| *start);
        let oldest_kept = newest - RATE_WINDOW.num_seconds() - BUCKET_SECONDS;
        while self
            .buckets
            .front()
            .is_some_and(|(start, _)| *start < oldest_kept)
        {
            self.buckets.pop_front();
        }
    }

    /// Devices finished after `from` and up to `to`, to a bucket's
    /// precision: a bucket counts if it ends after `from`, so a young
    /// campaign's first finishes count even in a bucket that began before
    /// its first start.
    pub fn finished_between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
        let (from, to) = (from.timestamp(), to.timestamp());
        self.buckets
            .iter()
            .filter(|(start, _)| start + BUCKET_SECONDS > from && *start <= to)
            .map(|(_, n)| n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn finishes_are_counted_per_bucket_and_old_ones_dropped() {
        let t0 = DateTime::parse_from_rfc3339("2026-12-02T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut log = PaceLog::default();
        log.started(t0 + Duration::seconds(5));
        log.started(t0);
        for s in [1, 2, 15, 400, 401] {
            log.finished(t0 + Duration::seconds(s));
        }
        // Out of order, as events of several workers arrive.
        log.finished(t0 + Duration::seconds(395));
        assert_eq!(log.first_start(), Some(t0));
        assert_eq!(log.last_finish(), Some(t0 + Duration::seconds(401)));
        let end = t0 + Duration::seconds(401);
        assert_eq!(log.finished_between(end - RATE_WINDOW, end), 3);
        // The first three are older than the window before the newest.
        assert_eq!(log.finished_between(t0, t0 + Duration::seconds(20)), 0);
    }
}
