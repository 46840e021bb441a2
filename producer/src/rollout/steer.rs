//! The controller's loop, apart from the broker: what to do next (the
//! decisions of [`decide`], the start rate, the waves, the caps), read
//! against a clock, and done through a [`Fleet`]. A run drives it against
//! the system's clocks and the broker (`controller`); a forecast drives the
//! same loop in virtual time against assumed outcomes (`crate::forecast`),
//! so what a forecast says is what the controller would do.

use super::{
    adaptive::Adaptive,
    caps::{CapLedger, api_host, targets_of},
    clock::Moment,
    cursor::Cursor,
    decide::{self, Next},
    held::Held,
    pacer::Pacer,
};
use crate::{
    Campaign, ProducerError,
    state::{CampaignState, Phase},
};
use flotilla_common::{Decision, DecisionEvent, Device, Event, EventBody, Thresholds};
use std::time::Instant;

/// Devices started in one go at most.
const BATCH: u64 = 200;
/// Devices of the current wave read ahead, so one full host does not hold
/// up devices behind the others.
const LOOKAHEAD: usize = 10_000;

/// Where the controller's moves go and the campaign's outcomes come from.
#[allow(async_fn_in_trait)]
pub trait Fleet {
    /// The time on the fleet's clocks.
    fn now(&self) -> Moment;
    /// Takes in whatever arrived (outcomes, commands) before deciding.
    async fn settle(&mut self, steering: &mut Steering<'_>) -> Result<(), ProducerError>;
    /// Records a decision (and applies it to `steering.state`).
    async fn decide(
        &mut self,
        steering: &mut Steering<'_>,
        decision: Decision,
        reason: String,
        thresholds: Thresholds,
    ) -> Result<(), ProducerError>;
    /// Claims room behind the capped targets; returns the devices
    /// admitted, and holds the others again.
    async fn claim(
        &mut self,
        steering: &mut Steering<'_>,
        devices: Vec<Device>,
    ) -> Result<Vec<Device>, ProducerError>;
    /// Starts the devices' jobs.
    async fn publish(
        &mut self,
        steering: &mut Steering<'_>,
        devices: Vec<Device>,
        wave: u32,
    ) -> Result<(), ProducerError>;
    /// Waits for an outcome, a command or `until`.
    async fn wait(
        &mut self,
        steering: &mut Steering<'_>,
        until: Option<Moment>,
    ) -> Result<(), ProducerError>;
    /// Records every device never started as cancelled.
    async fn cancel_unstarted(&mut self, steering: &mut Steering<'_>) -> Result<(), ProducerError>;
}

/// The controller's loop, until the campaign is over.
pub async fn drive<F: Fleet>(
    fleet: &mut F,
    steering: &mut Steering<'_>,
) -> Result<(), ProducerError> {
    loop {
        fleet.settle(steering).await?;
        let now = fleet.now();
        match steering.next(now)? {
            Move::Done => return Ok(()),
            Move::Decide {
                decision,
                reason,
                thresholds,
            } => fleet.decide(steering, decision, reason, thresholds).await?,
            Move::Start { devices, wave } => {
                let admitted = fleet.claim(steering, devices).await?;
                if admitted.is_empty() {
                    let until = steering.pacer_next(now);
                    fleet.wait(steering, until).await?;
                } else {
                    steering.started(&admitted, now.instant);
                    fleet.publish(steering, admitted, wave).await?;
                }
            }
            Move::CancelUnstarted => fleet.cancel_unstarted(steering).await?,
            Move::Wait(until) => fleet.wait(steering, until).await?,
        }
    }
}

/// What the loop does next.
#[derive(Debug)]
pub enum Move {
    Decide {
        decision: Decision,
        reason: String,
        thresholds: Thresholds,
    },
    /// Start these devices of `wave` (claiming room first).
    Start {
        devices: Vec<Device>,
        wave: u32,
    },
    CancelUnstarted,
    /// Nothing to do until an outcome or a command arrives, or this moment.
    Wait(Option<Moment>),
    Done,
}

/// The deciding parts of a controller: the campaign's state, the room
/// behind capped targets, the start rate, and the devices read ahead.
pub struct Steering<'a> {
    pub campaign: &'a Campaign,
    pub state: CampaignState,
    /// Room behind capped targets, across all campaigns.
    pub ledger: CapLedger,
    pacer: Option<Pacer>,
    /// Start rates per API host, with `[rate] adaptive`.
    adaptive: Option<Adaptive>,
    pub cursor: Cursor,
    held: Held,
    /// Devices handed to [`Fleet::publish`] whose publication the state
    /// does not show yet (their transaction is committing).
    publishing: u64,
}

impl<'a> Steering<'a> {
    pub fn new(
        campaign: &'a Campaign,
        state: CampaignState,
        ledger: CapLedger,
        cursor: Cursor,
    ) -> Self {
        Steering {
            campaign,
            state,
            ledger,
            pacer: campaign.rollout.rate.clone().map(Pacer::new),
            adaptive: campaign.rollout.adaptive.clone().map(Adaptive::new),
            cursor,
            held: Held::default(),
            publishing: 0,
        }
    }

