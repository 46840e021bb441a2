//! The worker's Prometheus metrics, behind typed methods so metric names and
//! label sets live in this file only.
//!
//! Labels are bounded: device kind, step, outcome, error class, campaign,
//! status class, dead-letter reason, the id of one of the worker's own job
//! keys. Never a device id or an address.

use flotilla_common::{DeviceKind, Ending, Outcome};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use std::time::Duration;

/// Step result labels, besides the device's own step names.
pub const STEP_RESULTS: [&str; 3] = ["ok", "retry", "error"];
/// Reasons a worker dead-letters a message.
pub const DEAD_LETTER_REASONS: [&str; 9] = [
    "undecodable",
    "unsupported_version",
    "unknown_kind",
    "unknown_step",
    "return_limit",
    "delivery_limit",
    // The three a message that does not verify is dead-lettered for.
    "unsigned",
    "unknown_key",
    "bad_signature",
];
const STATUS_CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "error"];
/// Bucket bounds, in seconds, of the duration histograms: fine below a
/// second for quick device calls, then up to an hour, because one step may
/// run as long as the campaign's `step_timeout` (an image upload, a reboot
/// wait), which is bounded only by its per-device deadline (an hour by
/// default). A delayed job behind a backlog can run as late, too. A longer
/// observation lands in `+Inf` only.
const DURATION_BUCKETS: [f64; 19] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    900.0, 1800.0, 3600.0,
];

#[derive(Clone)]
pub struct WorkerMetrics {
    steps: IntCounterVec,
    step_seconds: HistogramVec,
    device_requests: IntCounterVec,
    jobs_finished: IntCounterVec,
    in_flight: IntGauge,
    poll_lateness: Histogram,
    dead_lettered: IntCounterVec,
    verified: IntCounterVec,
    reconnects: IntCounter,
    parked: IntCounter,
    handoff_failures: IntCounter,
    deliveries: IntCounter,
    redeliveries_dropped: IntCounter,
}

