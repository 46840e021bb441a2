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
    caps::{CapLedger, targets_of},
    cursor::Cursor,
    decide::{self, Next},
    pacer::Pacer,
    plan,
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
    Event, EventBody, FinishedEvent, JOB_MESSAGE_TYPE, Job, Message, PauseCause, PublishedEvent,
    Publisher, Thresholds, Topology, TxPublisher,
    control::{self, Command, ControlMessage},
    ops::Readiness,
    signing::Keyring,
    stream::Offset,
    telemetry,
};
use lapin::types::FieldTable;
use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::mpsc;
use tracing::{info, info_span, warn};

mod session;

use session::note_completed;

/// Devices started in one transaction at most.
const BATCH: u64 = 200;
/// Devices of the current wave read ahead, so one full host does not hold
/// up devices behind the others.
const LOOKAHEAD: usize = 10_000;

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
    let mut controller = Controller::connect(broker, topology, campaign, &spec).await?;
    ready(true);
    loop {
        match controller.run(&mut observe).await {
            Ok(()) => {
                controller.release_lock().await;
                break;
            }
            Err(error) if error.is_connection_loss() => {
                ready(false);
                warn!(campaign = %campaign.id, %error, "lost the broker; reconnecting");
                controller.reconnect(broker).await?;
                info!(campaign = %campaign.id, published = controller.state.published(), "reconnected; carrying on");
                ready(true);
            }
            Err(error) => {
                ready(false);
                controller.release_lock().await;
                return Err(error);
            }
        }
    }
    observe(&controller.state);
    Ok(controller.state)
}

struct Controller<'a> {
    campaign: &'a Campaign,
    topology: &'a Topology,
    inventory: PathBuf,
    only: Option<HashSet<String>>,
    /// Whether the campaign claims room behind shared caps (and so keeps
    /// the ledger).
    capped: bool,
    state: CampaignState,
    /// Room behind capped targets, across all campaigns.
    ledger: CapLedger,
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
    jobs: TxPublisher,
    keyring: Keyring,
    cursor: Cursor,
    /// Devices of the current wave read ahead of starting them.
    held: VecDeque<(u64, Device)>,
    pacer: Option<Pacer>,
    event_rx: mpsc::Receiver<Result<(u64, Event), BrokerError>>,
    control_rx: mpsc::Receiver<Result<(u64, ControlMessage), BrokerError>>,
}

/// What a reconnect waits between attempts.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(250);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(10);

impl<'a> Controller<'a> {
    /// The campaign's loop, to its end: decide, start devices, wait.
    async fn run(&mut self, observe: &mut impl FnMut(&CampaignState)) -> Result<(), ProducerError> {
        loop {
            self.drain().await?;
            self.snapshot_if_due().await?;
            observe(&self.state);
            match decide::next(&self.state, &self.campaign.rollout, Utc::now()) {
                Next::Done => break,
                Next::Decide {
                    decision,
                    reason,
                    thresholds,
                } => self.decide(decision, reason, thresholds, None).await?,
                Next::Start(wanted) => {
                    let started = self.start(wanted).await?;
                    if started == 0 {
                        let until = self.pacer.as_ref().and_then(Pacer::next_at);
                        self.wait(until.map(tokio::time::Instant::from_std)).await?;
                    }
                }
                Next::CancelUnstarted => self.cancel_unstarted().await?,
                Next::Wait(until) => {
                    let until = until.map(|at| {
                        let from_now = (at - Utc::now()).to_std().unwrap_or_default();
                        tokio::time::Instant::now() + from_now
                    });
                    self.wait(until).await?;
                }
            }
        }
        self.finish().await
    }

    /// Records the campaign's end in the catalogue, once its `completed`
    /// decision is read back (its offset is where readers stop).
    async fn finish(&mut self) -> Result<(), ProducerError> {
        self.read_until(|c| c.completed_at.is_some()).await?;
        if !self.ended_recorded
            && let Some(events_offset) = self.completed_at
        {
            let ended = Ended {
                campaign: self.campaign.id.clone(),
                at: Utc::now(),
                events_offset,
                snapshot: self.state.snapshot(),
            };
            catalogue::record_ended(&self.decisions, self.topology, ended).await?;
            self.ended_recorded = true;
            // A last snapshot, completed: `status` within the lookback
            // would otherwise start from an older one and read every event
            // written since, however many other campaigns wrote.
            self.snapshot = None;
            self.snapshot_if_due().await?;
        }
        Ok(())
    }

