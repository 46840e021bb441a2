//! The campaign controller: starts a campaign's devices wave by wave at its
//! rate, inside its window and within the shared caps; follows the events
//! stream; and writes every decision (with the counts and thresholds behind
//! it) to that stream.
//!
//! It keeps no state of its own that the stream does not have: started
//! again after a crash with the same files, it replays its campaign's span
//! of the stream (from the catalogue's offset to a marker of its own) and
//! carries on, never publishing a device twice nor repeating a decision;
//! after a lost connection it reads on from where it was. A device's job
//! and the event recording its publication are published in one
//! transaction, so a crash cannot separate them. Every second it writes a
//! snapshot of its campaign (and of the cap ledger, if capped) for cheap
//! readers (see `catalogue`).

use super::{
    caps::CapLedger,
    clock::Moment,
    cursor::Cursor,
    plan,
    steer::{self, Fleet, Steering},
};
use crate::{
    Campaign, ProducerError,
    catalogue::{self, Created, Ended, Lookup, Recent, SNAPSHOT_EVERY, SNAPSHOT_HEARTBEAT},
    feed::{ControlFeed, EventFeed, Gone},
    state::{CampaignState, Phase},
};
use chrono::Utc;
use flotilla_common::{
    Broker, BrokerError, ClaimEvent, Decision, DecisionEvent, Device, EVENT_MESSAGE_TYPE, Ending,
    Event, EventBody, EventRecord, FinishedEvent, JOB_MESSAGE_TYPE, Job, Message, PauseCause,
    PublishedEvent, Publisher, Thresholds, Topology, TxPublisher,
    control::{self, Command, ControlMessage},
    ops::Readiness,
    signing::Keyring,
    stream::Offset,
    telemetry,
};
use lapin::types::FieldTable;
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};
use tokio::sync::mpsc;
use tracing::{info, info_span, warn};

mod jobs;
mod launch;
mod session;
mod snapshots;

use launch::Launcher;
use session::note_completed;

/// Devices recorded cancelled in one transaction at most.
const BATCH: usize = 200;

/// What a run needs besides the campaign.
pub struct RunSpec<'a> {
    pub inventory: &'a Path,
    /// Devices in the campaign (after `only`), from the inventory check.
    pub devices: u64,
    /// Identifies the files the campaign was started with.
    pub fingerprint: String,
    /// Only these devices (a retry of another campaign's failures).
    pub only: Option<HashSet<String>>,
    /// Set while the controller is connected to the broker (`/readyz`).
    pub readiness: Option<Arc<Readiness>>,
    /// Signs every job published (see [`flotilla_common::signing`]).
    pub keyring: Keyring,
}

/// Runs the campaign until every device has finished (or it is cancelled
/// and the devices in flight have finished). `observe` is called whenever
/// the state may have changed, for progress displays.
///
/// Once started, a lost broker connection does not end the run: the
/// controller reconnects with backoff, reads on from where it was to a
/// marker of its own (so every device it published is known, even one whose
/// commit was in flight), and goes on.
pub async fn run_campaign(
    broker: &Broker,
    topology: &Topology,
    campaign: &Campaign,
    spec: RunSpec<'_>,
    mut observe: impl FnMut(&CampaignState),
) -> Result<CampaignState, ProducerError> {
    let ready = |ready: bool| {
        if let Some(readiness) = &spec.readiness {
            readiness.set(ready);
        }
    };
    let (mut controller, mut steering) =
        Controller::connect(broker, topology, campaign, &spec, &mut observe).await?;
    ready(true);
    loop {
        let run = async {
            steer::drive(&mut controller, &mut steering).await?;
            controller.finish(&mut steering).await
        };
        match run.await {
            Ok(()) => {
                controller.release_lock().await;
                break;
            }
            Err(error) if error.is_connection_loss() => {
                ready(false);
                warn!(campaign = %campaign.id, %error, "lost the broker; reconnecting");
                controller.reconnect(broker, &mut steering).await?;
                info!(campaign = %campaign.id, published = steering.state.published(), "reconnected; carrying on");
                ready(true);
            }
            Err(error) => {
                ready(false);
                controller.release_lock().await;
                return Err(error);
            }
        }
    }
    (controller.observe)(&steering.state);
    Ok(steering.state)
}

