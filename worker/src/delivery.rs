//! Handling one delivery: decode, run its step, then hand off: what follows
//! (the next step, a delay, a parking, a dead letter) and its events, then
//! the delivery's ack, in transactions on the channel the delivery came on.
//!
//! What follows is committed first, the ack after (see [`commit`]): a
//! worker that dies anywhere before the ack leaves the message to be
//! redelivered. One that died after the commit had handed off already;
//! the [`fence`](crate::fence) recognises it and drops the redelivery. One
//! that died before runs the step again, which is why every driver step
//! observes the device before acting. A failed hand-off fails the channel
//! the delivery came on, so the delivery goes back to the queue at once. A
//! message that cannot be processed goes to the dead-letter queue with its
//! reason, in the same way; it is never dropped. A message that does not
//! verify (see [`flotilla_common::signing`]) is dead-lettered before
//! anything of it is read, the fence included, and ends no device: its
//! body is a stranger's word.

use crate::{
    chain::{self, StepLabels},
    credentials::CredentialStore,
    device_http::HttpClients,
    driver::Rejection,
    fence::Fence,
    lane::Outbox,
    metrics::WorkerMetrics,
    registry::{Prepared, Registry},
    step::{Executed, StepEnv},
};
use chrono::{DateTime, Utc};
use flotilla_common::control::{ControlBook, Mode};
use flotilla_common::{
    BrokerError, DeadLetteredEvent, DeviceKind, Ending, Event, EventBody, JOB_MESSAGE_TYPE,
    JOB_VERSION, Job, Message, Topology, headers, signing, telemetry,
};
use lapin::{message::Delivery, types::FieldTable};
use std::{sync::RwLock, time::Duration};
use tracing::{Instrument, debug, info, warn};

/// A job back from a delay queue this much before its due time runs anyway:
/// waiting again would cost more than it saves.
const EARLY_TOLERANCE: Duration = Duration::from_millis(20);

/// Everything a delivery task shares with the others.
pub(crate) struct Shared {
    pub topology: Topology,
    /// Every campaign's mode, from the control stream.
    pub control: RwLock<ControlBook>,
    pub registry: Registry,
    pub http: HttpClients,
    pub credentials: CredentialStore,
    /// Verifies every delivery and signs every job this worker publishes.
    pub keyring: signing::Keyring,
    /// Where `file:` images may be (canonical), if anywhere.
    pub image_dir: Option<std::path::PathBuf>,
    pub metrics: WorkerMetrics,
    /// This worker's name, recorded in step events.
    pub worker: String,
    /// The longest step the broker's consumer timeout leaves room for.
    pub step_limit: Duration,
    /// How often a job may be returned to the queue (after a panicking
    /// step) before it is dead-lettered.
    pub return_limit: u32,
    /// Test hook: every step of this device's job panics, as a driver bug
    /// would.
    pub panic_for_device: Option<String>,
}

impl Shared {
    pub(crate) fn mode(&self, campaign: &str) -> Mode {
        self.control
            .read()
            .expect("the control lock is never poisoned: nothing panics while holding it")
            .mode(campaign)
    }

    fn env(&self) -> StepEnv<'_> {
        StepEnv {
            http: &self.http,
            credentials: &self.credentials,
            image_dir: self.image_dir.as_deref(),
            metrics: &self.metrics,
            worker: &self.worker,
            step_limit: self.step_limit,
        }
    }
}

