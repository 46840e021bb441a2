//! One device's story, kept small: a campaign's state holds a record for
//! every device it has heard of, so a record is what the state costs per
//! device (about 100 bytes with its key, against 650 when it held the
//! device's `finished` event whole).
//!
//! Times are nanoseconds in eight bytes; step names are shared between
//! records (a driver has a handful); a finished device keeps its outcome,
//! and its whole ending only when that says more than the outcome (an
//! error, a driver's detail), as one in ten devices' does in a typical
//! campaign.

use chrono::{DateTime, Utc};
use flotilla_common::{DeviceKind, Ending, FinishedEvent, Outcome};
use std::{collections::HashMap, sync::Arc};

/// One device's story so far.
#[derive(Debug, Clone, Default)]
pub struct DeviceRecord {
    pub(super) kind: Option<DeviceKind>,
    pub(super) wave: Option<u32>,
    pub(super) published_at: Stamp,
    pub(super) first_step_at: Stamp,
    pub(super) finished_at: Stamp,
    /// Steps run, retries and polls included.
    pub(super) steps: u32,
    /// Steps that met a transient error and were retried.
    pub(super) retries: u32,
    pub(super) last_step: Option<StepName>,
    pub(super) finished: Option<Finish>,
}

impl DeviceRecord {
    pub fn kind(&self) -> Option<DeviceKind> {
        self.kind
    }

    /// The wave (0-based) the device was started in.
    pub fn wave(&self) -> Option<u32> {
        self.wave
    }

    pub fn published_at(&self) -> Option<DateTime<Utc>> {
        self.published_at.get()
    }

    pub fn first_step_at(&self) -> Option<DateTime<Utc>> {
        self.first_step_at.get()
    }

    pub fn finished_at(&self) -> Option<DateTime<Utc>> {
        self.finished_at.get()
    }

    /// Steps run, retries and polls included.
    pub fn steps(&self) -> u32 {
        self.steps
    }

    /// Steps that met a transient error and were retried.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// The last step a worker reported (not the finished event's).
    pub fn last_step(&self) -> Option<&str> {
        self.last_step.as_deref().map(String::as_str)
    }

    pub fn is_published(&self) -> bool {
        self.published_at.is_set()
    }

    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.finished.as_ref().map(|f| f.outcome)
    }

    /// The device's terminal event, as it was written (`device` is the
    /// record's key).
    pub fn finished(&self, device: &str) -> Option<FinishedEvent> {
        let finish = self.finished.as_ref()?;
        Some(FinishedEvent {
            device: device.to_owned(),
            kind: self.kind?,
            seq: finish.seq,
            last_step: finish.last_step.to_string(),
            ending: finish.ending(),
            started_at: finish.started_at.get(),
        })
    }
}

/// What a device's terminal event said.
#[derive(Debug, Clone)]
pub(super) struct Finish {
    pub(super) seq: u32,
    pub(super) outcome: Outcome,
    pub(super) last_step: StepName,
    pub(super) started_at: Stamp,
    /// The whole ending, when it says more than `outcome`.
    pub(super) said: Option<Box<Ending>>,
}

impl Finish {
    pub(super) fn of(finished: &FinishedEvent, names: &mut StepNames) -> Self {
        let ending = &finished.ending;
        let plain = Ending {
            outcome: ending.outcome,
            ..Ending::succeeded()
        };
        Finish {
            seq: finished.seq,
            outcome: ending.outcome,
            last_step: names.intern(&finished.last_step),
            started_at: Stamp::of(finished.started_at),
            said: (*ending != plain).then(|| Box::new(ending.clone())),
        }
    }

    pub(super) fn ending(&self) -> Ending {
        match &self.said {
            Some(ending) => (**ending).clone(),
            None => Ending {
                outcome: self.outcome,
                ..Ending::succeeded()
            },
        }
    }
}

/// A step's name, shared by every record that names it. An `Arc<String>`
/// is one pointer where an `Arc<str>` is two: a record holds two names,
/// and a campaign a record per device.
pub(super) type StepName = Arc<String>;

/// The step names a campaign's records share.
#[derive(Debug, Default)]
pub(super) struct StepNames(HashMap<Box<str>, StepName>);

impl StepNames {
    pub(super) fn intern(&mut self, name: &str) -> StepName {
        if let Some(known) = self.0.get(name) {
            return known.clone();
        }
        let shared = StepName::new(name.to_owned());
        self.0.insert(name.into(), shared.clone());
        shared
    }
}

/// A moment to the nanosecond (as events carry it) in eight bytes: an
/// `Option<DateTime<Utc>>` takes sixteen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp(i64);

impl Default for Stamp {
    fn default() -> Self {
        Stamp::NONE
    }
}

impl Stamp {
    const NONE: Stamp = Stamp(i64::MIN);

    /// Moments outside 1677-2262 (which no event carries) are kept as
    /// none.
    pub(super) fn of(at: Option<DateTime<Utc>>) -> Self {
        at.and_then(|at| at.timestamp_nanos_opt())
            .map_or(Stamp::NONE, Stamp)
    }

    pub(super) fn get(self) -> Option<DateTime<Utc>> {
        self.is_set()
            .then(|| DateTime::from_timestamp_nanos(self.0))
    }

    pub(super) fn is_set(self) -> bool {
        self != Stamp::NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::ErrorClass;

    #[test]
    fn a_record_stays_small() {
        // What a campaign costs per device: a change that grows this
        // grows every campaign's state by as much per device.
        assert!(
            std::mem::size_of::<DeviceRecord>() <= 88,
            "{}",
            std::mem::size_of::<DeviceRecord>()
        );
    }

    #[test]
    fn a_record_gives_back_the_finished_event_it_was_told() {
        let mut names = StepNames::default();
        let at = Utc::now();
        for ending in [
            Ending::succeeded(),
            Ending::cancelled(),
            Ending::failed(ErrorClass::Device, "refused"),
            Ending {
                detail: Some(serde_json::json!({"gw": "ok"})),
                needs_attention: true,
                ..Ending::succeeded()
            },
        ] {
            let event = FinishedEvent {
                device: "d1".into(),
                kind: DeviceKind::Dms,
                seq: 7,
                last_step: "deactivate_rule".into(),
                ending,
                started_at: Some(at),
            };
            let record = DeviceRecord {
                kind: Some(DeviceKind::Dms),
                finished: Some(Finish::of(&event, &mut names)),
                ..DeviceRecord::default()
            };
            assert_eq!(record.finished("d1"), Some(event));
        }
        assert_eq!(names.0.len(), 1);
    }

    #[test]
    fn records_stay_small() {
        // The key (a boxed id) and the record: what a device costs beside
        // its id's own bytes and the map's control byte.
        assert!(std::mem::size_of::<(Box<str>, DeviceRecord)>() <= 128);
        assert_eq!(Stamp::of(None).get(), None);
        let at = Utc::now();
        assert_eq!(Stamp::of(Some(at)).get(), Some(at));
    }
}