/// The controller's hold on the broker: what it publishes with, what it
/// reads, and where it is in the streams. What it decides is in
/// [`Steering`].
struct Controller<'a, O> {
    campaign: &'a Campaign,
    topology: &'a Topology,
    inventory: PathBuf,
    only: Option<HashSet<String>>,
    /// Whether the campaign claims room behind shared caps (and so keeps
    /// the ledger).
    capped: bool,
    /// The events-stream offset up to which everything has been applied.
    position: u64,
    /// The control-stream offset of the last command read.
    control_position: Option<u64>,
    /// The offset of the campaign's `completed` decision, once read back.
    completed_at: Option<u64>,
    /// Whether the catalogue has the campaign's `ended` entry.
    ended_recorded: bool,
    /// When the last snapshot was written, and the offset it covered.
    snapshot: Option<(Instant, u64)>,
    /// Holds the campaign lock (an exclusive queue) as long as it lives;
    /// `None` only while connecting.
    connection: Option<deadpool_lapin::Connection>,
    /// Decisions, claims, commands and snapshots, confirmed one by one.
    decisions: Publisher,
    /// Jobs with their `published` events, in transactions.
    launcher: Launcher,
    keyring: Keyring,
    event_rx: mpsc::Receiver<Result<(u64, Event), BrokerError>>,
    control_rx: mpsc::Receiver<Result<(u64, ControlMessage), BrokerError>>,
    /// Told whenever the state may have changed.
    observe: O,
}

/// What a reconnect waits between attempts.
const RECONNECT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(250);
const RECONNECT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(10);