/// Handles one delivery up to its committed hand-off. On an error the
/// transaction is left open: the caller closes the channel, which discards
/// it and returns the delivery to the queue.
pub(crate) async fn handle(
    delivery: &Delivery,
    outbox: &mut Outbox,
    shared: &Shared,
    fence: &Fence,
) -> Result<(), BrokerError> {
    let incoming = delivery.properties.headers().as_ref();
    // Before any of it is read: the body and even its headers are a
    // stranger's until they verify.
    match shared.keyring.verify(&delivery.data, incoming) {
        Ok(key) => shared.metrics.verified(key),
        Err(unverified) => {
            return dead_letter_unverified(delivery, outbox, shared, unverified).await;
        }
    }
    if delivery.redelivered
        && let Some(hop) = headers::get_text(incoming, headers::HOP)
        && fence.handed_off(&hop, published_at(delivery)).await?
    {
        info!(%hop, "dropping a redelivered delivery: its hand-off is on the broker already");
        commit(delivery, outbox).await?;
        shared.metrics.redelivery_dropped();
        return Ok(());
    }
    let job = match decode(&delivery.data) {
        Ok(job) => job,
        Err(rejection) => return dead_letter(delivery, outbox, shared, rejection).await,
    };
    // The last delivery the broker's limit allows: dead-letter it here,
    // with its terminal event, rather than let the broker dead-letter it
    // unseen after one more crash.
    let limit = shared.topology.delivery_limit();
    if let Some(count) = headers::get_int(incoming, headers::DELIVERY_COUNT)
        && count >= i64::from(limit)
    {
        let rejection = Rejection {
            reason: "delivery_limit",
            detail: format!("delivered {count} times before (the queue's limit is {limit})"),
        };
        return dead_letter(delivery, outbox, shared, rejection).await;
    }

    if let Some(due_ms) = headers::get_int(incoming, headers::DUE_AT_MS) {
        let early_ms = due_ms - Utc::now().timestamp_millis();
        if early_ms > EARLY_TOLERANCE.as_millis() as i64 {
            let remaining = Duration::from_millis(early_ms as u64);
            let queue = shared
                .topology
                .delay_queue(shared.topology.tier_for(remaining));
            let message = Message::new(JOB_MESSAGE_TYPE)
                .id(message_id(&job))
                .headers(carried_headers(incoming))
                .header(headers::DUE_AT_MS, due_ms)
                .signed(&shared.keyring, &delivery.data);
            outbox.send(
                &queue,
                delivery.data.clone(),
                hands_off(message, delivery, shared),
            );
            return commit(delivery, outbox).await;
        }
        shared
            .metrics
            .poll_lateness(Duration::from_millis((-early_ms).max(0) as u64));
    }

    let mut job = job;
    let mode = shared.mode(&job.campaign);
    if mode == Mode::Paused {
        // Parked: back through a delay queue at the poll pace until the
        // campaign resumes, its deadline stopped. No device is called.
        let delay = job.policy.poll_interval;
        let queue = shared.topology.delay_queue(shared.topology.tier_for(delay));
        let now = Utc::now();
        job.park(now);
        let due = (now + delay).timestamp_millis();
        let body = serde_json::to_vec(&job).expect("a job serializes to JSON");
        let message = Message::new(JOB_MESSAGE_TYPE)
            .id(message_id(&job))
            .headers(carried_headers(incoming))
            .header(headers::DUE_AT_MS, due)
            .signed(&shared.keyring, &body);
        outbox.send(&queue, body, hands_off(message, delivery, shared));
        commit(delivery, outbox).await?;
        shared.metrics.parked();
        return Ok(());
    }
    job.unpark(Utc::now());

    // The step is decoded once, here; what cannot be is dead-lettered.
    let labels = StepLabels::of(&job);
    let prepared = match shared.registry.get(job.device.kind).prepare(job) {
        Ok(prepared) => prepared,
        Err(rejection) => return dead_letter(delivery, outbox, shared, rejection).await,
    };
    let span = labels.span(prepared.step_name(), incoming);
    if shared.panic_for_device.as_deref() == Some(labels.device()) {
        panic!("test hook: the steps of {} panic", labels.device());
    }
    let executed = match chain::run(prepared, span.clone(), mode, incoming, shared).await {
        Ok(executed) => executed,
        Err(rejection) => {
            return dead_letter(delivery, outbox, shared, rejection)
                .instrument(span)
                .await;
        }
    };
    hand_off(executed, delivery, incoming, outbox, shared)
        .instrument(span)
        .await
}

