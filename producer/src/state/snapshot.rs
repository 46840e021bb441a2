//! A campaign's state without its finished devices, written every second
//! for cheap readers (`status`, control commands) to go on from.

use super::{CampaignState, Phase, Plan, Tally, record::Stamp};
use crate::pace_log::PaceLog;
use chrono::{DateTime, Utc};
use flotilla_common::{DecisionCounts, DecisionEvent, DeviceKind, Outcome};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A campaign's state at one events-stream offset, without its finished
/// devices. Devices in flight are kept (with their wave) so that their
/// outcomes still count in the right wave, and so that a terminal event
/// repeated for a device that had already finished is known as a repeat.
///
/// `Id` is how a device's id is held: borrowed from the state when a
/// snapshot is written (a second's snapshot of 100,000 devices in flight
/// would otherwise copy each of their ids), owned when one is read back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot<Id = String> {
    pub campaign: String,
    plan: Option<Plan>,
    /// Published and not finished: device and wave.
    in_flight: Vec<(Id, Option<u32>)>,
    waves: Vec<Tally>,
    totals: Tally,
    finished_unpublished: u64,
    published_by_kind: Vec<(DeviceKind, u64)>,
    counts_by_kind: Vec<(DeviceKind, Outcome, u64)>,
    phase: Phase,
    current_wave: Option<u32>,
    gates_passed: BTreeSet<u32>,
    released: BTreeSet<u32>,
    baseline: DecisionCounts,
    decisions: Vec<DecisionEvent>,
    control_done: Option<u64>,
    window_closed_until: Option<DateTime<Utc>>,
    /// Absent from snapshots written before it existed.
    #[serde(default)]
    pace: PaceLog,
}

impl<Id> Snapshot<Id> {
    pub fn phase(&self) -> Phase {
        self.phase
    }
}

impl CampaignState {
    /// The state as a snapshot: everything but the finished devices.
    pub fn snapshot(&self) -> Snapshot<&str> {
        let mut in_flight: Vec<(&str, Option<u32>)> = self
            .devices
            .iter()
            .filter(|(_, r)| r.is_published() && !r.is_finished())
            .map(|(id, r)| (&**id, r.wave))
            .collect();
        in_flight.sort();
        Snapshot {
            campaign: self.campaign.clone(),
            plan: self.plan.clone(),
            in_flight,
            waves: self.waves.clone(),
            totals: self.totals,
            finished_unpublished: self.finished_unpublished,
            published_by_kind: self
                .published_by_kind
                .iter()
                .map(|(k, n)| (*k, *n))
                .collect(),
            counts_by_kind: self
                .counts_by_kind
                .iter()
                .map(|((k, o), n)| (*k, *o, *n))
                .collect(),
            phase: self.phase,
            current_wave: self.current_wave,
            gates_passed: self.gates_passed.clone(),
            released: self.released.clone(),
            baseline: self.baseline.clone(),
            decisions: self.decisions.clone(),
            control_done: self.control_done,
            window_closed_until: self.window_closed_until,
            pace: self.pace.clone(),
        }
    }

    /// Goes on from a snapshot: applying the events after the offset it
    /// covers gives the same counts, phase and decisions as replaying the
    /// campaign from its start (per-device details of finished devices, as
    /// `report` and `history` need, are not there).
    pub fn from_snapshot(snapshot: Snapshot) -> Self {
        let mut state = CampaignState::new(snapshot.campaign);
        state.partial = true;
        for (device, wave) in snapshot.in_flight {
            let record = state.record_mut(&device);
            record.wave = wave;
            // Not the real time: only "published" matters to what follows.
            record.published_at = Stamp::of(Some(DateTime::<Utc>::UNIX_EPOCH));
        }
        state.plan = snapshot.plan;
        state.waves = snapshot.waves;
        state.totals = snapshot.totals;
        state.finished_unpublished = snapshot.finished_unpublished;
        state.published_by_kind = snapshot.published_by_kind.into_iter().collect();
        state.counts_by_kind = snapshot
            .counts_by_kind
            .into_iter()
            .map(|(k, o, n)| ((k, o), n))
            .collect();
        state.phase = snapshot.phase;
        state.current_wave = snapshot.current_wave;
        state.gates_passed = snapshot.gates_passed;
        state.released = snapshot.released;
        state.baseline = snapshot.baseline;
        state.decisions = snapshot.decisions;
        state.control_done = snapshot.control_done;
        state.window_closed_until = snapshot.window_closed_until;
        state.pace = snapshot.pace;
        state
    }
}
