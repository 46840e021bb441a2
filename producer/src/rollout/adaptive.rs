//! The adaptive rate: a start rate per API host that listens to the host.
//!
//! Workers put in every step event how its calls to the device's API host
//! went (the slowest call, and whether one failed with a 5xx, a timeout or
//! a broken connection). Over a sliding window per host, the controller
//! compares the calls' p95 latency and failure ratio with the campaign's
//! thresholds: a host over either gets its start rate cut (multiplicative
//! decrease), a host back under both gets it raised step by step (additive
//! increase) until it is back at the rate it had before its first cut,
//! where its limit is lifted. With `[concurrency] per_host`, the host's
//! in-flight cap shrinks in the same proportion.
//!
//! Every change is a `rate_changed` decision in the journal, with the
//! numbers behind it, and the limits in force are read back from those
//! decisions (so a restarted controller keeps them). After a change the
//! host's calls are judged afresh: the calls made under the new rate, at
//! the earliest one window later, and once there are `min_calls` of them.
//!
//! Windows run on the controller's monotonic clock, by when the events
//! arrived, never by the workers' clocks.

use super::pacer::{Pacer, Rate};
use flotilla_common::{CallSample, Decision, DecisionEvent, RateChange};
use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

/// Calls kept per host: the p95 of the latest ones is as good as the
/// p95 of them all, and a busy host cannot grow the controller.
const CALLS_KEPT: usize = 4096;
/// How often hosts are judged at most: each review walks every host.
const REVIEW_EVERY: Duration = Duration::from_secs(1);

/// The campaign's `[rate] adaptive` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveRate {
    /// Calls judged together, and the least time between two changes of
    /// one host.
    pub window: Duration,
    /// A host whose calls' p95 is above this is slowed down.
    pub p95_over: Duration,
    /// A host whose calls fail transiently more often than this is slowed
    /// down.
    pub error_ratio_over: f64,
    /// What a cut multiplies the host's rate by.
    pub decrease: f64,
    /// Starts per minute a recovering host gains per window.
    pub increase: f64,
    /// Calls a window needs before it is judged.
    pub min_calls: u64,
    /// The lowest rate a cut goes to.
    pub min_per_minute: f64,
}

/// A change the controller should make, and the words for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub rate: RateChange,
    pub reason: String,
}

#[derive(Debug)]
pub struct Adaptive {
    settings: AdaptiveRate,
    hosts: BTreeMap<String, Host>,
    /// The decisions folded in so far (the next decision seq then).
    synced: u32,
    reviewed_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Host {
    /// Arrived, slowest call, failed.
    calls: VecDeque<(Instant, u64, bool)>,
    starts: VecDeque<Instant>,
    first_start: Option<Instant>,
    limit: Option<Limit>,
    /// When its last change was read.
    changed_at: Option<Instant>,
}

#[derive(Debug)]
struct Limit {
    per_minute: f64,
    full_per_minute: f64,
    pacer: Pacer,
}

/// What one window of a host's calls says.
struct Verdict {
    calls: u64,
    p95_ms: u64,
    error_ratio: f64,
}

impl Adaptive {
    pub fn new(settings: AdaptiveRate) -> Self {
        Adaptive {
            settings,
            hosts: BTreeMap::new(),
            synced: 0,
            reviewed_at: None,
        }
    }

    /// A step's calls, arrived at `now`.
    pub fn observe(&mut self, sample: &CallSample, now: Instant) {
        let host = self.hosts.entry(sample.host.clone()).or_default();
        host.calls
            .push_back((now, sample.slowest_ms, sample.failure.is_some()));
        if host.calls.len() > CALLS_KEPT {
            host.calls.pop_front();
        }
    }

    /// Whether a device of `host` may start at `now`; takes its start if so.
    pub fn may_start(&mut self, host: &str, now: Instant) -> bool {
        match self.hosts.get_mut(host).and_then(|h| h.limit.as_mut()) {
            Some(limit) => limit.pacer.take(now, 1, 0) == 1,
            None => true,
        }
    }

