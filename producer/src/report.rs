//! What `status`, `report` and `history` print, rendered from the events.

use crate::{
    state::{CampaignState, Phase},
    status_view::Pace,
};
use chrono::{DateTime, Utc};
use flotilla_common::{Decision, Event, EventBody, Outcome, PauseCause};
use serde::Serialize;
use std::{collections::BTreeMap, fmt::Write as _, io};

/// The campaign's phase, waves, outcomes, pace and decisions, as of now.
pub fn status(state: &CampaignState) -> String {
    status_at(state, Utc::now())
}

/// [`status`] as of `now`.
pub fn status_at(state: &CampaignState, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let id = state.campaign();
    let last_reason = state
        .decisions()
        .last()
        .map(|d| d.reason.as_str())
        .unwrap_or("");
    let phase = match state.phase() {
        Phase::New => format!("campaign {id}: not started (no events for it on this broker)"),
        Phase::Running => format!("campaign {id}: running"),
        Phase::Paused(cause) => format!(
            "campaign {id}: PAUSED ({}) - {last_reason}\n  `flotilla-producer resume {id}` continues it",
            pause_cause(cause)
        ),
        Phase::Cancelled => format!("campaign {id}: cancelled - {last_reason}"),
        Phase::Completed => format!("campaign {id}: completed"),
    };
    let _ = writeln!(out, "{phase}\n");

    let _ = writeln!(
        out,
        "{:<6} {:>8} {:>8} {:>9} {:>10} {:>7} {:>10}  gate",
        "wave", "devices", "started", "finished", "succeeded", "failed", "cancelled"
    );
    for wave in 0..state.wave_count() {
        let tally = state.wave(wave);
        let gate = gate(state, wave).unwrap_or("");
        let _ = writeln!(
            out,
            "{:<6} {:>8} {:>8} {:>9} {:>10} {:>7} {:>10}  {gate}",
            wave + 1,
            state.wave_size(wave),
            tally.published,
            tally.finished,
            tally.succeeded,
            tally.failed,
            tally.cancelled
        );
    }
    let totals = state.totals();
    let devices = state.device_count();
    let _ = writeln!(
        out,
        "{:<6} {:>8} {:>8} {:>9} {:>10} {:>7} {:>10}\n",
        "total",
        devices,
        totals.published,
        totals.finished,
        totals.succeeded,
        totals.failed,
        totals.cancelled
    );
    if state.phase() != Phase::New {
        let _ = writeln!(out, "{}\n", Pace::of(state, now).describe(state, now));
    }
    let limits = state.rate_limits();
    if !limits.is_empty() {
        let _ = writeln!(out, "hosts slowed down by the adaptive rate:");
        for (host, limit) in limits {
            let _ = writeln!(
                out,
                "  {host:<24} {:.1} starts/min (full rate {:.1})",
                limit.per_minute, limit.full_per_minute
            );
        }
        let _ = writeln!(out);
    }

    let mut by_kind: BTreeMap<String, BTreeMap<Outcome, u64>> = BTreeMap::new();
    for ((kind, outcome), n) in state.counts_by_kind() {
        *by_kind
            .entry(kind.to_string())
            .or_default()
            .entry(*outcome)
            .or_default() += n;
    }
    if !by_kind.is_empty() {
        let _ = writeln!(out, "outcomes by kind:");
        for (kind, outcomes) in by_kind {
            let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
            let _ = writeln!(out, "  {kind:<12} {}", parts.join(", "));
        }
        let _ = writeln!(out);
    }

    let _ = writeln!(out, "decisions:");
    for decision in state.decisions() {
        let _ = writeln!(
            out,
            "  #{:<3} {:<14} {}{}",
            decision.seq,
            decision_name(&decision.decision),
            decision.reason,
            thresholds(decision)
        );
    }
    out
}

/// Where a wave's success gate stands.
pub fn gate(state: &CampaignState, wave: u32) -> Option<&'static str> {
    if state.released(wave) {
        Some("released")
    } else if state.gate_passed(wave) {
        Some("passed")
    } else if state.current_wave() == Some(wave) {
        Some("current")
    } else {
        None
    }
}

fn pause_cause(cause: PauseCause) -> &'static str {
    match cause {
        PauseCause::WaveBudget => "wave failure budget",
        PauseCause::CampaignBudget => "campaign failure budget",
        PauseCause::GateNotMet => "success gate not met",
        PauseCause::Approval => "awaiting approval",
        PauseCause::Operator => "by an operator",
    }
}

pub fn decision_name(decision: &Decision) -> String {
    match decision {
        Decision::Started { .. } => "started".into(),
        Decision::WaveStarted { wave } => format!("wave {} start", wave + 1),
        Decision::GatePassed { wave } => format!("wave {} gate", wave + 1),
        Decision::Paused { .. } => "paused".into(),
        Decision::Resumed => "resumed".into(),
        Decision::WindowClosed { .. } => "window closed".into(),
        Decision::RateChanged(_) => "rate changed".into(),
        Decision::Cancelled => "cancelled".into(),
        Decision::Completed => "completed".into(),
    }
}

