//! A campaign as its events tell it, folded one event at a time.
//!
//! The events stream is the source of truth: the controller rebuilds this
//! after a restart, and `status`, `report`, the demo and the tests read
//! campaigns through it. Applying an event twice (a published batch applied
//! locally, then read back) changes nothing.
//!
//! A [`Snapshot`] is the state without the devices that have finished: small
//! enough to write every second, and enough to go on from for `status` and
//! control commands (see [`CampaignState::from_snapshot`]).

use crate::pace_log::PaceLog;
use chrono::{DateTime, Utc};
use flotilla_common::{
    DeadLetteredEvent, Decision, DecisionCounts, DecisionEvent, DeviceKind, Ending, Event,
    EventBody, FinishedEvent, Outcome, PauseCause, StepEvent,
};
use record::{Finish, Stamp, StepNames};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

mod record;
mod snapshot;

pub use snapshot::Snapshot;

pub use record::DeviceRecord;

/// The last step of a device the campaign ended without starting it.
pub const NOT_STARTED: &str = "not_started";

/// What a campaign is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", content = "cause", rename_all = "snake_case")]
pub enum Phase {
    /// No `started` decision yet.
    New,
    Running,
    Paused(PauseCause),
    Cancelled,
    Completed,
}

/// Devices by where they are, for one wave or the whole campaign.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub published: u64,
    pub finished: u64,
    pub succeeded: u64,
    /// Failed, timed out or dead-lettered: each counts against the
    /// failure budgets.
    pub failed: u64,
    pub cancelled: u64,
}

impl Tally {
    fn count(&mut self, outcome: Outcome) {
        self.finished += 1;
        match outcome {
            Outcome::Succeeded => self.succeeded += 1,
            Outcome::Failed | Outcome::TimedOut | Outcome::DeadLettered => self.failed += 1,
            Outcome::Cancelled => self.cancelled += 1,
        }
    }

    fn uncount(&mut self, outcome: Outcome) {
        self.finished = self.finished.saturating_sub(1);
        let count = match outcome {
            Outcome::Succeeded => &mut self.succeeded,
            Outcome::Failed | Outcome::TimedOut | Outcome::DeadLettered => &mut self.failed,
            Outcome::Cancelled => &mut self.cancelled,
        };
        *count = count.saturating_sub(1);
    }
}

/// What a campaign was started with, from its `started` decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub devices: u64,
    /// Devices started by the end of each wave.
    pub wave_ends: Vec<u64>,
    pub fingerprint: String,
    pub target_version: String,
}

/// A host's start rate while the adaptive rate holds it down.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RateLimit {
    pub per_minute: f64,
    pub full_per_minute: f64,
}

#[derive(Debug)]
pub struct CampaignState {
    campaign: String,
    /// What the campaign was started with.
    plan: Option<Plan>,
    /// Every device heard of: what grows with the campaign (see
    /// [`DeviceRecord`]).
    devices: HashMap<Box<str>, DeviceRecord>,
    step_names: StepNames,
    waves: Vec<Tally>,
    totals: Tally,
    /// Devices finished without ever being published (cancelled first).
    finished_unpublished: u64,
    published_by_kind: BTreeMap<DeviceKind, u64>,
    counts_by_kind: BTreeMap<(DeviceKind, Outcome), u64>,
    phase: Phase,
    current_wave: Option<u32>,
    gates_passed: BTreeSet<u32>,
    /// Waves an operator released by resuming a gate or approval pause.
    released: BTreeSet<u32>,
    /// Counts when the campaign last resumed: budgets count failures since.
    baseline: DecisionCounts,
    decisions: Vec<DecisionEvent>,
    /// The last control-stream command a decision answered.
    control_done: Option<u64>,
    /// Until when the last `window_closed` decision said to wait.
    window_closed_until: Option<DateTime<Utc>>,
    /// Terminal events after a device's first (a redelivered last step).
    repeated: Vec<FinishedEvent>,
    retried_errors: Vec<String>,
    pace: PaceLog,
    /// Built from a snapshot: `devices` holds only those in flight when it
    /// was taken (and those seen since), so an unknown device has finished.
    partial: bool,
}

