//! A fleet in virtual time: the controller's moves land here, each device
//! ends when its kind's assumed duration has passed, and the clock jumps
//! from one moment that matters to the next (an outcome, the start rate's
//! next slot, a window opening). What it records is the timeline.

use super::{
    Assumptions,
    timeline::{InFlightPeak, Pause, Timeline, WindowWait},
};
use crate::{
    ProducerError,
    rollout::{
        caps::{api_host, image_host},
        clock::Moment,
        steer::{Fleet, Steering},
    },
};
use flotilla_common::{
    ClaimEvent, Decision, Device, DeviceKind, Ending, ErrorClass, Event, EventBody, FinishedEvent,
    PublishedEvent, Thresholds,
};
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    time::{Duration, Instant},
};

/// Beyond this, a forecast gives up (a window that is never open).
const HORIZON: Duration = Duration::from_secs(400 * 24 * 3600);

pub(super) struct VirtualFleet<'a> {
    assumptions: &'a Assumptions,
    origin: Moment,
    now: Moment,
    /// Devices started so far, and of those, failed: failures are spread
    /// evenly over the starts.
    started: u64,
    failing: u64,
    /// When each device in flight ends, by sequence number.
    ends: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: HashMap<u64, InFlight>,
    next_seq: u64,
    hosts: HashMap<String, Load>,
    image: Load,
    image_server: String,
    waves_started: Vec<Option<Moment>>,
    waves_ended: Vec<Option<Moment>>,
    windows: Vec<WindowWait>,
    pauses: Vec<Pause>,
}

struct InFlight {
    device: String,
    kind: DeviceKind,
    host: String,
    fails: bool,
}

/// Devices in flight behind one target, and the most at once.
#[derive(Debug, Default)]
struct Load {
    now: u64,
    peak: u64,
    /// Time spent with as many in flight as the cap allows.
    at_cap: Duration,
    at_cap_since: Option<Moment>,
}

impl Load {
    fn add(&mut self, at: Moment, cap: Option<u32>) {
        self.now += 1;
        self.peak = self.peak.max(self.now);
        if cap.is_some_and(|cap| self.now >= u64::from(cap)) && self.at_cap_since.is_none() {
            self.at_cap_since = Some(at);
        }
    }

    fn remove(&mut self, at: Moment, cap: Option<u32>) {
        self.now = self.now.saturating_sub(1);
        if cap.is_some_and(|cap| self.now < u64::from(cap))
            && let Some(since) = self.at_cap_since.take()
        {
            self.at_cap += at.since(since);
        }
    }

    fn peak(&self, target: String, cap: Option<u32>, end: Moment) -> InFlightPeak {
        let at_cap = self.at_cap + self.at_cap_since.map_or(Duration::ZERO, |s| end.since(s));
        InFlightPeak {
            target,
            peak: self.peak,
            cap,
            binds: cap.is_some_and(|cap| self.peak >= u64::from(cap)),
            at_cap_seconds: at_cap.as_secs_f64().round(),
        }
    }
}

impl<'a> VirtualFleet<'a> {
    pub(super) fn new(assumptions: &'a Assumptions, image_server: String) -> Self {
        let origin = Moment {
            instant: Instant::now(),
            wall: assumptions.start,
        };
        VirtualFleet {
            assumptions,
            origin,
            now: origin,
            started: 0,
            failing: 0,
            ends: BinaryHeap::new(),
            in_flight: HashMap::new(),
            next_seq: 0,
            hosts: HashMap::new(),
            image: Load::default(),
            image_server,
            waves_started: Vec::new(),
            waves_ended: Vec::new(),
            windows: Vec::new(),
            pauses: Vec::new(),
        }
    }

    /// An event as of the virtual clock.
    fn event(&self, steering: &Steering<'_>, body: EventBody) -> Event {
        let mut event = Event::new(&steering.campaign.id, body);
        event.at = self.now.wall;
        event
    }

    fn apply(&self, steering: &mut Steering<'_>, mut event: Event) {
        event.at = self.now.wall;
        steering.state.apply(&event);
        if steering.capped() {
            steering.ledger.apply(&event);
        }
    }

