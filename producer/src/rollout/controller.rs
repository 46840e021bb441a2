//! The campaign controller: starts a campaign's devices wave by wave at its
//! rate, inside its window and within the shared caps; follows the events
//! stream; and writes every decision (with the counts and thresholds behind
//! it) to that stream.
//!
//! It keeps no state of its own that the stream does not have: started
//! again after a crash with the same files, it replays the stream and
//! carries on, never publishing a device twice nor repeating a decision.
//! A device's job and the event recording its publication are published in
//! one transaction, so a crash cannot separate them.

use super::{
    caps::{CapLedger, targets_of},
    cursor::Cursor,
    decide::{self, Next},
    pacer::Pacer,
    plan,
};
use crate::{
    Campaign, ProducerError,
    feed::{CAUGHT_UP, ControlFeed, EventFeed},
    state::{CampaignState, Phase},
};
use chrono::Utc;
use flotilla_common::{
    Broker, BrokerError, ClaimEvent, Decision, DecisionEvent, Device, EVENT_MESSAGE_TYPE, Ending,
    Event, EventBody, FinishedEvent, JOB_MESSAGE_TYPE, Job, Message, PauseCause, PublishedEvent,
    Publisher, Thresholds, Topology, TxPublisher,
    control::{self, Command, ControlMessage},
    telemetry,
};
use lapin::types::FieldTable;
use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::Path,
    time::Instant,
};
use tokio::sync::mpsc;
use tracing::{info, info_span, warn};

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
}

/// Runs the campaign until every device has finished (or it is cancelled
/// and the devices in flight have finished). `observe` is called whenever
/// the state may have changed, for progress displays.
pub async fn run_campaign(
    broker: &Broker,
    topology: &Topology,
    campaign: &Campaign,
    spec: RunSpec<'_>,
    mut observe: impl FnMut(&CampaignState),
) -> Result<CampaignState, ProducerError> {
    let connection = broker.connection().await?;
    topology.declare(&connection).await?;
    hold_campaign_lock(&connection, topology, &campaign.id).await?;

    // Replay both streams before deciding anything.
    let mut state = CampaignState::new(&campaign.id);
    let mut ledger = CapLedger::default();
    // One connection for the controller's readers and publishers: the
    // broker's pool is shared with every other campaign in the process.
    let mut events = EventFeed::open(&connection, topology).await?;
    while let Some(event) = events.next_within(CAUGHT_UP).await? {
        state.apply(&event);
        ledger.apply(&event);
    }
    let mut control = ControlFeed::open(&connection, topology).await?;
    let mut commands = Vec::new();
    while let Some(command) = control.next_within(CAUGHT_UP).await? {
        commands.push(command);
    }

    let mut controller = Controller {
        campaign,
        topology,
        state,
        ledger,
        decisions: Publisher::open(&connection).await?,
        jobs: TxPublisher::open(&connection).await?,
        cursor: Cursor::open(spec.inventory, spec.only.clone())?,
        held: VecDeque::new(),
        pacer: campaign.rollout.rate.clone().map(Pacer::new),
        event_rx: forward(events),
        control_rx: forward_control(control),
    };
    controller.start_or_resume(&spec).await?;
    for (offset, message) in commands {
        controller.command(offset, &message).await?;
    }

    loop {
        controller.drain().await?;
        observe(&controller.state);
        match decide::next(&controller.state, &campaign.rollout, Utc::now()) {
            Next::Done => break,
            Next::Decide {
                decision,
                reason,
                thresholds,
            } => {
                controller
                    .decide(decision, reason, thresholds, None)
                    .await?
            }
            Next::Start(wanted) => {
                let started = controller.start(wanted).await?;
                if started == 0 {
                    let until = controller.pacer.as_ref().and_then(Pacer::next_at);
                    controller
                        .wait(until.map(tokio::time::Instant::from_std))
                        .await?;
                }
            }
            Next::CancelUnstarted => controller.cancel_unstarted().await?,
            Next::Wait(until) => {
                let until = until.map(|at| {
                    let from_now = (at - Utc::now()).to_std().unwrap_or_default();
                    tokio::time::Instant::now() + from_now
                });
                controller.wait(until).await?;
            }
        }
    }
    observe(&controller.state);
    Ok(controller.state)
}

struct Controller<'a> {
    campaign: &'a Campaign,
    topology: &'a Topology,
    state: CampaignState,
    /// Room behind capped targets, across all campaigns.
    ledger: CapLedger,
    /// Decisions, claims and commands, confirmed one by one.
    decisions: Publisher,
    /// Jobs with their `published` events, in transactions.
    jobs: TxPublisher,
    cursor: Cursor,
    /// Devices of the current wave read ahead of starting them.
    held: VecDeque<(u64, Device)>,
    pacer: Option<Pacer>,
    event_rx: mpsc::Receiver<Result<Event, BrokerError>>,
    control_rx: mpsc::Receiver<Result<(u64, ControlMessage), BrokerError>>,
}

impl Controller<'_> {
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
            let event = event?;
            self.state.apply(&event);
            self.ledger.apply(&event);
        }
        while let Ok(command) = self.control_rx.try_recv() {
            let (offset, message) = command?;
            self.command(offset, &message).await?;
        }
        Ok(())
    }

    /// Waits for an event, a command, or `until`.
    async fn wait(&mut self, until: Option<tokio::time::Instant>) -> Result<(), ProducerError> {
        let sleep = async {
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = self.event_rx.recv() => {
                let event = event.ok_or(BrokerError::ConnectionLost)??;
                self.state.apply(&event);
                self.ledger.apply(&event);
            }
            command = self.control_rx.recv() => {
                let (offset, message) = command.ok_or(BrokerError::ConnectionLost)??;
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
                .headers(headers);
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
                        last_step: "not_started".to_owned(),
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
            let event = self
                .event_rx
                .recv()
                .await
                .ok_or(BrokerError::ConnectionLost)??;
            self.state.apply(&event);
            self.ledger.apply(&event);
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

/// One controller per campaign: a second `run` of a campaign that is
/// running would start its devices twice. The lock is an exclusive queue,
/// which the broker deletes with this connection, so a crashed controller
/// never blocks its own restart.
async fn hold_campaign_lock(
    connection: &lapin::Connection,
    topology: &Topology,
    campaign: &str,
) -> Result<(), ProducerError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(BrokerError::from)?;
    let name = format!("{}.controller.{campaign}", topology.prefix());
    let options = lapin::options::QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    match channel
        .queue_declare(name.as_str().into(), options, Default::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 405) => {
            Err(ProducerError::AlreadyRunning {
                campaign: campaign.to_owned(),
            })
        }
        Err(error) => Err(BrokerError::from(error).into()),
    }
}

/// Reads the events stream in the background.
fn forward(mut feed: EventFeed) -> mpsc::Receiver<Result<Event, BrokerError>> {
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(async move {
        loop {
            let event = feed.next().await;
            let failed = event.is_err();
            if tx.send(event).await.is_err() || failed {
                return;
            }
        }
    });
    rx
}

fn forward_control(
    mut feed: ControlFeed,
) -> mpsc::Receiver<Result<(u64, ControlMessage), BrokerError>> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let command = feed.next().await;
            let failed = command.is_err();
            if tx.send(command).await.is_err() || failed {
                return;
            }
        }
    });
    rx
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
