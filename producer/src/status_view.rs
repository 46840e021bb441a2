//! What `status` says about a campaign beyond its counts: how fast devices
//! finish and when the campaign should end at that pace, and the whole
//! status as one JSON document (`status --format json`) with the stable
//! fields the README lists.

use crate::{
    exit::Exit,
    report,
    state::{CampaignState, Phase},
};
use chrono::{DateTime, Duration, Utc};
use flotilla_common::{Decision, DecisionEvent, PauseCause, RateChange, Thresholds};
use serde::Serialize;
use std::collections::BTreeMap;

/// The pace is measured over this much of the recent past: long enough to
/// smooth over one slow device, short enough to follow a ramp or a slower
/// wave.
pub const RATE_WINDOW: Duration = Duration::minutes(5);

/// How fast a campaign's devices finish, and when it would end at that pace.
#[derive(Debug, Clone, PartialEq)]
pub struct Pace {
    /// Devices finished per minute over `window`; `None` before the first
    /// device started.
    pub per_minute: Option<f64>,
    /// How much of the past the rate covers: [`RATE_WINDOW`], or less for
    /// a campaign younger than that.
    pub window: Duration,
    /// When the last device should finish at this rate: only for a running
    /// campaign with devices left and a rate above zero.
    pub eta: Option<DateTime<Utc>>,
    /// When the first device was started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the last device finished, once every device has.
    pub ended_at: Option<DateTime<Utc>>,
}

impl Pace {
    /// The pace as of `now`. A completed campaign is measured as of its
    /// last device's end, so its rate stays what it was at the finish.
    pub fn of(state: &CampaignState, now: DateTime<Utc>) -> Pace {
        let log = state.pace_log();
        let started_at = log.first_start();
        let last_finish = log.last_finish();
        let remaining = state.device_count().saturating_sub(state.totals().finished);
        let ended_at = last_finish.filter(|_| remaining == 0 && state.device_count() > 0);
        let now = ended_at.unwrap_or(now);
        let Some(first) = started_at else {
            return Pace {
                per_minute: None,
                window: Duration::zero(),
                eta: None,
                started_at,
                ended_at,
            };
        };
        let from = (now - RATE_WINDOW).max(first);
        let window = now - from;
        let finished = log.finished_between(from, now);
        // A window under a second says nothing yet.
        let per_minute = (window >= Duration::seconds(1))
            .then(|| finished as f64 * 60_000.0 / window.num_milliseconds() as f64);
        let eta = match (state.phase(), per_minute) {
            (Phase::Running, Some(rate)) if rate > 0.0 && remaining > 0 => {
                let minutes = remaining as f64 / rate;
                Some(now + Duration::milliseconds((minutes * 60_000.0) as i64))
            }
            _ => None,
        };
        Pace {
            per_minute,
            window,
            eta,
            started_at,
            ended_at,
        }
    }

    /// One line for people: "12.0 devices/min over the last 5m, ETA
    /// 14:05 UTC (in 40m)".
    pub fn describe(&self, state: &CampaignState, now: DateTime<Utc>) -> String {
        let mut line = match self.per_minute {
            Some(rate) => format!(
                "rate: {rate:.1} devices/min over the last {}",
                short(self.window)
            ),
            None => "rate: not known yet".to_owned(),
        };
        match (self.eta, state.phase()) {
            (Some(eta), _) => line.push_str(&format!(
                ", ETA {} (in {})",
                eta.format("%Y-%m-%d %H:%M UTC"),
                short(eta - now)
            )),
            (None, Phase::Paused(_)) => line.push_str(", no ETA while paused"),
            (None, Phase::Running) if self.per_minute == Some(0.0) => {
                line.push_str(", no ETA at this rate")
            }
            _ => {}
        }
        if let (Some(start), Some(end)) = (self.started_at, self.ended_at) {
            line.push_str(&format!(", took {}", short(end - start)));
        }
        line
    }
}