impl WorkerMetrics {
    /// Registers the worker's metrics on `registry`. Fails only if they are
    /// already registered there.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = WorkerMetrics {
            steps: IntCounterVec::new(
                Opts::new(
                    "flotilla_worker_steps_total",
                    "Job steps executed, by device kind, step and result.",
                ),
                &["kind", "step", "result"],
            )?,
            step_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "flotilla_worker_step_duration_seconds",
                    "Time one step took, device calls included.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["kind", "step"],
            )?,
            device_requests: IntCounterVec::new(
                Opts::new(
                    "flotilla_device_http_requests_total",
                    "HTTP requests to devices, by device kind and status class.",
                ),
                &["kind", "status_class"],
            )?,
            jobs_finished: IntCounterVec::new(
                Opts::new(
                    "flotilla_jobs_finished_total",
                    "Jobs that reached a terminal state, by campaign, device kind, outcome and error class.",
                ),
                &["campaign", "kind", "outcome", "error_class"],
            )?,
            in_flight: IntGauge::new(
                "flotilla_worker_jobs_in_flight",
                "Steps running now on this worker.",
            )?,
            poll_lateness: Histogram::with_opts(
                HistogramOpts::new(
                    "flotilla_worker_poll_lateness_seconds",
                    "How late a delayed job ran against its due time.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
            )?,
            dead_lettered: IntCounterVec::new(
                Opts::new(
                    "flotilla_worker_dead_lettered_total",
                    "Messages this worker sent to the dead-letter queue, by reason.",
                ),
                &["reason"],
            )?,
            verified: IntCounterVec::new(
                Opts::new(
                    "flotilla_worker_jobs_verified_total",
                    "Deliveries whose signature verified, by the id of the job key that made \
                     it: a key whose count no longer moves can be retired.",
                ),
                &["key"],
            )?,
            reconnects: IntCounter::new(
                "flotilla_broker_reconnects_total",
                "Times this process re-established its broker connection.",
            )?,
            parked: IntCounter::new(
                "flotilla_worker_parked_total",
                "Jobs of paused campaigns sent back to wait, without calling a device.",
            )?,
            handoff_failures: IntCounter::new(
                "flotilla_worker_handoff_failures_total",
                "Failed hand-offs (a lane's commit of what follows, the events and the \
                 acks refused, or its channel broken); each time, every delivery of the \
                 worker went back to the queue at once.",
            )?,
            deliveries: IntCounter::new(
                "flotilla_worker_deliveries_total",
                "Job messages this worker took from the jobs queue (each a broker \
                 round trip: what the benchmark counts per device).",
            )?,
            redeliveries_dropped: IntCounter::new(
                "flotilla_worker_redeliveries_dropped_total",
                "Redelivered deliveries dropped unrun: their hand-off was on the broker \
                 already (a worker died between its commit and its ack).",
            )?,
        };
        registry.register(Box::new(metrics.steps.clone()))?;
        registry.register(Box::new(metrics.step_seconds.clone()))?;
        registry.register(Box::new(metrics.device_requests.clone()))?;
        registry.register(Box::new(metrics.jobs_finished.clone()))?;
        registry.register(Box::new(metrics.in_flight.clone()))?;
        registry.register(Box::new(metrics.poll_lateness.clone()))?;
        registry.register(Box::new(metrics.dead_lettered.clone()))?;
        registry.register(Box::new(metrics.verified.clone()))?;
        registry.register(Box::new(metrics.reconnects.clone()))?;
        registry.register(Box::new(metrics.parked.clone()))?;
        registry.register(Box::new(metrics.handoff_failures.clone()))?;
        registry.register(Box::new(metrics.deliveries.clone()))?;
        registry.register(Box::new(metrics.redeliveries_dropped.clone()))?;
        metrics.start_known_series_at_zero();
        Ok(metrics)
    }

    /// A fresh, unregistered set (for code paths that need metrics but are
    /// not scraped, such as unit tests).
    pub fn unregistered() -> Self {
        // Registering on a new registry cannot collide.
        WorkerMetrics::new(&Registry::new()).expect("a new registry has no metrics yet")
    }

    fn start_known_series_at_zero(&self) {
        for kind in DeviceKind::ALL {
            for class in STATUS_CLASSES {
                self.device_requests
                    .with_label_values(&[kind.as_str(), class]);
            }
        }
        for reason in DEAD_LETTER_REASONS {
            self.dead_lettered.with_label_values(&[reason]);
        }
    }

    pub fn step(&self, kind: DeviceKind, step: &str, result: &str, took: Duration) {
        self.steps
            .with_label_values(&[kind.as_str(), step, result])
            .inc();
        self.step_seconds
            .with_label_values(&[kind.as_str(), step])
            .observe(took.as_secs_f64());
    }

    pub fn device_request(&self, kind: DeviceKind, status_class: &str) {
        self.device_requests
            .with_label_values(&[kind.as_str(), status_class])
            .inc();
    }

    /// The first job of a campaign a worker sees starts that campaign's
    /// outcome series at zero, so rates and ratios exist before a failure.
    pub fn campaign_seen(&self, campaign: &str, kind: DeviceKind) {
        for outcome in Outcome::ALL {
            self.jobs_finished
                .with_label_values(&[campaign, kind.as_str(), outcome.as_str(), ""]);
        }
    }

    pub fn job_finished(&self, campaign: &str, kind: DeviceKind, ending: &Ending) {
        let class = ending.error_class.map(|c| c.as_str()).unwrap_or("");
        self.jobs_finished
            .with_label_values(&[campaign, kind.as_str(), ending.outcome.as_str(), class])
            .inc();
    }

    pub fn in_flight(&self) -> &IntGauge {
        &self.in_flight
    }

    pub fn poll_lateness(&self, late: Duration) {
        self.poll_lateness.observe(late.as_secs_f64());
    }

    pub fn dead_lettered(&self, reason: &str) {
        self.dead_lettered.with_label_values(&[reason]).inc();
    }

    /// Starts the verified count of each of the worker's keys at zero.
    pub fn keys_held<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        for id in ids {
            self.verified.with_label_values(&[id]);
        }
    }

    /// A delivery verified with the key `id` (one the worker holds).
    pub fn verified(&self, id: &str) {
        self.verified.with_label_values(&[id]).inc();
    }

    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    pub fn parked(&self) {
        self.parked.inc();
    }

    pub fn handoff_failed(&self) {
        self.handoff_failures.inc();
    }

    pub fn delivered(&self) {
        self.deliveries.inc();
    }

    pub fn redelivery_dropped(&self) {
        self.redeliveries_dropped.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_of_most_of_an_hour_gets_a_bucket_below_infinity() {
        let registry = Registry::new();
        let metrics = WorkerMetrics::new(&registry).unwrap();
        metrics.step(
            DeviceKind::Sps,
            "upload",
            "ok",
            Duration::from_secs(50 * 60),
        );
        let family = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "flotilla_worker_step_duration_seconds")
            .unwrap();
        let histogram = family.get_metric()[0].get_histogram();
        let cumulative = |le: f64| {
            histogram
                .get_bucket()
                .iter()
                .find(|b| b.upper_bound() == le)
                .map(|b| b.cumulative_count())
        };
        assert_eq!(cumulative(1800.0), Some(0));
        assert_eq!(cumulative(3600.0), Some(1));
    }
}