pub(crate) async fn run_step(
    prepared: Box<dyn Prepared<'_> + '_>,
    cancelled: bool,
    shared: &Shared,
) -> Result<Executed, Rejection> {
    let gauge = shared.metrics.in_flight();
    gauge.inc();
    let env = shared.env();
    let executed = prepared.execute(cancelled, &env).await;
    gauge.dec();
    executed
}

/// Sends the follow-up and the events, and commits them with the ack. The
/// follow-up, or else the round's events record (which holds a terminal
/// step's outcome), is the hand-off's record.
async fn hand_off(
    executed: Executed,
    delivery: &Delivery,
    incoming: Option<&FieldTable>,
    outbox: &mut Outbox,
    shared: &Shared,
) -> Result<(), BrokerError> {
    let recorded = executed.follow_up.is_none();
    if let Some(follow_up) = executed.follow_up {
        let body = serde_json::to_vec(&follow_up.job).expect("a job serializes to JSON");
        let mut message = Message::new(JOB_MESSAGE_TYPE)
            .id(message_id(&follow_up.job))
            .headers(trace_headers(incoming));
        let queue = match follow_up.delay {
            Some(delay) => {
                let due = Utc::now() + delay;
                message = message.header(headers::DUE_AT_MS, due.timestamp_millis());
                shared.topology.delay_queue(shared.topology.tier_for(delay))
            }
            None => shared.topology.jobs(),
        };
        let message = message.signed(&shared.keyring, &body);
        outbox.send(&queue, body, hands_off(message, delivery, shared));
    }
    let finished: Vec<(String, DeviceKind, Ending)> = executed
        .events
        .iter()
        .filter_map(|event| match &event.body {
            EventBody::Finished(finished) => Some((
                event.campaign.clone(),
                finished.kind,
                finished.ending.clone(),
            )),
            _ => None,
        })
        .collect();
    let hop = if recorded { record_hop(delivery) } else { None };
    outbox.record(executed.events, hop);
    commit(delivery, outbox).await?;
    // Counted once the broker holds the outcome, so a redelivery after a
    // failed hand-off does not count it twice.
    for (campaign, kind, ending) in &finished {
        shared.metrics.job_finished(campaign, *kind, ending);
    }
    Ok(())
}

/// Reads a job, checking its version before trusting anything else in it.
fn decode(data: &[u8]) -> Result<Job, Rejection> {
    let undecodable = |detail: String| Rejection {
        reason: "undecodable",
        detail,
    };
    let value: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| undecodable(format!("not JSON: {e}")))?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(JOB_VERSION) => {}
        Some(v) => {
            return Err(Rejection {
                reason: "unsupported_version",
                detail: format!(
                    "job envelope version {v}; this worker reads version {JOB_VERSION}"
                ),
            });
        }
        None => return Err(undecodable("no envelope version (\"v\")".to_owned())),
    }
    if let Some(kind) = value
        .pointer("/device/kind")
        .and_then(serde_json::Value::as_str)
        && kind.parse::<DeviceKind>().is_err()
    {
        return Err(Rejection {
            reason: "unknown_kind",
            detail: format!("no driver for device kind {kind:?}"),
        });
    }
    serde_json::from_value(value).map_err(|e| undecodable(format!("not a job envelope: {e}")))
}

/// Sends the delivery to the dead-letter queue with its reason and, when
/// the job names its campaign and device, the device's terminal event, so
/// its campaign, a cancel and the concurrency caps do not wait for it.
pub(crate) async fn dead_letter(
    delivery: &Delivery,
    outbox: &mut Outbox,
    shared: &Shared,
    rejection: Rejection,
) -> Result<(), BrokerError> {
    let event = terminal_event(&delivery.data, &rejection);
    bury(delivery, outbox, shared, rejection, Burial::Verified(event)).await
}