impl<O: FnMut(&CampaignState)> Fleet for Controller<'_, O> {
    fn now(&self) -> Moment {
        Moment::now()
    }

    async fn settle(&mut self, steering: &mut Steering<'_>) -> Result<(), ProducerError> {
        self.drain(steering).await?;
        self.snapshot_if_due(steering).await?;
        (self.observe)(&steering.state);
        Ok(())
    }

    async fn decide(
        &mut self,
        steering: &mut Steering<'_>,
        decision: Decision,
        reason: String,
        thresholds: Thresholds,
    ) -> Result<(), ProducerError> {
        self.record(steering, decision, reason, thresholds, None)
            .await
    }

    /// With caps, claims room for each device and keeps those admitted
    /// (the others go back to wait); without, admits all.
    async fn claim(
        &mut self,
        steering: &mut Steering<'_>,
        devices: Vec<Device>,
    ) -> Result<Vec<Device>, ProducerError> {
        if !steering.capped() {
            return Ok(devices);
        }
        for device in &devices {
            steering.ledger.forget(&self.campaign.id, &device.id);
            let event = Event::new(
                &self.campaign.id,
                EventBody::Claim(ClaimEvent {
                    device: device.id.clone(),
                    targets: steering.targets(device),
                }),
            );
            self.append(&event).await?;
        }
        // Verdicts come from reading the claims back in stream order.
        let campaign = self.campaign.id.clone();
        self.read_until(steering, |s| {
            devices
                .iter()
                .all(|d| s.ledger.verdict(&campaign, &d.id).is_some())
        })
        .await?;
        let mut admitted = Vec::new();
        for device in devices.into_iter().rev() {
            if steering.ledger.verdict(&self.campaign.id, &device.id) == Some(true) {
                admitted.push(device);
            } else {
                // Lost the race for the last room; try again later.
                steering.hold_again(device);
            }
        }
        admitted.reverse();
        Ok(admitted)
    }

    /// Publishes the devices' jobs and the record of their `published`
    /// events in one transaction, committed in the background (see
    /// [`launch`]): the devices count as being published until it is
    /// answered.
    async fn publish(
        &mut self,
        steering: &mut Steering<'_>,
        devices: Vec<Device>,
        wave: u32,
    ) -> Result<(), ProducerError> {
        let (channel, committed) = self.launcher.channel().await?;
        if let Some(events) = committed {
            steering.published(&events);
        }
        steering.publishing(devices.len());
        let jobs = self.topology.jobs();
        let (mut messages, published): (Vec<_>, Vec<_>) = devices
            .into_iter()
            .map(|device| {
                let (body, message, event) = self.job_message(device, wave);
                ((body, message), event)
            })
            .unzip();
        channel
            .send_all(
                messages.iter_mut().map(|(body, message)| {
                    (jobs.as_str(), body.as_slice(), std::mem::take(message))
                }),
            )
            .await?;
        self.add_to_transaction(&channel, &published).await?;
        self.launcher.commit(channel, published);
        Ok(())
    }

    /// Waits for an event, a command, or `until`.
    async fn wait(
        &mut self,
        steering: &mut Steering<'_>,
        until: Option<Moment>,
    ) -> Result<(), ProducerError> {
        // Wake for the next snapshot too: a paused campaign still has one.
        let snapshot = self.snapshot_due().unwrap_or_else(Instant::now);
        let until = until.map_or(snapshot, |at| at.instant.min(snapshot));
        tokio::select! {
            event = self.event_rx.recv() => {
                let (offset, event) = event.ok_or(BrokerError::ConnectionLost)??;
                self.apply_read(steering, offset, &event);
            }
            command = self.control_rx.recv() => {
                let (offset, message) = command.ok_or(BrokerError::ConnectionLost)??;
                self.control_position = Some(offset);
                self.command(steering, offset, &message).await?;
            }
            committed = self.launcher.committed() => steering.published(&committed?),
            _ = tokio::time::sleep_until(until.into()) => {}
        }
        Ok(())
    }

    /// Records every device never started as cancelled, so each device of
    /// the campaign ends with one outcome.
    async fn cancel_unstarted(&mut self, steering: &mut Steering<'_>) -> Result<(), ProducerError> {
        // Devices being published are not unstarted.
        self.await_commits(steering).await?;
        let mut unstarted = steering.release_held();
        while let Some((_, device)) = steering.cursor.next_device()? {
            if !steering.state.is_handled(&device.id) {
                unstarted.push(device);
            }
        }
        info!(campaign = %self.campaign.id, devices = unstarted.len(), "recording unstarted devices as cancelled");
        for chunk in unstarted.chunks(BATCH) {
            let mut events = Vec::with_capacity(chunk.len());
            for device in chunk {
                events.push(Event::new(
                    &self.campaign.id,
                    EventBody::Finished(FinishedEvent {
                        device: device.id.clone(),
                        kind: device.kind,
                        seq: 0,
                        last_step: crate::state::NOT_STARTED.to_owned(),
                        ending: Ending {
                            error: Some(
                                "the campaign was cancelled before this device started".to_owned(),
                            ),
                            ..Ending::cancelled()
                        },
                        started_at: None,
                    }),
                ));
            }
            let (channel, _) = self.launcher.channel().await?;
            self.add_to_transaction(&channel, &events).await?;
            channel.commit().await?;
            self.launcher.give_back(channel);
        }
        // Counted as they come back from the stream, the one record: counting
        // them here too would end each of these devices twice.
        self.read_until(steering, |s| {
            unstarted.iter().all(|d| s.state.is_handled(&d.id))
        })
        .await?;
        if steering.state.unstarted() > 0 {
            warn!(campaign = %self.campaign.id, missing = steering.state.unstarted(), "devices of the plan are missing from the inventory");
            return Err(ProducerError::InventoryChanged(
                "the inventory has fewer devices than when the campaign started".to_owned(),
            ));
        }
        Ok(())
    }
}