    /// A device of `host` started at `now`.
    pub fn started(&mut self, host: &str, now: Instant) {
        let window = self.settings.window;
        let host = self.hosts.entry(host.to_owned()).or_default();
        host.first_start.get_or_insert(now);
        host.starts.push_back(now);
        host.forget_before(now, window);
    }

    /// When the next device of a limited host may start.
    pub fn next_start(&self) -> Option<Instant> {
        self.hosts
            .values()
            .filter_map(|h| h.limit.as_ref()?.pacer.next_at())
            .min()
    }

    /// The share of its in-flight cap a host keeps: its rate over its full
    /// rate, while it has a limit.
    pub fn share(&self, host: &str) -> Option<f64> {
        let limit = self.hosts.get(host)?.limit.as_ref()?;
        Some((limit.per_minute / limit.full_per_minute).min(1.0))
    }

    /// Folds in the `rate_changed` decisions made since the last call
    /// (read back or replayed): the limits they set. Returns the hosts
    /// whose limit changed.
    pub fn sync(&mut self, decisions: &[DecisionEvent], now: Instant) -> Vec<String> {
        let mut changed = Vec::new();
        let new = decisions.partition_point(|d| d.seq < self.synced);
        for event in &decisions[new..] {
            if let Decision::RateChanged(change) = &event.decision {
                let state = self.hosts.entry(change.host.clone()).or_default();
                state.limit = change.to_per_minute.map(|per_minute| Limit {
                    per_minute,
                    full_per_minute: change.full_per_minute,
                    pacer: Pacer::new(Rate {
                        per_minute,
                        ramp: None,
                    }),
                });
                state.changed_at = Some(now);
                state.calls.clear();
                changed.push(change.host.clone());
            }
        }
        if let Some(last) = decisions.last() {
            self.synced = self.synced.max(last.seq + 1);
        }
        changed
    }

    /// The first change a host's calls ask for at `now`, if any.
    pub fn review(&mut self, now: Instant) -> Option<Change> {
        if self
            .reviewed_at
            .is_some_and(|at| now.duration_since(at) < REVIEW_EVERY)
        {
            return None;
        }
        self.reviewed_at = Some(now);
        let settings = &self.settings;
        let window = settings.window;
        // Hosts gone quiet are forgotten: a campaign over thousands of
        // appliances (each its own API host) keeps only the recent ones.
        self.hosts.retain(|_, host| {
            host.forget_before(now, window);
            host.limit.is_some() || !host.calls.is_empty() || !host.starts.is_empty()
        });
        for (name, host) in &mut self.hosts {
            if host
                .changed_at
                .is_some_and(|at| now.duration_since(at) < window)
            {
                continue;
            }
            let Some(verdict) = host.verdict(settings.min_calls) else {
                continue;
            };
            let slow = verdict.p95_ms > settings.p95_over.as_millis() as u64;
            let failing = verdict.error_ratio > settings.error_ratio_over;
            if slow || failing {
                let from = match &host.limit {
                    Some(limit) => limit.per_minute,
                    None => host.observed_per_minute(now, window),
                };
                let to = (from * settings.decrease).max(settings.min_per_minute);
                if to >= from {
                    continue;
                }
                let full = host.limit.as_ref().map_or(from, |l| l.full_per_minute);
                return Some(change(name, from, Some(to), full, &verdict, settings));
            }
            if let Some(limit) = &host.limit {
                let to = limit.per_minute + settings.increase;
                let to = (to < limit.full_per_minute).then_some(to);
                return Some(change(
                    name,
                    limit.per_minute,
                    to,
                    limit.full_per_minute,
                    &verdict,
                    settings,
                ));
            }
        }
        None
    }
}

impl Host {
    /// Forgets what is older than the window. A limited host keeps every
    /// call since its last change: slowed down, it may need more than a
    /// window to make enough calls to be judged, and must not stay slow
    /// for want of them.
    fn forget_before(&mut self, now: Instant, window: Duration) {
        let old = |at: &Instant| now.duration_since(*at) > window;
        while self.limit.is_none() && self.calls.front().is_some_and(|(at, _, _)| old(at)) {
            self.calls.pop_front();
        }
        while self.starts.front().is_some_and(old) {
            self.starts.pop_front();
        }
        if self.starts.is_empty() {
            self.first_start = None;
        }
    }