    /// Applies an event read from the stream at `offset`.
    fn apply_read(&mut self, offset: u64, event: &Event) {
        note_completed(&mut self.completed_at, offset, event, &self.campaign.id);
        self.state.apply(event);
        if self.capped {
            self.ledger.apply(event);
        }
        self.position = self.position.max(offset);
    }

    /// When the next snapshot is due (`None`: now, there is none yet): soon
    /// after a change, else a heartbeat.
    fn snapshot_due(&self) -> Option<Instant> {
        match self.snapshot {
            None => None,
            Some((at, covers)) if covers != self.position => Some(at + SNAPSHOT_EVERY),
            Some((at, _)) => Some(at + SNAPSHOT_HEARTBEAT),
        }
    }

    /// Writes the campaign's state (and the ledger, if capped) as of the
    /// events read so far, when due. What the controller applied before
    /// reading it back (its own publications and decisions) is in it too:
    /// a reader applying the events after `position` sees those again and
    /// counts them once, as the state does.
    async fn snapshot_if_due(&mut self) -> Result<(), ProducerError> {
        if self.snapshot_due().is_some_and(|due| Instant::now() < due) {
            return Ok(());
        }
        let covers = self.position;
        catalogue::write_snapshot(
            &self.decisions,
            self.topology,
            covers,
            &self.state.snapshot(),
        )
        .await?;
        if self.capped {
            catalogue::write_ledger(
                &self.decisions,
                self.topology,
                covers,
                &self.ledger.snapshot(),
            )
            .await?;
        }
        self.snapshot = Some((Instant::now(), covers));
        Ok(())
    }

    /// Writes the `started` decision, or checks a restarted run uses the
    /// files the campaign started with.
    async fn start_or_resume(&mut self, spec: &RunSpec<'_>) -> Result<(), ProducerError> {
        match self.state.plan() {
            Some(plan) if plan.fingerprint != spec.fingerprint => Err(ProducerError::Mismatch {
                campaign: self.campaign.id.clone(),
            }),
            Some(_) => {
                info!(campaign = %self.campaign.id, published = self.state.published(), finished = self.state.finished(), "resuming the campaign from its events");
                Ok(())
            }
            None => {
                let waves = plan::wave_ends(&self.campaign.rollout.waves, spec.devices)
                    .map_err(ProducerError::Plan)?;
                let reason = format!(
                    "{} devices in {} wave(s): {waves:?}",
                    spec.devices,
                    waves.len()
                );
                let decision = Decision::Started {
                    devices: spec.devices,
                    waves,
                    fingerprint: spec.fingerprint.clone(),
                    target_version: self.campaign.target.version.clone(),
                };
                self.decide(decision, reason, Thresholds::default(), None)
                    .await
            }
        }
    }

    /// Writes a decision, applies it, and tells the workers when it changes
    /// what they should do.
    async fn decide(
        &mut self,
        decision: Decision,
        reason: String,
        thresholds: Thresholds,
        control_offset: Option<u64>,
    ) -> Result<(), ProducerError> {
        info!(campaign = %self.campaign.id, ?decision, %reason, "decision");
        let worker_command = match &decision {
            Decision::Paused { .. } => Some(Command::Pause),
            Decision::Resumed => Some(Command::Resume),
            Decision::Cancelled => Some(Command::Cancel),
            _ => None,
        };
        let event = Event::new(
            &self.campaign.id,
            EventBody::Decision(DecisionEvent {
                seq: self.state.next_decision_seq(),
                decision,
                reason: reason.clone(),
                counts: self.state.counts(),
                thresholds,
                control_offset,
            }),
        );
        self.append(&event).await?;
        self.state.apply(&event);
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
        offset: u64,
        message: &ControlMessage,
    ) -> Result<(), ProducerError> {
        if message.campaign != self.campaign.id
            || message.by == "controller"
            || self.state.control_done().is_some_and(|done| offset <= done)
        {
            return Ok(());
        }
        let by = match &message.reason {
            Some(reason) => format!("{} ({reason})", message.by),
            None => message.by.clone(),
        };
        let decision = match (message.command, self.state.phase()) {
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
            self.decide(decision, reason, Thresholds::default(), Some(offset))
                .await?;
        }
        Ok(())
    }