impl CampaignState {
    pub fn new(campaign: impl Into<String>) -> Self {
        CampaignState {
            campaign: campaign.into(),
            plan: None,
            devices: HashMap::new(),
            step_names: StepNames::default(),
            waves: Vec::new(),
            totals: Tally::default(),
            finished_unpublished: 0,
            published_by_kind: BTreeMap::new(),
            counts_by_kind: BTreeMap::new(),
            phase: Phase::New,
            current_wave: None,
            gates_passed: BTreeSet::new(),
            released: BTreeSet::new(),
            baseline: DecisionCounts::default(),
            decisions: Vec::new(),
            control_done: None,
            window_closed_until: None,
            repeated: Vec::new(),
            retried_errors: Vec::new(),
            pace: PaceLog::default(),
            partial: false,
        }
    }

    pub fn campaign(&self) -> &str {
        &self.campaign
    }

    /// What the campaign's pace is measured from.
    pub fn pace_log(&self) -> &PaceLog {
        &self.pace
    }

    /// Folds one event in; other campaigns' events are ignored.
    pub fn apply(&mut self, event: &Event) {
        if event.campaign != self.campaign {
            return;
        }
        match &event.body {
            EventBody::Published(published) => {
                let record = self.record_mut(&published.device);
                record.kind = Some(published.kind);
                if !record.published_at.is_set() {
                    record.published_at = Stamp::of(Some(event.at));
                    record.wave = published.wave;
                    self.pace.started(event.at);
                    self.totals.published += 1;
                    *self.published_by_kind.entry(published.kind).or_default() += 1;
                    if let Some(tally) = published.wave.and_then(|w| self.waves.get_mut(w as usize))
                    {
                        tally.published += 1;
                    }
                }
            }
            EventBody::Step(step) => self.apply_step(step, event.at),
            EventBody::Finished(finished) => self.apply_finished(finished, event.at),
            EventBody::DeadLettered(dead) => {
                if let Some(finished) = self.dead_lettered_as_finished(dead) {
                    self.apply_finished(&finished, event.at);
                }
            }
            EventBody::Decision(decision) => self.apply_decision(decision),
            EventBody::Claim(_) => {}
        }
    }

    fn apply_step(&mut self, step: &StepEvent, at: DateTime<Utc>) {
        if self.partial && !self.devices.contains_key(step.device.as_str()) {
            // A step of a device that had finished: a late redelivery.
            return;
        }
        let last_step = self.step_names.intern(&step.step);
        let record = self.record_mut(&step.device);
        record.kind = Some(step.kind);
        record.steps += 1;
        record.last_step = Some(last_step);
        let first = !record.first_step_at.is_set();
        if first {
            record.first_step_at = Stamp::of(Some(at));
        }
        if step.error.is_some() {
            record.retries += 1;
        }
        if first {
            self.pace.started(at);
        }
        if let Some(error) = &step.error {
            self.retried_errors.push(error.clone());
        }
    }

    fn apply_finished(&mut self, finished: &FinishedEvent, at: DateTime<Utc>) {
        if self.partial
            && !self.devices.contains_key(finished.device.as_str())
            && finished.last_step != NOT_STARTED
        {
            // Finished before the snapshot (only the controller ends a
            // device that was never published, as `not_started`).
            self.repeated.push(finished.clone());
            return;
        }
        let record = self.record_mut(&finished.device);
        match record.outcome() {
            // A redriven job's own outcome replaces its dead letter.
            Some(Outcome::DeadLettered) if finished.ending.outcome != Outcome::DeadLettered => {
                let (kind, wave) = (record.kind.unwrap_or(finished.kind), record.wave);
                self.totals.uncount(Outcome::DeadLettered);
                if let Some(tally) = wave.and_then(|w| self.waves.get_mut(w as usize)) {
                    tally.uncount(Outcome::DeadLettered);
                }
                if let Some(count) = self.counts_by_kind.get_mut(&(kind, Outcome::DeadLettered)) {
                    *count = count.saturating_sub(1);
                }
            }
            Some(_) => {
                self.repeated.push(finished.clone());
                return;
            }
            None => {
                if !record.published_at.is_set() {
                    self.finished_unpublished += 1;
                }
            }
        }
        let finish = Finish::of(finished, &mut self.step_names);
        let record = self.record_mut(&finished.device);
        record.kind = Some(finished.kind);
        record.finished = Some(finish);
        record.finished_at = Stamp::of(Some(at));
        let wave = record.wave;
        self.pace.finished(at);
        let outcome = finished.ending.outcome;
        self.totals.count(outcome);
        if let Some(tally) = wave.and_then(|w| self.waves.get_mut(w as usize)) {
            tally.count(outcome);
        }
        *self
            .counts_by_kind
            .entry((finished.kind, outcome))
            .or_default() += 1;
    }