    fn verdict(&self, min_calls: u64) -> Option<Verdict> {
        let calls = self.calls.len() as u64;
        if calls < min_calls.max(1) {
            return None;
        }
        let mut latencies: Vec<u64> = self.calls.iter().map(|(_, ms, _)| *ms).collect();
        latencies.sort_unstable();
        let rank = ((calls as f64 * 0.95).ceil() as usize).clamp(1, latencies.len());
        let failed = self.calls.iter().filter(|(_, _, failed)| *failed).count();
        Some(Verdict {
            calls,
            p95_ms: latencies[rank - 1],
            error_ratio: failed as f64 / calls as f64,
        })
    }

    /// The host's starts per minute over the last window (or since its
    /// first start, if that is more recent).
    fn observed_per_minute(&self, now: Instant, window: Duration) -> f64 {
        let since = self
            .first_start
            .map_or(window, |first| now.duration_since(first).min(window))
            .max(Duration::from_secs(1));
        self.starts.len() as f64 * 60.0 / since.as_secs_f64()
    }
}

fn change(
    host: &str,
    from: f64,
    to: Option<f64>,
    full: f64,
    verdict: &Verdict,
    settings: &AdaptiveRate,
) -> Change {
    let judged = format!(
        "p95 {} over {} calls (limit {}), 5xx/timeouts {:.1}% (limit {:.1}%)",
        humantime::format_duration(Duration::from_millis(verdict.p95_ms)),
        verdict.calls,
        humantime::format_duration(settings.p95_over),
        verdict.error_ratio * 100.0,
        settings.error_ratio_over * 100.0,
    );
    let reason = match to {
        Some(to) if to < from => format!(
            "{host}: {} → {} starts per minute, {judged}",
            per_minute(from),
            per_minute(to)
        ),
        Some(to) => format!(
            "{host}: {} → {} starts per minute, recovering: {judged}",
            per_minute(from),
            per_minute(to)
        ),
        None => format!(
            "{host}: {} → full rate ({} starts per minute before it slowed), recovered: {judged}",
            per_minute(from),
            per_minute(full)
        ),
    };
    Change {
        rate: RateChange {
            host: host.to_owned(),
            from_per_minute: from,
            to_per_minute: to,
            full_per_minute: full,
            calls: verdict.calls,
            p95_ms: verdict.p95_ms,
            error_ratio: verdict.error_ratio,
        },
        reason,
    }
}

/// A rate in words: whole starts, or one decimal below ten.
fn per_minute(rate: f64) -> String {
    if rate >= 10.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::{CallFailure, DecisionCounts, Thresholds};

    fn settings() -> AdaptiveRate {
        AdaptiveRate {
            window: Duration::from_secs(10),
            p95_over: Duration::from_millis(500),
            error_ratio_over: 0.05,
            decrease: 0.5,
            increase: 30.0,
            min_calls: 10,
            min_per_minute: 1.0,
        }
    }

    fn sample(host: &str, ms: u64, failure: Option<CallFailure>) -> CallSample {
        CallSample {
            host: host.into(),
            count: 1,
            slowest_ms: ms,
            failure,
        }
    }

    fn decided(seq: u32, change: Change) -> DecisionEvent {
        DecisionEvent {
            seq,
            decision: Decision::RateChanged(change.rate),
            reason: change.reason,
            counts: DecisionCounts::default(),
            thresholds: Thresholds::default(),
            control_offset: None,
        }
    }

    #[test]
    fn a_slow_host_is_cut_recovers_step_by_step_and_is_lifted_at_its_full_rate() {
        let mut adaptive = Adaptive::new(settings());
        let t0 = Instant::now();
        // 120 starts a minute on "a", 2 a second, over five seconds.
        for i in 0..10 {
            adaptive.started("a", t0 + Duration::from_millis(500 * i));
        }
        let now = t0 + Duration::from_secs(5);
        for _ in 0..20 {
            adaptive.observe(&sample("a", 900, None), now);
            adaptive.observe(&sample("b", 50, None), now);
        }
        let cut = adaptive.review(now).expect("a is slow");
        let rate = &cut.rate;
        assert_eq!(
            (
                rate.host.as_str(),
                rate.from_per_minute,
                rate.to_per_minute,
                rate.p95_ms
            ),
            ("a", 120.0, Some(60.0), 900)
        );
        assert_eq!(rate.full_per_minute, 120.0);
        assert!(
            cut.reason
                .starts_with("a: 120 → 60 starts per minute, p95 900ms")
        );
        let mut decisions = vec![decided(0, cut)];
        assert_eq!(adaptive.sync(&decisions, now), ["a"]);
        assert_eq!(adaptive.share("a"), Some(0.5));
        assert_eq!(adaptive.share("b"), None);
        // One start a second now: the first at once, the next a second on.
        assert!(adaptive.may_start("a", now));
        assert!(!adaptive.may_start("a", now + Duration::from_millis(500)));
        assert!(adaptive.may_start("b", now + Duration::from_millis(500)));
        // Within a window of the change, nothing is judged.
        for _ in 0..20 {
            adaptive.observe(&sample("a", 40, None), now + Duration::from_secs(1));
        }
        assert_eq!(adaptive.review(now + Duration::from_secs(9)), None);
        // Healthy a window later: +30, then lifted at 120.
        let later = now + Duration::from_secs(10);
        let raise = adaptive.review(later).expect("a recovered");
        assert_eq!(raise.rate.to_per_minute, Some(90.0));
        decisions.push(decided(1, raise));
        adaptive.sync(&decisions, later);
        for _ in 0..20 {
            adaptive.observe(&sample("a", 40, None), later + Duration::from_secs(1));
        }
        let lift = adaptive
            .review(later + Duration::from_secs(10))
            .expect("a is back");
        assert!(
            lift.reason
                .contains("90 → full rate (120 starts per minute")
        );
        assert_eq!(lift.rate.to_per_minute, None);
        decisions.push(decided(2, lift));
        adaptive.sync(&decisions, later + Duration::from_secs(10));
        assert_eq!(adaptive.share("a"), None);
    }

    #[test]
    fn a_host_slowed_down_to_a_trickle_is_judged_once_it_has_made_enough_calls() {
        let mut adaptive = Adaptive::new(settings());
        let now = Instant::now();
        adaptive.started("a", now);
        for _ in 0..10 {
            adaptive.observe(&sample("a", 900, None), now);
        }
        let cut = adaptive.review(now).expect("a is slow");
        adaptive.sync(&[decided(1, cut)], now);
        // Two calls a window: five windows to make ten.
        for window in 1..=5u32 {
            let at = now + settings().window * window;
            adaptive.observe(&sample("a", 40, None), at);
            adaptive.observe(&sample("a", 40, None), at);
            let review = adaptive.review(at + Duration::from_millis(1));
            assert_eq!(review.is_some(), window == 5, "window {window}: {review:?}");
        }
    }

    #[test]
    fn transient_failures_cut_too_and_a_quiet_host_is_not_judged() {
        let mut adaptive = Adaptive::new(settings());
        let now = Instant::now();
        adaptive.started("a", now);
        for i in 0..20 {
            let failure = (i % 5 == 0).then_some(CallFailure::ServerError);
            adaptive.observe(&sample("a", 10, failure), now);
        }
        for _ in 0..5 {
            adaptive.observe(&sample("b", 5_000, None), now);
        }
        let cut = adaptive.review(now).expect("a fails one call in five");
        assert!(
            cut.reason.contains("5xx/timeouts 20.0% (limit 5.0%)"),
            "{}",
            cut.reason
        );
        assert_eq!(cut.rate.host, "a");
    }
}