    /// Whether the campaign claims room behind shared caps.
    pub fn capped(&self) -> bool {
        let rollout = &self.campaign.rollout;
        rollout.per_host.is_some() || rollout.per_image_host.is_some()
    }

    /// What to do at `now`.
    pub fn next(&mut self, now: Moment) -> Result<Move, ProducerError> {
        if let Some(change) = self.adapt(now.instant) {
            return Ok(Move::Decide {
                decision: Decision::RateChanged(change.rate),
                reason: change.reason,
                thresholds: Thresholds::default(),
            });
        }
        Ok(
            match decide::next(&self.state, &self.campaign.rollout, now.wall) {
                Next::Done => Move::Done,
                Next::Decide {
                    decision,
                    reason,
                    thresholds,
                } => Move::Decide {
                    decision,
                    reason,
                    thresholds,
                },
                Next::CancelUnstarted => Move::CancelUnstarted,
                Next::Wait(until) => Move::Wait(until.map(|at| now.at_wall(at))),
                Next::Start(wanted) => self.start(now, wanted)?,
            },
        )
    }

    /// Up to `wanted` devices of the current wave, as the rate and the
    /// caps allow.
    fn start(&mut self, now: Moment, wanted: u64) -> Result<Move, ProducerError> {
        // Those being published are started already.
        let wanted = wanted.saturating_sub(self.publishing);
        if wanted == 0 {
            return Ok(Move::Wait(None));
        }
        let wanted = wanted.min(BATCH) as usize;
        let allowed = match &mut self.pacer {
            Some(pacer) => pacer.take(now.instant, wanted, self.state.totals().succeeded),
            None => wanted,
        };
        if allowed == 0 {
            return Ok(Move::Wait(self.pacer_next(now)));
        }
        let wave = self.state.current_wave().unwrap_or(0);
        self.read_ahead(wave)?;
        let adaptive = &mut self.adaptive;
        let devices = self.held.take(allowed, &self.ledger, |host| {
            adaptive
                .as_mut()
                .is_none_or(|adaptive| adaptive.may_start(host, now.instant))
        });
        if devices.is_empty() {
            if self.held.is_empty() {
                return Err(ProducerError::InventoryChanged(format!(
                    "the inventory ended before wave {} was complete",
                    wave + 1
                )));
            }
            return Ok(Move::Wait(self.pacer_next(now)));
        }
        Ok(Move::Start { devices, wave })
    }

    /// When the start rates (the campaign's, or a limited host's) let the
    /// next device start.
    pub fn pacer_next(&self, now: Moment) -> Option<Moment> {
        let host = self.adaptive.as_ref().and_then(Adaptive::next_start);
        let campaign = self.pacer.as_ref().and_then(Pacer::next_at);
        let at = match (campaign, host) {
            (Some(campaign), Some(host)) => Some(campaign.min(host)),
            (campaign, host) => campaign.or(host),
        };
        at.map(|at| now.at_instant(at))
    }

