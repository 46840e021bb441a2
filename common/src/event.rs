//! Events: what happened to each device, appended to the events stream.
//!
//! The stream is the campaign's source of truth: progress, status, reports
//! and the producer's resume after a crash are all rebuilt from it. Events
//! never hold a secret.

use crate::{DeviceKind, EVENT_MESSAGE_TYPE, EVENTS_MESSAGE_TYPE, Ending};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The event format version this build writes.
pub const EVENT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub v: u32,
    pub at: DateTime<Utc>,
    pub campaign: String,
    #[serde(flatten)]
    pub body: EventBody,
}

impl Event {
    pub fn new(campaign: impl Into<String>, body: EventBody) -> Self {
        Event {
            v: EVENT_VERSION,
            at: Utc::now(),
            campaign: campaign.into(),
            body,
        }
    }

    /// The device this event is about, if it is about one.
    pub fn device(&self) -> Option<&str> {
        match &self.body {
            EventBody::Published(p) => Some(&p.device),
            EventBody::Step(s) => Some(&s.device),
            EventBody::Finished(f) => Some(&f.device),
            EventBody::Claim(c) => Some(&c.device),
            EventBody::DeadLettered(d) => Some(&d.device),
            EventBody::Decision(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// The producer published this device's job (confirmed by the broker).
    Published(PublishedEvent),
    /// A worker ran one step of a device's job.
    Step(StepEvent),
    /// A device's job reached its terminal state.
    Finished(FinishedEvent),
    /// A campaign controller decided something about its campaign.
    Decision(DecisionEvent),
    /// A controller asks for room for a device behind shared targets
    /// (concurrency caps); see [`ClaimEvent`].
    Claim(ClaimEvent),
    /// A worker sent a device's job to the dead-letter queue: the device's
    /// terminal event, read as a `finished` one with the outcome
    /// `dead_lettered`. Its own type because the worker may not know the
    /// device's kind (a kind newer than the worker).
    DeadLettered(DeadLetteredEvent),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedEvent {
    pub device: String,
    pub kind: DeviceKind,
    /// The wave (0-based) the device was started in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u32>,
}

/// A request for room for one device behind capped shared targets (a DMS
/// host, an image server), shared by every campaign on the broker.
///
/// Claims are judged in stream order by every reader with the same rule:
/// admitted if, for each target, fewer devices than the claim's cap are in
/// flight (admitted and not finished). Two controllers racing for the last
/// slot therefore agree on the winner without talking to each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimEvent {
    pub device: String,
    pub targets: Vec<CappedTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CappedTarget {
    /// `host:<host:port>` for a device's API host, `image:<host:port>` for
    /// an image server.
    pub key: String,
    pub cap: u32,
}

/// What a controller decided, and what it was based on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionEvent {
    /// Orders a campaign's decisions; a restarted controller replays them
    /// and never writes one twice.
    pub seq: u32,
    #[serde(flatten)]
    pub decision: Decision,
    /// Why, in words, for `status`.
    pub reason: String,
    pub counts: DecisionCounts,
    #[serde(default)]
    pub thresholds: Thresholds,
    /// The control-stream offset of the command this decision answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_offset: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// The campaign's devices and waves, fixed for its whole life.
    Started {
        devices: u64,
        /// Devices started by the end of each wave (cumulative).
        waves: Vec<u64>,
        /// SHA-256 of the campaign and inventory files it was started with.
        fingerprint: String,
        /// The firmware version the campaign installs.
        target_version: String,
    },
    WaveStarted {
        wave: u32,
    },
    GatePassed {
        wave: u32,
    },
    Paused {
        cause: PauseCause,
    },
    Resumed,
    /// Devices are started only inside the maintenance window.
    WindowClosed {
        opens_at: DateTime<Utc>,
    },
    /// The adaptive rate changed the start rate of one API host, from what
    /// its devices' calls told over the last window.
    RateChanged(RateChange),
    Cancelled,
    Completed,
}

/// One change of an API host's start rate by the adaptive rate, and what
/// it judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateChange {
    /// The API host (`host:port`).
    pub host: String,
    /// Starts per minute before the change: the host's limit, or the rate
    /// it was getting when it had none.
    pub from_per_minute: f64,
    /// Starts per minute from now on; `None`: no limit of its own again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_per_minute: Option<f64>,
    /// The rate it was getting before its first cut, where a recovery
    /// lifts the limit.
    pub full_per_minute: f64,
    /// Calls judged, their p95 latency and the share that failed
    /// transiently.
    pub calls: u64,
    pub p95_ms: u64,
    pub error_ratio: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseCause {
    /// The wave's failure ratio passed its budget.
    WaveBudget,
    /// The campaign's failure ratio passed its budget.
    CampaignBudget,
    /// A wave finished without reaching its success gate.
    GateNotMet,
    /// The gate passed; a person must approve the next wave.
    Approval,
    /// An operator paused the campaign.
    Operator,
}

/// Counts at the moment of a decision. Failures include timeouts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionCounts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u32>,
    pub wave_size: u64,
    pub wave_published: u64,
    pub wave_finished: u64,
    pub wave_succeeded: u64,
    pub wave_failed: u64,
    pub devices: u64,
    pub published: u64,
    pub finished: u64,
    pub succeeded: u64,
    pub failed: u64,
}

/// The thresholds a decision compared the counts with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_gate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_finished: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEvent {
    pub device: String,
    pub kind: DeviceKind,
    /// The job's step counter when this step ran.
    pub seq: u32,
    pub step: String,
    pub attempt: u32,
    pub duration_ms: u64,
    /// The step that runs next, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// How long the job waits in a delay queue before `next`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// The transient error this step met, when it is being retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the device reported along the way (progress, a status message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Which worker ran the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// The device's HTTPS certificate was not checked: the operator turned
    /// checks off for its group. Said on every step, so no audit misses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_unverified: bool,
    /// How the step's calls to the device's API host went, for the
    /// controller's adaptive rate; absent when it made none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls: Option<CallSample>,
}

/// The device calls of one step, summed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallSample {
    /// The API host they went to (`host:port`, as the concurrency caps
    /// name it).
    pub host: String,
    pub count: u32,
    /// The slowest of them, until its answer was read.
    pub slowest_ms: u64,
    /// The transient failure the step met, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<CallFailure>,
}