/// Sends a message that does not verify to the dead-letter queue, as it
/// came (its signature headers too, so `dead redrive` cannot launder it),
/// and writes no event: whatever campaign and device its body names, a
/// forger must not be able to end them.
async fn dead_letter_unverified(
    delivery: &Delivery,
    outbox: &mut Outbox,
    shared: &Shared,
    unverified: signing::Unverified,
) -> Result<(), BrokerError> {
    let rejection = Rejection {
        reason: unverified.reason(),
        detail: unverified.to_string(),
    };
    bury(delivery, outbox, shared, rejection, Burial::Unverified).await
}

/// What a dead letter leaves besides itself.
#[allow(
    clippy::large_enum_variant,
    reason = "passed once, by value; never stored"
)]
enum Burial {
    /// A verified message: the device's terminal event, if its body names
    /// one, or else a record of the hand-off for the fence.
    Verified(Option<Event>),
    /// Nothing: its hop header is a stranger's word like the rest.
    Unverified,
}

/// Dead-letters the delivery, with what `burial` says, in one hand-off.
async fn bury(
    delivery: &Delivery,
    outbox: &mut Outbox,
    shared: &Shared,
    rejection: Rejection,
    burial: Burial,
) -> Result<(), BrokerError> {
    warn!(reason = rejection.reason, detail = %rejection.detail, "dead-lettering a message");
    let mut table = delivery.properties.headers().clone().unwrap_or_default();
    headers::set(&mut table, headers::DEAD_REASON, rejection.reason);
    headers::set(&mut table, headers::DEAD_DETAIL, rejection.detail.as_str());
    headers::set(&mut table, headers::DEAD_FROM, shared.topology.jobs());
    // The terminal event, when there is one, is the hand-off's record: a
    // campaign waits for it.
    let mut message = Message::new(JOB_MESSAGE_TYPE).headers(table);
    let event = match burial {
        Burial::Verified(None) => {
            message = hands_off(message, delivery, shared);
            None
        }
        Burial::Verified(event) => event,
        Burial::Unverified => None,
    };
    outbox.send(&shared.topology.dead(), delivery.data.clone(), message);
    if let Some(event) = &event {
        outbox.record(vec![event.clone()], record_hop(delivery));
    }
    commit(delivery, outbox).await?;
    shared.metrics.dead_lettered(rejection.reason);
    if let Some(Event {
        campaign,
        body:
            EventBody::DeadLettered(DeadLetteredEvent {
                kind: Some(kind), ..
            }),
        ..
    }) = &event
    {
        let ending = Ending::dead_lettered(rejection.reason, &rejection.detail);
        shared.metrics.job_finished(campaign, *kind, &ending);
    }
    Ok(())
}

/// The terminal event of a dead-lettered job, if its body names a campaign
/// and a device, read field by field: the body may be no valid job.
fn terminal_event(data: &[u8], rejection: &Rejection) -> Option<Event> {
    let value: serde_json::Value = serde_json::from_slice(data).ok()?;
    let text = |pointer: &str| value.pointer(pointer).and_then(serde_json::Value::as_str);
    let campaign = text("/campaign")?;
    let device = text("/device/id")?;
    Some(Event::new(
        campaign,
        EventBody::DeadLettered(DeadLetteredEvent {
            device: device.to_owned(),
            kind: text("/device/kind").and_then(|kind| kind.parse().ok()),
            seq: value
                .get("seq")
                .and_then(serde_json::Value::as_u64)
                .and_then(|seq| u32::try_from(seq).ok()),
            reason: rejection.reason.to_owned(),
            detail: rejection.detail.clone(),
        }),
    ))
}

/// Commits everything sent for the delivery, then acks it, in its lane's
/// next round (see [`crate::lane`]).
pub(crate) async fn commit(delivery: &Delivery, outbox: &mut Outbox) -> Result<(), BrokerError> {
    outbox.commit(&delivery.acker).await?;
    debug!(tag = delivery.delivery_tag, "handed off and acked");
    Ok(())
}