    /// Takes in what a step event says of its API host's health.
    pub fn observe(&mut self, event: &Event, now: Instant) {
        if let (Some(adaptive), EventBody::Step(step)) = (&mut self.adaptive, &event.body)
            && event.campaign == self.campaign.id
            && let Some(calls) = &step.calls
        {
            adaptive.observe(calls, now);
        }
    }

    /// Devices just admitted, for the hosts' observed start rates.
    fn started(&mut self, devices: &[Device], now: Instant) {
        if let Some(adaptive) = &mut self.adaptive {
            for device in devices {
                adaptive.started(&api_host(device), now);
            }
        }
    }

    /// The adaptive rate's next change, after taking in the limits set by
    /// the decisions made so far (the host's in-flight caps follow them).
    fn adapt(&mut self, now: Instant) -> Option<super::adaptive::Change> {
        let adaptive = self.adaptive.as_mut()?;
        let changed = adaptive.sync(self.state.decisions(), now);
        for host in changed {
            let targets = self.held.first_of(&host).map(|device| self.targets(device));
            if let Some(targets) = targets {
                self.held.retarget(&host, targets);
            }
        }
        if self.state.phase() != Phase::Running {
            return None;
        }
        self.adaptive.as_mut()?.review(now)
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
                let (targets, host) = (self.targets(&device), api_host(&device));
                self.held.push(index, device, host, targets);
            }
        }
        Ok(())
    }

    /// `count` devices are being published: their commit is under way.
    pub fn publishing(&mut self, count: usize) {
        self.publishing += count as u64;
    }

    /// A batch's commit was answered: its `published` events are applied.
    pub fn published(&mut self, events: &[Event]) {
        for event in events {
            self.state.apply(event);
        }
        self.publishing = self.publishing.saturating_sub(events.len() as u64);
    }

    /// Holds a device again that lost the race for the last room.
    pub fn hold_again(&mut self, device: Device) {
        let targets = self.targets(&device);
        let host = api_host(&device);
        self.held.push_first(device, host, targets);
    }

    /// Every device read ahead and not started, letting go of them.
    pub fn release_held(&mut self) -> Vec<Device> {
        self.held.drain()
    }

    /// Forgets the devices read ahead, and reads the inventory again from
    /// the top (after a reconnect: devices being started may have been).
    pub fn reread(&mut self, cursor: Cursor) {
        self.cursor = cursor;
        self.held.clear();
        self.publishing = 0;
    }

    /// The capped targets a device needs room behind: a host the adaptive
    /// rate slowed down gets the same share of its in-flight cap.
    pub fn targets(&self, device: &Device) -> Vec<flotilla_common::CappedTarget> {
        let mut targets = targets_of(device, &self.campaign.target, &self.campaign.rollout);
        if targets.is_empty() {
            return targets;
        }
        let Some(adaptive) = &self.adaptive else {
            return targets;
        };
        let host = api_host(device);
        if let Some(share) = adaptive.share(&host) {
            let key = format!("host:{host}");
            for target in targets.iter_mut().filter(|t| t.key == key) {
                target.cap = ((f64::from(target.cap) * share).ceil() as u32).max(1);
            }
        }
        targets
    }

    /// The event recording a decision, numbered after the last one.
    pub fn decision_event(
        &self,
        decision: Decision,
        reason: String,
        thresholds: Thresholds,
        control_offset: Option<u64>,
    ) -> Event {
        Event::new(
            &self.campaign.id,
            EventBody::Decision(DecisionEvent {
                seq: self.state.next_decision_seq(),
                decision,
                reason,
                counts: self.state.counts(),
                thresholds,
                control_offset,
            }),
        )
    }
}