/// A device call that failed in a way that says the host is struggling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallFailure {
    /// A 5xx answer.
    ServerError,
    Timeout,
    /// Refused, reset, or any other transport failure.
    Connection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinishedEvent {
    pub device: String,
    pub kind: DeviceKind,
    pub seq: u32,
    pub last_step: String,
    #[serde(flatten)]
    pub ending: Ending,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetteredEvent {
    pub device: String,
    /// The kind the job named, if this worker knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<DeviceKind>,
    /// The job's step counter, if it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    /// The dead-letter reason (`unknown_step`, `return_limit`, ...).
    pub reason: String,
    pub detail: String,
}

/// How events go into the events stream: a record holds one event
/// (`flotilla.event.v1`, its body the event) or several written together
/// (`flotilla.events.v1`, its body a JSON array of them, in order), so
/// what is written at once costs the stream one record. A record's
/// events share its offset; readers apply them all, in order, as one.
pub struct EventRecord;

impl EventRecord {
    /// The body and AMQP `type` of a record holding `events` (at least
    /// one).
    pub fn encode(events: &[Event]) -> (Vec<u8>, &'static str) {
        match events {
            [one] => (
                serde_json::to_vec(one).expect("an event serializes to JSON"),
                EVENT_MESSAGE_TYPE,
            ),
            several => (
                serde_json::to_vec(several).expect("events serialize to JSON"),
                EVENTS_MESSAGE_TYPE,
            ),
        }
    }

    /// The events of a record of AMQP type `kind` (a record without a
    /// type is read as one event, as every build before batches wrote).
    pub fn decode(kind: Option<&str>, body: &[u8]) -> Result<Vec<Event>, serde_json::Error> {
        if kind == Some(EVENTS_MESSAGE_TYPE) {
            serde_json::from_slice(body)
        } else {
            serde_json::from_slice(body).map(|event| vec![event])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorClass, Outcome};

    #[test]
    fn a_record_gives_back_its_events_in_order() {
        let published = |device: &str| {
            Event::new(
                "c",
                EventBody::Published(PublishedEvent {
                    device: device.into(),
                    kind: DeviceKind::Dms,
                    wave: Some(0),
                }),
            )
        };
        for events in [
            vec![published("d1")],
            vec![published("d1"), published("d2")],
        ] {
            let (body, kind) = EventRecord::encode(&events);
            assert_eq!(kind == EVENT_MESSAGE_TYPE, events.len() == 1);
            assert_eq!(EventRecord::decode(Some(kind), &body).unwrap(), events);
        }
        let (body, _) = EventRecord::encode(&[published("d1")]);
        assert_eq!(EventRecord::decode(None, &body).unwrap().len(), 1);
    }

    #[test]
    fn finished_event_is_flat_json_with_a_type_tag() {
        let event = Event::new(
            "fw-7.2",
            EventBody::Finished(FinishedEvent {
                device: "cpe-1".into(),
                kind: DeviceKind::Dms,
                seq: 7,
                last_step: "deactivate_rule".into(),
                ending: Ending::failed(ErrorClass::Device, "FaultCode 9010"),
                started_at: None,
            }),
        );
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "finished");
        assert_eq!(json["outcome"], "failed");
        assert_eq!(json["error_class"], "device");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back.device(), Some("cpe-1"));
        match back.body {
            EventBody::Finished(f) => assert_eq!(f.ending.outcome, Outcome::Failed),
            other => panic!("unexpected {other:?}"),
        }
    }
}