    /// A dead letter of a device this campaign published, as its terminal
    /// event. One of a device it never published (a forged or stray job)
    /// ends nothing.
    fn dead_lettered_as_finished(&self, dead: &DeadLetteredEvent) -> Option<FinishedEvent> {
        let record = self.devices.get(dead.device.as_str())?;
        if !record.is_published() {
            return None;
        }
        Some(FinishedEvent {
            device: dead.device.clone(),
            kind: dead.kind.or(record.kind)?,
            seq: dead.seq.unwrap_or(0),
            last_step: record.last_step().unwrap_or(NOT_STARTED).to_owned(),
            ending: Ending::dead_lettered(&dead.reason, &dead.detail),
            started_at: None,
        })
    }

    fn apply_decision(&mut self, event: &DecisionEvent) {
        if self
            .decisions
            .last()
            .is_some_and(|last| event.seq <= last.seq)
        {
            return;
        }
        if let Some(offset) = event.control_offset {
            self.control_done = Some(self.control_done.map_or(offset, |done| done.max(offset)));
        }
        match &event.decision {
            Decision::Started {
                devices,
                waves,
                fingerprint,
                target_version,
            } => {
                self.plan = Some(Plan {
                    devices: *devices,
                    wave_ends: waves.clone(),
                    fingerprint: fingerprint.clone(),
                    target_version: target_version.clone(),
                });
                self.waves = vec![Tally::default(); waves.len()];
                self.phase = Phase::Running;
                if !self.partial {
                    // Room for every device at once: grown by doubling,
                    // the map would briefly hold its old table and its
                    // new one, half again its size, at the peak.
                    let more = usize::try_from(*devices)
                        .unwrap_or(0)
                        .saturating_sub(self.devices.len());
                    self.devices.reserve(more);
                }
            }
            Decision::WaveStarted { wave } => {
                self.current_wave = Some(*wave);
                self.phase = Phase::Running;
            }
            Decision::GatePassed { wave } => {
                self.gates_passed.insert(*wave);
            }
            Decision::Paused { cause } => self.phase = Phase::Paused(*cause),
            Decision::Resumed => {
                if let (Phase::Paused(PauseCause::GateNotMet | PauseCause::Approval), Some(wave)) =
                    (self.phase, self.current_wave)
                {
                    self.released.insert(wave);
                }
                self.baseline = event.counts.clone();
                self.phase = Phase::Running;
            }
            Decision::WindowClosed { opens_at } => self.window_closed_until = Some(*opens_at),
            // Read back from the decisions by the adaptive rate and `status`.
            Decision::RateChanged(_) => {}
            Decision::Cancelled => self.phase = Phase::Cancelled,
            Decision::Completed => self.phase = Phase::Completed,
        }
        self.decisions.push(event.clone());
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// What the campaign was started with.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// Devices in the campaign.
    pub fn device_count(&self) -> u64 {
        self.plan.as_ref().map_or(0, |p| p.devices)
    }

    pub fn current_wave(&self) -> Option<u32> {
        self.current_wave
    }

    pub fn wave(&self, wave: u32) -> Tally {
        self.waves.get(wave as usize).copied().unwrap_or_default()
    }

    /// How many devices wave `wave` has.
    pub fn wave_size(&self, wave: u32) -> u64 {
        let Some(Plan {
            wave_ends: ends, ..
        }) = &self.plan
        else {
            return 0;
        };
        let end = ends.get(wave as usize).copied().unwrap_or(0);
        let start = if wave == 0 {
            0
        } else {
            ends.get(wave as usize - 1).copied().unwrap_or(0)
        };
        end.saturating_sub(start)
    }

    pub fn wave_count(&self) -> u32 {
        self.waves.len() as u32
    }

    pub fn gate_passed(&self, wave: u32) -> bool {
        self.gates_passed.contains(&wave)
    }

    pub fn released(&self, wave: u32) -> bool {
        self.released.contains(&wave)
    }

    pub fn totals(&self) -> Tally {
        self.totals
    }

    /// Devices of the plan neither published nor finished.
    pub fn unstarted(&self) -> u64 {
        self.device_count()
            .saturating_sub(self.totals.published + self.finished_unpublished)
    }

    pub fn baseline(&self) -> &DecisionCounts {
        &self.baseline
    }

    pub fn decisions(&self) -> &[DecisionEvent] {
        &self.decisions
    }

    /// The API hosts the adaptive rate holds below their full rate, as its
    /// last decision for each said.
    pub fn rate_limits(&self) -> BTreeMap<&str, RateLimit> {
        let mut limits = BTreeMap::new();
        for event in &self.decisions {
            if let Decision::RateChanged(change) = &event.decision {
                match change.to_per_minute {
                    Some(per_minute) => limits.insert(
                        change.host.as_str(),
                        RateLimit {
                            per_minute,
                            full_per_minute: change.full_per_minute,
                        },
                    ),
                    None => limits.remove(change.host.as_str()),
                };
            }
        }
        limits
    }

    pub fn next_decision_seq(&self) -> u32 {
        self.decisions.last().map_or(1, |d| d.seq + 1)
    }

    pub fn control_done(&self) -> Option<u64> {
        self.control_done
    }

    pub fn window_closed_until(&self) -> Option<DateTime<Utc>> {
        self.window_closed_until
    }

    /// The counts a decision made now is based on.
    pub fn counts(&self) -> DecisionCounts {
        let wave = self.current_wave;
        let tally = wave.map(|w| self.wave(w)).unwrap_or_default();
        DecisionCounts {
            wave,
            wave_size: wave.map_or(0, |w| self.wave_size(w)),
            wave_published: tally.published,
            wave_finished: tally.finished,
            wave_succeeded: tally.succeeded,
            wave_failed: tally.failed,
            devices: self.device_count(),
            published: self.totals.published,
            finished: self.totals.finished,
            succeeded: self.totals.succeeded,
            failed: self.totals.failed,
        }
    }

    /// Whether the device was published or finished (as cancelled before
    /// it started).
    pub fn is_handled(&self, device: &str) -> bool {
        self.devices
            .get(device)
            .is_some_and(|r| r.is_published() || r.is_finished())
    }

    pub fn device(&self, device: &str) -> Option<&DeviceRecord> {
        self.devices.get(device)
    }

    pub fn devices(&self) -> impl Iterator<Item = (&str, &DeviceRecord)> {
        self.devices.iter().map(|(id, record)| (&**id, record))
    }

    /// The device's record, a new one if it has none (its id is copied
    /// only then).
    fn record_mut(&mut self, device: &str) -> &mut DeviceRecord {
        if !self.devices.contains_key(device) {
            self.devices.insert(device.into(), DeviceRecord::default());
        }
        self.devices
            .get_mut(device)
            .expect("the record was just inserted")
    }

    pub fn published(&self) -> usize {
        self.totals.published as usize
    }

    pub fn finished(&self) -> usize {
        self.totals.finished as usize
    }

    /// The device's terminal event (its first, or the redriven job's that
    /// replaced a dead letter).
    pub fn outcome_of(&self, device: &str) -> Option<FinishedEvent> {
        self.devices.get(device)?.finished(device)
    }

    pub fn outcomes(&self) -> impl Iterator<Item = FinishedEvent> + '_ {
        self.devices
            .iter()
            .filter_map(|(id, record)| record.finished(id))
    }