    /// The timeline, once the campaign has completed.
    pub(super) fn timeline(self, steering: &Steering<'_>) -> Timeline {
        let end = self.now;
        let rollout = &steering.campaign.rollout;
        let mut hosts: Vec<InFlightPeak> = self
            .hosts
            .iter()
            .map(|(host, load)| load.peak(format!("host:{host}"), rollout.per_host, end))
            .collect();
        hosts.sort_by(|a, b| b.peak.cmp(&a.peak).then_with(|| a.target.cmp(&b.target)));
        let image = self.image.peak(
            format!("image:{}", self.image_server),
            rollout.per_image_host,
            end,
        );
        let waves = (0..steering.state.wave_count())
            .map(|wave| {
                let at = |m: Option<Moment>| m.unwrap_or(end);
                super::timeline::WaveTimes {
                    wave: wave + 1,
                    devices: steering.state.wave_size(wave),
                    starts_at: at(self.waves_started.get(wave as usize).copied().flatten()).wall,
                    ends_at: at(self.waves_ended.get(wave as usize).copied().flatten()).wall,
                }
            })
            .collect();
        Timeline {
            starts_at: self.origin.wall,
            ends_at: end.wall,
            duration: end.since(self.origin),
            waves,
            hosts,
            image,
            windows: self.windows,
            pauses: self.pauses,
        }
    }

    /// Ends every device due at the earliest end, moving the clock there.
    fn end_next(&mut self, steering: &mut Steering<'_>) {
        let Some(Reverse((at, _))) = self.ends.peek().copied() else {
            return;
        };
        self.now = self.now.at_instant(at);
        let rollout = &steering.campaign.rollout;
        let (per_host, per_image) = (rollout.per_host, rollout.per_image_host);
        while let Some(Reverse((due, seq))) = self.ends.peek().copied() {
            if due > at {
                break;
            }
            self.ends.pop();
            let device = self
                .in_flight
                .remove(&seq)
                .expect("every end is of a device in flight");
            if let Some(load) = self.hosts.get_mut(&device.host) {
                load.remove(self.now, per_host);
            }
            self.image.remove(self.now, per_image);
            let ending = if device.fails {
                Ending::failed(ErrorClass::Device, "assumed to fail (--failure-ratio)")
            } else {
                Ending::succeeded()
            };
            let wave = steering
                .state
                .device(&device.device)
                .and_then(|record| record.wave());
            let event = self.event(
                steering,
                EventBody::Finished(FinishedEvent {
                    device: device.device,
                    kind: device.kind,
                    seq: 0,
                    last_step: "forecast".to_owned(),
                    ending,
                    started_at: None,
                }),
            );
            self.apply(steering, event);
            if let Some(wave) = wave {
                let slot = wave as usize;
                if self.waves_ended.len() <= slot {
                    self.waves_ended.resize(slot + 1, None);
                }
                self.waves_ended[slot] = Some(self.now);
            }
        }
    }
}

