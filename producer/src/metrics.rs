//! The producer's metrics: the jobs it published and where its campaign
//! stands, for dashboards and for alerts on failure ratios and stalls.
//!
//! Everything is derived from the campaign's state as the controller sees
//! it, so the numbers agree with `flotilla-producer status`.

use crate::{Campaign, CampaignState, rollout::window::Window, state::Phase};
use chrono::Utc;
use flotilla_common::{DeviceKind, Outcome};
use prometheus::{
    GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use std::collections::{BTreeMap, BTreeSet};

/// The `state` label values of `flotilla_campaign_devices`.
const STATES: [&str; 6] = [
    "pending",
    "in_progress",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
];

pub struct ProducerMetrics {
    campaign: String,
    published: IntCounterVec,
    devices: IntGaugeVec,
    paused: IntGaugeVec,
    host_rate: GaugeVec,
    /// The hosts `host_rate` has a series for: one whose limit is lifted
    /// loses it.
    limited_hosts: BTreeSet<String>,
    /// Devices published per kind at the last observation; `None` before
    /// the first, so a restarted producer does not count the publications
    /// it only replayed.
    seen: Option<BTreeMap<DeviceKind, u64>>,
}

impl ProducerMetrics {
    /// Registers the metrics of `campaign` on `registry`, every known
    /// series at zero.
    pub fn new(registry: &Registry, campaign: &Campaign) -> prometheus::Result<Self> {
        let published = IntCounterVec::new(
            Opts::new(
                "flotilla_producer_jobs_published_total",
                "Jobs this producer published, by campaign and device kind.",
            ),
            &["campaign", "kind"],
        )?;
        let devices = IntGaugeVec::new(
            Opts::new(
                "flotilla_campaign_devices",
                "The campaign's devices by state: pending (not started), in_progress, or their outcome.",
            ),
            &["campaign", "state"],
        )?;
        let budget = GaugeVec::new(
            Opts::new(
                "flotilla_campaign_failure_budget_ratio",
                "The failure ratio past which the campaign pauses (its campaign budget, else its wave budget).",
            ),
            &["campaign"],
        )?;
        let min_finished = IntGaugeVec::new(
            Opts::new(
                "flotilla_campaign_failure_budget_min_finished",
                "Finished devices needed before the failure budget applies.",
            ),
            &["campaign"],
        )?;
        let paused = IntGaugeVec::new(
            Opts::new(
                "flotilla_campaign_paused",
                "1 while the campaign is paused (by its budget, a gate, an approval or an operator).",
            ),
            &["campaign"],
        )?;
        let host_rate = GaugeVec::new(
            Opts::new(
                "flotilla_campaign_host_rate_per_minute",
                "Starts per minute the adaptive rate holds an API host to while it is below \
                 full rate; no series for a host at full rate.",
            ),
            &["campaign", "host"],
        )?;
        registry.register(Box::new(published.clone()))?;
        registry.register(Box::new(host_rate.clone()))?;
        registry.register(Box::new(devices.clone()))?;
        registry.register(Box::new(budget.clone()))?;
        registry.register(Box::new(min_finished.clone()))?;
        registry.register(Box::new(paused.clone()))?;
        registry.register(Box::new(InWindow {
            campaign: campaign.id.clone(),
            window: campaign.rollout.window.clone(),
            gauge: IntGaugeVec::new(
                Opts::new(
                    "flotilla_campaign_in_window",
                    "1 while the campaign may start devices: inside its maintenance window, or it has none.",
                ),
                &["campaign"],
            )?,
        }))?;

        let id = campaign.id.as_str();
        for kind in DeviceKind::ALL {
            published.with_label_values(&[id, kind.as_str()]);
        }
        for state in STATES {
            devices.with_label_values(&[id, state]);
        }
        paused.with_label_values(&[id]);
        let rollout = &campaign.rollout;
        if let Some(limit) = rollout
            .campaign_budget
            .as_ref()
            .or(rollout.wave_budget.as_ref())
        {
            budget.with_label_values(&[id]).set(limit.ratio);
            min_finished
                .with_label_values(&[id])
                .set(i64::try_from(limit.min_finished).unwrap_or(i64::MAX));
        }
        Ok(ProducerMetrics {
            campaign: campaign.id.clone(),
            published,
            devices,
            paused,
            host_rate,
            limited_hosts: BTreeSet::new(),
            seen: None,
        })
    }

    /// Brings the metrics up to `state`.
    pub fn observe(&mut self, state: &CampaignState) {
        let id = self.campaign.as_str();
        let now = state.published_by_kind();
        if let Some(seen) = &self.seen {
            for (kind, count) in now {
                let before = seen.get(kind).copied().unwrap_or(0);
                self.published
                    .with_label_values(&[id, kind.as_str()])
                    .inc_by(count.saturating_sub(before));
            }
        }
        self.seen = Some(now.clone());

        let mut outcomes: BTreeMap<Outcome, u64> = BTreeMap::new();
        for ((_, outcome), n) in state.counts_by_kind() {
            *outcomes.entry(*outcome).or_default() += n;
        }
        let finished = state.totals().finished;
        let pending = state.unstarted();
        let in_progress = state
            .device_count()
            .saturating_sub(pending)
            .saturating_sub(finished);
        let outcome = |o| outcomes.get(&o).copied().unwrap_or(0);
        for (label, value) in [
            ("pending", pending),
            ("in_progress", in_progress),
            ("succeeded", outcome(Outcome::Succeeded)),
            ("failed", outcome(Outcome::Failed)),
            ("timed_out", outcome(Outcome::TimedOut)),
            ("cancelled", outcome(Outcome::Cancelled)),
            ("dead_lettered", outcome(Outcome::DeadLettered)),
        ] {
            self.devices
                .with_label_values(&[id, label])
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        let paused = matches!(state.phase(), Phase::Paused(_));
        self.paused.with_label_values(&[id]).set(i64::from(paused));

        let limits = state.rate_limits();
        for lifted in self
            .limited_hosts
            .iter()
            .filter(|host| !limits.contains_key(host.as_str()))
        {
            let _ = self.host_rate.remove_label_values(&[id, lifted]);
        }
        for (host, limit) in &limits {
            self.host_rate
                .with_label_values(&[id, host])
                .set(limit.per_minute);
        }
        self.limited_hosts = limits.keys().map(|host| (*host).to_owned()).collect();
    }
}

/// `flotilla_campaign_in_window`, worked out at each scrape: a window opens
/// and closes with the clock, not with an event the controller observes.
struct InWindow {
    campaign: String,
    window: Option<Window>,
    gauge: IntGaugeVec,
}

impl Collector for InWindow {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let open = self.window.as_ref().is_none_or(|w| w.is_open(Utc::now()));
        self.gauge
            .with_label_values(&[self.campaign.as_str()])
            .set(i64::from(open));
        self.gauge.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAMPAIGN: &str = r#"
id = "windowed"
[target]
version = "7.2.1"
image_url = "http://files.example.net/cpe/7.2.1.bin"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"#;

    fn in_window(campaign: &str) -> Vec<(String, f64)> {
        let registry = Registry::new();
        let _metrics =
            ProducerMetrics::new(&registry, &Campaign::parse(campaign).unwrap()).unwrap();
        let family = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "flotilla_campaign_in_window")
            .unwrap();
        family
            .get_metric()
            .iter()
            .map(|m| {
                (
                    m.get_label()[0].value().to_owned(),
                    m.get_gauge().get_value(),
                )
            })
            .collect()
    }

    #[test]
    fn a_limited_host_has_its_rate_until_the_limit_is_lifted() {
        use flotilla_common::{
            Decision, DecisionCounts, DecisionEvent, Event, EventBody, RateChange, Thresholds,
        };
        let campaign = Campaign::parse(CAMPAIGN).unwrap();
        let registry = Registry::new();
        let mut metrics = ProducerMetrics::new(&registry, &campaign).unwrap();
        let mut state = CampaignState::new("windowed");
        let change = |seq, host: &str, to: Option<f64>| {
            Event::new(
                "windowed",
                EventBody::Decision(DecisionEvent {
                    seq,
                    decision: Decision::RateChanged(RateChange {
                        host: host.into(),
                        from_per_minute: 300.0,
                        to_per_minute: to,
                        full_per_minute: 300.0,
                        calls: 20,
                        p95_ms: 900,
                        error_ratio: 0.0,
                    }),
                    reason: String::new(),
                    counts: DecisionCounts::default(),
                    thresholds: Thresholds::default(),
                    control_offset: None,
                }),
            )
        };
        let rates = |registry: &Registry| -> Vec<(String, f64)> {
            registry
                .gather()
                .into_iter()
                .filter(|f| f.name() == "flotilla_campaign_host_rate_per_minute")
                .flat_map(|f| f.get_metric().to_vec())
                .map(|m| {
                    (
                        m.get_label()[1].value().to_owned(),
                        m.get_gauge().get_value(),
                    )
                })
                .collect()
        };
        metrics.observe(&state);
        assert_eq!(rates(&registry), [], "no host is limited at the start");
        state.apply(&change(1, "dms-a:7547", Some(150.0)));
        state.apply(&change(2, "dms-b:7547", Some(75.0)));
        metrics.observe(&state);
        assert_eq!(
            rates(&registry),
            [
                ("dms-a:7547".to_owned(), 150.0),
                ("dms-b:7547".to_owned(), 75.0)
            ]
        );
        state.apply(&change(3, "dms-a:7547", None));
        state.apply(&change(4, "dms-b:7547", Some(38.0)));
        metrics.observe(&state);
        assert_eq!(rates(&registry), [("dms-b:7547".to_owned(), 38.0)]);
    }

    #[test]
    fn the_window_gauge_follows_the_clock() {
        assert_eq!(
            in_window(CAMPAIGN),
            [("windowed".to_owned(), 1.0)],
            "without a window devices may start at any time"
        );
        // A window that is not open now: one hour, three days from today.
        let day = |t: chrono::DateTime<Utc>| t.format("%a").to_string().to_lowercase();
        let other_day = day(Utc::now() + chrono::Duration::days(3));
        let closed = format!(
            "{CAMPAIGN}[window]\ndays = [\"{other_day}\"]\nstart = \"03:00\"\nend = \"04:00\"\ntime_zone = \"UTC\"\n"
        );
        assert_eq!(in_window(&closed), [("windowed".to_owned(), 0.0)]);
        // A window open now: from the last hour to the next, today.
        let now = Utc::now();
        let open = format!(
            "{CAMPAIGN}[window]\ndays = [\"{}\", \"{}\"]\nstart = \"{}\"\nend = \"{}\"\ntime_zone = \"UTC\"\n",
            day(now),
            day(now - chrono::Duration::days(1)),
            (now - chrono::Duration::hours(1)).format("%H:00"),
            (now + chrono::Duration::hours(2)).format("%H:00"),
        );
        assert_eq!(in_window(&open), [("windowed".to_owned(), 1.0)]);
    }
}