/// "45s", "12m", "3h20m".
fn short(duration: Duration) -> String {
    let seconds = duration.num_seconds().max(0);
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", (s + 30) / 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `status --format json`. Field names and meanings are stable; new
/// fields may be added. Waves are numbered from 1, as everywhere a person
/// reads them.
#[derive(Debug, Serialize)]
pub struct StatusJson {
    pub campaign: String,
    /// `new`, `running`, `paused`, `cancelled` (devices still finishing)
    /// or `completed`.
    pub phase: &'static str,
    /// Why it is paused: `wave_budget`, `campaign_budget`, `gate_not_met`,
    /// `approval` or `operator`.
    pub paused_by: Option<PauseCause>,
    /// Once completed: `succeeded`, `failed` (some devices failed or timed
    /// out) or `cancelled`; the same as `run`'s exit status.
    pub outcome: Option<&'static str>,
    pub target_version: Option<String>,
    pub devices: u64,
    pub started: u64,
    pub finished: u64,
    pub succeeded: u64,
    /// Failed or timed out.
    pub failed: u64,
    pub cancelled: u64,
    pub current_wave: Option<u32>,
    pub waves: Vec<WaveJson>,
    /// Finished devices by kind, then outcome.
    pub outcomes_by_kind: BTreeMap<String, BTreeMap<String, u64>>,
    pub rate_per_minute: Option<f64>,
    pub rate_window_seconds: i64,
    pub eta: Option<DateTime<Utc>>,
    pub eta_seconds: Option<i64>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub decisions: Vec<DecisionJson>,
    /// Hosts the adaptive rate holds below their full rate.
    pub rate_limits: Vec<RateLimitJson>,
}

#[derive(Debug, Serialize)]
pub struct WaveJson {
    pub wave: u32,
    pub devices: u64,
    pub started: u64,
    pub finished: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// `released` (approved by an operator), `passed`, `current` or `null`.
    pub gate: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct DecisionJson {
    pub seq: u32,
    /// `started`, `wave_started`, `gate_passed`, `paused`, `resumed`,
    /// `window_closed`, `rate_changed`, `cancelled` or `completed`.
    pub decision: &'static str,
    /// The wave a `wave_started` or `gate_passed` is about.
    pub wave: Option<u32>,
    /// A `paused` decision's cause.
    pub cause: Option<PauseCause>,
    /// When a `window_closed` decision's window opens again.
    pub opens_at: Option<DateTime<Utc>>,
    pub reason: String,
    pub thresholds: Thresholds,
    /// A `rate_changed` decision's host and numbers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateChange>,
}

/// A host the adaptive rate holds down.
#[derive(Debug, Serialize)]
pub struct RateLimitJson {
    pub host: String,
    pub per_minute: f64,
    pub full_per_minute: f64,
}

impl StatusJson {
    pub fn of(state: &CampaignState, now: DateTime<Utc>) -> StatusJson {
        let pace = Pace::of(state, now);
        let totals = state.totals();
        let phase = match state.phase() {
            Phase::New => "new",
            Phase::Running => "running",
            Phase::Paused(_) => "paused",
            Phase::Cancelled => "cancelled",
            Phase::Completed => "completed",
        };
        let outcome = (state.phase() == Phase::Completed).then(|| match Exit::of_campaign(state) {
            Exit::Cancelled => "cancelled",
            Exit::Failures => "failed",
            _ => "succeeded",
        });
        let mut outcomes_by_kind: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for ((kind, outcome), n) in state.counts_by_kind() {
            *outcomes_by_kind
                .entry(kind.to_string())
                .or_default()
                .entry(outcome.to_string())
                .or_default() += n;
        }
        StatusJson {
            campaign: state.campaign().to_owned(),
            phase,
            paused_by: match state.phase() {
                Phase::Paused(cause) => Some(cause),
                _ => None,
            },
            outcome,
            target_version: state.plan().map(|p| p.target_version.clone()),
            devices: state.device_count(),
            started: totals.published,
            finished: totals.finished,
            succeeded: totals.succeeded,
            failed: totals.failed,
            cancelled: totals.cancelled,
            current_wave: state.current_wave().map(|w| w + 1),
            waves: (0..state.wave_count())
                .map(|wave| {
                    let tally = state.wave(wave);
                    WaveJson {
                        wave: wave + 1,
                        devices: state.wave_size(wave),
                        started: tally.published,
                        finished: tally.finished,
                        succeeded: tally.succeeded,
                        failed: tally.failed,
                        cancelled: tally.cancelled,
                        gate: report::gate(state, wave),
                    }
                })
                .collect(),
            outcomes_by_kind,
            rate_per_minute: pace.per_minute,
            rate_window_seconds: pace.window.num_seconds(),
            eta: pace.eta,
            eta_seconds: pace.eta.map(|eta| (eta - now).num_seconds().max(0)),
            started_at: pace.started_at,
            ended_at: pace.ended_at,
            decisions: state.decisions().iter().map(DecisionJson::of).collect(),
            rate_limits: state
                .rate_limits()
                .into_iter()
                .map(|(host, limit)| RateLimitJson {
                    host: host.to_owned(),
                    per_minute: limit.per_minute,
                    full_per_minute: limit.full_per_minute,
                })
                .collect(),
        }
    }
}

impl DecisionJson {
    fn of(event: &DecisionEvent) -> DecisionJson {
        let (decision, wave, cause, opens_at) = match &event.decision {
            Decision::Started { .. } => ("started", None, None, None),
            Decision::WaveStarted { wave } => ("wave_started", Some(wave + 1), None, None),
            Decision::GatePassed { wave } => ("gate_passed", Some(wave + 1), None, None),
            Decision::Paused { cause } => ("paused", None, Some(*cause), None),
            Decision::Resumed => ("resumed", None, None, None),
            Decision::WindowClosed { opens_at } => ("window_closed", None, None, Some(*opens_at)),
            Decision::RateChanged(_) => ("rate_changed", None, None, None),
            Decision::Cancelled => ("cancelled", None, None, None),
            Decision::Completed => ("completed", None, None, None),
        };
        DecisionJson {
            seq: event.seq,
            decision,
            wave,
            cause,
            opens_at,
            reason: event.reason.clone(),
            thresholds: event.thresholds.clone(),
            rate: match &event.decision {
                Decision::RateChanged(change) => Some(change.clone()),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::{
        DecisionCounts, DeviceKind, Ending, Event, EventBody, FinishedEvent, PublishedEvent,
    };

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).expect("a valid time")
    }

    fn event(seconds: i64, body: EventBody) -> Event {
        Event {
            at: at(seconds),
            ..Event::new("c", body)
        }
    }

    fn started(devices: u64) -> Event {
        event(
            0,
            EventBody::Decision(DecisionEvent {
                seq: 1,
                decision: Decision::Started {
                    devices,
                    waves: vec![devices],
                    fingerprint: String::new(),
                    target_version: "7.2.1".into(),
                },
                reason: String::new(),
                counts: DecisionCounts::default(),
                thresholds: Thresholds::default(),
                control_offset: None,
            }),
        )
    }

    /// A campaign of `devices` that published them all at 0 s and
    /// finished one at each of `finishes` (seconds).
    fn campaign(devices: u64, finishes: &[i64]) -> CampaignState {
        let mut state = CampaignState::new("c");
        state.apply(&started(devices));
        for i in 0..devices {
            state.apply(&event(
                0,
                EventBody::Published(PublishedEvent {
                    device: format!("d{i}"),
                    kind: DeviceKind::Dms,
                    wave: Some(0),
                }),
            ));
        }
        for (i, seconds) in finishes.iter().enumerate() {
            state.apply(&event(
                *seconds,
                EventBody::Finished(FinishedEvent {
                    device: format!("d{i}"),
                    kind: DeviceKind::Dms,
                    seq: 3,
                    last_step: "poll_result".into(),
                    ending: Ending::succeeded(),
                    started_at: None,
                }),
            ));
        }
        state
    }

    #[test]
    fn the_rate_counts_the_last_five_minutes_and_the_eta_follows_it() {
        // 10 devices in the first minute, then 5 a minute for five minutes
        // (none in the ten seconds the window's edge falls in: finishes
        // are counted per ten seconds).
        let mut finishes: Vec<i64> = (1..=10).map(|i| i * 5).collect();
        finishes.extend((0..25).map(|i| 61 + i * 12));
        let state = campaign(100, &finishes);
        let now = at(360);
        let pace = Pace::of(&state, now);
        assert_eq!(pace.window, RATE_WINDOW);
        assert_eq!(pace.per_minute, Some(5.0));
        // 65 devices left at 5 a minute: 13 minutes.
        assert_eq!(pace.eta, Some(now + Duration::minutes(13)));
        let line = pace.describe(&state, now);
        assert!(
            line.starts_with("rate: 5.0 devices/min over the last 5m, ETA "),
            "{line}"
        );
        assert!(line.ends_with("(in 13m)"), "{line}");
    }

    #[test]
    fn a_young_campaign_is_measured_since_its_start() {
        let state = campaign(10, &[10, 20, 30]);
        let pace = Pace::of(&state, at(60));
        assert_eq!(pace.window, Duration::minutes(1));
        assert_eq!(pace.per_minute, Some(3.0));
        assert_eq!(pace.eta, Some(at(60) + Duration::seconds(140)));
    }

    #[test]
    fn a_finished_campaign_keeps_its_final_rate_and_has_no_eta() {
        let state = campaign(2, &[30, 60]);
        let pace = Pace::of(&state, at(3600));
        assert_eq!(pace.per_minute, Some(2.0));
        assert_eq!(pace.eta, None);
        assert_eq!(pace.ended_at, Some(at(60)));
        assert!(pace.describe(&state, at(3600)).ends_with(", took 1m"));
    }

    #[test]
    fn nothing_started_has_no_rate() {
        let mut state = CampaignState::new("c");
        state.apply(&started(3));
        assert_eq!(Pace::of(&state, at(10)).per_minute, None);
        let json = serde_json::to_value(StatusJson::of(&state, at(10))).unwrap();
        assert_eq!(json["phase"], "running");
        assert_eq!(json["rate_per_minute"], serde_json::Value::Null);
        assert_eq!(json["waves"][0]["wave"], 1);
        assert_eq!(json["decisions"][0]["decision"], "started");
    }
}