impl<'a, O: FnMut(&CampaignState)> Controller<'a, O> {
    /// Records the campaign's end in the catalogue, once its `completed`
    /// decision is read back (its offset is where readers stop).
    async fn finish(&mut self, steering: &mut Steering<'_>) -> Result<(), ProducerError> {
        self.await_commits(steering).await?;
        self.read_until_completed(steering).await?;
        if !self.ended_recorded
            && let Some(events_offset) = self.completed_at
        {
            let ended = Ended {
                campaign: self.campaign.id.clone(),
                at: Utc::now(),
                events_offset,
                snapshot: steering.state.snapshot(),
            };
            catalogue::record_ended(&self.decisions, self.topology, ended).await?;
            self.ended_recorded = true;
            // A last snapshot, completed: `status` within the lookback
            // would otherwise start from an older one and read every event
            // written since, however many other campaigns wrote.
            self.snapshot = None;
            self.snapshot_if_due(steering).await?;
        }
        Ok(())
    }

    /// Applies an event read from the stream at `offset`.
    fn apply_read(&mut self, steering: &mut Steering<'_>, offset: u64, event: &Event) {
        note_completed(&mut self.completed_at, offset, event, &self.campaign.id);
        steering.state.apply(event);
        steering.observe(event, Instant::now());
        if self.capped {
            steering.ledger.apply(event);
        }
        self.position = self.position.max(offset);
    }

    /// Writes the `started` decision, or checks a restarted run uses the
    /// files the campaign started with.
    async fn start_or_resume(
        &mut self,
        steering: &mut Steering<'_>,
        spec: &RunSpec<'_>,
    ) -> Result<(), ProducerError> {
        match steering.state.plan() {
            Some(plan) if plan.fingerprint != spec.fingerprint => Err(ProducerError::Mismatch {
                campaign: self.campaign.id.clone(),
            }),
            Some(_) => {
                info!(campaign = %self.campaign.id, published = steering.state.published(), finished = steering.state.finished(), "resuming the campaign from its events");
                Ok(())
            }
            None => {
                let (decision, reason) =
                    started(self.campaign, spec.devices, spec.fingerprint.clone())?;
                self.record(steering, decision, reason, Thresholds::default(), None)
                    .await
            }
        }
    }

    /// Writes a decision, applies it, and tells the workers when it changes
    /// what they should do.
    async fn record(
        &mut self,
        steering: &mut Steering<'_>,
        decision: Decision,
        reason: String,
        thresholds: Thresholds,
        control_offset: Option<u64>,
    ) -> Result<(), ProducerError> {
        // Every batch sent before a decision is in the stream before it,
        // and in its counts: nothing is published after a pause.
        self.await_commits(steering).await?;
        info!(campaign = %self.campaign.id, ?decision, %reason, "decision");
        let worker_command = match &decision {
            Decision::Paused { .. } => Some(Command::Pause),
            Decision::Resumed => Some(Command::Resume),
            Decision::Cancelled => Some(Command::Cancel),
            _ => None,
        };
        let event = steering.decision_event(decision, reason.clone(), thresholds, control_offset);
        self.append(&event).await?;
        steering.state.apply(&event);
        // Workers follow the control stream, not decisions; the controller
        // restates its own pauses and resumes there, so the last word in
        // the stream is always the controller's.
        if let Some(command) = worker_command {
            let message =
                ControlMessage::new(&self.campaign.id, command, "controller", Some(reason));
            let body = serde_json::to_vec(&message).expect("a control message serializes to JSON");
            self.decisions
                .publish(
                    &self.topology.control(),
                    &body,
                    Message::new(control::CONTROL_MESSAGE_TYPE),
                )
                .await?;
        }
        Ok(())
    }