    /// Terminal events beyond each device's first.
    pub fn repeated_outcomes(&self) -> &[FinishedEvent] {
        &self.repeated
    }

    /// The errors of every step that was retried, in stream order.
    pub fn retried_errors(&self) -> &[String] {
        &self.retried_errors
    }

    /// Published devices by kind.
    pub fn published_by_kind(&self) -> &BTreeMap<DeviceKind, u64> {
        &self.published_by_kind
    }

    /// Finished devices by kind and outcome.
    pub fn counts_by_kind(&self) -> &BTreeMap<(DeviceKind, Outcome), u64> {
        &self.counts_by_kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::{Ending, ErrorClass, PublishedEvent, Thresholds};

    fn decision(seq: u32, decision: Decision) -> Event {
        Event::new(
            "c",
            EventBody::Decision(DecisionEvent {
                seq,
                decision,
                reason: String::new(),
                counts: DecisionCounts::default(),
                thresholds: Thresholds::default(),
                control_offset: None,
            }),
        )
    }

    fn published(device: &str) -> Event {
        Event::new(
            "c",
            EventBody::Published(PublishedEvent {
                device: device.into(),
                kind: DeviceKind::Dms,
                wave: Some(0),
            }),
        )
    }

    fn finished(device: &str, ending: Ending) -> Event {
        Event::new(
            "c",
            EventBody::Finished(FinishedEvent {
                device: device.into(),
                kind: DeviceKind::Dms,
                seq: 4,
                last_step: "deactivate_rule".into(),
                ending,
                started_at: None,
            }),
        )
    }

    fn dead(device: &str) -> Event {
        Event::new(
            "c",
            EventBody::DeadLettered(DeadLetteredEvent {
                device: device.into(),
                kind: None,
                seq: None,
                reason: "unknown_kind".into(),
                detail: "no driver for device kind \"toaster\"".into(),
            }),
        )
    }

    #[test]
    fn a_snapshot_and_the_events_after_it_count_as_the_whole_replay() {
        let before = [
            decision(
                1,
                Decision::Started {
                    devices: 3,
                    waves: vec![3],
                    fingerprint: "f".into(),
                    target_version: "7.2.1".into(),
                },
            ),
            decision(2, Decision::WaveStarted { wave: 0 }),
            published("d1"),
            published("d2"),
            finished("d1", Ending::succeeded()),
        ];
        let after = [
            // Seen again (the controller applied them before reading
            // them back), a repeated outcome, a late step.
            published("d2"),
            decision(2, Decision::WaveStarted { wave: 0 }),
            finished("d1", Ending::succeeded()),
            published("d3"),
            finished("d2", Ending::failed(ErrorClass::Device, "refused")),
            finished("d3", Ending::succeeded()),
        ];
        let mut whole = CampaignState::new("c");
        let mut taken = CampaignState::new("c");
        for event in &before {
            whole.apply(event);
            taken.apply(event);
        }
        let json = serde_json::to_string(&taken.snapshot()).unwrap();
        let mut partial = CampaignState::from_snapshot(serde_json::from_str(&json).unwrap());
        for event in &after {
            whole.apply(event);
            partial.apply(event);
        }
        assert_eq!(partial.totals(), whole.totals());
        assert_eq!(partial.wave(0), whole.wave(0));
        assert_eq!(partial.counts_by_kind(), whole.counts_by_kind());
        assert_eq!(partial.decisions().len(), whole.decisions().len());
        assert_eq!(partial.repeated_outcomes().len(), 1);
        assert_eq!(whole.totals().succeeded, 2);
        assert_eq!(whole.totals().failed, 1);
    }

    #[test]
    fn a_dead_letter_ends_its_device_until_a_redriven_job_finishes_it() {
        let mut state = CampaignState::new("c");
        state.apply(&published("d1"));
        state.apply(&dead("d1"));
        // A stray job's dead letter, of a device never published here.
        state.apply(&dead("ghost"));
        let ending = &state.outcome_of("d1").unwrap().ending;
        assert_eq!(ending.outcome, Outcome::DeadLettered);
        assert!(
            ending
                .error
                .as_deref()
                .unwrap()
                .starts_with("unknown_kind: ")
        );
        assert_eq!(state.outcome_of("d1").unwrap().kind, DeviceKind::Dms);
        assert_eq!(state.outcome_of("ghost"), None);
        assert_eq!((state.totals().finished, state.totals().failed), (1, 1));

        state.apply(&Event::new(
            "c",
            EventBody::Finished(FinishedEvent {
                device: "d1".into(),
                kind: DeviceKind::Dms,
                seq: 5,
                last_step: "verify".into(),
                ending: Ending::succeeded(),
                started_at: None,
            }),
        ));
        assert_eq!(
            state.outcome_of("d1").unwrap().ending.outcome,
            Outcome::Succeeded
        );
        let totals = state.totals();
        assert_eq!(
            (totals.finished, totals.succeeded, totals.failed),
            (1, 1, 0)
        );
        assert_eq!(
            state
                .counts_by_kind()
                .get(&(DeviceKind::Dms, Outcome::DeadLettered)),
            Some(&0)
        );
        assert!(state.repeated_outcomes().is_empty());
    }
}