    /// Applies every event and command already received.
    async fn drain(&mut self) -> Result<(), ProducerError> {
        while let Ok(event) = self.event_rx.try_recv() {
            let (offset, event) = event?;
            self.apply_read(offset, &event);
        }
        while let Ok(command) = self.control_rx.try_recv() {
            let (offset, message) = command?;
            self.control_position = Some(offset);
            self.command(offset, &message).await?;
        }
        Ok(())
    }

    /// Waits for an event, a command, or `until`.
    async fn wait(&mut self, until: Option<tokio::time::Instant>) -> Result<(), ProducerError> {
        // Wake for the next snapshot too: a paused campaign still has one.
        let snapshot =
            tokio::time::Instant::from_std(self.snapshot_due().unwrap_or_else(Instant::now));
        let until = Some(until.map_or(snapshot, |at| at.min(snapshot)));
        let sleep = async {
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = self.event_rx.recv() => {
                let (offset, event) = event.ok_or(BrokerError::ConnectionLost)??;
                self.apply_read(offset, &event);
            }
            command = self.control_rx.recv() => {
                let (offset, message) = command.ok_or(BrokerError::ConnectionLost)??;
                self.control_position = Some(offset);
                self.command(offset, &message).await?;
            }
            _ = sleep => {}
        }
        Ok(())
    }

    /// Starts up to `wanted` devices of the current wave, as the rate and
    /// the caps allow. Returns how many started.
    async fn start(&mut self, wanted: u64) -> Result<u64, ProducerError> {
        let wanted = wanted.min(BATCH) as usize;
        let allowed = match &mut self.pacer {
            Some(pacer) => pacer.take(Instant::now(), wanted, self.state.totals().succeeded),
            None => wanted,
        };
        if allowed == 0 {
            return Ok(0);
        }
        let wave = self.state.current_wave().unwrap_or(0);
        self.read_ahead(wave)?;
        let chosen = self.choose(allowed);
        if chosen.is_empty() {
            if self.held.is_empty() {
                return Err(ProducerError::InventoryChanged(format!(
                    "the inventory ended before wave {} was complete",
                    wave + 1
                )));
            }
            return Ok(0);
        }
        let admitted = self.claim(chosen).await?;
        let started = admitted.len() as u64;
        self.publish(admitted, wave).await?;
        Ok(started)
    }

    /// Fills the read-ahead with devices of `wave` not yet started.
    fn read_ahead(&mut self, wave: u32) -> Result<(), ProducerError> {
        let wave_end = self
            .state
            .plan()
            .and_then(|plan| plan.wave_ends.get(wave as usize).copied())
            .unwrap_or(0);
        while self.held.len() < LOOKAHEAD {
            match self.cursor.peek()? {
                Some((index, _)) if *index < wave_end => {}
                _ => break,
            }
            let (index, device) = self
                .cursor
                .next_device()?
                .expect("a device was just peeked");
            if !self.state.is_handled(&device.id) {
                self.held.push_back((index, device));
            }
        }
        Ok(())
    }

    /// Takes up to `n` held devices, in order, that have room behind their
    /// capped targets.
    fn choose(&mut self, n: usize) -> Vec<Device> {
        let rollout = &self.campaign.rollout;
        let mut pending: HashMap<String, usize> = HashMap::new();
        let mut chosen = Vec::new();
        let mut kept = VecDeque::with_capacity(self.held.len());
        while let Some((index, device)) = self.held.pop_front() {
            if chosen.len() >= n {
                kept.push_back((index, device));
                continue;
            }
            let targets = targets_of(&device, &self.campaign.target, rollout);
            if self.ledger.has_room(&targets, &pending) {
                for target in &targets {
                    *pending.entry(target.key.clone()).or_default() += 1;
                }
                chosen.push(device);
            } else {
                kept.push_back((index, device));
            }
        }
        self.held = kept;
        chosen
    }

    /// With caps, claims room for each device and keeps those admitted
    /// (the others go back to wait); without, admits all.
    async fn claim(&mut self, devices: Vec<Device>) -> Result<Vec<Device>, ProducerError> {
        let rollout = &self.campaign.rollout;
        if rollout.per_host.is_none() && rollout.per_image_host.is_none() {
            return Ok(devices);
        }
        for device in &devices {
            self.ledger.forget(&self.campaign.id, &device.id);
            let event = Event::new(
                &self.campaign.id,
                EventBody::Claim(ClaimEvent {
                    device: device.id.clone(),
                    targets: targets_of(device, &self.campaign.target, rollout),
                }),
            );
            self.append(&event).await?;
        }
        // Verdicts come from reading the claims back in stream order.
        self.read_until(|c| {
            devices
                .iter()
                .all(|d| c.ledger.verdict(&c.campaign.id, &d.id).is_some())
        })
        .await?;
        let mut admitted = Vec::new();
        for device in devices.into_iter().rev() {
            if self.ledger.verdict(&self.campaign.id, &device.id) == Some(true) {
                admitted.push(device);
            } else {
                // Lost the race for the last room; try again later.
                self.held.push_front((0, device));
            }
        }
        admitted.reverse();
        Ok(admitted)
    }