    /// An operator's command, at `offset` in the control stream.
    async fn command(
        &mut self,
        steering: &mut Steering<'_>,
        offset: u64,
        message: &ControlMessage,
    ) -> Result<(), ProducerError> {
        if message.campaign != self.campaign.id
            || message.by == "controller"
            || steering
                .state
                .control_done()
                .is_some_and(|done| offset <= done)
        {
            return Ok(());
        }
        let by = match &message.reason {
            Some(reason) => format!("{} ({reason})", message.by),
            None => message.by.clone(),
        };
        let decision = match (message.command, steering.state.phase()) {
            (Command::Pause, Phase::Running) => Some((
                Decision::Paused {
                    cause: PauseCause::Operator,
                },
                format!("paused by {by}"),
            )),
            (Command::Resume, Phase::Paused(_)) => {
                Some((Decision::Resumed, format!("resumed by {by}")))
            }
            (Command::Cancel, Phase::New | Phase::Running | Phase::Paused(_)) => {
                Some((Decision::Cancelled, format!("cancelled by {by}")))
            }
            _ => None,
        };
        if let Some((decision, reason)) = decision {
            self.record(
                steering,
                decision,
                reason,
                Thresholds::default(),
                Some(offset),
            )
            .await?;
        }
        Ok(())
    }

    /// Applies every event, command and commit answer already received.
    async fn drain(&mut self, steering: &mut Steering<'_>) -> Result<(), ProducerError> {
        self.apply_committed(steering)?;
        while let Ok(event) = self.event_rx.try_recv() {
            let (offset, event) = event?;
            self.apply_read(steering, offset, &event);
        }
        while let Ok(command) = self.control_rx.try_recv() {
            let (offset, message) = command?;
            self.control_position = Some(offset);
            self.command(steering, offset, &message).await?;
        }
        Ok(())
    }

    /// Follows the events stream until `done` holds.
    async fn read_until(
        &mut self,
        steering: &mut Steering<'_>,
        done: impl Fn(&Steering<'_>) -> bool,
    ) -> Result<(), ProducerError> {
        while !done(steering) {
            let (offset, event) = self
                .event_rx
                .recv()
                .await
                .ok_or(BrokerError::ConnectionLost)??;
            self.apply_read(steering, offset, &event);
        }
        Ok(())
    }

    /// Follows the events stream until the campaign's `completed` decision
    /// has come back.
    async fn read_until_completed(
        &mut self,
        steering: &mut Steering<'_>,
    ) -> Result<(), ProducerError> {
        while self.completed_at.is_none() {
            let (offset, event) = self
                .event_rx
                .recv()
                .await
                .ok_or(BrokerError::ConnectionLost)??;
            self.apply_read(steering, offset, &event);
        }
        Ok(())
    }

    /// Appends an event to the stream, confirmed.
    async fn append(&self, event: &Event) -> Result<(), ProducerError> {
        let body = serde_json::to_vec(event).expect("an event serializes to JSON");
        self.decisions
            .publish(
                &self.topology.events(),
                &body,
                Message::new(EVENT_MESSAGE_TYPE),
            )
            .await?;
        Ok(())
    }
}

/// The `started` decision of a new campaign of `devices`.
pub fn started(
    campaign: &Campaign,
    devices: u64,
    fingerprint: String,
) -> Result<(Decision, String), ProducerError> {
    let waves = plan::wave_ends(&campaign.rollout.waves, devices).map_err(ProducerError::Plan)?;
    let reason = format!("{devices} devices in {} wave(s): {waves:?}", waves.len());
    let decision = Decision::Started {
        devices,
        waves,
        fingerprint,
        target_version: campaign.target.version.clone(),
    };
    Ok((decision, reason))
}

/// Sends an operator's command for `campaign`.
pub async fn send_command(
    broker: &Broker,
    topology: &Topology,
    campaign: &str,
    command: Command,
    reason: Option<String>,
) -> Result<(), BrokerError> {
    let by = std::env::var("USER")
        .map(|user| format!("operator {user}"))
        .unwrap_or_else(|_| "operator".to_owned());
    control::send(
        broker,
        topology,
        &ControlMessage::new(campaign, command, &by, reason),
    )
    .await
}