/// Makes `message` the record of `delivery`'s hand-off (see
/// [`crate::fence`]). A delivery without a hop (from a build before the
/// fence) has no record, and its redeliveries run again.
pub(crate) fn hands_off(message: Message, delivery: &Delivery, shared: &Shared) -> Message {
    match record_hop(delivery) {
        Some(hop) => message.hands_off(&hop, &shared.topology.handoffs()),
        None => message,
    }
}

/// The hop the record of `delivery`'s hand-off names, if it has one.
fn record_hop(delivery: &Delivery) -> Option<String> {
    headers::get_text(delivery.properties.headers().as_ref(), headers::HOP)
}

/// When the delivery's message was published, as far as its headers say:
/// its hand-off cannot be older. A delayed job was handed on no earlier
/// than its due time.
fn published_at(delivery: &Delivery) -> DateTime<Utc> {
    let sent = delivery
        .properties
        .timestamp()
        .and_then(|seconds| DateTime::from_timestamp(i64::try_from(seconds).ok()?, 0));
    let due = headers::get_int(delivery.properties.headers().as_ref(), headers::DUE_AT_MS)
        .and_then(DateTime::from_timestamp_millis);
    // Without either, as far back as the handoffs stream reaches.
    sent.max(due)
        .unwrap_or_else(|| Utc::now() - chrono::Duration::hours(1))
}

/// Identifies one step of one job, for whoever inspects a queue.
fn message_id(job: &Job) -> String {
    format!("{}/{}/{}", job.campaign, job.device.id, job.seq)
}

/// Headers that follow a job from step to step (its trace context).
fn carried_headers(incoming: Option<&FieldTable>) -> FieldTable {
    let mut table = FieldTable::default();
    for name in [headers::TRACEPARENT, headers::TRACESTATE] {
        if let Some(value) = headers::get_text(incoming, name) {
            headers::set(&mut table, name, value);
        }
    }
    table
}

/// The trace context of what a step publishes: the job's own or, for a job
/// published without one, this step's, so the steps that follow join it.
fn trace_headers(incoming: Option<&FieldTable>) -> FieldTable {
    let mut table = carried_headers(incoming);
    if headers::get_text(Some(&table), headers::TRACEPARENT).is_none() {
        telemetry::inject_current(&mut table);
    }
    table
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_ends_the_device_its_body_names_however_broken() {
        let rejection = |data: &[u8]| decode(data).unwrap_err();
        // Not a job (no policy, no step), but its campaign and device read.
        let data = br#"{"v":1,"campaign":"c","seq":3,"device":{"id":"d1","kind":"toaster"}}"#;
        let event = terminal_event(data, &rejection(data)).unwrap();
        assert_eq!(event.campaign, "c");
        match event.body {
            EventBody::DeadLettered(dead) => {
                assert_eq!(dead.device, "d1");
                assert_eq!(dead.kind, None);
                assert_eq!(dead.seq, Some(3));
                assert_eq!(dead.reason, "unknown_kind");
            }
            other => panic!("unexpected {other:?}"),
        }
        for nameless in [
            &b"\x00 not json"[..],
            br#"{"v":1,"campaign":"c"}"#,
            br#"{"v":1,"device":{"id":"d1","kind":"dms"}}"#,
        ] {
            assert_eq!(terminal_event(nameless, &rejection(nameless)), None);
        }
    }

    #[test]
    fn rejections_name_what_is_wrong() {
        let reason = |data: &[u8]| decode(data).unwrap_err().reason;
        assert_eq!(reason(b"\x00\x01garbage"), "undecodable");
        assert_eq!(reason(br#"{"campaign":"c"}"#), "undecodable");
        assert_eq!(reason(br#"{"v":99,"campaign":"c"}"#), "unsupported_version");
        assert_eq!(
            reason(br#"{"v":1,"device":{"kind":"toaster"}}"#),
            "unknown_kind"
        );
        let missing = decode(br#"{"v":1,"device":{"kind":"dms"}}"#).unwrap_err();
        assert_eq!(missing.reason, "undecodable");
        assert!(
            missing.detail.contains("missing field"),
            "{}",
            missing.detail
        );
    }
}