    /// Publishes the devices' jobs and `published` events in one
    /// transaction.
    async fn publish(&mut self, devices: Vec<Device>, wave: u32) -> Result<(), ProducerError> {
        if devices.is_empty() {
            return Ok(());
        }
        let mut published = Vec::with_capacity(devices.len());
        for device in devices {
            let mut job = Job::new(
                &self.campaign.id,
                device,
                self.campaign.target.clone(),
                self.campaign.policy.clone(),
            );
            job.settings = self.campaign.settings_for(job.device.kind);
            job.tls = self
                .campaign
                .tls
                .profile_for(job.device.group.as_deref())
                .clone();
            let body = serde_json::to_vec(&job).expect("a job serializes to JSON");
            // The device's rollout is one trace, started here; the job
            // carries its context to every step.
            let rollout_span = info_span!(
                parent: None,
                "rollout",
                otel.name = %format!("rollout {}", job.device.kind),
                campaign = %job.campaign,
                device = %job.device.id,
                kind = %job.device.kind,
            );
            let mut headers = FieldTable::default();
            rollout_span.in_scope(|| telemetry::inject_current(&mut headers));
            let message = Message::new(JOB_MESSAGE_TYPE)
                .id(format!("{}/{}/0", job.campaign, job.device.id))
                .headers(headers)
                .signed(&self.keyring, &body);
            self.jobs
                .send(&self.topology.jobs(), &body, message)
                .await?;
            let event = Event::new(
                &self.campaign.id,
                EventBody::Published(PublishedEvent {
                    device: job.device.id.clone(),
                    kind: job.device.kind,
                    wave: Some(wave),
                }),
            );
            self.add_to_transaction(&event).await?;
            published.push(event);
        }
        self.jobs.commit().await?;
        for event in &published {
            self.state.apply(event);
        }
        Ok(())
    }

    /// Records every device never started as cancelled, so each device of
    /// the campaign ends with one outcome.
    async fn cancel_unstarted(&mut self) -> Result<(), ProducerError> {
        let mut unstarted: Vec<Device> = self.held.drain(..).map(|(_, d)| d).collect();
        while let Some((_, device)) = self.cursor.next_device()? {
            if !self.state.is_handled(&device.id) {
                unstarted.push(device);
            }
        }
        info!(campaign = %self.campaign.id, devices = unstarted.len(), "recording unstarted devices as cancelled");
        for chunk in unstarted.chunks(BATCH as usize) {
            for device in chunk {
                let event = Event::new(
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
                );
                self.add_to_transaction(&event).await?;
            }
            self.jobs.commit().await?;
        }
        // Counted as they come back from the stream, the one record: counting
        // them here too would end each of these devices twice.
        self.read_until(|c| unstarted.iter().all(|d| c.state.is_handled(&d.id)))
            .await?;
        if self.state.unstarted() > 0 {
            warn!(campaign = %self.campaign.id, missing = self.state.unstarted(), "devices of the plan are missing from the inventory");
            return Err(ProducerError::InventoryChanged(
                "the inventory has fewer devices than when the campaign started".to_owned(),
            ));
        }
        Ok(())
    }

    /// Adds an event to the open transaction of `jobs`.
    async fn add_to_transaction(&self, event: &Event) -> Result<(), ProducerError> {
        let body = serde_json::to_vec(event).expect("an event serializes to JSON");
        self.jobs
            .send(
                &self.topology.events(),
                &body,
                Message::new(EVENT_MESSAGE_TYPE),
            )
            .await?;
        Ok(())
    }

    /// Follows the events stream until `done` holds.
    async fn read_until(&mut self, done: impl Fn(&Self) -> bool) -> Result<(), ProducerError> {
        while !done(self) {
            let (offset, event) = self
                .event_rx
                .recv()
                .await
                .ok_or(BrokerError::ConnectionLost)??;
            self.apply_read(offset, &event);
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
