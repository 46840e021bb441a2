//! What a forecast found, and how it is shown: as text for a person, or as
//! one JSON document for scripts.

use super::Assumptions;
use chrono::{DateTime, Utc};
use flotilla_common::PauseCause;
use serde::Serialize;
use std::{fmt::Write, time::Duration};

/// The controller's course in virtual time.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub duration: Duration,
    pub waves: Vec<WaveTimes>,
    /// Every API host, busiest first.
    pub hosts: Vec<InFlightPeak>,
    pub image: InFlightPeak,
    pub windows: Vec<WindowWait>,
    pub pauses: Vec<Pause>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WaveTimes {
    /// From 1.
    pub wave: u32,
    pub devices: u64,
    /// When its first device starts.
    pub starts_at: DateTime<Utc>,
    /// When its last device ends.
    pub ends_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InFlightPeak {
    /// `host:<host:port>` or `image:<host:port>`.
    pub target: String,
    pub peak: u64,
    pub cap: Option<u32>,
    /// The cap was reached: it held devices back.
    pub binds: bool,
    /// How long the target was at its cap.
    pub at_cap_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WindowWait {
    /// When devices stopped starting.
    pub from: DateTime<Utc>,
    pub opens_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Pause {
    pub at: DateTime<Utc>,
    /// From 1.
    pub wave: Option<u32>,
    pub cause: PauseCause,
    /// Devices finished and failed by then, in the whole campaign.
    pub finished: u64,
    pub failed: u64,
    pub reason: String,
}

/// A forecast as one JSON document (`--format json`).
#[derive(Debug, Serialize)]
pub struct ForecastJson<'a> {
    pub campaign: &'a str,
    pub devices: u64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub duration_seconds: f64,
    pub waves: &'a [WaveTimes],
    /// Every API host, busiest first, then the image server.
    pub in_flight: Vec<&'a InFlightPeak>,
    pub windows: &'a [WindowWait],
    pub pauses: &'a [Pause],
    pub assumed_seconds: std::collections::BTreeMap<String, f64>,
    pub failure_ratio: f64,
}

impl<'a> ForecastJson<'a> {
    pub fn of(
        campaign: &'a str,
        devices: u64,
        timeline: &'a Timeline,
        assumptions: &Assumptions,
    ) -> Self {
        ForecastJson {
            campaign,
            devices,
            starts_at: timeline.starts_at,
            ends_at: timeline.ends_at,
            duration_seconds: timeline.duration.as_secs_f64().round(),
            waves: &timeline.waves,
            in_flight: timeline
                .hosts
                .iter()
                .chain(std::iter::once(&timeline.image))
                .collect(),
            windows: &timeline.windows,
            pauses: &timeline.pauses,
            assumed_seconds: assumptions
                .durations
                .iter()
                .map(|(kind, d)| (kind.to_string(), d.as_secs_f64()))
                .collect(),
            failure_ratio: assumptions.failure_ratio,
        }
    }
}

/// Hosts shown by name in the text; the rest are summed up.
const HOSTS_SHOWN: usize = 8;
/// Pauses shown in the text (a budget passed all along pauses again after
/// every resume); the rest are summed up.
const PAUSES_SHOWN: usize = 3;

/// The forecast for a person.
pub fn text(
    campaign: &str,
    devices: u64,
    timeline: &Timeline,
    assumptions: &Assumptions,
) -> String {
    let mut out = String::new();
    let assumed: Vec<String> = assumptions
        .durations
        .iter()
        .map(|(kind, d)| format!("{kind} {}", span(*d)))
        .collect();
    let _ = writeln!(
        out,
        "forecast for campaign {campaign}: {devices} device(s), assuming {} per device and {:.1}% failing",
        assumed.join(", "),
        assumptions.failure_ratio * 100.0
    );
    let offset = |at: DateTime<Utc>| span((at - timeline.starts_at).to_std().unwrap_or_default());
    for wave in &timeline.waves {
        let _ = writeln!(
            out,
            "  wave {}: {} device(s), starts {} (+{}), ends {} (+{})",
            wave.wave,
            wave.devices,
            clock(wave.starts_at),
            offset(wave.starts_at),
            clock(wave.ends_at),
            offset(wave.ends_at)
        );
    }
    let _ = writeln!(out, "  in flight at most:");
    for peak in timeline.hosts.iter().take(HOSTS_SHOWN) {
        let _ = writeln!(out, "    {}", describe(peak));
    }
    if timeline.hosts.len() > HOSTS_SHOWN {
        let rest = &timeline.hosts[HOSTS_SHOWN..];
        let _ = writeln!(
            out,
            "    ... and {} more API host(s), at most {} each",
            rest.len(),
            rest.iter().map(|p| p.peak).max().unwrap_or(0)
        );
    }
    let _ = writeln!(out, "    {}", describe(&timeline.image));
    let binding: Vec<&str> = [
        ("per_host", timeline.hosts.iter().any(|p| p.binds)),
        ("per_image_host", timeline.image.binds),
    ]
    .into_iter()
    .filter(|(_, binds)| *binds)
    .map(|(name, _)| name)
    .collect();
    let _ = writeln!(
        out,
        "  binding cap: {}",
        if binding.is_empty() {
            "none (the start rate, the waves and the devices set the pace)".to_owned()
        } else {
            binding.join(" and ")
        }
    );
    if timeline.windows.is_empty() {
        let _ = writeln!(out, "  maintenance window: never waited for");
    }
    for wait in &timeline.windows {
        let _ = writeln!(
            out,
            "  waits for the window: {} to {} ({})",
            clock(wait.from),
            clock(wait.opens_at),
            span((wait.opens_at - wait.from).to_std().unwrap_or_default())
        );
    }
    for pause in timeline.pauses.iter().take(PAUSES_SHOWN) {
        let _ = writeln!(
            out,
            "  pauses ({}) at {}{}: {}",
            cause(pause.cause),
            clock(pause.at),
            pause
                .wave
                .map(|w| format!(" in wave {w}"))
                .unwrap_or_default(),
            pause.reason
        );
    }
    if let Some(last) = timeline
        .pauses
        .get(PAUSES_SHOWN..)
        .and_then(<[Pause]>::last)
    {
        let _ = writeln!(
            out,
            "  ... and {} more pause(s), the last ({}) at {}{}",
            timeline.pauses.len() - PAUSES_SHOWN,
            cause(last.cause),
            clock(last.at),
            last.wave
                .map(|w| format!(" in wave {w}"))
                .unwrap_or_default(),
        );
    }
    let _ = writeln!(
        out,
        "  takes {}: starts {}, ends {}",
        span(timeline.duration),
        clock(timeline.starts_at),
        clock(timeline.ends_at)
    );
    if !timeline.pauses.is_empty() {
        let _ = writeln!(
            out,
            "  (each pause counted as resumed at once; add the time a person takes)"
        );
    }
    out
}

fn describe(peak: &InFlightPeak) -> String {
    match peak.cap {
        Some(cap) if peak.binds => format!(
            "{}: {} of cap {cap}, binds (at the cap for {})",
            peak.target,
            peak.peak,
            span(Duration::from_secs_f64(peak.at_cap_seconds))
        ),
        Some(cap) => format!("{}: {} of cap {cap}", peak.target, peak.peak),
        None => format!("{}: {} (no cap)", peak.target, peak.peak),
    }
}

fn cause(cause: PauseCause) -> &'static str {
    match cause {
        PauseCause::WaveBudget => "wave failure budget",
        PauseCause::CampaignBudget => "campaign failure budget",
        PauseCause::GateNotMet => "success gate not met",
        PauseCause::Approval => "approval",
        PauseCause::Operator => "operator",
    }
}

fn clock(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// `6h15m`, `1m30s`, `2d3h`: two units at most.
pub fn span(duration: Duration) -> String {
    let total = duration.as_secs_f64().round() as u64;
    let (d, h, m, s) = (
        total / 86_400,
        total / 3600 % 24,
        total / 60 % 60,
        total % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if s == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h{m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d{h}h"),
    }
}