impl Fleet for VirtualFleet<'_> {
    fn now(&self) -> Moment {
        self.now
    }

    async fn settle(&mut self, _: &mut Steering<'_>) -> Result<(), ProducerError> {
        if self.now.since(self.origin) > HORIZON {
            return Err(ProducerError::Plan(format!(
                "the forecast gave up after {} days of virtual time (is the maintenance window ever open?)",
                HORIZON.as_secs() / 86_400
            )));
        }
        Ok(())
    }

    async fn decide(
        &mut self,
        steering: &mut Steering<'_>,
        decision: Decision,
        reason: String,
        thresholds: Thresholds,
    ) -> Result<(), ProducerError> {
        let event = steering.decision_event(decision.clone(), reason.clone(), thresholds, None);
        self.apply(steering, event);
        match decision {
            Decision::WindowClosed { opens_at } => self.windows.push(WindowWait {
                from: self.now.wall,
                opens_at,
            }),
            Decision::Paused { cause } => {
                let counts = steering.state.counts();
                self.pauses.push(Pause {
                    at: self.now.wall,
                    wave: counts.wave.map(|w| w + 1),
                    cause,
                    finished: counts.finished,
                    failed: counts.failed,
                    reason,
                });
                // The forecast goes on as if someone resumed at once: the
                // time a person takes is not the campaign's to know.
                let resumed = steering.decision_event(
                    Decision::Resumed,
                    "the forecast assumes a resume at once".to_owned(),
                    Thresholds::default(),
                    None,
                );
                self.apply(steering, resumed);
            }
            _ => {}
        }
        Ok(())
    }

    /// Claims as the controller does, judged by the same ledger (this
    /// campaign alone holds room).
    async fn claim(
        &mut self,
        steering: &mut Steering<'_>,
        devices: Vec<Device>,
    ) -> Result<Vec<Device>, ProducerError> {
        if !steering.capped() {
            return Ok(devices);
        }
        let mut admitted = Vec::with_capacity(devices.len());
        for device in devices {
            steering.ledger.forget(&steering.campaign.id, &device.id);
            let event = self.event(
                steering,
                EventBody::Claim(ClaimEvent {
                    device: device.id.clone(),
                    targets: steering.targets(&device),
                }),
            );
            self.apply(steering, event);
            if steering.ledger.verdict(&steering.campaign.id, &device.id) == Some(true) {
                admitted.push(device);
            } else {
                steering.hold_again(device);
            }
        }
        Ok(admitted)
    }

    async fn publish(
        &mut self,
        steering: &mut Steering<'_>,
        devices: Vec<Device>,
        wave: u32,
    ) -> Result<(), ProducerError> {
        let rollout = &steering.campaign.rollout;
        let (per_host, per_image) = (rollout.per_host, rollout.per_image_host);
        let slot = wave as usize;
        if self.waves_started.len() <= slot {
            self.waves_started.resize(slot + 1, None);
        }
        self.waves_started[slot].get_or_insert(self.now);
        for device in devices {
            let duration = *self
                .assumptions
                .durations
                .get(&device.kind)
                .ok_or_else(|| {
                    ProducerError::Plan(format!("no duration assumed for kind {}", device.kind))
                })?;
            self.started += 1;
            let fails = (self.started as f64 * self.assumptions.failure_ratio).floor() as u64
                > self.failing;
            if fails {
                self.failing += 1;
            }
            let host = api_host(&device);
            self.hosts
                .entry(host.clone())
                .or_default()
                .add(self.now, per_host);
            self.image.add(self.now, per_image);
            let seq = self.next_seq;
            self.next_seq += 1;
            self.ends
                .push(Reverse((self.now.after(duration).instant, seq)));
            let event = self.event(
                steering,
                EventBody::Published(PublishedEvent {
                    device: device.id.clone(),
                    kind: device.kind,
                    wave: Some(wave),
                }),
            );
            self.apply(steering, event);
            self.in_flight.insert(
                seq,
                InFlight {
                    device: device.id,
                    kind: device.kind,
                    host,
                    fails,
                },
            );
        }
        Ok(())
    }

    async fn wait(
        &mut self,
        steering: &mut Steering<'_>,
        until: Option<Moment>,
    ) -> Result<(), ProducerError> {
        let next_end = self.ends.peek().map(|Reverse((at, _))| *at);
        match (until, next_end) {
            (Some(until), Some(end)) if end <= until.instant => self.end_next(steering),
            (None, Some(_)) => self.end_next(steering),
            // Nothing ends first: on to `until`, and never stand still.
            (Some(until), _) => {
                self.now = if until.instant > self.now.instant {
                    until
                } else {
                    self.now.after(Duration::from_millis(1))
                }
            }
            (None, None) => {
                return Err(ProducerError::Plan(format!(
                    "the forecast stalled at {}: nothing in flight and nothing to start ({} of {} devices finished)",
                    self.now.wall,
                    steering.state.finished(),
                    steering.state.device_count()
                )));
            }
        }
        Ok(())
    }

    async fn cancel_unstarted(&mut self, _: &mut Steering<'_>) -> Result<(), ProducerError> {
        Err(ProducerError::Plan(
            "a forecast campaign is never cancelled".to_owned(),
        ))
    }
}

/// The campaign's image server, as caps name it.
pub(super) fn image_server(steering: &Steering<'_>) -> String {
    image_host(&steering.campaign.target)
}
