//! What a job saw on its device before it acted (its *baseline*), carried
//! in the job beside the driver's step, so that every later step tells
//! the device's records of this job (a result, a backup, a fetch, a state
//! change) from older ones by observation alone: a record the baseline
//! does not hold, a history that grew, a state time that changed. No clock
//! is read for it, the device's or the worker's.
//!
//! A step that judges the device's answers and has no baseline yet (the
//! job's first step, or a step of a job written before baselines existed)
//! only observes: it records the baseline and runs the same step again at
//! once ([`BASELINE_STEP`] in events and metrics). The step that acts
//! therefore always carries a baseline, and so do its retries, whatever
//! the device's clock does meanwhile.
//!
//! The observing step itself may be a late copy (a redelivery after the
//! job acted): it tells the job's own records from older ones by the job's
//! publication read on the device's clock ([`crate::support::clock`]).
//! Without a `Date` header it counts every record as older (see there).
//!
//! On the wire a step with a baseline is `{"step": <step>, "baseline":
//! <baseline>}`, and one without is the bare step, as before baselines
//! existed: jobs in flight across an upgrade still decode. No driver has a
//! step named `step`.

use crate::driver::{Action, Next};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de::DeserializeOwned};

/// The name of a step that only records the baseline, in events and
/// metric labels.
pub(crate) const BASELINE_STEP: &str = "baseline";

/// A driver's step and its job's baseline (`B`), once recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Baselined<S, B> {
    pub(crate) step: S,
    pub(crate) baseline: Option<B>,
}

impl<S, B> Baselined<S, B> {
    /// A step before anything was observed (the first step).
    pub(crate) fn first(step: S) -> Self {
        Baselined {
            step,
            baseline: None,
        }
    }

    pub(crate) fn with(step: S, baseline: Option<B>) -> Self {
        Baselined { step, baseline }
    }
}

/// `next`, its steps carrying `baseline` on.
pub(crate) fn carry<S, B: Clone>(next: Next<S>, baseline: Option<&B>) -> Next<Baselined<S, B>> {
    let wrap = |step| Baselined::with(step, baseline.cloned());
    let action = match next.action {
        Action::Run(step) => Action::Run(wrap(step)),
        Action::Poll(step) => Action::Poll(wrap(step)),
        Action::Succeed(detail) => Action::Succeed(detail),
        Action::Done => Action::Done,
    };
    Next {
        action,
        note: next.note,
    }
}

/// The step that runs `step` again at once with the `baseline` just
/// recorded, described in its event by `note`.
pub(crate) fn recorded<S, B>(step: S, baseline: B, note: String) -> Next<Baselined<S, B>> {
    Next::run(Baselined::with(step, Some(baseline))).note(note)
}

#[derive(Serialize)]
struct WireRef<'a, S, B> {
    step: &'a S,
    baseline: &'a B,
}

#[derive(Deserialize)]
struct Wire<S, B> {
    step: S,
    #[serde(default = "Option::default")]
    baseline: Option<B>,
}

impl<S: Serialize, B: Serialize> Serialize for Baselined<S, B> {
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        match &self.baseline {
            None => self.step.serialize(serializer),
            Some(baseline) => WireRef {
                step: &self.step,
                baseline,
            }
            .serialize(serializer),
        }
    }
}

impl<'de, S: DeserializeOwned, B: DeserializeOwned> Deserialize<'de> for Baselined<S, B> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        let wrapped = value.as_object().is_some_and(|fields| {
            fields.contains_key("step") && fields.keys().all(|k| k == "step" || k == "baseline")
        });
        if wrapped {
            let wire: Wire<S, B> = serde_json::from_value(value).map_err(D::Error::custom)?;
            return Ok(Baselined::with(wire.step, wire.baseline));
        }
        // A bare step: no baseline yet, or written before baselines.
        S::deserialize(value)
            .map(Baselined::first)
            .map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Step {
        Begin,
        Wait { key: String },
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    struct Seen {
        ids: Vec<String>,
    }

    type Wrapped = Baselined<Step, Seen>;

    #[test]
    fn steps_without_a_baseline_are_written_as_before_and_old_ones_still_read() {
        let first = Wrapped::first(Step::Begin);
        assert_eq!(serde_json::to_value(&first).unwrap(), json!("begin"));
        let old: Wrapped = serde_json::from_value(json!({"wait": {"key": "k"}})).unwrap();
        assert_eq!(old, Wrapped::first(Step::Wait { key: "k".into() }));
    }

    #[test]
    fn a_baseline_rides_beside_its_step_and_comes_back_whole() {
        let step = Wrapped::with(
            Step::Wait { key: "k".into() },
            Some(Seen {
                ids: vec!["a".into()],
            }),
        );
        let value = serde_json::to_value(&step).unwrap();
        assert_eq!(
            value,
            json!({"step": {"wait": {"key": "k"}}, "baseline": {"ids": ["a"]}})
        );
        assert_eq!(serde_json::from_value::<Wrapped>(value).unwrap(), step);
        let no_baseline: Wrapped = serde_json::from_value(json!({"step": "begin"})).unwrap();
        assert_eq!(no_baseline, Wrapped::first(Step::Begin));
    }

    #[test]
    fn an_unknown_step_is_named_in_the_error() {
        let error = serde_json::from_value::<Wrapped>(json!("flash_the_bios")).unwrap_err();
        assert!(error.to_string().contains("flash_the_bios"), "{error}");
        let error = serde_json::from_value::<Wrapped>(json!({"step": "flash", "baseline": null}))
            .unwrap_err();
        assert!(error.to_string().contains("flash"), "{error}");
    }

    #[test]
    fn carry_keeps_the_decision_and_the_note() {
        let seen = Seen { ids: vec![] };
        let next = carry(Next::poll(Step::Begin).note("waiting"), Some(&seen));
        assert_eq!(next.note.as_deref(), Some("waiting"));
        let Action::Poll(step) = next.action else {
            panic!("still a poll");
        };
        assert_eq!(step, Wrapped::with(Step::Begin, Some(seen)));
        assert!(matches!(
            carry::<Step, Seen>(Next::succeeded(), None).action,
            Action::Succeed(None)
        ));
    }
}