fn thresholds(decision: &flotilla_common::DecisionEvent) -> String {
    let t = &decision.thresholds;
    let mut parts = Vec::new();
    if let Some(gate) = t.success_gate {
        parts.push(format!("gate {:.0}%", gate * 100.0));
    }
    if let Some(ratio) = t.failure_ratio {
        parts.push(format!("budget {:.0}%", ratio * 100.0));
    }
    if let Some(min) = t.min_finished {
        parts.push(format!("min finished {min}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("  [{}]", parts.join(", "))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Json,
}

/// One report row per device.
#[derive(Debug, Serialize)]
pub struct ReportRow {
    pub device: String,
    pub kind: String,
    pub wave: Option<u32>,
    pub outcome: String,
    pub error_class: String,
    pub last_step: String,
    pub steps: u32,
    pub retries: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_s: Option<f64>,
    pub target_version: String,
    pub needs_attention: bool,
    pub error: String,
    /// Driver detail (per gateway for a NetProfiler), as JSON.
    pub detail: String,
}

pub fn rows(state: &CampaignState) -> Vec<ReportRow> {
    let target_version = state.plan().map_or("", |p| p.target_version.as_str());
    let mut rows: Vec<ReportRow> = state
        .devices()
        .map(|(id, record)| {
            let finished = record.finished(id);
            let finished = finished.as_ref();
            let started = record.first_step_at().or(record.published_at());
            ReportRow {
                device: id.to_owned(),
                kind: record.kind().map(|k| k.to_string()).unwrap_or_default(),
                wave: record.wave().map(|w| w + 1),
                outcome: finished
                    .map_or("in_progress".to_owned(), |f| f.ending.outcome.to_string()),
                error_class: finished
                    .and_then(|f| f.ending.error_class)
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
                last_step: finished
                    .map(|f| f.last_step.clone())
                    .or_else(|| record.last_step().map(str::to_owned))
                    .unwrap_or_default(),
                steps: record.steps(),
                retries: record.retries(),
                started_at: started,
                finished_at: record.finished_at(),
                duration_s: started
                    .zip(record.finished_at())
                    .map(|(s, f)| (f - s).num_milliseconds() as f64 / 1000.0),
                target_version: target_version.to_owned(),
                needs_attention: finished.is_some_and(|f| f.ending.needs_attention),
                error: finished
                    .and_then(|f| f.ending.error.clone())
                    .unwrap_or_default(),
                detail: finished
                    .and_then(|f| f.ending.detail.as_ref())
                    .map(|d| d.to_string())
                    .unwrap_or_default(),
            }
        })
        .collect();
    rows.sort_by(|a, b| a.device.cmp(&b.device));
    rows
}

pub fn write_report(rows: &[ReportRow], format: Format, out: impl io::Write) -> io::Result<()> {
    match format {
        Format::Json => serde_json::to_writer_pretty(out, rows).map_err(io::Error::other),
        Format::Csv => {
            let mut csv = csv::Writer::from_writer(out);
            for row in rows {
                csv.serialize(row).map_err(io::Error::other)?;
            }
            csv.flush()
        }
    }
}

/// One device's events, one line each.
pub fn history(device: &str, events: &[Event]) -> String {
    let mut out = String::new();
    for event in events {
        let at = event.at.format("%Y-%m-%d %H:%M:%S%.3f");
        let line = match &event.body {
            EventBody::Published(p) => format!("published in wave {}", p.wave.map_or(1, |w| w + 1)),
            EventBody::Claim(c) => format!(
                "claimed room behind {}",
                c.targets
                    .iter()
                    .map(|t| t.key.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            EventBody::Step(s) => {
                let mut line = format!("{:<26} try {}  {}ms", s.step, s.attempt, s.duration_ms);
                match (&s.next, s.delay_ms, &s.error) {
                    (Some(next), Some(delay), Some(error)) if next == &s.step => {
                        let _ = write!(line, "  -> retry in {delay}ms: {error}");
                    }
                    (Some(next), Some(delay), _) => {
                        let _ = write!(line, "  -> {next} in {delay}ms");
                    }
                    (Some(next), None, _) => {
                        let _ = write!(line, "  -> {next}");
                    }
                    (None, _, Some(error)) => {
                        let _ = write!(line, "  error: {error}");
                    }
                    (None, _, None) => {}
                }
                if let Some(note) = &s.note {
                    let _ = write!(line, "  ({note})");
                }
                if let Some(worker) = &s.worker {
                    let _ = write!(line, "  [{worker}]");
                }
                line
            }
            EventBody::Finished(f) => {
                let mut line = format!("FINISHED {} after {}", f.ending.outcome, f.last_step);
                if let Some(error) = &f.ending.error {
                    let _ = write!(line, ": {error}");
                }
                line
            }
            EventBody::DeadLettered(d) => {
                format!("DEAD-LETTERED {}: {}", d.reason, d.detail)
            }
            EventBody::Decision(_) => continue,
        };
        let _ = writeln!(out, "{at}  {line}");
    }
    if out.is_empty() {
        let _ = writeln!(out, "no events for device {device}");
    }
    out
}
